"""The re-encryption journal's writing (encfs.admin.reencrypt_journal) on real files: the
bytes write_journal writes (from the entries' buffers, with writev, MACed piece by
piece) are exactly encode_journal's (docs/FORMAT.md 9.1), a reused journal.new is cut to
size, sync_files and the Settler hand back their errors, and open_ahead keeps its
descriptors bounded and closes them all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from encfs import crypto
from encfs.admin import reencrypt_data, reencrypt_journal
from encfs.admin.reencrypt_journal import (
    JOURNAL_TEMP,
    GroupEntry,
    Settler,
    decode_journal,
    encode_journal,
    sync_files,
    write_journal,
    write_parts,
)
from encfs.format.blocks import KEY_AREA_SIZE


def mac(*parts: bytes) -> bytes:
    return crypto.Mac(b"k" * 32).tag_parts(parts, 32)


def entries(count: int) -> list[GroupEntry]:
    """Entries whose runs are slices of one buffer (as the pass makes them)."""
    out = []
    for i in range(count):
        records = bytearray(os.urandom(3 * 1000 + i))
        view = memoryview(records)
        out.append(
            GroupEntry(
                f"d/f{i}",
                1,
                100 + i,
                i.to_bytes(16, "big"),
                i,
                os.urandom(KEY_AREA_SIZE),
                os.urandom(KEY_AREA_SIZE),
                os.urandom(KEY_AREA_SIZE),
                [(i * 32, view[:1000]), (i * 32 + 2, view[2000:])],
            )
        )
    return out


def test_write_journal_writes_exactly_the_encoded_journal_and_cuts_a_reused_file(tmp_path):
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (tmp_path / JOURNAL_TEMP).write_bytes(b"x" * 3_000_000)  # a longer earlier batch
        batch = entries(600)  # more pieces than one writev takes (IOV_MAX, 1024)
        size = write_journal(dir_fd, 7, 3, batch, mac)
    finally:
        os.close(dir_fd)
    written = (tmp_path / JOURNAL_TEMP).read_bytes()
    assert written == encode_journal(7, 3, batch, mac) and size == len(written)
    decoded = decode_journal(written, 7, mac)
    assert decoded is not None and len(decoded) == 600
    assert [(first, bytes(r)) for first, r in decoded[5].runs] == [
        (first, bytes(r)) for first, r in batch[5].runs
    ]


def test_the_journal_mac_of_parts_is_the_hmac_of_their_concatenation():
    key = bytearray(os.urandom(32))
    parts = [b"head", memoryview(bytearray(os.urandom(5000)))[10:4000], b"", os.urandom(99)]
    joined = b"".join(bytes(p) for p in parts)
    assert crypto.hmac_sha256_parts(key, parts) == crypto.Mac(key).tag(joined, 32)
    assert crypto.Mac(key).tag_parts(parts, 16) == crypto.Mac(key).tag(joined, 16)


def test_write_parts_resumes_a_short_write(tmp_path, monkeypatch):
    """A writev that stops inside a piece (a signal, a full pipe) is resumed there."""
    real = os.writev
    monkeypatch.setattr(
        reencrypt_journal.os, "writev", lambda fd, views: real(fd, [bytes(views[0])[:3]])
    )  # short writes
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert write_parts(fd, [b"abcdefg", b"", memoryview(b"hij"), b"k"]) == 11
    finally:
        os.close(fd)
    assert (tmp_path / "out").read_bytes() == b"abcdefghijk"


def test_sync_files_syncs_every_file_and_raises_the_first_error(tmp_path):
    fds = [os.open(tmp_path / f"f{i}", os.O_RDWR | os.O_CREAT, 0o600) for i in range(9)]
    read_end, write_end = os.pipe()  # fdatasync of a pipe: EINVAL, a real error
    try:
        sync_files(fds)
        with pytest.raises(OSError):
            sync_files([*fds[:4], read_end, *fds[4:]])
    finally:
        for fd in (*fds, read_end, write_end):
            os.close(fd)


def test_the_settler_raises_its_threads_error_at_the_next_wait():
    settler = Settler()
    done = []
    settler.start(lambda: done.append(1))
    settler.wait()
    assert done == [1]
    settler.start(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        settler.wait()
    settler.wait()  # raised once
    settler.start(lambda: 1 / 0)
    settler.wait(raise_error=False)  # an error already on its way out wins


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_open_ahead_keeps_its_descriptors_bounded_and_closes_them(tmp_path: Path):
    for i in range(3 * reencrypt_data.READ_AHEAD_FILES):
        (tmp_path / f"f{i:03d}").write_bytes(b"x" * 100)
    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        before = open_descriptors()
        seen, most = [], 0
        for path, fd in reencrypt_data.open_ahead(root):
            most = max(most, open_descriptors() - before)
            seen.append(path)
            os.close(fd)
        assert seen == sorted(seen) and len(seen) == 3 * reencrypt_data.READ_AHEAD_FILES
        # the files ahead, the one handed out, the walk's directory
        assert most <= reencrypt_data.READ_AHEAD_FILES + 2
        assert open_descriptors() == before
        walk = reencrypt_data.open_ahead(root)
        _, fd = next(walk)
        os.close(fd)
        walk.close()  # left early: the files opened ahead are closed
        assert open_descriptors() == before
    finally:
        os.close(root)
