"""The `encfs-gw` command line (layer L7).

Every failure is one line on stderr and a stable exit code (docs/EXITCODES.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from encfs import __version__
from encfs.errors import EncfsError, MountFailed, MountpointError, NotMounted, UsageError
from encfs.format import names as fnames
from encfs.format.blocks import DEFAULT_BLOCK_SIZE
from encfs.keys.provider import KeyProvider
from encfs.keys.registry import open_provider, parse_spec

log = logging.getLogger("encfs")

UNMOUNT_WAIT_SECONDS = 120
ENGINE_OPTIONS = {"writeback_cache"}  # -o options consumed by encfs-gw, not passed to FUSE


def default_keyfile(volume_hint: str) -> str:
    """Per-user default: $XDG_CONFIG_HOME/encfs-gw/keys/<name>.key, outside the volume."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    name = os.path.basename(os.path.normpath(volume_hint)) or "volume"
    return os.path.join(base, "encfs-gw", "keys", f"{name}-{os.urandom(4).hex()}.key")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    mount.add_argument("--keyfile", metavar="PATH", help="use this key file instead")
    mount.add_argument("--log-file", metavar="PATH", help="daemon log (background mode)")
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    provider = sub.add_parser("provider", help="list, add or remove key providers (keyslots)")
    provider_sub = provider.add_subparsers(dest="provider_command", required=True)
    p_list = provider_sub.add_parser("list", help="show the keyslots of every KEK version")
    p_list.add_argument("backing", metavar="BACKING")
    p_add = provider_sub.add_parser("add", help="protect the KEKs under one more provider")
    p_add.add_argument("backing", metavar="BACKING")
    p_add.add_argument("spec", metavar="SPEC")
    p_add.add_argument("--keyfile", metavar="PATH", help="key file that opens the volume now")
    p_remove = provider_sub.add_parser("remove", help="remove a keyslot (never the last)")
    p_remove.add_argument("backing", metavar="BACKING")
    p_remove.add_argument("slot", type=int, metavar="SLOT")

    rotate = sub.add_parser("rotate", help="new KEK version; re-wrap every DEK (no re-encryption)")
    rotate.add_argument("target", metavar="TARGET", help="backing directory or mountpoint")
    rotate.add_argument("--rate", type=float, metavar="DEKS_PER_S", help="throttle the pass")
    rotate.add_argument("--json", action="store_true", help="progress and result as JSON lines")
    rotate.add_argument(
        "--purge-old", action="store_true", help="drop old KEK versions once none is needed"
    )
    rotate.add_argument("--keyfile", metavar="PATH", help="key file that opens the volume")

    status = sub.add_parser("status", help="KEK versions and the DEKs that depend on them")
    status.add_argument("target", metavar="TARGET", help="backing directory or mountpoint")
    status.add_argument("--json", action="store_true")
    status.add_argument("--keyfile", metavar="PATH", help="key file that opens the volume")

    rewrap = sub.add_parser(
        "rewrap-kek", help="re-protect the stored KEKs after the provider's own key rotated"
    )
    rewrap.add_argument("target", metavar="TARGET", help="backing directory or mountpoint")
    rewrap.add_argument("--keyfile", metavar="PATH", help="key file that opens the volume")

    unmount = sub.add_parser("unmount", aliases=["umount"], help="flush and unmount")
    unmount.add_argument("mountpoint", metavar="MOUNTPOINT")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one-line usage error
        return int(exc.code or 0) and UsageError.exit_code
    daemon = args.command == "mount"
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if daemon else logging.WARNING,
        format="encfs-gw: %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return COMMANDS[args.command](args)
    except EncfsError as exc:
        print(f"encfs-gw: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


# --- init ---------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from encfs.volume import create_volume

    backing = os.path.abspath(args.backing)
    if args.provider and args.keyfile:
        raise UsageError(
            "--keyfile and --provider exclude each other (use --provider keyfile:PATH)"
        )
    spec = args.provider or f"keyfile:{args.keyfile or default_keyfile(backing)}"
    name, options = parse_spec(spec)
    provider = open_provider(name, options)
    config = create_volume(backing, provider, args.block_size)
    print(f"created volume {config.volume_id.hex()} in {backing}")
    print(f"key provider: {provider.describe()}")
    return 0


# --- mount --------------------------------------------------------------------------------


def _split_options(raw: list[str]) -> tuple[list[str], set[str]]:
    fuse_opts: list[str] = []
    engine_opts: set[str] = set()
    for group in raw:
        for option in filter(None, (o.strip() for o in group.split(","))):
            (engine_opts.add if option in ENGINE_OPTIONS else fuse_opts.append)(option)
    return fuse_opts, engine_opts


def _provider_factory(args: argparse.Namespace) -> Any:
    def factory(name: str, options: dict[str, Any]) -> KeyProvider:
        if name == "keyfile" and args.keyfile:
            options = {**options, "path": os.path.abspath(args.keyfile)}
        return open_provider(name, options)

    return factory


def cmd_mount(args: argparse.Namespace) -> int:
    if args.foreground:
        return _mount_foreground(args)
    return _mount_background(args)


def _mount_background(args: argparse.Namespace) -> int:
    """Start the daemon detached; return 0 only once the mount is live."""
    read_fd, write_fd = os.pipe()
    argv = [sys.executable, "-m", "encfs"]
    if args.verbose:
        argv.append("--verbose")
    argv += ["mount", "--foreground", "--ready-fd", str(write_fd)]
    for option in args.options:
        argv += ["-o", option]
    if args.keyfile:
        argv += ["--keyfile", os.path.abspath(args.keyfile)]
    if args.log_file:
        argv += ["--log-file", os.path.abspath(args.log_file)]
    argv += [os.path.abspath(args.backing), os.path.abspath(args.mountpoint)]
    # The daemon keeps our terminal until the mount is live (a passphrase prompt or a
    # PIN entry may need it), then lets go of it and starts its own session.
    child = subprocess.Popen(argv, pass_fds=(write_fd,), stdout=subprocess.DEVNULL)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as ready:
        message = ready.read()
    if message.startswith(b"READY"):
        return 0
    code = child.wait()
    if code == 0:
        raise MountFailed("the daemon exited before the mount was live")
    return code


def _mount_foreground(args: argparse.Namespace) -> int:
    from encfs import mount as mount_mod
    from encfs.volume import Volume, read_config

    backing = os.path.abspath(args.backing)
    mountpoint = os.path.abspath(args.mountpoint)
    fuse_opts, engine_opts = _split_options(args.options)
    mount_mod.harden_process()
    read_config(backing)  # "not a volume" before "mountpoint busy"
    mount_mod.check_mountpoint(mountpoint)
    volume = Volume.unlock(backing, _provider_factory(args))
    ready_fd = args.ready_fd

    def on_ready() -> None:
        if ready_fd is None:
            return
        os.write(ready_fd, b"READY\n")
        os.close(ready_fd)
        _detach_stdio(args.log_file)

    mount_mod.serve(
        volume,
        mountpoint,
        mount_mod.fuse_options(backing, fuse_opts),
        on_ready,
        writeback_cache="writeback_cache" in engine_opts,
        provider_factory=_provider_factory(args),
    )
    return 0


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
    from encfs import keyslots

    backing = os.path.abspath(args.backing)
    if args.provider_command == "list":
        for row in keyslots.list_protectors(backing):
            marker = " (current)" if row["current"] else ""
            print(
                f"KEK v{row['kek_version']}{marker} {row['state']}: "
                f"slot {row['slot']}: {row['provider']}"
            )
    elif args.provider_command == "add":
        name, options = parse_spec(args.spec)
        count = keyslots.add_protector(backing, name, options, _provider_factory(args))
        print(f"added {name} to {count} KEK version(s)")
    else:
        print(f"removed keyslot {args.slot}: {keyslots.remove_protector(backing, args.slot)}")
    return 0


# --- rotate, status, rewrap-kek -------------------------------------------------------------


def _resolve_target(target: str) -> tuple[str, bool]:
    """(backing directory, mounted?) for a backing directory or an encfs-gw mountpoint."""
    from encfs.mount import FSTYPE, find_mount

    path = os.path.abspath(target)
    found = find_mount(path)
    if found is not None and found[0] == FSTYPE:
        return found[1], True
    return path, False


class _Progress:
    """A progress bar on a terminal, periodic lines otherwise, JSON lines with --json."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.tty = sys.stderr.isatty() and not as_json
        self.last = 0.0

    def __call__(self, stats: dict) -> None:
        import time

        now = time.monotonic()
        if not self.tty and now - self.last < (1.0 if self.as_json else 5.0):
            return
        self.last = now
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
    from encfs import rotation

    backing, mounted = _resolve_target(args.target)
    progress = _Progress(args.json)
    if mounted:
        from encfs import control

        result: dict = {}
        request = {"op": "rotate", "rate": args.rate, "purge_old": args.purge_old}
        for message in control.request(backing, request):
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
        from encfs.volume import Volume

        volume = Volume.unlock(backing, _provider_factory(args))
        try:
            result = rotation.rotate_offline(
                volume,
                _provider_factory(args),
                rate=args.rate,
                purge_old=args.purge_old,
                on_progress=lambda stats: progress(stats.as_dict()),
            )
        finally:
            volume.close()
    progress.close()
    _print_result(result, args.json)
    return 0 if result.get("done") else 1


def _error_with_code(message: str, code: int) -> EncfsError:
    error = EncfsError(message)
    error.exit_code = code
    return error


def cmd_status(args: argparse.Namespace) -> int:
    backing, mounted = _resolve_target(args.target)
    if mounted:
        from encfs import control

        (reply,) = list(control.request(backing, {"op": "status"}))
        if "error" in reply:
            raise _error_with_code(reply["error"], reply.get("exit_code", 1))
    else:
        from encfs import rotation
        from encfs.volume import Volume

        volume = Volume.unlock(backing, _provider_factory(args))
        try:
            counts = rotation.census(volume)
            config = volume.config
            reply = {
                "backing": backing,
                "current_kek": config.current_kek,
                "kek_versions": {str(n): v.state for n, v in sorted(config.kek_versions.items())},
                "rotation": config.rotation,
                "deks_per_version": {str(v): n for v, n in sorted(counts.items())},
            }
        finally:
            volume.close()
    reply["mounted"] = mounted
    if args.json:
        print(json.dumps(reply))
        return 0
    print(f"volume: {reply['backing']} ({'mounted' if mounted else 'not mounted'})")
    for number, state in reply["kek_versions"].items():
        current = " (current)" if int(number) == reply["current_kek"] else ""
        deks = reply["deks_per_version"].get(number, 0)
        print(f"KEK version {number}{current}: {state}, {deks} DEKs")
    if reply.get("rotation"):
        print(
            f"rotation to version {reply['rotation']['target']} in progress: run rotate to resume"
        )
    retired_needed = [
        n
        for n, state in reply["kek_versions"].items()
        if state == "retired" and reply["deks_per_version"].get(n, 0)
    ]
    print(
        "no DEK depends on a retired KEK version"
        if not retired_needed
        else f"DEKs still depend on retired version(s) {', '.join(retired_needed)}"
    )
    return 0


def cmd_rewrap_kek(args: argparse.Namespace) -> int:
    from encfs import keyslots

    backing, _ = _resolve_target(args.target)
    count = keyslots.rewrap_keks(backing, _provider_factory(args))
    print(f"re-protected {count} stored KEK blob(s) under the providers' current keys")
    return 0


# --- unmount ------------------------------------------------------------------------------


def cmd_unmount(args: argparse.Namespace) -> int:
    from encfs.mount import FSTYPE, find_mount

    mountpoint = os.path.abspath(args.mountpoint)
    found = find_mount(mountpoint)
    if found is None or found[0] != FSTYPE:
        raise NotMounted(f"{mountpoint} is not an encfs-gw mount")
    pidfd = _daemon_pidfd(found[1])
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
    return 0


def _daemon_pidfd(backing: str) -> int | None:
    try:
        with open(os.path.join(backing, fnames.LOCK_FILE)) as lock:
            pid = int(lock.read().strip() or 0)
        return os.pidfd_open(pid) if pid > 0 else None
    except (OSError, ValueError):
        return None


COMMANDS = {
    "init": cmd_init,
    "mount": cmd_mount,
    "provider": cmd_provider,
    "rotate": cmd_rotate,
    "status": cmd_status,
    "rewrap-kek": cmd_rewrap_kek,
    "unmount": cmd_unmount,
    "umount": cmd_unmount,
}
