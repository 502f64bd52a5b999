"""Edit a volume config as its key holder does: authenticated, the next generation.

Tests that need a state a real volume reaches only by waiting (an old KEK) or by the
daemon's own writes use this instead of editing the JSON, which the MAC refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from encfs import config_store
from encfs.format.volume import VolumeConfig
from encfs.keys.registry import open_provider
from encfs.trust import Operator, OperatorSpec


def operator_for(keyfile: Path | None) -> Operator:
    """An operator naming `keyfile` (None: the test session's trust store alone), with
    the registry as its provider factory, as the CLI builds one."""
    return Operator(
        [OperatorSpec.keyfile(str(keyfile))] if keyfile else [], factory=open_provider
    )


def trusted() -> Operator:
    """The operator of the test session's trust store (what `init` recorded)."""
    return operator_for(None)


def edit_config(
    backing: Path, keyfile: Path | None, change: Callable[[VolumeConfig], None]
) -> VolumeConfig:
    operator = operator_for(keyfile)
    _, keyring = config_store.unlock(str(backing), operator)
    with config_store.editing(str(backing), keyring, operator) as config:
        change(config)
    return config
