"""The syncer: fsync through Linux AIO (or a worker thread), errors with their errno."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from encfs.fuse import syncer as syncer_mod
from encfs.fuse.syncer import AioSyncer, ThreadSyncer, open_syncer


@pytest.fixture
def aio():
    syncer = AioSyncer.open()
    if syncer is None:  # (every Linux >= 4.18 on x86_64, arm64 or riscv64 has it)
        pytest.skip("no Linux AIO on this machine")
    yield syncer
    syncer.close()


def run_with(syncer, body):
    """`body()` with the syncer's collector running; its exception raised as is."""

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(syncer.run)
            try:
                await body()
            except OSError as exc:
                failure = exc
            else:
                failure = None
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    trio.run(main)


def test_fsync_fdatasync_and_many_at_once_go_through_the_kernel(aio, tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:

        async def body():
            for k in range(20):
                os.pwrite(fd, os.urandom(4096), k * 4096)
                await aio.fsync(fd, datasync=bool(k % 2))
            await aio.fsync(dir_fd)
            await aio.fsync_all([fd, dir_fd, fd])
            async with trio.open_nursery() as nursery:  # concurrent callers
                for _ in range(8):
                    nursery.start_soon(aio.fsync, fd)

        run_with(aio, body)
    finally:
        os.close(fd)
        os.close(dir_fd)
    assert aio.submitted == 20 + 1 + 3 + 8
    assert not aio._waiting


def test_a_descriptor_the_kernel_cannot_sync_asynchronously_gets_its_real_error(aio):
    read_end, write_end = os.pipe()  # no fsync method: AIO refuses it, the thread tries
    try:
        with pytest.raises(OSError) as caught:
            run_with(aio, lambda: aio.fsync(read_end))
    finally:
        os.close(read_end)
        os.close(write_end)
    assert caught.value.errno == errno.EINVAL
    assert aio.submitted == 0


def test_a_bad_descriptor_is_an_error_not_a_fallback(aio):
    fd = 999_999  # (a closed low number would be reused by trio's own descriptors)
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(OSError) as caught:
        run_with(aio, lambda: aio.fsync(fd))
    assert caught.value.errno == errno.EBADF


def test_a_failed_fsync_reports_its_errno(aio, tmp_path, monkeypatch):
    # No device here fails an fsync on demand: the kernel's completion (res = -errno,
    # the fsync's own return value) is rewritten as it is collected.
    real_collect_one = AioSyncer._complete

    def failing(self, token, result):
        real_collect_one(self, token, -errno.EIO)

    monkeypatch.setattr(AioSyncer, "_complete", failing)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as caught:
            run_with(aio, lambda: aio.fsync(fd))
    finally:
        os.close(fd)
    assert caught.value.errno == errno.EIO
    assert not aio._waiting


def test_a_cancelled_wait_leaves_nothing_behind(aio, tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:

        async def body():
            with trio.move_on_after(0):  # cancelled at its first wait
                await aio.fsync(fd)
            assert not aio._waiting
            await aio.fsync(fd)  # the late completion of the first is dropped

        run_with(aio, body)
    finally:
        os.close(fd)
    assert aio.submitted == 2


def test_without_aio_threads_do_the_work(tmp_path, monkeypatch):
    monkeypatch.setattr(syncer_mod.platform, "machine", lambda: "sparc64")
    syncer = open_syncer()
    assert type(syncer) is ThreadSyncer
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:

        async def body():
            await syncer.fsync(fd, datasync=True)
            await syncer.fsync_all([fd, fd])

        run_with(syncer, body)
    finally:
        syncer.close()
        os.close(fd)


def test_an_interrupted_collection_is_retried(aio, tmp_path, monkeypatch):
    real = syncer_mod._syscall
    interrupted = []

    def once_interrupted(number, *args):
        if number == aio._calls["io_getevents"] and not interrupted:
            interrupted.append(number)
            raise OSError(errno.EINTR, os.strerror(errno.EINTR))
        return real(number, *args)

    monkeypatch.setattr(syncer_mod, "_syscall", once_interrupted)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        run_with(aio, lambda: aio.fsync(fd))
    finally:
        os.close(fd)
    assert interrupted and aio.submitted == 1 and not aio._waiting


@pytest.mark.expected_log(r"WARNING freeing the AIO context failed", required=True)
def test_closing_twice_is_logged_not_raised(caplog):
    syncer = AioSyncer.open()
    if syncer is None:
        pytest.skip("no Linux AIO on this machine")
    syncer.close()
    syncer._event_fd = os.open(os.devnull, os.O_RDONLY)  # (the second close closes it)
    syncer.close()  # the context is gone: io_destroy fails with EINVAL
    assert "freeing the AIO context failed" in caplog.text
