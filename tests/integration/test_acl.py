"""ldap/config/30-access.ldif and 40-overlays.ldif as slapd enforces them: each account
binds with its own password and tries what it may and may not do."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ldap
import pytest

from milter_wkd.sandbox.slapd import Slapd
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.model import StoredKey
from milter_wkd.values import Address
from tests.support.ldapclient import answer, bind, encode, outcome

pytestmark = pytest.mark.integration

Connect = Callable[[str | None], Any]
PEOPLE = "ou=people,dc=example,dc=org"


@pytest.fixture
def alice_key(publish: Callable[[str, bytes], StoredKey], gpg_keys: dict[str, Any]) -> StoredKey:
    return publish("alice@example.org", gpg_keys["alice"].data)


@pytest.fixture
def bob_key(publish: Callable[[str, bytes], StoredKey], gpg_keys: dict[str, Any]) -> StoredKey:
    return publish("bob@example.org", gpg_keys["bob"].data)


def search(conn: Any, filt: str, attributes: list[str] | str = "*",
           base: str = PEOPLE, scope: int = ldap.SCOPE_SUBTREE) -> list[dict[str, Any]]:
    """The entries found (attribute names lowercased, plus "dn"); a base the account may
    not see is no entries (slapd answers noSuchObject), any other refusal fails the test."""
    names = [attributes] if isinstance(attributes, str) else attributes
    result, entries = answer(conn, base, filt, names, scope)
    assert result in ("success", "noSuchObject"), result
    return [{k.lower(): v for k, v in attrs.items() if v} | {"dn": dn} for dn, attrs in entries]


def modify(conn: Any, dn: str, name: str, values: list[Any]) -> str:
    """Replace an attribute; returns the LDAP result name ('success', ...)."""
    return outcome(lambda: conn.modify_ext_s(dn, [(ldap.MOD_REPLACE, name, encode(values))]))


def add(conn: Any, dn: str, classes: list[str], attributes: dict[str, Any]) -> str:
    """Add an entry; returns the LDAP result name."""
    addlist = [("objectClass", encode(classes))] + [
        (name, encode(value if isinstance(value, list) else [value]))
        for name, value in attributes.items()]
    return outcome(lambda: conn.add_ext_s(dn, addlist))


# -- anonymous: dirmngr's view ------------------------------------------------------------


def test_anonymous_reads_what_dirmngr_needs(connect: Connect, alice_key: StoredKey) -> None:
    anon = connect(None)
    (root,) = search(anon, "(objectClass=*)", ["namingContexts"], base="",
                     scope=ldap.SCOPE_BASE)
    assert root["namingcontexts"] == [b"dc=example,dc=org"]
    (info,) = search(anon, "(objectClass=*)", base="cn=pgpServerInfo,dc=example,dc=org",
                     scope=ldap.SCOPE_BASE)
    assert info["pgpbasekeyspacedn"] == [PEOPLE.encode()]
    assert info["pgpsoftware"] == [b"GnuPG"]
    assert info["pgpversion"] == [b"2"]
    by_mail = search(anon, "(&(gpgMailbox=alice@example.org)(!(|(pgpRevoked=1)"
                           "(pgpDisabled=1))))")
    fpr = alice_key.fingerprint.hex
    by_fpr = search(anon, f"(|(gpgFingerprint={fpr})(gpgSubFingerprint={fpr}))")
    for found in (by_mail, by_fpr):
        (entry,) = found
        assert entry["dn"] == "uid=alice,ou=people,dc=example,dc=org"
        assert entry["pgpkey"][0].startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")
        assert entry["pgprevoked"] == [b"0"]
        assert entry["pgpdisabled"] == [b"0"]
        assert entry["pgpcertid"] == [alice_key.fingerprint.key_id.encode()]
        # Nothing personal: no mail, no names, no WKD hashes, no provenance.
        assert not {"mail", "maillocaladdress", "cn", "sn", "uid", "userpassword",
                    "wkdaddresshash", "wkdkeysource", "wkdkeysourceactor"} & set(entry)


@pytest.mark.parametrize("filt", [
    "(gpgMailbox=*)", "(gpgMailbox=*@example.org)", "(gpgMailbox=a*)",
    "(pgpUserID=*alice*)", "(objectClass=*)", "(pgpCertID=*)", "(gpgFingerprint=*)",
    "(&(gpgMailbox=*example*)(!(|(pgpRevoked=1)(pgpDisabled=1))))",
])
def test_anonymous_cannot_enumerate(connect: Connect, alice_key: StoredKey,
                                    bob_key: StoredKey, filt: str) -> None:
    anon = connect(None)
    result, entries = answer(anon, PEOPLE, filt, ["gpgMailbox"])
    assert entries == []
    assert result in ("adminLimitExceeded", "sizeLimitExceeded")


def test_anonymous_cannot_probe_mail_or_see_keyless_users(connect: Connect,
                                                          alice_key: StoredKey) -> None:
    anon = connect(None)
    assert search(anon, "(mail=alice@example.org)") == []
    assert search(anon, "(uid=carol)") == []
    assert search(anon, "(objectClass=*)", base="uid=carol,ou=people,dc=example,dc=org",
                  scope=ldap.SCOPE_BASE) == []
    assert search(anon, "(objectClass=*)", base="ou=wks-pending,dc=example,dc=org") == []


def test_anonymous_cannot_write(connect: Connect, alice_key: StoredKey) -> None:
    anon = connect(None)
    dn = "uid=alice,ou=people,dc=example,dc=org"
    assert modify(anon, dn, "pgpDisabled", ["1"]) in ("strongerAuthRequired",
                                                      "insufficientAccessRights")


# -- users -------------------------------------------------------------------------------


def test_users_bind_with_their_password(slapd: Slapd) -> None:
    for info in slapd.users.values():
        conn = bind(slapd.uri, info["dn"], info["password"])
        assert conn.whoami_s() == f"dn:{info['dn']}"
        conn.unbind_ext_s()
    with pytest.raises(ldap.INVALID_CREDENTIALS):
        bind(slapd.uri, slapd.users["alice"]["dn"], "bob-secret")


def test_user_edits_own_prefer_encrypt_only(
        connect: Connect, alice_key: StoredKey, bob_key: StoredKey) -> None:
    alice = connect("alice")
    own = "uid=alice,ou=people,dc=example,dc=org"
    bobs = "uid=bob,ou=people,dc=example,dc=org"
    assert modify(alice, own, "wkdPreferEncrypt", ["mutual"]) == "success"
    # Not her key (she publishes by WKS), not the addresses a key is served for, not
    # provenance, nothing else of the entry.
    for name, value in [("pgpKey", alice_key_text(connect, own)),
                        ("gpgMailbox", "bob@example.org"),
                        ("wkdAddressHash", "kei1q4tipxxu1yj79k9kfukdhfy631xe@example.org"),
                        ("wkdKeySource", "auth-submit"), ("mail", "root@example.org"),
                        ("cn", "Mallory"), ("userPassword", "x"), ("uid", "root")]:
        assert modify(alice, own, name, [value]) == "insufficientAccessRights", name
    # Nothing of bob's.
    for name, value in [("pgpKey", "x"), ("pgpDisabled", "1"), ("wkdPreferEncrypt", "mutual")]:
        assert modify(alice, bobs, name, [value]) == "insufficientAccessRights", name
    # Alice sees her own entry, and only bob's public key.
    (mine,) = search(alice, "(objectClass=*)", base=own, scope=ldap.SCOPE_BASE)
    assert mine["mail"] == [b"alice@example.org"]
    (his,) = search(alice, "(objectClass=*)", base=bobs, scope=ldap.SCOPE_BASE)
    assert "mail" not in his
    assert "pgpkey" in his


# Issue #11 item 2: every attribute that is the key, is derived from it or decides about
# it. A user who could write them could claim another user's fingerprint (and block that
# user's updates) or undo an administrator's decision.
KEY_DECISIONS = [
    "pgpKey", "pgpCertID", "pgpKeyID", "gpgFingerprint", "gpgSubFingerprint", "pgpSubKeyID",
    "pgpUserID", "gpgMailbox", "pgpRevoked", "pgpDisabled", "pgpKeyCreateTime",
    "pgpKeyExpireTime", "pgpKeySize", "pgpKeyType", "wkdAddressHash", "wkdKeySource",
    "wkdKeySourceActor", "wkdKeyPublished", "wkdKeyDigest", "wkdKeyProblem",
]


def test_alice_cannot_claim_bobs_fingerprint_on_her_entry(
        connect: Connect, alice_key: StoredKey, bob_key: StoredKey) -> None:
    """The attack: with her mail password, Alice adds another user's fingerprint to her
    own entry, so that his next update is refused ("published by another user")."""
    alice = connect("alice")
    own = "uid=alice,ou=people,dc=example,dc=org"
    fpr = bob_key.fingerprint.hex
    for kind, name in ((ldap.MOD_ADD, "gpgSubFingerprint"), (ldap.MOD_REPLACE, "gpgFingerprint")):
        result = outcome(lambda kind=kind, name=name: alice.modify_ext_s(
            own, [(kind, name, [fpr.encode()])]))
        assert result == "insufficientAccessRights", name
    anon = connect(None)
    (holder,) = search(anon, f"(|(gpgFingerprint={fpr})(gpgSubFingerprint={fpr}))", ["1.1"])
    assert holder["dn"] == "uid=bob,ou=people,dc=example,dc=org"


def test_bob_cannot_undo_an_administrators_disable(
        slapd: Slapd, connect: Connect, bob_key: StoredKey) -> None:
    dn = "uid=bob,ou=people,dc=example,dc=org"
    slapd.ldapmodify(f"dn: {dn}\nchangetype: modify\nreplace: pgpDisabled\n"
                     "pgpDisabled: 1\n-\n")
    bob = connect("bob")
    assert modify(bob, dn, "pgpDisabled", ["0"]) == "insufficientAccessRights"
    assert outcome(lambda: bob.modify_ext_s(
        dn, [(ldap.MOD_DELETE, "pgpDisabled", None)])) == "insufficientAccessRights"
    (entry,) = search(connect("milter"), "(objectClass=*)", ["pgpDisabled"], base=dn,
                      scope=ldap.SCOPE_BASE)
    assert entry["pgpdisabled"] == [b"1"]


def test_bob_cannot_write_his_key_with_ldap_tools(
        connect: Connect, alice_key: StoredKey, bob_key: StoredKey) -> None:
    dn = "uid=bob,ou=people,dc=example,dc=org"
    bob = connect("bob")
    alices_key = alice_key_text(connect, "uid=alice,ou=people,dc=example,dc=org")
    assert modify(bob, dn, "pgpKey", [alices_key]) == "insufficientAccessRights"


# Valid values for attributes a fresh key may lack (an invalid one could be refused by the
# constraint overlay before the ACL is asked).
SAMPLES = {"pgpKeyExpireTime": b"20990101000000Z", "wkdKeyDigest": b"0" * 64,
           "wkdKeyProblem": b"a problem", "wkdKeySourceActor": b"alice@example.org"}


@pytest.mark.parametrize("name", KEY_DECISIONS)
def test_users_write_no_key_attribute_of_their_own(
        connect: Connect, alice_key: StoredKey, name: str) -> None:
    alice = connect("alice")
    own = "uid=alice,ou=people,dc=example,dc=org"
    (entry,) = search(connect("milter"), "(objectClass=*)", [name], base=own,
                      scope=ldap.SCOPE_BASE)
    values = entry.get(name.lower()) or [SAMPLES.get(name, b"0")]
    # The very values it has: refused for the writer, not for what is written.
    assert outcome(lambda: alice.modify_ext_s(
        own, [(ldap.MOD_REPLACE, name, values)])) == "insufficientAccessRights"
    assert outcome(lambda: alice.modify_ext_s(
        own, [(ldap.MOD_DELETE, name, None)])) in ("insufficientAccessRights",
                                                    "result 16 (No such attribute)")


def test_responder_reads_digest_and_problem_anonymous_does_not(
        slapd: Slapd, connect: Connect, alice_key: StoredKey) -> None:
    own = "uid=alice,ou=people,dc=example,dc=org"
    slapd.ldapmodify(f"dn: {own}\nchangetype: modify\nreplace: wkdKeyDigest\n"
                     f"wkdKeyDigest: {'0' * 64}\n-\nreplace: wkdKeyProblem\n"
                     "wkdKeyProblem: testing\n-\n")
    names = ["wkdKeyDigest", "wkdKeyProblem"]
    (seen,) = search(connect("wkd"), "(objectClass=*)", names, base=own, scope=ldap.SCOPE_BASE)
    assert seen["wkdkeydigest"] == [b"0" * 64]
    assert seen["wkdkeyproblem"] == [b"testing"]
    fpr = alice_key.fingerprint.hex
    (anon,) = search(connect(None), f"(gpgFingerprint={fpr})", names)
    assert not {"wkdkeydigest", "wkdkeyproblem"} & set(anon)
    assert modify(connect("milter"), own, "wkdKeyProblem", ["cleared"]) == "success"
    slapd.ldapmodify(f"dn: {own}\nchangetype: modify\nreplace: wkdKeyDigest\n-\n"
                     "replace: wkdKeyProblem\n-\n")


def alice_key_text(connect: Connect, dn: str) -> str:
    (entry,) = search(connect("milter"), "(objectClass=*)", ["pgpKey"], base=dn,
                      scope=ldap.SCOPE_BASE)
    return str(entry["pgpkey"][0].decode())


def test_user_may_add_only_our_object_class(connect: Connect, store: LdapStore) -> None:
    carol = connect("carol")
    dn = "uid=carol,ou=people,dc=example,dc=org"
    more = ldap.MOD_ADD
    assert outcome(lambda: carol.modify_ext_s(dn, [
        (more, "objectClass", [b"posixAccount"]), (more, "uidNumber", [b"0"]),
        (more, "gidNumber", [b"0"]), (more, "homeDirectory", [b"/root"])],
    )) == "insufficientAccessRights"
    assert outcome(lambda: carol.modify_ext_s(dn, [
        (more, "objectClass", [b"wkdKeyHolder"]),
        (more, "wkdPreferEncrypt", [b"nopreference"])],
    )) == "success"
    user = store.user(Address.parse("carol@example.org"))
    assert store.get_prefer_encrypt(user) == "nopreference"
    store.set_prefer_encrypt(user, None)
    (entry,) = search(connect("carol"), "(objectClass=*)", ["objectClass"],
                      base="uid=carol,ou=people,dc=example,dc=org", scope=ldap.SCOPE_BASE)
    assert b"wkdKeyHolder" not in entry["objectclass"]


# -- service accounts -------------------------------------------------------------------------


def test_milter_writes_keys_and_pending_but_nothing_else(connect: Connect,
                                                         alice_key: StoredKey) -> None:
    milter = connect("milter")
    alice = "uid=alice,ou=people,dc=example,dc=org"
    assert modify(milter, alice, "pgpDisabled", ["1"]) == "success"
    assert modify(milter, alice, "gpgMailbox", ["alice@example.org"]) == "success"
    for name, value in [("mail", "x@example.org"), ("userPassword", "x"), ("cn", "x")]:
        assert modify(milter, alice, name, [value]) == "insufficientAccessRights", name
    assert modify(milter, "cn=wkd,ou=services,dc=example,dc=org", "userPassword",
                  ["x"]) == "insufficientAccessRights"
    assert modify(milter, "cn=pgpServerInfo,dc=example,dc=org", "pgpBaseKeySpaceDN",
                  ["dc=example,dc=org"]) == "insufficientAccessRights"
    assert add(milter, "uid=mallory,ou=people,dc=example,dc=org", ["inetOrgPerson"],
               {"cn": "m", "sn": "m", "mail": "mallory@example.org"},
               ) == "insufficientAccessRights"
    # It reads the people it serves (addresses), never passwords.
    (entry,) = search(milter, "(mail=alice@example.org)")
    assert entry["maillocaladdress"] == [b"alice.liddell@example.org"]
    assert "userpassword" not in entry


def test_responder_reads_public_key_data_only(connect: Connect, alice_key: StoredKey) -> None:
    wkd = connect("wkd")
    alice = "uid=alice,ou=people,dc=example,dc=org"
    (entry,) = search(wkd, "(objectClass=*)", ["*", "entryCSN"], base=alice, scope=ldap.SCOPE_BASE)
    assert entry["pgpkey"]
    assert entry["wkdaddresshash"]
    assert entry["entrycsn"]
    assert not {"mail", "maillocaladdress", "userpassword", "cn", "uid"} & set(entry)
    (suffix,) = search(wkd, "(objectClass=*)", ["contextCSN"], base="dc=example,dc=org",
                       scope=ldap.SCOPE_BASE)
    assert suffix["contextcsn"]
    assert modify(wkd, alice, "pgpDisabled", ["1"]) == "insufficientAccessRights"
    assert add(wkd, "wkdNonce=" + "x" * 32 + ",ou=wks-pending,dc=example,dc=org",
               ["wkdPendingRequest"],
               {"wkdAddress": "a@example.org", "wkdFingerprint": "AB" * 20,
                "wkdSubmittedKey": b"k", "wkdCreated": "20260101000000Z",
                "wkdExpires": "20260101000000Z"},
               ) == "insufficientAccessRights"


def test_dovecot_finds_users_by_address_and_reads_nothing_secret(connect: Connect) -> None:
    dovecot = connect("dovecot")
    (entry,) = search(dovecot, "(&(objectClass=inetOrgPerson)"
                               "(|(mail=alice.liddell@example.org)"
                               "(mailLocalAddress=alice.liddell@example.org)))",
                      ["mail", "uid", "mailLocalAddress", "userPassword"])
    assert entry["dn"] == "uid=alice,ou=people,dc=example,dc=org"
    assert entry["uid"] == [b"alice"]
    assert entry["mail"] == [b"alice@example.org"]
    assert "userpassword" not in entry
    assert len(search(dovecot, "(objectClass=inetOrgPerson)", ["mail"])) == 3
    assert modify(dovecot, entry["dn"], "mail", ["x@example.org"]) == "insufficientAccessRights"


# -- constraints -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "value"), [
    ("pgpKey", "-----BEGIN PGP PUBLIC KEY BLOCK-----\n" + "A" * 200_000),
    ("wkdPreferEncrypt", "always"),
    ("gpgFingerprint", "NOT-A-FINGERPRINT"),
    ("pgpRevoked", "yes"),
    ("wkdKeySource", "trust-me"),
])
def test_slapd_refuses_bad_key_data_whoever_writes_it(
        connect: Connect, alice_key: StoredKey, name: str, value: str) -> None:
    alice = "uid=alice,ou=people,dc=example,dc=org"
    writer = connect("milter")
    assert modify(writer, alice, name, [value]) == "constraintViolation"


@pytest.mark.parametrize("name", ["gpgMailbox", "pgpUserID", "wkdAddressHash"])
def test_slapd_refuses_too_many_values(connect: Connect, alice_key: StoredKey,
                                       name: str) -> None:
    writer = connect("milter")
    values = [f"a{i}@example.org" for i in range(65)]
    alice = "uid=alice,ou=people,dc=example,dc=org"
    assert modify(writer, alice, name, values) == "constraintViolation"
    assert modify(writer, alice, name, values[:64]) == "success"
