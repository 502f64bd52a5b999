"""The encrypted data path against a plain bytearray model, and crash ordering."""

from __future__ import annotations

import os
import random

import pytest

from encfs.engine import ROOT_INODE, Volume
from encfs.engine import contents as contents_mod
from tests.helpers.config import trusted

BS = 4096


def _model_write(model: bytearray, offset: int, data: bytes) -> None:
    if len(model) < offset:
        model.extend(bytes(offset - len(model)))
    model[offset : offset + len(data)] = data


@pytest.mark.parametrize("seed", range(4))
def test_random_writes_truncates_reads_match_model(vol, seed):
    rnd = random.Random(seed)
    fh, attr = vol.create(ROOT_INODE, b"f", 0o100644, os.O_RDWR, 0, 0)
    model = bytearray()
    span = 40 * BS * 2  # crosses several 32-block groups at 4 KiB blocks
    for _ in range(150):
        if rnd.random() < 0.75:
            offset = rnd.randrange(0, span)
            data = rnd.randbytes(rnd.choice([1, 17, BS - 1, BS, BS + 1, 3 * BS, 70000]))
            assert vol.write(fh, offset, data) == len(data)
            _model_write(model, offset, data)
        else:
            size = rnd.randrange(0, span)
            vol.setattr(attr.ino, size=size)
            del model[size:]
            model.extend(bytes(size - len(model)))
        assert vol.getattr(attr.ino).size == len(model)
        offset = rnd.randrange(0, len(model) + 1)
        length = rnd.randrange(0, 5 * BS)
        assert vol.read(fh, offset, length) == bytes(model[offset : offset + length])
    assert vol.read(fh, 0, len(model) + 1) == bytes(model)
    vol.release(fh)


def test_sparse_file_costs_only_written_blocks(vol, backing):
    fh, attr = vol.create(ROOT_INODE, b"sparse", 0o100644, os.O_RDWR, 0, 0)
    vol.write(fh, 16 << 30, b"end")  # 16 GiB + 3 bytes
    vol.write(fh, 5 << 30, b"middle")
    assert vol.getattr(attr.ino).size == (16 << 30) + 3
    assert vol.read(fh, (5 << 30) - 2, 10) == b"\0\0middle\0\0"
    assert vol.read(fh, 1 << 30, 8) == bytes(8)
    vol.release(fh)
    blocks = sum(os.lstat(os.path.join(backing, n)).st_blocks for n in os.listdir(backing))
    assert blocks * 512 < 1 << 20


def test_open_with_o_trunc_truncates(vol):
    fh, attr = vol.create(ROOT_INODE, b"t", 0o100644, os.O_RDWR, 0, 0)
    vol.write(fh, 0, b"x" * 10100)
    vol.release(fh)
    fh = vol.open(attr.ino, os.O_WRONLY | os.O_TRUNC)
    vol.write(fh, 0, b"1")
    assert vol.getattr(attr.ino).size == 1
    vol.release(fh)


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_after", [0, 1, 2])
@pytest.mark.parametrize("old_len,offset,new_len", [(3 * BS, 100, 200), (3 * BS, 0, 3 * BS),
                                                    (100, 50, 100), (BS * 2, BS, BS)])
def test_crash_between_write_steps_keeps_old_or_new(
    backing, monkeypatch, crash_after, old_len, offset, new_len
):
    """A crash after any of the 3 pwrites of a block write leaves old or new data."""
    vol = Volume.unlock(str(backing), trusted())
    fh, _ = vol.create(ROOT_INODE, b"c", 0o100644, os.O_RDWR, 0, 0)
    old = os.urandom(old_len)
    vol.write(fh, 0, old)
    new = os.urandom(new_len)
    expected_new = bytearray(old)
    _model_write(expected_new, offset, new)

    calls = {"n": 0}
    real_pwrite = os.pwrite

    def crashing_pwrite(fd, data, pos):
        if calls["n"] == crash_after:
            raise Crash
        calls["n"] += 1
        return real_pwrite(fd, data, pos)

    monkeypatch.setattr(contents_mod.os, "pwrite", crashing_pwrite)
    with pytest.raises(Crash):
        vol.write(fh, offset, new)
    monkeypatch.setattr(contents_mod.os, "pwrite", real_pwrite)
    vol.close()

    reopened = Volume.unlock(str(backing), trusted())
    ino = reopened.lookup(ROOT_INODE, b"c").ino
    fh = reopened.open(ino, os.O_RDONLY)
    got = reopened.read(fh, 0, 1 << 20)
    assert got in (old, bytes(expected_new))
    # And the file is writable again afterwards (both slots may be in use).
    reopened.write(fh, 0, b"again")
    assert reopened.read(fh, 0, 5) == b"again"
    reopened.close()


def test_handles_share_one_data_fd_and_unlinked_file_stays_usable(vol):
    fh1, attr = vol.create(ROOT_INODE, b"u", 0o100644, os.O_RDWR, 0, 0)
    fh2 = vol.open(attr.ino, os.O_RDWR)
    vol.write(fh1, 0, b"abc")
    vol.unlink(ROOT_INODE, b"u")
    vol.write(fh2, 3, b"def")
    assert vol.read(fh1, 0, 10) == b"abcdef"
    vol.release(fh1)
    vol.release(fh2)
