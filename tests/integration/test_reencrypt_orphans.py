"""`encfs-gw reencrypt` covers the orphan directory (engine/orphans.py): a file a program
holds open after its last name was removed, a hard-linked file unlinked by one name
while open, a directory rmdir'ed while open, a symlink with a stored target held by an
O_PATH descriptor and unlinked. After the pass with --purge-old (the old KEK version and
volume key epoch gone), each still reads through its descriptor: contents (new DEKs
under the new version), xattr sets, stored symlink target, listing. Offline, a killed
daemon's leftovers get new DEKs and their xattr sets are moved too; fsck reports them as
crash debris only.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs.admin.reencrypt_journal import CRASH_AT_ENV
from encfs.format.names import ORPHAN_DIR
from encfs.format.xattrs import SET_XATTR_USER
from tests.helpers.mount import mounted, run_cli
from tests.integration.test_dead_daemon import kill_daemon
from tests.integration.test_descriptor_bound import (
    assert_leftovers_repaired,
    drop_kernel_caches,
    orphan_entries,
    wait_until,
)
from tests.integration.test_reencrypt import reencrypt, slot_versions
from tests.integration.test_rotation_orphans import (
    assert_fsck_clean,
    final_line,
    orphan_versions,
    read_back,
)

pytestmark = pytest.mark.fuse

_rnd = random.Random(29)
ALONE = _rnd.randbytes(600_000)  # 2 groups
LINKED = _rnd.randbytes(70_000)
TARGET = "/" + "t" * 3500  # too long for a backing symlink: stored apart
NOTE = b"a note of " + _rnd.randbytes(40).hex().encode()


@contextlib.contextmanager
def held_removed(mnt: Path) -> Iterator[dict[str, int]]:
    """For the block, by role: an open file with an xattr whose only name was removed
    ("alone"), an open file unlinked by one of two names ("linked"; "kept" stays), an
    open directory with an xattr rmdir'ed ("dir"), an O_PATH descriptor on a symlink
    with a stored target, unlinked ("link")."""
    held: dict[str, int] = {}
    try:
        for role, data in (("alone", ALONE), ("linked", LINKED)):
            held[role] = os.open(mnt / role, os.O_RDWR | os.O_CREAT, 0o644)
            os.write(held[role], data)
            os.fsync(held[role])
        os.setxattr(mnt / "alone", "user.note", NOTE)
        os.link(mnt / "linked", mnt / "kept")
        (mnt / "dir").mkdir()
        os.setxattr(mnt / "dir", "user.note", NOTE)
        held["dir"] = os.open(mnt / "dir", os.O_RDONLY | os.O_DIRECTORY)
        os.symlink(TARGET, mnt / "link")
        held["link"] = os.open(mnt / "link", os.O_PATH | os.O_NOFOLLOW)
        for name in ("alone", "linked", "link"):
            os.unlink(mnt / name)
        os.rmdir(mnt / "dir")
        yield held
    finally:
        for fd in held.values():
            with contextlib.suppress(OSError):  # (a killed daemon's mount: ENOTCONN)
                os.close(fd)


def check_held(held: dict[str, int]) -> None:
    """Each held object reads whole through its descriptor, by the daemon."""
    assert read_back(held["alone"], ALONE) == ALONE
    assert read_back(held["linked"], LINKED) == LINKED
    assert os.getxattr(held["alone"], "user.note") == NOTE
    assert os.getxattr(held["dir"], "user.note") == NOTE
    assert os.listdir(held["dir"]) == []
    assert os.readlink("", dir_fd=held["link"]) == TARGET


def test_online_reencrypt_with_purge_keeps_removed_objects_readable(volume, tmp_path):
    """Through the mount, `reencrypt --purge-old` while a program holds the removed
    objects: the pass gives their blocks new DEKs under the new version and moves their
    xattr sets, bindings and stored target to the new volume key; every one still reads
    through its descriptor. Closed, they go; "kept" reads; fsck is clean."""
    mnt = tmp_path / "mnt"
    with mounted(volume, mnt):
        with held_removed(mnt) as held:
            assert len(orphan_entries(volume)) == 4
            check_held(held)
            final = final_line(run_cli("reencrypt", mnt, "--purge-old", "--json"))
            assert final["done"] and final["target"] == 2 and final["purged"] == [1]
            assert final["names_unreadable"] == 0
            assert set(slot_versions(volume.backing)) == {2}
            assert list(orphan_versions(volume.backing).values()) == [{2}, {2}]
            check_held(held)  # (EIO for each if its keys were the purged ones)
        assert (mnt / "kept").read_bytes() == LINKED
        drop_kernel_caches()  # the orphan link of "kept" goes once the kernel forgets it
        wait_until(lambda: orphan_entries(volume) == [], "the orphan directory empties")
    assert_fsck_clean(volume)


def set_records(backing: Path) -> dict[str, bytes]:
    """The xattr set record of each regular file and directory in the orphan directory."""
    found = {}
    for name in sorted(os.listdir(backing / ORPHAN_DIR)):
        path = backing / ORPHAN_DIR / name
        if not path.is_symlink():
            with contextlib.suppress(OSError):  # (one without a set)
                found[name] = os.getxattr(path, SET_XATTR_USER)
    return found


@pytest.mark.parametrize("kill_at", [None, "1:xattrs", "1:journal"])
def test_offline_reencrypt_moves_a_killed_daemons_leftover_orphans(volume, tmp_path, kill_at):
    """Leftovers of a killed daemon: offline `reencrypt --purge-old` gives their blocks
    new DEKs under the new version and moves their xattr sets to the new volume key
    (their bindings name a place nobody knows: they stay, and the next writable mount
    or fsck --repair removes the leftovers); fsck reports the leftovers only, --repair
    removes them, then fsck is clean and "kept" reads. Killed inside the orphan
    directory (`kill_at`: after the name pass moved the first leftover's set; with the
    journal of the batch that holds the leftovers in place, naming them by their path
    there) and run again, the pass resumes and ends the same."""
    mnt = tmp_path / "mnt"
    with mounted(volume, mnt), held_removed(mnt):
        os.sync()
        kill_daemon(volume)
    assert len(orphan_entries(volume)) == 4
    before = set_records(volume.backing)
    assert len(before) == 2  # "alone" and the removed directory
    if kill_at is not None:
        killed = reencrypt(volume.backing, "--keyfile", volume.keyfile,
                           env={CRASH_AT_ENV: kill_at})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        moved = [name for name, record in set_records(volume.backing).items()
                 if record != before[name]]
        assert len(moved) == (1 if kill_at.endswith("xattrs") else 2)
        if kill_at.endswith("journal"):
            journal = (volume.backing / ".egw-reencrypt" / "journal").read_bytes()
            assert ORPHAN_DIR.encode() in journal
    final = final_line(reencrypt(
        volume.backing, "--keyfile", volume.keyfile, "--purge-old", "--json"
    ))
    assert final["done"] and final["target"] == 2 and final["purged"] == [1]
    if kill_at is not None and kill_at.endswith("journal"):
        assert final["replayed_groups"] > 0
    assert set(slot_versions(volume.backing)) == {2}
    assert list(orphan_versions(volume.backing).values()) == [{2}, {2}]  # the leftovers
    after = set_records(volume.backing)
    assert after.keys() == before.keys()
    assert all(after[name] != before[name] for name in before)  # sealed anew
    assert_leftovers_repaired(volume)
    with mounted(volume, mnt):
        assert (mnt / "kept").read_bytes() == LINKED
