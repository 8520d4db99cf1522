"""WKD over HTTPS (group wkd): per domain, with certificate validation (the system store or
a CA file), the policy file (200, LF-terminated lines, submission-address, auth-submit and
mailbox-only as configured, protocol-version), the submission-address file, and the
submission address's key (200, CORS header, the fingerprint of submission_public_key).

Configuration: [check] wkd_url ({domain} stands for each domain), wkd_connect (connect to
HOST:PORT instead of the URL's host from DNS, still validating the certificate for the
URL's host), ca_file, timeout; each [[domains]] name, submission_address, auth_submit,
mailbox_only, submission_public_key.
Failures: an invalid certificate, a host that does not answer, and each wrong answer are
FAIL lines naming the URL; an unusable submission_public_key skips the key comparison.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from milter_wkd import openpgp
from milter_wkd.check.options import Options
from milter_wkd.check.results import CheckResult, fail, ok, skip, why
from milter_wkd.config import DomainConfig
from milter_wkd.errors import MilterWkdError
from milter_wkd.values import Address
from milter_wkd.wkd import address_hash

MAX_BODY = 512 * 1024


class PinnedHttps(http.client.HTTPSConnection):
    """HTTPS to `address` (when given) while validating, and asking for, the URL's host
    ([check] wkd_connect, `check --domain --connect`)."""

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
    conn = PinnedHttps(parts.hostname, parts.port or 443, address=connect, tls=tls,
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
        yield fail("wkd", f"{domain.name}: certificate of {host} not valid: "
                   f"{exc.verify_message or why(exc)}",
                   f"install a certificate for {host} and {domain.name} from a public CA "
                   "(WKD clients use the system store), with its chain")
        return
    except (OSError, ssl.SSLError, http.client.HTTPException, ValueError) as exc:
        yield fail("wkd", f"{domain.name}: {base}policy{via}: {why(exc)}",
                   f"{_wkd_fix(domain.name)}; {host} must resolve to it (DNS A/AAAA; "
                   "before it does, [check] wkd_connect says where it runs)")
        return
    if policy.status != 200:
        yield fail("wkd", f"{domain.name}: {base}policy answered {policy.status}",
                   _wkd_fix(domain.name))
        return
    problems = check_policy(policy.body, domain)
    if problems:
        yield fail("wkd", f"{domain.name}: policy file: {'; '.join(problems)}",
                   _wkd_fix(domain.name))
    else:
        yield ok("wkd", f"{domain.name}: {base}policy (certificate valid, "
                 f"submission-address {domain.submission_address})")
    submission = get(base + "submission-address")
    if submission.status != 200 or submission.body != (
            domain.submission_address.encode() + b"\n"):
        yield fail("wkd", f"{domain.name}: submission-address file: {submission.status} "
                   f"{submission.body[:80]!r}", _wkd_fix(domain.name))
    yield from _wkd_submission_key(domain, base, get)


def _wkd_submission_key(domain: DomainConfig, base: str, get: Callable[[str], HttpAnswer],
                        ) -> Iterator[CheckResult]:
    address = Address.parse(domain.submission_address)
    url = f"{base}hu/{address_hash(address)}?l={quote(address.local, safe='')}"
    try:
        expected = openpgp.inspect_key(Path(domain.submission_public_key).read_bytes())
    except (OSError, MilterWkdError) as exc:
        yield skip("wkd", f"{domain.name}: submission key not compared "
                   f"(submission_public_key unusable: {why(exc)})")
        return
    answer = get(url)
    if answer.status != 200:
        yield fail("wkd", f"{domain.name}: the key of {address} is not served ({url}: "
                   f"{answer.status})", f"{_wkd_fix(domain.name)}; submission_public_key "
                   "must be readable by the responder")
        return
    try:
        served = openpgp.inspect_key(answer.body)
    except MilterWkdError as exc:
        yield fail("wkd", f"{domain.name}: {url} is not a key: {exc.reason}",
                   _wkd_fix(domain.name))
        return
    problems = []
    if served.fingerprint != expected.fingerprint:
        problems.append(f"serves {served.fingerprint}, submission_public_key is "
                        f"{expected.fingerprint}")
    if answer.headers.get("access-control-allow-origin") != "*":
        problems.append("no `Access-Control-Allow-Origin: *` (browser clients need it)")
    if problems:
        yield fail("wkd", f"{domain.name}: key of {address}: {'; '.join(problems)}",
                   _wkd_fix(domain.name))
    else:
        yield ok("wkd", f"{domain.name}: serves {expected.fingerprint} for {address} "
                 "(with CORS)")


