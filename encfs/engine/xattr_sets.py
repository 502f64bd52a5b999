"""An object's extended attributes kept as one sealed set (feature `xattr-sets`; layer L4,
docs/FORMAT.md 5.4.2, bytes in encfs/format/xattrs.py).

One backing xattr per object holds the whole set, sealed with AES-GCM and bound to the
volume and the object's id, so the capacity is what the backing filesystem gives one
xattr value (ext4: about 4 KiB per inode) with a few bytes of framing per attribute. A
set too large for that is sealed into the xattr store (`.egw-xattrs/`, one file per
object, named by the object's id, replaced by a rename) and the backing xattr says so.

Every change replaces the whole set in one atomic step: one setxattr of the record, or
one rename of the store file (plus, when the form changes, a record written after the
store file and a store file removed after the record). A crash leaves the old set or
the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass

from encfs import backing, crypto
from encfs.errors import IntegrityError
from encfs.format import names as fnames
from encfs.format import xattrs as xformat


@dataclass(frozen=True, slots=True)
class SetOwner:
    """Where an object's set lives and what it is bound to."""

    path: str  # /proc/self/fd/N of an O_PATH handle: the backing object itself, followed
    kind: int  # xformat.KIND_*
    object_id: bytes  # empty for KIND_OTHER
    backing_xattr: str  # SET_XATTR_USER or SET_XATTR_TRUSTED

    @property
    def can_store(self) -> bool:
        return self.kind != xformat.KIND_OTHER


def _full(exc: OSError) -> bool:
    # What a backing filesystem says when one xattr value does not fit next to the others.
    return exc.errno in (errno.ENOSPC, errno.E2BIG, errno.ERANGE)


class XattrSets:
    """Read and replace the sealed attribute sets of one volume's objects."""

    def __init__(
        self,
        key: memoryview | bytes | Callable[[], memoryview],
        volume_id: bytes,
        root_fd: int,
        read_keys: Callable[[Callable[[memoryview], bytes]], bytes] | None = None,
    ) -> None:
        # How a read tries every value key it accepts (None: `key` alone).
        self._read_keys = read_keys
        # The volume's xattr value key, or where to fetch it at each use (the engine's:
        # an online `reencrypt` moves the volume to a new volume key while it is mounted).
        self._key_source = key
        self._volume_id = volume_id
        self._root_fd = root_fd

    @property
    def _key(self) -> memoryview | bytes:
        source = self._key_source
        return source() if callable(source) else source

    def _aad(self, owner: SetOwner, flags: int) -> bytes:
        return xformat.set_aad(self._volume_id, owner.kind, owner.object_id, flags)

    # --- reading ----------------------------------------------------------------------
    @staticmethod
    def record_at(path: str, backing_xattr: str) -> bytes | None:
        """The backing record at `path`, or None when the object has no attributes."""
        try:
            return os.getxattr(path, backing_xattr)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                return None
            raise

    def record(self, owner: SetOwner) -> bytes | None:
        return self.record_at(owner.path, owner.backing_xattr)

    def read(self, owner: SetOwner) -> dict[bytes, bytes]:
        """The object's attributes; IntegrityError for a set that does not verify."""
        record = self.record(owner)
        return {} if record is None else self.open(owner, record)

    def open(self, owner: SetOwner, record: bytes) -> dict[bytes, bytes]:
        flags, sealed = xformat.parse_record(record)
        if flags & xformat.FLAG_STORED:
            if not owner.can_store:
                raise IntegrityError("xattr set marked STORED on an object without an id")
            sealed = self._load(owner)
        aad = self._aad(owner, flags)
        if self._read_keys is None:
            return xformat.decode_body(crypto.gcm_open(self._key, sealed, aad))
        # under any epoch a read accepts (the engine's: Keyring.read_with_any)
        return xformat.decode_body(self._read_keys(lambda key: crypto.gcm_open(key, sealed, aad)))

    def _load(self, owner: SetOwner) -> bytes:
        path = xformat.STORE_DIR + "/" + xformat.store_name(owner.kind, owner.object_id)
        limit = xformat.BODY_MAX + xformat.SEAL_OVERHEAD
        try:
            sealed = backing.read_small_file(self._root_fd, path, limit + 1)
        except FileNotFoundError:
            raise IntegrityError("xattr set missing from the xattr store") from None
        if len(sealed) > limit:
            raise IntegrityError("xattr store file too large")
        return sealed

    # --- writing ----------------------------------------------------------------------
    def write(self, owner: SetOwner, attributes: dict[bytes, bytes], was_stored: bool) -> None:
        """Replace the object's whole set (`was_stored`: its record is STORED now)."""
        if not attributes:
            try:
                os.removexattr(owner.path, owner.backing_xattr)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
            if was_stored:
                self.discard(owner)
            return
        body = xformat.encode_body(attributes)
        sealed = crypto.gcm_seal(self._key, body, self._aad(owner, 0))
        record = xformat.inline_record(sealed)
        if len(record) <= xformat.INLINE_MAX or not owner.can_store:
            try:
                os.setxattr(owner.path, owner.backing_xattr, record)
            except OSError as exc:
                if not (_full(exc) and owner.can_store):
                    raise
            else:
                if was_stored:  # the record no longer points there: an unused file
                    self.discard(owner)
                return
        # Too large for the backing xattr: the store file (replaced by a rename), then the
        # record that points at it (unchanged if it already did).
        stored = crypto.gcm_seal(self._key, body, self._aad(owner, xformat.FLAG_STORED))
        store_fd = self._store_dir()
        try:
            backing.write_file_atomic(
                store_fd,
                xformat.store_name(owner.kind, owner.object_id),
                stored,
                0o600,
                temp_prefix=fnames.TEMP_PREFIX,
            )
        finally:
            os.close(store_fd)
        if not was_stored:
            os.setxattr(owner.path, owner.backing_xattr, xformat.STORED_RECORD)

    def _store_dir(self) -> int:
        with contextlib.suppress(FileExistsError):
            os.mkdir(xformat.STORE_DIR, 0o700, dir_fd=self._root_fd)
        return os.open(
            xformat.STORE_DIR,
            os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
            dir_fd=self._root_fd,
        )

    def discard(self, owner: SetOwner) -> None:
        """Remove the object's store file (its record is gone or no longer points there)."""
        if not owner.can_store:
            return
        path = xformat.STORE_DIR + "/" + xformat.store_name(owner.kind, owner.object_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path, dir_fd=self._root_fd)

    # --- the operations ------------------------------------------------------------------
    def _current(self, owner: SetOwner) -> tuple[dict[bytes, bytes], bool]:
        record = self.record(owner)
        if record is None:
            return {}, False
        return self.open(owner, record), record == xformat.STORED_RECORD

    def set(self, owner: SetOwner, name: bytes, value: bytes) -> None:
        attributes, was_stored = self._current(owner)
        if len(value) > xformat.VALUE_MAX:
            raise OSError(errno.E2BIG, os.strerror(errno.E2BIG))
        if not name or len(name) > xformat.NAME_MAX or b"\0" in name:
            raise OSError(errno.ERANGE, os.strerror(errno.ERANGE))
        attributes[name] = value
        # Past the bounds of one set: ENOSPC, as a backing filesystem whose xattr space
        # is full (ext4 says ENOSPC long before).
        if (
            xformat.body_size(attributes) > xformat.BODY_MAX
            or xformat.list_size(attributes) > xformat.LIST_MAX
        ):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.write(owner, attributes, was_stored)

    def remove(self, owner: SetOwner, name: bytes) -> None:
        attributes, was_stored = self._current(owner)
        if attributes.pop(name, None) is None:
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
        self.write(owner, attributes, was_stored)

    def get(self, owner: SetOwner, name: bytes) -> bytes:
        value = self.read(owner).get(name)
        if value is None:
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
        return value

    def names(self, owner: SetOwner) -> list[bytes]:
        return list(self.read(owner))
