"""A real plaintext tree for `encfs-gw convert`, and a manifest of everything it holds.

`build_tree` copies the Python standard library (all of it with Debian's
/usr/lib/python3/dist-packages, or some packages) and adds
what the stdlib lacks: hard links across directories, symlinks (relative, absolute,
dangling, 4,000-byte targets), sparse files, user.* and trusted.* xattrs (also on the top
directory, on a symlink and special files, and under 200-byte names), a FIFO, a socket,
device nodes, names that are not UTF-8 or hold a newline,
255-byte names, names convert itself uses (`encfs-gw.lock`, `.egw-dirid` at the top),
empty files and directories, odd modes (setuid, 0000, 0555 directories) and owners, and
explicit times with nanoseconds on every entry (atime newer than mtime and less than a
day old, so reads under relatime leave it alone). Every added file holds CANARY.

`manifest` describes a tree (through a mount, or the plaintext) for byte-for-byte and
metadata comparison: type, mode, owner, times (ns), size, SHA-256, data extents, xattrs,
symlink target, device number, and the hard-link groups.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import stat
import sysconfig
import time
from pathlib import Path

CANARY = b"ENCFS-CONVERT-CANARY"
MIB = 1 << 20
# Debian's python3.11 standard library (54 MB, ~1,500 entries), else this interpreter's
STDLIB = next(
    path for path in (Path("/usr/lib/python3.11"), Path(sysconfig.get_paths()["stdlib"]))
    if path.is_dir()
)
SITE_PACKAGES = Path("/usr/lib/python3/dist-packages")
SMALL_STDLIB = ["json", "collections", "email/mime", "importlib/metadata", "abc.py",
                "bisect.py", "LICENSE.txt", "config-3.11-x86_64-linux-gnu"]
LONG_NAME = "L" * 250 + ".long"  # 255 bytes: a sidecar name in the volume
LONG_XATTR = "user." + "x" * 195  # 200 bytes: over the 160 of volumes without xattr-sets
SPARSE = "extras/sparse/big-sparse.img"
ALL_HOLE = "extras/sparse/all-hole.img"
TRAILING_HOLE = "extras/sparse/trailing-hole.bin"


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)


def build_tree(root: Path, stdlib: list[str] | None = None, big: bool = True) -> None:
    """`stdlib`: the packages and modules to copy (None: the whole standard library and
    the system's Python packages)."""
    root.mkdir()
    if stdlib is None:
        shutil.copytree(STDLIB, root, symlinks=True, dirs_exist_ok=True)
        if SITE_PACKAGES.is_dir():  # Debian's Python packages: a few thousand files more
            shutil.copytree(SITE_PACKAGES, root / "site", symlinks=True)
    else:
        for name in stdlib:
            source, target = STDLIB / name, root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, symlinks=True,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(source, target, follow_symlinks=False)
    extras = root / "extras"
    (extras / "links" / "deeper" / "deepest").mkdir(parents=True)
    (extras / "sparse").mkdir()
    (extras / "specials").mkdir()
    (extras / "names").mkdir()
    (extras / "empty-dir" / "empty-inside").mkdir(parents=True)
    (extras / "modes").mkdir()

    # hard links: one inode, names in three directories (and the top)
    _write(extras / "links" / "shared.txt", CANARY + b" shared by four names\n" * 100)
    os.link(extras / "links" / "shared.txt", extras / "links" / "deeper" / "second-name")
    os.link(extras / "links" / "shared.txt", extras / "links" / "deeper" / "deepest" / "third")
    os.link(extras / "links" / "shared.txt", root / "top-link-to-shared")
    _write(extras / "links" / "empty-linked", b"")
    os.link(extras / "links" / "empty-linked", extras / "links" / "empty-linked-2")

    # symlinks
    os.symlink("../links/shared.txt", extras / "names" / "relative-link")
    os.symlink(str(STDLIB / "abc.py"), extras / "names" / "absolute-link")
    os.symlink("nowhere/at/all", extras / "names" / "dangling-link")
    long_target = "/".join(["d" * 200] * 19) + "/" + "t" * 150  # 3,969 bytes: stored apart
    os.symlink(long_target, extras / "names" / "long-target-link")
    os.symlink("x" * 3000, extras / "names" / "inline-long-link")

    # sparse files: holes stay holes
    with open(root / SPARSE, "wb") as f:
        f.write(CANARY + b" at the start\n")
        f.seek(20 * MIB)
        f.write(os.urandom(64 * 1024))
        f.truncate(64 * MIB if big else 24 * MIB)
    with open(root / ALL_HOLE, "wb") as f:
        f.truncate(8 * MIB)
    with open(root / TRAILING_HOLE, "wb") as f:
        f.write(CANARY + b" then a hole to the end\n" * 10)
        f.truncate(3 * MIB)
    if big:
        _write(extras / "dense-3mib.bin", os.urandom(3 * MIB) + CANARY)  # several chunks

    # special files
    os.mkfifo(extras / "specials" / "fifo", 0o640)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(extras / "specials" / "socket"))
    os.mknod(extras / "specials" / "char-null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(extras / "specials" / "block-loop9", stat.S_IFBLK | 0o660, os.makedev(7, 9))

    # names
    names = extras / "names"
    _write(Path(os.fsdecode(bytes(names) + b"/caf\xe9-latin1-\xff")), CANARY + b" not utf-8\n")
    _write(names / "line\nbreak", CANARY + b" a newline in the name\n")
    _write(names / LONG_NAME, CANARY + b" a 255-byte name\n")
    _write(names / (CANARY.decode() + "-as-a-name"), CANARY)
    _write(names / "encfs-gw.conf", b"not a volume config, just a name\n")
    _write(root / "encfs-gw.lock", CANARY + b" a user file named like the volume lock\n")
    _write(root / ".egw-dirid", CANARY + b" a user file named like a directory id\n")
    _write(extras / "empty-file", b"")

    # modes and owners
    modes = extras / "modes"
    _write(modes / "setuid-tool", b"#!/bin/sh\n" + CANARY, 0o4755)
    _write(modes / "no-access", CANARY, 0o000)
    _write(modes / "owned-by-1234", CANARY, 0o640)
    os.chown(modes / "owned-by-1234", 1234, 5678)
    os.symlink("setuid-tool", modes / "symlink-owned-by-42")
    os.chown(modes / "symlink-owned-by-42", 42, 43, follow_symlinks=False)
    (modes / "read-only-dir").mkdir()
    _write(modes / "read-only-dir" / "inside", CANARY)
    os.chmod(modes / "read-only-dir", 0o555)
    (modes / "setgid-dir").mkdir()
    os.chown(modes / "setgid-dir", 0, 5678)
    os.chmod(modes / "setgid-dir", 0o2775)
    _write(modes / "setgid-dir" / "file-of-group-0", CANARY)
    os.chown(modes / "setgid-dir" / "file-of-group-0", 0, 0)  # not the setgid dir's group

    # xattrs (user.* and trusted.*, on files, directories and the top)
    xfile = extras / "with-xattrs.txt"
    _write(xfile, CANARY + b" has xattrs\n")
    os.setxattr(xfile, "user.comment", CANARY + b" xattr value")
    os.setxattr(xfile, "user.empty", b"")
    os.setxattr(xfile, "user.binary", bytes(range(256)))
    os.setxattr(xfile, "trusted.origin", b"trusted value " + CANARY)
    os.setxattr(extras, "user.dir-note", b"on a directory " + CANARY)
    os.setxattr(root, "user.top-note", b"on the top directory " + CANARY)
    os.setxattr(root, "trusted.top", b"trusted on the top")
    # names over 160 bytes, and xattrs on a symlink and on special files (the kernel keeps
    # user.* to files and directories: theirs are trusted.*); volumes with xattr-sets keep them
    os.setxattr(xfile, LONG_XATTR, CANARY + b" under a 200-byte name")
    os.setxattr(extras, LONG_XATTR, b"a directory's")
    link = extras / "names" / "relative-link"
    os.setxattr(link, "trusted.on-a-symlink", CANARY + b" on a symlink", follow_symlinks=False)
    os.setxattr(link, "trusted." + "s" * 190, b"long name on a symlink", follow_symlinks=False)
    fifo = extras / "specials" / "fifo"
    os.setxattr(fifo, "trusted.on-a-fifo", CANARY + b" on a FIFO", follow_symlinks=False)
    os.setxattr(fifo, "trusted.empty", b"", follow_symlinks=False)
    os.setxattr(extras / "specials" / "char-null", "trusted.on-a-device", b"device",
                follow_symlinks=False)

    set_times(root)


def set_times(root: Path) -> None:
    """Explicit times with nanoseconds on every entry, children before parents."""
    now = time.time_ns()
    entries = []
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root), topdown=False):
        entries += [os.path.join(dirpath, n) for n in filenames + dirnames]
    entries.append(os.fsencode(root))
    for index, path in enumerate(entries):
        mtime = 1_600_000_000_000_000_000 + index * 1_000_003_001 + 123_456_789
        atime = now - 3_600_000_000_000 + index * 997  # newer than mtime, under a day old
        os.utime(path, ns=(atime, mtime), follow_symlinks=False)


def data_extents(path: bytes, size: int) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME)
    try:
        extents, offset = [], 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            extents.append((start, end - start))
            offset = end
        return extents
    finally:
        os.close(fd)


def _digest(path: bytes) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME)
    digest = hashlib.sha256()
    try:
        while chunk := os.read(fd, MIB):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def manifest(
    root: Path, skip_top: frozenset[bytes] = frozenset(), plaintext: bool = True
) -> tuple[dict, set]:
    """({relative path: description}, hard-link groups). Every entry is stat'ed before
    anything is read (a read through a mount touches the backing atime, also of the
    other names of a hard-linked file), directories are listed and files read with
    O_NOATIME; readlink has no such flag, so on a plaintext tree each symlink's times are
    put back after it is read (not through a mount: `plaintext=False`)."""
    base = os.fsencode(root)
    stats: list[tuple[bytes, bytes, os.stat_result]] = []
    pending = [b"."]
    while pending:
        rel = pending.pop()
        path = base if rel == b"." else os.path.join(base, rel)
        st = os.lstat(path)
        stats.append((rel, path, st))
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
            try:
                names = sorted(os.fsencode(n) for n in os.listdir(fd))
            finally:
                os.close(fd)
            if rel == b".":
                names = [n for n in names if n not in skip_top]
            pending += [n if rel == b"." else os.path.join(rel, n) for n in names]
    entries: dict[bytes, dict] = {}
    by_inode: dict[int, list[bytes]] = {}
    for rel, _path, st in stats:
        kind = stat.S_IFMT(st.st_mode)
        entry = {
            "type": kind, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
            "mtime_ns": st.st_mtime_ns, "atime_ns": st.st_atime_ns, "nlink": st.st_nlink,
        }
        if kind != stat.S_IFDIR:
            entry["size"] = st.st_size
            by_inode.setdefault(st.st_ino, []).append(rel)
        entries[rel] = entry
    for rel, path, st in stats:  # now the reads
        entry, kind = entries[rel], stat.S_IFMT(st.st_mode)
        entry["xattrs"] = {
            name: os.getxattr(path, name, follow_symlinks=False)
            for name in os.listxattr(path, follow_symlinks=False)
            if name.startswith(("user.", "trusted."))
        }
        if kind == stat.S_IFREG:
            entry["sha256"] = _digest(path)
        elif kind == stat.S_IFLNK:
            entry["target"] = os.readlink(path)
            if plaintext:
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            entry["rdev"] = st.st_rdev
    groups = {frozenset(paths) for paths in by_inode.values() if len(paths) > 1}
    return entries, groups


def backing_times(backing: Path) -> dict[bytes, tuple[int, int]]:
    """(atime, mtime) of every backing entry, listed with O_NOATIME."""
    times, pending = {}, [os.fsencode(backing)]
    while pending:
        path = pending.pop()
        st = os.lstat(path)
        times[path] = (st.st_atime_ns, st.st_mtime_ns)
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
            try:
                pending += [os.path.join(path, os.fsencode(n)) for n in os.listdir(fd)]
            finally:
                os.close(fd)
    return times


def restore_times(times: dict[bytes, tuple[int, int]]) -> None:
    for path, ns in times.items():
        with contextlib.suppress(FileNotFoundError):
            os.utime(path, ns=ns, follow_symlinks=False)


def allocated(path: Path) -> int:
    return os.lstat(path).st_blocks * 512


def tree_bytes(root: Path, needle: bytes) -> list[str]:
    """Every place under `root` (names, symlink targets, file contents, xattr names and
    values) that holds `needle`."""
    found = []
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if needle.lower() in name.lower():
                found.append(f"name {path!r}")
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode) and needle in os.readlink(path):
                found.append(f"target {path!r}")
            for xname in os.listxattr(path, follow_symlinks=False):
                value = os.getxattr(path, xname, follow_symlinks=False)
                if needle in os.fsencode(xname) or needle in value:
                    found.append(f"xattr {xname} of {path!r}")
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    if needle in f.read():
                        found.append(f"contents of {path!r}")
    return found
