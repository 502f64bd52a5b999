"""pyfuse3 Operations over a Volume: request decoding, attribute conversion, errno.

Handlers call the volume synchronously on the trio thread and never await mid-update
(the rule and its checklist: docs/dev/ARCHITECTURE.md); only fsync, which can take
milliseconds, is handed off (`syncer`: the kernel's AIO workers, or a thread).
Every handler is wrapped by `_translate`.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from encfs.engine import Attr, RenameRequest, Volume
from encfs.fuse.errno_map import errno_for
from encfs.fuse.syncer import ThreadSyncer

log = logging.getLogger(__name__)

ENTRY_TIMEOUT = 300.0  # all changes pass through us, so long caching is safe
ATTR_TIMEOUT = 300.0
NEGATIVE_TIMEOUT = 300.0
XATTR_CAPABILITY = b"security.capability"
CAP_FSETID = 4  # linux/capability.h
# POSIX ACLs are not supported (pyfuse3's enable_acl is off): EOPNOTSUPP, as from a local
# filesystem without ACLs, makes cp -a, tar and rsync fall back to chmod instead of
# storing an ACL that is never enforced, and `ls -l` stop asking after the first entry.
XATTR_UNSUPPORTED_PREFIX = b"system."
# SELinux labels FUSE mounts by policy (genfscon) and answers security.selinux itself, so
# a stored label would take effect nowhere: EOPNOTSUPP, as under SELinux. `ls -l` asks
# for it on every entry otherwise (one request each).
XATTR_SELINUX = b"security.selinux"


# ext4 knows these namespaces and nothing else (EOPNOTSUPP for "foo" or "os2.foo"); the
# kernel passes any name to a FUSE daemon, so the answer is given here.
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
XATTR_TRUSTED_PREFIX = b"trusted."


def _unsupported_xattr(name: bytes) -> bool:
    return (
        name.startswith(XATTR_UNSUPPORTED_PREFIX)
        or name == XATTR_SELINUX
        or not name.startswith(XATTR_NAMESPACES)
    )


P = ParamSpec("P")
R = TypeVar("R")


# Handlers that may need new backing space and leave nothing behind when they fail: on
# ENOSPC/EDQUOT they run once more after the deferred closes of deleted files are done
# (`rm big; write` must find the space). Not fsync: a second fsync would hide the error.
_RETRY_WHEN_FULL = frozenset(
    {"write", "create", "mkdir", "mknod", "symlink", "link", "rename", "setattr", "setxattr"}
)
_FULL = (errno.ENOSPC, errno.EDQUOT)
# Handlers that run once more after the daemon gave back the descriptors of its handle
# cache when it ran out of them (issue 23): those above, and those that change nothing.
# Not readdir: it may have replied some entries already.
_RETRY_WHEN_NO_DESCRIPTORS = _RETRY_WHEN_FULL | {
    "lookup", "getattr", "open", "opendir", "readlink", "getxattr", "listxattr", "statfs",
    # an open file's data descriptor or directory handle opened again (nothing done yet)
    "read", "fsync", "fsyncdir",
}
_NO_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


def _translate(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    retry_when_full = handler.__name__ in _RETRY_WHEN_FULL
    retry_when_no_descriptors = handler.__name__ in _RETRY_WHEN_NO_DESCRIPTORS

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            try:
                return await handler(*args, **kwargs)
            except OSError as exc:
                volume = args[0].volume  # type: ignore[attr-defined]
                if retry_when_full and exc.errno in _FULL:
                    if not volume.settle_closes():
                        raise
                elif retry_when_no_descriptors and exc.errno in _NO_DESCRIPTORS:
                    if not volume.shed_handles():
                        raise
                else:
                    raise
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            code = errno_for(exc)
            if code == errno.EIO:
                log.debug("%s -> EIO: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(code) from None

    return wrapper


def drop_kernel_cache(inodes: list[int]) -> int:
    """Make the kernel forget cached pages and attributes of these inodes.

    Used when the key is revoked, so cached plaintext is not served either. Blocking (the
    kernel may wait for the filesystem): call it from a worker thread, never a handler.
    Returns how many inodes the kernel still knew.
    """
    dropped = 0
    for inode in inodes:
        try:
            pyfuse3.invalidate_inode(inode, False)
            dropped += 1
        except OSError as exc:  # ENOENT: the kernel had already forgotten it
            if exc.errno != errno.ENOENT:
                log.warning("cannot invalidate inode %d: %s", inode, exc)
    return dropped


def caller_has_fsetid(ctx: Any) -> bool:
    """Whether the requesting process has CAP_FSETID (keeps setuid/setgid on O_TRUNC).

    With atomic O_TRUNC the kernel hands the truncate to us without its own setid check;
    the caller's effective capabilities are in /proc (root's uid is the fallback)."""
    try:
        with open(f"/proc/{ctx.pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_FSETID & 1)
    except (OSError, ValueError, IndexError):
        pass
    return bool(ctx.uid == 0)


def entry_attributes(attr: Attr) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = attr.ino
    entry.generation = 0
    entry.entry_timeout = ENTRY_TIMEOUT
    entry.attr_timeout = ATTR_TIMEOUT
    entry.st_mode = attr.mode
    entry.st_nlink = attr.nlink
    entry.st_uid = attr.uid
    entry.st_gid = attr.gid
    entry.st_rdev = attr.rdev
    entry.st_size = attr.size
    entry.st_blksize = attr.blksize
    entry.st_blocks = attr.blocks
    entry.st_atime_ns = attr.atime_ns
    entry.st_mtime_ns = attr.mtime_ns
    entry.st_ctime_ns = attr.ctime_ns
    return entry


# statfs: the backing filesystem's sizes and counts, passed on as they are
_STATVFS_FROM_BACKING = (
    "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
)


def _negative_entry() -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = 0  # cached by the kernel as "does not exist"
    entry.entry_timeout = NEGATIVE_TIMEOUT
    return entry


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, volume: Volume, syncer: ThreadSyncer | None = None) -> None:
        super().__init__()
        self.volume = volume
        self.syncer = syncer or ThreadSyncer()  # fsync off the trio thread

    # --- inodes and attributes ---------------------------------------------------------
    @_translate
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        try:
            return entry_attributes(self.volume.lookup(parent_inode, name))
        except FileNotFoundError:
            return _negative_entry()

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            try:
                self.volume.forget(ino, count)
            except Exception:
                log.exception("forget of inode %d failed", ino)

    @_translate
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return entry_attributes(self.volume.getattr(inode))

    @_translate
    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        result = self.volume.setattr(
            inode,
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return entry_attributes(result)

    @_translate
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return self.volume.readlink(inode)

    # --- namespace ---------------------------------------------------------------------
    @_translate
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return entry_attributes(self.volume.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid))

    @_translate
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        volume = self.volume
        pending = volume.mkdir_begin(parent_inode, name, mode)
        try:
            # Two fsyncs (~0.3 ms here, at once): other requests go on meanwhile.
            await self.syncer.fsync_all(pending.sync_fds())
            return entry_attributes(volume.mkdir_finish(pending, ctx.uid, ctx.gid))
        finally:
            volume.mkdir_end(pending)

    @_translate
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.volume.unlink(parent_inode, name)

    @_translate
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.volume.rmdir(parent_inode, name)

    @_translate
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return entry_attributes(self.volume.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @_translate
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        volume = self.volume
        pending = volume.rename_begin(
            RenameRequest(
                parent_inode_old, name_old, parent_inode_new, name_new, flags, (ctx.uid, ctx.gid)
            )
        )
        if pending is None:
            return
        try:
            # A directory's rename fsyncs its id record before and its parents after the
            # backing rename (docs/FORMAT.md 4): other requests go on meanwhile.
            if pending.sync_before:
                await self.syncer.fsync_all(pending.sync_before)
            volume.rename_apply(pending)
            after = pending.sync_after()
            if after:
                try:
                    await self.syncer.fsync_all(after)
                except OSError as exc:
                    pending.not_durable(exc)
            volume.rename_finish(pending)
        finally:
            volume.rename_end(pending)

    @_translate
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return entry_attributes(self.volume.link(inode, new_parent_inode, new_name))

    # --- files -------------------------------------------------------------------------
    @_translate
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        keep_setid = bool(flags & os.O_TRUNC) and caller_has_fsetid(ctx)
        return pyfuse3.FileInfo(fh=self.volume.open(inode, flags, keep_setid))

    @_translate
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, attr = self.volume.create(parent_inode, name, mode, flags, ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=fh), entry_attributes(attr)

    @_translate
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:
        return self.volume.read(fh, off, size)

    @_translate
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.volume.write(fh, off, buf)

    async def flush(self, fh: int) -> None:
        # Nothing to do: data is in the backing store's page cache after every write and
        # durability is fsync's job. ENOSYS tells the kernel so once (fc->no_flush): it
        # sends no FLUSH at any later close, one request less per close. It still writes
        # back its dirty pages at close in writeback-cache mode and returns their errors,
        # as that happens before it looks at no_flush (fs/fuse/file.c, fuse_flush).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_translate
    async def fsync(self, fh: int, datasync: bool) -> None:
        # Its data descriptor, opened again if it was given back (the fsync still writes
        # what was written through the one before: the page cache is the inode's), and
        # kept open while the syncer's thread uses it.
        inode, fd = self.volume.sync_begin(fh)
        try:
            await self.syncer.fsync(fd, datasync)
        finally:
            self.volume.sync_end(inode)

    @_translate
    async def release(self, fh: int) -> None:
        self.volume.release(fh)

    # --- directories -------------------------------------------------------------------
    @_translate
    async def opendir(self, inode: int, ctx: Any) -> int:
        return self.volume.opendir(inode)

    @_translate
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        volume = self.volume
        for name, backing_name, next_id in volume.readdir(fh, start_id):
            try:
                attr = volume.readdir_attr(fh, name, backing_name)
            except FileNotFoundError:
                continue  # removed since the listing was taken
            if not pyfuse3.readdir_reply(token, name, entry_attributes(attr), next_id):
                if backing_name is not None:
                    volume.drop_if_unused(attr.ino)
                return
            if backing_name is not None:
                volume.add_lookup(attr.ino)

    @_translate
    async def releasedir(self, fh: int) -> None:
        self.volume.releasedir(fh)

    @_translate
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        inode, fd = self.volume.fsyncdir_begin(fh)
        try:
            await self.syncer.fsync(fd)
        finally:
            self.volume.sync_end(inode)

    @_translate
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = self.volume.statfs()
        data = pyfuse3.StatvfsData()
        for field in _STATVFS_FROM_BACKING:
            setattr(data, field, getattr(st, field))
        data.f_namemax = 255
        return data

    # --- extended attributes -----------------------------------------------------------
    @_translate
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        # The kernel asks for security.capability before every write: answer at once,
        # with no I/O (the mount is nosuid, so file capabilities never apply).
        if name == XATTR_CAPABILITY:
            raise pyfuse3.FUSEError(errno.ENODATA)
        if _unsupported_xattr(name):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        return self.volume.getxattr(inode, name)

    @_translate
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        # A label stored before security.selinux was refused is hidden (removable still).
        names = [name for name in self.volume.listxattr(inode) if not _unsupported_xattr(name)]
        # ext4 lists trusted.* only to CAP_SYS_ADMIN; FUSE tells the caller's uid, not its
        # capabilities, so root's processes see them and others' do not.
        if ctx.uid != 0:
            names = [name for name in names if not name.startswith(XATTR_TRUSTED_PREFIX)]
        return names

    @_translate
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        if name == XATTR_CAPABILITY or _unsupported_xattr(name):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        self.volume.setxattr(inode, name, value)

    @_translate
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        if name.startswith(XATTR_UNSUPPORTED_PREFIX):  # (an empty ACL set is a removal)
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        self.volume.removexattr(inode, name)
