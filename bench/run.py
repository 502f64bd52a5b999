#!/usr/bin/env python3
"""encfs-gw benchmark (issue 8): native vs gocryptfs vs encfs-gw (default, writeback_cache).

Python stdlib only; run as root (FUSE mounts). `make bench [QUICK=1]`, or
`.venv/bin/python bench/run.py [--quick] [--reps N] [--targets ...] [--workloads ...]`.
bench/README.md describes the workloads and how to read the report.

Targets alternate inside each repetition, their order rotated from one repetition to the
next (A B C, B C A, C A B, ...), so drift on a shared machine and whatever one target
leaves to the next hit all of them alike; each (target, repetition) starts from a fresh
volume on a synced disk (the previous target's deletes written back, not competing with
this target's writes). Mounts and daemons are removed on exit, on errors and on
Ctrl-C/SIGTERM.

Every workload also reports the CPU seconds of each FUSE target's processes: the daemon
and all its helpers (encfs-gw's CPU warmer and unmount guard, fusermount3) or gocryptfs,
measured from a cgroup of their own (cgroup2 cpu.stat), or from /proc where no cgroup2
can be made.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import random
import resource
import select
import shlex
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
ENCFS_GW = REPO / ".venv" / "bin" / "encfs-gw"
PASSWORD = b"encfs-gw-bench-fixed-test-password\n"
SQLITE_SEED = 20261123
CMD_TIMEOUT = 1800  # a hung command fails its workload instead of hanging the run
MOUNT_TIMEOUT = 30
UNMOUNT_WAIT = 120
NA = "-"
WARM_RUNS = 5  # the warm stat and ls rows: median of this many runs
SCALE_NOFILE = 4096  # descriptor limit of the FUSE daemons in the scale workload (issue 23)
SCALE_BIG_DIR = 5  # the scale tree's one big directory holds 1/5 of its entries
SCALE_DIR_ENTRIES = 1000  # the rest: directories of this many files


@dataclass
class Config:
    reps: int
    seq_mib: int
    randrw_mib: int
    randrw_seconds: int
    full_tree: bool  # quick drops __pycache__/ and the 44 MiB config-*/ (1.2k entries left)
    sqlite_rows: int
    sqlite_tx: int
    meta_entries: int
    mount_samples: int  # mount/unmount cycles per (target, repetition)
    scale_entries: int  # the scale tree (one repetition per target, see scale_rep)


FULL = Config(reps=3, seq_mib=1024, randrw_mib=64, randrw_seconds=20, full_tree=True,
              sqlite_rows=20000, sqlite_tx=200, meta_entries=10000, mount_samples=5,
              scale_entries=100_000)
QUICK = Config(reps=1, seq_mib=128, randrw_mib=32, randrw_seconds=4, full_tree=False,
               sqlite_rows=2000, sqlite_tx=20, meta_entries=1000, mount_samples=2,
               scale_entries=20_000)


class BenchError(Exception):
    """A workload failed; the message is what the report shows."""


# --- helpers ------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tail(text: str | bytes | None, lines: int = 15) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").strip().splitlines()[-lines:])


def file_tail(path: Path, lines: int = 15) -> str:
    try:
        return tail(path.read_bytes(), lines)
    except OSError:
        return ""


def run(cmd: list, *, timeout: float = CMD_TIMEOUT, check: bool = True,
        **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("capture_output", True)
    try:
        result = subprocess.run([str(c) for c in cmd], timeout=timeout, check=False, **kw)
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout}s: {shlex.join(map(str, cmd))}") from None
    if check and result.returncode != 0:
        raise BenchError(f"exit {result.returncode}: {shlex.join(map(str, cmd))}\n"
                         f"{tail(result.stderr)}\n{tail(result.stdout)}".rstrip())
    return result


def timed(cmd: list, **kw) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = run(cmd, **kw)
    return time.perf_counter() - start, result


def mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        # field 5 is the mount point, with space, tab, newline and backslash octal-escaped
        return any(line.split()[4].encode().decode("unicode_escape") == target for line in f)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_pid_exit(pid: int, timeout: float) -> bool:
    """Wait on a pidfd: works for the detached encfs-gw daemon, which is not our child."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(int(timeout * 1000)))
    finally:
        os.close(fd)


def proc_status_kib(pid: int | None, field: str) -> int | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def proc_cpu_s(pid: int | None) -> float | None:
    """user+sys CPU seconds of `pid` (all threads), of its children it has reaped
    (cutime, cstime) and, recursively, of its live child processes (encfs-gw's CPU warmer
    and unmount guard count as the daemon's)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    except (OSError, IndexError, ValueError):
        return None
    total = ticks / os.sysconf("SC_CLK_TCK")
    for child in child_pids(pid):
        total += proc_cpu_s(child) or 0.0
    return total


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        pass
    return children


def settle() -> None:
    """Write back everything dirty (the target just removed, its tree's deletes): the next
    target must not pay for this one's writeback."""
    start = time.perf_counter()
    os.sync()
    log(f"  synced the disk in {time.perf_counter() - start:.1f} s")


def evict(directory: Path) -> None:
    """Write back and drop every regular file under `directory` from the page cache
    (drop_caches may be forbidden in a VM; posix_fadvise on our own files is not)."""
    for root, _dirs, files in os.walk(directory):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# --- CPU accounting -----------------------------------------------------------------------


def cgroup2_mount() -> Path | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if " - cgroup2 " in line:
                return Path(line.split()[4].encode().decode("unicode_escape"))
    return None


def make_run_cgroup() -> Path | None:
    """A cgroup2 directory for this run (each target gets one below it), or None: the
    targets' CPU then comes from /proc."""
    root = cgroup2_mount()
    if root is None:
        return None
    path = root / f"encfs-gw-bench-{os.getpid()}"
    try:
        path.mkdir()
        return path
    except OSError as exc:
        log(f"no cgroup for CPU accounting ({exc}): CPU seconds come from /proc")
        return None


def remove_cgroup(path: Path) -> None:
    """Remove `path` and the cgroups below it (what is left in them goes to the root)."""
    root = cgroup2_mount()
    for child in sorted(path.glob("**/"), key=lambda p: len(p.parts), reverse=True):
        if root is not None:
            try:
                left = (child / "cgroup.procs").read_text().split()
            except OSError:
                left = []
            for pid in left:
                with contextlib.suppress(OSError):
                    (root / "cgroup.procs").write_text(pid)
        try:
            child.rmdir()
        except OSError as exc:
            log(f"cannot remove cgroup {child}: {exc}")


def cgroup_cpu_s(path: Path) -> float | None:
    try:
        for line in (path / "cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1]) / 1e6
    except (OSError, ValueError):
        pass
    return None


# --- targets ------------------------------------------------------------------------------

DAEMON_CPU_S = [0.0]  # CPU of the detached encfs-gw daemons (not our children, see main)


class Target:
    name = "?"
    label = "?"
    is_fuse = True
    harness_child = False  # its daemon is our child (gocryptfs), not detached (encfs-gw)

    def __init__(self, root: Path):
        self.root = root / self.name
        self.backing = self.root / "backing"
        self.mnt = self.root / "mnt"
        self.logfile = root / f"{self.name}.log"
        self.pid: int | None = None
        self.hwm_mib = 0.0
        self.cgroup: Path | None = None  # its processes' cgroup (CPU accounting)
        self.cpu_done = 0.0  # without a cgroup: CPU of the daemons that have exited
        self.nofile: int | None = None  # the daemon's descriptor limit (None: ours)

    def use_cgroup(self, run_cgroup: Path | None) -> None:
        if run_cgroup is not None and self.is_fuse:
            self.cgroup = run_cgroup / self.name
            self.cgroup.mkdir(exist_ok=True)

    def enter_cgroup(self) -> None:
        """In a child before exec: join this target's cgroup (the daemon and its helpers
        are started from there, so their CPU is charged to it)."""
        if self.cgroup is not None:
            (self.cgroup / "cgroup.procs").write_text(str(os.getpid()))

    def cpu_s(self) -> float | None:
        """CPU seconds this target's processes have used so far (None for native: its
        filesystem work is the kernel's, in the client's own time)."""
        if not self.is_fuse:
            return None
        if self.cgroup is not None:
            return cgroup_cpu_s(self.cgroup)
        return self.cpu_done + (proc_cpu_s(self.pid) or 0.0)

    def count_exiting_daemon(self) -> None:
        """Before an unmount: without a cgroup, its CPU would leave with the daemon."""
        cpu = proc_cpu_s(self.pid) or 0.0
        if self.cgroup is None:
            self.cpu_done += cpu
        if not self.harness_child:  # (the harness's children are in os.times())
            DAEMON_CPU_S[0] += cpu

    def limit_descriptors(self) -> None:
        """In the daemon's child process, before exec: soft and hard limit `nofile`."""
        if self.nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    @property
    def data(self) -> Path:
        return self.mnt

    def create(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.backing.mkdir(parents=True)
        self.mnt.mkdir()

    def destroy(self) -> None:
        self.force_cleanup()
        shutil.rmtree(self.root, ignore_errors=True)

    def mount(self) -> float:
        """Mount; return the seconds until the mount was live."""
        raise NotImplementedError

    def unmount(self) -> None:
        raise NotImplementedError

    def note_hwm(self) -> None:
        hwm = proc_status_kib(self.pid, "VmHWM")
        if hwm is not None:
            self.hwm_mib = max(self.hwm_mib, hwm / 1024)

    def remount(self) -> None:
        """Unmount, evict the backing files from the page cache, mount: a cold start."""
        self.unmount()
        evict(self.backing)
        self.mount()

    def healthy(self) -> bool:
        if not self.is_fuse:
            return True
        if not (mounted(self.mnt) and pid_alive(self.pid)):
            return False
        try:
            os.stat(self.mnt)
            return True
        except OSError:
            return False

    def force_cleanup(self) -> None:
        """Whatever state we are in, leave no mount and no daemon behind."""
        if not self.is_fuse:
            return
        if mounted(self.mnt) and run(["fusermount3", "-u", self.mnt], check=False,
                                     timeout=60).returncode:
            run(["fusermount3", "-u", "-z", self.mnt], check=False, timeout=60)
        pid = self.pid
        if pid and pid_alive(pid) and not wait_pid_exit(pid, 30):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                if wait_pid_exit(pid, 10):
                    break
        self.reap()
        self.pid = None

    def reap(self) -> None:
        pass

    def version(self) -> str:
        return ""

    def describe(self) -> str:
        return self.version()


class Native(Target):
    name = label = "native"
    is_fuse = False

    @property
    def data(self) -> Path:
        return self.backing

    def mount(self) -> float:
        return 0.0

    def unmount(self) -> None:
        pass

    def version(self) -> str:
        return "plain directory, no FUSE"


class Gocryptfs(Target):
    name = label = "gocryptfs"
    harness_child = True

    def __init__(self, root: Path):
        super().__init__(root)
        self.passfile = root / "gocryptfs.pass"
        self.proc: subprocess.Popen | None = None

    def create(self) -> None:
        super().create()
        fd = os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, PASSWORD)
        os.close(fd)
        run(["gocryptfs", "-init", "-q", "-passfile", self.passfile, self.backing])

    def mount(self) -> float:
        """gocryptfs -fg as our child (so its pid is known for RSS/CPU); -notifypid makes it
        send us SIGUSR1 once the mount is live: no polling, no sleeps."""
        wanted = {signal.SIGUSR1, signal.SIGCHLD}
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
        try:
            with open(self.logfile, "ab") as logf:
                start = time.perf_counter()
                self.proc = subprocess.Popen(
                    ["gocryptfs", "-fg", "-q", "-nosyslog", "-passfile", str(self.passfile),
                     "-notifypid", str(os.getpid()), str(self.backing), str(self.mnt)],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                    start_new_session=True,
                    preexec_fn=lambda: (self.enter_cgroup(),
                                        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask),
                                        self.limit_descriptors()))
            self.pid = self.proc.pid
            deadline = start + MOUNT_TIMEOUT
            while True:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise BenchError(f"gocryptfs mount not live after {MOUNT_TIMEOUT}s")
                info = signal.sigtimedwait(wanted, remaining)
                if info and info.si_signo == signal.SIGUSR1 and info.si_pid == self.pid:
                    break
                if self.proc.poll() is not None:
                    raise BenchError(f"gocryptfs exited with {self.proc.returncode} before "
                                     f"the mount was live:\n{file_tail(self.logfile)}")
            elapsed = time.perf_counter() - start
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if not mounted(self.mnt):
            raise BenchError("gocryptfs signalled readiness but is not in mountinfo")
        return elapsed

    def unmount(self) -> None:
        self.note_hwm()
        self.count_exiting_daemon()
        run(["fusermount3", "-u", self.mnt], timeout=60)
        assert self.proc is not None
        try:
            self.proc.wait(timeout=UNMOUNT_WAIT)
        except subprocess.TimeoutExpired:
            raise BenchError("gocryptfs did not exit after fusermount3 -u") from None
        self.proc = None
        self.pid = None

    def reap(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def version(self) -> str:
        out = run(["gocryptfs", "--version"], check=False).stdout.decode().strip()
        return f"{out}; defaults (AES-256-GCM, 4 KiB blocks, encrypted names)"


class EncfsGw(Target):
    name = label = "encfs-gw"
    options: tuple[str, ...] = ()
    binary: Path = ENCFS_GW  # the encfs-gw of this checkout; --baseline adds another

    def __init__(self, root: Path):
        super().__init__(root)
        self.keyfile = self.root / "key"
        self.helpers = ""  # what `status` says of the CPU warmer and the busy-poll
        # Its own operator trust store for each fresh volume: the machine's store is left
        # alone, and the next repetition's volume at the same path is not a "replaced" one.
        self.trust_dir: Path | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.trust_dir is not None:
            env["ENCFS_GW_TRUST_DIR"] = str(self.trust_dir)
        return env

    def create(self) -> None:
        super().create()
        self.trust_dir = Path(tempfile.mkdtemp(prefix=f"trust-{self.name}-", dir=self.root))
        run([self.binary, "init", self.backing, "--keyfile", self.keyfile], env=self.env())

    def mount(self) -> float:
        """`encfs-gw mount` returns once the mount is live (key file provider)."""
        cmd = [self.binary, "mount", self.backing, self.mnt, "--keyfile", self.keyfile,
               "--log-file", self.logfile]
        for opt in self.options:
            cmd += ["-o", opt]
        start = time.perf_counter()
        try:
            result = run(cmd, check=False, timeout=MOUNT_TIMEOUT, env=self.env(),
                         preexec_fn=lambda: (self.enter_cgroup(), self.limit_descriptors()))
        finally:  # even after a timeout: the detached daemon must be found for cleanup
            self.pid = self.lock_pid()
        elapsed = time.perf_counter() - start
        if result.returncode != 0:
            raise BenchError(f"encfs-gw mount exit {result.returncode}:\n"
                             f"{tail(result.stderr)}")
        if not mounted(self.mnt):
            raise BenchError("encfs-gw mount returned 0 but is not in mountinfo")
        if not self.helpers:
            self.helpers = self.helper_state()
        return elapsed

    def helper_state(self) -> str:
        """The CPU warmer's and the busy-poll's decision, from `encfs-gw status`."""
        result = run([self.binary, "status", self.mnt, "--json"], check=False, env=self.env())
        try:
            cpu = json.loads(result.stdout)["cpu"]
        except (ValueError, KeyError, TypeError):
            return "CPU warmer and busy-poll: not reported by this encfs-gw"
        return "; ".join(
            f"{label} {'on' if cpu[key]['on'] else 'off'} ({cpu[key]['reason']})"
            for key, label in (("cpu_warmer", "CPU warmer"), ("busy_poll", "busy-poll")))

    def lock_pid(self) -> int | None:
        """The daemon: the holder of the volume lock (/proc/locks)."""
        from encfs.daemon.runtime import volume_lock_holder

        return volume_lock_holder(str(self.backing))

    def unmount(self) -> None:
        self.note_hwm()
        self.count_exiting_daemon()
        run([self.binary, "unmount", self.mnt], timeout=UNMOUNT_WAIT + 30, env=self.env())
        if pid_alive(self.pid):
            raise BenchError(f"encfs-gw daemon {self.pid} still alive after unmount")
        self.pid = None

    def version(self) -> str:
        ver = run([self.binary, "--version"], check=False).stdout.decode().strip()
        libs = run([self.binary.parent / "python", "-c",
                    "import importlib.metadata as m, platform; print('Python ' + "
                    "platform.python_version(), *(f'{p} {m.version(p)}' for p in "
                    "('pyfuse3', 'trio', 'cryptography')), sep=', ')"], check=False)
        opts = ",".join(self.options) or "defaults"
        return f"{ver} (-o {opts}); {libs.stdout.decode().strip()}"

    def describe(self) -> str:
        return f"{self.version()}; {self.helpers or 'CPU helpers: not seen (no mount)'}"


class EncfsGwWriteback(EncfsGw):
    name = "encfs-gw-wb"
    label = "encfs-gw +wb"
    options = ("writeback_cache",)


class EncfsGwSpin(EncfsGw):
    """The CPU warmer and the busy-poll forced on, whatever the machine (not a default
    target: it shows what they buy and what they cost where auto leaves them off)."""
    name = "encfs-gw-spin"
    label = "encfs-gw +spin"
    options = ("cpu_warmer=on,busy_poll=on",)


class EncfsGwBaseline(EncfsGw):
    """The encfs-gw of another checkout (`--baseline PATH/.venv/bin/encfs-gw`), with its
    defaults: before and after a change measured in the same run, on the same machine."""
    name = "encfs-gw-base"
    label = "encfs-gw (baseline)"


def compile_package(binary: Path) -> None:
    """The bytecode of the encfs package behind `binary`, written now: an editable
    checkout has none while PYTHONDONTWRITEBYTECODE is set, and every mount would
    compile the sources again (tens of ms of the mount time, more for a bigger tree:
    a measure of the environment, not of the code). An installed package has it."""
    python = binary.parent / "python"
    where = run([python, "-c", "import encfs, os; print(os.path.dirname(encfs.__file__))"])
    run([python, "-m", "compileall", "-q", where.stdout.decode().strip()])


def add_baseline(binary: Path, index: int) -> str:
    """A target for `binary` (the `index`th --baseline), named after that checkout's
    commit; returns the target's name (encfs-gw-base, encfs-gw-base2, ...)."""
    checkout = binary.resolve().parent.parent.parent
    head = run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"], check=False)
    commit = head.stdout.decode().strip() if head.returncode == 0 else checkout.name
    name = "encfs-gw-base" if index == 1 else f"encfs-gw-base{index}"
    TARGETS[name] = type(f"EncfsGwBaseline{index}", (EncfsGwBaseline,), {
        "name": name, "label": f"encfs-gw @{commit}", "binary": binary})
    return name


TARGETS: dict[str, type[Target]] = {
    t.name: t for t in (Native, Gocryptfs, EncfsGw, EncfsGwWriteback, EncfsGwSpin,
                        EncfsGwBaseline)}
DEFAULT_TARGETS = ["native", "gocryptfs", "encfs-gw", "encfs-gw-wb"]


# --- results ------------------------------------------------------------------------------

# key, label, unit, better: "high" / "low" (ratio shown) or "check" (pass/fail, no ratio)
ROWS = [
    ("mount_ms", "mount time", "ms", "low"),
    ("seq_write", "seq write 1M, end_fsync", "MiB/s", "high"),
    ("seq_read_cold", "seq read 1M, cold (remount + backing evicted)", "MiB/s", "high"),
    ("seq_read_cached", "seq read 1M, backing cached", "MiB/s", "high"),
    ("randrw", "randrw 4K r+w mix (backing evicted)", "IOPS", "high"),
    ("cp_a", "cp -a tree", "s", "low"),
    ("find_wc", "find \\| wc -l (after remount)", "s", "low"),
    ("du_s", "du -s", "s", "low"),
    ("tree_check", "tree content/mode/mtime check", "ok", "check"),
    ("rm_rf", "rm -rf tree", "s", "low"),
    ("sqlite_ins", "SQLite {rows} inserts / {tx} tx", "s", "low"),
    ("sqlite_check", "SQLite integrity_check + count (after remount)", "ok", "check"),
    ("meta_create", "create {n} entries (xargs touch)", "s", "low"),
    ("stat_cold", "stat {n} entries, cold (after remount)", "s", "low"),
    ("stat_warm", "stat {n} entries, warm", "s", "low"),
    ("ls_cold", "ls -l dir of {n}, cold (after remount)", "s", "low"),
    ("ls_warm", "ls -l dir of {n}, warm", "s", "low"),
    ("rss_mib", "daemon peak RSS (VmHWM)", "MiB", "low"),
    ("scale_create", "scale: create {scale} entries (one dir of {big})", "s", "low"),
    ("scale_ls_lr", "scale: ls -lR (after remount)", "s", "low"),
    ("scale_find", "scale: find \\| wc -l", "s", "low"),
    ("scale_du", "scale: du -s", "s", "low"),
    ("scale_remount", "scale: unmount + mount", "s", "low"),
    ("scale_rm_rf", "scale: rm -rf (after the remount)", "s", "low"),
    ("scale_rss_inode", "scale: RSS growth per listed entry (ls -lR)", "bytes", "low"),
    ("scale_rss_peak", "scale: daemon peak RSS", "MiB", "low"),
    ("scale_fd_peak", "scale: daemon peak open descriptors (limit 4096)", "fds", "low"),
]
# Rows with a CPU column: the CPU seconds of the target's processes (the daemon and all
# its helpers, or gocryptfs) during that workload, stored under key + CPU; per mount for
# mount time, per run for the warm medians.
CPU = ".cpu"
CPU_ROWS = {key for key, _label, _unit, better in ROWS
            if better in ("high", "low")
            and key not in ("rss_mib", "scale_rss_inode", "scale_rss_peak", "scale_fd_peak")}
BETTER = {key: better for key, _label, _unit, better in ROWS}
BETTER |= {key + CPU: "low" for key in CPU_ROWS}
GROUPS = {
    "mount": ["mount_ms"],
    "seq": ["seq_write", "seq_read_cold", "seq_read_cached"],
    "randrw": ["randrw"],
    "small": ["cp_a", "find_wc", "du_s", "tree_check", "rm_rf"],
    "sqlite": ["sqlite_ins", "sqlite_check"],
    "meta": ["meta_create", "stat_cold", "stat_warm", "ls_cold", "ls_warm"],
    "scale": ["scale_create", "scale_ls_lr", "scale_find", "scale_du", "scale_remount",
              "scale_rm_rf", "scale_rss_inode", "scale_rss_peak", "scale_fd_peak"],
}
# Issue 8's targets for encfs-gw with default options: (label, key, minimum ratio over
# gocryptfs); mount time and RSS are absolute limits (key, label, maximum, unit).
RATIO_TARGETS = [
    ("sequential write", "seq_write", 1.3),
    ("sequential read (cold)", "seq_read_cold", 1.2),
    ("random 4 KiB mix", "randrw", 1.0),
    ("small-file copy (cp -a)", "cp_a", 1.3),
    ("small-file delete (rm -rf)", "rm_rf", 1.3),
    ("SQLite inserts", "sqlite_ins", 1.5),
    ("stat, cold", "stat_cold", 1.0),
    ("stat, warm", "stat_warm", 1.0),
    ("ls -l, cold", "ls_cold", 1.0),
    ("ls -l, warm", "ls_warm", 1.0),
]
ABSOLUTE_TARGETS = [
    ("mount_ms", "mount time (median)", 500, "ms"),
    ("rss_mib", "daemon peak RSS (max)", 150, "MiB"),
]


class Results:
    def __init__(self) -> None:
        self.values: dict[str, dict[str, list[float]]] = {}
        self.failed: dict[str, dict[str, int]] = {}  # target -> key -> failed repetitions
        self.failures: list[dict] = []  # one entry per failure message, for the report

    def add(self, target: str, key: str, value: float) -> None:
        self.values.setdefault(target, {}).setdefault(key, []).append(value)

    def get(self, target: str, key: str) -> list[float]:
        return self.values.get(target, {}).get(key, [])

    def fail(self, target: str, rep: int, group: str, keys: list[str], message: str) -> None:
        for key in keys:
            per = self.failed.setdefault(target, {})
            per[key] = per.get(key, 0) + 1
        self.failures.append({"target": target, "rep": rep, "group": group,
                              "keys": keys, "message": message})

    def median(self, target: str, key: str) -> float | None:
        vals = self.get(target, key)
        if not vals or self.failed.get(target, {}).get(key):
            return None
        return statistics.median(vals)

    def ratio(self, target: str, key: str, better: str) -> float | None:
        a, b = self.median(target, key), self.median("gocryptfs", key)
        if not a or not b:
            return None
        return a / b if better == "high" else b / a


def fmt_num(v: float) -> str:
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else \
        f"{v:.2f}" if a >= 1 else f"{v:.3f}"


def cell(res: Results, target: str, key: str, better: str) -> str:
    vals = res.get(target, key)
    failed = res.failed.get(target, {}).get(key, 0)
    if better == "check":
        n, ok = len(vals), sum(1 for v in vals if v)  # a failed or skipped check adds a 0
        return NA if not n else f"{ok}/{n} ok" if ok == n else f"**FAILED** {n - ok}/{n}"
    text = ""
    if vals:
        med = fmt_num(statistics.median(vals))
        text = med if len(vals) == 1 else \
            f"{med} ({fmt_num(min(vals))}-{fmt_num(max(vals))})"
    if failed:
        return f"**FAILED** {failed}/{failed + len(vals)}" + (f"; ok: {text}" if text else "")
    return text or NA


def render(res: Results, targets: list[Target], cfg: Config, meta: dict) -> str:
    names = [t.name for t in targets]
    labels = {t.name: t.label for t in targets}
    out = [f"# encfs-gw benchmark, {meta['started']}", ""]
    if meta["shared"]:
        out += [f"**The machine was shared**: {meta['shared']}. Other jobs competed for the "
                "2 cores, so absolute figures are noisy; differences under ~30% between "
                "single cells are noise.", ""]
    out += [f"Mode **{meta['mode']}**, {cfg.reps} repetition(s), targets alternated in each "
            f"repetition, their order rotated each repetition, the disk synced between "
            f"targets; status **{meta['status']}**; wall time {meta['wall_s']:.0f} s.",
            f"Sizes: seq {cfg.seq_mib} MiB; randrw {cfg.randrw_mib} MiB file for "
            f"{cfg.randrw_seconds} s; tree {meta.get('tree_entries', '?')} entries "
            f"({meta.get('tree_mib', 0):.0f} MiB) from {meta.get('tree_src', '?')}; SQLite "
            f"{cfg.sqlite_rows} inserts in {cfg.sqlite_tx} transactions; metadata "
            f"{cfg.meta_entries} entries; {cfg.mount_samples * cfg.reps} mount samples per "
            f"target.", "",
            "## Results: median (min-max)", "",
            f"Each FUSE target's CPU column: {meta['cpu_method']}, during that workload (per "
            "mount for mount time; per run for the warm rows). Native's filesystem work is "
            "the kernel's, in the client's time: no column.", ""]
    columns = [c for t in targets for c in
               [(t.name, "", t.label)] + ([(t.name, CPU, f"{t.label} CPU s")] if t.is_fuse
                                          else [])]
    out += ["| workload | unit | " + " | ".join(head for _n, _k, head in columns) + " |",
            "|---|---|" + "---|" * len(columns)]
    for key, label, unit, better in ROWS:
        cells = [cell(res, n, key + suffix, better if not suffix else "low")
                 if not suffix or key in CPU_ROWS else NA for n, suffix, _h in columns]
        if all(c == NA for c in cells):
            continue
        label = label.format(n=cfg.meta_entries, rows=cfg.sqlite_rows, tx=cfg.sqlite_tx,
                             scale=cfg.scale_entries, big=cfg.scale_entries // SCALE_BIG_DIR)
        out.append(f"| {label} | {unit} | " + " | ".join(cells) + " |")
    others = [c for c in columns if c[0] != "gocryptfs" and not (c[0] == "native" and c[1])]
    if "gocryptfs" in names and others:
        out += ["", "## Relative to gocryptfs (>1 = faster / smaller than gocryptfs)", "",
                "Throughput: target/gocryptfs. Times, RSS and CPU seconds: gocryptfs/target "
                "(a CPU column >1: less CPU than gocryptfs for the same work). Medians only.",
                "", "| workload | " + " | ".join(head for _n, _k, head in others) + " |",
                "|---|" + "---|" * len(others)]
        for key, label, _unit, better in ROWS:
            if better == "check":
                continue
            cells = [fmt_ratio(res, n, key + suffix) if not suffix or key in CPU_ROWS else NA
                     for n, suffix, _h in others]
            if all(c == NA for c in cells):
                continue
            label = label.format(n="N", rows="N", tx="M", scale="N", big="N/5")
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out += render_targets(res, [n for n in names if n.startswith("encfs-gw")], labels)
    out += ["", "## Failures", ""]
    if not res.failures:
        out.append("None: every workload, data check and SQLite integrity_check passed.")
    for f in res.failures:
        out.append(f"- **{labels[f['target']]}**, rep {f['rep'] + 1}, `{f['group']}` "
                   f"({', '.join(f['keys'])}):")
        out += ["  ```", *("  " + line for line in f["message"].splitlines()[:30]), "  ```"]
        if f["group"] in GROUPS:
            out.append(f"  Reproduce: `.venv/bin/python bench/run.py {meta['mode_flag']}"
                       f"--targets {f['target']} --workloads {f['group']} --reps 1`")
    out += ["", "## Targets and tools", ""]
    out += [f"- **{t.label}**: {meta['versions'].get(t.name, '')}" for t in targets]
    start, end = meta["checkout_start"], meta["checkout_end"]
    same_sources = start.rsplit("sha256", 1)[-1] == end.rsplit("sha256", 1)[-1]
    out.append(f"- encfs-gw checkout: {end}" if same_sources else
               f"- encfs-gw checkout **changed during the run** (shared checkout): {start} "
               f"at the start, {end} at the end; each mount ran the files as they were then")
    out += [f"- tools: {meta['tools']}", "", "## Machine", ""]
    out += [f"- {k}: {v}" for k, v in meta["machine"].items()]
    return "\n".join(out) + "\n"


def fmt_ratio(res: Results, target: str, key: str, goal: float | None = None) -> str:
    if res.failed.get(target, {}).get(key):
        return "**FAILED**"
    r = res.ratio(target, key, BETTER[key])
    if r is None:
        return NA
    if goal is None:
        return f"{r:.2f}x"
    return f"{r:.2f}x {'met' if r >= goal else '**MISSED**'}"


def render_targets(res: Results, encfs: list[str], labels: dict[str, str]) -> list[str]:
    if not encfs:
        return []
    out = ["", "## Issue 8 targets (encfs-gw with default options must meet them)", "",
           "| target | goal | " + " | ".join(labels[n] for n in encfs) + " |",
           "|---|---|" + "---|" * len(encfs)]
    for label, key, goal in RATIO_TARGETS:
        cells = [fmt_ratio(res, n, key, goal) for n in encfs]
        out.append(f"| {label} | >= {goal}x | " + " | ".join(cells) + " |")
    for key, label, limit, unit in ABSOLUTE_TARGETS:
        cells = []
        for n in encfs:
            vals = res.get(n, key)
            v = (max(vals) if key == "rss_mib" else statistics.median(vals)) if vals else None
            cells.append(NA if v is None else
                         f"{fmt_num(v)} {unit} {'met' if v < limit else '**MISSED**'}")
        out.append(f"| {label} | < {limit} {unit} | " + " | ".join(cells) + " |")
    return out


# --- workloads ----------------------------------------------------------------------------


def fio(args: list[str], cwd: Path, work: Path) -> dict:
    """One fio job with psync (iodepth 1); its JSON job record."""
    outfile = work / "fio.json"
    cmd = ["fio", "--ioengine=psync", "--output-format=json", f"--output={outfile}", *args]
    result = run(cmd, check=False, cwd=cwd)
    text = outfile.read_text(errors="replace") if outfile.exists() else ""
    if result.returncode != 0:
        raise BenchError(f"fio exit {result.returncode}: {shlex.join(cmd)}\n{tail(text)}\n"
                         f"{tail(result.stderr)}")
    try:  # fio may print warnings before the JSON document
        job = json.JSONDecoder().raw_decode(text[text.index("{"):])[0]["jobs"][0]
    except (ValueError, KeyError, IndexError):
        raise BenchError(f"cannot parse fio output:\n{tail(text)}") from None
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']}:\n{tail(text)}")
    return job


class Runner:
    def __init__(self, cfg: Config, res: Results, work: Path, groups: list[str], tree: dict,
                 sql_file: Path, names_file: Path):
        self.cfg = cfg
        self.res = res
        self.work = work
        self.groups = groups
        self.tree = tree
        self.sql_file = sql_file
        self.names_file = names_file
        self.rep = 0
        self.scale_rep: dict[str, int] = {}  # the repetition each target runs scale in
        self.done: set[str] = set()  # keys recorded by the current step
        self.broken = ""  # why the rest of this (target, repetition) is skipped

    def record(self, t: Target, key: str, value: float | None) -> None:
        if value is not None:
            self.res.add(t.name, key, value)
            self.done.add(key)

    def check_failed(self, t: Target, group: str, key: str, message: str) -> None:
        """A data check failed: count it, report it, and go on with the workload."""
        self.record(t, key, 0.0)
        self.res.fail(t.name, self.rep, group, [key], message)
        log(f"  !!! {t.label}: {message.splitlines()[0]}")

    def step(self, t: Target, group: str, fn: Callable[[Target], None]) -> None:
        if group not in self.groups:
            return
        self.done = set()
        log(f"  {t.label}: {group}")
        try:
            if self.broken:
                raise BenchError(f"skipped: {self.broken}")
            if group != "mount" and not t.healthy():
                raise BenchError("mount is not usable (an earlier failure?)")
            fn(t)
        except Exception as exc:
            msg = str(exc) if isinstance(exc, BenchError) else traceback.format_exc()
            if t.is_fuse and not self.broken and file_tail(t.logfile):
                msg += f"\n--- daemon log tail ({t.logfile.name}) ---\n{file_tail(t.logfile)}"
            log(f"  !!! {t.label} {group} FAILED: {msg.splitlines()[0]}")
            keys = [k for k in GROUPS[group] if k not in self.done]
            for k in keys:  # a check that never ran counts as failed
                if BETTER[k] == "check":
                    self.res.add(t.name, k, 0.0)
            self.res.fail(t.name, self.rep, group,
                          [k for k in keys if BETTER[k] != "check"], msg)
            self.recover(t)

    def recover(self, t: Target) -> None:
        if self.broken or t.healthy():
            return
        log(f"  {t.label}: recovering the mount")
        try:
            t.force_cleanup()
            t.mount()
        except Exception as exc:
            t.force_cleanup()
            self.broken = f"the mount could not be re-established after a failure ({exc})"

    def run_target(self, t: Target, rep: int) -> None:
        self.rep = rep
        self.broken = ""
        t.hwm_mib = 0.0
        t.create()
        try:
            if t.is_fuse:
                self.step(t, "mount", self.w_mount)
                self.recover(t)  # the workloads below run on one long-lived mount
            self.step(t, "seq", self.w_seq)
            self.step(t, "randrw", self.w_randrw)
            self.step(t, "small", self.w_small)
            self.step(t, "sqlite", self.w_sqlite)
            self.step(t, "meta", self.w_meta)
            if rep == self.scale_rep.get(t.name, 0):  # one run: minutes per target
                self.step(t, "scale", self.w_scale)
            if t.is_fuse and not self.broken:
                try:
                    t.unmount()
                    self.res.add(t.name, "rss_mib", t.hwm_mib)
                except BenchError as exc:
                    self.res.fail(t.name, rep, "unmount", ["rss_mib"], str(exc))
        finally:
            t.destroy()
            settle()

    def w_mount(self, t: Target) -> None:
        for _ in range(self.cfg.mount_samples):
            elapsed = self.with_cpu(t, "mount_ms", t.mount)
            t.unmount()
            self.record(t, "mount_ms", elapsed * 1000)
        t.mount()

    def with_cpu(self, t: Target, key: str, fn: Callable[[], T], runs: int = 1) -> T:
        """fn(), recording the CPU seconds the target's processes used meanwhile (divided
        by `runs`) as the CPU column of row `key`."""
        before = t.cpu_s()
        result = fn()
        after = t.cpu_s()
        if before is not None and after is not None:
            self.record(t, key + CPU, (after - before) / runs)
        return result

    def timed_cpu(self, t: Target, key: str, cmd: list,
                  **kw) -> tuple[float, subprocess.CompletedProcess]:
        """`timed(cmd)` with the target's CPU seconds recorded for row `key`."""
        return self.with_cpu(t, key, lambda: timed(cmd, **kw))

    def w_seq(self, t: Target) -> None:
        size = self.cfg.seq_mib << 20
        # crc32c headers in every block: the cold read checks offset and contents
        common = ["--filename=seq.bin", "--bs=1M", f"--size={size}", "--verify=crc32c"]
        job = self.with_cpu(t, "seq_write", lambda: fio(
            ["--name=seqwrite", "--rw=write", "--end_fsync=1", "--fallocate=none",
             "--do_verify=0", *common], t.data, self.work))
        self.record(t, "seq_write", job["write"]["bw_bytes"] / 2**20)
        t.remount()
        if (got := os.stat(t.data / "seq.bin").st_size) != size:
            raise BenchError(f"after remount seq.bin has {got} bytes, expected {size}")
        job = self.with_cpu(t, "seq_read_cold", lambda: fio(
            ["--name=seqread", "--rw=read", *common], t.data, self.work))
        self.record(t, "seq_read_cold", job["read"]["bw_bytes"] / 2**20)
        # fio's invalidate=1 drops the FUSE page cache, not the backing one; native keeps
        # its page cache (invalidate=0) so its row is a plain page-cache read
        inval = [] if t.is_fuse else ["--invalidate=0"]
        job = self.with_cpu(t, "seq_read_cached", lambda: fio(
            ["--name=seqread", "--rw=read", *inval, *common], t.data, self.work))
        self.record(t, "seq_read_cached", job["read"]["bw_bytes"] / 2**20)
        os.unlink(t.data / "seq.bin")

    def w_randrw(self, t: Target) -> None:
        common = ["--filename=rand.bin", f"--size={self.cfg.randrw_mib}M"]
        fio(["--name=layout", "--rw=write", "--bs=1M", "--end_fsync=1", "--fallocate=none",
             *common], t.data, self.work)
        t.remount()
        job = self.with_cpu(t, "randrw", lambda: fio(
            ["--name=randrw", "--rw=randrw", "--bs=4k", f"--runtime={self.cfg.randrw_seconds}",
             "--time_based", *common], t.data, self.work))
        self.record(t, "randrw", job["read"]["iops"] + job["write"]["iops"])
        os.unlink(t.data / "rand.bin")

    def w_small(self, t: Target) -> None:
        dst = t.data / "tree"
        secs, _ = self.timed_cpu(t, "cp_a", ["cp", "-a", self.tree["path"], dst])
        self.record(t, "cp_a", secs)
        t.remount()
        secs, r = self.timed_cpu(t, "find_wc", ["bash", "-c", "find tree | wc -l"], cwd=t.data)
        if (count := int(r.stdout or 0)) != self.tree["entries"]:
            raise BenchError(f"find listed {count} entries after remount, expected "
                             f"{self.tree['entries']}")
        self.record(t, "find_wc", secs)
        secs, _ = self.timed_cpu(t, "du_s", ["du", "-s", "tree"], cwd=t.data)
        self.record(t, "du_s", secs)
        problems = check_tree(dst, self.tree["meta"])
        if problems:
            self.check_failed(t, "small", "tree_check", f"cp -a copy differs from the source after "
                              f"remount in {len(problems)} entries, e.g.:\n"
                              + "\n".join(problems[:12]))
        else:
            self.record(t, "tree_check", 1.0)
        secs, _ = self.timed_cpu(t, "rm_rf", ["rm", "-rf", "tree"], cwd=t.data)
        if os.path.lexists(dst):
            raise BenchError("rm -rf tree left the directory behind")
        self.record(t, "rm_rf", secs)

    def w_sqlite(self, t: Target) -> None:
        db = t.data / "bench.db"
        with open(self.sql_file, "rb") as sql:
            secs, _ = self.timed_cpu(t, "sqlite_ins", ["sqlite3", "-batch", db], stdin=sql)
        self.record(t, "sqlite_ins", secs)
        t.remount()
        r = run(["sqlite3", "-batch", db, "PRAGMA integrity_check;",
                 "SELECT count(*) FROM t;"], check=False)
        out = r.stdout.decode(errors="replace").split()
        expect = ["ok", str(self.cfg.sqlite_rows)]
        if r.returncode != 0 or out != expect:
            self.check_failed(t, "sqlite", "sqlite_check",
                              f"SQLite check failed after remount: exit {r.returncode}, "
                              f"printed {out[:10]!r}, expected {expect!r}\n{tail(r.stderr)}")
        else:
            self.record(t, "sqlite_check", 1.0)
        for suffix in ("", "-journal"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)

    def w_meta(self, t: Target) -> None:
        n = self.cfg.meta_entries
        d = t.data / "meta"
        d.mkdir()
        secs, _ = self.timed_cpu(t, "meta_create", ["xargs", "-0", "-a", self.names_file, "touch"],
                                 cwd=d)
        self.record(t, "meta_create", secs)

        def stat_all() -> float:  # by name, no readdir first: LOOKUP + GETATTR per entry
            secs, r = timed(["xargs", "-0", "-a", self.names_file, "stat", "-c", "%i"],
                            cwd=d)
            if (lines := r.stdout.count(b"\n")) != n:
                raise BenchError(f"stat printed {lines} lines, expected {n}")
            return secs

        def ls_all() -> float:  # READDIRPLUS
            secs, r = timed(["ls", "-l", "meta"], cwd=t.data)
            if (lines := r.stdout.count(b"\n")) != n + 1:
                raise BenchError(f"ls -l printed {lines} lines, expected {n + 1}")
            return secs

        def warm(fn: Callable[[], float]) -> float:
            return statistics.median([fn() for _ in range(WARM_RUNS)])

        t.remount()
        self.record(t, "stat_cold", self.with_cpu(t, "stat_cold", stat_all))
        # Warm runs take ~17 ms from the kernel's caches on every target (native too), so
        # one run is timer noise: the median of WARM_RUNS (CPU: their mean).
        self.record(t, "stat_warm",
                    self.with_cpu(t, "stat_warm", lambda: warm(stat_all), runs=WARM_RUNS))
        t.remount()
        self.record(t, "ls_cold", self.with_cpu(t, "ls_cold", ls_all))
        self.record(t, "ls_warm",
                    self.with_cpu(t, "ls_warm", lambda: warm(ls_all), runs=WARM_RUNS))


    def w_scale(self, t: Target) -> None:
        """Issue 23's scale run, sized by --scale-entries: a tree with one big directory,
        made through the mount with the daemon's descriptor limit at SCALE_NOFILE, then
        ls -lR, find, du, a remount and rm -rf, each timed; the daemon's RSS and open
        descriptors sampled throughout."""
        n = self.cfg.scale_entries
        top = t.data / "scale"
        if t.is_fuse:
            t.unmount()
            t.nofile = SCALE_NOFILE
            t.mount()
        sampler = DaemonSampler(t.pid) if t.is_fuse else None
        try:
            start = time.perf_counter()
            made = self.with_cpu(t, "scale_create", lambda: make_scale_tree(top, n))
            self.record(t, "scale_create", time.perf_counter() - start)
            if t.is_fuse:
                t.unmount()
                t.mount()
                sampler.watch(t.pid)
            rss_before = proc_status_kib(t.pid, "VmRSS")
            secs, r = self.timed_cpu(t, "scale_ls_lr", ["ls", "-lR", top], capture_output=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if r.stderr:
                raise BenchError(f"ls -lR: {tail(r.stderr)}")
            self.record(t, "scale_ls_lr", secs)
            rss_after = proc_status_kib(t.pid, "VmRSS")
            if rss_before is not None and rss_after is not None:
                self.record(t, "scale_rss_inode", (rss_after - rss_before) * 1024 / made)
            secs, r = self.timed_cpu(
                t, "scale_find", ["sh", "-c", 'find "$1" | wc -l', "find", top])
            if int(r.stdout) != made + 1:
                raise BenchError(f"find counted {int(r.stdout)} entries, expected {made + 1}")
            self.record(t, "scale_find", secs)
            secs, _ = self.timed_cpu(t, "scale_du", ["du", "-s", top])
            self.record(t, "scale_du", secs)
            if t.is_fuse:
                start = time.perf_counter()
                t.unmount()
                t.mount()
                self.record(t, "scale_remount", time.perf_counter() - start)
                sampler.watch(t.pid)
            secs, _ = self.timed_cpu(t, "scale_rm_rf", ["rm", "-rf", top])
            self.record(t, "scale_rm_rf", secs)
        finally:
            if sampler is not None:
                sampler.stop()
                self.record(t, "scale_fd_peak", sampler.fd_peak)
                self.record(t, "scale_rss_peak", sampler.rss_peak_kib / 1024)
            if t.is_fuse:  # what follows runs with the usual limit again
                t.nofile = None
                if t.healthy():
                    t.unmount()
                    t.mount()


class DaemonSampler:
    """Open descriptors and RSS of a daemon, every 0.2 s from a thread; the peaks."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.fd_peak = 0
        self.rss_peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def watch(self, pid: int | None) -> None:
        """The daemon after a remount."""
        self.pid = pid

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                fds = len(os.listdir(f"/proc/{self.pid}/fd"))
            except OSError:
                continue  # between an unmount and the next mount
            self.fd_peak = max(self.fd_peak, fds)
            self.rss_peak_kib = max(self.rss_peak_kib, proc_status_kib(self.pid, "VmRSS") or 0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def make_scale_tree(top: Path, entries: int) -> int:
    """`entries` entries under `top`: one directory with a fifth of them (files), the
    rest directories of SCALE_DIR_ENTRIES - 1 files each. Returns the count made."""
    made = 0
    big = top / "big"
    big.mkdir(parents=True)
    made += 1
    for index in range(entries // SCALE_BIG_DIR):
        os.close(os.open(big / f"f{index:07d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        made += 1
    group = 0
    while made < entries:
        directory = top / f"d{group:05d}"
        directory.mkdir()
        made += 1
        for index in range(min(SCALE_DIR_ENTRIES - 1, entries - made)):
            os.close(os.open(directory / f"f{index:04d}", os.O_WRONLY | os.O_CREAT, 0o644))
            made += 1
        group += 1
    return made


def describe(path: str) -> tuple:
    """What cp -a must preserve: type, mode, size, mtime, contents, symlink target."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return ("dir", oct(st.st_mode))
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    return ("file", oct(st.st_mode), st.st_size, st.st_mtime_ns, digest)


def walk_tree(top: Path) -> dict[str, tuple]:
    entries = {}
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            full = os.path.join(root, name)
            entries[os.path.relpath(full, top)] = describe(full)
    return entries


def check_tree(dst: Path, want: dict[str, tuple]) -> list[str]:
    try:
        got = walk_tree(dst)
    except OSError as exc:
        return [f"walking the copy failed: {exc}"]
    problems = [f"{rel}: got {got[rel]}, want {want.get(rel, 'nothing')}"
                for rel in sorted(got) if got[rel] != want.get(rel)]
    return problems + [f"{rel}: missing" for rel in sorted(want.keys() - got.keys())]


# --- fixtures -----------------------------------------------------------------------------


def stage_tree(work: Path, cfg: Config) -> dict:
    """A real tree: this Python's stdlib without site-packages/ and test/ (4,093 entries
    here, as in peers.md), staged on the disk under test."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    dst = work / "tree-src" / "tree"

    def ignore(directory: str, names: list[str]) -> set[str]:
        skip = {"site-packages", "dist-packages", "test"} if Path(directory) == stdlib \
            else set()
        if not cfg.full_tree:
            skip |= {n for n in names if n == "__pycache__" or n.startswith("config-")}
        return skip & set(names)

    shutil.copytree(stdlib, dst, symlinks=True, ignore=ignore)
    meta = walk_tree(dst)
    size = sum(v[2] for v in meta.values() if v[0] == "file")
    return {"path": dst, "entries": len(meta) + 1, "meta": meta, "mib": size / 2**20,
            "origin": f"{stdlib} minus site-packages/, test/"
                      + ("" if cfg.full_tree else ", __pycache__/, config-*/")}


def make_sql(work: Path, cfg: Config) -> Path:
    rng = random.Random(SQLITE_SEED)
    path = work / "ins.sql"
    with open(path, "w") as f:
        f.write("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);\n")
        for _ in range(cfg.sqlite_tx):
            f.write("BEGIN;\n")
            for _ in range(cfg.sqlite_rows // cfg.sqlite_tx):
                f.write(f"INSERT INTO t(v) VALUES(X'{rng.randbytes(200).hex()}');\n")
            f.write("COMMIT;\n")
    return path


def make_names(work: Path, n: int) -> Path:
    path = work / "names"
    path.write_bytes(b"".join(f"f{i:05d}\0".encode() for i in range(n)))
    return path


def machine_info(work: Path) -> dict:
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                   "?")
    fs = run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", work], check=False)
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "CPU": cpu,
            "RAM": f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB",
            "workdir": f"{work} ({fs.stdout.decode().strip() or '?'})"}


def checkout_state() -> str:
    """HEAD and a digest of encfs/: the daemon runs from the editable install, so each
    mount runs the files as they are at that moment (other engineers may edit them)."""
    rev = run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], check=False)
    dirty = run(["git", "-C", REPO, "status", "--porcelain", "--", "encfs"], check=False)
    digest = hashlib.sha256()
    for path in sorted((REPO / "encfs").rglob("*.py")):
        digest.update(str(path).encode() + b"\0" + path.read_bytes())
    state = rev.stdout.decode().strip() or "?"
    if dirty.stdout.strip():
        state += " + uncommitted changes in encfs/"
    return f"{state} (sources sha256 {digest.hexdigest()[:12]})"


def tool_versions() -> str:
    fio_v = run(["fio", "--version"], check=False).stdout.decode().strip()
    sqlite_v = run(["sqlite3", "--version"], check=False).stdout.decode().split()[:1]
    fuse_v = run(["fusermount3", "--version"], check=False)
    fuse_v = (fuse_v.stdout or fuse_v.stderr).decode().strip().split()[-1:]
    return (f"{fio_v}; sqlite3 {' '.join(sqlite_v)}; fusermount3 {' '.join(fuse_v)}; "
            f"harness Python {platform.python_version()}")


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_busy_s() -> float:
    """CPU seconds all processes and the kernel have used since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU of the harness, the children it waited for (fio, cp, gocryptfs, ...) and the
    detached encfs-gw daemons."""
    return sum(os.times()[:4]) + DAEMON_CPU_S[0]


# --- main ---------------------------------------------------------------------------------


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repetition")
    p.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="scratch parent on the disk under test (default /var/tmp)")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help=f"comma-separated, of {','.join(TARGETS)} (default: all but "
                        "encfs-gw-spin)")
    p.add_argument("--workloads", default=",".join(GROUPS),
                   help=f"comma-separated subset of {','.join(GROUPS)}")
    p.add_argument("--keep", action="store_true", help="keep the scratch dir (daemon logs)")
    p.add_argument("--baseline", type=Path, metavar="ENCFS_GW", action="append", default=[],
                   help="the encfs-gw of another checkout (e.g. a worktree of an older "
                        "commit, after its `make setup`): adds the target encfs-gw-base "
                        "(again: encfs-gw-base2, ...)")
    p.add_argument("--scale-entries", type=int,
                   help="entries of the scale workload's tree (default 100000, quick 20000)")
    args = p.parse_args(argv)

    cfg = QUICK if args.quick else FULL
    if args.reps:
        cfg.reps = args.reps
    if args.scale_entries:
        cfg.scale_entries = args.scale_entries
    groups = [g for g in args.workloads.split(",") if g]
    names = [n for n in args.targets.split(",") if n]
    for index, binary in enumerate(args.baseline, 1):
        if not os.access(binary, os.X_OK):
            p.error(f"--baseline {binary}: not an executable")
        name = add_baseline(binary, index)
        if name not in names:
            names.insert(names.index("encfs-gw") if "encfs-gw" in names else len(names), name)
    if any(n.startswith("encfs-gw-base") and n not in TARGETS for n in names):
        p.error("a target encfs-gw-baseN needs its --baseline")
    if bad := (set(groups) - set(GROUPS)) | (set(names) - set(TARGETS)):
        p.error(f"unknown workloads or targets: {sorted(bad)}")
    if os.geteuid() != 0:
        p.error("run as root (FUSE mounts)")
    for tool in ("fio", "sqlite3", "fusermount3", "gocryptfs"):
        if not shutil.which(tool):
            p.error(f"{tool} not found: run bash bench/install.sh")

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a late gocryptfs readiness signal
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="encfs-gw-bench-", dir=args.workdir))
    targets = [TARGETS[n](work) for n in names]
    for target in targets:
        if isinstance(target, EncfsGw):
            compile_package(target.binary)
    run_cgroup = make_run_cgroup()
    for t in targets:
        t.use_cgroup(run_cgroup)

    started = datetime.datetime.now()
    loads = [os.getloadavg()[0]]
    meta: dict = {"started": started.strftime("%Y-%m-%d %H:%M"),
                  "mode": "quick" if args.quick else "full",
                  "mode_flag": "--quick " if args.quick else "",
                  "machine": machine_info(work), "tools": tool_versions(),
                  "cpu_method": "cgroup2 cpu.stat usage_usec of a cgroup per target (its "
                                "daemon, the daemon's helpers and the mount command)"
                                if run_cgroup else "/proc: the daemon's process tree "
                                "(user+sys, reaped children and live helpers included)",
                  "checkout_start": checkout_state(), "status": "complete"}
    res = Results()
    t0, busy0, own0 = time.perf_counter(), machine_busy_s(), own_cpu_s()
    try:
        log(f"scratch dir {work}; staging fixtures")
        tree = stage_tree(work, cfg)
        meta.update(tree_entries=tree["entries"], tree_mib=tree["mib"],
                    tree_src=tree["origin"])
        runner = Runner(cfg, res, work, groups, tree, make_sql(work, cfg),
                        make_names(work, cfg.meta_entries))
        # Target i runs the scale workload in repetition i (mod reps): with as many
        # repetitions as targets, each runs it first in its repetition, after a sync.
        runner.scale_rep = {t.name: i % cfg.reps for i, t in enumerate(targets)}
        settle()
        for rep in range(cfg.reps):
            shift = rep % len(targets)
            for t in targets[shift:] + targets[:shift]:
                log(f"rep {rep + 1}/{cfg.reps}: {t.label} (load {load_avg()})")
                loads.append(os.getloadavg()[0])
                runner.run_target(t, rep)
    except KeyboardInterrupt:
        meta["status"] = "INTERRUPTED (partial results)"
        log("interrupted: cleaning up")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for t in targets:
            try:
                t.destroy()
            except Exception as exc:  # keep cleaning the others
                log(f"cleanup of {t.label} failed: {exc}")
        if run_cgroup is not None:
            remove_cgroup(run_cgroup)
        if args.keep:
            log(f"kept scratch dir {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    loads.append(os.getloadavg()[0])
    meta["wall_s"] = wall = time.perf_counter() - t0
    meta["versions"] = {t.name: t.describe() for t in targets}
    meta["checkout_end"] = checkout_state()
    # Other jobs' CPU = all CPU used during the run minus ours (kernel writeback threads
    # land on the "others" side, a few percent).
    others = (machine_busy_s() - busy0 - (own_cpu_s() - own0)) / (wall * (os.cpu_count() or 1))
    meta["machine"]["CPU used by other processes during the run"] = \
        f"{max(others, 0):.0%} of all cores"
    meta["machine"]["1-min load average at start, between targets and at end"] = \
        f"{min(loads):.2f}-{max(loads):.2f} (median {statistics.median(loads):.2f})"
    meta["shared"] = (f"other processes used {others:.0%} of the {os.cpu_count()} cores "
                      f"during the run" if others > 0.15 else "")
    report = render(res, targets, cfg, meta)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    md = RESULTS_DIR / f"{stamp}.md"
    md.write_text(report)
    (RESULTS_DIR / f"{stamp}.json").write_text(json.dumps(
        {"config": asdict(cfg), "meta": meta, "values": res.values,
         "failures": res.failures}, indent=1, default=str))
    print(report)
    log(f"wrote {md}")
    if meta["status"] != "complete":
        return 130
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
