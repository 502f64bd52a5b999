"""The passphrase provider with real env vars, files, a real stdin pipe and a real pty."""

from __future__ import annotations

import fcntl
import json
import os
import select
import subprocess
import sys
import textwrap
import time

import pytest

from encfs.errors import KeyMissing, KeyPermissions, ProviderConfigError, WrongKey
from encfs.keys import passphrase as pp
from encfs.keys.passphrase import PassphraseProvider
from tests.providers.contract import BINDING, ProviderContract

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def weak_kdf(monkeypatch):
    """Fast KDF for every test except the one that checks the real parameters."""
    monkeypatch.setenv(pp.WEAK_KDF_ENV, "1")


def from_spec(spec: str) -> PassphraseProvider:
    provider = PassphraseProvider(PassphraseProvider.options_from_spec(spec))
    provider.prepare_new()
    return provider


def write_secret_file(path, content: bytes, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.write(fd, content)
    os.close(fd)
    os.chmod(path, mode)


class TestPassphraseEnvContract(ProviderContract):
    @pytest.fixture
    def provider(self, monkeypatch):
        monkeypatch.setenv("ENCFS_TEST_PASS_A", "correct horse battery staple")
        return from_spec("env:ENCFS_TEST_PASS_A")

    @pytest.fixture
    def wrong_provider(self, monkeypatch):
        monkeypatch.setenv("ENCFS_TEST_PASS_B", "correct horse battery stapler")
        return from_spec("env:ENCFS_TEST_PASS_B")


class TestPassphraseFileContract(ProviderContract):
    @pytest.fixture
    def provider(self, tmp_path):
        write_secret_file(tmp_path / "a.pass", b"first passphrase\n")
        return from_spec(f"file:{tmp_path / 'a.pass'}")

    @pytest.fixture
    def wrong_provider(self, tmp_path):
        write_secret_file(tmp_path / "b.pass", b"second passphrase\n")
        return from_spec(f"file:{tmp_path / 'b.pass'}")


@pytest.mark.parametrize(
    ("spec", "options"),
    [
        ("", {"source": "tty"}),
        ("tty", {"source": "tty"}),
        ("source=tty", {"source": "tty"}),
        ("stdin", {"source": "stdin"}),
        ("-", {"source": "stdin"}),
        ("env:MY_PASS", {"source": "env", "var": "MY_PASS"}),
        ("source=env:MY_PASS", {"source": "env", "var": "MY_PASS"}),
        ("file:/etc/x:y", {"source": "file", "path": "/etc/x:y"}),
    ],
)
def test_spec_syntax(spec, options):
    assert PassphraseProvider.options_from_spec(spec) == options


@pytest.mark.parametrize("spec", ["file:", "env:", "env:1BAD", "env:A B", "tty:x", "hunter2"])
def test_bad_spec_refused(spec):
    with pytest.raises(ProviderConfigError, match="passphrase"):
        PassphraseProvider.options_from_spec(spec)


def test_relative_file_path_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert PassphraseProvider.options_from_spec("file:p.txt")["path"] == str(tmp_path / "p.txt")


def test_real_kdf_parameters_without_test_switch(monkeypatch):
    monkeypatch.delenv(pp.WEAK_KDF_ENV)
    monkeypatch.setenv("ENCFS_TEST_PASS", "a real passphrase")
    provider = from_spec("env:ENCFS_TEST_PASS")
    kek = os.urandom(32)
    record = provider.protect(kek, BINDING)
    kdf = record["kdf"]
    assert kdf["name"] == "argon2id"
    assert (kdf["iterations"], kdf["memory_kib"], kdf["lanes"]) == (3, 65536, 4)
    assert len(bytes.fromhex(kdf["salt"])) == 16
    assert provider.recover(record, BINDING) == kek
    json.dumps(record)  # storable as is


def test_weak_switch_is_what_the_other_tests_use(monkeypatch):
    assert pp.kdf_parameters()["memory_kib"] == 8
    monkeypatch.setenv(pp.WEAK_KDF_ENV, "yes")  # only exactly "1" weakens
    assert pp.kdf_parameters()["memory_kib"] == pp.DEFAULT_MEMORY_KIB


def test_parameters_come_from_the_record(monkeypatch):
    """Records made with other (e.g. raised) parameters still open."""
    monkeypatch.setenv("ENCFS_TEST_PASS", "pw")
    provider = from_spec("env:ENCFS_TEST_PASS")
    kek = os.urandom(32)
    kdf = {
        "name": "argon2id",
        "salt": os.urandom(32).hex(),
        "iterations": 2,
        "memory_kib": 64,
        "lanes": 2,
    }
    key = pp.derive_key(b"pw", kdf)
    record = {"kdf": kdf, "sealed_kek": pp.seal_with_secret(key, kek, BINDING)}
    assert provider.recover(record, BINDING) == kek
    salts = {provider.protect(kek, BINDING)["kdf"]["salt"] for _ in range(3)}
    assert len(salts) == 3  # a fresh salt per record


@pytest.mark.parametrize(
    "change",
    [
        {"name": "scrypt"},
        {"salt": "zz"},
        {"salt": "00"},
        {"iterations": 0},
        {"iterations": "3"},
        {"memory_kib": 1 << 40},
        {"lanes": 1000},
    ],
)
def test_corrupt_kdf_parameters_refused(monkeypatch, change):
    monkeypatch.setenv("ENCFS_TEST_PASS", "pw")
    provider = from_spec("env:ENCFS_TEST_PASS")
    record = provider.protect(os.urandom(32), BINDING)
    record["kdf"].update(change)
    with pytest.raises(ProviderConfigError, match="corrupt"):
        provider.recover(record, BINDING)


def test_wrong_passphrase_is_wrong_key(monkeypatch):
    monkeypatch.setenv("ENCFS_TEST_PASS", "right")
    provider = from_spec("env:ENCFS_TEST_PASS")
    record = provider.protect(os.urandom(32), BINDING)
    monkeypatch.setenv("ENCFS_TEST_PASS", "wrong")
    with pytest.raises(WrongKey, match="ENCFS_TEST_PASS does not open"):
        provider.recover(record, BINDING)


def test_no_secret_in_record_options_or_describe(monkeypatch):
    monkeypatch.setenv("ENCFS_TEST_PASS", "very-secret-passphrase")
    provider = from_spec("env:ENCFS_TEST_PASS")
    record = provider.protect(os.urandom(32), BINDING)
    for text in (json.dumps(record), json.dumps(provider.options), provider.describe()):
        assert "very-secret" not in text
    assert provider.describe() == "passphrase:env:ENCFS_TEST_PASS"


def test_unset_or_empty_env_is_missing(monkeypatch):
    monkeypatch.delenv("ENCFS_TEST_PASS", raising=False)
    provider = PassphraseProvider(PassphraseProvider.options_from_spec("env:ENCFS_TEST_PASS"))
    with pytest.raises(KeyMissing, match="ENCFS_TEST_PASS is not set"):
        provider.protect(os.urandom(32), BINDING)
    monkeypatch.setenv("ENCFS_TEST_PASS", "")
    with pytest.raises(KeyMissing, match="empty"):
        provider.protect(os.urandom(32), BINDING)


def test_unicode_passphrase_normalised(monkeypatch):
    monkeypatch.setenv("ENCFS_TEST_PASS", "caf\u00e9")  # precomposed e-acute
    provider = from_spec("env:ENCFS_TEST_PASS")
    kek = os.urandom(32)
    record = provider.protect(kek, BINDING)
    monkeypatch.setenv("ENCFS_TEST_PASS", "cafe\u0301")  # e + combining acute
    assert provider.recover(record, BINDING) == kek


def test_file_first_line_only(tmp_path):
    path = tmp_path / "p"
    write_secret_file(path, b"line one\r\nline two\n")
    provider = from_spec(f"file:{path}")
    kek = os.urandom(32)
    record = provider.protect(kek, BINDING)
    write_secret_file(path, b"line one")  # same passphrase, no newline at all
    assert provider.recover(record, BINDING) == kek


def test_file_loose_permissions_refused(tmp_path):
    path = tmp_path / "p"
    write_secret_file(path, b"pw\n", mode=0o644)
    with pytest.raises(KeyPermissions, match="chmod 600"):
        from_spec(f"file:{path}")


def test_missing_file_is_missing(tmp_path):
    with pytest.raises(KeyMissing, match="not found"):
        from_spec(f"file:{tmp_path / 'nope'}")


def test_file_may_be_a_fifo(tmp_path):
    """Process substitution / named pipes work (no mode check on non-regular files)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    writer = subprocess.Popen(["sh", "-c", f"printf 'piped pw\\n' > '{fifo}'"])
    try:
        provider = from_spec(f"file:{fifo}")  # prepare_new reads one line from the pipe
        assert provider.options["source"] == "file"
        assert writer.wait(timeout=10) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(timeout=10)


def _run_child(code: str, stdin: bytes) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, **{pp.WEAK_KDF_ENV: "1"})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=30,
        check=False,
    )


STDIN_CHILD = """
    import json, os, sys
    from encfs.keys.passphrase import PassphraseProvider
    from tests.providers.contract import BINDING
    p = PassphraseProvider(PassphraseProvider.options_from_spec("stdin"))
    p.prepare_new()
    k1, k2 = os.urandom(32), os.urandom(32)
    r1, r2 = p.protect(k1, BINDING), p.protect(k2, BINDING)  # one line read, reused
    assert p.recover(r1, BINDING) == k1 and p.recover(r2, BINDING) == k2
    q = PassphraseProvider({"source": "stdin"})  # a second instance reads the next line
    try:
        q.recover(r1, BINDING)
    except Exception as exc:
        print(type(exc).__name__, exc)
"""


def test_stdin_source_reads_one_line_once():
    done = _run_child(STDIN_CHILD, b"stdin passphrase\nsomething else\n")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().startswith("WrongKey the passphrase from standard input")


def test_stdin_eof_is_missing():
    code = STDIN_CHILD.replace("p.prepare_new()", "p.protect(os.urandom(32), BINDING)")
    done = _run_child(code, b"")
    assert b"KeyMissing: no passphrase on standard input" in done.stderr


TTY_CHILD = """
    import fcntl, os, termios
    os.setsid()  # Popen gave us no controlling terminal; take the pty as ours
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    from encfs.keys.passphrase import PassphraseProvider
    from tests.providers.contract import BINDING
    p = PassphraseProvider(PassphraseProvider.options_from_spec("tty"))
    p.prepare_new()
    kek = os.urandom(32)
    record = p.protect(kek, BINDING)
    assert PassphraseProvider({"source": "tty"}).recover(record, BINDING) == kek
    print("ROUNDTRIP-OK", flush=True)
"""


def test_tty_source_via_a_real_pty():
    """Prompt, confirmation and a later prompt at mount, typed into a real pty."""
    master, slave = os.openpty()
    env = dict(os.environ, PYTHONPATH=REPO, **{pp.WEAK_KDF_ENV: "1"})
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(TTY_CHILD)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    fcntl.fcntl(master, fcntl.F_SETFL, os.O_NONBLOCK)
    seen = b""
    answers = [
        (b"Passphrase for", b"tty pw\n"),
        (b"Repeat", b"tty pw\n"),
        (b"Passphrase for", b"tty pw\n"),
    ]
    deadline = time.monotonic() + 20
    try:
        while b"ROUNDTRIP-OK" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], deadline - time.monotonic())
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the pty
                break
            seen += chunk
            if answers and answers[0][0] in seen:
                seen = seen.split(answers[0][0], 1)[1]
                os.write(master, answers.pop(0)[1])
        assert b"ROUNDTRIP-OK" in seen, seen.decode(errors="replace")
        assert b"tty pw" not in seen  # no echo
    finally:
        child.kill()
        child.wait(timeout=10)
        os.close(master)


def test_tty_source_without_terminal_is_missing():
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from encfs.keys.passphrase import PassphraseProvider as P\n"
            "P({'source': 'tty'}).prepare_new()",
        ],
        capture_output=True,
        env=dict(os.environ, PYTHONPATH=REPO),
        timeout=30,
        check=False,
        start_new_session=True,  # a new session has no controlling terminal
    )
    assert b"KeyMissing: no terminal to ask for the passphrase" in done.stderr
