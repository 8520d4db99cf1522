"""Web Key Directory names (draft-koch-openpgp-webkey-service §3.1): the z-base-32 hash of
a local part and the URLs clients build from it.

Pure functions; no I/O. The hash is SHA-1 over the local part with ASCII upper case
lowered (other characters untouched), encoded in z-base-32 (32 characters).
"""

from __future__ import annotations

import hashlib
from urllib.parse import quote

from milter_wkd.values import Address

_ZBASE32 = "ybndrfg8ejkmcpqxot1uwisza345h769"


def zbase32(data: bytes) -> str:
    """z-base-32 encoding (as GnuPG uses it: 5 bits per character, no padding)."""
    value = int.from_bytes(data, "big")
    bits = len(data) * 8
    chars = -(-bits // 5)
    value <<= chars * 5 - bits
    return "".join(_ZBASE32[(value >> (5 * (chars - 1 - i))) & 0x1F] for i in range(chars))


def local_part_hash(local: str) -> str:
    """The WKD hash of a local part."""
    lowered = "".join(c.lower() if "A" <= c <= "Z" else c for c in local)
    return zbase32(hashlib.sha1(lowered.encode("utf-8")).digest())  # noqa: S324 (the spec)


def address_hash(address: Address) -> str:
    return local_part_hash(address.local)


def advanced_url(address: Address) -> str:
    return (f"https://openpgpkey.{address.domain}/.well-known/openpgpkey/{address.domain}"
            f"/hu/{address_hash(address)}?l={quote(address.local, safe='')}")


def direct_url(address: Address) -> str:
    return (f"https://{address.domain}/.well-known/openpgpkey/hu/{address_hash(address)}"
            f"?l={quote(address.local, safe='')}")
