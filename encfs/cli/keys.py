"""Commands on a volume's keys and trust (layer L7): `provider`, `rewrap-kek`,
`destroy`, `upgrade`, `trust`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from encfs.cli.common import backing_argument, error_with_code, operator_from, resolve_target
from encfs.errors import (
    UsageError,
)
from encfs.keys.registry import parse_spec


def cmd_provider(args: argparse.Namespace) -> int:
    from encfs.admin import keyslots

    if args.provider_command == "check":
        return _provider_check(args)
    backing = backing_argument(args.backing)
    if args.provider_command == "list":
        for row in keyslots.list_protectors(backing, operator_from(args)):
            marker = " (current)" if row["current"] else ""
            print(
                f"KEK v{row['kek_version']}{marker} {row['state']}: "
                f"slot {row['slot']}: {row['provider']} (id {row['id']})"
            )
    elif args.provider_command == "add":
        name, options = parse_spec(args.spec)
        count = keyslots.add_protector(backing, name, options, operator_from(args))
        print(f"added {name} to {count} KEK version(s)")
    else:
        removed = keyslots.remove_protector(backing, args.slot, operator_from(args))
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

    backing, mounted, _ = resolve_target(args.backing)
    config = config_store.peek(backing)
    operator = operator_from(args)
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
        raise error_with_code(
            f"{failed} of {len(results)} protector(s) failed the check (first: {first_error})",
            first_error.exit_code,
        )
    return 0


def cmd_rewrap_kek(args: argparse.Namespace) -> int:
    from encfs.admin import keyslots

    backing = resolve_target(args.target).backing
    count = keyslots.rewrap_keks(backing, operator_from(args))
    print(f"re-protected {count} stored KEK blob(s) under the providers' current keys")
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    from encfs.admin.destroy import destroy_volume

    backing = backing_argument(args.backing)
    actions = destroy_volume(
        backing, args.confirm, operator_from(args), audit_path=args.audit_log
    )
    for action in actions:
        print(action)
    print(f"volume {backing} is destroyed: its data can never be decrypted again")
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    from encfs.admin import upgrade

    backing = backing_argument(args.backing)
    config = upgrade.read_legacy(backing)
    print("the volume config (not authenticated: compare it with what you set up):")
    for line in upgrade.describe(config):
        print(f"  {line}")
    new = upgrade.upgrade(backing, operator_from(args), args.trust_stored)
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
    operator = operator_from(args)
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
