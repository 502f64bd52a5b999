"""Which commands may open a volume left in an unfinished state (layer L4): a directory
`encfs-gw convert` has not finished converting opens only for `convert`, a volume whose
`reencrypt` pass is unfinished only for `reencrypt` and a mount (which resume it)."""

from __future__ import annotations

import os

from encfs import config_store
from encfs.errors import VolumeBusy
from encfs.format import names as fnames
from encfs.format.volume import VolumeConfig


def unfinished_conversion(backing_path: str) -> VolumeBusy:
    """A directory `encfs-gw convert` has started and not finished holds plaintext and
    half a volume: nothing but `convert` opens it (docs/FORMAT.md section 8)."""
    return VolumeBusy(
        f"{backing_path} is being converted into a volume and the conversion is not "
        f"finished: run encfs-gw convert {backing_path} to finish it"
    )


def unfinished_reencryption(backing_path: str) -> VolumeBusy:
    """A volume whose `encfs-gw reencrypt` pass was interrupted may hold a journal of
    writes not yet replayed: nothing but `reencrypt` and `mount` (which resume it) opens
    it (docs/FORMAT.md 9)."""
    return VolumeBusy(
        f"{backing_path} is being re-encrypted and the pass is not finished: run "
        f"encfs-gw reencrypt {backing_path} to finish it (or mount it: its daemon resumes "
        "it unless it was paused)"
    )


def check_before_keys(backing_path: str, *, converting: bool, reencrypting: bool) -> None:
    """Said before any key provider runs: the conversion's marker, and the (not yet
    authenticated) config's pass record, since the keys may be a new provider's by now;
    `check_config` says it again from the authenticated config."""
    if not converting and os.path.lexists(os.path.join(backing_path, fnames.CONVERT_MARKER)):
        raise unfinished_conversion(backing_path)
    if not reencrypting and config_store.peek(backing_path).reencrypt is not None:
        raise unfinished_reencryption(backing_path)


def check_config(
    backing_path: str, config: VolumeConfig, *, converting: bool, reencrypting: bool
) -> None:
    """The same, from the authenticated config."""
    if config.conversion is not None and not converting:
        raise unfinished_conversion(backing_path)
    if config.reencrypt is not None and not reencrypting:
        raise unfinished_reencryption(backing_path)
