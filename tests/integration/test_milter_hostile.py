"""The milter against hostile senders (issue #11 items 9 and 10), end to end: real Postfix
calls our milter, real gpg and gpg-wks-client make keys and answers, real slapd stores.

- reply texts reach the SMTP client as one line of printable ASCII (Postfix accepts them);
- a confirmation response from the wrong From is refused for that reason;
- several large anonymous bodies at once do not each cost their size in milter memory.
"""

from __future__ import annotations

import re
import smtplib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from milter_wkd import wks
from milter_wkd.config import load
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


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_many_large_anonymous_bodies_do_not_each_cost_their_size(sandbox: Sandbox) -> None:
    """#11 item 9: N anonymous 24 MB mails to the submission address at once. Bodies wait
    in temporary files and at most [milter] max_large_bodies are in memory at a time, so
    the milter's peak memory grows by far less than N bodies (before: N x 24 MB and more).
    Every mail gets an answer: refused (550, it is no key) or, if it waited too long, 451."""
    assert sandbox.milter is not None
    pid = sandbox.milter.pid
    assert pid is not None
    count, size = 8, 24 * 1024 * 1024
    line = b"x" * 76 + b"\r\n"
    raw = (f"From: x@example.net\r\nTo: {SUBMISSION}\r\nSubject: big\r\n"
           "Content-Type: text/plain\r\n\r\n").encode() + line * (size // len(line))
    before = _kib(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    answers: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            submit(sandbox, raw, "x@example.net")
            answer = (250, b"")
        except smtplib.SMTPDataError as exc:
            answer = (exc.smtp_code, exc.smtp_error)
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    peak = _kib(pid, "VmHWM")
    growth_mib = (peak - before) / 1024
    print(f"milter RSS before {before / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB "
          f"(+{growth_mib:.0f} MiB) for {count} concurrent bodies of {size >> 20} MiB")
    assert len(answers) == count
    for code, text in answers:
        assert (code == 550 and text.startswith(b"5.7.1 Key submission refused")) or (
            code == 451 and text.startswith(b"4.3.2")), (code, text)
    # Each body in work costs up to 3x its size (read back, joined, split); N x size is what
    # collecting all of them in memory cost (measured before the fix: +361 MiB).
    slots = load(sandbox.config_path, environ={}).milter.max_large_bodies
    assert slots < count / 3
    assert growth_mib < 3 * slots * size / 2**20
