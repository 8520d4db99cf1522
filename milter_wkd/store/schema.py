"""The mapping between keys and LDAP attributes (ldap/schema/), and the ONE rule for what
an entry publishes.

- attribute names: GnuPG's keyserver schema (pgpKey, gpgFingerprint, ...) plus ours
  (wkdAddressHash, provenance, wkdKeyDigest, wkdKeyProblem, claims, pending requests);
- value formats: GnuPG's LDAP time, `key_digest`, `address_slot` (`<hash>@<domain>`, what
  wkdAddressHash holds and the WKD cache is keyed by);
- `key_attributes`: every attribute a key writes;
- `Entry`: a search result entry (DN and attributes, names compared case-insensitively);
- `stored_key(entry)`: what an entry publishes, the rule every reader uses (the write
  store, the responder's view, the follower, the doctor): a pgpKey the system checked
  (wkdKeyDigest is the SHA-256 of the value, no wkdKeyProblem) with a readable
  fingerprint; its addresses are the gpgMailbox values, narrowed to those named by
  wkdAddressHash when it has any. A disabled key is still a `StoredKey` (disabled=True):
  readers that serve keys skip it (`StoredKey.served`).

Pure: no I/O, no python-ldap. Unusable values are logged and skipped, never raised.
"""

from __future__ import annotations

import calendar
import functools
import hashlib
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from milter_wkd.errors import BadAddress, Refused
from milter_wkd.openpgp import CleanResult, KeyInfo, armor_key
from milter_wkd.openpgp.packets import dearmor
from milter_wkd.store.model import Claim, ClaimKind, Holdings, KeyOrigin, Provenance, StoredKey
from milter_wkd.values import Address, Fingerprint
from milter_wkd.wkd import address_hash

log = logging.getLogger(__name__)

KEY_CLASS = "wkdKeyHolder"
PENDING_CLASS = "wkdPendingRequest"
CLAIM_CLASS = "wkdKeyClaim"

# Every attribute a published key writes. Removing a key empties all of them.
GNUPG_ATTRIBUTES = (
    "pgpKey", "pgpCertID", "pgpKeyID", "gpgFingerprint", "gpgSubFingerprint", "pgpSubKeyID",
    "pgpUserID", "gpgMailbox", "pgpRevoked", "pgpDisabled", "pgpKeyCreateTime",
    "pgpKeyExpireTime", "pgpKeySize", "pgpKeyType",
)
PROVENANCE_ATTRIBUTES = ("wkdKeySource", "wkdKeySourceActor", "wkdKeyPublished")
DIGEST = "wkdKeyDigest"
PROBLEM = "wkdKeyProblem"
KEY_ATTRIBUTES = (*GNUPG_ATTRIBUTES, "wkdAddressHash", *PROVENANCE_ATTRIBUTES, DIGEST, PROBLEM)
PREFER_ENCRYPT = "wkdPreferEncrypt"
CLAIM_ATTRIBUTES = ("wkdFingerprint", "wkdClaimHolder", "wkdClaimKind", "wkdCreated")



@dataclass(frozen=True, slots=True)
class Entry:
    """A directory entry as read: its DN and attributes (names as the server sent them)."""

    dn: str
    attributes: Mapping[str, Sequence[bytes]]

    def values(self, name: str) -> list[bytes]:
        found = self.attributes.get(name)  # the server answers with the names asked for
        if found is not None:
            return list(found)
        lowered = name.lower()
        for key, values in self.attributes.items():
            if key.lower() == lowered:
                return list(values)
        return []

    def texts(self, name: str) -> list[str]:
        return [v.decode("utf-8", "replace") for v in self.values(name)]

    def text(self, name: str) -> str | None:
        texts = self.texts(name)
        return texts[0] if texts else None

    def has_class(self, name: str) -> bool:
        return name.lower() in {c.lower() for c in self.texts("objectClass")}

    def fingerprints(self) -> set[str]:
        """Every primary and subkey fingerprint its key attributes hold (upper-case hex)."""
        return {v.upper() for v in (*self.texts("gpgFingerprint"),
                                     *self.texts("gpgSubFingerprint"))}


def gnupg_time(epoch: int) -> str:
    """GnuPG's LDAP time format (also a valid GeneralizedTime): YYYYMMDDHHMMSSZ in UTC."""
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(epoch))


def parse_gnupg_time(text: str) -> int | None:
    match = re.fullmatch(r"(\d{14})(?:\.\d+)?Z", text.strip())
    if not match:
        return None
    return calendar.timegm(time.strptime(match.group(1), "%Y%m%d%H%M%S"))


def key_digest(value: bytes) -> str:
    """wkdKeyDigest of a pgpKey value: SHA-256 of its octets as stored, in hex."""
    return hashlib.sha256(value).hexdigest()


def slot(hash_: str, domain: str) -> str:
    return f"{hash_}@{domain}"


@functools.lru_cache(maxsize=4096)
def address_slot(address: Address) -> str:
    """The wkdAddressHash value of an address, `<z-base-32 hash>@<domain>` (cached: a cold
    WKD load asks for each one thrice in a row)."""
    return slot(address_hash(address), address.domain)


def _key_type(algorithm: str) -> str:
    # dirmngr knows two names (RSA -> 1, DSS/DH -> 17); other algorithms keep their name.
    if algorithm.startswith("RSA"):
        return "RSA"
    if algorithm in ("DSA", "ElGamal", "ElGamal-old"):
        return "DSS/DH"
    return algorithm


def key_attributes(info: KeyInfo, armored: bytes) -> dict[str, list[str]]:
    """Every GnuPG keyserver attribute of a key, as the directory stores it."""
    return {
        "pgpKey": [armored.decode("ascii")],
        "pgpCertID": [info.key_id],
        "pgpKeyID": [info.short_key_id],
        "gpgFingerprint": [info.fingerprint.hex],
        "gpgSubFingerprint": [s.fingerprint.hex for s in info.subkeys],
        "pgpSubKeyID": [s.key_id for s in info.subkeys],
        "pgpUserID": list(dict.fromkeys(info.user_ids)),
        "gpgMailbox": list(dict.fromkeys(str(a) for a in info.addresses)),
        "pgpRevoked": ["1" if info.revoked else "0"],
        "pgpKeyCreateTime": [gnupg_time(info.created)],
        "pgpKeyExpireTime": [gnupg_time(info.expires)] if info.expires else [],
        "pgpKeySize": [f"{info.bits:05d}"],
        "pgpKeyType": [_key_type(info.algorithm)],
        "wkdAddressHash": list(dict.fromkeys(address_slot(a) for a in info.addresses)),
    }


# -- connections -----------------------------------------------------------------------



def parse_addresses(values: Sequence[str], dn: str) -> tuple[Address, ...]:
    found: dict[str, Address] = {}
    for value in values:
        try:
            address = Address.parse(value)
        except BadAddress:
            log.warning("ignoring unusable address %r of %s", value[:80], dn)
            continue
        found.setdefault(address.key, address)
    return tuple(found.values())


def holdings_of(asked: frozenset[str], claim_entries: Iterable[Entry],
              holder_entries: Iterable[Entry]) -> Holdings:
    claims: dict[str, Claim] = {}
    for entry in claim_entries:
        fpr, holder = (entry.text("wkdFingerprint") or "").upper(), entry.text("wkdClaimHolder")
        kind = entry.text("wkdClaimKind") or ""
        if fpr in asked and holder:
            claims[fpr] = Claim(
                fpr, holder, ClaimKind(kind) if kind in set(ClaimKind) else ClaimKind.SUBKEY,
                parse_gnupg_time(entry.text("wkdCreated") or "") or 0)
    attributes: dict[str, list[tuple[str, bool]]] = {}
    for entry in holder_entries:
        primaries = {v.upper() for v in entry.texts("gpgFingerprint")}
        for fpr in primaries | {v.upper() for v in entry.texts("gpgSubFingerprint")}:
            if fpr in asked:
                attributes.setdefault(fpr, []).append((entry.dn, fpr in primaries))
    return Holdings(asked, claims, {f: tuple(h) for f, h in attributes.items()})




def published_values(cleaned: CleanResult, provenance: Provenance, *, disabled: bool = False,
                     ) -> dict[str, list[str]]:
    """Every attribute publishing a cleaned key writes on its holder's entry: the key, what
    is derived from it, the provenance and the digest (no problem)."""
    armored = armor_key(cleaned.key)
    values: dict[str, list[str]] = key_attributes(cleaned.info, armored)
    values["pgpDisabled"] = ["1" if disabled else "0"]
    values["wkdKeySource"] = [provenance.source.value]
    values["wkdKeySourceActor"] = [provenance.actor] if provenance.actor else []
    values["wkdKeyPublished"] = [gnupg_time(provenance.published)]
    values[DIGEST] = [key_digest(armored)]
    values[PROBLEM] = []
    return values

def checked(entry: Entry) -> str | None:
    """Why the system has not checked (or has withheld) an entry's pgpKey; None when it
    has and found nothing wrong: its wkdKeyDigest is the SHA-256 of the pgpKey value and
    it has no wkdKeyProblem."""
    armored = entry.values("pgpKey")
    if not armored:
        return "it has no pgpKey"
    problem = entry.text(PROBLEM)
    if problem is not None:
        return "withheld: " + problem
    digest = (entry.text(DIGEST) or "").lower()
    if digest != key_digest(armored[0]):
        return "its pgpKey was not checked by the system (wkdKeyDigest missing or stale)"
    return None


def published_addresses(entry: Entry) -> tuple[Address, ...]:
    """gpgMailbox values (only the system and administrators write them), narrowed to those
    wkdAddressHash names when it names any."""
    hashes = {v.lower() for v in entry.texts("wkdAddressHash")}
    found = parse_addresses(entry.texts("gpgMailbox"), entry.dn)
    if not hashes:
        return found
    return tuple(a for a in found if address_slot(a) in hashes)


def stored_key(entry: Entry) -> StoredKey | None:
    """What an entry publishes (see the module docstring); None when it publishes nothing."""
    armored = entry.values("pgpKey")
    fingerprint = entry.text("gpgFingerprint")
    if not armored or not fingerprint or checked(entry) is not None:
        return None
    try:
        _label, binary = dearmor(armored[0])
        fpr = Fingerprint.parse(fingerprint)
    except Refused as exc:
        log.warning("ignoring unreadable key of %s: %s", entry.dn, exc.reason)
        return None
    source = entry.text("wkdKeySource")
    published = parse_gnupg_time(entry.text("wkdKeyPublished") or "")
    provenance = None
    if source in set(KeyOrigin):
        provenance = Provenance(KeyOrigin(source), entry.text("wkdKeySourceActor") or "",
                                published or 0)
    return StoredKey(
        dn=entry.dn, key=binary, fingerprint=fpr,
        addresses=published_addresses(entry),
        address_hashes=tuple(v.lower() for v in entry.texts("wkdAddressHash")),
        user_ids=tuple(entry.texts("pgpUserID")),
        created=parse_gnupg_time(entry.text("pgpKeyCreateTime") or ""),
        expires=parse_gnupg_time(entry.text("pgpKeyExpireTime") or ""),
        revoked=entry.text("pgpRevoked") == "1",
        disabled=entry.text("pgpDisabled") == "1",
        provenance=provenance,
        prefer_encrypt=entry.text(PREFER_ENCRYPT),
    )
