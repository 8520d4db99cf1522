"""The packet framer (openpgp.packets): frames, packet bodies, header round trip.

Properties: the packets of an input tile it (each starts where the one before ended), a
body never reaches past its packet, and `new_header` of a body length frames it again.
"""

from __future__ import annotations

from collections.abc import Iterator

from fuzz.targets import fixtures
from milter_wkd.errors import Refused
from milter_wkd.openpgp import packets as pk

ALLOWED = (Refused,)


def one_input(data: bytes) -> None:
    position = 0
    for ref in pk.iter_packets(data):
        assert ref.start == position, (ref, position)
        assert ref.start < ref.body_start <= ref.end <= len(data), ref
        body = pk.packet_body(data, ref)
        assert len(body) <= ref.end - ref.body_start
        framed = pk.new_header(ref.tag, len(body)) + body
        (again,) = pk.iter_packets(framed)
        assert (again.tag, pk.packet_body(framed, again)) == (ref.tag, body)
        position = ref.end
    assert position == len(data)


def seeds() -> Iterator[tuple[str, bytes]]:
    for name, data in fixtures.key_vectors().items():
        yield name, pk.dearmor(data)[1] if name.endswith(".asc") else data
    # Every header form: old format 1/2/4-octet lengths, new format 1/2/5-octet and partial.
    yield "old-lengths", b"\x88\x01x" + b"\x89\x00\x01y" + b"\x8a\x00\x00\x00\x01z"
    yield "new-lengths", (b"\xcd\x01a" + b"\xcd\xc0\x00" + b"b" * 192
                          + b"\xcd\xff\x00\x00\x00\x01c")
    yield "partial-literal", b"\xcb\xe1ab\x01c"
    yield "indeterminate-compressed", b"\xa3\x00xyz"
