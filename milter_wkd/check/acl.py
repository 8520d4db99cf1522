"""The directory's ACLs as the milter and anonymous clients meet them (group acl).

As the configured account: it reads the mail attributes of a user (one entry), cannot read
userPassword, lists pending_base, and creates then deletes a pending WKS request with a
random nonce for the first domain's submission address (what the milter does; it expires
in a minute should the delete fail). As anonymous: a `(mail=*)` search under base_dn
returns no entry (adminLimitExceeded is the intended answer) and cn=pgpServerInfo is
readable (dirmngr). Nothing a user can see is changed.

Configuration: [directory] base_dn, user_filter, mail_attributes, pending_base, and the
connection settings; the first [[domains]] submission_address.
Failures: each right that is missing, or present where it must not be, is a FAIL line
pointing at ldap/config/30-access.ldif; a rootDSE or cn=pgpServerInfo that anonymous
cannot read is a warning (only dirmngr's ldap:// keyserver needs them).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

from milter_wkd.check.results import CheckResult, fail, ok, warn
from milter_wkd.config import Config, DomainConfig
from milter_wkd.errors import MilterWkdError
from milter_wkd.store import probe
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.model import PendingRequest
from milter_wkd.store.probe import Probe
from milter_wkd.store.schema import PENDING_CLASS
from milter_wkd.values import Address, Fingerprint

ACL_FIX = "apply ldap/config/30-access.ldif (ldap/README.md step 4) with your names"


def probe_request(config: Config) -> PendingRequest:
    """A pending request the doctor may write: a random nonce, the first domain's
    submission address, expiring in a minute."""
    domain = config.domains[0] if config.domains else DomainConfig()
    now = int(time.time())
    return PendingRequest("check" + secrets.token_hex(12),
                          Address.parse(domain.submission_address),
                          Fingerprint.parse("0" * 40), b"milter-wkd check probe", now, now + 60)


def _presence(attributes: list[str]) -> str:
    return "".join(f"({probe.escape_filter(a)}=*)" for a in attributes)


def check_acls(session: Probe, config: Config, who: str) -> Iterator[CheckResult]:
    """The ACL probes, over `session` (bound as the configured account) and an anonymous
    connection of their own."""
    cfg = config.directory
    # 1. The account reads users' addresses, never their passwords.
    filt = f"(&{cfg.user_filter}(|{_presence(cfg.mail_attributes)}))"
    description, entries = session.search(cfg.base_dn, filt,
                                          [*cfg.mail_attributes, "userPassword"], size=1)
    addresses = [v for a in cfg.mail_attributes for v in entries[0].values(a)] if entries else []
    if not addresses:
        yield fail("acl", f"{who} finds no user with {'/'.join(cfg.mail_attributes)} below "
                   f"{cfg.base_dn} ({description})", "check [directory] base_dn, user_filter "
                   f"and mail_attributes; {ACL_FIX}")
    else:
        yield ok("acl", f"{who} reads {'/'.join(cfg.mail_attributes)} of users "
                 f"({entries[0].dn})")
        if entries[0].values("userPassword"):
            yield fail("acl", f"{who} can read userPassword of {entries[0].dn}",
                       f"only `by anonymous auth` may touch userPassword; {ACL_FIX}")
    # 2. It lists pending requests and may create and delete one.
    description, _ = session.search(cfg.pending_base, f"(objectClass={PENDING_CLASS})",
                                    ["1.1"], scope="one")
    if description not in ("success", "sizeLimitExceeded"):
        yield fail("acl", f"{who} cannot search {cfg.pending_base}: {description}", ACL_FIX)
    yield from _pending_write(config, who)
    # 3. Anonymous: no enumeration, but what dirmngr needs.
    with probe.connect(session.config, anonymous=True) as anonymous:
        yield from _anonymous(anonymous, config)


def _pending_write(config: Config, who: str) -> Iterator[CheckResult]:
    cfg = config.directory
    request = probe_request(config)
    with LdapStore(cfg) as store:
        try:
            # A generous limit: the probe is about rights, not about the rate limit.
            request = store.create_pending(request, limit=100)
        except MilterWkdError as exc:
            yield fail("acl", f"{who} cannot create a pending request below "
                       f"{cfg.pending_base}: {exc.reason}", ACL_FIX)
            return
        try:
            store.delete_pending(request)
        except MilterWkdError as exc:
            yield fail("acl", f"{who} created {request.dn} but cannot delete it: "
                       f"{exc.reason}", f"{ACL_FIX}; then `milter-wkd pending expire`")
            return
    yield ok("acl", f"{who} creates and deletes pending requests below {cfg.pending_base}")


def _anonymous(session: Probe, config: Config) -> Iterator[CheckResult]:
    cfg = config.directory
    presence = _presence(cfg.mail_attributes)
    description, entries = session.search(cfg.base_dn, f"(|{presence})",
                                          list(cfg.mail_attributes))
    if entries:
        yield fail("acl", f"anonymous enumerates addresses: (|{presence}) below "
                   f"{cfg.base_dn} returned {len(entries)} entries",
                   "anonymous must not search mail attributes, and its size limit "
                   f"must refuse unchecked searches (size.unchecked=1); {ACL_FIX}")
    else:
        yield ok("acl", f"anonymous cannot enumerate addresses ({description})")
    _description, root = session.search("", "(objectClass=*)", ["namingContexts"],
                                        scope="base")
    contexts = root[0].texts("namingContexts") if root else []
    suffix = next((c for c in contexts if cfg.base_dn.lower().endswith(c.lower())), None)
    if suffix is None:
        yield warn("acl", "anonymous sees no namingContexts holding "
                   f"{cfg.base_dn}: dirmngr (ldap://) cannot find the keys",
                   "allow anonymous to read the rootDSE")
        return
    info = f"cn=pgpServerInfo,{suffix}"
    description, entries = session.search(info, "(objectClass=*)", ["pgpBaseKeySpaceDN"],
                                          scope="base")
    if entries:
        yield ok("acl", f"anonymous reads {info} (dirmngr's ldap:// keyserver)")
    else:
        yield warn("acl", f"anonymous cannot read {info} ({description}): "
                   "gpg --keyserver ldap://... will not work",
                   "add it (ldap/milter-wkd-entries.ldif) and its read rule "
                   "(30-access.ldif)")
