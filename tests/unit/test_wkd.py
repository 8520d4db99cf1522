"""Known answers for WKD hashing; gpg-wks-client --print-wkd-hash agrees (integration)."""

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from milter_wkd import wkd
from milter_wkd.values import Address


def test_known_answer_from_the_draft() -> None:
    assert wkd.local_part_hash("Joe.Doe") == "iy9q119eutrkn8s1mk4r39qejnbu3n5q"
    addr = Address.parse("Joe.Doe@Example.ORG")
    assert wkd.advanced_url(addr) == (
        "https://openpgpkey.example.org/.well-known/openpgpkey/example.org/hu/"
        "iy9q119eutrkn8s1mk4r39qejnbu3n5q?l=Joe.Doe")
    assert wkd.direct_url(addr) == (
        "https://example.org/.well-known/openpgpkey/hu/iy9q119eutrkn8s1mk4r39qejnbu3n5q?l=Joe.Doe")


def test_zbase32_known_answers() -> None:
    assert wkd.zbase32(b"") == ""
    assert wkd.zbase32(b"\x00") == "yy"
    assert wkd.zbase32(b"\xf0\xbf\xc7") == "6n9hq"  # from the z-base-32 spec
    assert wkd.zbase32(b"\xd4\x7a\x04") == "4t7ye"


def test_only_ascii_is_lowered() -> None:
    expected = wkd.zbase32(hashlib.sha1("Älice".encode()).digest())  # noqa: S324
    assert wkd.local_part_hash("ÄLICE") == expected


@given(st.binary(min_size=20, max_size=20))
def test_sha1_digests_give_32_chars(digest: bytes) -> None:
    encoded = wkd.zbase32(digest)
    assert len(encoded) == 32
    assert set(encoded) <= set("ybndrfg8ejkmcpqxot1uwisza345h769")
