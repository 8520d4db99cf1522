"""`milter-wkd keys import|remove`: an administrator publishes or withdraws a user's key.

import ADDR [FILE]: finds the user owning ADDR in the directory ([directory] of --config),
cleans the key (file or stdin, binary or armored) for that user's addresses, and stores
it on the user's entry with provenance admin-import (actor: the local login name).
remove ADDR: removes the key of the user owning ADDR and everything derived from it.
Refusals (unknown address, no key, a key without the user's addresses, a fingerprint
published by someone else) exit 2 with `refused: <reason>`; an unreachable directory
exits 75.
"""

from __future__ import annotations

import argparse
import getpass
import time
from typing import Any

from milter_wkd import config as config_module
from milter_wkd import openpgp
from milter_wkd.cli.io import read_input
from milter_wkd.directory import Directory, KeySource, Provenance
from milter_wkd.errors import KeyRefused
from milter_wkd.values import Address


def register(sub: Any) -> None:
    group = sub.add_parser("keys", help="publish or remove a user's key in the directory")
    commands = group.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    imp = commands.add_parser("import", help="publish a key for the user owning ADDR")
    imp.add_argument("address", metavar="ADDR", help="an address of the user")
    imp.add_argument("input", nargs="?", metavar="FILE", help="key file (default: stdin)")
    imp.add_argument("--config", metavar="FILE", help="configuration file")
    imp.set_defaults(func=_import)

    remove = commands.add_parser("remove", help="remove the key of the user owning ADDR")
    remove.add_argument("address", metavar="ADDR", help="an address of the user")
    remove.add_argument("--config", metavar="FILE", help="configuration file")
    remove.set_defaults(func=_remove)


def _actor() -> str:
    try:
        return f"admin:{getpass.getuser()}"
    except (KeyError, OSError):
        return "admin"


def _import(args: argparse.Namespace) -> int:
    cfg = config_module.load(args.config)
    address = Address.parse(args.address)
    data = read_input(args.input, cfg.keys.max_input_bytes)
    with Directory(cfg.directory) as directory:
        user = directory.user(address)
        cleaned = openpgp.clean_key(data, user.addresses,
                                    limits=openpgp.Limits(max_input=cfg.keys.max_input_bytes))
        if len(cleaned.key) > cfg.keys.max_published_bytes:
            raise KeyRefused(f"the cleaned key has {len(cleaned.key)} octets, more than "
                             f"max_published_bytes ({cfg.keys.max_published_bytes})")
        stored = directory.publish_key(
            user, cleaned, Provenance(KeySource.ADMIN_IMPORT, _actor(), int(time.time())))
    addresses = ", ".join(str(a) for a in stored.addresses)
    print(f"published {stored.fingerprint} for {addresses} on {stored.dn}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    cfg = config_module.load(args.config)
    address = Address.parse(args.address)
    with Directory(cfg.directory) as directory:
        removed = directory.remove_key(directory.user(address))
    print(f"removed {removed.fingerprint} from {removed.dn}")
    return 0
