"""The WKS milter end to end: real Postfix calls our milter on a unix socket, real Dovecot
authenticates and delivers, real gpg-wks-client makes submissions and answers requests,
real slapd stores the keys.
"""

from __future__ import annotations

import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from milter_wkd import wks
from milter_wkd.config import load
from milter_wkd.openpgp import messages, packets
from milter_wkd.sandbox import Sandbox
from milter_wkd.sandbox.flood import flood_key
from milter_wkd.store.model import KeyOrigin, PendingRequest
from milter_wkd.values import Address, Fingerprint
from tests.support.mail import sandbox_fixture  # noqa: F401 (the `sandbox` fixture)
from tests.support.wksmail import (
    SUBMISSION,
    WksClient,
    directory,
    published,
    send_raw,
    subject_is,
    wait_for_mail,
)

PUBLISHED = "Your key has been published"


@pytest.fixture(scope="module")
def alice(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WksClient]:
    client = WksClient(tmp_path_factory.mktemp("alice"), sandbox, "Alice <alice@example.org>")
    yield client
    client.close()


@pytest.fixture(scope="module")
def bob(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WksClient]:
    client = WksClient(tmp_path_factory.mktemp("bob"), sandbox, "Bob <bob@example.org>")
    yield client
    client.close()


def submit(sandbox: Sandbox, raw: bytes, sender: str, *, login: tuple[str, str] | None = None,
           ) -> None:
    endpoint = sandbox.postfix.submission if login else sandbox.postfix.inbound
    send_raw(endpoint.host, endpoint.port, sender, [SUBMISSION], raw, login=login)


def login_of(sandbox: Sandbox, user: str) -> tuple[str, str]:
    account = sandbox.users[user]
    return account["address"], account["password"]


def submit_logged_in(sandbox: Sandbox, raw: bytes, sender: str, login: tuple[str, str],
                     ) -> str:
    """Submit as `login`; Postfix's queue id for the mail (from its reply to DATA)."""
    endpoint = sandbox.postfix.submission
    with smtplib.SMTP(endpoint.host, endpoint.port, timeout=60) as smtp:
        smtp.ehlo("client.test.example.net")
        smtp.login(*login)
        smtp.mail(sender)
        smtp.rcpt(SUBMISSION)
        code, reply = smtp.data(raw)
    assert code == 250, reply
    # "2.0.0 Ok: queued as 4dQz1w0Xk7z9sKx" (a discarded mail is queued as far as smtpd knows)
    return reply.decode("ascii").rsplit(" ", 1)[-1]


def test_authenticated_submission_is_published_at_once(sandbox: Sandbox,
                                                       alice: WksClient) -> None:
    assert sandbox.milter is not None
    logged = sandbox.milter.log.stat().st_size
    queue_id = submit_logged_in(sandbox, alice.create("alice@example.org"),
                                "alice@example.org", login_of(sandbox, "alice"))
    notice = wait_for_mail(sandbox, "alice", subject_is(PUBLISHED))
    assert str(notice["From"]) == SUBMISSION
    assert alice.fpr in notice.get_content()
    stored = published(sandbox, "alice@example.org")
    assert stored is not None
    assert stored.fingerprint == Fingerprint.parse(alice.fpr)
    assert stored.provenance is not None
    assert stored.provenance.source == KeyOrigin.AUTH_SUBMIT
    assert stored.provenance.actor.startswith("alice@example.org (submission ")
    assert [str(a) for a in stored.addresses] == ["alice@example.org"]
    # Every line the milter logged about the submission names Postfix's queue id for it.
    lines = sandbox.milter.log.read_bytes()[logged:].decode(errors="replace").splitlines()
    ours = [line for line in lines if f" {queue_id}: " in line]
    assert any(f"{queue_id}: published {alice.fpr} for alice@example.org" in line
               for line in ours), lines
    assert any(f"milter_wkd.milter INFO {queue_id}: Discard after" in line
               for line in ours), lines
    assert not [line for line in lines if alice.fpr in line and line not in ours]


def test_unauthenticated_submission_goes_through_confirmation(sandbox: Sandbox,
                                                              bob: WksClient) -> None:
    assert published(sandbox, "bob@example.org") is None
    submit(sandbox, bob.create("bob@example.org"), "bob@example.org")
    request = wait_for_mail(sandbox, "bob", subject_is(wks.SUBJECT_CONFIRM))
    assert published(sandbox, "bob@example.org") is None  # nothing before the answer
    response = bob.receive(request.raw)
    submit(sandbox, response, "bob@example.org")
    wait_for_mail(sandbox, "bob", subject_is(PUBLISHED))
    stored = published(sandbox, "bob@example.org")
    assert stored is not None
    assert stored.fingerprint == Fingerprint.parse(bob.fpr)
    assert stored.provenance is not None
    assert stored.provenance.source == KeyOrigin.WKS_CONFIRMED
    # The same response again (Postfix's retry after a milter that died before it
    # answered, or a replay) is taken without effect, so that a retry does not bounce.
    submit(sandbox, response, "bob@example.org")
    assert published(sandbox, "bob@example.org") == stored
    # Another response to the used request (answered anew) is refused: single use.
    with pytest.raises(smtplib.SMTPDataError) as refused:
        submit(sandbox, bob.receive(request.raw), "bob@example.org")
    assert refused.value.smtp_code == 550
    assert published(sandbox, "bob@example.org") == stored


def test_logged_in_bob_cannot_publish_for_alice(sandbox: Sandbox,
                                                tmp_path: Path) -> None:
    before = published(sandbox, "alice@example.org")
    mallory = WksClient(tmp_path / "mallory", sandbox, "Alice <alice@example.org>")
    try:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            submit(sandbox, mallory.create("alice@example.org"), "alice@example.org",
                   login=login_of(sandbox, "bob"))
    finally:
        mallory.close()
    assert refused.value.smtp_code == 550
    assert b"5.7.1" in refused.value.smtp_error
    assert published(sandbox, "alice@example.org") == before


def test_forged_from_only_asks_the_real_owner(sandbox: Sandbox, tmp_path: Path) -> None:
    before = published(sandbox, "alice@example.org")
    mallory = WksClient(tmp_path / "mallory", sandbox, "Alice <alice@example.org>")
    try:
        submit(sandbox, mallory.create("alice@example.org"), "alice@example.org")
    finally:
        mallory.close()
    # The request went to alice's mailbox, encrypted to mallory's key: alice cannot be made
    # to confirm it, mallory never sees it, and nothing was published.
    wait_for_mail(sandbox, "alice", subject_is(wks.SUBJECT_CONFIRM))
    assert published(sandbox, "alice@example.org") == before


def _response_mail(sandbox: Sandbox, address: str, nonce: str) -> bytes:
    plaintext = (b"Content-Type: application/vnd.gnupg.wks\r\n\r\n"
                 + f"type: confirmation-response\nsender: {SUBMISSION}\naddress: {address}\n"
                   f"nonce: {nonce}\n".encode())
    encrypted = messages.encrypt(plaintext, [sandbox.submission_public_key.read_bytes()])
    return (f"From: {address}\r\nTo: {SUBMISSION}\r\nSubject: {wks.SUBJECT_RESPONSE}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/encrypted; "
            'protocol="application/pgp-encrypted"; boundary="b"\r\n\r\n--b\r\n'
            "Content-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n--b\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + encrypted.replace(
                b"\n", b"\r\n") + b"\r\n--b--\r\n"


def test_expired_and_unknown_nonces_are_refused(sandbox: Sandbox, alice: WksClient) -> None:
    carol = Address.parse("carol@example.org")
    now = int(time.time())
    nonce = wks.new_nonce()
    with directory(sandbox) as store:
        store.create_pending(PendingRequest(nonce, carol, Fingerprint.parse(alice.fpr),
                                            alice.gpg.export(alice.fpr), now - 10, now - 1),
                             limit=3)
    for offered in (nonce, wks.new_nonce()):
        with pytest.raises(smtplib.SMTPDataError) as refused:
            submit(sandbox, _response_mail(sandbox, str(carol), offered), str(carol))
        assert refused.value.smtp_code == 550
    assert published(sandbox, "carol@example.org") is None


@pytest.mark.parametrize("raw", [
    b"From: x@example.net\r\nTo: key-submission@example.org\r\nSubject: hi\r\n\r\nhello\r\n",
    b"From: x@example.net\r\nTo: key-submission@example.org\r\nContent-Type: multipart/"
    b"encrypted; boundary=\"q\"\r\n\r\n--q\r\n\xff\xfe garbage\r\n",
    b"From: <>\r\nContent-Type: application/pgp-keys\r\n\r\n-----BEGIN PGP PUBLIC KEY BLOCK"
    b"-----\r\n\r\nAAAA\r\n-----END PGP PUBLIC KEY BLOCK-----\r\n",
], ids=["plain-text", "broken-mime", "bad-key"])
def test_garbage_is_refused_with_a_reason(sandbox: Sandbox, raw: bytes) -> None:
    with pytest.raises(smtplib.SMTPDataError) as refused:
        submit(sandbox, raw, "x@example.net")
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error.startswith(b"5.7.1 Key submission refused")


def test_secret_key_is_refused(sandbox: Sandbox, alice: WksClient) -> None:
    secret = alice.gpg.run("--armor", "--export-secret-keys", alice.fpr).stdout
    raw = (b"From: alice@example.org\r\nTo: key-submission@example.org\r\n"
           b"Content-Type: application/pgp-keys\r\n\r\n" + secret.replace(b"\n", b"\r\n"))
    with pytest.raises(smtplib.SMTPDataError) as refused:
        submit(sandbox, raw, "alice@example.org", login=login_of(sandbox, "alice"))
    assert refused.value.smtp_code == 550
    assert b"secret" in refused.value.smtp_error


def test_directory_down_tempfails_and_nothing_is_lost(sandbox: Sandbox,
                                                      tmp_path: Path) -> None:
    carol = WksClient(tmp_path / "carol", sandbox, "Carol <carol@example.org>")
    try:
        raw = carol.create("carol@example.org")
    finally:
        carol.close()
    sandbox.slapd.stop()
    try:
        # An SMTP client is told to come back later ...
        with pytest.raises(smtplib.SMTPDataError) as later:
            submit(sandbox, raw, "carol@example.org")
        assert later.value.smtp_code == 451
        assert later.value.smtp_error.startswith(b"4.7.1")
        # ... and mail that Postfix holds already (gpg-wks-client hands its mail to
        # sendmail) stays queued: the milter's tempfail keeps it in the maildrop.
        log = Path(sandbox.postfix.maillog)
        offset = log.stat().st_size
        subprocess.run(["sendmail", "-C", str(sandbox.postfix.config_dir), "-i",
                        "-f", "carol@example.org", SUBMISSION], input=raw, check=True,
                       timeout=30)
        deadline = time.monotonic() + 30
        while b"4.7.1" not in log.read_bytes()[offset:]:
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
            time.sleep(0.2)
    finally:
        sandbox.slapd.start()
    # Pickup retries the maildrop; nudge it instead of waiting for its timer.
    subprocess.run(["postqueue", "-c", str(sandbox.postfix.config_dir), "-f"],
                   stdin=subprocess.DEVNULL, check=True, timeout=30)
    subprocess.run(["postkick", "-c", str(sandbox.postfix.config_dir), "public", "pickup",
                    "W"], stdin=subprocess.DEVNULL, check=False, timeout=30)
    request = wait_for_mail(sandbox, "carol", subject_is(wks.SUBJECT_CONFIRM), timeout=90)
    assert "carol@example.org" in str(request["To"])
    assert published(sandbox, "carol@example.org") is None


def _plain_submission(address: str, key: bytes) -> bytes:
    """The old, unencrypted submission form (application/pgp-keys), which we accept."""
    armored = packets.armor(packets.ARMOR_PUBLIC_KEY, key).replace(b"\n", b"\r\n")
    return (f"From: {address}\r\nTo: {SUBMISSION}\r\nSubject: {wks.SUBJECT_SUBMISSION}\r\n"
            "Content-Type: application/pgp-keys\r\n\r\n").encode() + armored


def test_updates_merge_and_revocations_are_published(sandbox: Sandbox, alice: WksClient,
                                                     ) -> None:
    login = login_of(sandbox, "alice")
    submit(sandbox, alice.create("alice@example.org"), "alice@example.org", login=login)
    before = published(sandbox, "alice@example.org")
    assert before is not None
    # A new subkey, submitted alone as a fresh copy of the key: merged into the stored one.
    alice.gpg.run("--quick-add-key", alice.fpr, "cv25519", "encr", "2y")
    submit(sandbox, alice.create("alice@example.org"), "alice@example.org", login=login)
    deadline = time.monotonic() + 20
    while True:
        merged = published(sandbox, "alice@example.org")
        assert merged is not None
        if merged.key != before.key or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    subkeys = [ref for ref in packets.iter_packets(merged.key) if ref.tag == 14]
    assert len(subkeys) == 2
    # Revoked: the revocation is published so that clients learn of it.
    revocation = alice.gpg.run("--gen-revoke", alice.fpr, input=b"y\n0\n\ny\n",
                               check=False).stdout
    if not revocation:
        revocation = (alice.gpg.home / "openpgp-revocs.d" / f"{alice.fpr}.rev").read_bytes()
        revocation = revocation.replace(b":-----BEGIN", b"-----BEGIN")
    alice.gpg.import_key(revocation)
    submit(sandbox, _plain_submission("alice@example.org", alice.gpg.export(alice.fpr)),
           "alice@example.org", login=login)
    deadline = time.monotonic() + 20
    while True:
        revoked = published(sandbox, "alice@example.org")
        assert revoked is not None
        if revoked.revoked or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert revoked.revoked
    assert revoked.fingerprint == before.fingerprint


def test_flooded_key_is_published_clean(sandbox: Sandbox, alice: WksClient) -> None:
    """150,000 real third-party certifications (about 18 MB): cut before anything parses."""
    flooded = flood_key(alice.gpg.export(alice.fpr), 150_000)
    plaintext = (b"Content-Type: application/pgp-keys\r\n\r\n"
                 + packets.armor(packets.ARMOR_PUBLIC_KEY, flooded).replace(b"\n", b"\r\n"))
    submission_fpr = alice.gpg.fingerprint(SUBMISSION)
    encrypted = alice.gpg.run("--armor", "--trust-model", "always", "--encrypt",
                              "--recipient", submission_fpr, input=plaintext).stdout
    raw = (b"From: alice@example.org\r\nTo: key-submission@example.org\r\n"
           b"Subject: Key publishing request\r\nWks-Draft-Version: 3\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; '
           b'boundary="=-=b=-="\r\n\r\n--=-=b=-=\r\nContent-Type: application/pgp-encrypted'
           b"\r\n\r\nVersion: 1\r\n\r\n--=-=b=-=\r\nContent-Type: application/octet-stream"
           b"\r\n\r\n" + encrypted.replace(b"\n", b"\r\n") + b"\r\n--=-=b=-=--\r\n")
    assert len(raw) > 20_000_000
    submit(sandbox, raw, "alice@example.org", login=login_of(sandbox, "alice"))
    stored = published(sandbox, "alice@example.org")
    assert stored is not None
    assert stored.fingerprint == Fingerprint.parse(alice.fpr)
    signatures = [ref for ref in packets.iter_packets(stored.key) if ref.tag == 2]
    assert len(stored.key) < 4096
    assert 2 <= len(signatures) <= 4  # self-signatures only
    assert sandbox.milter is not None
    timings = [line for line in sandbox.milter.log.read_text().splitlines()
               if "Discard after" in line]
    assert timings
    print("flooded submission:", timings[-1])  # the figure for the README (run with -s)


def test_oversize_submission_is_refused(sandbox: Sandbox) -> None:
    cfg = load(sandbox.config_path, environ={})
    body = b"A" * 76 + b"\r\n"
    raw = (b"From: x@example.net\r\nTo: key-submission@example.org\r\n"
           b"Content-Type: application/pgp-keys\r\n\r\n"
           + body * (cfg.milter.max_submission_bytes // len(body) + 10))
    with pytest.raises(smtplib.SMTPDataError) as refused:
        submit(sandbox, raw, "x@example.net")
    assert refused.value.smtp_code == 552
    assert refused.value.smtp_error.startswith(b"5.3.4")


def test_pending_list_and_expire_commands(sandbox: Sandbox, tmp_path: Path) -> None:
    dave = Address.parse("carol@example.org")
    now = int(time.time())
    nonce = wks.new_nonce()
    with directory(sandbox) as store:
        store.create_pending(PendingRequest(nonce, dave, Fingerprint.parse("A" * 40), b"\x99",
                                            now - 100, now - 10), limit=3)
    command = [sys.executable, "-m", "milter_wkd", "pending"]
    listed = subprocess.run([*command, "list", "--config", str(sandbox.config_path)],
                            capture_output=True, text=True, check=True, timeout=60)
    assert f"carol@example.org\t{'A' * 40}" in listed.stdout
    assert "expired" in listed.stdout
    expired = subprocess.run([*command, "expire", "--config", str(sandbox.config_path)],
                             capture_output=True, text=True, check=True, timeout=60)
    assert expired.stdout.startswith("expired ")
    assert int(expired.stdout.split()[1]) >= 1
    listed = subprocess.run([*command, "list", "--config", str(sandbox.config_path)],
                            capture_output=True, text=True, check=True, timeout=60)
    assert "A" * 40 not in listed.stdout
