"""The write store over LDAP: users by address, their published keys, claims on key
material, pending WKS requests, changes - what the milter, the CLI and the follower use.

`LdapStore` (thread-safe, connections from `store.connection.ConnectionPool`):
- users: `find_user(address)` searches `base_dn` for `(&<user_filter>(|(mail=a)(alias=a)))`
  over the configured `mail_attributes` (every value escaped); a user's addresses are the
  values of those attributes;
- keys, stored ON the user's entry (object class wkdKeyHolder, ldap/schema): the armored
  key in pgpKey and every attribute derived from it (`store.schema.key_attributes`), the
  provenance and wkdKeyDigest - all in ONE modify, asserting the entry is as it was read,
  so a reader sees the old key or the new one, never a mix; what an entry publishes is
  `store.schema.stored_key`, the rule every reader shares;
- claims on key material: one entry `wkdFingerprint=<hex>,<claims_base>` per primary key
  and subkey, naming the entry that holds it, made before the key is written. An LDAP add
  of an existing name fails, so two entries can never both hold the same material, even
  when two publications race. What is claimed, taken over, kept or refused is decided by
  `store.model.plan_claims` (proven beats unproven; a claim not yet backed by its
  holder's key is a publication under way for CLAIM_IN_FLIGHT seconds, a leftover after);
- pending WKS requests: entries `cn=<slot>.<hash>@<domain>,<pending_base>`, at most
  `limit` slots per address, so the per-address cap holds under any concurrency (create
  in a free slot, fetch by address with the nonce compared in constant time against the
  stored one, use up once, delete, expire);
- `change_token()`: contextCSN of the suffix (syncprov), which changes on every write.

Configuration: the [directory] section (see `store.connection`; base_dn, user_filter,
mail_attributes, pending_base, claims_base).

Failures: no answer, a broken connection that a retry on a fresh one does not mend, a
refused bind or a busy server raise `DirectoryUnavailable` (callers answer with a
temporary failure), and so does a publication whose claims kept changing under it or whose
material someone else is publishing right now (`Changed`); an unknown user, key or request
is `NotFound`; an address owned by two entries or key material another entry holds is
`Conflict`; all slots of an address taken is `RateLimited`; a key the directory itself
refuses (constraint overlay) is `KeyRefused`; any other LDAP error is `DirectoryError`.
Modifies are idempotent; an add or delete whose first attempt did go through reports
Conflict or NotFound on the retry; a publication cut off after its claims leaves claims
that its retry finds its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import ldap
from ldap.controls import SimplePagedResultsControl
from ldap.controls.libldap import AssertionControl
from ldap.dn import escape_dn_chars
from ldap.filter import escape_filter_chars

from milter_wkd.config import DirectoryConfig
from milter_wkd.errors import (
    Changed,
    Conflict,
    DirectoryError,
    DirectoryUnavailable,
    KeyRefused,
    MilterWkdError,
    NotFound,
    RateLimited,
    Refused,
)
from milter_wkd.openpgp import (
    DEFAULT_LIMITS,
    CleanResult,
    Limits,
    clean_key,
    without_subkeys,
)
from milter_wkd.store.connection import (
    BUSY_RESULTS,
    PAGE_SIZE,
    ConnectionPool,
    Query,
    change_token,
    encode,
    find_suffix,
    ldap_reason,
    searches,
)
from milter_wkd.store.model import (
    ClaimPlan,
    Holdings,
    KeyOrigin,
    PendingRequest,
    Provenance,
    StoredKey,
    User,
    dn_key,
    key_fingerprints,
    plan_claims,
    valid_nonce,
    wanted_claims,
)
from milter_wkd.store.schema import (
    CLAIM_ATTRIBUTES,
    CLAIM_CLASS,
    DIGEST,
    KEY_ATTRIBUTES,
    KEY_CLASS,
    PENDING_CLASS,
    PREFER_ENCRYPT,
    PROBLEM,
    Entry,
    address_slot,
    gnupg_time,
    holdings_of,
    parse_addresses,
    parse_gnupg_time,
    published_values,
    stored_key,
)
from milter_wkd.values import Address, Fingerprint

log = logging.getLogger(__name__)
T = TypeVar("T")


_CLAIM_ROUNDS = 3
REPLACE, ADD, DELETE = ldap.MOD_REPLACE, ldap.MOD_ADD, ldap.MOD_DELETE
BASE, SUBTREE = ldap.SCOPE_BASE, ldap.SCOPE_SUBTREE
Changes = dict[str, tuple[int, Sequence[str | bytes]]]


_RACE_RESULTS = (ldap.ALREADY_EXISTS, ldap.NO_SUCH_ATTRIBUTE, ldap.NO_SUCH_OBJECT,
                 ldap.ASSERTION_FAILED)
# A used-up pending request expires at the epoch (see Directory._consume_operation).
_EPOCH = gnupg_time(0).encode()
_USED = f"(wkdExpires<={gnupg_time(0)})"
_UNUSED = f"(!{_USED})"
# What publishing needs to know of the entry it writes, when not read with the user.
_ENTRY_STATE = ["objectClass", "entryCSN", "pgpKey", "pgpDisabled", PREFER_ENCRYPT,
                "gpgFingerprint", "gpgSubFingerprint", DIGEST]
# (add | modify | delete, DN, addlist or modlist, assertion filter or None)
Operation = tuple[str, str, Any, str | None]


def _modlist(changes: Changes) -> list[tuple[int, str, list[bytes] | None]]:
    return [(kind, name, encode(values) or None) for name, (kind, values) in changes.items()]


def _unchanged(entry: Entry) -> str:
    """An assertion that an entry is still as read: its entryCSN changes with every write
    (its digest, when the entryCSN was not read)."""
    csn = entry.text("entryCSN")
    if csn:
        return f"(entryCSN={escape_filter_chars(csn)})"
    digest = entry.text(DIGEST)
    return f"({DIGEST}={escape_filter_chars(digest)})" if digest else f"(!({DIGEST}=*))"


def _key_changes(entry: Entry, cleaned: CleanResult, provenance: Provenance,
                 disabled: str) -> tuple[Changes, dict[str, list[bytes]]]:
    """The modify that writes a key and everything derived from it on an entry, and the
    values it writes (what a read-back would return, without the round trip)."""
    values = published_values(cleaned, provenance, disabled=disabled == "1")
    changes: Changes = {name: (REPLACE, vals) for name, vals in values.items()}
    classes = {c.lower() for c in entry.texts("objectClass")}
    if classes and KEY_CLASS.lower() not in classes:
        changes["objectClass"] = (ADD, [KEY_CLASS])
    return changes, {name: encode(vals) for name, vals in values.items()}


def _withhold_changes(entry: Entry, reason: str) -> Changes:
    """Remove what was derived from the key (pgpKey stays for the administrator to fix,
    pgpDisabled as their decision) and say why in wkdKeyProblem."""
    changes: Changes = {name: (REPLACE, []) for name in KEY_ATTRIBUTES
                        if name not in ("pgpKey", "pgpDisabled", PROBLEM)
                        and entry.values(name)}
    changes[PROBLEM] = (REPLACE, [reason[:1000]])
    if KEY_CLASS.lower() not in {c.lower() for c in entry.texts("objectClass")}:
        changes["objectClass"] = (ADD, [KEY_CLASS])
    return changes


class LdapStore:
    """The directory store. Thread-safe; every method may raise DirectoryUnavailable."""

    def __init__(self, config: DirectoryConfig) -> None:
        if not config.mail_attributes:
            raise DirectoryError("[directory] mail_attributes must name at least one attribute")
        self.config = config
        self._pool = ConnectionPool(config)
        self._suffix: str | None = None
        self._common_base: str | None = None

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> LdapStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- low level --------------------------------------------------------------------

    def _call(self, operation: Callable[[Any], T]) -> T:
        try:
            return self._pool.run(operation)
        except BUSY_RESULTS as exc:
            raise DirectoryUnavailable(f"directory busy: {ldap_reason(exc)}") from None
        except ldap.CONSTRAINT_VIOLATION as exc:
            raise KeyRefused(f"the directory refused the data: {ldap_reason(exc)}") from None
        except ldap.INSUFFICIENT_ACCESS as exc:
            raise DirectoryError(f"the directory denied access: {ldap_reason(exc)}") from None

    def _search(self, base: str, filt: str, attributes: Sequence[str], *,
                scope: int = SUBTREE) -> list[Entry]:
        return self._searches([(base, filt, attributes, scope)])[0]

    def _searches(self, queries: Sequence[Query]) -> list[list[Entry]]:
        """Entries of several searches, sent together: one round trip, not one each."""
        timeout = self.config.timeout

        def operation(conn: Any) -> list[list[Entry]]:
            return searches(conn, queries, timeout)

        try:
            return self._call(operation)
        except ldap.LDAPError as exc:
            raise DirectoryError(
                f"search under {queries[0][0]} failed: {ldap_reason(exc)}") from None

    def _modify(self, dn: str, changes: Changes, *, assertion: str | None = None) -> None:
        """One modify; with an assertion, only if the entry still matches it (else
        DirectoryUnavailable: it changed meanwhile, decide again on what is there now)."""
        modlist = _modlist(changes)
        controls = [AssertionControl(True, assertion)] if assertion else None
        try:
            self._call(lambda conn: conn.modify_ext_s(dn, modlist, serverctrls=controls))
        except ldap.ASSERTION_FAILED:
            raise Changed(f"{dn} changed meanwhile") from None
        except ldap.NO_SUCH_OBJECT:
            raise NotFound(f"no entry {dn}") from None
        except ldap.LDAPError as exc:
            raise DirectoryError(f"modifying {dn} failed: {ldap_reason(exc)}") from None

    # -- users ------------------------------------------------------------------------

    def _address_filter(self, address: Address) -> str:
        value = escape_filter_chars(address.key)
        alternatives = "".join(f"({name}={value})" for name in self.config.mail_attributes)
        return f"(&{self.config.user_filter}(|{alternatives}))"

    def find_user(self, address: Address, *, with_key: bool = False,
                  holders_of: Sequence[Fingerprint] = ()) -> User | None:
        """The user whose mail attributes hold address; None if nobody's do.

        with_key: read the published key in the same search (`User.snapshot`), for a
        caller that goes on to `current_key` and `publish_key` at once. holders_of: also
        read, in the same round trip, the claims on those fingerprints and which entries
        hold them (`User.holders`, for `publish_key`).
        """
        attributes = list(self.config.mail_attributes)
        if with_key:
            attributes += ["objectClass", "entryCSN", *KEY_ATTRIBUTES, PREFER_ENCRYPT]
        queries: list[Query] = [
            (self.config.base_dn, self._address_filter(address), attributes, SUBTREE)]
        asked = frozenset(f.hex for f in holders_of)
        if asked:
            queries += self._holdings_queries(asked)
        entries, *holdings = self._searches(queries)
        if len(entries) > 1:
            raise Conflict(f"{address} belongs to {len(entries)} directory entries")
        if not entries:
            return None
        entry = entries[0]
        values = [v for name in self.config.mail_attributes for v in entry.texts(name)]
        return User(entry.dn, parse_addresses(values, entry.dn),
                    entry if with_key else None,
                    self._split_holdings(asked, holdings[0]) if asked else None)

    def user(self, address: Address) -> User:
        """Like find_user, but NotFound when nobody has the address."""
        found = self.find_user(address)
        if found is None:
            raise NotFound(f"no user has the address {address}")
        return found

    # -- keys -------------------------------------------------------------------------

    def _read_entry(self, dn: str, attributes: Sequence[str]) -> Entry | None:
        entries = self._search(dn, "(objectClass=*)", attributes, scope=BASE)
        return entries[0] if entries else None

    def get_key(self, user: User) -> StoredKey | None:
        """The key published on a user's entry, if any (read now)."""
        entry = self._read_entry(user.dn, [*KEY_ATTRIBUTES, PREFER_ENCRYPT])
        return stored_key(entry) if entry is not None else None

    def current_key(self, user: User) -> StoredKey | None:
        """The key as read with the user (find_user with_key=True), else read now."""
        if user.snapshot is None:
            return self.get_key(user)
        return stored_key(user.snapshot)

    def key_for(self, address: Address) -> StoredKey | None:
        """The key published by the user who owns address (None: no user or no key)."""
        found = self.find_user(address, with_key=True)
        return self.current_key(found) if found is not None else None

    def _holdings_queries(self, fingerprints: frozenset[str],
                          ) -> list[Query]:
        """ONE search (below the nearest entry above both base_dn and claims_base) for the
        claims on fingerprints and the entries whose key attributes hold them: every term
        is an indexed equality (20-indexes.ldif)."""
        values = [escape_filter_chars(f) for f in sorted(fingerprints)]
        held = "".join(f"(gpgFingerprint={v})(gpgSubFingerprint={v})" for v in values)
        claims = "".join(f"(wkdFingerprint={v})" for v in values)
        return [(self._holdings_base(), f"(|(&(objectClass={CLAIM_CLASS})(|{claims})){held})",
                 ["gpgFingerprint", "gpgSubFingerprint", *CLAIM_ATTRIBUTES], SUBTREE)]

    def _holdings_base(self) -> str:
        if self._common_base is None:
            people = [r.strip() for r in self.config.base_dn.split(",")]
            claims = [r.strip() for r in self.config.claims_base.split(",")]
            common: list[str] = []
            for mine, theirs in zip(reversed(people), reversed(claims), strict=False):
                if mine.lower() != theirs.lower():
                    break
                common.insert(0, mine)
            self._common_base = ",".join(common)
        return self._common_base

    def _split_holdings(self, asked: frozenset[str], found: list[Entry]) -> Holdings:
        people = dn_key(self.config.base_dn)
        claims = [e for e in found if e.values("wkdClaimHolder")]
        held = [e for e in found if not e.values("wkdClaimHolder")
                and (dn_key(e.dn) == people or dn_key(e.dn).endswith("," + people))]
        return holdings_of(asked, claims, held)

    def holdings(self, fingerprints: Sequence[Fingerprint]) -> Holdings:
        """The claims on fingerprints and the entries whose key attributes hold them."""
        asked = frozenset(f.hex for f in fingerprints)
        (found,) = self._searches(self._holdings_queries(asked))
        return self._split_holdings(asked, found)

    def list_keys(self) -> Iterator[StoredKey]:
        """Every published key below base_dn."""
        entries = self._search(self.config.base_dn, "(&(objectClass=wkdKeyHolder)(pgpKey=*))",
                               [*KEY_ATTRIBUTES, PREFER_ENCRYPT])
        for entry in entries:
            stored = stored_key(entry)
            if stored is not None:
                yield stored

    def publish_key(self, user: User, cleaned: CleanResult, provenance: Provenance, *,
                    consume: PendingRequest | None = None,
                    limits: Limits = DEFAULT_LIMITS) -> StoredKey:
        """Store a cleaned key on the user's entry, replacing any key there, after claiming
        its key material.

        Every address of the key must be one of the user's. A primary or back-signed
        subkey that another entry holds is a Conflict, unless that entry holds it only as
        an unproven subkey: then that entry loses the subkey. An unproven subkey held
        elsewhere is left out (`StoredKey.withheld`). The writes go in a fixed order, each
        atomic and asserting what was read: claims (an add, or a compare-and-swap), the
        displaced holders' keys, this entry's key, then the used-up confirmation. When
        another writer got there first, what this call claimed is given back and all is
        read again and re-planned, unless the entry's key itself changed meanwhile: then
        Changed (decide again on what is there now). Material whose claim is younger than
        CLAIM_IN_FLIGHT but not yet held is being published by someone else: Changed too.
        Claims of the previous key that the new one lacks are released afterwards.

        (Not one RFC 5805 transaction: slapd 2.5.13's transactions crash it when two
        connections commit while a third searches; see the closing note of 2026-12-02.)

        consume: a pending WKS request used up after the key is written (single use: of two
        concurrent confirmations only one uses it, and a publication that fails leaves it
        for the retry); NotFound when it is gone.
        limits: the cleaning policy for a displaced holder's key.
        """
        info = cleaned.info
        foreign = [str(a) for a in info.addresses if not user.owns(a)]
        if foreign:
            raise KeyRefused(f"the key names addresses of someone else: {', '.join(foreign)}")
        if not info.addresses:
            raise KeyRefused("the key has no user ID with an address of its owner")
        wanted = wanted_claims(info)
        fingerprints = key_fingerprints(info)
        holdings = user.holders
        if holdings is None or not holdings.asked >= set(wanted):
            holdings = self.holdings(fingerprints)
        entry = (user.snapshot if user.snapshot is not None
                 else self._read_entry(user.dn, _ENTRY_STATE))
        if entry is None:
            raise NotFound(f"no entry {user.dn}")
        planned = (entry.values("pgpKey"), entry.text(DIGEST))
        for _round in range(_CLAIM_ROUNDS):
            plan = plan_claims(user.dn, wanted, holdings, provenance.published)
            if plan.conflict is not None:
                raise Conflict(plan.conflict)
            if plan.busy is not None:
                raise Changed(plan.busy)
            final = without_subkeys(cleaned, {Fingerprint.parse(f): reason
                                              for f, reason in plan.drop.items()})
            changes, written = _key_changes(entry, final, provenance,
                                            entry.text("pgpDisabled") or "0")
            operations = self._claim_operations(user.dn, plan, provenance.published)
            displaced: dict[str, set[str]] = {}
            for holder, fpr in plan.displace:
                displaced.setdefault(holder, set()).add(fpr)
            for holder, fprs in displaced.items():
                operations += self._strip_operations(holder, fprs, limits)
            operations.append(("modify", user.dn, _modlist(changes), _unchanged(entry)))
            if consume is not None:
                operations.append(self._consume_operation(consume, provenance.published))
            if self._apply(user.dn, operations, consumes=consume is not None):
                break
            holdings = self.holdings(fingerprints)
            entry = self._read_entry(user.dn, _ENTRY_STATE)
            if entry is None:
                raise NotFound(f"no entry {user.dn}")
            if (entry.values("pgpKey"), entry.text(DIGEST)) != planned:
                raise Changed(
                    f"the key of {user.dn} changed while another was being published")
            if consume is not None and not self._search(self._request_dn(consume), _UNUSED,
                                                        ["1.1"], scope=BASE):
                raise NotFound("this confirmation was used already")
        else:
            raise DirectoryUnavailable("the key material's claims keep changing; try again")
        for holder, fprs in displaced.items():
            log.warning("removed subkey(s) %s from the key of %s: %s proved it holds them",
                        ", ".join(sorted(fprs)), holder, user.dn)
        for fpr, holder in plan.held_by.items():
            # Encryption-only material proves nothing of its holder: the first one keeps it
            # and an administrator decides (the provenance names who published what).
            log.warning("subkey %s left out of the key of %s: %s holds it already", fpr,
                        user.dn, holder)
        if consume is not None:  # used up; what is left is tidying
            with contextlib.suppress(MilterWkdError):
                self._delete_pending_dn(self._request_dn(consume), _USED)
        previous = {v.upper() for v in (*entry.texts("gpgFingerprint"),
                                        *entry.texts("gpgSubFingerprint"))}
        self._release_claims(user.dn, previous - set(wanted))
        written[PREFER_ENCRYPT] = entry.values(PREFER_ENCRYPT)
        stored = stored_key(Entry(user.dn, written))
        if stored is None:
            raise DirectoryError(f"the key written to {user.dn} cannot be parsed back")
        return dataclasses.replace(stored, withheld=tuple(
            (Fingerprint.parse(f), reason) for f, reason in plan.drop.items()))

    # -- ordered writes and claims on key material ----------------------------------------

    def _apply(self, dn: str, operations: Sequence[Operation], *, consumes: bool = False,
               ) -> bool:
        """Apply operations in order, each atomic (an add fails on an existing name, an
        assertion on a changed entry). False when another writer got there first: the
        claims this call added are given back (a later leftover is harmless, see
        plan_claims), read again and re-plan. With consumes, the last operation uses up a
        confirmation; if only it fails, another response used it after this key was
        written (the same key for the same request): NotFound."""
        added: list[str] = []
        timeout = self.config.timeout

        def adds(conn: Any, first: int, end: int) -> int | None:
            """Claim adds are independent of each other: sent together, one round trip
            (and slapd commits them while the next is on the wire). Every answer is read,
            so that `added` knows all that went through; the first that lost a race is
            returned, the first other error raised."""
            sent = [(i, conn.add_ext(operations[i][1], operations[i][2]))
                    for i in range(first, end)]
            lost: int | None = None
            error: BaseException | None = None
            for index, msgid in sent:
                try:
                    conn.result3(msgid, all=1, timeout=timeout)
                    added.append(operations[index][1])
                except _RACE_RESULTS:
                    lost = index if lost is None else lost
                except ldap.LDAPError as exc:
                    error = error or exc
            if error is not None:
                raise error
            return lost

        def operation(conn: Any) -> int:
            index = 0
            while index < len(operations):
                kind, target, data, assertion = operations[index]
                if kind == "add" and assertion is None:
                    end = index
                    while end < len(operations) and operations[end][0] == "add" and (
                            operations[end][3] is None):
                        end += 1
                    lost = adds(conn, index, end)
                    if lost is not None:
                        return lost
                    index = end
                    continue
                controls = [AssertionControl(True, assertion)] if assertion else None
                try:
                    if kind == "add":
                        conn.add_ext_s(target, data, serverctrls=controls)
                        added.append(target)
                    elif kind == "modify":
                        conn.modify_ext_s(target, data, serverctrls=controls)
                    else:
                        conn.delete_ext_s(target, serverctrls=controls)
                except _RACE_RESULTS:
                    return index
                index += 1
            return len(operations)

        try:
            done = self._call(operation)
        except ldap.LDAPError as exc:
            self._give_back(dn, added)
            raise DirectoryError(f"writing the key of {dn} failed: {ldap_reason(exc)}"
                                 ) from None
        except BaseException:
            self._give_back(dn, added)
            raise
        if done == len(operations):
            return True
        if consumes and done == len(operations) - 1:
            raise NotFound("this confirmation was used already")
        log.info("writing the key of %s lost a race (step %d of %d); reading again", dn,
                 done + 1, len(operations))
        self._give_back(dn, added)
        return False

    def _give_back(self, dn: str, added: list[str]) -> None:
        """Delete the claim entries this publication added (only while still ours)."""
        self._release_claims(dn, {target.split(",", 1)[0].partition("=")[2].upper()
                                  for target in added})

    def _claim_dn(self, fingerprint: str) -> str:
        return f"wkdFingerprint={escape_dn_chars(fingerprint)},{self.config.claims_base}"

    def _claim_operations(self, dn: str, plan: ClaimPlan, now: int) -> list[Operation]:
        """The adds and compare-and-swaps that make plan's claims."""
        operations: list[Operation] = []
        for fpr, kind in (*plan.add.items(),
                          *((f, k) for f, (c, k) in plan.take.items() if not c.recorded)):
            # An add fails if the name exists: the atomic "nobody holds this yet".
            operations.append(("add", self._claim_dn(fpr), [
                ("objectClass", [CLAIM_CLASS.encode()]), ("wkdFingerprint", [fpr.encode()]),
                ("wkdClaimHolder", [dn.encode()]), ("wkdClaimKind", [kind.value.encode()]),
                ("wkdCreated", [gnupg_time(now).encode()])], None))
        for fpr, (claim, kind) in (*plan.own.items(),
                                   *((f, c) for f, c in plan.take.items() if c[0].recorded)):
            # Deleting the holder value read fails (noSuchAttribute) if it changed since.
            operations.append(("modify", self._claim_dn(fpr), [
                (DELETE, "wkdClaimHolder", [claim.holder.encode()]),
                (ADD, "wkdClaimHolder", [dn.encode()]),
                (REPLACE, "wkdClaimKind", [kind.value.encode()]),
                (REPLACE, "wkdCreated", [gnupg_time(now).encode()])], None))
        return operations

    def _strip_operations(self, dn: str, fingerprints: set[str], limits: Limits,
                          ) -> list[Operation]:
        """The modify that removes subkeys whose material another entry proved it holds
        from dn's key (withholds the key if it no longer passes), asserting the key read."""
        entry = self._read_entry(dn, ["objectClass", "entryCSN", *KEY_ATTRIBUTES,
                                      PREFER_ENCRYPT])
        stored = stored_key(entry) if entry is not None else None
        if entry is None or stored is None:
            return []
        try:
            cleaned = without_subkeys(clean_key(stored.key, None, limits=limits), {
                Fingerprint.parse(f): f"subkey {f}: another entry proved it holds it"
                for f in fingerprints})
            if cleaned.info.fingerprint.hex in fingerprints:
                raise KeyRefused(f"its primary key {cleaned.info.fingerprint} is held by "
                                 "another entry")
        except Refused as exc:
            changes = _withhold_changes(entry, f"the key no longer passes: {exc.reason}")
        else:
            provenance = stored.provenance or Provenance(KeyOrigin.ADMIN_EDIT, "", 0)
            changes, _written = _key_changes(entry, cleaned, provenance,
                                             "1" if stored.disabled else "0")
        return [("modify", dn, _modlist(changes), _unchanged(entry))]

    def _release_claims(self, dn: str, fingerprints: set[str]) -> None:
        """Delete the claims on fingerprints that dn holds (others' claims stay)."""
        if not fingerprints:
            return
        holder = AssertionControl(True, f"(wkdClaimHolder={escape_filter_chars(dn)})")

        def operation(conn: Any) -> None:
            for fpr in sorted(fingerprints):
                with contextlib.suppress(ldap.NO_SUCH_OBJECT, ldap.ASSERTION_FAILED):
                    conn.delete_ext_s(self._claim_dn(fpr), serverctrls=[holder])

        try:
            self._call(operation)
        except ldap.LDAPError as exc:
            # A claim left behind becomes a leftover after CLAIM_IN_FLIGHT; then it is taken over.
            log.warning("releasing claims of %s failed: %s", dn, ldap_reason(exc))

    def withhold_key(self, dn: str, reason: str, *, judged: str | None = None) -> None:
        """Stop serving an entry's key: remove what was derived from it and its claims, keep
        pgpKey (an administrator's data, to fix), and say why in wkdKeyProblem.

        judged: the entryCSN of the entry as the caller read it to judge it; if the entry
        was written since, nothing happens (DirectoryUnavailable: judge it again)."""
        entry = self._read_entry(dn, ["objectClass", "entryCSN", *KEY_ATTRIBUTES])
        if entry is None:
            raise NotFound(f"no entry {dn}")
        if judged is not None and entry.text("entryCSN") != judged:
            raise Changed(f"{dn} changed meanwhile")
        self._modify(dn, _withhold_changes(entry, reason), assertion=_unchanged(entry))
        self._release_claims(dn, {v.upper() for v in (*entry.texts("gpgFingerprint"),
                                                      *entry.texts("gpgSubFingerprint"))})
        log.warning("key of %s withheld: %s", dn, reason)

    def remove_key(self, user: User) -> StoredKey:
        """Remove the user's published key, everything derived from it and its claims.
        NotFound when the entry publishes none (a withheld key is cleared all the same).
        A user read with its key (`User.snapshot`) is removed only if its entry has not
        been written since (else DirectoryUnavailable: decide again)."""
        entry = self._read_entry(user.dn, ["objectClass", "entryCSN", *KEY_ATTRIBUTES,
                                           PREFER_ENCRYPT])
        judged = user.snapshot.text("entryCSN") if user.snapshot else None
        if entry is not None and judged is not None and entry.text("entryCSN") != judged:
            raise Changed(f"{user.dn} changed meanwhile")
        stored = stored_key(entry) if entry is not None else None
        if entry is not None:
            self._clear_key(entry)
        if stored is None:
            raise NotFound(f"{user.dn} has no published key")
        return stored

    def _clear_key(self, entry: Entry) -> None:
        """One modify that empties every key attribute present; then release the claims.
        The object class goes too unless prefer-encrypt keeps it."""
        dn = entry.dn
        changes: Changes = {name: (REPLACE, []) for name in KEY_ATTRIBUTES
                            if entry.values(name)}
        if not entry.values(PREFER_ENCRYPT) and KEY_CLASS.lower() in {
                c.lower() for c in entry.texts("objectClass")}:
            changes["objectClass"] = (DELETE, [KEY_CLASS])
        if changes:
            self._modify(dn, changes, assertion=_unchanged(entry))
        self._release_claims(dn, {v.upper() for v in (
            *entry.texts("gpgFingerprint"), *entry.texts("gpgSubFingerprint"))})

    def set_disabled(self, user: User, disabled: bool) -> StoredKey:
        """Disable (not served, not in Autocrypt, dirmngr skips it) or re-enable a key."""
        if self.get_key(user) is None:
            raise NotFound(f"{user.dn} has no published key")
        self._modify(user.dn, {"pgpDisabled": (REPLACE, ["1" if disabled else "0"])})
        stored = self.get_key(user)
        if stored is None:
            raise DirectoryError(f"the key of {user.dn} cannot be read back")
        return stored

    def get_prefer_encrypt(self, user: User) -> str | None:
        entry = self._read_entry(user.dn, [PREFER_ENCRYPT])
        return entry.text(PREFER_ENCRYPT) if entry is not None else None

    def set_prefer_encrypt(self, user: User, value: str | None) -> None:
        """Set (mutual or nopreference) or clear the user's Autocrypt prefer-encrypt."""
        if value not in (None, "mutual", "nopreference"):
            raise Refused(f"prefer-encrypt must be mutual or nopreference, not {value!r}")
        entry = self._read_entry(user.dn, ["objectClass", "pgpKey", PREFER_ENCRYPT])
        if entry is None:
            raise NotFound(f"no entry {user.dn}")
        has_class = KEY_CLASS.lower() in {c.lower() for c in entry.texts("objectClass")}
        changes: Changes = {}
        if value or entry.values(PREFER_ENCRYPT):
            changes[PREFER_ENCRYPT] = (REPLACE, [value] if value else [])
        if value and not has_class:
            changes["objectClass"] = (ADD, [KEY_CLASS])
        elif not value and has_class and not entry.values("pgpKey"):
            changes["objectClass"] = (DELETE, [KEY_CLASS])
        if changes:
            self._modify(user.dn, changes)

    # -- pending WKS requests -----------------------------------------------------------

    def _slot_dn(self, address: Address, slot: int) -> str:
        return f"cn={escape_dn_chars(f'{slot}.{address_slot(address)}')},{self.config.pending_base}"

    def create_pending(self, request: PendingRequest, *, limit: int) -> PendingRequest:
        """Store a request in a free slot of its address (at most `limit` unexpired ones).

        The slot is taken by an LDAP add, which fails if the name exists, so concurrent
        requests can never exceed the limit. An expired request in a slot is replaced.
        RateLimited when every slot holds an unexpired request.
        """
        if not valid_nonce(request.nonce):
            raise Refused("malformed nonce")
        now = request.created
        value = escape_filter_chars(str(request.address))
        existing = {dn_key(r.dn): r for r in self._pending_entries(f"(wkdAddress={value})")}
        # Requests stored by earlier versions (named by nonce) count against the limit too.
        older = sum(1 for dn, r in existing.items()
                    if not dn.startswith("cn=") and r.expires > now)
        attributes: dict[str, list[str | bytes]] = {
            "objectClass": [PENDING_CLASS], "wkdNonce": [request.nonce],
            "wkdAddress": [str(request.address)], "wkdFingerprint": [request.fingerprint.hex],
            "wkdSubmittedKey": [request.key], "wkdCreated": [gnupg_time(request.created)],
            "wkdExpires": [gnupg_time(request.expires)],
        }
        for slot in range(1, limit - older + 1):
            dn = self._slot_dn(request.address, slot)
            current = existing.get(dn_key(dn))
            if current is not None and current.expires > now:
                continue
            if current is not None:
                self._delete_pending_dn(dn, f"(wkdNonce={escape_filter_chars(current.nonce)})")
            if self._add_pending(dn, attributes):
                return dataclasses.replace(request, dn=dn)
        raise RateLimited(f"{request.address} has {limit} unconfirmed requests already")

    def _add_pending(self, dn: str, attributes: dict[str, list[str | bytes]]) -> bool:
        addlist = [(name, encode(values)) for name, values in attributes.items()]
        try:
            self._call(lambda conn: conn.add_ext_s(dn, addlist))
        except ldap.ALREADY_EXISTS:
            return False
        except ldap.LDAPError as exc:
            raise DirectoryError(
                f"storing the pending request failed: {ldap_reason(exc)}") from None
        return True

    def get_pending(self, nonce: str, address: Address, now: int | None = None,
                    ) -> PendingRequest:
        """The unexpired request for this address whose stored nonce equals `nonce`,
        compared in constant time with every stored one; else NotFound."""
        now = int(time.time()) if now is None else now
        if not valid_nonce(nonce):
            raise Refused("malformed nonce")
        value = escape_filter_chars(str(address))
        found = None
        for request in self._pending_entries(f"(wkdAddress={value})", with_key=True):
            # compare_digest on every candidate, no early exit: timing tells nothing.
            if (hmac.compare_digest(request.nonce.encode(), nonce.encode())
                    and request.address.key == address.key and request.expires > now):
                found = request
        if found is None:
            raise NotFound("no pending request for this nonce and address")
        return found

    def _delete_pending_dn(self, dn: str, assertion: str) -> bool:
        """Delete a request entry if it still matches assertion; False if it is gone."""
        try:
            self._call(lambda conn: conn.delete_ext_s(
                dn, serverctrls=[AssertionControl(True, assertion)]))
        except (ldap.NO_SUCH_OBJECT, ldap.ASSERTION_FAILED):
            return False
        except ldap.LDAPError as exc:
            raise DirectoryError(f"deleting {dn} failed: {ldap_reason(exc)}") from None
        return True

    def _consume_operation(self, request: PendingRequest, now: int) -> Operation:
        """The modify that uses a pending request up: its expiry moved to the epoch, only
        if it is still unused and unexpired (an assertion: of two concurrent uses one
        succeeds). The used request is deleted afterwards, or by `pending expire`."""
        nonce = escape_filter_chars(request.nonce)
        return ("modify", self._request_dn(request), [(REPLACE, "wkdExpires", [_EPOCH])],
                f"(&(wkdNonce={nonce})(wkdExpires>={gnupg_time(now)}))")

    def _request_dn(self, request: PendingRequest) -> str:
        # Requests stored by earlier versions are named by their nonce.
        return request.dn or (
            f"wkdNonce={escape_dn_chars(request.nonce)},{self.config.pending_base}")

    def delete_pending(self, request: PendingRequest) -> None:
        """Delete a pending request; NotFound if it is gone (e.g. taken by someone else)."""
        if not self._delete_pending_dn(self._request_dn(request),
                                       f"(wkdNonce={escape_filter_chars(request.nonce)})"):
            raise NotFound("no pending request for this nonce")

    def _pending_entries(self, filt: str, *, with_key: bool = False) -> list[PendingRequest]:
        attributes = ["wkdNonce", "wkdAddress", "wkdFingerprint", "wkdCreated", "wkdExpires"]
        entries = self._search(self.config.pending_base, f"(&(objectClass={PENDING_CLASS}){filt})",
                               [*attributes, "wkdSubmittedKey"] if with_key else attributes)
        found = []
        for entry in entries:
            keys = entry.values("wkdSubmittedKey")
            try:
                found.append(PendingRequest(
                    entry.text("wkdNonce") or "",
                    Address.parse(entry.text("wkdAddress") or ""),
                    Fingerprint.parse(entry.text("wkdFingerprint") or ""),
                    keys[0] if keys else b"",
                    parse_gnupg_time(entry.text("wkdCreated") or "") or 0,
                    parse_gnupg_time(entry.text("wkdExpires") or "") or 0, entry.dn))
            except Refused:
                log.warning("ignoring malformed pending request %s", entry.dn)
        return found

    def count_pending(self, address: Address, now: int | None = None) -> int:
        """Unexpired requests for an address (the milter's rate limit counts them)."""
        now = int(time.time()) if now is None else now
        value = escape_filter_chars(str(address))
        return len(self._pending_entries(
            f"(wkdAddress={value})(!(wkdExpires<={gnupg_time(now)}))"))

    def list_pending(self) -> list[PendingRequest]:
        """Every pending request (without the submitted keys), oldest first."""
        return sorted(self._pending_entries(""), key=lambda r: r.created)

    def expire_pending(self, now: int | None = None) -> int:
        """Delete every request that expired at or before now; returns how many."""
        now = int(time.time()) if now is None else now
        expired = f"(wkdExpires<={gnupg_time(now)})"
        entries = self._search(self.config.pending_base,
                               f"(&(objectClass={PENDING_CLASS}){expired})", ["1.1"])
        # The assertion keeps a slot that was given to a new request meanwhile.
        return sum(self._delete_pending_dn(entry.dn, expired) for entry in entries)

    # -- changes ----------------------------------------------------------------------

    def _suffix_dn(self) -> str:
        if self._suffix is None:
            suffix = find_suffix(lambda dn: self._read_entry(dn, ["contextCSN"]),
                                 self.config.base_dn)
            if suffix is None:
                raise DirectoryError(f"no readable contextCSN at or above {self.config.base_dn}"
                                     " (syncprov overlay missing, or no read access)")
            self._suffix = suffix
        return self._suffix

    def change_token(self) -> str:
        """An opaque string that changes whenever anything in the database is written."""
        return change_token(self._read_entry(self._suffix_dn(), ["contextCSN"]))

    # -- following key entries (milter_wkd.reconcile) ---------------------------------

    def key_holders_since(self, csn: str = "", *, withheld_only: bool = False,
                          ) -> list[tuple[User, str]]:
        """Every key holder below base_dn written at or after the CSN `csn` (all of them
        when empty; only withheld ones with withheld_only), each as a `User` whose snapshot
        holds its key attributes, with its entryCSN: what the follower needs."""
        found: list[tuple[User, str]] = []
        self.each_key_holder(csn, lambda user, entry_csn: found.append((user, entry_csn)),
                             withheld_only=withheld_only)
        return found

    def each_key_holder(self, csn: str, visit: Callable[[User, str], None], *,
                        withheld_only: bool = False) -> int:
        """key_holders_since, one page of entries at a time: visit(user, entryCSN) is
        called for each as its page arrives, so a directory of any size is walked in
        bounded memory. The search holds one pooled connection while visit may use
        others (pool_size >= 2). Returns how many entries were visited."""
        filt = f"(objectClass={KEY_CLASS})"
        if csn:
            filt += f"(entryCSN>={escape_filter_chars(csn)})"
        if withheld_only:
            filt += f"({PROBLEM}=*)"
        attributes = list(dict.fromkeys(["objectClass", "entryCSN",
                                         *self.config.mail_attributes, *KEY_ATTRIBUTES,
                                         PREFER_ENCRYPT]))
        timeout = self.config.timeout

        def operation(conn: Any) -> int:
            paging = SimplePagedResultsControl(True, size=PAGE_SIZE, cookie=b"")
            visited = 0
            while True:
                msgid = conn.search_ext(self.config.base_dn, SUBTREE, f"(&{filt})",
                                        attributes, serverctrls=[paging], timeout=timeout)
                _type, data, _id, controls = conn.result3(msgid, all=1, timeout=timeout)
                for dn, raw in data:
                    if dn is None:
                        continue
                    entry = Entry(dn, raw)
                    values = [v for name in self.config.mail_attributes
                              for v in entry.texts(name)]
                    visit(User(dn, parse_addresses(values, dn), entry),
                          max(entry.texts("entryCSN"), default=""))
                    visited += 1
                cookie = next((c.cookie for c in controls or ()
                               if c.controlType == SimplePagedResultsControl.controlType), None)
                if not cookie:
                    return visited
                paging.cookie = cookie

        try:
            return self._call(operation)
        except ldap.NO_SUCH_OBJECT:
            return 0
        except ldap.LDAPError as exc:
            raise DirectoryError(f"search under {self.config.base_dn} failed: "
                                 f"{ldap_reason(exc)}") from None
