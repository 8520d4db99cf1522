"""The WKS mail parsers (milter_wkd.wks: parse_message, parse_submission,
parse_confirmation_response) with decryption by the service key (fuzz/data).

The first octet picks the parser (bits 2-3) and what the rest of the input is (bits 0-1):
0. the whole mail;
1. the ciphertext: the body of the octet-stream part of a PGP/MIME mail;
2. the decrypted MIME entity: wrapped in a literal packet, encrypted to the service key
   (AES-256, SEIPD v1 with its MDC, as `messages.decrypt` expects) and sent as PGP/MIME;
3. the decrypted packet stream itself (literal, compressed, signature packets...),
   encrypted and sent the same way.
Modes 2 and 3 get past the MDC that random ciphertext never does, so the parsers after
decryption (packets, decompression, the inner MIME) see hostile input at volume.
"""

from __future__ import annotations

import base64
import bz2
import hashlib
import os
import zlib
from collections.abc import Iterator

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fuzz.targets import fixtures
from milter_wkd import wks
from milter_wkd.errors import Refused
from milter_wkd.openpgp import messages
from milter_wkd.openpgp import packets as pk

try:  # as milter_wkd.openpgp.messages does
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover
    from cryptography.hazmat.primitives.ciphers.modes import CFB

ALLOWED = (Refused,)
SECRET = fixtures.service_secret()
DECRYPT = wks.decrypter(SECRET)
PARSERS = (wks.parse_message, wks.parse_submission, wks.parse_confirmation_response)

HEADERS = (b"From: user@example.org\nTo: key-submission@example.org\n"
           b"Subject: Key publishing request\nWks-Draft-Version: 3\nMIME-Version: 1.0\n")
PGP_MIME_HEAD = (HEADERS + b'Content-Type: multipart/encrypted; protocol="application/'
                 b'pgp-encrypted"; boundary="BB"\n\n--BB\nContent-Type: application/pgp-'
                 b"encrypted\n\nVersion: 1\n\n--BB\nContent-Type: application/octet-stream\n\n")
PGP_MIME_TAIL = b"\n--BB--\n"


def _session() -> tuple[bytes, bytes]:
    """A session-key packet to the service key and its AES session key (taken from one
    real encryption: messages picks AES-256 for keys of its own generator)."""
    armored = messages.encrypt(b"x", [fixtures.service_public()])
    session_keys, _ = messages._encrypted_parts(pk.dearmor(armored)[1])
    algorithm, key = messages._session_key(
        session_keys, messages._decryption_keys(SECRET), messages._cv25519_keys(SECRET))
    assert algorithm == 9 and len(key) == 32, algorithm  # AES-256
    return session_keys[0], bytes(key)


PKESK, SESSION_KEY = _session()


def seal(packets: bytes) -> bytes:
    """An armored message: the session-key packet and a SEIPD v1 packet of `packets`."""
    prefix = os.urandom(16)
    plain = prefix + prefix[-2:] + packets + b"\xd3\x14"
    plain += hashlib.sha1(plain).digest()  # noqa: S324 - the MDC is SHA-1
    encryptor = Cipher(algorithms.AES(SESSION_KEY), CFB(bytes(16))).encryptor()
    body = b"\x01" + encryptor.update(plain) + encryptor.finalize()
    return pk.armor(pk.ARMOR_MESSAGE, PKESK + pk.new_header(pk.TAG_SEIPD, len(body)) + body)


def literal(content: bytes) -> bytes:
    body = b"b\x00\x00\x00\x00\x00" + content
    return pk.new_header(pk.TAG_LITERAL, len(body)) + body


def pgp_mime(ciphertext: bytes) -> bytes:
    return PGP_MIME_HEAD + ciphertext + PGP_MIME_TAIL


def mail_of(mode: int, rest: bytes) -> bytes:
    if mode == 0:
        return rest
    if mode == 1:
        return pgp_mime(rest)
    return pgp_mime(seal(literal(rest) if mode == 2 else rest))


def one_input(data: bytes) -> None:
    if not data:
        return
    parse = PARSERS[(data[0] >> 2) % len(PARSERS)]
    result = parse(mail_of(data[0] & 3, data[1:]), DECRYPT)
    assert isinstance(result, wks.Submission | wks.ConfirmationResponse)


def seeds() -> Iterator[tuple[str, bytes]]:
    key = pk.armor(pk.ARMOR_PUBLIC_KEY, fixtures.user_public())
    key_part = b"Content-Type: application/pgp-keys\n\n" + key
    response = (b"type: confirmation-response\nsender: key-submission@example.org\n"
                b"address: user@example.org\nnonce: " + b"a" * 32 + b"\n")
    wks_part = (b"Content-Type: application/vnd.gnupg.wks\nContent-Transfer-Encoding: 8bit\n\n"
                + response)
    mixed = (b"Content-Type: multipart/mixed; boundary=M\n\n--M\nContent-Type: text/plain\n\n"
             b"hello\n--M\n" + key_part + b"\n--M--\n")
    # Each with the parser (bits 2-3 of the selector) that accepts it.
    inner = {"key-part": (key_part, 1), "wks-part": (wks_part, 2), "mixed": (mixed, 1),
             "bare-key": (key, 0), "bare-response": (response, 0)}
    for name, (entity, parser) in inner.items():
        selector = parser << 2
        yield f"mail-{name}", bytes([selector]) + pgp_mime(
            messages.encrypt(entity, [fixtures.service_public()]))
        yield f"ciphertext-{name}", bytes([selector | 1]) + messages.encrypt(
            entity, [fixtures.service_public()])
        yield f"plaintext-{name}", bytes([selector | 2]) + entity
    deflate = zlib.compressobj(wbits=-15)
    for name, algorithm, compressed in (
            ("zip", 1, deflate.compress(literal(key_part)) + deflate.flush()),
            ("zlib", 2, zlib.compress(literal(key_part))),
            ("bzip2", 3, bz2.compress(literal(key_part)))):
        yield f"packets-{name}", b"\x03" + pk.new_header(
            pk.TAG_COMPRESSED, len(compressed) + 1) + bytes([algorithm]) + compressed
    # A one-pass signature and signature packet around the literal data (skipped).
    one_pass = pk.new_header(pk.TAG_ONE_PASS, 13) + b"\x03\x00\x0a\x16" + bytes(8) + b"\x01"
    signature = pk.new_header(pk.TAG_SIGNATURE, 4) + b"\x04\x00\x16\x0a"
    yield "packets-signed", b"\x03" + one_pass + literal(key_part) + signature
    yield "packets-literal", b"\x0b" + literal(wks_part)
    yield "clear-submission", b"\x00" + HEADERS + key_part
    yield "clear-response", b"\x08" + HEADERS + wks_part
    yield "clear-base64", b"\x04" + HEADERS + (
        b"Content-Type: application/pgp-keys\nContent-Transfer-Encoding: base64\n\n"
        + base64.encodebytes(key))
