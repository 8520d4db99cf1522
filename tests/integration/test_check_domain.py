"""`milter-wkd check --domain` (the public WKD checker, no config file) against the real
WKD responder (slapd + `milter-wkd web` under the sandbox's test CA, on a free loopback
port, reached with --connect): a healthy example.org passes every probe for
alice@example.org, a disabled key fails the key probe. Then one fault at a time, served by
a small HTTPS server of this file (the responder's own certificate and its healthy
answers, one thing changed: no policy file, a broken one, a wrong Content-Type, no CORS,
no Content-Length, an armored key, two keys, an expired, a revoked or another address's
key, an HTML page, Thunderbird's Authorization refused, three redirects, another CA):
each shows up as the expected FAIL or warn line with its fix."""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from milter_wkd.cli import main
from milter_wkd.sandbox.daemons import LOOPBACK, free_port
from milter_wkd.sandbox.slapd import Slapd
from milter_wkd.sandbox.wkd import WkdResponder, make_test_pki
from milter_wkd.values import Address
from milter_wkd.wkd import address_hash
from tests.support.gnupg import GnuPG
from tests.support.peers import require_binary
from tests.support.wkd import write_key

pytestmark = pytest.mark.integration

ALICE = "uid=alice,ou=people,dc=example,dc=org"
CAROL = "uid=carol,ou=people,dc=example,dc=org"
DOMAIN = "example.org"
LINE = re.compile(r"(ok  |warn|skip|FAIL) ([a-z]+): (.*)")

Route = tuple[int, dict[str, str], bytes]


@dataclass
class Site:
    wkd: WkdResponder
    keys: dict[str, bytes]  # name -> binary export
    healthy: dict[str, Route]  # path -> the responder's answer
    tmp: Path


def _paths(address: str) -> list[str]:
    addr = Address.parse(address)
    return [f"/.well-known/openpgpkey/{DOMAIN}/hu/{address_hash(addr)}",
            f"/.well-known/openpgpkey/hu/{address_hash(addr)}"]


FILES = [f"/.well-known/openpgpkey/{DOMAIN}/policy", "/.well-known/openpgpkey/policy",
         f"/.well-known/openpgpkey/{DOMAIN}/submission-address",
         "/.well-known/openpgpkey/submission-address"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    for name in ("slapd", "slapadd", "ldapmodify", "gpg"):
        require_binary(name)
    tmp = tmp_path_factory.mktemp("domain")
    with GnuPG(tmp / "keys") as gpg:
        fprs = {"alice": gpg.generate("Alice Liddell <alice@example.org>"),
                "alice2": gpg.generate("Alice New <alice@example.org>"),
                "carol": gpg.generate("Carol Clark <carol@example.org>"),
                "submission": gpg.generate("key-submission@example.org")}
        # A key that expired at the end of 2020 (made with the clock set back).
        gpg.run("--faked-system-time", "20200101T000000!", "--quick-gen-key",
                "Alice Old <alice@example.org>", "ed25519", "cert", "1y")
        old = gpg.fingerprint("Alice Old")
        gpg.run("--faked-system-time", "20200101T000000!", "--quick-add-key", old, "cv25519",
                "encr", "1y")
        # A revoked key: gpg's own revocation certificate, imported.
        revoked = gpg.generate("Alice Revoked <alice@example.org>")
        certificate = (gpg.home / "openpgp-revocs.d" / f"{revoked}.rev").read_bytes()
        gpg.import_key(certificate.replace(b":-----BEGIN", b"-----BEGIN"))
        keys = {name: gpg.export(fpr) for name, fpr in fprs.items()}
        keys["expired"] = gpg.export(old)
        keys["revoked"] = gpg.export(revoked)
        submission = tmp / "submission.pub"
        submission.write_bytes(gpg.export(fprs["submission"], "--armor"))
    slapd = Slapd(tmp / "slapd")
    slapd.start()
    try:
        write_key(slapd, ALICE, keys["alice"], ["alice@example.org"])
        write_key(slapd, CAROL, keys["carol"], ["carol@example.org"])
        slapd.ldapmodify(f"dn: {CAROL}\nchangetype: modify\n"
                         "replace: pgpDisabled\npgpDisabled: 1\n-\n")
        wkd = WkdResponder(tmp / "responder", slapd, port=free_port(),
                           submission_public_key=submission)
        with wkd:
            healthy: dict[str, Route] = {}
            for path in [*FILES, *_paths("alice@example.org"),
                         *_paths("key-submission@example.org")]:
                direct = not path.startswith(f"/.well-known/openpgpkey/{DOMAIN}/")
                status, headers, body = wkd.get(path, host=DOMAIN if direct else None)
                assert status == 200, path
                healthy[path] = (status, headers, body)
            yield Site(wkd, keys, healthy, tmp)
    finally:
        slapd.close()


def check(site: Site, capsys: pytest.CaptureFixture[str], port: int, *more: str,
          address: str = "alice@example.org") -> tuple[int, list[tuple[str, str, str]], str]:
    code = main(["check", "--domain", DOMAIN, "--address", address, "--connect",
                 f"{LOOPBACK}:{port}", "--ca-file", str(site.wkd.ca_file), "--timeout", "5",
                 *more])
    out = capsys.readouterr().out
    lines = [LINE.match(line) for line in out.splitlines()]
    return code, [(m.group(1).strip(), m.group(2), m.group(3)) for m in lines if m], out


def test_a_healthy_domain_passes_every_probe(site: Site,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, out = check(site, capsys, site.wkd.port)
    print(out)
    assert code == 0, out
    assert not [line for line in lines if line[0] in ("FAIL", "warn")], out
    assert ("skip", "dns", f"skipped (--connect given): openpgpkey.{DOMAIN} and {DOMAIN} "
            f"reached at {LOOPBACK}:{site.wkd.port}") in lines
    passed = {name for label, name, _ in lines if label == "ok"}
    assert passed == {"tls", "policy", "submission", "key", "hkp", "vks"}, out
    details = [detail for label, name, detail in lines if name == "key"]
    assert any(d.startswith("advanced https://openpgpkey.example.org/") for d in details)
    assert any(d.startswith("direct https://example.org/") for d in details)
    assert sum("Authorization: Basic" in d for d in details) == 2
    assert "submission address key-submission@example.org" in out
    assert re.search(r"\d+ ok, 0 warnings, 0 failed, 1 skipped$", out), out


def test_json_for_monitoring(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, out = check(site, capsys, site.wkd.port, "--json")
    report = json.loads(out)
    assert code == 0
    assert report["ok"] is True
    assert report["counts"]["fail"] == 0
    assert report["address"] == "alice@example.org"
    assert {r["probe"] for r in report["results"]} >= {"dns", "tls", "policy", "key"}


def test_a_disabled_key_fails_the_key_probe(site: Site,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, out = check(site, capsys, site.wkd.port, address="carol@example.org")
    assert code == 1, out
    failed = [detail for label, name, detail in lines if label == "FAIL" and name == "key"]
    assert len(failed) == 2, out  # advanced and direct
    assert all(d.endswith("answered 404") for d in failed), out
    assert "fix: publish the key of carol@example.org" in out


# -- one fault at a time, from a server of our own -------------------------------------------

@dataclass
class FaultServer:
    routes: dict[str, Route]
    port: int = 0
    auth_status: int | None = None  # answer this to requests with Authorization
    seen: list[str] = field(default_factory=list)


def _handler(server: FaultServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            server.seen.append(self.path)
            status, headers, body = server.routes.get(path, (404, {}, b"not found\n"))
            if server.auth_status and self.headers.get("Authorization"):
                status, headers, body = server.auth_status, {}, b"who are you?\n"
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@contextlib.contextmanager
def serving(site: Site, routes: dict[str, Route], auth_status: int | None = None,
            ) -> Iterator[FaultServer]:
    fault = FaultServer(routes, auth_status=auth_status)
    httpd = http.server.ThreadingHTTPServer((LOOPBACK, 0), _handler(fault))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(site.wkd.workdir / "wkd.crt", site.wkd.workdir / "wkd.key")
    httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    fault.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield fault
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _served(body: bytes, **headers: str) -> Route:
    base = {"Content-Type": "application/octet-stream", "Access-Control-Allow-Origin": "*",
            "Content-Length": str(len(body))}
    base.update({k.replace("_", "-"): v for k, v in headers.items()})
    return 200, {k: v for k, v in base.items() if v}, body


def routes_with(site: Site, **changes: Route | None) -> dict[str, Route]:
    """The responder's healthy answers, re-served with our headers; `changes` per kind:
    policy, alice (both methods each)."""
    routes: dict[str, Route] = {}
    for path, (_, headers, body) in site.healthy.items():
        routes[path] = _served(body, Content_Type=headers.get("content-type", ""))
    kinds = {"policy": [p for p in FILES if p.endswith("/policy")],
             "alice": _paths("alice@example.org")}
    for kind, route in changes.items():
        for path in kinds[kind]:
            if route is None:
                del routes[path]
            else:
                routes[path] = route
    return routes


def test_the_fault_server_itself_is_healthy(site: Site,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with serving(site, routes_with(site)) as server:
        code, lines, out = check(site, capsys, server.port)
    assert code == 0, out
    assert not [line for line in lines if line[0] in ("FAIL", "warn")], out
    assert any("l=alice" in seen for seen in server.seen)
    # Nothing offers HKP or VKS here: info only.
    assert ("ok", "hkp", "openpgpkey.example.org: not offered or no key (404): info only"
            ) in lines


def _armored(site: Site) -> bytes:
    from milter_wkd.openpgp import armor_key
    return armor_key(site.keys["alice"])


FAULTS: dict[str, tuple[dict[str, Route | None], str, str, str, str]] = {
    # name: (changes, label, probe, detail contains, fix contains)
    "no policy file": ({"policy": None}, "FAIL", "policy", "answered 404",
                       "serve a policy file"),
    "policy without final LF": ({"policy": _served(b"mailbox-only\nprotocol-version: 3")},
                                "FAIL", "policy", "does not end in LF", "lines end in LF"),
    "policy with CRLF": ({"policy": _served(b"protocol-version: 3\r\n")}, "FAIL", "policy",
                         "CR characters", "lines end in LF"),
    "wrong content type": ({"alice": None}, "warn", "key", "Content-Type is text/plain",
                           "application/octet-stream"),
    "no CORS": ({"alice": None}, "FAIL", "key", "no `Access-Control-Allow-Origin: *`",
                "Access-Control-Allow-Origin: *"),
    "no Content-Length": ({"alice": None}, "warn", "key", "no Content-Length",
                          "Content-Length"),
    "armored key": ({"alice": None}, "FAIL", "key", "ASCII-armored", "without --armor"),
    "two keys": ({"alice": None}, "warn", "key", "2 usable keys in one answer",
                 "one current key per address"),
    "expired key": ({"alice": None}, "FAIL", "key", "expired on 2020-12-", "--quick-set-expire"),
    "revoked key": ({"alice": None}, "FAIL", "key", "is revoked", "publish the current key"),
    "key of another address": ({"alice": None}, "FAIL", "key",
                               "has no valid user ID for alice@example.org",
                               "--quick-add-uid"),
    "html page": ({"alice": None}, "FAIL", "key", "text/html", "application/octet-stream"),
}


def _key_route(site: Site, fault: str) -> Route:
    alice = site.keys["alice"]
    return {
        "wrong content type": _served(alice, Content_Type="text/plain"),
        "no CORS": _served(alice, Access_Control_Allow_Origin=""),
        "no Content-Length": _served(alice, Content_Length=""),
        "armored key": _served(_armored(site)),
        "two keys": _served(alice + site.keys["alice2"]),
        "expired key": _served(site.keys["expired"]),
        "revoked key": _served(site.keys["revoked"]),
        "key of another address": _served(site.keys["carol"]),
        "html page": _served(b"<html>not here</html>", Content_Type="text/html"),
    }[fault]


@pytest.mark.parametrize("fault", list(FAULTS))
def test_one_fault_at_a_time(site: Site, capsys: pytest.CaptureFixture[str],
                             fault: str) -> None:
    changes, label, probe, detail, fix = FAULTS[fault]
    if "alice" in changes:
        changes = {"alice": _key_route(site, fault)}
    with serving(site, routes_with(site, **changes)) as server:
        code, lines, out = check(site, capsys, server.port)
    hits = [line for line in lines if line[:2] == (label, probe) and detail in line[2]]
    assert len(hits) == 2, out  # the advanced and the direct method
    assert f"fix: {fix}" in out or re.search(rf"fix: .*{re.escape(fix)}", out), out
    assert code == (1 if label == "FAIL" else 0), out
    # The fault is the only thing reported (an HTML page is no OpenPGP data either).
    assert not [line for line in lines if line[0] in ("FAIL", "warn") and line not in hits
                and not (fault == "html page" and "not OpenPGP data" in line[2])], out


def test_an_expired_old_key_beside_the_current_one_is_fine(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    """What the draft allows for (a revoked or expired old key kept for a while)."""
    routes = routes_with(site, alice=_served(site.keys["expired"] + site.keys["alice"]))
    with serving(site, routes) as server:
        code, lines, out = check(site, capsys, server.port)
    assert code == 0, out
    assert not [line for line in lines if line[0] in ("FAIL", "warn")], out
    assert out.count("beside 1 unusable one(s)") == 2, out


def test_thunderbird_authorization_header(site: Site,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with serving(site, routes_with(site), auth_status=401) as server:
        code, lines, out = check(site, capsys, server.port)
    assert code == 1, out
    failed = [d for label, name, d in lines if label == "FAIL" and name == "key"]
    assert len(failed) == 2, out
    assert all("with `Authorization: Basic` (Thunderbird sends one) the answer differs: 401"
               in d for d in failed), out
    assert "fix: ignore the Authorization header" in out


def test_three_redirects_are_one_too_many(site: Site,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    routes = routes_with(site)
    for path in _paths("alice@example.org"):
        body = routes[path]
        routes[path] = (302, {"Location": path + "/1"}, b"")
        routes[path + "/1"] = (302, {"Location": path + "/2"}, b"")
        routes[path + "/2"] = (302, {"Location": path + "/3"}, b"")
        routes[path + "/3"] = body
    with serving(site, routes) as server:
        code, lines, out = check(site, capsys, server.port)
    assert code == 1, out
    assert len([d for label, name, d in lines
                if (label, name) == ("FAIL", "key") and "more than 2 redirects (dirmngr gives "
                "up after 2)" in d]) == 2, out
    # Two are followed, with a warning.
    for path in _paths("alice@example.org"):
        routes[path + "/2"] = body
    with serving(site, routes) as server:
        code, lines, out = check(site, capsys, server.port)
    assert code == 0, out
    assert len([d for label, name, d in lines
                if (label, name) == ("warn", "key") and "2 redirect(s)" in d]) == 2, out


def test_a_certificate_from_another_ca(site: Site, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    other_ca, _, _ = make_test_pki(tmp_path, ["example.org"])
    code = main(["check", "--domain", DOMAIN, "--connect", f"{LOOPBACK}:{site.wkd.port}",
                 "--ca-file", str(other_ca)])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "FAIL tls: advanced openpgpkey.example.org: certificate not valid: " in out
    assert "remove the DNS record of openpgpkey.example.org so that clients use" in out
    assert "skip key: no --address given" in out
