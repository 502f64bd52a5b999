"""Re-encryption (layer L5), the driver: a new KEK version and a new volume key, every
name, symlink target, xattr set and binding moved to the new volume key
(encfs.admin.reencrypt_names), every block decrypted and written again under a fresh DEK
wrapped under the new KEK version (encfs.admin.reencrypt_data, through the journal of
encfs.admin.reencrypt_journal), offline, under the volume lock.

`rotate` re-wraps the DEKs a block already has; an attacker who kept an old KEK and
old key areas still reads every block not rewritten since. `reencrypt` gives every
block a new DEK, so nothing saved before it (KEKs, key areas, configs, key files)
opens a block after it; with `--new-provider` the new KEK is protected by another
provider (a new key file: the leaked one opens nothing of the new version).

The volume key, from which the keys of names, symlink targets, xattrs, bindings and the
config MAC derive, is replaced too (feature volume-key-epochs: each KEK version records
the epoch of the volume key it wraps; docs/FORMAT.md 9.2): with --purge-old nothing
saved before the pass decrypts a current name either. Volumes without bound-names or
xattr-sets (made by older versions) keep their volume key: the result says so.

The pass (docs/FORMAT.md section 9 gives the bytes and the crash argument):

1. Start, in one atomic config write: feature volume-key-epochs set (the first time:
   every existing version's volume key wrapped again under the new parameters, epoch
   1); KEK version N+1 (new KEK; protected by `--new-provider` only, else by the
   providers of version N) wraps a new volume key of epoch e+1; the config records the
   pass (`reencrypt`: target, started, from_epoch) and is MACed under the new volume
   key. Every other command refuses it (exit 14), older readers refuse the feature
   (exit 11). An unfinished rotation is superseded.
2. A journal a killed run left is replayed (it names files by their backing path).
3. The name pass (encfs.admin.reencrypt_names).
4. Walk every backing data file, group by group (32 blocks): each block not held by
   exactly one key slot under version N+1 is decrypted (newest slot first) and sealed
   under a fresh DEK and nonce. Groups are gathered into batches of at most
   BATCH_BYTES of journal; each batch is written to the journal (one file, MACed,
   fsynced, renamed into place), then in place (per group: key area with old and new
   slots, the new block records, the key area with only the new slots), the batch's
   files synced (fdatasync), and the journal renamed back to journal.new (removed at
   the end). A batch is written on a thread while the next one is read and sealed. A
   kill inside a multi-page pwrite of block records (FORMAT.md 4) is repaired by
   replaying the journal on the next run.
5. A census of the key areas: no DEK under another version and no block that could not
   be read: the old versions are retired (`--purge-old`: removed), the pass recorded
   finished. Otherwise the versions still needed stay (retired) and the result says
   what is left.

Crash safety: a run killed anywhere is resumed by running `reencrypt` again: it replays
the journal (or discards a batch that never became the journal), then walks again,
skipping blocks already under version N+1.

Decisions (where the code differs from the first sketch, and why):
* `features` is bound into every wrapped volume key and the config MAC: setting
  volume-key-epochs re-wraps the volume key under every KEK version in the same config
  write that adds version N+1, so no state a crash leaves has a flag its wraps do not
  match.
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
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from encfs import config_store, crypto
from encfs.admin.reencrypt_data import ReencryptPass, ReencryptStats
from encfs.admin.reencrypt_journal import BATCH_BYTES, CRASH_AT_ENV, CRASH_STEPS, JOURNAL_DIR
from encfs.admin.reencrypt_names import NamePass
from encfs.admin.rewrap import census
from encfs.admin.rotation import made_current, protect_new_version, retire_old_versions
from encfs.engine import Volume
from encfs.engine.follow import EntryFollower
from encfs.errors import UsageError
from encfs.format import FEATURE_BOUND_NAMES, FEATURE_VK_EPOCHS, FEATURE_XATTR_SETS
from encfs.format.volume import VOLUME_KEY_SIZE, VolumeConfig

__all__ = [
    "CRASH_AT_ENV", "CRASH_STEPS", "ReencryptRun", "ReencryptStats", "finish_pass",
    "is_paused", "mount_prepare", "reencrypt_offline", "set_paused", "start_pass",
]

log = logging.getLogger(__name__)

# The daemon's batches: a batch is written, synced and applied in one synchronous step on
# the request loop, so requests wait for it (about one fsync of this much journal).
ONLINE_BATCH_BYTES = 1 << 20

# --- starting and finishing ----------------------------------------------------------------


def moves_names(config: VolumeConfig) -> bool:
    """The name pass knows this volume's formats of names, symlinks and xattrs."""
    return FEATURE_BOUND_NAMES in config.features and FEATURE_XATTR_SETS in config.features


def start_pass(volume: Volume, new_provider: tuple[str, dict[str, Any]] | None) -> int:
    """Make KEK version N+1 current (with a new volume key, where the volume's format
    allows it) and record the pass, or resume a started one.

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
    protectors = protect_new_version(
        volume, config.kek_versions[config.current_kek].protectors, kek,
        config.provider_binding(target), new_provider,
    )
    new_epoch = None
    with config_store.editing(volume.backing_path, volume.keyring, operator) as config:
        if max(config.kek_versions) + 1 != target or config.reencrypt is not None:
            raise UsageError("the volume's KEK versions changed meanwhile; run it again")
        if moves_names(config):
            new_epoch = _new_volume_key(volume, config)
            wrapped = volume.keyring.wrap_volume_key(
                kek, config.volume_key_aad(target, new_epoch), new_epoch
            )
        else:
            wrapped = volume.keyring.wrap_volume_key(kek, config.volume_key_aad(target))
        from_epoch = config.current_epoch
        created = config.add_current_version(target, wrapped, protectors, new_epoch)
        config.rotation = None  # superseded: every DEK moves to `target` anyway
        config.reencrypt = {"target": target, "started": created}
        if new_epoch is not None:
            config.reencrypt["from_epoch"] = from_epoch
        # MACed under the new volume key (the current version's): loaded just above
    made_current(volume, config, target, kek, protectors, "reencrypt_start", new_epoch)
    return target


def _new_volume_key(volume: Volume, config: VolumeConfig) -> int:
    """A new volume key for the config being written; its epoch. The first time, the
    feature is set and every version's volume key wrapped again (features are part of
    the wrap's AAD) as epoch 1, in the same write."""
    keyring = volume.keyring
    if not config.epochs:
        config.features = (*config.features, FEATURE_VK_EPOCHS)
        for number, version in config.kek_versions.items():
            version.volume_key_epoch = 1
            kek = keyring.kek(number)
            try:
                version.wrapped_volume_key = keyring.wrap_volume_key(
                    kek, config.volume_key_aad(number), 1
                )
            finally:
                crypto.wipe(kek)
    new_epoch = max(config.epoch_of(v) for v in config.kek_versions) + 1
    if not keyring.has_epoch(new_epoch):  # a run that failed before its write loaded it
        keyring.add_epoch(new_epoch, crypto.random_secret(VOLUME_KEY_SIZE))
    return new_epoch


def _same_provider(volume: Volume, target: int, wanted: tuple[str, dict[str, Any]]) -> None:
    """A pass resumed with --new-provider: it must name the provider it started with."""
    if volume.operator.started_with(volume.config.kek_versions[target].protectors, wanted):
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
    retired = retire_old_versions(volume, "reencrypt", target, purge_old, needed)
    return {("purged" if purge_old else "retired"): retired, "still_needed": sorted(needed)}


def throttle_delay(stats: ReencryptStats, rate_mib_s: float | None) -> float:
    """Seconds to wait so that re-encrypted MiB per second stay at or under the rate."""
    if not rate_mib_s:
        return 0.0
    return max(0.0, stats.bytes_reencrypted / 1048576 / rate_mib_s - stats.elapsed())


class ReencryptRun:
    """One re-encryption from its start (or resume) to its end: the driver the offline
    `reencrypt` and the daemon's supervisor (encfs.daemon.supervisor, online) share. They
    differ in how they wait between steps (time.sleep, or trio.sleep between slices of
    FUSE requests), in how often they walk (online, requests may move or write what a
    walk passed: it walks again while the census finds DEKs under older versions) and in
    `observer` (online: the engine's inodes and listings follow the name pass).

    Construction (start_pass) is one synchronous step: from it on, new names and
    bindings are under the new volume key, and reads accept the old one too
    (`Keyring.reading_epoch`) until the name pass is over. Offline (and before a mount
    serves) prepare() runs the name pass whole; the daemon runs name_steps() one
    directory per step, then the data steps, between requests.
    """

    def __init__(
        self,
        volume: Volume,
        rate: float | None = None,
        purge_old: bool = False,
        new_provider: tuple[str, dict[str, Any]] | None = None,
        observer: EntryFollower | None = None,
    ) -> None:
        self.volume = volume
        self.rate = rate
        self.purge_old = purge_old
        self.observer = observer
        self.target = start_pass(volume, new_provider)
        # online: batches of ONLINE_BATCH_BYTES (each is one step requests wait for),
        # written on the caller's thread in that step (requests may write the same files
        # between steps: only the syncs and the journal's removal go to a thread)
        online = observer is not None
        self.data = ReencryptPass(
            volume, self.target, overlap=not online,
            batch_bytes=ONLINE_BATCH_BYTES if online else BATCH_BYTES,
        )
        self.data.started()
        # Until every name is moved, reads accept the epoch the names leave too (the
        # engine's, on a mounted volume: Keyring.read_epoch_keys); writes use the new one.
        self.from_epoch: int | None = (volume.config.reencrypt or {}).get("from_epoch")
        volume.keyring.reading_epoch = self.from_epoch
        self.names: dict[str, Any] = {
            "volume_key": "unchanged (the volume's format predates the name pass: "
                          "bound-names and xattr-sets)"
        }

    def prepare(self) -> None:
        """The journal a killed run left replayed (it names files by their backing paths:
        before any rename), then the name pass, whole (offline, and before a mount
        serves)."""
        self.data.replay()
        for _ in self.name_steps(lambda: 0, walks=1):
            pass

    def name_steps(self, renames: Callable[[], int], walks: int = 1) -> Iterator[None]:
        """The name pass, one step per directory (the stores first). Online, requests run
        between the steps: one may move an entry or a directory from where the walk has
        not been to where it has (a rename gives the entry a new name, but a directory's
        entries keep theirs, a symlink its target). So it walks again until a walk moved
        nothing while `renames` (the engine's count of renames) stayed the same, at most
        `walks` times; the last walk is then one step. Then reads accept the new epoch
        only."""
        from_epoch = self.from_epoch
        if from_epoch is None:
            return
        names = NamePass(self.volume, from_epoch, self.observer)
        names.stores()
        yield
        for walk in range(walks):
            moved, renamed = names.moved(), renames()
            if walk == walks - 1:  # the last: no request between its directories
                for _ in names.steps():
                    pass
                break
            for _ in names.steps():
                yield
            if names.moved() == moved and renames() == renamed:
                break
        self.volume.keyring.reading_epoch = None
        self.names = {
            "volume_key": f"epoch {self.volume.keyring.current_epoch} (was {from_epoch})",
            **names.stats.as_dict(),
        }

    def steps(self) -> Iterator[tuple[ReencryptStats, float]]:
        """One walk of the data pass: each step, with the seconds to wait after it so the
        rate is kept."""
        for stats in self.data.steps():
            yield stats, throttle_delay(stats, self.rate)

    def walk_again(self) -> None:
        """Another walk (online: something moved under the last one); the totals are
        counted again, the work done is kept."""
        stats = self.data.stats
        stats.files_total = stats.files_done = stats.bytes_total = stats.bytes_done = 0

    @staticmethod
    def remaining(counts: Counter[int], target: int) -> int:
        return sum(n for version, n in counts.items() if version not in (target, -1))

    def finish(self, counts: Counter[int]) -> dict:
        """After the census: the journal's directory removed, the pass recorded finished
        (old versions retired or purged where no DEK needs them): the result."""
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(JOURNAL_DIR, dir_fd=self.volume.root_fd)  # empty: no batch is pending
        counts = Counter(counts)
        counts.pop(-1, None)  # malformed records: counted by the pass as unreadable
        remaining = self.remaining(counts, self.target)
        finished = finish_pass(self.volume, self.target, self.purge_old, counts)
        stats = self.data.stats
        return {
            "done": remaining == 0 and stats.unreadable_blocks == 0,
            "target": self.target,
            "deks_per_version": {str(v): n for v, n in sorted(counts.items())},
            **finished,
            **stats.as_dict(),
            **self.names,
        }


def set_paused(volume: Volume, paused: bool) -> None:
    """Record the unfinished pass paused (a mount leaves it so) or not."""
    with config_store.editing(volume.backing_path, volume.keyring, volume.operator) as config:
        if config.reencrypt is None:
            raise UsageError("no re-encryption is in progress on this volume")
        if paused:
            config.reencrypt["paused"] = True
        else:
            config.reencrypt.pop("paused", None)
    volume.config = config


def is_paused(config: VolumeConfig) -> bool:
    return bool((config.reencrypt or {}).get("paused"))


def mount_prepare(volume: Volume) -> None:
    """Before a volume whose re-encryption is unfinished is served (the daemon, under the
    volume lock, before the FUSE mount): its journal replayed and its name pass finished,
    so every name, binding and set is under the current volume key. The data pass is
    resumed by the daemon (encfs.daemon.supervisor), between requests."""
    if volume.config.reencrypt is not None:
        ReencryptRun(volume).prepare()


def reencrypt_offline(
    volume: Volume,
    rate: float | None = None,
    purge_old: bool = False,
    new_provider: tuple[str, dict[str, Any]] | None = None,
    on_progress: Callable[[ReencryptStats], None] | None = None,
) -> dict:
    """The whole pass on an unmounted volume (Volume.unlock(..., reencrypting=True))."""
    root_times = os.stat(volume.root_fd)  # config and journal writes are not the owner's
    run = ReencryptRun(volume, rate, purge_old, new_provider)
    if is_paused(volume.config):
        set_paused(volume, False)  # run again: the operator resumes it
    run.prepare()
    for stats, delay in run.steps():
        if delay:
            time.sleep(delay)
        if on_progress is not None:
            on_progress(stats)
    # offline the volume lock is ours: nothing moves a file past the walk
    result = run.finish(census(volume, prefetch=False))
    os.utime(volume.root_fd, ns=(root_times.st_atime_ns, root_times.st_mtime_ns))
    return result
