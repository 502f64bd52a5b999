"""Offline and online administration of a volume (layer L5, over the engine): KEK
rotation, keyslots, crypto-shredding, fsck and its quarantine, the config upgrade, and
the status report. The CLI runs them offline; the daemon's supervisor runs rotation and
status on a mounted volume."""
