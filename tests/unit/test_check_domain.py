"""The pure parts of `milter-wkd check --domain` (milter_wkd.check.domain): the policy file
as gpg-wks-client reads it, a key answer's headers and body judged as clients use them,
redirects, what DNS answers mean for the methods, and the command line's bad usage."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest

from milter_wkd.check import domain
from milter_wkd.check.domain import (
    GPG_WKD_LIMIT,
    Answer,
    DomainOptions,
    Finding,
    judge_headers,
    judge_key,
    parse_policy,
)
from milter_wkd.cli import main
from milter_wkd.openpgp import armor_key
from milter_wkd.values import Address

DATA = Path(__file__).parent.parent / "data"
ED25519 = (DATA / "vector-ed25519.pgp").read_bytes()
RSA = (DATA / "vector-rsa2048.pgp").read_bytes()
NOW = 1800000000  # after both vectors were made, before the ed25519 subkey expires
VECTOR = Address.parse("vector@example.org")
RSA_ADDRESS = Address.parse("rsa@example.org")
GOOD_HEADERS = {"content-type": "application/octet-stream", "content-length": "419",
                "access-control-allow-origin": "*"}


def levels(found: list[Finding]) -> list[tuple[str, str]]:
    return [(f.level, f.text) for f in found]


# -- the policy file --------------------------------------------------------------------------

def test_policy_flags_and_an_empty_policy() -> None:
    policy = parse_policy(b"mailbox-only\nauth-submit\nprotocol-version: 3\n"
                          b"submission-address: key-submission@example.org\n")
    assert policy.problems == ()
    assert policy.flags == {"mailbox-only": "", "auth-submit": "", "protocol-version": "3",
                            "submission-address": "key-submission@example.org"}
    empty = parse_policy(b"")  # the draft: an empty file says "WKD, no flags"
    assert (empty.flags, empty.problems) == ({}, ())


@pytest.mark.parametrize(("body", "problem"), [
    (b"mailbox-only\nprotocol-version: 3", "does not end in LF"),
    (b"mailbox-only\r\n", "CR characters"),
    (b"protocol-version: three\n", "protocol-version is 'three', not a number"),
    (b"submission-address: nobody\n", "is not a mail address"),
    (b"\xff\xfe\n", "not UTF-8"),
    (b"<html><body>Welcome</body></html>\n", "HTML page"),
])
def test_policy_problems(body: bytes, problem: str) -> None:
    problems = parse_policy(body).problems
    assert any(problem in p for p in problems), problems


def test_unknown_policy_keywords_are_noted_not_refused() -> None:
    policy = parse_policy(b"# a comment\nfuture-flag: 1\nmailbox-only\n")
    assert policy.problems == ()
    assert policy.unknown == ("future-flag",)


# -- a key answer's headers -------------------------------------------------------------------

def test_good_headers() -> None:
    assert judge_headers(GOOD_HEADERS) == []


@pytest.mark.parametrize(("change", "level", "text"), [
    ({"content-type": "text/html; charset=utf-8"}, "fail", "Content-Type is text/html"),
    ({"content-type": "application/pgp-keys"}, "warn", "Content-Type is application/pgp-keys"),
    ({"content-type": None}, "warn", "Content-Type is missing"),
    ({"content-length": None}, "warn", "no Content-Length"),
    ({"access-control-allow-origin": None}, "fail", "no `Access-Control-Allow-Origin: *`"),
    ({"access-control-allow-origin": "https://example.org"}, "fail", "Access-Control"),
])
def test_header_faults(change: dict[str, str | None], level: str, text: str) -> None:
    headers = {k: v for k, v in {**GOOD_HEADERS, **change}.items() if v is not None}
    found = judge_headers(headers)
    assert [f.level for f in found] == [level], found
    assert text in found[0].text, found
    assert found[0].fix


# -- a key answer's body ----------------------------------------------------------------------

def test_a_good_key() -> None:
    found, described = judge_key(RSA, RSA_ADDRESS, NOW)
    assert found == []
    assert described.startswith("2E420195144BA8EE19FBCF347261633600B0FFBB (v4 RSA")


def test_other_user_ids_warn() -> None:
    found, described = judge_key(ED25519, VECTOR, NOW)
    assert levels(found) == [("warn", "19C986C574E9A8CD4F2CDDF8253FEE91C2685C98 also carries "
                              "user IDs for Vector@other.example (gpg keeps only the "
                              "matching one; Thunderbird, Mailvelope and sq import all, "
                              "disclosing them)")]
    assert "keep-uid=mbox=vector@example.org" in found[0].fix
    assert "encryption subkey cv25519" in described


def test_no_user_id_for_the_address_fails() -> None:
    found, _ = judge_key(RSA, VECTOR, NOW)
    assert [f.level for f in found] == ["fail"]
    assert "has no valid user ID for vector@example.org" in found[0].text
    assert "--quick-add-uid" in found[0].fix


def test_armored_fails_but_is_still_judged() -> None:
    found, described = judge_key(armor_key(RSA), RSA_ADDRESS, NOW)
    assert levels(found) == [("fail", "the key is ASCII-armored (WKD serves binary; Proton "
                              "rejects armored keys)")]
    assert described.startswith("2E420195144BA8EE19FBCF347261633600B0FFBB")


def test_an_expired_encryption_subkey_fails() -> None:
    found, _ = judge_key(ED25519, VECTOR, 1859024742 + 1)
    fails = [f for f in found if f.level == "fail"]
    assert len(fails) == 1
    assert "no valid encryption-capable subkey" in fails[0].text


def test_two_keys_one_usable_is_fine_two_usable_warn() -> None:
    found, described = judge_key(ED25519 + RSA, RSA_ADDRESS, NOW)
    assert found == []
    assert described.endswith("beside 1 unusable one(s)")
    found, _ = judge_key(RSA + RSA, RSA_ADDRESS, NOW)
    assert [(f.level, f.text.split(" (")[0]) for f in found] == [
        ("warn", "2 usable keys in one answer")]


def test_no_usable_key_fails_with_every_reason() -> None:
    found, _ = judge_key(ED25519 + RSA, Address.parse("nobody@example.org"), NOW)
    assert [f.level for f in found] == ["fail", "fail"]


@pytest.mark.parametrize(("body", "text"), [
    (b"", "the body is empty"),
    (b"<html>Not found</html>", "not OpenPGP data"),
    (RSA[:40], "not OpenPGP data: truncated packet"),
    (RSA + b"\x00" * GPG_WKD_LIMIT, f"over gpg's WKD limit of {GPG_WKD_LIMIT}"),
])
def test_bodies_that_are_no_key(body: bytes, text: str) -> None:
    found, _ = judge_key(body, RSA_ADDRESS, NOW)
    assert any(f.level == "fail" and text in f.text for f in found), found


def test_a_v6_key_warns() -> None:
    v6 = bytes([0xC6, 5, 6, 0x68, 0, 0, 0])  # new-format public key packet, version 6
    found, described = judge_key(v6, RSA_ADDRESS, NOW)
    assert [f.level for f in found] == ["warn"]
    assert "gpg 2.2" in found[0].text
    assert described == "v6 key"


# -- redirects --------------------------------------------------------------------------------

def answer(status: int, *redirects: str) -> Answer:
    return Answer("https://example.org/x", status, {}, b"", redirects)


def test_redirects() -> None:
    assert domain._redirect_findings(answer(200)) == []
    assert [f.level for f in domain._redirect_findings(
        answer(200, "https://a.example/", "https://b.example/"))] == ["warn"]
    too_many = domain._redirect_findings(answer(302, "https://a.example/", "https://b.example/"))
    assert [f.level for f in too_many] == ["fail"]
    assert "more than 2" in too_many[0].text
    plain = domain._redirect_findings(answer(301, "http://example.org/x"))
    assert [f.level for f in plain] == ["fail"]
    assert "not HTTPS" in plain[0].text


# -- DNS --------------------------------------------------------------------------------------

def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, int | str]) -> None:
    """answers: host -> an address, or a gaierror code."""
    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list[object]:
        found = answers[host]
        if isinstance(found, int):
            raise socket.gaierror(found, "lookup failed")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (found, port))]
    monkeypatch.setattr(domain.socket, "getaddrinfo", getaddrinfo)


def dns(options: DomainOptions) -> tuple[list[tuple[str, str]], list[tuple[str, bool]]]:
    state = domain._State()
    results = [(r.label, r.detail) for r in domain.check_dns(options, state)]
    return results, [(m.name, m.required) for m in state.methods]


def test_dns_advanced_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {"openpgpkey.example.org": "192.0.2.1", "example.org": "192.0.2.2"})
    results, probed = dns(DomainOptions("example.org"))
    assert results[0][0] == "ok"
    assert "gpg fails too" in results[0][1]
    assert probed == [("advanced", True), ("direct", False)]


def test_dns_direct_only(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {"openpgpkey.example.org": socket.EAI_NONAME,
                           "example.org": "192.0.2.2"})
    results, probed = dns(DomainOptions("example.org"))
    assert "has no address record: clients use the direct method" in results[0][1]
    assert probed == [("direct", True)]


def test_dns_nothing_resolves_or_lookup_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {"openpgpkey.example.org": socket.EAI_NONAME,
                           "example.org": socket.EAI_NONAME})
    results, probed = dns(DomainOptions("example.org"))
    assert results[-1][0] == "FAIL"
    assert "neither" in results[-1][1]
    assert probed == []
    fake_dns(monkeypatch, {"openpgpkey.example.org": socket.EAI_AGAIN,
                           "example.org": "192.0.2.2"})
    results, probed = dns(DomainOptions("example.org"))
    assert results == [("FAIL", "openpgpkey.example.org: look-up failed: [Errno -3] "
                        "lookup failed")]
    assert probed == []


def test_dns_skipped_with_connect() -> None:
    results, probed = dns(DomainOptions("example.org", connect=("127.0.0.1", 8443)))
    assert results == [("skip", "skipped (--connect given): openpgpkey.example.org and "
                        "example.org reached at 127.0.0.1:8443")]
    assert probed == [("advanced", True), ("direct", True)]


def test_a_method_clients_skip_only_warns() -> None:
    direct = domain.methods("example.org")[1]
    skipped = domain._result("policy", dataclasses.replace(direct, required=False), "fail",
                             "policy answered 404", "serve it")
    assert skipped.label == "warn"
    assert "clients do not use this method" in skipped.detail


# -- the command line -------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["--domain", "example.org", "--address", "bob@elsewhere.example"],
     "--address bob@elsewhere.example is not in example.org"),
    (["--address", "alice@example.org"], "--address needs --domain"),
    (["--domain", "not a domain"], "--domain wants a mail domain"),
    (["--domain", "example.org", "--connect", "nowhere"], "--connect wants HOST:PORT"),
    (["--domain", "example.org", "--config", "x.toml"], "leave out --config"),
    (["--json"], "--connect and --json go with --domain"),
])
def test_bad_usage_exits_2(args: list[str], message: str,
                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", *args]) == 2
    assert message in capsys.readouterr().err
