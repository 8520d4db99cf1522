"""What the key store holds, as plain values, and the pure rule for claims on key material.

- `User` (an entry and its addresses), `StoredKey` (a published key as stored, with its
  `Provenance`: how (`KeyOrigin`), by whom and when it was published), `PendingRequest`
  (a WKS request waiting for its confirmation);
- claims (README, security model): every primary key and subkey is held by at most one
  entry. `plan_claims` decides, for a key about to be published, which claims are made,
  taken over, kept or refused - pure, so every store applies the same rule and
  tests/unit/test_claims.py checks it without a directory.

No I/O, no configuration; nothing here raises for any input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from milter_wkd.openpgp import KeyInfo
from milter_wkd.values import Address, Fingerprint

if TYPE_CHECKING:
    from milter_wkd.store.schema import Entry

# A claim whose holder does not hold the material yet is a publication under way for this
# long (it takes milliseconds; a stuck one is retried by Postfix within minutes), and a
# leftover of a failed one after it: only a leftover may be taken over.
CLAIM_IN_FLIGHT = 120
# What a WKS nonce may look like (ours are 32 lower-case letters and digits).
_NONCE = re.compile(r"^[A-Za-z0-9]{16,64}$")


def valid_nonce(nonce: str) -> bool:
    return _NONCE.match(nonce) is not None


class KeyOrigin(StrEnum):
    """How a key came to be published."""

    AUTH_SUBMIT = "auth-submit"
    WKS_CONFIRMED = "wks-confirmed"
    ADMIN_IMPORT = "admin-import"
    ADMIN_EDIT = "admin-edit"  # pgpKey written with LDAP tools, checked by the system
    SELF_SERVICE = "self-service"  # uploaded by the signed-in user on the self-service page


class ClaimKind(StrEnum):
    """How an entry's key proves it holds a piece of key material."""

    PRIMARY = "primary"  # self-signatures are made by it
    PROVEN_SUBKEY = "proven-subkey"  # it made a back-signature (RFC 9580 5.2.1, 0x19)
    SUBKEY = "subkey"  # bound by the primary only: anyone can bind anyone's public key

    @property
    def proven(self) -> bool:
        return self is not ClaimKind.SUBKEY


@dataclass(frozen=True, slots=True)
class Claim:
    """Who holds a fingerprint: a claim entry, or (recorded=False) the key attributes of
    an entry published before claims existed."""

    fingerprint: str  # hex
    holder: str  # DN
    kind: ClaimKind
    created: int = 0
    recorded: bool = True


@dataclass(frozen=True, slots=True)
class Holdings:
    """The claims on some fingerprints and the entries whose key attributes hold them."""

    asked: frozenset[str]
    claims: dict[str, Claim]
    attributes: dict[str, tuple[tuple[str, bool], ...]]  # hex -> (DN, held as primary)


# The record a WKS publication keeps of the message that made it, at the end of the actor
# (milter_wkd.submissions.actor writes it): not for people's eyes.
_MESSAGE_RECORD = re.compile(r" \(submission [0-9a-f]{16}(?:, notice unsent)?\)\Z")


@dataclass(frozen=True, slots=True)
class Provenance:
    source: KeyOrigin
    actor: str
    published: int  # seconds since the epoch

    @property
    def who(self) -> str:
        """The actor as people read it: without the record of the submission message."""
        return _MESSAGE_RECORD.sub("", self.actor)


@dataclass(frozen=True, slots=True)
class User:
    """A person entry and the addresses its mail attributes hold."""

    dn: str
    addresses: tuple[Address, ...]
    # The entry's key attributes as read together with the addresses (find_user with
    # with_key=True): publishing right after the look-up needs no second read.
    snapshot: Entry | None = field(default=None, compare=False, repr=False)
    # Who holds some fingerprints, read with the user (find_user with holders_of):
    # publishing that key needs no search of its own.
    holders: Holdings | None = field(default=None, compare=False, repr=False)

    def owns(self, address: Address) -> bool:
        return any(a.key == address.key for a in self.addresses)


@dataclass(frozen=True, slots=True)
class StoredKey:
    """A published key as the directory has it."""

    dn: str
    key: bytes  # binary OpenPGP
    fingerprint: Fingerprint
    addresses: tuple[Address, ...]  # gpgMailbox
    address_hashes: tuple[str, ...]  # wkdAddressHash
    user_ids: tuple[str, ...]
    created: int | None
    expires: int | None
    revoked: bool
    disabled: bool
    provenance: Provenance | None
    prefer_encrypt: str | None
    # Set by publish_key only: subkeys left out because another entry holds them, and why.
    withheld: tuple[tuple[Fingerprint, str], ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class PendingRequest:
    nonce: str
    address: Address
    fingerprint: Fingerprint
    key: bytes  # binary OpenPGP, as cleaned at submission
    created: int
    expires: int
    dn: str = field(default="", compare=False)  # where it is stored (set by the store)


# -- value formats ---------------------------------------------------------------------

def key_fingerprints(info: KeyInfo) -> list[Fingerprint]:
    """The primary's and every subkey's fingerprint: the material a key claims."""
    return [info.fingerprint, *(s.fingerprint for s in info.subkeys)]


def wanted_claims(info: KeyInfo) -> dict[str, ClaimKind]:
    wanted = {s.fingerprint.hex: ClaimKind.PROVEN_SUBKEY if s.cross_certified
              else ClaimKind.SUBKEY for s in info.subkeys}
    wanted[info.fingerprint.hex] = ClaimKind.PRIMARY
    return wanted


def dn_key(dn: str) -> str:
    return ",".join(part.strip() for part in dn.lower().split(","))


@dataclass(slots=True)
class ClaimPlan:
    """What publishing a key on an entry does to the claims (see `plan_claims`)."""

    add: dict[str, ClaimKind] = field(default_factory=dict)  # no claim yet
    take: dict[str, tuple[Claim, ClaimKind]] = field(default_factory=dict)  # from another
    own: dict[str, tuple[Claim, ClaimKind]] = field(default_factory=dict)  # ours, kind changes
    drop: dict[str, str] = field(default_factory=dict)  # left out of the key, with a reason
    held_by: dict[str, str] = field(default_factory=dict)  # a dropped one's holder (DN)
    displace: list[tuple[str, str]] = field(default_factory=list)  # (DN, hex) to strip
    conflict: str | None = None  # refuses the key for good
    busy: str | None = None  # another publication of this material is under way: retry


def plan_claims(dn: str, wanted: dict[str, ClaimKind], holdings: Holdings,
                now: int) -> ClaimPlan:
    """Decide, for each fingerprint of a key to publish on entry dn, whether it is claimed,
    taken over, kept, left out, or refuses the whole key.

    Who holds a piece of material is decided by the entries' key attributes, the claim
    saying how it was proven: the claim's holder when it holds it, else any other entry
    that does (a claim whose holder was renamed, or material published before claims
    existed). A proven claim (primary, back-signed subkey) beats an unproven one (a subkey
    bound by its primary only); an unproven subkey never displaces anything and is left
    out when another entry holds that material; two proven claims are a conflict. A claim
    whose holder holds nothing of it is a publication under way while it is younger than
    CLAIM_IN_FLIGHT (busy: try again) and a leftover after that (taken over). Every claim
    change is a compare-and-swap on the claim entry, the holder's own ones included when
    it does not hold the material yet, so a takeover and a re-publication of the same
    material cannot both succeed.
    """
    plan = ClaimPlan()
    me = dn_key(dn)
    for fpr, kind in wanted.items():
        held_by = holdings.attributes.get(fpr, ())
        holding = {dn_key(h) for h, _ in held_by}
        stored = holdings.claims.get(fpr)
        other: tuple[str, ClaimKind] | None = None
        if stored is not None and dn_key(stored.holder) != me and dn_key(
                stored.holder) in holding:
            other = (stored.holder, stored.kind)
        else:
            found = next(((h, primary) for h, primary in held_by if dn_key(h) != me), None)
            if found is not None:
                other = (found[0], ClaimKind.PRIMARY if found[1] else ClaimKind.SUBKEY)
        if other is None:
            if stored is None:
                plan.add[fpr] = kind
            elif dn_key(stored.holder) != me and now - stored.created <= CLAIM_IN_FLIGHT:
                plan.busy = (f"key material {fpr} is being published by another user right "
                             "now; try again in a few minutes")
            elif dn_key(stored.holder) != me:
                plan.take[fpr] = (stored, kind)  # a leftover
            elif stored.kind is not kind or me not in holding:
                plan.own[fpr] = (stored, kind)
            continue
        holder, their_kind = other
        if kind.proven and not their_kind.proven:
            plan.take[fpr] = (stored or Claim(fpr, holder, their_kind, recorded=False), kind)
            plan.displace.append((holder, fpr))
        elif not kind.proven:
            plan.drop[fpr] = (f"subkey {fpr} is published by another user, so it was left "
                              "out (if it is yours, ask your provider)")
            plan.held_by[fpr] = holder
        else:
            plan.conflict = f"key {fpr} is published by another user already"
    return plan

