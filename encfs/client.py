"""Reaching a running daemon from outside (layer L6): its mount in the mount table, its
control socket, one request with its replies. Kept apart from the daemon's modules
(mount.py, control.py) so that `rotate`, `status` and `unmount` on a mount start without
importing pyfuse3, trio, the engine or the crypto."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterator

from encfs.errors import NotMounted

FSTYPE = "fuse.encfs-gw"


def _unescape_mountinfo(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def find_mount(mountpoint: str) -> tuple[str, str] | None:
    """(fstype, source) of the mount at `mountpoint`, from /proc/self/mountinfo."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            sep = fields.index("-")
            if _unescape_mountinfo(fields[4]) == target:
                found = (fields[sep + 1], _unescape_mountinfo(fields[sep + 2]))
    return found


def runtime_dir() -> str:
    if os.geteuid() == 0:
        return "/run/encfs-gw"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/encfs-gw-{os.geteuid()}"
    return os.path.join(base, "encfs-gw")


def socket_path(backing_path: str) -> str:
    digest = hashlib.sha256(os.path.abspath(backing_path).encode()).hexdigest()[:32]
    return os.path.join(runtime_dir(), f"{digest}.sock")


def request(backing_path: str, message: dict) -> Iterator[dict]:
    """Send one request to the daemon of `backing_path`, yield its replies."""
    path = socket_path(backing_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise NotMounted(f"no encfs-gw daemon answers for {backing_path}") from None
    with sock, sock.makefile("rwb") as channel:
        channel.write(json.dumps(message).encode() + b"\n")
        channel.flush()
        for line in channel:
            yield json.loads(line)
