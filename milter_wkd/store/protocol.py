"""`KeyStore`: exactly what the mail flows, the publication use case and the CLI need of a
key store. `LdapStore` (store.ldapstore) is the real one, `MemoryStore` (store.memory) the
one unit tests use; tests/contract runs the same cases against both.

Every method may raise `DirectoryUnavailable` (a temporary failure: the caller answers
451 or exits 75); the other errors are named per method.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from milter_wkd.openpgp import CleanResult, Limits
from milter_wkd.store.model import PendingRequest, Provenance, StoredKey, User
from milter_wkd.values import Address, Fingerprint


class KeyStore(Protocol):
    def find_user(self, address: Address, *, with_key: bool = False,
                  holders_of: Sequence[Fingerprint] = ()) -> User | None:
        """The user whose addresses include address (None: nobody's); Conflict when two
        entries own it. with_key and holders_of let a store read, in the same round trip,
        what `current_key` and `publish_key` need next."""
        ...

    def user(self, address: Address) -> User:
        """Like find_user, but NotFound when nobody has the address."""
        ...

    def current_key(self, user: User) -> StoredKey | None:
        """The key the user's entry publishes (as read with the user, if it was)."""
        ...

    def get_key(self, user: User) -> StoredKey | None:
        """The key the user's entry publishes, read now."""
        ...

    def list_keys(self) -> Iterator[StoredKey]:
        """Every published key (disabled ones too)."""
        ...

    def publish_key(self, user: User, cleaned: CleanResult, provenance: Provenance, *,
                    consume: PendingRequest | None = None, limits: Limits = ...,
                    ) -> StoredKey:
        """Store a cleaned key on the user's entry, replacing its key, after claiming its
        key material (README, security model): KeyRefused for an address that is not the
        user's or no address at all; Conflict for material another entry holds proven;
        an unproven subkey held elsewhere is left out (`StoredKey.withheld`); a proven
        one displaces an unproven holder. consume: a pending request used up in the same
        publication (NotFound when it is used or gone). Changed (a DirectoryUnavailable)
        when the entry changed meanwhile: decide again."""
        ...

    def remove_key(self, user: User) -> StoredKey:
        """Unpublish the user's key and release its claims; NotFound when it has none."""
        ...

    def set_disabled(self, user: User, disabled: bool) -> StoredKey:
        """An administrator's decision: a disabled key is kept but not served."""
        ...

    def create_pending(self, request: PendingRequest, *, limit: int) -> PendingRequest:
        """Store a WKS request; RateLimited when its address has `limit` unexpired ones."""
        ...

    def get_pending(self, nonce: str, address: Address, now: int | None = None,
                    ) -> PendingRequest:
        """The unexpired, unused request for address with this nonce (compared in constant
        time with the stored ones); NotFound otherwise, Refused for a malformed nonce."""
        ...

    def delete_pending(self, request: PendingRequest) -> None:
        """NotFound when it is gone already."""
        ...

    def list_pending(self) -> list[PendingRequest]:
        """Every pending request (without the submitted keys), oldest first."""
        ...

    def expire_pending(self, now: int | None = None) -> int:
        """Delete the requests expired at or before now; how many."""
        ...

    def change_token(self) -> str:
        """An opaque value that changes on every write (caches compare it)."""
        ...

    def close(self) -> None:
        ...
