"""The milter (group milter): the configured milter socket negotiates (SMFIC_OPTNEG
answered by 'O'), as Postfix would open a session.

Configuration: [milter] socket (unix:/path or inet:PORT@HOST); [check] timeout.
Failures: a socket that is missing, refuses, stays silent or answers something else is
one FAIL line.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator
from typing import Any

from milter_wkd.check.options import Options
from milter_wkd.check.results import CheckResult, fail, ok, why
from milter_wkd.config import Config


def milter_negotiates(socket_spec: str, timeout: float) -> str:
    """Connect to a milter (pymilter syntax), offer SMFIC_OPTNEG, return its version text;
    raises OSError or ValueError."""
    kind, _, rest = socket_spec.partition(":")
    family: socket.AddressFamily
    target: Any
    if kind.lower() in ("unix", "local"):
        family, target = socket.AF_UNIX, rest
    elif kind.lower() in ("inet", "inet6") and "@" in rest:
        port, _, host = rest.partition("@")
        family = socket.AF_INET6 if kind.lower() == "inet6" else socket.AF_INET
        target = (host or "127.0.0.1", int(port))
    else:
        raise ValueError(f"unknown milter socket {socket_spec!r} (unix:/path, inet:PORT@HOST)")
    with socket.socket(family, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(target)
        conn.sendall(struct.pack("!IcIII", 13, b"O", 6, 0x1FF, 0x1FFFFF))
        header = _read_exactly(conn, 5)
        length, command = struct.unpack("!Ic", header)
        body = _read_exactly(conn, min(length - 1, 4096)) if length > 1 else b""
        if command != b"O" or len(body) < 4:
            raise ValueError(f"unexpected answer {command!r} to option negotiation")
        with contextlib.suppress(OSError):
            conn.sendall(struct.pack("!Ic", 1, b"Q"))
        return f"milter protocol {struct.unpack('!I', body[:4])[0]}"


def _read_exactly(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise ValueError("the peer closed the connection")
        data += chunk
    return data


def check_milter(config: Config, options: Options) -> Iterator[CheckResult]:
    spec = config.milter.socket
    try:
        version = milter_negotiates(spec, options.timeout)
    except (OSError, ValueError) as exc:
        yield fail("milter", f"{spec} does not answer: {why(exc)}",
                   "start it: milter-wkd milter --config FILE (systemd: milter-wkd.service); "
                   "[milter] socket must be where Postfix looks")
        return
    yield ok("milter", f"{spec} answers ({version})")


