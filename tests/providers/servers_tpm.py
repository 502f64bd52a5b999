"""A real software TPM (swtpm) for tests, reached through tpm2-tools' swtpm TCTI.

swtpm runs in the foreground as our child (so we reap it), listens on 127.0.0.1 on two
consecutive free ports (the swtpm TCTI uses PORT for commands and PORT+1 for control),
and keeps its state (seeds, NV) in a directory, so a restart on the same directory is
the same TPM with PCRs reset, like a reboot.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

START_DEADLINE = 10.0
STOP_DEADLINE = 5.0

MISSING = [
    tool
    for tool in ("swtpm", "tpm2_createprimary", "tpm2_unseal", "tpm2_pcrextend")
    if shutil.which(tool) is None
]
SKIP_REASON = (
    f"{', '.join(MISSING)} not installed (apt install swtpm swtpm-tools tpm2-tools "
    "libtss2-tcti-swtpm0)"
)


def bind_consecutive_ports() -> tuple[socket.socket, socket.socket]:
    """Two sockets bound to 127.0.0.1 ports P and P+1 (the caller closes them)."""
    for _ in range(100):
        first = socket.socket()
        first.bind(("127.0.0.1", 0))
        port = first.getsockname()[1]
        second = socket.socket()
        try:
            if port < 65535:
                second.bind(("127.0.0.1", port + 1))
                return first, second
        except OSError:
            pass
        first.close()
        second.close()
    raise RuntimeError("no two consecutive free TCP ports on 127.0.0.1")


def _two_free_ports() -> int:
    """A port P such that P and P+1 are both free right now (bind-and-release)."""
    first, second = bind_consecutive_ports()
    with first, second:
        return first.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Swtpm:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self) -> None:
        """Start and wait until both ports accept; retry on a port lost to a race."""
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline:
            self.port = _two_free_ports()
            with open(self.state_dir / "swtpm.log", "ab") as log:
                self.proc = subprocess.Popen(
                    [
                        "swtpm",
                        "socket",
                        "--tpm2",
                        "--tpmstate",
                        f"dir={self.state_dir}",
                        "--server",
                        f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                        "--ctrl",
                        f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                        "--flags",
                        "not-need-init,startup-clear",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            while time.monotonic() < deadline:
                if _accepts(self.port) and _accepts(self.port + 1):
                    return
                try:
                    # Doubles as the poll interval and as the early-exit detector.
                    self.proc.wait(timeout=0.01)
                except subprocess.TimeoutExpired:
                    continue
                break  # swtpm exited (port taken meanwhile?): try other ports
            self.stop()
        raise RuntimeError(f"swtpm did not start within {START_DEADLINE:g} s; see swtpm.log")

    def stop(self) -> None:
        """Stop our swtpm by PID and reap it, with a bound; SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_DEADLINE)

    def tool(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run a tpm2-tools command against this TPM (raises if it fails)."""
        return subprocess.run(
            list(argv),
            env=dict(os.environ, TPM2TOOLS_TCTI=self.tcti),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )

    def pcr_extend(self, pcr: int, data: bytes = b"something else booted") -> None:
        self.tool("tpm2_pcrextend", f"{pcr}:sha256={hashlib.sha256(data).hexdigest()}")

    def handles(self, kind: str) -> list[str]:
        """Handles left in the TPM: 'transient' objects or 'loaded-session's."""
        out = self.tool("tpm2_getcap", f"handles-{kind}").stdout
        return [line.strip("- ").strip() for line in out.splitlines() if line.strip()]
