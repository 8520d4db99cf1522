"""The pure parts of `milter-wkd check`'s probes of the self-service page (group portal):
CSP, framing, HSTS and cookie rules, the sign-in form's fields, the SRI hash (the same as
the page's), certificate expiry, the page's URL and the [check] keys that say where it
is; and that the page's own answers (Flask's test client, no peers) pass those rules, so
the probes against the sandbox and through nginx test the deployment, not a mismatch
between two readings of one rule."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from milter_wkd import check
from milter_wkd.check import portal as probes
from milter_wkd.cli import main
from milter_wkd.config import ConfigError, build
from milter_wkd.portal import app as portal_app
from milter_wkd.portal import create_app
from milter_wkd.store.memory import MemoryStore

OURS = ("default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; "
        "base-uri 'none'")
GOOD = {"content-security-policy": OURS, "x-frame-options": "DENY",
        "x-content-type-options": "nosniff"}


def test_parse_csp_directives_and_first_of_a_repeat() -> None:
    assert probes.parse_csp(" default-src 'none' ; Script-Src 'self' X;;script-src *") == {
        "default-src": ["'none'"], "script-src": ["'self'", "x"]}
    assert probes.parse_csp("") == {}


def test_our_headers_pass() -> None:
    assert probes.header_problems(GOOD) == []
    # frame-ancestors alone forbids framing too.
    assert probes.header_problems({**GOOD, "x-frame-options": ""}) == []


@pytest.mark.parametrize(("change", "problem"), [
    ({"content-security-policy": ""}, "no Content-Security-Policy"),
    ({"content-security-policy": OURS + "; script-src 'self' 'unsafe-inline'"},
     "allows 'unsafe-inline'"),
    ({"content-security-policy": "default-src 'self' 'unsafe-eval' 'UNSAFE-INLINE'"},
     "allows 'unsafe-eval' and 'unsafe-inline'"),
    ({"content-security-policy": "style-src 'self'; frame-ancestors 'none'"},
     "does not restrict scripts"),
    ({"content-security-policy": "default-src 'none'", "x-frame-options": ""},
     "framing is not forbidden"),
    ({"content-security-policy": "default-src 'none'; frame-ancestors *",
      "x-frame-options": "ALLOW-FROM https://x"}, "framing is not forbidden"),
    ({"x-content-type-options": ""}, "nosniff"),
])
def test_header_problems(change: dict[str, str], problem: str) -> None:
    found = probes.header_problems({**GOOD, **change})
    assert len(found) == 1, found
    assert problem in found[0]


@pytest.mark.parametrize(("value", "max_age"), [
    ("max-age=31536000; includeSubDomains", 31536000), ('max-age="600"', 600),
    ("includeSubDomains; MAX-AGE=0", 0), ("max-age=-1", None), ("max-age=1y", None),
    ("includeSubDomains", None), ("", None)])
def test_hsts_max_age(value: str, max_age: int | None) -> None:
    assert probes.hsts_max_age(value) == max_age


def test_cookie_flags() -> None:
    flask = "portal_session=eyJ4IjoxfQ.Z.sig; Secure; HttpOnly; Path=/; SameSite=Strict"
    assert probes.cookie_problems((flask,)) == []
    expires = ("portal_session=v; Expires=Thu, 01 Jan 2026 00:00:00 GMT; Secure; HttpOnly; "
               "Path=/; SameSite=strict")
    assert probes.cookie_problems((expires,)) == []
    assert probes.cookie_problems(("portal_session=v; HttpOnly; Path=/; SameSite=Lax",)) == [
        "cookie portal_session lacks Secure, SameSite=Strict"]
    assert probes.cookie_problems(("a=1; Secure; SameSite=Strict", flask)) == [
        "cookie a lacks HttpOnly"]
    assert probes.cookie_problems(("no cookie here",))[0].startswith(
        "a Set-Cookie header that does not parse")


SIGN_IN = """<form method="post"><input type="hidden" name="csrf_token" value="tok">
<input name="address" autocomplete="username"><input type="password" name="password"
autocomplete="current-password"></form>"""


def test_form_problems_and_token() -> None:
    assert probes.form_problems(SIGN_IN) == []
    answer = probes.PageAnswer(200, {}, (), SIGN_IN.encode())
    assert answer.token() == "tok"
    assert probes.form_problems(SIGN_IN.replace('autocomplete="username"', "")) == [
        "field address without autocomplete=username"]
    assert probes.form_problems(SIGN_IN.replace('name="password"', 'name="pw"')) == [
        "no field named password"]
    assert probes.form_problems(SIGN_IN.replace('value="tok"', 'value=""')) == [
        "no CSRF token (csrf_token)"]
    assert probes.PageAnswer(200, {}, (), b"<p>x</p>").token() is None


def test_sri_is_the_pages_own() -> None:
    """The doctor reads OpenPGP.js from the installed page without importing Flask; its path
    and hash must be the ones the page puts in its integrity attribute."""
    assert f"static/{portal_app.OPENPGPJS_SCRIPT}" == probes.OPENPGPJS_PATH
    path = Path(portal_app.__file__).parent / probes.OPENPGPJS_PATH
    assert probes.subresource_integrity(path.read_bytes()) == (
        portal_app.subresource_integrity(path))


def test_certificate_expiry() -> None:
    found = probes.certificate_expiry({"notAfter": "Jan  1 00:00:00 2027 GMT"})
    assert found is not None
    assert (found.year, found.month, found.day, found.hour) == (2027, 1, 1, 0)
    assert probes.certificate_expiry(None) is None
    assert probes.certificate_expiry({}) is None


def test_portal_url_from_the_first_domain_and_options() -> None:
    cfg = build({"domains": [{"name": "Mail.Example"}, {"name": "b.example"}],
                 "portal": {}}, environ={})
    options = check.Options.from_config(cfg.check)
    assert probes.portal_url(cfg, options) == "https://keys.mail.example/"
    cfg = build({"check": {"portal_url": "https://mail.example.org/keys",
                           "portal_connect": "[::1]:8443", "ca_file": "/a",
                           "portal_ca_file": "/b"}}, environ={})
    options = check.Options.from_config(cfg.check)
    assert probes.portal_url(cfg, options) == "https://mail.example.org/keys/"
    assert (options.portal_connect, options.ca_file, options.portal_ca_file) == (
        ("::1", 8443), "/a", "/b")
    with pytest.raises(ConfigError, match="portal_connect"):
        build({"check": {"portal_connect": "nowhere"}}, environ={})


def test_client_paths_and_origin() -> None:
    client = probes.PortalClient("https://mail.example.org/keys")
    assert (client.host, client.port, client.prefix, client.origin) == (
        "mail.example.org", 443, "/keys/", "https://mail.example.org")
    client = probes.PortalClient("https://keys.example.org:8443/")
    assert (client.prefix, client.origin, client.url) == (
        "/", "https://keys.example.org:8443", "https://keys.example.org:8443/")
    with pytest.raises(ValueError, match="not an https URL"):
        probes.PortalClient("http://keys.example.org/")


def test_no_portal_section_no_probe(tmp_path: Path) -> None:
    cfg = build({}, environ={})
    assert "portal" not in cfg.given
    assert list(probes.check_portal(cfg, check.Options())) == []
    assert "portal" in build({}, environ={"MILTER_WKD_PORTAL_PROVIDER_NAME": "X"}).given


@pytest.mark.parametrize(("mode", "content", "label", "detail"), [
    (0o600, "s" * 48, "ok", "is private"),
    (0o640, "s" * 48, "warn", "readable by its group"),
    (0o644, "s" * 48, "FAIL", "readable by others"),
    (0o600, "short\n", "FAIL", "holds 5 bytes, fewer than 32"),
    (None, "", "FAIL", "No such file"),
])
def test_secret_key_file(tmp_path: Path, mode: int | None, content: str, label: str,
                         detail: str) -> None:
    path = tmp_path / "portal.secret"
    if mode is not None:
        path.write_text(content)
        os.chmod(path, mode)
    cfg = build({"portal": {"secret_key_file": str(path)}}, environ={})
    # Nobody listens on port 9 of loopback: the file's line comes first, then one FAIL.
    options = check.Options(portal_url="https://keys.example.org/",
                            portal_connect=("127.0.0.1", 9), timeout=2.0)
    found = list(probes.check_portal(cfg, options))
    assert (found[0].label, detail in found[0].detail) == (label, True), found[0]
    assert [r.label for r in found[1:]] == ["FAIL"]
    assert "https://keys.example.org/sign-in via 127.0.0.1:9" in found[1].detail


def test_bad_portal_connect_is_bad_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--portal-connect", "nowhere"]) == 2
    assert "--portal-connect wants HOST:PORT" in capsys.readouterr().err


def test_the_pages_own_answers_pass_the_rules() -> None:
    """GET /sign-in of the page itself (Flask's test client over https://): the doctor finds
    nothing wrong, and a cookie is set."""
    config = build({"portal": {}}, environ={})
    app = create_app(config, MemoryStore(), authenticator=None,  # type: ignore[arg-type]
                     secret_key=b"k" * 32)
    with app.test_client() as client:
        response = client.get("/sign-in", base_url="https://keys.example.org")
        html = response.get_data(as_text=True)
        cookies = tuple(response.headers.getlist("Set-Cookie"))
        headers = {k.lower(): v for k, v in response.headers.items()}
        script = client.get("/" + probes.OPENPGPJS_PATH, base_url="https://keys.example.org")
        script_status, script_type = script.status_code, script.mimetype
        script.close()
    assert response.status_code == 200
    assert probes.form_problems(html) == []
    assert probes.header_problems(headers) == []
    assert cookies
    assert probes.cookie_problems(cookies) == []
    assert (script_status, script_type) == (200, "text/javascript")


@pytest.mark.parametrize(("portal", "problems"), [
    ({}, []),  # HTTPS on every address, no proxy trusted: the page serving browsers itself
    ({"listen": "127.0.0.1:8443", "cert_file": "", "behind_proxy": True}, []),
    ({"listen": "[::1]:8443", "cert_file": "", "behind_proxy": True}, []),
    ({"listen": "0.0.0.0:8443", "cert_file": "", "behind_proxy": True},
     ["behind_proxy = true, but it listens on 0.0.0.0:8443", "plain HTTP"]),
    ({"listen": "192.0.2.1:443", "behind_proxy": True}, ["behind_proxy = true"]),
    ({"cert_file": ""}, ["plain HTTP (cert_file = \"\") on 0.0.0.0:8443"]),
])
def test_listen_problems(portal: dict[str, object], problems: list[str]) -> None:
    found = probes.listen_problems(build({"portal": portal}, environ={}).portal)
    assert len(found) == len(problems), found
    for line, start in zip(found, problems, strict=True):
        assert line.startswith(start), line
