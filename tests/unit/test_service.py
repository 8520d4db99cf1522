"""MailService on the in-memory store (same contract as slapd's, tests/contract) with a
mailer that keeps what it is given: the WKS flows and Autocrypt decided without slapd,
Postfix or gpg. The same flows run through the real peers in tests/integration."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from milter_wkd import logcontext, wks
from milter_wkd.config import Config, load
from milter_wkd.errors import DirectoryUnavailable
from milter_wkd.openpgp import messages
from milter_wkd.replies import Accept, Discard, Reject, TempFail
from milter_wkd.service import MailService
from milter_wkd.store.memory import MemoryStore
from milter_wkd.store.model import KeyOrigin
from milter_wkd.transaction import Transaction
from milter_wkd.values import Address
from tests.contract.conftest import USERS
from tests.contract.test_store import make_key
from tests.unit.test_wks import key_part, pgp_mime, response_data, wks_part

SUBMISSION = Address.parse("key-submission@example.org")
ALICE = Address.parse("alice@example.org")
NOW = 1_800_000_000


class Outbox:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, bytes]] = []
        self.down = False

    def send(self, sender: str, recipient: str, message: bytes) -> None:
        from milter_wkd.mailer import MailerUnavailable
        if self.down:
            raise MailerUnavailable("test mailer down")
        self.sent.append((sender, recipient, message))


@pytest.fixture(scope="module")
def service_key() -> messages.GeneratedKey:
    return messages.generate_submission_key(SUBMISSION)


@pytest.fixture
def config(tmp_path: Path, service_key: messages.GeneratedKey) -> Config:
    secret = tmp_path / "submission.key"
    secret.write_bytes(service_key.secret)
    public = tmp_path / "submission.pub"
    public.write_bytes(service_key.public)
    path = tmp_path / "milter-wkd.toml"
    path.write_text(f"""
[milter]
trusted_networks = []
dkim_sign_outgoing = false

[[domains]]
name = "example.org"
submission_address = "{SUBMISSION}"
submission_key = "{secret}"
submission_public_key = "{public}"
""", encoding="utf-8")
    return load(path, environ={})


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore(USERS)


@pytest.fixture
def outbox() -> Outbox:
    return Outbox()


@pytest.fixture
def service(config: Config, store: MemoryStore, outbox: Outbox) -> MailService:
    return MailService(config, store, outbox, clock=lambda: float(NOW))


def transaction(raw: bytes, *, login: str | None, sender: str = "alice@example.org",
                ) -> Transaction:
    head, _, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    headers: list[tuple[str, str]] = []
    for line in head.decode().split("\n"):
        if line[:1] in (" ", "\t") and headers:
            headers[-1] = (headers[-1][0], headers[-1][1] + "\n" + line)
        else:
            name, _, value = line.partition(":")
            headers.append((name, value.lstrip(" ")))
    return Transaction(client_ip="192.0.2.1", sasl_login=login, queue_id="UNIT1",
                       mail_from=sender, recipients=[str(SUBMISSION)], headers=headers,
                       body=bytearray(body.replace(b"\n", b"\r\n")), collect_body=True)


def submission(key: bytes, service_key: messages.GeneratedKey,
               sender: str = "alice@example.org") -> bytes:
    headers = (f"From: {sender}\nTo: {SUBMISSION}\nSubject: Key publishing request\n"
               "Wks-Draft-Version: 3\n")
    return pgp_mime(headers, key_part(key), service_key.public)


def test_a_logged_in_user_publishes_at_once(service: MailService, store: MemoryStore,
                                            outbox: Outbox,
                                            service_key: messages.GeneratedKey) -> None:
    key, primary, _sub = make_key("Alice <alice@example.org>", "Bob <bob@example.org>")
    reply = service.decide(transaction(submission(key, service_key), login="alice@example.org"))
    assert reply == Discard("published")
    stored = store.get_key(store.user(ALICE))
    assert stored is not None
    assert stored.fingerprint.hex == primary.fingerprint.hex().upper()
    assert [str(a) for a in stored.addresses] == ["alice@example.org"]
    assert stored.provenance is not None
    assert stored.provenance.source is KeyOrigin.AUTH_SUBMIT
    ((sender, recipient, notice),) = outbox.sent
    assert (sender, recipient) == (str(SUBMISSION), "alice@example.org")
    assert b"Not published for bob@example.org" in notice


def test_a_login_that_owns_none_of_the_keys_addresses_is_refused(
        service: MailService, store: MemoryStore, outbox: Outbox,
        service_key: messages.GeneratedKey) -> None:
    key, _primary, _sub = make_key("Bob <bob@example.org>")
    reply = service.decide(transaction(submission(key, service_key, "bob@example.org"),
                                       login="alice@example.org", sender="bob@example.org"))
    assert isinstance(reply, Reject)
    assert reply.code == 550
    assert store.get_key(store.user(Address.parse("bob@example.org"))) is None
    assert outbox.sent == []


def test_a_directory_that_does_not_answer_is_a_temporary_failure(
        service: MailService, store: MemoryStore, outbox: Outbox,
        service_key: messages.GeneratedKey) -> None:
    key, _primary, _sub = make_key("Alice <alice@example.org>")
    store.down = True
    reply = service.decide(transaction(submission(key, service_key), login="alice@example.org"))
    assert isinstance(reply, TempFail)
    assert reply.code == 451
    store.down = False
    assert store.get_key(store.user(ALICE)) is None
    assert outbox.sent == []


def test_a_mailer_that_refuses_is_a_temporary_failure(
        service: MailService, outbox: Outbox, service_key: messages.GeneratedKey) -> None:
    key, _primary, _sub = make_key("Alice <alice@example.org>")
    outbox.down = True
    reply = service.decide(transaction(submission(key, service_key), login=None))
    assert isinstance(reply, TempFail)
    # No confirmation was sent, so no request is left pending without its mail.
    assert service.directory.list_pending() == []


def test_the_confirmation_round_trip_publishes_once(
        service: MailService, store: MemoryStore, outbox: Outbox,
        service_key: messages.GeneratedKey) -> None:
    user_key = messages.generate_submission_key(ALICE)
    reply = service.decide(transaction(submission(user_key.public, service_key), login=None))
    assert reply == Discard("confirmation requested")
    ((_sender, recipient, request),) = outbox.sent
    assert recipient == "alice@example.org"
    assert store.get_key(store.user(ALICE)) is None
    (pending,) = store.list_pending()
    response_headers = (f"From: alice@example.org\nTo: {SUBMISSION}\n"
                        "Subject: Key publication confirmation\nWks-Draft-Version: 3\n")
    response = pgp_mime(response_headers, wks_part(response_data(
        pending.nonce, address="alice@example.org", sender=str(SUBMISSION))),
        service_key.public)
    assert service.decide(transaction(response, login=None)) == Discard("confirmed")
    stored = store.get_key(store.user(ALICE))
    assert stored is not None
    assert stored.fingerprint == user_key.fingerprint
    assert stored.provenance is not None
    assert stored.provenance.source is KeyOrigin.WKS_CONFIRMED
    # The same response again (the milter died before it answered): no second notice,
    # and no refusal that would bounce to the user.
    assert service.decide(transaction(response, login=None)) == Discard("confirmed already")
    assert len(outbox.sent) == 2
    # Another response with the used nonce (encrypted anew) is refused: single use.
    another = pgp_mime(response_headers, wks_part(response_data(
        pending.nonce, address="alice@example.org", sender=str(SUBMISSION))),
        service_key.public)
    again = service.decide(transaction(another, login=None))
    assert isinstance(again, Reject)
    assert "no pending request" in again.text or "used already" in again.text
    assert wks.SUBJECT_CONFIRM.encode() in request


def test_a_retried_submission_is_published_once_and_notified_once(
        service: MailService, store: MemoryStore, outbox: Outbox,
        service_key: messages.GeneratedKey) -> None:
    """Postfix hands the same message over again when the milter died after writing the
    key (milter_default_action = tempfail): one publication, one notice."""
    key, _primary, _sub = make_key("Alice <alice@example.org>")
    raw = submission(key, service_key)
    assert service.decide(transaction(raw, login="alice@example.org")) == Discard("published")
    first = store.get_key(store.user(ALICE))
    assert first is not None
    assert first.provenance is not None
    assert first.provenance.actor.startswith("alice@example.org (submission ")
    assert first.provenance.actor.endswith(")")  # the notice went out: recorded as sent
    assert "notice unsent" not in first.provenance.actor
    assert service.decide(transaction(raw, login="alice@example.org")) == Discard(
        "published already")
    assert len(outbox.sent) == 1
    assert store.get_key(store.user(ALICE)) == first  # not written again
    # The same key submitted again by the user is a new message: published, notified.
    again = submission(key, service_key)
    assert service.decide(transaction(again, login="alice@example.org")) == Discard("published")
    assert len(outbox.sent) == 2


def test_a_notice_the_mailer_refused_is_sent_on_the_retry(
        service: MailService, store: MemoryStore, outbox: Outbox,
        service_key: messages.GeneratedKey) -> None:
    key, _primary, _sub = make_key("Alice <alice@example.org>")
    raw = submission(key, service_key)
    outbox.down = True
    reply = service.decide(transaction(raw, login="alice@example.org"))
    assert isinstance(reply, TempFail)
    written = store.get_key(store.user(ALICE))  # written before the notice
    assert written is not None
    assert written.provenance is not None
    assert written.provenance.actor.endswith(", notice unsent)")
    outbox.down = False
    assert service.decide(transaction(raw, login="alice@example.org")) == Discard("published")
    ((_sender, recipient, notice),) = outbox.sent
    assert recipient == "alice@example.org"
    assert b"Your key has been published" in notice
    assert service.decide(transaction(raw, login="alice@example.org")) == Discard(
        "published already")
    assert len(outbox.sent) == 1


class FailsAfterWriting:
    """The store whose next publication is written and then answered with an error, as
    a directory timeout whose write went through."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.armed = True

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)

    def publish_key(self, *args: object, **kwargs: object) -> object:
        written = self.store.publish_key(*args, **kwargs)  # type: ignore[arg-type]
        if self.armed:
            self.armed = False
            raise DirectoryUnavailable("timed out (the write went through)")
        return written


def test_a_retry_after_a_failure_past_the_write_still_gets_its_notice(
        config: Config, store: MemoryStore, outbox: Outbox,
        service_key: messages.GeneratedKey) -> None:
    flaky = FailsAfterWriting(store)
    service = MailService(config, flaky, outbox, clock=lambda: float(NOW))  # type: ignore[arg-type]
    key, _primary, _sub = make_key("Alice <alice@example.org>")
    raw = submission(key, service_key)
    assert isinstance(service.decide(transaction(raw, login="alice@example.org")), TempFail)
    assert store.get_key(store.user(ALICE)) is not None
    assert outbox.sent == []
    assert service.decide(transaction(raw, login="alice@example.org")) == Discard("published")
    assert len(outbox.sent) == 1
    # A confirmation whose request the failed attempt used up: the retry sends the notice.
    user_key = messages.generate_submission_key(Address.parse("bob@example.org"))
    service.decide(transaction(submission(user_key.public, service_key,
                                          sender="bob@example.org"), login=None))
    (pending,) = store.list_pending()
    response_headers = (f"From: bob@example.org\nTo: {SUBMISSION}\n"
                        "Subject: Key publication confirmation\nWks-Draft-Version: 3\n")
    response = pgp_mime(response_headers, wks_part(response_data(
        pending.nonce, address="bob@example.org", sender=str(SUBMISSION))), service_key.public)
    flaky.armed = True
    assert isinstance(service.decide(transaction(response, login=None)), TempFail)
    assert store.list_pending() == []  # used up by the write that went through
    sent = len(outbox.sent)
    assert service.decide(transaction(response, login=None)) == Discard("confirmed")
    assert len(outbox.sent) == sent + 1
    assert b"bob@example.org" in outbox.sent[-1][2]
    assert service.decide(transaction(response, login=None)) == Discard("confirmed already")
    assert len(outbox.sent) == sent + 1


def test_outgoing_mail_of_a_user_with_a_key_carries_it(
        service: MailService, store: MemoryStore, service_key: messages.GeneratedKey) -> None:
    key, _primary, _sub = make_key("Alice <alice@example.org>")
    service.decide(transaction(submission(key, service_key), login="alice@example.org"))
    mail = b"From: Alice <alice@example.org>\nTo: someone@example.net\nSubject: hi\n\nhello\n"
    tx = transaction(mail, login="alice@example.org")
    tx.recipients = ["someone@example.net"]
    reply = service.decide(tx)
    assert isinstance(reply, Accept)
    (edit,) = [e for e in reply.edits if e.name == "Autocrypt"]
    assert edit.value is not None
    assert edit.value.startswith("addr=alice@example.org;")
    # Someone else logged in does not get Alice's header on mail with her From.
    tx = transaction(mail, login="bob@example.org")
    tx.recipients = ["someone@example.net"]
    reply = service.decide(tx)
    assert isinstance(reply, Accept)
    assert not [e for e in reply.edits if e.name == "Autocrypt"]


def test_other_recipients_keep_the_mail_and_only_our_copy_is_consumed(
        service: MailService, service_key: messages.GeneratedKey) -> None:
    key, _primary, _sub = make_key("Alice <alice@example.org>")
    tx = transaction(submission(key, service_key), login="alice@example.org")
    tx.recipients.append("archive@example.net")
    assert service.decide(tx) == Accept(remove_recipients=(str(SUBMISSION),))


def test_the_service_mails_through_the_mailer_it_is_given_last(
        service: MailService, outbox: Outbox, service_key: messages.GeneratedKey) -> None:
    """benchmarks/wks.py swaps the mailer between the two halves of a round trip."""
    assert service.mailer is outbox
    other = Outbox()
    service.mailer = other
    key, _primary, _sub = make_key("Alice <alice@example.org>")
    service.decide(transaction(submission(key, service_key), login="alice@example.org"))
    assert outbox.sent == []
    assert [recipient for _sender, recipient, _mail in other.sent] == ["alice@example.org"]


def test_the_lines_logged_for_a_message_name_its_queue_id(
        service: MailService, service_key: messages.GeneratedKey,
        caplog: pytest.LogCaptureFixture) -> None:
    """No flow passes the queue id: the log context (set by the milter adapter) adds it."""
    key, primary, _sub = make_key("Alice <alice@example.org>")
    logcontext.install(caplog.handler)
    caplog.handler.setFormatter(logging.Formatter("%(name)s %(queue_prefix)s%(message)s"))
    caplog.set_level(logging.INFO, logger="milter_wkd")
    with logcontext.message("4QUNIT1"):
        service.decide(transaction(submission(key, service_key), login="alice@example.org"))
    service.decide(transaction(submission(key, service_key), login="alice@example.org"))
    fingerprint = primary.fingerprint.hex().upper()
    assert caplog.text.splitlines() == [
        f"milter_wkd.submissions 4QUNIT1: published {fingerprint} for alice@example.org "
        "(auth-submit by alice@example.org)",
        f"milter_wkd.submissions published {fingerprint} for alice@example.org "
        "(auth-submit by alice@example.org)",
    ]
