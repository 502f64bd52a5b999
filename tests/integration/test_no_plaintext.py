"""No plaintext reaches the backing store or the daemon log.

Every name, directory name, symlink target and content written through the mount
carries a per-test marker string. Afterwards every byte of every backing file, every
backing entry name and every backing symlink target (os.readlink) is scanned for the
marker in many encodings: as-is, upper/lower case, UTF-16-LE/BE, UTF-32-LE, base64
and base64url at all three alignments, and hex (both cases). The daemon log written
with --log-file (verbose, so debug messages count too) is scanned the same way.

The markers are derived from a seeded RNG (deterministic), long enough (24 random
alphanumerics) never to occur by chance in a few megabytes of ciphertext.
"""

from __future__ import annotations

import base64
import os
import random
import sqlite3
import stat
import string
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs.format.blocks import BLOCKS_PER_GROUP, DEFAULT_BLOCK_SIZE
from tests.helpers.mount import Volume, init_volume, is_mounted, mounted, run_cli, unmount

pytestmark = pytest.mark.fuse

BS = DEFAULT_BLOCK_SIZE
GROUP = BLOCKS_PER_GROUP * BS


# --- markers and their encodings ----------------------------------------------------------


def make_marker(rng: random.Random) -> str:
    return "Mk" + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(24))


def _b64_aligned(data: bytes, encoder) -> list[bytes]:
    """The base64 characters that depend only on `data`, at each of the 3 alignments."""
    out = []
    for k in range(3):
        encoded = encoder(bytes(k) + data)
        start = -(-k * 8 // 6)  # first character fully inside `data`
        end = (k + len(data)) * 8 // 6  # last character fully inside `data`
        out.append(encoded[start:end])
    return out


def encodings(marker: str) -> dict[str, bytes]:
    raw = marker.encode()
    found = {
        "plain": raw,
        "upper": marker.upper().encode(),
        "lower": marker.lower().encode(),
        "utf-16-le": marker.encode("utf-16-le"),
        "utf-16-be": marker.encode("utf-16-be"),
        "utf-32-le": marker.encode("utf-32-le"),
        "hex": raw.hex().encode(),
        "HEX": raw.hex().upper().encode(),
    }
    for i, chunk in enumerate(_b64_aligned(raw, base64.b64encode)):
        found[f"base64-{i}"] = chunk
    for i, chunk in enumerate(_b64_aligned(raw, base64.urlsafe_b64encode)):
        found[f"base64url-{i}"] = chunk
    return found


def test_encodings_are_found_when_present():
    """The scanner itself: each encoding is found inside text that embeds it."""
    marker = make_marker(random.Random(0))
    needles = encodings(marker)
    for prefix in (b"", b"a", b"ab"):
        data = prefix + marker.encode() + b"tail"
        assert needles[f"base64-{len(prefix)}"] in base64.b64encode(data)
        assert needles[f"base64url-{len(prefix)}"] in base64.urlsafe_b64encode(data)
    assert all(len(n) >= 20 for n in needles.values())


# --- scanning -----------------------------------------------------------------------------


def backing_blobs(root: Path) -> Iterator[tuple[str, bytes]]:
    """(description, bytes) for every name, symlink target and regular-file content."""
    yield "root path", os.fsencode(root.name)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            yield f"name {path}", os.fsencode(name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                yield f"symlink target of {path}", os.readlink(os.fsencode(path))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    yield f"contents of {path}", f.read()


def leaks(blobs: Iterator[tuple[str, bytes]], markers: list[str]) -> list[str]:
    needles = [(m, kind, n) for m in markers for kind, n in encodings(m).items()]
    found = []
    for what, blob in blobs:
        for marker, kind, needle in needles:
            if needle in blob:
                found.append(f"{marker} ({kind}) in {what}")
    return found


def assert_no_leaks(
    volume: Volume, markers: list[str], log_file: Path | None = None, min_blobs: int = 5
) -> None:
    blobs = list(backing_blobs(volume.backing))
    assert len(blobs) >= min_blobs  # the scan saw the tree
    if log_file is not None:
        blobs.append((f"daemon log {log_file}", log_file.read_bytes()))
    assert leaks(iter(blobs), markers) == []


# --- the workload -------------------------------------------------------------------------


def write_everything(mnt: Path, markers: list[str], rng: random.Random) -> None:
    m, m2, m3 = markers[:3]
    text = "\n".join(
        [m, m.upper(), m.lower(), base64.b64encode(m.encode()).decode(), m.encode().hex()]
    )
    # Names of files, directories, nested directories; long names (> 200 bytes).
    (mnt / f"dir-{m}" / f"{m2}-nested").mkdir(parents=True)
    (mnt / f"{m}.txt").write_text(text)
    (mnt / f"dir-{m}" / f"{m2}-nested" / f"ü-{m3}-ß").write_text(text)
    long_name = (m + "-long-") * 8
    long_name = long_name[:240]
    (mnt / long_name).write_text(text)
    (mnt / f"dir-{m}" / (m2.upper() + "_" * 200)).mkdir()
    # Contents in several encodings, binary with the marker straddling block boundaries.
    (mnt / "encodings.bin").write_bytes(
        m.encode("utf-16-le") + m.encode("utf-16-be") + m.encode("utf-32-le") + text.encode()
    )
    binary = bytearray(rng.randbytes(GROUP + 3 * BS))
    for offset in (0, BS - 7, GROUP - 13, GROUP + BS - 1):
        binary[offset : offset + len(m)] = m.encode()
    (mnt / "binary.bin").write_bytes(bytes(binary))
    # A large, very compressible file: the marker repeated over 8 key groups.
    repeated = (m + "\n").encode() * (8 * GROUP // (len(m) + 1) + 1)
    (mnt / f"repeated-{m3}.txt").write_bytes(repeated[: 8 * GROUP])
    # Symlinks: marker in the name and in relative and absolute targets.
    os.symlink(f"../{m}/target-{m2}", mnt / f"link-{m}")
    os.symlink(f"/abs/{m3}/{m}", mnt / f"dir-{m}" / "abs-link")
    os.symlink((m + "/") * 60, mnt / "long-target-link")
    # Hard link, FIFO, a renamed file, a deleted file and a removed directory.
    os.link(mnt / f"{m}.txt", mnt / f"dir-{m}" / f"hard-{m2}")
    os.mkfifo(mnt / f"fifo-{m}")
    (mnt / f"before-rename-{m2}").write_text(m3)
    os.rename(mnt / f"before-rename-{m2}", mnt / f"dir-{m}" / f"after-rename-{m3}")
    (mnt / f"deleted-{m}").write_text(m)
    os.unlink(mnt / f"deleted-{m}")
    (mnt / f"rmdir-{m2}").mkdir()
    os.rmdir(mnt / f"rmdir-{m2}")
    # Programs that make temp files next to their target: sed -i, sqlite journals.
    sed_target = mnt / f"dir-{m}" / f"sed-{m}.txt"
    sed_target.write_text(f"replace-me {m}\n" * 100)
    subprocess.run(["sed", "-i", f"s/replace-me/{m3}/", str(sed_target)], check=True, timeout=30)
    assert sed_target.read_text() == f"{m3} {m}\n" * 100
    db = mnt / f"db-{m}.sqlite"
    subprocess.run(
        [
            "sqlite3",
            "-batch",
            "-bail",
            str(db),
            f'PRAGMA journal_mode=delete; CREATE TABLE "{m}"(k TEXT, v TEXT);'
            f"BEGIN; INSERT INTO \"{m}\" VALUES ('{m2}', '{m3}'); COMMIT;"
            f'UPDATE "{m}" SET v = upper(v);',
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    # Failing operations on marker names (they may be logged): all must fail cleanly.
    for call in (
        lambda: os.mkdir(mnt / f"dir-{m}"),
        lambda: os.rmdir(mnt / f"dir-{m}"),
        lambda: os.unlink(mnt / f"absent-{m}"),
        lambda: os.readlink(mnt / f"{m}.txt"),
        lambda: os.open(mnt / f"{m}.txt", os.O_CREAT | os.O_EXCL | os.O_WRONLY),
        lambda: (mnt / (m * 12)).write_text("too long"),
    ):
        with pytest.raises(OSError):
            call()


# --- tests --------------------------------------------------------------------------------


@pytest.fixture
def markers(request) -> list[str]:
    rng = random.Random(request.node.nodeid)
    return [make_marker(rng) for _ in range(4)]


@pytest.fixture
def logged_mount(tmp_path) -> Iterator[tuple[Volume, Path, Path]]:
    """A verbose background mount with --log-file, always unmounted afterwards."""
    volume = init_volume(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log_file = tmp_path / "daemon.log"
    result = run_cli(
        "-v", "mount", volume.backing, mnt, "--keyfile", volume.keyfile, "--log-file", log_file
    )
    assert result.returncode == 0, result.stderr
    try:
        yield volume, mnt, log_file
    finally:
        unmount(volume, mnt)


def tamper_and_read(volume: Volume, path: Path) -> None:
    """Flip the last ciphertext byte of `path`: the read fails with EIO and gets logged."""
    ino = os.stat(path).st_ino
    target = next(
        Path(root, name)
        for root, _, names in os.walk(volume.backing)
        for name in names
        if os.lstat(Path(root, name)).st_ino == ino
    )
    with open(target, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(OSError) as info, open(path, "rb") as f:
        # Drop the kernel's cached (clean) pages of this file so the read reaches us.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        f.read()
    assert info.value.errno == 5  # EIO


@pytest.mark.expected_log(r"integrity failure")
def test_backing_and_log_hold_no_plaintext(logged_mount, markers, tmp_path):
    volume, mnt, log_file = logged_mount
    rng = random.Random(markers[0])
    write_everything(mnt, markers, rng)
    tamper_and_read(volume, mnt / f"dir-{markers[0]}" / f"sed-{markers[0]}.txt")
    # While mounted, with a WAL database open (its -wal and -shm files exist) and an
    # unlinked file still open, the backing store already holds no plaintext.
    m4 = markers[3]
    conn = sqlite3.connect(mnt / f"wal-{m4}.db", isolation_level=None)
    open_fd = os.open(mnt / f"open-{m4}", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        assert conn.execute("PRAGMA journal_mode=wal").fetchone()[0] == "wal"
        conn.execute(f'CREATE TABLE "{m4}"(v TEXT)')
        conn.executemany(f'INSERT INTO "{m4}" VALUES (?)', [(m4 * 20,)] * 200)
        assert (mnt / f"wal-{m4}.db-wal").exists()
        os.write(open_fd, m4.encode() * 1000)
        os.unlink(mnt / f"open-{m4}")
        os.fsync(open_fd)
        assert_no_leaks(volume, markers, min_blobs=40)
    finally:
        os.close(open_fd)
        conn.close()
    unmount(volume, mnt)
    assert not is_mounted(mnt)
    assert_no_leaks(volume, markers, log_file, min_blobs=40)
    # The log was really written (so scanning it meant something).
    log = log_file.read_bytes()
    assert b"mounted on" in log and b"integrity failure" in log


def test_repeated_plaintext_gives_no_repeated_ciphertext(tmp_path, markers):
    """8 key groups of one repeated line: the backing file does not compress at all."""
    volume = init_volume(tmp_path)
    line = (markers[0] + "\n").encode()
    data = (line * (8 * GROUP // len(line) + 1))[: 8 * GROUP]
    with mounted(volume, tmp_path / "mnt") as mnt:
        (mnt / "r").write_bytes(data)
        (mnt / "z").write_bytes(bytes(8 * GROUP))  # all zeros, too
    files = [
        Path(root, f)
        for root, _, names in os.walk(volume.backing)
        for f in names
        if os.path.getsize(Path(root, f)) > 8 * GROUP
    ]
    assert len(files) == 2
    for path in files:
        blob = path.read_bytes()
        assert len(zlib.compress(blob, 6)) > 0.99 * len(blob), f"{path} has structure"
    assert_no_leaks(volume, markers[:1])
