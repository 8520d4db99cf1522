"""The WKS flows: what mail to a domain's submission address does.

- From a logged-in user (SASL login = one of the user's addresses) and `auth_submit`:
  decrypt, clean the key for the addresses that user owns (addresses of others are refused
  and named in the notice), publish with provenance auth-submit (merged with the user's
  published copy of the same key), send a DKIM-signed notice, discard the submission.
- From anybody else (if `allow_unauthenticated`): for each address of the key that belongs
  to a directory user, store a pending request (nonce bound to address and fingerprint,
  expiring after pending_days, rate-limited per address) and send that address a
  confirmation request encrypted to the submitted key.
- A confirmation response: decrypt, take the pending request once (nonce compared in
  constant time, From must be the confirmed address), publish with provenance
  wks-confirmed, notify.

Every publication goes through milter_wkd.publication.publish. Reads [milter] (sizes,
pending_days, max_pending_per_address), [keys] and [[domains]]. Fails by raising: Refused
(MessageRefused: 5xx with the reason, nothing stored), DirectoryUnavailable, Unavailable,
MailerUnavailable, ConfigError (all 451); milter_wkd.service maps them to replies. A
confirmation request whose mail cannot be sent is withdrawn again.

Retries publish once and notify once. A publication is written before its notice is sent
and the notice before the milter answers, so a milter that dies in between (SIGKILL, a
crash; Postfix's milter_default_action = tempfail answers 4xx) gets the same message again
from Postfix's queue or the client. Every publication therefore records, in the directory,
which message made it and whether its notice went out: the SHA-256 of the message body
(for PGP/MIME the ciphertext, unique to each submission; a retry carries the same bytes),
16 hex digits of it appended to the provenance's actor (Provenance has no field of its own
for it; only this module writes and reads the suffix):

    alice@example.org (submission 3f0c9a1e2b7d4c55, notice unsent)   written with the key
    alice@example.org (submission 3f0c9a1e2b7d4c55)                  once the MTA took the notice

The same message again finds its record: "notice unsent" (the milter died, the directory
failed after the write, the reinjection refused the notice) and the retry publishes again
(the same key: idempotent) or, for a confirmation whose request it used up, sends the
notice of the key it published, then records it; recorded as sent, the retry is answered
Discard with no second notice and no refusal (a used confirmation is no longer answered
550, which bounced to the user), unless the published key no longer holds what the
submission brought (another user's proven claim took a subkey, an admin edited the key):
then it is published and notified again, as a new message would be. The notice is thus
never lost, and sent twice only when the milter dies between the reinjection's 250 and
the second directory write (milliseconds). Recording is best effort: when that write
fails, the notice went out and the milter still answers Discard, so no retry comes. A
deliberate second submission of the same key is a new message (new ciphertext) and gets
its notice; a second submission of the same unencrypted bytes that would change nothing
is taken for a retry.

Test hook (tests/integration/test_fault_regressions.py only): with the environment
variable MILTER_WKD_TEST_DIE_AFTER_NOTICE=1 the milter SIGKILLs itself right after it
recorded a sent notice, before it answers Postfix.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import os
import signal
from collections.abc import Callable, Mapping

from milter_wkd import dkim, openpgp, publication, wks
from milter_wkd.config import Config, DomainConfig
from milter_wkd.errors import (
    MessageRefused,
    MilterWkdError,
    NotFound,
    RateLimited,
    Refused,
)
from milter_wkd.mailer import Mailer, MailerUnavailable
from milter_wkd.publication import Policy
from milter_wkd.replies import Discard, Reject, Reply
from milter_wkd.servicekeys import ServiceKeys
from milter_wkd.store.model import (
    KeyOrigin,
    PendingRequest,
    StoredKey,
    User,
    key_fingerprints,
)
from milter_wkd.store.protocol import KeyStore
from milter_wkd.transaction import Transaction
from milter_wkd.values import Address

log = logging.getLogger(__name__)

DAY = 86400
DIE_AFTER_NOTICE = "MILTER_WKD_TEST_DIE_AFTER_NOTICE"


class Record(enum.Enum):
    """What the directory says about a message's publication (see the module docstring)."""

    NONE = "none"  # not published by this message (or published over since)
    UNSENT = "unsent"  # published, its notice not known to have gone out
    SENT = "sent"


class Submissions:
    """Shared by all milter connections; thread-safe (the store and mailer are)."""

    def __init__(self, config: Config, directory: KeyStore, mailer: Mailer, keys: ServiceKeys,
                 *, clock: Callable[[], float], after_publish: Callable[[], None]) -> None:
        self.config = config
        self.directory = directory
        self.mailer = mailer
        self.keys = keys
        self.clock = clock
        # Told after every publication (the Autocrypt cache forgets what it knew).
        self.after_publish = after_publish
        self.max_body = config.milter.max_submission_bytes
        self._domains: Mapping[str, DomainConfig] = {d.name.lower(): d for d in config.domains}
        self._die_after_notice = os.environ.get(DIE_AFTER_NOTICE) == "1"

    def handle(self, tx: Transaction, domain: DomainConfig) -> Reply:
        """The reply for mail to `domain`'s submission address: a submission or a
        confirmation response."""
        if tx.oversize:
            return Reject(552, "5.3.4", f"Key submission larger than {self.max_body} octets")
        raw = tx.raw_message()
        decrypt = wks.decrypter(self.keys.submission_secret(domain), max_plaintext=self.max_body)
        # One parse decides what the mail is, so a refusal names what is wrong with it
        # (a response from the wrong From is refused for that, not as a bad submission).
        parsed = wks.parse_message(raw, decrypt, max_mail=self.max_body)
        digest = message_digest(raw, len(tx.header_block()))
        if isinstance(parsed, wks.ConfirmationResponse):
            return self._confirmation(tx, domain, parsed, digest)
        submission = parsed
        # One pass over the submitted bytes (a flooded key is megabytes): everything after
        # works on what survives, which cleaning again only narrows to fewer addresses.
        limits = self.config.keys.limits(mailbox_only=domain.mailbox_only)
        everything = openpgp.clean_key(submission.key, None, limits=limits)
        submission = dataclasses.replace(submission, key=everything.key)
        if tx.sasl_login and domain.auth_submit:
            return self._authenticated(tx, domain, submission, everything, digest)
        if not domain.allow_unauthenticated:
            return Reject(550, "5.7.1", "Log in (SMTP AUTH) to publish keys")
        return self._unauthenticated(domain, submission, list(everything.info.addresses))

    # --- the three flows --------------------------------------------------------------------

    def _authenticated(self, tx: Transaction, domain: DomainConfig,
                       submission: wks.Submission, everything: openpgp.CleanResult,
                       digest: str) -> Reply:
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
        for address in everything.info.addresses:
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
        stored = self.directory.current_key(user)
        if recorded(stored, digest) is Record.SENT and self._holds(stored, everything, user,
                                                                   domain):
            return self._again(digest, f"auth-submit by {login}", "published")
        cleaned = self._publish(user, submission.key, own, KeyOrigin.AUTH_SUBMIT,
                                actor(str(login), digest, sent=False), everything)
        text_refused = "".join(f"\nNot published for {r}" for r in refused) + "".join(
            f"\nLeft out: {part}" for part in dict.fromkeys((*everything.dropped,
                                                               *cleaned.dropped)))
        notice = wks.build_notice(
            submission_address=Address.parse(domain.submission_address), address=login,
            subject="Your key has been published",
            text=(f"Your OpenPGP key {cleaned.info.fingerprint}\nis now published for: "
                  + ", ".join(str(a) for a in cleaned.info.addresses) + "\n" + text_refused
                  + f"\n\nAnyone can now find it, e.g. with: gpg --locate-keys {login}\n"),
            now=int(self.clock()), in_reply_to=_message_id(tx))
        self._send(domain, login, notice)
        self._record_sent(login, KeyOrigin.AUTH_SUBMIT, str(login), digest)
        log.info("published %s for %s (auth-submit by %s)%s", cleaned.info.fingerprint,
                 ", ".join(map(str, cleaned.info.addresses)), login,
                 f"; refused {len(refused)} address(es)" if refused else "")
        return Discard("published")

    def _unauthenticated(self, domain: DomainConfig, submission: wks.Submission,
                         key_addresses: list[Address]) -> Reply:
        now = int(self.clock())
        submission_address = Address.parse(domain.submission_address)
        secret = self.keys.submission_secret(domain)
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
            log.info("confirmation request for %s (%s) sent", address, cleaned.info.fingerprint)
        if not sent:
            raise MessageRefused("nothing to confirm: " + ("; ".join(reasons) or "no address"))
        return Discard("confirmation requested")

    def _confirmation(self, tx: Transaction, domain: DomainConfig,
                      response: wks.ConfirmationResponse, digest: str) -> Reply:
        if response.submission_address.key != Address.parse(domain.submission_address).key:
            raise MessageRefused("the response names another submission address")
        now = int(self.clock())
        try:
            # Compares the offered nonce with the stored ones in constant time.
            pending = self.directory.get_pending(response.nonce, response.address, now)
        except (NotFound, Refused):
            # This very response may have used it up already (the milter died before it
            # answered): then the key it published carries its digest.
            owner = self.directory.find_user(response.address, with_key=True)
            stored = self.directory.current_key(owner) if owner is not None else None
            record = recorded(stored, digest)
            if record is Record.SENT:
                return self._again(digest, f"confirmation by {response.address}", "confirmed")
            if stored is not None and record is Record.UNSENT:  # send the notice now
                self._send(domain, response.address, wks.build_published_notice(
                    submission_address=Address.parse(domain.submission_address),
                    address=response.address, fingerprint=stored.fingerprint, now=now,
                    in_reply_to=_message_id(tx)))
                self._record_sent(response.address, KeyOrigin.WKS_CONFIRMED,
                                  str(response.address), digest)
                log.info("published %s for %s (WKS confirmed; notice sent on the retry)",
                         stored.fingerprint, response.address)
                return Discard("confirmed")
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
                                    KeyOrigin.WKS_CONFIRMED,
                                    actor(str(response.address), digest, sent=False),
                                    consume=pending)
        except NotFound:
            raise MessageRefused("this confirmation was used already") from None
        notice = wks.build_published_notice(
            submission_address=Address.parse(domain.submission_address),
            address=response.address, fingerprint=cleaned.info.fingerprint, now=now,
            in_reply_to=_message_id(tx))
        self._send(domain, response.address, notice)
        self._record_sent(response.address, KeyOrigin.WKS_CONFIRMED, str(response.address),
                          digest)
        log.info("published %s for %s (WKS confirmed)", cleaned.info.fingerprint,
                 response.address)
        return Discard("confirmed")

    # --- helpers ----------------------------------------------------------------------------

    def _publish(self, user: User, key: bytes, addresses: list[Address], origin: KeyOrigin,
                 actor: str, cleaned: openpgp.CleanResult | None = None,
                 consume: PendingRequest | None = None) -> openpgp.CleanResult:
        """publication.publish under the policy of the addresses' domain; what was written."""
        domain = self._domains.get(addresses[0].domain) if addresses else None
        policy = Policy.from_config(self.config.keys,
                                    mailbox_only=domain is not None and domain.mailbox_only)
        done = publication.publish(self.directory, user, key, origin=origin, actor=actor,
                                   now=int(self.clock()), policy=policy, addresses=addresses,
                                   cleaned=cleaned, consume=consume)
        self.after_publish()
        # Subkeys whose material another entry holds were left out (stats name them).
        return done.cleaned

    def _send(self, domain: DomainConfig, recipient: Address, message: bytes) -> None:
        """A reply of the service, DKIM-signed with the domain's keys if it has any."""
        keys = self.keys.dkim(domain)
        if keys:
            message = dkim.sign(message, keys)
        self.mailer.send(domain.submission_address, str(recipient), message)

    def _record_sent(self, address: Address, origin: KeyOrigin, who: str,
                     digest: str) -> None:
        """Record in the directory that the notice of the publication `digest` made went
        out (the same key written again, its actor without "notice unsent"). Best effort:
        on failure the milter still answers Discard, so no retry comes to send it again."""
        try:
            user = self.directory.find_user(address, with_key=True)
            stored = self.directory.current_key(user) if user is not None else None
            if user is None or stored is None or recorded(stored, digest) is not Record.UNSENT:
                return  # published over meanwhile: nothing of ours to record
            self._publish(user, stored.key, list(stored.addresses), origin,
                          actor(who, digest, sent=True))
        except MilterWkdError as exc:
            log.warning("the notice for message %s went out, but recording it failed: %s",
                        digest, exc)
            return
        if self._die_after_notice:
            log.warning("%s=1: dying before the reply, as a SIGKILL would", DIE_AFTER_NOTICE)
            os.kill(os.getpid(), signal.SIGKILL)

    def _holds(self, stored: StoredKey | None, submitted: openpgp.CleanResult, user: User,
               domain: DomainConfig) -> bool:
        """Does the published key still hold all the submission brought (merging it in
        changes nothing)? Not when it changed since: another user's proven claim took a
        subkey, an admin edited it; then the message is published (and notified) again."""
        if stored is None or stored.fingerprint != submitted.info.fingerprint:
            return False
        limits = self.config.keys.limits(mailbox_only=domain.mailbox_only)
        try:
            merged = openpgp.merge_keys(stored.key, submitted.key, list(user.addresses),
                                        limits=limits)
        except Refused:
            return False
        return merged.key == stored.key

    def _again(self, digest: str, what: str, outcome: str) -> Reply:
        """A message whose publication and sent notice the directory records: a retry."""
        log.info("retried %s (message %s): %s already, notice sent already", what, digest,
                 outcome)
        return Discard(f"{outcome} already")


def message_digest(raw: bytes, header_octets: int) -> str:
    """Which message this is, as a publication records it: SHA-256 of its body (after the
    header block of `header_octets` and the empty line), 16 hex digits (64 bits: a collision
    could only cost a notice, and only between two messages of one user). Postfix hands a
    retried message over with the same body; headers are left out because the MTA may add
    or rewrite some (Received, Message-ID) between attempts."""
    return hashlib.sha256(memoryview(raw)[header_octets + 2:]).hexdigest()[:16]


def actor(who: str, digest: str, *, sent: bool) -> str:
    """The provenance actor of a publication made by the message `digest`."""
    return f"{who} (submission {digest})" if sent else (
        f"{who} (submission {digest}, notice unsent)")


def recorded(stored: StoredKey | None, digest: str) -> Record:
    """What this published key records of the message `digest` (see the module docstring)."""
    if stored is None or stored.provenance is None:
        return Record.NONE
    if stored.provenance.actor.endswith(f" (submission {digest})"):
        return Record.SENT
    if stored.provenance.actor.endswith(f" (submission {digest}, notice unsent)"):
        return Record.UNSENT
    return Record.NONE


def _message_id(tx: Transaction) -> str | None:
    values = tx.header_values("Message-ID")
    return values[0].strip() if values else None
