"""HKP and VKS look-ups (milter_wkd.web.hkp): query parsing, the machine-readable index,
and the one rule (what WKD serves, by exact look-up only) through the WSGI app."""

from __future__ import annotations

from pathlib import Path

import pytest

from milter_wkd import openpgp
from milter_wkd.config import DomainConfig
from milter_wkd.openpgp.packets import dearmor
from milter_wkd.store.memory import MemoryStore
from milter_wkd.store.model import KeyOrigin, Provenance
from milter_wkd.values import Address
from milter_wkd.web.app import WkdApp
from milter_wkd.web.cache import KeyCache, fingerprints, join_cleaned, key_ids, split_keys
from milter_wkd.web.hkp import (
    NOTHING,
    Query,
    escape,
    index_text,
    parse_hkp,
    parse_search,
    parse_vks,
)
from milter_wkd.web.routes import HttpError
from tests.unit.test_openpgp_crafted import T0, Signer, Subkey, user_id
from tests.unit.test_web_app import Response

DOMAINS = ("example.org",)
DATA = Path(__file__).parent.parent / "data"
VECTOR_FPR = "19C986C574E9A8CD4F2CDDF8253FEE91C2685C98"
VECTOR_SUB = "0B22D0C62E2CB933DCC9582DD114EE4D1A9828B7"
FPR = "0x" + VECTOR_FPR


# -- parsing -------------------------------------------------------------------------------

@pytest.mark.parametrize(("query", "expected"), [
    (f"op=get&options=mr&search={FPR}", Query("fingerprint", VECTOR_FPR)),
    (f"op=get&search={FPR.lower()}", Query("fingerprint", VECTOR_FPR)),
    (f"op=get&search={VECTOR_FPR}", Query("fingerprint", VECTOR_FPR)),
    ("op=get&search=0x" + "AB" * 32, Query("fingerprint", "AB" * 32)),
    ("op=get&search=0x253FEE91C2685C98", Query("keyid", "253FEE91C2685C98")),
    ("op=get&search=alice%40example.org&exact=on", Query("address", "alice@example.org")),
    ("op=get&search=alice@example.org", Query("address", "alice@example.org")),
    ("op=get&search=%3Calice%40example.org%3E", Query("address", "alice@example.org")),
    ("op=get&search==alice@example.org", Query("address", "alice@example.org")),
    ("op=index&options=mr&fingerprint=on&search=Alice%40Example.ORG",
     Query("address", "Alice@example.org", index=True)),
])
def test_exact_look_ups_are_understood(query: str, expected: Query) -> None:
    found = parse_hkp(query, DOMAINS)
    assert (found.kind, found.value.lower(), found.index) == (
        expected.kind, expected.value.lower(), expected.index)


@pytest.mark.parametrize("search", [
    "*", "ali", "alice", "Alice Liddell", "%", "%25", "*@example.org", "alice@*",
    "alice@example.org*", "@example.org", "alice@", "alice@other.example",
    "<alice@other.example>", "Alice <alice@example.org>", "a@b@example.org",
    "x" * 300 + "@example.org", "alice@example.org\x00", "alice\r\n@example.org",
])
def test_anything_but_an_exact_look_up_of_ours_finds_nothing(search: str) -> None:
    from urllib.parse import quote
    assert parse_hkp("op=get&search=" + quote(search), DOMAINS) == NOTHING
    assert parse_hkp("op=index&options=mr&search=" + quote(search), DOMAINS) == Query(
        "nothing", index=True)


@pytest.mark.parametrize(("query", "status"), [
    ("op=get&search=0x12345678", 400),  # short key IDs collide by design
    ("op=get&search=0x1234567", 400),
    ("op=get&search=0xZZ345678ZZ345678", 400),
    ("op=get&search=0x" + "A" * 41, 400),
    ("op=vindex&search=alice@example.org", 501),
    ("op=stats", 501),
    ("op=delete&search=alice@example.org", 400),
    ("search=alice@example.org", 400),
    ("op=get", 400),
    ("op=get&search=", 400),
    ("op=get&search=" + "a" * 600, 414),
    ("&".join(["op=get"] * 20), 400),  # too many fields
])
def test_malformed_queries_are_refused(query: str, status: int) -> None:
    with pytest.raises(HttpError) as caught:
        parse_hkp(query, DOMAINS)
    assert caught.value.status == status


@pytest.mark.parametrize(("path", "expected"), [
    (f"/vks/v1/by-fingerprint/{VECTOR_FPR}", Query("fingerprint", VECTOR_FPR)),
    (f"/vks/v1/by-fingerprint/{VECTOR_FPR.lower()}", Query("fingerprint", VECTOR_FPR)),
    ("/vks/v1/by-keyid/253fee91c2685c98", Query("keyid", "253FEE91C2685C98")),
    ("/vks/v1/by-email/alice@example.org", Query("address", "alice@example.org")),
    ("/vks/v1/by-email/alice%40example.org", Query("address", "alice@example.org")),
    ("/vks/v1/by-email/alice@other.example", NOTHING),
])
def test_vks_paths(path: str, expected: Query) -> None:
    assert parse_vks(path, DOMAINS) == expected


@pytest.mark.parametrize(("path", "status"), [
    (f"/vks/v1/by-fingerprint/0x{VECTOR_FPR}", 400),
    ("/vks/v1/by-fingerprint/C2685C98", 400),
    ("/vks/v1/by-keyid/0x253FEE91C2685C98", 400),
    ("/vks/v1/by-keyid/C2685C98", 400),
    ("/vks/v1/by-email/alice", 400),
    ("/vks/v1/by-email/%2A%40example.org", 400),
    ("/vks/v1/by-email/%ff%40example.org", 400),
    ("/vks/v1/by-email/<alice@example.org>", 400),
    ("/vks/v1/by-name/alice", 404),
    ("/vks/v1/by-email/" + "a" * 300, 414),
])
def test_malformed_vks_paths_are_400(path: str, status: int) -> None:
    with pytest.raises(HttpError) as caught:
        parse_vks(path, DOMAINS)
    assert caught.value.status == status


def test_parse_search_is_exact() -> None:
    assert parse_search("bob@example.org", DOMAINS).kind == "address"
    assert parse_search("bob@sub.example.org", DOMAINS) == NOTHING


# -- the index ---------------------------------------------------------------------------------

def test_escape() -> None:
    assert escape(b"Alice: <a@b>") == "Alice%3A <a@b>"
    assert escape("Jörg 100%\n".encode()) == "J%C3%B6rg 100%25%0A"


def test_index_of_the_vector_key_known_answer() -> None:
    cleaned = openpgp.clean_key((DATA / "vector-ed25519.pgp").read_bytes(),
                                [Address.parse("vector@example.org")])
    text = index_text([cleaned.key], now=1795952740 + 10).decode()
    assert text.splitlines() == [
        "info:1:1",
        f"pub:{VECTOR_FPR}:22:255:1795952740::",
        f"uid:Test Vector <vector@example.org>:{_uid_time(cleaned.key)}::",
    ]
    assert index_text([]) == b"info:1:0\n"


def _uid_time(key: bytes) -> int:
    from milter_wkd.openpgp.material import parse_signature
    from milter_wkd.openpgp.packets import TAG_SIGNATURE, frames
    sigs = [parse_signature(key[s:e]) for t, _, s, e in frames(key) if t == TAG_SIGNATURE]
    return next(s.created for s in sigs if 0x10 <= s.sig_type <= 0x13)


# -- the app: one rule for every look-up path ------------------------------------------

ALICE = "Alice <alice@example.org>"
ALIAS = "Alice L. <alice.l@example.org>"
ELSEWHERE = "Alice <alice@other.example>"


def two_address_key() -> tuple[bytes, str, str]:
    signer, sub = Signer(), Subkey(T0 + 5)
    key = (signer.packet + user_id(ALICE) + signer.certify(ALICE, T0 + 1)
           + user_id(ALIAS) + signer.certify(ALIAS, T0 + 2)
           + user_id(ELSEWHERE) + signer.certify(ELSEWHERE, T0 + 3)
           + sub.packet + signer.bind(sub, T0 + 6))
    primary, subkey = fingerprints(key)
    return key, primary, subkey


def make_app(tmp_path: Path, *, complete: bool) -> tuple[WkdApp, MemoryStore, str, str]:
    store = MemoryStore()
    user = store.add_user("uid=alice,ou=people,dc=example,dc=org", "alice@example.org",
                          "alice.l@example.org")
    key, primary, sub = two_address_key()
    cleaned = openpgp.clean_key(key, user.addresses)
    store.publish_key(user, cleaned, Provenance(KeyOrigin.ADMIN_IMPORT, "test", T0))
    cache = KeyCache(store, budget=1 << 20 if complete else 1)
    if complete:
        assert cache.load()
    domain = DomainConfig(name="example.org", submission_address="key-submission@example.org",
                          submission_public_key=str(tmp_path / "missing.pub"))
    return WkdApp(cache, [domain]), store, primary, sub


def uids(armored: bytes) -> list[str]:
    _label, binary = dearmor(armored)
    return list(openpgp.inspect_key(binary).user_ids)


@pytest.mark.parametrize("complete", [True, False], ids=["mirror", "lru"])
def test_every_path_serves_what_wkd_serves(tmp_path: Path, complete: bool) -> None:
    app, store, primary, sub = make_app(tmp_path, complete=complete)
    host = "openpgpkey.example.org"
    by_address = Response(app, "GET", "/pks/lookup", host,
                          "op=get&options=mr&search=alice.l%40example.org")
    assert by_address.status == 200
    assert by_address.headers["Content-Type"] == "application/pgp-keys"
    assert by_address.body.startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert uids(by_address.body) == [ALIAS]
    for search in ("0x" + primary, "0x" + primary[-16:], "0x" + sub, "0x" + sub[-16:]):
        by_key = Response(app, "GET", "/pks/lookup", host, f"op=get&search={search}")
        assert by_key.status == 200, search
        assert sorted(uids(by_key.body)) == sorted([ALICE, ALIAS])  # never other.example
    vks = Response(app, "GET", f"/vks/v1/by-fingerprint/{primary.lower()}", "keys.example")
    assert vks.status == 200
    assert vks.headers["Content-Disposition"] == f'attachment; filename="{primary}.asc"'
    assert sorted(uids(vks.body)) == sorted([ALICE, ALIAS])
    vks = Response(app, "GET", "/vks/v1/by-email/alice%40example.org", None)
    assert (vks.status, uids(vks.body)) == (200, [ALICE])
    assert Response(app, "GET", f"/vks/v1/by-keyid/{sub[-16:]}", None).status == 200
    index = Response(app, "GET", "/pks/lookup", host,
                     "op=index&options=mr&search=alice%40example.org")
    assert index.status == 200
    assert index.body.decode().splitlines()[:2] == ["info:1:1", f"pub:{primary}:22:255:{T0}::"]

    # Disabled: nothing on any path.
    user = store.user(Address.parse("alice@example.org"))
    store.set_disabled(user, True)
    if complete:
        app.cache.refresh()
    for path, query in [("/pks/lookup", "op=get&search=alice%40example.org"),
                        ("/pks/lookup", f"op=get&search=0x{primary}"),
                        ("/pks/lookup", f"op=get&search=0x{sub[-16:]}"),
                        ("/pks/lookup", "op=index&options=mr&search=alice%40example.org"),
                        (f"/vks/v1/by-fingerprint/{primary}", ""),
                        ("/vks/v1/by-email/alice.l@example.org", "")]:
        assert Response(app, "GET", path, host, query).status == 404, (path, query)


def test_hostile_and_foreign_look_ups_find_nothing(tmp_path: Path) -> None:
    app, _store, primary, _sub = make_app(tmp_path, complete=True)
    for query in ["op=get&search=*", "op=get&search=ali", "op=get&search=%25",
                  "op=get&search=alice", "op=get&search=Alice",
                  "op=get&search=alice%40other.example",
                  "op=get&search=0x" + "0" * 40]:
        answer = Response(app, "GET", "/pks/lookup", None, query)
        assert answer.status == 404, query
        assert b"alice" not in answer.body
    index = Response(app, "GET", "/pks/lookup", None, "op=index&options=mr&search=*")
    assert (index.status, index.body) == (404, b"info:1:0\n")
    assert Response(app, "GET", "/pks/lookup", None, "op=get&search=0x12345678").status == 400
    assert Response(app, "GET", "/pks/lookup", None, "op=vindex&search=x").status == 501
    assert Response(app, "GET", f"/vks/v1/by-fingerprint/{primary[:39]}", None).status == 400
    assert Response(app, "GET", "/vks/v1/by-email/alice@other.example", None).status == 404
    assert Response(app, "GET", "/pks/other", None).status == 404


def test_uploads_point_to_wks(tmp_path: Path) -> None:
    app, *_ = make_app(tmp_path, complete=True)
    for path in ("/pks/add", "/vks/v1/upload", "/vks/v1/request-verify"):
        answer = Response(app, "POST", path, "example.org")
        assert answer.status == 501
        assert answer.headers["Content-Type"].startswith("text/plain")
        assert b"key-submission@example.org" in answer.body
        assert b"WKS" in answer.body
    assert Response(app, "POST", "/pks/lookup", None, "op=get&search=x").status == 405


def test_head_and_headers(tmp_path: Path) -> None:
    app, _store, primary, _sub = make_app(tmp_path, complete=True)
    get = Response(app, "GET", "/pks/lookup", None, f"op=get&search=0x{primary}")
    head = Response(app, "HEAD", "/pks/lookup", None, f"op=get&search=0x{primary}")
    assert head.body == b""
    assert head.headers == get.headers
    assert get.headers["Content-Length"] == str(len(get.body))
    assert get.headers["Access-Control-Allow-Origin"] == "*"


# -- the cache's key ID index ------------------------------------------------------------

def test_join_cleaned_puts_the_user_ids_of_copies_together() -> None:
    key, primary, sub = two_address_key()
    one = openpgp.clean_key(key, [Address.parse("alice@example.org")]).key
    two = openpgp.clean_key(key, [Address.parse("alice.l@example.org")]).key
    joined = join_cleaned([one, two, one])
    info = openpgp.inspect_key(joined)
    assert sorted(info.user_ids) == sorted([ALICE, ALIAS])
    assert [s.fingerprint.hex for s in info.subkeys] == [sub]
    assert fingerprints(joined) == [primary, sub]
    assert key_ids(one + two) == (primary[-16:], sub[-16:])
    assert split_keys(one + two) == [one, two]
    assert key_ids(b"not a key") == ()


def test_the_index_follows_changes(tmp_path: Path) -> None:
    app, store, primary, _sub = make_app(tmp_path, complete=True)
    cache = app.cache
    assert cache.find_key(primary) is not None
    store.remove_key(store.user(Address.parse("alice@example.org")))
    cache.refresh()
    assert cache.find_key(primary) is None
    assert cache.find_key(primary[-16:]) is None
    assert not cache._by_key_id


def test_a_repeated_look_up_is_answered_from_the_memo_until_the_mirror_changes(
        tmp_path: Path) -> None:
    app, store, primary, _sub = make_app(tmp_path, complete=True)
    host = "openpgpkey.example.org"
    query = f"op=get&search=0x{primary}"
    first = Response(app, "GET", "/pks/lookup", host, query)
    assert first.status == 200
    assert app.keyserver._memo  # kept
    again = Response(app, "GET", "/pks/lookup", host, query)
    assert (again.status, again.headers, again.body) == (first.status, first.headers,
                                                          first.body)
    store.remove_key(store.user(Address.parse("alice@example.org")))
    app.cache.refresh()
    gone = Response(app, "GET", "/pks/lookup", host, query)
    assert gone.status == 404  # the mirror moved on: the memo is not used


@pytest.mark.parametrize("path", ["/.well-known/openpgpkey/example.org/hu/"
                                  "kei1q4tipxxu1yj79k9kfukdhfy631xe", "/pks/lookup",
                                  "/vks/v1/by-email/alice@example.org", "/nothing"])
def test_a_cors_preflight_is_allowed_everywhere(tmp_path: Path, path: str) -> None:
    app, _store, _primary, _sub = make_app(tmp_path, complete=True)
    answer = Response(app, "OPTIONS", path, "openpgpkey.example.org")
    assert answer.status == 204
    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    assert "GET" in answer.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in answer.headers["Access-Control-Allow-Headers"]
    assert answer.body == b""
