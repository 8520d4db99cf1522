"""Autocrypt headers (milter_wkd.autocrypt): `parse` of any header value, `build` of any
address and keydata (and `parse(build(...))` gives them back), `single_from_address` of
From values, `is_multipart_report`.

Input: a selector octet, then text; the text is split at NUL into the pieces each
function takes.
"""

from __future__ import annotations

from collections.abc import Iterator

from fuzz.targets import fixtures
from milter_wkd import autocrypt
from milter_wkd.errors import Refused
from milter_wkd.values import Address

ALLOWED = (Refused,)


def one_input(data: bytes) -> None:
    if not data:
        return
    selector, text = data[0], data[1:].decode("utf-8", "surrogateescape")
    if selector % 3 == 0:
        parsed = autocrypt.parse(text)
        if parsed is not None:
            assert parsed.keydata and parsed.addr is not None
        return
    if selector % 3 == 1:
        autocrypt.single_from_address(text.split("\0"))
        autocrypt.is_multipart_report(text or None)
        return
    address_text, _, keydata = text.partition("\0")
    address = Address.parse(address_text)
    keydata_bytes = keydata.encode("utf-8", "surrogateescape") or b"\0"
    mutual = bool(selector & 0x80)
    value = autocrypt.build(address, keydata_bytes, prefer_encrypt_mutual=mutual)
    assert all(len(line) <= autocrypt.MAX_COLUMNS for line in
               f"{autocrypt.HEADER}: {value}".split("\r\n")), value
    assert autocrypt.parse(value) == autocrypt.AutocryptHeader(
        str(address), keydata_bytes, mutual), value


def seeds() -> Iterator[tuple[str, bytes]]:
    key = fixtures.key_vectors()["vector-ed25519.pgp"]
    built = autocrypt.build(Address.parse("alice@example.org"), key, prefer_encrypt_mutual=True)
    yield "parse-built", b"\x00" + built.encode()
    yield "parse-unknown-attribute", b"\x00addr=a@b.example; _x=1; keydata=AAAA"
    yield "parse-critical-unknown", b"\x00addr=a@b.example; x=1; keydata=AAAA"
    yield "from-values", b"\x01Alice <alice@example.org>\0bob@example.org"
    yield "from-one", b"\x01=?utf-8?q?Al=C3=AFce?= <alice@example.org>"
    yield "build", b"\x02alice@example.org\0" + key[:200].decode("latin-1").encode()
    yield "build-mutual", b"\x82Bob.O'Neil+tag@sub.example.org\0keydata"
