"""Log checking: a warning or an error in a daemon's log fails the test that caused it,
unless the test declared it expected (after S3QL's `pytest_checklogs`).

What is checked, per test (lines appearing since the previous test's end until the end of
its teardown, so a mount of a module-scoped fixture is checked too; its last lines go to
the test whose teardown unmounts it):

* every daemon log the harness owns: `run_cli("mount", ...)` (and so `mounted()`) passes
  the daemon a `--log-file` in the session's `daemon-logs/` directory unless the test gave
  one itself (then that file is watched); foreground daemons started by a test are watched
  with `watch(path)`; the container tier feeds the container's journal;
* what a successful background mount printed before it was live (its stderr);
* the output of every `run_cli` command, for tracebacks only (any command may fail on
  purpose; none may crash);
* the Python logging of in-process code: records at WARNING or above of `encfs.*` loggers.

A bad line is `encfs-gw: WARNING|ERROR|CRITICAL ...`, `encfs-gw: error: ...`, a Python
warning (`file:line: SomethingWarning: ...`), `Exception ignored in ...` and a traceback
(`Traceback (most recent call last):` with its indented body and final line, checked as
one entry). A test declares what it provokes:

    @pytest.mark.expected_log(r"block \\d+ failed authentication", r"EIO")
    def test_tampered_block(...): ...

    def test_revoked(expect_log, ...):
        expect_log(r"key disabled by its owner", required=True)

A pattern is a regex searched in each bad entry (`re.search`); an entry no pattern matches
fails the test at teardown, with every offending line in the message. `required=True`
also fails the test when no entry matched the pattern (for a test whose point is the
warning). Markers apply from a function, its class or its module (`pytestmark`).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BAD_LINE = re.compile(
    r"encfs-gw: (?:WARNING|ERROR|CRITICAL)\b"
    r"|encfs-gw: error:"
    r"|^\S.*:\d+: \w*Warning: "
    r"|Exception ignored in"
    r"|Traceback \(most recent call last\)"
)
TRACEBACK = "Traceback (most recent call last)"
MAX_SHOWN = 40  # distinct offending entries in a failure message


@dataclass
class Expectation:
    pattern: re.Pattern[str]
    required: bool
    seen: int = 0


@dataclass
class Entry:
    source: str
    text: str  # the bad line; for a traceback, the whole block


def bad_entries(text: str, source: str, tracebacks_only: bool = False) -> list[Entry]:
    """The bad lines of `text`; a traceback is one entry with its body and last line."""
    entries: list[Entry] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if TRACEBACK in line:
            block = [line]
            # The body is indented; the first unindented line ends it (the exception).
            while index < len(lines) and (lines[index].startswith(" ") or not lines[index]):
                block.append(lines[index])
                index += 1
            if index < len(lines):
                block.append(lines[index])
                index += 1
            entries.append(Entry(source, "\n".join(block)))
        elif not tracebacks_only and BAD_LINE.search(line):
            entries.append(Entry(source, line))
    return entries


@dataclass
class _Watched:
    path: Path
    offset: int = 0
    released: bool = False


class _State:
    """The session's watched logs and the checker of the running test."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log_dir: Path | None = None
        self.counter = 0
        self.watched: dict[Path, _Watched] = {}
        self.checker: LogChecker | None = None

    def new_log_path(self, name: str) -> Path | None:
        if self.log_dir is None:
            return None  # not under pytest with this plugin: the caller's own business
        with self.lock:
            self.counter += 1
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60]
            return self.log_dir / f"{self.counter:04d}-{safe}.log"

    def drain(self) -> list[Entry]:
        """The new bad entries of every watched log; released logs are dropped once read."""
        entries: list[Entry] = []
        with self.lock:
            watched = list(self.watched.values())
        for item in watched:
            try:
                with open(item.path, "rb") as log:
                    log.seek(item.offset)
                    data = log.read()
            except FileNotFoundError:
                data = b""
            # A line being written is read next time (only whole lines now).
            cut = len(data) if item.released else data.rfind(b"\n") + 1
            item.offset += cut
            entries += bad_entries(data[:cut].decode(errors="replace"), f"log {item.path}")
            if item.released:
                with self.lock:
                    self.watched.pop(item.path, None)
        return entries


STATE = _State()


def watch(path: os.PathLike | str) -> Path:
    """Check the daemon log at `path` from its current end (a foreground daemon's, or a
    `--log-file` a test chose). Returns the path."""
    resolved = Path(path).resolve()
    offset = resolved.stat().st_size if resolved.exists() else 0
    with STATE.lock:
        if resolved in STATE.watched:
            STATE.watched[resolved].released = False  # written again (a new mount)
        else:
            STATE.watched[resolved] = _Watched(resolved, offset)
    return resolved


def release(path: os.PathLike | str) -> None:
    """The daemon writing `path` is gone: read it to its end once more, then forget it."""
    with STATE.lock:
        item = STATE.watched.get(Path(path).resolve())
        if item is not None:
            item.released = True


def daemon_log_path(name: str) -> Path | None:
    """A new log file in the session's daemon-logs directory (None outside pytest)."""
    return STATE.new_log_path(name)


def feed(text: str, source: str, tracebacks_only: bool = False) -> None:
    """Check `text` (a command's captured output) with the running test's logs."""
    checker = STATE.checker
    if checker is not None and text:
        checker.entries += bad_entries(text, source, tracebacks_only)


class _InProcessHandler(logging.Handler):
    """Records at WARNING+ of `encfs.*` loggers, formatted like the daemon's lines."""

    def __init__(self, checker: LogChecker) -> None:
        super().__init__(logging.WARNING)
        self.checker = checker

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = f"encfs-gw: {record.levelname} {record.getMessage()}"
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
        except Exception:  # a bad format string is itself worth failing on
            text = f"encfs-gw: {record.levelname} (unformattable) {record.msg!r}"
        self.checker.entries.append(Entry(f"in-process logger {record.name}", text))


@dataclass
class LogChecker:
    expectations: list[Expectation] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)

    def expect(self, pattern: str, required: bool = False) -> None:
        self.expectations.append(Expectation(re.compile(pattern), required))

    def verdict(self) -> str | None:
        """None if every bad entry was expected (and every required pattern seen)."""
        unexpected: list[Entry] = []
        for entry in self.entries:
            matches = [e for e in self.expectations if e.pattern.search(entry.text)]
            for expectation in matches:
                expectation.seen += 1
            if not matches:
                unexpected.append(entry)
        missing = [e for e in self.expectations if e.required and not e.seen]
        if not unexpected and not missing:
            return None
        parts = []
        if unexpected:
            parts.append("unexpected warnings or errors in the logs (declare them with "
                         "@pytest.mark.expected_log(r'...') or expect_log(r'...') if the "
                         "test provokes them):")
            # By source, in order; a line repeated in one source is shown once, counted.
            counts: dict[tuple[str, str], int] = {}
            for entry in unexpected:
                counts[(entry.source, entry.text)] = counts.get((entry.source, entry.text), 0) + 1
            source = None
            for shown, ((where, text), count) in enumerate(counts.items()):
                if shown == MAX_SHOWN:
                    parts.append(f"  ... and {len(counts) - MAX_SHOWN} more")
                    break
                if where != source:
                    parts.append(f"  [{where}]")
                    source = where
                times = f" (x{count})" if count > 1 else ""
                parts.append("    " + text.replace("\n", "\n    ") + times)
        for expectation in missing:
            parts.append(f"expected log line never seen: {expectation.pattern.pattern!r}")
        return "\n".join(parts)


# --- the pytest plugin (tests/conftest.py: pytest_plugins) ---------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "expected_log(*patterns, required=False): warnings/errors (regexes) this test "
        "provokes in a daemon's or the engine's log (tests/helpers/logcheck.py)",
    )


@pytest.fixture(scope="session", autouse=True)
def _daemon_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    STATE.log_dir = tmp_path_factory.mktemp("daemon-logs")
    yield
    STATE.log_dir = None


@pytest.fixture
def expect_log(request: pytest.FixtureRequest):
    """`expect_log(regex, required=False)`: declare a warning or error the test provokes."""
    checker: LogChecker = request.node.stash[_CHECKER]
    return checker.expect


_CHECKER = pytest.StashKey[LogChecker]()
_HANDLER = pytest.StashKey[_InProcessHandler]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item):
    checker = LogChecker()
    for marker in item.iter_markers("expected_log"):
        for pattern in marker.args:
            checker.expect(pattern, required=bool(marker.kwargs.get("required", False)))
    item.stash[_CHECKER] = checker
    STATE.checker = checker
    handler = _InProcessHandler(checker)
    item.stash[_HANDLER] = handler
    logging.getLogger("encfs").addHandler(handler)
    return (yield)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    # tryfirst: the outermost wrapper, so every fixture's teardown (and the unmounts in
    # it) is done when the logs are read.
    try:
        result = yield
    finally:
        handler = item.stash.get(_HANDLER, None)
        if handler is not None:
            logging.getLogger("encfs").removeHandler(handler)
    checker = item.stash.get(_CHECKER, None)
    if checker is None:
        return result
    checker.entries += STATE.drain()
    STATE.checker = None
    # A skipped or failed test's logs are not judged: its own report says what went wrong.
    reports = item.stash.get(_REPORTS, {})
    if any(r.skipped or r.failed for r in reports.values()):
        return result
    verdict = checker.verdict()
    if verdict is not None:
        pytest.fail(verdict, pytrace=False)
    return result


_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report
