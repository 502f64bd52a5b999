"""What the commands share (layer L7): the operator from the command line, BACKING
arguments, reaching a mounted volume's daemon, one-line messages.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from encfs.errors import (
    INTERRUPTED,
    OTHER_EXIT_CODES,
    ControlSocketError,
    EncfsError,
    NotAVolume,
    exit_codes,
)
from encfs.keys.registry import open_provider, parse_spec
from encfs.trust import Operator, OperatorSpec

log = logging.getLogger("encfs")


def default_keyfile(volume_hint: str) -> str:
    """Per-user default: $XDG_CONFIG_HOME/encfs-gw/keys/<name>.key, outside the volume."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    name = os.path.basename(os.path.normpath(volume_hint)) or "volume"
    return os.path.join(base, "encfs-gw", "keys", f"{name}-{os.urandom(4).hex()}.key")


def one_line(text: str) -> str:
    """`text` as one printable line: control characters (a newline in a path) and bytes
    that are not UTF-8 escaped, as Python writes them."""
    text = os.fsencode(text).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def run_command(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
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


def operator_from(args: argparse.Namespace) -> Operator:
    """What this command's operator vouches for: the providers named on the command line
    (--keyfile, --provider, in that order) and the trust store. The CLI is a composition
    root: the registry makes the providers (docs/dev/ARCHITECTURE.md)."""
    specs = [OperatorSpec.keyfile(args.keyfile)] if getattr(args, "keyfile", None) else []
    specs += [OperatorSpec(*parse_spec(spec)) for spec in getattr(args, "providers", [])]
    return Operator(specs, factory=open_provider)


def new_provider_from(
    args: argparse.Namespace, operator: Operator | None
) -> tuple[str, dict] | None:
    """--new-provider SPEC (rotate, reencrypt) parsed here, where relative paths mean
    something: (kind, options), or None. When the operator names keys on the command
    line only those are asked, so the new provider joins them: a pass it resumes opens
    its new KEK version with it. (`operator` None: a daemon's request, no unlock here.)"""
    if getattr(args, "new_provider", None) is None:
        return None
    new_provider = parse_spec(args.new_provider)
    if operator is not None and operator.specs:
        operator.specs.append(OperatorSpec(*new_provider))
    return new_provider


def add_new_provider_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--new-provider", metavar="SPEC",
        help="protect the new KEK with this provider only (e.g. keyfile:NEW, created)",
    )


class Target(NamedTuple):
    backing: str
    mounted: bool
    mountpoint: str | None  # when TARGET was a mountpoint: the daemon must serve it


def resolve_target(target: str) -> Target:
    """The backing directory of a TARGET (a backing directory or an encfs-gw mountpoint:
    the topmost mount there, ours or the guard a dead one left), and whether its daemon
    runs (its control socket is there; the daemon's identity is checked when it is
    reached)."""
    from encfs import client
    from encfs.daemon.mountpoint import resolve, top_mount
    from encfs.daemon.runtime import FSTYPE

    path = os.path.abspath(target)
    top = top_mount(path)
    if top is not None and top.fstype == FSTYPE:
        return Target(top.source, True, resolve(path))
    guarded = top.guarded_backing if top is not None else None
    backing = guarded or backing_argument(path)
    return Target(backing, client.daemon_listening(backing), None)


def ask_daemon(target: Target, request: dict) -> Any:
    """The replies of the volume's daemon (identity checked, see encfs.client)."""
    from encfs import client

    return client.request(target.backing, request, target.mountpoint)


def pass_through_daemon(target: Target, request: dict, progress: Any) -> dict:
    """A pass (rotate, reencrypt) run by the volume's daemon: its progress lines go to
    `progress`, an error reply is raised with its code; the final reply."""
    result: dict = {}
    for message in ask_daemon(target, request):
        if "progress" in message:
            progress(message["progress"])
        elif "error" in message:
            progress.close()
            raise (
                EncfsError(message["error"])
                if message.get("exit_code") is None
                else error_with_code(message["error"], message["exit_code"])
            )
        else:
            result = message
    if not result:
        progress.close()
        raise ControlSocketError(
            f"the daemon of {target.backing} ended the connection before the pass ended "
            "(it stopped or died): the pass resumes at the next mount or run"
        )
    return result


def one_reply(target: Target, request: dict) -> dict:
    replies = list(ask_daemon(target, request))
    if len(replies) != 1:
        raise ControlSocketError(
            f"malformed reply from the daemon of {target.backing} "
            f"({len(replies)} lines, not one)"
        )
    reply = replies[0]
    if "error" in reply:
        raise error_with_code(reply["error"], reply.get("exit_code", 1))
    return reply


# Codes a daemon may report in an error reply; anything else is a malformed reply.
def error_with_code(message: Any, code: Any) -> EncfsError:
    known = set(exit_codes()) - set(OTHER_EXIT_CODES)
    if not isinstance(message, str) or type(code) is not int or code not in known:
        return ControlSocketError("malformed error reply from the daemon")
    error = EncfsError(message)
    error.exit_code = code
    return error


def positive_rate(limit: float, shown_limit: str, unit: str) -> Callable[[str], float]:
    """An argparse type for --rate: a finite number of `unit` per second, 0 < N <= limit
    (nan, inf and negative numbers refused)."""

    def parse(text: str) -> float:
        try:
            rate = float(text)
        except ValueError:
            rate = -1.0
        if not 0 < rate <= limit:  # also false for nan
            raise argparse.ArgumentTypeError(f"expected {unit} per second, 0 < N <= {shown_limit}: "
                                             f"{text!r}")
        return rate

    return parse


class PassProgress:
    """A pass's progress (rotate, reencrypt): a line rewritten on a terminal, periodic
    lines otherwise, JSON lines with --json. Subclasses say what a line holds (`line`)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.tty = sys.stderr.isatty() and not as_json
        self.last = 0.0

    def line(self, stats: dict) -> str:
        raise NotImplementedError

    def __call__(self, stats: Any) -> None:
        """`stats`: a dict, or an object with as_dict() (built only when a line is due)."""
        now = time.monotonic()
        if now - self.last < (0.2 if self.tty else 1.0 if self.as_json else 5.0):
            return
        self.last = now
        if not isinstance(stats, dict):
            stats = stats.as_dict()
        if self.as_json:
            print(json.dumps({"progress": stats}), flush=True)
            return
        line = self.line(stats)
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def eta_suffix(stats: dict) -> str:
    eta = stats.get("eta")
    return f", ETA {eta:.0f} s" if eta is not None else ""
