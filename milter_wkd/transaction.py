"""What the milter knows about one message, collected from the MTA's callbacks.

Plain data: the adapter (`milter`) fills it, the service decides on it. Headers keep their
order and raw values (folding as the MTA sent it, with LF); `raw_message` rebuilds the
message with CRLF line ends for MIME parsing and DKIM.

A body is kept in memory up to the limit `add_body` is given; the rest goes to an unnamed
temporary file (tempfile.TemporaryFile: mode 0600, unlinked at once, so it disappears on
`close` or when the process dies), so that slow or many large bodies do not hold memory
while they arrive. `close` must be called when the message is done or aborted. The files
of all messages together stay within a `SpoolBudget`; a body that does not fit (or that
the disk refuses) is dropped and marked `body_lost`, and the service answers 451 for it.
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass, field
from typing import IO


class SpoolBudget:
    """How many body octets all messages together may keep in temporary files."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        with self._lock:
            if self.used + size > self.limit:
                return False
            self.used += size
            return True

    def give_back(self, size: int) -> None:
        with self._lock:
            self.used = max(0, self.used - size)


UNLIMITED = SpoolBudget(1 << 62)


@dataclass(slots=True)
class Transaction:
    client_ip: str | None = None
    sasl_login: str | None = None
    queue_id: str = "-"
    mail_from: str = ""
    recipients: list[str] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    collect_body: bool = False
    oversize: bool = False
    spill: IO[bytes] | None = None
    body_size: int = 0
    body_lost: bool = False  # the spool was full or the disk refused: not all of it is here
    spilled: int = 0
    budget: SpoolBudget = field(default=UNLIMITED, repr=False)

    def add_body(self, chunk: bytes, memory_limit: int, budget: SpoolBudget = UNLIMITED,
                 ) -> None:
        """Append a body chunk: in memory up to memory_limit octets, then to the file
        (within budget; else, or when the disk refuses, the body is dropped: body_lost)."""
        if self.body_lost:
            return
        try:
            if self.spill is None and len(self.body) + len(chunk) > memory_limit:
                # Closed by close(), which the milter calls at end of message, abort, quit.
                self.spill = tempfile.TemporaryFile(prefix="milter-wkd-body-")  # noqa: SIM115
                self.budget = budget
            if self.spill is not None:
                self._spill(self.spill, chunk)
            else:
                self.body += chunk
        except OSError:
            self.drop_body()
            self.body_lost = True
            raise
        self.body_size += len(chunk)

    def _spill(self, spill: IO[bytes], chunk: bytes) -> None:
        if not self.budget.take(len(chunk)):
            raise OSError("the spool budget for message bodies is used up")
        self.spilled += len(chunk)
        spill.write(chunk)

    def drop_body(self) -> None:
        self.body.clear()
        self.body_size = 0
        self.close()

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()
            self.spill = None
        if self.spilled:
            self.budget.give_back(self.spilled)
            self.spilled = 0

    def header_values(self, name: str) -> list[str]:
        lowered = name.lower()
        return [value for key, value in self.headers if key.lower() == lowered]

    def header_block(self) -> bytes:
        lines = []
        for name, value in self.headers:
            folded = value.replace("\r\n", "\n").replace("\n", "\r\n")
            lines.append(f"{name}: {folded}\r\n".encode("utf-8", "surrogateescape"))
        return b"".join(lines)

    def raw_message(self, extra_headers: list[tuple[str, str]] | None = None) -> bytes:
        """The message (with extra_headers after the others); the spilled part is read
        back here, so the caller holds the body in memory only while it uses the result."""
        head = self.header_block()
        if extra_headers:
            head += Transaction(headers=extra_headers).header_block()
        if self.spill is None:
            # One copy of the body (a submission can be tens of megabytes), not two.
            return b"".join((head, b"\r\n", self.body))
        self.spill.seek(0)
        return b"".join((head, b"\r\n", self.body, self.spill.read()))
