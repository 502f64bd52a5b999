"""Through the real mount, tampered ciphertext reads fail with EIO (never other data),
other files stay readable, and the daemon logs which inode and block failed."""

from __future__ import annotations

import errno
import os

import pytest

from encfs.format.blocks import Layout
from tests.helpers.mount import mounted, run_cli

pytestmark = pytest.mark.fuse

LAYOUT = Layout(16384)


def backing_files(backing):
    return {
        entry.path: entry.stat().st_size
        for entry in os.scandir(backing)
        if entry.is_file() and "." not in entry.name
    }


@pytest.mark.expected_log(r"integrity failure in inode \d+: block 1", required=True)
def test_flipped_block_gives_eio_and_a_log_line(volume, tmp_path):
    mnt = tmp_path / "mnt"
    with mounted(volume, mnt):
        (mnt / "victim").write_bytes(os.urandom(3 * 16384))
        (mnt / "bystander").write_bytes(b"still fine")
    victim = max(backing_files(volume.backing).items(), key=lambda item: item[1])[0]
    with open(victim, "r+b") as f:
        f.seek(LAYOUT.record_offset(1) + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x80]))
    log_file = tmp_path / "daemon.log"
    mnt.mkdir(exist_ok=True)
    run_cli(
        "mount", volume.backing, mnt, "--keyfile", volume.keyfile, "--log-file", log_file,
        check=True,
    )
    try:
        fd = os.open(mnt / "victim", os.O_RDONLY)
        try:
            assert len(os.pread(fd, 16384, 0)) == 16384  # block 0 is intact
            with pytest.raises(OSError) as info:
                os.pread(fd, 16384, 16384)
            assert info.value.errno == errno.EIO
        finally:
            os.close(fd)
        assert (mnt / "bystander").read_bytes() == b"still fine"
    finally:
        run_cli("unmount", mnt, check=True)
    log = log_file.read_text()
    assert "integrity failure in inode" in log and "block 1" in log


def test_swapped_files_give_eio(volume, tmp_path):
    mnt = tmp_path / "mnt"
    with mounted(volume, mnt):
        (mnt / "one").write_bytes(b"1" * 5000)
        (mnt / "two").write_bytes(b"2" * 5000)
    first, second = sorted(backing_files(volume.backing))
    with open(first, "rb") as f:
        data_first = f.read()
    with open(second, "rb") as f:
        data_second = f.read()
    with open(first, "wb") as f:
        f.write(data_second)
    with open(second, "wb") as f:
        f.write(data_first)
    with mounted(volume, mnt):
        for name in ("one", "two"):
            with pytest.raises(OSError) as info:
                (mnt / name).read_bytes()
            assert info.value.errno == errno.EIO
