"""What a conversion reports: its progress (files and bytes done, rate, ETA), the census
of the finished volume counted in its backing tree, and the one-line description of a plan."""

from __future__ import annotations

import os
import stat
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from encfs.convert.tree import open_dir
from encfs.format import names as fnames
from encfs.format.blocks import Layout


@dataclass
class Progress:
    """Files and bytes done of the plan's totals, and the rate and ETA they give."""

    files_total: int
    bytes_total: int
    files_done: int = 0
    bytes_done: int = 0
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict:
        elapsed = time.monotonic() - self.started
        rate = self.bytes_done / elapsed if elapsed > 0 else 0.0
        eta = None
        if self.bytes_total and self.bytes_done:
            eta = elapsed * (self.bytes_total - self.bytes_done) / self.bytes_done
        elif self.files_total and self.files_done:
            eta = elapsed * (self.files_total - self.files_done) / self.files_done
        return {
            "files_done": self.files_done,
            "files_total": self.files_total,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "elapsed": round(elapsed, 3),
            "rate_mib_s": round(rate / 1048576, 2),
            "eta": None if eta is None else round(eta, 1),
        }


def census(root_fd: int, layout: Layout) -> dict:
    """What the volume holds, counted in the backing tree (no name decrypted, no data
    read; directories opened with O_NOATIME, so the times just set stay)."""
    counts: Counter[str] = Counter()
    seen: set[int] = set()
    pending = [open_dir(".", root_fd)]
    try:
        while pending:
            fd = pending.pop()
            try:
                for name in os.listdir(fd):
                    if fnames.classify(name) == "reserved":
                        continue
                    st = os.lstat(name, dir_fd=fd)
                    if stat.S_ISDIR(st.st_mode):
                        counts["directories"] += 1
                        pending.append(open_dir(name, fd))
                    elif st.st_ino in seen:
                        counts["extra_links"] += 1
                    else:
                        seen.add(st.st_ino)
                        if stat.S_ISREG(st.st_mode):
                            counts["files"] += 1
                            counts["bytes"] += layout.plain_size(st.st_size)
                        elif stat.S_ISLNK(st.st_mode):
                            counts["symlinks"] += 1
                        else:
                            counts["specials"] += 1
            finally:
                os.close(fd)
    finally:
        for fd in pending:
            os.close(fd)
    return {
        key: counts[key]
        for key in ("files", "bytes", "directories", "symlinks", "specials", "extra_links")
    }


def describe_plan(stats: dict[str, Any]) -> str:
    return (
        f"{stats['files']} files and {stats['directories']} directories, "
        f"{stats['bytes'] / 1048576:.1f} MiB; extra space needed "
        f"{stats['space_needed'] / 1048576:.1f} MiB of {stats['free'] / 1048576:.1f} MiB free"
    )
