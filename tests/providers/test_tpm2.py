"""The tpm2 provider against a real software TPM (swtpm) through the real tpm2-tools.

What this cannot cover: a hardware TPM behind /dev/tpmrm0 (none here; with the kernel
resource manager the provider skips its flushes) and PCRs measured by a real boot.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from encfs.errors import (
    KeyRevoked,
    ProviderConfigError,
    ProviderUnavailable,
    WrongKey,
)
from encfs.keys.tpm2 import Tpm2Provider, classify
from tests.providers.contract import BINDING, ProviderContract
from tests.providers.servers_tpm import MISSING, SKIP_REASON, Swtpm, bind_consecutive_ports

pytestmark = pytest.mark.skipif(bool(MISSING), reason=SKIP_REASON)


@pytest.fixture
def swtpm(tmp_path):
    tpm = Swtpm(tmp_path / "tpm-a")
    tpm.start()
    yield tpm
    tpm.stop()


@pytest.fixture
def other_swtpm(tmp_path):
    tpm = Swtpm(tmp_path / "tpm-b")
    tpm.start()
    yield tpm
    tpm.stop()


def make(tpm: Swtpm, extra: str = "") -> Tpm2Provider:
    provider = Tpm2Provider(Tpm2Provider.options_from_spec(f"tcti={tpm.tcti}{extra}"))
    provider.prepare_new()
    return provider


class TestTpm2PcrContract(ProviderContract):
    """Sealed to PCR 7: extending PCR 7 (a changed boot chain) is the 'denied' case."""

    @pytest.fixture
    def provider(self, swtpm):
        provider = make(swtpm, ",pcrs=7")
        provider.swtpm = swtpm  # for deny/make_unreachable
        return provider

    @pytest.fixture
    def wrong_provider(self, other_swtpm):
        return make(other_swtpm, ",pcrs=7")

    def deny(self, provider):
        provider.swtpm.pcr_extend(7)

    def make_unreachable(self, provider):
        provider.swtpm.stop()


class TestTpm2NoPcrContract(ProviderContract):
    @pytest.fixture
    def provider(self, swtpm):
        provider = make(swtpm)
        provider.swtpm = swtpm
        return provider

    @pytest.fixture
    def wrong_provider(self, other_swtpm):
        return make(other_swtpm)

    def make_unreachable(self, provider):
        provider.swtpm.stop()


@pytest.mark.parametrize(
    ("spec", "options"),
    [
        ("", {"pcrs": [], "timeout": 30.0}),
        ("pcrs=7", {"pcrs": [7], "timeout": 30.0}),
        ("pcrs=7+0+7", {"pcrs": [0, 7], "timeout": 30.0}),
        ("pcrs=0,7,timeout=5", {"pcrs": [0, 7], "timeout": 5.0}),
        ("tcti=device:/dev/tpmrm0,pcrs=7",
         {"tcti": "device:/dev/tpmrm0", "pcrs": [7], "timeout": 30.0}),
        ("tcti=swtpm:host=127.0.0.1,port=2321,pcrs=11",
         {"tcti": "swtpm:host=127.0.0.1,port=2321", "pcrs": [11], "timeout": 30.0}),
        ("pcrs=7,tcti=swtpm:host=::1,port=2321",
         {"tcti": "swtpm:host=::1,port=2321", "pcrs": [7], "timeout": 30.0}),
    ],
)
def test_spec_syntax(spec, options):
    assert Tpm2Provider.options_from_spec(spec) == options
    json.dumps(options)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("pcrs=24", "bad PCR list"),
        ("pcrs=seven", "bad PCR list"),
        ("pcrs=", "bad PCR list"),
        ("pcrs=7,pcrs=8", "given twice"),
        ("tcti=", "empty"),
        ("timeout=0", "timeout"),
        ("device:/dev/tpmrm0", "bad tpm2 spec"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ProviderConfigError, match=match):
        Tpm2Provider.options_from_spec(spec)


def test_describe():
    options = Tpm2Provider.options_from_spec("tcti=device:/dev/tpmrm0,pcrs=0+7")
    assert Tpm2Provider(options).describe() == "tpm2:tcti=device:/dev/tpmrm0,pcrs=0+7"
    assert Tpm2Provider(Tpm2Provider.options_from_spec("")).describe() == "tpm2"


def test_record_shape_and_no_handles_left(swtpm):
    """Flush discipline: without a resource manager nothing may stay loaded."""
    provider = make(swtpm, ",pcrs=0+7")
    keks = [os.urandom(32) for _ in range(4)]  # more than the TPM's 3 object slots
    records = [provider.protect(kek, BINDING) for kek in keks]
    assert [provider.recover(r, BINDING) for r in records] == keks
    record = json.loads(json.dumps(records[0]))
    assert record["pcrs"] == [0, 7] and record["pcr_bank"] == "sha256"
    assert set(record) >= {"public", "private", "sealed_kek", "primary"}
    assert swtpm.handles("transient") == []
    assert swtpm.handles("loaded-session") == []


def test_survives_a_tpm_restart(swtpm):
    """Nothing persistent is needed: the primary key is re-derived from the TPM's seed,
    and PCRs are back to their boot values after a restart (a reboot)."""
    provider = make(swtpm, ",pcrs=7")
    kek = os.urandom(32)
    record = provider.protect(kek, BINDING)
    swtpm.pcr_extend(7)
    swtpm.stop()
    swtpm.start()  # same state dir, new ports
    assert swtpm.handles("persistent") == []
    assert make(swtpm, ",pcrs=7").recover(record, BINDING) == kek


def test_pcr_change_is_revoked_with_clear_message(swtpm):
    provider = make(swtpm, ",pcrs=7")
    record = provider.protect(os.urandom(32), BINDING)
    swtpm.pcr_extend(7)
    with pytest.raises(KeyRevoked, match="PCR values changed since the key was sealed"):
        provider.recover(record, BINDING)
    assert swtpm.handles("loaded-session") == []  # the failed policy session was flushed


def test_unrelated_pcr_change_is_harmless(swtpm):
    provider = make(swtpm, ",pcrs=7")
    kek = os.urandom(32)
    record = provider.protect(kek, BINDING)
    swtpm.pcr_extend(8)
    assert provider.recover(record, BINDING) == kek


def test_record_stripped_of_its_pcrs_does_not_unseal(swtpm):
    provider = make(swtpm, ",pcrs=7")
    record = provider.protect(os.urandom(32), BINDING)
    record["pcrs"] = []  # try to unseal without the policy
    with pytest.raises(WrongKey):
        provider.recover(record, BINDING)


def test_other_tpm_cannot_load(swtpm, other_swtpm):
    record = make(swtpm).protect(os.urandom(32), BINDING)
    with pytest.raises(WrongKey, match="integrity check failed"):
        make(other_swtpm).recover(record, BINDING)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("public", "not base64!", ProviderConfigError),
        ("pcrs", ["7"], ProviderConfigError),
        ("primary", {"alg": "rsa2048"}, ProviderConfigError),
    ],
)
def test_corrupt_record(swtpm, field, value, error):
    provider = make(swtpm)
    record = provider.protect(os.urandom(32), BINDING)
    record[field] = value
    with pytest.raises(error):
        provider.recover(record, BINDING)


def test_stopped_tpm_is_unavailable_quickly(swtpm):
    provider = make(swtpm)
    record = provider.protect(os.urandom(32), BINDING)
    swtpm.stop()
    start = time.monotonic()
    with pytest.raises(ProviderUnavailable, match="TPM not reachable"):
        provider.recover(record, BINDING)
    assert time.monotonic() - start < 2


def test_hung_tpm_is_bounded_by_the_timeout():
    """A TPM port that accepts but never answers: the timeout option bounds the wait."""
    cmd, ctrl = bind_consecutive_ports()
    with cmd, ctrl:
        port = cmd.getsockname()[1]
        cmd.listen()
        ctrl.listen()  # the kernel accepts connections; nobody ever answers
        provider = Tpm2Provider(Tpm2Provider.options_from_spec(
            f"tcti=swtpm:host=127.0.0.1,port={port},timeout=1"
        ))
        start = time.monotonic()
        with pytest.raises(ProviderUnavailable, match="did not answer within 1 s"):
            provider.protect(os.urandom(32), BINDING)
        assert time.monotonic() - start < 4


def test_tools_missing_is_config_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    provider = Tpm2Provider(Tpm2Provider.options_from_spec("tcti=swtpm:port=1"))
    with pytest.raises(ProviderConfigError, match="install tpm2-tools"):
        provider.protect(os.urandom(32), BINDING)


@pytest.mark.parametrize(
    ("stderr", "error"),
    [
        ("ERROR: Esys_Unseal(0x99D) - tpm:session(1):a policy check failed", KeyRevoked),
        ("ERROR: Eys_Load(0x902) - tpm:warn(2.0): out of memory for object contexts",
         ProviderUnavailable),
        ("ERROR: Esys_X(0x921) - tpm:warn(2.0): lockout", ProviderUnavailable),
        ("ERROR: Eys_Load(0x1DF) - tpm:parameter(1):integrity check failed", WrongKey),
        ("ERROR: Esys_GetCapability(0xA000A) - tcti:IO failure", ProviderUnavailable),
    ],
)
def test_tpm_error_codes_seen_from_tpm2_tools(stderr, error):
    """Messages captured from tpm2-tools 5.4 (the first two and the last two above were
    produced by this swtpm); the lockout one needs a hierarchy password to trigger."""
    assert type(classify("tpm2_x", stderr, WrongKey)) is error


def test_tools_run_with_umask_077_and_without_secrets(swtpm, tmp_path, monkeypatch):
    """tpm2-tools as the daemon runs them (umask 0, secrets in its environment): each tool
    is started with umask 077 and none of the secrets. A shim first in PATH records what
    each tool was started with, then runs the real one."""
    shim, log = tmp_path / "shim", tmp_path / "log"
    shim.mkdir()
    for tool in ("tpm2_createprimary", "tpm2_create", "tpm2_load", "tpm2_unseal",
                 "tpm2_flushcontext", "tpm2_startauthsession", "tpm2_policypcr",
                 "tpm2_pcrread"):
        real = shutil.which(tool)
        if real is None:
            continue
        (shim / tool).write_text(
            f'#!/bin/sh\necho "$(umask) $VAULT_TOKEN$ENCFS_PKCS11_PIN" >> {log}\n'
            f'exec {real} "$@"\n'
        )
        (shim / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim}:{os.environ['PATH']}")
    monkeypatch.setenv("VAULT_TOKEN", "secret-token")
    monkeypatch.setenv("ENCFS_PKCS11_PIN", "secret-pin")
    old_umask = os.umask(0)
    try:
        provider = make(swtpm)
        kek = os.urandom(32)
        assert provider.recover(provider.protect(kek, BINDING), BINDING) == kek
    finally:
        os.umask(old_umask)
    calls = log.read_text().splitlines()
    assert calls and set(calls) == {"0077 "}, calls
