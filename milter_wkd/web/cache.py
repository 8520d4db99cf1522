"""The responder's memory: WKD answers by slot (`<hash>@<domain>`), kept fresh by following
the directory's changes, bounded by a byte budget.

Freshness. When the source can follow changes (`store.view.FollowsChanges`: `LdapKeyView`
over an RFC 4533 sync, milter_wkd.store.syncrepl), the background thread loads, then
follows one refreshAndPersist search for the life of the process (milter_wkd.web.sync):
every add, modify, delete or unpublishing modify of a key holder rebuilds (mirror mode)
or drops (LRU mode) the slots the entry held and claims, as the change arrives; no
polling. The sync also fills the `PresenceIndex` (milter_wkd.web.presence): in LRU mode a
miss of a slot nobody publishes is a 404 from memory once the index is complete.
Otherwise (a source without the capability, or a directory that refuses the sync control:
logged) the thread polls the change token (contextCSN: one base-scope read) every
`refresh_interval`. When it moved, one search for `entryCSN >= <last token>` names the
entries written since; every slot such an entry claimed before or claims now is rebuilt
(mirror mode) or dropped (LRU mode). A delete leaves no entryCSN behind: when the newest
CSN in the token is not accounted for by the changes, a listing of the key holders' DNs
(no key bytes) finds the vanished entries; it runs at most every 3x its own duration (see
`_deleted_slots`). A listing also runs every `reconcile_interval`, the backstop for a
delete followed by a write within one refresh interval.

Bounded memory. Answers (the cleaned binary key, one user ID) and their bookkeeping are
charged against `budget` bytes (an estimate of Python's cost). At start the thread mirrors
the whole directory; if it fits, the cache is complete and an unknown slot is a 404 from
memory. If it does not, the cache stays an LRU of answers and negative answers, and a miss
costs one indexed directory search (and a key cleaning) unless the presence index says
nobody publishes the slot (no search: a flood of distinct misses costs no LDAP).

Checking. Every key is cleaned (`openpgp.clean_key`) for the asked address before it is
cached: corrupt values, secret key material or a key without a user ID for the address are
not served, and logged once per entry, key and address with the entry's DN.

One key per address. Two entries publishing for one address (the store's claims forbid it,
LDAP tools do not) are a conflict: nothing is served for the address (a client would take
two concatenated keys as one answer), and an error names both DNs (`_conflict`).

Failure. A directory that does not answer leaves the cache as it is; `get` raises
`SourceUnavailable` only for a slot it has nothing about (the app answers 503).

Key IDs (for the HKP and VKS look-ups of milter_wkd.web.hkp). Every cached answer also
indexes the 64-bit key IDs of the primary keys and subkeys it serves (read from the served
packets when the answer is stored: no work on a WKD request). `find_key` answers a key ID or
fingerprint with the key cleaned for each of its published addresses, the user IDs joined
into one key (`join_cleaned`): from the index when the mirror is complete, else from
`KeyView.lookup_fingerprint` (one indexed directory search, not cached).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from milter_wkd import openpgp
from milter_wkd.errors import KeyRefused
from milter_wkd.openpgp.packets import TAG_PUBLIC_KEY, TAG_PUBLIC_SUBKEY, TAG_USER_ID, frames
from milter_wkd.store.schema import address_slot
from milter_wkd.store.syncrepl import SyncUnsupported
from milter_wkd.store.view import (
    ChangesUnknown,
    KeyView,
    Published,
    SourceUnavailable,
    changes_from,
    explained,
)
from milter_wkd.values import Address
from milter_wkd.web.presence import PresenceIndex, prefix
from milter_wkd.web.sync import CacheSync

log = logging.getLogger(__name__)

# Python's cost of one cached answer beyond its key bytes (the OrderedDict node, the Answer,
# the bytes and slot string headers, the DN and its index entry), measured with
# benchmarks/wkd_memory.py: about 1 KiB of RSS per 200-byte ed25519 answer.
ENTRY_OVERHEAD = 800
# Python's cost of one key ID in the index (a 16-character str key and a dict slot; the
# value is the answer's own slot string or a small tuple).
KEY_ID_OVERHEAD = 150
MAX_LOGGED_REFUSALS = 10_000

Cleaner = Callable[[bytes, Address], bytes]


def clean_for_address(key: bytes, address: Address) -> bytes:
    """The binary key with exactly the one user ID of `address` (raises KeyRefused)."""
    return openpgp.clean_key(key, [address]).key


def split_keys(body: bytes) -> list[bytes]:
    """The keys of a served answer (one or more cleaned keys, concatenated)."""
    starts = [start for tag, start, _, _ in frames(body) if tag == TAG_PUBLIC_KEY]
    return [body[a:b] for a, b in zip(starts, [*starts[1:], len(body)], strict=True)]


def fingerprints(key: bytes) -> list[str]:
    """Upper-case hex fingerprints of a cleaned key's primary key (first) and subkeys
    (RFC 9580 §5.5.4: a hash of the key packet's body; the cleaner checked the rest)."""
    found = []
    for tag, _, start, end in frames(key):
        if tag in (TAG_PUBLIC_KEY, TAG_PUBLIC_SUBKEY):
            body = key[start:end]
            if body[:1] == b"\x06":
                digest = hashlib.sha256(b"\x9b" + len(body).to_bytes(4, "big") + body)
            else:
                digest = hashlib.sha1(b"\x99" + len(body).to_bytes(2, "big") + body,
                                      usedforsecurity=False)
            found.append(digest.hexdigest().upper())
    return found


def key_ids(body: bytes) -> tuple[str, ...]:
    """The key IDs (16 upper-case hex) of every primary key and subkey an answer serves."""
    try:
        return tuple(dict.fromkeys(f[-16:] for k in split_keys(body) for f in fingerprints(k)))
    except KeyRefused:  # cleaned packets always parse; a foreign cleaner's may not
        return ()


def join_cleaned(keys: Iterable[bytes]) -> bytes:
    """One key from copies of the same key each cleaned for other addresses: the first
    copy's primary key, its revocation or direct signature, every copy's user IDs with
    their certifications (each once), then the first copy's subkeys. The copies come from
    one stored key and one cleaner, so only their user ID sections differ."""
    head = b""
    subkeys = b""
    sections: dict[bytes, None] = {}
    for number, key in enumerate(keys):
        cut = [(tag, start) for tag, start, _, _ in frames(key)
               if tag in (TAG_USER_ID, TAG_PUBLIC_SUBKEY)]
        first_uid = next((s for t, s in cut if t == TAG_USER_ID), len(key))
        first_sub = next((s for t, s in cut if t == TAG_PUBLIC_SUBKEY), len(key))
        uid_starts = [s for t, s in cut if t == TAG_USER_ID]
        for a, b in zip(uid_starts, [*uid_starts[1:], first_sub], strict=True):
            sections.setdefault(key[a:b])
        if number == 0:
            head, subkeys = key[:first_uid], key[first_sub:]
    return head + b"".join(sections) + subkeys


@dataclass(frozen=True, slots=True)
class Answer:
    body: bytes | None  # None: nothing is published for the slot
    holders: tuple[str, ...]  # DNs of the entries publishing for the slot (2+: a conflict)

    @property
    def cost(self) -> int:
        return ENTRY_OVERHEAD + len(self.body or b"") + sum(len(d) for d in self.holders)


NOT_FOUND = Answer(None, ())


def _conflict(slot: str, holders: tuple[str, ...]) -> Answer:
    """Nothing for a slot that several entries publish for; the holders stay recorded so
    that a change of any of them rebuilds the slot."""
    log.error("entries %s all publish a key for %s: serving none until only one does",
              ", ".join(holders), slot)
    return Answer(None, holders)


class KeyCache:
    def __init__(self, source: KeyView, *, budget: int, refresh_interval: float = 0.25,
                 reconcile_interval: float = 300.0, cleaner: Cleaner = clean_for_address,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.budget = budget
        self.refresh_interval = refresh_interval
        self.reconcile_interval = reconcile_interval
        self.cleaner = cleaner
        self.clock = clock
        self.complete = False
        self.token: str | None = None
        # Bumped AFTER every change of the answers: whoever read it before reading an
        # answer can tell later whether what it read may have changed (the app's memo).
        self.version = 0
        self._answers: OrderedDict[str, Answer] = OrderedDict()
        # DN -> its cached slots; tuples, not sets: most entries have one or two slots,
        # and a set costs 216 bytes even when it holds one string.
        self._by_dn: dict[str, tuple[str, ...]] = {}
        # Key ID -> the slot (or slots) whose answer serves it: `find_key`.
        self._by_key_id: dict[str, str | tuple[str, ...]] = {}
        self._bytes = 0
        self._generation = 0
        self._lock = threading.RLock()
        self._logged: set[tuple[str, str, bytes, str]] = set()
        self._last_reconcile = clock()
        self._delete_check_due = False
        self._next_delete_check = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._source_down = False
        self._reload = True
        self.evictions = 0
        # The sync (RFC 4533) when the source offers it ("sync"), else polling; the index
        # of published slots that the sync keeps (an LRU's misses of unknown slots).
        self.mode = "starting" if hasattr(source, "follow") else "polling"
        self.index = PresenceIndex()
        self.sync: CacheSync | None = None
        self.index_misses = 0  # misses answered 404 by the index, without the directory

    # -- serving ------------------------------------------------------------------------

    def get(self, slot: str, local_hint: str | None = None) -> bytes | None:
        """The answer body for a slot, None when nothing is published."""
        answer = self._answers.get(slot)
        if answer is not None:
            if not self.complete:  # a mirror has no use for recency
                with self._lock:
                    if slot in self._answers:
                        self._answers.move_to_end(slot)
            return answer.body
        if self.complete:
            return None
        if not self.index.may_hold(slot):
            self.index_misses += 1
            return None
        generation = self._generation
        answer = self._build(slot, self.source.lookup(slot, local_hint))
        with self._lock:
            if generation == self._generation:
                self._put(slot, answer)
        return answer.body

    def peek(self, slot: str) -> bytes | None:
        """The cached body of a slot, None if absent (a 404 only if `complete` still holds
        afterwards: reset() clears `complete` before it empties the cache)."""
        answer = self._answers.get(slot)
        return answer.body if answer is not None else None

    def find_key(self, fingerprint: str) -> bytes | None:
        """The key with this fingerprint or key ID (upper-case hex, 40/64 or 16; of its
        primary key or of a subkey), with the user IDs of all its published addresses
        (`join_cleaned`); None when nothing is published. Raises SourceUnavailable when the
        mirror is incomplete and the directory does not answer."""
        if self.complete:
            wanted = fingerprint[-16:] if len(fingerprint) == 40 else fingerprint[:16]
            held = self._by_key_id.get(wanted)
            slots = (held,) if isinstance(held, str) else held or ()
            bodies = [self.peek(s) for s in slots]
            copies = [k for b in bodies if b for k in split_keys(b)]
        else:
            copies = []
            for entry in self.source.lookup_fingerprint(fingerprint):
                for slot in sorted(entry.slots()):
                    body = self._clean(slot, entry)
                    if body is not None:
                        copies.extend(split_keys(body))
        matching = [k for k in copies if _serves(k, fingerprint)]
        if not matching:
            return None
        primary = fingerprints(matching[0])[0]
        return join_cleaned(k for k in matching if fingerprints(k)[0] == primary)

    @property
    def size(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._answers)

    # -- building answers ---------------------------------------------------------------

    def _build(self, slot: str, entries: Iterable[Published]) -> Answer:
        bodies: list[bytes] = []
        holders: list[str] = []
        for entry in entries:
            body = self._clean(slot, entry)
            if body is not None:
                bodies.append(body)
                holders.append(entry.dn)
        if len(bodies) > 1:
            return _conflict(slot, tuple(holders))
        return Answer(bodies[0], tuple(holders)) if bodies else NOT_FOUND

    def _clean(self, slot: str, entry: Published) -> bytes | None:
        address = next((a for a in entry.addresses if address_slot(a) == slot), None)
        if address is None:
            return None
        try:
            return self.cleaner(entry.key, address)
        except KeyRefused as exc:
            self._log_refusal(entry, address, exc.reason)
            return None

    def _log_refusal(self, entry: Published, address: Address, reason: str) -> None:
        digest = hashlib.sha256(entry.key).digest()[:16]
        marker = (entry.dn, address.key, digest, reason)
        with self._lock:
            if marker in self._logged:
                return
            if len(self._logged) >= MAX_LOGGED_REFUSALS:
                self._logged.clear()
            self._logged.add(marker)
        log.warning("not serving the key of %s for %s: %s", entry.dn, address, reason)

    # -- bookkeeping (callers hold the lock) ---------------------------------------------

    def _put(self, slot: str, answer: Answer) -> None:
        self._remove(slot)
        self._answers[slot] = answer
        self.version += 1
        self._bytes += answer.cost
        for dn in answer.holders:
            slots = self._by_dn.get(dn, ())
            if slot not in slots:
                self._by_dn[dn] = (*slots, slot)
        ids = key_ids(answer.body) if answer.body else ()
        self._bytes += KEY_ID_OVERHEAD * len(ids)
        for key_id in ids:
            held = self._by_key_id.get(key_id)
            if held is None:
                self._by_key_id[key_id] = slot  # the common case: no tuple
            elif held != slot and (isinstance(held, str) or slot not in held):
                self._by_key_id[key_id] = ((held, slot) if isinstance(held, str)
                                           else (*held, slot))
        while self._bytes > self.budget and self._answers:
            if self.complete:
                log.warning("the directory outgrew the key cache budget (%d bytes): "
                            "caching least recently used answers from now on", self.budget)
                self.complete = False
            evicted, _ = next(iter(self._answers.items()))
            self._remove(evicted)
            self.evictions += 1

    def _remove(self, slot: str) -> None:
        old = self._answers.pop(slot, None)
        if old is None:
            return
        self.version += 1
        self._bytes -= old.cost
        for dn in old.holders:
            remaining = tuple(s for s in self._by_dn.get(dn, ()) if s != slot)
            if remaining:
                self._by_dn[dn] = remaining
            else:
                self._by_dn.pop(dn, None)
        ids = key_ids(old.body) if old.body else ()
        self._bytes -= KEY_ID_OVERHEAD * len(ids)
        for key_id in ids:
            held = self._by_key_id.get(key_id)
            if held == slot or held is None:
                self._by_key_id.pop(key_id, None)
            elif not isinstance(held, str):
                rest = tuple(s for s in held if s != slot)
                self._by_key_id[key_id] = rest[0] if len(rest) == 1 else rest

    def _merge(self, slot: str, entry: Published) -> None:
        body = self._clean(slot, entry)
        if body is None:
            return
        with self._lock:
            old = self._answers.get(slot)
            if old is not None and old.holders and entry.dn not in old.holders:
                self._put(slot, _conflict(slot, (*old.holders, entry.dn)))
            else:
                self._put(slot, Answer(body, (entry.dn,)))

    # -- mirroring and freshness ----------------------------------------------------------

    def load(self) -> bool:
        """Mirror the whole directory while it fits the budget; True if it did."""
        token = self.source.change_token()
        evictions = self.evictions
        for entry in self.source.iter_published():
            for slot in sorted(entry.slots()):
                self._merge(slot, entry)
            if self._bytes > self.budget * 0.9 or self.evictions != evictions:
                log.warning("the directory does not fit the key cache budget (%d bytes): "
                            "caching least recently used answers", self.budget)
                with self._lock:
                    self.token = token if self.token is None else self.token
                return False
        with self._lock:
            self._generation += 1
            # Negative answers learnt while loading are implied by completeness now.
            for slot in [s for s, a in self._answers.items()
                         if a.body is None and not a.holders]:
                self._remove(slot)
            self.complete = True
            self.token = token if self.token is None else self.token
        return True

    def refresh(self) -> bool:
        """One freshness check; True if anything was invalidated or rebuilt."""
        token = self.source.change_token()
        now = self.clock()
        if now - self._last_reconcile >= self.reconcile_interval:
            self._delete_check_due = True
        if self.token is None:
            self.token = token
            return False
        if token == self.token and not self._delete_check_due:
            return False
        affected: set[str] = set()
        changed: dict[str, Published] = {}
        if token != self.token:
            try:
                changes = self.source.changes_since(changes_from(self.token, token))
            except ChangesUnknown as exc:
                log.info("cannot tell what changed (%s): emptying the key cache", exc)
                self.reset()
                self.token = token
                return True
            for change in changes:
                affected.update(self._by_dn.get(change.dn, ()), change.slots)
                if change.entry is not None:
                    changed[change.dn] = change.entry
            if not explained(token, changes):
                self._delete_check_due = True
        if self._delete_check_due and now >= self._next_delete_check:
            affected |= self._deleted_slots()
        with self._lock:
            self._generation += 1
        self._apply(affected, changed)
        self.token = token
        return bool(affected)

    def _deleted_slots(self) -> set[str]:
        """Slots of cached entries that no longer exist. The listing costs about 11 us per
        key holder (python-ldap; benchmarks/wkd_memory.py: 1.1 s for 100,000), so it runs at
        most every 3x its own duration: a deleted entry disappears within ~1 s up to ~20,000
        key holders, within ~5 s at 100,000 (writes the responder cannot see, such as
        pending WKS requests, also ask for this check; modifications never wait for it)."""
        started = self.clock()
        present = self.source.published_dns()
        finished = self.clock()
        self._last_reconcile = finished
        self._next_delete_check = finished + 3 * (finished - started)
        self._delete_check_due = False
        affected: set[str] = set()
        for dn in set(self._by_dn) - present:
            affected.update(self._by_dn.get(dn, ()))
        return affected

    def reset(self) -> None:
        """Forget everything; the background thread mirrors the directory again."""
        with self._lock:
            self._generation += 1
            self.complete = False
            self._answers.clear()
            self.version += 1
            self._by_dn.clear()
            self._by_key_id.clear()
            self._bytes = 0
            self._reload = True

    def _apply(self, affected: set[str], changed: dict[str, Published]) -> None:
        if not self.complete:
            with self._lock:
                for slot in affected:
                    self._remove(slot)
            return
        for slot in sorted(affected):
            found = {p.dn: p for p in self.source.lookup(slot)}
            # The changed entries as just read: a key written without the hash attribute
            # is not found by the look-up, but the change names it.
            for dn, entry in changed.items():
                if slot in entry.slots():
                    found.setdefault(dn, entry)
            answer = self._build(slot, found.values())
            with self._lock:
                if not answer.holders:
                    self._remove(slot)
                else:
                    self._put(slot, answer)

    # -- following the sync (milter_wkd.web.sync calls these in the cache's thread) -------

    def cached_slots_of(self, dn: str) -> tuple[str, ...]:
        return self._by_dn.get(dn, ())

    def cached_dns(self) -> set[str]:
        with self._lock:
            return set(self._by_dn)

    def cached_slots_with(self, prefixes: set[int]) -> set[str]:
        """Cached slots (answers and negative answers) whose index prefix is one of these:
        a delete named by entryUUID only (a resumed refresh) finds its answers so."""
        if not prefixes:
            return set()
        with self._lock:
            return {s for s in self._answers if prefix(s) in prefixes}

    def invalidate(self, affected: set[str], changed: dict[str, Published]) -> None:
        """Rebuild (mirror) or drop (LRU) these slots; `changed`: entries as just read."""
        with self._lock:
            self._generation += 1
        self._apply(affected, changed)

    # -- the background thread -------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="wkd-cache", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._reload:
                    started = time.monotonic()
                    complete = self.load()
                    self._reload = False
                    # The mirror lives as long as the process and holds no cycles: keep
                    # the garbage collector from walking it (full collections of a large
                    # mirror would show up as latency spikes).
                    gc.freeze()
                    log.info("key cache loaded in %.1f s: %d answers, %d bytes, %s",
                             time.monotonic() - started, len(self), self._bytes,
                             "complete" if complete else "least recently used")
                elif self.mode != "polling":
                    self._follow()
                else:
                    self.refresh()
                if self._source_down:
                    log.warning("directory answers again")
                    self._source_down = False
            except SourceUnavailable as exc:
                if not self._source_down:
                    log.warning("directory unavailable, serving from memory: %s", exc)
                    self._source_down = True
            except Exception:
                log.exception("key cache refresh failed")
            self._stop.wait(self.refresh_interval)


    def _follow(self) -> None:
        """Follow the source's sync until stopped; polling if it has none."""
        sync = CacheSync(self, self.source)  # type: ignore[arg-type]  # has `follow`
        sync.start_from(self.token or "")
        self.sync = sync
        self.mode = "sync"
        try:
            self.source.follow(sync, self._stop)  # type: ignore[attr-defined]
        except SyncUnsupported as exc:
            log.warning("the directory does not offer the RFC 4533 sync control to the "
                        "responder (%s): polling contextCSN every %.2f s instead", exc,
                        self.refresh_interval)
            self.mode = "polling"
            self.sync = None
            self.index.clear()


def _serves(key: bytes, fingerprint: str) -> bool:
    """Does this key have a primary key or subkey with this fingerprint or key ID?"""
    found = fingerprints(key)
    if len(fingerprint) == 16:
        return any(f[-16:] == fingerprint for f in found if len(f) == 40)
    return fingerprint in found
