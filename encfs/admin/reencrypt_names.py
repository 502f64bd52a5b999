"""The name pass of `encfs-gw reencrypt` (layer L5; docs/FORMAT.md 9.2): everything keyed
from the volume key moved from the old epoch's keys to the new epoch's, offline, under
the volume lock.

What moves: every directory entry name (long names: their sidecars), every directory's
id record binding, every file header binding (bound and UNBOUND), every bound symlink
(its place binding and its inline target), the sealed symlink targets of the symlink
store, every xattr set (inline records and the files of the xattr store); and, after
the tree, what of the objects in the orphan directory is keyed from the volume key
(`_orphans`: a leftover's bindings name a place only its dead mount knew, and stay).

Each step changes one thing atomically, so every item is always readable under exactly
one of the two epochs, and a run killed anywhere is resumed by walking again (a step
finds its item under the new keys and skips it):

* store files (symlink store, xattr store): re-sealed and renamed over (write_atomic);
* a directory's `.egw-dirid`: the record bound under the new key renamed over;
* a file header: the A/B protocol of renames, with keys instead of places: (old tag,
  new tag) then (new tag, zero); an UNBOUND header's tag in one 64-byte pwrite;
* an xattr set record: one setxattr (the backing filesystem replaces it atomically);
* a bound symlink: a new backing symlink (same link id, owner, times, xattr record
  under the new key) renamed over the old one;
* an entry name: RENAME_NOREPLACE of the old backing name to the new one in the same
  directory; a long name's new sidecar is written first and its old one removed last
  (sidecars whose stub is gone are removed when their directory is done).

The walk is depth first by directory handles (O_NOFOLLOW): only the current directory
and its ancestors are open. Only volumes with bound-names and xattr-sets (every volume
made by this version) have a name pass; older ones keep their volume key
(encfs.admin.reencrypt says so in its result).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import stat
from collections import Counter
from collections.abc import Callable, Iterator

from encfs import backing, crypto
from encfs.admin import quarantine
from encfs.admin.reencrypt_journal import crash_at
from encfs.engine import Volume
from encfs.engine.bindings import UNBOUND_LABEL, ZERO_TAG, Bindings, rewrite_header
from encfs.engine.follow import EntryFollower
from encfs.engine.names import write_atomic
from encfs.engine.symlinks import replace_symlink
from encfs.engine.xattr_sets import SetOwner, XattrSets
from encfs.errors import IntegrityError
from encfs.format import names as fnames
from encfs.format import places
from encfs.format import xattrs as xformat
from encfs.format.blocks import HEADER_SIZE, FileHeader
from encfs.format.places import DirRecord, LinkRecord
from encfs.keyring import EpochKeys

log = logging.getLogger(__name__)

# O_NOATIME: the pass reads, it does not use them (the owner's times stay)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOATIME


NAME_COUNTERS = (
    "directories", "entries", "moved", "dir_records_moved", "headers_moved", "symlinks_moved",
    "xattr_sets_moved", "store_files_moved", "stale_sidecars_removed",
    "unreadable",  # damaged before the pass: under neither key (fsck reports it)
)


class NameStats(Counter):
    """What the name pass did, by NAME_COUNTERS."""

    def as_dict(self) -> dict[str, int]:
        return {f"names_{key}": self[key] for key in NAME_COUNTERS}


class NamePass:
    """Moves one volume from the keys of epoch `old_epoch` to the current epoch's."""

    def __init__(
        self, volume: Volume, old_epoch: int, observer: EntryFollower | None = None
    ) -> None:
        keyring = volume.keyring
        # Online (the daemon's pass): the engine's inodes and listings follow each step.
        self._observer = observer
        self.old: EpochKeys = keyring.epoch_keys(old_epoch)
        self.new: EpochKeys = keyring.epoch_keys()
        self.volume_id = volume.config.volume_id
        self.root_fd = volume.root_fd
        self._bind_old = Bindings(self.volume_id, self.old)  # type: ignore[arg-type]
        self._bind_new = Bindings(self.volume_id, self.new)  # type: ignore[arg-type]
        self._sets_old = XattrSets(self.old.xattr_value_key, self.volume_id, self.root_fd)
        self._sets_new = XattrSets(self.new.xattr_value_key, self.volume_id, self.root_fd)
        self.stats: NameStats = NameStats()
        self._crash = crash_at()
        self._steps: Counter[str] = Counter()

    # --- crash hook (tests only) ------------------------------------------------------
    def _step(self, step: str) -> None:
        self._steps[step] += 1
        if self._crash is not None and self._crash == (self._steps[step], step):
            os.kill(os.getpid(), signal.SIGKILL)

    # --- the whole pass -----------------------------------------------------------------
    def run(self) -> NameStats:
        self.stores()
        for _ in self.steps():
            pass
        return self.stats

    def stores(self) -> None:
        """The store files (symlink targets, xattr sets) and fsck's quarantine records:
        what no directory walk meets."""
        self._store_files(fnames.SYMLINK_STORE_DIR, self._reseal_symlink_store_file)
        self._store_files(xformat.STORE_DIR, self._reseal_xattr_store_file)
        self._quarantine_records()

    def moved(self) -> int:
        """How many items this pass moved so far (a walk that moved none found nothing
        left under the old keys)."""
        return sum(n for key, n in self.stats.items() if key not in (
            "directories", "entries", "unreadable",
        ))

    def steps(self) -> Iterator[NameStats]:
        """Every directory, depth first; yields after each one (the root's comes with
        the first); then the orphan directory's objects, one more step."""
        root = backing.open_quietly(".", _DIR_FLAGS, dir_fd=self.root_fd)
        stack: list[tuple[int, Iterator[tuple[str, bytes, bytes]]]] = []
        try:
            stack.append((root, iter(self._directory(root, None))))
            while stack:
                dir_fd, pending = stack[-1]
                for name, parent_id, plain in pending:  # the next subdirectory, if any
                    try:
                        fd = backing.open_quietly(name, _DIR_FLAGS, dir_fd=dir_fd)
                    except (FileNotFoundError, NotADirectoryError):
                        continue  # moved through the mount since its listing: a later walk
                    try:
                        subdirs = self._directory(fd, (parent_id, plain))
                    except BaseException:
                        os.close(fd)
                        raise
                    stack.append((fd, iter(subdirs)))
                    break
                else:  # all done below it
                    stack.pop()
                    os.close(dir_fd)
                yield self.stats  # (at most one directory moved per step)
        finally:
            for dir_fd, _ in stack:
                os.close(dir_fd)
        self._orphans()
        yield self.stats

    # --- the orphan directory ---------------------------------------------------------------
    def _orphans(self) -> None:
        """The objects in the orphan directory (engine/orphans.py: in use after their
        last name was removed, or a killed mount's leftovers), after the tree. Their
        names are random (nothing to move); their xattr sets, inline symlink targets and
        UNBOUND headers name no place: moved. Their bindings name their last place,
        which only the mount using them knows (the observer): moved online; a leftover's
        stay as they are (no name reaches it again: the next writable mount removes it)."""
        try:
            dir_fd = backing.open_quietly(fnames.ORPHAN_DIR, _DIR_FLAGS, dir_fd=self.root_fd)
        except OSError:  # none, or not a directory (not ours, not followed: Orphans)
            return
        try:
            for name in sorted(os.listdir(dir_fd)):
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # dropped since the listing (online)
                where = None if self._observer is None else self._observer.orphan_location(st)
                if stat.S_ISREG(st.st_mode):
                    self._file(dir_fd, name, where)
                elif stat.S_ISLNK(st.st_mode):
                    self._symlink(dir_fd, name, where, st)
                elif stat.S_ISDIR(st.st_mode):
                    self._removed_directory(dir_fd, name, where)
                else:
                    self._xattrs_at(dir_fd, name, xformat.KIND_OTHER, b"",
                                    xformat.SET_XATTR_TRUSTED)
        finally:
            os.close(dir_fd)

    def _removed_directory(
        self, dir_fd: int, name: str, location: tuple[bytes, bytes] | None
    ) -> None:
        """A directory in the orphan directory: removed, so empty (but for its reserved
        files): its id record (if its place is known) and its xattr set."""
        fd = backing.open_quietly(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            if location is not None:
                dir_id = self._dir_record(fd, location)
            else:
                try:
                    record = backing.read_small_file(fd, fnames.DIR_ID_FILE, 64)
                except FileNotFoundError:
                    return  # (a crash inside an rmdir: no id, so no set either)
                dir_id = DirRecord.unpack(record).dir_id
            self._xattrs(f"/proc/self/fd/{fd}", xformat.KIND_DIRECTORY, dir_id,
                         xformat.SET_XATTR_USER)
        finally:
            os.close(fd)

    # --- one directory --------------------------------------------------------------------
    def _directory(
        self, dir_fd: int, location: tuple[bytes, bytes] | None
    ) -> list[tuple[str, bytes, bytes]]:
        """Move the directory's id record, its xattrs and every entry in it; returns its
        subdirectories as (backing name now, its id, plain name)."""
        self.stats["directories"] += 1
        times = os.fstat(dir_fd)  # renames in it are not the owner's changes: kept
        dir_id = self._dir_record(dir_fd, location)
        self._xattrs(f"/proc/self/fd/{dir_fd}", xformat.KIND_DIRECTORY, dir_id,
                     xformat.SET_XATTR_USER)
        subdirs = []
        moves: dict[str, str] = {}
        names = sorted(os.listdir(dir_fd))
        for name in names:
            if fnames.classify(name) == "reserved":
                continue
            self.stats["entries"] += 1
            plain = self._plain_name(dir_fd, dir_id, name)
            if plain is None:
                continue
            plain_name, epoch_is_new = plain
            location_here = (dir_id, plain_name)
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                self._file(dir_fd, name, location_here)
            elif stat.S_ISLNK(st.st_mode):
                self._symlink(dir_fd, name, location_here, st)
            elif not stat.S_ISDIR(st.st_mode):
                self._xattrs_at(dir_fd, name, xformat.KIND_OTHER, b"",
                                xformat.SET_XATTR_TRUSTED)
            if not epoch_is_new:
                old_name, name = name, self._rename(dir_fd, dir_id, name, plain_name)
                moves[old_name] = name
            if stat.S_ISDIR(st.st_mode):
                subdirs.append((name, dir_id, plain_name))
        if self._observer is not None:
            self._observer.directory_moved(dir_fd, moves)
        self._stale_sidecars(dir_fd)
        os.utime(dir_fd, ns=(times.st_atime_ns, times.st_mtime_ns))
        return subdirs

    def _dir_record(self, dir_fd: int, location: tuple[bytes, bytes] | None) -> bytes:
        record = DirRecord.unpack(backing.read_small_file(dir_fd, fnames.DIR_ID_FILE, 64))
        if location is None:
            new_tag = self._bind_new.root_tag(record.dir_id)
            old_tag = self._bind_old.root_tag(record.dir_id)
        else:
            new_tag = self._bind_new.dir_tag(location, record.dir_id)
            old_tag = self._bind_old.dir_tag(location, record.dir_id)
        if crypto.tag_in(new_tag, record.bindings):
            return record.dir_id
        if not crypto.tag_in(old_tag, record.bindings):
            # bound to another place before the pass (fsck reports it): left as it is
            self.stats["unreadable"] += 1
            log.warning("reencrypt: a directory's id record is bound to another place: "
                        "left as it is (encfs-gw fsck reports it)")
            return record.dir_id
        moved = DirRecord(record.dir_id, (new_tag, places.ZERO_BINDING))
        write_atomic(dir_fd, fnames.DIR_ID_FILE, moved.pack(), 0o400)
        self.stats["dir_records_moved"] += 1
        self._step("dirid")
        return record.dir_id

    # --- names ----------------------------------------------------------------------------
    def _plain_name(self, dir_fd: int, dir_id: bytes, name: str) -> tuple[bytes, bool] | None:
        """(plain name, decodes under the new keys) of a backing entry; None (counted,
        warned) for one that decodes under neither."""
        try:
            if fnames.classify(name) == "long":
                encoded = backing.read_small_file(dir_fd, fnames.sidecar_name(name), 4096)
                text = encoded.decode("ascii", "replace")
                if fnames.long_name_stub(text) != name:
                    raise IntegrityError("long-name sidecar does not match its entry")
            else:
                text = name
            sealed = fnames.b64decode_strict(text)
        except (IntegrityError, OSError):
            sealed = None
        if sealed is not None:
            for keys, is_new in ((self.new, True), (self.old, False)):
                try:
                    padded = keys.name_cipher.open(sealed, fnames.name_aad(dir_id))
                    return fnames.unpad_name(padded), is_new
                except IntegrityError:
                    continue
        self.stats["unreadable"] += 1
        log.warning("reencrypt: backing entry %r decrypts under neither volume key: left "
                    "as it is (encfs-gw fsck reports it)", name)
        return None

    def _rename(self, dir_fd: int, dir_id: bytes, old_name: str, plain_name: bytes) -> str:
        sealed = self.new.name_cipher.seal(fnames.pad_name(plain_name), fnames.name_aad(dir_id))
        encoded = fnames.b64encode(sealed)
        new_name = fnames.long_name_stub(encoded) if fnames.is_long(encoded) else encoded
        if new_name != encoded:
            write_atomic(dir_fd, fnames.sidecar_name(new_name), encoded.encode(), 0o400)
            self._step("sidecar")
        backing.renameat2(dir_fd, old_name, dir_fd, new_name, backing.RENAME_NOREPLACE)
        self.stats["moved"] += 1
        self._step("rename")
        if fnames.classify(old_name) == "long":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(fnames.sidecar_name(old_name), dir_fd=dir_fd)
        return new_name

    def _stale_sidecars(self, dir_fd: int) -> None:
        """Sidecars whose stub is gone (a kill between a long name's steps)."""
        present = set(os.listdir(dir_fd))
        for name in present:
            if name.startswith(fnames.LONG_NAME_PREFIX) and name.endswith(
                fnames.LONG_NAME_SIDECAR_SUFFIX
            ) and name[: -len(fnames.LONG_NAME_SIDECAR_SUFFIX)] not in present:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dir_fd)
                self.stats["stale_sidecars_removed"] += 1

    # --- objects --------------------------------------------------------------------------
    def _file(self, dir_fd: int, name: str, location: tuple[bytes, bytes] | None) -> None:
        """(location None: a leftover in the orphan directory, its place unknown)"""
        path_fd = backing.open_path(name, dir_fd)
        try:
            raw = os.pread(fd := backing.reopen(path_fd, os.O_RDONLY | os.O_NOATIME),
                           HEADER_SIZE, 0)
            os.close(fd)
            if len(raw) < HEADER_SIZE:
                return  # no header yet: no binding, no file id, no xattr set
            header = FileHeader.unpack(raw)
            self._header(path_fd, header, location)
            self._xattrs(f"/proc/self/fd/{path_fd}", xformat.KIND_FILE, header.file_id,
                         xformat.SET_XATTR_USER)
        finally:
            os.close(path_fd)

    def _header(
        self, path_fd: int, header: FileHeader, location: tuple[bytes, bytes] | None
    ) -> None:
        if header.unbound:
            message = UNBOUND_LABEL + self.volume_id + header.file_id
            new_tag = self.new.binding_tag(message)
            if crypto.tags_equal(header.bindings[0], new_tag):
                return
            if not crypto.tags_equal(header.bindings[0], self.old.binding_tag(message)):
                self._bad_binding("a file header's UNBOUND tag")
                return
            rewrite_header(path_fd, lambda h: dataclasses.replace(h, bindings=(new_tag, ZERO_TAG)))
            self.stats["headers_moved"] += 1
            self._step("header")
            return
        if location is None:
            return  # bound to a place nobody knows any more: left (see _orphans)
        new_tag = self._bind_new.file_tag(location, header.file_id)
        old_tag = self._bind_old.file_tag(location, header.file_id)
        if crypto.tag_in(new_tag, header.bindings) and not crypto.tag_in(old_tag, header.bindings):
            return
        if not crypto.tag_in(old_tag, header.bindings) and not crypto.tag_in(
            new_tag, header.bindings
        ):
            self._bad_binding("a file header")
            return
        # A/B: valid under both keys, then under the new one only
        rewrite_header(path_fd, lambda h: dataclasses.replace(h, bindings=(old_tag, new_tag)))
        self._step("header")
        rewrite_header(path_fd, lambda h: dataclasses.replace(h, bindings=(new_tag, ZERO_TAG)))
        self.stats["headers_moved"] += 1

    def _bad_binding(self, what: str) -> None:
        self.stats["unreadable"] += 1
        log.warning("reencrypt: %s is bound to another place: left as it is "
                    "(encfs-gw fsck reports it)", what)

    def _symlink(
        self, dir_fd: int, name: str, location: tuple[bytes, bytes] | None, st: os.stat_result
    ) -> None:
        """(location None: a leftover in the orphan directory, its binding left)"""
        record = LinkRecord.decode(os.readlink(name, dir_fd=dir_fd))
        bindings, bound_new = record.bindings, True
        if location is not None:
            new_tag = self._bind_new.link_tag(location, record)
            bound_new = crypto.tag_in(new_tag, record.bindings)
            if not bound_new and not crypto.tag_in(
                self._bind_old.link_tag(location, record), record.bindings
            ):
                self._bad_binding("a symlink")
                return
            bindings = (new_tag, places.ZERO_BINDING)
        sealed = record.sealed
        if not record.stored:
            aad = places.link_aad(record.link_id)
            try:
                self.new.symlink_cipher.open(sealed, aad)
            except IntegrityError:  # (a rename through a mount binds it anew, keeps this)
                sealed = self.new.symlink_cipher.seal(
                    self.old.symlink_cipher.open(sealed, aad), aad
                )
        path_fd = backing.open_path(name, dir_fd)
        try:
            owner = SetOwner(f"/proc/self/fd/{path_fd}", xformat.KIND_SYMLINK, record.link_id,
                             xformat.SET_XATTR_TRUSTED)
            xattr_record = self._moved_set_record(owner)
            set_moved = xattr_record != XattrSets.record_at(owner.path, owner.backing_xattr)
        finally:
            os.close(path_fd)
        if bound_new and sealed == record.sealed and not set_moved:
            return  # moved with its target and xattr set in one rename
        moved = dataclasses.replace(record, bindings=bindings, sealed=sealed)
        replace_symlink(dir_fd, name, moved.encode(), st, xattr_record)
        if self._observer is not None:
            self._observer.symlink_replaced(dir_fd, name, st)
        self.stats["symlinks_moved"] += 1
        self._step("symlink")

    # --- xattr sets -------------------------------------------------------------------------
    def _xattrs_at(self, dir_fd: int, name: str, kind: int, object_id: bytes, xattr: str) -> None:
        path_fd = backing.open_path(name, dir_fd)
        try:
            self._xattrs(f"/proc/self/fd/{path_fd}", kind, object_id, xattr)
        finally:
            os.close(path_fd)

    def _xattrs(self, path: str, kind: int, object_id: bytes, xattr: str) -> None:
        owner = SetOwner(path, kind, object_id, xattr)
        record = self._moved_set_record(owner)
        if record is not None and record != XattrSets.record_at(path, xattr):
            os.setxattr(path, xattr, record)
            self.stats["xattr_sets_moved"] += 1
            self._step("xattrs")

    def _moved_set_record(self, owner: SetOwner) -> bytes | None:
        """The object's set record under the new keys (None: it has none). A STORED
        record is the same 1 byte under either: its store file is re-sealed apart."""
        record = XattrSets.record_at(owner.path, owner.backing_xattr)
        if record is None:
            return None
        flags, sealed = xformat.parse_record(record)
        if flags & xformat.FLAG_STORED:
            return record
        aad = xformat.set_aad(self.volume_id, owner.kind, owner.object_id, flags)
        with contextlib.suppress(IntegrityError):
            crypto.gcm_open(self.new.xattr_value_key, sealed, aad)
            return record
        try:
            body = crypto.gcm_open(self.old.xattr_value_key, sealed, aad)
        except IntegrityError:
            self._bad_binding("an xattr set")
            return record
        return xformat.inline_record(crypto.gcm_seal(self.new.xattr_value_key, body, aad))

    # --- the stores -----------------------------------------------------------------------
    def _store_files(self, store: str, reseal: Callable[[str, bytes], bytes | None]) -> None:
        try:
            store_fd = backing.open_quietly(store, _DIR_FLAGS, dir_fd=self.root_fd)
        except FileNotFoundError:
            return
        try:
            for name in sorted(os.listdir(store_fd)):
                if name.startswith(fnames.TEMP_PREFIX):
                    continue
                sealed = backing.read_small_file(store_fd, name, 1 << 20)
                moved = reseal(name, sealed)
                if moved is not None:
                    write_atomic(store_fd, name, moved, os.stat(name, dir_fd=store_fd).st_mode
                                 & 0o777)
                    self.stats["store_files_moved"] += 1
                    self._step("store")
        finally:
            os.close(store_fd)

    def _quarantine_records(self) -> None:
        """fsck's quarantine records (FORMAT.md 5.5: plaintext paths, sealed under the name
        key) sealed again; the evidence they describe stays as it was."""
        try:
            area = backing.open_quietly(fnames.QUARANTINE_DIR, _DIR_FLAGS, dir_fd=self.root_fd)
        except FileNotFoundError:
            return
        try:
            for item in sorted(os.listdir(area)):
                try:
                    item_fd = backing.open_quietly(item, _DIR_FLAGS, dir_fd=area)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                try:
                    self._quarantine_record(item_fd, item)
                finally:
                    os.close(item_fd)
        finally:
            os.close(area)

    def _quarantine_record(self, item_fd: int, item: str) -> None:
        try:
            sealed = backing.read_small_file(item_fd, quarantine.RECORD)
            aad = quarantine.record_aad(self.volume_id, item)
        except (FileNotFoundError, UnicodeEncodeError):
            return  # an item being made (no record yet), or no item of fsck's
        moved = self._reseal(
            sealed,
            lambda s: self.new.name_cipher.open(s, aad),
            lambda s: self.old.name_cipher.open(s, aad),
            lambda p: self.new.name_cipher.seal(p, aad),
        )
        if moved is not None:
            write_atomic(item_fd, quarantine.RECORD, moved, 0o400)
            self.stats["store_files_moved"] += 1
            self._step("store")

    def _reseal(
        self, sealed: bytes, open_new: Callable[[bytes], bytes],
        open_old: Callable[[bytes], bytes], seal_new: Callable[[bytes], bytes],
    ) -> bytes | None:
        """None if `sealed` opens under the new keys already, else sealed under them."""
        with contextlib.suppress(IntegrityError):
            open_new(sealed)
            return None
        try:
            plain = open_old(sealed)
        except IntegrityError:
            self._bad_binding("a store file")
            return None
        return seal_new(plain)

    def _reseal_symlink_store_file(self, name: str, sealed: bytes) -> bytes | None:
        try:
            aad = fnames.long_symlink_aad(fnames.b64decode_strict(name))
        except IntegrityError:
            return None  # not a store file
        return self._reseal(
            sealed,
            lambda s: self.new.symlink_cipher.open(s, aad),
            lambda s: self.old.symlink_cipher.open(s, aad),
            lambda p: self.new.symlink_cipher.seal(p, aad),
        )

    def _reseal_xattr_store_file(self, name: str, sealed: bytes) -> bytes | None:
        try:
            kind, object_id = xformat.parse_store_name(name)
        except IntegrityError:
            return None
        aad = xformat.set_aad(self.volume_id, kind, object_id, xformat.FLAG_STORED)
        return self._reseal(
            sealed,
            lambda s: crypto.gcm_open(self.new.xattr_value_key, s, aad),
            lambda s: crypto.gcm_open(self.old.xattr_value_key, s, aad),
            lambda p: crypto.gcm_seal(self.new.xattr_value_key, p, aad),
        )
