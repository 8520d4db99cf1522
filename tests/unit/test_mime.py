"""The bounded MIME reader (milter_wkd.mime): it splits fields and reads parameters as the
stdlib does (compared with the stdlib on random input), its From shortcut agrees with the
stdlib's RFC 5322 parser wherever it applies, bodies decode or are refused, and every cap
holds. Whole WKS mails are in test_wks.py."""

from __future__ import annotations

import base64
import email.parser
import quopri
import string
import time
from email.headerregistry import HeaderRegistry
from email.message import Message
from email.policy import Compat32

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milter_wkd import mime
from milter_wkd.errors import MessageRefused

MB = 1024 * 1024


class _RawValues(Compat32):
    """compat32 handing out the values as stored (no Header objects for 8-bit text)."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        return value


def stdlib_fields(head: bytes) -> list[tuple[str, str]]:
    parsed = email.parser.BytesParser(policy=_RawValues()).parsebytes(head, headersonly=True)
    return [(name.lower(), value) for name, value in parsed.items()]


# --- header fields ----------------------------------------------------------------------

HEAD_PIECES = st.sampled_from([
    b"From: a@b.c", b"From ", b"Subject", b"X", b":", b" ", b"\t", b"\r", b"\n", b"\r\n",
    b"a b", b"\xc3\xa4", b"\x0c", b"\x0b", b"Content-Type", b'x; y="z"', b"=", b"\x00"])


@settings(max_examples=400, deadline=None)
@given(st.lists(HEAD_PIECES, max_size=16).map(b"".join) | st.binary(max_size=60))
def test_fields_are_split_as_the_stdlib_splits_them(head: bytes) -> None:
    head += b"\n\n"
    assert mime.header_fields(head) == stdlib_fields(head)


@pytest.mark.parametrize(("head", "fields"), [
    (b"A: 1\r\nB:2\r\n\r\n", [("a", "1"), ("b", "2")]),
    (b"Subject: a\r\n b\r\n\tc\r\n\r\n", [("subject", "a\r\n b\r\n\tc")]),
    (b"From user@example.org Mon Jan  1\nA: 1\n\n", [("a", "1")]),  # mbox line skipped
    (b" stray\nA: 1\n:nameless\n continued\nB: 2\n\n", [("a", "1"), ("b", "2")]),
    (b"A: 1\nno colon here\nB: 2\n\n", [("a", "1")]),  # ends the header block
    (b"A: 1\rB: 2\n\n", [("a", "1"), ("b", "2")]),  # a lone CR ends a line too
    (b"A: 1\x0cB: 2\n\n", [("a", "1\x0cB: 2")]),  # a form feed does not
    (b"A: \xc3\xa4\n\n", [("a", "\udcc3\udca4")]),
])
def test_header_field_examples(head: bytes, fields: list[tuple[str, str]]) -> None:
    assert mime.header_fields(head) == fields
    assert stdlib_fields(head) == fields


def test_values_are_unfolded_and_capped_with_their_folds() -> None:
    entity = mime.Entity([("subject", "a\r\n b"), ("x", "y" * 500 + "\r\n" + " " * 11)], b"")
    assert entity.header("Subject") == "a b"
    with pytest.raises(MessageRefused, match="the X header is longer than 512 characters"):
        entity.header("X")
    assert entity.has("x")  # looking for a field does not read it


def test_only_the_fields_read_are_capped() -> None:
    entity = mime.Entity([("autocrypt", "k" * 10_000), ("from", "a@b.c"), ("from", "x" * 600)],
                         b"")
    assert entity.header("From") == "a@b.c"
    with pytest.raises(MessageRefused, match="longer than 512"):
        entity.headers("From")


# --- content types and parameters -------------------------------------------------------

PARAM_VALUE = st.text(alphabet="aB01%'\"\\ ;=()-", max_size=10)
PARAM = st.builds(
    "{}={}".format,
    st.sampled_from(["boundary", "BOUNDARY", "protocol", "b", "boundary*", "boundary*0",
                     "boundary*1", "boundary*0*", "protocol*", " boundary", "boundary "]),
    PARAM_VALUE | PARAM_VALUE.map('"{}"'.format) | st.sampled_from(["utf-8''%41", "''x"]))
PARAM_TEXT = st.lists(PARAM | st.text(alphabet='ab*=;"\\ ', max_size=6), max_size=4).map(
    "; ".join)
TYPES = st.sampled_from(["multipart/mixed", "Multipart/Encrypted ", "text/plain (c)",
                         "application/pgp-keys", "a/b/c", "noslash", "", " x / y"])


@settings(max_examples=500, deadline=None)
@given(TYPES, PARAM_TEXT, st.sampled_from(["boundary", "protocol", "b", "B*"]))
def test_types_and_parameters_are_read_as_the_stdlib_reads_them(
        content_type: str, params: str, name: str) -> None:
    value = f"{content_type}; {params}"
    ours = mime.Entity([("content-type", value)], b"")
    theirs = Message(policy=_RawValues())
    theirs["Content-Type"] = value
    assert ours.content_type == theirs.get_content_type()
    try:
        param = theirs.get_param(name)
        boundary = theirs.get_boundary()
    except Exception:  # the stdlib's surprises are refusals here
        with pytest.raises(MessageRefused, match="malformed Content-Type header"):
            _read_both(ours, name)
        return
    if isinstance(param, tuple):  # RFC 2231: decoded as get_boundary decodes
        param = email.utils.collapse_rfc2231_value(param)
    assert ours.param(name) == param
    assert ours.boundary() == boundary


def _read_both(entity: mime.Entity, name: str) -> None:
    entity.param(name)
    entity.boundary()


@pytest.mark.parametrize(("value", "boundary"), [
    ('multipart/mixed; boundary="=-=01-x=-="', "=-=01-x=-="),
    ("multipart/mixed;\r\n\tboundary=abc", "abc"),
    ('multipart/mixed; x="a;b"; BOUNDARY=c', "c"),
    ("multipart/mixed; boundary*0=ab; boundary*1=cd", "abcd"),
    ("multipart/mixed; boundary*=utf-8''%41b", "Ab"),
    ("multipart/mixed; boundary (c) =x", None),  # comments are not read
    ("multipart/mixed", None),
])
def test_boundaries(value: str, boundary: str | None) -> None:
    assert mime.Entity([("content-type", value)], b"").boundary() == boundary


def test_encoded_words_are_not_decoded_in_the_fields_we_read() -> None:
    """RFC 2047 §5: not in Content-Type; policy.default decoded them, compat32 does not."""
    entity = mime.Entity([("content-type", "=?utf-8?q?application?=/pgp-keys")], b"")
    assert entity.content_type == "=?utf-8?q?application?=/pgp-keys"


# --- From -------------------------------------------------------------------------------

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
QTEXT = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"\\')
ATOM = st.text(alphabet=ATEXT, min_size=1, max_size=6)
LABEL = st.text(alphabet=string.ascii_letters + string.digits + "-", min_size=1, max_size=6)
ADDR_SPEC = st.builds("{}@{}".format, st.lists(ATOM, min_size=1, max_size=3).map(".".join),
                      st.lists(LABEL, min_size=1, max_size=3).map(".".join))
WORD = ATOM | st.text(alphabet=QTEXT, max_size=8).map('"{}"'.format)
BLANK = st.sampled_from(["", " ", "\t", "  "])
PLAINISH = st.one_of(
    st.builds("{}{}{}".format, BLANK, ADDR_SPEC, BLANK),
    st.builds("{}{}{}<{}>{}".format, BLANK, st.lists(WORD, max_size=3).map(" ".join), BLANK,
              ADDR_SPEC, BLANK))


@st.composite
def from_values(draw: st.DrawFn) -> str:
    """Plain From values, some with a character inserted where it may or may not belong."""
    value = draw(PLAINISH)
    if draw(st.booleans()):
        at = draw(st.integers(0, len(value)))
        extra = draw(st.sampled_from([*'"\\()<>@,;:.[]=? \t', "=?", "\udcc3", "é"]))
        value = value[:at] + extra + value[at:]
    return value


def stdlib_addresses(value: str) -> list[str] | None:
    try:
        header = HeaderRegistry()("From", value)
        return [a.addr_spec for a in getattr(header, "addresses", ())]
    except Exception:
        return None


@settings(max_examples=1500, deadline=None)
@given(from_values())
def test_the_plain_address_shortcut_agrees_with_the_stdlib(value: str) -> None:
    plain = mime._PLAIN_ADDRESS.fullmatch(value)
    if plain is not None:
        assert [plain.group(1) or plain.group(2)] == stdlib_addresses(value)
    theirs = stdlib_addresses(value)
    if theirs is None:
        with pytest.raises(MessageRefused, match="malformed From header"):
            mime.address_list(value)
    else:
        assert mime.address_list(value) == theirs


@pytest.mark.parametrize(("value", "plain"), [
    ("user@example.org", True), ("User <user@example.org>", True),
    ('"Doe, John" <j.doe@example.org>', True), ("<user@example.org>", True),
    ("=?utf-8?q?J=C3=B6rg?= <user@example.org>", False), ("user@example.org (me)", False),
    ("John Q. Public <jqp@example.org>", False), ("a@example.org, b@example.org", False),
])
def test_which_from_values_take_the_shortcut(value: str, plain: bool) -> None:
    assert (mime._PLAIN_ADDRESS.fullmatch(value) is not None) == plain
    assert mime.address_list(value) == stdlib_addresses(value)


def test_from_values_the_stdlib_cannot_take_are_refused() -> None:
    with pytest.raises(MessageRefused, match="malformed From header: ValueError"):
        mime.address_list("=?utf-8?q?a=0D=0ABcc=3A_x?= <user@localhost>")


# --- bodies -----------------------------------------------------------------------------

KEY = b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmDMEZ\n-----END PGP PUBLIC KEY BLOCK-----\n"


def _leaf(encoding: str, body: bytes) -> mime.Entity:
    return mime.parse(f"Content-Transfer-Encoding: {encoding}\n\n".encode() + body, "t", MB)


@pytest.mark.parametrize(("encoding", "body"), [
    ("", KEY), ("7bit", KEY), ("8BIT", KEY), (" binary ", KEY),
    ("base64", base64.encodebytes(KEY)), ("base64", base64.b64encode(KEY).rstrip(b"=")),
    ("Base64", b"!" + base64.encodebytes(KEY)), ("quoted-printable", quopri.encodestring(KEY)),
])
def test_transfer_encodings(encoding: str, body: bytes) -> None:
    assert _leaf(encoding, body).payload() == KEY


@pytest.mark.parametrize(("encoding", "body", "reason"), [
    ("x-uuencode", KEY, "unknown Content-Transfer-Encoding 'x-uuencode'"),
    ("base 64", KEY, "unknown Content-Transfer-Encoding"),
    ("base64", b"QUJDR", "base64 MIME part that does not decode"),
])
def test_bodies_we_do_not_read(encoding: str, body: bytes, reason: str) -> None:
    with pytest.raises(MessageRefused, match=reason):
        _leaf(encoding, body).payload()


def test_a_multipart_entity_has_parts_and_no_body() -> None:
    mail = mime.parse(b'Content-Type: multipart/mixed; boundary="B"\n\npreamble\n--B\n\na\n'
                      b"--B\nContent-Type: application/pgp-keys\n\nb\r\n--B--\nepilogue\n",
                      "mail", MB)
    assert [(p.content_type, p.payload()) for p in mail.parts()] == [
        ("text/plain", b"a"), ("application/pgp-keys", b"b")]
    with pytest.raises(MessageRefused, match="has no body"):
        mail.payload()
    with pytest.raises(MessageRefused, match="without parts"):
        mail.parts()[0].parts()


# --- caps -------------------------------------------------------------------------------

def test_caps() -> None:
    with pytest.raises(MessageRefused, match="mail is larger than 99 octets"):
        mime.parse(b"x" * 100, "mail", 99)
    with pytest.raises(MessageRefused, match="more than 65536 octets of header"):
        mime.parse(("X-Junk: " + "a" * 900 + "\n").encode() * 80 + b"\nbody", "mail", MB)
    many = b'Content-Type: multipart/mixed; boundary="M"\n\n' + b"--M\n\nx\n" * 20 + b"--M--\n"
    with pytest.raises(MessageRefused, match="more than 16 MIME parts"):
        mime.parse(many, "mail", MB)
    deep = b'Content-Type: multipart/mixed; boundary="B0"\n\n'
    for level in range(1, 6):
        deep += f'--B{level - 1}\nContent-Type: multipart/mixed; boundary="B{level}"\n\n'.encode()
    with pytest.raises(MessageRefused, match="deeper than 3"):
        mime.parse(deep, "mail", MB)
    with pytest.raises(MessageRefused, match="no usable boundary"):
        mime.parse(b"Content-Type: multipart/mixed; boundary=" + b"b" * 71 + b"\n\n", "m", MB)


@pytest.mark.parametrize("head", [
    b"a:\n" * 21_000,  # the most fields a header block holds
    b"X: " + b"\n " * 30_000,  # one field of 30,000 folds
    b"X: " + b'"\\' * 30_000 + b"\n",
])
def test_hostile_header_blocks_are_read_in_linear_time(head: bytes) -> None:
    started = time.perf_counter()
    entity = mime.parse(head + b"\nbody", "mail", MB)
    assert entity.content_type == "text/plain"
    assert entity.header("From") is None
    assert time.perf_counter() - started < 0.5
