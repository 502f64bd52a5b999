"""`encfs-gw reencrypt` moves names, symlink targets, xattrs and bindings to a new volume
key (docs/FORMAT.md 9.2), through the real CLI on a real tree.

The tree: a part of the Python standard library plus what it lacks
(tests/helpers/convert_tree.py: hard links across directories, 255-byte names (sidecars),
4,000-byte symlink targets (the symlink store), xattrs on files, directories, a symlink,
a FIFO and devices, nested and empty directories), made a volume by `encfs-gw convert`,
plus a set too large for a backing xattr (the xattr store). Its manifest through a mount
(type, mode, owner, times, size, SHA-256, xattrs, targets, hard-link groups) is the model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from encfs import config_store
from encfs.admin import quarantine
from encfs.admin.reencrypt import CRASH_AT_ENV
from encfs.errors import ConfigAuthError, IntegrityError, UnsupportedFormat, VolumeBusy
from tests.helpers.config import operator_for
from tests.helpers.convert_tree import SMALL_STDLIB, build_tree, manifest
from tests.helpers.mount import ENCFS_GW, mounted, run_cli
from tests.helpers.mount import Volume as CliVolume

pytestmark = pytest.mark.fuse

BIG_SET_FILE = b"extras/with-xattrs.txt"


def reencrypt(backing: Path, *args: str | os.PathLike, env: dict | None = None
              ) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*ENCFS_GW, "reencrypt", str(backing), *map(str, args)],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, **(env or {})},
    )


def make_tree_volume(tmp_path: Path) -> tuple[CliVolume, tuple[dict, set]]:
    directory = tmp_path / "vol"
    build_tree(directory, SMALL_STDLIB, big=False)
    keyfile = tmp_path / "vol.key"
    converted = subprocess.run(
        [*ENCFS_GW, "convert", str(directory), "--keyfile", str(keyfile)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert converted.returncode == 0, converted.stderr
    volume = CliVolume(directory, keyfile)
    with mounted(volume, tmp_path / "mnt") as mnt:
        # a set too large for the backing xattr: its sealed form is in the xattr store
        os.setxattr(mnt / os.fsdecode(BIG_SET_FILE), "user.big", b"b" * 5000)
        # more of every kind the name pass moves, spread over nested directories
        for i in range(6):
            nested = mnt / "more" / f"level{i}" / ("n" * (200 + i))
            nested.mkdir(parents=True)
            os.setxattr(nested, "user.dir-note", b"dir %d" % i)
            (nested / ("f" * (230 + i))).write_bytes(b"long-named %d" % i)
            os.setxattr(nested / ("f" * (230 + i)), "user.note", b"x" * (100 * i))
            os.symlink("t" * (3500 + i), nested / f"long-link{i}")
            os.symlink(f"short/target/{i}", nested / f"link{i}")
            os.link(nested / ("f" * (230 + i)), mnt / "more" / f"hard{i}")
    model = tree_of(volume, tmp_path / "mnt")  # a fresh mount: no attributes cached
    assert list((directory / ".egw-xattrs").iterdir()), "the xattr store is used"
    assert list((directory / ".egw-symlinks").iterdir()), "the symlink store is used"
    return volume, model


def tree_of(volume: CliVolume, mnt: Path) -> tuple[dict, set]:
    with mounted(volume, mnt) as mounted_at:
        return manifest(mounted_at, plaintext=False)


def without_atimes(model: tuple[dict, set]) -> tuple[dict, set]:
    """The pass changes ctimes (headers, xattrs, renames), so the backing filesystem's
    relatime gives the next read through a mount a new atime: compared without them."""
    entries, groups = model
    return {rel: {k: v for k, v in entry.items() if k != "atime_ns"}
            for rel, entry in entries.items()}, groups


def without_directory_times(model: tuple[dict, set]) -> tuple[dict, set]:
    """A kill in the middle of a directory leaves its backing times changed by the renames
    done in it (a finished directory gets them back): compared without them."""
    entries, groups = model
    return {
        rel: {k: v for k, v in entry.items()
              if not (entry["type"] == 0o040000 and k in ("mtime_ns", "atime_ns"))}
        for rel, entry in entries.items()
    }, groups


def assert_same_tree(seen: tuple[dict, set], model: tuple[dict, set]) -> None:
    """Entry by entry, naming the fields that differ."""
    assert sorted(seen[0]) == sorted(model[0])
    differ = {rel: sorted(k for k in entry if seen[0][rel].get(k) != entry[k])
              for rel, entry in model[0].items() if seen[0][rel] != entry}
    assert not differ, {rel: {k: (model[0][rel].get(k), seen[0][rel].get(k)) for k in keys}
                        for rel, keys in differ.items()}
    assert seen[1] == model[1]


def backing_names(backing: Path) -> set[str]:
    """Every entry name in the tree (not the stores: their names are object ids)."""
    names = set()
    for _, dirnames, filenames in os.walk(backing):
        dirnames[:] = [d for d in dirnames if not d.startswith(".egw-")]
        names.update(n for n in dirnames + filenames if not n.startswith((".egw-", "encfs-gw")))
    return names


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[CliVolume, tuple[dict, set]]:
    """One tree volume and its model; each test works on a copy (cp -a: hard links and
    xattrs kept) under a trust store of its own (the copies share a volume id)."""
    return make_tree_volume(tmp_path_factory.mktemp("template"))


def copy_of(template: tuple[CliVolume, tuple[dict, set]], tmp_path: Path) -> CliVolume:
    volume, _ = template
    subprocess.run(["cp", "-a", str(volume.backing), str(tmp_path / "vol")], check=True)
    return CliVolume(tmp_path / "vol", volume.keyfile)


def test_a_full_tree_equals_its_model_after_the_pass(tmp_path, template, own_trust_store):
    volume, model = copy_of(template, tmp_path), template[1]
    names_before = backing_names(volume.backing)
    result = reencrypt(volume.backing, "--keyfile", volume.keyfile, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["done"] and summary["volume_key"] == "epoch 2 (was 1)"
    assert summary["names_unreadable"] == 0
    assert summary["names_moved"] == summary["names_entries"] > 50
    assert summary["names_store_files_moved"] >= 2  # a long target and a large set
    assert summary["names_symlinks_moved"] > 0 and summary["names_xattr_sets_moved"] > 0
    config = json.loads((volume.backing / "encfs-gw.conf").read_text())
    assert "volume-key-epochs" in config["features"]
    assert [(v["version"], v["volume_key_epoch"]) for v in config["kek"]["versions"]] == [
        (1, 1), (2, 2),
    ]
    # every entry has another backing name (the name key changed) ...
    assert not names_before & backing_names(volume.backing)
    # ... and the tree through a mount is the model, byte for byte and by metadata
    assert_same_tree(without_atimes(tree_of(volume, tmp_path / "mnt")), without_atimes(model))
    fsck = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def kill_then_resume(volume: CliVolume, model: tuple[dict, set], tmp_path: Path,
                     points: list[str]) -> None:
    """Kill `reencrypt` at each point in turn (each run resumes the last); after each
    kill fsck refuses the volume (exit 14); the last run finishes and the tree
    equals its model."""
    (tmp_path / "mnt").mkdir(exist_ok=True)
    for point in points:
        result = reencrypt(volume.backing, "--keyfile", volume.keyfile,
                           env={CRASH_AT_ENV: point})
        assert result.returncode == -signal.SIGKILL, (point, result.stderr)
        # (a mount resumes it instead: test_reencrypt_online.py)
        refused = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile)
        assert refused.returncode == VolumeBusy.exit_code, (point, refused.stderr)
        assert "being re-encrypted" in refused.stderr
    result = reencrypt(volume.backing, "--keyfile", volume.keyfile, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["done"] and summary["target"] == 2 and summary["names_unreadable"] == 0
    # a kill between a long name's steps leaves a sidecar: the next run removes it
    for dirpath, dirnames, filenames in os.walk(volume.backing):
        for name in filenames:
            if name.startswith(".egwL") and name.endswith(".name"):
                assert name[: -len(".name")] in filenames + dirnames, (dirpath, name)
    assert_same_tree(without_directory_times(without_atimes(tree_of(volume, tmp_path / "mnt"))),
                     without_directory_times(without_atimes(model)))
    fsck = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


@pytest.mark.parametrize("point", [
    "1:started", "2:store", "2:dirid", "1:sidecar", "1:rename", "9:rename", "3:header",
    "2:xattrs", "2:symlink", "1:journal",
])
def test_kill9_in_the_name_pass_then_resume(tmp_path, template, own_trust_store, point):
    """At each kind of step of the name pass (the store files, a directory's id record,
    a long name's new sidecar, a rename, a header valid under both keys, an xattr set,
    a symlink replaced), and once in the data pass after it."""
    kill_then_resume(copy_of(template, tmp_path), template[1], tmp_path, [point])


def test_kill9_again_and_again_then_resume(tmp_path, template, own_trust_store):
    """Resumed runs killed too: each gets one step further before its kill."""
    kill_then_resume(copy_of(template, tmp_path), template[1], tmp_path,
                     ["1:dirid", "1:rename", "1:header", "1:xattrs", "1:dirid", "1:journal"])


def test_older_readers_refuse_a_volume_with_epochs(tmp_path, template, own_trust_store):
    """The feature flag is set from the first write of the pass: a reader that does not
    know it refuses the volume with exit 11 (simulated by a config whose flag this
    version does not know: the same check)."""
    volume = copy_of(template, tmp_path)
    result = reencrypt(volume.backing, "--keyfile", volume.keyfile,
                       env={CRASH_AT_ENV: "1:started"})
    assert result.returncode == -signal.SIGKILL
    config = json.loads((volume.backing / "encfs-gw.conf").read_text())
    assert "volume-key-epochs" in config["features"] and config["reencrypt"]["from_epoch"] == 1
    config["features"] = [f.replace("volume-key-epochs", "volume-key-epochs-v9")
                          for f in config["features"]]
    (volume.backing / "encfs-gw.conf").write_text(json.dumps(config))
    refused = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile)
    assert refused.returncode == UnsupportedFormat.exit_code, refused.stderr


def test_another_host_follows_the_new_volume_key_until_the_old_one_is_purged(
    tmp_path, template, own_trust_store
):
    """A host's trust store pins the volume key it saw. A host that knew the volume before
    the pass (its trust store saved then, put back after) accepts the new key while a
    retired KEK version still wraps the pinned one; after --purge-old it refuses the
    volume as substituted (exit 19) until its operator vouches again (`trust
    --accept-rollback`)."""
    volume = copy_of(template, tmp_path)
    assert run_cli("fsck", volume.backing, "--keyfile", volume.keyfile).returncode == 0
    other_host = tmp_path / "other-host-trust"
    shutil.copytree(own_trust_store, other_host)
    result = reencrypt(volume.backing, "--keyfile", volume.keyfile)
    assert result.returncode == 0, result.stderr

    def as_other_host(*args: str | os.PathLike) -> subprocess.CompletedProcess:
        shutil.rmtree(own_trust_store)
        shutil.copytree(other_host, own_trust_store)
        return run_cli(*args, "--keyfile", volume.keyfile)

    follows = as_other_host("fsck", volume.backing)
    assert follows.returncode == 0, follows.stderr
    result = reencrypt(volume.backing, "--keyfile", volume.keyfile, "--purge-old")
    assert result.returncode == 0, result.stderr
    refused = as_other_host("fsck", volume.backing)
    assert refused.returncode == ConfigAuthError.exit_code, refused.stderr
    assert "another volume key" in refused.stderr
    trusted_again = as_other_host("trust", volume.backing, "--accept-rollback")
    assert trusted_again.returncode == 0, trusted_again.stderr
    assert run_cli("fsck", volume.backing, "--keyfile", volume.keyfile).returncode == 0


@pytest.mark.expected_log(r"integrity failure|bound to another name")
def test_quarantine_records_move_to_the_new_volume_key(tmp_path, template, own_trust_store):
    """fsck's quarantine records name plaintext paths under the name key: after
    `reencrypt --purge-old` they open under the new volume key and not under the old."""
    volume = copy_of(template, tmp_path)
    files = sorted(p for p in volume.backing.iterdir()
                   if "." not in p.name and p.is_file() and p.stat().st_nlink == 1)
    first, second = files[:2]
    os.rename(first, tmp_path / "swap")
    os.rename(second, first)
    os.rename(tmp_path / "swap", second)
    repaired = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile, "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    items = sorted((volume.backing / ".egw-quarantine").iterdir())
    assert len(items) == 2
    _, old = config_store.unlock(str(volume.backing), operator_for(volume.keyfile))
    try:
        result = reencrypt(volume.backing, "--keyfile", volume.keyfile, "--purge-old", "--json")
        assert result.returncode == 0, result.stderr
        _, new = config_store.unlock(str(volume.backing), operator_for(volume.keyfile))
        try:
            volume_id = new.volume_id
            for item in items:
                sealed = (item / "record").read_bytes()
                aad = quarantine.record_aad(volume_id, item.name)
                record = json.loads(new.epoch_keys().name_cipher.open(sealed, aad))
                assert record["path"].startswith("/")
                with pytest.raises(IntegrityError):
                    old.epoch_keys().name_cipher.open(sealed, aad)
        finally:
            new.close()
    finally:
        old.close()
