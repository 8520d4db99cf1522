"""`milter-wkd check`'s probes of the self-service page (group portal) against the sandbox's
real page (`milter-wkd portal` on the sandbox's slapd): everything passes; then one fault
at a time, each the right FAIL (or warning) line and nothing else failing.

Faults of the page's own host: a CA the check does not trust, a certificate for another
name, nobody listening, a secret_key_file open to others, no [portal] section (nothing
probed). Faults of a proxy in front (docs/nginx-wkd.conf's host block as shipped, with one
line changed or added, before a second `milter-wkd portal` set up for nginx; see
tests/integration/test_portal_nginx.py): X-Forwarded-Proto not set (the page refuses
browsers' own POSTs), a CSP with 'unsafe-inline', framing allowed, cookie flags dropped,
Set-Cookie hidden, refusals turned into 200 pages, a stale copy of OpenPGP.js or the
right one with the wrong type, a short HSTS max-age.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from milter_wkd import check
from milter_wkd.check.portal import OPENPGPJS_PATH, check_portal
from milter_wkd.cli import main
from milter_wkd.config import load
from milter_wkd.sandbox import Sandbox
from milter_wkd.sandbox.daemons import LOOPBACK, free_port
from milter_wkd.sandbox.wkd import make_test_pki
from tests.integration.test_portal_nginx import Nginx, ProxiedPortal, host_block
from tests.support.mail import sandbox_fixture  # noqa: F401 (the `sandbox` fixture)
from tests.support.peers import require_binary

pytestmark = pytest.mark.integration


def options(sandbox: Sandbox, **changes: object) -> check.Options:
    settings: dict[str, object] = {
        "portal_url": sandbox.portal.portal_url,
        "portal_connect": (LOOPBACK, sandbox.portal.port),
        "portal_ca_file": str(sandbox.portal.ca_file), "timeout": 5.0}
    settings.update(changes)
    return check.Options(**settings)  # type: ignore[arg-type]


def probe(sandbox: Sandbox, config_path: Path | None = None,
          **changes: object) -> list[check.CheckResult]:
    config = load(config_path or sandbox.config_path, environ={})
    return list(check_portal(config, options(sandbox, **changes)))


def not_ok(found: list[check.CheckResult]) -> list[str]:
    return [f"{r.label} {r.detail}" for r in found if r.ok is not True or r.warning]


def config_copy(sandbox: Sandbox, tmp_path: Path, text: str | None = None) -> Path:
    path = tmp_path / "milter-wkd.toml"
    path.write_text(text if text is not None else sandbox.config_path.read_text())
    return path


def test_the_sandbox_page_passes(sandbox: Sandbox) -> None:
    found = probe(sandbox)
    assert not_ok(found) == []
    url = sandbox.portal.portal_url
    assert [r.detail.split(" (")[0] for r in found] == [
        f"[portal] secret_key_file {sandbox.portal.secret_file} is private",
        f"{url}sign-in answers via {LOOPBACK}:{sandbox.portal.port}",
        "security headers: CSP without unsafe-inline, framing forbidden, nosniff, no HSTS",
        "cookie portal_session: Secure, HttpOnly, SameSite=Strict",
        "a POST without CSRF token is refused",
        "a POST from another origin is refused",
        "its own form's POST reaches the sign-in",
        "OpenPGP.js served with the SRI hash the page references"]
    assert "certificate valid for keys.example.org until 20" in found[1].detail


def test_cli_prints_the_portal_lines(sandbox: Sandbox,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    # Only what the sandbox's [check] section says (portal_url, portal_connect,
    # portal_ca_file), every other group left out.
    others = [f"--skip={group}" for group in check.GROUPS if group not in ("directory",
                                                                          "portal")]
    code = main(["check", "--config", str(sandbox.config_path), *others])
    out = capsys.readouterr().out
    assert code == 0, out
    assert len(re.findall(r"(?m)^ok   portal: ", out)) == 8, out


def test_a_ca_the_check_does_not_trust(sandbox: Sandbox) -> None:
    # The system store does not know the sandbox's test CA.
    found = probe(sandbox, portal_ca_file=None, ca_file=None)
    (failure,) = not_ok(found)
    # The page sends its chain with the test CA in it: a self-signed root nobody trusts.
    assert failure == ("FAIL certificate of keys.example.org not valid: self-signed "
                       "certificate in certificate chain")
    assert "[check] portal_ca_file for a private CA" in found[-1].fix


def test_a_certificate_for_another_name(sandbox: Sandbox) -> None:
    found = probe(sandbox, portal_url=f"https://mail.example.org:{sandbox.portal.port}/")
    (failure,) = not_ok(found)
    assert failure.startswith("FAIL certificate of mail.example.org not valid: Hostname "
                              "mismatch"), failure


def test_nobody_listening(sandbox: Sandbox) -> None:
    port = free_port()
    found = probe(sandbox, portal_connect=(LOOPBACK, port))
    (failure,) = not_ok(found)
    assert f"sign-in via {LOOPBACK}:{port}: " in failure
    assert "Connection refused" in failure
    assert "portal_connect says where it runs" in found[-1].fix


def test_a_secret_key_file_open_to_others(sandbox: Sandbox, tmp_path: Path) -> None:
    secret = tmp_path / "portal.secret"
    secret.write_bytes(sandbox.portal.secret_file.read_bytes())
    secret.chmod(0o644)
    text, count = re.subn(r"(?m)^secret_key_file = .*$", f'secret_key_file = "{secret}"',
                          sandbox.config_path.read_text())
    assert count == 1
    found = probe(sandbox, config_copy(sandbox, tmp_path, text))
    assert not_ok(found) == [f"FAIL [portal] secret_key_file {secret} is readable by others"]
    assert found[0].fix.startswith(f"chmod 600 {secret}")


def test_no_portal_section_nothing_probed(sandbox: Sandbox, tmp_path: Path) -> None:
    text = sandbox.config_path.read_text()
    start = text.index("\n[portal]\n")
    end = text.find("\n[", start + 1)
    without = text[:start + 1] + (text[end + 1:] if end != -1 else "")
    assert "[portal]" not in without
    path = config_copy(sandbox, tmp_path, without)
    # The page still runs and [check] still names it; without [portal] it is not ours.
    assert probe(sandbox, path) == []
    found = list(check.run(load(path, environ={}), options(sandbox, skip=frozenset(
        set(check.GROUPS) - {"portal"}))))
    assert [r for r in found if r.name == "portal"] == []


# -- a proxy in front, one fault at a time ------------------------------------------------


@pytest.fixture(scope="module")
def upstream(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory,
             ) -> Iterator[ProxiedPortal]:
    require_binary("nginx")
    portal = ProxiedPortal(sandbox, tmp_path_factory.mktemp("proxied-portal"))
    try:
        yield portal
    finally:
        portal.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_test_pki(tmp_path_factory.mktemp("pki"), ["keys.example.org"])


STALE = "// an older OpenPGP.js\n"
ROOT = "    location / {\n"  # where a fault adds a location of its own
HEADERS = "    client_max_body_size 91m;\n"  # where a fault adds server-level directives
FAULTS: dict[str, tuple[dict[str, str], list[str]]] = {
    "as shipped": ({}, []),
    "X-Forwarded-Proto not set": (
        {"proxy_set_header X-Forwarded-Proto $scheme;": ""},
        ["FAIL a POST of its own sign-in form from https://keys.example.org:{port} was "
         "answered 403: browsers cannot sign in"]),
    "a CSP with unsafe-inline": (
        {HEADERS: HEADERS + "    proxy_hide_header Content-Security-Policy;\n"
         "    add_header Content-Security-Policy \"default-src 'self'; script-src 'self' "
         "'unsafe-inline'; frame-ancestors 'none'\" always;\n"},
        ["FAIL security headers: the Content-Security-Policy allows 'unsafe-inline'"]),
    "framing allowed": (
        {HEADERS: HEADERS + "    proxy_hide_header X-Frame-Options;\n"
         "    proxy_hide_header Content-Security-Policy;\n"
         "    add_header Content-Security-Policy \"default-src 'none'; style-src 'self'\" "
         "always;\n"},
        ["FAIL security headers: framing is not forbidden (no X-Frame-Options DENY and no "
         "CSP frame-ancestors 'none')"]),
    "cookie flags dropped": (
        {HEADERS: HEADERS + "    proxy_cookie_flags ~ nosecure nohttponly nosamesite;\n"},
        ["FAIL session cookie: cookie portal_session lacks Secure, HttpOnly, "
         "SameSite=Strict"]),
    "Set-Cookie hidden": (
        {HEADERS: HEADERS + "    proxy_hide_header Set-Cookie;\n"},
        ["FAIL GET sign-in set no session cookie (it holds the form's CSRF token, so no "
         "sign-in can work)",
         # Without a session the token cannot be checked: the page's own POST fails too.
         "FAIL a POST of its own sign-in form from https://keys.example.org:{port} was "
         "answered 400: browsers cannot sign in"]),
    "refusals turned into 200 pages": (
        {HEADERS: HEADERS + "    proxy_intercept_errors on;\n"
         "    error_page 400 403 =200 /sign-in;\n"},
        ["FAIL a POST without CSRF token was not refused (answered 200): other sites' "
         "pages can submit the forms",
         "FAIL a POST with Origin https://milter-wkd-check.invalid was not refused "
         "(answered 200)"]),
    "a stale OpenPGP.js": (
        {ROOT: "    location /static/vendor/ { alias @STALE@/; }\n" + ROOT},
        ["FAIL OpenPGP.js served is sha384-"]),
    "OpenPGP.js as text/plain": (
        {ROOT: "    location /static/vendor/ { alias @VENDOR@/; types { } "
               "default_type text/plain; }\n" + ROOT},
        ["FAIL OpenPGP.js is served as text/plain: with nosniff browsers refuse to run it"]),
    "a short HSTS": (
        {'"max-age=31536000"': '"max-age=300"'},
        ["warn Strict-Transport-Security max-age=300 is short"]),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_one_proxy_fault_at_a_time(sandbox: Sandbox, upstream: ProxiedPortal,
                                   pki: tuple[Path, Path, Path], tmp_path: Path,
                                   fault: str) -> None:
    ca, cert, key = pki
    vendor = Path(check.portal.__file__).resolve().parents[1] / "portal" / Path(
        OPENPGPJS_PATH).parent
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / Path(OPENPGPJS_PATH).name).write_bytes(
        (vendor / Path(OPENPGPJS_PATH).name).read_bytes() + STALE.encode())
    change, expected = FAULTS[fault]
    port = free_port()
    change = {old: new.replace("@STALE@", str(stale)).replace("@VENDOR@", str(vendor))
              for old, new in change.items()}
    nginx = Nginx(tmp_path / "nginx", host_block(port=port, upstream=upstream.port,
                                                 cert=cert, key=key, change=change))
    try:
        found = probe(sandbox, portal_url=f"https://keys.example.org:{port}/",
                      portal_connect=(LOOPBACK, port), portal_ca_file=str(ca))
    finally:
        nginx.stop()
    wanted = [line.format(port=port) for line in expected]
    got = not_ok(found)
    assert len(got) == len(wanted), got
    for line, prefix in zip(got, wanted, strict=True):
        assert line.startswith(prefix), (line, prefix)
    if fault == "as shipped":
        assert "HSTS max-age=31536000" in "\n".join(r.detail for r in found)
