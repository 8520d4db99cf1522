"""OpenLDAP multi-provider replication as the sandbox runs it (`Sandbox(providers=2,
consumers=1)`, ldap/replication/, ldap/README.md "Replication"): real slapd processes on
loopback. What is measured is printed (run with -s to see it): the replication lag of a
publication, the state a conflicting pair of claim adds ends in.
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import ldap
import pytest

from milter_wkd import openpgp
from milter_wkd.config import DirectoryConfig
from milter_wkd.sandbox import Sandbox, SandboxError
from milter_wkd.sandbox.daemons import free_port
from milter_wkd.sandbox.slapd import (
    Slapd,
    provider_url,
    replication_ldif,
    ssha,
    wait_replicated,
)
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.model import KeyOrigin, Provenance
from milter_wkd.values import Address
from milter_wkd.wkd import address_hash
from tests.contract.test_store import make_key
from tests.support import ldapclient
from tests.support.gnupg import WKS_CLIENT, GnuPG
from tests.support.mail import require_mail_binaries
from tests.support.wksmail import FAKE, SUBMISSION, WksClient, send_raw

pytestmark = pytest.mark.integration

DEADLINE = 10.0  # seconds the polls wait before they call it a failure (the lags are
# printed, not asserted: the 1 s target is benchmarks/scale.py's to measure)
MAIL_ATTRIBUTES = ["mail", "mailLocalAddress"]


@pytest.fixture(name="topology", scope="module")
def topology_fixture() -> Iterator[Sandbox]:
    require_mail_binaries()
    try:
        sandbox = Sandbox(providers=2, consumers=1).start()
    except SandboxError:  # a port chosen free was taken meanwhile: once more, fresh ports
        sandbox = Sandbox(providers=2, consumers=1).start()
    try:
        yield sandbox
    finally:
        sandbox.stop()


def milter_config(sandbox: Sandbox, uri: str) -> DirectoryConfig:
    account = sandbox.slapd.service_accounts["milter"]
    return DirectoryConfig(uri=uri, bind_dn=account["dn"], bind_password=account["password"],
                           base_dn=sandbox.slapd.people_dn, pending_base=sandbox.slapd.pending_dn,
                           claims_base=sandbox.slapd.claims_dn,
                           mail_attributes=MAIL_ATTRIBUTES, timeout=3.0)


def publish(config: DirectoryConfig, address: str, uid: str | None = None) -> str:
    """Publish a fresh key for address's user (uid: its user ID, default the address);
    returns the key's fingerprint."""
    key, _primary, _sub = make_key(uid or address)
    with LdapStore(config) as store:
        user = store.user(Address.parse(address))
        cleaned = openpgp.clean_key(key, list(user.addresses))
        store.publish_key(user, cleaned, Provenance(KeyOrigin.ADMIN_IMPORT, "replication",
                                                    int(time.time())))
    return cleaned.info.fingerprint.hex


def fingerprints(server: Slapd, user: str) -> set[str]:
    """gpgFingerprint of uid=user on server, read as root over ldapi://."""
    conn = ldap.initialize(server.ldapi_uri)
    try:
        conn.sasl_external_bind_s()
        found = conn.search_s(f"uid={user},{server.people_dn}", ldap.SCOPE_BASE,
                              "(objectClass=*)", ["gpgFingerprint"])
    except ldap.NO_SUCH_OBJECT:
        return set()
    finally:
        conn.unbind_ext_s()
    return {v.decode() for v in found[0][1].get("gpgFingerprint", [])}


def wait_for(condition: Callable[[], bool], what: str, deadline: float = DEADLINE) -> float:
    """Poll condition every 5 ms; the seconds it took to hold (fails after deadline)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > deadline:
            pytest.fail(f"{what}: not within {deadline} s")
        time.sleep(0.005)
    return time.monotonic() - started


def test_topology_is_what_the_sandbox_reports(topology: Sandbox) -> None:
    info = topology.info()
    assert [s["role"] for s in info["slapds"]] == ["provider", "provider", "consumer"]
    assert info["ldap_uri"] == info["slapds"][0]["uri"] == topology.slapd.uri
    assert all(isinstance(s["pid"], int) for s in info["slapds"])
    assert len({s["uri"] for s in info["slapds"]}) == 3
    # The milter lists the providers in order; the responder reads the consumer.
    text = topology.config_path.read_text(encoding="utf-8")
    providers = " ".join(s["uri"] for s in info["slapds"][:2])
    assert f'uri = "{providers}"' in text
    assert topology.reader is topology.consumers[0]
    assert topology.wkd.slapd is topology.consumers[0]
    # Provider 2 and the consumer started empty: the entries and the password hashes came
    # by replication (the wkd account binds on the consumer with provider 1's password).
    wkd = topology.slapd.service_accounts["wkd"]
    ldapclient.bind(topology.consumers[0].uri, wkd["dn"], wkd["password"]).unbind_ext_s()


def test_a_publication_reaches_the_other_provider_and_the_consumer(
        topology: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    provider2, consumer = topology.providers[1], topology.consumers[0]
    lags: dict[str, list[float]] = {"provider2": [], "consumer": []}
    for round_ in range(5):
        fingerprint = publish(milter_config(topology, topology.slapd.uri), "bob@example.org",
                              f"Bob {round_} <bob@example.org>")
        written = time.monotonic()
        seen: dict[str, float] = {}
        while len(seen) < 2:
            for name, server in (("provider2", provider2), ("consumer", consumer)):
                if name not in seen and fingerprint in fingerprints(server, "bob"):
                    seen[name] = time.monotonic() - written
            if time.monotonic() - written > DEADLINE:
                pytest.fail(f"round {round_}: only {sorted(seen)} had the key after "
                            f"{DEADLINE} s")
            time.sleep(0.002)
        for name, lag in seen.items():
            lags[name].append(lag)
    with capsys.disabled():
        print("\nreplication lag of a publication on provider 1 (s, 5 rounds): " + "; ".join(
            f"{name} max {max(v):.3f} median {sorted(v)[2]:.3f}" for name, v in lags.items()))


def test_a_write_on_the_consumer_is_referred_not_accepted(topology: Sandbox) -> None:
    consumer = topology.consumers[0]
    milter = topology.slapd.service_accounts["milter"]
    conn = ldapclient.bind(consumer.uri, milter["dn"], milter["password"])
    conn.set_option(ldap.OPT_REFERRALS, 0)  # see the answer, do not chase it
    try:
        with pytest.raises((ldap.REFERRAL, ldap.UNWILLING_TO_PERFORM)) as refused:
            conn.modify_s(f"uid=carol,{consumer.people_dn}",
                          [(ldap.MOD_REPLACE, "wkdPreferEncrypt", [b"mutual"])])
    finally:
        conn.unbind_ext_s()
    # The referral names provider 1 (olcUpdateRef).
    if isinstance(refused.value, ldap.REFERRAL):
        assert topology.slapd.uri in str(refused.value.args[0].get("info", ""))
    # The store pointed at the consumer alone fails too, and nothing changed anywhere.
    with pytest.raises(Exception):  # noqa: B017, PT011 (whatever the store makes of it)
        publish(milter_config(topology, consumer.uri), "carol@example.org")
    time.sleep(0.2)
    assert all(not fingerprints(server, "carol") for _role, server in topology.slapds)


def test_with_provider_1_down_publishing_fails_over_and_provider_1_catches_up(
        topology: Sandbox) -> None:
    provider1, provider2 = topology.providers
    consumer = topology.consumers[0]
    config = milter_config(topology, topology.directory_uri)  # both, as the milter has them
    provider1.stop()  # by its pid
    try:
        assert provider1.pid is None
        fingerprint = publish(config, "alice@example.org")
        assert fingerprint in fingerprints(provider2, "alice")
        wait_for(lambda: fingerprint in fingerprints(consumer, "alice"),
                 "the consumer has the key written on provider 2")
    finally:
        provider1.start()
    caught_up = wait_for(lambda: fingerprint in fingerprints(provider1, "alice"),
                         "provider 1 has, after its restart, the key written meanwhile")
    print(f"provider 1 caught up {caught_up:.3f} s after it answered again")
    wait_replicated([server for _role, server in topology.slapds])
    # And the milter's order holds again: writes go to provider 1 first.
    again = publish(config, "alice@example.org", "Alice <alice@example.org>")
    assert again in fingerprints(provider1, "alice")


def claim(server: Slapd, fingerprint: str, holder: str) -> tuple[str, str]:
    """Add wkdFingerprint=<fingerprint> claiming it for holder, as the milter's account."""
    milter = server.service_accounts["milter"]
    conn = ldapclient.bind(server.uri, milter["dn"], milter["password"])
    try:
        outcome = ldapclient.outcome(lambda: conn.add_s(
            f"wkdFingerprint={fingerprint},{server.claims_dn}",
            [("objectClass", [b"wkdKeyClaim"]), ("wkdFingerprint", [fingerprint.encode()]),
             ("wkdClaimHolder", [holder.encode()])]))
    finally:
        conn.unbind_ext_s()
    return server.uri, outcome


def claim_holders(server: Slapd, fingerprint: str) -> list[str]:
    conn = ldap.initialize(server.ldapi_uri)
    try:
        conn.sasl_external_bind_s()
        found = conn.search_s(f"wkdFingerprint={fingerprint},{server.claims_dn}",
                              ldap.SCOPE_BASE, "(objectClass=*)", ["wkdClaimHolder"])
    except ldap.NO_SUCH_OBJECT:
        return []
    finally:
        conn.unbind_ext_s()
    return sorted(v.decode() for v in found[0][1].get("wkdClaimHolder", []))


def test_conflicting_claim_adds_on_both_providers_at_once(
        topology: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    """Only observed (ldap/README.md "Replication", conflicts): two writers that do NOT
    follow the rule (both providers in the same order) add the same claim for different
    holders at the same instant. Both adds succeed locally; replication must end with one
    claim, the same on every server (last writer wins by entryCSN)."""
    provider1, provider2 = topology.providers
    fingerprint = "C0FFEE" * 6 + "0123"
    holders = {provider1.uri: f"uid=alice,{provider1.people_dn}",
               provider2.uri: f"uid=bob,{provider1.people_dn}"}
    barrier = threading.Barrier(2)
    results: list[tuple[str, str]] = []

    def writer(server: Slapd) -> None:
        barrier.wait()
        results.append(claim(server, fingerprint, holders[server.uri]))

    threads = [threading.Thread(target=writer, args=(s,)) for s in (provider1, provider2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_replicated([server for _role, server in topology.slapds])
    time.sleep(0.5)  # settle: nothing may change any more
    wait_replicated([server for _role, server in topology.slapds])
    final = {role + str(i): claim_holders(server, fingerprint)
             for i, (role, server) in enumerate(topology.slapds)}
    with capsys.disabled():
        print(f"\nconflicting claim adds: {sorted(results)}; final holders: {final}")
    assert len(results) == 2
    states = list(final.values())
    assert all(state == states[0] for state in states), final
    assert len(states[0]) == 1, final  # one holder, not both, not none


# -- a lost conflict after a partition, repaired by the follower ------------------------------

def cut_replication(topology: Sandbox, *, cut: bool) -> None:
    """Cut (or restore) replication between the providers: each provider's olcSyncrepl
    for its peer points at a port nobody listens on (or at the peer again), as root over
    ldapi://. The consumer keeps following both; the milter still reaches both."""
    dead = f"ldap://127.0.0.1:{free_port()}/"  # nothing listens there
    urls = [provider_url(server) for server in topology.providers]
    replicator = topology.slapd.service_accounts["replicator"]
    for server in topology.providers:
        seen = [url if url == provider_url(server) or not cut else dead for url in urls]
        lines = [line for line in replication_ldif(
            "provider", seen, suffix=server.suffix, replicator_dn=replicator["dn"],
            replicator_password=replicator["password"]).splitlines()
            if line.startswith("olcSyncrepl:")]
        # The own value stays as configured (a provider skips the one naming itself).
        server.ldapmodify(f"dn: {server.database_dn}\nchangetype: modify\n"
                          "replace: olcSyncrepl\n" + "\n".join(lines) + "\n-\n")


def key_state(server: Slapd, user: str) -> tuple[set[str], str | None, bool]:
    """(gpgFingerprint values, wkdKeyProblem, has pgpKey) of uid=user, as root."""
    conn = ldap.initialize(server.ldapi_uri)
    try:
        conn.sasl_external_bind_s()
        attrs = conn.search_s(f"uid={user},{server.people_dn}", ldap.SCOPE_BASE,
                              "(objectClass=*)", ["gpgFingerprint", "wkdKeyProblem",
                                                  "pgpKey"])[0][1]
    finally:
        conn.unbind_ext_s()
    problem = attrs.get("wkdKeyProblem", [b""])[0].decode() or None
    return ({v.decode() for v in attrs.get("gpgFingerprint", [])}, problem,
            bool(attrs.get("pgpKey")))


def test_a_claim_conflict_lost_in_a_partition_is_repaired_by_the_follower(
        topology: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    """ldap/README.md, "Conflicts": replication between the providers cut, alice publishes
    a key on provider 1, a second later bob the same key (his user ID on it too) on
    provider 2 - each provider's uniqueness check passes, as it cannot see the other's
    write. Replication restored, last writer wins leaves bob's claim and BOTH entries
    publishing the key. The milter's follower (milter_wkd.reconcile, running in the
    sandbox's milter) repairs it to the documented end state, on every slapd: the earlier
    publication (alice's) keeps the key and the claim, bob's key is withheld
    (wkdKeyProblem, pgpKey kept, nothing derived); WKD serves it for alice only."""
    provider1, provider2 = topology.providers
    key, _primary, _sub = make_key("Alice <alice@example.org>", "Bob <bob@example.org>")
    fpr = openpgp.inspect_key(key).fingerprint.hex
    alice_dn = f"uid=alice,{provider1.people_dn}"
    cut_replication(topology, cut=True)
    try:
        for server, address in ((provider1, "alice@example.org"),
                                (provider2, "bob@example.org")):
            if server is provider2:
                time.sleep(1.1)  # bob's publication is the later one (wkdKeyPublished)
            with LdapStore(milter_config(topology, server.uri)) as store:
                user = store.user(Address.parse(address))
                store.publish_key(user, openpgp.clean_key(key, list(user.addresses)),
                                  Provenance(KeyOrigin.ADMIN_IMPORT, "partition",
                                             int(time.time())))
        # The conflict is real: each side holds its own claim.
        time.sleep(0.5)
        assert claim_holders(provider1, fpr) == [alice_dn]
        assert claim_holders(provider2, fpr) == [f"uid=bob,{provider1.people_dn}"]
    finally:
        cut_replication(topology, cut=False)
    restored = time.monotonic()

    def repaired() -> bool:
        return all(key_state(server, "alice") == ({fpr}, None, True)
                   and (state := key_state(server, "bob"))[0] == set() and state[2]
                   and fpr in (state[1] or "") and claim_holders(server, fpr) == [alice_dn]
                   for _role, server in topology.slapds)

    took = wait_for(repaired, "the documented end state on every slapd", deadline=30.0)
    wait_replicated([server for _role, server in topology.slapds])
    assert repaired()  # and it stays so once everything has settled
    wait_for(lambda: served(topology, "alice@example.org") == fpr, "alice's key served")
    wait_for(lambda: served(topology, "bob@example.org") is None, "bob's key not served")
    problem = key_state(topology.slapd, "bob")[1]
    with capsys.disabled():
        print(f"\npartition conflict repaired on every slapd {took:.2f} s after replication "
              f"was restored ({time.monotonic() - restored:.2f} s with the checks); bob's "
              f"wkdKeyProblem: {problem}")


# -- provider 1 killed under a stream of submissions ---------------------------------------

STREAM = 200  # authenticated WKS submissions (the number)
SENDERS = 4  # SMTP clients sending them, as an MUA pool would
RETRY_AFTER = 0.5  # seconds a client waits after a 4xx, a refused login or a dropped connection
KILL_AT, RESTART_AT = 60, 140  # provider 1 SIGKILLed / started again after this many 250s


def stream_users_ldif(people_dn: str, count: int) -> str:
    """inetOrgPerson entries uid=sN, mail sN@example.org, password sN-secret ({SSHA})."""
    return "".join(
        f"dn: uid=s{n},{people_dn}\nobjectClass: inetOrgPerson\nuid: s{n}\ncn: S {n}\n"
        f"sn: {n}\nmail: s{n}@example.org\nuserPassword: {ssha(f's{n}-secret')}\n\n"
        for n in range(count))


def generate_keys(gpg: GnuPG, count: int) -> dict[str, str]:
    """One Ed25519 key with a Curve25519 subkey per sN@example.org, in ONE gpg run
    (200 --quick-gen-key runs would take minutes); address -> fingerprint."""
    block = ("%no-protection\nKey-Type: eddsa\nKey-Curve: ed25519\nKey-Usage: sign\n"
             "Subkey-Type: ecdh\nSubkey-Curve: cv25519\nSubkey-Usage: encrypt\n"
             "Name-Real: S {n}\nName-Email: s{n}@example.org\nExpire-Date: 1y\n%commit\n")
    gpg.run("--gen-key", input="".join(block.format(n=n) for n in range(count)).encode(),
            timeout=300)
    found: dict[str, str] = {}
    fpr = ""
    for fields in gpg.colons("--list-secret-keys"):
        if fields[0] == "sec":
            fpr = ""
        elif fields[0] == "fpr" and not fpr:
            fpr = fields[9]
        elif fields[0] == "uid" and fpr:
            found[fields[9].rsplit("<", 1)[-1].rstrip(">")] = fpr
    assert len(found) == count, sorted(found)[:5]
    return found


def whole_directory(server: Slapd) -> dict[str, str]:
    """DN -> entryCSN of every entry of the suffix on server, read as root over ldapi://."""
    conn = ldap.initialize(server.ldapi_uri)
    try:
        conn.sasl_external_bind_s()
        found = conn.search_s(server.suffix, ldap.SCOPE_SUBTREE, "(objectClass=*)",
                              ["entryCSN"])
    finally:
        conn.unbind_ext_s()
    return {dn.lower(): attrs["entryCSN"][0].decode() for dn, attrs in found}


class Stream:
    """SENDERS clients sending one logged-in submission per user through the submission
    port, retrying what is not a 250 or a 5xx (as a mail client retries); a poller asks the
    responder (reading the consumer) for every address whose submission was accepted."""

    def __init__(self, sandbox: Sandbox, submissions: dict[str, bytes]) -> None:
        self.sandbox = sandbox
        self.todo = list(submissions.items())
        self.lock = threading.Lock()
        self.accepted: list[str] = []
        self.refused: dict[str, str] = {}
        self.retries: list[str] = []  # why each retry happened
        self.served: set[str] = set()  # addresses the responder answered 200 for
        self.wrong: list[tuple[str, int]] = []  # (address, status) after a 200, or any 5xx
        self.polls = 0
        self.stopping = threading.Event()

    def send(self) -> None:
        endpoint = self.sandbox.postfix.submission
        while True:
            with self.lock:
                if not self.todo:
                    return
                address, raw = self.todo.pop(0)
            local = address.split("@", 1)[0]
            try:
                send_raw(endpoint.host, endpoint.port, address, [SUBMISSION], raw,
                         login=(address, f"{local}-secret"))
            except smtplib.SMTPResponseException as exc:
                code, text = exc.smtp_code, exc.smtp_error.decode(errors="replace")
            except smtplib.SMTPRecipientsRefused as exc:
                code, reply = next(iter(exc.recipients.values()))
                text = reply.decode(errors="replace")
            except (smtplib.SMTPException, OSError) as exc:
                code, text = 0, f"{type(exc).__name__}: {exc}"
            else:
                code, text = 250, ""
            with self.lock:
                if code == 250:
                    self.accepted.append(address)
                elif 500 <= code < 600:
                    self.refused[address] = f"{code} {text}"
                else:
                    self.retries.append(f"{code} {text[:80]}")
                    self.todo.append((address, raw))
            if code != 250 and not 500 <= code < 600:
                time.sleep(RETRY_AFTER)

    def poll(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                addresses = list(self.accepted)
            for address in addresses:
                path = (f"/.well-known/openpgpkey/example.org/hu/"
                        f"{address_hash(Address.parse(address))}")
                try:
                    status = self.sandbox.wkd.get(path)[0]
                except OSError as exc:
                    self.wrong.append((address, -1))
                    print(f"responder unreachable: {exc}")
                    continue
                self.polls += 1
                if status == 200:
                    self.served.add(address)
                elif status >= 500 or address in self.served:
                    self.wrong.append((address, status))
            time.sleep(0.01)


def test_provider_1_killed_during_200_submissions_every_one_is_published_once(
        topology: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's stream: provider 1 SIGKILLed while 200 logged-in WKS submissions go
    through Postfix and the milter (which fails over to provider 2; what fails meanwhile
    is a 4xx the client retries), then started again. Every submission is published
    exactly once (directory, milter log, notices in the mail log), provider 1 catches up
    (the same entries, entryCSN for entryCSN, on every slapd), and the responder never
    answers a 5xx, nor loses a key it served once."""
    provider1 = topology.providers[0]
    assert topology.milter is not None
    provider1.ldapmodify(stream_users_ldif(provider1.people_dn, STREAM), add=True)
    wait_replicated([server for _role, server in topology.slapds])
    gpg = GnuPG(tmp_path / "stream")
    try:
        gpg.import_key(topology.submission_public_key.read_bytes())
        made = time.monotonic()
        fprs = generate_keys(gpg, STREAM)
        submissions = {address: gpg.run(*FAKE, "--create", fpr, address,
                                        binary=WKS_CLIENT).stdout
                       for address, fpr in fprs.items()}
        made = time.monotonic() - made
    finally:
        gpg.close()
    milter_log = topology.milter.log.stat().st_size
    mail_log = Path(topology.postfix.maillog).stat().st_size
    stream = Stream(topology, submissions)
    senders = [threading.Thread(target=stream.send) for _ in range(SENDERS)]
    poller = threading.Thread(target=stream.poll)
    started = time.monotonic()
    for thread in (*senders, poller):
        thread.start()
    killed_at = restarted_at = None
    try:
        wait_for(lambda: len(stream.accepted) >= KILL_AT, "the first submissions", 120)
        assert provider1.pid is not None
        os.kill(provider1.pid, signal.SIGKILL)
        killed_at = (time.monotonic() - started, len(stream.accepted))
        wait_for(lambda: not provider1.running, "provider 1 gone")
        wait_for(lambda: len(stream.accepted) >= RESTART_AT, "submissions via provider 2",
                 120)
        provider1.start()
        restarted_at = (time.monotonic() - started, len(stream.accepted))
        for thread in senders:
            thread.join(timeout=180)
            assert not thread.is_alive(), "the senders did not finish within 3 minutes"
        sent = time.monotonic() - started
    finally:
        if not provider1.running:
            provider1.start()
        with stream.lock:
            stream.todo.clear()
        for thread in senders:
            thread.join(timeout=60)
        time.sleep(0.5)  # the poller sees the last acceptances once more
        stream.stopping.set()
        poller.join(timeout=60)
    assert not stream.refused, stream.refused
    assert sorted(stream.accepted) == sorted(fprs), "each submission accepted exactly once"

    # Provider 1 caught up: the same entries, with the same entryCSN, on every slapd.
    caught_up = wait_replicated([server for _role, server in topology.slapds], timeout=60)
    directories = [whole_directory(server) for _role, server in topology.slapds]
    assert all(d == directories[0] for d in directories[1:]), [
        sorted(set(d.items()) ^ set(directories[0].items()))[:4] for d in directories[1:]]
    # Published exactly once: the submitted key on every user's entry, on every slapd,
    # and one claim on its fingerprint naming that user.
    for address, fpr in fprs.items():
        user = address.split("@", 1)[0]
        for _role, server in topology.slapds:
            assert fingerprints(server, user) == {fpr}, (address, server.uri)
        assert claim_holders(provider1, fpr) == [f"uid={user},{provider1.people_dn}"]
    # The milter logged each publication once (a 4xx publishes nothing) ...
    lines = topology.milter.log.read_bytes()[milter_log:].decode(errors="replace")
    for address, fpr in fprs.items():
        assert lines.count(f"published {fpr} for {address} ") == 1, address
    # ... and Postfix delivered each user's "published" notice once (the reinjected
    # notices a 4xx of the directory deferred are retried by `postqueue -f`).
    subprocess.run(["postqueue", "-c", str(topology.postfix.config_dir), "-f"],
                   capture_output=True, timeout=60, check=True)

    def notices() -> dict[str, int]:
        log = Path(topology.postfix.maillog).read_bytes()[mail_log:].decode(errors="replace")
        return {address: sum(1 for line in log.splitlines()
                             if f"to=<{address}>" in line and "status=sent" in line)
                for address in fprs}

    wait_for(lambda: all(n >= 1 for n in notices().values()), "every notice delivered", 120)
    assert set(notices().values()) == {1}, {a: n for a, n in notices().items() if n != 1}
    # The responder: every key served in the end; never a 5xx, never a key lost.
    wait_for(lambda: all(served(topology, address) == fpr for address, fpr in fprs.items()),
             "every key served from the consumer")
    assert not stream.wrong, stream.wrong[:10]
    with capsys.disabled():
        print(f"\n{STREAM} keys and submissions made in {made:.1f} s; sent in {sent:.1f} s "
              f"by {SENDERS} clients; provider 1 killed at {killed_at[0]:.1f} s "
              f"({killed_at[1]} accepted), started at {restarted_at[0]:.1f} s "
              f"({restarted_at[1]} accepted); {len(stream.retries)} retries "
              f"({sorted({r[:40] for r in stream.retries})[:4]}); all slapds equal "
              f"{caught_up:.2f} s after the last; responder polled {stream.polls} times, "
              f"{len(stream.served)} keys served, no 5xx")


# -- the responder on the consumer (these run last: the final one stops the consumer) -------

def served(sandbox: Sandbox, address: str) -> str | None:
    """The fingerprint the sandbox's responder serves for address by WKD, if any."""
    path = f"/.well-known/openpgpkey/example.org/hu/{address_hash(Address.parse(address))}"
    status, _headers, body = sandbox.wkd.get(path)
    return openpgp.inspect_key(body).fingerprint.hex if status == 200 else None


def test_a_key_published_through_postfix_is_served_from_the_consumer(
        topology: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """gpg-wks-client's submission, logged in, through real Postfix and the milter (which
    writes to provider 1); the responder reads the consumer."""
    client = WksClient(tmp_path / "carol", topology, "Carol <carol@example.org>")
    try:
        raw = client.create("carol@example.org")
        endpoint = topology.postfix.submission
        sent = time.monotonic()
        send_raw(endpoint.host, endpoint.port, "carol@example.org", [SUBMISSION], raw,
                 login=("carol@example.org", topology.users["carol"]["password"]))
        accepted = time.monotonic() - sent  # the milter published during DATA
        lag = wait_for(lambda: served(topology, "carol@example.org") == client.fpr,
                       "the responder on the consumer serving carol's key")
    finally:
        client.close()
    assert client.fpr in fingerprints(topology.slapd, "carol")
    with capsys.disabled():
        print(f"\nsubmission accepted in {accepted:.3f} s; served from the consumer "
              f"{lag:.3f} s later")


def test_the_consumer_down_the_responder_serves_from_memory_then_from_a_provider(
        topology: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    consumer = topology.consumers[0]
    before = publish(milter_config(topology, topology.directory_uri), "alice@example.org",
                     "Alice <alice@example.org>")
    wait_for(lambda: served(topology, "alice@example.org") == before, "alice's key served")
    pid = consumer.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not consumer.running, "the consumer gone")
    try:
        # What the responder has in memory it keeps serving, never a 5xx.
        for _ in range(20):
            assert served(topology, "alice@example.org") == before
        # A new publication reaches it through provider 1, where it fails over.
        after = publish(milter_config(topology, topology.directory_uri), "alice@example.org",
                        "Alice L. <alice@example.org>")
        lag = wait_for(lambda: served(topology, "alice@example.org") == after,
                       "the new key served via a provider", deadline=30.0)
        with capsys.disabled():
            print(f"\nconsumer killed: a new key served via a provider after {lag:.3f} s")
    finally:
        consumer.stop()
        consumer.start()
