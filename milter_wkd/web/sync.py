"""The key cache following the directory's RFC 4533 sync (milter_wkd.store.syncrepl): the
`SyncListener` that turns sync messages into cache invalidations and keeps the cache's
`PresenceIndex` (milter_wkd.web.presence) current.

Used by `KeyCache` when its source has the optional `follow` capability
(`store.view.FollowsChanges`, `LdapKeyView` has it): the cache loads as before (mirror or
the start of an LRU), then the sync begins. Per message:
- an entry added or modified: the index records its slots; the slots it claims now and
  the cached slots it held are rebuilt from the directory (mirror) or dropped (LRU). In
  the first refresh (from no cookie) only entries written after the load began are
  (entryCSN newer, per server ID, than the change token read before the load; the rest
  the load saw as they are);
- a delete (or a modify out of the sync's filter: unpublished, disabled): the index
  forgets the entry; its cached slots are rebuilt or dropped (found by DN when the
  message names it, else by the prefixes the index held);
- the end of a present phase: entries the index has and the server did not present are
  deletes;
- the end of a full refresh: cached entries the refresh did not send were deleted
  meanwhile; the index is complete (misses of unknown slots become 404s from memory);
- the sync interrupted (its server gone, until it resumes on this or the next server of
  the uri list): the index is not complete (misses ask the directory) until the resumed
  refresh ends.
Renamed entries (modrdn) keep their old DN in the cache's bookkeeping until their next
change; the answers stay right (the key does not move with the name).

Failure: a directory look-up that fails while rebuilding raises out of the listener: the
follower resumes the search from the cookie it held before the message, and the slots
that were not rebuilt are kept and rebuilt first, with the next message or at the end of
the resumed refresh.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from milter_wkd.store.schema import Entry
from milter_wkd.store.view import FollowsChanges, Published, by_provider, csn_server
from milter_wkd.web.presence import PresenceIndex, uuid_key

if TYPE_CHECKING:
    from milter_wkd.web.cache import KeyCache


class CacheSync:
    def __init__(self, cache: KeyCache, source: FollowsChanges) -> None:
        self.cache = cache
        self.source = source
        self.index: PresenceIndex = cache.index
        self.ready = threading.Event()  # the first refresh ended
        self._since: dict[str, str] = {}
        self._full = False
        self._resumed = False
        self._seen: set[str] = set()
        self._present: set[int] = set()
        # Slots (and entries as read) whose rebuild failed: retried before anything else
        # (the index already moved on, so the message that named them may not name them
        # again when the sync resumes).
        self._pending: set[str] = set()
        self._changed: dict[str, Published] = {}

    def start_from(self, token: str) -> None:
        """The change token read before the cache's load: what the load may have missed
        is newer than it."""
        self._since = by_provider(token)

    # -- SyncListener ---------------------------------------------------------------------

    def begin(self, resumed: bool) -> None:
        self._resumed = resumed
        self._present = set()
        if not resumed:
            self._full = True
            self._seen = set()
            self.index.clear()

    def entry(self, uuid: bytes, entry: Entry, refreshing: bool) -> None:
        slots = self.source.sync_slots(entry)
        self.index.put(uuid, slots)
        csn = max(entry.texts("entryCSN"), default="")
        if refreshing and self._resumed:
            self._present.add(uuid_key(uuid))
        if refreshing and self._full:
            if self.cache.cached_slots_of(entry.dn):
                self._seen.add(entry.dn)
            sid = csn_server(csn)
            if csn and csn <= self._since.get(sid, ""):
                return  # the load (or an earlier sync) saw it as it is
        if csn > self._since.get(csn_server(csn), ""):
            self._since[csn_server(csn)] = csn
        affected = set(slots) | set(self.cache.cached_slots_of(entry.dn))
        changed: dict[str, Published] = {}
        if not entry.values("wkdAddressHash"):
            # A key written without the hash attribute: the look-up by hash cannot find
            # it, so read it whole (only such entries cost this).
            published = self.source.read_published(entry.dn)
            if published is not None:
                changed[entry.dn] = published
        self._invalidate(affected, changed)

    def delete(self, uuids: Sequence[bytes], dn: str | None) -> None:
        prefixes: set[int] = set()
        for uuid in uuids:
            prefixes.update(self.index.drop(uuid))
        affected = set(self.cache.cached_slots_of(dn)) if dn else set()
        affected |= self.cache.cached_slots_with(prefixes)
        self._invalidate(affected)

    def present(self, uuids: Sequence[bytes]) -> None:
        self._present.update(uuid_key(u) for u in uuids)

    def present_done(self) -> None:
        prefixes: set[int] = set()
        for key in self.index.uuids() - self._present:
            prefixes.update(self.index.drop_key(key))
        self._present = set()
        affected = self.cache.cached_slots_with(prefixes)
        self._invalidate(affected)

    def refresh_done(self, resumed: bool) -> None:
        if self._full:
            # Cached entries the full refresh did not send were deleted (or unpublished)
            # while the cache was loading or the sync was away.
            gone = self.cache.cached_dns() - self._seen
            affected = {s for dn in gone for s in self.cache.cached_slots_of(dn)}
            if affected:
                self._invalidate(affected)
            self._full = False
            self._seen = set()
        self._present = set()
        self._invalidate(set())  # what failed before the sync was interrupted
        self.index.complete = True
        self.ready.set()

    def interrupted(self) -> None:
        # Not following: a slot published meanwhile would be missing from the index, so
        # misses ask the directory until the resumed refresh has brought the changes.
        self.index.complete = False

    def _invalidate(self, affected: set[str],
                    changed: dict[str, Published] | None = None) -> None:
        self._pending |= affected
        self._changed.update(changed or {})
        if self._pending:
            self.cache.invalidate(self._pending, self._changed)
        self._pending = set()
        self._changed = {}
