"""Connections to the directory over python-ldap (OpenLDAP's own libldap: an operation
costs about a tenth of what pure-Python ldap3 spends encoding it), and the searches every
part of the store makes.

- `ConnectionPool`: bound connections, each used by one thread at a time (the milter is
  multi-threaded; the responder's view keeps one);
- `searches(conn, queries, timeout)`: several (paged) searches sent together, one round trip;
- `find_suffix`, `read_change_token`: the entry that carries contextCSN and its value;
- `ldap_reason`, `RESULT_NAMES`: LDAP failures in the words admins find in slapd's docs.

Configuration: the [directory] section (uri ldap://, ldaps:// or ldapi://; bind_dn and
bind_password(_file) for a simple bind, else SASL EXTERNAL on ldapi://; ca_file - ldaps://
demands a valid certificate -; timeout; pool_size).

Failures: an unusable URI or password file is `DirectoryError`; no answer within
`timeout`, a refused connection, a refused bind, all connections busy are
`DirectoryUnavailable`. An operation on a pooled connection that broke (slapd restarted)
is retried once on a fresh one (not after a timeout: a hung slapd would cost twice).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import ldap
from ldap.controls import SimplePagedResultsControl

from milter_wkd.config import DirectoryConfig
from milter_wkd.errors import DirectoryError, DirectoryUnavailable
from milter_wkd.store.schema import Entry

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_LDAPI_SOCKET = "/var/run/slapd/ldapi"
# Entries a paged search asks for per page.
PAGE_SIZE = 200
BASE, ONELEVEL, SUBTREE = ldap.SCOPE_BASE, ldap.SCOPE_ONELEVEL, ldap.SCOPE_SUBTREE
# (base, filter, attributes, scope)
Query = tuple[str, str, Sequence[str], int]

# Errors that mean "the connection is gone or never came": retry once, then give up.
CONNECTION_ERRORS = (ldap.SERVER_DOWN, ldap.TIMEOUT, ldap.CONNECT_ERROR, OSError)
# Server answers that mean "not now".
BUSY_RESULTS = (ldap.BUSY, ldap.UNAVAILABLE, ldap.TIMELIMIT_EXCEEDED, ldap.OTHER,
                 ldap.LOOP_DETECT, ldap.ADMINLIMIT_EXCEEDED)

def _one_uri(uri: str) -> tuple[str, str]:
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("ldap", "ldaps", "ldapi"):
        raise DirectoryError(f"unsupported directory URI {uri!r} (ldap://, ldaps://, ldapi://)")
    rest = rest.rstrip("/")
    if scheme == "ldapi":
        return scheme, "ldapi://" + quote(unquote(rest) or DEFAULT_LDAPI_SOCKET, safe="")
    return scheme, f"{scheme}://{rest}"


def _uri(config: DirectoryConfig) -> tuple[str, str]:
    """The scheme and the URI (list) as libldap wants it (ldapi paths percent-encoded).

    `uri` may list several servers, separated by spaces or commas (providers in order of
    preference, e.g. two OpenLDAP multi-provider peers): libldap tries them in that order
    on every new connection, each within `timeout`, so a connection that broke (its server
    died) is opened again on the next one that answers. The scheme that decides the bind
    is "ldaps" when any is ldaps:// (certificates are checked), "ldapi" when all are."""
    parts = [p for p in config.uri.replace(",", " ").split() if p]
    if not parts:
        raise DirectoryError("[directory] uri is empty")
    found = [_one_uri(p) for p in parts]
    schemes = {scheme for scheme, _ in found}
    if len(schemes) > 1 and "ldapi" in schemes and not config.bind_dn:
        raise DirectoryError("a list of directory URIs that mixes ldapi:// with others needs "
                             "bind_dn (SASL EXTERNAL works over ldapi:// only)")
    scheme = ("ldaps" if "ldaps" in schemes else "ldapi" if schemes == {"ldapi"}
              else "ldap")
    return scheme, " ".join(u for _, u in found)


def _password(config: DirectoryConfig) -> str:
    if config.bind_password_file:
        try:
            lines = Path(config.bind_password_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise DirectoryError(f"cannot read bind_password_file: {exc.strerror}") from None
        return lines[0] if lines else ""
    return config.bind_password


class ConnectionPool:
    """Bound connections, each used by one thread at a time."""

    def __init__(self, config: DirectoryConfig) -> None:
        self.config = config
        self.scheme, self.uri = _uri(config)  # validates the URI once, early
        self.password = _password(config) if config.bind_dn else ""
        self.idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self.slots = threading.BoundedSemaphore(max(1, config.pool_size))

    def unbound(self) -> Any:
        """A new connection with every option set (nothing sent yet: libldap connects on
        the first operation), not bound: `open` binds it as the configured account, the
        portal's sign-in (store.auth) as the user."""
        cfg = self.config
        conn = ldap.initialize(self.uri)
        try:
            conn.set_option(ldap.OPT_PROTOCOL_VERSION, 3)
            conn.set_option(ldap.OPT_REFERRALS, 0)
            # Connecting, and every synchronous operation, give up after `timeout`.
            conn.set_option(ldap.OPT_NETWORK_TIMEOUT, cfg.timeout)
            conn.set_option(ldap.OPT_TIMEOUT, cfg.timeout)
            if self.scheme == "ldaps":
                conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
                if cfg.ca_file:
                    conn.set_option(ldap.OPT_X_TLS_CACERTFILE, cfg.ca_file)
                conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)  # after the TLS options
        except ldap.LDAPError as exc:
            close_connection(conn)
            raise DirectoryUnavailable(
                f"directory {cfg.uri}: cannot set up a connection: {ldap_reason(exc)}",
            ) from None
        return conn

    def open(self) -> Any:
        cfg = self.config
        conn = self.unbound()
        try:
            if cfg.bind_dn:
                conn.simple_bind_s(cfg.bind_dn, self.password)
            elif self.scheme == "ldapi":
                conn.sasl_external_bind_s()
            else:
                conn.simple_bind_s("", "")
        except CONNECTION_ERRORS as exc:
            close_connection(conn)
            raise DirectoryUnavailable(
                f"directory {cfg.uri} unreachable: {ldap_reason(exc)}") from None
        except ldap.LDAPError as exc:
            close_connection(conn)
            raise DirectoryUnavailable(
                f"bind to {cfg.uri} as {cfg.bind_dn or 'default identity'} refused: "
                f"{ldap_reason(exc)}") from None
        return conn

    def run(self, operation: Callable[[Any], T]) -> T:
        wait = max(self.config.timeout * 2, 1.0)
        if not self.slots.acquire(timeout=wait):
            raise DirectoryUnavailable("all directory connections are busy")
        try:
            try:
                conn, reused = self.idle.get_nowait(), True
            except queue.Empty:
                conn, reused = self.open(), False
            for attempt in (1, 2):
                try:
                    result = operation(conn)
                except CONNECTION_ERRORS as exc:
                    close_connection(conn)
                    # A pooled connection may have died with a restarted slapd: one retry on
                    # a fresh one. Not after a timeout: a hung slapd would cost twice.
                    if attempt == 1 and reused and not isinstance(exc, ldap.TIMEOUT):
                        log.info("directory connection broke (%s); reconnecting", ldap_reason(exc))
                        conn = self.open()
                        continue
                    raise DirectoryUnavailable(
                        f"directory {self.config.uri} did not answer: {ldap_reason(exc)}") from None
                except BaseException:
                    self.idle.put(conn)
                    raise
                self.idle.put(conn)
                return result
            raise AssertionError("unreachable")
        finally:
            self.slots.release()

    def close(self) -> None:
        while True:
            try:
                close_connection(self.idle.get_nowait())
            except queue.Empty:
                return


def close_connection(conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.unbind_ext_s()


# RFC 4511 section 4.1.9 names of result codes: what admins find in slapd's logs and docs.
RESULT_NAMES = {
    1: "operationsError", 2: "protocolError", 3: "timeLimitExceeded", 4: "sizeLimitExceeded",
    7: "authMethodNotSupported", 8: "strongerAuthRequired", 11: "adminLimitExceeded",
    12: "unavailableCriticalExtension", 13: "confidentialityRequired",
    16: "noSuchAttribute", 17: "undefinedAttributeType", 18: "inappropriateMatching",
    19: "constraintViolation", 20: "attributeOrValueExists", 21: "invalidAttributeSyntax",
    32: "noSuchObject", 34: "invalidDNSyntax", 48: "inappropriateAuthentication",
    49: "invalidCredentials", 50: "insufficientAccessRights", 51: "busy", 52: "unavailable",
    53: "unwillingToPerform", 54: "loopDetect", 64: "namingViolation",
    65: "objectClassViolation", 66: "notAllowedOnNonLeaf", 67: "notAllowedOnRDN",
    68: "entryAlreadyExists", 69: "objectClassModsProhibited", 80: "other",
}


def ldap_reason(exc: BaseException) -> str:
    detail = exc.args[0] if exc.args else None
    if isinstance(detail, dict):
        # python-ldap: {"result": 50, "desc": "Insufficient access", "info": "...", ...}
        text = RESULT_NAMES.get(detail.get("result", -1)) or str(
            detail.get("desc") or type(exc).__name__)
        if detail.get("info"):
            text += f" ({detail['info']})"
    else:
        text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def encode(values: Sequence[str | bytes]) -> list[bytes]:
    return [v if isinstance(v, bytes) else v.encode("utf-8") for v in values]


def searches(conn: Any, queries: Sequence[Query], timeout: float, *,
             page_size: int = PAGE_SIZE) -> list[list[Entry]]:
    """Entries of several searches, sent together: one round trip, not one each. Searches
    below a base are paged (page_size entries a page); a missing base is no entries."""
    found: list[list[Entry]] = [[] for _ in queries]
    paging = [SimplePagedResultsControl(True, size=page_size, cookie=b"") for _ in queries]
    pending = list(range(len(queries)))
    while pending:
        sent: dict[int, int] = {}
        try:
            for i in pending:
                base, filt, attributes, scope = queries[i]
                sent[i] = conn.search_ext(base, scope, filt, list(attributes),
                                          serverctrls=[paging[i]] if scope != BASE else None,
                                          timeout=timeout)
            more = []
            for i in pending:
                try:
                    _type, data, _id, controls = conn.result3(sent.pop(i), all=1,
                                                              timeout=timeout)
                except ldap.NO_SUCH_OBJECT:
                    continue
                # Search references come as (None, [urls]): not entries.
                found[i] += [Entry(dn, attrs) for dn, attrs in data if dn is not None]
                cookie = next((c.cookie for c in controls or ()
                               if c.controlType == SimplePagedResultsControl.controlType), None)
                if cookie:
                    paging[i].cookie = cookie
                    more.append(i)
        except BaseException:
            for msgid in sent.values():  # answers nobody would read
                with contextlib.suppress(Exception):
                    conn.abandon_ext(msgid)
            raise
        pending = more
    return found


def search_page(conn: Any, base: str, scope: int, filt: str, attributes: Sequence[str],
                timeout: float, *, page: int = 0, cookie: bytes = b"",
                ) -> tuple[list[Entry], bytes]:
    """One search (or, with `page`, one page of a paged search): the entries and the cookie
    for the next page (empty: the last). A missing base is no entries."""
    controls = [SimplePagedResultsControl(True, size=page, cookie=cookie)] if page else None
    try:
        msgid = conn.search_ext(base, scope, filt, list(attributes), serverctrls=controls,
                                timeout=timeout)
        _type, data, _id, answered = conn.result3(msgid, all=1, timeout=timeout)
    except ldap.NO_SUCH_OBJECT:
        return [], b""
    entries = [Entry(dn, attrs) for dn, attrs in data if dn is not None]
    next_cookie = next((c.cookie for c in answered or ()
                        if c.controlType == SimplePagedResultsControl.controlType), b"")
    return entries, next_cookie or b""


def find_suffix(read: Callable[[str], Entry | None], base_dn: str) -> str | None:
    """The entry that carries contextCSN (syncprov): base_dn or its nearest ancestor with
    it; `read(dn)` reads one entry's contextCSN. None when none has it (syncprov missing,
    or no read access)."""
    dn = base_dn
    while dn:
        entry = read(dn)
        if entry is not None and entry.values("contextCSN"):
            return dn
        dn = dn.partition(",")[2]
    return None


def change_token(entry: Entry | None) -> str:
    """The change token of a suffix entry: its contextCSN values (one per provider), sorted."""
    return "|".join(sorted(entry.texts("contextCSN"))) if entry is not None else ""
