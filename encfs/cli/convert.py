"""`convert` from the command line (layer L7): a plaintext directory becomes a volume in
place; its arguments, its progress line and its summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from encfs.cli.common import default_keyfile, operator_from
from encfs.convert.tree import printable
from encfs.errors import UsageError
from encfs.keys.registry import open_provider, parse_spec


def add_convert_parser(sub: Any) -> None:
    convert = sub.add_parser(
        "convert",
        help="turn a plaintext directory into a volume in place, file by file",
        description="Encrypt DIR in place: it becomes the volume's backing directory and "
        "`encfs-gw mount DIR MNT` shows the original tree. Extra space needed: the "
        "format's overhead for the tree plus the largest file in flight (checked before "
        "it starts). Crash-safe: run it again to resume. Stop every program that writes "
        "into DIR first: the lock keeps encfs-gw out, not programs that ignore it. The "
        "plaintext's old blocks stay in the filesystem's free space (see README).",
    )
    convert.add_argument("directory", metavar="DIR")
    convert.add_argument("--keyfile", metavar="PATH", help="key file to create (keyfile provider)")
    convert.add_argument(
        "--provider", metavar="SPEC", help="key provider spec (default: keyfile:PATH)"
    )
    convert.add_argument(
        "--block-size", type=int, default=None, metavar="N", help="default 16384"
    )
    convert.add_argument(
        "--drop-acls",
        action="store_true",
        help="go on when files have POSIX ACLs, which the volume does not keep",
    )
    convert.add_argument("--json", action="store_true", help="progress and result as JSON lines")


class _ConvertProgress:
    """Files and bytes done, rate and ETA: a terminal line, periodic lines, or JSON lines."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.tty = sys.stderr.isatty() and not as_json
        self.last = 0.0

    def __call__(self, progress: Any) -> None:  # an encfs.convert.Progress
        now = time.monotonic()
        if now - self.last < (0.2 if self.tty else 1.0 if self.as_json else 5.0):
            return
        self.last = now
        stats = progress.as_dict()
        if self.as_json:
            print(json.dumps({"progress": stats}), flush=True)
            return
        eta = stats["eta"]
        line = (
            f"convert: {stats['files_done']}/{stats['files_total']} files, "
            f"{stats['bytes_done'] / 1048576:.1f}/{stats['bytes_total'] / 1048576:.1f} MiB, "
            f"{stats['rate_mib_s']:.1f} MiB/s" + (f", ETA {eta:.0f} s" if eta is not None else "")
        )
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and self.last:
            print(file=sys.stderr)


def cmd_convert(args: argparse.Namespace) -> int:
    from encfs import convert as convert_mod

    directory = os.path.abspath(args.directory)
    if args.provider and args.keyfile:
        raise UsageError(
            "--keyfile and --provider exclude each other (use --provider keyfile:PATH)"
        )
    spec = args.provider or f"keyfile:{args.keyfile or default_keyfile(directory)}"
    name, options = parse_spec(spec)
    # Files the key provider needs (a key file, a PIN or token file, a CA) stay outside.
    outside = [v for v in options.values() if isinstance(v, str) and v.startswith("/")]
    progress = _ConvertProgress(args.json)

    def on_plan(stats: dict) -> None:
        if args.json:
            print(json.dumps({"plan": stats}), flush=True)
        else:
            print(f"convert {printable(directory)}: {convert_mod.describe_plan(stats)}")

    try:
        summary = convert_mod.convert(
            directory,
            operator_from(args),
            lambda: open_provider(name, options),
            block_size=args.block_size,
            drop_acls=args.drop_acls,
            keep_outside=outside,
            on_progress=progress,
            on_plan=on_plan,
        )
    finally:
        progress.close()
    if args.json:
        print(json.dumps(summary))
        return 0
    held, verified, run = summary["volume"], summary["verified"], summary["this_run"]
    rate = run["bytes"] / run["elapsed"] / 1048576 if run["elapsed"] else 0.0
    print(
        f"converted {printable(directory)} into volume {summary['volume_id']} "
        f"(block size {summary['block_size']}); this run: {run['files']} files, "
        f"{run['bytes'] / 1048576:.1f} MiB in {run['elapsed']:.1f} s ({rate:.1f} MiB/s), "
        f"peak extra space {run['peak_extra_bytes'] / 1048576:.1f} MiB"
    )
    print(
        f"the volume holds {held['files']} files ({held['bytes'] / 1048576:.1f} MiB), "
        f"{held['directories']} directories, {held['symlinks']} symlinks, "
        f"{held['specials']} special files, {held['extra_links']} more hard links"
    )
    print(
        f"verified: {verified['files']} files ({verified['bytes'] / 1048576:.1f} MiB of "
        f"data), {verified['symlinks']} symlinks and {verified['specials']} special files "
        "read back through the volume matched the plaintext before it was removed"
    )
    if summary["key_provider"]:
        print(f"key provider: {summary['key_provider']}")
    for note in summary["notes"]:
        print(f"note: {printable(note)}")
    print(
        "the plaintext's old blocks may remain in the filesystem's free space, its "
        "journal and snapshots (README: Converting a directory in place)"
    )
    return 0
