"""The FUSE mount options: the daemon's first, then the user's, in a defined order; the
daemon's own (fsname, subtype) cannot be replaced; only known FUSE options pass (issue 20,
finding 6). A mounted volume's `status` shows the same list (test_control_socket.py)."""

from __future__ import annotations

import pytest

from encfs.daemon.mount import USER_FUSE_OPTIONS, fuse_options
from encfs.errors import UsageError


def test_the_daemons_options_come_first_in_a_fixed_order():
    assert fuse_options("/srv/b", []) == [
        "fsname=/srv/b", "default_permissions", "subtype=encfs-gw",
    ]
    assert fuse_options("/srv/b", ["ro", "allow_other"]) == [
        "fsname=/srv/b", "default_permissions", "subtype=encfs-gw", "ro", "allow_other",
    ]


def test_the_same_input_gives_the_same_list_every_time():
    """A set made the order (and with it which fsname= won) vary from run to run."""
    options = ["noexec", "allow_other", "ro", "nodev", "noatime"]
    first = fuse_options("/srv/b", options)
    assert all(fuse_options("/srv/b", options) == first for _ in range(20))
    assert first[3:] == options


def test_duplicates_are_dropped_and_auto_unmount_only_on_request():
    assert fuse_options("/b", ["ro", "ro", "default_permissions"]).count("ro") == 1
    assert "auto_unmount" not in fuse_options("/b", [])  # a dead mount stays by default
    assert fuse_options("/b", ["auto_unmount"])[-1] == "auto_unmount"


@pytest.mark.parametrize("option", ["fsname=/other/volume", "subtype=other", "fsname="])
def test_the_daemons_own_options_cannot_be_overridden(option):
    with pytest.raises(UsageError, match="set by encfs-gw itself"):
        fuse_options("/srv/b", [option])


@pytest.mark.parametrize("option", ["max_read=1", "blksize=512", "debug", "fd=3", "x"])
def test_unknown_options_are_usage_errors(option):
    with pytest.raises(UsageError, match="unsupported mount option"):
        fuse_options("/srv/b", [option])


def test_every_allowed_option_passes():
    assert fuse_options("/b", list(USER_FUSE_OPTIONS))[3:] == [
        o for o in USER_FUSE_OPTIONS if o != "default_permissions"
    ]


def test_fsname_escapes_commas_and_backslashes():
    assert fuse_options("/a,b\\c", [])[0] == "fsname=/a\\,b\\\\c"

