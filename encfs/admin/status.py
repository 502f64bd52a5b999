"""The status report of a volume (layer L5), built here once for the offline `status`
and for the daemon's (`encfs.daemon.supervisor`), which adds what only a mounted volume
has: key health, mountpoint, mount options, counters.

Both are plain dicts (the daemon sends its report as JSON); the CLI renders them.
"""

from __future__ import annotations

from collections import Counter

from encfs.admin import keyslots, rotation
from encfs.engine import Volume


def volume_report(volume: Volume, counts: Counter[int]) -> dict:
    """The KEK versions, their states and the DEKs each protects (`counts`: the census,
    `rewrap.census`). A census count under a version the config does not list (a
    config rolled back past a purge) or a malformed record is called out."""
    config = volume.config
    known = {str(v): n for v, n in sorted(counts.items()) if v in config.kek_versions}
    unknown = {
        str(v): n for v, n in sorted(counts.items()) if v > 0 and v not in config.kek_versions
    }
    return {
        "backing": volume.backing_path,
        "volume_id": config.volume_id.hex(),
        "generation": config.generation,
        "current_kek": config.current_kek,
        "kek_versions": {str(n): v.state for n, v in sorted(config.kek_versions.items())},
        "key_versions": keyslots.key_versions(config, volume.operator),
        "rotation": config.rotation,
        "reencrypt": config.reencrypt,
        **rotation.policy_summary(config),
        "deks_per_version": known,
        "unknown_kek_versions": unknown,
        "malformed_key_records": counts.get(-1, 0),
    }


def mounted_report(
    volume: Volume,
    counts: Counter[int],
    health: dict,
    mountpoint: str | None,
    mount_options: list[str],
) -> dict:
    """The daemon's report: the volume's, with its key health (`KeyHealth.summary`),
    where and how it is mounted, its counters and the kinds of its providers."""
    config = volume.config
    return {
        **health,
        **volume_report(volume, counts),
        "mountpoint": mountpoint,
        "mount_options": mount_options,
        "counters": dict(volume.counters),
        "providers": sorted({p.kind for v in config.kek_versions.values() for p in v.protectors}),
    }
