"""encfs gateway: a transparent encrypting FUSE storage gateway."""

__version__ = "0.1.0"
