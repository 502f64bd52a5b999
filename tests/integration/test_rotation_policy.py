"""Automatic rotation: a policy in the volume config, applied by the daemon.

The key's age is what the policy measures (the current KEK version's `created`); the
tests make a key old by editing that time in the config, a state a real volume reaches
by waiting. No test waits for a timer: `rotate-every` on a mount applies the policy
before it returns (a second caller waits for a pass the daemon's own timer started).
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import pytest

from encfs.admin import rotation
from encfs.cli.rotating import format_interval, parse_interval
from encfs.engine import Volume
from encfs.errors import ConfigError, UsageError
from encfs.format.volume import VolumeConfig
from tests.helpers.config import edit_config, operator_for
from tests.helpers.mount import init_volume, mounted, run_cli

CONFIG = "encfs-gw.conf"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90d", 90 * 86400), ("12h", 43200), ("30m", 1800), ("45s", 45), ("7", 7 * 86400),
     ("1.5h", 5400), ("OFF", None)],
)
def test_intervals(text, seconds):
    assert parse_interval(text) == seconds
    if seconds is not None:  # and back: the shortest whole unit
        assert parse_interval(format_interval(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "d", "-1d", "0s", "soon", "200y", "1000000d"])
def test_bad_intervals_are_usage_errors(text):
    with pytest.raises(UsageError):
        parse_interval(text)


def age_current_kek(volume, days: float) -> None:
    """Make the current KEK look `days` old: an authentic edit, as the key holder."""
    created = (datetime.now(UTC) - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")

    def age(config: VolumeConfig) -> None:
        config.kek_versions[config.current_kek].created = created

    edit_config(volume.backing, volume.keyfile, age)


def status(target) -> dict:
    return json.loads(run_cli("status", target, "--json", check=True).stdout)


def test_policy_is_validated_and_round_trips(tmp_path):
    volume = init_volume(tmp_path)
    engine = Volume.unlock(str(volume.backing), operator_for(volume.keyfile))
    try:
        config = rotation.set_policy(engine, 3600, purge_old=True)
    finally:
        engine.close()
    assert config.rotation_policy == {"every_seconds": 3600, "purge_old": True}
    raw = (volume.backing / CONFIG).read_bytes()
    assert VolumeConfig.from_json(raw)[0].rotation_policy == config.rotation_policy
    remaining = rotation.seconds_until_rotation(config)
    assert 3590 < remaining <= 3600
    for bad in ({"every_seconds": 0, "purge_old": True}, {"every_seconds": 10},
                {"every_seconds": "10", "purge_old": False},
                {"every_seconds": 10, "purge_old": False, "x": 1}):
        doc = json.loads(raw)
        doc["rotation_policy"] = bad
        with pytest.raises(ConfigError):
            VolumeConfig.from_json(json.dumps(doc).encode())
    engine = Volume.unlock(str(volume.backing), operator_for(volume.keyfile))
    try:
        assert rotation.set_policy(engine, None, False).rotation_policy is None
    finally:
        engine.close()


def test_an_overdue_policy_rotates_on_mount_and_purges(tmp_path):
    volume = init_volume(tmp_path)
    mnt = tmp_path / "mnt"
    data = {f"f{i}": random.Random(i).randbytes(i * 7000) for i in range(12)}
    with mounted(volume, mnt):
        for name, content in data.items():
            (mnt / name).write_bytes(content)

    result = run_cli("rotate-every", volume.backing, "30d", "--purge-old", check=True)
    assert "every 30d, purging old versions" in result.stdout and "once mounted" in result.stdout
    offline = status(volume.backing)
    assert offline["rotation_policy"] == {"every_seconds": 2592000, "purge_old": True}
    age_current_kek(volume, days=31)

    audit = tmp_path / "audit.log"
    with mounted(volume, mnt, f"audit_log={audit}"):
        # Applies the policy before returning: the pass ran (by the daemon's timer at
        # mount, or by this request), so the state below is final.
        run_cli("rotate-every", mnt, "30d", "--purge-old", check=True)
        reply = status(mnt)
        assert reply["current_kek"] == 2 and reply["rotation"] is None
        assert reply["kek_versions"] == {"2": "active"}  # version 1 purged
        assert set(reply["deks_per_version"]) == {"2"}
        next_rotation = datetime.fromisoformat(reply["next_rotation"])
        assert timedelta(days=29) < next_rotation - datetime.now(UTC) <= timedelta(days=30)
        for name, content in data.items():
            assert (mnt / name).read_bytes() == content

        # Not due: applying it again changes nothing.
        result = run_cli("rotate-every", mnt, "30d", check=True)
        assert "rotated" not in result.stdout
        assert status(mnt)["current_kek"] == 2

        result = run_cli("rotate-every", mnt, "off", check=True)
        assert "off" in result.stdout
        assert status(mnt)["rotation_policy"] is None
    events = [json.loads(line)["event"] for line in audit.read_text().splitlines()]
    assert events.count("rotation_start") == events.count("rotation_finish") == 1


def test_policy_due_on_a_mount_applies_at_once(tmp_path):
    """A policy set on a live mount whose key is already older than the interval: the
    daemon rotates before the command returns (retire only, no purge)."""
    volume = init_volume(tmp_path)
    mnt = tmp_path / "mnt"
    with mounted(volume, mnt):
        (mnt / "a").write_bytes(b"x" * 100_000)
    age_current_kek(volume, days=2)
    with mounted(volume, mnt):
        result = run_cli("rotate-every", mnt, "1d", check=True)
        assert "rotated to KEK version 2 now" in result.stdout
        reply = status(mnt)
        assert reply["kek_versions"] == {"1": "retired", "2": "active"}
        assert reply["deks_per_version"] == {"2": 7}  # 100,000 bytes in 16 KiB blocks
        assert (mnt / "a").read_bytes() == b"x" * 100_000
