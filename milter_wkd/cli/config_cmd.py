"""`milter-wkd config example`: print a complete commented config file."""

from __future__ import annotations

import argparse
from typing import Any

from milter_wkd import config


def register(sub: Any) -> None:
    group = sub.add_parser("config", help="configuration file helpers")
    commands = group.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    example = commands.add_parser("example", help="print a complete commented config file")
    example.set_defaults(func=_example)


def _example(_args: argparse.Namespace) -> int:
    print(config.example(), end="")
    return 0
