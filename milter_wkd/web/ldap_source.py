"""The responder's read-only view of the directory: a `KeySource` over ldap3.

Reads, as the responder's service account (or SASL EXTERNAL over ldapi://):
- the change token: `contextCSN` of the database suffix (syncprov keeps it; one base read);
- changes: `(entryCSN>=<csn>)` under the suffix, DN, entryCSN and the slots only;
- look-ups: `(|(wkdAddressHash=<hash>@<domain>)(gpgMailbox=<l>@<domain>))` among entries
  with a `pgpKey` that is not `pgpDisabled` — both attributes are indexed; `l=` is only a
  hint for keys written by LDAP tools without the hash attribute;
- mirroring: every such entry, paged (500 a page).
An entry's published addresses are its `gpgMailbox` values (which only the milter and the
administrator may write), narrowed to those named by `wkdAddressHash` when it has any; each
address gets the key cleaned down to its own user ID (a user may rewrite their own pgpKey,
never the addresses it is served for). The responder's account never needs `mail`.
Change tracking needs read access to `entryCSN` of the key entries; without it
`changes_since` raises `ChangesUnknown` and the cache starts over on every change.
Any LDAP failure is `SourceUnavailable`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars

from milter_wkd.config import DirectoryConfig
from milter_wkd.errors import BadAddress
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
PAGE_SIZE = 500
_PAGED_OID = "1.2.840.113556.1.4.319"


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

    # -- connection ---------------------------------------------------------------------

    def _connect(self) -> Any:
        cfg = self.config
        tls = None
        if cfg.uri.lower().startswith("ldaps://") and cfg.ca_file:
            tls = ldap3.Tls(ca_certs_file=cfg.ca_file)
        server = ldap3.Server(cfg.uri, get_info=ldap3.NONE, connect_timeout=cfg.timeout,
                              tls=tls)
        password = cfg.bind_password
        if cfg.bind_password_file:
            password = Path(cfg.bind_password_file).read_text().splitlines()[0]
        # SYNC under our own lock: SAFE_SYNC deep-copies every response (a third of the
        # time of a cold load) and SAFE_RESTARTABLE retries for 30 s while slapd is down;
        # we drop a failed connection and reconnect on the next call instead.
        options: dict[str, Any] = {"client_strategy": ldap3.SYNC,
                                   "receive_timeout": max(1, math.ceil(cfg.timeout)),
                                   "read_only": True, "raise_exceptions": True}
        if cfg.bind_dn:
            options.update(user=cfg.bind_dn, password=password)
        elif cfg.uri.lower().startswith("ldapi://"):
            options.update(authentication=ldap3.SASL, sasl_mechanism=ldap3.EXTERNAL)
        try:
            return ldap3.Connection(server, auto_bind=True, **options)
        except LDAPException as exc:
            raise SourceUnavailable(f"cannot bind to {cfg.uri}: {exc}") from None

    def _search(self, base: str, filt: str, attributes: list[str], *,
                scope: str = ldap3.SUBTREE, paged_cookie: bytes | None = None,
                paged: bool = False) -> tuple[list[dict[str, Any]], bytes | None]:
        kwargs: dict[str, Any] = {}
        if paged:
            kwargs.update(paged_size=PAGE_SIZE, paged_cookie=paged_cookie)
        with self._lock:  # one operation at a time on the one connection
            if self._conn is None:
                self._conn = self._connect()
            conn = self._conn
            try:
                conn.search(base, filt, search_scope=scope, attributes=attributes, **kwargs)
            except LDAPException as exc:
                if type(exc).__name__ == "LDAPNoSuchObjectResult":
                    return [], None
                self._drop()
                raise SourceUnavailable(f"directory search failed: {exc}") from None
            result, response = conn.result, conn.response
        entries = [r for r in response or [] if r.get("type") == "searchResEntry"]
        cookie = None
        if paged:
            control = (result or {}).get("controls", {}).get(_PAGED_OID)
            cookie = control["value"]["cookie"] if control else None
        return entries, cookie or None

    def _paged(self, filt: str, attributes: list[str]) -> Iterator[dict[str, Any]]:
        cookie: bytes | None = None
        while True:
            entries, cookie = self._search(self.config.base_dn, filt, attributes,
                                           paged=True, paged_cookie=cookie)
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
                                      scope=ldap3.BASE)
            if entries and _values(entries[0], "contextCSN"):
                self._suffix = dn
                return dn
            dn = dn.partition(",")[2]
        raise SourceUnavailable(f"no contextCSN at or above {self.config.base_dn} "
                                "(is the syncprov overlay configured?)")

    def change_token(self) -> str:
        entries, _ = self._search(self._suffix_dn(), "(objectClass=*)", ["contextCSN"],
                                  scope=ldap3.BASE)
        values = _values(entries[0], "contextCSN") if entries else []
        return "|".join(sorted(v.decode() for v in values))

    def changes_since(self, token: str) -> list[Change]:
        filt = f"(entryCSN>={escape_filter_chars(token)})" if token else "(objectClass=*)"
        attributes = ["entryCSN", HASH_ATTRIBUTE, KEY_ATTRIBUTE, "pgpDisabled",
                      MAILBOX_ATTRIBUTE]
        if not self._csn_readable():
            raise ChangesUnknown("entryCSN of key entries is not readable")
        entries, _ = self._search(self._suffix_dn(), filt, attributes)
        changes = []
        for entry in entries:
            csn = max((v.decode() for v in _values(entry, "entryCSN")), default="")
            publishes = bool(_values(entry, KEY_ATTRIBUTE)) and (
                b"1" not in _values(entry, "pgpDisabled"))
            slots = self._slots(entry) if publishes else frozenset()
            published = self._published_entry(entry) if publishes else None
            changes.append(Change(entry["dn"], csn, slots, published))
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
        for entry in self._paged(self._published, self._entry_attributes()):
            published = self._published_entry(entry)
            if published is not None:
                yield published

    def published_dns(self) -> set[str]:
        # Every key holder: a superset of the publishing entries is all the delete check
        # needs (a holder that stops publishing is a modify, seen by its entryCSN).
        return {e["dn"] for e in self._paged(self._holders, ["1.1"])}

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(LDAPException, OSError):
                self._conn.unbind()
            self._conn = None

    # -- entries ----------------------------------------------------------------------------

    def _entry_attributes(self) -> list[str]:
        return [KEY_ATTRIBUTE, "entryCSN", MAILBOX_ATTRIBUTE, HASH_ATTRIBUTE]

    def _csn_readable(self) -> bool:
        """Can we read entryCSN of key entries? Asked once, of any one of them."""
        if self._csn_ok is None:
            entries, _ = self._search(self.config.base_dn, self._published, ["entryCSN"],
                                      paged=True)
            if not entries:
                return True  # nothing published yet: ask again next time
            self._csn_ok = bool(_values(entries[0], "entryCSN"))
            if not self._csn_ok:
                log.error("cannot read entryCSN of %s: every directory change will empty "
                          "the key cache (grant the WKD account read on entryCSN)",
                          entries[0]["dn"])
        return self._csn_ok

    def _addresses(self, entry: dict[str, Any]) -> tuple[Address, ...]:
        hashes = {v.decode("utf-8", "replace").lower() for v in _values(entry, HASH_ATTRIBUTE)}
        found: dict[str, Address] = {}
        for raw in _values(entry, MAILBOX_ATTRIBUTE):
            try:
                address = Address.parse(raw.decode("utf-8"))
            except (BadAddress, UnicodeDecodeError):
                log.warning("ignoring unusable gpgMailbox %r of %s", raw[:80], entry["dn"])
                continue
            if not hashes or address_slot(address) in hashes:
                found.setdefault(address.key, address)
        return tuple(found.values())

    def _slots(self, entry: dict[str, Any]) -> frozenset[str]:
        slots = {address_slot(a) for a in self._addresses(entry)}
        slots |= {v.decode("utf-8", "replace").lower() for v in _values(entry, HASH_ATTRIBUTE)}
        return frozenset(slots)

    def _published_entry(self, entry: dict[str, Any]) -> Published | None:
        keys = _values(entry, KEY_ATTRIBUTE)
        if not keys:
            return None
        csn = max((v.decode() for v in _values(entry, "entryCSN")), default="")
        return Published(entry["dn"], self._addresses(entry), keys[0], csn)


def _values(entry: dict[str, Any], name: str) -> list[bytes]:
    raw = entry.get("raw_attributes", {})
    for key, values in raw.items():
        if key.lower() == name.lower():
            return list(values)
    return []
