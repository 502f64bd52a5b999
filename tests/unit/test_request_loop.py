"""The request loop's lock and ready-waiter (encfs/fuse/loop.py), without a mount.

Every FUSE test runs through them too; these pin the scheduling properties the speed
comes from and the ones that keep other trio tasks alive.
"""

from __future__ import annotations

import os

import pyfuse3
import trio
import trio.testing

from encfs.fuse import loop


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
    read_end, write_end = os.pipe()
    try:
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
    finally:
        os.close(read_end)
        os.close(write_end)


def test_waiter_waits_through_trio_when_nothing_is_queued():
    read_end, write_end = os.pipe()
    try:
        waiter = loop.ReadyWaiter()

        async def main():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter, read_end)
                await trio.testing.wait_all_tasks_blocked()
                os.write(write_end, b"x")
            assert waiter.fast == 0

        trio.run(main)
    finally:
        os.close(read_end)
        os.close(write_end)


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
