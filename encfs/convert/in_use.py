"""Is the directory in use? Open files, working and root directories, mapped files of
every process we can see, and mounts below it."""

from __future__ import annotations

import contextlib
import os

from encfs.convert.tree import printable


def _unescape_mountinfo(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 3 < len(text) and text[i + 1 : i + 4].isdigit():
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def users_of(real_dir: str) -> list[str]:
    """Who uses something under `real_dir`: open files, current or root directories,
    mapped files of every process we can see (/proc/*/fd, cwd, root, maps), and mounts
    below it (/proc/self/mountinfo). Each finding is one short description."""
    prefix = real_dir.rstrip("/") + "/"

    def under(path: str, escaped: bool = False) -> bool:
        # /proc/PID/maps shows a newline in a path as \012
        top = real_dir.replace("\n", "\\012") if escaped else real_dir
        return (path == top or path.startswith(top.rstrip("/") + "/")) and not path.endswith(
            " (deleted)"
        )

    found: list[str] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        for line in table:
            fields = line.split(" ")
            mountpoint = _unescape_mountinfo(fields[4]) if len(fields) > 4 else ""
            if mountpoint.startswith(prefix):
                found.append(f"a filesystem is mounted at {printable(mountpoint)}")
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        base = f"/proc/{entry}"
        try:
            with open(f"{base}/comm", encoding="utf-8", errors="replace") as comm:
                who = f"process {entry} ({comm.read().strip()})"
        except OSError:
            continue
        paths: list[tuple[str, str]] = []
        for what in ("cwd", "root"):
            with contextlib.suppress(OSError):
                paths.append((what, os.readlink(f"{base}/{what}")))
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"{base}/fd"):
                with contextlib.suppress(OSError):
                    paths.append(("open file", os.readlink(f"{base}/fd/{fd}")))
        try:
            with open(f"{base}/maps", encoding="utf-8", errors="surrogateescape") as maps:
                for line in maps:
                    parts = line.rstrip("\n").split(maxsplit=5)
                    if len(parts) == 6 and under(parts[5], escaped=True):
                        paths.append(("mapped file", parts[5]))
        except OSError:
            pass
        for what, path in paths:
            if what == "mapped file" or under(path):
                found.append(f"{who} has {what} {printable(path)}")
                break
    return found
