"""OpenPGP for milter-wkd: cleaning keys for publication, their metadata, Autocrypt keydata,
and (in `messages`, the only module that imports pgpy) the WKS message operations.

Everything here takes bytes (binary or ASCII-armored) and returns plain values; every
refusal is a `KeyRefused` with a human reason. See `cleaning` for the publication policy.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from milter_wkd.errors import KeyRefused
from milter_wkd.openpgp import packets
from milter_wkd.openpgp.cleaning import (
    DEFAULT_LIMITS,
    DEFAULT_POLICY,
    CleanKey,
    CleanSubkey,
    Limits,
    Policy,
    add_revocations,
    lone_signatures,
    merge_skeletons,
    scan,
    verify_skeleton,
)
from milter_wkd.values import Address, Fingerprint

__all__ = [
    "DEFAULT_LIMITS", "DEFAULT_POLICY", "CleanKey", "CleanResult", "KeyInfo", "KeyRefused",
    "Limits", "Policy", "SubkeyInfo", "armor_key", "autocrypt_keydata", "autocrypt_of",
    "clean_key", "inspect_key", "is_revocation_certificate", "merge_keys", "merge_revocation",
]

_FLAG_LETTERS = ((0x01, "c"), (0x02, "s"), (0x04, "e"), (0x08, "e"), (0x20, "a"))


def _usage(flags: int | None, can_sign: bool, can_encrypt: bool) -> str:
    if flags is None:
        return ("s" if can_sign else "") + ("e" if can_encrypt else "")
    out = ""
    for bit, letter in _FLAG_LETTERS:
        if flags & bit and letter not in out:
            out += letter
    return out


@dataclass(frozen=True, slots=True)
class SubkeyInfo:
    fingerprint: Fingerprint
    created: int
    expires: int | None
    algorithm: str
    bits: int
    curve: str | None
    usage: str
    revoked: bool
    # A valid back-signature (0x19) by the subkey: its possession is proven.
    cross_certified: bool = False

    @property
    def key_id(self) -> str:
        return self.fingerprint.key_id


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the directory records about a published key (GnuPG's LDAP attributes)."""

    fingerprint: Fingerprint
    created: int
    expires: int | None
    algorithm: str
    bits: int
    curve: str | None
    revoked: bool
    user_ids: tuple[str, ...]
    addresses: tuple[Address, ...]
    subkeys: tuple[SubkeyInfo, ...]

    @property
    def key_id(self) -> str:
        return self.fingerprint.key_id

    @property
    def short_key_id(self) -> str:
        return self.fingerprint.short_key_id

    def expired(self, now: int | None = None) -> bool:
        now = int(time.time()) if now is None else now
        return self.expires is not None and self.expires <= now

    def as_json(self) -> dict[str, object]:
        return {
            "fingerprint": self.fingerprint.hex,
            "key_id": self.key_id,
            "short_key_id": self.short_key_id,
            "created": self.created,
            "expires": self.expires,
            "algorithm": self.algorithm,
            "bits": self.bits,
            "curve": self.curve,
            "revoked": self.revoked,
            "user_ids": list(self.user_ids),
            "addresses": [str(a) for a in self.addresses],
            "subkeys": [
                {"fingerprint": s.fingerprint.hex, "key_id": s.key_id, "created": s.created,
                 "expires": s.expires, "algorithm": s.algorithm, "bits": s.bits,
                 "curve": s.curve, "usage": s.usage, "revoked": s.revoked,
                 "cross_certified": s.cross_certified}
                for s in self.subkeys
            ],
        }


@dataclass(frozen=True, slots=True)
class CleanResult:
    """A cleaned key: its binary packets, its metadata, and what was kept and dropped."""

    key: bytes
    info: KeyInfo
    stats: Counter[str]
    clean: CleanKey

    @property
    def dropped(self) -> tuple[str, ...]:
        """Parts left out that the submitter must hear of, each with why and what to do."""
        return self.clean.dropped


def _key_expiry(clean: CleanKey) -> int | None:
    sources = [clean.direct_signature] if clean.direct_signature is not None else []
    primaries = [u.signature for u in clean.user_ids if u.signature.is_primary_uid]
    newest = sorted((u.signature for u in clean.user_ids), key=lambda s: s.created)
    chosen = (sources or primaries or newest[-1:])[0]
    delta = chosen.key_expires_after
    return clean.primary.created + delta if delta else None


def _subkey_info(sub: CleanSubkey) -> SubkeyInfo:
    delta = sub.signature.key_expires_after
    return SubkeyInfo(
        Fingerprint.from_bytes(sub.key.fingerprint), sub.key.created,
        sub.key.created + delta if delta else None, sub.key.algorithm_name, sub.key.bits,
        sub.key.curve, _usage(sub.signature.key_flags, sub.key.can_sign, sub.key.can_encrypt),
        sub.revocation is not None, sub.cross_certified)


def _info(clean: CleanKey) -> KeyInfo:
    primary = clean.primary
    return KeyInfo(
        fingerprint=Fingerprint.from_bytes(primary.fingerprint),
        created=primary.created,
        expires=_key_expiry(clean),
        algorithm=primary.algorithm_name,
        bits=primary.bits,
        curve=primary.curve,
        revoked=clean.revocation is not None,
        user_ids=tuple(u.text for u in clean.user_ids),
        addresses=tuple(u.address for u in clean.user_ids),
        subkeys=tuple(_subkey_info(s) for s in clean.subkeys),
    )


def _result(clean: CleanKey) -> CleanResult:
    return CleanResult(clean.to_bytes(), _info(clean), clean.stats, clean)


def clean_key(data: bytes, addresses: Iterable[Address] | None, *,
              limits: Limits = DEFAULT_LIMITS, now: int | None = None) -> CleanResult:
    """Clean a key for publication under `addresses` (None: every address it has)."""
    return _result(verify_skeleton(scan(data, addresses, limits), now))


def inspect_key(data: bytes, *, limits: Limits = DEFAULT_LIMITS,
                now: int | None = None) -> KeyInfo:
    """Metadata of what would be published of a key for all its addresses."""
    return clean_key(data, None, limits=limits, now=now).info


def merge_keys(stored: bytes, update: bytes, addresses: Iterable[Address] | None, *,
               limits: Limits = DEFAULT_LIMITS, now: int | None = None) -> CleanResult:
    """Merge an update into a stored copy of the same key, under the same cleaning rules.

    The newest valid self-signature of every component wins, so a new expiry or a new
    subkey comes through, and a valid revocation in either copy stays.
    """
    wanted = None if addresses is None else list(addresses)
    skeleton = merge_skeletons(scan(stored, wanted, limits), scan(update, wanted, limits), limits)
    return _result(verify_skeleton(skeleton, now))


def is_revocation_certificate(data: bytes) -> bool:
    """Is this input signatures alone (a revocation certificate, see `merge_revocation`),
    not a key? Never raises: unreadable input is no certificate (cleaning says why)."""
    try:
        return lone_signatures(data) is not None
    except KeyRefused:
        return False


def merge_revocation(stored: bytes, certificate: bytes, addresses: Iterable[Address] | None,
                     *, limits: Limits = DEFAULT_LIMITS, now: int | None = None,
                     ) -> CleanResult:
    """Join a revocation certificate uploaded alone (gpg --gen-revoke, OpenPGP.js's
    `revocationCertificate`: one key revocation signature, type 0x20, without the key)
    to the stored key it revokes, cleaned as `merge_keys` cleans an update.

    Each signature must be a key revocation made and verified by the stored primary key;
    otherwise KeyRefused says why in plain words (another key's, a tampered one, a
    revocation of a user ID or subkey, which needs the key it belongs to)."""
    now = int(time.time()) if now is None else now
    signatures = lone_signatures(certificate)
    if signatures is None:
        raise KeyRefused("this is not a revocation certificate: it holds more than "
                         "signatures (upload a revoked key as a key)")
    wanted = None if addresses is None else list(addresses)
    skeleton = add_revocations(scan(stored, wanted, limits), signatures, now)
    return _result(verify_skeleton(skeleton, now))


def autocrypt_keydata(data: bytes, address: Address, *, limits: Limits = DEFAULT_LIMITS,
                      now: int | None = None) -> bytes:
    """The Autocrypt Level 1 keydata for one address: primary key, that address's user ID,
    its self-signature, the newest valid encryption subkey and its binding (5 packets)."""
    now = int(time.time()) if now is None else now
    return autocrypt_of(clean_key(data, [address], limits=limits, now=now), address, now=now)


def autocrypt_of(result: CleanResult, address: Address, *, now: int | None = None) -> bytes:
    """The Autocrypt keydata of an already cleaned key (see `autocrypt_keydata`)."""
    now = int(time.time()) if now is None else now
    clean = result.clean
    if clean.revocation is not None:
        raise KeyRefused("the key is revoked")
    if result.info.expired(now):
        raise KeyRefused("the key has expired")
    uids = [u for u in clean.user_ids if u.address.key == address.key]
    if not uids:
        raise KeyRefused(f"no valid user ID for {address}")
    usable = [
        (sub, info) for sub, info in zip(clean.subkeys, result.info.subkeys, strict=True)
        if "e" in info.usage and sub.revocation is None
        and (info.expires is None or info.expires > now)
    ]
    if not usable:
        raise KeyRefused("no valid encryption subkey")
    sub = max(usable, key=lambda pair: (pair[0].key.created, pair[0].signature.created))[0]
    uid = uids[0]
    return b"".join((clean.primary_raw, uid.raw, uid.certification, sub.raw, sub.binding))


def without_subkeys(result: CleanResult, dropped: Mapping[Fingerprint, str]) -> CleanResult:
    """The same cleaned key without the named subkeys (and their signatures); each reason
    joins `dropped`. Used when key material is held by another entry."""
    names = {f.hex for f in dropped}
    kept = tuple(s for s in result.clean.subkeys
                 if Fingerprint.from_bytes(s.key.fingerprint).hex not in names)
    if len(kept) == len(result.clean.subkeys):
        return result
    stats = Counter(result.clean.stats)
    stats["dropped:subkey-held-by-another-entry"] += len(result.clean.subkeys) - len(kept)
    return _result(dataclasses.replace(result.clean, subkeys=kept, stats=stats,
                                       dropped=(*result.clean.dropped, *dropped.values())))


def armor_key(binary: bytes) -> bytes:
    return packets.armor(packets.ARMOR_PUBLIC_KEY, binary)
