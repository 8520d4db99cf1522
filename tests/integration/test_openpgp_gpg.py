"""Key cleaning against real GnuPG 2.2 and sq 0.27.

Keys are made by gpg in private homes (module-scoped: generated once), cleaned by us, and
read back by gpg in fresh homes (`--check-sigs`: every signature good and self-made) and by
`sq inspect`. The Autocrypt keydata is compared packet by packet with gpg's own minimal
export. Refusals use gpg's real secret-key, compressed and encrypted output.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from milter_wkd import openpgp
from milter_wkd.errors import KeyRefused
from milter_wkd.openpgp.packets import dearmor, iter_packets
from milter_wkd.values import Address
from tests.support.gnupg import GnuPG
from tests.support.peers import require_binary

pytestmark = pytest.mark.integration

DAY = 86400
NOW = int(time.time())
# A tiny JPEG (SOI, JFIF APP0, EOI): all gpg --addphoto checks.
TINY_JPEG = bytes.fromhex("ffd8ffe000104a46494600010100000100010000ffd9")
CLI = str(Path(sys.executable).with_name("milter-wkd"))


def addrs(*texts: str) -> list[Address]:
    return [Address.parse(t) for t in texts]


def packets_of(data: bytes) -> list[bytes]:
    return [data[r.start : r.end] for r in iter_packets(data)]


@dataclass
class Made:
    fpr: str
    data: bytes

    @property
    def key_id(self) -> str:
        return self.fpr[-16:]


@dataclass
class World:
    base: Path
    alice: Made  # ed25519/cv25519, 5 UIDs (one revoked), photo, expired subkey, 2 certifiers
    alice_expired_sub: str
    alice_current_sub: str
    rob: Made  # RSA 3072 with an RSA 3072 encryption subkey, 2 UIDs
    rob_sub: str
    dave_old: Made  # before revocation
    dave: Made  # revoked by its revocation certificate
    erin_old: Made  # 1 year expiry
    erin: Made  # expiry extended to 3 years, one more subkey
    erin_expiry: tuple[int, int]  # (old, new) primary expiry as gpg lists it
    frank: Made  # one signing and one encryption subkey, certified by bob
    frank_gpg_minimal: bytes  # gpg's export-minimal + keep-uid + drop-subkey="usage !~ e"
    secret_binary: bytes
    secret_armored: bytes
    secret_subkeys: bytes
    compressed: bytes
    encrypted: bytes


def _subkey_fprs(gpg: GnuPG, fpr: str) -> list[str]:
    rows = gpg.colons("--list-keys", fpr)
    return [rows[i + 1][9] for i, row in enumerate(rows) if row[0] == "sub"]


def _expiry(gpg: GnuPG, fpr: str) -> int:
    return int(next(r for r in gpg.colons("--list-keys", fpr) if r[0] == "pub")[6])


def _certify(signer: GnuPG, key: bytes, fpr: str) -> bytes:
    """Import key into signer's home, certify all its user IDs, export it from there."""
    signer.import_key(key)
    signer.run("--quick-sign-key", fpr)
    return signer.export(fpr)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("openpgp-gpg")
    homes: list[GnuPG] = []

    def home(name: str) -> GnuPG:
        gpg = GnuPG(base / name)
        homes.append(gpg)
        return gpg

    try:
        yield _make_world(base, home)
    finally:
        for gpg in homes:
            gpg.close()


def _make_world(base: Path, home: Callable[[str], GnuPG]) -> World:
    bob, carol = home("bob"), home("carol")
    bob.generate("Bob <bob@certifier.example>", subkey=None)
    carol.generate("Carol <carol@certifier.example>", subkey=None)

    # Alice: made 400 days ago with a one-day subkey (long expired), then a current one.
    alice_home = home("alice")
    then = str(NOW - 400 * DAY)
    alice_home.run("--faked-system-time", then, "--quick-gen-key",
                   "Alice <alice@example.org>", "ed25519", "cert", "never")
    alice_fpr = alice_home.fingerprint("alice@example.org")
    alice_home.run("--faked-system-time", str(NOW - 400 * DAY + 60), "--quick-add-key",
                   alice_fpr, "cv25519", "encr", "1d")
    alice_home.run("--quick-add-key", alice_fpr, "cv25519", "encr", "1y")
    for uid in ("Alice Work <alice@work.example>", "Alice Other <alice@other.example>",
                "alice on irc", "Alice Old <alice-old@example.org>"):
        alice_home.run("--quick-add-uid", alice_fpr, uid)
    alice_home.run("--quick-revoke-uid", alice_fpr, "Alice Old <alice-old@example.org>")
    jpeg = base / "tiny.jpg"
    jpeg.write_bytes(TINY_JPEG)
    alice_home.run("--command-fd", "0", "--edit-key", alice_fpr,
                   input=f"addphoto\n{jpeg}\nsave\n".encode())
    assert any(r[0] == "uat" for r in alice_home.colons("--list-keys", alice_fpr))
    expired_sub, current_sub = _subkey_fprs(alice_home, alice_fpr)
    alice = _certify(carol, _certify(bob, alice_home.export(alice_fpr), alice_fpr), alice_fpr)

    rob_home = home("rob")
    rob_home.run("--quick-gen-key", "Rob <rob@example.org>", "rsa3072", "sign,cert", "2y")
    rob_fpr = rob_home.fingerprint("rob@example.org")
    rob_home.run("--quick-add-key", rob_fpr, "rsa3072", "encr", "2y")
    rob_home.run("--quick-add-uid", rob_fpr, "Rob Elsewhere <rob@elsewhere.example>")
    rob = _certify(bob, rob_home.export(rob_fpr), rob_fpr)

    dave_home = home("dave")
    dave_fpr = dave_home.generate("Dave <dave@example.org>")
    dave_old = dave_home.export(dave_fpr)
    certificate = (dave_home.home / "openpgp-revocs.d" / f"{dave_fpr}.rev").read_text()
    # gpg guards the stored certificate against accidental import with a leading ':'.
    dave_home.import_key(certificate.replace(":-----BEGIN", "-----BEGIN").encode())
    dave = dave_home.export(dave_fpr)

    erin_home = home("erin")
    erin_home.run("--faked-system-time", str(NOW - 10 * DAY), "--quick-gen-key",
                  "Erin <erin@example.org>", "ed25519", "cert", "1y")
    erin_fpr = erin_home.fingerprint("erin@example.org")
    erin_home.run("--faked-system-time", str(NOW - 10 * DAY + 5), "--quick-add-key",
                  erin_fpr, "cv25519", "encr", "1y")
    erin_old = erin_home.export(erin_fpr)
    old_expiry = _expiry(erin_home, erin_fpr)
    erin_home.run("--quick-set-expire", erin_fpr, "3y")
    erin_home.run("--quick-set-expire", erin_fpr, "3y", "*")
    erin_home.run("--quick-add-key", erin_fpr, "ed25519", "sign", "3y")
    erin = erin_home.export(erin_fpr)
    new_expiry = _expiry(erin_home, erin_fpr)

    frank_home = home("frank")
    frank_fpr = frank_home.generate("Frank <frank@example.org>", subkey=None)
    frank_home.run("--quick-add-key", frank_fpr, "ed25519", "sign", "1y")
    frank_home.run("--quick-add-key", frank_fpr, "cv25519", "encr", "1y")
    frank_home.run("--quick-add-uid", frank_fpr, "Frank Alt <frank@alt.example>")
    frank = _certify(bob, frank_home.export(frank_fpr), frank_fpr)
    frank_gpg_minimal = bob.export(
        frank_fpr, "--export-options", "export-minimal",
        "--export-filter", "keep-uid=mbox = frank@example.org",
        "--export-filter", "drop-subkey=usage !~ e")

    message = base / "message.txt"
    message.write_text("hello\n" * 50)
    compressed = frank_home.run("--compress-algo", "zlib", "--store", "-o", "-",
                                str(message)).stdout
    encrypted = frank_home.run("--symmetric", "--passphrase", "x", "-o", "-",
                               str(message)).stdout

    return World(
        base=base,
        alice=Made(alice_fpr, alice), alice_expired_sub=expired_sub,
        alice_current_sub=current_sub,
        rob=Made(rob_fpr, rob), rob_sub=_subkey_fprs(rob_home, rob_fpr)[0],
        dave_old=Made(dave_fpr, dave_old), dave=Made(dave_fpr, dave),
        erin_old=Made(erin_fpr, erin_old), erin=Made(erin_fpr, erin),
        erin_expiry=(old_expiry, new_expiry),
        frank=Made(frank_fpr, frank), frank_gpg_minimal=frank_gpg_minimal,
        secret_binary=frank_home.run("--export-secret-keys", frank_fpr).stdout,
        secret_armored=frank_home.run("--armor", "--export-secret-keys", frank_fpr).stdout,
        secret_subkeys=frank_home.run("--export-secret-subkeys", frank_fpr).stdout,
        compressed=compressed, encrypted=encrypted,
    )


# --- what gpg and sq see ---------------------------------------------------------------------

@dataclass
class GpgView:
    user_ids: list[str]
    subkeys: set[str]
    sigs: list[list[str]]  # sig and rev records of --check-sigs
    pub: list[str]
    has_photo: bool


_views = 0


def gpg_view(base: Path, data: bytes) -> GpgView:
    """Import data into a fresh home and list it with --check-sigs."""
    global _views  # noqa: PLW0603 — a counter for distinct home names
    _views += 1
    with GnuPG(base / f"view-{_views}") as gpg:
        gpg.import_key(data)
        rows = gpg.colons("--check-sigs")
    return GpgView(
        user_ids=[r[9] for r in rows if r[0] == "uid"],
        subkeys={rows[i + 1][9] for i, r in enumerate(rows) if r[0] == "sub"},
        sigs=[r for r in rows if r[0] in ("sig", "rev")],
        pub=next(r for r in rows if r[0] == "pub"),
        has_photo=any(r[0] == "uat" for r in rows),
    )


def sq_inspect(data: bytes) -> tuple[list[str], set[str], str]:
    sq = require_binary("sq")
    out = subprocess.run([sq, "inspect"], input=data, capture_output=True, check=True,
                         timeout=30).stdout.decode()
    lines = [line.strip() for line in out.splitlines()]
    uids = [line.split(":", 1)[1].strip() for line in lines if line.startswith("UserID:")]
    subs = {line.split(":", 1)[1].strip() for line in lines if line.startswith("Subkey:")}
    return uids, subs, out


def assert_only_good_self_sigs(view: GpgView, made: Made) -> None:
    assert view.sigs, "no signatures at all"
    for sig in view.sigs:
        assert sig[1] == "!", f"gpg does not verify {sig}"
        assert sig[4] == made.key_id, f"third-party signature survived: {sig}"


# --- cleaning --------------------------------------------------------------------------------

ALICE_ALLOWED = ("alice@example.org", "ALICE@work.example", "alice-old@example.org")


def test_alice_keeps_exactly_the_allowed_live_user_ids_and_all_subkeys(world: World) -> None:
    result = openpgp.clean_key(world.alice.data, addrs(*ALICE_ALLOWED))
    view = gpg_view(world.base, result.key)
    assert sorted(view.user_ids) == ["Alice <alice@example.org>",
                                     "Alice Work <alice@work.example>"]
    assert view.subkeys == {world.alice_expired_sub, world.alice_current_sub}
    assert not view.has_photo
    assert_only_good_self_sigs(view, world.alice)
    # One certification per user ID, one binding per subkey, nothing else.
    assert len(view.sigs) == 4
    sq_uids, sq_subs, _ = sq_inspect(result.key)
    assert sorted(sq_uids) == sorted(view.user_ids)
    assert sq_subs == view.subkeys


def test_alice_stats_count_what_was_dropped(world: World) -> None:
    result = openpgp.clean_key(world.alice.data, addrs(*ALICE_ALLOWED))
    # gpg's own listing of the circulated key: the certifications on the kept user IDs.
    full = gpg_view(world.base, world.alice.data)
    assert full.has_photo
    kept = {"Alice <alice@example.org>", "Alice Work <alice@work.example>"}
    third_party_on_kept, owner = 0, None
    with GnuPG(world.base / "listing") as gpg:
        gpg.import_key(world.alice.data)
        for row in gpg.colons("--list-sigs", world.alice.fpr):
            if row[0] in ("uid", "uat", "sub"):
                owner = row[9] if row[0] == "uid" else row[0]
            elif row[0] == "sig" and owner in kept and row[4] != world.alice.key_id:
                third_party_on_kept += 1
    assert third_party_on_kept == 4  # bob and carol on each of the two
    stats = result.stats
    assert stats["dropped:third-party-signature"] == third_party_on_kept
    assert stats["dropped:user-attribute"] == 1
    assert stats["dropped:revoked-user-id"] == 1
    assert stats["dropped:user-id-other-address"] == 1
    assert stats["dropped:user-id-without-address"] == 1
    assert stats["kept:user-id"] == 2
    assert stats["kept:subkey"] == 2


def test_alice_metadata(world: World) -> None:
    info = openpgp.inspect_key(world.alice.data)
    assert info.fingerprint.hex == world.alice.fpr
    assert (info.algorithm, info.curve, info.revoked, info.expires) == (
        "EdDSA", "ed25519", False, None)
    assert set(info.user_ids) == {"Alice <alice@example.org>",
                                  "Alice Work <alice@work.example>",
                                  "Alice Other <alice@other.example>"}
    subs = {s.fingerprint.hex: s for s in info.subkeys}
    assert set(subs) == {world.alice_expired_sub, world.alice_current_sub}
    expired = subs[world.alice_expired_sub]
    assert expired.expires is not None
    assert expired.expires < NOW
    assert expired.usage == "e"


def test_rsa_3072(world: World) -> None:
    result = openpgp.clean_key(world.rob.data, addrs("rob@example.org"))
    view = gpg_view(world.base, result.key)
    assert view.user_ids == ["Rob <rob@example.org>"]
    assert view.subkeys == {world.rob_sub}
    assert_only_good_self_sigs(view, world.rob)
    assert (result.info.bits, result.info.algorithm) == (3072, "RSA")
    assert result.stats["dropped:third-party-signature"] == 1
    sq_uids, sq_subs, _ = sq_inspect(result.key)
    assert (sq_uids, sq_subs) == (view.user_ids, view.subkeys)


def test_revoked_key_keeps_its_revocation(world: World) -> None:
    result = openpgp.clean_key(world.dave.data, addrs("dave@example.org"))
    assert result.info.revoked
    view = gpg_view(world.base, result.key)
    assert view.pub[1] == "r"
    assert [s[0] for s in view.sigs].count("rev") == 1
    assert_only_good_self_sigs(view, world.dave)
    _, _, text = sq_inspect(result.key)
    assert "Revoked" in text
    with pytest.raises(KeyRefused, match="revoked"):
        openpgp.autocrypt_keydata(world.dave.data, Address.parse("dave@example.org"))


@pytest.mark.parametrize("order", ["old-then-new", "new-then-old"])
def test_merge_revocation_wins(world: World, order: str) -> None:
    pair = (world.dave_old.data, world.dave.data)
    if order == "new-then-old":
        pair = pair[::-1]
    merged = openpgp.merge_keys(*pair, addrs("dave@example.org"))
    assert merged.info.revoked
    assert gpg_view(world.base, merged.key).pub[1] == "r"


@pytest.mark.parametrize("order", ["old-then-new", "new-then-old"])
def test_merge_extended_expiry_and_new_subkey(world: World, order: str) -> None:
    old_expiry, new_expiry = world.erin_expiry
    assert new_expiry > old_expiry
    assert openpgp.inspect_key(world.erin_old.data).expires == old_expiry
    pair = (world.erin_old.data, world.erin.data)
    if order == "new-then-old":
        pair = pair[::-1]
    merged = openpgp.merge_keys(*pair, addrs("erin@example.org"))
    assert merged.info.expires == new_expiry
    assert len(merged.info.subkeys) == 2
    view = gpg_view(world.base, merged.key)
    assert int(view.pub[6]) == new_expiry
    assert len(view.subkeys) == 2
    assert_only_good_self_sigs(view, world.erin)


def test_merge_refuses_a_different_key(world: World) -> None:
    with pytest.raises(KeyRefused, match="different key"):
        openpgp.merge_keys(world.erin.data, world.frank.data, None)


def test_autocrypt_keydata_matches_gpg_minimal_export(world: World) -> None:
    keydata = openpgp.autocrypt_keydata(world.frank.data, Address.parse("frank@example.org"))
    ours, theirs = packets_of(keydata), packets_of(world.frank_gpg_minimal)
    assert [p[0] for p in ours] == [p[0] for p in theirs]  # same packet types in order
    assert ours == theirs
    assert len(ours) == 5
    view = gpg_view(world.base, keydata)
    assert view.user_ids == ["Frank <frank@example.org>"]
    assert_only_good_self_sigs(view, world.frank)


def test_armored_output_imports(world: World) -> None:
    result = openpgp.clean_key(world.frank.data, addrs("frank@alt.example"))
    armored = openpgp.armor_key(result.key)
    assert armored.startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n")
    view = gpg_view(world.base, armored)
    assert view.user_ids == ["Frank Alt <frank@alt.example>"]
    assert len(view.subkeys) == 2
    # gpg's own armor reads the same as its binary form.
    with GnuPG(world.base / "armor") as gpg:
        gpg.import_key(world.frank.data)
        gpg_armored = gpg.export(world.frank.fpr, "--armor")
    assert openpgp.clean_key(gpg_armored, addrs("frank@alt.example")).key == result.key


def test_dearmor_agrees_with_gpg_crc_on_large_input(world: World, tmp_path: Path) -> None:
    """gpg's own CRC-24 over 3 MB: checks the folded CRC path of `packets.crc24`."""
    payload = hashlib.shake_256(b"large armor").digest(3_000_000)
    source = tmp_path / "payload.bin"
    source.write_bytes(payload)
    with GnuPG(world.base / "enarmor") as gpg:
        armored = gpg.run("--enarmor", "-o", "-", str(source)).stdout
    assert dearmor(armored) == ("PGP ARMORED FILE", payload)
    middle = len(armored) // 2
    while not armored[middle : middle + 1].isalpha():
        middle += 1
    swapped = b"A" if armored[middle : middle + 1] != b"A" else b"B"
    with pytest.raises(KeyRefused, match="CRC-24"):
        dearmor(armored[:middle] + swapped + armored[middle + 1 :])


# --- refusals --------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "reason"), [
    ("secret_binary", "secret key material"),
    ("secret_armored", "secret key material: refusing a private key block"),
    ("secret_subkeys", "secret key material"),
])
def test_refuses_secret_keys(world: World, field: str, reason: str) -> None:
    with pytest.raises(KeyRefused, match=reason):
        openpgp.clean_key(getattr(world, field), addrs("frank@example.org"))


@pytest.mark.parametrize("field", ["compressed", "encrypted"])
def test_refuses_compressed_or_encrypted_packets_inside_a_key(world: World, field: str) -> None:
    appended = world.frank.data + getattr(world, field)
    with pytest.raises(KeyRefused, match=r"compressed or encrypted packet \(type \d+\)"):
        openpgp.clean_key(appended, addrs("frank@example.org"))
    with pytest.raises(KeyRefused, match="does not start with a public key packet"):
        openpgp.clean_key(getattr(world, field), addrs("frank@example.org"))


def test_refuses_when_no_allowed_address_is_left(world: World) -> None:
    with pytest.raises(KeyRefused, match="no user ID with a valid self-signature"):
        openpgp.clean_key(world.alice.data, addrs("alice-old@example.org",
                                                   "nobody@example.org"))


# --- the command line ------------------------------------------------------------------------

def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([CLI, *args], input=stdin, capture_output=True, timeout=60,
                          check=False)


def test_cli_clean_with_stats(world: World, tmp_path: Path) -> None:
    source, out = tmp_path / "alice.pgp", tmp_path / "clean.pgp"
    source.write_bytes(world.alice.data)
    proc = run_cli("key", "clean", "--address", "alice@example.org", "--address",
                   "alice@work.example", "--stats", str(source), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    stats = dict(line.split(": ") for line in proc.stderr.decode().splitlines())
    assert stats["dropped:user-attribute"] == "1"
    assert stats["kept:user-id"] == "2"
    assert stats["dropped:third-party-signature"] == "4"
    expected = openpgp.clean_key(world.alice.data, addrs("alice@example.org",
                                                          "alice@work.example"))
    assert out.read_bytes() == expected.key


def test_cli_stdin_armor_and_autocrypt(world: World) -> None:
    proc = run_cli("key", "clean", "--address", "frank@example.org", "--armor",
                   stdin=world.frank.data)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert proc.stderr == b""
    proc = run_cli("key", "clean", "--address", "frank@example.org", "--autocrypt",
                   stdin=world.frank.data)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == openpgp.autocrypt_keydata(
        world.frank.data, Address.parse("frank@example.org"))


@pytest.mark.parametrize(("field", "args", "reason"), [
    ("secret_binary", ["--address", "frank@example.org"],
     "refused: secret key material: refusing a secret key"),
    ("secret_armored", ["--address", "frank@example.org"],
     "refused: secret key material: refusing a private key block"),
    ("frank", ["--address", "nobody@example.org"],
     "refused: no user ID with a valid self-signature for any allowed address"),
    ("frank", ["--address", "frank@example.org", "--address", "frank@alt.example",
               "--autocrypt"], "refused: --autocrypt takes exactly one --address"),
    ("frank", ["--address", "frank@example.org", "--max-size", "100"],
     "refused: input is over the limit of 100 octets"),
])
def test_cli_refusals(world: World, field: str, args: list[str], reason: str) -> None:
    value = getattr(world, field)
    proc = run_cli("key", "clean", *args, stdin=value.data if isinstance(value, Made) else value)
    assert proc.returncode == 2
    assert proc.stdout == b""
    assert proc.stderr.decode().splitlines() == [reason]


def test_cli_inspect(world: World) -> None:
    proc = run_cli("key", "inspect", stdin=world.rob.data)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["fingerprint"] == world.rob.fpr
    assert info["bits"] == 3072
    assert sorted(info["user_ids"]) == ["Rob <rob@example.org>",
                                        "Rob Elsewhere <rob@elsewhere.example>"]


# --- #11 items 3 and 4, and back-signatures: keys gpg makes, that gpg or sq would misread ----

def test_gpg_files_a_two_address_user_id_under_the_first_one(tmp_path: Path) -> None:
    """The attack: gpg reads bob@ from this user ID; we used to publish it for alice@."""
    uid = "Bob Baker <bob@example.org> <alice@example.org>"
    with GnuPG(tmp_path / "mallory") as gpg:
        fpr = gpg.generate(uid)
        assert gpg.fingerprint("<bob@example.org>") == fpr
        assert gpg.run("--list-keys", "<alice@example.org>", check=False).returncode != 0
        data = gpg.export(fpr)
    for wanted in (addrs("alice@example.org"), addrs("bob@example.org"), None):
        with pytest.raises(KeyRefused, match="more than one address"):
            openpgp.clean_key(data, wanted)


def test_rsa_1024_made_by_gpg_is_refused_as_sq_does(tmp_path: Path) -> None:
    with GnuPG(tmp_path / "weak") as gpg:
        fpr = gpg.generate("Weak <weak@example.org>", algo="rsa1024", subkey="rsa1024")
        data = gpg.export(fpr)
    assert "Policy rejected asymmetric algorithm" in sq_inspect(data)[2]
    with pytest.raises(KeyRefused, match=r"RSA-1024 is too weak \(minimum 2048 bits\)"):
        openpgp.clean_key(data, None)
    weak_subkey_only = openpgp.Policy(min_rsa_bits=1024)
    assert openpgp.clean_key(data, None, limits=openpgp.Limits(policy=weak_subkey_only))


@pytest.mark.parametrize(("when", "accepted_by_the_lenient_policy"), [
    ("20220601T000000", True), ("20240601T000000", False)])
def test_sha1_self_signatures_and_the_advice_that_fixes_them(
        tmp_path: Path, when: str, accepted_by_the_lenient_policy: bool) -> None:
    with GnuPG(tmp_path / "sha1") as gpg:
        sha1 = ("--faked-system-time", when, "--cert-digest-algo", "SHA1", "--digest-algo",
                "SHA1")
        gpg.run(*sha1, "--quick-gen-key", "Old <old@example.org>", "rsa2048", "default",
                "never")
        fpr = gpg.fingerprint("old@example.org")
        gpg.run(*sha1, "--quick-add-key", fpr, "rsa2048", "encr", "never")
        data = gpg.export(fpr)
        # sq rejects it whenever it was made: Sequoia compares its cutoff with today.
        assert "SHA1 is not considered secure since 2023-02-01" in sq_inspect(data)[2]
        with pytest.raises(KeyRefused, match=f"uses SHA-1.*SHA256 --quick-set-expire {fpr} 2y"):
            openpgp.clean_key(data, None)
        lenient = openpgp.Limits(policy=openpgp.Policy(sha1_before_2023=True))
        if accepted_by_the_lenient_policy:
            assert openpgp.clean_key(data, None, limits=lenient).info.fingerprint.hex == fpr
        else:
            with pytest.raises(KeyRefused, match="SHA-1"):
                openpgp.clean_key(data, None, limits=lenient)
        # What the refusal tells the user to do makes the key publishable.
        refresh = ("--cert-digest-algo", "SHA256", "--quick-set-expire", fpr, "2y")
        gpg.run(*refresh)
        gpg.run(*refresh, "*")
        refreshed = openpgp.clean_key(gpg.export(fpr), None)
    assert refreshed.info.user_ids == ("Old <old@example.org>",)
    assert len(refreshed.info.subkeys) == 1
    assert "Invalid" not in sq_inspect(refreshed.key)[2]


def test_a_critical_notation_invalidates_the_self_signature_as_in_gpg(tmp_path: Path) -> None:
    with GnuPG(tmp_path / "crit") as gpg:
        fpr = gpg.generate("Crit <crit@example.org>")
        gpg.run("--cert-notation", "!x@example.org=1", "--quick-add-uid", fpr,
                "Crit Two <crit2@example.org>")
        data = gpg.export(fpr)
        checked = gpg.run("--check-sigs", fpr).stderr.decode()
    assert "unknown critical bit" in checked  # gpg itself refuses that self-signature
    result = openpgp.clean_key(data, None)
    assert result.info.user_ids == ("Crit <crit@example.org>",)
    assert result.stats["dropped:self-signature-critical"] == 1
    assert result.dropped[0].startswith("user ID 'Crit Two <crit2@example.org>': its "
                                        "self-signature carries a critical subpacket")


def test_gpg_signing_subkeys_are_cross_certified(tmp_path: Path) -> None:
    with GnuPG(tmp_path / "signing") as gpg:
        fpr = gpg.generate("Sig <sig@example.org>")
        gpg.run("--quick-add-key", fpr, "ed25519", "sign", "1y")
        gpg.run("--quick-add-key", fpr, "ed25519", "auth", "1y")
        info = openpgp.inspect_key(gpg.export(fpr))
    assert sorted((s.usage, s.cross_certified) for s in info.subkeys) == [
        ("a", False), ("e", False), ("s", True)]
