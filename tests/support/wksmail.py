"""WKS test support: waiting for mail by subject, clients with real gpg-wks-client."""

from __future__ import annotations

import email
import email.policy
import imaplib
import smtplib
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import pytest

from milter_wkd.config import load
from milter_wkd.sandbox import Sandbox
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.model import StoredKey
from milter_wkd.values import Address
from tests.support.gnupg import WKS_CLIENT, GnuPG
from tests.support.mail import imap_login

SUBMISSION = "key-submission@example.org"
FAKE = ("--fake-submission-addr", SUBMISSION)


class Mail(EmailMessage):
    """A delivered message, parsed, with the bytes IMAP gave (`raw`) for byte-exact use."""

    raw: bytes = b""


def inbox(sandbox: Sandbox, user: str) -> list[Mail]:
    imap = imap_login(sandbox, user)
    try:
        imap.select("INBOX", readonly=True)
        status, data = imap.search(None, "ALL")
        assert status == "OK", data
        found = []
        for number in data[0].split():
            status, parts = imap.fetch(number, "(RFC822)")
            first = parts[0]
            assert status == "OK"
            assert isinstance(first, tuple)
            parsed = email.message_from_bytes(first[1], _class=Mail,
                                              policy=email.policy.default)
            assert isinstance(parsed, Mail)
            parsed.raw = first[1]
            found.append(parsed)
        return found
    finally:
        imap.logout()


def wait_for_mail(sandbox: Sandbox, user: str, match: Callable[[EmailMessage], bool],
                  timeout: float = 30.0) -> Mail:
    """The first message in user's INBOX that matches; fails with the logs otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        for message in inbox(sandbox, user):
            if match(message):
                return message
        if time.monotonic() > deadline:
            log = Path(sandbox.postfix.maillog).read_text(errors="replace")[-3000:]
            milter_log = sandbox.milter.log.read_text(errors="replace")[-3000:]
            pytest.fail(f"no matching mail for {user} within {timeout} s\nPostfix:\n{log}\n"
                        f"milter:\n{milter_log}")
        time.sleep(0.2)


def clear_inbox(sandbox: Sandbox, user: str) -> None:
    imap = imap_login(sandbox, user)
    try:
        imap.select("INBOX")
        imap.store("1:*", "+FLAGS", "\\Deleted")
        imap.expunge()
    except imaplib.IMAP4.error:
        pass
    finally:
        imap.logout()


def subject_is(text: str) -> Callable[[EmailMessage], bool]:
    return lambda message: str(message.get("Subject", "")) == text


def send_raw(endpoint_host: str, port: int, sender: str, recipients: list[str], raw: bytes,
             login: tuple[str, str] | None = None) -> None:
    with smtplib.SMTP(endpoint_host, port, timeout=60) as smtp:
        smtp.ehlo("client.test.example.net")
        if login is not None:
            smtp.login(*login)
        smtp.sendmail(sender, recipients, raw)


def directory(sandbox: Sandbox) -> LdapStore:
    return LdapStore(load(sandbox.config_path, environ={}).directory)


def published(sandbox: Sandbox, address: str) -> StoredKey | None:
    with directory(sandbox) as store:
        return store.key_for(Address.parse(address))


class WksClient:
    """A user with a real GnuPG home that trusts the sandbox's submission key."""

    def __init__(self, home: Path, sandbox: Sandbox, user_id: str) -> None:
        self.gpg = GnuPG(home)
        self.gpg.import_key(sandbox.submission_public_key.read_bytes())
        self.fpr = self.gpg.generate(user_id)

    def create(self, address: str) -> bytes:
        """The submission mail gpg-wks-client --create writes (CRLF line ends)."""
        return self.gpg.run(*FAKE, "--create", self.fpr, address, binary=WKS_CLIENT).stdout

    def receive(self, raw: bytes) -> bytes:
        """gpg-wks-client --receive on a confirmation request: the response mail."""
        return self.gpg.run(*FAKE, "--receive", input=raw, binary=WKS_CLIENT).stdout

    def close(self) -> None:
        self.gpg.close()
