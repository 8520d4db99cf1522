"""The sandbox: the real services, private, on loopback (tests, `make demo`, benchmarks).

`Sandbox(directory)` starts, in this order and each only after the previous one answers,
a private slapd (sandbox.slapd: our schema, DIT, ACLs, constraints), a private Dovecot
(sandbox.dovecot: LDAP passdb/userdb, SASL socket for Postfix, LMTP, IMAP) and a private
Postfix (sandbox.postfix: inbound MX-style smtpd, SASL submission, reinjection without
milters, delivery to Dovecot by LMTP), all on free ports of 127.0.0.1 and with every file
below `directory`. Postfix and Dovecot read the shipped postfix/ and dovecot/ snippets,
so the documentation is what runs.

It writes two files there: `milter-wkd.toml`, a complete milter-wkd configuration for
this sandbox (the directory as the milter's service account, the responder's as cn=wkd,
the reinjection port as the mailer, and a [check] section naming its Postfix, Dovecot and
WKD responder, so that `milter-wkd check --config` that file passes as it is; their random
passwords in milter.password and wkd.password, 0600), and `sandbox.json`, the state that
`down(directory)` (`milter-wkd sandbox down`) uses to stop by pid everything that was
started, also from another process and also when some of it has died already. As a
context manager it always tears down, also when starting failed half-way or the body
raised; `start_detached` starts a sandbox that outlives the calling process
(`milter-wkd sandbox up`).

Topology (`Sandbox(providers=N, consumers=M)`, `milter-wkd sandbox up --providers N
--consumers M`): N slapds in multi-provider replication and M read-only consumers, each
configured with ldap/replication/'s LDIF as ldap/README.md's "Replication" says. Provider
1 is `slapd` (the one a default sandbox has, loaded as always); the others start with an
empty database, and replication brings them everything, the service accounts' password
hashes included: the passwords are set once, on provider 1 (every Slapd object shares its
`service_accounts`). start() returns when all report the same contextCSN. The milter's
`[directory] uri` lists the providers in order (libldap fails over), the WKD responder
reads from the first consumer (the first provider when there is none) and fails over to
the providers in order, and Dovecot lists the providers as the milter does. The default
(one provider, no consumer) is exactly the single slapd it always was, with no
replication configured.

Last come the WKD responder (sandbox.wkd) and the self-service page (sandbox.portal,
`milter-wkd portal` for keys.example.org on a free port, the config's [portal] section,
launched while the responder starts); info() reports its `portal_url` and the test CA of
its certificate (`portal_ca_file`).

Failures raise SandboxError (or SlapdError from slapd) naming the daemon, with its log tail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from milter_wkd import config
from milter_wkd.domains import init_domain
from milter_wkd.errors import MilterWkdError
from milter_wkd.sandbox.daemons import LOOPBACK, SandboxError, read_pid, terminate
from milter_wkd.sandbox.dovecot import Dovecot, LdapAccess
from milter_wkd.sandbox.milterd import PROCESS_NAME as MILTER_PROCESS
from milter_wkd.sandbox.milterd import MilterDaemon
from milter_wkd.sandbox.portal import PROCESS_NAME as PORTAL_PROCESS
from milter_wkd.sandbox.portal import PortalDaemon
from milter_wkd.sandbox.postfix import Endpoint, Postfix
from milter_wkd.sandbox.slapd import Slapd, provider_url, replication_ldif, wait_replicated
from milter_wkd.sandbox.wkd import PROCESS_NAME as WKD_PROCESS
from milter_wkd.sandbox.wkd import WkdResponder

__all__ = ["Endpoint", "Sandbox", "SandboxError", "down", "start_detached"]

DOMAINS = ["example.org"]
CONFIG_NAME = "milter-wkd.toml"
STATE_NAME = "sandbox.json"


class Sandbox:
    """Private slapd, Dovecot and Postfix under one directory (a new temp dir if None)."""

    def __init__(self, directory: Path | str | None = None, *, keep: bool | None = None,
                 milters: str | None = None, providers: int = 1, consumers: int = 0) -> None:
        """keep: leave the directory after stop (default: only when it was given).
        milters: None runs our milter (with example.org initialised: submission and DKIM
        keys below keys/) and hands its socket to Postfix; a string is used as Postfix's
        smtpd_milters/non_smtpd_milters instead, and our milter does not run.
        providers, consumers: the replication topology (default: one slapd, none)."""
        if providers < 1 or consumers < 0:
            raise SandboxError(f"a sandbox needs at least one provider and no negative "
                               f"number of consumers, not {providers} and {consumers}")
        created = directory is None
        if directory is None:
            directory = tempfile.mkdtemp(prefix="milter-wkd-sandbox-")
        self.dir = Path(directory).resolve()
        _check_traversable(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        # An old sandbox's pid files must never be mistaken for ours (stop kills by them).
        if not created and any(self.dir.iterdir()):
            raise SandboxError(f"{self.dir} is not empty (an old sandbox? `milter-wkd sandbox "
                               f"down --dir {self.dir}`, then remove it)")
        # The mail owner (Dovecot) and postfix must traverse it; secrets inside are 0600.
        self.dir.chmod(0o711)
        self.keep = not created if keep is None else keep
        self.slapd = Slapd(self.dir / "slapd")
        # (role, slapd) of the topology, provider 1 (self.slapd) first.
        self.slapds: list[tuple[str, Slapd]] = [("provider", self.slapd)]
        if providers > 1 or consumers > 0:
            self._plan_replication(providers, consumers)
        dovecot_account = self.slapd.service_accounts["dovecot"]
        # Dovecot (logins, delivery) lists the providers too, in the milter's order.
        self.dovecot = Dovecot(self.dir / "dovecot", ldap=LdapAccess(
            uri=self.directory_uri, base=self.slapd.people_dn,
            bind_dn=dovecot_account["dn"], bind_password=dovecot_account["password"]))
        self.config_path = self.dir / CONFIG_NAME
        self.keys_dir = self.dir / "keys"
        self.milter: MilterDaemon | None = None
        if milters is None:
            self.milter = MilterDaemon(self.dir / "milter", self.config_path)
            milters = self.milter.socket_spec
        self.postfix = Postfix(self.dir / "postfix", domains=DOMAINS,
                               submission_addresses=[
                                   domain.submission_address for domain in config.Config().domains
                                   if domain.name in DOMAINS],
                               dovecot_auth_socket=self.dovecot.auth_socket,
                               lmtp=self.dovecot.lmtp, milters=milters)
        # The WKD responder (on 127.0.0.1:443 when that is free) serves the keys and the
        # submission key, so gpg-wks-client and gpg --locate-keys need no fake options.
        # With replicas it reads the nearest (a consumer) and fails over to the providers.
        self.wkd = WkdResponder(self.dir / "wkd", self.reader,
                                submission_public_key=self.submission_public_key,
                                fallback_uris=[s.uri for s in self.providers
                                               if s is not self.reader])
        # The self-service page (keys.example.org on a free port), through the milter's
        # account as [directory] says; it starts while the responder comes up.
        self.portal = PortalDaemon(self.dir / "portal", self.config_path)
        # Daemon name -> pid of every daemon start() started (kept after stop, for checks).
        self.started: dict[str, int] = {}
        self.state_path = self.dir / STATE_NAME

    def _plan_replication(self, providers: int, consumers: int) -> None:
        for number in range(2, providers + 1):
            self.slapds.append(("provider", Slapd(self.dir / f"slapd-provider{number}",
                                                  seed=False)))
        for number in range(1, consumers + 1):
            self.slapds.append(("consumer", Slapd(self.dir / f"slapd-consumer{number}",
                                                  seed=False)))
        replicator = self.slapd.service_accounts["replicator"]
        urls = [provider_url(server) for server in self.providers]
        for role, server in self.slapds:
            # Set once on provider 1; replication carries the hashes to the others.
            server.service_accounts = self.slapd.service_accounts
            server.replication = replication_ldif(
                role, urls, suffix=server.suffix, replicator_dn=replicator["dn"],
                replicator_password=replicator["password"])

    # -- endpoints --------------------------------------------------------------------

    @property
    def providers(self) -> list[Slapd]:
        return [server for role, server in self.slapds if role == "provider"]

    @property
    def consumers(self) -> list[Slapd]:
        return [server for role, server in self.slapds if role == "consumer"]

    @property
    def reader(self) -> Slapd:
        """The slapd the WKD responder reads: the first consumer, else provider 1."""
        return (self.consumers or self.providers)[0]

    @property
    def directory_uri(self) -> str:
        """The milter's [directory] uri: the providers in order (libldap fails over)."""
        return " ".join(server.uri for server in self.providers)

    def _slapd_name(self, index: int) -> str:
        """Process name in sandbox.json: `slapd` for provider 1 (as always), then
        slapd-provider2..., slapd-consumer1..."""
        if index == 0:
            return "slapd"
        return self.slapds[index][1].workdir.name

    @property
    def submission_address(self) -> str:
        return f"key-submission@{DOMAINS[0]}"

    @property
    def submission_key(self) -> Path:
        return self.keys_dir / DOMAINS[0] / "submission.asc"

    @property
    def submission_public_key(self) -> Path:
        return self.keys_dir / DOMAINS[0] / "submission.pub"

    @property
    def dkim_key(self) -> Path:
        """Ed25519, selector wkd."""
        return self.keys_dir / DOMAINS[0] / "dkim.pem"

    @property
    def dkim_rsa_key(self) -> Path:
        """RSA-2048, selector wkd-rsa: the sandbox signs with both (dual signing)."""
        return self.keys_dir / DOMAINS[0] / "dkim-rsa.pem"

    @property
    def users(self) -> dict[str, dict[str, str]]:
        return {name: {"address": user["address"], "password": user["password"]}
                for name, user in self.slapd.users.items()}

    def info(self) -> dict[str, Any]:
        """Everything a client needs, as `milter-wkd sandbox up --json` prints it."""
        return {
            "dir": str(self.dir),
            "config": str(self.config_path),
            "ldap_uri": self.slapd.uri,
            "slapds": [{"role": role, "uri": server.uri, "pid": server.pid}
                       for role, server in self.slapds],
            "ldapi_uri": self.slapd.ldapi_uri,
            "ldap_suffix": self.slapd.suffix,
            "ldap_admin_dn": self.slapd.admin_dn,
            "ldap_admin_password": self.slapd.admin_password,
            "users": self.users,
            "smtp_inbound": self.postfix.inbound.as_dict(),
            "smtp_submission": self.postfix.submission.as_dict(),
            "smtp_reinject": self.postfix.reinject.as_dict(),
            "lmtp": self.dovecot.lmtp.as_dict(),
            "imap": self.dovecot.imap.as_dict(),
            "logs": {"slapd": str(self.slapd.log_path), "dovecot": str(self.dovecot.log),
                     "postfix": str(self.postfix.maillog)},
            "pids": {name: entry["pid"] for name, entry in self._processes().items()},
            "milter_socket": self.milter.socket_spec if self.milter else None,
            "submission_address": self.submission_address,
            "submission_public_key": str(self.submission_public_key),
            "dkim_key": str(self.dkim_key),
            "dkim_rsa_key": str(self.dkim_rsa_key),
            "wkd_url": self.wkd.wkd_url,
            "wkd_port": self.wkd.port,
            "ca_file": str(self.wkd.ca_file),
            "portal_url": self.portal.portal_url,
            "portal_ca_file": str(self.portal.ca_file),
            # Passes against this sandbox as it is: the config's [check] names its peers.
            "check_command": f"milter-wkd check --config {self.config_path}",
        }

    # -- files ------------------------------------------------------------------------

    def milter_config(self) -> str:
        milter = self.slapd.service_accounts["milter"]
        password_file = self.dir / "milter.password"
        return f"""\
# milter-wkd configuration of the sandbox in {self.dir} (written by `milter-wkd sandbox up`).
[directory]
uri = {_toml(self.directory_uri)}
bind_dn = {_toml(milter["dn"])}
bind_password_file = {_toml(str(password_file))}
base_dn = {_toml(self.slapd.people_dn)}
mail_attributes = [{", ".join(_toml(a) for a in self.slapd.mail_attributes)}]
pending_base = {_toml(self.slapd.pending_dn)}
claims_base = {_toml(self.slapd.claims_dn)}

[web]
# The responder reads as the read-only cn=wkd, never as the milter's account.
bind_dn = {_toml(self.slapd.service_accounts["wkd"]["dn"])}
bind_password_file = {_toml(str(self.dir / "wkd.password"))}

[mailer]
method = "smtp"
smtp_host = {_toml(self.postfix.reinject.host)}
smtp_port = {self.postfix.reinject.port}

[milter]
socket = {_toml(self.milter.socket_spec if self.milter else "")}
socket_group = "postfix"
# Room for a flooded key (150,000 certifications: about 32 MB as a submission mail).
max_submission_bytes = 41943040
# Postfix listens on 127.0.0.1; a client on 127.0.0.2 plays the webmail host.
trusted_networks = ["127.0.0.2/32"]
# The sandbox has no external DKIM signer: the milter signs our users' mail itself.
dkim_sign_outgoing = true

[check]
# Where `milter-wkd check --config` finds this sandbox's peers: its own Postfix and Dovecot,
# its WKD responder on loopback (openpgpkey.example.org is not ours in DNS) under a test CA.
postfix_config_dir = {_toml(str(self.postfix.config_dir))}
dovecot_auth_socket = {_toml(str(self.dovecot.auth_socket))}
wkd_url = {_toml(self.wkd.wkd_url)}
wkd_connect = {_toml(f"{LOOPBACK}:{self.wkd.port}")}
ca_file = {_toml(str(self.wkd.ca_file))}
# The self-service page, under a test CA of its own (sandbox.portal).
portal_url = {_toml(self.portal.portal_url)}
portal_connect = {_toml(f"{LOOPBACK}:{self.portal.port}")}
portal_ca_file = {_toml(str(self.portal.ca_file))}

[[domains]]
name = {_toml(DOMAINS[0])}
submission_address = {_toml(self.submission_address)}
submission_key = {_toml(str(self.submission_key))}
submission_public_key = {_toml(str(self.submission_public_key))}
dkim_selector = "wkd"
dkim_key = {_toml(str(self.dkim_key))}
dkim_rsa_selector = "wkd-rsa"
dkim_rsa_key = {_toml(str(self.dkim_rsa_key))}

{self.portal.section()}"""

    def write_milter_config(self) -> None:
        for account in ("milter", "wkd"):
            password_file = self.dir / f"{account}.password"
            password_file.touch(mode=0o600)
            password_file.write_text(
                self.slapd.service_accounts[account]["password"] + "\n", encoding="utf-8")
        self.config_path.write_text(self.milter_config(), encoding="utf-8")
        loaded = config.load(self.config_path, environ={})  # an unknown key: fail now
        for domain in loaded.domains:
            init_domain(domain)

    def _processes(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for index, (_role, server) in enumerate(self.slapds):
            if server.pid is not None:
                found[self._slapd_name(index)] = {"pid": server.pid, "name": "slapd",
                                                  "pid_file": None}
        daemons: list[tuple[str, Dovecot | Postfix | MilterDaemon | WkdResponder
                            | PortalDaemon, str]] = [
            ("dovecot", self.dovecot, "dovecot"), ("postfix", self.postfix, "master")]
        if self.milter is not None:
            daemons.append(("milter", self.milter, MILTER_PROCESS))
        daemons.append(("wkd", self.wkd, WKD_PROCESS))
        daemons.append(("portal", self.portal, PORTAL_PROCESS))
        for name, daemon, command in daemons:
            pid = daemon.pid
            if pid is not None:
                found[name] = {"pid": pid, "name": command, "pid_file": str(daemon.pid_file)}
        return found

    def write_state(self) -> None:
        socket_dirs = [server.socket_path.parent for _role, server in self.slapds]
        state = {
            "processes": self._processes(),
            # slapd puts its ldapi socket in /tmp when this directory's path is too long.
            "remove": [str(d) for d in socket_dirs if not d.is_relative_to(self.dir)],
            "info": self.info(),
        }
        temporary = self.state_path.with_suffix(".tmp")
        temporary.touch(mode=0o600)  # it holds the test passwords
        temporary.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        temporary.replace(self.state_path)

    # -- running ----------------------------------------------------------------------

    def start(self) -> Sandbox:
        """Start slapd, Dovecot, the milter and Postfix; on any failure stop what runs and
        re-raise. The milter config (and example.org's keys) are written before the milter
        starts; Postfix comes last so that no mail arrives before the milter answers."""
        try:
            self.write_state()
            daemons: list[Slapd | Dovecot | MilterDaemon | Postfix | WkdResponder] = [
                server for _role, server in self.slapds]
            daemons.append(self.dovecot)
            if self.milter is not None:
                daemons.append(self.milter)
            daemons += [self.postfix, self.wkd]
            for daemon in daemons:
                if daemon is self.milter or (daemon is self.postfix and self.milter is None):
                    self.write_milter_config()
                if daemon is self.dovecot and len(self.slapds) > 1:
                    wait_replicated([server for _role, server in self.slapds])
                if daemon is self.wkd:  # one more granian process: start it meanwhile
                    self.portal.launch()
                try:
                    daemon.start()
                    if daemon is self.wkd:
                        self.portal.wait()
                finally:
                    self.started.update(
                        {name: entry["pid"] for name, entry in self._processes().items()})
                self.write_state()
        except BaseException as failure:
            try:
                self.stop()
            except MilterWkdError as exc:
                failure.add_note(f"and tearing down failed too: {exc}")
            raise
        return self

    def stop(self) -> None:
        """Stop everything this sandbox started (reverse order); remove a temp dir it made."""
        errors: list[str] = []
        stoppable: list[PortalDaemon | WkdResponder | Postfix | MilterDaemon | Dovecot] = [
            self.portal, self.wkd, self.postfix]
        if self.milter is not None:
            stoppable.append(self.milter)
        stoppable.append(self.dovecot)
        for daemon in stoppable:
            try:
                daemon.stop()
            except SandboxError as exc:
                errors.append(exc.reason)
        for _role, server in reversed(self.slapds):
            try:
                server.close()
            except MilterWkdError as exc:
                errors.append(exc.reason)
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        elif self.state_path.exists():
            self.write_state()
        if errors:
            raise SandboxError("; ".join(errors))

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _check_traversable(directory: Path) -> None:
    """Postfix (as `postfix`) and Dovecot (as the mail owner) must reach files below it."""
    for parent in directory.parents:
        if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
            raise SandboxError(
                f"{parent} is not searchable by other users (mode "
                f"{stat.S_IMODE(parent.stat().st_mode):o}), so Postfix and Dovecot could not "
                f"reach {directory}; use a directory such as /tmp/NAME")


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def down(directory: Path | str) -> list[str]:
    """Stop by pid what `start_detached`/`Sandbox.start` recorded in directory; names stopped.

    Pids that are gone, or that now belong to another program (another command name, or
    nothing of this directory on its command line or as its working directory), are
    skipped; the pid files of Postfix and Dovecot are consulted too, in case one started
    after the last state write.
    """
    directory = Path(directory).resolve()
    state_path = directory / STATE_NAME
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SandboxError(f"no sandbox in {directory} ({STATE_NAME} is missing)") from None
    except (OSError, ValueError) as exc:
        raise SandboxError(f"cannot read {state_path}: {exc}") from None
    stopped: list[str] = []
    errors: list[str] = []
    processes = state.get("processes", {})
    slapds = sorted((name for name in processes if name.startswith("slapd")), reverse=True)
    for name in ("portal", "wkd", "postfix", "milter", "dovecot", *slapds):
        entry = processes.get(name)
        if entry is None:
            continue
        pids = {int(entry["pid"])}
        if entry.get("pid_file"):
            pids.add(read_pid(Path(entry["pid_file"])) or int(entry["pid"]))
        for pid in sorted(pids):
            try:
                if terminate(pid, str(entry["name"]), within=directory):
                    stopped.append(name)
            except SandboxError as exc:
                errors.append(exc.reason)
    for path in state.get("remove", []):
        shutil.rmtree(path, ignore_errors=True)
    if errors:
        raise SandboxError("; ".join(errors))
    return stopped


def start_detached(directory: Path | str | None = None, *, providers: int = 1,
                   consumers: int = 0) -> dict[str, Any]:
    """Start a sandbox whose daemons outlive this process; returns its info()
    (providers, consumers: the replication topology, as Sandbox takes them).

    A forked child starts it in a session of its own (so that no terminal hang-up or
    process-group signal of the caller reaches slapd, which runs as that child's
    child) and exits; its daemons are then orphans, as daemons are.
    """
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        code = 1
        answer: dict[str, Any]
        try:
            os.setsid()
            sandbox = Sandbox(directory, keep=True, providers=providers, consumers=consumers)
            sandbox.start()
            answer = {"info": sandbox.info()}
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            answer = {"error": str(exc) or type(exc).__name__}
        with contextlib.suppress(OSError), os.fdopen(write_end, "w") as out:
            out.write(json.dumps(answer))
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as incoming:
        raw = incoming.read()
    os.waitpid(child, 0)
    try:
        answer = json.loads(raw)
    except ValueError:
        raise SandboxError("the sandbox starter died without an answer") from None
    if "error" in answer:
        raise SandboxError(answer["error"])
    info: dict[str, Any] = answer["info"]
    return info
