"""Outgoing mail's Autocrypt cache and the service's key files, on the in-memory store: what
is cached, when it is looked up again, how much is kept; and which mail gets no header
because its client does OpenPGP itself (issue #14), while it is still DKIM-signed. The
header and the signature themselves are checked in tests/unit/test_service.py and, through
Postfix, tests/integration/test_milter_autocrypt.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from milter_wkd import dkim, outgoing
from milter_wkd.config import ConfigError, DomainConfig, build
from milter_wkd.openpgp import clean_key
from milter_wkd.outgoing import CHANGE_CHECK_INTERVAL, AutocryptCache, AutocryptEntry
from milter_wkd.replies import Accept, HeaderEdit, Reply
from milter_wkd.service import MailService
from milter_wkd.servicekeys import ServiceKeys
from milter_wkd.store.memory import MemoryStore
from milter_wkd.store.model import KeyOrigin, Provenance
from milter_wkd.transaction import Transaction
from milter_wkd.values import Address
from tests.contract.conftest import USERS
from tests.contract.test_store import make_key
from tests.unit.test_service import Outbox

ALICE = Address.parse("alice@example.org")
BOB = Address.parse("bob@example.org")
NOW = 1_800_000_000.0


class CountingStore(MemoryStore):
    """Counts the lookups the cache makes."""

    def __init__(self) -> None:
        super().__init__(USERS)
        self.lookups = 0
        self.token_reads = 0

    def find_user(self, address: Address, **kwargs: object) -> object:  # type: ignore[override]
        self.lookups += 1
        return super().find_user(address, **kwargs)  # type: ignore[arg-type]

    def change_token(self) -> str:
        self.token_reads += 1
        return super().change_token()


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def publish(store: CountingStore, address: Address) -> None:
    """As the keys CLI would: the lookups it makes are not the cache's."""
    lookups = store.lookups
    key, _primary, _sub = make_key(f"<{address}>")
    store.publish_key(store.user(address), clean_key(key, [address]),
                      Provenance(KeyOrigin.ADMIN_IMPORT, "test", int(NOW)))
    store.lookups = lookups


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_an_address_is_looked_up_once_while_the_store_does_not_change(
        store: CountingStore, clock: Clock) -> None:
    publish(store, ALICE)
    cache = AutocryptCache(store, clock)
    first = cache.entry(ALICE)
    assert first.keydata is not None
    assert first.owner_dn == "uid=alice,ou=people,dc=example,dc=org"
    clock.now += 10 * CHANGE_CHECK_INTERVAL
    assert cache.entry(ALICE) is first
    assert store.lookups == 1
    assert store.token_reads == 2  # once per interval, not once per mail


def test_a_change_elsewhere_shows_after_the_next_token_check(store: CountingStore,
                                                             clock: Clock) -> None:
    cache = AutocryptCache(store, clock)
    assert cache.entry(BOB) == AutocryptEntry(None, store.user(BOB).dn, None)
    publish(store, BOB)  # by the keys CLI, say: the cache is not told
    clock.now += CHANGE_CHECK_INTERVAL / 2
    assert cache.entry(BOB).keydata is None  # not looked at yet
    assert store.token_reads == 1
    clock.now += CHANGE_CHECK_INTERVAL
    assert cache.entry(BOB).keydata is not None
    assert store.token_reads == 2


def test_forget_looks_again_at_once(store: CountingStore, clock: Clock) -> None:
    cache = AutocryptCache(store, clock)
    assert cache.entry(ALICE).keydata is None
    publish(store, ALICE)
    cache.forget()  # what a publication of ours does
    assert cache.entry(ALICE).keydata is not None
    assert store.lookups == 2


def test_an_address_of_nobody_has_no_owner(store: CountingStore, clock: Clock) -> None:
    cache = AutocryptCache(store, clock)
    assert cache.entry(Address.parse("nobody@example.org")) == AutocryptEntry(None, None, None)


def test_the_cache_keeps_the_most_recently_used_addresses(
        store: CountingStore, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outgoing, "MAX_CACHED_ADDRESSES", 2)
    cache = AutocryptCache(store, clock)
    carol = Address.parse("carol@example.org")
    cache.entry(ALICE)
    cache.entry(BOB)
    cache.entry(ALICE)  # alice used again: bob is now the oldest
    cache.entry(carol)
    assert store.lookups == 3
    cache.entry(ALICE)
    cache.entry(carol)
    assert store.lookups == 3
    cache.entry(BOB)
    assert store.lookups == 4


def test_an_unreadable_submission_key_is_a_configuration_error(tmp_path: Path) -> None:
    cfg = build({"domains": [{"name": "example.org",
                              "submission_key": str(tmp_path / "missing.key")}]}, environ={})
    domain: DomainConfig = cfg.domains[0]
    keys = ServiceKeys()
    with pytest.raises(ConfigError, match=r"missing\.key"):
        keys.submission_secret(domain)
    (tmp_path / "missing.key").write_bytes(b"secret")
    assert keys.submission_secret(domain) == b"secret"
    (tmp_path / "missing.key").write_bytes(b"changed")
    assert keys.submission_secret(domain) == b"secret"  # read once: a restart reads again
    assert keys.dkim(domain) == ()


# --- issue #14: no header of ours on mail whose client does OpenPGP itself ---------------

DKIM_KEY = Path(__file__).parent.parent / "data" / "dkim-ed25519.pem"
PLAIN_HEAD = "From: Alice <alice@example.org>\r\nTo: someone@example.net\r\nSubject: hi\r\n"
PGP_MIME = ('Content-Type: multipart/encrypted;\r\n protocol="application/pgp-encrypted";'
            ' boundary="b"\r\n')
PGP_MIME_BODY = (b"--b\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n"
                 b"--b\r\nContent-Type: application/octet-stream\r\n\r\n"
                 b"-----BEGIN PGP MESSAGE-----\r\n\r\nhQEMA\r\n-----END PGP MESSAGE-----\r\n"
                 b"--b--\r\n")
INLINE_BODY = b"-----BEGIN PGP MESSAGE-----\r\n\r\nhQEMA\r\n-----END PGP MESSAGE-----\r\n"


def outgoing_service(store: CountingStore, clock: Clock, *, sign: bool,
                     body_memory: int = 1024 * 1024) -> MailService:
    cfg = build({"milter": {"dkim_sign_outgoing": sign, "body_memory_bytes": body_memory},
                 "domains": [{"name": "example.org", "dkim_key": str(DKIM_KEY)}]},
                environ={})
    return MailService(cfg, store, Outbox(), clock=clock)


def users_mail(service: MailService, head: str, body: bytes) -> Transaction:
    """alice's mail as the milter collects it: headers, then the body if it wants it."""
    tx = Transaction(client_ip="192.0.2.1", sasl_login="alice@example.org",
                     mail_from="alice@example.org", recipients=["someone@example.net"])
    for line in head.split("\r\n")[:-1]:
        if line[:1] in (" ", "\t"):
            tx.headers[-1] = (tx.headers[-1][0], tx.headers[-1][1] + "\n" + line)
        else:
            name, _, value = line.partition(":")
            tx.headers.append((name, value.lstrip(" ")))
    tx.collect_body = service.wants_body(tx)
    if tx.collect_body:
        for start in range(0, len(body), 7):
            tx.add_body(body[start:start + 7], service.body_memory)
    return tx


def named(reply: Reply, name: str) -> list[HeaderEdit]:
    assert isinstance(reply, Accept)
    return [edit for edit in reply.edits if edit.name == name]


def verifies(tx: Transaction, reply: Reply) -> bool:
    (signature,) = named(reply, "DKIM-Signature")
    others = [(e.name, e.value or "") for e in named(reply, "Autocrypt")]
    message = (Transaction(headers=[(signature.name, signature.value or "")]).header_block()
               + tx.raw_message(others))
    key = dkim.load_key(DKIM_KEY, "example.org", "wkd")
    return dkim.verify(message, {key.dns_name(): key.dns_record()})


@pytest.mark.parametrize(("head", "body", "reason"), [
    (PGP_MIME, PGP_MIME_BODY, "multipart/encrypted"),
    ('Content-Type: multipart/Signed; micalg=pgp-sha256;\r\n\tprotocol="application/'
     'pgp-signature"; boundary=b\r\n', b"--b\r\n\r\nhello\r\n--b--\r\n", "multipart/signed"),
    ("Chat-Version: 1.0\r\n", b"hello\r\n", "Chat-Version"),
    ("Autocrypt: addr=alice@example.org; keydata=AAAA\r\n", b"hello\r\n", "Autocrypt header"),
    ("Content-Type: text/plain; charset=utf-8\r\n", INLINE_BODY, "inline PGP message"),
    ("", b"-----BEGIN PGP SIGNED MESSAGE-----\r\nHash: SHA256\r\n\r\nhello\r\n",
     "inline PGP signed message"),
], ids=["pgp-mime", "signed", "delta-chat", "own-autocrypt", "inline", "clearsigned"])
def test_mail_whose_client_does_openpgp_gets_no_header_but_is_signed(
        store: CountingStore, clock: Clock, caplog: pytest.LogCaptureFixture,
        head: str, body: bytes, reason: str) -> None:
    publish(store, ALICE)
    service = outgoing_service(store, clock, sign=True)
    caplog.set_level(logging.INFO, logger="milter_wkd.outgoing")
    tx = users_mail(service, PLAIN_HEAD + head, body)
    reply = service.decide(tx)
    assert named(reply, "Autocrypt") == []
    assert verifies(tx, reply)
    assert "no Autocrypt header for alice@example.org: " in caplog.text
    assert reason in caplog.text


def test_plain_mail_gets_the_header_and_both_are_signed(store: CountingStore,
                                                        clock: Clock) -> None:
    publish(store, ALICE)
    service = outgoing_service(store, clock, sign=True)
    tx = users_mail(service, PLAIN_HEAD + "Content-Type: text/plain\r\n",
                    b"Hello,\r\n> -----BEGIN PGP MESSAGE-----\r\n")
    reply = service.decide(tx)
    (header,) = named(reply, "Autocrypt")
    assert (header.value or "").startswith("addr=alice@example.org;")
    assert verifies(tx, reply)


def test_a_body_on_disk_is_looked_at_too(store: CountingStore, clock: Clock) -> None:
    publish(store, ALICE)
    service = outgoing_service(store, clock, sign=True, body_memory=10)
    tx = users_mail(service, PLAIN_HEAD, b"Hi Bob,\r\n\r\n" + INLINE_BODY)
    assert tx.spill is not None
    try:
        reply = service.decide(tx)
        assert named(reply, "Autocrypt") == []
        assert verifies(tx, reply)
    finally:
        tx.close()


def test_without_signing_the_body_is_not_read_and_headers_decide_alone(
        store: CountingStore, clock: Clock) -> None:
    """Documented: inline PGP is seen only in mail whose body the milter collects (the mail
    it DKIM-signs); PGP/MIME, Chat-Version and Autocrypt are headers and always seen."""
    publish(store, ALICE)
    service = outgoing_service(store, clock, sign=False)
    inline = users_mail(service, PLAIN_HEAD, INLINE_BODY)
    assert not inline.collect_body
    assert len(named(service.decide(inline), "Autocrypt")) == 1
    lookups = store.lookups
    encrypted = service.decide(users_mail(service, PLAIN_HEAD + PGP_MIME, PGP_MIME_BODY))
    assert named(encrypted, "Autocrypt") == []
    assert store.lookups == lookups  # decided before the directory is asked
