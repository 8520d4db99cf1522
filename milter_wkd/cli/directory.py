"""`milter-wkd directory passwords`: random passwords for the LDAP service accounts.

Run as root on the LDAP server after ldap/README.md step 6 has added the accounts (which
ship locked: `userPassword: {CRYPT}!` matches no password). For each of cn=milter,
cn=wkd and cn=dovecot (below --services; --account picks some) it makes a random
password, sets its {SSHA} hash in slapd as root over ldapi:// (SASL EXTERNAL), and
writes the password to DIR/<account>.password, created with mode 0600 and owned by the
account's system user: milter-wkd (the milter), milter-wkd-web (the WKD responder), root
(Dovecot: copy it into dovecot-ldap.conf.ext as dnpass). --owner ACCOUNT=USER changes an
owner. With --ldif nothing in the directory changes: the LDIF to apply on the LDAP
server (`ldapmodify -Y EXTERNAL -H ldapi:/// -f FILE`) goes to stdout and the files are
written at once. Exit 2 for an unknown user, 75 when the directory is down, 1 when slapd
refuses a change (files of accounts it did change are in place).
"""

from __future__ import annotations

import argparse
import pwd
from pathlib import Path
from typing import Any

from milter_wkd import passwords
from milter_wkd.errors import Refused

DEFAULT_SERVICES = "ou=services,dc=example,dc=org"
DEFAULT_DIR = "/etc/milter-wkd"


def register(sub: Any) -> None:
    group = sub.add_parser("directory", help="LDAP set-up helpers")
    commands = group.add_subparsers(dest="directory_command", required=True,
                                    metavar="ACTION")
    command = commands.add_parser(
        "passwords", help="set random passwords for the service accounts, write 0600 files",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    command.add_argument("--services", default=DEFAULT_SERVICES, metavar="DN",
                         help="entry that holds the accounts (default: %(default)s)")
    command.add_argument("--account", action="append", choices=passwords.ACCOUNTS,
                         help="only this account (repeatable; default: all four)")
    command.add_argument("--dir", default=DEFAULT_DIR, metavar="DIR",
                         help="where DIR/<account>.password go (default: %(default)s)")
    command.add_argument("--owner", action="append", default=[], metavar="ACCOUNT=USER",
                         help="owner of an account's file (defaults: " + ", ".join(
                             f"{a}={u}" for a, u in passwords.DEFAULT_OWNERS.items()) + ")")
    command.add_argument("--uri", default="ldapi:///", metavar="URI",
                         help="the directory, as root by SASL EXTERNAL (default: %(default)s)")
    command.add_argument("--ldif", action="store_true",
                         help="print the LDIF for the LDAP server instead of applying it")
    command.set_defaults(func=_passwords)


def _owners(given: list[str]) -> dict[str, str]:
    owners = dict(passwords.DEFAULT_OWNERS)
    for item in given:
        account, sep, user = item.partition("=")
        if not sep or account not in owners or not user:
            raise Refused(f"--owner wants ACCOUNT=USER with ACCOUNT one of "
                          f"{', '.join(passwords.ACCOUNTS)}, not {item!r}")
        owners[account] = user
    return owners


def _target(path: Path, user: str) -> passwords.PasswordFile:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise Refused(f"there is no system user {user} to own {path}: create it first "
                      "(README, Deployment) or choose another with --owner") from None
    return passwords.PasswordFile(path, entry.pw_uid, entry.pw_gid)


def _passwords(args: argparse.Namespace) -> int:
    owners = _owners(args.owner)
    folder = Path(args.dir)
    if not folder.is_dir():
        raise Refused(f"{folder} is not a directory")
    chosen = [a for a in passwords.ACCOUNTS if not args.account or a in args.account]
    targets = {passwords.account_dn(name, args.services):
               _target(folder / f"{name}.password", owners[name]) for name in chosen}
    _, ldif = passwords.replace_passwords(targets, None if args.ldif else args.uri)
    if ldif:
        print(ldif, end="")
    for name, (dn, target) in zip(chosen, targets.items(), strict=True):
        where = "to apply with the LDIF above" if args.ldif else "set"
        line = f"{dn}: new password {where}; {target.path} (0600, owner {owners[name]})"
        if name == "dovecot":
            line += "; copy it into dovecot-ldap.conf.ext as dnpass"
        print(f"# {line}" if args.ldif else line)
    return 0
