"""ASCII armor (openpgp.packets.dearmor, looks_armored) and its round trip: what `armor`
writes, `dearmor` reads back unchanged, whatever the label and the binary."""

from __future__ import annotations

from collections.abc import Iterator

from fuzz.targets import fixtures
from milter_wkd.errors import Refused
from milter_wkd.openpgp import packets as pk

ALLOWED = (Refused,)
LABELS = (pk.ARMOR_PUBLIC_KEY, pk.ARMOR_MESSAGE, pk.ARMOR_SIGNATURE, pk.ARMOR_PRIVATE_KEY)


def one_input(data: bytes) -> None:
    pk.looks_armored(data)
    label = LABELS[len(data) % len(LABELS)]
    assert pk.dearmor(pk.armor(label, data)) == (label, data)
    found, binary = pk.dearmor(data)
    assert isinstance(found, str)
    assert pk.dearmor(pk.armor(pk.ARMOR_PUBLIC_KEY, binary)) == (pk.ARMOR_PUBLIC_KEY, binary)


def seeds() -> Iterator[tuple[str, bytes]]:
    vectors = fixtures.key_vectors()
    yield "vector-ed25519.asc", vectors["vector-ed25519.asc"]
    armored = pk.armor(pk.ARMOR_PUBLIC_KEY, vectors["vector-rsa2048.pgp"])
    yield "rsa2048-armored", armored
    yield "crlf-with-headers", armored.replace(
        b"\n\n", b"\nComment: fuzz\nVersion: 1\n\n", 1).replace(b"\n", b"\r\n")
    lines = armored.splitlines(keepends=True)
    yield "no-checksum", b"".join(line for line in lines if not line.startswith(b"="))
    yield "in-a-mail", b"Hello,\n\nmy key:\n\n" + armored + b"\nBye\n"
    yield "message", pk.armor(pk.ARMOR_MESSAGE, b"\xc1\x0e" + bytes(14))
