"""Autocrypt Level 1 headers (https://autocrypt.org/level1.html §2.1): build, fold, parse,
and three tests on outgoing mail (its one From address, whether it is a report, whether the
sender's client does OpenPGP itself). The policy that decides whether a mail gets a header
is the milter's, not this module's.

Pure functions. `build` returns the header value folded to at most 78 columns (with the
header name) because Postfix's smtp client breaks lines over 998 characters, which would
break DKIM; keydata is never split anywhere but at folding white space, which parsers drop.
`parse` follows the spec's validity rules: addr and keydata required, unknown attributes
that do not start with "_" make the header invalid, keydata is base64 without the folding.
Errors: `parse` returns None for an invalid header; `build` raises `Refused` when the
header would exceed the 10 KiB that receivers accept.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import getaddresses

from milter_wkd.errors import Refused
from milter_wkd.values import Address

HEADER = "Autocrypt"
MAX_HEADER_BYTES = 10 * 1024
MAX_COLUMNS = 78
# How much of a text/plain body `client_does_openpgp` reads for inline PGP armor. Clients
# that encrypt or sign inline put the armor first (gpg --clearsign, Enigmail, Mailvelope),
# at most after a line or two; armor further down is quoted or pasted text, not what the
# client did. 8 KiB holds any such preface and costs nothing next to DKIM's body hash.
BODY_LOOK_BYTES = 8 * 1024


@dataclass(frozen=True, slots=True)
class AutocryptHeader:
    addr: str
    keydata: bytes
    prefer_encrypt_mutual: bool = False


def build(address: Address, keydata: bytes, *, prefer_encrypt_mutual: bool = False) -> str:
    """The folded header value (without "Autocrypt: "), lines joined by "\\r\\n "."""
    head = f"addr={address};"
    if prefer_encrypt_mutual:
        head += " prefer-encrypt=mutual;"
    head += " keydata="
    encoded = base64.b64encode(keydata).decode("ascii")
    # Continuation lines start with one space; each holds up to 77 more characters.
    chunk = MAX_COLUMNS - 1
    lines = [head] + [encoded[i : i + chunk] for i in range(0, len(encoded), chunk)]
    first_line = f"{HEADER}: {head}"
    if len(first_line) > MAX_COLUMNS:
        raise Refused("address too long for an Autocrypt header")
    value = "\r\n ".join(lines)
    if len(HEADER) + 2 + len(value) > MAX_HEADER_BYTES:
        raise Refused("Autocrypt header would be over 10 KiB")
    return value


def unfold(value: str) -> str:
    return "".join(part.strip("\r") for part in value.split("\n"))


def parse(value: str) -> AutocryptHeader | None:
    """Parse one Autocrypt header value; None when the spec says to ignore it."""
    if len(value) > MAX_HEADER_BYTES:
        return None
    attributes: dict[str, str] = {}
    for raw_item in unfold(value).split(";"):
        item = raw_item.strip()
        if not item:
            continue
        name, eq, content = item.partition("=")
        name = name.strip().lower()
        if not eq or name in attributes:
            return None
        attributes[name] = content.strip()
    for name in attributes:
        if name not in ("addr", "keydata", "prefer-encrypt") and not name.startswith("_"):
            return None
    if "addr" not in attributes or "keydata" not in attributes:
        return None
    try:
        keydata = base64.b64decode("".join(attributes["keydata"].split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    if not keydata:
        return None
    return AutocryptHeader(attributes["addr"], keydata,
                           attributes.get("prefer-encrypt") == "mutual")


# The From values nearly all mail has, "addr", "<addr>" or "Plain Name <addr>" with a
# dot-atom ASCII address, read without the email package's parser (8 us, the largest part
# of the milter's decision on outgoing mail); the result is the same (tests/unit/
# test_autocrypt.py compares both), anything else goes to the parser.
_DOT_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_SIMPLE_ADDRESS = rf"{_DOT_ATOM}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_SIMPLE_FROM = re.compile(rf"[ \t]*(?:({_SIMPLE_ADDRESS})|[\w \t-]*<({_SIMPLE_ADDRESS})>)[ \t]*")


def single_from_address(from_values: list[str]) -> Address | None:
    """The one address of the From header(s), or None when there is not exactly one."""
    if len(from_values) != 1:
        return None
    simple = _SIMPLE_FROM.fullmatch(from_values[0])
    if simple is not None:
        address = simple.group(1) or simple.group(2)
    else:
        addresses = [addr for _, addr in getaddresses(from_values) if addr]
        if len(addresses) != 1:
            return None
        address = addresses[0]
    try:
        return Address.parse(address)
    except Refused:
        return None


def is_multipart_report(content_type: str | None) -> bool:
    return content_type is not None and content_type.strip().lower().startswith(
        "multipart/report")


_ARMOR = re.compile(rb"^-----BEGIN PGP (SIGNED )?MESSAGE-----", re.MULTILINE)
_COMMENT = re.compile(r"\([^()]*\)")


def client_does_openpgp(headers: Iterable[tuple[str, str]], body_start: bytes | None,
                        ) -> str | None:
    """Why the sender's client speaks OpenPGP itself (so an Autocrypt header of ours could
    contradict the key it uses), or None. `headers`: the top-level header fields as sent;
    `body_start`: the first BODY_LOOK_BYTES of the body, or None when it was not collected
    (then the headers decide alone). A header field repeated counts if any instance says
    so: receivers differ in which one they read, and staying out is the safe side."""
    content_types: list[str] = []
    transfer_encodings: list[str] = []
    for raw_name, value in headers:
        name = raw_name.strip().lower()
        if name == "autocrypt":
            return "the mail has an Autocrypt header of its own"
        if name == "chat-version":
            return "Chat-Version header (a chat-over-email client, e.g. Delta Chat)"
        if name == "content-type":
            content_types.append(_mime_type(value))
        elif name == "content-transfer-encoding":
            transfer_encodings.append(_mime_type(value))
    for mime_type in content_types:
        if mime_type in ("multipart/encrypted", "multipart/signed"):
            return f"the client sent {mime_type} (PGP/MIME)"
    plain = not content_types or "text/plain" in content_types
    if body_start is None or not plain:
        return None
    text = body_start[:BODY_LOOK_BYTES]
    if "base64" in transfer_encodings:
        text = _decode_base64_start(text)
    armor = _ARMOR.search(text)
    if armor is None:
        return None
    return "inline PGP signed message" if armor.group(1) else "inline PGP message"


def _mime_type(value: str) -> str:
    """"type/subtype" of a Content-Type value (or a Content-Transfer-Encoding's token),
    lowered, without parameters, comments, folding or white space."""
    for _ in range(4):  # nested comments, innermost first; deeper nesting is not real mail
        value = _COMMENT.sub("", value)
    return "".join(value.split(";", 1)[0].split()).lower()


def _decode_base64_start(data: bytes) -> bytes:
    encoded = b"".join(data.split())
    encoded = encoded[: len(encoded) - len(encoded) % 4]
    try:
        return binascii.a2b_base64(encoded)
    except binascii.Error:
        return b""
