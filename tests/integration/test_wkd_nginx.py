"""docs/nginx-wkd.conf as shipped (ports, paths and the upstream adapted, nothing else): a
private nginx terminating TLS in front of `milter-wkd web` on plain HTTP, reading a real
slapd. The answers through nginx must equal the responder's own, headers included.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from milter_wkd import files
from milter_wkd.sandbox.daemons import free_port, terminate, wait_until
from milter_wkd.sandbox.slapd import Slapd
from milter_wkd.sandbox.wkd import WkdResponder, make_test_pki
from milter_wkd.values import Address
from milter_wkd.wkd import address_hash
from tests.support.gnupg import GnuPG
from tests.support.peers import require_binary
from tests.support.wkd import write_key

pytestmark = pytest.mark.integration

DOC = files.path("docs") / "nginx-wkd.conf"
ALICE_PATH = ("/.well-known/openpgpkey/example.org/hu/"
              + address_hash(Address.parse("alice@example.org")))


@dataclass
class Proxy:
    wkd: WkdResponder
    https_port: int
    http_port: int
    ca_file: Path

    def request(self, path: str, host: str = "openpgpkey.example.org", method: str = "GET",
                ) -> tuple[int, list[tuple[str, str]], bytes]:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        conn = http.client.HTTPConnection("127.0.0.1", self.https_port, timeout=10)
        conn.sock = context.wrap_socket(
            socket.create_connection(("127.0.0.1", self.https_port), timeout=10),
            server_hostname=host if host.endswith("example.org") else "example.org")
        try:
            conn.request(method, path, headers={"Host": host})
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()


def adapted(doc: str, *, https_port: int, http_port: int, upstream: int, cert: Path,
            key: Path) -> str:
    replacements = {
        "listen 443 ssl http2;": f"listen 127.0.0.1:{https_port} ssl http2;",
        "listen [::]:443 ssl http2;": "",
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "listen [::]:80;": "",
        "server 127.0.0.1:8081;": f"server 127.0.0.1:{upstream};",
        "/etc/milter-wkd/wkd.crt": str(cert),
        "/etc/milter-wkd/wkd.key": str(key),
    }
    for old, new in replacements.items():
        assert old in doc, old
        doc = doc.replace(old, new)
    return doc


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    for name in ("nginx", "slapd", "slapadd", "ldapmodify", "gpg"):
        require_binary(name)
    tmp = tmp_path_factory.mktemp("nginx-wkd")
    with GnuPG(tmp / "g") as gpg:
        alice = gpg.export(gpg.generate("Alice <alice@example.org>"))
    slapd = Slapd(tmp / "slapd")
    slapd.start()
    wkd = WkdResponder(tmp / "responder", slapd, port=free_port(), tls=False)
    nginx: subprocess.Popen[bytes] | None = None
    try:
        write_key(slapd, "uid=alice,ou=people,dc=example,dc=org", alice, ["alice@example.org"])
        wkd.start()
        ca, cert, key = make_test_pki(tmp, ["example.org", "openpgpkey.example.org"])
        https_port, http_port = free_port(), free_port()
        prefix = tmp / "nginx"
        prefix.mkdir()
        (prefix / "site.conf").write_text(adapted(
            DOC.read_text(), https_port=https_port, http_port=http_port, upstream=wkd.port,
            cert=cert, key=key))
        (prefix / "nginx.conf").write_text(
            f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\nuser root;\n"
            "events {}\n"
            f"http {{\n  access_log off;\n  proxy_temp_path {prefix}/proxy;\n"
            f"  client_body_temp_path {prefix}/body;\n  include {prefix}/site.conf;\n}}\n")
        nginx = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                                  "-g", "daemon off;"], stdin=subprocess.DEVNULL)
        wait_until((prefix / "nginx.pid").exists, "nginx", 10, prefix / "error.log")
        yield Proxy(wkd, https_port, http_port, ca)
    finally:
        if nginx is not None:
            terminate(nginx.pid, "nginx")
            nginx.wait()
        wkd.stop()
        slapd.close()


def test_keys_pass_through_unchanged(proxy: Proxy) -> None:
    status, headers, body = proxy.request(ALICE_PATH)
    direct = proxy.wkd.get(ALICE_PATH)
    assert (status, body) == (200, direct[2])
    names = [name.lower() for name, _ in headers]
    assert names.count("access-control-allow-origin") == 1
    assert {k.lower(): v for k, v in headers}["content-type"] == "application/octet-stream"
    status, headers, body = proxy.request(
        "/.well-known/openpgpkey/hu/" + ALICE_PATH.rsplit("/", 1)[1], host="example.org")
    assert (status, body) == (200, direct[2])


def test_head_policy_and_misses(proxy: Proxy) -> None:
    status, headers, body = proxy.request(ALICE_PATH, method="HEAD")
    assert (status, body) == (200, b"")
    assert int({k.lower(): v for k, v in headers}["content-length"]) == len(
        proxy.wkd.get(ALICE_PATH)[2])
    status, _, body = proxy.request("/.well-known/openpgpkey/example.org/policy")
    assert status == 200
    assert body.endswith(b"\n")
    unknown = "/.well-known/openpgpkey/example.org/hu/" + address_hash(
        Address.parse("nobody@example.org"))
    assert proxy.request(unknown)[0] == 404
    assert proxy.request("/index.html")[0] == 404
    assert proxy.request(ALICE_PATH, method="POST")[0] in (403, 405)
    assert proxy.request(ALICE_PATH, host="evil.example")[0] == 404


def test_plain_http_redirects_to_https(proxy: Proxy) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.http_port, timeout=10)
    try:
        conn.request("GET", ALICE_PATH, headers={"Host": "openpgpkey.example.org"})
        response = conn.getresponse()
        assert response.status == 301
        assert response.getheader("Location") == "https://openpgpkey.example.org" + ALICE_PATH
    finally:
        conn.close()
