"""Reads and writes of 16 KiB through the engine (no FUSE): the hot path of an open
handle, timed per call. For before/after comparisons of changes to the data path
(issue 23: open files' descriptors in a bounded cache must not slow it down).

    nice -n 19 .venv/bin/python bench/engine_hot_path.py [DIR] [--rounds N]

Prints the best and median of N rounds (µs of this thread's CPU time per call: steadier
than wall time on a shared machine) for sequential and random 16 KiB reads and writes
of a 16 MiB file, with 16 KiB blocks.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from encfs.engine import ROOT_INODE, Volume, create_volume
from encfs.keys.keyfile import KeyfileProvider
from tests.helpers.config import trusted

CHUNK = 16 << 10
FILE_SIZE = 16 << 20
CALLS = FILE_SIZE // CHUNK


def timed(action, offsets: list[int]) -> float:
    start = time.thread_time()
    for offset in offsets:
        action(offset)
    return (time.thread_time() - start) / len(offsets) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", nargs="?", default=None)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        backing = os.path.join(tmp, "backing")
        create_volume(backing, KeyfileProvider({"path": os.path.join(tmp, "key")}), 16384,
                      trusted())
        volume = Volume.unlock(backing, trusted())
        try:
            fh, _ = volume.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, 0, 0)
            data = os.urandom(CHUNK)
            sequential = [k * CHUNK for k in range(CALLS)]
            shuffled = sequential[:]
            random.Random(1).shuffle(shuffled)
            cases = {
                "write seq": (lambda off: volume.write(fh, off, data), sequential),
                "read seq": (lambda off: volume.read(fh, off, CHUNK), sequential),
                "write rand": (lambda off: volume.write(fh, off, data), shuffled),
                "read rand": (lambda off: volume.read(fh, off, CHUNK), shuffled),
            }
            results: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(args.rounds):
                for name, (action, offsets) in cases.items():
                    results[name].append(timed(action, offsets))
            volume.release(fh)
        finally:
            volume.close()
    for name, times in results.items():
        print(f"{name:11s} best {min(times):7.2f} us  median {statistics.median(times):7.2f} us"
              f"  ({CALLS} calls x {args.rounds} rounds)")


if __name__ == "__main__":
    main()
