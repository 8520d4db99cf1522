"""The fully realistic WKS path: gpg-wks-client finds the submission address, the policy
and the submission key by WKD itself (no --fake-submission-addr), over real HTTPS from the
sandbox's responder; the milter publishes; gpg --locate-keys then finds the key by WKD.
"""

from __future__ import annotations

import os
import smtplib
from pathlib import Path

import pytest

from milter_wkd.sandbox import Sandbox
from tests.support.gnupg import WKS_CLIENT, GnuPG
from tests.support.mail import sandbox_fixture  # noqa: F401 (the `sandbox` fixture)
from tests.support.peers import ON_CI
from tests.support.wkd import WkdNamespace
from tests.support.wksmail import SUBMISSION, published, subject_is, wait_for_mail


def test_discovery_submission_and_lookup_by_wkd(sandbox: Sandbox, tmp_path: Path) -> None:
    if sandbox.wkd.port != 443:
        message = "127.0.0.1:443 was taken: real WKD clients know no other port"
        if ON_CI:
            pytest.fail(message)
        pytest.skip(message)
    namespace = WkdNamespace(tmp_path / "ns", sandbox.wkd.ca_file)
    with GnuPG(tmp_path / "alice") as gpg:
        fpr = gpg.generate("Alice <alice@example.org>")
        env = {**os.environ, "GNUPGHOME": str(gpg.home), "LC_ALL": "C"}
        supported = namespace.run([WKS_CLIENT, "--supported", "--with-colons",
                                   "example.org"], env)
        assert supported.returncode == 0, supported.stderr.decode()
        fields = supported.stdout.decode().strip().split(":")
        assert fields[:3] == ["example.org", "1", "1"]  # WKD and WKS supported
        assert fields[5] == "1"  # auth-submit advertised
        created = namespace.run([WKS_CLIENT, "--verbose", "--create", fpr,
                                 "alice@example.org"], env)
        assert created.returncode == 0, created.stderr.decode()
        assert b"--fake" not in created.stdout
        with smtplib.SMTP(sandbox.postfix.submission.host, sandbox.postfix.submission.port,
                          timeout=30) as smtp:
            smtp.login("alice@example.org", sandbox.users["alice"]["password"])
            smtp.sendmail("alice@example.org", [SUBMISSION], created.stdout)
        wait_for_mail(sandbox, "alice", subject_is("Your key has been published"))
        stored = published(sandbox, "alice@example.org")
        assert stored is not None
        assert stored.fingerprint.hex == fpr
    with GnuPG(tmp_path / "bob") as reader:
        env = {**os.environ, "GNUPGHOME": str(reader.home), "LC_ALL": "C"}
        found = namespace.run([reader.gpg, "--batch", "--auto-key-locate",
                               "clear,nodefault,wkd", "--locate-keys", "alice@example.org"],
                              env)
        assert found.returncode == 0, found.stderr.decode()
        assert fpr in reader.run("--with-colons", "--list-keys").stdout.decode()
