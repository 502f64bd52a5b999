"""The `encfs-gw` command line (layer L7): the parser, `main`, and the one-line error
report with its exit code (docs/EXITCODES.md) for every failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from encfs import __version__, hygiene
from encfs.cli.checking import cmd_fsck
from encfs.cli.common import add_new_provider_argument, one_line, positive_rate, run_command
from encfs.cli.convert import add_convert_parser, cmd_convert
from encfs.cli.keys import cmd_destroy, cmd_provider, cmd_rewrap_kek, cmd_trust, cmd_upgrade
from encfs.cli.mounting import MOUNT_HELPER, cmd_init, cmd_mount, cmd_unmount, mount_helper
from encfs.cli.reencrypting import add_reencrypt_parser, cmd_reencrypt
from encfs.cli.rotating import cmd_rotate, cmd_rotate_every, cmd_status
from encfs.errors import (
    UsageError,
)
from encfs.format.blocks import DEFAULT_BLOCK_SIZE


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
    """The operator names the key providers it vouches for (else: the trust store's); in
    their own group, so --help lists them after the command's own options."""
    group = parser.add_argument_group("key providers")
    group.add_argument(
        "--keyfile", metavar="PATH", help="open the volume with this key file (vouched by you)"
    )
    group.add_argument(
        "--provider",
        dest="providers",
        action="append",
        default=[],
        metavar="SPEC",
        help="open the volume with this key provider (vouched by you; repeatable)",
    )


def _volume_command(
    sub: Any, name: str, help: str, *, mounted_too: bool = False, dest: str = ""
) -> argparse.ArgumentParser:
    """A command that opens a volume: its BACKING directory (or TARGET, a backing
    directory or the mountpoint of a mounted volume, when `mounted_too`) and the key
    arguments."""
    parser = sub.add_parser(name, help=help)
    if mounted_too:
        parser.add_argument(
            dest or "target", metavar="TARGET", help="backing directory or mountpoint"
        )
    else:
        parser.add_argument(dest or "backing", metavar="BACKING")
    _key_arguments(parser)
    return parser


MAX_RATE = 1e9  # DEKs per second: far beyond any machine, so "no limit" in practice


_positive_rate = positive_rate(MAX_RATE, "1e9", "DEKs")


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

    mount = _volume_command(sub, "mount", "mount a volume")
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
    mount.add_argument("--log-file", metavar="PATH", help="daemon log (background mode)")

    provider = sub.add_parser("provider", help="list, add or remove key providers (keyslots)")
    provider_sub = provider.add_subparsers(dest="provider_command", required=True)
    p_list = provider_sub.add_parser("list", help="show the keyslots of every KEK version")
    p_list.add_argument("backing", metavar="BACKING")
    p_add = _volume_command(provider_sub, "add", "protect the KEKs under one more provider")
    p_add.add_argument("spec", metavar="SPEC")
    p_remove = _volume_command(provider_sub, "remove", "remove a keyslot (never the last)")
    p_remove.add_argument("slot", metavar="SLOT", help="its number in `provider list`, or its id")
    p_check = _volume_command(
        provider_sub, "check", "preflight every protector now: key, version, state, unwrap time",
        mounted_too=True, dest="backing",
    )
    p_check.add_argument("--json", action="store_true", help="the report as one JSON object")

    rotate = _volume_command(
        sub, "rotate", "new KEK version; re-wrap every DEK (no re-encryption)", mounted_too=True
    )
    rotate.add_argument(
        "--rate", type=_positive_rate, metavar="DEKS_PER_S", help="throttle the pass"
    )
    rotate.add_argument("--json", action="store_true", help="progress and result as JSON lines")
    rotate.add_argument(
        "--purge-old", action="store_true", help="drop old KEK versions once none is needed"
    )
    add_new_provider_argument(rotate)

    add_reencrypt_parser(sub, _key_arguments)

    every = _volume_command(
        sub, "rotate-every", "let the daemon rotate automatically (a policy in the volume)",
        mounted_too=True,
    )
    every.add_argument(
        "interval",
        metavar="INTERVAL",
        help="90d, 12h, 30m, 45s (a bare number is days), or 'off' to remove the policy",
    )
    every.add_argument(
        "--purge-old", action="store_true", help="drop old KEK versions after each pass"
    )

    status = _volume_command(
        sub, "status", "KEK versions and the DEKs that depend on them", mounted_too=True
    )
    status.add_argument("--json", action="store_true")
    status.add_argument(
        "--check", action="store_true", help="revalidate the key with its provider now (mounted)"
    )

    _volume_command(
        sub, "rewrap-kek", "re-protect the stored KEKs after the provider's own key rotated",
        mounted_too=True,
    )

    fsck = _volume_command(sub, "fsck", "check (and --repair) an unmounted volume")
    fsck.add_argument("--repair", action="store_true", help="fix what needs no guessing")
    fsck.add_argument("--json", action="store_true", help="the report as one JSON object")
    fsck.add_argument(
        "--export-quarantine",
        metavar="DIR",
        help="write the quarantined evidence and what of it decrypts into DIR (new or "
        "empty), outside the volume; checks nothing",
    )

    destroy = _volume_command(
        sub, "destroy", "crypto-shred a volume: destroy every KEK record (irreversible)"
    )
    destroy.add_argument(
        "--yes-destroy-all-data",
        dest="confirm",
        required=True,
        metavar="VOLUME_ID",
        help="the volume id (encfs-gw status shows it) as confirmation",
    )
    destroy.add_argument("--audit-log", metavar="PATH", help="append the crypto_shred event")

    upgrade = _volume_command(
        sub, "upgrade", "authenticate the config of a volume made before config authentication"
    )
    upgrade.add_argument(
        "--trust-stored",
        action="store_true",
        help="vouch for every provider the old config names (after reviewing the list)",
    )

    trust = _volume_command(
        sub, "trust", "show or change what this host vouches for a volume (the trust store)"
    )
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

    add_convert_parser(sub)

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
    return run_command(COMMANDS[args.command], args)


class _OneLineFormatter(logging.Formatter):
    """Log lines never break: a path with a newline in a message is escaped. (Tracebacks
    of internal errors keep their lines.)"""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return one_line(super().formatMessage(record))


COMMANDS = {
    "init": cmd_init,
    "mount": cmd_mount,
    "provider": cmd_provider,
    "rotate": cmd_rotate,
    "rotate-every": cmd_rotate_every,
    "reencrypt": cmd_reencrypt,
    "status": cmd_status,
    "rewrap-kek": cmd_rewrap_kek,
    "fsck": cmd_fsck,
    "destroy": cmd_destroy,
    "upgrade": cmd_upgrade,
    "trust": cmd_trust,
    "convert": cmd_convert,
    "unmount": cmd_unmount,
    "umount": cmd_unmount,
}
