"""`milter-wkd files [KIND] [--copy DIR]`: where the shipped files are, or a copy of them.

Without KIND: one line per kind (`ldap`, `postfix`, `dovecot`, `systemd`, `docs`) with its
folder. With KIND: that folder (for scripts: `cd "$(milter-wkd files ldap)"`). With
`--copy DIR`: the kind's files copied into DIR (created; an existing file is never
overwritten: refused, nothing copied). Works from a checkout and from an installed wheel
(milter_wkd.files).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from milter_wkd import files
from milter_wkd.errors import Refused


def register(sub: Any) -> None:
    command = sub.add_parser("files", help="where the shipped LDAP schemas, Postfix, Dovecot "
                             "and systemd files are, or a copy of them")
    command.add_argument("kind", nargs="?", choices=files.KINDS, help="one kind of file")
    command.add_argument("--copy", metavar="DIR", type=Path,
                         help="copy that kind's files into DIR instead")
    command.set_defaults(func=_files)


def _files(args: argparse.Namespace) -> int:
    if args.copy is not None:
        if args.kind is None:
            raise Refused("--copy needs a KIND (ldap, postfix, dovecot, systemd, docs)")
        source = files.path(args.kind)
        wanted = [p.relative_to(source) for p in sorted(source.rglob("*")) if p.is_file()]
        existing = [str(args.copy / name) for name in wanted if (args.copy / name).exists()]
        if existing:
            raise Refused(f"{existing[0]} exists already: nothing copied")
        for name in wanted:
            (args.copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, args.copy / name)
        print(f"copied {len(wanted)} files of {source} to {args.copy}")
        return 0
    if args.kind is not None:
        print(files.path(args.kind))
        return 0
    for kind in files.KINDS:
        print(f"{kind}\t{files.path(kind)}")
    return 0
