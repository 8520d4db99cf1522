"""The key follower: makes every attribute derived from a `pgpKey` follow that `pgpKey`.

Administrators (and LDAP tooling with their rights) may replace `pgpKey` on an entry
directly; users may not (ldap/config/30-access.ldif). The system then re-derives everything
else from the new value with the rules of a submission, so that an LDAP edit can never put
on an entry what a submission could not: the key is cleaned for the entry's own addresses
(`openpgp.clean_key`) and published with `LdapStore.publish_key` (ownership, one entry per
piece of key material, `wkdKeyDigest`), provenance `admin-edit`. A key it cannot accept
(unreadable, no user ID of the entry's addresses, material another entry holds) is withheld
(`LdapStore.withhold_key`: derived attributes and claims removed, `pgpKey` kept for the
administrator to fix, the reason in `wkdKeyProblem`) and logged as a WARNING naming the
entry; `milter-wkd check` lists such entries, and the WKD responder serves no entry whose
`wkdKeyDigest` does not match its `pgpKey` or that has a `wkdKeyProblem`. An entry whose
`pgpKey` was deleted loses what was derived from it.

Replication (ldap/README.md, "Conflicts"): an entry that publishes its key consistently is
also checked against the claims and the other holders of its material (one indexed
search), which conflicting writes on two providers can leave wrong: two entries
publishing the same material, the claim naming the later writer. The earlier publication
keeps the material, the other key is withheld, the claims are made again for the keeper.

`Reconciler.run_once()` looks at the key holders written since the last look (the suffix's
contextCSN, then `entryCSN >=`; everything the first time, which gives entries published
before digests existed a digest or a problem); `start()` does that every `interval` seconds
(0.25: as fresh as the responder) in a daemon thread. The milter process runs it
(`milter-wkd milter`): only the milter's account may write keys.

Reads the [directory] section through the `LdapStore` it is given (the milter's account)
and [keys] max_input_bytes (the caller's `limits`).

Failure: a directory that does not answer ends the pass; the next poll starts again from
the same point (nothing is skipped). An entry written by someone else while it was being
judged is left alone (every write asserts the entry is as judged) and looked at in the
next pass. An entry that fails otherwise is logged and looked at again at
its next change or the next start; a withheld key is looked at again every minute (the
material another entry held may have been released). The follower never stops the milter.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from enum import StrEnum

from milter_wkd import openpgp
from milter_wkd.errors import (
    Changed,
    Conflict,
    KeyRefused,
    MilterWkdError,
    NotFound,
    Refused,
    Unavailable,
)
from milter_wkd.openpgp import CleanResult
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.model import (
    Holdings,
    KeyOrigin,
    Provenance,
    User,
    dn_key,
    wanted_claims,
)
from milter_wkd.store.schema import (
    DIGEST,
    PROBLEM,
    Entry,
    key_attributes,
    key_digest,
    parse_gnupg_time,
)
from milter_wkd.store.view import changes_from
from milter_wkd.values import Fingerprint

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.25
# Withheld keys are looked at again this often even when their entry did not change: the
# material another entry held may have been released since.
RETRY_WITHHELD = 60.0
ACTOR = "ldap"
MAX_PROBLEM = 1000  # what withhold_key stores of a reason (the schema allows 1024)
# Derived attributes whose presence means "this entry publishes something".
_PUBLISHING = ("pgpCertID", "gpgFingerprint", "gpgMailbox", "wkdAddressHash")


class Outcome(StrEnum):
    UNCHANGED = "unchanged"
    PUBLISHED = "published"
    WITHHELD = "withheld"
    CLEARED = "cleared"
    CHANGED = "changed"  # written by someone else meanwhile: looked at in the next pass
    FAILED = "failed"


def derived_differ(snapshot: Entry, cleaned: CleanResult) -> list[str]:
    """The derived attributes whose stored values are not what the cleaned key gives."""
    wanted = key_attributes(cleaned.info, openpgp.armor_key(cleaned.key))
    wanted.pop("pgpKey")
    return [name for name, values in wanted.items()
            if {v.decode("utf-8", "replace") for v in snapshot.values(name)} != set(values)]


def _provenance(snapshot: Entry, now: int) -> Provenance:
    """The entry's own provenance when it has a valid one (an entry published before
    digests existed keeps it), else an administrator's LDAP edit now."""
    source = snapshot.text("wkdKeySource")
    if source in set(KeyOrigin):
        return Provenance(KeyOrigin(source), snapshot.text("wkdKeySourceActor") or "",
                          parse_gnupg_time(snapshot.text("wkdKeyPublished") or "") or now)
    return Provenance(KeyOrigin.ADMIN_EDIT, ACTOR, now)


class Reconciler:
    def __init__(self, directory: LdapStore, *, interval: float = POLL_INTERVAL,
                 limits: openpgp.Limits | Callable[[User], openpgp.Limits] = (
                     openpgp.DEFAULT_LIMITS),
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.interval = interval
        # The policy of a submission for this entry's addresses (a domain's mailbox_only).
        self.limits_for: Callable[[User], openpgp.Limits] = (
            limits if callable(limits) else lambda _user: limits)
        self.clock = clock
        self.token: str | None = None  # None: nothing looked at yet (a full pass is due)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one pass -----------------------------------------------------------------------

    def run_once(self) -> dict[str, Outcome]:
        """Look at every key holder written since the last pass; {DN: outcome} of those
        that were looked at. Raises DirectoryUnavailable (the token stays where it was)."""
        token = self.directory.change_token()
        if token == self.token:
            return {}
        since = changes_from(self.token, token) if self.token else ""
        outcomes: dict[str, Outcome] = {}

        def visit(user: User, _csn: str) -> None:
            # A full pass (at start) trusts a key whose digest says the system wrote it:
            # re-checking every key of a large directory would cost minutes of CPU.
            outcomes[user.dn] = self.reconcile(user, trust_digest=not since)

        self.directory.each_key_holder(since, visit)
        # Our own writes move the token again: the next pass sees those entries once more
        # and finds them consistent (UNCHANGED), which ends it.
        self.token = token
        return outcomes

    def retry_withheld(self) -> dict[str, Outcome]:
        """Look again at every withheld key (what blocked it may be gone)."""
        return {user.dn: self.reconcile(user)
                for user, _csn in self.directory.key_holders_since("", withheld_only=True)}

    def reconcile(self, user: User, *, trust_digest: bool = False) -> Outcome:
        """Make one entry (read with its key attributes: `User.snapshot`) consistent.
        trust_digest: an entry whose wkdKeyDigest matches its pgpKey and that has no
        problem is taken as the system wrote it, without cleaning the key again."""
        snapshot = user.snapshot or Entry(user.dn, {})
        keys = snapshot.values("pgpKey")
        try:
            if not keys:
                return self._cleared(user, snapshot)
            if (trust_digest and not snapshot.values(PROBLEM)
                    and snapshot.text(DIGEST) == key_digest(keys[0])):
                return Outcome.UNCHANGED
            return self._checked(user, snapshot, keys[0])
        except Changed:
            # Written while judged: its new entryCSN brings it into the next pass.
            return Outcome.CHANGED
        except Unavailable:
            # The directory is down: the pass is repeated from the same point.
            raise
        except MilterWkdError as exc:
            log.warning("cannot reconcile the key of %s: %s", user.dn, exc.reason)
            return Outcome.FAILED

    def _cleared(self, user: User, snapshot: Entry) -> Outcome:
        leftovers = [n for n in (*_PUBLISHING, DIGEST, PROBLEM) if snapshot.values(n)]
        if not leftovers:
            return Outcome.UNCHANGED
        log.info("pgpKey of %s was removed: clearing %s", user.dn, ", ".join(leftovers))
        with contextlib.suppress(NotFound):  # it clears the leftovers all the same
            self.directory.remove_key(user)
        return Outcome.CLEARED

    def _checked(self, user: User, snapshot: Entry, value: bytes,
                 ) -> Outcome:
        problem = snapshot.text(PROBLEM)
        try:
            limits = self.limits_for(user)
            cleaned = openpgp.clean_key(value, user.addresses, limits=limits)
        except Refused as exc:
            return self._withheld(user, snapshot, problem, f"unusable key: {exc.reason}")
        consistent = not problem and not derived_differ(snapshot, cleaned)
        if consistent and snapshot.text(DIGEST) == key_digest(value):
            return self._holdings_checked(user, snapshot, cleaned, limits)
        now = int(self.clock())
        # Derived attributes that match mean a publication by the system from before
        # digests existed: it keeps its provenance. Anything else is an LDAP edit.
        provenance = (_provenance(snapshot, now) if consistent
                      else Provenance(KeyOrigin.ADMIN_EDIT, ACTOR, now))
        try:
            self.directory.publish_key(user, cleaned, provenance, limits=limits)
        except (KeyRefused, Conflict) as exc:
            return self._withheld(user, snapshot, problem, exc.reason)
        if problem:
            log.info("the key of %s is published again (it was withheld: %s)", user.dn,
                     problem)
        else:
            log.info("re-derived the key attributes of %s from its pgpKey", user.dn)
        return Outcome.PUBLISHED

    def _holdings_checked(self, user: User, snapshot: Entry, cleaned: CleanResult,
                          limits: openpgp.Limits) -> Outcome:
        """An entry that publishes its key as the system wrote it: are the claims on its
        material its own, and does no other entry publish that material? On one server
        both always hold; conflicting publications on two providers (a partition) leave
        each entry consistent in itself but two entries holding the same material, the
        claim naming the later writer (last writer wins). The repair: the EARLIER
        publication (wkdKeyPublished; the same second: the smaller DN) keeps the
        material, as on one server where the later one would have been refused; the
        other key is withheld; the claims are made to name the keeper (ldap/README.md,
        "Conflicts")."""
        wanted = wanted_claims(cleaned.info)
        holdings = self.directory.holdings([Fingerprint.parse(f) for f in wanted])
        me = dn_key(user.dn)
        rivals = {holder for fpr in wanted for holder, _primary in
                  holdings.attributes.get(fpr, ()) if dn_key(holder) != me}
        unclaimed = [fpr for fpr in wanted if (claim := holdings.claims.get(fpr)) is None
                     or dn_key(claim.holder) != me]
        if not rivals and not unclaimed:
            return Outcome.UNCHANGED
        provenance = _provenance(snapshot, int(self.clock()))
        try:
            # Claims what is unclaimed, takes an unproven subkey from a rival or leaves it
            # out of this key (store.model.plan_claims); Conflict: both hold it proven.
            self.directory.publish_key(user, cleaned, provenance, limits=limits)
        except Conflict as exc:
            return self._conflict_repaired(user, snapshot, cleaned, provenance, holdings,
                                           exc.reason, limits)
        except KeyRefused as exc:
            return self._withheld(user, snapshot, None, exc.reason)
        log.warning("claims on the key material of %s repaired (replicated writes had "
                    "left them to %s)", user.dn, ", ".join(sorted(rivals)) or "nobody")
        return Outcome.PUBLISHED

    def _conflict_repaired(self, user: User, snapshot: Entry, cleaned: CleanResult,
                           provenance: Provenance, holdings: Holdings, reason: str,
                           limits: openpgp.Limits) -> Outcome:
        me = dn_key(user.dn)
        # The rivals that hold proven material of this key as proven (a primary key, or
        # a subkey their claim says is back-signed): those make the Conflict.
        rivals: dict[str, str] = {}
        for fpr, kind in wanted_claims(cleaned.info).items():
            claim = holdings.claims.get(fpr)
            for holder, primary in holdings.attributes.get(fpr, ()):
                proven = primary or (claim is not None and dn_key(claim.holder) == dn_key(
                    holder) and claim.kind.proven)
                if kind.proven and proven and dn_key(holder) != me:
                    rivals.setdefault(holder, fpr)
        mine = (provenance.published, me)
        earlier = [dn for dn in rivals if self._published_at(dn) < mine]
        if earlier or not rivals:
            self.directory.withhold_key(user.dn, reason[:MAX_PROBLEM],
                                        judged=snapshot.text("entryCSN"))
            # Withholding released this entry's claims; the keepers claim their material.
            for dn in earlier:
                self._revisit(dn)
            return Outcome.WITHHELD
        for dn, fpr in rivals.items():
            self.directory.withhold_key(
                dn, f"key {fpr} is published by another user already ({user.dn}, the "
                    "earlier publication; replicated writes had left both)"[:MAX_PROBLEM])
        self.directory.publish_key(user, cleaned, provenance, limits=limits)
        return Outcome.PUBLISHED

    def _published_at(self, dn: str) -> tuple[int, str]:
        """(wkdKeyPublished, DN) of another entry's published key: the order of the rule."""
        stored = self.directory.get_key(User(dn, ()))
        published = stored.provenance.published if stored and stored.provenance else 0
        return published, dn_key(dn)

    def _revisit(self, dn: str) -> None:
        """Reconcile another entry now (it did not change, so no pass would visit it)."""
        stored = self.directory.get_key(User(dn, ()))
        for address in stored.addresses[:1] if stored is not None else ():
            found = self.directory.find_user(address, with_key=True)
            if found is not None and dn_key(found.dn) == dn_key(dn):
                self.reconcile(found)

    def _withheld(self, user: User, snapshot: Entry, problem: str | None,
                  reason: str) -> Outcome:
        reason = reason[:MAX_PROBLEM]
        if problem == reason and not any(snapshot.values(n) for n in _PUBLISHING):
            return Outcome.UNCHANGED  # withheld for this very reason already
        # Only if the entry is still as judged; logs a warning naming the entry.
        self.directory.withhold_key(user.dn, reason, judged=snapshot.text("entryCSN"))
        return Outcome.WITHHELD

    # -- the thread ---------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="milter-wkd-reconcile",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _loop(self) -> None:
        down = False
        retried = time.monotonic()
        while not self._stop.is_set():
            try:
                self.run_once()
                if time.monotonic() - retried >= RETRY_WITHHELD:
                    retried = time.monotonic()
                    self.retry_withheld()
                if down:
                    log.info("key follower: directory back")
                down = False
            except MilterWkdError as exc:
                if not down:
                    log.warning("key follower: %s (retrying)", exc.reason)
                down = True
            except Exception:
                log.exception("key follower: unexpected error (retrying)")
            self._stop.wait(self.interval)
