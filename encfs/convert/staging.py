"""The staging directory DIR/.egw-convert.d: made and flocked (which keeps other converts
out), the plaintext tree moved into it (renames only), its state opened or started, and at
the end removed (the tree first, the state last)."""

from __future__ import annotations

import fcntl
import os

from encfs.convert.records import STATE, TREE, State, Steps
from encfs.convert.tree import DIR_FLAGS, exists, listdir
from encfs.errors import VolumeBusy
from encfs.format import names as fnames


class Staging:
    """DIR/.egw-convert.d and the descriptors it holds open (itself and its tree)."""

    def __init__(self, real: str, dir_fd: int, steps: Steps) -> None:
        self.real = real
        self.dir_fd = dir_fd
        self.steps = steps
        self.conv_fd = -1
        self.tree_fd = -1
        self.state: State | None = None

    def open(self) -> bool:
        """Open (make) DIR/.egw-convert.d; False once it is gone (only the end is left)."""
        config_there = exists(fnames.CONFIG_FILE, self.dir_fd)
        if not exists(fnames.CONVERT_DIR, self.dir_fd):
            if config_there:
                return False
            self.steps()
            os.mkdir(fnames.CONVERT_DIR, 0o700, dir_fd=self.dir_fd)
        self.lock()
        if not exists(TREE, self.conv_fd):
            if config_there:  # the tree was removed: only the state is left to remove
                self.remove()
                return False
            self.steps()
            os.mkdir(TREE, 0o700, dir_fd=self.conv_fd)
        self.tree_fd = os.open(TREE, DIR_FLAGS, dir_fd=self.conv_fd)
        where = f"{self.real}/{fnames.CONVERT_DIR}/{STATE}"
        self.state = State.load(self.conv_fd, self.steps, where)
        if self.state is None:
            self.state = State(self.conv_fd, self.steps)
            self.state.save()
        return True

    def lock(self) -> None:
        """From here the staging directory's flock keeps other converts out and DIR's
        own goes (the volume config is written under an flock on DIR, as for every
        volume)."""
        if self.conv_fd >= 0:
            return
        self.conv_fd = os.open(fnames.CONVERT_DIR, DIR_FLAGS, dir_fd=self.dir_fd)
        try:
            fcntl.flock(self.conv_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VolumeBusy(f"{self.real} is being converted by another convert") from None
        fcntl.flock(self.dir_fd, fcntl.LOCK_UN)

    def stage(self) -> None:
        """Move every top-level entry into the staging tree (renames: no data copied)."""
        assert self.state is not None
        for name in listdir(self.dir_fd):
            if name in (fnames.CONVERT_MARKER, fnames.CONVERT_DIR):
                continue
            self.steps()
            os.rename(name, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.tree_fd)
        os.fsync(self.tree_fd)
        os.fsync(self.dir_fd)
        self.state.phase = "creating"
        self.state.save()

    def remove(self) -> None:
        """The tree is empty: the staging directory goes (state last)."""
        assert self.state is not None or self.conv_fd >= 0
        if self.tree_fd >= 0:
            os.close(self.tree_fd)
            self.tree_fd = -1
            self.steps()
            os.rmdir(TREE, dir_fd=self.conv_fd)  # fails if anything is left in it
        for name in os.listdir(self.conv_fd):
            self.steps()
            os.unlink(name, dir_fd=self.conv_fd)
        os.close(self.conv_fd)
        self.conv_fd = -1
        self.steps()
        os.rmdir(fnames.CONVERT_DIR, dir_fd=self.dir_fd)
        os.fsync(self.dir_fd)

    def close(self) -> None:
        for fd in (self.tree_fd, self.conv_fd):
            if fd >= 0:
                os.close(fd)
        self.tree_fd = self.conv_fd = -1
