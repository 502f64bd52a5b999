"""The daemon's control socket (layer L6): `rotate` and `status` on a mounted volume.

An AF_UNIX stream socket in a private runtime directory (0700, checked after opening:
`encfs.client.open_runtime_dir`), bound through the directory's descriptor, the socket
itself 0600, and every connection's peer credentials checked (SO_PEERCRED): only root or
the uid the daemon runs as may talk to it (others get ControlSocketError's code, 27).
Clients check the daemon in turn (`encfs.client.check_daemon_identity`). The protocol is
JSON lines: one request, then progress lines, then a final line with "done" or "error".
A request naming a mountpoint other than this daemon's is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import struct
from collections.abc import Callable
from typing import Any

import trio

from encfs import config_store, keyslots, rotation
from encfs import health as health_mod
from encfs.client import fd_path, open_runtime_dir, socket_name, socket_path
from encfs.engine import Volume
from encfs.errors import ControlSocketError, EncfsError, NotMounted, UsageError
from encfs.format.volume import MAX_POLICY_SECONDS

log = logging.getLogger(__name__)

MAX_REQUEST = 65536
PROGRESS_INTERVAL = 1.0
PASS_SLICE = 0.005  # seconds of re-wrap work between two checkpoints (FUSE latency bound)
POLICY_IDLE_CHECK = 3600.0  # seconds between reads of the rotation policy when none is due
POLICY_RETRY = 300.0  # after an automatic rotation failed (provider down ...)


def _peer_allowed(sock: socket.socket) -> bool:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid in (0, os.geteuid())


class ControlServer:
    """The daemon's services besides FUSE: control socket, key health task, rotation."""

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
        self.path = socket_path(volume.backing_path)  # for messages
        self.mountpoint = mountpoint
        # Made and checked now, before anything is mounted: an unsafe runtime directory
        # refuses the mount with one line (ControlSocketError) instead of failing later.
        self._dir_fd = open_runtime_dir(create=True)
        self._name = socket_name(volume.backing_path)
        self.health_interval = health_interval
        self.invalidate = invalidate
        self.mount_options = mount_options or []
        self.health = health_mod.KeyHealth(
            volume, volume.audit, grace=health_grace, clock=trio.current_time
        )
        self.on_state_change: Callable[[str], None] | None = None
        # The CPU warmer's and the busy-poll's state for `status` (encfs.mount sets it).
        self.cpu_status: Callable[[], dict] | None = None
        self._rotating = False
        self._check_lock = trio.Lock()
        self._policy_changed = trio.Event()
        self._policy_lock = trio.Lock()

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
        if self._rotating or self.volume.config.rotation is not None:
            return
        try:
            changes = await trio.to_thread.run_sync(
                keyslots.follow_key_versions, self.volume
            )
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
        if self._rotating or config.rotation is not None:
            return min(float(config.rotation_policy["every_seconds"]), POLICY_RETRY), None
        log.info("the rotation policy asks for a new KEK version")
        try:
            result = await self._run_pass(
                rate=None, purge_old=config.rotation_policy["purge_old"], report=None
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

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        # A socket left by a daemon that died (we hold the volume lock: it is gone).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._name, dir_fd=self._dir_fd)
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            await listener.bind(fd_path(self._dir_fd, self._name))
        finally:
            os.umask(old_umask)
        listener.listen(8)
        try:
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.health_loop)
                nursery.start_soon(self.policy_loop)
                if self.volume.config.rotation is not None:
                    # A pass was interrupted (crash, unmount): resume it in the background.
                    nursery.start_soon(self._resume)
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(self._handle, conn)
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._name, dir_fd=self._dir_fd)

    def close(self) -> None:
        """Release the runtime directory's descriptor (after serve() returned)."""
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    async def _handle(self, conn: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(conn)
        async with stream:
            if not _peer_allowed(conn._sock):
                # Its request is read (and ignored) first: closing on unread data would
                # reset the connection before the refusal arrives.
                unwanted = (ValueError, trio.BrokenResourceError)
                with trio.move_on_after(1), contextlib.suppress(*unwanted):
                    await _receive_line(stream)
                await _send(
                    stream,
                    {
                        "error": "permission denied: the daemon serves only its own user and root",
                        "exit_code": ControlSocketError.exit_code,
                    },
                )
                return
            try:
                request = json.loads(await _receive_line(stream))
                if not isinstance(request, dict):
                    raise ValueError("the request is not a JSON object")
                self._check_mountpoint(request)
                if request.get("op") == "rotate":
                    await self._rotate(stream, request)
                elif request.get("op") == "policy":  # set (or clear) the rotation policy
                    await self._set_policy(request)
                    _, rotated = await self.apply_policy()
                    self._policy_changed.set()  # the loop recomputes its timer
                    await _send(
                        stream,
                        {
                            "done": True,
                            "rotated_to": rotated,
                            **rotation.policy_summary(self.volume.config),
                        },
                    )
                elif request.get("op") == "status":
                    if request.get("check"):
                        await self.check_now()
                    await _send(stream, {"done": True, **await self._status()})
                else:
                    await _send(stream, {"error": f"unknown op {request.get('op')!r}"})
            except EncfsError as exc:
                await _send(stream, {"error": str(exc), "exit_code": exc.exit_code})
            except (ValueError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.warning("control connection failed: %s", exc)

    async def _set_policy(self, request: dict) -> None:
        every = request.get("every_seconds")
        purge_old = request.get("purge_old")
        if every is not None and (
            type(every) is not int or not 1 <= every <= MAX_POLICY_SECONDS
        ):
            raise UsageError("every_seconds must be an integer from 1 to 100 years")
        if not isinstance(purge_old, bool):
            raise UsageError("purge_old must be true or false")
        async with self._policy_lock:
            rotation.set_policy(self.volume, every, purge_old)

    def _check_mountpoint(self, request: dict) -> None:
        """A client that found us through a mountpoint says which: it must be ours."""
        asked = request.get("mountpoint")
        if asked is not None and self.mountpoint is not None and asked != self.mountpoint:
            raise NotMounted(
                f"{asked} is not the mountpoint of this daemon of {self.volume.backing_path} "
                f"(mounted on {self.mountpoint})"
            )

    async def _status(self) -> dict:
        counts = await trio.to_thread.run_sync(rotation.census, self.volume)
        config = self.volume.config
        return {
            **self.health.summary(),
            **rotation.volume_report(self.volume, counts),
            "mountpoint": self.mountpoint,
            "mount_options": self.mount_options,
            "counters": dict(self.volume.counters),
            "providers": sorted(
                {p.kind for v in config.kek_versions.values() for p in v.protectors}
            ),
            **({"cpu": self.cpu_status()} if self.cpu_status is not None else {}),
        }

    async def _resume(self) -> None:
        try:
            result = await self._run_pass(rate=None, purge_old=False, report=None)
            log.info("resumed re-wrap pass finished: %s", result.get("deks_per_version"))
        except EncfsError as exc:
            log.warning("could not resume the re-wrap pass: %s", exc)

    async def _rotate(self, stream: trio.SocketStream, request: dict) -> None:
        async def report(stats: rotation.PassStats) -> None:
            await _send(stream, {"progress": stats.as_dict()})

        result = await self._run_pass(
            request.get("rate"), bool(request.get("purge_old")), report
        )
        await _send(stream, result)

    async def _run_pass(self, rate: float | None, purge_old: bool, report: Any) -> dict:
        if self._rotating:
            raise EncfsError("a rotation is already running")
        self._rotating = True
        try:
            target = rotation.start_rotation(self.volume)
            rewrap = rotation.RewrapPass(self.volume, target)
            last_report = 0.0
            slice_start = trio.current_time()
            # Each step (one key area) runs synchronously on the trio thread, so it
            # cannot interleave with a FUSE write to the same key area. Steps run in
            # slices of PASS_SLICE seconds between checkpoints: FUSE requests wait at most
            # that long, and the pass does not pay a scheduler round trip per key area.
            for stats in rewrap.steps():
                delay = rotation.throttle_delay(stats, rate)
                now = trio.current_time()
                if delay or now - slice_start >= PASS_SLICE:
                    await trio.sleep(delay)
                    slice_start = trio.current_time()
                if report is not None and now - last_report >= PROGRESS_INTERVAL:
                    last_report = now
                    await report(stats)
            counts = rewrap.complete_count()
            if counts is None:  # something moved under the walk: count by reading
                # The census only reads; it may run beside FUSE requests. The pass has
                # just read every key area: no prefetch.
                counts = await trio.to_thread.run_sync(rotation.census, self.volume, False)
            # Finishing mutates the keyring and config: back on the trio thread.
            return rotation.verify_and_finish(self.volume, rewrap, purge_old, counts)
        finally:
            self._rotating = False


async def _send(stream: trio.SocketStream, message: dict) -> None:
    await stream.send_all(json.dumps(message).encode() + b"\n")


async def _receive_line(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too large")
    return data.split(b"\n", 1)[0]
