"""`milter-wkd check` against the real sandbox (slapd, Dovecot, our milter, Postfix) and the
WKD responder: every check passes on it; then, one thing broken at a time (a wrong bind
password, a missing DKIM key, a Postfix config without our milter, a wrong account, a
stopped slapd, ...), the right FAIL line with a fix hint."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import ldap
import pytest

from milter_wkd import check, files, passwords
from milter_wkd import config as config_module
from milter_wkd.cli import main
from milter_wkd.errors import MilterWkdError
from milter_wkd.openpgp import armor_key
from milter_wkd.openpgp.messages import generate_submission_key
from milter_wkd.sandbox import Sandbox
from milter_wkd.sandbox.daemons import LOOPBACK, free_port
from milter_wkd.sandbox.slapd import PEERCRED_ROOT, Slapd
from milter_wkd.sandbox.wkd import WkdResponder
from milter_wkd.store.connection import ConnectionPool, close_connection
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.ldapview import LdapKeyView
from milter_wkd.store.model import PendingRequest
from milter_wkd.values import Address, Fingerprint
from milter_wkd.web import create_app
from tests.support.mail import sandbox_fixture  # noqa: F401 (the `sandbox` fixture)

pytestmark = pytest.mark.integration


class Wkd:
    """Where the WKD responder of the sandbox answers."""

    def __init__(self, url: str, port: int, ca_file: Path) -> None:
        self.url = url
        self.port = port
        self.ca_file = ca_file


@pytest.fixture(scope="module")
def wkd(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wkd]:
    """The sandbox's own responder when it has one, else one started here on a free port
    (never 443, which other tests need for real WKD clients)."""
    running = getattr(sandbox, "wkd", None)
    if running is not None:
        yield Wkd(running.wkd_url, running.port, Path(running.ca_file))
        return
    responder = WkdResponder(tmp_path_factory.mktemp("wkd"), sandbox.slapd, port=free_port(),
                             submission_public_key=sandbox.submission_public_key)
    with responder:
        yield Wkd(responder.wkd_url, responder.port, responder.ca_file)


def options(sandbox: Sandbox, wkd: Wkd, **changes: object) -> check.Options:
    settings: dict[str, object] = {
        "postfix_config_dir": str(sandbox.postfix.config_dir),
        "dovecot_auth_socket": str(sandbox.dovecot.auth_socket),
        "wkd_url": wkd.url, "wkd_connect": (LOOPBACK, wkd.port), "ca_file": str(wkd.ca_file),
        "portal_url": sandbox.portal.portal_url,
        "portal_connect": (LOOPBACK, sandbox.portal.port),
        "portal_ca_file": str(sandbox.portal.ca_file), "timeout": 5.0}
    settings.update(changes)
    return check.Options(**settings)  # type: ignore[arg-type]


def config_copy(sandbox: Sandbox, tmp_path: Path, **replace: str) -> Path:
    """The sandbox's milter-wkd.toml with `key = value` lines replaced (values as TOML;
    the first such line: [directory] comes first)."""
    text = sandbox.config_path.read_text(encoding="utf-8")
    for key, value in replace.items():
        text, count = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
        assert count == 1, key
    path = tmp_path / "milter-wkd.toml"
    path.write_text(text, encoding="utf-8")
    return path


def results(path: Path, opts: check.Options) -> list[check.CheckResult]:
    return list(check.run(config_module.load(path, environ={}), opts))


def failed(found: list[check.CheckResult], name: str) -> list[check.CheckResult]:
    return [r for r in found if r.name == name and r.ok is False]


def test_everything_passes_on_the_sandbox(sandbox: Sandbox, wkd: Wkd) -> None:
    found = results(sandbox.config_path, options(sandbox, wkd))
    bad = [r for r in found if r.ok is False or r.warning]
    assert not bad, bad
    passed = {r.name for r in found if r.ok}
    assert passed == set(check.GROUPS)
    skipped = [r.detail for r in found if r.ok is None]
    assert skipped == [f"{name}._domainkey.example.org TXT not looked up (offline default; --dns)"
                       for name in ("wkd-rsa", "wkd")]
    assert [r.detail for r in found if r.name == "dkim" and r.ok] == [
        f"example.org: {kind} key {path} (selector {name}) signs, and its signature verifies"
        for kind, path, name in (("rsa", sandbox.dkim_rsa_key, "wkd-rsa"),
                                 ("ed25519", sandbox.dkim_key, "wkd"))]
    details = "\n".join(r.detail for r in found)
    milter_dn = sandbox.slapd.service_accounts["milter"]["dn"]
    assert f"bound as {milter_dn} at {sandbox.slapd.uri}" in details
    assert "anonymous cannot enumerate addresses (adminLimitExceeded)" in details
    assert f"creates and deletes pending requests below {sandbox.slapd.pending_dn}" in details
    assert re.search(r"serves [0-9A-F]{40} for key-submission@example.org \(with CORS\)",
                     details)
    # The write probe left nothing behind.
    with LdapStore(config_module.load(sandbox.config_path, environ={}).directory) as store:
        assert store.list_pending() == []


def test_cli_prints_one_line_per_check(sandbox: Sandbox, wkd: Wkd,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    # No option but the file: its [check] section names the sandbox's Postfix, Dovecot
    # and WKD responder (tests/integration/test_check_sandbox.py: as `sandbox up` prints it).
    code = main(["check", "--config", str(sandbox.config_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    milter_dn = sandbox.slapd.service_accounts["milter"]["dn"]
    assert lines[0] == f"ok   directory: bound as {milter_dn} at {sandbox.slapd.uri}"
    assert all(re.match(r"(ok  |skip) [a-z-]+: ", line) for line in lines[:-1]), out
    # Skipped: the TXT records of the two DKIM keys (no DNS look-ups by default).
    assert re.fullmatch(r"\d+ ok, 0 warnings, 0 failed, 2 skipped", lines[-1])


def test_wrong_bind_password(sandbox: Sandbox, wkd: Wkd, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    password = tmp_path / "password"
    password.write_text("not-the-password\n")
    path = config_copy(sandbox, tmp_path, bind_password_file=f'"{password}"')
    code = main(["check", "--config", str(path), "--skip", "wkd", "--skip", "postfix",
                 "--skip", "dovecot"])
    out = capsys.readouterr().out
    assert code == 1
    milter_dn = sandbox.slapd.service_accounts["milter"]["dn"]
    assert f"FAIL directory: bind as {milter_dn} at {sandbox.slapd.uri} refused: " in out
    assert "     fix: check bind_dn and bind_password(_file) in [directory]" in out
    assert "skip schema: needs the directory" in out
    assert "skip acl: needs the directory" in out
    assert "ok   submission-key: example.org" in out  # the rest still runs


def test_missing_dkim_key(sandbox: Sandbox, wkd: Wkd, tmp_path: Path) -> None:
    path = config_copy(sandbox, tmp_path, dkim_key=f'"{tmp_path / "dkim.pem"}"')
    found = results(path, options(sandbox, wkd, skip=frozenset(
        {"directory", "schema", "acl", "wkd", "postfix", "milter", "dovecot"})))
    (dkim_failure,) = failed(found, "dkim")
    assert dkim_failure.detail == (
        f"example.org: DKIM key {tmp_path / 'dkim.pem'}: No such file or directory")
    assert "milter-wkd domain init" in dkim_failure.fix
    assert [r.label for r in found if r.name == "submission-key"] == ["ok"]


def test_dkim_rsa_key_of_the_wrong_kind(sandbox: Sandbox, wkd: Wkd, tmp_path: Path) -> None:
    """dkim_rsa_key naming the Ed25519 key fails; dkim_key's key still passes."""
    path = config_copy(sandbox, tmp_path, dkim_rsa_key=f'"{sandbox.dkim_key}"')
    found = results(path, options(sandbox, wkd, skip=frozenset(
        {"directory", "schema", "acl", "wkd", "postfix", "milter", "dovecot"})))
    (dkim_failure,) = failed(found, "dkim")
    assert dkim_failure.detail == (f"example.org: DKIM key {sandbox.dkim_key}: an ed25519 key "
                                   "where an rsa key belongs")
    assert "correct dkim_rsa_key" in dkim_failure.fix
    assert [r.detail for r in found if r.name == "dkim" and r.ok] == [
        f"example.org: ed25519 key {sandbox.dkim_key} (selector wkd) signs, and its "
        "signature verifies"]


def test_postfix_without_our_milter(sandbox: Sandbox, wkd: Wkd, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "postfix"
    other.mkdir()
    (other / "main.cf").write_text("milter_default_action = accept\n")
    code = main(["check", "--config", str(sandbox.config_path), "--postfix-config-dir",
                 str(other), "--dovecot-auth-socket", str(sandbox.dovecot.auth_socket),
                 "--skip", "directory", "--skip", "wkd"])
    out = capsys.readouterr().out
    assert code == 1
    ours = sandbox.milter.socket_spec if sandbox.milter else "?"
    assert f"FAIL postfix: smtpd_milters in {other} lacks {ours} (is: empty)" in out
    assert f"     fix: postconf -c {other} -e 'smtpd_milters = {ours}'" in out
    assert f"FAIL postfix: non_smtpd_milters in {other} lacks {ours}" in out
    assert "warn postfix: milter_default_action = accept" in out
    assert f"     fix: postconf -c {other} -e 'milter_default_action = tempfail'" in out
    assert "ok   postfix: milter_mail_macros has {auth_authen}" in out  # Postfix's default
    assert "ok   milter: " in out
    assert "ok   dovecot: " in out


def test_postfix_config_dir_that_does_not_exist(sandbox: Sandbox, wkd: Wkd,
                                                tmp_path: Path) -> None:
    found = results(sandbox.config_path, options(
        sandbox, wkd, postfix_config_dir=str(tmp_path / "nothing"),
        skip=frozenset({"directory", "wkd"})))
    (failure,) = failed(found, "postfix")
    assert "main.cf: No such file or directory" in failure.detail
    assert "--postfix-config-dir" in failure.fix


def test_milter_not_listening_and_dovecot_socket_missing(sandbox: Sandbox, wkd: Wkd,
                                                         tmp_path: Path) -> None:
    nowhere = tmp_path / "milter.sock"
    path = config_copy(sandbox, tmp_path, socket=f'"unix:{nowhere}"')
    found = results(path, options(sandbox, wkd, dovecot_auth_socket=str(tmp_path / "auth"),
                                  skip=frozenset({"directory", "wkd"})))
    (milter_failure,) = failed(found, "milter")
    assert milter_failure.detail.startswith(f"unix:{nowhere} does not answer: ")
    assert "milter-wkd milter --config FILE" in milter_failure.fix
    # Postfix still points at the sandbox's socket, not at the configured one.
    assert len(failed(found, "postfix")) == 2
    (dovecot_failure,) = failed(found, "dovecot")
    assert dovecot_failure.detail == f"SASL socket {tmp_path / 'auth'} does not exist"


def test_dovecot_socket_that_speaks_something_else(sandbox: Sandbox, wkd: Wkd) -> None:
    # Postfix's smtpd_sasl_path is used when no socket is given: here the real one.
    found = results(sandbox.config_path, options(
        sandbox, wkd, dovecot_auth_socket=None,
        skip=frozenset({"directory", "wkd", "submission-key", "dkim"})))
    assert [r.label for r in found if r.name == "dovecot"] == ["ok"]
    assert sandbox.milter is not None
    found = results(sandbox.config_path, options(
        sandbox, wkd, dovecot_auth_socket=str(sandbox.milter.socket_path),
        skip=frozenset({"directory", "wkd", "submission-key", "dkim", "postfix"})))
    (failure,) = failed(found, "dovecot")
    assert "does not speak the Dovecot auth protocol" in failure.detail


def test_wkd_certificate_and_served_key(sandbox: Sandbox, wkd: Wkd, tmp_path: Path) -> None:
    only_wkd = frozenset(set(check.GROUPS) - {"wkd"})
    # The system store does not know the sandbox's test CA.
    found = results(sandbox.config_path, options(sandbox, wkd, ca_file=None, skip=only_wkd))
    (failure,) = failed(found, "wkd")
    assert "certificate of openpgpkey.example.org not valid" in failure.detail
    assert "certificate for openpgpkey.example.org and example.org" in failure.fix
    # A config whose submission key is not the one the responder serves.
    other = generate_submission_key(Address.parse("key-submission@example.org"))
    public = tmp_path / "other.pub"
    public.write_bytes(armor_key(other.public))
    path = config_copy(sandbox, tmp_path, submission_public_key=f'"{public}"')
    found = results(path, options(sandbox, wkd, skip=only_wkd))
    (failure,) = failed(found, "wkd")
    assert f"submission_public_key is {other.fingerprint}" in failure.detail
    # Nobody listens there.
    found = results(sandbox.config_path, options(
        sandbox, wkd, wkd_connect=(LOOPBACK, free_port()), skip=only_wkd))
    (failure,) = failed(found, "wkd")
    assert "Connection refused" in failure.detail
    assert "openpgpkey.example.org must resolve to it" in failure.fix


def test_wrong_account_and_wrong_pending_and_claims_base(sandbox: Sandbox, wkd: Wkd,
                                              tmp_path: Path) -> None:
    # The WKD responder's read-only account where the milter's belongs: the ACLs say no.
    wkd_account = sandbox.slapd.service_accounts["wkd"]
    password = tmp_path / "wkd.password"
    password.write_text(wkd_account["password"] + "\n")
    path = config_copy(sandbox, tmp_path, bind_dn=f'"{wkd_account["dn"]}"',
                       bind_password_file=f'"{password}"')
    only_directory = frozenset({"submission-key", "dkim", "wkd", "postfix", "milter",
                                "dovecot"})
    found = results(path, options(sandbox, wkd, skip=only_directory))
    acl = failed(found, "acl")
    who = wkd_account["dn"]
    assert len(acl) == 3, acl
    assert acl[0].detail.startswith(
        f"{who} finds no user with mail/mailLocalAddress below {sandbox.slapd.people_dn}")
    assert acl[1].detail == f"{who} cannot search {sandbox.slapd.pending_dn}: noSuchObject"
    assert acl[2].detail.startswith(
        f"{who} cannot create a pending request below {sandbox.slapd.pending_dn}: the "
        "directory denied access")
    assert "insufficientAccessRights" in acl[2].detail
    assert all("30-access.ldif" in r.fix for r in acl)
    # A pending_base that does not exist.
    path = config_copy(sandbox, tmp_path, pending_base='"ou=nowhere,dc=example,dc=org"')
    found = results(path, options(sandbox, wkd, skip=only_directory))
    assert [r.detail for r in failed(found, "directory")] == [
        "pending_base ou=nowhere,dc=example,dc=org does not exist or is not visible"]
    assert any("cannot create a pending request" in r.detail for r in failed(found, "acl"))
    # A claims_base that does not exist (or that the milter may not see).
    path = config_copy(sandbox, tmp_path, claims_base='"ou=nowhere,dc=example,dc=org"')
    found = results(path, options(sandbox, wkd, skip=only_directory))
    assert [r.detail for r in failed(found, "directory")] == [
        "claims_base ou=nowhere,dc=example,dc=org does not exist or is not visible"]


def test_acl_that_lets_anonymous_enumerate(sandbox: Sandbox, wkd: Wkd) -> None:
    """An admin's too-open ACL (everyone reads everything, no size limit): the anonymous
    and the milter's write checks fail. The shipped 30-access.ldif is applied again
    afterwards, as the README says."""
    sandbox.slapd.ldapmodify(f"""\
dn: {sandbox.slapd.database_dn}
changetype: modify
replace: olcAccess
olcAccess: to * by dn.exact="{PEERCRED_ROOT}" manage by * break
olcAccess: to attrs=userPassword by anonymous auth by * none
olcAccess: to * by * read
-
replace: olcLimits
olcLimits: * size=unlimited
""")
    try:
        found = results(sandbox.config_path, options(sandbox, wkd, skip=frozenset(
            {"submission-key", "dkim", "wkd", "postfix", "milter", "dovecot"})))
    finally:
        sandbox.slapd.ldapmodify((files.path("ldap") / "config" / "30-access.ldif").read_text())
    # Read-only for everyone: the milter lost its write access too.
    write_failure, failure = failed(found, "acl")
    assert "cannot create a pending request below ou=wks-pending" in write_failure.detail
    assert failure.detail == ("anonymous enumerates addresses: (|(mail=*)(mailLocalAddress=*)) "
                              "below ou=people,dc=example,dc=org returned 3 entries")
    assert "size.unchecked=1" in failure.fix
    # Put back: the check passes again.
    found = results(sandbox.config_path, options(sandbox, wkd, skip=frozenset(
        {"submission-key", "dkim", "wkd", "postfix", "milter", "dovecot"})))
    assert not failed(found, "acl"), found


def test_stopped_slapd(sandbox: Sandbox, wkd: Wkd, capsys: pytest.CaptureFixture[str]) -> None:
    """Last: it stops the sandbox's slapd (and starts it again)."""
    sandbox.slapd.stop()
    try:
        code = main(["check", "--config", str(sandbox.config_path), "--skip", "wkd",
                     "--skip", "postfix", "--skip", "milter", "--skip", "dovecot"])
        out = capsys.readouterr().out
    finally:
        sandbox.slapd.start()
    assert code == 1
    assert f"FAIL directory: {sandbox.slapd.uri} unreachable: " in out
    assert f"     fix: start slapd, or correct [directory] uri; test with ldapwhoami -x -H " \
           f"{sandbox.slapd.uri}" in out
    assert "skip schema: needs the directory" in out
    # And with slapd back, the directory checks pass again.
    found = results(sandbox.config_path, options(sandbox, wkd, skip=frozenset(
        {"submission-key", "dkim", "wkd", "postfix", "milter", "dovecot"})))
    assert found
    assert all(r.ok for r in found), found


def test_a_peer_that_never_answers_times_out(sandbox: Sandbox, wkd: Wkd, tmp_path: Path) -> None:
    """A listening socket that nobody serves (the kernel completes the TCP handshake, then
    nothing): the directory, WKD and milter probes each give up after their timeout."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind((LOOPBACK, 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        path = config_copy(sandbox, tmp_path, uri=f'"ldap://{LOOPBACK}:{port}"\ntimeout = 1',
                           socket=f'"inet:{port}@{LOOPBACK}"')
        found = results(path, options(sandbox, wkd, wkd_connect=(LOOPBACK, port), timeout=1.0,
                                      skip=frozenset({"postfix", "dovecot"})))
    (directory_failure,) = failed(found, "directory")
    assert directory_failure.detail.startswith(f"ldap://{LOOPBACK}:{port} unreachable: ")
    (wkd_failure,) = failed(found, "wkd")
    assert "timed out" in wkd_failure.detail
    (milter_failure,) = failed(found, "milter")
    assert milter_failure.detail == f"inet:{port}@{LOOPBACK} does not answer: timed out"


# -- #11 items 7 and 8: documented passwords, the responder's rights ----------------------

NOT_ACCOUNTS = frozenset(set(check.GROUPS) - {"passwords", "responder"})


@pytest.fixture
def own_slapd(private_slapd: Slapd) -> Slapd:
    """A slapd of this test's own: these tests change service accounts' passwords."""
    return private_slapd


def accounts_config(server: Slapd, folder: Path, *, web: str | None = "wkd") -> Path:
    """[directory] as cn=milter, [web] as `web` (None: no [web] bind_dn), password files
    written 0600 from the sandbox slapd's random passwords."""
    files = {}
    for name in ("milter", "wkd"):
        path = folder / f"{name}.password"
        path.touch(mode=0o600)
        path.write_text(server.service_accounts[name]["password"] + "\n")
        files[name] = path
    web_section = "" if web is None else (
        f'[web]\nbind_dn = "{server.service_accounts[web]["dn"]}"\n'
        f'bind_password_file = "{files[web]}"\n')
    path = folder / "milter-wkd.toml"
    path.write_text(f"""\
[directory]
uri = "{server.uri}"
bind_dn = "{server.service_accounts["milter"]["dn"]}"
bind_password_file = "{files["milter"]}"
base_dn = "{server.people_dn}"
pending_base = "{server.pending_dn}"
claims_base = "{server.claims_dn}"
mail_attributes = ["mail", "mailLocalAddress"]

{web_section}""")
    return path


def account_results(path: Path) -> list[check.CheckResult]:
    return results(path, check.Options(skip=NOT_ACCOUNTS, timeout=5.0))


def test_accounts_pass_with_random_passwords(own_slapd: Slapd, tmp_path: Path) -> None:
    found = account_results(accounts_config(own_slapd, tmp_path))
    assert [r.label for r in found] == ["ok"] * len(found), found
    details = "\n".join(r.detail for r in found)
    services = f"ou=services,{own_slapd.suffix}"
    assert ("no documented password (milter-secret, wkd-secret, dovecot-secret) opens "
            f"cn=milter,{services}; cn=wkd,{services}; cn=dovecot,{services}") in details
    assert f"the WKD responder binds as cn=wkd,{services} ([web]) and can write neither" \
        in details


def test_a_documented_password_fails(own_slapd: Slapd, tmp_path: Path) -> None:
    """The attack of #11 item 7: somebody set a password this project once printed (the
    shipped LDIF did, for all three). Dovecot's account is in no milter-wkd config: it is
    tried beside ours."""
    path = accounts_config(own_slapd, tmp_path)
    accounts = own_slapd.service_accounts
    own_slapd.ldapmodify(passwords.password_ldif({accounts["milter"]["dn"]: "milter-secret",
                                                  accounts["dovecot"]["dn"]: "dovecot-secret"}))
    (tmp_path / "milter.password").write_text("milter-secret\n")
    found = failed(account_results(path), "passwords")
    assert [r.detail.split(":")[0] for r in found] == [
        f"{accounts['milter']['dn']} accepts the documented password 'milter-secret'",
        f"{accounts['dovecot']['dn']} accepts the documented password 'dovecot-secret'"]
    assert all("milter-wkd directory passwords" in r.fix for r in found)


def test_a_password_file_open_to_others_fails(own_slapd: Slapd, tmp_path: Path) -> None:
    path = accounts_config(own_slapd, tmp_path)
    (tmp_path / "wkd.password").chmod(0o644)
    (tmp_path / "milter.password").chmod(0o640)
    found = account_results(path)
    (failure,) = failed(found, "passwords")
    assert failure.detail == (f"[web] bind_password_file {tmp_path}/wkd.password is open to "
                              "everybody (mode 0644)")
    (warning,) = [r for r in found if r.warning]
    assert warning.detail == (f"[directory] bind_password_file {tmp_path}/milter.password "
                              "is open to its group (mode 0640)")


@pytest.mark.parametrize("web", [None, "milter"])
def test_a_responder_that_can_write_fails(own_slapd: Slapd, tmp_path: Path,
                                          web: str | None) -> None:
    """The attack of #11 item 8: the responder run with the milter's config (what
    systemd/milter-wkd-web.service did) or pointed at cn=milter can write keys."""
    found = account_results(accounts_config(own_slapd, tmp_path, web=web))
    (failure,) = failed(found, "responder")
    milter_dn = own_slapd.service_accounts["milter"]["dn"]
    source = "[directory]" if web is None else "[web]"
    assert failure.detail.startswith(
        f"the WKD responder binds as {milter_dn} ({source}), which can write pending "
        f"requests (below {own_slapd.pending_dn}), pgpKey (of uid=")
    assert "gpgMailbox" in failure.detail
    assert 'bind_dn = "cn=wkd,ou=services,...' in failure.fix
    # The probes wrote nothing: no pending request is left, alice has no key.
    with LdapStore(config_module.load(tmp_path / "milter-wkd.toml",
                                      environ={}).directory) as store:
        assert store.list_pending() == []
        assert store.key_for(Address.parse("alice@example.org")) is None


def test_the_responder_binds_as_cn_wkd_and_cannot_write(sandbox: Sandbox) -> None:
    """#11 item 8 through the code the responder runs (web.create_app): with the one config
    file that README and systemd/milter-wkd-web.service give it, and with the sandbox
    responder's own file, it is cn=wkd, and its writes are refused."""
    wkd_dn = sandbox.slapd.service_accounts["wkd"]["dn"]
    alice = sandbox.slapd.users["alice"]["dn"]
    for path in (sandbox.config_path, sandbox.wkd.config_path):
        cfg = config_module.load(path, environ={})
        source = create_app(cfg, start=False).cache.source
        assert isinstance(source, LdapKeyView)
        conn = ConnectionPool(source.config).open()
        try:
            assert conn.whoami_s() == f"dn:{wkd_dn}", path
            for attribute, value in check.KEY_WRITE_PROBES:
                with pytest.raises(ldap.INSUFFICIENT_ACCESS):
                    conn.modify_s(alice, [(ldap.MOD_DELETE, attribute, [value])])
        finally:
            close_connection(conn)
        now = int(time.time())
        request = PendingRequest("probe" + secrets.token_hex(8),
                                 Address.parse("alice@example.org"),
                                 Fingerprint.parse("0" * 40), b"key", now, now + 60)
        with LdapStore(source.config) as store, pytest.raises(MilterWkdError):
            store.create_pending(request, limit=100)
