"""The parts of a volume that a change of its namespace works on (layer L4): what
making and removing entries (entries.py) and moving them (rename.py) both hold."""

from __future__ import annotations

from dataclasses import dataclass

from encfs.engine.bindings import Bindings
from encfs.engine.inodes import InodeTable
from encfs.engine.names import Names
from encfs.engine.orphans import Orphans
from encfs.engine.symlinks import Symlinks
from encfs.engine.xattrs import Xattrs


@dataclass(frozen=True, eq=False)
class Namespace:
    """The inode table, the name cipher, the header bindings and the long-symlink store
    of one volume; `xattrs` too, since an object's xattr store file goes with its last
    name (removed, or replaced by a rename); `orphans`, where an open object's last name
    goes instead of being removed. `bound`: names and records are bound to their place
    (feature bound-names)."""

    inodes: InodeTable
    names: Names
    bindings: Bindings
    symlinks: Symlinks
    xattrs: Xattrs
    orphans: Orphans
    bound: bool
