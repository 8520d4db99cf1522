"""The keys (groups keys, submission-key): what the directory publishes was checked by the
system, and each domain's submission key pair on disk works.

- keys: every key holder below base_dn (as the configured account): an entry with a
  wkdKeyProblem, or whose wkdKeyDigest is missing or does not match its pgpKey, fails,
  named (the responder does not serve it; see milter_wkd.reconcile).
- submission-key: per domain, the secret key file is readable, not world-readable, not
  passphrase-protected, signs what its public key file verifies and decrypts what is
  encrypted to that public key; the public key names the submission address.

Configuration: [directory]; each [[domains]] submission_address, submission_key and
submission_public_key.
Failures: each unserved key and each unusable key file is a FAIL line with the fix; a
directory that cannot be listed skips the keys group.
"""

from __future__ import annotations

import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from milter_wkd import openpgp
from milter_wkd.check.results import CheckResult, fail, ok, skip
from milter_wkd.config import Config, DomainConfig
from milter_wkd.errors import MilterWkdError
from milter_wkd.openpgp import messages
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.schema import PROBLEM, Entry, checked
from milter_wkd.values import Address


def check_keys(config: Config) -> Iterator[CheckResult]:
    """Every key holder's pgpKey was checked by the system: its wkdKeyDigest matches and it
    has no wkdKeyProblem (an LDAP edit the milter's follower withheld). Each other entry is
    a failure naming it: the responder does not serve it."""
    try:
        with LdapStore(config.directory) as directory:
            holders = directory.key_holders_since("")
    except MilterWkdError as exc:
        yield skip("keys", f"cannot list the key holders: {exc.reason}")
        return
    published = 0
    for user, _csn in holders:
        entry = user.snapshot or Entry(user.dn, {})
        if not entry.values("pgpKey"):
            continue
        problem = entry.text(PROBLEM)
        if problem is not None:
            yield fail("keys", f"the key of {user.dn} is not served: {problem}",
                       "replace its pgpKey by a key with a user ID of the entry's own "
                       "addresses that no other entry holds (milter-wkd keys import ADDRESS "
                       "FILE), or delete the pgpKey")
        elif checked(entry) is not None:
            yield fail("keys", f"the pgpKey of {user.dn} was not checked by the system "
                       "(wkdKeyDigest missing or stale): it is not served",
                       "keep `milter-wkd milter` running (its follower checks LDAP edits "
                       f"within a second) and read its log for {user.dn}")
        else:
            published += 1
    yield ok("keys", f"{published} published key(s) checked by the system")


def check_submission_key(domain: DomainConfig) -> Iterator[CheckResult]:
    name = "submission-key"
    secret_path, public_path = Path(domain.submission_key), Path(domain.submission_public_key)
    fix_init = f"run `milter-wkd domain init --config FILE` for {domain.name}"
    try:
        secret = secret_path.read_bytes()
    except OSError as exc:
        yield fail(name, f"{domain.name}: cannot read {secret_path}: {exc.strerror}",
                   f"{fix_init}, or make the file readable by the milter's user")
        return
    try:
        public = public_path.read_bytes()
    except OSError as exc:
        yield fail(name, f"{domain.name}: cannot read {public_path}: {exc.strerror}",
                   "export the public key there (gpg --export --armor) or run "
                   "`milter-wkd domain init`")
        return
    try:
        info = openpgp.inspect_key(public)
    except MilterWkdError as exc:
        yield fail(name, f"{domain.name}: {public_path} is not a usable public key: "
                   f"{exc.reason}", fix_init)
        return
    probe = b"milter-wkd check " + secrets.token_bytes(16)
    try:
        signer = messages.verify_detached(probe, messages.sign_detached(probe, secret), public)
        plain = messages.decrypt(messages.encrypt(probe, [public]), secret)
    except MilterWkdError as exc:
        yield fail(name, f"{domain.name}: {secret_path} and {public_path} do not work "
                   f"together: {exc.reason}", "the public key file must be the public "
                   "part of the secret key (unprotected): re-export it, or run "
                   "`milter-wkd domain init` after removing both")
        return
    if plain != probe:
        yield fail(name, f"{domain.name}: decrypting with {secret_path} gave other data",
                   "re-create the key pair with `milter-wkd domain init`")
        return
    problems = []
    if not any(a.key == Address.parse(domain.submission_address).key for a in info.addresses):
        problems.append(f"it has no user ID for {domain.submission_address}")
    if secret_path.stat().st_mode & stat.S_IROTH:
        problems.append(f"{secret_path} is world-readable")
    if problems:
        yield fail(name, f"{domain.name}: key {info.fingerprint}: {'; '.join(problems)}",
                   "chmod 0600 the secret key (owned by the milter's user); the key's "
                   "user ID must be the submission address")
        return
    yield ok(name, f"{domain.name}: {secret_path} signs and decrypts for "
             f"{info.fingerprint} ({public_path.name}, signing key {signer.key_id})")
