"""The keys of the service itself, read once per domain and kept: each domain's submission
secret key ([[domains]] submission_key, decrypts submissions and signs confirmation requests)
and its DKIM keys (dkim_rsa_key, dkim_key: sign the service's notices and, optionally, our
users' outgoing mail).

A key file is read when first needed, so a broken one fails only the mail that needs it.
Failure: an unreadable or unusable file raises ConfigError (the milter answers 451 4.3.5 for
submissions; users' mail then goes out unsigned). Changed files are read again only after a
restart.
"""

from __future__ import annotations

from pathlib import Path

from milter_wkd import dkim
from milter_wkd.config import ConfigError, DomainConfig


class ServiceKeys:
    """Shared by all milter connections. Two connections may both read a key the first time;
    either copy is kept (a dict assignment is atomic), so no lock is needed."""

    def __init__(self) -> None:
        self._secrets: dict[str, bytes] = {}
        self._dkim: dict[str, tuple[dkim.DkimKey, ...]] = {}

    def submission_secret(self, domain: DomainConfig) -> bytes:
        """The domain's submission secret key (OpenPGP, as stored in the file)."""
        cached = self._secrets.get(domain.name)
        if cached is None:
            try:
                cached = Path(domain.submission_key).read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"submission key {domain.submission_key}: {exc.strerror}") from None
            self._secrets[domain.name] = cached
        return cached

    def dkim(self, domain: DomainConfig) -> tuple[dkim.DkimKey, ...]:
        """The domain's DKIM keys (none, one, or RSA and Ed25519), parsed once."""
        keys = self._dkim.get(domain.name)
        if keys is None:
            keys = dkim.domain_keys(domain)
            self._dkim[domain.name] = keys
        return keys
