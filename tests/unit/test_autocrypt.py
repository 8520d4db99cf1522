"""Autocrypt header building, folding and parsing (Level 1 §2.1)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from milter_wkd import autocrypt
from milter_wkd.errors import Refused
from milter_wkd.values import Address

ALICE = Address.parse("alice@example.org")


def test_known_header_shape() -> None:
    value = autocrypt.build(ALICE, b"\x01" * 10, prefer_encrypt_mutual=True)
    assert value == "addr=alice@example.org; prefer-encrypt=mutual; keydata=\r\n AQEBAQEBAQEBAQ=="


@given(st.binary(min_size=1, max_size=6000), st.booleans())
def test_parse_inverts_build_and_lines_fit(keydata: bytes, mutual: bool) -> None:
    value = autocrypt.build(ALICE, keydata, prefer_encrypt_mutual=mutual)
    lines = f"{autocrypt.HEADER}: {value}".split("\r\n")
    assert all(len(line) <= autocrypt.MAX_COLUMNS for line in lines)
    assert all(line.startswith(" ") for line in lines[1:])
    parsed = autocrypt.parse(value)
    assert parsed == autocrypt.AutocryptHeader(str(ALICE), keydata, mutual)


def test_oversize_is_refused() -> None:
    with pytest.raises(Refused):
        autocrypt.build(ALICE, b"\0" * 8000)


@pytest.mark.parametrize("value", [
    "keydata=AAAA",                                  # no addr
    "addr=a@example.org",                            # no keydata
    "addr=a@example.org; color=blue; keydata=AAAA",  # unknown critical attribute
    "addr=a@example.org; keydata=!!!!",              # not base64
    "addr=a@example.org; addr=b@example.org; keydata=AAAA",
    "addr=a@example.org; keydata=",
])
def test_invalid_headers_are_ignored(value: str) -> None:
    assert autocrypt.parse(value) is None


def test_underscore_attributes_are_allowed() -> None:
    parsed = autocrypt.parse("addr=a@example.org; _x=1; keydata=AA AA")
    assert parsed is not None
    assert parsed.keydata == b"\0\0\0"


@pytest.mark.parametrize(("values", "expected"), [
    (["Alice <alice@example.org>"], ALICE),
    (["alice@example.org"], ALICE),
    (["Alice <alice@example.org>, Bob <bob@example.org>"], None),
    (["a@example.org", "b@example.org"], None),
    ([], None),
    (["undisclosed-recipients:;"], None),
])
def test_single_from_address(values: list[str], expected: Address | None) -> None:
    assert autocrypt.single_from_address(values) == expected


def test_multipart_report() -> None:
    assert autocrypt.is_multipart_report("multipart/report; report-type=delivery-status")
    assert not autocrypt.is_multipart_report("multipart/mixed")
    assert not autocrypt.is_multipart_report(None)
