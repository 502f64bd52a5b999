"""Byte-exact vectors: the engine's sealing of one block and key slot, with injected
randomness, equals an independent computation straight from docs/FORMAT.md, and both
equal the committed digests."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encfs import crypto
from encfs.engine import contents as contents_mod
from encfs.engine.contents import FileContents
from encfs.format.blocks import Layout
from encfs.format.volume import KekVersion, Protector, VolumeConfig
from encfs.keyring import Keyring

VOLUME_ID = bytes([0x11]) * 16
FILE_ID = bytes([0x22]) * 16
KEK = bytes([0x33]) * 32
DEK = bytes([0x44]) * 32
BLOCK_NONCE = bytes([0x55]) * 12
SLOT_NONCE = bytes([0x66]) * 12
VOLUME_KEY = bytes(range(64))
PLAINTEXT = b"encfs-gw golden vector: block 3 of file 2222..." * 3
BLOCK_INDEX = 3

EXPECTED_RECORD_SHA256 = "bcb0e2d57ce23f4ca9abf0eb0783068777f8f70d08834498852710f337608801"
EXPECTED_SLOT_SHA256 = "545363d8090e88a41aac2aeb9c6ad8b908639a1e994a2f3723dbe8a42d52ed57"


def independent_record_and_slot() -> tuple[bytes, bytes]:
    """docs/FORMAT.md, section "Block records and key slots", computed by hand."""
    aad = b"EGWB" + struct.pack(">H", 1) + VOLUME_ID + FILE_ID + struct.pack(">Q", BLOCK_INDEX)
    record = BLOCK_NONCE + AESGCM(DEK).encrypt(BLOCK_NONCE, PLAINTEXT, aad)
    wrap_key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=VOLUME_ID,
        info=b"encfs-gw v1: AES-GCM key wrapping the DEKs of one file, file id follows" + FILE_ID,
    ).derive(KEK)
    slot_aad = (
        b"EGWK"
        + struct.pack(">H", 1)
        + VOLUME_ID
        + FILE_ID
        + struct.pack(">QHB", BLOCK_INDEX, 1, 0)
    )
    wrapped = AESGCM(wrap_key).encrypt(SLOT_NONCE, DEK, slot_aad)
    slot = struct.pack(">HBB", 1, 0, 0) + SLOT_NONCE + wrapped
    return record, slot


def engine_record_and_slot(monkeypatch) -> tuple[bytes, bytes]:
    # The engine draws each block's DEK and nonces into one wipeable buffer.
    monkeypatch.setattr(
        crypto, "random_secret", lambda size: bytearray(DEK + BLOCK_NONCE + SLOT_NONCE)
    )
    config = VolumeConfig(
        volume_id=VOLUME_ID,
        block_size=16384,
        features=("aes256gcm-per-block-dek",),
        created="2026-01-01T00:00:00Z",
        current_kek=1,
        kek_versions={
            1: KekVersion(1, "active", "x", bytes(92), [Protector("00" * 8, "keyfile", {})])
        },
    )
    keyring = Keyring(config, {1: KEK}, VOLUME_KEY)
    contents = FileContents(-1, Layout(16384), VOLUME_ID, FILE_ID, keyring)
    assert contents_mod.crypto is crypto
    return contents._seal_block(BLOCK_INDEX, PLAINTEXT, 0)


def test_engine_matches_independent_computation(monkeypatch):
    assert engine_record_and_slot(monkeypatch) == independent_record_and_slot()


def test_bytes_match_committed_digests():
    record, slot = independent_record_and_slot()
    assert len(record) == 12 + len(PLAINTEXT) + 16
    assert len(slot) == 64
    assert hashlib.sha256(record).hexdigest() == EXPECTED_RECORD_SHA256
    assert hashlib.sha256(slot).hexdigest() == EXPECTED_SLOT_SHA256


# --- the volume config's MAC (docs/FORMAT.md section 2.3) ------------------------------------

CONFIG_FEATURES = [
    "aes256gcm-per-block-dek", "aes-siv-names", "long-names", "long-symlink-targets",
    "authenticated-config",
]  # fmt: skip
EXPECTED_CONFIG_MAC = "64d4f1a56a5ed74c7e116e4cb6323e924ef2213189d27e92a5187624697692fa"
EXPECTED_KEY_CHECK = "7b29468a29cc1904bff9ec5e6b74ec8a3b3659f57c3d92969661348ba6ac5174"


def example_config() -> VolumeConfig:
    return VolumeConfig(
        volume_id=VOLUME_ID,
        block_size=16384,
        features=tuple(CONFIG_FEATURES),
        created="2026-01-01T00:00:00Z",
        current_kek=1,
        kek_versions={
            1: KekVersion(
                1, "active", "2026-01-01T00:00:00Z", bytes([0xAB]) * 92,
                [Protector("0102030405060708", "keyfile", {"sealed_kek": "cd" * 60})],
            )
        },
        generation=7,
    )


def independent_config_mac() -> tuple[bytes, bytes]:
    """The body as FORMAT.md 2.1 lists it, canonical JSON, HMAC under the HKDF'd key."""
    body = {
        "format": "encfs-gw", "format_version": 1, "features": CONFIG_FEATURES,
        "volume_id": "11" * 16, "block_size": 16384, "created": "2026-01-01T00:00:00Z",
        "generation": 7,
        "kek": {"current": 1, "versions": [{
            "version": 1, "state": "active", "created": "2026-01-01T00:00:00Z",
            "wrapped_volume_key": "ab" * 92,
            "protectors": [{"id": "0102030405060708", "kind": "keyfile",
                            "record": {"sealed_kek": "cd" * 60}}],
        }]},
    }  # fmt: skip
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    mac_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None,
        info=b"encfs-gw v1: HMAC key authenticating the volume config",
    ).derive(VOLUME_KEY)  # fmt: skip
    check = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None,
        info=b"encfs-gw v1: check value of the volume key, kept by the operator",
    ).derive(VOLUME_KEY)  # fmt: skip
    return hmac.new(mac_key, b"EGWC" + canonical, hashlib.sha256).digest(), check


def test_config_mac_matches_independent_computation():
    config = example_config()
    keyring = Keyring(config, {1: KEK}, VOLUME_KEY)
    mac, check = independent_config_mac()
    assert keyring.config_mac(config.mac_message()) == mac
    assert keyring.volume_key_check() == check
    assert mac.hex() == EXPECTED_CONFIG_MAC
    assert check.hex() == EXPECTED_KEY_CHECK
    # What is written parses back to the same body and the same MAC.
    parsed, stored = VolumeConfig.from_json(config.to_json(mac))
    assert stored == mac and parsed.body() == config.body()


# --- volume key epochs (feature volume-key-epochs, docs/FORMAT.md 2.1 and 2.3) --------------

EPOCH_VOLUME_KEY = bytes(range(0x40, 0x80))  # the volume key of epoch 2


def epoch_config() -> VolumeConfig:
    """The example config after a re-key: version 1 (epoch 1) retired, version 2 (epoch 2)
    current; the feature added to the list (so to P)."""
    config = example_config()
    config.features = (*config.features, "volume-key-epochs")
    config.kek_versions[1].state = "retired"
    config.kek_versions[1].volume_key_epoch = 1
    config.kek_versions[2] = KekVersion(
        2, "active", "2026-01-02T00:00:00Z", bytes([0xEF]) * 92,
        [Protector("0102030405060708", "keyfile", {"sealed_kek": "cd" * 60})], 2,
    )
    config.current_kek = 2
    return config


def test_volume_key_aad_with_epochs():
    """AAD_V(v) gains u32(epoch) once the feature is set; P covers the new flag."""
    config = epoch_config()
    features = sorted(config.features)
    p = hashlib.sha256(json.dumps(
        {"block_size": 16384, "features": features, "format_version": 1,
         "volume_id": "11" * 16}, sort_keys=True, separators=(",", ":"),
    ).encode()).digest()  # fmt: skip
    assert config.volume_key_aad(2) == b"EGWV" + p + struct.pack(">HI", 2, 2)
    assert config.volume_key_aad(1) == b"EGWV" + p + struct.pack(">HI", 1, 1)
    assert config.volume_key_aad(2).hex() == EXPECTED_EPOCH_AAD


EXPECTED_EPOCH_AAD = (
    "45475756"  # "EGWV"
    "f394eabbe67e0d61e14e2f202470d32a725ac1b9f0f1736ab5eaa3d6b57ddf94"  # P
    "0002" "00000002"  # version 2, epoch 2
)  # fmt: skip
EXPECTED_EPOCH_CONFIG_MAC = "c7d27e6a4089c5b065be9ed25f78409732f629720a3dbb9fb0dcbb11e910e396"


def test_config_mac_under_the_current_epochs_key():
    """The MAC key comes from the volume key of kek.current's epoch (2), not epoch 1's."""
    config = epoch_config()
    keyring = Keyring(config, {1: KEK, 2: KEK}, {1: VOLUME_KEY, 2: EPOCH_VOLUME_KEY})
    mac_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None,
        info=b"encfs-gw v1: HMAC key authenticating the volume config",
    ).derive(EPOCH_VOLUME_KEY)  # fmt: skip
    expected = hmac.new(mac_key, config.mac_message(), hashlib.sha256).digest()
    assert keyring.config_mac(config.mac_message(), config.current_epoch) == expected
    assert keyring.config_mac(config.mac_message(), 1) != expected
    assert expected.hex() == EXPECTED_EPOCH_CONFIG_MAC
    body = json.loads(config.to_json(expected))["kek"]["versions"]
    assert [(v["version"], v["volume_key_epoch"]) for v in body] == [(1, 1), (2, 2)]
    parsed, stored = VolumeConfig.from_json(config.to_json(expected))
    assert stored == expected and parsed.body() == config.body()


# --- places (feature bound-names): a directory id record and a bound symlink target ---------

PARENT_ID = bytes([0x77]) * 16
DIR_ID = bytes([0x88]) * 16
ROOT_ID = bytes([0x99]) * 16
LINK_ID = bytes([0xAA]) * 18
LINK_TARGET = b"../target"

EXPECTED_DIR_RECORD = (
    "88888888888888888888888888888888"  # dir id
    "106d0e708976826756c60851b7dd4d0a"  # binding A: "docs" in directory 77..77
    "00000000000000000000000000000000"  # binding B: none (no rename under way)
)
EXPECTED_ROOT_BINDING = "b2b91a0e09852579e6836365e077ace5"
EXPECTED_LINK_TARGET = (
    "AKqqqqqqqqqqqqqqqqqqqqqqqvXd4OBBQ8aIX33-3EU5AvcAAAAAAAAAAAAAAAAAAAAA"  # header: 68 chars
    "GLF0_8m-D-RnRuxr5d7PUlgUYHxrbNFmqQ"  # AES-SIV(target): 16-byte tag, 9 bytes
)


def _hkdf(info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(VOLUME_KEY)


def _hmac16(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()[:16]


def independent_places() -> tuple[bytes, bytes, str]:
    """docs/FORMAT.md 5.1 and 5.3, computed by hand."""
    binding_key = _hkdf(b"encfs-gw v1: HMAC key binding file headers to their names", 32)
    padded_docs = b"docs" + bytes(12)
    dir_tag = _hmac16(
        binding_key,
        b"EGWD directory binding" + VOLUME_ID + PARENT_ID + struct.pack(">H", 16) + padded_docs
        + DIR_ID,
    )
    root_tag = _hmac16(binding_key, b"EGWD root binding" + VOLUME_ID + ROOT_ID)
    symlink_key = _hkdf(b"encfs-gw v1: AES-SIV key for symlink targets", 64)
    sealed = AESSIV(symlink_key).encrypt(LINK_TARGET, [b"EGWS", LINK_ID])
    padded_link = b"link" + bytes(12)
    link_tag = _hmac16(
        binding_key,
        b"EGWS link binding" + VOLUME_ID + PARENT_ID + struct.pack(">H", 16) + padded_link
        + b"\x00" + LINK_ID,
    )
    raw = b"\x00" + LINK_ID + link_tag + bytes(16) + sealed
    target = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    return DIR_ID + dir_tag + bytes(16), root_tag, target


def engine_places(monkeypatch) -> tuple[bytes, bytes, str]:
    from encfs.engine.bindings import Bindings
    from encfs.engine.symlinks import Symlinks
    from encfs.format.places import DirRecord

    config = VolumeConfig(
        volume_id=VOLUME_ID,
        block_size=16384,
        features=("aes256gcm-per-block-dek", "bound-names"),
        created="2026-01-01T00:00:00Z",
        current_kek=1,
        kek_versions={
            1: KekVersion(1, "active", "x", bytes(92), [Protector("00" * 8, "keyfile", {})])
        },
    )
    keyring = Keyring(config, {1: KEK}, VOLUME_KEY)
    bindings = Bindings(config.volume_id, keyring)
    dir_tag = bindings.dir_tag((PARENT_ID, b"docs"), DIR_ID)
    root_tag = bindings.root_tag(ROOT_ID)
    monkeypatch.setattr(crypto, "random_bytes", lambda size: LINK_ID)
    # The target fits the backing symlink: the symlink store (root_fd) is not touched.
    symlinks = Symlinks(-1, keyring, bindings, True, config.features)
    link = symlinks.new_record((PARENT_ID, b"link"), LINK_TARGET)
    record = DirRecord(DIR_ID, (dir_tag, bytes(16))).pack()
    return record, root_tag, link.encode()


def test_places_engine_matches_independent_computation_and_committed_bytes(monkeypatch):
    record, root_tag, target = independent_places()
    assert engine_places(monkeypatch) == (record, root_tag, target)
    assert record.hex() == EXPECTED_DIR_RECORD
    assert root_tag.hex() == EXPECTED_ROOT_BINDING
    assert target == EXPECTED_LINK_TARGET


# --- xattr sets (feature xattr-sets): one sealed set per object ------------------------------

XATTR_NONCE = bytes([0xBB]) * 12
XATTR_SET = {b"user.mime_type": b"text/plain", b"user.a": b"1"}
EXPECTED_XATTR_BODY = (
    "06" "757365722e61" "00000001" "31"  # "user.a" = "1"
    "0e" "757365722e6d696d655f74797065" "0000000a" "746578742f706c61696e"  # user.mime_type
)
EXPECTED_XATTR_RECORD_SHA256 = "442c917d63b10316e217de8462884d39476faa9c01066818164b8741dae443e2"


def independent_xattr_record() -> bytes:
    """docs/FORMAT.md 5.4.2, computed by hand: a file's inline set."""
    key = _hkdf(b"encfs-gw v1: AES-GCM key for xattr values", 32)
    body = bytes.fromhex(EXPECTED_XATTR_BODY)
    aad = b"EGWXS" + VOLUME_ID + b"\x01" + b"\x10" + FILE_ID + b"\x00"
    return b"\x00" + XATTR_NONCE + AESGCM(key).encrypt(XATTR_NONCE, body, aad)


def test_xattr_set_engine_matches_independent_computation_and_committed_bytes(
    monkeypatch, tmp_path
):
    from encfs.engine.xattr_sets import SetOwner, XattrSets
    from encfs.format import xattrs as xformat

    assert xformat.encode_body(XATTR_SET).hex() == EXPECTED_XATTR_BODY
    config = VolumeConfig(
        volume_id=VOLUME_ID,
        block_size=16384,
        features=("aes256gcm-per-block-dek", "xattr-sets"),
        created="2026-01-01T00:00:00Z",
        current_kek=1,
        kek_versions={
            1: KekVersion(1, "active", "x", bytes(92), [Protector("00" * 8, "keyfile", {})])
        },
    )
    keyring = Keyring(config, {1: KEK}, VOLUME_KEY)
    target = tmp_path / "object"
    target.write_bytes(b"")
    root_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sets = XattrSets(keyring.epoch_keys().xattr_value_key, VOLUME_ID, root_fd)
        owner = SetOwner(str(target), xformat.KIND_FILE, FILE_ID, xformat.SET_XATTR_USER)
        monkeypatch.setattr(crypto, "random_nonce", lambda: XATTR_NONCE)
        sets.write(owner, dict(XATTR_SET), was_stored=False)
        record = os.getxattr(target, xformat.SET_XATTR_USER)
        assert sets.read(owner) == XATTR_SET
    finally:
        os.close(root_fd)
    assert record == independent_xattr_record()
    assert hashlib.sha256(record).hexdigest() == EXPECTED_XATTR_RECORD_SHA256
