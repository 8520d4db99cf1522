"""HKP and VKS look-ups of the WKD responder with REAL clients over REAL HTTPS: gpg
(dirmngr's hkps://: --recv-keys, --search-keys, --locate-keys), sq (`sq keyserver get`),
and VKS v1 over http.client with the test CA.

Set up as tests/integration/test_wkd_clients.py does: a private slapd with keys written by
ldapmodify as an administrator would (tests/support/wkd.py), the responder on
127.0.0.1:443 with a test CA, every client inside `unshare -m` with a test hosts file and
CA bundle. dirmngr gets the test CA as `hkp-cacert` in its dirmngr.conf.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from milter_wkd import openpgp
from milter_wkd.openpgp.packets import dearmor
from milter_wkd.sandbox.slapd import Slapd
from milter_wkd.sandbox.wkd import WKD_PORT, WkdResponder, port_443_free
from tests.support.gnupg import GnuPG
from tests.support.peers import ON_CI, require_binary
from tests.support.wkd import WkdNamespace, require_namespaces, write_key

pytestmark = pytest.mark.integration

ALICE = "uid=alice,ou=people,dc=example,dc=org"
BOB = "uid=bob,ou=people,dc=example,dc=org"
CAROL = "uid=carol,ou=people,dc=example,dc=org"
# With an explicit port dirmngr skips its SRV look-up (_pgpkey-https._tcp), which fails
# in the test namespace (no DNS server); the default port of hkps:// is 443 anyway.
SERVER = "hkps://openpgpkey.example.org:443"
ALICE_UIDS = ["Alice L. <alice.liddell@example.org>", "Alice Liddell <alice@example.org>"]


@dataclass
class Site:
    slapd: Slapd
    wkd: WkdResponder
    keys: dict[str, str]  # name -> fingerprint
    subkeys: dict[str, str]  # name -> encryption subkey fingerprint

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        return self.wkd.get(path)


def until(check: Callable[[], bool], within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    for name in ("slapd", "slapadd", "ldapmodify", "gpg", "dirmngr", "sq"):
        require_binary(name)
    require_namespaces()
    tmp = tmp_path_factory.mktemp("hkp")
    with GnuPG(tmp / "keys") as gpg:
        keys = {
            "alice": gpg.generate("Alice Liddell <alice@example.org>"),
            "bob": gpg.generate("Bob Baker <bob@example.org>"),
            "carol": gpg.generate("Carol Clark <carol@example.org>"),
            "submission": gpg.generate("key-submission@example.org"),
        }
        gpg.run("--quick-add-uid", keys["alice"], "Alice L. <alice.liddell@example.org>")
        gpg.run("--quick-add-uid", keys["alice"], "Alice <alice@elsewhere.example>")
        subkeys = {name: [line[9] for line in gpg.colons("--list-keys", fpr)
                          if line[0] == "fpr"][1] for name, fpr in keys.items()}
        exports = {name: gpg.export(fpr) for name, fpr in keys.items()}
        submission = tmp / "submission.pub"
        submission.write_bytes(gpg.export(keys["submission"], "--armor"))
        slapd = Slapd(tmp / "slapd")
        slapd.start()
        try:
            write_key(slapd, ALICE, exports["alice"],
                      ["alice@example.org", "alice.liddell@example.org"])
            write_key(slapd, BOB, exports["bob"], ["bob@example.org"])
            write_key(slapd, CAROL, exports["carol"], ["carol@example.org"])
            slapd.ldapmodify(f"dn: {CAROL}\nchangetype: modify\n"
                             "replace: pgpDisabled\npgpDisabled: 1\n-\n")
            until(port_443_free, within=30)
            wkd = WkdResponder(tmp / "responder", slapd, submission_public_key=submission)
            if wkd.port != WKD_PORT:
                message = "127.0.0.1:443 is taken; hkps:// clients know no other port here"
                if ON_CI:
                    pytest.fail(message)
                pytest.skip(message)
            wkd.start()
            try:
                yield Site(slapd, wkd, keys, subkeys)
            finally:
                wkd.stop()
        finally:
            slapd.close()


def client(site: Site, tmp_path: Path) -> tuple[GnuPG, WkdNamespace]:
    """A fresh GNUPGHOME whose dirmngr trusts the test CA for hkps://, and a namespace."""
    gpg = GnuPG(tmp_path / "g")
    (gpg.home / "dirmngr.conf").write_text(f"hkp-cacert {site.wkd.ca_file}\n")
    return gpg, WkdNamespace(tmp_path / "ns", site.wkd.ca_file)


def uids(listing: list[list[str]]) -> list[str]:
    return sorted(line[9] for line in listing if line[0] == "uid")


# -- gpg (dirmngr) ---------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["fingerprint", "subkey", "keyid"])
def test_gpg_recv_keys_gets_the_key_with_all_published_addresses(
        site: Site, tmp_path: Path, which: str) -> None:
    wanted = {"fingerprint": site.keys["alice"], "subkey": site.subkeys["alice"],
              "keyid": site.keys["alice"][-16:]}[which]
    gpg, ns = client(site, tmp_path)
    with gpg:
        proc = ns.run([gpg.gpg, "--batch", "--keyserver", SERVER, "--recv-keys", wanted],
                      env=gpg.env)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        listing = gpg.colons("--list-keys")
    assert next(line[9] for line in listing if line[0] == "fpr") == site.keys["alice"]
    assert uids(listing) == ALICE_UIDS  # never alice@elsewhere.example


def test_gpg_search_keys_lists_exactly_the_asked_address(site: Site, tmp_path: Path) -> None:
    gpg, ns = client(site, tmp_path)
    with gpg:
        proc = ns.run([gpg.gpg, "--batch", "--with-colons", "--keyserver", SERVER,
                       "--search-keys", "alice.liddell@example.org"], env=gpg.env)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    lines = [line.split(":") for line in out.splitlines()]
    assert [line[1] for line in lines if line[0] == "pub"] == [site.keys["alice"]]
    assert [line[1] for line in lines if line[0] == "uid"] == [
        quote("Alice L. <alice.liddell@example.org>", safe=" <>@")]


@pytest.mark.parametrize("search", ["alice", "Alice Liddell", "*", "ali*@example.org",
                                    "alice@elsewhere.example", "carol@example.org"])
def test_gpg_search_keys_finds_nothing_for_anything_else(site: Site, tmp_path: Path,
                                                         search: str) -> None:
    gpg, ns = client(site, tmp_path)
    with gpg:
        proc = ns.run([gpg.gpg, "--batch", "--with-colons", "--keyserver", SERVER,
                       "--search-keys", search], env=gpg.env)
    out = proc.stdout.decode(errors="replace")
    assert not [line for line in out.splitlines() if line.startswith(("pub:", "uid:"))], out


def test_gpg_locate_keys_by_keyserver(site: Site, tmp_path: Path) -> None:
    gpg, ns = client(site, tmp_path)
    with gpg:
        proc = ns.run([gpg.gpg, "--batch", "--keyserver", SERVER, "--auto-key-locate",
                       "clear,nodefault,keyserver", "--locate-keys", "bob@example.org"],
                      env=gpg.env)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        listing = gpg.colons("--list-keys")
    assert uids(listing) == ["Bob Baker <bob@example.org>"]


def test_gpg_gets_nothing_of_a_disabled_key(site: Site, tmp_path: Path) -> None:
    gpg, ns = client(site, tmp_path)
    with gpg:
        proc = ns.run([gpg.gpg, "--batch", "--keyserver", SERVER, "--recv-keys",
                       site.keys["carol"]], env=gpg.env)
        assert proc.returncode != 0
        assert [line for line in gpg.colons("--list-keys") if line[0] == "pub"] == []


# -- sq -------------------------------------------------------------------------------------

@pytest.mark.parametrize("query", ["fingerprint", "address"])
def test_sq_keyserver_get(site: Site, tmp_path: Path, query: str) -> None:
    ns = WkdNamespace(tmp_path / "ns", site.wkd.ca_file)
    out = tmp_path / "bob.pgp"
    wanted = site.keys["bob"] if query == "fingerprint" else "bob@example.org"
    proc = ns.run(["sq", "keyserver", "--server", SERVER, "get", "--binary", "-o", str(out),
                   wanted])
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    info = openpgp.inspect_key(out.read_bytes())
    assert info.fingerprint.hex == site.keys["bob"]
    assert info.user_ids == ("Bob Baker <bob@example.org>",)


def test_sq_keyserver_send_is_refused(site: Site, tmp_path: Path) -> None:
    ns = WkdNamespace(tmp_path / "ns", site.wkd.ca_file)
    key = tmp_path / "bob.asc"
    _status, _headers, body = site.get(f"/vks/v1/by-fingerprint/{site.keys['bob']}")
    key.write_bytes(body)
    proc = ns.run(["sq", "keyserver", "--server", SERVER, "send", str(key)])
    assert proc.returncode != 0


# -- VKS and HKP over http.client with the test CA ------------------------------------------

def test_vks_by_fingerprint_keyid_and_email(site: Site) -> None:
    alice = site.keys["alice"]
    for path in (f"/vks/v1/by-fingerprint/{alice}", f"/vks/v1/by-fingerprint/{alice.lower()}",
                 f"/vks/v1/by-keyid/{alice[-16:]}",
                 f"/vks/v1/by-keyid/{site.subkeys['alice'][-16:]}"):
        status, headers, body = site.get(path)
        assert status == 200, path
        assert headers["content-type"] == "application/pgp-keys"
        assert headers["content-disposition"] == f'attachment; filename="{alice}.asc"'
        info = openpgp.inspect_key(dearmor(body)[1])
        assert sorted(info.user_ids) == ALICE_UIDS
    for path in ("/vks/v1/by-email/alice@example.org", "/vks/v1/by-email/alice%40example.org"):
        status, headers, body = site.get(path)
        assert status == 200, path
        assert openpgp.inspect_key(dearmor(body)[1]).user_ids == (
            "Alice Liddell <alice@example.org>",)


def test_privacy_and_refusals(site: Site) -> None:
    nothing = [
        "/pks/lookup?op=get&search=alice",
        "/pks/lookup?op=get&search=*",
        "/pks/lookup?op=get&search=Alice%20Liddell",
        "/pks/lookup?op=index&options=mr&search=ali",
        "/pks/lookup?op=get&search=alice%40elsewhere.example",
        "/pks/lookup?op=get&search=carol%40example.org",
        f"/pks/lookup?op=get&search=0x{site.keys['carol']}",
        "/vks/v1/by-email/alice@elsewhere.example",
        "/vks/v1/by-email/carol@example.org",
        f"/vks/v1/by-fingerprint/{site.keys['carol']}",
        f"/vks/v1/by-keyid/{site.subkeys['carol'][-16:]}",
    ]
    for path in nothing:
        status, _headers, body = site.get(path)
        assert status == 404, path
        assert b"alice" not in body.lower()
        assert b"carol" not in body.lower()
    for path, expected in [("/pks/lookup?op=get&search=0x12345678", 400),
                           ("/pks/lookup?op=vindex&search=alice%40example.org", 501),
                           ("/vks/v1/by-fingerprint/0x1234", 400),
                           ("/vks/v1/by-email/nobody", 400)]:
        assert site.get(path)[0] == expected, path
    status, _headers, body = site.wkd.get("/pks/add", method="POST")
    assert status == 501
    assert b"key-submission@example.org" in body
