"""Which slots the directory publishes, in memory: the WKD responder's answer to a flood of
distinct misses when the key cache is a least-recently-used one (milter_wkd.web.cache).

`PresenceIndex` holds, for every entry of the directory's sync (keyed by its entryUUID),
the 64-bit prefixes of the slots it publishes (`prefix(slot)`: Python's own string hash,
SipHash with this process's random key: an attacker cannot aim collisions at it), and how
many entries publish each prefix. No key bytes: it is filled from the RFC 4533 sync's
refresh of the hash attributes (milter_wkd.store.syncrepl) and kept current by the same
sync. While `complete` is False (before the first refresh ended, or during a full
refresh) it knows nothing and `may_hold` says True (the cache asks the directory, as
without an index); afterwards a slot whose prefix is absent is not published: a 404 from
memory. A prefix shared by two slots (probability ~n/2^64 per look-up) only costs a
directory look-up.

Memory: two open-addressing hash tables of machine words (`array`, not Python objects):
entryUUID -> first prefix and prefix -> number of entries, each at most 60 % full, about
55 bytes per published address (`estimated_bytes`; benchmarks/wkd_memory.py measures the
RSS). A dict and a set of Python ints cost ~250 bytes a key: 250 MB at 1,000,000 keys.
Entries with several addresses keep the rest of their prefixes in a small dict.

Threads: one thread (the sync's) writes; readers only call `may_hold`. A reader that
probes while the table grows or a slot is rewritten can see a stale answer, never an
exception (array reads are atomic under the GIL; a table is replaced, not resized in
place); a stale "absent" lasts as long as the write that races with it.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator

MASK = (1 << 64) - 1
EMPTY, TOMBSTONE = 0, 1  # reserved key values; real keys are moved off them
MAX_FILL = 0.6


def _key(value: int) -> int:
    key = value & MASK
    return key + 2 if key < 2 else key


def prefix(slot: str) -> int:
    """The 64-bit prefix of a slot the index keeps."""
    return _key(hash(slot))


def uuid_key(uuid: bytes) -> int:
    """The 64-bit key of an entryUUID (hashed: OpenLDAP's UUIDs are time-based and their
    low bits barely move, which open addressing cannot take)."""
    return _key(hash(uuid))


class _Table:
    """An open-addressing hash table from 64-bit keys (well mixed: the slot is the low
    bits) to 64-bit values, linear probing, tombstones for deletes."""

    __slots__ = ("filled", "keys", "mask", "used", "values")

    def __init__(self, capacity: int = 1024) -> None:
        self.keys = array("Q", bytes(8 * capacity))
        self.values = array("Q", bytes(8 * capacity))
        self.mask = capacity - 1
        self.used = 0  # live keys
        self.filled = 0  # live keys and tombstones

    def _find(self, key: int) -> int:
        keys = self.keys
        mask = len(keys) - 1  # not self.mask: a reader racing a `_grow` must stay in bounds
        i = key & mask
        while True:
            found = keys[i]
            if found == key:
                return i
            if found == EMPTY:
                return -1
            i = (i + 1) & mask

    def get(self, key: int) -> int | None:
        i = self._find(key)
        return self.values[i] if i >= 0 else None

    def __contains__(self, key: int) -> bool:
        return self._find(key) >= 0

    def set(self, key: int, value: int) -> None:
        i = self._find(key)
        if i >= 0:
            self.values[i] = value
            return
        if (self.filled + 1) > MAX_FILL * (self.mask + 1):
            self._grow()
        keys, mask = self.keys, self.mask
        i = key & mask
        while keys[i] not in (EMPTY, TOMBSTONE):
            i = (i + 1) & mask
        if keys[i] == EMPTY:
            self.filled += 1
        self.values[i] = value
        keys[i] = key
        self.used += 1

    def pop(self, key: int) -> int | None:
        i = self._find(key)
        if i < 0:
            return None
        self.keys[i] = TOMBSTONE
        self.used -= 1
        return self.values[i]

    def items(self) -> Iterator[tuple[int, int]]:
        for i, key in enumerate(self.keys):
            if key > TOMBSTONE:
                yield key, self.values[i]

    def _grow(self) -> None:
        # Twice as large while mostly live, the same size when mostly tombstones.
        capacity = (self.mask + 1) * (2 if self.used * 2 >= self.filled else 1)
        bigger = _Table(capacity)
        for key, value in self.items():
            bigger.set(key, value)
        # Readers hold the old arrays until they return: swap the three in one go each.
        self.keys, self.values, self.mask = bigger.keys, bigger.values, bigger.mask
        self.used, self.filled = bigger.used, bigger.filled

    def nbytes(self) -> int:
        return 16 * (self.mask + 1)


class PresenceIndex:
    def __init__(self) -> None:
        self.complete = False
        self._first = _Table()  # entryUUID key -> the first prefix it publishes
        self._more: dict[int, tuple[int, ...]] = {}  # entryUUID key -> all, when several
        self._count = _Table()  # prefix -> entries publishing it

    def __len__(self) -> int:
        """Distinct prefixes published."""
        return self._count.used

    @property
    def entries(self) -> int:
        return self._first.used

    def estimated_bytes(self) -> int:
        return self._first.nbytes() + self._count.nbytes() + 150 * len(self._more)

    def clear(self) -> None:
        self.complete = False  # first: a reader must not take an empty index as complete
        self._first = _Table()
        self._more = {}
        self._count = _Table()

    def may_hold(self, slot: str) -> bool:
        """False only when the index is complete and no entry publishes for `slot`."""
        if not self.complete:
            return True
        return prefix(slot) in self._count

    def put(self, uuid: bytes, slots: Iterable[str]) -> tuple[int, ...]:
        """Record what an entry publishes now; returns the prefixes it published before."""
        key = uuid_key(uuid)
        old = self._drop(key)
        new = tuple(dict.fromkeys(prefix(s) for s in slots))
        if new:
            self._first.set(key, new[0])
            if len(new) > 1:
                self._more[key] = new
            for p in new:
                self._count.set(p, (self._count.get(p) or 0) + 1)
        return old

    def drop(self, uuid: bytes) -> tuple[int, ...]:
        """Forget an entry; returns the prefixes it published."""
        return self._drop(uuid_key(uuid))

    def uuids(self) -> set[int]:
        return {key for key, _ in self._first.items()}

    def drop_key(self, key: int) -> tuple[int, ...]:
        return self._drop(key)

    def _drop(self, key: int) -> tuple[int, ...]:
        first = self._first.pop(key)
        if first is None:
            return ()
        old = self._more.pop(key, None) or (first,)
        for p in old:
            count = self._count.get(p) or 0
            if count > 1:
                self._count.set(p, count - 1)
            else:
                self._count.pop(p)
        return old
