"""The service accounts (groups passwords, responder): no documented password opens one,
password files are private, and the WKD responder's account cannot write.

- passwords: binds as each service account (the configured bind DNs and cn=milter, cn=wkd,
  cn=dovecot beside them) with every password this project ever documented
  (milter_wkd.passwords.DOCUMENTED_PASSWORDS): one that works fails, named. A
  bind_password_file readable by others fails, by its group is a warning; a
  bind_password written in a file the responder reads too is a warning.
- responder: binds as the WKD responder does ([web] bind_dn, else [directory]: one config
  file tells both) and tries to write what it never may: a pending request (created and at
  once deleted should it succeed), and, on a user entry, each key attribute
  (KEY_WRITE_PROBES, by deleting a value no entry has: nothing changes either way).

Configuration: [directory] (uri, bind_dn, bind_password(_file), base_dn, user_filter,
pending_base, timeout) and [web] bind_dn, bind_password_file.
Failures: each account that a documented password opens, each open password file, and a
responder that can write are FAIL lines with the fix; an unreachable slapd skips the
probes that need it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from collections.abc import Iterator

from milter_wkd import passwords
from milter_wkd.check.acl import probe_request
from milter_wkd.check.directory import identity, probe_timeout
from milter_wkd.check.options import Options
from milter_wkd.check.results import CheckResult, fail, ok, skip, warn, why
from milter_wkd.config import Config, DirectoryConfig
from milter_wkd.errors import MilterWkdError, Unavailable
from milter_wkd.store import probe
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.probe import ConnectFailed, Probe

# (attribute, a value no entry has): deleting it gets past slapd's ACL check or not, and
# changes nothing either way.
KEY_WRITE_PROBES = (("pgpKey", b"milter-wkd check probe"), ("gpgMailbox", b"probe@invalid"),
                    ("wkdAddressHash", b"milter-wkd-check-probe"),
                    ("gpgFingerprint", b"0" * 40), ("pgpDisabled", b"0"))
_PASSWORDS_FIX = ("milter-wkd directory passwords (ldap/README.md step 6) sets random ones "
                  "and writes the 0600 files; then restart milter-wkd, milter-wkd-web, dovecot")
_RESPONDER_FIX = ("let the responder bind as the read-only account: [web] bind_dn = "
                  "\"cn=wkd,ou=services,...\" and bind_password_file = "
                  "\"/etc/milter-wkd/wkd.password\" (milter-wkd directory passwords writes "
                  "it); restart milter-wkd-web")


# -- passwords ---------------------------------------------------------------------------


def _service_dns(config: Config) -> list[str]:
    """The configured bind DNs, and cn=milter, cn=wkd and cn=dovecot beside each (Dovecot's
    account is in no file of ours, but ldap/milter-wkd-entries.ldif puts it there)."""
    found: dict[str, str] = {}
    for dn in (config.directory.bind_dn, config.web.bind_dn):
        if not dn:
            continue
        parent = probe.parent_dn(dn)
        siblings = ([passwords.account_dn(name, parent) for name in passwords.ACCOUNTS]
                    if parent is not None else [])
        for candidate in (dn, *siblings):
            found.setdefault(candidate.lower(), candidate)
    return list(found.values())


def check_passwords(config: Config, options: Options) -> Iterator[CheckResult]:
    cfg = dataclasses.replace(config.directory, timeout=probe_timeout(config, options))
    dns = _service_dns(config)
    if not dns:
        yield skip("passwords", "no bind_dn configured: no service account to try")
    else:
        yield from _documented_passwords(cfg, dns)
    for section, name in (("directory", config.directory.bind_password_file),
                          ("web", config.web.bind_password_file)):
        if not name:
            continue
        try:
            mode = stat.S_IMODE(os.stat(name).st_mode)
        except OSError as exc:
            yield fail("passwords", f"[{section}] bind_password_file {name}: {why(exc)}",
                       _PASSWORDS_FIX)
            continue
        if passwords.readable_by_others(mode):
            yield fail("passwords", f"[{section}] bind_password_file {name} is open to "
                       f"everybody (mode {mode:04o})", f"chmod 600 {name} (owner: the "
                       "service's user), then change the password: " + _PASSWORDS_FIX)
        elif passwords.readable_by_group(mode):
            yield warn("passwords", f"[{section}] bind_password_file {name} is open to its "
                       f"group (mode {mode:04o})", f"chmod 600 {name}")
        else:
            yield ok("passwords", f"[{section}] bind_password_file {name} is mode {mode:04o}")
    if config.directory.bind_password and config.web.bind_dn:
        yield warn("passwords", "[directory] bind_password is written in the config file, "
                   "which the responder reads too",
                   "use bind_password_file (mode 0600, the milter's user)")


def _documented_passwords(cfg: DirectoryConfig, dns: list[str]) -> Iterator[CheckResult]:
    try:
        accepted = [(dn, password) for dn in dns for password in passwords.DOCUMENTED_PASSWORDS
                    if probe.bind_accepted(cfg, dn, password)]
    except ConnectFailed:
        yield skip("passwords", "needs the directory")
        return
    for dn, password in accepted:
        yield fail("passwords", f"{dn} accepts the documented password {password!r}: "
                   "anybody who read the documentation can bind as it", _PASSWORDS_FIX)
    if not accepted:
        yield ok("passwords", f"no documented password "
                 f"({', '.join(passwords.DOCUMENTED_PASSWORDS)}) opens {'; '.join(dns)}")


# -- responder ---------------------------------------------------------------------------


def check_responder(config: Config, options: Options) -> Iterator[CheckResult]:
    cfg = dataclasses.replace(config.responder_directory(),
                              timeout=probe_timeout(config, options))
    source = "[web]" if config.web.bind_dn else "[directory]"
    who = identity(cfg)
    try:
        session = probe.connect(cfg)
    except ConnectFailed as failure:
        if failure.kind == "unreachable":
            yield skip("responder", "needs the directory")
            return
        yield fail("responder", f"the WKD responder's bind as {who} ({source}) at {cfg.uri} "
                   f"fails: {failure.reason}", _RESPONDER_FIX)
        return
    with session:
        writes = _pending_write(config, cfg)
        description, entries = session.search(cfg.base_dn, cfg.user_filter, ["1.1"], size=1)
        if entries:
            writes += _key_writes(session, entries[0].dn)
        else:
            yield warn("responder", f"the responder's account finds no user below "
                       f"{cfg.base_dn} ({description}) to try a key write on",
                       "check [directory] base_dn and user_filter")
    if writes:
        yield fail("responder", f"the WKD responder binds as {who} ({source}), which can "
                   f"write {', '.join(writes)}: an attacker who takes the Internet-facing "
                   "responder could change keys", _RESPONDER_FIX)
    else:
        yield ok("responder", f"the WKD responder binds as {who} ({source}) and can write "
                 f"neither pending requests nor {', '.join(a for a, _ in KEY_WRITE_PROBES)}")


def _pending_write(config: Config, cfg: DirectoryConfig) -> list[str]:
    with LdapStore(cfg) as store:
        try:
            request = store.create_pending(probe_request(config), limit=100)
        except Unavailable:
            raise
        except MilterWkdError:
            return []  # refused: as it should be
        with contextlib.suppress(MilterWkdError):
            store.delete_pending(request)
    return [f"pending requests (below {cfg.pending_base})"]


def _key_writes(session: Probe, target: str) -> list[str]:
    return [f"{attribute} (of {target})" for attribute, value in KEY_WRITE_PROBES
            if session.may_delete_value(target, attribute, value)]
