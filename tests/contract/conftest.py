"""The store contract: every case runs against the in-memory store and against the real
LDAP store on a private slapd (the same users: alice with an alias, bob, carol)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.ldapview import LdapKeyView
from milter_wkd.store.memory import MemoryStore
from milter_wkd.store.protocol import KeyStore
from milter_wkd.store.view import KeyView
from tests.integration.conftest import account_config, reset_directory, slapd  # noqa: F401

PEOPLE = "ou=people,dc=example,dc=org"
USERS = {
    f"uid=alice,{PEOPLE}": ["alice@example.org", "alice.liddell@example.org"],
    f"uid=bob,{PEOPLE}": ["bob@example.org"],
    f"uid=carol,{PEOPLE}": ["carol@example.org"],
}


@pytest.fixture(params=["memory", "ldap"])
def stores(request: pytest.FixtureRequest) -> Iterator[tuple[KeyStore, KeyView]]:
    """The write store and the responder's view of the same keys."""
    if request.param == "memory":
        memory = MemoryStore(USERS)
        yield memory, memory
        return
    server = request.getfixturevalue("slapd")
    view = LdapKeyView(account_config(server, "wkd"))
    try:
        with LdapStore(account_config(server, "milter")) as ldap_store:
            yield ldap_store, view
    finally:
        view.close()
        reset_directory(server)


@pytest.fixture
def store(stores: tuple[KeyStore, KeyView]) -> KeyStore:
    return stores[0]


@pytest.fixture
def view(stores: tuple[KeyStore, KeyView]) -> KeyView:
    return stores[1]
