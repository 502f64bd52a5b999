"""The conversion's own files: the marker DIR/.egw-convert (made atomically before the
first change, removed after the last), the state DIR/.egw-convert.d/state (phase, batch in
flight, directories' metadata, counters; replaced atomically), and `Steps`, the count of
changes to DIR and the volume with the test-only hooks that kill or stop the process."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter

from encfs import backing
from encfs.convert.tree import decode_rel
from encfs.errors import CannotConvert, ConfigError, UsageError
from encfs.format import names as fnames

TREE = "tree"  # in CONVERT_DIR: the plaintext still to convert
STATE = "state"  # in CONVERT_DIR: phase, batch in flight, directories' metadata, counters
MARKER_FORMAT = "encfs-gw convert"
STATE_FORMAT = "encfs-gw convert state"

# Test-only: SIGKILL (or SIGSTOP) this process before its Nth change to DIR. Read here only.
CRASH_AFTER_ENV = "ENCFS_TESTONLY_CONVERT_CRASH_AFTER"
STOP_AFTER_ENV = "ENCFS_TESTONLY_CONVERT_STOP_AFTER"


class Steps:
    """Counts changes to DIR; the test hooks kill or stop the process before one."""

    def __init__(self) -> None:
        self.count = 0
        self.crash = int(os.environ.get(CRASH_AFTER_ENV) or 0)
        self.stop = int(os.environ.get(STOP_AFTER_ENV) or 0)

    def __call__(self) -> None:
        self.count += 1
        if self.count == self.stop:
            os.kill(os.getpid(), signal.SIGSTOP)
        if self.count == self.crash:
            os.kill(os.getpid(), signal.SIGKILL)


def read_marker(dir_fd: int, where: str) -> dict | None:
    try:
        raw = backing.read_small_file(dir_fd, fnames.CONVERT_MARKER, 1 << 16)
        marker = json.loads(raw)
        top = marker["top"]
        if marker["format"] != MARKER_FORMAT or marker["version"] != 1:
            raise ValueError
        if not (isinstance(top, list) and len(top) == 5 and all(type(v) is int for v in top)):
            raise ValueError
        return marker
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(
            f"{where}/{fnames.CONVERT_MARKER} exists and is not the marker of an encfs-gw "
            "conversion: move it out of the directory first"
        ) from None


def write_marker(dir_fd: int, marker: dict) -> None:
    """All or nothing: an unnamed file (O_TMPFILE), written and synced, then linked."""
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        raise CannotConvert(
            f"the filesystem cannot make an unnamed file (O_TMPFILE: {exc.strerror}), which "
            "convert needs to mark its start atomically"
        ) from None
    try:
        backing.pwrite_all(fd, json.dumps(marker).encode(), 0)
        os.fsync(fd)
        backing.link_fd(fd, dir_fd, fnames.CONVERT_MARKER)
    finally:
        os.close(fd)
    os.fsync(dir_fd)


class State:
    """DIR/.egw-convert.d/state: replaced atomically (temp file, fsync, rename)."""

    def __init__(self, conv_fd: int, steps: Steps, data: dict | None = None) -> None:
        self.conv_fd = conv_fd
        self.steps = steps
        data = data or {}
        self.phase: str = data.get("phase", "staging")
        self.dirs: dict[str, list[int]] = data.get("dirs", {})
        self.inflight: dict | None = data.get("inflight")
        self.done: Counter[str] = Counter(data.get("done", {}))
        self.dirty = False

    @classmethod
    def load(cls, conv_fd: int, steps: Steps, where: str) -> State | None:
        try:
            raw = backing.read_small_file(conv_fd, STATE, 64 << 20)
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            if data.get("format") != STATE_FORMAT or data.get("phase") not in (
                "staging", "creating", "converting",
            ):
                raise ValueError
            state = cls(conv_fd, steps, data)
            for meta in state.dirs.values():
                if not (isinstance(meta, list) and len(meta) == 5):
                    raise ValueError
            if state.inflight is not None:
                [decode_rel(p) for unit in state.inflight["units"] for p in unit]
                bool(state.inflight["verified"])
            return state
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"the conversion state {where} is corrupt") from None

    def save(self) -> None:
        data = {
            "format": STATE_FORMAT,
            "phase": self.phase,
            "dirs": self.dirs,
            "inflight": self.inflight,
            "done": dict(self.done),
        }
        self.steps()
        backing.write_file_atomic(
            self.conv_fd, STATE, json.dumps(data).encode(), temp_prefix=fnames.TEMP_PREFIX
        )
        self.dirty = False

    def save_if_dirty(self) -> None:
        if self.dirty:
            self.save()
