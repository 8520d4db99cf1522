"""The sandbox's self-service page: `milter-wkd portal` (granian over HTTPS) on a free
loopback port, for the host name keys.example.org, writing through the sandbox's slapd as
the milter's account.

    portal = PortalDaemon(workdir, config_path)   # config_path: the sandbox's milter-wkd.toml
    portal.section()                              # its [portal] section, for that file
    portal.start()                                # launch(), then wait() until /sign-in answers
    portal.portal_url, portal.ca_file, portal.port
    portal.stop()

The portal reads the sandbox's own config file (its [directory] is the milter's write
account, its [[domains]] the publication policy), whose [portal] section this object
writes (`section()`): the listen address, the certificate, the secret key file and the
provider's name. Everything else lives in workdir: ca.pem (a test CA of its own: the
responder's CA key is not kept, see milter_wkd.sandbox.wkd.make_test_pki), portal.crt and
portal.key (for keys.example.org), portal.secret (0600, signs the session cookies),
portal.log and portal.pid (the server's pid, command name PROCESS_NAME).
No DNS name points at it: a browser reaches it with `--host-resolver-rules` (MAP
keys.example.org 127.0.0.1), an HTTP client by connecting to loopback with that SNI and
Host (`get`). `launch()` and `wait()` are separate so that the sandbox can start the
portal while the responder comes up. Failures raise `SandboxError` with the log tail.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from types import TracebackType

from milter_wkd.sandbox.daemons import (
    LOOPBACK,
    SandboxError,
    alive,
    free_port,
    log_tail,
    read_pid,
    stop_server,
    wait_until,
)
from milter_wkd.sandbox.wkd import make_test_pki

# `milter-wkd portal` is a Python interpreter, as `milter-wkd web` is.
PROCESS_NAME = Path(sys.executable).name[:15]
PORTAL_HOST = "keys.example.org"
PROVIDER_NAME = "Example Mail (sandbox)"


class PortalDaemon:
    """`milter-wkd portal --config config_path` on 127.0.0.1:port for PORTAL_HOST."""

    host = PORTAL_HOST

    def __init__(self, workdir: Path, config_path: Path, port: int | None = None, *,
                 provider_name: str = PROVIDER_NAME) -> None:
        self.workdir = Path(workdir)
        self.config_path = Path(config_path)
        self.port = port if port is not None else free_port()
        self.provider_name = provider_name
        self.ca_file = self.workdir / "ca.pem"
        self.cert_file = self.workdir / "portal.crt"
        self.key_file = self.workdir / "portal.key"
        self.secret_file = self.workdir / "portal.secret"
        self.log_path = self.workdir / "portal.log"
        self.pid_file = self.workdir / "portal.pid"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def portal_url(self) -> str:
        return f"https://{self.host}:{self.port}/"

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs (from this object, else from its pid file)."""
        if self._process is not None:
            return self._process.pid if self._process.poll() is None else None
        pid = read_pid(self.pid_file)
        return pid if pid is not None and alive(pid, PROCESS_NAME) else None

    def write_files(self) -> None:
        """The certificate (own test CA) and the session secret; idempotent."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.cert_file.exists():
            _ca, cert, key = make_test_pki(self.workdir, [self.host])
            cert.replace(self.cert_file)
            key.replace(self.key_file)
        if not self.secret_file.exists():
            fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as out:
                out.write(secrets.token_urlsafe(48) + "\n")

    def section(self) -> str:
        """The [portal] section of the sandbox config (writes the files it names)."""
        self.write_files()
        return f"""\
[portal]
# The self-service page (`milter-wkd portal`): {self.portal_url} (keys.example.org is
# loopback only for a browser told so: --host-resolver-rules "MAP {self.host} {LOOPBACK}").
listen = "{LOOPBACK}:{self.port}"
cert_file = {json.dumps(str(self.cert_file))}
key_file = {json.dumps(str(self.key_file))}
secret_key_file = {json.dumps(str(self.secret_file))}
provider_name = {json.dumps(self.provider_name)}
workers = 1
threads = 4
"""

    def launch(self) -> None:
        """Start the server without waiting for it (see wait)."""
        if self.pid is not None:
            return
        self.write_files()
        log = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c",
                 "import sys; from milter_wkd.cli import main; sys.exit(main(sys.argv[1:]))",
                 "-v", "portal", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.workdir)
        finally:
            log.close()
        self.pid_file.write_text(f"{self._process.pid}\n", encoding="ascii")

    def wait(self, timeout: float = 20.0) -> None:
        """Until the sign-in page answers 200; on failure stop it and raise."""
        try:
            wait_until(self._answers, f"self-service page on port {self.port}", timeout,
                       self.log_path)
        except SandboxError:
            self.stop()
            raise

    def start(self, timeout: float = 20.0) -> None:
        if self.pid is None:
            self.launch()
        self.wait(timeout)

    def get(self, path: str, method: str = "GET", body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One request over HTTPS (the certificate checked against ca_file, SNI and Host
        keys.example.org) to loopback."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
        conn.sock = context.wrap_socket(
            socket.create_connection((LOOPBACK, self.port), timeout=10),
            server_hostname=self.host)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", f"{self.host}:{self.port}")
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        finally:
            conn.close()

    def _answers(self) -> bool:
        if self._process is None or self._process.poll() is not None:
            raise SandboxError(f"milter-wkd portal exited:\n{log_tail(self.log_path)}")
        try:
            status, _, _ = self.get("/sign-in")
        except (OSError, http.client.HTTPException):
            return False
        return status == 200

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server this object started (its own process group: granian's workers)."""
        process, self._process = self._process, None
        stop_server(process, self.pid_file, PROCESS_NAME, self.workdir, timeout)

    def log_tail(self) -> str:
        return log_tail(self.log_path)

    def __enter__(self) -> PortalDaemon:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with contextlib.suppress(SandboxError):
            self.stop()
