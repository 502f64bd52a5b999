"""The request loop's lock and ready-waiter (encfs/fuse/accel/loop.py), without a mount.

Every FUSE test runs through them too; these pin the scheduling properties the speed
comes from and the ones that keep other trio tasks alive.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

import pyfuse3
import trio
import trio.testing

from encfs.fuse.accel import loop


@contextlib.contextmanager
def pipe() -> Iterator[tuple[int, int]]:
    """A pipe standing in for /dev/fuse: (read end, write end), closed afterwards."""
    read_end, write_end = os.pipe()
    try:
        yield read_end, write_end
    finally:
        os.close(read_end)
        os.close(write_end)


def test_free_lock_is_taken_without_a_checkpoint():
    async def main():
        lock = loop.RequestLock()
        with trio.CancelScope() as scope:
            scope.cancel()
            async with lock:  # a checkpoint would raise Cancelled here
                assert lock.locked()
        assert not scope.cancelled_caught
        assert not lock.locked()

    trio.run(main)


def test_release_wakes_a_waiter_without_handing_over():
    async def main():
        lock = loop.RequestLock()
        order = []

        async def waiter():
            async with lock:
                order.append("waiter")

        async with trio.open_nursery() as nursery:
            await lock.__aenter__()
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            await lock.__aexit__(None, None, None)
            # Taken again before yielding: the woken waiter finds it held and waits on.
            await lock.__aenter__()
            order.append("holder")
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["holder"]
            await lock.__aexit__(None, None, None)
        assert order == ["holder", "waiter"]

    trio.run(main)


def test_waiter_skips_trio_while_data_is_queued_within_its_budget():
    with pipe() as (read_end, write_end):
        os.write(write_end, b"x")
        waiter = loop.ReadyWaiter(budget=3)

        async def main():
            with trio.CancelScope() as scope:
                scope.cancel()
                for _ in range(3):
                    await waiter(read_end)  # fast: no checkpoint, so no Cancelled
                assert waiter.fast == 3
                await waiter(read_end)  # the budget is spent: trio's path checkpoints
            assert scope.cancelled_caught
            await waiter(read_end)  # a fresh streak
            assert waiter.fast == 4

        trio.run(main)


def test_waiter_waits_through_trio_when_nothing_is_queued():
    with pipe() as (read_end, write_end):
        waiter = loop.ReadyWaiter()

        async def main():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter, read_end)
                await trio.testing.wait_all_tasks_blocked()
                os.write(write_end, b"x")
            assert waiter.fast == 0

        trio.run(main)


def test_facade_is_trio_but_for_the_lock_and_the_waiter():
    waiter = loop.ReadyWaiter()
    module = loop.facade(waiter)
    assert module.Lock is loop.RequestLock
    assert module.lowlevel.wait_readable is waiter
    assert module.open_nursery is trio.open_nursery
    assert module.ClosedResourceError is trio.ClosedResourceError
    assert module.lowlevel.notify_closing is trio.lowlevel.notify_closing
    assert trio.lowlevel.wait_readable is not waiter  # trio itself is untouched
    assert pyfuse3.trio is trio  # swapped in only while serve_requests runs


# --- IdleWait: blocking in poll() while trio is idle ----------------------------------------

IN_POLL = "poll_schedule_timeout"  # the kernel function poll(2) sleeps in
IN_EPOLL_WAIT = "do_epoll_wait"  # and epoll_wait(2), where trio itself sleeps


def wait_until_asleep(tid: int, where: str = IN_POLL) -> None:
    """From another thread: return once thread `tid` sleeps in that kernel function (not
    on the GIL, say). Bounded: after 10 s it returns anyway, so a kernel that names its
    functions otherwise fails the test instead of hanging it."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/self/task/{tid}/wchan") as f:
            if f.read().startswith(where):
                return
        time.sleep(0)  # a yield (the state is polled), not a wait for readiness


def write_once_asleep(tid: int, fd: int, where: str = IN_POLL) -> threading.Thread:
    """A thread that writes to `fd` once the trio thread sleeps in `where`."""

    def run():
        wait_until_asleep(tid, where)
        os.write(fd, b"x")

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_idle_wait_is_available_on_this_trio():
    async def main():
        assert loop.IdleWait.for_current_run(0) is not None

    trio.run(main)


def test_request_arriving_while_trio_is_idle_is_served_without_a_checkpoint():
    with pipe() as (read_end, write_end):
        waiter = loop.ReadyWaiter()

        async def main():
            await trio.testing.wait_all_tasks_blocked()  # trio's own tasks settle first
            writer = write_once_asleep(threading.get_native_id(), write_end)
            with trio.CancelScope() as scope:
                scope.cancel()
                await waiter(read_end)  # a checkpoint would raise Cancelled here
            writer.join()
            assert not scope.cancelled_caught
            assert (waiter.fast, waiter.idle) == (1, 1)
            assert waiter._idle is not None and waiter._idle.sleeps == 1  # after the spin

        trio.run(main)


def test_idle_wait_wakes_for_a_thread_result():
    """A worker thread finishing while the waiter blocks: trio runs its task at once."""
    with pipe() as (read_end, write_end):
        waiter = loop.ReadyWaiter()
        release = threading.Event()
        order = []

        async def in_thread():
            await trio.to_thread.run_sync(release.wait)
            order.append("thread result")
            os.write(write_end, b"x")  # the request the waiter then sees

        async def main():
            tid = threading.get_native_id()
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(in_thread)
                    await trio.testing.wait_all_tasks_blocked()

                    def set_when_asleep():
                        wait_until_asleep(tid)
                        release.set()

                    helper = threading.Thread(target=set_when_asleep)
                    helper.start()
                    await waiter(read_end)
                    order.append("request")
                    helper.join()
            assert order == ["thread result", "request"]
            assert waiter.idle == 0  # woken by trio's descriptor, served through trio

        trio.run(main)


def idle_polls_with_a_writer_in_the_same_batch() -> int:
    """One round: a waiter and a writer rescheduled into the same trio batch."""
    with pipe() as (read_end, write_end):
        waiter = loop.ReadyWaiter()

        async def writer():
            await trio.lowlevel.checkpoint()  # rescheduled into the waiter's batch
            os.write(write_end, b"x")

        async def wait():
            await trio.lowlevel.checkpoint()
            await waiter(read_end)

        async def main():
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(writer)
                    nursery.start_soon(wait)

        trio.run(main)
        return waiter.idle_polls


def test_idle_wait_never_blocks_a_task_scheduled_in_the_same_batch():
    """Found as an fsync stalled until the next deadline: a task rescheduled in the batch
    trio is running is in no queue; the waiter must see it and not block."""
    # trio reverses half its batches: the waiter runs first in about half the rounds
    assert [idle_polls_with_a_writer_in_the_same_batch() for _ in range(20)] == [0] * 20


def test_workers_woken_by_a_lock_release_do_not_keep_the_waiter_from_blocking():
    """Every release wakes a parked worker, which only looks at the lock again: it waits
    for its turn while the lock holder blocks, then finds the lock held and parks."""
    with pipe() as (read_end, write_end):
        waiter = loop.ReadyWaiter()
        lock = loop.RequestLock()

        async def other_worker():
            async with lock:
                pass

        async def main():
            async with trio.open_nursery() as nursery:
                await lock.__aenter__()
                nursery.start_soon(other_worker)
                await trio.testing.wait_all_tasks_blocked()  # parked on the lock
                await lock.__aexit__(None, None, None)  # wakes it ...
                await lock.__aenter__()  # ... and takes the lock again at once
                assert len(loop.RequestLock.woken) == 1
                writer = write_once_asleep(threading.get_native_id(), write_end)
                await waiter(read_end)
                writer.join()
                assert (waiter.idle, waiter.idle_polls) == (1, 1)
                await lock.__aexit__(None, None, None)
            assert not loop.RequestLock.woken

        trio.run(main)


def test_idle_wait_ends_at_the_next_trio_deadline():
    with pipe() as (read_end, write_end):
        waiter = loop.ReadyWaiter()

        async def timer():
            await trio.sleep(0.02)  # the deadline under test, not a readiness wait
            os.write(write_end, b"x")

        async def main():
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(timer)
                    await trio.testing.wait_all_tasks_blocked()
                    await waiter(read_end)
            assert waiter.idle == 0

        trio.run(main)


def test_without_idle_wait_the_waiter_goes_through_trio(monkeypatch):
    monkeypatch.setattr(loop.IdleWait, "for_current_run", classmethod(lambda cls, fd: None))
    with pipe() as (read_end, write_end):
        waiter = loop.ReadyWaiter()

        async def main():
            writer = write_once_asleep(threading.get_native_id(), write_end, IN_EPOLL_WAIT)
            await waiter(read_end)
            writer.join()
            assert (waiter.fast, waiter.idle) == (0, 0)

        trio.run(main)


# --- the spin before a sleep --------------------------------------------------------------


def test_request_arriving_during_the_spin_is_served_without_sleeping(monkeypatch):
    """The clock the spin reads is a counter; the request arrives at its second reading,
    so the spin sees it with the window still open, whatever the machine's speed."""
    with pipe() as (read_end, write_end):
        waiter = loop.ReadyWaiter()
        readings = []

        def clock():
            readings.append(None)
            if len(readings) == 2:
                os.write(write_end, b"x")
            return len(readings) * 1e-6

        async def main():
            await trio.testing.wait_all_tasks_blocked()
            monkeypatch.setattr(loop, "clock", clock)
            with trio.CancelScope() as scope:
                scope.cancel()
                await waiter(read_end)  # a checkpoint would raise Cancelled here
            assert not scope.cancelled_caught
            assert (waiter.idle, waiter.idle_polls) == (1, 1)
            assert waiter._idle is not None and waiter._idle.sleeps == 0
            # The spin's time is counted: from the first reading to the one after it.
            assert abs(waiter.busy_poll_seconds - 2e-6) < 1e-9

        trio.run(main)


def test_no_spin_when_busy_poll_is_off(monkeypatch):
    """busy_poll off (encfs.fuse.accel.cpu_policy: on battery, under a quota ...): one look,
    then the blocking poll; a request a spin would have caught finds it asleep."""
    with pipe() as (read_end, write_end):
        waiter = loop.ReadyWaiter()
        waiter.busy_poll = False
        readings = []

        def clock():
            readings.append(None)
            if len(readings) == 2:
                os.write(write_end, b"x")  # would be caught by a spin
            return len(readings) * 1e-6

        async def main():
            await trio.testing.wait_all_tasks_blocked()
            monkeypatch.setattr(loop, "clock", clock)
            with trio.CancelScope() as scope:
                scope.cancel()
                await waiter(read_end)
            assert not scope.cancelled_caught
            assert waiter._idle is not None
            assert (waiter.idle, waiter._idle.sleeps) == (1, 1)  # polled asleep, no spin
            assert waiter.busy_poll_seconds == 0.0
            assert waiter._idle.spin.seconds == loop.SPIN_MAX  # the window is left alone

        trio.run(main)


def test_no_spin_while_a_worker_thread_runs(monkeypatch):
    """The spin holds the GIL a worker thread needs: with one in flight (run_in_thread)
    the waiter goes straight to its blocking poll, and the window stays as it was."""
    with pipe() as (read_end, write_end):
        waiter = loop.ReadyWaiter()
        release = threading.Event()
        readings = []

        def clock():
            readings.append(None)
            if len(readings) == 2:
                os.write(write_end, b"x")  # would be caught by a spin, as above
            return len(readings) * 1e-6

        async def main():
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(loop.run_in_thread, release.wait)
                    await trio.testing.wait_all_tasks_blocked()
                    monkeypatch.setattr(loop, "clock", clock)
                    await waiter(read_end)
                    release.set()
            assert waiter._idle is not None
            assert (waiter.idle, waiter._idle.sleeps) == (1, 1)  # polled asleep, no spin
            assert waiter._idle.spin.seconds == loop.SPIN_MAX
            assert loop._threads_in_flight == 0

        trio.run(main)


def test_spin_window_shrinks_to_nothing_while_requests_come_rarely():
    window = loop.SpinWindow()
    assert window.seconds == loop.SPIN_MAX
    widths = []
    for _ in range(6):
        window.after_sleep(0.01)  # each event came long after the window
        widths.append(window.seconds)
    assert widths[:3] == [loop.SPIN_MAX / 2, loop.SPIN_MAX / 4, loop.SPIN_MAX / 8]
    assert widths[-1] == 0.0 and all(w == 0.0 or w >= loop.SPIN_MIN for w in widths)


def test_spin_window_grows_back_when_events_come_soon_after_a_sleep():
    window = loop.SpinWindow()
    window.seconds = 0.0
    widths = []
    for _ in range(6):
        window.after_sleep(loop.SPIN_MAX / 2)  # a longer spin would have caught it
        widths.append(window.seconds)
    assert widths[0] == loop.SPIN_MIN
    assert widths[1] == 2 * loop.SPIN_MIN
    assert widths[-1] == loop.SPIN_MAX
