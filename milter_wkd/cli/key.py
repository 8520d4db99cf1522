"""`milter-wkd key clean|inspect`: the OpenPGP cleaning of milter_wkd.openpgp, offline.

clean: reads a key (file or stdin, binary or armored), writes what would be published for
the given addresses (binary unless --armor; --autocrypt: the Autocrypt keydata of the one
address). --stats prints what was kept and dropped to stderr.
inspect: prints the metadata of the key as JSON.
Refused input exits 2 with `refused: <reason>` on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from milter_wkd import openpgp
from milter_wkd.cli.io import read_input, write_output
from milter_wkd.config import KeysConfig
from milter_wkd.errors import Refused
from milter_wkd.values import Address


def register(sub: Any) -> None:
    group = sub.add_parser("key", help="clean or inspect an OpenPGP key offline")
    commands = group.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    default_max = KeysConfig().max_input_bytes

    clean = commands.add_parser("clean", help="clean a key for publication")
    clean.add_argument("--address", action="append", required=True, metavar="ADDR",
                       help="an address whose user ID may be published (repeatable)")
    clean.add_argument("--autocrypt", action="store_true",
                       help="write the minimal Autocrypt keydata for the single address")
    clean.add_argument("--armor", action="store_true", help="ASCII-armor the output")
    clean.add_argument("--stats", action="store_true",
                       help="print what was kept and dropped to stderr")
    clean.add_argument("--max-size", type=int, default=default_max, metavar="OCTETS",
                       help=f"refuse larger input (default {default_max})")
    clean.add_argument("input", nargs="?", metavar="IN", help="key file (default: stdin)")
    clean.add_argument("-o", "--output", metavar="OUT", help="output file (default: stdout)")
    clean.set_defaults(func=_clean)

    inspect = commands.add_parser("inspect", help="print a key's metadata as JSON")
    inspect.add_argument("--max-size", type=int, default=default_max, metavar="OCTETS")
    inspect.add_argument("input", nargs="?", metavar="IN", help="key file (default: stdin)")
    inspect.set_defaults(func=_inspect)


def _limits(max_size: int) -> openpgp.Limits:
    return openpgp.Limits(max_input=max_size)


def _clean(args: argparse.Namespace) -> int:
    addresses = [Address.parse(a) for a in args.address]
    if args.autocrypt and len(addresses) != 1:
        raise Refused("--autocrypt takes exactly one --address")
    data = read_input(args.input, args.max_size)
    limits = _limits(args.max_size)
    result = openpgp.clean_key(data, addresses, limits=limits)
    out = result.key
    if args.autocrypt:
        out = openpgp.autocrypt_of(result, addresses[0])
    if args.armor:
        out = openpgp.armor_key(out)
    if args.stats:
        for name, count in sorted(result.stats.items()):
            print(f"{name}: {count}", file=sys.stderr)
    write_output(args.output, out)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    data = read_input(args.input, args.max_size)
    info = openpgp.inspect_key(data, limits=_limits(args.max_size))
    print(json.dumps(info.as_json(), indent=2))
    return 0
