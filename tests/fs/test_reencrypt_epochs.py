"""The engine during a mounted volume's re-encryption (no kernel: the daemon's driver,
step by step; the mount: tests/integration/test_reencrypt_online.py).

Between the name pass's steps (one directory each) reads accept both volume key epochs
and writes use the new one: after every step, every file, listing, symlink target and
xattr equals the model, and the operations a program makes (create, mkdir, symlink,
rename across directories, unlink, setxattr, write, create of a name that exists under
the old key) act on whichever backing name an entry has. Once the pass is over, nothing
is left under the old epoch and a fresh unlock reads the same tree.
"""

from __future__ import annotations

import errno
import os
import random
import stat

import pytest

from encfs.admin import reencrypt
from encfs.admin.rewrap import census
from encfs.engine import ROOT_INODE, Volume
from tests.helpers.config import trusted

DIRS = [f"d{i}".encode() for i in range(8)]


def ino_of(vol: Volume, path: bytes) -> int:
    ino = ROOT_INODE
    for part in path.split(b"/"):
        ino = vol.lookup(ino, part).ino
    return ino


def listing(vol: Volume, ino: int) -> set[bytes]:
    fh = vol.opendir(ino)
    try:
        return {n for n, b, _ in vol.readdir(fh, 0) if b is not None}
    finally:
        vol.releasedir(fh)


def write(vol: Volume, path: bytes, data: bytes) -> None:
    parent, _, name = path.rpartition(b"/")
    parent_ino = ino_of(vol, parent) if parent else ROOT_INODE
    try:
        fh, _ = vol.create(parent_ino, name, stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
    except OSError as exc:
        assert exc.errno == errno.EEXIST
        fh = vol.open(vol.lookup(parent_ino, name).ino, os.O_WRONLY | os.O_TRUNC)
    try:
        assert vol.write(fh, 0, data) == len(data)
    finally:
        vol.release(fh)


def read(vol: Volume, path: bytes) -> bytes:
    fh = vol.open(ino_of(vol, path), os.O_RDONLY)
    try:
        return bytes(vol.read(fh, 0, 1 << 22))
    finally:
        vol.release(fh)


def check(vol: Volume, files: dict[bytes, bytes], links: dict[bytes, bytes]) -> None:
    dirs: dict[bytes, set[bytes]] = {}
    for path in [*files, *links]:
        parent, _, name = path.rpartition(b"/")
        dirs.setdefault(parent, set()).add(name)
    for parent, names in dirs.items():
        ino = ino_of(vol, parent) if parent else ROOT_INODE
        assert names <= listing(vol, ino), parent
    for path, data in files.items():
        assert read(vol, path) == data, path
        assert vol.getxattr(ino_of(vol, path), b"user.tag") == path
    for path, target in links.items():
        assert vol.readlink(ino_of(vol, path)) == target, path


def test_between_name_steps_reads_accept_both_keys_and_writes_use_the_new(backing):
    rnd = random.Random(3)
    vol = Volume.unlock(str(backing), trusted())
    files: dict[bytes, bytes] = {}
    links: dict[bytes, bytes] = {}
    try:
        for d in DIRS:
            vol.mkdir(ROOT_INODE, d, 0o755, 0, 0)
            vol.mkdir(ino_of(vol, d), b"sub", 0o755, 0, 0)
            for name in (b"f", b"sub/g", b"L" * 200):
                path = d + b"/" + name
                files[path] = rnd.randbytes(rnd.choice([10, 5000, 70000]))
                write(vol, path, files[path])
                vol.setxattr(ino_of(vol, path), b"user.tag", path)
            vol.symlink(ino_of(vol, d), b"link", d + b"-target", 0, 0)
            links[d + b"/link"] = d + b"-target"
        check(vol, files, links)
    finally:
        vol.close()

    # the daemon's driver, step by step (engine/follow.py follows the moves)
    vol = Volume.unlock(str(backing), trusted())
    try:
        run = reencrypt.ReencryptRun(vol, observer=vol.follower())
        assert vol.keyring.read_epoch_keys()[1:], "reads accept the old epoch too"
        steps = run.name_steps(lambda: vol.counters["moves"], walks=3)
        changes = 0
        for step, _ in enumerate(steps):
            if step == 0:  # only the stores moved: every entry is under its old name
                assert not (backing / vol.backing_name(ROOT_INODE, DIRS[0])[0]).exists()
            check(vol, files, links)
            d = DIRS[step % len(DIRS)]
            # a name that exists (maybe under the old key): EEXIST, nothing made
            with pytest.raises(OSError) as exc:
                vol.create(ino_of(vol, d), b"f", stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
            assert exc.value.errno == errno.EEXIST
            with pytest.raises(OSError) as exc:
                vol.mkdir(ino_of(vol, d), b"sub", 0o755, 0, 0)
            assert exc.value.errno == errno.EEXIST
            # writes and renames act on whichever name an entry has
            path = d + b"/f"
            files[path] = rnd.randbytes(3000)
            write(vol, path, files[path])
            new = DIRS[(step + 3) % len(DIRS)] + b"/sub/moved%d" % step
            vol.rename(ino_of(vol, d + b"/sub"), b"g", ino_of(vol, new.rpartition(b"/")[0]),
                       new.rpartition(b"/")[2])
            files[new] = files.pop(d + b"/sub/g")
            vol.setxattr(ino_of(vol, new), b"user.tag", new)
            # ... and put a new one in its place, and a new symlink beside it
            files[d + b"/sub/g"] = b"again %d" % step
            write(vol, d + b"/sub/g", files[d + b"/sub/g"])
            vol.setxattr(ino_of(vol, d + b"/sub/g"), b"user.tag", d + b"/sub/g")
            vol.symlink(ino_of(vol, d), b"s%d" % step, b"to %d" % step, 0, 0)
            links[d + b"/s%d" % step] = b"to %d" % step
            # a symlink renamed: bound anew, its target still under the old key
            vol.rename(ino_of(vol, d), b"link", ino_of(vol, d + b"/sub"), b"link%d" % step)
            links[d + b"/sub/link%d" % step] = links.pop(d + b"/link")
            vol.rename(ino_of(vol, d + b"/sub"), b"link%d" % step, ino_of(vol, d), b"link")
            links[d + b"/link"] = links.pop(d + b"/sub/link%d" % step)
            if step % 2:  # and a file removed
                vol.unlink(ino_of(vol, new.rpartition(b"/")[0]), new.rpartition(b"/")[2])
                del files[new]
            check(vol, files, links)
            changes += 1
        assert changes >= len(DIRS)  # a step per directory at least
        assert vol.keyring.read_epoch_keys()[1:] == (), "the names are all moved"
        check(vol, files, links)
        for _, _ in run.steps():
            pass
        result = run.finish(census(vol, prefetch=False))
        assert result["done"]
    finally:
        vol.close()
    # nothing left under the old key: a fresh unlock (one epoch) decodes every name
    vol = Volume.unlock(str(backing), trusted())
    try:
        assert vol.keyring.read_epoch_keys()[1:] == ()
        check(vol, files, links)
        pending = [ROOT_INODE]
        while pending:
            ino = pending.pop()
            for backing_name, kind, plain, error in vol.scan_directory(ino):
                assert error is None, backing_name
                if kind != "reserved" and stat.S_ISDIR(
                    os.stat(backing_name, dir_fd=vol.directory_fd(ino),
                            follow_symlinks=False).st_mode
                ):
                    pending.append(vol.lookup(ino, plain).ino)
    finally:
        vol.close()
