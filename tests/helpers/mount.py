"""Run the real `encfs-gw` command in child processes: init, mount, unmount.

`Mounted` mounts with the CLI's background mode (which returns only once the mount is
live, so no sleeps are needed) and always tears down in `finally`: a clean
`encfs-gw unmount`, else a lazy `fusermount3 -u -z` and a kill of the daemon.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from encfs.daemon.runtime import volume_lock_holder
from tests.helpers import logcheck

ENCFS_GW = [sys.executable, "-m", "encfs"]
TIMEOUT = 60


@dataclass
class Volume:
    backing: Path
    keyfile: Path | None  # None: open with the providers recorded in the volume


def run_cli(*args: str | os.PathLike, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run `encfs-gw ARGS` and capture its output (text).

    Its output is checked for tracebacks at the test's end (tests/helpers/logcheck.py).
    A background `mount` gets a `--log-file` the harness watches (unless it names one:
    then that one is watched), and its stderr up to the live mount is checked too.
    """
    argv = [str(arg) for arg in args]
    log_file = with_daemon_log(argv)
    result = subprocess.run(
        [*ENCFS_GW, *argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        **kwargs,
    )
    check_cli_output(argv, log_file, result.returncode, result.stdout, result.stderr)
    if check and result.returncode != 0:
        raise AssertionError(
            f"encfs-gw {' '.join(map(str, args))} exited {result.returncode}: {result.stderr}"
        )
    return result


def with_daemon_log(argv: list[str]) -> Path | None:
    """For a background `mount`: the daemon log the harness watches (added to `argv` if
    the test named none). None for any other command. (tests/helpers/logcheck.py)"""
    words = [a for a in argv if a not in ("-v", "--verbose")]
    if not words or words[0] != "mount" or "-f" in words or "--foreground" in words:
        return None
    positional = [a for a, before in zip(words[1:], words[:-1], strict=True)
                  if not a.startswith("-")
                  and before not in ("-o", "--keyfile", "--provider", "--log-file")]
    mountpoint = positional[1] if len(positional) > 1 else None
    if "--log-file" in argv:
        path = logcheck.watch(argv[argv.index("--log-file") + 1])
    else:
        new = logcheck.daemon_log_path(Path(mountpoint).name if mountpoint else "mount")
        if new is None:
            return None
        argv += ["--log-file", str(new)]
        path = logcheck.watch(new)
    if mountpoint is not None:
        _MOUNT_LOGS[os.path.abspath(mountpoint)] = path
    return path


def check_cli_output(
    argv: list[str], log_file: Path | None, returncode: int, stdout: str, stderr: str
) -> None:
    """Hand a finished `encfs-gw ARGV`'s output to the test's log check: tracebacks only,
    but every warning of a background mount that went live (its stderr until then)."""
    command = f"encfs-gw {' '.join(argv)}"
    if log_file is not None and returncode == 0:
        logcheck.feed(stderr, f"stderr of {command}")
    else:
        logcheck.feed(stderr, f"stderr of {command}", tracebacks_only=True)
    logcheck.feed(stdout, f"stdout of {command}", tracebacks_only=True)
    if log_file is not None and returncode != 0:
        logcheck.release(log_file)  # no daemon is left to write it
    if argv[:1] in (["unmount"], ["umount"]) and len(argv) > 1:
        released = _MOUNT_LOGS.pop(os.path.abspath(argv[1]), None)
        if released is not None:
            logcheck.release(released)


# The watched daemon log of each background mount, by mountpoint: released at unmount.
_MOUNT_LOGS: dict[str, Path] = {}


def init_volume(tmp_path: Path, name: str = "vol", block_size: int | None = None) -> Volume:
    backing = tmp_path / f"{name}.backing"
    keyfile = tmp_path / f"{name}.key"
    extra = ["--block-size", str(block_size)] if block_size else []
    run_cli("init", backing, "--keyfile", keyfile, *extra, check=True)
    return Volume(backing, keyfile)


def daemon_pid(backing: Path) -> int | None:
    """The process holding the volume lock (the daemon of a mount), from /proc/locks."""
    return volume_lock_holder(str(backing))


def is_mounted(mountpoint: Path) -> bool:
    """Anything mounted on `mountpoint`: a live or dead encfs-gw mount, or its guard."""
    target = os.path.join(os.path.realpath(os.path.dirname(mountpoint)),
                          os.path.basename(mountpoint))
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split()[4] == target for line in mountinfo)


def clear_mountpoint(mountpoint: Path) -> None:
    """After a failure or a kill: everything mounted on `mountpoint` detached (a test's
    cleanup, not what encfs-gw does)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(16):
        if not is_mounted(mountpoint):
            return
        libc.umount2(os.fsencode(mountpoint), 2)  # MNT_DETACH


def _limit_descriptors(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


@contextlib.contextmanager
def mounted(
    volume: Volume, mountpoint: Path, *options: str, nofile: int | None = None
) -> Iterator[Path]:
    """Mount `volume` on `mountpoint` for the block. nofile: the daemon's descriptor
    limit (soft and hard, so the daemon cannot raise it)."""
    mountpoint.mkdir(exist_ok=True)
    args = ["mount", volume.backing, mountpoint]
    if volume.keyfile is not None:
        args += ["--keyfile", volume.keyfile]
    for option in options:
        args += ["-o", option]
    limit = {} if nofile is None else {"preexec_fn": lambda: _limit_descriptors(nofile)}
    try:
        run_cli(*args, check=True, **limit)
    except (AssertionError, subprocess.TimeoutExpired):
        # A half-started daemon must not outlive the test (nor hold the mountpoint).
        pid = daemon_pid(volume.backing)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        clear_mountpoint(mountpoint)
        raise
    try:
        yield mountpoint
    finally:
        unmount(volume, mountpoint)


def unmount(volume: Volume, mountpoint: Path) -> None:
    if not is_mounted(mountpoint):
        released = _MOUNT_LOGS.pop(os.path.abspath(mountpoint), None)
        if released is not None:
            logcheck.release(released)
        return
    pid = daemon_pid(volume.backing)
    result = run_cli("unmount", mountpoint)
    if result.returncode != 0 or is_mounted(mountpoint):
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        clear_mountpoint(mountpoint)
        raise AssertionError(f"clean unmount failed: {result.stderr}")
