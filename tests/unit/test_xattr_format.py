"""The bytes of an xattr set (docs/FORMAT.md 5.4.2): strict both ways."""

from __future__ import annotations

import struct

import pytest

from encfs.errors import IntegrityError
from encfs.format import xattrs as xformat


def entry(name: bytes, value: bytes) -> bytes:
    return struct.pack(">B", len(name)) + name + struct.pack(">I", len(value)) + value


def test_round_trip_sorted_and_sized():
    attributes = {b"user.b": b"", b"trusted.x": b"\0\1", b"user.a": b"v" * 65536}
    body = xformat.encode_body(attributes)
    assert body == entry(b"trusted.x", b"\0\1") + entry(b"user.a", b"v" * 65536) + entry(
        b"user.b", b""
    )
    assert len(body) == xformat.body_size(attributes)
    assert xformat.decode_body(body) == attributes
    assert xformat.decode_body(b"") == {}


@pytest.mark.parametrize(
    "body",
    [
        entry(b"user.b", b"1") + entry(b"user.a", b"2"),  # not sorted
        entry(b"user.a", b"1") + entry(b"user.a", b"2"),  # repeated
        entry(b"user.a", b"1")[:-1],  # value cut
        entry(b"user.a", b"1")[:5],  # length cut
        b"\x06user",  # name cut
        entry(b"", b"1"),  # empty name
        entry(b"user.\0", b"1"),  # NUL in a name
        struct.pack(">B", 6) + b"user.a" + struct.pack(">I", 65537) + b"v" * 65537,
    ],
)
def test_malformed_bodies_are_integrity_errors(body):
    with pytest.raises(IntegrityError):
        xformat.decode_body(body)


def test_encode_refuses_what_decode_would_refuse():
    for attributes in ({b"": b"1"}, {b"a\0": b"1"}, {b"n" * 256: b""}, {b"a": b"v" * 65537}):
        with pytest.raises(ValueError):
            xformat.encode_body(attributes)


def test_records():
    sealed = bytes(28)
    assert xformat.parse_record(xformat.inline_record(sealed)) == (0, sealed)
    assert xformat.parse_record(xformat.STORED_RECORD) == (xformat.FLAG_STORED, b"")
    for bad in (b"", b"\x01\x00", b"\x02" + sealed, b"\x00" + bytes(27)):
        with pytest.raises(IntegrityError):
            xformat.parse_record(bad)


def test_aad_and_store_names_name_their_owner():
    file_id = bytes([0x22]) * 16
    aad = xformat.set_aad(bytes(16), xformat.KIND_FILE, file_id, 0)
    assert aad == b"EGWXS" + bytes(16) + b"\x01\x10" + file_id + b"\x00"
    assert xformat.set_aad(bytes(16), xformat.KIND_FILE, file_id, 1) != aad
    assert xformat.set_aad(bytes(16), xformat.KIND_DIRECTORY, file_id, 0) != aad
    name = xformat.store_name(xformat.KIND_FILE, file_id)
    assert "." not in name  # never a reserved name
    assert xformat.parse_store_name(name) == (xformat.KIND_FILE, file_id)
    with pytest.raises(ValueError):
        xformat.store_name(xformat.KIND_OTHER, b"")
