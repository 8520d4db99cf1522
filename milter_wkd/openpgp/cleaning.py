"""Cleaning a transferable public key for publication (RFC 9580 §10.1), flood-proof.

One linear scan (`scan`) over the packets (`packets.iter_packets`) decides by packet headers
and issuer subpackets alone what can possibly be kept: third-party certifications (found by
a byte search for the key ID, before any parsing), user attributes, user IDs of other
addresses, trust and unknown packets are dropped on the spot, so a key flooded with 150,000
certifications costs one pass and the memory of what survives. Signatures that name the
key as issuer are verified as they arrive (`material`); only valid ones are kept, the newest
few per component and kind, and a budget of failed verifications bounds what forged "self"
signatures can cost. The second step (`verify_skeleton`) then keeps:

- the primary key, its newest valid direct-key self-signature and every valid revocation
  (a later "retired" must not hide an earlier "compromised");
- for each allowed address exactly ONE user ID: the one with the newest valid
  self-certification, unless a newer valid self-revocation revoked it;
- every subkey with a valid binding: its newest binding and its valid revocations
  (expired and revoked subkeys stay, so that clients holding old copies learn of them);
  a signing-capable one (key flags certify or sign, or no flags and a signing algorithm)
  only with a valid back-signature (0x19, RFC 9580 §5.2.1), which `cross_certified` records.

What GnuPG 2.2 or Sequoia would reject or read differently is not published (`Policy`, from
config [keys] and the domain's mailbox_only): a user ID only if it names one address that
every implementation reads (`values.user_id_address`); a primary key below the minimum
strength or on another curve is refused, such a subkey left out; a self-signature with an
unknown critical subpacket (either area) or a rejected hash (MD5, RIPEMD-160, SHA-3; SHA-1
unless made before 2023-02-01 and allowed) is never a candidate, revocations excepted.
Parts left out for a reason the submitter must act on are named in `CleanKey.dropped`.

Dropped on purpose, and documented in README.md:
- third-party certifications, and with them first-party attestations of third-party
  certifications (1PA3PC, sig type 0x16): they attest signatures we never publish;
- revocations by designated revokers: we cannot verify them without the revoker's key;
- signatures of versions other than 4, signatures without a creation time, and
  self-signatures without an issuer (key ID or fingerprint) subpacket naming the key;
- subkeys of versions other than 4 and subkeys we cannot parse.

Errors: `KeyRefused` with a human reason for every input we will not publish; nothing else
escapes for any input bytes.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from milter_wkd.errors import BadAddress, KeyRefused
from milter_wkd.openpgp import packets as pk
from milter_wkd.openpgp.material import (
    HASH_NAMES,
    PublicKey,
    Signature,
    parse_public_key,
    parse_signature,
    user_id_hash_prefix,
)
from milter_wkd.values import Address, user_id_address

SIG_CERT_TYPES = frozenset({0x10, 0x11, 0x12, 0x13})
SIG_CERT_REVOCATION = 0x30
SIG_SUBKEY_BINDING = 0x18
SIG_SUBKEY_REVOCATION = 0x28
SIG_DIRECT_KEY = 0x1F
SIG_KEY_REVOCATION = 0x20
SIG_ATTESTATION = 0x16
_REVOCATIONS = frozenset({SIG_KEY_REVOCATION, SIG_CERT_REVOCATION, SIG_SUBKEY_REVOCATION})
SIG_PRIMARY_KEY_BINDING = 0x19
# Key flags that make a subkey signing-capable (RFC 9580 §5.2.3.29): certify 0x01, sign 0x02.
# Authentication (0x20) does not: GnuPG makes no back-signature for it and Sequoia asks
# for one only for signing subkeys.
_SIGNING_FLAGS = 0x01 | 0x02

_ALLOWED_TYPES = {
    "key": frozenset({SIG_DIRECT_KEY, SIG_KEY_REVOCATION}),
    "uid": SIG_CERT_TYPES | {SIG_CERT_REVOCATION},
    "subkey": frozenset({SIG_SUBKEY_BINDING, SIG_SUBKEY_REVOCATION}),
}


# Sequoia's standard policy rejects SHA-1 for self-signatures from this date on (its
# SecondPreImageResistantHashCutoffList, Timestamp::Y2023M2). It compares the cutoff with the
# time of evaluation, not of signing: sq 0.27 (sequoia-openpgp 1.12) refuses a SHA-1
# self-signature made in 2022 today.
SHA1_CUTOFF = 1675209600  # 2023-02-01T00:00:00Z
# Hashes GnuPG 2.2 and Sequoia both check for self-signatures (SHA-3 is unknown to gpg 2.2).
_GOOD_HASHES = frozenset({8, 9, 10, 11})
# Curves both GnuPG 2.2 and Sequoia accept. Brainpool is left out: Debian 12's sq (Nettle
# backend) finds no valid binding on brainpool keys gpg makes.
DEFAULT_CURVES = frozenset({"ed25519", "cv25519", "nistp256", "nistp384", "nistp521"})
# Which curves each elliptic-curve algorithm may use (ECDH, ECDSA, EdDSA legacy).
_CURVES_OF = {18: frozenset({"cv25519", "nistp256", "nistp384", "nistp521", "brainpoolP256r1",
                             "brainpoolP384r1", "brainpoolP512r1"}),
              19: frozenset({"nistp256", "nistp384", "nistp521", "brainpoolP256r1",
                             "brainpoolP384r1", "brainpoolP512r1"}),
              22: frozenset({"ed25519"})}


@dataclass(frozen=True, slots=True)
class Policy:
    """What a key must meet to be published (config [keys] and the domain's mailbox-only).

    Keys and signatures that GnuPG 2.2 or Sequoia (sq) would reject are not published: a
    primary key below the minimum is refused; a weak subkey, a user ID or subkey whose only
    self-signatures use a rejected hash or an unknown critical subpacket is left out.
    """

    min_rsa_bits: int = 2048
    min_dsa_bits: int = 2048  # DSA and ElGamal
    curves: frozenset[str] = DEFAULT_CURVES
    # Accept SHA-1 self-signatures made before SHA1_CUTOFF, as GnuPG 2.2 does (Sequoia
    # rejects them all since that date).
    sha1_before_2023: bool = False
    # Publish only user IDs that are a bare address (the WKS policy flag mailbox-only).
    mailbox_only: bool = False


DEFAULT_POLICY = Policy()


def key_weakness(key: PublicKey, policy: Policy) -> str | None:
    """Why GnuPG 2.2 or Sequoia would reject this key's algorithm or size (None: neither)."""
    algo = key.algorithm
    if algo in _CURVES_OF:
        if key.curve not in _CURVES_OF[algo] or key.curve not in policy.curves:
            accepted = ", ".join(sorted(policy.curves & _CURVES_OF[algo]))
            return f"{key.algorithm_name} on curve {key.curve} is not accepted ({accepted} are)"
        return None
    if algo in (1, 2, 3):
        name, minimum = "RSA", policy.min_rsa_bits
    elif algo in (16, 17):
        name, minimum = key.algorithm_name, policy.min_dsa_bits
    else:
        return f"{key.algorithm_name} keys are not understood by GnuPG 2.2"
    if key.bits < minimum:
        return f"{name}-{key.bits} is too weak (minimum {minimum} bits)"
    return None


def signature_problem(sig: Signature, policy: Policy) -> str | None:
    """Why current OpenPGP software would ignore this self-signature (None: it would not)."""
    if sig.unknown_critical is not None:
        return "critical"
    if sig.sig_type in _REVOCATIONS or sig.hash_algorithm in _GOOD_HASHES:
        # Revocations stay whatever their hash: clients must learn of them (Sequoia gives
        # revocations a tolerance for the same reason).
        return None
    if sig.hash_algorithm == 2 and policy.sha1_before_2023 and sig.created < SHA1_CUTOFF:
        return None
    return "sha1" if sig.hash_algorithm == 2 else "hash"


# gpg 2.2 renews a self-signature of a DSA, ECDSA or EdDSA key with the hash of the old one
# (g10/keyedit.c update_keysig_packet) unless told otherwise.
_REFRESH = "gpg --cert-digest-algo SHA256 --quick-set-expire"


def _problem_text(problem: str, sig_hash: int) -> str:
    if problem == "critical":
        return ("carries a critical subpacket that GnuPG or Sequoia does not understand "
                "(RFC 9580 5.2.3.7), so they reject it")
    if problem == "sha1":
        return ("uses SHA-1 (current OpenPGP software, e.g. Sequoia since 2023-02-01, "
                "rejects it)")
    name = HASH_NAMES.get(sig_hash, f"hash {sig_hash}")
    return f"uses {name}, which GnuPG 2.2 or Sequoia rejects"


# The largest key (armored or binary, as given) that is read at all: it takes a 64 MiB
# flooded key. [keys] max_input_bytes defaults to it.
MAX_INPUT_BYTES = 90 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard bounds on what a key may cost us. Defaults take a 64 MiB flooded key."""

    max_input: int = MAX_INPUT_BYTES
    max_signature_packet: int = 16 * 1024
    max_user_id: int = 2048
    max_candidates: int = 8
    max_user_ids: int = 64
    max_subkeys: int = 64
    max_invalid_signatures: int = 100
    policy: Policy = DEFAULT_POLICY


DEFAULT_LIMITS = Limits()
_Entry = tuple[int, int, bytes, Signature]


@dataclass(slots=True)
class _Candidates:
    """The newest verified self-signatures of one component, bounded in number.

    Revocations and the other signatures are kept apart, so that newer bindings never push
    a revocation out (a key revocation stays in force whatever comes after it).
    """

    limit: int
    heaps: tuple[list[_Entry], list[_Entry]] = field(default_factory=lambda: ([], []))
    counter: int = 0

    def _heap(self, sig: Signature) -> list[_Entry]:
        return self.heaps[sig.sig_type in _REVOCATIONS]

    def rejects(self, raw: bytes, sig: Signature) -> str | None:
        """Why this signature need not even be verified (None: it would be kept)."""
        heap = self._heap(sig)
        if any(entry[2] == raw for entry in heap):
            return "duplicate-signature"
        if len(heap) >= self.limit and sig.created <= heap[0][0]:
            return "superseded-self-signature"
        return None

    def add(self, raw: bytes, sig: Signature) -> None:
        """Keep a verified signature (after `rejects` said None)."""
        self.counter += 1
        heap = self._heap(sig)
        entry = (sig.created, self.counter, raw, sig)
        if len(heap) < self.limit:
            heapq.heappush(heap, entry)
        else:
            heapq.heappushpop(heap, entry)

    def newest_first(self) -> list[tuple[bytes, Signature]]:
        entries = sorted([*self.heaps[0], *self.heaps[1]], reverse=True)
        return [(raw, sig) for _, _, raw, sig in entries]


@dataclass(slots=True)
class _Component:
    kind: str  # "uid" or "subkey"
    raw: bytes
    body: bytes
    prefix: bytes  # what its signatures hash before their trailer
    candidates: _Candidates
    key: PublicKey | None = None
    address: Address | None = None
    # Why verified self-signatures were rejected (signature_problem), with their hash.
    problems: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Skeleton:
    """What the first pass keeps: the primary key, its components and their VERIFIED
    self-signatures (the newest few of each kind)."""

    primary_raw: bytes
    primary: PublicKey
    key_candidates: _Candidates
    components: dict[tuple[str, bytes], _Component]
    stats: Counter[str]
    # Parts left out for a reason the submitter must hear: label -> human reason.
    notes: dict[str, str] = field(default_factory=dict)
    policy: Policy = DEFAULT_POLICY


def _signature_owner_check(
    data: bytes, ref: tuple[int, int, int, int], key_id: bytes, primary: PublicKey,
    allowed_types: frozenset[int], stats: Counter[str], limits: Limits,
) -> tuple[bytes, Signature] | None:
    """Decide, cheaply and in this order, whether a signature packet can be a self-signature.

    `scan` inlines the first two checks for speed; they are repeated here so that this
    function stands on its own.
    """
    _, start, body_start, end = ref
    if body_start >= end or data[body_start] != 4:
        stats["dropped:signature-not-v4"] += 1
        return None
    # A signature that `issued_by` can accept carries an issuer key ID subpacket equal to
    # key_id or an issuer fingerprint subpacket ending with it, so its body contains key_id:
    # one C-level search rejects every other issuer before parsing. The rare false positive
    # (key_id inside a notation or an MPI) is parsed and dropped below.
    if data.find(key_id, body_start, end) < 0:
        stats["dropped:third-party-signature"] += 1
        return None
    if end - start > limits.max_signature_packet:
        stats["dropped:oversize-signature"] += 1
        return None
    body = data[body_start:end]
    try:
        sig = parse_signature(body)
    except KeyRefused:
        stats["dropped:malformed-signature"] += 1
        return None
    if not sig.issued_by(primary.fingerprint):
        stats["dropped:third-party-signature"] += 1
        return None
    if sig.sig_type == SIG_ATTESTATION:
        stats["dropped:attestation-signature"] += 1
        return None
    if sig.sig_type not in allowed_types:
        stats["dropped:misplaced-signature"] += 1
        return None
    return data[start:end], sig


@dataclass(slots=True)
class _Verifier:
    """Verifies self-signatures as the scan meets them, with a budget for failures.

    Verifying on arrival (instead of after the scan) means forged "self" signatures (an
    issuer subpacket is no proof) can never push the real ones out of a component's
    candidates; the budget bounds what forgeries can cost.
    """

    primary: PublicKey
    limit: int
    stats: Counter[str]
    policy: Policy = DEFAULT_POLICY
    failures: int = 0

    def offer(self, target: _Candidates, prefix: bytes, raw: bytes, sig: Signature,
              problems: dict[str, int] | None = None) -> None:
        reason = target.rejects(raw, sig)
        if reason is not None:
            self.stats["dropped:" + reason] += 1
            return
        # Cheap and before the cryptography: what clients would ignore is never a candidate.
        problem = signature_problem(sig, self.policy)
        if problem is not None:
            self.stats[f"dropped:self-signature-{problem}"] += 1
            if problems is not None:
                problems.setdefault(problem, sig.hash_algorithm)
            return
        if not self.primary.verify(sig, prefix):
            self.stats["dropped:invalid-self-signature"] += 1
            self.failures += 1
            if self.failures > self.limit:
                raise KeyRefused(
                    f"more than {self.limit} self-signatures fail verification "
                    "(forged or corrupt)")
            return
        target.add(raw, sig)


def scan(data: bytes, addresses: Iterable[Address] | None, limits: Limits = DEFAULT_LIMITS,
         ) -> Skeleton:
    """First pass: frame the packets and keep only what could be published.

    Self-signatures are verified here, as they arrive. `addresses` None keeps user IDs of
    every address (for inspection and merging).
    """
    if len(data) > limits.max_input:
        raise KeyRefused(f"key is {len(data)} octets, over the limit of {limits.max_input}")
    if pk.looks_armored(data):
        label, data = pk.dearmor(data)
        if label == pk.ARMOR_PRIVATE_KEY:
            raise KeyRefused("secret key material: refusing a private key block")
        if label != pk.ARMOR_PUBLIC_KEY:
            raise KeyRefused(f"armor label is {label!r}, not a public key block")
    if not data:
        raise KeyRefused("empty input")
    wanted = None if addresses is None else {a.key for a in addresses}
    stats: Counter[str] = Counter()
    packets = pk.frames(data)
    first_tag, _, first_body, first_end = next(packets)
    if first_tag in (pk.TAG_SECRET_KEY, pk.TAG_SECRET_SUBKEY):
        raise KeyRefused("secret key material: refusing a secret key")
    if first_tag != pk.TAG_PUBLIC_KEY:
        raise KeyRefused(f"input does not start with a public key packet (type {first_tag})")
    primary = parse_public_key(data[first_body:first_end])
    if not primary.can_sign:
        raise KeyRefused(f"primary key algorithm {primary.algorithm_name} cannot certify")
    policy = limits.policy
    weak = key_weakness(primary, policy)
    if weak is not None:
        raise KeyRefused(f"{weak}: create a new key (e.g. gpg --quick-gen-key ADDRESS "
                         "future-default)")
    if not primary.can_verify:
        raise KeyRefused(f"unsupported primary key: {primary.algorithm_name} {primary.curve}")
    fpr = primary.fingerprint.hex().upper()
    notes: dict[str, str] = {}
    key_id = primary.key_id
    key_prefix = primary.hash_prefix()
    verifier = _Verifier(primary, limits.max_invalid_signatures, stats, policy)
    key_candidates = _Candidates(limits.max_candidates)
    components: dict[tuple[str, bytes], _Component] = {}
    current: _Component | None = None
    current_kind = "key"  # "key", "uid", "subkey" or "skip"
    uid_count = subkey_count = 0
    # Per-packet counters of the hot path, added to stats at the end.
    on_dropped = third_party = 0
    find = data.find
    for ref in packets:
        tag, start, body_start, end = ref
        if tag == pk.TAG_SIGNATURE:
            if current_kind == "skip":
                on_dropped += 1
                continue
            if body_start < end and data[body_start] == 4 and find(key_id, body_start, end) < 0:
                third_party += 1
                continue
            found = _signature_owner_check(
                data, ref, key_id, primary, _ALLOWED_TYPES[current_kind], stats, limits)
            if found is not None:
                if current is None:
                    verifier.offer(key_candidates, key_prefix, *found)
                else:
                    verifier.offer(current.candidates, current.prefix, *found,
                                   current.problems)
        elif tag == pk.TAG_USER_ID:
            current, current_kind = None, "skip"
            if end - body_start > limits.max_user_id:
                stats["dropped:oversize-user-id"] += 1
                continue
            body = data[body_start:end]
            ident = ("uid", body)
            if ident not in components:
                address = _wanted_address(body, wanted, stats, notes, fpr, policy)
                if address is None:
                    continue
                uid_count += 1
                if uid_count > limits.max_user_ids:
                    stats["dropped:excess-user-id"] += 1
                    continue
                components[ident] = _Component(
                    "uid", data[start:end], body,
                    key_prefix + user_id_hash_prefix(body),
                    _Candidates(limits.max_candidates), address=address)
            current, current_kind = components[ident], "uid"
        elif tag == pk.TAG_PUBLIC_SUBKEY:
            current, current_kind = None, "skip"
            body = data[body_start:end]
            ident = ("subkey", body)
            if ident not in components:
                # Unusable ones count too, so that a flood of them costs little.
                subkey_count += 1
                if subkey_count > limits.max_subkeys:
                    raise KeyRefused(f"more than {limits.max_subkeys} subkeys")
                try:
                    subkey = parse_public_key(body)
                except KeyRefused:
                    stats["dropped:unusable-subkey"] += 1
                    continue
                weak = key_weakness(subkey, policy)
                if weak is not None:
                    stats["dropped:weak-subkey"] += 1
                    notes[f"subkey {subkey.fingerprint.hex().upper()}"] = (
                        f"{weak}: add a new subkey (gpg --quick-add-key {fpr} "
                        "future-default encr)")
                    continue
                components[ident] = _Component(
                    "subkey", data[start:end], body, key_prefix + subkey.hash_prefix(),
                    _Candidates(limits.max_candidates), key=subkey)
            current, current_kind = components[ident], "subkey"
        elif tag == pk.TAG_USER_ATTRIBUTE:
            current, current_kind = None, "skip"
            stats["dropped:user-attribute"] += 1
        elif tag in (pk.TAG_SECRET_KEY, pk.TAG_SECRET_SUBKEY):
            raise KeyRefused("secret key material inside the key")
        elif tag == pk.TAG_PUBLIC_KEY:
            raise KeyRefused("more than one key in the input; submit one key at a time")
        elif tag in (pk.TAG_COMPRESSED, pk.TAG_SED, pk.TAG_SEIPD, pk.TAG_AEAD,
                     pk.TAG_PKESK, pk.TAG_SKESK):
            raise KeyRefused(f"compressed or encrypted packet (type {tag}) inside a key")
        elif tag in (pk.TAG_LITERAL, pk.TAG_ONE_PASS):
            raise KeyRefused(f"message packet (type {tag}) inside a key")
        elif tag == pk.TAG_TRUST:
            stats["dropped:trust-packet"] += 1
        else:
            stats["dropped:unknown-packet"] += 1
    if on_dropped:
        stats["dropped:signature-on-dropped-component"] += on_dropped
    if third_party:
        stats["dropped:third-party-signature"] += third_party
    return Skeleton(data[:first_end], primary, key_candidates, components, stats, notes,
                    policy)


# A revocation certificate is one signature packet of a few hundred octets (gpg
# --gen-revoke and OpenPGP.js write one); anything much larger is not one.
MAX_CERTIFICATE = 64 * 1024
MAX_CERTIFICATE_SIGNATURES = 4


def lone_signatures(data: bytes) -> list[tuple[bytes, bytes]] | None:
    """The signature packets, each as (packet, body), of input that holds signatures and
    nothing else: a revocation certificate as gpg --gen-revoke and OpenPGP.js's
    generateKey write it (a "PGP PUBLIC KEY BLOCK" holding one signature packet; gpg's
    openpgp-revocs.d copy has text before it and a colon before the armor line), or the
    same as a "PGP SIGNATURE" block or binary. None when the input holds anything else (a
    key: cleaned by `scan`). KeyRefused for oversize input, bad armor or framing."""
    if len(data) > MAX_CERTIFICATE:
        return None
    if pk.looks_armored(data):
        label, data = pk.dearmor(data)
        if label not in (pk.ARMOR_PUBLIC_KEY, pk.ARMOR_SIGNATURE):
            return None
    found: list[tuple[bytes, bytes]] = []
    for tag, start, body_start, end in pk.frames(data):
        if tag != pk.TAG_SIGNATURE or len(found) >= MAX_CERTIFICATE_SIGNATURES:
            return None
        found.append((data[start:end], data[body_start:end]))
    return found or None


def revocation_problem(sig: Signature, primary: PublicKey, policy: Policy,
                       now: int) -> str | None:
    """Why a signature uploaded alone cannot revoke this primary key, in plain words for
    its owner (None: it is a valid key revocation by this key)."""
    fpr = primary.fingerprint.hex().upper()
    if sig.sig_type != SIG_KEY_REVOCATION:
        return (f"this is not a revocation of a whole key (signature type 0x{sig.sig_type:02X}"
                f", a key revocation is 0x{SIG_KEY_REVOCATION:02X})")
    if sig.issuer_fingerprint is None and sig.issuer_key_id is None:
        return "the revocation does not name the key that made it"
    if not sig.issued_by(primary.fingerprint):
        issuer = (sig.issuer_fingerprint or sig.issuer_key_id or b"").hex().upper()
        return (f"this revocation is for another key ({issuer}), not for your published "
                f"key {fpr}")
    if signature_problem(sig, policy) is not None:
        return ("the revocation carries a critical subpacket that GnuPG or Sequoia does "
                "not understand, so they would ignore it")
    if not primary.verify(sig, primary.hash_prefix()):
        return (f"the revocation's signature does not verify against your key {fpr} (it "
                "was changed, or made by another key with the same key ID)")
    expires = sig.sig_expires
    if expires is not None and expires <= now:
        return "the revocation has expired"
    return None


def add_revocations(skeleton: Skeleton, signatures: Iterable[tuple[bytes, bytes]],
                    now: int) -> Skeleton:
    """A stored key's skeleton with key revocations uploaded alone (`lone_signatures`)
    joined to its own: each must be a valid key revocation made by its primary key, else
    KeyRefused saying why in plain words (nothing is joined then)."""
    checked: list[tuple[bytes, Signature]] = []
    for raw, body in signatures:
        try:
            sig = parse_signature(body)
        except KeyRefused as exc:
            raise KeyRefused(f"the revocation cannot be read: {exc.reason}") from None
        problem = revocation_problem(sig, skeleton.primary, skeleton.policy, now)
        if problem is not None:
            raise KeyRefused(problem)
        checked.append((raw, sig))
    for raw, sig in checked:
        if skeleton.key_candidates.rejects(raw, sig) is None:
            skeleton.key_candidates.add(raw, sig)
    return skeleton


def _quoted(text: str) -> str:
    shown = text if len(text) <= 80 else text[:77] + "..."
    return "user ID '" + shown.encode("unicode_escape").decode("ascii") + "'"


def _wanted_address(body: bytes, wanted: set[str] | None, stats: Counter[str],
                    notes: dict[str, str], fpr: str, policy: Policy) -> Address | None:
    """The address of a user ID packet body if it may be published, else None (counted)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        stats["dropped:user-id-not-utf8"] += 1
        return None
    try:
        address = user_id_address(text)
    except BadAddress as exc:
        if "@" not in text:
            stats["dropped:user-id-without-address"] += 1
        else:
            # We cannot tell whose it is, so whoever submits it hears why.
            stats["dropped:ambiguous-user-id"] += 1
            notes[_quoted(text)] = (f"{exc.reason}: make one user ID per address, "
                                    f"'Name <address>' (gpg --quick-add-uid {fpr})")
        return None
    if wanted is not None and address.key not in wanted:
        stats["dropped:user-id-other-address"] += 1
        return None
    if policy.mailbox_only and text != str(address):
        stats["dropped:user-id-not-mailbox-only"] += 1
        notes[_quoted(text)] = (
            "this domain publishes only user IDs that are a bare address (mailbox-only): "
            f"add one with gpg --quick-add-uid {fpr} {address}")
        return None
    return address


def merge_skeletons(old: Skeleton, new: Skeleton, limits: Limits = DEFAULT_LIMITS) -> Skeleton:
    """Union of two copies of the same key (signatures already verified by `scan`); the
    second pass then picks the newest."""
    if old.primary.fingerprint != new.primary.fingerprint:
        raise KeyRefused("the update is a different key (fingerprints differ)")
    merged = Skeleton(old.primary_raw, old.primary, _Candidates(limits.max_candidates), {},
                      old.stats + new.stats, {**old.notes, **new.notes}, limits.policy)

    def offer(target: _Candidates, raw: bytes, sig: Signature) -> None:
        if target.rejects(raw, sig) is None:
            target.add(raw, sig)

    for source in (old, new):
        for raw, sig in source.key_candidates.newest_first():
            offer(merged.key_candidates, raw, sig)
        for ident, comp in source.components.items():
            target = merged.components.get(ident)
            if target is None:
                target = _Component(comp.kind, comp.raw, comp.body, comp.prefix,
                                    _Candidates(limits.max_candidates), comp.key, comp.address)
                merged.components[ident] = target
            target.problems.update(comp.problems)
            for raw, sig in comp.candidates.newest_first():
                offer(target.candidates, raw, sig)
    return merged


@dataclass(frozen=True, slots=True)
class CleanUserID:
    raw: bytes
    text: str
    address: Address
    certification: bytes
    signature: Signature


Signed = tuple[bytes, Signature]  # a signature packet as found, and its meaning


@dataclass(frozen=True, slots=True)
class CleanSubkey:
    raw: bytes
    key: PublicKey
    binding: bytes
    signature: Signature
    revocations: tuple[Signed, ...]  # every valid one, newest first
    # The binding carries a valid primary-key binding signature (0x19) made by the subkey:
    # whoever bound it held the subkey's secret.
    cross_certified: bool = False

    @property
    def revocation(self) -> bytes | None:
        return self.revocations[0][0] if self.revocations else None


@dataclass(frozen=True, slots=True)
class CleanKey:
    """A verified, publishable key: the packets to emit, in order, and their meaning."""

    primary_raw: bytes
    primary: PublicKey
    revocations: tuple[Signed, ...]  # every valid one (hard and soft ones differ), newest first
    direct: bytes | None
    direct_signature: Signature | None
    user_ids: tuple[CleanUserID, ...]
    subkeys: tuple[CleanSubkey, ...]
    stats: Counter[str]
    # Each part left out that the submitter must hear of: "<part>: <why and what to do>".
    dropped: tuple[str, ...] = ()

    @property
    def revocation(self) -> bytes | None:
        return self.revocations[0][0] if self.revocations else None

    def to_bytes(self) -> bytes:
        parts = [self.primary_raw, *(raw for raw, _ in self.revocations)]
        if self.direct is not None:
            parts.append(self.direct)
        for uid in self.user_ids:
            parts += [uid.raw, uid.certification]
        for sub in self.subkeys:
            parts += [sub.raw, sub.binding, *(raw for raw, _ in sub.revocations)]
        return b"".join(parts)


def _all_valid(
    candidates: list[Signed], types: frozenset[int], now: int, stats: Counter[str],
) -> tuple[Signed, ...]:
    """Every unexpired signature of the given types, newest first."""
    found: list[Signed] = []
    for raw, sig in candidates:
        if sig.sig_type not in types:
            continue
        expires = sig.sig_expires
        if expires is not None and expires <= now:
            stats["dropped:expired-self-signature"] += 1
            continue
        found.append((raw, sig))
    return tuple(found)


def _newest_valid(
    candidates: list[tuple[bytes, Signature]], types: frozenset[int], now: int,
    stats: Counter[str],
) -> tuple[bytes, Signature] | None:
    """The newest unexpired signature of the given types (all candidates are verified)."""
    found = _all_valid(candidates, types, now, stats)
    return found[0] if found else None


def _signing_capable(key: PublicKey, binding: Signature) -> bool:
    """Whether a subkey may sign per its binding (no key flags: whatever its algorithm can)."""
    flags = binding.key_flags
    return key.can_sign if flags is None else bool(flags & _SIGNING_FLAGS)


def _back_signed(key: PublicKey, prefix: bytes, binding: Signature, now: int,
                 policy: Policy) -> bool:
    """True when the binding embeds a valid primary-key binding signature (RFC 9580 §5.2.1:
    type 0x19, made by the subkey over the primary key and the subkey)."""
    if binding.embedded is None or not key.can_verify:
        return False
    try:
        back = parse_signature(binding.embedded)
    except KeyRefused:
        return False
    if back.sig_type != SIG_PRIMARY_KEY_BINDING or signature_problem(back, policy) is not None:
        return False
    expires = back.sig_expires
    if expires is not None and expires <= now:
        return False
    return key.verify(back, prefix)


def verify_skeleton(skeleton: Skeleton, now: int | None = None) -> CleanKey:
    """Second step: choose what is published among the verified candidates."""
    now = int(time.time()) if now is None else now
    stats = skeleton.stats
    primary = skeleton.primary
    key_sigs = skeleton.key_candidates.newest_first()
    revocations = _all_valid(key_sigs, frozenset({SIG_KEY_REVOCATION}), now, stats)
    direct = _newest_valid(key_sigs, frozenset({SIG_DIRECT_KEY}), now, stats)
    best_by_address: dict[str, CleanUserID] = {}
    subkeys: list[CleanSubkey] = []
    notes = dict(skeleton.notes)
    fpr = primary.fingerprint.hex().upper()
    for comp in skeleton.components.values():
        candidates = comp.candidates.newest_first()
        if comp.kind == "uid":
            if comp.address is None:  # set for every uid component by scan()
                continue
            cert = _newest_valid(candidates, SIG_CERT_TYPES, now, stats)
            if cert is None:
                stats["dropped:user-id-without-valid-self-signature"] += 1
                for problem, hash_algo in comp.problems.items():
                    notes[_quoted(comp.body.decode("utf-8"))] = (
                        f"its self-signature {_problem_text(problem, hash_algo)}: refresh it "
                        f"with {_REFRESH} {fpr} 2y")
                continue
            revoked = _newest_valid(candidates,
                                    frozenset({SIG_CERT_REVOCATION}), now, stats)
            if revoked is not None and revoked[1].created >= cert[1].created:
                stats["dropped:revoked-user-id"] += 1
                continue
            entry = CleanUserID(comp.raw, comp.body.decode("utf-8"), comp.address,
                                cert[0], cert[1])
            previous = best_by_address.get(comp.address.key)
            if previous is not None:
                stats["dropped:duplicate-user-id-for-address"] += 1
                if previous.signature.created >= entry.signature.created:
                    continue
            best_by_address[comp.address.key] = entry
        else:
            if comp.key is None:  # set for every subkey component by scan()
                continue
            binding = _newest_valid(candidates,
                                    frozenset({SIG_SUBKEY_BINDING}), now, stats)
            label = f"subkey {comp.key.fingerprint.hex().upper()}"
            if binding is None:
                stats["dropped:subkey-without-valid-binding"] += 1
                for problem, hash_algo in comp.problems.items():
                    notes[label] = (
                        f"its binding signature {_problem_text(problem, hash_algo)}: refresh "
                        f"it with {_REFRESH} {fpr} 2y '*'")
                continue
            cross_certified = _back_signed(comp.key, comp.prefix, binding[1], now,
                                           skeleton.policy)
            if not cross_certified and _signing_capable(comp.key, binding[1]):
                stats["dropped:subkey-without-back-signature"] += 1
                notes[label] = ("it can sign but carries no valid back-signature (RFC 9580 "
                                "5.2.1) proving the subkey's holder agreed: add signing "
                                f"subkeys with gpg --quick-add-key {fpr} future-default sign")
                continue
            sub_revs = _all_valid(candidates, frozenset({SIG_SUBKEY_REVOCATION}), now, stats)
            subkeys.append(CleanSubkey(comp.raw, comp.key, binding[0], binding[1], sub_revs,
                                       cross_certified))
    if not best_by_address:
        # What the submitter must fix comes first: an SMTP reply carries 300 characters.
        why = [f"{part}: {reason}" for part, reason in notes.items()
               if part.startswith("user ID")]
        raise KeyRefused("; ".join(why) if why else
                         "no user ID with a valid self-signature for any allowed address")
    user_ids = tuple(best_by_address.values())
    stats["kept:user-id"] = len(user_ids)
    stats["kept:subkey"] = len(subkeys)
    stats["kept:self-signature"] = (
        len(user_ids) + sum(1 + len(s.revocations) for s in subkeys)
        + len(revocations) + (direct is not None))
    return CleanKey(
        skeleton.primary_raw, primary,
        revocations,
        direct[0] if direct else None, direct[1] if direct else None,
        user_ids, tuple(subkeys), stats,
        tuple(f"{part}: {reason}" for part, reason in notes.items()))
