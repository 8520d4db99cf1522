"""The sandbox's mail half against the real daemons: Postfix SMTP services, Dovecot SASL
through Postfix, LMTP delivery, IMAP, the rendered milter settings, `sandbox up/down` as
commands, and teardown on failure.

The wrong-password test runs last: after a failed login Dovecot delays further logins
from 127.0.0.1 by seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import socket
import stat
import subprocess
import sys
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path

import pytest

from milter_wkd import config
from milter_wkd.sandbox import Endpoint, Sandbox, SandboxError, down
from milter_wkd.sandbox.daemons import alive, greeting
from tests.support.mail import (
    descendants,
    fetch,
    require_mail_binaries,
    sandbox_dir_fixture,  # noqa: F401 (fixture `sandbox_dir`)
    sandbox_fixture,  # noqa: F401 (the module-scoped fixture `sandbox`)
    send,
    wait_gone,
)

pytestmark = pytest.mark.integration

OUTSIDER = "someone@example.net"
# The installed console script, as an administrator runs it.
SANDBOX_COMMAND = [str(Path(sys.executable).parent / "milter-wkd"), "sandbox"]


def _ehlo(endpoint: Endpoint) -> tuple[str, str]:
    """The 220 banner and the EHLO answer of an SMTP service."""
    with smtplib.SMTP(timeout=10) as smtp:
        code, banner = smtp.connect(endpoint.host, endpoint.port)
        assert code == 220, banner
        code, features = smtp.ehlo("client.test.example.net")
        assert code == 250, features
    return banner.decode(), features.decode()


def _postconf(sandbox: Sandbox, *args: str) -> str:
    return subprocess.run(["postconf", "-c", str(sandbox.postfix.config_dir), *args],
                          capture_output=True, text=True, check=True, timeout=30).stdout


# -- the services answer ----------------------------------------------------------------


def test_every_smtp_service_greets_and_only_submission_offers_auth(sandbox: Sandbox) -> None:
    features = {}
    for name, endpoint in (("inbound", sandbox.postfix.inbound),
                           ("submission", sandbox.postfix.submission),
                           ("reinject", sandbox.postfix.reinject)):
        banner, features[name] = _ehlo(endpoint)
        assert banner.startswith("mx.example.org ESMTP"), (name, banner)
    assert "AUTH PLAIN" in features["submission"] or "AUTH LOGIN PLAIN" in features["submission"]
    assert "AUTH" not in features["inbound"]
    assert "AUTH" not in features["reinject"]


def test_dovecot_greets_on_lmtp_and_imap(sandbox: Sandbox) -> None:
    assert greeting(sandbox.dovecot.lmtp.host, sandbox.dovecot.lmtp.port).startswith("220 ")
    assert greeting(sandbox.dovecot.imap.host, sandbox.dovecot.imap.port).startswith("* OK")


def test_rendered_postfix_has_the_milter_settings_and_a_milter_free_reinjection(
        sandbox: Sandbox) -> None:
    values = dict(line.partition(" =")[::2] for line in _postconf(
        sandbox, "milter_protocol", "milter_default_action", "milter_mail_macros",
        "smtpd_milters", "non_smtpd_milters", "virtual_transport").splitlines())
    values = {name: value.strip() for name, value in values.items()}
    assert values["milter_protocol"] == "6"
    assert values["milter_default_action"] == "tempfail"
    assert "{auth_authen}" in values["milter_mail_macros"].split()
    assert sandbox.milter is not None
    assert values["smtpd_milters"] == values["non_smtpd_milters"] == sandbox.milter.socket_spec
    assert values["virtual_transport"] == f"lmtp:inet:127.0.0.1:{sandbox.dovecot.lmtp.port}"
    reinject = f"127.0.0.1:{sandbox.postfix.reinject.port}/inet"
    overrides = _postconf(sandbox, "-P").splitlines()
    assert f"{reinject}/smtpd_milters =" in [line.rstrip() for line in overrides]


def test_sandbox_config_file_is_complete_and_loads(sandbox: Sandbox) -> None:
    loaded = config.load(sandbox.config_path, environ={})
    assert loaded.directory.uri == sandbox.slapd.uri
    assert loaded.directory.bind_dn == "cn=milter,ou=services,dc=example,dc=org"
    password_file = Path(loaded.directory.bind_password_file)
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    password = password_file.read_text().splitlines()[0]
    # Random per sandbox (issue #11): never a password the documentation ever printed.
    assert password == sandbox.slapd.service_accounts["milter"]["password"]
    assert len(password) >= 32
    assert loaded.directory.mail_attributes == ["mail", "mailLocalAddress"]
    assert loaded.directory.pending_base == "ou=wks-pending,dc=example,dc=org"
    assert (loaded.mailer.smtp_host, loaded.mailer.smtp_port) == (
        sandbox.postfix.reinject.host, sandbox.postfix.reinject.port)


# -- delivery ------------------------------------------------------------------------------


def test_inbound_mail_to_alice_is_delivered_by_lmtp_and_read_over_imap(
        sandbox: Sandbox) -> None:
    message_id = send(sandbox.postfix.inbound, OUTSIDER, ["alice@example.org"])
    delivered = message_from_bytes(fetch(sandbox, "alice", message_id), policy=default_policy)
    assert delivered["Message-ID"] == message_id
    assert delivered["Delivered-To"] == "alice@example.org"
    assert "Hello from the sandbox tests." in delivered.get_content()


def test_mail_to_an_alias_lands_in_the_users_mailbox(sandbox: Sandbox) -> None:
    message_id = send(sandbox.postfix.inbound, OUTSIDER, ["alice.liddell@example.org"])
    assert message_id.encode() in fetch(sandbox, "alice", message_id)


def test_reinjection_service_delivers_generated_mail(sandbox: Sandbox) -> None:
    message_id = send(sandbox.postfix.reinject, "key-submission@example.org",
                      ["carol@example.org"])
    assert message_id.encode() in fetch(sandbox, "carol", message_id)


def test_inbound_refuses_unknown_users_and_relaying_but_takes_wks_submissions(
        sandbox: Sandbox) -> None:
    with smtplib.SMTP(sandbox.postfix.inbound.host, sandbox.postfix.inbound.port,
                      timeout=30) as smtp:
        smtp.ehlo("client.test.example.net")
        smtp.mail(OUTSIDER)
        # No mailbox, but the milter takes mail to it (unauthenticated WKS submissions).
        code, reply = smtp.rcpt("key-submission@example.org")
        assert code == 250, reply
        code, reply = smtp.rcpt("nobody@example.org")
        assert code == 550, reply
        assert b"5.1.1" in reply
        code, reply = smtp.rcpt("someone@elsewhere.example.com")
        assert code == 454, reply
        assert b"Relay access denied" in reply


def test_submission_refuses_mail_without_login(sandbox: Sandbox) -> None:
    with smtplib.SMTP(sandbox.postfix.submission.host, sandbox.postfix.submission.port,
                      timeout=30) as smtp:
        smtp.ehlo("client.test.example.net")
        smtp.mail("alice@example.org")
        code, reply = smtp.rcpt("bob@example.org")
        assert code == 554, reply


def test_submission_with_the_right_password_sends_through_dovecot_sasl(
        sandbox: Sandbox) -> None:
    alice = sandbox.users["alice"]
    message_id = send(sandbox.postfix.submission, alice["address"], ["bob@example.org"],
                      login=(alice["address"], alice["password"]))
    assert message_id.encode() in fetch(sandbox, "bob", message_id)
    log = sandbox.postfix.maillog.read_text(errors="replace")
    assert "sasl_method=PLAIN, sasl_username=alice@example.org" in log


def test_a_milter_that_does_not_answer_means_tempfail_not_loss(sandbox_dir: Path) -> None:
    require_mail_binaries()
    with Sandbox(sandbox_dir, milters=f"unix:{sandbox_dir}/nobody-listens.sock") as sandbox:
        with pytest.raises(smtplib.SMTPSenderRefused) as deferred:
            send(sandbox.postfix.inbound, OUTSIDER, ["alice@example.org"])
        assert deferred.value.smtp_code == 451
        assert deferred.value.smtp_error.startswith(b"4.7.1 ")
        # The reinjection service has no milter: generated mail still goes out.
        message_id = send(sandbox.postfix.reinject, "key-submission@example.org",
                          ["alice@example.org"])
        assert message_id.encode() in fetch(sandbox, "alice", message_id)


# -- teardown ------------------------------------------------------------------------------


def test_teardown_when_a_service_fails_to_start(sandbox_dir: Path) -> None:
    require_mail_binaries()
    sandbox = Sandbox(sandbox_dir)
    # A real failure: someone else already listens on Postfix's inbound port.
    inbound = sandbox.postfix.inbound
    with (socket.create_server((inbound.host, inbound.port)),
          pytest.raises(SandboxError, match=rf"start failed .*port {inbound.port} already")):
        sandbox.start()
    assert {"slapd", "dovecot"} <= set(sandbox.started)
    assert wait_gone(set(sandbox.started.values())) == set()


def test_teardown_when_the_body_raises(sandbox_dir: Path) -> None:
    require_mail_binaries()
    tree: set[int] = set()

    def body() -> None:
        with Sandbox(sandbox_dir) as sandbox:
            tree.update(descendants(sandbox.started.values()))
            raise RuntimeError("test failure")

    with pytest.raises(RuntimeError, match="test failure"):
        body()
    assert len(tree) > 3  # the three masters and their workers
    assert wait_gone(tree) == set()


def test_sandbox_up_and_down_as_commands(sandbox_dir: Path) -> None:
    require_mail_binaries()
    directory = sandbox_dir / "cli"
    up = subprocess.run([*SANDBOX_COMMAND, "up", "--dir", str(directory), "--json"],
                        capture_output=True, text=True, timeout=120, check=False)
    if up.returncode != 0 and "already in use" in up.stderr:
        # A port chosen free was taken before the daemon bound it (the fixture's remedy
        # too, tests/support/mail.py): once more, in a fresh directory on fresh ports.
        directory = sandbox_dir / "cli-again"
        up = subprocess.run([*SANDBOX_COMMAND, "up", "--dir", str(directory), "--json"],
                            capture_output=True, text=True, timeout=120, check=False)
    try:
        assert up.returncode == 0, up.stderr
        info = json.loads(up.stdout)
        for key in ("config", "ldap_uri", "ldap_admin_dn", "ldap_admin_password", "users",
                    "smtp_submission", "smtp_inbound", "imap"):
            assert key in info, key
        assert {name: user["address"] for name, user in info["users"].items()} == {
            "alice": "alice@example.org", "bob": "bob@example.org",
            "carol": "carol@example.org"}
        assert config.load(info["config"], environ={}).directory.uri == info["ldap_uri"]
        # The daemons outlived `up`, and they answer.
        for key in ("smtp_inbound", "smtp_submission"):
            assert greeting(info[key]["host"], info[key]["port"]).startswith("220 ")
        assert greeting(info["imap"]["host"], info["imap"]["port"]).startswith("* OK")
        assert set(info["pids"]) == {"slapd", "dovecot", "milter", "postfix", "wkd",
                                     "portal"}
        assert info["milter_socket"].startswith("unix:")
        assert info["portal_url"].startswith("https://keys.example.org:")
        masters = set(info["pids"].values())
        assert len(masters) == 6
        tree = descendants(masters)
        # A second `up` into the same directory is refused and harms nothing.
        again = subprocess.run([*SANDBOX_COMMAND, "up", "--dir", str(directory)],
                               capture_output=True, text=True, timeout=120, check=False)
        assert again.returncode == 1
        assert "is not empty" in again.stderr
        assert all(alive(pid) for pid in masters)
    except BaseException:
        if (directory / "sandbox.json").exists():
            down(directory)
        raise
    stopped = subprocess.run([*SANDBOX_COMMAND, "down", "--dir", str(directory)],
                             capture_output=True, text=True, timeout=120, check=False)
    assert stopped.returncode == 0, stopped.stderr
    assert wait_gone(tree) == set()
    for key in ("smtp_inbound", "smtp_submission"):
        assert greeting(info[key]["host"], info[key]["port"]) == ""
    # Stopping again (every pid dead) is not an error.
    again = subprocess.run([*SANDBOX_COMMAND, "down", "--dir", str(directory)],
                           capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0, again.stderr
    assert "nothing was running" in again.stdout


def test_sandbox_refuses_a_directory_postfix_cannot_reach(tmp_path: Path) -> None:
    # pytest's tmp_path lies below /tmp/pytest-of-root, mode 0700.
    with pytest.raises(SandboxError, match="not searchable by other users"):
        Sandbox(tmp_path / "sandbox")


def test_sandbox_refuses_a_used_directory(sandbox_dir: Path) -> None:
    # Its pid files would be taken for the new sandbox's own and stopped on failure.
    (sandbox_dir / "sandbox.json").write_text("{}")
    with pytest.raises(SandboxError, match="is not empty"):
        Sandbox(sandbox_dir)


def test_down_leaves_a_reused_pid_alone(sandbox_dir: Path) -> None:
    # A process called "slapd" that is not this sandbox's (as after pid reuse).
    impostor_binary = sandbox_dir / "bin" / "slapd"
    impostor_binary.parent.mkdir()
    shutil.copy("/bin/sleep", impostor_binary)
    impostor = subprocess.Popen([str(impostor_binary), "60"], cwd="/")
    try:
        sandbox = sandbox_dir / "old"
        sandbox.mkdir()
        (sandbox / "sandbox.json").write_text(json.dumps({"processes": {
            "slapd": {"pid": impostor.pid, "name": "slapd", "pid_file": None}}}))
        assert down(sandbox) == []
        assert impostor.poll() is None
    finally:
        impostor.kill()
        impostor.wait()


def test_down_without_a_sandbox_is_an_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [*SANDBOX_COMMAND, "down", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "LC_ALL": "C"})
    assert result.returncode == 1
    assert "sandbox.json is missing" in result.stderr


# -- last: a failed login slows further logins from 127.0.0.1 down ------------------------


def test_submission_refuses_a_wrong_password(sandbox: Sandbox) -> None:
    with smtplib.SMTP(sandbox.postfix.submission.host, sandbox.postfix.submission.port,
                      timeout=30) as smtp:
        smtp.ehlo("client.test.example.net")
        # One AUTH PLAIN (login() would retry with LOGIN, and Dovecot delays the retry).
        smtp.user, smtp.password = "bob@example.org", "not-bobs-password"
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            smtp.auth("PLAIN", smtp.auth_plain)
    assert refused.value.smtp_code == 535
    assert refused.value.smtp_error.startswith(b"5.7.8 ")
