"""Which request loop serves a mount (encfs/daemon/request_loop.py) and the accelerated
loop's version check (encfs/fuse/accel/__init__.py), without a mount: the versions are
given to the check, as an unvalidated trio cannot be installed here. A real mount on each
loop, and on a trio that reports an unvalidated version: tests/integration/test_request_loops.py.
"""

from __future__ import annotations

import logging

import pyfuse3
import pytest
import trio

from encfs import backing
from encfs.daemon import request_loop
from encfs.daemon.request_loop import LoopChoice, StockLoop, choose, open_loop, requested_mode
from encfs.errors import MountFailed, UsageError
from encfs.fuse import accel

VALID = {"trio": "0.35.0", "pyfuse3": "3.5.0"}
NEWER_TRIO = {"trio": "0.99.0", "pyfuse3": "3.5.0"}


def test_the_installed_versions_are_the_validated_ones():
    """The versions this suite runs on are the ones VALIDATED names: a trio or pyfuse3
    upgrade fails here until the accelerated loop is validated on it (and listed)."""
    assert accel.installed_versions() == {"trio": trio.__version__, "pyfuse3": pyfuse3.__version__}
    assert accel.unvalidated() is None
    assert accel.unvalidated(VALID) is None


def test_an_unvalidated_version_is_named_with_the_validated_ones():
    assert accel.unvalidated(NEWER_TRIO) == (
        "trio 0.99.0 is not validated for the accelerated request loop "
        "(validated: trio 0.35.0, pyfuse3 3.5.0)"
    )
    both = accel.unvalidated({"trio": "0.36.0", "pyfuse3": "3.6.0"})
    assert both.startswith("trio 0.36.0 and pyfuse3 3.6.0 are not validated")
    assert accel.unvalidated({"trio": "0.35.0"}).startswith("pyfuse3 unknown is not validated")


def test_auto_on_validated_versions_is_the_accelerated_loop_with_one_info_line(caplog):
    caplog.set_level(logging.INFO, logger="encfs.daemon.request_loop")
    choice = choose("auto", "auto", VALID)
    reason = "auto: trio 0.35.0, pyfuse3 3.5.0, validated"
    assert choice == LoopChoice("accelerated", "auto", reason)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "request loop: accelerated (auto: trio 0.35.0, pyfuse3 3.5.0, validated)")
    ]


@pytest.mark.expected_log(r"request loop: stock pyfuse3.main.., not the accelerated", required=True)
def test_auto_on_an_unvalidated_version_falls_back_to_stock_with_one_warning(caplog):
    caplog.set_level(logging.INFO, logger="encfs.daemon.request_loop")
    choice = choose("auto", "auto", NEWER_TRIO)
    assert (choice.loop, choice.mode) == ("stock", "auto")
    assert choice.reason == "auto: " + accel.unvalidated(NEWER_TRIO)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "request loop: stock pyfuse3.main(), not the accelerated one: "
         + accel.unvalidated(NEWER_TRIO))
    ]


def test_stock_asked_for_is_the_stock_loop_without_a_version_check(caplog):
    caplog.set_level(logging.INFO, logger="encfs.daemon.request_loop")
    choice = choose("stock", "-o request_loop=stock", {"trio": "anything"})
    assert choice == LoopChoice("stock", "stock", "-o request_loop=stock")
    assert [r.levelname for r in caplog.records] == ["INFO"]


def test_accelerated_asked_for_on_an_unvalidated_version_is_refused():
    """Documented choice: refused (exit 16), not a fallback, since the operator named it."""
    with pytest.raises(MountFailed) as refused:
        choose("accelerated", "-o request_loop=accelerated", NEWER_TRIO)
    assert refused.value.exit_code == 16
    assert str(refused.value) == (
        "-o request_loop=accelerated refused: " + accel.unvalidated(NEWER_TRIO)
        + " (use request_loop=auto or stock)"
    )
    assert choose("accelerated", "-o request_loop=accelerated", VALID).loop == "accelerated"


def test_the_mode_comes_from_the_option_then_the_environment_then_auto():
    env = {request_loop.ENV: "stock"}
    assert requested_mode("accelerated", env) == ("accelerated", "-o request_loop=accelerated")
    assert requested_mode(None, env) == ("stock", "ENCFS_GW_REQUEST_LOOP=stock")
    assert requested_mode(None, {}) == ("auto", "auto")
    assert requested_mode(None, {request_loop.ENV: ""}) == ("auto", "auto")
    with pytest.raises(UsageError, match=r"^-o request_loop=fast: expected auto, accelerated, "):
        requested_mode("fast", {})
    with pytest.raises(UsageError, match=r"^ENCFS_GW_REQUEST_LOOP=fast: expected "):
        requested_mode(None, {request_loop.ENV: "fast"})


@pytest.mark.expected_log(r"is ignored: stock request loop", required=True)
def test_on_the_stock_loop_the_warmer_and_busy_poll_are_off_and_a_forced_on_warns(caplog):
    loop = open_loop(LoopChoice("stock", "stock", "test"), "on", "on")
    assert isinstance(loop, StockLoop)
    assert loop.run_sync is trio.to_thread.run_sync  # no accelerated loop to tell
    backing.defer_closes(False)
    try:
        loop.start()
        assert backing.closes_deferred()  # nothing of ours spins: the closer may run
    finally:
        backing.defer_closes(True)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"-o cpu_warmer=on is ignored: {request_loop.STOCK_WARMER}",
        f"-o busy_poll=on is ignored: {request_loop.STOCK_BUSY_POLL}",
    ]
    report = loop.status()
    assert report["cpu_warmer"] == {
        "on": False, "mode": "on", "reason": request_loop.STOCK_WARMER, "running": False,
        "starts": 0, "cpu_seconds": 0.0,
    }
    assert report["busy_poll"] == {
        "on": False, "mode": "on", "reason": request_loop.STOCK_BUSY_POLL, "cpu_seconds": 0.0,
    }
    assert report["deferred_closes"] is True


def test_the_accelerated_choice_opens_the_accelerated_loop_with_its_helpers():
    from encfs.fuse.accel.loop import run_in_thread
    from encfs.fuse.accel.session import AcceleratedLoop

    loop = open_loop(LoopChoice("accelerated", "auto", "test"), "off", "off")
    assert isinstance(loop, AcceleratedLoop)
    assert loop.run_sync is run_in_thread  # the busy-poll pauses while a thread runs
    loop.start()
    try:
        report = loop.status()
        assert (report["cpu_warmer"]["on"], report["busy_poll"]["on"]) == (False, False)
        assert report["busy_poll"]["reason"] == "-o busy_poll=off"
    finally:
        loop.stop()

