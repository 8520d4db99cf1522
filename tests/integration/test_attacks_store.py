"""#11 items 1 and 5 performed as an attacker would, through the real sandbox: Postfix with
our milter, Dovecot's SASL, slapd, gpg-wks-client, and gpg/dirmngr as the victim's
correspondents. Each test failed on the code before the fix (subkey squatting: Bob's
submission was refused, "published by another user already"; the rate limit: 4-5 pending
requests and confirmation mails for a cap of 3)."""

from __future__ import annotations

import smtplib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from milter_wkd import wks
from milter_wkd.sandbox import Sandbox
from milter_wkd.values import Address, Fingerprint
from tests.integration.test_milter_wks import PUBLISHED, _plain_submission, login_of, submit
from tests.support.gnupg import GnuPG
from tests.support.mail import sandbox_fixture  # noqa: F401 (the `sandbox` fixture)
from tests.support.peers import require_binary
from tests.support.squat import squatting_key
from tests.support.wksmail import (
    SUBMISSION,
    WksClient,
    clear_inbox,
    directory,
    inbox,
    published,
    subject_is,
    wait_for_mail,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bob(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WksClient]:
    client = WksClient(tmp_path_factory.mktemp("bob"), sandbox, "Bob <bob@example.org>")
    yield client
    client.close()


def dirmngr_fetch(sandbox: Sandbox, home: Path, fingerprint: str) -> list[str]:
    """What a correspondent's `gpg --keyserver ldap://… --recv-keys FPR` gets."""
    require_binary("dirmngr")
    with GnuPG(home) as gpg:
        proc = gpg.run("--keyserver", sandbox.slapd.uri, "--recv-keys", fingerprint,
                       check=False)
        assert proc.returncode == 0, proc.stderr.decode()
        return [r[9] for r in gpg.colons("--list-keys") if r[0] == "fpr"]


def test_subkey_squatting_cannot_block_the_owner_through_postfix(
        sandbox: Sandbox, bob: WksClient, tmp_path: Path) -> None:
    victim = bob.gpg.export(bob.fpr)
    squat = squatting_key(victim, "Alice <alice@example.org>")
    # Alice, logged in, publishes her key with Bob's primary key as her "encryption subkey",
    # before Bob ever published.
    submit(sandbox, _plain_submission("alice@example.org", squat), "alice@example.org",
           login=login_of(sandbox, "alice"))
    wait_for_mail(sandbox, "alice", subject_is(PUBLISHED))
    # Bob publishes from his mail client: it must work, and take his material back.
    submit(sandbox, bob.create("bob@example.org"), "bob@example.org",
           login=login_of(sandbox, "bob"))
    wait_for_mail(sandbox, "bob", subject_is(PUBLISHED))
    stored = published(sandbox, "bob@example.org")
    assert stored is not None
    assert stored.fingerprint == Fingerprint.parse(bob.fpr)
    alice = published(sandbox, "alice@example.org")
    assert alice is not None
    with directory(sandbox) as store:
        fpr = Fingerprint.parse(bob.fpr)
        held = store.holdings([fpr])
        assert held.claims[fpr.hex].holder == stored.dn
        assert held.attributes[fpr.hex] == ((stored.dn, True),)
        assert bob.fpr not in {s.fingerprint.hex for s in store.holdings(
            [Fingerprint.parse(bob.fpr)]).claims.values() if s.holder != stored.dn}
    # A correspondent looking Bob up by fingerprint finds exactly his key.
    assert dirmngr_fetch(sandbox, tmp_path / "correspondent", bob.fpr)[0] == bob.fpr
    # Alice tries again now that Bob holds it: published without that subkey, and told so.
    clear_inbox(sandbox, "alice")
    submit(sandbox, _plain_submission("alice@example.org", squat), "alice@example.org",
           login=login_of(sandbox, "alice"))
    notice = wait_for_mail(sandbox, "alice", subject_is(PUBLISHED))
    assert "another user" in notice.get_content()
    assert published(sandbox, "bob@example.org") == stored


def test_rate_limit_holds_for_simultaneous_anonymous_submissions(
        sandbox: Sandbox, tmp_path: Path) -> None:
    mallory = WksClient(tmp_path / "mallory", sandbox, "Carol <carol@example.org>")
    try:
        mails = [mallory.create("carol@example.org") for _ in range(12)]
    finally:
        mallory.close()
    clear_inbox(sandbox, "carol")
    barrier = threading.Barrier(len(mails))
    codes: list[int] = []

    def send(raw: bytes) -> None:
        # Every mail is transferred, then all end-of-data dots go out at the same instant,
        # so the milter decides all twelve at once.
        endpoint = sandbox.postfix.inbound
        with smtplib.SMTP(endpoint.host, endpoint.port, timeout=60) as smtp:
            smtp.ehlo("client.test.example.net")
            smtp.mail("carol@example.org")
            smtp.rcpt(SUBMISSION)
            code, _ = smtp.docmd("DATA")
            assert code == 354
            body = b"\r\n".join(b"." + line if line.startswith(b".") else line
                                 for line in raw.replace(b"\r\n", b"\n").split(b"\n"))
            smtp.send(body.rstrip(b"\r\n") + b"\r\n")
            barrier.wait()
            smtp.send(b".\r\n")
            codes.append(smtp.getreply()[0])

    threads = [threading.Thread(target=send, args=(raw,)) for raw in mails]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cap = 3
    assert sorted(codes) == [250] * cap + [550] * (len(mails) - cap), codes
    with directory(sandbox) as store:
        assert store.count_pending(Address.parse("carol@example.org")) == cap
    wait_for_mail(sandbox, "carol", lambda m: sum(
        subject_is(wks.SUBJECT_CONFIRM)(x) for x in inbox(sandbox, "carol")) >= cap)
    assert sum(subject_is(wks.SUBJECT_CONFIRM)(m) for m in inbox(sandbox, "carol")) == cap
