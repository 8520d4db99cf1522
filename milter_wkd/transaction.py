"""What the milter knows about one message, collected from the MTA's callbacks.

Plain data: the adapter (`milter`) fills it, the service decides on it. Headers keep their
order and raw values (folding as the MTA sent it, with LF); `raw_message` rebuilds the
message with CRLF line ends for MIME parsing and DKIM.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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

    def header_values(self, name: str) -> list[str]:
        lowered = name.lower()
        return [value for key, value in self.headers if key.lower() == lowered]

    def header_block(self) -> bytes:
        lines = []
        for name, value in self.headers:
            folded = value.replace("\r\n", "\n").replace("\n", "\r\n")
            lines.append(f"{name}: {folded}\r\n".encode("utf-8", "surrogateescape"))
        return b"".join(lines)

    def raw_message(self) -> bytes:
        # One copy of the body (a submission can be tens of megabytes), not two.
        return b"".join((self.header_block(), b"\r\n", self.body))
