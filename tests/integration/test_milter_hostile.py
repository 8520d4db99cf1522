"""The milter against hostile senders (issue #11 items 9 and 10), end to end: real Postfix
calls our milter, real gpg and gpg-wks-client make keys and answers, real slapd stores.

- reply texts reach the SMTP client as one line of printable ASCII (Postfix accepts them);
- a confirmation response from the wrong From is refused for that reason;
- several large anonymous bodies at once do not each cost their size in milter memory.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from milter_wkd import wks
from milter_wkd.openpgp import packets
from milter_wkd.sandbox import Sandbox
from milter_wkd.values import Fingerprint
from tests.support.mail import sandbox_fixture  # noqa: F401 (the `sandbox` fixture)
from tests.support.wksmail import (
    SUBMISSION,
    WksClient,
    published,
    send_raw,
    subject_is,
    wait_for_mail,
)

PUBLISHED = "Your key has been published"


@pytest.fixture
def client(sandbox: Sandbox, tmp_path: Path, request: pytest.FixtureRequest,
           ) -> Iterator[WksClient]:
    user_id: str = request.param
    made = WksClient(tmp_path / "gnupg", sandbox, user_id)
    yield made
    made.close()


def submit(sandbox: Sandbox, raw: bytes, sender: str) -> None:
    endpoint = sandbox.postfix.inbound
    send_raw(endpoint.host, endpoint.port, sender, [SUBMISSION], raw)


def _plain_submission(sender: str, key: bytes) -> bytes:
    armored = packets.armor(packets.ARMOR_PUBLIC_KEY, key).replace(b"\n", b"\r\n")
    return (f"From: {sender}\r\nTo: {SUBMISSION}\r\nSubject: {wks.SUBJECT_SUBMISSION}\r\n"
            "Content-Type: application/pgp-keys\r\n\r\n").encode() + armored


@pytest.mark.parametrize("client", ["M <m%\u00fc@example.org>"], indirect=True)
def test_a_hostile_address_comes_back_as_one_printable_line(sandbox: Sandbox,
                                                            client: WksClient) -> None:
    """#11 item 10 (a): the refusal quotes the key's address, made printable ASCII."""
    raw = _plain_submission("x@example.net", client.gpg.export(client.fpr))
    with pytest.raises(smtplib.SMTPDataError) as refused:
        submit(sandbox, raw, "x@example.net")
    # Not 451 (what Postfix answers for a reply it finds malformed), but our 550.
    assert refused.value.smtp_code == 550, refused.value
    text = refused.value.smtp_error
    assert all(0x20 <= octet <= 0x7E for octet in text), text
    assert text.startswith(b"5.7.1 Key submission refused: "), text
    # "ü" is one or two "?" (gpg may have taken the command line as Latin-1), "%" is "%".
    assert re.search(rb"m%\?{1,2}@example\.org", text), text


@pytest.mark.parametrize("client", ["Carol <carol@example.org>"], indirect=True)
def test_a_response_from_the_wrong_from_is_refused_for_that(sandbox: Sandbox,
                                                            client: WksClient) -> None:
    """#11 item 10 (b): the refusal names the From, not the submission parser's complaint;
    the real owner's response still publishes afterwards."""
    submit(sandbox, client.create("carol@example.org"), "carol@example.org")
    request = wait_for_mail(sandbox, "carol", subject_is(wks.SUBJECT_CONFIRM))
    response = client.receive(request.raw)
    forged = response.replace(b"From: carol@example.org", b"From: mallory@example.net", 1)
    assert forged != response
    with pytest.raises(smtplib.SMTPDataError) as refused:
        submit(sandbox, forged, "mallory@example.net")
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error == (
        b"5.7.1 Key submission refused: From does not match the address being confirmed "
        b"(mallory@example.net is not carol@example.org)")
    assert published(sandbox, "carol@example.org") is None
    submit(sandbox, response, "carol@example.org")
    wait_for_mail(sandbox, "carol", subject_is(PUBLISHED))
    stored = published(sandbox, "carol@example.org")
    assert stored is not None
    assert stored.fingerprint == Fingerprint.parse(client.fpr)
