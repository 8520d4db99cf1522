"""Resource bounds of the milter and the WKD responder (not a test; #16).

A private sandbox (slapd, Dovecot, our milter, Postfix, the WKD responder on loopback):

  1 sessions   N concurrent SMTP sessions (--sessions, default 100 then 200) on the
               submission port, each logged in as its own user (user0..userN-1) and from
               its own source address (127.0.1.K: Postfix's per-client limit,
               smtpd_client_connection_count_limit = 50, is not what is measured), each
               sending an ordinary mail to another user and then a moderate (64 KiB) mail
               to the submission address that is no WKS submission, both on the same
               session, the DATA of each written in four pieces 0.5 s apart (the session
               is held open across DATA). Postfix's default_process_limit is 100: at 200
               the rest wait at Postfix's door for a free smtpd; the time to the 220 banner
               is their connect latency. Measured on the milter's process: peak RSS
               (VmHWM, reset by writing 5 to /proc/PID/clear_refs before), open fds and
               threads (sampled every 50 ms) before, at peak and 5 s after.
  2 stop       the milter SIGSTOPped longer than Postfix's milter timeouts while mails are
               in flight; their SMTP answers (milter_default_action = tempfail: 4xx), then
               SIGCONT, the 4xx mails retried (as an MTA's queue would), fresh mails sent,
               and every mail's delivery by LMTP found in Postfix's log (lost = not).
               Postfix has no `milter_timeout`: milter_connect_timeout,
               milter_command_timeout (30 s) and milter_content_timeout (300 s) are set to
               --milter-timeout (5 s) for this run with postconf -e and postfix reload.
  3 responder  (a) N idle TLS connections (500, then 1,000), then 1,000 idle plus
               --slowloris connections sending a request line a byte every 2 s, while one
               keep-alive client measures the latency of 2,000 WKD hits; the responder's
               fds and RSS (its process and granian's workers); then, with
               RLIMIT_NOFILE soft 1024 (systemd's default; the unit sets none) given to
               the responder by prlimit, 1,100 idle TLS connections and a client's hits.
               (b) a second responder of
               our own on the sandbox's slapd with [web] cache_bytes tiny (an LRU, misses
               ask slapd) and threads 4, flooded with look-ups of distinct random
               addresses of the domain by --flooders processes (not threads: they would share
               the measuring client's GIL) while the hits are measured;
               slapd's cn=Monitor (added online) counts the searches (with the presence
               index of the responder's sync, milter_wkd.web.presence, misses of unknown
               addresses should cost none).

Prints a table per part and one summary line. Exits 1 if a bound is broken: a session
answered other than 250 or 5xx-with-reason, fds or threads of the milter not back down
after, a mail lost across the stop, a 2xx during the stop without the milter, hits not
200, or hit p99 over 5 ms (--hit-bound) with the responder alone (under attack the
figures are reported, with what to put in front, see README).

Run (as root, like the sandbox):  .venv/bin/python benchmarks/bounds.py
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import os
import random
import re
import resource
import shutil
import signal
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from _common import SUBMISSION, KeyRing, address, password, users_ldif

from milter_wkd.sandbox import Sandbox
from milter_wkd.sandbox.daemons import LOOPBACK, free_port
from milter_wkd.sandbox.slapd import SlapdError
from milter_wkd.sandbox.wkd import WkdResponder
from milter_wkd.wkd import local_part_hash

HOST = "openpgpkey.example.org"
KEYED = 20  # users with a published key: the hits
PIECES = 4  # DATA written in this many pieces
PIECE_PAUSE = 0.5


# -- /proc ------------------------------------------------------------------------------


def status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def group(pid: int) -> list[int]:
    """pid and its descendants (granian's workers)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = [pid], [pid]
    while todo:
        parent = todo.pop()
        children = [p for p, pp in parents.items() if pp == parent]
        found += children
        todo += children
    return found


class Sampler:
    """Every 50 ms: fds and threads of pids (summed), their maxima."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak_fds = self.peak_threads = self.peak_rss = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def now(self) -> tuple[int, int, int]:
        total_fds = total_threads = rss = 0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                total_fds += fds(pid)
                total_threads += status(pid, "Threads")
                rss += status(pid, "VmRSS")
        return total_fds, total_threads, rss

    def run(self) -> None:
        while not self.stop.is_set():
            f, t, r = self.now()
            self.peak_fds = max(self.peak_fds, f)
            self.peak_threads = max(self.peak_threads, t)
            self.peak_rss = max(self.peak_rss, r)
            time.sleep(0.05)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# -- part 1: concurrent SMTP sessions ------------------------------------------------------


def mail(sender: str, to: str, token: str, size: int) -> list[bytes]:
    head = (f"From: {sender}\r\nTo: {to}\r\nSubject: bounds {token}\r\n"
            f"Message-ID: <{token}@bounds.example>\r\n\r\n").encode()
    line = b"resource bounds, a line of moderate mail body text of about 64 characters\r\n"
    body = line * max(1, size // len(line))
    step = len(body) // PIECES + 1
    return [head + body[:step]] + [body[k:k + step] for k in range(step, len(body), step)]


def data(smtp: smtplib.SMTP, sender: str, to: str, pieces: list[bytes]) -> tuple[int, str]:
    """One mail, its DATA written in pieces PIECE_PAUSE apart; (code, text)."""
    code, text = smtp.mail(sender)
    if code != 250:
        smtp.rset()
        return code, text.decode("utf-8", "replace")
    code, text = smtp.rcpt(to)
    if code not in (250, 251):
        smtp.rset()
        return code, text.decode("utf-8", "replace")
    code, text = smtp.docmd("DATA")
    if code != 354:
        return code, text.decode("utf-8", "replace")
    for piece in pieces:
        smtp.send(piece)
        time.sleep(PIECE_PAUSE)
    smtp.send(b"\r\n.\r\n")
    code, text = smtp.getreply()
    return code, text.decode("utf-8", "replace")


def session(sb: Sandbox, i: int, n: int, run: str) -> dict[str, object]:
    endpoint = sb.postfix.submission
    began = time.monotonic()
    out: dict[str, object] = {"banner": float("nan"), "codes": [], "texts": []}
    try:
        smtp = smtplib.SMTP(endpoint.host, endpoint.port, timeout=180,
                            source_address=(f"127.0.1.{i % 250 + 1}", 0))
        out["banner"] = time.monotonic() - began
        with smtp:
            smtp.ehlo("bounds.example")
            smtp.login(address(i), password(i))
            for to, size, tag in ((address((i + 1) % n), 8 * 1024, "m"),
                                  (SUBMISSION, 64 * 1024, "s")):
                code, text = data(smtp, address(i), to, mail(address(i), to,
                                                             f"{tag}{i}.{run}", size))
                out["codes"].append(code)  # type: ignore[attr-defined]
                out["texts"].append(text)  # type: ignore[attr-defined]
    except smtplib.SMTPResponseException as exc:
        out["codes"].append(exc.smtp_code)  # type: ignore[attr-defined]
        out["texts"].append(exc.smtp_error.decode("utf-8", "replace"))  # type: ignore[attr-defined]
    except (smtplib.SMTPException, OSError) as exc:
        out["codes"].append(0)  # type: ignore[attr-defined]
        out["texts"].append(f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]
    return out


def part1(sb: Sandbox, counts: list[int], run: str) -> tuple[list[str], bool, dict[str, int]]:
    assert sb.milter is not None
    pid = sb.milter.pid
    assert pid is not None
    rows, failed, last = [], False, {}
    reasons: Counter[str] = Counter()
    # Warm-up (not counted): the milter's LDAP pool and Postfix's smtpd processes settle.
    with concurrent.futures.ThreadPoolExecutor(max_workers=5) as pool:
        list(pool.map(session, [sb] * 5, range(5), [5] * 5, [f"w.{run}"] * 5))
    for n in counts:
        time.sleep(3)
        before_fds, before_threads = fds(pid), status(pid, "Threads")
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        began = time.monotonic()
        with Sampler([pid]) as sampler, \
                concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
            results = list(pool.map(session, [sb] * n, range(n), [n] * n,
                                    [f"{n}.{run}"] * n))
        seconds = time.monotonic() - began
        hwm = status(pid, "VmHWM")
        time.sleep(5)
        after_fds, after_threads = fds(pid), status(pid, "Threads")
        banners = [float(r["banner"]) for r in results]  # type: ignore[arg-type]
        waited = sum(1 for b in banners if b > 1.0)
        codes: Counter[str] = Counter()
        for r in results:
            for code, text in zip(r["codes"], r["texts"], strict=True):  # type: ignore[call-overload]
                codes[f"{code // 100}xx" if code else "dropped"] += 1
                if code != 250:
                    reasons[f"{code} {text[:80]}"] += 1
                if code == 0 or 400 <= code < 500 or (500 <= code < 600 and len(text) < 10):
                    failed = True
        back = after_fds <= before_fds + 2 and after_threads <= before_threads + 2
        failed = failed or not back
        rows.append(f"{n:8} {seconds:6.1f} {codes['2xx']:5} {codes['5xx']:5} {codes['4xx']:5} "
                    f"{codes['dropped']:7} {waited:6} {pct(banners, 0.5) * 1000:8.0f} "
                    f"{max(banners) * 1000:8.0f} {hwm / 1024:7.0f} "
                    f"{before_fds:>4}/{sampler.peak_fds:<4}/{after_fds:<4} "
                    f"{before_threads:>4}/{sampler.peak_threads:<4}/{after_threads:<4}"
                    f"{'' if back else '  NOT BACK'}")
        print(rows[-1], flush=True)
        last = {"rss": round(hwm / 1024), "fds": sampler.peak_fds, "threads": sampler.peak_threads,
                "n": n}
    rows.append(f"answers other than 250 over the {len(counts)} runs (count, code, reason):")
    for reason, count in reasons.most_common(8):
        rows.append(f"  {count:5}  {reason}")
    return rows, failed, last


# -- part 2: past the milter timeouts -------------------------------------------------------


def postconf(sb: Sandbox, *args: str) -> str:
    return subprocess.run(["postconf", "-c", str(sb.postfix.config_dir), *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60, check=True).stdout


def plain_send(sb: Sandbox, i: int, token: str) -> tuple[int, str]:
    endpoint = sb.postfix.submission
    raw = b"".join(mail(address(i), address(i + 1), token, 2048))
    try:
        with smtplib.SMTP(endpoint.host, endpoint.port, timeout=120) as smtp:
            smtp.ehlo("bounds.example")
            smtp.login(address(i), password(i))
            smtp.sendmail(address(i), [address(i + 1)], raw)
    except smtplib.SMTPRecipientsRefused as exc:
        code, text = next(iter(exc.recipients.values()))
        return code, text.decode("utf-8", "replace")
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code, exc.smtp_error.decode("utf-8", "replace")
    except (smtplib.SMTPException, OSError) as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    return 250, ""


def delivered(sb: Sandbox, tokens: list[str]) -> set[str]:
    text = sb.postfix.maillog.read_text(errors="replace")
    queue_of = {m.group(2): m.group(1) for m in
                re.finditer(r"([0-9A-F]{6,}): message-id=<([^@>]+)@bounds\.example>", text)}
    sent = set(re.findall(r"([0-9A-F]{6,}): to=<[^>]*>,.* status=sent", text))
    return {t for t in tokens if queue_of.get(t) in sent}


def part2(sb: Sandbox, timeout: int, run: str, inflight: int) -> tuple[list[str], bool,
                                                                        dict[str, int]]:
    assert sb.milter is not None
    pid = sb.milter.pid
    assert pid is not None
    found = postconf(sb, "milter_connect_timeout", "milter_command_timeout",
                     "milter_content_timeout", "milter_default_action").strip()
    rows = ["sandbox's main.cf: " + "; ".join(found.splitlines())]
    postconf(sb, "-e", f"milter_connect_timeout={timeout}s",
             f"milter_command_timeout={timeout}s", f"milter_content_timeout={timeout}s")
    sb.postfix.postfix("reload")
    rows.append(f"for this run: milter_connect/command/content_timeout = {timeout}s "
                f"(postconf -e, postfix reload)")
    time.sleep(2)
    held = timeout * 2 + 4
    tokens = [f"p{k}.{run}" for k in range(inflight)]
    answers: dict[str, tuple[int, str, float]] = {}

    def one(k: int) -> None:
        began = time.monotonic()
        code, text = plain_send(sb, 100 + k, tokens[k])
        answers[tokens[k]] = (code, text, time.monotonic() - began)

    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        threads = [threading.Thread(target=one, args=(k,)) for k in range(inflight)]
        for thread in threads:
            thread.start()
            time.sleep(0.3)
        for thread in threads:
            thread.join(timeout=held)
        time.sleep(max(0.0, held - (time.monotonic() - stopped)))
    finally:
        os.kill(pid, signal.SIGCONT)
    was_stopped = time.monotonic() - stopped
    failed = False
    codes = Counter(f"{c // 100}xx" if c else "dropped" for c, _, _ in answers.values())
    rows.append(f"milter SIGSTOPped {was_stopped:.1f} s; {inflight} mails sent into it: "
                f"{dict(sorted(codes.items()))}")
    for token, (code, text, seconds) in sorted(answers.items()):
        rows.append(f"  {token}: {code} after {seconds:.1f} s  {text[:80]}")
        failed = failed or code == 250  # accepted without the milter
    four = [t for t, (c, _, _) in answers.items() if 400 <= c < 500 or c == 0]
    time.sleep(1)
    retried = {t: plain_send(sb, 100 + tokens.index(t), t)[0] for t in four}
    fresh = [f"q{k}.{run}" for k in range(inflight)]
    fresh_codes = [plain_send(sb, 120 + k, t)[0] for k, t in enumerate(fresh)]
    rows.append(f"after SIGCONT: the {len(four)} tempfailed retried: "
                f"{dict(Counter(retried.values()))}; {len(fresh)} fresh: "
                f"{dict(Counter(fresh_codes))}")
    accepted = [t for t in tokens if answers[t][0] == 250 or retried.get(t) == 250]
    accepted += [t for t, c in zip(fresh, fresh_codes, strict=True) if c == 250]
    deadline = time.monotonic() + 60
    while (done := delivered(sb, accepted)) != set(accepted) and time.monotonic() < deadline:
        time.sleep(1)
    lost = len(tokens) + len(fresh) - len(done)
    rows.append(f"delivered by LMTP (Postfix's log): {len(done)} of {len(tokens) + len(fresh)} "
                f"sent; lost {lost}")
    failed = failed or lost > 0 or any(c != 250 for c in fresh_codes)
    return rows, failed, {"4xx": sum(1 for c, _, _ in answers.values() if 400 <= c < 500),
                          "lost": lost}


# -- part 3: the responder ------------------------------------------------------------------


def tls_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def wkd_path(local: str) -> str:
    return f"/.well-known/openpgpkey/example.org/hu/{local_part_hash(local)}?l={local}"


class Client:
    """http.client over TLS with keep-alive to 127.0.0.1:port (SNI and Host: HOST)."""

    def __init__(self, port: int, ca: Path, timeout: float = 30) -> None:
        self.port, self.context, self.timeout = port, tls_context(ca), timeout
        self.conn: http.client.HTTPConnection | None = None
        self.reconnects = 0

    def get(self, path: str) -> tuple[int, bytes]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(LOOPBACK, self.port,
                                                       timeout=self.timeout)
                self.conn.sock = self.context.wrap_socket(
                    socket.create_connection((LOOPBACK, self.port), timeout=self.timeout),
                    server_hostname=HOST)
                self.reconnects += attempt
            try:
                self.conn.request("GET", path, headers={"Host": HOST})
                response = self.conn.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError


def hits(port: int, ca: Path, count: int,
         timeout: float = 30) -> tuple[float, float, Counter[int]]:
    client = Client(port, ca, timeout)
    locals_ = [f"user{i}" for i in range(KEYED)]
    client.get(wkd_path(locals_[0]))  # connect outside the clock
    times: list[float] = []
    codes: Counter[int] = Counter()
    for k in range(count):
        began = time.perf_counter()
        code, _ = client.get(wkd_path(locals_[k % KEYED]))
        times.append(time.perf_counter() - began)
        codes[code] += 1
    return statistics.median(times) * 1000, pct(times, 0.99) * 1000, codes


def open_idle(port: int, ca: Path, n: int, timeout: float = 30) -> list[ssl.SSLSocket]:
    context = tls_context(ca)
    socks = []
    for _ in range(n):
        try:
            socks.append(context.wrap_socket(
                socket.create_connection((LOOPBACK, port), timeout=timeout),
                server_hostname=HOST))
        except OSError as exc:
            print(f"  idle connection {len(socks) + 1} failed: {exc}", flush=True)
            break
    return socks


def still_open(socks: list[socket.socket]) -> int:
    alive = 0
    for sock in socks:
        try:
            sock.settimeout(0)
            raw = sock.recv(1)
            alive += raw != b""  # bytes from the server: open (a 408 or the like)
        except (BlockingIOError, ssl.SSLWantReadError):
            alive += 1
        except OSError:
            pass
    return alive


def slowloris(port: int, ca: Path, n: int, stop: threading.Event) -> list[ssl.SSLSocket]:
    socks = open_idle(port, ca, n)
    line = f"GET /.well-known/openpgpkey/example.org/policy HTTP/1.1\r\nHost: {HOST}\r\n" * 50

    def drip() -> None:
        k = 0
        while not stop.wait(2.0):
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.send(line[k % len(line)].encode())
            k += 1

    threading.Thread(target=drip, daemon=True).start()
    return socks


def responder_row(label: str, port: int, ca: Path, pid: int, count: int,
                  before: list[socket.socket]) -> tuple[str, float, Counter[int]]:
    pids = group(pid)
    with Sampler(pids) as sampler:
        began = time.monotonic()
        p50, p99, codes = hits(port, ca, count)
        seconds = time.monotonic() - began
    alive = still_open(before) if before else 0
    row = (f"{label:34} {p50:6.2f} {p99:7.2f} {seconds:6.1f} {dict(codes)!s:>12} "
           f"{sampler.peak_fds:6} {sampler.peak_rss / 1024:6.0f} "
           f"{alive:>5}/{len(before):<5}")
    print(row, flush=True)
    return row, p99, codes


def part3a(sb: Sandbox, count: int, idles: list[int], loris: int, watch: float,
           bound: float) -> tuple[list[str], float, bool]:
    pid = sb.wkd.pid
    assert pid is not None
    port, ca = sb.wkd.port, sb.wkd.ca_file
    rows = []
    row, base_p99, codes = responder_row("alone", port, ca, pid, count, [])
    rows.append(row)
    failed = set(codes) != {200}
    worst = base_p99
    socks: list[ssl.SSLSocket] = []
    for n in idles:
        socks += open_idle(port, ca, n - len(socks))
        row, _, codes = responder_row(f"{len(socks)} idle TLS", port, ca, pid, count, socks)
        rows.append(row)
        failed = failed or set(codes) != {200}
    stop = threading.Event()
    lorises = slowloris(port, ca, loris, stop)
    time.sleep(5)
    row, worst, codes = responder_row(f"{len(socks)} idle + {len(lorises)} slowloris",
                                      port, ca, pid, count, socks + lorises)
    rows.append(row)
    failed = failed or set(codes) != {200}
    started = time.monotonic()
    time.sleep(watch)  # default: past granian's header_read_timeout (keep_alive_seconds 30)
    rows.append(f"  {time.monotonic() - started + 5:.0f} s after the slowloris began: idle "
                f"{still_open(socks)}/{len(socks)}, slowloris {still_open(lorises)}/"
                f"{len(lorises)} connections still open")
    print(rows[-1], flush=True)
    stop.set()
    for sock in socks + lorises:
        sock.close()
    rows.append(nofile_limited(sb, port, ca, pid, count))
    print(rows[-1], flush=True)
    return rows, worst, failed or base_p99 > bound


def nofile_limited(sb: Sandbox, port: int, ca: Path, pid: int, count: int) -> str:
    """The shipped systemd unit sets no LimitNOFILE: systemd's default soft limit is 1024.
    Give the responder's processes that limit and hold 1,100 idle TLS connections."""
    time.sleep(2)
    for member in group(pid):
        _, hard = resource.prlimit(member, resource.RLIMIT_NOFILE)
        resource.prlimit(member, resource.RLIMIT_NOFILE, (1024, hard))
    socks = open_idle(port, ca, 1100, timeout=3)
    try:
        p50, p99, codes = hits(port, ca, min(count, 200), timeout=5)
        answer = f"hits p50 {p50:.2f} ms, p99 {p99:.2f} ms, {dict(codes)}"
    except (OSError, http.client.HTTPException) as exc:
        answer = f"hits FAIL: {type(exc).__name__}: {exc}"
    opened = len(socks)
    for sock in socks:
        sock.close()
    time.sleep(2)
    try:
        after = hits(port, ca, 100, timeout=5)
        recovered = f"after closing them: hits p99 {after[1]:.2f} ms, {dict(after[2])}"
    except (OSError, http.client.HTTPException) as exc:
        recovered = f"after closing them: FAIL {type(exc).__name__}"
    return (f"  RLIMIT_NOFILE soft 1024 (systemd's default; the unit sets none): "
            f"{opened} of 1100 idle TLS connections completed the handshake; {answer}; "
            f"{recovered}")


def monitor(sb: Sandbox) -> None:
    """slapd's cn=Monitor, added online (back-monitor is built into Debian's slapd), once."""
    with contextlib.suppress(SlapdError):  # added by an earlier run of part 3b
        sb.slapd.ldapmodify(
            "dn: olcDatabase=monitor,cn=config\nobjectClass: olcDatabaseConfig\n"
            "olcDatabase: monitor\nolcAccess: to * by dn.exact=gidNumber=0+uidNumber=0,"
            "cn=peercred,cn=external,cn=auth read by * none\n", add=True)


def searches_done(sb: Sandbox) -> int:
    """Searches slapd completed (cn=Search,cn=Operations,cn=Monitor)."""
    out = subprocess.run(["ldapsearch", "-H", sb.slapd.ldapi_uri, "-Y", "EXTERNAL", "-Q",
                          "-LLL", "-s", "base", "-b", "cn=Search,cn=Operations,cn=Monitor",
                          "monitorOpCompleted"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return int(re.search(r"monitorOpCompleted: (\d+)", out).group(1))  # type: ignore[union-attr]


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of these processes so far (/proc/PID/stat)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
    return ticks / os.sysconf("SC_CLK_TCK")


def flood(port: int, ca: Path, seed: int, stop: multiprocessing.synchronize.Event,
          results: multiprocessing.queues.Queue[dict[int, int]], rate: float) -> None:
    """One flooding process: look-ups of distinct random addresses until `stop`, as fast
    as answered or (rate > 0) at `rate` per second; the answers' status codes counted
    into `results`."""
    rng = random.Random(seed)  # noqa: S311 (not secret)
    client = Client(port, ca)
    local: Counter[int] = Counter()
    due = time.monotonic()
    while not stop.is_set():
        if rate > 0:
            due += 1 / rate
            time.sleep(max(0.0, due - time.monotonic()))
        name = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(12))
        try:
            code, _ = client.get(wkd_path(name))
        except (OSError, http.client.HTTPException):
            code = 0
        local[code] += 1
    results.put(dict(local))


def part3b(sb: Sandbox, work: Path, count: int, budget: int, flooders: int,
           seconds: float, rate: float = 0.0) -> tuple[list[str], float]:
    responder = WkdResponder(work / f"wkd-lru-{rate:.0f}", sb.slapd, port=free_port(),
                             submission_public_key=sb.submission_public_key, threads=4)
    responder.write_config()
    text = responder.config_path.read_text()
    responder.config_path.write_text(text.replace("refresh_interval =",
                                                  f"cache_bytes = {budget}\nrefresh_interval =",
                                                  1))
    rows = [f"own responder: [web] cache_bytes = {budget}, threads 4, workers 1, port "
            f"{responder.port}"]
    with responder:
        pid = responder.pid
        assert pid is not None
        port, ca = responder.port, responder.ca_file
        row, _, _ = responder_row("alone (LRU)", port, ca, pid, count, [])
        rows.append(row)
        monitor(sb)
        idle_began, idle_count = time.monotonic(), searches_done(sb)
        time.sleep(3)
        background = (searches_done(sb) - idle_count) / (time.monotonic() - idle_began)
        start_count = searches_done(sb)
        # The flood runs in processes of its own: threads of this process would share
        # its GIL with the client that measures the hits, and measure that contention.
        context = multiprocessing.get_context("fork")
        stop = context.Event()
        results: multiprocessing.queues.Queue[dict[int, int]] = context.Queue()
        workers = [context.Process(target=flood,
                                   args=(port, ca, k, stop, results, rate / flooders),
                                   daemon=True) for k in range(flooders)]
        slapd_pid = sb.slapd.pid or 0
        cpu_before = cpu_seconds(group(pid)), cpu_seconds([slapd_pid])
        began = time.monotonic()
        for worker in workers:
            worker.start()
        time.sleep(1)
        label = (f"miss flood ({flooders} processes"
                 + (f", {rate:.0f}/s)" if rate > 0 else ")"))
        row, p99, _ = responder_row(label, port, ca, pid, count, [])
        rows.append(row)
        time.sleep(max(0.0, seconds - (time.monotonic() - began)))
        stop.set()
        misses: Counter[int] = Counter()
        for _ in workers:
            misses.update(results.get(timeout=60))
        for worker in workers:
            worker.join()
        responder_cpu = cpu_seconds(group(pid)) - cpu_before[0]
        slapd_cpu = cpu_seconds([slapd_pid]) - cpu_before[1]
        flood_seconds = time.monotonic() - began
        searches = searches_done(sb) - start_count
        total = sum(misses.values())
        rows.append(f"flood: {total} look-ups of distinct random addresses in "
                    f"{flood_seconds:.1f} s ({total / flood_seconds:.0f}/s), answers "
                    f"{dict(misses)}; slapd (cn=Monitor): {searches} searches "
                    f"({searches / flood_seconds:.0f}/s; {background:.0f}/s of them the "
                    f"responders' background reads, measured idle before); CPU per request "
                    f"(misses and the {count} hits): responder "
                    f"{responder_cpu / (total + count) * 1e6:.0f} us, slapd "
                    f"{slapd_cpu / (total + count) * 1e6:.0f} us")
        print(rows[-1], flush=True)
    return rows, p99


# -- main -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--milter-timeout", type=int, default=5)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--hits", type=int, default=2000)
    parser.add_argument("--idle", type=int, nargs="+", default=[500, 1000])
    parser.add_argument("--slowloris", type=int, default=200)
    parser.add_argument("--idle-watch", type=float, default=35.0,
                        help="seconds the idle and slowloris connections are watched after")
    parser.add_argument("--budget", type=int, default=8192, help="[web] cache_bytes, part 3b")
    parser.add_argument("--flooders", type=int, default=16)
    parser.add_argument("--flood-seconds", type=float, default=15.0)
    parser.add_argument("--flood-rate", type=float, nargs="+", default=[0.0],
                        help="misses per second of the flood(s) in part 3b, one run each; "
                             "0: as fast as answered")
    parser.add_argument("--hit-bound", type=float, default=5.0)
    parser.add_argument("--parts", nargs="+", default=["1", "2", "3"],
                        help="1 2 3 (3a and 3b), or 3a, 3b alone")
    args = parser.parse_args()
    run = f"{os.getpid():x}{int(time.time()) & 0xffff:x}"
    work = Path(tempfile.mkdtemp(prefix="milter-wkd-bounds-"))
    work.chmod(0o711)
    ring = KeyRing(work / "users")
    failed = False
    users = max(*args.sessions, 130)
    summary = {"rss": 0, "fds": 0, "threads": 0, "n": 0, "4xx": 0, "lost": 0}
    idle_p99 = flood_p99 = float("nan")
    try:
        with Sandbox(work / "sandbox", keep=False) as sb:
            sb.slapd.ldapmodify(users_ldif(range(users)), add=True)
            fprs = ring.generate([address(i) for i in range(KEYED)])
            for i in range(KEYED):
                key = work / f"key{i}.asc"
                key.write_bytes(ring.run("--armor", "--export", fprs[address(i)]))
                subprocess.run([sys.executable, "-m", "milter_wkd", "keys", "import",
                                "--config", str(sb.config_path), address(i), str(key)],
                               check=True, capture_output=True, timeout=60)
            deadline = time.monotonic() + 30  # the responder's mirror catches up
            while (any(sb.wkd.get(wkd_path(f"user{i}"))[0] != 200 for i in range(KEYED))
                   and time.monotonic() < deadline):
                time.sleep(0.2)
            print(f"setup: {users} users, {KEYED} with a published key; milter pid "
                  f"{sb.milter.pid if sb.milter else None}, responder pid {sb.wkd.pid}",
                  flush=True)
            if "1" in args.parts:
                print("\n1 milter under concurrent SMTP sessions (each: 8 KiB mail + 64 KiB "
                      "to the submission address)")
                print(f"{'sessions':>8} {'secs':>6} {'250':>5} {'5xx':>5} {'4xx':>5} "
                      f"{'dropped':>7} {'waited':>6} {'p50 ms':>8} {'max ms':>8} "
                      f"{'HWM MiB':>7} {'fds b/peak/a':>14} {'threads b/peak/a':>16}")
                rows, bad, last = part1(sb, args.sessions, run)
                for row in rows[len(args.sessions):]:
                    print(row)
                summary.update(last)
                failed = failed or bad
            if "2" in args.parts:
                print("\n2 milter stopped past Postfix's milter timeouts")
                rows, bad, figures = part2(sb, args.milter_timeout, run, args.inflight)
                print("\n".join(rows), flush=True)
                summary.update(figures)
                failed = failed or bad
            if "3" in args.parts or "3a" in args.parts:
                print("\n3a responder (sandbox's, workers 1, threads 1): WKD hits "
                      f"({args.hits}, keep-alive TLS) under idle and slowloris connections")
                head = (f"{'condition':34} {'p50 ms':>6} {'p99 ms':>7} {'secs':>6} "
                        f"{'answers':>12} {'fds':>6} {'RSS MiB':>6} {'open/opened':>11}")
                print(head, flush=True)
                _, idle_p99, bad = part3a(sb, args.hits, args.idle, args.slowloris,
                                             args.idle_watch, args.hit_bound)
                failed = failed or bad
            if "3" in args.parts or "3b" in args.parts:
                head = (f"{'condition':34} {'p50 ms':>6} {'p99 ms':>7} {'secs':>6} "
                        f"{'answers':>12} {'fds':>6} {'RSS MiB':>6} {'open/opened':>11}")
                print(f"\n3b responder with a tiny cache: hits under a flood of distinct "
                      f"misses\n{head}", flush=True)
                for rate in args.flood_rate:
                    rows, flood_p99 = part3b(sb, work, args.hits, args.budget,
                                             args.flooders, args.flood_seconds, rate)
                    print(rows[0])
    finally:
        ring.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nmilter: peak RSS {summary['rss']} MiB, peak fds {summary['fds']}, threads "
          f"{summary['threads']} at {summary['n']} sessions; past milter_timeout: 4xx "
          f"{summary['4xx']}, lost {summary['lost']}; responder: hit p99 {idle_p99:.2f} ms "
          f"under {max(args.idle)} idle + {args.slowloris} slowloris, {flood_p99:.2f} ms under "
          f"a miss flood")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
