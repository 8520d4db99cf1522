"""DKIM signing of the mail milter-wkd generates or passes (RFC 6376, RFC 8463).

Keys: one per domain and selector, in a PEM file (PKCS#8; RSA or Ed25519) that
`generate_key` writes; `dns_record` gives the TXT record to publish at
<selector>._domainkey.<domain>. A domain may sign with two keys at once (RSA-2048, which
every receiver verifies, and Ed25519, RFC 8463): each key adds its own signature.
Signed: dkimpy's default header set plus Autocrypt and the WKS headers when present,
relaxed/relaxed canonicalisation (robust against re-folding).

The signer: dkimpy (the field's library) parses, canonicalises, selects and hashes the
header fields and formats the DKIM-Signature header (its `rfc822_parse`,
`CanonicalizationPolicy`, `hash_headers`, `fold` and `RE_BTAG`, the pieces its own
`DKIM.sign` is made of, in the same order); only the private-key operation is ours, done
by OpenSSL through `cryptography` with the key parsed once at load time. dkimpy 1.1 signs
RSA in pure-Python integer arithmetic (no CRT) after re-parsing the PEM on every call,
about 6 ms per signature here against OpenSSL's 0.27 ms. RSASSA-PKCS1-v1_5 and Ed25519
are deterministic, so the result is byte for byte what `dkimpy.DKIM.sign` makes for the
same message, headers, key and time: tests/unit/test_dkim.py pins that (run it after
upgrading dkimpy). The body is canonicalised and hashed once for all keys.
XXX the upstream form of this would be a dkimpy `DKIM.sign` that accepts a parsed key
object with a `sign(digest) -> bytes` method; until then we use its building blocks.

Errors: an unreadable or malformed key raises `ConfigError` naming the file (a key file
that cannot be created, `generate_key`, an OSError); a message without a From header
raises ValueError (RFC 6376 §5.4: From must be signed); signing cannot fail otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dkim as dkimpy
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy

from milter_wkd.config import ConfigError, DomainConfig

Algorithm = Literal["ed25519", "rsa"]
EXTRA_SIGNED = (b"autocrypt", b"wks-draft-version", b"wks-phase", b"message-id", b"date")
HEADER_NAME = b"DKIM-Signature"
CANONICALIZATION = b"relaxed/relaxed"
_POLICY = CanonicalizationPolicy.from_c_value(CANONICALIZATION)
_SIGNED = frozenset(dkimpy.DKIM.SHOULD) | frozenset(dkimpy.DKIM.FROZEN)
_PKCS1_SHA256 = (padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


@dataclass(frozen=True, slots=True)
class DkimKey:
    domain: str
    selector: str
    algorithm: Algorithm
    private: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey

    @property
    def signature_algorithm(self) -> bytes:
        """The a= tag: ed25519-sha256 (RFC 8463) or rsa-sha256."""
        return b"ed25519-sha256" if self.algorithm == "ed25519" else b"rsa-sha256"

    def sign_digest(self, digest: bytes) -> bytes:
        """The signature of a SHA-256 digest of the header fields, as DKIM wants it:
        RSASSA-PKCS1-v1_5 with SHA-256's DigestInfo, or Ed25519 over the digest itself."""
        if isinstance(self.private, ed25519.Ed25519PrivateKey):
            return self.private.sign(digest)
        return self.private.sign(digest, *_PKCS1_SHA256)

    def public_b64(self) -> str:
        public = self.private.public_key()
        if isinstance(public, ed25519.Ed25519PublicKey):
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        else:
            raw = public.public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(raw).decode("ascii")

    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def dns_record(self) -> str:
        kind = "ed25519" if self.algorithm == "ed25519" else "rsa"
        return f"v=DKIM1; k={kind}; p={self.public_b64()}"

    def zone_line(self) -> str:
        """The record as a zone file line. An RSA-2048 record (about 400 characters) is
        longer than one TXT string may be (255): it is given as several strings, which
        resolvers hand to verifiers joined (RFC 6376 §3.6.2.2)."""
        record = self.dns_record()
        strings = " ".join(f'"{record[i:i + 255]}"' for i in range(0, len(record), 255))
        return f"{self.dns_name()}. IN TXT {strings}"


def generate_key(path: Path, domain: str, selector: str, algorithm: Algorithm = "ed25519",
                 ) -> DkimKey:
    """Create a new key file, mode 0600 (less if the umask says so). An existing file is
    never overwritten: FileExistsError, like every other failure to write it (an
    OSError, not a ConfigError: callers check for the file first)."""
    private: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if algorithm == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return DkimKey(domain, selector, algorithm, private)


def load_key(path: Path, domain: str, selector: str,
             algorithm: Algorithm | None = None) -> DkimKey:
    """The key in a PEM file; with algorithm given, a key of another kind is refused."""
    try:
        pem = Path(path).read_bytes()
        private = serialization.load_pem_private_key(pem, password=None)
    except OSError as exc:
        raise ConfigError(f"DKIM key {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"DKIM key {path}: not a PEM private key ({exc})") from None
    key: DkimKey
    if isinstance(private, ed25519.Ed25519PrivateKey):
        key = DkimKey(domain, selector, "ed25519", private)
    elif isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < 1024:  # RFC 8301 §3.2: verifiers MUST reject them
            raise ConfigError(f"DKIM key {path}: RSA-{private.key_size} is too short "
                              "(at least 1024 bits, 2048 recommended)")
        key = DkimKey(domain, selector, "rsa", private)
    else:
        raise ConfigError(f"DKIM key {path}: only RSA and Ed25519 keys are supported")
    if algorithm is not None and key.algorithm != algorithm:
        raise ConfigError(f"DKIM key {path}: an {key.algorithm} key where an {algorithm} "
                          "key belongs")
    return key


def domain_keys(domain: DomainConfig) -> tuple[DkimKey, ...]:
    """The keys a domain signs with, in the order of their signatures: dkim_rsa_key first
    (verifiers that check only the topmost signature, dkimpy's `verify` among them, all
    know RSA), then dkim_key. Empty when neither is set."""
    keys = []
    if domain.dkim_rsa_key:
        keys.append(load_key(Path(domain.dkim_rsa_key), domain.name, domain.dkim_rsa_selector,
                             "rsa"))
    if domain.dkim_key:
        keys.append(load_key(Path(domain.dkim_key), domain.name, domain.dkim_selector))
    return tuple(keys)


def signed_header_names(headers: Sequence[Sequence[bytes]]) -> list[bytes]:
    """The h= list: dkimpy's default (RFC 6376's SHOULD set as present, From twice so
    that no second From can be added), then Autocrypt and the WKS headers if present."""
    names = [name.lower() for name, _ in headers if name.lower() in _SIGNED]
    names += [name for name in names if name in dkimpy.DKIM.FROZEN]
    present = {name.lower() for name, _ in headers}
    names += [name for name in EXTRA_SIGNED if name in present and name not in names]
    return names


def signature_headers(message: bytes, keys: Sequence[DkimKey], *,
                      timestamp: int | None = None) -> list[bytes]:
    """One `DKIM-Signature: ...\\r\\n` header (folded, CRLF) per key, in the order of keys,
    for message (CRLF or LF line ends); t= is timestamp (default: now)."""
    headers, body = dkimpy.rfc822_parse(message)
    include = signed_header_names(headers)
    if b"from" not in include:
        raise ValueError("DKIM: the message has no From header")
    body_hash = base64.b64encode(hashlib.sha256(_POLICY.canonicalize_body(body)).digest())
    canonical = _POLICY.canonicalize_headers(headers)
    t = str(int(time.time()) if timestamp is None else timestamp).encode("ascii")
    return [_signature_header(key, canonical, include, body_hash, t) for key in keys]


def _signature_header(key: DkimKey, canonical: list[tuple[bytes, bytes]],
                      include: list[bytes], body_hash: bytes, t: bytes) -> bytes:
    # The fields and steps of dkimpy's DKIM.sign and DKIM.gen_header, in their order.
    domain = key.domain.encode("ascii")
    fields = [(b"v", b"1"), (b"a", key.signature_algorithm), (b"c", CANONICALIZATION),
              (b"d", domain), (b"i", b"@" + domain), (b"q", b"dns/txt"),
              (b"s", key.selector.encode("ascii")), (b"t", t),
              (b"h", b" : ".join(include)), (b"bh", body_hash),
              (b"b", b"0" * 60)]  # a placeholder that makes b= fold onto its own line
    value = dkimpy.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(HEADER_NAME))
    value = dkimpy.RE_BTAG.sub(b"\\1", value)
    hasher = hashlib.sha256()
    dkimpy.hash_headers(hasher, _POLICY, canonical, include, (HEADER_NAME, b" " + value),
                        dict(fields))
    fields[-1] = (b"b", base64.b64encode(key.sign_digest(hasher.digest())))
    folded: bytes = dkimpy.fold(b"; ".join(b"=".join(f) for f in fields) + b"\r\n",
                                namelen=len(HEADER_NAME))
    return HEADER_NAME + b": " + folded


def signature_header(message: bytes, key: DkimKey) -> bytes:
    """The `DKIM-Signature: ...\\r\\n` header line(s) for message (CRLF line ends)."""
    return signature_headers(message, [key])[0]


def sign(message: bytes, keys: DkimKey | Sequence[DkimKey]) -> bytes:
    """message with a DKIM-Signature header per key prepended (CRLF line ends expected)."""
    return b"".join(signature_headers(message, [keys] if isinstance(keys, DkimKey) else keys)
                    ) + message


def verify(message: bytes, records: dict[str, str], index: int = 0) -> bool:
    """Verify the index-th DKIM signature against TXT records given as {name: record}
    (an offline resolver: tests and `milter-wkd check` use it)."""

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        del timeout
        return records.get(name.decode().rstrip("."), "").encode()

    try:
        return bool(dkimpy.DKIM(message).verify(idx=index, dnsfunc=dnsfunc))
    except dkimpy.DKIMException:
        return False
