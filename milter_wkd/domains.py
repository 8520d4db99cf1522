"""A domain's service keys: the WKS submission key pair and the DKIM key(s).

`init_domain` creates what is missing (secret key 0600, public key 0644 — the public one
is what the WKD responder serves and clients encrypt submissions to) and never overwrites
an existing key. It returns human lines, including the DNS records to publish.
Errors: `Refused` when the files are in a state it will not guess about.
"""

from __future__ import annotations

import os
from pathlib import Path

from milter_wkd import dkim
from milter_wkd.config import DomainConfig
from milter_wkd.errors import Refused
from milter_wkd.openpgp import armor_key, inspect_key
from milter_wkd.openpgp.messages import generate_submission_key
from milter_wkd.values import Address


def _write_new(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    path.chmod(mode)


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
    dkim_keys: list[tuple[str, str, dkim.Algorithm | None]] = [
        (domain.dkim_rsa_key, domain.dkim_rsa_selector, "rsa"),
        (domain.dkim_key, domain.dkim_selector, None)]
    for path, selector, algorithm in dkim_keys:
        if not path:
            continue
        key_path = Path(path)
        if key_path.exists():
            key = dkim.load_key(key_path, domain.name, selector, algorithm)
            lines.append(f"DKIM key ({key.algorithm}, selector {selector}) in {key_path}")
        else:
            key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            key = dkim.generate_key(key_path, domain.name, selector, algorithm or "ed25519")
            lines.append(f"created DKIM key ({key.algorithm}, selector {selector}) in "
                         f"{key_path}")
        lines.append(f"DNS: {key.zone_line()}")
    lines.append(f"DNS: openpgpkey.{domain.name}. IN A/AAAA <the WKD responder's address> "
                 "(or CNAME; and a TLS certificate for that name)")
    return lines
