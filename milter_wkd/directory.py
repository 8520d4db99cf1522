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
  provenance (wkdKeySource, wkdKeySourceActor, wkdKeyPublished) - all in ONE modify
  request, so a reader sees the old key or the new one, never a mix;
- pending WKS requests: entries `wkdNonce=<nonce>,<pending_base>` (create, fetch by nonce
  and address, take once, delete, expire);
- `change_token()`: contextCSN of the suffix (syncprov), which changes on every write.

`ConnectionPool`, `close_connection`, `ldap_reason`, `CONNECTION_ERRORS` and
`RESULT_NAMES` are shared with the WKD responder's source (`web.ldap_source`) and `check`,
so every LDAP connection of the project is opened and reported the same way.

Configuration: the [directory] section (uri ldap://, ldaps:// or ldapi://; bind_dn and
bind_password(_file) for a simple bind, else SASL EXTERNAL on ldapi://; ca_file; base_dn;
user_filter; mail_attributes; pending_base; timeout; pool_size).

Failures: no answer within `timeout` seconds, a refused connection, a broken one (slapd
restarted: an operation on a stale pooled connection is retried once on a fresh one;
modifies are idempotent, and an add or delete whose first attempt did go through reports
Conflict or NotFound on the retry), a refused bind or a busy server raise
`DirectoryUnavailable` (callers answer with a temporary failure); an
unknown user, key or request is `NotFound`; an address owned by two entries, a
fingerprint published by another user or an existing nonce is `Conflict`; a key the
directory itself refuses (constraint overlay) is `KeyRefused`; any other LDAP error is
`DirectoryError`.
"""

from __future__ import annotations

import calendar
import contextlib
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
from ldap.dn import escape_dn_chars
from ldap.filter import escape_filter_chars

from milter_wkd.config import DirectoryConfig
from milter_wkd.errors import (
    BadAddress,
    Conflict,
    DirectoryError,
    DirectoryUnavailable,
    KeyRefused,
    NotFound,
    Refused,
)
from milter_wkd.openpgp import CleanResult, KeyInfo, armor_key
from milter_wkd.openpgp.packets import dearmor
from milter_wkd.values import Address, Fingerprint
from milter_wkd.wkd import address_hash

log = logging.getLogger(__name__)

T = TypeVar("T")

KEY_CLASS = "wkdKeyHolder"
PENDING_CLASS = "wkdPendingRequest"
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
KEY_ATTRIBUTES = (*GNUPG_ATTRIBUTES, "wkdAddressHash", *PROVENANCE_ATTRIBUTES)
PREFER_ENCRYPT = "wkdPreferEncrypt"

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
    # A fingerprint and the DNs of the entries that held it, read with the user
    # (find_user with holders_of): publishing that key needs no search of its own.
    holders: tuple[Fingerprint, tuple[str, ...]] | None = field(
        default=None, compare=False, repr=False)

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


@dataclass(frozen=True, slots=True)
class PendingRequest:
    nonce: str
    address: Address
    fingerprint: Fingerprint
    key: bytes  # binary OpenPGP, as cleaned at submission
    created: int
    expires: int


# -- value formats ---------------------------------------------------------------------


def gnupg_time(epoch: int) -> str:
    """GnuPG's LDAP time format (also a valid GeneralizedTime): YYYYMMDDHHMMSSZ in UTC."""
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(epoch))


def parse_gnupg_time(text: str) -> int | None:
    match = re.fullmatch(r"(\d{14})(?:\.\d+)?Z", text.strip())
    if not match:
        return None
    return calendar.timegm(time.strptime(match.group(1), "%Y%m%d%H%M%S"))


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
    for key, values in entry.get("raw_attributes", {}).items():
        if key.lower() == name.lower():
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


class Directory:
    """The directory store. Thread-safe; every method may raise DirectoryUnavailable."""

    def __init__(self, config: DirectoryConfig) -> None:
        if not config.mail_attributes:
            raise DirectoryError("[directory] mail_attributes must name at least one attribute")
        self.config = config
        self._pool = ConnectionPool(config)
        self._suffix: str | None = None

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

    def _modify(self, dn: str, changes: Changes) -> None:
        modlist = [(kind, name, _encode(values) or None)
                   for name, (kind, values) in changes.items()]
        try:
            self._call(lambda conn: conn.modify_ext_s(dn, modlist))
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
                  holders_of: Fingerprint | None = None) -> User | None:
        """The user whose mail attributes hold address; None if nobody's do.

        with_key: read the published key in the same search (`User.snapshot`), for a
        caller that goes on to `current_key` and `publish_key` at once. holders_of: also
        find, in the same round trip, which entries hold that fingerprint (`User.holders`,
        for `publish_key`'s check).
        """
        attributes = list(self.config.mail_attributes)
        if with_key:
            attributes += ["objectClass", *KEY_ATTRIBUTES, PREFER_ENCRYPT]
        queries: list[tuple[str, str, Sequence[str], int]] = [
            (self.config.base_dn, self._address_filter(address), attributes, SUBTREE)]
        if holders_of is not None:
            queries.append(self._holders_query(holders_of))
        entries, *holders = self._searches(queries)
        if len(entries) > 1:
            raise Conflict(f"{address} belongs to {len(entries)} directory entries")
        if not entries:
            return None
        entry = entries[0]
        values = [v for name in self.config.mail_attributes for v in _texts(entry, name)]
        return User(entry["dn"], _addresses(values, entry["dn"]),
                    entry["raw_attributes"] if with_key else None,
                    (holders_of, tuple(h["dn"] for h in holders[0]))
                    if holders_of is not None else None)

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
        armored = _values(entry, "pgpKey")
        fingerprint = _text(entry, "gpgFingerprint")
        if not armored or not fingerprint:
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

    def _holders_query(self, fingerprint: Fingerprint,
                       ) -> tuple[str, str, Sequence[str], int]:
        value = escape_filter_chars(fingerprint.hex)
        return (self.config.base_dn, f"(|(gpgFingerprint={value})(gpgSubFingerprint={value}))",
                ["1.1"], SUBTREE)

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

    def publish_key(self, user: User, cleaned: CleanResult, provenance: Provenance) -> StoredKey:
        """Store a cleaned key on the user's entry, replacing any key there (one modify).

        Every address of the key must be one of the user's; the fingerprint must not be
        published by another entry (Conflict).
        """
        info = cleaned.info
        foreign = [str(a) for a in info.addresses if not user.owns(a)]
        if foreign:
            raise KeyRefused(f"the key names addresses of someone else: {', '.join(foreign)}")
        if not info.addresses:
            raise KeyRefused("the key has no user ID with an address of its owner")
        if user.holders is not None and user.holders[0] == info.fingerprint:
            holders = user.holders[1]
        else:
            holders = tuple(h["dn"] for h in self._searches(
                [self._holders_query(info.fingerprint)])[0])
        if any(dn.lower() != user.dn.lower() for dn in holders):
            raise Conflict(f"key {info.fingerprint} is published by another user already")
        entry = ({"dn": user.dn, "raw_attributes": user.snapshot} if user.snapshot is not None
                 else self._read_entry(user.dn, ["objectClass", "pgpDisabled", PREFER_ENCRYPT]))
        if entry is None:
            raise NotFound(f"no entry {user.dn}")
        classes = {c.lower() for c in _texts(entry, "objectClass")}
        values: dict[str, list[str]] = key_attributes(info, armor_key(cleaned.key))
        values["pgpDisabled"] = [_text(entry, "pgpDisabled") or "0"]
        values["wkdKeySource"] = [provenance.source.value]
        values["wkdKeySourceActor"] = [provenance.actor] if provenance.actor else []
        values["wkdKeyPublished"] = [gnupg_time(provenance.published)]
        changes: Changes = {name: (REPLACE, vals) for name, vals in values.items()}
        if KEY_CLASS.lower() not in classes:
            changes["objectClass"] = (ADD, [KEY_CLASS])
        self._modify(user.dn, changes)
        # What a read-back would return, without the round trip: the values just written.
        written = {name: _encode(vals) for name, vals in values.items()}
        written[PREFER_ENCRYPT] = _values(entry, PREFER_ENCRYPT)
        stored = self._stored({"dn": user.dn, "raw_attributes": written})
        if stored is None:
            raise DirectoryError(f"the key written to {user.dn} cannot be parsed back")
        return stored

    def remove_key(self, user: User) -> StoredKey:
        """Remove the user's published key and everything derived from it (one modify)."""
        entry = self._read_entry(user.dn, ["objectClass", *KEY_ATTRIBUTES, PREFER_ENCRYPT])
        stored = self._stored(entry) if entry is not None else None
        if entry is None or stored is None:
            raise NotFound(f"{user.dn} has no published key")
        changes: Changes = {name: (REPLACE, []) for name in KEY_ATTRIBUTES
                            if _values(entry, name)}
        if not _values(entry, PREFER_ENCRYPT):
            changes["objectClass"] = (DELETE, [KEY_CLASS])
        self._modify(user.dn, changes)
        return stored

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

    def _pending_dn(self, nonce: str) -> str:
        if not _NONCE.match(nonce):
            raise Refused("malformed nonce")
        return f"wkdNonce={escape_dn_chars(nonce)},{self.config.pending_base}"

    def create_pending(self, request: PendingRequest) -> None:
        """Store a pending request; Conflict if its nonce exists already."""
        dn = self._pending_dn(request.nonce)
        attributes: dict[str, list[str | bytes]] = {
            "objectClass": [PENDING_CLASS], "wkdNonce": [request.nonce],
            "wkdAddress": [str(request.address)], "wkdFingerprint": [request.fingerprint.hex],
            "wkdSubmittedKey": [request.key], "wkdCreated": [gnupg_time(request.created)],
            "wkdExpires": [gnupg_time(request.expires)],
        }
        addlist = [(name, _encode(values)) for name, values in attributes.items()]
        try:
            self._call(lambda conn: conn.add_ext_s(dn, addlist))
        except ldap.ALREADY_EXISTS:
            raise Conflict("a pending request with this nonce exists already") from None
        except ldap.LDAPError as exc:
            raise DirectoryError(
                f"storing the pending request failed: {ldap_reason(exc)}") from None

    def get_pending(self, nonce: str, address: Address, now: int | None = None,
                    ) -> PendingRequest:
        """The unexpired request with this nonce for this address, else NotFound."""
        now = int(time.time()) if now is None else now
        entry = self._read_entry(self._pending_dn(nonce), [
            "wkdNonce", "wkdAddress", "wkdFingerprint", "wkdSubmittedKey", "wkdCreated",
            "wkdExpires"])
        missing = NotFound("no pending request for this nonce and address")
        if entry is None:
            raise missing
        try:
            stored_address = Address.parse(_text(entry, "wkdAddress") or "")
            fingerprint = Fingerprint.parse(_text(entry, "wkdFingerprint") or "")
        except Refused:
            raise missing from None
        expires = parse_gnupg_time(_text(entry, "wkdExpires") or "") or 0
        if stored_address.key != address.key or expires <= now:
            raise missing
        keys = _values(entry, "wkdSubmittedKey")
        return PendingRequest(nonce, stored_address, fingerprint, keys[0] if keys else b"",
                              parse_gnupg_time(_text(entry, "wkdCreated") or "") or 0, expires)

    def delete_pending(self, nonce: str) -> None:
        """Delete a pending request; NotFound if it is gone (e.g. taken by someone else)."""
        dn = self._pending_dn(nonce)
        try:
            self._call(lambda conn: conn.delete_ext_s(dn))
        except ldap.NO_SUCH_OBJECT:
            raise NotFound("no pending request for this nonce") from None
        except ldap.LDAPError as exc:
            raise DirectoryError(f"deleting {dn} failed: {ldap_reason(exc)}") from None

    def take_pending(self, nonce: str, address: Address, now: int | None = None,
                     ) -> PendingRequest:
        """Fetch and delete a request: of two concurrent takers only one gets it."""
        request = self.get_pending(nonce, address, now)
        self.delete_pending(nonce)
        return request

    def _pending_entries(self, filt: str) -> list[PendingRequest]:
        entries = self._search(self.config.pending_base, f"(&(objectClass={PENDING_CLASS}){filt})",
                               ["wkdNonce", "wkdAddress", "wkdFingerprint", "wkdCreated",
                                "wkdExpires"])
        found = []
        for entry in entries:
            try:
                found.append(PendingRequest(
                    _text(entry, "wkdNonce") or "",
                    Address.parse(_text(entry, "wkdAddress") or ""),
                    Fingerprint.parse(_text(entry, "wkdFingerprint") or ""), b"",
                    parse_gnupg_time(_text(entry, "wkdCreated") or "") or 0,
                    parse_gnupg_time(_text(entry, "wkdExpires") or "") or 0))
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
        entries = self._search(self.config.pending_base,
                               f"(&(objectClass={PENDING_CLASS})(wkdExpires<={gnupg_time(now)}))",
                               ["1.1"])
        removed = 0
        for entry in entries:
            with contextlib.suppress(NotFound):
                nonce = entry["dn"].split(",", 1)[0].partition("=")[2]
                self.delete_pending(nonce)
                removed += 1
        return removed

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
