"""Open regular files (layer L4): the data descriptor an inode's handles share, its header
checked against the file's place, and reads and writes through its contents.

One data descriptor per inode, opened at the first open and closed at the last release;
its `FileContents` does the block I/O (contents.py). A header that fails its binding
check closes the descriptor again, so the next open checks it anew (the keys may come
back after a revocation).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable

from encfs import backing
from encfs.engine.bindings import Bindings
from encfs.engine.contents import FileContents
from encfs.engine.inodes import Inode, InodeTable, oserror
from encfs.errors import IntegrityError
from encfs.format.blocks import HEADER_SIZE, FileHeader, Layout
from encfs.keyring import Keyring

log = logging.getLogger(__name__)


class Files:
    """The open regular files of one volume, and their handles."""

    def __init__(
        self,
        inodes: InodeTable,
        bindings: Bindings,
        layout: Layout,
        volume_id: bytes,
        keyring: Keyring,
        counters: dict[str, int],
    ) -> None:
        self._inodes = inodes
        self._handles = inodes.files
        self._bindings = bindings
        self._layout = layout
        self._volume_id = volume_id
        self._keyring = keyring
        self._counters = counters  # the volume's (opens, bytes, integrity_errors)

    # --- the data descriptor ------------------------------------------------------------
    def open_data(self, inode: Inode) -> None:
        if inode.data_fd is not None:
            return
        new_descriptor = self._inodes.new_descriptor
        try:
            inode.data_fd = new_descriptor(lambda: backing.reopen(inode.fd, os.O_RDWR))
        except PermissionError:
            inode.data_fd = new_descriptor(lambda: backing.reopen(inode.fd, os.O_RDONLY))
        inode.contents = None
        header = os.pread(inode.data_fd, HEADER_SIZE, 0)
        if header:
            try:
                file_header = FileHeader.unpack(header)
                self._bindings.check_file(inode, file_header)
            except BaseException:  # tampered, or the keys are wiped (revoked): open again later
                os.close(inode.data_fd)
                inode.data_fd = None
                raise
            inode.contents = self.contents(inode.data_fd, file_header.file_id)

    def contents(self, data_fd: int, file_id: bytes) -> FileContents:
        return FileContents(data_fd, self._layout, self._volume_id, file_id, self._keyring)

    def ensure_contents(self, inode: Inode) -> FileContents:
        """Contents of an open file, writing the header of a file a crash left empty."""
        if inode.contents is None:
            assert inode.data_fd is not None
            os.pwrite(inode.data_fd, self._bindings.new_header(inode.location).pack(), 0)
            self.close_data(inode)
            self.open_data(inode)
        assert inode.contents is not None
        return inode.contents

    @staticmethod
    def close_data(inode: Inode) -> None:
        if inode.data_fd is not None:
            os.close(inode.data_fd)
        inode.data_fd = None
        inode.contents = None

    def with_contents(self, inode: Inode, action: Callable[[FileContents], None]) -> None:
        """Run `action` on a file's contents, open or not (truncate by path)."""
        transient = inode.data_fd is None
        self.open_data(inode)
        try:
            action(self.ensure_contents(inode))
        finally:
            if transient and inode.opens == 0:
                self.close_data(inode)

    # --- handles ------------------------------------------------------------------------
    def open(self, inode: Inode, flags: int, keep_setid: bool) -> int:
        """A handle on a regular file. keep_setid: the caller has CAP_FSETID (O_TRUNC)."""
        if inode.mode != stat.S_IFREG:
            raise oserror(errno.EISDIR if inode.is_dir else errno.EINVAL)
        self.open_data(inode)
        inode.opens += 1
        self._counters["opens"] += 1
        fh = self._inodes.new_handle()
        self._handles[fh] = inode
        if flags & os.O_TRUNC:
            # With atomic O_TRUNC the kernel leaves the whole truncate to us: the times
            # change even for an empty file, and setid bits go unless the caller may keep them.
            try:
                self.ensure_contents(inode).truncate(0)
                if not keep_setid:
                    kill_suid(inode)
            except BaseException:
                self.release(fh)
                raise
        return fh

    def handle(self, fh: int) -> Inode:
        try:
            return self._handles[fh]
        except KeyError:
            raise oserror(errno.EBADF) from None

    def read(self, fh: int, plain_offset: int, plain_length: int) -> bytes | bytearray:
        inode = self.handle(fh)
        if inode.contents is None:
            return b""
        try:
            data = inode.contents.read(plain_offset, plain_length)
            self._counters["bytes_read"] += len(data)
            return data
        except IntegrityError as exc:
            self.report_integrity(inode, exc)
            raise

    def write(self, fh: int, plain_offset: int, data: bytes) -> int:
        inode = self.handle(fh)
        contents = self.ensure_contents(inode)
        try:
            written = contents.write(plain_offset, data)
        except IntegrityError as exc:
            self.report_integrity(inode, exc)
            raise
        # No setid clearing here: the kernel does it first (with a setattr) when the
        # writer lacks CAP_FSETID, as it knows the writer's capabilities.
        self._counters["bytes_written"] += written
        return written

    def release(self, fh: int) -> None:
        inode = self._handles.pop(fh, None)
        if inode is None:
            return
        inode.opens -= 1
        if inode.opens == 0:
            self.close_data(inode)
            self._inodes.drop(inode)

    def report_integrity(self, inode: Inode, exc: IntegrityError) -> None:
        self._counters["integrity_errors"] += 1
        log.warning("integrity failure in inode %d: %s", inode.ino, exc)


def kill_suid(inode: Inode) -> None:
    """Clear setuid/setgid after a data change, as a local filesystem does."""
    st_mode = os.fstat(inode.fd).st_mode
    kill = stat.S_ISUID
    if st_mode & stat.S_IXGRP:
        kill |= stat.S_ISGID
    if st_mode & kill:
        backing.chmod_fd(inode.fd, stat.S_IMODE(st_mode) & ~kill)
