"""The walk over the staged tree and its batches. Depth first, files are queued into a
batch (bounded by units, bytes and the length of their names in the state); a batch
commits in order: named in the state, converted and verified, the volume synced, marked
verified, its plaintext unlinked, synced again, forgotten. Directories whose entries are
all done are finished with it (metadata, then the empty plaintext directory removed). A
batch that fails before it is verified is undone, and the batch a crash left is resolved
before the walk."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable

from encfs.convert.plan import BATCH_BYTES, BATCH_PATH_BYTES, BATCH_UNITS
from encfs.convert.records import State
from encfs.convert.report import Progress
from encfs.convert.sides import Frame, Sides
from encfs.convert.transfer import Transfer, Unit
from encfs.convert.tree import (
    RelPath,
    decode_rel,
    encode_rel,
    is_kept_xattr,
    listdir,
    open_dir,
    read_xattrs,
)
from encfs.errors import EncfsError, NotEnoughSpace

log = logging.getLogger(__name__)


class Walker:
    """Converts the staged tree batch by batch and keeps the peak of extra space taken."""

    def __init__(
        self,
        real: str,
        state: State,
        sides: Sides,
        transfer: Transfer,
        links: dict[int, list[RelPath]],
        progress: Progress,
        free_at_start: int,
        free_bytes: Callable[[], int],
        on_progress: Callable[[Progress], None] | None,
    ) -> None:
        self.real = real
        self.state = state
        self.sides = sides
        self.volume = sides.volume
        self.steps = sides.steps
        self.transfer = transfer
        self.links = links  # the plan's hard-link groups: ino -> its names here
        self.progress = progress
        self.free_bytes = free_bytes
        self.on_progress = on_progress
        self.free_at_start = free_at_start  # before the marker: the peak counts from it
        self.peak_extra = 0
        self.batch: list[Unit] = []
        self.batch_inodes: set[int] = set()
        self.batch_bytes = self.batch_path_bytes = 0
        self.finishing: list[tuple[Frame, Frame]] = []  # (parent, directory) to finish

    def resolve_inflight(self) -> None:
        """Verified and synced: finish unlinking its plaintext. Not yet: its encrypted
        copies are not trusted: remove them (the plaintext is all there)."""
        state = self.state
        if state.inflight is None:
            return
        units = [[decode_rel(p) for p in unit] for unit in state.inflight["units"]]
        if state.inflight["verified"]:
            for unit in units:
                for rel in unit:
                    self.sides.unlink_plain(rel)
            self.sides.sync()
        else:
            for unit in units:
                for rel in unit:
                    self.sides.remove_from_volume(rel)
            self.sides.sync()
        state.inflight = None
        state.save()

    def walk(self) -> None:
        """Depth first. A directory whose entries are all queued waits in the batch too:
        it is finished (metadata, then its plaintext removed) when the batch commits."""
        root = self.sides.root_frame()
        stack = [root]
        self.sides.frames[()] = root
        try:
            while stack:
                frame = stack[-1]
                if frame.index < len(frame.names):
                    name = frame.names[frame.index]
                    frame.index += 1
                    try:
                        st = os.lstat(name, dir_fd=frame.fd)
                    except FileNotFoundError:
                        continue  # another name of a hard-linked file converted before
                    if stat.S_ISDIR(st.st_mode):
                        child = self._enter(frame, name, st)
                        stack.append(child)
                        self.sides.frames[child.rel] = child
                    elif st.st_ino not in self.batch_inodes:
                        self._queue(frame, name, st)
                    continue
                stack.pop()
                if not stack:
                    self._commit()
                    break
                self.finishing.append((stack[-1], frame))
                if len(self.finishing) >= BATCH_UNITS:
                    self._commit()
        finally:
            for frame in self.sides.frames.values():
                os.close(frame.fd)
            self.sides.frames.clear()
            self.finishing.clear()

    def _enter(self, parent: Frame, name: str, st: os.stat_result) -> Frame:
        key = self.sides.record_directory(st)  # before anything in it changes
        fd = open_dir(name, parent.fd)
        try:
            try:
                vino = self.volume.lookup(parent.vino, os.fsencode(name)).ino
            except FileNotFoundError:
                vino = self.sides.mkdir(parent.vino, name, st)
            return Frame(fd, (*parent.rel, name), vino, listdir(fd), key)
        except BaseException:
            os.close(fd)
            raise

    def _leave(self, parent: Frame, frame: Frame) -> None:
        """A directory whose entries are all converted: its metadata onto the volume's,
        then its (empty) plaintext directory goes."""
        assert frame.key is not None
        name = frame.rel[-1]
        meta = self.state.dirs[frame.key]
        for xname, value in read_xattrs(parent.fd, name):
            if is_kept_xattr(xname):
                self.steps()
                self.volume.setxattr(frame.vino, xname, value)
        self.transfer.set_metadata(frame.vino, meta, symlink=False)
        self.steps()
        os.rmdir(name, dir_fd=parent.fd)
        del self.state.dirs[frame.key]
        self.state.dirty = True

    def _queue(self, frame: Frame, name: str, st: os.stat_result) -> None:
        paths = [(*frame.rel, name)]
        if st.st_nlink > 1:
            paths = self.links.get(st.st_ino, paths)
            here = (*frame.rel, name)
            paths = [here] + [p for p in paths if p != here]
        data = min(st.st_size, st.st_blocks * 512) if stat.S_ISREG(st.st_mode) else 0
        unit = Unit(paths, st, data)
        path_bytes = sum(len(encode_rel(p)) for p in paths)
        if self.batch and (
            len(self.batch) >= BATCH_UNITS
            or self.batch_bytes + data > BATCH_BYTES
            or self.batch_path_bytes + path_bytes > BATCH_PATH_BYTES
        ):
            self._commit()
        self.batch.append(unit)
        self.batch_inodes.add(st.st_ino)
        self.batch_bytes += data
        self.batch_path_bytes += path_bytes

    # --- one batch: convert, verify, sync, commit, unlink the plaintext --------------------
    def _commit(self) -> None:
        if self.batch:
            self._commit_units()
        self.state.save_if_dirty()  # every directory record durable before one changes
        for parent, frame in self.finishing:
            self._leave(parent, frame)
            del self.sides.frames[frame.rel]
            os.close(frame.fd)
            self.volume.forget(frame.vino, 1)
        self.finishing.clear()
        if self.on_progress is not None:
            self.on_progress(self.progress)

    def _commit_units(self) -> None:
        batch, self.batch = self.batch, []
        self.batch_inodes = set()
        self.batch_bytes = self.batch_path_bytes = 0
        state = self.state
        state.inflight = {
            "units": [[encode_rel(p) for p in unit.paths] for unit in batch],
            "verified": False,
        }
        state.save()
        done: Counter[str] = Counter()
        try:
            for unit in batch:
                self.transfer.convert_unit(unit, done)
            self.sides.sync()  # the encrypted copies are durable before any plaintext goes
        except BaseException as exc:
            if isinstance(exc, Exception):
                self._undo(batch)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NotEnoughSpace(
                    f"{self.real}: the filesystem filled up while converting; what was in "
                    "flight is plaintext again: make room and run convert again"
                ) from None
            raise
        state.inflight["verified"] = True
        state.done.update(done)
        state.save()
        # the most this conversion has taken beyond the plaintext: now, before it goes
        self.peak_extra = max(self.peak_extra, self.free_at_start - self.free_bytes())
        for unit in batch:
            for rel in unit.paths:
                self.sides.unlink_plain(rel)
        self.sides.sync()  # the unlinks are durable before the state forgets the batch
        state.inflight = None
        state.dirty = True
        self.progress.files_done += sum(len(u.paths) for u in batch)
        self.progress.bytes_done += done["bytes"]

    def _undo(self, batch: list[Unit]) -> None:
        """A batch that failed before it was verified: its encrypted copies go."""
        try:
            for unit in batch:
                for rel in unit.paths:
                    self.sides.remove_from_volume(rel)
            self.state.inflight = None
            self.state.save()
        except (OSError, EncfsError) as exc:
            log.warning("could not remove the copies of a failed batch (next run will): %s", exc)
