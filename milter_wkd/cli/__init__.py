"""The `milter-wkd` command: one entry point, one sub-command group per module.

Each group module in this package has `register(subparsers)`, which adds its commands and
sets `func` on them. Exit codes: 0 success; 2 refused input or usage error (a line
`refused: <reason>` or argparse's message on stderr); 75 (EX_TEMPFAIL) when a service such
as the directory is unavailable; 1 anything else, reported without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from milter_wkd import __version__
from milter_wkd.cli import config_cmd, domain, key, keys, milter_cmd, pending, sandbox, web
from milter_wkd.errors import MilterWkdError, Refused

EX_REFUSED = 2
EX_TEMPFAIL = 75

GROUPS = [key, keys, domain, milter_cmd, pending, web, sandbox, config_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="milter-wkd",
        description="A mail provider's own OpenPGP keyserver: WKS milter, LDAP key store, "
                    "WKD responder.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (repeat for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        result: int = args.func(args)
    except Refused as exc:
        print(f"refused: {exc.reason}", file=sys.stderr)
        return EX_REFUSED
    except MilterWkdError as exc:
        print(f"error: {exc.reason}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except BrokenPipeError:
        return 1
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
