"""The responder's read-only view of the directory: a `KeySource` over python-ldap.

Reads, as the responder's service account (or SASL EXTERNAL over ldapi://):
- the change token: `contextCSN` of the database suffix (syncprov keeps it; one base read);
- changes: `(entryCSN>=<csn>)` under the suffix, DN, entryCSN and the slots only (paged);
- look-ups: `(|(wkdAddressHash=<hash>@<domain>)(gpgMailbox=<l>@<domain>))` among entries
  with a `pgpKey` that is not `pgpDisabled` — both attributes are indexed; `l=` is only a
  hint for keys written by LDAP tools without the hash attribute;
- mirroring: every such entry, paged (500 a page).
An entry's published addresses are its `gpgMailbox` values (which only the milter and the
administrator may write), narrowed to those named by `wkdAddressHash` when it has any; each
address gets the key cleaned down to its own user ID. An entry is served only when the
system has checked its pgpKey: `wkdKeyDigest` is the SHA-256 of the pgpKey value and there
is no `wkdKeyProblem` (a conflicting or invalid LDAP edit is not served; the milter's
follower, milter_wkd.reconcile, derives or withholds it within a second). The responder's
account never needs `mail`.
Change tracking needs read access to `entryCSN` of the key entries; without it
`changes_since` raises `ChangesUnknown` and the cache starts over on every change.

Configuration: the [directory] section as `Config.responder_directory` gives it (bound as
[web] bind_dn when that is set), read and connected to exactly as the store does it
(`milter_wkd.directory`: uri, bind_dn, bind_password(_file), ca_file - ldaps:// demands a
valid certificate -, timeout); base_dn. One connection, one operation at a time.

Failures: any LDAP failure is `SourceUnavailable`: an unusable uri or password file, a
refused bind, no answer within `timeout` (to connect, or for each page or small search), a
broken connection; the connection is then dropped and the next call opens a new one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import ldap
from ldap.controls import SimplePagedResultsControl
from ldap.filter import escape_filter_chars

from milter_wkd.config import DirectoryConfig
from milter_wkd.directory import ConnectionPool, close_connection, key_digest, ldap_reason
from milter_wkd.errors import BadAddress, MilterWkdError
from milter_wkd.values import Address
from milter_wkd.web.source import (
    Change,
    ChangesUnknown,
    Published,
    SourceUnavailable,
    address_slot,
)

log = logging.getLogger(__name__)

HASH_ATTRIBUTE = "wkdAddressHash"
KEY_ATTRIBUTE = "pgpKey"
KEY_CLASS = "wkdKeyHolder"
MAILBOX_ATTRIBUTE = "gpgMailbox"
DIGEST_ATTRIBUTE = "wkdKeyDigest"
PROBLEM_ATTRIBUTE = "wkdKeyProblem"
MAX_LOGGED_UNCHECKED = 10_000
PAGE_SIZE = 500
# A search result entry as python-ldap gives it: DN, {attribute: [values]}.
Entry = tuple[str, dict[str, list[bytes]]]


class LdapKeySource:
    def __init__(self, config: DirectoryConfig) -> None:
        self.config = config
        # objectClass is indexed (eq), so slapd only visits key holders; the presence tests
        # have no index on purpose (no enumeration by wildcard) and only filter those.
        self._holders = f"(objectClass={KEY_CLASS})"
        self._published = (f"(&{self._holders}({KEY_ATTRIBUTE}=*)({MAILBOX_ATTRIBUTE}=*)"
                           "(!(pgpDisabled=1)))")
        self._lock = threading.Lock()
        self._conn: Any = None
        self._suffix: str | None = None
        self._csn_ok: bool | None = None
        self._logged: set[tuple[str, str]] = set()

    # -- connection ---------------------------------------------------------------------

    def _connect(self) -> Any:
        # The store's own connection code: same URI handling, TLS, timeouts and binds.
        try:
            return ConnectionPool(self.config).open()
        except MilterWkdError as exc:
            raise SourceUnavailable(exc.reason) from None

    def _search(self, base: str, filt: str, attributes: list[str], *,
                scope: int = ldap.SCOPE_SUBTREE, page: int = 0, cookie: bytes = b"",
                ) -> tuple[list[Entry], bytes]:
        """One search (or, with `page`, one page of a paged search): the entries and the
        cookie for the next page (empty: the last). A missing base is no entries."""
        timeout = self.config.timeout
        controls = [SimplePagedResultsControl(True, size=page, cookie=cookie)] if page else None
        with self._lock:  # one operation at a time on the one connection
            if self._conn is None:
                self._conn = self._connect()
            conn = self._conn
            try:
                msgid = conn.search_ext(base, scope, filt, attributes, serverctrls=controls,
                                        timeout=timeout)
                _type, data, _id, answered = conn.result3(msgid, all=1, timeout=timeout)
            except ldap.NO_SUCH_OBJECT:
                return [], b""
            except ldap.LDAPError as exc:
                self._drop()
                raise SourceUnavailable(f"directory search failed: {ldap_reason(exc)}") from None
        # Search references come as (None, [urls]): not entries.
        entries = [(dn, attrs) for dn, attrs in data if dn is not None]
        next_cookie = next((c.cookie for c in answered or ()
                            if c.controlType == SimplePagedResultsControl.controlType), b"")
        return entries, next_cookie or b""

    def _paged(self, base: str, filt: str, attributes: list[str]) -> Iterator[Entry]:
        # Page by page: the lock is free between pages, and `timeout` bounds each page
        # rather than a result of any size.
        cookie = b""
        while True:
            entries, cookie = self._search(base, filt, attributes, page=PAGE_SIZE,
                                           cookie=cookie)
            yield from entries
            if not cookie:
                return

    # -- KeySource ------------------------------------------------------------------------

    def _suffix_dn(self) -> str:
        """The entry that carries contextCSN: base_dn or its nearest ancestor that has it."""
        if self._suffix is not None:
            return self._suffix
        dn = self.config.base_dn
        while dn:
            entries, _ = self._search(dn, "(objectClass=*)", ["contextCSN"],
                                      scope=ldap.SCOPE_BASE)
            if entries and _values(entries[0], "contextCSN"):
                self._suffix = dn
                return dn
            dn = dn.partition(",")[2]
        raise SourceUnavailable(f"no contextCSN at or above {self.config.base_dn} "
                                "(is the syncprov overlay configured?)")

    def change_token(self) -> str:
        entries, _ = self._search(self._suffix_dn(), "(objectClass=*)", ["contextCSN"],
                                  scope=ldap.SCOPE_BASE)
        values = _values(entries[0], "contextCSN") if entries else []
        return "|".join(sorted(v.decode() for v in values))

    def changes_since(self, token: str) -> list[Change]:
        filt = f"(entryCSN>={escape_filter_chars(token)})" if token else "(objectClass=*)"
        attributes = ["entryCSN", HASH_ATTRIBUTE, KEY_ATTRIBUTE, "pgpDisabled",
                      MAILBOX_ATTRIBUTE, DIGEST_ATTRIBUTE, PROBLEM_ATTRIBUTE]
        if not self._csn_readable():
            raise ChangesUnknown("entryCSN of key entries is not readable")
        changes = []
        for entry in self._paged(self._suffix_dn(), filt, attributes):
            csn = max((v.decode() for v in _values(entry, "entryCSN")), default="")
            publishes = self._checked(entry) and (b"1" not in _values(entry, "pgpDisabled"))
            slots = self._slots(entry) if publishes else frozenset()
            published = self._published_entry(entry) if publishes else None
            changes.append(Change(entry[0], csn, slots, published))
        return changes

    def lookup(self, slot: str, local_hint: str | None = None) -> list[Published]:
        domain = slot.partition("@")[2]
        alternatives = [f"({HASH_ATTRIBUTE}={escape_filter_chars(slot)})"]
        if local_hint:
            wanted = escape_filter_chars(f"{local_hint}@{domain}")
            alternatives.append(f"({MAILBOX_ATTRIBUTE}={wanted})")
        filt = f"(&{self._published}(|{''.join(alternatives)}))"
        entries, _ = self._search(self.config.base_dn, filt, self._entry_attributes())
        found = [self._published_entry(e) for e in entries]
        return [p for p in found if p is not None and slot in p.slots()]

    def iter_published(self) -> Iterator[Published]:
        for entry in self._paged(self.config.base_dn, self._published,
                                 self._entry_attributes()):
            published = self._published_entry(entry)
            if published is not None:
                yield published

    def published_dns(self) -> set[str]:
        # Every key holder: a superset of the publishing entries is all the delete check
        # needs (a holder that stops publishing is a modify, seen by its entryCSN).
        return {dn for dn, _ in self._paged(self.config.base_dn, self._holders, ["1.1"])}

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            close_connection(self._conn)
            self._conn = None

    # -- entries ----------------------------------------------------------------------------

    def _entry_attributes(self) -> list[str]:
        return [KEY_ATTRIBUTE, "entryCSN", MAILBOX_ATTRIBUTE, HASH_ATTRIBUTE, DIGEST_ATTRIBUTE,
                PROBLEM_ATTRIBUTE]

    def _checked(self, entry: Entry) -> bool:
        """Has the system checked this entry's pgpKey and found nothing wrong with it?"""
        keys = _values(entry, KEY_ATTRIBUTE)
        if not keys:
            return False
        problem = _values(entry, PROBLEM_ATTRIBUTE)
        digest = _values(entry, DIGEST_ATTRIBUTE)
        if problem:
            why = "withheld: " + problem[0].decode("utf-8", "replace")
        elif not digest or digest[0].decode("ascii", "replace").lower() != key_digest(keys[0]):
            why = "its pgpKey was not checked by the system (wkdKeyDigest missing or stale)"
        else:
            return True
        if len(self._logged) < MAX_LOGGED_UNCHECKED and (entry[0], why) not in self._logged:
            self._logged.add((entry[0], why))
            log.info("not serving the key of %s: %s", entry[0], why)
        return False

    def _csn_readable(self) -> bool:
        """Can we read entryCSN of key entries? Asked once, of any one of them."""
        if self._csn_ok is None:
            # The first page of one entry; the rest of that paged search is never asked for.
            entries, _ = self._search(self.config.base_dn, self._published, ["entryCSN"],
                                      page=1)
            if not entries:
                return True  # nothing published yet: ask again next time
            self._csn_ok = bool(_values(entries[0], "entryCSN"))
            if not self._csn_ok:
                log.error("cannot read entryCSN of %s: every directory change will empty "
                          "the key cache (grant the WKD account read on entryCSN)",
                          entries[0][0])
        return self._csn_ok

    def _addresses(self, entry: Entry) -> tuple[Address, ...]:
        hashes = {v.decode("utf-8", "replace").lower() for v in _values(entry, HASH_ATTRIBUTE)}
        found: dict[str, Address] = {}
        for raw in _values(entry, MAILBOX_ATTRIBUTE):
            try:
                address = Address.parse(raw.decode("utf-8"))
            except (BadAddress, UnicodeDecodeError):
                log.warning("ignoring unusable gpgMailbox %r of %s", raw[:80], entry[0])
                continue
            if not hashes or address_slot(address) in hashes:
                found.setdefault(address.key, address)
        return tuple(found.values())

    def _slots(self, entry: Entry) -> frozenset[str]:
        slots = {address_slot(a) for a in self._addresses(entry)}
        slots |= {v.decode("utf-8", "replace").lower() for v in _values(entry, HASH_ATTRIBUTE)}
        return frozenset(slots)

    def _published_entry(self, entry: Entry) -> Published | None:
        keys = _values(entry, KEY_ATTRIBUTE)
        if not keys or not self._checked(entry):
            return None
        csn = max((v.decode() for v in _values(entry, "entryCSN")), default="")
        return Published(entry[0], self._addresses(entry), keys[0], csn)


def _values(entry: Entry, name: str) -> list[bytes]:
    attributes = entry[1]
    found = attributes.get(name)  # slapd names attributes as the schema does: usually a hit
    if found is not None:
        return found
    for key, values in attributes.items():
        if key.lower() == name.lower():
            return values
    return []
