"""The two sides of a conversion: the plaintext tree being emptied and the volume being
filled. Finds a path's plaintext directory (an open one of the walk, or opened from the
tree) and its volume directory (made when asked, its plaintext metadata recorded in the
state first), removes a name from either side, and syncs the volume."""

from __future__ import annotations

import os
from dataclasses import dataclass

from encfs.convert.records import State, Steps
from encfs.convert.tree import DIR_FLAGS, RelPath, listdir, metadata_record, open_dir
from encfs.engine import ROOT_INODE, Volume


@dataclass
class Frame:
    """A plaintext directory the walk holds open, with its volume directory's inode."""

    fd: int
    rel: RelPath
    vino: int
    names: list[str]
    key: str | None = None  # the plaintext directory's inode number (state.dirs)
    index: int = 0


class Sides:
    """The plaintext tree (`tree_fd`, `frames`) and the volume, path by path."""

    def __init__(self, tree_fd: int, volume: Volume, state: State, steps: Steps) -> None:
        self.tree_fd = tree_fd
        self.volume = volume
        self.state = state
        self.steps = steps
        self.frames: dict[RelPath, Frame] = {}  # open plaintext directories

    def root_frame(self) -> Frame:
        """The tree's root, open, with one lookup of the volume's root held."""
        self.volume.add_lookup(ROOT_INODE)
        return Frame(os.dup(self.tree_fd), (), ROOT_INODE, listdir(self.tree_fd))

    def record_directory(self, st: os.stat_result) -> str:
        """A plaintext directory's metadata into the state (before anything in it
        changes); its key there."""
        key = str(st.st_ino)
        if key not in self.state.dirs:
            self.state.dirs[key] = metadata_record(st)
            self.state.dirty = True
        return key

    def plain_parent(self, rel: RelPath) -> tuple[int, bool]:
        """(descriptor of the plaintext directory holding `rel`, whether to close it)."""
        frame = self.frames.get(rel[:-1])
        if frame is not None:
            return frame.fd, False
        fd = os.dup(self.tree_fd)
        try:
            for name in rel[:-1]:
                child = os.open(name, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd, True

    def unlink_plain(self, rel: RelPath) -> None:
        try:
            fd, owned = self.plain_parent(rel)
        except FileNotFoundError:
            return
        try:
            self.steps()
            os.unlink(rel[-1], dir_fd=fd)
        except FileNotFoundError:
            pass
        finally:
            if owned:
                os.close(fd)

    def volume_dir(self, rel: RelPath, create: bool) -> int | None:
        """The volume directory for plaintext directory `rel` (one lookup held), made
        (with its plaintext metadata recorded first) when `create`."""
        frame = self.frames.get(rel)
        if frame is not None:
            self.volume.add_lookup(frame.vino)
            return frame.vino
        vino = ROOT_INODE
        self.volume.add_lookup(vino)
        plain_fd = os.dup(self.tree_fd)
        try:
            for name in rel:
                st = os.lstat(name, dir_fd=plain_fd)
                child = open_dir(name, plain_fd)
                os.close(plain_fd)
                plain_fd = child
                try:
                    found = self.volume.lookup(vino, os.fsencode(name)).ino
                except FileNotFoundError:
                    if not create:
                        self.volume.forget(vino, 1)
                        return None
                    found = self.mkdir(vino, name, st)
                self.volume.forget(vino, 1)
                vino = found
            return vino
        finally:
            os.close(plain_fd)

    def mkdir(self, parent_vino: int, name: str, st: os.stat_result) -> int:
        self.record_directory(st)
        self.steps()
        return self.volume.mkdir(parent_vino, os.fsencode(name), 0o700, st.st_uid, st.st_gid).ino

    def remove_from_volume(self, rel: RelPath) -> None:
        try:
            parent = self.volume_dir(rel[:-1], create=False)
        except FileNotFoundError:
            return
        if parent is None:
            return
        try:
            self.steps()
            self.volume.unlink(parent, os.fsencode(rel[-1]))
        except FileNotFoundError:
            pass
        finally:
            self.volume.forget(parent, 1)

    def sync(self) -> None:
        self.steps()
        self.volume.sync()
