"""The config file: defaults, the generated example, type checks, environment overrides."""

import tomllib
from pathlib import Path

import pytest

from milter_wkd import config
from milter_wkd.cli import main
from milter_wkd.config import ConfigError


def test_example_is_complete_and_loads_to_the_defaults() -> None:
    text = config.example()
    assert config.build(tomllib.loads(text), environ={}) == config.Config()
    for line in text.splitlines():
        assert len(line) <= 80, line


def test_environment_overrides_keys() -> None:
    cfg = config.build({}, environ={
        "MILTER_WKD_DIRECTORY_URI": "ldap://127.0.0.1:3389/",
        "MILTER_WKD_DIRECTORY_TIMEOUT": "5",
        "MILTER_WKD_DIRECTORY_MAIL_ATTRIBUTES": '["mail", "mailLocalAddress"]',
    })
    assert cfg.directory.uri == "ldap://127.0.0.1:3389/"
    assert cfg.directory.timeout == 5.0
    assert cfg.directory.mail_attributes == ["mail", "mailLocalAddress"]


@pytest.mark.parametrize(("data", "message"), [
    ({"directory": {"urri": "x"}}, "unknown key 'urri'"),
    ({"nonsense": {}}, "unknown section [nonsense]"),
    ({"directory": {"timeout": "soon"}}, "[directory] timeout: expected float"),
    ({"milter": {"autocrypt": 1}}, "[milter] autocrypt: expected bool"),
    ({"domains": {"name": "x"}}, "must be a list of tables"),
    ({"domains": [{"nam": "x"}]}, "unknown key 'nam'"),
])
def test_mistakes_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config.build(data, environ={})


def test_domains_tables(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[domains]]\nname = "a.example"\n[[domains]]\nname = "B.example"\n'
                    'auth_submit = false\n')
    cfg = config.load(path, environ={})
    assert [d.name for d in cfg.domains] == ["a.example", "B.example"]
    found = cfg.domain("b.EXAMPLE")
    assert found is not None
    assert not found.auth_submit
    assert cfg.domain("c.example") is None


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml", environ={})


def test_missing_default_file_is_an_error_too(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Not a silent fall-back to dc=example,dc=org.
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "milter-wkd.toml")
    with pytest.raises(config.ConfigMissing, match=r"milter-wkd\.toml does not exist "
                       r"\(the default; give another with --config FILE\)"):
        config.load(None, environ={})
    (tmp_path / "milter-wkd.toml").write_text('[directory]\nbase_dn = "dc=mine"\n')
    assert config.load(None, environ={}).directory.base_dn == "dc=mine"


@pytest.mark.parametrize("command", [["keys", "list"], ["keys", "show", "a@example.org"],
                                     ["pending", "list"], ["pending", "expire"]])
def test_commands_on_the_directory_refuse_a_missing_config(
        command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """One --config behaviour: a missing file, named or the default, exits 2 (before any
    directory is asked)."""
    missing = tmp_path / "nope.toml"
    assert main([*command, "--config", str(missing)]) == 2
    assert capsys.readouterr().err == f"refused: config file {missing} does not exist\n"
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "default.toml")
    assert main(command) == 2
    assert capsys.readouterr().err.startswith(
        f"refused: config file {tmp_path / 'default.toml'} does not exist (the default")


def test_the_responder_binds_as_its_own_account() -> None:
    shared = {"directory": {"bind_dn": "cn=milter,ou=services,dc=example,dc=org",
                            "bind_password": "inline-milter-password"}}
    cfg = config.build(shared, environ={})
    assert cfg.responder_directory() == cfg.directory  # no [web] bind_dn: [directory]'s
    cfg = config.build({**shared, "web": {
        "bind_dn": "cn=wkd,ou=services,dc=example,dc=org",
        "bind_password_file": "/etc/milter-wkd/wkd.password"}}, environ={})
    responder = cfg.responder_directory()
    assert (responder.bind_dn, responder.bind_password, responder.bind_password_file) == (
        "cn=wkd,ou=services,dc=example,dc=org", "", "/etc/milter-wkd/wkd.password")
    assert responder.uri == cfg.directory.uri
    assert "[web]" in config.example()
    assert "cn=wkd,ou=services,dc=example,dc=org" in config.example()


def test_a_responder_account_needs_its_password_file() -> None:
    # Without one the bind would be an unauthenticated (anonymous) one.
    with pytest.raises(config.ConfigError, match=r"\[web\] bind_dn needs bind_password_file"):
        config.build({"web": {"bind_dn": "cn=wkd,ou=services,dc=example,dc=org"}}, environ={})
