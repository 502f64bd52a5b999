"""A real mount on each request loop (encfs/daemon/request_loop.py): the accelerated loop
(encfs/fuse/accel/) and pyfuse3's stock `pyfuse3.main()`; what `status` and the mount's
log say about them; and the version check on a trio that reports a version the
accelerated loop was not validated on (the test sets `trio.__version__` in the CLI's
interpreter before encfs-gw runs: the daemon is a fork of it, and no other trio can be
installed here).

These tests name their loop themselves, so the stock pass of `make test`
(ENCFS_GW_REQUEST_LOOP=stock) would only repeat them: they run in the first pass.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs.daemon import request_loop
from encfs.fuse import accel
from tests.helpers.mount import (
    TIMEOUT,
    Volume,
    daemon_pid,
    init_volume,
    is_mounted,
    run_cli,
    unmount,
)
from tests.helpers.request_loop import spinners

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(
        os.environ.get(request_loop.ENV) == "stock",
        reason="names its request loop itself: runs in the first pass only",
    ),
]

UNVALIDATED_TRIO = "0.99.0"
# The CLI with trio claiming a version the accelerated loop was not validated on.
PRETEND = (
    "import sys, trio\n"
    f"trio.__version__ = {UNVALIDATED_TRIO!r}\n"
    "from encfs.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def environment() -> dict[str, str]:
    """The tests' environment without a request loop of the stock pass."""
    return {k: v for k, v in os.environ.items() if k != request_loop.ENV}


@contextlib.contextmanager
def mounted(
    volume: Volume, mnt: Path, *options: str, log: Path | None = None,
    prelude: str | None = None,
) -> Iterator[subprocess.CompletedProcess]:
    """`encfs-gw mount` (background: back once the mount is live), `prelude` run by the
    interpreter first; yields the mount command's result, unmounts after."""
    mnt.mkdir(exist_ok=True)
    argv = ["mount", str(volume.backing), str(mnt), "--keyfile", str(volume.keyfile)]
    argv += [f"-o{option}" for option in options]
    if log is not None:
        argv += ["--log-file", str(log)]
    command = [sys.executable, "-c", prelude] if prelude else [sys.executable, "-m", "encfs"]
    result = subprocess.run(
        [*command, *argv], capture_output=True, text=True, timeout=TIMEOUT,
        env=environment(), check=False,
    )
    assert result.returncode == 0, result.stderr
    try:
        yield result
    finally:
        unmount(volume, mnt)


def status(mnt: Path) -> dict:
    return json.loads(run_cli("status", "--json", mnt, check=True).stdout)


def status_lines(mnt: Path, *starts: str) -> list[str]:
    lines = run_cli("status", mnt, check=True).stdout.splitlines()
    return [line for line in lines if line.startswith(starts)]


def exercise(mnt: Path) -> None:
    """Files written, synced, renamed, read back, listed; small requests in a row."""
    data = os.urandom(3 << 20)
    (mnt / "d").mkdir()
    with open(mnt / "d" / "f", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # through the syncer and the loop's thread runner
    os.rename(mnt / "d" / "f", mnt / "g")
    assert (mnt / "g").read_bytes() == data
    assert sorted(os.listdir(mnt)) == ["d", "g"]
    for _ in range(2000):  # getxattr: never cached by the kernel, each one a request
        with contextlib.suppress(OSError):
            os.getxattr(mnt / "g", "user.none")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the warmer needs two CPUs")
def test_the_accelerated_loop_serves_with_its_busy_poll_and_warmer(tmp_path):
    volume, mnt, log = init_volume(tmp_path), tmp_path / "mnt", tmp_path / "daemon.log"
    options = ("request_loop=accelerated", "cpu_warmer=on", "busy_poll=on")
    with mounted(volume, mnt, *options, log=log) as result:
        assert result.stderr == ""
        daemon = daemon_pid(volume.backing)
        assert len(spinners(daemon)) == 1
        exercise(mnt)
        report = status(mnt)
        assert report["request_loop"] == {
            "loop": "accelerated",
            "mode": "accelerated",
            "reason": "-o request_loop=accelerated: trio 0.35.0, pyfuse3 3.5.0, validated",
        }
        assert report["cpu"]["busy_poll"]["on"] and report["cpu"]["busy_poll"]["cpu_seconds"] > 0
        assert report["cpu"]["cpu_warmer"]["running"]
        assert status_lines(mnt, "request loop") == [
            "request loop: accelerated "
            "(-o request_loop=accelerated: trio 0.35.0, pyfuse3 3.5.0, validated)"
        ]
    (mounted_line,) = [line for line in log.read_text().splitlines() if "mounted on" in line]
    assert mounted_line == (
        f"encfs-gw: INFO mounted on {mnt}; request loop: accelerated "
        "(-o request_loop=accelerated: trio 0.35.0, pyfuse3 3.5.0, validated)"
    )


def test_the_stock_loop_serves_without_busy_poll_or_warmer(tmp_path):
    """Forced on, the warmer and the busy-poll stay off on the stock loop: one warning
    each, nothing spins, and status says why."""
    volume, mnt, log = init_volume(tmp_path), tmp_path / "mnt", tmp_path / "daemon.log"
    options = ("request_loop=stock", "cpu_warmer=on", "busy_poll=on")
    with mounted(volume, mnt, *options, log=log) as result:
        assert result.stderr.splitlines() == [
            f"encfs-gw: WARNING -o cpu_warmer=on is ignored: {request_loop.STOCK_WARMER}",
            f"encfs-gw: WARNING -o busy_poll=on is ignored: {request_loop.STOCK_BUSY_POLL}",
        ]
        daemon = daemon_pid(volume.backing)
        exercise(mnt)
        assert spinners(daemon) == []
        report = status(mnt)
        assert report["request_loop"] == {
            "loop": "stock", "mode": "stock", "reason": "-o request_loop=stock",
        }
        cpu = report["cpu"]
        assert cpu["busy_poll"] == {
            "on": False, "mode": "on", "reason": request_loop.STOCK_BUSY_POLL,
            "cpu_seconds": 0.0,
        }
        assert (cpu["cpu_warmer"]["on"], cpu["cpu_warmer"]["running"]) == (False, False)
        assert cpu["deferred_closes"] is True
        assert status_lines(mnt, "request loop", "CPU warmer", "busy-poll") == [
            "request loop: stock (-o request_loop=stock)",
            f"CPU warmer: off ({request_loop.STOCK_WARMER}); 0.000 CPU s",
            f"busy-poll: off ({request_loop.STOCK_BUSY_POLL}); 0.000 CPU s",
        ]
    (mounted_line,) = [line for line in log.read_text().splitlines() if "mounted on" in line]
    assert mounted_line == (
        f"encfs-gw: INFO mounted on {mnt}; request loop: stock (-o request_loop=stock)"
    )


def test_auto_on_an_unvalidated_trio_mounts_on_the_stock_loop_with_one_warning(tmp_path):
    volume, mnt = init_volume(tmp_path), tmp_path / "mnt"
    why = accel.unvalidated({"trio": UNVALIDATED_TRIO, "pyfuse3": "3.5.0"})
    with mounted(volume, mnt, prelude=PRETEND) as result:
        assert result.stderr.splitlines() == [
            "encfs-gw: WARNING request loop: stock pyfuse3.main(), not the accelerated "
            f"one: {why}"
        ]
        exercise(mnt)
        assert status(mnt)["request_loop"] == {
            "loop": "stock", "mode": "auto", "reason": f"auto: {why}",
        }
        assert status_lines(mnt, "request loop") == [f"request loop: stock (auto: {why})"]


def test_accelerated_on_an_unvalidated_trio_is_refused_with_exit_16(tmp_path):
    volume, mnt = init_volume(tmp_path), tmp_path / "mnt"
    mnt.mkdir()
    why = accel.unvalidated({"trio": UNVALIDATED_TRIO, "pyfuse3": "3.5.0"})
    result = subprocess.run(
        [sys.executable, "-c", PRETEND, "mount", str(volume.backing), str(mnt),
         "--keyfile", str(volume.keyfile), "-o", "request_loop=accelerated"],
        capture_output=True, text=True, timeout=TIMEOUT, env=environment(), check=False,
    )
    assert result.returncode == 16, result.stderr
    assert result.stderr.splitlines() == [
        f"encfs-gw: error: -o request_loop=accelerated refused: {why} "
        "(use request_loop=auto or stock)"
    ]
    assert not is_mounted(mnt)
    assert daemon_pid(volume.backing) is None


def test_a_mode_from_the_environment_that_is_none_of_them_is_a_usage_error(tmp_path):
    volume, mnt = init_volume(tmp_path), tmp_path / "mnt"
    mnt.mkdir()
    result = run_cli("mount", volume.backing, mnt, "--keyfile", volume.keyfile,
                     env={**environment(), request_loop.ENV: "fast"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "encfs-gw: error: ENCFS_GW_REQUEST_LOOP=fast: expected auto, accelerated, stock"
    ]
    assert not is_mounted(mnt)
