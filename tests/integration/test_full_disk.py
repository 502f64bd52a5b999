"""A full backing store: ENOSPC (and EDQUOT, EIO) through the mount, nothing corrupted.

The backing directory lives on a small filesystem the test makes: a size-limited tmpfs,
and a loop-mounted ext4 image (`mkfs.ext4 -m 0`, so root has no reserved blocks to dig
into). A writer fills it through the mount; then:

* the failing write gets ENOSPC (never EIO), the daemon keeps running and answering;
* every byte acknowledged before the error reads back (the engine reserves a run's space
  with fallocate before writing, so the disk cannot fill in the middle of a record), a
  failed append or a failed write past the end leaves the file exactly as it was, a failed
  create leaves no debris, an overwrite of existing blocks still works on the full disk;
* after a clean unmount `encfs-gw fsck` is clean;
* after freeing space (deleting the filler through the mount) new writes work and
  everything written before reads back; fsck is clean again.

EDQUOT: the same scenario with a user quota on the ext4 image (`mkfs.ext4 -O quota`,
mounted `usrquota`, the limit set with quotactl(2)) and the daemon started without
CAP_SYS_RESOURCE (`setpriv`), which would otherwise let root exceed the quota. It needs a
kernel with CONFIG_QUOTA/CONFIG_QFMT_V2 and skips (saying so) without one.

EIO from the backing store: a device-mapper "error" target needs the dm driver, which
this machine's kernel lacks (`dmsetup` fails: no /dev/mapper/control), so it is not
tested that way. Instead the ext4 image is shut down with FS_IOC_SHUTDOWN (the ioctl
behind `xfs_io -c shutdown`): from then on every backing call fails with EIO, as on a
dying disk. The daemon must answer EIO and keep running; after the image is remounted,
every file fsync'ed before the shutdown reads back and fsck is clean (after repairing
only crash debris, since the shutdown skips the journal flush like a power cut).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import resource
import select
import shutil
from pathlib import Path

import pytest

from encfs.errors import FsckProblems
from tests.helpers.filesystems import run_quietly, small_filesystem
from tests.helpers.mount import (
    ENCFS_GW,
    Volume,
    daemon_pid,
    is_mounted,
    mounted,
    run_cli,
)

pytestmark = pytest.mark.fuse

CHUNK = 65536
FS_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
FSOP_GOING_FLAGS_NOLOGFLUSH = 2
Q_GETQUOTA = 0x800007
Q_SETQUOTA = 0x800008
QIF_BLIMITS = 1
USRQUOTA = 0


def new_volume(tmp_path: Path, fs: Path, block_size: int = 4096) -> Volume:
    volume = Volume(fs / "vol", tmp_path / "vol.key")  # the key stays off the small disk
    run_cli("init", volume.backing, "--keyfile", volume.keyfile,
            "--block-size", str(block_size), check=True)
    return volume


# --- helpers ------------------------------------------------------------------------------


def fill(path: Path, random_data: bool) -> tuple[bytes, int]:
    """Append CHUNK-sized writes until one fails; (bytes acknowledged, the errno)."""
    data = bytearray()
    block = os.urandom(CHUNK) if random_data else bytes(CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        while True:
            piece = block[len(data) % 7 :]  # unaligned pieces: partial blocks get merged
            try:
                written = os.write(fd, piece)
            except OSError as exc:
                return bytes(data), exc.errno
            data += piece[:written]
            assert len(data) < 1 << 30, "the small filesystem never filled up"
    finally:
        os.close(fd)


def expect_errno(code: int, fn, *args) -> None:
    with pytest.raises(OSError) as info:
        fn(*args)
    wanted = errno.errorcode[code]
    assert info.value.errno == code, f"{fn.__name__}: {info.value!r}, wanted {wanted}"


def write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        assert os.write(fd, data) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_until_error(path: Path, data: bytes, offset: int | None) -> tuple[int, int | None]:
    """Write all of `data` as a program does (a short write continues where it stopped);
    (bytes acknowledged, errno of the failure or None). offset None: append."""
    flags = os.O_WRONLY | (os.O_APPEND if offset is None else 0)
    fd = os.open(path, flags)
    done = 0
    try:
        while done < len(data):
            piece = data[done:]
            try:
                if offset is None:
                    done += os.write(fd, piece)
                else:
                    done += os.pwrite(fd, piece, offset + done)
            except OSError as exc:
                return done, exc.errno
        return done, None
    finally:
        os.close(fd)


def pwrite(path: Path, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


def check_files(mnt: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        got = (mnt / name).read_bytes()
        assert got == data, f"{name}: {len(got)} bytes read, {len(data)} written"


def all_readable(mnt: Path) -> None:
    """Every file under the mount reads without an error."""
    for root, _, names in os.walk(mnt):
        for name in names:
            (Path(root) / name).read_bytes()


def fsck(volume: Volume, *extra: str) -> tuple[int, dict]:
    result = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile, "--json", *extra)
    assert result.returncode in (0, FsckProblems.exit_code), result.stderr
    return result.returncode, json.loads(result.stdout)


def assert_fsck_clean(volume: Volume) -> None:
    code, report = fsck(volume)
    assert code == 0 and report["findings"] == [], report["findings"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


BEFORE = {
    "dir/one": os.urandom(300_000),
    "two": os.urandom(1_000_000),
    "three": b"three",
    "dir/" + "long-" + "n" * 200: os.urandom(70_000),
}


def full_disk_scenario(volume: Volume, mnt: Path, code: int, free_space) -> dict[str, bytes]:
    """Fill the backing store through the mount and check every failure mode; return the
    files that must survive. `free_space` is called (mounted) to make room again."""
    files = dict(BEFORE)
    with mounted(volume, mnt):
        (mnt / "dir").mkdir()
        for name, data in files.items():
            write_file(mnt / name, data)
        pid = daemon_pid(volume.backing)
        acknowledged, got = fill(mnt / "filler", random_data=True)
        assert got == code, f"a write on the full disk failed with {errno.errorcode[got]}"
        files["filler"] = acknowledged
        # A second filler of zeros: the same, and it mops up what the first left.
        files["filler2"], got = fill(mnt / "filler2", random_data=False)
        assert got == code

        # Writes that need space fail with the same error; the file holds exactly the
        # bytes acknowledged before it (a short write is allowed, a torn block is not).
        data = os.urandom(300_000)
        done, got = write_until_error(mnt / "two", data, None)
        assert got == code and done < len(data)
        files["two"] += data[:done]
        far = 5_000_000  # a hole, then new blocks
        done, got = write_until_error(mnt / "three", data, far)
        assert got == code and done < len(data)
        if done:
            files["three"] = files["three"].ljust(far, b"\0") + data[:done]
        for name in ("dir/new-file", "dir/new-" + "n" * 220):  # short and long names
            try:
                os.close(os.open(mnt / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except OSError as exc:
                assert exc.errno == code, exc
                continue
            done, got = write_until_error(mnt / name, os.urandom(300_000), None)
            assert got == code
            files[name] = (mnt / name).read_bytes()
        for name in ("newdir", "newdir-" + "n" * 220):
            try:
                (mnt / name).mkdir()
            except OSError as exc:
                assert exc.errno == code, exc
            else:
                (mnt / name).rmdir()
        # Overwriting existing blocks needs no new space: it works on the full disk.
        patch = os.urandom(50_000)
        pwrite(mnt / "two", patch, 123_456)
        files["two"] = files["two"][:123_456] + patch + files["two"][123_456 + len(patch) :]

        assert pid is not None and alive(pid), "the daemon died on a full disk"
        if code == errno.ENOSPC:  # (under a quota the filesystem itself has room)
            st = os.statvfs(mnt)
            assert st.f_bavail * st.f_frsize < 1 << 20
        check_files(mnt, files)
        all_readable(mnt)
    assert_fsck_clean(volume)  # still full: fsck only reads

    with mounted(volume, mnt):  # a full volume mounts (the lock file needs no new block)
        check_files(mnt, files)
        free_space(mnt, files)
        more = {"after/a": os.urandom(2_000_000), "after/b": b"b" * 10_000}
        (mnt / "after").mkdir()
        for name, data in more.items():
            write_file(mnt / name, data)
        files.update(more)
        assert write_until_error(mnt / "two", b"appended after the space was freed", None) == (
            34, None
        )
        files["two"] += b"appended after the space was freed"
        check_files(mnt, files)
    assert_fsck_clean(volume)
    with mounted(volume, mnt):
        check_files(mnt, files)
        all_readable(mnt)
    return files


def delete_fillers(mnt: Path, files: dict[str, bytes]) -> None:
    for name in ("filler", "filler2"):
        os.unlink(mnt / name)
        del files[name]


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
def test_enospc_through_the_mount(tmp_path, kind):
    with small_filesystem(tmp_path, kind, size_mib=16) as fs:
        volume = new_volume(tmp_path, fs)
        full_disk_scenario(volume, tmp_path / "mnt", errno.ENOSPC, delete_fillers)


# --- EDQUOT -------------------------------------------------------------------------------


class _Dqblk(ctypes.Structure):
    _fields_ = [
        ("bhardlimit", ctypes.c_uint64),
        ("bsoftlimit", ctypes.c_uint64),
        ("curspace", ctypes.c_uint64),
        ("ihardlimit", ctypes.c_uint64),
        ("isoftlimit", ctypes.c_uint64),
        ("curinodes", ctypes.c_uint64),
        ("btime", ctypes.c_uint64),
        ("itime", ctypes.c_uint64),
        ("valid", ctypes.c_uint32),
    ]


def set_block_quota(fs: Path, uid: int, extra_kib: int) -> None:
    """Hard block limit for `uid` on the filesystem at `fs`: its usage now + extra_kib."""
    device = run_quietly("findmnt", "-no", "SOURCE", str(fs)).stdout.strip().encode()
    libc = ctypes.CDLL(None, use_errno=True)
    quota = _Dqblk()
    if libc.quotactl((Q_GETQUOTA << 8) | USRQUOTA, device, uid, ctypes.byref(quota)):
        pytest.skip(f"quotactl: {os.strerror(ctypes.get_errno())}")
    quota.bhardlimit = quota.bsoftlimit = (quota.curspace >> 10) + extra_kib
    quota.valid = QIF_BLIMITS
    if libc.quotactl((Q_SETQUOTA << 8) | USRQUOTA, device, uid, ctypes.byref(quota)):
        raise OSError(ctypes.get_errno(), "quotactl(Q_SETQUOTA)")


def test_edquot_through_the_mount(tmp_path, monkeypatch):
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is not installed")
    with small_filesystem(tmp_path, "ext4", size_mib=64, quota=True) as fs:
        volume = new_volume(tmp_path, fs)
        set_block_quota(fs, os.getuid(), extra_kib=12 << 10)
        # The daemon without CAP_SYS_RESOURCE, which lets root exceed quotas.
        monkeypatch.setattr(
            "tests.helpers.mount.ENCFS_GW",
            ["setpriv", "--inh-caps=-sys_resource", "--bounding-set=-sys_resource",
             *ENCFS_GW],
        )

        def raise_quota(mnt: Path, files: dict[str, bytes]) -> None:
            set_block_quota(fs, os.getuid(), extra_kib=40 << 10)

        full_disk_scenario(volume, tmp_path / "mnt", errno.EDQUOT, raise_quota)


# --- EIO from the backing store -----------------------------------------------------------


def shutdown(fs: Path) -> None:
    """Make every later call on this ext4 fail with EIO (no journal flush: a power cut)."""
    fd = os.open(fs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FS_IOC_SHUTDOWN, FSOP_GOING_FLAGS_NOLOGFLUSH.to_bytes(4, "little"))
    finally:
        os.close(fd)


# The daemon's last syncfs at unmount meets the shut-down filesystem, and it says so.
@pytest.mark.expected_log(r"error: syncfs: Input/output error")
def test_backing_eio_is_passed_on_and_synced_data_survives(tmp_path):
    mnt = tmp_path / "mnt"
    image = tmp_path / "ext4.img"
    with small_filesystem(tmp_path, "ext4", size_mib=32) as fs:
        volume = new_volume(tmp_path, fs)
        files = {"dir/synced": os.urandom(200_000), "small": b"x" * 100}
        with mounted(volume, mnt):
            (mnt / "dir").mkdir()
            for name, data in files.items():
                write_file(mnt / name, data)  # fsync'ed
            os.sync()
            pid = daemon_pid(volume.backing)
            assert pid is not None
            fd = os.open(mnt / "dir" / "synced", os.O_RDWR)
            try:
                shutdown(fs)
                expect_errno(errno.EIO, os.pwrite, fd, b"y" * 10_000, 0)
                expect_errno(errno.EIO, os.pread, fd, 4096, 0)
                expect_errno(errno.EIO, os.fsync, fd)
            finally:
                os.close(fd)
            with pytest.raises(OSError) as info:
                (mnt / "new").write_bytes(b"z")
            assert info.value.errno in (errno.EIO, errno.EROFS), info.value
            assert alive(pid), "the daemon died on EIO from the backing store"
            os.listdir(mnt)  # the daemon still answers (from its caches or with EIO)
            pidfd = os.pidfd_open(pid)
        # `mounted` unmounted cleanly (asserts it): EIO did not wedge the daemon. With the
        # lock file unreadable (EIO) `encfs-gw unmount` cannot learn the daemon's pid to
        # wait for it, so wait here before unmounting the image.
        assert not is_mounted(mnt)
        try:
            assert select.select([pidfd], [], [], 60)[0], "the daemon did not exit"
        finally:
            os.close(pidfd)
        # Remount the image: the journal replays what was committed.
        assert run_quietly("umount", str(fs)).returncode == 0
        assert run_quietly("mount", "-o", "loop", str(image), str(fs)).returncode == 0
        code, report = fsck(volume, "--repair")
        debris = {"leftover temporary entry", "orphaned long-name sidecar"}
        assert all(f["kind"] in debris and f["repaired"] for f in report["findings"]), report
        assert code == 0
        assert_fsck_clean(volume)
        with mounted(volume, mnt):
            check_files(mnt, files)
            all_readable(mnt)


def test_setup_leaves_no_mount(tmp_path):
    """The small filesystems are unmounted again (also after a failure inside)."""
    with pytest.raises(RuntimeError), small_filesystem(tmp_path, "tmpfs") as fs:
        (fs / "x").write_bytes(b"x")
        raise RuntimeError
    assert not os.path.ismount(tmp_path / "tmpfs-fs")
    assert not list((tmp_path / "tmpfs-fs").iterdir())


@pytest.mark.expected_log(r"error: syncfs: Input/output error")
def test_fsync_after_the_data_descriptor_was_given_back_reports_backing_eio(tmp_path):
    """A file written without fsync, whose backing data descriptor the daemon gave back
    (more files open than its descriptor limit allows): when the backing store then
    fails, the file's fsync reports EIO, never success (issue 23)."""
    nofile = 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4 * nofile:
        pytest.skip(f"the test process needs {4 * nofile} descriptors (hard {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4 * nofile), hard))
    mnt = tmp_path / "mnt"
    held: list[int] = []
    try:
        with small_filesystem(tmp_path, "ext4", size_mib=32) as fs:
            volume = new_volume(tmp_path, fs)
            with mounted(volume, mnt, nofile=nofile):
                fd = os.open(mnt / "unsynced", os.O_RDWR | os.O_CREAT, 0o644)
                held.append(fd)
                os.write(fd, os.urandom(100_000))
                for index in range(2 * nofile):  # its data descriptor is given back
                    other = os.open(mnt / f"other-{index}", os.O_RDWR | os.O_CREAT, 0o644)
                    held.append(other)
                    os.write(other, b"other")
                pid = daemon_pid(volume.backing)
                assert pid is not None
                pidfd = os.pidfd_open(pid)
                shutdown(fs)
                expect_errno(errno.EIO, os.fsync, fd)
                for other in held:
                    os.close(other)
                held.clear()
            # As above: wait for the daemon before the image is unmounted.
            try:
                assert select.select([pidfd], [], [], 60)[0], "the daemon did not exit"
            finally:
                os.close(pidfd)
    finally:
        for other in held:
            os.close(other)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
