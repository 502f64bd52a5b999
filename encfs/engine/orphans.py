"""Objects in use whose name was removed (layer L4): the orphan directory.

A file or directory a program holds open may lose its last name: unlink, rmdir, a rename
over it. On ext4 it lives on, nameless, until it is closed. Here its inode must still be
opened on demand (a read after its data descriptor was given back, an xattr call after
its handle was evicted), and a nameless backing object can only be reached by a handle
kept open: one descriptor per such object, which a program holding a few hundred of them
turned into ENFILE (issue 23). So instead of being removed, its entry is moved (renameat2
RENAME_NOREPLACE, relative to directory handles) into `BACKING/.egw-orphans/` under 32
random hex digits, which say nothing of its name, place or inode number, and the inode
is recorded there: its handle is evicted and reopened by that name like any other (the
same st_dev/st_ino check, the same file id in its header). Its header keeps the binding
of its last place (`Inode.location`), which was checked when it was opened and is what a
new open of it (through /proc/PID/fd) checks again. The kernel is told a link count of 0,
as ext4 says. When the inode is dropped (last release and forget) its entry is removed,
its handle still open, so the deferred closer's last close is where the backing store
frees it, as for any unlinked file.

A file with other names (a hard link: st_nlink > 1) unlinked by one of them while it is
open is the same case: its inode can be reopened by none of its remaining names until
the kernel looks one of them up again, which a program holding it open need never do.
So the removed name is moved aside the same way: the backing inode keeps its link count,
one of its links being the orphan entry, which is never counted: the kernel is told the
backing count minus one while the inode is recorded there (`nlink`), which is ext4's
count of the names left (0 once the last is gone too). A file has at most one
orphan link: removing another name of it while it is recorded there is a plain unlink
(its recorded name is the orphan link, not that one). Reached by a remaining name again
(a lookup, a listed entry, a rename of it), it is recorded there, and its orphan link
goes at once (InodeTable.name: the file has that name, so this frees nothing; the link
count the lookup answers is stat'ed after). Such a file's header is bound to no place
(a hard link unbinds it: engine/entries.py), so it verifies whatever name it is
reached by. Its set in the xattr store goes only with its last name: the orphan link is
not counted there either (Xattrs.last_name_set).

What is moved: anything (a regular file, a directory, a FIFO, socket or device, which
the kernel opens by itself: it only holds them, a symlink), when it is open, or when the
kernel knows it (lookup count > 0) and `nameless_max` removed inodes already keep a
handle each; a symlink whose long target is stored apart (engine/symlinks.py) as soon
as the kernel knows it, since its stored target then stays with it (removed when its
orphan entry is, or by `clear` for a leftover) where a handle alone would lose it.
A replaced one (a rename over it) is first hard-linked into the orphan directory, so
the rename stays one atomic step; the rename then leaves the orphan link in place of
that name. Otherwise a removed inode the kernel knows keeps a handle until
it is forgotten or reached by a name again, as before (InodeTable.unname, `nameless`): a
plain unlink costs less than a rename and a later unlink, and the kernel forgets such an
inode as soon as no program uses it, so only a few wait at a time; the bound catches
the rest (forgets that lag behind, O_PATH descriptors, current directories, open FIFOs).
A move the backing store refuses falls back to that too: one handle each while the
kernel holds them. The orphan directory's own inode is in the table while anything is
recorded in it.

Leftovers (the daemon was killed) are removed at the next writable mount (`clear`) and
by `fsck --repair` (fsck reports them, and counts each as a link of its inode). Removing
the orphan link of a file that still has a name only drops that link: the file and its
stored xattrs stay (a regular file's set goes only with its last link). A read-only
mount leaves leftovers alone (a file with one there shows a link count one too high
until a writable mount removes it). Nothing lists or decodes names under the orphan
directory: its own name is a reserved one (it contains a '.'), which listings skip.
The key passes (rotate, reencrypt) and the census walk it though, after the named tree
(admin/rewrap.data_dirs): its files' DEKs are the volume's like any others.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
from collections.abc import Iterator

from encfs import backing
from encfs.engine.inode import ROOT_INODE, Inode, oserror
from encfs.engine.inodes import HANDLE_CACHE_MIN, InodeTable
from encfs.engine.names import remove_tree
from encfs.engine.symlinks import Symlinks
from encfs.engine.xattrs import Xattrs
from encfs.format import names as fnames

log = logging.getLogger(__name__)

ORPHAN_NAME_BYTES = 16  # 32 hex digits: random, nothing of the object's name or number


def nameless_max(capacity: int) -> int:
    """Removed inodes that may keep a handle each (a quarter of the handle cache, at
    least HANDLE_CACHE_MIN) before the next removed one is moved aside instead: a plain
    unlink is cheaper, and the kernel forgets its inode at once unless a program uses it."""
    return max(HANDLE_CACHE_MIN, capacity // 4)


def orphan_name() -> str:
    return secrets.token_hex(ORPHAN_NAME_BYTES)


class Orphans:
    """The orphan directory of one volume and the inodes recorded in it."""

    def __init__(self, inodes: InodeTable, root_fd: int, xattrs: Xattrs, symlinks: Symlinks):
        self._inodes = inodes
        self._root_fd = root_fd
        # a leftover's xattr store file goes with it, and a symlink's stored (long) target
        self._xattrs, self._symlinks = xattrs, symlinks
        self._dir: Inode | None = None
        inodes.remove_orphan = self._remove

    def _directory(self) -> Inode:
        """The orphan directory's inode, the directory made on first use."""
        known = self._dir
        if known is not None and self._inodes.inodes.get(known.ino) is known:
            return known
        with contextlib.suppress(FileExistsError):
            os.mkdir(fnames.ORPHAN_DIR, 0o700, dir_fd=self._root_fd)
        inodes = self._inodes
        fd = inodes.new_descriptor(lambda: backing.open_path(fnames.ORPHAN_DIR, self._root_fd))
        inode, st = inodes.register(fd, inodes.get(ROOT_INODE), fnames.ORPHAN_DIR)
        if not stat.S_ISDIR(st.st_mode):
            inodes.drop(inode)
            raise oserror(errno.ENOTDIR, f"{fnames.ORPHAN_DIR} is not a directory")
        # The kernel never sees it: it stays in the table while an inode is recorded in
        # it (the table's `children`), its handle cached like any other and reopened by
        # its name in the root.
        inodes.orphan_dir = inode.ino
        self._dir = inode
        return inode

    def nlink(self, inode: Inode, st: os.stat_result) -> int:
        """The link count the kernel is told, as ext4 says: the backing one without the
        orphan link (a file whose other names are gone: 0; a removed directory: 0)."""
        if not self._inodes.is_orphan(inode):
            return st.st_nlink
        return 0 if stat.S_ISDIR(st.st_mode) else max(0, st.st_nlink - 1)

    def _release_directory(self) -> None:
        """The orphan directory's inode leaves the table if nothing is recorded in it."""
        if self._dir is not None and self._inodes.inodes.get(self._dir.ino) is self._dir:
            self._inodes.drop(self._dir)

    def _movable(
        self, inode: Inode | None, st: os.stat_result, dir_fd: int, backing_name: str
    ) -> bool:
        """Whether the removal of this name moves the object aside: anything (a file
        with other names or not), when it is open, or only known to the kernel while
        many removed inodes already keep a handle each (the kernel's forgets lag behind,
        or programs hold O_PATH descriptors, current directories or open FIFOs in them);
        a symlink with a stored target as soon as the kernel knows it."""
        if inode is None or self._inodes.is_orphan(inode):
            return False
        table = self._inodes
        if inode.opens > 0:
            return True
        if inode.lookups <= 0:
            return False
        # A symlink whose long target is stored apart always: kept by its handle alone, its
        # target would go with its name (a readlink through an O_PATH descriptor: EIO).
        return len(table.nameless) >= nameless_max(table.capacity) or (
            stat.S_ISLNK(st.st_mode)
            and self._symlinks.last_stored_link(dir_fd, backing_name, st) is not None
        )

    def set_aside(
        self, parent: Inode, backing_name: str, st: os.stat_result, flags: int = 0
    ) -> tuple[int, str] | None:
        """Before the last name of an object is removed: if its known inode is in use
        (`_movable`), move the entry into the orphan directory (with `flags`:
        RENAME_WHITEOUT leaves a whiteout at the old name), which the inode is reopened
        by from now on. Its new (directory handle, name), or None: the caller removes
        the entry itself."""
        inode = self._inodes.known_at(parent, backing_name, st)
        if not self._movable(inode, st, parent.fd, backing_name):
            return None
        assert inode is not None
        try:
            orphans = self._directory()
            name = orphan_name()
            backing.renameat2(
                parent.fd, backing_name, orphans.fd, name, backing.RENAME_NOREPLACE | flags
            )
        except OSError as exc:
            log.info("a removed object keeps a handle, not moved aside: %s", exc)
            self._release_directory()
            return None
        self._inodes.name(inode, orphans, name)
        return orphans.fd, name

    @contextlib.contextmanager
    def replacing(self, parent: Inode, backing_name: str) -> Iterator[bool]:
        """Around a rename over `backing_name`: an object in use there gets an orphan
        link first (the rename then leaves it that one name); either way the table's
        `replaced` runs around the rename. A failed rename takes the link back. Yields
        whether it was linked aside (a symlink's stored target then stays with it)."""
        inodes = self._inodes
        try:
            st = os.stat(backing_name, dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        inode = None if st is None else inodes.known_at(parent, backing_name, st)
        aside = None
        if st is not None and self._movable(inode, st, parent.fd, backing_name):
            try:
                orphans = self._directory()
                name = orphan_name()
                os.link(backing_name, name, src_dir_fd=parent.fd, dst_dir_fd=orphans.fd,
                        follow_symlinks=False)
                aside = orphans, name
            except OSError as exc:
                log.info("a replaced open file keeps a handle, not linked aside: %s", exc)
                self._release_directory()
        if inode is None or aside is None:
            with inodes.replaced(parent, backing_name):
                yield False
            return
        orphans, name = aside
        inodes.name(inode, orphans, name)
        try:
            with inodes.replaced(parent, backing_name):
                yield True
        except BaseException:
            inodes.name(inode, parent, backing_name)  # (which removes the orphan link)
            raise

    def _remove(self, inode: Inode, dropped: bool) -> None:
        """An orphan's inode is dropped (InodeTable.drop), or a file recorded here was
        reached by another name (InodeTable.name: it has one, so this frees nothing):
        its entry goes."""
        orphans, name = self._dir, inode.backing_name
        if orphans is None or name is None:
            return
        if dropped:
            # With a handle open, the unlink frees nothing: the table's (deferred) close
            # of that handle does, off the request loop (ext4 takes milliseconds for a
            # big file).
            with contextlib.suppress(OSError):
                inode.fd  # noqa: B018 (reopened by name if it was evicted)
        try:
            if inode.is_dir:
                remove_tree(orphans.fd, name)
            else:
                stored = self._stored_target(orphans.fd, name) if dropped else None
                os.unlink(name, dir_fd=orphans.fd)
                if stored is not None:
                    self._symlinks.remove_stored(stored)
        except OSError as exc:
            log.warning("cannot remove an orphan entry (the next writable mount does): %s", exc)

    def _stored_target(self, dir_fd: int, name: str) -> bytes | None:
        """The store id of a symlink's long target whose last link `name` is (it stays
        while the symlink is in use: removed with its orphan entry)."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return None
        return self._symlinks.last_stored_link(dir_fd, name, st)

    # --- leftovers --------------------------------------------------------------------
    def leftovers(self) -> list[tuple[str, int]]:
        """(name, inode number) of each entry of the orphan directory that no inode
        stands for (a crash left them)."""
        try:
            fd = os.open(fnames.ORPHAN_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                         | os.O_CLOEXEC, dir_fd=self._root_fd)
        except FileNotFoundError:
            return []
        except OSError as exc:  # (a symlink or file in its place: not ours, not followed)
            log.warning("%s is not a directory: left alone (%s)", fnames.ORPHAN_DIR, exc)
            return []
        live = {
            inode.backing_name for inode in self._inodes.inodes.values()
            if self._inodes.is_orphan(inode)
        }
        found = []
        try:
            for name in sorted(os.listdir(fd)):
                if name not in live:
                    with contextlib.suppress(FileNotFoundError):
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        found.append((name, self._inodes.fuse_ino(st.st_ino)))
        finally:
            os.close(fd)
        return found

    def clear(self) -> int:
        """Remove the leftovers (with their xattr store files); how many. The directory
        itself goes too when nothing is left in it."""
        names = [name for name, _ in self.leftovers()]
        if not names:
            with contextlib.suppress(OSError):  # (absent, or not empty: held open ones)
                os.rmdir(fnames.ORPHAN_DIR, dir_fd=self._root_fd)
            return 0
        fd = os.open(fnames.ORPHAN_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                     | os.O_CLOEXEC, dir_fd=self._root_fd)
        removed = 0
        try:
            for name in names:
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    owner = self._xattrs.last_name_set(fd, name, st)
                    stored = self._symlinks.last_stored_link(fd, name, st)
                    if stat.S_ISDIR(st.st_mode):
                        remove_tree(fd, name)
                    else:
                        os.unlink(name, dir_fd=fd)
                    self._xattrs.discard_after(owner, st)
                    if stored is not None:
                        self._symlinks.remove_stored(stored)
                    removed += 1
                except OSError as exc:
                    log.warning("cannot remove a leftover orphan %s: %s", name, exc)
        finally:
            os.close(fd)
        if self._dir is None:
            with contextlib.suppress(OSError):  # (not empty: something else left)
                os.rmdir(fnames.ORPHAN_DIR, dir_fd=self._root_fd)
        return removed
