"""A private Dovecot on loopback, configured by the shipped dovecot/ snippets.

Reads dovecot/milter-wkd.conf (protocols, LDAP passdb/userdb, SASL socket for Postfix,
LMTP, IMAP, mail storage) and dovecot/dovecot-ldap.conf.ext (the LDAP queries), renders
their @PLACEHOLDERS@ and includes them from a small sandbox-only dovecot.conf (private
base_dir, state_dir, instance_name and log; listen on 127.0.0.1 only; ssl = no). Runs
`dovecot -c FILE` (the master daemonizes and outlives the caller) and waits until LMTP
and IMAP greet and the auth socket for Postfix exists.

The shipped snippet's auth cache is on here too: a user who logged in or got mail within
the hour is answered without slapd, so logins ride out a slapd restart (benchmarks/chaos.py,
tests/integration/test_fault_regressions.py); a test that changes or removes a user's
password must flush it (`doveadm -c <dovecot.conf> auth cache flush USER`).

Mail is stored as Maildir under the sandbox, owned by the system user `mail` (Dovecot
refuses root for mail, and a sandbox must not create users; a real server uses a
dedicated `vmail`). The sandbox directory must therefore be traversable by that user.
Fails with SandboxError carrying the tail of Dovecot's log.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from dataclasses import dataclass
from pathlib import Path

from milter_wkd.sandbox.daemons import (
    LOOPBACK,
    SandboxError,
    answers,
    free_port,
    log_tail,
    read_pid,
    render,
    template_path,
    terminate,
    wait_until,
)
from milter_wkd.sandbox.postfix import Endpoint

MAIL_USER = "mail"

BASE_CONF = """\
# milter-wkd sandbox: a private Dovecot instance on loopback. Generated; the part that a
# real server needs is the rendered dovecot/milter-wkd.conf included below.
base_dir = {run}
state_dir = {state}
instance_name = {instance}
listen = {loopback}
ssl = no
log_path = {log}
auth_verbose = yes
!include {snippet}
# Loopback has no TLS here: no imaps listener.
service imap-login {{
  inet_listener imaps {{
    port = 0
  }}
}}
"""


@dataclass(frozen=True, slots=True)
class LdapAccess:
    """How Dovecot reaches the directory: its URI, the users' base and its service account."""

    uri: str
    base: str
    bind_dn: str
    bind_password: str


class Dovecot:
    """One private Dovecot instance under `workdir` (created if missing)."""

    def __init__(self, workdir: Path, *, ldap: LdapAccess, mail_user: str = MAIL_USER) -> None:
        self.dir = Path(workdir)
        self.run_dir = self.dir / "run"
        self.state_dir = self.dir / "state"
        self.mail_root = self.dir / "mail"
        self.log = self.dir / "dovecot.log"
        self.start_log = self.dir / "start.log"
        self.config_file = self.dir / "dovecot.conf"
        self.snippet_file = self.dir / "milter-wkd.conf"
        self.ldap_args_file = self.dir / "dovecot-ldap.conf.ext"
        self.auth_socket = self.dir / "auth-postfix"
        self.ldap = ldap
        try:
            self.mail_owner = pwd.getpwnam(mail_user)
        except KeyError:
            raise SandboxError(f"system user {mail_user!r} (owner of the mail) is missing",
                               ) from None
        self.lmtp = Endpoint(LOOPBACK, free_port())
        self.imap = Endpoint(LOOPBACK, free_port())

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "master.pid"

    @property
    def pid(self) -> int | None:
        return read_pid(self.pid_file)

    def snippet(self) -> str:
        return render(template_path("dovecot", "milter-wkd.conf"), {
            "LDAP_ARGS_FILE": str(self.ldap_args_file),
            "POSTFIX_AUTH_SOCKET": str(self.auth_socket),
            "POSTFIX_USER": "postfix",
            "LMTP_ADDRESS": self.lmtp.host,
            "LMTP_PORT": str(self.lmtp.port),
            "IMAP_ADDRESS": self.imap.host,
            "IMAP_PORT": str(self.imap.port),
            "MAIL_UID": str(self.mail_owner.pw_uid),
            "MAIL_GID": str(self.mail_owner.pw_gid),
        })

    def ldap_args(self) -> str:
        return render(template_path("dovecot", "dovecot-ldap.conf.ext"), {
            "LDAP_URI": self.ldap.uri,
            "LDAP_BASE": self.ldap.base,
            "LDAP_BIND_DN": self.ldap.bind_dn,
            "LDAP_BIND_PASSWORD": self.ldap.bind_password,
            "MAIL_ROOT": str(self.mail_root),
        })

    def base_conf(self) -> str:
        return BASE_CONF.format(
            run=self.run_dir, state=self.state_dir, loopback=LOOPBACK, log=self.log,
            instance=f"milter-wkd-sandbox-{self.imap.port}", snippet=self.snippet_file)

    def write_config(self) -> None:
        for path in (self.dir, self.state_dir):
            path.mkdir(parents=True, exist_ok=True)
        # Dovecot's unprivileged processes (login, lmtp and imap as the mail owner) must
        # reach their sockets and the mail below this directory.
        self.dir.chmod(0o755)
        self.mail_root.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.mail_root, self.mail_owner.pw_uid, self.mail_owner.pw_gid)
        self.snippet_file.write_text(self.snippet(), encoding="utf-8")
        self.ldap_args_file.touch(mode=0o600)
        self.ldap_args_file.write_text(self.ldap_args(), encoding="utf-8")
        self.config_file.write_text(self.base_conf(), encoding="utf-8")

    def start(self) -> None:
        self.write_config()
        with self.start_log.open("ab") as log:
            result = subprocess.run(
                ["dovecot", "-c", str(self.config_file)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, timeout=60, check=False)
        if result.returncode != 0:
            raise SandboxError(
                f"dovecot failed to start (rc {result.returncode}):\n"
                f"{log_tail(self.start_log)}\n{log_tail(self.log)}")
        wait_until(answers(self.lmtp.host, self.lmtp.port, "220 "),
                   f"Dovecot LMTP on port {self.lmtp.port}", log=self.log)
        wait_until(answers(self.imap.host, self.imap.port, "* OK"),
                   f"Dovecot IMAP on port {self.imap.port}", log=self.log)
        wait_until(self.auth_socket.exists, f"Dovecot auth socket {self.auth_socket}",
                   log=self.log)

    def stop(self) -> None:
        pid = self.pid
        if pid is not None:
            terminate(pid, "dovecot", within=self.dir)
