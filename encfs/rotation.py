"""KEK rotation: a new KEK version, then a re-wrap pass over every key slot (layer L4).

The pass never touches block records. Per group of 32 blocks it reads the 4 KiB key
area, unwraps every DEK held under an older KEK version and wraps it under the target
version into the block's other slot, writes the key area (old and new slots side by
side), then writes it again with the old slots cleared. Slots are 64-byte aligned, so
even a torn key-area write leaves each block with at least one slot holding its DEK:
the pass survives a kill at any instant and is simply run again to resume (it skips
slots already under the target version).

The pass is a generator of steps (one group each) so the daemon can interleave it with
FUSE requests (each step runs synchronously on the trio thread: it cannot interleave
with a write to the same key area) and the offline tool can throttle it.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from encfs import crypto
from encfs.errors import IntegrityError, UsageError
from encfs.format import names as fnames
from encfs.format.blocks import (
    BLOCKS_PER_GROUP,
    EMPTY_SLOT,
    HEADER_SIZE,
    KEY_AREA_SIZE,
    KEY_RECORD_SIZE,
    NONCE_SIZE,
    SLOT_AAD_TAIL,
    SLOT_HEAD,
    SLOT_SIZE,
    FileHeader,
    newer_generation,
    slot_aad_prefix,
)
from encfs.format.volume import KekVersion, Protector
from encfs.keyring import ProviderFactory
from encfs.keys.registry import open_provider
from encfs.keyslots import editing_config, write_config
from encfs.volume import Volume

log = logging.getLogger(__name__)

# Test-only: SIGKILL this process after that many DEKs were re-wrapped (between the two
# key-area writes of a group, the most interesting instant). Read in one place only.
CRASH_AFTER_ENV = "ENCFS_TESTONLY_ROTATION_CRASH_AFTER"


def _crash_after() -> int | None:
    value = os.environ.get(CRASH_AFTER_ENV)
    return int(value) if value else None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class PassStats:
    target: int
    files_total: int = 0
    files_done: int = 0
    deks_seen: int = 0
    deks_rewrapped: int = 0
    key_bytes_written: int = 0
    unreadable_slots: int = 0
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def eta_seconds(self) -> float | None:
        if not self.files_done or not self.files_total:
            return None
        return self.elapsed() * (self.files_total - self.files_done) / self.files_done

    def as_dict(self) -> dict:
        data = asdict(self)
        data.pop("started")
        data["elapsed"] = round(self.elapsed(), 3)
        eta = self.eta_seconds()
        data["eta"] = None if eta is None else round(eta, 1)
        return data


# --- starting and finishing ----------------------------------------------------------------


def start_rotation(volume: Volume, provider_factory: ProviderFactory = open_provider) -> int:
    """Make KEK version N+1 current (protected like version N), or resume a started one.

    Returns the target version. New blocks use it from this moment on.
    """
    with editing_config(volume.backing_path) as (config, dir_fd):
        if config.rotation is not None:
            target = int(config.rotation["target"])
            if not volume.keyring.has_kek(target):
                raise UsageError(f"KEK version {target} is not loaded; remount the volume")
            volume.keyring.current_kek_version = target
            volume.config = config
            return target
        current = config.kek_versions[config.current_kek]
        target = max(config.kek_versions) + 1
        if target > 0xFFFF:
            raise UsageError("no KEK version numbers left (65535 rotations)")
        kek = crypto.random_key()
        binding = config.provider_binding(target)
        protectors = []
        for protector in current.protectors:
            provider = provider_factory(protector.provider, protector.options)
            try:
                protectors.append(
                    Protector(protector.provider, protector.options, provider.protect(kek, binding))
                )
            finally:
                provider.close()
        created = _now()
        config.kek_versions[target] = KekVersion(
            version=target,
            state="active",
            created=created,
            wrapped_volume_key=volume.keyring.wrap_volume_key(kek, config.volume_key_aad(target)),
            protectors=protectors,
        )
        config.current_kek = target
        config.rotation = {"target": target, "started": created}
        write_config(dir_fd, config)
        volume.keyring.add_kek(target, kek, make_current=True)
        volume.config = config
        for protector in protectors:
            volume.audit.event(
                "wrap", kek_version=target, provider=protector.provider, outcome="ok"
            )
        volume.audit.event("rotation_start", target=target)
        log.info("KEK version %d is current; re-wrapping DEKs", target)
        return target


def finish_rotation(volume: Volume, target: int, purge_old: bool) -> list[int]:
    """After a verified pass: retire (or purge) every version but `target`."""
    with editing_config(volume.backing_path) as (config, dir_fd):
        retired = []
        for number, version in list(config.kek_versions.items()):
            if number == target:
                continue
            if purge_old:
                del config.kek_versions[number]
                volume.keyring.forget_kek(number)
            else:
                version.state = "retired"
            retired.append(number)
        config.rotation = None
        write_config(dir_fd, config)
        volume.config = config
        volume.audit.event(
            "rotation_finish",
            target=target,
            **({"purged": retired} if purge_old else {"retired": retired}),
        )
        return retired


# --- walking the volume --------------------------------------------------------------------


PREFETCH_FILES = 64  # files whose key areas are asked for ahead of the pass


def data_files(volume: Volume, prefetch: bool = False) -> Iterator[tuple[int, str]]:
    """(directory fd, backing name) of every regular data file, without following links.

    With `prefetch`, the key areas of the next files are announced to the kernel
    (POSIX_FADV_WILLNEED) before they are needed: on a cold cache the pass is bound by one
    small random read per group, and queued reads overlap where one-at-a-time reads wait.
    """
    for _, dirnames, filenames, dir_fd in os.fwalk(
        ".", dir_fd=volume.root_fd, follow_symlinks=False
    ):
        dirnames[:] = [d for d in dirnames if fnames.classify(d) != "reserved"]
        files: list[tuple[str, int]] = []
        for name in filenames:
            if fnames.classify(name) == "reserved":
                continue
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                files.append((name, st.st_size))
        advised = 0
        for index, (name, _) in enumerate(files):
            if prefetch and index >= advised:
                batch = files[index : index + PREFETCH_FILES]
                _advise_key_areas(volume, dir_fd, batch)
                advised = index + len(batch)
            yield dir_fd, name


def _advise_key_areas(volume: Volume, dir_fd: int, files: list[tuple[str, int]]) -> None:
    layout = volume.layout
    for name, cipher_size in files:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            continue  # gone meanwhile: the pass will see it
        try:
            group = 0
            while (start := layout.group_start(group)) < cipher_size:
                os.posix_fadvise(fd, start, KEY_AREA_SIZE, os.POSIX_FADV_WILLNEED)
                group += 1
            os.posix_fadvise(fd, 0, HEADER_SIZE, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


EMPTY_RECORD = bytes(KEY_RECORD_SIZE)


def _records_in_use(area: bytes | bytearray) -> int:
    """Key records up to the last non-zero byte: the all-zero rest (the unused records of
    a small file's group) is skipped in one C-speed scan instead of record by record."""
    used = len(area.rstrip(b"\0"))
    return min(-(-used // KEY_RECORD_SIZE), len(area) // KEY_RECORD_SIZE)
_SLOT_START = struct.Struct(">HBB")  # the slot fields before the nonce


def _record_order(
    area: bytes | bytearray, base: int, head0: tuple[int, int, int], head1: tuple[int, int, int]
) -> tuple[int, ...] | None:
    """Positions (0, 1) of a record's non-empty slots, newest first; None if malformed.

    The same rules as KeySlot.unpack, without building KeySlot objects: a slot
    with KEK version 0 must be all zero (empty), any other must have reserved == 0.
    """
    present = []
    for position, (kek_version, _, reserved) in enumerate((head0, head1)):
        if kek_version:
            if reserved:
                return None
            present.append(position)
        else:
            start = base + position * SLOT_SIZE
            if area[start : start + SLOT_SIZE] != EMPTY_SLOT:
                return None
    if len(present) == 2 and newer_generation(head1[1], head0[1]):
        return (1, 0)
    return tuple(present)


class RewrapPass:
    """The re-wrap pass over one volume toward KEK version `target`."""

    def __init__(self, volume: Volume, target: int) -> None:
        self.volume = volume
        self.target = target
        self.stats = PassStats(target=target)
        self._crash_after = _crash_after()

    def steps(self) -> Iterator[PassStats]:
        """Re-wrap everything; yields after every group (and every file)."""
        self.stats.files_total = sum(1 for _ in data_files(self.volume))
        self._maybe_crash()
        # fwalk closes each directory fd once it moves on: work inside the walk.
        for dir_fd, name in data_files(self.volume, prefetch=True):
            try:
                fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except FileNotFoundError:
                self.stats.files_done += 1
                continue  # removed meanwhile (online)
            try:
                yield from self._file(fd)
            finally:
                os.close(fd)
            self.stats.files_done += 1
            yield self.stats

    def _file(self, fd: int) -> Iterator[PassStats]:
        header = os.pread(fd, HEADER_SIZE, 0)
        if len(header) < HEADER_SIZE:
            return  # empty file: no keys
        try:
            file_id = FileHeader.unpack(header).file_id
        except IntegrityError:
            self.stats.unreadable_slots += 1
            log.warning("re-wrap: skipping a file with a bad header")
            return
        layout = self.volume.layout
        group = 0
        while True:
            offset = layout.group_start(group)
            area = bytearray(os.pread(fd, KEY_AREA_SIZE, offset))
            if not area:
                return
            self._group(fd, file_id, group, offset, area)
            group += 1
            yield self.stats

    def _group(self, fd: int, file_id: bytes, group: int, offset: int, area: bytearray) -> None:
        # The hot loop of the pass: per DEK one unwrap and one wrap (both in Rust); the
        # slot heads, nonces, ciphers and AAD prefix are prepared once per group or file.
        keyring = self.volume.keyring
        target = self.target
        both = bytearray(area)  # step 1: old and new slots side by side
        final = bytearray(area)  # step 2: only the new slots
        rewrapped = 0
        records = _records_in_use(area)
        heads = list(SLOT_HEAD.iter_unpack(memoryview(area)[: records * KEY_RECORD_SIZE]))
        nonces = crypto.random_bytes(NONCE_SIZE * records)
        aad_prefix = slot_aad_prefix(self.volume.config.volume_id, file_id)
        target_cipher = keyring.slot_cipher(target, file_id)
        ciphers: dict[int, crypto.AESGCM_] = {}
        for k in range(records):
            base = k * KEY_RECORD_SIZE
            order = _record_order(area, base, heads[2 * k], heads[2 * k + 1])
            if order is None:
                self.stats.unreadable_slots += 1
                continue
            if not order:
                continue
            self.stats.deks_seen += 1
            block_index = group * BLOCKS_PER_GROUP + k
            newest = order[0]
            if heads[2 * k + newest][0] == target:
                if len(order) == 2:  # residue of an interrupted step 2: finish it
                    other = base + order[1] * SLOT_SIZE
                    final[other : other + SLOT_SIZE] = EMPTY_SLOT
                continue
            dek = None
            for position in order:
                kek_version, generation, _ = heads[2 * k + position]
                start = base + position * SLOT_SIZE
                cipher = ciphers.get(kek_version)
                try:
                    if cipher is None:
                        cipher = ciphers[kek_version] = keyring.slot_cipher(kek_version, file_id)
                    dek = cipher.decrypt(
                        bytes(area[start + 4 : start + 16]),
                        bytes(area[start + 16 : start + SLOT_SIZE]),
                        aad_prefix + SLOT_AAD_TAIL.pack(block_index, kek_version, generation),
                    )
                    break
                except (crypto.InvalidTag_, IntegrityError):
                    continue
            if dek is None:
                self.stats.unreadable_slots += 1
                log.warning("re-wrap: block %d has no key slot that opens", block_index)
                continue
            new_generation = (generation + 1) & 0xFF
            nonce = nonces[k * NONCE_SIZE : (k + 1) * NONCE_SIZE]
            packed = (
                _SLOT_START.pack(target, new_generation, 0)
                + nonce
                + target_cipher.encrypt(
                    nonce, dek, aad_prefix + SLOT_AAD_TAIL.pack(block_index, target, new_generation)
                )
            )
            free = base + (1 - newest) * SLOT_SIZE
            both[free : free + SLOT_SIZE] = packed
            final[base : base + KEY_RECORD_SIZE] = EMPTY_RECORD
            final[free : free + SLOT_SIZE] = packed
            rewrapped += 1
        if rewrapped:
            os.pwrite(fd, both, offset)
            self.stats.deks_rewrapped += rewrapped
            self.stats.key_bytes_written += len(both)
            self._maybe_crash()
        if final != area:
            os.pwrite(fd, final, offset)
            self.stats.key_bytes_written += len(final)

    def _maybe_crash(self) -> None:
        if self._crash_after is not None and self.stats.deks_rewrapped >= self._crash_after:
            os.kill(os.getpid(), signal.SIGKILL)


def census(volume: Volume) -> Counter[int]:
    """How many DEKs are wrapped under each KEK version (reads key areas only)."""
    counts: Counter[int] = Counter()
    for dir_fd, name in data_files(volume, prefetch=True):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            continue
        try:
            group = 0
            while True:
                area = os.pread(fd, KEY_AREA_SIZE, volume.layout.group_start(group))
                if not area:
                    break
                records = _records_in_use(area)
                heads = list(SLOT_HEAD.iter_unpack(memoryview(area)[: records * KEY_RECORD_SIZE]))
                for k in range(records):
                    order = _record_order(area, k * KEY_RECORD_SIZE, heads[2 * k], heads[2 * k + 1])
                    if order is None:
                        counts[-1] += 1  # unreadable
                    elif order:
                        counts[heads[2 * k + order[0]][0]] += 1
                group += 1
        finally:
            os.close(fd)
    return counts


# --- drivers -------------------------------------------------------------------------------


def throttle_delay(stats: PassStats, rate: float | None) -> float:
    """Seconds to wait so that re-wrapped DEKs per second stay at or under `rate`."""
    if not rate:
        return 0.0
    return max(0.0, stats.deks_rewrapped / rate - stats.elapsed())


def verify_and_finish(
    volume: Volume, rewrap: RewrapPass, purge_old: bool, counts: Counter[int] | None = None
) -> dict:
    """Count DEKs per version; retire/purge old versions only if none is left."""
    if counts is None:
        counts = census(volume)
    remaining = sum(n for version, n in counts.items() if version != rewrap.target)
    retired: list[int] = []
    if remaining == 0 and rewrap.stats.unreadable_slots == 0:
        retired = finish_rotation(volume, rewrap.target, purge_old)
    return {
        "done": remaining == 0,
        "target": rewrap.target,
        "deks_per_version": {str(v): n for v, n in sorted(counts.items())},
        "retired" if not purge_old else "purged": retired,
        **rewrap.stats.as_dict(),
    }


def rotate_offline(
    volume: Volume,
    provider_factory: ProviderFactory = open_provider,
    rate: float | None = None,
    purge_old: bool = False,
    on_progress=None,
) -> dict:
    target = start_rotation(volume, provider_factory)
    rewrap = RewrapPass(volume, target)
    for stats in rewrap.steps():
        delay = throttle_delay(stats, rate)
        if delay:
            time.sleep(delay)
        if on_progress is not None:
            on_progress(stats)
    return verify_and_finish(volume, rewrap, purge_old)
