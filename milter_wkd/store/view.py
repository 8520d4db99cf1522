"""What the WKD responder needs from the key store: the `KeyView` protocol and its plain types.

A published key is identified by its "slot", `<hash>@<domain>` (the WKD hash of an
address's local part and the domain), the same string the directory keeps in its
WKD-hash attribute so that one indexed look-up answers a miss.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from milter_wkd.store.schema import Entry, address_slot, slot
from milter_wkd.values import Address

if TYPE_CHECKING:
    import threading

    from milter_wkd.store.syncrepl import SyncListener

__all__ = ["Change", "ChangesUnknown", "FollowsChanges", "KeyView", "Published",
           "SourceUnavailable", "address_slot", "by_provider", "changes_from", "csn_server",
           "explained", "newest_csn", "slot"]


@dataclass(frozen=True, slots=True)
class Published:
    """One directory entry that publishes a key: its DN, its addresses, the stored key."""

    dn: str
    addresses: tuple[Address, ...]
    key: bytes
    csn: str = ""

    def slots(self) -> set[str]:
        return {address_slot(a) for a in self.addresses}


@dataclass(frozen=True, slots=True)
class Change:
    """An entry written since a change token: its DN, its CSN, the slots it now claims
    (empty when it publishes nothing any more) and, if it publishes, the entry itself
    (so that a key without the indexed hash attribute is not lost on a rebuild)."""

    dn: str
    csn: str
    slots: frozenset[str]
    entry: Published | None = None


class SourceUnavailable(Exception):
    """The store did not answer; the cache keeps serving what it has."""


class ChangesUnknown(Exception):
    """The store cannot say what changed (e.g. entryCSN is not readable): start over."""


class KeyView(Protocol):
    """The read-only view of published keys the WKD cache (milter_wkd.web.cache) follows;
    `LdapKeyView` (store.ldapview) over LDAP, `MemoryKeyView` (store.memory) in memory."""

    def change_token(self) -> str:
        """An opaque value that changes on every write (contextCSN)."""
        ...

    def changes_since(self, token: str) -> list[Change]:
        """Entries written at or after `token` (any entry, keys or not)."""
        ...

    def lookup(self, slot: str, local_hint: str | None = None) -> list[Published]:
        """Entries that publish a key for this slot (one indexed search)."""
        ...

    def lookup_fingerprint(self, fingerprint: str) -> list[Published]:
        """Entries that publish a key with this fingerprint (40 or 64 upper-case hex) or
        key ID (16), of its primary key or of a subkey (one indexed search)."""
        ...

    def iter_published(self) -> Iterator[Published]:
        """Every entry that publishes a key (paged)."""
        ...

    def published_dns(self) -> set[str]:
        """The DNs of every entry that publishes a key, or a superset (a cheap listing)."""
        ...


def newest_csn(token: str) -> str:
    """The newest CSN of a token (contextCSN has one value per provider, joined by '|')."""
    return max(token.split("|")) if token else ""


class FollowsChanges(KeyView, Protocol):
    """An optional capability of a KeyView (`LdapKeyView` has it, `MemoryKeyView` does
    not): changes pushed as they happen (RFC 4533 sync, milter_wkd.store.syncrepl) instead
    of polled. The cache uses it when `follow` exists and falls back to polling when it
    raises `SyncUnsupported`."""

    def follow(self, listener: SyncListener, stop: threading.Event) -> None:
        """Hand every change to `listener` until `stop` is set (store.syncrepl's loop)."""
        ...

    def sync_slots(self, entry: Entry) -> frozenset[str]:
        """The slots an entry of the sync publishes (from its hash attributes)."""
        ...

    def read_published(self, dn: str) -> Published | None:
        """One entry as `lookup` returns them, None when it publishes nothing."""
        ...


def csn_server(csn: str) -> str:
    """The server ID of a CSN (`<time>#<count>#<sid>#<mod>`), "" if it has none."""
    parts = csn.split("#")
    return parts[2] if len(parts) > 2 else ""


def by_provider(token: str) -> dict[str, str]:
    """CSN per provider: a CSN is `<time>#<count>#<sid>#<mod>`; the sid tells providers."""
    return {csn_server(csn): csn for csn in token.split("|")} if token else {}


def changes_from(old: str, new: str) -> str:
    """The CSN to search changes from (`entryCSN >= it`) when the token moved from `old` to
    `new`: the oldest previous CSN among the providers that wrote since. With replication,
    a provider's writes can arrive later than newer writes of another, so the newest CSN
    overall would miss them; a provider that did not write holds nothing back."""
    before, after = by_provider(old), by_provider(new)
    if not before:
        return ""
    if any(sid not in before for sid in after):
        return min(before.values())  # a new provider: its writes are newer than all we had
    moved = [before[sid] for sid, csn in after.items() if before[sid] != csn]
    return min(moved) if moved else newest_csn(old)


def explained(token: str, changes: Iterable[Change]) -> bool:
    """Do these changes account for the newest write? If not, the newest write removed an
    entry (a delete leaves no entryCSN behind), and the caller must reconcile."""
    newest = newest_csn(token)
    return any(c.csn >= newest for c in changes)
