"""Cleaning policy on keys crafted here with `cryptography`: floods, forgeries, revocations.

`Signer` makes real v4 Ed25519 (legacy EdDSA) keys and signatures, so every case is a
well-formed key that only differs from a gpg-made one where the test wants it to (the
integration tests check that gpg accepts such keys). Other modules reuse it as a seed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

from milter_wkd import openpgp
from milter_wkd.errors import KeyRefused
from milter_wkd.openpgp.cleaning import Limits
from milter_wkd.openpgp.packets import iter_packets, new_header
from milter_wkd.values import Address

ED25519_OID = bytes.fromhex("2B06010401DA470F01")
CV25519_OID = bytes.fromhex("2B060104019755010501")
T0 = 1_700_000_000
NOW = T0 + 1000 * 86400


def mpi(value: bytes) -> bytes:
    value = value.lstrip(b"\0")
    bits = (len(value) - 1) * 8 + value[0].bit_length() if value else 0
    return bits.to_bytes(2, "big") + value


def subpacket(kind: int, body: bytes) -> bytes:
    length = len(body) + 1
    if length < 192:
        return bytes((length, kind)) + body
    length -= 192
    return bytes(((length >> 8) + 192, length & 0xFF, kind)) + body


def notation(name: bytes, value: bytes) -> bytes:
    """A human-readable notation subpacket (RFC 9580 §5.2.3.24)."""
    return subpacket(20, b"\x80\0\0\0" + len(name).to_bytes(2, "big")
                     + len(value).to_bytes(2, "big") + name + value)


def user_id(text: str) -> bytes:
    raw = text.encode()
    return new_header(13, len(raw)) + raw


def uid_prefix(text: str) -> bytes:
    raw = text.encode()
    return b"\xb4" + len(raw).to_bytes(4, "big") + raw


def key_prefix(body: bytes) -> bytes:
    return b"\x99" + len(body).to_bytes(2, "big") + body


@dataclass
class Subkey:
    """A cv25519 encryption subkey."""

    created: int = T0
    body: bytes = field(init=False)

    def __post_init__(self) -> None:
        public = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
        self.body = (b"\x04" + self.created.to_bytes(4, "big") + b"\x12"
                     + bytes((len(CV25519_OID),)) + CV25519_OID + mpi(b"\x40" + public)
                     + b"\x03\x01\x08\x07")

    @property
    def packet(self) -> bytes:
        return new_header(14, len(self.body)) + self.body

    @property
    def fingerprint(self) -> str:
        return hashlib.sha1(key_prefix(self.body)).hexdigest().upper()  # noqa: S324


@dataclass
class Signer:
    """An Ed25519 primary key that can sign anything."""

    created: int = T0
    secret: ed25519.Ed25519PrivateKey = field(default_factory=ed25519.Ed25519PrivateKey.generate)

    @property
    def body(self) -> bytes:
        public = self.secret.public_key().public_bytes_raw()
        return (b"\x04" + self.created.to_bytes(4, "big") + b"\x16"
                + bytes((len(ED25519_OID),)) + ED25519_OID + mpi(b"\x40" + public))

    @property
    def packet(self) -> bytes:
        return new_header(6, len(self.body)) + self.body

    @property
    def prefix(self) -> bytes:
        return key_prefix(self.body)

    @property
    def fingerprint(self) -> bytes:
        return hashlib.sha1(self.prefix).digest()  # noqa: S324

    @property
    def key_id(self) -> bytes:
        return self.fingerprint[-8:]

    @property
    def subkey_packet(self) -> bytes:
        """This key as a (signing) subkey of another."""
        return new_header(14, len(self.body)) + self.body

    def signature(self, sig_type: int, signed: bytes, created: int, *,
                  hashed: bytes = b"", unhashed: bytes = b"", issuer: str = "both",
                  corrupt: bool = False, hash_algorithm: int = 8) -> bytes:
        """A v4 signature packet over signed (the hashed prefix before the trailer)."""
        body = self.signature_body(sig_type, signed, created, hashed=hashed, unhashed=unhashed,
                                   issuer=issuer, corrupt=corrupt,
                                   hash_algorithm=hash_algorithm)
        return new_header(2, len(body)) + body

    def signature_body(self, sig_type: int, signed: bytes, created: int, *,
                       hashed: bytes = b"", unhashed: bytes = b"", issuer: str = "both",
                       corrupt: bool = False, hash_algorithm: int = 8) -> bytes:
        area = subpacket(2, created.to_bytes(4, "big")) + hashed
        if issuer in ("both", "fpr"):
            area += subpacket(33, b"\x04" + self.fingerprint)
        if issuer in ("both", "keyid"):
            unhashed = subpacket(16, self.key_id) + unhashed
        head = bytes((4, sig_type, 22, hash_algorithm)) + len(area).to_bytes(2, "big") + area
        trailer = head + b"\x04\xff" + len(head).to_bytes(4, "big")
        hasher = {1: hashlib.md5, 2: hashlib.sha1, 8: hashlib.sha256,
                  10: hashlib.sha512}[hash_algorithm]
        digest = hasher(signed + trailer).digest()
        value = self.secret.sign(digest)
        if corrupt:
            value = value[:10] + bytes((value[10] ^ 1,)) + value[11:]
        return (head + len(unhashed).to_bytes(2, "big") + unhashed + digest[:2]
                + mpi(value[:32]) + mpi(value[32:]))

    # The usual signatures, over this key (or `target`'s, for third-party certifications).
    def certify(self, text: str, created: int = T0, *, target: Signer | None = None,
                sig_type: int = 0x13, hashed: bytes = b"", issuer: str = "both",
                corrupt: bool = False) -> bytes:
        target = target or self
        return self.signature(sig_type, target.prefix + uid_prefix(text), created,
                              hashed=subpacket(27, b"\x03") + hashed, issuer=issuer,
                              corrupt=corrupt)

    def bind(self, sub: Subkey | Signer, created: int = T0, sig_type: int = 0x18,
             hashed: bytes = b"", *, flags: int = 0x0C, unhashed: bytes = b"",
             hash_algorithm: int = 8) -> bytes:
        return self.signature(sig_type, self.prefix + key_prefix(sub.body), created,
                              hashed=subpacket(27, bytes((flags,))) + hashed,
                              unhashed=unhashed, hash_algorithm=hash_algorithm)

    def bind_signing(self, sub: Signer, created: int = T0, *, back: str = "hashed",
                     flags: int = 0x02) -> bytes:
        """A binding of `sub` as a signing subkey, with its back-signature (0x19) in the
        hashed or unhashed area, or "none", or "forged" (made by this key, not by sub)."""
        signer = self if back == "forged" else sub
        embedded = subpacket(32, signer.signature_body(
            0x19, self.prefix + key_prefix(sub.body), created))
        return self.bind(sub, created, flags=flags,
                         hashed=embedded if back in ("hashed", "forged") else b"",
                         unhashed=embedded if back == "unhashed" else b"")

    def on_key(self, sig_type: int, created: int = T0) -> bytes:
        return self.signature(sig_type, self.prefix, created)


ALICE_UID = "Alice <alice@example.org>"
ALICE = [Address.parse("alice@example.org")]


def simple_key() -> tuple[Signer, Subkey, bytes]:
    alice, sub = Signer(), Subkey(T0 + 5)
    key = (alice.packet + user_id(ALICE_UID) + alice.certify(ALICE_UID, T0 + 1)
           + sub.packet + alice.bind(sub, T0 + 6))
    return alice, sub, key


def rich_key() -> bytes:
    """A seed for fuzzing: certifiers, a revoked user ID, a photo, two subkeys, revocations."""
    alice, old_sub, new_sub = Signer(), Subkey(T0 + 5), Subkey(T0 + 50)
    bob, carol = Signer(), Signer()
    other = "Alice Other <alice@other.example>"
    return b"".join([
        alice.packet, alice.on_key(0x1F, T0 + 2),
        user_id(ALICE_UID), alice.certify(ALICE_UID, T0 + 1),
        bob.certify(ALICE_UID, T0 + 10, target=alice, sig_type=0x10),
        carol.certify(ALICE_UID, T0 + 11, target=alice, sig_type=0x10),
        user_id(other), alice.certify(other, T0 + 3), alice.certify(other, T0 + 4,
                                                                     sig_type=0x30),
        new_header(17, 5) + b"\x04\x01\xff\xd8\xff",
        old_sub.packet, alice.bind(old_sub, T0 + 6), alice.bind(old_sub, T0 + 7, 0x28),
        new_sub.packet, alice.bind(new_sub, T0 + 51),
    ])


def packets(data: bytes) -> list[bytes]:
    return [data[r.start : r.end] for r in iter_packets(data)]


def clean(data: bytes, addresses: list[Address] | None = None, **kw: object,
          ) -> openpgp.CleanResult:
    return openpgp.clean_key(data, ALICE if addresses is None else addresses,
                             now=NOW, **kw)  # type: ignore[arg-type]


# --- the builder makes keys our cleaner accepts unchanged ----------------------------------

def test_a_clean_key_comes_out_unchanged() -> None:
    alice, sub, key = simple_key()
    result = clean(key)
    assert result.key == key
    assert result.info.fingerprint.hex == alice.fingerprint.hex().upper()
    assert [s.fingerprint.hex for s in result.info.subkeys] == [sub.fingerprint]


# --- third-party certifications and the key-ID pre-filter -----------------------------------

def test_third_party_certifications_are_dropped_and_counted() -> None:
    alice, _, key = simple_key()
    parts = packets(key)
    certifiers = [Signer() for _ in range(30)]
    flooded = b"".join([*parts[:3], *(c.certify(ALICE_UID, T0 + 9, target=alice, sig_type=0x10)
                                      for c in certifiers), *parts[3:]])
    result = clean(flooded)
    assert result.key == key
    assert result.stats["dropped:third-party-signature"] == 30


def test_key_id_inside_a_third_party_signature_does_not_fool_the_pre_filter() -> None:
    alice, _, key = simple_key()
    parts = packets(key)
    mallory = Signer()
    # A notation (subpacket 20) carrying alice's key ID and fingerprint: the byte search
    # finds them, the parsed issuer does not match.
    sneaky = mallory.certify(ALICE_UID, T0 + 9, target=alice, sig_type=0x10,
                             hashed=notation(b"note@example.org", alice.fingerprint))
    assert alice.key_id in sneaky
    result = clean(b"".join([*parts[:3], sneaky, *parts[3:]]))
    assert result.key == key
    assert result.stats["dropped:third-party-signature"] == 1


@pytest.mark.parametrize("issuer", ["both", "fpr", "keyid"])
def test_self_signatures_are_found_by_either_issuer_subpacket(issuer: str) -> None:
    alice, sub = Signer(), Subkey()
    cert = alice.certify(ALICE_UID, T0 + 1, issuer=issuer)
    key = alice.packet + user_id(ALICE_UID) + cert + sub.packet + alice.bind(sub, T0 + 2)
    assert clean(key).key == key


def test_self_signature_without_issuer_is_dropped() -> None:
    alice = Signer()
    key = alice.packet + user_id(ALICE_UID) + alice.certify(ALICE_UID, T0 + 1, issuer="none")
    with pytest.raises(KeyRefused, match="no user ID with a valid self-signature"):
        clean(key)


# --- forged "self" signatures --------------------------------------------------------------

def test_forged_newer_self_signatures_cannot_push_out_the_real_one() -> None:
    alice, _, key = simple_key()
    parts = packets(key)
    forged = [alice.certify(ALICE_UID, T0 + 100 + i, corrupt=True) for i in range(20)]
    result = clean(b"".join([*parts[:2], *forged[:10], parts[2], *forged[10:], *parts[3:]]))
    assert result.key == key
    assert result.stats["dropped:invalid-self-signature"] == 20


def test_too_many_forged_self_signatures_are_refused() -> None:
    alice, _, key = simple_key()
    parts = packets(key)
    forged = [alice.certify(ALICE_UID, T0 + 100 + i, corrupt=True) for i in range(6)]
    flooded = b"".join([*parts[:3], *forged, *parts[3:]])
    with pytest.raises(KeyRefused, match="more than 5 self-signatures fail verification"):
        clean(flooded, limits=Limits(max_invalid_signatures=5))
    assert clean(flooded, limits=Limits(max_invalid_signatures=6)).key == key


def test_duplicated_self_signature_is_verified_and_kept_once() -> None:
    _, _, key = simple_key()
    parts = packets(key)
    result = clean(b"".join([*parts[:3], *[parts[2]] * 500, *parts[3:]]))
    assert result.key == key
    assert result.stats["dropped:duplicate-signature"] == 500


def test_signature_type_in_the_wrong_place_is_dropped() -> None:
    alice, sub, key = simple_key()
    parts = packets(key)
    misplaced = alice.bind(sub, T0 + 8)  # a subkey binding after a user ID
    result = clean(b"".join([*parts[:3], misplaced, *parts[3:]]))
    assert result.key == key
    assert result.stats["dropped:misplaced-signature"] == 1


def test_rsa_signature_without_mpis_is_no_crash() -> None:
    """Regression: an MPI-less signature naming an RSA key raised IndexError."""
    from pathlib import Path

    data = (Path(__file__).parent.parent / "data" / "vector-rsa2048.pgp").read_bytes()
    parts = packets(data)
    fpr = bytes.fromhex("2E420195144BA8EE19FBCF347261633600B0FFBB")
    area = subpacket(2, (T0 + 1).to_bytes(4, "big")) + subpacket(33, b"\x04" + fpr)
    body = bytes((4, 0x13, 1, 8)) + len(area).to_bytes(2, "big") + area + b"\0\0" + b"\0\0"
    empty = new_header(2, len(body)) + body
    result = openpgp.clean_key(b"".join([*parts[:3], empty, *parts[3:]]),
                               [Address.parse("rsa@example.org")])
    assert result.key == data
    assert result.stats["dropped:invalid-self-signature"] == 1


# --- revocations, expiry, choosing among user IDs -------------------------------------------

def test_key_revocation_survives_many_newer_direct_signatures() -> None:
    alice, _, key = simple_key()
    parts = packets(key)
    revocation = alice.on_key(0x20, T0 + 10)
    directs = [alice.on_key(0x1F, T0 + 20 + i) for i in range(5)]
    result = clean(b"".join([parts[0], revocation, *directs, *parts[1:]]),
                   limits=Limits(max_candidates=2))
    assert result.info.revoked
    assert result.clean.revocation == revocation
    assert result.clean.direct == directs[-1]
    with pytest.raises(KeyRefused, match="revoked"):
        openpgp.autocrypt_keydata(b"".join([parts[0], revocation, *parts[1:]]), ALICE[0],
                                  now=NOW)


def test_every_valid_revocation_is_kept() -> None:
    """An earlier "compromised" must not be hidden by a later "retired"."""
    alice, sub, key = simple_key()
    parts = packets(key)
    compromised = alice.on_key(0x20, T0 + 10)
    retired = alice.on_key(0x20, T0 + 20)
    sub_revocations = [alice.bind(sub, T0 + 11, 0x28), alice.bind(sub, T0 + 21, 0x28)]
    data = b"".join([parts[0], compromised, retired, *parts[1:], *sub_revocations])
    result = clean(data)
    assert packets(result.key) == [parts[0], retired, compromised, *parts[1:],
                                   *sub_revocations[::-1]]
    assert result.stats["kept:self-signature"] == 6
    assert result.info.revoked
    assert result.info.subkeys[0].revoked


@pytest.mark.parametrize(("revoked_at", "recertified_at", "kept"), [
    (T0 + 10, None, False),          # revoked
    (T0 + 10, T0 + 20, True),        # revoked, then certified again
    (T0 - 10, None, True),           # a revocation older than the certification
])
def test_user_id_revocation(revoked_at: int, recertified_at: int | None, kept: bool) -> None:
    alice, _, key = simple_key()
    parts = packets(key)
    uid_sigs = [parts[2], alice.certify(ALICE_UID, revoked_at, sig_type=0x30)]
    if recertified_at:
        uid_sigs.append(alice.certify(ALICE_UID, recertified_at))
    data = b"".join([*parts[:2], *uid_sigs, *parts[3:]])
    if not kept:
        with pytest.raises(KeyRefused, match="no user ID"):
            clean(data)
        return
    result = clean(data)
    assert result.clean.user_ids[0].certification == uid_sigs[-1 if recertified_at else 0]


def test_one_user_id_per_address_the_newest() -> None:
    alice, sub = Signer(), Subkey()
    older, newer = "Alice <alice@example.org>", "Alice B. <ALICE@example.org>"
    key = (alice.packet + user_id(newer) + alice.certify(newer, T0 + 9)
           + user_id(older) + alice.certify(older, T0 + 1)
           + sub.packet + alice.bind(sub, T0 + 2))
    result = clean(key)
    assert result.info.user_ids == (newer,)
    assert result.stats["dropped:duplicate-user-id-for-address"] == 1


def test_expired_self_signature_falls_back_to_an_older_one() -> None:
    alice, _, key = simple_key()
    parts = packets(key)
    expiring = alice.certify(ALICE_UID, T0 + 10, hashed=subpacket(3, (100).to_bytes(4, "big")))
    result = clean(b"".join([*parts[:3], expiring, *parts[3:]]))
    assert result.clean.user_ids[0].certification == parts[2]
    assert result.stats["dropped:expired-self-signature"] == 1


def test_subkeys_need_a_valid_binding_and_keep_their_revocation() -> None:
    alice, sub, key = simple_key()
    mallory = Signer()
    unbound, foreign, revoked = Subkey(T0 + 7), Subkey(T0 + 8), Subkey(T0 + 9)
    data = b"".join([
        key,
        unbound.packet,
        foreign.packet, mallory.signature(0x18, alice.prefix + key_prefix(foreign.body), T0),
        revoked.packet, alice.bind(revoked, T0 + 10), alice.bind(revoked, T0 + 11, 0x28),
    ])
    result = clean(data)
    subs = {s.fingerprint.hex: s for s in result.info.subkeys}
    assert set(subs) == {sub.fingerprint, revoked.fingerprint}
    assert subs[revoked.fingerprint].revoked
    assert result.stats["dropped:subkey-without-valid-binding"] == 2
    # Autocrypt takes the newest usable encryption subkey: not the revoked one.
    keydata = openpgp.autocrypt_keydata(data, ALICE[0], now=NOW)
    assert packets(keydata)[3] == sub.packet


def test_autocrypt_picks_the_newest_unexpired_encryption_subkey() -> None:
    alice, _, key = simple_key()
    later, expired = Subkey(T0 + 50), Subkey(T0 + 60)
    data = b"".join([
        key, later.packet, alice.bind(later, T0 + 51),
        expired.packet, alice.bind(expired, T0 + 61, hashed=subpacket(9, (10).to_bytes(4, "big"))),
    ])
    keydata = packets(openpgp.autocrypt_keydata(data, ALICE[0], now=NOW))
    assert keydata[:3] == packets(key)[:3]
    assert keydata[3] == later.packet
    assert len(keydata) == 5


def test_merge_takes_new_subkeys_and_newest_signatures() -> None:
    alice, sub, key = simple_key()
    parts = packets(key)
    recert = alice.certify(ALICE_UID, T0 + 30)
    added = Subkey(T0 + 31)
    update = b"".join([*parts[:2], recert, *parts[3:], added.packet, alice.bind(added, T0 + 32)])
    for pair in ((key, update), (update, key)):
        merged = openpgp.merge_keys(*pair, ALICE, now=NOW)
        assert merged.clean.user_ids[0].certification == recert
        assert {s.fingerprint.hex for s in merged.info.subkeys} == {sub.fingerprint,
                                                                    added.fingerprint}


# --- limits ---------------------------------------------------------------------------------

def test_subkey_floods() -> None:
    _, sub, key = simple_key()
    duplicated = key + sub.packet * 10_000
    assert clean(duplicated).key == key
    junk = b"".join(new_header(14, 3) + b"\x05" + bytes((i >> 8, i & 0xFF)) for i in range(65))
    with pytest.raises(KeyRefused, match="more than 64 subkeys"):
        clean(key + junk)


def test_oversize_and_odd_signatures_are_dropped() -> None:
    alice, _, key = simple_key()
    parts = packets(key)
    big = alice.certify(ALICE_UID, T0 + 50, hashed=notation(b"n@example.org", b"v" * 200))
    v3 = new_header(2, 5) + b"\x03abcd"
    empty = new_header(2, 0)
    result = clean(b"".join([*parts[:3], big, v3, empty, *parts[3:]]),
                   limits=Limits(max_signature_packet=200))
    assert result.key == key
    assert result.stats["dropped:oversize-signature"] == 1
    assert result.stats["dropped:signature-not-v4"] == 2


# --- signing subkeys need their back-signature (RFC 9580 §5.2.1) ------------------------------

@pytest.mark.parametrize(("back", "flags", "kept", "cross"), [
    ("hashed", 0x02, True, True),
    ("unhashed", 0x02, True, True),
    ("none", 0x02, False, False),
    ("forged", 0x02, False, False),
    ("none", 0x01, False, False),
    ("none", 0x20, True, False),   # authentication only: gpg makes no back-signature
    ("none", 0x0C, True, False),   # encryption only
    ("hashed", 0x0C, True, True),  # proven possession even where not required
])
def test_signing_subkeys_need_a_valid_back_signature(back: str, flags: int, kept: bool,
                                                     cross: bool) -> None:
    alice, signing = Signer(), Signer(T0 + 5)
    key = (alice.packet + user_id(ALICE_UID) + alice.certify(ALICE_UID, T0 + 1)
           + signing.subkey_packet + alice.bind_signing(signing, T0 + 6, back=back,
                                                        flags=flags))
    result = clean(key)
    assert [s.cross_certified for s in result.info.subkeys] == ([cross] if kept else [])
    assert (result.stats["dropped:subkey-without-back-signature"] == 1) is not kept


def test_an_encryption_subkey_is_not_cross_certified() -> None:
    _, _, key = simple_key()
    assert [s.cross_certified for s in clean(key).info.subkeys] == [False]


# --- #11 item 3: a user ID is published only if everyone reads the same single address -----

BOB_AND_ALICE = "Bob Baker <bob@example.org> <alice@example.org>"


def test_a_user_id_with_two_addresses_is_never_published() -> None:
    # GnuPG reads bob@ (the first <...>); we used to read alice@ (the last).
    alice = Signer()
    key = alice.packet + user_id(BOB_AND_ALICE) + alice.certify(BOB_AND_ALICE, T0 + 1)
    for wanted in (ALICE, [Address.parse("bob@example.org")], None):
        with pytest.raises(KeyRefused, match="more than one address"):
            openpgp.clean_key(key, wanted, now=NOW)
    both = key + user_id(ALICE_UID) + alice.certify(ALICE_UID, T0 + 2)
    result = clean(both, None)
    assert result.info.user_ids == (ALICE_UID,)
    assert result.stats["dropped:ambiguous-user-id"] == 1
    assert [d.split(":")[0] for d in result.dropped] == [f"user ID '{BOB_AND_ALICE}'"]


@pytest.mark.parametrize(("text", "kept"), [("alice@example.org", True),
                                            (ALICE_UID, False)])
def test_mailbox_only_publishes_bare_addresses_only(text: str, kept: bool) -> None:
    alice = Signer()
    key = alice.packet + user_id(text) + alice.certify(text, T0 + 1)
    limits = Limits(policy=openpgp.Policy(mailbox_only=True))
    assert clean(key, limits=openpgp.Limits()).info.user_ids == (text,)
    if kept:
        assert clean(key, limits=limits).info.user_ids == (text,)
        return
    with pytest.raises(KeyRefused, match=r"mailbox-only.*--quick-add-uid"):
        clean(key, limits=limits)


# --- #11 item 4: what GnuPG 2.2 or Sequoia would reject is not published --------------------

def critical(kind: int, body: bytes) -> bytes:
    packet = subpacket(kind, body)
    return packet[:1] + bytes((packet[1] | 0x80,)) + packet[2:]


@pytest.mark.parametrize(("extra", "valid"), [
    (critical(27, b"\x03"), True),          # key flags: known to both
    (critical(2 + 0, (T0 + 1).to_bytes(4, "big")), True),
    (critical(28, b"alice@example.org"), False),  # signer's user ID: unknown to gpg 2.2
    (critical(23, b"\x80"), False),         # keyserver preferences: unknown to gpg 2.2
    (critical(40, b"x"), False),            # unassigned
    (critical(20, notation(b"x@example.org", b"1")[2:]), False),  # a critical notation
    (subpacket(40, b"x"), True),            # not critical: ignored
])
def test_a_signature_with_an_unknown_critical_subpacket_is_invalid(extra: bytes,
                                                                   valid: bool) -> None:
    alice = Signer()
    key = alice.packet + user_id(ALICE_UID) + alice.certify(ALICE_UID, T0 + 1, hashed=extra)
    if valid:
        assert clean(key).info.user_ids == (ALICE_UID,)
        return
    with pytest.raises(KeyRefused, match="critical subpacket"):
        clean(key)


def test_an_unknown_critical_subpacket_in_the_unhashed_area_counts_too() -> None:
    alice, sub = Signer(), Subkey(T0 + 5)
    key = (alice.packet + user_id(ALICE_UID) + alice.certify(ALICE_UID, T0 + 1) + sub.packet
           + alice.bind(sub, T0 + 6, unhashed=critical(40, b"x")))
    result = clean(key)
    assert result.info.subkeys == ()
    assert result.stats["dropped:self-signature-critical"] == 1
    assert result.dropped[0].startswith(f"subkey {sub.fingerprint}: its binding signature")


OLD = 1_600_000_000  # 2020-09-13, before the SHA-1 cutoff


@pytest.mark.parametrize(("created", "hash_algorithm", "sha1_before_2023", "valid"), [
    (OLD, 2, False, False),   # Sequoia rejects every SHA-1 self-signature today
    (OLD, 2, True, True),     # GnuPG 2.2 accepts it; the admin may too
    (T0, 2, True, False),     # made after 2023-02-01: nobody should
    (OLD, 1, True, False),    # MD5: never
    (OLD, 10, False, True),
])
def test_weak_hash_self_signatures(created: int, hash_algorithm: int,
                                   sha1_before_2023: bool, valid: bool) -> None:
    alice = Signer(OLD)
    cert = alice.signature(0x13, alice.prefix + uid_prefix(ALICE_UID), created,
                           hashed=subpacket(27, b"\x03"), hash_algorithm=hash_algorithm)
    key = alice.packet + user_id(ALICE_UID) + cert
    limits = Limits(policy=openpgp.Policy(sha1_before_2023=sha1_before_2023))
    if valid:
        assert clean(key, limits=limits).info.user_ids == (ALICE_UID,)
        return
    advice = "gpg --cert-digest-algo SHA256 --quick-set-expire " + alice.fingerprint.hex().upper()
    with pytest.raises(KeyRefused, match=r"uses (SHA-1|MD5).*" + advice + " 2y"):
        clean(key, limits=limits)


def test_a_newer_sha1_self_signature_does_not_hide_the_good_one() -> None:
    alice = Signer()
    sha1 = alice.signature(0x13, alice.prefix + uid_prefix(ALICE_UID), T0 + 9,
                           hashed=subpacket(27, b"\x03"), hash_algorithm=2)
    key = alice.packet + user_id(ALICE_UID) + alice.certify(ALICE_UID, T0 + 1) + sha1
    result = clean(key)
    assert result.info.user_ids == (ALICE_UID,)
    assert result.clean.user_ids[0].signature.created == T0 + 1
    assert result.dropped == ()


def rsa_body(bits: int, created: int = T0) -> bytes:
    """An RSA public key packet body (a real modulus from 1024 bits, `cryptography`'s least)."""
    if bits >= 1024:
        n = rsa.generate_private_key(65537, bits).public_key().public_numbers().n
    else:
        n = int.from_bytes(hashlib.shake_256(b"n").digest(bits // 8), "big") | 1 << (bits - 1) | 1
    return (b"\x04" + created.to_bytes(4, "big") + b"\x01"
            + mpi(n.to_bytes((bits + 7) // 8, "big")) + mpi(b"\x01\x00\x01"))


def ecdsa_body(curve: ec.EllipticCurve, oid: bytes) -> bytes:
    point = ec.generate_private_key(curve).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return b"\x04" + T0.to_bytes(4, "big") + b"\x13" + bytes((len(oid),)) + oid + mpi(point)


@pytest.mark.parametrize(("body", "reason"), [
    (lambda: rsa_body(1024), "RSA-1024 is too weak (minimum 2048 bits): create a new key"),
    (lambda: rsa_body(768), "RSA-768 is too weak"),
    (lambda: rsa_body(512), "RSA-512 is too weak"),
    (lambda: ecdsa_body(ec.BrainpoolP256R1(), bytes.fromhex("2B2403030208010107")),
     "ECDSA on curve brainpoolP256r1 is not accepted"),
    (lambda: b"\x04" + T0.to_bytes(4, "big") + b"\x1b" + bytes(32),
     "Ed25519 keys are not understood by GnuPG 2.2"),
])
def test_weak_primary_keys_are_refused(body: Callable[[], bytes], reason: str) -> None:
    raw = body()
    key = new_header(6, len(raw)) + raw + user_id(ALICE_UID)
    with pytest.raises(KeyRefused, match=re.escape(reason)):
        clean(key)


def test_the_minimum_is_configurable() -> None:
    raw = ecdsa_body(ec.BrainpoolP256R1(), bytes.fromhex("2B2403030208010107"))
    key = new_header(6, len(raw)) + raw
    policy = openpgp.Policy(curves=openpgp.DEFAULT_POLICY.curves | {"brainpoolP256r1"})
    with pytest.raises(KeyRefused, match="no user ID"):
        clean(key, limits=Limits(policy=policy))  # got past the strength check


def test_weak_subkeys_are_left_out_with_a_reason() -> None:
    alice, weak = Signer(), Subkey(T0 + 5)
    weak.body = rsa_body(1024, T0 + 5)
    key = (alice.packet + user_id(ALICE_UID) + alice.certify(ALICE_UID, T0 + 1)
           + weak.packet + alice.bind(weak, T0 + 6))
    result = clean(key)
    assert result.info.subkeys == ()
    assert result.stats["dropped:weak-subkey"] == 1
    assert result.dropped == (
        f"subkey {weak.fingerprint}: RSA-1024 is too weak (minimum 2048 bits): add a new "
        f"subkey (gpg --quick-add-key {alice.fingerprint.hex().upper()} future-default encr)",)
    lenient = Limits(policy=openpgp.Policy(min_rsa_bits=1024))
    assert [s.bits for s in clean(key, limits=lenient).info.subkeys] == [1024]
