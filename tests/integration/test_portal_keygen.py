"""Key generation in the browser (/generate, OpenPGP.js) in a REAL headless Chromium against
the sandbox (as tests/integration/test_portal_browser.py, whose sandbox, NSS-db HOME and
page helpers this module reuses): alice signs in, makes a key pair in the page, the secret
key and the revocation certificate land in the browser's download directory, then the page
publishes the public key; gpg imports the downloaded secret key with its passphrase, the
responder serves the same public key by WKD (gpg --locate-keys finds it), gpg encrypts to
the served key and decrypts with the imported one. Every request the browser sent
(Chrome's performance log: Network.requestWillBeSent with its postData) is checked for
secret key material.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from milter_wkd.portal.app import CSP, OPENPGPJS_SCRIPT, subresource_integrity
from milter_wkd.sandbox import Sandbox
from milter_wkd.sandbox.daemons import LOOPBACK
from tests.integration.test_portal_browser import (  # noqa: F401 (fixtures)
    ALICE_HU,
    Pages,
    home,
    sandbox,
    wait_served,
)
from tests.support.gnupg import GnuPG
from tests.support.peers import ON_CI, require_binary
from tests.support.wkd import WkdNamespace
from tests.unit.test_portal import (  # noqa: F401 (fixtures)
    BASE,
    app,
    auth,
    client,
    clock,
    sign_in,
    store,
)

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.integration

STATIC = Path(__file__).resolve().parents[2] / "milter_wkd" / "portal" / "static"
PASSPHRASE = "correct horse battery staple 42"
SECRET_ARMOR = "PRIVATE KEY BLOCK"


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    path = tmp_path / "downloads"
    path.mkdir()
    return path


@pytest.fixture
def browser(home: Path, tmp_path: Path, downloads: Path) -> Iterator[WebDriver]:  # noqa: F811
    """Headless Chromium that saves downloads to `downloads` without asking and keeps a
    performance log (every request, with its body)."""
    options = Options()
    options.binary_location = require_binary("chromium")
    for argument in (
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-extensions", "--disable-background-networking",
            "--no-proxy-server", "--window-size=1024,1400", "--lang=en-US",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--host-resolver-rules=MAP keys.example.org {LOOPBACK}, "
            f"MAP openpgpkey.example.org {LOOPBACK}, EXCLUDE {LOOPBACK}"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads),
        "download.prompt_for_download": False,
        "download.directory_upgrade": True,
        "safebrowsing.enabled": False,
    })
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache")}
    service = Service(executable_path=require_binary("chromedriver"), env=env,
                      log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                           {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield driver
    finally:
        driver.quit()


def sent_requests(driver: WebDriver) -> list[dict[str, Any]]:
    """The requests the browser sent since the last call (Network.requestWillBeSent)."""
    out = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            out.append(message["params"]["request"])
    return out


def request_body(request: dict[str, Any]) -> str:
    body = str(request.get("postData") or "")
    for entry in request.get("postDataEntries") or ():
        if "bytes" in entry:
            body += base64.b64decode(entry["bytes"]).decode("utf-8", "replace")
    return body


def wait_for_file(directory: Path, suffix: str, within: float = 20.0) -> Path:
    start = time.monotonic()
    while time.monotonic() - start < within:
        found = [p for p in directory.iterdir() if p.name.endswith(suffix)]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no *{suffix} in {sorted(p.name for p in directory.iterdir())}")


def packet_tags(gpg: GnuPG, data: bytes) -> set[int]:
    """The packet tags in an OpenPGP message (gpg --list-packets)."""
    out = gpg.run("--list-packets", input=data, check=False).stdout.decode(errors="replace")
    tags = set()
    for line in out.splitlines():
        if line.startswith("# off=") and " tag=" in line:
            tags.add(int(line.split(" tag=")[1].split()[0]))
    return tags


def test_only_the_generate_page_may_run_script_and_only_its_own_files(
        client: FlaskClient) -> None:  # noqa: F811
    """No browser needed: the headers and the page as the Flask app sends them."""
    assert client.get("/generate", base_url=BASE).status_code == 303  # signed out
    sign_in(client)
    answer = client.get("/generate", base_url=BASE)
    page = answer.get_data(as_text=True)
    assert answer.status_code == 200
    assert answer.headers["Content-Security-Policy"] == CSP + "; script-src 'self'"
    scripts = page.split("<script")[1:]
    assert len(scripts) == 2
    for tag in scripts:  # no inline script: a src, an integrity hash, nothing inside
        assert ' src="/static/' in tag
        assert ' integrity="sha384-' in tag
        assert tag.split(">", 1)[1].startswith("</script>")
    assert 'name="passphrase' not in page  # the passphrase fields are never submitted
    assert "https://github.com/openpgpjs/openpgpjs/tree/v6.3.2" in page
    for path in ("/keys", "/static/generate.js", f"/static/{OPENPGPJS_SCRIPT}"):
        other = client.get(path, base_url=BASE)
        assert other.headers["Content-Security-Policy"] == CSP, path
        other.close()


def test_the_page_makes_a_key_pair_gpg_uses_and_the_server_never_sees_the_secret(
        sandbox: Sandbox, browser: WebDriver, tmp_path: Path,  # noqa: F811
        downloads: Path) -> None:
    pages = Pages(browser, sandbox, tmp_path)
    pages.sign_in("alice@example.org", "alice-secret")
    browser.find_element(By.LINK_TEXT, "Create a key pair in your browser").click()
    WebDriverWait(browser, 20).until(lambda d: d.current_url == pages.url + "/generate")
    # OpenPGP.js is served with Subresource Integrity: the hash of the pinned file.
    script = browser.find_element(By.CSS_SELECTOR, f"script[src$='{OPENPGPJS_SCRIPT}']")
    assert script.get_attribute("integrity") == subresource_integrity(
        STATIC / OPENPGPJS_SCRIPT)
    assert "LGPL" in (STATIC / OPENPGPJS_SCRIPT).read_text()[:300]  # its banner kept
    # The script ran (it shows the form it hides without JavaScript).
    form = browser.find_element(By.ID, "generate-form")
    WebDriverWait(browser, 10).until(lambda _d: form.is_displayed())
    assert not browser.find_element(By.ID, "needs-script").is_displayed()
    pages.shot("generate")

    # Passphrases that differ are refused in the page.
    browser.find_element(By.ID, "name").send_keys("Alice Liddell")
    browser.find_element(By.ID, "passphrase").send_keys(PASSPHRASE)
    browser.find_element(By.ID, "passphrase-again").send_keys(PASSPHRASE + "x")
    browser.find_element(By.ID, "generate-button").click()
    status = browser.find_element(By.ID, "generate-status")
    assert status.text == "The two passphrases are not the same."
    browser.find_element(By.ID, "passphrase-again").clear()
    browser.find_element(By.ID, "passphrase-again").send_keys(PASSPHRASE)
    browser.find_element(By.ID, "generate-button").click()
    WebDriverWait(browser, 60).until(
        lambda d: d.find_element(By.ID, "generate-result").is_displayed())
    fingerprint = browser.find_element(By.ID, "generated-fingerprint").text
    assert len(fingerprint) == 40, fingerprint  # a v4 fingerprint (v6 has 64 digits)
    publish = browser.find_element(By.ID, "publish-button")
    assert not publish.is_enabled()  # not before both files are saved
    pages.shot("generated")

    browser.find_element(By.ID, "download-secret").click()
    assert not publish.is_enabled()
    browser.find_element(By.ID, "download-revocation").click()
    secret_file = wait_for_file(downloads, "-SECRET.asc")
    revocation_file = wait_for_file(downloads, "-revocation.asc")
    assert fingerprint[-16:] in secret_file.name
    WebDriverWait(browser, 10).until(lambda _d: publish.is_enabled())
    # Nothing published yet: the downloads come first.
    with GnuPG(tmp_path / "probe") as probe:
        assert wait_served(sandbox, ALICE_HU, probe, None, within=1.0) < 1.0
    before_publish = sent_requests(browser)
    pages.submit("key_text")
    text = pages.text()
    assert fingerprint in text.replace(" ", "").upper(), text
    pages.shot("generated-published")
    requests = before_publish + sent_requests(browser)

    # gpg imports the downloaded secret key with its passphrase: a v4 Ed25519 primary key
    # and a Curve25519 encryption subkey, named as asked.
    with GnuPG(tmp_path / "alice-gnupg") as gpg, GnuPG(tmp_path / "sender") as sender:
        secret = secret_file.read_bytes()
        assert b"-----BEGIN PGP PRIVATE KEY BLOCK-----" in secret
        gpg.run("--batch", "--pinentry-mode", "loopback", "--passphrase", PASSPHRASE,
                "--import", str(secret_file))
        rows = gpg.colons("--list-secret-keys", "--with-colons", fingerprint)
        assert next(r[9] for r in rows if r[0] == "fpr") == fingerprint
        assert any(r[0] == "sec" and r[3] == "22" and r[16] == "ed25519" for r in rows), rows
        assert any(r[0] == "ssb" and r[3] == "18" and r[16] == "cv25519" for r in rows), rows
        assert any(r[0] == "uid" and r[9] == "Alice Liddell <alice@example.org>"
                   for r in rows), rows
        assert "version 4," in gpg.run("--list-packets", input=secret).stdout.decode()
        revocation = revocation_file.read_bytes()
        assert packet_tags(gpg, revocation) == {2}  # a signature only, nothing secret

        # The responder serves the same public key by WKD.
        wait_served(sandbox, ALICE_HU, sender, fingerprint, within=2.0)
        status_code, _headers, served = sandbox.wkd.get(ALICE_HU)
        assert status_code == 200
        assert packet_tags(sender, served) & {5, 7} == set()
        sender.import_key(served)
        encrypted = sender.run("--batch", "--trust-model", "always", "--encrypt",
                               "--recipient", fingerprint, input=b"a note for alice").stdout
        decrypted = gpg.run("--batch", "--pinentry-mode", "loopback", "--passphrase",
                            PASSPHRASE, "--decrypt", input=encrypted).stdout
        assert decrypted == b"a note for alice"

        # gpg --locate-keys finds the same key by WKD (real clients ask port 443 only: a
        # sandbox that could not have it, beside another one, leaves this step out).
        if sandbox.wkd.port == 443:
            with GnuPG(tmp_path / "loc") as locator:
                space = WkdNamespace(tmp_path / "ns", sandbox.wkd.ca_file)
                located = space.run([locator.gpg, "--batch", "--auto-key-locate",
                                     "clear,nodefault,wkd", "--locate-keys",
                                     "alice@example.org"], env=locator.env)
                assert located.returncode == 0, located.stderr.decode(errors="replace")
                rows = locator.colons("--list-keys")
                assert next(r[9] for r in rows if r[0] == "fpr") == fingerprint
                print("\ngpg --locate-keys alice@example.org found", fingerprint)
        elif ON_CI:
            pytest.fail("port 443 was taken: gpg --locate-keys could not be run")

        # No request the page sent carries secret key material (nor the passphrase); the
        # publishing POST carried the public key, so the log did see request bodies.
        posts = [r for r in requests if r.get("method") == "POST"]
        assert [r["url"] for r in posts] == [pages.url + "/sign-in", pages.url + "/upload"]
        seen_public = False
        for request in requests:
            body = request_body(request)
            assert SECRET_ARMOR not in body, request["url"]
            assert PASSPHRASE not in body
            assert PASSPHRASE not in request["url"]
            if "-----BEGIN PGP PUBLIC KEY BLOCK-----" in body:
                seen_public = True
                start = body.index("-----BEGIN PGP PUBLIC KEY BLOCK-----")
                end = body.index("-----END PGP PUBLIC KEY BLOCK-----") + 34
                armored = body[start:end].replace("\r\n", "\n").encode()
                tags = packet_tags(gpg, armored)
                assert 6 in tags, tags  # a public key packet
                assert tags & {5, 7} == set(), tags  # and no secret (sub)key packet
        assert seen_public
    # The download came from a Blob in the page, not from the server: no request for it.
    assert not [r for r in requests if "SECRET" in r["url"] or r["url"].endswith(".asc")]
