"""OpenPGP packet framing and ASCII armor (RFC 9580 §4.2, §6), without pgpy.

`iter_packets` walks a buffer once and yields `PacketRef` offsets; it copies nothing, so the
memory a caller needs is bounded by what the caller keeps. Old and new packet headers and all
length forms are understood; partial body lengths and indeterminate old-format lengths
("to the end of the input") are refused outside data packets (a key never has them).
`dearmor` decodes one armored block and checks its CRC-24 when present.

Errors: every problem raises `KeyRefused` with the offset and the reason.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from typing import NamedTuple

import anycrc
import pybase64

from milter_wkd.errors import KeyRefused

# Packet tags (RFC 9580 §5).
TAG_PKESK = 1
TAG_SIGNATURE = 2
TAG_SKESK = 3
TAG_ONE_PASS = 4
TAG_SECRET_KEY = 5
TAG_PUBLIC_KEY = 6
TAG_SECRET_SUBKEY = 7
TAG_COMPRESSED = 8
TAG_SED = 9
TAG_MARKER = 10
TAG_LITERAL = 11
TAG_TRUST = 12
TAG_USER_ID = 13
TAG_PUBLIC_SUBKEY = 14
TAG_USER_ATTRIBUTE = 17
TAG_SEIPD = 18
TAG_MDC = 19
TAG_AEAD = 20
TAG_PADDING = 21

# Data packets: the only ones allowed partial body lengths.
_PARTIAL_OK = frozenset({TAG_COMPRESSED, TAG_SED, TAG_LITERAL, TAG_SEIPD, TAG_AEAD})


class PacketRef(NamedTuple):
    """One packet of a buffer: tag, where its header starts, where its body starts and ends."""

    tag: int
    start: int
    body_start: int
    end: int


def _new_length(data: bytes, pos: int, end: int) -> tuple[int, int, bool]:
    """Decode a new-format length at pos: (length, bytes used, partial?)."""
    if pos >= end:
        raise KeyRefused(f"truncated packet header at offset {pos}")
    first = data[pos]
    if first < 192:
        return first, 1, False
    if first < 224:
        if pos + 1 >= end:
            raise KeyRefused(f"truncated packet header at offset {pos}")
        return ((first - 192) << 8) + data[pos + 1] + 192, 2, False
    if first == 255:
        if pos + 4 >= end:
            raise KeyRefused(f"truncated packet header at offset {pos}")
        return int.from_bytes(data[pos + 1 : pos + 5], "big"), 5, False
    return 1 << (first & 0x1F), 1, True


def iter_packets(data: bytes, start: int = 0, end: int | None = None) -> Iterator[PacketRef]:
    """Yield the packets of data[start:end], refusing any framing error.

    Packets with partial body lengths are yielded with their body spanning all chunks
    (`body_start` is then the first chunk's start, and callers must reassemble with
    `packet_body`); only data packets may have them.
    """
    for frame in frames(data, start, end):
        yield PacketRef(*frame)


def frames(data: bytes, start: int = 0, end: int | None = None,
           ) -> Iterator[tuple[int, int, int, int]]:
    """`iter_packets` as plain (tag, start, body_start, end) tuples: the hot loop of a
    flooded key, kept free of per-packet objects and calls for the common header forms."""
    end = len(data) if end is None else end
    pos = start
    while pos < end:
        header = data[pos]
        if header & 0xC0 == 0xC0:
            tag = header & 0x3F
            if pos + 1 < end and data[pos + 1] < 192:
                length = data[pos + 1]
                body_start = pos + 2
            else:
                length, used, partial = _new_length(data, pos + 1, end)
                body_start = pos + 1 + used
                if partial:
                    cursor = _partial_end(data, tag, pos, body_start + length, end)
                    yield tag, pos, body_start, cursor
                    pos = cursor
                    continue
        elif header & 0x80:
            tag = (header >> 2) & 0x0F
            length_type = header & 0x03
            if length_type == 3:
                # "Until the end of the file": only data packets (gpg writes its compressed
                # packets so); the caller then refuses them by type.
                if tag not in _PARTIAL_OK:
                    raise KeyRefused(
                        f"indeterminate packet length in packet type {tag} at offset {pos}")
                yield tag, pos, pos + 1, end
                return
            used = 1 << length_type
            if pos + used >= end:
                raise KeyRefused(f"truncated packet header at offset {pos}")
            length = int.from_bytes(data[pos + 1 : pos + 1 + used], "big")
            body_start = pos + 1 + used
        else:
            raise KeyRefused(f"not an OpenPGP packet at offset {pos} (bad header octet)")
        if tag == 0:
            raise KeyRefused(f"reserved packet type 0 at offset {pos}")
        packet_end = body_start + length
        if packet_end > end:
            raise KeyRefused(
                f"truncated packet at offset {pos}: type {tag} claims {length} octets, "
                f"{end - body_start} remain"
            )
        yield tag, pos, body_start, packet_end
        pos = packet_end


def _partial_end(data: bytes, tag: int, pos: int, cursor: int, end: int) -> int:
    """Where a packet with partial body lengths ends; the last chunk has a definite length."""
    if tag not in _PARTIAL_OK:
        raise KeyRefused(f"partial body length in packet type {tag} at offset {pos}")
    while True:
        if cursor > end:
            raise KeyRefused(f"truncated packet at offset {pos}")
        length, used, partial = _new_length(data, cursor, end)
        cursor += used + length
        if not partial:
            break
    if cursor > end:
        raise KeyRefused(f"truncated packet at offset {pos}")
    return cursor


def packet_body(data: bytes, ref: PacketRef) -> bytes:
    """The body of a packet, with partial-length chunks joined."""
    header = data[ref.start]
    if not header & 0x40:
        return data[ref.body_start : ref.end]
    # Re-decode the first length to see whether it was partial.
    length, used, partial = _new_length(data, ref.start + 1, ref.end)
    if not partial:
        return data[ref.body_start : ref.end]
    chunks = []
    cursor = ref.body_start
    while True:
        chunks.append(data[cursor : cursor + length])
        cursor += length
        if not partial:
            break
        length, used, partial = _new_length(data, cursor, ref.end)
        cursor += used
    return b"".join(chunks)


def new_header(tag: int, length: int) -> bytes:
    """A new-format packet header with a definite length."""
    if length < 192:
        return bytes((0xC0 | tag, length))
    if length < 8384:
        length -= 192
        return bytes((0xC0 | tag, (length >> 8) + 192, length & 0xFF))
    return bytes((0xC0 | tag, 255)) + length.to_bytes(4, "big")


# --- ASCII armor -------------------------------------------------------------------------

# anycrc (C) computes CRC-24/OPENPGP at gigabytes a second; a Python byte loop costs about
# 100 ns an octet, seconds for the armored submission of a flooded key.
_CRC24 = anycrc.Model("CRC24-OPENPGP")


def crc24(data: bytes) -> int:
    """The CRC-24 of RFC 9580 §6.1 (init 0xB704CE, polynomial 0x1864CFB)."""
    value: int = _CRC24.calc(data)
    return value


ARMOR_PUBLIC_KEY = "PGP PUBLIC KEY BLOCK"
ARMOR_PRIVATE_KEY = "PGP PRIVATE KEY BLOCK"
ARMOR_MESSAGE = "PGP MESSAGE"
ARMOR_SIGNATURE = "PGP SIGNATURE"

_WHITE = b" \t\r\n"


def looks_armored(data: bytes) -> bool:
    """True when the input is armored: it does not start with a packet header octet (after
    white space) and has an armor header line (possibly after some text, as in a mail)."""
    head = data.lstrip()[:1]
    return bool(head) and not head[0] & 0x80 and b"-----BEGIN PGP " in data


def dearmor(data: bytes) -> tuple[str, bytes]:
    """Decode the first armored block in data: (its label, the binary content).

    The body is checked in bounded slices and decoded from a memoryview: no per-line
    objects, so an armored flooded key costs about its binary size on top of the input.
    """
    begin = data.find(b"-----BEGIN PGP ")
    if begin < 0:
        raise KeyRefused("no armor header line")
    line_end = data.find(b"\n", begin)
    if line_end < 0:
        raise KeyRefused("truncated armor header line")
    header_line = data[begin:line_end].rstrip(b"\r \t")
    if not header_line.endswith(b"-----"):
        raise KeyRefused("malformed armor header line")
    label = header_line[len(b"-----BEGIN ") : -5].decode("ascii", "replace")
    footer = b"-----END " + label.encode("ascii", "replace") + b"-----"
    tail = data.find(footer, line_end)
    if tail < 0:
        raise KeyRefused(f"armor footer '-----END {label}-----' missing")
    start = _skip_armor_headers(data, line_end + 1, tail)
    end = tail
    while end > start and data[end - 1] in _WHITE:
        end -= 1
    last_line = max(data.rfind(b"\n", start, end) + 1, start)
    checksum: bytes | None = None
    candidate = data[last_line:end].strip()
    if candidate.startswith(b"=") and len(candidate) == 5:
        checksum, end = candidate[1:], last_line
    binary = _decode_base64(data, start, end)
    if checksum is not None:
        try:
            expected = int.from_bytes(base64.b64decode(checksum, validate=True), "big")
        except (binascii.Error, ValueError):
            raise KeyRefused("malformed armor checksum line") from None
        if crc24(binary) != expected:
            raise KeyRefused("armor checksum (CRC-24) does not match the content")
    return label, binary


def _skip_armor_headers(data: bytes, pos: int, tail: int) -> int:
    """Where the armored body starts: after `Key: value` lines and the blank line that ends
    them (some producers omit the blank line when there are no headers)."""
    while pos < tail:
        newline = data.find(b"\n", pos, tail)
        if newline < 0:
            return pos
        line = data[pos:newline]
        if b": " in line:
            pos = newline + 1
            continue
        return newline + 1 if not line.strip() else pos
    return pos


def _decode_base64(data: bytes, start: int, end: int) -> bytes:
    """Strict base64 of data[start:end]: white space allowed anywhere, padding only at the
    end, whole quantums only."""
    # One pass drops the line breaks; pybase64 (SIMD) then decodes and validates the
    # compact text -- alphabet and padding -- about 25 times faster than binascii, which
    # matters for a flooded key armored inside an armored message (tens of megabytes).
    compact = data[start:end].translate(None, _WHITE)
    if len(compact) % 4:
        raise KeyRefused(f"bad base64 in armor: {len(compact)} characters, not whole quantums")
    try:
        return pybase64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise KeyRefused("bad base64 in armor: characters outside the base64 alphabet or "
                         "misplaced padding") from None


def armor(label: str, binary: bytes) -> bytes:
    """Armor binary data under label, with a CRC-24 line (gpg 2.2 still expects one)."""
    encoded = base64.b64encode(binary)
    lines = [encoded[i : i + 64] for i in range(0, len(encoded), 64)]
    crc = base64.b64encode(crc24(binary).to_bytes(3, "big"))
    return b"\n".join(
        [f"-----BEGIN {label}-----".encode(), b"", *lines, b"=" + crc,
         f"-----END {label}-----".encode(), b""]
    )
