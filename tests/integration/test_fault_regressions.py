"""Regression tests for defects benchmarks/chaos.py found (issue #16), through the real
peers: Postfix with milter_default_action = tempfail, our milter, slapd, Dovecot.

- A milter that dies after it published a key and its notice went out, before it answered
  Postfix: the same message comes again (Postfix's queue, the client). The retry must
  neither send a second notice nor be refused (a confirmation whose request the first
  attempt used up was answered 550, a bounce to the user). The milter is started with
  MILTER_WKD_TEST_DIE_AFTER_NOTICE=1 (milter_wkd.submissions): it SIGKILLs itself right
  after it recorded the sent notice in the directory, before its reply. (The first
  version of this test killed the milter from a relay for its notices, on the QUIT after
  the notice's 250: the old code sent two notices and refused the retried confirmation.)
- Dovecot after slapd was killed and restarted: SMTP AUTH and IMAP logins succeed without
  waiting for Dovecot's LDAP reconnect (the shipped auth cache answers known users).
"""

from __future__ import annotations

import grp
import imaplib
import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from milter_wkd.sandbox import Sandbox
from milter_wkd.submissions import DIE_AFTER_NOTICE
from milter_wkd.values import Fingerprint
from tests.support.mail import sandbox_fixture  # noqa: F401 (the `sandbox` fixture)
from tests.support.wksmail import SUBMISSION, WksClient, inbox, published, wait_for_mail

PUBLISHED = "Your key has been published"
DYING = "dying before the reply"


def restart_milter(sandbox: Sandbox, *, die_after_notice: bool = False) -> None:
    """Stop the milter (or reap it when it died), start it, and wait until Postfix may
    connect: `milter-wkd milter` sets the socket's group a moment after libmilter made it
    (root's probe in MilterDaemon.start connects before; Postfix got EACCES, 451)."""
    milter = sandbox.milter
    assert milter is not None
    milter.stop()
    if die_after_notice:
        os.environ[DIE_AFTER_NOTICE] = "1"  # the milter inherits it
    try:
        milter.start()
    finally:
        os.environ.pop(DIE_AFTER_NOTICE, None)
    postfix_gid = grp.getgrnam("postfix").gr_gid
    deadline = time.monotonic() + 10
    while milter.socket_path.stat().st_gid != postfix_gid:
        assert time.monotonic() < deadline, "the milter socket never got group postfix"
        time.sleep(0.02)


def with_message_id(raw: bytes, message_id: str) -> bytes:
    """gpg-wks-client writes no Message-ID; a client's retry sends the one it gave."""
    assert not raw.lower().startswith(b"message-id:")
    assert b"\nmessage-id:" not in raw.lower()
    return f"Message-ID: {message_id}\r\n".encode() + raw


def send(sandbox: Sandbox, raw: bytes, sender: str, *, login: tuple[str, str] | None,
         ) -> tuple[int, bytes]:
    """One SMTP transaction to the submission address; the reply to DATA."""
    endpoint = sandbox.postfix.submission if login else sandbox.postfix.inbound
    with smtplib.SMTP(endpoint.host, endpoint.port, timeout=60) as smtp:
        smtp.ehlo("client.test.example.net")
        if login is not None:
            try:
                smtp.login(*login)
            except smtplib.SMTPException as exc:
                raise AssertionError(f"{exc}\n{logs(sandbox)}") from None
        for code, reply in (smtp.mail(sender), smtp.rcpt(SUBMISSION)):
            assert code == 250, f"{code} {reply!r}\n{logs(sandbox)}"
        return smtp.data(raw)


def logs(sandbox: Sandbox) -> str:
    assert sandbox.milter is not None
    return (f"Postfix:\n{Path(sandbox.postfix.maillog).read_text(errors='replace')[-3000:]}\n"
            f"milter:\n{sandbox.milter.log.read_text(errors='replace')[-3000:]}")


def notices(sandbox: Sandbox, user: str, in_reply_to: str) -> list[EmailMessage]:
    return [m for m in inbox(sandbox, user) if str(m.get("Subject", "")) == PUBLISHED
            and str(m.get("In-Reply-To", "")) == in_reply_to]


def queue_settled(sandbox: Sandbox, timeout: float = 30.0) -> None:
    """Until Postfix's queue is empty: every notice handed over is delivered by then."""
    deadline = time.monotonic() + timeout
    while True:
        listing = subprocess.run(
            ["postqueue", "-c", str(sandbox.postfix.config_dir), "-j"],
            capture_output=True, timeout=30, check=False).stdout.strip()
        if not listing:
            return
        assert time.monotonic() < deadline, f"Postfix's queue did not empty: {listing!r}"
        time.sleep(0.3)


def killed_after_the_notice(sandbox: Sandbox, raw: bytes, sender: str,
                            login: tuple[str, str] | None) -> None:
    """Send to a milter that dies after its notice went out and was recorded: Postfix
    answers 4xx (milter_default_action = tempfail). Then the milter is started again, as
    systemd would (Restart=on-failure)."""
    assert sandbox.milter is not None
    restart_milter(sandbox, die_after_notice=True)
    logged = sandbox.milter.log.stat().st_size
    code, reply = send(sandbox, raw, sender, login=login)
    assert 400 <= code < 500, (code, reply)
    assert DYING in sandbox.milter.log.read_bytes()[logged:].decode(errors="replace"), \
        logs(sandbox)
    restart_milter(sandbox)


@pytest.fixture(scope="module")
def users(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory,
          ) -> Iterator[dict[str, WksClient]]:
    """alice and bob with gpg homes of their own (a key each, made once)."""
    made = {name: WksClient(tmp_path_factory.mktemp(name), sandbox,
                            f"{name.title()} <{sandbox.users[name]['address']}>")
            for name in ("alice", "bob")}
    yield made
    for client in made.values():
        client.close()


def test_a_retried_authenticated_submission_gets_one_notice(
        sandbox: Sandbox, users: dict[str, WksClient]) -> None:
    alice = users["alice"]
    account = sandbox.users["alice"]
    login = (account["address"], account["password"])
    message_id = "<retry-auth-submit@client.test.example.net>"
    raw = with_message_id(alice.create(account["address"]), message_id)
    killed_after_the_notice(sandbox, raw, account["address"], login)
    stored = published(sandbox, account["address"])
    assert stored is not None
    assert stored.fingerprint == Fingerprint.parse(alice.fpr)
    code, reply = send(sandbox, raw, account["address"], login=login)  # the retry
    assert code == 250, reply
    wait_for_mail(sandbox, "alice", lambda m: str(m.get("In-Reply-To", "")) == message_id)
    queue_settled(sandbox)
    assert len(notices(sandbox, "alice", message_id)) == 1
    again = published(sandbox, account["address"])
    assert again is not None
    assert again.fingerprint == Fingerprint.parse(alice.fpr)


def test_a_retried_confirmation_is_neither_refused_nor_notified_twice(
        sandbox: Sandbox, users: dict[str, WksClient]) -> None:
    bob = users["bob"]
    address = sandbox.users["bob"]["address"]
    code, reply = send(sandbox, bob.create(address), address, login=None)
    assert code == 250, reply
    request = wait_for_mail(sandbox, "bob",
                            lambda m: str(m.get("Subject", "")).startswith("Confirm"))
    message_id = "<retry-confirmation@client.test.example.net>"
    response = with_message_id(bob.receive(request.raw), message_id)
    killed_after_the_notice(sandbox, response, address, None)
    stored = published(sandbox, address)
    assert stored is not None
    assert stored.fingerprint == Fingerprint.parse(bob.fpr)
    code, reply = send(sandbox, response, address, login=None)  # the sending MTA retries
    assert code == 250, reply  # not "550 no pending request (used ...)": a bounce
    wait_for_mail(sandbox, "bob", lambda m: str(m.get("In-Reply-To", "")) == message_id)
    queue_settled(sandbox)
    assert len(notices(sandbox, "bob", message_id)) == 1


def smtp_login(sandbox: Sandbox, user: str, password: str | None = None) -> None:
    account = sandbox.users[user]
    endpoint = sandbox.postfix.submission
    with smtplib.SMTP(endpoint.host, endpoint.port, timeout=60) as smtp:
        smtp.ehlo("client.test.example.net")
        smtp.login(account["address"], password or account["password"])


def imap_login(sandbox: Sandbox, user: str) -> None:
    account = sandbox.users[user]
    imap = imaplib.IMAP4(sandbox.dovecot.imap.host, sandbox.dovecot.imap.port, timeout=60)
    try:
        imap.login(account["address"], account["password"])
    finally:
        imap.logout()


def timed(login: Callable[[Sandbox, str], None], sandbox: Sandbox, user: str) -> float:
    began = time.monotonic()
    login(sandbox, user)
    return time.monotonic() - began


def penalties(sandbox: Sandbox) -> list[str]:
    """The addresses Dovecot's auth penalty holds (`doveadm penalty`, header left out)."""
    listing = subprocess.run(["doveadm", "-c", str(sandbox.dovecot.config_file), "penalty"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    return listing.splitlines()[1:]


def test_logins_ride_out_a_slapd_restart(sandbox: Sandbox) -> None:
    """Dovecot 2.3 reconnects to LDAP only when the next request comes and gives a lookup
    up only after 4 to 6 s: logins while slapd restarted failed ("Temporary authentication
    failure") or stalled, and every such failure raised the auth penalty of the client's
    address, which then held up all logins from it (the known users' too) for 4 to 15 s.
    The shipped config caches what the directory said, so a known user's login neither
    fails nor raises the penalty (which stays on: see dovecot/milter-wkd.conf)."""
    smtp_login(sandbox, "carol")  # Dovecot knows carol now
    imap_login(sandbox, "carol")
    pid = sandbox.slapd.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # a crash, as benchmarks/chaos.py's slapd-kill
    try:
        down = (timed(smtp_login, sandbox, "carol"), timed(imap_login, sandbox, "carol"))
        assert penalties(sandbox) == []
    finally:
        sandbox.slapd.start()
    after = (timed(smtp_login, sandbox, "carol"), timed(imap_login, sandbox, "carol"))
    assert penalties(sandbox) == []
    print(f"\nlogins with slapd down: SMTP AUTH {down[0]:.3f} s, IMAP {down[1]:.3f} s, "
          f"right after its restart: "
          f"SMTP AUTH {after[0]:.3f} s, IMAP {after[1]:.3f} s")


def test_the_milter_socket_is_born_with_its_mode(sandbox: Sandbox, tmp_path: Path) -> None:
    """libmilter creates the socket with the process umask; the mode used to be set up to
    50 ms later, and a connection in that window was refused ("Permission denied": Postfix
    answered 451). The first stat of a new milter's socket must show [milter] socket_mode."""
    path = tmp_path / "second.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "milter_wkd", "milter", "--config",
         str(sandbox.config_path), "--socket", f"unix:{path}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        first = None
        while first is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                first = os.stat(path)
            except FileNotFoundError:
                continue  # poll as fast as we can: the window was milliseconds wide
        assert first is not None, "the socket did not appear"
        assert first.st_mode & 0o777 == 0o660, oct(first.st_mode & 0o777)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
