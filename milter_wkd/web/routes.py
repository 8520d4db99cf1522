"""Which WKD resource a request names: Host header and path in, a `Route` or an `HttpError` out.

Pure; no I/O. Accepted forms (draft-koch-openpgp-webkey-service §3.1), for configured
domains only:

    Host: openpgpkey.<domain>  /.well-known/openpgpkey/<domain>/hu/<hash>     (advanced)
    Host: <domain>             /.well-known/openpgpkey/hu/<hash>              (direct)
                               /.well-known/openpgpkey[/<domain>]/policy
                               /.well-known/openpgpkey[/<domain>]/submission-address

The `?l=` query is ignored: keys are found by hash (gpg lowercases `l`, sq keeps its case).
The domain in the path is case-insensitive like the Host (OpenPGP.js sends it as typed:
`…/openpgpkey/Example.ORG/hu/…`); ASCII letters only, so no Unicode case folding
(U+212A KELVIN SIGN is not k) lets a name past the checks.
Anything else is refused before any look-up: a path that is not one of these shapes, a hash
that is not 32 z-base-32 characters, percent-encoding, dots, an overlong path or Host (400
or 414), a Host or path domain we do not serve (404: nothing of ours lives there), a path
domain that differs from the Host's (400), a method other than GET/HEAD (405).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

MAX_PATH = 256
MAX_HOST = 260

_PREFIX = "/.well-known/openpgpkey/"
_HASH = re.compile(r"[ybndrfg8ejkmcpqxot1uwisza345h769]{32}")
# Host: a DNS name, optionally with a port and a trailing dot.
_HOST = re.compile(r"(?P<name>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)\.?(?::[0-9]{1,5})?")
_DOMAIN_SEGMENT = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
ADVANCED_LABEL = "openpgpkey."

Kind = Literal["key", "policy", "submission-address"]


@dataclass(frozen=True, slots=True)
class Route:
    kind: Kind
    domain: str
    hash: str = ""


class HttpError(Exception):
    """A request refused before any look-up: status line and a short plain-text reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


_ZBASE32 = "ybndrfg8ejkmcpqxot1uwisza345h769"


class Router:
    """Maps (method, Host, path) to a Route for a fixed set of served domains."""

    def __init__(self, domains: Iterable[str]) -> None:
        self.domains = frozenset(d.lower().rstrip(".") for d in domains)
        # Host headers as clients send them -> (domain, advanced): the fast path.
        self._exact_hosts: dict[str, tuple[str, bool]] = {}
        for domain in self.domains:
            for suffix in ("", ":443"):
                self._exact_hosts[domain + suffix] = (domain, False)
                self._exact_hosts[ADVANCED_LABEL + domain + suffix] = (domain, True)
        # (Host, key path without its 32-character hash) -> "@<domain>": every well-formed
        # key request of the fast path is one look-up here. The advanced host takes the
        # advanced path only; the domain itself takes both (as `route` does).
        self._key_heads: dict[tuple[str | None, str], str] = {}
        for host, (domain, advanced) in self._exact_hosts.items():
            self._key_heads[host, f"{_PREFIX}{domain}/hu/"] = "@" + domain
            if not advanced:
                self._key_heads[host, f"{_PREFIX}hu/"] = "@" + domain

    def fast_slot(self, host: str | None, path: str) -> str | None:
        """The slot `<hash>@<domain>` of a well-formed key request with a plain Host, else
        None (then `route` decides, carefully). The hot path: one dict look-up, no regex."""
        suffix = self._key_heads.get((host, path[:-32]))
        if suffix is None:
            suffix = self._folded_key_head(host, path[:-32])
            if suffix is None:
                return None
        hash_ = path[-32:]
        # strip() removes every z-base-32 character: nothing may be left of a valid hash.
        if hash_.strip(_ZBASE32):
            return None
        return hash_ + suffix

    def _folded_key_head(self, host: str | None, head: str) -> str | None:
        """`_key_heads` for a Host or path domain in mixed ASCII case (as `route` folds)."""
        if not head.isascii() or (host is not None and not host.isascii()):
            return None
        if head.startswith(_PREFIX) and head.endswith("/hu/") and len(head) > len(_PREFIX) + 3:
            head = _PREFIX + head[len(_PREFIX):-4].lower() + "/hu/"
        return self._key_heads.get((host.lower() if host is not None else None, head))

    def route(self, method: str, host: str | None, path: str) -> Route:
        if method not in ("GET", "HEAD"):
            raise HttpError(405, "only GET and HEAD")
        if len(path) > MAX_PATH:
            raise HttpError(414, "path too long")
        host_domain, advanced = self._host(host)
        if not path.startswith(_PREFIX):
            raise HttpError(404, "not a WKD path")
        parts = path[len(_PREFIX):].split("/")
        path_domain: str | None = None
        if len(parts) >= 2 and parts[0] not in ("hu", "policy", "submission-address"):
            path_domain = parts.pop(0)
            if not _DOMAIN_SEGMENT.fullmatch(path_domain) or ".." in path_domain:
                raise HttpError(400, "malformed domain in path")
            path_domain = path_domain.lower()
            if path_domain not in self.domains:
                raise HttpError(404, "domain not served here")
        domain = self._domain(host_domain, advanced, path_domain)
        if len(parts) == 2 and parts[0] == "hu":
            if not _HASH.fullmatch(parts[1]):
                raise HttpError(400, "malformed hash")
            return Route("key", domain, parts[1])
        if len(parts) == 1 and parts[0] in ("policy", "submission-address"):
            kind: Kind = "policy" if parts[0] == "policy" else "submission-address"
            return Route(kind, domain)
        if any(p in ("", ".", "..") or "%" in p or "\\" in p for p in parts):
            raise HttpError(400, "malformed path")
        raise HttpError(404, "no such WKD resource")

    def _host(self, host: str | None) -> tuple[str | None, bool]:
        """The served domain the Host names and whether it is the advanced host."""
        if host is None or host == "":
            return None, False
        if len(host) > MAX_HOST:
            raise HttpError(400, "Host header too long")
        match = _HOST.fullmatch(host)
        if match is None or ".." in host:
            raise HttpError(400, "malformed Host header")
        name = match.group("name").lower()
        if name in self.domains:
            return name, False
        if name.startswith(ADVANCED_LABEL) and name[len(ADVANCED_LABEL):] in self.domains:
            return name[len(ADVANCED_LABEL):], True
        raise HttpError(404, "host not served here")

    @staticmethod
    def _domain(host_domain: str | None, advanced: bool, path_domain: str | None) -> str:
        if path_domain is not None:
            if host_domain is not None and host_domain != path_domain:
                raise HttpError(400, "domain in path differs from Host")
            return path_domain
        if advanced:
            raise HttpError(404, "the advanced method names the domain in the path")
        if host_domain is None:
            # HTTP/1.0 without Host: the direct method cannot tell the domain.
            raise HttpError(400, "Host header required")
        return host_domain


def policy_text(submission_address: str, *, protocol_version: int, auth_submit: bool,
                mailbox_only: bool) -> bytes:
    """The WKD policy file: one keyword per line, every line LF-terminated (gpg-wks-client
    calls a last line without LF 'Line too long' and declares WKS unsupported)."""
    lines = [f"protocol-version: {protocol_version}",
             f"submission-address: {submission_address}"]
    if mailbox_only:
        lines.append("mailbox-only")
    if auth_submit:
        lines.append("auth-submit")
    return "".join(line + "\n" for line in lines).encode("ascii")


def submission_address_text(submission_address: str) -> bytes:
    return (submission_address + "\n").encode("ascii")
