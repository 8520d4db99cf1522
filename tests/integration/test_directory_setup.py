"""ldap/README.md's steps on a running server that has users but nothing of milter-wkd:
ldapadd/ldapmodify over ldapi:// (Slapd.apply_setup runs exactly the README's list), then
the store, the ACLs, the limits and the constraints work as in the sandbox."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from milter_wkd import openpgp
from milter_wkd.config import DirectoryConfig
from milter_wkd.directory import Directory, KeySource, Provenance
from milter_wkd.errors import KeyRefused
from milter_wkd.sandbox.slapd import LDAP_DIR, SETUP_STEPS, Slapd
from milter_wkd.values import Address
from tests.support import ldapclient

pytestmark = pytest.mark.integration


@pytest.fixture
def existing_server(tmp_path: Path) -> Iterator[Slapd]:
    from tests.support.peers import require_binary

    for name in ("slapd", "slapadd", "ldapadd", "ldapmodify", "ldapwhoami"):
        require_binary(name)
    server = Slapd(tmp_path / "slapd", milter_wkd=False)
    server.start()
    try:
        yield server
    finally:
        server.close()


def account(server: Slapd, name: str) -> DirectoryConfig:
    info = server.service_accounts[name]
    return DirectoryConfig(uri=server.uri, bind_dn=info["dn"], bind_password=info["password"],
                           base_dn=server.people_dn, pending_base=server.pending_dn,
                           mail_attributes=["mail", "mailLocalAddress"])


def test_readme_lists_every_setup_step() -> None:
    readme = (LDAP_DIR / "README.md").read_text()
    for tool, name in SETUP_STEPS:
        assert f"{tool} -Y EXTERNAL -H ldapi:/// -f {name}" in readme, name


def test_setup_on_a_running_server(existing_server: Slapd, gpg_keys: dict[str, Any]) -> None:
    anonymous = ldapclient.bind(existing_server.uri)
    try:
        # Before: the Debian default lets anyone list everyone.
        result, entries = ldapclient.answer(anonymous, existing_server.people_dn, "(mail=*)",
                                            ["mail"])
        assert (result, len(entries)) == ("success", 3)
        existing_server.apply_setup()
        result, entries = ldapclient.answer(anonymous, existing_server.people_dn, "(mail=*)",
                                            ["mail"])
        assert entries == []
        assert result in ("adminLimitExceeded", "sizeLimitExceeded")
    finally:
        anonymous.unbind_ext_s()

    with Directory(account(existing_server, "milter")) as milter:
        user = milter.user(Address.parse("alice.liddell@example.org"))
        cleaned = openpgp.clean_key(gpg_keys["alice"].data, user.addresses)
        stored = milter.publish_key(user, cleaned, Provenance(KeySource.WKS_CONFIRMED,
                                                              "alice@example.org",
                                                              int(time.time())))
        assert stored.fingerprint.hex == gpg_keys["alice"].fingerprint
        token = milter.change_token()
        assert token
    with Directory(account(existing_server, "wkd")) as responder:
        (found,) = responder.find_by_hash(stored.address_hashes[0].split("@")[0],
                                          "example.org")
        assert found.fingerprint == stored.fingerprint
        assert responder.change_token() == token
    with Directory(account(existing_server, "milter")) as milter:
        huge = openpgp.clean_key(gpg_keys["bob"].data, None)
        bob = milter.user(Address.parse("bob@example.org"))
        big = type(huge)(huge.key * 200, huge.info, huge.stats, huge.clean)
        with pytest.raises(KeyRefused, match="directory refused"):
            milter.publish_key(bob, big, Provenance(KeySource.ADMIN_IMPORT, "t", 0))


def _definitions(text: str, ldif: bool) -> list[str]:
    if ldif:
        text = text.replace("\n ", "")
        pattern = r"^olc(?:AttributeTypes|ObjectClasses): (.*)$"
    else:
        text = re.sub(r"\n\t", " ", text)
        pattern = r"^(?:attributetype|objectclass) (.*)$"
    return [" ".join(d.split()) for d in re.findall(pattern, text, flags=re.M)]


@pytest.mark.parametrize("name", ["gnupg-keyserver", "milter-wkd"])
def test_schema_files_say_the_same(name: str, tmp_path: Path) -> None:
    ldif = (LDAP_DIR / "schema" / f"{name}.ldif").read_text()
    schema = (LDAP_DIR / "schema" / f"{name}.schema").read_text()
    assert _definitions(ldif, ldif=True) == _definitions(schema, ldif=False)
    assert len(_definitions(ldif, ldif=True)) >= 13


def test_classic_schema_files_load(tmp_path: Path) -> None:
    from tests.support.peers import require_binary

    slaptest = require_binary("slaptest")
    conf = tmp_path / "slapd.conf"
    conf.write_text("".join(
        f"include {path}\n" for path in (
            "/etc/ldap/schema/core.schema", "/etc/ldap/schema/cosine.schema",
            "/etc/ldap/schema/inetorgperson.schema",
            LDAP_DIR / "schema" / "gnupg-keyserver.schema",
            LDAP_DIR / "schema" / "milter-wkd.schema")))
    proc = subprocess.run([slaptest, "-f", str(conf), "-u"], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
