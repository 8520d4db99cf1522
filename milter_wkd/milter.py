"""The pymilter adapter: Postfix calls it on submission and inbound mail (Milter protocol 6).

It only collects and relays: the recipients, the header fields and (when needed) the body
fill a `Transaction`, and at end of message `MailService.decide` returns a `Reply` that is
applied here. Bodies are collected only when needed (mail to a submission address, or DKIM
signing in the milter), capped at [milter] max_submission_bytes, in memory up to [milter]
body_memory_bytes and beyond that in an unnamed temporary file (closed, hence gone, at end
of message, abort or disconnect).

A Python milter costs what libmilter and pymilter cost per callback, so each connection
negotiates away every step it has no use for and answers none before end of message (see
`_negotiate`), and the callbacks are plain functions registered with pymilter's C module
(pymilter's `Milter.Base` adds a lambda, a decoding method and a @noreply wrapper to every
call). The sender, the SASL login and the client address come as macros Postfix is asked
for (SMFIF_SETSYMLIST; this replaces milter_mail_macros and the other milter_*_macros for
this milter only): `{mail_addr} {auth_authen} {client_addr}` at end of message, or with
the first RCPT TO when the milter signs (the body is read only for our users' mail). An MTA
that cannot be asked gets the connect and MAIL FROM steps, and {auth_authen} from its
configured MAIL FROM macros, as before.

The queue id (macro `i`, asked for at end of message; at MAIL FROM only when smtpd opens
its queue file that early) is the log context of everything logged while the message is
handled (milter_wkd.logcontext); a problem with the body (the decision to keep it, or
keeping it) is logged at end of message, with it. `MailService.wants_body`, asked at the
first body chunk, logs nothing. The id is cleared at end of message, abort and close.

Reads [milter] socket, timeout and dkim_sign_outgoing. Failure: no exception ever reaches
libmilter from the body or end of message; an unexpected error while handling mail to a
submission address answers 451 4.3.0 (Postfix keeps the mail), elsewhere the mail passes
unchanged (Autocrypt and signing never stop mail); an exception in another callback is
pymilter's 451 (its default exception policy). Postfix's own milter_default_action
(tempfail in the shipped snippet) covers a dead milter. No {client_addr} from an MTA that
was asked for it is logged once as a warning: trusted_networks then matches no client.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import socket
import time
from typing import Any

import milter as libmilter  # pymilter's C module: libmilter itself

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

# pymilter has no type information; name its constants once, typed.
CONTINUE: int = libmilter.CONTINUE
NOREPLY: int = libmilter.NOREPLY
ACCEPT: int = libmilter.ACCEPT
REJECT: int = libmilter.REJECT
TEMPFAIL: int = libmilter.TEMPFAIL
DISCARD: int = libmilter.DISCARD

# What the milter may do to a message.
ACTIONS: int = libmilter.ADDHDRS | libmilter.CHGHDRS | libmilter.DELRCPT
SETSYMLIST: int = libmilter.SETSYMLIST
# Steps the MTA need not send: no callback here wants them.
SKIPPED_STEPS: int = (libmilter.P_NOHELO | libmilter.P_NODATA | libmilter.P_NOUNKNOWN
                      | libmilter.P_NOEOH)
# Skipped too when the MTA sends the macros asked for (IDENTITY_MACROS).
MACRO_STEPS: int = libmilter.P_NOCONNECT | libmilter.P_NOMAIL
# Only end of message answers; libmilter itself answers "continue" for an MTA that
# cannot do without a reply (it offers these flags to every milter).
NO_REPLY: int = (libmilter.P_NR_CONN | libmilter.P_NR_MAIL | libmilter.P_NR_RCPT
                 | libmilter.P_NR_HDR | libmilter.P_NR_EOH | libmilter.P_NR_BODY)
# Who sends: asked for with the first RCPT TO when the body decision needs them (DKIM
# signing), else at end of message, where the queue id is asked for too (Postfix names it
# at end of message; at earlier stages only when smtpd opened its queue file early). A
# milter that asks for macros gets none at the stages it did not name.
IDENTITY_MACROS = "{auth_authen} {client_addr} {mail_addr}"
QUEUE_ID_MACRO = "i"

# Headers kept per message: more than real mail has (Postfix's hopcount_limit refuses mail
# with over 50 Received headers), few enough that a flood of headers cannot grow a
# connection's memory without bound. Those beyond are not looked at.
MAX_HEADERS = 2000

# Warnings given once per process, not once per message.
_warned: set[str] = set()


class Connection:
    """What one SMTP connection keeps between callbacks (pymilter's setpriv); libmilter
    runs connections in parallel, each in its own thread, one callback at a time."""

    __slots__ = ("body_decided", "body_problem", "client_ip", "identity_at", "service", "tx")

    def __init__(self, service: MailService) -> None:
        self.service = service
        # The address from the connect step (an MTA that cannot send macros on request).
        self.client_ip: str | None = None
        # Where the sender, login and client address come from: the connect and MAIL FROM
        # steps (""), or IDENTITY_MACROS with the first RCPT TO ("rcpt") or at end of
        # message ("eom").
        self.identity_at = ""
        self.tx = Transaction()
        self.body_decided = False
        # What went wrong with the body, logged at end of message when Postfix has named
        # the queue id (it names none before): what, and the exception if unexpected.
        self.body_problem: tuple[str, BaseException | None] | None = None

    def next_transaction(self) -> Transaction:
        """Done with the message (end of message, abort): the next one starts empty."""
        self.tx.close()
        self.tx = Transaction(client_ip=self.client_ip)
        self.body_decided = False
        self.body_problem = None
        return self.tx


def client_ip_of(macro: str | None) -> str | None:
    """The address in Postfix's {client_addr} ("192.0.2.1", "IPv6:2001:db8::1")."""
    if not macro:
        return None
    if macro[:5].lower() == "ipv6:":
        return macro[5:]
    return macro


def _take_identity(ctx: Any, tx: Transaction) -> None:
    """Sender, login and client address of the message from IDENTITY_MACROS."""
    tx.client_ip = client_ip_of(ctx.getsymval("{client_addr}"))
    tx.sasl_login = ctx.getsymval("{auth_authen}") or None
    tx.mail_from = ctx.getsymval("{mail_addr}") or ""
    if tx.client_ip is None and "client_addr" not in _warned:
        _warned.add("client_addr")
        log.warning("the MTA sent no {client_addr} although asked: [milter] "
                    "trusted_networks matches no client")


# --- callbacks: pymilter calls each with its context object first -----------------------

def _negotiate(service: MailService, ctx: Any, opts: list[int]) -> int:
    """First callback of every connection: what the MTA sends, and the connection's state.
    opts: [actions, protocol steps, 0, 0] offered; set to what we take."""
    conn = Connection(service)
    ctx.setpriv(conn)
    actions, offered = opts[0], opts[1]
    steps = SKIPPED_STEPS
    wanted = ACTIONS
    if actions & SETSYMLIST and offered & MACRO_STEPS == MACRO_STEPS:
        wanted |= SETSYMLIST
        steps |= MACRO_STEPS
        # wants_body asks who sends only when the milter signs (MailService.wants_body).
        if service.config.milter.dkim_sign_outgoing:
            conn.identity_at = "rcpt"
            ctx.setsymlist(libmilter.M_ENVRCPT, IDENTITY_MACROS)
            ctx.setsymlist(libmilter.M_EOM, QUEUE_ID_MACRO)
        else:
            conn.identity_at = "eom"
            ctx.setsymlist(libmilter.M_EOM, f"{QUEUE_ID_MACRO} {IDENTITY_MACROS}")
    opts[0] = wanted & actions
    # Steps the MTA cannot skip it sends; their callbacks just do not answer.
    opts[1] = (steps & offered) | NO_REPLY
    opts[2] = opts[3] = 0
    return CONTINUE


def _connect(ctx: Any, hostname: str, family: int, hostaddr: Any) -> int:
    """Only for an MTA that cannot send macros on request."""
    del hostname
    if family in (socket.AF_INET, socket.AF_INET6) and hostaddr:
        conn: Connection = ctx.getpriv()
        conn.client_ip = conn.tx.client_ip = str(hostaddr[0])
    return NOREPLY


def _envfrom(ctx: Any, mail_from: bytes, *params: bytes) -> int:
    """Only for an MTA that cannot send macros on request; its milter_mail_macros must
    name {auth_authen}."""
    del params
    tx = ctx.getpriv().next_transaction()
    tx.sasl_login = ctx.getsymval("{auth_authen}") or None
    tx.queue_id = ctx.getsymval("i") or logcontext.NO_QUEUE_ID
    tx.mail_from = mail_from.decode("utf-8", "surrogateescape").strip("<>")
    logcontext.set_queue_id(tx.queue_id)
    return NOREPLY


def _envrcpt(ctx: Any, recipient: bytes, *params: bytes) -> int:
    del params
    conn: Connection = ctx.getpriv()
    tx = conn.tx
    if not tx.recipients and conn.identity_at == "rcpt":
        _take_identity(ctx, tx)
    tx.recipients.append(recipient.decode("utf-8", "surrogateescape").strip("<>"))
    return NOREPLY


def _header(ctx: Any, name: str, value: bytes) -> int:
    headers = ctx.getpriv().tx.headers
    if len(headers) < MAX_HEADERS:
        headers.append((name, value.decode("utf-8", "surrogateescape")))
    return NOREPLY


def _eoh(ctx: Any) -> int:
    """Only for an MTA that cannot skip end of header."""
    del ctx
    return NOREPLY


def _body(ctx: Any, chunk: bytes) -> int:
    conn: Connection = ctx.getpriv()
    tx = conn.tx
    if not conn.body_decided:
        # First chunk: the envelope and the header are complete.
        conn.body_decided = True
        try:
            tx.collect_body = conn.service.wants_body(tx)
        except Exception as exc:  # noqa: BLE001 - logged at end of message, with its trace
            conn.body_problem = ("deciding whether to read the body failed", exc)
            tx.collect_body = False
    if tx.collect_body and not tx.oversize:
        service = conn.service
        if tx.body_size + len(chunk) > service.max_body:
            tx.oversize = True
            tx.drop_body()
        else:
            try:
                tx.add_body(chunk, service.body_memory, service.spool)
            except OSError as exc:
                # No exception may reach libmilter; the service answers 451 for it.
                conn.body_problem = (f"body not kept ({exc})", None)
    return NOREPLY


def _eom(ctx: Any) -> int:
    conn: Connection = ctx.getpriv()
    tx = conn.tx
    service = conn.service
    if tx.queue_id == logcontext.NO_QUEUE_ID:
        tx.queue_id = ctx.getsymval("i") or logcontext.NO_QUEUE_ID
    logcontext.set_queue_id(tx.queue_id)
    if conn.identity_at == "eom":
        _take_identity(ctx, tx)
    if conn.body_problem is not None:
        what, exc = conn.body_problem
        log.warning("%s", what, exc_info=exc)
    started = time.perf_counter()
    try:
        reply = service.decide(tx)
        log.log(logging.INFO if service.is_submission(tx) else logging.DEBUG,
                "%s after %.3f s of milter time", type(reply).__name__,
                time.perf_counter() - started)
    except Exception:
        log.exception("unexpected error")
        reply = INTERNAL_ERROR if service.is_submission(tx) else Accept()
    try:
        return _apply(ctx, reply)
    except Exception:
        log.exception("applying %s failed", type(reply).__name__)
        return TEMPFAIL if service.is_submission(tx) else CONTINUE
    finally:
        conn.next_transaction()
        logcontext.clear()


def _abort(ctx: Any) -> int:
    conn: Connection | None = ctx.getpriv()
    if conn is not None:
        conn.next_transaction()
    logcontext.clear()
    return CONTINUE


def _close(ctx: Any) -> int:
    conn: Connection | None = ctx.getpriv()
    if conn is not None:
        conn.tx.close()
    logcontext.clear()
    return CONTINUE


# --- replies ----------------------------------------------------------------------------

def _apply(ctx: Any, reply: Reply) -> int:
    if isinstance(reply, Reject):
        ctx.setreply(str(reply.code), reply.xcode, milter_text(reply.text))
        return REJECT
    if isinstance(reply, TempFail):
        ctx.setreply(str(reply.code), reply.xcode, milter_text(reply.text))
        return TEMPFAIL
    if isinstance(reply, Discard):
        return DISCARD
    for recipient in reply.remove_recipients:
        ctx.delrcpt(f"<{recipient}>")
    for edit in reply.edits:
        if edit.value is None:
            ctx.chgheader(edit.name, edit.index or 1, "")
        else:
            ctx.addheader(edit.name, edit.value.replace("\r\n", "\n"),
                          -1 if edit.index is None else edit.index)
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
    libmilter.set_flags(ACTIONS | SETSYMLIST)
    libmilter.set_connect_callback(_connect)
    libmilter.set_envfrom_callback(_envfrom)
    libmilter.set_envrcpt_callback(_envrcpt)
    libmilter.set_header_callback(_header)
    libmilter.set_eoh_callback(_eoh)
    libmilter.set_body_callback(_body)
    libmilter.set_eom_callback(_eom)
    libmilter.set_abort_callback(_abort)
    libmilter.set_close_callback(_close)
    libmilter.setconn(socket_spec)
    if timeout > 0:
        libmilter.settimeout(timeout)
    libmilter.register("milter-wkd", negotiate=functools.partial(_negotiate, service))
    libmilter.opensocket(True)
    log.info("milter-wkd listening on %s", socket_spec)
    libmilter.main()
