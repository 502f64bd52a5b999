"""KEK rotation re-wraps the DEKs of objects in the orphan directory (engine/orphans.py):
files a program holds open after their last name was removed, and the orphan links of
hard-linked files unlinked by one name while open. After `rotate --purge-old` (the old
KEK version gone) such a file still reads through the descriptor that holds it, online;
offline, a killed daemon's leftovers are re-wrapped too (so no DEK anywhere needs the
purged version), a pass killed inside the orphan directory resumes there, and fsck
reports nothing but the leftovers, which --repair removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs.admin.rewrap import CRASH_AFTER_ENV
from encfs.format.names import ORPHAN_DIR
from tests.helpers.mount import mounted, run_cli
from tests.integration.test_dead_daemon import kill_daemon
from tests.integration.test_descriptor_bound import (
    assert_leftovers_repaired,
    drop_kernel_caches,
    orphan_entries,
    wait_until,
)
from tests.integration.test_rotation import LAYOUT, slot_versions, split_regions, status

pytestmark = pytest.mark.fuse

_rnd = random.Random(23)
ALONE = _rnd.randbytes(1_300_000)  # 80 blocks, 3 groups: only its orphan entry is left
LINKED = _rnd.randbytes(700_000)  # 43 blocks, 2 groups: "kept" stays, one name removed


def blocks(data: bytes) -> int:
    return -(-len(data) // LAYOUT.block_size)


@contextlib.contextmanager
def held_removed(mnt: Path) -> Iterator[dict[int, bytes]]:
    """For the block: descriptors (-> contents) of a file whose only name was removed
    and of a file unlinked by one of its two names ("kept" stays), both while open."""
    held: dict[int, bytes] = {}
    try:
        for name, data in (("alone", ALONE), ("linked", LINKED)):
            fd = os.open(mnt / name, os.O_RDWR | os.O_CREAT, 0o644)
            held[fd] = data
            os.write(fd, data)
            os.fsync(fd)
        os.link(mnt / "linked", mnt / "kept")
        os.unlink(mnt / "alone")
        os.unlink(mnt / "linked")
        yield held
    finally:
        for fd in held:
            with contextlib.suppress(OSError):  # (a killed daemon's mount: ENOTCONN)
                os.close(fd)


def read_back(fd: int, data: bytes) -> bytes:
    """All of a held file, read by the daemon (the kernel's cached pages dropped)."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return os.pread(fd, len(data) + 1, 0)


def orphan_versions(backing: Path) -> dict[str, set[int]]:
    """KEK versions of the key slots in use, per regular file in the orphan directory."""
    found = {}
    for name in orphan_entries_of(backing):
        path = backing / ORPHAN_DIR / name
        if not stat.S_ISREG(path.lstat().st_mode):
            continue
        keys = split_regions(str(path))[1]
        found[name] = {
            int.from_bytes(keys[at : at + 2], "big")
            for at in range(0, len(keys), 64) if any(keys[at : at + 64])
        }
    return found


def orphan_entries_of(backing: Path) -> list[str]:
    path = backing / ORPHAN_DIR
    return sorted(os.listdir(path)) if path.exists() else []


def final_line(result) -> dict:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_fsck_clean(volume) -> None:
    result = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["findings"] == []


def test_online_rotation_with_purge_rewraps_files_held_open_after_unlink(volume, tmp_path):
    """While a program holds both files, `rotate --purge-old` through the mount re-wraps
    their orphan entries too: every key slot of the volume is under the new version, the
    old one is purged, and both read back whole through their descriptors (not EIO); the
    census counted their DEKs. Closed, "kept" reads, the orphan directory empties, fsck
    is clean."""
    mnt = tmp_path / "mnt"
    with mounted(volume, mnt):
        with held_removed(mnt) as held:
            assert len(orphan_entries(volume)) == 2
            final = final_line(run_cli("rotate", mnt, "--purge-old", "--json"))
            assert final["done"] and final["purged"] == [1]
            for fd, data in held.items():
                assert read_back(fd, data) == data  # (EIO if its DEKs needed version 1)
            # the linked file's DEKs once (its name and orphan link are one inode)
            assert final["deks_per_version"] == {"2": blocks(ALONE) + blocks(LINKED)}
            assert list(orphan_versions(volume.backing).values()) == [{2}, {2}]
            assert slot_versions(volume.backing) == {2}
            for fd, data in held.items():
                os.pwrite(fd, b"after", 0)  # written under the new version
                assert read_back(fd, data) == b"after" + data[5:]
        assert (mnt / "kept").read_bytes() == b"after" + LINKED[5:]
        # the orphan link of "kept" goes once the kernel forgets the file or looks it up
        drop_kernel_caches()
        wait_until(lambda: orphan_entries(volume) == [], "the orphan directory empties")
    assert_fsck_clean(volume)


def kill_holding_removed(volume, mnt: Path) -> None:
    """A daemon killed while a program holds the two files: their orphan entries are
    left (the next writable mount would remove them)."""
    with mounted(volume, mnt), held_removed(mnt):
        os.sync()
        kill_daemon(volume)
    assert len(orphan_entries(volume)) == 2


def finish_offline_and_check(volume, mnt: Path, target: int) -> None:
    """`rotate --purge-old` offline to `target`: every slot (the leftovers' too) under it,
    the census counts the leftovers, fsck reports the leftovers only (crash debris),
    --repair removes them, then fsck is clean and "kept" reads with link count 1."""
    final = final_line(run_cli(
        "rotate", volume.backing, "--keyfile", volume.keyfile, "--purge-old", "--json"
    ))
    assert final["done"] and final["target"] == target
    # "kept" and the leftover of "alone": the orphan link of "kept" is no other file
    assert (final["files_total"], final["files_done"]) == (2, 2)
    assert list(orphan_versions(volume.backing).values()) == [{target}, {target}]
    assert slot_versions(volume.backing) == {target}
    # the leftover of "alone" and the linked file (once: the orphan link is "kept")
    assert status(volume.backing)["deks_per_version"] == {
        str(target): blocks(ALONE) + blocks(LINKED)
    }
    assert_leftovers_repaired(volume)
    with mounted(volume, mnt):
        assert (mnt / "kept").read_bytes() == LINKED
        assert (mnt / "kept").stat().st_nlink == 1


def test_offline_rotation_rewraps_a_killed_daemons_leftover_orphans(volume, tmp_path):
    """Offline, the orphan directory holds a killed daemon's leftovers: rotate re-wraps
    them like any file (removing them is the next writable mount's and fsck's job, not
    the pass's), so no DEK left anywhere needs the purged version."""
    mnt = tmp_path / "mnt"
    kill_holding_removed(volume, mnt)
    assert list(orphan_versions(volume.backing).values()) == [{1}, {1}]
    finish_offline_and_check(volume, mnt, target=2)


def test_a_pass_killed_inside_the_orphan_directory_resumes_there(volume, tmp_path):
    """The orphan directory is walked last: a pass killed after "kept" and part of the
    leftover of "alone" left that leftover with slots of both versions; the next run
    resumes the same rotation and finishes it, the leftovers included."""
    mnt = tmp_path / "mnt"
    kill_holding_removed(volume, mnt)
    # "kept" (the named file: before the orphan directory), then one group of "alone"'s
    # leftover: the hook kills after its second group
    env = {**os.environ, CRASH_AFTER_ENV: str(blocks(LINKED) + 40)}
    result = run_cli("rotate", volume.backing, "--keyfile", volume.keyfile, env=env)
    assert result.returncode == -9  # SIGKILLed by the test hook mid-pass
    assert status(volume.backing)["rotation"]["target"] == 2
    assert sorted(map(sorted, orphan_versions(volume.backing).values())) == [[1, 2], [2]]
    finish_offline_and_check(volume, mnt, target=2)


def test_an_orphan_directory_replaced_by_a_symlink_is_not_walked(volume, tmp_path):
    """Someone who can write the backing store puts a symlink to another directory in
    the orphan directory's place, holding a copy of a data file: neither `rotate
    --purge-old` nor `reencrypt --purge-old` follows it (nothing there is written or
    counted), and both finish."""
    mnt = tmp_path / "mnt"
    with mounted(volume, mnt):
        (mnt / "kept").write_bytes(LINKED)
    data_file, = (p for p in volume.backing.iterdir() if "." not in p.name and p.is_file())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "copy").write_bytes(data_file.read_bytes())
    before = (elsewhere / "copy").read_bytes()
    (volume.backing / ORPHAN_DIR).symlink_to(elsewhere)
    for command, target in (("rotate", 2), ("reencrypt", 3)):
        final = final_line(run_cli(
            command, volume.backing, "--keyfile", volume.keyfile, "--purge-old", "--json"
        ))
        assert final["done"] and final["target"] == target
        assert final["deks_per_version"] == {str(target): blocks(LINKED)}
        assert (elsewhere / "copy").read_bytes() == before
    (volume.backing / ORPHAN_DIR).unlink()
    with mounted(volume, mnt):
        assert (mnt / "kept").read_bytes() == LINKED
