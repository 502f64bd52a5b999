"""Crash consistency: kill -9 the daemon in the middle of a workload, remount, lose nothing.

One volume (4 KiB blocks, so files of a few hundred KiB span several key groups) lives
through every iteration. An iteration has its own seed and does:

1. `encfs-gw mount` (returns once the mount is live);
2. a writer thread runs seeded operations through the mount: creates (short and long
   names, the long ones with name sidecars), appends, random overwrites (some past the
   end, leaving holes), truncates up and down, O_TRUNC rewrites, renames (some replacing a
   file, some across directories, directory renames), hard links, unlinks, mkdir, rmdir,
   fsync/fdatasync of files and fsync of directories, and reads checked against the
   model. In some iterations a key rotation (`encfs-gw rotate MOUNTPOINT --rate R`) runs
   in the daemon at the same time;
3. when the writer is about to make its N-th system call (N seeded), the daemon (the
   holder of the volume lock, from /proc/locks) gets SIGKILL, after a seeded busy-wait so
   the kill lands at different points of the daemon's handling of that call. The test
   waits for the daemon to die (pidfd, no sleeps), lets the writer's interrupted call
   fail (ENOTCONN or ECONNABORTED), and checks what the kill left: the dead mount
   (ENOTCONN) over the read-only guard, with the directory underneath still empty;
4. `encfs-gw fsck BACKING --json`: clean, or only findings a crash may leave: debris
   anywhere (temporary entries, orphaned long-name sidecars) and, on the file of the
   interrupted operation only, a torn tail, orphaned key records or a block that does not
   authenticate (see below), none of which fsck says looks like tampering.
   `fsck --repair` must repair every repairable finding;
5. the next mount (which replaces the dead mount) compares the whole tree with the model.

What "nothing lost" means. A kill -9 of the daemon is not a power cut: whatever the daemon
wrote to the backing store before dying is still in the backing page cache. So every
operation that returned before the kill must read back exactly (that includes every file
fsync'ed before the kill, whose count is reported separately), the tree's names, hard
links and directories must be those before or after the interrupted operation, and the
file the interrupted operation was changing must hold its contents from before or after
one of the operation's write calls, or, for the call in progress, each block from before
or after that call (a write request is atomic per block, not as a whole). Every file
must read without EIO, with one documented exception (docs/FORMAT.md, section 4): a kill
that lands inside the `pwrite` of a multi-page block record tears that record (the kernel
checks for fatal signals between pages), and that block fails authentication. The test
allows that only for a block the interrupted write was changing, counts it, and rewrites
the block through the mount as the application would redo its write; fsck must then be
clean. At the end: a clean unmount, fsck clean, an offline `rotate` finishes any
interrupted rotation and every DEK is on the newest KEK version.

Figures (iterations, kills, operations, fsck findings by kind and how many were repaired,
torn records, files verified, rotations interrupted) are printed at the end.

CI runs 40 iterations by default (about 45 s on 2 cores; a kill costs ~1.1 s, mostly the
remount and fsck). Soak mode, e.g. (300 iterations: ~6 minutes):

    ENCFS_CRASH_ITERATIONS=500 ENCFS_CRASH_SEED=7 \\
        .venv/bin/pytest --basetemp=/tmp/pt-soak tests/integration/test_crash.py -s

A failure message names the iteration and its seed; rerun with ENCFS_CRASH_SEED set to the
base seed (iterations are seeded base + i).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import select
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from encfs.daemon import mountpoint
from encfs.errors import FsckProblems
from tests.helpers.mount import (
    ENCFS_GW,
    Volume,
    clear_mountpoint,
    daemon_pid,
    init_volume,
    is_mounted,
    run_cli,
)

pytestmark = pytest.mark.fuse

BLOCK = 4096
ITERATIONS = int(os.environ.get("ENCFS_CRASH_ITERATIONS", "40"))
BASE_SEED = int(os.environ.get("ENCFS_CRASH_SEED", "20240611"))
MAX_FILES = 14
MAX_DIRS = 5
MAX_TOTAL_BYTES = 3 << 20
MAX_FILE_BYTES = 400_000
WAIT = 60  # seconds: bound on every wait (a hang is a failure, not a slow test)
DEAD_CONNECTION = (errno.ENOTCONN, errno.ECONNABORTED)
# What a kill may leave behind, and where.
DEBRIS = {"leftover temporary entry", "orphaned long-name sidecar"}
INTERRUPTED_FILE = {"torn tail", "orphaned key records", "half-created file"}
TORN_RECORD = "block does not authenticate"


# --- the model ----------------------------------------------------------------------------


@dataclass
class Model:
    """What the tree must hold: directories, file names -> inode keys -> contents."""

    dirs: set[str] = field(default_factory=lambda: {""})
    names: dict[str, int] = field(default_factory=dict)
    data: dict[int, bytes] = field(default_factory=dict)
    synced: set[int] = field(default_factory=set)  # fsync'ed since their last change
    counter: int = 1  # for unique names and inode keys

    def copy(self) -> Model:
        return Model(set(self.dirs), dict(self.names), dict(self.data), set(self.synced),
                     self.counter)

    def fresh(self) -> int:
        self.counter += 1
        return self.counter

    def total_bytes(self) -> int:
        return sum(len(d) for d in self.data.values())

    def empty_dirs(self) -> list[str]:
        used = {p.rpartition("/")[0] for p in [*self.names, *self.dirs] if p}
        return sorted(d for d in self.dirs if d and d not in used)

    def set_data(self, key: int, data: bytes) -> None:
        self.data[key] = data
        self.synced.discard(key)

    def drop_unlinked(self) -> None:
        live = set(self.names.values())
        for key in list(self.data):
            if key not in live:
                del self.data[key]
                self.synced.discard(key)


def join(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory else name


def changed_blocks(old: bytes, new: bytes) -> set[int]:
    count = -(-max(len(old), len(new)) // BLOCK)
    return {
        i for i in range(count)
        if old[i * BLOCK : (i + 1) * BLOCK] != new[i * BLOCK : (i + 1) * BLOCK]
    }


def chunks(rnd: random.Random, size: int) -> list[int]:
    """Sizes of the write calls that write `size` bytes (seeded, some unaligned)."""
    out = []
    while size > 0:
        n = min(size, rnd.choice([1000, BLOCK, 3 * BLOCK + 17, 65536, 131072]))
        out.append(n)
        size -= n
    return out or [0]


# --- operations ---------------------------------------------------------------------------


@dataclass
class Op:
    kind: str
    post: Model
    run: Callable[[Writer], None]
    inode: int | None = None  # the file whose contents the operation changes
    # its contents before the operation and after each of its write calls: a kill leaves
    # one of them, or for the interrupted call, each block from the one before or after
    steps: list[bytes] = field(default_factory=list)

    def transitions(self) -> list[tuple[bytes, bytes]]:
        return list(zip(self.steps, self.steps[1:], strict=False))

    def changed(self) -> set[int]:
        return set().union(*(changed_blocks(a, b) for a, b in self.transitions()))


def write_steps(start: bytes, data: bytes, sizes: list[int], offset: int | None) -> list[bytes]:
    """Contents after each write call of `sizes` bytes of `data` (offset None: append)."""
    steps, position = [start], 0
    for n in sizes:
        piece = data[position : position + n]
        at = len(steps[-1]) if offset is None else offset + position
        current = steps[-1].ljust(at, b"\0")
        steps.append(current[:at] + piece + current[at + len(piece) :])
        position += n
    return steps


class Writer(threading.Thread):
    """Runs operations until one fails; arms the kill before its `kill_at`-th call."""

    def __init__(
        self, mnt: Path, model: Model, rnd: random.Random, kill_at: int, daemon_pid: int
    ) -> None:
        super().__init__(daemon=True)
        self.mnt = mnt
        self.daemon_pid = daemon_pid
        self.model = model
        self.rnd = rnd
        self.kill_at = kill_at
        self.calls = 0
        self.armed = threading.Event()
        self.killed = threading.Event()
        self.completed = 0
        self.interrupted: Op | None = None
        self.pre: Model = model
        self.error: BaseException | None = None
        self.kinds: Counter[str] = Counter()

    def sys(self, fn: Callable, *args):
        self.calls += 1
        if self.calls == self.kill_at:
            self.armed.set()
        return fn(*args)

    def died_of_the_kill(self, exc: OSError) -> bool:
        """The call failed because the daemon was killed under it: a dead connection; or,
        once the daemon is gone, EIO for a write in flight at the kill (Linux 6.18, about
        one run in four at seed 20240611, with no EIO in the daemon's log). An error the
        daemon itself sent still fails the test."""
        if exc.errno in DEAD_CONNECTION:
            return True
        if process_running(self.daemon_pid):
            return False
        return exc.errno == errno.EIO

    def path(self, relative: str) -> str:
        return str(self.mnt / relative) if relative else str(self.mnt)

    def run(self) -> None:
        try:
            while True:
                op = plan(self.model, self.rnd)
                self.pre, self.interrupted = self.model, op
                try:
                    op.run(self)
                except OSError as exc:
                    if self.killed.is_set() and self.died_of_the_kill(exc):
                        return  # the interrupted operation
                    raise
                self.model, self.interrupted = op.post, None
                self.completed += 1
                self.kinds[op.kind] += 1
        except BaseException as exc:  # reported by the test thread
            self.error = exc
        finally:
            self.armed.set()


def process_running(pid: int) -> bool:
    """False once `pid` has exited (gone, or a zombie not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _write_all(w: Writer, fd: int, data: bytes, sizes: list[int], offset: int | None) -> None:
    position = 0
    for n in sizes:
        piece = data[position : position + n]
        if offset is None:
            written = w.sys(os.write, fd, piece)
        else:
            written = w.sys(os.pwrite, fd, piece, offset + position)
        if written != len(piece):
            # The kernel splits a call into several FUSE requests (at a partial page): the
            # daemon's death between them is a short count. Page-aligned, so block-aligned.
            if w.killed.is_set():
                raise OSError(errno.ECONNABORTED, f"short write {written} of {len(piece)}")
            raise AssertionError(f"short write {written} of {len(piece)}")
        position += n


def _with_fd(w: Writer, path: str, flags: int, body: Callable[[int], None], mode=0o644) -> None:
    fd = w.sys(os.open, path, flags, mode)
    try:
        body(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    w.sys(os.close, fd)


def _new_name(m: Model, rnd: random.Random, prefix: str) -> str:
    n = m.fresh()
    if rnd.random() < 0.25:  # a long name: stored through a name sidecar
        return f"{prefix}{n}-" + "n" * rnd.randint(170, 240)
    return f"{prefix}{n}"


def op_create(m: Model, rnd: random.Random) -> Op:
    post = m.copy()
    key = post.fresh()
    path = join(rnd.choice(sorted(m.dirs)), _new_name(post, rnd, "f"))
    size = rnd.choice([0, 1, BLOCK - 1, BLOCK, BLOCK + 1, rnd.randrange(1, 300_000)])
    data = rnd.randbytes(size)
    sizes = chunks(rnd, size)
    sync = rnd.random() < 0.5
    post.names[path] = key
    post.data[key] = data
    if sync:
        post.synced.add(key)

    def run(w: Writer) -> None:
        def body(fd: int) -> None:
            _write_all(w, fd, data, sizes, None)
            if sync:
                w.sys(os.fsync, fd)

        _with_fd(w, w.path(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, body)

    return Op("create", post, run, key, write_steps(b"", data, sizes, None))


def _data_op(kind: str, m: Model, rnd: random.Random) -> Op:
    path = rnd.choice(sorted(m.names))
    key = m.names[path]
    old = m.data[key]
    post = m.copy()
    sync = rnd.random() < 0.3
    if kind == "append":
        data = rnd.randbytes(rnd.choice([1, 5, rnd.randrange(1, 40_000)]))
        new, flags, offset = old + data, os.O_WRONLY | os.O_APPEND, None
    elif kind == "overwrite":
        offset = rnd.randrange(0, len(old) + 20_000)
        data = rnd.randbytes(rnd.randrange(1, 70_000))
        new = old.ljust(offset, b"\0")
        new = new[:offset] + data + new[offset + len(data) :]
        flags = os.O_WRONLY
    else:  # rewrite: O_TRUNC, then new contents (as cp or an editor's save does)
        data = rnd.randbytes(rnd.randrange(0, 120_000))
        new, flags, offset = data, os.O_WRONLY | os.O_TRUNC, None
    post.set_data(key, new)
    if sync:
        post.synced.add(key)
    sizes = chunks(rnd, len(data))
    datasync = rnd.random() < 0.5

    def run(w: Writer) -> None:
        def body(fd: int) -> None:
            _write_all(w, fd, data, sizes, offset)
            if sync:
                w.sys(os.fdatasync if datasync else os.fsync, fd)

        _with_fd(w, w.path(path), flags, body)

    if kind == "rewrite":
        steps = [old, *write_steps(b"", data, sizes, None)]
    else:
        steps = write_steps(old, data, sizes, offset)
    assert steps[-1] == new
    return Op(kind, post, run, key, steps)


def op_truncate(m: Model, rnd: random.Random) -> Op:
    path = rnd.choice(sorted(m.names))
    key = m.names[path]
    old = m.data[key]
    choice = rnd.random()
    if choice < 0.45 and old:
        size = rnd.randrange(0, len(old))
    elif choice < 0.6:
        size = (len(old) // BLOCK) * BLOCK
    else:
        size = len(old) + rnd.randrange(1, 100_000)
    post = m.copy()
    post.set_data(key, old[:size].ljust(size, b"\0"))
    run = lambda w: w.sys(os.truncate, w.path(path), size)  # noqa: E731
    return Op("truncate", post, run, key, [old, post.data[key]])


def op_fsync(m: Model, rnd: random.Random) -> Op:
    path = rnd.choice(sorted(m.names))
    post = m.copy()
    post.synced.add(m.names[path])

    def run(w: Writer) -> None:
        _with_fd(w, w.path(path), os.O_RDWR, lambda fd: w.sys(os.fsync, fd))

    return Op("fsync", post, run)


def op_fsyncdir(m: Model, rnd: random.Random) -> Op:
    directory = rnd.choice(sorted(m.dirs))

    def run(w: Writer) -> None:
        _with_fd(w, w.path(directory), os.O_RDONLY | os.O_DIRECTORY, lambda fd: w.sys(os.fsync, fd))

    return Op("fsyncdir", m.copy(), run)


def op_read(m: Model, rnd: random.Random) -> Op:
    path = rnd.choice(sorted(m.names))
    expected = m.data[m.names[path]]

    def run(w: Writer) -> None:
        got = bytearray()

        def body(fd: int) -> None:
            while chunk := w.sys(os.read, fd, 65536):
                got.extend(chunk)

        _with_fd(w, w.path(path), os.O_RDONLY, body)
        assert bytes(got) == expected, f"read of {path} does not match what was written"

    return Op("read", m.copy(), run)


def op_rename(m: Model, rnd: random.Random) -> Op:
    src = rnd.choice(sorted(m.names))
    post = m.copy()
    if rnd.random() < 0.4 and len(m.names) > 1:
        dst = rnd.choice(sorted(set(m.names) - {src}))  # replaces another file
    else:
        dst = join(rnd.choice(sorted(m.dirs)), _new_name(post, rnd, "r"))
    if m.names.get(dst) != m.names[src]:  # two names of one inode: rename does nothing
        post.names[dst] = post.names.pop(src)
        post.drop_unlinked()
    return Op("rename", post, lambda w: w.sys(os.rename, w.path(src), w.path(dst)))


def op_link(m: Model, rnd: random.Random) -> Op:
    src = rnd.choice(sorted(m.names))
    post = m.copy()
    dst = join(rnd.choice(sorted(m.dirs)), _new_name(post, rnd, "h"))
    post.names[dst] = m.names[src]
    return Op("link", post, lambda w: w.sys(os.link, w.path(src), w.path(dst)))


def op_unlink(m: Model, rnd: random.Random) -> Op:
    path = rnd.choice(sorted(m.names))
    post = m.copy()
    del post.names[path]
    post.drop_unlinked()
    return Op("unlink", post, lambda w: w.sys(os.unlink, w.path(path)))


def op_mkdir(m: Model, rnd: random.Random) -> Op:
    post = m.copy()
    parents = sorted(d for d in m.dirs if d.count("/") < 1)
    path = join(rnd.choice(parents), _new_name(post, rnd, "d"))
    post.dirs.add(path)
    return Op("mkdir", post, lambda w: w.sys(os.mkdir, w.path(path), 0o755))


def op_rmdir(m: Model, rnd: random.Random) -> Op:
    path = rnd.choice(m.empty_dirs())
    post = m.copy()
    post.dirs.discard(path)
    return Op("rmdir", post, lambda w: w.sys(os.rmdir, w.path(path)))


def op_rename_dir(m: Model, rnd: random.Random) -> Op:
    src = rnd.choice(sorted(d for d in m.dirs if d))
    post = m.copy()
    dst = join(src.rpartition("/")[0], _new_name(post, rnd, "d"))

    def moved(p: str) -> str:
        return dst + p[len(src) :] if p == src or p.startswith(src + "/") else p

    post.dirs = {moved(d) for d in m.dirs}
    post.names = {moved(p): key for p, key in m.names.items()}
    return Op("rename dir", post, lambda w: w.sys(os.rename, w.path(src), w.path(dst)))


def plan(m: Model, rnd: random.Random) -> Op:
    files = len(m.names)
    full = m.total_bytes() > MAX_TOTAL_BYTES
    choices: list[tuple[Callable[[], Op], int]] = [
        (lambda: op_create(m, rnd), 0 if files >= MAX_FILES or full else 4 if files < 4 else 2),
        (lambda: op_mkdir(m, rnd), 1 if len(m.dirs) < MAX_DIRS else 0),
        (lambda: op_fsyncdir(m, rnd), 1),
    ]
    if files:
        big = max(len(m.data[k]) for k in m.names.values()) > MAX_FILE_BYTES
        grow = 0 if full or big else 3
        choices += [
            (lambda: _data_op("append", m, rnd), grow),
            (lambda: _data_op("overwrite", m, rnd), 4 if grow else 0),
            (lambda: _data_op("rewrite", m, rnd), 1),
            (lambda: op_truncate(m, rnd), 2 if grow else 5),
            (lambda: op_fsync(m, rnd), 2),
            (lambda: op_read(m, rnd), 2),
            (lambda: op_rename(m, rnd), 2),
            (lambda: op_link(m, rnd), 1 if files < MAX_FILES else 0),
            (lambda: op_unlink(m, rnd), 2 if files > 3 else 0),
        ]
    if m.empty_dirs():
        choices.append((lambda: op_rmdir(m, rnd), 1))
    if len(m.dirs) > 1:
        choices.append((lambda: op_rename_dir(m, rnd), 1))
    makers = [make for make, weight in choices if weight]
    weights = [weight for _, weight in choices if weight]
    return rnd.choices(makers, weights)[0]()


# --- observing the tree after a crash ------------------------------------------------------


@dataclass
class Seen:
    ino: int
    data: bytes
    torn: list[int]  # blocks that read EIO (zeros in `data`)


def observe(mnt: Path) -> tuple[set[str], dict[str, Seen]]:
    dirs, files = {""}, {}
    stack = [""]
    while stack:
        relative = stack.pop()
        with os.scandir(mnt / relative if relative else mnt) as entries:
            for entry in entries:
                path = join(relative, entry.name)
                st = entry.stat(follow_symlinks=False)
                if entry.is_dir(follow_symlinks=False):
                    dirs.add(path)
                    stack.append(path)
                else:
                    assert entry.is_file(follow_symlinks=False), f"unexpected entry {path}"
                    files[path] = Seen(st.st_ino, *read_blocks(mnt / path, st.st_size))
    return dirs, files


def read_blocks(path: Path, size: int) -> tuple[bytes, list[int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            data = os.pread(fd, size + 1, 0)
            assert len(data) == size, f"{path}: read {len(data)} bytes, stat says {size}"
            return data, []
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
        out, torn = bytearray(), []
        for index in range(-(-size // BLOCK)):
            try:
                out += os.pread(fd, BLOCK, index * BLOCK)
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                torn.append(index)
                out += bytes(min(BLOCK, size - index * BLOCK))
        return bytes(out), torn
    finally:
        os.close(fd)


def namespace_matches(model: Model, dirs: set[str], files: dict[str, Seen]) -> bool:
    if dirs != model.dirs or set(files) != set(model.names):
        return False
    inos: dict[int, set[int]] = {}
    for path, key in model.names.items():
        inos.setdefault(key, set()).add(files[path].ino)
    # every inode key is one file, and different keys are different files
    return all(len(v) == 1 for v in inos.values()) and len(
        {next(iter(v)) for v in inos.values()}
    ) == len(inos)


def mixed_ok(got: bytes, old: bytes, new: bytes, torn: list[int]) -> bool:
    """Each block of `got` is (a prefix of) the old or the new contents' block."""
    for index in range(-(-len(got) // BLOCK)):
        if index in torn:
            continue
        piece = got[index * BLOCK : (index + 1) * BLOCK]
        if piece not in (old[index * BLOCK : index * BLOCK + len(piece)],
                         new[index * BLOCK : index * BLOCK + len(piece)]):
            return False
    return True


# --- the harness --------------------------------------------------------------------------


@dataclass
class Figures:
    iterations: int = 0
    kills: int = 0
    ops: int = 0
    interrupted: Counter[str] = field(default_factory=Counter)
    findings: Counter[str] = field(default_factory=Counter)
    repaired: int = 0
    torn_records: int = 0
    files_verified: int = 0
    synced_verified: int = 0
    interrupted_file_states: Counter[str] = field(default_factory=Counter)
    rotations_started: int = 0
    rotations_busy: int = 0
    fsck_runs: int = 0

    def line(self) -> str:
        return (
            f"crash harness: {self.iterations} iterations, {self.kills} kills (SIGKILL), "
            f"{self.ops} operations completed, interrupted: {dict(self.interrupted)}; "
            f"fsck runs {self.fsck_runs}, findings {dict(self.findings)}, "
            f"{self.repaired} repaired by fsck --repair, {self.torn_records} torn block "
            f"records rewritten; {self.files_verified} file checks exact "
            f"({self.synced_verified} of fsync'ed files), interrupted files: "
            f"{dict(self.interrupted_file_states)}; rotations started during a kill window "
            f"{self.rotations_started} (refused while a resumed pass ran: "
            f"{self.rotations_busy})"
        )


class Harness:
    def __init__(self, volume: Volume, mnt: Path, figures: Figures) -> None:
        self.volume = volume
        self.mnt = mnt
        self.figures = figures
        self.model = Model()
        # (where, model before, interrupted op) of the last kill, checked after remounting
        self.pending: tuple[str, Model, Op | None] | None = None

    # --- mount lifecycle -----------------------------------------------------------------
    def mount(self) -> int:
        run_cli("mount", self.volume.backing, self.mnt, "--keyfile", self.volume.keyfile,
                check=True)
        pid = daemon_pid(self.volume.backing)
        assert pid is not None
        return pid

    def kill(self, pid: int) -> None:
        pidfd = os.pidfd_open(pid)
        try:
            os.kill(pid, signal.SIGKILL)
            ready, _, _ = select.select([pidfd], [], [], WAIT)
            assert ready, f"daemon {pid} survived SIGKILL for {WAIT} s"
        finally:
            os.close(pidfd)
        self.figures.kills += 1

    def check_dead_mount(self, where: str) -> None:
        """What a kill leaves: the dead mount over the guard, nothing underneath."""
        stack = mountpoint.mount_stack(str(self.mnt))
        assert [m.fstype for m in stack] == ["tmpfs", mountpoint.FSTYPE], f"{where}: {stack}"
        with pytest.raises(OSError) as dead:  # (a stat may still come from the cache)
            (self.mnt / "written-after-the-kill").write_bytes(b"plaintext")
        assert dead.value.errno == errno.ENOTCONN, where
        under = mountpoint.open_underneath(str(self.mnt))
        try:
            assert os.listdir(under) == [], f"{where}: written under the mount"
        finally:
            os.close(under)

    def teardown(self) -> None:
        """After a failure: our daemon (only if it is still ours) and its mounts go."""
        if not is_mounted(self.mnt):
            return
        pid = daemon_pid(self.volume.backing)
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if os.fsencode(self.volume.backing) in cmdline:
                os.kill(pid, signal.SIGKILL)
        clear_mountpoint(self.mnt)

    # --- fsck ----------------------------------------------------------------------------
    def fsck(self, *extra: str) -> tuple[int, dict]:
        result = run_cli("fsck", self.volume.backing, "--json", "--keyfile",
                         self.volume.keyfile, *extra)
        self.figures.fsck_runs += 1
        assert result.returncode in (0, FsckProblems.exit_code), result.stderr
        return result.returncode, json.loads(result.stdout)

    def fsck_after_kill(self, where: str, pre: Model, op: Op | None) -> set[tuple[str, int]]:
        """Check, repair; return (path, block) of torn block records left to rewrite."""
        paths, blocks = set(), set()
        if op is not None and op.inode is not None:
            blocks = op.changed()
            for model in (pre, op.post):
                paths |= {"/" + p for p, k in model.names.items() if k == op.inode}
        code, report = self.fsck()
        if code == 0:
            assert report["findings"] == []
            return set()
        torn = set()
        for finding in report["findings"]:
            kind, path = finding["kind"], finding["path"]
            self.figures.findings[kind] += 1
            # A kill leaves nothing fsck takes for tampering.
            assert finding["looks_like"] != "tampering", f"{where}: {finding}"
            if kind in DEBRIS:
                continue
            assert path in paths, f"{where}: {kind} on {path}, not the interrupted file"
            if kind == TORN_RECORD:
                assert finding["block"] in blocks, f"{where}: {finding}"
                torn.add((path, finding["block"]))
            else:
                assert kind in INTERRUPTED_FILE, f"{where}: unexpected finding {finding}"
        code, report = self.fsck("--repair")
        self.figures.repaired += report["repaired"]
        left = {(f["path"], f["block"]) for f in report["findings"] if not f["repaired"]}
        assert left == torn, f"{where}: fsck --repair left {report['findings']}"
        assert code == (FsckProblems.exit_code if torn else 0)
        if not torn:
            code, report = self.fsck()
            assert code == 0 and report["findings"] == [], f"{where}: {report}"
        return torn

    # --- checking the tree ---------------------------------------------------------------
    def verify(self, where: str, pre: Model, op: Op | None) -> None:
        """Compare the mounted tree with the model (before or after `op`); adopt it."""
        post = op.post if op is not None else pre
        dirs, files = observe(self.mnt)
        chosen = next((m for m in (post, pre) if namespace_matches(m, dirs, files)), None)
        assert chosen is not None, (
            f"{where}: tree matches neither the state before nor after {op and op.kind}: "
            f"dirs {sorted(dirs)} files {sorted(files)}; before {sorted(pre.names)} "
            f"{sorted(pre.dirs)}; after {sorted(post.names)} {sorted(post.dirs)}"
        )
        model = chosen.copy()
        for key in set(chosen.names.values()):
            path = next(p for p, k in chosen.names.items() if k == key)
            seen = files[path]
            if op is not None and key == op.inode:
                step = next(
                    (
                        (a, b) for a, b in op.transitions()
                        if set(seen.torn) <= changed_blocks(a, b)
                        and mixed_ok(seen.data, a, b, seen.torn)
                    ),
                    None,
                )
                assert step is not None, (
                    f"{where}: {path} ({op.kind} interrupted, {len(op.steps) - 1} write "
                    f"calls) holds blocks from none of its states (EIO blocks {seen.torn})"
                )
                if seen.torn:
                    seen = self.rewrite_torn(path, seen, *step)
                state = (
                    "before" if seen.data == op.steps[0]
                    else "after" if seen.data == op.steps[-1]
                    else "after a write call" if seen.data in op.steps
                    else "blocks old/new within a call"
                )
                self.figures.interrupted_file_states[state] += 1
                model.data[key] = seen.data
                model.synced = {k for k in chosen.synced if k != key}
                if key in pre.synced and seen.data == pre.data.get(key):
                    model.synced.add(key)
                continue
            assert not seen.torn, f"{where}: {path} blocks {seen.torn} read EIO"
            assert seen.data == chosen.data[key], (
                f"{where}: {path} ({len(seen.data)} bytes) differs from what was written "
                f"({len(chosen.data[key])} bytes){' and fsync-ed' if key in chosen.synced else ''}"
            )
            self.figures.files_verified += 1
            self.figures.synced_verified += key in chosen.synced
        self.model = model

    def rewrite_torn(self, path: str, seen: Seen, old: bytes, new: bytes) -> Seen:
        """Redo the interrupted write of torn blocks (full blocks: no read of the old one)."""
        fd = os.open(self.mnt / path, os.O_WRONLY)
        try:
            for index in seen.torn:
                piece = next(
                    (c[index * BLOCK : (index + 1) * BLOCK] for c in (new, old)
                     if len(c[index * BLOCK : (index + 1) * BLOCK]) == BLOCK),
                    None,
                )
                assert piece is not None, f"{path}: torn block {index} is not a full block"
                assert os.pwrite(fd, piece, index * BLOCK) == BLOCK
                self.figures.torn_records += 1
        finally:
            os.close(fd)
        data, torn = read_blocks(self.mnt / path, len(seen.data))
        assert torn == [], f"{path}: blocks {torn} still EIO after rewriting"
        return Seen(seen.ino, data, [])

    # --- one iteration -------------------------------------------------------------------
    def iteration(self, index: int, seed: int) -> None:
        where = f"iteration {index} (seed {seed})"
        rnd = random.Random(seed)
        pid = self.mount()
        self.verify_pending()
        rotate = None
        if rnd.random() < 0.3:
            rotate = self.start_rotation(rnd)
        writer = Writer(self.mnt, self.model, rnd, kill_at=rnd.randint(1, 160), daemon_pid=pid)
        spin = rnd.choice([0, 0, 300, 3000, 30000])
        writer.start()
        assert writer.armed.wait(WAIT), f"{where}: the writer never reached its kill point"
        for _ in range(spin):  # a seeded delay: the kill lands at varied points
            pass
        writer.killed.set()
        self.kill(pid)
        writer.join(WAIT)
        assert not writer.is_alive(), f"{where}: a call on the dead mount hangs"
        if writer.error is not None:
            raise AssertionError(f"{where}: before the kill: {writer.error!r}") from writer.error
        if rotate is not None:
            rotate.communicate(timeout=WAIT)  # it fails: the daemon died mid-request
        self.check_dead_mount(where)
        self.figures.ops += writer.completed
        op = writer.interrupted
        self.figures.interrupted[op.kind if op else "none"] += 1
        self.fsck_after_kill(where, writer.pre, op)
        self.pending = (where, writer.pre, op)
        self.figures.iterations += 1

    def verify_pending(self) -> None:
        """After a remount: check the tree against the last iteration's model."""
        if self.pending is None:
            return
        where, pre, op = self.pending
        self.verify(where, pre, op)
        self.pending = None

    def start_rotation(self, rnd: random.Random) -> subprocess.Popen | None:
        deks = sum(-(-len(d) // BLOCK) for d in self.model.data.values())
        rate = max(50, int(deks / rnd.uniform(0.2, 1.5)))
        process = subprocess.Popen(
            [*ENCFS_GW, "rotate", str(self.mnt), "--json", "--rate", str(rate)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        # The first line is the first progress report (the pass has started) or the
        # result; an error (a resumed pass is still running) closes stdout empty.
        ready, _, _ = select.select([process.stdout], [], [], WAIT)
        assert ready, "encfs-gw rotate printed nothing"
        if process.stdout.readline():
            self.figures.rotations_started += 1
        else:
            self.figures.rotations_busy += 1
        return process

    def finish(self) -> None:
        """A last mount to check the last iteration, a clean unmount, fsck, rotation."""
        self.mount()
        self.verify_pending()
        result = run_cli("unmount", self.mnt)
        assert result.returncode == 0, result.stderr
        code, report = self.fsck()
        assert code == 0 and report["findings"] == [], report
        result = run_cli("rotate", self.volume.backing, "--keyfile", self.volume.keyfile,
                         "--json", check=True)
        final = json.loads(result.stdout.strip().splitlines()[-1])
        assert final["done"] and final["unreadable_slots"] == 0, final
        status = json.loads(run_cli("status", self.volume.backing, "--keyfile",
                                    self.volume.keyfile, "--json", check=True).stdout)
        assert status["rotation"] is None
        assert set(status["deks_per_version"]) <= {str(status["current_kek"])}, status


def test_kill9_loop_loses_nothing(tmp_path, capsys):
    volume = init_volume(tmp_path, block_size=BLOCK)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    figures = Figures()
    harness = Harness(volume, mnt, figures)
    try:
        for i in range(ITERATIONS):
            harness.iteration(i, BASE_SEED + i)
        harness.finish()
    finally:
        harness.teardown()
        with capsys.disabled():
            print("\n" + figures.line())
    assert figures.kills == ITERATIONS
