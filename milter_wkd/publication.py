"""The one way a key gets published: clean -> ownership -> merge -> size cap -> one atomic
write with provenance.

Every path that publishes goes through `publish`: the milter's authenticated submission
and WKS confirmation (milter_wkd.submissions), `milter-wkd keys import`, and the
self-service page; the page's two other changes of a published key write through the
same tail (size cap, `KeyStore.publish_key`): `publish_revocation` (a revocation
certificate uploaded alone, verified against the stored key and joined to it) and
`unpublish_address` (the stored key without one address's user ID). What it guarantees,
whoever calls it (README, security model):
- the key is cleaned by milter_wkd.openpgp under the [keys] policy (third-party
  certifications cut at the packet level, user IDs narrowed to the addresses asked for,
  signing subkeys without a back-signature dropped) before anything else looks at it;
- only addresses the user owns are published (anything else is `KeyRefused`);
- a key with the fingerprint already published on the entry is merged with it (new user
  IDs, subkeys and revocations join the stored ones; nothing a user published before
  for another address of theirs is lost);
- the cleaned key fits `max_published_bytes` (else `KeyRefused`);
- the store writes it in one atomic step with its claims and provenance (`KeyStore.
  publish_key`: Conflict for material another entry holds, unproven colliding subkeys
  left out, a used-up confirmation).

Reads no configuration itself (`Policy.from_config` turns [keys] and a domain's
mailbox_only into one). Fails with the store's and the cleaner's errors: `Refused`
(permanent) or `Unavailable` (try again); nothing is written then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from milter_wkd import openpgp
from milter_wkd.config import KeysConfig
from milter_wkd.errors import KeyRefused, NotFound
from milter_wkd.openpgp import CleanResult, Limits
from milter_wkd.store.model import KeyOrigin, PendingRequest, Provenance, StoredKey, User
from milter_wkd.store.protocol import KeyStore
from milter_wkd.values import Address


@dataclass(frozen=True, slots=True)
class Policy:
    """How keys are cleaned and how large a published one may be."""

    limits: Limits
    max_published_bytes: int

    @classmethod
    def from_config(cls, keys: KeysConfig, *, mailbox_only: bool = False) -> Policy:
        return cls(keys.limits(mailbox_only=mailbox_only), keys.max_published_bytes)


@dataclass(frozen=True, slots=True)
class Publication:
    """What was published: the stored key, and the key as cleaned and written (without
    the subkeys another entry holds; `dropped` says what cleaning left out and why)."""

    stored: StoredKey
    cleaned: CleanResult
    merged: bool  # joined with the key already published under the same fingerprint


def publish(store: KeyStore, user: User, key: bytes, *, origin: KeyOrigin, actor: str,
            now: int, policy: Policy, addresses: Sequence[Address] | None = None,
            cleaned: CleanResult | None = None,
            consume: PendingRequest | None = None) -> Publication:
    """Publish `key` (binary or armored OpenPGP, as received) on the user's entry for
    `addresses` (default: every address of the user that the key names).

    cleaned: the same key already cleaned under the same policy (the milter cleans a
    submission once to read its addresses; the CLI to report on a large one); used as it
    is when it was cleaned for these addresses, since cleaning again would change nothing.
    consume: the pending WKS request this publication uses up (NotFound if used already).
    """
    foreign = [str(a) for a in addresses or () if not user.owns(a)]
    if foreign:
        raise KeyRefused(f"not addresses of {user.dn}: {', '.join(foreign)}")
    wanted = list(addresses) if addresses is not None else list(user.addresses)
    if cleaned is None or not _cleaned_for(cleaned, wanted, exactly=addresses is not None):
        cleaned = openpgp.clean_key(key, wanted, limits=policy.limits)
    merged = False
    stored = store.current_key(user)
    if stored is not None and stored.fingerprint == cleaned.info.fingerprint:
        cleaned = openpgp.merge_keys(stored.key, key, list(user.addresses),
                                     limits=policy.limits)
        merged = True
    return _write(store, user, cleaned, Provenance(origin, actor, now), policy,
                  merged=merged, consume=consume)


def publish_revocation(store: KeyStore, user: User, certificate: bytes, *,
                       origin: KeyOrigin, actor: str, now: int,
                       policy: Policy) -> Publication:
    """Publish a revocation certificate uploaded alone (no key: gpg --gen-revoke's output,
    OpenPGP.js's revocationCertificate) on the key the user's entry publishes: verified
    against its primary key, joined to it (`openpgp.merge_revocation`), written like any
    update. NotFound when the user publishes no key; KeyRefused, with the reason in plain
    words, when the certificate is not a valid revocation of that key."""
    stored = store.get_key(user)
    if stored is None:
        raise NotFound("you have no published key to revoke")
    cleaned = openpgp.merge_revocation(stored.key, certificate, list(user.addresses),
                                       limits=policy.limits, now=now)
    return _write(store, user, cleaned, Provenance(origin, actor, now), policy, merged=True)


@dataclass(frozen=True, slots=True)
class Unpublished:
    """What unpublishing one address did: the key as it was, and as it is now (None: the
    address was the last one, so the whole key is unpublished)."""

    before: StoredKey
    after: StoredKey | None


def unpublish_address(store: KeyStore, user: User, address: Address, *, origin: KeyOrigin,
                      actor: str, now: int, policy: Policy) -> Unpublished:
    """Stop publishing the user's key for one of their addresses: the stored key is cleaned
    again for the addresses it still names but this one (its user ID for this address
    left out) and written like any publication, so its gpgMailbox and WKD hash go with it;
    when no other address remains the key is removed (`KeyStore.remove_key`). Nothing is
    merged: merging would bring the user ID back from the stored copy. KeyRefused for an
    address that is not the user's, NotFound when the key is not published for it."""
    if not user.owns(address):
        raise KeyRefused(f"not an address of {user.dn}: {address}")
    stored = store.get_key(user)
    if stored is None or not any(a.key == address.key for a in stored.addresses):
        raise NotFound(f"no key is published for {address}")
    remaining = [a for a in stored.addresses if a.key != address.key and user.owns(a)]
    if not remaining:
        return Unpublished(store.remove_key(user), None)
    cleaned = openpgp.clean_key(stored.key, remaining, limits=policy.limits, now=now)
    done = _write(store, user, cleaned, Provenance(origin, actor, now), policy, merged=False)
    return Unpublished(stored, done.stored)


def _write(store: KeyStore, user: User, cleaned: CleanResult, provenance: Provenance,
           policy: Policy, *, merged: bool, consume: PendingRequest | None = None,
           ) -> Publication:
    """The size cap, then the store's one atomic write with claims and provenance."""
    if len(cleaned.key) > policy.max_published_bytes:
        raise KeyRefused(f"the cleaned key has {len(cleaned.key)} octets, over the limit of "
                         f"{policy.max_published_bytes} (max_published_bytes)")
    written = store.publish_key(user, cleaned, provenance, consume=consume,
                                limits=policy.limits)
    return Publication(written, openpgp.without_subkeys(cleaned, dict(written.withheld)),
                       merged)


def _cleaned_for(cleaned: CleanResult, addresses: Sequence[Address], *, exactly: bool) -> bool:
    """Is this key cleaned for these addresses (exactly: all of them; else: some of them,
    as cleaning for a user's addresses keeps those the key names)?"""
    have = {a.key for a in cleaned.info.addresses}
    want = {a.key for a in addresses}
    return have == want if exactly else bool(have) and have <= want
