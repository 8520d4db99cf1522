"""openpgp.messages against real gpg 2.2: gpg reads what we encrypt and sign, we read
what gpg encrypts (every compression, several recipients, signed, text mode), gpg's
compressed bombs are refused, and gpg works with the key we generate."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from milter_wkd.errors import KeyRefused, MessageRefused
from milter_wkd.openpgp import messages
from milter_wkd.values import Address
from tests.support.gnupg import GnuPG

pytestmark = pytest.mark.integration

SUBMISSION = Address.parse("key-submission@example.org")


@pytest.fixture(scope="module")
def service() -> messages.GeneratedKey:
    return messages.generate_submission_key(SUBMISSION)


@pytest.fixture(scope="module")
def gpg(tmp_path_factory: pytest.TempPathFactory,
        service: messages.GeneratedKey) -> Iterator[tuple[GnuPG, str]]:
    """A gpg home with a user key (ed25519/cv25519) and our service's public key."""
    with GnuPG(tmp_path_factory.mktemp("gpg") / "home") as home:
        fpr = home.generate("User <user@example.org>", usage="sign,cert")
        home.import_key(service.public)
        yield home, fpr


def encrypt_with_gpg(home: GnuPG, data: bytes, *options: str, recipients: list[str]) -> bytes:
    args = ["--trust-model", "always", "--encrypt", *options]
    for recipient in recipients:
        args += ["--recipient", recipient]
    return home.run(*args, input=data).stdout


def test_gpg_decrypts_what_we_encrypt(gpg: tuple[GnuPG, str],
                                      service: messages.GeneratedKey) -> None:
    home, fpr = gpg
    user_key = home.export(fpr)
    text = b"type: confirmation-request\nnonce: abc\n"
    sealed = messages.encrypt(text, [user_key, service.public])
    result = home.run("--decrypt", "--status-fd", "2", input=sealed)
    assert result.stdout == text
    assert b"[GNUPG:] DECRYPTION_OKAY" in result.stderr
    assert b"[GNUPG:] GOODMDC" in result.stderr
    # Our own service key opens the same message.
    assert messages.decrypt(sealed, service.secret) == text


@pytest.mark.parametrize("options", [
    ["-z0"], ["--armor", "-z0"], ["--compress-algo", "zip"], ["--compress-algo", "zlib"],
    ["--compress-algo", "bzip2", "--armor"], ["--textmode", "--armor"],
])
def test_we_decrypt_what_gpg_encrypts(gpg: tuple[GnuPG, str], service: messages.GeneratedKey,
                                      options: list[str]) -> None:
    home, fpr = gpg
    text = b"Content-Type: application/pgp-keys\n\n" + b"line of a key\n" * 500
    sealed = encrypt_with_gpg(home, text, *options, recipients=[service.fingerprint.hex, fpr])
    plain = messages.decrypt(sealed, service.secret)
    assert plain.replace(b"\r\n", b"\n") == text


@pytest.mark.parametrize("cipher", ["AES", "AES192", "AES256", "CAMELLIA256", "3DES"])
def test_we_decrypt_every_cipher_gpg_picks(gpg: tuple[GnuPG, str],
                                           service: messages.GeneratedKey,
                                           cipher: str) -> None:
    """AES is decrypted by our own code, the others by pgpy: both read gpg's messages."""
    home, _ = gpg
    text = b"Content-Type: application/pgp-keys\n\nkey\n"
    sealed = encrypt_with_gpg(home, text, "--cipher-algo", cipher,
                              recipients=[service.fingerprint.hex])
    assert messages.decrypt(sealed, service.secret) == text
    tampered = bytearray(sealed)
    tampered[-5] ^= 0x01
    with pytest.raises(MessageRefused, match="decryption failed"):
        messages.decrypt(bytes(tampered), service.secret)


def test_signed_and_encrypted_by_gpg(gpg: tuple[GnuPG, str],
                                     service: messages.GeneratedKey) -> None:
    home, fpr = gpg
    sealed = home.run("--trust-model", "always", "--sign", "--encrypt", "--local-user", fpr,
                      "--recipient", service.fingerprint.hex, input=b"signed text").stdout
    assert messages.decrypt(sealed, service.secret) == b"signed text"


@pytest.mark.parametrize("algorithm", ["zlib", "bzip2"])
def test_compression_bombs_are_refused(gpg: tuple[GnuPG, str], service: messages.GeneratedKey,
                                       algorithm: str) -> None:
    home, _ = gpg
    bomb = encrypt_with_gpg(home, b"\0" * 20_000_000, "--compress-algo", algorithm,
                            recipients=[service.fingerprint.hex])
    assert len(bomb) < 100_000  # small on the wire...
    with pytest.raises(MessageRefused, match="decompressed message is larger than 524288"):
        messages.decrypt(bomb, service.secret)  # ...and never inflated past the cap


def test_wrong_key_and_symmetric_messages(gpg: tuple[GnuPG, str],
                                          service: messages.GeneratedKey) -> None:
    home, fpr = gpg
    for_user = encrypt_with_gpg(home, b"x", recipients=[fpr])
    with pytest.raises(MessageRefused, match="not encrypted to the submission key"):
        messages.decrypt(for_user, service.secret)
    symmetric = home.run("--symmetric", "--passphrase", "pw", input=b"x").stdout
    with pytest.raises(MessageRefused, match="password"):
        messages.decrypt(symmetric, service.secret)


def test_gpg_verifies_our_signatures_and_we_verify_gpg(
        gpg: tuple[GnuPG, str], service: messages.GeneratedKey, tmp_path: Path) -> None:
    home, fpr = gpg
    data = b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x--"
    (tmp_path / "data").write_bytes(data)
    (tmp_path / "data.asc").write_bytes(messages.sign_detached(data, service.secret))
    result = home.run("--status-fd", "2", "--verify", str(tmp_path / "data.asc"),
                      str(tmp_path / "data"))
    assert f"[GNUPG:] VALIDSIG {service.fingerprint.hex}".encode() in result.stderr
    (tmp_path / "data").write_bytes(data + b" ")
    assert home.run("--verify", str(tmp_path / "data.asc"), str(tmp_path / "data"),
                    check=False).returncode == 1
    user_key = home.export(fpr)
    for mode in ("--detach-sign", "--textmode"):
        args = ["--armor", "--detach-sign", "--local-user", fpr]
        if mode == "--textmode":
            args.insert(0, "--textmode")
        signature = home.run(*args, input=data).stdout
        assert messages.verify_detached(data, signature, user_key).hex == fpr
        with pytest.raises(MessageRefused, match="bad signature"):
            messages.verify_detached(data + b"!", signature, user_key)


def test_gpg_accepts_the_generated_key(gpg: tuple[GnuPG, str],
                                       service: messages.GeneratedKey, tmp_path: Path) -> None:
    home, _ = gpg
    rows = home.colons("--list-keys", service.fingerprint.hex)
    pub = next(r for r in rows if r[0] == "pub")
    assert (pub[1], pub[3], pub[6], pub[11], pub[16]) == ("-", "22", "", "scESC", "ed25519")
    sub = next(r for r in rows if r[0] == "sub")
    assert (sub[3], sub[11], sub[16]) == ("18", "e", "cv25519")
    assert [r[9] for r in rows if r[0] == "uid"] == ["key-submission@example.org"]
    # Its secret half works in gpg too: it decrypts and signs there.
    with GnuPG(tmp_path / "service") as other:
        other.import_key(service.secret)
        sealed = messages.encrypt(b"to the service", [service.public])
        assert other.run("--decrypt", input=sealed).stdout == b"to the service"
        signed = other.run("--detach-sign", "--local-user", service.fingerprint.hex,
                           input=b"data").stdout
        assert messages.verify_detached(b"data", signed, service.public) == service.fingerprint


def test_expired_and_rsa_recipients(tmp_path: Path) -> None:
    with GnuPG(tmp_path / "rsa") as home:
        fpr = home.generate("Rsa <rsa@example.org>", algo="rsa2048", usage="sign,cert",
                            expire="1y", subkey="rsa2048")
        key = home.export(fpr)
        sealed = messages.encrypt(b"rsa works", [key])
        assert home.run("--decrypt", input=sealed).stdout == b"rsa works"
        later = int(time.time()) + 2 * 365 * 86400
        with pytest.raises(KeyRefused, match="expired"):
            messages.encrypt(b"x", [key], now=later)
        secret = home.run("--export-secret-keys", fpr).stdout
        assert messages.decrypt(encrypt_with_gpg(home, b"rsa in", recipients=[fpr]),
                                secret) == b"rsa in"


def session_key_packets(sealed: bytes) -> list[bytes]:
    binary = messages._binary_message(sealed, messages.DEFAULT_MAX_MESSAGE)
    return messages._encrypted_parts(binary)[0]


@pytest.mark.parametrize("cipher", ["AES", "AES256", "CAMELLIA256"])
def test_cv25519_session_keys_without_pgpy_agree_with_pgpy(
        gpg: tuple[GnuPG, str], service: messages.GeneratedKey, cipher: str) -> None:
    home, fpr = gpg
    sealed = encrypt_with_gpg(home, b"x" * 100, "--cipher-algo", cipher,
                              recipients=[fpr, service.fingerprint.hex])
    packets = session_key_packets(sealed)
    ours = messages._cv25519_keys(service.secret)
    assert len(ours) == 1  # the service key's encryption subkey
    found = [messages._cv25519_session_key(p, ours) for p in packets]
    assert found.count(None) == 1  # the user's own packet is not for us
    fast = next(f for f in found if f is not None)
    slow = messages._session_key(packets, messages._decryption_keys(service.secret), {})
    assert fast == (int(slow[0]), bytes(slow[1]))


def test_corrupt_cv25519_session_keys_are_refused(gpg: tuple[GnuPG, str],
                                                  service: messages.GeneratedKey) -> None:
    home, _fpr = gpg
    sealed = encrypt_with_gpg(home, b"x" * 100, recipients=[service.fingerprint.hex])
    (packet,) = session_key_packets(sealed)
    ours = messages._cv25519_keys(service.secret)
    assert messages._cv25519_session_key(packet, ours) is not None
    for offset in (15, 30, len(packet) - 1, len(packet) - 20):  # point, wrapped key
        bad = bytearray(packet)
        bad[offset] ^= 0x01
        with pytest.raises(MessageRefused):
            messages._cv25519_session_key(bytes(bad), ours)
    wildcard = packet[:3] + bytes(8) + packet[11:]  # key ID 0: not ours to answer fast
    assert messages._cv25519_session_key(wildcard, ours) is None
    truncated = packet[:1] + bytes([packet[1] - 5]) + packet[2:-5]
    with pytest.raises((MessageRefused, KeyRefused)):
        messages._cv25519_session_key(truncated, ours)
    # The whole message still decrypts or is refused cleanly, never crashes.
    assert messages.decrypt(sealed, service.secret) == b"x" * 100
