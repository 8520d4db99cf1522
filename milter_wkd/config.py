"""Configuration: one TOML file, every key defined once here with its default and meaning.

Sections are dataclasses; each field's `doc` metadata is the documentation that
`milter-wkd config example` prints, so the docs cannot drift from the code. A key may be
overridden by the environment variable `MILTER_WKD_<SECTION>_<KEY>` (upper case), parsed
as a TOML value when it is one and as a plain string otherwise.

Default file: /etc/milter-wkd/milter-wkd.toml. Unknown sections or keys and values of the
wrong type are errors (`ConfigError`) naming the key: a typo must not silently fall back
to a default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milter_wkd.errors import MilterWkdError

DEFAULT_PATH = Path("/etc/milter-wkd/milter-wkd.toml")
ENV_PREFIX = "MILTER_WKD_"


class ConfigError(MilterWkdError):
    """The configuration file or an override is wrong; the reason names the key."""


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True, slots=True)
class DirectoryConfig:
    uri: str = field(default="ldapi:///", metadata=_doc(
        "LDAP URI of the directory: ldap://, ldaps:// or ldapi:// (a unix socket)."))
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
    timeout: float = field(default=2.0, metadata=_doc(
        "Seconds before an unanswered directory operation counts as 'directory down'."))


@dataclass(frozen=True, slots=True)
class KeysConfig:
    max_input_bytes: int = field(default=90 * 1024 * 1024, metadata=_doc(
        "Largest key (as given, armored or binary) that is read at all. The default takes a "
        "64 MiB flooded key, which is cleaned in a single linear pass."))
    max_published_bytes: int = field(default=64 * 1024, metadata=_doc(
        "Largest cleaned key that is published (gpg caps a WKD answer at 256 KiB)."))


@dataclass(frozen=True, slots=True)
class Config:
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)


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


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def build(data: dict[str, Any], environ: typing.Mapping[str, str] | None = None) -> Config:
    """Build a Config from parsed TOML plus environment overrides."""
    environ = os.environ if environ is None else environ
    sections: dict[str, Any] = {}
    known = {f.name: f for f in dataclasses.fields(Config)}
    for unknown in set(data) - set(known):
        raise ConfigError(f"unknown section [{unknown}]")
    for section_name, section_field in known.items():
        section_cls = _field_types(Config)[section_name]
        given = dict(data.get(section_name, {}))
        hints = _field_types(section_cls)
        for unknown in set(given) - set(hints):
            raise ConfigError(f"[{section_name}] unknown key {unknown!r}")
        for key in hints:
            env_name = f"{ENV_PREFIX}{section_name}_{key}".upper()
            if env_name in environ:
                given[key] = _env_value(environ[env_name])
        checked = {k: _check_type(section_name, k, v, hints[k]) for k, v in given.items()}
        sections[section_name] = section_cls(**checked)
        del section_field
    return Config(**sections)


def load(path: Path | str | None = None, environ: typing.Mapping[str, str] | None = None,
         ) -> Config:
    """Read the config file (default DEFAULT_PATH; a missing default file means defaults)."""
    explicit = path is not None
    file_path = Path(path) if path is not None else DEFAULT_PATH
    try:
        text = file_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {file_path} does not exist") from None
        text = ""
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file_path}: {exc.strerror}") from None
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
    for section in dataclasses.fields(Config):
        lines.append(f"[{section.name}]")
        value = getattr(defaults, section.name)
        for item in dataclasses.fields(value):
            lines.append(f"# {item.metadata.get('doc', '')}")
            lines.append(f"{item.name} = {_toml_value(getattr(value, item.name))}")
        lines.append("")
    return "\n".join(lines)
