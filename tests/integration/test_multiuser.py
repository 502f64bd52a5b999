"""A second uid through the mount: `-o allow_other` and normal permission rules.

The daemon runs as root and `default_permissions` is always on, so the kernel checks
every access against the modes and owners the mount reports. Other users are run with
`setpriv --reuid --regid --clear-groups` (uids need no passwd entry): 65534 (nobody) and
a throwaway 42424. Each action runs in the system python as that user and reports the
errno of every operation.

The mountpoint lives in a world-traversable temporary directory (pytest's base
directory is 0700), and the mount root is made 0755 so other users can enter it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.mount import init_volume, mounted

pytestmark = pytest.mark.fuse

NOBODY = 65534
OTHER = 42424
SYSTEM_PYTHON = "/usr/bin/python3"

HARNESS = textwrap.dedent(
    """
    import errno, json, os, sys
    results = []
    def attempt(fn):
        try:
            value = fn()
            plain = isinstance(value, (int, str, type(None)))
            results.append(["ok", value if plain else repr(value)])
        except OSError as exc:
            results.append([errno.errorcode[exc.errno], None])
    """
)


def as_user(uid: int, gid: int, body: str) -> list[list]:
    """Run `body` (statements calling attempt(lambda: ...)) as uid/gid; one result each."""
    script = HARNESS + textwrap.dedent(body) + "\nprint(json.dumps(results))\n"
    result = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--",
         SYSTEM_PYTHON, "-I", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def codes(results: list[list]) -> list[str]:
    return [code for code, _ in results]


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A temporary directory every user can traverse (for mountpoints)."""
    path = Path(tempfile.mkdtemp(prefix="egw-multiuser-"))
    try:
        os.chmod(path, 0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def shared_mnt(tmp_path, public_dir) -> Iterator[Path]:
    volume = init_volume(tmp_path)
    with mounted(volume, public_dir / "mnt", "allow_other") as mnt:
        os.chmod(mnt, 0o755)
        yield mnt


def test_other_user_follows_modes(shared_mnt):
    mnt = shared_mnt
    (mnt / "secret").write_text("root only\n")
    os.chmod(mnt / "secret", 0o600)
    (mnt / "public").write_text("public\n")
    os.chmod(mnt / "public", 0o666)
    (mnt / "readonly").write_text("read only\n")
    os.chmod(mnt / "readonly", 0o644)
    (mnt / "closed-dir").mkdir(mode=0o755)
    (mnt / "open-dir").mkdir()
    os.chmod(mnt / "open-dir", 0o777)
    (mnt / "private-dir").mkdir()
    os.chmod(mnt / "private-dir", 0o700)
    (mnt / "private-dir" / "inside").write_text("x")
    m = str(mnt)
    results = as_user(NOBODY, NOBODY, f"""
        m = {m!r}
        attempt(lambda: open(m + "/secret").read())
        attempt(lambda: os.open(m + "/secret", os.O_WRONLY))
        attempt(lambda: open(m + "/public", "a").write("appended by nobody\\n"))
        attempt(lambda: open(m + "/readonly").read())
        attempt(lambda: os.open(m + "/readonly", os.O_WRONLY))
        attempt(lambda: os.open(m + "/closed-dir/new", os.O_CREAT | os.O_WRONLY, 0o644))
        attempt(lambda: os.listdir(m + "/private-dir"))
        attempt(lambda: os.stat(m + "/private-dir/inside").st_size)
        attempt(lambda: os.chmod(m + "/public", 0o777))
        attempt(lambda: os.chown(m + "/public", {NOBODY}, {NOBODY}))
        attempt(lambda: os.utime(m + "/public", ns=(1, 1)))
        attempt(lambda: os.utime(m + "/public"))
        attempt(lambda: os.unlink(m + "/public"))
        attempt(lambda: os.rename(m + "/public", m + "/open-dir/moved"))
        attempt(lambda: os.setxattr(m + "/public", "user.x", b"v"))
        attempt(lambda: os.setxattr(m + "/readonly", "user.x", b"v"))
    """)
    assert codes(results) == [
        "EACCES", "EACCES",          # 0600 root file: no read, no write
        "ok",                        # 0666: writable
        "ok", "EACCES",              # 0644: read only
        "EACCES",                    # no create in a 0755 root directory
        "EACCES", "EACCES",          # 0700 directory: no listing, no search
        "EPERM", "EPERM",            # chmod/chown of another's file
        "EPERM", "ok",               # explicit times need ownership; "now" needs write
        "EACCES", "EACCES",          # unlink/rename need write on the (root 0755) directory
        "ok", "EACCES",              # user xattrs need write permission on the file
    ]
    assert (mnt / "public").read_text() == "public\nappended by nobody\n"
    assert not (mnt / "closed-dir" / "new").exists()


def test_files_created_by_other_user_are_theirs(shared_mnt):
    mnt = shared_mnt
    (mnt / "open-dir").mkdir()
    os.chmod(mnt / "open-dir", 0o777)
    (mnt / "sgid-dir").mkdir()
    os.chown(mnt / "sgid-dir", 0, 4242)
    os.chmod(mnt / "sgid-dir", 0o2777)
    m = str(mnt)
    results = as_user(NOBODY, NOBODY, f"""
        m = {m!r}
        attempt(lambda: open(m + "/open-dir/file", "w").write("mine"))
        attempt(lambda: os.mkdir(m + "/open-dir/dir"))
        attempt(lambda: os.symlink("file", m + "/open-dir/link"))
        attempt(lambda: os.mkfifo(m + "/open-dir/fifo"))
        attempt(lambda: os.link(m + "/open-dir/file", m + "/open-dir/hard"))
        attempt(lambda: open(m + "/sgid-dir/file", "w").write("group from dir"))
        attempt(lambda: os.mkdir(m + "/sgid-dir/sub"))
        attempt(lambda: os.chmod(m + "/open-dir/file", 0o640))
        attempt(lambda: os.close(os.open(m + "/open-dir/setid", os.O_CREAT | os.O_WRONLY,
                                         0o6755)))
    """)
    assert codes(results) == ["ok"] * 9
    # Made root's by the daemon, then given to the creator: the mode is what was asked.
    st = os.stat(mnt / "open-dir" / "setid")
    assert (st.st_uid, oct(st.st_mode)) == (NOBODY, "0o106755")
    for name in ("file", "dir", "link", "fifo", "hard"):
        st = os.lstat(mnt / "open-dir" / name)
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), name
    assert stat.S_IMODE(os.stat(mnt / "open-dir" / "file").st_mode) == 0o640
    st = os.stat(mnt / "sgid-dir" / "file")
    assert (st.st_uid, st.st_gid) == (NOBODY, 4242)
    st = os.stat(mnt / "sgid-dir" / "sub")
    assert (st.st_uid, st.st_gid) == (NOBODY, 4242) and st.st_mode & stat.S_ISGID
    # And root sees them as theirs after a fresh lookup too (backing owners are real).
    assert os.stat(mnt / "open-dir" / "hard").st_nlink == 2


def test_sticky_directory_protects_others_files(shared_mnt):
    mnt = shared_mnt
    (mnt / "sticky").mkdir()
    os.chmod(mnt / "sticky", 0o1777)
    (mnt / "sticky" / "roots").write_text("root's")
    os.chmod(mnt / "sticky" / "roots", 0o666)
    m = str(mnt)
    created = as_user(NOBODY, NOBODY, f"""
        attempt(lambda: open({m!r} + "/sticky/nobodys", "w").write("nobody's"))
        attempt(lambda: open({m!r} + "/sticky/nobodys-2", "w").write("nobody's"))
    """)
    assert codes(created) == ["ok", "ok"]
    other = as_user(OTHER, OTHER, f"""
        m = {m!r}
        attempt(lambda: os.unlink(m + "/sticky/nobodys"))
        attempt(lambda: os.rename(m + "/sticky/nobodys", m + "/sticky/taken"))
        attempt(lambda: os.unlink(m + "/sticky/roots"))
        attempt(lambda: open(m + "/sticky/roots", "a").write(" + other"))
        attempt(lambda: open(m + "/sticky/others", "w").write("other's"))
        attempt(lambda: os.unlink(m + "/sticky/others"))
    """)
    assert codes(other) == ["EPERM", "EPERM", "EPERM", "ok", "ok", "ok"]
    owner = as_user(NOBODY, NOBODY, f"""
        attempt(lambda: os.unlink({m!r} + "/sticky/nobodys"))
        attempt(lambda: os.rename({m!r} + "/sticky/nobodys-2", {m!r} + "/sticky/renamed"))
    """)
    assert codes(owner) == ["ok", "ok"]
    assert sorted(os.listdir(mnt / "sticky")) == ["renamed", "roots"]
    assert (mnt / "sticky" / "roots").read_text() == "root's + other"


def test_setid_bits_cleared_when_another_user_writes(shared_mnt):
    mnt = shared_mnt
    for name, mode in (("suid", 0o4777), ("sgid", 0o2777), ("both", 0o6777),
                       ("sgid-noexec", 0o2766), ("trunc", 0o6777)):
        (mnt / name).write_text(name)
        os.chmod(mnt / name, mode)
    m = str(mnt)
    results = as_user(NOBODY, NOBODY, f"""
        m = {m!r}
        for name in ("suid", "sgid", "both", "sgid-noexec"):
            attempt(lambda: open(m + "/" + name, "a").write(" changed"))
        attempt(lambda: os.truncate(m + "/trunc", 1))
        for name in ("suid", "sgid", "both", "sgid-noexec", "trunc"):
            attempt(lambda: oct(os.stat(m + "/" + name).st_mode))
    """)
    assert codes(results) == ["ok"] * 10
    seen_by_writer = [value for _, value in results[5:]]
    # Cleared as on a local filesystem: setuid always; setgid only with group execute.
    want = ["0o100777", "0o100777", "0o100777", "0o102766", "0o100777"]
    assert seen_by_writer == want
    assert [oct(os.stat(mnt / n).st_mode) for n in ("suid", "sgid", "both", "sgid-noexec",
                                                   "trunc")] == want
    assert (mnt / "suid").read_text() == "suid changed"


def test_without_allow_other_other_users_get_eacces(tmp_path, public_dir):
    volume = init_volume(tmp_path)
    with mounted(volume, public_dir / "mnt") as mnt:
        os.chmod(mnt, 0o777)
        (mnt / "file").write_text("x")
        os.chmod(mnt / "file", 0o666)
        m = str(mnt)
        results = as_user(NOBODY, NOBODY, f"""
            m = {m!r}
            attempt(lambda: os.stat(m).st_mode)
            attempt(lambda: os.listdir(m))
            attempt(lambda: open(m + "/file").read())
            attempt(lambda: open(m + "/new", "w").write("x"))
        """)
        assert codes(results) == ["EACCES"] * 4
        assert sorted(os.listdir(mnt)) == ["file"]


# --- setuid/setgid for root (CAP_FSETID) ------------------------------------------------


@pytest.fixture
def root_mnt(tmp_path) -> Iterator[Path]:
    volume = init_volume(tmp_path)
    with mounted(volume, tmp_path / "mnt") as mnt:
        yield mnt


def test_root_write_keeps_setid_bits(root_mnt, tmp_path):
    """A writer with CAP_FSETID keeps setuid/setgid, as on ext4 (the kernel decides, it
    knows the writer; an O_TRUNC open by root keeps them too)."""
    for root in (tmp_path / "plain", root_mnt):
        root.mkdir(exist_ok=True)
        path = root / "tool"
        path.write_bytes(b"#!/bin/sh\n")
        os.chmod(path, 0o6755)
        with open(path, "ab") as f:
            f.write(b"true\n")
        os.truncate(path, 10)
        with open(path, "wb") as f:  # O_TRUNC
            f.write(b"#!/bin/sh\n")
    modes = [oct(os.stat(root / "tool").st_mode) for root in (tmp_path / "plain", root_mnt)]
    assert modes == ["0o106755", "0o106755"]


def test_create_with_setid_mode_keeps_bits(root_mnt):
    old = os.umask(0)
    try:
        fd = os.open(root_mnt / "created", os.O_CREAT | os.O_WRONLY, 0o6755)
        os.close(fd)
    finally:
        os.umask(old)
    assert oct(os.stat(root_mnt / "created").st_mode) == "0o106755"


def test_mount_root_mode_is_the_backing_root_mode(tmp_path, public_dir):
    """Sharing a mount means chmod of its root, which is the backing root directory's
    mode: the backing directory then stops being 0700 (docs/LIMITS.md)."""
    volume = init_volume(tmp_path)
    assert stat.S_IMODE(os.stat(volume.backing).st_mode) == 0o700
    with mounted(volume, public_dir / "mnt", "allow_other") as mnt:
        os.chmod(mnt, 0o755)
        assert stat.S_IMODE(os.stat(volume.backing).st_mode) == 0o755
        os.chmod(mnt, 0o700)
    assert stat.S_IMODE(os.stat(volume.backing).st_mode) == 0o700

