"""fsck's quarantine: evidence of what failed a check, kept as it was (layer L5).

`BACKING/.egw-quarantine/<item>/` holds one item per finding that `fsck --repair` took
out of the volume or was about to change:

    object   the backing object itself, moved there unchanged (a file, a directory with
             everything in it, a symlink), or a copy of a file made before a repair
             changed it (a torn tail cut off, orphaned key records cleared)
    target   for a symlink whose target is in the symlink store: a copy of that file
    record   the finding (plaintext path, kind, what it looks like, backing path), as
             JSON sealed with AES-SIV under the name key: the backing store never holds
             a plaintext name

The name starts with `.egw`, so the mount never lists or looks up anything in it, the
re-wrap pass of a rotation skips it, and nothing in it can be reached through the mount:
quarantined ciphertext is never re-tagged or made readable. The only way back is the
operator's `encfs-gw fsck BACKING --export-quarantine DIR` (`export`), which writes
outside the volume a bit-for-bit copy of each item and what of it decrypts (blocks that
authenticate under the file's own id, names, targets), ignoring only the failed binding:
that is the operator's decision to make, never the mount's.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from encfs import backing
from encfs.engine import Volume
from encfs.engine.contents import FileContents
from encfs.errors import IntegrityError, UsageError
from encfs.format import names as fnames
from encfs.format.blocks import FileHeader
from encfs.format.places import LinkRecord, link_aad

QUARANTINE_DIR = fnames.QUARANTINE_DIR
OBJECT = "object"
TARGET = "target"
RECORD = "record"
RECORD_AAD_LABEL = b"EGWQ"


def record_aad(volume_id: bytes, item: str) -> list[bytes]:
    """The AAD of an item's record, sealed under the name key (reencrypt moves it)."""
    return [RECORD_AAD_LABEL, volume_id, item.encode("ascii")]


def _record_aad(volume: Volume, item: str) -> list[bytes]:
    return record_aad(volume.config.volume_id, item)


def _open_area(volume: Volume) -> int:
    with contextlib.suppress(FileExistsError):
        os.mkdir(QUARANTINE_DIR, 0o700, dir_fd=volume.root_fd)
    return os.open(
        QUARANTINE_DIR,
        os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
        dir_fd=volume.root_fd,
    )


def _new_item(volume: Volume, record: dict[str, Any]) -> tuple[int, int, str]:
    """(area fd, item fd, item name) of a new item whose sealed record is written."""
    area = _open_area(volume)
    try:
        name = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(4)
        os.mkdir(name, 0o700, dir_fd=area)
        item = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=area)
    except BaseException:
        os.close(area)
        raise
    try:
        data = json.dumps({**record, "item": name, "time": _now()}).encode()
        sealed = volume.keyring.epoch_keys().name_cipher.seal(data, _record_aad(volume, name))
        backing.write_file_atomic(item, RECORD, sealed, 0o400, temp_prefix=fnames.TEMP_PREFIX)
    except BaseException:
        os.close(item)
        os.close(area)
        raise
    return area, item, name


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def move_in(
    volume: Volume, dir_fd: int, backing_name: str, record: dict[str, Any],
    store_id: bytes | None = None,
) -> str:
    """Move a backing entry, unchanged, into a new quarantine item; return its name.
    `store_id`: the symlink store file of a symlink's target, copied beside it."""
    st = os.stat(backing_name, dir_fd=dir_fd, follow_symlinks=False)
    record = {**record, "action": "moved", "type": _type_name(st.st_mode)}
    area, item, name = _new_item(volume, record)
    try:
        if store_id is not None:
            with contextlib.suppress(OSError):  # (a missing one is part of the finding)
                data = backing.read_small_file(
                    volume.root_fd, fnames.long_symlink_path(store_id),
                    2 * fnames.SYMLINK_TARGET_MAX,
                )
                backing.write_file_atomic(
                    item, TARGET, data, 0o400, temp_prefix=fnames.TEMP_PREFIX
                )
        backing.renameat2(dir_fd, backing_name, item, OBJECT, backing.RENAME_NOREPLACE)
    except BaseException:
        _drop_item(area, item, name)  # nothing was moved: no empty item stays behind
        raise
    try:
        os.fsync(item)
        with contextlib.suppress(OSError):  # (an O_PATH handle of an unreadable directory)
            os.fsync(dir_fd)
    finally:
        os.close(item)
        os.close(area)
    return name


def copy_in(volume: Volume, data_fd: int, record: dict[str, Any]) -> str:
    """Copy a backing file, as it is now, into a new quarantine item (before a repair
    changes it); durable before this returns."""
    area, item, name = _new_item(volume, {**record, "action": "copied", "type": "file"})
    try:
        out = os.open(OBJECT, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o400, dir_fd=item)
        try:
            _copy_fd(data_fd, out)
            os.fsync(out)
        finally:
            os.close(out)
        os.fsync(item)
    except BaseException:
        _drop_item(area, item, name)  # an incomplete copy is no evidence: the repair stops
        raise
    os.close(item)
    os.close(area)
    return name


def _drop_item(area: int, item: int, name: str) -> None:
    """Remove an item that failed while being made, then close both handles."""
    try:
        for entry in os.listdir(item):
            with contextlib.suppress(OSError):
                os.unlink(entry, dir_fd=item)
        with contextlib.suppress(OSError):
            os.rmdir(name, dir_fd=area)
    finally:
        os.close(item)
        os.close(area)


def _copy_fd(source: int, dest: int) -> None:
    size = os.fstat(source).st_size
    offset = 0
    while offset < size:
        try:
            copied = os.copy_file_range(source, dest, size - offset, offset, offset)
        except OSError:  # (no copy_file_range across these filesystems)
            chunk = os.pread(source, min(1 << 20, size - offset), offset)
            copied = len(chunk)
            if copied:
                backing.pwrite_all(dest, chunk, offset)
        if copied == 0:
            break
        offset += copied


def _type_name(mode: int) -> str:
    return {
        stat.S_IFREG: "file",
        stat.S_IFDIR: "directory",
        stat.S_IFLNK: "symlink",
    }.get(stat.S_IFMT(mode), "other")


def items(volume: Volume) -> list[str]:
    """Names of the quarantine items, oldest first."""
    try:
        fd = os.open(QUARANTINE_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                     | os.O_CLOEXEC, dir_fd=volume.root_fd)
    except FileNotFoundError:
        return []
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)


# --- export: the operator's explicit way back -------------------------------------------


@dataclass
class Exported:
    item: str
    record: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def export(volume: Volume, destination: str) -> list[Exported]:
    """Write every quarantine item out of the volume into `destination` (a new or empty
    directory): DEST/<item>/ciphertext/ (the bytes as kept), DEST/<item>/plaintext/ (what
    decrypts, the failed binding ignored), DEST/<item>/finding.json. Reads only."""
    if os.path.lexists(destination) and (
        not os.path.isdir(destination) or os.listdir(destination)
    ):
        raise UsageError(f"{destination} must be a new or empty directory")
    os.makedirs(destination, mode=0o700, exist_ok=True)
    os.chmod(destination, 0o700)
    area = None
    with contextlib.suppress(FileNotFoundError):
        area = os.open(QUARANTINE_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                       | os.O_CLOEXEC, dir_fd=volume.root_fd)
    if area is None:
        return []
    results = []
    try:
        for name in sorted(os.listdir(area)):
            item = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                           dir_fd=area)
            try:
                results.append(_export_item(volume, item, name, os.path.join(destination, name)))
            finally:
                os.close(item)
    finally:
        os.close(area)
    return results


def _export_item(volume: Volume, item: int, name: str, out: str) -> Exported:
    result = Exported(name, {})
    try:
        sealed = backing.read_small_file(item, RECORD)
        opened = volume.keyring.epoch_keys().name_cipher.open(sealed, _record_aad(volume, name))
        result.record = json.loads(opened)
    except (OSError, IntegrityError, ValueError) as exc:
        result.notes.append(f"finding record unreadable: {exc}")
    os.mkdir(out, 0o700)
    os.mkdir(os.path.join(out, "ciphertext"), 0o700)
    os.mkdir(os.path.join(out, "plaintext"), 0o700)
    for entry in (OBJECT, TARGET):
        with contextlib.suppress(FileNotFoundError):
            _copy_raw(item, entry, os.path.join(out, "ciphertext", entry))
    plain_name = os.path.basename(result.record.get("path", "")) or "object"
    plain_path = os.path.join(out, "plaintext", plain_name)
    store_copy = None
    with contextlib.suppress(FileNotFoundError):
        store_copy = backing.read_small_file(item, TARGET, 2 * fnames.SYMLINK_TARGET_MAX)
    try:
        _export_plain(volume, item, OBJECT, plain_path, result.notes, "", store_copy)
    except FileNotFoundError:
        result.notes.append("the item holds no object")
    with open(os.path.join(out, "finding.json"), "w") as f:
        json.dump({**result.record, "export_notes": result.notes}, f, indent=2)
        f.write("\n")
    return result


def _copy_raw(dir_fd: int, name: str, dest: str) -> None:
    """A bit-for-bit copy of a backing entry (recursively; symlinks as symlinks)."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=dir_fd), dest)
    elif stat.S_ISDIR(st.st_mode):
        os.mkdir(dest, 0o700)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dir_fd)
        try:
            for entry in sorted(os.listdir(fd)):
                _copy_raw(fd, entry, os.path.join(dest, entry))
        finally:
            os.close(fd)
    elif stat.S_ISREG(st.st_mode):
        source = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            target = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _copy_fd(source, target)
            finally:
                os.close(target)
        finally:
            os.close(source)


def _export_plain(
    volume: Volume, dir_fd: int, name: str, dest: str, notes: list[str], where: str,
    store_copy: bytes | None = None,
) -> None:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISREG(st.st_mode):
        _export_file(volume, dir_fd, name, dest, notes, where)
    elif stat.S_ISDIR(st.st_mode):
        _export_directory(volume, dir_fd, name, dest, notes, where)
    elif stat.S_ISLNK(st.st_mode):
        try:
            target = _link_target(volume, os.readlink(name, dir_fd=dir_fd), store_copy)
            os.symlink(target, os.fsencode(dest))
        except (OSError, IntegrityError) as exc:
            notes.append(f"{where or '.'}: symlink target does not decrypt: {exc}")


def _export_file(
    volume: Volume, dir_fd: int, name: str, dest: str, notes: list[str], where: str
) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        raw = os.pread(fd, 64, 0)
        if not raw:
            open(os.fsencode(dest), "xb").close()
            return
        try:
            header = FileHeader.unpack(raw)
        except IntegrityError as exc:
            notes.append(f"{where or '.'}: no plaintext (file header: {exc})")
            return
        contents = FileContents(fd, volume.layout, volume.config.volume_id, header.file_id,
                                volume.keyring)
        size = contents.plain_size()
        block_size = volume.layout.block_size
        bad = []
        with open(os.fsencode(dest), "xb") as out:
            for index in range(-(-size // block_size)):
                try:
                    data = contents.read_block(index, size)
                except IntegrityError:
                    bad.append(index)
                    data = bytes(volume.layout.block_plain_length(index, size))
                out.write(data)
        if bad:
            notes.append(
                f"{where or '.'}: blocks {bad} do not authenticate (written as zeros)"
            )
    finally:
        os.close(fd)


def _export_directory(
    volume: Volume, dir_fd: int, name: str, dest: str, notes: list[str], where: str
) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=dir_fd)
    try:
        os.mkdir(os.fsencode(dest), 0o700)
        try:
            dir_id = backing.read_small_file(fd, fnames.DIR_ID_FILE, 64)[: fnames.DIR_ID_SIZE]
        except OSError as exc:
            notes.append(f"{where or '.'}: no directory id ({exc.strerror}): names not decrypted")
            return
        for entry in sorted(os.listdir(fd)):
            if fnames.classify(entry) == "reserved":
                continue
            try:
                plain = volume.plain_name_in(fd, dir_id, entry)
            except (OSError, IntegrityError) as exc:
                notes.append(f"{where}/<backing {entry}>: name does not decrypt: {exc}")
                continue
            if plain is None:
                continue
            child = os.path.join(os.fsencode(dest), plain)
            label = f"{where}/{os.fsdecode(plain)}"
            _export_plain(volume, fd, entry, os.fsdecode(child), notes, label)
    finally:
        os.close(fd)


def _link_target(volume: Volume, cipher_target: str, store_copy: bytes | None) -> bytes:
    """A symlink's target, in whichever encoding (FORMAT.md 5.3), binding ignored."""
    cipher = volume.keyring.epoch_keys().symlink_cipher
    if volume.bound_names:
        link = LinkRecord.decode(cipher_target)
        if not link.stored:
            return cipher.open(link.sealed, link_aad(link.link_id))
        long_id = link.link_id
    else:
        long_id = fnames.long_symlink_id(cipher_target)
        if long_id is None:
            return cipher.open(fnames.b64decode_strict(cipher_target), fnames.symlink_aad())
    sealed = store_copy
    if sealed is None:
        sealed = backing.read_small_file(volume.root_fd, fnames.long_symlink_path(long_id),
                                         2 * fnames.SYMLINK_TARGET_MAX)
    return cipher.open(sealed, fnames.long_symlink_aad(long_id))
