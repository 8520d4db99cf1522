"""OpenDKIM as the verifier of our signatures: `opendkim -t FILE` runs OpenDKIM's own
milter code on a file (no daemon, no socket) with the TXT records given as TestDNSData, so
nothing is asked of real DNS. Its Authentication-Results (printed at -vvv) give one result
per signature."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import NamedTuple

from tests.support.peers import require_binary

RESULT = re.compile(r"dkim=(\w+)[^;]*?header\.a=([\w-]+) header\.s=([\w.-]+)")


class Verdict(NamedTuple):
    result: str  # pass, fail, neutral, ...
    algorithm: str  # rsa-sha256, ed25519-sha256
    selector: str


def opendkim_verdicts(message: bytes, records: dict[str, str], workdir: Path) -> list[Verdict]:
    """OpenDKIM's verdict on every DKIM signature of message, in header order."""
    binary = require_binary("opendkim")
    workdir.mkdir(parents=True, exist_ok=True)
    dns = workdir / "dns-data"
    dns.write_text("".join(f"{name} {record}\n" for name, record in records.items()),
                   encoding="ascii")
    conf = workdir / "opendkim.conf"
    conf.write_text(f"Mode v\nTestDNSData file:{dns}\nAlwaysAddARHeader yes\nSyslog no\n",
                    encoding="ascii")
    path = workdir / "message.eml"
    path.write_bytes(message)
    done = subprocess.run([binary, "-x", str(conf), "-vvv", "-t", str(path)],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, output
    header = output.partition("hname='Authentication-Results' hvalue='")[2].partition("'")[0]
    assert header, output
    return [Verdict(*found) for found in RESULT.findall(header)]
