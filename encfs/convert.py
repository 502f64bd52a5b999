"""`encfs-gw convert`: turn a plaintext directory into a volume in place, file by file.

The directory DIR becomes the volume's backing directory. Its plaintext tree first moves
aside into DIR/.egw-convert.d/tree (one rename per top-level entry: no data is copied),
the volume is made in DIR, and then every file is written into the volume through the
engine's public methods, read back and compared with a digest of its plaintext, and only
then is its plaintext unlinked. Extra space: the format's overhead for the tree plus the
files in flight (one batch, at most the largest file or 16 MiB), checked before starting.

Crash safety (docs/FORMAT.md section 8 gives the whole argument): DIR/.egw-convert, made
atomically (O_TMPFILE + linkat) before the first change and removed after the last,
marks a conversion in progress, and from the moment the volume is made its
authenticated config records it too (`conversion`, which older readers refuse as an
unknown field); every other encfs-gw command refuses such a directory. The config's
record goes first at the end, the marker last.
DIR/.egw-convert.d/state (replaced atomically) names the batch in flight: before its
encrypted copies are verified and synced, a resume removes them (the plaintext is
intact); after, a resume finishes unlinking the plaintext. A directory's original
metadata is in the state before anything in it changes.

Only the engine's public API is used (create, write, read, mkdir, symlink, mknod, link,
setattr, setxattr, lookup, unlink), with `create_volume` and `Volume.unlock`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import resource
import signal
import stat
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from encfs import backing, config_store
from encfs.engine import ROOT_INODE, Volume, create_volume
from encfs.errors import (
    CannotConvert,
    ConfigError,
    EncfsError,
    IntegrityError,
    NotEnoughSpace,
    UsageError,
    VolumeBusy,
    VolumeExists,
)
from encfs.format import names as fnames
from encfs.format import places
from encfs.format.blocks import (
    BLOCKS_PER_GROUP,
    DEFAULT_BLOCK_SIZE,
    HEADER_SIZE,
    KEY_RECORD_SIZE,
    Layout,
)
from encfs.format.volume import now_utc
from encfs.keys.provider import KeyProvider
from encfs.trust import Operator, OperatorSpec, canonical_backing

log = logging.getLogger(__name__)

TREE = "tree"  # in CONVERT_DIR: the plaintext still to convert
STATE = "state"  # in CONVERT_DIR: phase, batch in flight, directories' metadata, counters
MARKER_FORMAT = "encfs-gw convert"
STATE_FORMAT = "encfs-gw convert state"
CHUNK = 1 << 20  # plaintext read and written per engine call
BATCH_BYTES = 8 << 20  # files under this share a batch (one state write and sync pair)
BATCH_UNITS = 256
BATCH_PATH_BYTES = 64 << 10  # the batch's names in the state file
SPACE_MARGIN = 16 << 20
INODE_MARGIN = 64
MAX_DEPTH = 1000
# The walk holds two descriptors per level (the plaintext directory and the engine's);
# what else is open (the engine, a batch, Python) stays under this.
RESERVED_DESCRIPTORS = 128
KEPT_XATTRS = (b"user.", b"trusted.")
ACL_XATTRS = b"system.posix_acl_"

# Test-only: SIGKILL (or SIGSTOP) this process before its Nth change to DIR. Read here only.
CRASH_AFTER_ENV = "ENCFS_TESTONLY_CONVERT_CRASH_AFTER"
STOP_AFTER_ENV = "ENCFS_TESTONLY_CONVERT_STOP_AFTER"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

RelPath = tuple[str, ...]  # names below the tree's root (os-level str, surrogate-escaped)


# --- small helpers -------------------------------------------------------------------------


def _printable(path: str) -> str:
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _show(rel: RelPath) -> str:
    return _printable("/".join(rel)) or "."


def _encode_rel(rel: RelPath) -> str:
    return b"/".join(os.fsencode(name) for name in rel).hex()


def _decode_rel(text: str) -> RelPath:
    return tuple(os.fsdecode(part) for part in bytes.fromhex(text).split(b"/"))


def _meta(st: os.stat_result) -> list[int]:
    return [st.st_mode, st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns]


def _open_dir(name: str, dir_fd: int | None) -> int:
    """A directory for listing without touching its atime (O_NOATIME: owner or root)."""
    try:
        return os.open(name, _DIR_FLAGS | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _open_file(name: str, dir_fd: int) -> int:
    try:
        return os.open(name, _FILE_FLAGS | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:
        return os.open(name, _FILE_FLAGS, dir_fd=dir_fd)


def _listdir(fd: int) -> list[str]:
    return sorted(os.listdir(fd), key=os.fsencode)


def _xattrs(dir_fd: int, name: str) -> list[tuple[bytes, bytes]]:
    """Every extended attribute of `name` (not following a symlink)."""
    path = f"/proc/self/fd/{dir_fd}/{name}"
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise
    found = []
    for xname in names:
        try:
            found.append((os.fsencode(xname), os.getxattr(path, xname, follow_symlinks=False)))
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed meanwhile
                raise
    return found


def _kept(xname: bytes) -> bool:
    return xname.startswith(KEPT_XATTRS)


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data of a file: holes (SEEK_HOLE) are skipped."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to the end
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support: all data
                yield offset, size - offset
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        offset = end


def _covered_blocks(intervals: list[tuple[int, int]], fs_block: int) -> int:
    """Filesystem blocks touched by byte ranges [start, end)."""
    count, last = 0, -1
    for start, end in sorted(intervals):
        first, final = start // fs_block, (end - 1) // fs_block
        first = max(first, last + 1)
        if final >= first:
            count += final - first + 1
            last = final
    return count


def cipher_allocation(
    layout: Layout, extents: list[tuple[int, int]], size: int, fs_block: int
) -> int:
    """An upper bound of the bytes the backing file of a plaintext file allocates: its
    header and, per group, the key records and block records its data blocks need."""
    bs = layout.block_size
    runs: list[list[int]] = []
    for offset, length in extents:
        first, last = offset // bs, (offset + length - 1) // bs
        if runs and first <= runs[-1][1] + 1:
            runs[-1][1] = max(runs[-1][1], last)
        else:
            runs.append([first, last])
    intervals = [(0, HEADER_SIZE)]
    last_block = max(0, size - 1) // bs
    for first, last in runs:
        for group in range(first // BLOCKS_PER_GROUP, last // BLOCKS_PER_GROUP + 1):
            lo = max(first, group * BLOCKS_PER_GROUP)
            hi = min(last, group * BLOCKS_PER_GROUP + BLOCKS_PER_GROUP - 1)
            keys_end = layout.key_record_offset(hi) + KEY_RECORD_SIZE
            intervals.append((layout.key_record_offset(lo), keys_end))
            tail = layout.record_size
            if hi == last_block:
                tail = layout.block_plain_length(hi, size) + layout.record_size - bs
            intervals.append((layout.record_offset(lo), layout.record_offset(hi) + tail))
    return _covered_blocks(intervals, fs_block) * fs_block


def _encoded_name_length(name: str) -> int:
    padded = -(-max(1, len(os.fsencode(name))) // fnames.NAME_PAD) * fnames.NAME_PAD
    return ((fnames.SIV_TAG_SIZE + padded) * 4 + 2) // 3


# --- is the directory in use? --------------------------------------------------------------


def _unescape_mountinfo(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 3 < len(text) and text[i + 1 : i + 4].isdigit():
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def users_of(real_dir: str) -> list[str]:
    """Who uses something under `real_dir`: open files, current or root directories,
    mapped files of every process we can see (/proc/*/fd, cwd, root, maps), and mounts
    below it (/proc/self/mountinfo). Each finding is one short description."""
    prefix = real_dir.rstrip("/") + "/"

    def under(path: str, escaped: bool = False) -> bool:
        # /proc/PID/maps shows a newline in a path as \012
        top = real_dir.replace("\n", "\\012") if escaped else real_dir
        return (path == top or path.startswith(top.rstrip("/") + "/")) and not path.endswith(
            " (deleted)"
        )

    found: list[str] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        for line in table:
            fields = line.split(" ")
            mountpoint = _unescape_mountinfo(fields[4]) if len(fields) > 4 else ""
            if mountpoint.startswith(prefix):
                found.append(f"a filesystem is mounted at {_printable(mountpoint)}")
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        base = f"/proc/{entry}"
        try:
            with open(f"{base}/comm", encoding="utf-8", errors="replace") as comm:
                who = f"process {entry} ({comm.read().strip()})"
        except OSError:
            continue
        paths: list[tuple[str, str]] = []
        for what in ("cwd", "root"):
            with contextlib.suppress(OSError):
                paths.append((what, os.readlink(f"{base}/{what}")))
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"{base}/fd"):
                with contextlib.suppress(OSError):
                    paths.append(("open file", os.readlink(f"{base}/fd/{fd}")))
        try:
            with open(f"{base}/maps", encoding="utf-8", errors="surrogateescape") as maps:
                for line in maps:
                    parts = line.rstrip("\n").split(maxsplit=5)
                    if len(parts) == 6 and under(parts[5], escaped=True):
                        paths.append(("mapped file", parts[5]))
        except OSError:
            pass
        for what, path in paths:
            if what == "mapped file" or under(path):
                found.append(f"{who} has {what} {_printable(path)}")
                break
    return found


# --- the scan: what the tree holds, what it will cost ----------------------------------------


@dataclass
class Plan:
    """One walk over the plaintext still to convert: counts, the space estimate, the
    hard-link groups, and what a volume cannot keep."""

    files: int = 0  # non-directory names
    directories: int = 0
    data_bytes: int = 0  # plaintext data (holes excluded)
    overhead: int = 0  # backing bytes beyond the plaintext's own allocation
    largest: int = 0  # the largest backing allocation of one file
    inodes: int = 0  # backing inodes beyond the plaintext's (dir ids, sidecars, stores)
    xattrs: int = 0
    links: dict[int, list[RelPath]] = field(default_factory=dict)  # ino -> its names here
    linked_outside: int = 0  # inodes with names outside the directory too
    problems: list[str] = field(default_factory=list)
    acls: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # xattrs the volume does not keep

    def space_needed(self) -> int:
        return self.overhead + max(self.largest, 2 * BATCH_BYTES) + SPACE_MARGIN

    def inodes_needed(self) -> int:
        return self.inodes + BATCH_UNITS + INODE_MARGIN


def depth_limit() -> int:
    """How deep a tree the walk can hold open: the open-file limit (raised to its hard
    limit first) less a reserve, two descriptors per level, at most MAX_DEPTH."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return max(8, min(MAX_DEPTH, (soft - RESERVED_DESCRIPTORS) // 2))


def scan(root_fd: int, layout: Layout, fs_block: int, drop_acls: bool) -> Plan:
    plan = Plan()
    max_depth = depth_limit()
    euid = os.geteuid()
    link_names: dict[int, int] = {}
    stack: list[tuple[int, RelPath, list[str], int]] = [(os.dup(root_fd), (), [], 0)]
    stack[0] = (stack[0][0], (), _listdir(stack[0][0]), 0)
    try:
        while stack:
            fd, rel, names, index = stack[-1]
            if index >= len(names):
                os.close(fd)
                stack.pop()
                continue
            stack[-1] = (fd, rel, names, index + 1)
            name = names[index]
            path = (*rel, name)
            try:
                st = os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                continue
            _scan_entry(plan, layout, fs_block, fd, name, path, st, euid, drop_acls)
            if _encoded_name_length(name) > fnames.NAME_MAX:
                plan.overhead += fs_block
                plan.inodes += 1
            if stat.S_ISDIR(st.st_mode):
                plan.directories += 1
                plan.overhead += 2 * fs_block + st.st_size
                plan.inodes += 1
                if len(stack) >= max_depth:
                    plan.problems.append(
                        f"{_show(path)}: nested deeper than {max_depth} levels (at most "
                        f"{MAX_DEPTH}, and two open files per level within the limit of "
                        "open files, RLIMIT_NOFILE)"
                    )
                    continue
                try:
                    child = _open_dir(name, fd)
                    stack.append((child, path, _listdir(child), 0))
                except OSError as exc:
                    plan.problems.append(f"{_show(path)}: cannot list it ({exc.strerror})")
                continue
            plan.files += 1
            if st.st_nlink > 1:
                plan.links.setdefault(st.st_ino, []).append(path)
                link_names[st.st_ino] = st.st_nlink
                if len(plan.links[st.st_ino]) > 1:
                    continue  # the inode is counted once
            if stat.S_ISREG(st.st_mode):
                _scan_file(plan, layout, fs_block, fd, name, path, st)
            elif stat.S_ISLNK(st.st_mode):
                length = st.st_size
                allocation = fs_block * (1 if places.bound_target_fits_inline(length) else 2)
                plan.overhead += max(0, allocation - st.st_blocks * 512)
                plan.inodes += 0 if places.bound_target_fits_inline(length) else 1
    finally:
        for fd, *_ in stack:
            os.close(fd)
    plan.linked_outside = sum(
        1 for ino, paths in plan.links.items() if len(paths) < link_names[ino]
    )
    return plan


def _scan_entry(
    plan: Plan, layout: Layout, fs_block: int, fd: int, name: str, path: RelPath,
    st: os.stat_result, euid: int, drop_acls: bool,
) -> None:
    """Ownership and extended attributes: can the volume keep them?"""
    if euid != 0 and st.st_uid != euid:
        plan.problems.append(f"{_show(path)}: owned by uid {st.st_uid}; only root can keep that")
    try:
        attributes = _xattrs(fd, name)
    except OSError as exc:
        plan.problems.append(f"{_show(path)}: cannot read its xattrs ({exc.strerror})")
        return
    keeps_xattrs = stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
    kept = 0
    for xname, _ in attributes:
        text = xname.decode("utf-8", "backslashreplace")
        if xname.startswith(ACL_XATTRS):
            plan.acls += 1
            if not drop_acls:
                plan.problems.append(
                    f"{_show(path)}: has a POSIX ACL ({text}), which the volume does not keep "
                    "(its mode bits would widen the group's access): --drop-acls to go on"
                )
            plan.dropped[text] += 1
        elif not _kept(xname):
            plan.dropped[text] += 1  # security.*, system.*: the mount keeps none either
        elif not keeps_xattrs:
            plan.problems.append(
                f"{_show(path)}: xattr {text} on a {_kind(st.st_mode)} (the volume keeps "
                "xattrs on files and directories only)"
            )
        elif len(xname) > fnames.XATTR_NAME_MAX:
            plan.problems.append(
                f"{_show(path)}: xattr name {text[:40]}... is {len(xname)} bytes (the volume "
                f"keeps names up to {fnames.XATTR_NAME_MAX})"
            )
        else:
            kept += 1
    if kept:
        plan.xattrs += kept
        plan.overhead += fs_block


def _scan_file(
    plan: Plan, layout: Layout, fs_block: int, fd: int, name: str, path: RelPath,
    st: os.stat_result,
) -> None:
    extents: list[tuple[int, int]] = [(0, st.st_size)] if st.st_size else []
    sparse = st.st_blocks * 512 < st.st_size
    if sparse or os.geteuid() != 0:
        try:
            file_fd = _open_file(name, fd)
        except OSError as exc:
            plan.problems.append(f"{_show(path)}: cannot read it ({exc.strerror})")
            return
        try:
            if sparse:
                extents = list(data_extents(file_fd, st.st_size))
        finally:
            os.close(file_fd)
    allocation = cipher_allocation(layout, extents, st.st_size, fs_block)
    plan.data_bytes += sum(length for _, length in extents)
    plan.overhead += max(0, allocation - st.st_blocks * 512)
    plan.largest = max(plan.largest, allocation)


def _kind(mode: int) -> str:
    return {
        stat.S_IFLNK: "symlink", stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket",
        stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
    }.get(stat.S_IFMT(mode), "file")


# --- the conversion's own files ------------------------------------------------------------


class _Steps:
    """Counts changes to DIR; the test hooks kill or stop the process before one."""

    def __init__(self) -> None:
        self.count = 0
        self.crash = int(os.environ.get(CRASH_AFTER_ENV) or 0)
        self.stop = int(os.environ.get(STOP_AFTER_ENV) or 0)

    def __call__(self) -> None:
        self.count += 1
        if self.count == self.stop:
            os.kill(os.getpid(), signal.SIGSTOP)
        if self.count == self.crash:
            os.kill(os.getpid(), signal.SIGKILL)


def _read_marker(dir_fd: int, where: str) -> dict | None:
    try:
        raw = backing.read_small_file(dir_fd, fnames.CONVERT_MARKER, 1 << 16)
        marker = json.loads(raw)
        top = marker["top"]
        if marker["format"] != MARKER_FORMAT or marker["version"] != 1:
            raise ValueError
        if not (isinstance(top, list) and len(top) == 5 and all(type(v) is int for v in top)):
            raise ValueError
        return marker
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(
            f"{where}/{fnames.CONVERT_MARKER} exists and is not the marker of an encfs-gw "
            "conversion: move it out of the directory first"
        ) from None


def _write_marker(dir_fd: int, marker: dict) -> None:
    """All or nothing: an unnamed file (O_TMPFILE), written and synced, then linked."""
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        raise CannotConvert(
            f"the filesystem cannot make an unnamed file (O_TMPFILE: {exc.strerror}), which "
            "convert needs to mark its start atomically"
        ) from None
    try:
        backing.pwrite_all(fd, json.dumps(marker).encode(), 0)
        os.fsync(fd)
        backing.link_fd(fd, dir_fd, fnames.CONVERT_MARKER)
    finally:
        os.close(fd)
    os.fsync(dir_fd)


class _State:
    """DIR/.egw-convert.d/state: replaced atomically (temp file, fsync, rename)."""

    def __init__(self, conv_fd: int, steps: _Steps, data: dict | None = None) -> None:
        self.conv_fd = conv_fd
        self.steps = steps
        data = data or {}
        self.phase: str = data.get("phase", "staging")
        self.dirs: dict[str, list[int]] = data.get("dirs", {})
        self.inflight: dict | None = data.get("inflight")
        self.done: Counter[str] = Counter(data.get("done", {}))
        self.dirty = False

    @classmethod
    def load(cls, conv_fd: int, steps: _Steps, where: str) -> _State | None:
        try:
            raw = backing.read_small_file(conv_fd, STATE, 64 << 20)
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            if data.get("format") != STATE_FORMAT or data.get("phase") not in (
                "staging", "creating", "converting",
            ):
                raise ValueError
            state = cls(conv_fd, steps, data)
            for meta in state.dirs.values():
                if not (isinstance(meta, list) and len(meta) == 5):
                    raise ValueError
            if state.inflight is not None:
                [_decode_rel(p) for unit in state.inflight["units"] for p in unit]
                bool(state.inflight["verified"])
            return state
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"the conversion state {where} is corrupt") from None

    def save(self) -> None:
        data = {
            "format": STATE_FORMAT,
            "phase": self.phase,
            "dirs": self.dirs,
            "inflight": self.inflight,
            "done": dict(self.done),
        }
        self.steps()
        backing.write_file_atomic(
            self.conv_fd, STATE, json.dumps(data).encode(), temp_prefix=fnames.TEMP_PREFIX
        )
        self.dirty = False

    def save_if_dirty(self) -> None:
        if self.dirty:
            self.save()


# --- the conversion ------------------------------------------------------------------------


@dataclass
class _Unit:
    """One inode's names (several for a hard-linked one), converted and committed together."""

    paths: list[RelPath]
    st: os.stat_result
    data_bytes: int  # allocated plaintext (what the batch's size limit counts)


@dataclass
class _Frame:
    fd: int
    rel: RelPath
    vino: int
    names: list[str]
    key: str | None = None  # the plaintext directory's inode number (state.dirs)
    index: int = 0


@dataclass
class Progress:
    files_total: int
    bytes_total: int
    files_done: int = 0
    bytes_done: int = 0
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict:
        elapsed = time.monotonic() - self.started
        rate = self.bytes_done / elapsed if elapsed > 0 else 0.0
        eta = None
        if self.bytes_total and self.bytes_done:
            eta = elapsed * (self.bytes_total - self.bytes_done) / self.bytes_done
        elif self.files_total and self.files_done:
            eta = elapsed * (self.files_total - self.files_done) / self.files_done
        return {
            "files_done": self.files_done,
            "files_total": self.files_total,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "elapsed": round(elapsed, 3),
            "rate_mib_s": round(rate / 1048576, 2),
            "eta": None if eta is None else round(eta, 1),
        }


def convert(
    path: str,
    operator: Operator,
    new_provider: Callable[[], KeyProvider],
    *,
    block_size: int | None = None,
    drop_acls: bool = False,
    keep_outside: list[str] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_plan: Callable[[dict], None] | None = None,
) -> dict:
    """Convert (or finish converting) the directory `path` into a volume in place.

    `operator` opens a volume made earlier (a resumed conversion); `new_provider` gives
    the key provider when the volume is still to be made. Returns the summary."""
    absolute = os.path.abspath(path)
    if os.path.islink(absolute):
        raise UsageError(f"{absolute} is a symlink; give the directory itself")
    if not os.path.lexists(absolute):
        raise UsageError(f"{absolute} does not exist")
    if not os.path.isdir(absolute):
        raise UsageError(f"{absolute} is not a directory")
    real = os.path.realpath(absolute)
    if real == "/":
        raise UsageError("convert refuses the root directory")
    try:
        dir_fd = _open_dir(real, None)  # O_NOATIME: a refusal leaves DIR's atime as it was
    except OSError as exc:
        raise UsageError(f"cannot open {real}: {exc.strerror}") from None
    try:
        # One conversion at a time: an flock on DIR until the staging directory's is held
        # (then the volume's lock too). Other commands refuse the marker.
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VolumeBusy(f"{real} is locked by another encfs-gw command") from None
        conversion = _Conversion(real, dir_fd, operator, new_provider, block_size, drop_acls)
        conversion.on_progress = on_progress
        conversion.on_plan = on_plan
        return conversion.run(keep_outside or [])
    finally:
        os.close(dir_fd)


class _Conversion:
    def __init__(
        self,
        real: str,
        dir_fd: int,
        operator: Operator,
        new_provider: Callable[[], KeyProvider],
        block_size: int | None,
        drop_acls: bool,
    ) -> None:
        self.real = real
        self.dir_fd = dir_fd
        self.operator = operator
        self.new_provider = new_provider
        self.block_size = block_size
        self.drop_acls = drop_acls
        self.steps = _Steps()
        self.on_progress: Callable[[Progress], None] | None = None
        self.on_plan: Callable[[dict], None] | None = None
        self.volume: Volume | None = None
        self.state: _State | None = None
        self.conv_fd = -1
        self.tree_fd = -1
        self.plan = Plan()
        self.progress = Progress(0, 0)
        self.batch: list[_Unit] = []
        self.batch_inodes: set[int] = set()
        self.batch_bytes = self.batch_path_bytes = 0
        self.frames: dict[RelPath, _Frame] = {}  # open plaintext directories
        self.finishing: list[tuple[_Frame, _Frame]] = []  # (parent, directory) to finish
        self.peak_extra = 0
        self.free_at_start = 0
        self.notes: list[str] = []
        self.done: Counter[str] = Counter()
        self.created_with: str | None = None
        self.started = ""  # the marker's: the config records it until the end

    # --- the phases ---------------------------------------------------------------------
    def run(self, keep_outside: list[str]) -> dict:
        top = os.fstat(self.dir_fd)  # before anything here reads the directory
        marker = _read_marker(self.dir_fd, self.real)
        fresh = marker is None
        if fresh:
            if self._exists(fnames.CONFIG_FILE):
                raise VolumeExists(f"{self.real} is already an encfs-gw volume")
            if self._exists(fnames.CONVERT_DIR):
                raise UsageError(
                    f"{self.real}/{fnames.CONVERT_DIR} exists but no conversion was started "
                    "here: move it out of the directory first"
                )
        if not fresh and self._exists(fnames.CONVERT_DIR):
            self._lock_staging()  # before the scan of users: another convert is one
        self._check_outside(keep_outside)
        users = users_of(self.real)
        if users:
            more = f" (and {len(users) - 1} more)" if len(users) > 1 else ""
            raise VolumeBusy(
                f"{self.real} is in use: {users[0]}{more}; stop what uses it (writers, "
                "shells, mounts) and run convert again"
            )
        self.free_at_start = self._free_bytes()
        if fresh:
            layout = self._layout(self.block_size or DEFAULT_BLOCK_SIZE)
            self.plan = self._checked_plan(self.dir_fd, layout)
            marker = {
                "format": MARKER_FORMAT, "version": 1, "started": now_utc(), "top": _meta(top),
            }
            self.steps()
            _write_marker(self.dir_fd, marker)
        assert marker is not None
        self.started = marker["started"]
        try:
            if self._open_staging():
                assert self.state is not None
                staged_now = self.state.phase == "staging"
                if staged_now:
                    self._stage()
                if self.state.phase == "creating":
                    self._create_volume(interrupted=not staged_now)
                self._open_volume()
                assert self.volume is not None
                if not fresh:
                    self.plan = self._checked_plan(self.tree_fd, self.volume.layout)
                self._report_plan()
                self._resolve_inflight()
                self._walk()
                self._remove_staging()
            else:
                fcntl.flock(self.dir_fd, fcntl.LOCK_UN)  # the volume lock takes over
                self._open_volume()
            self._finish_top(marker["top"])
            return self._summary()
        finally:
            if self.volume is not None:
                self.volume.close()
            for fd in (self.tree_fd, self.conv_fd):
                if fd >= 0:
                    os.close(fd)

    def _exists(self, name: str, dir_fd: int | None = None) -> bool:
        try:
            os.stat(name, dir_fd=self.dir_fd if dir_fd is None else dir_fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def _layout(self, block_size: int) -> Layout:
        try:
            return Layout(block_size)
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def _check_outside(self, keep_outside: list[str]) -> None:
        """What convert itself needs must not be encrypted into the volume."""
        needed = [
            ("the key file", path) for path in keep_outside
        ] + [
            ("the trust store", self.operator.store.directory),
            ("the Python installation running encfs-gw", sys.prefix),
            ("encfs-gw itself", os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        ]
        prefix = self.real.rstrip("/") + "/"
        for what, path in needed:
            where = os.path.realpath(path)
            if where == self.real or where.startswith(prefix):
                raise UsageError(
                    f"{what} ({_printable(path)}) is inside {self.real}: convert would "
                    "encrypt it into the volume; keep it outside"
                )

    def _free_bytes(self) -> int:
        st = os.fstatvfs(self.dir_fd)
        return st.f_bavail * st.f_frsize

    def _checked_plan(self, root_fd: int, layout: Layout) -> Plan:
        fs = os.fstatvfs(self.dir_fd)
        plan = scan(root_fd, layout, fs.f_bsize, self.drop_acls)
        # DIR's own xattrs go to the volume's root at the end
        _scan_entry(
            plan, layout, fs.f_bsize, self.dir_fd, ".", (), os.fstat(self.dir_fd),
            os.geteuid(), self.drop_acls,
        )
        if plan.problems:
            more = f" (and {len(plan.problems) - 1} more)" if len(plan.problems) > 1 else ""
            raise CannotConvert(
                f"{self.real} holds what a volume cannot keep: {plan.problems[0]}{more}"
            )
        free = fs.f_bavail * fs.f_frsize
        if free < plan.space_needed():
            raise NotEnoughSpace(
                f"{self.real}: {free / 1048576:.1f} MiB free, convert needs "
                f"{plan.space_needed() / 1048576:.1f} MiB (the format's overhead for this tree "
                f"{plan.overhead / 1048576:.1f} MiB, the largest file in flight "
                f"{max(plan.largest, 2 * BATCH_BYTES) / 1048576:.1f} MiB, a margin of "
                f"{SPACE_MARGIN // 1048576} MiB)"
            )
        if fs.f_files and fs.f_favail < plan.inodes_needed():
            raise NotEnoughSpace(
                f"{self.real}: {fs.f_favail} inodes free, convert needs {plan.inodes_needed()}"
            )
        if plan.xattrs:
            self._probe_user_xattrs()
        return plan

    def _probe_user_xattrs(self) -> None:
        path = f"/proc/self/fd/{self.dir_fd}"
        probe = fnames.XATTR_PREFIX + "convert-probe"
        try:
            os.setxattr(path, probe, b"")
            os.removexattr(path, probe)
        except OSError as exc:
            raise CannotConvert(
                f"{self.real}: its filesystem does not store user.* extended attributes "
                f"({exc.strerror}), which the volume needs to keep the tree's xattrs"
            ) from None

    def _report_plan(self) -> None:
        plan = self.plan
        self.progress = Progress(plan.files, plan.data_bytes)
        if plan.linked_outside:
            self.notes.append(
                f"{plan.linked_outside} file(s) have hard links outside {self.real}: those "
                "names keep the plaintext"
            )
        if plan.dropped:
            kinds = ", ".join(f"{name} ({n})" for name, n in sorted(plan.dropped.items()))
            self.notes.append(f"xattrs the volume does not keep (as the mount): {kinds}")
        if self.on_plan is not None:
            self.on_plan({
                "files": plan.files, "directories": plan.directories,
                "bytes": plan.data_bytes, "space_needed": plan.space_needed(),
                "free": self.free_at_start,
            })

    def _open_staging(self) -> bool:
        """Open (make) DIR/.egw-convert.d; False once it is gone (only the end is left)."""
        config_there = self._exists(fnames.CONFIG_FILE)
        if not self._exists(fnames.CONVERT_DIR):
            if config_there:
                return False
            self.steps()
            os.mkdir(fnames.CONVERT_DIR, 0o700, dir_fd=self.dir_fd)
        self._lock_staging()
        if not self._exists(TREE, self.conv_fd):
            if config_there:  # the tree was removed: only the state is left to remove
                self._remove_staging()
                return False
            self.steps()
            os.mkdir(TREE, 0o700, dir_fd=self.conv_fd)
        self.tree_fd = os.open(TREE, _DIR_FLAGS, dir_fd=self.conv_fd)
        where = f"{self.real}/{fnames.CONVERT_DIR}/{STATE}"
        self.state = _State.load(self.conv_fd, self.steps, where)
        if self.state is None:
            self.state = _State(self.conv_fd, self.steps)
            self.state.save()
        return True

    def _lock_staging(self) -> None:
        """From here the staging directory's flock keeps other converts out and DIR's
        own goes (the volume config is written under an flock on DIR, as for every
        volume)."""
        if self.conv_fd >= 0:
            return
        self.conv_fd = os.open(fnames.CONVERT_DIR, _DIR_FLAGS, dir_fd=self.dir_fd)
        try:
            fcntl.flock(self.conv_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VolumeBusy(f"{self.real} is being converted by another convert") from None
        fcntl.flock(self.dir_fd, fcntl.LOCK_UN)

    def _stage(self) -> None:
        """Move every top-level entry into the staging tree (renames: no data copied)."""
        assert self.state is not None
        for name in _listdir(self.dir_fd):
            if name in (fnames.CONVERT_MARKER, fnames.CONVERT_DIR):
                continue
            self.steps()
            os.rename(name, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.tree_fd)
        os.fsync(self.tree_fd)
        os.fsync(self.dir_fd)
        self.state.phase = "creating"
        self.state.save()

    def _create_volume(self, interrupted: bool) -> None:
        assert self.state is not None
        if not self._exists(fnames.CONFIG_FILE):
            # Every user entry is in the tree: what else is here is an interrupted
            # create_volume's (its root id, a temporary file), and so is a trust entry
            # naming this path (no volume was ever here: its config was never written).
            for name in os.listdir(self.dir_fd):
                if name not in (fnames.CONVERT_MARKER, fnames.CONVERT_DIR):
                    self.steps()
                    os.unlink(name, dir_fd=self.dir_fd)
            self._forget_stale_trust()
            provider = self.new_provider()
            self.steps()
            try:
                create_volume(
                    self.real,
                    provider,
                    self.block_size or DEFAULT_BLOCK_SIZE,
                    self.operator,
                    conversion={"started": self.started},
                )
            except VolumeExists as exc:
                if not interrupted:
                    raise
                raise VolumeExists(
                    f"{exc} (an interrupted convert of {self.real} may have made it while "
                    "it made the volume, which was never finished: no volume uses it; "
                    "remove it or name another one)"
                ) from None
            # Open it with the provider just used (a passphrase is not asked twice).
            made = OperatorSpec(provider.name, dict(provider.options))
            factory = self.operator.factory

            def reuse(kind: str, options: dict) -> KeyProvider:
                if kind == made.kind and options == made.options:
                    return provider
                return factory(kind, options)

            self.operator = Operator([made], self.operator.store, factory=reuse)
            self.created_with = provider.describe()
        self.state.phase = "converting"
        self.state.save()

    def _forget_stale_trust(self) -> None:
        store = self.operator.store
        backing_path = canonical_backing(self.real)
        with store.locked():
            for entry in list(store.entries()):
                if backing_path in entry.backings:
                    entry.backings.remove(backing_path)
                    if entry.backings:
                        store.save(entry)
                    else:
                        store.remove(entry.volume_id)

    def _open_volume(self) -> None:
        self.volume = Volume.unlock(self.real, self.operator, converting=True)
        wanted = self.block_size
        if wanted is not None and wanted != self.volume.config.block_size:
            raise UsageError(
                f"the volume in {self.real} has block size {self.volume.config.block_size}, "
                f"not {wanted} (its conversion started with that size)"
            )

    # --- resolving a batch a crash interrupted ---------------------------------------------
    def _resolve_inflight(self) -> None:
        """Verified and synced: finish unlinking its plaintext. Not yet: its encrypted
        copies are not trusted: remove them (the plaintext is all there)."""
        state = self.state
        assert state is not None
        if state.inflight is None:
            return
        units = [[_decode_rel(p) for p in unit] for unit in state.inflight["units"]]
        if state.inflight["verified"]:
            for unit in units:
                for rel in unit:
                    self._unlink_plain(rel)
            self._sync()
        else:
            for unit in units:
                for rel in unit:
                    self._remove_from_volume(rel)
            self._sync()
        state.inflight = None
        state.save()

    def _plain_parent(self, rel: RelPath) -> tuple[int, bool]:
        """(descriptor of the plaintext directory holding `rel`, whether to close it)."""
        frame = self.frames.get(rel[:-1])
        if frame is not None:
            return frame.fd, False
        fd = os.dup(self.tree_fd)
        try:
            for name in rel[:-1]:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd, True

    def _unlink_plain(self, rel: RelPath) -> None:
        try:
            fd, owned = self._plain_parent(rel)
        except FileNotFoundError:
            return
        try:
            self.steps()
            os.unlink(rel[-1], dir_fd=fd)
        except FileNotFoundError:
            pass
        finally:
            if owned:
                os.close(fd)

    def _volume_dir(self, rel: RelPath, create: bool) -> int | None:
        """The volume directory for plaintext directory `rel` (one lookup held), made
        (with its plaintext metadata recorded first) when `create`."""
        assert self.volume is not None and self.state is not None
        frame = self.frames.get(rel)
        if frame is not None:
            self.volume.add_lookup(frame.vino)
            return frame.vino
        vino = ROOT_INODE
        self.volume.add_lookup(vino)
        plain_fd = os.dup(self.tree_fd)
        try:
            for name in rel:
                st = os.lstat(name, dir_fd=plain_fd)
                child = _open_dir(name, plain_fd)
                os.close(plain_fd)
                plain_fd = child
                try:
                    found = self.volume.lookup(vino, os.fsencode(name)).ino
                except FileNotFoundError:
                    if not create:
                        self.volume.forget(vino, 1)
                        return None
                    found = self._mkdir(vino, name, st)
                self.volume.forget(vino, 1)
                vino = found
            return vino
        finally:
            os.close(plain_fd)

    def _mkdir(self, parent_vino: int, name: str, st: os.stat_result) -> int:
        assert self.volume is not None and self.state is not None
        key = str(st.st_ino)
        if key not in self.state.dirs:
            self.state.dirs[key] = _meta(st)
            self.state.dirty = True
        self.steps()
        return self.volume.mkdir(parent_vino, os.fsencode(name), 0o700, st.st_uid, st.st_gid).ino

    def _remove_from_volume(self, rel: RelPath) -> None:
        assert self.volume is not None
        try:
            parent = self._volume_dir(rel[:-1], create=False)
        except FileNotFoundError:
            return
        if parent is None:
            return
        try:
            self.steps()
            self.volume.unlink(parent, os.fsencode(rel[-1]))
        except FileNotFoundError:
            pass
        finally:
            self.volume.forget(parent, 1)

    def _sync(self) -> None:
        assert self.volume is not None
        self.steps()
        self.volume.sync()

    # --- the walk -----------------------------------------------------------------------
    def _walk(self) -> None:
        """Depth first. A directory whose entries are all queued waits in the batch too:
        it is finished (metadata, then its plaintext removed) when the batch commits."""
        assert self.volume is not None and self.state is not None
        self.volume.add_lookup(ROOT_INODE)
        root = _Frame(os.dup(self.tree_fd), (), ROOT_INODE, _listdir(self.tree_fd))
        stack = [root]
        self.frames[()] = root
        try:
            while stack:
                frame = stack[-1]
                if frame.index < len(frame.names):
                    name = frame.names[frame.index]
                    frame.index += 1
                    try:
                        st = os.lstat(name, dir_fd=frame.fd)
                    except FileNotFoundError:
                        continue  # another name of a hard-linked file converted before
                    if stat.S_ISDIR(st.st_mode):
                        child = self._enter(frame, name, st)
                        stack.append(child)
                        self.frames[child.rel] = child
                    elif st.st_ino not in self.batch_inodes:
                        self._queue(frame, name, st)
                    continue
                stack.pop()
                if not stack:
                    self._commit()
                    break
                self.finishing.append((stack[-1], frame))
                if len(self.finishing) >= BATCH_UNITS:
                    self._commit()
        finally:
            for frame in self.frames.values():
                os.close(frame.fd)
            self.frames.clear()
            self.finishing.clear()

    def _enter(self, parent: _Frame, name: str, st: os.stat_result) -> _Frame:
        assert self.volume is not None and self.state is not None
        key = str(st.st_ino)
        if key not in self.state.dirs:  # before anything in it changes
            self.state.dirs[key] = _meta(st)
            self.state.dirty = True
        fd = _open_dir(name, parent.fd)
        try:
            try:
                vino = self.volume.lookup(parent.vino, os.fsencode(name)).ino
            except FileNotFoundError:
                vino = self._mkdir(parent.vino, name, st)
            return _Frame(fd, (*parent.rel, name), vino, _listdir(fd), key)
        except BaseException:
            os.close(fd)
            raise

    def _leave(self, parent: _Frame, frame: _Frame) -> None:
        """A directory whose entries are all converted: its metadata onto the volume's,
        then its (empty) plaintext directory goes."""
        assert self.volume is not None and self.state is not None and frame.key is not None
        name = frame.rel[-1]
        meta = self.state.dirs[frame.key]
        for xname, value in _xattrs(parent.fd, name):
            if _kept(xname):
                self.steps()
                self.volume.setxattr(frame.vino, xname, value)
        self._set_metadata(frame.vino, meta, symlink=False)
        self.steps()
        os.rmdir(name, dir_fd=parent.fd)
        del self.state.dirs[frame.key]
        self.state.dirty = True

    def _set_metadata(self, vino: int, meta: list[int], symlink: bool) -> None:
        assert self.volume is not None
        mode, uid, gid, atime_ns, mtime_ns = meta
        attr = self.volume.getattr(vino)
        if (attr.uid, attr.gid) != (uid, gid):
            self.steps()
            self.volume.setattr(vino, uid=uid, gid=gid)
        if not symlink:  # after chown, which clears setuid/setgid
            self.steps()
            self.volume.setattr(vino, mode=stat.S_IMODE(mode))
        self.steps()
        self.volume.setattr(vino, atime_ns=atime_ns, mtime_ns=mtime_ns)

    def _queue(self, frame: _Frame, name: str, st: os.stat_result) -> None:
        paths = [(*frame.rel, name)]
        if st.st_nlink > 1:
            paths = self.plan.links.get(st.st_ino, paths)
            here = (*frame.rel, name)
            paths = [here] + [p for p in paths if p != here]
        data = min(st.st_size, st.st_blocks * 512) if stat.S_ISREG(st.st_mode) else 0
        unit = _Unit(paths, st, data)
        path_bytes = sum(len(_encode_rel(p)) for p in paths)
        if self.batch and (
            len(self.batch) >= BATCH_UNITS
            or self.batch_bytes + data > BATCH_BYTES
            or self.batch_path_bytes + path_bytes > BATCH_PATH_BYTES
        ):
            self._commit()
        self.batch.append(unit)
        self.batch_inodes.add(st.st_ino)
        self.batch_bytes += data
        self.batch_path_bytes += path_bytes

    # --- one batch: convert, verify, sync, commit, unlink the plaintext --------------------
    def _commit(self) -> None:
        assert self.volume is not None and self.state is not None
        if self.batch:
            self._commit_units()
        self.state.save_if_dirty()  # every directory record durable before one changes
        for parent, frame in self.finishing:
            self._leave(parent, frame)
            del self.frames[frame.rel]
            os.close(frame.fd)
            self.volume.forget(frame.vino, 1)
        self.finishing.clear()
        if self.on_progress is not None:
            self.on_progress(self.progress)

    def _commit_units(self) -> None:
        assert self.volume is not None and self.state is not None
        batch, self.batch = self.batch, []
        self.batch_inodes = set()
        self.batch_bytes = self.batch_path_bytes = 0
        state = self.state
        state.inflight = {
            "units": [[_encode_rel(p) for p in unit.paths] for unit in batch],
            "verified": False,
        }
        state.save()
        done: Counter[str] = Counter()
        try:
            for unit in batch:
                self._convert_unit(unit, done)
            self._sync()  # the encrypted copies are durable before any plaintext goes
        except BaseException as exc:
            if isinstance(exc, Exception):
                self._undo(batch)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NotEnoughSpace(
                    f"{self.real}: the filesystem filled up while converting; what was in "
                    "flight is plaintext again: make room and run convert again"
                ) from None
            raise
        state.inflight["verified"] = True
        state.done.update(done)
        state.save()
        # the most this conversion has taken beyond the plaintext: now, before it goes
        self.peak_extra = max(self.peak_extra, self.free_at_start - self._free_bytes())
        for unit in batch:
            for rel in unit.paths:
                self._unlink_plain(rel)
        self._sync()  # the unlinks are durable before the state forgets the batch
        state.inflight = None
        state.dirty = True
        self.progress.files_done += sum(len(u.paths) for u in batch)
        self.progress.bytes_done += done["bytes"]

    def _undo(self, batch: list[_Unit]) -> None:
        """A batch that failed before it was verified: its encrypted copies go."""
        assert self.state is not None
        try:
            for unit in batch:
                for rel in unit.paths:
                    self._remove_from_volume(rel)
            self.state.inflight = None
            self.state.save()
        except (OSError, EncfsError) as exc:
            log.warning("could not remove the copies of a failed batch (next run will): %s", exc)

    def _convert_unit(self, unit: _Unit, done: Counter[str]) -> None:
        assert self.volume is not None
        volume = self.volume
        first = unit.paths[0]
        plain_fd, owned = self._plain_parent(first)
        parent = self._volume_dir(first[:-1], create=True)
        assert parent is not None
        ino = None
        try:
            st = os.lstat(first[-1], dir_fd=plain_fd)
            if (st.st_ino, st.st_mode) != (unit.st.st_ino, unit.st.st_mode):
                raise VolumeBusy(f"{_show(first)} changed while convert ran: stop the writers")
            name = os.fsencode(first[-1])
            ctime_ns = st.st_ctime_ns
            if stat.S_ISREG(st.st_mode):
                ino = self._convert_file(plain_fd, first, parent, st, done)
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(name, dir_fd=plain_fd)
                # readlink has no O_NOATIME: put the atime back (a retry copies it again)
                os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=plain_fd,
                         follow_symlinks=False)
                ctime_ns = os.lstat(name, dir_fd=plain_fd).st_ctime_ns  # our own change
                self.steps()
                ino = volume.symlink(parent, name, target, st.st_uid, st.st_gid).ino
                if volume.readlink(ino) != target:
                    raise IntegrityError(f"{_show(first)}: the symlink read back differs")
                done["symlinks"] += 1
            else:
                self.steps()
                ino = volume.mknod(parent, name, st.st_mode, st.st_rdev, st.st_uid, st.st_gid).ino
                attr = volume.getattr(ino)
                if stat.S_IFMT(attr.mode) != stat.S_IFMT(st.st_mode) or attr.rdev != st.st_rdev:
                    raise IntegrityError(f"{_show(first)}: the special file read back differs")
                done["specials"] += 1
            inodes = [ino]
            for rel in unit.paths[1:]:
                link_parent = self._volume_dir(rel[:-1], create=True)
                assert link_parent is not None
                try:
                    self.steps()
                    inodes.append(volume.link(ino, link_parent, os.fsencode(rel[-1])).ino)
                finally:
                    volume.forget(link_parent, 1)
                done["links"] += 1
            symlink = stat.S_ISLNK(st.st_mode)
            for linked in dict.fromkeys(inodes):  # a symlink's link is a copy (bound names)
                self._set_metadata(linked, _meta(st), symlink)
            for linked in inodes[1:]:
                volume.forget(linked, 1)
            after = os.lstat(first[-1], dir_fd=plain_fd)
            if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
                st.st_size, st.st_mtime_ns, ctime_ns,
            ):
                raise VolumeBusy(f"{_show(first)} changed while convert ran: stop the writers")
            done["names"] += len(unit.paths)
            done["verified"] += 1
        finally:
            if ino is not None:
                volume.forget(ino, 1)
            volume.forget(parent, 1)
            if owned:
                os.close(plain_fd)

    def _convert_file(
        self, plain_fd: int, rel: RelPath, parent: int, st: os.stat_result, done: Counter[str]
    ) -> int:
        """Copy the data (holes stay holes), then read it back through the engine and
        compare with the digest of the plaintext; then the xattrs."""
        assert self.volume is not None
        volume = self.volume
        name = rel[-1]
        fd = _open_file(name, plain_fd)
        try:
            if os.fstat(fd).st_ino != st.st_ino:
                raise VolumeBusy(f"{_show(rel)} changed while convert ran: stop the writers")
            attributes = [(n, v) for n, v in _xattrs(plain_fd, name) if _kept(n)]
            self.steps()
            fh, attr = volume.create(
                parent, os.fsencode(name), 0o600, os.O_RDWR, st.st_uid, st.st_gid
            )
            ino = attr.ino
            pieces: list[tuple[int, int]] = []
            digest = hashlib.sha256(struct.pack(">Q", st.st_size))
            try:
                for offset, length in data_extents(fd, st.st_size):
                    end = offset + length
                    while offset < end:
                        data = os.pread(fd, min(CHUNK, end - offset), offset)
                        if not data:
                            raise VolumeBusy(f"{_show(rel)} shrank while convert ran")
                        digest.update(struct.pack(">QQ", offset, len(data)))
                        digest.update(data)
                        pieces.append((offset, len(data)))
                        self.steps()
                        self._write_all(fh, offset, data)
                        offset += len(data)
                if volume.getattr(ino).size != st.st_size:
                    self.steps()
                    volume.setattr(ino, size=st.st_size)  # a hole at the end
            finally:
                volume.release(fh)
            self._verify(rel, ino, st.st_size, pieces, digest.digest())
            done["files"] += 1
            done["bytes"] += sum(length for _, length in pieces)
            done["sparse_files"] += sum(length for _, length in pieces) < st.st_size
            for xname, value in attributes:
                self.steps()
                volume.setxattr(ino, xname, value)
                done["xattrs"] += 1
            return ino
        finally:
            os.close(fd)

    def _write_all(self, fh: int, offset: int, data: bytes) -> None:
        assert self.volume is not None
        view = memoryview(data)
        while view:
            written = self.volume.write(fh, offset, view)
            if written <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[written:]
            offset += written

    def _verify(
        self, rel: RelPath, ino: int, size: int, pieces: list[tuple[int, int]], expected: bytes
    ) -> None:
        """Read the file back through the engine (a new handle: the header and its name
        binding are checked again) and compare with the plaintext's digest."""
        assert self.volume is not None
        volume = self.volume
        digest = hashlib.sha256(struct.pack(">Q", size))
        fh = volume.open(ino, os.O_RDONLY)
        try:
            for offset, length in pieces:
                data = volume.read(fh, offset, length)
                digest.update(struct.pack(">QQ", offset, len(data)))
                digest.update(data)
        finally:
            volume.release(fh)
        if volume.getattr(ino).size != size or digest.digest() != expected:
            raise IntegrityError(
                f"{_show(rel)}: the encrypted copy read back differs from the plaintext; "
                "the plaintext is kept"
            )

    # --- the end ------------------------------------------------------------------------
    def _remove_staging(self) -> None:
        """The tree is empty: the staging directory goes (state last)."""
        assert self.state is not None or self.conv_fd >= 0
        if self.state is not None:
            self.done = Counter(self.state.done)
        if self.tree_fd >= 0:
            os.close(self.tree_fd)
            self.tree_fd = -1
            self.steps()
            os.rmdir(TREE, dir_fd=self.conv_fd)  # fails if anything is left in it
        for name in os.listdir(self.conv_fd):
            self.steps()
            os.unlink(name, dir_fd=self.conv_fd)
        os.close(self.conv_fd)
        self.conv_fd = -1
        self.steps()
        os.rmdir(fnames.CONVERT_DIR, dir_fd=self.dir_fd)
        os.fsync(self.dir_fd)

    def _finish_top(self, top: list[int]) -> None:
        """DIR's own xattrs (plaintext on the backing directory) go into the volume's
        root, each set there before it is removed here; then DIR's times; the marker
        last."""
        assert self.volume is not None
        path = f"/proc/self/fd/{self.dir_fd}"
        for xname, value in _xattrs(self.dir_fd, "."):
            if _kept(xname) and not xname.startswith(fnames.XATTR_PREFIX.encode()):
                self.steps()
                self.volume.setxattr(ROOT_INODE, xname, value)
                self.steps()
                os.removexattr(path, os.fsdecode(xname))
        atime_ns, mtime_ns = top[3], top[4]
        self._sync()
        if self.volume.config.conversion is not None:
            # From here the volume opens for everyone (the marker is a formality left).
            self.steps()
            with config_store.editing(self.real, self.volume.keyring, self.operator) as config:
                config.conversion = None
            self.volume.config = config
        self.steps()
        self.volume.setattr(ROOT_INODE, atime_ns=atime_ns, mtime_ns=mtime_ns)
        self.steps()
        os.unlink(fnames.CONVERT_MARKER, dir_fd=self.dir_fd)
        # Removing the marker changed DIR's mtime: set the times once more (a crash just
        # here leaves DIR's mtime at this instant: the one thing a crash can cost).
        self.volume.setattr(ROOT_INODE, atime_ns=atime_ns, mtime_ns=mtime_ns)
        os.fsync(self.dir_fd)
        self.volume.sync()
        if stat.S_IMODE(top[0]) != 0o700:
            self.notes.append(
                f"the volume's root has mode 0700 (its backing directory's; {self.real} had "
                f"{stat.S_IMODE(top[0]):04o}): chmod it through the mount if others need it"
            )

    def _summary(self) -> dict:
        assert self.volume is not None
        census = _census(self.dir_fd, self.volume.layout)
        done = self.done
        return {
            "directory": self.real,
            "volume_id": self.volume.config.volume_id.hex(),
            "block_size": self.volume.config.block_size,
            "volume": census,
            # every one read back through the engine and compared before its plaintext
            # went (a mismatch stops the conversion, so there are none here)
            "verified": {
                "files": done.get("files", 0),
                "bytes": done.get("bytes", 0),
                "sparse_files": done.get("sparse_files", 0),
                "symlinks": done.get("symlinks", 0),
                "specials": done.get("specials", 0),
                "links": done.get("links", 0),
                "xattrs": done.get("xattrs", 0),
            },
            "key_provider": self.created_with,
            "this_run": {
                "files": self.progress.files_done,
                "bytes": self.progress.bytes_done,
                "elapsed": round(time.monotonic() - self.progress.started, 3),
                "peak_extra_bytes": self.peak_extra,
                "changes": self.steps.count,  # to the directory and the volume
            },
            "notes": self.notes,
        }


def _census(root_fd: int, layout: Layout) -> dict:
    """What the volume holds, counted in the backing tree (no name decrypted, no data
    read; directories opened with O_NOATIME, so the times just set stay)."""
    counts: Counter[str] = Counter()
    seen: set[int] = set()
    pending = [_open_dir(".", root_fd)]
    try:
        while pending:
            fd = pending.pop()
            try:
                for name in os.listdir(fd):
                    if fnames.classify(name) == "reserved":
                        continue
                    st = os.lstat(name, dir_fd=fd)
                    if stat.S_ISDIR(st.st_mode):
                        counts["directories"] += 1
                        pending.append(_open_dir(name, fd))
                    elif st.st_ino in seen:
                        counts["extra_links"] += 1
                    else:
                        seen.add(st.st_ino)
                        if stat.S_ISREG(st.st_mode):
                            counts["files"] += 1
                            counts["bytes"] += layout.plain_size(st.st_size)
                        elif stat.S_ISLNK(st.st_mode):
                            counts["symlinks"] += 1
                        else:
                            counts["specials"] += 1
            finally:
                os.close(fd)
    finally:
        for fd in pending:
            os.close(fd)
    return {
        key: counts[key]
        for key in ("files", "bytes", "directories", "symlinks", "specials", "extra_links")
    }


def describe_plan(stats: dict[str, Any]) -> str:
    return (
        f"{stats['files']} files and {stats['directories']} directories, "
        f"{stats['bytes'] / 1048576:.1f} MiB; extra space needed "
        f"{stats['space_needed'] / 1048576:.1f} MiB of {stats['free'] / 1048576:.1f} MiB free"
    )
