"""Crypto recipes: round trips, every tamper raises IntegrityError, known answers."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from encfs import crypto
from encfs.errors import IntegrityError


def test_self_test_passes():
    crypto.self_test()


@given(st.binary(max_size=2000), st.binary(max_size=64))
def test_gcm_roundtrip(plaintext, aad):
    key = os.urandom(32)
    assert crypto.gcm_open(key, crypto.gcm_seal(key, plaintext, aad), aad) == plaintext


def test_gcm_every_bit_flip_detected():
    key = os.urandom(32)
    sealed = crypto.gcm_seal(key, b"sixteen byte msg", b"aad")
    for index in range(len(sealed)):
        for bit in (0, 7):
            tampered = bytearray(sealed)
            tampered[index] ^= 1 << bit
            with pytest.raises(IntegrityError):
                crypto.gcm_open(key, bytes(tampered), b"aad")
    with pytest.raises(IntegrityError):
        crypto.gcm_open(key, sealed, b"other aad")
    with pytest.raises(IntegrityError):
        crypto.gcm_open(os.urandom(32), sealed, b"aad")
    with pytest.raises(IntegrityError):
        crypto.gcm_open(key, sealed[:20], b"aad")


def test_gcm_injected_nonce_gives_known_bytes():
    sealed = crypto.gcm_seal(bytes(32), bytes(16), b"", nonce=bytes(12))
    assert sealed.hex() == "00" * 12 + (
        "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919"
    )


def test_siv_is_deterministic_and_bound_to_associated_data():
    siv = crypto.SivCipher(bytes(range(64)))
    a = siv.seal(b"name", [b"dir-1"])
    assert siv.seal(b"name", [b"dir-1"]) == a
    assert siv.seal(b"name", [b"dir-2"]) != a
    assert siv.open(a, [b"dir-1"]) == b"name"
    with pytest.raises(IntegrityError):
        siv.open(a, [b"dir-2"])
    with pytest.raises(IntegrityError):
        siv.open(a[:16], [b"dir-1"])


def test_hkdf_distinct_infos():
    key = os.urandom(32)
    assert crypto.hkdf(key, b"a", 32) != crypto.hkdf(key, b"b", 32)
    assert len(crypto.hkdf(key, crypto.INFO_NAME_KEY, 64)) == 64
