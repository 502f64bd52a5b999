"""`init`, `mount` (foreground, background, as mount(8)'s helper) and `unmount`
(layer L7).
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import subprocess
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from encfs import hygiene
from encfs.cli.common import backing_argument, default_keyfile, operator_from, run_command
from encfs.errors import (
    EncfsError,
    MountFailed,
    MountpointError,
    NotMounted,
    UsageError,
)
from encfs.keys.registry import open_provider, parse_spec
from encfs.trust import Operator

log = logging.getLogger("encfs")


UNMOUNT_WAIT_SECONDS = 120


MOUNT_HELPER = "mount.fuse.encfs-gw"  # what mount(8) runs for type fuse.encfs-gw


# -o options consumed by encfs-gw, not passed to FUSE
ENGINE_OPTIONS = {"writeback_cache", "nonempty", "protect_mountpoint", "no_auto_unmount",
                  "audit_required", "no_cpu_warmer"}


# -o NAME=VALUE options consumed by encfs-gw: key health timing (seconds), the audit log,
# the modes (auto, on, off) of the CPU warmer and the request loop's busy-poll, and the
# request loop (auto, accelerated, stock: encfs.daemon.request_loop)
ENGINE_VALUE_OPTIONS = {
    "health_interval", "health_grace", "audit_log", "cpu_warmer", "busy_poll", "request_loop",
}


CPU_HELPER_MODES = ("auto", "on", "off")


# Tests only: a daemon stops itself (SIGSTOP) once unmounted, its volume closed and its
# keys wiped, so that a memory scan sees what it leaves (tests/integration/test_key_memory.py).
STOP_AT_EXIT_ENV = "ENCFS_GW_TEST_STOP_AT_EXIT"


def cmd_init(args: argparse.Namespace) -> int:
    from encfs.engine import create_volume

    backing = os.path.abspath(args.backing)
    if os.path.islink(backing):
        raise UsageError(f"{backing} is a symlink; give the directory itself")
    if args.provider and args.keyfile:
        raise UsageError(
            "--keyfile and --provider exclude each other (use --provider keyfile:PATH)"
        )
    spec = args.provider or f"keyfile:{args.keyfile or default_keyfile(backing)}"
    name, options = parse_spec(spec)
    provider = open_provider(name, options)
    operator = Operator(factory=open_provider)
    config = create_volume(backing, provider, args.block_size, operator)
    print(f"created volume {config.volume_id.hex()} in {backing}")
    print(f"key provider: {provider.describe()}")
    print(f"vouched for in the trust store {operator.store.directory}")
    return 0


def _split_options(raw: list[str]) -> tuple[list[str], dict[str, str]]:
    """FUSE options (passed through) and encfs-gw's own options (flags map to "")."""
    fuse_opts: list[str] = []
    engine_opts: dict[str, str] = {}
    for group in raw:
        for option in filter(None, (o.strip() for o in group.split(","))):
            name, has_value, value = option.partition("=")
            if option in ENGINE_OPTIONS:
                engine_opts[option] = ""
            elif name in ENGINE_VALUE_OPTIONS:
                if not has_value or not value:
                    raise UsageError(f"mount option {name} needs a value ({name}=...)")
                engine_opts[name] = value
            else:
                fuse_opts.append(option)
    return fuse_opts, engine_opts


def _seconds_option(engine_opts: dict[str, str], name: str, default: float) -> float:
    if name not in engine_opts:
        return default
    try:
        seconds = float(engine_opts[name])
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 1e9:
        raise UsageError(f"mount option {name}={engine_opts[name]}: expected seconds > 0")
    return seconds


def _cpu_helper_modes(engine_opts: dict[str, str]) -> tuple[str, str]:
    """(cpu_warmer, busy_poll) modes; -o no_cpu_warmer is cpu_warmer=off."""
    modes = []
    for name in ("cpu_warmer", "busy_poll"):
        mode = engine_opts.get(name, "auto")
        if mode not in CPU_HELPER_MODES:
            raise UsageError(f"mount option {name}={mode}: expected auto, on or off")
        modes.append(mode)
    if "no_cpu_warmer" in engine_opts:
        if modes[0] != "off" and "cpu_warmer" in engine_opts:
            raise UsageError(f"mount options no_cpu_warmer and cpu_warmer={modes[0]} contradict")
        modes[0] = "off"
    return modes[0], modes[1]


def cmd_mount(args: argparse.Namespace) -> int:
    if args.foreground:
        return _mount_foreground(args)
    return _mount_background(args)


def _mount_background(args: argparse.Namespace) -> int:
    """Start the daemon detached; return 0 only once the mount is live.

    The daemon is a fork of this process, not a new interpreter: it starts with the
    command line parsed and encfs-gw imported, which saves about 100 ms of mount time.
    """
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError as exc:  # EAGAIN (process limit), ENOMEM
        os.close(read_fd)
        os.close(write_fd)
        raise MountFailed(f"cannot start the daemon: {exc.strerror}") from None
    if pid == 0:  # the daemon: never returns into the caller's code
        code = 1
        try:
            os.close(read_fd)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.close(null)
            code = run_command(lambda a: _mount_foreground(a, ready_fd=write_fd), args)
        except BaseException:  # an internal error: its traceback and exit 1, as from main
            traceback.print_exc()
        finally:
            logging.shutdown()
            sys.stderr.flush()
            os._exit(code)
    # The daemon keeps our terminal until the mount is live (a passphrase prompt or a
    # PIN entry may need it), then lets go of it and starts its own session.
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as ready:
        message = ready.read()
    if message.startswith(b"READY"):
        return 0
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code == 0:
        raise MountFailed("the daemon exited before the mount was live")
    if code < 0:
        raise MountFailed(f"the daemon was killed by signal {-code} before the mount was live")
    return code


def _mount_foreground(args: argparse.Namespace, ready_fd: int | None = None) -> int:
    """Mount and serve until unmounted; `ready_fd` (background mode) hears READY once live."""
    from encfs import config_store
    from encfs.admin import reencrypt
    from encfs.daemon import health, request_loop
    from encfs.daemon import mount as mount_mod
    from encfs.daemon.mountpoint import check_mountpoint
    from encfs.daemon.systemd import Notifier, Service
    from encfs.engine import Volume

    backing = backing_argument(args.backing)
    mountpoint = os.path.abspath(args.mountpoint)
    fuse_opts, engine_opts = _split_options(args.options)
    nonempty = "nonempty" in engine_opts
    health_interval = _seconds_option(engine_opts, "health_interval", health.DEFAULT_INTERVAL)
    health_grace = _seconds_option(engine_opts, "health_grace", health.DEFAULT_GRACE)
    cpu_warmer, busy_poll = _cpu_helper_modes(engine_opts)
    loop_mode, loop_source = request_loop.requested_mode(engine_opts.get("request_loop"))
    options = mount_mod.fuse_options(backing, fuse_opts)

    # A background daemon shares the caller's terminal until the mount is live: show only
    # warnings and errors there (the failure line, not the informational log).
    if ready_fd is not None and not args.verbose:
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.WARNING)

    def on_ready() -> None:
        if ready_fd is None:
            return
        os.write(ready_fd, b"READY\n")
        os.close(ready_fd)
        _detach_stdio(args.log_file)
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.NOTSET)  # from now on stderr is the log file

    # sd_notify (a no-op outside a Type=notify unit); children do not inherit the socket.
    service = Service(Notifier.from_environment(), backing, mountpoint)
    try:
        mount_mod.harden_process()
        # "not a volume" before "mountpoint busy"; nothing of it is used before it is
        # authenticated but the volume id the audit log names.
        config = config_store.peek(backing)
        mount_mod.check_paths(backing, mountpoint)
        check_mountpoint(mountpoint, backing, allow_nonempty=nonempty)
        loop = request_loop.choose(loop_mode, loop_source)  # before any key is asked for
        if "no_auto_unmount" in engine_opts:
            log.warning("-o no_auto_unmount is ignored: a dead mount is kept by default")
        audit = _audit_log(config.volume_id, engine_opts)
        service.starting(f"unlocking {backing}")
        # an unfinished re-encryption is resumed: its journal and name pass before the
        # mount, its data pass by the daemon
        volume = Volume.unlock(backing, operator_from(args), audit=audit, reencrypting=True)
        try:
            reencrypt.mount_prepare(volume)
        except BaseException:
            volume.close()
            raise
        mount_mod.serve(
            volume,
            mountpoint,
            options,
            on_ready,
            writeback_cache="writeback_cache" in engine_opts,
            cpu_warmer=cpu_warmer,
            busy_poll=busy_poll,
            request_loop=loop,
            health_interval=health_interval,
            health_grace=health_grace,
            service=service,
            allow_nonempty=nonempty,
            protect_mountpoint="protect_mountpoint" in engine_opts,
        )
    except EncfsError as exc:
        service.failed(str(exc))
        raise
    if os.environ.get(STOP_AT_EXIT_ENV) == "1":
        os.kill(os.getpid(), signal.SIGSTOP)
    return 0


def _audit_log(volume_id: bytes, engine_opts: dict[str, str]) -> Any:
    """The key-use audit log: -o audit_log=PATH (0600, append), else the daemon's log.

    With -o audit_required the mount is refused (exit 18) if the log cannot be written.
    """
    from encfs.audit import AuditLog

    required = "audit_required" in engine_opts
    path = engine_opts.get("audit_log")
    if required and path is None:
        raise UsageError("-o audit_required needs -o audit_log=PATH")
    return AuditLog(volume_id, os.path.abspath(path) if path else None, required=required)


# Options mount(8) and fstab use for themselves; FUSE would reject them. (libmount drops
# x-*, comment=, defaults, noauto before calling a helper; the rest may still arrive.)
FSTAB_ONLY_OPTIONS = {
    "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group",
    "nofail", "_netdev", "rw",
}


def mount_helper(argv: Sequence[str] | None = None) -> int:
    """`mount.fuse.encfs-gw BACKING MOUNTPOINT [-sfnv] [-o OPTIONS] [-t TYPE]`.

    What mount(8) runs for `mount -t fuse.encfs-gw` and for fstab lines of that type
    (/sbin/mount.fuse.encfs-gw, a symlink to encfs-gw). `keyfile=PATH` and `log_file=PATH`
    become --keyfile/--log-file; fstab-only options are dropped; the rest goes to
    `encfs-gw mount -o`. Returns once the mount is live, like `encfs-gw mount`.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    positional: list[str] = []
    options: list[str] = []
    verbose = fake = False
    while args:
        arg = args.pop(0)
        if arg in ("-o", "-t", "-N") and not args:
            print(f"encfs-gw: error: mount helper option {arg} needs a value", file=sys.stderr)
            return UsageError.exit_code
        if arg == "-o":
            options += [o for o in args.pop(0).split(",") if o]
        elif arg == "-t":
            args.pop(0)  # fuse.encfs-gw: we know
        elif arg == "-N":
            print("encfs-gw: error: mount helper: -N (namespace) is not supported", file=sys.stderr)
            return UsageError.exit_code
        elif arg.startswith("-") and len(arg) > 1 and set(arg[1:]) <= set("sfnv"):
            verbose |= "v" in arg
            fake |= "f" in arg
        else:
            positional.append(arg)
    if len(positional) != 2:
        print(
            "encfs-gw: error: usage: mount.fuse.encfs-gw BACKING MOUNTPOINT [-o OPTIONS]",
            file=sys.stderr,
        )
        return UsageError.exit_code
    command = ["--verbose"] if verbose else []
    command += ["mount", *positional]
    fuse_options: list[str] = []
    for option in options:
        name, _, value = option.partition("=")
        if name == "keyfile" and value:
            command += ["--keyfile", value]
        elif name == "log_file" and value:
            command += ["--log-file", value]
        elif option in FSTAB_ONLY_OPTIONS or name.startswith("x-") or name == "comment":
            continue
        else:
            fuse_options.append(option)
    if fuse_options:
        command += ["-o", ",".join(fuse_options)]
    if fake:
        return 0
    from encfs.cli import app  # (app imports this module)

    return app.main(command)


def _detach_stdio(log_file: str | None) -> None:
    """After the mount is live the background daemon lets go of the caller's terminal."""
    null = os.open(os.devnull, os.O_RDWR)
    target = null
    if log_file:
        target = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(target, 2)
    os.setsid()


def cmd_unmount(args: argparse.Namespace) -> int:
    """fusermount3 -u, wait for the volume's daemon (the holder of its lock) to exit, then
    remove what the mount left on the mountpoint (its guard; the dead mounts of a daemon
    that died)."""
    from encfs.daemon import mountpoint as mountpoint_mod
    from encfs.daemon import runtime

    mountpoint = os.path.abspath(args.mountpoint)
    top = mountpoint_mod.top_mount(mountpoint)
    if top is not None and top.fstype == runtime.FSTYPE:
        backing = top.source
        entry = runtime.mount_entry(mountpoint)
        pidfd = _daemon_pidfd(entry) if entry is not None and entry["source"] == backing else None
        result = subprocess.run(
            ["fusermount3", "-u", mountpoint], capture_output=True, text=True, check=False,
            env=hygiene.helper_environment(),  # none of the operator's tokens or PINs
        )
        if result.returncode != 0:
            detail = (result.stderr.strip().splitlines() or ["unmount failed"])[-1]
            raise MountpointError(f"cannot unmount {mountpoint}: {detail}")
        if pidfd is not None:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            if not poller.poll(UNMOUNT_WAIT_SECONDS * 1000):
                raise MountFailed(f"the daemon of {mountpoint} did not exit after unmount")
            os.close(pidfd)
    elif top is not None and top.guarded_backing is not None:
        backing = top.guarded_backing  # the daemon died and its dead mount was removed
    else:
        raise NotMounted(f"{mountpoint} is not an encfs-gw mount")
    mountpoint_mod.remove_leftovers(mountpoint, backing)
    return 0


def _daemon_pidfd(entry: dict[str, str]) -> int | None:
    """A pidfd of the mount's daemon: the process holding its volume's lock, if it runs
    as the user the kernel says made the mount (so a mount that only claims a volume's
    backing directory as its source never makes us wait for that volume's daemon)."""
    from encfs.daemon import runtime

    pid = runtime.volume_lock_holder(entry["source"])
    if pid is None:
        return None
    options = dict(
        option.partition("=")[::2] for option in entry["super_options"].split(",")
    )
    if options.get("user_id") != str(runtime.process_euid(pid)):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None
