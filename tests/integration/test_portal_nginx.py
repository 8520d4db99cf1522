"""docs/nginx-wkd.conf's self-service page blocks as shipped (uncommented; listen ports,
certificate paths and the upstream port adapted, nothing else) in front of the sandbox's
page: a second `milter-wkd portal` on the sandbox's own config, with [portal] set as that
file says for nginx (plain HTTP on loopback, behind_proxy = true; here by environment
overrides), writing through the sandbox's slapd and served by its WKD responder.

Both ways the file offers: a host of its own (https://keys.example.org:PORT/) and a path on
an existing host (https://mail.example.org:PORT/keys/). Through each, a real HTTPS client
(`PortalClient`: cookies, the CSRF token parsed from the form, Origin as a browser sends
it) signs in and uploads a gpg key, which WKD then serves; the CSRF and Origin checks still
refuse what they refuse without a proxy, forged X-Forwarded-* headers from the client are
overwritten by nginx, and a client that forges X-Forwarded-For on every attempt still runs
into the per-client rate limit (the page's log names 127.0.0.1, never a forged address).
`milter-wkd check`'s portal probes pass through both.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from milter_wkd import check, files
from milter_wkd.check.portal import PortalClient, check_portal
from milter_wkd.config import load
from milter_wkd.sandbox import Sandbox
from milter_wkd.sandbox.daemons import LOOPBACK, free_port, terminate, wait_until
from milter_wkd.sandbox.wkd import make_test_pki
from milter_wkd.wkd import local_part_hash
from tests.support.gnupg import GnuPG
from tests.support.mail import sandbox_fixture  # noqa: F401 (the `sandbox` fixture)
from tests.support.peers import require_binary

pytestmark = pytest.mark.integration

DOC = files.path("docs") / "nginx-wkd.conf"
PORTAL_PROCESS = Path(sys.executable).name[:15]


def _commented(doc: str, first: str, last: str) -> str:
    """The commented block of doc from the line `first` to the next line `last`,
    uncommented (one leading '#')."""
    lines = doc.splitlines()
    start = lines.index(first)
    end = lines.index(last, start)
    return "\n".join(line[1:] for line in lines[start:end + 1]) + "\n"


def _adapt(block: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in block, old
        block = block.replace(old, new)
    return block


def host_block(*, port: int, upstream: int, cert: Path, key: Path,
               change: dict[str, str] | None = None) -> str:
    """The shipped `server` block for keys.example.org (change: more replacements, for the
    fault tests of tests/integration/test_check_portal.py)."""
    block = _commented(DOC.read_text(), "#server {", "#}")
    return _adapt(block, {
        "listen 443 ssl http2;": f"listen {LOOPBACK}:{port} ssl http2;",
        "listen [::]:443 ssl http2;": "",
        "/etc/milter-wkd/portal.crt": str(cert), "/etc/milter-wkd/portal.key": str(key),
        "proxy_pass http://127.0.0.1:8443;": f"proxy_pass http://127.0.0.1:{upstream};",
        **(change or {})})


def path_block(*, port: int, upstream: int, cert: Path, key: Path) -> str:
    """The shipped `location /keys/` block inside a server of the test's own (the existing
    host mail.example.org, which serves nothing else)."""
    location = _adapt(_commented(DOC.read_text(), "#    location /keys/ {", "#    }"), {
        "proxy_pass http://127.0.0.1:8443/;": f"proxy_pass http://127.0.0.1:{upstream}/;"})
    return (f"server {{\n    listen {LOOPBACK}:{port} ssl http2;\n"
            "    server_name mail.example.org;\n"
            f"    ssl_certificate {cert};\n    ssl_certificate_key {key};\n"
            f"    location / {{ return 404; }}\n{location}}}\n")


class Nginx:
    """A private nginx (-p/-c in its own directory, never the system's) serving `site`."""

    def __init__(self, prefix: Path, site: str) -> None:
        prefix.mkdir(parents=True)
        self.prefix = prefix
        (prefix / "site.conf").write_text(site)
        (prefix / "nginx.conf").write_text(
            f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\nuser root;\n"
            "events {}\n"
            f"http {{\n  access_log off;\n  proxy_temp_path {prefix}/proxy;\n"
            f"  client_body_temp_path {prefix}/body;\n  include /etc/nginx/mime.types;\n"
            f"  include {prefix}/site.conf;\n}}\n")
        self.process = subprocess.Popen(
            ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL)
        try:
            wait_until((prefix / "nginx.pid").exists, "nginx", 10, prefix / "error.log")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process.poll() is None:
            terminate(self.process.pid, "nginx")
        self.process.wait()


class ProxiedPortal:
    """`milter-wkd portal` on the sandbox's config, set up for nginx as docs/nginx-wkd.conf
    says: plain HTTP on 127.0.0.1:port, behind_proxy = true (environment overrides of
    [portal]; more in `overrides`, e.g. a lower rate limit)."""

    def __init__(self, sandbox: Sandbox, workdir: Path, **overrides: str) -> None:
        self.port = free_port()
        self.log_path = workdir / "portal.log"
        workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MILTER_WKD_")}
        settings = {"listen": f"{LOOPBACK}:{self.port}", "cert_file": "", "key_file": "",
                    "behind_proxy": "true", **overrides}
        env.update({f"MILTER_WKD_PORTAL_{k.upper()}": v for k, v in settings.items()})
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "milter_wkd", "-v", "portal", "--config",
                 str(sandbox.config_path)], env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(self._answers, f"milter-wkd portal on {self.port}", 30, self.log_path)
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        assert self.process.poll() is None, self.log()
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=5)
        try:
            conn.request("GET", "/sign-in")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            terminate(self.process.pid, PORTAL_PROCESS)
        self.process.wait()


@dataclass
class Proxied:
    sandbox: Sandbox
    portal: ProxiedPortal
    ca_file: Path
    cert: Path
    key: Path
    host_url: str  # the page on a host of its own
    path_url: str  # the page on a path of an existing host

    def client(self, url: str) -> PortalClient:
        return PortalClient(url, ca_file=str(self.ca_file), connect=(LOOPBACK, port_of(url)))


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, url
    return port


@pytest.fixture(scope="module")
def proxied(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    for name in ("nginx", "gpg"):
        require_binary(name)
    tmp = tmp_path_factory.mktemp("portal-nginx")
    ca, cert, key = make_test_pki(tmp, ["keys.example.org", "mail.example.org"])
    portal = ProxiedPortal(sandbox, tmp / "portal")
    nginx = None
    try:
        host_port, path_port = free_port(), free_port()
        nginx = Nginx(tmp / "nginx", host_block(port=host_port, upstream=portal.port,
                                                cert=cert, key=key)
                      + path_block(port=path_port, upstream=portal.port, cert=cert, key=key))
        yield Proxied(sandbox, portal, ca, cert, key, f"https://keys.example.org:{host_port}/",
                      f"https://mail.example.org:{path_port}/keys/")
    finally:
        if nginx is not None:
            nginx.stop()
        portal.stop()


@pytest.fixture(scope="module")
def gpg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GnuPG]:
    keys = GnuPG(tmp_path_factory.mktemp("gnupg"))
    try:
        yield keys
    finally:
        keys.close()


def served(sandbox: Sandbox, name: str, gpg: GnuPG) -> str | None:
    status, _headers, body = sandbox.wkd.get(
        f"/.well-known/openpgpkey/example.org/hu/{local_part_hash(name)}?l={name}")
    if status != 200:
        return None
    out = gpg.run("--show-keys", "--with-colons", input=body).stdout.decode()
    return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))


@pytest.mark.parametrize(("way", "name"), [("host", "alice"), ("path", "bob")])
def test_sign_in_and_upload_through_nginx(proxied: Proxied, gpg: GnuPG, way: str,
                                          name: str) -> None:
    url = proxied.host_url if way == "host" else proxied.path_url
    prefix = "/" if way == "host" else "/keys/"
    fpr = gpg.generate(f"{name.title()} <{name}@example.org>")
    armored = gpg.run("--armor", "--export", fpr).stdout.decode()
    with proxied.client(url) as client:
        signed_in = client.sign_in(f"{name}@example.org", f"{name}-secret")
        assert signed_in.status == 303, signed_in.text
        # The page's links and redirects carry the prefix nginx told it (X-Forwarded-Prefix).
        assert signed_in.headers["location"] == f"{prefix}keys"
        page = client.request("GET", "keys")
        assert page.status == 200
        assert f'action="{prefix}upload"' in page.text
        assert f"{name}@example.org" in page.text
        published = client.upload(armored)
        assert published.status == 200, published.text[:2000]
        assert fpr in published.text.replace(" ", "")
    wait_until(lambda: served(proxied.sandbox, name, gpg) == fpr, "the key by WKD", 5)
    # nginx added HSTS on the page's own host (the shipped block); on the existing host
    # that is the host's business.
    assert ("strict-transport-security" in page.headers) == (way == "host")
    dn = proxied.sandbox.slapd.users[name]["dn"]
    assert f"{name}@example.org ({dn}) signed in from {LOOPBACK}" in proxied.portal.log()


@pytest.mark.parametrize("way", ["host", "path"])
def test_csrf_and_origin_hold_behind_the_proxy(proxied: Proxied, way: str) -> None:
    url = proxied.host_url if way == "host" else proxied.path_url
    with proxied.client(url) as client:
        token = client.request("GET", "sign-in").token()
        assert token
        fields = {"address": "alice@example.org", "password": "alice-secret"}
        # No token: refused by the CSRF check.
        assert client.request("POST", "sign-in", fields=fields).status == 400
        # Another site's Origin, or none that matches what the browser is on.
        for origin in ("https://evil.example", client.origin.replace("https:", "http:"),
                       "null"):
            answer = client.request("POST", "sign-in", origin=origin,
                                    fields={"csrf_token": token, **fields})
            assert answer.status == 403, origin
        # A client's own X-Forwarded-Host/-Proto/-Prefix cannot make a foreign Origin match:
        # nginx sets them itself.
        answer = client.request(
            "POST", "sign-in", origin="https://evil.example",
            fields={"csrf_token": token, **fields},
            headers={"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https",
                     "X-Forwarded-Prefix": "/"})
        assert answer.status == 403
        # The right token and Origin: signed in (the proxy passes what it must).
        assert client.request("POST", "sign-in",
                              fields={"csrf_token": token, **fields}).status == 303
    assert "refused a POST to /sign-in from origin 'https://evil.example' (client " \
           f"{LOOPBACK})" in proxied.portal.log()


@pytest.mark.parametrize("way", ["host", "path"])
def test_check_passes_through_nginx(proxied: Proxied, way: str) -> None:
    url = proxied.host_url if way == "host" else proxied.path_url
    config = load(proxied.sandbox.config_path, environ={})
    options = check.Options(portal_url=url, portal_connect=(LOOPBACK, port_of(url)),
                            portal_ca_file=str(proxied.ca_file))
    found = list(check_portal(config, options))
    assert [r for r in found if r.ok is not True or r.warning] == []
    details = "\n".join(r.detail for r in found)
    assert f"{url}sign-in answers via" in details
    assert "a POST from another origin is refused (403)" in details
    assert "its own form's POST reaches the sign-in (401" in details
    assert ("HSTS max-age=31536000" in details) == (way == "host")
    assert "OpenPGP.js served with the SRI hash the page references" in details


def test_forged_x_forwarded_for_does_not_escape_the_rate_limit(
        sandbox: Sandbox, tmp_path: Path) -> None:
    """Each attempt claims another client address and another account; the page still
    counts them all as nginx's client, 127.0.0.1 (X-Forwarded-For $remote_addr)."""
    require_binary("nginx")
    ca, cert, key = make_test_pki(tmp_path, ["keys.example.org"])
    portal = ProxiedPortal(sandbox, tmp_path / "portal", rate_per_client="4")
    nginx = None
    try:
        port = free_port()
        nginx = Nginx(tmp_path / "nginx", host_block(port=port, upstream=portal.port,
                                                     cert=cert, key=key))
        statuses = []
        with PortalClient(f"https://keys.example.org:{port}/", ca_file=str(ca),
                          connect=(LOOPBACK, port)) as client:
            for n in range(6):
                token = client.request("GET", "sign-in").token()
                assert token
                statuses.append(client.request(
                    "POST", "sign-in",
                    fields={"csrf_token": token, "address": f"nobody{n}@example.org",
                            "password": "guess"},
                    headers={"X-Forwarded-For": f"192.0.2.{n + 1}"}).status)
        log = portal.log()
    finally:
        if nginx is not None:
            nginx.stop()
        portal.stop()
    assert statuses == [401, 401, 401, 401, 429, 429]
    assert f"rate limit for client {LOOPBACK} (account nobody4@example.org)" in log
    assert not re.search(r"192\.0\.2\.\d", log)


@pytest.mark.parametrize(("way", "name"), [("host", "carol"), ("path", "carol")])
def test_a_browser_signs_in_and_uploads_through_nginx(proxied: Proxied, gpg: GnuPG,
                                                      tmp_path: Path, way: str,
                                                      name: str) -> None:
    """Headless Chromium (HTTP/2 to nginx, as browsers speak it) trusting the test CA
    through an NSS db of its own: the sign-in form, the key file uploaded, the key page.
    Its POSTs carry the Origin with nginx's port, which the page compares with
    X-Forwarded-Host ($http_host: under HTTP/2 nginx takes it from :authority)."""
    pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By

    from tests.integration.test_portal_browser import Pages

    url = proxied.host_url if way == "host" else proxied.path_url
    user_id = f"{name.title()} <{name}@example.org>"
    try:  # one key for both ways: the second upload publishes it again
        fpr = gpg.fingerprint(user_id)
    except AssertionError:
        fpr = gpg.generate(user_id)
    key = tmp_path / f"{name}.pgp"
    key.write_bytes(gpg.export(fpr))
    with chromium(tmp_path, proxied.ca_file) as driver:
        pages = Pages(driver, proxied.sandbox, tmp_path)
        pages.url = url.rstrip("/")
        pages.sign_in(f"{name}@example.org", f"{name}-secret")
        assert driver.current_url == f"{url}keys", pages.text()
        cookie = driver.get_cookie("portal_session")
        assert cookie is not None
        assert (cookie["secure"], cookie["httpOnly"], cookie["sameSite"]) == (
            True, True, "Strict")
        pages.upload_file(key)
        assert fpr in pages.text().replace(" ", "").upper(), pages.text()
        assert driver.execute_script(
            "return performance.getEntriesByType('navigation')[0].nextHopProtocol") == "h2"
        pages.shot(f"published-through-nginx-{way}")
        pages.open("/generate")
        # The key-generation page's scripts load through nginx (their SRI hashes hold).
        ready = driver.execute_script("return typeof openpgp !== 'undefined'")
        assert ready is True
        assert driver.find_elements(By.TAG_NAME, "script")
    wait_until(lambda: served(proxied.sandbox, name, gpg) == fpr, "the key by WKD", 5)


@contextlib.contextmanager
def chromium(tmp_path: Path, ca_file: Path) -> Iterator[Any]:
    """Headless Chromium whose certificate store (an NSS db in a HOME of its own) trusts
    ca_file, with keys.example.org and mail.example.org on loopback for it alone."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    certutil = require_binary("certutil")
    home = tmp_path / "home"
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    for args in (["-N", "--empty-password"],
                 ["-A", "-t", "C,,", "-n", "nginx test CA", "-i", str(ca_file)]):
        subprocess.run([certutil, "-d", f"sql:{nssdb}", *args], check=True,
                       capture_output=True)
    options = Options()
    options.binary_location = require_binary("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--no-first-run", "--no-proxy-server",
                     "--window-size=1024,1100", "--lang=en-US",
                     f"--user-data-dir={tmp_path / 'profile'}",
                     f"--host-resolver-rules=MAP keys.example.org {LOOPBACK}, "
                     f"MAP mail.example.org {LOOPBACK}, EXCLUDE {LOOPBACK}"):
        options.add_argument(argument)
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache")}
    service = Service(executable_path=require_binary("chromedriver"), env=env,
                      log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
