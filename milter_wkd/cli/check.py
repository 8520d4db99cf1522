"""`milter-wkd check --config FILE`: the admin's doctor (milter_wkd.check does the probing).

Prints one line per check as it completes, `ok   group: detail`, `warn group: ...`,
`skip group: ...` or `FAIL group: ...` followed by an indented `fix: ...` line, and a
summary. Exit 0 when nothing failed (warnings and skips do not count), 1 otherwise; a
config file that does not load is a FAIL line too (exit 1).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from milter_wkd import check
from milter_wkd import config as config_module
from milter_wkd.config import ConfigError


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "check", help="check the directory, keys, WKD, Postfix and Dovecot; say what to fix",
        description="Probe everything milter-wkd depends on, one line per check. "
                    f"Groups (for --skip): {', '.join(check.GROUPS)}.")
    parser.add_argument("--config", metavar="FILE", help="configuration file")
    parser.add_argument("--postfix-config-dir", metavar="DIR", default="/etc/postfix",
                        help="Postfix's config directory, for `postconf -c` "
                             "(default: %(default)s)")
    parser.add_argument("--dovecot-auth-socket", metavar="PATH",
                        help="Dovecot's SASL socket for Postfix (default: Postfix's "
                             f"smtpd_sasl_path, else {check.DEFAULT_DOVECOT_SOCKET})")
    parser.add_argument("--wkd-url", metavar="URL", default=check.DEFAULT_WKD_URL,
                        help="base URL of the WKD folder; {domain} stands for each domain "
                             "(default: %(default)s)")
    parser.add_argument("--wkd-connect", metavar="HOST:PORT",
                        help="connect here instead of resolving the URL's host (the "
                             "certificate is still checked for the URL's host)")
    parser.add_argument("--ca-file", metavar="FILE",
                        help="CA bundle for the WKD certificate (default: the system store)")
    parser.add_argument("--dns", action="store_true",
                        help="look up the DKIM TXT records (off: no resolver needed)")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="per probe (default: %(default)s)")
    parser.add_argument("--skip", action="append", default=[], metavar="NAME",
                        choices=check.GROUPS, help="leave a group out (repeatable)")
    parser.set_defaults(func=_check)


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--wkd-connect wants HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def _print(result: check.CheckResult) -> None:
    print(f"{result.label:<4} {result.name}: {result.detail}", flush=True)
    if result.fix and (result.ok is False or result.warning):
        print(f"     fix: {result.fix}", flush=True)


def _check(args: argparse.Namespace) -> int:
    try:
        connect = _address(args.wkd_connect) if args.wkd_connect else None
    except argparse.ArgumentTypeError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    try:
        cfg = config_module.load(args.config)
    except ConfigError as exc:
        _print(check.CheckResult("config", False, exc.reason,
                                 "correct the file (milter-wkd config example shows every key)"))
        return 1
    options = check.Options(
        postfix_config_dir=args.postfix_config_dir,
        dovecot_auth_socket=args.dovecot_auth_socket,
        wkd_url=args.wkd_url, wkd_connect=connect, ca_file=args.ca_file,
        skip=frozenset(args.skip), dns=args.dns, timeout=max(0.5, args.timeout))
    counts = {"ok": 0, "warn": 0, "skip": 0, "FAIL": 0}
    for result in check.run(cfg, options):
        _print(result)
        counts[result.label] += 1
    print(f"{counts['ok']} ok, {counts['warn']} warnings, {counts['FAIL']} failed, "
          f"{counts['skip']} skipped")
    return 1 if counts["FAIL"] else 0
