"""`milter-wkd check`: the admin's doctor. Probes every piece milter-wkd depends on and
says, one result per line, what works and what to fix.

One module per peer, each saying what it checks, what it reads and how it fails:

- `directory`: slapd answers and takes the bind, the schema, the bases (groups directory,
  schema), then over the same connection `acl`: the milter's rights, anonymous's limits;
- `keys`: the directory's published keys were checked (keys), each domain's submission
  key pair works (submission-key);
- `accounts`: no documented password opens a service account (passwords), the WKD
  responder's account cannot write (responder);
- `dkim`, `wkd` (HTTPS), `portal` (the self-service page over HTTPS, when the config has
  [portal]), `postfix` (postconf), `milter` (the socket), `dovecot` (SASL).

The LDAP probes go through milter_wkd.store.probe: only the store speaks python-ldap.
`results` holds `CheckResult` and the helpers every probe uses; `options` the `Options`
made from the config file's [check] section, which the command line overrides.

Configuration: the whole config file (each module names its keys); [check] says where this
host's Postfix and Dovecot are and how to reach the WKD site (see milter_wkd.config).

How it fails: never. Every probe has a timeout (`Options.timeout`, a few seconds) and
any error, expected or not, becomes a failed `CheckResult` with the reason and a fix
hint; probes that depend on a failed one are reported as skipped.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from functools import partial

from milter_wkd.check.accounts import KEY_WRITE_PROBES, check_passwords, check_responder
from milter_wkd.check.directory import check_directory
from milter_wkd.check.dkim import check_dkim
from milter_wkd.check.dovecot import (
    DEFAULT_DOVECOT_SOCKET,
    check_dovecot,
    dovecot_handshake,
    dovecot_socket,
    parse_auth_handshake,
)
from milter_wkd.check.keys import check_keys, check_submission_key
from milter_wkd.check.milter import check_milter, milter_negotiates
from milter_wkd.check.options import Options
from milter_wkd.check.portal import PortalClient, check_portal
from milter_wkd.check.postfix import (
    check_postfix,
    check_postfix_params,
    milter_entries,
    parse_postconf,
    postfix_milter_address,
    run_postconf,
)
from milter_wkd.check.results import CheckResult, guarded, why
from milter_wkd.check.wkd import HttpAnswer, check_policy, check_wkd, https_get
from milter_wkd.config import CHECK_GROUPS, DEFAULT_WKD_URL, Config

__all__ = [
    "DEFAULT_DOVECOT_SOCKET", "DEFAULT_WKD_URL", "GROUPS", "KEY_WRITE_PROBES", "CheckResult",
    "HttpAnswer", "Options", "PortalClient", "check_directory", "check_dkim", "check_dovecot",
    "check_keys", "check_milter", "check_passwords", "check_policy", "check_portal",
    "check_postfix", "check_postfix_params", "check_responder", "check_submission_key",
    "check_wkd", "dovecot_handshake", "dovecot_socket", "guarded", "https_get",
    "milter_entries", "milter_negotiates", "parse_auth_handshake", "parse_postconf",
    "postfix_milter_address", "run", "run_postconf",
]

GROUPS = CHECK_GROUPS  # in the order run() reports them


def run(config: Config, options: Options) -> Iterator[CheckResult]:
    """Every check not in options.skip, in order; never raises."""
    skip = options.skip
    yield from guarded("directory", lambda: check_directory(config, options))
    if "keys" not in skip:
        yield from guarded("keys", lambda: check_keys(config))
    if "passwords" not in skip:
        yield from guarded("passwords", lambda: check_passwords(config, options))
    if "responder" not in skip:
        yield from guarded("responder", lambda: check_responder(config, options))
    for domain in config.domains:
        if "submission-key" not in skip:
            yield from guarded("submission-key", partial(check_submission_key, domain))
        if "dkim" not in skip:
            yield from guarded("dkim", partial(check_dkim, config, domain, options.dns))
        if "wkd" not in skip:
            yield from guarded("wkd", partial(check_wkd, domain, options))
    if "portal" not in skip:
        yield from guarded("portal", lambda: check_portal(config, options))
    # Postfix's settings also say where Dovecot's socket is.
    params: dict[str, str] | None = None
    error: str | None = None
    if "postfix" not in skip or ("dovecot" not in skip and not options.dovecot_auth_socket):
        try:
            params = run_postconf(options.postfix_config_dir, options.timeout)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            error = why(exc)
    if "postfix" not in skip:
        yield from guarded("postfix", lambda: check_postfix(config, options, params, error))
    if "milter" not in skip:
        yield from guarded("milter", lambda: check_milter(config, options))
    if "dovecot" not in skip:
        yield from guarded("dovecot", lambda: check_dovecot(options, params))
