"""Names that are not valid UTF-8 round-trip as bytes through the mount.

Linux names are bytes; programs (tar, rsync, old archives in Latin-1) create names that no
encoding decodes. Through the mount every such name must come back byte for byte: create,
list, stat, rename, hard link, symlink (name and target), mkdir, unlink, rmdir, also after
a remount (the names are decrypted from the backing store again) and in fsck's report of
a damaged file (no encoding error, the path escaped, never a traceback).
"""

from __future__ import annotations

import json
import os

import pytest

from encfs.engine import ROOT_INODE, Volume
from encfs.errors import FsckProblems
from encfs.format.blocks import Layout
from tests.helpers.config import operator_for
from tests.helpers.mount import init_volume, mounted, run_cli

pytestmark = pytest.mark.fuse

BLOCK = 4096
NAMES = [
    b"\xff\xfe",  # not UTF-8 at all
    b"caf\xe9 cr\xe8me",  # Latin-1
    b"\xc3\x28",  # a broken two-byte sequence
    b"\xed\xa0\x80",  # an encoded surrogate (invalid in UTF-8)
    b"\xf8\x88\x80\x80\x80",  # a five-byte form
    b"ok-\x80-mid\n\x01tab\t",  # stray continuation byte, control characters
    b"\xfe" * 255,  # the longest name, stored through a name sidecar
]


def join(directory: bytes, name: bytes) -> bytes:
    return directory + b"/" + name


def test_invalid_utf8_names_round_trip(volume, tmp_path):
    mnt = tmp_path / "mnt"
    root = os.fsencode(mnt)
    contents = {name: os.urandom(1000 + i) for i, name in enumerate(NAMES)}
    with mounted(volume, mnt):
        for name, data in contents.items():
            with open(join(root, name), "xb") as f:
                f.write(data)
        assert sorted(os.listdir(root)) == sorted(NAMES)
        for name, data in contents.items():
            assert os.stat(join(root, name)).st_size == len(data)
            with open(join(root, name), "rb") as f:
                assert f.read() == data

        # rename to another invalid name (one of them long), then hard links and symlinks
        renamed = {}
        for i, (name, data) in enumerate(contents.items()):
            new = b"\x80renamed-" + bytes([0xC0 + i]) + name[:200]
            os.rename(join(root, name), join(root, new))
            renamed[new] = data
        assert sorted(os.listdir(root)) == sorted(renamed)
        first = sorted(renamed)[0]
        os.link(join(root, first), join(root, b"\xefhard\xff"))
        assert os.stat(join(root, b"\xefhard\xff")).st_ino == os.stat(join(root, first)).st_ino
        target = b"../\xff\xfe/t\xe9rget-" + b"\x81" * 100
        os.symlink(target, join(root, b"\xc0link"))
        assert os.readlink(join(root, b"\xc0link")) == target

        # a directory with an invalid name, and files in it
        sub = join(root, b"d\xe9j\xe0 vu\xff")
        os.mkdir(sub)
        for name in NAMES[:3]:
            with open(join(sub, name), "wb") as f:
                f.write(name)
        assert sorted(os.listdir(sub)) == sorted(NAMES[:3])
        with os.scandir(sub) as entries:
            assert sorted(e.name for e in entries) == sorted(NAMES[:3])

    # after a remount the names are decrypted from the backing store again
    with mounted(volume, mnt):
        expected = {*renamed, b"\xefhard\xff", b"\xc0link", b"d\xe9j\xe0 vu\xff"}
        assert set(os.listdir(root)) == expected
        for name, data in renamed.items():
            with open(join(root, name), "rb") as f:
                assert f.read() == data
        assert os.readlink(join(root, b"\xc0link")) == target
        for name in NAMES[:3]:
            with open(join(sub, name), "rb") as f:
                assert f.read() == name
            os.unlink(join(sub, name))
        os.rmdir(sub)
        for name in [*renamed, b"\xefhard\xff", b"\xc0link"]:
            os.unlink(join(root, name))
        assert os.listdir(root) == []

    # the backing store holds only ASCII (encrypted, base64url) names
    for _, dirs, files in os.walk(os.fsencode(volume.backing)):
        for name in dirs + files:
            assert name.isascii(), name


def backing_path_of(volume, *names: bytes) -> str:
    vol = Volume.unlock(str(volume.backing), operator_for(volume.keyfile))
    try:
        ino, path = ROOT_INODE, str(volume.backing)
        for name in names:
            path = os.path.join(path, vol.backing_name(ino, name)[0])
            ino = vol.lookup(ino, name).ino
        return path
    finally:
        vol.close()


def test_fsck_reports_a_damaged_file_with_an_invalid_utf8_name(tmp_path):
    volume = init_volume(tmp_path, block_size=BLOCK)
    name = b"bad-\xff\xfe\n-name"
    with mounted(volume, tmp_path / "mnt") as mnt:
        os.mkdir(join(os.fsencode(mnt), b"\xe9t\xe9"))
        with open(join(join(os.fsencode(mnt), b"\xe9t\xe9"), name), "wb") as f:
            f.write(os.urandom(5 * BLOCK))
    path = backing_path_of(volume, b"\xe9t\xe9", name)
    with open(path, "r+b") as f:
        f.seek(Layout(BLOCK).record_offset(2) + 40)
        f.write(b"\x00\x01\x02")

    # The text report escapes what is not UTF-8 or not printable, in any locale.
    for lang in ("C", "C.UTF-8"):
        result = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile,
                         env={**os.environ, "LANG": lang, "LC_ALL": lang})
        assert result.returncode == FsckProblems.exit_code, result.stderr
        assert "Traceback" not in result.stderr
        assert result.stdout.isascii()
        (line,) = [ln for ln in result.stdout.splitlines() if "block 2" in ln]
        assert line.startswith(
            "/\\xe9t\\xe9/bad-\\xff\\xfe\\n-name block 2: block does not authenticate"
        ), line

    result = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile, "--json")
    assert result.returncode == FsckProblems.exit_code, result.stderr
    (finding,) = json.loads(result.stdout)["findings"]
    # the path is the name's bytes, recoverable exactly (surrogateescape)
    assert os.fsencode(finding["path"]) == b"/\xe9t\xe9/" + name
    assert finding["block"] == 2
