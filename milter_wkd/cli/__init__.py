"""The `milter-wkd` command: one entry point, one sub-command group per module.

Each group module in this package has `register(subparsers)`, which adds its commands and
sets `func` on them. Exit codes: 0 success; 2 refused input or usage error (a line
`refused: <reason>` or argparse's message on stderr); 75 (EX_TEMPFAIL) when a service such
as the directory is unavailable; 1 anything else, reported without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from milter_wkd import __version__, logcontext
from milter_wkd.errors import MilterWkdError, Refused

EX_REFUSED = 2
EX_TEMPFAIL = 75

# Command -> (module of its group, one-line help). Only the module of the command being run
# is imported: the others pull in python-ldap, pymilter, pgpy, dkimpy or granian, which would
# cost every `milter-wkd key clean` most of a second.
GROUPS: dict[str, tuple[str, str]] = {
    "key": ("key", "clean or inspect an OpenPGP key offline"),
    "keys": ("keys", "administer the keys published in the directory"),
    "domain": ("domain", "service keys and DNS of a mail domain"),
    "directory": ("directory", "LDAP set-up: random service-account passwords"),
    "milter": ("milter_cmd", "run the milter (WKS submissions, Autocrypt)"),
    "pending": ("pending", "pending WKS confirmation requests"),
    "web": ("web", "serve the Web Key Directory over HTTPS"),
    "portal": ("portal", "serve the self-service key page over HTTPS"),
    "check": ("check", "tell what works and what to fix in a deployment"),
    "sandbox": ("sandbox", "private slapd, Dovecot, milter and Postfix on loopback"),
    "config": ("config_cmd", "configuration file helpers"),
    "files": ("files", "where the shipped LDAP, Postfix, Dovecot and systemd files are"),
}


def _command_of(argv: Sequence[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; the group of the command in argv (if any) is fully registered."""
    parser = argparse.ArgumentParser(
        prog="milter-wkd",
        description="A mail provider's own OpenPGP keyserver: WKS milter, LDAP key store, "
                    "WKD responder.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (repeat for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = _command_of(argv)
    for name, (module, text) in GROUPS.items():
        if name == wanted:
            importlib.import_module(f"milter_wkd.cli.{module}").register(sub)
        else:
            sub.add_parser(name, help=text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(arguments)
    args = parser.parse_args(arguments)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format=logcontext.FORMAT)
    for handler in logging.getLogger().handlers:
        # Lines logged while the milter handles a message start with its queue id.
        logcontext.install(handler)
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
