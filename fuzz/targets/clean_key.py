"""The key cleaner (milter_wkd.openpgp: clean_key, merge_keys, autocrypt_of) on any key
bytes, binary or armored, for several address sets and policies.

Properties: a cleaned key consists of packets of the input, verbatim; cleaning it again
gives it back unchanged; it has a user ID.

Input: a flags octet (address set, policy, merge with a stored key, Autocrypt keydata),
then the key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fuzz.targets import fixtures
from milter_wkd import openpgp
from milter_wkd.errors import Refused
from milter_wkd.openpgp import packets as pk
from milter_wkd.openpgp.cleaning import Limits, Policy
from milter_wkd.values import Address

ALLOWED = (Refused,)
NOW = 1_800_000_000
_ALL = [Address.parse(a) for a in (
    "alice@example.org", "alice@other.example", "vector@example.org",
    "vector@other.example", "rsa@example.org", fixtures.USER_ADDRESS,
    fixtures.SERVICE_ADDRESS)]
ADDRESS_SETS: tuple[list[Address] | None, ...] = (None, _ALL, _ALL[:1], _ALL[5:6])
LIMITS = (openpgp.DEFAULT_LIMITS,
          Limits(max_input=64 * 1024, policy=Policy(
              min_rsa_bits=1024, sha1_before_2023=True, mailbox_only=True,
              curves=frozenset({"ed25519", "cv25519", "brainpoolP256r1"}))))
STORED = fixtures.user_public()


def _packets(data: bytes) -> list[bytes]:
    return [data[r.start : r.end] for r in pk.iter_packets(data)]


def one_input(data: bytes) -> None:
    if not data:
        return
    flags, key = data[0], data[1:]
    addresses = ADDRESS_SETS[flags & 3]
    limits = LIMITS[flags >> 2 & 1]
    if flags & 8:
        result = openpgp.merge_keys(STORED, key, addresses, limits=limits, now=NOW)
    else:
        result = openpgp.clean_key(key, addresses, limits=limits, now=NOW)
        binary = pk.dearmor(key)[1] if pk.looks_armored(key) else key
        source = set(_packets(binary))
        assert all(p in source for p in _packets(result.key))
    assert result.info.user_ids
    again = openpgp.clean_key(result.key, addresses, limits=limits, now=NOW)
    assert again.key == result.key
    if flags & 16:
        for address in result.info.addresses:
            with contextlib.suppress(Refused):
                openpgp.autocrypt_of(result, address, now=NOW)


def seeds() -> Iterator[tuple[str, bytes]]:
    keys = {**fixtures.key_vectors(), "service-public": fixtures.service_public(),
            "user-public": fixtures.user_public()}
    for name, key in keys.items():
        yield name, b"\x11" + key
    yield "rich-mailbox-only", b"\x05" + keys["crafted-rich.pgp"]
    yield "merge-user", b"\x0b" + keys["user-public"]
    yield "merge-other", b"\x19" + keys["vector-ed25519.pgp"]
    yield "two-keys", b"\x00" + keys["vector-ed25519.pgp"] + keys["vector-rsa2048.pgp"]
