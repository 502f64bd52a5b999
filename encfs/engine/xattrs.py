"""Extended attributes (layer L4; docs/FORMAT.md 3.4): stored on the backing object, the
name sealed with AES-SIV, the value with AES-GCM bound to the object's id (a file's id,
a directory's id) and to the sealed name, so a value moved to another name or object
does not open. Only regular files and directories hold them.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from encfs import backing, crypto
from encfs.engine.inodes import Inode, oserror
from encfs.engine.names import Names
from encfs.errors import IntegrityError
from encfs.format import names as fnames
from encfs.format.blocks import HEADER_SIZE, FileHeader
from encfs.keyring import Keyring

log = logging.getLogger(__name__)


class Xattrs:
    """The extended attributes of one volume's objects."""

    def __init__(self, keyring: Keyring, names: Names, counters: dict[str, int]) -> None:
        self._keyring = keyring
        self._names = names  # a directory's id binds its values
        self._counters = counters  # the volume's (integrity_errors)

    def _target(self, inode: Inode) -> tuple[str, bytes]:
        """(path usable for *xattr calls, id the values are bound to)."""
        path = f"/proc/self/fd/{inode.fd}"
        if inode.is_dir:
            return path, self._names.dir_id(inode)
        if inode.mode != stat.S_IFREG:
            raise oserror(errno.EPERM, "xattrs only on regular files and directories")
        fd = inode.data_fd if inode.data_fd is not None else backing.reopen(inode.fd, os.O_RDONLY)
        try:
            header = os.pread(fd, HEADER_SIZE, 0)
        finally:
            if fd != inode.data_fd:
                os.close(fd)
        if not header:
            raise oserror(errno.ENOTSUP, "file has no header yet")
        return path, FileHeader.unpack(header).file_id

    def _backing_name(self, plain_name: bytes) -> str:
        try:
            padded = fnames.pad_xattr_name(plain_name)
        except IntegrityError:
            raise oserror(errno.ERANGE, "xattr name too long for the backing store") from None
        sealed = self._keyring.xattr_name_cipher.seal(padded, fnames.xattr_name_aad())
        return fnames.XATTR_PREFIX + fnames.b64encode(sealed)

    def set(self, inode: Inode, plain_name: bytes, value: bytes) -> None:
        path, object_id = self._target(inode)
        backing_name = self._backing_name(plain_name)
        sealed = crypto.gcm_seal(
            self._keyring.xattr_value_key, value, fnames.xattr_value_aad(object_id, backing_name)
        )
        os.setxattr(path, backing_name, sealed)
        inode.xattrs_stored = True

    def get(self, inode: Inode, plain_name: bytes) -> bytes:
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
            self._keyring.xattr_value_key, sealed, fnames.xattr_value_aad(object_id, backing_name)
        )

    def list(self, inode: Inode) -> list[bytes]:
        if inode.mode not in (stat.S_IFREG, stat.S_IFDIR):
            return []
        names = []
        for backing_name in os.listxattr(f"/proc/self/fd/{inode.fd}"):
            if not backing_name.startswith(fnames.XATTR_PREFIX):
                continue
            try:
                sealed = fnames.b64decode_strict(backing_name[len(fnames.XATTR_PREFIX) :])
                padded = self._keyring.xattr_name_cipher.open(sealed, fnames.xattr_name_aad())
                names.append(fnames.unpad_xattr_name(padded))
            except IntegrityError as exc:
                self._counters["integrity_errors"] += 1
                log.warning("skipping undecryptable xattr on inode %d: %s", inode.ino, exc)
        return names

    def remove(self, inode: Inode, plain_name: bytes) -> None:
        if inode.mode not in (stat.S_IFREG, stat.S_IFDIR):
            raise oserror(errno.ENODATA)
        path, _ = self._target(inode)
        inode.xattrs_stored = None  # perhaps the last one: look again next time
        os.removexattr(path, self._backing_name(plain_name))
