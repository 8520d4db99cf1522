"""`milter-wkd domain init|list`: a domain's service keys and the DNS records to publish.

init creates, when missing, the submission key pair (secret 0600, public 0644, the public
one is what the WKD responder serves) and the DKIM keys (dkim_key, Ed25519, and
dkim_rsa_key, RSA-2048, as configured), then prints the DNS records.
Existing keys are never overwritten. Refusals (domain not configured) exit 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from milter_wkd import config as config_mod
from milter_wkd.config import Config, DomainConfig
from milter_wkd.domains import init_domain
from milter_wkd.errors import Refused


def register(sub: Any) -> None:
    group = sub.add_parser("domain", help="service keys and DNS of a mail domain")
    commands = group.add_subparsers(dest="domain_command", required=True, metavar="ACTION")
    init = commands.add_parser("init", help="create missing keys, print DNS records")
    init.add_argument("domain")
    init.add_argument("--config", default=str(config_mod.DEFAULT_PATH), metavar="FILE")
    init.set_defaults(func=_init)
    listing = commands.add_parser("list", help="configured domains and their key files")
    listing.add_argument("--config", default=str(config_mod.DEFAULT_PATH), metavar="FILE")
    listing.set_defaults(func=_list)


def _domain(cfg: Config, name: str) -> DomainConfig:
    found = cfg.domain(name)
    if found is None:
        raise Refused(f"{name} is not configured: add a [[domains]] table for it first")
    return found


def _init(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    for line in init_domain(_domain(cfg, args.domain)):
        print(line)
    return 0


def _list(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    for domain in cfg.domains:
        state = "ready" if Path(domain.submission_key).exists() else "run domain init"
        print(f"{domain.name}\t{domain.submission_address}\t{state}")
    return 0
