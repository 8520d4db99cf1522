"""The self-service page as a Flask app: `create_app(config, store, authenticator)`.

Pages (every change is a POST with a CSRF token; a link can never change anything):
- `/sign-in`: mail address (or alias) and mail password, checked by the authenticator
  (`milter_wkd.store.auth.LdapAuthenticator`: a bind as the user's entry); rate-limited per
  account and per client address (`[portal]` rate_*), every attempt logged;
- `/keys`: the user's published key for each of their addresses, with provenance, WKD URL
  and whether outgoing mail carries it as Autocrypt, a link per published address to stop
  publishing it; the upload and revocation forms;
- `/upload` (POST): a public key (file or paste, armored or binary) published through
  `milter_wkd.publication.publish` (origin self-service) for the user's own addresses; a
  revocation certificate put there instead is handled as `/revoke` handles it;
- `/revoke` (POST): a revocation certificate uploaded alone (gpg --gen-revoke, OpenPGP.js),
  verified against the stored key and published with it (`publication.publish_revocation`);
- `/generate`: a key pair made in the browser with OpenPGP.js (the one page with script);
  the secret key and revocation certificate are downloaded, then the public key alone is
  POSTed to `/upload`;
- `/unpublish`: asks for the password again (rate-limited as sign-in is), then
  `KeyStore.remove_key`; with `address` (a hidden field, from the key page's link) only
  that address: `publication.unpublish_address` publishes the stored key without its user
  ID (the whole key goes when it was the last);
- `/sign-out` (POST).

Behind a reverse proxy ([portal] behind_proxy) werkzeug's ProxyFix takes the client's
address, scheme, host and path prefix from the proxy's X-Forwarded-* headers; without it
a proxied POST's Origin (https://) would not match the plain-HTTP request and be refused,
and every client would share the proxy's address in the rate limits.

Security: the session is Flask's signed cookie (itsdangerous; `[portal]` secret_key_file),
Secure, HttpOnly, SameSite=Strict, cleared and re-issued at sign-in, signed out after
session_idle_seconds without a request and session_max_seconds after sign-in. Every POST
carries Flask-WTF's CSRF token and, when the browser sends Origin, must come from this
page's own origin. Every answer has a strict Content-Security-Policy (no script; the one
style sheet is ours) and no-store caching; only `/generate` adds `script-src 'self'` for
OpenPGP.js and its own script, both static files loaded with Subresource Integrity. The
user is looked up again on every request by the signed-in address; a session whose entry
changed is signed out.

Failures: a directory that does not answer is a 503 page saying to try again later;
refusals (key or form) are shown on the page in a sentence with what to do next.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from flask import (
    Flask,
    Response,
    abort,
    g,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_babel import Babel, get_locale
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from milter_wkd.config import Config, ConfigError
from milter_wkd.errors import DirectoryUnavailable
from milter_wkd.portal.limits import SlidingWindow
from milter_wkd.store.model import User
from milter_wkd.store.protocol import KeyStore
from milter_wkd.values import Address

log = logging.getLogger(__name__)

CSP = ("default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")
# The key-generation page alone runs script: ours, from our own static files (no inline).
CSP_SCRIPT = CSP + "; script-src 'self'"
SCRIPT_PAGES = frozenset({"pages.generate"})
# OpenPGP.js as the Makefile's portal-assets target pins it (static/vendor/).
OPENPGPJS_VERSION = "6.3.2"
OPENPGPJS_SCRIPT = f"vendor/openpgp-{OPENPGPJS_VERSION}.min.js"
OPENPGPJS_LICENSE = f"vendor/openpgp-{OPENPGPJS_VERSION}.LICENSE.txt"
SCRIPTS = (OPENPGPJS_SCRIPT, "generate.js")
# Form fields and multipart overhead on top of the largest key the cleaner reads.
_FORM_OVERHEAD = 64 * 1024
_MIN_SECRET = 32


class Authenticator(Protocol):
    def authenticate(self, address: Address, password: str) -> User | None:
        """The user who owns address, when password is theirs; None otherwise (unknown
        address, wrong or empty password). DirectoryUnavailable when it cannot tell."""
        ...


def read_secret_key(path: str) -> bytes:
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"[portal] secret_key_file {path}: {exc.strerror}") from None
    if len(secret) < _MIN_SECRET:
        raise ConfigError(f"[portal] secret_key_file {path}: fewer than {_MIN_SECRET} bytes")
    return secret


class Portal:
    """What the views share: configuration, store, authenticator, rate limits, clock."""

    def __init__(self, config: Config, store: KeyStore, authenticator: Authenticator,
                 clock: Callable[[], float]) -> None:
        portal = config.portal
        self.config = config
        self.store = store
        self.authenticator = authenticator
        self.clock = clock
        self.per_account = SlidingWindow(portal.rate_per_account, portal.rate_window_seconds,
                                         clock)
        self.per_client = SlidingWindow(portal.rate_per_client, portal.rate_window_seconds,
                                        clock)

    def allowed(self, account: str, client: str) -> int:
        """Count a password attempt; 0 when it may go ahead, else seconds to wait."""
        if not self.per_client.allow(f"client:{client}"):
            log.warning("portal: rate limit for client %s (account %s)", client, account)
            return self.per_client.retry_after(f"client:{client}")
        if not self.per_account.allow(f"account:{account}"):
            log.warning("portal: rate limit for account %s (client %s)", account, client)
            return self.per_account.retry_after(f"account:{account}")
        return 0


def create_app(config: Config, store: KeyStore, authenticator: Authenticator, *,
               secret_key: bytes | None = None,
               clock: Callable[[], float] = time.time) -> Flask:
    """The WSGI app. secret_key: signs the session cookie (default: read from [portal]
    secret_key_file); clock: seconds since the epoch (tests move it)."""
    from milter_wkd.portal import views  # noqa: PLC0415  (views import this module)

    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=secret_key or read_secret_key(config.portal.secret_key_file),
        SESSION_COOKIE_NAME="portal_session",
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=config.portal.session_max_seconds,
        MAX_CONTENT_LENGTH=config.keys.max_input_bytes + _FORM_OVERHEAD,
        # The token lives as long as the session; the Origin check below stands in for
        # Flask-WTF's Referer check, which refuses browsers that send no Referer.
        WTF_CSRF_TIME_LIMIT=None,
        WTF_CSRF_SSL_STRICT=False,
        BABEL_DEFAULT_LOCALE="en",
    )
    app.jinja_env.autoescape = True
    app.extensions["milter_wkd_portal"] = Portal(config, store, authenticator, clock)
    app.before_request(_check_origin)  # before the CSRF check: a foreign POST is a 403
    CSRFProtect(app)
    Babel(app, locale_selector=_locale)
    app.jinja_env.globals["get_locale"] = get_locale  # <html lang="...">
    app.jinja_env.globals["provider_name"] = config.portal.provider_name
    app.jinja_env.filters["date"] = _date
    # Subresource Integrity of the page's scripts, from the files as they are at start.
    app.jinja_env.globals["script_integrity"] = {
        name: subresource_integrity(Path(app.static_folder or "static") / name)
        for name in SCRIPTS}
    app.jinja_env.globals["openpgpjs_version"] = OPENPGPJS_VERSION
    app.jinja_env.globals["openpgpjs_script"] = OPENPGPJS_SCRIPT
    app.jinja_env.globals["openpgpjs_license"] = OPENPGPJS_LICENSE

    app.before_request(_check_session)
    app.after_request(_security_headers)
    app.register_error_handler(CSRFError, _csrf_error)
    app.register_error_handler(DirectoryUnavailable, _unavailable)
    app.register_error_handler(HTTPException, _http_error)
    app.register_blueprint(views.pages)
    if config.portal.behind_proxy:
        # One reverse proxy in front ([portal] behind_proxy): the client's address, the
        # scheme, host and path prefix it was reached by come from its X-Forwarded-*.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_prefix=1)
    return app


def portal() -> Portal:
    from flask import current_app  # noqa: PLC0415

    found: Portal = current_app.extensions["milter_wkd_portal"]
    return found


def subresource_integrity(path: Path) -> str:
    """The `integrity` attribute value (sha384) of a static file."""
    digest = hashlib.sha384(path.read_bytes()).digest()
    return "sha384-" + base64.b64encode(digest).decode("ascii")


def _date(value: int | None) -> str:
    if value is None:
        return ""
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M UTC")


# The catalogues in translations/ (English is the source text).
LANGUAGES = ("en", "de")


def _locale() -> str:
    """The browser's preferred language among ours (Accept-Language), else English."""
    return request.accept_languages.best_match(LANGUAGES) or "en"


def _check_origin() -> None:
    """A POST whose Origin is present and not this page's own is refused (a cross-site
    form; SameSite=Strict keeps the cookie out of it too)."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    origin = request.headers.get("Origin")
    if origin is not None and origin.rstrip("/") != request.host_url.rstrip("/"):
        log.warning("portal: refused a POST to %s from origin %r (client %s)", request.path,
                    origin[:200], request.remote_addr)
        abort(403)


def _check_session() -> None:
    """Sign out a session idle or old beyond [portal]'s limits; mark it used."""
    g.expired = False
    if "dn" not in session:
        return
    cfg = portal().config.portal
    now = portal().clock()
    seen, started = session.get("seen", 0), session.get("started", 0)
    if now - seen > cfg.session_idle_seconds or now - started > cfg.session_max_seconds:
        log.info("portal: session of %s expired", session.get("address"))
        session.clear()
        g.expired = True
        return
    session["seen"] = int(now)


def start_session(user: User, address: Address) -> None:
    """A new session for a signed-in user: everything of the old one (its CSRF token too)
    is dropped and a new cookie issued."""
    now = int(portal().clock())
    session.clear()
    session.permanent = True
    session.update(address=str(address), dn=user.dn, sid=secrets.token_urlsafe(16),
                   started=now, seen=now)


def _security_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = (
        CSP_SCRIPT if request.endpoint in SCRIPT_PAGES else CSP)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    # same-origin: a same-origin POST still carries its Origin (no-referrer would send null).
    response.headers["Referrer-Policy"] = "same-origin"
    if not request.path.startswith("/static/"):
        response.headers["Cache-Control"] = "no-store"
    return response


def _csrf_error(error: CSRFError) -> tuple[str, int]:
    log.info("portal: %s on %s (client %s)", error.description, request.path,
             request.remote_addr)
    return render_template("error.html", status=400, csrf=True), 400


def _unavailable(error: DirectoryUnavailable) -> tuple[str, int]:
    log.warning("portal: directory unavailable: %s", error.reason)
    return render_template("error.html", status=503, unavailable=True), 503


def _http_error(error: HTTPException) -> tuple[str, int]:
    status = error.code or 500
    return render_template("error.html", status=status, name=error.name), status


def sign_in_redirect() -> Response:
    return make_response(redirect(url_for("pages.sign_in"), code=303))
