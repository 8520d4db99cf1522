"""Inputs that the fuzz targets (fuzz/) found crashing, each refused now with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from milter_wkd import autocrypt, config
from milter_wkd.config import ConfigError
from milter_wkd.errors import BadAddress
from milter_wkd.values import Address


# fuzz/targets/autocrypt.py: pymilter and the email package decode 8-bit header octets
# with surrogateescape; Address.parse raised UnicodeEncodeError on the lone surrogate.
@pytest.mark.parametrize("text", ["al\udcffice@example.org", "alice@ex\udce4mple.org",
                                  "<\udcc3@example.org>"])
def test_an_address_with_undecodable_octets_is_refused(text: str) -> None:
    with pytest.raises(BadAddress, match="not valid UTF-8"):
        Address.parse(text)


def test_a_from_header_with_undecodable_octets_has_no_address() -> None:
    raw = b"Al\xefce <al\xefce@example.org>".decode("utf-8", "surrogateescape")
    assert autocrypt.single_from_address([raw]) is None
    assert autocrypt.single_from_address(["Alïce <alïce@example.org>"]) == Address(
        "alïce", "example.org")


# fuzz/targets/config.py: a config file that is not UTF-8 raised UnicodeDecodeError, a
# section that is not a table TypeError.
def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "milter-wkd.toml"
    path.write_bytes(b'[directory]\nbase_dn = "dc=ex\xe4mple"\n')
    with pytest.raises(ConfigError, match=r"is not UTF-8 \(octet 28\)"):
        config.load(path, environ={})


@pytest.mark.parametrize("text", ["directory = 1", 'milter = "x"', "web = [1, 2]",
                                  "keys = []"])
def test_a_section_that_is_not_a_table_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "milter-wkd.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=r"must be a table"):
        config.load(path, environ={})
