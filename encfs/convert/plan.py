"""The scan and the space estimate: one walk over the plaintext still to convert counts
it, bounds the backing bytes and inodes the volume will take beyond the plaintext's, finds
the hard-link groups, and lists what a volume cannot keep; `checked_plan` refuses a tree
that cannot be converted or does not fit."""

from __future__ import annotations

import os
import resource
import stat
from collections import Counter
from dataclasses import dataclass, field

from encfs.convert.tree import (
    ACL_XATTRS,
    RelPath,
    data_extents,
    is_kept_xattr,
    listdir,
    open_dir,
    open_file,
    read_xattrs,
    show,
)
from encfs.errors import CannotConvert, NotEnoughSpace
from encfs.format import FEATURE_BOUND_NAMES, FEATURE_XATTR_SETS, places
from encfs.format import names as fnames
from encfs.format import xattrs as xformat
from encfs.format.blocks import BLOCKS_PER_GROUP, HEADER_SIZE, KEY_RECORD_SIZE, Layout

BATCH_BYTES = 8 << 20  # files under this share a batch (one state write and sync pair)
BATCH_UNITS = 256
BATCH_PATH_BYTES = 64 << 10  # the batch's names in the state file
SPACE_MARGIN = 16 << 20
INODE_MARGIN = 64
MAX_DEPTH = 1000
# The walk holds two descriptors per level (the plaintext directory and the engine's);
# what else is open (the engine, a batch, Python) stays under this.
RESERVED_DESCRIPTORS = 128


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


@dataclass(frozen=True)
class Keeps:
    """What the volume's format keeps of extended attributes (its features)."""

    sets: bool  # xattr-sets: on every kind of object, names up to 255 bytes
    bound: bool  # bound-names: a symlink has an id, so a large set can be stored apart

    @classmethod
    def of(cls, features: tuple[str, ...] | frozenset[str]) -> Keeps:
        return cls(FEATURE_XATTR_SETS in features, FEATURE_BOUND_NAMES in features)


def scan(root_fd: int, layout: Layout, fs_block: int, drop_acls: bool, keeps: Keeps) -> Plan:
    plan = Plan()
    max_depth = depth_limit()
    euid = os.geteuid()
    link_names: dict[int, int] = {}
    stack: list[tuple[int, RelPath, list[str], int]] = [(os.dup(root_fd), (), [], 0)]
    stack[0] = (stack[0][0], (), listdir(stack[0][0]), 0)
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
            scan_entry(plan, layout, fs_block, fd, name, path, st, euid, drop_acls, keeps)
            if _encoded_name_length(name) > fnames.NAME_MAX:
                plan.overhead += fs_block
                plan.inodes += 1
            if stat.S_ISDIR(st.st_mode):
                plan.directories += 1
                plan.overhead += 2 * fs_block + st.st_size
                plan.inodes += 1
                if len(stack) >= max_depth:
                    plan.problems.append(
                        f"{show(path)}: nested deeper than {max_depth} levels (at most "
                        f"{MAX_DEPTH}, and two open files per level within the limit of "
                        "open files, RLIMIT_NOFILE)"
                    )
                    continue
                try:
                    child = open_dir(name, fd)
                    stack.append((child, path, listdir(child), 0))
                except OSError as exc:
                    plan.problems.append(f"{show(path)}: cannot list it ({exc.strerror})")
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


def scan_entry(
    plan: Plan, layout: Layout, fs_block: int, fd: int, name: str, path: RelPath,
    st: os.stat_result, euid: int, drop_acls: bool, keeps: Keeps,
) -> None:
    """Ownership and extended attributes: can the volume keep them?"""
    if euid != 0 and st.st_uid != euid:
        plan.problems.append(f"{show(path)}: owned by uid {st.st_uid}; only root can keep that")
    try:
        attributes = read_xattrs(fd, name)
    except OSError as exc:
        plan.problems.append(f"{show(path)}: cannot read its xattrs ({exc.strerror})")
        return
    kept: dict[bytes, bytes] = {}
    for xname, value in attributes:
        text = xname.decode("utf-8", "backslashreplace")
        if xname.startswith(ACL_XATTRS):
            plan.acls += 1
            if not drop_acls:
                plan.problems.append(
                    f"{show(path)}: has a POSIX ACL ({text}), which the volume does not keep "
                    "(its mode bits would widen the group's access): --drop-acls to go on"
                )
            plan.dropped[text] += 1
        elif not is_kept_xattr(xname):
            plan.dropped[text] += 1  # security.*, system.*: the mount keeps none either
        else:
            kept[xname] = value
    if kept:
        problem = _unkept_xattrs(kept, st.st_mode, euid, keeps)
        if problem:
            plan.problems.append(f"{show(path)}: {problem}")
            return
        plan.xattrs += len(kept)
        plan.overhead += fs_block


def _unkept_xattrs(kept: dict[bytes, bytes], mode: int, euid: int, keeps: Keeps) -> str:
    """Why the volume cannot keep an object's user.* and trusted.* xattrs, or ''."""
    file_or_dir = stat.S_ISREG(mode) or stat.S_ISDIR(mode)
    if not keeps.sets:  # one backing xattr per attribute (docs/FORMAT.md 5.4.1)
        if not file_or_dir:
            return (f"xattrs on a {_kind(mode)} (this volume, without feature xattr-sets, "
                    "keeps xattrs on files and directories only)")
        for xname in kept:
            if len(xname) > fnames.XATTR_NAME_MAX:
                text = xname.decode("utf-8", "backslashreplace")
                return (f"xattr name {text[:40]}... is {len(xname)} bytes (this volume, "
                        f"without feature xattr-sets, keeps names up to "
                        f"{fnames.XATTR_NAME_MAX})")
        return ""
    # One sealed set per object (5.4.2). The kernel's own limits (names of 255 bytes, a
    # listing of 64 KiB) are the set's; what remains is where the set can live.
    body = xformat.body_size(kept)
    if body > xformat.BODY_MAX:
        return f"its xattrs take {body} bytes as a set (the volume keeps up to {xformat.BODY_MAX})"
    if not file_or_dir and euid != 0:
        return (f"xattrs on a {_kind(mode)}: the volume keeps them in a trusted.* backing "
                "xattr, which only root can write")
    can_store = file_or_dir or (stat.S_ISLNK(mode) and keeps.bound)
    record = 1 + xformat.SEAL_OVERHEAD + body
    if not can_store and record > xformat.INLINE_MAX:
        return (f"its xattrs take {record} bytes as a sealed set; a {_kind(mode)} keeps its "
                f"set in its own backing xattr, up to {xformat.INLINE_MAX} bytes")
    return ""


def _scan_file(
    plan: Plan, layout: Layout, fs_block: int, fd: int, name: str, path: RelPath,
    st: os.stat_result,
) -> None:
    extents: list[tuple[int, int]] = [(0, st.st_size)] if st.st_size else []
    sparse = st.st_blocks * 512 < st.st_size
    if sparse or os.geteuid() != 0:
        try:
            file_fd = open_file(name, fd)
        except OSError as exc:
            plan.problems.append(f"{show(path)}: cannot read it ({exc.strerror})")
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


def checked_plan(
    real: str, dir_fd: int, root_fd: int, layout: Layout, drop_acls: bool, keeps: Keeps
) -> Plan:
    """The plan of the tree under `root_fd` (with DIR's own xattrs), refused with one
    clear error when the volume cannot keep something or the filesystem lacks room.
    `keeps`: the features of the volume made (or being made) in DIR."""
    fs = os.fstatvfs(dir_fd)
    plan = scan(root_fd, layout, fs.f_bsize, drop_acls, keeps)
    # DIR's own xattrs go to the volume's root at the end
    scan_entry(
        plan, layout, fs.f_bsize, dir_fd, ".", (), os.fstat(dir_fd), os.geteuid(), drop_acls,
        keeps,
    )
    if plan.problems:
        more = f" (and {len(plan.problems) - 1} more)" if len(plan.problems) > 1 else ""
        raise CannotConvert(f"{real} holds what a volume cannot keep: {plan.problems[0]}{more}")
    free = fs.f_bavail * fs.f_frsize
    if free < plan.space_needed():
        raise NotEnoughSpace(
            f"{real}: {free / 1048576:.1f} MiB free, convert needs "
            f"{plan.space_needed() / 1048576:.1f} MiB (the format's overhead for this tree "
            f"{plan.overhead / 1048576:.1f} MiB, the largest file in flight "
            f"{max(plan.largest, 2 * BATCH_BYTES) / 1048576:.1f} MiB, a margin of "
            f"{SPACE_MARGIN // 1048576} MiB)"
        )
    if fs.f_files and fs.f_favail < plan.inodes_needed():
        raise NotEnoughSpace(
            f"{real}: {fs.f_favail} inodes free, convert needs {plan.inodes_needed()}"
        )
    if plan.xattrs:
        _probe_user_xattrs(real, dir_fd)
    return plan


def _probe_user_xattrs(real: str, dir_fd: int) -> None:
    path = f"/proc/self/fd/{dir_fd}"
    probe = fnames.XATTR_PREFIX + "convert-probe"
    try:
        os.setxattr(path, probe, b"")
        os.removexattr(path, probe)
    except OSError as exc:
        raise CannotConvert(
            f"{real}: its filesystem does not store user.* extended attributes "
            f"({exc.strerror}), which the volume needs to keep the tree's xattrs"
        ) from None
