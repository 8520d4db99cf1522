"""Password sign-in against the directory, for the self-service page.

`LdapAuthenticator.authenticate(address, password)`:
1. an empty password is refused at once: a simple bind with an empty password is an
   unauthenticated bind (RFC 4513 5.1.2), which slapd answers with success;
2. the ONE entry that owns the address (mail attributes, alias included) is found with the
   service account (`LdapStore.find_user`: filter values escaped; two owners is Conflict);
3. a NEW connection (the pool's options and timeouts, never a pooled one: a bound user
   connection must not serve anybody else) binds as that entry's DN with the password,
   and is closed at once.
An unknown address costs the same as a wrong password: a fresh connection makes a bind to
a DN that does not exist (slapd answers invalidCredentials for it, as for a wrong
password), so both take one connection set-up and one bind round trip.

Returns the `User` when the bind succeeded, None for an unknown address, a wrong password
or an address owned by two entries (logged: an administrator must fix that). A directory
that does not answer is `DirectoryUnavailable`. Over ldap:// the password crosses the
network in the clear: use ldapi:// or ldaps:// ([directory] uri).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from typing import Any

import ldap
from ldap.dn import escape_dn_chars

from milter_wkd.config import DirectoryConfig
from milter_wkd.errors import Conflict, DirectoryUnavailable
from milter_wkd.store.connection import (
    CONNECTION_ERRORS,
    ConnectionPool,
    close_connection,
    ldap_reason,
)
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.model import User
from milter_wkd.values import Address

log = logging.getLogger(__name__)


class LdapAuthenticator:
    """Checks a user's mail password by binding as their entry. Thread-safe."""

    def __init__(self, config: DirectoryConfig, store: LdapStore) -> None:
        self.config = config
        self.store = store
        # Connections set up exactly as the store's (URI list, TLS, timeouts), never bound
        # as its service account: each sign-in binds a new one as the user.
        anonymous = dataclasses.replace(config, bind_dn="", bind_password="",
                                        bind_password_file="")
        self._pool = ConnectionPool(anonymous)
        self.scheme, self.uri = self._pool.scheme, self._pool.uri

    def authenticate(self, address: Address, password: str) -> User | None:
        if not password:
            return None
        try:
            user = self.store.find_user(address)
        except Conflict as exc:
            log.warning("sign-in refused: %s", exc.reason)
            user = None
        if user is None:
            decoy = f"uid={escape_dn_chars(secrets.token_hex(16))},{self.config.base_dn}"
            self._bind(decoy, password)
            return None
        return user if self._bind(user.dn, password) else None

    def _bind(self, dn: str, password: str) -> bool:
        """Does a simple bind as dn with password succeed, on a new connection?"""
        conn = self._connect()
        try:
            conn.simple_bind_s(dn, password)
        except ldap.INVALID_CREDENTIALS:
            return False
        except (ldap.UNWILLING_TO_PERFORM, ldap.INAPPROPRIATE_AUTH,
                ldap.INVALID_DN_SYNTAX) as exc:
            log.info("bind as %s refused: %s", dn, ldap_reason(exc))
            return False
        except CONNECTION_ERRORS as exc:
            raise DirectoryUnavailable(
                f"directory {self.config.uri} unreachable: {ldap_reason(exc)}") from None
        except ldap.LDAPError as exc:
            raise DirectoryUnavailable(
                f"bind to {self.config.uri} failed: {ldap_reason(exc)}") from None
        finally:
            close_connection(conn)
        return True

    def _connect(self) -> Any:
        """A connection with the options of the store's pool, not bound yet."""
        return self._pool.unbound()
