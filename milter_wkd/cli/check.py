"""`milter-wkd check --config FILE`: the admin's doctor (milter_wkd.check does the probing).

Where this host's Postfix and Dovecot are and how to reach the WKD site and the
self-service page come from the config file's [check] section; an option given here
overrides its key (--skip adds to [check] skip).

Prints one line per check as it completes, `ok   group: detail`, `warn group: ...`,
`skip group: ...` or `FAIL group: ...` followed by an indented `fix: ...` line, and a
summary. Exit 0 when nothing failed (warnings and skips do not count), 1 otherwise; a
config file that does not load is a FAIL line too (exit 1).

`milter-wkd check --domain DOMAIN [--address ADDR] [--json]` reads no config file: it
checks any domain's WKD from the outside as clients see it (milter_wkd.check.domain);
--json prints one JSON document instead of lines. Exit 2: bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from milter_wkd import check
from milter_wkd import config as config_module
from milter_wkd.check.domain import DomainOptions, run_domain
from milter_wkd.config import Config, ConfigError, parse_host_port
from milter_wkd.errors import BadAddress
from milter_wkd.values import Address


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "check", help="check the directory, keys, WKD, Postfix and Dovecot; say what to fix",
        description="Probe everything milter-wkd depends on, one line per check. "
                    f"Groups (for --skip): {', '.join(check.GROUPS)}. Each option overrides "
                    "the key of the same name in the config file's [check] section.")
    parser.add_argument("--config", metavar="FILE", help="configuration file")
    parser.add_argument("--postfix-config-dir", metavar="DIR",
                        help="Postfix's config directory, for `postconf -c` "
                             "(default: [check] postfix_config_dir, else /etc/postfix)")
    parser.add_argument("--dovecot-auth-socket", metavar="PATH",
                        help="Dovecot's SASL socket for Postfix (default: [check] "
                             "dovecot_auth_socket, else Postfix's smtpd_sasl_path, else "
                             f"{check.DEFAULT_DOVECOT_SOCKET})")
    parser.add_argument("--wkd-url", metavar="URL",
                        help="base URL of the WKD folder; {domain} stands for each domain "
                             f"(default: [check] wkd_url, else {check.DEFAULT_WKD_URL})")
    parser.add_argument("--wkd-connect", metavar="HOST:PORT",
                        help="connect here instead of resolving the URL's host (the "
                             "certificate is still checked for the URL's host)")
    parser.add_argument("--ca-file", metavar="FILE",
                        help="CA bundle for the WKD certificate (default: [check] ca_file, "
                             "else the system store)")
    parser.add_argument("--portal-url", metavar="URL",
                        help="the self-service page's URL, probed when the config has "
                             "[portal] (default: [check] portal_url, else "
                             f"{config_module.DEFAULT_PORTAL_URL})")
    parser.add_argument("--portal-connect", metavar="HOST:PORT",
                        help="connect here for the page instead of resolving its host")
    parser.add_argument("--portal-ca-file", metavar="FILE",
                        help="CA bundle for the page's certificate (default: [check] "
                             "portal_ca_file, else the WKD one)")
    parser.add_argument("--dns", action=argparse.BooleanOptionalAction, default=None,
                        help="look up the DKIM TXT records (default: [check] dns, else off: "
                             "no resolver needed)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="per probe (default: [check] timeout, else 5)")
    parser.add_argument("--skip", action="append", default=[], metavar="NAME",
                        choices=check.GROUPS, help="leave a group out (repeatable; adds to "
                                                   "[check] skip)")
    public = parser.add_argument_group(
        "any domain, without a config file",
        "--domain checks a domain's WKD from the outside: DNS, TLS, the policy and "
        "submission-address files, with --address that address's key by both methods "
        "and HKP/VKS look-ups (--ca-file and --timeout apply too)")
    public.add_argument("--domain", metavar="DOMAIN", help="the mail domain to check")
    public.add_argument("--address", metavar="ADDR",
                        help="also look up this address's key (in DOMAIN)")
    public.add_argument("--connect", metavar="HOST:PORT",
                        help="connect here for openpgpkey.DOMAIN and DOMAIN instead of DNS "
                             "(certificates still checked for those names; DNS skipped)")
    public.add_argument("--json", action="store_true",
                        help="print one JSON document (for monitoring) instead of lines")
    parser.set_defaults(func=_check)


def _print(result: check.CheckResult) -> None:
    print(f"{result.label:<4} {result.name}: {result.detail}", flush=True)
    if result.fix and (result.ok is False or result.warning):
        print(f"     fix: {result.fix}", flush=True)


def _options(args: argparse.Namespace, cfg: Config) -> check.Options:
    """[check] of the config file, overridden by the options given."""
    options = check.Options.from_config(cfg.check)
    given: dict[str, Any] = {
        "postfix_config_dir": args.postfix_config_dir,
        "dovecot_auth_socket": args.dovecot_auth_socket, "wkd_url": args.wkd_url,
        "ca_file": args.ca_file, "dns": args.dns, "portal_url": args.portal_url,
        "portal_ca_file": args.portal_ca_file,
        "timeout": None if args.timeout is None else max(0.5, args.timeout)}
    if args.wkd_connect:
        given["wkd_connect"] = parse_host_port(args.wkd_connect)
    if args.portal_connect:
        given["portal_connect"] = parse_host_port(args.portal_connect)
    return dataclasses.replace(
        options, skip=options.skip | frozenset(args.skip),
        **{name: value for name, value in given.items() if value is not None})


def _refuse(message: str) -> int:
    print(f"refused: {message}", file=sys.stderr)
    return 2


def _domain_options(args: argparse.Namespace) -> DomainOptions | str:
    """The options of --domain, or why they are bad usage."""
    if args.config:
        return "--domain checks without a config file; leave out --config"
    address = None
    if args.address:
        try:
            address = Address.parse(args.address)
        except BadAddress as exc:
            return f"--address: {exc.reason}"
    domain = (args.domain or "").strip().rstrip(".").lower()
    try:
        Address.parse(f"x@{domain}")
    except BadAddress:
        return f"--domain wants a mail domain, not {args.domain!r}"
    if address is not None and address.domain != domain:
        return f"--address {address} is not in {domain}"
    connect = None
    if args.connect:
        connect = parse_host_port(args.connect)
        if connect is None:
            return f"--connect wants HOST:PORT, not {args.connect!r}"
    return DomainOptions(domain, address, connect, args.ca_file,
                         5.0 if args.timeout is None else max(0.5, args.timeout))


def _check_domain(args: argparse.Namespace) -> int:
    options = _domain_options(args)
    if isinstance(options, str):
        return _refuse(options)
    results = []
    for result in run_domain(options):
        results.append(result)
        if not args.json:
            _print(result)
    counts = {label: sum(r.label == label for r in results)
              for label in ("ok", "warn", "skip", "FAIL")}
    if args.json:
        print(json.dumps({
            "domain": options.domain,
            "address": None if options.address is None else str(options.address),
            "ok": not counts["FAIL"],
            "counts": {"ok": counts["ok"], "warn": counts["warn"], "skip": counts["skip"],
                       "fail": counts["FAIL"]},
            "results": [{"probe": r.name, "status": r.label.lower(), "detail": r.detail,
                         "fix": r.fix if r.ok is False or r.warning else ""}
                        for r in results]}, indent=2))
    else:
        print(f"{counts['ok']} ok, {counts['warn']} warnings, {counts['FAIL']} failed, "
              f"{counts['skip']} skipped")
    return 1 if counts["FAIL"] else 0


def _check(args: argparse.Namespace) -> int:
    if args.domain or args.address:
        if not args.domain:
            return _refuse("--address needs --domain")
        return _check_domain(args)
    if args.connect or args.json:
        return _refuse("--connect and --json go with --domain")
    for option, value in (("--wkd-connect", args.wkd_connect),
                          ("--portal-connect", args.portal_connect)):
        if value and parse_host_port(value) is None:
            return _refuse(f"{option} wants HOST:PORT, not {value!r}")
    try:
        cfg = config_module.load(args.config)
    except ConfigError as exc:
        _print(check.CheckResult("config", False, exc.reason,
                                 "correct the file (milter-wkd config example shows every key)"))
        return 1
    counts = {"ok": 0, "warn": 0, "skip": 0, "FAIL": 0}
    for result in check.run(cfg, _options(args, cfg)):
        _print(result)
        counts[result.label] += 1
    print(f"{counts['ok']} ok, {counts['warn']} warnings, {counts['FAIL']} failed, "
          f"{counts['skip']} skipped")
    return 1 if counts["FAIL"] else 0
