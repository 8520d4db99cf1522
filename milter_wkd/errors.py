"""The typed errors every layer shares.

Each carries a human reason that is safe to show to the person who caused it (a refusal
line on stderr, an SMTP reply text, a log line). Callers turn `Unavailable` into a temporary
failure (451; a command exits 75) and `Refused` into a permanent refusal (5xx; exit 2).
The rest (`DirectoryError`, `config.ConfigError`) are faults of the service, not of the
sender: the milter answers a submission they stop with a temporary failure too, so nothing
is lost while an administrator fixes them, and lets other mail pass; a command exits 1.
"""

from __future__ import annotations


class MilterWkdError(Exception):
    """Base of all errors raised on purpose by milter-wkd."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class Refused(MilterWkdError):
    """Input that will never be accepted as it is (permanent: 5xx, exit 2)."""


class KeyRefused(Refused):
    """An OpenPGP key (or what claimed to be one) that cannot be published."""


class BadAddress(Refused):
    """A mail address that is not a plain addr-spec we are willing to handle."""


class MessageRefused(Refused):
    """A mail or OpenPGP message that cannot be processed (garbage MIME, wrong parts, not
    decryptable, oversize, a WKS request that does not match what is pending)."""


class Unavailable(MilterWkdError):
    """A service we depend on did not answer in time (temporary: 4xx, exit 75)."""

    exit_code = 75


class DirectoryUnavailable(Unavailable):
    """The LDAP directory is down, unreachable, too slow or refuses our bind."""


class DirectoryError(MilterWkdError):
    """The directory answered with an error nobody planned for (misconfiguration)."""


class NotFound(Refused):
    """No such user, key or pending request in the directory."""


class Conflict(Refused):
    """The directory holds something that contradicts the request (an address on two
    entries, a fingerprint published by another user, a nonce in use)."""


class RateLimited(Refused):
    """A limit on requests was reached (e.g. pending confirmation requests per address)."""


class Changed(DirectoryUnavailable):
    """A directory entry was written by someone else while it was being decided on:
    nothing was written; decide again on what is there now (a temporary failure)."""
