"""What `convert`'s plan refuses, by the features of the volume it converts into
(encfs/convert/plan.py): with `xattr-sets` (every volume `convert` makes) xattrs on a
symlink or special file and names over 160 bytes are kept; a conversion resumed into a
volume without it keeps that format's limits. A real directory (root: trusted.* xattrs);
the CLI path is tests/integration/test_convert.py."""

from __future__ import annotations

import os

import pytest

from encfs.convert.plan import Keeps, scan
from encfs.format import DEFAULT_FEATURES
from encfs.format.blocks import Layout

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="trusted.* xattrs need root")


def _problems(tmp_path, keeps: Keeps) -> list[str]:
    fd = os.open(tmp_path / "tree", os.O_RDONLY | os.O_DIRECTORY)
    try:
        return scan(fd, Layout(4096), 4096, drop_acls=False, keeps=keeps).problems
    finally:
        os.close(fd)


def _tree(tmp_path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_bytes(b"data")
    os.setxattr(tree / "file", "user." + "n" * 195, b"a 200-byte name")
    os.symlink("file", tree / "link")
    os.setxattr(tree / "link", "trusted.t", b"on a symlink", follow_symlinks=False)


def test_xattr_sets_keep_what_per_name_volumes_refuse(tmp_path):
    _tree(tmp_path)
    assert Keeps.of(DEFAULT_FEATURES) == Keeps(sets=True, bound=True)
    assert _problems(tmp_path, Keeps(sets=True, bound=True)) == []
    problems = _problems(tmp_path, Keeps(sets=False, bound=True))
    assert len(problems) == 2
    assert "file: xattr name user.nnn" in problems[0] and "up to 160" in problems[0]
    assert "link: xattrs on a symlink" in problems[1]
    assert "without feature xattr-sets" in problems[1]


def test_a_set_with_no_store_must_fit_its_backing_xattr(tmp_path):
    """A special file (and, without bound-names, a symlink) has no id to name a store
    file: its sealed set must fit one backing xattr (INLINE_MAX, 3,584 bytes)."""
    _tree(tmp_path)
    tree = tmp_path / "tree"
    os.setxattr(tree / "link", "trusted.big", b"v" * 3600, follow_symlinks=False)
    assert _problems(tmp_path, Keeps(sets=True, bound=True)) == []  # a bound symlink stores it
    (problem,) = _problems(tmp_path, Keeps(sets=True, bound=False))
    assert "link: its xattrs take" in problem and "a symlink keeps its set" in problem
    os.mkfifo(tree / "fifo")
    os.setxattr(tree / "fifo", "trusted.fits", b"v" * 3500, follow_symlinks=False)
    assert _problems(tmp_path, Keeps(sets=True, bound=True)) == []
