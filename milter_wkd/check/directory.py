"""The directory (groups directory, schema, acl): slapd answers and takes the milter's bind,
our schema is loaded, pending_base and claims_base exist; then, over the same connection,
the ACL probes of milter_wkd.check.acl.

- directory: connects to [directory] uri and binds as the configured account (bind_dn and
  its password, or SASL EXTERNAL over ldapi://) with the store's own connection code
  (milter_wkd.store.probe); Who am I?; pending_base and claims_base are visible. Bound as
  root over ldapi:// is a warning (the ACL probes then say little).
- schema: the subschema entry (rootDSE subschemaSubentry) lists our object classes
  wkdKeyHolder, wkdPendingRequest, wkdKeyClaim and the attribute types pgpKey,
  gpgFingerprint, wkdAddressHash, wkdNonce, wkdKeyDigest.

Configuration: [directory] uri, bind_dn, bind_password(_file), ca_file, timeout (capped by
the check's timeout, at least 2 s), pending_base, claims_base.
Failures: an unreachable slapd, a refused bind or an unreadable password file is one FAIL
line naming the fix, and schema and acl are then skipped.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

from milter_wkd.check.acl import check_acls
from milter_wkd.check.options import Options
from milter_wkd.check.results import CheckResult, fail, guarded, ok, skip, warn
from milter_wkd.config import Config, DirectoryConfig
from milter_wkd.store import probe
from milter_wkd.store.probe import ConnectFailed, Probe

SCHEMA_CLASSES = ("wkdKeyHolder", "wkdPendingRequest", "wkdKeyClaim")
SCHEMA_ATTRIBUTES = ("pgpKey", "gpgFingerprint", "wkdAddressHash", "wkdNonce", "wkdKeyDigest")
_SCHEMA_FIX = ("load the schemas: ldapadd -Y EXTERNAL -H ldapi:/// -f "
               "ldap/schema/gnupg-keyserver.ldif and -f ldap/schema/milter-wkd.ldif "
               "(ldap/README.md step 1)")


def probe_timeout(config: Config, options: Options) -> float:
    """What a directory probe may wait: [directory] timeout (at least 2 s), at most the
    check's own."""
    return min(options.timeout, max(config.directory.timeout, 2.0))


def identity(cfg: DirectoryConfig) -> str:
    """Who binds with these settings, in words."""
    if cfg.bind_dn:
        return cfg.bind_dn
    return "root (SASL EXTERNAL)" if cfg.uri.startswith("ldapi") else "anonymous"


def check_directory(config: Config, options: Options) -> Iterator[CheckResult]:
    """directory, then (over the same connection) schema and acl."""
    wanted = [g for g in ("directory", "schema", "acl") if g not in options.skip]
    if not wanted:
        return
    cfg = dataclasses.replace(config.directory, timeout=probe_timeout(config, options))
    who = identity(cfg)
    try:
        session = probe.connect(cfg)
    except ConnectFailed as failure:
        yield _connect_failure(cfg, who, failure)
        for group in ("schema", "acl"):
            if group in wanted:
                yield skip(group, "needs the directory")
        return
    with session:
        if "directory" in wanted:
            yield from guarded("directory", lambda: _bound(session, who))
        if "schema" in wanted:
            yield from guarded("schema", lambda: _schema(session))
        if "acl" in wanted:
            yield from guarded("acl", lambda: check_acls(session, config, who))


def _connect_failure(cfg: DirectoryConfig, who: str, failure: ConnectFailed) -> CheckResult:
    if failure.kind == "refused":
        return fail("directory", f"bind as {who} at {cfg.uri} refused: {failure.reason}",
                    f"check bind_dn and bind_password(_file) in [directory]; test with "
                    f"ldapwhoami -x -H {cfg.uri} -D '{cfg.bind_dn}' -W")
    if failure.kind == "password":
        return fail("directory", f"cannot read the bind password: {failure.reason}",
                    f"make bind_password_file readable ({cfg.bind_password_file})")
    return fail("directory", f"{cfg.uri} unreachable: {failure.reason}",
                f"start slapd, or correct [directory] uri; test with "
                f"ldapwhoami -x -H {cfg.uri}")


def _bound(session: Probe, who: str) -> Iterator[CheckResult]:
    cfg = session.config
    identity_ = session.whoami()
    said = (identity_ or "").removeprefix("dn:")
    yield ok("directory", f"bound as {who} at {cfg.uri}"
             + (f" (server says {identity_})" if said and said.lower() != who.lower() else ""))
    if not cfg.bind_dn and who.startswith("root"):
        yield warn("directory", "the milter binds as root over ldapi://: the ACL checks "
                   "below say little", "bind as the milter's own account (bind_dn = "
                   "cn=milter,ou=services,...)")
    description, entries = session.search(cfg.pending_base, "(objectClass=*)", ["1.1"],
                                          scope="base")
    if description == "noSuchObject" or (description == "success" and not entries):
        yield fail("directory", f"pending_base {cfg.pending_base} does not exist or is "
                   "not visible", "add it (ldap/milter-wkd-entries.ldif) or correct "
                   "[directory] pending_base")
    description, entries = session.search(cfg.claims_base, "(objectClass=*)", ["1.1"],
                                          scope="base")
    if description == "noSuchObject" or (description == "success" and not entries):
        yield fail("directory", f"claims_base {cfg.claims_base} does not exist or is "
                   "not visible", "add it (ldap/milter-wkd-entries.ldif), give the milter "
                   "write access to it (config/30-access.ldif) or correct "
                   "[directory] claims_base")


def _schema(session: Probe) -> Iterator[CheckResult]:
    _description, root = session.search("", "(objectClass=*)", ["subschemaSubentry"],
                                        scope="base")
    values = root[0].texts("subschemaSubentry") if root else []
    subschema = values[0] if values else "cn=Subschema"
    description, entries = session.search(subschema, "(objectClass=subschema)",
                                          ["objectClasses", "attributeTypes"], scope="base")
    if not entries:
        yield fail("schema", f"cannot read {subschema} ({description})",
                   "allow reading the subschema entry (frontend ACL: "
                   "to dn.base=\"cn=Subschema\" by * read)")
        return
    names = set()
    for value in entries[0].values("objectClasses") + entries[0].values("attributeTypes"):
        match = re.search(rb"NAME\s+(?:'([^']+)'|\(\s*'([^']+)')", value)
        if match:
            names.add((match.group(1) or match.group(2)).decode().lower())
    missing = [n for n in (*SCHEMA_CLASSES, *SCHEMA_ATTRIBUTES) if n.lower() not in names]
    if missing:
        yield fail("schema", f"{subschema} lacks {', '.join(missing)}", _SCHEMA_FIX)
    else:
        yield ok("schema", f"{subschema} has {', '.join(SCHEMA_CLASSES)} and "
                 f"{', '.join(SCHEMA_ATTRIBUTES)}")
