"""Sequential readers get the backing store's readahead ahead of them; others do not."""

from __future__ import annotations

import os

from encfs.engine import ROOT_INODE
from encfs.engine import contents as contents_mod

BS = 4096  # the engine fixtures' block size


def test_sequential_reads_ask_for_what_follows(vol, monkeypatch):
    fh, _ = vol.create(ROOT_INODE, b"f", 0o100644, os.O_RDWR, 0, 0)
    data = os.urandom(64 * BS)
    vol.write(fh, 0, data)
    advised = []
    real_fadvise = os.posix_fadvise

    def record(fd, offset, length, advice):
        advised.append((offset, length, advice))
        real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    layout = vol.layout
    assert vol.read(fh, 0, 8 * BS) == data[: 8 * BS]
    assert advised == []  # one read is not yet a sequence
    assert vol.read(fh, 8 * BS, 8 * BS) == data[8 * BS : 16 * BS]
    assert advised == [
        (
            layout.record_offset(15) + layout.record_size,
            contents_mod.CIPHER_READAHEAD_SIZE,
            os.POSIX_FADV_WILLNEED,
        )
    ]
    assert vol.read(fh, 40 * BS, BS) == data[40 * BS : 41 * BS]  # a jump: no hint
    assert vol.read(fh, 3 * BS, 100) == data[3 * BS : 3 * BS + 100]
    assert len(advised) == 1
    assert vol.read(fh, 3 * BS + 100, 2 * BS) == data[3 * BS + 100 : 5 * BS + 100]
    assert len(advised) == 2 and advised[1][0] == layout.record_offset(5) + layout.record_size
    vol.release(fh)


def test_a_refused_hint_is_ignored(vol, monkeypatch):
    fh, _ = vol.create(ROOT_INODE, b"f", 0o100644, os.O_RDWR, 0, 0)
    data = os.urandom(4 * BS)
    vol.write(fh, 0, data)

    def refuse(*_args):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    assert vol.read(fh, 0, BS) + vol.read(fh, BS, 3 * BS) == data
    vol.release(fh)
