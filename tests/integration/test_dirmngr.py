"""gpg/dirmngr 2.2 as a real client of the directory: `gpg --keyserver ldap://...` fetches
and locates keys that the store wrote, anonymously, through the ACLs and limits."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from milter_wkd.sandbox.slapd import Slapd
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.model import StoredKey
from milter_wkd.values import Address
from tests.support.gnupg import GnuPG
from tests.support.peers import require_binary

pytestmark = pytest.mark.integration

Publish = Callable[[str, bytes], StoredKey]


@pytest.fixture
def client(tmp_path: Path, slapd: Slapd) -> Iterator[GnuPG]:
    require_binary("dirmngr")
    with GnuPG(tmp_path / "client") as gpg:
        (gpg.home / "dirmngr.conf").write_text(f"keyserver {slapd.uri}\n")
        yield gpg


def recv(client: GnuPG, slapd: Slapd, fingerprint: str) -> Any:
    return client.run("--keyserver", slapd.uri, "--recv-keys", fingerprint, check=False)


def locate(client: GnuPG, slapd: Slapd, address: str) -> Any:
    return client.run("--auto-key-locate", "clear,nodefault,keyserver", "--keyserver",
                      slapd.uri, "--locate-keys", address, check=False)


def fingerprints(client: GnuPG) -> list[str]:
    return [r[9] for r in client.colons("--list-keys") if r[0] == "fpr"]


def test_recv_keys_by_fingerprint(client: GnuPG, slapd: Slapd, publish: Publish,
                                  gpg_keys: dict[str, Any]) -> None:
    key = gpg_keys["bob"]
    publish("bob@example.org", key.data)
    proc = recv(client, slapd, key.fingerprint)
    assert proc.returncode == 0, proc.stderr.decode()
    assert key.fingerprint in fingerprints(client)


def test_locate_keys_by_address_and_alias(client: GnuPG, slapd: Slapd, publish: Publish,
                                          gpg_keys: dict[str, Any]) -> None:
    key = gpg_keys["alice"]
    publish("alice@example.org", key.data)
    for address in ("alice.liddell@example.org", "alice@example.org"):
        proc = locate(client, slapd, address)
        assert proc.returncode == 0, proc.stderr.decode()
        assert key.fingerprint in proc.stdout.decode()


def test_locate_finds_nothing_for_users_without_key(client: GnuPG, slapd: Slapd,
                                                    publish: Publish,
                                                    gpg_keys: dict[str, Any]) -> None:
    publish("alice@example.org", gpg_keys["alice"].data)
    proc = locate(client, slapd, "carol@example.org")
    assert proc.returncode != 0
    assert b"No data" in proc.stderr
    assert fingerprints(client) == []


def test_disabled_key_is_not_located(client: GnuPG, slapd: Slapd, publish: Publish,
                                     store: LdapStore, gpg_keys: dict[str, Any]) -> None:
    key = gpg_keys["alice"]
    publish("alice@example.org", key.data)
    assert locate(client, slapd, "alice@example.org").returncode == 0
    slapd.ldapmodify(f"dn: {slapd.users['alice']['dn']}\nchangetype: modify\n"
                     "replace: pgpDisabled\npgpDisabled: 1\n")
    client.run("--delete-keys", key.fingerprint)
    assert locate(client, slapd, "alice@example.org").returncode != 0
    # Disabled stays disabled when the key is published again.
    publish("alice@example.org", key.data)
    stored = store.key_for(Address.parse("alice@example.org"))
    assert stored is not None
    assert stored.disabled
