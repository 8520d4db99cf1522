"""A private GnuPG home for tests: real gpg 2.2, batch mode, no passphrases.

    with GnuPG(tmp_path / "alice") as gpg:
        fpr = gpg.generate("Alice <alice@example.org>")
        key = gpg.export(fpr)
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import TracebackType

from tests.support.peers import require_binary

WKS_CLIENT = "/usr/lib/gnupg/gpg-wks-client"


class GnuPG:
    def __init__(self, home: Path) -> None:
        self.gpg = require_binary("gpg")
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.home.chmod(0o700)
        self.env = {**os.environ, "GNUPGHOME": str(self.home), "LC_ALL": "C"}
        (self.home / "gpg.conf").write_text("no-auto-check-trustdb\n")

    def run(self, *args: str, input: bytes | None = None, check: bool = True,
            binary: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        cmd = [binary or self.gpg]
        if binary is None:
            cmd += ["--batch", "--yes", "--pinentry-mode", "loopback", "--passphrase", ""]
        proc = subprocess.run([*cmd, *args], input=input, capture_output=True, env=self.env,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{cmd[0]} {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stderr.decode(errors='replace')}")
        return proc

    def generate(self, user_id: str, algo: str = "ed25519", usage: str = "cert",
                 expire: str = "1y", subkey: str | None = "cv25519") -> str:
        """Generate a key (primary + optional encryption subkey); returns its fingerprint."""
        self.run("--quick-gen-key", user_id, algo, usage, expire)
        fpr = self.fingerprint(user_id)
        if subkey:
            self.run("--quick-add-key", fpr, subkey, "encr", expire)
        return fpr

    def fingerprint(self, query: str) -> str:
        out = self.run("--with-colons", "--list-keys", query).stdout.decode()
        for line in out.splitlines():
            if line.startswith("fpr:"):
                return line.split(":")[9]
        raise AssertionError(f"no key for {query}")

    def export(self, fpr: str, *options: str) -> bytes:
        return self.run("--export", *options, fpr).stdout

    def import_key(self, data: bytes, *options: str) -> subprocess.CompletedProcess[bytes]:
        return self.run("--import", *options, input=data)

    def colons(self, *args: str) -> list[list[str]]:
        out = self.run("--with-colons", "--fixed-list-mode", *args).stdout.decode()
        return [line.split(":") for line in out.splitlines()]

    def close(self) -> None:
        subprocess.run(["gpgconf", "--kill", "all"], env=self.env, capture_output=True,
                       check=False)

    def __enter__(self) -> GnuPG:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
