"""`milter-wkd keys import|remove` end to end: the console script, a config file, the
sandbox slapd."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from milter_wkd.cli import main
from milter_wkd.sandbox.flood import flood_key
from milter_wkd.sandbox.slapd import Slapd, _free_port
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.model import KeyOrigin
from milter_wkd.values import Address
from tests.support.gnupg import WKS_CLIENT, GnuPG

pytestmark = pytest.mark.integration

SCRIPT = Path(sys.executable).with_name("milter-wkd")


def write_config(path: Path, slapd: Slapd, uri: str | None = None) -> Path:
    secret = path.with_suffix(".secret")
    secret.write_text(slapd.service_accounts["milter"]["password"] + "\n")
    path.write_text(f"""\
[directory]
uri = "{uri or slapd.uri}"
bind_dn = "{slapd.service_accounts['milter']['dn']}"
bind_password_file = "{secret}"
base_dn = "{slapd.people_dn}"
pending_base = "{slapd.pending_dn}"
mail_attributes = ["mail", "mailLocalAddress"]
timeout = 1.0
""")
    return path


@pytest.fixture
def config_file(tmp_path: Path, slapd: Slapd) -> Path:
    return write_config(tmp_path / "milter-wkd.toml", slapd)


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The same entry point without a new interpreter (cheaper): (exit code, stderr)."""
    code = main(list(args))
    return code, capsys.readouterr().err


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    if not SCRIPT.exists():
        pytest.fail(f"{SCRIPT} is missing: install the package (make venv)")
    return subprocess.run([str(SCRIPT), *args], input=stdin.decode() if stdin else None,
                          capture_output=True, text=True, timeout=60, check=False)


def test_import_then_remove(store: LdapStore, config_file: Path, tmp_path: Path,
                            gpg_keys: dict[str, Any]) -> None:
    key = gpg_keys["alice"]
    key_file = tmp_path / "alice.asc"
    key_file.write_bytes(key.gpg.export(key.fingerprint, "--armor"))
    proc = cli("keys", "import", "alice.liddell@example.org", str(key_file),
               "--config", str(config_file))
    assert proc.returncode == 0, proc.stderr
    assert key.fingerprint in proc.stdout
    stored = store.key_for(Address.parse("alice@example.org"))
    assert stored is not None
    assert stored.fingerprint.hex == key.fingerprint
    assert stored.provenance is not None
    assert stored.provenance.source is KeyOrigin.ADMIN_IMPORT
    assert stored.provenance.actor.startswith("admin")

    proc = cli("keys", "remove", "alice@example.org", "--config", str(config_file))
    assert proc.returncode == 0, proc.stderr
    assert store.key_for(Address.parse("alice@example.org")) is None
    proc = cli("keys", "remove", "alice@example.org", "--config", str(config_file))
    assert proc.returncode == 2
    assert proc.stderr.startswith("refused: ")


def test_import_from_stdin(store: LdapStore, config_file: Path,
                           gpg_keys: dict[str, Any]) -> None:
    proc = cli("keys", "import", "bob@example.org", "--config", str(config_file),
               stdin=gpg_keys["bob"].gpg.export(gpg_keys["bob"].fingerprint, "--armor"))
    assert proc.returncode == 0, proc.stderr
    assert store.key_for(Address.parse("bob@example.org")) is not None


def test_refusals_exit_2(store: LdapStore, config_file: Path, tmp_path: Path,
                         gpg_keys: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    alices = tmp_path / "alice.pgp"
    alices.write_bytes(gpg_keys["alice"].data)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a key at all")
    cases = [
        ("carol@example.org", alices, "no user ID"),  # alice's key has no UID of carol's
        ("nobody@example.org", alices, "no user has"),
        ("bob@example.org", garbage, ""),
        ("not an address", alices, ""),
    ]
    for address, path, reason in cases:
        code, err = in_process(capsys, "keys", "import", address, str(path),
                               "--config", str(config_file))
        assert code == 2, (address, err)
        assert err.startswith("refused: "), err
        assert reason in err
    assert list(store.list_keys()) == []


def test_directory_down_exits_75(tmp_path: Path, slapd: Slapd, gpg_keys: dict[str, Any],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    down = write_config(tmp_path / "down.toml", slapd, uri=f"ldap://127.0.0.1:{_free_port()}")
    key_file = tmp_path / "bob.pgp"
    key_file.write_bytes(gpg_keys["bob"].data)
    proc = cli("keys", "remove", "bob@example.org", "--config", str(down))
    assert proc.returncode == 75, proc.stderr
    assert "unreachable" in proc.stderr
    code, err = in_process(capsys, "keys", "import", "bob@example.org", str(key_file),
                           "--config", str(down))
    assert code == 75, err
    assert "unreachable" in err


def test_reader_sees_imported_key(store: LdapStore, config_file: Path, tmp_path: Path,
                                  gpg_keys: dict[str, Any],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    key = gpg_keys["bob"]
    path = tmp_path / "bob.pgp"
    path.write_bytes(key.data)
    code, err = in_process(capsys, "keys", "import", "bob@example.org", str(path),
                           "--config", str(config_file))
    assert code == 0, err
    stored = store.key_for(Address.parse("bob@example.org"))
    assert stored is not None
    with GnuPG(tmp_path / "reader") as reader:
        reader.import_key(stored.key)
        assert reader.fingerprint("bob@example.org") == key.fingerprint


def test_list_show_export_disable(store: LdapStore, config_file: Path,
                                  gpg_keys: dict[str, Any]) -> None:
    key = gpg_keys["alice"]
    config = ("--config", str(config_file))
    assert cli("keys", "import", "alice@example.org", *config,
               stdin=key.gpg.export(key.fingerprint, "--armor")).returncode == 0
    listing = cli("keys", "list", *config)
    assert listing.returncode == 0, listing.stderr
    line = next(row for row in listing.stdout.splitlines() if key.fingerprint in row)
    assert line.split("\t")[1:] == [
        "alice@example.org,alice.liddell@example.org", "admin-import", "-"]
    shown = cli("keys", "show", "alice.liddell@example.org", *config)
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["fingerprint"] == key.fingerprint
    assert info["provenance"]["source"] == "admin-import"
    assert info["disabled"] is False
    # Where WKD clients fetch it, for each address; gpg-wks-client is the oracle.
    assert set(info["wkd"]) == {"alice@example.org", "alice.liddell@example.org"}
    for address, urls in info["wkd"].items():
        advanced = key.gpg.run("--print-wkd-url", address, binary=WKS_CLIENT).stdout.decode()
        assert urls["advanced"] == advanced.strip()
        path = advanced.strip().split("/.well-known/openpgpkey/example.org/", 1)[1]
        assert urls["direct"] == f"https://example.org/.well-known/openpgpkey/{path}"
    exported = cli("keys", "export", "alice@example.org", *config)
    assert exported.returncode == 0
    assert exported.stdout.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert key.gpg.import_key(exported.stdout.encode()).returncode == 0
    assert cli("keys", "disable", "alice@example.org", *config).returncode == 0
    stored = store.key_for(Address.parse("alice@example.org"))
    assert stored is not None
    assert stored.disabled
    assert "\td" in cli("keys", "list", *config).stdout
    assert cli("keys", "enable", "alice@example.org", *config).returncode == 0
    stored = store.key_for(Address.parse("alice@example.org"))
    assert stored is not None
    assert not stored.disabled
    missing = cli("keys", "show", "carol@example.org", *config)
    assert missing.returncode == 2
    assert missing.stderr.startswith("refused: no key is published")
    assert cli("keys", "remove", "alice@example.org", *config).returncode == 0


def test_import_of_a_flooded_key_shows_progress(store: LdapStore, config_file: Path,
                                                tmp_path: Path,
                                                gpg_keys: dict[str, Any]) -> None:
    key = gpg_keys["bob"]
    flooded = tmp_path / "flooded.pgp"
    flooded.write_bytes(flood_key(key.gpg.export(key.fingerprint), 12_000))
    proc = cli("keys", "import", "bob@example.org", str(flooded), "--config", str(config_file))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0].startswith("cleaning 1.")
    assert "12000 packets dropped" in proc.stderr.splitlines()[1]
    stored = store.key_for(Address.parse("bob@example.org"))
    assert stored is not None
    assert len(stored.key) < 4096
