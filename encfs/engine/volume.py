"""The volume engine: the plaintext filesystem API over the backing store (layer L4).

Usable without FUSE: methods take FUSE-style inode numbers and plaintext names (bytes)
and raise OSError (with errno) or IntegrityError; the FUSE adapter translates those.
Metadata (mode, owner, times, link count) lives in the backing inodes themselves; sizes
are derived from ciphertext sizes arithmetically, so stat never decrypts anything.

Lookup counts follow pyfuse3: lookup/create/mkdir/symlink/mknod/link and every accepted
readdirplus entry add one, forget subtracts, and an inode's backing handle is released
only when its lookup count and open count both reach zero.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from encfs import backing, config_store, crypto
from encfs.audit import AuditLog
from encfs.engine.contents import FileContents
from encfs.errors import (
    IntegrityError,
    UsageError,
    VolumeExists,
)
from encfs.format import FEATURE_BOUND_NAMES, FEATURE_LONG_SYMLINKS, places
from encfs.format import names as fnames
from encfs.format.blocks import (
    BINDING_SIZE,
    HEADER_FLAG_UNBOUND,
    HEADER_SIZE,
    FileHeader,
    Layout,
    binding_message,
)
from encfs.format.places import DirRecord, LinkRecord
from encfs.format.volume import (
    VolumeConfig,
)
from encfs.keyring import Keyring
from encfs.keys.provider import KeyProvider
from encfs.trust import Operator

log = logging.getLogger(__name__)

ROOT_INODE = 1
_ZERO_TAG = bytes(BINDING_SIZE)
UNBOUND_LABEL = b"EGWF unbound"
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


class BindingError(IntegrityError):
    """An object is bound to another place than the one it was reached by (its
    ciphertext, id record or target was moved, swapped or copied in the backing store)."""


class Inode:
    """A backing object known to the kernel (lookups > 0) or open (opens > 0)."""

    __slots__ = (
        "bad_place",
        "contents",
        "data_fd",
        "dir_id",
        "fd",
        "ino",
        "location",
        "lookups",
        "mode",
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

    @property
    def is_dir(self) -> bool:
        return self.mode == stat.S_IFDIR


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


@dataclass(eq=False)
class _Move:
    """One object moved by a backing rename, and how its binding follows it."""

    st: os.stat_result  # the object, before the rename
    parent: Inode  # where it is before the rename
    backing_name: str
    old_location: tuple[bytes, bytes]
    new_parent: Inode  # where it goes
    new_backing: str
    new_location: tuple[bytes, bytes]
    final: bool = True  # step 3 wanted (not for a directory about to be removed)
    fd: int | None = None  # file: O_PATH handle; directory: its id record, O_RDWR
    record: DirRecord | LinkRecord | None = None  # as it was before the rename
    current: tuple[Inode, str] | None = None  # where its backing object is now


@dataclass(eq=False)
class PendingRename:
    """A rename between its stages (`Volume.rename_begin`)."""

    moves: list[_Move]
    rename: Callable[[], None]
    clean_up: Callable[[], None] | None = None
    renamed: bool = False

    @property
    def sync_before(self) -> list[int]:
        """Descriptors to fsync before the backing rename: the id records of moved
        directories (a power loss must not keep the rename and lose their new place)."""
        return [m.fd for m in self.moves if isinstance(m.record, DirRecord) and m.fd is not None]

    def sync_after(self) -> list[int]:
        """Descriptors to fsync after it (the parents, when a directory moved), so that
        step 3 never outlives the rename. A parent the daemon cannot read is an O_PATH
        handle, whose fsync fails: the caller then skips step 3 for directories."""
        if not self.sync_before:
            return []
        parents = {}
        for move in self.moves:
            parents[move.parent.ino] = move.parent.fd
            parents[move.new_parent.ino] = move.new_parent.fd
        return list(parents.values())


class DirHandle:
    __slots__ = ("entries", "inode")

    def __init__(self, inode: Inode) -> None:
        self.inode = inode
        self.entries: list[tuple[bytes, str]] | None = None  # (plain name, backing name)


def _oserror(code: int, what: str = "") -> OSError:
    return OSError(code, os.strerror(code) + (f": {what}" if what else ""))


def _temp_name() -> str:
    """A temporary backing entry: a reserved name, never listed or looked up."""
    return backing.temp_name(fnames.TEMP_PREFIX)


def _write_atomic(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    backing.write_file_atomic(dir_fd, name, data, mode, temp_prefix=fnames.TEMP_PREFIX)


# --- creating and opening volumes ---------------------------------------------------------


def _entries_from(
    entries: list[tuple[bytes, str | None]], start: int
) -> Iterator[tuple[bytes, str | None, int]]:
    for index in range(start, len(entries)):
        plain, backing_name = entries[index]
        yield plain, backing_name, index + 1


def create_volume(
    backing_path: str,
    provider: KeyProvider,
    block_size: int,
    operator: Operator,
) -> VolumeConfig:
    """Make a new volume in an empty (or new) directory; the directory is made 0700.

    The provider's options go to the operator's trust store (never into the backing
    directory), with the volume key's check value and the first config generation.
    """
    try:
        Layout(block_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    made_directory = False
    if os.path.lexists(backing_path):
        if not os.path.isdir(backing_path):
            raise UsageError(f"{backing_path} exists and is not a directory")
        if os.path.exists(os.path.join(backing_path, fnames.CONFIG_FILE)):
            raise VolumeExists(f"{backing_path} already holds an encfs-gw volume")
        if os.listdir(backing_path):
            raise UsageError(f"{backing_path} is not empty; a volume needs an empty directory")
    provider.prepare_new()  # may refuse (an existing key file): before anything is made
    try:
        try:
            if not os.path.lexists(backing_path):
                os.makedirs(backing_path, mode=0o700)
                made_directory = True
            os.chmod(backing_path, 0o700)
        except OSError as exc:  # e.g. under /proc, on a read-only filesystem
            raise UsageError(
                f"cannot create the volume in {backing_path}: {exc.strerror}"
            ) from None
        try:
            return _write_new_volume(backing_path, provider, block_size, operator)
        except OSError as exc:
            raise UsageError(f"cannot write the volume in {backing_path}: {exc.strerror}") from None
    except BaseException:
        # A failed init leaves nothing behind: not the directory, not the key file.
        if made_directory:
            shutil.rmtree(backing_path, ignore_errors=True)
        else:
            for name in (fnames.CONFIG_FILE, fnames.DIR_ID_FILE):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(backing_path, name))
        provider.discard_new()
        raise


def _write_new_volume(
    backing_path: str, provider: KeyProvider, block_size: int, operator: Operator
) -> VolumeConfig:
    config, keyring = config_store.new_config(provider, block_size)
    (protector,) = config.kek_versions[1].protectors
    operator.resolve_new(backing_path)
    operator.vouch(protector.id, provider.name, provider.options)
    # The operator's record first: a volume whose trust entry could not be written would
    # need --keyfile at every mount, so it is not made at all.
    operator.accept(config, keyring.volume_key_check())
    try:
        dir_fd = os.open(
            backing_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        )
        try:
            _write_atomic(dir_fd, fnames.DIR_ID_FILE, root_dir_record(config, keyring), 0o400)
        finally:
            os.close(dir_fd)
        config_store.write_new(backing_path, config, keyring)
    except BaseException:
        operator.forget(config.volume_id.hex())
        raise
    finally:
        keyring.close()
    return config


def root_dir_record(config: VolumeConfig, keyring: Keyring) -> bytes:
    """The root's `.egw-dirid` of a new volume: a random id, bound to the volume when
    the volume binds directories to their place (FORMAT.md 5.1)."""
    dir_id = crypto.random_key(places.DIR_ID_SIZE)
    if FEATURE_BOUND_NAMES not in config.features:
        return dir_id
    tag = keyring.binding_tag(places.root_binding_message(config.volume_id, dir_id))
    return DirRecord(dir_id, (tag, places.ZERO_BINDING)).pack()


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
        # Directories and symlink targets bound to their place (docs/FORMAT.md 5.1, 5.3);
        # volumes made before the feature keep their unbound formats.
        self.bound_names = FEATURE_BOUND_NAMES in config.features
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
        st = os.fstat(self._root_fd)
        self._root_dev = st.st_dev
        self._root_backing_ino = st.st_ino
        root = Inode(ROOT_INODE, os.dup(self._root_fd), st.st_mode)
        root.lookups = 1  # the kernel's reference to the root is never forgotten
        self._inodes: dict[int, Inode] = {ROOT_INODE: root}
        self._handles: dict[int, Inode] = {}
        self._dir_handles: dict[int, DirHandle] = {}
        self._next_fh = 1
        self._closer: backing.DeferredCloser | None = None
        self._close_fd: Callable[[int], None] = os.close
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

    @classmethod
    def unlock(
        cls,
        backing_path: str,
        operator: Operator,
        audit: AuditLog | None = None,
    ) -> Volume:
        """Open a volume with the key providers the operator vouched for (the command
        line's, then the trust store's): config authenticated before anything is used."""
        crypto.self_test()
        config, keyring = config_store.unlock(backing_path, operator, audit)
        volume = cls(backing_path, config, keyring, operator)
        if audit is not None:
            volume.audit = audit
        return volume

    def defer_closes(self) -> None:
        """Close the descriptors of forgotten inodes on a worker thread (the daemon: the
        last close of an unlinked file is where the backing filesystem deletes it)."""
        if self._closer is None:
            self._closer = backing.DeferredCloser()
            self._close_fd = self._closer.close

    def settle_closes(self) -> bool:
        """Finish the deferred closes (their files' space comes back); False if there
        were none, so an operation that ran out of space has no reason to retry."""
        return self._closer is not None and self._closer.settle()

    def close(self) -> None:
        """Forget everything and release every descriptor (after unmount). Idempotent."""
        if self._lock_fd < 0:
            return
        for inode in list(self._inodes.values()):
            self._drop(inode, force=True)
        self._inodes.clear()
        self._handles.clear()
        self._dir_handles.clear()
        if self._closer is not None:
            self._closer.stop()  # every queued close done before the lock is released
            self._closer = None
            self._close_fd = os.close
        for fd in (self._root_fd, self._lock_fd):
            os.close(fd)
        self._root_fd = self._lock_fd = -1
        self.keyring.close()  # zeroed before the process goes on (or exits)

    def sync(self) -> None:
        backing.syncfs(self._root_fd)

    @property
    def root_fd(self) -> int:
        """The backing root directory (for whole-volume passes: rotation, census)."""
        return self._root_fd

    # --- inode table -----------------------------------------------------------------
    def _fuse_ino(self, backing_ino: int) -> int:
        # Swap the backing root's number with 1 so the root is ROOT_INODE and no other
        # object can collide with it; every other number is the backing one (stable).
        if backing_ino == self._root_backing_ino:
            return ROOT_INODE
        if backing_ino == ROOT_INODE:
            return self._root_backing_ino
        return backing_ino

    def inode(self, ino: int) -> Inode:
        try:
            return self._inodes[ino]
        except KeyError:
            raise _oserror(errno.ESTALE, f"inode {ino}") from None

    def _register(self, fd: int) -> tuple[Inode, os.stat_result]:
        """Adopt an O_PATH handle: reuse the known inode (closing fd) or make a new one."""
        st = os.fstat(fd)
        if st.st_dev != self._root_dev:
            os.close(fd)
            raise _oserror(errno.EXDEV, "backing entry on another filesystem")
        ino = self._fuse_ino(st.st_ino)
        known = self._inodes.get(ino)
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
        self._inodes[ino] = inode
        return inode, st

    def _drop(self, inode: Inode, force: bool = False) -> None:
        if not force and (inode.lookups > 0 or inode.opens > 0 or inode.ino == ROOT_INODE):
            return
        if inode.data_fd is not None:
            self._close_fd(inode.data_fd)
            inode.data_fd = None
            inode.contents = None
        self._close_fd(inode.fd)
        for fd in inode.pinned or ():
            self._close_fd(fd)
        inode.pinned = None
        self._inodes.pop(inode.ino, None)

    def known_inodes(self) -> list[int]:
        """Inode numbers the kernel may hold cached data or attributes for."""
        return list(self._inodes)

    def forget(self, ino: int, count: int) -> None:
        inode = self._inodes.get(ino)
        if inode is None:
            return
        inode.lookups -= count
        if inode.lookups <= 0:
            inode.lookups = 0
            self._drop(inode)

    def add_lookup(self, ino: int) -> None:
        self.inode(ino).lookups += 1

    def drop_if_unused(self, ino: int) -> None:
        inode = self._inodes.get(ino)
        if inode is not None:
            self._drop(inode)

    # --- attributes ------------------------------------------------------------------
    def _attr(self, inode: Inode, st: os.stat_result) -> Attr:
        if stat.S_ISREG(st.st_mode):
            size = self.layout.plain_size(st.st_size)
        elif stat.S_ISLNK(st.st_mode):
            size = self._symlink_size(inode, st)
        else:
            size = st.st_size
        return Attr(
            ino=inode.ino,
            mode=st.st_mode,
            nlink=st.st_nlink,
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
        inode = self.inode(ino)
        fd = inode.data_fd if inode.data_fd is not None else inode.fd
        return self._attr(inode, os.fstat(fd))

    # --- names -----------------------------------------------------------------------
    def _dir_id(self, directory: Inode) -> bytes:
        """The id of a directory (read once), verified against the place it was reached
        by on a bound volume: nothing inside a directory moved, swapped or given another
        directory's id record in the backing store is listed or looked up."""
        if directory.dir_id is None:
            if directory.bad_place is not None:
                raise BindingError(directory.bad_place)
            try:
                raw = backing.read_small_file(directory.fd, fnames.DIR_ID_FILE, 64)
            except FileNotFoundError:
                raise IntegrityError(
                    f"directory inode {directory.ino} has no directory id"
                ) from None
            if not self.bound_names:
                if len(raw) != fnames.DIR_ID_SIZE:
                    raise IntegrityError(
                        f"directory inode {directory.ino} has a bad directory id"
                    )
                directory.dir_id = raw
                return raw
            try:
                record = DirRecord.unpack(raw)
            except IntegrityError as exc:
                raise IntegrityError(f"directory inode {directory.ino}: {exc}") from None
            problem = self._dir_place_problem(directory, record)
            if problem is not None:
                directory.bad_place = f"directory inode {directory.ino}: {problem}"
                self.counters["integrity_errors"] += 1
                log.warning("integrity failure: %s", directory.bad_place)
                raise BindingError(directory.bad_place)
            directory.dir_id = record.dir_id
        return directory.dir_id

    def _dir_place_problem(self, directory: Inode, record: DirRecord) -> str | None:
        """Why a bound directory's id record does not verify for its place, or None."""
        if directory.ino == ROOT_INODE:
            if crypto.tag_in(self._root_tag(record.dir_id), record.bindings):
                return None
            return "the root's id record is not bound to this volume's root"
        if directory.location is None:
            return "reached without a name: its binding cannot be checked"
        if crypto.tag_in(self._dir_tag(directory.location, record.dir_id), record.bindings):
            return None
        return (
            "its id record is bound to another place "
            "(directory moved, swapped or its .egw-dirid replaced in the backing store)"
        )

    def _dir_tag(self, location: tuple[bytes, bytes], dir_id: bytes) -> bytes:
        parent_id, plain_name = location
        return self.keyring.binding_tag(
            places.dir_binding_message(
                self.config.volume_id, parent_id, fnames.pad_name(plain_name), dir_id
            )
        )

    def _root_tag(self, dir_id: bytes) -> bytes:
        return self.keyring.binding_tag(
            places.root_binding_message(self.config.volume_id, dir_id)
        )

    def _place(self, inode: Inode, location: tuple[bytes, bytes]) -> None:
        """Record the place an inode was reached by. A directory of a bound volume
        reached by another place than the one it was verified for (its backing name was
        changed behind our back) is verified again before its next use."""
        if inode.location != location:
            if self.bound_names and inode.is_dir:
                inode.dir_id = None
                inode.bad_place = None
            inode.location = location

    def _encode(self, directory: Inode, plain_name: bytes) -> tuple[str, str]:
        """(backing name, full encoded name); they differ for long names."""
        memo = self.keyring.name_memo  # raises once the keys are revoked
        dir_id = self._dir_id(directory)
        known = memo.backing.get((dir_id, plain_name))
        if known is not None:
            return known
        try:
            padded = fnames.pad_name(plain_name)
        except IntegrityError:
            raise _oserror(
                errno.ENAMETOOLONG if len(plain_name) > fnames.NAME_MAX else errno.EINVAL
            ) from None
        sealed = self.keyring.name_cipher.seal(padded, fnames.name_aad(dir_id))
        encoded = fnames.b64encode(sealed)
        backing_name = fnames.long_name_stub(encoded) if fnames.is_long(encoded) else encoded
        memo.remember(dir_id, plain_name, backing_name, encoded)
        return backing_name, encoded

    def _decode(self, directory: Inode, backing_name: str) -> bytes | None:
        """Plaintext of a backing entry name; None for reserved entries."""
        return self.plain_name_in(directory.fd, self._dir_id(directory), backing_name)

    def plain_name_in(self, dir_fd: int, dir_id: bytes, backing_name: str) -> bytes | None:
        """Plaintext of a backing entry name in the directory `dir_fd` whose id is
        `dir_id`; None for reserved entries."""
        memo = self.keyring.name_memo  # raises once the keys are revoked
        known = memo.plain.get((dir_id, backing_name))
        if known is not None:
            return known
        kind = fnames.classify(backing_name)
        if kind == "reserved":
            return None
        if kind == "long":
            encoded = backing.read_small_file(
                dir_fd, fnames.sidecar_name(backing_name), 4096
            ).decode("ascii", "replace")
            if fnames.long_name_stub(encoded) != backing_name:
                raise IntegrityError("long-name sidecar does not match its entry")
        else:
            encoded = backing_name
        sealed = fnames.b64decode_strict(encoded)
        padded = self.keyring.name_cipher.open(sealed, fnames.name_aad(dir_id))
        plain_name = fnames.unpad_name(padded)
        memo.remember(dir_id, plain_name, backing_name, encoded)
        return plain_name

    def _write_sidecar(self, directory: Inode, backing_name: str, encoded: str) -> None:
        if backing_name != encoded:
            _write_atomic(
                directory.fd, fnames.sidecar_name(backing_name), encoded.encode(), 0o400
            )

    def _remove_sidecar(self, directory: Inode, backing_name: str) -> None:
        if fnames.classify(backing_name) == "long":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(fnames.sidecar_name(backing_name), dir_fd=directory.fd)

    def _dir(self, ino: int) -> Inode:
        inode = self.inode(ino)
        if not inode.is_dir:
            raise _oserror(errno.ENOTDIR)
        return inode

    # --- lookup ----------------------------------------------------------------------
    def _child(self, parent: Inode, plain_name: bytes) -> tuple[Inode, os.stat_result]:
        backing_name, _ = self._encode(parent, plain_name)
        inode, st = self._register(backing.open_path(backing_name, parent.fd))
        self._place(inode, (self._dir_id(parent), plain_name))
        return inode, st

    def lookup(self, parent_ino: int, plain_name: bytes) -> Attr:
        parent = self._dir(parent_ino)
        if plain_name == b".":
            inode, st = parent, os.fstat(parent.fd)
        elif plain_name == b"..":
            inode, st = (
                self._register(backing.open_path("..", parent.fd))
                if (parent.ino != ROOT_INODE)
                else (parent, os.fstat(parent.fd))
            )
        else:
            inode, st = self._child(parent, plain_name)
        inode.lookups += 1
        return self._attr(inode, st)

    # --- creating entries ------------------------------------------------------------
    def _owner(self, parent: Inode, uid: int, gid: int) -> tuple[int, int]:
        parent_st = os.fstat(parent.fd)
        if parent_st.st_mode & stat.S_ISGID:
            gid = parent_st.st_gid
        return uid, gid

    def _adopt_new(
        self, parent: Inode, backing_name: str, plain_name: bytes, uid: int, gid: int
    ) -> Inode:
        inode, st = self._register(backing.open_path(backing_name, parent.fd))
        self._place(inode, (self._dir_id(parent), plain_name))
        owner = self._owner(parent, uid, gid)
        if os.geteuid() == 0 and (st.st_uid, st.st_gid) != owner:
            backing.chown_fd(inode.fd, *owner)
            # chown drops setuid/setgid, but the kernel already vetted the creation mode.
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISLNK(st.st_mode):
                backing.chmod_fd(inode.fd, stat.S_IMODE(st.st_mode))
        inode.lookups += 1
        return inode

    def _check_free(self, parent: Inode, backing_name: str) -> None:
        try:
            os.stat(backing_name, dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        raise _oserror(errno.EEXIST)

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
        parent = self._dir(parent_ino)
        backing_name, encoded = self._encode(parent, plain_name)
        self._check_free(parent, backing_name)
        if os.fstat(parent.fd).st_mode & stat.S_ISGID:
            mode |= stat.S_ISGID
        pending = PendingDir(parent, plain_name, backing_name, encoded, _temp_name())
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
            if self.bound_names:
                tag = self._dir_tag((self._dir_id(parent), plain_name), dir_id)
                record = DirRecord(dir_id, (tag, places.ZERO_BINDING)).pack()
            pending.id_fd = os.open(
                fnames.DIR_ID_FILE,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                places.DIR_RECORD_MODE if self.bound_names else 0o400,
                dir_fd=pending.dir_fd,
            )
            backing.pwrite_all(pending.id_fd, record, 0)
            os.chmod(pending.dir_fd, stat.S_IMODE(mode))
        except BaseException:
            self.mkdir_end(pending)
            raise
        return pending

    def mkdir_finish(self, pending: PendingDir, uid: int, gid: int) -> Attr:
        parent = pending.parent
        self._write_sidecar(parent, pending.backing_name, pending.encoded)
        backing.renameat2(
            parent.fd, pending.temp_name, parent.fd, pending.backing_name, backing.RENAME_NOREPLACE
        )
        pending.moved_in = True
        return self.getattr(
            self._adopt_new(parent, pending.backing_name, pending.plain_name, uid, gid).ino
        )

    def mkdir_end(self, pending: PendingDir) -> None:
        for fd in (pending.id_fd, pending.dir_fd):
            if fd is not None:
                os.close(fd)
        pending.id_fd = pending.dir_fd = None
        if not pending.moved_in:
            self._remove_tree(pending.parent.fd, pending.temp_name)

    def create(
        self, parent_ino: int, plain_name: bytes, mode: int, flags: int, uid: int, gid: int
    ) -> tuple[int, Attr]:
        parent = self._dir(parent_ino)
        backing_name, encoded = self._encode(parent, plain_name)
        self._write_sidecar(parent, backing_name, encoded)
        fd = os.open(
            backing_name,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            stat.S_IMODE(mode),
            dir_fd=parent.fd,
        )
        header = self._new_header((self._dir_id(parent), plain_name))
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
            inode.data_fd = fd
            inode.contents = self._contents(fd, header.file_id)
        else:
            os.close(fd)
        fh = self.open(inode.ino, flags & ~os.O_TRUNC)
        return fh, self.getattr(inode.ino)

    def mknod(
        self, parent_ino: int, plain_name: bytes, mode: int, rdev: int, uid: int, gid: int
    ) -> Attr:
        parent = self._dir(parent_ino)
        if stat.S_ISREG(mode):
            fh, _ = self.create(parent_ino, plain_name, mode, os.O_RDWR, uid, gid)
            ino = self._handles[fh].ino
            self.release(fh)
            return self.getattr(ino)
        backing_name, encoded = self._encode(parent, plain_name)
        self._write_sidecar(parent, backing_name, encoded)
        os.mknod(backing_name, mode, rdev, dir_fd=parent.fd)
        return self.getattr(self._adopt_new(parent, backing_name, plain_name, uid, gid).ino)

    def symlink(
        self, parent_ino: int, plain_name: bytes, target: bytes, uid: int, gid: int
    ) -> Attr:
        parent = self._dir(parent_ino)
        if not target or len(target) > fnames.SYMLINK_TARGET_MAX or b"\0" in target:
            raise _oserror(errno.ENAMETOOLONG if target else errno.ENOENT)
        backing_name, encoded = self._encode(parent, plain_name)
        self._check_free(parent, backing_name)
        long_id = None
        if self.bound_names:
            record = self._new_link_record((self._dir_id(parent), plain_name), target)
            long_id = record.link_id if record.stored else None
            cipher_target = record.encode()
        elif fnames.symlink_fits_inline(len(target)):
            cipher_target = fnames.b64encode(
                self.keyring.symlink_cipher.seal(target, fnames.symlink_aad())
            )
        elif FEATURE_LONG_SYMLINKS in self.config.features:
            long_id = self._store_long_target(target)
            cipher_target = fnames.long_symlink_marker(long_id)
        else:
            raise _oserror(errno.ENAMETOOLONG, "this volume's format keeps targets <= 3055 bytes")
        try:
            self._write_sidecar(parent, backing_name, encoded)
            os.symlink(cipher_target, backing_name, dir_fd=parent.fd)
        except BaseException:
            if long_id is not None:
                self._remove_long_target(long_id)
            raise
        return self.getattr(self._adopt_new(parent, backing_name, plain_name, uid, gid).ino)

    def readlink(self, ino: int) -> bytes:
        inode = self.inode(ino)
        if inode.mode != stat.S_IFLNK:
            raise _oserror(errno.EINVAL)
        cipher_target = os.readlink("", dir_fd=inode.fd)
        if self.bound_names:
            try:
                record = LinkRecord.decode(cipher_target)
                self._check_link_place(inode, record)
                return self._open_link_target(record)
            except IntegrityError as exc:
                self._report_integrity(inode, exc)
                raise
        long_id = fnames.long_symlink_id(cipher_target)
        if long_id is not None:
            return self._load_long_target(long_id)
        return self.keyring.symlink_cipher.open(
            fnames.b64decode_strict(cipher_target), fnames.symlink_aad()
        )

    # Bound symlinks (docs/FORMAT.md 5.3): the backing target holds a random link id, two
    # place bindings and the target sealed under the link id (or, when too long, the
    # target sealed into the store file named by the link id). A backing symlink cannot
    # be changed, so a rename makes new ones (`_rebind_link`).
    def _link_tag(self, location: tuple[bytes, bytes], record: LinkRecord) -> bytes:
        dir_id, plain_name = location
        return self.keyring.binding_tag(
            places.symlink_binding_message(
                self.config.volume_id,
                dir_id,
                fnames.pad_name(plain_name),
                record.flags,
                record.link_id,
            )
        )

    def _new_link_record(self, location: tuple[bytes, bytes], target: bytes) -> LinkRecord:
        """A new bound symlink target for `location` (storing a long target first)."""
        link_id = crypto.random_bytes(places.LINK_ID_SIZE)
        sealed = self.keyring.symlink_cipher.seal(target, places.link_aad(link_id))
        unbound = places.ZERO_BINDING, places.ZERO_BINDING
        if places.bound_target_fits_inline(len(target)):
            record = LinkRecord(0, link_id, unbound, sealed)
        else:
            self._store_long_target(target, link_id)
            record = LinkRecord(places.LINK_FLAG_STORED, link_id, unbound, b"")
        return dataclasses.replace(
            record, bindings=(self._link_tag(location, record), places.ZERO_BINDING)
        )

    def _check_link_place(self, inode: Inode, record: LinkRecord) -> None:
        if inode.location is None:
            raise BindingError(f"symlink inode {inode.ino} reached without a name")
        if not crypto.tag_in(self._link_tag(inode.location, record), record.bindings):
            raise BindingError(
                f"symlink inode {inode.ino}: its target is bound to another place "
                "(symlink target moved, swapped or copied in the backing store)"
            )

    def _open_link_target(self, record: LinkRecord) -> bytes:
        if record.stored:
            return self._load_long_target(record.link_id)
        return self.keyring.symlink_cipher.open(record.sealed, places.link_aad(record.link_id))

    # Targets too long for a backing symlink: sealed into the symlink store (one file per
    # symlink, named by a random id; hard links of the symlink share it). Written before
    # the symlink, removed after its last link: a crash leaves at worst an unused file.
    def _store_long_target(self, target: bytes, long_id: bytes | None = None) -> bytes:
        if long_id is None:
            long_id = crypto.random_bytes(fnames.LONG_SYMLINK_ID_SIZE)
        sealed = self.keyring.symlink_cipher.seal(target, fnames.long_symlink_aad(long_id))
        with contextlib.suppress(FileExistsError):
            os.mkdir(fnames.SYMLINK_STORE_DIR, 0o700, dir_fd=self._root_fd)
        store_fd = os.open(
            fnames.SYMLINK_STORE_DIR,
            os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
            dir_fd=self._root_fd,
        )
        try:
            name = fnames.long_symlink_path(long_id).rsplit("/", 1)[1]
            _write_atomic(store_fd, name, sealed, 0o400)
        finally:
            os.close(store_fd)
        return long_id

    def _load_long_target(self, long_id: bytes) -> bytes:
        try:
            sealed = backing.read_small_file(
                self._root_fd, fnames.long_symlink_path(long_id), 2 * fnames.SYMLINK_TARGET_MAX
            )
        except FileNotFoundError:
            raise IntegrityError("symlink target missing from the symlink store") from None
        return self.keyring.symlink_cipher.open(sealed, fnames.long_symlink_aad(long_id))

    def _remove_long_target(self, long_id: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fnames.long_symlink_path(long_id), dir_fd=self._root_fd)

    def _stored_target_id(self, cipher_target: str) -> bytes | None:
        """The store id a backing symlink target names, if its target is stored."""
        if self.bound_names:
            if len(cipher_target) != places.STORED_LINK_LENGTH:
                return None
            record = LinkRecord.decode(cipher_target)
            return record.link_id if record.stored else None
        return fnames.long_symlink_id(cipher_target)

    def _last_long_symlink(
        self, dir_fd: int, backing_name: str, st: os.stat_result
    ) -> bytes | None:
        """The store id of a long-target symlink whose last link `backing_name` is."""
        if not stat.S_ISLNK(st.st_mode) or st.st_nlink != 1:
            return None
        if st.st_size not in (fnames.LONG_SYMLINK_MARKER_SIZE, places.STORED_LINK_LENGTH):
            return None
        try:
            return self._stored_target_id(os.readlink(backing_name, dir_fd=dir_fd))
        except (OSError, IntegrityError):
            return None

    def _symlink_size(self, inode: Inode, st: os.stat_result) -> int:
        if self.bound_names:
            if st.st_size != places.STORED_LINK_LENGTH:
                return places.bound_inline_target_size(st.st_size)
        elif st.st_size != fnames.LONG_SYMLINK_MARKER_SIZE:
            # base64url without padding: the sealed length, then minus the SIV tag (exact).
            return max(0, st.st_size * 3 // 4 - fnames.SIV_TAG_SIZE)
        try:
            long_id = self._stored_target_id(os.readlink("", dir_fd=inode.fd))
            if long_id is not None:
                path = fnames.long_symlink_path(long_id)
                sealed_size = os.stat(path, dir_fd=self._root_fd).st_size
                return max(0, sealed_size - fnames.SIV_TAG_SIZE)
        except (OSError, IntegrityError):
            return 0  # readlink reports the damage
        return max(0, st.st_size * 3 // 4 - fnames.SIV_TAG_SIZE)

    def link(self, ino: int, new_parent_ino: int, new_name: bytes) -> Attr:
        self.counters["moves"] += 1
        inode = self.inode(ino)
        if inode.is_dir:
            raise _oserror(errno.EPERM)
        parent = self._dir(new_parent_ino)
        if self.bound_names and inode.mode == stat.S_IFLNK:
            return self._copy_symlink(inode, parent, new_name)
        backing_name, encoded = self._encode(parent, new_name)
        self._check_free(parent, backing_name)
        self._write_sidecar(parent, backing_name, encoded)
        if inode.mode == stat.S_IFREG:
            # A hard-linked file has several names: it stops being bound to one.
            self._rewrite_header(inode.fd, self._unbind)
        backing.link_fd(inode.fd, parent.fd, backing_name)
        inode.lookups += 1
        return self.getattr(ino)

    def _copy_symlink(self, inode: Inode, parent: Inode, new_name: bytes) -> Attr:
        """link(2) of a symlink on a bound volume: a second symlink with the same target,
        owner and times, bound to its own name (its own inode: a target bound to one
        place cannot be shared by two names, and an unbound one could be moved anywhere)."""
        target = self.readlink(inode.ino)
        st = os.fstat(inode.fd)
        attr = self.symlink(parent.ino, new_name, target, st.st_uid, st.st_gid)
        backing.utimens_fd(self.inode(attr.ino).fd, st.st_atime_ns, st.st_mtime_ns)
        return self.getattr(attr.ino)

    # --- removing and renaming -------------------------------------------------------
    def unlink(self, parent_ino: int, plain_name: bytes) -> None:
        parent = self._dir(parent_ino)
        backing_name, _ = self._encode(parent, plain_name)
        st = os.stat(backing_name, dir_fd=parent.fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            raise _oserror(errno.EISDIR)
        long_id = self._last_long_symlink(parent.fd, backing_name, st)
        os.unlink(backing_name, dir_fd=parent.fd)
        self._remove_sidecar(parent, backing_name)
        if long_id is not None:
            self._remove_long_target(long_id)

    def _is_empty_dir(self, dir_fd: int, name: str) -> bool:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            return all(
                fnames.classify(n) == "reserved" and not n.startswith(fnames.LONG_NAME_PREFIX)
                for n in os.listdir(fd)
            )
        finally:
            os.close(fd)

    def _remove_tree(self, dir_fd: int, name: str) -> None:
        """Remove a backing directory holding only reserved entries (ids, temp files)."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
        except FileNotFoundError:
            return
        try:
            for entry in os.listdir(fd):
                os.unlink(entry, dir_fd=fd)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=dir_fd)

    def rmdir(self, parent_ino: int, plain_name: bytes) -> None:
        parent = self._dir(parent_ino)
        backing_name, _ = self._encode(parent, plain_name)
        st = os.stat(backing_name, dir_fd=parent.fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            raise _oserror(errno.ENOTDIR)
        if not self._is_empty_dir(parent.fd, backing_name):
            raise _oserror(errno.ENOTEMPTY)
        # Move it out of sight first so a crash leaves a temp entry, never a dir without id.
        tmp = _temp_name()
        backing.renameat2(parent.fd, backing_name, parent.fd, tmp, backing.RENAME_NOREPLACE)
        self._remove_sidecar(parent, backing_name)
        self._remove_tree(parent.fd, tmp)

    def rename(
        self,
        old_parent_ino: int,
        old_name: bytes,
        new_parent_ino: int,
        new_name: bytes,
        flags: int = 0,
    ) -> None:
        """A rename in one call (the FUSE adapter runs the same stages, with the fsyncs
        of a directory's rename off the request loop)."""
        pending = self.rename_begin(old_parent_ino, old_name, new_parent_ino, new_name, flags)
        if pending is None:
            return
        try:
            for fd in pending.sync_before:
                os.fsync(fd)
            self.rename_apply(pending)
            durable = True
            try:
                for fd in pending.sync_after():
                    os.fsync(fd)
            except OSError as exc:
                log.debug("cannot make a directory rename durable: %s", exc)
                durable = False
            self.rename_finish(pending, durable)
        finally:
            self.rename_end(pending)

    def rename_begin(
        self,
        old_parent_ino: int,
        old_name: bytes,
        new_parent_ino: int,
        new_name: bytes,
        flags: int = 0,
    ) -> PendingRename | None:
        """Check a rename and make every object it moves valid at both places (step 1 of
        docs/FORMAT.md section 4); None if there is nothing to do. Then: `sync_before`
        (fsync, any thread), `rename_apply`, `sync_after()` (fsync; failure: not durable),
        `rename_finish`, and always `rename_end`. The kernel holds both parents locked
        for the whole rename."""
        self.counters["moves"] += 1
        old_parent = self._dir(old_parent_ino)
        new_parent = self._dir(new_parent_ino)
        old_backing, old_encoded = self._encode(old_parent, old_name)
        new_backing, new_encoded = self._encode(new_parent, new_name)
        old_st = os.stat(old_backing, dir_fd=old_parent.fd, follow_symlinks=False)
        try:
            new_st = os.stat(new_backing, dir_fd=new_parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            new_st = None
        old_location = (self._dir_id(old_parent), old_name)
        new_location = (self._dir_id(new_parent), new_name)
        forth = _Move(old_st, old_parent, old_backing, old_location, new_parent, new_backing,
                      new_location)

        def exchange() -> None:
            backing.renameat2(
                old_parent.fd, old_backing, new_parent.fd, new_backing, backing.RENAME_EXCHANGE
            )

        if flags & backing.RENAME_EXCHANGE:
            if new_st is None:
                raise _oserror(errno.ENOENT)
            self._write_sidecar(new_parent, new_backing, new_encoded)
            self._write_sidecar(old_parent, old_backing, old_encoded)
            back = _Move(new_st, new_parent, new_backing, new_location, old_parent, old_backing,
                         old_location)
            return self._prepare([forth, back], exchange)
        if new_st is not None:
            if flags & backing.RENAME_NOREPLACE:
                raise _oserror(errno.EEXIST)
            if old_st.st_ino == new_st.st_ino:
                return None  # same object (hard links to one file): POSIX says do nothing
            if stat.S_ISDIR(new_st.st_mode):
                if not stat.S_ISDIR(old_st.st_mode):
                    raise _oserror(errno.EISDIR)
                if not self._is_empty_dir(new_parent.fd, new_backing):
                    raise _oserror(errno.ENOTEMPTY)
                # Swap atomically (the replaced directory bound to the old place for that
                # instant), then remove the (empty) directory that was replaced.
                back = _Move(new_st, new_parent, new_backing, new_location, old_parent,
                             old_backing, old_location, final=False)

                def remove_replaced() -> None:
                    tmp = _temp_name()
                    backing.renameat2(
                        old_parent.fd, old_backing, old_parent.fd, tmp, backing.RENAME_NOREPLACE
                    )
                    self._remove_sidecar(old_parent, old_backing)
                    self._remove_tree(old_parent.fd, tmp)

                return self._prepare([forth, back], exchange, remove_replaced)
            if stat.S_ISDIR(old_st.st_mode):
                raise _oserror(errno.ENOTDIR)
        replaced_long_id = (
            None if new_st is None else self._last_long_symlink(new_parent.fd, new_backing, new_st)
        )
        self._write_sidecar(new_parent, new_backing, new_encoded)

        def rename() -> None:
            with self._replaced(new_parent, new_backing) if new_st else contextlib.nullcontext():
                os.rename(
                    old_backing, new_backing, src_dir_fd=old_parent.fd, dst_dir_fd=new_parent.fd
                )

        def clean_up() -> None:
            if (old_parent.ino, old_backing) != (new_parent.ino, new_backing):
                self._remove_sidecar(old_parent, old_backing)
            if replaced_long_id is not None:
                self._remove_long_target(replaced_long_id)

        return self._prepare([forth], rename, clean_up)

    def _prepare(
        self,
        moves: list[_Move],
        rename: Callable[[], None],
        clean_up: Callable[[], None] | None = None,
    ) -> PendingRename:
        pending = PendingRename(moves, rename, clean_up)
        try:
            for move in moves:
                self._bind_both(move)
                self._follow_link(move)
        except BaseException:
            self.rename_end(pending)
            raise
        return pending

    def rename_apply(self, pending: PendingRename) -> None:
        """Step 2: the backing rename; the moved objects' known inodes follow."""
        pending.rename()
        pending.renamed = True
        for move in pending.moves:
            move.current = move.new_parent, move.new_backing
            moved = self._inodes.get(self._fuse_ino(move.st.st_ino))
            if moved is not None:
                moved.location = move.new_location

    def rename_finish(self, pending: PendingRename, durable: bool) -> None:
        """Step 3 (for a directory only if `durable`: the rename was fsynced), then what
        the rename left to remove (a replaced directory, sidecars, a stored target)."""
        for move in pending.moves:
            if move.final:
                self._bind_new(move, durable)
                self._follow_link(move)
        if pending.clean_up is not None:
            pending.clean_up()

    def rename_end(self, pending: PendingRename) -> None:
        for move in pending.moves:
            if move.fd is not None:
                os.close(move.fd)
                move.fd = None

    def _bind_both(self, move: _Move) -> None:
        """Step 1: make the object valid at its old and its new place."""
        kind = stat.S_IFMT(move.st.st_mode)
        if kind == stat.S_IFREG and move.st.st_nlink == 1:
            move.fd = backing.open_path(move.backing_name, move.parent.fd)
            self._rewrite_header(move.fd, lambda header: self._header_both(header, move))
        elif kind == stat.S_IFDIR and self.bound_names:
            dir_fd = backing.open_path(move.backing_name, move.parent.fd)
            try:
                move.fd = os.open(
                    fnames.DIR_ID_FILE, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
                )
            finally:
                os.close(dir_fd)
            record = DirRecord.unpack(os.pread(move.fd, places.DIR_RECORD_SIZE + 1, 0))
            old_tag = self._dir_tag(move.old_location, record.dir_id)
            if not crypto.tag_in(old_tag, record.bindings):
                raise BindingError(
                    "the directory to rename is bound to another place (moved, swapped or "
                    "its .egw-dirid replaced in the backing store): not re-bound"
                )
            new_tag = self._dir_tag(move.new_location, record.dir_id)
            move.record = record
            backing.pwrite_all(move.fd, DirRecord(record.dir_id, (old_tag, new_tag)).pack(), 0)
        elif kind == stat.S_IFLNK and self.bound_names:
            link = LinkRecord.decode(os.readlink(move.backing_name, dir_fd=move.parent.fd))
            old_tag = self._link_tag(move.old_location, link)
            if not crypto.tag_in(old_tag, link.bindings):
                raise BindingError(
                    "the symlink to rename is bound to another place (its target moved, "
                    "swapped or copied in the backing store): not re-bound"
                )
            move.record = link
            both = dataclasses.replace(
                link, bindings=(old_tag, self._link_tag(move.new_location, link))
            )
            self._replace_link(move.parent, move.backing_name, both, move.st)
            move.current = move.parent, move.backing_name

    def _bind_new(self, move: _Move, durable: bool) -> None:
        """Step 3, after the rename: valid at the new place only. A failure here leaves
        the object valid at both places (the next rename rewrites both), so it is logged,
        not passed on: the rename itself happened."""
        kind = stat.S_IFMT(move.st.st_mode)
        try:
            if kind == stat.S_IFREG and move.fd is not None:
                self._rewrite_header(move.fd, self._header_new)
            elif kind == stat.S_IFDIR and isinstance(move.record, DirRecord):
                # Only once the rename is durable: else a power loss could keep the
                # record's new state and lose the rename.
                if durable and move.fd is not None:
                    new_tag = self._dir_tag(move.new_location, move.record.dir_id)
                    record = DirRecord(move.record.dir_id, (new_tag, places.ZERO_BINDING))
                    backing.pwrite_all(move.fd, record.pack(), 0)
            elif kind == stat.S_IFLNK and isinstance(move.record, LinkRecord):
                final = dataclasses.replace(
                    move.record,
                    bindings=(self._link_tag(move.new_location, move.record), places.ZERO_BINDING),
                )
                self._replace_link(move.new_parent, move.new_backing, final, move.st)
        except OSError as exc:
            log.warning("a renamed entry keeps its old place valid too: %s", exc)

    def _replace_link(self, parent: Inode, backing_name: str, link: LinkRecord,
                      st: os.stat_result) -> None:
        """Atomically replace a bound symlink by one with other bindings (the same target,
        link id, owner and times): a new backing symlink renamed over it."""
        tmp = _temp_name()
        os.symlink(link.encode(), tmp, dir_fd=parent.fd)
        try:
            fd = backing.open_path(tmp, parent.fd)
            try:
                if os.geteuid() == 0:
                    backing.chown_fd(fd, st.st_uid, st.st_gid)
                backing.utimens_fd(fd, st.st_atime_ns, st.st_mtime_ns)
            finally:
                os.close(fd)
            with self._replaced(parent, backing_name):
                os.rename(tmp, backing_name, src_dir_fd=parent.fd, dst_dir_fd=parent.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=parent.fd)
            raise

    @contextlib.contextmanager
    def _replaced(self, parent: Inode, backing_name: str) -> Iterator[None]:
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
                self._close_fd(fd)

    def _follow_link(self, move: _Move) -> None:
        """A known symlink inode stands for the backing symlink now at its name (the one
        it had was replaced). Its first handle stays open, so the backing inode number the
        kernel knows it by is not reused while the kernel may ask for it."""
        if move.current is None or not isinstance(move.record, LinkRecord):
            return
        moved = self._inodes.get(self._fuse_ino(move.st.st_ino))
        if moved is None:
            return
        parent, backing_name = move.current
        try:
            fd = backing.open_path(backing_name, parent.fd)
        except OSError:
            return
        if moved.pinned is None:
            moved.pinned = [moved.fd]
        else:
            os.close(moved.fd)  # an intermediate symlink nobody else knows the number of
        moved.fd = fd

    # --- attributes changes ----------------------------------------------------------
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
        inode = self.inode(ino)
        if size is not None:
            if inode.mode != stat.S_IFREG:
                raise _oserror(errno.EISDIR if inode.is_dir else errno.EINVAL)
            # setuid/setgid: the kernel sends the mode change with the size when the
            # caller lacks CAP_FSETID (it knows the caller; we do not).
            self._with_contents(inode, lambda contents: contents.truncate(size))
        if mode is not None:
            if inode.mode == stat.S_IFLNK:
                raise _oserror(errno.EOPNOTSUPP)
            backing.chmod_fd(inode.fd, stat.S_IMODE(mode))
        if uid is not None or gid is not None:
            backing.chown_fd(inode.fd, -1 if uid is None else uid, -1 if gid is None else gid)
        if atime_ns is not None or mtime_ns is not None:
            backing.utimens_fd(inode.fd, atime_ns, mtime_ns)
        return self.getattr(ino)

    def _kill_suid(self, inode: Inode) -> None:
        """Clear setuid/setgid after a data change, as a local filesystem does."""
        st_mode = os.fstat(inode.fd).st_mode
        kill = stat.S_ISUID
        if st_mode & stat.S_IXGRP:
            kill |= stat.S_ISGID
        if st_mode & kill:
            backing.chmod_fd(inode.fd, stat.S_IMODE(st_mode) & ~kill)

    # --- file data -------------------------------------------------------------------
    def _open_data(self, inode: Inode) -> None:
        if inode.data_fd is not None:
            return
        try:
            inode.data_fd = backing.reopen(inode.fd, os.O_RDWR)
        except PermissionError:
            inode.data_fd = backing.reopen(inode.fd, os.O_RDONLY)
        inode.contents = None
        header = os.pread(inode.data_fd, HEADER_SIZE, 0)
        if header:
            try:
                file_header = FileHeader.unpack(header)
                self._check_binding(inode, file_header)
            except BaseException:  # tampered, or the keys are wiped (revoked): open again later
                os.close(inode.data_fd)
                inode.data_fd = None
                raise
            inode.contents = self._contents(inode.data_fd, file_header.file_id)

    def _contents(self, data_fd: int, file_id: bytes) -> FileContents:
        return FileContents(data_fd, self.layout, self.config.volume_id, file_id, self.keyring)

    def _ensure_contents(self, inode: Inode) -> FileContents:
        """Contents of an open file, writing the header of a file a crash left empty."""
        if inode.contents is None:
            assert inode.data_fd is not None
            os.pwrite(inode.data_fd, self._new_header(inode.location).pack(), 0)
            self._close_data(inode)
            self._open_data(inode)
        assert inode.contents is not None
        return inode.contents

    # --- name bindings ---------------------------------------------------------------
    def _binding(self, location: tuple[bytes, bytes], file_id: bytes) -> bytes:
        dir_id, plain_name = location
        message = binding_message(
            self.config.volume_id, dir_id, fnames.pad_name(plain_name), file_id
        )
        return self.keyring.binding_tag(message)

    def _unbound_tag(self, file_id: bytes) -> bytes:
        # Authenticates the UNBOUND flag itself: flipping it on a bound file fails.
        return self.keyring.binding_tag(UNBOUND_LABEL + self.config.volume_id + file_id)

    def _unbind(self, header: FileHeader) -> FileHeader:
        return dataclasses.replace(
            header,
            flags=header.flags | HEADER_FLAG_UNBOUND,
            bindings=(self._unbound_tag(header.file_id), _ZERO_TAG),
        )

    def _new_header(self, location: tuple[bytes, bytes] | None) -> FileHeader:
        file_id = crypto.random_key(16)
        if location is None:
            return self._unbind(FileHeader(file_id=file_id))
        return FileHeader(file_id=file_id, bindings=(self._binding(location, file_id), _ZERO_TAG))

    def _check_binding(self, inode: Inode, header: FileHeader) -> None:
        # Tags are compared in constant time, with both bindings every time.
        if header.unbound:
            if not crypto.tags_equal(header.bindings[0], self._unbound_tag(header.file_id)):
                raise IntegrityError(f"inode {inode.ino}: file header flags were altered")
            return
        if inode.location is None:
            return
        if not crypto.tag_in(self._binding(inode.location, header.file_id), header.bindings):
            raise BindingError(
                f"inode {inode.ino}: file header is bound to another name "
                "(ciphertext replaced or moved in the backing store)"
            )

    def _rewrite_header(self, path_fd: int, change: Callable[[FileHeader], FileHeader]) -> None:
        """Read-modify-write the 64-byte header (one pwrite within one page)."""
        fd = backing.reopen(path_fd, os.O_RDWR)
        try:
            raw = os.pread(fd, HEADER_SIZE, 0)
            if len(raw) < HEADER_SIZE:
                return  # header not written yet (crash right after create)
            st = os.fstat(fd)
            os.pwrite(fd, change(FileHeader.unpack(raw)).pack(), 0)
            # A binding change is not a data change: keep the file's times (rename, link).
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fd)

    def _header_both(self, header: FileHeader, move: _Move) -> FileHeader:
        """Step 1 of a rename for a file header: binding A := old name, B := new name,
        once the header verified for the old name (never re-bind what did not)."""
        if header.unbound:
            return header
        old_tag = self._binding(move.old_location, header.file_id)
        if not crypto.tag_in(old_tag, header.bindings):
            raise BindingError(
                "the file to rename is bound to another name (ciphertext replaced or moved "
                "in the backing store): not re-bound"
            )
        return dataclasses.replace(
            header, bindings=(old_tag, self._binding(move.new_location, header.file_id))
        )

    def _header_new(self, header: FileHeader) -> FileHeader:
        if header.unbound:
            return header
        return dataclasses.replace(header, bindings=(header.bindings[1], _ZERO_TAG))

    def _close_data(self, inode: Inode) -> None:
        if inode.data_fd is not None:
            os.close(inode.data_fd)
        inode.data_fd = None
        inode.contents = None

    def _with_contents(self, inode: Inode, action: Callable[[FileContents], None]) -> None:
        transient = inode.data_fd is None
        self._open_data(inode)
        try:
            action(self._ensure_contents(inode))
        finally:
            if transient and inode.opens == 0:
                self._close_data(inode)

    def open(self, ino: int, flags: int, keep_setid: bool = False) -> int:
        """A handle on a regular file. keep_setid: the caller has CAP_FSETID (O_TRUNC)."""
        inode = self.inode(ino)
        if inode.mode != stat.S_IFREG:
            raise _oserror(errno.EISDIR if inode.is_dir else errno.EINVAL)
        self._open_data(inode)
        inode.opens += 1
        self.counters["opens"] += 1
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = inode
        if flags & os.O_TRUNC:
            # With atomic O_TRUNC the kernel leaves the whole truncate to us: the times
            # change even for an empty file, and setid bits go unless the caller may keep them.
            try:
                self._ensure_contents(inode).truncate(0)
                if not keep_setid:
                    self._kill_suid(inode)
            except BaseException:
                self.release(fh)
                raise
        return fh

    def _handle(self, fh: int) -> Inode:
        try:
            return self._handles[fh]
        except KeyError:
            raise _oserror(errno.EBADF) from None

    def read(self, fh: int, plain_offset: int, plain_length: int) -> bytes | bytearray:
        inode = self._handle(fh)
        if inode.contents is None:
            return b""
        try:
            data = inode.contents.read(plain_offset, plain_length)
            self.counters["bytes_read"] += len(data)
            return data
        except IntegrityError as exc:
            self._report_integrity(inode, exc)
            raise

    def write(self, fh: int, plain_offset: int, data: bytes) -> int:
        inode = self._handle(fh)
        contents = self._ensure_contents(inode)
        try:
            written = contents.write(plain_offset, data)
        except IntegrityError as exc:
            self._report_integrity(inode, exc)
            raise
        # No setid clearing here: the kernel does it first (with a setattr) when the
        # writer lacks CAP_FSETID, as it knows the writer's capabilities.
        self.counters["bytes_written"] += written
        return written

    def _report_integrity(self, inode: Inode, exc: IntegrityError) -> None:
        self.counters["integrity_errors"] += 1
        log.warning("integrity failure in inode %d: %s", inode.ino, exc)

    def data_fd(self, fh: int) -> int:
        """The backing data descriptor of a handle (for fsync in a worker thread)."""
        fd = self._handle(fh).data_fd
        assert fd is not None
        return fd

    def release(self, fh: int) -> None:
        inode = self._handles.pop(fh, None)
        if inode is None:
            return
        inode.opens -= 1
        if inode.opens == 0:
            self._close_data(inode)
            self._drop(inode)

    # --- extended attributes -----------------------------------------------------------
    def _xattr_target(self, inode: Inode) -> tuple[str, bytes]:
        """(path usable for *xattr calls, id the values are bound to)."""
        path = f"/proc/self/fd/{inode.fd}"
        if inode.is_dir:
            return path, self._dir_id(inode)
        if inode.mode != stat.S_IFREG:
            raise _oserror(errno.EPERM, "xattrs only on regular files and directories")
        fd = inode.data_fd if inode.data_fd is not None else backing.reopen(inode.fd, os.O_RDONLY)
        try:
            header = os.pread(fd, HEADER_SIZE, 0)
        finally:
            if fd != inode.data_fd:
                os.close(fd)
        if not header:
            raise _oserror(errno.ENOTSUP, "file has no header yet")
        return path, FileHeader.unpack(header).file_id

    def _xattr_name(self, plain_name: bytes) -> str:
        try:
            padded = fnames.pad_xattr_name(plain_name)
        except IntegrityError:
            raise _oserror(errno.ERANGE, "xattr name too long for the backing store") from None
        sealed = self.keyring.xattr_name_cipher.seal(padded, fnames.xattr_name_aad())
        return fnames.XATTR_PREFIX + fnames.b64encode(sealed)

    def setxattr(self, ino: int, plain_name: bytes, value: bytes) -> None:
        path, object_id = self._xattr_target(self.inode(ino))
        backing_name = self._xattr_name(plain_name)
        sealed = crypto.gcm_seal(
            self.keyring.xattr_value_key, value, fnames.xattr_value_aad(object_id, backing_name)
        )
        os.setxattr(path, backing_name, sealed)
        self.inode(ino).xattrs_stored = True

    def getxattr(self, ino: int, plain_name: bytes) -> bytes:
        inode = self.inode(ino)
        if inode.mode not in (stat.S_IFREG, stat.S_IFDIR):
            raise _oserror(errno.ENODATA)  # nothing is stored on other objects (setxattr: EPERM)
        # `ls -l` asks for security.selinux and an ACL on every entry: one listxattr
        # (once per inode) answers "none" without reading the header or encrypting the name.
        if inode.xattrs_stored is None:
            stored = os.listxattr(f"/proc/self/fd/{inode.fd}")
            inode.xattrs_stored = any(name.startswith(fnames.XATTR_PREFIX) for name in stored)
        if not inode.xattrs_stored:
            raise _oserror(errno.ENODATA)
        path, object_id = self._xattr_target(inode)
        backing_name = self._xattr_name(plain_name)
        sealed = os.getxattr(path, backing_name)
        return crypto.gcm_open(
            self.keyring.xattr_value_key, sealed, fnames.xattr_value_aad(object_id, backing_name)
        )

    def listxattr(self, ino: int) -> list[bytes]:
        inode = self.inode(ino)
        if inode.mode not in (stat.S_IFREG, stat.S_IFDIR):
            return []
        names = []
        for backing_name in os.listxattr(f"/proc/self/fd/{inode.fd}"):
            if not backing_name.startswith(fnames.XATTR_PREFIX):
                continue
            try:
                sealed = fnames.b64decode_strict(backing_name[len(fnames.XATTR_PREFIX) :])
                padded = self.keyring.xattr_name_cipher.open(sealed, fnames.xattr_name_aad())
                names.append(fnames.unpad_xattr_name(padded))
            except IntegrityError as exc:
                self.counters["integrity_errors"] += 1
                log.warning("skipping undecryptable xattr on inode %d: %s", ino, exc)
        return names

    def removexattr(self, ino: int, plain_name: bytes) -> None:
        inode = self.inode(ino)
        if inode.mode not in (stat.S_IFREG, stat.S_IFDIR):
            raise _oserror(errno.ENODATA)
        path, _ = self._xattr_target(inode)
        inode.xattrs_stored = None  # perhaps the last one: look again next time
        os.removexattr(path, self._xattr_name(plain_name))

    # --- directories -----------------------------------------------------------------
    def opendir(self, ino: int) -> int:
        inode = self._dir(ino)
        if self.bound_names:
            self._dir_id(inode)  # a directory bound to another place is not opened (EIO)
        inode.opens += 1
        fh = self._next_fh
        self._next_fh += 1
        self._dir_handles[fh] = DirHandle(inode)
        return fh

    def readdir(self, fh: int, start: int) -> Iterator[tuple[bytes, str | None, int]]:
        """Entries from index `start`: (plain name, backing name or None for . and ..).

        A generator: the kernel asks for a large directory in many small batches, each
        from a later `start`, and stops consuming when its buffer is full, so building
        the whole remainder on every call would make a listing quadratic.
        """
        handle = self._dir_handles.get(fh)
        if handle is None:
            raise _oserror(errno.EBADF)
        if start == 0 or handle.entries is None:
            handle.entries = self._list(handle.inode)
        return _entries_from(handle.entries, start)

    def _list(self, directory: Inode) -> list[tuple[bytes, str | None]]:
        if self.bound_names:
            self._dir_id(directory)  # the whole listing fails, not each entry
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=directory.fd)
        try:
            names = os.listdir(fd)
        finally:
            os.close(fd)
        entries: list[tuple[bytes, str | None]] = [(b".", None), (b"..", None)]
        for backing_name in sorted(names):
            try:
                plain = self._decode(directory, backing_name)
            except (IntegrityError, OSError) as exc:
                self.counters["integrity_errors"] += 1
                log.warning(
                    "skipping undecryptable entry %r in directory inode %d: %s",
                    backing_name,
                    directory.ino,
                    exc,
                )
                continue
            if plain is not None:
                entries.append((plain, backing_name))
        return entries

    def scan_directory(self, ino: int) -> list[tuple[str, str, bytes | None, str | None]]:
        """Every backing entry of a directory, for fsck: (backing name, kind, plain name
        or None, error or None); kind is 'short', 'long' or 'reserved'."""
        directory = self._dir(ino)
        self._dir_id(directory)  # a directory without a valid id fails as a whole
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=directory.fd)
        try:
            names = sorted(os.listdir(fd))
        finally:
            os.close(fd)
        out: list[tuple[str, str, bytes | None, str | None]] = []
        for backing_name in names:
            kind = fnames.classify(backing_name)
            if kind == "reserved":
                out.append((backing_name, kind, None, None))
                continue
            try:
                out.append((backing_name, kind, self._decode(directory, backing_name), None))
            except (IntegrityError, OSError) as exc:
                out.append((backing_name, kind, None, str(exc)))
        return out

    def directory_fd(self, ino: int) -> int:
        """The backing directory handle of a directory inode (for fsck repairs)."""
        return self._dir(ino).fd

    def backing_name(self, parent_ino: int, plain_name: bytes) -> tuple[str, str]:
        """(backing name, full encoded name) of `plain_name` in a directory."""
        return self._encode(self._dir(parent_ino), plain_name)

    def readdir_attr(self, dir_fh: int, plain_name: bytes, backing_name: str | None) -> Attr:
        """Attributes of a listed entry, registering its inode (lookup count unchanged)."""
        directory = self._dir_handles[dir_fh].inode
        if backing_name is None:
            if plain_name == b"." or directory.ino == ROOT_INODE:
                return self._attr(directory, os.fstat(directory.fd))
            fd = backing.open_path("..", directory.fd)
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            return self._attr(Inode(self._fuse_ino(st.st_ino), -1, st.st_mode), st)
        # A known inode needs no new handle: the one it holds pins the backing inode, so
        # its number cannot have been reused.
        st = os.stat(backing_name, dir_fd=directory.fd, follow_symlinks=False)
        inode = self._inodes.get(self._fuse_ino(st.st_ino))
        if inode is None or st.st_dev != self._root_dev:
            inode, st = self._register(backing.open_path(backing_name, directory.fd))
        self._place(inode, (self._dir_id(directory), plain_name))
        return self._attr(inode, st)

    def releasedir(self, fh: int) -> None:
        handle = self._dir_handles.pop(fh, None)
        if handle is not None:
            handle.inode.opens -= 1
            self._drop(handle.inode)

    def fsyncdir_fd(self, fh: int) -> int:
        return self._dir_handles[fh].inode.fd

    # --- filesystem ------------------------------------------------------------------
    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self._root_fd)
