"""`milter-wkd check` as a new user meets it (#12 item 3): `milter-wkd sandbox up`, then
only the check command that `up --json` gave, with no option of its own: everything passes,
because the sandbox's milter-wkd.toml carries a [check] section that names its Postfix,
its Dovecot socket and its WKD responder (on loopback, under the sandbox's test CA).

What cannot pass here, and is skipped (as the report says, not hidden): the DKIM TXT
records. The sandbox's keys are in no DNS (example.org is IANA's, not ours), so [check]
dns stays off and the two look-ups (selectors wkd-rsa and wkd) are reported as skipped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from milter_wkd import check
from milter_wkd.sandbox import down
from tests.support.mail import (
    require_mail_binaries,
    sandbox_dir_fixture,  # noqa: F401 (fixture `sandbox_dir`)
)

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent  # where the installed console script milter-wkd is


def _milter_wkd(*args: str) -> subprocess.CompletedProcess[str]:
    """A command as an administrator types it: `milter-wkd` found on PATH."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env = {k: v for k, v in env.items() if not k.startswith("MILTER_WKD_")}
    return subprocess.run(list(args), capture_output=True, text=True, timeout=180,
                          check=False, env=env)


def test_check_passes_with_only_what_sandbox_up_printed(sandbox_dir: Path) -> None:
    require_mail_binaries()
    directory = sandbox_dir / "cli"
    up = _milter_wkd("milter-wkd", "sandbox", "up", "--dir", str(directory), "--json")
    if up.returncode != 0 and "already in use" in up.stderr:
        # A port chosen free was taken before its daemon bound it (tests/support/mail.py).
        directory = sandbox_dir / "cli-again"
        up = _milter_wkd("milter-wkd", "sandbox", "up", "--dir", str(directory), "--json")
    try:
        assert up.returncode == 0, up.stderr
        info = json.loads(up.stdout)
        command = shlex.split(info["check_command"])
        assert command == ["milter-wkd", "check", "--config", info["config"]]
        checked = _milter_wkd(*command)
    finally:
        if (directory / "sandbox.json").exists():
            down(directory)
    out = checked.stdout
    assert checked.returncode == 0, out + checked.stderr
    lines = out.splitlines()
    results = [re.match(r"(ok  |warn|skip|FAIL) ([a-z-]+): (.*)", line) for line in lines[:-1]]
    assert all(results), out
    labels = [(m.group(1).strip(), m.group(2), m.group(3)) for m in results if m]
    # Every group passed, none warned or failed.
    assert {name for label, name, _ in labels if label == "ok"} == set(check.GROUPS), out
    assert not [line for line in labels if line[0] in ("warn", "FAIL")], out
    # The only skips: the DKIM TXT records, which no DNS of ours holds (see above).
    assert [(name, detail) for label, name, detail in labels if label == "skip"] == [
        ("dkim", f"{selector}._domainkey.example.org TXT not looked up (offline default; "
                 "--dns)") for selector in ("wkd-rsa", "wkd")], out
    assert re.fullmatch(r"\d+ ok, 0 warnings, 0 failed, 2 skipped", lines[-1]), out
    # The peers are the sandbox's own, not this host's.
    assert f"postfix: smtpd_milters = {info['milter_socket']}" in out
    assert f"dovecot: SASL socket {directory}/dovecot/" in out
    assert "wkd: example.org: serves " in out
