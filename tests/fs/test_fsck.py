"""fsck finds injected damage, says what it looks like (crash debris or tampering), and
repairs what needs no guessing: never readable data deleted, never data that failed
authentication made readable or valid; evidence kept, unchanged, in the quarantine."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from encfs.admin import quarantine
from encfs.admin.fsck import CRASH, EITHER, PAGE_SIZE, TAMPERING, fsck
from encfs.engine import ROOT_INODE, Volume
from encfs.engine import contents as contents_mod
from encfs.errors import IntegrityError, UsageError
from encfs.format.blocks import KEY_RECORD_SIZE, Layout
from encfs.format.names import DIR_ID_FILE, QUARANTINE_DIR, TEMP_PREFIX
from tests.fs.conftest import make_legacy_volume
from tests.helpers.config import trusted

BS = 4096
LAYOUT = Layout(BS)


def populate(backing) -> dict[bytes, bytes]:
    vol = Volume.unlock(str(backing), trusted())
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


def backing_of(backing, *names: bytes) -> str:
    vol = Volume.unlock(str(backing), trusted())
    try:
        ino, path = ROOT_INODE, str(backing)
        for name in names:
            path = os.path.join(path, vol.backing_name(ino, name)[0])
            ino = vol.lookup(ino, name).ino
        return path
    finally:
        vol.close()


def run(backing, repair=False):
    vol = Volume.unlock(str(backing), trusted())
    try:
        return fsck(vol, repair=repair)
    finally:
        vol.close()


def read(backing, *names: bytes) -> bytes:
    vol = Volume.unlock(str(backing), trusted())
    try:
        ino = ROOT_INODE
        for name in names:
            ino = vol.lookup(ino, name).ino
        fh = vol.open(ino, os.O_RDONLY)
        data = vol.read(fh, 0, 1 << 20)
        vol.release(fh)
        return data
    finally:
        vol.close()


def quarantined(backing) -> dict[str, str]:
    """item name -> path of its kept object."""
    area = backing / QUARANTINE_DIR
    if not area.exists():
        return {}
    return {item: str(area / item / quarantine.OBJECT) for item in sorted(os.listdir(area))}


def export(backing, destination) -> list[quarantine.Exported]:
    vol = Volume.unlock(str(backing), trusted())
    try:
        return quarantine.export(vol, str(destination))
    finally:
        vol.close()


def content(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_clean_volume(backing):
    populate(backing)
    report = run(backing)
    assert report.findings == []
    assert report.files == 4 and report.directories == 2 and report.symlinks == 1
    assert report.quarantined == 0


@pytest.mark.expected_log(r"integrity failure")
def test_flipped_middle_block_is_reported_not_repaired(backing):
    populate(backing)
    path = backing_of(backing, b"a")
    with open(path, "r+b") as f:
        f.seek(LAYOUT.record_offset(1) + 50)
        f.write(b"\xff\xff")
    before = content(path)
    report = run(backing, repair=True)
    (finding,) = report.findings
    assert finding.kind == "block does not authenticate" and finding.block == 1
    assert finding.path == "/a" and not finding.repaired and not finding.repairable
    assert finding.looks_like == TAMPERING
    assert content(path) == before  # nothing was cut off or rewritten


@pytest.mark.expected_log(r"integrity failure")
def test_flipped_last_block_is_tampering_not_a_torn_tail(backing):
    """A complete last record with one key that fails: no crash leaves that."""
    populate(backing)
    path = backing_of(backing, b"a")
    with open(path, "r+b") as f:
        f.seek(LAYOUT.record_offset(3) + 20)
        f.write(b"\x00")
    assert os.path.getsize(path) % PAGE_SIZE
    before = content(path)
    report = run(backing, repair=True)
    (finding,) = report.findings
    assert finding.kind == "last block does not authenticate" and finding.block == 3
    assert finding.looks_like == TAMPERING and not finding.repaired
    assert content(path) == before
    assert quarantined(backing) == {}


@pytest.mark.expected_log(r"integrity failure")
def test_torn_tail_at_a_page_boundary_is_cut_after_a_copy(backing):
    """A kill inside the write that extended a file leaves it cut at a page boundary."""
    populate(backing)
    data = os.urandom(BS + 4090)  # the last record spans a page boundary
    vol = Volume.unlock(str(backing), trusted())
    fh, _ = vol.create(ROOT_INODE, b"t", 0o100644, os.O_RDWR, 0, 0)
    vol.write(fh, 0, data)
    vol.release(fh)
    vol.close()
    path = backing_of(backing, b"t")
    cut = (LAYOUT.record_offset(1) // PAGE_SIZE + 1) * PAGE_SIZE
    assert LAYOUT.record_offset(1) < cut < os.path.getsize(path)
    os.truncate(path, cut)
    torn = content(path)
    (finding,) = run(backing).findings
    assert (finding.kind, finding.looks_like, finding.block) == ("torn tail", CRASH, 1)
    report = run(backing, repair=True)
    assert report.findings[0].repaired
    (item,) = quarantined(backing).items()
    assert report.findings[0].quarantine == item[0]
    assert content(item[1]) == torn  # the file as it was, bit for bit
    assert read(backing, b"t") == data[:BS]
    report = run(backing)
    assert report.findings == [] and report.quarantined == 1


@pytest.mark.expected_log(r"integrity failure")
def test_torn_tail_of_an_interrupted_truncate_is_cut(backing, monkeypatch):
    """Killed between cutting the file and writing the shortened last record (FORMAT.md
    section 4): two key slots on a block that fails."""
    files = populate(backing)
    vol = Volume.unlock(str(backing), trusted())
    ino = vol.lookup(ROOT_INODE, b"a").ino
    real = contents_mod.backing.pwrite_all
    calls = []

    def die_on_second(fd, data, offset):
        calls.append(offset)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(fd, data, offset)

    monkeypatch.setattr(contents_mod.backing, "pwrite_all", die_on_second)
    with pytest.raises(KeyboardInterrupt):
        vol.setattr(ino, size=2 * BS + 100)
    monkeypatch.undo()
    vol.close()
    finding, orphans = run(backing).findings  # block 3's key record is still there too
    assert (finding.kind, finding.looks_like, finding.block) == ("torn tail", CRASH, 2)
    assert "two key slots" in finding.detail
    assert (orphans.kind, orphans.looks_like) == ("orphaned key records", EITHER)
    assert run(backing, repair=True).findings[0].repaired
    assert read(backing, b"a") == files[b"a"][: 2 * BS]
    assert run(backing).findings == []


def test_orphaned_key_records_are_kept_as_evidence(backing):
    """A file cut at a block boundary (a crash, or someone truncating it) keeps the key
    records of the blocks cut off: the repair clears them only after a copy."""
    files = populate(backing)
    path = backing_of(backing, b"a")
    os.truncate(path, LAYOUT.record_offset(3) + 20)  # inside the last record's overhead
    cut = content(path)
    (finding,) = run(backing).findings
    assert (finding.kind, finding.looks_like) == ("orphaned key records", EITHER)
    report = run(backing, repair=True)
    assert report.findings[0].repaired
    ((_, kept),) = quarantined(backing).items()
    assert content(kept) == cut
    assert read(backing, b"a") == files[b"a"][: 3 * BS]
    assert run(backing).findings == []


def test_debris_of_crashes_is_cleaned(backing):
    populate(backing)
    # an interrupted mkdir, an orphaned sidecar, orphaned key records, a half-created file
    tmp_dir = backing / f"{TEMP_PREFIX}0000000000000001"
    tmp_dir.mkdir()
    (tmp_dir / ".egw-dirid").write_bytes(os.urandom(48))
    (backing / f"{TEMP_PREFIX}0000000000000002").symlink_to("AAAA")  # a symlink rename's
    (backing / ".egwLnot-there.name").write_text("x")
    path_b = backing_of(backing, b"b")
    with open(path_b, "r+b") as f:
        f.seek(LAYOUT.key_record_offset(5))
        f.write(os.urandom(KEY_RECORD_SIZE))
    vol = Volume.unlock(str(backing), trusted())
    fh, _ = vol.create(ROOT_INODE, b"half", 0o100644, os.O_RDWR, 0, 0)
    vol.release(fh)
    vol.close()
    os.truncate(backing_of(backing, b"half"), 10)
    findings = run(backing).findings
    assert sorted((f.kind, f.looks_like) for f in findings) == sorted(
        [
            ("leftover temporary entry", CRASH),
            ("leftover temporary entry", CRASH),
            ("orphaned long-name sidecar", CRASH),
            ("orphaned key records", EITHER),
            ("half-created file", CRASH),
        ]
    )
    report = run(backing, repair=True)
    assert all(f.repaired for f in report.findings)
    assert run(backing).findings == []
    assert read(backing, b"half") == b""
    assert len(quarantined(backing)) == 2  # copies of b and half before their repair


def test_undecryptable_entry_is_quarantined_unchanged(backing, tmp_path):
    files = populate(backing)
    path = backing_of(backing, b"b")
    garbled = os.path.join(backing, "A" * 43)
    os.rename(path, garbled)
    before = content(garbled)
    report = run(backing, repair=True)
    (finding,) = [f for f in report.findings if f.kind == "undecryptable name"]
    assert finding.repaired and finding.looks_like == TAMPERING
    ((item, kept),) = quarantined(backing).items()
    assert content(kept) == before  # not re-tagged, not moved into the volume
    vol = Volume.unlock(str(backing), trusted())
    try:
        with pytest.raises(FileNotFoundError):
            vol.lookup(ROOT_INODE, b"lost+found")
    finally:
        vol.close()
    assert run(backing).findings == []
    # The operator's way back: the plaintext, outside the volume.
    (exported,) = export(backing, tmp_path / "out")
    assert exported.record["kind"] == "undecryptable name"
    plain = tmp_path / "out" / item / "plaintext" / f"<backing {'A' * 43}>"
    assert plain.read_bytes() == files[b"b"]
    assert (tmp_path / "out" / item / "ciphertext" / "object").read_bytes() == before


def test_replaced_file_is_quarantined_never_rebound(backing, tmp_path):
    files = populate(backing)
    path_a, path_b = backing_of(backing, b"a"), backing_of(backing, b"b")
    shutil.copyfile(path_b, path_a)
    copied = content(path_a)
    (finding,) = run(backing).findings
    assert (finding.kind, finding.path, finding.looks_like) == (
        "file bound to another name", "/a", TAMPERING
    )
    report = run(backing, repair=True)
    assert report.findings[0].repaired
    ((_, kept),) = quarantined(backing).items()
    assert content(kept) == copied
    with pytest.raises(FileNotFoundError):
        read(backing, b"a")
    assert read(backing, b"b") == files[b"b"]
    # The quarantined ciphertext copied back over another file of the volume: refused.
    shutil.copyfile(kept, backing_of(backing, b"dir", b"inner"))
    with pytest.raises(IntegrityError):
        read(backing, b"dir", b"inner")
    assert [f.kind for f in run(backing).findings] == ["file bound to another name"]


def test_swapped_files_nothing_becomes_readable(backing):
    populate(backing)
    path_a, path_b = backing_of(backing, b"a"), backing_of(backing, b"b")
    os.rename(path_a, path_a + ".x")
    os.rename(path_b, path_a)
    os.rename(path_a + ".x", path_b)
    ciphertexts = {content(path_a), content(path_b)}
    report = run(backing, repair=True)
    assert sorted(f.path for f in report.findings) == ["/a", "/b"]
    assert all(f.repaired and f.looks_like == TAMPERING for f in report.findings)
    assert {content(p) for p in quarantined(backing).values()} == ciphertexts
    for name in (b"a", b"b"):
        with pytest.raises(FileNotFoundError):
            read(backing, name)
    report = run(backing)
    assert report.findings == [] and report.quarantined == 2


@pytest.mark.expected_log(r"integrity failure")
def test_swapped_directories_reported_with_paths_and_quarantined(backing, tmp_path):
    vol = Volume.unlock(str(backing), trusted())
    for name in (b"one", b"two"):
        d = vol.mkdir(ROOT_INODE, name, 0o40755, 0, 0).ino
        fh, _ = vol.create(d, b"f", 0o100644, os.O_RDWR, 0, 0)
        vol.write(fh, 0, b"in " + name)
        vol.release(fh)
        vol.symlink(d, b"s", b"target of " + name, 0, 0)
    vol.close()
    one, two = backing_of(backing, b"one"), backing_of(backing, b"two")
    os.rename(one, one + ".x")
    os.rename(two, one)
    os.rename(one + ".x", two)
    findings = run(backing).findings
    assert sorted((f.path, f.kind) for f in findings) == [
        ("/one", "directory bound to another place"),
        ("/two", "directory bound to another place"),
    ]
    assert all(f.looks_like == TAMPERING for f in findings)
    report = run(backing, repair=True)
    assert all(f.repaired for f in report.findings)
    assert run(backing).findings == []
    exported = export(backing, tmp_path / "out")
    got = {}
    for e in exported:
        plain = tmp_path / "out" / e.item / "plaintext" / e.record["path"].lstrip("/")
        got[e.record["path"]] = ((plain / "f").read_bytes(), os.readlink(plain / "s"))
    # Each directory's contents, under the name the attacker gave it.
    assert got == {"/one": (b"in two", "target of two"), "/two": (b"in one", "target of one")}


@pytest.mark.expected_log(r"integrity failure")
def test_copied_dir_id_record_is_reported(backing):
    populate(backing)
    vol = Volume.unlock(str(backing), trusted())
    vol.mkdir(ROOT_INODE, b"other", 0o40755, 0, 0)
    vol.close()
    source = os.path.join(backing_of(backing, b"dir"), DIR_ID_FILE)
    target = os.path.join(backing_of(backing, b"other"), DIR_ID_FILE)
    os.chmod(target, 0o600)
    shutil.copyfile(source, target)
    (finding,) = run(backing).findings
    assert (finding.path, finding.kind) == ("/other", "directory bound to another place")


@pytest.mark.expected_log(r"integrity failure")
@pytest.mark.parametrize("targets", [(b"short one", b"short two"), (b"s" * 3500, b"t" * 3600)])
def test_swapped_symlink_targets_reported_and_quarantined(backing, tmp_path, targets):
    vol = Volume.unlock(str(backing), trusted())
    for name, target in zip((b"p", b"q"), targets, strict=True):
        vol.symlink(ROOT_INODE, name, target, 0, 0)
    vol.close()
    p, q = backing_of(backing, b"p"), backing_of(backing, b"q")
    tp, tq = os.readlink(p), os.readlink(q)
    os.unlink(p)
    os.unlink(q)
    os.symlink(tq, p)
    os.symlink(tp, q)
    findings = run(backing).findings
    assert sorted((f.path, f.kind) for f in findings) == [
        ("/p", "symlink bound to another place"),
        ("/q", "symlink bound to another place"),
    ]
    assert run(backing, repair=True).remaining == []
    assert sorted(os.readlink(k) for k in quarantined(backing).values()) == sorted([tp, tq])
    exported = export(backing, tmp_path / "out")
    got = {
        e.record["path"]: os.fsencode(
            os.readlink(tmp_path / "out" / e.item / "plaintext" / e.record["path"][1:])
        )
        for e in exported
    }
    assert got == {"/p": targets[1], "/q": targets[0]}


def test_export_wants_a_new_or_empty_directory(backing, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UsageError):
        export(backing, tmp_path / "full")
    assert export(backing, tmp_path / "new") == []
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o700


def test_quarantine_record_holds_no_plaintext_name(backing):
    populate(backing)
    path_a, path_b = backing_of(backing, b"a"), backing_of(backing, b"b")
    shutil.copyfile(path_b, path_a)
    run(backing, repair=True)
    (item,) = os.listdir(backing / QUARANTINE_DIR)
    record = (backing / QUARANTINE_DIR / item / quarantine.RECORD).read_bytes()
    assert b'"path"' not in record and b"bound to another" not in record
    with pytest.raises(ValueError):
        json.loads(record)


def test_legacy_volume_swapped_directories_go_unnoticed(tmp_path, monkeypatch):
    """What `bound-names` adds: a volume made before it cannot tell."""
    backing = make_legacy_volume(tmp_path, monkeypatch)
    vol = Volume.unlock(str(backing), trusted())
    for name in (b"one", b"two"):
        vol.mkdir(ROOT_INODE, name, 0o40755, 0, 0)
    vol.close()
    one, two = backing_of(backing, b"one"), backing_of(backing, b"two")
    os.rename(one, one + ".x")
    os.rename(two, one)
    os.rename(one + ".x", two)
    assert run(backing).findings == []


@pytest.mark.expected_log(r"integrity failure")
def test_root_bound_to_another_volume_or_directory_is_reported(backing):
    populate(backing)
    root_record = backing / DIR_ID_FILE
    os.chmod(root_record, 0o600)
    shutil.copyfile(os.path.join(backing_of(backing, b"dir"), DIR_ID_FILE), root_record)
    report = run(backing, repair=True)
    (finding,) = report.findings
    assert (finding.path, finding.kind, finding.looks_like) == (
        "/", "directory bound to another place", TAMPERING
    )
    assert not finding.repairable and quarantined(backing) == {}


def test_no_repair_without_its_evidence(backing, monkeypatch):
    """If the copy into the quarantine fails (a full disk), the file is not changed."""
    populate(backing)
    path = backing_of(backing, b"a")
    os.truncate(path, LAYOUT.record_offset(3) + 20)
    cut = content(path)

    def full(source, dest):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(quarantine, "_copy_fd", full)
    (finding,) = run(backing, repair=True).findings
    assert not finding.repaired and "repair failed" in finding.detail
    assert content(path) == cut
    assert quarantined(backing) == {}
    assert not os.listdir(backing / QUARANTINE_DIR)


@pytest.mark.expected_log(r"integrity failure")
def test_xattr_set_that_does_not_open_is_reported(backing):
    """A set record copied onto another file (or altered) is reported as tampering with
    the object's path; fsck changes nothing for it (the object's data is fine)."""
    populate(backing)
    vol = Volume.unlock(str(backing), trusted())
    try:
        vol.setxattr(vol.lookup(ROOT_INODE, b"a").ino, b"user.k", b"for a")
        vol.setxattr(vol.lookup(ROOT_INODE, b"dir").ino, b"user.k", b"v" * 5000)  # stored
    finally:
        vol.close()
    assert run(backing).findings == []
    record = os.getxattr(backing_of(backing, b"a"), "user.egw-xattrs")
    os.setxattr(backing_of(backing, b"b"), "user.egw-xattrs", record)
    for report in (run(backing), run(backing, repair=True)):
        (finding,) = report.findings
        assert (finding.path, finding.kind, finding.looks_like) == (
            "/b", "xattr set does not open", TAMPERING
        )
        assert not finding.repaired
    assert read(backing, b"b")  # the file itself still reads
