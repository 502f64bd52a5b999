"""The FUSE adapter (layer L5): the only place that imports pyfuse3 besides mount."""
