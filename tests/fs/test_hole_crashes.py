"""Crashes while a hole becomes data: every step of every write and truncate that turns
a hole block (no key slot, record bytes all zero) into a stored block, cut in turn.

A block's key slot and its record are two pwrites; a hole has no old slot to fall back
on, so between them the block has a slot over a record that is still all zeros. That
state must read as the hole it was (FORMAT.md section 3.3), never as EIO, and fsck must
not call it tampering (the kill -9 harness found it: a truncate into a hole block).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest

from encfs.admin.fsck import EITHER, TAMPERING, fsck
from encfs.engine import ROOT_INODE, Volume
from encfs.engine import contents as contents_mod
from tests.helpers.config import trusted

BS = 4096


class Crash(Exception):
    """Raised from the cut step: nothing of the operation after it reaches the file."""


def _write(offset: int, data: bytes) -> Callable[[Volume, int, int], None]:
    return lambda vol, fh, ino: vol.write(fh, offset, data) and None


def _truncate(size: int) -> Callable[[Volume, int, int], None]:
    return lambda vol, fh, ino: vol.setattr(ino, size=size) and None


def _data_at(offset: int, length: int, size: int | None = None):
    """Setup: a file holding `length` random bytes at `offset` (holes before), then cut or
    grown to `size`."""

    def setup(vol: Volume, fh: int, ino: int) -> None:
        vol.write(fh, offset, random.Random(offset).randbytes(length))  # same for every cut
        if size is not None:
            vol.setattr(ino, size=size)

    return setup


SCENARIOS = {
    # a partial and a whole block written into a hole inside the file
    "partial-write-into-hole": (_data_at(3 * BS, BS), _write(BS + 10, b"p" * 100)),
    "block-write-into-hole": (_data_at(3 * BS, BS), _write(BS, b"b" * BS)),
    "run-over-holes-and-data": (_data_at(2 * BS, BS), _write(BS - 5, b"r" * (3 * BS))),
    # a truncate that cuts inside a hole block
    "truncate-into-hole": (_data_at(5 * BS, BS), _truncate(2 * BS + 100)),
    # a last block that is a partial hole (a truncate up left it), then grown
    "extend-hole-tail-in-place": (_data_at(0, BS, 3 * BS + 100), _write(3 * BS + 90, b"e" * 50)),
    "write-past-hole-tail": (_data_at(0, BS, 3 * BS + 100), _write(6 * BS, b"w" * 10)),
    "truncate-up-past-hole-tail": (_data_at(0, BS, 3 * BS + 100), _truncate(5 * BS)),
}


def _read_all(vol: Volume, name: bytes) -> bytes:
    fh = vol.open(vol.lookup(ROOT_INODE, name).ino, os.O_RDONLY)
    try:
        return vol.read(fh, 0, 1 << 20)
    finally:
        vol.release(fh)


def _crash_at(monkeypatch, step: int) -> None:
    """Make the `step`-th backing write or cut of the data path raise Crash."""
    count = {"n": 0}
    real_pwrite, real_ftruncate = os.pwrite, os.ftruncate

    def counted(real):
        def call(*args):
            if count["n"] == step:
                raise Crash
            count["n"] += 1
            return real(*args)

        return call

    monkeypatch.setattr(contents_mod.os, "pwrite", counted(real_pwrite))
    monkeypatch.setattr(contents_mod.os, "ftruncate", counted(real_ftruncate))


def _acceptable(got: bytes, old: bytes, new: bytes) -> bool:
    """Old, new, or (an extension cut short) the old contents grown by zeros on the way
    to the new size."""
    if got in (old, new):
        return True
    grown = len(old) < len(got) < len(new) and got == new[: len(got)]
    return grown and not any(got[len(old):])


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_a_crash_at_any_step_of_filling_a_hole_reads_old_or_new(backing, monkeypatch, scenario):
    setup, operation = SCENARIOS[scenario]
    vol = Volume.unlock(str(backing), trusted())
    step = 0
    old = b""
    try:
        while True:
            name = b"f%d" % step
            fh, attr = vol.create(ROOT_INODE, name, 0o100644, os.O_RDWR, 0, 0)
            setup(vol, fh, attr.ino)
            before = vol.read(fh, 0, 1 << 20)
            assert step == 0 or before == old
            old = before
            _crash_at(monkeypatch, step)
            try:
                operation(vol, fh, attr.ino)
                crashed = False
            except Crash:
                crashed = True
            monkeypatch.undo()
            vol.release(fh)
            if not crashed:
                new = _read_all(vol, name)
                break
            step += 1
            assert step < 20, "the operation never finished"
    finally:
        vol.close()
    assert step >= 2, "the scenario must cut at least between a key slot and its record"

    # Each cut state, seen by a fresh daemon: old or new, never EIO; fsck calls nothing
    # tampering, and after its repair the file is clean and takes writes.
    vol = Volume.unlock(str(backing), trusted())
    try:
        for cut in range(step):
            got = _read_all(vol, b"f%d" % cut)
            assert _acceptable(got, old, new), (scenario, cut, len(got))
        report = fsck(vol, repair=True)
        assert not [f for f in report.findings if f.looks_like == TAMPERING], report.findings
        assert fsck(vol).findings == []
        for cut in range(step):
            ino = vol.lookup(ROOT_INODE, b"f%d" % cut).ino
            fh = vol.open(ino, os.O_RDWR)
            vol.write(fh, BS + 1, b"again")
            assert vol.read(fh, BS + 1, 5) == b"again"
            vol.release(fh)
    finally:
        vol.close()


def test_an_append_cut_after_its_key_slots_at_a_group_boundary(backing, monkeypatch):
    """A file of exactly 32 blocks ends where the next key group would start; an append
    cut after its key slots leaves them in that group's key area, past the end (the file
    counts only whole blocks). An extension clears them before it makes those blocks
    holes inside the file (before, they read as slots over zeros: the kill -9 harness's
    EIO on a write before any kill), and fsck reports them and cuts them off."""
    old = random.Random(1).randbytes(32 * BS)
    vol = Volume.unlock(str(backing), trusted())
    for name in (b"extended", b"repaired"):
        fh, _ = vol.create(ROOT_INODE, name, 0o100644, os.O_RDWR, 0, 0)
        vol.write(fh, 0, old)
        _crash_at(monkeypatch, 1)  # the key slots of blocks 32-33 written, not their records
        with pytest.raises(Crash):
            vol.write(fh, 32 * BS, b"a" * (2 * BS))
        monkeypatch.undo()
        vol.release(fh)
    vol.close()

    vol = Volume.unlock(str(backing), trusted())
    try:
        fh = vol.open(vol.lookup(ROOT_INODE, b"extended").ino, os.O_RDWR)
        assert vol.read(fh, 0, 1 << 20) == old
        vol.write(fh, 40 * BS, b"end")
        assert vol.read(fh, 0, 1 << 20) == old + bytes(8 * BS) + b"end"
        vol.write(fh, 32 * BS + 7, b"mid")  # a partial write into one of those blocks
        assert vol.read(fh, 32 * BS, 10) == bytes(7) + b"mid"
        vol.release(fh)
        (finding,) = fsck(vol).findings
        assert (finding.kind, finding.looks_like) == ("orphaned key records", EITHER)
        assert finding.path.endswith("repaired")
        assert fsck(vol, repair=True).findings[0].repaired
        assert fsck(vol).findings == []
        fh = vol.open(vol.lookup(ROOT_INODE, b"repaired").ino, os.O_RDWR)
        assert vol.read(fh, 0, 1 << 20) == old
        vol.write(fh, 33 * BS, b"x")
        assert vol.read(fh, 0, 1 << 20) == old + bytes(BS) + b"x"
        vol.release(fh)
    finally:
        vol.close()
