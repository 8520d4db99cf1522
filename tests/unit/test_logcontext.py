"""The per-message log context: every line logged while the milter handles a message names
its Postfix queue id, whichever module logs it, and no line of another message or thread
does."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from milter_wkd import logcontext, milter
from milter_wkd.replies import Accept, Reply
from milter_wkd.transaction import Transaction
from tests.unit.test_milter_adapter import Context, Milter

MilterConfig = Milter().config  # [milter] dkim_sign_outgoing = false

STORE = logging.getLogger("milter_wkd.store.ldapstore")
PUBLICATION = logging.getLogger("milter_wkd.publication")


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """A root handler with the filter installed, as `milter-wkd` sets it up, with a format
    that shows both attributes."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(queue_prefix)s"
                                           "%(message)s [%(queue_id)s]"))
    logcontext.install(handler)
    root, package = logging.getLogger(), logging.getLogger("milter_wkd")
    levels = root.level, package.level  # (fuzz/targets/web.py quiets the package)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    package.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        package.setLevel(levels[1])
        logcontext.clear()


def test_a_line_of_another_module_carries_the_queue_id(lines: io.StringIO) -> None:
    logcontext.set_queue_id("4Xq1ZT0b3Nz9v")
    STORE.warning("key of %s withheld: %s", "uid=alice", "too large")
    assert lines.getvalue() == ("WARNING milter_wkd.store.ldapstore 4Xq1ZT0b3Nz9v: key of "
                                "uid=alice withheld: too large [4Xq1ZT0b3Nz9v]\n")


def test_outside_a_message_lines_look_as_before(lines: io.StringIO) -> None:
    STORE.info("directory connection broke (%s); reconnecting", "timeout")
    assert lines.getvalue() == ("INFO milter_wkd.store.ldapstore directory connection broke "
                                "(timeout); reconnecting [-]\n")
    assert "%(queue_prefix)s%(message)s" in logcontext.FORMAT


def test_an_unknown_queue_id_is_no_context() -> None:
    logcontext.set_queue_id("-")
    assert logcontext.current() is None
    logcontext.set_queue_id("")
    assert logcontext.current() is None


def test_the_context_ends_with_the_message(lines: io.StringIO) -> None:
    logcontext.set_queue_id("FIRST1")
    PUBLICATION.info("one")
    logcontext.clear()
    PUBLICATION.info("between")
    with logcontext.message("SECOND2"):
        PUBLICATION.info("two")
    PUBLICATION.info("after")
    assert lines.getvalue().splitlines() == [
        "INFO milter_wkd.publication FIRST1: one [FIRST1]",
        "INFO milter_wkd.publication between [-]",
        "INFO milter_wkd.publication SECOND2: two [SECOND2]",
        "INFO milter_wkd.publication after [-]",
    ]


def test_threads_do_not_see_each_others_queue_id(lines: io.StringIO) -> None:
    """A thread (a libmilter connection, the key follower) has its own context: what one
    sets is not seen by another, started before or after."""
    logcontext.set_queue_id("MAIN1")
    both_set = threading.Barrier(2)
    at_start: dict[str, str | None] = {}

    def connection(queue_id: str) -> None:
        at_start[queue_id] = logcontext.current()
        logcontext.set_queue_id(queue_id)
        both_set.wait(timeout=10)
        STORE.info("in %s", queue_id)

    threads = [threading.Thread(target=connection, args=(q,)) for q in ("CONN1", "CONN2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    STORE.info("in MAIN1")
    assert at_start == {"CONN1": None, "CONN2": None}  # a new thread starts without one
    got = sorted(lines.getvalue().splitlines())
    assert got == sorted(f"INFO milter_wkd.store.ldapstore {q}: in {q} [{q}]"
                         for q in ("CONN1", "CONN2", "MAIN1"))


class _LoggingService:
    """A MailService stand-in that logs the way the store and publication code do."""

    max_body = 1 << 20
    body_memory = 1 << 20
    spool = None
    config = MilterConfig

    def wants_body(self, tx: Transaction) -> bool:
        return False

    def is_submission(self, tx: Transaction) -> bool:
        return True

    def decide(self, tx: Transaction) -> Reply:
        PUBLICATION.info("publishing for %s", tx.mail_from)
        return Accept()


def _connection(macros: dict[str, str]) -> Context:
    ctx = Context(macros=macros)
    milter._negotiate(_LoggingService(), ctx, [0x1FF, 0x1FFFFF, 0, 0])  # type: ignore[arg-type]
    return ctx


def _message(ctx: Context, sender: str) -> Any:
    ctx.macros["{mail_addr}"] = sender
    milter._envrcpt(ctx, b"<key-submission@example.org>")
    milter._header(ctx, "From", sender.encode())
    return milter._eom(ctx)


def test_the_milter_sets_the_queue_id_postfix_names_and_clears_it(lines: io.StringIO) -> None:
    # Postfix names the queue id at end of message (smtpd_delay_open_until_valid_rcpt).
    macros = {"{client_addr}": "192.0.2.1"}
    ctx = _connection(macros)
    macros["i"] = "4QID1"
    _message(ctx, "alice@example.org")
    STORE.info("after the message")
    macros["i"] = "4QID2"
    _message(ctx, "bob@example.org")
    milter._close(ctx)
    got = lines.getvalue().splitlines()
    assert got[1].startswith("INFO milter_wkd.milter 4QID1: Accept after ")
    assert got[4].startswith("INFO milter_wkd.milter 4QID2: Accept after ")
    del got[4], got[1]
    assert got == [
        "INFO milter_wkd.publication 4QID1: publishing for alice@example.org [4QID1]",
        "INFO milter_wkd.store.ldapstore after the message [-]",
        "INFO milter_wkd.publication 4QID2: publishing for bob@example.org [4QID2]",
    ]
    assert logcontext.current() is None


def test_an_aborted_message_leaves_no_queue_id(lines: io.StringIO) -> None:
    ctx = _connection({"i": "4QID3"})
    # An MTA that names the queue id early (smtpd_delay_open_until_valid_rcpt = no).
    milter._envfrom(ctx, b"<alice@example.org>")
    assert logcontext.current() == "4QID3"
    milter._abort(ctx)
    STORE.info("next")
    assert lines.getvalue().splitlines()[-1] == "INFO milter_wkd.store.ldapstore next [-]"
