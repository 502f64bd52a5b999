"""The data path when the backing store runs out of space (or fails) mid-request.

Deterministic versions of what tests/integration/test_full_disk.py does on a real full
filesystem: the space reservation (`backing.reserve`, fallocate) or a pwrite fails at a
chosen call, and the file must be exactly as before, or hold exactly the blocks of the
runs that were stored (a short count), never a torn record.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from encfs import backing as backing_mod
from encfs.engine import ROOT_INODE
from encfs.format.blocks import BLOCKS_PER_GROUP

BLOCK = 4096  # the `backing` fixture's block size
GROUP = BLOCK * BLOCKS_PER_GROUP


@pytest.fixture
def file(vol, backing):
    fh, _ = vol.create(ROOT_INODE, b"f", 0o100644, os.O_RDWR, 0, 0)
    yield fh, str(backing / vol.backing_name(ROOT_INODE, b"f")[0])
    vol.release(fh)


def fail_at(monkeypatch, target: str, call: int, code: int = errno.ENOSPC) -> list[int]:
    """Make the `call`-th call (1-based) of backing.<target> fail with `code`."""
    real = getattr(backing_mod, target) if target == "reserve" else os.pwrite
    calls = [0]

    def failing(*args):
        calls[0] += 1
        if calls[0] == call:
            raise OSError(code, os.strerror(code))
        return real(*args)

    if target == "reserve":
        monkeypatch.setattr(backing_mod, "reserve", failing)
    else:
        monkeypatch.setattr(backing_mod.os, "pwrite", failing)
    return calls


@pytest.mark.parametrize("offset", [0, 10, BLOCK - 1, 3 * BLOCK, 100_000])
def test_no_space_changes_nothing(vol, file, monkeypatch, offset):
    fh, path = file
    old = os.urandom(5000)
    vol.write(fh, 0, old)
    before = Path(path).read_bytes()
    fail_at(monkeypatch, "reserve", 1)
    with pytest.raises(OSError) as info:
        vol.write(fh, len(old) + offset, os.urandom(50_000))
    assert info.value.errno == errno.ENOSPC
    assert Path(path).read_bytes() == before
    monkeypatch.undo()
    assert vol.read(fh, 0, 1 << 20) == old


def test_space_running_out_after_the_first_group_is_a_short_write(vol, file, monkeypatch):
    fh, _ = file
    data = os.urandom(GROUP + 3 * BLOCK + 5)  # two runs: a whole group, then 4 blocks
    calls = fail_at(monkeypatch, "reserve", 3)  # run 1 reserves twice, run 2 fails
    assert vol.write(fh, 0, data) == GROUP
    assert calls[0] == 3
    monkeypatch.undo()
    assert vol.lookup(ROOT_INODE, b"f").size == GROUP
    assert vol.read(fh, 0, 1 << 20) == data[:GROUP]
    assert vol.write(fh, GROUP, data[GROUP:]) == len(data) - GROUP  # the caller goes on
    assert vol.read(fh, 0, 1 << 20) == data


@pytest.mark.parametrize("step", [1, 2])  # the key records' or the records' pwrite
def test_failed_pwrite_puts_the_old_keys_and_size_back(vol, file, monkeypatch, step):
    fh, path = file
    old = os.urandom(3 * BLOCK + 100)
    vol.write(fh, 0, old)
    before = Path(path).read_bytes()
    fail_at(monkeypatch, "pwrite", step, errno.EIO)
    with pytest.raises(OSError) as info:
        vol.write(fh, len(old), os.urandom(2 * BLOCK))  # extends the last block
    assert info.value.errno == errno.EIO
    monkeypatch.undo()
    assert Path(path).read_bytes() == before
    assert vol.read(fh, 0, 1 << 20) == old


def test_short_pwrites_are_continued(vol, file, monkeypatch):
    fh, _ = file
    real = os.pwrite

    def halves(fd, data, offset):  # a filling disk: each call stores half
        return real(fd, bytes(data)[: max(1, len(data) // 2)], offset)

    monkeypatch.setattr(backing_mod.os, "pwrite", halves)
    data = os.urandom(70_000)
    assert vol.write(fh, 0, data) == len(data)
    monkeypatch.undo()
    assert vol.read(fh, 0, 1 << 20) == data


def test_reserve_skips_what_a_dense_file_already_has(vol, file, monkeypatch):
    """Overwriting allocated blocks of a dense file needs no space: no fallocate."""
    fh, _ = file
    vol.write(fh, 0, os.urandom(10 * BLOCK))
    fail_at(monkeypatch, "reserve", 1)  # any reservation would fail
    patch = os.urandom(3 * BLOCK)
    assert vol.write(fh, 2 * BLOCK + 7, patch) == len(patch)
