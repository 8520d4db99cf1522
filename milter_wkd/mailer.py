"""Sending the mail milter-wkd generates (WKS confirmation requests and notices).

Reads [mailer] of the config. Methods:
- smtp: to a reinjection smtpd on loopback that runs NO milters, so our own mail cannot loop
  back through us (postfix/master.cf.snippet shows it);
- sendmail: the sendmail binary with -i -f. Postfix's non_smtpd_milters show that mail to
  the milter again, which treats it like any mail not for a submission address (nothing
  checks its envelope sender); it cannot loop, because the milter answers only mail to a
  submission address and sends only to users' addresses;
- folder: one .eml file per message in the folder `directory` names, for tests and dry
  runs ("directory", the method's earlier name, is accepted too).
Errors: every failure to hand the message over raises `MailerUnavailable`, an `Unavailable`
(temporary: the milter answers 451 so the submitting client retries and nothing is lost; a
command exits 75). A [mailer] section that names no usable method raises `ConfigError`.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import uuid
from pathlib import Path
from typing import Protocol

from milter_wkd.config import ConfigError, MailerConfig
from milter_wkd.errors import Unavailable

# [mailer] method values of FolderMailer: its name, and the name it had before.
FOLDER_METHODS = ("folder", "directory")


class MailerUnavailable(Unavailable):
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


class FolderMailer:
    """Writes each message to <folder>/<random>.eml, the envelope in X-Envelope-From and
    X-Envelope-To lines on top (written to a .tmp file first, then renamed)."""

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
    if cfg.method in FOLDER_METHODS:
        if not cfg.directory:
            raise ConfigError(f"[mailer] method {cfg.method} needs directory = <folder>")
        return FolderMailer(Path(cfg.directory))
    raise ConfigError(f"[mailer] method must be smtp, sendmail or folder, not {cfg.method!r}")
