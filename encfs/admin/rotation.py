"""KEK rotation (layer L5): a new KEK version, the re-wrap pass over every key slot
(encfs.admin.rewrap) driven to its end, the old versions retired; and the automatic
rotation policy.

Both the offline `rotate` and the daemon's supervisor run a rotation through one driver,
`RotationRun`.

With a new provider (`rotate --new-provider SPEC`) the new KEK version is protected by
that provider alone (protect_new_version, as `reencrypt` does); the old versions keep
their keyslots and are retired (or purged) with them. Blocks and DEKs stay as they are:
an old key file opens nothing of the volume after `--purge-old`, but a copy of the
backing store taken before still opens with it (docs/THREAT-MODEL.md section 8).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from encfs import config_store, crypto
from encfs.admin.rewrap import PassStats, RewrapPass, census
from encfs.engine import Volume
from encfs.errors import UsageError
from encfs.format.config_fields import parse_time
from encfs.format.volume import Protector, VolumeConfig

log = logging.getLogger(__name__)

# --- starting and finishing ----------------------------------------------------------------


def protect_like(
    volume: Volume, protectors: list[Protector], kek: bytes, binding: bytes
) -> list[Protector]:
    """A new KEK protected by the providers of `protectors` (same ids and kinds): every
    one must be vouched for by the operator, or nothing is protected."""
    providers = [(p, volume.operator.provider(p)) for p in protectors]
    try:
        return [
            Protector(protector.id, protector.kind, provider.protect(kek, binding))
            for protector, provider in providers
        ]
    finally:
        for _, provider in providers:
            provider.close()


def protect_new_version(
    volume: Volume,
    current: list[Protector],
    kek: bytes,
    binding: bytes,
    new_provider: tuple[str, dict[str, Any]] | None,
) -> list[Protector]:
    """The keyslots of a new KEK version: `new_provider` (kind, options) alone when the
    operator names one (trust.Operator.protect_with_new_provider: made and vouched for
    now), else those of `current` (protect_like)."""
    if new_provider is None:
        return protect_like(volume, current, kek, binding)
    return [volume.operator.protect_with_new_provider(new_provider, kek, binding)]


def made_current(
    volume: Volume, config: VolumeConfig, target: int, kek: bytes,
    protectors: list[Protector], event: str, epoch: int | None = None,
) -> None:
    """After the config naming KEK version `target` is on disk (only then may a DEK be
    wrapped under it): the keyring uses it for new DEKs; the audit trail says so."""
    volume.keyring.add_kek(target, kek, make_current=True, epoch=epoch)
    volume.config = config
    for protector in protectors:
        volume.audit.event("wrap", kek_version=target, provider=protector.kind, outcome="ok")
    volume.audit.event(event, target=target)


def start_rotation(
    volume: Volume, new_provider: tuple[str, dict[str, Any]] | None = None
) -> int:
    """Make KEK version N+1 current, or resume a started one.

    Returns the target version. New blocks use it from this moment on. The new KEK is
    protected by `new_provider` (kind, options: made now, e.g. a key file is created) alone,
    else by every provider of version N, each of which must be vouched for by the
    operator; a refusal (NotVouched, a bad provider, a key file that exists) comes before
    anything changes. A rotation resumed with `new_provider` must name the one it started
    with (UsageError).
    """
    with config_store.editing(
        volume.backing_path, volume.keyring, volume.operator
    ) as config:
        if config.rotation is not None:
            target = int(config.rotation["target"])
            if new_provider is not None and not volume.operator.started_with(
                config.kek_versions[target].protectors, new_provider
            ):
                raise UsageError(
                    f"the unfinished rotation to KEK version {target} is protected by another "
                    "provider than --new-provider names: run rotate without --new-provider "
                    "to finish it, then rotate again with --new-provider"
                )
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
        protectors = protect_new_version(
            volume, current.protectors, kek, config.provider_binding(target), new_provider
        )
        created = config.add_current_version(
            target, volume.keyring.wrap_volume_key(kek, config.volume_key_aad(target)), protectors
        )
        config.rotation = {"target": target, "started": created}
    made_current(volume, config, target, kek, protectors, "rotation_start")
    log.info("KEK version %d is current; re-wrapping DEKs", target)
    return target


def retire_old_versions(
    volume: Volume,
    pass_kind: Literal["rotation", "reencrypt"],
    target: int,
    purge_old: bool,
    needed: Collection[int] = (),
) -> list[int]:
    """The end of a pass (a rotation's or a reencrypt's) to KEK version `target`: every
    other version is retired, or with `purge_old` purged (its keyslots deleted, its KEK
    forgotten) unless a DEK still `needed` it, which keeps it retired. The pass's marker
    in the config is cleared in the same edit and `{pass_kind}_finish` audited. Returns
    the versions retired (purged), the needed ones left out."""
    with config_store.editing(
        volume.backing_path, volume.keyring, volume.operator
    ) as config:
        retired = []
        for number, version in list(config.kek_versions.items()):
            if number == target:
                continue
            if number in needed or not purge_old:
                version.state = "retired"
                if number in needed:
                    continue
            else:
                del config.kek_versions[number]
            retired.append(number)
        setattr(config, pass_kind, None)
    volume.config = config
    if purge_old:
        for number in retired:
            volume.keyring.forget_kek(number)
    volume.audit.event(
        f"{pass_kind}_finish",
        target=target,
        **({"purged": retired} if purge_old else {"retired": retired}),
    )
    return retired


# --- the automatic rotation policy ---------------------------------------------------------


def set_policy(volume: Volume, every_seconds: int | None, purge_old: bool) -> VolumeConfig:
    """Set (or with None remove) the volume's automatic rotation policy; the new config.

    The config is edited under its lock, authenticated with the keys of `volume` (the
    daemon's on a mounted volume, an offline unlock otherwise).
    """
    with config_store.editing(
        volume.backing_path, volume.keyring, volume.operator
    ) as config:
        config.rotation_policy = (
            None
            if every_seconds is None
            else {"every_seconds": int(every_seconds), "purge_old": bool(purge_old)}
        )
    volume.config = config
    return config


def next_rotation(config: VolumeConfig) -> datetime | None:
    """When the policy wants the next rotation: the current KEK version's creation plus
    the interval. None without a policy."""
    policy = config.rotation_policy
    if policy is None:
        return None
    created = parse_time(config.kek_versions[config.current_kek].created, "KEK created")
    return created + timedelta(seconds=policy["every_seconds"])


def seconds_until_rotation(config: VolumeConfig, now: datetime | None = None) -> float | None:
    """Seconds until the policy's next rotation (<= 0: due now); None without a policy."""
    due = next_rotation(config)
    if due is None:
        return None
    return (due - (now or datetime.now(UTC))).total_seconds()


def policy_summary(config: VolumeConfig) -> dict:
    """The policy and the next rotation, for `status`."""
    due = next_rotation(config)
    return {
        "rotation_policy": config.rotation_policy,
        "next_rotation": None if due is None else due.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# --- drivers -------------------------------------------------------------------------------


def throttle_delay(stats: PassStats, rate: float | None) -> float:
    """Seconds to wait so that re-wrapped DEKs per second stay at or under `rate`."""
    if not rate:
        return 0.0
    return max(0.0, stats.deks_rewrapped / rate - stats.elapsed())


def verify_and_finish(
    volume: Volume, rewrap: RewrapPass, purge_old: bool, counts: Counter[int] | None = None
) -> dict:
    """Count DEKs per version; retire/purge old versions only if none is left.

    `counts`: the pass's own count when it is known to be complete, else None (a census).
    """
    if counts is None:
        counts = census(volume, prefetch=False)
    remaining = sum(n for version, n in counts.items() if version != rewrap.target)
    retired: list[int] = []
    if remaining == 0 and rewrap.stats.unreadable_slots == 0:
        retired = retire_old_versions(volume, "rotation", rewrap.target, purge_old)
    return {
        "done": remaining == 0,
        "target": rewrap.target,
        "deks_per_version": {str(v): n for v, n in sorted(counts.items())},
        "retired" if not purge_old else "purged": retired,
        **rewrap.stats.as_dict(),
    }


class RotationRun:
    """One rotation from its start to its end: the driver that the offline `rotate` and
    the daemon's supervisor (encfs.daemon.supervisor) share. They differ only in how they
    wait between steps (time.sleep, or trio.sleep between slices of FUSE requests) and in
    how they count DEKs when the pass's own count is incomplete.

    Errors: starting raises what `start_rotation` raises (UsageError: a rotation without
    a vouched provider ...); a step raises what the pass cannot recover from (the keys
    are gone, the backing store fails). Nothing is lost when a run stops anywhere (an
    exception, a cancellation, a kill): the next run resumes the pass.
    """

    def __init__(
        self,
        volume: Volume,
        rate: float | None,
        purge_old: bool,
        new_provider: tuple[str, dict[str, Any]] | None = None,
    ) -> None:
        self.volume = volume
        self.rate = rate  # re-wrapped DEKs per second (None: unthrottled)
        self.purge_old = purge_old
        self.rewrap = RewrapPass(volume, start_rotation(volume, new_provider))

    def steps(self) -> Iterator[tuple[PassStats, float]]:
        """Each step of the pass (one key area), with the seconds to wait after it so the
        rate is kept."""
        for stats in self.rewrap.steps():
            yield stats, throttle_delay(stats, self.rate)

    def complete_count(self) -> Counter[int] | None:
        """DEKs per version by the pass's own count, None if something moved under it."""
        return self.rewrap.complete_count()

    def finish(self, counts: Counter[int] | None) -> dict:
        """Retire (or purge) the old versions if no DEK needs them any more: the result."""
        return verify_and_finish(self.volume, self.rewrap, self.purge_old, counts)


def rotate_offline(
    volume: Volume,
    rate: float | None = None,
    purge_old: bool = False,
    on_progress: Callable[[PassStats], None] | None = None,
    new_provider: tuple[str, dict[str, Any]] | None = None,
) -> dict:
    run = RotationRun(volume, rate, purge_old, new_provider)
    for stats, delay in run.steps():
        if delay:
            time.sleep(delay)
        if on_progress is not None:
            on_progress(stats)
    # Offline the volume lock is ours: nothing renames a file past the walk.
    return run.finish(run.complete_count())
