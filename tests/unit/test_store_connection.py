"""How the directory URI of [directory] is read (no slapd needed: nothing connects)."""

from __future__ import annotations

import pytest

from milter_wkd.config import DirectoryConfig
from milter_wkd.errors import DirectoryError
from milter_wkd.store.connection import ConnectionPool


def pool(uri: str, bind_dn: str = "") -> ConnectionPool:
    return ConnectionPool(DirectoryConfig(uri=uri, bind_dn=bind_dn))


def test_one_uri() -> None:
    assert (pool("ldap://10.0.0.1:389/").scheme, pool("ldap://10.0.0.1:389/").uri) == (
        "ldap", "ldap://10.0.0.1:389")
    assert pool("ldapi:///").uri == "ldapi://%2Fvar%2Frun%2Fslapd%2Fldapi"
    assert pool("LDAPS://ldap.example.org").scheme == "ldaps"


def test_a_list_is_kept_in_order_for_libldap_to_try() -> None:
    found = pool("ldap://a.example.org, ldaps://b.example.org  ldap://c.example.org/")
    assert found.uri == "ldap://a.example.org ldaps://b.example.org ldap://c.example.org"
    assert found.scheme == "ldaps"  # certificates are checked for the ldaps:// one


@pytest.mark.parametrize("uri", ["", " , ", "http://x", "ldap:/x", "ldap://a file:///etc"])
def test_unusable_uris_are_refused_early(uri: str) -> None:
    with pytest.raises(DirectoryError):
        pool(uri)


def test_sasl_external_only_over_ldapi() -> None:
    assert pool("ldapi:/// ldapi://%2Frun%2Fother").scheme == "ldapi"
    with pytest.raises(DirectoryError, match="bind_dn"):
        pool("ldapi:/// ldap://a.example.org")
    assert pool("ldapi:/// ldap://a.example.org", bind_dn="cn=milter").scheme == "ldap"
