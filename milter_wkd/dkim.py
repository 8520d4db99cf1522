"""DKIM signing of the mail milter-wkd generates or passes (RFC 6376, RFC 8463), with dkimpy.

Keys: one per domain and selector, in a PEM file (PKCS#8; RSA or Ed25519) that
`generate_key` writes; `dns_record` gives the TXT record to publish at
<selector>._domainkey.<domain>. Signed: dkimpy's default header set plus Autocrypt and the
WKS headers when present, relaxed/relaxed canonicalisation (robust against re-folding).
Errors: an unreadable or malformed key raises `ConfigError` naming the file; signing itself
cannot fail on a message we built.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from milter_wkd.config import ConfigError

Algorithm = Literal["ed25519", "rsa"]
EXTRA_SIGNED = (b"autocrypt", b"wks-draft-version", b"wks-phase", b"message-id", b"date")


@dataclass(frozen=True, slots=True)
class DkimKey:
    domain: str
    selector: str
    algorithm: Algorithm
    private: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey

    def _dkimpy_key(self) -> bytes:
        if isinstance(self.private, ed25519.Ed25519PrivateKey):
            raw = self.private.private_bytes(serialization.Encoding.Raw,
                                             serialization.PrivateFormat.Raw,
                                             serialization.NoEncryption())
            return base64.b64encode(raw)
        return self.private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.TraditionalOpenSSL,
                                          serialization.NoEncryption())

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


def generate_key(path: Path, domain: str, selector: str, algorithm: Algorithm = "ed25519",
                 ) -> DkimKey:
    """Create a new key file (mode 0600); refuses to overwrite an existing one."""
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


def load_key(path: Path, domain: str, selector: str) -> DkimKey:
    try:
        pem = Path(path).read_bytes()
        private = serialization.load_pem_private_key(pem, password=None)
    except OSError as exc:
        raise ConfigError(f"DKIM key {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"DKIM key {path}: not a PEM private key ({exc})") from None
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return DkimKey(domain, selector, "ed25519", private)
    if isinstance(private, rsa.RSAPrivateKey):
        return DkimKey(domain, selector, "rsa", private)
    raise ConfigError(f"DKIM key {path}: only RSA and Ed25519 keys are supported")


def signature_header(message: bytes, key: DkimKey) -> bytes:
    """The `DKIM-Signature: ...\\r\\n` header line(s) for message (CRLF line ends)."""
    signer = dkimpy.DKIM(message, linesep=b"\r\n")
    present = {name.lower() for name, _ in signer.headers}
    include = list(signer.default_sign_headers())
    include += [name for name in EXTRA_SIGNED if name in present and name not in include]
    algorithm = b"ed25519-sha256" if key.algorithm == "ed25519" else b"rsa-sha256"
    header: bytes = signer.sign(key.selector.encode(), key.domain.encode(), key._dkimpy_key(),
                                signature_algorithm=algorithm,
                                canonicalize=(b"relaxed", b"relaxed"),
                                include_headers=include)
    return header


def sign(message: bytes, key: DkimKey) -> bytes:
    """message with a DKIM-Signature header prepended (CRLF line ends expected)."""
    return signature_header(message, key) + message


def verify(message: bytes, records: dict[str, str]) -> bool:
    """Verify the first DKIM signature against TXT records given as {name: record}
    (an offline resolver: tests and `milter-wkd check` use it)."""

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        del timeout
        return records.get(name.decode().rstrip("."), "").encode()

    return bool(dkimpy.verify(message, dnsfunc=dnsfunc))
