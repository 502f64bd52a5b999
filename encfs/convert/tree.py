"""Reading the plaintext tree: relative paths and how they are shown and recorded,
opening without touching atimes (O_NOATIME), sorted listings, extended attributes, the
data extents of a sparse file, and the metadata a directory's record keeps."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from encfs import backing

KEPT_XATTRS = (b"user.", b"trusted.")
ACL_XATTRS = b"system.posix_acl_"

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

RelPath = tuple[str, ...]  # names below the tree's root (os-level str, surrogate-escaped)


def printable(path: str) -> str:
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def show(rel: RelPath) -> str:
    return printable("/".join(rel)) or "."


def encode_rel(rel: RelPath) -> str:
    return b"/".join(os.fsencode(name) for name in rel).hex()


def decode_rel(text: str) -> RelPath:
    return tuple(os.fsdecode(part) for part in bytes.fromhex(text).split(b"/"))


def metadata_record(st: os.stat_result) -> list[int]:
    return [st.st_mode, st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns]


def open_dir(name: str, dir_fd: int | None) -> int:
    """A directory for listing without touching its atime (O_NOATIME: owner or root)."""
    return backing.open_quietly(name, DIR_FLAGS | os.O_NOATIME, dir_fd=dir_fd)


def open_file(name: str, dir_fd: int) -> int:
    return backing.open_quietly(name, _FILE_FLAGS | os.O_NOATIME, dir_fd=dir_fd)


def listdir(fd: int) -> list[str]:
    return sorted(os.listdir(fd), key=os.fsencode)


def read_xattrs(dir_fd: int, name: str) -> list[tuple[bytes, bytes]]:
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


def is_kept_xattr(xname: bytes) -> bool:
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


def exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
