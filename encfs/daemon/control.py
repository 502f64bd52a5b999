"""The daemon's control socket (layer L6): the protocol only; what a request asks for is
done by the supervisor (encfs.daemon.supervisor).

An AF_UNIX stream socket in a private runtime directory (0700, checked after opening:
`encfs.daemon.runtime.open_runtime_dir`), bound through the directory's descriptor, the socket
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
import socket
import struct
from typing import Any

import trio

from encfs.daemon.runtime import fd_path, open_runtime_dir, socket_name, socket_path
from encfs.daemon.supervisor import PassRequest, Supervisor
from encfs.errors import ControlSocketError, EncfsError, NotMounted, UsageError
from encfs.format.volume import MAX_POLICY_SECONDS

log = logging.getLogger(__name__)

MAX_REQUEST = 65536


def _peer_allowed(sock: socket.socket) -> bool:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid in (0, os.geteuid())


class ControlServer:
    """The control socket of one mounted volume, answering through its supervisor."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.backing_path = supervisor.volume.backing_path
        self.mountpoint = supervisor.mountpoint
        self.path = socket_path(self.backing_path)  # for messages
        # Made and checked now, before anything is mounted: an unsafe runtime directory
        # refuses the mount with one line (ControlSocketError) instead of failing later.
        self._dir_fd = open_runtime_dir(create=True)
        self._name = socket_name(self.backing_path)

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and answer until cancelled; the socket is removed on the way out.

        Errors: a connection that fails (a client gone, a malformed request) is logged
        and closed; the next is served. Cancellation: the listener and every connection
        close; a rotation a client asked for stops where it is (it resumes later)."""
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
                await self._answer(stream, request)
            except EncfsError as exc:
                await _send(stream, {"error": str(exc), "exit_code": exc.exit_code})
            except (ValueError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.warning("control connection failed: %s", exc)

    async def _answer(self, stream: trio.SocketStream, request: dict) -> None:
        supervisor = self.supervisor
        op = request.get("op")
        if op in ("rotate", "reencrypt"):

            async def report(stats: Any) -> None:
                await _send(stream, {"progress": stats.as_dict()})

            run = supervisor.rotate if op == "rotate" else supervisor.reencrypt
            await _send(stream, await run(_pass_request(request), report))
        elif op == "reencrypt_pause":
            await _send(stream, await supervisor.pause_reencrypt())
        elif op == "policy":  # set (or clear) the rotation policy
            every, purge_old = _policy_request(request)
            await _send(stream, {"done": True, **await supervisor.set_policy(every, purge_old)})
        elif op == "status":
            reply = await supervisor.status(bool(request.get("check")))
            await _send(stream, {"done": True, **reply})
        else:
            await _send(stream, {"error": f"unknown op {op!r}"})

    def _check_mountpoint(self, request: dict) -> None:
        """A client that found us through a mountpoint says which: it must be ours."""
        asked = request.get("mountpoint")
        if asked is not None and self.mountpoint is not None and asked != self.mountpoint:
            raise NotMounted(
                f"{asked} is not the mountpoint of this daemon of {self.backing_path} "
                f"(mounted on {self.mountpoint})"
            )


def _policy_request(request: dict) -> tuple[int | None, bool]:
    every = request.get("every_seconds")
    purge_old = request.get("purge_old")
    if every is not None and (type(every) is not int or not 1 <= every <= MAX_POLICY_SECONDS):
        raise UsageError("every_seconds must be an integer from 1 to 100 years")
    if not isinstance(purge_old, bool):
        raise UsageError("purge_old must be true or false")
    return every, purge_old


def _pass_request(request: dict) -> PassRequest:
    """A rotate or reencrypt request's rate (a positive number, or null), purge_old, and
    new provider: [kind, options] as the CLI parsed its SPEC (paths made absolute there),
    or null."""
    rate = request.get("rate")
    if rate is not None and (
        not isinstance(rate, int | float) or isinstance(rate, bool) or not rate > 0
    ):
        raise UsageError("rate must be a positive number")
    value = request.get("new_provider")
    if value is not None and (
        not isinstance(value, list) or len(value) != 2 or not isinstance(value[0], str)
        or not isinstance(value[1], dict)
    ):
        raise UsageError("new_provider must be [kind, options] or null")
    new_provider = None if value is None else (value[0], value[1])
    return PassRequest(rate, bool(request.get("purge_old")), new_provider)


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
