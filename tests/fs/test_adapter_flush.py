"""FLUSH is refused with ENOSYS once, so the kernel stops sending it (fc->no_flush)."""

from __future__ import annotations

import errno
import os

import pyfuse3
import pytest
import trio

from encfs.engine import ROOT_INODE
from encfs.fuse.operations import Operations


def test_flush_answers_enosys_and_leaves_the_data_alone(vol):
    ops = Operations(vol)
    fh, _ = vol.create(ROOT_INODE, b"f", 0o100644, os.O_RDWR, 0, 0)
    vol.write(fh, 0, b"kept")
    with pytest.raises(pyfuse3.FUSEError) as caught:
        trio.run(ops.flush, fh)
    assert caught.value.errno == errno.ENOSYS
    assert vol.read(fh, 0, 10) == b"kept"
    vol.release(fh)
