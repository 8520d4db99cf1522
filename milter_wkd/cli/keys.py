"""`milter-wkd keys list|show|import|export|remove|disable|enable`: LDAP-side key
administration.

list: one line per published key (fingerprint, addresses, provenance, flags).
show ADDR: the metadata of the published key as JSON, with the URLs WKD clients fetch it
from for each of its addresses ("wkd": advanced and direct form). export ADDR: the key
(armored unless --binary). disable/enable ADDR: pgpDisabled, which the WKD responder, the
Autocrypt hints and dirmngr honour.

import ADDR [FILE]: finds the user owning ADDR in the directory ([directory] of --config)
and publishes the key (file or stdin, binary or armored) for that user's addresses the way
every path does (milter_wkd.publication: cleaned, merged with a published key of the same
fingerprint, size-capped), with provenance admin-import (actor: the local login name).
remove ADDR: removes the key of the user owning ADDR and everything derived from it.
Refusals (unknown address, no key, a key without the user's addresses, a fingerprint
published by someone else) exit 2 with `refused: <reason>`; an unreachable directory
exits 75. Every command reads --config FILE (default /etc/milter-wkd/milter-wkd.toml); a
missing file exits 2.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from typing import Any

from milter_wkd import config as config_module
from milter_wkd import openpgp, publication, wkd
from milter_wkd.cli.io import add_config_option, read_input, write_output
from milter_wkd.errors import NotFound
from milter_wkd.publication import Policy
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.model import KeyOrigin, StoredKey
from milter_wkd.values import Address

# Inputs larger than this (a flooded key) get progress lines on stderr.
PROGRESS_ABOVE = 1024 * 1024


def register(sub: Any) -> None:
    group = sub.add_parser("keys", help="publish or remove a user's key in the directory")
    commands = group.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    imp = commands.add_parser("import", help="publish a key for the user owning ADDR")
    imp.add_argument("address", metavar="ADDR", help="an address of the user")
    imp.add_argument("input", nargs="?", metavar="FILE", help="key file (default: stdin)")
    add_config_option(imp)
    imp.set_defaults(func=_import)

    listing = commands.add_parser("list", help="list published keys")
    add_config_option(listing)
    listing.set_defaults(func=_list)

    show = commands.add_parser("show", help="metadata of the key of the user owning ADDR")
    show.add_argument("address", metavar="ADDR")
    add_config_option(show)
    show.set_defaults(func=_show)

    export = commands.add_parser("export", help="write the key of the user owning ADDR")
    export.add_argument("address", metavar="ADDR")
    export.add_argument("--binary", action="store_true", help="binary instead of armored")
    export.add_argument("-o", "--output", metavar="OUT", help="output file (default: stdout)")
    add_config_option(export)
    export.set_defaults(func=_export)

    for name, disabled in (("disable", True), ("enable", False)):
        toggle = commands.add_parser(name, help=f"{name} the key of the user owning ADDR")
        toggle.add_argument("address", metavar="ADDR")
        add_config_option(toggle)
        toggle.set_defaults(func=_toggle, disabled=disabled)

    remove = commands.add_parser("remove", help="remove the key of the user owning ADDR")
    remove.add_argument("address", metavar="ADDR", help="an address of the user")
    add_config_option(remove)
    remove.set_defaults(func=_remove)


def _stored(directory: LdapStore, address: Address) -> StoredKey:
    stored = directory.get_key(directory.user(address))
    if stored is None:
        raise NotFound(f"no key is published for {address}")
    return stored


def _list(args: argparse.Namespace) -> int:
    cfg = config_module.load(args.config)
    with LdapStore(cfg.directory) as directory:
        for stored in directory.list_keys():
            flags = "".join(f for f, on in (("r", stored.revoked), ("d", stored.disabled)) if on)
            source = stored.provenance.source.value if stored.provenance else "-"
            print(f"{stored.fingerprint}\t{','.join(map(str, stored.addresses))}\t{source}"
                  f"\t{flags or '-'}")
    return 0


def _show(args: argparse.Namespace) -> int:
    cfg = config_module.load(args.config)
    with LdapStore(cfg.directory) as directory:
        stored = _stored(directory, Address.parse(args.address))
    info = openpgp.inspect_key(stored.key).as_json()
    info["dn"] = stored.dn
    info["disabled"] = stored.disabled
    info["wkd"] = {str(address): {"advanced": wkd.advanced_url(address),
                                  "direct": wkd.direct_url(address)}
                   for address in stored.addresses}
    if stored.provenance is not None:
        info["provenance"] = {"source": stored.provenance.source.value,
                              "actor": stored.provenance.actor,
                              "published": stored.provenance.published}
    print(json.dumps(info, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    cfg = config_module.load(args.config)
    with LdapStore(cfg.directory) as directory:
        stored = _stored(directory, Address.parse(args.address))
    write_output(args.output, stored.key if args.binary else openpgp.armor_key(stored.key))
    return 0


def _toggle(args: argparse.Namespace) -> int:
    cfg = config_module.load(args.config)
    with LdapStore(cfg.directory) as directory:
        stored = directory.set_disabled(directory.user(Address.parse(args.address)),
                                        args.disabled)
    print(f"{'disabled' if stored.disabled else 'enabled'} {stored.fingerprint} on {stored.dn}")
    return 0


def _actor() -> str:
    try:
        return f"admin:{getpass.getuser()}"
    except (KeyError, OSError):
        return "admin"


def _import(args: argparse.Namespace) -> int:
    cfg = config_module.load(args.config)
    address = Address.parse(args.address)
    data = read_input(args.input, cfg.keys.max_input_bytes)
    with LdapStore(cfg.directory) as directory:
        user = directory.user(address)
        if len(data) > PROGRESS_ABOVE:
            print(f"cleaning {len(data) / 2**20:.1f} MiB ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        policy = Policy.from_config(cfg.keys)
        cleaned = openpgp.clean_key(data, user.addresses, limits=policy.limits)
        if len(data) > PROGRESS_ABOVE:
            dropped = sum(n for kind, n in cleaned.stats.items() if kind.startswith("dropped:"))
            print(f"cleaned in {time.monotonic() - started:.2f} s: {len(cleaned.key)} octets "
                  f"kept, {dropped} packets dropped", file=sys.stderr, flush=True)
        done = publication.publish(directory, user, data, origin=KeyOrigin.ADMIN_IMPORT,
                                   actor=_actor(), now=int(time.time()), policy=policy,
                                   cleaned=cleaned)
        stored = done.stored
    addresses = ", ".join(str(a) for a in stored.addresses)
    print(f"published {stored.fingerprint} for {addresses} on {stored.dn}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    cfg = config_module.load(args.config)
    address = Address.parse(args.address)
    with LdapStore(cfg.directory) as directory:
        removed = directory.remove_key(directory.user(address))
    print(f"removed {removed.fingerprint} from {removed.dn}")
    return 0
