"""Open regular files (layer L4): the data descriptor an inode's handles share, its header
checked against the file's place, and reads and writes through its contents.

One data descriptor per inode, opened at the first open and closed at the last release;
its `FileContents` does the block I/O (contents.py). A header that fails its binding
check closes the descriptor again, so the next open checks it anew (the keys may come
back after a revocation).

The data descriptor of an open file may be given back while the file stays open (the
inode table's data cache, issue 23): the next read, write, truncate or fsync opens it
again from the inode's handle (reopened by name if that was evicted too, and checked to
be the same backing inode), with the access mode it had, and checks that the header
there still carries the file's id: anything else is a change made in the backing store
behind the mount's back, and gives EIO. Positions are the kernel's (every read and write
carries its offset; O_APPEND is resolved by the kernel from the size we report), O_TRUNC
is applied once at open, and locks are the kernel's (no lock handlers): none of that
lives in the descriptor.
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
from encfs.engine.inode import Inode, oserror
from encfs.engine.inodes import InodeTable
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
        if inode.contents is not None:  # open, its descriptor given back meanwhile
            self.restore_data(inode)
            return
        new_descriptor = self._inodes.new_descriptor
        mode = os.O_RDWR
        try:
            inode.data_fd = new_descriptor(lambda: backing.reopen(inode.fd, os.O_RDWR))
        except PermissionError:
            mode = os.O_RDONLY
            inode.data_fd = new_descriptor(lambda: backing.reopen(inode.fd, os.O_RDONLY))
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
            inode.contents.mode = mode

    def restore_data(self, inode: Inode) -> FileContents:
        """Open the data descriptor of an open file again after it was given back: from
        the inode's handle (by name if that was evicted too: the same backing inode, or
        ESTALE), with the access mode it had, and only if the header there still carries
        the file's id. Either failure is the backing store changed behind the mount's
        back: IntegrityError (EIO)."""
        contents = inode.contents
        assert contents is not None
        had_handle = inode.has_handle
        try:
            path_fd = inode.fd
        except OSError as exc:
            if exc.errno != errno.ESTALE:
                raise
            error = IntegrityError(
                f"inode {inode.ino}: its backing file cannot be opened again ({exc.strerror})"
            )
            self.report_integrity(inode, error)
            raise error from None
        mode = contents.mode
        fd = self._inodes.new_descriptor(lambda: backing.reopen(path_fd, mode))
        try:
            header = os.pread(fd, HEADER_SIZE, 0)
            if FileHeader.unpack(header).file_id != contents.file_id:
                raise IntegrityError(f"inode {inode.ino}: file header replaced while open")
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, IntegrityError):
                self.report_integrity(inode, exc)
            raise
        if not had_handle:
            # Opened only for this: closed again, so an open file costs one descriptor
            # (its handle is opened by name again when something needs it).
            self._inodes.drop_handle(inode)
        self._inodes.set_data(inode, fd)
        return contents

    def contents(self, data_fd: int, file_id: bytes) -> FileContents:
        return FileContents(data_fd, self._layout, self._volume_id, file_id, self._keyring)

    def ensure_contents(self, inode: Inode) -> FileContents:
        """Contents of an open file, its descriptor present (opened again if it was given
        back), writing the header of a file a crash left empty."""
        contents = inode.contents
        if contents is None:
            self.open_data(inode)  # (a header-less file's descriptor may be given back too)
            assert inode.data_fd is not None
            os.pwrite(inode.data_fd, self._bindings.new_header(inode.location).pack(), 0)
            self.close_data(inode)
            self.open_data(inode)
            self._inodes.settle(inode)
            contents = inode.contents
            assert contents is not None
        elif contents.fd < 0:
            self.restore_data(inode)
        return contents

    def close_data(self, inode: Inode) -> None:
        self._inodes.close_data(inode)

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
        self._inodes.settle(inode)  # its data descriptor may be given back from now on
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
        contents = inode.contents
        if contents is None:
            return b""
        # The hot path: a test and a mark for the data cache's clock, when the descriptor
        # is there (about 15 ns).
        if contents.fd < 0:
            self.restore_data(inode)
        contents.used = True
        try:
            data = contents.read(plain_offset, plain_length)
            self._counters["bytes_read"] += len(data)
            return data
        except IntegrityError as exc:
            self.report_integrity(inode, exc)
            raise

    def write(self, fh: int, plain_offset: int, data: bytes) -> int:
        inode = self.handle(fh)
        contents = inode.contents
        if contents is None or contents.fd < 0:
            contents = self.ensure_contents(inode)
        contents.used = True
        try:
            written = contents.write(plain_offset, data)
        except IntegrityError as exc:
            self.report_integrity(inode, exc)
            raise
        # No setid clearing here: the kernel does it first (with a setattr) when the
        # writer lacks CAP_FSETID, as it knows the writer's capabilities.
        self._counters["bytes_written"] += written
        return written

    def sync_begin(self, fh: int) -> tuple[Inode, int]:
        """(inode, data descriptor) of a handle for an fsync on another thread: opened
        again if it was given back, and held (never given back) until `sync_end`. An
        fsync of any descriptor of the backing inode writes all of its dirty pages,
        those written through a descriptor given back meanwhile too."""
        inode = self.handle(fh)
        # Held first: holding may open its handle, and running out of descriptors then
        # would give back the data descriptor.
        held = self._inodes.hold(inode)
        try:
            self.open_data(inode)
        except BaseException:
            self._inodes.unhold(held)
            raise
        fd = inode.data_fd
        assert fd is not None
        return inode, fd

    def sync_end(self, inode: Inode) -> None:
        self._inodes.unhold([inode])

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
