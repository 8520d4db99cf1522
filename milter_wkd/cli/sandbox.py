"""`milter-wkd sandbox up|down`: the real services, private, on loopback.

`up [--dir DIR] [--json]` starts private slapd, Dovecot and Postfix (see
milter_wkd.sandbox) whose daemons outlive the command, writes DIR/milter-wkd.toml (a
complete config for this sandbox) and DIR/sandbox.json (its state), and prints the
endpoints (with --json: one JSON object). Without --dir it makes a new temp dir. `down
--dir DIR` stops by pid everything `up` started there; daemons already gone are fine.
A failed `up` stops what it started and exits 1 with the daemon's log tail.
`up --providers N --consumers M` runs N slapds in multi-provider replication and M
read-only consumers instead of one slapd (ldap/README.md, "Replication"); --json then lists
them all under "slapds" (role, uri, pid), and "ldap_uri" stays provider 1.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from milter_wkd import sandbox

MAX_SLAPDS = 9  # loopback toys: each is a process and a full copy of the directory


def register(sub: Any) -> None:
    group = sub.add_parser("sandbox", help="private slapd, Postfix and Dovecot on loopback")
    commands = group.add_subparsers(dest="sandbox_command", required=True, metavar="ACTION")
    up = commands.add_parser("up", help="start a sandbox whose services keep running")
    up.add_argument("--dir", type=Path, default=None,
                    help="directory for all its files (default: a new temp dir)")
    up.add_argument("--json", action="store_true", help="print the endpoints as JSON")
    up.add_argument("--providers", type=_count(1), default=1, metavar="N",
                    help="slapds in multi-provider replication (default: %(default)s)")
    up.add_argument("--consumers", type=_count(0), default=0, metavar="M",
                    help="read-only replicas; the WKD responder reads the first "
                         "(default: %(default)s)")
    up.set_defaults(func=_up)
    down = commands.add_parser("down", help="stop everything `sandbox up` started in DIR")
    down.add_argument("--dir", type=Path, required=True, help="the directory given to up")
    down.set_defaults(func=_down)


def _count(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not least <= number <= MAX_SLAPDS:
            raise argparse.ArgumentTypeError(f"{number} is not within {least}..{MAX_SLAPDS}")
        return number
    return parse


def _up(args: argparse.Namespace) -> int:
    info = sandbox.start_detached(args.dir, providers=args.providers,
                                  consumers=args.consumers)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"sandbox in {info['dir']}")
    print(f"  config           {info['config']}")
    print(f"  LDAP             {info['ldap_uri']}  admin {info['ldap_admin_dn']}"
          f" / {info['ldap_admin_password']}")
    if len(info["slapds"]) > 1:
        for server in info["slapds"]:
            print(f"    {server['role']:<14} {server['uri']}  pid {server['pid']}")
    for key, label in (("smtp_inbound", "SMTP inbound"), ("smtp_submission", "SMTP submission"),
                       ("smtp_reinject", "SMTP reinject"), ("imap", "IMAP")):
        print(f"  {label:<16} {info[key]['host']}:{info[key]['port']}")
    if info.get("portal_url"):
        print(f"  self-service     {info['portal_url']}  (CA {info['portal_ca_file']})")
    for name, user in info["users"].items():
        print(f"  user {name:<11} {user['address']} / {user['password']}")
    if info.get("check_command"):
        print(f"check it with: {info['check_command']}")
    print(f"stop it with: milter-wkd sandbox down --dir {info['dir']}")
    return 0


def _down(args: argparse.Namespace) -> int:
    stopped = sandbox.down(args.dir)
    print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    return 0
