"""One inode of an open volume (layer L4): what the kernel knows a backing object by, its
attributes as the kernel sees them, and an open directory's handle. The table that holds
them, their counts and their descriptors is engine/inodes.py."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from encfs.engine.contents import FileContents
    from encfs.engine.inodes import InodeTable

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
        "_fd",
        "backing_ino",
        "backing_name",
        "bad_place",
        "children",
        "contents",
        "data_fd",
        "dir_id",
        "file_id",
        "holds",
        "ino",
        "location",
        "lookups",
        "mode",
        "on_drop",
        "opens",
        "parent_ino",
        "pinned",
        "table",
        "xattrs_stored",
    )

    def __init__(
        self,
        ino: int,
        fd: int,
        mode: int,
        table: InodeTable | None = None,
        backing_ino: int = 0,
    ) -> None:
        self.ino = ino
        self._fd = fd  # O_PATH handle (directories: an O_RDONLY directory fd), or -1
        self.table = table
        self.backing_ino = backing_ino  # st_ino of the backing object it stands for
        # Where it is reopened from when its handle was evicted: the parent's inode number
        # and its backing name there (None: no name known; it keeps its handle). An open
        # object whose last name was removed is recorded in the orphan directory.
        self.parent_ino: int | None = None
        self.backing_name: str | None = None
        # Inodes in the table whose recorded name is in this directory: it stays in the
        # table (its handle may still be evicted) until they are gone or renamed, so each
        # of them can always be reopened by name, even after the kernel forgot this one
        # (a hard link kept alive by another name; the engine used without FUSE).
        self.children = 0
        self.holds = 0  # operations in progress that need its handle to stay open
        self.mode = stat.S_IFMT(mode)
        self.lookups = 0
        self.opens = 0
        self.dir_id: bytes | None = None
        self.file_id: bytes | None = None  # a regular file's, once read (xattr sets)
        self.data_fd: int | None = None  # shared by all open handles of a regular file
        # An open file's contents, also while its data descriptor is given back (its fd
        # is -1 then, and the next read or write reopens it with its `mode`).
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
        # What to do when this inode is dropped: a file or directory whose last name went
        # while it was open takes its xattr store file with it then (engine/xattrs.py);
        # its entry in the orphan directory goes too (engine/orphans.py).
        self.on_drop: Callable[[], None] | None = None

    @property
    def is_dir(self) -> bool:
        return self.mode == stat.S_IFDIR

    @property
    def fd(self) -> int:
        """The backing handle, reopened if it was evicted (ESTALE if that fails).

        Never an open file's data descriptor, though it would do: a caller may keep the
        handle while it opens another descriptor, and running out of them gives back
        every data descriptor (`trim_data`), but never the most recently used handles."""
        if self._fd >= 0:
            if self.table is not None:
                self.table.touch(self)
            return self._fd
        if self.table is None:
            raise oserror(errno.ESTALE, f"inode {self.ino} has no handle")
        return self.table.reopen(self)

    @property
    def has_handle(self) -> bool:
        return self._fd >= 0


class DirHandle:
    __slots__ = ("entries", "inode")

    def __init__(self, inode: Inode) -> None:
        self.inode = inode
        self.entries: list[tuple[bytes, str | None]] | None = None  # (plain, backing name)

    def entries_from(self, start: int) -> Iterator[tuple[bytes, str | None, int]]:
        """The listing from offset `start` on: (plain, backing name, next offset)."""
        entries = self.entries or []
        for index in range(start, len(entries)):
            plain, backing_name = entries[index]
            yield plain, backing_name, index + 1
