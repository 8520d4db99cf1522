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
- `build_notice` (`build_published_notice`): a plain text mail from
  the submission address;
- `new_nonce`, `nonces_equal`; `parse_wks_data` for the name-value lines; `decrypter` makes
  the decrypt callback the parsers take from the submission key's secret key.

Reads only the bytes it is given; no sockets, no directory, no clock (`now` is passed in).
Mail is read by `milter_wkd.mime`, under its caps (whole mail, header block, every header
value it reads, number and nesting of parts). Generated mail is bytes with CRLF line ends,
ready for SMTP and DKIM; UTF-8 addresses need SMTPUTF8 from the mailer.

Errors: anything we will not process raises `MessageRefused` (or `BadAddress`, `KeyRefused`:
all `Refused`) with a reason fit for an SMTP reply or a log line; no other exception
escapes for any input bytes (an unexpected error of the decrypt callback becomes a
`MessageRefused` too).
"""

from __future__ import annotations

import binascii
import email.header
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from milter_wkd import mime
from milter_wkd.errors import MessageRefused
from milter_wkd.mime import Entity
from milter_wkd.openpgp import messages
from milter_wkd.values import Address, Fingerprint
from milter_wkd.wkd import zbase32

WKS_DRAFT_VERSION = 3
DEFAULT_MAX_MAIL = 2 * 1024 * 1024
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

def _single_header(entity: Entity, name: str) -> str | None:
    values = entity.headers(name)
    if len(values) > 1:
        raise MessageRefused(f"more than one {name} header")
    return values[0] if values else None


def _from_address(entity: Entity) -> Address:
    value = _single_header(entity, "From")
    if value is None:
        raise MessageRefused("no From header")
    specs = mime.address_list(value, "From")
    if len(specs) != 1:
        raise MessageRefused("From must hold exactly one address")
    return Address.parse(specs[0])


def _draft_version(entity: Entity) -> int | None:
    value = _single_header(entity, "Wks-Draft-Version")
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit() or len(value) > 3:
        raise MessageRefused("Wks-Draft-Version is not a number")
    return int(value)


def _pgp_mime_ciphertext(entity: Entity) -> bytes:
    """The encrypted body of an RFC 3156 §4 multipart/encrypted entity."""
    protocol = (entity.param("protocol") or "").strip().lower()
    if protocol != "application/pgp-encrypted":
        raise MessageRefused("multipart/encrypted without protocol=application/pgp-encrypted")
    parts = entity.parts()
    if len(parts) != 2:
        raise MessageRefused("multipart/encrypted must have exactly two parts")
    control, body = parts
    if control.content_type != "application/pgp-encrypted":
        raise MessageRefused("first part of multipart/encrypted is not application/pgp-encrypted")
    lines = [line.strip() for line in control.payload().splitlines() if line.strip()]
    if lines != [b"Version: 1"]:
        raise MessageRefused("the application/pgp-encrypted part must say 'Version: 1'")
    if body.content_type != "application/octet-stream":
        raise MessageRefused("second part of multipart/encrypted is not application/octet-stream")
    return body.payload()


def _find_part(entity: Entity, wanted: str) -> Entity:
    """The entity itself when it has the wanted type, or the one such child of a
    multipart/mixed (some clients wrap the key in one, gpg's posteo form does)."""
    if entity.content_type == wanted:
        return entity
    if entity.content_type == "multipart/mixed":
        children = entity.parts()
        found = [c for c in children if c.content_type == wanted]
        others = [c for c in children if c.content_type != wanted and c.maintype != "text"]
        if len(found) == 1 and not others:
            return found[0]
        if len(found) > 1:
            raise MessageRefused(f"more than one {wanted} part")
    raise MessageRefused(f"expected an {wanted} part, found {entity.content_type}")


def _plaintext_body(plaintext: bytes, wanted: str, max_size: int) -> bytes:
    """The body of the wanted type from a decrypted MIME entity. A plaintext without any
    MIME header is taken as that body itself (bare armored keys, bare WKS data)."""
    entity = mime.parse(plaintext, "decrypted message", max_size)
    if not entity.has("Content-Type"):
        return plaintext
    return _find_part(entity, wanted).payload()


def _unwrap(raw: bytes, wanted: str, decrypt: Decrypt, max_mail: int,
            ) -> tuple[Entity, bytes, bool]:
    """(the mail, the body of the wanted type, was it encrypted?)"""
    mail = mime.parse(raw, "mail", max_mail)
    if mail.content_type == "multipart/encrypted":
        ciphertext = _pgp_mime_ciphertext(mail)
        return mail, _plaintext_body(decrypt(ciphertext), wanted, max_mail), True
    return mail, _find_part(mail, wanted).payload(), False


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
    # The decrypt callback may fail in ways of its own: those are refusals too.
    with mime.refusing("mail"):
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
    with mime.refusing("mail"):
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


def _kind_of(entity: Entity) -> tuple[str, Entity]:
    """(TYPE_PGP_KEYS or TYPE_WKS, the part) as `_find_part` finds either."""
    if entity.content_type in (TYPE_PGP_KEYS, TYPE_WKS):
        return entity.content_type, entity
    if entity.content_type == "multipart/mixed":
        found = [c for c in entity.parts() if c.content_type in (TYPE_PGP_KEYS, TYPE_WKS)]
        if len(found) == 1:
            return found[0].content_type, _find_part(entity, found[0].content_type)
        if len(found) > 1:
            raise MessageRefused(f"more than one {TYPE_PGP_KEYS} or {TYPE_WKS} part")
    raise MessageRefused(f"expected an {TYPE_PGP_KEYS} or {TYPE_WKS} part, found "
                         f"{entity.content_type}")


def _bare_kind(plaintext: bytes) -> str:
    """A decrypted plaintext without MIME header: WKS data when it says so, else a key."""
    head = plaintext.lstrip()[:200].lower()
    return TYPE_WKS if head.startswith(b"type:") or b"\ntype:" in head else TYPE_PGP_KEYS


def parse_message(raw: bytes, decrypt: Decrypt, *, max_mail: int = DEFAULT_MAX_MAIL,
                  ) -> Submission | ConfirmationResponse:
    """A mail to the submission address: a key publishing request or a confirmation
    response, told apart by the type of the (decrypted) part, so that a refusal names
    what is wrong with the message it is (decrypted once, not once per guess)."""
    with mime.refusing("mail"):
        mail = mime.parse(raw, "mail", max_mail)
        encrypted = mail.content_type == "multipart/encrypted"
        if encrypted:
            plaintext = decrypt(_pgp_mime_ciphertext(mail))
            entity = mime.parse(plaintext, "decrypted message", max_mail)
            if not entity.has("Content-Type"):
                kind, body = _bare_kind(plaintext), plaintext
            else:
                kind, part = _kind_of(entity)
                body = part.payload()
        else:
            kind, part = _kind_of(mail)
            body = part.payload()
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


_CONTROL = re.compile(r"[\x00-\x1f]")
# Control characters but the line break and the tab.
_CONTROL_IN_TEXT = re.compile(r"[\x00-\x08\x0b-\x1f]")


def _headers(pairs: list[tuple[str, str]]) -> bytes:
    for name, value in pairs:
        if _CONTROL.search(value):
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
    return _CONTROL_IN_TEXT.sub("", text[:limit])


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
    with mime.refusing("notice"):
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
