"""Faults under load against the real sandbox: is any mail or key lost? (not a test; #16)

A private sandbox (slapd, Dovecot, our milter, Postfix, the WKD responder on loopback)
carries a steady mixed load for --duration seconds:

  mail         logged-in users (user0..userK, added to slapd as benchmarks/wks.py does)
               send to each other through the submission port (the milter's Autocrypt
               and DKIM path), delivered by LMTP to Dovecot; a unique token in every
               Subject and Message-ID
  submissions  authenticated WKS submissions (auth-submit): one gpg-wks-client mail per
               user, prepared before the clock, spread over the run
  wkd          look-ups of every user's key from the responder (sandbox.wkd.get)

The SMTP client behaves like an MTA's queue: a 4xx answer, a dropped connection or a
timeout is counted and retried (after 1 s, not minutes); a 5xx is final (refused, its
reason kept). While the load runs, one fault at a time on a fixed schedule, each kind at
least twice (--rounds):

  milter-kill    the milter SIGKILLed, started again 2 s later (systemd's RestartSec=2s)
  slapd-kill     slapd SIGKILLed, started again 2 s later
  slapd-pause    slapd SIGSTOPped for the milter's [directory] timeout + 1.5 s, SIGCONT
  postfix-reload `postfix -c <sandbox config dir> reload`
  wkd-kill       the responder's process group SIGKILLed, started again 2 s later
  slapd-full     slapd's database full for 4 s: olcDbMaxSize set to 64 KiB online (LMDB
                 keeps the pages in use; the next write needing a page fails, LDAP 80),
                 then back to 1 GiB
  reinject-defer the reinjection smtpd (where the milter sends its notices) answers 450
                 for 4 s (`postconf -P ...smtpd_client_restrictions=defer`, reload), then
                 its own restrictions again

With slapd paused, a login waits for slapd (Dovecot asks it), so mail from fresh sessions
never reaches the milter then: two submissions and two mails are sent on sessions that
logged in just before each pause. --kinds picks kinds; those left out are listed as not
exercised.

Afterwards: faults stop, pending retries finish (or a deadline passes), `postqueue -f`,
then until the queue is empty (or a deadline). Every message is accounted for: delivered
(its token in the recipient's INBOX over IMAP), still queued (its token in a queued
message, by postcat), refused (a 5xx), or lost. Every submission: published (the user's
key in LDAP has the submitted fingerprint; the "Your key has been published" notices in
the INBOX are counted, exactly one is expected) or refused. Every 200 from the responder
is compared with the key the directory holds for that address at the end (each address
only ever has that one key). Printed: a table per fault kind (faults injected, SMTP 4xx,
SMTP 5xx, dropped SMTP connections, WKD 5xx/unreachable inside that kind's windows, the
longest SMTP AUTH begun in them; a window is the fault plus 3 s, cut where the next fault
begins), then exactly one line

  sent N, delivered N, queued N, published N, refused N, lost N

where sent counts mails and submissions, delivered mails found in Dovecot, published
submissions whose key is in LDAP, and lost = sent - delivered - published - queued -
refused. Exits 1 if lost > 0, a wrong or partial WKD answer was seen, or a notice or mail
was duplicated.

Run (as root, like the sandbox):  .venv/bin/python benchmarks/chaos.py [--duration 60]
"""

from __future__ import annotations

import argparse
import contextlib
import email
import email.policy
import email.utils
import hashlib
import heapq
import imaplib
import itertools
import json
import os
import random
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _common import SUBMISSION, WKS_CLIENT, KeyRing, address, password, users_ldif

from milter_wkd.config import load
from milter_wkd.sandbox import Sandbox
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.values import Address, Fingerprint
from milter_wkd.wkd import local_part_hash

FAKE = ("--fake-submission-addr", SUBMISSION)
KINDS = ("milter-kill", "slapd-kill", "slapd-pause", "postfix-reload", "wkd-kill",
         "slapd-full", "reinject-defer")
HOLD = 4.0  # seconds slapd stays full, the reinjection service deferring
RESTART_AFTER = 2.0  # systemd/milter-wkd.service: RestartSec=2s
WINDOW_GRACE = 3.0  # answers this long after a fault's end still count for it
RETRY_AFTER = 1.0
NOTICE_SUBJECT = "Your key has been published"
DB_MAXSIZE = 1073741824  # the sandbox's olcDbMaxSize
PROBES = 2  # per slapd pause: submissions and mails sent on sessions logged in before it


@dataclass(order=True)
class Job:
    not_before: float
    seq: int
    kind: str = field(compare=False)  # "mail" | "submit"
    sender: int = field(compare=False)
    recipient: int = field(compare=False)
    token: str = field(compare=False)
    raw: bytes = field(compare=False)
    attempts: int = field(default=0, compare=False)


@dataclass
class Outcome:
    accepted: set[str] = field(default_factory=set)  # tokens answered 250
    refused: dict[str, str] = field(default_factory=dict)  # token -> 5xx reason
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (t, what, detail)
    # SMTP AUTH: (t, seconds, user, no earlier login of the user succeeded)
    logins: list[tuple[float, float, int, bool]] = field(default_factory=list)
    logged_in: set[int] = field(default_factory=set)  # users whose AUTH succeeded
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, what: str, detail: str = "") -> None:
        with self.lock:
            self.events.append((time.monotonic(), what, detail))


class Load:
    """MTA-like SMTP senders over a retry heap, and one WKD reader."""

    def __init__(self, sb: Sandbox, senders: int) -> None:
        self.sb = sb
        self.heap: list[Job] = []
        self.cond = threading.Condition()
        self.pending = 0  # jobs queued or being sent
        self.closing = False
        self.out = Outcome()
        self.threads = [threading.Thread(target=self.sender, daemon=True)
                        for _ in range(senders)]
        self.wkd_stop = threading.Event()
        self.wkd_answers: list[tuple[str, int, str, int]] = []  # (addr, status, sha, len)

    def submit(self, job: Job) -> None:
        with self.cond:
            heapq.heappush(self.heap, job)
            self.pending += 1
            self.cond.notify()

    def take(self) -> Job | None:
        with self.cond:
            while True:
                if self.closing and not self.heap:
                    return None
                if self.heap and self.heap[0].not_before <= time.monotonic():
                    return heapq.heappop(self.heap)
                wait = self.heap[0].not_before - time.monotonic() if self.heap else 0.5
                self.cond.wait(max(0.01, min(wait, 0.5)))

    def done(self, job: Job | None = None, retry: bool = False) -> None:
        with self.cond:
            if retry and job is not None:
                job.not_before = time.monotonic() + RETRY_AFTER
                heapq.heappush(self.heap, job)
            else:
                self.pending -= 1
            self.cond.notify_all()

    def sender(self) -> None:
        while (job := self.take()) is not None:
            self.attempt(job)

    def login(self, job: Job) -> smtplib.SMTP:
        endpoint = self.sb.postfix.submission
        smtp = smtplib.SMTP(endpoint.host, endpoint.port, timeout=30)
        smtp.ehlo("chaos.example")
        began = time.monotonic()
        ok = False
        try:
            # One mechanism, as mail clients use: smtplib's login() tries the next one after
            # a failure, so a temporary failure (454, Dovecot could not ask slapd) came back
            # as the LOGIN mechanism's 535 and counted as a refusal.
            smtp.user, smtp.password = address(job.sender), password(job.sender)
            smtp.auth("PLAIN", smtp.auth_plain)
            ok = True
        finally:
            # How long SMTP AUTH took (Dovecot asks slapd, or its cache), answered or not.
            with self.out.lock:
                self.out.logins.append((began, time.monotonic() - began, job.sender,
                                        job.sender not in self.out.logged_in))
                if ok:
                    self.out.logged_in.add(job.sender)
        return smtp

    def attempt(self, job: Job, session: smtplib.SMTP | None = None) -> None:
        """One delivery attempt (on a session already logged in, if given); the outcome
        counted: 250 done, 5xx refused, anything else retried after RETRY_AFTER."""
        job.attempts += 1
        to = [SUBMISSION] if job.kind == "submit" else [address(job.recipient)]
        code, text = 250, ""
        try:
            with session or self.login(job) as smtp:
                smtp.sendmail(address(job.sender), to, job.raw)
        except smtplib.SMTPRecipientsRefused as exc:
            code, reply = next(iter(exc.recipients.values()))
            text = reply.decode("utf-8", "replace")
        except smtplib.SMTPResponseException as exc:
            code, text = exc.smtp_code, exc.smtp_error.decode("utf-8", "replace")
        except (smtplib.SMTPException, OSError) as exc:
            code, text = 0, f"{type(exc).__name__}: {exc}"
        if code == 250:
            with self.out.lock:
                self.out.accepted.add(job.token)
            self.done()
        elif 500 <= code < 600:
            self.out.note("5xx", f"{job.kind} {code} {text[:90]}")
            with self.out.lock:
                self.out.refused[job.token] = f"{code} {text[:120]}"
            self.done()
        else:
            self.out.note("4xx" if code else "conn", f"{job.kind} {code} {text[:90]}")
            self.done(job, retry=True)

    def probe_paused(self, jobs: list[Job], pause: threading.Event) -> list[threading.Thread]:
        """Log in a session per job now, send each once `pause` is set: mail that reaches
        the milter while slapd is stopped (a login waits for slapd, through Dovecot, so
        fresh sessions never get that far). Jobs count as pending from here on."""
        threads = []
        for job in jobs:
            with self.cond:
                self.pending += 1
            try:
                session = self.login(job)
            except (smtplib.SMTPException, OSError) as exc:
                self.out.note("conn", f"{job.kind} probe login: {exc}")
                self.done(job, retry=True)
                continue

            def send(job: Job = job, session: smtplib.SMTP = session) -> None:
                pause.wait()
                self.attempt(job, session)

            threads.append(threading.Thread(target=send, daemon=True))
            threads[-1].start()
        return threads

    def wkd_reader(self, addresses: list[str]) -> None:
        i = 0
        while not self.wkd_stop.is_set():
            addr = addresses[i % len(addresses)]
            i += 1
            local = addr.split("@", 1)[0]
            path = f"/.well-known/openpgpkey/example.org/hu/{local_part_hash(local)}?l={local}"
            try:
                status, _, body = self.sb.wkd.get(path)
            except OSError as exc:
                self.out.note("wkd-down", f"{type(exc).__name__}")
                time.sleep(0.1)
                continue
            except Exception as exc:  # noqa: BLE001 (http.client's errors: the server died)
                self.out.note("wkd-down", f"{type(exc).__name__}")
                time.sleep(0.1)
                continue
            if status >= 500:
                self.out.note("wkd-5xx", f"{status}")
            self.wkd_answers.append((addr, status, hashlib.sha256(body).hexdigest(),
                                     len(body)))
            time.sleep(0.02)

    def wait_idle(self, deadline: float) -> bool:
        with self.cond:
            while self.pending > 0:
                if time.monotonic() > deadline:
                    return False
                self.cond.wait(0.5)
        return True


# -- faults ---------------------------------------------------------------------------


def fault(sb: Sandbox, kind: str, ldap_timeout: float,
          probes: Callable[[threading.Event], list[threading.Thread]]) -> str:
    """Inject one fault and recover from it; a short note on what happened."""
    if kind == "milter-kill":
        assert sb.milter is not None
        pid = sb.milter.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)  # our child (the sandbox's Popen): reap it
        time.sleep(RESTART_AFTER)
        sb.milter.start()
        return f"pid {pid} -> {sb.milter.pid}"
    if kind == "slapd-kill":
        pid = sb.slapd.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        time.sleep(RESTART_AFTER)
        sb.slapd.start()  # slapd's Popen sees it dead (poll) and starts a new one
        return f"pid {pid} -> {sb.slapd.pid}"
    if kind == "slapd-pause":
        pid = sb.slapd.pid
        assert pid is not None
        pause = threading.Event()
        began = time.monotonic()
        sending = probes(pause)  # logged in while slapd still answers
        logins = time.monotonic() - began
        os.kill(pid, signal.SIGSTOP)
        try:
            pause.set()
            time.sleep(ldap_timeout + 1.5)
        finally:
            os.kill(pid, signal.SIGCONT)
        return (f"pid {pid} stopped {ldap_timeout + 1.5:.1f} s, {len(sending)} sessions "
                f"logged in before it ({logins:.1f} s) sent into it")
    if kind == "postfix-reload":
        result = sb.postfix.postfix("reload")
        return f"rc {result.returncode}"
    if kind == "wkd-kill":
        pid = sb.wkd.pid
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)  # its own session: granian's workers with it
        time.sleep(RESTART_AFTER)
        assert sb.wkd.pid is None  # polled: reaped
        sb.wkd.start()
        return f"pid {pid} -> {sb.wkd.pid}"
    if kind == "slapd-full":
        # back-mdb applies a smaller olcDbMaxSize online; LMDB raises it to the pages in
        # use, so the next write that needs a page fails (LDAP 80, MDB_MAP_FULL).
        slapd = sb.slapd
        slapd.ldapmodify(f"dn: {slapd.database_dn}\nchangetype: modify\nreplace: "
                         f"olcDbMaxSize\nolcDbMaxSize: 65536\n")
        try:
            time.sleep(HOLD)
        finally:
            slapd.ldapmodify(f"dn: {slapd.database_dn}\nchangetype: modify\nreplace: "
                             f"olcDbMaxSize\nolcDbMaxSize: {DB_MAXSIZE}\n")
        return f"olcDbMaxSize 64 KiB for {HOLD:.0f} s, then {DB_MAXSIZE}"
    if kind == "reinject-defer":
        # The milter's notices go to the reinjection smtpd; make it answer 450, reload.
        service = f"{sb.postfix.reinject.host}:{sb.postfix.reinject.port}/inet/"
        param = service + "smtpd_client_restrictions"
        original = postconf(sb, "-P", param).split(" = ", 1)[1].strip()
        postconf(sb, "-P", f"{param}=defer")
        sb.postfix.postfix("reload")
        try:
            time.sleep(HOLD)
        finally:
            postconf(sb, "-P", f"{param}={original}")
            sb.postfix.postfix("reload")
        return f"reinjection smtpd_client_restrictions=defer for {HOLD:.0f} s"
    raise ValueError(kind)


# -- accounting -----------------------------------------------------------------------


def postconf(sb: Sandbox, *args: str) -> str:
    return subprocess.run(["postconf", "-c", str(sb.postfix.config_dir), *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60, check=True).stdout


def postqueue(sb: Sandbox, *args: str) -> str:
    return subprocess.run(["postqueue", "-c", str(sb.postfix.config_dir), *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60, check=False).stdout


def queued_ids(sb: Sandbox) -> list[str]:
    ids = []
    for line in postqueue(sb, "-j").splitlines():
        with contextlib.suppress(ValueError):
            ids.append(json.loads(line)["queue_id"])
    return ids


def queued_tokens(sb: Sandbox, tokens: set[str]) -> set[str]:
    found: set[str] = set()
    for queue_id in queued_ids(sb):
        text = subprocess.run(["postcat", "-c", str(sb.postfix.config_dir), "-h", "-q",
                               queue_id], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=60, check=False).stdout
        found |= {t for t in tokens if t in text}
    return found


def mailbox(sb: Sandbox, index: int) -> list[tuple[str, str, bytes]]:
    """(Subject, Message-ID, headers) of every message in userI's INBOX."""
    imap = imaplib.IMAP4(sb.dovecot.imap.host, sb.dovecot.imap.port, timeout=30)
    try:
        imap.login(address(index), password(index))
        _, count = imap.select("INBOX", readonly=True)
        data = imap.fetch("1:*", "(BODY.PEEK[HEADER])")[1] if int(count[0] or 0) else []
        found = []
        for part in data:
            if isinstance(part, tuple):
                msg = email.message_from_bytes(part[1], policy=email.policy.compat32)
                found.append((str(msg.get("Subject", "")), str(msg.get("Message-ID", "")),
                              part[1]))
        return found
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            imap.logout()


def window_of(t: float, windows: list[tuple[str, float, float]]) -> str:
    for kind, start, end in windows:
        if start <= t <= end:
            return kind
    return "no fault"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--rate", type=float, default=4.0,
                        help="ordinary mails per second (default 4)")
    parser.add_argument("--users", type=int, default=40,
                        help="users, each with one WKS submission (default 40)")
    parser.add_argument("--senders", type=int, default=3, help="SMTP clients (default 3)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="times each fault kind is injected (default 2)")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                        help="fault kinds to inject (default: all)")
    args = parser.parse_args()
    if args.users <= PROBES * args.rounds:
        parser.error(f"--users must exceed {PROBES * args.rounds} (the slapd-pause probes)")
    rng = random.Random(args.seed)  # noqa: S311 (reproducible, not secret)
    run = f"{os.getpid():x}{int(time.time()) & 0xffff:x}"
    work = Path(tempfile.mkdtemp(prefix="milter-wkd-chaos-"))
    work.chmod(0o711)
    ring = KeyRing(work / "users")
    failed = False
    n = args.users
    try:
        with Sandbox(work / "sandbox", keep=False) as sb:
            started = time.monotonic()
            sb.slapd.ldapmodify(users_ldif(range(n)), add=True)
            fprs = ring.generate([address(i) for i in range(n)])
            ring.run("--import", str(sb.submission_public_key))
            submissions = {i: ring.run(*FAKE, "--create", fprs[address(i)], address(i),
                                       binary=WKS_CLIENT) for i in range(n)}
            cfg = load(sb.config_path, environ={})
            ldap_timeout = cfg.directory.timeout
            print(f"setup: sandbox, {n} users, keys and gpg-wks-client submissions in "
                  f"{time.monotonic() - started:.1f} s (not timed); run {run}", flush=True)

            load_ = Load(sb, args.senders)
            for thread in load_.threads:
                thread.start()
            wkd_thread = threading.Thread(target=load_.wkd_reader,
                                          args=([address(i) for i in range(n)],), daemon=True)
            wkd_thread.start()
            mail_tokens: dict[str, int] = {}  # token -> recipient
            submit_tokens: dict[str, int] = {}  # token -> user
            seqs = itertools.count(1)
            # Users whose submission goes through a session logged in before a slapd pause.
            pauses = args.rounds * ("slapd-pause" in args.kinds)
            probe_users = list(range(n - PROBES * pauses, n))
            steady_users = list(range(n - PROBES * pauses))

            def mail_job(sender: int, recipient: int) -> Job:
                seq = next(seqs)
                token = f"m{seq}.{run}"
                mail_tokens[token] = recipient
                raw = (f"From: {address(sender)}\r\nTo: {address(recipient)}\r\n"
                       f"Subject: chaos {token}\r\nMessage-ID: <{token}@chaos.example>"
                       f"\r\nDate: {email.utils.formatdate()}\r\n\r\n"
                       f"hello from user{sender}, {token}\r\n").encode()
                return Job(time.monotonic(), seq, "mail", sender, recipient, token, raw)

            def submit_job(user: int) -> Job:
                token = f"s{user}.{run}"
                submit_tokens[token] = user
                return Job(time.monotonic(), next(seqs), "submit", user, user, token,
                           submissions[user])

            def produce(until: float) -> None:
                begin = time.monotonic()
                due_submit = [(begin + (k + 0.5) * (until - begin) * 0.8 / len(steady_users),
                               user) for k, user in enumerate(steady_users)]
                next_mail = begin
                while (now := time.monotonic()) < until:
                    while due_submit and due_submit[0][0] <= now:
                        load_.submit(submit_job(due_submit.pop(0)[1]))
                    if next_mail <= now:
                        load_.submit(mail_job(rng.randrange(n), rng.randrange(n)))
                        next_mail += 1 / args.rate
                    time.sleep(0.01)

            def probes(pause: threading.Event) -> list[threading.Thread]:
                jobs = [submit_job(probe_users.pop()) for _ in range(PROBES)]
                jobs += [mail_job(rng.randrange(n), rng.randrange(n)) for _ in range(PROBES)]
                return load_.probe_paused(jobs, pause)

            schedule = [kind for _ in range(args.rounds) for kind in args.kinds]
            clock0 = time.monotonic()
            end_of_load = clock0 + args.duration
            producer = threading.Thread(target=produce, args=(end_of_load,), daemon=True)
            producer.start()
            windows: list[tuple[str, float, float]] = []
            notes: list[str] = []
            gap = args.duration / (len(schedule) + 1)
            for k, kind in enumerate(schedule):
                at = clock0 + (k + 1) * gap - 1.0
                time.sleep(max(0.0, at - time.monotonic()))
                began = time.monotonic()
                note = fault(sb, kind, ldap_timeout, probes)
                ended = time.monotonic()
                windows.append((kind, began, ended + WINDOW_GRACE))
                notes.append(f"  {began - clock0:6.1f} s  {kind:15} {ended - began:4.1f} s  "
                             f"{note}")
                print(notes[-1], flush=True)
            # Windows must not overlap: a grace ends where the next fault begins.
            windows = [(kind, start, min(end, windows[i + 1][1] if i + 1 < len(windows)
                                         else end)) for i, (kind, start, end) in
                       enumerate(windows)]
            producer.join()
            load_seconds = time.monotonic() - clock0
            print(f"faults done; load ran {load_seconds:.1f} s; finishing retries",
                  flush=True)
            with load_.cond:
                load_.closing = True
                load_.cond.notify_all()
            drained = load_.wait_idle(time.monotonic() + 120)
            load_.wkd_stop.set()
            wkd_thread.join()
            unsent = {j.token for j in load_.heap}
            postqueue(sb, "-f")
            deadline = time.monotonic() + 60
            while queued_ids(sb) and time.monotonic() < deadline:
                time.sleep(0.5)

            # -- account for everything --------------------------------------------
            out = load_.out
            all_tokens = set(mail_tokens) | set(submit_tokens)
            still_queued = queued_tokens(sb, all_tokens)
            delivered: Counter[str] = Counter()
            notices: Counter[int] = Counter()
            bounced: set[str] = set()
            for i in range(n):
                for subject, message_id, headers in mailbox(sb, i):
                    token = message_id.strip("<>").split("@", 1)[0]
                    if token in mail_tokens:
                        delivered[token] += 1
                    elif subject == NOTICE_SUBJECT:
                        notices[i] += 1
                    elif subject.startswith("Undelivered"):
                        bounced |= {t for t in mail_tokens if t.encode() in headers}
            published: set[str] = set()
            wrong_key: list[str] = []
            final_keys: dict[str, bytes] = {}
            with LdapStore(cfg.directory) as store:
                for token, user in submit_tokens.items():
                    stored = store.key_for(Address.parse(address(user)))
                    if stored is None:
                        continue
                    final_keys[address(user)] = stored.key
                    if stored.fingerprint == Fingerprint.parse(fprs[address(user)]):
                        published.add(token)
                    else:
                        wrong_key.append(f"{address(user)}: {stored.fingerprint}")
            # The responder's answer now, after everything settled, must be the stored key.
            time.sleep(2)
            served_now: dict[str, str] = {}
            for addr in final_keys:
                local = addr.split("@", 1)[0]
                status, _, body = sb.wkd.get(f"/.well-known/openpgpkey/example.org/hu/"
                                             f"{local_part_hash(local)}?l={local}")
                served_now[addr] = hashlib.sha256(body).hexdigest() if status == 200 else ""
            expected = {addr: hashlib.sha256(key).hexdigest() for addr, key in final_keys.items()}
            settled_mismatch = [a for a in expected if served_now[a] != expected[a]]
            wrong_wkd = [(a, length) for a, status, sha, length in load_.wkd_answers
                         if status == 200 and sha != expected.get(a)]
            wkd_status = Counter(status for _, status, _, _ in load_.wkd_answers)

            # -- figures ------------------------------------------------------------
            print("faults (time since start, kind, seconds until recovered, detail):")
            print("\n".join(notes))
            rows: dict[str, Counter[str]] = defaultdict(Counter)
            for kind, _, _ in windows:
                rows[kind]["faults"] += 1
            reasons: Counter[str] = Counter()
            for t, what, detail in out.events:
                window = window_of(t, windows)
                rows[window][what] += 1
                reasons[f"{window:14} {what:8} {detail[:90]}"] += 1
            slowest: dict[str, float] = defaultdict(float)  # longest SMTP AUTH per window
            for t, seconds, _user, _first in out.logins:
                window = window_of(t, windows)
                slowest[window] = max(slowest[window], seconds)
            print(f"\n{'fault kind':16} {'faults':>6} {'SMTP 4xx':>8} {'SMTP 5xx':>8} "
                  f"{'dropped':>7} {'WKD 5xx':>7} {'WKD down':>8} {'AUTH max':>8}")
            for kind in (*KINDS, "no fault"):
                row = rows[kind]
                print(f"{kind:16} {row['faults']:6} {row['4xx']:8} {row['5xx']:8} "
                      f"{row['conn']:7} {row['wkd-5xx']:7} {row['wkd-down']:8} "
                      f"{slowest[kind]:7.2f}s")
            rounds: dict[str, list[str]] = defaultdict(list)  # kind -> AUTH max per fault
            for kind, start, end in windows:
                inside = [seconds for t, seconds, _, _ in out.logins if start <= t <= end]
                rounds[kind].append(f"{max(inside, default=0.0):.2f}")
            print("longest SMTP AUTH begun in each fault's window, in order: " + "; ".join(
                f"{kind} {' / '.join(values)} s" for kind, values in rounds.items()))
            ordered = sorted(seconds for _, seconds, _, _ in out.logins)
            if ordered:
                print(f"SMTP AUTH: {len(ordered)} logins, median "
                      f"{ordered[len(ordered) // 2] * 1000:.0f} ms, max {ordered[-1]:.2f} s; "
                      "the slowest (time since start, window, user, seconds):")
                for t, seconds, user, first in sorted(out.logins, key=lambda x: -x[1])[:5]:
                    print(f"  {t - clock0:6.1f} s  {window_of(t, windows):14} user{user}"
                          f"{' (not logged in before)' if first else ''}  {seconds:.2f} s")
            print("answers other than 250 and 200 (count, fault window, kind, first words):")
            for reason, count in reasons.most_common(20):
                print(f"  {count:5}  {reason}")
            print(f"WKD: {len(load_.wkd_answers)} answers {dict(sorted(wkd_status.items()))}, "
                  f"{len(wrong_wkd)} 200s differing from the directory's key at the end, "
                  f"{len(settled_mismatch)} addresses served differently after settling")
            dup_mail = sum(1 for c in delivered.values() if c > 1)
            dup_notice = {i: c for i, c in notices.items() if c > 1}
            no_notice = [i for t, i in submit_tokens.items() if t in published and not notices[i]]
            print(f"mail: {len(mail_tokens)} sent, {len(delivered)} delivered "
                  f"({dup_mail} more than once), {len(bounced)} bounced; "
                  f"retries left unsent {len(unsent)} (drained: {drained})")
            print(f"submissions: {len(submit_tokens)} sent, {len(published)} published, "
                  f"{len(wrong_key)} with another key, notices {sum(notices.values())} "
                  f"(duplicated for {len(dup_notice)} users, missing for {len(no_notice)})")
            if no_notice and sb.milter is not None:
                # What the milter and Postfix said about them: a notice lost is a finding.
                milter_log = sb.milter.log.read_text(errors="replace").splitlines()
                mail_log = Path(sb.postfix.maillog).read_text(errors="replace").splitlines()
                for i in no_notice[:3]:
                    print(f"  no notice for {address(i)}:")
                    for line in [*milter_log, *mail_log]:
                        if address(i) in line and ("key-submission" in line
                                                   or "milter_wkd" in line):
                            print(f"    {line[:200]}")
            refused_mail = {t for t in out.refused if t in mail_tokens and t not in delivered}
            refused_submit = {t for t in out.refused if t in submit_tokens and t not in published}
            for token in sorted(refused_mail | refused_submit):
                print(f"  refused {token}: {out.refused[token]}")
            sent = len(all_tokens)
            queued = len(still_queued - set(delivered) - published)
            refused = len(refused_mail) + len(refused_submit)
            lost = sent - len(delivered) - len(published) - queued - refused
            lost_tokens = (all_tokens - set(delivered) - published - still_queued
                           - refused_mail - refused_submit)
            for token in sorted(lost_tokens)[:20]:
                state = ("accepted (250)" if token in out.accepted else
                         "never accepted" if token in unsent else "?")
                print(f"  LOST {token}: {state}")
            missing = [kind for kind in KINDS if kind not in args.kinds]
            if missing:
                print(f"not exercised: {', '.join(missing)}")
            print(f"sent {sent}, delivered {len(delivered)}, queued {queued}, "
                  f"published {len(published)}, refused {refused}, lost {lost}")
            failed = (lost > 0 or bool(wrong_wkd) or bool(settled_mismatch) or bool(wrong_key)
                      or dup_mail > 0 or bool(dup_notice))
    finally:
        ring.close()
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
