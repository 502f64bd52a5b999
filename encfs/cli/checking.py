"""`fsck` from the command line (layer L7): check, repair, export the quarantine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from encfs.cli.common import backing_argument, operator_from
from encfs.errors import (
    FsckProblems,
    UsageError,
)


def cmd_fsck(args: argparse.Namespace) -> int:
    from encfs.admin import fsck as fsck_mod
    from encfs.engine import Volume

    backing = backing_argument(args.backing)
    if args.export_quarantine is not None and args.repair:
        raise UsageError("--export-quarantine checks and repairs nothing: not with --repair")
    volume = Volume.unlock(backing, operator_from(args))  # takes the lock: not mounted
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
