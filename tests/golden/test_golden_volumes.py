"""Committed example volumes must keep opening exactly: the format cannot drift.

Never regenerate a golden volume in place; a format change adds a new one
(see make_golden.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

from encfs.errors import UnsupportedFormat
from encfs.keys.registry import open_provider
from encfs.volume import ROOT_INODE
from encfs.volume import Volume as Engine
from tests.helpers.mount import Volume, mounted, run_cli

HERE = Path(__file__).parent / "volumes"
GOLDEN = ["v1-keyfile", "v1-long-symlinks"]


def extract(name: str, tmp_path: Path) -> Volume:
    with tarfile.open(HERE / f"{name}.tar") as tar:
        tar.extractall(tmp_path / name, filter="tar")
    key = tmp_path / f"{name}.key"
    shutil.copyfile(HERE / f"{name}.key", key)
    os.chmod(key, 0o600)
    return Volume(tmp_path / name / "backing", key)


def check_manifest(root: Path, manifest: dict) -> None:
    listed = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            listed.add(os.path.relpath(os.path.join(dirpath, name), root))
    assert listed == set(manifest)
    for rel, want in manifest.items():
        path = root / rel
        st = os.lstat(path)
        if want["type"] == "file":
            assert stat.S_ISREG(st.st_mode), rel
            data = path.read_bytes()
            assert len(data) == want["size"] == st.st_size, rel
            assert hashlib.sha256(data).hexdigest() == want["sha256"], rel
            assert stat.S_IMODE(st.st_mode) == want["mode"], rel
        elif want["type"] == "dir":
            assert stat.S_ISDIR(st.st_mode), rel
            assert stat.S_IMODE(st.st_mode) == want["mode"], rel
        else:
            assert os.readlink(path) == want["target"], rel


@pytest.mark.fuse
@pytest.mark.parametrize("name", GOLDEN)
def test_golden_volume_mounts_and_matches_manifest(name, tmp_path):
    volume = extract(name, tmp_path)
    manifest = json.loads((HERE / f"{name}.json").read_text())
    mnt = tmp_path / "mnt"
    with mounted(volume, mnt):
        check_manifest(mnt, manifest)
        # Then change it: the old format stays writable.
        (mnt / "added").write_bytes(b"new data")
        os.rename(mnt / "status.txt", mnt / "dir" / "status.txt")
        with open(mnt / "two-groups", "r+b") as f:
            f.seek(16384 * 32 - 5)
            f.write(b"X" * 10)
    with mounted(volume, mnt):
        assert (mnt / "added").read_bytes() == b"new data"
        assert (mnt / "dir" / "status.txt").read_text() == "It works!\n"
        data = (mnt / "two-groups").read_bytes()
        assert data[16384 * 32 - 5 : 16384 * 32 + 5] == b"X" * 10


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_volume_through_the_engine(name, tmp_path):
    volume = extract(name, tmp_path)
    manifest = json.loads((HERE / f"{name}.json").read_text())

    def with_test_key(provider: str, options: dict):
        return open_provider(provider, {**options, "path": str(volume.keyfile)})

    engine = Engine.unlock(str(volume.backing), with_test_key)
    try:
        ino = engine.lookup(ROOT_INODE, b"two-groups").ino
        fh = engine.open(ino, os.O_RDONLY)
        data = engine.read(fh, 0, 1 << 21)
        engine.release(fh)
        assert hashlib.sha256(data).hexdigest() == manifest["two-groups"]["sha256"]
    finally:
        engine.close()


@pytest.mark.parametrize(
    "edit,code",
    [
        (lambda doc: doc.update(format_version=2), UnsupportedFormat.exit_code),
        (lambda doc: doc["features"].append("from-the-future"), UnsupportedFormat.exit_code),
    ],
)
def test_golden_volume_with_unknown_version_or_flag_refused(edit, code, tmp_path):
    volume = extract(GOLDEN[0], tmp_path)
    config = volume.backing / "encfs-gw.conf"
    doc = json.loads(config.read_text())
    edit(doc)
    config.write_text(json.dumps(doc))
    (tmp_path / "mnt").mkdir()
    result = run_cli("mount", volume.backing, tmp_path / "mnt", "--keyfile", volume.keyfile)
    assert result.returncode == code
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("encfs-gw: error:")
