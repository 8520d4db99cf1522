"""The WSGI app: status codes, headers, HEAD, 503 only when memory knows nothing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from milter_wkd import config as config_module
from milter_wkd.config import DomainConfig
from milter_wkd.errors import KeyRefused
from milter_wkd.values import Address
from milter_wkd.web import create_app
from milter_wkd.web.app import WkdApp
from milter_wkd.web.cache import KeyCache
from milter_wkd.wkd import address_hash
from tests.unit.test_openpgp_crafted import simple_key
from tests.unit.test_web_cache import ALICE, BOB, TableSource, cleaner


class Response:
    def __init__(self, app: WkdApp, method: str, path: str, host: str | None,
                 query: str = "", **http: str) -> None:
        environ: dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": path,
                                   "QUERY_STRING": query}
        environ.update({"HTTP_" + name.upper(): value for name, value in http.items()})
        if host is not None:
            environ["HTTP_HOST"] = host
        self.status = 0
        self.headers: dict[str, str] = {}

        def start_response(status: str, headers: list[tuple[str, str]]) -> None:
            self.status = int(status.split(maxsplit=1)[0])
            self.headers = dict(headers)

        self.body = b"".join(app(environ, start_response))


@pytest.fixture
def app(tmp_path: Path) -> WkdApp:
    source = TableSource()
    source.write("uid=alice", (ALICE,), b"KA")
    source.write("uid=bob", (BOB,), b"KB")
    cache = KeyCache(source, budget=1 << 20, cleaner=cleaner)
    cache.load()
    domain = DomainConfig(name="example.org",
                          submission_public_key=str(tmp_path / "missing.pub"))
    return WkdApp(cache, [domain], max_age=600)


def key_path(address: Address, advanced: bool = True) -> str:
    if advanced:
        return f"/.well-known/openpgpkey/{address.domain}/hu/{address_hash(address)}"
    return f"/.well-known/openpgpkey/hu/{address_hash(address)}"


def test_a_key_answer_has_the_wkd_headers(app: WkdApp) -> None:
    got = Response(app, "GET", key_path(ALICE), "openpgpkey.example.org", "l=alice")
    assert got.status == 200
    assert got.body == b"KA|alice@example.org"
    assert got.headers["Content-Type"] == "application/octet-stream"
    assert got.headers["Content-Length"] == str(len(got.body))
    assert got.headers["Access-Control-Allow-Origin"] == "*"
    assert got.headers["Cache-Control"] == "public, max-age=600"


def test_head_has_the_headers_and_no_body(app: WkdApp) -> None:
    got = Response(app, "HEAD", key_path(BOB, advanced=False), "example.org")
    assert got.status == 200
    assert got.body == b""
    assert got.headers["Content-Length"] == str(len(b"KB|bob@example.org"))


def test_unknown_is_404_with_a_short_cache_life(app: WkdApp) -> None:
    got = Response(app, "GET", key_path(Address.parse("nobody@example.org")), None)
    assert got.status == 404
    assert got.headers["Cache-Control"] == "public, max-age=60"
    assert got.headers["Access-Control-Allow-Origin"] == "*"


def test_policy_and_submission_address(app: WkdApp) -> None:
    got = Response(app, "GET", "/.well-known/openpgpkey/policy", "example.org")
    assert got.status == 200
    assert got.body.endswith(b"\n")
    assert b"submission-address: key-submission@example.org\n" in got.body
    got = Response(app, "GET", "/.well-known/openpgpkey/example.org/submission-address",
                   "openpgpkey.example.org")
    assert got.body == b"key-submission@example.org\n"


def test_refusals(app: WkdApp) -> None:
    got = Response(app, "POST", key_path(ALICE), "openpgpkey.example.org")
    assert (got.status, got.headers["Allow"]) == (405, "GET, HEAD")
    assert Response(app, "GET", "/.well-known/openpgpkey/hu/x", "example.org").status == 400
    assert Response(app, "GET", key_path(ALICE), "evil.example").status == 404


def test_503_only_for_what_memory_does_not_know(tmp_path: Path) -> None:
    source = TableSource()
    source.write("uid=alice", (ALICE,), b"KA")
    cache = KeyCache(source, budget=1 << 20, cleaner=cleaner)  # not loaded: LRU mode
    app = WkdApp(cache, [DomainConfig(submission_public_key=str(tmp_path / "none"))])
    assert Response(app, "GET", key_path(ALICE), None).status == 200
    source.down = True
    assert Response(app, "GET", key_path(ALICE), None).status == 200
    got = Response(app, "GET", key_path(BOB), None)
    assert got.status == 503
    assert got.headers["Retry-After"] == "30"


def test_the_local_part_hint_is_only_a_plain_local_part() -> None:
    from milter_wkd.web.app import _local_hint

    assert _local_hint("l=Joe.Doe") == "Joe.Doe"
    assert _local_hint("") is None
    assert _local_hint("l=a*)(mail=*") is None  # no LDAP filter metacharacters
    assert _local_hint("l=" + "a" * 65) is None
    assert _local_hint("l=x%00y") is None


@pytest.mark.integration  # real gpg makes the key
def test_a_submission_key_file_is_served_with_its_one_user_id(tmp_path: Path) -> None:
    from milter_wkd import openpgp
    from tests.support.gnupg import GnuPG

    with GnuPG(tmp_path / "g") as gpg:
        fpr = gpg.generate("key-submission@example.org")
        gpg.run("--quick-add-uid", fpr, "Other <other@example.org>")
        (tmp_path / "submission.pub").write_bytes(gpg.export(fpr, "--armor"))
    source = TableSource()
    cache = KeyCache(source, budget=1 << 20, cleaner=cleaner)
    cache.load()
    app = WkdApp(cache, [DomainConfig(submission_public_key=str(tmp_path / "submission.pub"))])
    got = Response(app, "GET", key_path(Address.parse("key-submission@example.org")),
                   "openpgpkey.example.org")
    assert got.status == 200
    assert openpgp.inspect_key(got.body).user_ids == ("key-submission@example.org",)


def memo_app(tmp_path: Path) -> tuple[WkdApp, KeyCache, TableSource]:
    source = TableSource()
    source.write("uid=alice", (ALICE,), b"KA")
    cache = KeyCache(source, budget=1 << 20, cleaner=cleaner)
    cache.load()
    cache.refresh()  # takes the first change token
    domain = DomainConfig(name="example.org",
                          submission_public_key=str(tmp_path / "missing.pub"))
    return WkdApp(cache, [domain]), cache, source


def test_remembered_answers_follow_every_change_of_the_mirror(tmp_path: Path) -> None:
    app, cache, source = memo_app(tmp_path)
    get = lambda address: Response(  # noqa: E731
        app, "GET", key_path(address), "openpgpkey.example.org")
    for _ in range(2):  # the second answer comes from the memo
        assert get(ALICE).body == b"KA|alice@example.org"
        assert get(BOB).status == 404
    source.write("uid=bob", (BOB,), b"KB")  # an addition alone
    assert cache.refresh()
    assert get(BOB).body == b"KB|bob@example.org"
    assert get(ALICE).body == b"KA|alice@example.org"
    source.write("uid=alice", (ALICE,), b"KA2")  # a replacement alone
    assert cache.refresh()
    assert get(ALICE).body == b"KA2|alice@example.org"
    source.delete("uid=bob")
    cache._delete_check_due = True  # what an unexplained change token asks for
    cache.refresh()
    assert get(BOB).status == 404
    source.write("uid=alice", (ALICE,), b"KA3")
    cache.reset()  # no longer complete: nothing may come from the memo
    assert get(ALICE).body == b"KA3|alice@example.org"  # asked the source


def test_the_memo_is_bounded_and_skips_head(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from milter_wkd.web import app as app_module

    monkeypatch.setattr(app_module, "MEMO_ENTRIES", 3)
    app, _cache, _source = memo_app(tmp_path)
    for n in range(10):
        got = Response(app, "GET", key_path(Address.parse(f"u{n}@example.org")),
                       "openpgpkey.example.org")
        assert got.status == 404
        assert len(app._memo) <= 3
    app._memo.clear()
    head = Response(app, "HEAD", key_path(ALICE), "openpgpkey.example.org")
    assert head.status == 200
    assert head.body == b""
    assert not app._memo
    # Hosts are part of the memo's key: the same path under an odd Host is refused.
    assert Response(app, "GET", key_path(ALICE), "openpgpkey.example.org").status == 200
    assert Response(app, "GET", key_path(ALICE), "evil.org").status == 404


def test_the_responder_serves_by_the_publication_policy() -> None:
    """create_app cleans with [keys]: a key the policy no longer accepts is not served."""
    _signer, _sub, key = simple_key()  # Ed25519 primary, Cv25519 subkey
    alice = Address.parse("alice@example.org")
    default = create_app(config_module.build({}, environ={}), start=False)
    assert default.cache.cleaner(key, alice)
    narrow = create_app(config_module.build({"keys": {"curves": ["cv25519"]}}, environ={}),
                        start=False)
    with pytest.raises(KeyRefused):
        narrow.cache.cleaner(key, alice)


# -- client quirks (issue #14) -------------------------------------------------------------

ADVANCED = "openpgpkey.example.org"
NOBODY = Address.parse("nobody@example.org")


def every_kind_of_answer(app: WkdApp) -> dict[str, Response]:
    """One answer of every code path, keyed by what it is."""
    def boom(*_args: object) -> None:
        raise RuntimeError("a bug")

    answers = {
        "key": Response(app, "GET", key_path(ALICE), ADVANCED),
        "key again (memo)": Response(app, "GET", key_path(ALICE), ADVANCED),
        "key HEAD": Response(app, "HEAD", key_path(ALICE), ADVANCED),
        "404": Response(app, "GET", key_path(NOBODY), ADVANCED),
        "404 again (memo)": Response(app, "GET", key_path(NOBODY), ADVANCED),
        "404 HEAD": Response(app, "HEAD", key_path(NOBODY), ADVANCED),
        "404 odd host": Response(app, "GET", key_path(ALICE), "evil.example"),
        "400": Response(app, "GET", "/.well-known/openpgpkey/hu/x", "example.org"),
        "405": Response(app, "POST", key_path(ALICE), ADVANCED),
        "414": Response(app, "GET", "/.well-known/openpgpkey/hu/" + "y" * 300, "example.org"),
        "policy": Response(app, "GET", "/.well-known/openpgpkey/policy", "example.org"),
        "policy HEAD": Response(app, "HEAD", "/.well-known/openpgpkey/policy", "example.org"),
        "submission-address": Response(
            app, "GET", "/.well-known/openpgpkey/example.org/submission-address", ADVANCED),
    }
    router, peek = app.router, app._peek
    app.router = type("Broken", (), {"route": boom})()  # type: ignore[assignment]
    answers["500 (router)"] = Response(app, "GET", "/.well-known/openpgpkey/policy", ADVANCED)
    app.router = router
    app._peek = boom  # type: ignore[assignment]
    app._memo.clear()
    answers["500 (hot path)"] = Response(app, "GET", key_path(BOB), ADVANCED)
    answers["500 HEAD (hot path)"] = Response(app, "HEAD", key_path(BOB), ADVANCED)
    app._peek = peek
    return answers


def test_every_answer_has_length_cors_and_no_html_and_never_502(
        app: WkdApp, tmp_path: Path) -> None:
    answers = every_kind_of_answer(app)
    source = TableSource()
    lru = WkdApp(KeyCache(source, budget=1 << 20, cleaner=cleaner),
                 [DomainConfig(submission_public_key=str(tmp_path / "none"))])
    source.down = True
    answers["503"] = Response(lru, "GET", key_path(BOB), None)
    answers["503 HEAD"] = Response(lru, "HEAD", key_path(BOB), None)
    expected = {"key": 200, "404": 404, "400": 400, "405": 405, "414": 414, "policy": 200,
                "submission-address": 200, "500": 500, "503": 503}
    for name, got in answers.items():
        assert got.status == expected[name.split()[0]], name
        assert got.status != 502, name  # gpg marks a host dead on 502
        # dirmngr speaks HTTP/1.0: the length is the only end of the body it knows.
        length = int(got.headers["Content-Length"])
        assert length == len(got.body) or ("HEAD" in name and got.body == b""), name
        assert length > 0, name
        assert got.headers["Access-Control-Allow-Origin"] == "*", name
        assert "html" not in got.headers["Content-Type"], name  # Thunderbird and 404s
        if name.startswith("key"):
            assert got.headers["Content-Type"] == "application/octet-stream", name
        else:
            assert got.headers["Content-Type"].startswith("text/plain"), name


def test_an_authorization_header_changes_nothing(app: WkdApp) -> None:
    """Thunderbird sends `Authorization: Basic …` to WKD hosts."""
    for path, host in [(key_path(ALICE), ADVANCED), (key_path(NOBODY), ADVANCED),
                       (key_path(BOB, advanced=False), "example.org"),
                       ("/.well-known/openpgpkey/policy", "example.org")]:
        plain = Response(app, "GET", path, host)
        with_auth = Response(app, "GET", path, host, authorization="Basic dXNlcjpwYXNz")
        assert (with_auth.status, with_auth.headers, with_auth.body) == (
            plain.status, plain.headers, plain.body)


@pytest.mark.parametrize("complete", [True, False], ids=["mirror", "lru"])
def test_a_lowercased_address_is_answered_by_its_hash(tmp_path: Path, complete: bool) -> None:
    """Thunderbird lowercases the whole address (and so `l=`); sq keeps the case. WKD
    hashes the lowercased local part, so both name the same key."""
    source = TableSource()
    source.write("uid=joe", (Address.parse("Joe.Doe@Example.ORG"),), b"KJ")
    cache = KeyCache(source, budget=1 << 20, cleaner=cleaner)
    if complete:
        cache.load()
    app = WkdApp(cache, [DomainConfig(submission_public_key=str(tmp_path / "none"))])
    hash_ = "iy9q119eutrkn8s1mk4r39qejnbu3n5q"
    answers = {Response(app, "GET", f"/.well-known/openpgpkey/{domain}/hu/{hash_}",
                        f"openpgpkey.{domain}", f"l={local}").body
               for domain, local in [("example.org", "joe.doe"), ("example.org", "Joe.Doe"),
                                     ("Example.ORG", "Joe.Doe")]}
    assert len(answers) == 1
    assert answers.pop().startswith(b"KJ|")


def test_a_mixed_case_domain_in_the_path_is_served(app: WkdApp) -> None:
    """@openpgp/wkd-client (OpenPGP.js) sends the domain as typed: ALICE@Example.ORG."""
    path = key_path(ALICE).replace("/example.org/", "/Example.ORG/")
    for host in ("openpgpkey.Example.ORG", "openpgpkey.example.org", None):
        for _ in range(2):  # the second from the memo
            got = Response(app, "GET", path, host)
            assert (got.status, got.body) == (200, b"KA|alice@example.org")
    assert Response(app, "GET", path.replace("Example.ORG", "Example.NET"), ADVANCED).status == (
        404)
    assert Response(app, "GET", path.replace("Example.ORG", "Ex%41mple.ORG"), ADVANCED).status == (
        400)


def test_two_entries_for_one_address_are_not_served_as_two_keys(tmp_path: Path) -> None:
    source = TableSource()
    source.write("uid=alice", (ALICE,), b"KA")
    source.write("uid=mallory", (ALICE,), b"KM")
    cache = KeyCache(source, budget=1 << 20, cleaner=cleaner)
    cache.load()
    app = WkdApp(cache, [DomainConfig(submission_public_key=str(tmp_path / "none"))])
    assert Response(app, "GET", key_path(ALICE), ADVANCED).status == 404


# -- validators ----------------------------------------------------------------------------

def test_a_200_carries_a_strong_etag_of_its_body(app: WkdApp) -> None:
    alice = Response(app, "GET", key_path(ALICE), ADVANCED)
    again = Response(app, "GET", key_path(ALICE, advanced=False), "example.org")
    bob = Response(app, "GET", key_path(BOB), ADVANCED)
    etag = alice.headers["ETag"]
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag)  # strong: no W/
    assert again.headers["ETag"] == etag
    assert bob.headers["ETag"] != etag
    assert Response(app, "HEAD", key_path(ALICE), ADVANCED).headers["ETag"] == etag
    assert "ETag" in Response(app, "GET", "/.well-known/openpgpkey/policy",
                              "example.org").headers
    assert "ETag" not in Response(app, "GET", key_path(NOBODY), ADVANCED).headers


@pytest.mark.parametrize(("method", "path", "host"), [
    ("GET", key_path(ALICE), ADVANCED),
    ("HEAD", key_path(ALICE), ADVANCED),
    ("GET", key_path(ALICE, advanced=False), "Example.ORG"),
    ("GET", "/.well-known/openpgpkey/policy", "example.org"),
    ("HEAD", "/.well-known/openpgpkey/example.org/submission-address", ADVANCED),
])
def test_if_none_match_gives_304_without_a_body(app: WkdApp, method: str, path: str,
                                                host: str) -> None:
    full = Response(app, method, path, host)
    etag = full.headers["ETag"]
    for _ in range(2):  # first answer and memo
        for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
            got = Response(app, method, path, host, if_none_match=header)
            assert (got.status, got.body) == (304, b""), header
            assert got.headers["ETag"] == etag
            assert got.headers["Access-Control-Allow-Origin"] == "*"
            assert got.headers["Cache-Control"] == full.headers["Cache-Control"]
            assert "Content-Length" not in got.headers  # RFC 9110 §8.6: it would be the 200's
        stale = Response(app, method, path, host, if_none_match='"0123"')
        assert (stale.status, stale.headers, stale.body) == (full.status, full.headers,
                                                             full.body)
        app._memo.clear()


def test_a_changed_key_gets_a_new_etag_and_the_old_one_no_304(tmp_path: Path) -> None:
    app, cache, source = memo_app(tmp_path)
    old = Response(app, "GET", key_path(ALICE), ADVANCED).headers["ETag"]
    source.write("uid=alice", (ALICE,), b"KA2")
    assert cache.refresh()
    got = Response(app, "GET", key_path(ALICE), ADVANCED, if_none_match=old)
    assert (got.status, got.body) == (200, b"KA2|alice@example.org")
    assert got.headers["ETag"] != old
    assert Response(app, "GET", key_path(NOBODY), ADVANCED, if_none_match="*").status == 404
