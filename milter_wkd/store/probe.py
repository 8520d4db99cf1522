"""The directory as the doctor (`milter-wkd check`) sees it: connections opened exactly as
the store opens its own, and operations whose LDAP answers are results to report, not
exceptions.

- `connect(config)`: a `Probe`, bound as [directory] says (or anonymously); `ConnectFailed`
  says why not in one word (`kind`) and the cause's words;
- `Probe.search`: (RFC 4511 result name, entries), keeping the entries sent before a
  sizeLimitExceeded; `Probe.whoami`; `Probe.may_delete_value`: whether slapd's ACLs let
  this account delete a value, asked by deleting one that no entry has (nothing changes);
- `bind_accepted(config, dn, password)`: whether slapd takes a password;
- `parent_dn`, `escape_filter`, `describe`: DNs, filter values and LDAP errors in words.

Configuration: a [directory] section (uri, bind_dn, bind_password(_file), ca_file,
timeout, which is also every operation's time limit).

Failures: a connection that breaks or times out during an operation raises
`DirectoryUnavailable`; every other LDAP error is an answer (a result name, False, None).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal

import ldap
from ldap.dn import dn2str, str2dn
from ldap.filter import escape_filter_chars

from milter_wkd.config import DirectoryConfig
from milter_wkd.errors import DirectoryError, DirectoryUnavailable, MilterWkdError
from milter_wkd.store.connection import (
    CONNECTION_ERRORS,
    RESULT_NAMES,
    ConnectionPool,
    close_connection,
    ldap_reason,
)
from milter_wkd.store.schema import Entry

Scope = Literal["base", "one", "sub"]
_SCOPES = {"base": ldap.SCOPE_BASE, "one": ldap.SCOPE_ONELEVEL, "sub": ldap.SCOPE_SUBTREE}
# Why a connection could not be opened: no answer (or a refused or timed-out connection),
# a refused bind, an unreadable bind_password_file, an unusable URI.
FailureKind = Literal["unreachable", "refused", "password", "uri"]


class ConnectFailed(MilterWkdError):
    """Opening a probe connection failed; `kind` says why, the reason in the cause's words
    (an LDAP result as `ldap_reason` gives it, the password file's OSError, the URI's
    complaint)."""

    def __init__(self, kind: FailureKind, reason: str) -> None:
        super().__init__(reason)
        self.kind: FailureKind = kind


def describe(exc: BaseException) -> str | None:
    """An LDAP error in words (its RFC 4511 result name and slapd's text); None for any
    other exception."""
    return ldap_reason(exc) if isinstance(exc, ldap.LDAPError) else None


def _first_line(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0][:300]


def _open(config: DirectoryConfig) -> tuple[ConnectionPool, Any]:
    try:
        pool = ConnectionPool(config)
    except DirectoryError as exc:
        # The store raises its own errors `from None`, keeping the cause as the context.
        cause = exc.__context__
        if isinstance(cause, OSError):
            raise ConnectFailed("password", _first_line(cause)) from None
        raise ConnectFailed("uri", exc.reason) from None
    try:
        return pool, pool.open()
    except DirectoryUnavailable as exc:
        cause = exc.__context__
        if cause is None:
            raise ConnectFailed("unreachable", exc.reason) from None
        kind: FailureKind = "unreachable" if isinstance(cause, CONNECTION_ERRORS) else "refused"
        raise ConnectFailed(kind, ldap_reason(cause)) from None


def connect(config: DirectoryConfig, *, anonymous: bool = False) -> Probe:
    """A connection opened as the store opens its own (the milter's view of the
    directory); anonymous: bound anonymously instead. Raises ConnectFailed."""
    if anonymous:
        config = dataclasses.replace(config, bind_dn="")
    pool, conn = _open(config)
    if anonymous and pool.scheme == "ldapi":  # the store binds with SASL EXTERNAL there
        try:
            conn.simple_bind_s("", "")
        except CONNECTION_ERRORS as exc:
            close_connection(conn)
            raise ConnectFailed("unreachable", ldap_reason(exc)) from None
        except ldap.LDAPError as exc:
            close_connection(conn)
            raise ConnectFailed("refused", ldap_reason(exc)) from None
    return Probe(conn, config)


def bind_accepted(config: DirectoryConfig, dn: str, password: str) -> bool:
    """Whether slapd takes this password for dn (a simple bind at config's uri); raises
    ConnectFailed (kind "unreachable") when slapd does not answer."""
    config = dataclasses.replace(config, bind_dn=dn, bind_password=password,
                                 bind_password_file="")
    try:
        _pool, conn = _open(config)
    except ConnectFailed as failure:
        if failure.kind == "unreachable":
            raise
        return False
    close_connection(conn)
    return True


class Probe:
    """One bound connection, for probing; closed by `close` or on leaving a `with`."""

    def __init__(self, conn: Any, config: DirectoryConfig) -> None:
        self._conn = conn
        self.config = config
        self.timeout = config.timeout

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        close_connection(self._conn)

    def _gone(self, exc: BaseException) -> DirectoryUnavailable:
        return DirectoryUnavailable(f"directory {self.config.uri} did not answer: "
                                    f"{ldap_reason(exc)}")

    def whoami(self) -> str | None:
        """The server's "Who am I?" answer (`dn:...`), None when it gives none."""
        try:
            identity: str | None = self._conn.whoami_s()
        except ldap.LDAPError:
            return None
        return identity

    def search(self, base: str, filt: str, attributes: Sequence[str], *,
               scope: Scope = "sub", size: int = 0) -> tuple[str, list[Entry]]:
        """(result name, entries): `success`, or the RFC 4511 name of the error slapd
        answered (`noSuchObject`, `sizeLimitExceeded`, ...). Entries come one message at
        a time, so that those before a sizeLimitExceeded are kept."""
        entries: list[Entry] = []
        try:
            msgid = self._conn.search_ext(base, _SCOPES[scope], filt, list(attributes),
                                          timeout=self.timeout, sizelimit=size)
            while True:
                kind, data, _id, _controls = self._conn.result3(msgid, all=0,
                                                                timeout=self.timeout)
                if kind == ldap.RES_SEARCH_RESULT:
                    return "success", entries
                # Search references come as (None, [urls]): not entries.
                entries += [Entry(dn, attrs) for dn, attrs in data or () if dn is not None]
        except CONNECTION_ERRORS as exc:
            raise self._gone(exc) from None
        except ldap.LDAPError as exc:
            return _result_name(exc), entries

    def may_delete_value(self, dn: str, attribute: str, value: bytes) -> bool:
        """Whether this account may write `attribute` of `dn`: asked by deleting a value the
        entry does not have. slapd checks the ACL first, so insufficientAccessRights means
        no; any other answer (noSuchAttribute, inappropriateMatching) means the write got
        past the ACL, and changed nothing."""
        try:
            self._conn.modify_s(dn, [(ldap.MOD_DELETE, attribute, [value])])
        except ldap.INSUFFICIENT_ACCESS:
            return False
        except CONNECTION_ERRORS as exc:
            raise self._gone(exc) from None
        except ldap.LDAPError:
            pass  # past the ACL check: the value was missing, nothing changed
        return True


def _result_name(exc: BaseException) -> str:
    """The RFC 4511 name of an LDAP error's result code (`noSuchObject`)."""
    detail = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    return RESULT_NAMES.get(detail.get("result", -1)) or str(
        detail.get("desc") or type(exc).__name__)


def parent_dn(dn: str) -> str | None:
    """dn without its first RDN (`cn=x,ou=services,dc=example` -> `ou=services,dc=example`);
    None when dn has no parent or is not a DN."""
    try:
        parts = str2dn(dn)
    except ldap.DECODING_ERROR:
        return None
    return dn2str(parts[1:]) if len(parts) > 1 else None


def escape_filter(value: str) -> str:
    """A value as it may stand in a search filter (RFC 4515 escapes)."""
    escaped: str = escape_filter_chars(value)
    return escaped
