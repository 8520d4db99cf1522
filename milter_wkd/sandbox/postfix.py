"""A private Postfix on loopback, configured by the shipped postfix/main.cf and master.cf.

Reads the snippets postfix/main.cf and postfix/master.cf from the repository, renders
their @PLACEHOLDERS@ with the sandbox's values and puts them after a small sandbox-only
base (private config, queue, data and log locations; no local delivery, nothing leaves
the machine; the usual internal services with chroot "n"). Runs `postfix -c DIR start`
(the master daemonizes and outlives the caller) and waits until each of the three SMTP
services (inbound, submission, reinjection) sends its 220 banner.

Fails with SandboxError carrying the tail of the private maillog: Postfix reports most
mistakes there and exits with a bare rc 1 (also when stdin is not /dev/null or the
maillog path is outside maillog_file_prefixes, hence both are set here).
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
    port_is_free,
    read_pid,
    render,
    template_path,
    terminate,
    wait_until,
)

HOSTNAME = "mx.example.org"
MAIL_OWNER = "postfix"  # mail_owner, the default

# Sandbox-only: what a real server already has in its own main.cf.
BASE_MAIN_CF = """\
# milter-wkd sandbox: a private Postfix instance on loopback. Generated; the part that a
# real server needs is the rendered postfix/main.cf snippet after this base.
compatibility_level = 3.6
myhostname = {hostname}
mydomain = example.org
myorigin = $mydomain
# Nothing is delivered locally and nothing leaves this machine.
mydestination =
local_transport = error:5.1.1 the sandbox delivers no local mail
default_transport = error:5.4.4 the sandbox sends no mail to other hosts
relay_transport = $default_transport
alias_maps =
alias_database =
# Every client is 127.0.0.1, so the inbound service must not trust loopback.
mynetworks =
inet_interfaces = {loopback}
inet_protocols = ipv4
smtpd_peername_lookup = no
queue_directory = {queue}
data_directory = {data}
meta_directory = /etc/postfix
syslog_name = postfix-sandbox
# XXX no syslog here: Postfix logs through postlogd into this file, and refuses (rc 1,
# silently) a maillog_file outside maillog_file_prefixes.
maillog_file = {maillog}
maillog_file_prefixes = {root}
smtpd_banner = $myhostname ESMTP milter-wkd sandbox
biff = no
delay_warning_time = 0
# Recipient checks probe Dovecot's LMTP; poll the answer every second, not every three.
address_verify_poll_delay = 1s
# Room for a flooded key's submission (150,000 certifications: about 30 MB as mail).
message_size_limit = 83886080

"""

BASE_MASTER_CF = """\
# milter-wkd sandbox: a private Postfix instance on loopback. Generated; the part that a
# real server needs is the rendered postfix/master.cf snippet after this base.
# service type  private unpriv  chroot  wakeup  maxproc command + args
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd

"""


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def as_dict(self) -> dict[str, str | int]:
        return {"host": self.host, "port": self.port}


class Postfix:
    """One private Postfix instance under `workdir` (created if missing)."""

    def __init__(self, workdir: Path, *, domains: list[str], submission_addresses: list[str],
                 dovecot_auth_socket: Path, lmtp: Endpoint, milters: str = "") -> None:
        self.dir = Path(workdir)
        self.config_dir = self.dir / "etc"
        self.queue_dir = self.dir / "queue"
        self.data_dir = self.dir / "data"
        self.maillog = self.dir / "maillog"
        self.start_log = self.dir / "start.log"
        self.domains = domains
        self.submission_addresses = submission_addresses
        self.dovecot_auth_socket = dovecot_auth_socket
        self.lmtp = lmtp
        self.milters = milters
        self.inbound = Endpoint(LOOPBACK, free_port())
        self.submission = Endpoint(LOOPBACK, free_port())
        self.reinject = Endpoint(LOOPBACK, free_port())

    @property
    def pid_file(self) -> Path:
        return self.queue_dir / "pid" / "master.pid"

    @property
    def pid(self) -> int | None:
        return read_pid(self.pid_file)

    def main_cf(self) -> str:
        base = BASE_MAIN_CF.format(
            hostname=HOSTNAME, loopback=LOOPBACK, queue=self.queue_dir, data=self.data_dir,
            maillog=self.maillog, root=self.dir)
        return base + render(template_path("postfix", "main.cf"), {
            "MAIL_DOMAINS": ", ".join(self.domains),
            "WKS_SUBMISSION_ACCESS": ", ".join(f"{a}=OK" for a in self.submission_addresses),
            "LMTP_ENDPOINT": f"inet:{self.lmtp.host}:{self.lmtp.port}",
            "DOVECOT_AUTH_SOCKET": str(self.dovecot_auth_socket),
            "MILTERS": self.milters,
        })

    def master_cf(self) -> str:
        return BASE_MASTER_CF + render(template_path("postfix", "master.cf"), {
            "INBOUND_LISTEN": f"{self.inbound.host}:{self.inbound.port}",
            "SUBMISSION_LISTEN": f"{self.submission.host}:{self.submission.port}",
            "SUBMISSION_TLS": "none",
            "REINJECT_LISTEN": f"{self.reinject.host}:{self.reinject.port}",
            "REINJECT_NETWORKS": "127.0.0.0/8",
        })

    def write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The master takes its lock and the verify cache lives here: Postfix's own user.
        owner = pwd.getpwnam(MAIL_OWNER)
        os.chown(self.data_dir, owner.pw_uid, owner.pw_gid)
        (self.config_dir / "main.cf").write_text(self.main_cf(), encoding="utf-8")
        (self.config_dir / "master.cf").write_text(self.master_cf(), encoding="utf-8")

    def postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        """Run the postfix command on this instance; stdin must be /dev/null (see above)."""
        with self.start_log.open("ab") as log:
            return subprocess.run(
                ["postfix", "-c", str(self.config_dir), *args], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False)

    def start(self) -> None:
        self.write_config()
        result = self.postfix("start")
        if result.returncode != 0:
            # XXX the master's own fatal errors (a port in use) reach neither stderr nor
            # the maillog (postlogd is not up yet): name busy ports ourselves.
            busy = [str(e.port) for e in (self.inbound, self.submission, self.reinject)
                    if not port_is_free(e.host, e.port)]
            hint = f" (port {', '.join(busy)} already in use)" if busy else ""
            raise SandboxError(
                f"postfix start failed (rc {result.returncode}){hint}:\n"
                f"{log_tail(self.start_log)}\n{log_tail(self.maillog)}")
        for name, endpoint in (("inbound", self.inbound), ("submission", self.submission),
                               ("reinjection", self.reinject)):
            wait_until(answers(endpoint.host, endpoint.port, "220 "),
                       f"Postfix {name} service on port {endpoint.port}", log=self.maillog)

    def stop(self) -> None:
        pid = self.pid
        if pid is not None:
            terminate(pid, "master", within=self.dir)
