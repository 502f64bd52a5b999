"""KEK rotation from the command line (layer L7): `rotate`, `status`, `rotate-every`;
on a mounted volume through its daemon, else offline.
"""

from __future__ import annotations

import argparse
import json
import math

from encfs.cli.common import (
    PassProgress,
    eta_suffix,
    new_provider_from,
    one_reply,
    operator_from,
    pass_through_daemon,
    resolve_target,
)
from encfs.errors import (
    ControlSocketError,
    UsageError,
)


class Progress(PassProgress):
    def line(self, stats: dict) -> str:
        return (f"re-wrap: {stats['files_done']}/{stats['files_total']} files, "
                f"{stats['deks_rewrapped']} DEKs, "
                f"{stats['key_bytes_written'] / 1048576:.1f} MiB of key records"
                + eta_suffix(stats))


def print_result(result: dict, as_json: bool) -> None:
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
    target = resolve_target(args.target)
    backing, mounted = target.backing, target.mounted
    progress = Progress(args.json)
    if mounted:
        request = {
            "op": "rotate", "rate": args.rate, "purge_old": args.purge_old,
            "new_provider": new_provider_from(args, None),
        }
        result = pass_through_daemon(target, request, progress)
    else:
        from encfs.admin import rotation
        from encfs.engine import Volume

        operator = operator_from(args)
        new_provider = new_provider_from(args, operator)
        volume = Volume.unlock(backing, operator)
        try:
            result = rotation.rotate_offline(
                volume,
                rate=args.rate,
                purge_old=args.purge_old,
                on_progress=progress,
                new_provider=new_provider,
            )
        finally:
            volume.close()
    progress.close()
    try:
        print_result(result, args.json)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ControlSocketError(f"malformed reply from the daemon of {backing}") from None
    return 0 if result.get("done") else 1


def cmd_status(args: argparse.Namespace) -> int:
    target = resolve_target(args.target)
    backing, mounted = target.backing, target.mounted
    if mounted:
        reply = one_reply(target, {"op": "status", "check": args.check})
    else:
        from encfs.admin import rewrap, status
        from encfs.engine import Volume

        # status only reads (the config, the key areas' versions): an unfinished
        # re-encryption is shown, not refused (nothing of its journal is needed for that)
        volume = Volume.unlock(backing, operator_from(args), reencrypting=True)
        try:
            reply = status.volume_report(volume, rewrap.census(volume))
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
        if reply.get("request_loop"):
            loop = reply["request_loop"]
            lines.append(f"request loop: {loop['loop']} ({loop['reason']})")
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
    if reply.get("reencrypt"):
        lines.append(_reencrypt_line(reply["reencrypt"], reply.get("reencrypt_progress")))
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


def _reencrypt_line(state: dict, progress: dict | None) -> str:
    line = f"re-encryption to KEK version {state['target']} in progress"
    if progress is None:
        return line + ": run reencrypt (or mount) to resume"
    return (
        f"{line}: {progress['files_done']}/{progress['files_total']} files, "
        f"{progress['bytes_done'] / 1048576:.1f}/{progress['bytes_total'] / 1048576:.1f} MiB, "
        f"{progress['rate_mib_s']:.1f} MiB/s" + eta_suffix(progress)
    )


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
    target = resolve_target(args.target)
    backing, mounted = target.backing, target.mounted
    if mounted:  # the daemon holds the keys that authenticate the config: it writes it
        request = {"op": "policy", "every_seconds": every_seconds, "purge_old": args.purge_old}
        summary = one_reply(target, request)
        if summary.get("rotated_to") is not None:
            print(f"the policy was due: rotated to KEK version {summary['rotated_to']} now")
    else:
        from encfs.admin import rotation
        from encfs.engine import Volume

        volume = Volume.unlock(backing, operator_from(args))
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
