"""Fixtures for the directory tests: a REAL private slapd (milter_wkd.sandbox.slapd), stores
bound as each account, gpg keys of the example users. Skips locally, fails on CI, when
slapd or gpg is missing (tests.support.peers.require_binary).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ldap
import pytest

from milter_wkd import openpgp
from milter_wkd.config import DirectoryConfig
from milter_wkd.errors import NotFound
from milter_wkd.sandbox.slapd import Slapd
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.model import KeyOrigin, Provenance, StoredKey
from milter_wkd.store.schema import KEY_ATTRIBUTES
from milter_wkd.values import Address
from tests.support import ldapclient
from tests.support.gnupg import GnuPG
from tests.support.peers import require_binary

MAIL_ATTRIBUTES = ["mail", "mailLocalAddress"]


def _require_slapd() -> None:
    for name in ("slapd", "slapadd", "slapmodify", "ldapwhoami", "ldapmodify"):
        require_binary(name)


@pytest.fixture(scope="session")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """One private slapd for the session, with the example.org directory."""
    _require_slapd()
    server = Slapd(tmp_path_factory.mktemp("slapd"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def private_slapd(tmp_path: Path) -> Iterator[Slapd]:
    """A slapd of its own, for tests that stop and restart it."""
    _require_slapd()
    server = Slapd(tmp_path / "slapd")
    server.start()
    try:
        yield server
    finally:
        server.close()


def account_config(server: Slapd, account: str | None, **overrides: object) -> DirectoryConfig:
    """[directory] for one service account (None: root over ldapi:// by SASL EXTERNAL)."""
    if account is None:
        settings: dict[str, object] = {"uri": server.ldapi_uri}
    else:
        info = server.service_accounts[account]
        settings = {"uri": server.uri, "bind_dn": info["dn"], "bind_password": info["password"]}
    settings.update(base_dn=server.people_dn, pending_base=server.pending_dn,
                    mail_attributes=MAIL_ATTRIBUTES)
    settings.update(overrides)
    return DirectoryConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture
def store(slapd: Slapd) -> Iterator[LdapStore]:
    """The store as the milter's account; the directory is put back in order afterwards."""
    with LdapStore(account_config(slapd, "milter")) as directory:
        yield directory
    reset_directory(slapd)


def reset_directory(server: Slapd) -> None:
    """Remove every published (or withheld) key, prefer-encrypt setting, claim and pending
    request (as root)."""
    with LdapStore(account_config(server, None)) as root:
        for name in server.users:
            user = root.user(Address.parse(server.users[name]["address"]))
            with contextlib.suppress(NotFound):
                root.remove_key(user)
            if root.get_prefer_encrypt(user) is not None:
                root.set_prefer_encrypt(user, None)
        root.expire_pending(now=int(time.time()) + 10 * 365 * 86400)
    leftovers = reset_ldif(server)
    if leftovers:
        server.ldapmodify(leftovers)


def reset_ldif(server: Slapd) -> str:
    """LDIF that deletes every claim and every key attribute left on a user entry."""
    conn = ldapclient.bind(server.uri, server.admin_dn, server.admin_password)
    try:
        parts = [f"dn: {dn}\nchangetype: delete\n" for dn, _ in conn.search_s(
            server.claims_dn, ldap.SCOPE_ONELEVEL, "(objectClass=*)", ["1.1"])]
        for name in server.users:
            dn = server.users[name]["dn"]
            ((_dn, attrs),) = conn.search_s(dn, ldap.SCOPE_BASE, "(objectClass=*)",
                                           list(KEY_ATTRIBUTES))
            if attrs:
                parts.append(f"dn: {dn}\nchangetype: modify\n" + "".join(
                    f"delete: {a}\n-\n" for a in attrs))
    finally:
        conn.unbind_ext_s()
    return "\n".join(parts)


@dataclass(frozen=True)
class UserKey:
    fingerprint: str
    data: bytes  # binary export, as gpg made it
    gpg: GnuPG


@pytest.fixture(scope="session")
def gpg_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, UserKey]]:
    """Keys made by real gpg: alice (two UIDs, mail and alias), bob, and a second alice key."""
    home = tmp_path_factory.mktemp("gnupg")
    with GnuPG(home / "keys") as gpg:
        alice = gpg.generate("Alice Liddell <alice@example.org>")
        gpg.run("--quick-add-uid", alice, "Alice L. <alice.liddell@example.org>")
        bob = gpg.generate("Bob Baker <bob@example.org>", algo="rsa2048", subkey="rsa2048")
        alice2 = gpg.generate("Alice New <alice@example.org>")
        yield {
            "alice": UserKey(alice, gpg.export(alice), gpg),
            "bob": UserKey(bob, gpg.export(bob), gpg),
            "alice2": UserKey(alice2, gpg.export(alice2), gpg),
        }


@pytest.fixture
def publish(store: LdapStore) -> Callable[[str, bytes], StoredKey]:
    """publish(address, key) as an admin import through the store."""

    def run(address: str, data: bytes) -> StoredKey:
        user = store.user(Address.parse(address))
        cleaned = openpgp.clean_key(data, user.addresses)
        return store.publish_key(user, cleaned,
                                 Provenance(KeyOrigin.ADMIN_IMPORT, "test", int(time.time())))

    return run


def bind(server: Slapd, who: str | None) -> Any:
    """A plain python-ldap connection (tests.support.ldapclient) as a user (alice, bob,
    carol), a service account or anonymous (None), for the ACL tests."""
    if who is None:
        user, password = "", ""
    elif who in server.users:
        user, password = server.users[who]["dn"], server.users[who]["password"]
    else:
        user = server.service_accounts[who]["dn"]
        password = server.service_accounts[who]["password"]
    return ldapclient.bind(server.uri, user, password)


@pytest.fixture
def config_for(slapd: Slapd) -> Callable[..., DirectoryConfig]:
    """config_for(account, **overrides): [directory] settings for the session slapd."""
    return lambda account, **overrides: account_config(slapd, account, **overrides)


@pytest.fixture
def connect(slapd: Slapd) -> Iterator[Callable[[str | None], Any]]:
    """connect(who): a bound python-ldap connection to the session slapd, unbound afterwards."""
    opened: list[Any] = []

    def run(who: str | None) -> Any:
        conn = bind(slapd, who)
        opened.append(conn)
        return conn

    yield run
    for conn in opened:
        conn.unbind_ext_s()
