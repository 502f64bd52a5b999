"""Reaching a running daemon from outside (layer L7, with the CLI): one request to its
control socket, with its replies. Kept apart from the daemon's modules (mount.py,
control.py) so that `rotate`, `status` and `unmount` on a mount start without importing
pyfuse3, trio, the engine or the crypto; where the daemon is found (its runtime
directory, socket name, the volume lock's holder) is encfs.daemon.runtime, which the
daemon uses too.

A client trusts what answers only after checking its peer credentials (SO_PEERCRED):
the peer must be the process holding the volume's lock (/proc/locks), running as this
user or root.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterator

from encfs.daemon.runtime import (
    fd_path,
    open_runtime_dir,
    process_euid,
    socket_name,
    volume_lock_holder,
)
from encfs.errors import ControlSocketError, NotMounted

MAX_REPLY_LINE = 1 << 20  # a status reply is a few KiB


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def check_daemon_identity(sock: socket.socket, backing_path: str) -> int:
    """The peer must be the volume's daemon: the holder of its lock, running as this user
    or root. Returns its pid; ControlSocketError otherwise (nothing it said is used)."""
    shown = backing_path
    pid, uid, _ = peer_credentials(sock)
    holder = volume_lock_holder(backing_path)
    if holder is None:
        raise ControlSocketError(
            f"a control socket answers for {shown}, but no process holds the volume's lock: "
            "not trusting it"
        )
    if pid != holder:
        raise ControlSocketError(
            f"the control socket for {shown} is served by pid {pid}, not by the volume's "
            f"daemon (pid {holder}): not trusting it"
        )
    if uid not in (0, os.geteuid()) or process_euid(pid) != uid:
        raise ControlSocketError(
            f"the daemon of {shown} runs as uid {uid}, neither this user nor root: "
            "not trusting it"
        )
    return pid


def daemon_listening(backing_path: str) -> bool:
    """Whether the volume's lock is held and a control socket for it is in our runtime
    directory (is its daemon running? `request` then checks who answers)."""
    if volume_lock_holder(backing_path) is None:
        return False
    try:
        dir_fd = open_runtime_dir(create=False)
    except FileNotFoundError:
        return False
    try:
        os.stat(socket_name(backing_path), dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    finally:
        os.close(dir_fd)
    return True


def request(
    backing_path: str, message: dict, mountpoint: str | None = None
) -> Iterator[dict]:
    """Send one request to the daemon of `backing_path`, yield its replies (dicts).

    The daemon's identity is checked before anything is sent; with `mountpoint`, the
    daemon must also say it serves that mountpoint (so a lookup by mountpoint never
    reaches another volume's daemon). A malformed reply is a ControlSocketError.
    """
    shown = backing_path
    try:
        dir_fd = open_runtime_dir(create=False)
    except FileNotFoundError:
        raise NotMounted(f"no encfs-gw daemon answers for {shown}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(fd_path(dir_fd, socket_name(backing_path)))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotMounted(f"no encfs-gw daemon answers for {shown}") from None
        except OSError as exc:
            raise ControlSocketError(
                f"cannot reach the daemon of {shown}: {exc.strerror}"
            ) from None
        check_daemon_identity(sock, backing_path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(dir_fd)
    if mountpoint is not None:
        message = {**message, "mountpoint": os.path.realpath(mountpoint)}
    with sock, sock.makefile("rwb") as channel:
        try:
            channel.write(json.dumps(message).encode() + b"\n")
            channel.flush()
        except OSError as exc:
            raise ControlSocketError(f"the daemon of {shown} hung up: {exc.strerror}") from None
        while True:
            try:
                line = channel.readline(MAX_REPLY_LINE + 1)
            except OSError as exc:
                raise ControlSocketError(
                    f"lost the daemon of {shown}: {exc.strerror}"
                ) from None
            if not line:
                return
            yield _parse_reply(line, shown)


def _parse_reply(line: bytes, shown: str) -> dict:
    if len(line) > MAX_REPLY_LINE or not line.endswith(b"\n"):
        raise ControlSocketError(f"malformed reply from the daemon of {shown} (too long or cut)")
    try:
        reply = json.loads(line)
    except ValueError:
        raise ControlSocketError(f"malformed reply from the daemon of {shown} (not JSON)") from None
    if not isinstance(reply, dict):
        raise ControlSocketError(f"malformed reply from the daemon of {shown} (not an object)")
    return reply


def one_reply(backing_path: str, message: dict, mountpoint: str | None = None) -> dict:
    """A request answered by exactly one line (status, policy)."""
    replies = list(request(backing_path, message, mountpoint))
    if len(replies) != 1:
        raise ControlSocketError(
            f"malformed reply from the daemon of {backing_path} "
            f"({len(replies)} lines instead of one)"
        )
    return replies[0]
