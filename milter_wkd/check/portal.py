"""The self-service page over HTTPS (group portal), probed only when the config file has a
[portal] section, as a browser meets it (through nginx when nginx is in front):

- the sign-in page answers 200 over HTTPS with a certificate valid for the URL's host (a
  warning when it expires within CERT_WARN_DAYS), and its form has the fields password
  managers look for (`address` autocomplete=username, `password` current-password) and a
  CSRF token;
- its security headers: a Content-Security-Policy that restricts scripts (default-src or
  script-src) and allows no 'unsafe-inline' or 'unsafe-eval' anywhere, framing forbidden
  (X-Frame-Options DENY/SAMEORIGIN or frame-ancestors 'none'/'self'), X-Content-Type-Options
  nosniff, and Strict-Transport-Security when it is set (well-formed; a warning below
  HSTS_MIN_SECONDS);
- every cookie that GET sets (the session cookie, which holds the form's CSRF token) is
  Secure, HttpOnly and SameSite=Strict;
- a POST to /sign-in without the CSRF token is refused (400 or 403), and one with the token
  but another site's Origin is refused (403): neither reaches the password check; the
  form's own POST (token, this origin, an empty password) does (401): behind a proxy
  that does not forward the scheme and host, the page refuses every browser's POST. That
  one costs a count in the page's password rate limits (for the address
  milter-wkd-check@invalid and the checking host), never a directory bind;
- OpenPGP.js (the file the key-generation page loads) is served as JavaScript whose sha384
  is the Subresource Integrity hash the page references (the page computes it from the
  installed file when it starts; this probe from the same file: a proxy or cache serving
  another copy makes browsers refuse the script);
- [portal] secret_key_file is private (readable by others: FAIL; by its group: warning)
  and long enough, since whoever reads it can forge sessions; [portal] listen is loopback
  when behind_proxy is set (else anyone reaching the port forges X-Forwarded-*) or when
  cert_file is empty (plain HTTP).

`PortalClient` is the browser's part in the page's forms (cookies, the CSRF token parsed
from the form, Origin), over one keep-alive connection; `make demo`, benchmarks/portal.py
and the tests sign in and upload keys with it.

Configuration: [check] portal_url ({domain}: the first [[domains]] name), portal_connect
(connect to HOST:PORT instead of the URL's host from DNS, still validating the
certificate for that host), portal_ca_file (else ca_file, else the system store), timeout;
[portal] secret_key_file, listen, cert_file, behind_proxy.
Failures: an invalid certificate and a page that does not answer are one FAIL line each
(the rest is then skipped); every other wrong answer is a FAIL line naming what is wrong
and how to fix it.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import re
import socket
import ssl
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from html.parser import HTMLParser
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from milter_wkd.check.options import Options
from milter_wkd.check.results import CheckResult, fail, ok, skip, warn, why
from milter_wkd.check.wkd import PinnedHttps
from milter_wkd.config import Config, PortalConfig, parse_host_port

# What the page serves OpenPGP.js as (milter_wkd.portal.app.OPENPGPJS_SCRIPT; read here
# from the installed file, not imported, so that the doctor needs no Flask).
OPENPGPJS_PATH = "static/vendor/openpgp-6.3.2.min.js"
_PORTAL_STATIC = Path(__file__).resolve().parents[1] / "portal"
CERT_WARN_DAYS = 14
HSTS_MIN_SECONDS = 180 * 86400  # six months, the usual minimum of scanners
MAX_BODY = 2 * 1024 * 1024  # OpenPGP.js is about 400 KiB
_FOREIGN_ORIGIN = "https://milter-wkd-check.invalid"
_SECRET_MIN = 32
_PORTAL_FIX = ("run `milter-wkd portal --config FILE` (systemd/milter-wkd-portal.service) "
               "or the reverse proxy in front of it (docs/nginx-wkd.conf)")


# -- a browser's part ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PageAnswer:
    status: int
    headers: dict[str, str]  # lower-case names; repeated ones joined by ", "
    set_cookies: tuple[str, ...]  # each Set-Cookie header as sent
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def token(self) -> str | None:
        """The CSRF token of the page's first form that has one."""
        for attrs in form_inputs(self.text):
            if attrs.get("name") == "csrf_token" and attrs.get("value"):
                return attrs["value"]
        return None


class _Inputs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("input", "textarea", "script"):
            self.found.append({"tag": tag, **{k: v or "" for k, v in attrs}})


def form_inputs(html: str) -> list[dict[str, str]]:
    """The attributes of every input, textarea and script element of a page (plus `tag`)."""
    parser = _Inputs()
    parser.feed(html)
    parser.close()
    return parser.found


class PortalClient:
    """A client of the page at `url` (its base, e.g. https://keys.example.org/ or
    https://mail.example.org/keys/): one keep-alive HTTPS connection to `connect` (or the
    URL's host), the certificate checked for the URL's host against ca_file (None: the
    system store); cookies kept as a browser keeps them; every POST carries this origin's
    Origin unless told otherwise. Raises what http.client, ssl and socket raise."""

    def __init__(self, url: str, *, ca_file: str | None = None,
                 connect: tuple[str, int] | None = None, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"not an https URL: {url}")
        self.host = parts.hostname
        self.port = parts.port or 443
        self.prefix = parts.path.rstrip("/") + "/"
        self.origin = f"https://{self.host}" + (f":{self.port}" if self.port != 443 else "")
        self.url = self.origin + self.prefix
        self.connect = connect
        self.timeout = timeout
        self.tls = ssl.create_default_context(cafile=ca_file)
        self.cookies: dict[str, str] = {}
        self.peer_certificate: dict[str, object] | None = None
        self._conn: PinnedHttps | None = None

    def _connection(self) -> PinnedHttps:
        if self._conn is None:
            conn = PinnedHttps(self.host, self.port, address=self.connect, tls=self.tls,
                               timeout=self.timeout)
            conn.connect()
            # http.client writes a POST's headers and body in two sends: with Nagle on,
            # the body waits for the server's delayed ACK (40 ms a request). Browsers
            # set TCP_NODELAY too.
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if isinstance(conn.sock, ssl.SSLSocket):
                self.peer_certificate = dict(conn.sock.getpeercert() or {})
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> PortalClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, fields: Mapping[str, str] | None = None,
                origin: str | None = "", headers: Mapping[str, str] | None = None,
                ) -> PageAnswer:
        """One request to path (relative to the page's base: "sign-in"); fields are sent
        form-encoded. origin "" sends this page's own Origin on a POST, None none."""
        sent = {"Host": self.host + (f":{self.port}" if self.port != 443 else ""),
                "User-Agent": "milter-wkd-check", "Accept-Language": "en"}
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if fields is not None:
            body = urlencode(fields).encode("ascii")
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        if method == "POST" and origin is not None:
            sent["Origin"] = origin or self.origin
        sent.update(headers or {})
        target = self.prefix + path.lstrip("/")
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(method, target, body=body, headers=sent)
                response = conn.getresponse()
                data = response.read(MAX_BODY)
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                    ssl.SSLEOFError, ssl.SSLZeroReturnError):
                # The server closed the keep-alive connection (idle, or after an error
                # answer) before this request: once more, on a new one.
                self.close()
                if attempt == 2:
                    raise
        if response.getheader("Connection", "").lower() == "close":
            self.close()
        answer = _answer(response, data)
        self._keep(answer.set_cookies)
        return answer

    def _keep(self, set_cookies: tuple[str, ...]) -> None:
        for raw in set_cookies:
            for name, morsel in _cookie(raw).items():
                if morsel["max-age"] == "0" or morsel.value == "":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value

    def sign_in(self, address: str, password: str) -> PageAnswer:
        """The sign-in form filled in and sent: 303 to the key page when it worked."""
        page = self.request("GET", "sign-in")
        token = page.token()
        if page.status != 200 or token is None:
            raise http.client.HTTPException(f"sign-in page: {page.status}, token {token!r}")
        return self.request("POST", "sign-in", fields={
            "csrf_token": token, "address": address, "password": password})

    def upload(self, armored_key: str) -> PageAnswer:
        """A key pasted into the key page's upload form and sent (200: published)."""
        page = self.request("GET", "keys")
        token = page.token()
        if page.status != 200 or token is None:
            raise http.client.HTTPException(f"key page: {page.status} (signed in?)")
        return self.request("POST", "upload", fields={
            "csrf_token": token, "key_text": armored_key})


def _answer(response: http.client.HTTPResponse, data: bytes) -> PageAnswer:
    headers: dict[str, str] = {}
    cookies = []
    for name, value in response.getheaders():
        lower = name.lower()
        if lower == "set-cookie":
            cookies.append(value)
        headers[lower] = f"{headers[lower]}, {value}" if lower in headers else value
    return PageAnswer(response.status, headers, tuple(cookies), data)


def _cookie(raw: str) -> SimpleCookie:
    jar = SimpleCookie()
    try:
        jar.load(raw)
    except CookieError:
        return SimpleCookie()
    return jar


# -- what is wrong with an answer (pure) ---------------------------------------------------


def parse_csp(value: str) -> dict[str, list[str]]:
    """A Content-Security-Policy as directive -> sources (lower case; the first of a
    repeated directive counts, as in browsers)."""
    found: dict[str, list[str]] = {}
    for part in value.split(";"):
        tokens = part.split()
        if tokens:
            found.setdefault(tokens[0].lower(), [t.lower() for t in tokens[1:]])
    return found


def header_problems(headers: Mapping[str, str]) -> list[str]:
    """What is wrong with the security headers of the sign-in page (empty: nothing)."""
    problems = []
    csp_value = headers.get("content-security-policy")
    csp = parse_csp(csp_value or "")
    if not csp_value:
        problems.append("no Content-Security-Policy")
    else:
        unsafe = sorted({source for sources in csp.values() for source in sources
                         if source in ("'unsafe-inline'", "'unsafe-eval'")})
        if unsafe:
            problems.append(f"the Content-Security-Policy allows {' and '.join(unsafe)}")
        if "default-src" not in csp and "script-src" not in csp:
            problems.append("the Content-Security-Policy does not restrict scripts "
                            "(no default-src or script-src)")
    frame = headers.get("x-frame-options", "").strip().upper()
    ancestors = csp.get("frame-ancestors")
    if frame not in ("DENY", "SAMEORIGIN") and ancestors not in (["'none'"], ["'self'"]):
        problems.append("framing is not forbidden (no X-Frame-Options DENY and no CSP "
                        "frame-ancestors 'none')")
    if headers.get("x-content-type-options", "").strip().lower() != "nosniff":
        problems.append("no X-Content-Type-Options: nosniff")
    return problems


def hsts_max_age(value: str) -> int | None:
    """max-age of a Strict-Transport-Security value; None when malformed (RFC 6797)."""
    for directive in value.split(";"):
        name, _, argument = directive.strip().partition("=")
        if name.strip().lower() == "max-age":
            argument = argument.strip().strip('"')
            return int(argument) if argument.isdigit() else None
    return None


def cookie_problems(set_cookies: tuple[str, ...]) -> list[str]:
    """Each cookie set without Secure, HttpOnly or SameSite=Strict (empty: none)."""
    problems = []
    for raw in set_cookies:
        jar = _cookie(raw)
        if not jar:
            problems.append(f"a Set-Cookie header that does not parse: {raw[:60]!r}")
        for name, morsel in jar.items():
            missing = [flag for flag, there in (
                ("Secure", bool(morsel["secure"])), ("HttpOnly", bool(morsel["httponly"])),
                ("SameSite=Strict", str(morsel["samesite"]).lower() == "strict")) if not there]
            if missing:
                problems.append(f"cookie {name} lacks {', '.join(missing)}")
    return problems


def form_problems(html: str) -> list[str]:
    """What a password manager or the CSRF protection would miss in the sign-in form."""
    inputs = {attrs.get("name"): attrs for attrs in form_inputs(html) if attrs.get("name")}
    problems = []
    for name, autocomplete in (("address", "username"), ("password", "current-password")):
        if name not in inputs:
            problems.append(f"no field named {name}")
        elif inputs[name].get("autocomplete") != autocomplete:
            problems.append(f"field {name} without autocomplete={autocomplete}")
    if not inputs.get("csrf_token", {}).get("value"):
        problems.append("no CSRF token (csrf_token)")
    return problems


def subresource_integrity(data: bytes) -> str:
    """The `integrity` value (sha384) browsers compare a script's bytes with."""
    return "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode("ascii")


def certificate_expiry(certificate: Mapping[str, object] | None) -> datetime | None:
    """notAfter of a certificate as ssl's getpeercert() gives it."""
    value = (certificate or {}).get("notAfter")
    if not isinstance(value, str):
        return None
    return datetime.fromtimestamp(ssl.cert_time_to_seconds(value), UTC)


def portal_url(config: Config, options: Options) -> str:
    """The page's base URL, ending in /."""
    domain = config.domains[0].name.lower() if config.domains else "example.org"
    url = options.portal_url.replace("{domain}", domain)
    return url if url.endswith("/") else url + "/"


# -- the probes -----------------------------------------------------------------------------


def check_portal(config: Config, options: Options) -> Iterator[CheckResult]:
    if "portal" not in config.given:
        return  # this host runs no self-service page: nothing to say
    yield from _secret_key_file(config.portal.secret_key_file)
    yield from _listen(config.portal)
    url = portal_url(config, options)
    via = (f" via {options.portal_connect[0]}:{options.portal_connect[1]}"
           if options.portal_connect else "")
    client = PortalClient(url, ca_file=options.portal_ca_file or options.ca_file,
                          connect=options.portal_connect, timeout=options.timeout)
    try:
        yield from _probe(client, url, via)
    finally:
        client.close()


def _secret_key_file(path: str) -> Iterator[CheckResult]:
    try:
        mode = os.stat(path).st_mode
        size = len(Path(path).read_bytes().strip())
    except OSError as exc:
        yield fail("portal", f"[portal] secret_key_file {path}: {why(exc)}",
                   f"head -c 48 /dev/urandom | base64 > {path}; chmod 600 {path}; chown "
                   "it to the page's user")
        return
    fix = f"chmod 600 {path} (whoever reads it can forge any user's session)"
    if mode & stat.S_IROTH:
        yield fail("portal", f"[portal] secret_key_file {path} is readable by others", fix)
    elif mode & stat.S_IRGRP:
        yield warn("portal", f"[portal] secret_key_file {path} is readable by its group", fix)
    elif size < _SECRET_MIN:
        yield fail("portal", f"[portal] secret_key_file {path} holds {size} bytes, fewer "
                   f"than {_SECRET_MIN}", f"head -c 48 /dev/urandom | base64 > {path}")
    else:
        yield ok("portal", f"[portal] secret_key_file {path} is private")


def listen_problems(portal: PortalConfig) -> list[str]:
    """What [portal] exposes that only a proxy on this host may reach (empty: nothing)."""
    found = parse_host_port(portal.listen)
    host = found[0] if found is not None else ""
    if host in ("127.0.0.1", "::1", "localhost"):
        return []
    problems = []
    if portal.behind_proxy:
        problems.append(f"behind_proxy = true, but it listens on {portal.listen}: a client "
                        "that reaches that port directly can forge X-Forwarded-For (a new "
                        "rate limit per request) and -Host/-Proto (the Origin it accepts)")
    if not portal.cert_file:
        problems.append(f"plain HTTP (cert_file = \"\") on {portal.listen}: passwords would "
                        "cross the network unencrypted")
    return problems


def _listen(portal: PortalConfig) -> Iterator[CheckResult]:
    problems = listen_problems(portal)
    if problems:
        yield fail("portal", f"[portal] {'; '.join(problems)}",
                   "behind nginx: listen = \"127.0.0.1:8443\" (docs/nginx-wkd.conf); "
                   "serving browsers itself: cert_file and key_file, behind_proxy = false")


def _probe(client: PortalClient, url: str, via: str) -> Iterator[CheckResult]:
    host = client.host
    try:
        page = client.request("GET", "sign-in")
    except ssl.SSLCertVerificationError as exc:
        yield fail("portal", f"certificate of {host} not valid: "
                   f"{exc.verify_message or why(exc)}",
                   f"install a certificate for {host} from a public CA (browsers use the "
                   "system store), with its chain; [check] portal_ca_file for a private CA")
        return
    except (OSError, ssl.SSLError, http.client.HTTPException, ValueError) as exc:
        yield fail("portal", f"{url}sign-in{via}: {why(exc)}",
                   f"{_PORTAL_FIX}; {host} must resolve to it (before it does, [check] "
                   "portal_connect says where it runs)")
        return
    if page.status != 200:
        yield fail("portal", f"{url}sign-in answered {page.status}", _PORTAL_FIX)
        return
    expires = certificate_expiry(client.peer_certificate)
    until = f" until {expires:%Y-%m-%d}" if expires else ""
    problems = form_problems(page.text)
    if problems:
        yield fail("portal", f"{url}sign-in: the form has {'; '.join(problems)}",
                   f"{_PORTAL_FIX} (an old or foreign page answers)")
    else:
        yield ok("portal", f"{url}sign-in answers{via} (certificate valid for {host}{until})")
    if expires is not None and (expires.timestamp() - time.time()) < CERT_WARN_DAYS * 86400:
        yield warn("portal", f"the certificate of {host} expires on {expires:%Y-%m-%d}",
                   "renew it (certbot renew) and reload the server that holds it")
    yield from _headers(page)
    yield from _cookies(page)
    yield from _refusals(client, page.token())
    yield from _openpgpjs(client)


def _headers(page: PageAnswer) -> Iterator[CheckResult]:
    problems = header_problems(page.headers)
    hsts = page.headers.get("strict-transport-security")
    hsts_note = "no HSTS"
    if hsts is not None:
        max_age = hsts_max_age(hsts)
        if max_age is None:
            problems.append(f"Strict-Transport-Security without a valid max-age: {hsts!r}")
        elif max_age < HSTS_MIN_SECONDS:
            yield warn("portal", f"Strict-Transport-Security max-age={max_age} is short",
                       f"max-age={HSTS_MIN_SECONDS} or more (`add_header "
                       "Strict-Transport-Security \"max-age=31536000\" always;` in nginx)")
        hsts_note = f"HSTS max-age={max_age}"
    if problems:
        yield fail("portal", f"security headers: {'; '.join(problems)}",
                   "let the page's own headers through the proxy (no add_header or "
                   "proxy_hide_header for them; docs/nginx-wkd.conf)")
    else:
        yield ok("portal", "security headers: CSP without unsafe-inline, framing forbidden, "
                 f"nosniff, {hsts_note}")


def _cookies(page: PageAnswer) -> Iterator[CheckResult]:
    if not page.set_cookies:
        yield fail("portal", "GET sign-in set no session cookie (it holds the form's CSRF "
                   "token, so no sign-in can work)",
                   "let Set-Cookie through the proxy (no proxy_hide_header or caching of "
                   "the page)")
        return
    problems = cookie_problems(page.set_cookies)
    names = ", ".join(sorted({n for raw in page.set_cookies for n in _cookie(raw)}))
    if problems:
        yield fail("portal", f"session cookie: {'; '.join(problems)}",
                   "serve the page over HTTPS as `milter-wkd portal` sets its cookie; no "
                   "proxy_cookie_flags or proxy_cookie_path that drop flags")
    else:
        yield ok("portal", f"cookie {names}: Secure, HttpOnly, SameSite=Strict")


def _refusals(client: PortalClient, token: str | None) -> Iterator[CheckResult]:
    """A form POST without the token, and one from another origin: both refused before
    the password check (an empty password is refused before LDAP anyway)."""
    fields = {"address": "milter-wkd-check@invalid", "password": ""}
    answer = client.request("POST", "sign-in", fields=fields)
    if answer.status in (400, 403):
        yield ok("portal", f"a POST without CSRF token is refused ({answer.status})")
    else:
        yield fail("portal", f"a POST without CSRF token was not refused (answered "
                   f"{answer.status}): other sites' pages can submit the forms",
                   "run the page as shipped (Flask-WTF's CSRFProtect); a proxy must not "
                   "answer POSTs itself")
    if token is None:
        yield skip("portal", "the Origin check not probed (no CSRF token on the page)")
        return
    answer = client.request("POST", "sign-in", fields={"csrf_token": token, **fields},
                            origin=_FOREIGN_ORIGIN)
    if answer.status == 403:
        yield ok("portal", "a POST from another origin is refused (403)")
    else:
        yield fail("portal", f"a POST with Origin {_FOREIGN_ORIGIN} was not refused "
                   f"(answered {answer.status})",
                   "run the page as shipped; a proxy must pass Origin on unchanged")
    # The page's own form, as a browser sends it: it must get past the Origin and CSRF
    # checks to the password check (which refuses the empty password before LDAP).
    answer = client.request("POST", "sign-in", fields={"csrf_token": token, **fields})
    if answer.status in (401, 429):
        yield ok("portal", f"its own form's POST reaches the sign-in ({answer.status} for "
                 "an empty password)")
    else:
        yield fail("portal", f"a POST of its own sign-in form from {client.origin} was "
                   f"answered {answer.status}: browsers cannot sign in",
                   "behind a proxy, set [portal] behind_proxy = true and let the proxy "
                   "set X-Forwarded-Proto and X-Forwarded-Host itself "
                   "(docs/nginx-wkd.conf), or the page sees another origin than browsers")


def _openpgpjs(client: PortalClient) -> Iterator[CheckResult]:
    try:
        expected = subresource_integrity((_PORTAL_STATIC / OPENPGPJS_PATH).read_bytes())
    except OSError as exc:
        yield skip("portal", f"OpenPGP.js not compared (installed file: {why(exc)})")
        return
    answer = client.request("GET", OPENPGPJS_PATH)
    fix = ("serve the page's static files from the page itself (no alias to another copy, "
           "no stale cache), then restart it (the page hashes its files at start)")
    if answer.status != 200:
        yield fail("portal", f"OpenPGP.js ({OPENPGPJS_PATH}) answered {answer.status}: key "
                   "generation cannot work", fix)
        return
    served = subresource_integrity(answer.body)
    kind = answer.headers.get("content-type", "").split(";")[0].strip().lower()
    if served != expected:
        yield fail("portal", f"OpenPGP.js served is {served}, the page references "
                   f"{expected}: browsers refuse it", fix)
    elif not re.fullmatch(r"(text|application)/(x-)?javascript", kind):
        yield fail("portal", f"OpenPGP.js is served as {kind or 'no type'}: with nosniff "
                   "browsers refuse to run it", "serve .js as text/javascript")
    else:
        yield ok("portal", f"OpenPGP.js served with the SRI hash the page references "
                 f"({expected[:22]}…)")
