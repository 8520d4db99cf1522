"""One suite, two stores (tests/contract/conftest.py): what the flows rely on, checked
against MemoryStore and LdapStore alike, so a unit test on the memory store means the same
as an integration test on slapd. Keys are crafted (tests/unit/test_openpgp_crafted.py):
real Ed25519/cv25519 keys, made in microseconds."""

from __future__ import annotations

import time

import pytest

from milter_wkd import openpgp
from milter_wkd.errors import Conflict, KeyRefused, NotFound, RateLimited, Refused
from milter_wkd.store.model import KeyOrigin, PendingRequest, Provenance
from milter_wkd.store.protocol import KeyStore
from milter_wkd.store.schema import address_slot
from milter_wkd.store.view import KeyView, changes_from
from milter_wkd.values import Address, Fingerprint
from tests.support.squat import squatting_key
from tests.unit.test_openpgp_crafted import T0, Signer, Subkey, user_id

ALICE = Address.parse("alice@example.org")
ALIAS = Address.parse("alice.liddell@example.org")
BOB = Address.parse("bob@example.org")
NOW = int(time.time())


def make_key(*uids: str, signing_subkey: bool = False) -> tuple[bytes, Signer, Subkey]:
    primary, sub = Signer(), Subkey(T0 + 5)
    key = primary.packet
    for uid in uids:
        key += user_id(uid) + primary.certify(uid, T0 + 1)
    key += sub.packet + primary.bind(sub, T0 + 6)
    if signing_subkey:
        signer = Signer(T0 + 7)
        key += new_subkey_packet(signer) + primary.bind_signing(signer, T0 + 8)
    return key, primary, sub


def new_subkey_packet(signer: Signer) -> bytes:
    from milter_wkd.openpgp.packets import new_header
    return new_header(14, len(signer.body)) + signer.body


def publish(store: KeyStore, address: Address, key: bytes, *,
            origin: KeyOrigin = KeyOrigin.ADMIN_IMPORT, consume: PendingRequest | None = None):
    user = store.user(address)
    cleaned = openpgp.clean_key(key, list(user.addresses))
    return store.publish_key(user, cleaned, Provenance(origin, "contract", NOW),
                             consume=consume)


def test_users_are_found_by_any_address_in_any_case(store: KeyStore) -> None:
    alice = store.find_user(Address.parse("Alice@Example.ORG"))
    assert alice is not None
    assert alice.dn.startswith("uid=alice,")
    assert {a.key for a in alice.addresses} == {ALICE.key, ALIAS.key}
    by_alias = store.find_user(ALIAS)
    assert by_alias is not None
    assert by_alias.dn == alice.dn
    assert store.find_user(Address.parse("nobody@example.org")) is None
    with pytest.raises(NotFound):
        store.user(Address.parse("nobody@example.org"))


def test_hostile_address_characters_find_nobody(store: KeyStore) -> None:
    # LDAP filter characters are escaped: no wildcard, no injection.
    tried = 0
    for text in ("*@example.org", "al*@example.org", "a)(uid=*@example.org",
                 "al\\2aice@example.org"):
        try:
            address = Address.parse(text)
        except Refused:
            continue
        tried += 1
        assert store.find_user(address) is None
    assert tried >= 2  # the wildcards reach the store


def test_a_published_key_reads_back_with_its_provenance(store: KeyStore) -> None:
    key, primary, _sub = make_key("Alice <alice@example.org>",
                                 "Alice L. <alice.liddell@example.org>")
    stored = publish(store, ALICE, key)
    assert stored.fingerprint == Fingerprint.parse(primary.fingerprint.hex())
    assert {a.key for a in stored.addresses} == {ALICE.key, ALIAS.key}
    assert stored.provenance == Provenance(KeyOrigin.ADMIN_IMPORT, "contract", NOW)
    assert not stored.disabled
    assert not stored.revoked
    assert stored.withheld == ()
    again = store.get_key(store.user(ALICE))
    assert again is not None
    assert (again.key, again.fingerprint, again.addresses) == (
        stored.key, stored.fingerprint, stored.addresses)
    assert any(k.dn == stored.dn for k in store.list_keys())


def test_a_key_naming_someone_elses_address_is_refused_whole(store: KeyStore) -> None:
    key, _primary, _sub = make_key("Alice <alice@example.org>", "Bob <bob@example.org>")
    user = store.user(ALICE)
    with pytest.raises(KeyRefused, match=r"bob@example\.org"):
        store.publish_key(user, openpgp.clean_key(key, None),
                          Provenance(KeyOrigin.ADMIN_IMPORT, "", NOW))
    assert store.get_key(user) is None


def test_one_primary_key_on_two_entries_is_a_conflict(store: KeyStore) -> None:
    key, _primary, _sub = make_key("Alice <alice@example.org>", "Bob <bob@example.org>")
    user = store.user(ALICE)
    publish(store, ALICE, key)
    bob = store.user(BOB)
    with pytest.raises(Conflict):
        store.publish_key(bob, openpgp.clean_key(key, [BOB]),
                          Provenance(KeyOrigin.ADMIN_IMPORT, "", NOW))
    assert store.get_key(bob) is None
    assert store.get_key(user) is not None


def test_an_encryption_subkey_held_elsewhere_is_left_out_not_stolen(store: KeyStore) -> None:
    victim, _primary, _sub = make_key("Alice <alice@example.org>")
    publish(store, ALICE, victim)
    squat = squatting_key(victim, "Bob <bob@example.org>")
    stored = publish(store, BOB, squat)
    assert len(stored.withheld) == 1
    alice_key = store.get_key(store.user(ALICE))
    assert alice_key is not None
    assert alice_key.fingerprint.hex == _primary.fingerprint.hex().upper()
    # Alice's key keeps updating: the squatter blocks nothing.
    publish(store, ALICE, victim)


def test_the_real_holder_displaces_a_squatted_subkey(store: KeyStore) -> None:
    victim, primary, _sub = make_key("Alice <alice@example.org>")
    squat = squatting_key(victim, "Bob <bob@example.org>")
    publish(store, BOB, squat)  # before Alice ever published
    stored = publish(store, ALICE, victim)
    assert stored.fingerprint.hex == primary.fingerprint.hex().upper()
    bob_key = store.get_key(store.user(BOB))
    assert bob_key is not None  # Bob keeps his own key, without Alice's material
    info = openpgp.clean_key(bob_key.key, None).info
    assert primary.fingerprint.hex().upper() not in {s.fingerprint.hex for s in info.subkeys}
    assert len(info.subkeys) == 1  # his own encryption subkey


def test_removing_a_key_releases_its_material(store: KeyStore) -> None:
    key, _primary, _sub = make_key("Alice <alice@example.org>", "Bob <bob@example.org>")
    publish(store, ALICE, key)
    removed = store.remove_key(store.user(ALICE))
    assert removed.fingerprint.hex == _primary.fingerprint.hex().upper()
    assert store.get_key(store.user(ALICE)) is None
    with pytest.raises(NotFound):
        store.remove_key(store.user(ALICE))
    # The material is free again: Bob may publish it now (for his own address).
    assert publish(store, BOB, key).dn.startswith("uid=bob,")


def test_a_disabled_key_stays_but_says_so(store: KeyStore) -> None:
    key, _primary, _sub = make_key("Alice <alice@example.org>")
    publish(store, ALICE, key)
    user = store.user(ALICE)
    assert store.set_disabled(user, True).disabled
    stored = store.get_key(user)
    assert stored is not None
    assert stored.disabled
    # An update keeps the administrator's decision.
    assert publish(store, ALICE, key).disabled
    assert not store.set_disabled(user, False).disabled
    with pytest.raises(NotFound):
        store.set_disabled(store.user(BOB), True)


def pending(nonce: str, address: Address = ALICE, *, created: int = NOW,
            days: int = 7) -> PendingRequest:
    key, primary, _sub = make_key(f"A <{address}>")
    return PendingRequest(nonce, address, Fingerprint.parse(primary.fingerprint.hex()),
                          openpgp.clean_key(key, [address]).key, created,
                          created + days * 86400)


def test_pending_requests_are_capped_per_address(store: KeyStore) -> None:
    first = store.create_pending(pending("a" * 32), limit=2)
    store.create_pending(pending("b" * 32), limit=2)
    with pytest.raises(RateLimited):
        store.create_pending(pending("c" * 32), limit=2)
    store.create_pending(pending("d" * 32, BOB), limit=2)  # another address: its own slots
    store.delete_pending(first)
    store.create_pending(pending("e" * 32), limit=2)  # a freed slot is used again
    with pytest.raises(NotFound):
        store.delete_pending(first)


def test_a_pending_request_is_found_only_by_its_nonce_and_address(store: KeyStore) -> None:
    request = store.create_pending(pending("f" * 32), limit=3)
    found = store.get_pending("f" * 32, ALICE, NOW)
    assert (found.nonce, found.fingerprint, found.key) == (
        request.nonce, request.fingerprint, request.key)
    with pytest.raises(NotFound):
        store.get_pending("g" * 32, ALICE, NOW)
    with pytest.raises(NotFound):
        store.get_pending("f" * 32, BOB, NOW)
    with pytest.raises(NotFound):  # expired
        store.get_pending("f" * 32, ALICE, NOW + 8 * 86400)
    with pytest.raises(Refused):
        store.get_pending("*)(wkdNonce=*", ALICE, NOW)


def test_a_confirmation_is_used_up_by_its_publication_once(store: KeyStore) -> None:
    stored_request = store.create_pending(pending("h" * 32), limit=3)
    request = store.get_pending("h" * 32, ALICE, NOW)
    user = store.user(ALICE)
    cleaned = openpgp.clean_key(request.key, [ALICE])
    store.publish_key(user, cleaned, Provenance(KeyOrigin.WKS_CONFIRMED, str(ALICE), NOW),
                      consume=request)
    with pytest.raises(NotFound):
        store.get_pending("h" * 32, ALICE, NOW)
    with pytest.raises(NotFound):
        store.publish_key(user, cleaned, Provenance(KeyOrigin.WKS_CONFIRMED, str(ALICE), NOW),
                          consume=request)
    assert stored_request.dn


def test_expired_requests_are_swept(store: KeyStore) -> None:
    store.create_pending(pending("i" * 32, BOB, created=NOW - 10 * 86400), limit=3)
    store.create_pending(pending("j" * 32), limit=3)
    assert [r.nonce for r in store.list_pending()] == ["i" * 32, "j" * 32]
    assert store.expire_pending(NOW) == 1
    assert [r.nonce for r in store.list_pending()] == ["j" * 32]


def test_every_write_moves_the_change_token(store: KeyStore) -> None:
    before = store.change_token()
    key, _primary, _sub = make_key("Alice <alice@example.org>")
    publish(store, ALICE, key)
    after = store.change_token()
    assert after != before
    store.remove_key(store.user(ALICE))
    assert store.change_token() != after


# -- the responder's view of the same keys (one rule for what an entry publishes) --------

def test_the_view_serves_what_the_store_published(store: KeyStore, view: KeyView) -> None:
    token = view.change_token()
    key, _primary, _sub = make_key("Alice <alice@example.org>",
                                   "Alice L. <alice.liddell@example.org>")
    stored = publish(store, ALICE, key)
    (found,) = view.lookup(address_slot(ALIAS))
    assert found.dn == stored.dn
    assert {a.key for a in found.addresses} == {ALICE.key, ALIAS.key}
    assert [p.dn for p in view.iter_published()] == [stored.dn]
    assert stored.dn in view.published_dns()
    assert view.change_token() != token
    (change,) = [c for c in view.changes_since(changes_from(token, view.change_token()))
                 if c.dn == stored.dn]
    assert change.slots == {address_slot(ALICE), address_slot(ALIAS)}
    assert view.lookup(address_slot(BOB)) == []


def test_the_view_never_serves_a_disabled_or_removed_key(store: KeyStore,
                                                          view: KeyView) -> None:
    key, _primary, _sub = make_key("Alice <alice@example.org>")
    publish(store, ALICE, key)
    store.set_disabled(store.user(ALICE), True)
    assert view.lookup(address_slot(ALICE)) == []
    assert list(view.iter_published()) == []
    store.set_disabled(store.user(ALICE), False)
    assert len(view.lookup(address_slot(ALICE))) == 1
    token = view.change_token()
    store.remove_key(store.user(ALICE))
    assert view.lookup(address_slot(ALICE)) == []
    changed = [c for c in view.changes_since(changes_from(token, view.change_token()))
               if c.dn.startswith("uid=alice,")]
    assert all(c.slots == frozenset() and c.entry is None for c in changed)


def test_the_view_finds_a_key_by_fingerprint_or_key_id(store: KeyStore, view: KeyView) -> None:
    """HKP and VKS look-ups when the responder's mirror is incomplete: the primary key's
    or a subkey's fingerprint or key ID, never a disabled key, nothing for a stranger."""
    key, primary, sub = make_key("Alice <alice@example.org>", signing_subkey=True)
    stored = publish(store, ALICE, key)
    fingerprints = [Fingerprint.from_bytes(primary.fingerprint).hex,
                    sub.fingerprint.upper()]
    for fpr in fingerprints:
        for wanted in (fpr, fpr[-16:], fpr.lower()):
            found = view.lookup_fingerprint(wanted.upper())
            assert [p.dn for p in found] == [stored.dn], wanted
            assert {a.key for a in found[0].addresses} == {ALICE.key}
    assert view.lookup_fingerprint("0" * 40) == []
    assert view.lookup_fingerprint("0" * 16) == []
    assert view.lookup_fingerprint("*") == []
    store.set_disabled(store.user(ALICE), True)
    assert view.lookup_fingerprint(fingerprints[0]) == []
    assert view.lookup_fingerprint(fingerprints[1][-16:]) == []


def test_republishing_a_key_for_fewer_addresses_stops_serving_the_others(
        store: KeyStore, view: KeyView) -> None:
    """What the self-service page's per-address unpublishing relies on
    (publication.unpublish_address): the same key written again, cleaned for one address
    of two, replaces the entry's addresses and WKD slots; its claims stay the entry's."""
    key, primary, _sub = make_key("Alice <alice@example.org>",
                                  "Alice L. <alice.liddell@example.org>")
    first = publish(store, ALICE, key)
    user = store.user(ALICE)
    narrowed = openpgp.clean_key(first.key, [ALICE])
    token = view.change_token()
    again = store.publish_key(user, narrowed, Provenance(KeyOrigin.SELF_SERVICE, "alice",
                                                         NOW + 1))
    assert again.fingerprint == first.fingerprint
    assert [a.key for a in again.addresses] == [ALICE.key]
    assert openpgp.inspect_key(again.key).user_ids == ("Alice <alice@example.org>",)
    assert view.lookup(address_slot(ALIAS)) == []
    (found,) = view.lookup(address_slot(ALICE))
    assert found.dn == first.dn
    (change,) = [c for c in view.changes_since(changes_from(token, view.change_token()))
                 if c.dn == first.dn]
    assert change.slots == {address_slot(ALICE)}
    # The material is still claimed by alice: the same primary key under bob's user ID
    # is a conflict.
    bob_uid = "Bob <bob@example.org>"
    with pytest.raises(Conflict):
        publish(store, BOB, primary.packet + user_id(bob_uid) + primary.certify(bob_uid,
                                                                                T0 + 1))
