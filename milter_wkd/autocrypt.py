"""Autocrypt Level 1 headers (https://autocrypt.org/level1.html §2.1): build, fold, parse,
and two tests on outgoing mail (its one From address, whether it is a report). The policy
that decides whether a mail gets a header is the milter's, not this module's.

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
from dataclasses import dataclass
from email.utils import getaddresses

from milter_wkd.errors import Refused
from milter_wkd.values import Address

HEADER = "Autocrypt"
MAX_HEADER_BYTES = 10 * 1024
MAX_COLUMNS = 78


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


def single_from_address(from_values: list[str]) -> Address | None:
    """The one address of the From header(s), or None when there is not exactly one."""
    if len(from_values) != 1:
        return None
    pairs = getaddresses(from_values)
    addresses = [addr for _, addr in pairs if addr]
    if len(addresses) != 1:
        return None
    try:
        return Address.parse(addresses[0])
    except Refused:
        return None


def is_multipart_report(content_type: str | None) -> bool:
    return content_type is not None and content_type.strip().lower().startswith(
        "multipart/report")
