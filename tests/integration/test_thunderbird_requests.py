"""Thunderbird's key look-ups replayed byte for byte against the sandbox responder over HTTPS.

Thunderbird has no headless mode this suite can drive, so its requests are rebuilt from its
source (comm-central, Thunderbird 115/128: mail/extensions/openpgp/content/modules/) and
sent with http.client, certificate checked against the test CA:

- wkdLookup.sys.mjs: the address is `toLowerCase().trim()`ed WHOLE (local part too), then
  `GET https://openpgpkey.<domain>/.well-known/openpgpkey/<domain>/hu/<z-base-32 SHA-1 of
  the local part>?l=<escape(local)>` (the direct method, `https://<domain>/.well-known/
  openpgpkey/hu/...`, when that fails), by fetch() with `Content-Type:
  application/octet-stream`, `Authorization: Basic bm8tdXNlcjo=` (btoa("no-user:")) and
  `X-OpenPGP-Padding: x…` (url.length % 512 + 1 of them). A key is taken when
  `response.ok` and the Content-Type is not text/html.
- keyLookupHelper.sys.mjs + keyserver.sys.mjs, by address:
  - `vks://host`: `GET https://host/vks/v1/by-email/<addr>` (XMLHttpRequest, `Content-Type:
    text/plain;charset=UTF-8`); the block must hold exactly one key;
  - `hkps://host`: `GET https://host:443/pks/lookup?search=<escape(addr)>&fingerprint=on&op=
    index&options=mr&exact=on` (`Content-Type: application/x-www-form-urlencoded`), `info:1`
    and exactly one `pub:` line whose field 1 is the key ID it then fetches with
    `/pks/lookup?search=0x<that>&op=get&options=mr`.
- by key ID or fingerprint (refresh, lookupAndImportByKeyID, always `0x`-prefixed):
  VKS `/vks/v1/by-keyid/<16 hex>` or `/vks/v1/by-fingerprint/<40 hex>`; HKP the same index
  then get, with `search=0x<hex>`.
Status rules from the same code: 2xx is a key, 4xx "not found", 5xx an error.

The other headers are Gecko's own on every request (not in that code): User-Agent,
`Accept: */*`, Accept-Language, Accept-Encoding. Host carries no port (443 is the default).
"""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import pytest

from milter_wkd import openpgp
from milter_wkd.openpgp.packets import dearmor
from milter_wkd.sandbox.daemons import LOOPBACK
from milter_wkd.sandbox.slapd import Slapd
from milter_wkd.sandbox.wkd import WkdResponder
from milter_wkd.wkd import local_part_hash
from tests.support.gnupg import GnuPG
from tests.support.peers import require_binary
from tests.support.wkd import write_key

pytestmark = pytest.mark.integration

ALICE = "uid=alice,ou=people,dc=example,dc=org"
BOB = "uid=bob,ou=people,dc=example,dc=org"
KEYSERVER = "openpgpkey.example.org"
OWNER = {"alice@example.org": "alice", "alice.liddell@example.org": "alice",
         "bob@example.org": "bob"}
GECKO = {  # what Gecko adds to every fetch()/XMLHttpRequest of Thunderbird 128 on Linux
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.0",
    "Accept": "*/*",
    "Accept-Language": "en-US,en;q=0.5",
    "Accept-Encoding": "gzip, deflate, br, zstd",
    "Connection": "keep-alive",
}
_JS_UNESCAPED = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789@*_+-./")


def js_escape(text: str) -> str:
    """JavaScript's escape(), which Thunderbird uses for query values (keeps @ as it is)."""
    return "".join(c if c in _JS_UNESCAPED else f"%{ord(c):02X}" if ord(c) < 256
                   else f"%u{ord(c):04X}" for c in text)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def key(self) -> openpgp.KeyInfo:
        """The one key of the answer, armored or not (Thunderbird's RNP takes both)."""
        binary = dearmor(self.body)[1] if self.body.startswith(b"-----BEGIN") else self.body
        return openpgp.inspect_key(binary)


@dataclass
class Site:
    wkd: WkdResponder
    keys: dict[str, str]  # name -> fingerprint

    def thunderbird(self, url: str, headers: dict[str, str]) -> Answer:
        """One request as Thunderbird sends it to `url`, made to the sandbox responder."""
        parts = urlsplit(url)
        assert parts.scheme == "https"
        assert parts.hostname is not None
        host = parts.hostname
        conn = http.client.HTTPConnection(LOOPBACK, self.wkd.port, timeout=10)
        context = ssl.create_default_context(cafile=str(self.wkd.ca_file))
        conn.sock = context.wrap_socket(
            socket.create_connection((LOOPBACK, self.wkd.port), timeout=10),
            server_hostname=host)
        try:
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            conn.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host if parts.port in (None, 443) else parts.netloc)
            for name, value in {**GECKO, **headers}.items():
                conn.putheader(name, value)
            conn.endheaders()
            response = conn.getresponse()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()},
                          response.read())
        finally:
            conn.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    for name in ("slapd", "slapadd", "ldapmodify", "gpg"):
        require_binary(name)
    tmp = tmp_path_factory.mktemp("thunderbird")
    with GnuPG(tmp / "keys") as gpg:
        keys = {"alice": gpg.generate("Alice Liddell <alice@example.org>"),
                "bob": gpg.generate("Bob Baker <bob@example.org>")}
        gpg.run("--quick-add-uid", keys["alice"], "Alice L. <alice.liddell@example.org>")
        exports = {name: gpg.export(fpr) for name, fpr in keys.items()}
        slapd = Slapd(tmp / "slapd")
        slapd.start()
        try:
            write_key(slapd, ALICE, exports["alice"],
                      ["alice@example.org", "alice.liddell@example.org"])
            write_key(slapd, BOB, exports["bob"], ["bob@example.org"])
            # Any port: http.client connects to it and sends the names Thunderbird would.
            wkd = WkdResponder(tmp / "responder", slapd)
            wkd.start()
            try:
                yield Site(wkd, keys)
            finally:
                wkd.stop()
        finally:
            slapd.close()


# -- WKD (wkdLookup.sys.mjs) ----------------------------------------------------------------

def wkd_url(email: str, *, advanced: bool) -> str:
    email = email.lower().strip()  # the whole address, as Thunderbird does
    user, domain = email.split("@")
    hashed = local_part_hash(user)
    if advanced:
        return (f"https://openpgpkey.{domain}/.well-known/openpgpkey/{domain}/hu/{hashed}"
                f"?l={js_escape(user)}")
    return f"https://{domain}/.well-known/openpgpkey/hu/{hashed}?l={js_escape(user)}"


def wkd_headers(url: str) -> dict[str, str]:
    return {"Content-Type": "application/octet-stream",
            "Authorization": "Basic bm8tdXNlcjo=",  # btoa("no-user:")
            "X-OpenPGP-Padding": "x" * (len(url) % 512 + 1)}


def thunderbird_takes_wkd(answer: Answer) -> bool:
    return 200 <= answer.status < 300 and not answer.headers.get(
        "content-type", "").lower().startswith("text/html")


@pytest.mark.parametrize("advanced", [True, False], ids=["advanced", "direct"])
@pytest.mark.parametrize("typed", ["alice@example.org", "Alice@Example.ORG",
                                   " ALICE.Liddell@example.org "])
def test_wkd_lookup_gets_the_key_of_the_address(site: Site, typed: str,
                                                advanced: bool) -> None:
    url = wkd_url(typed, advanced=advanced)
    answer = site.thunderbird(url, wkd_headers(url))
    assert answer.status == 200, (url, answer)
    assert thunderbird_takes_wkd(answer)
    assert answer.headers["content-type"] == "application/octet-stream"
    info = answer.key()
    assert info.fingerprint.hex == site.keys["alice"]
    address = typed.strip().lower()
    assert [uid for uid in info.user_ids if f"<{address}>" in uid] == list(info.user_ids)
    assert len(info.user_ids) == 1


def test_wkd_lookup_of_nobody_is_a_plain_404(site: Site) -> None:
    url = wkd_url("Nobody@Example.org", advanced=True)
    answer = site.thunderbird(url, wkd_headers(url))
    assert answer.status == 404
    assert not thunderbird_takes_wkd(answer)
    assert not answer.headers["content-type"].startswith("text/html")


# -- keyserver look-ups by address (keyLookupHelper._lookupAndImportOnKeyserver) ------------

def vks_by_email(site: Site, email: str) -> Answer:
    """`vks://host`: downloadNoImport(email) -> accessVksServer."""
    return site.thunderbird(f"https://{KEYSERVER}/vks/v1/by-email/{email}",
                            {"Content-Type": "text/plain;charset=UTF-8"})


def hkp(site: Site, query: str) -> Answer:
    return site.thunderbird(f"https://{KEYSERVER}:443/pks/lookup?{query}",
                            {"Content-Type": "application/x-www-form-urlencoded"})


def hkps_search_and_download(site: Site, term: str) -> Answer | None:
    """`hkps://host`: searchAndDownloadSingleResultNoImport(term), as keyserver.sys.mjs does
    it: the index (404 is "nothing"), exactly one key in it, then that key by `0x<id>`."""
    index = hkp(site, f"search={js_escape(term)}&fingerprint=on&op=index&options=mr&exact=on")
    assert index.status < 400 or index.status == 404, index
    pub_ids = []
    for raw in index.body.decode("latin-1").splitlines():
        line = [unquote(field) for field in raw.split(":")]
        if len(line) <= 1:
            continue
        if line[0] == "info":
            assert line[1] == "1", raw  # else Thunderbird gives up: "unsupported"
        elif line[0] == "pub" and len(line) >= 6:
            pub_ids.append(line[1])
    if len(pub_ids) != 1:
        return None
    key_id = pub_ids[0]
    return hkp(site, f"search=0x{key_id}&op=get&options=mr")


@pytest.mark.parametrize("email", list(OWNER))
def test_vks_lookup_by_email(site: Site, email: str) -> None:
    answer = vks_by_email(site, email)
    assert answer.status == 200, answer
    assert answer.headers["content-type"] == "application/pgp-keys"
    info = answer.key()  # one key: Thunderbird throws on "multiple results"
    assert info.fingerprint.hex == site.keys[OWNER[email]]
    assert len(info.user_ids) == 1
    assert f"<{email}>" in info.user_ids[0]


@pytest.mark.parametrize("email", list(OWNER))
def test_hkps_search_then_download_by_email(site: Site, email: str) -> None:
    answer = hkps_search_and_download(site, email)
    assert answer is not None, "the index did not list exactly one key"
    assert answer.status == 200, answer
    assert answer.headers["content-type"] == "application/pgp-keys"
    info = answer.key()
    assert info.fingerprint.hex == site.keys[OWNER[email]]
    # Fetched by fingerprint: the key with all of its owner's published addresses.
    assert any(f"<{email}>" in uid for uid in info.user_ids)


def test_keyserver_lookups_of_nobody_find_nothing(site: Site) -> None:
    assert vks_by_email(site, "nobody@example.org").status == 404
    assert hkps_search_and_download(site, "nobody@example.org") is None
    assert hkps_search_and_download(site, "alice") is None  # no substring search


# -- by key ID or fingerprint (refresh, lookupAndImportByKeyID) ----------------------------

@pytest.mark.parametrize("which", ["fingerprint", "keyid"])
def test_lookup_by_key_id(site: Site, which: str) -> None:
    fpr = site.keys["alice"]
    hex_ = fpr if which == "fingerprint" else fpr[-16:]
    vks = site.thunderbird(f"https://{KEYSERVER}/vks/v1/by-{which}/{hex_}",
                           {"Content-Type": "text/plain;charset=UTF-8"})
    refresh = hkp(site, f"search=0x{hex_}&op=get&options=mr")  # download(): no index first
    found = hkps_search_and_download(site, f"0x{hex_}")
    assert found is not None
    for answer in (vks, refresh, found):
        assert answer.status == 200, answer
        assert answer.headers["content-type"] == "application/pgp-keys"
        info = answer.key()
        assert info.fingerprint.hex == fpr
        assert sorted(info.user_ids) == ["Alice L. <alice.liddell@example.org>",
                                         "Alice Liddell <alice@example.org>"]
