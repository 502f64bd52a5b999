"""The inode table of an open volume (layer L4): backing objects the kernel knows or that
are open, by inode number; their lookup and open counts; the open handles. What one
inode is: engine/inode.py.

Lookup counts follow pyfuse3: lookup/create/mkdir/symlink/mknod/link and every accepted
readdirplus entry add one, forget subtracts, and an inode leaves the table when its
lookup count and open count both reach zero. Inode numbers are the backing ones, but for
the root (ROOT_INODE), whose number is swapped with the backing root's.

Descriptors stay bounded however many inodes the kernel caches and however many files
programs hold open (issue 23). An inode holds a backing handle only while it is held by
an operation in progress, nameless, or in the LRU cache of handles, whose size comes from
the descriptor limit (`handle_capacity`). An open file's data descriptor (one per inode,
shared by its open handles) is in a second cache of the same size, and is given back
under pressure like a handle: the next read or write opens it again (files.py,
`Files.restore_data`), with the same access mode, from the inode's handle. Any inode
without a handle is reopened on demand by its parent's handle and its backing name
(openat, O_NOFOLLOW), and what is reopened must be the same backing inode (st_dev,
st_ino): else ESTALE. Every change of names goes through the volume, which keeps
each inode's recorded name current: a rename moves it. An object whose recorded name is
removed (unlink, rmdir, a rename over it; its last name or one of several) while it is
open, or while the kernel knows it and many removed inodes already keep a handle each
(`nameless`), has that name moved into the orphan directory instead
(engine/orphans.py, `.egw-orphans/<random>`) and is recorded there, so its handle is
evicted and reopened by name like any other; that entry is removed when the inode is
dropped, or reached by another name (`remove_orphan`), and is never counted in the link
count the kernel is told (Orphans.nlink). Any other inode whose recorded name is removed
(the first few only known to the kernel, which forgets them as soon as no program uses
them; the move refused) keeps a handle until the kernel forgets it or it is
reached by a name again (`unname`), so its backing inode, and with it the inode number
the kernel knows, is not freed and reused meanwhile. So what is never given back:
one handle per such nameless inode, the handles and data descriptors of operations in
progress (`hold`), and the data descriptor of a file open for writing that its owner may
not write (`pin_data`: a daemon that is not root could not open it for writing again).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterator

from encfs import backing
from encfs.engine.inode import ROOT_INODE, DirHandle, Inode, oserror

log = logging.getLogger(__name__)

# The handle cache: a quarter of the descriptor limit (the rest is for open files, the
# daemon's own descriptors and deferred closes), at least a few (an operation uses up to
# four inodes' handles at once, and the most recently used are never evicted by a trim),
# at most HANDLE_CACHE_MAX (each cached handle pins a backing inode in the kernel's cache).
HANDLE_CACHE_MIN = 16
HANDLE_CACHE_MAX = 16384
DEFERRED_CLOSES_MAX = 1024


def handle_capacity(descriptor_limit: int | None = None) -> int:
    """Cached handles for a descriptor limit (default: this process's soft limit)."""
    if descriptor_limit is None:
        descriptor_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if descriptor_limit == resource.RLIM_INFINITY:
            return HANDLE_CACHE_MAX
    return max(HANDLE_CACHE_MIN, min(descriptor_limit // 4, HANDLE_CACHE_MAX))


class InodeTable:
    """Known inodes and open handles of one volume, and how their descriptors close.

    `files` and `dirs` map handles to what they are open on; files.py reads `files`
    directly on the data path (one dict lookup per read or write).
    """

    def __init__(self, root_fd: int, capacity: int | None = None) -> None:
        st = os.fstat(root_fd)
        self.root_dev = st.st_dev
        self._root_backing_ino = st.st_ino
        root = Inode(ROOT_INODE, os.dup(root_fd), st.st_mode, self, st.st_ino)
        root.lookups = 1  # the kernel's reference to the root is never forgotten
        self.inodes: dict[int, Inode] = {ROOT_INODE: root}
        # Inodes whose handle may be closed, least recently used first (the root, open
        # directories, held and nameless inodes are never in it).
        self.cache: OrderedDict[int, Inode] = OrderedDict()
        self.capacity = handle_capacity() if capacity is None else capacity
        # Open files' data descriptors that may be given back, in the order a clock
        # passes them (as many as handles: `trim_data`).
        self.data_cache: OrderedDict[int, Inode] = OrderedDict()
        self.files: dict[int, Inode] = {}  # file handle -> its inode
        self.dirs: dict[int, DirHandle] = {}  # directory handle -> its listing
        self._next_fh = 1
        self._closer: backing.DeferredCloser | None = None
        self.close_fd: Callable[[int], None] = os.close
        # The orphan directory's inode number once it is known, and what removes an
        # orphan's entry there when its inode is dropped (both set by engine/orphans.py).
        self.orphan_dir: int | None = None
        # (Its second argument: True when the inode is dropped, False when it was
        # reached by another name.)
        self.remove_orphan: Callable[[Inode, bool], None] | None = None
        # Inodes whose recorded name was removed and that keep a handle of their own
        # (`unname`): engine/orphans.py moves removed entries aside once there are many.
        self.nameless: set[int] = set()

    # --- inodes -------------------------------------------------------------------------
    def fuse_ino(self, backing_ino: int) -> int:
        # Swap the backing root's number with 1 so the root is ROOT_INODE and no other
        # object can collide with it; every other number is the backing one (stable).
        if backing_ino == self._root_backing_ino:
            return ROOT_INODE
        if backing_ino == ROOT_INODE:
            return self._root_backing_ino
        return backing_ino

    def get(self, ino: int) -> Inode:
        try:
            return self.inodes[ino]
        except KeyError:
            raise oserror(errno.ESTALE, f"inode {ino}") from None

    def directory(self, ino: int) -> Inode:
        inode = self.get(ino)
        if not inode.is_dir:
            raise oserror(errno.ENOTDIR)
        return inode

    def register(
        self, fd: int, parent: Inode | None = None, backing_name: str | None = None
    ) -> tuple[Inode, os.stat_result]:
        """Adopt an O_PATH handle on `backing_name` in `parent` (None: reached without a
        name, by ".."): reuse the known inode (closing fd) or make a new one. Either way
        the name it was reached by is the one it is reopened by from now on."""
        st = os.fstat(fd)
        if st.st_dev != self.root_dev:
            os.close(fd)
            raise oserror(errno.EXDEV, "backing entry on another filesystem")
        ino = self.fuse_ino(st.st_ino)
        known = self.inodes.get(ino)
        if known is not None:
            if known._fd < 0 and known.backing_ino == st.st_ino:
                self._adopt_handle(known, fd, st)  # reopened by this lookup: keep it
            else:
                os.close(fd)
            if parent is not None and known.backing_ino == st.st_ino and self.name(
                known, parent, backing_name
            ):
                st = os.fstat(known.fd)  # (its link count without the orphan link)
            return known, st
        inode = Inode(ino, -1, st.st_mode, self, st.st_ino)
        self.inodes[ino] = inode
        if parent is not None:
            self._set_name(inode, parent.ino, backing_name)
        self._adopt_handle(inode, fd, st)
        return inode, st

    def _adopt_handle(self, inode: Inode, fd: int, st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            try:  # a real directory fd: usable as dir_fd, for fsync and for listing
                dir_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = dir_fd
            except PermissionError:
                pass
        inode._fd = fd
        self.settle(inode)

    def drop(self, inode: Inode, force: bool = False) -> None:
        """Release an inode nobody holds any more (or every inode, with `force`)."""
        if not force and (
            inode.lookups > 0 or inode.opens > 0 or inode.children > 0
            or inode.ino == ROOT_INODE
        ):
            return
        self.data_cache.pop(inode.ino, None)
        if inode.data_fd is not None:
            self.close_fd(inode.data_fd)
            inode.data_fd = None
        inode.contents = None
        if inode.on_drop is not None:
            on_drop, inode.on_drop = inode.on_drop, None
            on_drop()
        if self.is_orphan(inode) and self.remove_orphan is not None:
            self.remove_orphan(inode, True)  # (its handle still open: the last close frees it)
        self.cache.pop(inode.ino, None)
        if inode._fd >= 0:
            self.close_fd(inode._fd)
            inode._fd = -1
        for fd in inode.pinned or ():
            self.close_fd(fd)
        inode.pinned = None
        self.inodes.pop(inode.ino, None)
        self.nameless.discard(inode.ino)
        self._set_name(inode, None, None)

    def is_orphan(self, inode: Inode) -> bool:
        """Whether it is recorded in the orphan directory: a name of it was removed
        while it was in use and no other name of it has been reached since (one of its
        backing links is its orphan entry, which the kernel is not told of)."""
        return inode.parent_ino is not None and inode.parent_ino == self.orphan_dir

    def settle(self, inode: Inode) -> None:
        """After a change of an inode's handle, holds, opens or name: its handle goes
        into the cache if it may be evicted, or out of it if it may not."""
        if inode._fd >= 0 and self._evictable(inode):
            self.cache[inode.ino] = inode
            self.cache.move_to_end(inode.ino)
            self.trim()
        else:
            self.cache.pop(inode.ino, None)
        contents = inode.contents
        if inode.data_fd is not None and contents is not None and self._data_evictable(inode):
            contents.used = True
            if inode.ino not in self.data_cache:
                self.data_cache[inode.ino] = inode
                self.trim_data()
        else:
            self.data_cache.pop(inode.ino, None)

    @staticmethod
    def _evictable(inode: Inode) -> bool:
        # (An open directory's handle may be evicted too: its listing is kept in its
        # DirHandle, and fsyncdir holds it while a thread uses it.)
        return inode.ino != ROOT_INODE and inode.parent_ino is not None and inode.holds == 0

    @staticmethod
    def _data_evictable(inode: Inode) -> bool:
        """An open file's data descriptor may be given back if it can be opened again:
        from its handle (a nameless inode keeps one) or from its name, and checked (its
        header read: a file a crash left without one keeps its descriptor until its first
        write gives it one)."""
        return (
            inode.opens > 0
            and inode.holds == 0
            and inode.contents is not None
            and not inode.contents.pinned
            and (inode.parent_ino is not None or inode._fd >= 0)
        )

    # --- the handle cache -------------------------------------------------------------------
    def touch(self, inode: Inode) -> None:
        """A handle was used: it is the most recently used now."""
        # (Not in it: not evictable; the root, open directories, held, nameless.) A test,
        # not contextlib.suppress(KeyError): this runs at every use of a handle, several
        # times per request: a suppressed KeyError took 2.2 us (timeit), this 0.06 us.
        if inode.ino in self.cache:
            self.cache.move_to_end(inode.ino)

    def trim(self, keep: int | None = None) -> int:
        """Close the least recently used handles beyond `keep` (default: the capacity);
        how many were closed. Never the few most recently used (HANDLE_CACHE_MIN): an
        operation in progress may be using them."""
        keep = self.capacity if keep is None else max(keep, HANDLE_CACHE_MIN)
        closed = 0
        while len(self.cache) > keep:
            _, inode = self.cache.popitem(last=False)
            if inode._fd >= 0:
                # Not the deferred closer: the object has a name, so this close frees
                # nothing on the backing filesystem (and the bound must hold at once).
                os.close(inode._fd)
                inode._fd = -1
                closed += 1
        return closed

    def trim_data(self, keep: int | None = None) -> int:
        """Give back data descriptors of open files beyond `keep` (default: the capacity);
        how many were closed. Each is opened again by the next read or write of its file
        (`Files.restore_data`).

        Not strictly least recently used: a clock (second chance). A read or write only
        marks its file used (`FileContents.used`, one store: the data path's whole cost, where
        moving it in an LRU order took 4 times as long); passing a marked descriptor
        clears the mark and keeps it for one more round, an unmarked one is given back.

        Closing loses nothing: written data is in the backing file's page cache (shared
        by every descriptor of the inode), and a write-back error not yet reported is
        reported to the next fsync of a descriptor opened later too (the kernel's errseq:
        a new descriptor samples only errors someone has seen)."""
        # (All of them if need be: no operation keeps a data descriptor it took across
        # the opening of another descriptor, so none is in use when this runs.)
        keep = self.capacity if keep is None else keep
        closed = 0
        cache = self.data_cache
        while len(cache) > keep:
            ino, inode = cache.popitem(last=False)
            contents = inode.contents
            if contents is not None and contents.used:
                contents.used = False
                cache[ino] = inode
                continue
            fd = inode.data_fd
            if fd is not None and contents is not None:
                inode.data_fd = None
                contents.fd = -1
                os.close(fd)  # (the file has a name or a handle: this frees nothing)
                closed += 1
        return closed

    def close_data(self, inode: Inode) -> None:
        """Close a file's data descriptor (its last handle was released)."""
        self.data_cache.pop(inode.ino, None)
        if inode.data_fd is not None:
            os.close(inode.data_fd)
        inode.data_fd = None
        inode.contents = None

    def set_data(self, inode: Inode, fd: int) -> None:
        """`fd` is the data descriptor of `inode` now (opened with its contents' mode)."""
        inode.data_fd = fd
        if inode.contents is not None:
            inode.contents.fd = fd
        self.settle(inode)

    def drop_handle(self, inode: Inode) -> None:
        """Close an inode's handle now if it may be evicted (it was opened only to open
        its data descriptor again)."""
        if self.cache.pop(inode.ino, None) is not None and inode._fd >= 0:
            os.close(inode._fd)
            inode._fd = -1

    def pin_data(self, inode: Inode) -> None:
        """Never give back this file's data descriptor while it is open (it could not be
        opened the same way again); its last release unpins it."""
        if inode.contents is not None:  # (without: never given back anyway)
            inode.contents.pinned = True
        self.data_cache.pop(inode.ino, None)

    def new_descriptor(self, opener: Callable[[], int]) -> int:
        """`opener()`, run once more after `shed` when the daemon is out of descriptors
        (EMFILE: its own table is full; ENFILE: the system's)."""
        try:
            return opener()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or not self.shed():
                raise
        return opener()

    def register_at(self, parent: Inode, backing_name: str) -> tuple[Inode, os.stat_result]:
        """The inode of the entry `backing_name` in `parent`: the known one, or a new one
        without a handle yet (a lookup or a listed entry needs only its attributes; the
        handle is opened by name on first use, and must then be the same inode)."""
        st = os.stat(backing_name, dir_fd=parent.fd, follow_symlinks=False)
        if st.st_dev != self.root_dev:
            raise oserror(errno.EXDEV, "backing entry on another filesystem")
        ino = self.fuse_ino(st.st_ino)
        inode = self.inodes.get(ino)
        if inode is None:
            inode = Inode(ino, -1, st.st_mode, self, st.st_ino)
            self._set_name(inode, parent.ino, backing_name)
            self.inodes[ino] = inode
        elif inode.backing_ino == st.st_ino and self.name(inode, parent, backing_name):
            st = os.stat(backing_name, dir_fd=parent.fd, follow_symlinks=False)
        return inode, st

    def shed(self) -> int:
        """Out of descriptors: close every cached handle that may be (and finish the
        deferred closes); how many descriptors that gave back."""
        closed = self.trim(0) + self.trim_data(0)
        if self.settle_closes():
            closed += 1
        return closed

    def reopen(self, inode: Inode) -> int:
        """A new handle on an inode whose handle was evicted: by its parent's handle and
        its backing name, and only if that is still the same backing inode."""
        parent = self.inodes.get(inode.parent_ino) if inode.parent_ino is not None else None
        if parent is None or inode.backing_name is None:
            raise oserror(errno.ESTALE, f"inode {inode.ino}: no name to reopen it by")
        name = inode.backing_name
        try:
            fd = self.new_descriptor(lambda: backing.open_path(name, parent.fd))
        except FileNotFoundError:
            raise self._stale(inode, "its backing name is gone") from None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (self.root_dev, inode.backing_ino):
            os.close(fd)
            raise self._stale(inode, "its backing name holds another object")
        self._adopt_handle(inode, fd, st)
        return inode._fd

    def _stale(self, inode: Inode, why: str) -> OSError:
        # Every rename and removal goes through the volume, which keeps recorded names
        # current: this is a change made in the backing store behind the mount's back.
        log.warning("inode %d cannot be reopened: %s (changed in the backing store?)",
                    inode.ino, why)
        return oserror(errno.ESTALE, f"inode {inode.ino}")

    def follow_replacement(self, inode: Inode, fd: int) -> None:
        """`inode` (a bound symlink) stands for the backing symlink `fd` is a handle on,
        which replaced the one it had. Its first handle stays open (`Inode.pinned`), so
        the backing inode number the kernel knows it by is not reused while the kernel
        may ask for it."""
        if inode.has_handle:
            old_fd = inode.fd
            if inode.pinned is None:
                inode.pinned = [old_fd]
            else:
                os.close(old_fd)  # an intermediate symlink nobody else knows the number of
        self.rebase(inode, fd)

    def rebase(self, inode: Inode, fd: int) -> None:
        """The inode stands for another backing object from now on (a bound symlink
        renamed: a new backing symlink), whose handle `fd` is; its old handle is the
        caller's to keep or close."""
        inode._fd = fd
        inode.backing_ino = os.fstat(fd).st_ino
        self.settle(inode)

    def name(self, inode: Inode, parent: Inode, backing_name: str | None) -> bool:
        """`inode` was reached as `backing_name` in `parent`: reopen it by that. True if
        that removed its orphan link (a file reached by another name needs it no more;
        a stat made before counts it)."""
        if (inode.parent_ino, inode.backing_name) == (parent.ino, backing_name):
            return False
        unlinked = False
        if self.is_orphan(inode) and not inode.is_dir and self.remove_orphan is not None:
            self.remove_orphan(inode, False)
            unlinked = True
        self._set_name(inode, parent.ino if backing_name is not None else None, backing_name)
        self.settle(inode)
        return unlinked

    def _set_name(self, inode: Inode, parent_ino: int | None, backing_name: str | None) -> None:
        """Record where `inode` is reopened from, keeping the parents' `children` counts:
        a parent nobody else holds leaves the table with its last named child."""
        old_parent_ino = inode.parent_ino
        inode.parent_ino, inode.backing_name = parent_ino, backing_name
        if parent_ino is not None:
            self.nameless.discard(inode.ino)
        if old_parent_ino == parent_ino:
            return
        if parent_ino is not None and (parent := self.inodes.get(parent_ino)) is not None:
            parent.children += 1
        # Iterative, not recursive: dropping a parent may release its own parent in turn.
        while old_parent_ino is not None:
            old_parent = self.inodes.get(old_parent_ino)
            if old_parent is None:
                return
            old_parent.children = max(0, old_parent.children - 1)  # (a forced drop)
            if old_parent.children > 0 or old_parent.lookups > 0 or old_parent.opens > 0:
                return
            if old_parent.ino == ROOT_INODE:
                return
            old_parent_ino = old_parent.parent_ino
            old_parent.parent_ino = None  # released here, not again by drop
            old_parent.backing_name = None
            self.drop(old_parent)

    def unname(self, inode: Inode) -> None:
        """Its recorded name is about to go (unlink, rmdir, a rename over it): it keeps
        a handle of its own until the kernel forgets it (or it is reached by a name
        again), so its backing inode and number stay its own. Call before the removal."""
        if inode._fd < 0:
            if inode.data_fd is not None:
                # Out of the data cache while it is copied: running out of descriptors
                # in new_descriptor gives back the cached ones.
                self.data_cache.pop(inode.ino, None)
                data_fd = inode.data_fd
                try:
                    inode._fd = self.new_descriptor(lambda: os.dup(data_fd))
                except BaseException:
                    self.settle(inode)
                    raise
            else:
                self.reopen(inode)
        self._set_name(inode, None, None)
        self.nameless.add(inode.ino)
        self.settle(inode)

    def known_at(self, parent: Inode, backing_name: str, st: os.stat_result) -> Inode | None:
        """The known inode recorded at `backing_name` in `parent`, which `st` describes."""
        inode = self.inodes.get(self.fuse_ino(st.st_ino))
        if inode is None or inode.backing_ino != st.st_ino:
            return None
        if (inode.parent_ino, inode.backing_name) != (parent.ino, backing_name):
            return None
        return inode

    def unname_at(self, parent: Inode, backing_name: str, st: os.stat_result) -> None:
        """`unname` the known inode recorded at `backing_name`, if there is one."""
        inode = self.known_at(parent, backing_name, st)
        if inode is not None:
            self.unname(inode)

    def unname_pinned(
        self, parent: Inode, backing_name: str, st: os.stat_result, pin: int
    ) -> None:
        """`unname_at`, given `pin`: an O_PATH handle on `backing_name` made by the same
        path walk as `st` (its fstat). A known inode there without a handle of its own
        keeps `pin` as its handle: no reopen by name, whose open and check would repeat
        that walk (`rm -rf` after a listing: every inode it removes has been evicted, or
        never had a handle). `pin` is the table's either way (closed if not kept)."""
        inode = self.known_at(parent, backing_name, st)
        if inode is not None and inode._fd < 0 and inode.data_fd is None:
            inode._fd, pin = pin, -1
        if pin >= 0:
            os.close(pin)  # (the object still has its name: this frees nothing)
        if inode is not None:
            self.unname(inode)

    def hold(self, *inodes: Inode | None) -> list[Inode]:
        """Keep their handles open (never evicted) until `unhold`: an operation that
        spans awaits (a rename: its fsyncs run on threads) or removes their names."""
        held = [inode for inode in inodes if inode is not None]
        for inode in held:
            inode.fd  # noqa: B018 (opened now, while its name is sure to be valid)
            inode.holds += 1
            self.cache.pop(inode.ino, None)
            self.data_cache.pop(inode.ino, None)
        return held

    def unhold(self, held: list[Inode]) -> None:
        for inode in held:
            inode.holds -= 1
            if self.inodes.get(inode.ino) is inode:
                self.settle(inode)
        held.clear()

    def stats(self) -> dict[str, int]:
        """Known inodes, cached handles, the cache's capacity, open file and directory
        handles, and open files' data descriptors that may be given back."""
        return {"known": len(self.inodes), "cached": len(self.cache), "capacity": self.capacity,
                "open": len(self.files) + len(self.dirs), "data_cached": len(self.data_cache)}

    def forget(self, ino: int, count: int) -> None:
        inode = self.inodes.get(ino)
        if inode is None:
            return
        inode.lookups -= count
        if inode.lookups <= 0:
            inode.lookups = 0
            self.drop(inode)

    # --- handles ------------------------------------------------------------------------
    def new_handle(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def dir_handle(self, fh: int) -> DirHandle:
        handle = self.dirs.get(fh)
        if handle is None:
            raise oserror(errno.EBADF)
        return handle

    # --- closing descriptors --------------------------------------------------------------
    def defer_closes(self, closer: backing.DeferredCloser | None = None) -> None:
        """Close the descriptors of forgotten inodes on a worker thread (the daemon: the
        last close of an unlinked file is where the backing filesystem deletes it).
        `closer`: one that closes at a test's pace instead of the default one."""
        if self._closer is not None:
            if closer is None:
                return
            self._closer.stop()
        # Descriptors waiting for the closer count against the limit too: at most half
        # as many as the cache holds.
        self._closer = closer or backing.DeferredCloser(
            max_pending=min(DEFERRED_CLOSES_MAX, max(HANDLE_CACHE_MIN, self.capacity // 2))
        )
        self.close_fd = self._closer.close

    def settle_closes(self) -> bool:
        """Finish the deferred closes (their files' space comes back); False if there
        were none, so an operation that ran out of space has no reason to retry."""
        return self._closer is not None and self._closer.settle()

    @contextlib.contextmanager
    def replaced(self, parent: Inode, backing_name: str) -> Iterator[None]:
        """Around a rename over `backing_name`: the replaced object is freed by the last
        close of a handle held meanwhile, on the deferred closer (freeing an inode with
        data blocks takes milliseconds on ext4, which the rename would otherwise spend)."""
        try:
            fd = backing.open_path(backing_name, parent.fd)
        except FileNotFoundError:
            fd = None
        if fd is not None:
            # A known inode recorded at that name keeps its own handle (unname).
            known = self.known_at(parent, backing_name, os.fstat(fd))
            if known is not None:
                if known._fd < 0 and known.data_fd is None:
                    known._fd, fd = fd, None
                self.unname(known)
        try:
            yield
        finally:
            if fd is not None:
                self.close_fd(fd)

    def close(self) -> None:
        """Release every inode and handle; every deferred close is done on return."""
        # Orphans first: their entries are removed by their directory's handle.
        for inode in sorted(self.inodes.values(), key=lambda known: not self.is_orphan(known)):
            self.drop(inode, force=True)
        self.inodes.clear()
        self.cache.clear()
        self.data_cache.clear()
        self.files.clear()
        self.dirs.clear()
        if self._closer is not None:
            self._closer.stop()
            self._closer = None
            self.close_fd = os.close
