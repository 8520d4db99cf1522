"""The responder's read-only view of the directory: a `KeyView` over python-ldap.

Reads, as the responder's service account (or SASL EXTERNAL over ldapi://):
- the change token: `contextCSN` of the database suffix (syncprov keeps it; one base read);
- changes: `(entryCSN>=<csn>)` under the suffix, DN, entryCSN and the slots only (paged);
- look-ups: `(|(wkdAddressHash=<hash>@<domain>)(gpgMailbox=<l>@<domain>))` among entries
  with a `pgpKey` that is not `pgpDisabled` — both attributes are indexed; `l=` is only a
  hint for keys written by LDAP tools without the hash attribute;
- look-ups by fingerprint or key ID (HKP, VKS): `(|(gpgFingerprint=X)(gpgSubFingerprint=X))`
  or `(|(pgpCertID=X)(pgpSubKeyID=X))` among the same entries (indexed attributes);
- mirroring: every such entry, paged (500 a page);
- following (`follow`, the optional `FollowsChanges` capability the cache prefers to
  polling the change token): one RFC 4533 refreshAndPersist search of the same entries,
  their hash attributes, gpgMailbox and entryCSN only, on a connection of its own
  (milter_wkd.store.syncrepl: cookie merging, resume, failover along the uri list);
  `read_published(dn)` reads one changed entry whole when it has no hash attribute.
  Counters for tests and logs: `searches` (operations on the view's connection),
  `token_reads`, and the follower's own (`sync`).
What an entry publishes is `store.schema.stored_key`, the rule the write store uses too
(a pgpKey the system checked, its gpgMailbox addresses narrowed by wkdAddressHash); a
disabled one is not served. Each address gets the key cleaned down to its own user ID (by
the cache). A conflicting or invalid LDAP edit is not served; the milter's follower,
milter_wkd.reconcile, derives or withholds it within a second. The responder's account
never needs `mail`.
Change tracking needs read access to `entryCSN` of the key entries; without it
`changes_since` raises `ChangesUnknown` and the cache starts over on every change.

Configuration: the [directory] section as `Config.responder_directory` gives it (bound as
[web] bind_dn when that is set), read and connected to exactly as the store does it
(`store.connection`: uri, bind_dn, bind_password(_file), ca_file - ldaps:// demands a
valid certificate -, timeout); base_dn. One connection, one operation at a time.

Failures: any LDAP failure is `SourceUnavailable`: an unusable uri or password file, a
refused bind, no answer within `timeout` (to connect, or for each page or small search), a
broken connection; the connection is then dropped and the next call opens a new one. A
search on a connection that broke since its last use (slapd restarted, or its server gone:
libldap takes the next of the uri list) is sent once more on a new one first.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import ldap
from ldap.filter import escape_filter_chars

from milter_wkd.config import DirectoryConfig
from milter_wkd.errors import MilterWkdError
from milter_wkd.store.connection import (
    BASE,
    ConnectionPool,
    change_token,
    close_connection,
    find_suffix,
    ldap_reason,
    search_page,
)
from milter_wkd.store.schema import (
    DIGEST,
    KEY_CLASS,
    PROBLEM,
    Entry,
    address_slot,
    checked,
    published_addresses,
)
from milter_wkd.store.syncrepl import SyncFollower, SyncListener
from milter_wkd.store.view import Change, ChangesUnknown, Published, SourceUnavailable

log = logging.getLogger(__name__)

MAX_LOGGED_UNCHECKED = 10_000
# Entries per page when mirroring: pages bound each search's time, not the result size.
PAGE_SIZE = 500
# What the sync asks for: enough to know an entry's slots, never its key.
SYNC_ATTRIBUTES = ["wkdAddressHash", "gpgMailbox", "entryCSN"]


class LdapKeyView:
    def __init__(self, config: DirectoryConfig) -> None:
        self.config = config
        # objectClass is indexed (eq), so slapd only visits key holders; the presence tests
        # have no index on purpose (no enumeration by wildcard) and only filter those.
        self._holders = f"(objectClass={KEY_CLASS})"
        self._published = (f"(&{self._holders}(pgpKey=*)(gpgMailbox=*)(!(pgpDisabled=1)))")
        self._lock = threading.Lock()
        self._conn: Any = None
        self._suffix: str | None = None
        self._csn_ok: bool | None = None
        self._logged: set[tuple[str, str]] = set()
        # Operations sent on the view's connection (tests count misses that reach LDAP),
        # of them contextCSN reads (the polling path).
        self.searches = 0
        self.token_reads = 0
        self.sync: SyncFollower | None = None

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
        with self._lock:  # one operation at a time on the one connection
            self.searches += 1
            while True:
                reused = self._conn is not None
                if self._conn is None:
                    self._conn = self._connect()
                try:
                    return search_page(self._conn, base, scope, filt, attributes,
                                       self.config.timeout, page=page, cookie=cookie)
                except (ldap.SERVER_DOWN, ldap.CONNECT_ERROR) as exc:
                    self._drop()
                    # The connection died with a restarted slapd (or its server: the
                    # next in the uri list takes over): once more on a new one. Not after
                    # a timeout: a hung slapd would cost twice.
                    if not reused or cookie:
                        raise SourceUnavailable(
                            f"directory search failed: {ldap_reason(exc)}") from None
                except ldap.LDAPError as exc:
                    self._drop()
                    raise SourceUnavailable(
                        f"directory search failed: {ldap_reason(exc)}") from None

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

    def _read(self, dn: str) -> Entry | None:
        entries, _ = self._search(dn, "(objectClass=*)", ["contextCSN"], scope=BASE)
        return entries[0] if entries else None

    # -- KeyView ----------------------------------------------------------------------------

    def _suffix_dn(self) -> str:
        """The entry that carries contextCSN: base_dn or its nearest ancestor that has it."""
        if self._suffix is None:
            self._suffix = find_suffix(self._read, self.config.base_dn)
            if self._suffix is None:
                raise SourceUnavailable(f"no contextCSN at or above {self.config.base_dn} "
                                        "(is the syncprov overlay configured?)")
        return self._suffix

    def change_token(self) -> str:
        suffix = self._suffix_dn()
        self.token_reads += 1
        return change_token(self._read(suffix))

    def changes_since(self, token: str) -> list[Change]:
        filt = f"(entryCSN>={escape_filter_chars(token)})" if token else "(objectClass=*)"
        attributes = ["entryCSN", "pgpDisabled", *self._entry_attributes()]
        if not self._csn_readable():
            raise ChangesUnknown("entryCSN of key entries is not readable")
        changes = []
        for entry in self._paged(self._suffix_dn(), filt, attributes):
            published = (self._published_entry(entry)
                         if entry.text("pgpDisabled") != "1" else None)
            slots = self._slots(entry) if published is not None else frozenset()
            changes.append(Change(entry.dn, _csn(entry), slots, published))
        return changes

    def lookup(self, slot: str, local_hint: str | None = None) -> list[Published]:
        domain = slot.partition("@")[2]
        alternatives = [f"(wkdAddressHash={escape_filter_chars(slot)})"]
        if local_hint:
            wanted = escape_filter_chars(f"{local_hint}@{domain}")
            alternatives.append(f"(gpgMailbox={wanted})")
        filt = f"(&{self._published}(|{''.join(alternatives)}))"
        entries, _ = self._search(self.config.base_dn, filt, self._entry_attributes())
        found = [self._published_entry(e) for e in entries]
        return [p for p in found if p is not None and slot in p.slots()]

    def lookup_fingerprint(self, fingerprint: str) -> list[Published]:
        wanted = escape_filter_chars(fingerprint.upper())
        names = (("pgpCertID", "pgpSubKeyID") if len(fingerprint) == 16
                 else ("gpgFingerprint", "gpgSubFingerprint"))
        filt = f"(&{self._published}(|({names[0]}={wanted})({names[1]}={wanted})))"
        entries, _ = self._search(self.config.base_dn, filt, self._entry_attributes())
        return [p for p in map(self._published_entry, entries) if p is not None]

    def iter_published(self) -> Iterator[Published]:
        for entry in self._paged(self.config.base_dn, self._published,
                                 self._entry_attributes()):
            published = self._published_entry(entry)
            if published is not None:
                yield published

    def published_dns(self) -> set[str]:
        # Every key holder: a superset of the publishing entries is all the delete check
        # needs (a holder that stops publishing is a modify, seen by its entryCSN).
        return {e.dn for e in self._paged(self.config.base_dn, self._holders, ["1.1"])}

    # -- FollowsChanges (the RFC 4533 sync) -------------------------------------------------

    def follow(self, listener: SyncListener, stop: threading.Event) -> None:
        """One refreshAndPersist search of the publishing entries' hash attributes (no key
        bytes) on a connection of its own, until `stop` (store.syncrepl; raises
        SyncUnsupported when the directory does not offer it)."""
        if self.sync is None or self.sync.listener is not listener:
            self.sync = SyncFollower(self.config, self.config.base_dn, self._published,
                                     SYNC_ATTRIBUTES, listener)
        self.sync.run(stop)

    def sync_slots(self, entry: Entry) -> frozenset[str]:
        hashes = entry.texts("wkdAddressHash")
        if hashes:  # they name every published address: no address to parse
            return frozenset(v.lower() for v in hashes)
        return self._slots(entry)

    def read_published(self, dn: str) -> Published | None:
        entries, _ = self._search(dn, self._published, self._entry_attributes(), scope=BASE)
        return self._published_entry(entries[0]) if entries else None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            close_connection(self._conn)
            self._conn = None

    # -- entries ----------------------------------------------------------------------------

    def _entry_attributes(self) -> list[str]:
        return ["pgpKey", "entryCSN", "gpgMailbox", "wkdAddressHash", DIGEST, PROBLEM]

    def _csn_readable(self) -> bool:
        """Can we read entryCSN of key entries? Asked once, of any one of them."""
        if self._csn_ok is None:
            # The first page of one entry; the rest of that paged search is never asked for.
            entries, _ = self._search(self.config.base_dn, self._published, ["entryCSN"],
                                      page=1)
            if not entries:
                return True  # nothing published yet: ask again next time
            self._csn_ok = bool(entries[0].values("entryCSN"))
            if not self._csn_ok:
                log.error("cannot read entryCSN of %s: every directory change will empty "
                          "the key cache (grant the WKD account read on entryCSN)",
                          entries[0].dn)
        return self._csn_ok

    def _slots(self, entry: Entry) -> frozenset[str]:
        slots = {address_slot(a) for a in published_addresses(entry)}
        slots |= {v.lower() for v in entry.texts("wkdAddressHash")}
        return frozenset(slots)

    def _published_entry(self, entry: Entry) -> Published | None:
        """The entry as the cache wants it (the armored key, cleaned per address by the
        cache), when `store.schema.checked` finds it publishes one."""
        keys = entry.values("pgpKey")
        if not keys:
            return None
        why = checked(entry)
        if why is not None:
            if (len(self._logged) < MAX_LOGGED_UNCHECKED
                    and (entry.dn, why) not in self._logged):
                self._logged.add((entry.dn, why))
                log.info("not serving the key of %s: %s", entry.dn, why)
            return None
        return Published(entry.dn, published_addresses(entry), keys[0], _csn(entry))


def _csn(entry: Entry) -> str:
    return max(entry.texts("entryCSN"), default="")
