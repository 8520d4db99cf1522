"""`MemoryStore`: the key store in memory, for unit tests of the flows (MailService, the
publication use case, the CLI) and for trying things without slapd.

It keeps the same rules as `LdapStore` (tests/contract runs one suite against both): users
own their addresses (case-insensitive local part handling as `Address.key`), a key is
stored as the same attribute values LDAP would hold and read back through the one rule of
`store.schema.stored_key`, claims follow `store.model.plan_claims`, pending requests keep
the per-address cap and are used up once. Every write happens under one lock, so what LDAP
makes atomic with adds and assertions is atomic here too. It is also a `KeyView` (the
responder's read side) over what it publishes.

Failures: the same exceptions as `LdapStore` for the same cases; `down = True` makes every
call raise DirectoryUnavailable (a directory that does not answer).
"""

from __future__ import annotations

import dataclasses
import hmac
import threading
import time
from collections.abc import Iterator, Sequence

from milter_wkd.errors import (
    Changed,
    Conflict,
    DirectoryUnavailable,
    KeyRefused,
    NotFound,
    RateLimited,
    Refused,
)
from milter_wkd.openpgp import DEFAULT_LIMITS, CleanResult, Limits, clean_key, without_subkeys
from milter_wkd.store.model import (
    Claim,
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
    PREFER_ENCRYPT,
    Entry,
    address_slot,
    published_addresses,
    published_values,
    stored_key,
)
from milter_wkd.store.view import Change, Published
from milter_wkd.values import Address, Fingerprint


@dataclasses.dataclass(slots=True)
class _Held:
    """A user's entry: addresses, key attributes as LDAP would hold them, CSN."""

    dn: str
    addresses: tuple[Address, ...]
    attributes: dict[str, list[bytes]] = dataclasses.field(default_factory=dict)
    primary: str = ""  # hex of the published key's primary, "" when none
    subkeys: frozenset[str] = frozenset()
    csn: str = ""


class MemoryStore:
    """A KeyStore (store.protocol) and a KeyView (store.view) in memory. Thread-safe."""

    def __init__(self, users: dict[str, Sequence[str]] | None = None) -> None:
        self._lock = threading.RLock()
        self._entries: dict[str, _Held] = {}
        self._claims: dict[str, Claim] = {}
        self._pending: dict[str, PendingRequest] = {}
        self._counter = 0
        self.down = False
        for dn, addresses in (users or {}).items():
            self.add_user(dn, *addresses)

    # -- bookkeeping ----------------------------------------------------------------------

    def add_user(self, dn: str, *addresses: str) -> User:
        with self._lock:
            held = _Held(dn, tuple(Address.parse(a) for a in addresses), csn=self._tick())
            self._entries[dn_key(dn)] = held
            return User(dn, held.addresses)

    def _tick(self) -> str:
        self._counter += 1
        return f"2026{self._counter:010d}.000000Z#000000#000#000000"

    def _check(self) -> None:
        if self.down:
            raise DirectoryUnavailable("the in-memory directory is down (test)")

    def _entry(self, dn: str) -> _Held:
        held = self._entries.get(dn_key(dn))
        if held is None:
            raise NotFound(f"no entry {dn}")
        return held

    def _stored(self, held: _Held) -> StoredKey | None:
        return stored_key(Entry(held.dn, held.attributes))

    def close(self) -> None:
        pass

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- users and keys -------------------------------------------------------------------

    def find_user(self, address: Address, *, with_key: bool = False,
                  holders_of: Sequence[Fingerprint] = ()) -> User | None:
        with self._lock:
            self._check()
            found = [h for h in self._entries.values()
                     if any(a.key == address.key for a in h.addresses)]
            if len(found) > 1:
                raise Conflict(f"{address} belongs to {len(found)} directory entries")
            return User(found[0].dn, found[0].addresses) if found else None

    def user(self, address: Address) -> User:
        found = self.find_user(address)
        if found is None:
            raise NotFound(f"no user has the address {address}")
        return found

    def current_key(self, user: User) -> StoredKey | None:
        return self.get_key(user)

    def get_key(self, user: User) -> StoredKey | None:
        with self._lock:
            self._check()
            held = self._entries.get(dn_key(user.dn))
            return self._stored(held) if held is not None else None

    def key_for(self, address: Address) -> StoredKey | None:
        found = self.find_user(address)
        return self.get_key(found) if found is not None else None

    def list_keys(self) -> Iterator[StoredKey]:
        with self._lock:
            self._check()
            found = [self._stored(h) for h in self._entries.values()]
        yield from (k for k in found if k is not None)

    def _holdings(self, wanted: Sequence[str]) -> Holdings:
        asked = frozenset(wanted)
        attributes: dict[str, list[tuple[str, bool]]] = {}
        for held in self._entries.values():
            for fpr in ({held.primary} | held.subkeys) & asked:
                attributes.setdefault(fpr, []).append((held.dn, fpr == held.primary))
        return Holdings(asked, {f: c for f, c in self._claims.items() if f in asked},
                        {f: tuple(h) for f, h in attributes.items()})

    def publish_key(self, user: User, cleaned: CleanResult, provenance: Provenance, *,
                    consume: PendingRequest | None = None,
                    limits: Limits = DEFAULT_LIMITS) -> StoredKey:
        info = cleaned.info
        foreign = [str(a) for a in info.addresses if not user.owns(a)]
        if foreign:
            raise KeyRefused(f"the key names addresses of someone else: {', '.join(foreign)}")
        if not info.addresses:
            raise KeyRefused("the key has no user ID with an address of its owner")
        with self._lock:
            self._check()
            held = self._entry(user.dn)
            wanted = wanted_claims(info)
            plan = plan_claims(held.dn, wanted, self._holdings(list(wanted)),
                               provenance.published)
            if plan.conflict is not None:
                raise Conflict(plan.conflict)
            if plan.busy is not None:  # the same rule as LdapStore's, though every write
                raise Changed(plan.busy)  # here is whole under the lock
            if consume is not None:
                stored_request = self._pending.get(consume.dn)
                if (stored_request is None or stored_request.nonce != consume.nonce
                        or stored_request.expires < provenance.published):
                    raise NotFound("this confirmation was used already")
            final = without_subkeys(cleaned, {Fingerprint.parse(f): reason
                                              for f, reason in plan.drop.items()})
            displaced: dict[str, set[str]] = {}
            for holder, fpr in plan.displace:
                displaced.setdefault(holder, set()).add(fpr)
            for holder, fprs in displaced.items():
                self._strip(self._entry(holder), fprs, limits)
            disabled = held.attributes.get("pgpDisabled") == [b"1"]
            self._write(held, final, provenance, disabled)
            for fpr, kind in plan.add.items():
                self._claims[fpr] = Claim(fpr, held.dn, kind, provenance.published)
            for fpr, (_claim, kind) in (*plan.take.items(), *plan.own.items()):
                self._claims[fpr] = Claim(fpr, held.dn, kind, provenance.published)
            if consume is not None:
                self._pending.pop(consume.dn, None)
            stored = self._stored(held)
            if stored is None:
                raise AssertionError("a key just written does not read back")
            return dataclasses.replace(stored, withheld=tuple(
                (Fingerprint.parse(f), reason) for f, reason in plan.drop.items()))

    def _write(self, held: _Held, cleaned: CleanResult, provenance: Provenance,
               disabled: bool) -> None:
        previous = {held.primary} | held.subkeys
        values = published_values(cleaned, provenance, disabled=disabled)
        prefer = held.attributes.get(PREFER_ENCRYPT)
        held.attributes = {n: [v.encode() for v in vs] for n, vs in values.items() if vs}
        if prefer:
            held.attributes[PREFER_ENCRYPT] = prefer
        held.primary = cleaned.info.fingerprint.hex
        held.subkeys = frozenset(f.hex for f in key_fingerprints(cleaned.info)[1:])
        held.csn = self._tick()
        self._release(held.dn, previous - {held.primary} - held.subkeys)

    def _strip(self, held: _Held, fingerprints: set[str], limits: Limits) -> None:
        stored = self._stored(held)
        if stored is None:
            return
        try:
            cleaned = without_subkeys(clean_key(stored.key, None, limits=limits), {
                Fingerprint.parse(f): f"subkey {f}: another entry proved it holds it"
                for f in fingerprints})
            if cleaned.info.fingerprint.hex in fingerprints:
                raise KeyRefused("its primary key is held by another entry")
        except Refused as exc:
            self._clear(held, problem=f"the key no longer passes: {exc.reason}")
            return
        self._write(held, cleaned, stored.provenance or Provenance(KeyOrigin.ADMIN_EDIT, "", 0),
                    stored.disabled)

    def _release(self, dn: str, fingerprints: set[str]) -> None:
        for fpr in fingerprints:
            claim = self._claims.get(fpr)
            if claim is not None and dn_key(claim.holder) == dn_key(dn):
                del self._claims[fpr]

    def _clear(self, held: _Held, *, problem: str | None = None) -> None:
        self._release(held.dn, {held.primary} | held.subkeys)
        kept = {n: v for n, v in held.attributes.items()
                if n == PREFER_ENCRYPT or (problem is not None and n in ("pgpKey",
                                                                         "pgpDisabled"))}
        if problem is not None:
            kept["wkdKeyProblem"] = [problem.encode()]
        held.attributes = kept
        held.primary, held.subkeys = "", frozenset()
        held.csn = self._tick()

    def remove_key(self, user: User) -> StoredKey:
        with self._lock:
            self._check()
            held = self._entry(user.dn)
            stored = self._stored(held)
            self._clear(held)
            if stored is None:
                raise NotFound(f"{user.dn} has no published key")
            return stored

    def set_disabled(self, user: User, disabled: bool) -> StoredKey:
        with self._lock:
            self._check()
            held = self._entry(user.dn)
            if self._stored(held) is None:
                raise NotFound(f"{user.dn} has no published key")
            held.attributes["pgpDisabled"] = [b"1" if disabled else b"0"]
            held.csn = self._tick()
            stored = self._stored(held)
            if stored is None:
                raise AssertionError("a key just enabled or disabled does not read back")
            return stored

    def set_prefer_encrypt(self, user: User, value: str | None) -> None:
        if value not in (None, "mutual", "nopreference"):
            raise Refused(f"prefer-encrypt must be mutual or nopreference, not {value!r}")
        with self._lock:
            self._check()
            held = self._entry(user.dn)
            if value:
                held.attributes[PREFER_ENCRYPT] = [value.encode()]
            else:
                held.attributes.pop(PREFER_ENCRYPT, None)
            held.csn = self._tick()

    def get_prefer_encrypt(self, user: User) -> str | None:
        with self._lock:
            values = self._entry(user.dn).attributes.get(PREFER_ENCRYPT)
            return values[0].decode() if values else None

    # -- pending requests -----------------------------------------------------------------

    def create_pending(self, request: PendingRequest, *, limit: int) -> PendingRequest:
        if not valid_nonce(request.nonce):
            raise Refused("malformed nonce")
        with self._lock:
            self._check()
            now = request.created
            for slot in range(1, limit + 1):
                dn = f"cn={slot}.{address_slot(request.address)}"
                current = self._pending.get(dn)
                if current is None or current.expires <= now:
                    stored = dataclasses.replace(request, dn=dn)
                    self._pending[dn] = stored
                    self._tick()
                    return stored
            raise RateLimited(f"{request.address} has {limit} unconfirmed requests already")

    def get_pending(self, nonce: str, address: Address, now: int | None = None,
                    ) -> PendingRequest:
        now = int(time.time()) if now is None else now
        if not valid_nonce(nonce):
            raise Refused("malformed nonce")
        with self._lock:
            self._check()
            found = None
            for request in self._pending.values():
                if request.address.key != address.key:
                    continue
                if (hmac.compare_digest(request.nonce.encode(), nonce.encode())
                        and request.expires > now):
                    found = request
            if found is None:
                raise NotFound("no pending request for this nonce and address")
            return found

    def delete_pending(self, request: PendingRequest) -> None:
        with self._lock:
            self._check()
            current = self._pending.get(request.dn)
            if current is None or current.nonce != request.nonce:
                raise NotFound("no pending request for this nonce")
            del self._pending[request.dn]
            self._tick()

    def list_pending(self) -> list[PendingRequest]:
        with self._lock:
            self._check()
            return sorted((dataclasses.replace(r, key=b"") for r in self._pending.values()),
                          key=lambda r: r.created)

    def expire_pending(self, now: int | None = None) -> int:
        now = int(time.time()) if now is None else now
        with self._lock:
            self._check()
            expired = [dn for dn, r in self._pending.items() if r.expires <= now]
            for dn in expired:
                del self._pending[dn]
            if expired:
                self._tick()
            return len(expired)

    # -- changes, and the responder's KeyView ---------------------------------------------

    def change_token(self) -> str:
        with self._lock:
            self._check()
            return f"2026{self._counter:010d}.000000Z#000000#000#000000"

    def _published(self, held: _Held) -> Published | None:
        stored = self._stored(held)
        if stored is None or stored.disabled:
            return None
        entry = Entry(held.dn, held.attributes)
        return Published(held.dn, published_addresses(entry), entry.values("pgpKey")[0],
                         held.csn)

    def changes_since(self, token: str) -> list[Change]:
        with self._lock:
            self._check()
            changes = []
            for held in self._entries.values():
                if held.csn >= token:
                    published = self._published(held)
                    slots = frozenset(published.slots()) if published else frozenset()
                    changes.append(Change(held.dn, held.csn, slots, published))
            return changes

    def lookup(self, slot: str, local_hint: str | None = None) -> list[Published]:
        return [p for p in self.iter_published() if slot in p.slots()]

    def lookup_fingerprint(self, fingerprint: str) -> list[Published]:
        wanted = fingerprint.upper()
        with self._lock:
            self._check()
            held = [h for h in self._entries.values()
                    if any(f == wanted or (len(wanted) == 16 and f[-16:] == wanted)
                           for f in (h.primary, *h.subkeys) if f)]
            found = [self._published(h) for h in held]
        return [p for p in found if p is not None]

    def iter_published(self) -> Iterator[Published]:
        with self._lock:
            self._check()
            found = [self._published(h) for h in self._entries.values()]
        yield from (p for p in found if p is not None)

    def published_dns(self) -> set[str]:
        return {p.dn for p in self.iter_published()}

