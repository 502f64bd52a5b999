"""Latency of setxattr/getxattr/listxattr through a mount, per xattr form (a measurement
for issue 23, not part of `make test` or `make bench`). Run as root from the worktree:

    .venv/bin/python scripts/xattr_latency.py [WORKDIR]

Mounts two fresh volumes, one with `xattr-sets` (the default) and one made without it
(one backing xattr per attribute, the form of volumes made before), and prints the
median and 90th percentile of each call in microseconds.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time

from encfs import config_store
from encfs.engine import create_volume
from encfs.format import DEFAULT_FEATURES, FEATURE_XATTR_SETS
from encfs.keys.keyfile import KeyfileProvider
from encfs.keys.registry import open_provider
from encfs.trust import Operator

ROUNDS = 2000


def make_volume(work: str, name: str, sets: bool) -> tuple[str, str]:
    backing, key = os.path.join(work, name), os.path.join(work, name + ".key")
    features = DEFAULT_FEATURES if sets else tuple(
        f for f in DEFAULT_FEATURES if f != FEATURE_XATTR_SETS
    )
    saved = config_store.DEFAULT_FEATURES
    config_store.DEFAULT_FEATURES = features
    try:
        create_volume(
            backing, KeyfileProvider({"path": key}), 16384, Operator(factory=open_provider)
        )
    finally:
        config_store.DEFAULT_FEATURES = saved
    return backing, key


def timed(call, rounds: int = ROUNDS) -> tuple[float, float]:
    samples = []
    for i in range(rounds):
        start = time.perf_counter_ns()
        call(i)
        samples.append((time.perf_counter_ns() - start) / 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.9)]


def workloads(mnt: str) -> dict[str, tuple[float, float]]:
    one, many, empty = (os.path.join(mnt, n) for n in ("one", "many", "empty"))
    for path in (one, many, empty):
        with open(path, "wb") as file:
            file.write(b"x")
    os.setxattr(one, "user.k", b"v" * 16)
    for i in range(20):
        os.setxattr(many, f"user.attribute{i}", b"v" * 32)
    results = {
        "setxattr, 1 attr (16 B)": timed(lambda i: os.setxattr(one, "user.k", b"%16d" % i)),
        "getxattr, 1 attr": timed(lambda i: os.getxattr(one, "user.k")),
        "listxattr, 1 attr": timed(lambda i: os.listxattr(one)),
        "setxattr, 20 attrs (32 B)": timed(
            lambda i: os.setxattr(many, "user.attribute7", b"%32d" % i)
        ),
        "getxattr, 20 attrs": timed(lambda i: os.getxattr(many, "user.attribute7")),
        "listxattr, 20 attrs": timed(lambda i: os.listxattr(many)),
        "setxattr, 3000 B value": timed(lambda i: os.setxattr(one, "user.big", b"%3000d" % i)),
        "getxattr, 3000 B value": timed(lambda i: os.getxattr(one, "user.big")),
    }

    def missing(i: int) -> None:
        with contextlib.suppress(OSError):
            os.getxattr(empty, "user.none")

    results["getxattr, none stored"] = timed(missing)
    try:
        os.setxattr(one, "user.huge", b"v" * 5000)
        results["setxattr, 5000 B value (store)"] = timed(
            lambda i: os.setxattr(one, "user.huge", b"%5000d" % i), 300
        )
        results["getxattr, 5000 B value (store)"] = timed(lambda i: os.getxattr(one, "user.huge"))
    except OSError as exc:
        results[f"5000 B value: {exc.strerror}"] = (0.0, 0.0)
    return results


def main(workdir: str, repetitions: int = 3) -> None:
    work = tempfile.mkdtemp(prefix="xattr-latency-", dir=workdir)
    os.environ["ENCFS_GW_TRUST_DIR"] = os.path.join(work, "trust")
    mounts = {}
    for label, sets in (("per-name (before)", False), ("xattr-sets (after)", True)):
        backing, key = make_volume(work, label.split()[0], sets)
        mounts[label] = backing + ".mnt"
        os.mkdir(mounts[label])
        subprocess.run(
            [sys.executable, "-m", "encfs", "mount", backing, mounts[label], "--keyfile", key],
            check=True,
        )
    runs: dict[str, list[dict[str, tuple[float, float]]]] = {label: [] for label in mounts}
    try:
        for repetition in range(repetitions):  # A B, A B, ...: drift hits both alike
            for label, mnt in mounts.items():
                directory = os.path.join(mnt, str(repetition))
                os.mkdir(directory)
                runs[label].append(workloads(directory))
    finally:
        for mnt in mounts.values():
            subprocess.run([sys.executable, "-m", "encfs", "unmount", mnt], check=True)
    labels = list(mounts)
    print(f"median of {repetitions} runs of {ROUNDS} calls each")
    print(f"{'call':34} " + " ".join(f"{label:>26}" for label in labels))
    for row in runs[labels[-1]][0]:
        cells = []
        for label in labels:
            medians = [run.get(row, (0.0, 0.0))[0] for run in runs[label]]
            p90s = [run.get(row, (0.0, 0.0))[1] for run in runs[label]]
            median, p90 = statistics.median(medians), statistics.median(p90s)
            cells.append(f"{median:10.1f} us (p90 {p90:7.1f})" if median else f"{'-':>26}")
        print(f"{row:34} " + " ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp")
