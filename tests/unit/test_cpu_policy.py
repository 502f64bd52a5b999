"""When the CPU warmer and the busy-poll may spin (encfs/fuse/accel/cpu_policy.py), no mount.

Facts that can be made here are real: this process's affinity, and a cgroup with a CPU
quota made by the test (as root, where /sys/fs/cgroup is writable). A battery and the
idle governors cannot be made on this machine: those tests build the files the kernel
would show (sysfs's power_supply class, cpuidle, the haltpoll module's parameters) in a
directory and point the reader at it, and say so. The daemon's side (status, the
spinner process, the descriptor bound) is tests/integration/test_cpu_helpers.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from encfs import backing
from encfs.fuse.accel import cpu_policy
from encfs.fuse.accel.cpu_policy import CpuHelpers, MachineFacts, decide
from encfs.fuse.accel.loop import ReadyWaiter
from tests.helpers.cgroups import cpu_quota_cgroup

QUIET = MachineFacts(cpus=4, on_battery=None, cpu_quota=None, idle_polls=None)


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


# --- the decision (facts injected) --------------------------------------------------------


def test_auto_spins_only_where_nothing_speaks_against_it():
    assert decide("cpu_warmer", "auto", QUIET).on
    assert "4 CPUs" in decide("cpu_warmer", "auto", QUIET).reason
    for facts, said in [
        (MachineFacts(2, None, None, None), "2 CPUs available to the daemon (fewer than 3)"),
        (MachineFacts(1, None, None, None), "1 CPU available to the daemon"),
        (MachineFacts(8, "on battery (BAT0 discharging)", None, None), "BAT0 discharging"),
        (MachineFacts(8, None, "under a CPU quota of 0.50 CPUs (...)", None), "CPU quota"),
        (MachineFacts(8, None, None, "idle CPUs poll (idle=poll)"), "idle=poll"),
    ]:
        for name in ("cpu_warmer", "busy_poll"):  # the same rules for both
            decision = decide(name, "auto", facts)
            assert not decision.on, facts
            assert decision.reason.startswith("auto: ") and said in decision.reason


def test_every_reason_is_given():
    facts = MachineFacts(2, "on battery (BAT0 discharging)", "under a CPU quota", None)
    reason = decide("busy_poll", "auto", facts).reason
    assert "2 CPUs" in reason and "BAT0" in reason and "CPU quota" in reason


def test_forced_modes_ignore_the_machine():
    bad = MachineFacts(1, "on battery", "under a CPU quota", "idle CPUs poll")
    assert decide("cpu_warmer", "on", bad) == cpu_policy.Decision(True, "on", "-o cpu_warmer=on")
    assert decide("busy_poll", "off", QUIET) == cpu_policy.Decision(
        False, "off", "-o busy_poll=off"
    )
    with pytest.raises(ValueError):
        decide("busy_poll", "fast", QUIET)


# --- the facts: battery (injected: no battery can be made here) ---------------------------


def power_supplies(tmp_path: Path, supplies: dict[str, dict[str, str]]) -> str:
    files = {
        f"class/power_supply/{name}/{key}": value
        for name, attributes in supplies.items()
        for key, value in attributes.items()
    }
    write_tree(tmp_path / "sys", files)
    return str(tmp_path / "sys")


@pytest.mark.parametrize(
    ("supplies", "expected"),
    [
        ({}, None),  # a server or a VM: no power supply at all
        ({"AC": {"type": "Mains", "online": "1"}}, None),
        (
            {"AC": {"type": "Mains", "online": "1"},
             "BAT0": {"type": "Battery", "status": "Charging", "present": "1"}},
            None,
        ),
        (
            {"AC": {"type": "Mains", "online": "0"},
             "BAT0": {"type": "Battery", "status": "Discharging", "present": "1"}},
            "on battery (BAT0 discharging)",
        ),
        (  # some firmware says "Not charging" or "Unknown" on battery: the adapter tells
            {"ADP1": {"type": "Mains", "online": "0"},
             "BAT1": {"type": "Battery", "status": "Unknown"}},
            "on battery (no external power supply online; BAT1)",
        ),
        (  # a USB-C port with nothing plugged in, while the adapter is online
            {"AC": {"type": "Mains", "online": "1"},
             "ucsi-source-psy-USBC000:001": {"type": "USB", "online": "0"},
             "BAT0": {"type": "Battery", "status": "Full"}},
            None,
        ),
        (  # a wireless mouse's battery is not the machine's
            {"hidpp_battery_0": {"type": "Battery", "scope": "Device",
                                 "status": "Discharging"}},
            None,
        ),
        (  # an empty battery bay
            {"BAT0": {"type": "Battery", "present": "0", "status": "Discharging"}},
            None,
        ),
    ],
)
def test_on_battery_from_the_power_supply_class(tmp_path, supplies, expected):
    """Injected: sysfs's power_supply files as a laptop shows them, in a directory."""
    assert cpu_policy.on_battery(power_supplies(tmp_path, supplies)) == expected


# --- the facts: idle governors (injected: this VM's cpuidle cannot be changed) -------------


def cpuidle(tmp_path: Path, driver: str, governor: str, **extra: str) -> str:
    files = {
        "devices/system/cpu/cpuidle/current_driver": driver,
        "devices/system/cpu/cpuidle/current_governor": governor,
        **extra,
    }
    write_tree(tmp_path / "sys", files)
    return str(tmp_path / "sys")


def test_haltpoll_polls_only_with_a_poll_window(tmp_path):
    """Injected: a KVM guest's cpuidle-haltpoll files."""
    knob = "module/haltpoll/parameters/guest_halt_poll_ns"
    proc = str(write_tree(tmp_path / "proc", {"cmdline": "console=ttyS0"}))
    sys_root = cpuidle(tmp_path, "haltpoll", "haltpoll", **{knob: "0"})
    assert cpu_policy.idle_polls(sys_root, proc, {0}) is None  # halts at once: warm it
    sys_root = cpuidle(tmp_path, "haltpoll", "haltpoll", **{knob: "200000"})
    assert cpu_policy.idle_polls(sys_root, proc, {0}) == (
        "idle CPUs poll before halting (cpuidle haltpoll, guest_halt_poll_ns=200000)"
    )


def test_a_governor_over_a_poll_state_polls(tmp_path):
    """Injected: bare metal x86 (intel_idle, state0 POLL) under the menu governor."""
    proc = str(write_tree(tmp_path / "proc", {"cmdline": "quiet"}))
    states = {
        "devices/system/cpu/cpu0/cpuidle/state0/name": "POLL",
        "devices/system/cpu/cpu0/cpuidle/state0/disable": "0",
        "devices/system/cpu/cpu0/cpuidle/state1/name": "C1",
        "devices/system/cpu/cpu0/cpuidle/state1/disable": "0",
    }
    sys_root = cpuidle(tmp_path, "intel_idle", "menu", **states)
    assert "state POLL, governor menu" in cpu_policy.idle_polls(sys_root, proc, {0})
    (tmp_path / "sys/devices/system/cpu/cpu0/cpuidle/state0/disable").write_text("1\n")
    assert cpu_policy.idle_polls(sys_root, proc, {0}) is None  # POLL switched off


def test_no_cpuidle_driver_halts_and_idle_poll_polls(tmp_path):
    """Injected cmdline; the driver "none" is also this VM's real state."""
    sys_root = cpuidle(tmp_path, "none", "menu")
    quiet = str(write_tree(tmp_path / "p1", {"cmdline": "quiet"}))
    assert cpu_policy.idle_polls(sys_root, quiet, {0}) is None
    polling = str(write_tree(tmp_path / "p2", {"cmdline": "quiet idle=poll"}))
    assert cpu_policy.idle_polls(sys_root, polling, {0}) == (
        "idle CPUs poll (kernel command line idle=poll)"
    )


# --- the facts: this machine (real) -------------------------------------------------------


def test_the_real_facts_of_this_process():
    facts = cpu_policy.read_facts()
    assert facts.cpus == len(os.sched_getaffinity(0))
    for fact in (facts.on_battery, facts.cpu_quota, facts.idle_polls):
        assert fact is None or isinstance(fact, str)


def _facts_in_child(*prefix: str) -> MachineFacts:
    probe = "from encfs.fuse.accel import cpu_policy; print(repr(cpu_policy.read_facts()))"
    result = subprocess.run(
        [*prefix, sys.executable, "-c", probe],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return eval(result.stdout, {"MachineFacts": MachineFacts})  # our own repr


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_real_affinity_is_counted():
    """taskset pins the probe to one CPU: auto turns both helpers off."""
    cpu = min(os.sched_getaffinity(0))
    facts = _facts_in_child("taskset", "-c", str(cpu))
    assert facts.cpus == 1
    assert "1 CPU available to the daemon" in decide("cpu_warmer", "auto", facts).reason


def test_a_real_cgroup_quota_is_found():
    """A cgroup with a CPU quota made here (cgroup2 cpu.max, or cgroup1's cpu
    controller); the probe runs in it."""
    with cpu_quota_cgroup(quota_us=50_000, period_us=100_000) as cgroup:
        facts = _facts_in_child(*cgroup.run_in)
    assert facts.cpu_quota is not None
    assert f"0.50 CPUs ({cgroup.shown} in {cgroup.path})" in facts.cpu_quota
    assert not decide("busy_poll", "auto", facts).on


def test_a_parents_quota_limits_its_children(tmp_path):
    """Injected: a cgroup2 hierarchy with the cpu controller (this host's cgroup2 has
    none), where the quota sits on a parent of the process's cgroup."""
    cgroups = tmp_path / "cg"
    write_tree(cgroups, {
        "cgroup.procs": "", "a/cgroup.procs": "", "a/b/cgroup.procs": "",
        "a/cpu.max": "150000 100000", "a/b/cpu.max": "max 100000",
    })
    mount_point = str(cgroups).replace(" ", "\\040")
    proc = write_tree(tmp_path / "proc", {
        "self/cgroup": "0::/a/b",
        "self/mountinfo": f"41 31 0:38 / {mount_point} rw,relatime - cgroup2 cgroup2 rw",
    })
    assert cpu_policy.cpu_quota(str(proc)) == (
        f"under a CPU quota of 1.50 CPUs (cpu.max 150000 100000 in {cgroups}/a)"
    )
    (cgroups / "a/cpu.max").write_text("max 100000\n")
    assert cpu_policy.cpu_quota(str(proc)) is None


# --- switching the helpers (facts injected, the spinner real) -------------------------------


def _until(condition, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.001)  # polling a state with a deadline
    return True


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the spinner needs two CPUs")
def test_helpers_follow_the_machine_as_it_changes():
    """A laptop unplugged while mounted (injected facts): the spinner stops at the next
    look, the busy-poll with it, and the CPU time it used stays counted."""
    facts = [QUIET]
    waiter = ReadyWaiter()
    helpers = CpuHelpers(waiter, "auto", "auto", facts=lambda: facts[0])
    helpers.apply()
    try:
        assert helpers.warmer is not None and helpers.warmer.running
        assert waiter.warmer is helpers.warmer and waiter.busy_poll
        spinner = helpers.warmer.process.pid
        facts[0] = MachineFacts(4, "on battery (BAT0 discharging)", None, None)
        report = helpers.status()  # what `status` does: look again, then report
        assert helpers.warmer is None and waiter.warmer is None and not waiter.busy_poll
        assert not os.path.exists(f"/proc/{spinner}")  # stopped and reaped
        assert report["cpu_warmer"] == {
            "on": False, "mode": "auto", "reason": "auto: on battery (BAT0 discharging)",
            "running": False, "starts": 1, "cpu_seconds": report["cpu_warmer"]["cpu_seconds"],
        }
        assert report["busy_poll"]["on"] is False
        assert report["machine"]["on_battery"] == "on battery (BAT0 discharging)"
        facts[0] = QUIET  # plugged in again
        helpers.apply()
        assert helpers.warmer is not None and helpers.warmer_starts == 2
    finally:
        helpers.stop()
    assert helpers.warmer is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the spinner needs two CPUs")
def test_the_spinners_cpu_time_is_counted_after_it_stops():
    waiter = ReadyWaiter()
    helpers = CpuHelpers(waiter, "on", "off", facts=lambda: QUIET)
    helpers.apply()
    warmer = helpers.warmer
    assert warmer is not None
    # Keep it spinning (requests 50 us apart, as a client's small requests come) until
    # the kernel has charged it CPU time.
    assert _until(lambda: (warmer.touch(), warmer.touch(), warmer.cpu_seconds > 0)[2])
    helpers.stop()
    assert helpers.warmer_cpu_seconds == warmer.cpu_seconds > 0
    assert helpers.report()["cpu_warmer"]["cpu_seconds"] > 0
    assert helpers.report()["busy_poll"] == {
        "on": False, "mode": "off", "reason": "-o busy_poll=off", "cpu_seconds": 0.0,
    }


def test_no_recheck_loop_without_an_auto_mode():
    helpers = CpuHelpers(ReadyWaiter(), "off", "on", facts=lambda: QUIET)
    assert not helpers.automatic
    assert CpuHelpers(ReadyWaiter(), "off", "auto").automatic


def test_auto_looks_at_the_machine_again_every_recheck_interval():
    """run() in trio with a virtual clock: one fresh look per RECHECK_SECONDS."""
    import trio
    import trio.testing

    looks = []

    def facts() -> MachineFacts:
        looks.append(trio.current_time())
        return MachineFacts(1 if len(looks) < 3 else 2, None, None, None)

    helpers = CpuHelpers(ReadyWaiter(), "auto", "auto", facts=facts)

    async def main() -> None:
        with trio.move_on_after(cpu_policy.RECHECK_SECONDS * 3.5):
            await helpers.run()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert looks == [cpu_policy.RECHECK_SECONDS * n for n in (1, 2, 3)]
    assert helpers.facts == MachineFacts(2, None, None, None)
    assert "2 CPUs" in helpers.report()["busy_poll"]["reason"]


@pytest.mark.expected_log(r"ERROR cannot switch the CPU warmer", required=True)
def test_a_surprise_while_looking_again_keeps_the_helpers_as_they_were():
    """An unexpected error reading the machine is logged; status still answers."""
    calls = []

    def facts() -> MachineFacts:
        calls.append(None)
        if len(calls) > 1:
            raise ValueError("a malformed file in /sys")
        return MachineFacts(2, None, None, None)

    helpers = CpuHelpers(ReadyWaiter(), "auto", "off", facts=facts)
    helpers.apply()
    report = helpers.status()
    assert len(calls) == 2
    assert report["cpu_warmer"]["reason"] == "auto: 2 CPUs available to the daemon (fewer than 3)"


@pytest.mark.parametrize(
    ("warmer_mode", "busy_poll_mode", "deferred"),
    [("off", "off", True), ("off", "on", False), ("auto", "auto", True)],
)
def test_closes_are_not_deferred_while_a_helper_spins(warmer_mode, busy_poll_mode, deferred):
    """The deferred closer would be starved by our spinning (encfs.backing): while a
    helper is on, closes happen on the request loop's thread; status says which."""
    facts = MachineFacts(2, None, None, None)  # auto: off
    helpers = CpuHelpers(ReadyWaiter(), warmer_mode, busy_poll_mode, facts=lambda: facts)
    try:
        helpers.apply()
        assert backing.closes_deferred() is deferred
        assert helpers.report()["deferred_closes"] is deferred
    finally:
        helpers.stop()
    assert backing.closes_deferred()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the spinner needs two CPUs")
def test_closes_are_not_deferred_while_the_warmer_runs():
    helpers = CpuHelpers(ReadyWaiter(), "on", "off", facts=lambda: QUIET)
    try:
        helpers.apply()
        assert helpers.warmer is not None and not backing.closes_deferred()
    finally:
        helpers.stop()
    assert backing.closes_deferred()
