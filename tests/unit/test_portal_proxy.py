"""The self-service page behind a reverse proxy ([portal] behind_proxy, docs/nginx-wkd.conf):
nginx speaks HTTPS to the browser and plain HTTP to the page on loopback, and says in
X-Forwarded-* what the browser asked for. With behind_proxy the page takes the scheme,
host, path prefix and client address from there (werkzeug's ProxyFix, one hop); without
it, it ignores those headers (they could be forged by a client reaching it directly)."""

from __future__ import annotations

import re

from flask import Flask
from flask.testing import FlaskClient

from milter_wkd.config import build
from milter_wkd.portal import create_app
from milter_wkd.store.memory import MemoryStore
from tests.contract.conftest import USERS
from tests.unit.test_portal import WRONG, FakeAuthenticator

PROXY = "http://127.0.0.1:8443"  # what the page itself sees: nginx's proxy_pass
FORWARDED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "mail.example.org",
             "X-Forwarded-Prefix": "/keys", "X-Forwarded-For": "192.0.2.7"}
ORIGIN = "https://mail.example.org"


def make_app(behind_proxy: bool) -> Flask:
    store = MemoryStore(USERS)
    config = build({"portal": {"behind_proxy": behind_proxy, "rate_per_client": 2,
                               "rate_per_account": 100}})
    return create_app(config, store, FakeAuthenticator(store), secret_key=b"p" * 32)


def sign_in(client: FlaskClient, password: str, forwarded_for: str) -> tuple[int, str]:
    page = client.get("/sign-in", base_url=PROXY, headers=FORWARDED).get_data(as_text=True)
    found = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page)
    assert found, page
    answer = client.post("/sign-in", base_url=PROXY, data={
        "csrf_token": found.group(1), "address": "alice@example.org", "password": password},
        headers={**FORWARDED, "X-Forwarded-For": forwarded_for, "Origin": ORIGIN})
    return answer.status_code, answer.headers.get("Location", "")


def test_behind_proxy_trusts_the_forwarded_origin_prefix_and_client() -> None:
    with make_app(True).test_client() as client:
        page = client.get("/sign-in", base_url=PROXY, headers=FORWARDED).get_data(
            as_text=True)
        assert 'action="/keys/sign-in"' in page  # the prefix nginx strips
        assert 'href="/keys/static/' in page
        # The browser's Origin is the proxy's https:// host: accepted.
        status, location = sign_in(client, "alice-secret", "192.0.2.7")
        assert status == 303
        assert location.endswith("/keys/keys")
        # The per-client limit counts each forwarded client, not the proxy's address.
        for _ in range(2):
            assert sign_in(client, "wrong", "192.0.2.8")[0] == 401
        assert sign_in(client, "wrong", "192.0.2.8")[0] == 429
        assert sign_in(client, "wrong", "192.0.2.9")[0] == 401


def test_without_behind_proxy_the_forwarded_headers_are_ignored() -> None:
    with make_app(False).test_client() as client:
        page = client.get("/sign-in", base_url=PROXY, headers=FORWARDED).get_data(
            as_text=True)
        assert 'action="/sign-in"' in page
        # The page was reached over http://127.0.0.1:8443: an https:// Origin is foreign.
        assert sign_in(client, "alice-secret", "192.0.2.7")[0] == 403
        # A client forging X-Forwarded-For still counts as itself (the proxy's address).
        client2 = make_app(False).test_client()
        page = client2.get("/sign-in", base_url=PROXY).get_data(as_text=True)
        found = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page)
        assert found
        codes = []
        for forged in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            answer = client2.post("/sign-in", base_url=PROXY, data={
                "csrf_token": found.group(1), "address": "alice@example.org",
                "password": "wrong"}, headers={"X-Forwarded-For": forged})
            codes.append(answer.status_code)
            if answer.status_code == 401:
                assert WRONG in answer.get_data(as_text=True)
        assert codes == [401, 401, 429]
