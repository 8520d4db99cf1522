"""DKIM signing: our signer (dkimpy's canonicalisation and header, OpenSSL's private-key
operation) against dkimpy's own `DKIM.sign`, byte for byte, for RSA and Ed25519; known
answers pinned from dkimpy 1.1.8; dual signing; keys and their DNS records. OpenDKIM
verifies the signatures in tests/integration/test_dkim_opendkim.py."""

from __future__ import annotations

import base64
import re
import types
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from milter_wkd import dkim
from milter_wkd.config import ConfigError, DomainConfig
from milter_wkd.domains import init_domain

DATA = Path(__file__).parent.parent / "data"
MESSAGE = (b"From: key-submission@example.org\r\nTo: alice@example.org\r\n"
           b"Subject: Your key is published\r\nAutocrypt: addr=alice@example.org; keydata=\r\n"
           b" AAAA\r\n\r\nHello.\r\n")
KAT_MESSAGE = (b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\n"
               b"Subject: Known answer\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
               b"Message-ID: <kat@example.org>\r\nAutocrypt: addr=alice@example.org; "
               b"keydata=\r\n AAAA\r\n\r\nHello,  world. \r\n\r\n\r\n")
KAT_TIME = 1700000000
# What dkimpy 1.1.8's DKIM.sign made for KAT_MESSAGE at KAT_TIME with the keys in tests/data
# (relaxed/relaxed, the h= list of signed_header_names).
KAT_RSA = (
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org;\r\n"
    b" i=@example.org; q=dns/txt; s=kat-rsa; t=1700000000; h=from : to :\r\n"
    b" subject : date : message-id : from : autocrypt;\r\n"
    b" bh=cYt+oiQVrRxPZobI0aHq9G01XoWfS96s0wd+I/mdOgU=;\r\n"
    b" b=Y/2OjdUp2iCG8EenmMbuHS72+ZmF4s91uwjgio4t3YltTuvELtVGq67cI8PCys1foxGil\r\n"
    b" stFhfvqfslzh5h06aY8sCQiOWdxC/m2AKARxn8V9bM5958XHhi5WgX1Agv6khbKrYiRvDO6\r\n"
    b" 8L0AWQXP92DrZB+X4ei4ZMNPtTfE0HCBfMNEPUIUPz9+y0RHyOHsXBAcnSdKCE/Mc6fCqKF\r\n"
    b" VGUPHlVU8i9cIYgIkjUojZMc/Fc9AAoWROFIXD4SestzQp6AdLR+6Ky0ckmHvhc1qAbsaQ3\r\n"
    b" EB+v4/RobPLbVLWRnL0WjRoNXc2244+Rim3Mluhw24qY2APY3Rrep8iyfYbA==\r\n")
KAT_ED25519 = (
    b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed; d=example.org;\r\n"
    b" i=@example.org; q=dns/txt; s=kat-ed; t=1700000000; h=from : to :\r\n"
    b" subject : date : message-id : from : autocrypt;\r\n"
    b" bh=cYt+oiQVrRxPZobI0aHq9G01XoWfS96s0wd+I/mdOgU=;\r\n"
    b" b=vsAJs2JZ/FE/pEJaYdoP8DbLBGXC+1V7hPuFMx3FfvbAdlXXH9Iu63wuoLegz196YBwKb\r\n"
    b" O9Lipv5SQAJNkj0Dg==\r\n")


def kat_key(algorithm: dkim.Algorithm) -> dkim.DkimKey:
    name, selector = ("rsa2048", "kat-rsa") if algorithm == "rsa" else ("ed25519", "kat-ed")
    return dkim.load_key(DATA / f"dkim-{name}.pem", "example.org", selector, algorithm)


def dkimpy_signature(message: bytes, key: dkim.DkimKey, timestamp: int) -> bytes:
    """dkimpy's own DKIM.sign (its pure-Python RSA, its key parsing) with the same input."""
    if key.algorithm == "rsa":
        private = key.private.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.TraditionalOpenSSL,
                                            serialization.NoEncryption())
    else:
        private = base64.b64encode(key.private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption()))
    include = dkim.signed_header_names(dkimpy.rfc822_parse(message)[0])
    with pytest.MonkeyPatch.context() as patch:  # dkimpy reads t= from time.time()
        patch.setattr(dkimpy, "time", types.SimpleNamespace(time=lambda: timestamp))
        signature: bytes = dkimpy.DKIM(message, linesep=b"\r\n").sign(
            key.selector.encode(), key.domain.encode(), private,
            signature_algorithm=key.signature_algorithm, canonicalize=(b"relaxed", b"relaxed"),
            include_headers=include)
    return signature


@pytest.mark.parametrize(("algorithm", "expected"), [("rsa", KAT_RSA),
                                                     ("ed25519", KAT_ED25519)])
def test_known_answer(algorithm: dkim.Algorithm, expected: bytes) -> None:
    key = kat_key(algorithm)
    assert dkim.signature_headers(KAT_MESSAGE, [key], timestamp=KAT_TIME) == [expected]
    # The dkimpy installed now still makes the same bytes (a changed dkimpy fails here).
    assert dkimpy_signature(KAT_MESSAGE, key, KAT_TIME) == expected
    assert dkim.verify(expected + KAT_MESSAGE, {key.dns_name(): key.dns_record()})


MESSAGES = [
    MESSAGE,
    MESSAGE.replace(b"\r\n", b"\n"),  # LF line ends
    b"From: a@example.org\r\n\r\n",  # no body
    b"Received: from x\r\n\tby y\r\nFrom: a@example.org\r\nFrom: b@example.org\r\n"
    b"SUBJECT:  folded\r\n  over\t lines  \r\nX-Other: not signed\r\n\r\n"
    b" leading space\r\ntrailing \t \r\n\r\n\r\n",
    b"From: a@example.org\r\nWks-Draft-Version: 3\r\nWks-Phase: confirm\r\nDate: x\r\n"
    b"Message-Id: <1@x>\r\nDKIM-Signature: v=1; old\r\n\r\n" + b"0123456789 " * 1000 + b"\r\n",
]


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
@pytest.mark.parametrize("message", MESSAGES, ids=range(len(MESSAGES)))
def test_same_bytes_as_dkimpy(algorithm: dkim.Algorithm, message: bytes) -> None:
    key = kat_key(algorithm)
    ours = dkim.signature_headers(message, [key], timestamp=1234567890)
    assert ours == [dkimpy_signature(message, key, 1234567890)]
    assert dkim.verify(ours[0] + message, {key.dns_name(): key.dns_record()})


header_name = st.sampled_from(["From", "To", "Subject", "Date", "Message-ID", "Autocrypt",
                               "Cc", "X-Mailer", "Received", "Content-Type", "from"])
header_value = st.text(st.sampled_from("abc xyz\t;:=@<>.,-"), max_size=90)
body_line = st.text(st.sampled_from("ab \t.=-"), max_size=100)


@settings(max_examples=60, deadline=None)
@given(headers=st.lists(st.tuples(header_name, header_value), max_size=8),
       body=st.lists(body_line, max_size=12), timestamp=st.integers(0, 2**32))
def test_same_bytes_as_dkimpy_any_message(headers: list[tuple[str, str]], body: list[str],
                                          timestamp: int) -> None:
    lines = ["From: a@example.org", *(f"{n}: {v}" for n, v in headers), "", *body]
    message = "\r\n".join(lines).encode() + b"\r\n"
    for key in (kat_key("rsa"), kat_key("ed25519")):
        assert dkim.signature_headers(message, [key], timestamp=timestamp) == [
            dkimpy_signature(message, key, timestamp)]


def test_dual_signing_both_verify_rsa_on_top() -> None:
    rsa, ed = kat_key("rsa"), kat_key("ed25519")
    signed = dkim.sign(MESSAGE, [rsa, ed])
    records = {rsa.dns_name(): rsa.dns_record(), ed.dns_name(): ed.dns_record()}
    assert re.findall(rb"^DKIM-Signature: v=1; a=([a-z0-9-]+);", signed, re.MULTILINE) == [
        b"rsa-sha256", b"ed25519-sha256"]
    assert dkim.verify(signed, records, 0)
    assert dkim.verify(signed, records, 1)
    # Each covers the message on its own: neither signs the other.
    assert dkim.signature_headers(MESSAGE, [ed], timestamp=7) == dkim.signature_headers(
        MESSAGE, [rsa, ed], timestamp=7)[1:]
    tampered = signed.replace(b" AAAA", b" AAAB")
    assert not dkim.verify(tampered, records, 0)
    assert not dkim.verify(tampered, records, 1)
    del records[ed.dns_name()]
    assert not dkim.verify(signed, records, 1)


@pytest.mark.parametrize("algorithm", ["ed25519", "rsa"])
def test_sign_and_verify(tmp_path: Path, algorithm: dkim.Algorithm) -> None:
    key = dkim.generate_key(tmp_path / "k.pem", "example.org", "wkd", algorithm)
    signed = dkim.sign(MESSAGE, key)
    records = {key.dns_name(): key.dns_record()}
    assert dkim.verify(signed, records)
    header = signed.split(b"\r\n\r\n")[0]
    assert b"autocrypt" in header.lower().split(b"h=")[1].split(b";")[0]
    # A changed Autocrypt header breaks the signature: the header is covered.
    tampered = signed.replace(b" AAAA", b" AAAB")
    assert not dkim.verify(tampered, records)
    reloaded = dkim.load_key(tmp_path / "k.pem", "example.org", "wkd")
    assert reloaded.dns_record() == key.dns_record()


def test_no_from_is_refused() -> None:
    with pytest.raises(ValueError, match="no From"):
        dkim.signature_headers(b"To: a@example.org\r\n\r\nx\r\n", [kat_key("ed25519")])


def test_refuses_overwrite_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    dkim.generate_key(path, "example.org", "wkd")
    with pytest.raises(FileExistsError):
        dkim.generate_key(path, "example.org", "wkd")
    (tmp_path / "bad.pem").write_text("nope")
    with pytest.raises(ConfigError):
        dkim.load_key(tmp_path / "bad.pem", "example.org", "wkd")
    with pytest.raises(ConfigError):
        dkim.load_key(tmp_path / "missing.pem", "example.org", "wkd")
    with pytest.raises(ConfigError, match="an ed25519 key where an rsa key belongs"):
        dkim.load_key(DATA / "dkim-ed25519.pem", "example.org", "wkd", "rsa")


def test_domain_keys_rsa_first_and_selectors() -> None:
    domain = DomainConfig(dkim_key=str(DATA / "dkim-ed25519.pem"), dkim_selector="ed",
                          dkim_rsa_key=str(DATA / "dkim-rsa2048.pem"), dkim_rsa_selector="rsa")
    assert [(k.algorithm, k.selector) for k in dkim.domain_keys(domain)] == [
        ("rsa", "rsa"), ("ed25519", "ed")]
    assert dkim.domain_keys(DomainConfig()) == ()
    single = DomainConfig(dkim_key=str(DATA / "dkim-rsa2048.pem"))
    assert [(k.algorithm, k.selector) for k in dkim.domain_keys(single)] == [("rsa", "wkd")]
    wrong = DomainConfig(dkim_rsa_key=str(DATA / "dkim-ed25519.pem"))
    with pytest.raises(ConfigError, match="where an rsa key belongs"):
        dkim.domain_keys(wrong)
    with pytest.raises(ConfigError, match="each key needs its own"):
        DomainConfig(dkim_key="a.pem", dkim_rsa_key="b.pem", dkim_rsa_selector="wkd")


def test_zone_line_splits_long_records() -> None:
    for key in (kat_key("rsa"), kat_key("ed25519")):
        line = key.zone_line()
        name, _, strings = line.partition(" IN TXT ")
        assert name == key.dns_name() + "."
        parts = re.findall(r'"([^"]*)"', strings)
        assert all(len(part) <= 255 for part in parts)
        assert "".join(parts) == key.dns_record()
    assert len(re.findall(r'"', kat_key("rsa").zone_line())) == 4  # two strings


def test_domain_init_creates_both_keys_and_prints_both_records(tmp_path: Path) -> None:
    domain = DomainConfig(submission_key=str(tmp_path / "s.asc"),
                          submission_public_key=str(tmp_path / "s.pub"),
                          dkim_key=str(tmp_path / "dkim.pem"),
                          dkim_rsa_key=str(tmp_path / "dkim-rsa.pem"))
    lines = init_domain(domain)
    rsa, ed = dkim.domain_keys(domain)
    assert (rsa.algorithm, rsa.selector, ed.algorithm, ed.selector) == (
        "rsa", "wkd-rsa", "ed25519", "wkd")
    assert getattr(rsa.private, "key_size", 0) == 2048
    assert [line for line in lines if line.startswith("DNS: ") and "_domainkey" in line] == [
        f"DNS: {rsa.zone_line()}", f"DNS: {ed.zone_line()}"]
    assert f"created DKIM key (rsa, selector wkd-rsa) in {tmp_path / 'dkim-rsa.pem'}" in lines
    again = init_domain(domain)  # existing keys are kept and their records printed again
    assert f"DNS: {rsa.zone_line()}" in again
    assert f"DKIM key (ed25519, selector wkd) in {tmp_path / 'dkim.pem'}" in again
