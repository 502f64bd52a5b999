"""`encfs-gw provider add/remove/list`: escrow a volume's KEK under a second provider."""

from __future__ import annotations

import os

import pytest

from encfs.errors import UsageError, WrongKey
from tests.helpers.mount import Volume, mounted, run_cli


def test_add_escrow_key_then_open_with_it_alone(volume, tmp_path):
    escrow = tmp_path / "escrow.key"
    result = run_cli("provider", "add", volume.backing, f"keyfile:{escrow}", check=True)
    assert "added keyfile to 1 KEK version" in result.stdout
    listing = run_cli("provider", "list", volume.backing, check=True).stdout
    assert "slot 0" in listing and f"slot 1: keyfile:{escrow}" in listing
    assert os.stat(escrow).st_mode & 0o777 == 0o600
    config = (volume.backing / "encfs-gw.conf").read_text()
    assert escrow.read_text().strip() not in config


@pytest.mark.fuse
def test_escrow_key_mounts_after_original_key_is_lost(volume, tmp_path):
    escrow = tmp_path / "escrow.key"
    with mounted(volume, tmp_path / "mnt") as mnt:
        (mnt / "data").write_text("kept")
    run_cli("provider", "add", volume.backing, f"keyfile:{escrow}", check=True)
    volume.keyfile.unlink()
    with mounted(Volume(volume.backing, escrow), tmp_path / "mnt") as mnt:
        assert (mnt / "data").read_text() == "kept"


def test_remove_keyslot_and_refuse_removing_the_last(volume, tmp_path):
    escrow = tmp_path / "escrow.key"
    run_cli("provider", "add", volume.backing, f"keyfile:{escrow}", check=True)
    run_cli("provider", "remove", volume.backing, "0", check=True)
    listing = run_cli("provider", "list", volume.backing, check=True).stdout
    assert listing.count("slot ") == 1 and str(escrow) in listing
    result = run_cli("provider", "remove", volume.backing, "0")
    assert result.returncode == UsageError.exit_code
    assert "only provider" in result.stderr
    (tmp_path / "mnt").mkdir()
    # The removed key file no longer opens the volume.
    result = run_cli("mount", volume.backing, tmp_path / "mnt", "--keyfile", volume.keyfile)
    assert result.returncode == WrongKey.exit_code


def test_add_needs_a_working_key(volume, tmp_path):
    volume.keyfile.rename(tmp_path / "away.key")
    escrow = tmp_path / "x.key"
    result = run_cli("provider", "add", volume.backing, f"keyfile:{escrow}")
    assert result.returncode != 0
    assert result.stderr.startswith("encfs-gw: error:")
    # No escrow key file that protects nothing (and would make a retry exit 13).
    assert not escrow.exists()
    (tmp_path / "away.key").rename(volume.keyfile)
    run_cli("provider", "add", volume.backing, f"keyfile:{escrow}", check=True)
