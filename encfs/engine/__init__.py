"""The volume engine (layer L4): the plaintext filesystem over the backing store,
usable without FUSE. `Volume` is its facade; what it is made of is in
docs/dev/ARCHITECTURE.md."""

from encfs.engine.bindings import BindingError
from encfs.engine.create import create_volume
from encfs.engine.inode import ROOT_INODE, Attr
from encfs.engine.rename import RenameRequest
from encfs.engine.volume import Volume

__all__ = ["ROOT_INODE", "Attr", "BindingError", "RenameRequest", "Volume", "create_volume"]
