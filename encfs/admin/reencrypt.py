"""Re-encryption of file data (layer L5): every block of every file decrypted and written
again under a fresh DEK wrapped under a new KEK version, offline, through a journal.

`rotate` re-wraps the DEKs a block already has; an attacker who kept an old KEK and
old key areas still reads every block not rewritten since. `reencrypt` gives every
block a new DEK, so nothing saved before it (KEKs, key areas, configs, key files)
opens a block after it; with `--new-provider` the new KEK is protected by another
provider (a new key file: the leaked one opens nothing of the new version).

What it does NOT change (this first part): the volume key, from which the keys of
names, symlink targets, xattrs and header bindings derive. Those stay readable to an
attacker who holds an old KEK and an old config (docs/THREAT-MODEL.md section 8).

The pass (docs/FORMAT.md section 9 gives the bytes and the crash argument):

1. Start: KEK version N+1 (new KEK; protected by `--new-provider` only, else by the
   providers of version N) wraps the volume key; the config records the pass
   (`reencrypt`: target, started), which every other command refuses (exit 14) and
   older readers refuse as an unknown field. An unfinished rotation is superseded.
2. Walk every backing data file, group by group (32 blocks): each block not held by
   exactly one key slot under version N+1 is decrypted (newest slot first) and sealed
   under a fresh DEK and nonce. Groups are gathered into batches of at most
   BATCH_BYTES of journal; each batch is written to the journal (one file, MACed,
   fsynced, renamed into place), then in place (per group: key area with old and new
   slots, the new block records, the key area with only the new slots), the batch's
   files synced (fdatasync), and the journal removed. A kill inside a multi-page pwrite of
   block records (FORMAT.md 4) is repaired by replaying the journal on the next run.
3. A census of the key areas: no DEK under another version and no block that could not
   be read: the old versions are retired (`--purge-old`: removed), the pass recorded
   finished. Otherwise the versions still needed stay (retired) and the result says
   what is left.

Crash safety: a run killed anywhere is resumed by running `reencrypt` again: it replays
the journal (or discards a batch that never became the journal), then walks again,
skipping blocks already under version N+1.

Decisions (where the code differs from the first sketch, and why):
* No feature flag: no byte changes meaning (key records and block records as before); the
  unfinished state is a config field, as `conversion` is, which older readers refuse.
  (`features` is bound into every wrapped volume key: a flag would mean re-wrapping the
  volume key under every version for nothing.)
* Replay checks each 64-byte slot of a key area against the entry's three states, not
  "the newest slot is the pre-image": key areas start at 64 + g*G, not on a page, so a
  killed key-area write can leave pages of two states side by side.
* A batch never holds two entries of one group (a file's other name commits the batch
  first): after a kill between them neither entry would match what is on disk.
* Every other command refuses the volume before any provider runs (an unauthenticated
  peek, then the authenticated config): with --new-provider the old key alone no longer
  opens it, and a key error would hide why.
* A block that opens under no slot keeps its old DEK and its version stays (retired,
  also with --purge-old), but the pass ends: left unfinished, the volume could not even
  be given to fsck.
* Each batch syncs its own files (fdatasync: sizes never change), not the filesystem.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import signal
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from encfs import config_store, crypto
from encfs.admin.rewrap import census
from encfs.engine import Volume
from encfs.errors import IntegrityError, UsageError
from encfs.format import names as fnames
from encfs.format.blocks import (
    BLOCKS_PER_GROUP,
    EMPTY_SLOT,
    HEADER_SIZE,
    KEY_AREA_SIZE,
    KEY_RECORD_FIELDS,
    KEY_RECORD_SIZE,
    NONCE_SIZE,
    RECORD_OVERHEAD,
    SLOT_SEALED,
    SLOT_SIZE,
    FileHeader,
    block_aad,
    slot_aad,
    slot_candidates,
)
from encfs.format.volume import PROTECTOR_ID_SIZE, Protector

log = logging.getLogger(__name__)

JOURNAL_DIR = fnames.REENCRYPT_DIR
JOURNAL_FILE = "journal"
JOURNAL_TEMP = "journal.new"
# A batch closes before its entries would pass this size (or BATCH_GROUPS groups): the
# extra space the pass needs is one journal of at most BATCH_BYTES plus its 52 bytes of
# head and MAC, or one group's entry when a group is larger (block size 1 MiB: 32 MiB of
# records, 12 KiB of key areas).
BATCH_BYTES = 8 << 20
BATCH_GROUPS = 256

JOURNAL_MAGIC = b"EGWJ"
JOURNAL_VERSION = 1
_HEAD = struct.Struct(">4sHHQI")  # magic, version, target KEK version, sequence, entries
_ENTRY = struct.Struct(">QQ16sIH")  # st_dev, st_ino, file id, group, path length
_RUN = struct.Struct(">QI")  # first block index, record bytes
JOURNAL_MAC_SIZE = 32

# Test-only: "N:STEP" SIGKILLs this process at STEP of batch N (1-based). Steps, in the
# order of a batch: journal-temp (the journal written, not renamed), journal (renamed
# into place), torn (half of the first group's block records written), in-place (every
# group written, the journal not yet removed); "started" (N ignored): right after the
# config recorded the pass. Read in one place only.
CRASH_AT_ENV = "ENCFS_TESTONLY_REENCRYPT_CRASH_AT"
CRASH_STEPS = ("started", "journal-temp", "journal", "torn", "in-place")


def _crash_at() -> tuple[int, str] | None:
    value = os.environ.get(CRASH_AT_ENV)
    if not value:
        return None
    number, _, step = value.partition(":")
    if step not in CRASH_STEPS:
        raise ValueError(f"{CRASH_AT_ENV}: unknown step {step!r}")
    return int(number), step


@dataclass
class ReencryptStats:
    target: int
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0  # plaintext bytes of every file (holes included)
    bytes_done: int = 0  # plaintext bytes of the files done
    blocks_reencrypted: int = 0
    bytes_reencrypted: int = 0  # plaintext bytes decrypted and sealed again
    bytes_written: int = 0  # to the backing store: journal and in place
    batches: int = 0
    journal_peak_bytes: int = 0
    unreadable_blocks: int = 0
    stale_records_cleared: int = 0
    replayed_groups: int = 0
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def rate_mib_s(self) -> float:
        elapsed = self.elapsed()
        return self.bytes_reencrypted / 1048576 / elapsed if elapsed > 0 else 0.0

    def eta_seconds(self) -> float | None:
        if not self.bytes_done or not self.bytes_total:
            return None
        return self.elapsed() * (self.bytes_total - self.bytes_done) / self.bytes_done

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("started")
        data["elapsed"] = round(self.elapsed(), 3)
        data["rate_mib_s"] = round(self.rate_mib_s(), 2)
        eta = self.eta_seconds()
        data["eta"] = None if eta is None else round(eta, 1)
        return data


# --- starting and finishing ----------------------------------------------------------------


def start_pass(volume: Volume, new_provider: tuple[str, dict[str, Any]] | None) -> int:
    """Make KEK version N+1 current and record the pass, or resume a started one.

    `new_provider` (kind, options): the new KEK is protected by that provider alone (a
    key file is created), else by the providers of version N. Returns the target.
    """
    operator = volume.operator
    config = config_store.reread(volume.backing_path, volume.keyring)
    if config.reencrypt is not None:
        target = int(config.reencrypt["target"])
        if new_provider is not None:
            _same_provider(volume, target, new_provider)
        if not volume.keyring.has_kek(target):
            raise UsageError(f"KEK version {target} is not loaded")
        volume.keyring.current_kek_version = target
        volume.config = config
        return target
    target = max(config.kek_versions) + 1
    if target > 0xFFFF:
        raise UsageError("no KEK version numbers left (65535 versions)")
    kek = crypto.random_key()
    binding = config.provider_binding(target)
    protectors: list[Protector] = []
    if new_provider is not None:
        kind, options = new_provider
        provider = operator.factory(kind, options)
        try:
            provider.prepare_new()  # a key file is created here (refused if it exists)
            protector_id = crypto.random_key(PROTECTOR_ID_SIZE).hex()
            protectors.append(Protector(protector_id, kind, provider.protect(kek, binding)))
            operator.vouch(protector_id, kind, provider.options)
        finally:
            provider.close()
    else:
        current = config.kek_versions[config.current_kek]
        for protector in current.protectors:
            provider = operator.provider(protector)
            try:
                protectors.append(
                    Protector(protector.id, protector.kind, provider.protect(kek, binding))
                )
            finally:
                provider.close()
    with config_store.editing(volume.backing_path, volume.keyring, operator) as config:
        if max(config.kek_versions) + 1 != target or config.reencrypt is not None:
            raise UsageError("the volume's KEK versions changed meanwhile; run it again")
        created = config.add_current_version(
            target, volume.keyring.wrap_volume_key(kek, config.volume_key_aad(target)), protectors
        )
        config.rotation = None  # superseded: every DEK moves to `target` anyway
        config.reencrypt = {"target": target, "started": created}
    # Only once the config naming version `target` is on disk may a DEK be wrapped under it.
    volume.keyring.add_kek(target, kek, make_current=True)
    volume.config = config
    for protector in protectors:
        volume.audit.event("wrap", kek_version=target, provider=protector.kind, outcome="ok")
    volume.audit.event("reencrypt_start", target=target)
    return target


def _same_provider(volume: Volume, target: int, wanted: tuple[str, dict[str, Any]]) -> None:
    """A pass resumed with --new-provider: it must name the provider it started with."""
    kind, options = wanted
    provider = volume.operator.factory(kind, options)
    try:
        wanted_options = provider.options
    finally:
        provider.close()
    for protector in volume.config.kek_versions[target].protectors:
        if protector.kind == kind and volume.operator.vouched_options(protector) == wanted_options:
            return
    raise UsageError(
        f"the unfinished re-encryption to KEK version {target} protects it with another "
        "provider than --new-provider names: run reencrypt without --new-provider to "
        "finish it"
    )


def finish_pass(volume: Volume, target: int, purge_old: bool, counts: Counter[int]) -> dict:
    """After the census: record the pass finished; retire (or purge) every old version
    that no DEK needs any more (the others stay, retired)."""
    needed = {v for v, n in counts.items() if n and v != target}
    with config_store.editing(volume.backing_path, volume.keyring, volume.operator) as config:
        retired, kept = [], []
        for number, version in list(config.kek_versions.items()):
            if number == target:
                continue
            if number in needed or not purge_old:
                version.state = "retired"
                (kept if number in needed else retired).append(number)
            else:
                del config.kek_versions[number]
                retired.append(number)
        config.reencrypt = None
    volume.config = config
    if purge_old:
        for number in retired:
            volume.keyring.forget_kek(number)
    volume.audit.event(
        "reencrypt_finish", target=target,
        **({"purged": retired} if purge_old else {"retired": retired}),
    )
    return {("purged" if purge_old else "retired"): retired, "still_needed": sorted(needed)}


# --- walking the data files ------------------------------------------------------------------


def _listing(dir_fd: int) -> tuple[list[str], list[str]]:
    with os.scandir(dir_fd) as listing:
        entries = [e for e in listing if fnames.classify(e.name) != "reserved"]
    return (
        sorted(e.name for e in entries if e.is_file(follow_symlinks=False)),
        sorted(e.name for e in entries if e.is_dir(follow_symlinks=False)),
    )


def data_files(root_fd: int) -> Iterator[tuple[str, int, int]]:
    """(backing path relative to the root, dir fd, name) of every regular data file,
    depth first; only the current directory and its ancestors are open."""
    stack: list[tuple[str, int, Iterator[str]]] = []
    root = os.dup(root_fd)
    try:
        files, subdirs = _listing(root)
        stack.append(("", root, iter(subdirs)))
        for name in files:
            yield name, root, name
        while stack:
            prefix, dir_fd, pending = stack[-1]
            name = next(pending, None)
            if name is None:
                stack.pop()
                os.close(dir_fd)
                continue
            child = os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
            )
            try:
                files, subdirs = _listing(child)
            except BaseException:
                os.close(child)
                raise
            path = f"{prefix}{name}/"
            stack.append((path, child, iter(subdirs)))
            for file_name in files:
                yield path + file_name, child, file_name
    finally:
        for _, dir_fd, _ in stack:
            os.close(dir_fd)


# --- the journal ---------------------------------------------------------------------------


@dataclass
class GroupEntry:
    """One group of one file in a batch: what its key area must be now, what it becomes,
    and the block records to write."""

    path: str
    dev: int
    ino: int
    file_id: bytes
    group: int
    before: bytes  # the key area as read (the pre-image)
    both: bytes  # old and new slots side by side
    final: bytes  # only the new slots
    runs: list[tuple[int, bytes]]  # (first block index, records of consecutive blocks)

    def size(self) -> int:
        return (
            _ENTRY.size + len(self.path.encode("utf-8", "surrogateescape")) + 3 * KEY_AREA_SIZE
            + 2 + sum(_RUN.size + len(records) for _, records in self.runs)
        )


def encode_journal(target: int, sequence: int, entries: list[GroupEntry], mac: Callable) -> bytes:
    parts = [_HEAD.pack(JOURNAL_MAGIC, JOURNAL_VERSION, target, sequence, len(entries))]
    for entry in entries:
        path = entry.path.encode("utf-8", "surrogateescape")
        parts += [
            _ENTRY.pack(entry.dev, entry.ino, entry.file_id, entry.group, len(path)), path,
            entry.before, entry.both, entry.final, struct.pack(">H", len(entry.runs)),
        ]
        for first, records in entry.runs:
            parts += [_RUN.pack(first, len(records)), records]
    body = b"".join(parts)
    return body + mac(body)


def decode_journal(data: bytes, target: int, mac: Callable) -> list[GroupEntry] | None:
    """The entries of an authentic, complete journal for this pass; None otherwise (a
    batch that never became the journal, or one altered: the data in place was not
    touched on its behalf)."""
    if len(data) < _HEAD.size + JOURNAL_MAC_SIZE:
        return None
    body, tag = data[:-JOURNAL_MAC_SIZE], data[-JOURNAL_MAC_SIZE:]
    if not hmac.compare_digest(mac(body), tag):
        return None
    magic, version, journal_target, _, count = _HEAD.unpack_from(body)
    if magic != JOURNAL_MAGIC or version != JOURNAL_VERSION or journal_target != target:
        return None
    entries, offset = [], _HEAD.size
    try:
        for _ in range(count):
            dev, ino, file_id, group, path_length = _ENTRY.unpack_from(body, offset)
            offset += _ENTRY.size
            path = body[offset : offset + path_length].decode("utf-8", "surrogateescape")
            offset += path_length
            areas = [body[offset + i * KEY_AREA_SIZE : offset + (i + 1) * KEY_AREA_SIZE]
                     for i in range(3)]
            offset += 3 * KEY_AREA_SIZE
            (run_count,) = struct.unpack_from(">H", body, offset)
            offset += 2
            runs = []
            for _ in range(run_count):
                first, length = _RUN.unpack_from(body, offset)
                offset += _RUN.size
                runs.append((first, body[offset : offset + length]))
                offset += length
            entries.append(GroupEntry(path, dev, ino, file_id, group, *areas, runs))
    except struct.error:
        return None
    return entries if offset == len(body) else None


# --- the pass --------------------------------------------------------------------------------


class ReencryptPass:
    """The offline pass toward KEK version `target` (the volume lock is held)."""

    def __init__(self, volume: Volume, target: int) -> None:
        self.volume = volume
        self.target = target
        self.stats = ReencryptStats(target=target)
        self.layout = volume.layout
        self.volume_id = volume.config.volume_id
        self._crash = _crash_at()
        self._batch: list[GroupEntry] = []
        self._batch_bytes = 0
        self._fds: dict[str, int] = {}  # the batch's files, by path
        self._inodes: set[tuple[int, int]] = set()  # ... and by (st_dev, st_ino)
        self._unreadable_seen: set[tuple[int, int, int]] = set()
        self._sequence = 0

    # journal I/O
    def _journal_dir(self, create: bool) -> int | None:
        root = self.volume.root_fd
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(JOURNAL_DIR, 0o700, dir_fd=root)
        try:
            return os.open(
                JOURNAL_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=root,
            )
        except FileNotFoundError:
            return None

    def replay(self) -> int:
        """Apply the journal a killed run left (if authentic), then remove it. Returns
        the groups replayed."""
        dir_fd = self._journal_dir(create=False)
        if dir_fd is None:
            return 0
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(JOURNAL_TEMP, dir_fd=dir_fd)  # never committed: nothing applied
            try:
                data = _read_all(dir_fd, JOURNAL_FILE)
            except FileNotFoundError:
                return 0
            entries = decode_journal(data, self.target, self.volume.keyring.journal_mac)
            replayed = 0
            if entries is None:
                log.warning("reencrypt: discarding a journal that does not verify")
            else:
                fds: dict[str, int] = {}
                try:
                    for entry in entries:
                        fd = self._open_for(entry, fds)
                        if fd is not None and self._apply(fd, entry, replay=True):
                            replayed += 1
                    for fd in fds.values():
                        os.fdatasync(fd)
                finally:
                    for fd in fds.values():
                        os.close(fd)
            os.unlink(JOURNAL_FILE, dir_fd=dir_fd)
            os.fsync(dir_fd)
            self.stats.replayed_groups += replayed
            return replayed
        finally:
            os.close(dir_fd)

    def _open_for(self, entry: GroupEntry, fds: dict[str, int]) -> int | None:
        fd = fds.get(entry.path)
        if fd is None:
            try:
                fd = os.open(entry.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=self.volume.root_fd)
            except OSError as exc:
                log.warning("reencrypt: journal names %r, which cannot be opened: %s",
                            entry.path, exc.strerror)
                return None
            fds[entry.path] = fd
        st = os.fstat(fd)
        header = os.pread(fd, HEADER_SIZE, 0)
        if (st.st_dev, st.st_ino) != (entry.dev, entry.ino) or len(header) < HEADER_SIZE or (
            header[8:24] != entry.file_id
        ):
            log.warning("reencrypt: journal entry for %r names another file: skipped", entry.path)
            return None
        return fd

    def _apply(self, fd: int, entry: GroupEntry, replay: bool) -> bool:
        """Write one group in place: key area with both slots, block records, key area
        with the new slots. On replay only if every slot now is the one of the pre-image,
        of the both-slots area or of the final area (what this pass's own writes, torn
        at any 64-byte boundary, can leave): a journal never rolls back another write."""
        offset = self.layout.group_start(entry.group)
        if replay:
            now = os.pread(fd, KEY_AREA_SIZE, offset).ljust(KEY_AREA_SIZE, b"\0")
            for start in range(0, KEY_AREA_SIZE, SLOT_SIZE):
                piece = now[start : start + SLOT_SIZE]
                if piece not in (
                    entry.before[start : start + SLOT_SIZE],
                    entry.both[start : start + SLOT_SIZE],
                    entry.final[start : start + SLOT_SIZE],
                ):
                    log.warning(
                        "reencrypt: group %d of %r changed since its journal entry: skipped",
                        entry.group, entry.path,
                    )
                    return False
        stats = self.stats
        os.pwrite(fd, entry.both, offset)
        for index, (first, records) in enumerate(entry.runs):
            where = self.layout.record_offset(first)
            if not replay and index == 0 and self._crash_step("torn"):
                os.pwrite(fd, records[: len(records) // 2], where)
                self._die()
            os.pwrite(fd, records, where)
            stats.bytes_written += len(records)
        os.pwrite(fd, entry.final, offset)
        stats.bytes_written += 2 * KEY_AREA_SIZE
        return True

    def _commit(self) -> None:
        """The batch: journal (fsynced, renamed into place), in place, sync, no journal."""
        if not self._batch:
            return
        self._sequence += 1
        self.stats.batches += 1
        data = encode_journal(
            self.target, self._sequence, self._batch, self.volume.keyring.journal_mac
        )
        dir_fd = self._journal_dir(create=True)
        assert dir_fd is not None
        try:
            fd = os.open(JOURNAL_TEMP, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            self.stats.bytes_written += len(data)
            self.stats.journal_peak_bytes = max(self.stats.journal_peak_bytes, len(data))
            if self._crash_step("journal-temp"):
                self._die()
            os.rename(JOURNAL_TEMP, JOURNAL_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
            if self._crash_step("journal"):
                self._die()
            for entry in self._batch:
                self._apply(self._fds[entry.path], entry, replay=False)
            # the batch's files only (not syncfs: the backing filesystem may be shared);
            # their sizes do not change, so fdatasync makes the writes durable
            for fd in self._fds.values():
                os.fdatasync(fd)
            if self._crash_step("in-place"):
                self._die()
            os.unlink(JOURNAL_FILE, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        self._batch, self._batch_bytes = [], 0
        self._close_batch_files()

    def _crash_step(self, step: str) -> bool:
        return self._crash is not None and self._crash == (self._sequence, step)

    def _die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    # the walk
    def count(self) -> None:
        for _, dir_fd, name in data_files(self.volume.root_fd):
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                self.stats.files_total += 1
                self.stats.bytes_total += self.layout.plain_size(st.st_size)

    def steps(self) -> Iterator[ReencryptStats]:
        """Re-encrypt every file; yields after every file (and every batch)."""
        if self._crash is not None and self._crash[1] == "started":
            self._die()
        self.count()
        try:
            for path, dir_fd, name in data_files(self.volume.root_fd):
                fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    st = os.fstat(fd)
                    if (st.st_dev, st.st_ino) in self._inodes:
                        # another name of a file in this batch: its groups are written
                        # first (one journal entry per group and batch, never two)
                        self._commit()
                    for entry in self._file(path, fd, st):
                        size = entry.size()
                        if self._batch and (
                            self._batch_bytes + size > BATCH_BYTES
                            or len(self._batch) >= BATCH_GROUPS
                        ):
                            self._commit()
                            yield self.stats
                        if entry.path not in self._fds:
                            self._fds[entry.path] = os.dup(fd)
                            self._inodes.add((st.st_dev, st.st_ino))
                        self._batch.append(entry)
                        self._batch_bytes += size
                finally:
                    os.close(fd)
                self.stats.files_done += 1
                self.stats.bytes_done += self.layout.plain_size(st.st_size)
                yield self.stats
            self._commit()
            yield self.stats
        finally:
            self._close_batch_files()

    def _close_batch_files(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds, self._inodes = {}, set()

    def _file(self, path: str, fd: int, st: os.stat_result) -> Iterator[GroupEntry]:
        """The groups of one file that need re-encrypting, as journal entries."""
        head = os.pread(fd, HEADER_SIZE, 0)
        if len(head) < HEADER_SIZE:
            return  # empty: no keys
        try:
            file_id = FileHeader.unpack(head).file_id
        except IntegrityError:
            self._unreadable(st, -1)
            log.warning("reencrypt: %r has a bad header: left as it is (fsck reports it)", path)
            return
        plain_size = self.layout.plain_size(st.st_size)
        group = 0
        while (offset := self.layout.group_start(group)) < st.st_size:
            area = os.pread(fd, KEY_AREA_SIZE, offset)
            entry = self._group(path, fd, st, file_id, group, area, plain_size)
            if entry is not None:
                yield entry
            group += 1

    def _group(
        self, path: str, fd: int, st: os.stat_result, file_id: bytes, group: int, area: bytes,
        plain_size: int,
    ) -> GroupEntry | None:
        layout, target, keyring = self.layout, self.target, self.volume.keyring
        if len(area) < KEY_AREA_SIZE:
            # a file cut inside a key area (damage: no write of encfs-gw leaves one): no
            # block of the group has data, and a write here would grow the file
            self._unreadable(st, group * BLOCKS_PER_GROUP)
            log.warning("reencrypt: %r ends inside the key area of group %d: left as it is",
                        path, group)
            return None
        both, final = bytearray(area), bytearray(area)
        blocks_in_file = -(-plain_size // layout.block_size)
        changed: dict[int, bytes] = {}
        wrap = keyring.slot_cipher(target, file_id)
        for position, fields in enumerate(KEY_RECORD_FIELDS.iter_unpack(area)):
            index = group * BLOCKS_PER_GROUP + position
            candidates = slot_candidates(fields)
            if not candidates:
                if candidates is None:
                    self._unreadable(st, index)
                    log.warning("reencrypt: %r block %d: malformed key record", path, index)
                continue
            if len(candidates) == 1 and candidates[0][1] == target:
                continue  # done already (by an earlier run, or the other name of a link)
            base = position * KEY_RECORD_SIZE
            if index >= blocks_in_file:  # past the end: what a torn truncate left
                final[base : base + KEY_RECORD_SIZE] = bytes(KEY_RECORD_SIZE)
                both[base : base + KEY_RECORD_SIZE] = bytes(KEY_RECORD_SIZE)
                self.stats.stale_records_cleared += 1
                continue
            plain_length = layout.block_plain_length(index, plain_size)
            record = os.pread(fd, plain_length + RECORD_OVERHEAD, layout.record_offset(index))
            opened = self._open_block(file_id, index, candidates, record)
            if opened is None:
                self._unreadable(st, index)
                log.warning("reencrypt: %r block %d opens under no key slot: left as it is",
                            path, index)
                continue
            valid_position, generation, plaintext = opened
            dek = crypto.random_secret()
            try:
                nonce = crypto.random_nonce()
                sealed = crypto.AESGCM_(dek).encrypt(
                    nonce, plaintext, block_aad(self.volume_id, file_id, index)
                )
                new_generation = (generation + 1) & 0xFF
                slot_nonce = crypto.random_nonce()
                slot = SLOT_SEALED.pack(
                    target, new_generation, 0, slot_nonce,
                    wrap.encrypt(slot_nonce, dek,
                                 slot_aad(self.volume_id, file_id, index, target, new_generation)),
                )
            finally:
                crypto.wipe(dek)
                crypto.wipe(plaintext)
            free = base + (1 - valid_position) * SLOT_SIZE
            both[free : free + SLOT_SIZE] = slot
            final[base : base + KEY_RECORD_SIZE] = (
                slot + EMPTY_SLOT if valid_position else EMPTY_SLOT + slot
            )
            changed[index] = nonce + sealed
            self.stats.blocks_reencrypted += 1
            self.stats.bytes_reencrypted += plain_length
        if not changed and final == area:
            return None
        runs: list[tuple[int, bytes]] = []
        for index in sorted(changed):
            if runs and runs[-1][0] + self._blocks_in(runs[-1][1]) == index:
                runs[-1] = (runs[-1][0], runs[-1][1] + changed[index])
            else:
                runs.append((index, changed[index]))
        return GroupEntry(path, st.st_dev, st.st_ino, file_id, group, area, bytes(both),
                          bytes(final), runs)

    def _unreadable(self, st: os.stat_result, index: int) -> None:
        """Counted once per block (a hard-linked file is met under each of its names)."""
        self._unreadable_seen.add((st.st_dev, st.st_ino, index))
        self.stats.unreadable_blocks = len(self._unreadable_seen)

    def _blocks_in(self, records: bytes) -> int:
        # only the file's last block is short, and nothing follows it in a run
        return -(-len(records) // self.layout.record_size)

    def _open_block(
        self, file_id: bytes, index: int, candidates: tuple, record: bytes
    ) -> tuple[int, int, bytearray] | None:
        """(slot position, generation, plaintext) under the newest slot that opens it."""
        aad = block_aad(self.volume_id, file_id, index)
        for position, version, generation, nonce, sealed in candidates:
            dek = bytearray(crypto.KEY_SIZE)
            try:
                self.volume.keyring.slot_cipher(version, file_id).decrypt_into(
                    nonce, sealed, slot_aad(self.volume_id, file_id, index, version, generation),
                    dek,
                )
                plaintext = bytearray(len(record) - RECORD_OVERHEAD)
                crypto.AESGCM_(dek).decrypt_into(
                    record[:NONCE_SIZE], record[NONCE_SIZE:], aad, plaintext
                )
                return position, generation, plaintext
            except (crypto.InvalidTag_, IntegrityError, ValueError):
                continue
            finally:
                crypto.wipe(dek)
        return None


def _read_all(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def throttle_delay(stats: ReencryptStats, rate_mib_s: float | None) -> float:
    """Seconds to wait so that re-encrypted MiB per second stay at or under the rate."""
    if not rate_mib_s:
        return 0.0
    return max(0.0, stats.bytes_reencrypted / 1048576 / rate_mib_s - stats.elapsed())


def reencrypt_offline(
    volume: Volume,
    rate: float | None = None,
    purge_old: bool = False,
    new_provider: tuple[str, dict[str, Any]] | None = None,
    on_progress: Callable[[ReencryptStats], None] | None = None,
) -> dict:
    """The whole pass on an unmounted volume (Volume.unlock(..., reencrypting=True))."""
    target = start_pass(volume, new_provider)
    run = ReencryptPass(volume, target)
    run.replay()
    for stats in run.steps():
        delay = throttle_delay(stats, rate)
        if delay:
            time.sleep(delay)
        if on_progress is not None:
            on_progress(stats)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(JOURNAL_DIR, dir_fd=volume.root_fd)  # empty: the last batch removed its file
    counts = census(volume, prefetch=False)
    counts.pop(-1, None)  # malformed records: counted by the pass as unreadable
    remaining = sum(n for version, n in counts.items() if version != target)
    finished = finish_pass(volume, target, purge_old, counts)
    return {
        "done": remaining == 0 and run.stats.unreadable_blocks == 0,
        "target": target,
        "deks_per_version": {str(v): n for v, n in sorted(counts.items())},
        **finished,
        **run.stats.as_dict(),
    }
