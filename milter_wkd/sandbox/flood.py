"""Flooded keys for the demo, the tests and the benchmarks: a real key with N REAL
third-party certifications, as the 2019 SKS flooding attack left them on keyservers.

Each certification is a v4 generic certification (0x10) over the key's first user ID,
SHA-256, by its own throwaway Ed25519 key made with `cryptography` (150,000 ≈ 18 MB).
Pure: bytes in, bytes out; the certification times are derived from the key's creation
time, so the key should be older than `count` seconds.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric import ed25519

from milter_wkd.openpgp.packets import TAG_USER_ID, iter_packets, new_header

ED25519_OID = bytes.fromhex("2B06010401DA470F01")


def _mpi(value: bytes) -> bytes:
    value = value.lstrip(b"\0")
    bits = len(value) * 8 - (8 - value[0].bit_length()) if value else 0
    return bits.to_bytes(2, "big") + value


def _subpacket(kind: int, body: bytes) -> bytes:
    return bytes((len(body) + 1, kind)) + body


def _fingerprint(public: bytes, created: int) -> bytes:
    body = (b"\x04" + created.to_bytes(4, "big") + b"\x16" + bytes((len(ED25519_OID),))
            + ED25519_OID + _mpi(b"\x40" + public))
    return hashlib.sha1(b"\x99" + len(body).to_bytes(2, "big") + body).digest()  # noqa: S324


def certification(signed_prefix: bytes, created: int) -> bytes:
    """One certification packet by a fresh Ed25519 key over signed_prefix."""
    secret = ed25519.Ed25519PrivateKey.generate()
    public = secret.public_key().public_bytes_raw()
    fpr = _fingerprint(public, created)
    hashed = _subpacket(33, b"\x04" + fpr) + _subpacket(2, created.to_bytes(4, "big"))
    head = b"\x04\x10\x16\x08" + len(hashed).to_bytes(2, "big") + hashed
    trailer = head + b"\x04\xff" + len(head).to_bytes(4, "big")
    digest = hashlib.sha256(signed_prefix + trailer).digest()
    signature = secret.sign(digest)
    unhashed = _subpacket(16, fpr[-8:])
    body = (head + len(unhashed).to_bytes(2, "big") + unhashed + digest[:2]
            + _mpi(signature[:32]) + _mpi(signature[32:]))
    return new_header(2, len(body)) + body


def split_for_flood(key: bytes, count: int) -> tuple[bytes, list[bytes], bytes]:
    """(packets up to the first user ID's self-signature, `count` certifications, the
    rest): callers that write huge files can stream the parts."""
    refs = list(iter_packets(key))
    packets = [key[r.start : r.end] for r in refs]
    primary_body = key[refs[0].body_start : refs[0].end]
    uid_index = next(i for i, r in enumerate(refs) if r.tag == TAG_USER_ID)
    uid = key[refs[uid_index].body_start : refs[uid_index].end]
    prefix = (b"\x99" + len(primary_body).to_bytes(2, "big") + primary_body
              + b"\xb4" + len(uid).to_bytes(4, "big") + uid)
    start = int.from_bytes(primary_body[1:5], "big") + 3600
    certs = [certification(prefix, start + i) for i in range(count)]
    return b"".join(packets[: uid_index + 2]), certs, b"".join(packets[uid_index + 2 :])


def flood_key(key: bytes, count: int) -> bytes:
    """key with `count` third-party certifications on its first user ID."""
    head, certs, tail = split_for_flood(key, count)
    return head + b"".join(certs) + tail
