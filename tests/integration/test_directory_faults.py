"""The store when slapd goes away and comes back (a private slapd, stopped by its pid)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from milter_wkd.config import DirectoryConfig
from milter_wkd.errors import DirectoryUnavailable
from milter_wkd.sandbox.slapd import Slapd
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.values import Address

pytestmark = pytest.mark.integration

BOUND = 2.0  # seconds: the brief's "a stopped slapd is reported within 2 s"
ALICE = Address.parse("alice@example.org")


def config(server: Slapd, uri: str | None = None) -> DirectoryConfig:
    info = server.service_accounts["milter"]
    return DirectoryConfig(uri=uri or server.uri, bind_dn=info["dn"],
                           bind_password=info["password"], base_dn=server.people_dn,
                           pending_base=server.pending_dn,
                           mail_attributes=["mail", "mailLocalAddress"], timeout=1.0)


def timed_failure(directory: LdapStore) -> float:
    started = time.monotonic()
    with pytest.raises(DirectoryUnavailable):
        directory.find_user(ALICE)
    return time.monotonic() - started


def test_stopped_slapd_is_reported_quickly_and_restarted_one_is_used_again(
        private_slapd: Slapd) -> None:
    with LdapStore(config(private_slapd)) as directory:
        assert directory.find_user(ALICE) is not None  # leaves a pooled connection
        token = directory.change_token()
        private_slapd.stop()
        assert timed_failure(directory) < BOUND
        assert timed_failure(directory) < BOUND  # and again, with nothing pooled
        private_slapd.start()
        user = directory.find_user(ALICE)
        assert user is not None
        assert directory.change_token() == token


def test_restart_between_calls_is_invisible(private_slapd: Slapd) -> None:
    # The pooled connection is dead after the restart; the store reconnects once.
    with LdapStore(config(private_slapd)) as directory:
        assert directory.find_user(ALICE) is not None
        private_slapd.stop()
        private_slapd.start()
        assert directory.find_user(ALICE) is not None


def stop_and_wait(pid: int) -> None:
    """SIGSTOP, then wait until every thread of the process has stopped: a thread still
    running on the other core could otherwise answer one more request (seen under load)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    tasks = Path(f"/proc/{pid}/task")
    while time.monotonic() < deadline:
        states = []
        for task in tasks.iterdir():
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except OSError:
                continue  # a thread that just ended
        if states and all(state in ("T", "t") for state in states):
            return
        time.sleep(0.001)
    raise AssertionError(f"slapd (pid {pid}) did not stop")


def test_hung_slapd_is_reported_within_the_timeout(private_slapd: Slapd) -> None:
    with LdapStore(config(private_slapd)) as directory:
        assert directory.find_user(ALICE) is not None
        pid = private_slapd.pid
        assert pid is not None
        stop_and_wait(pid)
        try:
            assert timed_failure(directory) < BOUND  # timeout=1.0: one receive timeout
        finally:
            os.kill(pid, signal.SIGCONT)
        assert directory.find_user(ALICE) is not None


def test_unreachable_ldapi_socket(private_slapd: Slapd) -> None:
    missing = private_slapd.workdir / "no-such-socket"
    with LdapStore(config(private_slapd, uri=f"ldapi://{str(missing).replace('/', '%2F')}")) as d:
        assert timed_failure(d) < BOUND


def test_a_list_of_servers_fails_over_to_the_next_that_answers(
        private_slapd: Slapd, tmp_path: Path) -> None:
    # Two providers as a URI list (replication is not the point here: both hold the
    # example directory, and the second is given the same service passwords).
    second = Slapd(tmp_path / "second")
    second.service_accounts = private_slapd.service_accounts
    second.start()
    try:
        dead = f"ldap://127.0.0.1:{_closed_port()}"
        with LdapStore(config(private_slapd, f"{dead} {private_slapd.uri}")) as directory:
            assert directory.find_user(ALICE) is not None  # the dead first one is skipped
        both = f"{private_slapd.uri}, {second.uri}"
        with LdapStore(config(private_slapd, both)) as directory:
            assert directory.find_user(ALICE) is not None  # leaves a pooled connection
            private_slapd.stop()
            started = time.monotonic()
            assert directory.find_user(ALICE) is not None  # reconnected to the second
            assert time.monotonic() - started < BOUND
            second.stop()
            assert timed_failure(directory) < BOUND  # nobody answers: a temporary failure
            private_slapd.start()
            assert directory.find_user(ALICE) is not None  # the first is back
    finally:
        second.close()


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
