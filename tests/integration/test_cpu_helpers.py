"""The CPU warmer and the busy-poll in a real daemon: on or off by mode and machine,
what `status` says about them, and the deferred closer: bounded under other load, and
not used while they spin.

The facts here are real: the daemon's affinity (set with sched_setaffinity), a cgroup
with a CPU quota made by the test (skipped where /sys/fs/cgroup cannot be written).
Battery and idle-governor facts cannot be made on this machine; the decision on them
is tested with injected facts in tests/unit/test_cpu_policy.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from encfs.fuse.accel.cpu_policy import MIN_CPUS
from tests.helpers.cgroups import cpu_quota_cgroup
from tests.helpers.mount import Volume, daemon_pid, init_volume, run_cli, unmount
from tests.helpers.request_loop import accelerated_only, spinners

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs"),
]
DEADLINE = 30.0


@contextlib.contextmanager
def mounted(
    volume: Volume, mnt: Path, *options: str, preexec: Callable[[], None] | None = None
) -> Iterator[int]:
    """Mounted with `options`, `preexec` run in the mount command before it starts (the
    daemon inherits what it sets); yields the daemon's pid."""
    mnt.mkdir(exist_ok=True)
    argv = ["mount", volume.backing, mnt, "--keyfile", volume.keyfile]
    for option in options:
        argv += ["-o", option]
    try:
        run_cli(*argv, check=True, preexec_fn=preexec)
        pid = daemon_pid(volume.backing)
        assert pid is not None
        yield pid
    finally:
        unmount(volume, mnt)


def status(mnt: Path) -> dict:
    result = run_cli("status", mnt, "--json", check=True)
    return json.loads(result.stdout)["cpu"]


def status_lines(mnt: Path) -> list[str]:
    result = run_cli("status", mnt, check=True)
    return [line for line in result.stdout.splitlines() if line.startswith(("CPU w", "busy"))]


def small_requests(path: Path, count: int = 2000) -> None:
    """Requests in quick succession: getxattr is never cached by the kernel."""
    for _ in range(count):
        with contextlib.suppress(OSError):
            os.getxattr(path, "user.none")


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"


def two_cpus() -> set[int]:
    return set(sorted(os.sched_getaffinity(0))[:2])


@accelerated_only
def test_auto_decides_from_the_daemons_affinity(tmp_path):
    """Started on two CPUs (fewer than 3): both off, and status says why; the daemon
    pinned to one CPU while mounted: the next status says that."""
    volume = init_volume(tmp_path)
    cpus = two_cpus()
    with mounted(volume, tmp_path / "mnt", preexec=lambda: os.sched_setaffinity(0, cpus)) as pid:
        (tmp_path / "mnt" / "f").write_bytes(b"x")
        small_requests(tmp_path / "mnt" / "f")
        cpu = status(tmp_path / "mnt")
        assert cpu["machine"]["cpus"] == 2
        for helper in ("cpu_warmer", "busy_poll"):
            assert cpu[helper]["mode"] == "auto" and cpu[helper]["on"] is False
            assert "2 CPUs available to the daemon (fewer than 3)" in cpu[helper]["reason"]
            assert cpu[helper]["cpu_seconds"] == 0.0  # requests came, nothing spun
        assert spinners(pid) == []
        assert status_lines(tmp_path / "mnt") == [
            f"CPU warmer: off ({cpu['cpu_warmer']['reason']}); 0.000 CPU s",
            f"busy-poll: off ({cpu['busy_poll']['reason']}); 0.000 CPU s",
        ]
        os.sched_setaffinity(pid, {min(cpus)})  # the request loop's thread
        cpu = status(tmp_path / "mnt")
        assert cpu["machine"]["cpus"] == 1
        assert "1 CPU available to the daemon" in cpu["busy_poll"]["reason"]


@accelerated_only
def test_a_cpu_quota_turns_them_off_while_mounted(tmp_path):
    """The daemon moved into a cgroup with a CPU quota: both helpers off (a spinner that
    ran stops), the quota named in the reason."""
    volume = init_volume(tmp_path)
    with cpu_quota_cgroup(quota_us=50_000, period_us=100_000) as cgroup, mounted(
        volume, tmp_path / "mnt"
    ) as pid:
        before = status(tmp_path / "mnt")
        assert before["machine"]["cpu_quota"] is None
        expected_on = len(os.sched_getaffinity(pid)) >= MIN_CPUS and not any(
            before["machine"][fact] for fact in ("on_battery", "idle_polls")
        )
        assert before["cpu_warmer"]["on"] is expected_on
        cgroup.add(pid)
        after = status(tmp_path / "mnt")
        quota = f"under a CPU quota of 0.50 CPUs ({cgroup.shown} in {cgroup.path})"
        assert after["machine"]["cpu_quota"] == quota
        for helper in ("cpu_warmer", "busy_poll"):
            assert after[helper]["on"] is False and quota in after[helper]["reason"]
        assert after["cpu_warmer"]["running"] is False
        assert spinners(pid) == []


@accelerated_only
def test_forced_on_they_spin_and_their_cpu_time_is_counted(tmp_path):
    volume = init_volume(tmp_path)
    cpus = two_cpus()
    options = ("cpu_warmer=on,busy_poll=on",)
    with mounted(
        volume, tmp_path / "mnt", *options, preexec=lambda: os.sched_setaffinity(0, cpus)
    ) as pid:
        (spinner,) = spinners(pid)
        until(lambda: os.sched_getscheduler(spinner) == os.SCHED_IDLE, "SCHED_IDLE")
        (tmp_path / "mnt" / "f").write_bytes(b"x")

        def both_counted() -> bool:
            small_requests(tmp_path / "mnt" / "f")
            cpu = status(tmp_path / "mnt")
            return cpu["cpu_warmer"]["cpu_seconds"] > 0 and cpu["busy_poll"]["cpu_seconds"] > 0

        until(both_counted, "CPU seconds counted for both")
        cpu = status(tmp_path / "mnt")
        assert cpu["cpu_warmer"] | {"cpu_seconds": 0} == {
            "on": True, "mode": "on", "reason": "-o cpu_warmer=on", "running": True,
            "starts": 1, "cpu_seconds": 0,
        }
        assert cpu["busy_poll"]["on"] is True and cpu["busy_poll"]["reason"] == "-o busy_poll=on"
        warmer_line, busy_line = status_lines(tmp_path / "mnt")
        assert warmer_line.startswith("CPU warmer: on (-o cpu_warmer=on); ")
        assert busy_line.startswith("busy-poll: on (-o busy_poll=on); ")
        assert float(warmer_line.split("; ")[1].split()[0]) > 0
    assert not os.path.exists(f"/proc/{spinner}")


@accelerated_only
def test_forced_off_nothing_spins(tmp_path):
    volume = init_volume(tmp_path)
    with mounted(volume, tmp_path / "mnt", "no_cpu_warmer,busy_poll=off") as pid:
        (tmp_path / "mnt" / "f").write_bytes(b"x")
        small_requests(tmp_path / "mnt" / "f")
        cpu = status(tmp_path / "mnt")
        assert cpu["cpu_warmer"]["reason"] == "-o cpu_warmer=off"
        assert cpu["busy_poll"]["reason"] == "-o busy_poll=off"
        assert cpu["cpu_warmer"]["cpu_seconds"] == cpu["busy_poll"]["cpu_seconds"] == 0.0
        assert spinners(pid) == []


# --- the deferred closer beside the warmer ------------------------------------------------

NOFILE = 1024  # the daemon's limit here: the closer may hold 1024 // 16 = 64 closes
PENDING_BOUND = 64
FILES_PER_ROUND = 100
ROUNDS = 10


def closer_thread(daemon: int) -> int:
    """The deferred closer: the daemon's one thread named encfs-closer."""
    named = []
    for tid in os.listdir(f"/proc/{daemon}/task"):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{daemon}/task/{tid}/comm").read_text().strip() == "encfs-closer":
                named.append(int(tid))
    assert len(named) == 1, named
    return named[0]


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def create_and_delete(mnt: Path, pid: int) -> int:
    """ROUNDS directories of FILES_PER_ROUND files made and deleted through the mount;
    the daemon's peak number of open descriptors meanwhile (sampled)."""
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):
                peak[0] = max(peak[0], descriptors(pid))
            done.wait(0.002)  # a sampling interval, not a wait for readiness

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for round_number in range(ROUNDS):
            directory = mnt / f"d{round_number}"
            directory.mkdir()
            for i in range(FILES_PER_ROUND):
                (directory / f"f{i}").write_bytes(b"x" * 100)
            for i in range(FILES_PER_ROUND):
                os.unlink(directory / f"f{i}")
            directory.rmdir()
    finally:
        done.set()
        sampler.join()
    return peak[0]


def low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    os.sched_setaffinity(0, two_cpus())


def test_a_closer_starved_by_other_work_holds_a_bounded_number_of_descriptors(tmp_path):
    """A closer may get little CPU while other work keeps the CPUs busy (at SCHED_IDLE,
    under stress-ng: 17,000-19,000 descriptors). Here its CPU is shared with a busy loop
    pinned beside it, and 1,000 files are created and deleted through the
    mount: the daemon never holds more than the live files, the closer's bound and its
    own few descriptors."""
    volume = init_volume(tmp_path)
    mnt = tmp_path / "mnt"
    with mounted(volume, mnt, "cpu_warmer=off,busy_poll=off", preexec=low_nofile) as pid:
        assert status(mnt)["deferred_closes"] is True
        closer = closer_thread(pid)
        busy_cpu = max(two_cpus())
        os.sched_setaffinity(closer, {busy_cpu})
        hog = subprocess.Popen(
            ["taskset", "-c", str(busy_cpu), sys.executable, "-c", "while True: pass"]
        )
        base = descriptors(pid)
        try:
            peak = create_and_delete(mnt, pid)
        finally:
            hog.kill()
            hog.wait()
        # Live files of a round (and their directory), the queued closes, a little slack
        # for the descriptors of requests in flight.
        limit = base + FILES_PER_ROUND + 1 + PENDING_BOUND + 16
        assert peak <= limit, f"peak {peak} descriptors (base {base}, limit {limit})"


@accelerated_only
def test_while_our_helpers_spin_nothing_waits_for_the_closer(tmp_path):
    """With the warmer and the busy-poll forced on, the closer (SCHED_IDLE, and needing
    the GIL the flat-out request loop holds) fell behind up to its bound with no other
    load at all (3,000 unlinks: 1,048 descriptors at the peak, 71 with both off). While
    a helper is on, closes happen on the request loop's thread: status says so, and the
    daemon holds no more than the live files and its own few descriptors."""
    volume = init_volume(tmp_path)
    mnt = tmp_path / "mnt"
    with mounted(volume, mnt, "cpu_warmer=on,busy_poll=on", preexec=low_nofile) as pid:
        (spinner,) = spinners(pid)
        cpu = status(mnt)
        assert cpu["deferred_closes"] is False
        assert "deferred closes: off (a helper spins: closed by the request loop)" in (
            run_cli("status", mnt, check=True).stdout.splitlines()
        )
        base = descriptors(pid)
        peak = create_and_delete(mnt, pid)
        assert spinners(pid) == [spinner]  # it ran all along
        limit = base + FILES_PER_ROUND + 1 + 16  # no queued closes: slack for requests
        assert peak <= limit, f"peak {peak} descriptors (base {base}, limit {limit})"
    with mounted(volume, mnt, "cpu_warmer=off,busy_poll=off") as pid:
        assert status(mnt)["deferred_closes"] is True
