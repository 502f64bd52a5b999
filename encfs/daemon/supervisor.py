"""The daemon's supervisor (layer L6): what runs beside the FUSE request loop. Key health
(revalidation, kernel caches dropped on a fall to INACCESSIBLE, the providers' key
versions followed), the rotation policy, the resume of an interrupted re-wrap pass, the
online rotation, and the daemon's status report.

Every task runs on the trio thread; blocking work (a provider call, a census) goes to a
worker thread and touches nothing FUSE handlers change. A rotation runs its steps on the
trio thread, between FUSE requests, through the same driver as the offline `rotate`
(`encfs.admin.rotation.RotationRun`).

Errors: no supervisor task may take the daemon down. A failed health check, policy read
or automatic rotation is logged (WARNING for the expected failures: an unreachable
provider, an altered config; the traceback for anything else) and retried later
(`POLICY_RETRY`, the next health interval); the mount goes on with what it has. A
rotation asked for over the control socket reports its error to that client instead.

Cancellation: the tasks are cancelled when the mount ends. A cancelled rotation leaves
the pass resumable (every step is crash-safe; the next start resumes it); a cancelled
health check or policy check leaves the state it found, as a worker thread's result
is applied on the trio thread only when it returns.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import trio

from encfs import config_store
from encfs.admin import keyslots, reencrypt, rewrap, rotation, status
from encfs.daemon import health as health_mod
from encfs.engine import Volume
from encfs.errors import EncfsError, UsageError

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 1.0
PASS_SLICE = 0.005  # seconds of re-wrap work between two checkpoints (FUSE latency bound)
POLICY_IDLE_CHECK = 3600.0  # seconds between reads of the rotation policy when none is due
POLICY_RETRY = 300.0  # after an automatic rotation failed (provider down ...)
QUIESCE_POLL = 0.01  # seconds between looks for a moment with no mkdir/rename in flight
MAX_WALKS = 4  # data walks of an online re-encryption before it reports what is left
NAME_WALKS = 3  # name walks between requests before the last one runs as one step


@dataclass(frozen=True)
class PassRequest:
    """What a rotation or a re-encryption is asked for: its `rate` (re-wrapped DEKs per
    second for a rotation, MiB/s for a re-encryption; None: unthrottled), whether it
    retires the old KEK versions at its end (`purge_old`), and `new_provider` (kind,
    options): the new KEK version's only provider, made by this daemon (a key file is
    created by it), or None (protected like the current version)."""

    rate: float | None = None
    purge_old: bool = False
    new_provider: tuple[str, dict[str, Any]] | None = None


class Supervisor:
    """Key health, rotation policy, resume and online rotation of one mounted volume."""

    def __init__(
        self,
        volume: Volume,
        health_interval: float = health_mod.DEFAULT_INTERVAL,
        health_grace: float = health_mod.DEFAULT_GRACE,
        invalidate: Callable[[list[int]], None] | None = None,
        mount_options: list[str] | None = None,
        mountpoint: str | None = None,
    ) -> None:
        self.volume = volume
        self.mountpoint = mountpoint
        self.mount_options = mount_options or []
        self.health_interval = health_interval
        self.invalidate = invalidate
        self.health = health_mod.KeyHealth(
            volume, volume.audit, grace=health_grace, clock=trio.current_time
        )
        self.on_state_change: Callable[[str], None] | None = None
        # The CPU warmer's and the busy-poll's state for `status` (encfs.daemon.mount sets it).
        self.cpu_status: Callable[[], dict] | None = None
        # The request loop in use and why (encfs.daemon.request_loop.LoopChoice.report).
        self.request_loop: dict | None = None
        self._rotating = False
        # the online re-encryption's progress, for `status` (None: none is running)
        self.reencrypt_stats: reencrypt.ReencryptStats | None = None
        self._pause: trio.Event | None = None  # set: the running pass stops and says so
        self._paused = trio.Event()  # set by the running pass once it stopped
        self._check_lock = trio.Lock()
        self._policy_changed = trio.Event()
        self._policy_lock = trio.Lock()

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The health loop, the policy loop and, if a pass was interrupted, its resume;
        until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.health_loop)
            nursery.start_soon(self.policy_loop)
            if self.volume.config.rotation is not None:
                # A pass was interrupted (crash, unmount): resume it in the background.
                nursery.start_soon(self._resume, "re-wrap pass", self.rotate)
            config = self.volume.config
            if config.reencrypt is not None and not reencrypt.is_paused(config):
                # its journal and name pass were done before the mount (mount_prepare)
                nursery.start_soon(self._resume, "re-encryption", self.reencrypt)
            task_status.started()

    # --- key health ---------------------------------------------------------------------------
    def status_line(self) -> str:
        """The short form for systemd's STATUS=."""
        return f"{self.health.state.value}: {self.health.reason}"

    async def check_now(self) -> dict:
        """One revalidation; on a fall to INACCESSIBLE drop the kernel's cached data. When
        the keys are good, follow the providers' key versions."""
        async with self._check_lock:
            before = self.health.state
            result = await trio.to_thread.run_sync(self.health.check)
            state = self.health.apply(result)
            if state is not before:
                if state is health_mod.State.INACCESSIBLE and self.invalidate is not None:
                    # Blocking kernel notifications: from a thread, never from a handler.
                    await trio.to_thread.run_sync(self.invalidate, self.volume.known_inodes())
                if self.on_state_change is not None:
                    self.on_state_change(self.status_line())
            if state is health_mod.State.READY:
                await self.follow_key_versions()
            return self.health.summary()

    async def follow_key_versions(self) -> None:
        """Re-protect the stored KEK blobs whose provider key has a new current version
        (keyslots.follow_key_versions); not while a rotation edits the KEK versions."""
        config = self.volume.config
        if self._rotating or config.rotation is not None or config.reencrypt is not None:
            return
        try:
            changes = await trio.to_thread.run_sync(keyslots.follow_key_versions, self.volume)
        except EncfsError as exc:
            log.warning("cannot follow the providers' key versions: %s", exc)
            return
        # Back on the trio thread: the records the next check (and status) will use.
        keyslots.apply_reprotections(self.volume.config, changes)

    async def health_loop(self) -> None:
        """Revalidate every interval (jittered by up to 10 %, so fleets do not align)."""
        while True:
            await trio.sleep(self.health_interval * (0.9 + 0.2 * random.random()))
            try:
                await self.check_now()
            except Exception:
                log.exception("key health check failed")

    # --- the rotation policy ------------------------------------------------------------------
    async def policy_loop(self) -> None:
        """Rotate when the volume's rotation policy says so. The policy is read from the
        config at every check, so `rotate-every` applies without a remount."""
        while True:
            wait, _ = await self.apply_policy()
            with trio.move_on_after(wait):
                await self._policy_changed.wait()
            self._policy_changed = trio.Event()

    async def apply_policy(self) -> tuple[float, int | None]:
        """Run the rotation if the policy says it is due: (seconds until the next check,
        the KEK version rotated to or None). One at a time: a second caller waits, then
        finds the rotation done."""
        async with self._policy_lock:
            return await self._policy_check()

    async def set_policy(self, every_seconds: int | None, purge_old: bool) -> dict:
        """Set (or clear) the rotation policy, rotate at once if that makes one due, and
        wake the policy loop: the policy and the version rotated to, if any."""
        async with self._policy_lock:
            rotation.set_policy(self.volume, every_seconds, purge_old)
        _, rotated = await self.apply_policy()
        self._policy_changed.set()  # the loop recomputes its timer
        return {"rotated_to": rotated, **rotation.policy_summary(self.volume.config)}

    async def _policy_check(self) -> tuple[float, int | None]:
        try:
            # Authenticated with the keys in memory: an altered config is refused here
            # (logged), and the daemon keeps serving with the config it has.
            config = config_store.reread(self.volume.backing_path, self.volume.keyring)
        except (EncfsError, OSError) as exc:
            log.warning("cannot read the rotation policy: %s", exc)
            return POLICY_RETRY, None
        except Exception:  # never let the config take the daemon down
            log.exception("cannot read the rotation policy")
            return POLICY_RETRY, None
        if config.generation > self.volume.config.generation:
            self.volume.config = config  # another process's change (provider add ...)
        remaining = rotation.seconds_until_rotation(config)
        if remaining is None:
            return POLICY_IDLE_CHECK, None
        if remaining > 0:
            return min(remaining, POLICY_IDLE_CHECK), None
        if self._rotating or config.rotation is not None or config.reencrypt is not None:
            return min(float(config.rotation_policy["every_seconds"]), POLICY_RETRY), None
        log.info("the rotation policy asks for a new KEK version")
        try:
            result = await self.rotate(
                PassRequest(purge_old=config.rotation_policy["purge_old"]), report=None
            )
        except EncfsError as exc:
            log.warning("automatic rotation failed: %s", exc)
            return POLICY_RETRY, None
        except Exception:  # never let the policy take the daemon down
            log.exception("automatic rotation failed")
            return POLICY_RETRY, None
        if not result.get("done"):
            log.warning("automatic rotation left DEKs under older versions: %s", result)
            return POLICY_RETRY, None
        log.info("automatic rotation to KEK version %d done", result["target"])
        return 0.0, int(result["target"])

    # --- passes -------------------------------------------------------------------------------
    @staticmethod
    async def _drive(
        steps: Iterator[tuple[Any, float]],
        report: Callable[[Any], Awaitable[None]] | None,
        stop: Callable[[], bool] = lambda: False,
        ready: Callable[[], bool] = lambda: True,
    ) -> bool:
        """Run a pass's steps between FUSE requests; True if `stop` said so before a step.

        Each step runs synchronously on the trio thread, so it cannot interleave with a
        FUSE request (a write to the same key area). Steps run in slices of PASS_SLICE
        seconds between checkpoints: requests wait at most that long (plus one step), and
        the pass does not pay a scheduler round trip per step. After a step, its delay (the
        rate) is waited; `report` hears the stats about every PROGRESS_INTERVAL seconds;
        the next step waits until `ready()` (the first one is the caller's to time)."""
        last_report = 0.0
        slice_start = trio.current_time()
        for stats, delay in steps:
            if stop():
                return True
            now = trio.current_time()
            if delay or now - slice_start >= PASS_SLICE:
                await trio.sleep(delay)
                slice_start = trio.current_time()
            if report is not None and now - last_report >= PROGRESS_INTERVAL:
                last_report = now
                await report(stats)
            # last, with no await after it: the next step runs at a moment `ready` allows
            while not ready():
                await trio.sleep(QUIESCE_POLL)
                slice_start = trio.current_time()
        return False

    # --- rotation -----------------------------------------------------------------------------
    async def _resume(self, name: str, run: Callable[..., Awaitable[dict]]) -> None:
        """An interrupted pass (`rotate` or `reencrypt`) resumed in the background."""
        try:
            result = await run(PassRequest(), None)
            log.info("resumed %s finished: %s", name, result.get("deks_per_version"))
        except EncfsError as exc:
            log.warning("could not resume the %s: %s", name, exc)

    @contextlib.contextmanager
    def _one_pass(self) -> Iterator[None]:
        """One rotation or re-encryption at a time."""
        if self._rotating:
            raise EncfsError("a rotation or re-encryption is already running")
        self._rotating = True
        try:
            yield
        finally:
            self._rotating = False

    async def rotate(
        self, request: PassRequest, report: Callable[[rewrap.PassStats], Awaitable[None]] | None
    ) -> dict:
        """A rotation (or the resume of one) between FUSE requests: its result. `report`
        hears the pass's progress about every PROGRESS_INTERVAL seconds. The new KEK
        version (rotation.start_rotation) is protected by `request.new_provider` when
        one is given."""
        with self._one_pass():
            if self.volume.config.reencrypt is not None:
                raise UsageError(
                    "a re-encryption of this volume is unfinished (paused?): run "
                    "encfs-gw reencrypt --resume first"
                )
            run = rotation.RotationRun(
                self.volume, request.rate, request.purge_old, request.new_provider
            )
            await self._drive(run.steps(), report)
            counts = run.complete_count()
            if counts is None:  # something moved under the walk: count by reading
                # The census only reads; it may run beside FUSE requests. The pass has
                # just read every key area: no prefetch.
                counts = await trio.to_thread.run_sync(rewrap.census, self.volume, False)
            # Finishing mutates the keyring and config: back on the trio thread.
            return run.finish(counts)

    # --- re-encryption (encfs.admin.reencrypt) --------------------------------------------------
    async def reencrypt(
        self,
        request: PassRequest,
        report: Callable[[reencrypt.ReencryptStats], Awaitable[None]] | None,
    ) -> dict:
        """A re-encryption (or the resume of one) of the mounted volume: its result.

        The start is one synchronous step on the trio thread: from then on writes use
        the new volume key and reads accept both (Keyring.read_epoch_keys) until the
        name pass is over. The name pass moves one directory per step, each taken when
        no mkdir or rename is between its stages (they computed backing names before
        it): no request sees a directory half moved. The data pass runs in slices
        between requests, as a rotation's does; a batch checks
        what it read before it writes (ReencryptPass._drop_raced). Requests may move or
        write what a walk passed: the census after each walk decides whether to walk
        again (at most MAX_WALKS)."""
        with self._one_pass():
            try:
                return await self._reencrypt(request, report)
            finally:
                self.reencrypt_stats = None
                self._pause = None
                self._paused.set()  # (also when it ended otherwise: nobody waits in vain)

    async def _reencrypt(
        self,
        request: PassRequest,
        report: Callable[[reencrypt.ReencryptStats], Awaitable[None]] | None,
    ) -> dict:
        while self.volume.steps_in_flight:
            await trio.sleep(QUIESCE_POLL)
        # One step: from the start on, writes use the new volume key and reads accept
        # both (Keyring.read_epoch_keys) until the name pass is over.
        run = reencrypt.ReencryptRun(
            self.volume, request.rate, request.purge_old, request.new_provider,
            self.volume.follower(),
        )
        self.reencrypt_stats = run.data.stats
        if reencrypt.is_paused(self.volume.config):
            reencrypt.set_paused(self.volume, False)  # run again: resumed
        # a pause asked for during the name pass stops the data pass's first step
        self._pause, self._paused = trio.Event(), trio.Event()
        run.data.replay()  # (nothing: the mount replayed it; a started pass has none)
        # One directory per step, and only while no mkdir or rename is between its
        # stages (they computed backing names before the step)
        steps = ((None, 0.0) for _ in run.name_steps(
            lambda: self.volume.counters["moves"], NAME_WALKS
        ))
        await self._drive(steps, None, ready=lambda: not self.volume.steps_in_flight)
        for walk in range(MAX_WALKS):
            if walk:
                run.walk_again()
            if await self._drive(run.steps(), report, self._pause.is_set):
                # between two steps: nothing gathered was written, nothing is lost
                reencrypt.set_paused(self.volume, True)
                self._paused.set()
                return {"done": False, "paused": True, "target": run.target,
                        **run.data.stats.as_dict()}
            # The census only reads; it may run beside FUSE requests.
            counts = await trio.to_thread.run_sync(rewrap.census, self.volume, False)
            if not run.remaining(counts, run.target):
                break
        # Finishing mutates the keyring and config: back on the trio thread.
        return run.finish(counts)

    async def pause_reencrypt(self) -> dict:
        """Stop the running re-encryption after its current step and record it paused (a
        mount leaves it so; `reencrypt` resumes it); or record a pass that is not
        running paused."""
        if self._pause is not None:
            self._pause.set()
            await self._paused.wait()
        elif self.volume.config.reencrypt is None:
            raise UsageError("no re-encryption is in progress on this volume")
        elif not reencrypt.is_paused(self.volume.config):
            reencrypt.set_paused(self.volume, True)
        return {"done": True, "paused": reencrypt.is_paused(self.volume.config)}

    # --- status -------------------------------------------------------------------------------
    async def status(self, check: bool) -> dict:
        """The daemon's status report (encfs.admin.status), after a revalidation if
        `check`."""
        if check:
            await self.check_now()
        counts = await trio.to_thread.run_sync(rewrap.census, self.volume)
        report = status.mounted_report(
            self.volume, counts, self.health.summary(), self.mountpoint, self.mount_options
        )
        if self.request_loop is not None:
            report["request_loop"] = self.request_loop
        if self.reencrypt_stats is not None:
            report["reencrypt_progress"] = self.reencrypt_stats.as_dict()
        if self.cpu_status is not None:
            report["cpu"] = self.cpu_status()
        return report
