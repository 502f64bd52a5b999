"""mkdir's fsyncs are handed off (the syncer): other requests go on meanwhile."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import trio

from encfs.engine import ROOT_INODE
from encfs.fuse.operations import Operations
from encfs.fuse.syncer import ThreadSyncer, open_syncer


class SlowDisk(ThreadSyncer):
    """fsyncs that wait for the test's go (a disk that takes its time)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncing, self.release = threading.Event(), threading.Event()
        self.synced: list[int] = []

    async def fsync_all(self, fds):
        self.syncing.set()
        await trio.to_thread.run_sync(self.release.wait, 10)
        await super().fsync_all(fds)
        self.synced += fds


def test_requests_are_served_while_a_mkdir_syncs(vol):
    disk = SlowDisk()
    ops = Operations(vol, disk)
    ctx = SimpleNamespace(uid=0, gid=0, pid=0, umask=0)
    served = []

    async def main():
        async with trio.open_nursery() as nursery:
            made = []

            async def mkdir():
                made.append(await ops.mkdir(ROOT_INODE, b"d", 0o40755, ctx))

            nursery.start_soon(mkdir)
            await trio.to_thread.run_sync(disk.syncing.wait)
            # The mkdir is inside its fsync: the loop still answers.
            served.append(await ops.getattr(ROOT_INODE, ctx))
            served.append(await ops.lookup(ROOT_INODE, b"d", ctx))
            disk.release.set()
        return made[0]

    entry = trio.run(main)
    assert served[0].st_ino == ROOT_INODE
    assert served[1].st_ino == 0  # not there until the mkdir finished
    assert vol.lookup(ROOT_INODE, b"d").ino == entry.st_ino
    assert len(disk.synced) == 2  # the id file and the directory, before the rename


def test_mkdir_fsync_and_fsyncdir_through_the_kernel_syncer(vol):
    syncer = open_syncer()
    ops = Operations(vol, syncer)
    ctx = SimpleNamespace(uid=0, gid=0, pid=0, umask=0)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(syncer.run)
            entry = await ops.mkdir(ROOT_INODE, b"d", 0o40755, ctx)
            fh = await ops.opendir(entry.st_ino, ctx)
            await ops.fsyncdir(fh, False)
            await ops.releasedir(fh)
            info, _ = await ops.create(entry.st_ino, b"f", 0o100644, 2, ctx)
            await ops.write(info.fh, 0, b"durable")
            await ops.fsync(info.fh, True)
            await ops.fsync(info.fh, False)
            await ops.release(info.fh)
            nursery.cancel_scope.cancel()
        return entry

    try:
        entry = trio.run(main)
    finally:
        syncer.close()
    f = vol.lookup(entry.st_ino, b"f")
    fh = vol.open(f.ino, 0, False)
    assert vol.read(fh, 0, 100) == b"durable"
    vol.release(fh)
    if type(syncer) is not ThreadSyncer:  # where the kernel has AIO: 2 + 1 + 2 through it
        assert syncer.submitted == 5
