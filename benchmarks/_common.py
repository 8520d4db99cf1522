"""Shared by benchmarks/wks.py and benchmarks/milter.py: many users' keys in one GnuPG home,
their LDAP entries, and a child process that is stopped by its pid.

Keys are made by one `gpg --batch --gen-key` run (ed25519 primary, cv25519 encryption
subkey, one user ID per key), so that 200 users take a second, not minutes. All secret
keys share that home: it stands for the users' own homes (gpg-wks-client finds each user's
key by fingerprint, as it would in that user's home).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from milter_wkd.sandbox.slapd import ssha

WKS_CLIENT = "/usr/lib/gnupg/gpg-wks-client"
SUBMISSION = "key-submission@example.org"
PEOPLE_DN = "ou=people,dc=example,dc=org"


def address(index: int) -> str:
    return f"user{index}@example.org"


def password(index: int) -> str:
    return f"user{index}-secret"


def users_ldif(indices: range) -> str:
    """inetOrgPerson entries uid=userI with mail userI@example.org and an {SSHA} password."""
    return "".join(
        f"dn: uid=user{i},{PEOPLE_DN}\nobjectClass: inetOrgPerson\nuid: user{i}\n"
        f"cn: User {i}\nsn: {i}\nmail: {address(i)}\nuserPassword: {ssha(password(i))}\n\n"
        for i in indices)


class KeyRing:
    """A private GnuPG home (mode 700) holding the keys of many users."""

    def __init__(self, home: Path) -> None:
        self.home = home
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        (home / "gpg.conf").write_text("no-auto-check-trustdb\n", encoding="ascii")
        self.env = {**os.environ, "GNUPGHOME": str(home), "LC_ALL": "C"}

    def run(self, *args: str, input: bytes | None = None,
            binary: str = "gpg") -> bytes:
        cmd = [binary, *args]
        if binary == "gpg":
            cmd[1:1] = ["--batch", "--yes", "--pinentry-mode", "loopback", "--passphrase", ""]
        proc = subprocess.run(cmd, input=input, capture_output=True, env=self.env,
                              timeout=120, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                               f"{proc.stderr.decode(errors='replace')[-2000:]}")
        return proc.stdout

    def generate(self, addresses: list[str]) -> dict[str, str]:
        """One key per address, all in one gpg run; address -> fingerprint."""
        block = ("%no-protection\nKey-Type: eddsa\nKey-Curve: ed25519\nKey-Usage: sign\n"
                 "Subkey-Type: ecdh\nSubkey-Curve: cv25519\nSubkey-Usage: encrypt\n"
                 "Name-Real: {name}\nName-Email: {addr}\nExpire-Date: 2y\n%commit\n")
        params = "".join(block.format(name=a.split("@")[0].title(), addr=a) for a in addresses)
        self.run("--gen-key", input=params.encode())
        found: dict[str, str] = {}
        fpr = ""
        out = self.run("--with-colons", "--list-secret-keys").decode()
        for line in out.splitlines():
            fields = line.split(":")
            if fields[0] == "sec":
                fpr = ""
            elif fields[0] == "fpr" and not fpr:
                fpr = fields[9]
            elif fields[0] == "uid" and fpr:
                found[fields[9].rsplit("<", 1)[-1].rstrip(">")] = fpr
        missing = [a for a in addresses if a not in found]
        if missing:
            raise RuntimeError(f"gpg made no key for {missing[:3]}")
        return found

    def close(self) -> None:
        subprocess.run(["gpgconf", "--kill", "all"], env=self.env, capture_output=True,
                       check=False, timeout=30)


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a child we started, by its pid: TERM, then KILL; always reaped."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:8.1f}/s  ({count} in {seconds:.2f} s)"


def clock() -> float:
    return time.perf_counter()
