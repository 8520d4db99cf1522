"""Cleaning and metadata on the gpg-made vectors in tests/data, and every refusal we promise."""

from __future__ import annotations

from pathlib import Path

import pytest

from milter_wkd import openpgp
from milter_wkd.errors import KeyRefused
from milter_wkd.openpgp import material
from milter_wkd.openpgp import packets as pk
from milter_wkd.openpgp.cleaning import Limits
from milter_wkd.values import Address

DATA = Path(__file__).parent.parent / "data"
VECTOR = (DATA / "vector-ed25519.pgp").read_bytes()
VECTOR_ASC = (DATA / "vector-ed25519.asc").read_bytes()
RSA = (DATA / "vector-rsa2048.pgp").read_bytes()
NOW = 1_800_000_000  # between the vectors' creation and their subkey's expiry
MAIN = [Address.parse("vector@example.org")]


def packets(data: bytes) -> list[bytes]:
    return [data[r.start : r.end] for r in pk.iter_packets(data)]


PARTS = packets(VECTOR)  # primary, uid, sig, uid, sig, uid, sig, subkey, binding


def clean(data: bytes, addresses: list[Address] = MAIN, **kw: object) -> openpgp.CleanResult:
    return openpgp.clean_key(data, addresses, now=NOW, **kw)  # type: ignore[arg-type]


# --- metadata --------------------------------------------------------------------------------

def test_vector_metadata() -> None:
    info = openpgp.inspect_key(VECTOR, now=NOW)
    assert info.fingerprint.hex == "19C986C574E9A8CD4F2CDDF8253FEE91C2685C98"
    assert (info.key_id, info.short_key_id) == ("253FEE91C2685C98", "C2685C98")
    assert (info.created, info.expires, info.revoked) == (1795952740, None, False)
    assert (info.algorithm, info.bits, info.curve) == ("EdDSA", 255, "ed25519")
    assert info.user_ids == ("Test Vector <vector@example.org>",
                             "Vector Elsewhere <Vector@Other.Example>")
    assert [a.key for a in info.addresses] == ["vector@example.org", "vector@other.example"]
    (sub,) = info.subkeys
    assert sub.fingerprint.hex == "0B22D0C62E2CB933DCC9582DD114EE4D1A9828B7"
    assert (sub.created, sub.expires, sub.algorithm, sub.curve, sub.usage, sub.revoked) == (
        1795952742, 1859024742, "ECDH", "cv25519", "e", False)
    assert not info.expired(NOW)
    assert info.as_json()["subkeys"][0]["key_id"] == "D114EE4D1A9828B7"  # type: ignore[index]


def test_rsa_vector_metadata() -> None:
    info = openpgp.inspect_key(RSA, now=NOW)
    assert info.fingerprint.hex == "2E420195144BA8EE19FBCF347261633600B0FFBB"
    assert (info.algorithm, info.bits, info.curve, info.expires) == ("RSA", 2048, None, None)
    (sub,) = info.subkeys
    assert (sub.algorithm, sub.bits, sub.usage, sub.expires) == ("RSA", 2048, "e", None)


# --- what is kept -----------------------------------------------------------------------------

def test_clean_keeps_original_packets_for_the_allowed_address() -> None:
    result = clean(VECTOR)
    assert packets(result.key) == [PARTS[0], PARTS[1], PARTS[2], PARTS[7], PARTS[8]]
    assert dict(result.stats) == {
        "dropped:user-id-other-address": 1, "dropped:user-id-without-address": 1,
        "dropped:signature-on-dropped-component": 2, "kept:user-id": 1, "kept:subkey": 1,
        "kept:self-signature": 2,
    }


def test_addresses_match_case_insensitively_and_armor_is_read() -> None:
    both = [Address.parse("VECTOR@example.org"), Address.parse("vector@OTHER.example")]
    binary = clean(VECTOR, both).key
    assert packets(binary) == [PARTS[0], PARTS[1], PARTS[2], PARTS[3], PARTS[4], PARTS[7],
                               PARTS[8]]
    assert clean(VECTOR_ASC, both).key == binary


def test_clean_is_idempotent() -> None:
    once = clean(VECTOR, MAIN).key
    assert clean(once).key == once
    assert clean(openpgp.armor_key(once)).key == once


@pytest.mark.parametrize("data", [VECTOR, RSA], ids=["ed25519", "rsa"])
def test_cleaning_for_every_address_then_for_those_addresses_changes_nothing(
        data: bytes) -> None:
    # The milter relies on this to clean a submission once, not twice.
    everything = openpgp.clean_key(data, None, now=NOW)
    assert len(everything.info.addresses) >= 1
    again = openpgp.clean_key(everything.key, list(everything.info.addresses), now=NOW)
    assert again.key == everything.key
    assert again.info == everything.info


def test_autocrypt_keydata_of_the_vector() -> None:
    keydata = openpgp.autocrypt_keydata(VECTOR, MAIN[0], now=NOW)
    assert packets(keydata) == [PARTS[0], PARTS[1], PARTS[2], PARTS[7], PARTS[8]]
    with pytest.raises(KeyRefused, match="no valid encryption subkey"):
        openpgp.autocrypt_keydata(VECTOR, MAIN[0], now=1859024742)


def test_trust_and_unknown_packets_are_dropped() -> None:
    trust = b"\xb0\x02\x00\x00"  # old-format trust packet (tag 12)
    unknown = pk.new_header(60, 3) + b"abc"  # private/experimental tag
    marker = pk.new_header(10, 3) + b"PGP"
    data = b"".join([PARTS[0], PARTS[1], PARTS[2], trust, unknown, marker, *PARTS[7:]])
    result = clean(data)
    assert result.key == b"".join([PARTS[0], PARTS[1], PARTS[2], *PARTS[7:]])
    assert result.stats["dropped:trust-packet"] == 1
    assert result.stats["dropped:unknown-packet"] == 2


# --- refusals ---------------------------------------------------------------------------------

def with_byte(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + bytes((value,)) + data[offset + 1 :]


@pytest.mark.parametrize(("version", "reason"), [
    (3, "unsupported key version 3: v2/v3 keys are obsolete"),
    (5, r"unsupported key version 5: v5 keys \(LibrePGP\) are not supported"),
    (6, r"unsupported key version 6: v6 keys \(RFC 9580\) are not supported"),
    (7, "unsupported key version 7: unknown version"),
])
def test_refuses_other_key_versions(version: int, reason: str) -> None:
    assert VECTOR[0] == 0x98  # old format, tag 6, one-octet length: the version is at 2
    assert VECTOR[2] == 4
    with pytest.raises(KeyRefused, match=reason):
        clean(with_byte(VECTOR, 2, version))


def test_subkey_of_another_version_is_dropped() -> None:
    offset = sum(map(len, PARTS[:7])) + 2
    assert VECTOR[offset] == 4
    result = clean(with_byte(VECTOR, offset, 5))
    assert result.info.subkeys == ()
    assert result.stats["dropped:unusable-subkey"] == 1
    assert result.stats["dropped:signature-on-dropped-component"] == 3


@pytest.mark.parametrize(("data", "reason"), [
    (with_byte(VECTOR, 0, 0x94), "secret key material: refusing a secret key"),  # tag 5
    (VECTOR[:-len(PARTS[8]) - len(PARTS[7])] + with_byte(PARTS[7], 0, 0x9C) + PARTS[8],
     "secret key material inside the key"),  # tag 7
    (pk.armor(pk.ARMOR_PRIVATE_KEY, VECTOR), "secret key material: refusing a private key"),
    (pk.armor(pk.ARMOR_MESSAGE, VECTOR), "armor label is 'PGP MESSAGE'"),
    (VECTOR + b"\xc8\x03\x01xy", r"compressed or encrypted packet \(type 8\)"),
    (VECTOR + b"\xa3\x01xyz", r"compressed or encrypted packet \(type 8\)"),
    (VECTOR + b"\xd2\x02\x01x", r"compressed or encrypted packet \(type 18\)"),
    (VECTOR + b"\xc1\x02\x03x", r"compressed or encrypted packet \(type 1\)"),
    (VECTOR + b"\xcb\x02bx", r"message packet \(type 11\)"),
    (VECTOR + VECTOR, "more than one key"),
    (PARTS[1] + VECTOR, r"does not start with a public key packet \(type 13\)"),
    (VECTOR[:-1], "truncated packet"),
    (VECTOR[:1], "truncated packet header"),
    (b"", "empty input"),
    (b"   \n", "bad header octet"),
    (pk.armor(pk.ARMOR_PUBLIC_KEY, b""), "empty input"),
    (VECTOR_ASC.replace(b"\n=", b"\n=A"), "bad base64|malformed armor checksum"),
    (VECTOR_ASC.replace(b"-----END", b"-----FIN"), "armor footer"),
    (VECTOR_ASC[:200], "armor footer"),
])
def test_refusals(data: bytes, reason: str) -> None:
    with pytest.raises(KeyRefused, match=reason):
        clean(data)


def test_refuses_a_bad_crc() -> None:
    lines = VECTOR_ASC.split(b"\n")
    index = next(i for i, line in enumerate(lines) if line.startswith(b"="))
    lines[index] = b"=AAAA"
    with pytest.raises(KeyRefused, match=r"checksum \(CRC-24\) does not match"):
        clean(b"\n".join(lines))


def test_refuses_oversize_input_before_reading_it() -> None:
    with pytest.raises(KeyRefused, match=f"key is {len(VECTOR)} octets, over the limit of 100"):
        clean(VECTOR, limits=Limits(max_input=100))
    assert clean(VECTOR, limits=Limits(max_input=len(VECTOR))).key


def test_refuses_when_no_allowed_address_has_a_user_id() -> None:
    with pytest.raises(KeyRefused, match="no user ID with a valid self-signature for any "
                                         "allowed address"):
        clean(VECTOR, [Address.parse("someone@example.org")])


def test_refuses_broken_self_signatures() -> None:
    sig = bytearray(PARTS[2])
    sig[-5] ^= 0x01  # inside the signature value
    with pytest.raises(KeyRefused, match="no user ID"):
        clean(b"".join([PARTS[0], PARTS[1], bytes(sig), *PARTS[7:]]))


def test_excess_user_ids_are_dropped() -> None:
    result = clean(VECTOR, [Address.parse("vector@example.org"),
                            Address.parse("vector@other.example")],
                   limits=Limits(max_user_ids=1))
    assert len(result.info.user_ids) == 1
    assert result.stats["dropped:excess-user-id"] == 1


def test_remembered_signatures_need_the_same_key_data_and_signature() -> None:
    """Valid signatures are remembered (a key is cleaned twice per submission), keyed by
    everything that decides validity: another user ID, or the same hashed part with other
    signature values, is checked afresh and fails."""
    def body(packet: bytes) -> bytes:
        return pk.packet_body(packet, next(pk.iter_packets(packet)))

    material._VALID.clear()
    primary = material.parse_public_key(body(PARTS[0]))
    signature = material.parse_signature(body(PARTS[2]))
    signed = primary.hash_prefix() + material.user_id_hash_prefix(body(PARTS[1]))
    assert primary.verify(signature, signed)
    assert len(material._VALID) == 1
    assert primary.verify(signature, signed)
    other_uid = primary.hash_prefix() + material.user_id_hash_prefix(body(PARTS[3]))
    assert not primary.verify(signature, other_uid)
    tampered = bytearray(body(PARTS[2]))
    tampered[-3] ^= 0x01  # in the signature's S value; hashed part and left16 unchanged
    assert not primary.verify(material.parse_signature(bytes(tampered)), signed)
    assert len(material._VALID) == 1
