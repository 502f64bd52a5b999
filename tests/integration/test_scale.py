"""Issue 23's scale test (slow: `-m slow`): a large tree with a descriptor limit of 4,096.

A tree of ENCFS_GW_SCALE_ENTRIES entries (default 1,000,000), one directory holding a
fifth of them and the rest in directories of 1,000, is created through the mount with
the daemon's descriptor limit at 4,096. Then a remount, `ls -lR`, `find`, `du -s`, a
remount and `rm -rf`. No step may fail or print an error; the daemon's open descriptors
and RSS are sampled every second and at each step, and its descriptors stay under half
its limit throughout. The timings, the peaks and the RSS growth per entry listed by
`ls -lR` are printed (`-s`) and, with ENCFS_GW_SCALE_REPORT=FILE, written there as JSON
after each step (and every 50,000 entries of the create step).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.mount import daemon_pid, mounted
from tests.helpers.proc import Sampler

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

ENTRIES = int(os.environ.get("ENCFS_GW_SCALE_ENTRIES", "1000000"))
DAEMON_NOFILE = 4096
BOUND = DAEMON_NOFILE // 2
BIG_DIR_SHARE = 5  # the big directory: a fifth of the entries
DIR_ENTRIES = 1000
STEP_TIMEOUT = 4 * 3600


PROGRESS_EVERY = 50_000  # entries between two progress records of the create step


def make_tree(top: Path, entries: int, progress: Callable[[int], None] = lambda _: None) -> int:
    """The tree (files are empty: what is measured is entries); the count made.
    `progress(made)` every PROGRESS_EVERY entries (a long run killed midway keeps them)."""
    made = 0
    big = top / "big"
    big.mkdir(parents=True)
    made += 1
    for index in range(entries // BIG_DIR_SHARE):
        os.close(os.open(big / f"f{index:07d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        made += 1
        if made % PROGRESS_EVERY == 0:
            progress(made)
    group = 0
    while made < entries:
        directory = top / f"d{group:05d}"
        directory.mkdir()
        made += 1
        for index in range(min(DIR_ENTRIES - 1, entries - made)):
            os.close(os.open(directory / f"f{index:04d}", os.O_WRONLY | os.O_CREAT, 0o644))
            made += 1
            if made % PROGRESS_EVERY == 0:
                progress(made)
        group += 1
    return made


def run_quiet(*argv: str | Path) -> str:
    """Run a program; any error output or failure fails the test. Its stdout."""
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, timeout=STEP_TIMEOUT, check=False,
    )
    assert (result.returncode, result.stderr) == (0, b""), result.stderr[-2000:]
    return result.stdout.decode()


def test_large_tree_with_bounded_descriptors(volume, tmp_path):
    timings: dict[str, float] = {}
    samplers: list[Sampler] = []
    report: dict = {"entries": ENTRIES, "daemon_nofile": DAEMON_NOFILE}

    def step(name: str, sampler: Sampler):
        sampler.mark(name)
        return _Timer(name, timings, save)

    def save() -> None:
        """The figures so far (a long run that fails late keeps them)."""
        samples = [s for sampler in samplers for s in sampler.samples]
        report["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
        report["fd_peak"] = max(s.fds for s in samples)
        report["rss_peak_kib"] = max(s.rss_kib for s in samples)
        report["samples"] = len(samples)
        if path := os.environ.get("ENCFS_GW_SCALE_REPORT"):
            Path(path).write_text(json.dumps(
                {**report, "series": [vars(s) for s in samples]}, indent=1))

    try:
        with mounted(volume, tmp_path / "mnt", nofile=DAEMON_NOFILE) as mnt:
            sampler = Sampler(_pid(volume), every=1.0)
            samplers.append(sampler)
            started = time.perf_counter()

            def progress(made: int) -> None:
                report.setdefault("create_progress", []).append(
                    {"entries": made, "s": round(time.perf_counter() - started, 1)})
                save()

            with step("create", sampler):
                made = make_tree(mnt / "tree", ENTRIES, progress)
            sampler.mark("created")
        assert made == ENTRIES

        with mounted(volume, tmp_path / "mnt", nofile=DAEMON_NOFILE) as mnt:
            sampler = Sampler(_pid(volume), every=1.0)
            samplers.append(sampler)
            fresh = sampler.mark("mounted")
            with step("ls -lR", sampler):
                listing = run_quiet("ls", "-lR", mnt / "tree")
            listed = sampler.mark("listed")
            assert listing.count("\n") > ENTRIES
            del listing
            report["rss_growth_per_listed_entry_bytes"] = round(
                (listed.rss_kib - fresh.rss_kib) * 1024 / ENTRIES
            )
            with step("find", sampler):
                found = int(run_quiet("sh", "-c", 'find "$1" | wc -l', "find", mnt / "tree"))
            assert found == ENTRIES + 1
            with step("du -s", sampler):
                run_quiet("du", "-s", mnt / "tree")
            sampler.mark("unmount")
            start = time.perf_counter()
        with mounted(volume, tmp_path / "mnt", nofile=DAEMON_NOFILE) as mnt:
            timings["remount"] = time.perf_counter() - start
            save()
            sampler = Sampler(_pid(volume), every=1.0)
            samplers.append(sampler)
            with step("rm -rf", sampler):
                run_quiet("rm", "-rf", mnt / "tree")
            sampler.mark("removed")
            assert os.listdir(mnt) == []
    finally:
        for sampler in samplers:
            sampler.stop()
    save()
    print(json.dumps(report, indent=1))
    samples = [s for sampler in samplers for s in sampler.samples]
    over = [s for s in samples if s.fds > BOUND]
    assert not over, f"the daemon held more than {BOUND} descriptors: {over[:5]}"


class _Timer:
    def __init__(self, name: str, timings: dict[str, float], save) -> None:
        self.name = name
        self.timings = timings
        self.save = save

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = time.perf_counter() - self.start
        self.save()


def _pid(volume) -> int:
    pid = daemon_pid(volume.backing)
    assert pid is not None
    return pid
