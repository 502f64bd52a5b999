"""Extended attributes (layer L4; docs/FORMAT.md 5.4).

With `xattr-sets` (5.4.2) all of an object's attributes are one sealed set in one backing
xattr (engine/xattr_sets.py), bound to the object's id: a file's, a directory's, a bound
symlink's link id; FIFOs, sockets and devices have none. Files and directories keep it as
user.*, other objects as trusted.* (only a root daemon can store those; the kernel lets
only CAP_SYS_ADMIN callers reach trusted.* at all). A set too large for the backing xattr
goes to the xattr store, whose file goes with the object's last name.

Volumes made before the feature keep one backing xattr per attribute (5.4.1): the name
sealed with AES-SIV, the value with AES-GCM bound to the object's id and the sealed name.
Only regular files and directories hold them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator

from encfs import backing, crypto
from encfs.engine.inode import Inode, oserror
from encfs.engine.inodes import InodeTable
from encfs.engine.names import Names
from encfs.engine.xattr_sets import SetOwner, XattrSets
from encfs.errors import IntegrityError
from encfs.format import names as fnames
from encfs.format import places
from encfs.format import xattrs as xformat
from encfs.format.blocks import HEADER_SIZE, FileHeader
from encfs.format.places import LinkRecord
from encfs.keyring import Keyring

log = logging.getLogger(__name__)


class Xattrs:
    """The extended attributes of one volume's objects."""

    def __init__(
        self,
        keyring: Keyring,
        names: Names,
        counters: dict[str, int],
        inodes: InodeTable,
        root_fd: int,
        volume_id: bytes,
        sets: bool,
        bound: bool,
    ) -> None:
        self._keyring = keyring
        self._names = names  # a directory's id binds its values
        self._counters = counters  # the volume's (integrity_errors)
        self._inodes = inodes
        self.sets = sets  # feature xattr-sets: one sealed set per object
        self._bound = bound  # bound symlinks have a link id
        self._sets = XattrSets(
            lambda: keyring.epoch_keys().xattr_value_key, volume_id, root_fd,
            lambda open_: keyring.read_with_any(lambda keys: open_(keys.xattr_value_key)),
        )

    # --- the operations ------------------------------------------------------------------
    def set(self, inode: Inode, plain_name: bytes, value: bytes) -> None:
        if not self.sets:
            return self._set_per_name(inode, plain_name, value)
        with self._integrity(inode):
            self._sets.set(self._owner(inode), plain_name, value)
        inode.xattrs_stored = True
        return None

    def get(self, inode: Inode, plain_name: bytes) -> bytes:
        if not self.sets:
            return self._get_per_name(inode, plain_name)
        value = self._set_of(inode).get(plain_name)
        if value is None:
            raise oserror(errno.ENODATA)
        return value

    def list(self, inode: Inode) -> list[bytes]:
        if not self.sets:
            return self._list_per_name(inode)
        return [*self._set_of(inode)]

    def remove(self, inode: Inode, plain_name: bytes) -> None:
        if not self.sets:
            return self._remove_per_name(inode, plain_name)
        inode.xattrs_stored = None  # perhaps the last one: look again next time
        with self._integrity(inode):
            self._sets.remove(self._owner(inode), plain_name)
        return None

    # --- sealed sets (docs/FORMAT.md 5.4.2) ------------------------------------------------
    @staticmethod
    def _set_xattr(mode: int) -> str:
        if mode in (stat.S_IFREG, stat.S_IFDIR):
            return xformat.SET_XATTR_USER
        return xformat.SET_XATTR_TRUSTED

    def _owner(self, inode: Inode) -> SetOwner:
        path = f"/proc/self/fd/{inode.fd}"
        user = xformat.SET_XATTR_USER
        if inode.is_dir:
            return SetOwner(path, xformat.KIND_DIRECTORY, self._names.dir_id(inode), user)
        if inode.mode == stat.S_IFREG:
            return SetOwner(path, xformat.KIND_FILE, self._file_id(inode), user)
        if inode.mode == stat.S_IFLNK and self._bound:
            link_id = LinkRecord.decode(os.readlink("", dir_fd=inode.fd)).link_id
            return SetOwner(path, xformat.KIND_SYMLINK, link_id, xformat.SET_XATTR_TRUSTED)
        return SetOwner(path, xformat.KIND_OTHER, b"", xformat.SET_XATTR_TRUSTED)

    def _file_id(self, inode: Inode) -> bytes:
        # A backing file's id never changes (renames rewrite only its bindings).
        if inode.file_id is None:
            inode.file_id = self._read_file_id(inode)
        return inode.file_id

    def _set_of(self, inode: Inode) -> dict[bytes, bytes]:
        # `ls -l` asks for security.selinux and an ACL on every entry: an object known to
        # hold no set answers from memory, else one getxattr says so before any crypto.
        if inode.xattrs_stored is False:
            return {}
        path = f"/proc/self/fd/{inode.fd}"
        record = self._sets.record_at(path, self._set_xattr(inode.mode))
        inode.xattrs_stored = record is not None
        if record is None:
            return {}
        with self._integrity(inode):
            return self._sets.open(self._owner(inode), record)

    @contextlib.contextmanager
    def _integrity(self, inode: Inode) -> Iterator[None]:
        try:
            yield
        except IntegrityError as exc:
            self._counters["integrity_errors"] += 1
            log.warning("integrity failure in inode %d: %s", inode.ino, exc)
            raise

    def last_name_set(
        self, dir_fd: int, backing_name: str, st: os.stat_result
    ) -> SetOwner | None:
        """The owner of the STORED set of the object whose last name `backing_name` is
        (its store file goes with it: `discard_after`), or None."""
        if not self.sets:
            return None
        known = self._inodes.inodes.get(self._inodes.fuse_ino(st.st_ino))
        if known is not None and known.backing_ino != st.st_ino:
            known = None
        # (A file recorded in the orphan directory: its orphan link is not a name.)
        if stat.S_ISREG(st.st_mode) and (
            st.st_nlink - (known is not None and self._inodes.is_orphan(known)) != 1
        ):
            return None
        mode = stat.S_IFMT(st.st_mode)
        if mode not in (stat.S_IFREG, stat.S_IFDIR) and not (
            mode == stat.S_IFLNK and self._bound
        ):
            return None  # others keep their sets inline
        if known is not None and known.xattrs_stored is False:
            return None
        # One lgetxattr by name (the last component is the entry itself) for the usual
        # answer, "no STORED set"; only then is the object opened for its id.
        try:
            record = os.getxattr(
                f"/proc/self/fd/{dir_fd}/{backing_name}",
                self._set_xattr(mode),
                follow_symlinks=False,
            )
        except OSError:
            return None
        if record != xformat.STORED_RECORD:
            return None
        try:
            fd = backing.open_path(backing_name, dir_fd)
        except OSError:
            return None
        try:
            if mode == stat.S_IFREG:
                with open(backing.reopen(fd, os.O_RDONLY), "rb", closefd=True) as file:
                    header = FileHeader.unpack(file.read(HEADER_SIZE))
                kind, object_id = xformat.KIND_FILE, header.file_id
            elif mode == stat.S_IFDIR:
                raw = backing.read_small_file(fd, fnames.DIR_ID_FILE, 64)
                kind, object_id = xformat.KIND_DIRECTORY, raw[: places.DIR_ID_SIZE]
            else:
                link = LinkRecord.decode(os.readlink("", dir_fd=fd))
                kind, object_id = xformat.KIND_SYMLINK, link.link_id
            return SetOwner("", kind, object_id, self._set_xattr(mode))
        except (OSError, IntegrityError):
            return None  # not ours to clean up (fsck reports what is damaged)
        finally:
            os.close(fd)

    def discard_after(self, owner: SetOwner | None, st: os.stat_result) -> None:
        """After the last name of an object went: its store file too, or, for a file or
        directory still open, when it is dropped (its attributes stay readable until then)."""
        if owner is None:
            return
        known = self._inodes.inodes.get(self._inodes.fuse_ino(st.st_ino))
        open_kind = stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
        if known is not None and known.opens > 0 and open_kind:
            known.on_drop = lambda: self._sets.discard(owner)
        else:
            self._sets.discard(owner)

    def link_record(self, dir_fd: int, backing_name: str) -> bytes | None:
        """A bound symlink's set record, to go unchanged onto the backing symlink that
        replaces it in a rename (the same link id)."""
        if not self.sets:
            return None
        fd = backing.open_path(backing_name, dir_fd)
        try:
            return self._sets.record_at(f"/proc/self/fd/{fd}", xformat.SET_XATTR_TRUSTED)
        finally:
            os.close(fd)

    def copy(self, source: Inode, copy: Inode) -> None:
        """link(2) of a bound symlink makes a copy with its own link id: the set is sealed
        again for it."""
        if not self.sets:
            return
        attributes = self._set_of(source)
        if attributes:
            self._sets.write(self._owner(copy), attributes, was_stored=False)
            copy.xattrs_stored = True

    # --- one backing xattr per attribute (docs/FORMAT.md 5.4.1) ----------------------------
    def _target(self, inode: Inode) -> tuple[str, bytes]:
        """(path usable for *xattr calls, id the values are bound to)."""
        path = f"/proc/self/fd/{inode.fd}"
        if inode.is_dir:
            return path, self._names.dir_id(inode)
        if inode.mode != stat.S_IFREG:
            raise oserror(errno.EPERM, "xattrs only on regular files and directories")
        return path, self._read_file_id(inode)

    @staticmethod
    def _read_file_id(inode: Inode) -> bytes:
        fd = inode.data_fd if inode.data_fd is not None else backing.reopen(inode.fd, os.O_RDONLY)
        try:
            header = os.pread(fd, HEADER_SIZE, 0)
        finally:
            if fd != inode.data_fd:
                os.close(fd)
        if not header:
            raise oserror(errno.ENOTSUP, "file has no header yet")
        return FileHeader.unpack(header).file_id

    def _backing_name(self, plain_name: bytes) -> str:
        try:
            padded = fnames.pad_xattr_name(plain_name)
        except IntegrityError:
            raise oserror(errno.ERANGE, "xattr name too long for the backing store") from None
        sealed = self._keyring.epoch_keys().xattr_name_cipher.seal(padded, fnames.xattr_name_aad())
        return fnames.XATTR_PREFIX + fnames.b64encode(sealed)

    def _set_per_name(self, inode: Inode, plain_name: bytes, value: bytes) -> None:
        path, object_id = self._target(inode)
        backing_name = self._backing_name(plain_name)
        sealed = crypto.gcm_seal(
            self._keyring.epoch_keys().xattr_value_key,
            value,
            fnames.xattr_value_aad(object_id, backing_name),
        )
        os.setxattr(path, backing_name, sealed)
        inode.xattrs_stored = True

    def _get_per_name(self, inode: Inode, plain_name: bytes) -> bytes:
        if inode.mode not in (stat.S_IFREG, stat.S_IFDIR):
            raise oserror(errno.ENODATA)  # nothing is stored on other objects (setxattr: EPERM)
        # `ls -l` asks for security.selinux and an ACL on every entry: one listxattr
        # (once per inode) answers "none" without reading the header or encrypting the name.
        if inode.xattrs_stored is None:
            stored = os.listxattr(f"/proc/self/fd/{inode.fd}")
            inode.xattrs_stored = any(name.startswith(fnames.XATTR_PREFIX) for name in stored)
        if not inode.xattrs_stored:
            raise oserror(errno.ENODATA)
        path, object_id = self._target(inode)
        backing_name = self._backing_name(plain_name)
        sealed = os.getxattr(path, backing_name)
        return crypto.gcm_open(
            self._keyring.epoch_keys().xattr_value_key,
            sealed,
            fnames.xattr_value_aad(object_id, backing_name),
        )

    def _list_per_name(self, inode: Inode) -> list[bytes]:
        if inode.mode not in (stat.S_IFREG, stat.S_IFDIR):
            return []
        names = []
        for backing_name in os.listxattr(f"/proc/self/fd/{inode.fd}"):
            if not backing_name.startswith(fnames.XATTR_PREFIX):
                continue
            try:
                sealed = fnames.b64decode_strict(backing_name[len(fnames.XATTR_PREFIX) :])
                cipher = self._keyring.epoch_keys().xattr_name_cipher
                padded = cipher.open(sealed, fnames.xattr_name_aad())
                names.append(fnames.unpad_xattr_name(padded))
            except IntegrityError as exc:
                self._counters["integrity_errors"] += 1
                log.warning("skipping undecryptable xattr on inode %d: %s", inode.ino, exc)
        return names

    def _remove_per_name(self, inode: Inode, plain_name: bytes) -> None:
        if inode.mode not in (stat.S_IFREG, stat.S_IFDIR):
            raise oserror(errno.ENODATA)
        path, _ = self._target(inode)
        inode.xattrs_stored = None  # perhaps the last one: look again next time
        os.removexattr(path, self._backing_name(plain_name))
