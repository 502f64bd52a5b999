"""Sequential writers have their ciphertext's writeback started as they go; others not."""

from __future__ import annotations

import itertools
import os

from encfs import backing
from encfs.engine import ROOT_INODE
from encfs.engine import contents as contents_mod

CHUNK = 256 * 1024


def recording(monkeypatch, size):
    monkeypatch.setattr(contents_mod, "CIPHER_WRITE_BEHIND_SIZE", size)
    started = []
    real = backing.start_writeback

    def record(fd, offset, length):
        started.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(backing, "start_writeback", record)
    return started


def test_a_sequential_writer_starts_writeback_every_so_many_bytes(vol, monkeypatch):
    started = recording(monkeypatch, 1 << 20)
    layout = vol.layout
    fh, _ = vol.create(ROOT_INODE, b"f", 0o100644, os.O_RDWR, 0, 0)
    data = os.urandom(24 * CHUNK)
    for k in range(24):
        assert vol.write(fh, k * CHUNK, data[k * CHUNK : (k + 1) * CHUNK]) == CHUNK
    # Contiguous ranges from the start of the ciphertext, each ending after a write, each
    # at least the write-behind size.
    assert len(started) >= 2
    assert started[0][0] == layout.cipher_size(0)
    for (offset, length), (next_offset, _) in itertools.pairwise(started):
        assert offset + length == next_offset
    for offset, length in started:
        assert length >= 1 << 20
        assert any(offset + length == layout.cipher_size(k * CHUNK) for k in range(1, 25))
    assert vol.read(fh, 0, len(data)) == data  # nothing but timing changed
    vol.release(fh)


def test_random_and_small_writers_start_nothing(vol, monkeypatch):
    started = recording(monkeypatch, 1 << 20)
    fh, _ = vol.create(ROOT_INODE, b"f", 0o100644, os.O_RDWR, 0, 0)
    vol.write(fh, 0, os.urandom(2 * CHUNK))  # less than the write-behind size
    vol.write(fh, 4 * CHUNK, os.urandom(2 * CHUNK))  # a jump: the run starts again
    for k in (5, 1, 7, 3, 6, 0, 2, 4):  # jumps around: every write starts a new run
        vol.write(fh, k * CHUNK, os.urandom(CHUNK))
    assert started == []
    small = recording(monkeypatch, 1 << 20)
    gh, _ = vol.create(ROOT_INODE, b"g", 0o100644, os.O_RDWR, 0, 0)
    for k in range(64):  # sequential, but 64 KiB in all
        vol.write(gh, k * 1024, os.urandom(1024))
    assert small == []
    vol.release(fh)
    vol.release(gh)


def test_writeback_on_a_descriptor_that_cannot_is_ignored():
    read_end, write_end = os.pipe()  # sync_file_range: ESPIPE
    try:
        backing.start_writeback(write_end, 0, 1 << 20)
    finally:
        os.close(read_end)
        os.close(write_end)
