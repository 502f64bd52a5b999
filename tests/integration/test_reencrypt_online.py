"""`encfs-gw reencrypt` of a mounted volume: run by its daemon between FUSE requests,
through the real CLI on real mounts, while programs read, write, create and rename.

Every file is compared with a model kept in memory; each wait is on a condition with a
deadline (progress lines of the pass, the daemon's status), never on a sleep.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import select
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs.admin.reencrypt_journal import CRASH_AT_ENV
from encfs.errors import ControlSocketError, UsageError
from tests.helpers.mount import ENCFS_GW, clear_mountpoint, mounted, run_cli, unmount
from tests.integration.test_dead_daemon import kill_daemon
from tests.integration.test_reencrypt import (
    check,
    config_of,
    make_volume,
    slot_versions,
)

pytestmark = pytest.mark.fuse

MIB = 1 << 20
WAIT = 120.0  # seconds: bounds for conditions on a loaded 2-core machine


def status(target: Path) -> dict:
    return json.loads(run_cli("status", target, "--json", check=True).stdout)


@contextlib.contextmanager
def busy(mnt: Path, seed: int) -> Iterator[dict[str, bytes]]:
    """For the block: a writer that creates, rewrites and renames files (at least 30
    operations) and a reader that reads them back (each read must be some contents the
    writer wrote, whole); yields the model of the writer's files (name -> contents);
    raises the first error a thread met."""
    stop = threading.Event()
    errors: list[BaseException] = []
    model: dict[str, bytes] = {}
    written: set[bytes] = set()  # every contents ever written (random: each unique)
    lock = threading.Lock()
    (mnt / "busy").mkdir()

    def writer() -> None:
        rnd = random.Random(seed)
        try:
            for i in itertools.count():
                if i >= 30 and stop.is_set():
                    break
                name = f"busy/f{i % 12}"
                data = rnd.randbytes(rnd.choice([100, 20000, 200000]))
                with lock:
                    written.add(data)  # before it can be seen
                # written whole under a temporary name, then renamed over: a reader sees
                # the old contents or the new, never a half-written file
                (mnt / "busy" / "tmp").write_bytes(data)
                os.replace(mnt / "busy" / "tmp", mnt / name)
                with lock:
                    model[name] = data
                if i % 3 == 2:  # a rename racing the pass: the name moves, data stays
                    new = f"busy/r{i}"
                    os.rename(mnt / name, mnt / new)
                    with lock:
                        model[new] = model.pop(name)
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        try:
            while not stop.is_set():
                with lock:
                    name = random.choice(list(model)) if model else None
                if name is not None:
                    with contextlib.suppress(FileNotFoundError):  # renamed meanwhile
                        got = (mnt / name).read_bytes()
                        # maybe rewritten meanwhile: then some contents in full, never
                        # a torn or garbled one
                        with lock:
                            assert got in written, name
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    try:
        yield model
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=WAIT)
    assert not errors, errors


def start_reencrypt(target: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*ENCFS_GW, "reencrypt", str(target), "--json", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def progress_until(proc: subprocess.Popen, wanted) -> dict:
    """The first progress line of `proc` that `wanted` accepts (deadline WAIT)."""
    deadline = time.monotonic() + WAIT
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"reencrypt ended first: {proc.wait()} {proc.stderr.read()}")
        message = json.loads(line)
        if wanted(message):
            return message
    raise AssertionError("no such progress line within the deadline")


def entry_names(backing: Path) -> set[str]:
    """The backing names of every entry (encrypted names: reserved ones and the stores
    left out)."""
    names = set()
    for _, dirs, files in os.walk(backing):
        dirs[:] = [d for d in dirs if not d.startswith(".egw-")]
        names |= {n for n in dirs + files if not n.startswith((".egw-", "encfs-gw"))
                  and not n.endswith(".name")}
    return names


def test_mounted_pass_while_programs_write_read_and_rename(tmp_path):
    volume, files = make_volume(tmp_path, seed=21, big_mib=6)
    names_before = entry_names(volume.backing)
    assert len(names_before) > 10
    with mounted(volume, tmp_path / "mnt") as mnt:
        with busy(mnt, seed=5) as model:
            # throttled, so the writer and reader run through most of the data pass
            proc = start_reencrypt(mnt, "--rate", "12")
            out, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
        summary = json.loads(out.splitlines()[-1])
        assert summary["done"] and summary["target"] == 2
        assert summary["deks_per_version"].keys() == {"2"}
        assert summary["names_moved"] > 10 and summary["names_unreadable"] == 0
        check(mnt, files)
        for name, data in model.items():
            assert (mnt / name).read_bytes() == data, name
        assert status(mnt)["reencrypt"] is None
    # every block under the new version, every name a new one (the new volume key)
    assert set(slot_versions(volume.backing)) == {2}
    assert not entry_names(volume.backing) & names_before
    assert "reencrypt" not in config_of(volume.backing)
    with mounted(volume, tmp_path / "mnt") as mnt:
        check(mnt, files)
        for name, data in model.items():
            assert (mnt / name).read_bytes() == data, name
    fsck = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_kill9_of_the_daemon_mid_pass_then_the_mount_resumes_it(tmp_path):
    """Throttled to 2 MiB/s, the pass is killed with its daemon once it has re-encrypted
    some data and not all of it; the next mount replays the journal and resumes the
    pass, which finishes: every file equals its model, every name is intact."""
    volume, files = make_volume(tmp_path, seed=22, big_mib=12)
    with mounted(volume, tmp_path / "mnt") as mnt:
        proc = start_reencrypt(mnt, "--rate", "2")
        try:
            seen = progress_until(proc, lambda m: m.get("progress", {}).get(
                "bytes_reencrypted", 0) >= MIB)
            assert seen["progress"]["bytes_reencrypted"] < 12 * MIB
            kill_daemon(volume)
            clear_mountpoint(mnt)  # the dead mount (a test's cleanup)
        finally:
            proc.wait(timeout=WAIT)
            proc.stdout.close()
            proc.stderr.close()
        assert proc.returncode != 0  # its daemon went away mid-pass
    assert config_of(volume.backing)["reencrypt"]["target"] == 2
    versions = slot_versions(volume.backing)
    assert versions.get(1) and versions.get(2), versions  # mid-pass indeed
    with mounted(volume, tmp_path / "mnt") as mnt:
        check(mnt, files)  # served at once: the data pass goes on behind the requests
        state = wait_until_finished(mnt)
        assert state["deks_per_version"].keys() == {"2"}
        assert state["kek_versions"] == {"1": "retired", "2": "active"}
        check(mnt, files)
    assert set(slot_versions(volume.backing)) == {2}
    assert not (volume.backing / ".egw-reencrypt").exists()
    fsck = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_kill9_of_the_daemon_again_and_again_wherever_its_pass_is(tmp_path, capsys):
    """No hook: the daemon is killed first once its throttled pass has done a seeded
    amount, then each next mount resumes the pass at full speed and its daemon is killed
    after a seeded busy-wait, at whatever step the pass is in (a batch being sealed,
    written or synced, the journal, the names), again and again until the pass is over.
    After every kill the volume mounts; every other mount reads every file back (equal to
    its model) while the resumed pass runs; at the end every DEK is under the new version,
    every file equals its model and fsck is clean."""
    rnd = random.Random(31)
    volume, files = make_volume(tmp_path, seed=31, big_mib=24)
    mnt = tmp_path / "mnt"
    with mounted(volume, mnt) as live:
        proc = start_reencrypt(live, "--rate", "4")
        try:
            threshold = rnd.randrange(1, 4) * MIB
            progress_until(proc, lambda m: m.get("progress", {}).get(
                "bytes_reencrypted", 0) >= threshold)
            kill_daemon(volume)
            clear_mountpoint(mnt)
        finally:
            proc.wait(timeout=WAIT)
            proc.stdout.close()
            proc.stderr.close()
    kills, mid_pass = 1, 1
    for i in range(8):
        if "reencrypt" not in config_of(volume.backing):
            break
        with mounted(volume, mnt) as live:
            if i % 2:
                check(live, files)  # read while the resumed pass runs
            for _ in range(rnd.choice([0, 10_000, 100_000, 1_000_000, 3_000_000])):
                pass  # a seeded delay: the kill lands at varied points of the pass
            kill_daemon(volume)
            clear_mountpoint(mnt)
        kills += 1
        mid_pass += "reencrypt" in config_of(volume.backing)
    with mounted(volume, mnt) as live:
        check(live, files)
        state = wait_until_finished(live)
        assert state["deks_per_version"].keys() == {"2"}
        check(live, files)
    assert set(slot_versions(volume.backing)) == {2}
    assert not (volume.backing / ".egw-reencrypt").exists()
    fsck = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    with capsys.disabled():
        print(f"\nmounted reencrypt: {kills} kills, {mid_pass} of them mid-pass")


def wait_until_finished(mnt: Path) -> dict:
    """The daemon's status once its pass is over (deadline WAIT)."""
    deadline = time.monotonic() + WAIT
    while (state := status(mnt))["reencrypt"] is not None:
        assert time.monotonic() < deadline, "the pass did not finish"
        select.select([], [], [], 0.1)  # (a bounded poll of the daemon's state)
    return state


@pytest.mark.parametrize("point", ["3:rename", "2:header", "1:torn"])
def test_an_offline_pass_killed_is_resumed_by_the_mount(tmp_path, point):
    """Killed in its name pass (after a rename, with a header valid under both keys) or
    in the middle of a batch's block records (a torn write only the journal repairs):
    the mount replays the journal and finishes the names before it serves anything, its
    daemon finishes the data."""
    volume, files = make_volume(tmp_path, seed=24, big_mib=2)
    result = subprocess.run(
        [*ENCFS_GW, "reencrypt", str(volume.backing), "--keyfile", str(volume.keyfile)],
        capture_output=True, text=True, timeout=WAIT, check=False,
        env={**os.environ, CRASH_AT_ENV: point},
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    with mounted(volume, tmp_path / "mnt") as mnt:
        check(mnt, files)
        state = wait_until_finished(mnt)
        assert state["deks_per_version"].keys() == {"2"}
        check(mnt, files)
    assert not (volume.backing / ".egw-reencrypt").exists()
    fsck = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


@pytest.mark.parametrize("point", ["2:dirid", "3:rename", "1:symlink", "1:torn", "2:in-place"])
def test_the_daemon_killed_at_a_step_of_its_pass_then_the_mount_finishes_it(tmp_path, point):
    """The daemon's own pass killed (the test hook, in the daemon's environment) at a
    step of the name pass (a directory's record moved, an entry renamed, a symlink
    re-created) or of a data batch (a torn block write, the writes done and the journal
    not removed): the next mount replays, finishes the names before it serves, and its
    daemon finishes the data."""
    volume, files = make_volume(tmp_path, seed=26, big_mib=2)
    mnt = tmp_path / "mnt"
    run_cli("mount", volume.backing, mnt, "--keyfile", volume.keyfile, check=True,
            env={**os.environ, CRASH_AT_ENV: point})
    try:
        died = run_cli("reencrypt", mnt, "--json")
        # its daemon went away mid-pass: one line, the control socket's code
        assert died.returncode == ControlSocketError.exit_code, died.stderr
        assert "ended the connection before the pass ended" in died.stderr
        kill_daemon(volume)  # (gone already: waits for nothing)
    finally:
        clear_mountpoint(mnt)  # the dead mount (a test's cleanup)
        unmount(volume, mnt)  # (releases the dead daemon's log)
    assert config_of(volume.backing)["reencrypt"]["target"] == 2
    with mounted(volume, mnt):
        check(mnt, files)
        assert wait_until_finished(mnt)["deks_per_version"].keys() == {"2"}
        check(mnt, files)
    fsck = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_status_then_pause_then_a_remount_leaves_it_paused_then_resume(tmp_path):
    """`status` during a pass; `--pause`; a remount leaves the paused pass alone;
    `--resume` finishes it; then nothing is left to pause or resume."""
    volume, files = make_volume(tmp_path, seed=25, big_mib=8)
    with mounted(volume, tmp_path / "mnt") as mnt:
        proc = start_reencrypt(mnt, "--rate", "2")
        try:
            progress_until(proc, lambda m: m.get("progress", {}).get("bytes_reencrypted", 0))
            state = status(mnt)
            assert state["reencrypt"]["target"] == 2
            assert state["reencrypt_progress"]["bytes_total"] > 8 * MIB
            text = run_cli("status", mnt, check=True).stdout
            assert "re-encryption to KEK version 2 in progress: " in text
            assert "MiB/s" in text
            paused = run_cli("reencrypt", mnt, "--pause", check=True)
            assert paused.stdout.strip() == "re-encryption paused"
        finally:
            out, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err  # the runner stops and says so
        result = json.loads(out.splitlines()[-1])
        assert result["paused"] and not result["done"]
        assert 0 < result["bytes_reencrypted"] < result["bytes_total"]
        state = status(mnt)
        assert state["reencrypt"]["paused"] is True and "reencrypt_progress" not in state
        text = run_cli("status", mnt, check=True).stdout
        assert "re-encryption to KEK version 2 in progress" in text
        check(mnt, files)
    assert config_of(volume.backing)["reencrypt"]["paused"] is True
    with mounted(volume, tmp_path / "mnt") as mnt:  # a paused pass is not resumed
        state = status(mnt)
        assert state["reencrypt"]["paused"] is True and "reencrypt_progress" not in state
        assert set(state["deks_per_version"]) == {"1", "2"}
        check(mnt, files)
        resumed = run_cli("reencrypt", mnt, "--resume", "--json", check=True)
        assert json.loads(resumed.stdout.splitlines()[-1])["done"]
        state = status(mnt)
        assert state["reencrypt"] is None and set(state["deks_per_version"]) == {"2"}
        check(mnt, files)
        # nothing left to pause or resume: one line, the usage code
        for flag in ("--pause", "--resume"):
            refused = run_cli("reencrypt", mnt, flag)
            assert refused.returncode == UsageError.exit_code, refused.stderr
            assert refused.stderr.startswith("encfs-gw: error: no re-encryption is in progress")
    refused = run_cli("reencrypt", volume.backing, "--pause", "--keyfile", volume.keyfile)
    assert refused.returncode == UsageError.exit_code and "is not mounted" in refused.stderr
