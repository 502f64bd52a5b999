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
6. the disk's sequential write rate (1 GiB written and fdatasynced on the same
   filesystem), then re-encryption in place (every block under a fresh DEK, every name
   under a new volume key): `encfs-gw reencrypt BACKING --purge-old` on the unmounted
   volume, then `encfs-gw reencrypt MOUNTPOINT --purge-old` on the mounted one (the
   daemon runs the pass between requests);
7. re-encryption by copy, for comparison: `cp -a` of the whole tree from this mount into
   a fresh volume's mount;
8. every file read back and compared with its source after both.

The rows of 6 and 7 report wall time, MiB/s of file data, the CPU seconds of the process tree
and the bytes it wrote. Bytes written are the kernel's per-process count (`write_bytes`
of /proc/PID/io: page cache the process dirtied, i.e. what goes to the backing device),
summed over the process tree: for a child we wait for (reencrypt, cp) it comes from
getrusage(RUSAGE_CHILDREN).ru_oublock, the same counter in 512-byte units; for a mount's
daemon (detached, not our child) from /proc/PID/io before and after. cp writes into a
FUSE mount, whose pages reach no disk: its row counts the daemons' writes (cp's own is
a figure apart, it would count the data twice). Not the disk's own
count (/sys/block/*/stat): the disk is shared with every other job on the machine, whose
writes it would count too. The load average (1, 5, 15 min) is recorded at the start, at
each re-encryption row and at the end: other jobs may share the machine.

Results go to bench/results/rotation-<time>.md and are printed.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path[:0] = [str(REPO), str(BENCH_DIR)]

from run import load_avg, proc_cpu_s  # noqa: E402  (bench/run.py: the daemon's CPU, the load)

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


class Cost:
    """CPU seconds and bytes written by a process tree over a stretch of the run: the
    children we wait for (getrusage) and the given daemons (/proc/PID/stat and io)."""

    def __init__(self, *daemons: int) -> None:
        self.daemons = daemons
        self.start = time.monotonic()
        self.children = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.daemon_cpu = [proc_cpu_s(pid) or 0.0 for pid in daemons]
        self.daemon_io = [proc_io(pid)["write_bytes"] for pid in daemons]

    def stop(self) -> dict[str, float]:
        """wall (s), cpu (s), and write_bytes of the children and of the daemons (which
        must still run)."""
        wall = time.monotonic() - self.start
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (children.ru_utime - self.children.ru_utime
               + children.ru_stime - self.children.ru_stime)
        daemons_written = 0
        for pid, cpu_before, io_before in zip(
            self.daemons, self.daemon_cpu, self.daemon_io, strict=True
        ):
            cpu += (proc_cpu_s(pid) or 0.0) - cpu_before
            daemons_written += proc_io(pid)["write_bytes"] - io_before
        return {
            "wall": wall,
            "cpu": cpu,
            "children_written": (children.ru_oublock - self.children.ru_oublock) * 512,
            "daemons_written": daemons_written,
        }


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


def disk_write_rate(work: Path, size: int = GIB) -> float:
    """MiB/s of one sequential write of `size` bytes and its fdatasync in `work` (the
    filesystem of the volumes): the disk's limit the pass is compared with."""
    chunk = os.urandom(8 << 20)
    path = work / "disk-rate.tmp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        start = time.monotonic()
        for _ in range(size // len(chunk)):
            os.write(fd, chunk)
        os.fdatasync(fd)
        elapsed = time.monotonic() - start
    finally:
        os.close(fd)
        path.unlink()
    return size / 1048576 / elapsed


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
    load_at_start = load_avg()
    rows: list[tuple[str, dict[str, float], str]] = []
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
        cpu_runs: list[float] = []
        for run in range(args.online_runs):
            print(f"online rotation {run + 1}/{args.online_runs} ...", flush=True)
            evict(backing)
            with Mounted(backing, mnt, key) as m:
                pid = daemon_pid(backing)
                io_before, cpu_before = proc_io(pid), proc_cpu_s(pid) or 0.0
                start = time.monotonic()
                result = cli("rotate", m, "--json", "--purge-old")
                online_runs.append(time.monotonic() - start)
                io_after = proc_io(pid)
                cpu_runs.append((proc_cpu_s(pid) or 0.0) - cpu_before)
            final = json.loads(result.stdout.splitlines()[-1])
            assert final["done"], final
            deks_runs.append(int(final["deks_rewrapped"]))
            written_runs.append(io_after["write_bytes"] - io_before["write_bytes"])
            wchar_runs.append(io_after["wchar"] - io_before["wchar"])
        online_s = statistics.median(online_runs)
        deks = deks_runs[0]
        figures["daemon CPU during the pass (s), median"] = round(statistics.median(cpu_runs), 2)
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

        print("the disk's sequential write rate ...", flush=True)
        figures["disk: sequential write of 1 GiB + fdatasync, same filesystem (MiB/s)"] = (
            round(disk_write_rate(work), 1)
        )

        print("re-encryption in place (reencrypt, offline) ...", flush=True)
        evict(backing)
        cost = Cost()
        result = cli("reencrypt", backing, "--keyfile", key, "--json", "--purge-old")
        reencrypt = cost.stop()
        reencrypt["written"] = reencrypt["children_written"]
        final = json.loads(result.stdout.splitlines()[-1])
        assert final["done"] and final["unreadable_blocks"] == 0, final
        rows.append((
            "`reencrypt BACKING --purge-old`, offline (unmounted); its process, all its "
            "threads (a batch written and synced on a thread, up to 4 fdatasyncs at once, "
            "while the next is sealed)",
            reencrypt, load_avg(),
        ))
        figures["reencrypt: bytes re-encrypted (its count)"] = final["bytes_reencrypted"]
        figures["reencrypt: bytes written (its count: journal + in place)"] = (
            final["bytes_written"]
        )
        figures["reencrypt: journal peak (bytes)"] = final["journal_peak_bytes"]
        figures["reencrypt: batches"] = final["batches"]
        figures["reencrypt: bytes it wrote per second (MiB/s, journal + in place)"] = round(
            final["bytes_written"] / 1048576 / reencrypt["wall"], 1
        )

        print("re-encryption in place (reencrypt, online) ...", flush=True)
        evict(backing)
        with Mounted(backing, mnt, key) as m:
            cost = Cost(daemon_pid(backing))
            result = cli("reencrypt", m, "--json", "--purge-old")
            online = cost.stop()
        online["written"] = online["daemons_written"]
        final = json.loads(result.stdout.splitlines()[-1])
        assert final["done"] and not final.get("unreadable_blocks"), final
        rows.append((
            "`reencrypt MOUNTPOINT --purge-old`, online: run by the daemon between requests "
            "(names one directory per step; data in 1 MiB journal batches, each written in "
            "its step, its syncs on a thread); CPU: the daemon and the CLI; written: the "
            "daemon",
            online, load_avg(),
        ))
        figures["reencrypt online: batches"] = final.get("batches")
        # the pass's own count beside the kernel's (pages dirtied again count each time)
        figures["reencrypt online: bytes written (its count: journal + in place)"] = (
            final.get("bytes_written")
        )
        figures["reencrypt online: daemon write_bytes (the kernel's count)"] = online["written"]

        print("re-encryption by copy ...", flush=True)
        backing2, key2, mnt2 = work / "copy.backing", work / "copy.key", work / "mnt2"
        cli("init", backing2, "--keyfile", key2)
        evict(backing)
        with Mounted(backing, mnt, key) as src, Mounted(backing2, mnt2, key2) as dst:
            cost = Cost(daemon_pid(backing), daemon_pid(backing2))
            subprocess.run(["cp", "-a", f"{src}/.", str(dst)], check=True)
            os.sync()
            copy = cost.stop()
        # cp writes into the FUSE mount: its pages reach no disk (the daemons write the
        # backing files), so its own write_bytes would count the same data twice.
        copy["written"] = copy["daemons_written"]
        figures["cp -a: cp's own write_bytes (into the FUSE mount, not a disk)"] = (
            copy["children_written"]
        )
        rows.append((
            "`cp -a` from the mount into a fresh volume's mount; CPU: cp and both daemons; "
            "written: the daemons",
            copy, load_avg(),
        ))
        figures["re-encrypt by cp -a (s)"] = round(copy["wall"], 2)
        figures["re-encrypt by cp -a time / online pass time"] = round(copy["wall"] / online_s, 1)
        figures["reencrypt time / cp -a time"] = round(reencrypt["wall"] / copy["wall"], 2)
        figures["reencrypt online time / cp -a time"] = round(online["wall"] / copy["wall"], 2)

        with Mounted(backing, mnt, key) as m:
            figures["files that differ after purge"] = verify(m, digests)
    finally:
        for point in (work / "mnt", work / "mnt2"):
            subprocess.run(["fusermount3", "-u", "-z", str(point)], check=False,
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    mib = plain_total / (1 << 20)
    lines = [
        f"# encfs-gw rotation benchmark, {stamp}",
        "",
        f"Machine: {os.cpu_count()} CPUs; load average (1, 5, 15 min) {load_at_start} at "
        f"the start, {load_avg()} at the end (other jobs may share the machine).",
        "Targets (issue 5): the pass changes < 3 % of the volume's bytes and takes < 1/20 of "
        "the time of re-encrypting the same data. Issue 22: re-encrypting in place takes "
        "less time than copying the data into a fresh volume.",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in figures.items()),
        "",
        f"Re-encryption of the same {mib:.0f} MiB of file data (cold cache). CPU: user+sys "
        "seconds of the processes named; bytes written: their write_bytes (the kernel's "
        "count of page cache they dirtied, bound for the backing device; see the module "
        "docstring), not the shared disk's count.",
        "",
        "| re-encryption | wall (s) | MiB/s | CPU (s) | bytes written | written / data | "
        "load avg (1, 5, 15 min) after |",
        "|---|---|---|---|---|---|---|",
        *(f"| {label} | {row['wall']:.1f} | {mib / row['wall']:.1f} | {row['cpu']:.1f} | "
          f"{row['written']:,} | {row['written'] / plain_total:.2f} | {load} |"
          for label, row, load in rows),
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
