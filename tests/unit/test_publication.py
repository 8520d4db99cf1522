"""The publication use case on the in-memory store (the same store contract as slapd's,
tests/contract): cleaning, ownership, merge, size cap, and the refusal matrix."""

from __future__ import annotations

import pytest

from milter_wkd import openpgp
from milter_wkd.errors import Conflict, DirectoryUnavailable, KeyRefused, NotFound
from milter_wkd.openpgp import DEFAULT_LIMITS
from milter_wkd.publication import Policy, Publication, publish
from milter_wkd.store.memory import MemoryStore
from milter_wkd.store.model import KeyOrigin, PendingRequest
from milter_wkd.values import Address, Fingerprint
from tests.contract.conftest import USERS
from tests.contract.test_store import make_key
from tests.support.squat import squatting_key
from tests.unit.test_openpgp_crafted import T0, Signer, Subkey, user_id

ALICE = Address.parse("alice@example.org")
ALIAS = Address.parse("alice.liddell@example.org")
BOB = Address.parse("bob@example.org")
POLICY = Policy(DEFAULT_LIMITS, 64 * 1024)
NOW = 1_800_000_000


def run(store: MemoryStore, address: Address, key: bytes, *, policy: Policy = POLICY,
        addresses: list[Address] | None = None,
        consume: PendingRequest | None = None) -> Publication:
    return publish(store, store.user(address), key, origin=KeyOrigin.ADMIN_IMPORT,
                   actor="test", now=NOW, policy=policy, addresses=addresses,
                   consume=consume)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore(USERS)


def test_a_key_is_published_for_the_users_addresses_it_names(store: MemoryStore) -> None:
    key, primary, _sub = make_key("Alice <alice@example.org>", "Nobody <nobody@example.net>")
    done = run(store, ALICE, key)
    assert [str(a) for a in done.stored.addresses] == ["alice@example.org"]
    assert [str(a) for a in done.cleaned.info.addresses] == ["alice@example.org"]
    assert done.stored.fingerprint.hex == primary.fingerprint.hex().upper()
    assert not done.merged


def test_addresses_asked_for_must_be_the_users(store: MemoryStore) -> None:
    key, _primary, _sub = make_key("Alice <alice@example.org>", "Bob <bob@example.org>")
    with pytest.raises(KeyRefused, match=r"bob@example\.org"):
        run(store, ALICE, key, addresses=[ALICE, BOB])
    assert store.get_key(store.user(ALICE)) is None


def test_a_key_without_any_of_the_users_addresses_is_refused(store: MemoryStore) -> None:
    key, _primary, _sub = make_key("Bob <bob@example.org>")
    with pytest.raises(KeyRefused):
        run(store, ALICE, key)


def test_an_update_merges_with_what_is_published(store: MemoryStore) -> None:
    primary, sub = Signer(), Subkey(T0 + 5)
    first_uid, second_uid = "Alice <alice@example.org>", "Alice L. <alice.liddell@example.org>"
    base = primary.packet + user_id(first_uid) + primary.certify(first_uid, T0 + 1)
    binding = sub.packet + primary.bind(sub, T0 + 6)
    run(store, ALICE, base + binding)
    # The second submission names only the alias: the first user ID stays published.
    later = (primary.packet + user_id(second_uid) + primary.certify(second_uid, T0 + 2)
             + binding)
    done = run(store, ALIAS, later, addresses=[ALIAS])
    assert done.merged
    assert {a.key for a in done.stored.addresses} == {ALICE.key, ALIAS.key}


def test_the_size_cap_applies_to_the_cleaned_key(store: MemoryStore) -> None:
    key, _primary, _sub = make_key("Alice <alice@example.org>")
    size = len(openpgp.clean_key(key, [ALICE]).key)
    with pytest.raises(KeyRefused, match="max_published_bytes"):
        run(store, ALICE, key, policy=Policy(DEFAULT_LIMITS, size - 1))
    assert run(store, ALICE, key, policy=Policy(DEFAULT_LIMITS, size)).stored


def test_a_primary_key_published_by_another_user_is_a_conflict(store: MemoryStore) -> None:
    key, _primary, _sub = make_key("Alice <alice@example.org>", "Bob <bob@example.org>")
    run(store, ALICE, key)
    with pytest.raises(Conflict):
        run(store, BOB, key)


def test_a_squatted_subkey_is_left_out_and_said_so(store: MemoryStore) -> None:
    victim, _primary, _sub = make_key("Alice <alice@example.org>")
    run(store, ALICE, victim)
    done = run(store, BOB, squatting_key(victim, "Bob <bob@example.org>"))
    assert len(done.stored.withheld) == 1
    # What the caller reports is the key as written: without the left-out subkey.
    assert len(done.cleaned.info.subkeys) == 1


def test_a_used_confirmation_publishes_nothing(store: MemoryStore) -> None:
    key, primary, _sub = make_key("Alice <alice@example.org>")
    request = store.create_pending(PendingRequest(
        "n" * 32, ALICE, Fingerprint.parse(primary.fingerprint.hex()),
        openpgp.clean_key(key, [ALICE]).key, NOW, NOW + 86400), limit=3)
    run(store, ALICE, request.key, addresses=[ALICE], consume=request)
    with pytest.raises(NotFound):
        run(store, ALICE, request.key, addresses=[ALICE], consume=request)


def test_a_directory_that_does_not_answer_writes_nothing(store: MemoryStore) -> None:
    key, _primary, _sub = make_key("Alice <alice@example.org>")
    user = store.user(ALICE)
    store.down = True
    with pytest.raises(DirectoryUnavailable):
        publish(store, user, key, origin=KeyOrigin.ADMIN_IMPORT, actor="t", now=NOW,
                policy=POLICY)
    store.down = False
    assert store.get_key(user) is None
