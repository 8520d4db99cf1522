"""The milter as a sandbox daemon: `milter-wkd milter --config <sandbox config>` in its own
session, on a unix socket below the sandbox directory, ready when the socket accepts and
has its [milter] socket_group (the sandbox runs it as root: until the group is set,
Postfix's smtpd would be refused).

Failure: SandboxError with the milter's log tail.
"""

from __future__ import annotations

import grp
import os
import socket
import subprocess
import sys
from pathlib import Path

from milter_wkd import config as config_mod
from milter_wkd.sandbox.daemons import SandboxError, log_tail, read_pid, terminate, wait_until

# The process name the kernel reports for `python -m milter_wkd` (argv[0] of the venv).
PROCESS_NAME = Path(sys.executable).name[:15]


class MilterDaemon:
    def __init__(self, workdir: Path, config_path: Path) -> None:
        self.dir = Path(workdir)
        self.config_path = config_path
        self.socket_path = self.dir / "milter.sock"
        self.log = self.dir / "milter.log"
        self.pid_file = self.dir / "milter.pid"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_spec(self) -> str:
        return f"unix:{self.socket_path}"

    @property
    def pid(self) -> int | None:
        return read_pid(self.pid_file)

    def _answers(self, group: str) -> bool:
        try:
            if group and os.stat(self.socket_path).st_gid != grp.getgrnam(group).gr_gid:
                return False
        except (OSError, KeyError):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket_path))
            except OSError:
                return False
        return True

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        with self.log.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "milter_wkd", "-v", "milter", "--config",
                 str(self.config_path), "--socket", self.socket_spec],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        self._proc = proc
        group = config_mod.load(self.config_path).milter.socket_group
        self.pid_file.write_text(f"{proc.pid}\n", encoding="ascii")
        try:
            wait_until(lambda: proc.poll() is None and self._answers(group),
                       f"milter on {self.socket_path}", log=self.log)
        except SandboxError:
            if proc.poll() is not None:
                raise SandboxError(f"the milter exited with {proc.returncode}:\n"
                                   f"{log_tail(self.log)}") from None
            raise

    def stop(self) -> None:
        pid = self.pid
        if pid is not None:
            terminate(pid, PROCESS_NAME)
        if self._proc is not None:
            self._proc.wait(timeout=10)  # reap it (terminate() already waited for the exit)
            self._proc = None
