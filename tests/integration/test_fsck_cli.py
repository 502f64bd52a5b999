"""`encfs-gw fsck` and `encfs-gw destroy` through the real command line.

The damage itself is injected on the backing files; what each kind of damage means to
the checker is covered in tests/fs/test_fsck.py. Here: exit codes, the report (plaintext
path and block index), --json, --repair, refusal while mounted, and crypto-shredding.
"""

from __future__ import annotations

import json
import os

import pytest

from encfs.engine import ROOT_INODE, Volume
from encfs.errors import FsckProblems, KeyRevoked, UsageError, VolumeBusy
from encfs.format.blocks import Layout
from encfs.format.names import TEMP_PREFIX
from tests.helpers.mount import init_volume, mounted, run_cli

pytestmark = pytest.mark.fuse

BLOCK = 4096


@pytest.fixture
def populated(tmp_path):
    volume = init_volume(tmp_path, block_size=BLOCK)
    files = {"big": os.urandom(5 * BLOCK + 7), "small": b"small file"}
    with mounted(volume, tmp_path / "mnt") as mnt:
        (mnt / "dir").mkdir()
        for name, data in files.items():
            (mnt / "dir" / name).write_bytes(data)
        (mnt / "link").symlink_to("dir/big")
    return volume, files


def backing_file(volume, *names: bytes) -> str:
    vol = Volume.unlock(str(volume.backing), _keyfile_factory(volume))
    try:
        ino = ROOT_INODE
        path = str(volume.backing)
        for name in names:
            cipher_name = vol.backing_name(ino, name)[0]
            path = os.path.join(path, cipher_name)
            ino = vol.lookup(ino, name).ino
        return path
    finally:
        vol.close()


def _keyfile_factory(volume):
    from tests.helpers.config import operator_for

    return operator_for(volume.keyfile)


def fsck(volume, *extra: str):
    return run_cli("fsck", volume.backing, "--keyfile", volume.keyfile, *extra)


def test_clean_volume_exits_0_with_a_summary(populated):
    volume, _ = populated
    result = fsck(volume)
    assert result.returncode == 0, result.stderr
    assert "checked 2 files, 2 directories, 1 symlinks" in result.stdout
    assert "0 problem(s)" in result.stdout
    report = json.loads(fsck(volume, "--json").stdout)
    assert report["files"] == 2 and report["findings"] == [] and report["remaining"] == 0


@pytest.mark.expected_log(r"integrity failure")
def test_tampered_block_is_reported_with_path_and_block(populated, tmp_path):
    volume, files = populated
    path = backing_file(volume, b"dir", b"big")
    with open(path, "r+b") as f:
        f.seek(Layout(BLOCK).record_offset(2) + 40)
        f.write(b"\x00\x01\x02")
    result = fsck(volume, "--repair")  # not repairable: readable data is never cut off
    assert result.returncode == FsckProblems.exit_code
    assert "/dir/big block 2: block does not authenticate" in result.stdout
    assert "looks like tampering; NOT repairable" in result.stdout
    assert result.stderr.strip().startswith("encfs-gw: error: 1 problem(s) remain")
    report = json.loads(fsck(volume, "--json").stdout)
    (finding,) = report["findings"]
    assert finding["path"] == "/dir/big" and finding["block"] == 2
    assert finding["looks_like"] == "tampering" and report["quarantined"] == 0
    with mounted(volume, tmp_path / "mnt") as mnt:  # the other blocks still read
        with open(mnt / "dir" / "big", "rb") as f:
            assert f.read(2 * BLOCK) == files["big"][: 2 * BLOCK]
        assert (mnt / "dir" / "small").read_bytes() == files["small"]


def test_repair_cleans_crash_debris_then_the_volume_is_clean(populated, tmp_path):
    volume, files = populated
    (volume.backing / f"{TEMP_PREFIX}00000000000000aa").write_bytes(b"half-written")
    path = backing_file(volume, b"dir", b"big")
    # A kill inside the write that extended the file: cut at a page boundary in block 4.
    os.truncate(path, 6 * 4096)
    assert Layout(BLOCK).record_offset(4) < 6 * 4096 < Layout(BLOCK).record_offset(5)
    result = fsck(volume)
    assert result.returncode == FsckProblems.exit_code
    assert "/dir/big block 4: torn tail" in result.stdout
    assert "looks like crash debris; repairable (--repair)" in result.stdout
    assert "run fsck --repair" in result.stderr
    result = fsck(volume, "--repair")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "remaining" in result.stdout and " 0 remaining" in result.stdout
    assert "evidence in quarantine" in result.stdout
    result = fsck(volume)
    assert result.returncode == 0
    assert "the quarantine holds 1 item(s)" in result.stdout
    with mounted(volume, tmp_path / "mnt") as mnt:
        assert (mnt / "dir" / "big").read_bytes() == files["big"][: 4 * BLOCK]
        assert (mnt / "dir" / "small").read_bytes() == files["small"]


def test_fsck_refuses_a_mounted_volume(populated, tmp_path):
    volume, _ = populated
    with mounted(volume, tmp_path / "mnt"):
        result = fsck(volume)
    assert result.returncode == VolumeBusy.exit_code
    assert result.stderr.count("\n") == 1 and "in use" in result.stderr


def test_destroy_needs_the_volume_id_then_nothing_opens(populated, tmp_path):
    volume, _ = populated
    status = run_cli("status", volume.backing, "--keyfile", volume.keyfile, "--json")
    volume_id = json.loads(status.stdout)["volume_id"]

    result = run_cli("destroy", volume.backing, "--yes-destroy-all-data", "0" * 32)
    assert result.returncode == UsageError.exit_code and volume_id in result.stderr
    result = run_cli("destroy", volume.backing)  # the confirmation is required
    assert result.returncode == UsageError.exit_code
    assert result.stderr.count("\n") == 1
    assert fsck(volume).returncode == 0  # nothing happened

    audit = tmp_path / "audit.log"
    result = run_cli(
        "destroy", volume.backing, "--yes-destroy-all-data", volume_id, "--audit-log", audit
    )
    assert result.returncode == 0, result.stderr
    assert "destroyed" in result.stdout
    assert json.loads(audit.read_text().splitlines()[-1])["event"] == "crypto_shred"
    assert not volume.keyfile.exists() or volume.keyfile.stat().st_size == 0

    (tmp_path / "mnt2").mkdir()
    result = run_cli("mount", volume.backing, tmp_path / "mnt2", "--keyfile", volume.keyfile)
    assert result.returncode == KeyRevoked.exit_code
    assert "destroyed" in result.stderr


def test_swapped_files_quarantined_and_exported_by_the_operator(populated, tmp_path):
    volume, files = populated
    big, small = backing_file(volume, b"dir", b"big"), backing_file(volume, b"dir", b"small")
    os.rename(big, big + ".x")
    os.rename(small, big)
    os.rename(big + ".x", small)
    result = fsck(volume, "--repair")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "/dir/big: file bound to another name" in result.stdout
    assert "/dir/small: file bound to another name" in result.stdout
    assert result.stdout.count("looks like tampering; repaired, evidence in quarantine") == 2
    with mounted(volume, tmp_path / "mnt") as mnt:
        assert sorted(os.listdir(mnt / "dir")) == []  # nothing readable came back
        assert sorted(os.listdir(mnt)) == ["dir", "link"]
    out = tmp_path / "evidence"
    result = fsck(volume, "--export-quarantine", out)
    assert result.returncode == 0, result.stderr
    assert "exported 2 quarantine item(s)" in result.stdout
    exported = {
        json.loads((item / "finding.json").read_text())["path"]: item for item in out.iterdir()
    }
    # The operator sees what the attacker put under each name, outside the volume.
    assert (exported["/dir/big"] / "plaintext" / "big").read_bytes() == files["small"]
    assert (exported["/dir/small"] / "plaintext" / "small").read_bytes() == files["big"]
    result = fsck(volume, "--export-quarantine", out)
    assert result.returncode == UsageError.exit_code  # not over an earlier export
    result = fsck(volume, "--repair", "--export-quarantine", tmp_path / "other")
    assert result.returncode == UsageError.exit_code
    assert result.stderr.count("\n") == 1
