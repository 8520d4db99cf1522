"""The WKS round trip with the real gpg-wks-client 2.2: its submission mail parses and
decrypts, our confirmation request is answered by `--receive`, the answer parses and
carries our nonce back. `--fake-submission-addr` stands in for WKD discovery and makes the
client look keys up locally only (no network)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from milter_wkd import wks
from milter_wkd.errors import MessageRefused
from milter_wkd.openpgp import clean_key, inspect_key, messages
from milter_wkd.values import Address, Fingerprint
from tests.support.gnupg import WKS_CLIENT, GnuPG

pytestmark = pytest.mark.integration

SUBMISSION = Address.parse("key-submission@example.org")
USER = Address.parse("user@example.org")
FAKE = ("--fake-submission-addr", str(SUBMISSION))


def _service_key_by_gpg(home: Path) -> messages.GeneratedKey:
    """A submission key made by gpg instead of by us (sites may bring their own)."""
    with GnuPG(home) as gpg:
        fpr = gpg.generate(str(SUBMISSION), usage="sign,cert", expire="never")
        secret = gpg.run("--export-secret-keys", fpr).stdout
        public = clean_key(gpg.export(fpr), [SUBMISSION]).key
    return messages.GeneratedKey(secret, public, Fingerprint.parse(fpr))


@pytest.fixture(scope="module", params=["ours", "gpg"])
def service(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> messages.GeneratedKey:
    if request.param == "ours":
        return messages.generate_submission_key(SUBMISSION)
    return _service_key_by_gpg(tmp_path_factory.mktemp("service") / "home")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory,
           service: messages.GeneratedKey) -> Iterator[tuple[GnuPG, str]]:
    """The user's gpg: a key with two user IDs, the submission key imported."""
    with GnuPG(tmp_path_factory.mktemp("client") / "home") as gpg:
        fpr = gpg.generate("User <user@example.org>", usage="sign,cert")
        gpg.run("--quick-add-uid", fpr, "Other <other@example.net>")
        gpg.import_key(service.public)
        yield gpg, fpr


def create_submission(gpg: GnuPG, fpr: str) -> bytes:
    result = gpg.run(*FAKE, "--create", fpr, str(USER), binary=WKS_CLIENT)
    # gpg-wks-client writes the mail with CRLF line ends, ready for sendmail.
    assert result.stdout.startswith(b"From: user@example.org\r\n")
    return result.stdout


def confirmation_request(service: messages.GeneratedKey, user_key: bytes, fingerprint: str,
                         nonce: str) -> bytes:
    return wks.build_confirmation_request(
        submission_address=SUBMISSION, address=USER, fingerprint=Fingerprint.parse(fingerprint),
        nonce=nonce, user_key=user_key, submission_secret_key=service.secret, now=1_790_000_000)


def test_round_trip(client: tuple[GnuPG, str], service: messages.GeneratedKey) -> None:
    gpg, fpr = client
    submission = wks.parse_submission(create_submission(gpg, fpr), wks.decrypter(service.secret))
    assert (submission.sender, submission.encrypted, submission.draft_version) == (USER, True, 3)
    # The client filtered its key down to the one user ID of the address it submits.
    info = inspect_key(submission.key)
    assert info.fingerprint.hex == fpr
    assert info.user_ids == ("User <user@example.org>",)

    user_key = clean_key(submission.key, [submission.sender]).key
    nonce = wks.new_nonce()
    request = confirmation_request(service, user_key, fpr, nonce)
    answer = gpg.run("--verbose", *FAKE, "--receive", input=request, binary=WKS_CLIENT)
    # gpg-wks-client checked our signature on the way (it logs, it does not insist).
    assert b'Good signature from "key-submission@example.org"' in answer.stderr
    assert b"Subject: Key publication confirmation" in answer.stdout

    response = wks.parse_confirmation_response(answer.stdout, wks.decrypter(service.secret))
    assert response.encrypted
    assert (response.address, response.submission_address) == (USER, SUBMISSION)
    assert wks.nonces_equal(nonce, response.nonce)
    assert not wks.nonces_equal(wks.new_nonce(), response.nonce)


def test_client_insists_on_the_fingerprint_we_write(client: tuple[GnuPG, str],
                                                    service: messages.GeneratedKey) -> None:
    """The same request with another fingerprint line is refused by the client, so the
    round trip above succeeds because our fingerprint line is right."""
    gpg, fpr = client
    user_key = gpg.export(fpr)
    wrong = confirmation_request(service, user_key, service.fingerprint.hex, wks.new_nonce())
    result = gpg.run(*FAKE, "--receive", input=wrong, binary=WKS_CLIENT, check=False)
    assert result.returncode != 0
    assert b"not decrypted with target key" in result.stderr
    assert not result.stdout


def test_gpg_verifies_the_request_signature(client: tuple[GnuPG, str],
                                            service: messages.GeneratedKey,
                                            tmp_path: Path) -> None:
    gpg, fpr = client
    raw = confirmation_request(service, gpg.export(fpr), fpr, wks.new_nonce())
    boundary = raw.split(b'boundary="', 1)[1].split(b'"', 1)[0]
    first = raw.index(b"--" + boundary + b"\r\n") + len(boundary) + 4
    end = raw.index(b"\r\n--" + boundary, first)
    signature_start = raw.index(b"-----BEGIN PGP SIGNATURE-----")
    signature_end = raw.index(b"-----END PGP SIGNATURE-----") + 27
    (tmp_path / "part").write_bytes(raw[first:end])
    (tmp_path / "part.asc").write_bytes(raw[signature_start:signature_end] + b"\n")
    result = gpg.run("--status-fd", "2", "--verify", str(tmp_path / "part.asc"),
                     str(tmp_path / "part"))
    assert b"[GNUPG:] GOODSIG" in result.stderr
    # A single changed octet of the signed part breaks it.
    (tmp_path / "part").write_bytes(raw[first:end].replace(b"confirm", b"c0nfirm", 1))
    assert gpg.run("--verify", str(tmp_path / "part.asc"), str(tmp_path / "part"),
                   check=False).returncode == 1


def test_submission_for_someone_else_is_not_ours(client: tuple[GnuPG, str]) -> None:
    """A submission encrypted to another service key does not open with ours."""
    gpg, fpr = client
    stranger = messages.generate_submission_key(SUBMISSION)
    with pytest.raises(MessageRefused, match="not encrypted to the submission key"):
        wks.parse_submission(create_submission(gpg, fpr), wks.decrypter(stranger.secret))
