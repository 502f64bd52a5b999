"""Which request loop the tests' mounts run on.

`make test` runs tests/fs and tests/integration a second time with
ENCFS_GW_REQUEST_LOOP=stock (pyfuse3's own loop; encfs/daemon/request_loop.py): every
daemon the tests start inherits it. A test of what only the accelerated loop has (its
busy-poll, the CPU warmer it feeds, its request fast path) is marked `accelerated_only`
and skips itself in that pass.
"""

from __future__ import annotations

import os

import pytest

from encfs.daemon.request_loop import ENV

STOCK_PASS = os.environ.get(ENV) == "stock"



def loop_environment() -> dict[str, str]:
    """For a test that starts the CLI with an environment of its own: the pass's mode."""
    return {ENV: os.environ[ENV]} if ENV in os.environ else {}


accelerated_only = pytest.mark.skipif(
    STOCK_PASS,
    reason=f"the accelerated loop's busy-poll or CPU warmer: this pass runs the stock loop "
    f"({ENV}=stock)",
)


def spinners(daemon: int) -> list[int]:
    """The CPU warmer's spinner processes among the daemon's children."""
    found = []
    for task in os.listdir(f"/proc/{daemon}/task"):
        with open(f"/proc/{daemon}/task/{task}/children") as f:
            for child in f.read().split():
                with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                    if b"/encfs/fuse/accel/spinner.py" in cmdline.read():
                        found.append(int(child))
    return found
