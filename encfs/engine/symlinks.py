"""Symlink targets (layer L4): sealed into the backing symlink, or into the symlink store
when too long for it (docs/FORMAT.md 3.3, 5.3).

Bound symlinks (feature bound-names): the backing target holds a random link id, two
place bindings and the target sealed under the link id (or, when too long, the target
sealed into the store file named by the link id). A backing symlink cannot be changed,
so a rename makes new ones (`replace`). Volumes made before the feature keep their
unbound targets: sealed inline, or a marker naming a store file (feature long-symlinks).

Store files are written before their symlink and removed after its last link: a crash
leaves at worst an unused file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import stat
from collections.abc import Callable
from contextlib import AbstractContextManager

from encfs import backing, crypto
from encfs.engine.bindings import BindingError, Bindings, Location
from encfs.engine.inode import Inode, oserror
from encfs.engine.inodes import InodeTable
from encfs.engine.names import temp_name, write_atomic
from encfs.errors import IntegrityError
from encfs.format import FEATURE_LONG_SYMLINKS, places
from encfs.format import names as fnames
from encfs.format import xattrs as xformat
from encfs.format.places import LinkRecord
from encfs.keyring import Keyring


class Symlinks:
    """The symlink targets of one volume."""

    def __init__(
        self,
        root_fd: int,
        keyring: Keyring,
        bindings: Bindings,
        bound: bool,
        features: tuple[str, ...],
    ) -> None:
        self._root_fd = root_fd  # the symlink store is BACKING/.egw-symlinks
        self._keyring = keyring
        self._bindings = bindings
        self._bound = bound
        self._long_targets = FEATURE_LONG_SYMLINKS in features

    # --- writing and reading targets ----------------------------------------------------
    def new_target(self, location: Location, target: bytes) -> tuple[str, bytes | None]:
        """(backing target, store id or None) of a new symlink at `location`; a target
        too long for the backing symlink is stored first (`remove_stored` undoes it)."""
        if self._bound:
            record = self.new_record(location, target)
            return record.encode(), record.link_id if record.stored else None
        if fnames.symlink_fits_inline(len(target)):
            sealed = self._keyring.epoch_keys().symlink_cipher.seal(target, fnames.symlink_aad())
            return fnames.b64encode(sealed), None
        if self._long_targets:
            long_id = self._store(target)
            return fnames.long_symlink_marker(long_id), long_id
        raise oserror(errno.ENAMETOOLONG, "this volume's format keeps targets <= 3055 bytes")

    def new_record(self, location: Location, target: bytes) -> LinkRecord:
        """A new bound symlink target for `location` (storing a long target first)."""
        link_id = crypto.random_bytes(places.LINK_ID_SIZE)
        sealed = self._keyring.epoch_keys().symlink_cipher.seal(target, places.link_aad(link_id))
        unbound = places.ZERO_BINDING, places.ZERO_BINDING
        if places.bound_target_fits_inline(len(target)):
            record = LinkRecord(0, link_id, unbound, sealed)
        else:
            self._store(target, link_id)
            record = LinkRecord(places.LINK_FLAG_STORED, link_id, unbound, b"")
        return dataclasses.replace(
            record, bindings=(self._bindings.link_tag(location, record), places.ZERO_BINDING)
        )

    def read_bound(self, inode: Inode, cipher_target: str) -> bytes:
        """The target of a bound symlink, once it verified for the place it was reached by."""
        record = LinkRecord.decode(cipher_target)
        if inode.location is None:
            raise BindingError(f"symlink inode {inode.ino} reached without a name")
        if self._bindings.found_link_tag(inode.location, record) is None:
            raise BindingError(
                f"symlink inode {inode.ino}: its target is bound to another place "
                "(symlink target moved, swapped or copied in the backing store)"
            )
        if record.stored:
            return self._load(record.link_id)
        aad, sealed = places.link_aad(record.link_id), record.sealed
        return self._keyring.read_with_any(lambda keys: keys.symlink_cipher.open(sealed, aad))

    def read_unbound(self, cipher_target: str) -> bytes:
        long_id = fnames.long_symlink_id(cipher_target)
        if long_id is not None:
            return self._load(long_id)
        return self._keyring.epoch_keys().symlink_cipher.open(
            fnames.b64decode_strict(cipher_target), fnames.symlink_aad()
        )

    def size(self, inode: Inode, st: os.stat_result) -> int:
        """The plaintext target's length (stat's st_size), without decrypting it."""
        if self._bound:
            if st.st_size != places.STORED_LINK_LENGTH:
                return places.bound_inline_target_size(st.st_size)
        elif st.st_size != fnames.LONG_SYMLINK_MARKER_SIZE:
            # base64url without padding: the sealed length, then minus the SIV tag (exact).
            return max(0, st.st_size * 3 // 4 - fnames.SIV_TAG_SIZE)
        try:
            long_id = self.stored_id(os.readlink("", dir_fd=inode.fd))
            if long_id is not None:
                path = fnames.long_symlink_path(long_id)
                sealed_size = os.stat(path, dir_fd=self._root_fd).st_size
                return max(0, sealed_size - fnames.SIV_TAG_SIZE)
        except (OSError, IntegrityError):
            return 0  # readlink reports the damage
        return max(0, st.st_size * 3 // 4 - fnames.SIV_TAG_SIZE)

    # --- the symlink store ----------------------------------------------------------------
    def _store(self, target: bytes, long_id: bytes | None = None) -> bytes:
        if long_id is None:
            long_id = crypto.random_bytes(fnames.LONG_SYMLINK_ID_SIZE)
        cipher = self._keyring.epoch_keys().symlink_cipher
        sealed = cipher.seal(target, fnames.long_symlink_aad(long_id))
        with contextlib.suppress(FileExistsError):
            os.mkdir(fnames.SYMLINK_STORE_DIR, 0o700, dir_fd=self._root_fd)
        store_fd = os.open(
            fnames.SYMLINK_STORE_DIR,
            os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
            dir_fd=self._root_fd,
        )
        try:
            name = fnames.long_symlink_path(long_id).rsplit("/", 1)[1]
            write_atomic(store_fd, name, sealed, 0o400)
        finally:
            os.close(store_fd)
        return long_id

    def _load(self, long_id: bytes) -> bytes:
        try:
            sealed = backing.read_small_file(
                self._root_fd, fnames.long_symlink_path(long_id), 2 * fnames.SYMLINK_TARGET_MAX
            )
        except FileNotFoundError:
            raise IntegrityError("symlink target missing from the symlink store") from None
        aad = fnames.long_symlink_aad(long_id)
        return self._keyring.read_with_any(lambda keys: keys.symlink_cipher.open(sealed, aad))

    def remove_stored(self, long_id: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fnames.long_symlink_path(long_id), dir_fd=self._root_fd)

    def stored_id(self, cipher_target: str) -> bytes | None:
        """The store id a backing symlink target names, if its target is stored."""
        if self._bound:
            if len(cipher_target) != places.STORED_LINK_LENGTH:
                return None
            record = LinkRecord.decode(cipher_target)
            return record.link_id if record.stored else None
        return fnames.long_symlink_id(cipher_target)

    def last_stored_link(self, dir_fd: int, backing_name: str, st: os.stat_result) -> bytes | None:
        """The store id of a long-target symlink whose last link `backing_name` is."""
        if not stat.S_ISLNK(st.st_mode) or st.st_nlink != 1:
            return None
        if st.st_size not in (fnames.LONG_SYMLINK_MARKER_SIZE, places.STORED_LINK_LENGTH):
            return None
        try:
            return self.stored_id(os.readlink(backing_name, dir_fd=dir_fd))
        except (OSError, IntegrityError):
            return None

    # --- renaming a bound symlink ---------------------------------------------------------
    @staticmethod
    def replace(
        table: InodeTable, parent: Inode, backing_name: str, link: LinkRecord,
        st: os.stat_result, xattr_record: bytes | None = None,
    ) -> None:
        """Atomically replace a bound symlink by one with other bindings (the same target,
        link id, owner, times and xattr set record): a new backing symlink renamed over it."""
        replace_symlink(parent.fd, backing_name, link.encode(), st, xattr_record,
                        lambda: table.replaced(parent, backing_name))


def replace_symlink(
    dir_fd: int, backing_name: str, backing_target: str, st: os.stat_result,
    xattr_record: bytes | None,
    around_rename: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> None:
    """A new backing symlink (`st`'s owner and times, the set record given) renamed over
    `backing_name` (inside `around_rename()`): the link's one atomic change (renames,
    reencrypt's name pass)."""
    tmp = temp_name()
    os.symlink(backing_target, tmp, dir_fd=dir_fd)
    try:
        fd = backing.open_path(tmp, dir_fd)
        try:
            if xattr_record is not None:  # the same link id: the set moves unchanged
                os.setxattr(f"/proc/self/fd/{fd}", xformat.SET_XATTR_TRUSTED, xattr_record)
            if os.geteuid() == 0:
                backing.chown_fd(fd, st.st_uid, st.st_gid)
            backing.utimens_fd(fd, st.st_atime_ns, st.st_mtime_ns)
        finally:
            os.close(fd)
        with around_rename():
            os.rename(tmp, backing_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
