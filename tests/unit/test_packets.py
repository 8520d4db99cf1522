"""Packet framing and ASCII armor: known answers, every length form, truncations."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from milter_wkd.errors import KeyRefused
from milter_wkd.openpgp import packets as pk

DATA = Path(__file__).parent.parent / "data"
VECTOR = (DATA / "vector-ed25519.pgp").read_bytes()
VECTOR_ASC = (DATA / "vector-ed25519.asc").read_bytes()


def frames(data: bytes) -> list[tuple[int, int, int, int]]:
    return [tuple(ref) for ref in pk.iter_packets(data)]  # type: ignore[misc]


# --- headers and lengths ---------------------------------------------------------------------

@pytest.mark.parametrize(("data", "expected"), [
    # old format: tag in bits 5-2, length type in bits 1-0
    (b"\x88\x03abc", [(2, 0, 2, 5)]),                              # 1-octet length
    (b"\x89\x00\x03abc", [(2, 0, 3, 6)]),                          # 2-octet length
    (b"\x8a\x00\x00\x00\x03abc", [(2, 0, 5, 8)]),                  # 4-octet length
    (b"\xb4\x00", [(13, 0, 2, 2)]),                                # empty body
    # new format: tag in bits 5-0
    (b"\xc2\x03abc", [(2, 0, 2, 5)]),                              # one-octet length
    (b"\xc2\xc0\x00" + b"x" * 192, [(2, 0, 3, 195)]),              # two-octet: 192
    (b"\xc2\xdf\xff" + b"x" * 8383, [(2, 0, 3, 8386)]),            # two-octet: 8383
    (b"\xc2\xff\x00\x00\x01\x00" + b"x" * 256, [(2, 0, 6, 262)]),  # five-octet
    (b"\xcd\x01a\xc2\x00", [(13, 0, 2, 3), (2, 3, 5, 5)]),         # two packets
    # partial lengths (data packets only): 2 octets, then 1 octet, then final 3
    (b"\xcb\xe1ab\xe0c\x03def", [(11, 0, 2, 10)]),
    # indeterminate old-format length: data packets run to the end of the input
    (b"\xa3\x01xyz", [(8, 0, 1, 5)]),
])
def test_header_forms(data: bytes, expected: list[tuple[int, int, int, int]]) -> None:
    assert frames(data) == expected


def test_partial_body_is_reassembled() -> None:
    data = b"\xcb\xe1ab\xe0c\x03def"
    (ref,) = pk.iter_packets(data)
    assert pk.packet_body(data, ref) == b"abcdef"


@pytest.mark.parametrize("length", [0, 1, 191, 192, 193, 8383, 8384, 65536, 1 << 20])
def test_new_header_round_trip(length: int) -> None:
    data = pk.new_header(2, length) + b"\x00" * length
    (ref,) = pk.iter_packets(data)
    assert (ref.tag, ref.end, ref.end - ref.body_start) == (2, len(data), length)


@pytest.mark.parametrize(("data", "reason"), [
    (b"\x00\x01", "bad header octet"),
    (b"\x7f", "bad header octet"),
    (b"\x80\x00", "reserved packet type 0"),
    (b"\xc0\x00", "reserved packet type 0"),
    (b"\x8b\x00", "indeterminate packet length in packet type 2"),
    (b"\xc2\xe1ab\x01c", "partial body length in packet type 2"),
    (b"\x88", "truncated packet header"),
    (b"\x89\x00", "truncated packet header"),
    (b"\x8a\x00\x00\x00", "truncated packet header"),
    (b"\xc2", "truncated packet header"),
    (b"\xc2\xc0", "truncated packet header"),
    (b"\xc2\xff\x00\x00\x01", "truncated packet header"),
    (b"\x88\x05abc", "truncated packet at offset 0: type 2 claims 5 octets, 3 remain"),
    (b"\xc2\xff\x00\x00\x01\x00abc", "truncated packet"),
    (b"\xcb\xe1ab", "truncated packet"),          # partial chunk without a final one
    (b"\xcb\xe1ab\x05c", "truncated packet"),     # final chunk cut short
    (b"\xcb\xe2ab", "truncated packet"),          # first chunk cut short
])
def test_framing_errors(data: bytes, reason: str) -> None:
    with pytest.raises(KeyRefused, match=reason):
        list(pk.iter_packets(data))


def test_every_truncation_of_a_real_key_is_refused_or_ends_on_a_boundary() -> None:
    boundaries = {ref.end for ref in pk.iter_packets(VECTOR)}
    assert len(boundaries) == 9
    for cut in range(1, len(VECTOR)):
        if cut in boundaries:
            assert frames(VECTOR[:cut])[-1][3] == cut
        else:
            with pytest.raises(KeyRefused):
                list(pk.iter_packets(VECTOR[:cut]))


def test_start_and_end_bound_the_walk() -> None:
    data = b"junk" + b"\xcd\x01a\xc2\x00" + b"junk"
    assert frames_between(data, 4, 9) == [(13, 4, 6, 7), (2, 7, 9, 9)]


def frames_between(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    return [tuple(ref) for ref in pk.iter_packets(data, start, end)]  # type: ignore[misc]


# --- CRC-24 and armor ------------------------------------------------------------------------

@pytest.mark.parametrize(("data", "crc"), [
    (b"", 0xB704CE),             # the initial value
    (b"123456789", 0x21CF02),    # the CRC-24/OPENPGP check value
    (b"\x00", 0x6169D3),
])
def test_crc24_known_answers(data: bytes, crc: int) -> None:
    assert pk.crc24(data) == crc


def _crc24_bitwise(data: bytes) -> int:
    """RFC 4880 §6.1's reference code, bit by bit: an oracle for the table version."""
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def test_crc24_matches_the_reference_code() -> None:
    for data in (VECTOR, bytes(range(256)), b"\xff" * 100):
        assert pk.crc24(data) == _crc24_bitwise(data)


@pytest.mark.parametrize("size", [0, 1, 4095, 65537])
def test_crc24_of_larger_inputs_matches_the_reference(size: int) -> None:
    data = hashlib.shake_256(b"crc24").digest(size)
    assert pk.crc24(data) == _crc24_bitwise(data)


def test_crc24_of_gpg_armor() -> None:
    checksum = next(line for line in VECTOR_ASC.splitlines() if line.startswith(b"="))
    assert pk.crc24(VECTOR) == int.from_bytes(base64.b64decode(checksum[1:]), "big")


def test_dearmor_gpg_output() -> None:
    assert pk.looks_armored(VECTOR_ASC)
    assert not pk.looks_armored(VECTOR)
    assert pk.dearmor(VECTOR_ASC) == (pk.ARMOR_PUBLIC_KEY, VECTOR)


def test_armor_round_trip() -> None:
    armored = pk.armor(pk.ARMOR_PUBLIC_KEY, VECTOR)
    lines = armored.splitlines()
    assert lines[0] == b"-----BEGIN PGP PUBLIC KEY BLOCK-----"
    assert lines[-1] == b"-----END PGP PUBLIC KEY BLOCK-----"
    assert max(len(line) for line in lines) <= 64
    assert pk.dearmor(armored) == (pk.ARMOR_PUBLIC_KEY, VECTOR)


@pytest.mark.parametrize("variant", ["crlf", "headers", "no-blank-line", "no-checksum",
                                     "leading-text", "trailing-text"])
def test_dearmor_variants(variant: str) -> None:
    armored = pk.armor(pk.ARMOR_PUBLIC_KEY, VECTOR)
    lines = armored.split(b"\n")
    if variant == "crlf":
        armored = armored.replace(b"\n", b"\r\n")
    elif variant == "headers":
        armored = b"\n".join([lines[0], b"Version: GnuPG v2", b"Comment: x: y", *lines[1:]])
    elif variant == "no-blank-line":
        armored = b"\n".join([lines[0], *lines[2:]])
    elif variant == "no-checksum":
        armored = b"\n".join(line for line in lines if not line.startswith(b"="))
    elif variant == "leading-text":
        armored = b"Here is my key:\n\n" + armored
    else:
        armored += b"\n-- \nsignature of the mail\n"
    assert pk.looks_armored(armored)
    assert pk.dearmor(armored) == (pk.ARMOR_PUBLIC_KEY, VECTOR)


def _corrupt(armored: bytes, old: bytes, new: bytes) -> bytes:
    assert old in armored
    return armored.replace(old, new, 1)


def test_dearmor_refusals() -> None:
    armored = pk.armor(pk.ARMOR_PUBLIC_KEY, VECTOR)
    checksum = next(line for line in armored.splitlines() if line.startswith(b"="))
    flipped = base64.b64encode((pk.crc24(VECTOR) ^ 1).to_bytes(3, "big"))
    cases = {
        "CRC-24": _corrupt(armored, checksum, b"=" + flipped),
        "malformed armor checksum": _corrupt(armored, checksum, b"=A*AA"),
        "bad base64": _corrupt(armored, b"\n\n", b"\n\n*"),
        "bad base64 in armor: characters": _corrupt(armored, b"\n\n", b"\n\nAB=C"),
        "not whole quantums": _corrupt(armored, b"\n\n", b"\n\nA"),
        "footer '-----END PGP PUBLIC KEY BLOCK-----' missing":
            armored.replace(b"-----END", b"-----FIN"),
        "malformed armor header line": armored.replace(b"BLOCK-----\n", b"BLOCK\n", 1),
        "truncated armor header line": b"-----BEGIN PGP PUBLIC KEY BLOCK-----",
        "no armor header line": b"just text",
    }
    for reason, data in cases.items():
        with pytest.raises(KeyRefused, match=reason):
            pk.dearmor(data)


def test_dearmor_detects_a_changed_body() -> None:
    armored = bytearray(pk.armor(pk.ARMOR_PUBLIC_KEY, VECTOR))
    index = armored.index(b"\n\n") + 10
    armored[index] = ord("A") if armored[index] != ord("A") else ord("B")
    with pytest.raises(KeyRefused, match="CRC-24"):
        pk.dearmor(bytes(armored))
