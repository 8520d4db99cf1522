"""Configuration: one TOML file, every key defined once here with its default and meaning.

Sections are dataclasses; each field's `doc` metadata is the documentation that
`milter-wkd config example` prints, so the docs cannot drift from the code. A key may be
overridden by the environment variable `MILTER_WKD_<SECTION>_<KEY>` (upper case), parsed
as a TOML value when it is one and as a plain string otherwise.

Default file: /etc/milter-wkd/milter-wkd.toml (`--config FILE` names another); a missing
file is an error (`ConfigMissing`), never a silent fall-back to the built-in defaults.
Unknown sections or keys and values of the wrong type are errors (`ConfigError`) naming
the key: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milter_wkd.errors import MilterWkdError, Refused
from milter_wkd.openpgp.cleaning import DEFAULT_CURVES, MAX_INPUT_BYTES, Limits, Policy

DEFAULT_PATH = Path("/etc/milter-wkd/milter-wkd.toml")
# Field metadata of Config's one field that is no section of the file (`given`).
_NOT_A_SECTION = "not_a_section"
ENV_PREFIX = "MILTER_WKD_"


class ConfigError(MilterWkdError):
    """The configuration file or an override is wrong; the reason names the key."""


class ConfigMissing(ConfigError, Refused):
    """The configuration file does not exist: a usage error, refused (the command exits 2
    with `refused: <reason>`)."""


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True, slots=True)
class DirectoryConfig:
    uri: str = field(default="ldapi:///", metadata=_doc(
        "LDAP URI of the directory: ldap://, ldaps:// or ldapi:// (a unix socket); several, "
        "separated by spaces, are tried in order (failover to the next provider)."))
    bind_dn: str = field(default="", metadata=_doc(
        "DN to bind as. Empty: SASL EXTERNAL over ldapi://, anonymous otherwise."))
    bind_password: str = field(default="", metadata=_doc(
        "Password for bind_dn. Prefer bind_password_file."))
    bind_password_file: str = field(default="", metadata=_doc(
        "File holding the password for bind_dn (first line)."))
    ca_file: str = field(default="", metadata=_doc(
        "CA bundle to check the server certificate of ldaps:// (empty: system store)."))
    base_dn: str = field(default="dc=example,dc=org", metadata=_doc(
        "Subtree that holds the users."))
    user_filter: str = field(default="(objectClass=inetOrgPerson)", metadata=_doc(
        "Filter that every user entry matches (ANDed with the address filter)."))
    mail_attributes: list[str] = field(default_factory=lambda: ["mail"], metadata=_doc(
        "Attributes that hold a user's addresses (aliases included), e.g. mail, "
        "mailAlternateAddress."))
    pending_base: str = field(default="ou=wks-pending,dc=example,dc=org", metadata=_doc(
        "Entry under which pending WKS confirmation requests are kept."))
    claims_base: str = field(default="ou=wkd-claims,dc=example,dc=org", metadata=_doc(
        "Entry under which the claims on key material are kept: one entry per primary or "
        "subkey fingerprint naming the user entry that holds it (atomic uniqueness)."))
    timeout: float = field(default=2.0, metadata=_doc(
        "Seconds before an unanswered directory operation counts as 'directory down'."))
    pool_size: int = field(default=4, metadata=_doc(
        "Most directory connections one process keeps open (one per concurrent request)."))


_KNOWN_CURVES = DEFAULT_CURVES | {"brainpoolP256r1", "brainpoolP384r1", "brainpoolP512r1"}


@dataclass(frozen=True, slots=True)
class KeysConfig:
    max_input_bytes: int = field(default=MAX_INPUT_BYTES, metadata=_doc(
        "Largest key (as given, armored or binary) that is read at all. The default takes a "
        "64 MiB flooded key, which is cleaned in a single linear pass."))
    max_published_bytes: int = field(default=64 * 1024, metadata=_doc(
        "Largest cleaned key that is published (gpg caps a WKD answer at 256 KiB)."))
    min_rsa_bits: int = field(default=2048, metadata=_doc(
        "Smallest RSA key published. A weaker primary key is refused (the user must create "
        "a new key), a weaker subkey left out; Sequoia rejects RSA under 2048 bits."))
    min_dsa_bits: int = field(default=2048, metadata=_doc(
        "Smallest DSA or ElGamal key published (as min_rsa_bits)."))
    curves: list[str] = field(default_factory=lambda: sorted(DEFAULT_CURVES), metadata=_doc(
        "Elliptic curves published (EdDSA only on ed25519, ECDH also on cv25519): the ones "
        "GnuPG 2.2 and Sequoia both accept. brainpoolP256r1, brainpoolP384r1 and "
        "brainpoolP512r1 may be added, but Debian 12's sq cannot check them. RFC 9580 "
        "keys (Ed25519, X25519, Ed448, X448 as algorithms 25-28) are never published: "
        "GnuPG 2.2 cannot read them."))
    sha1_before_2023: bool = field(default=False, metadata=_doc(
        "Accept SHA-1 self-signatures made before 2023-02-01, as GnuPG 2.2 does. Off: "
        "Sequoia (sq, and programs built on it) rejects every SHA-1 self-signature since "
        "that date, so such keys are not published; the user refreshes them with "
        "gpg --cert-digest-algo SHA256 --quick-set-expire FPR 2y. MD5, RIPEMD-160 and "
        "SHA-3 self-signatures are never accepted."))

    def __post_init__(self) -> None:
        unknown = sorted(set(self.curves) - _KNOWN_CURVES)
        if unknown:
            raise ConfigError(f"[keys] curves: unknown curve(s) {', '.join(unknown)} (known: "
                              f"{', '.join(sorted(_KNOWN_CURVES))})")

    def limits(self, *, mailbox_only: bool = False) -> Limits:
        """The openpgp cleaning limits and publication policy these keys say."""
        return Limits(max_input=self.max_input_bytes, policy=Policy(
            min_rsa_bits=self.min_rsa_bits, min_dsa_bits=self.min_dsa_bits,
            curves=frozenset(self.curves), sha1_before_2023=self.sha1_before_2023,
            mailbox_only=mailbox_only))


@dataclass(frozen=True, slots=True)
class DomainConfig:
    """One mail domain that publishes keys ([[domains]] tables, one per domain)."""

    name: str = field(default="example.org", metadata=_doc("The mail domain."))
    submission_address: str = field(default="key-submission@example.org", metadata=_doc(
        "WKS submission address of the domain (policy and submission-address files)."))
    submission_key: str = field(
        default="/etc/milter-wkd/keys/example.org/submission.asc", metadata=_doc(
            "Armored secret key of the submission address (milter-wkd domain init makes it)."))
    submission_public_key: str = field(
        default="/etc/milter-wkd/keys/example.org/submission.pub", metadata=_doc(
            "Its public key, which the WKD responder serves like a user's key (clients "
            "encrypt submissions to it). milter-wkd domain init writes it."))
    auth_submit: bool = field(default=True, metadata=_doc(
        "Publish at once when the sender is logged in (SASL); advertised as auth-submit."))
    allow_unauthenticated: bool = field(default=True, metadata=_doc(
        "Accept submissions from senders who are not logged in, by the WKS confirmation "
        "round trip."))
    mailbox_only: bool = field(default=False, metadata=_doc(
        "Advertise mailbox-only in the WKS policy and enforce it: only user IDs that are a "
        "bare address (no name) are published. gpg-wks-client then adds such a user ID to "
        "the key it submits; other clients' keys with 'Name <addr>' user IDs are refused. "
        "Off (the default): 'Name <addr>' is published too, if it names one address."))
    dkim_selector: str = field(default="wkd", metadata=_doc(
        "DKIM selector of dkim_key: its TXT record is <selector>._domainkey.<domain>."))
    dkim_key: str = field(default="", metadata=_doc(
        "PEM private key for DKIM, Ed25519 or RSA (domain init makes an Ed25519 key); "
        "empty: generated mail is not signed by milter-wkd. Mail is signed with this key "
        "and, when dkim_rsa_key is set, with that one too: two signatures (RFC 8463)."))
    dkim_rsa_selector: str = field(default="wkd-rsa", metadata=_doc(
        "DKIM selector of dkim_rsa_key (must differ from dkim_selector)."))
    dkim_rsa_key: str = field(default="", metadata=_doc(
        "PEM private RSA key (2048 bits; domain init makes it) for a second signature "
        "beside dkim_key's Ed25519 one: every receiver verifies RSA, not all verify "
        "Ed25519, and each receiver uses the signature it can check. Recommended: Ed25519 in "
        "dkim_key and RSA here. Empty (the default): one signature, with dkim_key."))

    def __post_init__(self) -> None:
        if self.dkim_rsa_key and self.dkim_key and self.dkim_rsa_selector == self.dkim_selector:
            raise ConfigError(f"[[domains]] {self.name}: dkim_rsa_selector and dkim_selector "
                              f"are both {self.dkim_selector!r}; each key needs its own")


@dataclass(frozen=True, slots=True)
class MilterConfig:
    socket: str = field(default="unix:/run/milter-wkd/milter.sock", metadata=_doc(
        "Where the milter listens: unix:/path or inet:PORT@127.0.0.1."))
    socket_mode: str = field(default="0660", metadata=_doc(
        "Permissions of the unix socket (octal)."))
    socket_group: str = field(default="postfix", metadata=_doc(
        "Group of the unix socket: the MTA's user must be in it (empty: leave as is)."))
    timeout: int = field(default=600, metadata=_doc(
        "Seconds the MTA may take between milter commands."))
    max_submission_bytes: int = field(default=40 * 1024 * 1024, metadata=_doc(
        "Largest submission mail collected; larger ones are refused with 552 5.3.4. The "
        "default fits the largest that must pass (a flooded key of 150,000 certifications "
        "makes a 34 MB submission). Postfix refuses mail over its message_size_limit "
        "(default 10240000) before the milter sees it: raise that where submissions arrive."))
    body_memory_bytes: int = field(default=1024 * 1024, metadata=_doc(
        "A body collected by the milter (a submission, or mail it DKIM-signs) is kept in "
        "memory up to this size, the rest in an unnamed temporary file (mode 0600, gone "
        "when the message is done or the milter dies)."))
    max_large_bodies: int = field(default=2, metadata=_doc(
        "How many bodies over body_memory_bytes are read back and parsed at the same time "
        "(each costs a few times its size in memory while it is)."))
    large_body_wait: float = field(default=30.0, metadata=_doc(
        "Seconds a large body waits for its turn; then it gets 451 4.3.2 (the sender "
        "retries, nothing is lost). Submissions and our users' outgoing mail wait in "
        "separate queues of max_large_bodies each."))
    max_spool_bytes: int = field(default=256 * 1024 * 1024, metadata=_doc(
        "Octets of mail bodies that all messages together may keep in temporary files "
        "(bodies over body_memory_bytes wait there while they arrive). A body that would "
        "go over it gets 451 4.3.2 and is retried by the sender. Temporary files go to "
        "$TMPDIR (/tmp; with systemd's PrivateTmp a private one): on a tmpfs this is "
        "memory."))
    pending_days: int = field(default=3, metadata=_doc(
        "Days a WKS confirmation request stays valid."))
    max_pending_per_address: int = field(default=3, metadata=_doc(
        "Confirmation requests per address within pending_days (mail-bomb protection)."))
    trusted_networks: list[str] = field(default_factory=list, metadata=_doc(
        "Clients whose mail counts as our users' own without SASL (webmail hosts), e.g. "
        "[\"192.0.2.10/32\"]. Empty by default: a local relay or content filter on "
        "loopback would otherwise pass outside mail off as our users'."))
    autocrypt: bool = field(default=True, metadata=_doc(
        "Add Autocrypt headers to outgoing mail of users with a published key."))
    prefer_encrypt_mutual: bool = field(default=False, metadata=_doc(
        "Site default for prefer-encrypt=mutual when the user's entry does not say."))
    strip_inbound_autocrypt: bool = field(default=False, metadata=_doc(
        "Remove Autocrypt headers from unauthenticated mail whose From claims one of our "
        "domains (default: leave them; receivers check them against their own state)."))
    dkim_sign_outgoing: bool = field(default=False, metadata=_doc(
        "DKIM-sign our users' outgoing mail in the milter, after adding Autocrypt (for "
        "sites without an external signer)."))


@dataclass(frozen=True, slots=True)
class MailerConfig:
    method: str = field(default="smtp", metadata=_doc(
        "How generated mail leaves: smtp (to a reinjection port without milters), "
        "sendmail (the binary below) or folder (files in the folder below, for tests; "
        "\"directory\", its earlier name, is accepted too)."))
    smtp_host: str = field(default="127.0.0.1", metadata=_doc("Reinjection SMTP host."))
    smtp_port: int = field(default=10026, metadata=_doc(
        "Reinjection SMTP port: a Postfix smtpd WITHOUT milters, so nothing loops."))
    sendmail: str = field(default="/usr/sbin/sendmail", metadata=_doc(
        "sendmail binary for method sendmail."))
    directory: str = field(default="", metadata=_doc(
        "Folder for method folder (one .eml file per message)."))


@dataclass(frozen=True, slots=True)
class WebConfig:
    listen_address: str = field(default="0.0.0.0", metadata=_doc(  # noqa: S104
        "Address `milter-wkd web` listens on (HTTPS)."))
    port: int = field(default=443, metadata=_doc(
        "Port `milter-wkd web` listens on. WKD clients only ever use 443."))
    cert_file: str = field(default="/etc/milter-wkd/wkd.crt", metadata=_doc(
        "Certificate chain (PEM) for <domain> and openpgpkey.<domain> of every domain. "
        "Empty: plain HTTP, only behind a TLS reverse proxy on loopback (docs/nginx-wkd.conf)."))
    key_file: str = field(default="/etc/milter-wkd/wkd.key", metadata=_doc(
        "Private key (PEM, PKCS#8, unencrypted) of cert_file."))
    bind_dn: str = field(default="", metadata=_doc(
        "The responder's own read-only LDAP account, cn=wkd,ou=services,dc=example,dc=org "
        "in ldap/milter-wkd-entries.ldif: it binds as this instead of [directory] bind_dn, "
        "the milter's account, which may write keys. Empty: as [directory] says (for a "
        "file of the responder's own); `milter-wkd check` fails when that account can write."))
    bind_password_file: str = field(default="", metadata=_doc(
        "File holding the password of [web] bind_dn (first line), readable by the "
        "responder's user only: `milter-wkd directory passwords` writes "
        "/etc/milter-wkd/wkd.password, mode 0600, owner milter-wkd-web."))
    workers: int = field(default=0, metadata=_doc(
        "Server worker processes; 0: one per CPU core. Each keeps its own key cache."))
    threads: int = field(default=1, metadata=_doc(
        "Threads per worker that run the WSGI app. 1 is fastest while the directory fits "
        "cache_bytes (every answer comes from memory; a second thread only contends for "
        "Python's lock: benchmarks/wkd.py, 30 against 37 us of CPU per request); raise it "
        "when it does not fit, so that requests need not wait behind a directory look-up."))
    keep_alive_seconds: int = field(default=30, metadata=_doc(
        "Seconds an idle keep-alive connection may wait for its next request headers."))
    cache_bytes: int = field(default=256 * 1024 * 1024, metadata=_doc(
        "Memory budget of a worker's key cache (answers plus bookkeeping, estimated). A "
        "directory that fits is mirrored whole, so unknown addresses are answered from "
        "memory; a larger one is cached least-recently-used, misses asking the directory."))
    refresh_interval: float = field(default=0.25, metadata=_doc(
        "Seconds between checks of the directory's change token (contextCSN), only when "
        "the directory refuses the RFC 4533 sync the responder follows otherwise."))
    reconcile_interval: float = field(default=300.0, metadata=_doc(
        "Seconds between full checks that no cached entry was deleted unnoticed."))
    max_age: int = field(default=300, metadata=_doc(
        "Cache-Control max-age (seconds) of key, policy and submission-address answers; "
        "404 answers use at most 60."))

    def __post_init__(self) -> None:
        # An empty password would make the bind an unauthenticated one (RFC 4513 5.1.2).
        if self.bind_dn and not self.bind_password_file:
            raise ConfigError("[web] bind_dn needs bind_password_file")


@dataclass(frozen=True, slots=True)
class PortalConfig:
    """The self-service page (`milter-wkd portal`): users sign in with their mail address
    and mail password and publish or unpublish their own key. It writes as [directory]
    bind_dn, the milter's account."""

    listen: str = field(default="0.0.0.0:8443", metadata=_doc(
        "HOST:PORT `milter-wkd portal` listens on (HTTPS); --listen overrides it."))
    cert_file: str = field(default="/etc/milter-wkd/portal.crt", metadata=_doc(
        "Certificate chain (PEM) of the page's host name. Empty: plain HTTP, only behind a "
        "TLS reverse proxy on loopback (the session cookie is Secure: browsers send it over "
        "HTTPS only)."))
    key_file: str = field(default="/etc/milter-wkd/portal.key", metadata=_doc(
        "Private key (PEM, PKCS#8, unencrypted) of cert_file."))
    secret_key_file: str = field(default="/etc/milter-wkd/portal.secret", metadata=_doc(
        "File of at least 32 random bytes that sign the session cookies (e.g. `head -c 48 "
        "/dev/urandom > FILE`, mode 0600); replacing it signs everybody out."))
    behind_proxy: bool = field(default=False, metadata=_doc(
        "True only when a reverse proxy on this host (docs/nginx-wkd.conf) is the page's "
        "one client: its X-Forwarded-For, -Proto, -Host and -Prefix (one proxy) are then "
        "taken as the client's address (rate limits, logs), the scheme and host name a "
        "POST's Origin must match, and the path prefix. Never set it when clients reach "
        "the page directly: they could forge those headers."))
    provider_name: str = field(default="Example Mail", metadata=_doc(
        "The provider's name, shown on every page."))
    session_idle_seconds: int = field(default=900, metadata=_doc(
        "A session unused for this long is signed out."))
    session_max_seconds: int = field(default=8 * 3600, metadata=_doc(
        "A session is signed out this long after sign-in, however busy."))
    rate_window_seconds: int = field(default=900, metadata=_doc(
        "The sliding window of the password rate limits below."))
    rate_per_account: int = field(default=10, metadata=_doc(
        "Password attempts (sign-in and the unpublish confirmation) per address within "
        "rate_window_seconds; more are refused without asking the directory."))
    rate_per_client: int = field(default=30, metadata=_doc(
        "Password attempts per client IP address within rate_window_seconds. Counted in "
        "the memory of each worker process."))
    workers: int = field(default=1, metadata=_doc(
        "Server worker processes (each keeps its own rate-limit counters)."))
    threads: int = field(default=4, metadata=_doc(
        "Threads per worker that run the WSGI app (a sign-in waits for the directory)."))

    def __post_init__(self) -> None:
        if parse_host_port(self.listen) is None:
            raise ConfigError(f"[portal] listen: HOST:PORT, not {self.listen!r}")
        for name in ("session_idle_seconds", "session_max_seconds", "rate_window_seconds",
                     "rate_per_account", "rate_per_client", "workers", "threads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"[portal] {name}: must be positive")


# The probe groups of `milter-wkd check`, in the order it runs them ([check] skip).
CHECK_GROUPS = ("directory", "schema", "acl", "keys", "passwords", "responder",
                "submission-key", "dkim", "wkd", "portal", "postfix", "milter", "dovecot")
DEFAULT_WKD_URL = "https://openpgpkey.{domain}/.well-known/openpgpkey/{domain}/"
DEFAULT_PORTAL_URL = "https://keys.{domain}/"


def parse_host_port(text: str) -> tuple[str, int] | None:
    """`HOST:PORT` (`[::1]:443` for IPv6) as (host, port); None when it is not one."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


@dataclass(frozen=True, slots=True)
class CheckConfig:
    """Where `milter-wkd check` finds the peers that the other sections do not name; its
    command-line options override these."""

    postfix_config_dir: str = field(default="/etc/postfix", metadata=_doc(
        "Postfix's config directory, read with `postconf -c`."))
    dovecot_auth_socket: str = field(default="", metadata=_doc(
        "Dovecot's SASL socket for Postfix. Empty: Postfix's smtpd_sasl_path (with "
        "smtpd_sasl_type = dovecot), else /var/spool/postfix/private/auth."))
    wkd_url: str = field(default=DEFAULT_WKD_URL, metadata=_doc(
        "Base URL of the WKD folder to fetch; {domain} stands for each domain."))
    wkd_connect: str = field(default="", metadata=_doc(
        "HOST:PORT to connect to instead of looking up the URL's host in DNS (the "
        "certificate is still checked for the URL's host): a responder not yet in DNS, a "
        "test. Empty: DNS, as WKD clients do."))
    ca_file: str = field(default="", metadata=_doc(
        "CA bundle for the WKD certificate. Empty: the system store, as WKD clients use."))
    portal_url: str = field(default=DEFAULT_PORTAL_URL, metadata=_doc(
        "URL of the self-service page as users open it (probed only when the file has a "
        "[portal] section); {domain} stands for the first [[domains]] name."))
    portal_connect: str = field(default="", metadata=_doc(
        "HOST:PORT to connect to for portal_url instead of DNS (the certificate is still "
        "checked for the URL's host). Empty: DNS, as browsers do."))
    portal_ca_file: str = field(default="", metadata=_doc(
        "CA bundle for the page's certificate. Empty: ca_file, else the system store."))
    dns: bool = field(default=False, metadata=_doc(
        "Look up the DKIM TXT records (off: no resolver needed)."))
    skip: list[str] = field(default_factory=list, metadata=_doc(
        "Probe groups left out, of: " + ", ".join(CHECK_GROUPS) + "."))
    timeout: float = field(default=5.0, metadata=_doc("Seconds each probe may take."))

    def __post_init__(self) -> None:
        if self.wkd_connect and parse_host_port(self.wkd_connect) is None:
            raise ConfigError(f"[check] wkd_connect: HOST:PORT, not {self.wkd_connect!r}")
        if self.portal_connect and parse_host_port(self.portal_connect) is None:
            raise ConfigError(f"[check] portal_connect: HOST:PORT, not {self.portal_connect!r}")
        unknown = [name for name in self.skip if name not in CHECK_GROUPS]
        if unknown:
            raise ConfigError(f"[check] skip: unknown group(s) {', '.join(unknown)} "
                              f"(groups: {', '.join(CHECK_GROUPS)})")
        if self.timeout <= 0:
            raise ConfigError("[check] timeout: must be positive")


@dataclass(frozen=True, slots=True)
class Config:
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    web: WebConfig = field(default_factory=WebConfig)
    milter: MilterConfig = field(default_factory=MilterConfig)
    mailer: MailerConfig = field(default_factory=MailerConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    portal: PortalConfig = field(default_factory=PortalConfig)
    domains: list[DomainConfig] = field(default_factory=lambda: [DomainConfig()])
    # Not a section: the sections the file or the environment gave (`milter-wkd check`
    # probes the self-service page only for a config that has [portal]).
    given: frozenset[str] = field(default=frozenset(), compare=False,
                                  metadata={_NOT_A_SECTION: True})

    def domain(self, name: str) -> DomainConfig | None:
        lowered = name.lower()
        return next((d for d in self.domains if d.name.lower() == lowered), None)

    def responder_directory(self) -> DirectoryConfig:
        """[directory] as the WKD responder uses it: bound as [web] bind_dn when that is set
        (the milter's password, inline or in its file, is then never read)."""
        if not self.web.bind_dn:
            return self.directory
        return dataclasses.replace(self.directory, bind_dn=self.web.bind_dn, bind_password="",
                                   bind_password_file=self.web.bind_password_file)


def sections() -> list[dataclasses.Field[Any]]:
    """The fields of Config that are sections of the file, in its order."""
    return [f for f in dataclasses.fields(Config) if not f.metadata.get(_NOT_A_SECTION)]


def _field_types(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_type(section: str, name: str, value: Any, expected: Any) -> Any:
    where = f"[{section}] {name}"
    origin = typing.get_origin(expected)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, list) or not all(isinstance(v, item_type) for v in value):
            raise ConfigError(f"{where}: expected a list of {item_type.__name__}")
        return value
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(expected)
        if value is None and type(None) in options:
            return None
        expected = next(o for o in options if o is not type(None))
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
        raise ConfigError(f"{where}: expected {expected.__name__}, got {type(value).__name__}")
    return value


def _build_tables(name: str, list_type: Any, data: dict[str, Any]) -> list[Any]:
    """[[name]] tables; environment overrides do not reach into them."""
    (item_cls,) = typing.get_args(list_type)
    if name not in data:
        return [item_cls()]
    tables = data[name]
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"[[{name}]] must be a list of tables")
    hints = _field_types(item_cls)
    items = []
    for index, table in enumerate(tables):
        where = f"{name}[{index}]"
        for unknown in set(table) - set(hints):
            raise ConfigError(f"[[{name}]] #{index + 1}: unknown key {unknown!r}")
        items.append(item_cls(**{k: _check_type(where, k, v, hints[k])
                                 for k, v in table.items()}))
    return items


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def build(data: dict[str, Any], environ: typing.Mapping[str, str] | None = None) -> Config:
    """Build a Config from parsed TOML plus environment overrides."""
    environ = os.environ if environ is None else environ
    built: dict[str, Any] = {}
    known = {f.name: f for f in sections()}
    given = {name for name in data if name in known}
    for unknown in set(data) - set(known):
        raise ConfigError(f"unknown section [{unknown}]")
    for section_name, section_field in known.items():
        section_cls = _field_types(Config)[section_name]
        if typing.get_origin(section_cls) is list:
            built[section_name] = _build_tables(section_name, section_cls, data)
            continue
        section = data.get(section_name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"[{section_name}] must be a table")
        values = dict(section)
        hints = _field_types(section_cls)
        for unknown in set(values) - set(hints):
            raise ConfigError(f"[{section_name}] unknown key {unknown!r}")
        for key in hints:
            env_name = f"{ENV_PREFIX}{section_name}_{key}".upper()
            if env_name in environ:
                values[key] = _env_value(environ[env_name])
                given.add(section_name)
        checked = {k: _check_type(section_name, k, v, hints[k]) for k, v in values.items()}
        built[section_name] = section_cls(**checked)
        del section_field
    return Config(**built, given=frozenset(given))


def load(path: Path | str | None = None, environ: typing.Mapping[str, str] | None = None,
         ) -> Config:
    """Read the config file: path, or DEFAULT_PATH for None. A missing file is
    `ConfigMissing` either way: built-in defaults (dc=example,dc=org) would let a command
    act on a directory nobody chose."""
    file_path = Path(path) if path is not None else DEFAULT_PATH
    try:
        text = file_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        given = "" if path is not None else " (the default; give another with --config FILE)"
        raise ConfigMissing(f"config file {file_path} does not exist{given}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file_path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file_path} is not UTF-8 (octet {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file_path}: {exc}") from None
    return build(data, environ)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def example() -> str:
    """A complete, commented config file with every key at its default."""
    lines = ["# milter-wkd configuration. Every key is shown with its default.",
             f"# Environment variables {ENV_PREFIX}<SECTION>_<KEY> override keys.", ""]
    defaults = Config()
    for section in sections():
        value = getattr(defaults, section.name)
        if isinstance(value, list):
            lines.append(f"# One [[{section.name}]] table per entry.")
            lines.append(f"[[{section.name}]]")
            value = value[0]
        else:
            lines.append(f"[{section.name}]")
        for item in dataclasses.fields(value):
            doc = textwrap.wrap(item.metadata.get("doc", ""), 76, break_on_hyphens=False)
            lines.extend(f"# {text}" for text in doc)
            lines.append(f"{item.name} = {_toml_value(getattr(value, item.name))}")
        lines.append("")
    return "\n".join(lines)
