"""The WKD responder with REAL clients over REAL HTTPS: gpg (dirmngr), gpg-wks-client, sq.

A private slapd (milter_wkd.sandbox.slapd) holds the keys, written with ldapmodify as an
administrator would; the responder (milter_wkd.sandbox.wkd, granian) listens on
127.0.0.1:443 with a test CA; every client runs inside `unshare -m` with a test hosts
file, resolv.conf and CA bundle bind-mounted (tests/support/wkd.py). Freshness checks poll
for up to FRESH_WITHIN seconds and assert the final state (no timing assertions).
"""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from milter_wkd import openpgp
from milter_wkd.sandbox.slapd import Slapd
from milter_wkd.sandbox.wkd import WKD_PORT, WkdResponder, port_443_free
from milter_wkd.values import Address
from milter_wkd.wkd import address_hash
from tests.support.gnupg import WKS_CLIENT, GnuPG
from tests.support.peers import ON_CI, require_binary
from tests.support.wkd import (
    WkdNamespace,
    remove_key,
    require_namespaces,
    write_key,
    write_raw_key,
)

pytestmark = pytest.mark.integration

FRESH_WITHIN = 15.0
ALICE = "uid=alice,ou=people,dc=example,dc=org"
BOB = "uid=bob,ou=people,dc=example,dc=org"
CAROL = "uid=carol,ou=people,dc=example,dc=org"


@dataclass
class Site:
    slapd: Slapd
    wkd: WkdResponder
    keys: dict[str, str]  # name -> fingerprint
    exports: dict[str, bytes]  # name -> binary export
    gpg: GnuPG
    tmp: Path

    def path(self, address: str, *, advanced: bool = True) -> str:
        addr = Address.parse(address)
        if advanced:
            return f"/.well-known/openpgpkey/{addr.domain}/hu/{address_hash(addr)}"
        return f"/.well-known/openpgpkey/hu/{address_hash(addr)}"

    def fetch(self, address: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        return self.wkd.get(self.path(address), method=method)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    for name in ("slapd", "slapadd", "ldapmodify", "gpg", "dirmngr", "sq", WKS_CLIENT):
        require_binary(name)
    require_namespaces()
    tmp = tmp_path_factory.mktemp("wkd")
    with GnuPG(tmp / "keys") as gpg:
        keys = {
            "alice": gpg.generate("Alice Liddell <alice@example.org>"),
            "bob": gpg.generate("Bob Baker <bob@example.org>", algo="rsa2048",
                                subkey="rsa2048"),
            "bob2": gpg.generate("Bob New <bob@example.org>"),
            "carol": gpg.generate("Carol Clark <carol@example.org>"),
            "submission": gpg.generate("key-submission@example.org"),
        }
        gpg.run("--quick-add-uid", keys["alice"], "Alice L. <alice.liddell@example.org>")
        gpg.run("--quick-add-uid", keys["alice"], "Alice <alice@elsewhere.example>")
        exports = {name: gpg.export(fpr) for name, fpr in keys.items()}
        submission = tmp / "submission.pub"
        submission.write_bytes(gpg.export(keys["submission"], "--armor"))
        slapd = Slapd(tmp / "slapd")
        slapd.start()
        try:
            write_key(slapd, ALICE, exports["alice"],
                      ["alice@example.org", "alice.liddell@example.org"])
            write_key(slapd, BOB, exports["bob"], ["bob@example.org"])
            # Another test run (or a sandbox) may hold 443 for a while: wait a little.
            until(port_443_free, within=30)
            wkd = WkdResponder(tmp / "responder", slapd, submission_public_key=submission)
            if wkd.port != WKD_PORT:
                message = "127.0.0.1:443 is taken; real WKD clients know no other port"
                if ON_CI:
                    pytest.fail(message)
                pytest.skip(message)
            wkd.start()
            try:
                yield Site(slapd, wkd, keys, exports, gpg, tmp)
            finally:
                wkd.stop()
        finally:
            slapd.close()


def until(check: Callable[[], bool], within: float = FRESH_WITHIN) -> bool:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def client_home(tmp_path: Path, name: str) -> GnuPG:
    """A fresh GNUPGHOME with a short path (gpg-agent's sockets must fit in 108 octets)."""
    return GnuPG(tmp_path / name)


def locate(site: Site, tmp_path: Path, address: str, *, direct: bool,
           ) -> tuple[int, list[list[str]], str]:
    """gpg --locate-keys by WKD only, in a fresh home inside the namespace."""
    with client_home(tmp_path, "g") as gpg:
        ns = WkdNamespace(tmp_path / f"ns-{direct}", site.wkd.ca_file, direct=direct)
        proc = ns.run([gpg.gpg, "--batch", "--auto-key-locate", "clear,nodefault,wkd",
                       "--locate-keys", address], env=gpg.env)
        listing = gpg.colons("--list-keys") if proc.returncode == 0 else []
        return proc.returncode, listing, proc.stderr.decode(errors="replace")


# -- gpg, gpg-wks-client and sq ------------------------------------------------------------

@pytest.mark.parametrize("direct", [False, True], ids=["advanced", "direct"])
@pytest.mark.parametrize(("address", "uid"), [
    ("alice@example.org", "Alice Liddell <alice@example.org>"),
    ("alice.liddell@example.org", "Alice L. <alice.liddell@example.org>"),
    ("Alice@Example.ORG", "Alice Liddell <alice@example.org>"),
])
def test_gpg_locates_the_key_with_only_the_asked_user_id(
        site: Site, tmp_path: Path, direct: bool, address: str, uid: str) -> None:
    rc, listing, stderr = locate(site, tmp_path, address, direct=direct)
    assert rc == 0, stderr
    fingerprints = [row[9] for row in listing if row[0] == "fpr"]
    assert fingerprints[0] == site.keys["alice"]
    assert [row[9] for row in listing if row[0] == "uid"] == [uid]


@pytest.mark.parametrize("direct", [False, True], ids=["advanced", "direct"])
def test_gpg_finds_nothing_for_an_unknown_address(site: Site, tmp_path: Path,
                                                  direct: bool) -> None:
    rc, listing, stderr = locate(site, tmp_path, "carol@example.org", direct=direct)
    assert rc != 0
    assert "No data" in stderr or "not found" in stderr.lower(), stderr
    assert listing == []


def test_gpg_wks_client_check_and_supported(site: Site, tmp_path: Path) -> None:
    ns = WkdNamespace(tmp_path / "ns", site.wkd.ca_file)
    with client_home(tmp_path, "w") as gpg:
        published = ns.run([WKS_CLIENT, "--check", "alice@example.org"], env=gpg.env)
        assert published.returncode == 0, published.stderr
        unknown = ns.run([WKS_CLIENT, "--check", "carol@example.org"], env=gpg.env)
        assert unknown.returncode == 1, unknown.stderr
        supported = ns.run([WKS_CLIENT, "--supported", "--with-colons", "example.org"],
                           env=gpg.env)
        assert supported.returncode == 0, supported.stderr
        fields = supported.stdout.decode().strip().split(":")
        # domain:WKD:WKS:error:protocol-version:auth-submit:mailbox-only
        assert fields[:3] == ["example.org", "1", "1"]
        assert fields[4:7] == ["3", "1", "0"]  # mailbox_only is off by default


def test_the_submission_key_is_served_like_a_users(site: Site, tmp_path: Path) -> None:
    rc, listing, stderr = locate(site, tmp_path, "key-submission@example.org", direct=False)
    assert rc == 0, stderr
    assert next(row[9] for row in listing if row[0] == "fpr") == site.keys["submission"]


def test_sq_wkd_get(site: Site, tmp_path: Path) -> None:
    ns = WkdNamespace(tmp_path / "ns", site.wkd.ca_file)
    out = tmp_path / "alias.pgp"
    proc = ns.run(["sq", "wkd", "get", "--binary", "-o", str(out),
                   "alice.liddell@example.org"])
    assert proc.returncode == 0, proc.stderr
    info = openpgp.inspect_key(out.read_bytes())
    assert info.fingerprint.hex == site.keys["alice"]
    assert info.user_ids == ("Alice L. <alice.liddell@example.org>",)


# -- HTTP details ------------------------------------------------------------------------

def test_head_cors_length_and_type(site: Site) -> None:
    status, headers, body = site.fetch("alice@example.org")
    assert status == 200
    assert headers["content-type"] == "application/octet-stream"
    assert headers["access-control-allow-origin"] == "*"
    assert int(headers["content-length"]) == len(body)
    assert "max-age=" in headers["cache-control"]
    assert body == openpgp.clean_key(site.exports["alice"],
                                     [Address.parse("alice@example.org")]).key
    status, head_headers, head_body = site.fetch("alice@example.org", method="HEAD")
    assert (status, head_body) == (200, b"")
    assert head_headers["content-length"] == headers["content-length"]


def test_policy_and_submission_address_byte_for_byte(site: Site) -> None:
    policy = (b"protocol-version: 3\nsubmission-address: key-submission@example.org\n"
              b"auth-submit\n")
    for path, host in [("/.well-known/openpgpkey/example.org/policy", None),
                       ("/.well-known/openpgpkey/policy", "example.org")]:
        status, headers, body = site.wkd.get(path, host=host)
        assert (status, body) == (200, policy)
        assert headers["access-control-allow-origin"] == "*"
    status, _, body = site.wkd.get("/.well-known/openpgpkey/submission-address",
                                   host="example.org")
    assert (status, body) == (200, b"key-submission@example.org\n")


def test_unknown_addresses_are_404(site: Site) -> None:
    for address in ("carol@example.org", "nobody@example.org", "alice@elsewhere.example"):
        assert site.fetch(address)[0] == 404
    # alice@elsewhere.example has alice's UID, but that domain is not ours.
    assert site.wkd.get(site.path("alice@elsewhere.example"), host="example.org")[0] == 404


@pytest.mark.parametrize("path", [
    "/.well-known/openpgpkey/example.org/hu/ABCDEFGHIJKLMNOPQRSTUVWXYZABCDEF",
    "/.well-known/openpgpkey/example.org/hu/../../../../etc/passwd",
    "/.well-known/openpgpkey/example.org/hu/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/.well-known/openpgpkey/example.org/hu/" + "y" * 4000,
    "/.well-known/openpgpkey/evil.example/hu/kei1q4tipxxu1yj79k9kfukdhfy631xe",
    "/.well-known/openpgpkey/example.org/hu/kei1q4tipxxu1yj79k9kfukdhfy631xe/x",
    "/../../etc/passwd",
])
def test_hostile_paths_are_4xx(site: Site, path: str) -> None:
    status, headers, _ = site.wkd.get(path)
    assert 400 <= status < 500
    assert headers.get("content-type", "").startswith("text/plain") or status != 200


def raw_request(site: Site, request: bytes) -> int:
    """Send raw bytes over TLS (SNI openpgpkey.example.org); the status code of the answer."""
    context = ssl.create_default_context(cafile=str(site.wkd.ca_file))
    with socket.create_connection(("127.0.0.1", site.wkd.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="openpgpkey.example.org") as tls:
        tls.sendall(request)
        answer = b""
        while b"\r\n" not in answer:
            chunk = tls.recv(4096)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize("host", [
    b"evil.example", b"openpgpkey.evil.example", b"example.org/../..", b"exa mple.org",
    b"a" * 600, b"example.org:443:443", b"openpgpkey.example.org\x00.evil",
])
def test_odd_hosts_are_4xx(site: Site, host: bytes) -> None:
    path = site.path("alice@example.org", advanced=False).encode()
    status = raw_request(site, b"GET " + path + b" HTTP/1.1\r\nHost: " + host
                         + b"\r\nConnection: close\r\n\r\n")
    assert 400 <= status < 500


def test_http_1_0_without_host_gets_the_advanced_path(site: Site) -> None:
    path = site.path("alice@example.org").encode()
    assert raw_request(site, b"GET " + path + b" HTTP/1.0\r\n\r\n") == 200
    direct = site.path("alice@example.org", advanced=False).encode()
    assert raw_request(site, b"GET " + direct + b" HTTP/1.0\r\n\r\n") == 400


def https_request(site: Site, path: str, *, host: str, http_10: bool = False,
                  headers: dict[str, str] | None = None,
                  ) -> tuple[int, str, dict[str, str], bytes]:
    """One request with python's http.client over real HTTPS (HTTP/1.0 as dirmngr speaks
    it, or 1.1): status, the response's HTTP version, headers (lower-case names), body."""
    context = ssl.create_default_context(cafile=str(site.wkd.ca_file))
    conn = http.client.HTTPSConnection("127.0.0.1", site.wkd.port, timeout=10,
                                       context=context)
    if http_10:
        conn._http_vsn, conn._http_vsn_str = 10, "HTTP/1.0"  # type: ignore[attr-defined]
    conn.sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", site.wkd.port), timeout=10),
        server_hostname=host.lower())
    try:
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        version = {10: "HTTP/1.0", 11: "HTTP/1.1"}.get(response.version, "?")
        return (response.status, version,
                {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


@pytest.mark.parametrize("http_10", [True, False], ids=["HTTP/1.0", "HTTP/1.1"])
def test_mixed_case_domain_length_and_revalidation_over_https(site: Site,
                                                              http_10: bool) -> None:
    """What OpenPGP.js sends (the domain as typed), dirmngr's HTTP/1.0 (Content-Length on
    every answer, the 404 too), Thunderbird's Authorization header, and a cache's ETag and
    If-None-Match, through granian and TLS."""
    alice = Address.parse("alice@example.org")
    path = f"/.well-known/openpgpkey/Example.ORG/hu/{address_hash(alice)}?l=ALICE"
    want = openpgp.clean_key(site.exports["alice"], [alice]).key
    for host in ("openpgpkey.Example.ORG", "openpgpkey.example.org"):
        status, _, headers, body = https_request(site, path, host=host, http_10=http_10)
        assert (status, body) == (200, want)
        assert headers["content-length"] == str(len(want))
        assert headers["content-type"] == "application/octet-stream"
        assert headers["access-control-allow-origin"] == "*"
        etag = headers["etag"]
        for _ in range(2):  # the second from the memo
            status, _, again, body = https_request(
                site, path, host=host, http_10=http_10,
                headers={"If-None-Match": etag, "Authorization": "Basic dXNlcjpwYXNz"})
            assert (status, body) == (304, b"")
            assert again["etag"] == etag
            assert again["access-control-allow-origin"] == "*"
            assert again.get("content-length", str(len(want))) == str(len(want))
        status, _, headers, body = https_request(site, path, host=host, http_10=http_10,
                                                 headers={"If-None-Match": '"stale"'})
        assert (status, body) == (200, want)
    nobody = address_hash(Address.parse("nobody@example.org"))
    unknown = f"/.well-known/openpgpkey/EXAMPLE.org/hu/{nobody}"
    # (granian hands WSGI the percent-decoded path: %2e%2e arrives as "..")
    for request in (unknown, "/.well-known/openpgpkey/Example.ORG/hu/x",
                    "/.well-known/openpgpkey/Example..ORG/hu/" + address_hash(alice),
                    "/.well-known/openpgpkey/Example.ORG%2f%2e%2e/hu/" + address_hash(alice)):
        status, _, headers, body = https_request(site, request, host="openpgpkey.example.org",
                                                 http_10=http_10)
        assert status in (400, 404), request
        assert headers["content-length"] == str(len(body)) != "0", request
        assert headers["content-type"].startswith("text/plain"), request
        assert headers["access-control-allow-origin"] == "*", request


# -- freshness and checking of keys written with ldapmodify ---------------------------------

def served(site: Site, address: str) -> bytes | None:
    status, _, body = site.fetch(address)
    return body if status == 200 else None


def test_a_changed_key_reaches_gpg(site: Site, tmp_path: Path) -> None:
    new = openpgp.clean_key(site.exports["bob2"], [Address.parse("bob@example.org")]).key
    write_key(site.slapd, BOB, site.exports["bob2"], ["bob@example.org"])
    assert until(lambda: served(site, "bob@example.org") == new)
    rc, listing, stderr = locate(site, tmp_path, "bob@example.org", direct=False)
    assert rc == 0, stderr
    assert next(row[9] for row in listing if row[0] == "fpr") == site.keys["bob2"]


def test_added_and_removed_keys(site: Site) -> None:
    write_key(site.slapd, CAROL, site.exports["carol"], ["carol@example.org"])
    assert until(lambda: served(site, "carol@example.org") is not None)
    remove_key(site.slapd, CAROL)
    assert until(lambda: served(site, "carol@example.org") is None)
    assert served(site, "alice@example.org") is not None


def refusals_logged(site: Site, text: str) -> int:
    log = site.wkd.log_path.read_text(errors="replace")
    return sum(1 for line in log.splitlines()
               if "not serving the key of " + CAROL in line and text in line)


@pytest.mark.parametrize(("name", "value", "reason"), [
    ("corrupt", b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nnot base64 at all\n"
                b"-----END PGP PUBLIC KEY BLOCK-----\n", ""),
    ("secret", None, "secret key material"),
    ("foreign", b"bob", "no user ID"),
])
def test_bad_keys_written_by_ldap_tools_are_not_served(
        site: Site, name: str, value: bytes | None, reason: str) -> None:
    write_key(site.slapd, CAROL, site.exports["carol"], ["carol@example.org"])
    assert until(lambda: served(site, "carol@example.org") is not None)
    if name == "secret":
        value = site.gpg.run("--export-secret-keys", "--armor", site.keys["carol"]).stdout
        write_raw_key(site.slapd, CAROL, value)
    elif name == "foreign":
        write_key(site.slapd, CAROL, site.exports["bob"], ["carol@example.org"])
    else:
        assert value is not None
        write_raw_key(site.slapd, CAROL, value)
    assert until(lambda: served(site, "carol@example.org") is None)
    assert until(lambda: refusals_logged(site, reason) >= 1)
    for _ in range(3):
        assert served(site, "carol@example.org") is None
    assert refusals_logged(site, reason) >= 1
    remove_key(site.slapd, CAROL)


def test_refusals_are_logged_once(site: Site) -> None:
    write_key(site.slapd, CAROL, site.exports["bob"], ["carol@example.org"])
    assert until(lambda: refusals_logged(site, "no user ID") >= 1)
    before = refusals_logged(site, "no user ID")
    for _ in range(5):
        assert served(site, "carol@example.org") is None
    write_key(site.slapd, ALICE, site.exports["alice"],
              ["alice@example.org", "alice.liddell@example.org"])  # an unrelated change
    assert until(lambda: served(site, "alice@example.org") is not None)
    assert served(site, "carol@example.org") is None
    assert refusals_logged(site, "no user ID") == before
    remove_key(site.slapd, CAROL)


def test_a_stopped_directory_leaves_the_memory_serving(site: Site) -> None:
    assert until(lambda: served(site, "alice@example.org") is not None)
    site.slapd.stop()
    try:
        assert served(site, "alice@example.org") is not None
        assert site.fetch("nobody@example.org")[0] in (404, 503)
    finally:
        site.slapd.start()
    assert until(lambda: served(site, "alice@example.org") is not None)


def test_a_second_responder_does_not_share_port_443(site: Site, tmp_path: Path) -> None:
    # granian binds with SO_REUSEPORT: without the port claim both would bind 443 and
    # split the connections.
    second = WkdResponder(tmp_path / "second", site.slapd)
    try:
        assert second.port != WKD_PORT
    finally:
        second.stop()
