"""The inode table of an open volume (layer L4): backing objects the kernel knows or that
are open, by inode number; their lookup and open counts; the open handles.

Lookup counts follow pyfuse3: lookup/create/mkdir/symlink/mknod/link and every accepted
readdirplus entry add one, forget subtracts, and an inode's backing handle is released
only when its lookup count and open count both reach zero. Inode numbers are the backing
ones, but for the root (ROOT_INODE), whose number is swapped with the backing root's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from encfs import backing

if TYPE_CHECKING:
    from encfs.engine.contents import FileContents

ROOT_INODE = 1
STAT_BLKSIZE = 131072  # big st_blksize: cp/stdio then write in 128 KiB chunks


@dataclass(slots=True)
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    blksize: int = STAT_BLKSIZE


def oserror(code: int, what: str = "") -> OSError:
    return OSError(code, os.strerror(code) + (f": {what}" if what else ""))


class Inode:
    """A backing object known to the kernel (lookups > 0) or open (opens > 0)."""

    __slots__ = (
        "bad_place",
        "contents",
        "data_fd",
        "dir_id",
        "fd",
        "file_id",
        "ino",
        "location",
        "lookups",
        "mode",
        "on_drop",
        "opens",
        "pinned",
        "xattrs_stored",
    )

    def __init__(self, ino: int, fd: int, mode: int) -> None:
        self.ino = ino
        self.fd = fd  # O_PATH handle (directories: an O_RDONLY directory fd)
        self.mode = stat.S_IFMT(mode)
        self.lookups = 0
        self.opens = 0
        self.dir_id: bytes | None = None
        self.file_id: bytes | None = None  # a regular file's, once read (xattr sets)
        self.data_fd: int | None = None  # shared by all open handles of a regular file
        self.contents: FileContents | None = None
        # (parent dir id, plain name) it was last reached by: checked against the file
        # header's name binding, so a file's ciphertext copied over another is refused.
        self.location: tuple[bytes, bytes] | None = None
        # Whether the backing object holds any of our xattrs (None: not known yet). All
        # xattr changes pass through us, so `ls -l`'s getxattr per entry costs no syscall.
        self.xattrs_stored: bool | None = None
        # Why this directory's id record does not verify for its place (one warning, then
        # the same error on every use until it is reached by another name).
        self.bad_place: str | None = None
        # Handles on backing objects this inode stood for before (a renamed symlink of a
        # bound volume is a new backing symlink): they keep the backing inode numbers the
        # kernel may still use from being reused by another object.
        self.pinned: list[int] | None = None
        # What to do when this inode is dropped: an unlinked file that was still open
        # takes its xattr store file with it then (engine/xattrs.py).
        self.on_drop: Callable[[], None] | None = None

    @property
    def is_dir(self) -> bool:
        return self.mode == stat.S_IFDIR


class DirHandle:
    __slots__ = ("entries", "inode")

    def __init__(self, inode: Inode) -> None:
        self.inode = inode
        self.entries: list[tuple[bytes, str | None]] | None = None  # (plain, backing name)


class InodeTable:
    """Known inodes and open handles of one volume, and how their descriptors close.

    `files` and `dirs` map handles to what they are open on; files.py reads `files`
    directly on the data path (one dict lookup per read or write).
    """

    def __init__(self, root_fd: int) -> None:
        st = os.fstat(root_fd)
        self.root_dev = st.st_dev
        self._root_backing_ino = st.st_ino
        root = Inode(ROOT_INODE, os.dup(root_fd), st.st_mode)
        root.lookups = 1  # the kernel's reference to the root is never forgotten
        self.inodes: dict[int, Inode] = {ROOT_INODE: root}
        self.files: dict[int, Inode] = {}  # file handle -> its inode
        self.dirs: dict[int, DirHandle] = {}  # directory handle -> its listing
        self._next_fh = 1
        self._closer: backing.DeferredCloser | None = None
        self.close_fd: Callable[[int], None] = os.close

    # --- inodes -------------------------------------------------------------------------
    def fuse_ino(self, backing_ino: int) -> int:
        # Swap the backing root's number with 1 so the root is ROOT_INODE and no other
        # object can collide with it; every other number is the backing one (stable).
        if backing_ino == self._root_backing_ino:
            return ROOT_INODE
        if backing_ino == ROOT_INODE:
            return self._root_backing_ino
        return backing_ino

    def get(self, ino: int) -> Inode:
        try:
            return self.inodes[ino]
        except KeyError:
            raise oserror(errno.ESTALE, f"inode {ino}") from None

    def directory(self, ino: int) -> Inode:
        inode = self.get(ino)
        if not inode.is_dir:
            raise oserror(errno.ENOTDIR)
        return inode

    def register(self, fd: int) -> tuple[Inode, os.stat_result]:
        """Adopt an O_PATH handle: reuse the known inode (closing fd) or make a new one."""
        st = os.fstat(fd)
        if st.st_dev != self.root_dev:
            os.close(fd)
            raise oserror(errno.EXDEV, "backing entry on another filesystem")
        ino = self.fuse_ino(st.st_ino)
        known = self.inodes.get(ino)
        if known is not None:
            os.close(fd)
            return known, st
        if stat.S_ISDIR(st.st_mode):
            try:  # a real directory fd: usable as dir_fd, for fsync and for listing
                dir_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = dir_fd
            except PermissionError:
                pass
        inode = Inode(ino, fd, st.st_mode)
        self.inodes[ino] = inode
        return inode, st

    def drop(self, inode: Inode, force: bool = False) -> None:
        """Release an inode nobody holds any more (or every inode, with `force`)."""
        if not force and (inode.lookups > 0 or inode.opens > 0 or inode.ino == ROOT_INODE):
            return
        if inode.data_fd is not None:
            self.close_fd(inode.data_fd)
            inode.data_fd = None
            inode.contents = None
        if inode.on_drop is not None:
            on_drop, inode.on_drop = inode.on_drop, None
            on_drop()
        self.close_fd(inode.fd)
        for fd in inode.pinned or ():
            self.close_fd(fd)
        inode.pinned = None
        self.inodes.pop(inode.ino, None)

    def forget(self, ino: int, count: int) -> None:
        inode = self.inodes.get(ino)
        if inode is None:
            return
        inode.lookups -= count
        if inode.lookups <= 0:
            inode.lookups = 0
            self.drop(inode)

    # --- handles ------------------------------------------------------------------------
    def new_handle(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def dir_handle(self, fh: int) -> DirHandle:
        handle = self.dirs.get(fh)
        if handle is None:
            raise oserror(errno.EBADF)
        return handle

    # --- closing descriptors --------------------------------------------------------------
    def defer_closes(self, closer: backing.DeferredCloser | None = None) -> None:
        """Close the descriptors of forgotten inodes on a worker thread (the daemon: the
        last close of an unlinked file is where the backing filesystem deletes it).
        `closer`: one that closes at a test's pace instead of the default one."""
        if self._closer is not None:
            if closer is None:
                return
            self._closer.stop()
        self._closer = closer or backing.DeferredCloser()
        self.close_fd = self._closer.close

    def settle_closes(self) -> bool:
        """Finish the deferred closes (their files' space comes back); False if there
        were none, so an operation that ran out of space has no reason to retry."""
        return self._closer is not None and self._closer.settle()

    @contextlib.contextmanager
    def replaced(self, parent: Inode, backing_name: str) -> Iterator[None]:
        """Around a rename over `backing_name`: the replaced object is freed by the last
        close of a handle held meanwhile, on the deferred closer (freeing an inode with
        data blocks takes milliseconds on ext4, which the rename would otherwise spend)."""
        try:
            fd = backing.open_path(backing_name, parent.fd)
        except FileNotFoundError:
            fd = None
        try:
            yield
        finally:
            if fd is not None:
                self.close_fd(fd)

    def close(self) -> None:
        """Release every inode and handle; every deferred close is done on return."""
        for inode in list(self.inodes.values()):
            self.drop(inode, force=True)
        self.inodes.clear()
        self.files.clear()
        self.dirs.clear()
        if self._closer is not None:
            self._closer.stop()
            self._closer = None
            self.close_fd = os.close
