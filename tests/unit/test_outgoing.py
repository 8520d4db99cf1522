"""Outgoing mail's Autocrypt cache and the service's key files, on the in-memory store: what
is cached, when it is looked up again, how much is kept. The header and the signature
themselves are checked in tests/unit/test_service.py and, through Postfix,
tests/integration/test_milter_autocrypt.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from milter_wkd import outgoing
from milter_wkd.config import ConfigError, DomainConfig, build
from milter_wkd.openpgp import clean_key
from milter_wkd.outgoing import CHANGE_CHECK_INTERVAL, AutocryptCache, AutocryptEntry
from milter_wkd.servicekeys import ServiceKeys
from milter_wkd.store.memory import MemoryStore
from milter_wkd.store.model import KeyOrigin, Provenance
from milter_wkd.values import Address
from tests.contract.conftest import USERS
from tests.contract.test_store import make_key

ALICE = Address.parse("alice@example.org")
BOB = Address.parse("bob@example.org")
NOW = 1_800_000_000.0


class CountingStore(MemoryStore):
    """Counts the lookups the cache makes."""

    def __init__(self) -> None:
        super().__init__(USERS)
        self.lookups = 0
        self.token_reads = 0

    def find_user(self, address: Address, **kwargs: object) -> object:  # type: ignore[override]
        self.lookups += 1
        return super().find_user(address, **kwargs)  # type: ignore[arg-type]

    def change_token(self) -> str:
        self.token_reads += 1
        return super().change_token()


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def publish(store: CountingStore, address: Address) -> None:
    """As the keys CLI would: the lookups it makes are not the cache's."""
    lookups = store.lookups
    key, _primary, _sub = make_key(f"<{address}>")
    store.publish_key(store.user(address), clean_key(key, [address]),
                      Provenance(KeyOrigin.ADMIN_IMPORT, "test", int(NOW)))
    store.lookups = lookups


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_an_address_is_looked_up_once_while_the_store_does_not_change(
        store: CountingStore, clock: Clock) -> None:
    publish(store, ALICE)
    cache = AutocryptCache(store, clock)
    first = cache.entry(ALICE)
    assert first.keydata is not None
    assert first.owner_dn == "uid=alice,ou=people,dc=example,dc=org"
    clock.now += 10 * CHANGE_CHECK_INTERVAL
    assert cache.entry(ALICE) is first
    assert store.lookups == 1
    assert store.token_reads == 2  # once per interval, not once per mail


def test_a_change_elsewhere_shows_after_the_next_token_check(store: CountingStore,
                                                             clock: Clock) -> None:
    cache = AutocryptCache(store, clock)
    assert cache.entry(BOB) == AutocryptEntry(None, store.user(BOB).dn, None)
    publish(store, BOB)  # by the keys CLI, say: the cache is not told
    clock.now += CHANGE_CHECK_INTERVAL / 2
    assert cache.entry(BOB).keydata is None  # not looked at yet
    assert store.token_reads == 1
    clock.now += CHANGE_CHECK_INTERVAL
    assert cache.entry(BOB).keydata is not None
    assert store.token_reads == 2


def test_forget_looks_again_at_once(store: CountingStore, clock: Clock) -> None:
    cache = AutocryptCache(store, clock)
    assert cache.entry(ALICE).keydata is None
    publish(store, ALICE)
    cache.forget()  # what a publication of ours does
    assert cache.entry(ALICE).keydata is not None
    assert store.lookups == 2


def test_an_address_of_nobody_has_no_owner(store: CountingStore, clock: Clock) -> None:
    cache = AutocryptCache(store, clock)
    assert cache.entry(Address.parse("nobody@example.org")) == AutocryptEntry(None, None, None)


def test_the_cache_keeps_the_most_recently_used_addresses(
        store: CountingStore, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outgoing, "MAX_CACHED_ADDRESSES", 2)
    cache = AutocryptCache(store, clock)
    carol = Address.parse("carol@example.org")
    cache.entry(ALICE)
    cache.entry(BOB)
    cache.entry(ALICE)  # alice used again: bob is now the oldest
    cache.entry(carol)
    assert store.lookups == 3
    cache.entry(ALICE)
    cache.entry(carol)
    assert store.lookups == 3
    cache.entry(BOB)
    assert store.lookups == 4


def test_an_unreadable_submission_key_is_a_configuration_error(tmp_path: Path) -> None:
    cfg = build({"domains": [{"name": "example.org",
                              "submission_key": str(tmp_path / "missing.key")}]}, environ={})
    domain: DomainConfig = cfg.domains[0]
    keys = ServiceKeys()
    with pytest.raises(ConfigError, match=r"missing\.key"):
        keys.submission_secret(domain)
    (tmp_path / "missing.key").write_bytes(b"secret")
    assert keys.submission_secret(domain) == b"secret"
    (tmp_path / "missing.key").write_bytes(b"changed")
    assert keys.submission_secret(domain) == b"secret"  # read once: a restart reads again
    assert keys.dkim(domain) == ()
