"""Mail that is not for a submission address: our users' outgoing mail gets an Autocrypt
header and, optionally, our DKIM signature; other mail may lose Autocrypt headers that
claim one of our domains.

- Autocrypt ([milter] autocrypt): when the single From address is on one of our domains,
  has a published, valid key, the mail is no report (multipart/report) and the client does
  no OpenPGP itself, the header with that key's minimal form is added. A logged-in sender
  gets it only for a From address of their own. Our header is a fallback for clients without
  OpenPGP and must never contradict the key a client uses (issue #14), so a mail gets none
  when it has an Autocrypt or Chat-Version (Delta Chat) header, a top-level Content-Type
  multipart/encrypted or multipart/signed (any instance, if repeated), or a text/plain body
  with inline PGP armor at a line start in its first 8 KiB (autocrypt.client_does_openpgp;
  logged at INFO with the reason). The body is looked at only when the milter collected it,
  i.e. with dkim_sign_outgoing; without, headers decide alone and inline PGP gets a header.
- DKIM ([milter] dkim_sign_outgoing): signed with the From domain's keys only when the
  provider vouches for the From: the logged-in user owns it (mail or alias), or the mail
  comes from trusted_networks (webmail, which checks its users itself).
- Inbound ([milter] strip_inbound_autocrypt): mail from outside whose From is on one of our
  domains loses its Autocrypt headers (nobody outside speaks for our users' keys).

What the directory says per address is cached (`AutocryptCache`). Failure: never stops mail;
the directory or a key file unusable -> logged, the mail passes without header and unsigned.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from milter_wkd import autocrypt, dkim, openpgp
from milter_wkd.config import Config, ConfigError, DomainConfig
from milter_wkd.errors import Refused, Unavailable
from milter_wkd.replies import Accept, HeaderEdit, Reply
from milter_wkd.servicekeys import ServiceKeys
from milter_wkd.store.protocol import KeyStore
from milter_wkd.transaction import Transaction
from milter_wkd.values import Address

log = logging.getLogger(__name__)

# Seconds between two looks at the store's change token (one directory read): a key
# published or removed elsewhere (keys CLI, self-service page, the key follower) reaches the
# headers within this, while busy outgoing mail costs at most one read a second for it.
CHANGE_CHECK_INTERVAL = 1.0
# Addresses cached at most (least recently used dropped first): an entry holds a minimal key
# of a few KiB at most, so the cache stays within some tens of MiB however many users send.
MAX_CACHED_ADDRESSES = 10_000


@dataclass(frozen=True, slots=True)
class AutocryptEntry:
    """What the directory says about one From address, for the Autocrypt header and for
    whose the address is."""

    keydata: bytes | None         # the header's keydata; None: no header for this address
    owner_dn: str | None          # the directory user the address belongs to, if any
    prefer_mutual: bool | None    # the user's prefer-encrypt; None: [milter]'s default


class AutocryptCache:
    """Per-address AutocryptEntry, emptied when the store's change token moves (looked at
    at most every CHANGE_CHECK_INTERVAL seconds) and after our own publications; thread-safe.
    """

    def __init__(self, directory: KeyStore, clock: Callable[[], float]) -> None:
        self.directory = directory
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, AutocryptEntry] = OrderedDict()
        self._token: str | None = None
        self._checked = 0.0

    def forget(self) -> None:
        """Drop everything and look at the change token on the next lookup."""
        with self._lock:
            self._entries.clear()
            self._checked = 0.0

    def entry(self, address: Address) -> AutocryptEntry:
        """What the directory says about `address` (raises Unavailable when it is down)."""
        self._drop_if_changed()
        with self._lock:
            cached = self._entries.get(address.key)
            if cached is not None:
                self._entries.move_to_end(address.key)
                return cached
        found = self._look_up(address)
        with self._lock:
            self._entries[address.key] = found
            while len(self._entries) > MAX_CACHED_ADDRESSES:
                self._entries.popitem(last=False)
        return found

    def _drop_if_changed(self) -> None:
        now = self.clock()
        if now - self._checked < CHANGE_CHECK_INTERVAL:
            return
        token = self.directory.change_token()
        with self._lock:
            self._checked = now
            if token != self._token:
                self._entries.clear()
                self._token = token

    def _look_up(self, address: Address) -> AutocryptEntry:
        user = self.directory.find_user(address, with_key=True)
        if user is None:
            return AutocryptEntry(None, None, None)
        stored = self.directory.current_key(user)
        if stored is None or stored.revoked or stored.disabled:
            return AutocryptEntry(None, user.dn, None)
        try:
            keydata: bytes | None = openpgp.autocrypt_keydata(stored.key, address)
        except Refused as exc:
            log.info("no Autocrypt header for %s: %s", address, exc.reason)
            keydata = None
        prefer = stored.prefer_encrypt
        return AutocryptEntry(keydata, user.dn, None if prefer is None else prefer == "mutual")


class OutgoingMail:
    """Header edits for mail not to a submission address; thread-safe."""

    def __init__(self, config: Config, directory: KeyStore, keys: ServiceKeys, *,
                 clock: Callable[[], float]) -> None:
        self.config = config
        self.keys = keys
        self.autocrypt = AutocryptCache(directory, clock)
        self._domains: Mapping[str, DomainConfig] = {d.name.lower(): d for d in config.domains}

    def handle(self, tx: Transaction, *, ours: bool) -> Reply:
        """The edits for `tx`; `ours`: a user's mail (logged in, or from trusted_networks)."""
        try:
            return self._edits(tx, ours=ours)
        except (Unavailable, ConfigError, Refused) as exc:
            # The mail flows, without Autocrypt header and without our DKIM signature: the
            # directory decides who owns the From, and a header never stops mail.
            log.warning("no Autocrypt header, not DKIM-signed: %s", exc.reason)
            return Accept()

    def _edits(self, tx: Transaction, *, ours: bool) -> Reply:
        cfg = self.config.milter
        sender = autocrypt.single_from_address(tx.header_values("From"))
        existing = len(tx.header_values(autocrypt.HEADER))
        if not ours:
            if (cfg.strip_inbound_autocrypt and existing and sender is not None
                    and sender.domain in self._domains):
                log.info("removing %d Autocrypt header(s) claiming %s", existing, sender)
                return Accept(edits=tuple(HeaderEdit(autocrypt.HEADER, None, index)
                                          for index in range(existing, 0, -1)))
            return Accept()
        edits: list[HeaderEdit] = []
        if (cfg.autocrypt and sender is not None and sender.domain in self._domains
                and not autocrypt.is_multipart_report(_last(tx.header_values("Content-Type")))):
            edits.extend(self._autocrypt(tx, sender))
        if cfg.dkim_sign_outgoing and sender is not None:
            edits.extend(self._signatures(tx, sender, edits))
        return Accept(edits=tuple(edits))

    def _autocrypt(self, tx: Transaction, sender: Address) -> list[HeaderEdit]:
        """Our Autocrypt header for `sender`'s mail, unless the client does OpenPGP itself
        or the sender has no key (or the From is not the logged-in user's)."""
        reason = autocrypt.client_does_openpgp(tx.headers, _body_start(tx))
        if reason is not None:
            log.info("no Autocrypt header for %s: %s", sender, reason)
            return []
        entry = self.autocrypt.entry(sender)
        if entry.keydata is None or not self._sender_may_use(tx, entry):
            return []
        cfg = self.config.milter
        mutual = cfg.prefer_encrypt_mutual if entry.prefer_mutual is None \
            else entry.prefer_mutual
        value = autocrypt.build(sender, entry.keydata, prefer_encrypt_mutual=mutual)
        return [HeaderEdit(autocrypt.HEADER, value)]

    def _signatures(self, tx: Transaction, sender: Address, edits: list[HeaderEdit],
                    ) -> list[HeaderEdit]:
        """Our DKIM-Signature headers for the mail with `edits` applied, if we sign it."""
        domain = self._domains.get(sender.domain)
        keys = self.keys.dkim(domain) if domain is not None else ()
        # A signature says the provider vouches for the From: only for its owner.
        if not keys or tx.oversize or not self._owns_from(tx, sender):
            return []
        message = tx.raw_message([(e.name, e.value or "") for e in edits])
        # Inserted at the top, each in turn: the first key's ends up on top.
        signatures: list[HeaderEdit] = []
        for signature in reversed(dkim.signature_headers(message, keys)):
            name, _, value = signature.decode("ascii").partition(":")
            signatures.append(HeaderEdit(name, value.strip().replace("\r\n", "\n"), 0))
        return signatures

    def _owns_from(self, tx: Transaction, sender: Address) -> bool:
        """The mail may carry our DKIM signature: it comes from a trusted network, or the
        directory user of the SASL login owns the From address (mail or alias). The
        directory down raises Unavailable: the mail then goes out unsigned."""
        if not tx.sasl_login:
            return True  # ours without a login: a trusted network (webmail) vouches for it
        if self._sender_may_use(tx, self.autocrypt.entry(sender)):
            return True
        log.warning("not DKIM-signed: %s logged in, From %s is not theirs", tx.sasl_login,
                    sender)
        return False

    def _sender_may_use(self, tx: Transaction, sender: AutocryptEntry) -> bool:
        """A logged-in sender gets the header (and signature) only for From addresses that
        are their own."""
        if not tx.sasl_login:
            return True
        try:
            login_user = self.autocrypt.entry(Address.parse(tx.sasl_login))
        except Refused:
            return False
        return login_user.owner_dn is not None and login_user.owner_dn == sender.owner_dn


def _last(values: list[str]) -> str | None:
    return values[-1] if values else None


def _body_start(tx: Transaction) -> bytes | None:
    """The body's first autocrypt.BODY_LOOK_BYTES, or None when the milter did not collect
    the body (it does for mail it DKIM-signs) or dropped it (oversize)."""
    if not tx.collect_body or tx.oversize or tx.body_lost:
        return None
    start = bytes(tx.body[:autocrypt.BODY_LOOK_BYTES])
    if tx.spill is not None and len(start) < autocrypt.BODY_LOOK_BYTES:
        tx.spill.seek(0)
        start += tx.spill.read(autocrypt.BODY_LOOK_BYTES - len(start))
    return start
