"""The systemd-credential provider with credentials made by the real systemd-creds.

Each test gets a private host secret (SYSTEMD_CREDENTIAL_SECRET in tmp_path, never
/var/lib/systemd). Credentials are encrypted with `systemd-creds encrypt --with-key=host`
and decrypted with `systemd-creds decrypt` into a private CREDENTIALS_DIRECTORY, which
is what systemd does at service start for LoadCredentialEncrypted=. What cannot run
here is systemd itself starting a unit (that needs systemd as PID 1).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from encfs.errors import KeyMissing, ProviderConfigError, WrongKey
from encfs.keys.systemd_credential import SystemdCredentialProvider
from tests.providers.contract import BINDING, ProviderContract

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-creds") is None, reason="systemd-creds (systemd >= 250) not installed"
)


class Creds:
    """A private systemd credential store: host secret, .cred files, a credentials dir."""

    def __init__(self, root) -> None:
        self.root = root
        self.secret = root / "credential.secret"
        self.store = root / "credstore.encrypted"
        self.directory = root / "credentials"
        self.store.mkdir(mode=0o700)
        self.directory.mkdir(mode=0o700)

    def run(self, *args: str, stdin: bytes = b"", secret=None) -> subprocess.CompletedProcess:
        env = dict(os.environ, SYSTEMD_CREDENTIAL_SECRET=str(secret or self.secret))
        return subprocess.run(
            ["systemd-creds", *args],
            input=stdin,
            capture_output=True,
            env=env,
            timeout=30,
            check=False,
        )

    def encrypt(self, name: str, plaintext: bytes) -> str:
        """Like `systemd-creds encrypt --with-key=host --name=NAME - NAME.cred`."""
        out = str(self.store / f"{name}.cred")
        done = self.run("encrypt", "--with-key=host", f"--name={name}", "-", out, stdin=plaintext)
        assert done.returncode == 0, done.stderr.decode()
        return out

    def load(self, name: str, cred: str, secret=None) -> subprocess.CompletedProcess:
        """What systemd does at service start: decrypt into CREDENTIALS_DIRECTORY, 0400."""
        target = self.directory / name
        done = self.run("decrypt", f"--name={name}", cred, str(target), secret=secret)
        if done.returncode == 0:
            target.chmod(0o400)
        return done

    def install(self, name: str, plaintext: bytes) -> None:
        done = self.load(name, self.encrypt(name, plaintext))
        assert done.returncode == 0, done.stderr.decode()


@pytest.fixture
def creds(tmp_path, monkeypatch):
    store = Creds(tmp_path)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(store.directory))
    return store


def make(name: str) -> SystemdCredentialProvider:
    provider = SystemdCredentialProvider(SystemdCredentialProvider.options_from_spec(name))
    provider.prepare_new()
    return provider


class TestSystemdCredentialContract(ProviderContract):
    @pytest.fixture
    def provider(self, creds):
        creds.install("vol-a.kek", os.urandom(32).hex().encode() + b"\n")
        return make("vol-a.kek")

    @pytest.fixture
    def wrong_provider(self, creds):
        creds.install("vol-b.kek", os.urandom(32).hex().encode() + b"\n")
        return make("vol-b.kek")


def test_wrong_host_secret_cannot_decrypt(creds, tmp_path):
    cred = creds.encrypt("kek", os.urandom(32).hex().encode())
    (tmp_path / "other-host").mkdir()
    other = Creds(tmp_path / "other-host")
    other.encrypt("unrelated", b"x")  # makes the other host's own secret
    assert other.secret.exists() and other.secret.read_bytes() != creds.secret.read_bytes()
    done = creds.load("kek", cred, secret=other.secret)
    assert done.returncode != 0
    assert b"Decryption failed" in done.stderr
    assert not (creds.directory / "kek").exists()
    assert creds.load("kek", cred).returncode == 0  # the right host still can


def test_credential_name_is_enforced_by_systemd(creds):
    cred = creds.encrypt("vol-a", os.urandom(32).hex().encode())
    done = creds.load("vol-b", cred)
    assert done.returncode != 0 and b"does not match" in done.stderr


def test_cred_file_holds_no_plaintext(creds):
    key = os.urandom(32).hex().encode()
    with open(creds.encrypt("kek", key), "rb") as f:
        assert key not in f.read()


def test_raw_32_byte_credential(creds):
    creds.install("raw", os.urandom(32))
    provider = make("raw")
    kek = os.urandom(32)
    assert provider.recover(provider.protect(kek, BINDING), BINDING) == kek


def test_rotated_credential_is_wrong_key(creds):
    creds.install("kek", os.urandom(32).hex().encode())
    provider = make("kek")
    record = provider.protect(os.urandom(32), BINDING)
    (creds.directory / "kek").unlink()
    creds.install("kek", os.urandom(32).hex().encode())
    with pytest.raises(WrongKey, match="'kek' does not open"):
        provider.recover(record, BINDING)


def test_no_credentials_directory(creds, monkeypatch):
    creds.install("kek", os.urandom(32).hex().encode())
    provider = make("kek")
    record = provider.protect(os.urandom(32), BINDING)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(KeyMissing, match=r"CREDENTIALS_DIRECTORY is not set.*LoadCredentialEnc"):
        provider.recover(record, BINDING)


def test_credential_not_loaded(creds):
    provider = make("absent")
    with pytest.raises(KeyMissing, match=r"'absent' not found in .*LoadCredentialEncrypted=absent"):
        provider.protect(os.urandom(32), BINDING)


def test_a_fifo_or_a_link_is_refused_at_once(creds, tmp_path):
    # A FIFO nobody writes to must not hang the open (O_NONBLOCK); a symbolic link is not
    # followed out of the credentials directory (O_NOFOLLOW).
    os.mkfifo(creds.directory / "fifo", 0o600)
    with pytest.raises(ProviderConfigError, match=r"credentials/fifo is not a regular file"):
        make("fifo").protect(os.urandom(32), BINDING)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(os.urandom(32).hex().encode())
    (creds.directory / "link").symlink_to(elsewhere)
    with pytest.raises(KeyMissing, match=r"systemd credential .*credentials/link: Too many levels"):
        make("link").protect(os.urandom(32), BINDING)


def test_not_a_key(creds):
    creds.install("kek", b"a passphrase, not a key\n")
    with pytest.raises(ProviderConfigError, match="does not hold a 256-bit key"):
        make("kek").protect(os.urandom(32), BINDING)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "x" * 256])
def test_bad_names(name):
    with pytest.raises(ProviderConfigError, match="bad systemd credential name"):
        SystemdCredentialProvider.options_from_spec(name)


def test_spec_and_describe():
    options = SystemdCredentialProvider.options_from_spec("encfs-data.kek")
    assert options == {"name": "encfs-data.kek"}
    assert SystemdCredentialProvider(options).describe() == "systemd-credential:encfs-data.kek"
