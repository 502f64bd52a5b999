"""The extended attribute namespaces the mount refuses, through a real mount.

* POSIX ACLs (`system.*`) and SELinux labels (`security.selinux`): EOPNOTSUPP for get and
  set on files and directories, as from a local filesystem without them. With that answer
  `ls -l` asks once per listing instead of once per entry for each (strace counts its
  calls), and `cp -a` and `tar --acls` of a tree with an ACL fall back to the mode bits.
* `security.capability` stays ENODATA (the kernel asks before every write).
* A label stored by an earlier version (through the engine here) is hidden from
  listxattr, refused by getxattr, and can still be removed.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from encfs.engine import ROOT_INODE
from encfs.engine import Volume as EngineVolume
from tests.helpers.config import trusted
from tests.helpers.mount import init_volume, mounted

pytestmark = pytest.mark.fuse

REFUSED = ("system.posix_acl_access", "system.other", "security.selinux")
REFUSED_ON_DIRECTORIES = (*REFUSED, "system.posix_acl_default")
# An ACL in its xattr form (version 2, then tag/perm/id entries): the mode bits rw-r-----
# plus read access for the user nobody, which mode bits cannot express.
ACL = (b"\x02\x00\x00\x00"
       + b"\x01\x00\x06\x00\xff\xff\xff\xff"  # USER_OBJ rw-
       + b"\x02\x00\x04\x00" + (65534).to_bytes(4, "little")  # USER nobody r--
       + b"\x04\x00\x04\x00\xff\xff\xff\xff"  # GROUP_OBJ r--
       + b"\x10\x00\x04\x00\xff\xff\xff\xff"  # MASK r--
       + b"\x20\x00\x00\x00\xff\xff\xff\xff")  # OTHER ---


def errno_of(call) -> int:
    with pytest.raises(OSError) as info:
        call()
    return info.value.errno


def test_acls_and_selinux_labels_are_not_supported(tmp_path):
    volume = init_volume(tmp_path)
    with mounted(volume, tmp_path / "mnt") as mnt:
        (mnt / "f").write_bytes(b"data")
        (mnt / "d").mkdir()
        for path, names in ((mnt / "f", REFUSED), (mnt / "d", REFUSED_ON_DIRECTORIES)):
            for name in names:
                assert errno_of(lambda p=path, n=name: os.getxattr(p, n)) == errno.EOPNOTSUPP
                assert errno_of(lambda p=path, n=name: os.setxattr(p, n, ACL)) == errno.EOPNOTSUPP
                if name.startswith("system."):  # an empty ACL is a removal
                    assert errno_of(
                        lambda p=path, n=name: os.setxattr(p, n, ACL[:4])
                    ) == errno.EOPNOTSUPP
                    assert errno_of(lambda p=path, n=name: os.removexattr(p, n)) == errno.EOPNOTSUPP
            assert errno_of(lambda p=path: os.getxattr(p, "security.capability")) == errno.ENODATA
            os.setxattr(path, "user.kept", b"v")  # other namespaces are stored as before
            assert os.listxattr(path) == ["user.kept"]
            assert os.getxattr(path, "user.kept") == b"v"


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_ls_l_asks_for_acls_and_labels_once_per_listing(tmp_path):
    volume = init_volume(tmp_path)
    with mounted(volume, tmp_path / "mnt") as mnt:
        (mnt / "dir").mkdir()
        for i in range(50):
            (mnt / "dir" / f"file{i:02d}").write_bytes(b"x")
        trace = tmp_path / "ls.trace"
        listing = subprocess.run(
            ["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=getxattr,lgetxattr",
             "ls", "-l", str(mnt / "dir")],
            capture_output=True, text=True, check=True,
        )
        assert len(listing.stdout.splitlines()) == 51  # "total" and 50 entries
        calls = [line for line in trace.read_text().splitlines() if "xattr(" in line]
        # Once each at most (ls remembers "not supported" for the device), never 50.
        assert len(calls) <= 2, calls
        assert all("EOPNOTSUPP" in line for line in calls), calls


def test_cp_a_and_tar_of_a_tree_with_an_acl_keep_the_mode_bits(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "f").write_bytes(b"acl'd file")
    os.chmod(source / "f", 0o640)
    try:  # (the acl package may be absent: the xattr form directly)
        os.setxattr(source / "f", "system.posix_acl_access", ACL)
    except OSError as exc:  # tmp_path on a filesystem without ACLs: nothing to carry
        pytest.skip(f"the test's own directory takes no ACL ({exc.strerror})")
    volume = init_volume(tmp_path)
    with mounted(volume, tmp_path / "mnt") as mnt:
        copied = subprocess.run(["cp", "-a", str(source), str(mnt / "cp")],
                                capture_output=True, text=True, check=False)
        # cp reports the ACL it could not keep; the file and its mode bits are there.
        assert (mnt / "cp" / "f").read_bytes() == b"acl'd file"
        assert (mnt / "cp" / "f").stat().st_mode & 0o777 == 0o640, copied.stderr
        (mnt / "tar").mkdir()
        archive = tmp_path / "t.tar"
        subprocess.run(["tar", "--acls", "-cf", str(archive), "-C", str(source), "f"],
                       check=True)
        subprocess.run(["tar", "--acls", "-xf", str(archive), "-C", str(mnt / "tar")],
                       capture_output=True, check=False)
        assert (mnt / "tar" / "f").read_bytes() == b"acl'd file"
        assert (mnt / "tar" / "f").stat().st_mode & 0o777 == 0o640


def test_label_stored_by_an_earlier_version_is_hidden_and_removable(tmp_path):
    volume = init_volume(tmp_path)
    with mounted(volume, tmp_path / "mnt") as mnt:
        (mnt / "f").write_bytes(b"data")
    engine = EngineVolume.unlock(str(volume.backing), trusted())
    try:
        ino = engine.lookup(ROOT_INODE, b"f").ino
        engine.setxattr(ino, b"user.kept", b"v")  # the engine stores any name
        engine.setxattr(ino, b"security.selinux", b"system_u:object_r:etc_t:s0")
    finally:
        engine.close()
    with mounted(volume, tmp_path / "mnt") as mnt:
        assert os.listxattr(mnt / "f") == ["user.kept"]
        assert errno_of(lambda: os.getxattr(mnt / "f", "security.selinux")) == errno.EOPNOTSUPP
        os.removexattr(mnt / "f", "security.selinux")
    engine = EngineVolume.unlock(str(volume.backing), trusted())
    try:
        assert engine.listxattr(engine.lookup(ROOT_INODE, b"f").ino) == [b"user.kept"]
    finally:
        engine.close()


def test_refused_names_leave_nothing_in_the_backing_store(tmp_path):
    volume = init_volume(tmp_path)
    with mounted(volume, tmp_path / "mnt") as mnt:
        (mnt / "f").write_bytes(b"data")
        for name in REFUSED:
            with pytest.raises(OSError):
                os.setxattr(mnt / "f", name, ACL)
    for root, dirs, files in os.walk(volume.backing):
        for entry in dirs + files:
            assert os.listxattr(Path(root, entry), follow_symlinks=False) == []
