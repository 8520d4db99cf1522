"""The LDAP store: users by address, their published keys, pending WKS requests, changes.

`Directory` implements, over python-ldap (OpenLDAP's own libldap: an operation costs about
a tenth of what pure-Python ldap3 spends encoding it; synchronous connections from a small
pool, so that one instance serves a multi-threaded milter):
- users: `find_user(address)` searches `base_dn` for `(&<user_filter>(|(mail=a)(alias=a)))`
  over the configured `mail_attributes` (every value escaped); a user's addresses are the
  values of those attributes;
- keys, stored ON the user's entry (object class wkdKeyHolder, ldap/schema): the armored
  key in pgpKey and every GnuPG keyserver attribute derived from it (pgpCertID, pgpKeyID,
  gpgFingerprint, gpgSubFingerprint, pgpSubKeyID, pgpUserID, gpgMailbox, pgpRevoked,
  pgpDisabled, pgpKeyCreateTime/pgpKeyExpireTime as YYYYMMDDHHMMSSZ, pgpKeySize,
  pgpKeyType), the WKD look-up names wkdAddressHash (`<z-base-32 hash>@<domain>`) and the
  provenance (wkdKeySource, wkdKeySourceActor, wkdKeyPublished) and wkdKeyDigest (SHA-256
  of the pgpKey value: a pgpKey whose digest does not match was not written by the system,
  and is not served until it has been checked) - all in ONE modify, asserting the entry is
  as it was read, so a reader sees the old key or the new one, never a mix;
- claims on key material: one entry `wkdFingerprint=<hex>,<claims_base>` per primary key
  and subkey, naming the entry that holds it, made before the key is written. An LDAP add
  of an existing name fails, so two entries can never both hold the same material, even
  when two publications race (a claim not yet backed by its holder's key is a publication
  under way for CLAIM_IN_FLIGHT seconds, a leftover after that). A claim
  proven by a signature of that key (a primary's self-signatures, a subkey's
  back-signature) takes precedence over an unproven one (an encryption subkey, which anyone
  can bind to their own key): the unproven holder loses that subkey, and an unproven subkey
  whose material is held elsewhere is left out of the publication (`StoredKey.withheld`);
- pending WKS requests: entries `cn=<slot>.<hash>@<domain>,<pending_base>`, at most
  `limit` slots per address, so the per-address cap holds under any concurrency (create
  in a free slot, fetch by address with the nonce compared in constant time against the
  stored one, take once, delete, expire);
- `change_token()`: contextCSN of the suffix (syncprov), which changes on every write.

`ConnectionPool`, `close_connection`, `ldap_reason`, `CONNECTION_ERRORS` and
`RESULT_NAMES` are shared with the WKD responder's source (`web.ldap_source`) and `check`,
so every LDAP connection of the project is opened and reported the same way.

Configuration: the [directory] section (uri ldap://, ldaps:// or ldapi://; bind_dn and
bind_password(_file) for a simple bind, else SASL EXTERNAL on ldapi://; ca_file; base_dn;
user_filter; mail_attributes; pending_base; claims_base; timeout; pool_size).

Failures: no answer within `timeout` seconds, a refused connection, a broken one (slapd
restarted: an operation on a stale pooled connection is retried once on a fresh one;
modifies are idempotent, and an add or delete whose first attempt did go through reports
Conflict or NotFound on the retry; a publication cut off after its claims leaves claims
that its retry finds its own), a refused bind or a busy server raise
`DirectoryUnavailable` (callers answer with a temporary failure), and so does a
publication whose claims kept changing under it or whose material someone else is
publishing right now (`Changed`); an unknown user, key or request is
`NotFound`; an address owned by two entries or key material whose claim another entry
holds is `Conflict`; all slots of an address taken is `RateLimited`; a key the directory
itself refuses (constraint overlay) is `KeyRefused`; any other LDAP error is
`DirectoryError`.
"""

from __future__ import annotations

import calendar
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import ldap
from ldap.controls import SimplePagedResultsControl
from ldap.controls.libldap import AssertionControl
from ldap.dn import escape_dn_chars
from ldap.filter import escape_filter_chars

from milter_wkd.config import DirectoryConfig
from milter_wkd.errors import (
    BadAddress,
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
    KeyInfo,
    Limits,
    armor_key,
    clean_key,
    without_subkeys,
)
from milter_wkd.openpgp.packets import dearmor
from milter_wkd.values import Address, Fingerprint
from milter_wkd.wkd import address_hash

log = logging.getLogger(__name__)

T = TypeVar("T")

KEY_CLASS = "wkdKeyHolder"
PENDING_CLASS = "wkdPendingRequest"
CLAIM_CLASS = "wkdKeyClaim"
DEFAULT_LDAPI_SOCKET = "/var/run/slapd/ldapi"
_PAGE_SIZE = 200
_NONCE = re.compile(r"^[A-Za-z0-9]{16,64}$")

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
_CLAIM_ATTRIBUTES = ("wkdFingerprint", "wkdClaimHolder", "wkdClaimKind", "wkdCreated")
_CLAIM_ROUNDS = 3
# A claim whose holder does not hold the material yet is a publication under way for this
# long (it takes milliseconds; a stuck one is retried by Postfix within minutes), and a
# leftover of a failed one after it: only a leftover may be taken over.
CLAIM_IN_FLIGHT = 120

# Errors that mean "the connection is gone or never came": retry once, then give up.
CONNECTION_ERRORS = (ldap.SERVER_DOWN, ldap.TIMEOUT, ldap.CONNECT_ERROR, OSError)
# Server answers that mean "not now".
_BUSY_RESULTS = (ldap.BUSY, ldap.UNAVAILABLE, ldap.TIMELIMIT_EXCEEDED, ldap.OTHER,
                 ldap.LOOP_DETECT, ldap.ADMINLIMIT_EXCEEDED)
# Modification kinds (python-ldap's, under shorter names).
REPLACE, ADD, DELETE = ldap.MOD_REPLACE, ldap.MOD_ADD, ldap.MOD_DELETE
BASE, SUBTREE = ldap.SCOPE_BASE, ldap.SCOPE_SUBTREE
Changes = dict[str, tuple[int, Sequence[str | bytes]]]


class KeySource(StrEnum):
    """How a key came to be published."""

    AUTH_SUBMIT = "auth-submit"
    WKS_CONFIRMED = "wks-confirmed"
    ADMIN_IMPORT = "admin-import"
    ADMIN_EDIT = "admin-edit"  # pgpKey written with LDAP tools, checked by the system


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


@dataclass(frozen=True, slots=True)
class Provenance:
    source: KeySource
    actor: str
    published: int  # seconds since the epoch


@dataclass(frozen=True, slots=True)
class User:
    """A person entry and the addresses its mail attributes hold."""

    dn: str
    addresses: tuple[Address, ...]
    # The entry's key attributes as read together with the addresses (find_user with
    # with_key=True): publishing right after the look-up needs no second read.
    snapshot: dict[str, list[bytes]] | None = field(default=None, compare=False, repr=False)
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


def key_fingerprints(info: KeyInfo) -> list[Fingerprint]:
    """The primary's and every subkey's fingerprint: the material a key claims."""
    return [info.fingerprint, *(s.fingerprint for s in info.subkeys)]


def wanted_claims(info: KeyInfo) -> dict[str, ClaimKind]:
    wanted = {s.fingerprint.hex: ClaimKind.PROVEN_SUBKEY if s.cross_certified
              else ClaimKind.SUBKEY for s in info.subkeys}
    wanted[info.fingerprint.hex] = ClaimKind.PRIMARY
    return wanted


def _dn_key(dn: str) -> str:
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
    me = _dn_key(dn)
    for fpr, kind in wanted.items():
        held_by = holdings.attributes.get(fpr, ())
        holding = {_dn_key(h) for h, _ in held_by}
        stored = holdings.claims.get(fpr)
        other: tuple[str, ClaimKind] | None = None
        if stored is not None and _dn_key(stored.holder) != me and _dn_key(
                stored.holder) in holding:
            other = (stored.holder, stored.kind)
        else:
            found = next(((h, primary) for h, primary in held_by if _dn_key(h) != me), None)
            if found is not None:
                other = (found[0], ClaimKind.PRIMARY if found[1] else ClaimKind.SUBKEY)
        if other is None:
            if stored is None:
                plan.add[fpr] = kind
            elif _dn_key(stored.holder) != me and now - stored.created <= CLAIM_IN_FLIGHT:
                plan.busy = (f"key material {fpr} is being published by another user right "
                             "now; try again in a few minutes")
            elif _dn_key(stored.holder) != me:
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


def address_slot(address: Address) -> str:
    """The wkdAddressHash value of an address: `<z-base-32 hash>@<domain>`."""
    return f"{address_hash(address)}@{address.domain}"


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


def _uri(config: DirectoryConfig) -> tuple[str, str]:
    """The scheme and the URI as libldap wants it (an ldapi path percent-encoded)."""
    uri = config.uri.strip()
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("ldap", "ldaps", "ldapi"):
        raise DirectoryError(f"unsupported directory URI {uri!r} (ldap://, ldaps://, ldapi://)")
    rest = rest.rstrip("/")
    if scheme == "ldapi":
        return scheme, "ldapi://" + quote(unquote(rest) or DEFAULT_LDAPI_SOCKET, safe="")
    return scheme, f"{scheme}://{rest}"


def _password(config: DirectoryConfig) -> str:
    if config.bind_password_file:
        try:
            lines = Path(config.bind_password_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise DirectoryError(f"cannot read bind_password_file: {exc.strerror}") from None
        return lines[0] if lines else ""
    return config.bind_password


class ConnectionPool:
    """Bound connections, each used by one thread at a time."""

    def __init__(self, config: DirectoryConfig) -> None:
        self.config = config
        self.scheme, self.uri = _uri(config)  # validates the URI once, early
        self.password = _password(config) if config.bind_dn else ""
        self.idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self.slots = threading.BoundedSemaphore(max(1, config.pool_size))

    def open(self) -> Any:
        cfg = self.config
        conn = ldap.initialize(self.uri)
        try:
            conn.set_option(ldap.OPT_PROTOCOL_VERSION, 3)
            conn.set_option(ldap.OPT_REFERRALS, 0)
            # Connecting, and every synchronous operation, give up after `timeout`.
            conn.set_option(ldap.OPT_NETWORK_TIMEOUT, cfg.timeout)
            conn.set_option(ldap.OPT_TIMEOUT, cfg.timeout)
            if self.scheme == "ldaps":
                conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
                if cfg.ca_file:
                    conn.set_option(ldap.OPT_X_TLS_CACERTFILE, cfg.ca_file)
                conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)  # after the TLS options
            if cfg.bind_dn:
                conn.simple_bind_s(cfg.bind_dn, self.password)
            elif self.scheme == "ldapi":
                conn.sasl_external_bind_s()
            else:
                conn.simple_bind_s("", "")
        except CONNECTION_ERRORS as exc:
            close_connection(conn)
            raise DirectoryUnavailable(
                f"directory {cfg.uri} unreachable: {ldap_reason(exc)}") from None
        except ldap.LDAPError as exc:
            close_connection(conn)
            raise DirectoryUnavailable(
                f"bind to {cfg.uri} as {cfg.bind_dn or 'default identity'} refused: "
                f"{ldap_reason(exc)}") from None
        return conn

    def run(self, operation: Callable[[Any], T]) -> T:
        wait = max(self.config.timeout * 2, 1.0)
        if not self.slots.acquire(timeout=wait):
            raise DirectoryUnavailable("all directory connections are busy")
        try:
            try:
                conn, reused = self.idle.get_nowait(), True
            except queue.Empty:
                conn, reused = self.open(), False
            for attempt in (1, 2):
                try:
                    result = operation(conn)
                except CONNECTION_ERRORS as exc:
                    close_connection(conn)
                    # A pooled connection may have died with a restarted slapd: one retry on
                    # a fresh one. Not after a timeout: a hung slapd would cost twice.
                    if attempt == 1 and reused and not isinstance(exc, ldap.TIMEOUT):
                        log.info("directory connection broke (%s); reconnecting", ldap_reason(exc))
                        conn = self.open()
                        continue
                    raise DirectoryUnavailable(
                        f"directory {self.config.uri} did not answer: {ldap_reason(exc)}") from None
                except BaseException:
                    self.idle.put(conn)
                    raise
                self.idle.put(conn)
                return result
            raise AssertionError("unreachable")
        finally:
            self.slots.release()

    def close(self) -> None:
        while True:
            try:
                close_connection(self.idle.get_nowait())
            except queue.Empty:
                return


def close_connection(conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.unbind_ext_s()


# RFC 4511 section 4.1.9 names of result codes: what admins find in slapd's logs and docs.
RESULT_NAMES = {
    1: "operationsError", 2: "protocolError", 3: "timeLimitExceeded", 4: "sizeLimitExceeded",
    7: "authMethodNotSupported", 8: "strongerAuthRequired", 11: "adminLimitExceeded",
    12: "unavailableCriticalExtension", 13: "confidentialityRequired",
    16: "noSuchAttribute", 17: "undefinedAttributeType", 18: "inappropriateMatching",
    19: "constraintViolation", 20: "attributeOrValueExists", 21: "invalidAttributeSyntax",
    32: "noSuchObject", 34: "invalidDNSyntax", 48: "inappropriateAuthentication",
    49: "invalidCredentials", 50: "insufficientAccessRights", 51: "busy", 52: "unavailable",
    53: "unwillingToPerform", 54: "loopDetect", 64: "namingViolation",
    65: "objectClassViolation", 66: "notAllowedOnNonLeaf", 67: "notAllowedOnRDN",
    68: "entryAlreadyExists", 69: "objectClassModsProhibited", 80: "other",
}


def ldap_reason(exc: BaseException) -> str:
    detail = exc.args[0] if exc.args else None
    if isinstance(detail, dict):
        # python-ldap: {"result": 50, "desc": "Insufficient access", "info": "...", ...}
        text = RESULT_NAMES.get(detail.get("result", -1)) or str(
            detail.get("desc") or type(exc).__name__)
        if detail.get("info"):
            text += f" ({detail['info']})"
    else:
        text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def _encode(values: Sequence[str | bytes]) -> list[bytes]:
    return [v if isinstance(v, bytes) else v.encode("utf-8") for v in values]


# -- entries ----------------------------------------------------------------------------


def _values(entry: dict[str, Any], name: str) -> list[bytes]:
    raw = entry.get("raw_attributes", {})
    found = raw.get(name)  # the server answers with the names asked for, mostly
    if found is not None:
        return list(found)
    lowered = name.lower()
    for key, values in raw.items():
        if key.lower() == lowered:
            return list(values)
    return []


def _texts(entry: dict[str, Any], name: str) -> list[str]:
    return [v.decode("utf-8", "replace") for v in _values(entry, name)]


def _text(entry: dict[str, Any], name: str) -> str | None:
    texts = _texts(entry, name)
    return texts[0] if texts else None


def _addresses(values: Sequence[str], dn: str) -> tuple[Address, ...]:
    found: dict[str, Address] = {}
    for value in values:
        try:
            address = Address.parse(value)
        except BadAddress:
            log.warning("ignoring unusable address %r of %s", value[:80], dn)
            continue
        found.setdefault(address.key, address)
    return tuple(found.values())


def _holdings(asked: frozenset[str], claim_entries: list[dict[str, Any]],
              holder_entries: list[dict[str, Any]]) -> Holdings:
    claims: dict[str, Claim] = {}
    for entry in claim_entries:
        fpr, holder = (_text(entry, "wkdFingerprint") or "").upper(), _text(entry, "wkdClaimHolder")
        kind = _text(entry, "wkdClaimKind") or ""
        if fpr in asked and holder:
            claims[fpr] = Claim(
                fpr, holder, ClaimKind(kind) if kind in set(ClaimKind) else ClaimKind.SUBKEY,
                parse_gnupg_time(_text(entry, "wkdCreated") or "") or 0)
    attributes: dict[str, list[tuple[str, bool]]] = {}
    for entry in holder_entries:
        primaries = {v.upper() for v in _texts(entry, "gpgFingerprint")}
        for fpr in primaries | {v.upper() for v in _texts(entry, "gpgSubFingerprint")}:
            if fpr in asked:
                attributes.setdefault(fpr, []).append((entry["dn"], fpr in primaries))
    return Holdings(asked, claims, {f: tuple(h) for f, h in attributes.items()})


# How an operation ends that lost a race to another writer (it wrote nothing).
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
    return [(kind, name, _encode(values) or None) for name, (kind, values) in changes.items()]


def _unchanged(entry: dict[str, Any]) -> str:
    """An assertion that an entry is still as read: its entryCSN changes with every write
    (its digest, when the entryCSN was not read)."""
    csn = _text(entry, "entryCSN")
    if csn:
        return f"(entryCSN={escape_filter_chars(csn)})"
    digest = _text(entry, DIGEST)
    return f"({DIGEST}={escape_filter_chars(digest)})" if digest else f"(!({DIGEST}=*))"


def _key_changes(entry: dict[str, Any], cleaned: CleanResult, provenance: Provenance,
                 disabled: str) -> tuple[Changes, dict[str, list[bytes]]]:
    """The modify that writes a key and everything derived from it on an entry, and the
    values it writes (what a read-back would return, without the round trip)."""
    armored = armor_key(cleaned.key)
    values: dict[str, list[str]] = key_attributes(cleaned.info, armored)
    values["pgpDisabled"] = [disabled]
    values["wkdKeySource"] = [provenance.source.value]
    values["wkdKeySourceActor"] = [provenance.actor] if provenance.actor else []
    values["wkdKeyPublished"] = [gnupg_time(provenance.published)]
    values[DIGEST] = [key_digest(armored)]
    values[PROBLEM] = []
    changes: Changes = {name: (REPLACE, vals) for name, vals in values.items()}
    classes = {c.lower() for c in _texts(entry, "objectClass")}
    if classes and KEY_CLASS.lower() not in classes:
        changes["objectClass"] = (ADD, [KEY_CLASS])
    return changes, {name: _encode(vals) for name, vals in values.items()}


def _withhold_changes(entry: dict[str, Any], reason: str) -> Changes:
    """Remove what was derived from the key (pgpKey stays for the administrator to fix,
    pgpDisabled as their decision) and say why in wkdKeyProblem."""
    changes: Changes = {name: (REPLACE, []) for name in KEY_ATTRIBUTES
                        if name not in ("pgpKey", "pgpDisabled", PROBLEM)
                        and _values(entry, name)}
    changes[PROBLEM] = (REPLACE, [reason[:1000]])
    if KEY_CLASS.lower() not in {c.lower() for c in _texts(entry, "objectClass")}:
        changes["objectClass"] = (ADD, [KEY_CLASS])
    return changes


class Directory:
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

    def __enter__(self) -> Directory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- low level --------------------------------------------------------------------

    def _call(self, operation: Callable[[Any], T]) -> T:
        try:
            return self._pool.run(operation)
        except _BUSY_RESULTS as exc:
            raise DirectoryUnavailable(f"directory busy: {ldap_reason(exc)}") from None
        except ldap.CONSTRAINT_VIOLATION as exc:
            raise KeyRefused(f"the directory refused the data: {ldap_reason(exc)}") from None
        except ldap.INSUFFICIENT_ACCESS as exc:
            raise DirectoryError(f"the directory denied access: {ldap_reason(exc)}") from None

    def _search(self, base: str, filt: str, attributes: Sequence[str], *,
                scope: int = SUBTREE) -> list[dict[str, Any]]:
        return self._searches([(base, filt, attributes, scope)])[0]

    def _searches(self, queries: Sequence[tuple[str, str, Sequence[str], int]],
                  ) -> list[list[dict[str, Any]]]:
        """Entries of several searches, sent together: one round trip, not one each."""
        timeout = self.config.timeout

        def operation(conn: Any) -> list[list[dict[str, Any]]]:
            found: list[list[dict[str, Any]]] = [[] for _ in queries]
            paging = [SimplePagedResultsControl(True, size=_PAGE_SIZE, cookie=b"")
                      for _ in queries]
            pending = list(range(len(queries)))
            while pending:
                sent: dict[int, int] = {}
                try:
                    for i in pending:
                        base, filt, attributes, scope = queries[i]
                        sent[i] = conn.search_ext(
                            base, scope, filt, list(attributes),
                            serverctrls=[paging[i]] if scope != BASE else None,
                            timeout=timeout)
                    more = []
                    for i in pending:
                        try:
                            _type, data, _id, controls = conn.result3(sent.pop(i), all=1,
                                                                      timeout=timeout)
                        except ldap.NO_SUCH_OBJECT:
                            continue
                        # Search references come as (None, [urls]): not entries.
                        found[i] += [{"dn": dn, "raw_attributes": attrs} for dn, attrs in data
                                     if dn is not None]
                        cookie = next((c.cookie for c in controls or ()
                                       if c.controlType == SimplePagedResultsControl.controlType),
                                      None)
                        if cookie:
                            paging[i].cookie = cookie
                            more.append(i)
                except BaseException:
                    for msgid in sent.values():  # answers nobody would read
                        with contextlib.suppress(Exception):
                            conn.abandon_ext(msgid)
                    raise
                pending = more
            return found

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
        queries: list[tuple[str, str, Sequence[str], int]] = [
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
        values = [v for name in self.config.mail_attributes for v in _texts(entry, name)]
        return User(entry["dn"], _addresses(values, entry["dn"]),
                    entry["raw_attributes"] if with_key else None,
                    self._split_holdings(asked, holdings[0]) if asked else None)

    def user(self, address: Address) -> User:
        """Like find_user, but NotFound when nobody has the address."""
        found = self.find_user(address)
        if found is None:
            raise NotFound(f"no user has the address {address}")
        return found

    # -- keys -------------------------------------------------------------------------

    def _read_entry(self, dn: str, attributes: Sequence[str]) -> dict[str, Any] | None:
        entries = self._search(dn, "(objectClass=*)", attributes, scope=BASE)
        return entries[0] if entries else None

    def _stored(self, entry: dict[str, Any]) -> StoredKey | None:
        """The key an entry publishes; None when it has none, or one the system has not
        checked (no or another wkdKeyDigest: edited with LDAP tools) or withheld."""
        armored = _values(entry, "pgpKey")
        fingerprint = _text(entry, "gpgFingerprint")
        if not armored or not fingerprint or _values(entry, PROBLEM):
            return None
        if _text(entry, DIGEST) != key_digest(armored[0]):
            return None
        try:
            _label, binary = dearmor(armored[0])
            fpr = Fingerprint.parse(fingerprint)
        except Refused as exc:
            log.warning("ignoring unreadable key of %s: %s", entry["dn"], exc.reason)
            return None
        source = _text(entry, "wkdKeySource")
        published = parse_gnupg_time(_text(entry, "wkdKeyPublished") or "")
        provenance = None
        if source in set(KeySource):
            provenance = Provenance(KeySource(source), _text(entry, "wkdKeySourceActor") or "",
                                    published or 0)
        return StoredKey(
            dn=entry["dn"], key=binary, fingerprint=fpr,
            addresses=_addresses(_texts(entry, "gpgMailbox"), entry["dn"]),
            address_hashes=tuple(v.lower() for v in _texts(entry, "wkdAddressHash")),
            user_ids=tuple(_texts(entry, "pgpUserID")),
            created=parse_gnupg_time(_text(entry, "pgpKeyCreateTime") or ""),
            expires=parse_gnupg_time(_text(entry, "pgpKeyExpireTime") or ""),
            revoked=_text(entry, "pgpRevoked") == "1",
            disabled=_text(entry, "pgpDisabled") == "1",
            provenance=provenance,
            prefer_encrypt=_text(entry, PREFER_ENCRYPT),
        )

    def get_key(self, user: User) -> StoredKey | None:
        """The key published on a user's entry, if any (read now)."""
        entry = self._read_entry(user.dn, [*KEY_ATTRIBUTES, PREFER_ENCRYPT])
        return self._stored(entry) if entry is not None else None

    def current_key(self, user: User) -> StoredKey | None:
        """The key as read with the user (find_user with_key=True), else read now."""
        if user.snapshot is None:
            return self.get_key(user)
        return self._stored({"dn": user.dn, "raw_attributes": user.snapshot})

    def key_for(self, address: Address) -> StoredKey | None:
        """The key published by the user who owns address (None: no user or no key)."""
        found = self.find_user(address, with_key=True)
        return self.current_key(found) if found is not None else None

    def _holdings_queries(self, fingerprints: frozenset[str],
                          ) -> list[tuple[str, str, Sequence[str], int]]:
        """ONE search (below the nearest entry above both base_dn and claims_base) for the
        claims on fingerprints and the entries whose key attributes hold them: every term
        is an indexed equality (20-indexes.ldif)."""
        values = [escape_filter_chars(f) for f in sorted(fingerprints)]
        held = "".join(f"(gpgFingerprint={v})(gpgSubFingerprint={v})" for v in values)
        claims = "".join(f"(wkdFingerprint={v})" for v in values)
        return [(self._holdings_base(), f"(|(&(objectClass={CLAIM_CLASS})(|{claims})){held})",
                 ["gpgFingerprint", "gpgSubFingerprint", *_CLAIM_ATTRIBUTES], SUBTREE)]

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

    def _split_holdings(self, asked: frozenset[str], found: list[dict[str, Any]]) -> Holdings:
        people = _dn_key(self.config.base_dn)
        claims = [e for e in found if _values(e, "wkdClaimHolder")]
        held = [e for e in found if not _values(e, "wkdClaimHolder")
                and (_dn_key(e["dn"]) == people or _dn_key(e["dn"]).endswith("," + people))]
        return _holdings(asked, claims, held)

    def holdings(self, fingerprints: Sequence[Fingerprint]) -> Holdings:
        """The claims on fingerprints and the entries whose key attributes hold them."""
        asked = frozenset(f.hex for f in fingerprints)
        (found,) = self._searches(self._holdings_queries(asked))
        return self._split_holdings(asked, found)

    def find_by_fingerprint(self, fingerprint: Fingerprint) -> StoredKey | None:
        """The entry whose key has this primary or subkey fingerprint."""
        value = escape_filter_chars(fingerprint.hex)
        entries = self._search(
            self.config.base_dn, f"(|(gpgFingerprint={value})(gpgSubFingerprint={value}))",
            [*KEY_ATTRIBUTES, PREFER_ENCRYPT])
        keys = [k for k in (self._stored(e) for e in entries) if k is not None]
        return keys[0] if keys else None

    def find_by_hash(self, hash_: str, domain: str) -> list[StoredKey]:
        """Keys published for the WKD name <hash>@<domain> (the responder's cache miss)."""
        value = escape_filter_chars(f"{hash_}@{domain}".lower())
        entries = self._search(self.config.base_dn, f"(wkdAddressHash={value})",
                               [*KEY_ATTRIBUTES, PREFER_ENCRYPT])
        return [k for k in (self._stored(e) for e in entries) if k is not None]

    def list_keys(self) -> Iterator[StoredKey]:
        """Every published key below base_dn."""
        entries = self._search(self.config.base_dn, "(&(objectClass=wkdKeyHolder)(pgpKey=*))",
                               [*KEY_ATTRIBUTES, PREFER_ENCRYPT])
        for entry in entries:
            stored = self._stored(entry)
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
        entry = ({"dn": user.dn, "raw_attributes": user.snapshot} if user.snapshot is not None
                 else self._read_entry(user.dn, _ENTRY_STATE))
        if entry is None:
            raise NotFound(f"no entry {user.dn}")
        planned = (_values(entry, "pgpKey"), _text(entry, DIGEST))
        for _round in range(_CLAIM_ROUNDS):
            plan = plan_claims(user.dn, wanted, holdings, provenance.published)
            if plan.conflict is not None:
                raise Conflict(plan.conflict)
            if plan.busy is not None:
                raise Changed(plan.busy)
            final = without_subkeys(cleaned, {Fingerprint.parse(f): reason
                                              for f, reason in plan.drop.items()})
            changes, written = _key_changes(entry, final, provenance,
                                            _text(entry, "pgpDisabled") or "0")
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
            if (_values(entry, "pgpKey"), _text(entry, DIGEST)) != planned:
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
        previous = {v.upper() for v in (*_texts(entry, "gpgFingerprint"),
                                        *_texts(entry, "gpgSubFingerprint"))}
        self._release_claims(user.dn, previous - set(wanted))
        written[PREFER_ENCRYPT] = _values(entry, PREFER_ENCRYPT)
        stored = self._stored({"dn": user.dn, "raw_attributes": written})
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

        def operation(conn: Any) -> int:
            for index, (kind, target, data, assertion) in enumerate(operations):
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
        stored = self._stored(entry) if entry is not None else None
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
            provenance = stored.provenance or Provenance(KeySource.ADMIN_EDIT, "", 0)
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
        if judged is not None and _text(entry, "entryCSN") != judged:
            raise Changed(f"{dn} changed meanwhile")
        self._modify(dn, _withhold_changes(entry, reason), assertion=_unchanged(entry))
        self._release_claims(dn, {v.upper() for v in (*_texts(entry, "gpgFingerprint"),
                                                      *_texts(entry, "gpgSubFingerprint"))})
        log.warning("key of %s withheld: %s", dn, reason)

    def remove_key(self, user: User) -> StoredKey:
        """Remove the user's published key, everything derived from it and its claims.
        NotFound when the entry publishes none (a withheld key is cleared all the same).
        A user read with its key (`User.snapshot`) is removed only if its entry has not
        been written since (else DirectoryUnavailable: decide again)."""
        entry = self._read_entry(user.dn, ["objectClass", "entryCSN", *KEY_ATTRIBUTES,
                                           PREFER_ENCRYPT])
        judged = _text({"raw_attributes": user.snapshot}, "entryCSN") if user.snapshot else None
        if entry is not None and judged is not None and _text(entry, "entryCSN") != judged:
            raise Changed(f"{user.dn} changed meanwhile")
        stored = self._stored(entry) if entry is not None else None
        if entry is not None:
            self._clear_key(entry)
        if stored is None:
            raise NotFound(f"{user.dn} has no published key")
        return stored

    def _clear_key(self, entry: dict[str, Any]) -> None:
        """One modify that empties every key attribute present; then release the claims.
        The object class goes too unless prefer-encrypt keeps it."""
        dn = entry["dn"]
        changes: Changes = {name: (REPLACE, []) for name in KEY_ATTRIBUTES
                            if _values(entry, name)}
        if not _values(entry, PREFER_ENCRYPT) and KEY_CLASS.lower() in {
                c.lower() for c in _texts(entry, "objectClass")}:
            changes["objectClass"] = (DELETE, [KEY_CLASS])
        if changes:
            self._modify(dn, changes, assertion=_unchanged(entry))
        self._release_claims(dn, {v.upper() for v in (
            *_texts(entry, "gpgFingerprint"), *_texts(entry, "gpgSubFingerprint"))})

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
        return _text(entry, PREFER_ENCRYPT) if entry is not None else None

    def set_prefer_encrypt(self, user: User, value: str | None) -> None:
        """Set (mutual or nopreference) or clear the user's Autocrypt prefer-encrypt."""
        if value not in (None, "mutual", "nopreference"):
            raise Refused(f"prefer-encrypt must be mutual or nopreference, not {value!r}")
        entry = self._read_entry(user.dn, ["objectClass", "pgpKey", PREFER_ENCRYPT])
        if entry is None:
            raise NotFound(f"no entry {user.dn}")
        has_class = KEY_CLASS.lower() in {c.lower() for c in _texts(entry, "objectClass")}
        changes: Changes = {}
        if value or _values(entry, PREFER_ENCRYPT):
            changes[PREFER_ENCRYPT] = (REPLACE, [value] if value else [])
        if value and not has_class:
            changes["objectClass"] = (ADD, [KEY_CLASS])
        elif not value and has_class and not _values(entry, "pgpKey"):
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
        if not _NONCE.match(request.nonce):
            raise Refused("malformed nonce")
        now = request.created
        value = escape_filter_chars(str(request.address))
        existing = {_dn_key(r.dn): r for r in self._pending_entries(f"(wkdAddress={value})")}
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
            current = existing.get(_dn_key(dn))
            if current is not None and current.expires > now:
                continue
            if current is not None:
                self._delete_pending_dn(dn, f"(wkdNonce={escape_filter_chars(current.nonce)})")
            if self._add_pending(dn, attributes):
                return dataclasses.replace(request, dn=dn)
        raise RateLimited(f"{request.address} has {limit} unconfirmed requests already")

    def _add_pending(self, dn: str, attributes: dict[str, list[str | bytes]]) -> bool:
        addlist = [(name, _encode(values)) for name, values in attributes.items()]
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
        if not _NONCE.match(nonce):
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

    def take_pending(self, nonce: str, address: Address, now: int | None = None,
                     ) -> PendingRequest:
        """Fetch and delete a request: of two concurrent takers only one gets it."""
        request = self.get_pending(nonce, address, now)
        self.delete_pending(request)
        return request

    def _pending_entries(self, filt: str, *, with_key: bool = False) -> list[PendingRequest]:
        attributes = ["wkdNonce", "wkdAddress", "wkdFingerprint", "wkdCreated", "wkdExpires"]
        entries = self._search(self.config.pending_base, f"(&(objectClass={PENDING_CLASS}){filt})",
                               [*attributes, "wkdSubmittedKey"] if with_key else attributes)
        found = []
        for entry in entries:
            keys = _values(entry, "wkdSubmittedKey")
            try:
                found.append(PendingRequest(
                    _text(entry, "wkdNonce") or "",
                    Address.parse(_text(entry, "wkdAddress") or ""),
                    Fingerprint.parse(_text(entry, "wkdFingerprint") or ""),
                    keys[0] if keys else b"",
                    parse_gnupg_time(_text(entry, "wkdCreated") or "") or 0,
                    parse_gnupg_time(_text(entry, "wkdExpires") or "") or 0, entry["dn"]))
            except Refused:
                log.warning("ignoring malformed pending request %s", entry["dn"])
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
        return sum(self._delete_pending_dn(entry["dn"], expired) for entry in entries)

    # -- changes ----------------------------------------------------------------------

    def _suffix_dn(self) -> str:
        if self._suffix is None:
            dn = self.config.base_dn
            while dn:
                entry = self._read_entry(dn, ["contextCSN"])
                if entry is not None and _values(entry, "contextCSN"):
                    self._suffix = dn
                    break
                dn = dn.partition(",")[2]
            else:
                raise DirectoryError(f"no readable contextCSN at or above {self.config.base_dn}"
                                     " (syncprov overlay missing, or no read access)")
        return self._suffix

    def change_token(self) -> str:
        """An opaque string that changes whenever anything in the database is written."""
        entry = self._read_entry(self._suffix_dn(), ["contextCSN"])
        values = sorted(_texts(entry, "contextCSN")) if entry is not None else []
        return "|".join(values)

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
            paging = SimplePagedResultsControl(True, size=_PAGE_SIZE, cookie=b"")
            visited = 0
            while True:
                msgid = conn.search_ext(self.config.base_dn, SUBTREE, f"(&{filt})",
                                        attributes, serverctrls=[paging], timeout=timeout)
                _type, data, _id, controls = conn.result3(msgid, all=1, timeout=timeout)
                for dn, raw in data:
                    if dn is None:
                        continue
                    entry = {"dn": dn, "raw_attributes": raw}
                    values = [v for name in self.config.mail_attributes
                              for v in _texts(entry, name)]
                    visit(User(dn, _addresses(values, dn), raw),
                          max(_texts(entry, "entryCSN"), default=""))
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
