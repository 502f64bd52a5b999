"""Rename in three steps (layer L4; docs/FORMAT.md section 4): make every moved object
valid at its old and its new place, rename in the backing store, then valid at the new
place only.

A crash between the steps leaves objects valid where they are. The fsyncs a directory's
rename needs between the steps are the caller's (the FUSE adapter runs them off the
request loop); `Volume.rename` runs all of it in one call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from encfs import backing
from encfs.engine.bindings import BindingError, Location, rewrite_header
from encfs.engine.inode import Inode, oserror
from encfs.engine.names import is_empty_dir, remove_tree, temp_name
from encfs.engine.namespace import Namespace
from encfs.engine.symlinks import Symlinks
from encfs.format import names as fnames
from encfs.format import places
from encfs.format.places import DirRecord, LinkRecord

log = logging.getLogger(__name__)


def _own_whiteout(parent: Inode, backing_name: str, owner: tuple[int, int] | None) -> None:
    """Give the whiteout a rename left the caller's ownership (ext4 makes it with the
    caller's fsuid and fsgid, or the parent's group under a setgid parent). Best effort:
    the rename has happened; a failure is logged, not passed on."""
    if owner is None or os.geteuid() != 0:
        return
    uid, gid = owner
    try:
        parent_st = os.fstat(parent.fd)
        if parent_st.st_mode & stat.S_ISGID:
            gid = parent_st.st_gid
        os.chown(backing_name, uid, gid, dir_fd=parent.fd, follow_symlinks=False)
    except OSError as exc:
        log.warning("cannot give a whiteout its owner: %s", exc.strerror)


@dataclass(eq=False)
class _Move:
    """One object moved by a backing rename, and how its binding follows it."""

    st: os.stat_result  # the object, before the rename
    parent: Inode  # where it is before the rename
    backing_name: str
    old_location: Location
    new_parent: Inode  # where it goes
    new_backing: str
    new_location: Location
    final: bool = True  # step 3 wanted (not for a directory about to be removed)
    fd: int | None = None  # file: O_PATH handle; directory: its id record, O_RDWR
    record: DirRecord | LinkRecord | None = None  # as it was before the rename
    current: tuple[Inode, str] | None = None  # where its backing object is now


@dataclass(frozen=True)
class RenameRequest:
    """One rename(2) or renameat2(2) as the kernel asks it: the entry `old_name` in
    directory `old_parent_ino` to `new_name` in `new_parent_ino`, with its RENAME_* flags.
    `owner`: the caller's (uid, gid), given to the whiteout a RENAME_WHITEOUT leaves."""

    old_parent_ino: int
    old_name: bytes
    new_parent_ino: int
    new_name: bytes
    flags: int = 0
    owner: tuple[int, int] | None = None


@dataclass(eq=False)
class PendingRename:
    """A rename between its stages (`Volume.rename_begin`)."""

    moves: list[_Move]
    rename: Callable[[], None]
    clean_up: Callable[[], None] | None = None
    renamed: bool = False
    held: list[Inode] = field(default_factory=list)  # their handles kept open until `end`
    durable: bool = True  # False: the fsync after the backing rename failed

    @property
    def sync_before(self) -> list[int]:
        """Descriptors to fsync before the backing rename: the id records of moved
        directories (a power loss must not keep the rename and lose their new place)."""
        return [m.fd for m in self.moves if isinstance(m.record, DirRecord) and m.fd is not None]

    def sync_after(self) -> list[int]:
        """Descriptors to fsync after it (the parents, when a directory moved), so that
        step 3 never outlives the rename. A parent the daemon cannot read is an O_PATH
        handle, whose fsync fails: the caller then skips step 3 for directories."""
        if not self.sync_before:
            return []
        parents = {}
        for move in self.moves:
            parents[move.parent.ino] = move.parent.fd
            parents[move.new_parent.ino] = move.new_parent.fd
        return list(parents.values())

    def not_durable(self, exc: OSError) -> None:
        """The fsync of `sync_after()` failed: the rename stands, but step 3 is skipped
        for directories (`Volume.rename_finish`)."""
        log.debug("cannot make a directory rename durable: %s", exc)
        self.durable = False


class Renames:
    """The rename protocol of one volume."""

    def __init__(self, namespace: Namespace) -> None:
        self._ns = namespace

    def begin(self, request: RenameRequest) -> PendingRename | None:
        """Check a rename and make every object it moves valid at both places (step 1);
        None if there is nothing to do.

        RENAME_WHITEOUT (overlayfs, fsstress) is done as ext4 does it, by the backing
        filesystem itself: its renameat2 leaves a whiteout, a character device 0/0, at
        the old backing name in the same atomic step, and that name (with its long-name
        sidecar) decodes to the old plaintext name like any device node's. A backing
        filesystem without whiteouts refuses the rename (EINVAL): never a rename that
        silently leaves none. The whiteout is made by us (root), so it is given
        `request.owner`, the caller's (uid, gid) (the parent's group under a setgid
        parent), as ext4 gives it the caller's."""
        old_parent = self._ns.inodes.directory(request.old_parent_ino)
        new_parent = self._ns.inodes.directory(request.new_parent_ino)
        held: list[Inode] = []
        try:
            pending = self._plan(request, old_parent, new_parent, held)
        except BaseException:
            self._ns.inodes.unhold(held)
            raise
        if pending is None:
            self._ns.inodes.unhold(held)
        else:
            pending.held = held
        return pending

    def _known(self, st: os.stat_result) -> Inode | None:
        """The known inode of the backing object `st` describes, if any."""
        inode = self._ns.inodes.inodes.get(self._ns.inodes.fuse_ino(st.st_ino))
        return inode if inode is not None and inode.backing_ino == st.st_ino else None

    def _plan(
        self, request: RenameRequest, old_parent: Inode, new_parent: Inode, held: list[Inode]
    ) -> PendingRename | None:
        old_name, new_name, flags = request.old_name, request.new_name, request.flags
        whiteout = flags & backing.RENAME_WHITEOUT
        known = backing.RENAME_NOREPLACE | backing.RENAME_EXCHANGE | backing.RENAME_WHITEOUT
        if flags & ~known or (whiteout and flags & backing.RENAME_EXCHANGE):
            raise oserror(errno.EINVAL)  # (as the kernel, which refuses both before us)
        names = self._ns.names
        # whichever backing name each has (during a re-encryption: maybe the old epoch's)
        old_backing, old_encoded = names.resolve(old_parent, old_name)
        new_backing, new_encoded = names.resolve(new_parent, new_name)
        old_st = os.stat(old_backing, dir_fd=old_parent.fd, follow_symlinks=False)
        try:
            new_st = os.stat(new_backing, dir_fd=new_parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            new_st = None
        # Their handles stay open through the stages (issue 23: handles are evicted):
        # the parents' go to fsync threads, the moved and replaced objects' are what
        # their inodes keep (a removed one, a bound symlink's first one).
        held += self._ns.inodes.hold(
            old_parent, new_parent, self._known(old_st), new_st and self._known(new_st)
        )
        old_location = names.location(old_parent, old_name)
        new_location = names.location(new_parent, new_name)
        forth = _Move(old_st, old_parent, old_backing, old_location, new_parent, new_backing,
                      new_location)

        def exchange() -> None:
            backing.renameat2(
                old_parent.fd, old_backing, new_parent.fd, new_backing, backing.RENAME_EXCHANGE
            )

        if flags & backing.RENAME_EXCHANGE:
            if new_st is None:
                raise oserror(errno.ENOENT)
            names.write_sidecar(new_parent, new_backing, new_encoded)
            names.write_sidecar(old_parent, old_backing, old_encoded)
            back = _Move(new_st, new_parent, new_backing, new_location, old_parent, old_backing,
                         old_location)
            return self._prepare([forth, back], exchange)
        if new_st is not None:
            if flags & backing.RENAME_NOREPLACE:
                raise oserror(errno.EEXIST)
            if old_st.st_ino == new_st.st_ino:
                return None  # same object (hard links to one file): POSIX says do nothing
            if stat.S_ISDIR(new_st.st_mode):
                if not stat.S_ISDIR(old_st.st_mode):
                    raise oserror(errno.EISDIR)
                if not is_empty_dir(new_parent.fd, new_backing):
                    raise oserror(errno.ENOTEMPTY)
                # Swap atomically (the replaced directory bound to the old place for that
                # instant), then remove the (empty) directory that was replaced.
                back = _Move(new_st, new_parent, new_backing, new_location, old_parent,
                             old_backing, old_location, final=False)

                def remove_replaced() -> None:
                    aside = self._ns.orphans.set_aside(old_parent, old_backing, new_st, whiteout)
                    if aside is not None:  # open: removed when it is closed
                        if whiteout:
                            _own_whiteout(old_parent, old_backing, request.owner)
                        else:
                            names.remove_sidecar(old_parent, old_backing)
                        owner_set = self._ns.xattrs.last_name_set(*aside, new_st)
                        self._ns.xattrs.discard_after(owner_set, new_st)
                        return
                    tmp = temp_name()
                    self._ns.inodes.unname_at(old_parent, old_backing, new_st)
                    # With RENAME_WHITEOUT the whiteout takes the old name in this step.
                    backing.renameat2(
                        old_parent.fd, old_backing, old_parent.fd, tmp,
                        backing.RENAME_NOREPLACE | whiteout,
                    )
                    if whiteout:
                        _own_whiteout(old_parent, old_backing, request.owner)
                    else:
                        names.remove_sidecar(old_parent, old_backing)
                    replaced_st = os.stat(tmp, dir_fd=old_parent.fd, follow_symlinks=False)
                    xattr_set = self._ns.xattrs.last_name_set(old_parent.fd, tmp, replaced_st)
                    remove_tree(old_parent.fd, tmp)
                    self._ns.xattrs.discard_after(xattr_set, replaced_st)

                return self._prepare([forth, back], exchange, remove_replaced)
            if stat.S_ISDIR(old_st.st_mode):
                raise oserror(errno.ENOTDIR)
        replaced_long_id = (
            None
            if new_st is None
            else self._ns.symlinks.last_stored_link(new_parent.fd, new_backing, new_st)
        )
        replaced_set = (
            None
            if new_st is None
            else self._ns.xattrs.last_name_set(new_parent.fd, new_backing, new_st)
        )
        names.write_sidecar(new_parent, new_backing, new_encoded)

        linked_aside = [False]  # the replaced object is in use: kept in the orphan directory

        def rename() -> None:
            replacing = self._ns.orphans.replacing(new_parent, new_backing)
            with replacing if new_st else contextlib.nullcontext(False) as aside:
                linked_aside[0] = aside
                if not whiteout:
                    os.rename(
                        old_backing, new_backing,
                        src_dir_fd=old_parent.fd, dst_dir_fd=new_parent.fd,
                    )
                    return
                backing.renameat2(
                    old_parent.fd, old_backing, new_parent.fd, new_backing, whiteout
                )
            _own_whiteout(old_parent, old_backing, request.owner)

        def clean_up() -> None:
            if not whiteout and (old_parent.ino, old_backing) != (new_parent.ino, new_backing):
                names.remove_sidecar(old_parent, old_backing)
            if replaced_long_id is not None and not linked_aside[0]:
                self._ns.symlinks.remove_stored(replaced_long_id)
            if new_st is not None:
                self._ns.xattrs.discard_after(replaced_set, new_st)

        return self._prepare([forth], rename, clean_up)

    def _prepare(
        self,
        moves: list[_Move],
        rename: Callable[[], None],
        clean_up: Callable[[], None] | None = None,
    ) -> PendingRename:
        pending = PendingRename(moves, rename, clean_up)
        try:
            for move in moves:
                self._bind_both(move)
                self._follow_link(move)
        except BaseException:
            self.end(pending)
            raise
        return pending

    def apply(self, pending: PendingRename) -> None:
        """Step 2: the backing rename; the moved objects' known inodes follow."""
        pending.rename()
        pending.renamed = True
        for move in pending.moves:
            move.current = move.new_parent, move.new_backing
            moved = self._ns.inodes.inodes.get(self._ns.inodes.fuse_ino(move.st.st_ino))
            if moved is not None:
                moved.location = move.new_location
                self._ns.inodes.name(moved, move.new_parent, move.new_backing)

    def finish(self, pending: PendingRename) -> None:
        """Step 3 (for a directory only if the rename was fsynced: `pending.durable`),
        then what the rename left to remove (a replaced directory, sidecars, a stored
        target)."""
        for move in pending.moves:
            if move.final:
                self._bind_new(move, pending.durable)
                self._follow_link(move)
        if pending.clean_up is not None:
            pending.clean_up()

    def end(self, pending: PendingRename) -> None:
        self._ns.inodes.unhold(pending.held)
        for move in pending.moves:
            if move.fd is not None:
                os.close(move.fd)
                move.fd = None

    def _bind_both(self, move: _Move) -> None:
        """Step 1: make the object valid at its old and its new place."""
        kind = stat.S_IFMT(move.st.st_mode)
        bindings = self._ns.bindings
        if kind == stat.S_IFREG and move.st.st_nlink == 1:
            move.fd = backing.open_path(move.backing_name, move.parent.fd)
            rewrite_header(
                move.fd,
                lambda header: bindings.file_both(header, move.old_location, move.new_location),
            )
        elif kind == stat.S_IFDIR and self._ns.bound:
            dir_fd = backing.open_path(move.backing_name, move.parent.fd)
            try:
                move.fd = os.open(
                    fnames.DIR_ID_FILE, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
                )
            finally:
                os.close(dir_fd)
            record = DirRecord.unpack(os.pread(move.fd, places.DIR_RECORD_SIZE + 1, 0))
            old_tag = bindings.found_dir_tag(move.old_location, record)
            if old_tag is None:
                raise BindingError(
                    "the directory to rename is bound to another place (moved, swapped or "
                    "its .egw-dirid replaced in the backing store): not re-bound"
                )
            new_tag = bindings.dir_tag(move.new_location, record.dir_id)
            move.record = record
            backing.pwrite_all(move.fd, DirRecord(record.dir_id, (old_tag, new_tag)).pack(), 0)
        elif kind == stat.S_IFLNK and self._ns.bound:
            link = LinkRecord.decode(os.readlink(move.backing_name, dir_fd=move.parent.fd))
            old_tag = bindings.found_link_tag(move.old_location, link)
            if old_tag is None:
                raise BindingError(
                    "the symlink to rename is bound to another place (its target moved, "
                    "swapped or copied in the backing store): not re-bound"
                )
            move.record = link
            both = dataclasses.replace(
                link, bindings=(old_tag, bindings.link_tag(move.new_location, link))
            )
            Symlinks.replace(
                self._ns.inodes, move.parent, move.backing_name, both, move.st,
                self._ns.xattrs.link_record(move.parent.fd, move.backing_name),
            )
            move.current = move.parent, move.backing_name

    def _bind_new(self, move: _Move, durable: bool) -> None:
        """Step 3, after the rename: valid at the new place only. A failure here leaves
        the object valid at both places (the next rename rewrites both), so it is logged,
        not passed on: the rename itself happened."""
        kind = stat.S_IFMT(move.st.st_mode)
        bindings = self._ns.bindings
        try:
            if kind == stat.S_IFREG and move.fd is not None:
                rewrite_header(move.fd, bindings.file_new)
            elif kind == stat.S_IFDIR and isinstance(move.record, DirRecord):
                # Only once the rename is durable: else a power loss could keep the
                # record's new state and lose the rename.
                if durable and move.fd is not None:
                    new_tag = bindings.dir_tag(move.new_location, move.record.dir_id)
                    record = DirRecord(move.record.dir_id, (new_tag, places.ZERO_BINDING))
                    backing.pwrite_all(move.fd, record.pack(), 0)
            elif kind == stat.S_IFLNK and isinstance(move.record, LinkRecord):
                final = dataclasses.replace(
                    move.record,
                    bindings=(
                        bindings.link_tag(move.new_location, move.record), places.ZERO_BINDING
                    ),
                )
                Symlinks.replace(
                    self._ns.inodes, move.new_parent, move.new_backing, final, move.st,
                    self._ns.xattrs.link_record(move.new_parent.fd, move.new_backing),
                )
        except OSError as exc:
            log.warning("a renamed entry keeps its old place valid too: %s", exc)

    def _follow_link(self, move: _Move) -> None:
        """A known symlink inode stands for the backing symlink now at its name (the one
        it had was replaced). Its first handle stays open, so the backing inode number the
        kernel knows it by is not reused while the kernel may ask for it."""
        if move.current is None or not isinstance(move.record, LinkRecord):
            return
        moved = self._ns.inodes.inodes.get(self._ns.inodes.fuse_ino(move.st.st_ino))
        if moved is None:
            return
        parent, backing_name = move.current
        try:
            fd = backing.open_path(backing_name, parent.fd)
        except OSError:
            return
        self._ns.inodes.follow_replacement(moved, fd)  # (held by the rename: its handle is open)
        self._ns.inodes.name(moved, parent, backing_name)
