#!/usr/bin/env python3
"""Key rotation benchmark (issue 5): a re-wrap pass against re-encrypting the same data.

`make bench-rotation` (or `.venv/bin/python bench/rotation.py [--size-gib 4] [--quick]`),
as root (FUSE mounts). Steps, all in one run on the same disk:

1. a volume (key file provider) filled through the mount with SIZE of file data: a few
   large files and a few thousand small ones (1-256 KiB);
2. a fingerprint of every backing file: SHA-256 of each 4 KiB chunk;
3. `encfs-gw rotate MOUNTPOINT --purge-old` while mounted (the daemon does the pass),
   three times (three real rotations, cold cache each time; median and min-max): wall
   time of the command, DEKs re-wrapped, DEKs/s, bytes the daemon wrote (/proc/PID/io
   write_bytes and wchar deltas);
4. the fingerprint again: chunks changed (4 KiB granularity, an upper bound of the bytes
   changed), and a check that no chunk outside the key areas changed;
5. the same pass offline (`encfs-gw rotate BACKING`), timed;
6. re-encryption for comparison: `cp -a` of the whole tree from this mount into a fresh
   volume's mount (what rotating by re-encrypting would cost at the least);
7. every file read back and compared with its source after the old KEK was purged.

Results go to bench/results/rotation-<time>.md and are printed.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))

from encfs.daemon.runtime import volume_lock_holder  # noqa: E402
from encfs.format.blocks import HEADER_SIZE, KEY_AREA_SIZE, Layout  # noqa: E402

ENCFS = [sys.executable, "-m", "encfs"]
CHUNK = 4096
GIB = 1 << 30


def cli(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [*ENCFS, *map(str, args)], capture_output=True, text=True, cwd=REPO, check=False
    )
    if check and result.returncode != 0:
        raise SystemExit(f"encfs-gw {' '.join(map(str, args))}: {result.stderr.strip()}")
    return result


def daemon_pid(backing: Path) -> int:
    pid = volume_lock_holder(str(backing))
    if pid is None:
        raise SystemExit(f"no process holds the lock of {backing}")
    return pid


def proc_io(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/io") as io:
        return {k: int(v) for k, v in (line.split(": ") for line in io)}


def fill(mnt: Path, plain_total: int, seed: int = 5) -> dict[str, str]:
    """Large files for 3/4 of the size, small files (1-256 KiB) for the rest."""
    rnd = random.Random(seed)
    digests: dict[str, str] = {}
    large_total = plain_total * 3 // 4
    chunk = rnd.randbytes(1 << 20)
    large_count = 4
    for i in range(large_count):
        name = f"large{i}.bin"
        digest = hashlib.sha256()
        with open(mnt / name, "wb") as f:
            for j in range(large_total // large_count // len(chunk)):
                piece = chunk[j % 7 :] + chunk[: j % 7] if j % 2 else chunk
                f.write(piece)
                digest.update(piece)
        digests[name] = digest.hexdigest()
    written, index = 0, 0
    while written < plain_total - large_total:
        directory = mnt / f"small/d{index // 500:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        size = rnd.randint(1024, 256 * 1024)
        data = rnd.randbytes(size)
        (directory / f"f{index:05d}").write_bytes(data)
        digests[str((directory / f"f{index:05d}").relative_to(mnt))] = hashlib.sha256(
            data
        ).hexdigest()
        written += size
        index += 1
    return digests


def data_files(backing: Path) -> list[Path]:
    """The backing files that hold file contents (not config, lock, sidecars, dir ids)."""
    out = []
    for dirpath, _, names in os.walk(backing):
        for name in names:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file() or name.startswith("encfs-gw."):
                continue
            if name.startswith(".egw") and not (name.startswith(".egwL") and "." not in name[5:]):
                continue
            out.append(path)
    return sorted(out)


def key_area_chunks(size: int, layout: Layout) -> set[int]:
    """4 KiB chunk numbers that hold the header or a key area (may change in a pass)."""
    chunks = {0} if HEADER_SIZE else set()
    group = 0
    while layout.group_start(group) < size:
        start = layout.group_start(group)
        chunks.update(range(start // CHUNK, (start + KEY_AREA_SIZE - 1) // CHUNK + 1))
        group += 1
    return chunks


def fingerprint(backing: Path) -> dict[str, list[bytes]]:
    prints = {}
    for path in data_files(backing):
        digests = []
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                digests.append(hashlib.blake2b(block, digest_size=16).digest())
        prints[str(path.relative_to(backing))] = digests
    return prints


def compare(before: dict, after: dict, backing: Path, layout: Layout) -> tuple[int, int, int]:
    """(chunks changed, of which outside key areas/headers, total chunks)."""
    changed = outside = total = 0
    for name, old in before.items():
        new = after[name]
        total += len(old)
        allowed = key_area_chunks((backing / name).stat().st_size, layout)
        for index, (a, b) in enumerate(zip(old, new, strict=True)):
            if a != b:
                changed += 1
                outside += index not in allowed
    return changed, outside, total


def du_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def evict(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file() and not file.is_symlink():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def verify(mnt: Path, digests: dict[str, str]) -> int:
    bad = 0
    for name, expected in digests.items():
        digest = hashlib.sha256()
        with open(mnt / name, "rb") as f:
            while piece := f.read(1 << 20):
                digest.update(piece)
        bad += digest.hexdigest() != expected
    return bad


class Mounted:
    def __init__(self, backing: Path, mnt: Path, key: Path) -> None:
        self.backing, self.mnt, self.key = backing, mnt, key

    def __enter__(self) -> Path:
        self.mnt.mkdir(exist_ok=True)
        cli("mount", self.backing, self.mnt, "--keyfile", self.key)
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        if cli("unmount", self.mnt, check=False).returncode:
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true", help="0.25 GiB instead")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--online-runs", type=int, default=3, help="online passes (median)")
    args = parser.parse_args(argv)
    plain_total = int((0.25 if args.quick else args.size_gib) * GIB)
    work = Path(tempfile.mkdtemp(prefix="encfs-rotation-", dir=args.workdir))
    figures: dict[str, object] = {"plain bytes": plain_total}
    try:
        backing, key, mnt = work / "vol.backing", work / "vol.key", work / "mnt"
        cli("init", backing, "--keyfile", key)
        layout = Layout(json.loads((backing / "encfs-gw.conf").read_text())["block_size"])
        print(f"filling {plain_total / GIB:.2f} GiB ...", flush=True)
        with Mounted(backing, mnt, key) as m:
            start = time.monotonic()
            digests = fill(m, plain_total)
            figures["fill through the mount (s)"] = round(time.monotonic() - start, 1)
        figures["files"] = len(digests)
        figures["backing bytes"] = du_bytes(backing)
        before = fingerprint(backing)

        # The pass is a few seconds: run it ONLINE_RUNS times (each a real rotation to a
        # new KEK version, cold cache each time) and report the median with min-max.
        online_runs, written_runs, wchar_runs, deks_runs = [], [], [], []
        for run in range(args.online_runs):
            print(f"online rotation {run + 1}/{args.online_runs} ...", flush=True)
            evict(backing)
            with Mounted(backing, mnt, key) as m:
                pid = daemon_pid(backing)
                io_before = proc_io(pid)
                start = time.monotonic()
                result = cli("rotate", m, "--json", "--purge-old")
                online_runs.append(time.monotonic() - start)
                io_after = proc_io(pid)
            final = json.loads(result.stdout.splitlines()[-1])
            assert final["done"], final
            deks_runs.append(int(final["deks_rewrapped"]))
            written_runs.append(io_after["write_bytes"] - io_before["write_bytes"])
            wchar_runs.append(io_after["wchar"] - io_before["wchar"])
        online_s = statistics.median(online_runs)
        deks = deks_runs[0]
        figures["online pass (s), median"] = round(online_s, 2)
        figures["online pass (s), min-max"] = (
            f"{min(online_runs):.2f}-{max(online_runs):.2f} ({len(online_runs)} runs)"
        )
        figures["DEKs re-wrapped"] = deks
        figures["DEKs/s (online, median)"] = round(deks / online_s)
        written = int(statistics.median(written_runs))
        wchar = int(statistics.median(wchar_runs))
        figures["daemon write_bytes during the pass"] = written
        figures["daemon wchar during the pass"] = wchar
        figures["written / backing size (%)"] = round(100 * wchar / figures["backing bytes"], 2)
        after = fingerprint(backing)
        changed, outside, total = compare(before, after, backing, layout)
        figures["4 KiB chunks changed / total (%)"] = round(100 * changed / total, 2)
        figures["chunks changed outside key areas"] = outside

        print("offline rotation ...", flush=True)
        evict(backing)
        start = time.monotonic()
        cli("rotate", backing, "--keyfile", key, "--json", "--purge-old")
        figures["offline pass (s)"] = round(time.monotonic() - start, 2)

        print("re-encryption by copy ...", flush=True)
        backing2, key2, mnt2 = work / "copy.backing", work / "copy.key", work / "mnt2"
        cli("init", backing2, "--keyfile", key2)
        evict(backing)
        with Mounted(backing, mnt, key) as src, Mounted(backing2, mnt2, key2) as dst:
            start = time.monotonic()
            subprocess.run(["cp", "-a", f"{src}/.", str(dst)], check=True)
            os.sync()
            copy_s = time.monotonic() - start
        figures["re-encrypt by cp -a (s)"] = round(copy_s, 2)
        figures["re-encrypt time / online pass time"] = round(copy_s / online_s, 1)

        with Mounted(backing, mnt, key) as m:
            figures["files that differ after purge"] = verify(m, digests)
    finally:
        for point in (work / "mnt", work / "mnt2"):
            subprocess.run(["fusermount3", "-u", "-z", str(point)], check=False,
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    lines = [
        f"# encfs-gw rotation benchmark, {stamp}",
        "",
        f"Machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end.",
        "Targets (issue 5): the pass changes < 3 % of the volume's bytes and takes < 1/20 of "
        "the time of re-encrypting the same data.",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in figures.items()),
        "",
    ]
    report = "\n".join(lines)
    print(report)
    out = BENCH_DIR / "results" / f"rotation-{stamp}{'-quick' if args.quick else ''}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(report)
    print(f"written to {out}")
    bad = figures["files that differ after purge"] or figures["chunks changed outside key areas"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
