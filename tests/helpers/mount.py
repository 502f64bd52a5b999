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

ENCFS_GW = [sys.executable, "-m", "encfs"]
TIMEOUT = 60


@dataclass
class Volume:
    backing: Path
    keyfile: Path | None  # None: open with the providers recorded in the volume


def run_cli(*args: str | os.PathLike, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run `encfs-gw ARGS` and capture its output (text)."""
    result = subprocess.run(
        [*ENCFS_GW, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"encfs-gw {' '.join(map(str, args))} exited {result.returncode}: {result.stderr}"
        )
    return result


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
        return
    pid = daemon_pid(volume.backing)
    result = run_cli("unmount", mountpoint)
    if result.returncode != 0 or is_mounted(mountpoint):
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        clear_mountpoint(mountpoint)
        raise AssertionError(f"clean unmount failed: {result.stderr}")
