"""The self-service page's per-address unpublishing and revocation upload (issue #13 item
5), through Flask's test client on MemoryStore (fixtures and helpers of test_portal): the
password again and its rate limit, provenance, what the responder's view then serves, and
the refusals (another user's address or key, a wrong password, no CSRF token, another
Origin, a revocation that does not verify): nothing written."""

from __future__ import annotations

import io
import re

import pytest
from flask.testing import FlaskClient

from milter_wkd import openpgp
from milter_wkd.openpgp import packets as pk
from milter_wkd.store.memory import MemoryStore
from milter_wkd.store.model import KeyOrigin, StoredKey
from milter_wkd.store.schema import address_slot
from milter_wkd.values import Address
from tests.contract.test_store import make_key
from tests.unit import test_portal as base
from tests.unit.test_openpgp_crafted import T0, Signer
from tests.unit.test_portal import ALICE, BASE, BOB, Clock, post, sign_in, token, upload

# The fixtures of test_portal (the app on MemoryStore, the fake authenticator, the clock).
app, auth, client, clock, store = base.app, base.auth, base.client, base.clock, base.store

ALIAS = Address.parse("alice.liddell@example.org")
TWO_UIDS = ("Alice <alice@example.org>", "Alice Liddell <alice.liddell@example.org>")


def alices_key(store: MemoryStore) -> StoredKey:
    stored = store.get_key(store.user(ALICE))
    assert stored is not None
    return stored


def served(store: MemoryStore, address: Address) -> bool:
    """Does the responder's view (MemoryStore is a KeyView too) serve a key for address?"""
    return bool(store.lookup(address_slot(address)))


def publish_both(client: FlaskClient, store: MemoryStore) -> Signer:
    assert sign_in(client)[0] == 303
    key, primary, _sub = make_key(*TWO_UIDS)
    status, body = upload(client, key)
    assert status == 200, body
    assert {a.key for a in alices_key(store).addresses} == {ALICE.key, ALIAS.key}
    return primary


def unpublish(client: FlaskClient, address: Address | str | None, password: str,
              **kw: object) -> tuple[int, str]:
    data = {"password": password}
    if address is not None:
        data["address"] = str(address)
    page = "/unpublish" + (f"?address={address}" if address is not None else "")
    return post(client, "/unpublish", data, page=page, **kw)  # type: ignore[arg-type]


# -- one address -------------------------------------------------------------------------

def test_the_key_page_has_a_link_per_published_address(client: FlaskClient,
                                                       store: MemoryStore) -> None:
    publish_both(client, store)
    page = client.get("/keys", base_url=BASE).get_data(as_text=True)
    links = re.findall(r'href="(/unpublish\?address=[^"]+)"', page)
    assert sorted(links) == ["/unpublish?address=alice.liddell@example.org",
                             "/unpublish?address=alice@example.org"]
    assert page.count("Unpublish this address") == 2
    confirm = client.get(sorted(links)[0], base_url=BASE).get_data(as_text=True)
    assert "will no longer be published for alice.liddell@example.org" in confirm
    assert "It stays published for alice@example.org" in confirm
    assert 'name="address" type="hidden" value="alice.liddell@example.org"' in confirm
    assert 'autocomplete="current-password"' in confirm


def test_unpublishing_one_address_keeps_the_others(client: FlaskClient,
                                                   store: MemoryStore, clock: Clock) -> None:
    primary = publish_both(client, store)
    before = alices_key(store)
    clock.now += 60
    status, body = unpublish(client, ALIAS, "alice-secret")
    assert status == 200, body
    assert "is no longer published for alice.liddell@example.org" in body
    assert "It is still published for alice@example.org" in body
    after = alices_key(store)
    assert after.fingerprint == before.fingerprint
    assert after.fingerprint.hex == primary.fingerprint.hex().upper()
    assert [str(a) for a in after.addresses] == ["alice@example.org"]
    # The user ID for the alias is out of the published key itself, not only its index.
    assert openpgp.inspect_key(after.key).user_ids == ("Alice <alice@example.org>",)
    assert after.provenance is not None
    assert after.provenance.source is KeyOrigin.SELF_SERVICE
    assert after.provenance.actor == "alice@example.org"
    assert after.provenance.published == int(clock.now)
    assert served(store, ALICE)
    assert not served(store, ALIAS)
    page = client.get("/keys", base_url=BASE).get_data(as_text=True)
    assert page.count("Unpublish this address") == 1


def test_unpublishing_the_last_address_removes_the_key(client: FlaskClient,
                                                       store: MemoryStore) -> None:
    publish_both(client, store)
    assert unpublish(client, ALIAS, "alice-secret")[0] == 200
    confirm = client.get(f"/unpublish?address={ALICE}", base_url=BASE).get_data(as_text=True)
    assert "is the last address your key" in confirm
    status, body = unpublish(client, ALICE, "alice-secret")
    assert status == 200, body
    assert "Your key is no longer published" in body
    assert store.get_key(store.user(ALICE)) is None
    assert not served(store, ALICE)
    assert not served(store, ALIAS)


def test_an_address_the_key_is_not_published_for(client: FlaskClient,
                                                 store: MemoryStore) -> None:
    sign_in(client)
    key, _p, _s = make_key("Alice <alice@example.org>")
    assert upload(client, key)[0] == 200
    before = alices_key(store)
    status, body = unpublish(client, ALIAS, "alice-secret")
    assert status == 200
    assert "Your key is not published for alice.liddell@example.org" in body
    assert alices_key(store) == before


def test_the_password_is_asked_again_and_rate_limited(client: FlaskClient,
                                                      store: MemoryStore,
                                                      clock: Clock) -> None:
    publish_both(client, store)
    before = alices_key(store)
    for password in ("wrong", "", "alice-secre", "Alice-secret"):
        status, body = unpublish(client, ALIAS, password)
        assert status == 401
        assert "The password is wrong" in body
    assert alices_key(store) == before
    # The fifth attempt (rate_per_account 5 in the fixture, sign-in counted too) waits,
    # even with the right password.
    status, body = unpublish(client, ALIAS, "alice-secret")
    assert status == 429
    assert "Too many attempts" in body
    assert alices_key(store) == before
    for step in (450, 451):  # past the window, the session kept alive (idle 600 s)
        clock.now += step
        assert client.get("/keys", base_url=BASE).status_code == 200
    assert unpublish(client, ALIAS, "alice-secret")[0] == 200


def test_bob_cannot_unpublish_alices_address(client: FlaskClient, store: MemoryStore) -> None:
    publish_both(client, store)
    before = alices_key(store)
    client.post("/sign-out", base_url=BASE, headers={"Origin": BASE},
                data={"csrf_token": token(client, "/keys")})
    assert sign_in(client, "bob@example.org", "bob-secret")[0] == 303
    for address in (ALICE, ALIAS, "ALICE@example.org"):
        status, body = unpublish(client, address, "bob-secret")
        assert status == 403
        assert "is not one of your addresses" in body
        status, _ = unpublish(client, address, "alice-secret")
        assert status == 403
    assert client.get(f"/unpublish?address={ALIAS}", base_url=BASE).status_code == 403
    assert alices_key(store) == before
    assert served(store, ALIAS)


def test_unpublishing_an_address_without_csrf_or_from_another_origin(
        client: FlaskClient, store: MemoryStore) -> None:
    publish_both(client, store)
    before = alices_key(store)
    answer = client.post("/unpublish", base_url=BASE, headers={"Origin": BASE},
                         data={"address": str(ALIAS), "password": "alice-secret"})
    assert answer.status_code == 400
    assert "The form has expired" in answer.get_data(as_text=True)
    status, _ = unpublish(client, ALIAS, "alice-secret", origin="https://evil.example")
    assert status == 403
    assert alices_key(store) == before


def test_a_malformed_address_is_refused(client: FlaskClient, store: MemoryStore) -> None:
    publish_both(client, store)
    before = alices_key(store)
    status, _ = unpublish(client, "not an address", "alice-secret")
    assert status == 403
    assert alices_key(store) == before


# -- revocation certificates ---------------------------------------------------------------

def revoke(client: FlaskClient, certificate: bytes | str, *, field: str = "file",
           path: str = "/revoke", origin: str = BASE, csrf: bool = True,
           ) -> tuple[int, str]:
    prefix = "revocation" if path == "/revoke" else "key"
    data: dict[str, object] = (
        {f"{prefix}_text": certificate} if isinstance(certificate, str)
        else {f"{prefix}_{field}": (io.BytesIO(certificate), "revocation.rev")})
    if csrf:
        data["csrf_token"] = token(client, "/keys")
    answer = client.post(path, base_url=BASE, data=data, headers={"Origin": origin},
                         content_type="multipart/form-data")
    return answer.status_code, answer.get_data(as_text=True)


def armored_revocation(signer: Signer) -> str:
    """As gpg --gen-revoke and OpenPGP.js write one: a public key block, one signature."""
    return pk.armor(pk.ARMOR_PUBLIC_KEY, signer.on_key(0x20, T0 + 100)).decode()


@pytest.mark.parametrize("how", ["file", "paste", "key form"])
def test_a_revocation_certificate_is_published(client: FlaskClient, store: MemoryStore,
                                              clock: Clock, how: str) -> None:
    primary = publish_both(client, store)
    page = client.get("/keys", base_url=BASE).get_data(as_text=True)
    assert 'action="/revoke"' in page
    certificate = armored_revocation(primary)
    clock.now += 60
    if how == "file":
        status, body = revoke(client, certificate.encode())
    elif how == "paste":
        status, body = revoke(client, certificate)
    else:  # put in the upload form: recognised as a lone revocation
        status, body = revoke(client, certificate, path="/upload")
    assert status == 200, body
    assert "Your key is published as revoked" in body
    stored = alices_key(store)
    assert stored.revoked
    assert openpgp.inspect_key(stored.key).revoked
    assert {a.key for a in stored.addresses} == {ALICE.key, ALIAS.key}
    assert stored.provenance is not None
    assert stored.provenance.source is KeyOrigin.SELF_SERVICE
    assert stored.provenance.published == int(clock.now)
    assert served(store, ALICE)  # served WITH its revocation, so clients learn of it
    page = client.get("/keys", base_url=BASE).get_data(as_text=True)
    assert "clients learn that this key must no longer be used" in page
    assert 'action="/revoke"' not in page  # nothing left to revoke


def test_another_keys_revocation_is_refused(client: FlaskClient, store: MemoryStore) -> None:
    publish_both(client, store)
    before = alices_key(store)
    status, body = revoke(client, armored_revocation(Signer()))
    assert status == 422
    assert "The revocation was not published: this revocation is for another key" in body
    assert "Nothing was changed" in body
    assert alices_key(store) == before


def test_a_revocation_that_does_not_verify_is_refused(client: FlaskClient,
                                                      store: MemoryStore) -> None:
    primary = publish_both(client, store)
    before = alices_key(store)
    binary = bytearray(primary.on_key(0x20, T0 + 100))
    binary[-3] ^= 0x01
    status, body = revoke(client, bytes(binary))
    assert status == 422
    assert "does not verify against your key" in body
    # A user ID revocation alone cannot be checked without its user ID.
    status, body = revoke(client, pk.armor(pk.ARMOR_PUBLIC_KEY,
                                           primary.on_key(0x30, T0 + 100)).decode())
    assert status == 422
    assert "not a revocation of a whole key" in body
    assert alices_key(store) == before


def test_a_revocation_without_a_published_key(client: FlaskClient, store: MemoryStore) -> None:
    sign_in(client)
    status, body = revoke(client, armored_revocation(Signer()))
    assert status == 422
    assert "you have no published key to revoke" in body
    assert store.get_key(store.user(ALICE)) is None
    status, body = revoke(client, "")
    assert status == 400
    assert "Choose a revocation certificate file or paste one" in body


def test_bobs_session_cannot_revoke_alices_key(client: FlaskClient, store: MemoryStore) -> None:
    primary = publish_both(client, store)
    before = alices_key(store)
    client.post("/sign-out", base_url=BASE, headers={"Origin": BASE},
                data={"csrf_token": token(client, "/keys")})
    assert sign_in(client, "bob@example.org", "bob-secret")[0] == 303
    # Bob's own key is another one: alice's revocation is not for it.
    key, _p, _s = make_key("Bob <bob@example.org>")
    assert upload(client, key)[0] == 200
    bobs = store.get_key(store.user(BOB))
    status, body = revoke(client, armored_revocation(primary))
    assert status == 422
    assert "for another key" in body
    assert alices_key(store) == before
    assert store.get_key(store.user(BOB)) == bobs


def test_revocation_without_csrf_or_from_another_origin(client: FlaskClient,
                                                        store: MemoryStore) -> None:
    primary = publish_both(client, store)
    before = alices_key(store)
    status, body = revoke(client, armored_revocation(primary), csrf=False)
    assert status == 400
    assert "The form has expired" in body
    status, _ = revoke(client, armored_revocation(primary), origin="https://evil.example")
    assert status == 403
    assert alices_key(store) == before
    assert not alices_key(store).revoked


def test_signed_out_revoke_and_unpublish_redirect(client: FlaskClient) -> None:
    answer = client.post("/revoke", base_url=BASE, headers={"Origin": BASE})
    assert answer.status_code in (303, 400)
    assert client.get(f"/unpublish?address={ALIAS}", base_url=BASE).status_code == 303
