"""`encfs-gw reencrypt`: every block of an unmounted volume under a fresh DEK and a new KEK
version, through the real CLI on real volumes (written through a real mount).

The model: files of every shape (empty, one byte, block edges, several groups, sparse,
hard-linked, a long name, in a subdirectory) plus a symlink and xattrs, written through
the mount and kept in memory; after the pass every file is read back through a mount
and compared. The crash tests kill `reencrypt` (SIGKILL, test hook
ENCFS_TESTONLY_REENCRYPT_CRASH_AT=BATCH:STEP) at seeded points of its batches and
resume; the compromise test keeps what an attacker could have kept before the pass.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from encfs import crypto
from encfs.admin.reencrypt import CRASH_AT_ENV, CRASH_STEPS
from encfs.admin.rewrap import CRASH_AFTER_ENV as ROTATION_CRASH_AFTER_ENV
from encfs.engine.bindings import UNBOUND_LABEL, Bindings
from encfs.errors import (
    IntegrityError,
    KeyAccessError,
    ProviderConfigError,
    UsageError,
    VolumeBusy,
    WrongKey,
)
from encfs.format import names as fnames
from encfs.format import places
from encfs.format import xattrs as xformat
from encfs.format.blocks import (
    HEADER_SIZE,
    KEY_RECORD_SIZE,
    NONCE_SIZE,
    RECORD_OVERHEAD,
    SLOT,
    SLOT_SIZE,
    FileHeader,
    Layout,
    block_aad,
    slot_aad,
)
from encfs.format.places import DirRecord, LinkRecord
from encfs.format.volume import VolumeConfig
from encfs.keyring import EpochKeys, Keyring
from encfs.keys.keyfile import KeyfileProvider
from tests.helpers.config import operator_for
from tests.helpers.mount import ENCFS_GW, mounted, run_cli
from tests.helpers.mount import Volume as CliVolume

pytestmark = pytest.mark.fuse

LAYOUT = Layout(16384)
MIB = 1 << 20


def reencrypt(backing: Path, *args: str | os.PathLike, env: dict | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*ENCFS_GW, "reencrypt", str(backing), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, **(env or {})},
    )


def assert_refused(result: subprocess.CompletedProcess, code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("encfs-gw: error: "), result.stderr
    return lines[0]


def fill(mnt: Path, seed: int, big_mib: int = 3) -> dict[str, bytes]:
    """Files of every shape; returns the model (path -> contents)."""
    rnd = random.Random(seed)
    files: dict[str, bytes] = {}
    (mnt / "dir" / "sub").mkdir(parents=True)
    for i, size in enumerate([0, 1, 16383, 16384, 16385, 40 * 16384 + 7, 100000]):
        name = f"dir/file{i}" if i % 2 else f"file{i}"
        files[name] = rnd.randbytes(size)
    files["dir/sub/big"] = rnd.randbytes(big_mib * MIB + 3)  # several groups
    files["L" * 240] = rnd.randbytes(5000)  # a long name: a .egwL entry in the backing
    for name, data in files.items():
        (mnt / name).write_bytes(data)
    with open(mnt / "sparse", "wb") as f:  # holes stay holes
        f.write(b"start")
        f.seek(5 * MIB)
        f.write(b"middle")
        f.truncate(9 * MIB)
    files["sparse"] = (mnt / "sparse").read_bytes()
    os.link(mnt / "file0", mnt / "dir" / "hard-link")
    os.link(mnt / "dir" / "sub" / "big", mnt / "big-link")
    files["dir/hard-link"] = files["file0"]
    files["big-link"] = files["dir/sub/big"]
    os.symlink("dir/sub/big", mnt / "symlink")
    os.setxattr(mnt / "file2", "user.note", b"kept")
    return files


def check(mnt: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (mnt / name).read_bytes() == data, name
    assert os.readlink(mnt / "symlink") == "dir/sub/big"
    assert os.getxattr(mnt / "file2", "user.note") == b"kept"
    assert os.stat(mnt / "big-link").st_ino == os.stat(mnt / "dir" / "sub" / "big").st_ino


def backing_files(backing: Path) -> list[Path]:
    """One name of every backing data file (hard links once)."""
    out, inodes = [], set()
    for dirpath, dirnames, filenames in os.walk(backing):
        dirnames[:] = [d for d in dirnames if "." not in d]
        for name in filenames:
            data_name = "." not in name or (name.startswith(".egwL") and not name.endswith(".name"))
            path = Path(dirpath) / name
            if (data_name and path.is_file() and not path.is_symlink()
                    and path.stat().st_ino not in inodes):
                inodes.add(path.stat().st_ino)
                out.append(path)
    return sorted(out)


def blocks_of(path: Path) -> dict[int, tuple[bytes, bytes]]:
    """block index -> (key record, block record) of every block that holds data."""
    data = path.read_bytes()
    if len(data) <= HEADER_SIZE:
        return {}
    plain_size = LAYOUT.plain_size(len(data))
    out = {}
    for index in range(-(-plain_size // LAYOUT.block_size)):
        key_at = LAYOUT.key_record_offset(index)
        key = data[key_at : key_at + KEY_RECORD_SIZE]
        if not any(key):
            continue  # a hole
        length = LAYOUT.block_plain_length(index, plain_size) + RECORD_OVERHEAD
        at = LAYOUT.record_offset(index)
        out[index] = (key, data[at : at + length])
    return out


def file_id(path: Path) -> bytes:
    return FileHeader.unpack(path.read_bytes()[:HEADER_SIZE]).file_id


def path_of(backing: Path, fid: bytes) -> Path:
    """The backing file with this file id (a pass gives every entry a new backing name)."""
    (path,) = [p for p in backing_files(backing) if p.stat().st_size >= HEADER_SIZE
               and file_id(p) == fid]
    return path


def slot_versions(backing: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    for path in backing_files(backing):
        for key, _ in blocks_of(path).values():
            for offset in (0, SLOT_SIZE):
                version = int.from_bytes(key[offset : offset + 2], "big")
                if version:
                    counts[version] = counts.get(version, 0) + 1
    return counts


def config_of(backing: Path) -> dict:
    return json.loads((backing / "encfs-gw.conf").read_text())


def make_volume(tmp_path: Path, seed: int, big_mib: int = 3) -> tuple[CliVolume, dict]:
    volume = CliVolume(tmp_path / "vol", tmp_path / "vol.key")
    run_cli("init", volume.backing, "--keyfile", volume.keyfile, check=True)
    with mounted(volume, tmp_path / "mnt") as mnt:
        files = fill(mnt, seed, big_mib)
    return volume, files


# --- the pass ----------------------------------------------------------------------------------


def test_every_block_gets_a_fresh_dek_under_a_new_kek_version(tmp_path):
    volume, files = make_volume(tmp_path, seed=1, big_mib=24)
    # by file id: the pass gives every entry a new backing name (the new volume key)
    before = {file_id(path): blocks_of(path) for path in backing_files(volume.backing)
              if path.stat().st_size}
    assert slot_versions(volume.backing) == {1: sum(len(b) for b in before.values())}
    result = reencrypt(volume.backing, "--keyfile", volume.keyfile, "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    summary = lines[-1]
    blocks = sum(len(b) for b in before.values())
    assert summary["done"] and summary["target"] == 2
    # each block once, though two files have two names (the second visit finds it done)
    assert summary["blocks_reencrypted"] == blocks
    assert set(summary["deks_per_version"]) == {"2"}  # (counted per name: links twice)
    assert summary["retired"] == [1] and summary["unreadable_blocks"] == 0
    assert 0 < summary["journal_peak_bytes"] <= 8 * MIB + 52  # the stated bound
    progress = [line["progress"] for line in lines if "progress" in line]
    assert {"files_done", "bytes_done", "bytes_total", "rate_mib_s", "eta"} <= set(progress[-1])
    # every block's record changed (new DEK, new nonce) and every key slot is version 2
    now = {file_id(path): path for path in backing_files(volume.backing) if path.stat().st_size}
    assert sorted(now) == sorted(before)
    for fid, blocks_before in before.items():
        after = blocks_of(now[fid])
        assert sorted(after) == sorted(blocks_before), fid  # holes stayed holes
        for index, (key, record) in after.items():
            _, old_record = blocks_before[index]
            assert record != old_record and record[:NONCE_SIZE] != old_record[:NONCE_SIZE]
            assert SLOT.unpack(key[:SLOT_SIZE])[0] in (0, 2)
            assert SLOT.unpack(key[SLOT_SIZE:])[0] in (0, 2)
    assert slot_versions(volume.backing) == {2: blocks}
    assert not (volume.backing / ".egw-reencrypt").exists()
    config = config_of(volume.backing)
    assert "reencrypt" not in config
    assert [(v["version"], v["state"]) for v in config["kek"]["versions"]] == [
        (1, "retired"), (2, "active"),
    ]
    print(  # the figure for the record (pytest -s)
        f"reencrypt: {summary['bytes_reencrypted'] / MIB:.1f} MiB in {summary['elapsed']:.2f} s"
        f" = {summary['rate_mib_s']:.1f} MiB/s, {summary['bytes_written'] / MIB:.1f} MiB "
        f"written, {summary['batches']} batches, journal peak "
        f"{summary['journal_peak_bytes'] / MIB:.2f} MiB"
    )
    with mounted(volume, tmp_path / "mnt") as mnt:
        check(mnt, files)
    fsck = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # a second pass re-encrypts everything again, under version 3
    again = reencrypt(volume.backing, "--keyfile", volume.keyfile, "--purge-old", "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.splitlines()[-1])
    assert summary["target"] == 3 and summary["purged"] == [1, 2]
    assert summary["volume_key"] == "epoch 3 (was 2)"  # a volume key of its own again
    assert slot_versions(volume.backing) == {3: blocks}
    assert [(v["version"], v["volume_key_epoch"])
            for v in config_of(volume.backing)["kek"]["versions"]] == [(3, 3)]
    with mounted(volume, tmp_path / "mnt") as mnt:
        check(mnt, files)


def test_throttled_by_rate(tmp_path):
    volume, _ = make_volume(tmp_path, seed=2, big_mib=4)
    result = reencrypt(volume.backing, "--keyfile", volume.keyfile, "--rate", "4", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    # about 5 MiB at 4 MiB/s: at least a second (sleeps between files and batches)
    assert summary["bytes_reencrypted"] > 4 * MIB
    assert summary["elapsed"] >= summary["bytes_reencrypted"] / MIB / 4 - 0.3


# --- crashes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill9_at_seeded_points_then_resume(tmp_path, seed):
    """Kills at seeded points: at the start, at every step of a batch in a seeded order
    (each run is a resume that gets one batch further at most), and at a seeded step of
    batch 1 or 2; after each kill fsck refuses the volume (a mount would resume it); the
    last run finishes and every file equals its model."""
    volume, files = make_volume(tmp_path, seed=seed, big_mib=52)  # 7 batches of 8 MiB
    rng = random.Random(seed)
    steps = list(CRASH_STEPS[1:])
    rng.shuffle(steps)
    points = ["1:started", *(f"1:{step}" for step in steps),
              f"{rng.randint(1, 2)}:{rng.choice(steps)}"]
    (tmp_path / "mnt").mkdir(exist_ok=True)
    journal = volume.backing / ".egw-reencrypt" / "journal"
    for point in points:
        result = reencrypt(volume.backing, "--keyfile", volume.keyfile,
                           env={CRASH_AT_ENV: point})
        assert result.returncode == -signal.SIGKILL, (point, result.stderr)
        # a journal is in place exactly when a kill came after its rename
        assert journal.exists() == point.endswith((":journal", ":torn", ":in-place")), point
        # (a mount resumes the pass: tests/integration/test_reencrypt_online.py)
        line = assert_refused(run_cli("fsck", volume.backing, "--keyfile", volume.keyfile),
                              VolumeBusy.exit_code)
        assert "being re-encrypted" in line and "encfs-gw reencrypt" in line
        assert "reencrypt" in config_of(volume.backing)
    result = reencrypt(volume.backing, "--keyfile", volume.keyfile, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["done"] and summary["unreadable_blocks"] == 0
    # one pass: later runs resumed it (the same target); only its version holds DEKs
    assert summary["target"] == 2 and set(summary["deks_per_version"]) == {"2"}
    with mounted(volume, tmp_path / "mnt") as mnt:
        check(mnt, files)
    fsck = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_a_torn_block_write_is_repaired_by_the_journal(tmp_path):
    """The kill in the middle of a batch's block records leaves blocks that open under
    neither key; the next run replays the journal before anything else."""
    volume, files = make_volume(tmp_path, seed=4, big_mib=6)
    result = reencrypt(volume.backing, "--keyfile", volume.keyfile,
                       env={CRASH_AT_ENV: "1:torn"})
    assert result.returncode == -signal.SIGKILL
    result = reencrypt(volume.backing, "--keyfile", volume.keyfile, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["replayed_groups"] > 0 and summary["unreadable_blocks"] == 0
    with mounted(volume, tmp_path / "mnt") as mnt:
        check(mnt, files)


def test_a_journal_that_does_not_verify_is_discarded(tmp_path):
    """Killed after the journal was renamed into place but before anything in place was
    written: an altered journal is not applied (and nothing needed it)."""
    volume, files = make_volume(tmp_path, seed=5)
    result = reencrypt(volume.backing, "--keyfile", volume.keyfile,
                       env={CRASH_AT_ENV: "1:journal"})
    assert result.returncode == -signal.SIGKILL
    journal = volume.backing / ".egw-reencrypt" / "journal"
    data = bytearray(journal.read_bytes())
    data[100] ^= 1
    journal.write_bytes(data)
    result = reencrypt(volume.backing, "--keyfile", volume.keyfile, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["replayed_groups"] == 0 and summary["done"]
    assert "does not verify" in result.stderr
    with mounted(volume, tmp_path / "mnt") as mnt:
        check(mnt, files)


@pytest.mark.expected_log(r"integrity failure")
def test_a_block_that_cannot_be_read_keeps_its_old_dek_and_version(tmp_path):
    """Tampered data is never re-encrypted into valid data: the block keeps its old DEK,
    its KEK version stays (retired, also with --purge-old), and the command says so."""
    volume, files = make_volume(tmp_path, seed=8, big_mib=1)
    path = next(p for p in backing_files(volume.backing) if len(blocks_of(p)) > 3)
    with open(path, "r+b") as f:
        at = LAYOUT.record_offset(2) + NONCE_SIZE + 5
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 1]))
    fid = file_id(path)
    result = reencrypt(volume.backing, "--keyfile", volume.keyfile, "--purge-old", "--json")
    assert result.returncode == 1, result.stderr
    path = path_of(volume.backing, fid)
    summary = json.loads(result.stdout.splitlines()[-1])
    assert not summary["done"] and summary["unreadable_blocks"] == 1
    assert summary["still_needed"] == [1] and summary["purged"] == []
    # the census counts per backing name: the file picked may have two (a hard link)
    assert summary["deks_per_version"]["1"] == os.stat(path).st_nlink
    assert "opens under no key slot" in result.stderr
    config = config_of(volume.backing)
    assert "reencrypt" not in config  # the pass is over: the volume mounts
    assert [(v["version"], v["state"]) for v in config["kek"]["versions"]] == [
        (1, "retired"), (2, "active"),
    ]
    text = run_cli("reencrypt", volume.backing, "--keyfile", volume.keyfile)
    assert text.returncode == 1 and "could not be read" in text.stderr
    with mounted(volume, tmp_path / "mnt") as mnt:  # that file's block 2 is EIO, no more
        failed = []
        for name, data in files.items():
            try:
                assert (mnt / name).read_bytes() == data, name
            except OSError as exc:
                assert exc.errno == errno.EIO
                failed.append(name)
        assert 1 <= len(failed) <= 2 and len({os.stat(mnt / n).st_ino for n in failed}) == 1


def test_a_hole_left_with_a_key_slot_by_a_crash_stays_a_hole(tmp_path):
    """A first write into a hole killed between its key slot and its record leaves a slot
    over a record of zeros, which reads as the hole it is (FORMAT.md 3.3). The pass keeps
    it a hole and drops the slot: nothing unreadable, no DEK left under the old version."""
    volume, files = make_volume(tmp_path, seed=11, big_mib=1)
    path = next(p for p in backing_files(volume.backing) if len(blocks_of(p)) > 3)
    _, record = blocks_of(path)[2]
    with open(path, "r+b") as f:  # the state such a crash leaves: the slot, zeros after it
        f.seek(LAYOUT.record_offset(2))
        f.write(bytes(len(record)))
    fid = file_id(path)
    result = reencrypt(volume.backing, "--keyfile", volume.keyfile, "--purge-old", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["done"] and summary["unreadable_blocks"] == 0 and summary["purged"] == [1]
    path = path_of(volume.backing, fid)
    assert 2 not in blocks_of(path)  # a hole again: no slot, no record
    hole = slice(2 * LAYOUT.block_size, 3 * LAYOUT.block_size)
    with mounted(volume, tmp_path / "mnt") as mnt:
        changed = []
        for name, data in files.items():
            got = (mnt / name).read_bytes()
            if got != data:
                assert got[hole] == bytes(LAYOUT.block_size) and got[:hole.start] == data[
                    :hole.start] and got[hole.stop:] == data[hole.stop:], name
                changed.append(name)
        assert 1 <= len(changed) <= 2 and len({os.stat(mnt / n).st_ino for n in changed}) == 1


def test_a_file_cut_inside_a_key_area_is_not_grown(tmp_path):
    """Damage no write of encfs-gw leaves: the group is left as it is (a write of its key
    area would grow the file), the rest of the file is re-encrypted."""
    volume, _ = make_volume(tmp_path, seed=10, big_mib=1)
    path = next(p for p in backing_files(volume.backing) if len(blocks_of(p)) > 40)
    os.truncate(path, LAYOUT.group_start(1) + 100)
    fid = file_id(path)
    result = reencrypt(volume.backing, "--keyfile", volume.keyfile, "--json")
    assert result.returncode == 1, result.stderr
    path = path_of(volume.backing, fid)
    assert "ends inside the key area of group 1" in result.stderr
    assert os.path.getsize(path) == LAYOUT.group_start(1) + 100
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["unreadable_blocks"] == 1
    assert {SLOT.unpack(key[:SLOT_SIZE])[0] | SLOT.unpack(key[SLOT_SIZE:])[0]
            for key, _ in blocks_of(path).values()} == {2}


def test_an_unfinished_rotation_is_superseded(tmp_path):
    """A rotation killed halfway leaves DEKs under two versions and `rotation` in the
    config; reencrypt moves every block to its own new version and ends both."""
    volume, files = make_volume(tmp_path, seed=9, big_mib=2)
    rotated = run_cli("rotate", volume.backing, "--keyfile", volume.keyfile,
                      env={**os.environ, ROTATION_CRASH_AFTER_ENV: "40"})
    assert rotated.returncode == -signal.SIGKILL
    assert config_of(volume.backing)["rotation"]["target"] == 2
    assert set(slot_versions(volume.backing)) == {1, 2}
    result = reencrypt(volume.backing, "--keyfile", volume.keyfile, "--purge-old", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["target"] == 3 and summary["purged"] == [1, 2]
    config = config_of(volume.backing)
    assert "rotation" not in config and "reencrypt" not in config
    assert set(slot_versions(volume.backing)) == {3}
    with mounted(volume, tmp_path / "mnt") as mnt:
        check(mnt, files)


# --- refusals ----------------------------------------------------------------------------------


def test_refusals_get_one_line_and_their_code(tmp_path):
    volume, _ = make_volume(tmp_path, seed=6, big_mib=1)
    for args, code in (
        (["--rate", "0"], UsageError.exit_code),
        (["--rate", "nan"], UsageError.exit_code),
        (["--new-provider", "nosuch:x"], ProviderConfigError.exit_code),
    ):
        result = reencrypt(volume.backing, "--keyfile", volume.keyfile, *args)
        assert result.returncode == code, (args, result.stderr)
        assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "reencrypt" not in config_of(volume.backing)  # nothing was started
    # mid-pass: every other verb refuses it, and the record is under the config's MAC
    result = reencrypt(volume.backing, "--keyfile", volume.keyfile,
                       "--new-provider", f"keyfile:{tmp_path / 'new.key'}",
                       env={CRASH_AT_ENV: "1:journal"})
    assert result.returncode == -signal.SIGKILL
    for verb in (["fsck"], ["rotate"]):
        line = assert_refused(run_cli(*verb, volume.backing, "--keyfile", volume.keyfile),
                              VolumeBusy.exit_code)
        assert "being re-encrypted" in line, verb
    # status only reads: it shows the unfinished pass and how it goes on (with the trust
    # store's providers: the new version's key is the new provider's)
    shown = run_cli("status", volume.backing, check=True).stdout
    assert "re-encryption to KEK version 2 in progress: run reencrypt (or mount) to " \
        "resume" in shown, shown
    state = json.loads(run_cli("status", volume.backing, "--json", check=True).stdout)
    assert state["reencrypt"]["target"] == 2 and not state["mounted"]
    # resumed with another new provider: refused (the pass keeps the one it started
    # with): keys named on the command line are the only ones asked, and they do not
    # open the new version; with the trust store's keys it is said plainly
    other = f"keyfile:{tmp_path / 'other.key'}"
    line = assert_refused(
        reencrypt(volume.backing, "--keyfile", volume.keyfile, "--new-provider", other),
        WrongKey.exit_code,
    )
    assert "does not open this volume" in line
    line = assert_refused(reencrypt(volume.backing, "--new-provider", other),
                          UsageError.exit_code)
    assert "another provider than --new-provider names" in line
    assert not (tmp_path / "other.key").exists()
    # the old key and the new one named: the pass is finished
    result = reencrypt(volume.backing, "--keyfile", volume.keyfile,
                       "--new-provider", f"keyfile:{tmp_path / 'new.key'}")
    assert result.returncode == 0, result.stderr


# --- the compromise ----------------------------------------------------------------------------


def _old_secrets(saved_config: bytes, old_keyfile: Path) -> Keyring:
    """What an attacker holding the old config and the old key file can unwrap: every
    KEK version that file opens (the old ones), through the real keyring."""
    config, _ = VolumeConfig.from_json(saved_config)
    opened = {}
    provider = KeyfileProvider({"path": str(old_keyfile)})
    for number, version in config.kek_versions.items():
        for protector in version.protectors:
            with contextlib.suppress(KeyAccessError):
                opened[number] = provider.recover(protector.record,
                                                  config.provider_binding(number))
    assert opened, "the old key file opens the old config"
    volume_key = crypto.gcm_open_secret(
        opened[min(opened)], config.kek_versions[min(opened)].wrapped_volume_key,
        config.volume_key_aad(min(opened)),
    )
    return Keyring(config, opened, volume_key)


def _deks_from(keyring: Keyring, volume_id: bytes, fid: bytes, index: int,
               key_record: bytes) -> list[bytes]:
    """Every DEK a key record gives up to `keyring`'s KEKs."""
    deks = []
    for offset in (0, SLOT_SIZE):
        version, generation, _, nonce, wrapped, tag = SLOT.unpack(
            key_record[offset : offset + SLOT_SIZE]
        )
        if not version or not keyring.has_kek(version):
            continue
        try:
            deks.append(keyring.slot_cipher(version, fid).decrypt(
                nonce, wrapped + tag, slot_aad(volume_id, fid, index, version, generation)
            ))
        except crypto.InvalidTag_:
            continue
    return deks


def _opens(dek: bytes, volume_id: bytes, fid: bytes, index: int, record: bytes) -> bool:
    try:
        crypto.AESGCM_(dek).decrypt(record[:NONCE_SIZE], record[NONCE_SIZE:],
                                    block_aad(volume_id, fid, index))
        return True
    except crypto.InvalidTag_:
        return False


def _names_and_objects(backing: Path, old: EpochKeys, new: EpochKeys) -> int:
    """Every backing entry of `backing`: its name, a symlink's target and place binding,
    an xattr set (inline or in the xattr store), a file header's and a directory record's
    binding must open or verify under the keys of `new` and under none of `old`; so must
    every file of the symlink store. Returns the items checked."""
    volume_id = bytes.fromhex(config_of(backing)["volume_id"])
    bind_old, bind_new = Bindings(volume_id, old), Bindings(volume_id, new)

    def opens(open_: Callable, *args: object) -> bool:
        try:
            open_(*args)
            return True
        except IntegrityError:
            return False

    def set_opens(keys: EpochKeys, path: Path, kind: int, object_id: bytes) -> bool | None:
        try:
            record = os.getxattr(path, xformat.SET_XATTR_USER, follow_symlinks=False)
        except OSError:
            return None  # no attributes
        flags, sealed = xformat.parse_record(record)
        if flags & xformat.FLAG_STORED:
            sealed = (backing / xformat.STORE_DIR / xformat.store_name(kind, object_id)
                      ).read_bytes()
        aad = xformat.set_aad(volume_id, kind, object_id, flags)
        return opens(crypto.gcm_open, bytes(keys.xattr_value_key), sealed, aad)

    checked = 0
    locations: dict[Path, tuple[bytes, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(backing):
        dirnames[:] = [d for d in dirnames if not d.startswith(".egw-")]
        here = Path(dirpath)
        record = DirRecord.unpack((here / fnames.DIR_ID_FILE).read_bytes())
        dir_id = record.dir_id
        if here == backing:
            new_tag, old_tag = bind_new.root_tag(dir_id), bind_old.root_tag(dir_id)
        else:
            new_tag = bind_new.dir_tag(locations[here], dir_id)
            old_tag = bind_old.dir_tag(locations[here], dir_id)
        assert crypto.tag_in(new_tag, record.bindings), here
        assert not crypto.tag_in(old_tag, record.bindings), here
        assert set_opens(new, here, xformat.KIND_DIRECTORY, dir_id) in (True, None)
        assert set_opens(old, here, xformat.KIND_DIRECTORY, dir_id) in (False, None)
        checked += 1
        for name in dirnames + filenames:
            kind = fnames.classify(name)
            if kind == "reserved":
                continue
            encoded = name if kind == "short" else (
                here / fnames.sidecar_name(name)).read_text()
            sealed, aad = fnames.b64decode_strict(encoded), fnames.name_aad(dir_id)
            assert not opens(old.name_cipher.open, sealed, aad), (here, name)
            location = (dir_id, fnames.unpad_name(new.name_cipher.open(sealed, aad)))
            path = here / name
            checked += 1
            if path.is_symlink():
                link = LinkRecord.decode(os.readlink(path))
                assert crypto.tag_in(bind_new.link_tag(location, link), link.bindings)
                assert not crypto.tag_in(bind_old.link_tag(location, link), link.bindings)
                if not link.stored:
                    link_aad = places.link_aad(link.link_id)
                    assert not opens(old.symlink_cipher.open, link.sealed, link_aad)
                    assert opens(new.symlink_cipher.open, link.sealed, link_aad)
                checked += 1
            elif path.is_dir():
                locations[path] = location
            elif path.is_file() and path.stat().st_size >= HEADER_SIZE:
                header = FileHeader.unpack(path.read_bytes()[:HEADER_SIZE])
                if header.unbound:
                    message = UNBOUND_LABEL + volume_id + header.file_id
                    assert crypto.tags_equal(header.bindings[0], new.binding_tag(message))
                    assert not crypto.tag_in(old.binding_tag(message), header.bindings)
                else:
                    assert crypto.tag_in(bind_new.file_tag(location, header.file_id),
                                         header.bindings)
                    assert not crypto.tag_in(bind_old.file_tag(location, header.file_id),
                                             header.bindings)
                assert set_opens(new, path, xformat.KIND_FILE, header.file_id) in (True, None)
                assert set_opens(old, path, xformat.KIND_FILE, header.file_id) in (False, None)
                checked += 1
    for stored in (backing / fnames.SYMLINK_STORE_DIR).iterdir():
        store_aad = fnames.long_symlink_aad(fnames.b64decode_strict(stored.name))
        assert not opens(old.symlink_cipher.open, stored.read_bytes(), store_aad)
        assert opens(new.symlink_cipher.open, stored.read_bytes(), store_aad)
        checked += 1
    return checked


@pytest.mark.parametrize("through", ["offline", "mounted"])
def test_compromise_nothing_saved_opens_a_block_afterwards(tmp_path, own_trust_store, through):
    """The attacker kept the old config, every key area (a copy of the whole backing
    store) and the old key file. After `reencrypt --purge-old --new-provider keyfile:NEW`
    (offline, or through the daemon of a mount that a writer, a renamer and a reader keep
    busy during the whole pass)
    no current block opens with any DEK those give, no current key slot opens with the
    old KEK, the old key file opens no keyslot of the new config, and the old volume key
    (unwrapped from the saved config with the saved key file) opens no current name,
    symlink target or xattr set and makes no current binding: it is gone from the
    config (no KEK version wraps it)."""
    volume, files = make_volume(tmp_path, seed=7, big_mib=2)
    with mounted(volume, tmp_path / "mnt") as mnt:  # the stores and a directory's set
        os.symlink("t" * 4000, mnt / "dir" / "long-link")
        os.setxattr(mnt / "dir", "user.dir-note", b"on a directory")
        os.setxattr(mnt / "file2", "user.big", b"b" * 5000)
    assert list((volume.backing / ".egw-symlinks").iterdir())
    assert list((volume.backing / ".egw-xattrs").iterdir())
    saved = tmp_path / "attacker"
    shutil.copytree(volume.backing, saved / "backing", symlinks=True)
    shutil.copy(volume.keyfile, saved / "old.key")
    saved_config = (volume.backing / "encfs-gw.conf").read_bytes()
    new_key = tmp_path / "new.key"
    model: dict[str, bytes] = {}  # what the busy programs wrote during a mounted pass
    if through == "offline":
        result = reencrypt(volume.backing, "--keyfile", volume.keyfile, "--purge-old",
                           "--new-provider", f"keyfile:{new_key}", "--json")
    else:
        from tests.integration.test_reencrypt_online import busy

        with mounted(volume, tmp_path / "mnt") as mnt, busy(mnt, seed=8) as written:
            result = reencrypt(mnt, "--purge-old", "--new-provider", f"keyfile:{new_key}",
                               "--json", "--rate", "4")
        model = {name: data for name, data in written.items()}
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["purged"] == [1]
    volume_id = bytes.fromhex(config_of(volume.backing)["volume_id"])

    old = _old_secrets(saved_config, saved / "old.key")
    saved_by_id = {file_id(p): p for p in backing_files(saved / "backing")
                   if p.stat().st_size >= HEADER_SIZE}
    checked = 0
    for path in backing_files(volume.backing):
        fid = file_id(path)
        if fid not in saved_by_id:  # made during the mounted pass: nothing was saved
            for index, (key, _) in blocks_of(path).items():
                assert _deks_from(old, volume_id, fid, index, key) == []
            continue
        saved_blocks = blocks_of(saved_by_id[fid])
        for index, (key, record) in blocks_of(path).items():
            # positive control: the saved key area opens the saved record
            old_key, old_record = saved_blocks[index]
            old_deks = _deks_from(old, volume_id, fid, index, old_key)
            assert any(_opens(d, volume_id, fid, index, old_record) for d in old_deks)
            # every DEK of the saved key areas of this file, any block: none opens it
            every_old_dek = [d for i, (k, _) in saved_blocks.items()
                             for d in _deks_from(old, volume_id, fid, i, k)]
            assert not any(_opens(d, volume_id, fid, index, record) for d in every_old_dek)
            # the current key record gives nothing to the old KEKs
            assert _deks_from(old, volume_id, fid, index, key) == []
            checked += 1
    assert checked > 100
    # the old key file opens no keyslot of the new config
    config = config_of(volume.backing)
    (version,) = config["kek"]["versions"]
    (protector,) = version["protectors"]
    binding = VolumeConfig.from_json((volume.backing / "encfs-gw.conf").read_bytes())[0]
    with pytest.raises(KeyAccessError):
        KeyfileProvider({"path": str(saved / "old.key")}).recover(
            protector["record"], binding.provider_binding(version["version"])
        )
    # the trust store forgot the old keyslot: it vouches for the new key file alone
    (entry,) = own_trust_store.glob("*.json")
    vouched = json.loads(entry.read_text())["protectors"]
    assert list(vouched) == [protector["id"]]
    assert vouched[protector["id"]]["options"]["path"] == str(new_key)
    # ... and a host that knows only the old key file cannot open the volume
    shutil.rmtree(own_trust_store, ignore_errors=True)
    refused = run_cli("fsck", volume.backing, "--keyfile", saved / "old.key")
    assert "does not open this volume" in assert_refused(refused, WrongKey.exit_code)
    # the volume key changed: the old one opens no current name, target, set or binding
    fresh = operator_for(new_key)
    from encfs import config_store

    config_now, keyring = config_store.unlock(str(volume.backing), fresh)
    try:
        assert keyring.volume_key_check() != old.volume_key_check()
        assert keyring.older_volume_key_checks() == ()  # no version wraps another key
        assert {v.volume_key_epoch for v in config_now.kek_versions.values()} == {2}
        # positive control: the saved copy is all under the old key, none under the new
        assert _names_and_objects(saved / "backing", old=keyring.epoch_keys(),
                                  new=old.epoch_keys()) > 20
        assert _names_and_objects(volume.backing, old=old.epoch_keys(),
                                  new=keyring.epoch_keys()) > 20
        # the config's MAC is under the new key: the old one does not make it
        body = config_now.mac_message()
        stored = bytes.fromhex(config_of(volume.backing)["config_mac"])
        assert keyring.config_mac(body) == stored != old.config_mac(body, 1)
    finally:
        keyring.close()
        old.close()
    with mounted(CliVolume(volume.backing, new_key), tmp_path / "mnt") as mnt:
        check(mnt, files)
        for name, data in model.items():
            assert (mnt / name).read_bytes() == data, name
        assert os.readlink(mnt / "dir" / "long-link") == "t" * 4000
        assert os.getxattr(mnt / "dir", "user.dir-note") == b"on a directory"
        assert os.getxattr(mnt / "file2", "user.big") == b"b" * 5000
