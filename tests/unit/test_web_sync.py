"""The responder's RFC 4533 follower, pure logic: slapd's sync cookies (parsing, merging
the per-server CSNs of persist-phase cookies), the Sync State control's BER, the presence
index, and the key cache driven by sync messages (milter_wkd.web.sync) over a table in
memory, including its fall back to polling. Against real slapd:
tests/integration/test_syncrepl.py.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ldap.syncrepl import SyncStateValue
from pyasn1.codec.ber import encoder

from milter_wkd.store.schema import Entry, address_slot
from milter_wkd.store.syncrepl import (
    Cookie,
    SyncListener,
    SyncUnsupported,
    decode_sync_state,
    merge_cookie,
    parse_cookie,
)
from milter_wkd.store.view import Published
from milter_wkd.values import Address
from milter_wkd.web.cache import KeyCache
from milter_wkd.web.presence import PresenceIndex
from tests.unit.test_web_cache import ALICE, BOB, NOBODY, TableSource, cleaner

CSN1 = "20261202120000.000001Z#000000#001#000000"
CSN1_NEWER = "20261202120005.000000Z#000000#001#000000"
CSN2 = "20261202120003.000000Z#000000#002#000000"


# -- cookies -----------------------------------------------------------------------------


def test_a_cookie_is_parsed_per_server_id_and_sent_back_without_sid() -> None:
    cookie = parse_cookie(f"rid=000,sid=001,csn={CSN1};{CSN2}".encode())
    assert cookie.rid == "000"
    assert cookie.csns == {"001": CSN1, "002": CSN2}
    assert cookie.text() == f"rid=000,csn={CSN1};{CSN2}"


def test_persist_phase_cookies_are_merged_newest_per_server() -> None:
    """The pitfall: each persist-phase cookie names only the provider that wrote."""
    held = parse_cookie(f"rid=000,csn={CSN1};{CSN2}")
    held = merge_cookie(held, parse_cookie(f"rid=000,sid=001,csn={CSN1_NEWER}"))
    assert held.text() == f"rid=000,csn={CSN1_NEWER};{CSN2}"
    # An older CSN of a server never moves the cookie back.
    held = merge_cookie(held, parse_cookie(f"rid=000,sid=002,csn={CSN1}"))
    assert held.csns == {"001": CSN1_NEWER, "002": CSN2}


def test_other_cookie_fields_are_kept_and_malformed_cookies_are_empty() -> None:
    cookie = parse_cookie(f"rid=007,csn={CSN1},delcsn={CSN1}")
    assert cookie.rid == "007"
    assert cookie.csns == {"001": CSN1}
    assert parse_cookie("garbage").csns == {}
    assert parse_cookie("") == Cookie()
    assert parse_cookie(None) == Cookie()


_csns = st.builds(
    lambda t, n, sid: f"2026{t:010d}.000000Z#{n:06x}#{sid:03x}#000000",
    st.integers(0, 10**9), st.integers(0, 0xFFFFFF), st.integers(0, 4095))


@given(st.lists(_csns, min_size=1, max_size=20))
def test_merging_partial_cookies_in_any_order_holds_the_newest_csn_of_every_server(
        csns: list[str]) -> None:
    expected: dict[str, str] = {}
    for csn in csns:
        sid = csn.split("#")[2]
        expected[sid] = max(expected.get(sid, ""), csn)
    for order in (csns, list(reversed(csns))):
        held = Cookie()
        for csn in order:
            held = merge_cookie(held, parse_cookie(f"rid=000,sid=001,csn={csn}"))
        assert held.csns == expected
        assert parse_cookie(held.text()).csns == expected  # what is sent parses back


# -- the Sync State control --------------------------------------------------------------


@given(st.sampled_from([(0, "present"), (1, "add"), (2, "modify"), (3, "delete")]),
       st.binary(min_size=16, max_size=16), st.one_of(st.none(), st.binary(max_size=300)))
def test_the_sync_state_decoder_reads_what_pyasn1_encodes(
        state: tuple[int, str], uuid: bytes, cookie: bytes | None) -> None:
    value = SyncStateValue()
    value.setComponentByName("state", state[0])
    value.setComponentByName("entryUUID", uuid)
    if cookie is not None:
        value.setComponentByName("cookie", cookie)
    assert decode_sync_state(encoder.encode(value)) == (state[1], uuid, cookie)


@pytest.mark.parametrize("data", [b"", b"\x30", b"\x30\x03\x0a\x01\x09",
                                  b"\x30\x05\x0a\x01\x01\x04\x10", b"\x04\x00"])
def test_a_malformed_sync_state_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"BER|syncStateValue"):
        decode_sync_state(data)


# -- the presence index ------------------------------------------------------------------


def test_the_presence_index_knows_nothing_until_complete_then_exactly_the_published() -> None:
    index = PresenceIndex()
    index.put(b"A" * 16, [address_slot(ALICE)])
    assert index.may_hold(address_slot(NOBODY))  # incomplete: ask the directory
    index.complete = True
    assert index.may_hold(address_slot(ALICE))
    assert not index.may_hold(address_slot(NOBODY))
    # Two entries publishing one slot: it stays until both are gone.
    index.put(b"B" * 16, [address_slot(ALICE), address_slot(BOB)])
    index.drop(b"A" * 16)
    assert index.may_hold(address_slot(ALICE))
    index.put(b"B" * 16, [address_slot(BOB)])  # modified: alice no more
    assert not index.may_hold(address_slot(ALICE))
    assert index.may_hold(address_slot(BOB))
    assert index.drop(b"B" * 16)
    assert len(index) == 0
    assert index.entries == 0


_ops = st.lists(st.tuples(st.integers(0, 30), st.lists(st.integers(0, 40), max_size=4)),
                max_size=200)


@given(_ops)
def test_the_presence_index_agrees_with_a_plain_model(ops: list[tuple[int, list[int]]]) -> None:
    """Puts (an empty list: a drop) of entries 0..30 publishing slots 0..40, in any order:
    the index holds exactly the slots some entry publishes now."""
    index = PresenceIndex()
    index.complete = True
    model: dict[int, set[int]] = {}
    for entry, slots in ops:
        uuid = entry.to_bytes(16, "big")
        if slots:
            index.put(uuid, [f"s{n}@example.org" for n in slots])
            model[entry] = set(slots)
        else:
            index.drop(uuid)
            model.pop(entry, None)
        held = set().union(*model.values()) if model else set()
        assert {n for n in range(41) if index.may_hold(f"s{n}@example.org")} == held
        assert len(index) == len(held)
        assert index.entries == len(model)


def test_the_presence_index_grows_and_shrinks_past_its_first_table() -> None:
    index = PresenceIndex()
    index.complete = True
    for n in range(5000):
        index.put(n.to_bytes(16, "big"), [f"u{n}@example.org"])
    assert len(index) == 5000
    assert all(index.may_hold(f"u{n}@example.org") for n in range(5000))
    assert not any(index.may_hold(f"v{n}@example.org") for n in range(5000))
    for n in range(0, 5000, 2):
        index.drop(n.to_bytes(16, "big"))
    for n in range(5000, 9000):  # tombstones are reused or rebuilt away
        index.put(n.to_bytes(16, "big"), [f"u{n}@example.org"])
    assert [n for n in range(9000) if index.may_hold(f"u{n}@example.org")] == [
        n for n in range(9000) if n % 2 or n >= 5000]
    assert index.estimated_bytes() < 9000 * 100


# -- the cache following a sync ----------------------------------------------------------


def uuid_of(dn: str) -> bytes:
    return dn.encode().ljust(16, b"\0")[:16]


class SyncedTable(TableSource):
    """A TableSource with the `follow` capability: `follow` replays scripted sync
    messages to the listener, then waits for `stop`."""

    def __init__(self, unsupported: bool = False) -> None:
        super().__init__()
        self.unsupported = unsupported
        self.listener: SyncListener | None = None
        self.following = threading.Event()

    def follow(self, listener: SyncListener, stop: threading.Event) -> None:
        if self.unsupported:
            raise SyncUnsupported("unavailableCriticalExtension")
        self.listener = listener
        listener.begin(False)
        for entry in list(self.entries.values()):
            listener.entry(uuid_of(entry.dn), self.sync_entry(entry), True)
        listener.refresh_done(False)
        self.following.set()
        stop.wait()

    def sync_entry(self, entry: Published) -> Entry:
        return Entry(entry.dn, {"wkdAddressHash": [address_slot(a).encode()
                                                    for a in entry.addresses],
                                "entryCSN": [entry.csn.encode()]})

    def sync_slots(self, entry: Entry) -> frozenset[str]:
        return frozenset(entry.texts("wkdAddressHash"))

    def read_published(self, dn: str) -> Published | None:
        return self.entries.get(dn)

    # What slapd would send for a write or a delete.
    def push_write(self, dn: str, addresses: Sequence[Address], key: bytes) -> None:
        self.write(dn, tuple(addresses), key)
        assert self.listener is not None
        self.listener.entry(uuid_of(dn), self.sync_entry(self.entries[dn]), False)

    def push_delete(self, dn: str) -> None:
        self.delete(dn)
        assert self.listener is not None
        self.listener.delete([uuid_of(dn)], dn)


def started(source: SyncedTable, budget: int) -> KeyCache:
    source.write("uid=alice", (ALICE,), b"KA")
    cache = KeyCache(source, budget=budget, cleaner=cleaner)
    cache.start()
    assert source.following.wait(5)
    return cache


@pytest.mark.parametrize("budget", [1 << 20, 0], ids=["mirror", "lru"])
def test_sync_messages_rebuild_or_drop_the_slots_they_name(budget: int) -> None:
    source = SyncedTable()
    cache = started(source, budget)
    try:
        assert cache.mode == "sync"
        assert cache.get(address_slot(ALICE)) == b"KA|alice@example.org"
        source.push_write("uid=bob", [BOB], b"KB")
        assert cache.get(address_slot(BOB)) == b"KB|bob@example.org"
        source.push_write("uid=alice", [ALICE], b"KA2")
        assert cache.get(address_slot(ALICE)) == b"KA2|alice@example.org"
        source.push_delete("uid=alice")
        assert cache.get(address_slot(ALICE)) is None
        assert not cache.index.may_hold(address_slot(ALICE))
    finally:
        cache.stop()


def test_in_lru_mode_a_miss_of_an_unknown_slot_asks_no_directory() -> None:
    source = SyncedTable()
    cache = started(source, 0)
    try:
        assert not cache.complete
        lookups = source.lookups
        assert cache.get(address_slot(NOBODY)) is None
        assert cache.get(address_slot(Address.parse("x@example.org"))) is None
        assert source.lookups == lookups
        assert cache.index_misses == 2
        assert cache.get(address_slot(ALICE)) == b"KA|alice@example.org"
        assert source.lookups == lookups + 1
        # The sync interrupted: what was published meanwhile is not in the index, so
        # misses ask the directory until a resumed refresh ends.
        assert source.listener is not None
        source.listener.interrupted()
        assert cache.get(address_slot(NOBODY)) is None
        assert source.lookups == lookups + 2
        source.listener.refresh_done(True)
        assert cache.get(address_slot(NOBODY)) is None
        assert source.lookups == lookups + 2
    finally:
        cache.stop()


def test_a_directory_without_the_sync_control_is_polled(
        caplog: pytest.LogCaptureFixture) -> None:
    source = SyncedTable(unsupported=True)
    source.write("uid=alice", (ALICE,), b"KA")
    cache = KeyCache(source, budget=1 << 20, cleaner=cleaner, refresh_interval=0.01)
    with caplog.at_level(logging.WARNING, logger="milter_wkd.web.cache"):
        cache.start()
        try:
            source.write("uid=bob", (BOB,), b"KB")  # no message: only polling sees it
            for _ in range(500):
                if cache.get(address_slot(BOB)) is not None:
                    break
                threading.Event().wait(0.01)
            assert cache.get(address_slot(BOB)) == b"KB|bob@example.org"
            assert cache.mode == "polling"
        finally:
            cache.stop()
    assert any("does not offer the RFC 4533 sync control" in r.getMessage()
               for r in caplog.records)
