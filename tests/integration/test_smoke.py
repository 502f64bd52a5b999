"""The mount works end to end with the real CLI."""

import pytest

pytestmark = pytest.mark.fuse


def test_write_read_back(mnt, volume):
    (mnt / "a.txt").write_text("hello")
    (mnt / "d").mkdir()
    (mnt / "d" / "b").write_bytes(b"x" * 100000)
    assert (mnt / "a.txt").read_text() == "hello"
    assert (mnt / "d" / "b").read_bytes() == b"x" * 100000
    assert sorted(p.name for p in mnt.iterdir()) == ["a.txt", "d"]
