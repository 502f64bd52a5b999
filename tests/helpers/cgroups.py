"""A real cgroup with a CPU quota, made for a test (root, a writable /sys/fs/cgroup).

cgroup2 with the cpu controller (`cpu.max`) where the host has it, else cgroup1's cpu
controller (`cpu.cfs_quota_us`); the test is skipped where neither can be written.
Processes left in it at the end go back to the hierarchy's root, then it is removed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@dataclass
class QuotaCgroup:
    path: str
    shown: str  # how encfs.fuse.accel.cpu_policy names the limit

    @property
    def run_in(self) -> list[str]:
        """A command prefix that runs the rest of the command in this cgroup."""
        procs = os.path.join(self.path, "cgroup.procs")
        return ["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh"]

    def add(self, pid: int) -> None:
        """Move process `pid` (all its threads) into the cgroup."""
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(pid))


def _cgroup_mounts() -> list[tuple[str, str]]:
    """(fstype, mount point) of the cgroup mounts that can limit CPU."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, after = line.split(" - ")[0].split(), line.split(" - ")[1].split()
            point = fields[4].encode().decode("unicode_escape")
            if after[0] == "cgroup2" or (after[0] == "cgroup" and "cpu" in after[2].split(",")):
                found.append((after[0], point))
    return found


def _make(fstype: str, root: str, name: str, quota_us: int, period_us: int) -> QuotaCgroup:
    path = os.path.join(root, name)
    if fstype == "cgroup2":
        with open(os.path.join(root, "cgroup.controllers")) as f:
            if "cpu" not in f.read().split():
                raise OSError("no cpu controller in this cgroup2 hierarchy")
        with open(os.path.join(root, "cgroup.subtree_control"), "w") as f:
            f.write("+cpu")
        os.mkdir(path)
        with open(os.path.join(path, "cpu.max"), "w") as f:
            f.write(f"{quota_us} {period_us}")
        return QuotaCgroup(path, f"cpu.max {quota_us} {period_us}")
    os.mkdir(path)
    with open(os.path.join(path, "cpu.cfs_period_us"), "w") as f:
        f.write(str(period_us))
    with open(os.path.join(path, "cpu.cfs_quota_us"), "w") as f:
        f.write(str(quota_us))
    return QuotaCgroup(path, f"cpu.cfs_quota_us {quota_us}, cpu.cfs_period_us {period_us}")


@contextlib.contextmanager
def cpu_quota_cgroup(quota_us: int, period_us: int) -> Iterator[QuotaCgroup]:
    name = f"encfs-gw-test-{os.getpid()}-{os.urandom(3).hex()}"
    cgroup = None
    errors = []
    for fstype, root in sorted(_cgroup_mounts(), key=lambda m: m[0] != "cgroup2"):
        try:
            cgroup = _make(fstype, root, name, quota_us, period_us)
            break
        except OSError as exc:
            errors.append(f"{root}: {exc}")
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(root, name))
    if cgroup is None:
        pytest.skip(f"cannot make a cgroup with a CPU quota here ({'; '.join(errors)})")
    try:
        yield cgroup
    finally:
        root = os.path.dirname(cgroup.path)
        with contextlib.suppress(OSError):
            with open(os.path.join(cgroup.path, "cgroup.procs")) as f:
                left = f.read().split()
            for pid in left:
                with contextlib.suppress(OSError), open(
                    os.path.join(root, "cgroup.procs"), "w"
                ) as f:
                    f.write(pid)
        os.rmdir(cgroup.path)
