"""Mount lifecycle (layer L6): daemon hardening, pyfuse3 session, readiness, shutdown.

Readiness means the mount answers: after pyfuse3.init() the kernel still waits for the
session loop to answer INIT, so a worker thread stats the mountpoint and only then is
the caller told the mount is live (ready callback: the ready pipe of the forked
background mount; and sd_notify READY=1 through `encfs.daemon.systemd.Service`).

When the daemon dies its mount stays, dead (ENOTCONN), over a read-only guard (root), so
that nothing written by path lands in the directory underneath; the next mount of the
volume replaces the dead mount (encfs.daemon.mountpoint.MountSite, docs/systemd.md). A
deliberate end (SIGTERM, `umount`, `encfs-gw unmount`) removes the guard too.

An unmount ends the daemon once the mount is gone from the daemon's own mount namespace,
even where copies of it live on in other namespaces: a namespace created while the volume
was mounted, with private propagation (a container, `unshare -m`), holds a copy that an
unmount here does not reach, and the kernel would keep the connection, the daemon, its
keys and the volume lock for as long as that namespace lives (systemd-nspawn keeps the
host's mounts, hidden under the container's root, for the container's lifetime). The
daemon watches its mount table and ends the connection itself (it closes /dev/fuse, as
on a crash) once nothing is open through it: such copies answer ENOTCONN from then on.
Files still open (a lazy `umount -l` in the middle of a copy) are served until closed.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator

import pyfuse3
import trio

from encfs import hygiene
from encfs.daemon import health as health_mod
from encfs.daemon.control import ControlServer
from encfs.daemon.mountpoint import MountSite, MountTableWatch, still_mounted
from encfs.daemon.mountpoint import resolve as resolve_mountpoint
from encfs.daemon.request_loop import LoopChoice, RequestLoop, choose, open_loop
from encfs.daemon.supervisor import Supervisor
from encfs.daemon.systemd import Service
from encfs.engine import Volume
from encfs.errors import MountFailed, MountpointError, UsageError
from encfs.fuse.operations import Operations, drop_kernel_cache
from encfs.fuse.syncer import ThreadSyncer, open_syncer

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # <malloc.h> mallopt parameters
M_MMAP_THRESHOLD = -3
MALLOC_MMAP_BYTES = 32 << 20  # glibc's maximum mmap threshold on 64-bit
MALLOC_TRIM_BYTES = 256 << 20
READ_AHEAD_KB = 1024
# Seconds between our namespace's last mount going and the daemon ending a connection
# that another namespace keeps alive (the last unmount anywhere ends it before that).
UNMOUNTED_HERE_GRACE = 2.0
OPEN_RECHECK_SECONDS = 1.0  # then, while files are still open through it
# The mount table is read again at least this often, watch or no watch: /proc/self/mountinfo
# reports a change (EPOLLPRI) to the first poll that looks, and the accelerated loop's idle
# wait polls trio's epoll, which looks into the watch's: that poll took the change, and
# trio's own wait then saw nothing (the daemon of a plain `umount` never ended).
MOUNT_TABLE_RECHECK_SECONDS = 5.0
# No auto_unmount: a dead mount (ENOTCONN) is safer than an exposed directory
# (encfs.daemon.mountpoint); `-o auto_unmount` asks for it.
DEFAULT_FUSE_OPTIONS = ("default_permissions", "subtype=encfs-gw")
# What `-o` may pass to FUSE: the generic mount flags libfuse 3 knows and FUSE's access
# options (each mounts: tests/integration/test_cli_errors.py). fsname= and subtype= are
# the daemon's (clients find a mount's volume by them); others, such as max_read=, break
# the session after the mount, and libfuse refuses relatime and the like.
USER_FUSE_OPTIONS = (
    "allow_other", "allow_root", "default_permissions", "auto_unmount",
    "ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec",
    "noatime", "atime", "sync", "async", "dirsync",
)
DAEMON_FUSE_OPTIONS = ("fsname", "subtype")


def harden_process() -> None:
    """Not dumpable and no core dumps (they would hold keys and plaintext), many
    descriptors, umask 0.

    umask 0: the kernel already applied the caller's umask to the modes it sends us, so
    the backing objects get exactly the requested modes. Our own children never inherit
    it: key-provider programs run with hygiene.CHILD_UMASK.
    """
    hygiene.protect_secrets()
    libc = ctypes.CDLL(None, use_errno=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.umask(0)
    # Every request allocates ~1 MiB buffers: without this glibc hands them back to the
    # kernel and page-faults them in again each time (measured: 2x on 1 MiB reads).
    libc.mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_BYTES)
    libc.mallopt(M_TRIM_THRESHOLD, MALLOC_TRIM_BYTES)


def raise_readahead(mount_dev: int) -> None:
    """1 MiB READs instead of 128 KiB ones (sequential reads ~1.7x); root only, best effort.

    Takes the mount's st_dev, not its path: a stat of the mountpoint from the request
    loop's thread deadlocks when the kernel must ask this very loop (a program creating
    files there has invalidated the root's cached attributes)."""
    path = f"/sys/class/bdi/{os.major(mount_dev)}:{os.minor(mount_dev)}/read_ahead_kb"
    try:
        with open(path, "w") as knob:
            knob.write(str(READ_AHEAD_KB))
    except OSError as exc:
        log.debug("cannot raise the readahead of %s: %s", path, exc)


def escape_fsname(backing_path: str) -> str:
    return backing_path.replace("\\", "\\\\").replace(",", "\\,")


def fuse_options(backing_path: str, user_options: list[str]) -> list[str]:
    """The options of the FUSE mount, in a defined order: the daemon's, then the user's.

    The user cannot replace the daemon's (fsname names the backing directory, which is
    how `status`, `rotate` and `unmount` find the volume's daemon): UsageError.
    """
    options = list(DEFAULT_FUSE_OPTIONS)
    options.insert(0, f"fsname={escape_fsname(os.path.abspath(backing_path))}")
    for option in user_options:
        name = option.partition("=")[0]
        if name in DAEMON_FUSE_OPTIONS:
            raise UsageError(f"mount option {name}= is set by encfs-gw itself")
        if option not in USER_FUSE_OPTIONS:
            raise UsageError(
                f"unsupported mount option {option!r} (FUSE options: "
                f"{', '.join(USER_FUSE_OPTIONS)}; encfs-gw's own are in README.md)"
            )
        if option not in options:
            options.append(option)
    return options


def check_paths(backing_path: str, mountpoint: str) -> None:
    """The mountpoint is not a symlink, and neither path lies inside the other.

    A symlink would be followed by the mount but not by fusermount3 (and someone who
    can change it chooses where the volume appears); a mountpoint inside its own
    backing directory, or a backing directory under its mountpoint, would be hidden by
    the mount or loop back through it.
    """
    # readlink, not lstat: a mount left on the mountpoint gets no request (a stopped
    # daemon's would never answer).
    try:
        os.readlink(mountpoint)
    except OSError:
        pass  # not a symlink (EINVAL), or missing: check_mountpoint says which
    else:
        raise MountpointError(
            f"mountpoint {mountpoint} is a symlink; give the directory itself "
            f"({os.path.realpath(mountpoint)})"
        )
    real_backing = os.path.realpath(backing_path)
    real_mountpoint = resolve_mountpoint(mountpoint)
    for inner, outer, what in (
        (real_mountpoint, real_backing, "inside its backing directory"),
        (real_backing, real_mountpoint, "the backing directory is inside it"),
    ):
        if inner == outer or inner.startswith(outer.rstrip("/") + "/"):
            raise MountpointError(f"mountpoint {mountpoint}: {what} ({backing_path})")


def serve(
    volume: Volume,
    mountpoint: str,
    options: list[str],
    on_ready: Callable[[], None],
    writeback_cache: bool = False,
    cpu_warmer: str = "auto",
    busy_poll: str = "auto",
    request_loop: LoopChoice | None = None,
    service: Service | None = None,
    health_interval: float = health_mod.DEFAULT_INTERVAL,
    health_grace: float = health_mod.DEFAULT_GRACE,
    allow_nonempty: bool = False,
    protect_mountpoint: bool = False,
) -> None:
    """Mount, serve until unmounted or signalled, then flush and release everything.

    Called with the volume lock held: the mountpoint is made ready first (dead mounts of
    this volume replaced, the guard placed; `allow_nonempty`, `protect_mountpoint`: see
    encfs.daemon.mountpoint.MountSite). A deliberate end (SIGTERM: `systemctl stop`, or an
    unmount from outside) removes the guard as well; a crash leaves it.

    The key health task revalidates the key every `health_interval` seconds; on
    revocation the kernel's cached pages and attributes are dropped (drop_kernel_cache)
    and systemd's STATUS= line follows every state change.

    `request_loop`: the loop chosen (encfs.daemon.request_loop.choose; default: auto).
    `cpu_warmer`, `busy_poll`: "auto", "on" or "off" for the CPU warmer (it keeps the
    clients' CPUs awake while requests flow) and the accelerated request loop's spin
    before it sleeps; auto looks at the machine (encfs.fuse.accel.cpu_policy). Both are
    the accelerated loop's: off on the stock loop.

    `service` (sd_notify) hears READY=1 once the mount answers, STOPPING=1 on SIGTERM or
    when the mount goes away, and WATCHDOG=1 from the trio loop if the manager wants it.
    """
    service = service or Service.disabled()
    choice = request_loop or choose("auto", "auto")
    loop = open_loop(choice, cpu_warmer, busy_poll)
    site = MountSite(mountpoint, volume.backing_path, allow_nonempty, protect_mountpoint)
    supervisor = Supervisor(
        volume,
        health_interval=health_interval,
        health_grace=health_grace,
        invalidate=drop_kernel_cache,
        mount_options=list(options),
        mountpoint=site.target,
    )
    supervisor.on_state_change = lambda _line: service.set_health(
        supervisor.health.state.value, supervisor.health.reason
    )
    control = ControlServer(supervisor)
    syncer = open_syncer(loop.run_sync)
    operations = Operations(volume, syncer)
    operations.enable_writeback_cache = writeback_cache
    volume.defer_closes()
    if "ro" not in options:
        # What a killed daemon left of files unlinked while open (engine/orphans.py); a
        # read-only mount leaves it alone.
        cleared = volume.clear_orphans()
        if cleared:
            log.info("removed %d objects a previous mount left unlinked but open", cleared)
    try:
        site.prepare()
    except BaseException:
        control.close()
        raise
    fds_before = _socket_fds()
    try:
        # libfuse runs fusermount3 (not root, or with -o auto_unmount: it stays as the
        # watcher) with our environment: it gets none of the secrets in it.
        with _secrets_out_of_environ():
            pyfuse3.init(operations, mountpoint, options)
    except RuntimeError as exc:
        control.close()
        site.abandon()
        raise MountFailed(f"the kernel refused the FUSE mount on {mountpoint} ({exc})") from None
    try:
        site.mounted()
    except BaseException:
        pyfuse3.close(unmount=True)
        control.close()
        site.abandon()
        raise
    guard = None
    if "auto_unmount" in options:
        guard = _start_unmount_guard(mountpoint, _socket_fds() - fds_before)
    loop.start()
    supervisor.cpu_status = loop.status
    supervisor.request_loop = choice.report()
    clean = False
    ending = _Ending(lambda: volume.handle_stats()["open"])
    try:
        trio.run(
            _serve, mountpoint, on_ready, supervisor, control, service, loop, syncer, choice,
            ending,
        )
        clean = True
    finally:
        loop.stop()
        # After a crash the dead mount stays (ENOTCONN), over the guard. Unmounted here
        # already: nothing of ours to unmount (libfuse would detach the guard).
        service.stopping()
        pyfuse3.close(unmount=clean and not ending.unmounted_here)
        if clean:
            site.release()
        else:  # a crash: the dead mount and the guard stay
            site.leave()
        syncer.close()
        control.close()
        volume.sync()
        volume.close()
        if guard is not None and clean:
            os.close(guard[1])  # unmounted: the guard sees it and exits at once
            with contextlib.suppress(subprocess.TimeoutExpired):
                guard[0].wait(timeout=5)


# fusermount3's auto_unmount watcher wakes when its socket to the daemon closes, opens the
# mountpoint, and unmounts only if that fails with ENOTCONN. When the daemon is killed,
# the socket can close before the kernel aborts the FUSE connection; the open then fails
# with ECONNABORTED and the dead mount stays (3 kills in 12 here). So a small guard
# process holds a copy of that socket until the daemon is gone and the connection is
# aborted (ENOTCONN) or unmounted: then fusermount3's own check succeeds.
_GUARD = hygiene.HELPER_PRELUDE + """
import errno, os, signal, sys, time
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
mountpoint, pipe = sys.argv[1], int(sys.argv[2])
while os.read(pipe, 1):
    pass
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        if exc.errno != errno.ECONNABORTED:
            break
    else:
        same = os.fstat(fd).st_dev == os.stat(os.path.dirname(mountpoint) or "/").st_dev
        os.close(fd)
        if same:
            break
    time.sleep(0.02)
"""


@contextlib.contextmanager
def _secrets_out_of_environ() -> Iterator[None]:
    """Our environment without its secrets (the C environ too) for as long as it lasts."""
    saved = {name: os.environ.pop(name) for name in list(os.environ) if hygiene.is_secret_env(name)}
    try:
        yield
    finally:
        os.environ.update(saved)


def _socket_fds() -> set[int]:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                found.add(int(name))
    return found


def _start_unmount_guard(
    mountpoint: str, new_sockets: set[int]
) -> tuple[subprocess.Popen, int] | None:
    """The guard process, holding libfuse's socket to fusermount3 (see _GUARD)."""
    if len(new_sockets) != 1:
        log.debug("no fusermount3 socket found (%s): no unmount guard", sorted(new_sockets))
        return None
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        guard = subprocess.Popen(
            [sys.executable, "-I", "-c", _GUARD, mountpoint, str(read_end)],
            pass_fds=(read_end, *new_sockets),
            env=hygiene.helper_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        log.warning("cannot start the unmount guard: %s", exc)
        os.close(write_end)
        return None
    finally:
        os.close(read_end)
    return guard, write_end


async def _serve(
    mountpoint: str,
    on_ready: Callable[[], None],
    supervisor: Supervisor,
    control: ControlServer,
    service: Service,
    loop: RequestLoop,
    syncer: ThreadSyncer,
    choice: LoopChoice,
    ending: _Ending,
) -> None:
    async with trio.open_nursery() as nursery:
        if service.watchdog_interval:
            nursery.start_soon(_watchdog, service)
        await nursery.start(control.serve)
        await nursery.start(supervisor.run)
        await nursery.start(syncer.run)
        nursery.start_soon(loop.run_helpers)
        nursery.start_soon(_main_then_cancel, nursery.cancel_scope, service, loop)
        nursery.start_soon(_signal_ready, mountpoint, on_ready, service, choice, ending)
        nursery.start_soon(_handle_signals, service)


async def _main_then_cancel(scope: trio.CancelScope, service: Service, loop: RequestLoop) -> None:
    await loop.serve()
    service.stopping()
    scope.cancel()


class _Ending:
    """How the session ended: `unmounted_here` once the mount left our namespace;
    `open_handles()`: files and directories open through the mount now."""

    __slots__ = ("open_handles", "unmounted_here")

    def __init__(self, open_handles: Callable[[], int]) -> None:
        self.open_handles = open_handles
        self.unmounted_here = False


async def _signal_ready(
    mountpoint: str,
    on_ready: Callable[[], None],
    service: Service,
    choice: LoopChoice,
    ending: _Ending,
) -> None:
    watch = MountTableWatch()  # before the mount's device is known: no change is missed
    try:
        # In a thread: the kernel sends the GETATTR to this loop, which must be free to
        # answer.
        mount_stat = await trio.to_thread.run_sync(os.stat, mountpoint)
        raise_readahead(mount_stat.st_dev)
        on_ready()
        service.ready()
        # (after on_ready: in the log file of a background daemon too)
        log.info("mounted on %s; request loop: %s", mountpoint, choice.describe())
        await _end_when_unmounted_here(watch, mount_stat.st_dev, mountpoint, service, ending)
    finally:
        watch.close()


async def _end_when_unmounted_here(
    watch: MountTableWatch, device: int, mountpoint: str, service: Service, ending: _Ending
) -> None:
    """End the session once no mount of `device` (ours) is left in our namespace. Its
    last unmount anywhere ends the session anyway; this is for copies in other mount
    namespaces, which would otherwise keep the connection alive (module docstring)."""
    while still_mounted(device):  # (still here: bind mounts and moves count too)
        with trio.move_on_after(MOUNT_TABLE_RECHECK_SECONDS):
            await trio.lowlevel.wait_readable(watch)
        watch.drain()
    ending.unmounted_here = True
    # The last unmount ends the session itself a moment later (the kernel's DESTROY, then
    # ENODEV), which cancels this task; only a copy held elsewhere lets it run on.
    await trio.sleep(UNMOUNTED_HERE_GRACE)
    # Files still open through it: a lazy unmount (`umount -l`) lets them finish, and so
    # does the daemon (the kernel ends the session after their last close, unless a copy
    # elsewhere holds it: then this does, once nothing is open).
    if ending.open_handles():
        log.info("unmounted from %s with files still open through it: serving them until "
                 "they are closed", mountpoint)
        while ending.open_handles():
            await trio.sleep(OPEN_RECHECK_SECONDS)
        await trio.sleep(UNMOUNTED_HERE_GRACE)  # (the kernel's own end after the last close)
    log.warning("unmounted from %s, but another mount namespace still holds a copy of the "
                "mount: ending the FUSE connection (that copy answers ENOTCONN from now on)",
                mountpoint)
    service.stopping()
    pyfuse3.terminate()


async def _handle_signals(service: Service) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            service.stopping()
            pyfuse3.terminate()
            return


async def _watchdog(service: Service) -> None:
    """WATCHDOG=1 from the trio loop itself: if the loop hangs, the pings stop."""
    interval = service.watchdog_interval or 0.0
    while True:
        service.watchdog()
        await trio.sleep(interval)
