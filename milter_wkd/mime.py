"""Bounded reading of MIME mail, as data in, entities out: the subset of RFC 5322 (header
fields and their folding, the From address), RFC 2045 (Content-Type and its parameters,
Content-Transfer-Encoding) and RFC 2046 §5.1 (multipart bodies) that the structure of RFC
3156 PGP/MIME mail needs.

- `parse`: octets -> an `Entity` tree: the header fields of each entity as they came (names
  matched case-insensitively, values unparsed), its content type read once (text/plain
  when absent or malformed, RFC 2045 §5.2), multipart bodies split at their boundaries,
  leaf bodies kept as octets;
- `Entity.header`, `.param`, `.boundary`, `.parts`, `.payload` (transfer-decoded: identity,
  base64 or quoted-printable; any other encoding is refused);
- `address_list`: the addresses of a From header. The plain forms (an addr-spec, alone or
  after a display name of words or simple quoted strings) are read by a regular
  expression; everything else by the stdlib's RFC 5322 parser.

Fields are split as the stdlib's feed parser splits them (compat32: a line that is neither
a field nor a continuation ends the block) and parameters are read as
`email.message.Message.get_param` reads them, from the unfolded value; RFC 2047 encoded
words are not decoded in the fields read here (RFC 2047 §5 does not allow them there). The
feed parser itself is not used: it walks a body line by line (seconds for the 30 MB
submission of a flooded key).

Caps: the whole input (`max_size`), the header block of every entity (MAX_HEADER_BLOCK),
the number of entities (MAX_PARTS) and their nesting (MAX_DEPTH), and every header value
that is read at all (MAX_PARSED_HEADER, folds included: the stdlib's structured parser is
quadratic or worse on some hostile values, a 60 KB From of escaped quotes takes minutes).
Fields that nobody reads (a 10 KiB Autocrypt header) are kept as they came.

Errors: what is not read raises `MessageRefused` with a reason naming what was being read;
no other exception escapes for any input octets (`refusing` turns the stdlib's surprises
into refusals).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from contextlib import contextmanager
from email.headerregistry import AddressHeader, HeaderRegistry
from email.utils import collapse_rfc2231_value, decode_params, unquote
from typing import cast

from milter_wkd.errors import MessageRefused, Refused

MAX_HEADER_BLOCK = 64 * 1024
MAX_PARTS = 16
MAX_DEPTH = 3
MAX_PARSED_HEADER = 512
# RFC 2046 §5.1.1: 1 to 70 characters.
MAX_BOUNDARY = 70

DEFAULT_TYPE = "text/plain"
IDENTITY_ENCODINGS = frozenset({"", "7bit", "8bit", "binary"})

# The stdlib feed parser's idea of a header line (email.feedparser.headerRE) is a field
# name (printable ASCII but the colon, possibly empty) and a colon, a continuation, or an
# mbox "From " line; a field is one such line and its continuations, its value what
# follows the colon and the blanks after it, up to the line break of its last line.
_BREAK = r"(?:\r\n|\r|\n)"
_FIELD = re.compile(
    rf"([\x21-\x39\x3b-\x7e]*):[ \t]*([^\r\n]*(?:{_BREAK}[ \t][^\r\n]*)*){_BREAK}?")
_SKIPPED = re.compile(rf"(?:From |[ \t])[^\r\n]*(?:{_BREAK}[ \t][^\r\n]*)*{_BREAK}?")
# The structured parser for From; the registry makes a new class on every look-up.
_ADDRESS_HEADER = HeaderRegistry()["from"]
# The forms nearly every From takes, an addr-spec alone or after a display name of plain
# words or simple quoted strings, read without that parser (it costs more than the rest of
# a submission's MIME together); anything else goes to it. Left out on purpose: "=" and
# "?" (encoded words, which the parser decodes and may refuse), backslashes, comments,
# groups, domain literals, anything not ASCII.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/^_`{|}~-]"
_ADDR_SPEC = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_WORD = rf'(?:{_ATEXT}+|"[ !#-<>@-\[\]-~]*")'
_PLAIN_ADDRESS = re.compile(
    rf"[ \t]*(?:(?:{_WORD}(?:[ \t]+{_WORD})*[ \t]*)?<({_ADDR_SPEC})>|({_ADDR_SPEC}))[ \t]*")


@contextmanager
def refusing(what: str) -> Iterator[None]:
    """Turn the email package's surprises into refusals."""
    try:
        yield
    except Refused:
        raise
    # The stdlib header parser has raised IndexError, AttributeError, TypeError, ValueError
    # and RecursionError on hostile headers over the years; none may escape.
    except Exception as exc:  # noqa: BLE001
        raise MessageRefused(f"malformed {what}: {type(exc).__name__}") from None


class Entity:
    """One MIME entity: its header fields, content type, and parts or body."""

    __slots__ = ("_fields", "_params", "body", "children", "content_type")

    def __init__(self, fields: list[tuple[str, str]], body: bytes) -> None:
        # (lowercased name, value as it came, line breaks of its folds included)
        self._fields = fields
        self._params: list[tuple[str, _Param]] | None = None
        self.body = body
        self.children: list[Entity] | None = None
        value = self.header("Content-Type")
        content_type = DEFAULT_TYPE
        if value is not None:
            content_type = value.partition(";")[0].strip().lower()
            if content_type.count("/") != 1:
                content_type = DEFAULT_TYPE
        self.content_type = content_type

    @property
    def maintype(self) -> str:
        return self.content_type.partition("/")[0]

    def has(self, name: str) -> bool:
        """Is there a field of that name (its value unread, so not capped)?"""
        key = name.lower()
        return any(field == key for field, _ in self._fields)

    def headers(self, name: str) -> list[str]:
        """Every value of the named field, unfolded; each is capped."""
        key = name.lower()
        return [_read(name, value) for field, value in self._fields if field == key]

    def header(self, name: str) -> str | None:
        """The first value of the named field, unfolded and capped, or None."""
        key = name.lower()
        for field, value in self._fields:
            if field == key:
                return _read(name, value)
        return None

    def param(self, name: str) -> str | None:
        """A Content-Type parameter, unquoted, or None: `email.message.Message.get_param`,
        but RFC 2231 values are decoded as `get_boundary` decodes them."""
        value = self._param(name)
        if value is None or isinstance(value, str):
            return value
        return _collapse(value)

    def boundary(self) -> str | None:
        """The boundary parameter as `email.message.Message.get_boundary` reads it."""
        value = self._param("boundary")
        if value is None:
            return None
        return (unquote(value) if isinstance(value, str) else _collapse(value)).rstrip()

    def _param(self, name: str) -> _Param | None:
        params = self._params
        if params is None:
            content_type = self.header("Content-Type")
            params = self._params = _parameters(content_type) if content_type else []
        key = name.lower()
        for field, value in params:
            if field == key:
                return value
        return None

    def parts(self) -> list[Entity]:
        if self.children is None:
            raise MessageRefused("a multipart part without parts")
        return self.children

    def payload(self) -> bytes:
        """The body, decoded from its Content-Transfer-Encoding (RFC 2045 §6)."""
        if self.children is not None:
            raise MessageRefused("a MIME part has no body")
        encoding = (self.header("Content-Transfer-Encoding") or "").strip().lower()
        if encoding in IDENTITY_ENCODINGS:
            return self.body
        if encoding == "base64":
            return _base64(self.body)
        if encoding == "quoted-printable":
            return binascii.a2b_qp(self.body)
        raise MessageRefused(f"unknown Content-Transfer-Encoding {encoding[:40]!r}")


def _read(name: str, value: str) -> str:
    if len(value) > MAX_PARSED_HEADER:
        raise MessageRefused(
            f"the {name[:40]} header is longer than {MAX_PARSED_HEADER} characters")
    # Unfolding (RFC 5322 §2.2.3), as the stdlib's policies do.
    if "\n" in value or "\r" in value:
        value = value.replace("\r", "").replace("\n", "")
    return value


# A parameter value: text, or RFC 2231 (charset, language, text).
_Param = str | tuple[str | None, str | None, str]


def _parameters(value: str) -> list[tuple[str, _Param]]:
    """[(lowercased name, value unquoted)] of a Content-Type value, as get_param sees them:
    RFC 2231 sections joined and listed after the plain parameters."""
    params = _split_params(value)
    if all("*" not in name for name, _ in params[1:]):
        return [(name.lower(), unquote(raw)) for name, raw in params[1:]]
    with refusing("Content-Type header"):
        return [(name.lower(), unquote(raw) if isinstance(raw, str)
                 else (raw[0], raw[1], unquote(raw[2])))
                for name, raw in decode_params(params)[1:]]


def _collapse(value: tuple[str | None, str | None, str]) -> str:
    with refusing("Content-Type header"):
        return collapse_rfc2231_value(value)


def _split_params(value: str) -> list[tuple[str, str]]:
    """[(type, ""), (name, raw value)...]: split at the semicolons outside quoted strings,
    as the stdlib's email.message._parseparam does (bounded by MAX_PARSED_HEADER)."""
    params: list[tuple[str, str]] = []
    rest = ";" + value
    while rest[:1] == ";":
        rest = rest[1:]
        end = rest.find(";")
        while end > 0 and (rest.count('"', 0, end) - rest.count('\\"', 0, end)) % 2:
            end = rest.find(";", end + 1)
        if end < 0:
            end = len(rest)
        item = rest[:end]
        name, equals, raw = item.partition("=")
        params.append((name.strip().lower(), raw.strip()) if equals else (item.strip(), ""))
        rest = rest[end:]
    return params


def _base64(body: bytes) -> bytes:
    """As the stdlib decodes a base64 body (padding mended, stray characters skipped), but
    refused where the stdlib hands back the undecoded text."""
    encoded = b"".join(body.splitlines())
    missing = -len(encoded) % 4
    attempts = ((encoded + b"=" * missing, True), (encoded, False), (encoded + b"==", False))
    for attempt, validate in attempts:
        try:
            return base64.b64decode(attempt, validate=validate)
        except binascii.Error:
            continue
    raise MessageRefused("a base64 MIME part that does not decode")


def address_list(value: str, name: str = "From") -> list[str]:
    """The addr-specs of an RFC 5322 address-list header value (display names and groups
    dropped), read by the stdlib's structured parser; the value is one of `Entity.header`
    (capped)."""
    plain = _PLAIN_ADDRESS.fullmatch(value)
    if plain is not None:
        return [plain.group(1) or plain.group(2)]
    with refusing(f"{name} header"):
        header = cast(AddressHeader, _ADDRESS_HEADER(name, value))
        return [address.addr_spec for address in header.addresses]


# --- structure --------------------------------------------------------------------------

def parse(raw: bytes, what: str, max_size: int) -> Entity:
    """The entity tree of a mail (or of a decrypted MIME entity); `what` names it in
    refusals."""
    if len(raw) > max_size:
        raise MessageRefused(f"{what} is larger than {max_size} octets")
    with refusing(what):
        return _entity(raw, what, 0, [0])


def split_head(raw: bytes) -> tuple[bytes, bytes]:
    """(header block with its blank line, body). A mail without a body is all header.
    Only the first MAX_HEADER_BLOCK octets are searched: a longer header is refused anyway,
    and a search through a 30 MB body for a blank line it does not have costs time."""
    if raw.startswith((b"\r\n", b"\n")):
        return b"\n", raw[2 if raw.startswith(b"\r\n") else 1 :]
    window = MAX_HEADER_BLOCK + 4
    ends = [(pos, size) for pos, size in ((raw.find(b"\r\n\r\n", 0, window), 4),
                                          (raw.find(b"\n\n", 0, window), 2)) if pos >= 0]
    if not ends:
        if len(raw) > MAX_HEADER_BLOCK:
            raise MessageRefused(f"more than {MAX_HEADER_BLOCK} octets of header")
        return raw + b"\n\n", b""
    pos, size = min(ends)
    return raw[: pos + size], raw[pos + size :]


def header_fields(head: bytes) -> list[tuple[str, str]]:
    """[(lowercased name, value)] of a header block, split as the stdlib's feed parser
    splits it: lines end at CR, LF or CRLF; the block ends at the first line that is not a
    field or a continuation; an mbox "From " line, a field without a name and
    continuations of neither are skipped; a value keeps the line breaks of its folds.
    Octets that are not ASCII are kept as surrogate escapes."""
    text = head.decode("ascii", "surrogateescape")
    fields: list[tuple[str, str]] = []
    position = 0
    while True:
        field = _FIELD.match(text, position)
        if field is not None:
            if field.group(1):
                fields.append((field.group(1).lower(), field.group(2)))
        else:
            field = _SKIPPED.match(text, position)
            if field is None:
                return fields
        position = field.end()


def _entity(raw: bytes, what: str, depth: int, count: list[int]) -> Entity:
    """An entity and its parts: multipart bodies split at their boundaries with bytes.find,
    leaf bodies kept as they are (decoded on request)."""
    count[0] += 1
    if count[0] > MAX_PARTS:
        raise MessageRefused(f"{what} has more than {MAX_PARTS} MIME parts")
    if depth > MAX_DEPTH:
        raise MessageRefused(f"{what} nests MIME parts deeper than {MAX_DEPTH}")
    head, body = split_head(raw)
    if len(head) > MAX_HEADER_BLOCK:
        raise MessageRefused(f"{what} has more than {MAX_HEADER_BLOCK} octets of header")
    entity = Entity(header_fields(head), body)
    if entity.maintype == "multipart":
        boundary = entity.boundary()
        if not boundary or len(boundary) > MAX_BOUNDARY:
            raise MessageRefused(f"{what}: a multipart part without parts (no usable boundary)")
        entity.children = [
            _entity(part, what, depth + 1, count)
            for part in _split_multipart(body, boundary.encode("ascii", "replace"))]
        if not entity.children:
            raise MessageRefused(f"{what}: a multipart part without parts")
        entity.body = b""
    return entity


def _find_delimiter(body: bytes, delimiter: bytes, start: int) -> int:
    """The next line that starts with delimiter and is a delimiter line (RFC 2046 §5.1.1:
    nothing but white space or the closing "--" after the boundary)."""
    while True:
        found = body.find(delimiter, start)
        if found < 0:
            return -1
        if found == 0 or body[found - 1 : found] == b"\n":
            rest = body.find(b"\n", found)
            tail = body[found + len(delimiter) : rest if rest >= 0 else len(body)]
            if tail.startswith(b"--") or not tail.strip():
                return found
        start = found + 1


def _split_multipart(body: bytes, boundary: bytes) -> list[bytes]:
    delimiter = b"--" + boundary
    position = _find_delimiter(body, delimiter, 0)
    if position < 0:
        raise MessageRefused("a multipart body without its first boundary")
    parts: list[bytes] = []
    while True:
        if body[position + len(delimiter) : position + len(delimiter) + 2] == b"--":
            return parts
        line_end = body.find(b"\n", position)
        if line_end < 0:
            return parts
        start = line_end + 1
        following = _find_delimiter(body, delimiter, start)
        if following < 0:
            # No closing delimiter: the last part runs to the end (the stdlib does the same).
            parts.append(body[start:])
            return parts
        end = following
        # The line break before a delimiter belongs to the delimiter.
        if body[end - 2 : end] == b"\r\n":
            end -= 2
        elif body[end - 1 : end] == b"\n":
            end -= 1
        parts.append(body[start:max(start, end)])
        if len(parts) > MAX_PARTS:
            raise MessageRefused(f"more than {MAX_PARTS} MIME parts")
        position = following
