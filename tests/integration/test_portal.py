"""The self-service page against a REAL slapd: `milter_wkd.store.auth` binds as the users
(alice, bob, carol with passwords `<name>-secret`), and the portal app on the real
LdapStore publishes a key exported by real gpg, shows it and unpublishes it, for one
address or all, and publishes a revocation certificate made by gpg --gen-revoke."""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from milter_wkd.config import build
from milter_wkd.errors import DirectoryUnavailable
from milter_wkd.portal import create_app
from milter_wkd.sandbox.slapd import Slapd
from milter_wkd.sandbox.wkd import make_test_pki
from milter_wkd.store.auth import LdapAuthenticator
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.ldapview import LdapKeyView
from milter_wkd.store.schema import address_slot
from milter_wkd.values import Address
from tests.integration.conftest import UserKey, account_config
from tests.support.gnupg import GnuPG

pytestmark = pytest.mark.integration
BASE = "https://keys.example.org"

@pytest.fixture
def authenticator(slapd: Slapd) -> Iterator[LdapAuthenticator]:
    config = account_config(slapd, "milter")
    with LdapStore(config) as store:
        yield LdapAuthenticator(config, store)


@pytest.mark.parametrize("name", ["alice", "bob", "carol"])
def test_users_sign_in_with_their_mail_password(authenticator: LdapAuthenticator,
                                                slapd: Slapd, name: str) -> None:
    user = authenticator.authenticate(Address.parse(f"{name}@example.org"), f"{name}-secret")
    assert user is not None
    assert user.dn == slapd.users[name]["dn"]


def test_an_alias_signs_in_as_its_owner(authenticator: LdapAuthenticator,
                                        slapd: Slapd) -> None:
    user = authenticator.authenticate(Address.parse("Alice.Liddell@example.org"),
                                      "alice-secret")
    assert user is not None
    assert user.dn == slapd.users["alice"]["dn"]


@pytest.mark.parametrize(("address", "password"), [
    ("alice@example.org", "bob-secret"),
    ("alice@example.org", ""),
    ("bob@example.org", "alice-secret"),
    ("nobody@example.org", "alice-secret"),
    ("*@example.org", "alice-secret"),  # a filter wildcard matches nobody
    ("al*@example.org", "alice-secret"),
    ("alice*@example.org", "alice-secret"),
])
def test_wrong_unknown_empty_and_filter_characters_fail(
        authenticator: LdapAuthenticator, address: str, password: str) -> None:
    assert authenticator.authenticate(Address.parse(address), password) is None


def test_unknown_and_wrong_cost_about_the_same(authenticator: LdapAuthenticator) -> None:
    def cost(address: str) -> float:
        start = time.perf_counter()
        for _ in range(20):
            authenticator.authenticate(Address.parse(address), "guess")
        return time.perf_counter() - start

    cost("alice@example.org")  # warm up
    known, unknown = cost("alice@example.org"), cost("nobody@example.org")
    # Both: one search and a bind on a new connection (a decoy DN for the unknown address).
    assert 0.5 < unknown / known < 2.0, (known, unknown)


def test_a_directory_that_is_down_is_unavailable(slapd: Slapd) -> None:
    config = account_config(slapd, "milter")
    with LdapStore(config) as store:
        broken = LdapAuthenticator(account_config(slapd, "milter", uri="ldap://127.0.0.1:9",
                                                  timeout=1.0), store)
        # The look-up (the store's own connection) works; the user's bind cannot connect.
        with pytest.raises(DirectoryUnavailable):
            broken.authenticate(Address.parse("alice@example.org"), "alice-secret")


def _token(client: FlaskClient, path: str) -> str:
    page = client.get(path, base_url=BASE).get_data(as_text=True)
    found = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def test_upload_see_and_unpublish_a_gpg_key(private_slapd: Slapd,
                                            gpg_keys: dict[str, UserKey]) -> None:
    directory = account_config(private_slapd, "milter")
    config = build({"portal": {"provider_name": "Example Mail"}})
    with LdapStore(directory) as store:
        app = create_app(config, store, LdapAuthenticator(directory, store),
                         secret_key=b"s" * 32)
        alice = gpg_keys["alice"]
        with app.test_client() as client:
            answer = client.post("/sign-in", base_url=BASE, headers={"Origin": BASE}, data={
                "csrf_token": _token(client, "/sign-in"), "address": "alice@example.org",
                "password": "alice-secret"})
            assert answer.status_code == 303
            answer = client.post("/upload", base_url=BASE, headers={"Origin": BASE},
                                 content_type="multipart/form-data", data={
                                     "csrf_token": _token(client, "/keys"),
                                     "key_text": alice.gpg.export(alice.fingerprint,
                                                                  "--armor").decode()})
            body = answer.get_data(as_text=True)
            assert answer.status_code == 200, body
            assert (f"Your key {alice.fingerprint} is published for alice@example.org, "
                    "alice.liddell@example.org") in body
            page = client.get("/keys", base_url=BASE).get_data(as_text=True)
            assert alice.fingerprint in page
            assert "on this page" in page
            assert "Alice L. &lt;alice.liddell@example.org&gt;" in page
            stored = store.get_key(store.user(Address.parse("alice@example.org")))
            assert stored is not None
            assert stored.provenance is not None
            assert stored.provenance.source == "self-service"
            answer = client.post("/unpublish", base_url=BASE, headers={"Origin": BASE}, data={
                "csrf_token": _token(client, "/unpublish"), "password": "bob-secret"})
            assert answer.status_code == 401
            answer = client.post("/unpublish", base_url=BASE, headers={"Origin": BASE}, data={
                "csrf_token": _token(client, "/unpublish"), "password": "alice-secret"})
            assert answer.status_code == 200, answer.get_data(as_text=True)
            assert store.get_key(store.user(Address.parse("alice@example.org"))) is None


def gen_revoke(gpg: GnuPG, fingerprint: str, reason: str = "key compromised") -> bytes:
    """A revocation certificate as `gpg --gen-revoke` writes it (it asks on the terminal:
    the answers come on --command-fd; --batch would refuse)."""
    answers = f"y\n1\n{reason}\n\ny\n".encode()
    return gpg.run("--no-tty", "--command-fd", "0", "--pinentry-mode", "loopback",
                   "--passphrase", "", "--gen-revoke", fingerprint, input=answers,
                   binary=gpg.gpg).stdout


def test_unpublish_one_address_then_revoke_on_real_slapd(
        private_slapd: Slapd, gpg_keys: dict[str, UserKey]) -> None:
    directory = account_config(private_slapd, "milter")
    config = build({"portal": {"provider_name": "Example Mail"}})
    alice_address, alias = (Address.parse("alice@example.org"),
                            Address.parse("alice.liddell@example.org"))
    view = LdapKeyView(account_config(private_slapd, "wkd"))
    with LdapStore(directory) as store:
        app = create_app(config, store, LdapAuthenticator(directory, store),
                         secret_key=b"s" * 32)
        alice = gpg_keys["alice"]

        def post(path: str, page: str, **data: object) -> tuple[int, str]:
            answer = client.post(path, base_url=BASE, headers={"Origin": BASE},
                                 content_type="multipart/form-data",
                                 data={"csrf_token": _token(client, page), **data})
            return answer.status_code, answer.get_data(as_text=True)

        def published() -> list[str]:
            stored = store.get_key(store.user(alice_address))
            return [] if stored is None else [str(a) for a in stored.addresses]

        with app.test_client() as client:
            assert post("/sign-in", "/sign-in", address="alice@example.org",
                        password="alice-secret")[0] == 303
            assert post("/upload", "/keys", key_text=alice.gpg.export(
                alice.fingerprint, "--armor").decode())[0] == 200
            assert published() == ["alice@example.org", "alice.liddell@example.org"]
            page = f"/unpublish?address={alias}"
            assert post("/unpublish", page, address=str(alias), password="bob-secret")[0] == 401
            assert published() == ["alice@example.org", "alice.liddell@example.org"]
            status, body = post("/unpublish", page, address=str(alias), password="alice-secret")
            assert status == 200, body
            assert published() == ["alice@example.org"]
            stored = store.get_key(store.user(alice_address))
            assert stored is not None
            assert stored.provenance is not None
            assert stored.provenance.source == "self-service"
            assert stored.fingerprint.hex == alice.fingerprint
            assert view.lookup(address_slot(alice_address))
            assert view.lookup(address_slot(alias)) == []
            # A revocation certificate made by gpg for bob's key is not alice's.
            status, body = post("/revoke", "/keys", revocation_text=gen_revoke(
                gpg_keys["bob"].gpg, gpg_keys["bob"].fingerprint).decode())
            assert status == 422
            assert "this revocation is for another key" in body
            assert not store.get_key(store.user(alice_address)).revoked  # type: ignore[union-attr]
            status, body = post("/revoke", "/keys", revocation_text=gen_revoke(
                alice.gpg, alice.fingerprint).decode())
            assert status == 200, body
            stored = store.get_key(store.user(alice_address))
            assert stored is not None
            assert stored.revoked
            assert published() == ["alice@example.org"]
            # The last address: the whole key goes.
            status, body = post("/unpublish", f"/unpublish?address={alice_address}",
                                address=str(alice_address), password="alice-secret")
            assert status == 200, body
            assert published() == []
            assert view.lookup(address_slot(alice_address)) == []
    view.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get(port: int, ca: Path, path: str) -> tuple[int, dict[str, str], bytes]:
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    conn.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                    server_hostname="keys.example.org")
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", "keys.example.org")
        conn.endheaders()
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, \
            response.read()
    finally:
        conn.close()


def test_the_portal_command_serves_https(slapd: Slapd, tmp_path: Path) -> None:
    ca, cert, key = make_test_pki(tmp_path, ["keys.example.org"])
    secret = tmp_path / "portal.secret"
    secret.write_bytes(os.urandom(48))
    port = _free_port()
    milter = slapd.service_accounts["milter"]
    config = tmp_path / "milter-wkd.toml"
    config.write_text(f"""\
[directory]
uri = "{slapd.uri}"
base_dn = "{slapd.people_dn}"
bind_dn = "{milter["dn"]}"
bind_password = "{milter["password"]}"

[portal]
listen = "127.0.0.1:1"
cert_file = "{cert}"
key_file = "{key}"
secret_key_file = "{secret}"
provider_name = "Example Mail"
""", encoding="utf-8")
    log = (tmp_path / "portal.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "milter_wkd", "portal", "--config", str(config),
         "--listen", f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, (tmp_path / "portal.log").read_text()
            try:
                status, headers, body = _get(port, ca, "/sign-in")
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "portal.log").read_text()
                time.sleep(0.2)
        assert status == 200
        assert "Example Mail" in body.decode()
        assert headers["content-security-policy"].startswith("default-src 'none'")
        assert "Secure" in headers["set-cookie"]
        assert "SameSite=Strict" in headers["set-cookie"]
        assert _get(port, ca, "/keys")[0] == 303
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()
