"""The self-service page in a REAL browser: headless Chromium (Debian's `chromium`, driven by
Selenium through Debian's `chromedriver`) against the sandbox's real slapd, milter, WKD
responder and `milter-wkd portal` (milter_wkd.sandbox.portal, https://keys.example.org:PORT/).

TLS is checked for real: the sandbox's test CAs (the portal's and the responder's) go into
an NSS db in a throwaway HOME (as tests/integration/test_browser_cors.py does), and
keys.example.org and openpgpkey.example.org resolve to loopback for this browser only
(`--host-resolver-rules`). Form fields are found by their names (`address`, `password`),
as password managers find them. Every page the tests reach is saved as a screenshot under
the test's tmp dir; the key page's is copied to docs/portal-keys.png when
MILTER_WKD_SCREENSHOTS=1 (how README's picture is made).

WKD is checked through the responder itself (`WkdResponder.get`: HTTPS to loopback with
the openpgpkey host name and the test CA), not by gpg --locate-keys, which needs port 443
and the CA in the system bundle (tests/integration/test_wkd_clients.py does that).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from milter_wkd.sandbox import Sandbox
from milter_wkd.sandbox.daemons import LOOPBACK
from milter_wkd.wkd import local_part_hash
from tests.integration.conftest import UserKey
from tests.integration.test_portal import gen_revoke
from tests.support.gnupg import GnuPG
from tests.support.peers import require_binary

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WRONG = "The address or the password is wrong."
ALICE_HU = f"/.well-known/openpgpkey/example.org/hu/{local_part_hash('alice')}?l=alice"
BOB_HU = f"/.well-known/openpgpkey/example.org/hu/{local_part_hash('bob')}?l=bob"
ALIAS = "alice.liddell@example.org"
ALIAS_HU = (f"/.well-known/openpgpkey/example.org/hu/{local_part_hash('alice.liddell')}"
            "?l=alice.liddell")


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    for name in ("slapd", "postfix", "dovecot", "gpg", "chromium", "chromedriver",
                 "certutil"):
        require_binary(name)
    with Sandbox() as running:
        yield running


@pytest.fixture(scope="module")
def home(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HOME whose NSS db (Chromium's certificate store on Linux) trusts the test CAs."""
    certutil = require_binary("certutil")
    home = tmp_path_factory.mktemp("browser-home")
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run([certutil, "-d", f"sql:{nssdb}", "-N", "--empty-password"],
                   check=True, capture_output=True)
    for name, ca in (("portal", sandbox.portal.ca_file), ("wkd", sandbox.wkd.ca_file)):
        subprocess.run([certutil, "-d", f"sql:{nssdb}", "-A", "-t", "C,,", "-n",
                        f"milter-wkd sandbox {name} CA", "-i", str(ca)],
                       check=True, capture_output=True)
    return home


@pytest.fixture
def browser(home: Path, tmp_path: Path) -> Iterator[WebDriver]:
    """A fresh headless Chromium (own profile: no cookies of another test)."""
    options = Options()
    options.binary_location = require_binary("chromium")
    for argument in (
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-extensions", "--disable-background-networking",
            "--no-proxy-server", "--window-size=1024,1100", "--lang=en-US",
            f"--user-data-dir={tmp_path / 'profile'}",
            # The page's and the responder's host names are loopback for this browser only.
            f"--host-resolver-rules=MAP keys.example.org {LOOPBACK}, "
            f"MAP openpgpkey.example.org {LOOPBACK}, EXCLUDE {LOOPBACK}"):
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


class Pages:
    """The page as a user sees it in `driver`; screenshots numbered in tmp_path/shots."""

    def __init__(self, driver: WebDriver, sandbox: Sandbox, tmp_path: Path) -> None:
        self.driver = driver
        self.url = sandbox.portal.portal_url.rstrip("/")
        self.shots = tmp_path / "shots"
        self.shots.mkdir(exist_ok=True)
        self.count = 0

    def open(self, path: str) -> None:
        self.driver.get(self.url + path)

    def text(self) -> str:
        return str(self.driver.find_element(By.TAG_NAME, "body").text)

    def shot(self, name: str) -> Path:
        self.count += 1
        path = self.shots / f"{self.count:02d}-{name}.png"
        assert self.driver.save_screenshot(str(path)), path
        return path

    def submit(self, form_field: str) -> None:
        """Press the submit button of the form holding the field named form_field."""
        form = self.driver.find_element(By.NAME, form_field).find_element(By.XPATH,
                                                                          "ancestor::form")
        old = self.driver.find_element(By.TAG_NAME, "html")
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(self.driver, 20).until(lambda _driver: _stale(old))

    def sign_in(self, address: str, password: str, *, bypass_required: bool = False) -> None:
        self.open("/sign-in")
        self.driver.find_element(By.NAME, "address").send_keys(address)
        field = self.driver.find_element(By.NAME, "password")
        if password:
            field.send_keys(password)
        if bypass_required:  # the browser would not send an empty required field
            self.driver.execute_script(
                "arguments[0].removeAttribute('required'); arguments[0].form.noValidate = true;",
                field)
        self.submit("password")

    def upload_file(self, path: Path) -> None:
        self.open("/keys")
        self.driver.find_element(By.NAME, "key_file").send_keys(str(path))
        self.submit("key_file")

    def unpublish(self, password: str) -> None:
        self.open("/keys")
        self.driver.find_element(By.LINK_TEXT, "Stop publishing this key").click()
        self.driver.find_element(By.NAME, "password").send_keys(password)
        self.submit("password")


def _stale(element: WebElement) -> bool:
    """The element belongs to a page the browser has left (the next one has loaded)."""
    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as exc:
        # Chromium says so in other words while the old document is being replaced.
        if "does not belong to the document" in str(exc):
            return True
        raise
    return False


def served_fingerprint(sandbox: Sandbox, path: str, gpg: GnuPG) -> str | None:
    """The fingerprint of the key WKD serves at path; None on 404."""
    status, _headers, body = sandbox.wkd.get(path)
    if status == 404:
        return None
    assert status == 200, (status, body[:200])
    out = gpg.run("--show-keys", "--with-colons", input=body).stdout.decode()
    return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))


def wait_served(sandbox: Sandbox, path: str, gpg: GnuPG, expected: str | None,
                within: float) -> float:
    """Seconds until WKD serves `expected` at path (None: 404); fails after `within`."""
    start = time.monotonic()
    while True:
        got = served_fingerprint(sandbox, path, gpg)
        elapsed = time.monotonic() - start
        if got == expected:
            return elapsed
        assert elapsed < within, f"WKD still serves {got} at {path} after {elapsed:.2f} s"
        time.sleep(0.02)


def key_file(tmp_path: Path, key: UserKey, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(key.data)  # the binary export, as `gpg --export` makes it
    return path


def ensure_alice_published(sandbox: Sandbox, driver: WebDriver, tmp_path: Path,
                           alice: UserKey) -> Pages:
    pages = Pages(driver, sandbox, tmp_path)
    pages.sign_in("alice@example.org", "alice-secret")
    if served_fingerprint(sandbox, ALICE_HU, alice.gpg) != alice.fingerprint:
        pages.upload_file(key_file(tmp_path, alice, "alice.pgp"))
        assert "Key published" in pages.text() or alice.fingerprint in pages.text()
        wait_served(sandbox, ALICE_HU, alice.gpg, alice.fingerprint, within=2.0)
    return pages


def test_sign_in_upload_see_fetch_by_wkd_and_unpublish(
        sandbox: Sandbox, browser: WebDriver, tmp_path: Path,
        gpg_keys: dict[str, UserKey]) -> None:
    alice = gpg_keys["alice"]
    pages = Pages(browser, sandbox, tmp_path)
    pages.open("/")
    assert browser.current_url == pages.url + "/sign-in"
    assert browser.find_element(By.NAME, "address").get_attribute("autocomplete") == "username"
    assert browser.find_element(By.NAME, "password").get_attribute(
        "autocomplete") == "current-password"
    pages.shot("sign-in")

    pages.sign_in("alice@example.org", "alice-secret")
    assert browser.current_url == pages.url + "/keys"
    cookie = browser.get_cookie("portal_session")
    assert cookie is not None
    assert (cookie["secure"], cookie["httpOnly"], cookie["sameSite"]) == (True, True, "Strict")
    if served_fingerprint(sandbox, ALICE_HU, alice.gpg) is not None:  # from a rerun
        pages.unpublish("alice-secret")
    pages.open("/keys")
    assert "You have no published key" in pages.text()
    pages.shot("keys-empty")

    pages.upload_file(key_file(tmp_path, alice, "alice.pgp"))
    text = pages.text()
    assert alice.fingerprint in text.replace(" ", "").upper(), text
    pages.shot("published")
    # The responder (reading the same slapd) serves it at once.
    assert wait_served(sandbox, ALICE_HU, alice.gpg, alice.fingerprint, within=2.0) < 2.0

    pages.open("/keys")
    text = pages.text()
    assert alice.fingerprint.lower() in text.replace(" ", "").lower(), text
    assert "alice@example.org" in text
    assert "alice.liddell@example.org" in text
    assert "/.well-known/openpgpkey/example.org/hu/" in text
    assert "on this page" in text  # the provenance: self-service
    keys_shot = pages.shot("keys")
    if os.environ.get("MILTER_WKD_SCREENSHOTS") == "1":
        shutil.copyfile(keys_shot, REPO / "docs" / "portal-keys.png")

    browser.find_element(By.LINK_TEXT, "Stop publishing this key").click()
    pages.shot("unpublish")
    browser.find_element(By.NAME, "password").send_keys("alice-secret")
    pages.submit("password")
    # From the moment the answer page is there, WKD answers 404 within a second.
    waited = wait_served(sandbox, ALICE_HU, alice.gpg, None, within=1.0)
    assert waited < 1.0
    assert "Your key is no longer published" in pages.text(), pages.text()
    assert "alice-secret" not in browser.page_source
    pages.shot("unpublished")
    pages.open("/keys")
    assert "You have no published key" in pages.text()


def test_wrong_unknown_and_empty_password_get_the_same_refusal(
        sandbox: Sandbox, browser: WebDriver, tmp_path: Path) -> None:
    pages = Pages(browser, sandbox, tmp_path)
    seen = {}
    for name, address, password in (
            ("wrong", "alice@example.org", "not-alices-password"),
            ("unknown", "nobody@example.org", "alice-secret"),
            ("empty", "alice@example.org", "")):
        pages.sign_in(address, password, bypass_required=not password)
        assert browser.current_url == pages.url + "/sign-in", name
        assert browser.get_cookie("portal_session") is None or "dn" not in str(
            browser.get_cookie("portal_session"))
        alert = browser.find_element(By.CSS_SELECTOR, "[role=alert]").text
        seen[name] = alert
        pages.shot(f"refused-{name}")
        # Still signed out: /keys sends back to the sign-in page.
        pages.open("/keys")
        assert browser.current_url == pages.url + "/sign-in", name
    assert seen == {"wrong": WRONG, "unknown": WRONG, "empty": WRONG}
    log = sandbox.portal.log_path.read_text(encoding="utf-8", errors="replace")
    assert "failed sign-in as 'alice@example.org'" in log
    assert "failed sign-in as 'nobody@example.org'" in log


@pytest.fixture
def other_origin(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A plain HTTP server on loopback serving tmp_path/www: another site's origin."""
    www = tmp_path / "www"
    www.mkdir()
    server = ThreadingHTTPServer((LOOPBACK, 0), partial(SimpleHTTPRequestHandler,
                                                        directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}", www
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# Another site's page: a form to the portal that submits itself on load.
ATTACK = """<!doctype html>
<html><head><meta charset="utf-8"><title>win a prize</title></head>
<body><form id="f" method="post" action="%(action)s" enctype="%(enctype)s">
%(fields)s
</form>
<script>document.getElementById("f").submit();</script></body></html>
"""


def test_a_form_post_from_another_origin_is_refused_and_writes_nothing(
        sandbox: Sandbox, browser: WebDriver, tmp_path: Path,
        other_origin: tuple[str, Path], gpg_keys: dict[str, UserKey]) -> None:
    alice, alice2 = gpg_keys["alice"], gpg_keys["alice2"]
    pages = ensure_alice_published(sandbox, browser, tmp_path, alice)
    origin, www = other_origin
    armored = alice2.gpg.export(alice2.fingerprint, "--armor").decode()
    attacks = {
        "unpublish": ("unpublish", "application/x-www-form-urlencoded",
                      '<input name="password" value="alice-secret">'),
        "upload": ("upload", "multipart/form-data",
                   f'<textarea name="key_text">{armored}</textarea>'),
        "sign-in": ("sign-in", "application/x-www-form-urlencoded",
                    '<input name="address" value="alice@example.org">'
                    '<input name="password" value="alice-secret">'),
    }
    for name, (path, enctype, fields) in attacks.items():
        (www / f"{name}.html").write_text(ATTACK % {
            "action": f"{pages.url}/{path}", "enctype": enctype, "fields": fields},
            encoding="utf-8")
        before = sandbox.portal.log_path.stat().st_size
        browser.get(f"{origin}/{name}.html")
        WebDriverWait(browser, 20).until(
            lambda driver: driver.current_url.startswith(pages.url))
        WebDriverWait(browser, 20).until(
            lambda driver: "did not come from this page" in driver.find_element(
                By.TAG_NAME, "body").text)
        assert browser.title.startswith("403"), browser.title
        pages.shot(f"cross-origin-{name}")
        log = sandbox.portal.log_path.read_bytes()[before:].decode(errors="replace")
        assert f"refused a POST to /{path} from origin '{origin}'" in log, log
    # Nothing changed: alice's first key is still the one served, and she is still signed
    # in with the session she had (no cross-site sign-in replaced it).
    assert served_fingerprint(sandbox, ALICE_HU, alice.gpg) == alice.fingerprint
    pages.open("/keys")
    assert browser.current_url == pages.url + "/keys"
    assert alice.fingerprint.lower() in pages.text().replace(" ", "").lower()


def test_bobs_session_cannot_touch_alices_key(
        sandbox: Sandbox, browser: WebDriver, tmp_path: Path,
        gpg_keys: dict[str, UserKey]) -> None:
    alice = gpg_keys["alice"]
    ensure_alice_published(sandbox, browser, tmp_path, alice)
    browser.delete_all_cookies()  # alice's session ends; bob signs in in this browser
    pages = Pages(browser, sandbox, tmp_path)
    pages.sign_in("bob@example.org", "bob-secret")
    assert browser.current_url == pages.url + "/keys"
    text = pages.text()
    assert "bob@example.org" in text
    assert "alice" not in text.lower()
    assert alice.fingerprint.lower() not in text.replace(" ", "").lower()
    pages.shot("bob-keys")

    # Alice's key uploaded in bob's session names none of bob's addresses: refused.
    pages.upload_file(key_file(tmp_path, alice, "alice.pgp"))
    text = pages.text()
    assert "The key was not published" in text, text
    assert "Nothing was changed" in text
    pages.shot("bob-upload-alices-key")
    assert served_fingerprint(sandbox, BOB_HU, alice.gpg) is None

    # Unpublishing in bob's session, confirmed with alice's password: refused; with his
    # own: it touches only his entry (he has no key). The page offers no form for a user
    # without a key, so the test builds one (with the session's CSRF token).
    pages.open("/unpublish")
    assert "You have no published key" in pages.text()
    for password, logged in (("alice-secret", "wrong password to unpublish the key of "
                                              "bob@example.org"),
                             ("bob-secret", None)):
        before = sandbox.portal.log_path.stat().st_size
        post_form(browser, "/unpublish", {"csrf_token": _csrf(browser), "password": password})
        assert "You have no published key" in pages.text(), pages.text()
        log = sandbox.portal.log_path.read_bytes()[before:].decode(errors="replace")
        assert logged is None or logged in log, log
        assert "unpublished" not in log, log
        pages.shot(f"bob-unpublish-{password}")
        assert served_fingerprint(sandbox, ALICE_HU, alice.gpg) == alice.fingerprint


def post_form(driver: WebDriver, action: str, fields: dict[str, str]) -> None:
    """Submit a form the page does not offer, from the page itself (same origin); returns
    when the answer has replaced the page."""
    old = driver.find_element(By.TAG_NAME, "html")
    driver.execute_script(
        "const f = document.createElement('form'); f.method = 'post'; f.action = arguments[0];"
        "for (const [name, value] of Object.entries(arguments[1])) {"
        "  const i = document.createElement('input'); i.name = name; i.value = value;"
        "  f.append(i); }"
        "document.body.append(f); f.submit();", action, fields)
    WebDriverWait(driver, 20).until(lambda _driver: _stale(old))


def _csrf(driver: WebDriver) -> str:
    value = driver.find_element(By.NAME, "csrf_token").get_attribute("value")
    assert value
    return str(value)


def ensure_both_published(sandbox: Sandbox, driver: WebDriver, tmp_path: Path,
                          alice: UserKey) -> Pages:
    """Alice signed in, her key served for her address and her alias (uploading it again
    merges the alias's user ID back when an earlier test unpublished it)."""
    pages = ensure_alice_published(sandbox, driver, tmp_path, alice)
    if served_fingerprint(sandbox, ALIAS_HU, alice.gpg) != alice.fingerprint:
        pages.upload_file(key_file(tmp_path, alice, "alice.pgp"))
        wait_served(sandbox, ALIAS_HU, alice.gpg, alice.fingerprint, within=2.0)
    return pages


def open_unpublish_address(pages: Pages, address: str) -> None:
    """The key page's "Unpublish this address" link of address's row."""
    pages.open("/keys")
    link = pages.driver.find_element(
        By.XPATH, f"//tr[td[1][normalize-space()='{address}']]"
                  "//a[contains(normalize-space(), 'Unpublish this address')]")
    link.click()


def test_unpublish_one_address_wkd_404_for_it_the_other_still_served(
        sandbox: Sandbox, browser: WebDriver, tmp_path: Path,
        gpg_keys: dict[str, UserKey]) -> None:
    alice = gpg_keys["alice"]
    pages = ensure_both_published(sandbox, browser, tmp_path, alice)
    pages.open("/keys")
    assert len(browser.find_elements(By.CLASS_NAME, "unpublish-address")) == 2
    pages.shot("keys-two-addresses")
    open_unpublish_address(pages, ALIAS)
    text = pages.text()
    assert f"will no longer be published for {ALIAS}" in text, text
    assert "It stays published for alice@example.org" in text
    pages.shot("unpublish-address")
    browser.find_element(By.NAME, "password").send_keys("alice-secret")
    pages.submit("password")
    # WKD answers 404 for the alias within a second of the answer page, and still serves
    # the same key for her address.
    assert wait_served(sandbox, ALIAS_HU, alice.gpg, None, within=1.0) < 1.0
    assert served_fingerprint(sandbox, ALICE_HU, alice.gpg) == alice.fingerprint
    text = pages.text()
    assert f"no longer published for {ALIAS}" in text, text
    assert "It is still published for alice@example.org" in text
    pages.shot("unpublished-address")
    # What WKD serves for alice no longer names the alias.
    _status, _headers, body = sandbox.wkd.get(ALICE_HU)
    uids = [line.split(":")[9] for line in alice.gpg.run(
        "--show-keys", "--with-colons", input=body).stdout.decode().splitlines()
        if line.startswith("uid:")]
    assert uids == ["Alice Liddell <alice@example.org>"], uids
    pages.open("/keys")
    assert len(browser.find_elements(By.CLASS_NAME, "unpublish-address")) == 1
    pages.shot("keys-one-address")


def served_validity(sandbox: Sandbox, path: str, gpg: GnuPG) -> str:
    """gpg's validity field of the primary key WKD serves at path ("r": revoked)."""
    status, _headers, body = sandbox.wkd.get(path)
    assert status == 200, status
    out = gpg.run("--show-keys", "--with-colons", input=body).stdout.decode()
    return next(line.split(":")[1] for line in out.splitlines() if line.startswith("pub:"))


def test_a_revocation_certificate_uploaded_alone_is_served_by_wkd(
        sandbox: Sandbox, browser: WebDriver, tmp_path: Path,
        gpg_keys: dict[str, UserKey]) -> None:
    alice, bob = gpg_keys["alice"], gpg_keys["bob"]
    pages = ensure_both_published(sandbox, browser, tmp_path, alice)
    assert served_validity(sandbox, ALICE_HU, alice.gpg) != "r"
    # bob's certificate in alice's session: refused in plain words, nothing written.
    foreign = tmp_path / "bob.rev"
    foreign.write_bytes(gen_revoke(bob.gpg, bob.fingerprint))
    pages.open("/keys")
    browser.find_element(By.NAME, "revocation_file").send_keys(str(foreign))
    pages.submit("revocation_file")
    text = pages.text()
    assert "The revocation was not published: this revocation is for another key" in text
    pages.shot("revocation-refused")
    assert served_validity(sandbox, ALICE_HU, alice.gpg) != "r"

    certificate = tmp_path / "alice.rev"  # as gpg --output alice.rev --gen-revoke writes it
    certificate.write_bytes(gen_revoke(alice.gpg, alice.fingerprint))
    pages.open("/keys")
    pages.shot("keys-revocation-form")
    browser.find_element(By.NAME, "revocation_file").send_keys(str(certificate))
    pages.submit("revocation_file")
    text = pages.text()
    assert "Your key is published as revoked" in text, text
    pages.shot("revoked")
    start = time.monotonic()
    while served_validity(sandbox, ALICE_HU, alice.gpg) != "r":
        assert time.monotonic() - start < 1.0, "WKD does not serve the revocation"
        time.sleep(0.02)
    assert served_validity(sandbox, ALIAS_HU, alice.gpg) == "r"
    # A client that had the key learns of the revocation: gpg imports what WKD serves.
    with GnuPG(tmp_path / "client") as client:
        client.import_key(alice.data)
        assert next(r for r in client.colons("--list-keys") if r[0] == "pub")[1] != "r"
        client.import_key(sandbox.wkd.get(ALICE_HU)[2])
        assert next(r for r in client.colons("--list-keys") if r[0] == "pub")[1] == "r"
    pages.open("/keys")
    assert "clients learn that this key must no longer be used" in pages.text()
    pages.shot("keys-revoked")
    # Put alice back for the other tests: the revoked key is unpublished.
    pages.unpublish("alice-secret")
    wait_served(sandbox, ALICE_HU, alice.gpg, None, within=1.0)


def remove_csrf_token(driver: WebDriver, form_field: str) -> None:
    """Take the hidden CSRF token out of the form holding the field named form_field (not
    the sign-out form's), as a page that forges the form would lack it."""
    left = driver.execute_script(
        "const form = document.getElementsByName(arguments[0])[0].form;"
        "form.querySelector('input[name=csrf_token]').remove();"
        "return form.querySelectorAll('input[name=csrf_token]').length;", form_field)
    assert left == 0


def test_a_form_post_without_the_csrf_token_is_refused_and_writes_nothing(
        sandbox: Sandbox, browser: WebDriver, tmp_path: Path,
        gpg_keys: dict[str, UserKey]) -> None:
    # Bob's key (alice's account has used most of its password attempts by now).
    bob = gpg_keys["bob"]
    pages = Pages(browser, sandbox, tmp_path)
    pages.sign_in("bob@example.org", "bob-secret")
    pages.open("/keys")
    remove_csrf_token(browser, "key_file")
    browser.find_element(By.NAME, "key_file").send_keys(str(key_file(tmp_path, bob, "b.pgp")))
    pages.submit("key_file")
    assert "The form has expired" in pages.text(), pages.text()
    pages.shot("csrf-refused-upload")
    assert served_fingerprint(sandbox, BOB_HU, bob.gpg) is None
    pages.upload_file(key_file(tmp_path, bob, "bob.pgp"))
    wait_served(sandbox, BOB_HU, bob.gpg, bob.fingerprint, within=2.0)
    certificate = tmp_path / "bob.rev"
    certificate.write_bytes(gen_revoke(bob.gpg, bob.fingerprint))

    def unpublish() -> None:
        pages.open("/unpublish")
        browser.find_element(By.NAME, "password").send_keys("bob-secret")
        remove_csrf_token(browser, "password")
        pages.submit("password")

    def unpublish_address() -> None:
        open_unpublish_address(pages, "bob@example.org")
        browser.find_element(By.NAME, "password").send_keys("bob-secret")
        remove_csrf_token(browser, "password")
        pages.submit("password")

    def revoke() -> None:
        pages.open("/keys")
        browser.find_element(By.NAME, "revocation_file").send_keys(str(certificate))
        remove_csrf_token(browser, "revocation_file")
        pages.submit("revocation_file")

    for name, forged in (("unpublish", unpublish), ("unpublish-address", unpublish_address),
                         ("revoke", revoke)):
        before = sandbox.portal.log_path.stat().st_size
        forged()
        text = pages.text()
        assert "The form has expired" in text, (name, text)
        pages.shot(f"csrf-refused-{name}")
        log = sandbox.portal.log_path.read_bytes()[before:].decode(errors="replace")
        assert "The CSRF token is missing" in log, log
        assert "unpublished" not in log, log
        assert "published the revocation" not in log, log
        assert served_fingerprint(sandbox, BOB_HU, bob.gpg) == bob.fingerprint
        assert served_validity(sandbox, BOB_HU, bob.gpg) != "r"
    pages.unpublish("bob-secret")  # with the token: it works
    wait_served(sandbox, BOB_HU, bob.gpg, None, within=1.0)


def test_a_key_naming_carols_address_publishes_nothing_for_her(
        sandbox: Sandbox, browser: WebDriver, tmp_path: Path) -> None:
    carol_hu = f"/.well-known/openpgpkey/example.org/hu/{local_part_hash('carol')}?l=carol"
    with GnuPG(tmp_path / "gnupg") as gpg:
        carols = gpg.generate("Carol C <carol@example.org>")
        both = gpg.generate("Bob Two <bob@example.org>")
        gpg.run("--quick-add-uid", both, "Carol C <carol@example.org>")
        pages = Pages(browser, sandbox, tmp_path)
        pages.sign_in("bob@example.org", "bob-secret")
        only = tmp_path / "carol.pgp"
        only.write_bytes(gpg.export(carols))
        pages.upload_file(only)
        text = pages.text()
        assert "The key was not published" in text, text
        pages.shot("carols-key-refused")
        assert served_fingerprint(sandbox, carol_hu, gpg) is None
        assert served_fingerprint(sandbox, BOB_HU, gpg) is None
        # Bob's key that also names carol: published for bob, carol's user ID left out.
        shared = tmp_path / "bob-and-carol.pgp"
        shared.write_bytes(gpg.export(both))
        pages.upload_file(shared)
        text = pages.text()
        assert "user IDs with addresses that are not yours" in text, text
        pages.shot("carols-address-left-out")
        wait_served(sandbox, BOB_HU, gpg, both, within=2.0)
        assert served_fingerprint(sandbox, carol_hu, gpg) is None
        _status, _headers, body = sandbox.wkd.get(BOB_HU)
        assert b"carol@example.org" not in body
        pages.unpublish("bob-secret")
        wait_served(sandbox, BOB_HU, gpg, None, within=1.0)


def test_the_rate_limit_engages_after_repeated_wrong_passwords(
        sandbox: Sandbox, browser: WebDriver, tmp_path: Path) -> None:
    # Last in this module: it may use up the client address's attempts too.
    pages = Pages(browser, sandbox, tmp_path)
    before = sandbox.portal.log_path.stat().st_size
    alerts = []
    for _ in range(11):  # [portal] rate_per_account is 10 by default
        pages.sign_in("carol@example.org", "not-carols-password")
        alerts.append(browser.find_element(By.CSS_SELECTOR, "[role=alert]").text)
        if alerts[-1].startswith("Too many attempts"):
            break
    assert alerts[-1].startswith("Too many attempts"), alerts
    assert set(alerts[:-1]) <= {WRONG}
    pages.shot("rate-limited")
    # Now even the right password waits, and nothing signs carol in.
    pages.sign_in("carol@example.org", "carol-secret")
    assert browser.find_element(By.CSS_SELECTOR, "[role=alert]").text.startswith(
        "Too many attempts")
    pages.open("/keys")
    assert browser.current_url == pages.url + "/sign-in"
    log = sandbox.portal.log_path.read_bytes()[before:].decode(errors="replace")
    assert "portal: rate limit for" in log, log
