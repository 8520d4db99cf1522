"""What every sandbox daemon needs: free loopback ports, templates, readiness, stopping by pid.

Templates are the shipped snippets in postfix/ and dovecot/ with `@NAME@` placeholders
(comment lines are left alone); `render` refuses a template with a placeholder it has no
value for, or a value that no placeholder uses, so the shipped files and the sandbox
cannot silently disagree.
Readiness is checked by talking to the service (an SMTP/LMTP `220` banner, an IMAP
`* OK`), never by sleeping. Stopping goes by pid and checks /proc first, so a pid that
has died (or been reused by another program) is left alone. Failures raise
`SandboxError` with the daemon's own log tail when there is one.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from milter_wkd import files
from milter_wkd.errors import MilterWkdError

LOOPBACK = "127.0.0.1"
PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")


class SandboxError(MilterWkdError):
    """A sandbox daemon could not be set up, started or stopped; the reason says which."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now (never 443)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((LOOPBACK, 0))
            port: int = probe.getsockname()[1]
        if port != 443:
            return port


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def template_path(kind: str, name: str) -> Path:
    """A shipped snippet, e.g. template_path("postfix", "main.cf")."""
    path = files.path(kind) / name
    if not path.is_file():
        raise SandboxError(f"shipped snippet {path} is missing")
    return path


def render(template: Path, values: Mapping[str, str]) -> str:
    """The template with every @NAME@ replaced; unknown or unused names are errors.

    Comment lines (first non-blank character '#') are documentation and stay as written.
    """
    lines = template.read_text(encoding="utf-8").splitlines(keepends=True)
    live = [i for i, line in enumerate(lines) if not line.lstrip().startswith("#")]
    wanted = {name for i in live for name in PLACEHOLDER.findall(lines[i])}
    missing = wanted - set(values)
    unused = set(values) - wanted
    if missing or unused:
        raise SandboxError(
            f"{template}: placeholders without value {sorted(missing)}, "
            f"values without placeholder {sorted(unused)}")
    for i in live:
        lines[i] = PLACEHOLDER.sub(lambda m: values[m.group(1)], lines[i])
    return "".join(lines)


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(check: Callable[[], bool], what: str, timeout: float = 15.0,
               log: Path | None = None) -> None:
    """Poll check() until it is true; SandboxError naming `what` (and the log) otherwise."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            detail = f"\n{log_tail(log)}" if log is not None else ""
            raise SandboxError(f"{what} did not come up within {timeout:.0f} s{detail}")
        time.sleep(0.05)


def greeting(host: str, port: int, timeout: float = 2.0) -> str:
    """The first line a TCP service sends (an SMTP banner, an IMAP greeting); '' if none."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            data = b""
            while b"\n" not in data and len(data) < 4096:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return ""
    return data.split(b"\n", 1)[0].decode("ascii", errors="replace").strip()


def answers(host: str, port: int, prefix: str) -> Callable[[], bool]:
    """A readiness check: the service on host:port greets with `prefix` (e.g. '220 ')."""
    return lambda: greeting(host, port).startswith(prefix)


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


def process_name(pid: int) -> str | None:
    """The command name of a live process; None when gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    name, _, rest = stat.partition("(")[2].rpartition(")")
    del _
    if rest.split()[:1] == ["Z"]:
        return None
    return name


def alive(pid: int, expected_name: str | None = None, within: Path | None = None) -> bool:
    """The pid is a live process (whose command name starts with expected_name, and which
    belongs to the directory `within`: named on its command line or working below it)."""
    name = process_name(pid)
    if name is None or (expected_name is not None and not name.startswith(expected_name)):
        return False
    return within is None or belongs_to(pid, within)


def belongs_to(pid: int, directory: Path) -> bool:
    """slapd and dovecot name their config under directory; Postfix's master works there."""
    try:
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    prefix = os.fsencode(directory) + b"/"
    return (any(prefix in arg for arg in command_line)
            or cwd == directory or directory in cwd.parents)


def terminate(pid: int, expected_name: str, within: Path | None = None,
              timeout: float = 10.0) -> bool:
    """Stop one daemon by pid: TERM, then KILL. False if it was not running (or not ours:
    another command name, or a pid reused outside `within`)."""
    if not alive(pid, expected_name, within):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while alive(pid, expected_name):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            return True
    raise SandboxError(f"{expected_name} (pid {pid}) survived SIGKILL")


def stop_server(process: subprocess.Popen[bytes] | None, pid_file: Path, expected_name: str,
                workdir: Path, timeout: float = 10.0) -> None:
    """Stop a server a sandbox object started: its own child (TERM, then KILL), or, when
    another process started it (`sandbox up`), the pid in its pid file, if that is still
    a `expected_name` inside `workdir`."""
    if process is None:
        pid = read_pid(pid_file)
        if pid is not None:
            terminate(pid, expected_name, workdir, timeout)
        return
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)
