"""Real WKD clients against the sandbox responder, and keys written like an administrator.

`WkdNamespace(tmp, ca_file, direct=False).run(cmd, env)` runs a command inside
`unshare -m` after bind-mounting a test /etc/hosts (example.org and, unless `direct`,
openpgpkey.example.org -> 127.0.0.1), a test /etc/resolv.conf (nameserver 127.0.0.1) and
the test CA over /etc/ssl/certs/ca-certificates.crt: the system files are never touched.
dirmngr is started by gpg INSIDE the namespace and killed there when the command ends, so
no dirmngr outlives its namespace. Needs root (unshare -m).

`write_key(slapd, dn, key, addresses)` does what an administrator does with ldapmodify:
pgpKey (armored), gpgMailbox and wkdAddressHash on the entry, in one modify, and (unless
`checked=False`) the wkdKeyDigest that the system's follower (milter_wkd.reconcile) writes
once it has checked a pgpKey: without it the responder serves nothing of the entry, and
these tests run the responder without a milter.
"""

from __future__ import annotations

import base64
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from milter_wkd.openpgp import armor_key
from milter_wkd.sandbox.slapd import Slapd, SlapdError
from milter_wkd.store.schema import address_slot, key_digest
from milter_wkd.values import Address
from tests.support.peers import ON_CI, require_binary

_SCRIPT = """\
set -e
mount --bind "$WKD_TEST_HOSTS" /etc/hosts
mount --bind "$WKD_TEST_RESOLV" /etc/resolv.conf
mount --bind "$WKD_TEST_CA" /etc/ssl/certs/ca-certificates.crt
set +e
"$@"
rc=$?
if [ -n "$GNUPGHOME" ]; then gpgconf --kill dirmngr; fi
exit $rc
"""


def require_namespaces() -> None:
    require_binary("unshare")
    if os.geteuid() != 0:
        message = "unshare -m with bind mounts needs root"
        if ON_CI:
            pytest.fail(message)
        pytest.skip(message)


class WkdNamespace:
    def __init__(self, workdir: Path, ca_file: Path, *, direct: bool = False) -> None:
        require_namespaces()
        workdir.mkdir(parents=True, exist_ok=True)
        names = "example.org" if direct else "example.org openpgpkey.example.org"
        self.hosts = workdir / "hosts"
        self.hosts.write_text(f"127.0.0.1 localhost {names}\n")
        self.resolv = workdir / "resolv.conf"
        self.resolv.write_text("nameserver 127.0.0.1\n")
        self.ca_file = ca_file

    def run(self, cmd: Sequence[str], env: Mapping[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        full_env = {**(env if env is not None else os.environ),
                    "WKD_TEST_HOSTS": str(self.hosts), "WKD_TEST_RESOLV": str(self.resolv),
                    "WKD_TEST_CA": str(self.ca_file), "SSL_CERT_FILE": str(self.ca_file)}
        return subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", _SCRIPT, "sh", *cmd],
            env=full_env, capture_output=True, timeout=timeout, check=False)


def key_ldif(dn: str, key: bytes, addresses: Sequence[str], *, add_class: bool,
             checked: bool = True) -> str:
    """An LDIF modify that publishes `key` (binary or armored) for `addresses` on `dn`."""
    armored = key if key.lstrip().startswith(b"-----") else armor_key(key)
    parsed = [Address.parse(a) for a in addresses]
    lines = [f"dn: {dn}", "changetype: modify"]
    if add_class:
        lines += ["add: objectClass", "objectClass: wkdKeyHolder", "-"]
    lines += ["replace: pgpKey", f"pgpKey:: {base64.b64encode(armored).decode()}", "-"]
    lines += ["replace: gpgMailbox", *[f"gpgMailbox: {a}" for a in parsed], "-"]
    lines += ["replace: wkdAddressHash", *[f"wkdAddressHash: {address_slot(a)}" for a in parsed],
              "-"]
    lines += ["replace: wkdKeyDigest", *([f"wkdKeyDigest: {key_digest(armored)}"] if checked
                                          else []), "-"]
    return "\n".join(lines) + "\n"


def write_key(slapd: Slapd, dn: str, key: bytes, addresses: Sequence[str], *,
              checked: bool = True) -> None:
    """Publish a key on an entry with ldapmodify, as root (like an administrator);
    checked: with the digest the system writes after checking it."""
    try:
        slapd.ldapmodify(key_ldif(dn, key, addresses, add_class=True, checked=checked))
    except SlapdError as exc:
        if "Type or value exists" not in str(exc):
            raise
        slapd.ldapmodify(key_ldif(dn, key, addresses, add_class=False, checked=checked))


def write_raw_key(slapd: Slapd, dn: str, value: bytes, *, checked: bool = True) -> None:
    """Replace only pgpKey with any bytes (a corrupt or secret key written by hand), and
    with `checked` its digest, as if the system had let it through: the responder's own
    checks of every key must still refuse it."""
    digest = f"replace: wkdKeyDigest\nwkdKeyDigest: {key_digest(value)}\n-\n" if checked else ""
    slapd.ldapmodify(f"dn: {dn}\nchangetype: modify\nreplace: pgpKey\n"
                     f"pgpKey:: {base64.b64encode(value).decode()}\n-\n{digest}")


def remove_key(slapd: Slapd, dn: str) -> None:
    """Delete pgpKey, gpgMailbox, wkdAddressHash, the digest and any problem from the
    entry with ldapmodify."""
    slapd.ldapmodify(f"dn: {dn}\nchangetype: modify\nreplace: pgpKey\n-\n"
                     "replace: gpgMailbox\n-\nreplace: wkdAddressHash\n-\n"
                     "replace: wkdKeyDigest\n-\nreplace: wkdKeyProblem\n-\n")
