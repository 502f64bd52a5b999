"""fsck finds injected damage and repairs what needs no guessing, never readable data."""

from __future__ import annotations

import os

import pytest

from encfs.format.blocks import KEY_RECORD_SIZE, Layout
from encfs.format.names import TEMP_PREFIX
from encfs.fsck import fsck
from encfs.volume import ROOT_INODE, Volume

BS = 4096
LAYOUT = Layout(BS)


def populate(backing) -> dict[bytes, bytes]:
    vol = Volume.unlock(str(backing))
    files = {}
    try:
        d = vol.mkdir(ROOT_INODE, b"dir", 0o40755, 0, 0)
        for name, size in ((b"a", 3 * BS + 10), (b"b", 100), (b"L" * 250, 5000)):
            fh, _ = vol.create(ROOT_INODE, name, 0o100644, os.O_RDWR, 0, 0)
            data = os.urandom(size)
            vol.write(fh, 0, data)
            vol.release(fh)
            files[name] = data
        fh, _ = vol.create(d.ino, b"inner", 0o100644, os.O_RDWR, 0, 0)
        vol.write(fh, 0, b"inner data")
        vol.release(fh)
        vol.symlink(ROOT_INODE, b"link", b"a", 0, 0)
    finally:
        vol.close()
    return files


def backing_of(backing, name: bytes) -> str:
    vol = Volume.unlock(str(backing))
    try:
        return os.path.join(backing, vol.backing_name(ROOT_INODE, name)[0])
    finally:
        vol.close()


def run(backing, repair=False):
    vol = Volume.unlock(str(backing))
    try:
        return fsck(vol, repair=repair)
    finally:
        vol.close()


def read(backing, name: bytes) -> bytes:
    vol = Volume.unlock(str(backing))
    try:
        fh = vol.open(vol.lookup(ROOT_INODE, name).ino, os.O_RDONLY)
        data = vol.read(fh, 0, 1 << 20)
        vol.release(fh)
        return data
    finally:
        vol.close()


def test_clean_volume(backing):
    populate(backing)
    report = run(backing)
    assert report.findings == []
    assert report.files == 4 and report.directories == 2 and report.symlinks == 1


def test_flipped_middle_block_is_reported_not_repaired(backing):
    files = populate(backing)
    path = backing_of(backing, b"a")
    with open(path, "r+b") as f:
        f.seek(LAYOUT.record_offset(1) + 50)
        f.write(b"\xff\xff")
    report = run(backing, repair=True)
    (finding,) = report.findings
    assert finding.kind == "block does not authenticate" and finding.block == 1
    assert finding.path == "/a" and not finding.repaired
    assert os.path.getsize(path) > LAYOUT.record_offset(3)  # nothing was cut off
    del files


def test_torn_tail_is_truncated_to_the_last_good_block(backing):
    files = populate(backing)
    path = backing_of(backing, b"a")
    os.truncate(path, LAYOUT.record_offset(3) + 100)  # inside the last (partial) record
    report = run(backing)
    assert [f.kind for f in report.findings] == ["torn tail"]
    report = run(backing, repair=True)
    assert report.findings[0].repaired
    assert read(backing, b"a") == files[b"a"][: 3 * BS]
    assert run(backing).findings == []


def test_tail_cut_inside_the_record_overhead_leaves_an_orphaned_slot(backing):
    files = populate(backing)
    os.truncate(backing_of(backing, b"a"), LAYOUT.record_offset(3) + 20)
    assert [f.kind for f in run(backing, repair=True).findings] == ["orphaned key records"]
    assert read(backing, b"a") == files[b"a"][: 3 * BS]
    assert run(backing).findings == []


def test_debris_of_crashes_is_cleaned(backing):
    populate(backing)
    # an interrupted mkdir, an orphaned sidecar, orphaned key records, a half-created file
    tmp_dir = backing / f"{TEMP_PREFIX}0000000000000001"
    tmp_dir.mkdir()
    (tmp_dir / ".egw-dirid").write_bytes(os.urandom(16))
    (backing / ".egwLnot-there.name").write_text("x")
    path_b = backing_of(backing, b"b")
    with open(path_b, "r+b") as f:
        f.seek(LAYOUT.key_record_offset(5))
        f.write(os.urandom(KEY_RECORD_SIZE))
    vol = Volume.unlock(str(backing))
    fh, _ = vol.create(ROOT_INODE, b"half", 0o100644, os.O_RDWR, 0, 0)
    vol.release(fh)
    vol.close()
    os.truncate(backing_of(backing, b"half"), 10)
    kinds = sorted(f.kind for f in run(backing).findings)
    assert kinds == sorted(
        [
            "leftover temporary entry",
            "orphaned long-name sidecar",
            "orphaned key records",
            "half-created file",
        ]
    )
    report = run(backing, repair=True)
    assert all(f.repaired for f in report.findings)
    assert run(backing).findings == []
    assert read(backing, b"half") == b""


def test_undecryptable_entry_moves_to_lost_and_found(backing):
    files = populate(backing)
    path = backing_of(backing, b"b")
    garbled = os.path.join(backing, "A" * 43)
    os.rename(path, garbled)
    report = run(backing, repair=True)
    (finding,) = [f for f in report.findings if f.kind == "undecryptable name"]
    assert finding.repaired
    vol = Volume.unlock(str(backing))
    try:
        lf = vol.lookup(ROOT_INODE, b"lost+found").ino
        moved = vol.lookup(lf, b"undecryptable-" + b"A" * 43)
        fh = vol.open(moved.ino, os.O_RDONLY)
        assert vol.read(fh, 0, 1000) == files[b"b"]  # contents kept, readable
        vol.release(fh)
    finally:
        vol.close()
    assert run(backing).findings == []


@pytest.mark.parametrize("repair", [False, True])
def test_replaced_file_reported(backing, repair):
    populate(backing)
    path_a, path_b = backing_of(backing, b"a"), backing_of(backing, b"b")
    with open(path_b, "rb") as f:
        data = f.read()
    with open(path_a, "wb") as f:
        f.write(data)
    report = run(backing, repair=repair)
    assert [f.kind for f in report.findings] == ["bad header"]
