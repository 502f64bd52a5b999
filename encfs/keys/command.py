"""The `command` provider: an external program prints a 256-bit key on stdout.

SPEC: `command:[--timeout=SECONDS] ARGV...` -- ARGV is split like a shell would
(shlex) but never run through a shell. A program name without '/' is resolved in PATH
when the spec is parsed and stored as an absolute path.

The program runs with stdin on /dev/null, in its own session (no controlling terminal),
with umask 077 and our environment less the secrets encfs-gw knows of (encfs.hygiene:
VAULT_TOKEN, ENCFS_PKCS11_PIN, AWS credentials, passphrase variables), plus
ENCFS_GW_PURPOSE=protect|recover and ENCFS_GW_VOLUME_BINDING=<hex of the binding>.
Its stderr is passed through. On exit status 0 its stdout, less one trailing newline,
must be exactly 64 hex digits: the key that seals the KEK
(AES-256-GCM, binding as AAD). A program that prints a *passphrase* belongs to the
passphrase provider (`prog | encfs-gw ... --provider passphrase:stdin`), which stretches
it with Argon2id; this provider never stretches.

Exit statuses (sysexits.h): 75 EX_TEMPFAIL -> ProviderUnavailable (try again later);
77 EX_NOPERM -> KeyRevoked (access denied or key revoked); any other failure ->
KeyMissing with the program's first stderr line. Timeout -> ProviderUnavailable.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, NamedTuple

from encfs import hygiene
from encfs.errors import (
    KeyMissing,
    KeyRevoked,
    ProviderConfigError,
    ProviderUnavailable,
    key_source_error,
)
from encfs.keys.provider import KeyProvider, Record, open_with_secret, seal_with_secret

DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 3600.0
EXIT_TEMPFAIL = 75  # sysexits.h EX_TEMPFAIL
EXIT_NOPERM = 77  # sysexits.h EX_NOPERM
MAX_STDOUT = 64 * 1024
ENV_BINDING = "ENCFS_GW_VOLUME_BINDING"
ENV_PURPOSE = "ENCFS_GW_PURPOSE"
_HEX_KEY = re.compile(rb"[0-9a-fA-F]{64}\Z")
_USAGE = "command:[--timeout=SECONDS] PROGRAM [ARG...]"


def _parse_timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_TIMEOUT:
        raise ProviderConfigError(f"command timeout must be 0 < SECONDS <= {MAX_TIMEOUT:g}")
    return value


class _Run(NamedTuple):
    returncode: int
    stdout: bytes
    first_err: str  # first non-empty stderr line, for error messages


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # The program runs in its own session: kill its helpers too, then reap it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _forward_stderr(data: bytes) -> None:
    stream = sys.stderr
    if stream is None:
        return
    with contextlib.suppress(OSError, ValueError):
        stream.write(data.decode("utf-8", "replace"))
        stream.flush()


class CommandProvider(KeyProvider):
    name = "command"

    @classmethod
    def options_from_spec(cls, spec_args: str) -> dict[str, Any]:
        try:
            argv = shlex.split(spec_args)
        except ValueError as exc:
            raise ProviderConfigError(f"bad command spec: {exc}") from None
        timeout = DEFAULT_TIMEOUT
        while argv and argv[0].startswith("--timeout="):
            timeout = _parse_timeout(argv.pop(0).partition("=")[2])
        if not argv:
            raise ProviderConfigError(f"command provider needs a program: {_USAGE}")
        program = argv[0]
        if "/" in program:
            program = os.path.abspath(program)
        else:
            found = shutil.which(program)
            if found is None:
                raise ProviderConfigError(f"command {program!r} not found in PATH")
            program = os.path.abspath(found)
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise ProviderConfigError(f"command {program} is not an executable file")
        return {"argv": [program, *argv[1:]], "timeout": timeout}

    @property
    def argv(self) -> list[str]:
        argv = self.options.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ProviderConfigError("command provider options lack 'argv' (a list of strings)")
        return argv

    @property
    def timeout(self) -> float:
        timeout = self.options.get("timeout", DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise ProviderConfigError("command provider option 'timeout' must be a number")
        return _parse_timeout(str(timeout))

    def _run(self, purpose: str, binding: bytes) -> _Run:
        argv, timeout = self.argv, self.timeout
        env = hygiene.provider_environment({ENV_PURPOSE: purpose, ENV_BINDING: binding.hex()})
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=env, start_new_session=True, close_fds=True, umask=hygiene.CHILD_UMASK,
            )
        except OSError as exc:
            raise key_source_error(
                exc, f"command {argv[0]}", "executable", failed=" could not be started"
            ) from None
        try:
            out, err, timed_out = self._collect(proc, time.monotonic() + timeout)
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        if len(out) > MAX_STDOUT:
            _kill_group(proc)
            raise ProviderConfigError(f"command {argv[0]} printed more than {MAX_STDOUT} bytes")
        if timed_out:
            _kill_group(proc)
            raise ProviderUnavailable(f"command {argv[0]} did not finish within {timeout:g} s")
        first = next((ln.strip() for ln in err.splitlines() if ln.strip()), b"")
        return _Run(proc.returncode, out, first[:200].decode("utf-8", "replace"))

    @staticmethod
    def _collect(proc: subprocess.Popen[bytes], deadline: float) -> tuple[bytes, bytes, bool]:
        """Read stdout and relay stderr until the program exits or the deadline passes.

        A pidfd tells us when the program itself exits, so a helper it left holding the
        pipes open cannot keep us waiting until the timeout.
        """
        assert proc.stdout is not None and proc.stderr is not None
        out, err = bytearray(), bytearray()
        sel = selectors.DefaultSelector()
        pidfd = os.pidfd_open(proc.pid)
        try:
            sel.register(proc.stdout, selectors.EVENT_READ, "out")
            sel.register(proc.stderr, selectors.EVENT_READ, "err")
            sel.register(pidfd, selectors.EVENT_READ, "exit")
            exited = False
            while len(sel.get_map()) > (0 if exited else 1) and len(out) <= MAX_STDOUT:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return bytes(out), bytes(err), True
                events = sel.select(remaining if not exited else 0)
                if exited and not events:
                    break  # exited and the pipes are drained (a helper may hold them)
                for key, _ in events:
                    if key.data == "exit":
                        sel.unregister(pidfd)
                        exited = True
                        continue
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                    elif key.data == "out":
                        out += chunk
                    else:
                        err += chunk
                        _forward_stderr(chunk)
            if len(out) > MAX_STDOUT:
                return bytes(out), bytes(err), False  # the caller kills it
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.001))
            except subprocess.TimeoutExpired:
                return bytes(out), bytes(err), True
            return bytes(out), bytes(err), False
        finally:
            sel.close()
            os.close(pidfd)

    def _key(self, purpose: str, binding: bytes) -> bytes:
        run = self._run(purpose, binding)
        program = self.argv[0]
        detail = f": {run.first_err}" if run.first_err else ""
        if run.returncode == EXIT_TEMPFAIL:
            raise ProviderUnavailable(
                f"command {program} says the key is temporarily unavailable (exit 75){detail}"
            )
        if run.returncode == EXIT_NOPERM:
            raise KeyRevoked(f"command {program} denied access to the key (exit 77){detail}")
        if run.returncode < 0:
            raise KeyMissing(
                f"command {program} was killed by {signal.Signals(-run.returncode).name}{detail}"
            )
        if run.returncode != 0:
            raise KeyMissing(f"command {program} failed with exit status {run.returncode}{detail}")
        text = run.stdout.removesuffix(b"\n")
        if not _HEX_KEY.match(text):
            raise ProviderConfigError(
                f"command {program} did not print a 256-bit key (64 hex digits) on stdout; "
                "for a program that prints a passphrase use the passphrase provider"
            )
        return bytes.fromhex(text.decode("ascii"))

    def protect(self, kek: bytes, binding: bytes) -> Record:
        return {"sealed_kek": seal_with_secret(self._key("protect", binding), kek, binding)}

    def recover(self, record: Record, binding: bytes) -> bytes:
        return open_with_secret(
            self._key("recover", binding), record.get("sealed_kek"), binding,
            f"the key printed by command {self.argv[0]} does not open this volume",
        )

    def describe(self) -> str:
        return f"command:{shlex.join(self.argv)}"
