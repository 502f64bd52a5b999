"""`encfs-gw upgrade`: the one explicit step from an unauthenticated config (volumes
made before the `authenticated-config` feature) to an authenticated one (layer L5).

An old config names its providers' options itself (key file paths, command argv,
module paths, endpoints), unauthenticated. Nothing of it is run without the operator:

1. `describe` lists what the old config holds (every keyslot with its stored options,
   the KEK versions, their states, the rotation state and policy) without running
   anything, so the operator can compare it with what they set up (borg's `upgrade
   --tam` prints the archives for the same reason);
2. the operator vouches: by naming the providers (`--keyfile`, `--provider`), or with
   `--trust-stored` for exactly the list shown;
3. the volume is unlocked with those providers only, and the config is rewritten with
   the feature flag, fresh keyslot ids, the volume key re-wrapped under the new
   parameters, generation 1 and its MAC; the vouched options go to the trust store.

Keyslots nobody vouched for keep their records (an offline escrow key, say) and can be
vouched for later with `encfs-gw trust`; they are never run until then.
"""

from __future__ import annotations

import json
import os

from encfs import config_store, crypto
from encfs.errors import UsageError
from encfs.format import FEATURE_AUTH_CONFIG
from encfs.format.volume import PROTECTOR_ID_SIZE, Protector, VolumeConfig
from encfs.keyring import Keyring
from encfs.trust import Operator, TrustEntry, VouchedProvider, canonical_backing


def read_legacy(backing_path: str) -> VolumeConfig:
    config, stored_mac = VolumeConfig.from_json(config_store.read_raw(backing_path))
    if stored_mac is not None:
        raise UsageError(f"the volume config of {backing_path} is already authenticated")
    return config


def describe(config: VolumeConfig) -> list[str]:
    """What the old config holds, one line each, for the operator to vouch for."""
    lines = [
        f"volume {config.volume_id.hex()}, block size {config.block_size}, "
        f"created {config.created}",
    ]
    for number in sorted(config.kek_versions):
        version = config.kek_versions[number]
        current = " (current)" if number == config.current_kek else ""
        lines.append(f"KEK version {number}{current}: {version.state}, made {version.created}")
    slots: dict[str, Protector] = {}
    for version in config.kek_versions.values():
        for protector in version.protectors:
            slots.setdefault(protector.id, protector)
    for index, protector in enumerate(slots.values()):
        options = json.dumps(protector.legacy_options, sort_keys=True)
        lines.append(f"keyslot {index}: {protector.kind} {options}")
    if config.rotation is not None:
        lines.append(f"a rotation to KEK version {config.rotation['target']} is unfinished")
    if config.rotation_policy is not None:
        lines.append(f"rotation policy: {config.rotation_policy}")
    return lines


def upgrade(backing_path: str, operator: Operator, trust_stored: bool) -> VolumeConfig:
    """Authenticate the config of an unmounted legacy volume (steps 2 and 3 above)."""
    config = read_legacy(backing_path)
    config_store.refuse_downgrade(config, operator, backing_path)
    if not operator.specs and not trust_stored:
        raise UsageError(
            "name the key providers you vouch for (--keyfile/--provider), or review the "
            "list above and pass --trust-stored"
        )
    operator.backing = canonical_backing(backing_path)
    if trust_stored:
        operator.entry = TrustEntry(config.volume_id.hex(), "", 0, "", [], {
            p.id: VouchedProvider(p.kind, dict(p.legacy_options or {}))
            for v in config.kek_versions.values() for p in v.protectors
        })
    lock_fd = config_store.lock_volume_at(backing_path)
    try:
        keyring = Keyring.unlock(config, operator)
        # Stored options the operator vouched for, before the ids change.
        stored = {
            pid: operator.entry.protectors[pid] for pid in config.protector_ids()
        } if trust_stored and operator.entry else {}
        new = _authenticated(config, keyring)
        new_ids = _new_ids(config)
        for version in new.kek_versions.values():
            for protector in version.protectors:
                protector.id = new_ids[protector.id]
        opened = dict(operator.opened_by_spec)
        operator.opened_by_spec = {}
        for old_id, vouched in stored.items():
            operator.vouch(new_ids[old_id], vouched.kind, vouched.options)
        for old_id, spec in opened.items():
            operator.vouch(new_ids[old_id], spec.kind, spec.options)
        operator.entry = None
        keyring.current_kek_version = new.current_kek
        config_store.write_new(backing_path, new, keyring)
        check = keyring.volume_key_check()
        keyring.close()
    finally:
        os.close(lock_fd)
    # After the write: a failure here leaves an upgraded volume that the next command
    # naming its provider (--keyfile/--provider, or encfs-gw trust) records again. The
    # operator vouches for this config: it replaces what the store knew of the volume
    # (e.g. another copy of it, upgraded before).
    operator.accept_rollback = True
    operator.accept(new, check)
    return new


def _new_ids(config: VolumeConfig) -> dict[str, str]:
    return {old: crypto.random_key(PROTECTOR_ID_SIZE).hex() for old in config.protector_ids()}


def _authenticated(config: VolumeConfig, keyring: Keyring) -> VolumeConfig:
    """The same volume with the feature flag: the volume key re-wrapped under every KEK
    version for the new parameters (the feature list is part of the wrap's AAD)."""
    new = VolumeConfig(
        volume_id=config.volume_id,
        block_size=config.block_size,
        features=(*config.features, FEATURE_AUTH_CONFIG),
        created=config.created,
        current_kek=config.current_kek,
        kek_versions={},
        format_version=config.format_version,
        generation=1,
        rotation=config.rotation,
        rotation_policy=config.rotation_policy,
    )
    for number, version in config.kek_versions.items():
        kek = keyring.kek(number)
        try:
            wrapped = keyring.wrap_volume_key(kek, new.volume_key_aad(number))
        finally:
            crypto.wipe(kek)
        new.kek_versions[number] = type(version)(
            version=number,
            state=version.state,
            created=version.created,
            wrapped_volume_key=wrapped,
            protectors=[Protector(p.id, p.kind, p.record) for p in version.protectors],
        )
    new.validate()
    return new
