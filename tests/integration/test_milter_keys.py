"""#11 items 3 and 4 and the back-signature rule, performed as attacks through the real
sandbox: Postfix calls our milter, Dovecot authenticates the submitter (SMTP AUTH), slapd
stores what is published. Keys are made by real gpg where gpg can make them, crafted with
the unit tests' `Signer` where it cannot (a signing subkey without its back-signature).
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

import pytest

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
from tests.unit.test_openpgp_crafted import Signer, Subkey, rsa_body, user_id

pytestmark = pytest.mark.integration

PUBLISHED = "Your key has been published"


@pytest.fixture(scope="module")
def mallory(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WksClient]:
    """A gpg home that trusts the submission key; its own key is the two-address one."""
    client = WksClient(tmp_path_factory.mktemp("mallory"), sandbox,
                       "Bob Baker <bob@example.org> <alice@example.org>")
    yield client
    client.close()


def submission(client: WksClient, key: bytes, sender: str) -> bytes:
    """A WKS submission of any key bytes, PGP/MIME-encrypted to the submission key."""
    plaintext = (b"Content-Type: application/pgp-keys\r\n\r\n"
                 + packets.armor(packets.ARMOR_PUBLIC_KEY, key).replace(b"\n", b"\r\n"))
    encrypted = client.gpg.run("--armor", "--trust-model", "always", "--encrypt",
                               "--recipient", client.gpg.fingerprint(SUBMISSION),
                               input=plaintext).stdout
    return (f"From: {sender}\r\nTo: {SUBMISSION}\r\n".encode()
            + b"Subject: Key publishing request\r\nWks-Draft-Version: 3\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; '
            b'boundary="=-=b=-="\r\n\r\n--=-=b=-=\r\nContent-Type: application/pgp-encrypted'
            b"\r\n\r\nVersion: 1\r\n\r\n--=-=b=-=\r\nContent-Type: application/octet-stream"
            b"\r\n\r\n" + encrypted.replace(b"\n", b"\r\n") + b"\r\n--=-=b=-=--\r\n")


def submit_logged_in(sandbox: Sandbox, client: WksClient, key: bytes, user: str) -> None:
    account = sandbox.users[user]
    endpoint = sandbox.postfix.submission
    send_raw(endpoint.host, endpoint.port, account["address"], [SUBMISSION],
             submission(client, key, account["address"]),
             login=(account["address"], account["password"]))


def refused(sandbox: Sandbox, client: WksClient, key: bytes, user: str) -> str:
    with pytest.raises(smtplib.SMTPDataError) as caught:
        submit_logged_in(sandbox, client, key, user)
    assert caught.value.smtp_code == 550
    return caught.value.smtp_error.decode()


def test_a_two_address_user_id_is_published_for_nobody(sandbox: Sandbox,
                                                       mallory: WksClient) -> None:
    """Item 3: logged in as alice, a key gpg files under bob@ (the first <...>)."""
    key = mallory.gpg.export(mallory.fpr)
    text = refused(sandbox, mallory, key, "alice")
    assert text.startswith("5.7.1 Key submission refused: user ID 'Bob Baker <bob@example.org>"
                           " <alice@example.org>': it names more than one address"), text
    assert published(sandbox, "alice@example.org") is None
    assert published(sandbox, "bob@example.org") is None


def test_an_rsa_1024_key_is_refused_with_what_to_do(sandbox: Sandbox,
                                                    mallory: WksClient) -> None:
    """Item 4: sq rejects RSA under 2048 bits; we published it."""
    fpr = mallory.gpg.generate("Alice <alice@example.org>", algo="rsa1024", subkey="rsa1024")
    text = refused(sandbox, mallory, mallory.gpg.export(fpr), "alice")
    assert "RSA-1024 is too weak (minimum 2048 bits): create a new key" in text, text
    assert published(sandbox, "alice@example.org") is None


def test_a_sha1_self_signature_is_refused_until_refreshed(sandbox: Sandbox,
                                                          mallory: WksClient) -> None:
    """Item 4: a SHA-1 self-signature made after 2023-02-01; then the advice is followed."""
    gpg = mallory.gpg
    sha1 = ("--faked-system-time", "20240601T000000", "--cert-digest-algo", "SHA1",
            "--digest-algo", "SHA1")
    gpg.run(*sha1, "--quick-gen-key", "Alice Old <alice@example.org>", "ed25519", "cert",
            "never")
    fpr = gpg.fingerprint("Alice Old")
    gpg.run(*sha1, "--quick-add-key", fpr, "cv25519", "encr", "never")
    text = refused(sandbox, mallory, gpg.export(fpr), "alice")
    assert "'Alice Old <alice@example.org>': its self-signature uses SHA-1" in text, text
    assert ("refresh it with gpg --cert-digest-algo SHA256 --quick-set-expire "
            f"{fpr} 2y") in text, text
    assert published(sandbox, "alice@example.org") is None
    # As the refusal says (gpg 2.2 would otherwise renew an EdDSA self-signature in SHA-1).
    refresh = ("--cert-digest-algo", "SHA256", "--quick-set-expire", fpr, "2y")
    gpg.run(*refresh)
    gpg.run(*refresh, "*")
    submit_logged_in(sandbox, mallory, gpg.export(fpr), "alice")
    wait_for_mail(sandbox, "alice", subject_is(PUBLISHED))
    stored = published(sandbox, "alice@example.org")
    assert stored is not None
    assert stored.fingerprint == Fingerprint.parse(fpr)


def test_the_notice_names_every_part_left_out(sandbox: Sandbox, mallory: WksClient) -> None:
    """Item 1's back-signature rule, and items 3 and 4 for parts: the key is published
    without them, and the notice says which and why."""
    bob, encryption, signing, weak = Signer(), Subkey(), Signer(), Subkey()
    weak.body = rsa_body(1024)
    good_uid, bad_uid = "Bob <bob@example.org>", "Bob <bob@example.org> <alice@example.org>"
    key = b"".join([
        bob.packet, user_id(good_uid), bob.certify(good_uid),
        user_id(bad_uid), bob.certify(bad_uid),
        encryption.packet, bob.bind(encryption),
        signing.subkey_packet, bob.bind_signing(signing, back="none"),
        weak.packet, bob.bind(weak),
    ])
    submit_logged_in(sandbox, mallory, key, "bob")
    notice = wait_for_mail(sandbox, "bob", subject_is(PUBLISHED)).get_content()
    stored = published(sandbox, "bob@example.org")
    assert stored is not None
    subkeys = [ref for ref in packets.iter_packets(stored.key) if ref.tag == 14]
    assert len(subkeys) == 1  # the encryption subkey alone
    fpr = bob.fingerprint.hex().upper()
    text = " ".join(notice.split())
    assert (f"Left out: subkey {signing.fingerprint.hex().upper()}: it can sign but carries "
            "no valid back-signature") in text, notice
    assert (f"Left out: subkey {weak.fingerprint}: RSA-1024 is too weak (minimum 2048 "
            f"bits): add a new subkey (gpg --quick-add-key {fpr} future-default encr)"
            ) in text, notice
    assert f"Left out: user ID '{bad_uid}': it names more than one address" in text, notice

