"""Name encoding: strict canonical base64url, padding, long names, reserved entries."""

from __future__ import annotations

import pytest

from encfs.errors import IntegrityError
from encfs.format import names


def test_padding_roundtrip_hides_length():
    for length in (1, 15, 16, 17, 255):
        plain = b"a" * length
        padded = names.pad_name(plain)
        assert len(padded) % 16 == 0
        assert names.unpad_name(padded) == plain
    assert len(names.pad_name(b"a")) == len(names.pad_name(b"abcdefghijklmno"))


@pytest.mark.parametrize("bad", [b"", b".", b"..", b"a/b", b"a\0b", b"x" * 256])
def test_invalid_plain_names_rejected(bad):
    with pytest.raises(IntegrityError):
        names.pad_name(bad)


def test_unpad_rejects_overlong_padding():
    with pytest.raises(IntegrityError):
        names.unpad_name(b"a" + bytes(31))
    with pytest.raises(IntegrityError):
        names.unpad_name(b"a" * 15)


def test_strict_base64():
    data = bytes(range(40))
    text = names.b64encode(data)
    assert names.b64decode_strict(text) == data
    for bad in (text + "=", text[:-1] + "\n", "a", text.replace(text[-1], "+"), "é"):
        with pytest.raises(IntegrityError):
            names.b64decode_strict(bad)
    # Non-zero padding bits: same bytes, different text, must be refused.
    one = names.b64encode(b"\xff")
    assert one == "_w"
    with pytest.raises(IntegrityError):
        names.b64decode_strict("_x")


def test_long_names_and_classification():
    encoded = "A" * 300
    assert names.is_long(encoded)
    stub = names.long_name_stub(encoded)
    assert len(stub) <= 255 and stub.startswith(".egwL")
    assert names.classify(stub) == "long"
    assert names.classify(names.sidecar_name(stub)) == "reserved"
    assert names.classify("abcDEF-_0") == "short"
    for reserved in (".egw-dirid", "encfs-gw.conf", "encfs-gw.lock", ".egw-tmp-0011"):
        assert names.classify(reserved) == "reserved"
