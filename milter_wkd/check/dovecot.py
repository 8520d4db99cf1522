"""Dovecot (group dovecot): the SASL socket that Postfix uses speaks the Dovecot auth
protocol (client side: VERSION, then the server's MECH lines up to DONE) and offers PLAIN.

Configuration: [check] dovecot_auth_socket; when empty, Postfix's smtpd_sasl_path (with
smtpd_sasl_type = dovecot, relative to queue_directory), else DEFAULT_DOVECOT_SOCKET;
[check] timeout.
Failures: a missing socket, one that speaks another protocol, and one without PLAIN are
FAIL lines.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

from milter_wkd.check.options import Options
from milter_wkd.check.results import CheckResult, fail, ok, why

DEFAULT_DOVECOT_SOCKET = "/var/spool/postfix/private/auth"


def parse_auth_handshake(text: str) -> tuple[str | None, list[str]]:
    """(the VERSION line's major.minor, the MECH names) of a Dovecot auth server handshake."""
    version = None
    mechanisms = []
    for line in text.split("\n"):
        fields = line.split("\t")
        if fields[0] == "VERSION" and len(fields) >= 3:
            version = f"{fields[1]}.{fields[2]}"
        elif fields[0] == "MECH" and len(fields) >= 2:
            mechanisms.append(fields[1].upper())
    return version, mechanisms


def dovecot_handshake(path: str, timeout: float) -> str:
    """Talk the Dovecot auth protocol (client side) on a unix socket; the server's lines."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(path)
        conn.sendall(f"VERSION\t1\t1\nCPID\t{os.getpid()}\n".encode())
        data = b""
        while b"\nDONE\n" not in b"\n" + data and len(data) < 65536:
            try:
                chunk = conn.recv(4096)
            except ConnectionResetError:  # a peer that does not speak the protocol
                break
            if not chunk:
                break
            data += chunk
    return data.decode("utf-8", "replace")


def dovecot_socket(options: Options, params: dict[str, str] | None) -> str:
    if options.dovecot_auth_socket:
        return options.dovecot_auth_socket
    if params and params.get("smtpd_sasl_type") == "dovecot" and params.get("smtpd_sasl_path"):
        path = params["smtpd_sasl_path"]
        if not path.startswith("/") and params.get("queue_directory"):
            path = f"{params['queue_directory'].rstrip('/')}/{path}"
        if path.startswith("/"):
            return path
    return DEFAULT_DOVECOT_SOCKET


def check_dovecot(options: Options, params: dict[str, str] | None) -> Iterator[CheckResult]:
    path = dovecot_socket(options, params)
    fix = ("start Dovecot with the `service auth { unix_listener ... }` of "
           "dovecot/milter-wkd.conf; Postfix's smtpd_sasl_path must name the same socket "
           "(or set [check] dovecot_auth_socket, or pass --dovecot-auth-socket)")
    if not Path(path).exists():
        yield fail("dovecot", f"SASL socket {path} does not exist", fix)
        return
    try:
        text = dovecot_handshake(path, options.timeout)
    except OSError as exc:
        yield fail("dovecot", f"SASL socket {path}: {why(exc)}", fix)
        return
    version, mechanisms = parse_auth_handshake(text)
    if version is None or not version.startswith("1."):
        yield fail("dovecot", f"{path} does not speak the Dovecot auth protocol "
                   f"({text[:60]!r})", fix)
    elif "PLAIN" not in mechanisms:
        yield fail("dovecot", f"{path} offers no PLAIN ({', '.join(mechanisms) or 'nothing'})",
                   "auth_mechanisms = plain login (dovecot/milter-wkd.conf)")
    else:
        yield ok("dovecot", f"SASL socket {path} speaks auth protocol {version} "
                 f"({' '.join(mechanisms)})")


