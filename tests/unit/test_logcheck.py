"""What the log check (tests/helpers/logcheck.py) counts as a bad line, and its verdict.
(Its effect on real test runs: tests/integration/test_logcheck.py.)"""

from __future__ import annotations

from tests.helpers.logcheck import Entry, LogChecker, bad_entries

DAEMON_LOG = """\
encfs-gw: INFO mounted on /mnt
encfs-gw: DEBUG lookup 1 'a'
encfs-gw: WARNING integrity failure in inode 7: block 1: block does not authenticate
encfs-gw: ERROR cannot write the audit log
encfs-gw: error: the volume is locked by process 12
/usr/lib/python3/trio/_core.py:12: RuntimeWarning: coroutine 'f' was never awaited
Exception ignored in: <function Thing.__del__ at 0x7f>
Traceback (most recent call last):
  File "/x/encfs/fuse/operations.py", line 10, in read

    raise ValueError("boom")
ValueError: boom
encfs-gw: INFO unmounted
"""


def test_bad_lines_and_a_traceback_as_one_entry():
    texts = [entry.text for entry in bad_entries(DAEMON_LOG, "log")]
    assert texts[:5] == [
        "encfs-gw: WARNING integrity failure in inode 7: block 1: block does not authenticate",
        "encfs-gw: ERROR cannot write the audit log",
        "encfs-gw: error: the volume is locked by process 12",
        "/usr/lib/python3/trio/_core.py:12: RuntimeWarning: coroutine 'f' was never awaited",
        "Exception ignored in: <function Thing.__del__ at 0x7f>",
    ]
    assert texts[5].splitlines()[0] == "Traceback (most recent call last):"
    assert texts[5].splitlines()[-1] == "ValueError: boom"
    assert len(texts) == 6  # INFO and DEBUG lines are fine; the traceback body is not re-counted


def test_tracebacks_only_for_command_output():
    texts = [e.text for e in bad_entries(DAEMON_LOG, "stderr", tracebacks_only=True)]
    assert len(texts) == 1 and texts[0].endswith("ValueError: boom")


def test_a_message_that_merely_mentions_a_level_is_fine():
    assert bad_entries("encfs-gw: INFO the word WARNING in a file name\n", "log") == []


def test_verdict_matches_patterns_anywhere_in_an_entry_and_counts_required_ones():
    checker = LogChecker()
    checker.expect(r"ValueError: boom", required=True)
    checker.expect(r"integrity failure in inode \d+")
    checker.entries = bad_entries(DAEMON_LOG, "log")[:1] + bad_entries(DAEMON_LOG, "log")[5:]
    assert checker.verdict() is None


def test_verdict_lists_unexpected_lines_once_with_counts_and_missing_required_ones():
    checker = LogChecker()
    checker.expect(r"never seen", required=True)
    checker.entries = [Entry("log a", "encfs-gw: WARNING x")] * 3
    checker.entries.append(Entry("log b", "encfs-gw: ERROR y"))
    verdict = checker.verdict()
    assert verdict is not None
    assert "  [log a]\n    encfs-gw: WARNING x (x3)\n  [log b]\n    encfs-gw: ERROR y" in verdict
    assert "expected log line never seen: 'never seen'" in verdict
