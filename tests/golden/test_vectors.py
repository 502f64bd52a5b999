"""Byte-exact vectors: the engine's sealing of one block and key slot, with injected
randomness, equals an independent computation straight from docs/FORMAT.md, and both
equal the committed digests."""

from __future__ import annotations

import hashlib
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encfs import contents as contents_mod
from encfs import crypto
from encfs.contents import FileContents
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
    monkeypatch.setattr(crypto, "random_bytes", lambda size: DEK + BLOCK_NONCE + SLOT_NONCE)
    config = VolumeConfig(
        volume_id=VOLUME_ID,
        block_size=16384,
        features=("aes256gcm-per-block-dek",),
        created="2026-01-01T00:00:00Z",
        current_kek=1,
        kek_versions={1: KekVersion(1, "active", "x", bytes(92), [Protector("keyfile", {}, {})])},
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
