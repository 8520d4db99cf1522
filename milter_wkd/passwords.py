"""The service accounts' LDAP passwords: made at set-up, never shipped.

ldap/milter-wkd-entries.ldif creates cn=milter, cn=wkd, cn=dovecot and cn=replicator locked
(`userPassword: {CRYPT}!`, which no password matches), so nobody can bind as them until
`milter-wkd directory passwords` has run (cn=replicator: until the administrator sets one
with ldappasswd, ldap/README.md "Replication").
That command (milter_wkd.cli.directory) takes, per account, a new random password
(`new_password`: 32 characters, 192 bits from `secrets`), stores its {SSHA} hash in slapd
as root over ldapi:// (SASL EXTERNAL, like ldap/README.md's other steps) or prints the
same change as LDIF (`password_ldif`) for an LDAP server elsewhere, and writes the
password to a file that is created with mode 0600 and the account's owner before a byte
is written (`PasswordFiles`), so it is never readable by anybody else, not even briefly.
A file replaces an older one by rename only after the directory took the new password.

DOCUMENTED_PASSWORDS are every password this project ever printed (in the LDIF's comment
and in the sandbox): `milter-wkd check` fails if a service account accepts one.

Failures: a refused change or an unreachable directory raise DirectoryError (the files
written so far are removed); an unknown owner or a file that cannot be written raise
Refused/MilterWkdError naming the path.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from milter_wkd.errors import MilterWkdError

# The identity slapds replicate as (ldap/README.md, "Replication") is one of them: locked
# like the others in the shipped LDIF, its password goes into each olcSyncrepl's
# credentials (cn=config, root only).
REPLICATOR = "replicator"
ACCOUNTS = ("milter", "wkd", "dovecot", REPLICATOR)
SLAPD_ACCOUNTS = ACCOUNTS
DOCUMENTED_PASSWORDS = ("milter-secret", "wkd-secret", "dovecot-secret")
# The system user that runs each service and alone reads its password file (root for
# Dovecot: the password goes into dovecot-ldap.conf.ext, which Dovecot reads as root; root
# for the replicator: only the cn=config LDIF an administrator loads needs it).
DEFAULT_OWNERS = {"milter": "milter-wkd", "wkd": "milter-wkd-web", "dovecot": "root",
                  REPLICATOR: "root"}


def new_password() -> str:
    """32 URL-safe characters (192 random bits): no quoting trouble in TOML or Dovecot."""
    return secrets.token_urlsafe(24)


def ssha(password: str) -> str:
    """An RFC 2307 {SSHA} hash, as slappasswd makes it. SHA-1 is fast, but a 192-bit random
    password cannot be guessed from its hash; {SSHA} is what every slapd verifies without
    extra modules."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()  # noqa: S324 (the format)
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


def account_dn(name: str, services_dn: str) -> str:
    return f"cn={name},{services_dn}"


def password_ldif(passwords: Mapping[str, str]) -> str:
    """LDIF that sets each DN's userPassword to the hash of its password (ldapmodify)."""
    return "".join(f"dn: {dn}\nchangetype: modify\nreplace: userPassword\n"
                   f"userPassword: {ssha(password)}\n-\n\n"
                   for dn, password in passwords.items())


def set_in_directory(uri: str, passwords: Mapping[str, str],
                     done: Callable[[str], None] = lambda _dn: None,
                     timeout: float = 10.0) -> None:
    """Replace each DN's userPassword with the hash of its password, bound as root over
    ldapi:// with SASL EXTERNAL (another URI: anonymous, which the ACLs refuse); `done(dn)`
    after each change that slapd took."""
    # python-ldap only for the command that talks to slapd.
    from milter_wkd.store.accounts import set_passwords  # noqa: PLC0415

    set_passwords(uri, {dn: ssha(password) for dn, password in passwords.items()}, done,
                  timeout=timeout)


@dataclass(frozen=True, slots=True)
class PasswordFile:
    path: Path
    uid: int
    gid: int


class PasswordFiles:
    """New password files, first under temporary names (`stage`), renamed into place by
    `commit` or removed by `discard`."""

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []

    def stage(self, target: PasswordFile, password: str) -> None:
        temporary = target.path.with_name(f".{target.path.name}.{secrets.token_hex(4)}")
        try:
            # O_EXCL|O_NOFOLLOW: a planted file or link is never written through; the mode
            # applies from the creation on (the umask can only narrow it).
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o600)
        except OSError as exc:
            raise MilterWkdError(f"cannot create {temporary}: {exc.strerror}") from None
        self._staged.append((temporary, target.path))
        try:
            os.fchmod(fd, 0o600)
            if (target.uid, target.gid) != (os.geteuid(), os.getegid()):
                os.fchown(fd, target.uid, target.gid)
            os.write(fd, password.encode("ascii") + b"\n")
            os.fsync(fd)
        except OSError as exc:
            raise MilterWkdError(f"cannot write {temporary}: {exc.strerror}") from None
        finally:
            os.close(fd)

    def commit(self) -> None:
        for temporary, path in self._staged:
            os.replace(temporary, path)
        self._staged.clear()

    def discard(self) -> None:
        for temporary, _path in self._staged:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        self._staged.clear()


def replace_passwords(accounts: Mapping[str, PasswordFile], uri: str | None,
                      ) -> tuple[dict[str, str], str]:
    """New passwords for accounts (DN -> its password file): set in the directory at `uri`
    (None: not; the LDIF to apply elsewhere is returned instead), each file renamed into
    place once its password is in effect. Returns ({DN: password}, LDIF or "")."""
    passwords = {dn: new_password() for dn in accounts}
    staged = {dn: PasswordFiles() for dn in accounts}
    try:
        for dn, target in accounts.items():
            staged[dn].stage(target, passwords[dn])
        if uri is None:
            ldif = password_ldif(passwords)
            for files in staged.values():
                files.commit()
            return passwords, ldif
        set_in_directory(uri, passwords, done=lambda dn: staged[dn].commit())
        return passwords, ""
    finally:
        for files in staged.values():
            files.discard()  # what was not committed: its password never took effect


def readable_by_others(mode: int) -> bool:
    return bool(mode & 0o007)


def readable_by_group(mode: int) -> bool:
    return bool(mode & 0o070)
