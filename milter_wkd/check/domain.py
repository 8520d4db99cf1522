"""`milter-wkd check --domain DOMAIN [--address ADDR]`: a public WKD checker for any domain,
with no config file (#14), probing what the real clients do:

- dns: does `openpgpkey.DOMAIN` have an address? Then clients use the advanced method
  only, and gpg does not fall back to the direct method when that server fails;
- tls: each method's host (openpgpkey.DOMAIN, DOMAIN) validates (system store or a CA
  file), its certificate not about to expire;
- policy: 200, every line LF-terminated, known keywords; the `submission-address` file
  agrees with the policy, and the submission address's key is served;
- key (with an address): per method the status, redirects (gpg follows 2), Content-Type,
  Content-Length, CORS, a binary body within gpg's 256 KiB, one v4 key with a user ID for
  the address, not expired or revoked, able to encrypt; the same answer with the
  `Authorization: Basic` header Thunderbird sends;
- hkp, vks (with an address): offered or not (404/501: not, info only).

Configuration: none; `DomainOptions` (from the command line) says where to connect
instead of DNS (`connect`, for tests), a CA file and the timeout.
Failures: every probe turns errors into FAIL lines naming the URL, with a fix; the
direct method's failures are warnings while `openpgpkey.DOMAIN` resolves (clients never
use it then). The pure parts, `parse_policy`, `judge_headers` and `judge_key`, take bytes.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import socket
import ssl
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal
from urllib.parse import quote, urljoin, urlsplit

from milter_wkd import openpgp
from milter_wkd.check.results import CheckResult, fail, guarded, ok, skip, warn, why
from milter_wkd.check.wkd import PinnedHttps
from milter_wkd.errors import BadAddress, MilterWkdError
from milter_wkd.openpgp import packets
from milter_wkd.values import Address
from milter_wkd.wkd import advanced_url, direct_url

# gpg refuses a WKD answer over this (MAX_WKD_RESULT_LENGTH, GnuPG g10/call-dirmngr.c).
GPG_WKD_LIMIT = 256 * 1024
# dirmngr follows this many redirects, then gives up (MAX_REDIRECTS, dirmngr/ks-engine-*.c).
GPG_MAX_REDIRECTS = 2
READ_LIMIT = 1024 * 1024
CERT_WARN_DAYS = 14
KEY_WARN_DAYS = 30
# Thunderbird's WKD look-up sends this ("no-user:").
THUNDERBIRD_AUTHORIZATION = "Basic " + base64.b64encode(b"no-user:").decode()
POLICY_KEYWORDS = frozenset({"mailbox-only", "dane-only", "auth-submit", "protocol-version",
                             "submission-address"})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_ENCRYPT_FLAGS = 0x04 | 0x08

Level = Literal["ok", "warn", "fail"]


@dataclass(frozen=True, slots=True)
class DomainOptions:
    domain: str
    address: Address | None = None
    connect: tuple[str, int] | None = None  # both hosts here, certificates still checked
    ca_file: str | None = None  # None: the system store
    timeout: float = 5.0
    now: int | None = None  # None: the clock


@dataclass(frozen=True, slots=True)
class Finding:
    """One judgment of a pure check: its level, what was found, what to do."""

    level: Level
    text: str
    fix: str = ""


@dataclass(frozen=True, slots=True)
class Method:
    """A WKD method: its name, host, folder URL; `required` False when clients skip it."""

    name: str
    host: str
    base: str
    required: bool = True

    def key_url(self, address: Address) -> str:
        return advanced_url(address) if self.name == "advanced" else direct_url(address)


def methods(domain: str) -> tuple[Method, Method]:
    domain = domain.lower()
    return (Method("advanced", f"openpgpkey.{domain}",
                   f"https://openpgpkey.{domain}/.well-known/openpgpkey/{domain}/"),
            Method("direct", domain, f"https://{domain}/.well-known/openpgpkey/"))


# -- pure judgments ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PolicyFile:
    flags: dict[str, str]  # keyword (lowercased) -> value ("" for a bare flag)
    problems: tuple[str, ...]  # what makes clients misread it
    unknown: tuple[str, ...] = ()  # keywords clients ignore


def parse_policy(body: bytes) -> PolicyFile:
    """A policy file as gpg-wks-client reads it: one keyword per LF-terminated line, an
    optional `: value`; an empty file is a valid one (WKD, no flags)."""
    problems: list[str] = []
    if body and not body.endswith(b"\n"):
        problems.append("its last line does not end in LF (gpg-wks-client: 'Line too "
                        "long', and then it treats the domain as not supporting WKS)")
    if b"\r" in body:
        problems.append("it has CR characters (gpg-wks-client reads 'mailbox-only\\r' as an "
                        "unknown keyword): lines must end in LF only")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return PolicyFile({}, (*problems, "it is not UTF-8 text"))
    flags: dict[str, str] = {}
    unknown: list[str] = []
    for line in text.replace("\r", "").split("\n"):
        keyword, _, value = line.partition(":")
        keyword = keyword.strip().lower()
        if not keyword or keyword.startswith("#"):
            continue
        if keyword not in POLICY_KEYWORDS:
            unknown.append(keyword)
        flags[keyword] = value.strip()
    version = flags.get("protocol-version")
    if version is not None and not version.isdigit():
        problems.append(f"protocol-version is {version!r}, not a number")
    address = flags.get("submission-address")
    if address is not None:
        try:
            Address.parse(address)
        except BadAddress:
            problems.append(f"submission-address {address!r} is not a mail address")
    if "html" in text[:200].lower():
        problems.append("it looks like an HTML page, not a policy file")
    return PolicyFile(flags, tuple(problems), tuple(unknown))


def judge_headers(headers: Mapping[str, str]) -> list[Finding]:
    """A key answer's headers (names lowercased): Content-Type, Content-Length, CORS."""
    found: list[Finding] = []
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "text/html":
        found.append(Finding("fail", "Content-Type is text/html (Thunderbird takes that for "
                             "'not found')", "serve hu/ files as application/octet-stream"))
    elif kind != "application/octet-stream":
        found.append(Finding("warn", f"Content-Type is {kind or 'missing'}, not "
                             "application/octet-stream",
                             "serve hu/ files as application/octet-stream"))
    if "content-length" not in headers:
        found.append(Finding("warn", "no Content-Length (dirmngr speaks HTTP/1.0 and reads "
                             "to the end; some clients need the length)",
                             "let the server send Content-Length (no chunked encoding)"))
    if headers.get("access-control-allow-origin") != "*":
        found.append(Finding("fail", "no `Access-Control-Allow-Origin: *` (browser clients: "
                             "Mailvelope, Proton and OpenPGP.js pages cannot read the key)",
                             "add the header `Access-Control-Allow-Origin: *` to "
                             "/.well-known/openpgpkey/"))
    return found


def _split_keys(data: bytes) -> list[bytes]:
    """The transferable keys of a binary keyring, each from its public key packet on."""
    starts = [start for tag, start, _, _ in packets.frames(data) if tag == packets.TAG_PUBLIC_KEY]
    if not starts or starts[0] != 0:
        raise openpgp.KeyRefused("it does not start with a public key packet")
    return [data[a:b] for a, b in zip(starts, [*starts[1:], len(data)], strict=True)]


def _day(stamp: int) -> str:
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).strftime("%Y-%m-%d")


def _judge_one(data: bytes, address: Address, now: int) -> tuple[list[Finding], str]:
    """One transferable key: its findings and a short description."""
    version = data[next(packets.iter_packets(data)).body_start]
    if version == 6:
        return [Finding("warn", "a v6 key (RFC 9580): gpg 2.2 and other v4-only clients "
                        "cannot read it", "publish a v4 key too, or instead")], "v6 key"
    try:
        result = openpgp.clean_key(data, None, now=now)
    except MilterWkdError as exc:
        return [Finding("fail", f"a key clients cannot use: {exc.reason}",
                        "publish a valid key: gpg --export ADDRESS")], "unusable key"
    info, clean = result.info, result.clean
    described = f"{info.fingerprint.hex}"
    found: list[Finding] = []
    matching = [a for a in info.addresses if a.key == address.key]
    others = sorted({str(a) for a in info.addresses if a.key != address.key})
    if not matching:
        found.append(Finding("fail", f"{described} has no valid user ID for {address} (gpg "
                             "imports only user IDs matching the address: it gets nothing)",
                             f"add a user ID for {address}: gpg --quick-add-uid "
                             f"{info.fingerprint.hex} {address}"))
    if others and matching:
        found.append(Finding("warn", f"{described} also carries user IDs for "
                             f"{', '.join(others)} (gpg keeps only the matching one; "
                             "Thunderbird, Mailvelope and sq import all, disclosing them)",
                             "publish a copy filtered to one user ID: gpg --export "
                             f"--export-filter keep-uid=mbox={address} FPR"))
    if result.stats["dropped:duplicate-user-id-for-address"]:
        found.append(Finding("warn", f"{described} has several user IDs for {address} "
                             "(OpenKeychain fails on them)",
                             "revoke all but one: gpg --quick-revoke-uid FPR UID"))
    if info.revoked:
        found.append(Finding("fail", f"{described} is revoked",
                             "publish the current key (or none)"))
    if info.expires is not None and info.expires <= now:
        found.append(Finding("fail", f"{described} expired on {_day(info.expires)}",
                             f"extend it: gpg --quick-set-expire {info.fingerprint.hex} 2y, "
                             "and publish it again"))
    elif info.expires is not None and info.expires - now < KEY_WARN_DAYS * 86400:
        found.append(Finding("warn", f"{described} expires on {_day(info.expires)}",
                             f"extend it: gpg --quick-set-expire {info.fingerprint.hex} 2y"))
    if info.revoked or (info.expires is not None and info.expires <= now):
        return found, described
    primary_flags = [u.signature.key_flags for u in clean.user_ids]
    primary_encrypts = clean.primary.can_encrypt and any(
        flags is None or flags & _ENCRYPT_FLAGS for flags in primary_flags)
    subkeys = [s for s in info.subkeys if "e" in s.usage and not s.revoked
               and (s.expires is None or s.expires > now)]
    if not primary_encrypts and not subkeys:
        found.append(Finding("fail", f"{described} has no valid encryption-capable subkey "
                             "(clients cannot encrypt to it)",
                             f"gpg --quick-add-key {info.fingerprint.hex} future-default "
                             "encr 2y, and publish it again"))
    else:
        sub = subkeys[0] if subkeys else None
        described += (f" (v4 {info.algorithm}{f' {info.curve}' if info.curve else ''}"
                      + (f", encryption subkey {sub.curve or sub.algorithm}" if sub else "")
                      + (f", expires {_day(info.expires)}" if info.expires else "") + ")")
    return found, described


def judge_key(body: bytes, address: Address, now: int | None = None,
              ) -> tuple[list[Finding], str]:
    """A WKD answer's body for `address`: findings (empty: all good) and what it holds."""
    now = int(time.time()) if now is None else now
    found: list[Finding] = []
    if not body:
        return [Finding("fail", "the body is empty", "serve the binary key")], "nothing"
    if len(body) > GPG_WKD_LIMIT:
        found.append(Finding("fail", f"{len(body)} octets, over gpg's WKD limit of "
                             f"{GPG_WKD_LIMIT} (MAX_WKD_RESULT_LENGTH): gpg refuses it",
                             "publish a minimal key: gpg --export --export-options "
                             "export-minimal ADDRESS"))
    if packets.looks_armored(body):
        found.append(Finding("fail", "the key is ASCII-armored (WKD serves binary; Proton "
                             "rejects armored keys)", "publish `gpg --export ADDRESS` "
                             "without --armor"))
        try:
            _, body = packets.dearmor(body)
        except MilterWkdError as exc:
            return [*found, Finding("fail", f"broken armor: {exc.reason}", "")], "nothing"
    try:
        keys = _split_keys(body)
    except MilterWkdError as exc:
        return [*found, Finding("fail", f"not OpenPGP data: {exc.reason}",
                                "serve the binary key (gpg --export ADDRESS)")], "nothing"
    judged = [_judge_one(key, address, now) for key in keys]
    usable = [(problems, text) for problems, text in judged
              if not any(p.level == "fail" for p in problems)]
    if not usable:  # every key's failures count
        return [*found, *(p for problems, _ in judged for p in problems)], "; ".join(
            text for _, text in judged)
    # A revoked or expired old key beside the current one is what the draft allows for.
    found += [p for problems, _ in usable for p in problems]
    described = "; ".join(text for _, text in usable)
    if len(usable) > 1:
        found.append(Finding("warn", f"{len(usable)} usable keys in one answer ({described}):"
                             " gpg imports all, other clients pick one of them",
                             "publish one current key per address (beside it only revoked "
                             "or expired ones)"))
    if len(usable) < len(judged):
        described += f", beside {len(judged) - len(usable)} unusable one(s)"
    return found, described


# -- HTTPS ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Answer:
    url: str  # the last URL asked
    status: int
    headers: dict[str, str]
    body: bytes  # at most READ_LIMIT octets
    redirects: tuple[str, ...] = ()
    truncated: bool = False


def _request(url: str, options: DomainOptions, headers: Mapping[str, str]) -> Answer:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"not an https URL: {url}")
    tls = ssl.create_default_context(cafile=options.ca_file)
    conn = PinnedHttps(parts.hostname, parts.port or 443, address=options.connect, tls=tls,
                  timeout=options.timeout)
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", path, headers={"User-Agent": "milter-wkd-check", **headers})
        response = conn.getresponse()
        body = response.read(READ_LIMIT + 1)
        return Answer(url, response.status,
                      {k.lower(): v for k, v in response.getheaders()},
                      body[:READ_LIMIT], truncated=len(body) > READ_LIMIT)
    finally:
        conn.close()


def fetch(url: str, options: DomainOptions, headers: Mapping[str, str] | None = None,
          ) -> Answer:
    """GET with up to GPG_MAX_REDIRECTS redirects followed (to https only), as dirmngr does;
    raises OSError, ssl, http.client errors and ValueError."""
    redirects: list[str] = []
    while True:
        answer = _request(url, options, headers or {})
        location = answer.headers.get("location")
        if answer.status not in _REDIRECTS or not location or len(redirects) == GPG_MAX_REDIRECTS:
            return replace(answer, redirects=tuple(redirects))
        url = urljoin(url, location)
        redirects.append(url)
        if not url.startswith("https://"):
            return replace(answer, redirects=tuple(redirects))


def _redirect_findings(answer: Answer) -> list[Finding]:
    if not answer.redirects:
        return []
    if not answer.redirects[-1].startswith("https://"):
        return [Finding("fail", f"redirected to {answer.redirects[-1]} (not HTTPS: clients "
                        "refuse it)", "serve WKD over HTTPS without redirects")]
    if answer.status in _REDIRECTS:
        return [Finding("fail", f"more than {GPG_MAX_REDIRECTS} redirects (dirmngr gives up "
                        "after 2)", "serve the files where clients ask, without redirects")]
    return [Finding("warn", f"{len(answer.redirects)} redirect(s), to "
                    f"{answer.redirects[-1]} (gpg follows at most {GPG_MAX_REDIRECTS}; "
                    "browser clients need CORS on every hop)",
                    "serve the files where clients ask, without redirects")]


# -- the probes ----------------------------------------------------------------------------

@dataclass
class _State:
    """What later probes learn from earlier ones."""

    methods: list[Method] = field(default_factory=list)
    working: list[Method] = field(default_factory=list)  # TLS fine
    submission: Address | None = None


def _resolve(host: str) -> tuple[bool | None, str]:
    """(True, addresses) | (False, why: no address record) | (None, error)."""
    try:
        infos = socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        no_record = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
        return (False if exc.errno in no_record else None), why(exc)
    except (OSError, UnicodeError) as exc:
        return None, why(exc)
    return True, ", ".join(sorted({str(info[4][0]) for info in infos}))


def check_dns(options: DomainOptions, state: _State) -> Iterator[CheckResult]:
    advanced, direct = methods(options.domain)
    if options.connect:
        host, port = options.connect
        yield skip("dns", f"skipped (--connect given): {advanced.host} and {direct.host} "
                   f"reached at {host}:{port}")
        state.methods = [advanced, direct]
        return
    adv, adv_detail = _resolve(advanced.host)
    dom, dom_detail = _resolve(direct.host)
    if adv is None:
        yield fail("dns", f"{advanced.host}: look-up failed: {adv_detail}",
                   "check the domain's name servers; clients cannot tell which method to use")
        return
    if adv:
        yield ok("dns", f"{advanced.host} resolves ({adv_detail}): clients use the advanced "
                 "method; if its HTTPS server fails, gpg fails too (it falls back to the "
                 "direct method only when the name does not exist)")
        state.methods.append(advanced)
    else:
        yield ok("dns", f"{advanced.host} has no address record: clients use the direct "
                 f"method (https://{direct.host}/.well-known/openpgpkey/)")
    if dom:
        yield ok("dns", f"{direct.host} resolves ({dom_detail})")
        state.methods.append(replace(direct, required=not adv))
    elif not adv:
        yield fail("dns", f"neither {advanced.host} nor {direct.host} resolves "
                   f"({dom_detail}): no WKD for {options.domain}",
                   f"add an A/AAAA record for {advanced.host} pointing at the WKD server")


def _lower(method: Method, level: Level) -> Level:
    return "warn" if level == "fail" and not method.required else level


def _result(name: str, method: Method, level: Level, detail: str, fix: str,
            ) -> CheckResult:
    level = _lower(method, level)
    if not method.required:
        detail += " (clients do not use this method while openpgpkey resolves)"
    if level == "ok":
        return ok(name, detail)
    return warn(name, detail, fix) if level == "warn" else fail(name, detail, fix)


def _server_fix(method: Method, domain: str) -> str:
    if method.name == "advanced":
        return (f"serve WKD at https://{method.host}/ with a valid certificate, or remove "
                f"the DNS record of {method.host} so that clients use https://{domain}/")
    return f"serve WKD at https://{domain}/.well-known/openpgpkey/ with a valid certificate"


def check_tls(options: DomainOptions, state: _State, now: int) -> Iterator[CheckResult]:
    for method in state.methods:
        tls = ssl.create_default_context(cafile=options.ca_file)
        fix = _server_fix(method, options.domain)
        try:
            with socket.create_connection(options.connect or (method.host, 443),
                                          options.timeout) as raw, \
                    tls.wrap_socket(raw, server_hostname=method.host) as sock:
                cert = sock.getpeercert() or {}
        except ssl.SSLCertVerificationError as exc:
            yield _result("tls", method, "fail", f"{method.name} {method.host}: certificate "
                          f"not valid: {exc.verify_message or why(exc)}", fix)
            continue
        except (OSError, ssl.SSLError) as exc:
            yield _result("tls", method, "fail",
                          f"{method.name} {method.host}:443: {why(exc)}", fix)
            continue
        state.working.append(method)
        not_after = cert.get("notAfter")
        expires = int(ssl.cert_time_to_seconds(not_after)) if isinstance(not_after, str) else 0
        detail = f"{method.name} {method.host}: certificate valid until {_day(expires)}"
        if expires - now < CERT_WARN_DAYS * 86400:
            yield warn("tls", detail, "renew the certificate (certbot renew)")
        else:
            yield ok("tls", detail)


def _policy_url(method: Method) -> str:
    return method.base + "policy"


def check_policy(options: DomainOptions, state: _State) -> Iterator[CheckResult]:
    for method in state.working:
        url = _policy_url(method)
        fix = f"serve a policy file (it may be empty; lines end in LF) at {url}"
        try:
            answer = fetch(url, options)
        except (OSError, ssl.SSLError, http.client.HTTPException, ValueError) as exc:
            yield _result("policy", method, "fail", f"{url}: {why(exc)}", fix)
            continue
        redirects = _redirect_findings(answer)
        if answer.status != 200:
            broken = [f for f in redirects if f.level == "fail"]
            for finding in broken:
                yield _result("policy", method, "fail", f"{url}: {finding.text}", finding.fix)
            if not broken:
                yield _result("policy", method, "fail", f"{url} answered {answer.status} (no "
                              "policy file: gpg takes the domain for one without WKD)", fix)
            continue
        policy = parse_policy(answer.body)
        for finding in redirects:
            yield _result("policy", method, finding.level, f"{url}: {finding.text}",
                          finding.fix)
        if policy.problems:
            yield _result("policy", method, "fail",
                          f"{url}: {'; '.join(policy.problems)}", fix)
        else:
            flags = ", ".join(f"{k}: {v}" if v else k for k, v in policy.flags.items())
            yield ok("policy", f"{method.name} {url} ({flags or 'empty: WKD, no flags'})"
                     + (f"; unknown keywords, ignored by clients: {', '.join(policy.unknown)}"
                        if policy.unknown else ""))
        if answer.headers.get("access-control-allow-origin") != "*":
            yield warn("policy", f"{url}: no `Access-Control-Allow-Origin: *`",
                       "add it to all of /.well-known/openpgpkey/ (browser clients)")
        declared = policy.flags.get("submission-address")
        yield from _check_submission_file(options, state, method, declared)


def _check_submission_file(options: DomainOptions, state: _State, method: Method,
                           declared: str | None) -> Iterator[CheckResult]:
    url = method.base + "submission-address"
    try:
        answer = fetch(url, options)
    except (OSError, ssl.SSLError, http.client.HTTPException, ValueError) as exc:
        yield _result("submission", method, "fail", f"{url}: {why(exc)}",
                      _server_fix(method, options.domain))
        return
    fix = f"serve the submission address, one LF-terminated line, at {url}"
    if answer.status != 200:
        if declared:
            yield ok("submission", f"{method.name}: submission address {declared} from the "
                     f"policy file ({url}: {answer.status})")
            state.submission = state.submission or Address.parse(declared)
        else:
            yield ok("submission", f"{method.name}: no submission address ({url}: "
                     f"{answer.status}): no Web Key Service, keys are published otherwise")
        return
    text = answer.body.decode("utf-8", "replace")
    try:
        address = Address.parse(text.strip())
    except BadAddress:
        yield _result("submission", method, "fail", f"{url}: {text[:80]!r} is not an "
                      "address", fix)
        return
    if not answer.body.endswith(b"\n") or answer.body.count(b"\n") != 1 or b"\r" in answer.body:
        yield _result("submission", method, "fail", f"{url}: not one LF-terminated line",
                      fix)
    elif declared and Address.parse(declared).key != address.key:
        yield _result("submission", method, "fail", f"{url} says {address}, the policy "
                      f"file {declared}", "make the two agree")
    else:
        yield ok("submission", f"{method.name}: submission address {address}")
    state.submission = state.submission or address


def _key_results(name: str, method: Method, address: Address, options: DomainOptions,
                 now: int) -> Iterator[CheckResult]:
    url = method.key_url(address)
    try:
        answer = fetch(url, options)
    except (OSError, ssl.SSLError, http.client.HTTPException, ValueError) as exc:
        yield _result(name, method, "fail", f"{url}: {why(exc)}",
                      _server_fix(method, options.domain))
        return
    publish = (f"publish the key of {address} (on milter-wkd: the user sends it with "
               "gpg-wks-client, or `milter-wkd key publish`)")
    findings = _redirect_findings(answer)
    if answer.status != 200:
        broken = [f for f in findings if f.level == "fail"]
        for finding in broken:  # a redirect gpg does not follow
            yield _result(name, method, "fail", f"{method.name} {url}: {finding.text}",
                          finding.fix)
        if not broken:
            yield _result(name, method, "fail", f"{method.name} {url} answered "
                          f"{answer.status}" + (f" after {len(answer.redirects)} redirect(s)"
                                                if answer.redirects else ""),
                          publish if answer.status == 404
                          else _server_fix(method, options.domain))
        return
    findings += judge_headers(answer.headers)
    if answer.truncated:
        findings.append(Finding("fail", f"over {READ_LIMIT} octets (gpg's limit: "
                                f"{GPG_WKD_LIMIT})", "publish a minimal key"))
        described = "not read"
    else:
        key_findings, described = judge_key(answer.body, address, now)
        findings += key_findings
    for finding in findings:
        yield _result(name, method, finding.level, f"{method.name} {url}: {finding.text}",
                      finding.fix)
    if not findings:
        yield ok(name, f"{method.name} {url}: 200, {len(answer.body)} octets, binary, "
                 f"with CORS and Content-Length: {described}")
    if name != "key":
        return
    try:
        again = fetch(url, options, {"Authorization": THUNDERBIRD_AUTHORIZATION})
    except (OSError, ssl.SSLError, http.client.HTTPException, ValueError) as exc:
        yield _result(name, method, "fail", f"{url} with Authorization: {why(exc)}",
                      _server_fix(method, options.domain))
        return
    if (again.status, again.body) != (answer.status, answer.body):
        yield _result(name, method, "fail", f"{method.name}: with `Authorization: Basic` "
                      f"(Thunderbird sends one) the answer differs: {again.status}, "
                      f"{len(again.body)} octets", "ignore the Authorization header on "
                      "/.well-known/openpgpkey/ (no HTTP authentication there)")
    else:
        yield ok(name, f"{method.name}: the same answer with `Authorization: Basic` "
                 f"(Thunderbird) and with ?l={quote(address.local, safe='')}")


def check_submission_key(options: DomainOptions, state: _State, now: int,
                         ) -> Iterator[CheckResult]:
    if state.submission is None:
        return
    for method in state.working:
        yield from _key_results("submission", method, state.submission, options, now)


def check_address(options: DomainOptions, state: _State, now: int) -> Iterator[CheckResult]:
    if options.address is None:
        yield skip("key", "no --address given: no key looked up")
        return
    if not state.working:
        yield skip("key", f"{options.address}: no WKD host answers over HTTPS")
        return
    for method in state.working:
        yield from _key_results("key", method, options.address, options, now)


def _keyserver(name: str, path: str, options: DomainOptions, state: _State,
               address: Address) -> Iterator[CheckResult]:
    for method in state.working:
        url = f"https://{method.host}{path}"
        try:
            answer = fetch(url, options)
        except (OSError, ssl.SSLError, http.client.HTTPException, ValueError) as exc:
            yield warn(name, f"{url}: {why(exc)}", "")
            continue
        kind = answer.headers.get("content-type", "").lower()
        if answer.status in (404, 501) or (answer.status == 200 and "html" in kind):
            yield ok(name, f"{method.host}: not offered or no key ({answer.status}): "
                     "info only")
            continue
        if answer.status != 200:
            yield warn(name, f"{url} answered {answer.status}", "answer 404 or 501 where "
                       "no keyserver is offered")
            continue
        try:
            info = openpgp.inspect_key(answer.body)
        except MilterWkdError as exc:
            yield warn(name, f"{url}: 200 but not a key: {exc.reason}",
                       "serve the armored key (application/pgp-keys) or 404")
            continue
        if not any(a.key == address.key for a in info.addresses):
            yield warn(name, f"{url}: serves {info.fingerprint.hex} without a user ID for "
                       f"{address}", "serve only keys with the address asked for")
        else:
            yield ok(name, f"{method.host}: serves {info.fingerprint.hex} for {address}")


def check_keyservers(options: DomainOptions, state: _State) -> Iterator[CheckResult]:
    address = options.address
    if address is None:
        return
    search = quote(str(address), safe="@")
    yield from _keyserver("hkp", f"/pks/lookup?op=get&options=mr&search={search}&exact=on",
                          options, state, address)
    yield from _keyserver("vks", f"/vks/v1/by-email/{search}", options, state, address)


def run_domain(options: DomainOptions) -> Iterator[CheckResult]:
    """Every probe for options.domain, in order; never raises."""
    state = _State()
    now = int(time.time()) if options.now is None else options.now
    steps = [
        ("dns", lambda: check_dns(options, state)),
        ("tls", lambda: check_tls(options, state, now)),
        ("policy", lambda: check_policy(options, state)),
        ("submission", lambda: check_submission_key(options, state, now)),
        ("key", lambda: check_address(options, state, now)),
        ("keyserver", lambda: check_keyservers(options, state)),
    ]
    for name, step in steps:
        yield from guarded(name, step)
