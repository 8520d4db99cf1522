"""OpenPGP messages for WKS mail (RFC 9580 §5.1, §5.13, §10.3; RFC 3156 signatures): encrypt
to cleaned recipient keys, decrypt with the service key, detached signatures, and the
generation of a submission (service) key. The only module of milter-wkd that imports pgpy.

Reads: message and key bytes (binary or ASCII-armored); no files, no clock unless `now` is
passed on to key cleaning.

Untrusted keys never reach pgpy uncut: `encrypt` and `verify_detached` run every public key
through `clean_key` first (flood-proofing, self-signature checks). `decrypt` walks the
message with our own packet scanner and hands pgpy only a session-key packet (and the
integrity-protected ciphertext when its cipher is not AES: AES we decrypt and check with
`cryptography` directly, as fast as pgpy is slow at it), then unpacks the plaintext itself
so that compression is decompressed with a hard cap (no bombs) and only literal data
comes out.

Errors: a refused key raises `KeyRefused`, a refused message `MessageRefused`, both with a
human reason; no other exception escapes for any input bytes.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import hmac
import time
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap
from cryptography.utils import CryptographyDeprecationWarning

try:  # cryptography >= 47 keeps CFB, OpenPGP's mode, among its "decrepit" modes.
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from milter_wkd.errors import KeyRefused, MessageRefused, Refused
from milter_wkd.openpgp import clean_key
from milter_wkd.openpgp import packets as pk
from milter_wkd.values import Address, Fingerprint


@contextmanager
def _quiet_pgpy() -> Iterator[None]:
    """Silence pgpy's known noise, and only that: deprecated cipher imports, its
    'TODO: revocation checks' notes, and preference notes when we pick AES ourselves.

    XXX catch_warnings swaps the process-wide filter list and is not thread-safe before
    Python 3.14: two threads inside at once can leave these ignore-filters installed for
    good. That only ever silences the three notes above, so we accept it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning)
        warnings.filterwarnings("ignore", message=r"TODO: ", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"Selected .* not in key preferences",
                                category=UserWarning)
        yield


@contextmanager
def _pgpy(error: type[Refused], what: str) -> Iterator[None]:
    """Run pgpy quietly and turn whatever it raises into `error` with a reason."""
    with _quiet_pgpy():
        try:
            yield
        except Refused:
            raise
        # pgpy signals bad input with anything from ValueError and its own PGPError to
        # NotImplementedError, KeyError and TypeError; none of them may escape.
        except Exception as exc:  # noqa: BLE001
            raise error(f"{what}: {str(exc)[:200] or type(exc).__name__}") from None


with _quiet_pgpy():
    # pgpy imports imghdr (deprecated in 3.11, gone in 3.13: standard-imghdr replaces it).
    warnings.filterwarnings("ignore", message=r"'imghdr' is deprecated",
                            category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r"imghdr was removed in Python 3\.13",
                            category=DeprecationWarning)
    from pgpy import PGPUID, PGPKey, PGPMessage, PGPSignature
    from pgpy.constants import (
        CompressionAlgorithm,
        EllipticCurveOID,
        HashAlgorithm,
        KeyFlags,
        PubKeyAlgorithm,
        SymmetricKeyAlgorithm,
    )
    from pgpy.packet import Packet
    from pgpy.packet.packets import IntegrityProtectedSKEDataV1, PKESessionKeyV3

__all__ = [
    "DEFAULT_MAX_MESSAGE", "DEFAULT_MAX_PLAINTEXT", "GeneratedKey", "decrypt", "encrypt",
    "generate_submission_key", "sign_detached", "verify_detached",
]

# A WKS submission carries one minimal key: gpg caps a WKD answer at 256 KiB, armor adds a
# third, MIME headers a little more. gpg-wks-server lets gpg write at most ~960 KiB.
DEFAULT_MAX_MESSAGE = 1024 * 1024
DEFAULT_MAX_PLAINTEXT = 512 * 1024
# Each session-key packet may cost a public-key operation; a real message has a handful.
_MAX_SESSION_KEYS = 32
_MAX_SECRET_KEY = 64 * 1024
# Ciphers we encrypt with, best first. AES-128 is the one every implementation must have.
_CIPHERS = (SymmetricKeyAlgorithm.AES256, SymmetricKeyAlgorithm.AES192,
            SymmetricKeyAlgorithm.AES128)
_MDC_LENGTH = 22
# Session-key algorithm IDs of AES-128/192/256 (RFC 9580 §9.3) and their key sizes.
_AES_KEY_SIZES = {7: 16, 8: 24, 9: 32}
_AES_BLOCK = 16
_DECRYPTION_FAILED = "decryption failed (wrong key or modified message)"
# RFC 6637 §9 / RFC 9580 §11.5: the KDF parameters start with the curve OID, length first
# (Curve25519, 1.3.6.1.4.1.3029.1.5.1), then the ECDH algorithm ID 18.
_CV25519_OID = bytes.fromhex("0a2b060104019755010501")
_ECDH = 18
_KDF_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    8: hashes.SHA256, 9: hashes.SHA384, 10: hashes.SHA512}


# --- keys -------------------------------------------------------------------------------

def _load_cleaned_public(data: bytes, now: int | None) -> tuple[Any, Any]:
    """Clean an untrusted public key and load what survived into pgpy: (key, the
    encryption subkey to use, or None)."""
    now = int(time.time()) if now is None else now
    result = clean_key(data, None, now=now)
    if result.info.revoked:
        raise KeyRefused(f"key {result.info.fingerprint} is revoked")
    if result.info.expired(now):
        raise KeyRefused(f"key {result.info.fingerprint} has expired")
    usable = [
        sub for sub in result.info.subkeys
        if "e" in sub.usage and not sub.revoked
        and (sub.expires is None or sub.expires > now)
    ]
    with _pgpy(KeyRefused, f"key {result.info.fingerprint} cannot be loaded"):
        key, _ = PGPKey.from_blob(result.key)
    if not usable:
        return key, None
    newest = max(usable, key=lambda sub: sub.created)
    return key, key.subkeys.get(newest.key_id)


@functools.lru_cache(maxsize=16)
def _load_secret(data: bytes) -> Any:
    """Load the service's own secret key (trusted: it comes from a root-owned file).
    Cached: parsing it costs pgpy about 3 ms, on every message the milter handles; the
    key object is only read afterwards (decrypt, sign), never changed."""
    if len(data) > _MAX_SECRET_KEY:
        raise KeyRefused("secret key file is larger than 64 KiB")
    with _pgpy(KeyRefused, "not an OpenPGP secret key"):
        key, _ = PGPKey.from_blob(data)
    if key.is_public:
        raise KeyRefused("a public key was given where the secret key is needed")
    if key.is_protected:
        raise KeyRefused("the secret key is passphrase-protected; the service key must not be")
    return key


def _cipher_for(keys: Sequence[Any]) -> Any:
    """The best AES every recipient lists in its preferences (AES-128 if none says)."""
    for cipher in _CIPHERS:
        if all(cipher in _cipher_prefs(key) for key in keys):
            return cipher
    return SymmetricKeyAlgorithm.AES128


def _cipher_prefs(key: Any) -> list[Any]:
    primary = key if key.parent is None else key.parent
    uid = next(iter(primary.userids), None)
    if uid is None or uid.selfsig is None:
        return []
    return list(uid.selfsig.cipherprefs or [])


# --- encryption -------------------------------------------------------------------------

def encrypt(plaintext: bytes, recipients: Sequence[bytes], *, now: int | None = None) -> bytes:
    """Encrypt to every recipient key (each cleaned by `clean_key` first): an armored
    message, uncompressed, integrity-protected (SEIPD v1 with MDC, what gpg 2.2 reads)."""
    if not recipients:
        raise KeyRefused("no recipient key to encrypt to")
    # pgpy's subkeys hold their primary key by weak reference: keep the primaries alive.
    primaries, subkeys = [], []
    for data in recipients:
        key, sub = _load_cleaned_public(data, now)
        if sub is None:
            raise KeyRefused(f"key {key.fingerprint.replace(' ', '')} has no usable "
                             "encryption subkey")
        primaries.append(key)
        subkeys.append(sub)
    cipher = _cipher_for(subkeys)
    with _pgpy(KeyRefused, "encryption failed"):
        message = PGPMessage.new(bytes(plaintext), compression=CompressionAlgorithm.Uncompressed)
        session_key = cipher.gen_key()
        for sub in subkeys:
            message = sub.encrypt(message, cipher=cipher, sessionkey=session_key)
        binary = bytes(message)
    return pk.armor(pk.ARMOR_MESSAGE, binary)


# --- decryption -------------------------------------------------------------------------

def _binary_message(message: bytes, max_message: int) -> bytes:
    if len(message) > max_message:
        raise MessageRefused(f"encrypted message is larger than {max_message} octets")
    if pk.looks_armored(message):
        try:
            label, binary = pk.dearmor(message)
        except KeyRefused as exc:
            raise MessageRefused(f"bad armored message: {exc.reason}") from None
        if label != pk.ARMOR_MESSAGE:
            raise MessageRefused(f"expected an armored PGP MESSAGE, got {label[:40]!r}")
        return binary
    return message


def _encrypted_parts(data: bytes) -> tuple[list[bytes], bytes]:
    """Split a binary encrypted message: (session-key packets, SEIPD body)."""
    session_keys: list[bytes] = []
    try:
        refs = list(pk.iter_packets(data))
    except KeyRefused as exc:
        raise MessageRefused(f"bad OpenPGP message: {exc.reason}") from None
    for index, ref in enumerate(refs):
        if ref.tag == pk.TAG_PKESK:
            if len(session_keys) == _MAX_SESSION_KEYS:
                raise MessageRefused("too many session-key packets")
            session_keys.append(data[ref.start : ref.end])
        elif ref.tag == pk.TAG_MARKER:
            continue
        elif ref.tag == pk.TAG_SEIPD:
            if index != len(refs) - 1:
                raise MessageRefused("packets after the encrypted data")
            return session_keys, pk.packet_body(data, ref)
        elif ref.tag == pk.TAG_SED:
            raise MessageRefused("message is encrypted without integrity protection")
        elif ref.tag == pk.TAG_AEAD:
            raise MessageRefused("AEAD-encrypted messages are not supported")
        elif ref.tag == pk.TAG_SKESK:
            raise MessageRefused("message is encrypted with a password, not to a key")
        else:
            raise MessageRefused(f"unexpected packet type {ref.tag} in an encrypted message")
    raise MessageRefused("not an encrypted message (no encrypted data packet)")


@functools.lru_cache(maxsize=16)
def _decryption_keys(data: bytes) -> dict[str, Any]:
    """Key ID -> the service's primary key and subkeys (cached with the key: pgpy hashes
    the whole key again for every fingerprint it is asked for)."""
    secret = _load_secret(data)
    candidates = {secret.fingerprint.keyid: secret}
    candidates.update(secret.subkeys)
    return candidates


class _Cv25519(NamedTuple):
    """What decrypting a session key for one of our cv25519 subkeys needs."""

    private: x25519.X25519PrivateKey
    param: bytes  # RFC 6637 §8 "Param": curve, algorithm, KDF, "Anonymous Sender", fpr
    hash: type[hashes.HashAlgorithm]
    kek_length: int


@functools.lru_cache(maxsize=16)
def _cv25519_keys(data: bytes) -> dict[bytes, _Cv25519]:
    """Key ID (8 octets) -> each cv25519 ECDH key of the service's secret key."""
    found: dict[bytes, _Cv25519] = {}
    for keyid, key in _decryption_keys(data).items():
        material = key._key.keymaterial  # pgpy has no public accessor
        if key.key_algorithm != PubKeyAlgorithm.ECDH or (
                material.oid != EllipticCurveOID.Curve25519):
            continue
        halg, kek = int(material.kdf.halg), int(material.kdf.encalg)
        if halg not in _KDF_HASHES or kek not in _AES_KEY_SIZES:
            continue
        fingerprint = bytes.fromhex(str(key.fingerprint).replace(" ", ""))
        param = (_CV25519_OID + bytes([_ECDH, 3, 1, halg, kek]) + b"Anonymous Sender    "
                 + fingerprint)
        found[bytes.fromhex(keyid)] = _Cv25519(material.__privkey__(), param,
                                               _KDF_HASHES[halg], _AES_KEY_SIZES[kek])
    return found


def _cv25519_session_key(raw: bytes, keys: dict[bytes, _Cv25519]) -> tuple[int, bytes] | None:
    """The session key of a v3 session-key packet to one of our cv25519 keys (RFC 9580
    §5.1, §11.5; RFC 6637 §8), computed with cryptography directly: pgpy spends most of a
    submission's decryption building objects around the one X25519 exchange. None: the
    packet is not of that kind (pgpy then tries it); MessageRefused: it is, and it does
    not decrypt."""
    ref = next(pk.iter_packets(raw))
    body = raw[ref.body_start : ref.end]
    if len(body) < 12 or body[0] != 3 or body[9] != _ECDH:
        return None
    key = keys.get(body[1:9])
    if key is None:
        return None
    point_length = (int.from_bytes(body[10:12], "big") + 7) // 8
    point, rest = body[12 : 12 + point_length], body[12 + point_length :]
    if point_length != 33 or len(point) != 33 or point[0] != 0x40 or not rest or (
            len(rest) != 1 + rest[0]):
        raise MessageRefused("malformed cv25519 session-key packet")
    try:
        shared = key.private.exchange(x25519.X25519PublicKey.from_public_bytes(point[1:]))
    except ValueError:  # the all-zero shared secret of a small-order point
        raise MessageRefused(_DECRYPTION_FAILED) from None
    digest = hashes.Hash(key.hash())
    digest.update(b"\x00\x00\x00\x01" + shared + key.param)
    try:
        padded = aes_key_unwrap(digest.finalize()[: key.kek_length], rest[1:])
    except (InvalidUnwrap, ValueError):
        raise MessageRefused(_DECRYPTION_FAILED) from None
    pad = padded[-1] if padded else 0
    if not 1 <= pad <= 8 or padded[-pad:] != bytes([pad]) * pad or len(padded) < pad + 4:
        raise MessageRefused(_DECRYPTION_FAILED)
    algorithm, session_key, check = padded[0], padded[1 : -pad - 2], padded[-pad - 2 : -pad]
    if int.from_bytes(check, "big") != sum(session_key) & 0xFFFF:
        raise MessageRefused(_DECRYPTION_FAILED)
    return algorithm, session_key


def _session_key(session_keys: list[bytes], candidates: dict[str, Any],
                 fast: dict[bytes, _Cv25519]) -> tuple[Any, Any]:
    for raw in session_keys:
        try:
            found = _cv25519_session_key(raw, fast)
        except (MessageRefused, KeyRefused):
            continue  # corrupt, or not for us after all: try the next packet
        if found is not None:
            return found
        try:
            with _pgpy(MessageRefused, "unreadable session-key packet"):
                packet = Packet(bytearray(raw))
        except MessageRefused:
            continue  # a packet version or algorithm we do not know is not for us
        if not isinstance(packet, PKESessionKeyV3):
            continue
        wildcard = packet.encrypter == "0" * 16
        for keyid, key in candidates.items():
            if (not wildcard and keyid != packet.encrypter) or key.key_algorithm != packet.pkalg:
                continue
            try:
                with _pgpy(MessageRefused, "session key does not decrypt"):
                    algorithm, session_key = packet.decrypt_sk(key._key)
            except MessageRefused:
                continue  # a wildcard guess that was wrong, or a corrupt packet
            return algorithm, session_key
    raise MessageRefused("message is not encrypted to the submission key")


def _split_plain(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(tag, body) of decrypted packets; old-format indeterminate lengths, which gpg uses
    for compressed packets, run to the end."""
    pos = 0
    while pos < len(data):
        header = data[pos]
        if header & 0x80 and not header & 0x40 and header & 0x03 == 3:
            yield (header >> 2) & 0x0F, data[pos + 1 :]
            return
        ref = next(pk.iter_packets(data, pos))
        yield ref.tag, pk.packet_body(data, ref)
        pos = ref.end


def _decompress(body: bytes, limit: int, headroom: int) -> bytes:
    if not body:
        raise MessageRefused("empty compressed packet")
    algorithm, payload = body[0], body[1:]
    try:
        if algorithm == 0:
            out = payload[: limit + headroom + 1]
        elif algorithm in (1, 2):
            inflater = zlib.decompressobj(-15 if algorithm == 1 else 15)
            out = inflater.decompress(payload, limit + headroom + 1)
        elif algorithm == 3:
            out = bz2.BZ2Decompressor().decompress(payload, limit + headroom + 1)
        else:
            raise MessageRefused(f"unknown compression algorithm {algorithm}")
    except (zlib.error, OSError, EOFError, ValueError) as exc:
        raise MessageRefused(f"corrupt compressed data: {exc}") from None
    if len(out) > limit + headroom:
        raise MessageRefused(f"decompressed message is larger than {limit} octets")
    return out


def _literal(data: bytes, limit: int, *, may_compress: bool = True) -> bytes:
    """The content of the single literal packet of a decrypted message; signatures are
    skipped (WKS does not sign inside), one level of compression is undone."""
    found: bytes | None = None
    try:
        for tag, body in _split_plain(data):
            if tag == pk.TAG_COMPRESSED and may_compress and found is None:
                # Headroom for the literal packet's own header and file name.
                found = _literal(_decompress(body, limit, 512), limit, may_compress=False)
            elif tag == pk.TAG_LITERAL and found is None:
                if len(body) < 6 or len(body) < 6 + body[1]:
                    raise MessageRefused("truncated literal data packet")
                found = body[6 + body[1] :]
            elif tag in (pk.TAG_ONE_PASS, pk.TAG_SIGNATURE, pk.TAG_MARKER):
                continue
            else:
                raise MessageRefused(f"unexpected packet type {tag} in the decrypted message")
    except KeyRefused as exc:
        raise MessageRefused(f"bad decrypted message: {exc.reason}") from None
    if found is None:
        raise MessageRefused("the decrypted message holds no literal data")
    if len(found) > limit:
        raise MessageRefused(f"decrypted message is larger than {limit} octets")
    return found


def _open_seipd_aes(ciphertext: bytes, key: bytes) -> bytes:
    """Decrypt the body of a SEIPD v1 packet (RFC 9580 §5.13.1) with AES, checked as pgpy
    checks it: the MDC (SHA-1 over everything before its digest) in constant time, then
    the two repeated octets of the random prefix. The plaintext after the prefix, MDC
    packet included. pgpy does the same but spends more on looking up the cipher (it
    rebuilds a table with a namedtuple in it every time) than on decrypting."""
    decryptor = Cipher(algorithms.AES(key), CFB(bytes(_AES_BLOCK))).decryptor()
    plain = decryptor.update(ciphertext) + decryptor.finalize()
    # SHA-1 is what the MDC is (RFC 9580 §5.13.1); v1 packets have no other check.
    expected = b"\xd3\x14" + hashlib.sha1(plain[:-20]).digest()  # noqa: S324
    if not hmac.compare_digest(plain[-_MDC_LENGTH:], expected):
        raise MessageRefused(_DECRYPTION_FAILED)
    if not hmac.compare_digest(plain[_AES_BLOCK - 2 : _AES_BLOCK],
                               plain[_AES_BLOCK : _AES_BLOCK + 2]):
        raise MessageRefused(_DECRYPTION_FAILED)
    return plain[_AES_BLOCK + 2 :]


def decrypt(message: bytes, secret_key: bytes, *, max_message: int = DEFAULT_MAX_MESSAGE,
            max_plaintext: int = DEFAULT_MAX_PLAINTEXT) -> bytes:
    """Decrypt a message (armored or binary) with the service's secret key: the literal
    data, at most `max_plaintext` octets even after decompression."""
    binary = _binary_message(message, max_message)
    session_keys, encrypted = _encrypted_parts(binary)
    algorithm, key = _session_key(session_keys, _decryption_keys(secret_key),
                                  _cv25519_keys(secret_key))
    if not encrypted or encrypted[0] != 1:
        raise MessageRefused("unsupported encrypted data packet version")
    if _AES_KEY_SIZES.get(int(algorithm)) == len(key):
        plain = _open_seipd_aes(encrypted[1:], bytes(key))
    else:
        packet = IntegrityProtectedSKEDataV1()
        packet.ct = bytearray(encrypted[1:])
        with _pgpy(MessageRefused, _DECRYPTION_FAILED):
            plain = bytes(packet.decrypt(key, SymmetricKeyAlgorithm(int(algorithm))))
    if len(plain) < _MDC_LENGTH:
        raise MessageRefused("encrypted data packet is too short")
    # pgpy checked the MDC; it leaves the MDC packet at the end.
    return _literal(plain[:-_MDC_LENGTH], max_plaintext)


# --- signatures -------------------------------------------------------------------------

def sign_detached(data: bytes, secret_key: bytes) -> bytes:
    """An armored detached binary-document signature over `data` exactly as given (for
    PGP/MIME, pass the part canonicalised to CRLF line ends, RFC 3156 §5)."""
    secret = _load_secret(secret_key)
    with _pgpy(KeyRefused, "signing failed"):
        binary = bytes(secret.sign(bytes(data), hash=HashAlgorithm.SHA256))
    return pk.armor(pk.ARMOR_SIGNATURE, binary)


def verify_detached(data: bytes, signature: bytes, public_key: bytes, *,
                    now: int | None = None) -> Fingerprint:
    """Check a detached signature over `data` by `public_key` (cleaned first); the
    fingerprint of the (sub)key that made it. Refuses anything that does not verify."""
    key, _ = _load_cleaned_public(public_key, now)
    if len(signature) > 64 * 1024:
        raise MessageRefused("signature is larger than 64 KiB")
    with _pgpy(MessageRefused, "signature cannot be checked"):
        parsed = PGPSignature.from_blob(signature)
        result = key.verify(bytes(data), parsed)
        # Binary (0x00) or canonical text (0x01) document signatures; nothing else (a key
        # certification or a timestamp signature over these bytes means something else).
        good = bool(result) and parsed.type.name in ("BinaryDocument", "CanonicalDocument")
        signer = next((s.by.fingerprint for s in result.good_signatures), None)
    if not good or signer is None:
        raise MessageRefused("bad signature")
    return Fingerprint.parse(str(signer))


# --- the submission key -----------------------------------------------------------------

class GeneratedKey(NamedTuple):
    """A fresh service key: the secret key (armored, unprotected), the public key (binary,
    already as `clean_key` publishes it) and its fingerprint."""

    secret: bytes
    public: bytes
    fingerprint: Fingerprint


def generate_submission_key(address: Address, *, now: int | None = None) -> GeneratedKey:
    """An ed25519 primary key (sign, certify) with a cv25519 encryption subkey and one user
    ID, the bare submission address (policy mailbox-only), no expiry, no passphrase."""
    with _pgpy(KeyRefused, "key generation failed"):
        key = PGPKey.new(PubKeyAlgorithm.EdDSA, EllipticCurveOID.Ed25519)
        key.add_uid(
            PGPUID.new(str(address)), primary=True,
            usage={KeyFlags.Sign, KeyFlags.Certify},
            hashes=[HashAlgorithm.SHA512, HashAlgorithm.SHA256],
            ciphers=list(_CIPHERS),
            compression=[CompressionAlgorithm.Uncompressed, CompressionAlgorithm.ZLIB,
                         CompressionAlgorithm.ZIP])
        subkey = PGPKey.new(PubKeyAlgorithm.ECDH, EllipticCurveOID.Curve25519)
        key.add_subkey(subkey, usage={KeyFlags.EncryptCommunications, KeyFlags.EncryptStorage})
        secret = str(key).encode("ascii")
        public = bytes(key.pubkey)
    cleaned = clean_key(public, [address], now=now)
    return GeneratedKey(secret, cleaned.key, cleaned.info.fingerprint)
