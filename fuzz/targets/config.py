"""Config loading (milter_wkd.config.load and build) from any file content and any
environment override: a wrong file is a `ConfigError` naming the problem, nothing else.

Input: the file's octets, then optionally NUL, a key index and NUL, an override value
(MILTER_WKD_<SECTION>_<KEY> for the key of that index).
"""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from milter_wkd import config
from milter_wkd.config import ConfigError

ALLOWED = (ConfigError,)

_FOLDER = Path(tempfile.mkdtemp(prefix="fuzz-config-"))
atexit.register(shutil.rmtree, _FOLDER, True)
_FILE = _FOLDER / "milter-wkd.toml"
_KEYS = [f"{config.ENV_PREFIX}{section.name}_{item.name}".upper()
         for section in config.sections()
         if section.name != "domains"
         for item in dataclasses.fields(section.default_factory())  # type: ignore[misc]
         ]


def one_input(data: bytes) -> None:
    text, _, override = data.partition(b"\0")
    index, _, value = override.partition(b"\0")
    environ = {}
    if index:
        environ[_KEYS[index[0] % len(_KEYS)]] = value.decode("utf-8", "surrogateescape")
    _FILE.write_bytes(text)
    loaded = config.load(_FILE, environ=environ)
    loaded.keys.limits()
    loaded.responder_directory()
    for domain in loaded.domains:
        assert loaded.domain(domain.name) is not None


def seeds() -> Iterator[tuple[str, bytes]]:
    yield "example", config.example().encode()
    yield "domains", (b'[[domains]]\nname = "a.example"\n[[domains]]\nname = "B.example"\n'
                      b"auth_submit = false\n")
    yield "web-account", (b'[web]\nbind_dn = "cn=wkd,ou=services,dc=example,dc=org"\n'
                          b'bind_password_file = "/etc/milter-wkd/wkd.password"\n')
    yield "keys", b'[keys]\ncurves = ["ed25519", "brainpoolP256r1"]\nmin_rsa_bits = 3072\n'
    yield "override-list", (b"[directory]\ntimeout = 5\n\0\x07\0"
                            b'["mail", "mailLocalAddress"]')
    yield "override-float", b"\0\x0a\0 2.5"
    yield "mistake", b'[directory]\nurri = "x"\n[milter]\nautocrypt = 1\n'
