"""DKIM (group dkim): per domain, each configured key (dkim_rsa_key, which must be RSA, and
dkim_key) loads, and a probe it signs verifies against its public key; with `dns` the TXT
record at <selector>._domainkey.<domain> of each carries its public key.

Configuration: each [[domains]] dkim_key, dkim_selector, dkim_rsa_key, dkim_rsa_selector;
[milter] dkim_sign_outgoing; [check] dns (off by default: no resolver needed, and the TXT
look-ups are skipped, which the report says).
Failures: a key that does not load or does not verify, a TXT record that is missing or
carries another key, and signing switched on without a key are FAIL lines; a DNS look-up
that fails (no resolver, a timeout) is a skip.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from milter_wkd import dkim
from milter_wkd.check.results import CheckResult, fail, ok, skip, why
from milter_wkd.config import Config, DomainConfig
from milter_wkd.errors import MilterWkdError


def check_dkim(config: Config, domain: DomainConfig, dns: bool) -> Iterator[CheckResult]:
    configured = [(setting, path, selector, algorithm) for setting, path, selector, algorithm in (
        ("dkim_rsa_key", domain.dkim_rsa_key, domain.dkim_rsa_selector, "rsa"),
        ("dkim_key", domain.dkim_key, domain.dkim_selector, None)) if path]
    if not configured:
        if config.milter.dkim_sign_outgoing:
            yield fail("dkim", f"{domain.name}: dkim_sign_outgoing is on but no dkim_key "
                       "is configured", "set dkim_key in [[domains]] and run "
                       "`milter-wkd domain init`")
        else:
            yield skip("dkim", f"{domain.name}: no dkim_key (generated mail is not "
                       "DKIM-signed by milter-wkd)")
        return
    for setting, path, selector, algorithm in configured:
        try:
            key = dkim.load_key(Path(path), domain.name, selector,
                                "rsa" if algorithm == "rsa" else None)
        except MilterWkdError as exc:
            yield fail("dkim", f"{domain.name}: {exc.reason}",
                       "run `milter-wkd domain init` to create it (then publish the TXT "
                       f"record it prints), or correct {setting}")
            continue
        probe = dkim.sign(_DKIM_PROBE.replace(b"@example.org", b"@" + key.domain.encode()),
                          key)
        if not dkim.verify(probe, {key.dns_name(): key.dns_record()}):
            yield fail("dkim", f"{domain.name}: a signature made with {path} does not "
                       "verify against its own public key", "report this as a bug")
            continue
        yield ok("dkim", f"{domain.name}: {key.algorithm} key {path} (selector {selector}) "
                 "signs, and its signature verifies")
        if not dns:
            yield skip("dkim", f"{key.dns_name()} TXT not looked up (offline default; --dns)")
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
        yield fail("dkim", f"no TXT record at {key.dns_name()}", f"publish {expected}")
        return
    except dns.exception.DNSException as exc:
        yield skip("dkim", f"DNS lookup of {key.dns_name()} failed: {why(exc)}")
        return
    records = [b"".join(r.strings).decode("ascii", "replace") for r in answer]
    published = [re.sub(r"\s+", "", r) for r in records]
    if any(f"p={key.public_b64()}" in r.split(";") for r in published):
        yield ok("dkim", f"{key.dns_name()} TXT carries the key")
    else:
        yield fail("dkim", f"{key.dns_name()} TXT does not carry this key "
                   f"({records[0][:60]!r}...)", f"publish {expected}")


