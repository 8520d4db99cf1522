"""ldap/README.md's steps on a running server that has users but nothing of milter-wkd:
ldapadd/ldapmodify over ldapi:// (Slapd.apply_setup runs exactly the README's list), then
the store, the ACLs, the limits and the constraints work as in the sandbox."""

from __future__ import annotations

import pwd
import re
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ldap
import pytest

from milter_wkd import files, openpgp
from milter_wkd.cli import main
from milter_wkd.config import DirectoryConfig
from milter_wkd.errors import KeyRefused
from milter_wkd.sandbox.slapd import SETUP_STEPS, Slapd
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.ldapview import LdapKeyView
from milter_wkd.store.model import KeyOrigin, Provenance
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
    readme = (files.path("ldap") / "README.md").read_text()
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

    with LdapStore(account(existing_server, "milter")) as milter:
        user = milter.user(Address.parse("alice.liddell@example.org"))
        cleaned = openpgp.clean_key(gpg_keys["alice"].data, user.addresses)
        stored = milter.publish_key(user, cleaned, Provenance(KeyOrigin.WKS_CONFIRMED,
                                                              "alice@example.org",
                                                              int(time.time())))
        assert stored.fingerprint.hex == gpg_keys["alice"].fingerprint
        token = milter.change_token()
        assert token
    responder = LdapKeyView(account(existing_server, "wkd"))
    try:
        (found,) = responder.lookup(stored.address_hashes[0])
        assert found.dn == stored.dn
        assert openpgp.inspect_key(found.key).fingerprint == stored.fingerprint
        assert responder.change_token() == token
    finally:
        responder.close()
    with LdapStore(account(existing_server, "milter")) as milter:
        huge = openpgp.clean_key(gpg_keys["bob"].data, None)
        bob = milter.user(Address.parse("bob@example.org"))
        big = type(huge)(huge.key * 200, huge.info, huge.stats, huge.clean)
        with pytest.raises(KeyRefused, match="directory refused"):
            milter.publish_key(bob, big, Provenance(KeyOrigin.ADMIN_IMPORT, "t", 0))


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
    ldif = (files.path("ldap") / "schema" / f"{name}.ldif").read_text()
    schema = (files.path("ldap") / "schema" / f"{name}.schema").read_text()
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
            files.path("ldap") / "schema" / "gnupg-keyserver.schema",
            files.path("ldap") / "schema" / "milter-wkd.schema")))
    proc = subprocess.run([slaptest, "-f", str(conf), "-u"], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr


# Every password this project ever documented for its service accounts (issue #11, item 7).
DOCUMENTED_PASSWORDS = ("milter-secret", "wkd-secret", "dovecot-secret")


def test_readme_setup_leaves_no_documented_password(existing_server: Slapd) -> None:
    """The attack: an administrator follows ldap/README.md to the letter; then anybody who
    read this project's documentation tries its passwords on the service accounts."""
    existing_server.apply_setup()
    assert_refused(existing_server, DOCUMENTED_PASSWORDS)


def assert_refused(server: Slapd, passwords: Sequence[str]) -> None:
    for name in ("milter", "wkd", "dovecot"):
        dn = f"cn={name},ou=services,{server.suffix}"
        for password in passwords:
            with pytest.raises(ldap.INVALID_CREDENTIALS):
                ldapclient.bind(server.uri, dn, password).unbind_ext_s()


def _readme_steps_only(server: Slapd) -> None:
    """ldap/README.md steps 1-6 as an administrator types them, nothing more."""
    for tool, name in SETUP_STEPS:
        subprocess.run([tool, "-H", server.ldapi_uri, "-Y", "EXTERNAL", "-Q",
                        "-f", str(files.path("ldap") / name)], check=True, capture_output=True)


def test_shipped_service_accounts_are_locked(existing_server: Slapd) -> None:
    _readme_steps_only(existing_server)
    # {CRYPT}! is no password: not even its own text, nor the "!" of it, nor nothing.
    assert_refused(existing_server, [*DOCUMENTED_PASSWORDS, "!", "{CRYPT}!", "*"])


def test_passwords_command_sets_random_ones(existing_server: Slapd, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    _readme_steps_only(existing_server)
    services = f"ou=services,{existing_server.suffix}"
    folder = tmp_path / "etc"
    folder.mkdir()
    owners = ["--owner", "milter=root", "--owner", "wkd=nobody", "--owner", "dovecot=root",
              "--owner", "replicator=root"]
    args = ["directory", "passwords", "--uri", existing_server.ldapi_uri,
            "--services", services, "--dir", str(folder), *owners]
    assert main(args) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert f"cn=milter,{services}: new password set; {folder}/milter.password" in out
    found = {}
    for name in ("milter", "wkd", "dovecot", "replicator"):
        path = folder / f"{name}.password"
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600, name
        assert info.st_uid == (pwd.getpwnam("nobody").pw_uid if name == "wkd" else 0)
        password = path.read_text().splitlines()[0]
        assert len(password) >= 32
        ldapclient.bind(existing_server.uri, f"cn={name},{services}", password).unbind_ext_s()
        found[name] = password
    assert len(set(found.values())) == 4
    assert sorted(p.name for p in folder.iterdir()) == [
        "dovecot.password", "milter.password", "replicator.password", "wkd.password"]
    assert_refused(existing_server, DOCUMENTED_PASSWORDS)

    # Again, as LDIF for an LDAP server elsewhere: nothing changes until it is applied.
    assert main([*args, "--ldif", "--account", "wkd"]) == 0
    ldif = capsys.readouterr().out
    assert "changetype: modify" in ldif
    assert "cn=milter" not in ldif
    fresh = (folder / "wkd.password").read_text().splitlines()[0]
    assert fresh != found["wkd"]
    ldapclient.bind(existing_server.uri, f"cn=wkd,{services}", found["wkd"]).unbind_ext_s()
    existing_server.ldapmodify(ldif)
    ldapclient.bind(existing_server.uri, f"cn=wkd,{services}", fresh).unbind_ext_s()

    # A change slapd refuses leaves the old file, and no temporary one, behind.
    assert main([*args, "--services", f"ou=nowhere,{existing_server.suffix}"]) == 1
    assert "setting the password of cn=milter,ou=nowhere" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == [
        "dovecot.password", "milter.password", "replicator.password", "wkd.password"]
    assert (folder / "milter.password").read_text().splitlines()[0] == found["milter"]
