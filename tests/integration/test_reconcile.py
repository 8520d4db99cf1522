"""The key follower (milter_wkd.reconcile) against REAL slapd, as the milter's account:
an administrator's ldapmodify of pgpKey is re-derived within moments, or withheld with a
wkdKeyProblem that the responder honours, `check` reports and the log names (#11 item 2).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable, Iterator

import ldap
import pytest

from milter_wkd import check, openpgp
from milter_wkd.config import Config
from milter_wkd.reconcile import Reconciler
from milter_wkd.sandbox.slapd import Slapd
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.ldapview import LdapKeyView
from milter_wkd.store.model import KeyOrigin, Provenance, key_fingerprints
from milter_wkd.store.schema import address_slot
from milter_wkd.values import Address
from tests.integration.conftest import UserKey, account_config
from tests.support.gnupg import GnuPG
from tests.support.ldapclient import answer, bind
from tests.unit.test_openpgp_crafted import T0, Signer, Subkey, user_id

pytestmark = pytest.mark.integration

ALICE = Address.parse("alice@example.org")
ALICE_DN = "uid=alice,ou=people,dc=example,dc=org"
CAROL_DN = "uid=carol,ou=people,dc=example,dc=org"


def until(condition: Callable[[], object], within: float = 15.0) -> bool:
    """Poll a condition (the follower's pace is not what these tests assert)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


@pytest.fixture(scope="module")
def shared_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[bytes]:
    """A key with user IDs of alice and of carol: publishable on either entry, not both."""
    with GnuPG(tmp_path_factory.mktemp("shared") / "g") as gpg:
        fpr = gpg.generate("Carol Clark <carol@example.org>")
        gpg.run("--quick-add-uid", fpr, "Alice Liddell <alice@example.org>")
        yield gpg.export(fpr)


@pytest.fixture
def slapd(private_slapd: Slapd) -> Slapd:
    return private_slapd


@pytest.fixture
def store(slapd: Slapd) -> Iterator[LdapStore]:
    with LdapStore(account_config(slapd, "milter")) as directory:
        yield directory


@pytest.fixture
def follower(store: LdapStore) -> Iterator[Reconciler]:
    reconciler = Reconciler(store)
    reconciler.start()
    yield reconciler
    reconciler.stop()


@pytest.fixture
def source(slapd: Slapd) -> Iterator[LdapKeyView]:
    ldap = LdapKeyView(account_config(slapd, "wkd", base_dn=slapd.suffix))
    yield ldap
    ldap.close()


def publish(store: LdapStore, address: str, data: bytes) -> None:
    user = store.user(Address.parse(address))
    store.publish_key(user, openpgp.clean_key(data, user.addresses),
                      Provenance(KeyOrigin.AUTH_SUBMIT, address, int(time.time())))


def admin_sets_pgpkey(slapd: Slapd, dn: str, value: bytes | None) -> None:
    """What an administrator does: ldapmodify of pgpKey alone, as root over ldapi://."""
    body = (f"pgpKey:: {base64.b64encode(value).decode()}\n" if value is not None else "")
    slapd.ldapmodify(f"dn: {dn}\nchangetype: modify\nreplace: pgpKey\n{body}-\n")


def entry(store: LdapStore, dn: str, *names: str) -> dict[str, list[bytes]]:
    """The entry's attributes (names lowercased) as the milter's account reads them."""
    conn = bind(store.config.uri, store.config.bind_dn, store.config.bind_password)
    try:
        result, found = answer(conn, dn, "(objectClass=*)", names, ldap.SCOPE_BASE)
    finally:
        conn.unbind_ext_s()
    assert result == "success", result
    return {k.lower(): v for k, v in found[0][1].items() if v}


def served(source: LdapKeyView, address: Address) -> list[str]:
    return [p.dn for p in source.lookup(address_slot(address))]


def check_failures(slapd: Slapd) -> list[str]:
    config = Config(directory=account_config(slapd, "milter"))
    return [r.detail for r in check.check_keys(config) if r.ok is False]


def test_an_admins_new_key_of_alice_is_derived_and_served(
        slapd: Slapd, store: LdapStore, follower: Reconciler, source: LdapKeyView,
        gpg_keys: dict[str, UserKey]) -> None:
    publish(store, "alice@example.org", gpg_keys["alice"].data)
    admin_sets_pgpkey(slapd, ALICE_DN, openpgp.armor_key(gpg_keys["alice2"].data))
    user = store.user(ALICE)
    assert until(lambda: (k := store.get_key(user)) is not None
                 and k.fingerprint.hex == gpg_keys["alice2"].fingerprint)
    stored = store.get_key(user)
    assert stored is not None
    assert stored.provenance is not None
    assert stored.provenance.source == KeyOrigin.ADMIN_EDIT
    values = entry(store, ALICE_DN, "gpgFingerprint", "wkdKeyProblem")
    assert values["gpgfingerprint"] == [gpg_keys["alice2"].fingerprint.encode()]
    assert "wkdkeyproblem" not in values
    assert served(source, ALICE) == [ALICE_DN]
    assert check_failures(slapd) == []


@pytest.mark.parametrize("case", ["someone-elses-key", "held-elsewhere", "garbage"])
def test_a_bad_admin_edit_is_withheld_reported_and_logged(
        slapd: Slapd, store: LdapStore, follower: Reconciler, source: LdapKeyView,
        gpg_keys: dict[str, UserKey], shared_key: bytes, caplog: pytest.LogCaptureFixture,
        case: str) -> None:
    caplog.set_level(logging.WARNING, logger="milter_wkd")  # the store logs it
    publish(store, "alice@example.org", gpg_keys["alice"].data)
    assert served(source, ALICE) == [ALICE_DN]
    value = {"someone-elses-key": openpgp.armor_key(gpg_keys["bob"].data),
             "held-elsewhere": openpgp.armor_key(shared_key),
             "garbage": b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nbm90IGEga2V5\n"
                        b"-----END PGP PUBLIC KEY BLOCK-----\n"}[case]
    if case == "held-elsewhere":
        publish(store, "carol@example.org", shared_key)
    admin_sets_pgpkey(slapd, ALICE_DN, value)
    assert until(lambda: entry(store, ALICE_DN, "wkdKeyProblem").get("wkdkeyproblem"))
    values = entry(store, ALICE_DN, "pgpKey", "gpgFingerprint", "gpgMailbox", "wkdKeyProblem")
    assert values["pgpkey"] == [value]  # the administrator's data stays, to be fixed
    assert "gpgfingerprint" not in values
    assert "gpgmailbox" not in values
    assert store.get_key(store.user(ALICE)) is None
    assert served(source, ALICE) == []
    failures = check_failures(slapd)
    assert len(failures) == 1
    assert ALICE_DN in failures[0]
    assert any(ALICE_DN in r.getMessage() for r in caplog.records
               if r.levelno >= logging.WARNING)
    if case == "held-elsewhere":
        assert served(source, Address.parse("carol@example.org")) == [CAROL_DN]
    # The administrator fixes it: published again, the problem gone.
    admin_sets_pgpkey(slapd, ALICE_DN, openpgp.armor_key(gpg_keys["alice"].data))
    assert until(lambda: served(source, ALICE) == [ALICE_DN])
    assert "wkdkeyproblem" not in entry(store, ALICE_DN, "wkdKeyProblem")
    assert check_failures(slapd) == []


def test_a_deleted_pgpkey_takes_its_derived_attributes(
        slapd: Slapd, store: LdapStore, follower: Reconciler,
        gpg_keys: dict[str, UserKey]) -> None:
    publish(store, "alice@example.org", gpg_keys["alice"].data)
    admin_sets_pgpkey(slapd, ALICE_DN, None)
    assert until(lambda: not entry(store, ALICE_DN, "gpgFingerprint").get("gpgfingerprint"))
    values = entry(store, ALICE_DN, "gpgMailbox", "wkdAddressHash", "wkdKeyDigest")
    assert values == {}
    # The key material is free again: bob may not have it, but alice can publish anew.
    publish(store, "alice@example.org", gpg_keys["alice"].data)


def test_the_first_pass_checks_keys_written_before_digests(
        slapd: Slapd, store: LdapStore, gpg_keys: dict[str, UserKey]) -> None:
    publish(store, "alice@example.org", gpg_keys["alice"].data)
    publish(store, "bob@example.org", gpg_keys["bob"].data)
    bob_dn = "uid=bob,ou=people,dc=example,dc=org"
    for dn in (ALICE_DN, bob_dn):  # as an older milter-wkd left them
        slapd.ldapmodify(f"dn: {dn}\nchangetype: modify\nreplace: wkdKeyDigest\n-\n")
    # And an administrator put alice's key on bob's entry meanwhile.
    admin_sets_pgpkey(slapd, bob_dn, openpgp.armor_key(gpg_keys["alice"].data))
    assert len(check_failures(slapd)) == 2
    outcomes = Reconciler(store).run_once()
    assert outcomes[ALICE_DN] == "published"
    assert outcomes[bob_dn] == "withheld"
    alice = store.get_key(store.user(ALICE))
    assert alice is not None
    assert alice.provenance is not None
    assert alice.provenance.source == KeyOrigin.AUTH_SUBMIT  # not an edit: kept
    failures = check_failures(slapd)
    assert len(failures) == 1
    assert bob_dn in failures[0]


def test_a_consistent_directory_is_left_alone(
        slapd: Slapd, store: LdapStore, gpg_keys: dict[str, UserKey]) -> None:
    publish(store, "alice@example.org", gpg_keys["alice"].data)
    follower = Reconciler(store)
    assert set(follower.run_once().values()) == {"unchanged"}
    token = store.change_token()
    assert follower.run_once() == {}
    assert store.change_token() == token  # nothing written: no loop of its own writes


def test_a_withheld_key_is_published_once_what_blocked_it_is_gone(
        slapd: Slapd, store: LdapStore, source: LdapKeyView, shared_key: bytes,
        gpg_keys: dict[str, UserKey]) -> None:
    reconciler = Reconciler(store)  # passes driven by hand: no thread
    publish(store, "alice@example.org", gpg_keys["alice"].data)
    reconciler.run_once()
    publish(store, "carol@example.org", shared_key)
    admin_sets_pgpkey(slapd, ALICE_DN, openpgp.armor_key(shared_key))
    assert reconciler.run_once()[ALICE_DN] == "withheld"
    assert served(source, ALICE) == []
    assert reconciler.retry_withheld() == {ALICE_DN: "unchanged"}  # still held by carol
    store.remove_key(store.user(Address.parse("carol@example.org")))
    assert reconciler.retry_withheld() == {ALICE_DN: "published"}
    assert served(source, ALICE) == [ALICE_DN]


def test_the_follower_never_writes_over_what_it_did_not_judge(
        slapd: Slapd, store: LdapStore, gpg_keys: dict[str, UserKey]) -> None:
    """Its snapshot says an admin put alice2's key on the entry; before it acts, the milter
    publishes alice's own key again. Neither the re-derivation nor a withholding may undo
    that publication: the follower leaves the entry for its next pass."""
    reconciler = Reconciler(store)
    publish(store, "alice@example.org", gpg_keys["alice"].data)
    admin_sets_pgpkey(slapd, ALICE_DN, openpgp.armor_key(gpg_keys["alice2"].data))
    (judged,) = [u for u, _csn in store.key_holders_since("") if u.dn == ALICE_DN]
    publish(store, "alice@example.org", gpg_keys["alice"].data)  # meanwhile, the milter
    assert reconciler.reconcile(judged) == "changed"
    stored = store.get_key(store.user(ALICE))
    assert stored is not None
    assert stored.fingerprint.hex == gpg_keys["alice"].fingerprint
    # The same for a withholding: the snapshot's key is garbage, the entry is fine now.
    admin_sets_pgpkey(slapd, ALICE_DN, b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nbm8=\n"
                                       b"-----END PGP PUBLIC KEY BLOCK-----\n")
    (judged,) = [u for u, _csn in store.key_holders_since("") if u.dn == ALICE_DN]
    publish(store, "alice@example.org", gpg_keys["alice"].data)
    assert reconciler.reconcile(judged) == "changed"
    assert store.get_key(store.user(ALICE)) is not None
    assert reconciler.run_once()[ALICE_DN] == "unchanged"  # the next pass: all is well


def test_concurrent_publications_beside_the_follower_keep_slapd_up(private_slapd: Slapd) -> None:
    """Two publishers and the follower at once. With RFC 5805 transactions, Debian 12's
    slapd 2.5.13 crashed (SIGSEGV) in about half of such runs; the ordered single-entry
    writes must leave it running, every key published once, every claim held once."""
    slapd = private_slapd
    count = 300
    slapd.ldapmodify("\n".join(
        f"dn: uid=u{i},{slapd.people_dn}\nobjectClass: inetOrgPerson\nuid: u{i}\ncn: u{i}\n"
        f"sn: u{i}\nmail: u{i}@example.org\n" for i in range(count)), add=True)
    follower_store = LdapStore(account_config(slapd, "milter"))
    follower = Reconciler(follower_store, interval=0.05)
    follower.start()
    errors: list[str] = []

    def publisher(first: int) -> None:
        with LdapStore(account_config(slapd, "milter")) as store:
            for i in range(first, count, 2):
                address = Address.parse(f"u{i}@example.org")
                signer, sub = Signer(), Subkey(T0 + 5)
                uid = f"<{address}>"
                key = (signer.packet + user_id(uid) + signer.certify(uid, T0 + 1)
                       + sub.packet + signer.bind(sub, T0 + 6))
                cleaned = openpgp.clean_key(key, [address])
                try:
                    user = store.find_user(address, with_key=True,
                                           holders_of=key_fingerprints(cleaned.info))
                    assert user is not None
                    store.publish_key(user, cleaned, Provenance(
                        KeyOrigin.AUTH_SUBMIT, str(address), int(time.time())))
                except Exception as exc:
                    errors.append(repr(exc))

    threads = [threading.Thread(target=publisher, args=(k,)) for k in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        follower.stop()
        follower_store.close()
    assert slapd.running
    assert errors == []
    with LdapStore(account_config(slapd, "milter")) as store:
        keys = list(store.list_keys())
        assert len(keys) == count
        fprs = [k.fingerprint for k in keys]
        claims = store.holdings(fprs).claims
        assert {c.holder.split(",")[0] for c in claims.values()} == {
            k.dn.split(",")[0] for k in keys}
