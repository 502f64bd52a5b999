"""mkdir's fsyncs run in a worker thread: other requests go on meanwhile."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import trio

from encfs import volume as volume_mod
from encfs.fuse.operations import Operations
from encfs.volume import ROOT_INODE


def test_requests_are_served_while_a_mkdir_syncs(vol, monkeypatch):
    ops = Operations(vol)
    syncing, release = threading.Event(), threading.Event()
    real_sync = volume_mod.PendingDir.sync

    def slow_sync(pending):
        syncing.set()
        assert release.wait(10)  # a disk that takes its time
        real_sync(pending)

    monkeypatch.setattr(volume_mod.PendingDir, "sync", slow_sync)
    ctx = SimpleNamespace(uid=0, gid=0, pid=0, umask=0)
    served = []

    async def main():
        async with trio.open_nursery() as nursery:
            made = []

            async def mkdir():
                made.append(await ops.mkdir(ROOT_INODE, b"d", 0o40755, ctx))

            nursery.start_soon(mkdir)
            await trio.to_thread.run_sync(syncing.wait)
            # The mkdir is inside its fsync: the loop still answers.
            served.append(await ops.getattr(ROOT_INODE, ctx))
            served.append(await ops.lookup(ROOT_INODE, b"d", ctx))
            release.set()
        return made[0]

    entry = trio.run(main)
    assert served[0].st_ino == ROOT_INODE
    assert served[1].st_ino == 0  # not there until the mkdir finished
    assert vol.lookup(ROOT_INODE, b"d").ino == entry.st_ino
