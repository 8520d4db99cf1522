"""OpenDKIM verifies the DKIM signatures milter-wkd makes: on a user's mail signed by the
milter in real Postfix and delivered by Dovecot, on the WKS notice the milter sends, and on
mail signed directly; the sandbox signs with both its keys (RSA-2048 and Ed25519).
OpenDKIM runs in its test mode (`opendkim -t`) with the sandbox's TXT records as test DNS
data (tests/support/opendkim.py); a changed message must fail under both signatures."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from milter_wkd import dkim
from milter_wkd.sandbox import Sandbox
from tests.support.mail import sandbox_fixture  # noqa: F401 (the `sandbox` fixture)
from tests.support.opendkim import Verdict, opendkim_verdicts
from tests.support.wksmail import SUBMISSION, WksClient, send_raw, wait_for_mail

PUBLISHED = "Your key has been published"
BOTH_PASS = [Verdict("pass", "rsa-sha256", "wkd-rsa"), Verdict("pass", "ed25519-sha256", "wkd")]
BOTH_FAIL = [Verdict("fail", "rsa-sha256", "wkd-rsa"), Verdict("fail", "ed25519-sha256", "wkd")]


def records(sandbox: Sandbox) -> dict[str, str]:
    keys = (dkim.load_key(sandbox.dkim_rsa_key, "example.org", "wkd-rsa", "rsa"),
            dkim.load_key(sandbox.dkim_key, "example.org", "wkd", "ed25519"))
    return {key.dns_name(): key.dns_record() for key in keys}


@pytest.fixture(scope="module")
def alice(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WksClient]:
    client = WksClient(tmp_path_factory.mktemp("alice"), sandbox, "Alice <alice@example.org>")
    yield client
    client.close()


def login(sandbox: Sandbox, user: str) -> tuple[str, str]:
    return sandbox.users[user]["address"], sandbox.users[user]["password"]


def test_user_mail_through_postfix(sandbox: Sandbox, tmp_path: Path) -> None:
    message_id = f"<{uuid.uuid4().hex}@test.example.net>"
    raw = (f"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: hello\r\n"
           f"Message-ID: {message_id}\r\nMIME-Version: 1.0\r\n"
           f"Content-Type: text/plain\r\n\r\nHello Bob.\r\n").encode()
    submission = sandbox.postfix.submission
    send_raw(submission.host, submission.port, "alice@example.org", ["bob@example.org"], raw,
             login=login(sandbox, "alice"))
    delivered = wait_for_mail(sandbox, "bob", lambda m: str(m.get("Message-ID")) == message_id)
    assert len(delivered.get_all("DKIM-Signature") or []) == 2
    assert opendkim_verdicts(delivered.raw, records(sandbox), tmp_path / "good") == BOTH_PASS
    changed = delivered.raw.replace(b"Hello Bob.", b"Hello Bob!")
    assert changed != delivered.raw
    assert opendkim_verdicts(changed, records(sandbox), tmp_path / "changed") == BOTH_FAIL


def test_wks_notice(sandbox: Sandbox, alice: WksClient, tmp_path: Path) -> None:
    submission = sandbox.postfix.submission
    send_raw(submission.host, submission.port, "alice@example.org", [SUBMISSION],
             alice.create("alice@example.org"), login=login(sandbox, "alice"))
    notice = wait_for_mail(sandbox, "alice",
                           lambda m: str(m.get("Subject", "")) == PUBLISHED)
    assert opendkim_verdicts(notice.raw, records(sandbox), tmp_path / "good") == BOTH_PASS
    changed = notice.raw.replace(b"Subject: ", b"Subject: Re: ", 1)
    assert opendkim_verdicts(changed, records(sandbox), tmp_path / "changed") == BOTH_FAIL


def test_direct_signing_rsa_only_and_ed25519_only(tmp_path: Path) -> None:
    """Each kind alone, on a message with what our signer must get right: folded and
    repeated headers, white space at line ends, empty lines at the end of the body."""
    message = (b"Received: from a\r\n\tby b\r\nFrom: Alice <alice@example.org>\r\n"
               b"To: bob@example.org\r\nSubject:  folded\r\n   twice \r\nDate: x\r\n"
               b"Autocrypt: addr=alice@example.org; keydata=\r\n AAAA\r\n\r\n"
               b"line  with  spaces \t\r\n\r\n\r\n")
    kinds: list[tuple[dkim.Algorithm, str]] = [("rsa", "rsa"), ("ed25519", "ed")]
    for algorithm, selector in kinds:
        key = dkim.generate_key(tmp_path / f"{selector}.pem", "example.org", selector,
                                algorithm)
        found = opendkim_verdicts(dkim.sign(message, key), {key.dns_name(): key.dns_record()},
                                  tmp_path / selector)
        assert found == [Verdict("pass", key.signature_algorithm.decode(), selector)]
