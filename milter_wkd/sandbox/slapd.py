"""A private, throwaway slapd for tests, the demo and benchmarks (like python-ldap's slapdtest).

`Slapd(workdir).start()` builds cn=config offline in `workdir/slapd.d`: a base
configuration as Debian installs it (schemas core, cosine, nis, inetorgperson, misc;
back_mdb; database `olcDatabase={1}mdb` for dc=example,dc=org) and the users of
ldap/example-dit.ldif, then the SETUP_STEPS of ldap/README.md - the very files an
administrator applies with ldapadd/ldapmodify, here with their offline twins slapadd and
slapmodify. `Slapd(workdir, milter_wkd=False)` stops after the base and the users, and
`apply_setup()` then performs SETUP_STEPS online over ldapi:// exactly as the README says
(the test of the README). The service accounts, which the shipped LDIF leaves locked, get
random passwords (`service_accounts`) over ldapi://, as `milter-wkd directory passwords`
sets them.

`start()` runs `slapd -F workdir/slapd.d -h "ldap://127.0.0.1:PORT/ ldapi://SOCKET/"` in the
foreground (`-d 0`, log in workdir/slapd.log) and waits until `ldapwhoami -Y EXTERNAL`
answers. `stop()` ends that one process by pid; `start()` again keeps the data and the
port (fault tests). Nothing outside workdir (and a short socket directory in /tmp when
workdir's path is too long for a unix socket) is touched; the system slapd is never used.

Replication (ldap/README.md, "Replication"): `replication_ldif(role, providers, ...)`
fills ldap/replication/provider.ldif or consumer.ldif for a topology; a Slapd whose
`replication` holds that LDIF applies it as root over ldapi:// right after its first start,
as an administrator would. `Slapd(workdir, seed=False)` loads no entries at all (a new
provider or consumer: replication brings the directory, password hashes included, so it
sets no passwords either); `wait_replicated(servers)` waits until all report the same
contextCSN.

Failures raise `SlapdError` with the tool's output or the log tail.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TypedDict
from urllib.parse import quote

from milter_wkd import files, passwords
from milter_wkd.errors import MilterWkdError
from milter_wkd.passwords import ssha

SYSTEM_SCHEMA_DIR = Path("/etc/ldap/schema")
SYSTEM_SCHEMAS = ("core", "cosine", "nis", "inetorgperson", "misc")
MODULE_PATH = Path("/usr/lib/ldap")
# ldap/README.md's steps: (tool, file below ldap/). ldapadd adds entries, ldapmodify
# applies changes; both as root over ldapi:// with SASL EXTERNAL.
SETUP_STEPS = (
    ("ldapadd", "schema/gnupg-keyserver.ldif"),
    ("ldapadd", "schema/milter-wkd.ldif"),
    ("ldapmodify", "config/10-modules.ldif"),
    ("ldapmodify", "config/20-indexes.ldif"),
    ("ldapmodify", "config/30-access.ldif"),
    ("ldapadd", "config/40-overlays.ldif"),
    ("ldapadd", "milter-wkd-entries.ldif"),
)
PEERCRED_ROOT = "gidNumber=0+uidNumber=0,cn=peercred,cn=external,cn=auth"
_SOCKET_PATH_MAX = 100  # sun_path holds 108 octets


class SlapdError(MilterWkdError):
    """The private slapd could not be built, started or stopped."""


class UserInfo(TypedDict):
    address: str
    password: str
    dn: str


class AccountInfo(TypedDict):
    dn: str
    password: str


def _free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port != 443:
            return port


def _binary(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SlapdError(f"{name} is not installed (Debian packages slapd, ldap-utils)")


class Slapd:
    """One private slapd with the example.org directory of ldap/example-dit.ldif."""

    suffix = "dc=example,dc=org"
    admin_dn = "cn=admin,dc=example,dc=org"
    admin_password = "admin-secret"  # noqa: S105 (a throwaway test directory)
    people_dn = "ou=people,dc=example,dc=org"
    pending_dn = "ou=wks-pending,dc=example,dc=org"
    claims_dn = "ou=wkd-claims,dc=example,dc=org"
    mail_attributes = ("mail", "mailLocalAddress")
    database_dn = "olcDatabase={1}mdb,cn=config"

    def __init__(self, workdir: Path, port: int | None = None, *,
                 milter_wkd: bool = True, seed: bool = True) -> None:
        self.workdir = Path(workdir)
        self.with_milter_wkd = milter_wkd
        # False: an empty database that replication fills (no entries, no passwords set).
        self.seed = seed
        # ldap/replication/'s LDIF for this server, applied once after its first start.
        self.replication: str | None = None
        self.port = port if port is not None else _free_port()
        self.config_dir = self.workdir / "slapd.d"
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "slapd.log"
        self._socket_dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self.users: dict[str, UserInfo] = {
            name: {"address": f"{name}@example.org", "password": f"{name}-secret",
                   "dn": f"uid={name},{self.people_dn}"}
            for name in ("alice", "bob", "carol")
        }
        # Random, as `milter-wkd directory passwords` makes them (the LDIF ships none).
        self.service_accounts: dict[str, AccountInfo] = {
            name: {"dn": f"cn={name},ou=services,{self.suffix}",
                   "password": passwords.new_password()}
            for name in passwords.SLAPD_ACCOUNTS
        }

    # -- addresses --------------------------------------------------------------------

    @property
    def uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def socket_path(self) -> Path:
        local = self.workdir / "ldapi"
        if len(str(local.resolve())) <= _SOCKET_PATH_MAX:
            return local
        if self._socket_dir is None:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="slapd-"))
        return self._socket_dir / "ldapi"

    @property
    def ldapi_uri(self) -> str:
        return "ldapi://" + quote(str(self.socket_path.resolve()), safe="")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process is not None else None

    # -- building ---------------------------------------------------------------------

    def _base_config(self) -> str:
        schemas = "\n".join(
            (SYSTEM_SCHEMA_DIR / f"{name}.ldif").read_text(encoding="utf-8")
            for name in SYSTEM_SCHEMAS)
        return f"""\
dn: cn=config
objectClass: olcGlobal
cn: config
olcLogLevel: none

dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: {MODULE_PATH}
olcModuleLoad: {{0}}back_mdb

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

{schemas}

dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend
olcAccess: {{0}}to * by dn.exact={PEERCRED_ROOT} manage by * break
olcAccess: {{1}}to dn.exact="" by * read
olcAccess: {{2}}to dn.base="cn=Subschema" by * read
olcSizeLimit: 500

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: {{0}}to * by dn.exact={PEERCRED_ROOT} manage by * break

dn: {self.database_dn}
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcDbDirectory: {self.data_dir}
olcSuffix: {self.suffix}
olcRootDN: {self.admin_dn}
olcRootPW: {ssha(self.admin_password)}
olcDbIndex: objectClass eq
olcDbMaxSize: 1073741824
olcLastMod: TRUE
olcAccess: {{0}}to attrs=userPassword by self write by anonymous auth by * none
olcAccess: {{1}}to * by * read
"""

    def _tool(self, *args: str, stdin: str | None = None) -> None:
        proc = subprocess.run(list(args), input=stdin.encode() if stdin else None,
                              capture_output=True, timeout=60, check=False)
        if proc.returncode != 0:
            raise SlapdError(f"{' '.join(args[:4])} failed ({proc.returncode}):\n"
                             f"{proc.stderr.decode(errors='replace')[-2000:]}")

    def build(self) -> None:
        """Create cn=config and the example directory in workdir (offline)."""
        if self.config_dir.exists():
            raise SlapdError(f"{self.config_dir} exists already")
        self.config_dir.mkdir(parents=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        slapadd, slapmodify = _binary("slapadd"), _binary("slapmodify")
        config = ("-n0", "-F", str(self.config_dir))
        base = self.workdir / "base-config.ldif"
        base.write_text(self._base_config(), encoding="utf-8")
        self._tool(slapadd, *config, "-l", str(base))
        entries: list[Path] = []
        if self.with_milter_wkd:
            for tool, name in SETUP_STEPS:
                path = files.path("ldap") / name
                if name.startswith(("schema/", "config/")):
                    offline = slapadd if tool == "ldapadd" else slapmodify
                    self._tool(offline, *config, "-l", str(path))
                else:
                    entries.append(path)
        if not self.seed:
            return
        for path in (files.path("ldap") / "example-dit.ldif", *entries):
            self._tool(slapadd, "-n1", "-F", str(self.config_dir), "-l", str(path))

    def apply_setup(self) -> None:
        """Perform ldap/README.md's SETUP_STEPS online, as root over ldapi://, then give
        the service accounts their passwords (step 6's `milter-wkd directory passwords`)."""
        for tool, name in SETUP_STEPS:
            self._tool(_binary(tool), "-H", self.ldapi_uri, "-Y", "EXTERNAL", "-Q",
                       "-f", str(files.path("ldap") / name))
        self.set_service_passwords()

    def set_service_passwords(self) -> None:
        """Set service_accounts' passwords in the running slapd (as root over ldapi://)."""
        self.ldapmodify(passwords.password_ldif(
            {info["dn"]: info["password"] for info in self.service_accounts.values()}))

    # -- running ----------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> None:
        """Build (first time only), start slapd and wait until it answers."""
        if self.running:
            return
        fresh = not self.config_dir.exists()
        if fresh:
            self.build()
        socket_path = self.socket_path
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        log = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(
                [_binary("slapd"), "-d", "0", "-F", str(self.config_dir),
                 "-h", f"{self.uri}/ {self.ldapi_uri}/"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._process.poll() is not None:
                self._process = None
                raise SlapdError(f"slapd exited at start:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise SlapdError(f"slapd did not answer within {timeout:.0f} s:\n"
                                 f"{self._log_tail()}")
            time.sleep(0.02)
        if fresh and self.with_milter_wkd and self.seed:
            self.set_service_passwords()
        if fresh and self.replication is not None:
            self.ldapmodify(self.replication)

    def _answers(self) -> bool:
        if not self.socket_path.exists():
            return False
        proc = subprocess.run(
            [_binary("ldapwhoami"), "-H", self.ldapi_uri, "-Y", "EXTERNAL", "-Q"],
            capture_output=True, timeout=5, check=False)
        return proc.returncode == 0

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the slapd this object started (by its pid); keeps the data."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, sig)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                continue
            return
        raise SlapdError(f"slapd (pid {process.pid}) survived SIGKILL")

    def close(self) -> None:
        """Stop slapd and remove the socket directory made outside workdir, if any."""
        self.stop()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- administration as root over ldapi:// ---------------------------------------

    def ldapmodify(self, ldif: str, *, add: bool = False) -> None:
        """Apply an LDIF as root over ldapi:// (SASL EXTERNAL), like an administrator."""
        args = [_binary("ldapmodify"), "-H", self.ldapi_uri, "-Y", "EXTERNAL", "-Q"]
        if add:
            args.append("-a")
        self._tool(*args, stdin=ldif)

    def context_csn(self) -> list[str]:
        """The suffix's contextCSN values (one per server id that wrote), as root."""
        proc = subprocess.run(
            [_binary("ldapsearch"), "-H", self.ldapi_uri, "-Y", "EXTERNAL", "-Q", "-LLL",
             "-o", "ldif-wrap=no", "-s", "base", "-b", self.suffix, "contextCSN"],
            capture_output=True, timeout=10, check=False)
        if proc.returncode == 32:  # noSuchObject: replication has not brought it yet
            return []
        if proc.returncode != 0:
            raise SlapdError(f"ldapsearch contextCSN failed ({proc.returncode}):\n"
                             f"{proc.stderr.decode(errors='replace')[-2000:]}")
        return sorted(line.split(":", 1)[1].strip() for line in proc.stdout.decode().splitlines()
                      if line.lower().startswith("contextcsn:"))

    def __enter__(self) -> Slapd:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# -- replication (ldap/replication/, ldap/README.md "Replication") ------------------------

REPLICATION_ROLES = ("provider", "consumer")
_PER_PROVIDER = ("@SERVER_ID@", "@RID@")
_PLACEHOLDER = re.compile(r"@[A-Z_]+@")


def replication_ldif(role: str, providers: Sequence[str], *, suffix: str,
                     replicator_dn: str, replicator_password: str) -> str:
    """ldap/replication/<role>.ldif with its placeholders filled: a value holding
    @SERVER_ID@ or @RID@ is written once per provider URI (server id and rid 1, 2, ... in
    the order given), the others once; @UPDATE_REF@ is the first provider."""
    if role not in REPLICATION_ROLES:
        raise SlapdError(f"no replication role {role!r}")
    if not providers:
        raise SlapdError("replication needs at least one provider")
    template = (files.path("ldap") / "replication" / f"{role}.ldif").read_text(encoding="utf-8")
    # Unfold LDIF continuation lines and drop comments: one logical line per value.
    logical: list[str] = []
    for line in template.splitlines():
        if line.startswith("#"):
            continue
        if line.startswith(" ") and logical:
            logical[-1] += line[1:]
        else:
            logical.append(line)
    common = {"@SUFFIX@": suffix, "@REPLICATOR_DN@": replicator_dn,
              "@REPLICATOR_PASSWORD@": replicator_password, "@UPDATE_REF@": providers[0]}
    out: list[str] = []
    for line in logical:
        copies = ([{"@SERVER_ID@": str(number), "@RID@": f"{number:03d}",
                    "@PROVIDER_URI@": uri} for number, uri in enumerate(providers, 1)]
                  if any(mark in line for mark in _PER_PROVIDER) else [{}])
        for values in copies:
            filled = line
            for mark, value in {**values, **common}.items():
                filled = filled.replace(mark, value)
            leftover = _PLACEHOLDER.search(filled)
            if leftover:
                raise SlapdError(f"{role}.ldif: placeholder {leftover[0]} left unfilled")
            out.append(filled)
    return "\n".join(out) + "\n"


def provider_url(server: Slapd) -> str:
    """The URL a provider is known by: exactly as its slapd's -h lists it."""
    return f"{server.uri}/"


def wait_replicated(servers: Sequence[Slapd], timeout: float = 30.0) -> float:
    """Wait until every server reports the same non-empty contextCSN; seconds it took."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        seen = [server.context_csn() for server in servers]
        if seen[0] and all(csn == seen[0] for csn in seen):
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise SlapdError("replication did not converge within "
                             f"{timeout:.0f} s: contextCSN per server {seen}")
        time.sleep(0.05)
