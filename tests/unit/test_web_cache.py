"""Key cache bookkeeping: mirroring, budget, invalidation by change token, refusals.

The directory here is a table in memory with the KeyView contract (the LDAP view is
tested against real slapd in tests/integration/test_wkd_responder.py); the "cleaner" tags
bytes with the address so answers can be told apart without OpenPGP.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from milter_wkd.errors import KeyRefused
from milter_wkd.store.schema import address_slot
from milter_wkd.store.view import Change, ChangesUnknown, Published, SourceUnavailable, explained
from milter_wkd.values import Address
from milter_wkd.web.cache import ENTRY_OVERHEAD, Answer, KeyCache

ALICE = Address.parse("alice@example.org")
ALIAS = Address.parse("alice.liddell@example.org")
BOB = Address.parse("bob@example.org")
NOBODY = Address.parse("nobody@example.org")


def cleaner(key: bytes, address: Address) -> bytes:
    if key.startswith(b"bad"):
        raise KeyRefused("corrupt")
    return key + b"|" + address.key.encode()


class TableSource:
    """A KeyView over a dict, with faults on demand; every write gets the next CSN."""

    def __init__(self) -> None:
        self.entries: dict[str, Published] = {}
        self.csns: dict[str, str] = {}
        self.counter = 0
        self.lookups = 0
        self.down = False
        self.csn_readable = True

    def _csn(self) -> str:
        self.counter += 1
        return f"2026{self.counter:010d}.000000Z#000000#000#000000"

    def write(self, dn: str, addresses: tuple[Address, ...], key: bytes) -> None:
        csn = self._csn()
        self.entries[dn] = Published(dn, addresses, key, csn)
        self.csns[dn] = csn

    def delete(self, dn: str) -> None:
        self._csn()
        del self.entries[dn]
        del self.csns[dn]

    def _check(self) -> None:
        if self.down:
            raise SourceUnavailable("down")

    def change_token(self) -> str:
        self._check()
        return f"2026{self.counter:010d}.000000Z#000000#000#000000"

    def changes_since(self, token: str) -> list[Change]:
        self._check()
        if not self.csn_readable:
            raise ChangesUnknown("no entryCSN")
        return [Change(dn, csn, frozenset(self.entries[dn].slots()), self.entries[dn])
                for dn, csn in self.csns.items() if csn >= token]

    def lookup(self, slot: str, local_hint: str | None = None) -> list[Published]:
        self._check()
        self.lookups += 1
        return [e for e in self.entries.values() if slot in e.slots()]

    def iter_published(self) -> Iterator[Published]:
        self._check()
        yield from list(self.entries.values())

    def published_dns(self) -> set[str]:
        self._check()
        return set(self.entries)


@pytest.fixture
def source() -> TableSource:
    table = TableSource()
    table.write("uid=alice", (ALICE, ALIAS), b"KA")
    table.write("uid=bob", (BOB,), b"KB")
    return table


def test_a_directory_that_fits_is_mirrored_and_misses_cost_nothing(source: TableSource) -> None:
    cache = KeyCache(source, budget=1 << 20, cleaner=cleaner)
    assert cache.load()
    assert cache.complete
    assert cache.get(address_slot(ALICE)) == b"KA|alice@example.org"
    assert cache.get(address_slot(ALIAS)) == b"KA|alice.liddell@example.org"
    assert cache.get(address_slot(NOBODY)) is None
    assert source.lookups == 0


@pytest.mark.parametrize("budget", [1 << 20, 0])
def test_two_entries_claiming_one_address_serve_nothing_until_one_stops(
        source: TableSource, budget: int, caplog: pytest.LogCaptureFixture) -> None:
    """One key per address: two concatenated keys would be read as one answer. Nothing is
    served, an error names both DNs, and the address comes back when the conflict ends."""
    source.write("uid=alice2", (ALICE,), b"KC")
    cache = KeyCache(source, budget=budget, cleaner=cleaner)  # complete, then LRU mode
    with caplog.at_level(logging.ERROR, logger="milter_wkd.web.cache"):
        cache.load()
        cache.refresh()
        assert cache.get(address_slot(ALICE)) is None
        assert cache.peek(address_slot(ALICE)) is None
    assert any("uid=alice" in r.getMessage() and "uid=alice2" in r.getMessage()
               for r in caplog.records if r.levelno == logging.ERROR)
    assert cache.get(address_slot(ALIAS)) == b"KA|alice.liddell@example.org"  # no conflict
    source.write("uid=alice2", (BOB,), b"KC")  # the second entry gives the address up
    assert cache.refresh()
    assert cache.get(address_slot(ALICE)) == b"KA|alice@example.org"


def test_a_conflict_arising_later_also_serves_nothing(source: TableSource) -> None:
    cache = KeyCache(source, budget=1 << 20, cleaner=cleaner)
    cache.load()
    cache.refresh()
    assert cache.get(address_slot(ALICE)) == b"KA|alice@example.org"
    source.write("uid=alice2", (ALICE,), b"KC")
    assert cache.refresh()
    assert cache.get(address_slot(ALICE)) is None
    source.delete("uid=alice2")
    cache._delete_check_due = True  # what an unexplained change token asks for
    cache.refresh()
    assert cache.get(address_slot(ALICE)) == b"KA|alice@example.org"


def test_an_oversize_directory_degrades_to_lru_with_lookups(source: TableSource) -> None:
    for n in range(50):
        source.write(f"uid=u{n}", (Address.parse(f"u{n}@example.org"),), b"K" * 100)
    budget = 10 * (ENTRY_OVERHEAD + 200)
    cache = KeyCache(source, budget=budget, cleaner=cleaner)
    assert not cache.load()
    assert not cache.complete
    for n in range(50):
        assert cache.get(address_slot(Address.parse(f"u{n}@example.org"))) is not None
        assert cache.size <= budget
    before = source.lookups
    assert cache.get(address_slot(NOBODY)) is None
    assert cache.get(address_slot(NOBODY)) is None  # the negative answer is cached
    assert source.lookups == before + 1


@pytest.mark.parametrize("budget", [1 << 20, 0])
def test_a_changed_key_is_served_after_one_refresh(source: TableSource, budget: int) -> None:
    cache = KeyCache(source, budget=budget, cleaner=cleaner)
    cache.load()
    cache.refresh()
    assert cache.get(address_slot(BOB)) == b"KB|bob@example.org"
    source.write("uid=bob", (BOB,), b"KB2")
    assert cache.refresh()
    assert cache.get(address_slot(BOB)) == b"KB2|bob@example.org"
    assert not cache.refresh()  # nothing new


@pytest.mark.parametrize("budget", [1 << 20, 0])
def test_a_new_and_a_removed_key(source: TableSource, budget: int) -> None:
    cache = KeyCache(source, budget=budget, cleaner=cleaner)
    cache.load()
    cache.refresh()
    assert cache.get(address_slot(NOBODY)) is None
    source.write("uid=nobody", (NOBODY,), b"KN")
    source.write("uid=bob", (), b"KB")  # key kept, address unpublished
    cache.refresh()
    assert cache.get(address_slot(NOBODY)) == b"KN|nobody@example.org"
    assert cache.get(address_slot(BOB)) is None


@pytest.mark.parametrize("budget", [1 << 20, 0])
def test_a_deleted_entry_is_found_by_reconciling(source: TableSource, budget: int) -> None:
    cache = KeyCache(source, budget=budget, cleaner=cleaner)
    cache.load()
    cache.refresh()
    assert cache.get(address_slot(ALICE)) is not None
    source.delete("uid=alice")
    assert not explained(source.change_token(), source.changes_since(cache.token or ""))
    cache.refresh()
    assert cache.get(address_slot(ALICE)) is None
    assert cache.get(address_slot(ALIAS)) is None
    assert cache.get(address_slot(BOB)) is not None


def test_unreadable_change_details_empty_the_cache(source: TableSource) -> None:
    cache = KeyCache(source, budget=1 << 20, cleaner=cleaner)
    cache.load()
    source.csn_readable = False
    source.write("uid=bob", (BOB,), b"KB3")
    assert cache.refresh()
    assert not cache.complete
    assert len(cache) == 0
    assert cache.get(address_slot(BOB)) == b"KB3|bob@example.org"


def test_refused_keys_are_404_and_logged_once(source: TableSource,
                                              caplog: pytest.LogCaptureFixture) -> None:
    source.write("uid=mallory", (Address.parse("mallory@example.org"),), b"bad key")
    cache = KeyCache(source, budget=0, cleaner=cleaner)
    slot = address_slot(Address.parse("mallory@example.org"))
    with caplog.at_level(logging.WARNING, logger="milter_wkd.web.cache"):
        assert cache.get(slot) is None
        cache.refresh()
        source.write("uid=bob", (BOB,), b"KB4")  # unrelated change, cache emptied of it
        cache.refresh()
        assert cache.get(slot) is None
        cache._answers.clear()  # forget the negative answer: the refusal is met again
        assert cache.get(slot) is None
    warnings = [r for r in caplog.records if "uid=mallory" in r.getMessage()]
    assert len(warnings) == 1
    assert "corrupt" in warnings[0].getMessage()


def test_a_down_directory_serves_what_is_cached(source: TableSource) -> None:
    cache = KeyCache(source, budget=0, cleaner=cleaner)
    cache.refresh()
    cache.budget = 1 << 20
    assert cache.get(address_slot(ALICE)) is not None
    source.down = True
    assert cache.get(address_slot(ALICE)) is not None
    with pytest.raises(SourceUnavailable):
        cache.get(address_slot(BOB))
    with pytest.raises(SourceUnavailable):
        cache.refresh()


def test_a_mirror_serves_misses_while_the_directory_is_down(source: TableSource) -> None:
    cache = KeyCache(source, budget=1 << 20, cleaner=cleaner)
    cache.load()
    source.down = True
    assert cache.get(address_slot(NOBODY)) is None
    assert cache.get(address_slot(BOB)) == b"KB|bob@example.org"


def test_a_periodic_reconcile_catches_a_delete_hidden_by_a_later_write(
        source: TableSource) -> None:
    now = [0.0]
    cache = KeyCache(source, budget=1 << 20, cleaner=cleaner, reconcile_interval=60,
                     clock=lambda: now[0])
    cache.load()
    source.delete("uid=alice")
    source.write("uid=bob", (BOB,), b"KB5")  # the newest CSN is explained by bob
    cache.refresh()
    assert cache.get(address_slot(ALICE)) is not None  # the gap the backstop closes
    now[0] = 61.0
    cache.refresh()
    assert cache.get(address_slot(ALICE)) is None


def test_delete_checks_are_rate_limited_but_never_dropped(source: TableSource) -> None:
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0  # every reading takes a second: a listing "lasts" one
        return now[0]

    cache = KeyCache(source, budget=1 << 20, cleaner=cleaner, clock=clock)
    cache.load()
    source.delete("uid=alice")
    cache.refresh()
    assert cache.get(address_slot(ALICE)) is None
    source.delete("uid=bob")
    cache.refresh()  # within 3x the last listing's duration: deferred
    assert cache.get(address_slot(BOB)) is not None
    now[0] += 10
    cache.refresh()  # nothing new in the token, but the check is still due
    assert cache.get(address_slot(BOB)) is None


def test_changes_are_searched_from_the_oldest_provider_that_wrote() -> None:
    from milter_wkd.store.view import changes_from

    a1, a2 = "20261129100000.000000Z#000000#001#000000", "20261129120000.000000Z#000000#001#000000"
    b1, b2 = "20261129110000.000000Z#000000#002#000000", "20261129113000.000000Z#000000#002#000000"
    assert changes_from(a1, a2) == a1  # one provider
    # Provider 2 wrote (at 11:30, replicated late): search from its own old CSN, not 12:00.
    assert changes_from(f"{a2}|{b1}", f"{a2}|{b2}") == b1
    assert changes_from(f"{a1}|{b1}", f"{a2}|{b2}") == a1
    assert changes_from(a1, f"{a1}|{b1}") == a1  # a new provider
    assert changes_from("", a1) == ""


def test_the_version_moves_after_every_change_of_the_answers() -> None:
    # The app's memo trusts answers only while the version stays the same.
    cache = KeyCache(TableSource(), budget=1 << 20, cleaner=cleaner)
    seen = [cache.version]
    with cache._lock:
        cache._put("a@example.org", Answer(b"K", ("uid=a",)))  # an addition
        seen.append(cache.version)
        cache._put("a@example.org", Answer(b"K2", ("uid=a",)))  # a replacement
        seen.append(cache.version)
        cache._remove("a@example.org")
        seen.append(cache.version)
        cache._remove("a@example.org")  # nothing there: nothing changed
        seen.append(cache.version)
    cache.reset()
    seen.append(cache.version)
    assert seen[0] < seen[1] < seen[2] < seen[3] == seen[4] < seen[5]
