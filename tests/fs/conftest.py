"""Engine-level fixtures: a real volume on tmp_path, driven without FUSE."""

from __future__ import annotations

import pytest

from encfs import config_store
from encfs.engine import Volume, create_volume
from encfs.format import DEFAULT_FEATURES, FEATURE_BOUND_NAMES
from encfs.keys.keyfile import KeyfileProvider
from tests.helpers.config import trusted


@pytest.fixture
def backing(tmp_path):
    path = tmp_path / "backing"
    create_volume(str(path), KeyfileProvider({"path": str(tmp_path / "key")}), 4096, trusted())
    return path


def make_legacy_volume(tmp_path, monkeypatch, name: str = "legacy"):
    """A volume as made before the `bound-names` feature (directories and symlink targets
    not bound to their place): the features of that time, through the same code."""
    monkeypatch.setattr(
        config_store,
        "DEFAULT_FEATURES",
        tuple(f for f in DEFAULT_FEATURES if f != FEATURE_BOUND_NAMES),
    )
    path = tmp_path / name
    key = KeyfileProvider({"path": str(tmp_path / f"{name}.key")})
    create_volume(str(path), key, 4096, trusted())
    monkeypatch.undo()
    return path


@pytest.fixture
def legacy_backing(tmp_path, monkeypatch):
    return make_legacy_volume(tmp_path, monkeypatch)


@pytest.fixture
def legacy_vol(legacy_backing):
    volume = Volume.unlock(str(legacy_backing), trusted())
    yield volume
    volume.close()


@pytest.fixture
def vol(backing):
    volume = Volume.unlock(str(backing), trusted())
    yield volume
    volume.close()
