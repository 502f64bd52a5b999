"""Run the `encfs-gw` command line as another (unprivileged) user.

`python tests/helpers/as_user.py UID GID ARGS...` runs `encfs-gw ARGS` as UID:GID. The
test interpreter lives under /root, which other users cannot enter, so this script is
started as root by that interpreter, imports everything encfs-gw may need, and only then
gives up root for good (setgroups, setresgid, setresuid), like a login of that user:
from then on it is an ordinary process of UID, dumpable again as such a process would
be (giving up root made it not dumpable), with no capability. Helpers encfs-gw starts
(the unmount guard, the CPU warmer) run with the system's interpreter, which that user
can execute; they use only the standard library.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys

PR_SET_DUMPABLE = 4
SYSTEM_PYTHON = "/usr/bin/python3"


def preload() -> None:
    # Everything encfs-gw imports lazily, and the codecs and stdlib modules it touches.
    import _strptime  # noqa: F401
    import argparse  # noqa: F401
    import encodings.idna
    import encodings.unicode_escape  # noqa: F401
    import fcntl  # noqa: F401
    import getpass  # noqa: F401
    import hashlib  # noqa: F401
    import json  # noqa: F401
    import logging.handlers  # noqa: F401
    import mmap  # noqa: F401
    import selectors  # noqa: F401
    import shlex  # noqa: F401
    import subprocess  # noqa: F401
    import tempfile  # noqa: F401

    # By name, not by import statements: ruff --fix once dropped such a block as unused.
    for module in (
        "encfs.admin.fsck",
        "encfs.admin.keyslots",
        "encfs.admin.quarantine",
        "encfs.admin.rotation",
        "encfs.admin.status",
        "encfs.cli",
        "encfs.client",
        "encfs.config_store",
        "encfs.daemon.control",
        "encfs.daemon.health",
        "encfs.daemon.mount",
        "encfs.daemon.supervisor",
        "encfs.daemon.systemd",
        "encfs.engine",
        "encfs.keys.command",
        "encfs.keys.keyfile",
        "encfs.keys.registry",
    ):
        importlib.import_module(module)


def main() -> int:
    uid, gid = int(sys.argv[1]), int(sys.argv[2])
    preload()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    sys.executable = SYSTEM_PYTHON
    from encfs.cli import main as cli_main

    return cli_main(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
