"""Whether our busy helpers may spin: the CPU warmer and the request loop's busy-poll.

Both trade a busy core for latency (warm.py, loop.py `SpinWindow`). That pays on the
machines they were measured on (a KVM guest whose idle vCPUs halt at once, with a CPU to
spare) and costs where a busy core is charged for: a laptop on battery, a container
under a CPU quota (the quota is spent), a process pinned to one or two CPUs (the spin
takes the CPU the client or the kernel needs), or where the kernel's idle loop already
polls (the warmer then only burns power). Each helper has a mode, `-o cpu_warmer=` and
`-o busy_poll=`: `on`, `off`, or `auto` (the default), which is on only when none of
those holds for the machine the daemon runs on (`MachineFacts`, read from /proc and
/sys). `CpuHelpers` applies the modes at the mount and again every RECHECK_SECONDS (and
at every `status`), so a laptop unplugged after the mount stops spinning, and reports
the decision, its reason and the CPU seconds each helper has used. While either helper
is on, backing descriptors are closed on the request loop's thread rather than by the
deferred closer, which the spinning would starve (encfs.backing.defer_closes).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import trio

from encfs import backing
from encfs.fuse.accel.loop import ReadyWaiter
from encfs.fuse.accel.warm import CpuWarmer

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
MIN_CPUS = 3  # with fewer, a spinning helper takes a CPU the client or the kernel needs
RECHECK_SECONDS = 10.0  # how often auto mode looks at the machine again
SYS_ROOT = "/sys"
PROC_ROOT = "/proc"


@dataclass(frozen=True)
class MachineFacts:
    """What auto mode decides from; each `str | None` fact is None when it does not hold,
    else says why it holds (shown in `status`)."""

    cpus: int  # CPUs the daemon may run on (its sched affinity)
    on_battery: str | None
    cpu_quota: str | None
    idle_polls: str | None

    def against(self) -> list[str]:
        """Why a helper must not spin here (empty: it may)."""
        reasons = []
        if self.cpus < MIN_CPUS:
            reasons.append(
                f"{self.cpus} CPU{'s' if self.cpus != 1 else ''} available to the daemon "
                f"(fewer than {MIN_CPUS})"
            )
        reasons += [r for r in (self.on_battery, self.cpu_quota, self.idle_polls) if r]
        return reasons

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    on: bool
    mode: str
    reason: str


def decide(name: str, mode: str, facts: MachineFacts) -> Decision:
    """The decision for the helper whose mount option is `name` (cpu_warmer, busy_poll)."""
    if mode not in MODES:
        raise ValueError(f"{name}={mode}: expected one of {', '.join(MODES)}")
    if mode != "auto":
        return Decision(mode == "on", mode, f"-o {name}={mode}")
    against = facts.against()
    if against:
        return Decision(False, mode, "auto: " + "; ".join(against))
    return Decision(
        True,
        mode,
        f"auto: {facts.cpus} CPUs, no CPU quota, not on battery, idle CPUs halt without polling",
    )


# --- the facts ------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def on_battery(sys_root: str = SYS_ROOT) -> str | None:
    """Why the machine runs on battery, or None (mains power, or no system battery).

    A battery of the system (not a device's: a mouse's battery has scope Device) that is
    discharging, or system batteries while every external supply that reports its state
    is offline.
    """
    root = os.path.join(sys_root, "class", "power_supply")
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return None
    batteries: list[tuple[str, str | None]] = []
    external_seen = external_online = False
    for name in names:
        supply = os.path.join(root, name)
        if _read(os.path.join(supply, "scope")) == "Device":
            continue
        kind = _read(os.path.join(supply, "type"))
        if kind == "Battery":
            if _read(os.path.join(supply, "present")) != "0":
                batteries.append((name, _read(os.path.join(supply, "status"))))
        elif (online := _read(os.path.join(supply, "online"))) is not None:
            external_seen = True
            external_online |= online not in ("", "0")
    if not batteries:
        return None
    for name, status in batteries:
        if status == "Discharging":
            return f"on battery ({name} discharging)"
    if external_seen and not external_online:
        return f"on battery (no external power supply online; {batteries[0][0]})"
    return None


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash are octal escapes."""
    return field.encode().decode("unicode_escape")


def _cgroup_dirs(proc_root: str) -> list[tuple[str, str, str]]:
    """(version, mount point, directory) of this process's cgroup in each hierarchy that
    can limit CPU: the cgroup2 one, and cgroup1's `cpu` controller."""
    own: dict[str, str] = {}  # "v2" or "cpu" -> the cgroup's path in that hierarchy
    for line in (_read(os.path.join(proc_root, "self", "cgroup")) or "").splitlines():
        number, controllers, path = [*line.split(":", 2), "", ""][:3]
        if number == "0" and controllers == "":
            own["v2"] = path
        elif "cpu" in controllers.split(","):
            own["cpu"] = path
    found = []
    for line in (_read(os.path.join(proc_root, "self", "mountinfo")) or "").splitlines():
        fields = line.split()
        after = line.split(" - ", 1)[1].split() if " - " in line else []
        if len(fields) < 5 or len(after) < 3:
            continue
        fstype, super_options = after[0], after[2].split(",")
        if fstype == "cgroup2":
            version = "v2"
        elif fstype == "cgroup" and "cpu" in super_options:
            version = "cpu"
        else:
            continue
        if version not in own:
            continue
        mount_root, mount_point = _unescape(fields[3]), _unescape(fields[4])
        path = own[version]
        if mount_root != "/":
            if path != mount_root and not path.startswith(mount_root.rstrip("/") + "/"):
                continue  # our cgroup is not in this mount's part of the hierarchy
            path = path[len(mount_root):]
        directory = os.path.normpath(os.path.join(mount_point, path.lstrip("/")))
        found.append((version, mount_point, directory))
        own.pop(version)
    return found


def _quota_of(version: str, directory: str) -> str | None:
    if version == "v2":
        limit = (_read(os.path.join(directory, "cpu.max")) or "max").split()
        quota, period = limit[0], (limit[1:] or ["100000"])[0]
        shown = f"cpu.max {quota} {period}"
    else:
        quota = _read(os.path.join(directory, "cpu.cfs_quota_us")) or "-1"
        period = _read(os.path.join(directory, "cpu.cfs_period_us")) or "100000"
        shown = f"cpu.cfs_quota_us {quota}, cpu.cfs_period_us {period}"
    try:
        cpus = int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None  # "max", or unreadable
    if cpus <= 0:
        return None  # cgroup1's -1: no quota
    return f"under a CPU quota of {cpus:.2f} CPUs ({shown} in {directory})"


def cpu_quota(proc_root: str = PROC_ROOT) -> str | None:
    """The nearest CPU quota on our cgroup or one above it (cgroup2 `cpu.max`, cgroup1
    `cpu.cfs_quota_us`), or None. A parent's quota limits its children too."""
    for version, mount_point, directory in _cgroup_dirs(proc_root):
        while True:
            if (found := _quota_of(version, directory)) is not None:
                return found
            if directory == mount_point or not directory.startswith(mount_point):
                break
            directory = os.path.dirname(directory)
    return None


def idle_polls(
    sys_root: str = SYS_ROOT, proc_root: str = PROC_ROOT, cpus: set[int] | None = None
) -> str | None:
    """Why an idle CPU here polls before it halts (so the warmer would only burn power),
    or None: `idle=poll`; the haltpoll governor with guest_halt_poll_ns > 0; another
    governor (menu, teo, ladder) over a cpuidle driver with an enabled POLL state."""
    if "idle=poll" in (_read(os.path.join(proc_root, "cmdline")) or "").split():
        return "idle CPUs poll (kernel command line idle=poll)"
    cpuidle = os.path.join(sys_root, "devices", "system", "cpu", "cpuidle")
    driver = _read(os.path.join(cpuidle, "current_driver"))
    governor = _read(os.path.join(cpuidle, "current_governor")) or _read(
        os.path.join(cpuidle, "current_governor_ro")
    )
    if driver in (None, "", "none"):
        return None  # no cpuidle driver: the idle loop halts at once
    if governor == "haltpoll":
        knob = os.path.join(sys_root, "module", "haltpoll", "parameters", "guest_halt_poll_ns")
        text = _read(knob)
        if text is None:
            return "idle CPUs poll before halting (cpuidle governor haltpoll)"
        with contextlib.suppress(ValueError):
            if int(text) <= 0:
                return None
        return f"idle CPUs poll before halting (cpuidle haltpoll, guest_halt_poll_ns={text})"
    for cpu in sorted(cpus if cpus is not None else os.sched_getaffinity(0)):
        states = os.path.join(sys_root, "devices", "system", "cpu", f"cpu{cpu}", "cpuidle")
        with contextlib.suppress(OSError):
            for state in sorted(os.listdir(states)):
                here = os.path.join(states, state)
                if _read(os.path.join(here, "name")) == "POLL" and _read(
                    os.path.join(here, "disable")
                ) in ("0", None):
                    return (
                        f"idle CPUs poll before halting (cpuidle {driver}, state POLL, "
                        f"governor {governor})"
                    )
    return None


def read_facts(sys_root: str = SYS_ROOT, proc_root: str = PROC_ROOT) -> MachineFacts:
    """The facts of the machine for the calling thread (the daemon's request loop)."""
    cpus = os.sched_getaffinity(0)
    return MachineFacts(
        cpus=len(cpus),
        on_battery=on_battery(sys_root),
        cpu_quota=cpu_quota(proc_root),
        idle_polls=idle_polls(sys_root, proc_root, cpus),
    )


# --- the helpers, switched ----------------------------------------------------------------


class CpuHelpers:
    """The warmer and the request loop's busy-poll, on or off by mode and machine.

    `apply()` reads the facts, starts or stops the warmer and sets the waiter's
    busy-poll; `run()` repeats it every RECHECK_SECONDS while a mode is auto; `report()`
    is what `status` shows. CPU seconds: the spinner's own (every spinner this mount
    started, read from /proc), and the wall time of the request loop's spins (the
    thread runs throughout a spin).
    """

    def __init__(
        self,
        waiter: ReadyWaiter,
        warmer_mode: str = "auto",
        busy_poll_mode: str = "auto",
        facts: Callable[[], MachineFacts] = read_facts,
        start_warmer: Callable[[], CpuWarmer | None] = CpuWarmer.start,
    ) -> None:
        for name, mode in (("cpu_warmer", warmer_mode), ("busy_poll", busy_poll_mode)):
            if mode not in MODES:
                raise ValueError(f"{name}={mode}: expected one of {', '.join(MODES)}")
        self.waiter = waiter
        self.warmer_mode = warmer_mode
        self.busy_poll_mode = busy_poll_mode
        self._facts = facts
        self._start_warmer = start_warmer
        self.warmer: CpuWarmer | None = None
        self._warmer_cpu_done = 0.0  # CPU seconds of the spinners already stopped
        self.warmer_starts = 0
        self.facts: MachineFacts | None = None
        self.warmer_decision: Decision | None = None
        self.busy_poll_decision: Decision | None = None

    @property
    def automatic(self) -> bool:
        return "auto" in (self.warmer_mode, self.busy_poll_mode)

    def apply(self) -> None:
        """Decide from the machine as it is now, and switch the helpers accordingly."""
        try:
            facts = self._facts()
        except OSError as exc:  # (sched_getaffinity cannot fail for ourselves; be safe)
            log.warning("cannot read the machine's CPU facts: %s", exc)
            facts = MachineFacts(1, None, None, f"facts unreadable ({exc})")
        self.facts = facts
        warmer = decide("cpu_warmer", self.warmer_mode, facts)
        busy_poll = decide("busy_poll", self.busy_poll_mode, facts)
        for name, old, new in (
            ("CPU warmer", self.warmer_decision, warmer),
            ("busy-poll", self.busy_poll_decision, busy_poll),
        ):
            if old is None or old.on != new.on:
                log.info("%s %s (%s)", name, "on" if new.on else "off", new.reason)
        self.warmer_decision, self.busy_poll_decision = warmer, busy_poll
        self.waiter.busy_poll = busy_poll.on
        if warmer.on and self.warmer is None:
            self.warmer = self._start_warmer()
            if self.warmer is not None:
                self.warmer_starts += 1
                self.waiter.warmer = self.warmer
        elif not warmer.on and self.warmer is not None:
            self._stop_warmer()
        # While anything of ours spins, the deferred closer would be starved by it: close
        # on the request loop's thread instead (encfs.backing.DeferredCloser).
        backing.defer_closes(not self.spinning)

    @property
    def spinning(self) -> bool:
        """Whether a helper of ours may spin now (the warmer runs or the busy-poll is on)."""
        return self.waiter.busy_poll or self.warmer is not None

    def _stop_warmer(self) -> None:
        warmer, self.warmer = self.warmer, None
        if warmer is None:
            return
        self.waiter.warmer = None
        warmer.stop()
        self._warmer_cpu_done += warmer.cpu_seconds

    def apply_safely(self) -> None:
        """apply(), logging instead of raising: a surprise in /proc or /sys must not take
        the daemon down (the helpers then stay as they were)."""
        try:
            self.apply()
        except Exception:
            log.exception("cannot switch the CPU warmer and the busy-poll")

    async def run(self) -> None:
        """Look at the machine again every RECHECK_SECONDS (auto modes only)."""
        if not self.automatic:
            return
        while True:
            await trio.sleep(RECHECK_SECONDS)
            self.apply_safely()

    def stop(self) -> None:
        self._stop_warmer()
        backing.defer_closes(True)

    @property
    def warmer_cpu_seconds(self) -> float:
        live = self.warmer.cpu_seconds if self.warmer is not None else 0.0
        return self._warmer_cpu_done + live

    def status(self) -> dict[str, Any]:
        """The report after a fresh look at the machine (what `status` asks for)."""
        self.apply_safely()
        return self.report()

    def report(self) -> dict[str, Any]:
        """For `status`: each helper's decision, whether it runs, and its CPU seconds."""
        warmer, busy_poll = self.warmer_decision, self.busy_poll_decision
        assert warmer is not None and busy_poll is not None, "apply() first"
        running = self.warmer is not None and self.warmer.running
        return {
            "cpu_warmer": {
                **asdict(warmer),
                "running": running,
                "starts": self.warmer_starts,
                "cpu_seconds": round(self.warmer_cpu_seconds, 3),
            },
            "busy_poll": {
                **asdict(busy_poll),
                "cpu_seconds": round(self.waiter.busy_poll_seconds, 3),
            },
            "deferred_closes": backing.closes_deferred(),
            "machine": self.facts.as_dict() if self.facts is not None else None,
        }
