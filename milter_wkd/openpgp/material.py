"""Public key and signature packets (RFC 9580 §5.2, §5.5), parsed and verified with
`cryptography`.

Only v4 keys and v4 signatures are handled (pgpy 0.6, and with it our WKS messages, knows no
v5/v6). Supported for verification: RSA, DSA, ECDSA (NIST and Brainpool curves), EdDSA
(legacy Ed25519) and the RFC 9580 Ed25519/Ed448 algorithms; ElGamal, ECDH, X25519 and X448
subkeys are understood for metadata. Anything else is reported by name, never guessed.

Why not pgpy here: its PGPKey.verify refuses expired and revoked keys and warns on every
call, and its lower layers are private. The packets we verify are the ones we already framed.

Errors: malformed material raises `KeyRefused`; a signature that does not verify returns False.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from milter_wkd.errors import KeyRefused

ALGORITHM_NAMES = {
    1: "RSA", 2: "RSA-E", 3: "RSA-S", 16: "ElGamal", 17: "DSA", 18: "ECDH", 19: "ECDSA",
    20: "ElGamal-old", 22: "EdDSA", 25: "X25519", 26: "X448", 27: "Ed25519", 28: "Ed448",
}
_RSA = frozenset({1, 3})
SIGNING_ALGORITHMS = frozenset({1, 3, 17, 19, 22, 27, 28})
ENCRYPTION_ALGORITHMS = frozenset({1, 2, 16, 18, 25, 26})

# Curve OIDs (DER contents) -> (name, bits, cryptography curve or None for Edwards/Montgomery).
_CURVES: dict[bytes, tuple[str, int, ec.EllipticCurve | None]] = {
    bytes.fromhex("2A8648CE3D030107"): ("nistp256", 256, ec.SECP256R1()),
    bytes.fromhex("2B81040022"): ("nistp384", 384, ec.SECP384R1()),
    bytes.fromhex("2B81040023"): ("nistp521", 521, ec.SECP521R1()),
    bytes.fromhex("2B2403030208010107"): ("brainpoolP256r1", 256, ec.BrainpoolP256R1()),
    bytes.fromhex("2B240303020801010B"): ("brainpoolP384r1", 384, ec.BrainpoolP384R1()),
    bytes.fromhex("2B240303020801010D"): ("brainpoolP512r1", 512, ec.BrainpoolP512R1()),
    bytes.fromhex("2B06010401DA470F01"): ("ed25519", 255, None),
    bytes.fromhex("2B060104019755010501"): ("cv25519", 255, None),
    bytes.fromhex("2B6570"): ("ed448", 448, None),
    bytes.fromhex("2B656F"): ("x448", 448, None),
}

# Signatures found valid. A submitted key is cleaned twice (for all its user IDs, then
# for its owner's) and an ed25519 check costs more than all the rest of cleaning a small
# key. Only successes are kept, so a flood of bad signatures cannot evict them.
_VALID: set[tuple[bytes, bytes, bytes]] = set()
_MAX_VALID = 4096

_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    2: hashes.SHA1, 8: hashes.SHA256, 9: hashes.SHA384, 10: hashes.SHA512, 11: hashes.SHA224,
    12: hashes.SHA3_256, 14: hashes.SHA3_512,
}
HASH_NAMES = {1: "MD5", 2: "SHA1", 3: "RIPEMD160", 8: "SHA256", 9: "SHA384", 10: "SHA512",
              11: "SHA224", 12: "SHA3-256", 14: "SHA3-512"}


class _Reader:
    """A bounds-checked cursor over one packet body."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, count: int) -> bytes:
        if count < 0 or self.pos + count > len(self.data):
            raise KeyRefused(f"truncated {self.what}")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def mpi(self) -> bytes:
        bits = int.from_bytes(self.take(2), "big")
        return self.take((bits + 7) // 8)

    def short_field(self) -> bytes:
        return self.take(self.byte())


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A v4 public key or subkey packet body, parsed."""

    body: bytes
    version: int
    created: int
    algorithm: int
    bits: int
    curve: str | None
    fingerprint: bytes
    _verifier: Any = field(repr=False, compare=False)

    @property
    def key_id(self) -> bytes:
        return self.fingerprint[-8:]

    @property
    def algorithm_name(self) -> str:
        return ALGORITHM_NAMES.get(self.algorithm, f"algorithm {self.algorithm}")

    @property
    def can_sign(self) -> bool:
        return self.algorithm in SIGNING_ALGORITHMS

    @property
    def can_verify(self) -> bool:
        """True when we can check signatures made by this key."""
        return self._verifier is not None

    @property
    def can_encrypt(self) -> bool:
        return self.algorithm in ENCRYPTION_ALGORITHMS

    def hash_prefix(self) -> bytes:
        """What a v4 signature over this key hashes for it (RFC 9580 §5.2.4)."""
        return b"\x99" + len(self.body).to_bytes(2, "big") + self.body

    def verify(self, signature: Signature, signed_data: bytes) -> bool:
        """True when signature (made by this key) is valid over signed_data + its trailer."""
        hash_class = _HASHES.get(signature.hash_algorithm)
        if hash_class is None or self._verifier is None or not signature.mpis:
            return False
        if signature.algorithm != self.algorithm and not (
                signature.algorithm in _RSA and self.algorithm in _RSA):
            return False
        digest_obj = hashes.Hash(hash_class())
        digest_obj.update(signed_data)
        digest_obj.update(signature.hashed_trailer)
        digest = digest_obj.finalize()
        if digest[:2] != signature.left16:
            return False
        # The key, the whole signature packet and the digest decide the answer.
        known = (self.body, signature.body, digest)
        if known in _VALID:
            return True
        try:
            valid = bool(self._verifier(signature, digest, hash_class()))
        except (InvalidSignature, ValueError, UnsupportedAlgorithm, TypeError, OverflowError,
                IndexError):
            return False
        if valid:
            if len(_VALID) >= _MAX_VALID:
                _VALID.clear()
            _VALID.add(known)
        return valid


def parse_public_key(body: bytes) -> PublicKey:
    """Parse a public key or subkey packet body; refuses versions other than 4."""
    reader = _Reader(body, "public key packet")
    version = reader.byte()
    if version != 4:
        detail = {2: "v2/v3 keys are obsolete", 3: "v2/v3 keys are obsolete",
                  5: "v5 keys (LibrePGP) are not supported",
                  6: "v6 keys (RFC 9580) are not supported"}.get(version, "unknown version")
        raise KeyRefused(f"unsupported key version {version}: {detail}")
    created = int.from_bytes(reader.take(4), "big")
    algorithm = reader.byte()
    curve: str | None = None
    verifier: Any = None
    bits = 0
    if algorithm in (1, 2, 3):
        n, e = reader.mpi(), reader.mpi()
        n_int = int.from_bytes(n, "big")
        bits = n_int.bit_length()
        verifier = _rsa_verifier(n_int, int.from_bytes(e, "big"))
    elif algorithm == 17:
        p, q, g, y = (int.from_bytes(reader.mpi(), "big") for _ in range(4))
        bits = p.bit_length()
        verifier = _dsa_verifier(p, q, g, y)
    elif algorithm in {16, 20}:
        p_int = int.from_bytes(reader.mpi(), "big")
        reader.mpi()
        reader.mpi()
        bits = p_int.bit_length()
    elif algorithm in (18, 19, 22):
        oid = reader.short_field()
        point = reader.mpi()
        curve_name, bits, ec_curve = _CURVES.get(oid, (f"oid {oid.hex()}", 0, None))
        curve = curve_name
        if algorithm == 18:
            reader.short_field()  # KDF parameters
        elif algorithm == 19 and ec_curve is not None:
            verifier = _ecdsa_verifier(ec_curve, point)
        elif algorithm == 22 and curve_name == "ed25519":
            if len(point) != 33 or point[0] != 0x40:
                raise KeyRefused("malformed EdDSA public key point")
            verifier = _ed25519_verifier(point[1:])
    elif algorithm in (25, 26, 27, 28):
        size = {25: 32, 26: 56, 27: 32, 28: 57}[algorithm]
        raw = reader.take(size)
        bits = {25: 255, 26: 448, 27: 255, 28: 448}[algorithm]
        if algorithm == 27:
            verifier = _ed25519_verifier(raw, native=True)
        elif algorithm == 28:
            verifier = _ed448_verifier(raw)
    else:
        # Unknown algorithms are carried (their material is opaque) but never verify.
        reader.pos = len(body)
    if reader.pos != len(body):
        raise KeyRefused("trailing data in public key packet")
    fingerprint = hashlib.sha1(  # noqa: S324 — the v4 fingerprint is SHA-1 by definition
        b"\x99" + len(body).to_bytes(2, "big") + body
    ).digest()
    return PublicKey(body, version, created, algorithm, bits, curve, fingerprint, verifier)


def _rsa_verifier(n: int, e: int) -> Any:
    try:
        key = rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError:
        return None

    def verify(sig: Signature, digest: bytes, algo: hashes.HashAlgorithm) -> bool:
        value = sig.mpis[0].rjust(key.key_size // 8 + (key.key_size % 8 > 0), b"\0")
        key.verify(value, digest, padding.PKCS1v15(), Prehashed(algo))
        return True

    return verify


def _dsa_verifier(p: int, q: int, g: int, y: int) -> Any:
    try:
        key = dsa.DSAPublicNumbers(y, dsa.DSAParameterNumbers(p, q, g)).public_key()
    except (ValueError, UnsupportedAlgorithm):
        return None

    def verify(sig: Signature, digest: bytes, algo: hashes.HashAlgorithm) -> bool:
        r, s = (int.from_bytes(m, "big") for m in sig.mpis[:2])
        key.verify(encode_dss_signature(r, s), digest, Prehashed(algo))
        return True

    return verify


def _ecdsa_verifier(curve: ec.EllipticCurve, point: bytes) -> Any:
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    except (ValueError, UnsupportedAlgorithm):
        return None

    def verify(sig: Signature, digest: bytes, algo: hashes.HashAlgorithm) -> bool:
        r, s = (int.from_bytes(m, "big") for m in sig.mpis[:2])
        key.verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(algo)))
        return True

    return verify


def _ed25519_verifier(raw: bytes, *, native: bool = False) -> Any:
    try:
        key = ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, UnsupportedAlgorithm):
        return None

    def verify(sig: Signature, digest: bytes, _algo: hashes.HashAlgorithm) -> bool:
        # EdDSA signs the digest itself; legacy EdDSA carries R and S as MPIs.
        value = sig.mpis[0] if native else b"".join(m.rjust(32, b"\0") for m in sig.mpis[:2])
        key.verify(value, digest)
        return True

    return verify


def _ed448_verifier(raw: bytes) -> Any:
    try:
        key = ed448.Ed448PublicKey.from_public_bytes(raw)
    except (ValueError, UnsupportedAlgorithm):
        return None

    def verify(sig: Signature, digest: bytes, _algo: hashes.HashAlgorithm) -> bool:
        key.verify(sig.mpis[0], digest)
        return True

    return verify


# --- signatures ----------------------------------------------------------------------------

SUB_CREATED = 2
SUB_SIG_EXPIRES = 3
SUB_KEY_EXPIRES = 9
SUB_ISSUER = 16
SUB_PRIMARY_UID = 25
SUB_KEY_FLAGS = 27
SUB_EMBEDDED = 32
SUB_ISSUER_FPR = 33
SUB_NOTATION = 20

# Subpacket types that may be marked critical: the ones that GnuPG 2.2
# (g10/parse-packet.c can_handle_critical) AND Sequoia's StandardPolicy (critical_subpackets)
# both understand. A critical notation is understood by neither by default (GnuPG knows two
# names nobody uses; Sequoia's good list is empty). RFC 9580 §5.2.3.7: a signature with a
# critical subpacket the evaluator does not know is in error; GnuPG looks at both areas.
KNOWN_CRITICAL = frozenset({2, 3, 4, 5, 6, 7, 9, 11, 12, 16, 21, 22, 24, 25, 26, 27, 29, 30,
                            32, 33})


@dataclass(frozen=True, slots=True)
class Signature:
    """A v4 signature packet body, parsed far enough to select and verify it."""

    body: bytes
    sig_type: int
    algorithm: int
    hash_algorithm: int
    hashed_trailer: bytes
    left16: bytes
    mpis: tuple[bytes, ...]
    created: int
    issuer_key_id: bytes | None
    issuer_fingerprint: bytes | None
    hashed: dict[int, bytes]
    embedded: bytes | None = None  # the first embedded signature (either area), a body
    unknown_critical: int | None = None  # type of a critical subpacket we cannot honour

    def issued_by(self, fingerprint: bytes) -> bool:
        if self.issuer_fingerprint is not None:
            return self.issuer_fingerprint == fingerprint
        return self.issuer_key_id == fingerprint[-8:]

    @property
    def sig_expires(self) -> int | None:
        raw = self.hashed.get(SUB_SIG_EXPIRES)
        if raw is None or len(raw) != 4:
            return None
        delta = int.from_bytes(raw, "big")
        return self.created + delta if delta else None

    @property
    def key_expires_after(self) -> int | None:
        """Seconds after key creation at which the key expires, per this signature."""
        raw = self.hashed.get(SUB_KEY_EXPIRES)
        if raw is None or len(raw) != 4:
            return None
        return int.from_bytes(raw, "big") or None

    @property
    def key_flags(self) -> int | None:
        raw = self.hashed.get(SUB_KEY_FLAGS)
        return raw[0] if raw else None

    @property
    def is_primary_uid(self) -> bool:
        raw = self.hashed.get(SUB_PRIMARY_UID)
        return bool(raw and raw[0])


def _subpackets(area: bytes) -> list[tuple[int, bytes]]:
    """Split a subpacket area into (type, body) pairs; the type keeps its critical bit."""
    items = []
    reader = _Reader(area, "signature subpacket area")
    while reader.pos < len(area):
        first = reader.byte()
        if first < 192:
            length = first
        elif first < 255:
            length = ((first - 192) << 8) + reader.byte() + 192
        else:
            length = int.from_bytes(reader.take(4), "big")
        if length == 0:
            raise KeyRefused("empty signature subpacket")
        content = reader.take(length)
        items.append((content[0], content[1:]))
    return items


def parse_signature(body: bytes) -> Signature:
    """Parse a v4 signature packet body; another version, like malformed bytes, raises
    KeyRefused."""
    reader = _Reader(body, "signature packet")
    if reader.byte() != 4:
        raise KeyRefused("not a v4 signature")
    sig_type, algorithm, hash_algorithm = reader.byte(), reader.byte(), reader.byte()
    hashed_len = int.from_bytes(reader.take(2), "big")
    hashed_area = reader.take(hashed_len)
    unhashed_area = reader.take(int.from_bytes(reader.take(2), "big"))
    left16 = reader.take(2)
    if algorithm in (27, 28):
        mpis: tuple[bytes, ...] = (reader.take({27: 64, 28: 114}[algorithm]),)
    else:
        found = []
        while reader.pos < len(body):
            found.append(reader.mpi())
        mpis = tuple(found)
    hashed: dict[int, bytes] = {}
    issuer_key_id = issuer_fpr = embedded = unknown_critical = None
    for raw_kind, value in _subpackets(hashed_area):
        kind = raw_kind & 0x7F
        if raw_kind & 0x80 and kind not in KNOWN_CRITICAL and unknown_critical is None:
            unknown_critical = kind
        hashed.setdefault(kind, value)
    unhashed = _subpackets(unhashed_area)
    for raw_kind, _ in unhashed:
        kind = raw_kind & 0x7F
        if raw_kind & 0x80 and kind not in KNOWN_CRITICAL and unknown_critical is None:
            unknown_critical = kind
    # The issuer may sit in either area; the unhashed copy is only a hint, which is all we
    # use it for: the cryptographic check decides. So for the embedded back-signature
    # (RFC 9580 §5.2.1), which proves itself by its own signature.
    for kind, value in [*hashed.items(), *((k & 0x7F, v) for k, v in unhashed)]:
        if kind == SUB_ISSUER and len(value) == 8 and issuer_key_id is None:
            issuer_key_id = value
        elif kind == SUB_ISSUER_FPR and len(value) == 21 and value[0] == 4 and not issuer_fpr:
            issuer_fpr = value[1:]
        elif kind == SUB_EMBEDDED and embedded is None:
            embedded = value
    created_raw = hashed.get(SUB_CREATED)
    if created_raw is None or len(created_raw) != 4:
        raise KeyRefused("signature without a creation time")
    trailer_head = body[: 6 + hashed_len]
    trailer = trailer_head + b"\x04\xff" + len(trailer_head).to_bytes(4, "big")
    return Signature(
        body=body, sig_type=sig_type, algorithm=algorithm, hash_algorithm=hash_algorithm,
        hashed_trailer=trailer, left16=left16, mpis=mpis,
        created=int.from_bytes(created_raw, "big"), issuer_key_id=issuer_key_id,
        issuer_fingerprint=issuer_fpr, hashed=hashed, embedded=embedded,
        unknown_critical=unknown_critical,
    )


def user_id_hash_prefix(user_id: bytes) -> bytes:
    return b"\xb4" + len(user_id).to_bytes(4, "big") + user_id
