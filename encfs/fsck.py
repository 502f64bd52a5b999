"""Offline volume check and repair (layer L4).

Walks the volume from the root with the key: every name decrypts, every directory has
its id, every symlink target opens, every file header and name binding verifies, every
block authenticates, key records beyond the end of a file are empty, link counts match
the names found. `repair` fixes only what needs no guessing and never deletes data that
can be read: leftover temporary entries, orphaned long-name sidecars, orphaned key
records, half-created files (a header that was never completely written), a torn last
block (cut off at the last block that authenticates), and undecryptable entries (moved
into /lost+found, never deleted).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from encfs import backing
from encfs.errors import EncfsError, IntegrityError
from encfs.format import names as fnames
from encfs.format.blocks import (
    BLOCKS_PER_GROUP,
    HEADER_SIZE,
    KEY_RECORD_SIZE,
)
from encfs.volume import ROOT_INODE, Volume

log = logging.getLogger(__name__)

LOST_AND_FOUND = b"lost+found"


class FsckProblems(EncfsError):
    """fsck found problems that remain (not repaired, or not repairable)."""

    exit_code = 31


@dataclass
class Finding:
    path: str  # plaintext path when known, else the backing path
    kind: str
    detail: str
    repairable: bool
    repaired: bool = False
    block: int | None = None


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    blocks: int = 0
    bytes: int = 0

    @property
    def remaining(self) -> list[Finding]:
        return [f for f in self.findings if not f.repaired]

    def as_dict(self) -> dict:
        return {
            "files": self.files,
            "directories": self.directories,
            "symlinks": self.symlinks,
            "blocks": self.blocks,
            "bytes": self.bytes,
            "findings": [asdict(f) for f in self.findings],
            "repaired": sum(f.repaired for f in self.findings),
            "remaining": len(self.remaining),
        }


class Checker:
    def __init__(
        self,
        volume: Volume,
        repair: bool = False,
        on_progress: Callable[[Report], None] | None = None,
    ) -> None:
        self.volume = volume
        self.repair = repair
        self.on_progress = on_progress
        self.report = Report()
        self._names_per_inode: Counter[int] = Counter()
        self._nlink: dict[int, tuple[int, str]] = {}

    # --- reporting -----------------------------------------------------------------------
    def _find(self, path: str, kind: str, detail: str, repairable: bool, fix=None, block=None):
        finding = Finding(path, kind, detail, repairable, block=block)
        if repairable and self.repair and fix is not None:
            try:
                fix()
                finding.repaired = True
            except (OSError, EncfsError) as exc:
                finding.detail += f" (repair failed: {exc})"
        self.report.findings.append(finding)

    # --- the walk --------------------------------------------------------------------------
    def run(self) -> Report:
        self._directory(ROOT_INODE, "")
        for ino, (nlink, path) in self._nlink.items():
            found = self._names_per_inode[ino]
            if found != nlink:
                self._find(
                    path,
                    "link count",
                    f"the backing inode has {nlink} links but {found} readable names",
                    repairable=False,
                )
        return self.report

    def _directory(self, ino: int, path: str) -> None:
        self.report.directories += 1
        entries = self.volume.scan_directory(ino)
        present = {name for name, *_ in entries}
        for backing_name, kind, plain, error in entries:
            where = f"{path}/{plain.decode(errors='surrogateescape')}" if plain else path
            if kind == "reserved":
                self._reserved(ino, path, backing_name, present)
            elif plain is None:
                self._find(
                    f"{path}/<backing {backing_name}>",
                    "undecryptable name",
                    error or "",
                    repairable=True,
                    fix=lambda b=backing_name: self._to_lost_and_found(ino, b),
                )
            else:
                self._entry(ino, plain, where)

    def _reserved(self, ino: int, path: str, name: str, present: set[str]) -> None:
        dir_fd = self.volume.directory_fd(ino)
        if name == fnames.DIR_ID_FILE or (
            ino == ROOT_INODE and name in (fnames.CONFIG_FILE, fnames.LOCK_FILE)
        ):
            return
        if name.startswith(fnames.TEMP_PREFIX):
            self._find(
                f"{path}/<backing {name}>",
                "leftover temporary entry",
                "left by an interrupted mkdir, rmdir, rename or config write",
                repairable=_only_reserved_inside(dir_fd, name),
                fix=lambda: _remove(dir_fd, name),
            )
        elif name.endswith(fnames.LONG_NAME_SIDECAR_SUFFIX) and name.startswith(
            fnames.LONG_NAME_PREFIX
        ):
            if name.removesuffix(fnames.LONG_NAME_SIDECAR_SUFFIX) not in present:
                self._find(
                    f"{path}/<backing {name}>",
                    "orphaned long-name sidecar",
                    "its entry is gone",
                    repairable=True,
                    fix=lambda: os.unlink(name, dir_fd=dir_fd),
                )
        elif not name.startswith(".egw"):
            self._find(
                f"{path}/<backing {name}>",
                "unknown entry",
                "not written by encfs-gw",
                repairable=False,
            )

    def _entry(self, parent: int, plain: bytes, path: str) -> None:
        try:
            attr = self.volume.lookup(parent, plain)
        except OSError as exc:
            self._find(path, "unreadable entry", str(exc), repairable=False)
            return
        except IntegrityError as exc:
            self._find(path, "unreadable entry", str(exc), repairable=False)
            return
        self._names_per_inode[attr.ino] += 1
        if stat.S_ISDIR(attr.mode):
            try:
                self._directory(attr.ino, path)
            except IntegrityError as exc:
                self._find(path, "directory without id", str(exc), repairable=False)
        elif stat.S_ISLNK(attr.mode):
            self.report.symlinks += 1
            try:
                self.volume.readlink(attr.ino)
            except IntegrityError as exc:
                self._find(path, "symlink target", str(exc), repairable=False)
        elif stat.S_ISREG(attr.mode):
            self._nlink.setdefault(attr.ino, (attr.nlink, path))
            if self._names_per_inode[attr.ino] == 1:
                self._file(parent, plain, attr.ino, path)

    def _file(self, parent: int, plain: bytes, ino: int, path: str) -> None:
        self.report.files += 1
        volume = self.volume
        data_fd = backing.reopen(volume.inode(ino).fd, os.O_RDWR)
        try:
            cipher_size = os.fstat(data_fd).st_size
            if 0 < cipher_size < HEADER_SIZE:
                self._find(
                    path,
                    "half-created file",
                    f"header cut at {cipher_size} bytes",
                    repairable=True,
                    fix=lambda: os.ftruncate(data_fd, 0),
                )
                return
            try:
                fh = volume.open(ino, os.O_RDONLY)
            except IntegrityError as exc:
                self._find(
                    path,
                    "bad header",
                    str(exc),
                    repairable=True,
                    fix=lambda: self._to_lost_and_found(
                        parent, volume.backing_name(parent, plain)[0]
                    ),
                )
                return
            try:
                self._blocks(fh, ino, data_fd, path)
            finally:
                volume.release(fh)
            self._orphan_slots(data_fd, path)
        finally:
            os.close(data_fd)
        if self.on_progress is not None:
            self.on_progress(self.report)

    def _blocks(self, fh: int, ino: int, data_fd: int, path: str) -> None:
        volume = self.volume
        block_size = volume.layout.block_size
        size = volume.getattr(ino).size
        bad: list[int] = []
        chunk = block_size * BLOCKS_PER_GROUP
        for offset in range(0, size, chunk):
            try:
                data = volume.read(fh, offset, chunk)
                self.report.bytes += len(data)
                self.report.blocks += -(-len(data) // block_size)
                continue
            except IntegrityError:
                pass
            for block_offset in range(offset, min(offset + chunk, size), block_size):
                try:
                    volume.read(fh, block_offset, block_size)
                    self.report.blocks += 1
                except IntegrityError:
                    bad.append(block_offset // block_size)
        last = (size - 1) // block_size if size else -1
        for index in bad:
            torn_tail = index == last
            self._find(
                path,
                "torn tail" if torn_tail else "block does not authenticate",
                f"block {index}",
                repairable=torn_tail,
                fix=(lambda i=index: volume.setattr(ino, size=i * block_size))
                if torn_tail
                else None,
                block=index,
            )

    def _orphan_slots(self, data_fd: int, path: str) -> None:
        """Key records of blocks past the end of the file must be empty."""
        layout = self.volume.layout
        cipher_size = os.fstat(data_fd).st_size
        blocks = -(-layout.plain_size(cipher_size) // layout.block_size)
        if blocks % BLOCKS_PER_GROUP == 0:
            return
        start = layout.key_record_offset(blocks)
        group_end = layout.key_record_offset(blocks - blocks % BLOCKS_PER_GROUP)
        group_end += BLOCKS_PER_GROUP * KEY_RECORD_SIZE
        end = min(group_end, cipher_size)
        if start >= end:
            return
        if any(os.pread(data_fd, end - start, start)):
            self._find(
                path,
                "orphaned key records",
                "key slots of blocks past the end of the file",
                repairable=True,
                fix=lambda: os.pwrite(data_fd, bytes(end - start), start),
            )

    # --- lost+found ------------------------------------------------------------------------
    def _lost_and_found(self) -> int:
        try:
            return self.volume.lookup(ROOT_INODE, LOST_AND_FOUND).ino
        except FileNotFoundError:
            return self.volume.mkdir(ROOT_INODE, LOST_AND_FOUND, 0o40700, 0, 0).ino

    def _to_lost_and_found(self, parent: int, backing_name: str) -> None:
        """Move a backing entry, unread, into /lost+found under a readable name."""
        target = self._lost_and_found()
        source_fd = self.volume.directory_fd(parent)
        plain = b"undecryptable-" + backing_name.encode()[:200]
        new_backing, encoded = self.volume.backing_name(target, plain)
        target_fd = self.volume.directory_fd(target)
        if new_backing != encoded:
            backing.write_file_atomic(
                target_fd, fnames.sidecar_name(new_backing), encoded.encode(), 0o400
            )
        st = os.stat(backing_name, dir_fd=source_fd, follow_symlinks=False)
        if stat.S_ISREG(st.st_mode) and st.st_size >= HEADER_SIZE:
            with contextlib.suppress(IntegrityError):  # a bad header stays as it is
                self.volume.unbind_file(parent, backing_name)
        backing.renameat2(source_fd, backing_name, target_fd, new_backing, backing.RENAME_NOREPLACE)


def _only_reserved_inside(dir_fd: int, name: str) -> bool:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        return True
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        return all(fnames.classify(n) == "reserved" for n in os.listdir(fd))
    finally:
        os.close(fd)


def _remove(dir_fd: int, name: str) -> None:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        for entry in os.listdir(fd):
            os.unlink(entry, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def fsck(
    volume: Volume, repair: bool = False, on_progress: Callable[[Report], None] | None = None
) -> Report:
    return Checker(volume, repair, on_progress).run()
