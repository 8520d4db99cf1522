"""What `milter-wkd check` is told beyond the services' own settings: `Options`, made from
the config file's [check] section (`Options.from_config`), which the command line
overrides.

Configuration: [check] postfix_config_dir, dovecot_auth_socket, wkd_url, wkd_connect,
ca_file, portal_url, portal_connect, portal_ca_file, dns, skip, timeout
(milter_wkd.config.CheckConfig says what each means).
Failures: none here; the config module refuses a malformed section when it loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from milter_wkd.config import DEFAULT_PORTAL_URL, DEFAULT_WKD_URL, CheckConfig, parse_host_port

_DEFAULTS = CheckConfig()


@dataclass(frozen=True, slots=True)
class Options:
    postfix_config_dir: str = _DEFAULTS.postfix_config_dir
    dovecot_auth_socket: str | None = None  # None: Postfix's smtpd_sasl_path, else default
    wkd_url: str = DEFAULT_WKD_URL  # "{domain}" is replaced by each domain's name
    wkd_connect: tuple[str, int] | None = None  # connect here, validate the URL's host
    ca_file: str | None = None  # None: the system store
    portal_url: str = DEFAULT_PORTAL_URL  # "{domain}": the first domain's name
    portal_connect: tuple[str, int] | None = None  # connect here, validate the URL's host
    portal_ca_file: str | None = None  # None: ca_file
    skip: frozenset[str] = field(default_factory=frozenset)
    dns: bool = _DEFAULTS.dns
    timeout: float = _DEFAULTS.timeout

    @classmethod
    def from_config(cls, section: CheckConfig) -> Options:
        """The options a [check] section gives (its empty strings: the defaults)."""
        return cls(postfix_config_dir=section.postfix_config_dir,
                   dovecot_auth_socket=section.dovecot_auth_socket or None,
                   wkd_url=section.wkd_url or DEFAULT_WKD_URL,
                   wkd_connect=parse_host_port(section.wkd_connect),
                   ca_file=section.ca_file or None,
                   portal_url=section.portal_url or DEFAULT_PORTAL_URL,
                   portal_connect=parse_host_port(section.portal_connect),
                   portal_ca_file=section.portal_ca_file or None,
                   skip=frozenset(section.skip),
                   dns=section.dns, timeout=section.timeout)
