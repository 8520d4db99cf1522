"""Inputs that the fuzz targets (fuzz/) found crashing, each refused now with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from milter_wkd import autocrypt, config
from milter_wkd.config import ConfigError, DomainConfig
from milter_wkd.errors import BadAddress
from milter_wkd.values import Address
from milter_wkd.web.app import WkdApp
from milter_wkd.web.cache import KeyCache
from milter_wkd.wkd import address_hash
from tests.unit.test_web_app import Response
from tests.unit.test_web_cache import ALICE, TableSource, cleaner


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


# fuzz/targets/web.py: a query of more than 4 fields made parse_qs raise ValueError in the
# `l=` hint, a 500 for every key request that the cache had to ask the directory about.
def test_a_query_of_many_fields_is_no_hint_and_no_500(tmp_path: Path) -> None:
    source = TableSource()
    source.write("uid=alice", (ALICE,), b"KA")
    cache = KeyCache(source, budget=16, cleaner=cleaner)  # too small to mirror: look-ups
    cache.load()
    assert not cache.complete
    app = WkdApp(cache, [DomainConfig(name="example.org",
                                      submission_public_key=str(tmp_path / "none"))])
    path = f"/.well-known/openpgpkey/hu/{address_hash(ALICE)}"
    for query in ("l=alice&&&&&&&&", "l=alice&a=1&b=2&c=3&d=4", "a&b&c&d&e&l=alice"):
        got = Response(app, "GET", path, "example.org", query)
        assert (got.status, got.body) == (200, b"KA|alice@example.org"), query
