"""The journal of `encfs-gw reencrypt`'s data pass (layer L5; docs/FORMAT.md 9): one batch
of groups (key areas before, with both slots, after; the new block records), MACed under
the current volume key, written before anything in place, replayed after a kill.

Also the pass's test-only crash hook (ENCFS_TESTONLY_REENCRYPT_CRASH_AT), read here only.
"""

from __future__ import annotations

import hmac
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from encfs.format import names as fnames
from encfs.format.blocks import KEY_AREA_SIZE

JOURNAL_DIR = fnames.REENCRYPT_DIR
JOURNAL_FILE = "journal"
JOURNAL_TEMP = "journal.new"
# A batch closes before its entries would pass this size (or BATCH_GROUPS groups): the
# extra space the pass needs is one journal of at most BATCH_BYTES plus its 52 bytes of
# head and MAC, or one group's entry when a group is larger (block size 1 MiB: 32 MiB of
# records, 12 KiB of key areas).
BATCH_BYTES = 8 << 20
BATCH_GROUPS = 256

JOURNAL_MAGIC = b"EGWJ"
JOURNAL_VERSION = 1
_HEAD = struct.Struct(">4sHHQI")  # magic, version, target KEK version, sequence, entries
_ENTRY = struct.Struct(">QQ16sIH")  # st_dev, st_ino, file id, group, path length
_RUN = struct.Struct(">QI")  # first block index, record bytes
JOURNAL_MAC_SIZE = 32
SYNC_THREADS = 4  # fdatasyncs of a batch at a time (sync_files)
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 16

# Test-only: "N:STEP" SIGKILLs this process at STEP of batch N (1-based). Steps, in the
# order of a batch: journal-temp (the journal written, not renamed), journal (renamed
# into place), torn (half of the first group's block records written), in-place (every
# group written, the journal not yet removed); "started" (N ignored): right after the
# config recorded the pass. The name pass's steps (encfs.admin.reencrypt_names) count
# their own occurrences: "N:rename" kills right after the Nth entry was renamed; store (a
# store file re-sealed), dirid, header (a file header valid under both keys), xattrs,
# symlink (replaced, not yet renamed), sidecar (a long name's new sidecar written), rename
# (renamed, its old sidecar not yet removed). Read in one place only.
CRASH_AT_ENV = "ENCFS_TESTONLY_REENCRYPT_CRASH_AT"
CRASH_STEPS = ("started", "journal-temp", "journal", "torn", "in-place")
NAME_CRASH_STEPS = ("store", "dirid", "header", "xattrs", "symlink", "sidecar", "rename")


def crash_at() -> tuple[int, str] | None:
    value = os.environ.get(CRASH_AT_ENV)
    if not value:
        return None
    number, _, step = value.partition(":")
    if step not in CRASH_STEPS + NAME_CRASH_STEPS:
        raise ValueError(f"{CRASH_AT_ENV}: unknown step {step!r}")
    return int(number), step



# --- the journal ---------------------------------------------------------------------------


@dataclass
class GroupEntry:
    """One group of one file in a batch: what its key area must be now, what it becomes,
    and the block records to write."""

    path: str
    dev: int
    ino: int
    file_id: bytes
    group: int
    before: bytes  # the key area as read (the pre-image)
    both: bytes  # old and new slots side by side
    final: bytes  # only the new slots
    # (first block index, records of consecutive blocks): slices of the group's buffer
    runs: list[tuple[int, bytes | memoryview]]

    def size(self) -> int:
        return (
            _ENTRY.size + len(self.path.encode("utf-8", "surrogateescape")) + 3 * KEY_AREA_SIZE
            + 2 + sum(_RUN.size + len(records) for _, records in self.runs)
        )


def journal_parts(target: int, sequence: int, entries: list[GroupEntry]) -> list:
    """The journal's body (head and entries, no MAC) as pieces, the block records as the
    entries hold them: written with writev and MACed piece by piece, never joined."""
    parts: list[bytes | memoryview] = [
        _HEAD.pack(JOURNAL_MAGIC, JOURNAL_VERSION, target, sequence, len(entries))
    ]
    for entry in entries:
        path = entry.path.encode("utf-8", "surrogateescape")
        parts += [
            _ENTRY.pack(entry.dev, entry.ino, entry.file_id, entry.group, len(path)), path,
            entry.before, entry.both, entry.final, struct.pack(">H", len(entry.runs)),
        ]
        for first, records in entry.runs:
            parts += [_RUN.pack(first, len(records)), records]
    return parts


def encode_journal(target: int, sequence: int, entries: list[GroupEntry], mac: Callable) -> bytes:
    """The journal as one bytes object (what write_journal writes)."""
    body = b"".join(journal_parts(target, sequence, entries))
    return body + mac(body)


def write_journal(
    dir_fd: int, target: int, sequence: int, entries: list[GroupEntry], mac: Callable
) -> int:
    """JOURNAL_TEMP in `dir_fd` written from the entries' buffers and fsynced (not yet
    renamed into place). Returns its size. The previous batch's journal, renamed back to
    JOURNAL_TEMP once settled, is overwritten in place and cut to size: its blocks are
    allocated already (no allocation, and no discard of freed blocks, per batch)."""
    parts = journal_parts(target, sequence, entries)
    parts.append(mac(*parts))
    fd = os.open(JOURNAL_TEMP, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dir_fd)
    try:
        size = write_parts(fd, parts)
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


def write_parts(fd: int, parts: list) -> int:
    """All of `parts`, in order, at the file's position: writev of at most IOV_MAX
    pieces a call, a short write resumed where it stopped. Returns the bytes written."""
    pending = [memoryview(part).cast("B") for part in parts if len(part)]
    total = start = 0
    while start < len(pending):
        written = os.writev(fd, pending[start : start + _IOV_MAX])
        total += written
        while start < len(pending) and written >= len(pending[start]):
            written -= len(pending[start])
            start += 1
        if written:
            pending[start] = pending[start][written:]
    return total


def decode_journal(data: bytes, target: int, mac: Callable) -> list[GroupEntry] | None:
    """The entries of an authentic, complete journal for this pass; None otherwise (a
    batch that never became the journal, or one altered: the data in place was not
    touched on its behalf)."""
    if len(data) < _HEAD.size + JOURNAL_MAC_SIZE:
        return None
    body, tag = data[:-JOURNAL_MAC_SIZE], data[-JOURNAL_MAC_SIZE:]
    if not hmac.compare_digest(mac(body), tag):
        return None
    magic, version, journal_target, _, count = _HEAD.unpack_from(body)
    if magic != JOURNAL_MAGIC or version != JOURNAL_VERSION or journal_target != target:
        return None
    entries, offset = [], _HEAD.size
    try:
        for _ in range(count):
            dev, ino, file_id, group, path_length = _ENTRY.unpack_from(body, offset)
            offset += _ENTRY.size
            path = body[offset : offset + path_length].decode("utf-8", "surrogateescape")
            offset += path_length
            areas = [body[offset + i * KEY_AREA_SIZE : offset + (i + 1) * KEY_AREA_SIZE]
                     for i in range(3)]
            offset += 3 * KEY_AREA_SIZE
            (run_count,) = struct.unpack_from(">H", body, offset)
            offset += 2
            runs = []
            for _ in range(run_count):
                first, length = _RUN.unpack_from(body, offset)
                offset += _RUN.size
                runs.append((first, body[offset : offset + length]))
                offset += length
            entries.append(GroupEntry(path, dev, ino, file_id, group, *areas, runs))
    except struct.error:
        return None
    return entries if offset == len(body) else None



def read_all(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)



class Settler:
    """At most one batch settling (made durable in place, its journal removed) on a
    thread of its own while the pass reads and seals the next batch: the thread waits on
    the disk (fdatasync), the pass keeps the CPU. The next batch's journal is written only
    after `wait()`: there is never more than one journal, and a batch's files are synced
    before its journal goes. An error of the thread is raised by the next `wait()`."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, settle: Callable[[], None]) -> None:
        self.wait()
        thread = threading.Thread(
            target=self._run, args=(settle,), name="reencrypt-settle", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # no thread to be had (a limit): settle here, in order
            settle()
            return
        self._thread = thread

    def _run(self, settle: Callable[[], None]) -> None:
        try:
            settle()
        except BaseException as exc:  # raised again by wait()
            self._error = exc

    def wait(self, raise_error: bool = True) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error


def sync_files(fds: list[int]) -> None:
    """fdatasync of every descriptor, up to SYNC_THREADS at a time (the calling thread
    and short-lived helpers that only wait on the disk): a batch holds a file per small
    file, and the device's cache flushes of concurrent fdatasyncs are merged where one
    after the other each waits for its own. Raises the first error once all are done."""
    pending = iter(fds)
    lock = threading.Lock()
    errors: list[OSError] = []

    def work() -> None:
        while True:
            with lock:
                fd = next(pending, None)
            if fd is None:
                return
            try:
                os.fdatasync(fd)
            except OSError as exc:
                errors.append(exc)

    helpers = []
    for _ in range(min(SYNC_THREADS, len(fds)) - 1):
        helper = threading.Thread(target=work, name="reencrypt-sync", daemon=True)
        try:
            helper.start()
        except RuntimeError:  # no thread to be had: fewer at a time
            break
        helpers.append(helper)
    work()
    for helper in helpers:
        helper.join()
    if errors:
        raise errors[0]
