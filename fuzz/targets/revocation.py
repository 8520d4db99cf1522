"""A revocation certificate uploaded alone (milter_wkd.openpgp: is_revocation_certificate,
merge_revocation), as the self-service page's /revoke takes it: any bytes, binary or armored,
against a stored key.

Properties: `is_revocation_certificate` never raises; a merge either refuses (Refused) or
returns the stored key's primary key with at least one key revocation more, made of packets
of the stored key and the certificate, verbatim; cleaning the result again gives it back.

Input: a flags octet (which stored key, which address set), then the certificate.
"""

from __future__ import annotations

from collections.abc import Iterator

from fuzz.targets import fixtures
from milter_wkd import openpgp
from milter_wkd.errors import Refused
from milter_wkd.openpgp import packets as pk
from milter_wkd.values import Address

ALLOWED = (Refused,)
NOW = 1_800_000_000
STORED = (fixtures.TEST_DATA / "revoke-gpg.pgp").read_bytes(), pk.dearmor(
    (fixtures.TEST_DATA / "revoke-openpgpjs.asc").read_bytes())[1]
ADDRESS_SETS: tuple[list[Address] | None, ...] = (
    None, [Address.parse("revoke@example.org")], [Address.parse("nobody@example.org")], None)
KEY_REVOCATION = 0x20


def _packets(data: bytes) -> set[bytes]:
    return {data[r.start : r.end] for r in pk.iter_packets(data)}


def _key_revocations(key: bytes) -> int:
    """Signature packets of type 0x20 (version 4: the type is the body's second octet)."""
    return sum(1 for r in pk.iter_packets(key)
               if r.tag == pk.TAG_SIGNATURE and key[r.body_start + 1] == KEY_REVOCATION)


def one_input(data: bytes) -> None:
    if not data:
        return
    flags, certificate = data[0], data[1:]
    openpgp.is_revocation_certificate(certificate)
    stored = STORED[flags & 1]
    addresses = ADDRESS_SETS[flags >> 1 & 3]
    result = openpgp.merge_revocation(stored, certificate, addresses, now=NOW)
    binary = pk.dearmor(certificate)[1] if pk.looks_armored(certificate) else certificate
    assert _packets(result.key) <= _packets(stored) | _packets(binary)
    assert result.info.fingerprint == openpgp.clean_key(stored, None, now=NOW).info.fingerprint
    assert _key_revocations(result.key) > _key_revocations(stored)
    again = openpgp.clean_key(result.key, addresses, now=NOW)
    assert again.key == result.key


def seeds() -> Iterator[tuple[str, bytes]]:
    for name in ("revoke-gpg.rev", "revoke-gpg-auto.rev"):
        yield name, b"\x00" + (fixtures.TEST_DATA / name).read_bytes()
        yield f"{name}-address", b"\x02" + (fixtures.TEST_DATA / name).read_bytes()
    openpgpjs = (fixtures.TEST_DATA / "revoke-openpgpjs.rev").read_bytes()
    yield "revoke-openpgpjs.rev", b"\x01" + openpgpjs
    yield "other-key", b"\x00" + openpgpjs
    yield "a-key", b"\x00" + (fixtures.TEST_DATA / "vector-ed25519.pgp").read_bytes()
