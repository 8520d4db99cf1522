"""DKIM signing with dkimpy, verified by dkimpy with an offline resolver."""

from pathlib import Path

import pytest

from milter_wkd import dkim
from milter_wkd.config import ConfigError

MESSAGE = (b"From: key-submission@example.org\r\nTo: alice@example.org\r\n"
           b"Subject: Your key is published\r\nAutocrypt: addr=alice@example.org; keydata=\r\n"
           b" AAAA\r\n\r\nHello.\r\n")


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
