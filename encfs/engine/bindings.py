"""Bindings of objects to their place (layer L4; docs/FORMAT.md 5): a file header to its
name, a directory's id record and a symlink's target to the place they were made for.

A binding is a MAC tag (the keyring's binding key) over the volume id, the parent
directory's id, the padded plaintext name and the object's own id. Each object holds two
binding slots: a rename first makes the object valid at its old and its new place (step
1), renames, then drops the old place (step 3), so a crash between the steps leaves an
object that is valid where it is. Tags are always compared in constant time, against
both slots.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from encfs import backing, crypto
from encfs.engine.inode import ROOT_INODE, Inode
from encfs.errors import IntegrityError
from encfs.format import FEATURE_BOUND_NAMES, places
from encfs.format import names as fnames
from encfs.format.blocks import (
    BINDING_SIZE,
    HEADER_FLAG_UNBOUND,
    HEADER_SIZE,
    FileHeader,
    binding_message,
)
from encfs.format.places import DirRecord, LinkRecord
from encfs.format.volume import VolumeConfig
from encfs.keyring import Keyring

ZERO_TAG = bytes(BINDING_SIZE)
UNBOUND_LABEL = b"EGWF unbound"

Location = tuple[bytes, bytes]  # (parent directory id, plaintext name)


class BindingError(IntegrityError):
    """An object is bound to another place than the one it was reached by (its
    ciphertext, id record or target was moved, swapped or copied in the backing store)."""


class Bindings:
    """The tags of one volume's bindings, and the checks that use them."""

    def __init__(self, volume_id: bytes, keyring: Keyring) -> None:
        self._volume_id = volume_id
        self._keyring = keyring  # its material may be wiped and restored (key health)

    # --- file headers -----------------------------------------------------------------
    def file_tag(self, location: Location, file_id: bytes) -> bytes:
        return self._keyring.binding_tag(self._file_message(location, file_id))

    def _unbound_tag(self, file_id: bytes) -> bytes:
        # Authenticates the UNBOUND flag itself: flipping it on a bound file fails.
        return self._keyring.binding_tag(UNBOUND_LABEL + self._volume_id + file_id)

    # Checks accept a tag under any epoch a read accepts (Keyring.read_epoch_keys: during
    # a mounted volume's re-encryption, the epoch its names leave too); new tags are
    # always under the current one.
    def _accepted(self, message: bytes, bindings: tuple[bytes, ...]) -> bytes | None:
        """The tag of `message` found in `bindings` (under an accepted epoch), or None."""
        for tag in self._keyring.binding_tags(message):
            if crypto.tag_in(tag, bindings):
                return tag
        return None

    def _file_message(self, location: Location, file_id: bytes) -> bytes:
        dir_id, plain_name = location
        return binding_message(self._volume_id, dir_id, fnames.pad_name(plain_name), file_id)

    def _dir_message(self, location: Location, dir_id: bytes) -> bytes:
        parent_id, plain_name = location
        return places.dir_binding_message(
            self._volume_id, parent_id, fnames.pad_name(plain_name), dir_id
        )

    def _link_message(self, location: Location, record: LinkRecord) -> bytes:
        dir_id, plain_name = location
        return places.symlink_binding_message(
            self._volume_id, dir_id, fnames.pad_name(plain_name), record.flags, record.link_id
        )

    def found_dir_tag(self, location: Location, record: DirRecord) -> bytes | None:
        """The tag binding a directory's id record to `location`, if it has one."""
        return self._accepted(self._dir_message(location, record.dir_id), record.bindings)

    def found_link_tag(self, location: Location, record: LinkRecord) -> bytes | None:
        """The tag binding a symlink to `location`, if it has one."""
        return self._accepted(self._link_message(location, record), record.bindings)

    def unbind(self, header: FileHeader) -> FileHeader:
        """The header of a file with several names (a hard link): bound to none."""
        return dataclasses.replace(
            header,
            flags=header.flags | HEADER_FLAG_UNBOUND,
            bindings=(self._unbound_tag(header.file_id), ZERO_TAG),
        )

    def new_header(self, location: Location | None) -> FileHeader:
        file_id = crypto.random_key(16)
        if location is None:
            return self.unbind(FileHeader(file_id=file_id))
        return FileHeader(file_id=file_id, bindings=(self.file_tag(location, file_id), ZERO_TAG))

    def check_file(self, inode: Inode, header: FileHeader) -> None:
        """The header of the file `inode` belongs to the name it was reached by."""
        if header.unbound:
            message = UNBOUND_LABEL + self._volume_id + header.file_id
            if self._accepted(message, header.bindings[:1]) is None:
                raise IntegrityError(f"inode {inode.ino}: file header flags were altered")
            return
        if inode.location is None:
            return
        if self._accepted(self._file_message(inode.location, header.file_id),
                          header.bindings) is None:
            raise BindingError(
                f"inode {inode.ino}: file header is bound to another name "
                "(ciphertext replaced or moved in the backing store)"
            )

    def file_both(self, header: FileHeader, old: Location, new: Location) -> FileHeader:
        """Step 1 of a rename for a file header: binding A := old name, B := new name,
        once the header verified for the old name (never re-bind what did not)."""
        if header.unbound:
            return header
        old_tag = self._accepted(self._file_message(old, header.file_id), header.bindings)
        if old_tag is None:
            raise BindingError(
                "the file to rename is bound to another name (ciphertext replaced or moved "
                "in the backing store): not re-bound"
            )
        return dataclasses.replace(header, bindings=(old_tag, self.file_tag(new, header.file_id)))

    @staticmethod
    def file_new(header: FileHeader) -> FileHeader:
        """Step 3 of a rename for a file header: bound to the new name only."""
        if header.unbound:
            return header
        return dataclasses.replace(header, bindings=(header.bindings[1], ZERO_TAG))

    # --- directories and symlinks (bound volumes) ---------------------------------------
    def dir_tag(self, location: Location, dir_id: bytes) -> bytes:
        return self._keyring.binding_tag(self._dir_message(location, dir_id))

    def root_tag(self, dir_id: bytes) -> bytes:
        return self._keyring.binding_tag(places.root_binding_message(self._volume_id, dir_id))

    def dir_problem(self, directory: Inode, record: DirRecord) -> str | None:
        """Why a bound directory's id record does not verify for its place, or None."""
        if directory.ino == ROOT_INODE:
            root = places.root_binding_message(self._volume_id, record.dir_id)
            if self._accepted(root, record.bindings) is not None:
                return None
            return "the root's id record is not bound to this volume's root"
        if directory.location is None:
            return "reached without a name: its binding cannot be checked"
        if self.found_dir_tag(directory.location, record) is not None:
            return None
        return (
            "its id record is bound to another place "
            "(directory moved, swapped or its .egw-dirid replaced in the backing store)"
        )

    def link_tag(self, location: Location, record: LinkRecord) -> bytes:
        return self._keyring.binding_tag(self._link_message(location, record))


def rewrite_header(path_fd: int, change: Callable[[FileHeader], FileHeader]) -> None:
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


def root_dir_record(config: VolumeConfig, keyring: Keyring) -> bytes:
    """The root's `.egw-dirid` of a new volume: a random id, bound to the volume when
    the volume binds directories to their place (FORMAT.md 5.1)."""
    dir_id = crypto.random_key(places.DIR_ID_SIZE)
    if FEATURE_BOUND_NAMES not in config.features:
        return dir_id
    tag = Bindings(config.volume_id, keyring).root_tag(dir_id)
    return DirRecord(dir_id, (tag, places.ZERO_BINDING)).pack()
