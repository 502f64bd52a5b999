"""The command provider against real little shell scripts written into tmp_path."""

from __future__ import annotations

import json
import os
import shlex
import signal
import time

import pytest

from encfs.errors import (
    KeyMissing,
    KeyPermissions,
    KeyRevoked,
    ProviderConfigError,
    ProviderUnavailable,
    WrongKey,
)
from encfs.keys.command import CommandProvider
from tests.providers.contract import BINDING, ProviderContract


def script(path, body: str) -> str:
    """Write an executable /bin/sh script; return its path."""
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o700)
    return str(path)


def key_script(path) -> str:
    return script(path, f"echo {os.urandom(32).hex()}")


def make(spec: str) -> CommandProvider:
    provider = CommandProvider(CommandProvider.options_from_spec(spec))
    provider.prepare_new()
    return provider


def gone(pid: int) -> bool:
    """True once `pid` has exited (our PID 1 does not reap orphans: zombies count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


class TestCommandContract(ProviderContract):
    @pytest.fixture
    def provider(self, tmp_path):
        return make(shlex.quote(key_script(tmp_path / "getkey-a")))

    @pytest.fixture
    def wrong_provider(self, tmp_path):
        return make(shlex.quote(key_script(tmp_path / "getkey-b")))

    def deny(self, provider):
        script_path = provider.options["argv"][0]
        with open(script_path, "w") as f:
            f.write("#!/bin/sh\necho 'key revoked by the admin' >&2\nexit 77\n")

    def make_unreachable(self, provider):
        script_path = provider.options["argv"][0]
        with open(script_path, "w") as f:
            f.write("#!/bin/sh\necho 'key server unreachable' >&2\nexit 75\n")


def test_spec_is_split_like_a_shell_and_program_resolved(tmp_path):
    options = CommandProvider.options_from_spec(f"--timeout=2.5 cat '{tmp_path}/a key.hex' \"x y\"")
    assert options["argv"][1:] == [f"{tmp_path}/a key.hex", "x y"]
    assert os.path.isabs(options["argv"][0]) and options["argv"][0].endswith("/cat")
    assert options["timeout"] == 2.5
    json.dumps(options)
    assert CommandProvider.options_from_spec("cat")["timeout"] == 30.0


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "needs a program"),
        ("--timeout=5", "needs a program"),
        ("--timeout=0 cat", "timeout"),
        ("--timeout=abc cat", "timeout"),
        ("no-such-program-encfs-gw", "not found in PATH"),
        ("/nonexistent/prog", "not an executable"),
        ("'unterminated", "bad command spec"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ProviderConfigError, match=match):
        CommandProvider.options_from_spec(spec)


def test_a_real_key_reading_program(tmp_path):
    """`cat FILE` is a valid helper: the hex key file's trailing newline is stripped."""
    (tmp_path / "k.hex").write_text(os.urandom(32).hex().upper() + "\n")
    provider = make(f"cat {tmp_path}/k.hex")
    kek = os.urandom(32)
    assert provider.recover(provider.protect(kek, BINDING), BINDING) == kek


def test_environment_and_no_shell(tmp_path):
    log = tmp_path / "log"
    prog = script(
        tmp_path / "prog",
        f'printf "%s %s|" "$ENCFS_GW_PURPOSE" "$ENCFS_GW_VOLUME_BINDING" >> {log}\n'
        f'for a in "$@"; do printf "[%s]" "$a" >> {log}; done; echo >> {log}\n'
        f"echo {'ab' * 32}",
    )
    provider = make(f"{prog} '$(touch {tmp_path}/pwned)' 'a;b' '*'")
    kek = os.urandom(32)
    assert provider.recover(provider.protect(kek, BINDING), BINDING) == kek
    lines = log.read_text().splitlines()
    args = f"[$(touch {tmp_path}/pwned)][a;b][*]"
    assert lines == [f"protect {BINDING.hex()}|{args}", f"recover {BINDING.hex()}|{args}"]
    assert not (tmp_path / "pwned").exists()


def test_stderr_passed_through(tmp_path, capfd):
    prog = script(tmp_path / "p", f"echo 'touch your token' >&2\necho {'cd' * 32}")
    make(prog).protect(os.urandom(32), BINDING)
    assert "touch your token" in capfd.readouterr().err


def test_other_exit_status_reports_first_stderr_line(tmp_path, capfd):
    prog = script(tmp_path / "p", "echo >&2\necho 'vault said no' >&2\necho more >&2\nexit 3")
    with pytest.raises(KeyMissing, match=r"exit status 3: vault said no$"):
        make(prog).protect(os.urandom(32), BINDING)


def test_killed_by_signal(tmp_path):
    prog = script(tmp_path / "p", "kill -KILL $$")
    with pytest.raises(KeyMissing, match="killed by SIGKILL"):
        make(prog).protect(os.urandom(32), BINDING)


def test_exit_75_and_77(tmp_path):
    with pytest.raises(ProviderUnavailable, match=r"exit 75\): try later"):
        make(script(tmp_path / "a", "echo 'try later' >&2; exit 75")).protect(b"k" * 32, BINDING)
    with pytest.raises(KeyRevoked, match=r"exit 77\)$"):
        make(script(tmp_path / "b", "exit 77")).protect(b"k" * 32, BINDING)


@pytest.mark.parametrize(
    "output",
    ["", "secret passphrase", "ab" * 31, "ab" * 33, "ab" * 32 + "\n", " " + "ab" * 32, "zz" * 32],
)
def test_output_must_be_a_hex_key(tmp_path, output):
    prog = script(tmp_path / "p", f"printf '%s\\n' '{output}'")
    with pytest.raises(ProviderConfigError, match="64 hex digits") as info:
        make(prog).protect(os.urandom(32), BINDING)
    if output:
        assert output.strip() not in str(info.value)  # never echo what it printed


def test_key_without_newline_accepted(tmp_path):
    provider = make(script(tmp_path / "p", f"printf %s {'ef' * 32}"))
    kek = os.urandom(32)
    assert provider.recover(provider.protect(kek, BINDING), BINDING) == kek


def test_changed_key_is_wrong_key(tmp_path):
    provider = make(key_script(tmp_path / "p"))
    record = provider.protect(os.urandom(32), BINDING)
    key_script(tmp_path / "p")
    with pytest.raises(WrongKey, match="does not open this volume"):
        provider.recover(record, BINDING)


def test_endless_output_is_cut_off(tmp_path):
    start = time.monotonic()
    with pytest.raises(ProviderConfigError, match="printed more than"):
        make(script(tmp_path / "p", "exec yes")).protect(os.urandom(32), BINDING)
    assert time.monotonic() - start < 5


def test_timeout_kills_the_program_and_its_children(tmp_path):
    pidfile = tmp_path / "pid"
    prog = script(tmp_path / "p", f"sleep 30 &\necho $! > {pidfile}\nwait")
    provider = make(f"--timeout=0.5 {prog}")
    start = time.monotonic()
    with pytest.raises(ProviderUnavailable, match=r"did not finish within 0.5 s"):
        provider.recover({"sealed_kek": "00"}, BINDING)
    assert time.monotonic() - start < 3
    # SIGKILL went to the whole process group; a loaded machine may schedule the
    # grandchild's exit a moment later: poll with a bound, never a fixed sleep.
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gone(pid)


def test_helper_holding_stdout_does_not_delay(tmp_path):
    """The program exits but leaves a helper with our pipes open: no wait for timeout."""
    pidfile = tmp_path / "pid"
    prog = script(tmp_path / "p", f"sleep 30 &\necho $! > {pidfile}\necho {'12' * 32}")
    provider = make(f"--timeout=20 {prog}")
    start = time.monotonic()
    try:
        provider.protect(os.urandom(32), BINDING)
        assert time.monotonic() - start < 5
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_deleted_program_is_missing(tmp_path):
    provider = make(key_script(tmp_path / "p"))
    record = provider.protect(os.urandom(32), BINDING)
    os.unlink(tmp_path / "p")
    with pytest.raises(KeyMissing, match="not found"):
        provider.recover(record, BINDING)


def test_program_no_longer_executable_is_a_permission_error(tmp_path):
    # execve needs an execute bit even for root, so this holds when the tests run as root.
    provider = make(key_script(tmp_path / "p"))
    record = provider.protect(os.urandom(32), BINDING)
    (tmp_path / "p").chmod(0o600)
    with pytest.raises(KeyPermissions, match="is not executable by this user"):
        provider.recover(record, BINDING)


def test_program_that_cannot_start_is_missing(tmp_path):
    provider = make(key_script(tmp_path / "p"))
    record = provider.protect(os.urandom(32), BINDING)
    (tmp_path / "p").write_text("no #! line\n")  # still executable; execve: ENOEXEC
    with pytest.raises(KeyMissing, match="could not be started: Exec format error"):
        provider.recover(record, BINDING)


def test_describe_shows_argv(tmp_path):
    prog = key_script(tmp_path / "p")
    assert make(f"{prog} --vol data").describe() == f"command:{prog} --vol data"
