"""KEK rotation: block ciphertext byte-identical, every key slot on the new version,
crash-safe at every step, online while a writer and a reader run."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import threading
from collections.abc import Iterator

import pytest

from encfs.admin.rewrap import CRASH_AFTER_ENV
from encfs.format.blocks import HEADER_SIZE, KEY_AREA_SIZE, Layout
from tests.helpers.mount import mounted, run_cli

LAYOUT = Layout(16384)


def fill(mnt, seed: int = 0) -> dict[str, bytes]:
    rnd = random.Random(seed)
    files = {}
    (mnt / "dir").mkdir()
    for i in range(12):
        size = rnd.choice([0, 1, 16383, 16384, 16385, 40 * 16384 + 7, 100000])
        data = rnd.randbytes(size)
        name = f"dir/file{i}" if i % 2 else f"file{i}"
        (mnt / name).write_bytes(data)
        files[name] = data
    big = rnd.randbytes(6 * 1024 * 1024 + 3)  # 385 blocks over 13 groups
    (mnt / "big").write_bytes(big)
    files["big"] = big
    return files


def backing_files(backing) -> list[str]:
    out = []
    for dirpath, _, filenames in os.walk(backing):
        for name in filenames:
            path = os.path.join(dirpath, name)
            data_name = "." not in name or (
                name.startswith(".egwL") and not name.endswith(".name")
            )
            if data_name and os.path.isfile(path) and not os.path.islink(path):
                out.append(path)
    return sorted(out)


def split_regions(path: str) -> tuple[bytes, bytes]:
    """(everything but the key areas, the key areas) of a backing file."""
    with open(path, "rb") as f:
        data = f.read()
    outside, keys = bytearray(data[:HEADER_SIZE]), bytearray()
    group = 0
    while LAYOUT.group_start(group) < len(data):
        start = LAYOUT.group_start(group)
        keys += data[start : start + KEY_AREA_SIZE]
        outside += data[start + KEY_AREA_SIZE : start + LAYOUT.group_cipher_size]
        group += 1
    return bytes(outside), bytes(keys)


def fingerprint(backing) -> dict[str, str]:
    return {p: hashlib.sha256(split_regions(p)[0]).hexdigest() for p in backing_files(backing)}


def slot_versions(backing) -> set[int]:
    versions = set()
    for path in backing_files(backing):
        keys = split_regions(path)[1]
        for offset in range(0, len(keys), 64):
            slot = keys[offset : offset + 64]
            if any(slot):
                versions.add(int.from_bytes(slot[:2], "big"))
    return versions


def status(target) -> dict:
    return json.loads(run_cli("status", target, "--json", check=True).stdout)


def check_files(mnt, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (mnt / name).read_bytes() == data, name


@pytest.mark.fuse
def test_offline_rotation_leaves_block_ciphertext_identical(volume, tmp_path):
    mnt = tmp_path / "mnt"
    with mounted(volume, mnt):
        files = fill(mnt)
    before = fingerprint(volume.backing)
    assert slot_versions(volume.backing) == {1}
    result = run_cli("rotate", volume.backing, "--keyfile", volume.keyfile, "--json", check=True)
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert final["done"] and final["retired"] == [1]
    assert fingerprint(volume.backing) == before  # no block or header byte changed
    assert slot_versions(volume.backing) == {2}
    state = status(volume.backing)
    assert state["kek_versions"] == {"1": "retired", "2": "active"}
    assert set(state["deks_per_version"]) == {"2"}
    # Purge the old KEK version: it is gone from the config and everything still reads.
    run_cli("rotate", volume.backing, "--purge-old", check=True)
    assert status(volume.backing)["kek_versions"] == {"3": "active"}
    config = json.loads((volume.backing / "encfs-gw.conf").read_text())
    assert [v["version"] for v in config["kek"]["versions"]] == [3]
    with mounted(volume, mnt):
        check_files(mnt, files)


@pytest.mark.fuse
@pytest.mark.parametrize("crash_after", [0, 1, 31, 32, 33, 100, 300, "last"])
def test_crash_at_any_point_then_resume(volume, tmp_path, crash_after):
    mnt = tmp_path / "mnt"
    with mounted(volume, mnt):
        files = fill(mnt)
    before = fingerprint(volume.backing)
    total = status(volume.backing)["deks_per_version"]["1"]
    assert total > 300
    crash_after = total if crash_after == "last" else crash_after
    env = {**os.environ, CRASH_AFTER_ENV: str(crash_after)}
    result = run_cli("rotate", volume.backing, env=env)
    assert result.returncode == -9  # SIGKILLed by the test hook mid-pass
    assert status(volume.backing)["rotation"]["target"] == 2
    assert fingerprint(volume.backing) == before
    run_cli("rotate", volume.backing, check=True)  # resumes toward version 2
    state = status(volume.backing)
    assert state["rotation"] is None and state["current_kek"] == 2
    assert set(state["deks_per_version"]) == {"2"}
    assert fingerprint(volume.backing) == before
    with mounted(volume, mnt):
        check_files(mnt, files)


@pytest.mark.fuse
def test_interrupted_pass_is_resumed_by_the_next_mount(volume, tmp_path):
    mnt = tmp_path / "mnt"
    with mounted(volume, mnt):
        files = fill(mnt, seed=7)
    env = {**os.environ, CRASH_AFTER_ENV: "40"}
    assert run_cli("rotate", volume.backing, env=env).returncode == -9
    with mounted(volume, mnt):  # data is intact in the middle of the pass
        check_files(mnt, files)
    with mounted(volume, mnt):
        # The daemon resumed the pass in the background; status waits for nothing, so
        # ask rotate, which finishes whatever is left and reports the census.
        result = run_cli("rotate", mnt, "--json", check=True)
        final = json.loads(result.stdout.strip().splitlines()[-1])
        assert final["done"]
        check_files(mnt, files)


@contextlib.contextmanager
def busy(mnt, *readers_of: dict[str, bytes], seed: int = 11) -> Iterator[dict[str, bytes]]:
    """For the block: a writer that rewrites w0..w9 (at least 20 writes) and a reader of
    each model in `readers_of` that checks it over and over. Yields what was written
    (the files as they were last written); raises the first error a thread met."""
    stop = threading.Event()
    errors: list[BaseException] = []
    written: dict[str, bytes] = {}

    def writer() -> None:
        rnd = random.Random(seed)
        try:
            i = 0
            while not stop.is_set() or i < 20:
                name = f"w{i % 10}"
                data = rnd.randbytes(rnd.choice([5000, 70000, 300000]))
                (mnt / name).write_bytes(data)
                written[name] = data
                i += 1
        except BaseException as exc:
            errors.append(exc)

    def reader(files: dict[str, bytes]) -> None:
        try:
            while not stop.is_set():
                check_files(mnt, files)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer)]
    threads += [threading.Thread(target=reader, args=(files,)) for files in readers_of]
    for thread in threads:
        thread.start()
    try:
        yield written
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors, errors


@pytest.mark.fuse
def test_online_rotation_while_writing_and_reading(volume, tmp_path):
    mnt = tmp_path / "mnt"
    with mounted(volume, mnt):
        files = fill(mnt, seed=3)
        with busy(mnt, files) as written:
            result = run_cli("rotate", mnt, "--json")
        assert result.returncode == 0, result.stderr
        check_files(mnt, files)
        check_files(mnt, written)
        state = status(mnt)
        assert state["mounted"] and set(state["deks_per_version"]) == {"2"}
    assert slot_versions(volume.backing) == {2}
    with mounted(volume, mnt):
        check_files(mnt, written)


def test_rewrap_kek_changes_only_the_config(volume):
    before = fingerprint(volume.backing)
    config_before = json.loads((volume.backing / "encfs-gw.conf").read_text())
    run_cli("rewrap-kek", volume.backing, check=True)
    config_after = json.loads((volume.backing / "encfs-gw.conf").read_text())
    old = config_before["kek"]["versions"][0]["protectors"][0]["record"]
    new = config_after["kek"]["versions"][0]["protectors"][0]["record"]
    assert old != new  # a fresh seal of the same KEK
    assert fingerprint(volume.backing) == before
    assert status(volume.backing)["current_kek"] == 1
