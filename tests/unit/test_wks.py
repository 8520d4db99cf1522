"""The WKS protocol core without gpg: what we build parses back the way the draft says,
and garbage, missing parts, wrong types, oversize and hostile headers are refused with
a reason. Real gpg-wks-client is in tests/integration/test_wks_client.py."""

from __future__ import annotations

import base64
import email
import email.policy
import quopri
import re
from email.message import Message

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milter_wkd import wks
from milter_wkd.errors import BadAddress, MessageRefused, Refused
from milter_wkd.openpgp import messages
from milter_wkd.openpgp import packets as pk
from milter_wkd.values import Address
from milter_wkd.wkd import zbase32
from tests.unit.conftest import SUBMISSION, USER

NOW = 1_790_000_000



def pgp_mime(headers: str, plaintext: bytes, recipient: bytes, *, version: str = "Version: 1",
             protocol: str = 'protocol="application/pgp-encrypted"; ') -> bytes:
    """A PGP/MIME multipart/encrypted mail, as gpg-wks-client lays it out."""
    sealed = messages.encrypt(plaintext, [recipient]).decode()
    return (
        f"{headers}MIME-Version: 1.0\n"
        f'Content-Type: multipart/encrypted; {protocol}boundary="BB"\n\n'
        "--BB\nContent-Type: application/pgp-encrypted\n\n"
        f"{version}\n\n"
        "--BB\nContent-Type: application/octet-stream\n\n"
        f"{sealed}\n--BB--\n"
    ).encode()


def key_part(key: bytes) -> bytes:
    return b"Content-Type: application/pgp-keys\n\n" + pk.armor(pk.ARMOR_PUBLIC_KEY, key)


SUBMIT_HEADERS = ("From: user@example.org\nTo: key-submission@example.org\n"
                  "Subject: Key publishing request\nWks-Draft-Version: 3\n")
RESPONSE_HEADERS = ("From: user@example.org\nTo: key-submission@example.org\n"
                    "Subject: Key publication confirmation\nWks-Draft-Version: 3\n")


def response_data(nonce: str = "a" * 32, **overrides: str) -> bytes:
    fields = {"type": "confirmation-response", "sender": str(SUBMISSION),
              "address": str(USER), "nonce": nonce, **overrides}
    return "".join(f"{k}: {v}\n" for k, v in fields.items()).encode()


def wks_part(data: bytes) -> bytes:
    return b"Content-Type: application/vnd.gnupg.wks\nContent-Transfer-Encoding: 8bit\n\n" + data


# --- nonces -----------------------------------------------------------------------------

def test_nonces_are_32_zbase32_chars_and_distinct() -> None:
    nonces = {wks.new_nonce() for _ in range(50)}
    assert len(nonces) == 50
    assert all(len(n) == 32 and set(n) <= set("ybndrfg8ejkmcpqxot1uwisza345h769")
               for n in nonces)
    assert len(zbase32(b"\x00" * 20)) == 32


def test_nonce_comparison() -> None:
    nonce = wks.new_nonce()
    assert wks.nonces_equal(nonce, str(nonce))
    assert not wks.nonces_equal(nonce, nonce[:-1] + ("y" if nonce[-1] != "y" else "b"))
    assert not wks.nonces_equal(nonce, nonce[:16])
    assert not wks.nonces_equal(nonce, "")


# --- submissions ------------------------------------------------------------------------

def test_encrypted_submission(service: messages.GeneratedKey, user: messages.GeneratedKey,
                              ) -> None:
    mail = pgp_mime(SUBMIT_HEADERS, key_part(user.public), service.public)
    sub = wks.parse_submission(mail, wks.decrypter(service.secret))
    assert sub.sender == USER
    assert sub.encrypted
    assert sub.draft_version == 3
    assert pk.dearmor(sub.key)[1] == user.public


def test_crlf_submission(service: messages.GeneratedKey, user: messages.GeneratedKey) -> None:
    mail = pgp_mime(SUBMIT_HEADERS, key_part(user.public), service.public)
    sub = wks.parse_submission(mail.replace(b"\n", b"\r\n"), wks.decrypter(service.secret))
    assert pk.dearmor(sub.key)[1] == user.public


def test_submission_laid_out_as_gpg_wks_client_writes_it(
        service: messages.GeneratedKey, user: messages.GeneratedKey) -> None:
    """gpg-wks-client 2.2 folds Content-Type before the boundary and puts Date last."""
    sealed = messages.encrypt(key_part(user.public), [service.public]).decode()
    mail = (f"{SUBMIT_HEADERS}MIME-Version: 1.0\n"
            'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\n'
            '\tboundary="=-=01-6zujdugmyxk9uqoz3cco=-="\n'
            "Date: Wed, 02 Dec 2026 10:44:24 +0000\n\n\n"
            "--=-=01-6zujdugmyxk9uqoz3cco=-=\nContent-Type: application/pgp-encrypted\n\n"
            "Version: 1\n\n--=-=01-6zujdugmyxk9uqoz3cco=-=\n"
            "Content-Type: application/octet-stream\n\n"
            f"{sealed}\n--=-=01-6zujdugmyxk9uqoz3cco=-=--\n").replace("\n", "\r\n").encode()
    sub = wks.parse_message(mail, wks.decrypter(service.secret))
    assert isinstance(sub, wks.Submission)
    assert (sub.sender, sub.encrypted, sub.draft_version) == (USER, True, 3)
    assert pk.dearmor(sub.key)[1] == user.public


def test_plaintext_without_mime_headers(service: messages.GeneratedKey,
                                        user: messages.GeneratedKey) -> None:
    armored = pk.armor(pk.ARMOR_PUBLIC_KEY, user.public)
    mail = pgp_mime(SUBMIT_HEADERS, armored, service.public)
    assert wks.parse_submission(mail, wks.decrypter(service.secret)).key == armored


def test_unencrypted_submissions(user: messages.GeneratedKey) -> None:
    def no_decrypt(_: bytes) -> bytes:
        raise AssertionError("nothing to decrypt")

    single = SUBMIT_HEADERS.encode() + key_part(user.public)
    sub = wks.parse_submission(single, no_decrypt)
    assert (sub.sender, sub.encrypted) == (USER, False)
    wrapped = (SUBMIT_HEADERS + 'Content-Type: multipart/mixed; boundary="M"\n\n'
               "--M\nContent-Type: text/plain\n\nhello\n--M\n").encode() \
        + key_part(user.public) + b"\n--M--\n"
    assert wks.parse_submission(wrapped, no_decrypt).key.startswith(b"-----BEGIN PGP PUBLIC")


@pytest.mark.parametrize("encoding", ["base64", "quoted-printable", "7bit", "BINARY"])
def test_transfer_encoded_key_parts(service: messages.GeneratedKey,
                                    user: messages.GeneratedKey, encoding: str) -> None:
    armored = pk.armor(pk.ARMOR_PUBLIC_KEY, user.public)
    body = {"base64": base64.encodebytes(armored),
            "quoted-printable": quopri.encodestring(armored)}.get(encoding.lower(), armored)
    part = (f"Content-Type: application/pgp-keys\nContent-Transfer-Encoding: {encoding}"
            "\n\n").encode() + body
    mail = pgp_mime(SUBMIT_HEADERS, part, service.public)
    sub = wks.parse_submission(mail, wks.decrypter(service.secret))
    assert pk.dearmor(sub.key)[1] == user.public
    single = SUBMIT_HEADERS.encode() + part
    assert pk.dearmor(wks.parse_submission(single, lambda d: d).key)[1] == user.public


def test_submission_structure_refusals(service: messages.GeneratedKey,
                                       user: messages.GeneratedKey) -> None:
    decrypt = wks.decrypter(service.secret)
    key = key_part(user.public)
    cases = {
        "protocol=application/pgp-encrypted": pgp_mime(SUBMIT_HEADERS, key, service.public,
                                                       protocol=""),
        "Version: 1": pgp_mime(SUBMIT_HEADERS, key, service.public, version="Version: 2"),
        "not encrypted to the submission key": pgp_mime(SUBMIT_HEADERS, key, user.public),
        "expected an application/pgp-keys part, found text/plain":
            pgp_mime(SUBMIT_HEADERS, b"Content-Type: text/plain\n\nhi\n", service.public),
        "application/pgp-keys part is empty": SUBMIT_HEADERS.encode()
            + b"Content-Type: application/pgp-keys\n\n\n",
        "exactly two parts": (SUBMIT_HEADERS + 'Content-Type: multipart/encrypted; '
                              'protocol="application/pgp-encrypted"; boundary="B"\n\n'
                              "--B\nContent-Type: application/pgp-encrypted\n\nVersion: 1\n"
                              "--B--\n").encode(),
        "first part": (SUBMIT_HEADERS + 'Content-Type: multipart/encrypted; '
                       'protocol="application/pgp-encrypted"; boundary="B"\n\n'
                       "--B\nContent-Type: text/plain\n\nVersion: 1\n"
                       "--B\nContent-Type: application/octet-stream\n\nxx\n--B--\n").encode(),
        "second part": (SUBMIT_HEADERS + 'Content-Type: multipart/encrypted; '
                        'protocol="application/pgp-encrypted"; boundary="B"\n\n'
                        "--B\nContent-Type: application/pgp-encrypted\n\nVersion: 1\n"
                        "--B\nContent-Type: text/plain\n\nxx\n--B--\n").encode(),
        "bad OpenPGP message|armored": (SUBMIT_HEADERS + 'Content-Type: multipart/encrypted; '
                       'protocol="application/pgp-encrypted"; boundary="B"\n\n'
                       "--B\nContent-Type: application/pgp-encrypted\n\nVersion: 1\n"
                       "--B\nContent-Type: application/octet-stream\n\n"
                       "-----BEGIN PGP MESSAGE-----\n\nAAAA\n-----END PGP MESSAGE-----\n"
                       "--B--\n").encode(),
        "more than one application/pgp-keys part": (
            SUBMIT_HEADERS + 'Content-Type: multipart/mixed; boundary="M"\n\n--M\n').encode()
            + key + b"\n--M\n" + key + b"\n--M--\n",
        "a multipart part without parts": (SUBMIT_HEADERS
                                           + "Content-Type: multipart/mixed\n\nhi\n").encode(),
        "Wks-Draft-Version is not a number": SUBMIT_HEADERS.replace("3\n", "three\n").encode()
            + key,
    }
    for reason, mail in cases.items():
        with pytest.raises(MessageRefused, match=reason):
            wks.parse_submission(mail, decrypt)


@pytest.mark.parametrize(("from_lines", "error", "reason"), [
    ("", MessageRefused, "no From"),
    ("From: user@example.org\nFrom: other@example.org\n", MessageRefused, "more than one From"),
    ("From: user@example.org, other@example.org\n", MessageRefused, "exactly one address"),
    ("From: undisclosed-recipients:;\n", MessageRefused, "exactly one address"),
    ("From: \"x\" <\"a b\"@example.org>\n", BadAddress, "local part"),
    ("From: <user@exa$mple.org>\n", BadAddress, "not a mail domain"),
    ("From: =?utf-8?q?a=0D=0ABcc=3A_x?= <user@localhost>\n", MessageRefused,
     "malformed From header"),
    ("From: " + "a" * 500 + "@example.org\n", BadAddress, "longer than 64"),
])
def test_hostile_from_headers(user: messages.GeneratedKey, from_lines: str,
                              error: type[Exception], reason: str) -> None:
    mail = (from_lines + "Subject: Key publishing request\n").encode() + key_part(user.public)
    with pytest.raises(error, match=reason):
        wks.parse_submission(mail, lambda data: data)


@pytest.mark.parametrize("header", [
    'From: "' + '\\"' * 400 + '" <user@example.org>\n',  # minutes of CPU in the stdlib if parsed
    "From: user@example.org\nContent-Type: multipart/mixed; " + "a=b; " * 200 + "boundary=B\n",
    "From: user@example.org\nContent-Type: application/pgp-keys\nContent-Transfer-Encoding: "
    + "x" * 600 + "\n",
])
def test_headers_we_parse_are_capped(header: str) -> None:
    mail = (header + "Content-Type: application/pgp-keys\n\nkey\n").encode()
    with pytest.raises(MessageRefused, match="header is longer than 512 characters"):
        wks.parse_submission(mail, lambda data: data)


@pytest.mark.parametrize(("part", "reason"), [
    (b"Content-Type: application/pgp-keys\nContent-Transfer-Encoding: x-uuencode\n\nkey\n",
     "unknown Content-Transfer-Encoding"),
    (b"Content-Type: application/pgp-keys\nContent-Transfer-Encoding: base64\n\nQUJDR\n",
     "base64 MIME part that does not decode"),
    (b"Content-Type: =?utf-8?q?application?=/pgp-keys\n\nkey\n",
     "expected an application/pgp-keys part"),
    (b"Wks-Draft-Version: =?utf-8?q?3?=\nContent-Type: application/pgp-keys\n\nkey\n",
     "Wks-Draft-Version is not a number"),
])
def test_what_we_do_not_read_is_refused(part: bytes, reason: str) -> None:
    """Unknown transfer encodings and undecodable base64 (the stdlib passed the text on
    undecoded) and encoded words where RFC 2047 §5 allows none (policy.default decoded)."""
    with pytest.raises(MessageRefused, match=reason):
        wks.parse_submission(b"From: user@example.org\n" + part, lambda data: data)


def test_long_headers_we_do_not_parse_are_fine(user: messages.GeneratedKey) -> None:
    """An Autocrypt header carries up to 10 KiB of keydata: nobody parses it here."""
    autocrypt = "Autocrypt: addr=user@example.org; keydata=" + "\n ".join(["QUJD" * 19] * 100)
    mail = (autocrypt + "\nFrom: user@example.org\n").encode() + key_part(user.public)
    assert wks.parse_submission(mail, lambda data: data).sender == USER


def test_from_with_display_name_and_encoded_words(user: messages.GeneratedKey) -> None:
    mail = b"From: =?utf-8?q?J=C3=B6rg?= <User@Example.ORG>\n" + key_part(user.public)
    assert wks.parse_submission(mail, lambda d: d).sender == Address("User", "example.org")


def test_size_and_shape_caps(service: messages.GeneratedKey, user: messages.GeneratedKey,
                             ) -> None:
    decrypt = wks.decrypter(service.secret)
    mail = pgp_mime(SUBMIT_HEADERS, key_part(user.public), service.public)
    with pytest.raises(MessageRefused, match="mail is larger than"):
        wks.parse_submission(mail, decrypt, max_mail=len(mail) - 1)
    big_header = ("X-Junk: " + "a" * 900 + "\n") * 80
    with pytest.raises(MessageRefused, match="octets of header"):
        wks.parse_submission(big_header.encode() + mail, decrypt)
    many = (SUBMIT_HEADERS + 'Content-Type: multipart/mixed; boundary="M"\n\n'
            + "--M\nContent-Type: text/plain\n\nx\n" * 20 + "--M--\n").encode()
    with pytest.raises(MessageRefused, match="more than 16 MIME parts"):
        wks.parse_submission(many, decrypt)
    deep = SUBMIT_HEADERS + 'Content-Type: multipart/mixed; boundary="B0"\n\n'
    for level in range(1, 6):
        deep += f'--B{level - 1}\nContent-Type: multipart/mixed; boundary="B{level}"\n\n'
    with pytest.raises(MessageRefused, match="deeper than"):
        wks.parse_submission(deep.encode(), decrypt)


# --- confirmation requests --------------------------------------------------------------

def _request(service: messages.GeneratedKey, user: messages.GeneratedKey,
             nonce: str) -> bytes:
    return wks.build_confirmation_request(
        submission_address=SUBMISSION, address=USER, fingerprint=user.fingerprint,
        nonce=nonce, user_key=user.public, submission_secret_key=service.secret, now=NOW)


def _signed_part(raw: bytes, boundary: str) -> bytes:
    """The first part of a multipart/signed mail exactly as sent (RFC 3156 §5)."""
    delimiter = b"\r\n--" + boundary.encode()
    start = raw.index(b"--" + boundary.encode() + b"\r\n") + len(boundary) + 4
    return raw[start : raw.index(delimiter, start)]


def test_confirmation_request_layout(service: messages.GeneratedKey,
                                     user: messages.GeneratedKey) -> None:
    nonce = wks.new_nonce()
    raw = _request(service, user, nonce)
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF everywhere, ready for SMTP
    mail = email.message_from_bytes(raw, policy=email.policy.default)
    assert mail["From"] == str(SUBMISSION)
    assert mail["To"] == str(USER)
    assert mail["Subject"] == "Confirm your key publication"
    assert (mail["Wks-Draft-Version"], mail["Wks-Phase"]) == ("3", "confirm")
    assert mail["Date"] == "Mon, 21 Sep 2026 14:13:20 +0000"
    assert mail.get_content_type() == "multipart/signed"
    assert mail.get_param("protocol") == "application/pgp-signature"
    signed, signature = mail.get_payload()
    assert isinstance(signed, Message)
    assert isinstance(signature, Message)
    assert signature.get_content_type() == "application/pgp-signature"
    assert [p.get_content_type() for p in signed.get_payload()] == [
        "text/plain", "application/vnd.gnupg.wks"]
    # The signature is the submission key's over the part exactly as transmitted.
    part = _signed_part(raw, mail.get_boundary() or "")
    assert part.startswith(b"Content-Type: multipart/mixed;")
    sig = signature.get_payload(decode=True)
    assert isinstance(sig, bytes)
    assert messages.verify_detached(part, sig, service.public) == service.fingerprint
    with pytest.raises(MessageRefused):
        messages.verify_detached(part.replace(b"ignore", b"IGNORE"), sig, service.public)
    # Encrypted to the submitted key only.
    sealed = signed.get_payload()[1].get_payload(decode=True)
    with pytest.raises(MessageRefused, match="not encrypted to"):
        messages.decrypt(sealed, service.secret)
    fields = wks.parse_wks_data(messages.decrypt(sealed, user.secret))
    assert fields == {"type": "confirmation-request", "sender": str(SUBMISSION),
                      "address": str(USER), "fingerprint": user.fingerprint.hex,
                      "nonce": nonce}


def test_confirmation_request_refusals(service: messages.GeneratedKey,
                                       user: messages.GeneratedKey) -> None:
    for nonce in ("short", "UPPERCASEUPPERCASEUPPER", "a" * 15, "n" * 20 + "\nx: y"):
        with pytest.raises(MessageRefused, match="nonce"):
            _request(service, user, nonce)
    with pytest.raises(Refused):
        wks.build_confirmation_request(
            submission_address=SUBMISSION, address=USER, fingerprint=user.fingerprint,
            nonce=wks.new_nonce(), user_key=b"garbage", submission_secret_key=service.secret,
            now=NOW)


# --- confirmation responses -------------------------------------------------------------

def test_encrypted_response(service: messages.GeneratedKey) -> None:
    nonce = wks.new_nonce()
    mail = pgp_mime(RESPONSE_HEADERS, wks_part(response_data(nonce)), service.public)
    response = wks.parse_confirmation_response(mail, wks.decrypter(service.secret))
    assert response == wks.ConfirmationResponse(USER, SUBMISSION, nonce, True)


def test_clear_response() -> None:
    # gpg-wks-client answers in the clear when it finds no key for the submission address.
    mail = (RESPONSE_HEADERS.encode() + b"Content-Type: application/vnd.gnupg.wks\n\n"
            + response_data("b" * 32))
    response = wks.parse_confirmation_response(mail, lambda d: d)
    assert (response.nonce, response.encrypted) == ("b" * 32, False)


@pytest.mark.parametrize(("data", "reason"), [
    (response_data(type="confirmation-request"), "not a confirmation response"),
    (response_data().replace(b"nonce: " + b"a" * 32 + b"\n", b""), "lacks 'nonce'"),
    (response_data(nonce="a" * 15), "nonce is malformed"),
    (response_data(nonce="a" * 20 + "*)(uid=*"), "nonce is malformed"),
    (response_data() + b"nonce: " + b"b" * 32 + b"\n", "repeats 'nonce'"),
    (response_data() + b"TYPE: confirmation-response\n", "repeats 'type'"),
    (response_data(address="other@example.org"), "From does not match"),
    (response_data(address="not an address"), "not a mail address"),
    (response_data() + b"garbage line\n", "malformed WKS data line"),
    (response_data() + b"x: \x1b[31m\n", "malformed WKS data line"),
    (response_data() + b"\xff\xfe\n", "not UTF-8"),
    (response_data() + b"x: " + b"y" * 5000 + b"\n", "larger than 4096"),
])
def test_response_refusals(service: messages.GeneratedKey, data: bytes, reason: str) -> None:
    mail = pgp_mime(RESPONSE_HEADERS, wks_part(data), service.public)
    with pytest.raises(Refused, match=reason):
        wks.parse_confirmation_response(mail, wks.decrypter(service.secret))


def test_response_of_the_wrong_type(service: messages.GeneratedKey) -> None:
    mail = pgp_mime(RESPONSE_HEADERS, key_part(service.public), service.public)
    with pytest.raises(MessageRefused, match=r"expected an application/vnd\.gnupg\.wks part"):
        wks.parse_confirmation_response(mail, wks.decrypter(service.secret))


def test_parse_message_tells_submissions_and_responses_apart(
        service: messages.GeneratedKey, user: messages.GeneratedKey) -> None:
    decrypt = wks.decrypter(service.secret)
    nonce = wks.new_nonce()
    response = wks.parse_message(
        pgp_mime(RESPONSE_HEADERS, wks_part(response_data(nonce)), service.public), decrypt)
    assert response == wks.ConfirmationResponse(USER, SUBMISSION, nonce, True)
    bare = wks.parse_message(
        pgp_mime(RESPONSE_HEADERS, response_data(nonce), service.public), decrypt)
    assert bare == response
    submission = wks.parse_message(
        pgp_mime(SUBMIT_HEADERS, key_part(user.public), service.public), decrypt)
    assert isinstance(submission, wks.Submission)
    assert pk.dearmor(submission.key)[1] == user.public
    armored = pk.armor(pk.ARMOR_PUBLIC_KEY, user.public)
    assert wks.parse_message(pgp_mime(SUBMIT_HEADERS, armored, service.public),
                             decrypt) == wks.parse_submission(
        pgp_mime(SUBMIT_HEADERS, armored, service.public), decrypt)


def test_parse_message_names_the_real_reason(service: messages.GeneratedKey) -> None:
    """A response from the wrong From is refused for that, not as a bad submission."""
    mail = pgp_mime(RESPONSE_HEADERS.replace("From: user@", "From: mallory@"),
                    wks_part(response_data()), service.public)
    with pytest.raises(MessageRefused, match=(
            r"From does not match the address being confirmed "
            r"\(mallory@example\.org is not user@example\.org\)")):
        wks.parse_message(mail, wks.decrypter(service.secret))
    with pytest.raises(MessageRefused, match=r"expected an application/pgp-keys or "):
        wks.parse_message(RESPONSE_HEADERS.encode() + b"Content-Type: text/plain\n\nhi\n",
                          lambda d: d)


def test_wks_data_is_case_insensitive_in_names_only() -> None:
    assert wks.parse_wks_data(b"Type: X\r\nNONCE:abc  \n\n") == {"type": "X", "nonce": "abc"}


# --- notices ----------------------------------------------------------------------------

def test_published_notice() -> None:
    fingerprint = messages.generate_submission_key(USER).fingerprint
    raw = wks.build_published_notice(submission_address=SUBMISSION, address=USER,
                                     fingerprint=fingerprint, now=NOW,
                                     in_reply_to="<abc@example.org>")
    assert b"\n" not in raw.replace(b"\r\n", b"")
    mail = email.message_from_bytes(raw, policy=email.policy.default)
    assert (mail["From"], mail["To"]) == (str(SUBMISSION), str(USER))
    assert mail["In-Reply-To"] == "<abc@example.org>"
    assert mail["Auto-Submitted"] == "auto-replied"
    assert mail.get_content_type() == "text/plain"
    assert fingerprint.hex in mail.get_content()


def test_a_notice_neutralises_hostile_text() -> None:
    # What a notice repeats of the submission (a refused address, a reason) is text from
    # outside.
    raw = wks.build_notice(
        submission_address=SUBMISSION, address=USER, now=NOW,
        subject="Your key has been published",
        text="refused: bad user ID 'x\r\nBcc: victim@example.net\x1b[2J' Jörg\n",
        in_reply_to="<x>\r\nBcc: victim@example.net")
    mail = email.message_from_bytes(raw, policy=email.policy.default)
    assert mail["Bcc"] is None
    assert mail["In-Reply-To"] is None
    body = mail.get_content()
    assert "\x1b" not in body
    assert "Jörg" in body
    assert "refused" in body
    subject_raw = wks.build_notice(submission_address=SUBMISSION, address=USER,
                                   subject="Hi\r\nBcc: victim@example.net", text="x", now=NOW)
    parsed = email.message_from_bytes(subject_raw, policy=email.policy.default)
    assert parsed["Bcc"] is None
    assert parsed["Subject"] == "Hi Bcc: victim@example.net"


def test_notice_to_a_utf8_address_uses_smtputf8() -> None:
    raw = wks.build_notice(submission_address=SUBMISSION, address=Address("jörg", "example.org"),
                           subject="Grüße", text="x", now=NOW)
    assert "To: jörg@example.org".encode() in raw


def test_notice_known_answer() -> None:
    raw = wks.build_notice(submission_address=SUBMISSION, address=USER, subject="Published",
                           text="Line one\n\n  indented\tline", now=NOW,
                           in_reply_to=" <id.1@example.org> ")
    assert re.sub(rb"<wks\.[0-9a-f]{24}@", b"<wks.ID@", raw) == (
        b"From: key-submission@example.org\r\nTo: user@example.org\r\n"
        b"Subject: Published\r\nDate: Mon, 21 Sep 2026 14:13:20 +0000\r\n"
        b"Message-ID: <wks.ID@example.org>\r\nAuto-Submitted: auto-replied\r\n"
        b"In-Reply-To: <id.1@example.org>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: 7bit\r\n'
        b"\r\nLine one\r\n\r\n  indented\tline\r\n")


@pytest.mark.parametrize(("text", "encoding"), [
    ("plain\n", "7bit"), ("Jörg\n", "8bit"), ("x" * 79, "quoted-printable"),
    ("ö" * 40, "quoted-printable"), ("", "7bit"),
])
def test_notice_body_encodings(text: str, encoding: str) -> None:
    raw = wks.build_notice(submission_address=SUBMISSION, address=USER, subject="s",
                           text=text, now=NOW)
    mail = email.message_from_bytes(raw, policy=email.policy.SMTP)
    assert mail["Content-Transfer-Encoding"] == encoding
    assert all(len(line) <= 78 for line in raw.split(b"\r\n"))


def test_notice_subject_folding() -> None:
    subject = " ".join(["word"] * 40)
    raw = wks.build_notice(submission_address=SUBMISSION, address=USER, subject=subject,
                           text="x", now=NOW)
    head = raw.split(b"\r\n\r\n")[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    assert head.count(b"\r\n word") >= 2
    mail = email.message_from_bytes(raw, policy=email.policy.default)
    assert mail["Subject"] == subject


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120), st.text(max_size=400), st.booleans())
def test_notices_parse_back_to_what_was_built(subject: str, text: str, utf8: bool) -> None:
    """parse(build(x)) == x, after the documented cleaning: control characters dropped,
    the subject on one line, the text ending in a line break."""
    to = Address("jörg", "example.org") if utf8 else USER
    try:
        raw = wks.build_notice(submission_address=SUBMISSION, address=to, subject=subject,
                               text=text, now=NOW)
    except MessageRefused:
        # Only text that cannot be UTF-8 at all (lone surrogates) is refused.
        assert any(0xD800 <= ord(ch) <= 0xDFFF for ch in subject + text)
        return
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert utf8 or raw.split(b"\r\n\r\n")[0].isascii()
    mail = email.message_from_bytes(raw, policy=email.policy.default)
    clean = "".join(ch for ch in subject if ord(ch) >= 0x20 or ch in "\n\t")
    assert mail["Subject"] == (" ".join(clean.split()) or "Web Key Service")
    assert mail["To"] == str(to)
    body = "".join(ch for ch in text if ord(ch) >= 0x20 or ch in "\n\t")
    content = mail.get_content().replace("\r\n", "\n")
    assert content == (body if body.endswith("\n") else body + "\n")


# --- property tests ---------------------------------------------------------------------

MAIL_LINES = st.lists(st.one_of(
    st.sampled_from([
        "From: user@example.org", "Content-Type: multipart/encrypted; boundary=B",
        'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary=B',
        "Content-Type: application/pgp-encrypted", "Content-Type: application/octet-stream",
        "Content-Type: application/pgp-keys", "Content-Type: application/vnd.gnupg.wks",
        "Content-Type: multipart/mixed; boundary=B", "Content-Transfer-Encoding: base64",
        "Content-Transfer-Encoding: quoted-printable", "Version: 1", "--B", "--B--", "",
        "-----BEGIN PGP MESSAGE-----", "-----END PGP MESSAGE-----", "type: confirmation-response",
        "nonce: aaaaaaaaaaaaaaaaaaaaa", "address: user@example.org", "=?utf-8?b?AAAA?=",
        "From: =?x?q?=00?= <@>", "From: a@b.c, (((((", "Content-Type: ;;;=\"",
    ]),
    st.text(max_size=40)), max_size=30)


def _ignore_refusal(parse: object, mail: bytes, decrypt: wks.Decrypt) -> None:
    try:
        result = parse(mail, decrypt)  # type: ignore[operator]
    except Refused:
        return
    assert isinstance(result, wks.Submission | wks.ConfirmationResponse)


@settings(max_examples=150, deadline=None)
@given(MAIL_LINES, st.sampled_from(["\n", "\r\n"]))
def test_parsers_on_random_mails_only_refuse(lines: list[str], eol: str) -> None:
    mail = eol.join(lines).encode("utf-8", "surrogatepass")
    for parse in (wks.parse_submission, wks.parse_confirmation_response):
        _ignore_refusal(parse, mail, lambda data: data)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=600))
def test_parsers_on_random_bytes_only_refuse(mail: bytes) -> None:
    for parse in (wks.parse_submission, wks.parse_confirmation_response):
        _ignore_refusal(parse, mail, lambda data: data)


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_parsers_on_mutated_mails_only_refuse(service: messages.GeneratedKey,
                                              user: messages.GeneratedKey,
                                              data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["submission", "response"]))
    if kind == "submission":
        mail = bytearray(pgp_mime(SUBMIT_HEADERS, key_part(user.public), service.public))
    else:
        mail = bytearray(pgp_mime(RESPONSE_HEADERS, wks_part(response_data()), service.public))
    for _ in range(data.draw(st.integers(1, 5))):
        pos = data.draw(st.integers(0, max(0, len(mail) - 1)))
        action = data.draw(st.sampled_from(["flip", "cut", "insert", "line"]))
        if action == "flip" and mail:
            mail[pos] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del mail[pos : pos + data.draw(st.integers(1, 40))]
        elif action == "insert":
            mail[pos:pos] = data.draw(st.binary(min_size=1, max_size=20))
        else:
            mail[pos:pos] = data.draw(st.sampled_from(
                [b"\n--BB\n", b"\nContent-Type: multipart/mixed\n", b"\n\n", b"\r",
                 b"From: x@y.z\n", b"\nContent-Transfer-Encoding: base64\n"]))
    decrypt = wks.decrypter(service.secret)
    for parse in (wks.parse_submission, wks.parse_confirmation_response):
        _ignore_refusal(parse, bytes(mail), decrypt)


def test_the_mutation_baseline_parses(service: messages.GeneratedKey,
                                      user: messages.GeneratedKey) -> None:
    """Without mutations the mails above are accepted, so the property tests do reach the
    deep parts of the parsers."""
    decrypt = wks.decrypter(service.secret)
    submission = pgp_mime(SUBMIT_HEADERS, key_part(user.public), service.public)
    assert wks.parse_submission(submission, decrypt).sender == USER
    response = pgp_mime(RESPONSE_HEADERS, wks_part(response_data()), service.public)
    assert re.fullmatch("a{32}", wks.parse_confirmation_response(response, decrypt).nonce)
