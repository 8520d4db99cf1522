"""The Web Key Service mail protocol (draft-koch-openpgp-webkey-service §4, GnuPG's
tools/gpg-wks-server.c and gpg-wks-client.c as the reference) as data in, decision out.

- `parse_submission`: a key publishing request, PGP/MIME `multipart/encrypted` (RFC 3156
  §4) whose plaintext is an `application/pgp-keys` part, or the old unencrypted form;
- `build_confirmation_request`: the draft ≥ 2 request gpg-wks-client --receive answers:
  `multipart/signed` { `multipart/mixed` { text/plain, `application/vnd.gnupg.wks` encrypted
  only to the submitted key } + detached signature by the submission key };
- `parse_confirmation_response`: the client's answer (encrypted to the submission key, or
  in the clear when the client found no key for us) carrying the nonce back;
- `parse_message`: either of the two, told apart by the type of the (decrypted) part;
- `build_notice` (`build_published_notice`, `build_refusal_notice`): a plain text mail from
  the submission address;
- `new_nonce`, `nonces_equal`; `parse_wks_data` for the name-value lines; `decrypter` makes
  the decrypt callback the parsers take from the submission key's secret key.

Reads only the bytes it is given; no sockets, no directory, no clock (`now` is passed in).
Mail is parsed with the standard `email` package under caps (whole mail, header block,
every header value it parses, number and nesting of parts). Generated mail is bytes with
CRLF line ends, ready for SMTP and DKIM; UTF-8 addresses need SMTPUTF8 from the mailer.

Errors: anything we will not process raises `MessageRefused` (or `BadAddress`, `KeyRefused`:
all `Refused`) with a reason fit for an SMTP reply or a log line; no other exception
escapes for any input bytes (an unexpected error of the decrypt callback becomes a
`MessageRefused` too).
"""

from __future__ import annotations

import binascii
import email.header
import email.parser
import email.policy
import functools
import hmac
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import AddressHeader, BaseHeader, HeaderRegistry
from email.message import EmailMessage, Message
from email.utils import format_datetime
from typing import Any, cast

from milter_wkd.errors import MessageRefused, Refused
from milter_wkd.openpgp import messages
from milter_wkd.values import Address, Fingerprint
from milter_wkd.wkd import zbase32

WKS_DRAFT_VERSION = 3
DEFAULT_MAX_MAIL = 2 * 1024 * 1024
MAX_HEADER_BLOCK = 64 * 1024
MAX_PARTS = 16
MAX_DEPTH = 3
# A WKS name-value body is five short lines; gpg-wks-server reads a few hundred octets.
MAX_WKS_BODY = 4096

SUBJECT_SUBMISSION = "Key publishing request"
SUBJECT_CONFIRM = "Confirm your key publication"
SUBJECT_RESPONSE = "Key publication confirmation"

TYPE_PGP_KEYS = "application/pgp-keys"
TYPE_WKS = "application/vnd.gnupg.wks"

Decrypt = Callable[[bytes], bytes]

_NONCE = re.compile(r"^[a-z0-9]{16,64}$")
_NAME_VALUE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*):[ \t]*(.*?)[ \t]*$")
# The stdlib's structured header parser is quadratic or worse on some hostile values (a
# 60 KB From of escaped quotes takes minutes). It runs only when a header is looked at, so
# every header we look at (From, Content-Type, Content-Transfer-Encoding, ...) is capped.
MAX_PARSED_HEADER = 512


class _ClassCachingRegistry(HeaderRegistry):
    """The stdlib's header registry, minus its habit of building a new class with type()
    on every header it parses (a third of the cost of reading a short header)."""

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = super().__getitem__(key)
            # Bounded: header names come from mail, and each class stays for good.
            if len(self._classes) < 256:
                self._classes[key] = cls
        return cls


class _BoundedPolicy(email.policy.EmailPolicy):
    """policy.default, refusing to parse any header value longer than MAX_PARSED_HEADER.
    A header value is parsed once per mail, however often it is looked at (the parsers
    ask an entity for its Content-Type many times)."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        if len(value) > MAX_PARSED_HEADER:
            raise MessageRefused(
                f"the {name[:40]} header is longer than {MAX_PARSED_HEADER} characters")
        if type(value) is str:
            return _parsed_header(self, name, value)
        parsed: str = super().header_fetch_parse(name, value)
        return parsed


@functools.lru_cache(maxsize=64)
def _parsed_header(policy: _BoundedPolicy, name: str, value: str) -> str:
    """The parsed header; the header objects are read, never changed, so they are shared."""
    parsed: str = email.policy.EmailPolicy.header_fetch_parse(policy, name, value)
    return parsed


_POLICY = _BoundedPolicy(header_factory=_ClassCachingRegistry())


def decrypter(secret_key: bytes, *, max_plaintext: int = messages.DEFAULT_MAX_PLAINTEXT,
              max_message: int | None = None) -> Decrypt:
    """A decrypt callback for the parsers, using the submission key's secret key.
    max_message defaults to what the plaintext cap implies (armor and framing on top)."""
    message_cap = max_message if max_message is not None else max(
        messages.DEFAULT_MAX_MESSAGE, max_plaintext * 2)

    def decrypt(data: bytes) -> bytes:
        return messages.decrypt(data, secret_key, max_message=message_cap,
                                max_plaintext=max_plaintext)
    return decrypt


# --- parsing ----------------------------------------------------------------------------

@contextmanager
def _mail_errors(what: str) -> Iterator[None]:
    """Turn the email package's surprises into refusals."""
    try:
        yield
    except Refused:
        raise
    # The stdlib header parser has raised IndexError, AttributeError, TypeError, ValueError
    # and RecursionError on hostile headers over the years; none may escape.
    except Exception as exc:  # noqa: BLE001
        raise MessageRefused(f"malformed {what}: {type(exc).__name__}") from None


def _parse_entity(raw: bytes, what: str, max_size: int) -> Message:
    if len(raw) > max_size:
        raise MessageRefused(f"{what} is larger than {max_size} octets")
    with _mail_errors(what):
        return _entity(raw, what, 0, [0])


def _split_head(raw: bytes) -> tuple[bytes, bytes]:
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


def _entity(raw: bytes, what: str, depth: int, count: list[int]) -> Message:
    """A MIME entity as a stdlib Message tree, the headers parsed by the stdlib and the
    bodies split here. The stdlib's feed parser walks a body line by line (seconds for the
    30 MB submission of a flooded key); multipart bodies are split at their boundaries
    with bytes.find instead, and leaf bodies are kept as they are (decoded on request)."""
    count[0] += 1
    if count[0] > MAX_PARTS:
        raise MessageRefused(f"{what} has more than {MAX_PARTS} MIME parts")
    if depth > MAX_DEPTH:
        raise MessageRefused(f"{what} nests MIME parts deeper than {MAX_DEPTH}")
    head, body = _split_head(raw)
    if len(head) > MAX_HEADER_BLOCK:
        raise MessageRefused(f"{what} has more than {MAX_HEADER_BLOCK} octets of header")
    entity = email.parser.BytesParser(_class=_Entity, policy=_POLICY).parsebytes(
        head, headersonly=True)
    if entity.get_content_maintype() == "multipart":
        boundary = entity.get_boundary()
        if not boundary or len(boundary) > 70:
            raise MessageRefused(f"{what}: a multipart part without parts (no usable boundary)")
        children = [_entity(part, what, depth + 1, count)
                    for part in _split_multipart(body, boundary.encode("ascii", "replace"))]
        if not children:
            raise MessageRefused(f"{what}: a multipart part without parts")
        entity.set_payload(cast(Any, children))
    elif isinstance(entity, _Entity):
        # The str payload the stdlib wants is made only if a transfer encoding needs it
        # (`_payload`): decoding a 30 MB body that is used as octets costs a tenth of a
        # second and as much memory again.
        entity.raw_body = body
    else:  # pragma: no cover - the parser always makes _Entity
        entity.set_payload(body.decode("ascii", "surrogateescape"))
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


def _children(part: Message) -> list[Message]:
    children = part.get_payload()
    if not part.is_multipart() or not isinstance(children, list):
        raise MessageRefused("a multipart part without parts")
    return [child for child in children if isinstance(child, Message)]


def _single_header(entity: Message, name: str) -> str | None:
    with _mail_errors(f"{name} header"):
        values = entity.get_all(name) or []
    if len(values) > 1:
        raise MessageRefused(f"more than one {name} header")
    return str(values[0]) if values else None


def _from_address(entity: Message) -> Address:
    if _single_header(entity, "From") is None:
        raise MessageRefused("no From header")
    with _mail_errors("From header"):
        header = entity["From"]
        if not isinstance(header, AddressHeader):
            raise MessageRefused("unreadable From header")
        specs = [a.addr_spec for a in header.addresses]
    if len(specs) != 1:
        raise MessageRefused("From must hold exactly one address")
    return Address.parse(specs[0])


def _draft_version(entity: Message) -> int | None:
    value = _single_header(entity, "Wks-Draft-Version")
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit() or len(value) > 3:
        raise MessageRefused("Wks-Draft-Version is not a number")
    return int(value)


_IDENTITY_ENCODINGS = frozenset({"", "7bit", "8bit", "binary"})


class _Entity(EmailMessage):
    """A parsed entity that keeps its body's octets as they came: for bodies without a
    transfer encoding, decoding 30 MB to str and encoding it back costs a tenth of a second."""

    raw_body: bytes | None = None


def _payload(part: Message) -> bytes:
    if isinstance(part, _Entity) and part.raw_body is not None:
        with _mail_errors("MIME part"):
            encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
        if encoding in _IDENTITY_ENCODINGS:
            return part.raw_body
        # As the stdlib's BytesParser keeps a body: ASCII with surrogate escapes.
        part.set_payload(part.raw_body.decode("ascii", "surrogateescape"))
    with _mail_errors("MIME part"):
        data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        raise MessageRefused("a MIME part has no body")
    return data


def _pgp_mime_ciphertext(entity: Message) -> bytes:
    """The encrypted body of an RFC 3156 §4 multipart/encrypted entity."""
    protocol = str(entity.get_param("protocol", "") or "").strip().lower()
    if protocol != "application/pgp-encrypted":
        raise MessageRefused("multipart/encrypted without protocol=application/pgp-encrypted")
    parts = _children(entity)
    if len(parts) != 2:
        raise MessageRefused("multipart/encrypted must have exactly two parts")
    control, body = parts
    if control.get_content_type() != "application/pgp-encrypted":
        raise MessageRefused("first part of multipart/encrypted is not application/pgp-encrypted")
    lines = [line.strip() for line in _payload(control).splitlines() if line.strip()]
    if lines != [b"Version: 1"]:
        raise MessageRefused("the application/pgp-encrypted part must say 'Version: 1'")
    if body.get_content_type() != "application/octet-stream":
        raise MessageRefused("second part of multipart/encrypted is not application/octet-stream")
    return _payload(body)


def _find_part(entity: Message, wanted: str) -> Message:
    """The entity itself when it has the wanted type, or the one such child of a
    multipart/mixed (some clients wrap the key in one, gpg's posteo form does)."""
    if entity.get_content_type() == wanted:
        return entity
    if entity.get_content_type() == "multipart/mixed":
        children = _children(entity)
        found = [c for c in children if c.get_content_type() == wanted]
        others = [c for c in children
                  if c.get_content_type() != wanted and c.get_content_maintype() != "text"]
        if len(found) == 1 and not others:
            return found[0]
        if len(found) > 1:
            raise MessageRefused(f"more than one {wanted} part")
    raise MessageRefused(f"expected a {wanted} part, found {entity.get_content_type()}")


def _plaintext_body(plaintext: bytes, wanted: str, max_size: int) -> bytes:
    """The body of the wanted type from a decrypted MIME entity. A plaintext without any
    MIME header is taken as that body itself (bare armored keys, bare WKS data)."""
    entity = _parse_entity(plaintext, "decrypted message", max_size)
    with _mail_errors("decrypted message"):
        if entity.get("Content-Type") is None:
            return plaintext
        return _payload(_find_part(entity, wanted))


def _unwrap(raw: bytes, wanted: str, decrypt: Decrypt, max_mail: int,
            ) -> tuple[Message, bytes, bool]:
    """(the mail, the body of the wanted type, was it encrypted?)"""
    mail = _parse_entity(raw, "mail", max_mail)
    with _mail_errors("mail"):
        if mail.get_content_type() == "multipart/encrypted":
            ciphertext = _pgp_mime_ciphertext(mail)
            return mail, _plaintext_body(decrypt(ciphertext), wanted, max_mail), True
        return mail, _payload(_find_part(mail, wanted)), False


@dataclass(frozen=True, slots=True)
class Submission:
    """A key publishing request: who sent it and the key bytes as found (armored or
    binary; run them through `openpgp.clean_key` before anything else)."""

    sender: Address
    key: bytes
    encrypted: bool
    draft_version: int | None


def parse_submission(raw: bytes, decrypt: Decrypt, *,
                     max_mail: int = DEFAULT_MAX_MAIL) -> Submission:
    """Parse a WKS submission mail; `decrypt` opens the PGP/MIME body."""
    # Header values are parsed lazily, on first access: every access is guarded.
    with _mail_errors("mail"):
        mail, key, encrypted = _unwrap(raw, TYPE_PGP_KEYS, decrypt, max_mail)
        sender = _from_address(mail)
        if not key.strip():
            raise MessageRefused("the application/pgp-keys part is empty")
        return Submission(sender, key, encrypted, _draft_version(mail))


@dataclass(frozen=True, slots=True)
class ConfirmationResponse:
    """A confirmation response. `address` is the address being confirmed (the From header
    agreed with it), `submission_address` the `sender:` the client answered to. The caller
    checks that `submission_address` is ours, finds the pending request for `address` and
    compares its nonce with `nonces_equal`, then deletes it (single use)."""

    address: Address
    submission_address: Address
    nonce: str
    encrypted: bool


def parse_wks_data(body: bytes) -> dict[str, str]:
    """The name-value lines of an application/vnd.gnupg.wks body (names lowercased).
    Unknown names are kept; a repeated name is refused (which one would count?)."""
    if len(body) > MAX_WKS_BODY:
        raise MessageRefused(f"WKS data is larger than {MAX_WKS_BODY} octets")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MessageRefused("WKS data is not UTF-8") from None
    fields: dict[str, str] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        match = _NAME_VALUE.match(line)
        if match is None or any(ord(ch) < 0x20 and ch != "\t" for ch in line):
            raise MessageRefused(f"malformed WKS data line: {line[:60]!r}")
        name = match.group(1).lower()
        if name in fields:
            raise MessageRefused(f"WKS data repeats '{name}'")
        fields[name] = match.group(2)
    return fields


def _field(fields: dict[str, str], name: str) -> str:
    value = fields.get(name)
    if not value:
        raise MessageRefused(f"WKS data lacks '{name}'")
    return value


def parse_confirmation_response(raw: bytes, decrypt: Decrypt, *,
                                max_mail: int = DEFAULT_MAX_MAIL) -> ConfirmationResponse:
    """Parse a WKS confirmation response mail; `decrypt` opens the PGP/MIME body."""
    with _mail_errors("mail"):
        mail, body, encrypted = _unwrap(raw, TYPE_WKS, decrypt, max_mail)
        sender = _from_address(mail)
    return _response(sender, body, encrypted)


def _response(sender: Address, body: bytes, encrypted: bool) -> ConfirmationResponse:
    fields = parse_wks_data(body)
    if fields.get("type") != "confirmation-response":
        raise MessageRefused(f"not a confirmation response: type {fields.get('type', '')[:40]!r}")
    address = Address.parse(_field(fields, "address"))
    submission_address = Address.parse(_field(fields, "sender"))
    nonce = _field(fields, "nonce")
    if not _NONCE.match(nonce):
        raise MessageRefused("the nonce is malformed")
    # GnuPG's server never looks at From; we insist that the confirming address sent it.
    if sender.key != address.key:
        raise MessageRefused(
            f"From does not match the address being confirmed ({sender} is not {address})")
    return ConfirmationResponse(address, submission_address, nonce, encrypted)


def _kind_of(entity: Message) -> tuple[str, Message]:
    """(TYPE_PGP_KEYS or TYPE_WKS, the part) as `_find_part` finds either."""
    for wanted in (TYPE_PGP_KEYS, TYPE_WKS):
        if entity.get_content_type() == wanted:
            return wanted, entity
    if entity.get_content_type() == "multipart/mixed":
        children = _children(entity)
        found = [c for c in children if c.get_content_type() in (TYPE_PGP_KEYS, TYPE_WKS)]
        if len(found) == 1:
            return found[0].get_content_type(), _find_part(entity, found[0].get_content_type())
        if len(found) > 1:
            raise MessageRefused(f"more than one {TYPE_PGP_KEYS} or {TYPE_WKS} part")
    raise MessageRefused(f"expected a {TYPE_PGP_KEYS} or {TYPE_WKS} part, found "
                         f"{entity.get_content_type()}")


def _bare_kind(plaintext: bytes) -> str:
    """A decrypted plaintext without MIME header: WKS data when it says so, else a key."""
    head = plaintext.lstrip()[:200].lower()
    return TYPE_WKS if head.startswith(b"type:") or b"\ntype:" in head else TYPE_PGP_KEYS


def parse_message(raw: bytes, decrypt: Decrypt, *, max_mail: int = DEFAULT_MAX_MAIL,
                  ) -> Submission | ConfirmationResponse:
    """A mail to the submission address: a key publishing request or a confirmation
    response, told apart by the type of the (decrypted) part, so that a refusal names
    what is wrong with the message it is (decrypted once, not once per guess)."""
    with _mail_errors("mail"):
        mail = _parse_entity(raw, "mail", max_mail)
        encrypted = mail.get_content_type() == "multipart/encrypted"
        if encrypted:
            plaintext = decrypt(_pgp_mime_ciphertext(mail))
            entity = _parse_entity(plaintext, "decrypted message", max_mail)
            if entity.get("Content-Type") is None:
                kind, body = _bare_kind(plaintext), plaintext
            else:
                kind, part = _kind_of(entity)
                body = _payload(part)
        else:
            kind, part = _kind_of(mail)
            body = _payload(part)
        sender = _from_address(mail)
        if kind == TYPE_PGP_KEYS:
            if not body.strip():
                raise MessageRefused("the application/pgp-keys part is empty")
            return Submission(sender, body, encrypted, _draft_version(mail))
    return _response(sender, body, encrypted)


# --- nonces -----------------------------------------------------------------------------

def new_nonce() -> str:
    """32 z-base-32 characters from 20 random octets, as gpg-wks-server makes them."""
    return zbase32(secrets.token_bytes(20))


def nonces_equal(expected: str, offered: str) -> bool:
    """Compare nonces in constant time (for equal lengths)."""
    return hmac.compare_digest(expected.encode("utf-8"), offered.encode("utf-8"))


# --- building ---------------------------------------------------------------------------

CRLF = b"\r\n"

CONFIRMATION_TEXT = """\
This message has been sent to confirm your request to publish your
OpenPGP key for {address} (fingerprint {fingerprint}).
If you did not request a key publication, simply ignore this message.

Most mail software handles this kind of message automatically, so you
would not have seen it. It seems that your client does not fully support
the Web Key Service. The web page

       https://gnupg.org/faq/wkd.html

explains how you can process this message anyway in a few manual steps.
"""


def _headers(pairs: list[tuple[str, str]]) -> bytes:
    for name, value in pairs:
        if any(ord(ch) < 0x20 for ch in value):
            raise MessageRefused(f"control character in the {name} header")
    return b"".join(f"{name}: {value}".encode() + CRLF for name, value in pairs)


def _message_id(domain: str) -> str:
    return f"<wks.{secrets.token_hex(12)}@{domain}>"


def _boundary() -> str:
    return "=-=" + secrets.token_hex(12) + "=-="


def _crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


def build_confirmation_request(*, submission_address: Address, address: Address,
                               fingerprint: Fingerprint, nonce: str, user_key: bytes,
                               submission_secret_key: bytes, now: int) -> bytes:
    """The confirmation request mail (draft ≥ 2 form) for a pending submission."""
    if not _NONCE.match(nonce):
        raise MessageRefused("the nonce is malformed")
    wks_data = (f"type: confirmation-request\nsender: {submission_address}\n"
                f"address: {address}\nfingerprint: {fingerprint.hex}\nnonce: {nonce}\n")
    # Only the submitted key can read it: answering proves the secret key is held.
    encrypted = messages.encrypt(wks_data.encode("utf-8"), [user_key], now=now)
    mixed = _boundary()
    signed_part = b"".join([
        _headers([("Content-Type", f'multipart/mixed; boundary="{mixed}"')]), CRLF,
        f"--{mixed}".encode(), CRLF,
        _headers([("Content-Type", "text/plain; charset=utf-8"),
                  ("Content-Transfer-Encoding", "8bit")]), CRLF,
        _crlf(CONFIRMATION_TEXT.format(address=address, fingerprint=fingerprint.hex)),
        f"--{mixed}".encode(), CRLF,
        _headers([("Content-Type", TYPE_WKS), ("Content-Transfer-Encoding", "7bit")]), CRLF,
        _crlf(encrypted.decode("ascii")),
        f"--{mixed}--".encode(),
    ])
    # RFC 3156 §5: the signature covers the part exactly as sent, CRLF line ends.
    signature = messages.sign_detached(signed_part, submission_secret_key)
    outer = _boundary()
    head = _headers([
        ("From", str(submission_address)),
        ("To", str(address)),
        ("Subject", SUBJECT_CONFIRM),
        ("Date", format_datetime(datetime.fromtimestamp(now, UTC))),
        ("Message-ID", _message_id(submission_address.domain)),
        ("Auto-Submitted", "auto-replied"),
        ("Wks-Draft-Version", str(WKS_DRAFT_VERSION)),
        ("Wks-Phase", "confirm"),
        ("MIME-Version", "1.0"),
        ("Content-Type", f'multipart/signed; micalg="pgp-sha256"; '
                         f'protocol="application/pgp-signature"; boundary="{outer}"'),
    ])
    return b"".join([
        head, CRLF,
        b"This is an OpenPGP/MIME signed message (RFC 4880 and 3156)", CRLF,
        f"--{outer}".encode(), CRLF,
        signed_part, CRLF,
        f"--{outer}".encode(), CRLF,
        _headers([("Content-Type", 'application/pgp-signature; name="signature.asc"'),
                  ("Content-Description", "OpenPGP digital signature")]), CRLF,
        _crlf(signature.decode("ascii")),
        f"--{outer}--".encode(), CRLF,
    ])


def _clean_text(text: str, limit: int) -> str:
    """Drop control characters (keep newlines and tabs) from text that may quote input."""
    return "".join(ch for ch in text[:limit] if ch in "\n\t" or ord(ch) >= 0x20)


# RFC 5322 §2.1.1: lines SHOULD stay within 78 characters; longer text lines are sent
# quoted-printable, as the stdlib's text content manager does.
MAX_LINE = 78


def _fold(name: str, value: str) -> str:
    """A header line folded at spaces to stay within MAX_LINE where the words allow."""
    lines = [f"{name}:"]
    for word in value.split(" "):
        if len(lines[-1]) + 1 + len(word) > MAX_LINE and lines[-1] != f"{name}:":
            lines.append("")
        lines[-1] += " " + word
    return "\r\n".join(lines)


def _subject(text: str, utf8: bool) -> str:
    """The Subject line. Non-ASCII text, and text that would read as an encoded word, is
    sent as RFC 2047 encoded words, unless the mail goes out with SMTPUTF8."""
    if (text.isascii() or utf8) and "=?" not in text:
        return _fold("Subject", text)
    encoded = email.header.Header(text, "utf-8", header_name="Subject").encode(linesep="\r\n")
    return f"Subject: {encoded}"


def _text_body(text: str) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, body with CRLF line ends) for a text/plain UTF-8 body."""
    lines = text.encode("utf-8").splitlines()
    if max((len(line) for line in lines), default=0) <= MAX_LINE:
        body = b"".join(line + CRLF for line in lines) or CRLF
        return ("7bit" if body.isascii() else "8bit"), body
    encoded = binascii.b2a_qp(b"\n".join(lines) + b"\n", istext=True)
    return "quoted-printable", encoded.replace(b"\n", CRLF)


def build_notice(*, submission_address: Address, address: Address, subject: str, text: str,
                 now: int, in_reply_to: str | None = None) -> bytes:
    """A plain text mail from the submission address to `address`. `text` may quote
    refusal reasons: control characters are dropped, the size is capped."""
    one_line = " ".join(_clean_text(subject, 200).split()) or "Web Key Service"
    # Only UTF-8 addresses need SMTPUTF8; everything else stays plain RFC 5322 + 2047.
    utf8 = not (str(submission_address).isascii() and str(address).isascii())
    pairs = [("From", str(submission_address)), ("To", str(address))]
    after = [
        ("Date", format_datetime(datetime.fromtimestamp(now, UTC))),
        ("Message-ID", _message_id(submission_address.domain)),
        ("Auto-Submitted", "auto-replied"),
    ]
    if in_reply_to and re.fullmatch(r"<[\x21-\x3d\x3f-\x7e]{1,250}>", in_reply_to.strip()):
        after.append(("In-Reply-To", in_reply_to.strip()))
    with _mail_errors("notice"):
        encoding, body = _text_body(_clean_text(text, 16 * 1024))
        subject_line = _subject(one_line, utf8).encode("utf-8") + CRLF
    return b"".join([
        _headers(pairs), subject_line, _headers(after),
        _headers([("MIME-Version", "1.0"),
                  ("Content-Type", 'text/plain; charset="utf-8"'),
                  ("Content-Transfer-Encoding", encoding)]),
        CRLF, body,
    ])


def build_published_notice(*, submission_address: Address, address: Address,
                           fingerprint: Fingerprint, now: int,
                           in_reply_to: str | None = None) -> bytes:
    text = (f"Your OpenPGP key {fingerprint.hex}\nis now published for {address}.\n\n"
            "Others can find it through the Web Key Directory of your provider, e.g.\n"
            f"  gpg --locate-keys {address}\n")
    return build_notice(submission_address=submission_address, address=address,
                        subject="Your key has been published", text=text, now=now,
                        in_reply_to=in_reply_to)


def build_refusal_notice(*, submission_address: Address, address: Address, reason: str,
                         now: int, in_reply_to: str | None = None) -> bytes:
    text = ("Your request to publish an OpenPGP key was refused:\n\n"
            f"  {reason}\n\nNothing has been published or changed.\n")
    return build_notice(submission_address=submission_address, address=address,
                        subject="Your key publication request was refused", text=text,
                        now=now, in_reply_to=in_reply_to)
