"""Offline volume check and repair (layer L5).

Walks the volume from the root with the key: every name decrypts, every directory has
its id (bound to its place on a bound volume), every symlink target opens (and is bound
to its link), every file header and name binding verifies, every block authenticates,
key records beyond the end of a file are empty, link counts match the names found.

Each finding says what it looks like, as far as the format can tell: `crash debris`
(what an interrupted operation of encfs-gw leaves, and nothing else), `tampering` (no
crash of encfs-gw leaves it: data altered, moved, swapped or replaced in the backing
store, or damaged by the storage), or `crash or tampering` (a crash and a deliberate
truncation leave the same bytes).

`repair` never deletes data that can be read and never makes data that failed
authentication readable or valid (nothing is re-tagged). It removes crash debris that
holds no data (temporary entries, orphaned long-name sidecars); it moves what failed
authentication, unchanged, into the quarantine (encfs/admin/quarantine.py), where the mount
never shows it and only `fsck --export-quarantine` reads it; and before it changes a
file (a torn tail cut off, orphaned key records cleared, a half-written header cleared)
it copies the file as it was into the quarantine. A block that fails inside readable
data, or a last block that fails where no crash could have cut it, is reported and left.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from encfs import backing
from encfs.admin import quarantine
from encfs.engine import ROOT_INODE, Attr, BindingError, Volume
from encfs.errors import EncfsError, IntegrityError
from encfs.format import names as fnames
from encfs.format.blocks import (
    BLOCKS_PER_GROUP,
    HEADER_SIZE,
    KEY_RECORD_FIELDS,
    KEY_RECORD_SIZE,
    slot_candidates,
)
from encfs.format.places import STORED_LINK_LENGTH, LinkRecord

log = logging.getLogger(__name__)

CRASH = "crash debris"
TAMPERING = "tampering"
EITHER = "crash or tampering"
# A kill inside a pwrite stops it at a page boundary (the kernel copies page by page and
# checks for a fatal signal between pages): a file extended by an interrupted write ends
# at a multiple of this.
PAGE_SIZE = os.sysconf("SC_PAGESIZE")


@dataclass
class Finding:
    path: str  # plaintext path when known, else the backing path
    kind: str
    detail: str
    repairable: bool
    repaired: bool = False
    block: int | None = None
    looks_like: str = TAMPERING
    quarantine: str | None = None  # the quarantine item holding the evidence


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    blocks: int = 0
    bytes: int = 0
    quarantined: int = 0  # items in the quarantine after this run

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
            "quarantined": self.quarantined,
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
    def _find(
        self,
        path: str,
        kind: str,
        detail: str,
        looks_like: str,
        fix: Callable[[], str | None] | None = None,
        block: int | None = None,
    ) -> None:
        """Record a finding; with --repair run its fix (which returns the quarantine
        item it made, if any)."""
        finding = Finding(path, kind, detail, fix is not None, block=block, looks_like=looks_like)
        if self.repair and fix is not None:
            try:
                finding.quarantine = fix()
                finding.repaired = True
            except (OSError, EncfsError) as exc:
                finding.detail += f" (repair failed: {exc})"
        self.report.findings.append(finding)

    def _quarantine_entry(
        self, dir_ino: int, backing_name: str, path: str, kind: str, detail: str,
        looks_like: str, backing_path: str, store_id: bytes | None = None,
    ) -> Callable[[], str]:
        """A fix that moves a backing entry, unchanged, into the quarantine."""

        def fix() -> str:
            return quarantine.move_in(
                self.volume,
                self.volume.directory_fd(dir_ino),
                backing_name,
                _record(path, kind, detail, looks_like, backing_path),
                store_id,
            )

        return fix

    # --- the walk --------------------------------------------------------------------------
    def run(self) -> Report:
        self._orphans()
        try:
            self._directory(ROOT_INODE, "", "")
        except IntegrityError as exc:
            self._find("/", _dir_kind(exc), str(exc), TAMPERING)
        for ino, (nlink, path) in self._nlink.items():
            found = self._names_per_inode[ino]
            if found != nlink:
                self._find(
                    path,
                    "link count",
                    f"the backing inode has {nlink} links but {found} readable names",
                    TAMPERING,
                )
        self.report.quarantined = len(quarantine.items(self.volume))
        return self.report

    def _orphans(self) -> None:
        """What a killed daemon left in the orphan directory (engine/orphans.py): objects
        in use whose last name, or one of several, was removed. One finding; the repair
        removes them (a link of a file with other names: only that link)."""
        leftovers = self.volume.orphan_leftovers()
        if not leftovers:
            return

        def fix() -> None:
            self.volume.clear_orphans()

        self._find(
            f"/<backing {fnames.ORPHAN_DIR}>",
            "leftover unlinked open objects",
            f"{len(leftovers)} objects a killed mount still used after a name of theirs "
            "was removed (the next writable mount removes them too)",
            CRASH,
            fix=fix,
        )
        if self.report.findings[-1].repaired:
            return  # (their links are gone: the count check counts the rest)
        for _, ino in leftovers:
            # (a hard-linked file, or one killed in the middle of a rename over it, keeps
            # its other names: its orphan link is one of the links the count check expects)
            self._names_per_inode[ino] += 1

    def _directory(self, ino: int, path: str, backing_path: str) -> None:
        entries = self.volume.scan_directory(ino)  # raises if the directory fails
        self.report.directories += 1
        present = {name for name, *_ in entries}
        for backing_name, kind, plain, error in entries:
            where = f"{path}/{plain.decode(errors='surrogateescape')}" if plain else path
            backing_where = f"{backing_path}/{backing_name}"
            if kind == "reserved":
                self._reserved(ino, path, backing_name, present)
            elif plain is None:
                detail = error or ""
                self._find(
                    f"{path}/<backing {backing_name}>",
                    "undecryptable name",
                    detail,
                    TAMPERING,
                    fix=self._quarantine_entry(
                        ino, backing_name, f"{path}/<backing {backing_name}>",
                        "undecryptable name", detail, TAMPERING, backing_where,
                    ),
                )
            else:
                self._entry(ino, plain, where, backing_name, backing_where)

    def _reserved(self, ino: int, path: str, name: str, present: set[str]) -> None:
        dir_fd = self.volume.directory_fd(ino)
        if name == fnames.DIR_ID_FILE or (
            ino == ROOT_INODE and name in (fnames.CONFIG_FILE, fnames.LOCK_FILE)
        ):
            return
        if name.startswith(fnames.TEMP_PREFIX):
            if _only_reserved_inside(dir_fd, name):
                self._find(
                    f"{path}/<backing {name}>",
                    "leftover temporary entry",
                    "left by an interrupted mkdir, rmdir, rename or config write",
                    CRASH,
                    fix=lambda: _remove(dir_fd, name),
                )
            else:
                self._find(
                    f"{path}/<backing {name}>",
                    "leftover temporary entry",
                    "a temporary directory holding entries: no crash of encfs-gw leaves one",
                    TAMPERING,
                )
        elif name.endswith(fnames.LONG_NAME_SIDECAR_SUFFIX) and name.startswith(
            fnames.LONG_NAME_PREFIX
        ):
            if name.removesuffix(fnames.LONG_NAME_SIDECAR_SUFFIX) not in present:
                self._find(
                    f"{path}/<backing {name}>",
                    "orphaned long-name sidecar",
                    "its entry is gone",
                    CRASH,
                    fix=lambda: _unlink(dir_fd, name),
                )
        elif not name.startswith(".egw"):
            self._find(
                f"{path}/<backing {name}>",
                "unknown entry",
                "not written by encfs-gw",
                TAMPERING,
            )

    def _entry(
        self, parent: int, plain: bytes, path: str, backing_name: str, backing_path: str
    ) -> None:
        try:
            attr = self.volume.lookup(parent, plain)
        except (OSError, IntegrityError) as exc:
            self._find(path, "unreadable entry", str(exc), TAMPERING)
            return
        self._names_per_inode[attr.ino] += 1
        findings = len(self.report.findings)
        self._object(parent, attr, plain, path, backing_name, backing_path)
        # Then its xattr set (docs/FORMAT.md 5.4.2), once per object and only when nothing
        # else was found on it (a failed header or place fails the set's owner too).
        if (
            self.volume.xattr_sets
            and self._names_per_inode[attr.ino] == 1
            and len(self.report.findings) == findings
        ):
            try:
                self.volume.listxattr(attr.ino)
            except IntegrityError as exc:
                self._find(path, "xattr set does not open", str(exc), TAMPERING)
            except OSError:
                pass  # (a non-root fsck cannot read trusted.* sets; nothing to say)

    def _object(
        self, parent: int, attr: Attr, plain: bytes, path: str, backing_name: str,
        backing_path: str,
    ) -> None:
        if stat.S_ISDIR(attr.mode):
            try:
                self._directory(attr.ino, path, backing_path)
            except IntegrityError as exc:
                kind = _dir_kind(exc)
                detail = f"{exc}; its contents were not checked"
                self._find(
                    path, kind, detail, TAMPERING,
                    fix=self._quarantine_entry(
                        parent, backing_name, path, kind, detail, TAMPERING, backing_path
                    ),
                )
        elif stat.S_ISLNK(attr.mode):
            self.report.symlinks += 1
            try:
                self.volume.readlink(attr.ino)
            except IntegrityError as exc:
                kind = (
                    "symlink bound to another place"
                    if isinstance(exc, BindingError)
                    else "symlink target does not open"
                )
                self._find(
                    path, kind, str(exc), TAMPERING,
                    fix=self._quarantine_entry(
                        parent, backing_name, path, kind, str(exc), TAMPERING, backing_path,
                        self._store_id(attr.ino),
                    ),
                )
        elif stat.S_ISREG(attr.mode):
            self._nlink.setdefault(attr.ino, (attr.nlink, path))
            if self._names_per_inode[attr.ino] == 1:
                self._file(parent, attr.ino, path, backing_name, backing_path)

    def _store_id(self, ino: int) -> bytes | None:
        """The symlink store file a (failed) symlink names, to keep a copy beside it."""
        try:
            cipher_target = os.readlink("", dir_fd=self.volume.inode(ino).fd)
            if self.volume.bound_names:
                if len(cipher_target) != STORED_LINK_LENGTH:
                    return None
                record = LinkRecord.decode(cipher_target)
                return record.link_id if record.stored else None
            return fnames.long_symlink_id(cipher_target)
        except (OSError, IntegrityError):
            return None

    def _file(
        self, parent: int, ino: int, path: str, backing_name: str, backing_path: str
    ) -> None:
        self.report.files += 1
        volume = self.volume
        data_fd = backing.reopen(volume.inode(ino).fd, os.O_RDWR)
        try:
            cipher_size = os.fstat(data_fd).st_size
            if 0 < cipher_size < HEADER_SIZE:
                self._find(
                    path,
                    "half-created file",
                    f"header cut at {cipher_size} bytes (a crash while it was written)",
                    CRASH,
                    fix=self._copy_then(
                        data_fd, path, "half-created file", CRASH, backing_path,
                        lambda: os.ftruncate(data_fd, 0),
                    ),
                )
                return
            try:
                fh = volume.open(ino, os.O_RDONLY)
            except IntegrityError as exc:
                bound_elsewhere = isinstance(exc, BindingError)
                kind = "file bound to another name" if bound_elsewhere else "bad header"
                self._find(
                    path, kind, str(exc), TAMPERING,
                    fix=self._quarantine_entry(
                        parent, backing_name, path, kind, str(exc), TAMPERING, backing_path
                    ),
                )
                return
            try:
                self._blocks(fh, ino, data_fd, path, backing_path)
            finally:
                volume.release(fh)
            self._orphan_slots(data_fd, path, backing_path)
        finally:
            os.close(data_fd)
        if self.on_progress is not None:
            self.on_progress(self.report)

    def _copy_then(
        self, data_fd: int, path: str, kind: str, looks_like: str, backing_path: str,
        change: Callable[[], object],
    ) -> Callable[[], str]:
        """A fix that first copies the file as it is into the quarantine, then changes it."""

        def fix() -> str:
            item = quarantine.copy_in(
                self.volume, data_fd,
                _record(path, kind, "copy of the file before the repair", looks_like,
                        backing_path),
            )
            change()
            return item

        return fix

    def _blocks(self, fh: int, ino: int, data_fd: int, path: str, backing_path: str) -> None:
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
        cipher_size = os.fstat(data_fd).st_size
        for index in bad:
            interrupted = self._live_slots(data_fd, index) == 2
            if index != last:
                self._find(
                    path,
                    "block does not authenticate",
                    f"block {index}: "
                    + (
                        "it has two key slots: a kill inside the write of its record"
                        if interrupted
                        else "a complete block with one key: no crash leaves that"
                    )
                    + " (not repaired: the rest of the file reads)",
                    CRASH if interrupted else TAMPERING,
                    block=index,
                )
            elif interrupted or cipher_size % PAGE_SIZE == 0:
                why = (
                    "it has two key slots: a kill while the block was rewritten or cut"
                    if interrupted
                    else f"the file ends at a page boundary ({cipher_size} bytes): a kill "
                    "inside the write that extended it"
                )
                self._find(
                    path,
                    "torn tail",
                    f"block {index}: {why}; repair cuts the file at block {index} "
                    "(the whole file kept in quarantine first)",
                    CRASH,
                    fix=self._copy_then(
                        data_fd, path, "torn tail", CRASH, backing_path,
                        lambda i=index: volume.setattr(ino, size=i * block_size),
                    ),
                    block=index,
                )
            else:
                self._find(
                    path,
                    "last block does not authenticate",
                    f"block {index}: a complete last block with one key, not cut where a "
                    "crash cuts: no crash leaves that (not repaired)",
                    TAMPERING,
                    block=index,
                )

    def _live_slots(self, data_fd: int, index: int) -> int:
        raw = os.pread(data_fd, KEY_RECORD_SIZE, self.volume.layout.key_record_offset(index))
        if len(raw) < KEY_RECORD_SIZE:
            return 0
        candidates = slot_candidates(KEY_RECORD_FIELDS.unpack(raw))
        return len(candidates) if candidates is not None else 0

    def _orphan_slots(self, data_fd: int, path: str, backing_path: str) -> None:
        """Key records of blocks past the end of the file must be empty."""
        layout = self.volume.layout
        cipher_size = os.fstat(data_fd).st_size
        plain_size = layout.plain_size(cipher_size)
        blocks = -(-plain_size // layout.block_size)
        if blocks % BLOCKS_PER_GROUP == 0:
            self._key_area_past_the_end(data_fd, path, backing_path, plain_size, cipher_size)
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
                "key slots of blocks past the end of the file: an interrupted write or "
                "truncate leaves them, and so does a file cut short at a block boundary "
                "by someone else (the format cannot tell which); repair clears them (the "
                "whole file kept in quarantine first)",
                EITHER,
                fix=self._copy_then(
                    data_fd, path, "orphaned key records", EITHER, backing_path,
                    lambda: backing.pwrite_all(data_fd, bytes(end - start), start),
                ),
            )


    def _key_area_past_the_end(
        self, data_fd: int, path: str, backing_path: str, plain_size: int, cipher_size: int
    ) -> None:
        """A file whose blocks fill whole key groups and that goes on into the next key
        area: an append cut after its key slots (FORMAT.md 4). No block of that group is
        in the file; repair cuts the file back to its last block."""
        data_end = self.volume.layout.cipher_size(plain_size)
        if cipher_size <= data_end or not any(
            os.pread(data_fd, cipher_size - data_end, data_end)
        ):
            return
        self._find(
            path,
            "orphaned key records",
            "key slots in a key area past the end of the file: an append cut after its "
            "key slots leaves them, and so does a file cut short by someone else (the "
            "format cannot tell which); repair cuts them off (the whole file kept in "
            "quarantine first)",
            EITHER,
            fix=self._copy_then(
                data_fd, path, "orphaned key records", EITHER, backing_path,
                lambda: os.ftruncate(data_fd, data_end),
            ),
        )

def _dir_kind(exc: IntegrityError) -> str:
    if isinstance(exc, BindingError):
        return "directory bound to another place"
    return "bad directory id"


def _record(path: str, kind: str, detail: str, looks_like: str, backing_path: str) -> dict:
    return {
        "path": path,
        "kind": kind,
        "detail": detail,
        "looks_like": looks_like,
        "backing_path": backing_path.lstrip("/"),
    }


def _only_reserved_inside(dir_fd: int, name: str) -> bool:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        return True
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        return all(fnames.classify(n) == "reserved" for n in os.listdir(fd))
    finally:
        os.close(fd)


def _unlink(dir_fd: int, name: str) -> None:
    os.unlink(name, dir_fd=dir_fd)


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
