"""`encfs-gw convert`: a real plaintext tree encrypted in place, through the real CLI.

The tree is a copy of the Python standard library plus everything it lacks (hard links,
symlinks of every kind, sparse files, xattrs, special files, odd names, modes, owners and
nanosecond times: tests/helpers/convert_tree.py). After the conversion the volume is
mounted and compared with the tree's manifest taken before: byte for byte, and by type,
mode, owner, atime and mtime (ns), xattrs, symlink targets, device numbers, hard-link
groups and sparseness; and nothing of the plaintext is left in the backing directory.

The crash tests kill convert (SIGKILL, test hook ENCFS_TESTONLY_CONVERT_CRASH_AFTER=N:
before its Nth change to the directory) at seeded random points, check after each kill
that every entry is either intact plaintext or complete in the volume (read through the
engine), and resume until it finishes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from encfs import convert as convert_mod
from encfs.engine import ROOT_INODE, Volume
from encfs.errors import (
    CannotConvert,
    ConfigAuthError,
    ConfigError,
    EncfsError,
    NotEnoughSpace,
    UsageError,
    VolumeBusy,
    VolumeExists,
)
from encfs.format.volume import VolumeConfig
from tests.helpers.config import trusted
from tests.helpers.convert_tree import (
    ALL_HOLE,
    CANARY,
    LONG_XATTR,
    MIB,
    SMALL_STDLIB,
    SPARSE,
    TRAILING_HOLE,
    allocated,
    backing_times,
    build_tree,
    manifest,
    restore_times,
    set_times,
    tree_bytes,
)
from tests.helpers.filesystems import small_filesystem
from tests.helpers.mount import ENCFS_GW, TIMEOUT, mounted, run_cli
from tests.helpers.mount import Volume as CliVolume

pytestmark = pytest.mark.fuse

MARKER = ".egw-convert"
STAGING = ".egw-convert.d"
RESERVED_TOP = frozenset({b".egw-convert", b".egw-convert.d"})


def convert(directory: Path, *args: str | os.PathLike, env: dict | None = None,
            timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*ENCFS_GW, "convert", str(directory), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, **(env or {})},
    )


def assert_refused(result: subprocess.CompletedProcess, exc: type[EncfsError]) -> str:
    """The documented exit code and one error line, nothing else on stderr."""
    assert result.returncode == exc.exit_code, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("encfs-gw: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def comparable(entry: dict, top: bool = False) -> dict:
    """What convert keeps: everything but the top directory's mode (the backing
    directory's 0700) and link count (the backing root holds .egw-symlinks), and the
    atime of a symlink whose target is stored apart (over 3,004 bytes: the engine reads
    the backing symlink for its size, and that read sets its atime)."""
    kept = dict(entry)
    if entry["type"] == stat.S_IFDIR and top:
        kept.pop("mode")
        kept.pop("nlink")
    if entry["type"] == stat.S_IFLNK and len(entry["target"]) > 3004:
        kept.pop("atime_ns")
    return kept


def assert_same_tree(before: tuple[dict, set], after: tuple[dict, set]) -> None:
    entries, groups = before
    seen, seen_groups = after
    assert sorted(seen) == sorted(entries)
    for rel, entry in entries.items():
        assert comparable(seen[rel], rel == b".") == comparable(entry, rel == b"."), rel
    assert seen_groups == groups


def assert_beyond_per_name_xattrs(entries: dict[bytes, dict]) -> None:
    """The tree's xattrs that only volumes with xattr-sets keep are there (a comparison
    of two trees that both lack them would pass too)."""
    on_link = entries[b"extras/names/relative-link"]["xattrs"]
    assert on_link["trusted.on-a-symlink"] == CANARY + b" on a symlink"
    assert on_link["trusted." + "s" * 190] == b"long name on a symlink"
    assert entries[b"extras/specials/fifo"]["xattrs"] == {
        "trusted.on-a-fifo": CANARY + b" on a FIFO", "trusted.empty": b"",
    }
    assert entries[b"extras/specials/char-null"]["xattrs"] == {"trusted.on-a-device": b"device"}
    assert len(LONG_XATTR) == 200
    assert entries[b"extras/with-xattrs.txt"]["xattrs"][LONG_XATTR].endswith(b"200-byte name")
    assert entries[b"extras"]["xattrs"][LONG_XATTR] == b"a directory's"


def assert_no_plaintext(backing: Path) -> None:
    names = set(os.listdir(backing))
    assert MARKER not in names and STAGING not in names
    assert tree_bytes(backing, CANARY) == []


def assert_sparse_kept(mountpoint: Path) -> None:
    # data extents only (plus key pages): a 64 MiB file with 80 KiB of data stays small
    assert allocated(mountpoint / SPARSE) < 1 * MIB
    assert allocated(mountpoint / ALL_HOLE) <= 8192
    assert allocated(mountpoint / TRAILING_HOLE) < 64 * 1024


@pytest.fixture
def key_home(tmp_path, monkeypatch):
    """Default key files (no --keyfile) go here, not into the user's ~/.config."""
    home = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    return home


# --- the whole standard library ---------------------------------------------------------------


def test_stdlib_tree_converts_and_mounts_as_it_was(tmp_path):
    """On an ext4 of its own (the space it uses at its peak is not blurred by others)."""
    with small_filesystem(tmp_path, "ext4", 1024) as fs:
        _stdlib_tree_converts(tmp_path, fs / "dir")


def _stdlib_tree_converts(tmp_path: Path, directory: Path) -> None:
    build_tree(directory)
    before = manifest(directory)
    assert len(before[0]) > 4000
    keyfile = tmp_path / "key"
    result = convert(directory, "--keyfile", keyfile, "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    plan, summary = lines[0]["plan"], lines[-1]
    assert plan["files"] == sum(e["type"] != stat.S_IFDIR for e in before[0].values())
    assert summary["verified"]["files"] == sum(
        1 for e in before[0].values() if e["type"] == stat.S_IFREG
    ) - sum(len(g) - 1 for g in before[1])
    held = summary["volume"]
    assert held["directories"] == sum(e["type"] == stat.S_IFDIR for e in before[0].values()) - 1
    assert held["extra_links"] == sum(len(g) - 1 for g in before[1])
    progress = [line["progress"] for line in lines if "progress" in line]
    assert progress and progress[-1]["files_done"] <= plan["files"]
    assert {"bytes_done", "bytes_total", "rate_mib_s", "eta"} <= set(progress[-1])
    run = summary["this_run"]
    assert 0 < run["peak_extra_bytes"] <= plan["space_needed"]
    print(  # the figures for the record (pytest -s)
        f"convert: {run['files']} files, {run['bytes'] / MIB:.1f} MiB in {run['elapsed']:.1f} s"
        f" = {run['bytes'] / MIB / run['elapsed']:.1f} MiB/s, "
        f"{run['files'] / run['elapsed']:.0f} files/s; peak extra space "
        f"{run['peak_extra_bytes'] / MIB:.1f} MiB of {plan['space_needed'] / MIB:.1f} MiB "
        "stated"
    )
    # the volume made has xattr-sets, which keeps what older volumes could not: xattrs on
    # a symlink and special files, names over 160 bytes (compared with the rest below)
    assert "xattr-sets" in json.loads((directory / "encfs-gw.conf").read_text())["features"]
    assert_beyond_per_name_xattrs(before[0])
    with mounted(CliVolume(directory, keyfile), tmp_path / "mnt") as mnt:
        after = manifest(mnt, plaintext=False)
        assert_beyond_per_name_xattrs(after[0])
        assert_same_tree(before, after)
        assert_sparse_kept(mnt)
    assert_no_plaintext(directory)  # (after: its reads change the backing atimes)
    # the volume is consistent by fsck's reading too
    fsck = run_cli("fsck", directory)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


# --- what it cannot do: the plaintext's old blocks ---------------------------------------------

CONTENTS = [b" shared by four names", b" then a hole to the end", b" has xattrs\n",
            b" a newline in the name"]  # in files only
METADATA = [b" xattr value", b"on the top directory", b"-as-a-name"]  # xattrs and names


def _image_counts(image: Path, needles: list[bytes]) -> int:
    os.sync()
    data = image.read_bytes()
    return sum(data.count(needle) for needle in needles)


def test_plaintext_stays_on_the_disk_until_trimmed_and_metadata_beyond(tmp_path):
    """What the docs say convert cannot do, on an ext4 image (a loop device passes a
    discard on as a hole in the image): after convert the files' plaintext is still in
    the filesystem's free blocks; `fstrim` discards those; the plaintext xattr values and
    names are still on the disk after it (the journal, inode tables, directory blocks)."""
    with small_filesystem(tmp_path, "ext4", 600) as fs:
        image = tmp_path / "ext4.img"
        build_tree(fs / "dir", SMALL_STDLIB, big=False)
        result = convert(fs / "dir", "--keyfile", tmp_path / "key", timeout=300)
        assert result.returncode == 0, result.stderr
        assert_no_plaintext(fs / "dir")  # nothing a file of the filesystem holds
        assert _image_counts(image, CONTENTS) > 0  # but the disk does
        trim = subprocess.run(["fstrim", str(fs)], capture_output=True, text=True, check=False)
        if trim.returncode != 0:
            pytest.skip(f"fstrim: {trim.stderr.strip()}")
        assert _image_counts(image, CONTENTS) == 0
        assert _image_counts(image, METADATA) > 0


# --- crashes ---------------------------------------------------------------------------------


def _volume_entries(backing: Path) -> dict[bytes, dict]:
    """The volume as the engine reads it (what a mount would show), for the invariant.
    Every entry is looked up before any is read (a read sets the backing atime, also of
    the other names of a hard-linked file)."""
    import hashlib

    times = backing_times(backing)  # the engine's reads touch atimes: put back after
    volume = Volume.unlock(str(backing), trusted(), converting=True)
    entries: dict[bytes, dict] = {}
    looked_up: list[tuple[object, dict]] = []
    try:
        pending = [(ROOT_INODE, b"")]
        volume.add_lookup(ROOT_INODE)
        while pending:
            directory, rel = pending.pop()
            fh = volume.opendir(directory)
            names = [n for n, b, _ in volume.readdir(fh, 0) if b]
            volume.releasedir(fh)
            for name in names:
                path = name if not rel else rel + b"/" + name
                attr = volume.lookup(directory, name)
                entries[path] = entry = {
                    "type": stat.S_IFMT(attr.mode), "mode": stat.S_IMODE(attr.mode),
                    "uid": attr.uid, "gid": attr.gid, "mtime_ns": attr.mtime_ns,
                    "atime_ns": attr.atime_ns, "ino": attr.ino,
                }
                looked_up.append((attr, entry))
                if entry["type"] == stat.S_IFDIR:
                    pending.append((attr.ino, path))
        for attr, entry in looked_up:
            try:
                if entry["type"] == stat.S_IFREG:
                    handle = volume.open(attr.ino, os.O_RDONLY)
                    data = volume.read(handle, 0, attr.size + 1)
                    volume.release(handle)
                    entry["sha256"] = hashlib.sha256(data).hexdigest()
                elif entry["type"] == stat.S_IFLNK:
                    entry["target"] = volume.readlink(attr.ino)
                elif entry["type"] in (stat.S_IFCHR, stat.S_IFBLK):
                    entry["rdev"] = attr.rdev
                entry["xattrs"] = {  # (xattr-sets: on every kind of object)
                    os.fsdecode(x): volume.getxattr(attr.ino, x)
                    for x in volume.listxattr(attr.ino)
                }
            except (OSError, EncfsError) as exc:
                entry["error"] = repr(exc)
    finally:
        volume.close()
        restore_times(times)
    return entries


KEYS = ("type", "mode", "uid", "gid", "mtime_ns", "atime_ns", "xattrs", "sha256", "target",
        "rdev")


def _picked(entry: dict) -> dict:
    return {k: entry[k] for k in KEYS if k in entry}


def assert_each_entry_plaintext_or_converted(directory: Path, original: dict) -> None:
    """After a kill: every entry is intact plaintext (still in the directory or its
    staging tree), or complete in the volume; nothing is lost or half-done."""
    tree = directory / STAGING / "tree"
    plain: dict[bytes, dict] = {}
    volume_made = (directory / "encfs-gw.conf").exists()
    if not volume_made:  # before the volume: plaintext at the top and in the staging tree
        top, _ = manifest(directory, skip_top=RESERVED_TOP)
        plain.update({rel: e for rel, e in top.items() if rel != b"."})
    if tree.exists():
        staged, _ = manifest(tree)
        plain.update({rel: e for rel, e in staged.items() if rel != b"."})
    encrypted = _volume_entries(directory) if volume_made else {}
    for rel, entry in original.items():
        if rel == b".":
            continue
        if rel in plain and entry["type"] == stat.S_IFDIR:
            continue  # emptied as it goes (its metadata waits in the state: see the end)
        if rel in plain:
            # untouched: contents, metadata, even atime (convert reads with O_NOATIME)
            assert _picked(plain[rel]) == _picked(entry), rel
            continue
        assert rel in encrypted, f"{rel!r} is neither plaintext nor in the volume"
        assert "error" not in encrypted[rel], (rel, encrypted[rel])
        assert _picked(encrypted[rel]) == _picked(entry), rel


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_kill9_at_random_points_then_resume(tmp_path, seed, key_home):
    """Seeded kill points: the first early (the marker, staging, making the volume), the
    next four anywhere in what a whole run does (counted on an identical tree); each run
    resumes where the last stopped, and the fifth run is left to finish."""
    big = seed % 2 == 0
    measured = tmp_path / "measured"
    build_tree(measured, SMALL_STDLIB, big=big)
    result = convert(measured, "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    changes = json.loads(result.stdout.splitlines()[-1])["this_run"]["changes"]
    directory = tmp_path / "dir"
    build_tree(directory, SMALL_STDLIB, big=big)
    original, groups = manifest(directory)
    rng = random.Random(seed)
    points = [rng.randint(1, 40)] + [rng.randint(1, changes // 2) for _ in range(4)]
    kills = 0
    for point in [*points, None]:
        env = {convert_mod.CRASH_AFTER_ENV: str(point)} if point else {}
        result = convert(directory, env=env, timeout=300)
        if result.returncode == 0:
            break
        assert result.returncode == -signal.SIGKILL, result.stderr
        kills += 1
        assert_each_entry_plaintext_or_converted(directory, original)
        # nothing else opens a half-converted directory
        refused = run_cli("fsck", directory)
        assert refused.returncode == VolumeBusy.exit_code, refused.stderr
        assert "being converted" in refused.stderr
    assert result.returncode == 0, result.stderr
    assert kills >= 3
    with mounted(CliVolume(directory, None), tmp_path / "mnt") as mnt:
        assert_same_tree((original, groups), manifest(mnt, plaintext=False))
        assert_sparse_kept(mnt)
    assert_no_plaintext(directory)


def test_a_hard_link_outside_keeps_its_plaintext_and_is_said(tmp_path):
    directory = tmp_path / "dir"
    directory.mkdir()
    (directory / "inside").write_bytes(CANARY)
    os.link(directory / "inside", tmp_path / "outside")
    keyfile = tmp_path / "key"
    result = convert(directory, "--keyfile", keyfile)
    assert result.returncode == 0, result.stderr
    assert "1 file(s) have hard links outside" in result.stdout
    assert (tmp_path / "outside").read_bytes() == CANARY
    with mounted(CliVolume(directory, keyfile), tmp_path / "mnt") as mnt:
        assert (mnt / "inside").read_bytes() == CANARY
    assert_no_plaintext(directory)


def _tiny_tree(root: Path) -> None:
    """Every kind of step convert takes, in a few entries: files in two directories, a
    hard link across them, a symlink, a FIFO, an empty directory, xattrs (on a file and
    on the top), odd modes and owners."""
    (root / "sub" / "empty").mkdir(parents=True)
    (root / "a").write_bytes(CANARY + b" a\n")
    (root / "sub" / "b").write_bytes(CANARY + b" b\n" * 5000)
    os.link(root / "a", root / "sub" / "a-again")
    os.symlink("../a", root / "sub" / "link")
    os.mkfifo(root / "sub" / "fifo", 0o600)
    os.setxattr(root / "a", "user.note", CANARY)
    os.setxattr(root, "user.top", CANARY)
    os.chown(root / "sub" / "b", 1234, 5678)
    os.chmod(root / "sub", 0o750)
    set_times(root)


def test_kill9_at_the_start_and_the_end_of_a_conversion_then_resume(tmp_path, key_home):
    """Kill points the seeded test rarely reaches: each of the first 12 changes (marker,
    staging, making the volume) and of the last 16 (the last batch, removing the staging
    directory, moving the top's xattrs, the config's record, the marker) of a small
    tree; ENCFS_CONVERT_EVERY_POINT=1 kills at every change instead. After each kill:
    every entry plaintext or converted; then resume, and the volume holds the tree with
    its hard link."""
    measured = tmp_path / "measured"
    measured.mkdir()
    _tiny_tree(measured)
    result = convert(measured, "--json")
    assert result.returncode == 0, result.stderr
    changes = json.loads(result.stdout.splitlines()[-1])["this_run"]["changes"]
    points = list(range(1, changes + 1))
    if not os.environ.get("ENCFS_CONVERT_EVERY_POINT"):
        points = points[:12] + points[-16:]
    for point in points:
        directory = tmp_path / f"dir-{point}"
        directory.mkdir()
        _tiny_tree(directory)
        original, _ = manifest(directory)
        killed = convert(directory, env={convert_mod.CRASH_AFTER_ENV: str(point)})
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr)
        assert_each_entry_plaintext_or_converted(directory, original)
        resumed = convert(directory)
        assert resumed.returncode == 0, (point, resumed.stderr)
        assert not (directory / MARKER).exists() and not (directory / STAGING).exists()
        entries = _volume_entries(directory)
        for rel, entry in original.items():
            if rel != b".":
                assert _picked(entries[rel]) == _picked(entry), (point, rel)
        assert entries[b"a"]["ino"] == entries[b"sub/a-again"]["ino"]
        with contextlib.suppress(OSError):
            subprocess.run(["rm", "-rf", str(directory)], check=False)


def _deep_tree(root: Path, depth: int) -> Path:
    path = root
    for _ in range(depth):
        path = path / "d"
    path.mkdir(parents=True)
    (path / "leaf").write_bytes(CANARY)
    return path


def test_depth_is_bounded_by_the_open_file_limit(tmp_path):
    """Under a limit of 256 open files (the hard limit too), the walk can hold 64 levels
    ((256 - 128) / 2): a tree 70 deep is refused before anything changes (exit 33), one
    60 deep converts."""
    def limited() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    def run(directory: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*ENCFS_GW, "convert", str(directory), "--keyfile", str(directory) + ".key"],
            capture_output=True, text=True, timeout=TIMEOUT, check=False,
            preexec_fn=limited,
        )

    deep = tmp_path / "deep"
    _deep_tree(deep, 70)
    line = assert_refused(run(deep), CannotConvert)
    assert "nested deeper than 64 levels" in line
    assert sorted(os.listdir(deep)) == ["d"]
    fits = tmp_path / "fits"
    leaf = _deep_tree(fits, 60).relative_to(fits)
    result = run(fits)
    assert result.returncode == 0, result.stderr
    with mounted(CliVolume(fits, Path(str(fits) + ".key")), tmp_path / "mnt") as mnt:
        assert (mnt / leaf / "leaf").read_bytes() == CANARY


# --- in use, locked, stopped -----------------------------------------------------------------


def _holder(code: str, cwd: Path | None = None) -> subprocess.Popen:
    """A process that does `code` (opens, maps, sits in a directory) and waits."""
    process = subprocess.Popen(
        [sys.executable, "-c", code + "\nprint('ready', flush=True)\nimport sys; sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=cwd,
    )
    assert process.stdout.readline() == "ready\n"
    return process


def _release(process: subprocess.Popen) -> None:
    process.stdin.close()
    process.wait(timeout=TIMEOUT)


@pytest.mark.parametrize("how", ["open file", "cwd", "root", "mapped file"])
def test_refused_while_a_process_uses_it(tmp_path, how):
    directory = tmp_path / "dir"
    (directory / "sub").mkdir(parents=True)
    target = directory / "sub" / "data.bin"
    target.write_bytes(b"x" * 8192)
    set_times(directory)
    before = manifest(directory)
    if how == "open file":
        holder = _holder(f"f = open({str(target)!r}, 'rb')")
    elif how == "cwd":
        holder = _holder("pass", cwd=directory / "sub")
    elif how == "root":
        holder = _holder(f"import os; os.chroot({str(directory / 'sub')!r})")
    else:
        # libc's mmap, then close: Python's mmap keeps a descriptor of its own
        holder = _holder(
            "import ctypes, os; libc = ctypes.CDLL(None); "
            "libc.mmap.restype = ctypes.c_void_p; "
            f"fd = os.open({str(target)!r}, os.O_RDONLY | os.O_NOATIME); "
            "assert libc.mmap(None, 8192, 1, 1, fd, 0) not in (None, 2**64 - 1); os.close(fd)"
        )
    try:
        line = assert_refused(convert(directory, "--keyfile", tmp_path / "key"), VolumeBusy)
        assert f"process {holder.pid}" in line and how in line
    finally:
        _release(holder)
    assert manifest(directory) == before
    assert not (tmp_path / "key").exists()


def test_refused_with_a_mount_below(tmp_path):
    directory = tmp_path / "dir"
    (directory / "sub").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", directory / "sub"],
                   check=True)
    try:
        line = assert_refused(convert(directory, "--keyfile", tmp_path / "key"), VolumeBusy)
        assert "mounted at" in line
    finally:
        subprocess.run(["umount", directory / "sub"], check=True)
    assert not (directory / MARKER).exists()


def _wait_stopped(pid: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.01)
    raise AssertionError("convert did not stop")


def test_locked_while_it_runs_and_refused_by_other_commands(tmp_path):
    """A convert stopped mid-way (test hook: SIGSTOP before its 60th change): a second
    convert and every volume command are refused; continued, it finishes."""
    directory = tmp_path / "dir"
    build_tree(directory, ["json"], big=False)
    before = manifest(directory)
    keyfile = tmp_path / "key"
    process = subprocess.Popen(
        [*ENCFS_GW, "convert", str(directory), "--keyfile", str(keyfile)],
        env={**os.environ, convert_mod.STOP_AFTER_ENV: "60"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_stopped(process.pid)
        (tmp_path / "mnt").mkdir()
        assert "another" in assert_refused(convert(directory), VolumeBusy)
        assert "being converted" in assert_refused(
            run_cli("mount", directory, tmp_path / "mnt", "--keyfile", keyfile), VolumeBusy
        )
        for args in (["fsck", directory], ["status", directory], ["rotate", directory]):
            assert_refused(run_cli(*args), VolumeBusy)
    finally:
        os.kill(process.pid, signal.SIGCONT)
        _out, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, err
    with mounted(CliVolume(directory, keyfile), tmp_path / "mnt") as mnt:
        assert_same_tree(before, manifest(mnt, plaintext=False))


def test_a_file_written_while_it_is_converted_stops_it_and_stays_plaintext(tmp_path):
    """A writer that ignores the refusal: convert stopped (test hook: SIGSTOP) while it
    copies a 3 MiB file (14 changes before the end of a run of this tree: between the
    file's creation in the volume and its final check), the file grows meanwhile; the
    file stays plaintext, convert exits 14, and the next run converts what it holds now."""
    measured = tmp_path / "measured"
    measured.mkdir()
    (measured / "big").write_bytes(os.urandom(3 * MIB))
    result = convert(measured, "--keyfile", tmp_path / "measured.key", "--json")
    assert result.returncode == 0, result.stderr
    changes = json.loads(result.stdout.splitlines()[-1])["this_run"]["changes"]
    directory = tmp_path / "dir"
    directory.mkdir()
    (directory / "big").write_bytes(os.urandom(3 * MIB))
    keyfile = tmp_path / "key"
    process = subprocess.Popen(
        [*ENCFS_GW, "convert", str(directory), "--keyfile", str(keyfile)],
        env={**os.environ, convert_mod.STOP_AFTER_ENV: str(changes - 14)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    staged = directory / STAGING / "tree" / "big"
    try:
        _wait_stopped(process.pid)
        with open(staged, "ab") as f:
            f.write(CANARY)
    finally:
        os.kill(process.pid, signal.SIGCONT)
        _out, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == VolumeBusy.exit_code, err
    assert "changed while convert ran" in err and len(err.splitlines()) == 1
    grown = staged.read_bytes()
    assert len(grown) == 3 * MIB + len(CANARY)
    result = convert(directory)
    assert result.returncode == 0, result.stderr
    with mounted(CliVolume(directory, keyfile), tmp_path / "mnt") as mnt:
        assert (mnt / "big").read_bytes() == grown


# --- space --------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True)


def _big_files(directory: Path, count: int, size: int) -> None:
    directory.mkdir()
    for index in range(count):
        (directory / f"part-{index}.bin").write_bytes(os.urandom(size))
    (directory / "small").mkdir()
    for index in range(50):
        (directory / "small" / f"{index}.txt").write_bytes(b"small %d\n" % index)
    set_times(directory)


def test_needs_the_overhead_and_the_largest_file_not_a_copy(tmp_path):
    """90 MiB on a 150 MiB tmpfs: a copy would not fit (60 MiB free); convert needs the
    format's overhead plus the largest file plus the margin, and the space it used at
    its peak (sampled after every batch) stays under what it said it needs."""
    with tmpfs(tmp_path / "fs", "150m") as fs:
        directory = fs / "dir"
        _big_files(directory, 3, 30 * MIB)
        before = manifest(directory)
        free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
        assert free < 90 * MIB
        keyfile = tmp_path / "key"
        result = convert(directory, "--keyfile", keyfile, "--json", timeout=300)
        assert result.returncode == 0, result.stderr
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        needed, peak = lines[0]["plan"]["space_needed"], lines[-1]["this_run"]["peak_extra_bytes"]
        assert 30 * MIB < needed < free
        assert 30 * MIB <= peak <= needed
        with mounted(CliVolume(directory, keyfile), tmp_path / "mnt") as mnt:
            assert_same_tree(before, manifest(mnt, plaintext=False))


def test_refused_when_space_is_short(tmp_path):
    with tmpfs(tmp_path / "fs", "56m") as fs:
        directory = fs / "dir"
        _big_files(directory, 1, 40 * MIB)
        before = manifest(directory)
        line = assert_refused(convert(directory, "--keyfile", tmp_path / "key"), NotEnoughSpace)
        assert "MiB free, convert needs" in line and "largest file" in line
        assert manifest(directory) == before
        assert not (tmp_path / "key").exists()


def test_filling_up_midway_leaves_plaintext_and_resumes(tmp_path):
    """Space taken by someone else after the check: the batch in flight is undone
    (plaintext again), exit 32; with room made, convert resumes and finishes."""
    with tmpfs(tmp_path / "fs", "80m") as fs:
        directory = fs / "dir"
        _big_files(directory, 2, 12 * MIB)
        before = manifest(directory)
        keyfile = tmp_path / "key"
        # a stop after the volume is made, then fill the filesystem while it is stopped
        process = subprocess.Popen(
            [*ENCFS_GW, "convert", str(directory), "--keyfile", str(keyfile)],
            env={**os.environ, convert_mod.STOP_AFTER_ENV: "12"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        filler = fs / "filler"
        try:
            _wait_stopped(process.pid)
            with open(filler, "wb") as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * MIB)
                    f.flush()
        finally:
            os.kill(process.pid, signal.SIGCONT)
            _out, err = process.communicate(timeout=TIMEOUT)
        assert process.returncode == NotEnoughSpace.exit_code, err
        filler.unlink()
        result = convert(directory, timeout=300)
        assert result.returncode == 0, result.stderr
        with mounted(CliVolume(directory, keyfile), tmp_path / "mnt") as mnt:
            assert_same_tree(before, manifest(mnt, plaintext=False))


# --- bad input: one line, a documented code ---------------------------------------------------


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_bad_input_gets_one_line_and_its_code(tmp_path, key_home):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "f").write_text("data")
    cases: list[tuple[list, type[EncfsError], str]] = [
        ([tmp_path / "missing"], UsageError, "does not exist"),
        ([plain / "f"], UsageError, "not a directory"),
        ([plain, "--block-size", "1000"], UsageError, "block size"),
        ([plain, "--keyfile", tmp_path / "k", "--provider", "keyfile:/x"], UsageError,
         "exclude each other"),
        ([plain, "--keyfile", plain / "inside.key"], UsageError, "inside"),
        (["/"], UsageError, "root directory"),
    ]
    link = tmp_path / "link"
    link.symlink_to(plain)
    cases.append(([link], UsageError, "symlink"))
    for args, exc, words in cases:
        result = convert(*args)
        assert words in assert_refused(result, exc), args
    assert sorted(os.listdir(plain)) == ["f"]

    # a volume already, and a conversion marker or staging directory that is not ours
    volume = tmp_path / "vol"
    run_cli("init", volume, "--keyfile", tmp_path / "vol.key", check=True)
    assert "already" in assert_refused(convert(volume), VolumeExists)
    (plain / MARKER).write_text("mine")
    assert "not the marker" in assert_refused(convert(plain), UsageError)
    (plain / MARKER).unlink()
    (plain / STAGING).mkdir()
    assert "no conversion was started" in assert_refused(convert(plain), UsageError)
    (plain / STAGING).rmdir()

    # what a volume cannot keep: a special file's set lives in its own backing xattr only
    # (no id to name a store file), up to 3,584 bytes sealed (xattrs on symlinks and
    # special files, and names over 160 bytes, are kept: the stdlib tree shows it)
    (plain / "f").unlink()
    target = plain / "x"
    target.write_text("data")
    os.mkfifo(plain / "fifo")
    os.setxattr(plain / "fifo", "trusted.big", b"v" * 3600, follow_symlinks=False)
    line = assert_refused(convert(plain), CannotConvert)
    assert "fifo: its xattrs take 3645 bytes as a sealed set; a FIFO keeps" in line, line
    assert "up to 3584 bytes" in line
    (plain / "fifo").unlink()
    # an ACL with a named user: the mode bits alone would widen the group's access
    os.setxattr(target, "system.posix_acl_access",
                _acl((1, 6, 0xFFFFFFFF), (2, 6, 1234), (4, 4, 0xFFFFFFFF),
                     (0x10, 6, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)))
    assert "--drop-acls" in assert_refused(convert(plain), CannotConvert)
    assert sorted(os.listdir(plain)) == ["x"]
    assert not (plain / MARKER).exists()
    # with --drop-acls it goes on, and says what it did not keep
    result = convert(plain, "--drop-acls")
    assert result.returncode == 0, result.stderr
    assert "system.posix_acl_access (1)" in result.stdout


def test_resume_needs_no_key_option_and_keeps_the_block_size(tmp_path):
    directory = tmp_path / "dir"
    build_tree(directory, ["json"], big=False)
    keyfile = tmp_path / "key"
    env = {convert_mod.CRASH_AFTER_ENV: "80"}
    result = convert(directory, "--keyfile", keyfile, "--block-size", "4096", env=env)
    assert result.returncode == -signal.SIGKILL
    # the authenticated config records the unfinished conversion: without the marker too,
    # a mount is refused (and a reader older than the record refuses its unknown field)
    config = directory / "encfs-gw.conf"
    assert "started" in json.loads(config.read_text())["conversion"]
    (directory / MARKER).rename(tmp_path / "marker")
    (tmp_path / "mnt").mkdir()
    assert "being converted" in assert_refused(
        run_cli("mount", directory, tmp_path / "mnt"), VolumeBusy
    )
    # the record is under the config's MAC: dropping it is refused as an altered config
    saved = config.read_bytes()
    doc = json.loads(saved)
    doc.pop("conversion")
    config.write_text(json.dumps(doc))
    assert_refused(run_cli("fsck", directory), ConfigAuthError)
    config.write_bytes(saved)
    for bad in ({"started": "soon"}, {"started": "2026-01-01T00:00:00Z", "by": 1}, True):
        doc["conversion"] = bad
        with pytest.raises(ConfigError):
            VolumeConfig.from_json(json.dumps(doc).encode())
    (tmp_path / "marker").rename(directory / MARKER)
    assert "block size" in assert_refused(convert(directory, "--block-size", "8192"), UsageError)
    result = convert(directory)  # the trust store knows the volume made by the first run
    assert result.returncode == 0, result.stderr
    assert "(block size 4096)" in result.stdout
    assert "conversion" not in json.loads(config.read_text())
