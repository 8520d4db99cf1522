"""WKS benchmark: the same N submissions, made by the real gpg-wks-client, published by our
pipeline and by GnuPG's `gpg-wks-server --receive`, side by side in one run.

Setup (not timed): a sandbox (private slapd, Dovecot, our milter, Postfix on loopback);
N+1 users user0..userN@example.org added to its slapd with ldapadd as the administrator;
one key per user (ed25519 + cv25519, one gpg run); one submission mail per user from
`gpg-wks-client --fake-submission-addr key-submission@example.org --create FPR ADDR`,
encrypted to the sandbox's submission key. userN's mail warms each side up, untimed.

Ours, in-process (the headline figure): one MailService, built from the sandbox's
milter-wkd.toml with the real slapd as the directory and a FolderMailer (each notice
written to a file, as gpg-wks-server writes its mail with -o), decides each mail as a
Transaction with sasl_login = the user's address (an authenticated submission, auth-submit):
decrypt, clean the key, check the addresses against the directory, publish on the user's
LDAP entry, build and DKIM-sign the notice, write it. One thread, one mail after the other.

Ours, WKS round trip in-process (the same protocol as theirs): the keys are removed again,
the same mails are decided without a login (-> pending request in LDAP, confirmation
request encrypted to the user's key and signed, written to a file), gpg-wks-client
--receive answers each request (not timed) and the responses are decided (-> published,
notice). Phases timed like theirs.

Ours through Postfix (`--no-postfix` skips it): the users' keys are removed
again and the same mails go over SMTP AUTH (Dovecot checks the passwords against slapd) to
the sandbox's submission port, --sessions clients in parallel; the milter (a separate
process) publishes during DATA and reinjects its notice by SMTP into Postfix, which
delivers it to Dovecot. The figure ends when the last 250 has arrived.

Theirs: gpg-wks-server 2.2 with its own GNUPGHOME (the same submission secret key
imported) and its own --directory (example.org/{submission-address,hu,pending}). It has no
auth-submit (a no-op in 2.2), so a published key takes a round trip:
  phase 1 (timed): `gpg-wks-server --receive -o REQ` per submission (decrypt, store pending,
          write an encrypted, signed confirmation request);
  between (not timed): `gpg-wks-client --receive` answers each request in the users' home;
  phase 2 (timed): `gpg-wks-server --receive -o NOTICE` per response (decrypt, publish the
          key into hu/, write an encrypted notice).
It never sends mail: without --send it calls no sendmail; -o writes its mail to files.

The headline ratio compares ours (one authenticated submission -> key published and
notice written) with theirs per published key (phase 1 + phase 2), both one mail at a time
on the same machine, both warm (their gpg-agent runs; our process has loaded its keys);
their phase-1-only rate and round trip against round trip are shown too. Each side is
checked after each figure: N keys in LDAP (right fingerprint), N files in hu/. Not equal
work: we commit each key to slapd (indexed attributes, read back) and parse mail with the
stdlib; gpg-wks-server writes files and spends its time starting gpg processes. The
Transactions are built from the mails before the clock starts (Postfix hands the milter
headers already split).

Target: ours at least 10x gpg-wks-server.

Figures are wall-clock and noisy on a shared machine: run it twice.

How to run (from the repository root, after `make venv`; as root, like the sandbox):

    .venv/bin/python benchmarks/wks.py                # N=200
    .venv/bin/python benchmarks/wks.py --n 50 --no-postfix
    .venv/bin/python benchmarks/wks.py --dkim ed25519   # notices signed as in 2026-11

Our notices are DKIM-signed as the sandbox signs them: RSA-2048 and Ed25519 (dual signing,
what receivers verify today); `--dkim ed25519` signs with Ed25519 only, as the figures of
earlier sessions did. gpg-wks-server signs nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import shutil
import smtplib
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import (
    SUBMISSION,
    WKS_CLIENT,
    KeyRing,
    address,
    clock,
    password,
    rate,
    users_ldif,
)

from milter_wkd.config import Config, load
from milter_wkd.mailer import FolderMailer
from milter_wkd.replies import Discard
from milter_wkd.sandbox import Sandbox
from milter_wkd.service import MailService
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.transaction import Transaction
from milter_wkd.values import Address, Fingerprint

SERVER = shutil.which("gpg-wks-server") or "/usr/bin/gpg-wks-server"
FAKE = ("--fake-submission-addr", SUBMISSION)


def split_mail(raw: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Headers as the milter gets them from Postfix (name, value; folds kept) and the body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    headers: list[tuple[str, str]] = []
    for line in head.decode("utf-8", "surrogateescape").split("\r\n"):
        if line[:1] in (" ", "\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + "\n" + line)
        else:
            name, _, value = line.partition(":")
            headers.append((name, value.lstrip(" ")))
    return headers, body


def transaction(index: int, raw: bytes, *, logged_in: bool = True) -> Transaction:
    headers, body = split_mail(raw)
    return Transaction(client_ip="127.0.0.1",
                       sasl_login=address(index) if logged_in else None,
                       queue_id=f"BENCH{index}", mail_from=address(index),
                       recipients=[SUBMISSION], headers=headers, body=bytearray(body),
                       collect_body=True)


def check_published(cfg: Config, fprs: dict[str, str], indices: range) -> None:
    with LdapStore(cfg.directory) as store:
        for i in indices:
            stored = store.key_for(Address.parse(address(i)))
            if stored is None or stored.fingerprint != Fingerprint.parse(fprs[address(i)]):
                raise SystemExit(f"{address(i)}: key not published ({stored})")


def remove_keys(cfg: Config, indices: range) -> None:
    with LdapStore(cfg.directory) as store:
        for i in indices:
            store.remove_key(store.user(Address.parse(address(i))))


def decide(service: MailService, index: int, mail: bytes | Transaction) -> None:
    tx = mail if isinstance(mail, Transaction) else transaction(index, mail)
    reply = service.decide(tx)
    if not isinstance(reply, Discard):
        raise SystemExit(f"ours: {address(index)}: {reply}")


def ours_in_process(cfg: Config, mails: list[bytes], outbox: Path, profile: str = "",
                    ) -> float:
    n = len(mails) - 1
    with LdapStore(cfg.directory) as store:
        service = MailService(cfg, store, FolderMailer(outbox))
        decide(service, n, mails[n])  # userN warms up
        txs = [transaction(i, mails[i]) for i in range(n)]
        profiler = cProfile.Profile() if profile else None
        started = clock()
        if profiler:
            profiler.enable()
        for i, tx in enumerate(txs):
            decide(service, i, tx)
        elapsed = clock() - started
        if profiler:
            profiler.disable()
            profiler.dump_stats(profile)
    notices = len(list(outbox.glob("*.eml")))
    if notices != n + 1:
        raise SystemExit(f"ours: {notices} notices written, expected {n + 1}")
    return elapsed


def recipient_of(generated: Path) -> int:
    """The user index a FolderMailer file is for (its X-Envelope-To line)."""
    for line in generated.read_bytes().split(b"\r\n", 4)[:4]:
        if line.startswith(b"X-Envelope-To: user"):
            return int(line.split(b"user", 1)[1].split(b"@", 1)[0])
    raise SystemExit(f"no X-Envelope-To in {generated}")


def ours_round_trip(cfg: Config, users: KeyRing, mails: list[bytes], work: Path,
                    ) -> tuple[float, float]:
    """The same protocol as gpg-wks-server: submission without login -> confirmation
    request (FolderMailer file) -> gpg-wks-client --receive (not timed) -> response."""
    n = len(mails) - 1
    requests, notices = work / "requests", work / "notices"
    with LdapStore(cfg.directory) as store:
        service = MailService(cfg, store, FolderMailer(requests))
        decide(service, n, transaction(n, mails[n], logged_in=False))
        txs = [transaction(i, mails[i], logged_in=False) for i in range(n)]
        started = clock()
        for i, tx in enumerate(txs):
            decide(service, i, tx)
        phase1 = clock() - started
        responses: dict[int, bytes] = {}
        for request in requests.glob("*.eml"):
            responses[recipient_of(request)] = users.run(
                *FAKE, "--receive", input=request.read_bytes(), binary=WKS_CLIENT)
        if sorted(responses) != list(range(n + 1)):
            raise SystemExit(f"ours: {len(responses)} confirmation requests, expected {n + 1}")
        service.mailer = FolderMailer(notices)
        decide(service, n, transaction(n, responses[n], logged_in=False))
        txs = [transaction(i, responses[i], logged_in=False) for i in range(n)]
        started = clock()
        for i, tx in enumerate(txs):
            decide(service, i, tx)
        phase2 = clock() - started
    return phase1, phase2


def ours_through_postfix(sb: Sandbox, mails: list[bytes], sessions: int) -> float:
    endpoint = sb.postfix.submission
    n = len(mails) - 1

    def send(index: int) -> None:
        with smtplib.SMTP(endpoint.host, endpoint.port, timeout=120) as smtp:
            smtp.ehlo("bench.example.org")
            smtp.login(address(index), password(index))
            smtp.sendmail(address(index), [SUBMISSION], mails[index])

    send(n)
    started = clock()
    with ThreadPoolExecutor(max_workers=sessions) as pool:
        list(pool.map(send, range(n)))
    return clock() - started


class GpgWksServer:
    """gpg-wks-server with its own GNUPGHOME and --directory below `workdir`."""

    def __init__(self, workdir: Path, submission_secret_key: Path) -> None:
        self.ring = KeyRing(workdir / "gnupg")
        self.ring.run("--import", str(submission_secret_key))
        self.top = workdir / "wks"
        domain = self.top / "example.org"
        domain.mkdir(parents=True)
        (domain / "submission-address").write_text(SUBMISSION + "\n", encoding="ascii")
        self.top.chmod(0o2750)  # it refuses a top directory that others may read
        self.hu = domain / "hu"
        self.ring.run("-C", str(self.top), "--list-domains", binary=SERVER)  # makes hu, pending

    def receive(self, mail: bytes, output: Path) -> None:
        self.ring.run("-C", str(self.top), "--receive", "-o", str(output), input=mail,
                      binary=SERVER)

    def close(self) -> None:
        self.ring.close()


def theirs(server: GpgWksServer, users: KeyRing, mails: list[bytes], work: Path,
           ) -> tuple[float, float]:
    n = len(mails) - 1
    requests = [work / f"request{i}.eml" for i in range(n + 1)]
    notices = [work / f"notice{i}.eml" for i in range(n + 1)]
    server.receive(mails[n], requests[n])  # warm-up: its gpg-agent starts here
    started = clock()
    for i in range(n):
        server.receive(mails[i], requests[i])
    phase1 = clock() - started
    responses = [users.run(*FAKE, "--receive", input=r.read_bytes(), binary=WKS_CLIENT)
                 for r in requests]
    server.receive(responses[n], notices[n])
    started = clock()
    for i in range(n):
        server.receive(responses[i], notices[i])
    phase2 = clock() - started
    published = len(list(server.hu.iterdir()))
    if published != n + 1:
        raise SystemExit(f"gpg-wks-server published {published} keys, expected {n + 1}")
    return phase1, phase2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="submissions (default 200)")
    parser.add_argument("--sessions", type=int, default=4,
                        help="parallel SMTP clients for the Postfix figure (default 4)")
    parser.add_argument("--dkim", choices=("dual", "ed25519"), default="dual",
                        help="how our notices are DKIM-signed in-process: RSA-2048 and "
                             "Ed25519 as the sandbox does (default), or Ed25519 only")
    parser.add_argument("--no-postfix", action="store_true",
                        help="skip the figure through Postfix and the milter")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of our in-process auth-submit; the median counts (default 5)")
    parser.add_argument("--profile", metavar="FILE", default="",
                        help="write a cProfile of our in-process auth-submit loop to FILE")
    args = parser.parse_args()
    n = args.n
    work = Path(tempfile.mkdtemp(prefix="milter-wkd-bench-wks-"))
    work.chmod(0o711)
    users = KeyRing(work / "users")
    server: GpgWksServer | None = None
    try:
        with Sandbox(work / "sandbox", keep=False) as sb:
            started = clock()
            sb.slapd.ldapmodify(users_ldif(range(n + 1)), add=True)
            fprs = users.generate([address(i) for i in range(n + 1)])
            users.run("--import", str(sb.submission_public_key))
            mails = [users.run(*FAKE, "--create", fprs[address(i)], address(i),
                               binary=WKS_CLIENT) for i in range(n + 1)]
            server = GpgWksServer(work / "theirs", sb.submission_key)
            cfg = load(sb.config_path, environ={})
            if args.dkim == "ed25519":
                cfg = dataclasses.replace(cfg, domains=[
                    dataclasses.replace(d, dkim_rsa_key="") for d in cfg.domains])
            print(f"setup: {n + 1} users, keys and submission mails in "
                  f"{clock() - started:.1f} s (not timed)")
            print(f"our notices DKIM-signed: {args.dkim}")
            print(f"N = {n} submissions (gpg-wks-client {len(mails[0])}-octet mails), "
                  "one at a time unless said otherwise")

            # Each round is ~1 s of wall clock, where one slow fsync of slapd's shows: the
            # median of several rounds is the figure, the spread is printed with it.
            rounds: list[tuple[float, float]] = []
            for r in range(args.rounds):
                cpu = time.process_time()
                seconds = ours_in_process(cfg, mails, work / f"outbox{r}",
                                          args.profile if r == 0 else "")
                rounds.append((seconds, time.process_time() - cpu))
                check_published(cfg, fprs, range(n + 1))
                remove_keys(cfg, range(n + 1))
            ours = statistics.median(s for s, _ in rounds)
            cpu_ms = 1000 * statistics.median(c for _, c in rounds) / (n + 1)
            print(f"ours, auth-submit in-process, {args.rounds} rounds: "
                  + ", ".join(f"{n / s:.0f}/s" for s, _ in rounds)
                  + f"; our process's CPU {cpu_ms:.2f} ms per submission (median; "
                  "slapd's not included)")
            ours1, ours2 = ours_round_trip(cfg, users, mails, work / "round-trip")
            check_published(cfg, fprs, range(n + 1))
            phase1, phase2 = theirs(server, users, mails, work / "theirs")
            total = phase1 + phase2
            rows = [
                ("ours, auth-submit in-process (decide -> LDAP, DKIM notice file), median", ours),
                ("ours, WKS round trip in-process, phase 1 (-> pending + request)", ours1),
                ("ours, WKS round trip in-process, phase 2 (-> published + notice)", ours2),
                ("ours, WKS round trip in-process, total per published key", ours1 + ours2),
            ]
            if not args.no_postfix:
                remove_keys(cfg, range(n + 1))
                through = ours_through_postfix(sb, mails, args.sessions)
                check_published(cfg, fprs, range(n + 1))
                rows.append((f"ours, auth-submit by SMTP AUTH via Postfix + milter "
                             f"({args.sessions} clients)", through))
            rows += [
                ("gpg-wks-server phase 1 (--receive submission -> pending + request)", phase1),
                ("gpg-wks-server phase 2 (--receive response -> hu/ + notice)", phase2),
                ("gpg-wks-server total per published key (phase 1 + phase 2)", total),
            ]
            for label, seconds in rows:
                print(f"{label:70s} {rate(n, seconds)}")
            print(f"ratio ours auth-submit in-process / gpg-wks-server total:   "
                  f"{total / ours:5.1f}x")
            print(f"ratio ours auth-submit in-process / gpg-wks-server phase 1: "
                  f"{phase1 / ours:5.1f}x")
            print(f"ratio ours round trip / gpg-wks-server round trip:          "
                  f"{total / (ours1 + ours2):5.1f}x")
            if not args.no_postfix:
                print(f"ratio ours auth-submit via Postfix / gpg-wks-server total: "
                      f"{total / through:5.1f}x")
            verdict = "met" if total / ours >= 10 else "NOT met"
            print(f"target: ours in-process >= 10x gpg-wks-server (total): {verdict}")
    finally:
        if server is not None:
            server.close()
        users.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
