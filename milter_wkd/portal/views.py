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
from milter_wkd.portal.forms import (
    RevocationForm,
    SignInForm,
    SignOutForm,
    UnpublishForm,
    UploadForm,
)
from milter_wkd.publication import Policy, publish, publish_revocation, unpublish_address
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
               revocation: RevocationForm | None = None, status: int = 200,
               **extra: Any) -> tuple[str, int]:
    stored = portal().store.get_key(user)
    info = openpgp.clean_key(stored.key, None).info if stored is not None else None
    return render_template("keys.html", address=address, stored=stored, info=info,
                           rows=_rows(user, stored), form=form or UploadForm(),
                           revocation=revocation or RevocationForm(),
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
    data = _uploaded(form.key_file.data, form.key_text.data)
    if not data:
        return _keys_page(user, address, form=form, status=400,
                          error=_("Choose a key file or paste a key."))
    if openpgp.is_revocation_certificate(data):
        # Signatures alone: a revocation certificate put in the key form.
        return _publish_revocation(user, address, data)
    try:
        done = publish(portal().store, user, data, origin=KeyOrigin.SELF_SERVICE,
                       actor=str(address), now=int(portal().clock()),
                       policy=_policy(address))
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


def _uploaded(upload: Any, text: str | None) -> bytes:
    """What a form's file field holds, else its text field (pasted), as bytes."""
    data: bytes = upload.read() if upload is not None and upload.filename else b""
    return data or (text or "").strip().encode("utf-8")


def _counted(cleaned: CleanResult) -> list[tuple[int, str]]:
    """What cleaning left out that the submitter need not act on, in words, with counts."""
    out = []
    for name, count in sorted(cleaned.stats.items()):
        kind = name.removeprefix("dropped:")
        if name.startswith("dropped:") and count and kind in _DROPPED_WORDS:
            out.append((count, _DROPPED_WORDS[kind]))
    return out


def _target(user: User, text: str | None) -> Address | None:
    """The one address an unpublish form names (None: the whole key); Refused when it is
    no address of this user's."""
    if not text:
        return None
    target = Address.parse(text)  # BadAddress is a Refused
    if not user.owns(target):
        raise Refused(f"{target} is not one of your addresses")
    return target


@pages.route("/unpublish", methods=["GET", "POST"])
@signed_in
def unpublish(user: User, address: Address) -> Any:
    """Unpublish the whole key, or (field `address`) the key for one address only, after
    the password again (rate-limited as sign-in is)."""
    form = UnpublishForm()
    stored = portal().store.get_key(user)
    text = form.address.data if request.method == "POST" else request.args.get("address")

    def page(status: int, *, target: Address | None = None, **extra: Any) -> Any:
        if target is not None:
            form.address.data = str(target)
        others = [a for a in stored.addresses if target is None or a.key != target.key] \
            if stored is not None else []
        published = stored is not None and (target is None or any(
            a.key == target.key for a in stored.addresses))
        return render_template("unpublish.html", form=form, stored=stored, target=target,
                               published=published, others=others,
                               sign_out=SignOutForm(), **extra), status

    try:
        target = _target(user, text)
    except Refused as exc:
        log.warning("portal: %s tried to unpublish %r: %s", address, (text or "")[:320],
                    exc.reason)
        return page(403, error=_("%(address)s is not one of your addresses.",
                                 address=(text or "")[:320]))
    if request.method == "GET" or not form.validate_on_submit():
        return page(200 if request.method == "GET" else 400, target=target)
    wait = portal().allowed(address.key, request.remote_addr or "-")
    if wait:
        return page(429, target=target, error=_(
            "Too many attempts. Try again in %(minutes)d minutes.", minutes=(wait + 59) // 60))
    again = portal().authenticator.authenticate(address, form.password.data or "")
    if again is None or dn_key(again.dn) != dn_key(user.dn):
        log.info("portal: wrong password to unpublish the key of %s", address)
        return page(401, target=target, error=_("The password is wrong."))
    if target is not None:
        return _unpublish_address(user, address, target, page)
    try:
        removed = portal().store.remove_key(user)
    except NotFound:
        stored = None  # removed meanwhile: the page (a closure over it) says there is none
        return page(200)
    log.info("portal: %s unpublished %s", address, removed.fingerprint)
    return render_template("unpublished.html", removed=removed, target=None, remaining=None,
                           sign_out=SignOutForm())


def _unpublish_address(user: User, address: Address, target: Address,
                       page: Callable[..., Any]) -> Any:
    try:
        done = unpublish_address(portal().store, user, target,
                                 origin=KeyOrigin.SELF_SERVICE, actor=str(address),
                                 now=int(portal().clock()), policy=_policy(address))
    except NotFound:
        return page(200, target=target)
    except (Conflict, Refused) as exc:
        log.info("portal: unpublishing %s for %s refused: %s", target, address, exc.reason)
        return page(422, target=target, error=_(
            "The key could not be changed: %(reason)s. Nothing was changed.",
            reason=exc.reason))
    log.info("portal: %s unpublished %s for %s%s", address, done.before.fingerprint, target,
             "" if done.after is not None else " (its last address: the whole key)")
    return render_template("unpublished.html", removed=done.before, target=target,
                           remaining=done.after, sign_out=SignOutForm())


@pages.route("/revoke", methods=["POST"])
@signed_in
def revoke(user: User, address: Address) -> Any:
    """A revocation certificate uploaded alone, published on the user's stored key."""
    form = RevocationForm()
    if not form.validate_on_submit():
        return _keys_page(user, address, revocation=form, status=400)
    data = _uploaded(form.revocation_file.data, form.revocation_text.data)
    if not data:
        return _keys_page(user, address, revocation=form, status=400,
                          error=_("Choose a revocation certificate file or paste one."))
    return _publish_revocation(user, address, data, form)


def _publish_revocation(user: User, address: Address, data: bytes,
                        form: RevocationForm | None = None) -> Any:
    try:
        done = publish_revocation(portal().store, user, data, origin=KeyOrigin.SELF_SERVICE,
                                  actor=str(address), now=int(portal().clock()),
                                  policy=_policy(address))
    except (Conflict, NotFound, Refused) as exc:
        log.info("portal: revocation from %s refused: %s", address, exc.reason)
        return _keys_page(user, address, revocation=form, status=422,
                          revocation_refused=exc.reason)
    log.info("portal: %s published the revocation of %s for %s", address,
             done.stored.fingerprint, ", ".join(str(a) for a in done.stored.addresses))
    return render_template("revoked.html", stored=done.stored, sign_out=SignOutForm())


def _policy(address: Address) -> Policy:
    cfg = portal().config
    domain = cfg.domain(address.domain)
    return Policy.from_config(cfg.keys, mailbox_only=domain is not None
                              and domain.mailbox_only)


def _redirect(endpoint: str, **arguments: Any) -> Response:
    return make_response(redirect(url_for(endpoint, **arguments), code=303))
