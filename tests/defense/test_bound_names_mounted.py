"""Names bound to their place, and fsck that never launders, against the real thing.

Each attack is made on a volume made by `encfs-gw init`, in its backing directory, and
checked through `encfs-gw mount` (EIO, one log line naming the inode) or `encfs-gw fsck`
(the finding, with plaintext paths; after --repair nothing became readable, the evidence
is in the quarantine bit for bit). Engine-level detail: tests/fs/test_bound_names.py and
tests/fs/test_fsck.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest

from encfs.engine import ROOT_INODE, Volume
from encfs.errors import FsckProblems
from encfs.format.blocks import Layout
from encfs.format.names import DIR_ID_FILE, QUARANTINE_DIR
from tests.helpers.config import operator_for
from tests.helpers.mount import init_volume, mounted, run_cli

pytestmark = pytest.mark.fuse

BLOCK = 4096
LAYOUT = Layout(BLOCK)


@pytest.fixture
def vol(tmp_path):
    return init_volume(tmp_path, block_size=BLOCK)


def backing_path(volume, *names: str) -> str:
    """The backing path of a plaintext path (computed with the engine and the key)."""

    engine = Volume.unlock(str(volume.backing), operator_for(volume.keyfile))
    try:
        ino, path = ROOT_INODE, str(volume.backing)
        for name in names:
            path = os.path.join(path, engine.backing_name(ino, name.encode())[0])
            ino = engine.lookup(ino, name.encode()).ino
        return path
    finally:
        engine.close()


def swap(first: str, second: str) -> None:
    os.rename(first, first + ".swap")
    os.rename(second, first)
    os.rename(first + ".swap", second)


def swap_symlinks(first: str, second: str) -> None:
    t1, t2 = os.readlink(first), os.readlink(second)
    os.unlink(first)
    os.unlink(second)
    os.symlink(t2, first)
    os.symlink(t1, second)


def eio(action) -> None:
    with pytest.raises(OSError) as info:
        action()
    assert info.value.errno == errno.EIO, info.value


def fsck(volume, *extra):
    return run_cli("fsck", volume.backing, "--keyfile", volume.keyfile, *extra)


def fsck_json(volume, *extra) -> dict:
    result = fsck(volume, "--json", *extra)
    assert result.returncode in (0, FsckProblems.exit_code), result.stderr
    return json.loads(result.stdout)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.expected_log(r"integrity failure")
def test_directories_swapped_in_one_parent_give_eio(vol, tmp_path):
    with mounted(vol, tmp_path / "mnt") as mnt:
        for name in ("one", "two"):
            (mnt / name).mkdir()
            (mnt / name / "f").write_text(f"in {name}")
    swap(backing_path(vol, "one"), backing_path(vol, "two"))
    log = tmp_path / "daemon.log"
    (tmp_path / "mnt").mkdir(exist_ok=True)
    run_cli("mount", vol.backing, tmp_path / "mnt", "--keyfile", vol.keyfile,
            "--log-file", log, check=True)
    mnt = tmp_path / "mnt"
    try:
        for name in ("one", "two"):
            eio(lambda n=name: os.listdir(mnt / n))
            eio(lambda n=name: (mnt / n / "f").read_text())
        assert sorted(os.listdir(mnt)) == ["one", "two"]  # the parent still lists
        inodes = {name: os.stat(mnt / name).st_ino for name in ("one", "two")}
    finally:
        run_cli("unmount", mnt, check=True)
    text = log.read_text()
    for ino in inodes.values():
        assert text.count(f"directory inode {ino}: its id record is bound to another place") == 1
    findings = fsck_json(vol)["findings"]
    assert sorted((f["path"], f["kind"], f["looks_like"]) for f in findings) == [
        ("/one", "directory bound to another place", "tampering"),
        ("/two", "directory bound to another place", "tampering"),
    ]


@pytest.mark.expected_log(r"integrity failure")
def test_dir_id_record_copied_into_another_directory_gives_eio(vol, tmp_path):
    with mounted(vol, tmp_path / "mnt") as mnt:
        (mnt / "src").mkdir()
        (mnt / "src" / "secret").write_text("secret")
        (mnt / "dst").mkdir()
    src, dst = backing_path(vol, "src"), backing_path(vol, "dst")
    os.chmod(os.path.join(dst, DIR_ID_FILE), 0o600)
    shutil.copyfile(os.path.join(src, DIR_ID_FILE), os.path.join(dst, DIR_ID_FILE))
    for entry in os.listdir(src):  # the transplant: src's entries under dst
        if "." not in entry:
            shutil.copy2(os.path.join(src, entry), os.path.join(dst, entry))
    with mounted(vol, tmp_path / "mnt") as mnt:
        eio(lambda: os.listdir(mnt / "dst"))
        eio(lambda: (mnt / "dst" / "secret").read_text())
        assert (mnt / "src" / "secret").read_text() == "secret"
    (finding,) = fsck_json(vol)["findings"]
    assert (finding["path"], finding["kind"]) == ("/dst", "directory bound to another place")


@pytest.mark.expected_log(r"integrity failure")
@pytest.mark.parametrize("length", [20, 3500], ids=["short targets", "stored targets"])
def test_symlink_targets_swapped_give_eio(vol, tmp_path, length):
    with mounted(vol, tmp_path / "mnt") as mnt:
        os.symlink("/one/" + "1" * length, mnt / "one")
        os.symlink("/two/" + "2" * length, mnt / "two")
    swap_symlinks(backing_path(vol, "one"), backing_path(vol, "two"))
    with mounted(vol, tmp_path / "mnt") as mnt:
        for name in ("one", "two"):
            eio(lambda n=name: os.readlink(mnt / n))
    findings = fsck_json(vol)["findings"]
    assert sorted((f["path"], f["kind"]) for f in findings) == [
        ("/one", "symlink bound to another place"),
        ("/two", "symlink bound to another place"),
    ]


def test_swapped_files_then_fsck_repair_launder_nothing(vol, tmp_path):
    with mounted(vol, tmp_path / "mnt") as mnt:
        (mnt / "one").write_bytes(b"1" * 5000)
        (mnt / "two").write_bytes(b"2" * 5000)
        (mnt / "victim").write_bytes(b"v" * 5000)
    one, two = backing_path(vol, "one"), backing_path(vol, "two")
    swap(one, two)
    ciphertexts = {read_bytes(one), read_bytes(two)}
    result = fsck(vol, "--repair")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("file bound to another name") == 2
    assert result.stdout.count("looks like tampering") == 2
    area = vol.backing / QUARANTINE_DIR
    kept = [area / item / "object" for item in sorted(os.listdir(area))]
    assert {p.read_bytes() for p in kept} == ciphertexts  # bit for bit
    with mounted(vol, tmp_path / "mnt") as mnt:
        assert sorted(os.listdir(mnt)) == ["victim"]  # nothing came back readable
        assert not (mnt / "lost+found").exists()
    # The quarantined ciphertext copied over another file: still refused.
    shutil.copyfile(kept[0], backing_path(vol, "victim"))
    with mounted(vol, tmp_path / "mnt") as mnt:
        eio(lambda: (mnt / "victim").read_bytes())
    (finding,) = fsck_json(vol)["findings"]
    assert (finding["path"], finding["kind"]) == ("/victim", "file bound to another name")


def test_rename_of_a_swapped_file_is_refused(vol, tmp_path):
    """The rename protocol re-binds only what verified at its old name."""
    with mounted(vol, tmp_path / "mnt") as mnt:
        (mnt / "one").write_bytes(b"1" * 100)
        (mnt / "two").write_bytes(b"2" * 100)
    swap(backing_path(vol, "one"), backing_path(vol, "two"))
    with mounted(vol, tmp_path / "mnt") as mnt:
        eio(lambda: os.rename(mnt / "one", mnt / "three"))
        eio(lambda: (mnt / "one").read_bytes())


@pytest.mark.expected_log(r"integrity failure")
def test_flipped_last_block_is_tampering_and_not_cut(vol, tmp_path):
    data = os.urandom(3 * BLOCK + 100)
    with mounted(vol, tmp_path / "mnt") as mnt:
        (mnt / "f").write_bytes(data)
    path = backing_path(vol, "f")
    with open(path, "r+b") as f:
        f.seek(LAYOUT.record_offset(3) + 40)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    before = read_bytes(path)
    result = fsck(vol, "--repair")
    assert result.returncode == FsckProblems.exit_code
    assert "/f block 3: last block does not authenticate" in result.stdout
    assert "looks like tampering; NOT repairable" in result.stdout
    assert read_bytes(path) == before  # not truncated
    with mounted(vol, tmp_path / "mnt") as mnt:
        with open(mnt / "f", "rb") as f:
            assert f.read(3 * BLOCK) == data[: 3 * BLOCK]
            eio(lambda: f.read())
        assert os.path.getsize(mnt / "f") == len(data)


def test_truncation_evidence_is_kept(vol, tmp_path):
    data = os.urandom(5 * BLOCK)
    with mounted(vol, tmp_path / "mnt") as mnt:
        (mnt / "f").write_bytes(data)
    path = backing_path(vol, "f")
    os.truncate(path, LAYOUT.cipher_size(2 * BLOCK))  # cut at a block boundary
    cut = read_bytes(path)
    (finding,) = fsck_json(vol)["findings"]
    assert (finding["kind"], finding["looks_like"]) == ("orphaned key records",
                                                        "crash or tampering")
    report = fsck_json(vol, "--repair")
    (finding,) = report["findings"]
    assert finding["repaired"] and finding["quarantine"]
    kept = vol.backing / QUARANTINE_DIR / finding["quarantine"] / "object"
    assert kept.read_bytes() == cut  # the key records that show the cut, kept
    with mounted(vol, tmp_path / "mnt") as mnt:
        assert (mnt / "f").read_bytes() == data[: 2 * BLOCK]
        assert QUARANTINE_DIR not in os.listdir(mnt)
    result = fsck(vol)
    assert result.returncode == 0 and "the quarantine holds 1 item(s)" in result.stdout


def test_renames_through_the_mount_keep_everything_readable(vol, tmp_path):
    """Directories (0555 ones too) and symlinks renamed in place and across parents, then
    remounted: every name reads and fsck is clean."""
    with mounted(vol, tmp_path / "mnt") as mnt:
        (mnt / "d").mkdir()
        (mnt / "d" / "f").write_text("f")
        os.symlink("/" + "x" * 3500, mnt / "d" / "long")
        os.symlink("short", mnt / "d" / "short")
        (mnt / "ro").mkdir()
        (mnt / "ro" / "g").write_text("g")
        os.chmod(mnt / "ro", 0o555)
        os.rename(mnt / "d", mnt / "d2")
        os.rename(mnt / "ro", mnt / "d2" / "ro2")
        os.rename(mnt / "d2" / "long", mnt / "long2")
        os.rename(mnt / "d2" / "short", mnt / "d2" / "ro2" / "short2")
        os.link(mnt / "long2", mnt / "long3", follow_symlinks=False)
    with mounted(vol, tmp_path / "mnt") as mnt:
        assert (mnt / "d2" / "f").read_text() == "f"
        assert (mnt / "d2" / "ro2" / "g").read_text() == "g"
        assert os.readlink(mnt / "long2") == os.readlink(mnt / "long3") == "/" + "x" * 3500
        assert os.readlink(mnt / "d2" / "ro2" / "short2") == "short"
        assert sorted(os.listdir(mnt)) == ["d2", "long2", "long3"]
    assert fsck(vol).returncode == 0
