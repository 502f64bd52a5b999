"""The aws-kms provider against a real moto_server (AWS KMS API) on 127.0.0.1.

moto does not enforce key states (a disabled or pending-deletion key still decrypts), so
the revocation tests exercise the provider's own DescribeKey check; see
docs/providers/aws-kms.md for what only real AWS can show.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs.errors import (
    KeyMissing,
    KeyRevoked,
    ProviderConfigError,
    ProviderUnavailable,
    WrongKey,
)
from encfs.keys.aws_kms import AwsKmsProvider, encryption_context
from encfs.keys.registry import parse_spec
from tests.providers import servers
from tests.providers.contract import BINDING, ProviderContract

boto3 = pytest.importorskip("boto3")
REGION = "us-east-1"


@pytest.fixture(scope="module")
def aws_env(tmp_path_factory) -> Iterator[Path]:
    """Dummy credentials only; no real AWS config, profile or instance metadata lookups."""
    home = tmp_path_factory.mktemp("aws")
    credentials = home / "credentials"
    credentials.write_text("")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ROLE_ARN"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_CONFIG_FILE", str(home / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
        yield credentials


@pytest.fixture(scope="module")
def moto(tmp_path_factory, aws_env) -> Iterator[servers.Server]:
    with servers.start_moto(tmp_path_factory.mktemp("moto")) as server:
        yield server


@functools.cache
def admin(endpoint: str, service: str = "kms"):
    """The operator's client (dummy credentials from the environment)."""
    return boto3.client(service, endpoint_url=endpoint, region_name=REGION)


def new_key(endpoint: str, **kwargs) -> str:
    return admin(endpoint).create_key(**kwargs)["KeyMetadata"]["Arn"]


def key_id(arn: str) -> str:
    """moto's DisableKey/ScheduleKeyDeletion want the bare key id (an ARN gives HTTP 500)."""
    return arn.rsplit("/", 1)[1]


def make(endpoint: str, key: str, extra: str = "") -> AwsKmsProvider:
    options = AwsKmsProvider.options_from_spec(f"key={key},endpoint-url={endpoint}{extra}")
    provider = AwsKmsProvider(options)
    provider.prepare_new()
    return provider


class TestAwsKmsContract(ProviderContract):
    @pytest.fixture
    def provider(self, moto):
        self._endpoint = moto.extra["endpoint"]
        provider = make(self._endpoint, new_key(self._endpoint))
        yield provider
        provider.close()

    @pytest.fixture
    def wrong_provider(self, moto, provider, aws_env):
        # Real credentials of another account (STS AssumeRole into 222222222222), given
        # as a profile in the shared credentials file: the key is not visible there.
        sts = admin(moto.extra["endpoint"], "sts")
        role = "arn:aws:iam::222222222222:role/other-account"
        creds = sts.assume_role(RoleArn=role, RoleSessionName="encfs-test")["Credentials"]
        aws_env.write_text(
            "[other]\n"
            f"aws_access_key_id = {creds['AccessKeyId']}\n"
            f"aws_secret_access_key = {creds['SecretAccessKey']}\n"
            f"aws_session_token = {creds['SessionToken']}\n"
        )
        other = AwsKmsProvider({**provider.options, "profile": "other"})
        yield other
        other.close()

    def deny(self, provider):
        admin(self._endpoint).disable_key(KeyId=key_id(provider.options["key"]))

    def make_unreachable(self, provider):
        provider.close()
        provider.options["endpoint_url"] = f"http://{servers.HOST}:{servers.dead_port()}"


def test_alias_record_holds_arn_and_no_secret(moto):
    endpoint = moto.extra["endpoint"]
    arn = new_key(endpoint)
    admin(endpoint).create_alias(AliasName="alias/encfs-test-alias", TargetKeyId=arn)
    provider = make(endpoint, "alias/encfs-test-alias")
    kek = os.urandom(32)
    record = provider.protect(kek, BINDING)
    assert json.loads(json.dumps(record)) == record
    assert record["key_arn"] == arn
    assert provider.recover(record, BINDING) == kek


def test_encryption_context_is_the_binding_hash(moto):
    endpoint = moto.extra["endpoint"]
    provider = make(endpoint, new_key(endpoint))
    kek = os.urandom(32)
    record = provider.protect(kek, BINDING)
    blob = base64.b64decode(record["ciphertext"])
    plain = admin(endpoint).decrypt(
        CiphertextBlob=blob, EncryptionContext=encryption_context(BINDING)
    )
    assert plain["Plaintext"] == kek
    with pytest.raises(WrongKey):
        provider.recover(record, BINDING + b"x")


def test_tampered_ciphertext_is_wrong_key(moto):
    endpoint = moto.extra["endpoint"]
    provider = make(endpoint, new_key(endpoint))
    record = provider.protect(os.urandom(32), BINDING)
    blob = bytearray(base64.b64decode(record["ciphertext"]))
    blob[-1] ^= 1
    with pytest.raises(WrongKey):
        provider.recover({**record, "ciphertext": base64.b64encode(blob).decode()}, BINDING)


def test_pending_deletion_is_revoked(moto):
    endpoint = moto.extra["endpoint"]
    provider = make(endpoint, new_key(endpoint))
    record = provider.protect(os.urandom(32), BINDING)
    admin(endpoint).schedule_key_deletion(KeyId=key_id(record["key_arn"]), PendingWindowInDays=7)
    with pytest.raises(KeyRevoked, match="PendingDeletion"):
        provider.recover(record, BINDING)


def test_disabled_key_refused_for_protect_too(moto):
    endpoint = moto.extra["endpoint"]
    provider = make(endpoint, new_key(endpoint))
    admin(endpoint).disable_key(KeyId=key_id(provider.options["key"]))
    with pytest.raises(KeyRevoked, match="Disabled"):
        provider.protect(os.urandom(32), BINDING)


def test_record_never_chooses_the_key(moto):
    """A record naming another key than the operator's `key=` is refused: the backing
    store does not choose which KMS key is asked (issue 19)."""
    endpoint = moto.extra["endpoint"]
    provider = make(endpoint, new_key(endpoint))
    record = provider.protect(os.urandom(32), BINDING)
    other = record["key_arn"].rsplit("/", 1)[0] + "/00000000-0000-0000-0000-000000000000"
    with pytest.raises(WrongKey, match="not with the configured key"):
        provider.recover({**record, "key_arn": other}, BINDING)


def test_rotation_keeps_old_records(moto):
    endpoint = moto.extra["endpoint"]
    provider = make(endpoint, new_key(endpoint))
    kek = os.urandom(32)
    record = provider.protect(kek, BINDING)
    admin(endpoint).rotate_key_on_demand(KeyId=record["key_arn"])
    assert provider.recover(record, BINDING) == kek


def test_setup_checks_the_key(moto):
    endpoint = moto.extra["endpoint"]
    with pytest.raises(KeyMissing, match="not found"):
        make(endpoint, "alias/no-such-key")
    rsa = new_key(endpoint, KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")
    with pytest.raises(ProviderConfigError, match="symmetric"):
        make(endpoint, rsa)


def test_no_credentials_is_key_missing(moto, monkeypatch):
    arn = new_key(moto.extra["endpoint"])
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(KeyMissing, match="no AWS credentials"):
        make(moto.extra["endpoint"], arn)


def test_server_stopped_is_unavailable_quickly(tmp_path, aws_env):
    with servers.start_moto(tmp_path) as server:
        endpoint = server.extra["endpoint"]
        provider = make(endpoint, new_key(endpoint))
        record = provider.protect(os.urandom(32), BINDING)
        server.stop()
        start = time.monotonic()
        with pytest.raises(ProviderUnavailable, match="unreachable"):
            provider.recover(record, BINDING)
        assert time.monotonic() - start < 1.0


def test_silent_endpoint_times_out(aws_env):
    with servers.blackhole() as port:
        options = AwsKmsProvider.options_from_spec(
            f"key=alias/k,endpoint-url=http://{servers.HOST}:{port},timeout=0.5"
        )
        record = {"key_arn": "arn:aws:kms:us-east-1:123456789012:key/k", "ciphertext": "AAAA"}
        start = time.monotonic()
        with pytest.raises(ProviderUnavailable, match="did not answer"):
            AwsKmsProvider(options).recover(record, BINDING)
        assert time.monotonic() - start < 2.0


def test_spec_parsing():
    name, options = parse_spec("aws-kms:key=alias/v,region=eu-west-1,profile=p,no-state-check")
    assert name == "aws-kms"
    assert options == {
        "key": "alias/v",
        "region": "eu-west-1",
        "profile": "p",
        "no_state_check": True,
        "timeout": 5.0,
    }
    for bad, message in [
        ("region=eu-west-1", "missing option"),
        ("key=k,secret-key=abc", "command line"),
        ("key=k,endpoint-url=localhost", "http"),
        ("key=k,access-key=AKIA", "unknown option"),
    ]:
        with pytest.raises(ProviderConfigError, match=message):
            AwsKmsProvider.options_from_spec(bad)


def test_region_from_key_arn(aws_env, monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    provider = AwsKmsProvider({"key": "arn:aws:kms:eu-central-1:123456789012:key/abc"})
    assert provider._client().meta.region_name == "eu-central-1"
    provider.close()
    with pytest.raises(ProviderConfigError, match="no region"):
        AwsKmsProvider({"key": "alias/x"})._client()


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "botocore", None)
    with pytest.raises(ProviderConfigError, match=r"pip install 'encfs\[aws\]'"):
        AwsKmsProvider({"key": "alias/x"}).prepare_new()


def test_key_of_another_account_is_revoked(moto, aws_env):
    endpoint = moto.extra["endpoint"]
    provider = make(endpoint, new_key(endpoint))
    record = provider.protect(os.urandom(32), BINDING)
    sts = admin(endpoint, "sts")
    role = "arn:aws:iam::333333333333:role/elsewhere"
    creds = sts.assume_role(RoleArn=role, RoleSessionName="encfs-test")["Credentials"]
    aws_env.write_text(
        "[elsewhere]\n"
        f"aws_access_key_id = {creds['AccessKeyId']}\n"
        f"aws_secret_access_key = {creds['SecretAccessKey']}\n"
        f"aws_session_token = {creds['SessionToken']}\n"
    )
    elsewhere = AwsKmsProvider({**provider.options, "profile": "elsewhere"})
    with pytest.raises(KeyRevoked, match="not found"):
        elsewhere.recover(record, BINDING)
