"""Which slots the directory publishes, in memory: the WKD responder's answer to a flood of
distinct misses when the key cache is a least-recently-used one (milter_wkd.web.cache).

`PresenceIndex` holds, for every entry of the directory's sync (keyed by its entryUUID),
the 64-bit prefixes of the slots it publishes (`prefix(slot)`: Python's own string hash,
SipHash with this process's random key: an attacker cannot aim collisions at it), and the
set of all those prefixes. No key bytes: it is filled from the RFC 4533 sync's refresh of
the hash attributes (milter_wkd.store.syncrepl) and kept current by the same sync. While
`complete` is False (before the first refresh ended, or during a full refresh) it knows
nothing and `may_hold` says True (the cache asks the directory, as without an index);
afterwards a slot whose prefix is absent is not published: a 404 from memory. A prefix
shared by two slots (probability ~n/2^64 per look-up) only costs a directory look-up.

Memory: an int key and value in a dict and the value in a set, about 150 bytes per
published address (`estimated_bytes`; benchmarks/bounds.py prints the measured figure).

Not thread-safe for writers: one thread (the sync's) writes; readers only call
`may_hold`, which is atomic under Python's GIL (a set membership test).
"""

from __future__ import annotations

from collections.abc import Iterable

# Bytes per indexed slot: dict entry (~40 with its share of the table), two ints (~36
# each), a set slot (~32 with its share of the table). Measured: benchmarks/bounds.py.
BYTES_PER_SLOT = 150


def prefix(slot: str) -> int:
    """The 64-bit prefix of a slot the index keeps."""
    return hash(slot)


def uuid_key(uuid: bytes) -> int:
    return int.from_bytes(uuid, "big")


class PresenceIndex:
    def __init__(self) -> None:
        self.complete = False
        self._slots_of: dict[int, int | tuple[int, ...]] = {}  # entryUUID -> prefix(es)
        self._present: set[int] = set()
        # Prefixes held by more than one entry (two entries publishing one address, or a
        # prefix collision): how many hold them. Rare, so kept apart from the set.
        self._shared: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._present)

    @property
    def entries(self) -> int:
        return len(self._slots_of)

    def estimated_bytes(self) -> int:
        return BYTES_PER_SLOT * len(self._present)

    def clear(self) -> None:
        self.complete = False
        self._slots_of.clear()
        self._present.clear()
        self._shared.clear()

    def may_hold(self, slot: str) -> bool:
        """False only when the index is complete and no entry publishes for `slot`."""
        return not self.complete or prefix(slot) in self._present

    def put(self, uuid: bytes, slots: Iterable[str]) -> tuple[int, ...]:
        """Record what an entry publishes now; returns the prefixes it published before."""
        key = uuid_key(uuid)
        old = self._drop(key)
        new = tuple(dict.fromkeys(prefix(s) for s in slots))
        if new:
            self._slots_of[key] = new[0] if len(new) == 1 else new
            for p in new:
                if p in self._present:
                    self._shared[p] = self._shared.get(p, 1) + 1
                else:
                    self._present.add(p)
        return old

    def drop(self, uuid: bytes) -> tuple[int, ...]:
        """Forget an entry; returns the prefixes it published."""
        return self._drop(uuid_key(uuid))

    def uuids(self) -> set[int]:
        return set(self._slots_of)

    def drop_key(self, key: int) -> tuple[int, ...]:
        return self._drop(key)

    def _drop(self, key: int) -> tuple[int, ...]:
        held = self._slots_of.pop(key, None)
        if held is None:
            return ()
        old = (held,) if isinstance(held, int) else held
        for p in old:
            count = self._shared.get(p)
            if count is None:
                self._present.discard(p)
            elif count > 2:
                self._shared[p] = count - 1
            else:
                del self._shared[p]
        return old
