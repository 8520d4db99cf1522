"""`milter-wkd check`: the admin's doctor. Probes every piece milter-wkd depends on and
says, one result per line, what works and what to fix.

What it reads and tries (each group can be skipped by name):
- directory: connects to [directory] uri and binds as the configured account (bind_dn and
  its password, or SASL EXTERNAL over ldapi://) with the store's own connection code
  (milter_wkd.store, python-ldap); Who am I?
- schema: the subschema entry (rootDSE subschemaSubentry) lists our object classes
  wkdKeyHolder, wkdPendingRequest, wkdKeyClaim and the attribute types pgpKey,
  gpgFingerprint, wkdAddressHash, wkdNonce, wkdKeyDigest; pending_base and claims_base
  exist.
- acl: as the configured account: reads the mail attributes of a user (one entry), cannot
  read userPassword, lists pending_base, and creates then deletes a pending WKS request
  with a random nonce for the submission address (what the milter does; it expires in a
  minute should the delete fail). As anonymous: a `(mail=*)` search under base_dn returns
  no entry (adminLimitExceeded is the intended answer) and cn=pgpServerInfo is readable
  (dirmngr). Nothing a user can see is changed.
- keys: every key holder below base_dn (as the configured account): an entry with a
  wkdKeyProblem, or whose wkdKeyDigest is missing or does not match its pgpKey, fails,
  named (the responder does not serve it; see milter_wkd.reconcile).
- passwords: binds as each service account (the configured bind DNs and cn=milter, cn=wkd,
  cn=dovecot beside them) with every password this project ever documented
  (milter_wkd.passwords.DOCUMENTED_PASSWORDS): one that works fails, named. A
  bind_password_file readable by others fails, by its group is a warning.
- responder: binds as the WKD responder does ([web] bind_dn, else [directory]: one config
  file tells both) and tries to write what it never may: a pending request (created and at
  once deleted should it succeed), and, on a user entry, the deletion of a value that no
  entry has from each key attribute (KEY_WRITE_PROBES): slapd checks the ACL first, so
  noSuchAttribute (or inappropriateMatching) means the write was allowed, yet nothing
  changed. Either fails, with the fix (the read-only cn=wkd).
- submission-key: per domain, the secret key file is readable, not world-readable, not
  passphrase-protected, signs what its public key file verifies and decrypts what is
  encrypted to that public key; the public key names the submission address.
- dkim: per domain, each configured key (dkim_rsa_key, which must be RSA, and dkim_key)
  loads, and a probe it signs verifies against its public key; with `dns` the TXT record
  at <selector>._domainkey.<domain> of each carries its public key (off by default).
- wkd: per domain, HTTPS with certificate validation (system store or ca_file; optionally
  connecting to another address while validating the real host name): the policy file
  (200, LF-terminated lines, submission-address and auth-submit as configured), the
  submission-address file, and the submission address's key (200, CORS header, the
  fingerprint of submission_public_key).
- postfix: `postconf -c DIR` for smtpd_milters, non_smtpd_milters (our socket, first),
  milter_default_action (tempfail; accept is a warning), milter_protocol (6) and
  milter_mail_macros ({auth_authen}).
- milter: the configured milter socket negotiates (SMFIC_OPTNEG answered by 'O').
- dovecot: the SASL socket (given, else Postfix's smtpd_sasl_path, else
  /var/spool/postfix/private/auth) speaks the Dovecot auth protocol and offers PLAIN.

How it fails: never. Every probe has a timeout (`Options.timeout`, a few seconds) and
any error, expected or not, becomes a failed `CheckResult` with the reason and a fix
hint; probes that depend on a failed one are reported as skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import os
import re
import secrets
import socket
import ssl
import stat
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import ldap
from ldap.dn import dn2str, str2dn
from ldap.filter import escape_filter_chars

from milter_wkd import dkim, openpgp, passwords
from milter_wkd.config import Config, DirectoryConfig, DomainConfig
from milter_wkd.errors import MilterWkdError, Unavailable
from milter_wkd.openpgp import messages
from milter_wkd.store.connection import (
    CONNECTION_ERRORS,
    RESULT_NAMES,
    ConnectionPool,
    close_connection,
)
from milter_wkd.store.connection import ldap_reason as _ldap_why
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.model import PendingRequest
from milter_wkd.store.schema import PENDING_CLASS, PROBLEM, checked
from milter_wkd.store.schema import Entry as StoreEntry
from milter_wkd.values import Address, Fingerprint
from milter_wkd.wkd import address_hash

GROUPS = ("directory", "schema", "acl", "keys", "passwords", "responder", "submission-key",
          "dkim", "wkd", "postfix", "milter", "dovecot")
DEFAULT_WKD_URL = "https://openpgpkey.{domain}/.well-known/openpgpkey/{domain}/"
DEFAULT_DOVECOT_SOCKET = "/var/spool/postfix/private/auth"
POSTCONF_PARAMETERS = ("smtpd_milters", "non_smtpd_milters", "milter_default_action",
                       "milter_protocol", "milter_mail_macros", "smtpd_sasl_type",
                       "smtpd_sasl_path", "queue_directory")
SCHEMA_CLASSES = ("wkdKeyHolder", "wkdPendingRequest", "wkdKeyClaim")
SCHEMA_ATTRIBUTES = ("pgpKey", "gpgFingerprint", "wkdAddressHash", "wkdNonce", "wkdKeyDigest")
MAX_BODY = 512 * 1024
_SCHEMA_FIX = ("load the schemas: ldapadd -Y EXTERNAL -H ldapi:/// -f "
               "ldap/schema/gnupg-keyserver.ldif and -f ldap/schema/milter-wkd.ldif "
               "(ldap/README.md step 1)")
_ACL_FIX = "apply ldap/config/30-access.ldif (ldap/README.md step 4) with your names"
# A search result entry as python-ldap gives it: DN, {attribute: [values]}.
Entry = tuple[str, dict[str, list[bytes]]]


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One line of the doctor's answer. ok: True passed, False failed, None skipped;
    warning: passed, but worth a look (does not fail the run)."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""
    warning: bool = False

    @property
    def label(self) -> str:
        if self.ok is None:
            return "skip"
        if not self.ok:
            return "FAIL"
        return "warn" if self.warning else "ok"


@dataclass(frozen=True, slots=True)
class Options:
    postfix_config_dir: str = "/etc/postfix"
    dovecot_auth_socket: str | None = None  # None: Postfix's smtpd_sasl_path, else default
    wkd_url: str = DEFAULT_WKD_URL  # "{domain}" is replaced by each domain's name
    wkd_connect: tuple[str, int] | None = None  # connect here, validate the URL's host
    ca_file: str | None = None  # None: the system store
    skip: frozenset[str] = field(default_factory=frozenset)
    dns: bool = False
    timeout: float = 5.0


def _why(exc: BaseException) -> str:
    if isinstance(exc, MilterWkdError):
        return exc.reason
    if isinstance(exc, ldap.LDAPError):
        return _ldap_why(exc)  # the RFC 4511 name of the result, and slapd's text
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]


def _ok(name: str, detail: str) -> CheckResult:
    return CheckResult(name, True, detail)


def _fail(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, False, detail, fix)


def _skip(name: str, detail: str) -> CheckResult:
    return CheckResult(name, None, detail)


def _guarded(name: str, probe: Callable[[], Iterable[CheckResult]]) -> Iterator[CheckResult]:
    """The probe's results; an exception it raises becomes one FAIL line."""
    try:
        yield from probe()
    except Exception as exc:  # noqa: BLE001 - the doctor reports, never raises
        yield _fail(name, f"unexpected error: {type(exc).__name__}: {_why(exc)}",
                    "this is a bug in the check or an unusual setup; run with -vv")


# -- directory -------------------------------------------------------------------------


def _connect(config: Config, timeout: float, *, anonymous: bool = False) -> Any:
    """A connection opened as the store opens its own (the milter's view of the directory);
    anonymous: then bound anonymously. Raises MilterWkdError (see _connect_failure)."""
    cfg = dataclasses.replace(config.directory, timeout=timeout)
    if anonymous:
        cfg = dataclasses.replace(cfg, bind_dn="")
    pool = ConnectionPool(cfg)
    conn = pool.open()
    if anonymous and pool.scheme == "ldapi":  # the store binds with SASL EXTERNAL there
        try:
            conn.simple_bind_s("", "")
        except BaseException:
            close_connection(conn)
            raise
    return conn


def _connect_failure(exc: MilterWkdError) -> BaseException:
    """What made the store's connection code fail: it raises its own errors `from None`,
    which keeps the original (the LDAP error, the OSError of the password file) as the
    context; a malformed uri has none."""
    return exc.__context__ or exc


def _identity(config: Config) -> str:
    cfg = config.directory
    if cfg.bind_dn:
        return cfg.bind_dn
    return "root (SASL EXTERNAL)" if cfg.uri.startswith("ldapi") else "anonymous"


def _search(conn: Any, base: str, filt: str, attributes: list[str], *,
            scope: int = ldap.SCOPE_SUBTREE, size: int = 0, timeout: float = 5.0,
            ) -> tuple[str, list[Entry]]:
    """(result name, entries); LDAP result errors are answers here, not exceptions (a
    broken or silent connection still raises). Entries come one message at a time, so
    that those before a sizeLimitExceeded are kept."""
    entries: list[Entry] = []
    try:
        msgid = conn.search_ext(base, scope, filt, attributes, timeout=timeout,
                                sizelimit=size)
        while True:
            kind, data, _id, _controls = conn.result3(msgid, all=0, timeout=timeout)
            if kind == ldap.RES_SEARCH_RESULT:
                return "success", entries
            # Search references come as (None, [urls]): not entries.
            entries += [(dn, attrs) for dn, attrs in data or () if dn is not None]
    except CONNECTION_ERRORS:
        raise
    except ldap.LDAPError as exc:
        return _result_name(exc), entries


def _result_name(exc: BaseException) -> str:
    """The RFC 4511 name of an LDAP error's result code (`noSuchObject`)."""
    detail = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    return RESULT_NAMES.get(detail.get("result", -1)) or str(
        detail.get("desc") or type(exc).__name__)


def _raw(entry: Entry, name: str) -> list[bytes]:
    for key, values in entry[1].items():
        if key.lower() == name.lower():
            return list(values)
    return []


def check_directory(config: Config, options: Options) -> Iterator[CheckResult]:
    """directory, then (over the same connection) schema and acl."""
    cfg = config.directory
    wanted = [g for g in ("directory", "schema", "acl") if g not in options.skip]
    if not wanted:
        return
    timeout = min(options.timeout, max(cfg.timeout, 2.0))
    who = _identity(config)
    try:
        conn = _connect(config, timeout)
    except MilterWkdError as failure:
        exc = _connect_failure(failure)
        if isinstance(exc, ldap.LDAPError) and not isinstance(exc, CONNECTION_ERRORS):
            fix = (f"check bind_dn and bind_password(_file) in [directory]; test with "
                   f"ldapwhoami -x -H {cfg.uri} -D '{cfg.bind_dn}' -W")
            detail = f"bind as {who} at {cfg.uri} refused: {_why(exc)}"
        elif isinstance(exc, OSError):
            fix = f"make bind_password_file readable ({cfg.bind_password_file})"
            detail = f"cannot read the bind password: {_why(exc)}"
        else:
            fix = (f"start slapd, or correct [directory] uri; test with "
                   f"ldapwhoami -x -H {cfg.uri}")
            detail = f"{cfg.uri} unreachable: {_why(exc)}"
        yield _fail("directory", detail, fix)
        for group in ("schema", "acl"):
            if group in wanted:
                yield _skip(group, "needs the directory")
        return
    try:
        if "directory" in wanted:
            yield from _guarded("directory", lambda: _bound(conn, config, who, timeout))
        if "schema" in wanted:
            yield from _guarded("schema", lambda: _schema(conn, timeout))
        if "acl" in wanted:
            yield from _guarded("acl", lambda: _acls(conn, config, who, timeout))
    finally:
        close_connection(conn)


def _bound(conn: Any, config: Config, who: str, timeout: float,
           ) -> Iterator[CheckResult]:
    cfg = config.directory
    try:
        identity = conn.whoami_s()
    except ldap.LDAPError:
        identity = None
    said = (identity or "").removeprefix("dn:")
    yield _ok("directory", f"bound as {who} at {cfg.uri}"
              + (f" (server says {identity})" if said and said.lower() != who.lower() else ""))
    if not cfg.bind_dn and who.startswith("root"):
        yield CheckResult("directory", True, "the milter binds as root over ldapi://: "
                          "the ACL checks below say little", "bind as the milter's own "
                          "account (bind_dn = cn=milter,ou=services,...)", warning=True)
    description, entries = _search(conn, cfg.pending_base, "(objectClass=*)", ["1.1"],
                                   scope=ldap.SCOPE_BASE, timeout=timeout)
    if description == "noSuchObject" or (description == "success" and not entries):
        yield _fail("directory", f"pending_base {cfg.pending_base} does not exist or is "
                    "not visible", "add it (ldap/milter-wkd-entries.ldif) or correct "
                    "[directory] pending_base")
    description, entries = _search(conn, cfg.claims_base, "(objectClass=*)", ["1.1"],
                                   scope=ldap.SCOPE_BASE, timeout=timeout)
    if description == "noSuchObject" or (description == "success" and not entries):
        yield _fail("directory", f"claims_base {cfg.claims_base} does not exist or is "
                    "not visible", "add it (ldap/milter-wkd-entries.ldif), give the milter "
                    "write access to it (config/30-access.ldif) or correct "
                    "[directory] claims_base")


def _schema(conn: Any, timeout: float) -> Iterator[CheckResult]:
    description, root = _search(conn, "", "(objectClass=*)", ["subschemaSubentry"],
                                scope=ldap.SCOPE_BASE, timeout=timeout)
    values = _raw(root[0], "subschemaSubentry") if root else []
    subschema = values[0].decode() if values else "cn=Subschema"
    description, entries = _search(conn, subschema, "(objectClass=subschema)",
                                   ["objectClasses", "attributeTypes"], scope=ldap.SCOPE_BASE,
                                   timeout=timeout)
    if not entries:
        yield _fail("schema", f"cannot read {subschema} ({description})",
                    "allow reading the subschema entry (frontend ACL: "
                    "to dn.base=\"cn=Subschema\" by * read)")
        return
    names = set()
    for value in _raw(entries[0], "objectClasses") + _raw(entries[0], "attributeTypes"):
        match = re.search(rb"NAME\s+(?:'([^']+)'|\(\s*'([^']+)')", value)
        if match:
            names.add((match.group(1) or match.group(2)).decode().lower())
    missing = [n for n in (*SCHEMA_CLASSES, *SCHEMA_ATTRIBUTES) if n.lower() not in names]
    if missing:
        yield _fail("schema", f"{subschema} lacks {', '.join(missing)}", _SCHEMA_FIX)
    else:
        yield _ok("schema", f"{subschema} has {', '.join(SCHEMA_CLASSES)} and "
                  f"{', '.join(SCHEMA_ATTRIBUTES)}")


def _acls(conn: Any, config: Config, who: str, timeout: float,
          ) -> Iterator[CheckResult]:
    cfg = config.directory
    # 1. The account reads users' addresses, never their passwords.
    presence = "".join(f"({escape_filter_chars(a)}=*)" for a in cfg.mail_attributes)
    filt = f"(&{cfg.user_filter}(|{presence}))"
    description, entries = _search(conn, cfg.base_dn, filt,
                                   [*cfg.mail_attributes, "userPassword"], size=1,
                                   timeout=timeout)
    addresses = [v for a in cfg.mail_attributes for v in _raw(entries[0], a)] if entries else []
    if not addresses:
        yield _fail("acl", f"{who} finds no user with {'/'.join(cfg.mail_attributes)} below "
                    f"{cfg.base_dn} ({description})", "check [directory] base_dn, user_filter "
                    f"and mail_attributes; {_ACL_FIX}")
    else:
        yield _ok("acl", f"{who} reads {'/'.join(cfg.mail_attributes)} of users "
                  f"({entries[0][0]})")
        if _raw(entries[0], "userPassword"):
            yield _fail("acl", f"{who} can read userPassword of {entries[0][0]}",
                        f"only `by anonymous auth` may touch userPassword; {_ACL_FIX}")
    # 2. It lists pending requests and may create and delete one.
    description, _ = _search(conn, cfg.pending_base, f"(objectClass={PENDING_CLASS})",
                             ["1.1"], scope=ldap.SCOPE_ONELEVEL, timeout=timeout)
    if description not in ("success", "sizeLimitExceeded"):
        yield _fail("acl", f"{who} cannot search {cfg.pending_base}: {description}", _ACL_FIX)
    yield from _pending_write_probe(config, who)
    # 3. Anonymous: no enumeration, but what dirmngr needs.
    yield from _anonymous(config, timeout)


def _pending_write_probe(config: Config, who: str) -> Iterator[CheckResult]:
    cfg = config.directory
    domain = config.domains[0] if config.domains else DomainConfig()
    nonce = "check" + secrets.token_hex(12)
    now = int(time.time())
    request = PendingRequest(nonce, Address.parse(domain.submission_address),
                             Fingerprint.parse("0" * 40), b"milter-wkd check probe",
                             now, now + 60)
    with LdapStore(cfg) as store:
        try:
            # A generous limit: the probe is about rights, not about the rate limit.
            request = store.create_pending(request, limit=100)
        except MilterWkdError as exc:
            yield _fail("acl", f"{who} cannot create a pending request below "
                        f"{cfg.pending_base}: {exc.reason}", _ACL_FIX)
            return
        try:
            store.delete_pending(request)
        except MilterWkdError as exc:
            yield _fail("acl", f"{who} created {request.dn} but cannot delete it: "
                        f"{exc.reason}", f"{_ACL_FIX}; then `milter-wkd pending expire`")
            return
    yield _ok("acl", f"{who} creates and deletes pending requests below {cfg.pending_base}")


def _anonymous(config: Config, timeout: float) -> Iterator[CheckResult]:
    cfg = config.directory
    anon = _connect(config, timeout, anonymous=True)
    try:
        presence = "".join(f"({escape_filter_chars(a)}=*)"
                           for a in cfg.mail_attributes)
        description, entries = _search(anon, cfg.base_dn, f"(|{presence})",
                                       list(cfg.mail_attributes), timeout=timeout)
        if entries:
            yield _fail("acl", f"anonymous enumerates addresses: (|{presence}) below "
                        f"{cfg.base_dn} returned {len(entries)} entries",
                        "anonymous must not search mail attributes, and its size limit "
                        f"must refuse unchecked searches (size.unchecked=1); {_ACL_FIX}")
        else:
            yield _ok("acl", f"anonymous cannot enumerate addresses ({description})")
        description, root = _search(anon, "", "(objectClass=*)", ["namingContexts"],
                                    scope=ldap.SCOPE_BASE, timeout=timeout)
        contexts = [v.decode() for v in _raw(root[0], "namingContexts")] if root else []
        suffix = next((c for c in contexts if cfg.base_dn.lower().endswith(c.lower())), None)
        if suffix is None:
            yield CheckResult("acl", True, "anonymous sees no namingContexts holding "
                              f"{cfg.base_dn}: dirmngr (ldap://) cannot find the keys",
                              "allow anonymous to read the rootDSE", warning=True)
            return
        info = f"cn=pgpServerInfo,{suffix}"
        description, entries = _search(anon, info, "(objectClass=*)", ["pgpBaseKeySpaceDN"],
                                       scope=ldap.SCOPE_BASE, timeout=timeout)
        if entries:
            yield _ok("acl", f"anonymous reads {info} (dirmngr's ldap:// keyserver)")
        else:
            yield CheckResult("acl", True, f"anonymous cannot read {info} ({description}): "
                              "gpg --keyserver ldap://... will not work",
                              "add it (ldap/milter-wkd-entries.ldif) and its read rule "
                              "(30-access.ldif)", warning=True)
    finally:
        close_connection(anon)


# -- keys ------------------------------------------------------------------------------


def check_submission_key(domain: DomainConfig) -> Iterator[CheckResult]:
    name = "submission-key"
    secret_path, public_path = Path(domain.submission_key), Path(domain.submission_public_key)
    fix_init = f"run `milter-wkd domain init --config FILE` for {domain.name}"
    try:
        secret = secret_path.read_bytes()
    except OSError as exc:
        yield _fail(name, f"{domain.name}: cannot read {secret_path}: {exc.strerror}",
                    f"{fix_init}, or make the file readable by the milter's user")
        return
    try:
        public = public_path.read_bytes()
    except OSError as exc:
        yield _fail(name, f"{domain.name}: cannot read {public_path}: {exc.strerror}",
                    "export the public key there (gpg --export --armor) or run "
                    "`milter-wkd domain init`")
        return
    try:
        info = openpgp.inspect_key(public)
    except MilterWkdError as exc:
        yield _fail(name, f"{domain.name}: {public_path} is not a usable public key: "
                    f"{exc.reason}", fix_init)
        return
    probe = b"milter-wkd check " + secrets.token_bytes(16)
    try:
        signer = messages.verify_detached(probe, messages.sign_detached(probe, secret), public)
        plain = messages.decrypt(messages.encrypt(probe, [public]), secret)
    except MilterWkdError as exc:
        yield _fail(name, f"{domain.name}: {secret_path} and {public_path} do not work "
                    f"together: {exc.reason}", "the public key file must be the public "
                    "part of the secret key (unprotected): re-export it, or run "
                    "`milter-wkd domain init` after removing both")
        return
    if plain != probe:
        yield _fail(name, f"{domain.name}: decrypting with {secret_path} gave other data",
                    "re-create the key pair with `milter-wkd domain init`")
        return
    problems = []
    if not any(a.key == Address.parse(domain.submission_address).key for a in info.addresses):
        problems.append(f"it has no user ID for {domain.submission_address}")
    if secret_path.stat().st_mode & stat.S_IROTH:
        problems.append(f"{secret_path} is world-readable")
    if problems:
        yield _fail(name, f"{domain.name}: key {info.fingerprint}: {'; '.join(problems)}",
                    "chmod 0600 the secret key (owned by the milter's user); the key's "
                    "user ID must be the submission address")
        return
    yield _ok(name, f"{domain.name}: {secret_path} signs and decrypts for "
              f"{info.fingerprint} ({public_path.name}, signing key {signer.key_id})")


def check_dkim(config: Config, domain: DomainConfig, dns: bool) -> Iterator[CheckResult]:
    configured = [(setting, path, selector, algorithm) for setting, path, selector, algorithm in (
        ("dkim_rsa_key", domain.dkim_rsa_key, domain.dkim_rsa_selector, "rsa"),
        ("dkim_key", domain.dkim_key, domain.dkim_selector, None)) if path]
    if not configured:
        if config.milter.dkim_sign_outgoing:
            yield _fail("dkim", f"{domain.name}: dkim_sign_outgoing is on but no dkim_key "
                        "is configured", "set dkim_key in [[domains]] and run "
                        "`milter-wkd domain init`")
        else:
            yield _skip("dkim", f"{domain.name}: no dkim_key (generated mail is not "
                        "DKIM-signed by milter-wkd)")
        return
    for setting, path, selector, algorithm in configured:
        try:
            key = dkim.load_key(Path(path), domain.name, selector,
                                "rsa" if algorithm == "rsa" else None)
        except MilterWkdError as exc:
            yield _fail("dkim", f"{domain.name}: {exc.reason}",
                        "run `milter-wkd domain init` to create it (then publish the TXT "
                        f"record it prints), or correct {setting}")
            continue
        probe = dkim.sign(_DKIM_PROBE.replace(b"@example.org", b"@" + key.domain.encode()),
                          key)
        if not dkim.verify(probe, {key.dns_name(): key.dns_record()}):
            yield _fail("dkim", f"{domain.name}: a signature made with {path} does not "
                        "verify against its own public key", "report this as a bug")
            continue
        yield _ok("dkim", f"{domain.name}: {key.algorithm} key {path} (selector {selector}) "
                  "signs, and its signature verifies")
        if not dns:
            yield _skip("dkim", f"{key.dns_name()} TXT not looked up (offline default; --dns)")
            continue
        yield from _dkim_dns(key)


_DKIM_PROBE = (b"From: milter-wkd check <postmaster@example.org>\r\nTo: postmaster@example.org"
               b"\r\nSubject: DKIM probe\r\n\r\nNot sent.\r\n")


def _dkim_dns(key: dkim.DkimKey) -> Iterator[CheckResult]:
    import dns.exception  # noqa: PLC0415 - only with --dns
    import dns.resolver  # noqa: PLC0415

    expected = f"DNS: {key.zone_line()}"
    try:
        answer = dns.resolver.resolve(key.dns_name(), "TXT", lifetime=5.0)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        yield _fail("dkim", f"no TXT record at {key.dns_name()}", f"publish {expected}")
        return
    except dns.exception.DNSException as exc:
        yield _skip("dkim", f"DNS lookup of {key.dns_name()} failed: {_why(exc)}")
        return
    records = [b"".join(r.strings).decode("ascii", "replace") for r in answer]
    published = [re.sub(r"\s+", "", r) for r in records]
    if any(f"p={key.public_b64()}" in r.split(";") for r in published):
        yield _ok("dkim", f"{key.dns_name()} TXT carries the key")
    else:
        yield _fail("dkim", f"{key.dns_name()} TXT does not carry this key "
                    f"({records[0][:60]!r}...)", f"publish {expected}")


# -- WKD over HTTPS ----------------------------------------------------------------------


class _Connection(http.client.HTTPSConnection):
    """HTTPS to `address` (when given) while validating, and asking for, the URL's host."""

    def __init__(self, host: str, port: int, *, address: tuple[str, int] | None,
                 tls: ssl.SSLContext, timeout: float) -> None:
        super().__init__(host, port, context=tls, timeout=timeout)
        self._address = address
        self._tls = tls

    def connect(self) -> None:
        target = self._address or (self.host, self.port)
        raw = socket.create_connection(target, self.timeout)
        try:
            self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


def https_get(url: str, *, ca_file: str | None, connect: tuple[str, int] | None,
              timeout: float) -> HttpAnswer:
    """GET url with certificate validation; raises OSError/ssl/http.client errors."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"not an https URL: {url}")
    tls = ssl.create_default_context(cafile=ca_file)
    conn = _Connection(parts.hostname, parts.port or 443, address=connect, tls=tls,
                       timeout=timeout)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", path, headers={"User-Agent": "milter-wkd-check"})
        response = conn.getresponse()
        body = response.read(MAX_BODY)
        return HttpAnswer(response.status, {k.lower(): v for k, v in response.getheaders()},
                          body)
    finally:
        conn.close()


def check_policy(body: bytes, domain: DomainConfig) -> list[str]:
    """What is wrong with a served policy file (empty: nothing)."""
    problems = []
    if not body:
        return ["it is empty"]
    if not body.endswith(b"\n"):
        problems.append("its last line does not end in LF (gpg-wks-client: 'Line too long')")
    if b"\r" in body:
        problems.append("it has CR characters (lines must end in LF only)")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return [*problems, "it is not UTF-8"]
    values: dict[str, str] = {}
    for line in text.replace("\r", "").splitlines():
        keyword, _, value = line.partition(":")
        if keyword.strip() and not keyword.strip().startswith("#"):
            values[keyword.strip().lower()] = value.strip()
    address = values.get("submission-address")
    if address is None:
        problems.append("no submission-address line")
    elif address.lower() != domain.submission_address.lower():
        problems.append(f"submission-address is {address}, the config says "
                        f"{domain.submission_address}")
    if ("auth-submit" in values) != domain.auth_submit:
        problems.append("auth-submit " + ("missing" if domain.auth_submit else "advertised")
                        + f" (the config says auth_submit = {str(domain.auth_submit).lower()})")
    if ("mailbox-only" in values) != domain.mailbox_only:
        problems.append("mailbox-only " + ("missing" if domain.mailbox_only else "advertised")
                        + f" (the config says mailbox_only = {str(domain.mailbox_only).lower()})")
    if "protocol-version" not in values:
        problems.append("no protocol-version line")
    return problems


def _wkd_fix(domain: str) -> str:
    return (f"run `milter-wkd web` (or the reverse proxy) for {domain} and openpgpkey.{domain} "
            "with this config")


def check_wkd(domain: DomainConfig, options: Options) -> Iterator[CheckResult]:
    base = options.wkd_url.replace("{domain}", domain.name.lower())
    if not base.endswith("/"):
        base += "/"
    host = urlsplit(base).hostname or "?"
    via = (f" via {options.wkd_connect[0]}:{options.wkd_connect[1]}"
           if options.wkd_connect else "")

    def get(url: str) -> HttpAnswer:
        return https_get(url, ca_file=options.ca_file, connect=options.wkd_connect,
                         timeout=options.timeout)

    try:
        policy = get(base + "policy")
    except ssl.SSLCertVerificationError as exc:
        yield _fail("wkd", f"{domain.name}: certificate of {host} not valid: "
                    f"{exc.verify_message or _why(exc)}",
                    f"install a certificate for {host} and {domain.name} from a public CA "
                    "(WKD clients use the system store), with its chain")
        return
    except (OSError, ssl.SSLError, http.client.HTTPException, ValueError) as exc:
        yield _fail("wkd", f"{domain.name}: {base}policy{via}: {_why(exc)}", _wkd_fix(domain.name)
                    + f"; {host} must resolve to it (DNS A/AAAA)")
        return
    if policy.status != 200:
        yield _fail("wkd", f"{domain.name}: {base}policy answered {policy.status}",
                    _wkd_fix(domain.name))
        return
    problems = check_policy(policy.body, domain)
    if problems:
        yield _fail("wkd", f"{domain.name}: policy file: {'; '.join(problems)}",
                    _wkd_fix(domain.name))
    else:
        yield _ok("wkd", f"{domain.name}: {base}policy (certificate valid, "
                  f"submission-address {domain.submission_address})")
    submission = get(base + "submission-address")
    if submission.status != 200 or submission.body != (
            domain.submission_address.encode() + b"\n"):
        yield _fail("wkd", f"{domain.name}: submission-address file: {submission.status} "
                    f"{submission.body[:80]!r}", _wkd_fix(domain.name))
    yield from _wkd_submission_key(domain, base, get)


def _wkd_submission_key(domain: DomainConfig, base: str, get: Callable[[str], HttpAnswer],
                        ) -> Iterator[CheckResult]:
    address = Address.parse(domain.submission_address)
    url = f"{base}hu/{address_hash(address)}?l={quote(address.local, safe='')}"
    try:
        expected = openpgp.inspect_key(Path(domain.submission_public_key).read_bytes())
    except (OSError, MilterWkdError) as exc:
        yield _skip("wkd", f"{domain.name}: submission key not compared "
                    f"(submission_public_key unusable: {_why(exc)})")
        return
    answer = get(url)
    if answer.status != 200:
        yield _fail("wkd", f"{domain.name}: the key of {address} is not served ({url}: "
                    f"{answer.status})", f"{_wkd_fix(domain.name)}; submission_public_key "
                    "must be readable by the responder")
        return
    try:
        served = openpgp.inspect_key(answer.body)
    except MilterWkdError as exc:
        yield _fail("wkd", f"{domain.name}: {url} is not a key: {exc.reason}",
                    _wkd_fix(domain.name))
        return
    problems = []
    if served.fingerprint != expected.fingerprint:
        problems.append(f"serves {served.fingerprint}, submission_public_key is "
                        f"{expected.fingerprint}")
    if answer.headers.get("access-control-allow-origin") != "*":
        problems.append("no `Access-Control-Allow-Origin: *` (browser clients need it)")
    if problems:
        yield _fail("wkd", f"{domain.name}: key of {address}: {'; '.join(problems)}",
                    _wkd_fix(domain.name))
    else:
        yield _ok("wkd", f"{domain.name}: serves {expected.fingerprint} for {address} "
                  "(with CORS)")


# -- Postfix, the milter socket, Dovecot ----------------------------------------------


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
            results.append(_fail("postfix", f"{name} in {where} lacks {ours} "
                                 f"(is: {params.get(name) or 'empty'})",
                                 f"postconf -c {where} -e '{name} = {ours}' "
                                 "(first in the list), then postfix reload"))
        elif not _same_milter(entries[0], ours):
            results.append(_fail("postfix", f"{name} in {where}: {ours} is not first "
                                 f"({params.get(name)})", "put milter-wkd first: later "
                                 "milters (DKIM signers) must see the Autocrypt header"))
        else:
            results.append(_ok("postfix", f"{name} = {params.get(name)}"))
    action = params.get("milter_default_action", "")
    if action == "tempfail":
        results.append(_ok("postfix", "milter_default_action = tempfail"))
    elif action == "accept":
        results.append(CheckResult(
            "postfix", True, "milter_default_action = accept: while the milter is down, "
            "submissions and outgoing mail pass unhandled",
            f"postconf -c {where} -e 'milter_default_action = tempfail'", warning=True))
    else:
        results.append(_fail("postfix", f"milter_default_action = {action or '(unset)'}",
                             f"postconf -c {where} -e 'milter_default_action = tempfail'"))
    if params.get("milter_protocol") != "6":
        results.append(_fail("postfix", f"milter_protocol = {params.get('milter_protocol')}",
                             f"postconf -c {where} -e 'milter_protocol = 6'"))
    else:
        results.append(_ok("postfix", "milter_protocol = 6"))
    if "{auth_authen}" not in params.get("milter_mail_macros", "").split():
        results.append(_fail("postfix", "milter_mail_macros lacks {auth_authen}: the milter "
                             "cannot see who logged in", f"postconf -c {where} -e "
                             "'milter_mail_macros = i {auth_type} {auth_authen} {auth_author} "
                             "{mail_addr} {mail_host} {mail_mailer}'"))
    else:
        results.append(_ok("postfix", "milter_mail_macros has {auth_authen}"))
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
        yield _fail("postfix", f"postconf -c {where}: {error}",
                    "install Postfix, or give its config directory with --postfix-config-dir")
        return
    yield from check_postfix_params(params, config.milter.socket, where)


def milter_negotiates(socket_spec: str, timeout: float) -> str:
    """Connect to a milter (pymilter syntax), offer SMFIC_OPTNEG, return its version text;
    raises OSError or ValueError."""
    kind, _, rest = socket_spec.partition(":")
    family: socket.AddressFamily
    target: Any
    if kind.lower() in ("unix", "local"):
        family, target = socket.AF_UNIX, rest
    elif kind.lower() in ("inet", "inet6") and "@" in rest:
        port, _, host = rest.partition("@")
        family = socket.AF_INET6 if kind.lower() == "inet6" else socket.AF_INET
        target = (host or "127.0.0.1", int(port))
    else:
        raise ValueError(f"unknown milter socket {socket_spec!r} (unix:/path, inet:PORT@HOST)")
    with socket.socket(family, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(target)
        conn.sendall(struct.pack("!IcIII", 13, b"O", 6, 0x1FF, 0x1FFFFF))
        header = _read_exactly(conn, 5)
        length, command = struct.unpack("!Ic", header)
        body = _read_exactly(conn, min(length - 1, 4096)) if length > 1 else b""
        if command != b"O" or len(body) < 4:
            raise ValueError(f"unexpected answer {command!r} to option negotiation")
        with contextlib.suppress(OSError):
            conn.sendall(struct.pack("!Ic", 1, b"Q"))
        return f"milter protocol {struct.unpack('!I', body[:4])[0]}"


def _read_exactly(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise ValueError("the peer closed the connection")
        data += chunk
    return data


def check_milter(config: Config, options: Options) -> Iterator[CheckResult]:
    spec = config.milter.socket
    try:
        version = milter_negotiates(spec, options.timeout)
    except (OSError, ValueError) as exc:
        yield _fail("milter", f"{spec} does not answer: {_why(exc)}",
                    "start it: milter-wkd milter --config FILE (systemd: milter-wkd.service); "
                    "[milter] socket must be where Postfix looks")
        return
    yield _ok("milter", f"{spec} answers ({version})")


def parse_auth_handshake(text: str) -> tuple[str | None, list[str]]:
    """(the VERSION line's major.minor, the MECH names) of a Dovecot auth server handshake."""
    version = None
    mechanisms = []
    for line in text.split("\n"):
        fields = line.split("\t")
        if fields[0] == "VERSION" and len(fields) >= 3:
            version = f"{fields[1]}.{fields[2]}"
        elif fields[0] == "MECH" and len(fields) >= 2:
            mechanisms.append(fields[1].upper())
    return version, mechanisms


def dovecot_handshake(path: str, timeout: float) -> str:
    """Talk the Dovecot auth protocol (client side) on a unix socket; the server's lines."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(path)
        conn.sendall(f"VERSION\t1\t1\nCPID\t{os.getpid()}\n".encode())
        data = b""
        while b"\nDONE\n" not in b"\n" + data and len(data) < 65536:
            try:
                chunk = conn.recv(4096)
            except ConnectionResetError:  # a peer that does not speak the protocol
                break
            if not chunk:
                break
            data += chunk
    return data.decode("utf-8", "replace")


def dovecot_socket(options: Options, params: dict[str, str] | None) -> str:
    if options.dovecot_auth_socket:
        return options.dovecot_auth_socket
    if params and params.get("smtpd_sasl_type") == "dovecot" and params.get("smtpd_sasl_path"):
        path = params["smtpd_sasl_path"]
        if not path.startswith("/") and params.get("queue_directory"):
            path = f"{params['queue_directory'].rstrip('/')}/{path}"
        if path.startswith("/"):
            return path
    return DEFAULT_DOVECOT_SOCKET


def check_dovecot(options: Options, params: dict[str, str] | None) -> Iterator[CheckResult]:
    path = dovecot_socket(options, params)
    fix = ("start Dovecot with the `service auth { unix_listener ... }` of "
           "dovecot/milter-wkd.conf; Postfix's smtpd_sasl_path must name the same socket "
           "(or pass --dovecot-auth-socket)")
    if not Path(path).exists():
        yield _fail("dovecot", f"SASL socket {path} does not exist", fix)
        return
    try:
        text = dovecot_handshake(path, options.timeout)
    except OSError as exc:
        yield _fail("dovecot", f"SASL socket {path}: {_why(exc)}", fix)
        return
    version, mechanisms = parse_auth_handshake(text)
    if version is None or not version.startswith("1."):
        yield _fail("dovecot", f"{path} does not speak the Dovecot auth protocol "
                    f"({text[:60]!r})", fix)
    elif "PLAIN" not in mechanisms:
        yield _fail("dovecot", f"{path} offers no PLAIN ({', '.join(mechanisms) or 'nothing'})",
                    "auth_mechanisms = plain login (dovecot/milter-wkd.conf)")
    else:
        yield _ok("dovecot", f"SASL socket {path} speaks auth protocol {version} "
                  f"({' '.join(mechanisms)})")


# -- keys -------------------------------------------------------------------------------


def check_keys(config: Config) -> Iterator[CheckResult]:
    """Every key holder's pgpKey was checked by the system: its wkdKeyDigest matches and it
    has no wkdKeyProblem (an LDAP edit the milter's follower withheld). Each other entry is
    a failure naming it: the responder does not serve it."""
    try:
        with LdapStore(config.directory) as directory:
            holders = directory.key_holders_since("")
    except MilterWkdError as exc:
        yield _skip("keys", f"cannot list the key holders: {exc.reason}")
        return
    published = 0
    for user, _csn in holders:
        entry = user.snapshot or StoreEntry(user.dn, {})
        if not entry.values("pgpKey"):
            continue
        problem = entry.text(PROBLEM)
        if problem is not None:
            yield _fail("keys", f"the key of {user.dn} is not served: {problem}",
                        "replace its pgpKey by a key with a user ID of the entry's own "
                        "addresses that no other entry holds (milter-wkd keys import ADDRESS "
                        "FILE), or delete the pgpKey")
        elif checked(entry) is not None:
            yield _fail("keys", f"the pgpKey of {user.dn} was not checked by the system "
                        "(wkdKeyDigest missing or stale): it is not served",
                        "keep `milter-wkd milter` running (its follower checks LDAP edits "
                        f"within a second) and read its log for {user.dn}")
        else:
            published += 1
    yield _ok("keys", f"{published} published key(s) checked by the system")


# -- service accounts: documented passwords, the responder's rights ----------------------

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


def _service_dns(config: Config) -> list[str]:
    """The configured bind DNs, and cn=milter, cn=wkd and cn=dovecot beside each (Dovecot's
    account is in no file of ours, but ldap/milter-wkd-entries.ldif puts it there)."""
    found: dict[str, str] = {}
    for dn in (config.directory.bind_dn, config.web.bind_dn):
        if not dn:
            continue
        try:
            parts = str2dn(dn)
        except ldap.DECODING_ERROR:
            parts = []
        siblings = [passwords.account_dn(name, dn2str(parts[1:]))
                    for name in passwords.ACCOUNTS] if len(parts) > 1 else []
        for candidate in (dn, *siblings):
            found.setdefault(candidate.lower(), candidate)
    return list(found.values())


def _bind_accepted(config: Config, dn: str, password: str, timeout: float) -> bool:
    """Whether slapd takes this password for dn; raises MilterWkdError when unreachable."""
    cfg = dataclasses.replace(config.directory, bind_dn=dn, bind_password=password,
                              bind_password_file="", timeout=timeout)
    try:
        close_connection(ConnectionPool(cfg).open())
    except MilterWkdError as failure:
        if isinstance(_connect_failure(failure), CONNECTION_ERRORS):
            raise
        return False
    return True


def check_passwords(config: Config, options: Options) -> Iterator[CheckResult]:
    timeout = min(options.timeout, max(config.directory.timeout, 2.0))
    dns = _service_dns(config)
    if not dns:
        yield _skip("passwords", "no bind_dn configured: no service account to try")
    else:
        yield from _documented_passwords(config, dns, timeout)
    for section, name in (("directory", config.directory.bind_password_file),
                          ("web", config.web.bind_password_file)):
        if not name:
            continue
        try:
            mode = stat.S_IMODE(os.stat(name).st_mode)
        except OSError as exc:
            yield _fail("passwords", f"[{section}] bind_password_file {name}: {_why(exc)}",
                        _PASSWORDS_FIX)
            continue
        if passwords.readable_by_others(mode):
            yield _fail("passwords", f"[{section}] bind_password_file {name} is open to "
                        f"everybody (mode {mode:04o})", f"chmod 600 {name} (owner: the "
                        "service's user), then change the password: " + _PASSWORDS_FIX)
        elif passwords.readable_by_group(mode):
            yield CheckResult("passwords", True, f"[{section}] bind_password_file {name} is "
                              f"open to its group (mode {mode:04o})", f"chmod 600 {name}",
                              warning=True)
        else:
            yield _ok("passwords", f"[{section}] bind_password_file {name} is mode "
                      f"{mode:04o}")
    if config.directory.bind_password and config.web.bind_dn:
        yield CheckResult("passwords", True, "[directory] bind_password is written in the "
                          "config file, which the responder reads too",
                          "use bind_password_file (mode 0600, the milter's user)", warning=True)


def _documented_passwords(config: Config, dns: list[str], timeout: float,
                          ) -> Iterator[CheckResult]:
    try:
        accepted = [(dn, password) for dn in dns for password in passwords.DOCUMENTED_PASSWORDS
                    if _bind_accepted(config, dn, password, timeout)]
    except MilterWkdError:
        yield _skip("passwords", "needs the directory")
        return
    for dn, password in accepted:
        yield _fail("passwords", f"{dn} accepts the documented password {password!r}: "
                    "anybody who read the documentation can bind as it", _PASSWORDS_FIX)
    if not accepted:
        yield _ok("passwords", f"no documented password "
                  f"({', '.join(passwords.DOCUMENTED_PASSWORDS)}) opens {'; '.join(dns)}")


def check_responder(config: Config, options: Options) -> Iterator[CheckResult]:
    cfg = dataclasses.replace(config.responder_directory(),
                              timeout=min(options.timeout, max(config.directory.timeout, 2.0)))
    source = "[web]" if config.web.bind_dn else "[directory]"
    who = cfg.bind_dn or ("root (SASL EXTERNAL)" if cfg.uri.startswith("ldapi")
                          else "anonymous")
    try:
        conn = ConnectionPool(cfg).open()
    except MilterWkdError as failure:
        exc = _connect_failure(failure)
        if isinstance(exc, CONNECTION_ERRORS):
            yield _skip("responder", "needs the directory")
            return
        yield _fail("responder", f"the WKD responder's bind as {who} ({source}) at {cfg.uri} "
                    f"fails: {_why(exc)}", _RESPONDER_FIX)
        return
    try:
        writes = _responder_pending_write(config, cfg)
        description, entries = _search(conn, cfg.base_dn, cfg.user_filter, ["1.1"], size=1,
                                       timeout=cfg.timeout)
        if entries:
            writes += _responder_key_writes(conn, entries[0][0])
        else:
            yield CheckResult("responder", True, f"the responder's account finds no user "
                              f"below {cfg.base_dn} ({description}) to try a key write on",
                              "check [directory] base_dn and user_filter", warning=True)
    finally:
        close_connection(conn)
    if writes:
        yield _fail("responder", f"the WKD responder binds as {who} ({source}), which can "
                    f"write {', '.join(writes)}: an attacker who takes the Internet-facing "
                    "responder could change keys", _RESPONDER_FIX)
    else:
        yield _ok("responder", f"the WKD responder binds as {who} ({source}) and can write "
                  f"neither pending requests nor {', '.join(a for a, _ in KEY_WRITE_PROBES)}")


def _responder_pending_write(config: Config, cfg: DirectoryConfig) -> list[str]:
    domain = config.domains[0] if config.domains else DomainConfig()
    now = int(time.time())
    request = PendingRequest("check" + secrets.token_hex(12),
                             Address.parse(domain.submission_address),
                             Fingerprint.parse("0" * 40), b"milter-wkd check probe", now,
                             now + 60)
    with LdapStore(cfg) as store:
        try:
            request = store.create_pending(request, limit=100)
        except Unavailable:
            raise
        except MilterWkdError:
            return []  # refused: as it should be
        with contextlib.suppress(MilterWkdError):
            store.delete_pending(request)
    return [f"pending requests (below {cfg.pending_base})"]


def _responder_key_writes(conn: Any, target: str) -> list[str]:
    writable = []
    for attribute, value in KEY_WRITE_PROBES:
        try:
            conn.modify_s(target, [(ldap.MOD_DELETE, attribute, [value])])
        except ldap.INSUFFICIENT_ACCESS:
            continue
        except CONNECTION_ERRORS:
            raise
        except ldap.LDAPError:
            pass  # past the ACL check: the value was missing, nothing changed
        writable.append(f"{attribute} (of {target})")
    return writable


# -- all of it --------------------------------------------------------------------------


def run(config: Config, options: Options) -> Iterator[CheckResult]:
    """Every check not in options.skip, in order; never raises."""
    skip = options.skip
    yield from _guarded("directory", lambda: check_directory(config, options))
    if "keys" not in skip:
        yield from _guarded("keys", lambda: check_keys(config))
    if "passwords" not in skip:
        yield from _guarded("passwords", lambda: check_passwords(config, options))
    if "responder" not in skip:
        yield from _guarded("responder", lambda: check_responder(config, options))
    for domain in config.domains:
        if "submission-key" not in skip:
            yield from _guarded("submission-key", partial(check_submission_key, domain))
        if "dkim" not in skip:
            yield from _guarded("dkim", partial(check_dkim, config, domain, options.dns))
        if "wkd" not in skip:
            yield from _guarded("wkd", partial(check_wkd, domain, options))
    params: dict[str, str] | None = None
    error: str | None = None
    if "postfix" not in skip or ("dovecot" not in skip and not options.dovecot_auth_socket):
        try:
            params = run_postconf(options.postfix_config_dir, options.timeout)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            error = _why(exc)
    if "postfix" not in skip:
        yield from _guarded("postfix", lambda: check_postfix(config, options, params, error))
    if "milter" not in skip:
        yield from _guarded("milter", lambda: check_milter(config, options))
    if "dovecot" not in skip:
        yield from _guarded("dovecot", lambda: check_dovecot(options, params))
