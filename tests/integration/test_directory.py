"""The directory store against a real slapd: users, keys and every derived attribute,
escaping, pending WKS requests, the change token, concurrency. gpg is the oracle for what
the key attributes must say."""

from __future__ import annotations

import calendar
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import ldap
import pytest

from milter_wkd import openpgp
from milter_wkd.config import DirectoryConfig
from milter_wkd.errors import (
    Changed,
    Conflict,
    DirectoryUnavailable,
    KeyRefused,
    NotFound,
    RateLimited,
    Refused,
)
from milter_wkd.sandbox.slapd import Slapd
from milter_wkd.store import ldapstore as directory_module
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.ldapview import LdapKeyView
from milter_wkd.store.model import (
    ClaimKind,
    KeyOrigin,
    PendingRequest,
    Provenance,
    StoredKey,
    key_fingerprints,
)
from milter_wkd.values import Address, Fingerprint
from tests.support import ldapclient
from tests.support.gnupg import WKS_CLIENT, GnuPG
from tests.support.squat import squatting_key
from tests.unit.test_openpgp_crafted import T0, Signer, user_id

pytestmark = pytest.mark.integration

Publish = Callable[[str, bytes], StoredKey]


def root_entry(slapd: Slapd, dn: str) -> dict[str, list[str]]:
    """Every attribute of an entry as root sees it (names lowercased)."""
    conn = ldapclient.bind(slapd.uri, slapd.admin_dn, slapd.admin_password)
    try:
        ((_dn, raw),) = conn.search_s(dn, ldap.SCOPE_BASE, "(objectClass=*)", ["*"])
        return {k.lower(): [v.decode() for v in vals] for k, vals in raw.items()}
    finally:
        conn.unbind_ext_s()


def gnupg_time(epoch: str) -> str:
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(int(epoch)))


def wkd_hash(gpg: GnuPG, address: str) -> str:
    out = gpg.run("--print-wkd-hash", address, binary=WKS_CLIENT).stdout.decode()
    return out.split()[0]


# -- users ----------------------------------------------------------------------------


def test_finds_users_by_mail_and_alias_in_any_case(store: LdapStore, slapd: Slapd) -> None:
    alice_dn = slapd.users["alice"]["dn"]
    for text in ("alice@example.org", "ALICE@Example.ORG", "alice.liddell@example.org"):
        user = store.find_user(Address.parse(text))
        assert user is not None
        assert user.dn == alice_dn
        assert {a.key for a in user.addresses} == {"alice@example.org",
                                                    "alice.liddell@example.org"}
    carol = store.user(Address.parse("carol@example.org"))
    assert carol.dn == slapd.users["carol"]["dn"]
    assert store.get_key(carol) is None


def test_unknown_addresses_are_none_or_not_found(store: LdapStore) -> None:
    assert store.find_user(Address.parse("nobody@example.org")) is None
    assert store.find_user(Address.parse("alice@example.net")) is None
    with pytest.raises(NotFound):
        store.user(Address.parse("nobody@example.org"))
    assert store.key_for(Address.parse("nobody@example.org")) is None


@pytest.mark.parametrize("local", ["*", "a*)(mail=*", "alice*", "*)(uid=*", "alice)(|(mail=*",
                                   "\\2a", "ali\\63e"])
def test_hostile_local_parts_match_nothing(store: LdapStore, local: str) -> None:
    # Address.parse refuses these; the store must be safe even when handed one directly.
    assert store.find_user(Address(local, "example.org")) is None


def test_unicode_local_part_is_looked_up_not_an_error(store: LdapStore) -> None:
    # mail is IA5String: a UTF-8 assertion cannot match, but must not fail either.
    assert store.find_user(Address.parse("jörg@example.org")) is None
    assert store.find_user(Address.parse("ålice@example.org")) is None


# -- keys -----------------------------------------------------------------------------


def test_published_key_attributes_agree_with_gpg(
        store: LdapStore, slapd: Slapd, publish: Publish, gpg_keys: dict[str, Any]) -> None:
    key = gpg_keys["alice"]
    stored = publish("alice.liddell@example.org", key.data)
    entry = root_entry(slapd, slapd.users["alice"]["dn"])
    colons = key.gpg.colons("--with-fingerprint", "--with-fingerprint", "--list-keys",
                            key.fingerprint)
    pub = next(r for r in colons if r[0] == "pub")
    fprs = [r[9] for r in colons if r[0] == "fpr"]
    subs = [r for r in colons if r[0] == "sub"]
    uids = [r[9] for r in colons if r[0] == "uid"]

    assert "wkdkeyholder" in [c.lower() for c in entry["objectclass"]]
    assert entry["gpgfingerprint"] == [fprs[0]] == [key.fingerprint]
    assert entry["pgpcertid"] == [pub[4]]
    assert entry["pgpkeyid"] == [pub[4][-8:]]
    assert sorted(entry["gpgsubfingerprint"]) == sorted(fprs[1:])
    assert sorted(entry["pgpsubkeyid"]) == sorted(s[4] for s in subs)
    assert sorted(entry["pgpuserid"]) == sorted(uids)
    assert sorted(entry["gpgmailbox"]) == ["alice.liddell@example.org", "alice@example.org"]
    assert entry["pgpkeycreatetime"] == [gnupg_time(pub[5])]
    assert entry["pgpkeyexpiretime"] == [gnupg_time(pub[6])]
    assert entry["pgprevoked"] == ["0"]
    assert entry["pgpdisabled"] == ["0"]
    assert entry["pgpkeysize"] == [f"{int(pub[2]):05d}"]
    assert entry["pgpkey"][0].startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert sorted(entry["wkdaddresshash"]) == sorted(
        f"{wkd_hash(key.gpg, a)}@example.org"
        for a in ("alice@example.org", "alice.liddell@example.org"))
    assert entry["wkdkeysource"] == ["admin-import"]
    assert entry["wkdkeysourceactor"] == ["test"]
    assert len(entry["wkdkeypublished"]) == 1

    assert stored.fingerprint == Fingerprint.parse(key.fingerprint)
    assert stored.expires == int(pub[6])
    assert stored.created == int(pub[5])
    assert stored.provenance is not None
    assert stored.provenance.source is KeyOrigin.ADMIN_IMPORT
    # publish_key answers with the values it wrote: exactly what a read-back gives.
    assert stored == store.get_key(store.user(Address.parse("alice@example.org")))


def test_stored_key_imports_into_gpg(
        tmp_path: Any, publish: Publish, store: LdapStore, gpg_keys: dict[str, Any]) -> None:
    publish("alice@example.org", gpg_keys["alice"].data)
    stored = store.key_for(Address.parse("alice.liddell@example.org"))
    assert stored is not None
    with GnuPG(tmp_path / "reader") as reader:
        reader.import_key(stored.key)
        uids = [r[9] for r in reader.colons("--list-keys") if r[0] == "uid"]
        assert reader.fingerprint("alice@example.org") == gpg_keys["alice"].fingerprint
    assert sorted(uids) == ["Alice L. <alice.liddell@example.org>",
                            "Alice Liddell <alice@example.org>"]


def test_rsa_key_type_and_size(slapd: Slapd, publish: Publish, gpg_keys: dict[str, Any]) -> None:
    publish("bob@example.org", gpg_keys["bob"].data)
    entry = root_entry(slapd, slapd.users["bob"]["dn"])
    assert entry["pgpkeytype"] == ["RSA"]
    assert entry["pgpkeysize"] == ["02048"]


def test_replacing_a_key_leaves_nothing_of_the_old_one(
        store: LdapStore, slapd: Slapd, publish: Publish, gpg_keys: dict[str, Any]) -> None:
    old = publish("alice@example.org", gpg_keys["alice"].data)
    new = publish("alice@example.org", gpg_keys["alice2"].data)
    entry = root_entry(slapd, slapd.users["alice"]["dn"])
    text = repr(entry)
    assert old.fingerprint.hex not in text
    assert old.fingerprint.key_id not in text
    for sub in root_fprs(old):
        assert sub not in text
    assert entry["gpgfingerprint"] == [new.fingerprint.hex]
    # The new key has no alias user ID: the alias is no longer published.
    assert entry["gpgmailbox"] == ["alice@example.org"]
    assert len(entry["wkdaddresshash"]) == 1
    # Nothing holds or claims the old material any more; the new key is alice's.
    old_fprs = [old.fingerprint, *(Fingerprint.parse(f) for f in root_fprs(old))]
    gone = store.holdings(old_fprs)
    assert (gone.claims, gone.attributes) == ({}, {})
    held = store.holdings([new.fingerprint])
    alice_dn = slapd.users["alice"]["dn"]
    assert held.claims[new.fingerprint.hex].holder == alice_dn
    assert held.attributes[new.fingerprint.hex] == ((alice_dn, True),)
    assert store.get_key(store.user(Address.parse("alice@example.org"))) == new


def test_user_read_with_key_publishes_without_rereading(
        store: LdapStore, slapd: Slapd, gpg_keys: dict[str, Any]) -> None:
    address = Address.parse("bob@example.org")
    bare = store.find_user(address, with_key=True)
    assert bare is not None
    assert bare.snapshot is not None
    assert store.current_key(bare) is None  # nothing published yet
    assert bare == store.user(address)  # the snapshot is not part of the identity
    cleaned = openpgp.clean_key(gpg_keys["bob"].data, [address])
    first = store.publish_key(bare, cleaned, Provenance(KeyOrigin.ADMIN_IMPORT, "t", 0))
    # The snapshot said "no wkdKeyHolder class yet": the modify added it.
    entry = root_entry(slapd, slapd.users["bob"]["dn"])
    assert "wkdkeyholder" in [c.lower() for c in entry["objectclass"]]
    holder = store.find_user(address, with_key=True)
    assert holder is not None
    assert store.current_key(holder) == first == store.get_key(holder)
    store.set_disabled(holder, True)
    # A snapshot taken before is stale by design; one taken now sees the change, and
    # publishing from it keeps the key disabled.
    assert store.current_key(holder) == first
    fresh = store.find_user(address, with_key=True)
    assert fresh is not None
    again = store.publish_key(fresh, cleaned, Provenance(KeyOrigin.ADMIN_IMPORT, "t", 1))
    assert again.disabled
    assert again == store.get_key(fresh)


def test_fingerprint_holders_read_with_the_user(
        store: LdapStore, publish: Publish, gpg_keys: dict[str, Any]) -> None:
    alice_key = gpg_keys["alice"]
    publish("alice@example.org", alice_key.data)
    fpr = Fingerprint.parse(alice_key.fingerprint)
    bob = store.find_user(Address.parse("bob@example.org"), with_key=True, holders_of=[fpr])
    assert bob is not None
    assert bob.holders is not None
    assert bob.holders.asked == {fpr.hex}
    claim = bob.holders.claims[fpr.hex]
    assert (claim.holder.split(",")[0], claim.kind) == ("uid=alice", ClaimKind.PRIMARY)
    assert [(dn.split(",")[0], primary) for dn, primary in bob.holders.attributes[fpr.hex]] \
        == [("uid=alice", True)]
    # Pipelined with a search that finds nothing, and with one under a missing base.
    nobody = store.find_user(Address.parse("nobody@example.org"), holders_of=[fpr])
    assert nobody is None
    (first, second) = store._searches([
        (store.config.base_dn, "(uid=carol)", ["uid"], ldap.SCOPE_SUBTREE),
        ("ou=missing," + store.config.base_dn, "(objectClass=*)", ["1.1"],
         ldap.SCOPE_SUBTREE)])
    assert [e.dn.split(",")[0] for e in first] == ["uid=carol"]
    assert second == []


def root_fprs(stored: StoredKey) -> list[str]:
    info = openpgp.inspect_key(stored.key)
    return [s.fingerprint.hex for s in info.subkeys]


def test_revoked_key_is_marked(store: LdapStore, slapd: Slapd, publish: Publish,
                               gpg_keys: dict[str, Any], tmp_path: Any) -> None:
    key = gpg_keys["alice2"]
    with GnuPG(tmp_path / "revoker") as gpg:
        gpg.import_key(key.data)
        certificate = (key.gpg.home / "openpgp-revocs.d" / f"{key.fingerprint}.rev").read_text()
        gpg.import_key(certificate.replace(":-----BEGIN", "-----BEGIN").encode())
        revoked = gpg.export(key.fingerprint)
    stored = publish("alice@example.org", revoked)
    assert stored.revoked
    assert root_entry(slapd, slapd.users["alice"]["dn"])["pgprevoked"] == ["1"]


def test_subkey_fingerprint_finds_the_key(store: LdapStore, publish: Publish,
                                          gpg_keys: dict[str, Any]) -> None:
    stored = publish("bob@example.org", gpg_keys["bob"].data)
    (sub,) = root_fprs(stored)
    held = store.holdings([Fingerprint.parse(sub)])
    assert held.claims[sub].holder == stored.dn
    assert held.attributes[sub] == ((stored.dn, False),)  # held as a subkey
    holder = store.find_user(Address.parse("bob@example.org"))
    assert holder is not None
    assert holder.dn == stored.dn
    found = store.get_key(holder)
    assert found is not None
    assert found.fingerprint == stored.fingerprint


def test_key_with_someone_elses_address_is_refused(
        store: LdapStore, gpg_keys: dict[str, Any]) -> None:
    carol = store.user(Address.parse("carol@example.org"))
    alice = store.user(Address.parse("alice@example.org"))
    # Cleaned for alice's addresses, offered to carol's entry.
    cleaned = openpgp.clean_key(gpg_keys["alice"].data, alice.addresses)
    with pytest.raises(KeyRefused, match="someone else"):
        store.publish_key(carol, cleaned, Provenance(KeyOrigin.ADMIN_IMPORT, "t", 0))
    assert store.get_key(carol) is None


def test_same_fingerprint_on_two_users_is_a_conflict(
        store: LdapStore, publish: Publish, tmp_path: Any) -> None:
    with GnuPG(tmp_path / "g") as gpg:
        fpr = gpg.generate("Shared <alice@example.org>")
        gpg.run("--quick-add-uid", fpr, "Shared <bob@example.org>")
        shared = gpg.export(fpr)
    publish("alice@example.org", shared)
    bob = store.user(Address.parse("bob@example.org"))
    cleaned = openpgp.clean_key(shared, bob.addresses)
    with pytest.raises(Conflict):
        store.publish_key(bob, cleaned, Provenance(KeyOrigin.ADMIN_IMPORT, "t", 0))
    # The same check when the holders were read with the user (the milter's way).
    read_with = store.find_user(Address.parse("bob@example.org"), with_key=True,
                                holders_of=key_fingerprints(cleaned.info))
    assert read_with is not None
    with pytest.raises(Conflict):
        store.publish_key(read_with, cleaned, Provenance(KeyOrigin.ADMIN_IMPORT, "t", 0))
    assert store.get_key(bob) is None


def test_remove_clears_every_key_attribute(store: LdapStore, slapd: Slapd, publish: Publish,
                                           gpg_keys: dict[str, Any]) -> None:
    publish("alice@example.org", gpg_keys["alice"].data)
    alice = store.user(Address.parse("alice@example.org"))
    removed = store.remove_key(alice)
    assert removed.fingerprint.hex == gpg_keys["alice"].fingerprint
    entry = root_entry(slapd, alice.dn)
    assert not {n for n in entry if n.startswith(("pgp", "gpg", "wkd"))}
    assert "wkdkeyholder" not in [c.lower() for c in entry["objectclass"]]
    assert entry["mail"] == ["alice@example.org"]
    with pytest.raises(NotFound):
        store.remove_key(alice)


def test_remove_keeps_prefer_encrypt(store: LdapStore, slapd: Slapd, publish: Publish,
                                     gpg_keys: dict[str, Any]) -> None:
    alice = store.user(Address.parse("alice@example.org"))
    store.set_prefer_encrypt(alice, "mutual")
    published = publish("alice@example.org", gpg_keys["alice"].data)
    stored = store.get_key(alice)
    assert stored is not None
    assert stored.prefer_encrypt == "mutual"
    assert published == stored
    store.remove_key(alice)
    assert store.get_prefer_encrypt(alice) == "mutual"
    entry = root_entry(slapd, alice.dn)
    assert "wkdkeyholder" in [c.lower() for c in entry["objectclass"]]
    assert "pgpkey" not in entry
    with pytest.raises(Refused):
        store.set_prefer_encrypt(alice, "always")


def test_lookups_by_wkd_hash_and_listing(
        store: LdapStore, publish: Publish, gpg_keys: dict[str, Any],
        config_for: Callable[..., DirectoryConfig]) -> None:
    alice = publish("alice@example.org", gpg_keys["alice"].data)
    publish("bob@example.org", gpg_keys["bob"].data)
    alias_hash = wkd_hash(gpg_keys["alice"].gpg, "alice.liddell@example.org")
    # The responder's view (a cache miss), as its own account.
    view = LdapKeyView(config_for("wkd"))
    try:
        (found,) = view.lookup(f"{alias_hash}@example.org")
        assert found.dn == alice.dn
        assert openpgp.inspect_key(found.key).fingerprint.hex == gpg_keys["alice"].fingerprint
        assert view.lookup(f"{alias_hash}@example.net") == []
        assert view.lookup("*@example.org") == []
    finally:
        view.close()
    listed = {k.fingerprint.hex for k in store.list_keys()}
    assert listed == {gpg_keys["alice"].fingerprint, gpg_keys["bob"].fingerprint}


# -- pending WKS requests ---------------------------------------------------------------


def pending(nonce: str = "n" * 32, address: str = "bob@example.org",
            expires_in: int = 3600) -> PendingRequest:
    now = int(time.time())
    return PendingRequest(nonce, Address.parse(address), Fingerprint.parse("AB" * 20),
                          b"\x99\x00\x01binary\x00key", now, now + expires_in)


def test_pending_request_lifecycle(store: LdapStore) -> None:
    request = pending()
    stored = store.create_pending(request, limit=3)
    assert stored == request
    assert stored.dn.startswith("cn=1.")
    got = store.get_pending(request.nonce, Address.parse("BOB@example.org"))
    assert got == request
    assert got.dn == stored.dn
    with pytest.raises(NotFound):
        store.get_pending(request.nonce, Address.parse("alice@example.org"))
    with pytest.raises(NotFound):
        store.get_pending("m" * 32, Address.parse("bob@example.org"))
    store.delete_pending(got)  # as the milter does when the request could not be sent
    with pytest.raises(NotFound):
        store.get_pending(request.nonce, request.address)
    with pytest.raises(NotFound):
        store.delete_pending(stored)


def test_pending_requests_expire(store: LdapStore) -> None:
    first = store.create_pending(pending("a" * 32, expires_in=60), limit=3)
    store.create_pending(pending("b" * 32, expires_in=7200), limit=3)
    later = int(time.time()) + 600
    with pytest.raises(NotFound):
        store.get_pending("a" * 32, Address.parse("bob@example.org"), now=later)
    assert store.expire_pending(now=later) == 1
    assert store.get_pending("b" * 32, Address.parse("bob@example.org"), now=later)
    with pytest.raises(NotFound):
        store.delete_pending(first)


def test_pending_requests_are_counted_per_address_and_listed(store: LdapStore) -> None:
    bob = Address.parse("bob@example.org")
    assert store.count_pending(bob) == 0
    store.create_pending(pending("e" * 32, expires_in=60), limit=3)
    store.create_pending(pending("f" * 32, expires_in=7200), limit=3)
    store.create_pending(pending("g" * 32, address="alice@example.org"), limit=3)
    assert store.count_pending(Address.parse("Bob@Example.org")) == 2
    assert store.count_pending(bob, now=int(time.time()) + 600) == 1
    assert store.count_pending(Address("*", "example.org")) == 0
    listed = store.list_pending()
    assert sorted(r.nonce for r in listed) == ["e" * 32, "f" * 32, "g" * 32]
    assert all(r.key == b"" for r in listed)


@pytest.mark.parametrize("nonce", ["short", "a" * 16 + ",ou=x", "*" * 32, "a" * 65])
def test_malformed_nonces_are_refused(store: LdapStore, nonce: str) -> None:
    with pytest.raises(Refused):
        store.get_pending(nonce, Address.parse("bob@example.org"))


def test_only_one_of_four_concurrent_confirmations_uses_a_request(
        store: LdapStore, gpg_keys: dict[str, Any]) -> None:
    bob = Address.parse("bob@example.org")
    cleaned = openpgp.clean_key(gpg_keys["bob"].data, [bob])
    request = store.create_pending(
        dataclasses.replace(pending("c" * 32), fingerprint=cleaned.info.fingerprint), limit=3)
    barrier = threading.Barrier(4)
    outcome: list[str] = []

    def confirm() -> None:
        found = store.get_pending(request.nonce, bob)  # the milter's way: look up, then use
        user = store.find_user(bob, with_key=True)
        assert user is not None
        barrier.wait()
        try:
            store.publish_key(user, cleaned,
                              Provenance(KeyOrigin.WKS_CONFIRMED, "t", int(time.time())),
                              consume=found)
            outcome.append("published")
        except NotFound:
            outcome.append("used already")
        except DirectoryUnavailable:
            # Another one changed bob's entry or its claims first (Changed, or claims that
            # kept changing for three rounds under load): a 451, and the retry finds the
            # request used up.
            outcome.append("retry")

    threads = [threading.Thread(target=confirm) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcome.count("published") == 1, outcome
    # Every retry finds the request used up.
    with pytest.raises(NotFound):
        store.get_pending(request.nonce, bob)


# -- change token, access paths, threads ---------------------------------------------------


def test_change_token_changes_on_every_write(store: LdapStore, publish: Publish,
                                             gpg_keys: dict[str, Any]) -> None:
    tokens = [store.change_token()]
    publish("bob@example.org", gpg_keys["bob"].data)
    tokens.append(store.change_token())
    store.create_pending(pending("d" * 32), limit=3)
    tokens.append(store.change_token())
    store.remove_key(store.user(Address.parse("bob@example.org")))
    tokens.append(store.change_token())
    assert all(tokens)
    assert len(set(tokens)) == 4
    assert tokens[-1] == store.change_token()


def test_responder_account_reads_keys_and_change_token(
        config_for: Callable[..., DirectoryConfig], publish: Publish,
        gpg_keys: dict[str, Any]) -> None:
    publish("alice@example.org", gpg_keys["alice"].data)
    responder = LdapKeyView(config_for("wkd"))
    try:
        assert responder.change_token()
        hash_ = wkd_hash(gpg_keys["alice"].gpg, "alice@example.org")
        (found,) = responder.lookup(f"{hash_}@example.org")
        assert openpgp.inspect_key(found.key).fingerprint.hex == gpg_keys["alice"].fingerprint
    finally:
        responder.close()


def test_sasl_external_over_ldapi(config_for: Callable[..., DirectoryConfig]) -> None:
    with LdapStore(config_for(None)) as root:
        user = root.user(Address.parse("bob@example.org"))
        assert user.dn.startswith("uid=bob,")
        assert root.change_token()


def test_password_file_and_wrong_password(
        slapd: Slapd, config_for: Callable[..., DirectoryConfig], tmp_path: Any) -> None:
    secret = tmp_path / "secret"
    secret.write_text(slapd.service_accounts["milter"]["password"] + "\n")
    with LdapStore(config_for("milter", bind_password="", bind_password_file=str(secret))) as d:
        assert d.find_user(Address.parse("bob@example.org")) is not None

    with LdapStore(config_for("milter", bind_password="wrong")) as d, \
            pytest.raises(DirectoryUnavailable, match="bind"):
        d.find_user(Address.parse("bob@example.org"))


def test_many_threads_share_a_small_pool(config_for: Callable[..., DirectoryConfig]) -> None:
    names = ["alice", "bob", "carol", "alice.liddell"] * 10
    errors: list[BaseException] = []
    with LdapStore(config_for("milter", pool_size=2)) as directory:
        def look(name: str) -> None:
            try:
                user = directory.user(Address.parse(f"{name}@example.org"))
                owner = "alice" if name.startswith("alice") else name
                assert user.dn.startswith(f"uid={owner},")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=look, args=(n,)) for n in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []


def test_gnupg_time_format() -> None:
    from milter_wkd.store.schema import gnupg_time as fmt
    from milter_wkd.store.schema import parse_gnupg_time

    epoch = calendar.timegm((2020, 12, 31, 12, 0, 0))
    assert fmt(epoch) == "20201231120000Z"
    assert parse_gnupg_time("20201231120000Z") == epoch
    assert parse_gnupg_time("garbage") is None


# -- claims on key material (#11 item 1) and the pending cap (#11 item 5) ----------------


def holders_as_dirmngr_sees_them(slapd: Slapd, fpr: str) -> list[str]:
    conn = ldapclient.bind(slapd.uri, slapd.admin_dn, slapd.admin_password)
    try:
        found = conn.search_s(slapd.people_dn, ldap.SCOPE_SUBTREE,
                              f"(|(gpgFingerprint={fpr})(gpgSubFingerprint={fpr}))", ["1.1"])
        return [dn.split(",")[0] for dn, _ in found]
    finally:
        conn.unbind_ext_s()


def test_subkey_squatting_before_the_owner_published_cannot_block_him(
        store: LdapStore, slapd: Slapd, publish: Publish, gpg_keys: dict[str, Any],
        tmp_path: Any) -> None:
    bob = gpg_keys["bob"]
    squat = squatting_key(bob.data, "Alice <alice@example.org>")
    first = publish("alice@example.org", squat)
    assert bob.fingerprint in root_fprs(first)  # unproven, and nobody held it yet
    # Bob's own key proves his primary (self-signatures): it wins, alice loses the subkey.
    published = publish("bob@example.org", bob.data)
    assert published.fingerprint.hex == bob.fingerprint
    alice_now = store.get_key(store.user(Address.parse("alice@example.org")))
    assert alice_now is not None
    assert bob.fingerprint not in root_fprs(alice_now)
    assert len(root_fprs(alice_now)) == 1  # her own subkey stays
    assert holders_as_dirmngr_sees_them(slapd, bob.fingerprint) == ["uid=bob"]
    # His revocation goes through too.
    with GnuPG(tmp_path / "revoker") as gpg:
        gpg.import_key(bob.data)
        certificate = (bob.gpg.home / "openpgp-revocs.d" / f"{bob.fingerprint}.rev").read_text()
        gpg.import_key(certificate.replace(":-----BEGIN", "-----BEGIN").encode())
        revoked = gpg.export(bob.fingerprint)
    assert publish("bob@example.org", revoked).revoked


def test_subkey_squatting_after_the_owner_published_leaves_the_subkey_out(
        store: LdapStore, slapd: Slapd, publish: Publish, gpg_keys: dict[str, Any]) -> None:
    bob = gpg_keys["bob"]
    publish("bob@example.org", bob.data)
    squat = squatting_key(bob.data, "Alice <alice@example.org>")
    alice = publish("alice@example.org", squat)
    assert bob.fingerprint not in root_fprs(alice)
    assert [f.hex for f, _ in alice.withheld] == [bob.fingerprint]
    assert "published by another user" in alice.withheld[0][1]
    assert holders_as_dirmngr_sees_them(slapd, bob.fingerprint) == ["uid=bob"]
    again = publish("bob@example.org", bob.data)  # his update still works
    assert again.fingerprint.hex == bob.fingerprint


def test_two_entries_never_both_publish_one_key_even_at_the_same_instant(
        store: LdapStore, slapd: Slapd) -> None:
    users = [store.user(Address.parse(a)) for a in ("alice@example.org", "bob@example.org")]
    for attempt in range(12):
        # One key with an address of each (one person with two mailboxes, or a mistake).
        signer = Signer(created=T0 + attempt)
        key = signer.packet + b"".join(user_id(f"<{u.addresses[0]}>")
                                       + signer.certify(f"<{u.addresses[0]}>", T0 + 100)
                                       for u in users)
        cleaned = [openpgp.clean_key(key, u.addresses) for u in users]
        barrier = threading.Barrier(2)
        outcome: list[str] = []

        def run(user: Any, clean: openpgp.CleanResult, barrier: threading.Barrier = barrier,
                outcome: list[str] = outcome) -> None:
            barrier.wait()
            try:
                store.publish_key(user, clean, Provenance(KeyOrigin.ADMIN_IMPORT, "t",
                                                          int(time.time())))
                outcome.append("published")
            except Conflict:
                outcome.append("refused")
            except Changed:
                outcome.append("refused")  # the other one's claim was in flight: 451, retry

        threads = [threading.Thread(target=run, args=pair) for pair in zip(users, cleaned,
                                                                             strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcome) == ["published", "refused"], attempt
        assert len(holders_as_dirmngr_sees_them(slapd, signer.fingerprint.hex().upper())) == 1
        for user in users:
            with contextlib.suppress(NotFound):
                store.remove_key(user)


def test_a_leftover_claim_is_taken_over(
        store: LdapStore, slapd: Slapd, publish: Publish, gpg_keys: dict[str, Any]) -> None:
    fpr = gpg_keys["alice"].fingerprint
    claim_dn = f"wkdFingerprint={fpr},{slapd.claims_dn}"
    # A removal that could not release its claim: bob's entry does not hold the material.
    slapd.ldapmodify(f"dn: {claim_dn}\nobjectClass: wkdKeyClaim\nwkdFingerprint: {fpr}\n"
                     f"wkdClaimHolder: {slapd.users['bob']['dn']}\nwkdClaimKind: primary\n",
                     add=True)
    assert publish("alice@example.org", gpg_keys["alice"].data).fingerprint.hex == fpr
    holder = store.holdings([Fingerprint.parse(fpr)]).claims[fpr].holder
    assert holder.split(",")[0] == "uid=alice"


def test_removing_a_key_releases_its_claims(store: LdapStore, publish: Publish,
                                            gpg_keys: dict[str, Any]) -> None:
    stored = publish("bob@example.org", gpg_keys["bob"].data)
    fprs = [stored.fingerprint, *(Fingerprint.parse(f) for f in root_fprs(stored))]
    assert set(store.holdings(fprs).claims) == {f.hex for f in fprs}
    store.remove_key(store.user(Address.parse("bob@example.org")))
    assert store.holdings(fprs).claims == {}
    publish("alice@example.org", gpg_keys["alice"].data)  # others' claims are untouched
    assert store.holdings(fprs).claims == {}


def test_pending_cap_holds_under_concurrency(store: LdapStore) -> None:
    barrier = threading.Barrier(12)
    outcome: list[str] = []

    def create(index: int) -> None:
        barrier.wait()
        try:
            store.create_pending(pending(f"{index:02d}" * 16), limit=3)
            outcome.append("stored")
        except RateLimited:
            outcome.append("limited")

    threads = [threading.Thread(target=create, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcome) == ["limited"] * 9 + ["stored"] * 3
    assert store.count_pending(Address.parse("bob@example.org")) == 3


def test_an_expired_request_gives_its_slot_to_a_new_one(store: LdapStore) -> None:
    old = store.create_pending(pending("o" * 32, expires_in=1), limit=1)
    with pytest.raises(RateLimited):
        store.create_pending(pending("p" * 32), limit=1)
    later = dataclasses.replace(pending("q" * 32), created=int(time.time()) + 5)
    new = store.create_pending(later, limit=1)
    assert new.dn == old.dn
    assert store.get_pending("q" * 32, later.address).nonce == "q" * 32
    with pytest.raises(NotFound):
        store.get_pending("o" * 32, later.address, now=0)


def test_the_nonce_is_compared_with_the_stored_one(store: LdapStore) -> None:
    store.create_pending(pending("s" * 32), limit=3)
    # Same address, a nonce one character off: the compare itself must say no.
    with pytest.raises(NotFound):
        store.get_pending("s" * 31 + "t", Address.parse("bob@example.org"))
    assert store.get_pending("s" * 32, Address.parse("bob@example.org")).nonce == "s" * 32


def test_a_confirmation_is_used_up_only_by_a_publication_that_commits(
        store: LdapStore, publish: Publish, gpg_keys: dict[str, Any]) -> None:
    bob = Address.parse("bob@example.org")
    alice_key = openpgp.clean_key(gpg_keys["alice"].data, None)
    now = int(time.time())
    request = store.create_pending(PendingRequest("u" * 32, bob, alice_key.info.fingerprint,
                                                  b"k", now, now + 3600), limit=3)
    # A publication that fails (alice's key holds that material) leaves the request.
    publish("alice@example.org", gpg_keys["alice"].data)
    shared = openpgp.clean_key(gpg_keys["alice"].data, None)
    user = store.find_user(bob, with_key=True)
    assert user is not None
    with pytest.raises(KeyRefused):  # the key names alice's addresses, not bob's
        store.publish_key(user, shared, Provenance(KeyOrigin.WKS_CONFIRMED, "t", now),
                          consume=request)
    assert store.get_pending("u" * 32, bob).nonce == "u" * 32
    # Two responses at once: exactly one publication uses the request up.
    cleaned = openpgp.clean_key(gpg_keys["bob"].data, [bob])
    barrier = threading.Barrier(2)
    outcome: list[str] = []

    def confirm() -> None:
        user = store.find_user(bob, with_key=True)
        assert user is not None
        barrier.wait()
        try:
            store.publish_key(user, cleaned, Provenance(KeyOrigin.WKS_CONFIRMED, "t", now),
                              consume=request)
            outcome.append("published")
        except NotFound:
            outcome.append("used already")
        except Changed:
            outcome.append("retry")  # the other one changed bob's entry first: 451, retried

    threads = [threading.Thread(target=confirm) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcome.count("published") == 1, outcome
    with pytest.raises(NotFound):
        store.get_pending("u" * 32, bob)


def test_key_holders_are_walked_one_page_at_a_time(
        store: LdapStore, publish: Publish, gpg_keys: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(directory_module, "PAGE_SIZE", 1)  # three users, three pages
    publish("alice@example.org", gpg_keys["alice"].data)
    publish("bob@example.org", gpg_keys["bob"].data)
    store.set_prefer_encrypt(store.user(Address.parse("carol@example.org")), "mutual")
    seen: list[str] = []
    count = store.each_key_holder("", lambda user, csn: seen.append(user.dn.split(",")[0]))
    assert count == 3
    assert sorted(seen) == ["uid=alice", "uid=bob", "uid=carol"]
    withheld: list[str] = []
    assert store.each_key_holder("", lambda user, csn: withheld.append(user.dn),
                                 withheld_only=True) == 0
