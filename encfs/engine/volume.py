"""The volume engine's facade: the plaintext filesystem API over the backing store
(layer L4).

Usable without FUSE: methods take FUSE-style inode numbers and plaintext names (bytes)
and raise OSError (with errno) or IntegrityError; the FUSE adapter translates those.
Metadata (mode, owner, times, link count) lives in the backing inodes themselves; sizes
are derived from ciphertext sizes arithmetically, so stat never decrypts anything.

`Volume` owns the volume's lifetime (root handle, volume lock, keyring, counters) and
composes what does the work: the inode table (inodes.py), names and directory ids
(names.py), place bindings (bindings.py), symlink targets (symlinks.py), extended
attributes (xattrs.py), making and removing entries (entries.py), the rename protocol
(rename.py), open files (files.py) and each file's encrypted contents (contents.py).
The facade turns inode numbers into inodes and inodes into attributes. Every method
runs to its end without yielding: the concurrency rule of docs/dev/ARCHITECTURE.md
("handlers never await mid-update").
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

from encfs import backing, config_store, crypto
from encfs.audit import AuditLog
from encfs.engine import gate
from encfs.engine.bindings import Bindings
from encfs.engine.entries import Entries, PendingDir
from encfs.engine.files import Files
from encfs.engine.follow import EntryFollower
from encfs.engine.inode import ROOT_INODE, Attr, DirHandle, Inode, oserror
from encfs.engine.inodes import InodeTable
from encfs.engine.names import Names, ScanEntry
from encfs.engine.namespace import Namespace
from encfs.engine.orphans import Orphans
from encfs.engine.rename import PendingRename, RenameRequest, Renames
from encfs.engine.symlinks import Symlinks
from encfs.engine.xattrs import Xattrs
from encfs.errors import IntegrityError
from encfs.format import FEATURE_BOUND_NAMES, FEATURE_XATTR_SETS
from encfs.format.volume import VolumeConfig
from encfs.keyring import Keyring
from encfs.trust import Operator


class Volume:
    """An unlocked, opened volume. One instance per mount (or per offline tool run)."""

    def __init__(
        self, backing_path: str, config: VolumeConfig, keyring: Keyring, operator: Operator
    ) -> None:
        self.backing_path = backing_path
        self.config = config
        # What vouched for this volume's providers (rotation protects new KEKs with it).
        self.operator = operator
        self.layout = config.layout
        self.keyring = keyring
        self.read_only = False
        # mkdirs and renames begun and not ended: their backing names were computed
        # under the volume key of their start, and they await between their steps
        self.steps_in_flight = 0
        # Directories and symlink targets bound to their place (docs/FORMAT.md 5.1, 5.3);
        # volumes made before the feature keep their unbound formats.
        self.bound_names = FEATURE_BOUND_NAMES in config.features
        # Each object's xattrs as one sealed set (docs/FORMAT.md 5.4.2); older volumes keep
        # one backing xattr per attribute (5.4.1).
        self.xattr_sets = FEATURE_XATTR_SETS in config.features
        self._root_fd = os.open(
            backing_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        )
        try:
            self._lock_fd = config_store.lock_volume(
                self._root_fd, backing_path, warn_if_network=True
            )
        except BaseException:
            os.close(self._root_fd)
            raise
        self.counters = {
            "integrity_errors": 0,
            "opens": 0,
            "bytes_read": 0,
            "bytes_written": 0,
            # renames and links: a walk over the backing tree (the re-wrap pass) may miss a
            # file moved under it while it runs
            "moves": 0,
        }
        self.audit = AuditLog(config.volume_id)  # replaced by unlock() with the configured log
        bound = self.bound_names
        self._inodes = InodeTable(self._root_fd)
        bindings = Bindings(config.volume_id, keyring)
        self._names = Names(keyring, bindings, bound, self.counters)
        self._symlinks = Symlinks(self._root_fd, keyring, bindings, bound, config.features)
        self._files = Files(
            self._inodes, bindings, self.layout, config.volume_id, keyring, self.counters
        )
        self._xattrs = Xattrs(
            keyring,
            self._names,
            self.counters,
            self._inodes,
            self._root_fd,
            config.volume_id,
            self.xattr_sets,
            bound,
        )
        self._orphans = Orphans(self._inodes, self._root_fd, self._xattrs, self._symlinks)
        namespace = Namespace(
            self._inodes, self._names, bindings, self._symlinks, self._xattrs, self._orphans,
            bound,
        )
        self._entries = Entries(namespace, self._files)
        self._renames = Renames(namespace)

    @classmethod
    def unlock(
        cls,
        backing_path: str,
        operator: Operator,
        audit: AuditLog | None = None,
        *,
        converting: bool = False,
        reencrypting: bool = False,
    ) -> Volume:
        """Open a volume with the key providers the operator vouched for (the command
        line's, then the trust store's): config authenticated before anything is used.
        A volume `convert` has not finished (its marker: before any provider runs; its
        authenticated config) is refused, except by `convert` itself; so is a volume
        whose re-encryption is unfinished, except by `reencrypt`."""
        crypto.self_test()
        gate.check_before_keys(backing_path, converting=converting, reencrypting=reencrypting)
        config, keyring = config_store.unlock(backing_path, operator, audit)
        try:
            gate.check_config(
                backing_path, config, converting=converting, reencrypting=reencrypting
            )
        except BaseException:
            keyring.close()
            raise
        volume = cls(backing_path, config, keyring, operator)
        if audit is not None:
            volume.audit = audit
        return volume

    def defer_closes(self, closer: backing.DeferredCloser | None = None) -> None:
        """Close the descriptors of forgotten inodes on a worker thread (the daemon: the
        last close of an unlinked file is where the backing filesystem deletes it).
        `closer`: one that closes at a test's pace instead of the default one."""
        self._inodes.defer_closes(closer)

    def settle_closes(self) -> bool:
        """Finish the deferred closes (their files' space comes back); False if there
        were none, so an operation that ran out of space has no reason to retry."""
        return self._inodes.settle_closes()

    def close(self) -> None:
        """Forget everything and release every descriptor (after unmount). Idempotent."""
        if self._lock_fd < 0:
            return
        self._inodes.close()  # every queued close done before the lock is released
        for fd in (self._root_fd, self._lock_fd):
            os.close(fd)
        self._root_fd = self._lock_fd = -1
        self.keyring.close()  # zeroed before the process goes on (or exits)

    def clear_orphans(self) -> int:
        """Remove what a crash left in the orphan directory (engine/orphans.py: open
        objects whose last name was removed); how many. A writable mount does it first."""
        return self._orphans.clear()

    def orphan_leftovers(self) -> list[tuple[str, int]]:
        """(name, inode number) of what the orphan directory holds that no open object
        stands for (fsck)."""
        return self._orphans.leftovers()

    def sync(self) -> None:
        backing.syncfs(self._root_fd)

    @property
    def root_fd(self) -> int:
        """The backing root directory (for whole-volume passes: rotation, census)."""
        return self._root_fd

    # --- inodes ----------------------------------------------------------------------
    def inode(self, ino: int) -> Inode:
        return self._inodes.get(ino)

    def known_inodes(self) -> list[int]:
        """Inode numbers the kernel may hold cached data or attributes for."""
        return list(self._inodes.inodes)

    def forget(self, ino: int, count: int) -> None:
        self._inodes.forget(ino, count)

    def add_lookup(self, ino: int) -> None:
        self._inodes.get(ino).lookups += 1

    def drop_if_unused(self, ino: int) -> None:
        inode = self._inodes.inodes.get(ino)
        if inode is not None:
            self._inodes.drop(inode)

    def limit_handles(self, capacity: int) -> None:
        """Keep at most `capacity` handles, and as many open files' data descriptors
        that may be given back (tests)."""
        self._inodes.capacity = capacity
        self._inodes.trim()
        self._inodes.trim_data()

    def shed_handles(self) -> bool:
        """Out of descriptors: close the cached handles; False if that gave none back."""
        return self._inodes.shed() > 0

    def handle_stats(self) -> dict[str, int]:
        """Known inodes, cached handles, the capacity of the handle cache, and open file
        and directory handles."""
        return self._inodes.stats()

    # --- attributes ------------------------------------------------------------------
    def _attr(self, inode: Inode, st: os.stat_result) -> Attr:
        if stat.S_ISREG(st.st_mode):
            size = self.layout.plain_size(st.st_size)
        elif stat.S_ISLNK(st.st_mode):
            size = self._symlinks.size(inode, st)
        else:
            size = st.st_size
        return Attr(
            ino=inode.ino,
            mode=st.st_mode,
            nlink=self._orphans.nlink(inode, st),  # (an orphan link not counted)
            uid=st.st_uid,
            gid=st.st_gid,
            rdev=st.st_rdev,
            size=size,
            blocks=st.st_blocks,
            atime_ns=st.st_atime_ns,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
        )

    def getattr(self, ino: int) -> Attr:
        inode = self._inodes.get(ino)
        fd = inode.data_fd if inode.data_fd is not None else inode.fd
        return self._attr(inode, os.fstat(fd))

    def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> Attr:
        inode = self._inodes.get(ino)
        if size is not None:
            if inode.mode != stat.S_IFREG:
                raise oserror(errno.EISDIR if inode.is_dir else errno.EINVAL)
            # setuid/setgid: the kernel sends the mode change with the size when the
            # caller lacks CAP_FSETID (it knows the caller; we do not).
            self._files.with_contents(inode, lambda contents: contents.truncate(size))
        if mode is not None:
            if inode.mode == stat.S_IFLNK:
                raise oserror(errno.EOPNOTSUPP)
            backing.chmod_fd(inode.fd, stat.S_IMODE(mode))
            contents = inode.contents
            if contents is not None and contents.mode == os.O_RDWR and not mode & stat.S_IWUSR:
                # Open for writing, and the owner may not write any more: a daemon that is
                # not root could not open it for writing again, so it keeps its descriptor.
                self._files.open_data(inode)
                self._inodes.pin_data(inode)
        if uid is not None or gid is not None:
            backing.chown_fd(inode.fd, -1 if uid is None else uid, -1 if gid is None else gid)
        if atime_ns is not None or mtime_ns is not None:
            backing.utimens_fd(inode.fd, atime_ns, mtime_ns)
        if (size, mode, uid, gid, atime_ns, mtime_ns) == (None,) * 6:
            # chown(path, -1, -1): the kernel sends a setattr that changes nothing, and
            # ext4 updates ctime for it. So does the backing's chown to -1, -1.
            backing.chown_fd(inode.fd, -1, -1)
        return self.getattr(ino)

    # --- names -----------------------------------------------------------------------
    def lookup(self, parent_ino: int, plain_name: bytes) -> Attr:
        parent = self._inodes.directory(parent_ino)
        if plain_name == b".":
            inode, st = parent, os.fstat(parent.fd)
        elif plain_name == b"..":
            inode, st = (
                self._inodes.register(backing.open_path("..", parent.fd))
                if (parent.ino != ROOT_INODE)
                else (parent, os.fstat(parent.fd))
            )
        else:
            backing_name, _ = self._names.resolve(parent, plain_name)
            inode, st = self._inodes.register_at(parent, backing_name)
            self._names.place(inode, self._names.location(parent, plain_name))
        inode.lookups += 1
        return self._attr(inode, st)

    def backing_name(self, parent_ino: int, plain_name: bytes) -> tuple[str, str]:
        """(backing name, full encoded name) of `plain_name` in a directory."""
        return self._names.encode(self._inodes.directory(parent_ino), plain_name)

    def plain_name_in(self, dir_fd: int, dir_id: bytes, backing_name: str) -> bytes | None:
        """Plaintext of a backing entry name in the directory `dir_fd` whose id is
        `dir_id`; None for reserved entries."""
        return self._names.plain_name_in(dir_fd, dir_id, backing_name)

    # --- creating entries ------------------------------------------------------------
    def mkdir(self, parent_ino: int, plain_name: bytes, mode: int, uid: int, gid: int) -> Attr:
        pending = self.mkdir_begin(parent_ino, plain_name, mode)
        try:
            pending.sync()
            return self.mkdir_finish(pending, uid, gid)
        finally:
            self.mkdir_end(pending)

    def mkdir_begin(self, parent_ino: int, plain_name: bytes, mode: int) -> PendingDir:
        """Build the directory under a temporary name with its id inside; `sync()` it
        (any thread: it touches only its own handles), then `mkdir_finish` moves it in,
        so a crash never leaves a visible directory without a durable id. `mkdir_end`
        always follows (it removes what was not moved in).

        The kernel holds the parent locked for the whole mkdir, so no other change of
        the parent through the mount comes between the steps."""
        pending = self._entries.mkdir_begin(self._inodes.directory(parent_ino), plain_name, mode)
        self.steps_in_flight += 1
        return pending

    def mkdir_finish(self, pending: PendingDir, uid: int, gid: int) -> Attr:
        return self.getattr(self._entries.mkdir_finish(pending, uid, gid).ino)

    def mkdir_end(self, pending: PendingDir) -> None:
        self.steps_in_flight -= 1
        self._entries.mkdir_end(pending)

    def create(
        self, parent_ino: int, plain_name: bytes, mode: int, flags: int, uid: int, gid: int
    ) -> tuple[int, Attr]:
        parent = self._inodes.directory(parent_ino)
        inode = self._entries.create(parent, plain_name, mode, uid, gid)
        fh = self._files.open(inode, flags & ~os.O_TRUNC, keep_setid=False)
        if not mode & stat.S_IWUSR:
            # Made read-only and open for writing (git's objects): a daemon that is not
            # root could not open it for writing again, so it keeps its descriptor.
            self._inodes.pin_data(inode)
        return fh, self.getattr(inode.ino)

    def mknod(
        self, parent_ino: int, plain_name: bytes, mode: int, rdev: int, uid: int, gid: int
    ) -> Attr:
        parent = self._inodes.directory(parent_ino)
        if stat.S_ISREG(mode):
            fh, attr = self.create(parent_ino, plain_name, mode, os.O_RDWR, uid, gid)
            self.release(fh)
            return self.getattr(attr.ino)
        return self.getattr(self._entries.mknod(parent, plain_name, mode, rdev, uid, gid).ino)

    def symlink(
        self, parent_ino: int, plain_name: bytes, target: bytes, uid: int, gid: int
    ) -> Attr:
        parent = self._inodes.directory(parent_ino)
        return self.getattr(self._entries.symlink(parent, plain_name, target, uid, gid).ino)

    def readlink(self, ino: int) -> bytes:
        inode = self._inodes.get(ino)
        if inode.mode != stat.S_IFLNK:
            raise oserror(errno.EINVAL)
        cipher_target = os.readlink("", dir_fd=inode.fd)
        if not self.bound_names:
            return self._symlinks.read_unbound(cipher_target)
        try:
            return self._symlinks.read_bound(inode, cipher_target)
        except IntegrityError as exc:
            self._files.report_integrity(inode, exc)
            raise

    def symlink_store_id(self, ino: int) -> bytes | None:
        """The symlink store file a symlink's target is in, if any (fsck's evidence)."""
        try:
            return self._symlinks.stored_id(os.readlink("", dir_fd=self._inodes.get(ino).fd))
        except (OSError, IntegrityError):
            return None

    def link(self, ino: int, new_parent_ino: int, new_name: bytes) -> Attr:
        self.counters["moves"] += 1
        inode = self._inodes.get(ino)
        if inode.is_dir:
            raise oserror(errno.EPERM)
        parent = self._inodes.directory(new_parent_ino)
        if self.bound_names and inode.mode == stat.S_IFLNK:
            return self._copy_symlink(inode, parent, new_name)
        self._entries.link(inode, parent, new_name)
        return self.getattr(ino)

    def _copy_symlink(self, inode: Inode, parent: Inode, new_name: bytes) -> Attr:
        """link(2) of a symlink on a bound volume: a second symlink with the same target,
        owner and times, bound to its own name (its own inode: a target bound to one
        place cannot be shared by two names, and an unbound one could be moved anywhere)."""
        target = self.readlink(inode.ino)
        st = os.fstat(inode.fd)
        attr = self.symlink(parent.ino, new_name, target, st.st_uid, st.st_gid)
        copy = self._inodes.get(attr.ino)
        self._xattrs.copy(inode, copy)
        backing.utimens_fd(copy.fd, st.st_atime_ns, st.st_mtime_ns)
        return self.getattr(attr.ino)

    # --- removing and renaming -------------------------------------------------------
    def unlink(self, parent_ino: int, plain_name: bytes) -> None:
        self._entries.unlink(self._inodes.directory(parent_ino), plain_name)

    def rmdir(self, parent_ino: int, plain_name: bytes) -> None:
        self._entries.rmdir(self._inodes.directory(parent_ino), plain_name)

    def rename(
        self,
        old_parent_ino: int,
        old_name: bytes,
        new_parent_ino: int,
        new_name: bytes,
        flags: int = 0,
        owner: tuple[int, int] | None = None,
    ) -> None:
        """A rename in one call (the FUSE adapter runs the same stages, with the fsyncs
        of a directory's rename off the request loop)."""
        pending = self.rename_begin(
            RenameRequest(old_parent_ino, old_name, new_parent_ino, new_name, flags, owner)
        )
        if pending is None:
            return
        try:
            for fd in pending.sync_before:
                os.fsync(fd)
            self.rename_apply(pending)
            try:
                for fd in pending.sync_after():
                    os.fsync(fd)
            except OSError as exc:
                pending.not_durable(exc)
            self.rename_finish(pending)
        finally:
            self.rename_end(pending)

    def rename_begin(self, request: RenameRequest) -> PendingRename | None:
        """Check a rename and make every object it moves valid at both places (step 1 of
        docs/FORMAT.md section 4); None if there is nothing to do. Then: `sync_before`
        (fsync, any thread), `rename_apply`, `sync_after()` (fsync; failure: `not_durable`),
        `rename_finish`, and always `rename_end`. The kernel holds both parents locked
        for the whole rename."""
        self.counters["moves"] += 1
        pending = self._renames.begin(request)
        if pending is not None:
            self.steps_in_flight += 1
        return pending

    def rename_apply(self, pending: PendingRename) -> None:
        """Step 2: the backing rename; the moved objects' known inodes follow."""
        self._renames.apply(pending)

    def rename_finish(self, pending: PendingRename) -> None:
        """Step 3 (for a directory only if the rename was fsynced: else the caller said
        `pending.not_durable`), then what the rename left to remove (a replaced
        directory, sidecars, a stored target)."""
        self._renames.finish(pending)

    def rename_end(self, pending: PendingRename) -> None:
        self.steps_in_flight -= 1
        self._renames.end(pending)

    def follower(self) -> EntryFollower:
        """What keeps the inodes and listings following a pass that renames backing
        entries behind the engine (an online reencrypt's name pass); such a pass runs only
        while `steps_in_flight` is 0."""
        return EntryFollower(self._inodes)

    # --- file data -------------------------------------------------------------------
    def open(self, ino: int, flags: int, keep_setid: bool = False) -> int:
        """A handle on a regular file. keep_setid: the caller has CAP_FSETID (O_TRUNC)."""
        return self._files.open(self._inodes.get(ino), flags, keep_setid)

    def read(self, fh: int, plain_offset: int, plain_length: int) -> bytes | bytearray:
        return self._files.read(fh, plain_offset, plain_length)

    def write(self, fh: int, plain_offset: int, data: bytes) -> int:
        return self._files.write(fh, plain_offset, data)

    def sync_begin(self, fh: int) -> tuple[Inode, int]:
        """(inode, backing data descriptor) of a handle, for an fsync on a worker thread:
        opened again if it was given back, and kept open until `sync_end`."""
        return self._files.sync_begin(fh)

    def sync_end(self, inode: Inode) -> None:
        self._files.sync_end(inode)

    def fsync(self, fh: int, datasync: bool = False) -> None:
        """fsync (fdatasync) of a handle's file, in one call."""
        inode, fd = self.sync_begin(fh)
        try:
            (os.fdatasync if datasync else os.fsync)(fd)
        finally:
            self.sync_end(inode)

    def release(self, fh: int) -> None:
        self._files.release(fh)

    # --- extended attributes -----------------------------------------------------------
    def setxattr(self, ino: int, plain_name: bytes, value: bytes) -> None:
        self._xattrs.set(self._inodes.get(ino), plain_name, value)

    def getxattr(self, ino: int, plain_name: bytes) -> bytes:
        return self._xattrs.get(self._inodes.get(ino), plain_name)

    def listxattr(self, ino: int) -> list[bytes]:
        return self._xattrs.list(self._inodes.get(ino))

    def removexattr(self, ino: int, plain_name: bytes) -> None:
        self._xattrs.remove(self._inodes.get(ino), plain_name)

    # --- directories -----------------------------------------------------------------
    def opendir(self, ino: int) -> int:
        inode = self._inodes.directory(ino)
        if self.bound_names:
            self._names.dir_id(inode)  # a directory bound to another place is not opened (EIO)
        inode.fd  # noqa: B018 (an open directory keeps its handle: fsyncdir's thread uses it)
        inode.opens += 1
        self._inodes.settle(inode)
        fh = self._inodes.new_handle()
        self._inodes.dirs[fh] = DirHandle(inode)
        return fh

    def readdir(self, fh: int, start: int) -> Iterator[tuple[bytes, str | None, int]]:
        """Entries from index `start`: (plain name, backing name or None for . and ..).

        A generator: the kernel asks for a large directory in many small batches, each
        from a later `start`, and stops consuming when its buffer is full, so building
        the whole remainder on every call would make a listing quadratic.
        """
        handle = self._inodes.dir_handle(fh)
        if start == 0 or handle.entries is None:
            handle.entries = self._names.listing(handle.inode)
        return handle.entries_from(start)

    def readdir_attr(self, dir_fh: int, plain_name: bytes, backing_name: str | None) -> Attr:
        """Attributes of a listed entry, registering its inode (lookup count unchanged)."""
        inodes = self._inodes
        directory = inodes.dirs[dir_fh].inode
        if backing_name is None:
            if plain_name == b"." or directory.ino == ROOT_INODE:
                return self._attr(directory, os.fstat(directory.fd))
            fd = backing.open_path("..", directory.fd)
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            return self._attr(Inode(inodes.fuse_ino(st.st_ino), -1, st.st_mode), st)
        # No handle is opened: the known inode of that number is this object (removed
        # ones keep a handle, so a number cannot have been reused), and a new one opens
        # its handle by name on first use.
        inode, st = inodes.register_at(directory, backing_name)
        self._names.place(inode, self._names.location(directory, plain_name))
        return self._attr(inode, st)

    def releasedir(self, fh: int) -> None:
        handle = self._inodes.dirs.pop(fh, None)
        if handle is not None:
            inode = handle.inode
            inode.opens -= 1
            self._inodes.drop(inode)
            if inode.opens == 0 and self._inodes.inodes.get(inode.ino) is inode:
                self._inodes.settle(inode)  # its handle may be evicted again

    def fsyncdir_begin(self, fh: int) -> tuple[Inode, int]:
        """(inode, backing directory handle) of an open directory, for an fsync on a
        worker thread: held (never evicted) until `sync_end`."""
        inode = self._inodes.dir_handle(fh).inode
        self._inodes.hold(inode)
        return inode, inode.fd

    def scan_directory(self, ino: int) -> list[ScanEntry]:
        """Every backing entry of a directory, for fsck: (backing name, kind, plain name
        or None, error or None); kind is 'short', 'long' or 'reserved'."""
        return self._names.scan(self._inodes.directory(ino))

    def directory_fd(self, ino: int) -> int:
        """The backing directory handle of a directory inode (for fsck repairs)."""
        return self._inodes.directory(ino).fd

    # --- filesystem ------------------------------------------------------------------
    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self._root_fd)
