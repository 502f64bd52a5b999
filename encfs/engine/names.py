"""Names in the backing store (layer L4): a plaintext name's backing name in a directory
and back, each directory's id (verified for its place on a bound volume), long-name
sidecars, the reserved temporary entries, and directory listings.

A backing name is the name sealed with AES-SIV under the name key and the directory's
id, base64url-encoded (docs/FORMAT.md 3); one too long for the backing filesystem is a
stub whose full encoding is in a sidecar file next to it. Both directions go through the
keyring's name memo, so a name is encrypted or checked once, not on every request.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os

from encfs import backing
from encfs.engine.bindings import BindingError, Bindings, Location
from encfs.engine.inode import Inode, oserror
from encfs.errors import IntegrityError
from encfs.format import names as fnames
from encfs.format.places import DirRecord
from encfs.keyring import EpochKeys, Keyring

log = logging.getLogger(__name__)

# (backing name, kind ('short', 'long' or 'reserved'), plain name or None, error or None)
ScanEntry = tuple[str, str, bytes | None, str | None]


def temp_name() -> str:
    """A temporary backing entry: a reserved name, never listed or looked up."""
    return backing.temp_name(fnames.TEMP_PREFIX)


def write_atomic(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    backing.write_file_atomic(dir_fd, name, data, mode, temp_prefix=fnames.TEMP_PREFIX)


def is_empty_dir(dir_fd: int, name: str) -> bool:
    """A backing directory that holds nothing but reserved entries (its id, temp files)."""
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        return all(
            fnames.classify(n) == "reserved" and not n.startswith(fnames.LONG_NAME_PREFIX)
            for n in os.listdir(fd)
        )
    finally:
        os.close(fd)


def remove_tree(dir_fd: int, name: str) -> None:
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


def _backing_names(directory: Inode) -> list[str]:
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=directory.fd)
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


class Names:
    """Name encryption and directory ids of one volume."""

    def __init__(
        self, keyring: Keyring, bindings: Bindings, bound: bool, counters: dict[str, int]
    ) -> None:
        self._keyring = keyring
        self._bindings = bindings
        self._bound = bound  # directories bound to their place (feature bound-names)
        self._counters = counters  # the volume's (integrity_errors)

    def dir_id(self, directory: Inode) -> bytes:
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
            if not self._bound:
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
            problem = self._bindings.dir_problem(directory, record)
            if problem is not None:
                directory.bad_place = f"directory inode {directory.ino}: {problem}"
                self._counters["integrity_errors"] += 1
                log.warning("integrity failure: %s", directory.bad_place)
                raise BindingError(directory.bad_place)
            directory.dir_id = record.dir_id
        return directory.dir_id

    def location(self, parent: Inode, plain_name: bytes) -> Location:
        return self.dir_id(parent), plain_name

    def place(self, inode: Inode, location: Location) -> None:
        """Record the place an inode was reached by. A directory of a bound volume
        reached by another place than the one it was verified for (its backing name was
        changed behind our back) is verified again before its next use."""
        if inode.location != location:
            if self._bound and inode.is_dir:
                inode.dir_id = None
                inode.bad_place = None
            inode.location = location

    def encode(self, directory: Inode, plain_name: bytes) -> tuple[str, str]:
        """(backing name, full encoded name); they differ for long names."""
        memo = self._keyring.epoch_keys().name_memo  # raises once the keys are revoked
        dir_id = self.dir_id(directory)
        known = memo.backing.get((dir_id, plain_name))
        if known is not None:
            return known
        try:
            padded = fnames.pad_name(plain_name)
        except IntegrityError:
            raise oserror(
                errno.ENAMETOOLONG if len(plain_name) > fnames.NAME_MAX else errno.EINVAL
            ) from None
        sealed = self._keyring.epoch_keys().name_cipher.seal(padded, fnames.name_aad(dir_id))
        encoded = fnames.b64encode(sealed)
        backing_name = fnames.long_name_stub(encoded) if fnames.is_long(encoded) else encoded
        memo.remember(dir_id, plain_name, backing_name, encoded)
        return backing_name, encoded

    def resolve(self, directory: Inode, plain_name: bytes) -> tuple[str, str]:
        """The (backing name, encoded name) an existing entry has: during a mounted
        volume's re-encryption it may still have the old epoch's (Keyring.read_epoch_keys).
        The current epoch's when there is no such entry (a write makes it so)."""
        current = self.encode(directory, plain_name)
        for backing_name, encoded in self._older_names(directory, plain_name):
            if not _exists(directory.fd, current[0]) and _exists(directory.fd, backing_name):
                return backing_name, encoded
        return current

    def fresh(self, directory: Inode, plain_name: bytes) -> tuple[str, str]:
        """The (backing name, encoded name) of a new entry: the current epoch's; EEXIST
        when an entry has the name under an older epoch a read accepts."""
        current = self.encode(directory, plain_name)
        for backing_name, _ in self._older_names(directory, plain_name):
            if _exists(directory.fd, backing_name):
                raise oserror(errno.EEXIST)
        return current

    def _older_names(self, directory: Inode, plain_name: bytes) -> list[tuple[str, str]]:
        """The name's encodings under the older epochs a read accepts (usually none)."""
        older = self._keyring.read_epoch_keys()[1:]
        if not older:
            return []
        dir_id = self.dir_id(directory)
        out = []
        for keys in older:
            sealed = keys.name_cipher.seal(fnames.pad_name(plain_name), fnames.name_aad(dir_id))
            encoded = fnames.b64encode(sealed)
            out.append(
                (fnames.long_name_stub(encoded) if fnames.is_long(encoded) else encoded, encoded)
            )
        return out

    def decode(self, directory: Inode, backing_name: str) -> bytes | None:
        """Plaintext of a backing entry name; None for reserved entries."""
        return self.plain_name_in(directory.fd, self.dir_id(directory), backing_name)

    def plain_name_in(self, dir_fd: int, dir_id: bytes, backing_name: str) -> bytes | None:
        """Plaintext of a backing entry name in the directory `dir_fd` whose id is
        `dir_id`; None for reserved entries."""
        epochs = self._keyring.read_epoch_keys()  # raises once the keys are revoked
        for keys in epochs:
            known = keys.name_memo.plain.get((dir_id, backing_name))
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
        aad = fnames.name_aad(dir_id)

        def plain_under(keys: EpochKeys) -> tuple[bytes, EpochKeys]:
            return fnames.unpad_name(keys.name_cipher.open(sealed, aad)), keys

        plain_name, keys = self._keyring.read_with_any(plain_under)
        keys.name_memo.remember(dir_id, plain_name, backing_name, encoded)
        return plain_name

    @staticmethod
    def write_sidecar(directory: Inode, backing_name: str, encoded: str) -> None:
        if backing_name != encoded:
            write_atomic(directory.fd, fnames.sidecar_name(backing_name), encoded.encode(), 0o400)

    @staticmethod
    def remove_sidecar(directory: Inode, backing_name: str) -> None:
        if fnames.classify(backing_name) == "long":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(fnames.sidecar_name(backing_name), dir_fd=directory.fd)

    # --- listings -------------------------------------------------------------------------
    def listing(self, directory: Inode) -> list[tuple[bytes, str | None]]:
        """(plain name, backing name) of every entry, '.' and '..' first (backing name
        None); an entry whose name does not decrypt is skipped, with a warning."""
        if self._bound:
            self.dir_id(directory)  # the whole listing fails, not each entry
        entries: list[tuple[bytes, str | None]] = [(b".", None), (b"..", None)]
        for backing_name in _backing_names(directory):
            try:
                plain = self.decode(directory, backing_name)
            except (IntegrityError, OSError) as exc:
                self._counters["integrity_errors"] += 1
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

    def scan(self, directory: Inode) -> list[ScanEntry]:
        """Every backing entry of a directory, for fsck; a directory without a valid id
        fails as a whole."""
        self.dir_id(directory)
        out: list[ScanEntry] = []
        for backing_name in _backing_names(directory):
            kind = fnames.classify(backing_name)
            if kind == "reserved":
                out.append((backing_name, kind, None, None))
                continue
            try:
                out.append((backing_name, kind, self.decode(directory, backing_name), None))
            except (IntegrityError, OSError) as exc:
                out.append((backing_name, kind, None, str(exc)))
        return out
