"""The self-service page through Flask's test client, on MemoryStore with a fake
authenticator (passwords `<name>-secret`): sign-in, sessions, CSRF, Origin, ownership,
uploads and unpublishing."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from flask import Flask
from flask.testing import FlaskClient

from milter_wkd.config import build
from milter_wkd.openpgp import messages
from milter_wkd.portal import create_app
from milter_wkd.store.memory import MemoryStore
from milter_wkd.store.model import KeyOrigin, User
from milter_wkd.values import Address
from tests.contract.conftest import USERS
from tests.contract.test_store import make_key

BASE = "https://keys.example.org"
ALICE = Address.parse("alice@example.org")
BOB = Address.parse("bob@example.org")
WRONG = "The address or the password is wrong."


@dataclass
class FakeAuthenticator:
    store: MemoryStore
    calls: list[tuple[str, str]] = field(default_factory=list)

    def authenticate(self, address: Address, password: str) -> User | None:
        self.calls.append((str(address), password))
        user = self.store.find_user(address)
        if user is None or not password:
            return None
        name = user.dn.split(",")[0].split("=")[1]
        return user if password == f"{name}-secret" else None


@dataclass
class Clock:
    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore(USERS)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def auth(store: MemoryStore) -> FakeAuthenticator:
    return FakeAuthenticator(store)


@pytest.fixture
def app(store: MemoryStore, auth: FakeAuthenticator, clock: Clock) -> Flask:
    config = build({"portal": {"provider_name": "Example Mail", "rate_per_account": 5,
                               "rate_per_client": 8, "session_idle_seconds": 600}})
    return create_app(config, store, auth, secret_key=b"k" * 32, clock=clock)


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    with app.test_client() as client:
        yield client


def token(client: FlaskClient, path: str = "/sign-in") -> str:
    page = client.get(path, base_url=BASE).get_data(as_text=True)
    found = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def post(client: FlaskClient, path: str, data: dict[str, object], *, csrf: str | None = None,
         origin: str | None = BASE, page: str | None = None) -> tuple[int, str]:
    if csrf is None:
        csrf = token(client, page or path)
    headers = {"Origin": origin} if origin is not None else {}
    answer = client.post(path, base_url=BASE, data={"csrf_token": csrf, **data},
                         headers=headers)
    return answer.status_code, answer.get_data(as_text=True)


def sign_in(client: FlaskClient, address: str = "alice@example.org",
            password: str = "alice-secret") -> tuple[int, str]:  # noqa: S107
    return post(client, "/sign-in", {"address": address, "password": password})


def cookie(client: FlaskClient) -> str:
    found = client.get_cookie("portal_session", domain="keys.example.org")
    assert found is not None
    return found.value


def upload(client: FlaskClient, key: bytes | str) -> tuple[int, str]:
    data: dict[str, object] = ({"key_text": key} if isinstance(key, str)
                               else {"key_file": (io.BytesIO(key), "key.pgp")})
    csrf = token(client, "/keys")
    answer = client.post("/upload", base_url=BASE, data={"csrf_token": csrf, **data},
                         headers={"Origin": BASE}, content_type="multipart/form-data")
    return answer.status_code, answer.get_data(as_text=True)


def test_sign_in_with_the_mail_password_shows_my_keys(client: FlaskClient) -> None:
    status, _ = sign_in(client)
    assert status == 303
    page = client.get("/keys", base_url=BASE)
    assert page.status_code == 200
    body = page.get_data(as_text=True)
    assert "You have no published key" in body
    assert "alice.liddell@example.org" in body  # every address of the user


@pytest.mark.parametrize(("address", "password"), [
    ("alice@example.org", "wrong"),
    ("nobody@example.org", "alice-secret"),
    ("alice@example.org", ""),
    ("not an address", "x"),
])
def test_failed_sign_in_gives_one_message(client: FlaskClient, address: str,
                                          password: str) -> None:
    status, body = sign_in(client, address, password)
    assert status == 401
    assert WRONG in body
    assert client.get("/keys", base_url=BASE).status_code == 303


def test_an_empty_password_never_reaches_the_authenticator(
        client: FlaskClient, auth: FakeAuthenticator) -> None:
    sign_in(client, "alice@example.org", "")
    assert auth.calls == []


def test_sign_in_by_alias(client: FlaskClient) -> None:
    assert sign_in(client, "Alice.Liddell@example.org")[0] == 303
    assert client.get("/keys", base_url=BASE).status_code == 200


def test_session_cookie_flags_and_rotation(client: FlaskClient) -> None:
    first = client.get("/sign-in", base_url=BASE)
    set_cookie = first.headers["Set-Cookie"]
    for flag in ("Secure", "HttpOnly", "SameSite=Strict"):
        assert flag in set_cookie
    before, old_token = cookie(client), token(client)
    sign_in(client)
    assert cookie(client) != before
    # The old session's CSRF token is gone with it.
    status, _ = post(client, "/upload", {"key_text": "x"}, csrf=old_token)
    assert status == 400


def test_idle_session_is_signed_out(client: FlaskClient, clock: Clock) -> None:
    sign_in(client)
    clock.now += 599
    assert client.get("/keys", base_url=BASE).status_code == 200
    clock.now += 599  # used a moment ago: still in
    assert client.get("/keys", base_url=BASE).status_code == 200
    clock.now += 601
    answer = client.get("/keys", base_url=BASE)
    assert answer.status_code == 303
    assert "You were signed out" in client.get(answer.headers["Location"],
                                               base_url=BASE).get_data(as_text=True)
    assert client.get("/keys", base_url=BASE).status_code == 303


def test_post_without_csrf_token_is_refused(client: FlaskClient, store: MemoryStore) -> None:
    answer = client.post("/sign-in", base_url=BASE, headers={"Origin": BASE},
                         data={"address": "alice@example.org", "password": "alice-secret"})
    assert answer.status_code == 400
    assert "The form has expired" in answer.get_data(as_text=True)
    sign_in(client)
    key, _p, _s = make_key("Alice <alice@example.org>")
    answer = client.post("/upload", base_url=BASE, headers={"Origin": BASE},
                         data={"key_text": key.hex()})
    assert answer.status_code == 400
    assert store.get_key(store.user(ALICE)) is None


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://keys.example.org"])
def test_foreign_origin_is_refused(client: FlaskClient, origin: str) -> None:
    status, _ = post(client, "/sign-in", {"address": "alice@example.org",
                                          "password": "alice-secret"}, origin=origin)
    assert status == 403
    assert client.get("/keys", base_url=BASE).status_code == 303


def test_absent_origin_is_accepted(client: FlaskClient) -> None:
    status, _ = post(client, "/sign-in", {"address": "alice@example.org",
                                          "password": "alice-secret"}, origin=None)
    assert status == 303


def test_upload_then_my_keys_shows_it(client: FlaskClient, store: MemoryStore) -> None:
    sign_in(client)
    key, primary, _sub = make_key("Alice <alice@example.org>", "Carol <carol@example.org>")
    status, body = upload(client, key)
    assert status == 200, body
    fpr = primary.fingerprint.hex().upper()
    assert f"Your key {fpr} is published for alice@example.org" in body
    assert "alice.liddell@example.org" in body  # named as not published: no user ID for it
    assert "user IDs with addresses that are not yours" in body
    stored = store.get_key(store.user(ALICE))
    assert stored is not None
    assert stored.provenance is not None
    assert stored.provenance.source is KeyOrigin.SELF_SERVICE
    assert stored.provenance.actor == "alice@example.org"
    page = client.get("/keys", base_url=BASE).get_data(as_text=True)
    assert fpr in page
    assert "on this page" in page
    assert "/.well-known/openpgpkey/example.org/hu/" in page
    # carol's address was published for nobody
    assert store.find_user(Address.parse("carol@example.org")) is not None
    assert store.get_key(store.user(Address.parse("carol@example.org"))) is None


def test_armored_paste_is_published(client: FlaskClient, store: MemoryStore) -> None:
    from milter_wkd.openpgp import armor_key
    sign_in(client)
    key, _p, _s = make_key("Alice <alice@example.org>")
    status, body = upload(client, armor_key(key).decode())
    assert status == 200, body
    assert store.get_key(store.user(ALICE)) is not None


def test_key_of_carol_only_publishes_nothing(client: FlaskClient, store: MemoryStore) -> None:
    sign_in(client)
    key, _p, _s = make_key("Carol <carol@example.org>")
    status, body = upload(client, key)
    assert status == 422
    assert "The key was not published" in body
    assert store.get_key(store.user(ALICE)) is None
    assert store.get_key(store.user(Address.parse("carol@example.org"))) is None


def test_bob_cannot_touch_alices_key(client: FlaskClient, store: MemoryStore) -> None:
    sign_in(client)
    key, _p, _s = make_key("Alice <alice@example.org>")
    assert upload(client, key)[0] == 200
    client.post("/sign-out", base_url=BASE, headers={"Origin": BASE},
                data={"csrf_token": token(client, "/keys")})
    assert sign_in(client, "bob@example.org", "bob-secret")[0] == 303
    assert "You have no published key" in client.get("/keys", base_url=BASE).get_data(
        as_text=True)
    # Uploading alice's key, or unpublishing with alice's password, changes nothing of hers.
    assert upload(client, key)[0] == 422
    status, _ = post(client, "/unpublish", {"password": "alice-secret",
                                            "address": "alice@example.org"})
    assert status == 403  # the form names an address that is not bob's
    status, _ = post(client, "/unpublish", {"password": "alice-secret"})
    assert status == 401
    status, _ = post(client, "/unpublish", {"password": "bob-secret"})
    assert status == 200
    assert store.get_key(store.user(ALICE)) is not None


def test_secret_key_is_refused_and_called_exposed(client: FlaskClient,
                                                  store: MemoryStore) -> None:
    sign_in(client)
    generated = messages.generate_submission_key(ALICE)
    status, body = upload(client, generated.secret.decode())
    assert status == 422
    assert "SECRET key material" in body
    assert "treated as exposed" in body
    assert store.get_key(store.user(ALICE)) is None


def test_unpublish_needs_the_password(client: FlaskClient, store: MemoryStore) -> None:
    sign_in(client)
    key, _p, _s = make_key("Alice <alice@example.org>")
    upload(client, key)
    page = client.get("/unpublish", base_url=BASE).get_data(as_text=True)
    assert "mail password, to confirm" in page
    status, body = post(client, "/unpublish", {"password": "wrong"})
    assert status == 401
    assert "The password is wrong" in body
    assert store.get_key(store.user(ALICE)) is not None
    status, body = post(client, "/unpublish", {"password": ""})
    assert status == 401
    status, body = post(client, "/unpublish", {"password": "alice-secret"})
    assert status == 200
    assert "is no longer published" in body
    assert store.get_key(store.user(ALICE)) is None
    # Without a key, a wrong password is still said to be wrong.
    status, body = post(client, "/unpublish", {"password": "wrong"})
    assert status == 401
    assert "The password is wrong" in body


def test_rate_limit_per_account_engages(client: FlaskClient, auth: FakeAuthenticator,
                                        clock: Clock) -> None:
    for _ in range(5):
        assert sign_in(client, "alice@example.org", "guess")[0] == 401
    status, body = sign_in(client)  # even the right password now waits
    assert status == 429
    assert "Too many attempts" in body
    assert len(auth.calls) == 5
    clock.now += 901
    assert sign_in(client)[0] == 303


def test_rate_limit_per_client_engages(client: FlaskClient) -> None:
    for i in range(8):
        assert sign_in(client, f"user{i}@example.org", "guess")[0] == 401
    assert sign_in(client)[0] == 429


@pytest.mark.parametrize("path", ["/sign-in", "/keys", "/unpublish", "/nowhere",
                                  "/static/portal.css"])
def test_every_answer_has_the_csp(client: FlaskClient, path: str) -> None:
    sign_in(client)
    answer = client.get(path, base_url=BASE)
    body = answer.get_data(as_text=True)
    answer.close()
    assert answer.headers["Content-Security-Policy"] == (
        "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; "
        "base-uri 'none'")
    assert "<script" not in body


def test_signed_out_pages_redirect_and_the_csp_is_on_refusals(client: FlaskClient) -> None:
    for path in ("/keys", "/unpublish"):
        assert client.get(path, base_url=BASE).status_code == 303
    answer = client.post("/sign-in", base_url=BASE, headers={"Origin": "https://evil.example"})
    assert answer.status_code == 403
    assert "Content-Security-Policy" in answer.headers


def test_a_directory_that_is_down_is_a_503(client: FlaskClient, store: MemoryStore) -> None:
    sign_in(client)
    store.down = True
    answer = client.get("/keys", base_url=BASE)
    assert answer.status_code == 503
    assert "Try again later" in answer.get_data(as_text=True)
