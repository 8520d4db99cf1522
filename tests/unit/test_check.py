"""The pure parts of `milter-wkd check`: postconf output, milter lists, the policy file,
the Dovecot handshake, the submission key pair on disk, that a probe never raises, the
[check] section and the options that override it, and the DN and filter helpers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from milter_wkd import check, config
from milter_wkd.cli import main
from milter_wkd.config import Config, ConfigError, DomainConfig
from milter_wkd.openpgp import armor_key
from milter_wkd.openpgp.messages import generate_submission_key
from milter_wkd.store import probe
from milter_wkd.values import Address

SOCKET = "unix:/run/milter-wkd/milter.sock"
GOOD_POSTCONF = """\
smtpd_milters = unix:/run/milter-wkd/milter.sock, inet:127.0.0.1:8891
non_smtpd_milters = unix:/run/milter-wkd/milter.sock
milter_default_action = tempfail
milter_protocol = 6
milter_mail_macros = i {auth_type} {auth_authen} {auth_author} {mail_addr}
smtpd_sasl_type = dovecot
smtpd_sasl_path = private/auth
queue_directory = /var/spool/postfix
"""
DOMAIN = DomainConfig()


def by_label(results: list[check.CheckResult]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for result in results:
        found.setdefault(result.label, []).append(result.detail)
    return found


# -- postconf -------------------------------------------------------------------------


def test_parse_postconf_values_and_continuations() -> None:
    params = check.parse_postconf("a = 1\nb =\nc = x y\n    z\nd = k = v\n")
    assert params == {"a": "1", "b": "", "c": "x y z", "d": "k = v"}


def test_milter_entries_separators_and_groups() -> None:
    assert check.milter_entries("unix:/a.sock, inet:127.0.0.1:8891  unix:/b") == [
        "unix:/a.sock", "inet:127.0.0.1:8891", "unix:/b"]
    assert check.milter_entries("{ unix:/a.sock, default_action=accept } inet:h:1") == [
        "unix:/a.sock", "inet:h:1"]
    assert check.milter_entries("") == []


def test_postfix_names_our_socket() -> None:
    assert check.postfix_milter_address("unix:/run/m.sock") == "unix:/run/m.sock"
    assert check.postfix_milter_address("inet:8891@127.0.0.1") == "inet:127.0.0.1:8891"


def test_good_postfix_settings_pass() -> None:
    results = check.check_postfix_params(check.parse_postconf(GOOD_POSTCONF), SOCKET, "/etc/p")
    assert [r.label for r in results] == ["ok"] * 5


def test_missing_milter_accept_and_no_macro() -> None:
    text = GOOD_POSTCONF.replace("unix:/run/milter-wkd/milter.sock, ", "").replace(
        "tempfail", "accept").replace("{auth_authen} ", "").replace(
        "non_smtpd_milters = unix:/run/milter-wkd/milter.sock", "non_smtpd_milters =")
    results = check.check_postfix_params(check.parse_postconf(text), SOCKET, "/etc/p")
    labels = by_label(results)
    assert len(labels["FAIL"]) == 2, results
    assert any("smtpd_milters in /etc/p lacks unix:/run/milter-wkd/milter.sock" in d
               for d in labels["FAIL"])
    assert any("non_smtpd_milters" in d and "empty" in d for d in labels["FAIL"])
    # The milter asks Postfix for {auth_authen} itself (SMFIF_SETSYMLIST): a warning only.
    assert labels["warn"] == [
        "milter_default_action = accept: while the milter is down, submissions and "
        "outgoing mail pass unhandled",
        "milter_mail_macros lacks {auth_authen}: the milter asks Postfix for it itself, but "
        "an MTA that cannot be asked would not show it who logged in"]
    assert all(r.fix for r in results if r.label in ("FAIL", "warn"))


def test_our_milter_must_come_first() -> None:
    text = GOOD_POSTCONF.replace("unix:/run/milter-wkd/milter.sock, inet:127.0.0.1:8891",
                                 "inet:127.0.0.1:8891, unix:/run/milter-wkd/milter.sock")
    results = check.check_postfix_params(check.parse_postconf(text), SOCKET, "/etc/p")
    failed = [r for r in results if r.ok is False]
    assert len(failed) == 1
    assert "is not first" in failed[0].detail


def test_protocol_and_default_action_other_values_fail() -> None:
    text = GOOD_POSTCONF.replace("milter_protocol = 6", "milter_protocol = 2").replace(
        "tempfail", "reject")
    labels = by_label(check.check_postfix_params(check.parse_postconf(text), SOCKET, "/p"))
    assert sorted(labels["FAIL"]) == ["milter_default_action = reject", "milter_protocol = 2"]


# -- Dovecot -----------------------------------------------------------------------------


def test_dovecot_handshake_parsing() -> None:
    text = "VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t9\nDONE\n"
    assert check.parse_auth_handshake(text) == ("1.2", ["PLAIN", "LOGIN"])
    assert check.parse_auth_handshake("220 smtp ready\r\n") == (None, [])


def test_dovecot_socket_from_option_postfix_or_default() -> None:
    params = check.parse_postconf(GOOD_POSTCONF)
    assert check.dovecot_socket(check.Options(dovecot_auth_socket="/x"), params) == "/x"
    assert check.dovecot_socket(check.Options(), params) == "/var/spool/postfix/private/auth"
    params["smtpd_sasl_path"] = "/run/dovecot/auth-postfix"
    assert check.dovecot_socket(check.Options(), params) == "/run/dovecot/auth-postfix"
    params["smtpd_sasl_type"] = "cyrus"
    assert check.dovecot_socket(check.Options(), params) == check.DEFAULT_DOVECOT_SOCKET
    assert check.dovecot_socket(check.Options(), None) == check.DEFAULT_DOVECOT_SOCKET


# -- the policy file ----------------------------------------------------------------------

POLICY = b"mailbox-only\nauth-submit\nprotocol-version: 3\nsubmission-address: " \
         b"key-submission@example.org\n"
MAILBOX_ONLY = DomainConfig(mailbox_only=True)


def test_good_policy() -> None:
    assert check.check_policy(POLICY, MAILBOX_ONLY) == []
    assert check.check_policy(POLICY.replace(b"mailbox-only\n", b""), DOMAIN) == []


@pytest.mark.parametrize(("body", "expected"), [
    (POLICY[:-1], "does not end in LF"),
    (POLICY.replace(b"\n", b"\r\n"), "CR characters"),
    (POLICY.replace(b"key-submission@", b"wks@"), "submission-address is wks@example.org"),
    (POLICY.replace(b"submission-address", b"x"), "no submission-address line"),
    (POLICY.replace(b"auth-submit\n", b""), "auth-submit missing"),
    (POLICY.replace(b"mailbox-only\n", b""), "mailbox-only missing"),
    (POLICY.replace(b"protocol-version: 3\n", b""), "no protocol-version line"),
    (b"", "it is empty"),
])
def test_policy_problems(body: bytes, expected: str) -> None:
    problems = check.check_policy(body, MAILBOX_ONLY)
    assert any(expected in p for p in problems), problems


def test_policy_advertising_what_the_config_switched_off() -> None:
    domain = DomainConfig(auth_submit=False)
    assert check.check_policy(POLICY, domain) == [
        "auth-submit advertised (the config says auth_submit = false)",
        "mailbox-only advertised (the config says mailbox_only = false)"]


# -- the submission key pair on disk ------------------------------------------------------


@pytest.fixture(scope="module")
def key_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    address = Address.parse(DOMAIN.submission_address)
    for name in ("one", "two"):
        generated = generate_submission_key(address)
        secret = directory / f"{name}.asc"
        secret.write_bytes(generated.secret)
        secret.chmod(0o600)
        (directory / f"{name}.pub").write_bytes(armor_key(generated.public))
    return directory


def domain_with(directory: Path, secret: str, public: str) -> DomainConfig:
    return DomainConfig(submission_key=str(directory / secret),
                        submission_public_key=str(directory / public))


def test_matching_key_pair(key_pairs: Path) -> None:
    results = list(check.check_submission_key(domain_with(key_pairs, "one.asc", "one.pub")))
    assert [r.label for r in results] == ["ok"], results
    assert "signs and decrypts for" in results[0].detail


def test_key_pair_that_does_not_match(key_pairs: Path) -> None:
    (result,) = check.check_submission_key(domain_with(key_pairs, "one.asc", "two.pub"))
    assert result.ok is False
    assert "do not work together" in result.detail
    assert "public part of the secret key" in result.fix


def test_public_key_given_as_secret_key(key_pairs: Path) -> None:
    (result,) = check.check_submission_key(domain_with(key_pairs, "one.pub", "one.pub"))
    assert result.ok is False
    assert "public key was given where the secret key is needed" in result.detail


def test_missing_secret_key(key_pairs: Path) -> None:
    (result,) = check.check_submission_key(domain_with(key_pairs, "gone.asc", "one.pub"))
    assert result.ok is False
    assert "cannot read" in result.detail
    assert "domain init" in result.fix


def test_world_readable_secret_key(key_pairs: Path, tmp_path: Path) -> None:
    for name in ("one.asc", "one.pub"):
        (tmp_path / name).write_bytes((key_pairs / name).read_bytes())
    (tmp_path / "one.asc").chmod(0o644)
    (result,) = check.check_submission_key(domain_with(tmp_path, "one.asc", "one.pub"))
    assert result.ok is False
    assert "world-readable" in result.detail


def test_dkim_key_missing_and_not_configured(tmp_path: Path) -> None:
    missing = DomainConfig(dkim_key=str(tmp_path / "dkim.pem"))
    (result,) = check.check_dkim(Config(), missing, dns=False)
    assert result.ok is False
    assert "No such file" in result.detail
    (result,) = check.check_dkim(Config(), DomainConfig(dkim_key=""), dns=False)
    assert result.ok is None


# -- never raising ----------------------------------------------------------------------


def test_a_probe_that_raises_becomes_a_fail_line() -> None:
    def broken() -> Iterator[check.CheckResult]:
        yield check.CheckResult("x", True, "first")
        raise KeyError("surprise")

    results = list(check.guarded("x", broken))
    assert [r.label for r in results] == ["ok", "FAIL"]
    assert "KeyError" in results[1].detail


def test_unloadable_config_is_a_fail_line(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[directory]\nbind_dn = 3\n")
    assert main(["check", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL config: [directory] bind_dn: expected str, got int\n")
    assert "     fix: " in out


def test_wkd_connect_must_be_host_and_port(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(tmp_path / "x.toml"), "--wkd-connect", "x"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err


# -- [check] and the command line -----------------------------------------------------------


def test_options_from_the_check_section() -> None:
    cfg = config.build({"check": {
        "postfix_config_dir": "/srv/postfix/etc", "dovecot_auth_socket": "/run/auth",
        "wkd_url": "https://wkd.test:8443/.well-known/openpgpkey/{domain}/",
        "wkd_connect": "[::1]:8443", "ca_file": "/srv/ca.pem", "dns": True,
        "skip": ["milter"], "timeout": 2}}, environ={})
    assert check.Options.from_config(cfg.check) == check.Options(
        postfix_config_dir="/srv/postfix/etc", dovecot_auth_socket="/run/auth",
        wkd_url="https://wkd.test:8443/.well-known/openpgpkey/{domain}/",
        wkd_connect=("::1", 8443), ca_file="/srv/ca.pem", dns=True,
        skip=frozenset({"milter"}), timeout=2.0)
    # No [check]: what the options always defaulted to.
    assert check.Options.from_config(Config().check) == check.Options()


@pytest.mark.parametrize(("section", "message"), [
    ({"skip": ["dsn"]}, "[check] skip: unknown group(s) dsn (groups: directory, "),
    ({"wkd_connect": "localhost"}, "[check] wkd_connect: HOST:PORT, not 'localhost'"),
    ({"wkd_connect": "h:99999"}, "[check] wkd_connect: HOST:PORT, not 'h:99999'"),
    ({"timeout": 0}, "[check] timeout: must be positive"),
    ({"postfix_dir": "/x"}, "[check] unknown key 'postfix_dir'"),
])
def test_check_section_mistakes_name_the_key(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.build({"check": section}, environ={})
    assert caught.value.reason.startswith(message), caught.value.reason


def test_options_given_override_the_check_section(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "milter-wkd.toml"
    path.write_text('[check]\npostfix_config_dir = "/srv/postfix"\nwkd_connect = '
                    '"127.0.0.1:8443"\ndns = true\nskip = ["dovecot"]\ntimeout = 3\n')
    seen: list[check.Options] = []

    def run(_config: Config, options: check.Options) -> Iterator[check.CheckResult]:
        seen.append(options)
        yield check.CheckResult("x", True, "ran")

    monkeypatch.setattr(check, "run", run)
    assert main(["check", "--config", str(path)]) == 0
    assert main(["check", "--config", str(path), "--postfix-config-dir", "/etc/postfix",
                 "--wkd-connect", "[::1]:443", "--no-dns", "--skip", "wkd",
                 "--timeout", "0.1"]) == 0
    from_file, overridden = seen
    assert from_file == check.Options(postfix_config_dir="/srv/postfix",
                                      wkd_connect=("127.0.0.1", 8443), dns=True,
                                      skip=frozenset({"dovecot"}), timeout=3.0)
    assert overridden == check.Options(postfix_config_dir="/etc/postfix",
                                       wkd_connect=("::1", 443), dns=False,
                                       skip=frozenset({"dovecot", "wkd"}), timeout=0.5)


# -- the directory helpers the doctor uses (milter_wkd.store.probe) ---------------------------


def test_parent_dn_and_filter_escaping() -> None:
    assert probe.parent_dn("cn=milter,ou=services,dc=example,dc=org") == \
        "ou=services,dc=example,dc=org"
    assert probe.parent_dn("cn=a\\,b,dc=org") == "dc=org"
    assert probe.parent_dn("dc=org") is None
    assert probe.parent_dn("no DN at all") is None
    assert probe.escape_filter("a*(b)\\") == "a\\2a\\28b\\29\\5c"
    assert probe.describe(KeyError("x")) is None
