"""What the milter does with a message: `MailService.decide` routes it to one flow and turns
what goes wrong into one reply. The milter adapter (milter_wkd.milter) calls it.

- Mail to a domain's submission address: the WKS flows (milter_wkd.submissions). Other
  recipients of the same mail keep it; only our copy is consumed.
- Everything else: milter_wkd.outgoing (Autocrypt header and DKIM signature on our users'
  mail, i.e. with a SASL login or from trusted_networks; inbound Autocrypt stripping).
- Bodies over [milter] body_memory_bytes wait in one of two queues of max_large_bodies
  (submissions, our users' mail), so anonymous submissions never hold up users' mail.

Reads the [milter], [keys], [mailer] and [[domains]] config and the files they name (keys of
the service: milter_wkd.servicekeys). Failures: directory or mailer down -> 451 4.7.1 /
451 4.4.1 (Postfix keeps the mail and retries); a broken key file -> 451 4.3.5; refused input
-> 5xx with the reason, nothing stored; a body we needed and could not keep, or too many
large ones at once -> 451 4.3.2; Autocrypt and signing problems never stop mail.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable

from milter_wkd.config import Config, ConfigError, DomainConfig
from milter_wkd.errors import DirectoryUnavailable, Refused, Unavailable
from milter_wkd.mailer import Mailer, MailerUnavailable
from milter_wkd.outgoing import OutgoingMail
from milter_wkd.replies import DIRECTORY_DOWN, Accept, Discard, Reject, Reply, TempFail
from milter_wkd.servicekeys import ServiceKeys
from milter_wkd.store.protocol import KeyStore
from milter_wkd.submissions import Submissions
from milter_wkd.transaction import SpoolBudget, Transaction
from milter_wkd.values import Address

log = logging.getLogger(__name__)

MAILER_DOWN = TempFail(451, "4.4.1", "Cannot send the key service's reply - try again later")
CONFIG_BROKEN = TempFail(451, "4.3.5", "Key service misconfigured - try again later")
LARGE_BODIES_BUSY = TempFail(451, "4.3.2", "Too many large messages at once - try again later")


class MailService:
    """Shared by all milter connections; every method is thread-safe."""

    def __init__(self, config: Config, directory: KeyStore, mailer: Mailer, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.max_body = config.milter.max_submission_bytes
        self.body_memory = config.milter.body_memory_bytes
        # Bodies over body_memory wait on disk; reading one back and parsing it costs a
        # few times its size, so only this many are in memory at once.
        self._large_bodies = threading.BoundedSemaphore(config.milter.max_large_bodies)
        self._large_outgoing = threading.BoundedSemaphore(config.milter.max_large_bodies)
        self.spool = SpoolBudget(config.milter.max_spool_bytes)
        self._submission = {Address.parse(d.submission_address).key: d for d in config.domains}
        self._trusted = [ipaddress.ip_network(n, strict=False)
                         for n in config.milter.trusted_networks]
        self._directory = directory
        self.keys = ServiceKeys()
        self.outgoing = OutgoingMail(config, directory, self.keys, clock=clock)
        self.submissions = Submissions(config, directory, mailer, self.keys, clock=clock,
                                       after_publish=self.outgoing.autocrypt.forget)

    @property
    def directory(self) -> KeyStore:
        return self._directory

    @property
    def mailer(self) -> Mailer:
        """Where the service's own mail (notices, confirmation requests) goes."""
        return self.submissions.mailer

    @mailer.setter
    def mailer(self, mailer: Mailer) -> None:
        self.submissions.mailer = mailer

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

    def _is_submission_address(self, recipient: str) -> bool:
        try:
            return Address.parse(recipient).key in self._submission
        except Refused:
            return False

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
            return self.outgoing.handle(tx, ours=self._is_ours(tx))
        reply = self._submission_reply(tx, domain)
        if isinstance(reply, Discard) and any(
                not self._is_submission_address(r) for r in tx.recipients):
            # Mail that also goes elsewhere is delivered there; only our copy is consumed.
            return Accept(remove_recipients=tuple(
                r for r in tx.recipients if self._is_submission_address(r)))
        return reply

    def _submission_reply(self, tx: Transaction, domain: DomainConfig) -> Reply:
        """The WKS flow's reply, or the one for what went wrong in it."""
        try:
            return self.submissions.handle(tx, domain)
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
