"""Making and removing directory entries (layer L4): mkdir in stages, create, mknod,
symlink, link, unlink, rmdir.

Every new object gets its backing name (and sidecar) first, then is made, then adopted
into the inode table with the caller's ownership. A new directory is built under a
temporary name with its id inside and moved into place once durable (`mkdir_begin`), so
a crash never leaves a visible directory without an id; a removed one is moved out of
sight first, so a crash leaves a temporary entry (fsck removes it).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from encfs import backing, crypto
from encfs.engine.bindings import rewrite_header
from encfs.engine.files import Files
from encfs.engine.inode import Inode, oserror
from encfs.engine.names import is_empty_dir, remove_tree, temp_name
from encfs.engine.namespace import Namespace
from encfs.format import names as fnames
from encfs.format import places
from encfs.format.places import DirRecord


@dataclass(eq=False)
class PendingDir:
    """A directory being made (`Volume.mkdir_begin`): built, not yet moved into place."""

    parent: Inode
    plain_name: bytes
    backing_name: str
    encoded: str
    temp_name: str
    dir_fd: int | None = None
    id_fd: int | None = None
    moved_in: bool = False

    def sync_fds(self) -> tuple[int, int]:
        """What to fsync, in any order, before the directory becomes visible: the id
        file (its contents) and the directory (its entry for the id file)."""
        assert self.id_fd is not None and self.dir_fd is not None
        return self.id_fd, self.dir_fd

    def sync(self) -> None:
        """Make the id durable before the directory becomes visible (blocking I/O)."""
        for fd in self.sync_fds():
            os.fsync(fd)


def _check_free(parent: Inode, backing_name: str) -> None:
    try:
        os.stat(backing_name, dir_fd=parent.fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    raise oserror(errno.EEXIST)


class Entries:
    """The namespace changes of one volume. Methods return the inode they made (the
    facade turns it into attributes)."""

    def __init__(self, namespace: Namespace, files: Files) -> None:
        self._ns = namespace
        self._files = files

    def _adopt_new(
        self, parent: Inode, backing_name: str, plain_name: bytes, uid: int, gid: int
    ) -> Inode:
        inode, st = self._ns.inodes.register_at(parent, backing_name)
        self._ns.names.place(inode, self._ns.names.location(parent, plain_name))
        parent_st = os.fstat(parent.fd)
        if parent_st.st_mode & stat.S_ISGID:
            gid = parent_st.st_gid  # as a local filesystem does under a setgid directory
        if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (uid, gid):
            backing.chown_fd(inode.fd, uid, gid)
            # chown drops setuid/setgid, but the kernel already vetted the creation mode.
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISLNK(st.st_mode):
                backing.chmod_fd(inode.fd, stat.S_IMODE(st.st_mode))
        inode.lookups += 1
        return inode

    # --- directories ----------------------------------------------------------------------
    def mkdir_begin(self, parent: Inode, plain_name: bytes, mode: int) -> PendingDir:
        """Build the directory under a temporary name, with its id inside."""
        backing_name, encoded = self._ns.names.fresh(parent, plain_name)
        _check_free(parent, backing_name)
        if os.fstat(parent.fd).st_mode & stat.S_ISGID:
            mode |= stat.S_ISGID
        pending = PendingDir(parent, plain_name, backing_name, encoded, temp_name())
        os.mkdir(pending.temp_name, stat.S_IMODE(mode) | 0o700, dir_fd=parent.fd)
        try:
            pending.dir_fd = os.open(
                pending.temp_name,
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=parent.fd,
            )
            # The temporary directory is ours alone: the id file needs no atomic rename.
            # On a bound volume the record is bound to the final place at once (the
            # temporary name is never looked up).
            dir_id = crypto.random_key(fnames.DIR_ID_SIZE)
            record = dir_id
            if self._ns.bound:
                tag = self._ns.bindings.dir_tag(self._ns.names.location(parent, plain_name), dir_id)
                record = DirRecord(dir_id, (tag, places.ZERO_BINDING)).pack()
            pending.id_fd = os.open(
                fnames.DIR_ID_FILE,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                places.DIR_RECORD_MODE if self._ns.bound else 0o400,
                dir_fd=pending.dir_fd,
            )
            backing.pwrite_all(pending.id_fd, record, 0)
            os.chmod(pending.dir_fd, stat.S_IMODE(mode))
        except BaseException:
            self.mkdir_end(pending)
            raise
        return pending

    def mkdir_finish(self, pending: PendingDir, uid: int, gid: int) -> Inode:
        parent = pending.parent
        self._ns.names.write_sidecar(parent, pending.backing_name, pending.encoded)
        backing.renameat2(
            parent.fd, pending.temp_name, parent.fd, pending.backing_name, backing.RENAME_NOREPLACE
        )
        pending.moved_in = True
        return self._adopt_new(parent, pending.backing_name, pending.plain_name, uid, gid)

    @staticmethod
    def mkdir_end(pending: PendingDir) -> None:
        for fd in (pending.id_fd, pending.dir_fd):
            if fd is not None:
                os.close(fd)
        pending.id_fd = pending.dir_fd = None
        if not pending.moved_in:
            remove_tree(pending.parent.fd, pending.temp_name)

    def rmdir(self, parent: Inode, plain_name: bytes) -> None:
        backing_name, _ = self._ns.names.resolve(parent, plain_name)
        st = os.stat(backing_name, dir_fd=parent.fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            raise oserror(errno.ENOTDIR)
        if not is_empty_dir(parent.fd, backing_name):
            raise oserror(errno.ENOTEMPTY)
        aside = self._ns.orphans.set_aside(parent, backing_name, st)
        if aside is not None:  # open: removed when it is closed
            self._ns.names.remove_sidecar(parent, backing_name)
            self._ns.xattrs.discard_after(self._ns.xattrs.last_name_set(*aside, st), st)
            return
        # Move it out of sight first so a crash leaves a temp entry, never a dir without id.
        tmp = temp_name()
        self._ns.inodes.unname_at(parent, backing_name, st)
        backing.renameat2(parent.fd, backing_name, parent.fd, tmp, backing.RENAME_NOREPLACE)
        self._ns.names.remove_sidecar(parent, backing_name)
        xattr_set = self._ns.xattrs.last_name_set(parent.fd, tmp, st)
        remove_tree(parent.fd, tmp)
        self._ns.xattrs.discard_after(xattr_set, st)

    # --- files and other objects ----------------------------------------------------------
    def create(self, parent: Inode, plain_name: bytes, mode: int, uid: int, gid: int) -> Inode:
        """A new regular file with its header, its inode's data descriptor open."""
        backing_name, encoded = self._ns.names.fresh(parent, plain_name)
        self._ns.names.write_sidecar(parent, backing_name, encoded)
        fd = os.open(
            backing_name,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            stat.S_IMODE(mode),
            dir_fd=parent.fd,
        )
        header = self._ns.bindings.new_header(self._ns.names.location(parent, plain_name))
        try:
            os.pwrite(fd, header.pack(), 0)
        except BaseException:
            os.close(fd)
            os.unlink(backing_name, dir_fd=parent.fd)
            raise
        try:
            inode = self._adopt_new(parent, backing_name, plain_name, uid, gid)
        except BaseException:
            os.close(fd)
            raise
        if inode.data_fd is None:
            # The new descriptor becomes the data descriptor: no reopen, no header read
            # back and no binding check of the header just written.
            inode.contents = self._files.contents(fd, header.file_id)
            self._ns.inodes.set_data(inode, fd)
        else:
            os.close(fd)
        return inode

    def mknod(
        self, parent: Inode, plain_name: bytes, mode: int, rdev: int, uid: int, gid: int
    ) -> Inode:
        """A device, FIFO or socket (regular files: `create`)."""
        backing_name, encoded = self._ns.names.fresh(parent, plain_name)
        self._ns.names.write_sidecar(parent, backing_name, encoded)
        os.mknod(backing_name, mode, rdev, dir_fd=parent.fd)
        return self._adopt_new(parent, backing_name, plain_name, uid, gid)

    def symlink(self, parent: Inode, plain_name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        if not target or len(target) > fnames.SYMLINK_TARGET_MAX or b"\0" in target:
            raise oserror(errno.ENAMETOOLONG if target else errno.ENOENT)
        backing_name, encoded = self._ns.names.fresh(parent, plain_name)
        _check_free(parent, backing_name)
        location = self._ns.names.location(parent, plain_name)
        cipher_target, long_id = self._ns.symlinks.new_target(location, target)
        try:
            self._ns.names.write_sidecar(parent, backing_name, encoded)
            os.symlink(cipher_target, backing_name, dir_fd=parent.fd)
        except BaseException:
            if long_id is not None:
                self._ns.symlinks.remove_stored(long_id)
            raise
        return self._adopt_new(parent, backing_name, plain_name, uid, gid)

    def link(self, inode: Inode, parent: Inode, new_name: bytes) -> None:
        """A hard link to a file or other non-directory (bound symlinks: copied by the
        facade instead, as a target bound to one place cannot be shared by two names)."""
        backing_name, encoded = self._ns.names.fresh(parent, new_name)
        _check_free(parent, backing_name)
        self._ns.names.write_sidecar(parent, backing_name, encoded)
        if inode.mode == stat.S_IFREG:
            # A hard-linked file has several names: it stops being bound to one.
            rewrite_header(inode.fd, self._ns.bindings.unbind)
        backing.link_fd(inode.fd, parent.fd, backing_name)
        inode.lookups += 1

    def unlink(self, parent: Inode, plain_name: bytes) -> None:
        backing_name, _ = self._ns.names.resolve(parent, plain_name)
        # A handle, not a stat: if the kernel's inode for it has no handle, this one keeps
        # its backing inode (and number) after the unlink (InodeTable.unname_pinned).
        pin = self._ns.inodes.new_descriptor(lambda: backing.open_path(backing_name, parent.fd))
        try:
            st = os.fstat(pin)
            if stat.S_ISDIR(st.st_mode):
                raise oserror(errno.EISDIR)
            long_id = self._ns.symlinks.last_stored_link(parent.fd, backing_name, st)
            xattr_set = self._ns.xattrs.last_name_set(parent.fd, backing_name, st)
        except BaseException:
            os.close(pin)
            raise
        if self._ns.orphans.set_aside(parent, backing_name, st) is not None:
            os.close(pin)  # (in use: moved aside, removed when it is dropped)
            long_id = None  # (a symlink's stored target goes with its orphan entry)
        else:
            self._ns.inodes.unname_pinned(parent, backing_name, st, pin)
            os.unlink(backing_name, dir_fd=parent.fd)
        self._ns.names.remove_sidecar(parent, backing_name)
        if long_id is not None:
            self._ns.symlinks.remove_stored(long_id)
        self._ns.xattrs.discard_after(xattr_set, st)
