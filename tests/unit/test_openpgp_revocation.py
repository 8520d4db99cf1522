"""Revocation certificates uploaded alone (`openpgp.merge_revocation`): known-answer vectors
made by gpg 2.2.40 (`--gen-revoke`, and its automatic openpgp-revocs.d copy) and by
OpenPGP.js 6.3.2 (`generateKey`'s `revocationCertificate`), in tests/data (see its README);
refusals on crafted signatures (tests/unit/test_openpgp_crafted.py); and gpg itself reads
the merged key as revoked."""

from __future__ import annotations

from pathlib import Path

import pytest

from milter_wkd import openpgp
from milter_wkd.errors import KeyRefused
from milter_wkd.openpgp import packets as pk
from milter_wkd.values import Address
from tests.support.gnupg import GnuPG
from tests.unit.test_openpgp_crafted import ALICE, NOW, T0, Signer, packets, simple_key

DATA = Path(__file__).resolve().parents[1] / "data"
GPG_KEY = (DATA / "revoke-gpg.pgp").read_bytes()
GPG_REV = (DATA / "revoke-gpg.rev").read_bytes()
GPG_AUTO_REV = (DATA / "revoke-gpg-auto.rev").read_bytes()
JS_KEY = (DATA / "revoke-openpgpjs.asc").read_bytes()
JS_REV = (DATA / "revoke-openpgpjs.rev").read_bytes()
GPG_FPR = "9C41F108A448612C30622BC2DC24B5B0450D7FD9"
JS_FPR = "D0108397EB664D10F6EFE39FD3564506770E8852"
GPG_ADDRESSES = [Address.parse("revoke@example.org"), Address.parse("alias@example.org")]


def certificate_packet(armored: bytes) -> bytes:
    label, binary = pk.dearmor(armored)
    assert label == pk.ARMOR_PUBLIC_KEY
    return binary


def test_gpg_gen_revoke_output_is_merged_after_the_primary_key() -> None:
    assert openpgp.is_revocation_certificate(GPG_REV)
    result = openpgp.merge_revocation(GPG_KEY, GPG_REV, GPG_ADDRESSES)
    revocation = certificate_packet(GPG_REV)
    stored = packets(GPG_KEY)
    # Known answer: the key as gpg exported it, with the certificate's one packet, byte for
    # byte, right after the primary key.
    assert result.key == b"".join([stored[0], revocation, *stored[1:]])
    assert result.info.fingerprint.hex == GPG_FPR
    assert result.info.revoked
    assert {a.key for a in result.info.addresses} == {a.key for a in GPG_ADDRESSES}
    assert len(result.info.subkeys) == 1


def test_gpgs_own_copy_in_openpgp_revocs_d_is_read_too() -> None:
    # gpg writes it at key generation with text before the block and a colon before the
    # armor line (so that it is not imported by accident).
    assert GPG_AUTO_REV.startswith(b"This is a revocation certificate")
    assert b"\n:-----BEGIN PGP PUBLIC KEY BLOCK-----" in GPG_AUTO_REV
    result = openpgp.merge_revocation(GPG_KEY, GPG_AUTO_REV, None)
    assert result.info.revoked
    assert packets(result.key)[1] == certificate_packet(GPG_AUTO_REV)


def test_openpgpjs_revocation_certificate_is_merged() -> None:
    assert openpgp.is_revocation_certificate(JS_REV)
    before = openpgp.clean_key(JS_KEY, None)
    assert not before.info.revoked
    result = openpgp.merge_revocation(JS_KEY, JS_REV, None)
    assert result.info.fingerprint.hex == JS_FPR
    assert result.info.revoked
    assert packets(result.key) == [packets(before.key)[0], certificate_packet(JS_REV),
                                   *packets(before.key)[1:]]


def test_merging_the_same_certificate_twice_changes_nothing() -> None:
    once = openpgp.merge_revocation(GPG_KEY, GPG_REV, None)
    assert openpgp.merge_revocation(once.key, GPG_REV, None).key == once.key


@pytest.mark.parametrize(("key", "certificate", "issuer"), [
    (JS_KEY, GPG_REV, GPG_FPR), (GPG_KEY, JS_REV, JS_FPR)])
def test_another_keys_revocation_is_refused(key: bytes, certificate: bytes,
                                            issuer: str) -> None:
    with pytest.raises(KeyRefused, match=f"for another key \\({issuer}\\), not for your"):
        openpgp.merge_revocation(key, certificate, None)


def test_a_tampered_revocation_does_not_verify() -> None:
    binary = bytearray(certificate_packet(GPG_REV))
    binary[-5] ^= 0x01  # inside the signature's second MPI
    with pytest.raises(KeyRefused, match="does not verify against your key " + GPG_FPR):
        openpgp.merge_revocation(GPG_KEY, bytes(binary), None)
    armored = pk.armor(pk.ARMOR_PUBLIC_KEY, bytes(binary))
    with pytest.raises(KeyRefused, match="does not verify"):
        openpgp.merge_revocation(GPG_KEY, armored, None)


def test_a_changed_reason_breaks_the_signature() -> None:
    # The reason for revocation is hashed: "key compromised" made into "key compromisee".
    binary = certificate_packet(GPG_REV)
    assert b"key compromised" in binary
    with pytest.raises(KeyRefused, match="does not verify"):
        openpgp.merge_revocation(GPG_KEY, binary.replace(b"compromised", b"compromisee"),
                                 None)


@pytest.mark.parametrize(("sig_type", "shown"), [(0x30, "0x30"), (0x28, "0x28"),
                                                 (0x1F, "0x1F"), (0x13, "0x13")])
def test_signatures_other_than_a_key_revocation_are_refused(sig_type: int,
                                                            shown: str) -> None:
    alice, _sub, key = simple_key()
    lone = alice.on_key(sig_type, T0 + 10)
    with pytest.raises(KeyRefused, match=f"not a revocation of a whole key .*type {shown}"):
        openpgp.merge_revocation(key, lone, ALICE, now=NOW)


def test_a_crafted_key_revocation_is_merged_and_one_by_a_stranger_refused() -> None:
    alice, _sub, key = simple_key()
    revocation = alice.on_key(0x20, T0 + 10)
    result = openpgp.merge_revocation(key, pk.armor(pk.ARMOR_SIGNATURE, revocation), ALICE,
                                      now=NOW)
    assert result.info.revoked
    assert result.clean.revocation == revocation
    stranger = Signer()
    with pytest.raises(KeyRefused, match="for another key"):
        openpgp.merge_revocation(key, stranger.on_key(0x20, T0 + 10), ALICE, now=NOW)
    # A stranger's signature claiming alice as issuer: found out by the signature check.
    forged = stranger.signature(0x20, alice.prefix, T0 + 10, issuer="keyid")
    forged = forged.replace(stranger.key_id, alice.key_id)
    with pytest.raises(KeyRefused, match="does not verify"):
        openpgp.merge_revocation(key, forged, ALICE, now=NOW)


def test_one_bad_signature_refuses_the_whole_certificate() -> None:
    alice, _sub, key = simple_key()
    good, stranger = alice.on_key(0x20, T0 + 10), Signer().on_key(0x20, T0 + 11)
    with pytest.raises(KeyRefused, match="another key"):
        openpgp.merge_revocation(key, good + stranger, ALICE, now=NOW)


@pytest.mark.parametrize("data", [
    GPG_KEY, JS_KEY, b"", b"not openpgp at all",
    b"-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nxx\n-----END PGP PRIVATE KEY BLOCK-----\n",
    pk.armor(pk.ARMOR_MESSAGE, certificate_packet(GPG_REV)),
    certificate_packet(GPG_REV) * 5,  # more signatures than a certificate has
    certificate_packet(GPG_REV) + packets(GPG_KEY)[0],  # a key packet after it
])
def test_what_is_not_a_revocation_certificate(data: bytes) -> None:
    assert not openpgp.is_revocation_certificate(data)
    with pytest.raises(KeyRefused):
        openpgp.merge_revocation(GPG_KEY, data, None)


def test_an_oversize_certificate_is_not_read() -> None:
    data = b"\n" * (64 * 1024) + GPG_REV
    assert not openpgp.is_revocation_certificate(data)


def test_gpg_reads_the_merged_key_as_revoked(tmp_path: Path) -> None:
    merged = openpgp.merge_revocation(GPG_KEY, GPG_REV, None)
    with GnuPG(tmp_path / "gnupg") as gpg:
        gpg.import_key(GPG_KEY)
        keys = gpg.colons("--list-keys", GPG_FPR)
        assert next(r for r in keys if r[0] == "pub")[1] != "r"
        gpg.import_key(openpgp.armor_key(merged.key))
        keys = gpg.colons("--list-keys", GPG_FPR)
        assert next(r for r in keys if r[0] == "pub")[1] == "r"
