"""The pages of the self-service page (see milter_wkd.portal.app): one function each, over
the `KeyStore` interface; the templates only loop and branch."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

from flask import (
    Blueprint,
    Response,
    g,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_babel import gettext as _

from milter_wkd import openpgp, wkd
from milter_wkd.errors import BadAddress, Conflict, KeyRefused, NotFound, Refused
from milter_wkd.openpgp import CleanResult
from milter_wkd.portal.app import portal, sign_in_redirect, start_session
from milter_wkd.portal.forms import SignInForm, SignOutForm, UnpublishForm, UploadForm
from milter_wkd.publication import Policy, publish
from milter_wkd.store.model import KeyOrigin, StoredKey, User, dn_key
from milter_wkd.values import Address

log = logging.getLogger(__name__)
pages = Blueprint("pages", __name__)

# What cleaning counts (CleanResult.stats "dropped:<name>") in words for the user.
_DROPPED_WORDS = {
    "third-party-signature": "signatures by other people's keys (certifications): this "
                             "server publishes none",
    "attestation-signature": "attestations of other people's signatures",
    "user-attribute": "photo IDs",
    "user-id-other-address": "user IDs with addresses that are not yours",
    "user-id-without-address": "user IDs without a mail address",
    "revoked-user-id": "revoked user IDs",
    "subkey-without-valid-binding": "subkeys without a valid binding signature",
    "subkey-without-back-signature": "signing subkeys without a back-signature",
    "weak-subkey": "subkeys too weak for this server",
}


def signed_in(view: Callable[[User, Address], Any]) -> Callable[[], Any]:
    """The view runs for the signed-in user, looked up again now; else to sign-in."""

    @wraps(view)
    def wrapper() -> Any:
        if g.expired:
            return _redirect("pages.sign_in", expired="1")
        if "dn" not in session:
            return sign_in_redirect()
        address = Address.parse(session["address"])
        user = portal().store.find_user(address)
        if user is None or dn_key(user.dn) != dn_key(session["dn"]):
            log.info("portal: %s is no longer %s; signed out", address, session["dn"])
            session.clear()
            return sign_in_redirect()
        return view(user, address)

    return wrapper


@pages.route("/")
def index() -> Response:
    return _redirect("pages.my_keys" if "dn" in session else "pages.sign_in")


@pages.route("/sign-in", methods=["GET", "POST"])
def sign_in() -> Any:
    form = SignInForm()
    if request.method == "GET" or not form.validate_on_submit():
        status = 400 if request.method == "POST" else 200
        return render_template("sign_in.html", form=form,
                               expired=request.args.get("expired") == "1"), status
    wrong = _("The address or the password is wrong.")
    text = (form.address.data or "").strip()
    client = request.remote_addr or "-"
    try:
        address = Address.parse(text)
    except BadAddress:
        address = None
    wait = portal().allowed(address.key if address else text.lower()[:320], client)
    if wait:
        return render_template("sign_in.html", form=form, error=_(
            "Too many attempts. Try again in %(minutes)d minutes.",
            minutes=(wait + 59) // 60)), 429
    password = form.password.data or ""
    user = portal().authenticator.authenticate(address, password) \
        if address is not None and password else None
    if user is None or address is None:
        log.info("portal: failed sign-in as %r from %s", text[:320], client)
        return render_template("sign_in.html", form=form, error=wrong), 401
    start_session(user, address)
    log.info("portal: %s (%s) signed in from %s", address, user.dn, client)
    return _redirect("pages.my_keys")


@pages.route("/sign-out", methods=["POST"])
def sign_out() -> Response:
    if SignOutForm().validate_on_submit():
        log.info("portal: %s signed out", session.get("address"))
        session.clear()
    return sign_in_redirect()


@dataclass(frozen=True, slots=True)
class AddressRow:
    address: Address
    published: bool
    wkd_url: str
    autocrypt: bool


def _rows(user: User, stored: StoredKey | None) -> list[AddressRow]:
    published = {a.key for a in stored.addresses} if stored is not None else set()
    rows = []
    for address in user.addresses:
        on = address.key in published
        autocrypt = False
        if on and stored is not None and not stored.revoked and not stored.disabled:
            try:
                openpgp.autocrypt_keydata(stored.key, address)
                autocrypt = True
            except Refused:
                autocrypt = False
        rows.append(AddressRow(address, on, wkd.advanced_url(address) if on else "",
                               autocrypt))
    return rows


def _keys_page(user: User, address: Address, *, form: UploadForm | None = None,
               status: int = 200, **extra: Any) -> tuple[str, int]:
    stored = portal().store.get_key(user)
    info = openpgp.clean_key(stored.key, None).info if stored is not None else None
    return render_template("keys.html", address=address, stored=stored, info=info,
                           rows=_rows(user, stored), form=form or UploadForm(),
                           sign_out=SignOutForm(), **extra), status


@pages.route("/keys")
@signed_in
def my_keys(user: User, address: Address) -> Any:
    return _keys_page(user, address)


@pages.route("/generate")
@signed_in
def generate(user: User, address: Address) -> Any:
    """The key-generation page: the work is done in the browser (static/generate.js); the
    public key comes back through `/upload` with this page's CSRF token."""
    return render_template("generate.html", addresses=user.addresses, address=address,
                           form=UploadForm(), sign_out=SignOutForm())


@pages.route("/upload", methods=["POST"])
@signed_in
def upload(user: User, address: Address) -> Any:
    form = UploadForm()
    if not form.validate_on_submit():
        return _keys_page(user, address, form=form, status=400)
    upload = form.key_file.data
    data = upload.read() if upload is not None and upload.filename else b""
    if not data:
        data = (form.key_text.data or "").strip().encode("utf-8")
    if not data:
        return _keys_page(user, address, form=form, status=400,
                          error=_("Choose a key file or paste a key."))
    cfg = portal().config
    domain = cfg.domain(address.domain)
    policy = Policy.from_config(cfg.keys, mailbox_only=domain is not None
                                and domain.mailbox_only)
    try:
        done = publish(portal().store, user, data, origin=KeyOrigin.SELF_SERVICE,
                       actor=str(address), now=int(portal().clock()), policy=policy)
    except KeyRefused as exc:
        if "secret key" in exc.reason:
            log.warning("portal: %s uploaded a secret key; refused, nothing stored", address)
            return render_template("secret_key.html", sign_out=SignOutForm()), 422
        log.info("portal: key of %s refused: %s", address, exc.reason)
        return _keys_page(user, address, form=form, status=422, refused=exc.reason)
    except (Conflict, NotFound, Refused) as exc:
        log.info("portal: key of %s refused: %s", address, exc.reason)
        return _keys_page(user, address, form=form, status=422, refused=exc.reason)
    log.info("portal: %s published %s for %s", address, done.stored.fingerprint,
             ", ".join(str(a) for a in done.stored.addresses))
    published = {a.key for a in done.stored.addresses}
    return render_template(
        "published.html", stored=done.stored, merged=done.merged,
        not_named=[a for a in user.addresses if a.key not in published],
        dropped=done.cleaned.dropped, withheld=done.stored.withheld,
        counted=_counted(done.cleaned), sign_out=SignOutForm())


def _counted(cleaned: CleanResult) -> list[tuple[int, str]]:
    """What cleaning left out that the submitter need not act on, in words, with counts."""
    out = []
    for name, count in sorted(cleaned.stats.items()):
        kind = name.removeprefix("dropped:")
        if name.startswith("dropped:") and count and kind in _DROPPED_WORDS:
            out.append((count, _DROPPED_WORDS[kind]))
    return out


@pages.route("/unpublish", methods=["GET", "POST"])
@signed_in
def unpublish(user: User, address: Address) -> Any:
    form = UnpublishForm()
    stored = portal().store.get_key(user)
    if request.method == "GET" or not form.validate_on_submit():
        return render_template("unpublish.html", form=form, stored=stored,
                               sign_out=SignOutForm()), 200 if request.method == "GET" else 400
    wait = portal().allowed(address.key, request.remote_addr or "-")
    if wait:
        return render_template("unpublish.html", form=form, stored=stored,
                               sign_out=SignOutForm(), error=_(
                                   "Too many attempts. Try again in %(minutes)d minutes.",
                                   minutes=(wait + 59) // 60)), 429
    again = portal().authenticator.authenticate(address, form.password.data or "")
    if again is None or dn_key(again.dn) != dn_key(user.dn):
        log.info("portal: wrong password to unpublish the key of %s", address)
        return render_template("unpublish.html", form=form, stored=stored,
                               sign_out=SignOutForm(),
                               error=_("The password is wrong.")), 401
    try:
        removed = portal().store.remove_key(user)
    except NotFound:
        return render_template("unpublish.html", form=form, stored=None,
                               sign_out=SignOutForm()), 200
    log.info("portal: %s unpublished %s", address, removed.fingerprint)
    return render_template("unpublished.html", removed=removed, sign_out=SignOutForm())


def _redirect(endpoint: str, **arguments: Any) -> Response:
    return make_response(redirect(url_for(endpoint, **arguments), code=303))
