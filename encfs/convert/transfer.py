"""One unit into the volume: a file's data (holes stay holes), a symlink or a special
file, the unit's other hard-linked names, its metadata and xattrs; each read back through
the engine and compared (a file's data with a digest of its plaintext) before its plaintext
may go. A unit whose plaintext changed meanwhile is refused."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
from collections import Counter
from dataclasses import dataclass

from encfs.convert.records import Steps
from encfs.convert.sides import Sides
from encfs.convert.tree import (
    RelPath,
    data_extents,
    is_kept_xattr,
    metadata_record,
    open_file,
    read_xattrs,
    show,
)
from encfs.errors import IntegrityError, VolumeBusy

CHUNK = 1 << 20  # plaintext read and written per engine call


@dataclass
class Unit:
    """One inode's names (several for a hard-linked one), converted and committed together."""

    paths: list[RelPath]
    st: os.stat_result
    data_bytes: int  # allocated plaintext (what the batch's size limit counts)


class Transfer:
    """Converts and verifies units through the engine's public methods."""

    def __init__(self, sides: Sides, steps: Steps) -> None:
        self.sides = sides
        self.volume = sides.volume
        self.steps = steps

    def convert_unit(self, unit: Unit, done: Counter[str]) -> None:
        volume = self.volume
        first = unit.paths[0]
        plain_fd, owned = self.sides.plain_parent(first)
        parent = self.sides.volume_dir(first[:-1], create=True)
        assert parent is not None
        ino = None
        try:
            st = os.lstat(first[-1], dir_fd=plain_fd)
            if (st.st_ino, st.st_mode) != (unit.st.st_ino, unit.st.st_mode):
                raise VolumeBusy(f"{show(first)} changed while convert ran: stop the writers")
            name = os.fsencode(first[-1])
            ctime_ns = st.st_ctime_ns
            # a symlink's or special file's xattrs (trusted.*: the kernel keeps user.* to
            # files and directories), set before its other names are linked: link(2) of a
            # bound symlink copies its set (a file's are set after its data)
            attributes = [] if stat.S_ISREG(st.st_mode) else [
                (n, v) for n, v in read_xattrs(plain_fd, first[-1]) if is_kept_xattr(n)
            ]
            if stat.S_ISREG(st.st_mode):
                ino = self._convert_file(plain_fd, first, parent, st, done)
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(name, dir_fd=plain_fd)
                # readlink has no O_NOATIME: put the atime back (a retry copies it again)
                os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=plain_fd,
                         follow_symlinks=False)
                ctime_ns = os.lstat(name, dir_fd=plain_fd).st_ctime_ns  # our own change
                self.steps()
                ino = volume.symlink(parent, name, target, st.st_uid, st.st_gid).ino
                if volume.readlink(ino) != target:
                    raise IntegrityError(f"{show(first)}: the symlink read back differs")
                done["symlinks"] += 1
                self._set_xattrs(ino, attributes, done)
            else:
                self.steps()
                ino = volume.mknod(parent, name, st.st_mode, st.st_rdev, st.st_uid, st.st_gid).ino
                attr = volume.getattr(ino)
                if stat.S_IFMT(attr.mode) != stat.S_IFMT(st.st_mode) or attr.rdev != st.st_rdev:
                    raise IntegrityError(f"{show(first)}: the special file read back differs")
                done["specials"] += 1
                self._set_xattrs(ino, attributes, done)
            inodes = [ino]
            for rel in unit.paths[1:]:
                link_parent = self.sides.volume_dir(rel[:-1], create=True)
                assert link_parent is not None
                try:
                    self.steps()
                    inodes.append(volume.link(ino, link_parent, os.fsencode(rel[-1])).ino)
                finally:
                    volume.forget(link_parent, 1)
                done["links"] += 1
            symlink = stat.S_ISLNK(st.st_mode)
            for linked in dict.fromkeys(inodes):  # a symlink's link is a copy (bound names)
                self.set_metadata(linked, metadata_record(st), symlink)
            for linked in inodes[1:]:
                volume.forget(linked, 1)
            after = os.lstat(first[-1], dir_fd=plain_fd)
            if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
                st.st_size, st.st_mtime_ns, ctime_ns,
            ):
                raise VolumeBusy(f"{show(first)} changed while convert ran: stop the writers")
            done["names"] += len(unit.paths)
            done["verified"] += 1
        finally:
            if ino is not None:
                volume.forget(ino, 1)
            volume.forget(parent, 1)
            if owned:
                os.close(plain_fd)

    def _convert_file(
        self, plain_fd: int, rel: RelPath, parent: int, st: os.stat_result, done: Counter[str]
    ) -> int:
        """Copy the data (holes stay holes), then read it back through the engine and
        compare with the digest of the plaintext; then the xattrs."""
        volume = self.volume
        name = rel[-1]
        fd = open_file(name, plain_fd)
        try:
            if os.fstat(fd).st_ino != st.st_ino:
                raise VolumeBusy(f"{show(rel)} changed while convert ran: stop the writers")
            attributes = [(n, v) for n, v in read_xattrs(plain_fd, name) if is_kept_xattr(n)]
            self.steps()
            fh, attr = volume.create(
                parent, os.fsencode(name), 0o600, os.O_RDWR, st.st_uid, st.st_gid
            )
            ino = attr.ino
            pieces: list[tuple[int, int]] = []
            digest = hashlib.sha256(struct.pack(">Q", st.st_size))
            try:
                for offset, length in data_extents(fd, st.st_size):
                    end = offset + length
                    while offset < end:
                        data = os.pread(fd, min(CHUNK, end - offset), offset)
                        if not data:
                            raise VolumeBusy(f"{show(rel)} shrank while convert ran")
                        digest.update(struct.pack(">QQ", offset, len(data)))
                        digest.update(data)
                        pieces.append((offset, len(data)))
                        self.steps()
                        self._write_all(fh, offset, data)
                        offset += len(data)
                if volume.getattr(ino).size != st.st_size:
                    self.steps()
                    volume.setattr(ino, size=st.st_size)  # a hole at the end
            finally:
                volume.release(fh)
            self._verify(rel, ino, st.st_size, pieces, digest.digest())
            done["files"] += 1
            done["bytes"] += sum(length for _, length in pieces)
            done["sparse_files"] += sum(length for _, length in pieces) < st.st_size
            self._set_xattrs(ino, attributes, done)
            return ino
        finally:
            os.close(fd)

    def _set_xattrs(
        self, ino: int, attributes: list[tuple[bytes, bytes]], done: Counter[str]
    ) -> None:
        for xname, value in attributes:
            self.steps()
            self.volume.setxattr(ino, xname, value)
            done["xattrs"] += 1

    def _write_all(self, fh: int, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self.volume.write(fh, offset, view)
            if written <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[written:]
            offset += written

    def _verify(
        self, rel: RelPath, ino: int, size: int, pieces: list[tuple[int, int]], expected: bytes
    ) -> None:
        """Read the file back through the engine (a new handle: the header and its name
        binding are checked again) and compare with the plaintext's digest."""
        volume = self.volume
        digest = hashlib.sha256(struct.pack(">Q", size))
        fh = volume.open(ino, os.O_RDONLY)
        try:
            for offset, length in pieces:
                data = volume.read(fh, offset, length)
                digest.update(struct.pack(">QQ", offset, len(data)))
                digest.update(data)
        finally:
            volume.release(fh)
        if volume.getattr(ino).size != size or digest.digest() != expected:
            raise IntegrityError(
                f"{show(rel)}: the encrypted copy read back differs from the plaintext; "
                "the plaintext is kept"
            )

    def set_metadata(self, vino: int, meta: list[int], symlink: bool) -> None:
        """Ownership, then the mode (not a symlink's), then the times, from `meta`."""
        mode, uid, gid, atime_ns, mtime_ns = meta
        attr = self.volume.getattr(vino)
        if (attr.uid, attr.gid) != (uid, gid):
            self.steps()
            self.volume.setattr(vino, uid=uid, gid=gid)
        if not symlink:  # after chown, which clears setuid/setgid
            self.steps()
            self.volume.setattr(vino, mode=stat.S_IMODE(mode))
        self.steps()
        self.volume.setattr(vino, atime_ns=atime_ns, mtime_ns=mtime_ns)
