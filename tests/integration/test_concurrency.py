"""Concurrent writers through the mount, with and without the kernel writeback cache.

Several processes (started together through a gate on their stdin, no sleeps) write
disjoint regions of one file whose boundaries fall inside blocks (every boundary block is
read-modify-written by two processes at once), overlapping regions of one file (all
writers on one grid of write units, each in its own order), and many files in one
directory. Afterwards the result must be what POSIX allows:

* disjoint regions: exactly each writer's bytes;
* overlapping regions: every write unit equal to one writer's version of that unit
  (a write(2) is atomic with respect to other writes on a regular file: Linux holds the
  inode lock, and the daemon serves one FUSE request at a time);
* the directory: exactly the expected names, each with its writer's contents.

Threads of one process (released by a barrier) also write interleaved 16-byte stripes of
the same blocks through their own write-only descriptors, and append records with
O_APPEND: no update may be lost, every record lands once (with the writeback cache the
kernel merges pages, reads them through write-only handles and owns the file size).

Then the volume is unmounted and mounted again (no page cache left), and everything is
read again: every block must authenticate (no EIO), the backing file sizes must match the
format's arithmetic, and the contents must be unchanged.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from encfs.format.blocks import Layout
from tests.helpers.mount import Volume, init_volume, mounted, run_cli

pytestmark = pytest.mark.fuse

BS = 4096  # small blocks: many blocks shared by neighbouring writers
LAYOUT = Layout(BS)
WRITERS = 4
TIMEOUT = 120

WRITER = textwrap.dedent(
    """
    import json, os, random, sys
    job = json.loads(sys.argv[1])
    sys.stdin.read(1)  # the gate: every writer starts at once
    fd = os.open(job["path"], os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for offset, length, seed in job["writes"]:
            data = random.Random(seed).randbytes(length)
            assert os.pwrite(fd, data, offset) == length
        if job.get("fsync"):
            os.fsync(fd)
    finally:
        os.close(fd)
    """
)

DIR_WRITER = textwrap.dedent(
    """
    import json, os, random, sys
    job = json.loads(sys.argv[1])
    k, count, root = job["k"], job["count"], job["dir"]
    sys.stdin.read(1)
    rng = random.Random(k)
    os.mkdir(os.path.join(root, f"sub-{k}"))
    for i in range(count):
        data = random.Random(f"{k}-{i}").randbytes(rng.randrange(1, 9000))
        tmp = os.path.join(root, f".tmp-{k}-{i}")
        with open(tmp, "wb") as f:       # write a temp file, then rename it in place
            f.write(data)
        os.rename(tmp, os.path.join(root, f"w{k}-{i}"))
        if i % 5 == 0:
            with open(os.path.join(root, f"sub-{k}", f"x{i}"), "wb") as f:
                f.write(data)
        if i % 7 == 3:
            os.unlink(os.path.join(root, f"w{k}-{i - 1}"))
    """
)


def data_for(seed: str, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def run_together(script: str, jobs: list[dict]) -> None:
    """Start one process per job, open the gate for all at once, wait for all."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, json.dumps(job)],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for job in jobs
    ]
    try:
        for proc in procs:
            proc.stdin.write("g")
            proc.stdin.flush()
        for proc in procs:
            proc.stdin.close()
        errors = [(proc.wait(timeout=TIMEOUT), proc.stderr.read()) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
    assert all(code == 0 for code, _ in errors), errors


def backing_files(backing: Path) -> dict[int, Path]:
    """Backing regular files by inode number (the mount reports the backing st_ino)."""
    found = {}
    for root, _dirs, files in os.walk(backing):
        for name in files:
            found[os.lstat(Path(root, name)).st_ino] = Path(root, name)
    return found


def check_after_remount(volume: Volume, mountpoint: Path, expected: dict[str, bytes],
                        options: tuple[str, ...]) -> None:
    """A fresh mount (no page cache): every block is decrypted and must authenticate."""
    with mounted(volume, mountpoint, *options) as mnt:
        ciphers = backing_files(volume.backing)
        for rel, data in expected.items():
            path = mnt / rel
            try:
                got = path.read_bytes()
            except OSError as exc:
                raise AssertionError(f"{rel}: {exc} after remount (corrupt block?)") from None
            assert got == data, f"{rel} changed across the remount"
            cipher = ciphers[os.stat(path).st_ino]
            assert os.stat(cipher).st_size == LAYOUT.cipher_size(len(data)), rel


def disjoint_regions(mnt: Path, expected: dict[str, bytes]) -> None:
    region = 25 * BS + 1234  # boundaries inside blocks
    chunk_sizes = [1, 100, BS - 1, BS + 7, 3 * BS]
    jobs, want = [], bytearray()
    for k in range(WRITERS):
        rng = random.Random(k)
        start, writes, pos = k * region, [], 0
        while pos < region:
            length = min(rng.choice(chunk_sizes), region - pos)
            writes.append([start + pos, length, f"d{k}-{pos}"])
            want += data_for(f"d{k}-{pos}", length)
            pos += length
        rng.shuffle(writes)  # each writer in its own random order, boundaries included
        jobs.append({"path": str(mnt / "disjoint.bin"), "writes": writes, "fsync": k % 2 == 0})
    run_together(WRITER, jobs)
    got = (mnt / "disjoint.bin").read_bytes()
    assert len(got) == len(want)
    bad = [k for k in range(WRITERS)
           if got[k * region:(k + 1) * region] != want[k * region:(k + 1) * region]]
    assert not bad, f"disjoint regions of writers {bad} lost updates"
    expected["disjoint.bin"] = got


def overlapping_units(mnt: Path, expected: dict[str, bytes], unit: int) -> None:
    units = 30
    name = f"overlap-{unit}.bin"
    jobs = []
    for k in range(WRITERS):
        writes = [[u * unit, unit, f"o{k}-{u}"] for u in range(units)]
        random.Random(100 + k).shuffle(writes)
        jobs.append({"path": str(mnt / name), "writes": writes})
    run_together(WRITER, jobs)
    got = (mnt / name).read_bytes()
    assert len(got) == units * unit
    versions = {u: {data_for(f"o{k}-{u}", unit) for k in range(WRITERS)} for u in range(units)}
    torn = [u for u in range(units) if got[u * unit:(u + 1) * unit] not in versions[u]]
    assert not torn, f"{name}: write units {torn} mix several writers' data (torn writes)"
    expected[name] = got


def many_files_in_one_directory(mnt: Path, expected: dict[str, bytes]) -> None:
    count = 80
    (mnt / "dir").mkdir()
    jobs = [{"k": k, "count": count, "dir": str(mnt / "dir")} for k in range(WRITERS)]
    run_together(DIR_WRITER, jobs)
    want: dict[str, bytes] = {}
    for k in range(WRITERS):
        rng = random.Random(k)
        for i in range(count):
            data = data_for(f"{k}-{i}", rng.randrange(1, 9000))
            want[f"w{k}-{i}"] = data
            if i % 5 == 0:
                want[f"sub-{k}/x{i}"] = data
            if i % 7 == 3:
                del want[f"w{k}-{i - 1}"]
    assert sorted(os.listdir(mnt / "dir")) == sorted({rel.split("/")[0] for rel in want})
    for k in range(WRITERS):
        assert sorted(os.listdir(mnt / "dir" / f"sub-{k}")) == sorted(
            rel.split("/")[1] for rel in want if rel.startswith(f"sub-{k}/")
        )
    for rel, data in want.items():
        assert (mnt / "dir" / rel).read_bytes() == data, rel
        expected[f"dir/{rel}"] = data


@pytest.mark.parametrize("options", [(), ("writeback_cache",)], ids=["default", "writeback_cache"])
def test_concurrent_writers(tmp_path, options):
    volume = init_volume(tmp_path, block_size=BS)
    expected: dict[str, bytes] = {}
    with mounted(volume, tmp_path / "mnt", *options) as mnt:
        disjoint_regions(mnt, expected)
        for unit in (BS, 3 * BS + 100, 40_000):
            overlapping_units(mnt, expected, unit)
        many_files_in_one_directory(mnt, expected)
    check_after_remount(volume, tmp_path / "mnt", expected, options)


# --- threads of one process on the same blocks (writeback cache: the kernel merges pages) --

THREADS = 8
STRIPE = 16  # bytes: every block is shared by all threads, no byte by two of them


def run_threads(work, count: int) -> None:
    """Run work(k) in `count` threads released together by a barrier; re-raise failures."""
    barrier = threading.Barrier(count, timeout=TIMEOUT)
    errors: list[BaseException] = []

    def body(k: int) -> None:
        try:
            barrier.wait()
            work(k)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(k,)) for k in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a writer thread hung"
    assert not errors, errors


@pytest.mark.parametrize("options", [(), ("writeback_cache",)], ids=["default", "writeback_cache"])
def test_threads_writing_the_same_blocks(tmp_path, options):
    """Interleaved 16-byte stripes of the same blocks, each thread through its own
    write-only descriptor, on a fresh mount (nothing cached): every partial write needs
    the rest of its block (with the writeback cache the kernel reads the page through the
    write-only handle). No update may be lost; O_APPEND writers from threads each land
    exactly once (with the writeback cache the kernel owns the size)."""
    volume = init_volume(tmp_path, block_size=BS)
    mountpoint = tmp_path / "mnt"
    base = random.Random(1).randbytes(3 * BS + 100)
    with mounted(volume, mountpoint, *options) as mnt:
        (mnt / "blocks").write_bytes(base)
    expected = bytearray(base)
    stripes = [(offset, data_for(f"s{offset}", STRIPE)) for offset in range(0, len(base), STRIPE)]
    for offset, data in stripes:
        expected[offset : offset + STRIPE] = data
    expected = expected[: len(base)]
    record = 96
    appends = 40

    with mounted(volume, mountpoint, *options) as mnt:

        def stripe_writer(k: int) -> None:
            fd = os.open(mnt / "blocks", os.O_WRONLY)
            try:
                for offset, data in stripes[k::THREADS]:
                    os.pwrite(fd, data[: len(base) - offset], offset)
            finally:
                os.close(fd)

        def appender(k: int) -> None:
            fd = os.open(mnt / "log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                for i in range(appends):
                    line = f"{k}:{i}:".encode().ljust(record - 1, b"x") + b"\n"
                    assert os.write(fd, line) == record
            finally:
                os.close(fd)

        run_threads(stripe_writer, THREADS)
        assert (mnt / "blocks").read_bytes() == expected
        run_threads(appender, THREADS)
        log = (mnt / "log").read_bytes()
    want_lines = sorted(
        f"{k}:{i}:".encode().ljust(record - 1, b"x") + b"\n"
        for k in range(THREADS)
        for i in range(appends)
    )
    assert len(log) == THREADS * appends * record
    assert sorted(log[i : i + record] for i in range(0, len(log), record)) == want_lines
    check_after_remount(volume, mountpoint, {"blocks": bytes(expected), "log": log}, options)


def test_control_socket_answers_while_requests_flood_in(tmp_path):
    """Requests already queued are served without a trio checkpoint (encfs/fuse/accel/loop.py),
    but only FAST_PATH_BUDGET in a row: status must still answer under a flood, and
    every flooding call must get its answer."""
    volume = init_volume(tmp_path)
    calls = 3000
    with mounted(volume, tmp_path / "mnt") as mnt:
        (mnt / "f").write_bytes(b"x")
        answered = [0] * THREADS
        done = threading.Event()

        def flood(k: int) -> None:
            while answered[k] < calls or not done.is_set():
                with pytest.raises(OSError):  # ENODATA, answered with no work
                    os.getxattr(mnt / "f", "security.capability")
                answered[k] += 1

        threads = [threading.Thread(target=flood, args=(k,)) for k in range(THREADS)]
        for thread in threads:
            thread.start()
        try:
            for _ in range(3):
                status = run_cli("status", "--json", mnt)
                assert status.returncode == 0, status.stderr
                assert json.loads(status.stdout)["state"] == "READY"
        finally:
            done.set()
            for thread in threads:
                thread.join(TIMEOUT)
        assert min(answered) >= calls
