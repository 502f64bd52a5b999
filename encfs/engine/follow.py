"""The engine's in-memory state following a pass that moves backing entries behind it
(layer L4): the name pass of an online `encfs-gw reencrypt` (encfs.admin.reencrypt_names)
renames every backing entry to its name under the new volume key and re-creates every
bound symlink, one directory per step, each synchronous on the daemon's trio thread
between two FUSE requests (the reads that accept both volume key epochs meanwhile are
the keyring's: Keyring.read_epoch_keys).

What follows each step, before the next request is served:
* an inode recorded at a renamed entry is reopened by its new name from now on;
* an open directory handle's listing names the entry by its new backing name (same
  order, same offsets: a listing in progress goes on where it was);
* a known symlink inode stands for the re-created backing symlink; its old handle stays
  open (`Inode.pinned`), so the backing inode number the kernel knows it by is not
  reused while the kernel may ask for it (as a rename of a bound symlink does).

And the pass asks it the last place of each object in the orphan directory
(`orphan_location`), which only this mount knows and the object's bindings name.

Handles stay valid across a rename (O_PATH, directory fds), and nothing else the engine
keeps names a backing entry: the name memo is per volume key epoch, file contents read
their key areas from the backing file at every request.
"""

from __future__ import annotations

import os

from encfs import backing
from encfs.engine.inode import Inode
from encfs.engine.inodes import InodeTable


class EntryFollower:
    """The hooks a name pass calls (encfs.admin.reencrypt_names.NamePass `observer`)."""

    def __init__(self, table: InodeTable) -> None:
        self._table = table
        # re-created symlinks: the new backing inode number -> the inode standing for it
        # (known to the kernel by the old number, so not found by the new one)
        self._rebased: dict[int, Inode] = {}

    def _known(self, st: os.stat_result) -> Inode | None:
        inode = self._rebased.pop(st.st_ino, None) or self._table.inodes.get(
            self._table.fuse_ino(st.st_ino)
        )
        if inode is None or inode.backing_ino != st.st_ino:
            return None
        return inode

    def orphan_location(self, st: os.stat_result) -> tuple[bytes, bytes] | None:
        """The last place (parent id, plain name) of the object in use that the entry
        `st` of the orphan directory stands for (engine/orphans.py), which its bindings
        still name; None for a leftover of a killed mount (or one bound to no place)."""
        # (a symlink this pass re-created is known by its old number)
        inode = self._rebased.get(st.st_ino) or self._table.inodes.get(
            self._table.fuse_ino(st.st_ino)
        )
        if inode is None or inode.backing_ino != st.st_ino or not self._table.is_orphan(inode):
            return None
        return inode.location

    def symlink_replaced(self, dir_fd: int, name: str, old_st: os.stat_result) -> None:
        """The backing symlink `name` in `dir_fd` is a new one now (old_st: the one it
        replaced)."""
        inode = self._known(old_st)
        if inode is None:
            return
        try:
            fd = backing.open_path(name, dir_fd)
        except OSError:
            return
        self._table.follow_replacement(inode, fd)
        self._rebased[inode.backing_ino] = inode

    def directory_moved(self, dir_fd: int, moves: dict[str, str]) -> None:
        """Entries of the backing directory `dir_fd` were renamed (old name -> new)."""
        if not moves:
            return
        parent = self._known(os.fstat(dir_fd))
        if parent is None:
            return  # not in the table: no inode is recorded at a name in it
        for new_name in moves.values():
            try:
                st = os.stat(new_name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            inode = self._known(st)
            if inode is not None and inode.parent_ino == parent.ino and (
                inode.backing_name in moves
            ):
                self._table.name(inode, parent, moves[inode.backing_name])
        for handle in self._table.dirs.values():
            if handle.inode is parent and handle.entries is not None:
                handle.entries = [
                    (plain, moves.get(name, name) if name is not None else None)
                    for plain, name in handle.entries
                ]
