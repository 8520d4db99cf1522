"""Sending the mail milter-wkd generates (WKS confirmation requests and notices).

Reads [mailer] of the config. Methods:
- smtp: to a reinjection smtpd on loopback that runs NO milters, so our own mail cannot loop
  back through us (postfix/master.cf.snippet shows it);
- sendmail: the sendmail binary with -i -f (Postfix's non_smtpd_milters would see it, so the
  milter ignores mail whose envelope sender is a submission address);
- directory: one .eml file per message, for tests and dry runs.
Errors: every failure to hand the message over raises `MailerUnavailable` (temporary: the
caller answers 451 so the submitting client retries and nothing is lost).
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import uuid
from pathlib import Path
from typing import Protocol

from milter_wkd.config import MailerConfig
from milter_wkd.errors import MilterWkdError


class MailerUnavailable(MilterWkdError):
    """The generated message could not be handed to the MTA (temporary)."""


class Mailer(Protocol):
    def send(self, sender: str, recipient: str, message: bytes) -> None: ...


class SmtpMailer:
    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout

    def send(self, sender: str, recipient: str, message: bytes) -> None:
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
                smtp.sendmail(sender, [recipient], message)
        except (OSError, smtplib.SMTPException) as exc:
            raise MailerUnavailable(
                f"reinjection via {self.host}:{self.port} failed: {exc}") from None


class SendmailMailer:
    def __init__(self, binary: str) -> None:
        self.binary = binary

    def send(self, sender: str, recipient: str, message: bytes) -> None:
        try:
            proc = subprocess.run([self.binary, "-i", "-f", sender, "--", recipient],
                                  input=message, capture_output=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MailerUnavailable(f"{self.binary} failed: {exc}") from None
        if proc.returncode != 0:
            raise MailerUnavailable(
                f"{self.binary} exited {proc.returncode}: "
                f"{proc.stderr.decode(errors='replace').strip()[:200]}")


class DirectoryMailer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def send(self, sender: str, recipient: str, message: bytes) -> None:
        name = self.folder / f"{uuid.uuid4().hex}.eml"
        envelope = f"X-Envelope-From: {sender}\r\nX-Envelope-To: {recipient}\r\n".encode()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = name.with_suffix(".tmp")
            tmp.write_bytes(envelope + message)
            os.replace(tmp, name)
        except OSError as exc:
            raise MailerUnavailable(f"cannot write {name}: {exc.strerror}") from None


def from_config(cfg: MailerConfig) -> Mailer:
    if cfg.method == "smtp":
        return SmtpMailer(cfg.smtp_host, cfg.smtp_port)
    if cfg.method == "sendmail":
        return SendmailMailer(cfg.sendmail)
    if cfg.method == "directory":
        if not cfg.directory:
            raise MailerUnavailable("[mailer] method directory needs directory = <folder>")
        return DirectoryMailer(Path(cfg.directory))
    raise MailerUnavailable(f"[mailer] method must be smtp, sendmail or directory, "
                            f"not {cfg.method!r}")
