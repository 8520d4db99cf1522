"""Small value types normalised once, at the edge: `Address` and `Fingerprint`.

`Address` is an RFC 5322 addr-spec without comments, display names or routes. The domain is
lowercased (ASCII; IDNA U-labels are kept as given, lowercased). The local part keeps its
spelling for display and WKD's `?l=`; comparisons and directory look-ups use `key`, which
lowercases ASCII letters in both parts, as gpg does when it matches mailboxes.
Hostile input (control characters, LDAP or path metacharacters where they cannot occur in a
mailbox, oversize parts) raises `BadAddress`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from milter_wkd.errors import BadAddress, Refused

# RFC 5321 limits: 64 octets of local part, 255 of domain.
_MAX_LOCAL = 64
_MAX_DOMAIN = 255
_LABEL = re.compile(r"^(?!-)[a-z0-9\u0080-\U0010ffff-]{1,63}(?<!-)$")
# Dot-atom text of RFC 5322 plus UTF-8 (RFC 6532). Quoted local parts are refused: no mail
# client publishes keys for them and they are the classic vehicle for injection.
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+"
                    r"(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+)*$")


def _ascii_lower(text: str) -> str:
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox: local part and domain, validated."""

    local: str
    domain: str

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse a bare addr-spec (optionally in angle brackets)."""
        if cls is Address and len(text) <= _CACHED_LENGTH:
            # The same few addresses are parsed many times per message (mail, directory
            # values, key user IDs): remember the answers (values are immutable).
            return _parse_cached(text)
        return cls._parse(text)

    @classmethod
    def _parse(cls, text: str) -> Address:
        text = text.strip()
        if text.startswith("<") and text.endswith(">"):
            text = text[1:-1]
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
            raise BadAddress("address contains control characters")
        # Octets that are not UTF-8 arrive as lone surrogates (pymilter and the email
        # package decode headers with surrogateescape); they are no characters of a mailbox.
        if not text.isascii() and any("\ud800" <= ch <= "\udfff" for ch in text):
            raise BadAddress("address is not valid UTF-8")
        local, at, domain = text.rpartition("@")
        if not at or not local or not domain:
            raise BadAddress(f"not a mail address: {text[:80]!r}")
        if len(local.encode()) > _MAX_LOCAL:
            raise BadAddress("local part longer than 64 octets")
        if not _LOCAL.match(local):
            raise BadAddress(f"unsupported local part: {local[:64]!r}")
        domain = _ascii_lower(domain.rstrip("."))
        if len(domain.encode()) > _MAX_DOMAIN or "." not in domain:
            raise BadAddress(f"not a mail domain: {domain[:80]!r}")
        if not all(_LABEL.match(label) for label in domain.split(".")):
            raise BadAddress(f"not a mail domain: {domain[:80]!r}")
        return cls(local, domain)

    @property
    def key(self) -> str:
        """The comparison form: ASCII letters lowercased in both parts."""
        return f"{_ascii_lower(self.local)}@{self.domain}"

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


# The longest valid address (64 + 1 + 255 octets) with brackets and some space: longer
# text is refused anyway and is not worth remembering.
_CACHED_LENGTH = 330


@functools.lru_cache(maxsize=4096)
def _parse_cached(text: str) -> Address:
    return Address._parse(text)


# `Name <addr>`: the only `<` and `>` of the user ID, the `>` last, no `@` in the name.
_UID_NAME_ADDR = re.compile(r"^[^<>@]*<([^<>]*)>$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def user_id_address(user_id: str) -> Address:
    """The one address that every OpenPGP implementation reads from a user ID.

    Accepted: a bare addr-spec, or `Name <addr-spec>` with no other `<`, `>` or `@`.
    Implementations disagree on anything else: GnuPG takes the FIRST `<...>` and, for a
    user ID without `<`, the whole text only if it is a plain mailbox (common/mbox-util.c
    mailbox_from_userid); C code stops at a NUL; Sequoia parses RFC 2822 name-addr and reads
    no address from `A <a@x> <b@y>`. Raises `BadAddress` saying why.
    """
    if _CONTROL.search(user_id):
        raise BadAddress("it contains control characters (GnuPG stops reading at a NUL)")
    if user_id.count("@") > 1:
        raise BadAddress("it names more than one address (OpenPGP programs read different "
                         "ones)")
    if "<" in user_id or ">" in user_id:
        match = _UID_NAME_ADDR.match(user_id)
        if match is None:
            raise BadAddress("it is not of the form 'Name <address>' (one '<', one '>' at "
                             "the end)")
        candidate = match.group(1)
    else:
        candidate = user_id
    if "@" not in candidate:
        raise BadAddress("it has no mail address")
    if candidate != "".join(candidate.split()) or candidate.endswith(".") or len(
            candidate) > 320:
        raise BadAddress("its address has spaces, a trailing dot or is too long")
    return Address.parse(candidate)


def address_of_user_id(user_id: str) -> Address | None:
    """The address of an OpenPGP user ID (see `user_id_address`), or None."""
    try:
        return user_id_address(user_id)
    except BadAddress:
        return None


_HEX = re.compile(r"^[0-9A-F]+$")


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """A key fingerprint: 20 octets (v4) or 32 octets (v6), shown as upper-case hex."""

    hex: str

    @classmethod
    def parse(cls, text: str) -> Fingerprint:
        cleaned = text.replace(" ", "").removeprefix("0x").upper()
        if len(cleaned) not in (40, 64) or not _HEX.match(cleaned):
            raise Refused(f"not a fingerprint: {text[:80]!r}")
        return cls(cleaned)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Fingerprint:
        if len(raw) not in (20, 32):
            raise ValueError("fingerprints are 20 or 32 octets")
        return cls(raw.hex().upper())

    @property
    def key_id(self) -> str:
        """The long key ID: the last 8 octets for v4, the first 8 for v6."""
        return self.hex[-16:] if len(self.hex) == 40 else self.hex[:16]

    @property
    def short_key_id(self) -> str:
        return self.key_id[-8:]

    def __str__(self) -> str:
        return self.hex
