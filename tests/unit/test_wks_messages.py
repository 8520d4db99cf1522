"""openpgp.messages without gpg: round trips through our own encrypt/decrypt/sign/verify,
and refusals of hostile messages. gpg's side of the story is tests/integration/test_messages.py."""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st

from milter_wkd.errors import KeyRefused, MessageRefused, Refused
from milter_wkd.openpgp import clean_key, inspect_key, messages
from milter_wkd.openpgp import packets as pk
from tests.unit.conftest import SUBMISSION

try:  # as milter_wkd.openpgp.messages: CFB moved to "decrepit" in cryptography 47
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB  # type: ignore[no-redef]


def _without_subkeys(key: bytes) -> bytes:
    """The key with its subkey packets and their bindings cut off."""
    refs = list(pk.iter_packets(key))
    first_subkey = next(r.start for r in refs if r.tag == pk.TAG_PUBLIC_SUBKEY)
    return key[:first_subkey]


def test_generated_key_is_what_we_publish(service: messages.GeneratedKey) -> None:
    info = inspect_key(service.public)
    assert info.fingerprint == service.fingerprint
    assert info.user_ids == ("key-submission@example.org",)
    assert (info.algorithm, info.curve, info.expires) == ("EdDSA", "ed25519", None)
    assert [(s.curve, s.usage) for s in info.subkeys] == [("cv25519", "e")]
    # Cleaning is a fixed point: what generate returns is already the published form.
    assert clean_key(service.public, [SUBMISSION]).key == service.public
    assert pk.dearmor(service.secret)[0] == pk.ARMOR_PRIVATE_KEY


def test_round_trip_to_several_recipients(service: messages.GeneratedKey,
                                          user: messages.GeneratedKey) -> None:
    text = b"type: confirmation-request\nnonce: x\n" * 50
    sealed = messages.encrypt(text, [user.public, service.public])
    assert sealed.startswith(b"-----BEGIN PGP MESSAGE-----")
    assert messages.decrypt(sealed, user.secret) == text
    assert messages.decrypt(sealed, service.secret) == text
    assert messages.decrypt(pk.dearmor(sealed)[1], service.secret) == text


def test_only_the_recipient_can_decrypt(service: messages.GeneratedKey,
                                        user: messages.GeneratedKey) -> None:
    sealed = messages.encrypt(b"secret", [user.public])
    with pytest.raises(MessageRefused, match="not encrypted to"):
        messages.decrypt(sealed, service.secret)


def test_encrypt_refusals(user: messages.GeneratedKey) -> None:
    with pytest.raises(KeyRefused, match="no recipient"):
        messages.encrypt(b"x", [])
    with pytest.raises(KeyRefused, match="no usable encryption subkey"):
        messages.encrypt(b"x", [_without_subkeys(user.public)])
    with pytest.raises(KeyRefused):
        messages.encrypt(b"x", [b"not a key"])
    with pytest.raises(KeyRefused, match="public key"):
        messages.decrypt(messages.encrypt(b"x", [user.public]), user.public)


def test_size_caps(user: messages.GeneratedKey) -> None:
    sealed = messages.encrypt(b"a" * 5000, [user.public])
    with pytest.raises(MessageRefused, match="larger than 4999"):
        messages.decrypt(sealed, user.secret, max_plaintext=4999)
    assert messages.decrypt(sealed, user.secret, max_plaintext=5000) == b"a" * 5000
    with pytest.raises(MessageRefused, match="encrypted message is larger"):
        messages.decrypt(sealed, user.secret, max_message=len(sealed) - 1)


def test_tampered_ciphertext_is_refused(user: messages.GeneratedKey) -> None:
    binary = bytearray(pk.dearmor(messages.encrypt(b"hello" * 20, [user.public]))[1])
    binary[-30] ^= 0x01
    with pytest.raises(MessageRefused, match="decryption failed"):
        messages.decrypt(bytes(binary), user.secret)


def _seipd_aes(key: bytes, data: bytes, *, prefix: bytes | None = None) -> bytes:
    """A SEIPD v1 body (minus its version octet) made by hand, as RFC 9580 §5.13.1 says:
    CFB with a zero IV over random prefix, its last two octets again, data, MDC packet."""
    head = os.urandom(16)
    plain = (prefix if prefix is not None else head + head[-2:]) + data + b"\xd3\x14"
    plain += hashlib.sha1(plain).digest()  # noqa: S324 - the MDC is SHA-1
    encryptor = Cipher(algorithms.AES(key), CFB(bytes(16))).encryptor()
    return encryptor.update(plain) + encryptor.finalize()


@pytest.mark.parametrize("size", [16, 24, 32])
def test_aes_integrity_protected_data(size: int) -> None:
    key = os.urandom(size)
    body = _seipd_aes(key, b"literal packet")
    plain = messages._open_seipd_aes(body, key)
    assert plain[:-22] == b"literal packet"
    assert plain[-22:-20] == b"\xd3\x14"
    for position in (0, 17, len(body) - 30, len(body) - 1):
        tampered = bytearray(body)
        tampered[position] ^= 0x40
        with pytest.raises(MessageRefused, match="decryption failed"):
            messages._open_seipd_aes(bytes(tampered), key)
    with pytest.raises(MessageRefused, match="decryption failed"):
        messages._open_seipd_aes(body, os.urandom(size))
    for short in (b"", body[:10], body[:21]):
        with pytest.raises(MessageRefused, match="decryption failed"):
            messages._open_seipd_aes(short, key)


def test_aes_data_with_a_bad_prefix_check_is_refused() -> None:
    """The repeated prefix octets are checked too, even under a valid MDC (pgpy does)."""
    key = os.urandom(16)
    body = _seipd_aes(key, b"data", prefix=bytes(16) + b"\x00\x01")
    with pytest.raises(MessageRefused, match="decryption failed"):
        messages._open_seipd_aes(body, key)
    assert messages._open_seipd_aes(_seipd_aes(key, b"data", prefix=bytes(18)), key)


def test_message_shapes_we_refuse(user: messages.GeneratedKey) -> None:
    sealed = pk.dearmor(messages.encrypt(b"hello", [user.public]))[1]
    refs = list(pk.iter_packets(sealed))
    pkesk = sealed[refs[0].start : refs[0].end]
    seipd_body = pk.packet_body(sealed, refs[-1])
    cases = {
        "without integrity": pkesk + pk.new_header(pk.TAG_SED, len(seipd_body)) + seipd_body,
        "AEAD": pkesk + pk.new_header(pk.TAG_AEAD, len(seipd_body)) + seipd_body,
        "no encrypted data": pkesk,
        "unexpected packet type 13": pk.new_header(13, 3) + b"abc" + sealed,
        "password": pk.new_header(pk.TAG_SKESK, 4) + b"\x04\x09\x00\x00" + sealed,
        "version": pkesk + pk.new_header(pk.TAG_SEIPD, 3) + b"\x02ab",
        "bad OpenPGP": b"\x00garbage",
        "expected an armored PGP MESSAGE": pk.armor(pk.ARMOR_PUBLIC_KEY, user.public),
        "armored message": b"-----BEGIN PGP MESSAGE-----\n\n!!!!\n-----END PGP MESSAGE-----\n",
    }
    for reason, data in cases.items():
        with pytest.raises(MessageRefused, match=reason):
            messages.decrypt(data, user.secret)


def test_signatures(service: messages.GeneratedKey, user: messages.GeneratedKey) -> None:
    data = b"Content-Type: text/plain\r\n\r\nhello\r\n"
    signature = messages.sign_detached(data, service.secret)
    assert signature.startswith(b"-----BEGIN PGP SIGNATURE-----")
    assert messages.verify_detached(data, signature, service.public) == service.fingerprint
    with pytest.raises(MessageRefused, match="bad signature"):
        messages.verify_detached(data + b"x", signature, service.public)
    with pytest.raises(MessageRefused):
        messages.verify_detached(data, signature, user.public)
    with pytest.raises(MessageRefused):
        messages.verify_detached(data, b"garbage", service.public)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=400), st.sampled_from(["raw", "armored"]))
def test_decrypt_of_random_bytes_only_refuses(user: messages.GeneratedKey, data: bytes,
                                               form: str) -> None:
    if form == "armored":
        data = pk.armor(pk.ARMOR_MESSAGE, data)
    with pytest.raises(Refused):
        messages.decrypt(data, user.secret)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_decrypt_of_mutated_messages_only_refuses_or_succeeds(
        user: messages.GeneratedKey, data: st.DataObject) -> None:
    sealed = bytearray(pk.dearmor(messages.encrypt(b"payload " * 8, [user.public]))[1])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(sealed) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            sealed[pos] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del sealed[pos : pos + data.draw(st.integers(1, 8))]
        else:
            sealed[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        if not sealed:
            sealed = bytearray(b"\x00")
    try:
        plain = messages.decrypt(bytes(sealed), user.secret)
    except Refused:
        return
    # A mutation that decrypts must have left the protected content alone (MDC).
    assert plain == b"payload " * 8
