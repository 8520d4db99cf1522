"""The responder's LDAP key source against REAL slapd, as the read-only cn=wkd account:
change token, changes since a token, look-ups by hash (and by `l=` for keys written
without the hash attribute), paged mirroring, the delete check, disabled keys; and the
key cache on top of it, fresh after ldapmodify and ldapdelete.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest

from milter_wkd import openpgp
from milter_wkd.config import DirectoryConfig
from milter_wkd.sandbox.slapd import Slapd
from milter_wkd.store.ldapview import LdapKeyView
from milter_wkd.store.schema import address_slot
from milter_wkd.store.view import SourceUnavailable, explained
from milter_wkd.values import Address
from milter_wkd.web.cache import KeyCache
from tests.support.gnupg import GnuPG
from tests.support.wkd import write_key

pytestmark = pytest.mark.integration

ALICE = Address.parse("alice@example.org")
ALIAS = Address.parse("alice.liddell@example.org")
BOB = Address.parse("bob@example.org")
ALICE_DN = "uid=alice,ou=people,dc=example,dc=org"
BOB_DN = "uid=bob,ou=people,dc=example,dc=org"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, bytes]]:
    with GnuPG(tmp_path_factory.mktemp("keys") / "g") as gpg:
        alice = gpg.generate("Alice <alice@example.org>")
        gpg.run("--quick-add-uid", alice, "Alice L. <alice.liddell@example.org>")
        bob = gpg.generate("Bob <bob@example.org>")
        yield {"alice": gpg.export(alice), "bob": gpg.export(bob)}


@pytest.fixture
def slapd(private_slapd: Slapd) -> Slapd:
    """A fresh directory for each test (they add, change and delete entries)."""
    return private_slapd


@pytest.fixture
def source(slapd: Slapd) -> Iterator[LdapKeyView]:
    account = slapd.service_accounts["wkd"]
    ldap = LdapKeyView(DirectoryConfig(uri=slapd.uri, bind_dn=account["dn"],
                                         bind_password=account["password"],
                                         base_dn=slapd.suffix))
    yield ldap
    ldap.close()


def test_token_changes_and_changes_name_the_entry(slapd: Slapd, source: LdapKeyView,
                                                  keys: dict[str, bytes]) -> None:
    before = source.change_token()
    write_key(slapd, ALICE_DN, keys["alice"], [str(ALICE), str(ALIAS)])
    after = source.change_token()
    assert after != before
    changes = source.changes_since(before.split("|")[0])
    assert [c.dn for c in changes] == [ALICE_DN]
    assert changes[0].slots == {address_slot(ALICE), address_slot(ALIAS)}
    assert explained(after, changes)


def test_lookup_by_hash_and_by_hint(slapd: Slapd, source: LdapKeyView,
                                    keys: dict[str, bytes]) -> None:
    write_key(slapd, ALICE_DN, keys["alice"], [str(ALICE), str(ALIAS)])
    found = source.lookup(address_slot(ALIAS))
    assert [p.dn for p in found] == [ALICE_DN]
    assert set(found[0].addresses) == {ALICE, ALIAS}
    assert source.lookup(address_slot(BOB)) == []
    # An administrator's key without wkdAddressHash: found through gpgMailbox and l=.
    write_key(slapd, BOB_DN, keys["bob"], [str(BOB)])
    slapd.ldapmodify(f"dn: {BOB_DN}\nchangetype: modify\nreplace: wkdAddressHash\n-\n")
    assert source.lookup(address_slot(BOB)) == []
    assert [p.dn for p in source.lookup(address_slot(BOB), "BOB")] == [BOB_DN]


def test_mirror_listing_and_disabled_keys(slapd: Slapd, source: LdapKeyView,
                                          keys: dict[str, bytes]) -> None:
    write_key(slapd, ALICE_DN, keys["alice"], [str(ALICE), str(ALIAS)])
    write_key(slapd, BOB_DN, keys["bob"], [str(BOB)])
    assert {p.dn for p in source.iter_published()} == {ALICE_DN, BOB_DN}
    assert source.published_dns() >= {ALICE_DN, BOB_DN}
    slapd.ldapmodify(f"dn: {BOB_DN}\nchangetype: modify\nreplace: pgpDisabled\n"
                     "pgpDisabled: 1\n-\n")
    assert {p.dn for p in source.iter_published()} == {ALICE_DN}
    assert source.lookup(address_slot(BOB)) == []


def test_the_cache_follows_modify_and_delete(slapd: Slapd, source: LdapKeyView,
                                             keys: dict[str, bytes]) -> None:
    write_key(slapd, ALICE_DN, keys["alice"], [str(ALICE), str(ALIAS)])
    write_key(slapd, BOB_DN, keys["bob"], [str(BOB)])
    cache = KeyCache(source, budget=1 << 20, reconcile_interval=3600)
    assert cache.load()
    assert cache.get(address_slot(BOB)) == openpgp.clean_key(keys["bob"], [BOB]).key
    # Bob's entry now publishes Alice's key: nothing, since it has no UID for bob.
    write_key(slapd, BOB_DN, keys["alice"], [str(BOB)])
    cache.refresh()
    assert cache.get(address_slot(BOB)) is None
    # A delete leaves no entryCSN: the unexplained token makes the cache reconcile.
    slapd.ldapmodify(f"dn: {ALICE_DN}\nchangetype: delete\n")
    cache.refresh()
    assert cache.get(address_slot(ALICE)) is None
    assert cache.get(address_slot(ALIAS)) is None
    assert cache.complete


def test_a_mirrored_key_without_the_hash_attribute_survives_its_changes(
        slapd: Slapd, source: LdapKeyView, keys: dict[str, bytes]) -> None:
    no_hash = f"dn: {BOB_DN}\nchangetype: modify\nreplace: wkdAddressHash\n-\n"
    write_key(slapd, BOB_DN, keys["bob"], [str(BOB)])
    slapd.ldapmodify(no_hash)
    cache = KeyCache(source, budget=1 << 20)
    assert cache.load()
    assert cache.get(address_slot(BOB)) == openpgp.clean_key(keys["bob"], [BOB]).key
    write_key(slapd, BOB_DN, keys["alice"] + keys["bob"], [str(BOB)])  # refused: two keys
    slapd.ldapmodify(no_hash)
    cache.refresh()
    assert cache.get(address_slot(BOB)) is None
    write_key(slapd, BOB_DN, keys["bob"], [str(BOB)])
    slapd.ldapmodify(no_hash)
    cache.refresh()
    assert cache.get(address_slot(BOB)) == openpgp.clean_key(keys["bob"], [BOB]).key


def test_a_stopped_directory_is_unavailable_then_back(slapd: Slapd, source: LdapKeyView,
                                                      keys: dict[str, bytes]) -> None:
    write_key(slapd, BOB_DN, keys["bob"], [str(BOB)])
    token = source.change_token()
    slapd.stop()
    with pytest.raises(SourceUnavailable):
        source.change_token()
    slapd.start()
    assert source.change_token() == token


def test_a_key_the_system_did_not_check_or_withheld_is_not_served(
        slapd: Slapd, source: LdapKeyView, keys: dict[str, bytes]) -> None:
    """#11 item 2: a pgpKey written with LDAP tools is served only once the system has
    checked it (wkdKeyDigest of the value) and found no problem (wkdKeyProblem)."""
    write_key(slapd, ALICE_DN, keys["alice"], [str(ALICE), str(ALIAS)], checked=False)
    assert source.lookup(address_slot(ALICE)) == []
    assert list(source.iter_published()) == []
    write_key(slapd, ALICE_DN, keys["alice"], [str(ALICE), str(ALIAS)])
    cache = KeyCache(source, budget=1 << 20, reconcile_interval=3600)
    assert cache.load()
    assert cache.get(address_slot(ALICE)) is not None
    # A new pgpKey under the old digest (an edit nobody checked): not served.
    token = source.change_token()
    slapd.ldapmodify(f"dn: {ALICE_DN}\nchangetype: modify\nreplace: pgpKey\n"
                     f"pgpKey:: {base64.b64encode(openpgp.armor_key(keys['bob'])).decode()}\n-\n")
    assert [c.slots for c in source.changes_since(token.split("|")[0])] == [frozenset()]
    cache.refresh()
    assert cache.get(address_slot(ALICE)) is None
    write_key(slapd, ALICE_DN, keys["alice"], [str(ALICE), str(ALIAS)])
    cache.refresh()
    assert cache.get(address_slot(ALICE)) is not None
    slapd.ldapmodify(f"dn: {ALICE_DN}\nchangetype: modify\nreplace: wkdKeyProblem\n"
                     "wkdKeyProblem: material held by another entry\n-\n")
    cache.refresh()
    assert cache.get(address_slot(ALICE)) is None
    assert source.lookup(address_slot(ALICE)) == []
