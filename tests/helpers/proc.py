"""What a daemon holds, read from /proc: open descriptors and resident memory."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field


def fd_count(pid: int) -> int:
    """Open descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS), KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass
class Sample:
    step: str
    fds: int
    rss_kib: int


@dataclass
class Sampler:
    """Samples a daemon's descriptors and RSS: at every `mark` (deterministic points of a
    test) and, with `every` seconds, from a thread in between (so a peak between two
    marks is seen too). `stop` ends the thread; the samples are kept."""

    pid: int
    every: float | None = None
    samples: list[Sample] = field(default_factory=list)
    step: str = "start"
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        if self.every is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def mark(self, step: str | None = None) -> Sample:
        if step is not None:
            self.step = step
        sample = Sample(self.step, fd_count(self.pid), rss_kib(self.pid))
        self.samples.append(sample)
        return sample

    def _run(self) -> None:
        assert self.every is not None
        while not self._stop.wait(self.every):
            try:
                self.mark()
            except (OSError, AssertionError):
                return  # the daemon is gone (unmounted)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def peak_fds(self, step: str | None = None) -> int:
        return max(s.fds for s in self.samples if step is None or s.step == step)

    def peak_rss_kib(self, step: str | None = None) -> int:
        return max(s.rss_kib for s in self.samples if step is None or s.step == step)
