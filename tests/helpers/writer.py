"""A program that writes by path into a mountpoint while its daemon is killed (issue 20):
it fsyncs one file, then appends to another, and after its first failure also tries to
create a new file every round. Used on the host (tests/integration/test_dead_daemon.py)
and inside the systemd container (tests/container)."""

from __future__ import annotations

import json
import select
import subprocess
import time
from collections.abc import Sequence

WAIT = 30.0
SYNCED = b"fsync'ed before the kill\n" * 4096

# argv: MOUNTPOINT. Writes by path until its stdin is closed: first `synced` (fsync'ed),
# then appends to `stream`; after its first failure it also tries to create `new-N` every
# round. Prints "synced", "writing", "failing" as it gets there, then its counts as JSON.
# Each line read from stdin holds it for one more round (see Writer.result_after).
WRITER = r"""
import errno, json, os, select, sys
mnt = sys.argv[1]
with open(os.path.join(mnt, "synced"), "wb") as f:
    f.write(SYNCED)
    f.flush()
    os.fsync(f.fileno())
print("synced", flush=True)
counts = {"ok": 0, "errors": {}, "creates_tried": 0}
stage = "synced"
rounds = 0
while True:
    if select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.readline():
        break
    rounds += 1
    names = ["stream"] + ([f"new-{rounds}"] if counts["errors"] else [])
    for name in names:
        counts["creates_tried"] += name != "stream"
        try:
            with open(os.path.join(mnt, name), "ab") as f:
                f.write(b"plaintext by path " * 200)
            counts["ok"] += 1
        except OSError as exc:
            key = errno.errorcode.get(exc.errno, str(exc.errno))
            counts["errors"][key] = counts["errors"].get(key, 0) + 1
    if stage == "synced" and counts["ok"] >= 20:
        stage = "writing"
        print(stage, flush=True)
    if stage == "writing" and counts["errors"]:
        stage = "failing"
        print(stage, flush=True)
print(json.dumps(counts), flush=True)
""".replace("SYNCED", repr(SYNCED))


class Writer:
    """The writer running as `argv` (e.g. [python, "-c", WRITER, mountpoint])."""

    def __init__(self, argv: Sequence[str], **popen) -> None:
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, **popen)
        self.reached: set[str] = set()

    def wait_for(self, stage: str) -> None:
        deadline = time.monotonic() + WAIT
        while stage not in self.reached and time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], deadline - time.monotonic())[0]:
                line = self.proc.stdout.readline().strip()
                assert line, f"the writer ended before {stage!r}"
                self.reached.add(line)
        assert stage in self.reached, f"the writer did not reach {stage!r} within {WAIT} s"

    def result_after(self, rounds_of_failure: int) -> dict:
        """Let it fail (and try to create files) a while longer, then stop it."""
        self.wait_for("failing")
        return self.result(rounds_of_failure)

    def result(self, more_rounds: int = 0) -> dict:
        """Stop it after at least `more_rounds` more rounds; its counts."""
        self.proc.stdin.write("\n" * more_rounds)  # it reads one line per round
        self.proc.stdin.flush()
        out, _ = self.proc.communicate(timeout=WAIT)
        return json.loads(out.strip().splitlines()[-1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)
