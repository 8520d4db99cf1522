"""The pymilter adapter's side of the Milter protocol: what each connection negotiates (the
steps it skips, the replies it does not send, the macros it asks for) and how a message's
callbacks fill the Transaction, for an MTA that sends macros on request (Postfix) and for
one that cannot. The context object stands in for pymilter's (the calls the adapter makes
on it are recorded); the same flows run through real Postfix in tests/integration."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import milter as libmilter
import pytest

from milter_wkd import logcontext
from milter_wkd import milter as adapter
from milter_wkd.replies import Accept, HeaderEdit, Reject, Reply
from milter_wkd.transaction import Transaction

# What Postfix 3.x offers (milter8.c: every action; every step and no-reply flag of
# protocol 6), and what a Sendmail-8.13-like MTA offers (no SETSYMLIST, no NR flags).
POSTFIX_ACTIONS = 0x1FF
POSTFIX_STEPS = 0x1FFFFF
OLD_ACTIONS = 0x3F
OLD_STEPS = 0x3FF


@dataclass
class Context:
    """Records what the adapter asks of pymilter's context object."""

    macros: dict[str, str] = field(default_factory=dict)
    priv: Any = None
    symlists: dict[int, str] = field(default_factory=dict)
    edits: list[tuple[Any, ...]] = field(default_factory=list)

    def setpriv(self, value: Any) -> Any:
        old, self.priv = self.priv, value
        return old

    def getpriv(self) -> Any:
        return self.priv

    def getsymval(self, name: str) -> str | None:
        return self.macros.get(name)

    def setsymlist(self, stage: int, names: str) -> None:
        self.symlists[stage] = names

    def addheader(self, name: str, value: str, index: int) -> None:
        self.edits.append(("add", name, value, index))

    def chgheader(self, name: str, index: int, value: str) -> None:
        self.edits.append(("change", name, index, value))

    def delrcpt(self, recipient: str) -> None:
        self.edits.append(("delrcpt", recipient))

    def setreply(self, code: str, xcode: str, text: str) -> None:
        self.edits.append(("reply", code, xcode, text))


@dataclass
class Milter:
    """Stands in for MailService: records what it was asked, answers `reply`."""

    reply: Reply = field(default_factory=Accept)
    sign: bool = False  # [milter] dkim_sign_outgoing
    body_wanted: bool = False
    decided: list[Transaction] = field(default_factory=list)
    asked_for_body: list[Transaction] = field(default_factory=list)
    max_body = 1 << 20
    body_memory = 1 << 20
    spool = None

    @property
    def config(self) -> Any:
        return type("Config", (), {"milter": type("M", (), {
            "dkim_sign_outgoing": self.sign})()})()

    def wants_body(self, tx: Transaction) -> bool:
        self.asked_for_body.append(tx)
        if self.body_wanted is None:
            raise RuntimeError("broken")
        return self.body_wanted

    def is_submission(self, tx: Transaction) -> bool:
        return False

    def decide(self, tx: Transaction) -> Reply:
        self.decided.append(tx)
        return self.reply


def negotiate(service: Milter, ctx: Context, actions: int = POSTFIX_ACTIONS,
              steps: int = POSTFIX_STEPS) -> list[int]:
    opts = [actions, steps, 0, 0]
    assert adapter._negotiate(service, ctx, opts) == libmilter.CONTINUE  # type: ignore[arg-type]
    return opts


def message(ctx: Context, *, headers: list[tuple[str, bytes]] | None = None,
            body: bytes = b"Hello\r\n") -> int:
    """What Postfix sends after negotiation when it sends macros on request."""
    assert adapter._envrcpt(ctx, b"<bob@example.net>") == libmilter.NOREPLY
    for name, value in headers or [("From", b"alice@example.org"), ("Subject", b"Hi")]:
        assert adapter._header(ctx, name, value) == libmilter.NOREPLY
    assert adapter._body(ctx, body) == libmilter.NOREPLY
    return adapter._eom(ctx)


def test_postfix_sends_no_step_the_milter_does_not_use_and_waits_for_no_reply() -> None:
    ctx = Context()
    actions, steps, _, _ = negotiate(Milter(), ctx)
    assert actions == (libmilter.ADDHDRS | libmilter.CHGHDRS | libmilter.DELRCPT
                       | libmilter.SETSYMLIST)
    for skipped in (libmilter.P_NOCONNECT, libmilter.P_NOHELO, libmilter.P_NOMAIL,
                    libmilter.P_NODATA, libmilter.P_NOUNKNOWN, libmilter.P_NOEOH):
        assert steps & skipped
    for sent in (libmilter.P_NORCPT, libmilter.P_NOHDRS, libmilter.P_NOBODY):
        assert not steps & sent
    for no_reply in (libmilter.P_NR_RCPT, libmilter.P_NR_HDR, libmilter.P_NR_BODY):
        assert steps & no_reply
    # Header values as Postfix always sent them to us (leading space stripped), and only
    # the recipients Postfix accepted.
    assert not steps & (libmilter.P_HDR_LEADSPC | libmilter.P_RCPT_REJ)
    assert ctx.symlists == {libmilter.M_EOM: "i {auth_authen} {client_addr} {mail_addr}"}


def test_a_message_gets_its_sender_login_and_client_from_the_end_of_message_macros() -> None:
    service = Milter(reply=Accept(edits=(HeaderEdit("Autocrypt", "addr=alice@example.org;\r\n"
                                                    " keydata=AAAA"),)))
    ctx = Context()
    negotiate(service, ctx)
    ctx.macros.update({"i": "4QID1", "{auth_authen}": "alice@example.org",
                       "{client_addr}": "IPv6:2001:db8::7", "{mail_addr}": "alice@example.org"})
    assert message(ctx) == libmilter.ACCEPT
    (tx,) = service.decided
    assert (tx.queue_id, tx.sasl_login, tx.client_ip, tx.mail_from) == (
        "4QID1", "alice@example.org", "2001:db8::7", "alice@example.org")
    assert tx.recipients == ["bob@example.net"]
    assert tx.headers == [("From", "alice@example.org"), ("Subject", "Hi")]
    assert ctx.edits == [("add", "Autocrypt", "addr=alice@example.org;\n keydata=AAAA", -1)]
    # The body was not wanted (no submission, no signing): not kept.
    assert service.asked_for_body == [tx]
    assert tx.body == b""


def test_a_second_message_on_the_connection_starts_empty() -> None:
    service = Milter()
    ctx = Context(macros={"i": "4QID1", "{client_addr}": "192.0.2.1", "{mail_addr}": "a@x"})
    negotiate(service, ctx)
    message(ctx)
    ctx.macros.update({"i": "4QID2", "{mail_addr}": "b@x", "{auth_authen}": "b@x"})
    message(ctx, headers=[("To", b"c@x")])
    first, second = service.decided
    assert (first.queue_id, first.mail_from, first.sasl_login) == ("4QID1", "a@x", None)
    assert (second.queue_id, second.mail_from, second.sasl_login) == ("4QID2", "b@x", "b@x")
    assert second.recipients == ["bob@example.net"]
    assert second.headers == [("To", "c@x")]
    assert len(service.asked_for_body) == 2


def test_when_the_milter_signs_it_learns_who_sends_with_the_first_recipient() -> None:
    """The body is read for our users' mail only: who sends must be known before it."""
    service = Milter(sign=True, body_wanted=True)
    ctx = Context(macros={"{auth_authen}": "alice@example.org", "{client_addr}": "192.0.2.1",
                          "{mail_addr}": "alice@example.org"})
    negotiate(service, ctx)
    assert ctx.symlists == {libmilter.M_ENVRCPT: "{auth_authen} {client_addr} {mail_addr}",
                            libmilter.M_EOM: "i"}
    adapter._envrcpt(ctx, b"<bob@example.net>")
    ctx.macros.clear()  # Postfix sends them with RCPT TO only
    adapter._envrcpt(ctx, b"<carol@example.net>")
    adapter._header(ctx, "From", b"alice@example.org")
    adapter._body(ctx, b"signed\r\n")
    (asked,) = service.asked_for_body
    assert (asked.sasl_login, asked.client_ip) == ("alice@example.org", "192.0.2.1")
    ctx.macros["i"] = "4QID9"
    adapter._eom(ctx)
    (tx,) = service.decided
    assert tx.recipients == ["bob@example.net", "carol@example.net"]
    assert tx.body == b"signed\r\n"
    assert tx.queue_id == "4QID9"


def test_an_mta_that_cannot_send_macros_on_request_gets_the_connect_and_mail_steps() -> None:
    service = Milter()
    ctx = Context()
    actions, steps, _, _ = negotiate(service, ctx, OLD_ACTIONS, OLD_STEPS)
    assert not actions & libmilter.SETSYMLIST
    assert not steps & (libmilter.P_NOCONNECT | libmilter.P_NOMAIL)
    assert ctx.symlists == {}
    # Asked for anyway: libmilter answers "continue" itself to an MTA without them.
    assert steps & libmilter.P_NR_HDR
    assert adapter._connect(ctx, "client.example", 2, ("192.0.2.9", 25)) == libmilter.NOREPLY
    ctx.macros.update({"{auth_authen}": "alice@example.org", "i": "4QID3"})
    assert adapter._envfrom(ctx, b"<alice@example.org>", b"SIZE=12") == libmilter.NOREPLY
    message(ctx)
    adapter._envfrom(ctx, b"<>")
    message(ctx)
    first, second = service.decided
    assert (first.client_ip, first.sasl_login, first.mail_from, first.queue_id) == (
        "192.0.2.9", "alice@example.org", "alice@example.org", "4QID3")
    assert (second.client_ip, second.mail_from) == ("192.0.2.9", "")


def test_a_reject_sets_the_reply_text_libmilter_formats() -> None:
    service = Milter(reply=Reject(550, "5.7.1", "Key submission refused: 100% wrong"))
    ctx = Context()
    negotiate(service, ctx)
    assert message(ctx) == libmilter.REJECT
    assert ctx.edits == [("reply", "550", "5.7.1", "Key submission refused: 100%% wrong")]


def test_client_addr_forms() -> None:
    assert adapter.client_ip_of("192.0.2.1") == "192.0.2.1"
    assert adapter.client_ip_of("IPv6:2001:db8::1") == "2001:db8::1"
    assert adapter.client_ip_of("ipv6:::1") == "::1"
    assert adapter.client_ip_of(None) is None
    assert adapter.client_ip_of("") is None


@pytest.fixture
def warnings() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(queue_prefix)s%(message)s"))
    logcontext.install(handler)
    log = logging.getLogger("milter_wkd.milter")
    log.addHandler(handler)
    try:
        yield stream
    finally:
        log.removeHandler(handler)
        logcontext.clear()


def test_a_body_problem_is_logged_at_end_of_message_with_the_queue_id(
        warnings: io.StringIO) -> None:
    """Postfix names the queue id at end of message only; nothing is logged before."""
    service = Milter(body_wanted=None)  # type: ignore[arg-type]  # wants_body raises
    ctx = Context()
    negotiate(service, ctx)
    adapter._envrcpt(ctx, b"<bob@example.net>")
    adapter._body(ctx, b"x")
    assert warnings.getvalue() == ""
    ctx.macros["i"] = "4QID5"
    assert adapter._eom(ctx) == libmilter.ACCEPT  # the mail passes
    lines = warnings.getvalue().splitlines()
    assert lines[0] == "4QID5: deciding whether to read the body failed"
    assert "RuntimeError: broken" in warnings.getvalue()
    assert logcontext.current() is None


def test_abort_and_close_drop_the_message() -> None:
    service = Milter()
    ctx = Context()
    negotiate(service, ctx)
    adapter._envrcpt(ctx, b"<bob@example.net>")
    adapter._header(ctx, "From", b"alice@example.org")
    assert adapter._abort(ctx) == libmilter.CONTINUE
    message(ctx, headers=[("To", b"c@x")])
    (tx,) = service.decided
    assert tx.recipients == ["bob@example.net"]
    assert tx.headers == [("To", "c@x")]
    assert adapter._close(ctx) == libmilter.CONTINUE
    assert adapter._close(Context()) == libmilter.CONTINUE  # closed before negotiation
