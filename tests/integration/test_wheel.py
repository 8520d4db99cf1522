"""An installed wheel, not only a checkout (#12 item 7): built from this tree, installed
into a fresh virtual environment outside it, it finds its shipped files (LDAP schema and
set-up LDIF, Postfix and Dovecot snippets, systemd units), copies them out, and runs the
whole sandbox (slapd, Dovecot, milter, Postfix) from them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from milter_wkd import files
from tests.support.mail import require_mail_binaries

pytestmark = pytest.mark.integration

CHECKOUT = Path(__file__).resolve().parents[2]


def run(*args: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{args}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """The bin/ folder of a fresh venv with the wheel of this tree installed."""
    work = Path(tempfile.mkdtemp(prefix="milter-wkd-wheel-"))
    work.chmod(0o711)  # the sandbox's Postfix and Dovecot must reach their files below it
    try:
        run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", work / "dist",
            CHECKOUT, cwd=work)
        (wheel,) = (work / "dist").glob("milter_wkd-*.whl")
        run(sys.executable, "-m", "venv", work / "venv", cwd=work)
        run(work / "venv" / "bin" / "python", "-m", "pip", "install", "-q", wheel, cwd=work)
        yield work / "venv" / "bin"
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


def test_the_installed_command_finds_and_copies_its_files(installed: Path,
                                                          tmp_path: Path) -> None:
    listed = run(installed / "milter-wkd", "files", cwd=tmp_path).stdout.splitlines()
    share = installed.parent / "share" / "milter-wkd"
    assert listed == [f"{kind}\t{share / kind}" for kind in files.KINDS]
    for kind in files.KINDS:  # every file of the checkout, and nothing else
        shipped = sorted(p.relative_to(files.path(kind)) for p in files.path(kind).rglob("*")
                         if p.is_file())
        installed_files = sorted(p.relative_to(share / kind)
                                 for p in (share / kind).rglob("*") if p.is_file())
        assert installed_files == shipped, kind
    run(installed / "milter-wkd", "files", "ldap", "--copy", tmp_path / "ldap", cwd=tmp_path)
    assert (tmp_path / "ldap" / "schema" / "milter-wkd.ldif").read_bytes() == (
        files.path("ldap") / "schema" / "milter-wkd.ldif").read_bytes()
    again = subprocess.run([installed / "milter-wkd", "files", "ldap", "--copy",
                            tmp_path / "ldap"], capture_output=True, text=True, check=False)
    assert again.returncode == 2
    assert "exists already: nothing copied" in again.stderr


def test_the_installed_sandbox_runs(installed: Path, tmp_path: Path) -> None:
    require_mail_binaries()
    directory = Path(tempfile.mkdtemp(prefix="milter-wkd-wheel-sandbox-"))
    directory.chmod(0o711)
    try:
        up = run(installed / "milter-wkd", "sandbox", "up", "--json", "--dir", directory,
                 cwd=tmp_path)
        info = json.loads(up.stdout)
        assert info["ldap_uri"].startswith("ldap://127.0.0.1:")
        assert all(info["pids"].values())
    finally:
        run(installed / "milter-wkd", "sandbox", "down", "--dir", directory, cwd=tmp_path)
        subprocess.run(["rm", "-rf", str(directory)], check=False)
