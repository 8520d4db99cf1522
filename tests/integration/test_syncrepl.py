"""The responder follows the directory with RFC 4533 refreshAndPersist (milter_wkd.store.
syncrepl, milter_wkd.web.sync) against REAL slapd: edits, deletes and unpublishing
modifies reach the key cache without polling contextCSN; a restarted slapd is resumed
from the cookie without a full reload (the follower's counters say what the refresh
resent); misses of unknown addresses in LRU mode are answered by the presence index
without a directory search; with `Sandbox(providers=2, consumers=1)`, a write on provider 2
reaches a responder syncing from the consumer, which fails over to a provider with the
merged cookie.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from milter_wkd import openpgp
from milter_wkd.config import DirectoryConfig
from milter_wkd.sandbox import Sandbox
from milter_wkd.sandbox.slapd import Slapd
from milter_wkd.store.ldapview import LdapKeyView
from milter_wkd.store.schema import address_slot
from milter_wkd.values import Address
from milter_wkd.web.cache import KeyCache
from tests.integration.test_replication import (  # the topology fixture, its poll
    topology_fixture,  # noqa: F401 (a fixture)
    wait_for,
)
from tests.support.gnupg import GnuPG
from tests.support.wkd import remove_key, write_key

pytestmark = pytest.mark.integration

ALICE = Address.parse("alice@example.org")
BOB = Address.parse("bob@example.org")
CAROL = Address.parse("carol@example.org")
ALICE_DN = "uid=alice,ou=people,dc=example,dc=org"
BOB_DN = "uid=bob,ou=people,dc=example,dc=org"
CAROL_DN = "uid=carol,ou=people,dc=example,dc=org"
DEADLINE = 10.0  # seconds a wait gives the sync before it calls it a failure


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, bytes]]:
    with GnuPG(tmp_path_factory.mktemp("keys") / "g") as gpg:
        found = {name: gpg.export(gpg.generate(f"{name.title()} <{name}@example.org>"))
                 for name in ("alice", "bob", "carol")}
        yield found


def view_config(server: Slapd, uri: str | None = None) -> DirectoryConfig:
    account = server.service_accounts["wkd"]
    return DirectoryConfig(uri=uri or server.uri, bind_dn=account["dn"],
                           bind_password=account["password"], base_dn=server.suffix,
                           timeout=3.0)


@pytest.fixture
def started() -> Iterator[Callable[..., tuple[KeyCache, LdapKeyView]]]:
    """started(config, budget=...): a key cache following the directory in its thread,
    once its sync is in the persist phase; stopped afterwards."""
    running: list[tuple[KeyCache, LdapKeyView]] = []

    def run(config: DirectoryConfig, budget: int = 1 << 20) -> tuple[KeyCache, LdapKeyView]:
        view = LdapKeyView(config)
        # refresh_interval: the polling interval, were the cache to poll (it must not).
        cache = KeyCache(view, budget=budget, refresh_interval=0.05)
        cache.start()
        running.append((cache, view))
        wait_for(lambda: view.sync is not None and view.sync.in_persist.is_set(),
                 "the sync reaches the persist phase")
        assert cache.mode == "sync"
        return cache, view

    yield run
    for cache, view in running:
        cache.stop()
        view.close()


def settled(view: LdapKeyView, server: Slapd) -> None:
    """Wait until `server`'s contextCSN has not moved for a second and the follower's
    cookie holds every CSN of it."""
    assert view.sync is not None
    last: list[str] = []
    quiet_since = time.monotonic()
    deadline = quiet_since + DEADLINE
    while True:
        now = server.context_csn()
        if now != last:
            last, quiet_since = now, time.monotonic()
        cookie = view.sync.cookie
        if (time.monotonic() - quiet_since > 1.0 and cookie is not None
                and set(cookie.csns.values()) >= set(now)):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the directory did not settle: {now} against {cookie}")
        time.sleep(0.05)


def served(cache: KeyCache, address: Address) -> bytes | None:
    return cache.get(address_slot(address), address.local)


def cleaned(key: bytes, address: Address) -> bytes:
    return openpgp.clean_key(key, [address]).key


def test_edits_deletes_and_unpublishing_follow_the_sync_without_polling(
        private_slapd: Slapd, keys: dict[str, bytes],
        started: Callable[..., tuple[KeyCache, LdapKeyView]]) -> None:
    slapd = private_slapd
    write_key(slapd, ALICE_DN, keys["alice"], [str(ALICE)])
    cache, view = started(view_config(slapd))
    assert served(cache, ALICE) == cleaned(keys["alice"], ALICE)
    token_reads = view.token_reads
    # A new key: served, and no contextCSN was read for it.
    write_key(slapd, BOB_DN, keys["bob"], [str(BOB)])
    seconds = wait_for(lambda: served(cache, BOB) == cleaned(keys["bob"], BOB),
                       "bob's new key is served")
    print(f"edit served after {seconds * 1000:.0f} ms")
    # A modify that unpublishes (pgpDisabled: out of the sync's filter): gone.
    slapd.ldapmodify(f"dn: {BOB_DN}\nchangetype: modify\nreplace: pgpDisabled\n"
                     "pgpDisabled: 1\n-\n")
    wait_for(lambda: served(cache, BOB) is None, "bob's disabled key is gone")
    # A modify that removes the key: gone.
    remove_key(slapd, ALICE_DN)
    wait_for(lambda: served(cache, ALICE) is None, "alice's removed key is gone")
    # A delete of the entry: gone.
    write_key(slapd, CAROL_DN, keys["carol"], [str(CAROL)])
    wait_for(lambda: served(cache, CAROL) is not None, "carol's key is served")
    slapd.ldapmodify(f"dn: {CAROL_DN}\nchangetype: delete\n")
    wait_for(lambda: served(cache, CAROL) is None, "carol's deleted entry is gone")
    assert view.token_reads == token_reads  # the polling path never ran
    assert view.sync is not None
    assert view.sync.persist_entries == 2  # bob, carol added
    assert len(cache.index) == 0  # every slot dropped from the presence index too


def test_a_restarted_slapd_is_resumed_from_the_cookie_without_a_reload(
        private_slapd: Slapd, keys: dict[str, bytes],
        started: Callable[..., tuple[KeyCache, LdapKeyView]]) -> None:
    slapd = private_slapd
    write_key(slapd, ALICE_DN, keys["alice"], [str(ALICE)])
    write_key(slapd, BOB_DN, keys["bob"], [str(BOB)])
    cache, view = started(view_config(slapd))
    assert view.sync is not None
    assert view.sync.last_refresh_entries == 2  # the full refresh sent both
    write_key(slapd, CAROL_DN, keys["carol"], [str(CAROL)])  # a persist-phase cookie
    wait_for(lambda: served(cache, CAROL) is not None, "carol's key is served")
    slapd.stop()
    wait_for(lambda: not view.sync.in_persist.is_set(), "the sync notices")
    slapd.start()
    wait_for(view.sync.in_persist.is_set, "the sync resumes")
    assert view.sync.resumes == 1
    # Nothing changed while slapd was away: the resumed refresh sent no entry.
    assert view.sync.last_refresh_entries == 0
    # A change while it is away comes alone: one entry, not the directory.
    slapd.stop()
    wait_for(lambda: not view.sync.in_persist.is_set(), "the sync notices")
    slapd.start()
    # slapd is back before the follower's retry: write now, it arrives in the refresh.
    remove_key(slapd, BOB_DN)
    wait_for(lambda: served(cache, BOB) is None, "bob's removed key is gone")
    assert view.sync.resumes >= 2
    print(f"resumed refresh after a change: {view.sync.last_refresh_entries} entries, "
          f"{view.sync.last_refresh_present} present, {view.sync.last_refresh_deletes} "
          "deleted")
    assert view.sync.last_refresh_entries + view.sync.last_refresh_deletes <= 1
    assert served(cache, ALICE) == cleaned(keys["alice"], ALICE)
    assert served(cache, CAROL) == cleaned(keys["carol"], CAROL)


def test_a_miss_of_an_unknown_address_in_lru_mode_asks_no_directory(
        private_slapd: Slapd, keys: dict[str, bytes],
        started: Callable[..., tuple[KeyCache, LdapKeyView]]) -> None:
    slapd = private_slapd
    write_key(slapd, ALICE_DN, keys["alice"], [str(ALICE)])
    write_key(slapd, BOB_DN, keys["bob"], [str(BOB)])
    # A budget below one answer: the cache is an LRU, never a complete mirror.
    cache, view = started(view_config(slapd), budget=100)
    assert not cache.complete
    wait_for(lambda: cache.index.complete, "the presence index is complete")
    searches = view.searches
    for number in range(50):
        assert served(cache, Address.parse(f"nobody{number}@example.org")) is None
    assert view.searches == searches  # 50 misses, no LDAP search
    assert cache.index_misses == 50
    # A published address still costs its look-up, and is served.
    assert served(cache, BOB) == cleaned(keys["bob"], BOB)
    assert view.searches == searches + 1
    # A new publication enters the index through the sync: served, not a 404.
    write_key(slapd, CAROL_DN, keys["carol"], [str(CAROL)])
    wait_for(lambda: served(cache, CAROL) == cleaned(keys["carol"], CAROL),
             "carol's new key is served in LRU mode")


# -- replication (the `topology` fixture of test_replication.py: Sandbox(providers=2,
# consumers=1), one per module) ----------------------------------------------------------


def test_a_write_on_provider_2_reaches_the_consumer_follower_which_fails_over(
        topology: Sandbox, keys: dict[str, bytes],
        started: Callable[..., tuple[KeyCache, LdapKeyView]]) -> None:
    provider1, provider2 = topology.providers
    consumer = topology.consumers[0]
    uris = f"{consumer.uri} {provider1.uri} {provider2.uri}"
    cache, view = started(view_config(consumer, uris))
    assert view.sync is not None
    write_key(provider2, BOB_DN, keys["bob"], [str(BOB)])
    seconds = wait_for(lambda: served(cache, BOB) == cleaned(keys["bob"], BOB),
                       "bob's key written on provider 2 is served via the consumer")
    print(f"provider 2 -> consumer -> responder: {seconds * 1000:.0f} ms")
    write_key(provider1, ALICE_DN, keys["alice"], [str(ALICE)])
    wait_for(lambda: served(cache, ALICE) == cleaned(keys["alice"], ALICE),
             "alice's key written on provider 1 is served via the consumer")
    # The cookie holds the newest CSN of both providers, though each persist-phase
    # cookie named one.
    assert view.sync.cookie is not None
    assert len(view.sync.cookie.csns) >= 2
    # The sandbox's milter follows LDAP edits too (milter_wkd.reconcile writes what it
    # derives): wait until the directory is quiet and the cookie has caught up with it.
    settled(view, provider1)
    consumer.stop()
    try:
        wait_for(lambda: view.sync.resumes >= 1 and view.sync.in_persist.is_set(),
                 "the sync resumes on provider 1")
        # Resumed with the merged cookie: nothing resent (a partial cookie would make
        # the provider resend every entry of the other provider).
        assert view.sync.last_refresh_entries == 0
        remove_key(provider2, BOB_DN)
        wait_for(lambda: served(cache, BOB) is None,
                 "bob's key removed on provider 2 is gone via provider 1")
        assert served(cache, ALICE) == cleaned(keys["alice"], ALICE)
    finally:
        consumer.start()
