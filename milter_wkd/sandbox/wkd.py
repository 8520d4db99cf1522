"""The sandbox's WKD responder: a test CA, a certificate for the domain and its openpgpkey
host, and `milter-wkd web` (granian over HTTPS) reading the sandbox's slapd.

    responder = WkdResponder(workdir, slapd)       # port 443 if free, else a free port
    responder.start()                               # waits until the policy file answers
    responder.ca_file, responder.wkd_url, responder.port
    responder.stop()

Everything lives in workdir: ca.pem (the test CA, to bind-mount over the system bundle
inside a mount namespace), wkd.crt/wkd.key (the server's chain and PKCS#8 key),
milter-wkd.toml, wkd.password (0600), web.log, web.pid (the server's pid, command name
PROCESS_NAME). The responder binds as the read-only cn=wkd service account ([web] bind_dn,
its password from slapd.service_accounts).
Real WKD clients only ever use port 443; on another port only HTTP tools that take a port
(curl --resolve, wrk) reach it. Stopping goes by the pid this object started.
Failures raise `SandboxError` with the log tail.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import http.client
import os
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from milter_wkd.sandbox.daemons import (
    LOOPBACK,
    SandboxError,
    alive,
    free_port,
    log_tail,
    port_is_free,
    read_pid,
    stop_server,
    wait_until,
)
from milter_wkd.sandbox.slapd import AccountInfo

WKD_PORT = 443
# The command name of `milter-wkd web` (a Python interpreter), for stopping it by pid.
PROCESS_NAME = Path(sys.executable).name[:15]


class DirectoryPeer(Protocol):
    """What the responder needs of the sandbox's slapd (milter_wkd.sandbox.slapd.Slapd)."""

    @property
    def uri(self) -> str: ...

    suffix: str

    @property
    def service_accounts(self) -> Mapping[str, AccountInfo]: ...


# granian binds with SO_REUSEPORT, so two responders on 127.0.0.1:443 would BOTH succeed
# and split the connections between them. Whoever serves 443 holds this lock (flock) for
# as long as its server runs: the server process inherits the locked descriptor, so the
# claim outlives a `sandbox up` parent and ends with the server.
PORT_LOCK = Path(tempfile.gettempdir()) / "milter-wkd-wkd-443.lock"


def claim_port_443() -> int | None:
    """A locked descriptor if 127.0.0.1:443 is ours to serve, else None."""
    fd = os.open(PORT_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    if not port_443_free():  # someone else's server
        os.close(fd)
        return None
    return fd


def port_443_free() -> bool:
    return port_is_free(LOOPBACK, WKD_PORT)


def make_test_pki(workdir: Path, names: list[str]) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for `names`; returns (ca, cert, key) paths."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "milter-wkd sandbox test CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = workdir / "ca.pem", workdir / "wkd.crt", workdir / "wkd.key"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                          + ca_cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return ca_path, cert_path, key_path


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class WkdResponder:
    """`milter-wkd web` for the sandbox's example.org, reading `slapd` as cn=wkd."""

    domain = "example.org"
    submission_address = "key-submission@example.org"

    def __init__(self, workdir: Path, slapd: DirectoryPeer, port: int | None = None, *,
                 submission_public_key: Path | None = None, workers: int = 1,
                 threads: int | None = None, refresh_interval: float = 0.1,
                 tls: bool = True, fallback_uris: Sequence[str] = ()) -> None:
        """fallback_uris: other replicas the responder fails over to, in order, when
        `slapd` does not answer (its [directory] uri lists them after slapd's)."""
        self.workdir = Path(workdir)
        self.slapd = slapd
        self.fallback_uris = tuple(fallback_uris)
        self._port_lock = claim_port_443() if port is None else None
        self.port = port if port is not None else (
            WKD_PORT if self._port_lock is not None else free_port())
        self.submission_public_key = submission_public_key
        self.workers = workers
        self.threads = threads  # None: the config's default
        self.refresh_interval = refresh_interval
        self.tls = tls  # False: plain HTTP, as behind a reverse proxy (docs/nginx-wkd.conf)
        self.config_path = self.workdir / "milter-wkd.toml"
        self.log_path = self.workdir / "web.log"
        self.pid_file = self.workdir / "web.pid"
        self.ca_file = self.workdir / "ca.pem"
        self.password_file = self.workdir / "wkd.password"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bind_dn(self) -> str:
        return self.slapd.service_accounts["wkd"]["dn"]

    @property
    def hosts(self) -> list[str]:
        return [self.domain, f"openpgpkey.{self.domain}"]

    @property
    def wkd_url(self) -> str:
        """Base URL of the advanced method (the port only when it is not 443)."""
        port = "" if self.port == WKD_PORT else f":{self.port}"
        return f"https://openpgpkey.{self.domain}{port}/.well-known/openpgpkey/{self.domain}/"

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs (from this object, else from its pid file)."""
        if self._process is not None:
            return self._process.pid if self._process.poll() is None else None
        pid = read_pid(self.pid_file)
        return pid if pid is not None and alive(pid, PROCESS_NAME) else None

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        _ca, cert, key = make_test_pki(self.workdir, self.hosts)
        cert_file, key_file = (str(cert), str(key)) if self.tls else ("", "")
        public_key = self.submission_public_key or self.workdir / "submission.pub"
        with contextlib.suppress(FileNotFoundError):
            self.password_file.unlink()
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as password:
            password.write(self.slapd.service_accounts["wkd"]["password"] + "\n")
        # As README's Deployment says: [directory] is the milter's; the responder binds as
        # the read-only cn=wkd of [web] (here [directory] names no account at all).
        self.config_path.write_text(f"""\
[directory]
uri = {_toml_string(" ".join((self.slapd.uri, *self.fallback_uris)))}
base_dn = {_toml_string(self.slapd.suffix)}

[web]
bind_dn = {_toml_string(self.bind_dn)}
bind_password_file = {_toml_string(str(self.password_file))}
listen_address = "{LOOPBACK}"
port = {self.port}
cert_file = {_toml_string(cert_file)}
key_file = {_toml_string(key_file)}
workers = {self.workers}
{"" if self.threads is None else f"threads = {self.threads}"}
refresh_interval = {self.refresh_interval}

[[domains]]
name = "{self.domain}"
submission_address = "{self.submission_address}"
submission_public_key = {_toml_string(str(public_key))}
""", encoding="utf-8")

    def start(self, timeout: float = 20.0) -> None:
        if self.pid is not None:
            return
        if not self.config_path.exists():
            self.write_config()
        log = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c",
                 "import sys; from milter_wkd.cli import main; sys.exit(main(sys.argv[1:]))",
                 "-v", "web", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=() if self._port_lock is None else (self._port_lock,))
        finally:
            log.close()
        self.pid_file.write_text(f"{self._process.pid}\n", encoding="ascii")
        try:
            wait_until(self._answers, f"WKD responder on port {self.port}", timeout,
                       self.log_path)
        except SandboxError:
            self.stop()
            raise

    def get(self, path: str, host: str | None = None, method: str = "GET",
            ) -> tuple[int, dict[str, str], bytes]:
        """One request to the responder (HTTPS: its certificate checked against the test CA)."""
        host = host or f"openpgpkey.{self.domain}"
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
        if self.tls:
            # Connect to loopback, but verify (and send SNI and Host for) the WKD host name.
            context = ssl.create_default_context(cafile=str(self.ca_file))
            conn.sock = context.wrap_socket(
                socket.create_connection((LOOPBACK, self.port), timeout=10),
                server_hostname=host)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host)
            conn.endheaders()
            response = conn.getresponse()
            body = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, body
        finally:
            conn.close()

    def _answers(self) -> bool:
        if self._process is None or self._process.poll() is not None:
            raise SandboxError(f"milter-wkd web exited:\n{log_tail(self.log_path)}")
        try:
            status, _, _ = self.get(f"/.well-known/openpgpkey/{self.domain}/policy")
        except (OSError, http.client.HTTPException):
            return False
        return status == 200

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server this object started (its own process group: granian's workers)."""
        process, self._process = self._process, None
        if self._port_lock is not None:  # the server's inherited copy holds it till it ends
            os.close(self._port_lock)
            self._port_lock = None
        stop_server(process, self.pid_file, PROCESS_NAME, self.workdir, timeout)

    def log_tail(self) -> str:
        return log_tail(self.log_path)

    def __enter__(self) -> WkdResponder:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with contextlib.suppress(SandboxError):
            self.stop()
