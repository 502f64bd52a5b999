"""The `encfs-gw` command line (layer L7).

Every failure is one line on stderr and a stable exit code (docs/EXITCODES.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, NoReturn

from encfs import __version__, hygiene
from encfs.errors import (
    INTERRUPTED,
    OTHER_EXIT_CODES,
    ControlSocketError,
    EncfsError,
    FsckProblems,
    MountFailed,
    MountpointError,
    NotAVolume,
    NotMounted,
    UsageError,
    exit_codes,
)
from encfs.format.blocks import DEFAULT_BLOCK_SIZE
from encfs.keys.registry import open_provider, parse_spec
from encfs.trust import Operator, OperatorSpec

log = logging.getLogger("encfs")

UNMOUNT_WAIT_SECONDS = 120
MOUNT_HELPER = "mount.fuse.encfs-gw"  # what mount(8) runs for type fuse.encfs-gw
# -o options consumed by encfs-gw, not passed to FUSE
ENGINE_OPTIONS = {"writeback_cache", "nonempty", "protect_mountpoint", "no_auto_unmount",
                  "audit_required", "no_cpu_warmer"}
# -o NAME=VALUE options consumed by encfs-gw: key health timing (seconds), the audit log,
# and the modes (auto, on, off) of the CPU warmer and the request loop's busy-poll
ENGINE_VALUE_OPTIONS = {"health_interval", "health_grace", "audit_log", "cpu_warmer", "busy_poll"}
CPU_HELPER_MODES = ("auto", "on", "off")
# Tests only: a daemon stops itself (SIGSTOP) once unmounted, its volume closed and its
# keys wiped, so that a memory scan sees what it leaves (tests/integration/test_key_memory.py).
STOP_AT_EXIT_ENV = "ENCFS_GW_TEST_STOP_AT_EXIT"


def default_keyfile(volume_hint: str) -> str:
    """Per-user default: $XDG_CONFIG_HOME/encfs-gw/keys/<name>.key, outside the volume."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    name = os.path.basename(os.path.normpath(volume_hint)) or "volume"
    return os.path.join(base, "encfs-gw", "keys", f"{name}-{os.urandom(4).hex()}.key")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (`encfs-gw: error: ...`) and exit code 2, like every error."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("encfs-gw").strip()
        where = f" {command}" if command else ""
        print(
            f"encfs-gw: error: {one_line(message)} (see encfs-gw{where} --help)",
            file=sys.stderr,
        )
        raise SystemExit(UsageError.exit_code)


def _key_arguments(parser: argparse.ArgumentParser) -> None:
    """The operator names the key providers it vouches for (else: the trust store's)."""
    parser.add_argument(
        "--keyfile", metavar="PATH", help="open the volume with this key file (vouched by you)"
    )
    parser.add_argument(
        "--provider",
        dest="providers",
        action="append",
        default=[],
        metavar="SPEC",
        help="open the volume with this key provider (vouched by you; repeatable)",
    )
MAX_RATE = 1e9  # DEKs per second: far beyond any machine, so "no limit" in practice


def _positive_rate(text: str) -> float:
    """--rate: a finite number of DEKs per second, > 0 (not nan, inf or negative)."""
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not 0 < rate <= MAX_RATE:  # also false for nan
        raise argparse.ArgumentTypeError(f"expected DEKs per second, 0 < N <= 1e9: {text!r}")
    return rate


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="encfs-gw",
        description="Transparent encrypting storage gateway (FUSE).",
    )
    parser.add_argument("--version", action="version", version=f"encfs-gw {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", help="create a volume in an empty directory")
    init.add_argument("backing", metavar="BACKING")
    init.add_argument("--keyfile", metavar="PATH", help="key file to create (keyfile provider)")
    init.add_argument(
        "--provider", metavar="SPEC", help="key provider spec (default: keyfile:PATH)"
    )
    init.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, metavar="N")

    mount = sub.add_parser("mount", help="mount a volume")
    mount.add_argument("backing", metavar="BACKING")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT")
    mount.add_argument("-f", "--foreground", action="store_true", help="stay attached")
    mount.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="comma-separated mount options (allow_other, ro, writeback_cache, ...)",
    )
    _key_arguments(mount)
    mount.add_argument("--log-file", metavar="PATH", help="daemon log (background mode)")

    provider = sub.add_parser("provider", help="list, add or remove key providers (keyslots)")
    provider_sub = provider.add_subparsers(dest="provider_command", required=True)
    p_list = provider_sub.add_parser("list", help="show the keyslots of every KEK version")
    p_list.add_argument("backing", metavar="BACKING")
    p_add = provider_sub.add_parser("add", help="protect the KEKs under one more provider")
    p_add.add_argument("backing", metavar="BACKING")
    p_add.add_argument("spec", metavar="SPEC")
    _key_arguments(p_add)
    p_remove = provider_sub.add_parser("remove", help="remove a keyslot (never the last)")
    p_remove.add_argument("backing", metavar="BACKING")
    p_remove.add_argument("slot", metavar="SLOT", help="its number in `provider list`, or its id")
    _key_arguments(p_remove)
    p_check = provider_sub.add_parser(
        "check", help="preflight every protector now: key, version, state, unwrap time"
    )
    p_check.add_argument("backing", metavar="TARGET", help="backing directory or mountpoint")
    p_check.add_argument("--json", action="store_true", help="the report as one JSON object")
    _key_arguments(p_check)

    rotate = sub.add_parser("rotate", help="new KEK version; re-wrap every DEK (no re-encryption)")
    rotate.add_argument("target", metavar="TARGET", help="backing directory or mountpoint")
    rotate.add_argument(
        "--rate", type=_positive_rate, metavar="DEKS_PER_S", help="throttle the pass"
    )
    rotate.add_argument("--json", action="store_true", help="progress and result as JSON lines")
    rotate.add_argument(
        "--purge-old", action="store_true", help="drop old KEK versions once none is needed"
    )
    _key_arguments(rotate)

    every = sub.add_parser(
        "rotate-every", help="let the daemon rotate automatically (a policy in the volume)"
    )
    every.add_argument("target", metavar="TARGET", help="backing directory or mountpoint")
    every.add_argument(
        "interval",
        metavar="INTERVAL",
        help="90d, 12h, 30m, 45s (a bare number is days), or 'off' to remove the policy",
    )
    every.add_argument(
        "--purge-old", action="store_true", help="drop old KEK versions after each pass"
    )
    _key_arguments(every)

    status = sub.add_parser("status", help="KEK versions and the DEKs that depend on them")
    status.add_argument("target", metavar="TARGET", help="backing directory or mountpoint")
    status.add_argument("--json", action="store_true")
    status.add_argument(
        "--check", action="store_true", help="revalidate the key with its provider now (mounted)"
    )
    _key_arguments(status)

    rewrap = sub.add_parser(
        "rewrap-kek", help="re-protect the stored KEKs after the provider's own key rotated"
    )
    rewrap.add_argument("target", metavar="TARGET", help="backing directory or mountpoint")
    _key_arguments(rewrap)

    fsck = sub.add_parser("fsck", help="check (and --repair) an unmounted volume")
    fsck.add_argument("backing", metavar="BACKING")
    fsck.add_argument("--repair", action="store_true", help="fix what needs no guessing")
    fsck.add_argument("--json", action="store_true", help="the report as one JSON object")
    _key_arguments(fsck)
    fsck.add_argument(
        "--export-quarantine",
        metavar="DIR",
        help="write the quarantined evidence and what of it decrypts into DIR (new or "
        "empty), outside the volume; checks nothing",
    )

    destroy = sub.add_parser(
        "destroy", help="crypto-shred a volume: destroy every KEK record (irreversible)"
    )
    destroy.add_argument("backing", metavar="BACKING")
    destroy.add_argument(
        "--yes-destroy-all-data",
        dest="confirm",
        required=True,
        metavar="VOLUME_ID",
        help="the volume id (encfs-gw status shows it) as confirmation",
    )
    destroy.add_argument("--audit-log", metavar="PATH", help="append the crypto_shred event")
    _key_arguments(destroy)

    upgrade = sub.add_parser(
        "upgrade", help="authenticate the config of a volume made before config authentication"
    )
    upgrade.add_argument("backing", metavar="BACKING")
    upgrade.add_argument(
        "--trust-stored",
        action="store_true",
        help="vouch for every provider the old config names (after reviewing the list)",
    )
    _key_arguments(upgrade)

    trust = sub.add_parser(
        "trust", help="show or change what this host vouches for a volume (the trust store)"
    )
    trust.add_argument("backing", metavar="BACKING")
    trust.add_argument(
        "--accept-rollback",
        action="store_true",
        help="accept a config older than the one seen before (a backup restored on purpose)",
    )
    trust.add_argument(
        "--forget",
        metavar="VOLUME_ID",
        help="forget a volume (e.g. the one this path held before it was replaced)",
    )
    _key_arguments(trust)

    unmount = sub.add_parser("unmount", aliases=["umount"], help="flush and unmount")
    unmount.add_argument("mountpoint", metavar="MOUNTPOINT")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and os.path.basename(sys.argv[0]) == MOUNT_HELPER:
        return mount_helper()  # run as /sbin/mount.fuse.encfs-gw (a symlink to encfs-gw)
    # Every verb may unwrap a key or read a secret (a passphrase, a PIN, a token):
    # nothing of this process may be read by others of the uid, nor dumped.
    hygiene.protect_secrets()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one-line usage error
        return int(exc.code or 0) and UsageError.exit_code
    daemon = args.command == "mount"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("encfs-gw: %(levelname)s %(message)s"))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if daemon else logging.WARNING,
        handlers=[handler],
    )
    return _run(COMMANDS[args.command], args)


def one_line(text: str) -> str:
    """`text` as one printable line: control characters (a newline in a path) and bytes
    that are not UTF-8 escaped, as Python writes them."""
    text = os.fsencode(text).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class _OneLineFormatter(logging.Formatter):
    """Log lines never break: a path with a newline in a message is escaped. (Tracebacks
    of internal errors keep their lines.)"""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return one_line(super().formatMessage(record))


def _run(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run one command: an EncfsError becomes its one line and its exit code."""
    try:
        return command(args)
    except EncfsError as exc:
        return _report(exc)
    except BaseExceptionGroup as group:  # from the daemon's trio nursery
        first = _first_encfs_error(group)
        if first is None:
            raise
        return _report(first)
    except KeyboardInterrupt:
        return INTERRUPTED
    except OSError as exc:  # a system error no layer turned into its own: still one line
        log.debug("unexpected system error", exc_info=True)
        what = f": {exc.filename}" if exc.filename else ""
        print(f"encfs-gw: error: {one_line(f'{exc.strerror or exc}{what}')}", file=sys.stderr)
        return EncfsError.exit_code


def _report(exc: EncfsError) -> int:
    print(f"encfs-gw: error: {one_line(str(exc))}", file=sys.stderr)
    return exc.exit_code


def _first_encfs_error(group: BaseExceptionGroup) -> EncfsError | None:
    """The error to report when every leaf of the group is an EncfsError."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending[:0] = list(exc.exceptions)
        else:
            leaves.append(exc)
    if leaves and all(isinstance(leaf, EncfsError) for leaf in leaves):
        return leaves[0]  # type: ignore[return-value]
    return None


def backing_argument(path: str) -> str:
    """The absolute path of a BACKING argument; never a symlink (the volume is opened
    with O_NOFOLLOW, and a symlink someone else controls would choose the volume)."""
    absolute = os.path.abspath(path)
    if os.path.islink(absolute):
        raise NotAVolume(
            f"{absolute} is a symlink; give the backing directory itself "
            f"({os.path.realpath(absolute)})"
        )
    return absolute


# --- init ---------------------------------------------------------------------------------


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


# --- mount --------------------------------------------------------------------------------


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


def _operator(args: argparse.Namespace) -> Operator:
    """What this command's operator vouches for: the providers named on the command line
    (--keyfile, --provider, in that order) and the trust store. The CLI is a composition
    root: the registry makes the providers (docs/dev/ARCHITECTURE.md)."""
    specs = [OperatorSpec.keyfile(args.keyfile)] if getattr(args, "keyfile", None) else []
    specs += [OperatorSpec(*parse_spec(spec)) for spec in getattr(args, "providers", [])]
    return Operator(specs, factory=open_provider)


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
            code = _run(lambda a: _mount_foreground(a, ready_fd=write_fd), args)
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
    from encfs.daemon import health
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
        if "no_auto_unmount" in engine_opts:
            log.warning("-o no_auto_unmount is ignored: a dead mount is kept by default")
        audit = _audit_log(config.volume_id, engine_opts)
        service.starting(f"unlocking {backing}")
        volume = Volume.unlock(backing, _operator(args), audit=audit)
        mount_mod.serve(
            volume,
            mountpoint,
            options,
            on_ready,
            writeback_cache="writeback_cache" in engine_opts,
            cpu_warmer=cpu_warmer,
            busy_poll=busy_poll,
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
    return 0 if fake else main(command)


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


# --- provider -----------------------------------------------------------------------------


def cmd_provider(args: argparse.Namespace) -> int:
    from encfs.admin import keyslots

    if args.provider_command == "check":
        return _provider_check(args)
    backing = backing_argument(args.backing)
    if args.provider_command == "list":
        for row in keyslots.list_protectors(backing, _operator(args)):
            marker = " (current)" if row["current"] else ""
            print(
                f"KEK v{row['kek_version']}{marker} {row['state']}: "
                f"slot {row['slot']}: {row['provider']} (id {row['id']})"
            )
    elif args.provider_command == "add":
        name, options = parse_spec(args.spec)
        count = keyslots.add_protector(backing, name, options, _operator(args))
        print(f"added {name} to {count} KEK version(s)")
    else:
        removed = keyslots.remove_protector(backing, args.slot, _operator(args))
        print(f"removed keyslot {args.slot}: {removed}")
    return 0


def _provider_check(args: argparse.Namespace) -> int:
    """Run every vouched protector's preflight (mounted or not): one line (or JSON entry)
    each; exits with the first failure's code after reporting them all. Only providers
    the operator vouched for run, on the records of their keyslots, as when the volume
    is opened; a keyslot nobody here vouched for is reported, never run."""
    import time

    from encfs import config_store
    from encfs.errors import KeyAccessError, NotVouched

    backing, mounted, _ = _resolve_target(args.backing)
    config = config_store.peek(backing)
    operator = _operator(args)
    operator.resolve(config.volume_id.hex(), backing)
    results: list[dict[str, Any]] = []
    first_error: KeyAccessError | None = None
    for number, version in sorted(config.kek_versions.items()):
        for slot, protector in enumerate(version.protectors):
            row: dict[str, Any] = {"kek_version": number, "slot": slot, "id": protector.id}
            try:
                provider = operator.provider(protector)
            except NotVouched:
                row.update(ok=None, provider=protector.kind, skipped="not vouched for on this host")
                results.append(row)
                continue
            row["provider"] = provider.describe()
            binding = config.provider_binding(number)
            started = time.monotonic()
            try:
                row.update(ok=True, **provider.inspect(protector.record, binding))
            except KeyAccessError as exc:
                first_error = first_error or exc
                row.update(ok=False, error=str(exc), exit_code=exc.exit_code)
                row["key_version"] = provider.key_version(protector.record)
            finally:
                provider.close()
            row["seconds"] = round(time.monotonic() - started, 3)
            results.append(row)
    if args.json:
        report = {"backing": backing, "mounted": mounted, "ok": first_error is None}
        print(json.dumps({**report, "protectors": results}))
    else:
        for row in results:
            where = f"KEK v{row['kek_version']} slot {row['slot']} {row['provider']}"
            if row["ok"] is None:
                print(f"{where}: SKIPPED: {row['skipped']}")
                continue
            if not row["ok"]:
                print(f"{where}: FAILED: {row['error']}")
                continue
            version = row.get("key_version")
            current = row.get("current_key_version")
            words = [f"key {row.get('key', row['provider'])}"]
            if version is not None:
                words.append(
                    f"key version {version}"
                    + ("" if current in (None, version) else f" (provider's current: {current})")
                )
            words.append(f"state {row.get('state')}")
            words.append(f"proven: {', '.join(row.get('proven', []))}")
            words.append(f"unwrap {row.get('unwrap_ms')} ms")
            print(f"{where}: OK: " + "; ".join(words))
    if first_error is not None:
        failed = sum(row["ok"] is False for row in results)
        raise _error_with_code(
            f"{failed} of {len(results)} protector(s) failed the check (first: {first_error})",
            first_error.exit_code,
        )
    return 0


# --- rotate, status, rewrap-kek -------------------------------------------------------------


class _Target(NamedTuple):
    backing: str
    mounted: bool
    mountpoint: str | None  # when TARGET was a mountpoint: the daemon must serve it


def _resolve_target(target: str) -> _Target:
    """The backing directory of a TARGET (a backing directory or an encfs-gw mountpoint:
    the topmost mount there, ours or the guard a dead one left), and whether its daemon
    runs (its control socket is there; the daemon's identity is checked when it is
    reached)."""
    from encfs import client
    from encfs.daemon.mountpoint import resolve, top_mount

    path = os.path.abspath(target)
    top = top_mount(path)
    if top is not None and top.fstype == client.FSTYPE:
        return _Target(top.source, True, resolve(path))
    guarded = top.guarded_backing if top is not None else None
    backing = guarded or backing_argument(path)
    return _Target(backing, client.daemon_listening(backing), None)


def _ask_daemon(target: _Target, request: dict) -> Any:
    """The replies of the volume's daemon (identity checked, see encfs.client)."""
    from encfs import client

    return client.request(target.backing, request, target.mountpoint)


def _one_reply(target: _Target, request: dict) -> dict:
    replies = list(_ask_daemon(target, request))
    if len(replies) != 1:
        raise ControlSocketError(
            f"malformed reply from the daemon of {target.backing} "
            f"({len(replies)} lines, not one)"
        )
    reply = replies[0]
    if "error" in reply:
        raise _error_with_code(reply["error"], reply.get("exit_code", 1))
    return reply


class _Progress:
    """A progress bar on a terminal, periodic lines otherwise, JSON lines with --json."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.tty = sys.stderr.isatty() and not as_json
        self.last = 0.0

    def __call__(self, stats: Any) -> None:
        """`stats`: a dict, or an object with as_dict() (built only when a line is due)."""
        import time

        now = time.monotonic()
        if now - self.last < (0.2 if self.tty else 1.0 if self.as_json else 5.0):
            return
        self.last = now
        if not isinstance(stats, dict):
            stats = stats.as_dict()
        if self.as_json:
            print(json.dumps({"progress": stats}), flush=True)
            return
        eta = stats.get("eta")
        line = (
            f"re-wrap: {stats['files_done']}/{stats['files_total']} files, "
            f"{stats['deks_rewrapped']} DEKs, "
            f"{stats['key_bytes_written'] / 1048576:.1f} MiB of key records"
            + (f", ETA {eta:.0f} s" if eta is not None else "")
        )
        print(
            ("\r" + line) if self.tty else line,
            end="" if self.tty else "\n",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def _print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    versions = ", ".join(f"v{v}: {n}" for v, n in result.get("deks_per_version", {}).items())
    print(f"KEK version {result['target']} is current; DEKs per KEK version: {versions or 'none'}")
    if result.get("done"):
        gone = result.get("retired", result.get("purged", []))
        verb = "purged" if "purged" in result else "retired"
        print(
            f"re-wrapped {result['deks_rewrapped']} DEKs in {result['elapsed']:.1f} s; "
            f"{verb} KEK version(s): {', '.join(map(str, gone)) or 'none'}"
        )
    else:
        print("the pass left DEKs under older versions (see warnings); run rotate again")


def cmd_rotate(args: argparse.Namespace) -> int:
    target = _resolve_target(args.target)
    backing, mounted = target.backing, target.mounted
    progress = _Progress(args.json)
    if mounted:
        result: dict = {}
        request = {"op": "rotate", "rate": args.rate, "purge_old": args.purge_old}
        for message in _ask_daemon(target, request):
            if "progress" in message:
                progress(message["progress"])
            elif "error" in message:
                progress.close()
                raise (
                    EncfsError(message["error"])
                    if message.get("exit_code") is None
                    else _error_with_code(message["error"], message["exit_code"])
                )
            else:
                result = message
    else:
        from encfs.admin import rotation
        from encfs.engine import Volume

        volume = Volume.unlock(backing, _operator(args))
        try:
            result = rotation.rotate_offline(
                volume,
                rate=args.rate,
                purge_old=args.purge_old,
                on_progress=progress,
            )
        finally:
            volume.close()
    progress.close()
    try:
        _print_result(result, args.json)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ControlSocketError(f"malformed reply from the daemon of {backing}") from None
    return 0 if result.get("done") else 1


# Codes a daemon may report in an error reply; anything else is a malformed reply.
def _error_with_code(message: Any, code: Any) -> EncfsError:
    known = set(exit_codes()) - set(OTHER_EXIT_CODES)
    if not isinstance(message, str) or type(code) is not int or code not in known:
        return ControlSocketError("malformed error reply from the daemon")
    error = EncfsError(message)
    error.exit_code = code
    return error


def cmd_status(args: argparse.Namespace) -> int:
    target = _resolve_target(args.target)
    backing, mounted = target.backing, target.mounted
    if mounted:
        reply = _one_reply(target, {"op": "status", "check": args.check})
    else:
        from encfs.admin import rotation, status
        from encfs.engine import Volume

        volume = Volume.unlock(backing, _operator(args))
        try:
            reply = status.volume_report(volume, rotation.census(volume))
        finally:
            volume.close()
    reply["mounted"] = mounted
    if args.json:
        print(json.dumps(reply))
        return 0
    try:
        lines = _status_lines(reply, mounted)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ControlSocketError(f"malformed status reply from the daemon of {backing}") from None
    print("\n".join(lines))
    return 0


def _status_lines(reply: dict, mounted: bool) -> list[str]:
    """The report, built whole before a line is printed (a malformed reply prints none)."""
    lines = [
        f"volume: {reply['backing']} ({'mounted' if mounted else 'not mounted'})",
        f"volume id: {reply['volume_id']}",
    ]
    if mounted:
        lines.append(f"key health: {reply['state']}: {reply['reason']}")
        if reply.get("last_check") is not None:
            lines.append(f"last check: {reply['last_check']}")
        lines.append(f"providers: {', '.join(reply['providers'])}")
        lines.append(f"mount options: {','.join(reply['mount_options']) or '(defaults)'}")
        lines.append("counters: " + ", ".join(f"{k}={v}" for k, v in reply["counters"].items()))
        if reply.get("cpu"):
            lines += _cpu_lines(reply["cpu"])
    for number, state in reply["kek_versions"].items():
        current = " (current)" if int(number) == reply["current_kek"] else ""
        deks = reply["deks_per_version"].get(number, 0)
        lines.append(f"KEK version {number}{current}: {state}, {deks} DEKs")
        for row in reply.get("key_versions", {}).get(number, []):
            key_version = row.get("key_version")
            suffix = f" (provider key version {key_version})" if key_version is not None else ""
            lines.append(f"  slot {row['slot']}: {row['provider']}{suffix}")
    if reply.get("rotation"):
        lines.append(
            f"rotation to version {reply['rotation']['target']} in progress: run rotate to resume"
        )
    if reply.get("rotation_policy"):
        lines.append(_policy_line(reply["rotation_policy"], reply["next_rotation"]))
    return lines + rotation_summary_lines(reply)


def _cpu_lines(cpu: dict) -> list[str]:
    """The CPU warmer and the busy-poll: on or off, why, and the CPU time they used."""
    lines = []
    for key, label in (("cpu_warmer", "CPU warmer"), ("busy_poll", "busy-poll")):
        helper = cpu[key]
        state = "on" if helper["on"] else "off"
        if helper["on"] and helper.get("running") is False:
            state = "on, not running (one CPU, or it could not start: see the log)"
        lines.append(
            f"{label}: {state} ({helper['reason']}); {float(helper['cpu_seconds']):.3f} CPU s"
        )
    if "deferred_closes" in cpu:
        lines.append(
            "deferred closes: on (idle CPU time)" if cpu["deferred_closes"]
            else "deferred closes: off (a helper spins: closed by the request loop)"
        )
    return lines


def rotation_summary_lines(reply: dict) -> list[str]:
    """What the census says about the KEK versions DEKs depend on."""
    lines = []
    unknown = reply.get("unknown_kek_versions") or {}
    if unknown:
        versions = ", ".join(f"v{v} ({n} DEKs)" for v, n in unknown.items())
        lines.append(
            f"WARNING: DEKs are wrapped under KEK version(s) this config does not know: "
            f"{versions}; those blocks read as EIO. The config is older than the data "
            "(rolled back?) or the key areas were altered"
        )
    malformed = reply.get("malformed_key_records", 0)
    if malformed:
        lines.append(f"WARNING: {malformed} key record(s) are malformed (run fsck)")
    retired_needed = [
        n
        for n, state in reply["kek_versions"].items()
        if state == "retired" and reply["deks_per_version"].get(n, 0)
    ]
    if retired_needed:
        lines.append(f"DEKs still depend on retired version(s) {', '.join(retired_needed)}")
    elif not unknown:
        lines.append("no DEK depends on a retired KEK version")
    return lines


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(text: str) -> int | None:
    """'90d', '12h', '30m', '45s' or a bare number of days -> seconds; 'off' -> None."""
    text = text.strip().lower()
    if text == "off":
        return None
    unit = DURATION_UNITS.get(text[-1:])
    number = text[:-1] if unit else text
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UsageError(f"interval {text!r}: use 90d, 12h, 30m, 45s or off")
    seconds = round(min(value, 1e12) * (unit or DURATION_UNITS["d"]))
    if not 1 <= seconds <= 100 * 365 * 86400:
        raise UsageError(f"interval {text!r}: between 1 second and 100 years")
    return seconds


def cmd_rotate_every(args: argparse.Namespace) -> int:
    every_seconds = parse_interval(args.interval)
    target = _resolve_target(args.target)
    backing, mounted = target.backing, target.mounted
    if mounted:  # the daemon holds the keys that authenticate the config: it writes it
        request = {"op": "policy", "every_seconds": every_seconds, "purge_old": args.purge_old}
        summary = _one_reply(target, request)
        if summary.get("rotated_to") is not None:
            print(f"the policy was due: rotated to KEK version {summary['rotated_to']} now")
    else:
        from encfs.admin import rotation
        from encfs.engine import Volume

        volume = Volume.unlock(backing, _operator(args))
        try:
            summary = rotation.policy_summary(
                rotation.set_policy(volume, every_seconds, args.purge_old)
            )
        finally:
            volume.close()
    if summary["rotation_policy"] is None:
        print("automatic rotation: off")
    else:
        print(
            _policy_line(summary["rotation_policy"], summary["next_rotation"])
            + (" (by the daemon of this mount)" if mounted else " (by the daemon, once mounted)")
        )
    return 0


def format_interval(seconds: int) -> str:
    """The inverse of parse_interval for whole units: 2592000 -> '30d', 5400 -> '90m'."""
    for unit in ("d", "h", "m"):
        if seconds % DURATION_UNITS[unit] == 0:
            return f"{seconds // DURATION_UNITS[unit]}{unit}"
    return f"{seconds}s"


def _policy_line(policy: dict, next_rotation: str) -> str:
    purge = ", purging old versions" if policy["purge_old"] else ""
    return (
        f"automatic rotation every {format_interval(policy['every_seconds'])}{purge}; "
        f"next rotation {next_rotation}"
    )


def cmd_rewrap_kek(args: argparse.Namespace) -> int:
    from encfs.admin import keyslots

    backing = _resolve_target(args.target).backing
    count = keyslots.rewrap_keks(backing, _operator(args))
    print(f"re-protected {count} stored KEK blob(s) under the providers' current keys")
    return 0


# --- fsck, destroy ---------------------------------------------------------------------------


def cmd_fsck(args: argparse.Namespace) -> int:
    from encfs.admin import fsck as fsck_mod
    from encfs.engine import Volume

    backing = backing_argument(args.backing)
    if args.export_quarantine is not None and args.repair:
        raise UsageError("--export-quarantine checks and repairs nothing: not with --repair")
    volume = Volume.unlock(backing, _operator(args))  # takes the lock: not mounted
    # The report names every damaged block (with its plaintext path): the engine's own
    # per-block warnings would only repeat it with inode numbers.
    logging.getLogger("encfs.engine").setLevel(logging.ERROR)
    if args.export_quarantine is not None:
        return _export_quarantine(volume, os.path.abspath(args.export_quarantine), args.json)
    bar = _FsckProgress(enabled=sys.stderr.isatty() and not args.json)
    try:
        report = fsck_mod.fsck(volume, repair=args.repair, on_progress=bar)
    finally:
        bar.close()
        volume.close()
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        for finding in report.findings:
            block = f" block {finding.block}" if finding.block is not None else ""
            state = (
                "repaired" if finding.repaired
                else "repairable (--repair)" if finding.repairable
                else "NOT repairable"
            )
            path = _printable(finding.path)
            kept = f", evidence in quarantine {finding.quarantine}" if finding.quarantine else ""
            print(
                f"{path}{block}: {finding.kind}: {finding.detail} "
                f"[looks like {finding.looks_like}; {state}{kept}]"
            )
        summary = report.as_dict()
        print(
            f"checked {report.files} files, {report.directories} directories, "
            f"{report.symlinks} symlinks, {report.blocks} blocks "
            f"({report.bytes / 1048576:.1f} MiB): {len(report.findings)} problem(s), "
            f"{summary['repaired']} repaired, {summary['remaining']} remaining"
        )
        if report.quarantined:
            print(
                f"the quarantine holds {report.quarantined} item(s) of evidence: "
                f"encfs-gw fsck {_printable(backing)} --export-quarantine DIR reads them out"
            )
    if report.remaining:
        raise FsckProblems(
            f"{len(report.remaining)} problem(s) remain"
            + ("" if args.repair else "; run fsck --repair to fix the repairable ones")
        )
    return 0


def _export_quarantine(volume: Any, destination: str, as_json: bool) -> int:
    from encfs.admin import quarantine

    try:
        exported = quarantine.export(volume, destination)
    except OSError as exc:
        raise UsageError(f"cannot export into {destination}: {exc.strerror}") from None
    finally:
        volume.close()
    if as_json:
        print(json.dumps([
            {"item": e.item, "finding": e.record, "notes": e.notes} for e in exported
        ]))
        return 0
    for e in exported:
        what = e.record.get("kind", "finding record unreadable")
        print(f"{e.item}: {_printable(e.record.get('path', '?'))}: {what}")
        for note in e.notes:
            print(f"  {_printable(note)}")
    print(f"exported {len(exported)} quarantine item(s) into {_printable(destination)}")
    return 0


def _printable(path: str) -> str:
    """A name for one report line: bytes that are not UTF-8 (\\xff) and control characters
    (\\n) escaped, in any locale (--json has the exact bytes, surrogate-escaped)."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class _FsckProgress:
    """Files and blocks checked so far, on one terminal line (only on a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.last = 0.0

    def __call__(self, report: Any) -> None:  # an encfs.admin.fsck.Report
        import time

        now = time.monotonic()
        if not self.enabled or now - self.last < 0.2:
            return
        self.last = now
        line = f"\rfsck: {report.files} files, {report.blocks} blocks"
        print(line, end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.last:
            print(file=sys.stderr)


def cmd_destroy(args: argparse.Namespace) -> int:
    from encfs.admin.destroy import destroy_volume

    backing = backing_argument(args.backing)
    actions = destroy_volume(
        backing, args.confirm, _operator(args), audit_path=args.audit_log
    )
    for action in actions:
        print(action)
    print(f"volume {backing} is destroyed: its data can never be decrypted again")
    return 0


# --- upgrade, trust --------------------------------------------------------------------------


def cmd_upgrade(args: argparse.Namespace) -> int:
    from encfs.admin import upgrade

    backing = backing_argument(args.backing)
    config = upgrade.read_legacy(backing)
    print("the volume config (not authenticated: compare it with what you set up):")
    for line in upgrade.describe(config):
        print(f"  {line}")
    new = upgrade.upgrade(backing, _operator(args), args.trust_stored)
    print(
        f"upgraded: the config of volume {new.volume_id.hex()} is authenticated "
        f"(generation {new.generation}); the providers you vouched for are in the trust store"
    )
    return 0


def cmd_trust(args: argparse.Namespace) -> int:
    """Vouch for a volume at this path (moved, restored, or first seen on this host), or
    forget one; prints what this host now vouches for."""
    from encfs import config_store

    backing = backing_argument(args.backing)
    operator = _operator(args)
    if args.forget:
        volume_id = args.forget.lower()
        if not operator.store.load(volume_id):
            raise UsageError(f"the trust store has no volume {volume_id}")
        operator.forget(volume_id)
        print(f"forgot volume {volume_id}")
        return 0
    operator.new_path = True
    operator.accept_rollback = args.accept_rollback
    config, _ = config_store.unlock(backing, operator)
    entry = operator.entry
    assert entry is not None
    print(f"volume {config.volume_id.hex()} (config generation {config.generation})")
    print(f"known at: {', '.join(entry.backings)}")
    for protector_id in config.protector_ids():
        vouched = entry.protectors.get(protector_id)
        what = (
            operator.factory(vouched.kind, vouched.options).describe()
            if vouched is not None
            else "not vouched for on this host (never used here)"
        )
        print(f"keyslot {protector_id}: {what}")
    return 0


# --- unmount ------------------------------------------------------------------------------


def cmd_unmount(args: argparse.Namespace) -> int:
    """fusermount3 -u, wait for the volume's daemon (the holder of its lock) to exit, then
    remove what the mount left on the mountpoint (its guard; the dead mounts of a daemon
    that died)."""
    from encfs import client
    from encfs.daemon import mountpoint as mountpoint_mod

    mountpoint = os.path.abspath(args.mountpoint)
    top = mountpoint_mod.top_mount(mountpoint)
    if top is not None and top.fstype == client.FSTYPE:
        backing = top.source
        entry = client.mount_entry(mountpoint)
        pidfd = _daemon_pidfd(entry) if entry is not None and entry["source"] == backing else None
        result = subprocess.run(
            ["fusermount3", "-u", mountpoint], capture_output=True, text=True, check=False
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
    from encfs import client

    pid = client.volume_lock_holder(entry["source"])
    if pid is None:
        return None
    options = dict(
        option.partition("=")[::2] for option in entry["super_options"].split(",")
    )
    if options.get("user_id") != str(client.process_euid(pid)):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


COMMANDS = {
    "init": cmd_init,
    "mount": cmd_mount,
    "provider": cmd_provider,
    "rotate": cmd_rotate,
    "rotate-every": cmd_rotate_every,
    "status": cmd_status,
    "rewrap-kek": cmd_rewrap_kek,
    "fsck": cmd_fsck,
    "destroy": cmd_destroy,
    "upgrade": cmd_upgrade,
    "trust": cmd_trust,
    "unmount": cmd_unmount,
    "umount": cmd_unmount,
}
