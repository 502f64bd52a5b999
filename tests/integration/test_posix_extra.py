"""Symlink targets up to PATH_MAX, a sparse 16 GiB file, and mmap, through a real mount.

* Symlinks: relative, absolute, dangling and long targets (3,056 bytes, the first kept in
  the volume's symlink store, up to 4,095 = PATH_MAX - 1), followed by the kernel, hard
  linked, renamed, unlinked (the store is emptied with the last link) and read again
  after a remount; a volume made before the long-target feature keeps its 3,055 limit.
* Large files: a 16 GiB file with a few written blocks (offsets past 4 GiB and 8 GiB)
  reads back exactly, holes read as zeros, and the backing file allocates only the
  written blocks (st_blocks of the backing file, checked against the format's layout).
* mmap (never direct_io): MAP_SHARED reads and writes reach the file (also across a
  remount), MAP_PRIVATE writes never do, a mapping sees write(2)s made through another
  descriptor, and a file grown by ftruncate is written through its mapping; with and
  without the writeback cache.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import select
import stat
import time
from pathlib import Path

import pytest

from encfs.format import names as fnames
from encfs.format import places
from encfs.format.blocks import BLOCKS_PER_GROUP, KEY_RECORD_SIZE, Layout
from tests.golden.test_golden_volumes import extract_upgraded
from tests.helpers.mount import Volume, init_volume, mounted

pytestmark = pytest.mark.fuse

GiB = 1 << 30
PAGE = 4096


def backing_file(backing: Path, mounted_path: Path) -> Path:
    """The backing object of a mounted path (the mount reports backing inode numbers)."""
    ino = os.lstat(mounted_path).st_ino
    for root, _dirs, files in os.walk(backing):
        for name in files:
            if os.lstat(Path(root, name)).st_ino == ino:
                return Path(root, name)
    raise AssertionError(f"no backing file for {mounted_path}")


def store_settles(volume: Volume, count: int) -> None:
    """Wait (bounded) until the symlink store holds `count` targets: a removed symlink
    keeps its stored target until the kernel forgets it, which it tells the daemon
    after the unlink returned (engine/orphans.py)."""
    deadline = time.monotonic() + 60
    while len(store_files(volume)) != count:
        assert time.monotonic() < deadline, (store_files(volume), count)
        select.select([], [], [], 0.05)  # (a bounded poll of a condition)


def store_files(volume: Volume) -> list[str]:
    store = volume.backing / fnames.SYMLINK_STORE_DIR
    return sorted(os.listdir(store)) if store.exists() else []


# --- symlinks -----------------------------------------------------------------------------


def test_symlink_targets_relative_absolute_dangling_and_long(tmp_path):
    volume = init_volume(tmp_path)
    mnt = tmp_path / "mnt"
    with mounted(volume, mnt):
        (mnt / "dir").mkdir()
        (mnt / "dir" / "target").write_bytes(b"reached")
        absolute = f"{mnt}/dir/target"
        targets = {
            "relative": "dir/target",
            "absolute": absolute,
            "dangling": "no/such/file",
            "dangling-abs": "/nonexistent-egw/" + "n" * 200,
            "inline-long": "./" * 1497 + "dir/target",  # 3,004 bytes: still inline
            "long-relative": "./" * 1523 + "dir/./target",  # 3,058: in the symlink store
            "long-absolute": absolute.replace("/dir/", "/" + "./" * 1900 + "dir/"),
            "path-max": "./" * 2042 + "dir//target",  # 4,095 = PATH_MAX - 1
            "long-dangling": "missing/" * 500 + "x" * 95,  # 4,095, nothing there
        }
        for name, target in targets.items():
            os.symlink(target, mnt / name)
        lengths = {name: len(os.fsencode(t)) for name, t in targets.items()}
        inline_max = places.BOUND_INLINE_TARGET_MAX  # a new volume binds its symlinks
        assert lengths["inline-long"] == inline_max < lengths["long-relative"]
        assert lengths["path-max"] == lengths["long-dangling"] == 4095
        for name, target in targets.items():
            st = os.lstat(mnt / name)
            assert stat.S_ISLNK(st.st_mode), name
            assert st.st_size == lengths[name], name
            assert os.readlink(mnt / name) == target, name
        for name in ("relative", "absolute", "inline-long", "long-relative", "long-absolute",
                     "path-max"):
            assert (mnt / name).read_bytes() == b"reached", name
        for name in ("dangling", "dangling-abs", "long-dangling"):
            with pytest.raises(FileNotFoundError):
                (mnt / name).read_bytes()
        # PATH_MAX itself is refused by the kernel before the daemon is asked.
        with pytest.raises(OSError) as info:
            os.symlink("p" * 4096, mnt / "too-long")
        assert info.value.errno == errno.ENAMETOOLONG
        long_names = {n for n, length in lengths.items() if length > inline_max}
        assert len(store_files(volume)) == len(long_names)
        # A hard link of a symlink is a copy bound to its own name, with its own stored
        # target (docs/LIMITS.md); rename keeps the stored target.
        os.link(mnt / "long-relative", mnt / "dir" / "hard", follow_symlinks=False)
        os.rename(mnt / "long-relative", mnt / "dir" / "renamed")
        assert os.lstat(mnt / "dir" / "hard").st_nlink == 1
        assert len(store_files(volume)) == len(long_names) + 1
        os.unlink(mnt / "dir" / "renamed")
        assert os.readlink(mnt / "dir" / "hard") == targets["long-relative"]
        # (a removed symlink keeps its stored target until the kernel forgets it)
        store_settles(volume, len(long_names))
    with mounted(volume, mnt):
        assert os.readlink(mnt / "dir" / "hard") == targets["long-relative"]
        assert os.lstat(mnt / "long-absolute").st_size == lengths["long-absolute"]
        assert (mnt / "long-absolute").read_bytes() == b"reached"
        # The store empties with each long target's last link (unlink or rename over it).
        os.unlink(mnt / "dir" / "hard")
        os.symlink("short", mnt / "replacement")
        os.rename(mnt / "replacement", mnt / "long-absolute")
        for name in long_names - {"long-relative", "long-absolute"}:
            os.unlink(mnt / name)
        store_settles(volume, 0)
        assert os.readlink(mnt / "long-absolute") == "short"


@pytest.mark.usefixtures("own_trust_store")
def test_volume_from_before_long_targets_keeps_its_limit(tmp_path):
    volume = extract_upgraded("v1-keyfile", tmp_path)
    with mounted(volume, tmp_path / "mnt") as mnt:
        os.symlink("f" * 3055, mnt / "fits")
        assert os.readlink(mnt / "fits") == "f" * 3055
        with pytest.raises(OSError) as info:
            os.symlink("f" * 3056, mnt / "too-long")
        assert info.value.errno == errno.ENAMETOOLONG
        assert not os.path.lexists(mnt / "too-long")


# --- a sparse 16 GiB file -----------------------------------------------------------------


def test_sparse_16_gib_file(tmp_path):
    volume = init_volume(tmp_path)  # default 16 KiB blocks
    mnt = tmp_path / "mnt"
    rng = random.Random(16)
    writes = {  # offset -> data: both sides of 4 GiB, across a block and a group boundary
        0: rng.randbytes(100),
        4 * GiB - 7: rng.randbytes(20),
        4 * GiB + 12345: rng.randbytes(30_000),
        8 * GiB + 3 * 16384 - 5: rng.randbytes(10),
        12 * GiB - 20: rng.randbytes(40),  # a group boundary (12 GiB = 24576 groups)
        16 * GiB - 1000: rng.randbytes(1000),  # the last bytes of the file
    }
    size = 16 * GiB
    with mounted(volume, mnt):
        path = mnt / "sparse"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, size)
            for offset, data in writes.items():
                assert os.pwrite(fd, data, offset) == len(data)
            os.fsync(fd)
            assert os.fstat(fd).st_size == size
        finally:
            os.close(fd)
    with mounted(volume, mnt):  # nothing cached: every byte comes from the backing file
        fd = os.open(mnt / "sparse", os.O_RDONLY)
        try:
            assert os.fstat(fd).st_size == size
            for offset, data in writes.items():
                start = max(0, offset - 100)  # with some bytes of the holes around it
                around = os.pread(fd, len(data) + 200, start)
                before, after = offset - start, offset - start + len(data)
                assert around[before:after] == data, offset
                assert not any(around[:before]) and not any(around[after:]), offset
            for hole in (2 * GiB, 4 * GiB + 1_000_000, 10 * GiB, 15 * GiB + 7):
                assert os.pread(fd, 70_000, hole) == bytes(70_000), hole
            assert os.pread(fd, 100, size - 10) == writes[16 * GiB - 1000][-10:]
            assert os.pread(fd, 100, size) == b""
        finally:
            os.close(fd)
        cipher = backing_file(volume.backing, mnt / "sparse")
        layout = Layout(16384)
        st = os.stat(cipher)
        assert st.st_size == layout.cipher_size(size)
        # Allocated: the header, each written block's record (page-rounded, one more page
        # for a record straddling pages) and its group's key page, plus slack for the
        # filesystem's extent tree. Everything else is holes.
        blocks = {
            index
            for offset, data in writes.items()
            for index in range(offset // 16384, (offset + len(data) - 1) // 16384 + 1)
        }
        groups = {index // BLOCKS_PER_GROUP for index in blocks}
        record_pages = -(-layout.record_size // PAGE) + 1
        key_pages = -(-(BLOCKS_PER_GROUP * KEY_RECORD_SIZE) // PAGE)
        budget = PAGE + len(blocks) * record_pages * PAGE + len(groups) * key_pages * PAGE
        assert st.st_blocks * 512 <= budget + 64 * 1024, (st.st_blocks * 512, budget)
        # The mount reports the backing allocation, so du is honest too.
        assert os.stat(mnt / "sparse").st_blocks == st.st_blocks


# --- mmap ---------------------------------------------------------------------------------

OPTIONS = [(), ("writeback_cache",)]
OPTION_IDS = ["default", "writeback_cache"]


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_mmap_shared_and_private(tmp_path, options):
    volume = init_volume(tmp_path, block_size=4096)
    mnt = tmp_path / "mnt"
    rng = random.Random(7)
    original = rng.randbytes(5 * 4096 + 123)
    expected = bytearray(original)
    patches = [(0, b"start"), (4090, b"across-a-block"), (3 * 4096, rng.randbytes(4096)),
               (len(original) - 3, b"end")]
    with mounted(volume, mnt, *options):
        shared, private = mnt / "shared", mnt / "private"
        shared.write_bytes(original)
        private.write_bytes(original)
        # MAP_SHARED: reads see the file, writes reach it (read(2) sees them at once).
        with open(shared, "r+b") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED) as m:
            assert m[:] == original
            for offset, data in patches:
                m[offset : offset + len(data)] = data
                expected[offset : offset + len(data)] = data
            m.flush()  # msync
            assert shared.read_bytes() == expected
        # MAP_PRIVATE: copy-on-write, the file never changes.
        with open(private, "r+b") as f:
            with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE) as m:
                m[0:7] = b"private"
                assert m[0:7] == b"private"
                m.flush()
            assert private.read_bytes() == original
        # A shared read-only mapping follows write(2)s made through another descriptor.
        with open(shared, "rb") as reader, mmap.mmap(
            reader.fileno(), 0, prot=mmap.PROT_READ
        ) as m:
            with open(shared, "r+b") as writer:
                writer.seek(100)
                writer.write(b"written through another fd")
            expected[100:126] = b"written through another fd"
            assert m[:] == expected
        # Grow with ftruncate, then fill the new pages through a mapping only.
        grown = mnt / "grown"
        with open(grown, "w+b") as f:
            f.write(b"head")
            f.truncate(3 * 4096 + 10)
            with mmap.mmap(f.fileno(), 0) as m:
                m[4096 : 4096 + 9] = b"page two!"
                m[-4:] = b"tail"
        want_grown = bytearray(3 * 4096 + 10)
        want_grown[0:4] = b"head"
        want_grown[4096 : 4096 + 9] = b"page two!"
        want_grown[-4:] = b"tail"
    with mounted(volume, mnt, *options):  # the daemon stored what the mappings wrote
        assert (mnt / "shared").read_bytes() == expected
        assert (mnt / "private").read_bytes() == original
        assert (mnt / "grown").read_bytes() == want_grown
        # And a shared mapping of a freshly mounted (uncached) file reads what is stored.
        with open(mnt / "shared", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            assert m[:] == expected
