"""A REAL browser reads the responder's answers from another origin: headless Chromium
(Debian's `chromium`) loads a page from a plain `http.server` on 127.0.0.1 (one origin),
whose script `fetch()`es WKD, HKP and VKS URLs of https://openpgpkey.example.org (another
origin: the sandbox responder over HTTPS) and writes what it could read into the DOM.

Every answer, 200, 404 and 400 alike, must be readable cross-origin (the responder's
`Access-Control-Allow-Origin: *`): the script sees the real status, the body and its
Content-Type, never the opaque TypeError a browser gives for a response without CORS.

Chromium is driven by its command line alone (`--headless=new --dump-dom`), no WebDriver.
TLS is checked for real: the test CA goes into an NSS db in a throwaway HOME
(`certutil`, libnss3-tools), which is where Chromium on Linux looks; the host name is
mapped to loopback by `--host-resolver-rules`, so /etc/hosts is never touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from milter_wkd.sandbox.daemons import LOOPBACK
from milter_wkd.sandbox.slapd import Slapd
from milter_wkd.sandbox.wkd import WKD_PORT, WkdResponder
from milter_wkd.wkd import local_part_hash
from tests.support.gnupg import GnuPG
from tests.support.peers import require_binary
from tests.support.wkd import write_key

pytestmark = pytest.mark.integration

ALICE = "uid=alice,ou=people,dc=example,dc=org"
HOST = "openpgpkey.example.org"

# The page's script: one fetch() per URL, in order; what the script could read goes into
# <pre id="results"> as JSON, and <title> says when it is done.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>running</title></head>
<body><pre id="results"></pre>
<script>
const urls = %s;
(async () => {
  const results = [];
  for (const url of urls) {
    try {
      const response = await fetch(url, {mode: "cors", cache: "no-store"});
      const body = await response.arrayBuffer();
      results.push({url, readable: true, status: response.status,
                    type: response.type, length: body.byteLength,
                    contentType: response.headers.get("content-type")});
    } catch (error) {
      results.push({url, readable: false, error: String(error)});
    }
  }
  document.getElementById("results").textContent = JSON.stringify(results);
  document.title = "done";
})();
</script></body></html>
"""


@dataclass
class Site:
    wkd: WkdResponder
    fingerprint: str

    @property
    def base(self) -> str:
        port = "" if self.wkd.port == WKD_PORT else f":{self.wkd.port}"
        return f"https://{HOST}{port}"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    for name in ("slapd", "slapadd", "ldapmodify", "gpg"):
        require_binary(name)
    tmp = tmp_path_factory.mktemp("cors")
    with GnuPG(tmp / "keys") as gpg:
        alice = gpg.generate("Alice Liddell <alice@example.org>")
        export = gpg.export(alice)
        slapd = Slapd(tmp / "slapd")
        slapd.start()
        try:
            write_key(slapd, ALICE, export, ["alice@example.org"])
            # Any port: the browser is told the port in the URL.
            wkd = WkdResponder(tmp / "responder", slapd)
            wkd.start()
            try:
                yield Site(wkd, alice)
            finally:
                wkd.stop()
        finally:
            slapd.close()


@pytest.fixture
def page_origin(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A plain HTTP server on loopback serving tmp_path/www: the page's own origin."""
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(SimpleHTTPRequestHandler, directory=str(www))
    server = ThreadingHTTPServer((LOOPBACK, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}", www
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def trusting_home(tmp_path: Path, ca_file: Path) -> Path:
    """A HOME whose NSS db (Chromium's certificate store on Linux) trusts the test CA."""
    certutil = require_binary("certutil")
    home = tmp_path / "home"
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run([certutil, "-d", f"sql:{nssdb}", "-N", "--empty-password"],
                   check=True, capture_output=True)
    subprocess.run([certutil, "-d", f"sql:{nssdb}", "-A", "-t", "C,,", "-n",
                    "milter-wkd test CA", "-i", str(ca_file)], check=True, capture_output=True)
    return home


def browse(url: str, home: Path, wkd_port: int) -> str:
    """The DOM of `url` after its scripts ran, from headless Chromium."""
    chromium = require_binary("chromium")
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache")}
    proc = subprocess.run(
        [chromium, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run",
         "--disable-dev-shm-usage", "--disable-extensions", "--disable-background-networking",
         f"--user-data-dir={home / 'profile'}",
         # The responder's host name is loopback for this browser only; no DNS, no proxy.
         f"--host-resolver-rules=MAP {HOST} {LOOPBACK}, EXCLUDE {LOOPBACK}",
         "--no-proxy-server",
         "--virtual-time-budget=20000", "--timeout=30000", "--dump-dom", url],
        env=env, capture_output=True, timeout=90, check=False)
    dom = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    assert "<title>done</title>" in dom, (
        f"the page's script did not finish (responder port {wkd_port}):\n{dom[-2000:]}\n"
        f"{proc.stderr.decode(errors='replace')[-3000:]}")
    return dom


def results_of(dom: str) -> list[dict[str, object]]:
    start = dom.index('<pre id="results">') + len('<pre id="results">')
    text = dom[start:dom.index("</pre>", start)]
    text = text.replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
    parsed: list[dict[str, object]] = json.loads(text.replace("&amp;", "&"))
    return parsed


def test_every_answer_is_readable_from_another_origin(
        site: Site, page_origin: tuple[str, Path], tmp_path: Path) -> None:
    origin, www = page_origin
    alice_hash = local_part_hash("alice")
    wkd = f"{site.base}/.well-known/openpgpkey/example.org"
    cases = [  # (URL, the status the responder gives)
        (f"{wkd}/hu/{alice_hash}?l=alice", 200),
        (f"{wkd}/policy", 200),
        (f"{wkd}/hu/{local_part_hash('nobody')}?l=nobody", 404),
        (f"{site.base}/pks/lookup?op=get&options=mr&search=alice%40example.org", 200),
        (f"{site.base}/pks/lookup?op=get&options=mr&search=0x{site.fingerprint}", 200),
        (f"{site.base}/pks/lookup?op=index&options=mr&search=alice%40example.org", 200),
        (f"{site.base}/pks/lookup?op=get&search=nobody%40example.org", 404),
        (f"{site.base}/pks/lookup?op=get&search=0x12345678", 400),
        (f"{site.base}/vks/v1/by-email/alice%40example.org", 200),
        (f"{site.base}/vks/v1/by-fingerprint/{site.fingerprint}", 200),
        (f"{site.base}/vks/v1/by-email/nobody%40example.org", 404),
        (f"{site.base}/vks/v1/by-fingerprint/0x1234", 400),
    ]
    # What a same-origin client (http.client with the test CA) gets, to compare with.
    expected = {}
    for url, status in cases:
        path = url[len(site.base):]
        got_status, headers, body = site.wkd.get(path)
        assert got_status == status, path
        assert headers["access-control-allow-origin"] == "*", path
        expected[url] = (status, len(body), headers["content-type"])
    (www / "lookups.html").write_text(PAGE % json.dumps([url for url, _ in cases]),
                                      encoding="utf-8")
    home = trusting_home(tmp_path, site.wkd.ca_file)

    results = results_of(browse(f"{origin}/lookups.html", home, site.wkd.port))

    assert [r["url"] for r in results] == [url for url, _ in cases]
    for result in results:
        url = str(result["url"])
        assert result["readable"] is True, result  # not an opaque network error
        assert result["type"] == "cors", result
        assert (result["status"], result["length"], result["contentType"]) == expected[url]
    keys = {str(r["url"]): r for r in results if r["status"] == 200}
    assert keys[cases[0][0]]["contentType"] == "application/octet-stream"
    assert keys[cases[3][0]]["contentType"] == "application/pgp-keys"

