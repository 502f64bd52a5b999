"""`encfs-gw reencrypt` from the command line (layer L7): an unmounted volume moved to a new
volume key (names, symlinks, xattrs, bindings) and every block under a fresh DEK and a new
KEK version (encfs.admin.reencrypt)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from encfs import config_store
from encfs.cli.common import (
    PassProgress,
    add_new_provider_argument,
    eta_suffix,
    new_provider_from,
    one_reply,
    operator_from,
    pass_through_daemon,
    positive_rate,
    resolve_target,
)
from encfs.errors import ControlSocketError, UsageError

MAX_RATE_MIB_S = 1e6


rate_mib_s = positive_rate(MAX_RATE_MIB_S, "1e6", "MiB")


def add_reencrypt_parser(sub: Any, key_arguments: Any) -> None:
    parser = sub.add_parser(
        "reencrypt",
        help="a new volume key and every block under a fresh DEK and a new KEK (after a "
        "suspected compromise)",
    )
    parser.add_argument(
        "target", metavar="TARGET",
        help="backing directory, or the mountpoint of a mounted volume (its daemon runs it)",
    )
    parser.add_argument("--rate", type=rate_mib_s, metavar="MIB_PER_S", help="throttle the pass")
    parser.add_argument("--json", action="store_true", help="progress and result as JSON lines")
    parser.add_argument(
        "--purge-old", action="store_true",
        help="remove the old KEK versions (and their keyslots) once no block needs them",
    )
    add_new_provider_argument(parser)
    when = parser.add_mutually_exclusive_group()
    when.add_argument(
        "--pause", action="store_true",
        help="a mounted volume: stop its daemon's pass after the current step and leave it "
        "paused (a mount does not resume it)",
    )
    when.add_argument(
        "--resume", action="store_true",
        help="resume the unfinished pass (refused when there is none)",
    )
    key_arguments(parser)


class Progress(PassProgress):
    def line(self, stats: dict) -> str:
        return (f"reencrypt: {stats['files_done']}/{stats['files_total']} files, "
                f"{stats['bytes_done'] / 1048576:.1f}/{stats['bytes_total'] / 1048576:.1f} MiB, "
                f"{stats['rate_mib_s']:.1f} MiB/s" + eta_suffix(stats))


def print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    if result.get("paused"):
        done = (f": {result['bytes_done'] / 1048576:.1f}/{result['bytes_total'] / 1048576:.1f} "
                "MiB" if "bytes_done" in result else "")
        print(f"re-encryption paused{done}; run encfs-gw reencrypt --resume to go on")
        return
    versions = ", ".join(f"v{v}: {n}" for v, n in result["deks_per_version"].items())
    print(f"KEK version {result['target']} is current; DEKs per KEK version: {versions or 'none'}")
    print(
        f"re-encrypted {result['blocks_reencrypted']} blocks "
        f"({result['bytes_reencrypted'] / 1048576:.1f} MiB) of {result['files_total']} files "
        f"in {result['elapsed']:.1f} s ({result['rate_mib_s']:.1f} MiB/s)"
    )
    print(f"volume key: {result['volume_key']}"
          + (f"; {result['names_moved']} names moved" if "names_moved" in result else ""))
    gone = result.get("purged", result.get("retired", []))
    verb = "purged" if "purged" in result else "retired"
    print(f"{verb} KEK version(s): {', '.join(map(str, gone)) or 'none'}")
    if not result["done"]:
        print(
            f"{result['unreadable_blocks']} block(s) could not be read and keep their old "
            f"DEKs (KEK version(s) {', '.join(map(str, result['still_needed'])) or '-'} "
            "kept): run encfs-gw fsck on the volume",
            file=sys.stderr,
        )


def _pause(target: Any, args: argparse.Namespace) -> int:
    if not target.mounted:
        raise UsageError(
            f"{target.backing} is not mounted: the pass of an unmounted volume runs in its "
            "reencrypt command; interrupt that (it resumes where it stopped)"
        )
    reply = one_reply(target, {"op": "reencrypt_pause"})
    if args.json:
        print(json.dumps(reply))
    else:
        print("re-encryption paused" if reply.get("paused") else "the re-encryption is over")
    return 0


def cmd_reencrypt(args: argparse.Namespace) -> int:
    target = resolve_target(args.target)
    if args.pause:
        return _pause(target, args)
    if args.resume:
        state = (one_reply(target, {"op": "status"}).get("reencrypt") if target.mounted
                 else config_store.peek(target.backing).reencrypt)
        if state is None:
            raise UsageError(f"no re-encryption is in progress on {target.backing}")
    if target.mounted:
        progress = Progress(args.json)
        request = {
            "op": "reencrypt", "rate": args.rate, "purge_old": args.purge_old,
            "new_provider": new_provider_from(args, None),
        }
        result = pass_through_daemon(target, request, progress)
        progress.close()
        try:
            print_result(result, args.json)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ControlSocketError(
                f"malformed reply from the daemon of {target.backing}"
            ) from None
        return 0 if result["done"] or result.get("paused") else 1
    from encfs.admin import reencrypt
    from encfs.engine import Volume

    operator = operator_from(args)
    new_provider = new_provider_from(args, operator)
    progress = Progress(args.json)
    volume = Volume.unlock(target.backing, operator, reencrypting=True)
    try:
        result = reencrypt.reencrypt_offline(
            volume, rate=args.rate, purge_old=args.purge_old, new_provider=new_provider,
            on_progress=progress,
        )
    finally:
        volume.close()
    progress.close()
    print_result(result, args.json)
    return 0 if result["done"] else 1

