"""Mount lifecycle (layer L6): daemon hardening, pyfuse3 session, readiness, shutdown.

Readiness means the mount answers: after pyfuse3.init() the kernel still waits for the
session loop to answer INIT, so a worker thread stats the mountpoint and only then is
the caller told the mount is live (ready callback: the --ready-fd pipe of the
background mount, later sd_notify READY=1).
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
from collections.abc import Callable

import pyfuse3
import trio

from encfs.control import ControlServer
from encfs.errors import MountFailed, MountpointError
from encfs.fuse.operations import Operations
from encfs.keyring import ProviderFactory
from encfs.keys.registry import open_provider
from encfs.volume import Volume

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
FSTYPE = "fuse.encfs-gw"
DEFAULT_FUSE_OPTIONS = ("default_permissions", "subtype=encfs-gw")


def harden_process() -> None:
    """No core dumps (they would hold keys and plaintext), many descriptors, umask 0.

    umask 0: the kernel already applied the caller's umask to the modes it sends us, so
    the backing objects get exactly the requested modes.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.umask(0)


def escape_fsname(backing_path: str) -> str:
    return backing_path.replace("\\", "\\\\").replace(",", "\\,")


def check_mountpoint(mountpoint: str) -> None:
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountpointError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as exc:
        raise MountpointError(f"mountpoint {mountpoint}: {exc.strerror}") from None
    if not os.path.isdir(mountpoint):
        raise MountpointError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint) or find_mount(mountpoint) is not None:
        raise MountpointError(f"mountpoint {mountpoint} is already a mount point (busy)")
    del st


def _unescape_mountinfo(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def find_mount(mountpoint: str) -> tuple[str, str] | None:
    """(fstype, source) of the mount at `mountpoint`, from /proc/self/mountinfo."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            sep = fields.index("-")
            if _unescape_mountinfo(fields[4]) == target:
                found = (fields[sep + 1], _unescape_mountinfo(fields[sep + 2]))
    return found


def fuse_options(backing_path: str, user_options: list[str]) -> set[str]:
    options = set(DEFAULT_FUSE_OPTIONS)
    options.add(f"fsname={escape_fsname(os.path.abspath(backing_path))}")
    for option in user_options:
        options.add(option)
    return options


def serve(
    volume: Volume,
    mountpoint: str,
    options: set[str],
    on_ready: Callable[[], None],
    writeback_cache: bool = False,
    provider_factory: ProviderFactory = open_provider,
) -> None:
    """Mount, serve until unmounted or signalled, then flush and release everything."""
    control = ControlServer(volume, provider_factory)
    operations = Operations(volume)
    operations.enable_writeback_cache = writeback_cache
    try:
        pyfuse3.init(operations, mountpoint, options)
    except RuntimeError as exc:
        raise MountFailed(f"the kernel refused the FUSE mount on {mountpoint} ({exc})") from None
    clean = False
    try:
        trio.run(_serve, mountpoint, on_ready, control)
        clean = True
    finally:
        # After a crash, keep the (dead) mount rather than expose the empty directory
        # underneath to writers who think they write encrypted data.
        pyfuse3.close(unmount=clean)
        volume.sync()
        volume.close()


async def _serve(
    mountpoint: str, on_ready: Callable[[], None], control: ControlServer
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve)
        nursery.start_soon(_main_then_cancel, nursery.cancel_scope)
        nursery.start_soon(_signal_ready, mountpoint, on_ready)
        nursery.start_soon(_handle_signals)


async def _main_then_cancel(scope: trio.CancelScope) -> None:
    await pyfuse3.main()
    scope.cancel()


async def _signal_ready(mountpoint: str, on_ready: Callable[[], None]) -> None:
    await trio.to_thread.run_sync(os.stat, mountpoint)
    on_ready()
    log.info("mounted on %s", mountpoint)


async def _handle_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
