"""Autocrypt header building, folding and parsing (Level 1 §2.1), and the test for mail
whose client does OpenPGP itself (issue #14)."""

import base64
from email.utils import getaddresses

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


# --- client_does_openpgp: mail whose client does OpenPGP itself gets no header of ours ---

PLAIN = [("From", "alice@example.org"), ("To", "bob@example.org"), ("Subject", "hi")]
ENCRYPTED = 'multipart/encrypted; protocol="application/pgp-encrypted"; boundary="b"'


@pytest.mark.parametrize(("extra", "body", "reason"), [
    ([("Content-Type", ENCRYPTED)], None, "multipart/encrypted"),
    ([("Content-Type", 'multipart/signed; micalg=pgp-sha256; protocol="application/'
                       'pgp-signature"; boundary="b"')], None, "multipart/signed"),
    ([("Content-Type", "multipart/Encrypted;\n\tprotocol=\"application/pgp-encrypted\"")],
     None, "multipart/encrypted"),  # case, folded
    ([("content-type", "MULTIPART/SIGNED")], None, "multipart/signed"),
    ([("Content-Type", " multipart (PGP/MIME) / encrypted (really) ;boundary=x")], None,
     "multipart/encrypted"),  # comments and white space around the slash
    ([("Content-Type", "multipart/encrypted")], b"", "multipart/encrypted"),
    # Repeated: readers differ in which one counts, so any one is enough.
    ([("Content-Type", "text/plain"), ("Content-Type", ENCRYPTED)], None, "multipart/enc"),
    ([("Content-Type", ENCRYPTED), ("Content-Type", "text/plain")], None, "multipart/enc"),
    ([("Chat-Version", "1.0")], None, "Chat-Version"),
    ([("CHAT-VERSION ", "")], None, "Chat-Version"),
    ([("Autocrypt", "addr=alice@example.org; keydata=AAAA")], None, "Autocrypt header"),
    ([("autocrypt", "nonsense")], None, "Autocrypt header"),
    ([], b"-----BEGIN PGP MESSAGE-----\r\n\r\nhQEMA\r\n-----END PGP MESSAGE-----\r\n",
     "inline PGP message"),
    ([("Content-Type", "text/plain; charset=utf-8")],
     b"-----BEGIN PGP SIGNED MESSAGE-----\r\nHash: SHA256\r\n\r\nHello\r\n",
     "inline PGP signed message"),
    ([("Content-Type", "Text/Plain")], b"Hello Bob,\r\n\r\n-----BEGIN PGP MESSAGE-----\r\n",
     "inline PGP message"),  # a line of preface
    ([("Content-Type", "text/plain"), ("Content-Transfer-Encoding", "Base64")],
     base64.encodebytes(b"-----BEGIN PGP MESSAGE-----\r\n\r\nhQEMA\r\n"),
     "inline PGP message"),
])
def test_a_client_that_does_openpgp_is_recognised(
        extra: list[tuple[str, str]], body: bytes | None, reason: str) -> None:
    found = autocrypt.client_does_openpgp(PLAIN + extra, body)
    assert found is not None
    assert reason in found


@pytest.mark.parametrize(("extra", "body"), [
    ([], None),
    ([], b"Hello Bob.\r\n"),
    ([("Content-Type", "text/plain; charset=utf-8")], b"Hello Bob.\r\n"),
    ([("Content-Type", "multipart/mixed; boundary=\"multipart/encrypted\"")], None),
    ([("Content-Type", "text/plain; x=\"multipart/signed\"")], None),
    ([("Autocrypt-Gossip", "addr=bob@example.org; keydata=AAAA")], None),  # inner only
    ([("X-Chat-Version", "1.0"), ("Chat-Versions", "1")], None),
    ([], b"> -----BEGIN PGP MESSAGE-----\r\n"),  # quoted, not at a line start
    ([], b"see -----BEGIN PGP SIGNED MESSAGE----- here\r\n"),
    ([], b"-----BEGIN PGP PUBLIC KEY BLOCK-----\r\n"),  # a key attached, not a message
    ([], b"x" * autocrypt.BODY_LOOK_BYTES + b"\r\n-----BEGIN PGP MESSAGE-----\r\n"),
    # Armor in a part of a multipart mail is not the top-level body.
    ([("Content-Type", "multipart/mixed; boundary=b")],
     b"--b\r\n\r\n-----BEGIN PGP MESSAGE-----\r\n--b--\r\n"),
    ([("Content-Type", "text/html")], b"-----BEGIN PGP MESSAGE-----\r\n"),
])
def test_a_client_without_openpgp_gets_none(extra: list[tuple[str, str]],
                                            body: bytes | None) -> None:
    assert autocrypt.client_does_openpgp(PLAIN + extra, body) is None


def test_without_the_body_the_headers_decide_alone() -> None:
    body = b"-----BEGIN PGP MESSAGE-----\r\n"
    assert autocrypt.client_does_openpgp(PLAIN, body) is not None
    assert autocrypt.client_does_openpgp(PLAIN, None) is None


@given(st.lists(st.tuples(st.text(max_size=20), st.text(max_size=200)), max_size=8),
       st.binary(max_size=300) | st.none())
def test_any_headers_and_body_give_a_reason_or_none(headers: list[tuple[str, str]],
                                                     body: bytes | None) -> None:
    found = autocrypt.client_does_openpgp(headers, body)
    assert found is None or isinstance(found, str)


_FROM_PARTS = st.sampled_from(["a", "b.c", "Z9", "_", "-", "+", "=", "ä", " ", "\t", ".",
                               "..", "@", "<", ">", ",", '"', "(", ")", ":", ";", "\\",
                               "[", "]", "example.org", "x-y", "\n "])
_ATOMS = st.sampled_from(["a", "b.c", "x-y", "example.org", "ä", "a..b", ".a", "a.", "",
                          '"q"', "a b", "+", "_", "org."])
_NAMES = st.sampled_from(["", "Alice", " Zoë Ä-b ", "A.", '"A"', "(c)", "a,b", "\t", "a@b"])
# Mostly near "Name <local@domain>", with anything in between.
_FROM_VALUES = st.one_of(
    st.lists(_FROM_PARTS, max_size=12).map("".join),
    st.tuples(_NAMES, st.sampled_from(["", "<", " <"]), _ATOMS, st.sampled_from(["@", ""]),
              _ATOMS, st.sampled_from(["", ">", "> ", " (c)"])).map("".join))


@given(_FROM_VALUES)
def test_single_from_address_reads_simple_values_as_the_email_package_does(value: str,
                                                                            ) -> None:
    """The fast path for "addr", "<addr>" and "Name <addr>" gives what getaddresses gives."""
    pairs = [addr for _, addr in getaddresses([value]) if addr]
    try:
        expected = Address.parse(pairs[0]) if len(pairs) == 1 else None
    except Refused:
        expected = None
    assert autocrypt.single_from_address([value]) == expected


@pytest.mark.parametrize("value", ["<user0@example.org>", "user0@example.org",
                                   " Alice Liddell <alice@example.org> ", "Zoë <z@x.org>"])
def test_simple_from_values_take_the_fast_path(value: str) -> None:
    assert autocrypt._SIMPLE_FROM.fullmatch(value) is not None
    assert autocrypt.single_from_address([value]) is not None
