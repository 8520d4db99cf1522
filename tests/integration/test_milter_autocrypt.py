"""Autocrypt headers on outgoing mail, end to end: real Postfix calls our milter, Dovecot
delivers, IMAP reads the result; sq decodes the header; dkimpy verifies the signature. Mail
whose client does OpenPGP itself (PGP/MIME, inline, Delta Chat) gets no header (#14).
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import os
import queue
import shutil
import smtplib
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from milter_wkd import autocrypt, dkim
from milter_wkd.config import load
from milter_wkd.mailer import FolderMailer
from milter_wkd.openpgp import autocrypt_keydata, clean_key, packets
from milter_wkd.replies import Accept, HeaderEdit
from milter_wkd.sandbox import Sandbox
from milter_wkd.sandbox.milterd import MilterDaemon
from milter_wkd.service import MailService
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.model import KeyOrigin, Provenance
from milter_wkd.transaction import Transaction
from milter_wkd.values import Address
from tests.support.gnupg import GnuPG
from tests.support.mail import sandbox_fixture  # noqa: F401 (the `sandbox` fixture)
from tests.support.peers import require_binary
from tests.support.wksmail import Mail, directory, wait_for_mail

ALICE = "alice@example.org"
ALIAS = "alice.liddell@example.org"


@pytest.fixture(scope="module")
def alice_key(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[bytes]:
    """alice's key (two user IDs: her address and her alias), published by the store."""
    with GnuPG(tmp_path_factory.mktemp("alice")) as gpg:
        fpr = gpg.generate(f"Alice <{ALICE}>")
        gpg.run("--quick-add-uid", fpr, f"Alice Liddell <{ALIAS}>")
        key = gpg.export(fpr)
    with directory(sandbox) as store:
        user = store.user(Address.parse(ALICE))
        cleaned = clean_key(key, list(user.addresses))
        store.publish_key(user, cleaned, Provenance(KeyOrigin.ADMIN_IMPORT, "test", 0))
    return key


def send(sandbox: Sandbox, raw: bytes, sender: str, recipients: list[str], *,
         login: str | None = None, source: str | None = None) -> None:
    endpoint = sandbox.postfix.submission if login else sandbox.postfix.inbound
    with smtplib.SMTP(endpoint.host, endpoint.port, timeout=30,
                      source_address=(source, 0) if source else None) as smtp:
        smtp.ehlo("client.test.example.net")
        if login:
            smtp.login(sandbox.users[login]["address"], sandbox.users[login]["password"])
        smtp.sendmail(sender, recipients, raw)


def mail(from_: str, *, extra: str = "", content_type: str = "text/plain") -> tuple[str, bytes]:
    message_id = f"<{uuid.uuid4().hex}@test.example.net>"
    raw = (f"From: {from_}\r\nTo: bob@example.org\r\nSubject: hello\r\n"
           f"Message-ID: {message_id}\r\nMIME-Version: 1.0\r\nContent-Type: {content_type}\r\n"
           f"{extra}\r\nHello Bob.\r\n").encode()
    return message_id, raw


def delivered(sandbox: Sandbox, message_id: str) -> Mail:
    return wait_for_mail(sandbox, "bob", lambda m: str(m.get("Message-ID")) == message_id)


def headers_of(message: Mail) -> list[bytes]:
    """The header lines (folded ones as several lines) as delivered."""
    head = message.raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    return head.split(b"\n")


def packet_tags(data: bytes) -> list[int]:
    return [ref.tag for ref in packets.iter_packets(data)]


def packet_bodies(data: bytes) -> list[tuple[int, bytes]]:
    """Packets independent of header format (sq writes new-format headers)."""
    return [(ref.tag, data[ref.body_start:ref.end]) for ref in packets.iter_packets(data)]


def test_alice_gets_one_minimal_folded_header(sandbox: Sandbox, alice_key: bytes) -> None:
    message_id, raw = mail(f"Alice <{ALICE}>")
    send(sandbox, raw, ALICE, ["bob@example.org"], login="alice")
    message = delivered(sandbox, message_id)
    values = message.get_all(autocrypt.HEADER)
    assert values is not None
    assert len(values) == 1
    raw_value = message.raw.split(b"\nAutocrypt: ", 1)[1].split(b"\n", 1)[0]
    assert raw_value.startswith(b"addr=alice@example.org;")
    parsed = autocrypt.parse(str(values[0]))
    assert parsed is not None
    assert parsed.addr == ALICE
    # Exactly primary key, one user ID, its self-signature, subkey, binding.
    assert packet_tags(parsed.keydata) == [6, 13, 2, 14, 2]
    assert b"alice@example.org" in parsed.keydata
    assert b"liddell" not in parsed.keydata
    lines = headers_of(message)
    start = next(i for i, line in enumerate(lines) if line.startswith(b"Autocrypt:"))
    block = [lines[start]] + [
        line for line in lines[start + 1:start + 20] if line[:1] in (b" ", b"\t")]
    assert all(len(line) <= 78 for line in block)
    # sq, a real Autocrypt consumer, reads the same key out of the delivered mail.
    sq = require_binary("sq")
    decoded = subprocess.run([sq, "autocrypt", "decode", "--binary"], input=message.raw,
                             capture_output=True, check=True, timeout=30).stdout
    assert packet_bodies(decoded) == packet_bodies(parsed.keydata)


def test_alias_gets_the_alias_user_id(sandbox: Sandbox, alice_key: bytes) -> None:
    message_id, raw = mail(f"Alice <{ALIAS}>")
    send(sandbox, raw, ALIAS, ["bob@example.org"], login="alice")
    parsed = autocrypt.parse(str(delivered(sandbox, message_id)[autocrypt.HEADER]))
    assert parsed is not None
    assert parsed.addr == ALIAS
    assert b"alice.liddell@example.org" in parsed.keydata
    assert b"<alice@example.org>" not in parsed.keydata


def test_dkim_signature_covers_autocrypt(sandbox: Sandbox, alice_key: bytes) -> None:
    message_id, raw = mail(f"Alice <{ALICE}>")
    send(sandbox, raw, ALICE, ["bob@example.org"], login="alice")
    message = delivered(sandbox, message_id)
    records = _records(sandbox)
    # What Dovecot added in front (Return-Path, Delivered-To) is not signed.
    raw = message.raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    tampered = raw.replace(b"addr=alice@example.org", b"addr=alice@example.org ", 1)
    tampered = tampered.replace(b"keydata=", b"keydata=\r\n mDMEx", 1)
    for index, signature in enumerate(message.get_all("DKIM-Signature") or []):
        assert dkim.verify(raw, records, index)
        signed = "".join(str(signature).split("h=", 1)[1].split(";", 1)[0].split()).lower()
        assert "autocrypt" in signed.split(":")
        assert not dkim.verify(tampered, records, index)
    assert index == 1  # two signatures: RSA and Ed25519


def test_trusted_network_without_login(sandbox: Sandbox, alice_key: bytes) -> None:
    message_id, raw = mail(ALICE)
    send(sandbox, raw, ALICE, ["bob@example.org"], source="127.0.0.2")
    assert delivered(sandbox, message_id)[autocrypt.HEADER] is not None


@pytest.mark.parametrize(("from_", "login", "extra", "content_type"), [
    ("carol@example.org", "carol", "", "text/plain"),  # no key
    (ALICE, "alice", "Autocrypt: addr=alice@example.org; keydata=AAAA\r\n", "text/plain"),
    (ALICE, "alice", "", "multipart/report; report-type=delivery-status; boundary=x"),
    (f"{ALICE}, bob@example.org", "alice", "", "text/plain"),  # several From addresses
    (ALICE, "bob", "", "text/plain"),  # not the logged-in user's address
    (ALICE, None, "", "text/plain"),  # from outside, not trusted
], ids=["no-key", "has-header", "report", "multi-from", "other-user", "outside"])
def test_untouched(sandbox: Sandbox, alice_key: bytes, from_: str, login: str | None,
                   extra: str, content_type: str) -> None:
    message_id, raw = mail(from_, extra=extra, content_type=content_type)
    sender = sandbox.users[login]["address"] if login else ALICE
    send(sandbox, raw, sender, ["bob@example.org"], login=login)
    values = delivered(sandbox, message_id).get_all(autocrypt.HEADER) or []
    expected = ["addr=alice@example.org; keydata=AAAA"] if extra else []
    assert [str(v) for v in values] == expected


def test_directory_down_mail_still_flows(sandbox: Sandbox, alice_key: bytes) -> None:
    message_id, raw = mail(ALICE)
    sandbox.slapd.stop()
    time.sleep(1.1)  # the milter re-checks the directory at most once a second
    try:
        # Dovecot cannot authenticate or deliver without LDAP either: send from the trusted
        # network; Postfix queues the mail until delivery works again.
        send(sandbox, raw, ALICE, ["bob@example.org"], source="127.0.0.2")
    finally:
        sandbox.slapd.start()
    time.sleep(0.5)
    subprocess.run(["postqueue", "-c", str(sandbox.postfix.config_dir), "-f"],
                   stdin=subprocess.DEVNULL, check=True, timeout=30)
    message = delivered(sandbox, message_id)
    assert message.get_all(autocrypt.HEADER) is None
    log = Path(sandbox.milter.log if sandbox.milter else "").read_text(errors="replace")
    assert "no Autocrypt header" in log


def test_keydata_matches_base64_of_minimal_export(sandbox: Sandbox, alice_key: bytes) -> None:
    """The header's keydata is the same as our offline --autocrypt output."""
    message_id, raw = mail(ALICE)
    send(sandbox, raw, ALICE, ["bob@example.org"], login="alice")
    value = str(delivered(sandbox, message_id)[autocrypt.HEADER])
    keydata = base64.b64decode("".join(value.split("keydata=", 1)[1].split()))
    assert keydata == autocrypt_keydata(alice_key, Address.parse(ALICE))


def test_inbound_autocrypt_claiming_our_domain_can_be_stripped(sandbox: Sandbox) -> None:
    """[milter] strip_inbound_autocrypt: off by default (left alone), on: removed."""
    cfg = load(sandbox.config_path, environ={})
    headers = [("From", ALICE), ("Autocrypt", "addr=alice@example.org; keydata=AAAA"),
               ("Autocrypt", "addr=alice@example.org; keydata=BBBB")]
    outside = Transaction(client_ip="192.0.2.7", headers=headers)
    with LdapStore(cfg.directory) as store:
        default = MailService(cfg, store, FolderMailer(sandbox.dir / "mail"))
        assert default.decide(outside) == Accept()
        strict_cfg = dataclasses.replace(
            cfg, milter=dataclasses.replace(cfg.milter, strip_inbound_autocrypt=True))
        strict = MailService(strict_cfg, store, FolderMailer(sandbox.dir / "mail"))
        reply = strict.decide(outside)
        assert reply == Accept(edits=(HeaderEdit("Autocrypt", None, 2),
                                      HeaderEdit("Autocrypt", None, 1)))
        foreign = Transaction(client_ip="192.0.2.7", headers=[
            ("From", "someone@example.net"), ("Autocrypt", "addr=someone@example.net; k=1")])
        assert strict.decide(foreign) == Accept()


def _records(sandbox: Sandbox) -> dict[str, str]:
    """The TXT records of the sandbox's two DKIM keys (RSA wkd-rsa, Ed25519 wkd)."""
    keys = (dkim.load_key(sandbox.dkim_rsa_key, "example.org", "wkd-rsa"),
            dkim.load_key(sandbox.dkim_key, "example.org", "wkd"))
    return {key.dns_name(): key.dns_record() for key in keys}


def _verifies(sandbox: Sandbox, message: Mail) -> bool:
    """Both signatures (RSA on top, then Ed25519) verify."""
    raw = message.raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return all(dkim.verify(raw, _records(sandbox), index) for index in (0, 1))


@pytest.mark.parametrize(("from_", "signed"), [
    (ALICE, True), (ALIAS, True),
    ("bob@example.org", False),  # another user's address
    ("nobody@example.org", False),  # nobody's address in our domain
], ids=["own", "alias", "other-user", "nobody"])
def test_dkim_only_for_a_from_the_login_owns(sandbox: Sandbox, alice_key: bytes, from_: str,
                                             signed: bool) -> None:
    """#11 item 6: alice logged in cannot get example.org's signature on bob's From."""
    message_id, raw = mail(f"Someone <{from_}>")
    send(sandbox, raw, ALICE, ["bob@example.org"], login="alice")
    message = delivered(sandbox, message_id)
    if signed:
        assert message["DKIM-Signature"] is not None
        assert _verifies(sandbox, message)
    else:
        assert message.get_all("DKIM-Signature") is None


PGP_MIME = ('multipart/encrypted; protocol="application/pgp-encrypted";\r\n'
            ' boundary="enc"')
PGP_MIME_BODY = ("--enc\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n"
                 "--enc\r\nContent-Type: application/octet-stream\r\n\r\n"
                 "-----BEGIN PGP MESSAGE-----\r\n\r\nhQEMA1234\r\n-----END PGP MESSAGE-----\r\n"
                 "--enc--\r\n")
INLINE_BODY = "-----BEGIN PGP MESSAGE-----\r\n\r\nhQEMA1234\r\n-----END PGP MESSAGE-----\r\n"


@pytest.mark.parametrize(("extra", "content_type", "body", "reason"), [
    ("", PGP_MIME, PGP_MIME_BODY, "the client sent multipart/encrypted"),
    ("Chat-Version: 1.0\r\n", "text/plain; charset=utf-8", "Hello Bob.\r\n",
     "Chat-Version header"),
    ("", "text/plain", INLINE_BODY, "inline PGP message"),
    ("", "text/plain", "Hello Bob.\r\n", None),
], ids=["pgp-mime", "delta-chat", "inline-pgp", "plain"])
def test_no_header_on_mail_whose_client_does_openpgp_but_signed(
        sandbox: Sandbox, alice_key: bytes, extra: str, content_type: str, body: str,
        reason: str | None) -> None:
    """#14: an outer header of ours must not contradict the key a client (Delta Chat,
    PGP/MIME, inline PGP) uses itself; the mail is DKIM-signed all the same."""
    message_id, raw = mail(f"Alice <{ALICE}>", extra=extra, content_type=content_type)
    raw = raw.replace(b"Hello Bob.\r\n", body.encode())
    send(sandbox, raw, ALICE, ["bob@example.org"], login="alice")
    message = delivered(sandbox, message_id)
    values = message.get_all(autocrypt.HEADER) or []
    assert len(values) == (0 if reason else 1)
    assert _verifies(sandbox, message)
    if reason:
        log = Path(sandbox.milter.log if sandbox.milter else "").read_text(errors="replace")
        assert f"no Autocrypt header for alice@example.org: {reason}" in log


class DeltaChatCore:
    """Delta Chat's core (`deltachat-rpc-server`, PyPI) driven over its JSON-RPC on stdio:
    one request at a time, events never asked for."""

    def __init__(self, binary: str, accounts: Path) -> None:
        self.process = subprocess.Popen(
            [binary], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, "DC_ACCOUNTS_PATH": str(accounts)})
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ids = itertools.count(1)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def __call__(self, method: str, *params: object) -> Any:
        request_id = next(self.ids)
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"jsonrpc": "2.0", "id": request_id,
                                             "method": method, "params": params}).encode()
                                 + b"\n")
        self.process.stdin.flush()
        while True:
            answer = json.loads(self.lines.get(timeout=60))
            if answer.get("id") == request_id:
                assert "error" not in answer, answer["error"]
                return answer.get("result")

    def close(self) -> None:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.close()  # the server stops at the end of its input
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


# A test dependency (pyproject's [test] extra): in the venv beside the interpreter.
_BESIDE = Path(sys.executable).parent / "deltachat-rpc-server"
DELTACHAT = shutil.which("deltachat-rpc-server") or (str(_BESIDE) if _BESIDE.exists() else None)


@pytest.mark.skipif(DELTACHAT is None and not os.environ.get("CI"),
                    reason="deltachat-rpc-server (PyPI, the [test] extra) is not installed")
def test_delta_chat_encrypted_mail_keeps_its_own_key(sandbox: Sandbox, alice_key: bytes,
                                                     tmp_path: Path) -> None:
    """#14 with the real client: Delta Chat (core 2.x; run with 2.65.0) moves its Autocrypt
    header inside the encryption; the outer headers must not get alice's WKD key from us.
    `make test` installs it (the [test] extra); on CI its absence is a failure."""
    assert DELTACHAT is not None, "deltachat-rpc-server is missing (pip install -e '.[test]')"
    core = DeltaChatCore(DELTACHAT, tmp_path / "accounts")
    try:
        accounts = {}
        for user in ("alice", "bob"):
            accounts[user] = core("add_account")
            core("add_or_update_transport", accounts[user], {
                "addr": sandbox.users[user]["address"],
                "password": sandbox.users[user]["password"],
                "imapServer": sandbox.dovecot.imap.host, "imapPort": sandbox.dovecot.imap.port,
                "imapSecurity": "plain", "smtpServer": sandbox.postfix.submission.host,
                "smtpPort": sandbox.postfix.submission.port, "smtpSecurity": "plain",
                "certificateChecks": "acceptInvalidCertificates"})
        # Bob's key reaches alice's client by his vCard; core 2.x encrypts to key contacts.
        vcard = core("make_vcard", accounts["bob"], [1])  # 1: the account's own contact
        (contact,) = core("import_vcard_contents", accounts["alice"], vcard)
        chat = core("create_chat_by_contact_id", accounts["alice"], contact)
        core("start_io", accounts["alice"])
        sent = core("misc_send_text_message", accounts["alice"], chat, "hello from Delta Chat")
        info = core("get_message_info", accounts["alice"], sent)
        message_id = "<" + info.split("Message-ID: ", 1)[1].split()[0] + ">"
        message = delivered(sandbox, message_id)
    finally:
        core.close()
    assert message.get_content_type() == "multipart/encrypted"
    assert message.get_all(autocrypt.HEADER) is None
    assert _verifies(sandbox, message)
    log = Path(sandbox.milter.log if sandbox.milter else "").read_text(errors="replace")
    assert "no Autocrypt header for alice@example.org: the client sent multipart/enc" in log


def test_without_signing_who_sends_is_learned_at_end_of_message(sandbox: Sandbox,
                                                                alice_key: bytes) -> None:
    """With [milter] dkim_sign_outgoing off, the milter asks Postfix for the sender, the
    login and the client address at end of message instead of with RCPT TO (the body
    decision no longer needs them): the header still follows the login and
    trusted_networks, and mail from elsewhere still gets none."""
    assert sandbox.milter is not None
    config = sandbox.config_path.read_text(encoding="utf-8")
    assert "dkim_sign_outgoing = true" in config
    unsigned = sandbox.milter.dir / "unsigned.toml"
    unsigned.write_text(config.replace("dkim_sign_outgoing = true",
                                       "dkim_sign_outgoing = false"), encoding="utf-8")
    sandbox.milter.stop()
    milter = MilterDaemon(sandbox.milter.dir, unsigned)
    try:
        milter.start()
        for login, source, header in (("alice", None, True), (None, "127.0.0.2", True),
                                      (None, None, False)):
            message_id, raw = mail(ALICE)
            send(sandbox, raw, ALICE, ["bob@example.org"], login=login, source=source)
            message = delivered(sandbox, message_id)
            assert (message[autocrypt.HEADER] is not None) == header, (login, source)
            assert message.get_all("DKIM-Signature") is None
    finally:
        milter.stop()
        sandbox.milter.start()
