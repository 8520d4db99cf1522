"""The store contract: every case runs against the in-memory store and against the real
LDAP store on a private slapd (the same users: alice with an alias, bob, carol)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from milter_wkd.store.memory import MemoryStore
from milter_wkd.store.protocol import KeyStore
from tests.integration.conftest import account_config, reset_directory, slapd  # noqa: F401

PEOPLE = "ou=people,dc=example,dc=org"
USERS = {
    f"uid=alice,{PEOPLE}": ["alice@example.org", "alice.liddell@example.org"],
    f"uid=bob,{PEOPLE}": ["bob@example.org"],
    f"uid=carol,{PEOPLE}": ["carol@example.org"],
}


@pytest.fixture(params=["memory", "ldap"])
def store(request: pytest.FixtureRequest) -> Iterator[KeyStore]:
    if request.param == "memory":
        yield MemoryStore(USERS)
        return
    from milter_wkd.store.ldapstore import LdapStore

    server = request.getfixturevalue("slapd")
    with LdapStore(account_config(server, "milter")) as ldap_store:
        yield ldap_store
    reset_directory(server)
