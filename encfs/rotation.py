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
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from encfs import crypto
from encfs.errors import IntegrityError, UsageError
from encfs.format import names as fnames
from encfs.format.blocks import (
    HEADER_SIZE,
    KEY_AREA_SIZE,
    KEY_RECORD_SIZE,
    SLOT_SIZE,
    FileHeader,
    KeySlot,
    newer_generation,
    slot_aad,
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


def data_files(volume: Volume) -> Iterator[tuple[int, str]]:
    """(directory fd, backing name) of every regular data file, without following links."""
    for _, dirnames, filenames, dir_fd in os.fwalk(
        ".", dir_fd=volume.root_fd, follow_symlinks=False
    ):
        dirnames[:] = [d for d in dirnames if fnames.classify(d) != "reserved"]
        for name in filenames:
            if fnames.classify(name) == "reserved":
                continue
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield dir_fd, name


def _slots(record: memoryview) -> list[tuple[int, KeySlot]]:
    """(position, slot) of the non-empty slots of a key record, newest first."""
    found = []
    for position in (0, SLOT_SIZE):
        slot = KeySlot.unpack(record[position : position + SLOT_SIZE])
        if slot is not None:
            found.append((position, slot))
    if len(found) == 2 and newer_generation(found[1][1].generation, found[0][1].generation):
        found.reverse()
    return found


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
        for dir_fd, name in data_files(self.volume):
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
        keyring = self.volume.keyring
        volume_id = self.volume.config.volume_id
        both = bytearray(area)  # step 1: old and new slots side by side
        final = bytearray(area)  # step 2: only the new slots
        rewrapped = 0
        view = memoryview(area)
        for k in range(len(area) // KEY_RECORD_SIZE):
            base = k * KEY_RECORD_SIZE
            block_index = group * 32 + k
            try:
                slots = _slots(view[base : base + KEY_RECORD_SIZE])
            except IntegrityError:
                self.stats.unreadable_slots += 1
                continue
            if not slots:
                continue
            self.stats.deks_seen += 1
            position, newest = slots[0]
            if newest.kek_version == self.target:
                if len(slots) == 2:  # residue of an interrupted step 2: finish it
                    final[base + slots[1][0] : base + slots[1][0] + SLOT_SIZE] = bytes(SLOT_SIZE)
                continue
            dek = None
            for _, slot in slots:
                try:
                    dek = keyring.slot_cipher(slot.kek_version, file_id).decrypt(
                        slot.nonce,
                        slot.wrapped_dek + slot.tag,
                        slot_aad(
                            volume_id, file_id, block_index, slot.kek_version, slot.generation
                        ),
                    )
                    generation = slot.generation
                    break
                except (crypto.InvalidTag_, IntegrityError):
                    continue
            if dek is None:
                self.stats.unreadable_slots += 1
                log.warning("re-wrap: block %d has no key slot that opens", block_index)
                continue
            new_generation = (generation + 1) & 0xFF
            nonce = crypto.random_nonce()
            wrapped = keyring.slot_cipher(self.target, file_id).encrypt(
                nonce,
                dek,
                slot_aad(volume_id, file_id, block_index, self.target, new_generation),
            )
            packed = KeySlot(self.target, new_generation, nonce, wrapped[:32], wrapped[32:]).pack()
            free = SLOT_SIZE - position
            both[base + free : base + free + SLOT_SIZE] = packed
            final[base : base + KEY_RECORD_SIZE] = bytes(KEY_RECORD_SIZE)
            final[base + free : base + free + SLOT_SIZE] = packed
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
    for dir_fd, name in data_files(volume):
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
                view = memoryview(area)
                for base in range(0, len(area) - KEY_RECORD_SIZE + 1, KEY_RECORD_SIZE):
                    try:
                        slots = _slots(view[base : base + KEY_RECORD_SIZE])
                    except IntegrityError:
                        counts[-1] += 1  # unreadable
                        continue
                    if slots:
                        counts[slots[0][1].kek_version] += 1
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
