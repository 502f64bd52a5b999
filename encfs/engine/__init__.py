"""The volume engine (layer L4): the plaintext filesystem over the backing store,
usable without FUSE. `Volume` is its facade; what it is made of is in
docs/dev/ARCHITECTURE.md."""

from encfs.engine.volume import ROOT_INODE, Attr, BindingError, Volume, create_volume

__all__ = ["ROOT_INODE", "Attr", "BindingError", "Volume", "create_volume"]
