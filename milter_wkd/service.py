"""What the milter does with a message: the WKS flows (DESIGN.md flows 1-3) and Autocrypt
(flow 4), as decisions on a `Transaction`, with the directory and the mailer as peers.

Mail to a domain's submission address:
- from a logged-in user (SASL login = one of the user's addresses) and `auth_submit`:
  decrypt, clean the key for the addresses that user owns (addresses of others are refused
  and named in the notice), merge with the user's published copy of the same key, publish
  with provenance auth-submit, send a DKIM-signed notice, discard the submission;
- from anybody else (if `allow_unauthenticated`): for each address of the key that belongs
  to a directory user, store a pending request (nonce bound to address and fingerprint,
  expiring after pending_days, rate-limited per address) and send that address a
  confirmation request encrypted to the submitted key;
- a confirmation response: decrypt, take the pending request once (nonce compared in
  constant time, From must be the confirmed address), publish with provenance
  wks-confirmed, notify.
Other mail from our users (SASL, or a client in trusted_networks) gets an Autocrypt header
when its single From address has a published, valid key; optionally the milter DKIM-signs it.

Reads the [milter], [keys], [mailer] and [[domains]] config and the files they name.
Failures: directory or mailer down -> 451 4.7.1 / 451 4.4.1 (Postfix keeps the mail and
retries); refused input -> 5xx with the reason, nothing stored; Autocrypt problems never
stop mail (logged, mail passes unchanged).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from milter_wkd import autocrypt, dkim, openpgp, publication, wks
from milter_wkd.config import Config, ConfigError, DomainConfig
from milter_wkd.errors import (
    DirectoryUnavailable,
    MessageRefused,
    NotFound,
    RateLimited,
    Refused,
    Unavailable,
)
from milter_wkd.mailer import Mailer, MailerUnavailable
from milter_wkd.publication import Policy
from milter_wkd.replies import DIRECTORY_DOWN, Accept, Discard, HeaderEdit, Reject, Reply, TempFail
from milter_wkd.store.model import KeyOrigin, PendingRequest, User, key_fingerprints
from milter_wkd.store.protocol import KeyStore
from milter_wkd.transaction import SpoolBudget, Transaction
from milter_wkd.values import Address

log = logging.getLogger(__name__)

MAILER_DOWN = TempFail(451, "4.4.1", "Cannot send the key service's reply - try again later")
CONFIG_BROKEN = TempFail(451, "4.3.5", "Key service misconfigured - try again later")
LARGE_BODIES_BUSY = TempFail(451, "4.3.2", "Too many large messages at once - try again later")
DAY = 86400


@dataclass(frozen=True, slots=True)
class _CachedHint:
    keydata: bytes | None
    dn: str | None
    prefer_mutual: bool | None


class MailService:
    """Shared by all milter connections; every method is thread-safe."""

    def __init__(self, config: Config, directory: KeyStore, mailer: Mailer, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.directory = directory
        self.mailer = mailer
        self.clock = clock
        self.max_body = config.milter.max_submission_bytes
        self.body_memory = config.milter.body_memory_bytes
        # Bodies over body_memory wait on disk; reading one back and parsing it costs a
        # few times its size, so only this many are in memory at once.
        self._large_bodies = threading.BoundedSemaphore(config.milter.max_large_bodies)
        self._large_outgoing = threading.BoundedSemaphore(config.milter.max_large_bodies)
        self.spool = SpoolBudget(config.milter.max_spool_bytes)
        self._submission = {Address.parse(d.submission_address).key: d for d in config.domains}
        self._domains = {d.name.lower(): d for d in config.domains}
        self._trusted = [ipaddress.ip_network(n, strict=False)
                         for n in config.milter.trusted_networks]
        self._secrets: dict[str, bytes] = {}
        self._dkim: dict[str, tuple[dkim.DkimKey, ...]] = {}
        self._lock = threading.Lock()
        self._hints: OrderedDict[str, _CachedHint] = OrderedDict()
        self._hint_token: str | None = None
        self._hint_checked = 0.0

    # --- routing -------------------------------------------------------------------------

    def _submission_domain(self, tx: Transaction) -> DomainConfig | None:
        for recipient in tx.recipients:
            try:
                found = self._submission.get(Address.parse(recipient).key)
            except Refused:
                continue
            if found is not None:
                return found
        return None

    def is_submission(self, tx: Transaction) -> bool:
        return self._submission_domain(tx) is not None

    def _is_ours(self, tx: Transaction) -> bool:
        """Mail of our own users: logged in, or from a trusted network (webmail)."""
        if tx.sasl_login:
            return True
        if tx.client_ip is None:
            return False
        try:
            ip = ipaddress.ip_address(tx.client_ip)
        except ValueError:
            return False
        return any(ip in net for net in self._trusted)

    def wants_body(self, tx: Transaction) -> bool:
        if self.is_submission(tx):
            return True
        return self.config.milter.dkim_sign_outgoing and self._is_ours(tx)

    def decide(self, tx: Transaction) -> Reply:
        if tx.body_lost:
            # Mail whose body we needed (a submission, or mail to sign) and could not keep:
            # the sender tries again; nothing is decided on a partial body.
            log.warning("body not kept (spool full or disk refused): 451")
            return LARGE_BODIES_BUSY
        if tx.spill is None:
            return self._decide(tx)
        # Submissions and our users' outgoing mail wait in separate queues, so that
        # anonymous submissions can never hold up (or unsign) users' mail.
        slots = self._large_bodies if self.is_submission(tx) else self._large_outgoing
        if not slots.acquire(timeout=self.config.milter.large_body_wait):
            log.warning("%d large bodies in work already; this one waits (%d octets)",
                        self.config.milter.max_large_bodies, tx.body_size)
            return LARGE_BODIES_BUSY
        try:
            return self._decide(tx)
        finally:
            slots.release()

    def _decide(self, tx: Transaction) -> Reply:
        domain = self._submission_domain(tx)
        if domain is None:
            return self._outgoing(tx)
        others = [r for r in tx.recipients if not self._is_submission_address(r)]
        try:
            reply = self._submission_mail(tx, domain)
        except DirectoryUnavailable as exc:
            log.warning("directory unavailable: %s", exc.reason)
            return DIRECTORY_DOWN
        except MailerUnavailable as exc:
            log.warning("mailer unavailable: %s", exc.reason)
            return MAILER_DOWN
        except ConfigError as exc:
            log.error("configuration: %s", exc.reason)  # noqa: TRY400
            return CONFIG_BROKEN
        except Unavailable as exc:
            log.warning("unavailable: %s", exc.reason)
            return DIRECTORY_DOWN
        except Refused as exc:
            log.info("refused from %s: %s", tx.mail_from, exc.reason)
            return Reject(550, "5.7.1", f"Key submission refused: {exc.reason}")
        if isinstance(reply, Discard) and others:
            # Mail that also goes elsewhere is delivered there; only our copy is consumed.
            return Accept(remove_recipients=tuple(
                r for r in tx.recipients if self._is_submission_address(r)))
        return reply

    def _is_submission_address(self, recipient: str) -> bool:
        try:
            return Address.parse(recipient).key in self._submission
        except Refused:
            return False

    # --- keys of the service ----------------------------------------------------------------

    def _secret(self, domain: DomainConfig) -> bytes:
        cached = self._secrets.get(domain.name)
        if cached is None:
            try:
                cached = Path(domain.submission_key).read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"submission key {domain.submission_key}: {exc.strerror}") from None
            self._secrets[domain.name] = cached
        return cached

    def _dkim_keys(self, domain: DomainConfig) -> tuple[dkim.DkimKey, ...]:
        """The domain's DKIM keys (none, one, or RSA and Ed25519), parsed once."""
        keys = self._dkim.get(domain.name)
        if keys is None:
            keys = dkim.domain_keys(domain)
            self._dkim[domain.name] = keys
        return keys

    def _send(self, domain: DomainConfig, recipient: Address, message: bytes) -> None:
        keys = self._dkim_keys(domain)
        if keys:
            message = dkim.sign(message, keys)
        self.mailer.send(domain.submission_address, str(recipient), message)

    # --- WKS ------------------------------------------------------------------------------

    def _submission_mail(self, tx: Transaction, domain: DomainConfig) -> Reply:
        if tx.oversize:
            return Reject(552, "5.3.4", f"Key submission larger than {self.max_body} octets")
        raw = tx.raw_message()
        decrypt = wks.decrypter(self._secret(domain), max_plaintext=self.max_body)
        # One parse decides what the mail is, so a refusal names what is wrong with it
        # (a response from the wrong From is refused for that, not as a bad submission).
        parsed = wks.parse_message(raw, decrypt, max_mail=self.max_body)
        if isinstance(parsed, wks.ConfirmationResponse):
            return self._confirmation(tx, domain, parsed)
        submission = parsed
        # One pass over the submitted bytes (a flooded key is megabytes): everything after
        # works on what survives, which cleaning again only narrows to fewer addresses.
        limits = self.config.keys.limits(mailbox_only=domain.mailbox_only)
        everything = openpgp.clean_key(submission.key, None, limits=limits)
        submission = dataclasses.replace(submission, key=everything.key)
        addresses = list(everything.info.addresses)
        if tx.sasl_login and domain.auth_submit:
            return self._authenticated(tx, domain, submission, everything)
        if not domain.allow_unauthenticated:
            return Reject(550, "5.7.1", "Log in (SMTP AUTH) to publish keys")
        return self._unauthenticated(tx, domain, submission, addresses)

    def _publish(self, user: User, key: bytes, addresses: list[Address], origin: KeyOrigin,
                 actor: str, cleaned: openpgp.CleanResult | None = None,
                 consume: PendingRequest | None = None) -> openpgp.CleanResult:
        domain = self._domains.get(addresses[0].domain) if addresses else None
        policy = Policy.from_config(self.config.keys,
                                    mailbox_only=domain is not None and domain.mailbox_only)
        done = publication.publish(self.directory, user, key, origin=origin, actor=actor,
                                   now=int(self.clock()), policy=policy, addresses=addresses,
                                   cleaned=cleaned, consume=consume)
        self._forget_hints()
        # Subkeys whose material another entry holds were left out (stats name them).
        return done.cleaned

    def _authenticated(self, tx: Transaction, domain: DomainConfig,
                       submission: wks.Submission, everything: openpgp.CleanResult) -> Reply:
        key_addresses = everything.info.addresses
        try:
            login = Address.parse(tx.sasl_login or "")
        except Refused:
            return Reject(550, "5.7.1", "The SASL login is not a mail address of this provider")
        user = self.directory.find_user(login, with_key=True,
                                        holders_of=key_fingerprints(everything.info))
        if user is None:
            return Reject(550, "5.7.1", "The logged-in user is not in the key directory")
        own: list[Address] = []
        refused: list[str] = []
        for address in key_addresses:
            if user.owns(address):
                own.append(address)
            elif address.domain in self._domains:
                refused.append(f"{address}: belongs to another user or to nobody here")
            else:
                refused.append(f"{address}: not a domain of this provider")
        if not own:
            reason = "the key has no user ID with an address of " + str(login)
            if refused:
                reason += " (" + "; ".join(refused) + ")"
            return Reject(550, "5.7.1", reason)
        cleaned = self._publish(user, submission.key, own, KeyOrigin.AUTH_SUBMIT,
                                str(login), everything)
        now = int(self.clock())
        submission_address = Address.parse(domain.submission_address)
        text_refused = "".join(f"\nNot published for {r}" for r in refused) + "".join(
            f"\nLeft out: {part}" for part in dict.fromkeys((*everything.dropped,
                                                               *cleaned.dropped)))
        notice = wks.build_notice(
            submission_address=submission_address, address=login,
            subject="Your key has been published",
            text=(f"Your OpenPGP key {cleaned.info.fingerprint}\nis now published for: "
                  + ", ".join(str(a) for a in cleaned.info.addresses) + "\n" + text_refused
                  + f"\n\nAnyone can now find it, e.g. with: gpg --locate-keys {login}\n"),
            now=now, in_reply_to=_message_id(tx))
        self._send(domain, login, notice)
        log.info("published %s for %s (auth-submit by %s)%s",
                 cleaned.info.fingerprint, ", ".join(map(str, cleaned.info.addresses)), login,
                 f"; refused {len(refused)} address(es)" if refused else "")
        return Discard("published")

    def _unauthenticated(self, tx: Transaction, domain: DomainConfig,
                         submission: wks.Submission, key_addresses: list[Address]) -> Reply:
        now = int(self.clock())
        submission_address = Address.parse(domain.submission_address)
        secret = self._secret(domain)
        limits = self.config.keys.limits(mailbox_only=domain.mailbox_only)
        sent = 0
        reasons: list[str] = []
        for address in key_addresses:
            if address.domain not in self._domains:
                reasons.append(f"{address}: not a domain of this provider")
                continue
            if self.directory.find_user(address) is None:
                reasons.append(f"{address}: no such user")
                continue
            cleaned = openpgp.clean_key(submission.key, [address], limits=limits)
            nonce = wks.new_nonce()
            try:
                # Takes one of the address's slots atomically: the cap holds under load.
                pending = self.directory.create_pending(PendingRequest(
                    nonce, address, cleaned.info.fingerprint, cleaned.key, now,
                    now + self.config.milter.pending_days * DAY),
                    limit=self.config.milter.max_pending_per_address)
            except RateLimited:
                reasons.append(f"{address}: too many pending requests")
                log.warning("rate limit for %s", address)
                continue
            request = wks.build_confirmation_request(
                submission_address=submission_address, address=address,
                fingerprint=cleaned.info.fingerprint, nonce=nonce, user_key=cleaned.key,
                submission_secret_key=secret, now=now)
            try:
                self._send(domain, address, request)
            except MailerUnavailable:
                self.directory.delete_pending(pending)
                raise
            sent += 1
            log.info("confirmation request for %s (%s) sent", address,
                     cleaned.info.fingerprint)
        if not sent:
            raise MessageRefused("nothing to confirm: " + ("; ".join(reasons) or "no address"))
        return Discard("confirmation requested")

    def _confirmation(self, tx: Transaction, domain: DomainConfig,
                      response: wks.ConfirmationResponse) -> Reply:
        if response.submission_address.key != Address.parse(domain.submission_address).key:
            raise MessageRefused("the response names another submission address")
        now = int(self.clock())
        try:
            # Compares the offered nonce with the stored ones in constant time.
            pending = self.directory.get_pending(response.nonce, response.address, now)
        except (NotFound, Refused):
            raise MessageRefused("no pending request for this nonce (used, expired or unknown)"
                                 ) from None
        user = self.directory.find_user(response.address, with_key=True)
        if user is None:
            raise MessageRefused(f"{response.address} is no longer a user here")
        try:
            # The request is used up only after the key is written: of two concurrent
            # responses only one uses it, and a publication that fails (the directory
            # down) leaves the request for the retried response.
            cleaned = self._publish(user, pending.key, [response.address],
                                    KeyOrigin.WKS_CONFIRMED, str(response.address),
                                    consume=pending)
        except NotFound:
            raise MessageRefused("this confirmation was used already") from None
        notice = wks.build_published_notice(
            submission_address=Address.parse(domain.submission_address),
            address=response.address, fingerprint=cleaned.info.fingerprint, now=now,
            in_reply_to=_message_id(tx))
        self._send(domain, response.address, notice)
        log.info("published %s for %s (WKS confirmed)",
                 cleaned.info.fingerprint, response.address)
        return Discard("confirmed")

    # --- Autocrypt ------------------------------------------------------------------------

    def _forget_hints(self) -> None:
        with self._lock:
            self._hints.clear()
            self._hint_checked = 0.0

    def _fresh_hints(self) -> None:
        """Drop cached keydata when the directory changed (checked at most once a second)."""
        now = self.clock()
        if now - self._hint_checked < 1.0:
            return
        token = self.directory.change_token()
        with self._lock:
            self._hint_checked = now
            if token != self._hint_token:
                self._hints.clear()
                self._hint_token = token

    def _hint(self, address: Address) -> _CachedHint:
        self._fresh_hints()
        with self._lock:
            cached = self._hints.get(address.key)
            if cached is not None:
                self._hints.move_to_end(address.key)
                return cached
        hint = _CachedHint(None, None, None)
        user = self.directory.find_user(address, with_key=True)
        if user is not None:
            stored = self.directory.current_key(user)
            if stored is not None and not stored.revoked and not stored.disabled:
                try:
                    keydata = openpgp.autocrypt_keydata(stored.key, address)
                except Refused as exc:
                    log.info("no Autocrypt header for %s: %s", address, exc.reason)
                    keydata = None
                prefer = stored.prefer_encrypt
                hint = _CachedHint(keydata, user.dn,
                                   None if prefer is None else prefer == "mutual")
            else:
                hint = _CachedHint(None, user.dn, None)
        with self._lock:
            self._hints[address.key] = hint
            while len(self._hints) > 10000:
                self._hints.popitem(last=False)
        return hint

    def _outgoing(self, tx: Transaction) -> Reply:
        try:
            return self._outgoing_edits(tx)
        except (Unavailable, ConfigError, Refused) as exc:
            # The mail flows, without Autocrypt header and without our DKIM signature: the
            # directory decides who owns the From, and a hint never stops mail.
            log.warning("no Autocrypt header, not DKIM-signed: %s", exc.reason)
            return Accept()

    def _outgoing_edits(self, tx: Transaction) -> Reply:
        cfg = self.config.milter
        sender = autocrypt.single_from_address(tx.header_values("From"))
        existing = len(tx.header_values(autocrypt.HEADER))
        if not self._is_ours(tx):
            if (cfg.strip_inbound_autocrypt and existing and sender is not None
                    and sender.domain in self._domains):
                log.info("removing %d Autocrypt header(s) claiming %s", existing, sender)
                return Accept(edits=tuple(HeaderEdit(autocrypt.HEADER, None, index)
                                          for index in range(existing, 0, -1)))
            return Accept()
        edits: list[HeaderEdit] = []
        if (cfg.autocrypt and sender is not None and not existing
                and sender.domain in self._domains
                and not autocrypt.is_multipart_report(_last(tx.header_values("Content-Type")))):
            hint = self._hint(sender)
            if hint.keydata is not None and self._sender_may_use(tx, hint):
                mutual = cfg.prefer_encrypt_mutual if hint.prefer_mutual is None \
                    else hint.prefer_mutual
                value = autocrypt.build(sender, hint.keydata, prefer_encrypt_mutual=mutual)
                edits.append(HeaderEdit(autocrypt.HEADER, value))
        if cfg.dkim_sign_outgoing and sender is not None:
            domain = self._domains.get(sender.domain)
            keys = self._dkim_keys(domain) if domain is not None else ()
            # A signature says the provider vouches for the From: only for its owner.
            if keys and not tx.oversize and self._owns_from(tx, sender):
                message = tx.raw_message([(e.name, e.value or "") for e in edits])
                # Inserted at the top, each in turn: the first key's ends up on top.
                for signature in reversed(dkim.signature_headers(message, keys)):
                    name, _, value = signature.decode("ascii").partition(":")
                    edits.append(HeaderEdit(name, value.strip().replace("\r\n", "\n"), 0))
        return Accept(edits=tuple(edits))

    def _owns_from(self, tx: Transaction, sender: Address) -> bool:
        """The mail may carry our DKIM signature: it comes from a trusted network, or the
        directory user of the SASL login owns the From address (mail or alias). The
        directory down raises Unavailable: the mail then goes out unsigned."""
        if not tx.sasl_login:
            return True  # _is_ours: a trusted network (webmail) vouches for its users
        owner = self._hint(sender)
        if self._sender_may_use(tx, owner):
            return True
        log.warning("not DKIM-signed: %s logged in, From %s is not theirs",
                    tx.sasl_login, sender)
        return False

    def _sender_may_use(self, tx: Transaction, hint: _CachedHint) -> bool:
        """A logged-in sender gets the header only for From addresses that are their own."""
        if not tx.sasl_login:
            return True
        try:
            login_user = self._hint(Address.parse(tx.sasl_login))
        except Refused:
            return False
        return login_user.dn is not None and login_user.dn == hint.dn


def _last(values: list[str]) -> str | None:
    return values[-1] if values else None


def _message_id(tx: Transaction) -> str | None:
    values = tx.header_values("Message-ID")
    return values[0].strip() if values else None

