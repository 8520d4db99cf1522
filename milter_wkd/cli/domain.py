"""`milter-wkd domain init|list`: a domain's service keys and the DNS records to publish.

init creates, when missing, the submission key pair (secret 0600, public 0644, the public
one is what the WKD responder serves) and the DKIM key, then prints the DNS records.
Existing keys are never overwritten. Refusals (domain not configured) exit 2.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from milter_wkd import config as config_mod
from milter_wkd import dkim
from milter_wkd.config import Config, DomainConfig
from milter_wkd.errors import Refused
from milter_wkd.openpgp import armor_key, inspect_key
from milter_wkd.openpgp.messages import generate_submission_key
from milter_wkd.values import Address


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


def _write_new(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    path.chmod(mode)


def _domain(cfg: Config, name: str) -> DomainConfig:
    found = cfg.domain(name)
    if found is None:
        raise Refused(f"{name} is not configured: add a [[domains]] table for it first")
    return found


def init_domain(domain: DomainConfig) -> list[str]:
    """Create the domain's missing keys; returns lines describing what exists now."""
    lines = []
    secret_path = Path(domain.submission_key)
    public_path = Path(domain.submission_public_key)
    if not secret_path.exists():
        generated = generate_submission_key(Address.parse(domain.submission_address))
        _write_new(secret_path, generated.secret, 0o600)
        if public_path.exists():
            public_path.unlink()
        _write_new(public_path, armor_key(generated.public), 0o644)
        lines.append(f"created submission key {generated.fingerprint} in {secret_path}")
    elif not public_path.exists():
        raise Refused(f"{secret_path} exists but {public_path} does not: export the public "
                      "key there (gpg --export --armor) or remove both to start over")
    else:
        info = inspect_key(public_path.read_bytes())
        lines.append(f"submission key {info.fingerprint} in {secret_path}")
    if domain.dkim_key:
        key_path = Path(domain.dkim_key)
        if key_path.exists():
            key = dkim.load_key(key_path, domain.name, domain.dkim_selector)
            lines.append(f"DKIM key in {key_path}")
        else:
            key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            key = dkim.generate_key(key_path, domain.name, domain.dkim_selector)
            lines.append(f"created DKIM key in {key_path}")
        lines.append(f"DNS: {key.dns_name()}. IN TXT \"{key.dns_record()}\"")
    lines.append(f"DNS: openpgpkey.{domain.name}. IN A/AAAA <the WKD responder's address> "
                 "(or CNAME; and a TLS certificate for that name)")
    return lines


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
