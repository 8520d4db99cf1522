"""Postfix (group postfix): `postconf -c DIR` for smtpd_milters and non_smtpd_milters (our
socket, first), milter_default_action (tempfail; accept is a warning), milter_protocol (6)
and milter_mail_macros ({auth_authen}). `run_postconf` also tells milter_wkd.check.dovecot
where Postfix looks for Dovecot's SASL socket.

Configuration: [check] postfix_config_dir (Postfix's config directory), timeout; [milter]
socket.
Failures: postconf failing (no Postfix, no main.cf there) is one FAIL line; each wrong
setting is a FAIL line with the `postconf -e` that fixes it.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

from milter_wkd.check.options import Options
from milter_wkd.check.results import CheckResult, fail, ok, warn
from milter_wkd.config import Config

POSTCONF_PARAMETERS = ("smtpd_milters", "non_smtpd_milters", "milter_default_action",
                       "milter_protocol", "milter_mail_macros", "smtpd_sasl_type",
                       "smtpd_sasl_path", "queue_directory")


def parse_postconf(text: str) -> dict[str, str]:
    """`name = value` lines (continuation lines start with white space) into a dict."""
    params: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        if line[:1].isspace() and last is not None:
            params[last] = f"{params[last]} {line.strip()}".strip()
            continue
        name, sep, value = line.partition("=")
        if sep:
            last = name.strip()
            params[last] = value.strip()
    return params


def milter_entries(value: str) -> list[str]:
    """The milter addresses of a smtpd_milters value (separators: space and comma;
    a `{ address, option=... }` group counts as its address)."""
    entries: list[str] = []
    for group in re.finditer(r"\{([^}]*)\}|([^\s,{}]+)", value):
        if group.group(1) is not None:
            first = re.split(r"[\s,]+", group.group(1).strip())
            if first and first[0]:
                entries.append(first[0])
        else:
            entries.append(group.group(2))
    return entries


def postfix_milter_address(socket_spec: str) -> str:
    """Our [milter] socket (pymilter syntax) as Postfix names it."""
    kind, _, rest = socket_spec.partition(":")
    kind = kind.lower()
    if kind in ("unix", "local"):
        return f"unix:{rest}"
    if kind in ("inet", "inet6") and "@" in rest:
        port, _, host = rest.partition("@")
        return f"{kind}:{host}:{port}"
    return socket_spec


def _same_milter(entry: str, ours: str) -> bool:
    def norm(value: str) -> str:
        kind, _, rest = value.partition(":")
        return ("unix" if kind.lower() in ("unix", "local") else kind.lower()) + ":" + rest
    return norm(entry) == norm(ours)


def check_postfix_params(params: dict[str, str], milter_socket: str, where: str,
                         ) -> list[CheckResult]:
    """The milter settings of `postconf` output, judged."""
    results = []
    ours = postfix_milter_address(milter_socket)
    for name in ("smtpd_milters", "non_smtpd_milters"):
        entries = milter_entries(params.get(name, ""))
        if not any(_same_milter(e, ours) for e in entries):
            results.append(fail("postfix", f"{name} in {where} lacks {ours} "
                                f"(is: {params.get(name) or 'empty'})",
                                f"postconf -c {where} -e '{name} = {ours}' "
                                "(first in the list), then postfix reload"))
        elif not _same_milter(entries[0], ours):
            results.append(fail("postfix", f"{name} in {where}: {ours} is not first "
                                f"({params.get(name)})", "put milter-wkd first: later "
                                "milters (DKIM signers) must see the Autocrypt header"))
        else:
            results.append(ok("postfix", f"{name} = {params.get(name)}"))
    action = params.get("milter_default_action", "")
    if action == "tempfail":
        results.append(ok("postfix", "milter_default_action = tempfail"))
    elif action == "accept":
        results.append(warn(
            "postfix", "milter_default_action = accept: while the milter is down, "
            "submissions and outgoing mail pass unhandled",
            f"postconf -c {where} -e 'milter_default_action = tempfail'"))
    else:
        results.append(fail("postfix", f"milter_default_action = {action or '(unset)'}",
                            f"postconf -c {where} -e 'milter_default_action = tempfail'"))
    if params.get("milter_protocol") != "6":
        results.append(fail("postfix", f"milter_protocol = {params.get('milter_protocol')}",
                            f"postconf -c {where} -e 'milter_protocol = 6'"))
    else:
        results.append(ok("postfix", "milter_protocol = 6"))
    if "{auth_authen}" not in params.get("milter_mail_macros", "").split():
        # The milter asks Postfix for the macros it needs (SMFIF_SETSYMLIST, milter_wkd.
        # milter), which overrides this list for it: only an MTA that cannot be asked
        # leaves the milter blind to who logged in.
        results.append(warn("postfix", "milter_mail_macros lacks {auth_authen}: the milter "
                            "asks Postfix for it itself, but an MTA that cannot be asked "
                            "would not show it who logged in", f"postconf -c {where} -e "
                            "'milter_mail_macros = i {auth_type} {auth_authen} {auth_author} "
                            "{mail_addr} {mail_host} {mail_mailer}'"))
    else:
        results.append(ok("postfix", "milter_mail_macros has {auth_authen}"))
    return results


def run_postconf(config_dir: str, timeout: float) -> dict[str, str]:
    """postconf's view of config_dir; raises RuntimeError with postconf's complaint."""
    proc = subprocess.run(["postconf", "-c", config_dir, *POSTCONF_PARAMETERS],
                          capture_output=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        complaint = proc.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(complaint[-1] if complaint else f"postconf exited with "
                           f"{proc.returncode}")
    return parse_postconf(proc.stdout.decode(errors="replace"))


def check_postfix(config: Config, options: Options, params: dict[str, str] | None,
                  error: str | None) -> Iterator[CheckResult]:
    where = options.postfix_config_dir
    if params is None:
        yield fail("postfix", f"postconf -c {where}: {error}",
                   "install Postfix, or name its config directory: [check] "
                   "postfix_config_dir or --postfix-config-dir")
        return
    yield from check_postfix_params(params, config.milter.socket, where)


