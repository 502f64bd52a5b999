"""Engine-level fixtures: a real volume on tmp_path, driven without FUSE."""

from __future__ import annotations

import pytest

from encfs.keys.keyfile import KeyfileProvider
from encfs.volume import Volume, create_volume


@pytest.fixture
def backing(tmp_path):
    path = tmp_path / "backing"
    create_volume(str(path), KeyfileProvider({"path": str(tmp_path / "key")}), 4096)
    return path


@pytest.fixture
def vol(backing):
    volume = Volume.unlock(str(backing))
    yield volume
    volume.close()
