"""The CPU warmer: an idle-priority spinner that runs only while requests flow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from encfs.fuse.accel import warm
from encfs.fuse.accel.warm import CpuWarmer

DEADLINE = 10.0  # seconds; each wait below ends as soon as its condition holds


def _until(condition) -> bool:
    end = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > end:
            return False
        os.sched_yield()
    return True


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")


def test_spins_at_idle_priority_only_while_requests_come_close_together(monkeypatch):
    now = [time.monotonic_ns()]
    monkeypatch.setattr(warm, "clock", lambda: now[0])
    warmer = CpuWarmer.start(idle_after_ns=5_000_000)
    assert warmer is not None
    pid = warmer.process.pid
    try:
        assert _until(lambda: warmer.asleep)  # no request yet: it goes to sleep
        assert _until(lambda: _state(pid) == "S")  # blocked on the pipe, not spinning
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
        asleep_ticks = _cpu_ticks(pid)
        warmer.touch()  # a first request after a long while: not worth waking it
        now[0] += warm.SHORT_GAP_NS * 2
        warmer.touch()  # requests far apart (large sequential I/O): still asleep
        assert warmer.wakeups == 0 and warmer.asleep
        now[0] = time.monotonic_ns()
        warmer.touch()
        now[0] += warm.SHORT_GAP_NS // 4
        warmer.touch()  # close together: wake it
        assert warmer.wakeups == 1 and not warmer.asleep
        now[0] += warm.SHORT_GAP_NS // 4
        warmer.touch()  # awake already: no second wake-up
        assert warmer.wakeups == 1
        assert _until(lambda: warmer.asleep)  # 5 ms later without requests it sleeps again
        assert _until(lambda: _state(pid) == "S")
        assert warmer.process.poll() is None
        assert _cpu_ticks(pid) - asleep_ticks < 100  # it spun ~5 ms, not a second
    finally:
        warmer.stop()
    assert warmer.process.returncode == 0


def test_dies_with_the_daemon():
    """A killed daemon leaves no spinner behind (PR_SET_PDEATHSIG)."""
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import sys, time
                from encfs.fuse.accel.warm import CpuWarmer
                warmer = CpuWarmer.start()
                print(warmer.process.pid, flush=True)
                sys.stdin.read()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        spinner = int(daemon.stdout.readline())
        assert os.path.exists(f"/proc/{spinner}")
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    # It was the daemon's child: reparented and reaped by init once it exits.
    assert _until(lambda: not os.path.exists(f"/proc/{spinner}") or _state(spinner) == "Z")


def test_spinner_refused_idle_priority_does_not_spin(tmp_path):
    """Where SCHED_IDLE is refused (a seccomp filter, say) it exits at once: spinning at
    normal priority would take CPU from real work."""
    probe = textwrap.dedent(
        f"""
        import os, runpy, sys
        def refuse(*args):
            raise PermissionError(1, "refused")
        os.sched_setscheduler = refuse
        sys.argv = [{warm.SPINNER!r}, "-1", "-1", "1000", str(os.getppid())]
        runpy.run_path({warm.SPINNER!r}, run_name="__main__")
        """
    )
    result = subprocess.run([sys.executable, "-I", "-c", probe], timeout=60, check=False)
    assert result.returncode == warm.REFUSED_SCHED_IDLE


def test_spinner_keeps_off_the_daemons_cpu():
    """The request loop spins on its own CPU: the client's is the one to keep awake."""
    daemon = subprocess.Popen(["taskset", "-c", "0", "sleep", "60"])
    try:
        assert _until(lambda: _state(daemon.pid) == "S")  # it has run, on CPU 0
        probe = textwrap.dedent(
            f"""
            import os, runpy
            spinner = runpy.run_path({warm.SPINNER!r})
            avoid = spinner["AvoidDaemonCpu"]({daemon.pid}, os.sched_getaffinity(0))
            avoid.check(0)
            print(sorted(os.sched_getaffinity(0)))
            """
        )
        result = subprocess.run(
            [sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=60
        )
    finally:
        daemon.kill()
        daemon.wait()
    assert result.returncode == 0, result.stderr
    allowed = sorted(os.sched_getaffinity(0) - {0})
    assert result.stdout.strip() == str(allowed)


@pytest.mark.expected_log(r"WARNING cannot start the CPU warmer", required=True)
@pytest.mark.parametrize("failing", ["memfd_create", "pipe2", "interpreter"])
def test_a_warmer_that_cannot_start_leaves_the_mount_alone(monkeypatch, failing):
    """No spinner (out of descriptors, no interpreter): None, and nothing left open."""
    fds_before = set(os.listdir("/proc/self/fd"))
    if failing == "interpreter":
        monkeypatch.setattr(warm.sys, "executable", "/nonexistent/python")
    else:

        def refuse(*_args):
            raise OSError(24, "Too many open files")

        monkeypatch.setattr(warm.os, failing, refuse)
    assert CpuWarmer.start() is None
    assert set(os.listdir("/proc/self/fd")) == fds_before


def _autogroups_enabled() -> bool:
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


@pytest.mark.skipif(not _autogroups_enabled(), reason="the kernel has no autogroups on")
def test_spinner_yields_to_another_sessions_work():
    """With autogroups each session is a scheduling group, and SCHED_IDLE yields only
    within one: a spinner at autogroup nice 0 took half of a CPU from a busy loop in
    another session. At nice 19 it gets a few percent of it at most."""
    cpus = sorted(os.sched_getaffinity(0))
    ours, theirs = cpus[0], cpus[1]
    warmer = CpuWarmer.start()
    assert warmer is not None
    spinner = warmer.process.pid
    hog = None
    try:
        assert _until(lambda: os.sched_getscheduler(spinner) == os.SCHED_IDLE)

        def autogroup() -> str:
            with open(f"/proc/{spinner}/autogroup") as f:
                return f.read()

        assert _until(lambda: autogroup().endswith("nice 19\n")), autogroup()
        os.sched_setaffinity(0, {ours})  # the "daemon": the spinner keeps off this CPU
        hog = subprocess.Popen(
            ["taskset", "-c", str(theirs), sys.executable, "-c", "while True: pass"],
            start_new_session=True,  # another session, so another autogroup
        )
        assert _until(lambda: _cpu_ticks(hog.pid) > 0)
        spinner_before, hog_before = _cpu_ticks(spinner), _cpu_ticks(hog.pid)
        end = time.monotonic() + 3.0
        while time.monotonic() < end:  # requests close together: keep it spinning
            warmer.touch()
        spinner_used = _cpu_ticks(spinner) - spinner_before
        hog_used = _cpu_ticks(hog.pid) - hog_before
    finally:
        os.sched_setaffinity(0, cpus)
        if hog is not None:
            hog.kill()
            hog.wait()
        warmer.stop()
    assert hog_used > 0
    assert spinner_used <= 0.1 * hog_used, (spinner_used, hog_used)
