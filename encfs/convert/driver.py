"""The driver of a conversion: `convert` opens and flocks DIR, and `Conversion` runs the
phases in order, each through its collaborator: refuse a directory in use or what cannot
be converted (`in_use`, `plan`), mark the start (`records`), stage the tree (`staging`),
make and open the volume, convert the tree (`walk`, over `sides` and `transfer`), remove
the staging directory, move DIR's own xattrs and times onto the volume's root and remove
the marker, and sum up (`report`)."""

from __future__ import annotations

import fcntl
import os
import stat
import sys
import time
from collections import Counter
from collections.abc import Callable

from encfs import config_store
from encfs.convert.in_use import users_of
from encfs.convert.plan import Keeps, Plan, checked_plan
from encfs.convert.records import MARKER_FORMAT, State, Steps, read_marker, write_marker
from encfs.convert.report import Progress, census
from encfs.convert.sides import Sides
from encfs.convert.staging import Staging
from encfs.convert.transfer import Transfer
from encfs.convert.tree import (
    exists,
    is_kept_xattr,
    metadata_record,
    open_dir,
    printable,
    read_xattrs,
)
from encfs.convert.walk import Walker
from encfs.engine import ROOT_INODE, Volume, create_volume
from encfs.errors import UsageError, VolumeBusy, VolumeExists
from encfs.format import DEFAULT_FEATURES
from encfs.format import names as fnames
from encfs.format.blocks import DEFAULT_BLOCK_SIZE, Layout
from encfs.format.config_fields import now_utc
from encfs.keys.provider import KeyProvider
from encfs.trust import Operator, OperatorSpec, canonical_backing

# encfs-gw's own installation (the directory holding the encfs package)
_INSTALLED_AT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def convert(
    path: str,
    operator: Operator,
    new_provider: Callable[[], KeyProvider],
    *,
    block_size: int | None = None,
    drop_acls: bool = False,
    keep_outside: list[str] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_plan: Callable[[dict], None] | None = None,
) -> dict:
    """Convert (or finish converting) the directory `path` into a volume in place.

    `operator` opens a volume made earlier (a resumed conversion); `new_provider` gives
    the key provider when the volume is still to be made. Returns the summary."""
    absolute = os.path.abspath(path)
    if os.path.islink(absolute):
        raise UsageError(f"{absolute} is a symlink; give the directory itself")
    if not os.path.lexists(absolute):
        raise UsageError(f"{absolute} does not exist")
    if not os.path.isdir(absolute):
        raise UsageError(f"{absolute} is not a directory")
    real = os.path.realpath(absolute)
    if real == "/":
        raise UsageError("convert refuses the root directory")
    try:
        dir_fd = open_dir(real, None)  # O_NOATIME: a refusal leaves DIR's atime as it was
    except OSError as exc:
        raise UsageError(f"cannot open {real}: {exc.strerror}") from None
    try:
        # One conversion at a time: an flock on DIR until the staging directory's is held
        # (then the volume's lock too). Other commands refuse the marker.
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VolumeBusy(f"{real} is locked by another encfs-gw command") from None
        conversion = Conversion(real, dir_fd, operator, new_provider, block_size, drop_acls)
        conversion.on_progress = on_progress
        conversion.on_plan = on_plan
        return conversion.run(keep_outside or [])
    finally:
        os.close(dir_fd)


class Conversion:
    """One run of convert over DIR (fresh or resumed), from the checks to the summary."""

    def __init__(
        self,
        real: str,
        dir_fd: int,
        operator: Operator,
        new_provider: Callable[[], KeyProvider],
        block_size: int | None,
        drop_acls: bool,
    ) -> None:
        self.real = real
        self.dir_fd = dir_fd
        self.operator = operator
        self.new_provider = new_provider
        self.block_size = block_size
        self.drop_acls = drop_acls
        self.steps = Steps()
        self.on_progress: Callable[[Progress], None] | None = None
        self.on_plan: Callable[[dict], None] | None = None
        self.volume: Volume | None = None
        self.staging = Staging(real, dir_fd, self.steps)
        self.plan = Plan()
        self.progress = Progress(0, 0)
        self.peak_extra = 0
        self.free_at_start = 0
        self.notes: list[str] = []
        self.done: Counter[str] = Counter()
        self.created_with: str | None = None
        self.started = ""  # the marker's: the config records it until the end

    # --- the phases ---------------------------------------------------------------------
    def run(self, keep_outside: list[str]) -> dict:
        top = os.fstat(self.dir_fd)  # before anything here reads the directory
        marker = read_marker(self.dir_fd, self.real)
        fresh = marker is None
        if fresh:
            if exists(fnames.CONFIG_FILE, self.dir_fd):
                raise VolumeExists(f"{self.real} is already an encfs-gw volume")
            if exists(fnames.CONVERT_DIR, self.dir_fd):
                raise UsageError(
                    f"{self.real}/{fnames.CONVERT_DIR} exists but no conversion was started "
                    "here: move it out of the directory first"
                )
        if not fresh and exists(fnames.CONVERT_DIR, self.dir_fd):
            self.staging.lock()  # before the scan of users: another convert is one
        self._check_outside(keep_outside)
        users = users_of(self.real)
        if users:
            more = f" (and {len(users) - 1} more)" if len(users) > 1 else ""
            raise VolumeBusy(
                f"{self.real} is in use: {users[0]}{more}; stop what uses it (writers, "
                "shells, mounts) and run convert again"
            )
        self.free_at_start = self._free_bytes()
        if fresh:
            layout = self._layout(self.block_size or DEFAULT_BLOCK_SIZE)
            # the volume convert makes has the default features (config_store.new_config)
            self.plan = checked_plan(
                self.real, self.dir_fd, self.dir_fd, layout, self.drop_acls,
                Keeps.of(DEFAULT_FEATURES),
            )
            marker = {
                "format": MARKER_FORMAT, "version": 1, "started": now_utc(),
                "top": metadata_record(top),
            }
            self.steps()
            write_marker(self.dir_fd, marker)
        assert marker is not None
        self.started = marker["started"]
        staging = self.staging
        try:
            if staging.open():
                state = staging.state
                assert state is not None
                staged_now = state.phase == "staging"
                if staged_now:
                    staging.stage()
                if state.phase == "creating":
                    self._create_volume(state, interrupted=not staged_now)
                self._open_volume()
                assert self.volume is not None
                if not fresh:
                    self.plan = checked_plan(
                        self.real, self.dir_fd, staging.tree_fd, self.volume.layout,
                        self.drop_acls, Keeps.of(self.volume.config.features),
                    )
                self._report_plan()
                self._convert_tree(state)
                self.done = Counter(state.done)
                staging.remove()
            else:
                fcntl.flock(self.dir_fd, fcntl.LOCK_UN)  # the volume lock takes over
                self._open_volume()
            self._finish_top(marker["top"])
            return self._summary()
        finally:
            if self.volume is not None:
                self.volume.close()
            staging.close()

    def _layout(self, block_size: int) -> Layout:
        try:
            return Layout(block_size)
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def _check_outside(self, keep_outside: list[str]) -> None:
        """What convert itself needs must not be encrypted into the volume."""
        needed = [
            ("the key file", path) for path in keep_outside
        ] + [
            ("the trust store", self.operator.store.directory),
            ("the Python installation running encfs-gw", sys.prefix),
            ("encfs-gw itself", _INSTALLED_AT),
        ]
        prefix = self.real.rstrip("/") + "/"
        for what, path in needed:
            where = os.path.realpath(path)
            if where == self.real or where.startswith(prefix):
                raise UsageError(
                    f"{what} ({printable(path)}) is inside {self.real}: convert would "
                    "encrypt it into the volume; keep it outside"
                )

    def _free_bytes(self) -> int:
        st = os.fstatvfs(self.dir_fd)
        return st.f_bavail * st.f_frsize

    def _report_plan(self) -> None:
        plan = self.plan
        self.progress = Progress(plan.files, plan.data_bytes)
        if plan.linked_outside:
            self.notes.append(
                f"{plan.linked_outside} file(s) have hard links outside {self.real}: those "
                "names keep the plaintext"
            )
        if plan.dropped:
            kinds = ", ".join(f"{name} ({n})" for name, n in sorted(plan.dropped.items()))
            self.notes.append(f"xattrs the volume does not keep (as the mount): {kinds}")
        if self.on_plan is not None:
            self.on_plan({
                "files": plan.files, "directories": plan.directories,
                "bytes": plan.data_bytes, "space_needed": plan.space_needed(),
                "free": self.free_at_start,
            })

    def _create_volume(self, state: State, interrupted: bool) -> None:
        if not exists(fnames.CONFIG_FILE, self.dir_fd):
            # Every user entry is in the tree: what else is here is an interrupted
            # create_volume's (its root id, a temporary file), and so is a trust entry
            # naming this path (no volume was ever here: its config was never written).
            for name in os.listdir(self.dir_fd):
                if name not in (fnames.CONVERT_MARKER, fnames.CONVERT_DIR):
                    self.steps()
                    os.unlink(name, dir_fd=self.dir_fd)
            self._forget_stale_trust()
            provider = self.new_provider()
            self.steps()
            try:
                create_volume(
                    self.real,
                    provider,
                    self.block_size or DEFAULT_BLOCK_SIZE,
                    self.operator,
                    conversion={"started": self.started},
                )
            except VolumeExists as exc:
                if not interrupted:
                    raise
                raise VolumeExists(
                    f"{exc} (an interrupted convert of {self.real} may have made it while "
                    "it made the volume, which was never finished: no volume uses it; "
                    "remove it or name another one)"
                ) from None
            # Open it with the provider just used (a passphrase is not asked twice).
            made = OperatorSpec(provider.name, dict(provider.options))
            factory = self.operator.factory

            def reuse(kind: str, options: dict) -> KeyProvider:
                if kind == made.kind and options == made.options:
                    return provider
                return factory(kind, options)

            self.operator = Operator([made], self.operator.store, factory=reuse)
            self.created_with = provider.describe()
        state.phase = "converting"
        state.save()

    def _forget_stale_trust(self) -> None:
        store = self.operator.store
        backing_path = canonical_backing(self.real)
        with store.locked():
            for entry in list(store.entries()):
                if backing_path in entry.backings:
                    entry.backings.remove(backing_path)
                    if entry.backings:
                        store.save(entry)
                    else:
                        store.remove(entry.volume_id)

    def _open_volume(self) -> None:
        self.volume = Volume.unlock(self.real, self.operator, converting=True)
        wanted = self.block_size
        if wanted is not None and wanted != self.volume.config.block_size:
            raise UsageError(
                f"the volume in {self.real} has block size {self.volume.config.block_size}, "
                f"not {wanted} (its conversion started with that size)"
            )

    def _convert_tree(self, state: State) -> None:
        """The batch a crash left first, then the walk over the rest of the tree."""
        assert self.volume is not None
        sides = Sides(self.staging.tree_fd, self.volume, state, self.steps)
        walker = Walker(
            self.real, state, sides, Transfer(sides, self.steps), self.plan.links,
            self.progress, self.free_at_start, self._free_bytes, self.on_progress,
        )
        walker.resolve_inflight()
        walker.walk()
        self.peak_extra = walker.peak_extra

    # --- the end ------------------------------------------------------------------------
    def _finish_top(self, top: list[int]) -> None:
        """DIR's own xattrs (plaintext on the backing directory) go into the volume's
        root, each set there before it is removed here; then DIR's times; the marker
        last."""
        assert self.volume is not None
        path = f"/proc/self/fd/{self.dir_fd}"
        for xname, value in read_xattrs(self.dir_fd, "."):
            if is_kept_xattr(xname) and not xname.startswith(fnames.XATTR_PREFIX.encode()):
                self.steps()
                self.volume.setxattr(ROOT_INODE, xname, value)
                self.steps()
                os.removexattr(path, os.fsdecode(xname))
        atime_ns, mtime_ns = top[3], top[4]
        self.steps()
        self.volume.sync()
        if self.volume.config.conversion is not None:
            # From here the volume opens for everyone (the marker is a formality left).
            self.steps()
            with config_store.editing(self.real, self.volume.keyring, self.operator) as config:
                config.conversion = None
            self.volume.config = config
        self.steps()
        self.volume.setattr(ROOT_INODE, atime_ns=atime_ns, mtime_ns=mtime_ns)
        self.steps()
        os.unlink(fnames.CONVERT_MARKER, dir_fd=self.dir_fd)
        # Removing the marker changed DIR's mtime: set the times once more (a crash just
        # here leaves DIR's mtime at this instant: the one thing a crash can cost).
        self.volume.setattr(ROOT_INODE, atime_ns=atime_ns, mtime_ns=mtime_ns)
        os.fsync(self.dir_fd)
        self.volume.sync()
        if stat.S_IMODE(top[0]) != 0o700:
            self.notes.append(
                f"the volume's root has mode 0700 (its backing directory's; {self.real} had "
                f"{stat.S_IMODE(top[0]):04o}): chmod it through the mount if others need it"
            )

    def _summary(self) -> dict:
        assert self.volume is not None
        counted = census(self.dir_fd, self.volume.layout)
        done = self.done
        return {
            "directory": self.real,
            "volume_id": self.volume.config.volume_id.hex(),
            "block_size": self.volume.config.block_size,
            "volume": counted,
            # every one read back through the engine and compared before its plaintext
            # went (a mismatch stops the conversion, so there are none here)
            "verified": {
                "files": done.get("files", 0),
                "bytes": done.get("bytes", 0),
                "sparse_files": done.get("sparse_files", 0),
                "symlinks": done.get("symlinks", 0),
                "specials": done.get("specials", 0),
                "links": done.get("links", 0),
                "xattrs": done.get("xattrs", 0),
            },
            "key_provider": self.created_with,
            "this_run": {
                "files": self.progress.files_done,
                "bytes": self.progress.bytes_done,
                "elapsed": round(time.monotonic() - self.progress.started, 3),
                "peak_extra_bytes": self.peak_extra,
                "changes": self.steps.count,  # to the directory and the volume
            },
            "notes": self.notes,
        }
