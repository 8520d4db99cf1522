"""A plain LDAP client for the tests (python-ldap straight, not the store's connection code):
binds as anyone, and tells what slapd answered by its RFC 4511 result name, so that the ACL
and setup tests check slapd's configuration independently of milter_wkd.store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ldap

TIMEOUT = 5.0
# RFC 4511 names of the results these tests expect (anything else is shown by its code).
RESULT_NAMES = {
    0: "success", 4: "sizeLimitExceeded", 8: "strongerAuthRequired",
    11: "adminLimitExceeded", 19: "constraintViolation", 32: "noSuchObject",
    49: "invalidCredentials", 50: "insufficientAccessRights", 53: "unwillingToPerform",
    65: "objectClassViolation",
}
# A search result entry as python-ldap gives it: DN, {attribute: [values]}.
Entry = tuple[str, dict[str, list[bytes]]]


def bind(uri: str, dn: str = "", password: str = "") -> Any:
    """A connection bound with a simple bind (empty dn: anonymous); raises ldap.LDAPError."""
    conn = ldap.initialize(uri)
    conn.set_option(ldap.OPT_PROTOCOL_VERSION, 3)
    conn.set_option(ldap.OPT_NETWORK_TIMEOUT, TIMEOUT)
    conn.set_option(ldap.OPT_TIMEOUT, TIMEOUT)
    try:
        conn.simple_bind_s(dn, password)
    except ldap.LDAPError:
        conn.unbind_ext_s()
        raise
    return conn


def result_name(exc: ldap.LDAPError) -> str:
    detail = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    code = detail.get("result")
    return RESULT_NAMES.get(code, f"result {code} ({detail.get('desc')})")


def outcome(operation: Callable[[], object]) -> str:
    """Run one LDAP operation: 'success' or the name of the result slapd refused it with."""
    try:
        operation()
    except ldap.LDAPError as exc:
        return result_name(exc)
    return "success"


def encode(values: Sequence[str | bytes]) -> list[bytes]:
    return [v if isinstance(v, bytes) else v.encode() for v in values]


def answer(conn: Any, base: str, filt: str, attributes: Sequence[str] = ("*",),
           scope: int = ldap.SCOPE_SUBTREE) -> tuple[str, list[Entry]]:
    """A search's result name and its entries, those sent before an error result included
    (python-ldap's search_s drops them when the search ends in sizeLimitExceeded)."""
    entries: list[Entry] = []
    try:
        msgid = conn.search_ext(base, scope, filt, list(attributes))
        while True:
            kind, data, _id, _controls = conn.result3(msgid, all=0, timeout=TIMEOUT)
            if kind == ldap.RES_SEARCH_RESULT:
                return "success", entries
            entries += [(dn, attrs) for dn, attrs in data if dn is not None]
    except (ldap.SERVER_DOWN, ldap.TIMEOUT):
        raise
    except ldap.LDAPError as exc:
        return result_name(exc), entries
