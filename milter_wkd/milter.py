"""The pymilter adapter: Postfix calls it on submission and inbound mail (Milter protocol 6).

It only collects and relays: connect/envfrom/envrcpt/header/body fill a `Transaction`
(SASL login from the {auth_authen} macro, which Postfix sends with MAIL FROM), and at end of
message `MailService.decide` returns a `Reply` that is applied here. Bodies are collected
only when needed (mail to a submission address, or DKIM signing in the milter), capped at
[milter] max_submission_bytes, in memory up to [milter] body_memory_bytes and beyond that in
an unnamed temporary file (closed, hence gone, at end of message, abort or disconnect).

The queue id (macro `i`: Postfix sends it at end of header and of message, at MAIL FROM
only when smtpd opens its queue file that early) is the log context of everything logged
while the message is handled (milter_wkd.logcontext); it is cleared at end of message,
abort and close.

Reads [milter] socket and timeout. Failure: no exception ever reaches libmilter; an
unexpected error while handling mail to a submission address answers 451 4.3.0 (Postfix
keeps the mail), elsewhere the mail passes unchanged (Autocrypt and signing never stop
mail). Postfix's own milter_default_action (tempfail in the shipped snippet) covers a dead milter.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import Milter

from milter_wkd import logcontext
from milter_wkd.replies import (
    INTERNAL_ERROR,
    Accept,
    Discard,
    Reject,
    Reply,
    TempFail,
    milter_text,
)
from milter_wkd.service import MailService
from milter_wkd.transaction import Transaction

log = logging.getLogger(__name__)

# pymilter has no type information; name its return codes once, typed.
CONTINUE: int = Milter.CONTINUE
ACCEPT: int = Milter.ACCEPT
REJECT: int = Milter.REJECT
TEMPFAIL: int = Milter.TEMPFAIL
DISCARD: int = Milter.DISCARD


# Headers kept per message: more than real mail has (Postfix's hopcount_limit refuses mail
# with over 50 Received headers), few enough that a flood of headers cannot grow a
# connection's memory without bound. Those beyond are not looked at.
MAX_HEADERS = 2000


_Callback = TypeVar("_Callback", bound=Callable[..., int])


def _noreply(func: _Callback) -> _Callback:
    """pymilter's @noreply, typed: Postfix does not wait for this callback's answer."""
    return cast(_Callback, Milter.noreply(func))


class WkdMilter(Milter.Base):  # type: ignore[misc]
    """One instance per SMTP connection (libmilter may run connections in parallel)."""

    def __init__(self, service: MailService) -> None:
        self.service = service
        self.client_ip: str | None = None
        self.tx = Transaction()

    # --- callbacks ----------------------------------------------------------------------
    # Every callback but eom always continues: @noreply lets Postfix send the next step
    # without waiting for our answer (benchmarks/milter.py: milter CPU 0.94 -> 0.84 ms per
    # message, 0.65x -> 0.77x of the milter-less throughput).

    @_noreply
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        if family in (socket.AF_INET, socket.AF_INET6) and hostaddr:
            self.client_ip = str(hostaddr[0])
        return CONTINUE

    @_noreply
    def envfrom(self, mail_from: str, *params: str) -> int:
        del params
        self.tx.close()
        self.tx = Transaction(client_ip=self.client_ip,
                              sasl_login=self.getsymval("{auth_authen}") or None,
                              queue_id=self.getsymval("i") or logcontext.NO_QUEUE_ID,
                              mail_from=mail_from.strip("<>"))
        logcontext.set_queue_id(self.tx.queue_id)
        return CONTINUE

    @_noreply
    def envrcpt(self, recipient: str, *params: str) -> int:
        del params
        self.tx.recipients.append(recipient.strip("<>"))
        return CONTINUE

    @_noreply
    def header(self, name: str, value: str) -> int:
        if len(self.tx.headers) < MAX_HEADERS:
            self.tx.headers.append((name, value))
        return CONTINUE

    @_noreply
    def eoh(self) -> int:
        self._learn_queue_id()
        try:
            self.tx.collect_body = self.service.wants_body(self.tx)
        except Exception:
            log.exception("deciding whether to read the body failed")
            self.tx.collect_body = False
        return CONTINUE

    @_noreply
    def body(self, chunk: bytes) -> int:
        tx = self.tx
        if tx.collect_body and not tx.oversize:
            if tx.body_size + len(chunk) > self.service.max_body:
                tx.oversize = True
                tx.drop_body()
            else:
                try:
                    tx.add_body(chunk, self.service.body_memory, self.service.spool)
                except OSError as exc:
                    # No exception may reach libmilter; the service answers 451 for it.
                    log.warning("body not kept (%s)", exc)
        return CONTINUE

    def eom(self) -> int:
        tx = self.tx
        self._learn_queue_id()
        started = time.perf_counter()
        try:
            reply = self.service.decide(tx)
            log.log(logging.INFO if self.service.is_submission(tx) else logging.DEBUG,
                    "%s after %.3f s of milter time", type(reply).__name__,
                    time.perf_counter() - started)
        except Exception:
            log.exception("unexpected error")
            reply = INTERNAL_ERROR if self.service.is_submission(tx) else Accept()
        try:
            return self._apply(reply)
        except Exception:
            log.exception("applying %s failed", type(reply).__name__)
            return TEMPFAIL if self.service.is_submission(tx) else CONTINUE
        finally:
            tx.close()
            self.tx = Transaction(client_ip=self.client_ip)
            logcontext.clear()

    def abort(self) -> int:
        self.tx.close()
        self.tx = Transaction(client_ip=self.client_ip)
        logcontext.clear()
        return CONTINUE

    def close(self) -> int:
        self.tx.close()
        logcontext.clear()
        return CONTINUE

    def _learn_queue_id(self) -> None:
        """Ask for the queue id until Postfix names it (it has by end of header)."""
        if self.tx.queue_id == logcontext.NO_QUEUE_ID:
            self.tx.queue_id = self.getsymval("i") or logcontext.NO_QUEUE_ID
            logcontext.set_queue_id(self.tx.queue_id)

    # --- replies ------------------------------------------------------------------------

    def _apply(self, reply: Reply) -> int:
        if isinstance(reply, Reject):
            self.setreply(str(reply.code), reply.xcode, milter_text(reply.text))
            return REJECT
        if isinstance(reply, TempFail):
            self.setreply(str(reply.code), reply.xcode, milter_text(reply.text))
            return TEMPFAIL
        if isinstance(reply, Discard):
            return DISCARD
        for recipient in reply.remove_recipients:
            self.delrcpt(f"<{recipient}>")
        for edit in reply.edits:
            if edit.value is None:
                self.chgheader(edit.name, edit.index or 1, "")
            elif edit.index is None:
                self.addheader(edit.name, edit.value.replace("\r\n", "\n"))
            else:
                self.addheader(edit.name, edit.value.replace("\r\n", "\n"), edit.index)
        return ACCEPT


# glibc's mallopt parameter; fixing it also stops glibc from raising it on every free.
_M_MMAP_THRESHOLD = -3


def _return_large_buffers() -> None:
    """Make glibc give every buffer of 256 KiB or more back to the system when it is freed.
    By default it raises that threshold up to 32 MiB as buffers are freed, and then keeps a
    freed 24 MB body in the arena of the libmilter thread that parsed it: with a thread per
    connection, memory grew by every large body ever seen at once (#11 item 9)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not libc.mallopt(_M_MMAP_THRESHOLD, 256 * 1024):
            log.warning("mallopt(M_MMAP_THRESHOLD) refused; large bodies may stay resident")
    except (OSError, AttributeError):
        log.warning("not glibc: cannot set M_MMAP_THRESHOLD; large bodies may stay resident")


def run(service: MailService, socket_spec: str, timeout: int) -> None:
    """Serve until SIGTERM/SIGINT (libmilter handles the signals)."""
    _return_large_buffers()
    Milter.factory = lambda: WkdMilter(service)
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.DELRCPT)
    log.info("milter-wkd listening on %s", socket_spec)
    Milter.runmilter("milter-wkd", socket_spec, timeout, rmsock=True)
