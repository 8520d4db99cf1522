"""Mail-side test support: a running sandbox (real slapd, Dovecot, Postfix), SMTP and IMAP
clients, and process-tree checks.

    from tests.support.mail import sandbox_fixture  # noqa: F401 (the `sandbox` fixture)

    def test_x(sandbox: Sandbox) -> None:
        message_id = send(sandbox.postfix.inbound, "x@example.net", ["alice@example.org"])
        assert fetch(sandbox, "alice", message_id)
"""

from __future__ import annotations

import imaplib
import shutil
import smtplib
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from milter_wkd.sandbox import Endpoint, Sandbox, SandboxError
from milter_wkd.sandbox.daemons import alive
from tests.support.peers import require_binary

BINARIES = ("slapd", "slapadd", "ldapwhoami", "postfix", "dovecot")


def require_mail_binaries() -> None:
    for name in BINARIES:
        require_binary(name)


@pytest.fixture(scope="module", name="sandbox")
def sandbox_fixture() -> Iterator[Sandbox]:
    """One running sandbox per test module; torn down even when a test fails.

    Its directory is a fresh one in /tmp (removed afterwards), not under pytest's
    tmp_path: that lies below /tmp/pytest-of-root (mode 0700), where Postfix and the
    mail owner cannot reach their files.
    """
    require_mail_binaries()
    yield from _started_sandbox()


def _started_sandbox() -> Iterator[Sandbox]:
    # A port chosen free can be taken (as some connection's ephemeral source port) before
    # the daemon binds it; a second sandbox on fresh ports is the cure, not a skip.
    try:
        sandbox = Sandbox().start()
    except SandboxError as first:
        print(f"sandbox start failed once, retrying: {first}", file=sys.stderr)
        sandbox = Sandbox().start()
    try:
        yield sandbox
    finally:
        sandbox.stop()


@pytest.fixture(name="sandbox_dir")
def sandbox_dir_fixture() -> Iterator[Path]:
    """An empty directory in /tmp for one sandbox (see above), removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="milter-wkd-test-"))
    directory.chmod(0o711)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def message(sender: str, recipients: Iterable[str], subject: str = "sandbox test",
            body: str = "Hello from the sandbox tests.\n") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@test.example.net>"
    msg.set_content(body)
    return msg


def send(endpoint: Endpoint, sender: str, recipients: list[str],
         login: tuple[str, str] | None = None, msg: EmailMessage | None = None) -> str:
    """Send one message over SMTP (optionally after AUTH); returns its Message-ID."""
    msg = msg if msg is not None else message(sender, recipients)
    with smtplib.SMTP(endpoint.host, endpoint.port, timeout=30) as smtp:
        smtp.ehlo("client.test.example.net")
        if login is not None:
            smtp.login(*login)
        smtp.send_message(msg, from_addr=sender, to_addrs=recipients)
    return str(msg["Message-ID"])


def imap_login(sandbox: Sandbox, user: str, password: str | None = None) -> imaplib.IMAP4:
    account = sandbox.users[user]
    imap = imaplib.IMAP4(sandbox.dovecot.imap.host, sandbox.dovecot.imap.port, timeout=30)
    imap.login(account["address"], password if password is not None else account["password"])
    return imap


def fetch(sandbox: Sandbox, user: str, message_id: str, timeout: float = 20.0) -> bytes:
    """The raw message with this Message-ID in the user's INBOX, read over IMAP.

    Waits (polling) until it has been delivered; fails the test with the tail of the
    Postfix log when it does not arrive.
    """
    deadline = time.monotonic() + timeout
    imap = imap_login(sandbox, user)
    try:
        while True:
            imap.select("INBOX", readonly=True)
            status, data = imap.search(None, "HEADER", "Message-ID", message_id)
            assert status == "OK", data
            numbers = data[0].split()
            if numbers:
                status, parts = imap.fetch(numbers[-1], "(RFC822)")
                assert status == "OK", parts
                first = parts[0]
                assert isinstance(first, tuple)
                return first[1]
            if time.monotonic() > deadline:
                log = Path(sandbox.postfix.maillog).read_text(errors="replace")
                pytest.fail(f"{message_id} did not reach {user}'s INBOX within {timeout} s;"
                            f" Postfix log:\n{log[-3000:]}")
            time.sleep(0.1)
    finally:
        imap.logout()


def descendants(roots: Iterable[int]) -> set[int]:
    """The given pids and every live process below them (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text(errors="replace")
        except OSError:
            continue
        fields = text.rpartition(")")[2].split()
        parents[int(stat.parent.name)] = int(fields[1])
    seen = set(roots)
    frontier = set(roots)
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - seen
        seen |= frontier
    return {pid for pid in seen if alive(pid)}


def wait_gone(pids: set[int], timeout: float = 15.0) -> set[int]:
    """Poll until none of pids is alive; returns the survivors (empty when all are gone)."""
    deadline = time.monotonic() + timeout
    while True:
        survivors = {pid for pid in pids if alive(pid)}
        if not survivors or time.monotonic() > deadline:
            return survivors
        time.sleep(0.1)
