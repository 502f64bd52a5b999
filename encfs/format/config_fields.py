"""Strict reading of the volume config's JSON (layer L2), which comes from the untrusted
backing directory: bounded size and nesting, no duplicate keys, no NaN, every field typed
and range-checked, and one ConfigError line (exit 12) for anything else. The records
built from the fields are format/volume.py's."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from encfs.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20
MAX_RECORD_DEPTH = 4
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z\Z")
_HEX = re.compile(r"[0-9a-f]*\Z")


def now_utc() -> str:
    return datetime.now(UTC).strftime(TIME_FORMAT)


def parse_time(value: Any, what: str) -> datetime:
    """A UTC time as the config writes it (`2026-12-06T21:00:00Z`); ConfigError otherwise."""
    if not isinstance(value, str) or not _TIME.match(value):
        raise ConfigError(f"volume config: {what} is not a UTC time (YYYY-MM-DDTHH:MM:SSZ)")
    try:
        return datetime.strptime(value, TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise ConfigError(f"volume config: {what} is not a valid date") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ConfigError(f"volume config repeats the key {printable(key)}")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ConfigError(f"volume config holds a non-number {name}")


def load_document(data: bytes, what: str = "volume config") -> dict[str, Any]:
    """Bounded, strict JSON: an object, no duplicate keys, no NaN/Infinity, UTF-8."""
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        doc = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what} is not valid JSON ({_one_line(exc)})") from None
    except RecursionError:
        raise ConfigError(f"{what} is nested too deeply") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{what} is not a JSON object")
    return doc


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def printable(value: Any) -> str:
    """An untrusted value in a one-line message: repr, control characters escaped, cut."""
    text = ascii(value)
    return text if len(text) <= 80 else text[:77] + "..."


def typed_field(doc: dict[str, Any], name: str, kind: type, where: str | None = None) -> Any:
    value = doc.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise ConfigError(f"volume config: '{where or name}' is missing or not a {kind.__name__}")
    return value


def int_field(
    doc: dict[str, Any], name: str, low: int, high: int, where: str | None = None
) -> int:
    value = doc.get(name)
    if type(value) is not int or not low <= value <= high:
        raise ConfigError(
            f"volume config: '{where or name}' must be an integer from {low} to {high}"
        )
    return value


def hex_field(doc: dict[str, Any], name: str, size: int, where: str | None = None) -> bytes:
    value = doc.get(name)
    if not isinstance(value, str) or len(value) != 2 * size or not _HEX.match(value):
        raise ConfigError(
            f"volume config: '{where or name}' must be {2 * size} lowercase hex digits"
        )
    return bytes.fromhex(value)


def time_field(doc: dict[str, Any], name: str, where: str | None = None) -> str:
    value = doc.get(name)
    parse_time(value, f"'{where or name}'")
    return value


def check_depth(value: Any, where: str, depth: int = 0) -> None:
    if depth > MAX_RECORD_DEPTH:
        raise ConfigError(f"volume config: a protector record of {where} is nested too deeply")
    if isinstance(value, dict):
        for item in value.values():
            check_depth(item, where, depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_depth(item, where, depth + 1)
