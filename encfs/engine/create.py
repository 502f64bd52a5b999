"""Making a new volume (layer L4): its directory, its first config and keyslot (config_store),
the operator's trust entry, and the root directory's id record.

A failed `create_volume` leaves nothing behind: not the directory, not the key file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any

from encfs import config_store
from encfs.engine.bindings import root_dir_record
from encfs.engine.names import write_atomic
from encfs.errors import UsageError, VolumeExists
from encfs.format import names as fnames
from encfs.format.blocks import Layout
from encfs.format.volume import VolumeConfig
from encfs.keys.provider import KeyProvider
from encfs.trust import Operator


def create_volume(
    backing_path: str,
    provider: KeyProvider,
    block_size: int,
    operator: Operator,
    conversion: dict[str, Any] | None = None,
) -> VolumeConfig:
    """Make a new volume in an empty (or new) directory; the directory is made 0700.

    The provider's options go to the operator's trust store (never into the backing
    directory), with the volume key's check value and the first config generation.
    `conversion`: `encfs-gw convert` makes it (its marker and staging may be there; the
    config records the unfinished conversion, which only convert opens).
    """
    try:
        Layout(block_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    made_directory = False
    if os.path.lexists(backing_path):
        if not os.path.isdir(backing_path):
            raise UsageError(f"{backing_path} exists and is not a directory")
        if os.path.exists(os.path.join(backing_path, fnames.CONFIG_FILE)):
            raise VolumeExists(f"{backing_path} already holds an encfs-gw volume")
        keep = {fnames.CONVERT_MARKER, fnames.CONVERT_DIR} if conversion else set()
        if set(os.listdir(backing_path)) - keep:
            raise UsageError(f"{backing_path} is not empty; a volume needs an empty directory")
    provider.prepare_new()  # may refuse (an existing key file): before anything is made
    try:
        try:
            if not os.path.lexists(backing_path):
                os.makedirs(backing_path, mode=0o700)
                made_directory = True
            os.chmod(backing_path, 0o700)
        except OSError as exc:  # e.g. under /proc, on a read-only filesystem
            raise UsageError(
                f"cannot create the volume in {backing_path}: {exc.strerror}"
            ) from None
        try:
            return _write_new_volume(backing_path, provider, block_size, operator, conversion)
        except OSError as exc:
            raise UsageError(f"cannot write the volume in {backing_path}: {exc.strerror}") from None
    except BaseException:
        # A failed init leaves nothing behind: not the directory, not the key file.
        if made_directory:
            shutil.rmtree(backing_path, ignore_errors=True)
        else:
            for name in (fnames.CONFIG_FILE, fnames.DIR_ID_FILE):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(backing_path, name))
        provider.discard_new()
        raise


def _write_new_volume(
    backing_path: str,
    provider: KeyProvider,
    block_size: int,
    operator: Operator,
    conversion: dict[str, Any] | None,
) -> VolumeConfig:
    config, keyring = config_store.new_config(provider, block_size)
    config.conversion = conversion  # under the config's MAC, not bound into the keys
    (protector,) = config.kek_versions[1].protectors
    operator.resolve_new(backing_path)
    operator.vouch(protector.id, provider.name, provider.options)
    # The operator's record first: a volume whose trust entry could not be written would
    # need --keyfile at every mount, so it is not made at all.
    operator.accept(config, keyring.volume_key_check())
    try:
        dir_fd = os.open(
            backing_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        )
        try:
            write_atomic(dir_fd, fnames.DIR_ID_FILE, root_dir_record(config, keyring), 0o400)
        finally:
            os.close(dir_fd)
        config_store.write_new(backing_path, config, keyring)
    except BaseException:
        operator.forget(config.volume_id.hex())
        raise
    finally:
        keyring.close()
    return config
