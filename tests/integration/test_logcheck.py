"""The log check (tests/helpers/logcheck.py) itself: a pytest run, in a child process, of a
small test file whose tests provoke real warnings of a real daemon (a tampered block read
through the mount, an ignored mount option) and of in-process code, with and without
declaring them. Each undeclared one must fail its test, naming the offending line; each
declared one must not; a required declaration never seen must fail."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuse

REPO = Path(__file__).resolve().parents[2]

SMALL_TESTS = '''
import errno
import logging
import os

import pytest

from encfs.format.blocks import Layout
from tests.helpers import logcheck
from tests.helpers.mount import init_volume, mounted

BLOCK = Layout(16384)


def tamper_and_read(tmp_path):
    """A flipped byte in block 1 of a file; reading it through the mount gives EIO and
    the daemon logs an integrity failure (after the mount went live: its log file)."""
    volume = init_volume(tmp_path)
    mnt = tmp_path / "mnt"
    with mounted(volume, mnt):
        (mnt / "victim").write_bytes(os.urandom(3 * 16384))
    victim = max((e for e in os.scandir(volume.backing) if e.is_file() and "." not in e.name),
                 key=lambda e: e.stat().st_size).path
    with open(victim, "r+b") as f:
        f.seek(BLOCK.record_offset(1) + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x80]))
    with mounted(volume, mnt):
        with pytest.raises(OSError) as info:
            (mnt / "victim").read_bytes()
        assert info.value.errno == errno.EIO


def test_undeclared_daemon_warning(tmp_path):
    tamper_and_read(tmp_path)


@pytest.mark.expected_log(r"integrity failure in inode \\d+.* block 1")
def test_declared_daemon_warning(tmp_path):
    tamper_and_read(tmp_path)


def test_undeclared_warning_before_the_mount_is_live(tmp_path):
    volume = init_volume(tmp_path)
    with mounted(volume, tmp_path / "mnt", "no_auto_unmount"):
        pass


def test_declared_warning_before_the_mount_is_live(tmp_path, expect_log):
    expect_log(r"no_auto_unmount is ignored", required=True)
    volume = init_volume(tmp_path)
    with mounted(volume, tmp_path / "mnt", "no_auto_unmount"):
        pass


def test_undeclared_in_process_warning():
    logging.getLogger("encfs.engine.volume").warning("in-process trouble %d", 42)


@pytest.mark.expected_log(r"in-process trouble 42", required=True)
def test_declared_in_process_warning():
    logging.getLogger("encfs.engine.volume").warning("in-process trouble %d", 42)


def test_other_loggers_and_info_lines_are_not_judged():
    logging.getLogger("encfs.engine.volume").info("fine")
    logging.getLogger("somebody.else").warning("not ours")


@pytest.mark.expected_log(r"never logged by anything", required=True)
def test_required_but_never_seen():
    pass


@pytest.mark.expected_log(r"never logged by anything")
def test_optional_and_never_seen():
    pass


def test_traceback_in_a_watched_log(tmp_path):
    # A stand-in for a foreground daemon's log (the test writes it, says so).
    log = tmp_path / "daemon.log"
    log.write_text("encfs-gw: WARNING written before the watch\\n")
    logcheck.watch(log)
    with open(log, "a") as out:
        out.write("Traceback (most recent call last):\\n  File \\"x.py\\", line 1, in f\\n"
                  "ZeroDivisionError: division by zero\\n")
    logcheck.release(log)


def test_a_failing_test_is_not_judged_twice():
    logging.getLogger("encfs.engine.volume").error("also broken")
    assert False, "the test's own failure"


def test_a_skipped_test_is_not_judged():
    logging.getLogger("encfs.engine.volume").error("broken before the skip")
    pytest.skip("skipped after a warning")
'''

EXPECTED = {
    "test_undeclared_daemon_warning": "ERROR",
    "test_declared_daemon_warning": "PASSED",
    "test_undeclared_warning_before_the_mount_is_live": "ERROR",
    "test_declared_warning_before_the_mount_is_live": "PASSED",
    "test_undeclared_in_process_warning": "ERROR",
    "test_declared_in_process_warning": "PASSED",
    "test_other_loggers_and_info_lines_are_not_judged": "PASSED",
    "test_required_but_never_seen": "ERROR",
    "test_optional_and_never_seen": "PASSED",
    "test_traceback_in_a_watched_log": "ERROR",
    "test_a_failing_test_is_not_judged_twice": "FAILED",
}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[dict[str, set[str]], str]:
    """The small test file run once by a child pytest: each test's outcomes and the output."""
    where = tmp_path_factory.mktemp("logcheck-run")
    (where / "pytest.ini").write_text("[pytest]\naddopts = -rA -p no:cacheprovider\n")
    (where / "conftest.py").write_text('pytest_plugins = ["tests.helpers.logcheck"]\n')
    (where / "test_small.py").write_text(textwrap.dedent(SMALL_TESTS))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", f"--basetemp={where / 'tmp'}", "test_small.py"],
        cwd=where, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    outcomes: dict[str, set[str]] = {}
    for word, name in re.findall(r"^(PASSED|FAILED|ERROR) test_small\.py::(\w+)",
                                 done.stdout, re.MULTILINE):
        outcomes.setdefault(name, set()).add(word)
    return outcomes, done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_small_test_has_the_expected_outcome(small_run, name):
    outcomes, output = small_run
    expected = EXPECTED[name]
    got = outcomes.get(name, set())
    if expected == "ERROR":
        assert "ERROR" in got, output  # an error at teardown: the log check
    else:
        assert got == {expected}, output


def test_the_failure_names_the_offending_lines(small_run):
    _, output = small_run
    sections = dict(re.findall(r"_+ ERROR at teardown of (\w+) _+\n(.*?)(?=\n_+ |\n=+ )",
                               output, re.DOTALL))
    daemon = sections["test_undeclared_daemon_warning"]
    assert re.search(r"\[log .*daemon-logs\d*/\d+-mnt\.log\]\n +encfs-gw: (WARNING|ERROR) "
                     r"integrity failure in inode \d+.* block 1", daemon), daemon
    before_live = sections["test_undeclared_warning_before_the_mount_is_live"]
    assert "[stderr of encfs-gw mount" in before_live
    assert "encfs-gw: WARNING -o no_auto_unmount is ignored" in before_live
    in_process = sections["test_undeclared_in_process_warning"]
    assert "[in-process logger encfs.engine.volume]" in in_process
    assert "encfs-gw: WARNING in-process trouble 42" in in_process
    assert ("expected log line never seen: 'never logged by anything'"
            in sections["test_required_but_never_seen"])
    traceback = sections["test_traceback_in_a_watched_log"]
    assert "Traceback (most recent call last):" in traceback
    assert "ZeroDivisionError: division by zero" in traceback
    assert "written before the watch" not in traceback  # a watch starts at the end
    assert "test_a_failing_test_is_not_judged_twice" not in sections
    assert "test_a_skipped_test_is_not_judged" not in sections
    assert "SKIPPED [1] test_small.py" in output
