"""Service accounts' passwords in the directory (`milter-wkd directory passwords`): each
DN's userPassword replaced by a hash, bound as root over ldapi:// with SASL EXTERNAL
(another URI binds anonymously, which the ACLs refuse).

Failures: `DirectoryUnavailable` when slapd does not answer or refuses the bind;
`DirectoryError` naming the DN when a change is refused (what was set before stays set).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import ldap

from milter_wkd.config import DirectoryConfig
from milter_wkd.errors import DirectoryError
from milter_wkd.store.connection import ConnectionPool, close_connection, ldap_reason


def set_passwords(uri: str, hashes: Mapping[str, str], done: Callable[[str], None], *,
                  timeout: float = 10.0) -> None:
    """Set each DN's userPassword to its hash (RFC 2307 `{SSHA}...`); `done(dn)` after each
    change that slapd took."""
    conn = ConnectionPool(DirectoryConfig(uri=uri, timeout=timeout)).open()
    try:
        for dn, hashed in hashes.items():
            try:
                conn.modify_s(dn, [(ldap.MOD_REPLACE, "userPassword", [hashed.encode("ascii")])])
            except ldap.LDAPError as exc:
                raise DirectoryError(f"setting the password of {dn} failed: "
                                     f"{ldap_reason(exc)}") from None
            done(dn)
    finally:
        close_connection(conn)
