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

from encfs.admin import upgrade
from encfs.engine import ROOT_INODE
from encfs.engine import Volume as Engine
from encfs.errors import ConfigAuthError, IntegrityError, UnsupportedFormat
from encfs.format import FEATURE_BOUND_NAMES
from tests.helpers.config import operator_for, trusted
from tests.helpers.mount import Volume, mounted, run_cli

pytestmark = pytest.mark.usefixtures("own_trust_store")

HERE = Path(__file__).parent / "volumes"
# Made before the `authenticated-config` feature: refused until `encfs-gw upgrade`.
LEGACY = ["v1-keyfile", "v1-long-symlinks"]
# Directories and symlink targets bound to their place (and an authenticated config);
# then each object's xattrs as one sealed set (inline, in the xattr store, on a symlink);
# then a volume re-encrypted to a new volume key (feature volume-key-epochs: KEK version 1
# of epoch 1 retired, version 2 of epoch 2 current).
GOLDEN = [*LEGACY, "v1-bound-names", "v1-xattr-sets", "v1-vk-epochs"]


def extract(name: str, tmp_path: Path) -> Volume:
    with tarfile.open(HERE / f"{name}.tar") as tar:
        tar.extractall(tmp_path / name, filter="tar")
    key = tmp_path / f"{name}.key"
    shutil.copyfile(HERE / f"{name}.key", key)
    os.chmod(key, 0o600)
    backing = tmp_path / name / "backing"
    xattrs = HERE / f"{name}.xattrs.json"  # (tarfile keeps no xattrs)
    if xattrs.exists():
        for rel, attributes in json.loads(xattrs.read_text()).items():
            for xattr, value in attributes.items():
                os.setxattr(backing / rel, xattr, bytes.fromhex(value), follow_symlinks=False)
    return Volume(backing, key)


def extract_upgraded(name: str, tmp_path: Path) -> Volume:
    """A private copy, upgraded through the engine if it is a legacy volume (its key
    file vouched for), so it opens from the trust store afterwards."""
    volume = extract(name, tmp_path)
    operator = operator_for(volume.keyfile)
    if name in LEGACY:
        upgrade.upgrade(str(volume.backing), operator, trust_stored=False)
    else:  # opened once with its key file vouched for: the trust store records it
        Engine.unlock(str(volume.backing), operator).close()
    return volume


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
        stored = {n: os.getxattr(path, n, follow_symlinks=False).hex()
                  for n in os.listxattr(path, follow_symlinks=False)}
        assert stored == want.get("xattrs", {}), rel


@pytest.mark.fuse
@pytest.mark.parametrize("name", LEGACY)
def test_legacy_golden_volume_is_refused_until_upgraded(name, tmp_path):
    """An unauthenticated config is never acted on: mount, status and fsck refuse it
    (exit 19, one line naming the upgrade) even with the right key file."""
    volume = extract(name, tmp_path)
    (tmp_path / "mnt").mkdir()
    for args in (
        ("mount", volume.backing, tmp_path / "mnt", "--keyfile", volume.keyfile),
        ("status", volume.backing, "--keyfile", volume.keyfile),
        ("fsck", volume.backing, "--keyfile", volume.keyfile),
    ):
        result = run_cli(*args)
        assert result.returncode == ConfigAuthError.exit_code, result.stderr
        assert result.stderr.count("\n") == 1 and "encfs-gw upgrade" in result.stderr
    assert not os.path.ismount(tmp_path / "mnt")
    listing = run_cli("upgrade", volume.backing)  # without a vouched provider: only shows
    assert listing.returncode == 2, listing.stderr
    assert "keyslot 0: keyfile" in listing.stdout and "KEK version 1 (current)" in listing.stdout
    upgraded = run_cli("upgrade", volume.backing, "--keyfile", volume.keyfile)
    assert upgraded.returncode == 0, upgraded.stderr
    again = run_cli("upgrade", volume.backing, "--keyfile", volume.keyfile)
    assert again.returncode == 2 and "already authenticated" in again.stderr
    doc = json.loads((volume.backing / "encfs-gw.conf").read_text())
    assert "authenticated-config" in doc["features"] and doc["generation"] == 1
    assert "options" not in json.dumps(doc) and str(volume.keyfile) not in json.dumps(doc)


@pytest.mark.fuse
@pytest.mark.parametrize("name", GOLDEN)
def test_golden_volume_mounts_and_matches_manifest(name, tmp_path):
    volume = extract_upgraded(name, tmp_path)
    manifest = json.loads((HERE / f"{name}.json").read_text())
    mnt = tmp_path / "mnt"
    volume = Volume(volume.backing, None)  # opened from the trust store from now on
    with mounted(volume, mnt):
        check_manifest(mnt, manifest)
        # Then change it: the old format stays writable.
        (mnt / "added").write_bytes(b"new data")
        os.rename(mnt / "status.txt", mnt / "dir" / "status.txt")
        with open(mnt / "two-groups", "r+b") as f:
            f.seek(16384 * 32 - 5)
            f.write(b"X" * 10)
        os.setxattr(mnt / "added", "user.added", b"in this volume's own form")
    with mounted(volume, mnt):
        assert os.getxattr(mnt / "added", "user.added") == b"in this volume's own form"
        assert (mnt / "added").read_bytes() == b"new data"
        assert (mnt / "dir" / "status.txt").read_text() == "It works!\n"
        data = (mnt / "two-groups").read_bytes()
        assert data[16384 * 32 - 5 : 16384 * 32 + 5] == b"X" * 10
    # Volumes made before xattr-sets keep one backing xattr per attribute (FORMAT.md 5.4.1).
    doc = json.loads((volume.backing / "encfs-gw.conf").read_text())
    forms = set()
    for entry in volume.backing.iterdir():
        for xattr in os.listxattr(entry, follow_symlinks=False):
            forms.add("set" if xattr.endswith("egw-xattrs") else "per-name")
    assert forms == ({"set"} if "xattr-sets" in doc["features"] else {"per-name"})


@pytest.mark.fuse
@pytest.mark.parametrize("name", ["v1-bound-names", "v1-vk-epochs"])
def test_golden_volume_reencrypted(name, tmp_path):
    """A volume without xattr-sets keeps its volume key (the name pass knows only sets):
    no epochs, the result says so; the epochs volume gets a third volume key. Both still
    match their manifests through a mount."""
    volume = extract_upgraded(name, tmp_path)
    result = run_cli("reencrypt", volume.backing, "--keyfile", volume.keyfile, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    doc = json.loads((volume.backing / "encfs-gw.conf").read_text())
    if name == "v1-bound-names":
        assert summary["volume_key"].startswith("unchanged")
        assert "volume-key-epochs" not in doc["features"]
    else:
        assert summary["volume_key"] == "epoch 3 (was 2)"
        assert [v["volume_key_epoch"] for v in doc["kek"]["versions"]] == [1, 2, 3]
    with mounted(Volume(volume.backing, None), tmp_path / "mnt") as mnt:
        check_manifest(mnt, json.loads((HERE / f"{name}.json").read_text()))


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_volume_through_the_engine(name, tmp_path):
    volume = extract_upgraded(name, tmp_path)
    manifest = json.loads((HERE / f"{name}.json").read_text())
    engine = Engine.unlock(str(volume.backing), trusted())
    try:
        ino = engine.lookup(ROOT_INODE, b"two-groups").ino
        fh = engine.open(ino, os.O_RDONLY)
        data = engine.read(fh, 0, 1 << 21)
        engine.release(fh)
        assert hashlib.sha256(data).hexdigest() == manifest["two-groups"]["sha256"]
        for rel, want in manifest.items():  # every object's xattrs, as the engine reads them
            ino = ROOT_INODE
            for part in rel.encode().split(b"/"):
                ino = engine.lookup(ino, part).ino
            found = {n.decode(): engine.getxattr(ino, n).hex() for n in engine.listxattr(ino)}
            assert found == want.get("xattrs", {}), rel
    finally:
        engine.close()


def test_golden_volume_key_epochs(tmp_path):
    """Two volume keys, one per epoch: every name is under the current one (epoch 2);
    the retired version still opens (its KEK unwraps the epoch-1 key, under its AAD)."""
    volume = extract_upgraded("v1-vk-epochs", tmp_path)
    engine = Engine.unlock(str(volume.backing), trusted())
    try:
        config = engine.config
        assert "volume-key-epochs" in config.features and config.current_epoch == 2
        assert {v: config.epoch_of(v) for v in config.kek_versions} == {1: 1, 2: 2}
        assert config.kek_versions[1].state == "retired"
        keyring = engine.keyring
        assert len(keyring.older_volume_key_checks()) == 1  # epoch 1, loaded, unused
        assert keyring.epoch_keys(1).check() != keyring.volume_key_check()
    finally:
        engine.close()


@pytest.mark.expected_log(r"integrity failure")
def test_golden_xattr_sets_swapped_between_files_give_eio(tmp_path):
    """v1-xattr-sets: a file's set record copied onto another file does not open there."""
    volume = extract_upgraded("v1-xattr-sets", tmp_path)
    engine = _engine(volume)
    try:
        source = volume.backing / engine.backing_name(ROOT_INODE, b"status.txt")[0]
        victim = volume.backing / engine.backing_name(ROOT_INODE, b"empty")[0]
    finally:
        engine.close()
    os.setxattr(victim, "user.egw-xattrs", os.getxattr(source, "user.egw-xattrs"))
    engine = _engine(volume)
    try:
        with pytest.raises(IntegrityError):
            engine.listxattr(engine.lookup(ROOT_INODE, b"empty").ino)
        assert engine.getxattr(engine.lookup(ROOT_INODE, b"status.txt").ino, b"user.a") == b"1"
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


def _engine(volume: Volume) -> Engine:
    return Engine.unlock(str(volume.backing), trusted())


def _swap_dirs(volume: Volume, first: bytes, second: bytes) -> None:
    engine = _engine(volume)
    try:
        paths = [volume.backing / engine.backing_name(ROOT_INODE, n)[0] for n in (first, second)]
    finally:
        engine.close()
    paths[0].rename(paths[0].with_name("swap"))
    paths[1].rename(paths[0])
    paths[0].with_name("swap").rename(paths[1])


def _listing(engine: Engine, name: bytes) -> list[bytes]:
    fh = engine.opendir(engine.lookup(ROOT_INODE, name).ino)
    try:
        return sorted(n for n, b, _ in engine.readdir(fh, 0) if b is not None)
    finally:
        engine.releasedir(fh)


@pytest.mark.expected_log(r"integrity failure")
@pytest.mark.parametrize("name", GOLDEN)
def test_golden_directories_swapped(name, tmp_path):
    """v1-bound-names refuses swapped directories; volumes made before the feature keep
    their old behaviour (no binding checks: the swap goes unnoticed)."""
    volume = extract_upgraded(name, tmp_path)
    manifest = json.loads((HERE / f"{name}.json").read_text())
    second = b"moved dir" if "moved dir" in manifest else b"other"  # (renamed twice)
    if second == b"other":
        engine = _engine(volume)
        engine.mkdir(ROOT_INODE, second, 0o40755, 0, 0)
        engine.close()
    _swap_dirs(volume, b"dir", second)
    engine = _engine(volume)
    try:
        if FEATURE_BOUND_NAMES in engine.config.features:
            for directory in (b"dir", second):
                with pytest.raises(IntegrityError):
                    _listing(engine, directory)
        else:
            assert _listing(engine, second) == [b"sub dir \xc3\xa9"]
    finally:
        engine.close()
