"""Milter benchmark: smtp-source -> Postfix -> smtp-sink, with our milter adding an Autocrypt
header to every message, against the same Postfix without the milter, in one run.

Setup (not timed): a private slapd (the sandbox's: our schema, ACLs), --senders users
user0..@example.org added with ldapadd, each with a gpg-made key published by the store
(Directory.publish_key, as `milter-wkd keys` does); example.org's service keys made by
init_domain; our milter (`python -m milter_wkd milter --config`, no -v) on a unix socket,
with [milter] trusted_networks = ["127.0.0.1/32"] (smtp-source cannot pick its source
address), Autocrypt on, DKIM signing in the milter off (the issue asks for Autocrypt only;
--dkim switches it on); one private Postfix with smtpd services on loopback that differ
only in `-o smtpd_milters=` (ours on one, none on another, and on a third the "floor": a
pymilter milter in its own process whose only callback, end of message, adds one constant
header, the least any Python milter that adds a header costs; --no-floor skips it), all
relaying every message (default_transport smtp, relayhost [127.0.0.1]:SINK,
default_process_limit 200) to one smtp-sink that appends what it receives to a dump file.

Each run: --senders smtp-source processes at once (one per sender, From = envelope sender
= userI@example.org, --sessions parallel sessions in all, one message per session, a
--size-octet body) send --messages messages in all to one of the services; the run ends
when smtp-sink has received all of them (counted in its dump). Runs alternate (without,
ours, floor, without, ours, floor, ...; --rounds times) after one warm-up run each, so that
all see the same machine. Printed per run and in all: messages per second end to end (first
connection to last message in the sink), the rate at which smtp-source got its 250s, and
the CPU time the milter process used per message (/proc). The milter's work is checked on
every run: each message of our milter's runs in the dump must carry exactly one
`Autocrypt: addr=<its sender>` header, every other message none.

Target: our milter at least 0.95x the milter-less throughput (end to end, all rounds).

Figures are wall-clock and noisy on a shared machine: run it twice.

How to run (from the repository root, after `make venv`; as root, like the sandbox):

    .venv/bin/python benchmarks/milter.py                   # 2 x 3 runs of 2,000 messages
    .venv/bin/python benchmarks/milter.py --messages 500 --rounds 1 --no-floor
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _common import KeyRing, address, clock, stop, users_ldif

from milter_wkd.config import load
from milter_wkd.directory import Directory, KeySource, Provenance
from milter_wkd.domains import init_domain
from milter_wkd.openpgp import clean_key
from milter_wkd.sandbox.daemons import (
    LOOPBACK,
    SandboxError,
    answers,
    free_port,
    log_tail,
    wait_until,
)
from milter_wkd.sandbox.postfix import BASE_MAIN_CF, BASE_MASTER_CF, HOSTNAME, Endpoint, Postfix
from milter_wkd.sandbox.slapd import Slapd
from milter_wkd.values import Address

RECIPIENT = "someone@example.net"
WITHOUT, OURS, FLOOR = "without milter", "our milter", "floor milter"
FLOOR_HEADER = "X-Benchmark-Floor"
# The least any pymilter milter that adds a header costs: no callback but end of message,
# which adds one constant header (its own process; --no-floor skips it).
FLOOR_MILTER = f"""
import sys, Milter
class Floor(Milter.Base):
    def eom(self):
        self.addheader("{FLOOR_HEADER}", "1")
        return Milter.ACCEPT
Milter.factory = Floor
Milter.set_flags(Milter.ADDHDRS)
Milter.runmilter("floor", sys.argv[1], 30, rmsock=True)
"""
MILTER_MACROS = ("i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} "
                 "{mail_mailer}")


class BenchPostfix(Postfix):
    """A private Postfix whose smtpd services differ only in their milter (ours, none, the
    pymilter floor) and relay everything to a sink on loopback; nothing stays local."""

    def __init__(self, workdir: Path, *, milter_socket: str, floor_socket: str,
                 sink_port: int) -> None:
        super().__init__(workdir, domains=[], submission_addresses=[],
                         dovecot_auth_socket=Path("/nonexistent"),
                         lmtp=Endpoint(LOOPBACK, 0), milters=milter_socket)
        self.floor_socket = floor_socket
        self.sink_port = sink_port

    def endpoint(self, kind: str) -> Endpoint:
        return {OURS: self.inbound, WITHOUT: self.submission, FLOOR: self.reinject}[kind]

    def main_cf(self) -> str:
        replaced = ("default_transport", "relay_transport", "mynetworks")
        base = BASE_MAIN_CF.format(
            hostname=HOSTNAME, loopback=LOOPBACK, queue=self.queue_dir, data=self.data_dir,
            maillog=self.maillog, root=self.dir)
        kept = [line for line in base.splitlines()
                if not line.startswith(tuple(f"{name} =" for name in replaced))]
        return "\n".join(kept) + f"""
# milter-wkd benchmark: everything goes to smtp-sink on loopback.
default_transport = smtp
relay_transport = smtp
relayhost = [{LOOPBACK}]:{self.sink_port}
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
smtp_tls_security_level = none
default_process_limit = 200
smtpd_milters =
non_smtpd_milters =
milter_protocol = 6
milter_default_action = tempfail
milter_mail_macros = {MILTER_MACROS}
"""

    def master_cf(self) -> str:
        services = {OURS: self.milters, WITHOUT: "", FLOOR: self.floor_socket}
        return BASE_MASTER_CF + "".join(
            f"{self.endpoint(kind).host}:{self.endpoint(kind).port} inet n - n - - smtpd\n"
            f"  -o syslog_name=postfix/{kind.replace(' ', '-')}\n"
            f"  -o smtpd_milters={milters}\n"
            for kind, milters in services.items() if milters or kind == WITHOUT)

    def start(self) -> None:
        self.write_config()
        result = self.postfix("start")
        if result.returncode != 0:
            raise SandboxError(f"postfix start failed (rc {result.returncode}):\n"
                               f"{log_tail(self.start_log)}\n{log_tail(self.maillog)}")
        kinds = (OURS, WITHOUT, FLOOR) if self.floor_socket else (OURS, WITHOUT)
        for endpoint in map(self.endpoint, kinds):
            wait_until(answers(endpoint.host, endpoint.port, "220 "),
                       f"Postfix on port {endpoint.port}", log=self.maillog)


def milter_config(work: Path, slapd: Slapd, socket_path: Path, *, dkim: bool) -> str:
    account = slapd.service_accounts["milter"]
    password_file = work / "milter.password"
    password_file.touch(mode=0o600)
    password_file.write_text(account["password"] + "\n", encoding="utf-8")
    keys = work / "keys"
    q = json.dumps
    return f"""\
[directory]
uri = {q(slapd.uri)}
bind_dn = {q(account["dn"])}
bind_password_file = {q(str(password_file))}
base_dn = {q(slapd.people_dn)}
mail_attributes = [{", ".join(q(a) for a in slapd.mail_attributes)}]
pending_base = {q(slapd.pending_dn)}

[mailer]
method = "directory"
directory = {q(str(work / "outbox"))}

[milter]
socket = {q(f"unix:{socket_path}")}
socket_group = "postfix"
trusted_networks = ["127.0.0.1/32"]
autocrypt = true
dkim_sign_outgoing = {"true" if dkim else "false"}

[[domains]]
name = "example.org"
submission_address = "key-submission@example.org"
submission_key = {q(str(keys / "submission.asc"))}
submission_public_key = {q(str(keys / "submission.pub"))}
dkim_selector = "wkd"
dkim_key = {q(str(keys / "dkim.pem"))}
"""


def publish_keys(config_path: Path, ring: KeyRing, senders: int) -> None:
    fprs = ring.generate([address(i) for i in range(senders)])
    cfg = load(config_path, environ={})
    with Directory(cfg.directory) as store:
        for i in range(senders):
            user = store.user(Address.parse(address(i)))
            key = ring.run("--export", fprs[address(i)])
            store.publish_key(user, clean_key(key, list(user.addresses)),
                              Provenance(KeySource.ADMIN_IMPORT, "benchmark", int(time.time())))


def start_milter(work: Path, command: list[str], socket_path: Path,
                 ) -> subprocess.Popen[bytes]:
    log_path = work / f"{socket_path.stem}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def ready() -> bool:
        if proc.poll() is not None:
            raise SandboxError(f"the milter exited:\n{log_tail(log_path)}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(socket_path))
            except OSError:
                return False
        return True

    try:
        if socket_path.stem == "floor":  # libmilter does not chown: let postfix in
            wait_until(socket_path.exists, "floor milter socket", log=log_path)
            socket_path.chmod(0o666)
        wait_until(ready, str(socket_path), log=log_path)
    except BaseException:
        stop(proc)
        raise
    return proc


class Sink:
    """smtp-sink on loopback appending every message to one dump file."""

    def __init__(self, work: Path, port: int) -> None:
        folder = work / "sink"
        folder.mkdir()
        owner = pwd.getpwnam("postfix")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        self.dump = folder / "dump"
        self.proc = subprocess.Popen(
            ["smtp-sink", "-u", "postfix", "-D", str(self.dump), "-m", "1000",
             f"{LOOPBACK}:{port}", "1024"], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=(work / "sink.log").open("ab"))
        wait_until(answers(LOOPBACK, port, "220 "), f"smtp-sink on port {port}")

    def size(self) -> int:
        try:
            return self.dump.stat().st_size
        except FileNotFoundError:
            return 0

    def wait(self, offset: int, messages: int, deadline: float) -> None:
        """Until the dump holds `messages` messages after offset (read incrementally)."""
        marker = b"\nX-Client-Proto: "
        received, tail = 0, b""
        wait_until(self.dump.exists, "the sink's dump file",
                   timeout=max(1.0, deadline - clock()))
        with self.dump.open("rb") as dump:
            dump.seek(offset)
            while True:
                chunk = tail + dump.read()
                received += chunk.count(marker)
                tail = chunk[-(len(marker) - 1):]
                if received >= messages:
                    return
                if clock() > deadline:
                    raise SystemExit(f"only {received} of {messages} messages reached the "
                                     "sink in time")
                time.sleep(0.01)

    def read(self, offset: int) -> bytes:
        try:
            with self.dump.open("rb") as dump:
                dump.seek(offset)
                return dump.read()
        except FileNotFoundError:
            return b""


@dataclass
class Run:
    kind: str
    messages: int
    seconds: float  # first connection to the last message in the sink
    accepted: float  # first connection to smtp-source's last 250
    milter_cpu: float  # CPU seconds the milter process used during the run


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a live process (all its threads), from /proc."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def send(sink: Sink, postfix: BenchPostfix, kind: str, *, messages: int, sessions: int,
         senders: int, size: int, timeout: float, milter_pids: dict[str, int]) -> Run:
    endpoint = postfix.endpoint(kind)
    milter_pid = milter_pids.get(kind)
    per_sender = [messages // senders + (1 if i < messages % senders else 0)
                  for i in range(senders)]
    per_sessions = [max(1, sessions // senders + (1 if i < sessions % senders else 0))
                    for i in range(senders)]
    offset = sink.size()
    cpu = cpu_seconds(milter_pid)
    started = clock()
    sources = [subprocess.Popen(
        ["smtp-source", "-m", str(count), "-s", str(per_sessions[i]), "-l", str(size),
         "-f", address(i), "-t", RECIPIENT, "-S", "benchmark", "-M", "bench.example.org",
         f"{endpoint.host}:{endpoint.port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for i, count in enumerate(per_sender) if count]
    try:
        for source in sources:
            _, err = source.communicate(timeout=timeout)
            if source.returncode != 0:
                raise SystemExit(f"smtp-source failed: {err.decode(errors='replace')}")
        accepted = clock() - started
        sink.wait(offset, messages, deadline=started + timeout)
        seconds = clock() - started
        cpu = cpu_seconds(milter_pid) - cpu
    finally:
        for source in sources:
            stop(source)
    check_headers(sink.read(offset), kind, messages=messages)
    return Run(kind, messages, seconds, accepted, cpu)


AUTOCRYPT = re.compile(rb"^Autocrypt: addr=([^;]+);", re.MULTILINE)
SENDER = re.compile(rb"^X-Mail-Args: <([^>]+)>", re.MULTILINE)
FLOOR_LINE = re.compile(rb"^" + FLOOR_HEADER.encode() + rb": 1$", re.MULTILINE)


def check_headers(dump: bytes, kind: str, *, messages: int) -> None:
    """Each message: one Autocrypt header for its sender from our milter, none otherwise
    (and one floor header from the floor milter, none otherwise)."""
    records = dump.split(b"X-Client-Addr: ")[1:]
    if len(records) != messages:
        raise SystemExit(f"the sink dump holds {len(records)} messages, expected {messages}")
    for record in records:
        found = AUTOCRYPT.findall(record)
        sender = SENDER.search(record)
        expected = [sender.group(1)] if kind == OURS and sender else []
        floor = len(FLOOR_LINE.findall(record))
        if found != expected or floor != (kind == FLOOR):
            raise SystemExit(f"{kind}: Autocrypt {found!r} in a message from {expected!r}, "
                             f"{floor} floor headers:\n"
                             f"{record[:1500].decode(errors='replace')}")


def report(run: Run) -> str:
    return (f"{run.kind:14s}: {run.messages / run.seconds:7.1f} msg/s end to end "
            f"({run.messages} in {run.seconds:.2f} s), {run.messages / run.accepted:7.1f} "
            f"msg/s accepted, milter CPU {run.milter_cpu / run.messages * 1000:.2f} ms/msg")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="per run (default 2000)")
    parser.add_argument("--sessions", type=int, default=8,
                        help="parallel SMTP sessions in all (default 8)")
    parser.add_argument("--senders", type=int, default=4,
                        help="senders with published keys, one smtp-source each (default 4)")
    parser.add_argument("--size", type=int, default=2000, help="body octets (default 2000)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="pairs of runs (without, with) after the warm-up (default 2)")
    parser.add_argument("--dkim", action="store_true",
                        help="let the milter DKIM-sign too (it then reads every body)")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the runs with the floor milter (pymilter adding one header)")
    parser.add_argument("--timeout", type=float, default=120, help="per run (default 120 s)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="milter-wkd-bench-milter-"))
    work.chmod(0o711)  # Postfix (as postfix) reaches the milter socket below it
    ring = KeyRing(work / "users")
    slapd = Slapd(work / "slapd")
    milters: list[subprocess.Popen[bytes]] = []
    postfix: BenchPostfix | None = None
    sink: Sink | None = None
    try:
        slapd.start()
        slapd.ldapmodify(users_ldif(range(args.senders)), add=True)
        socket_path = work / "milter" / "milter.sock"
        config_path = work / "milter-wkd.toml"
        config_path.write_text(milter_config(work, slapd, socket_path, dkim=args.dkim),
                               encoding="utf-8")
        for domain in load(config_path, environ={}).domains:
            init_domain(domain)
        publish_keys(config_path, ring, args.senders)
        (work / "milter").mkdir(mode=0o755)
        milters.append(start_milter(work, [sys.executable, "-m", "milter_wkd", "milter",
                                           "--config", str(config_path)], socket_path))
        pids = {OURS: milters[-1].pid}
        kinds = [WITHOUT, OURS]
        floor_socket = work / "milter" / "floor.sock"
        if not args.no_floor:
            milters.append(start_milter(work, [sys.executable, "-c", FLOOR_MILTER,
                                               f"unix:{floor_socket}"], floor_socket))
            pids[FLOOR] = milters[-1].pid
            kinds.append(FLOOR)
        sink_port = free_port()
        sink = Sink(work, sink_port)
        postfix = BenchPostfix(work / "postfix", milter_socket=f"unix:{socket_path}",
                               floor_socket=f"unix:{floor_socket}" if not args.no_floor else "",
                               sink_port=sink_port)
        postfix.start()

        common = {"sessions": args.sessions, "senders": args.senders, "size": args.size,
                  "timeout": args.timeout, "milter_pids": pids}
        for kind in kinds:  # warm-up
            send(sink, postfix, kind, messages=max(args.sessions * 4, 100), **common)
        print(f"{args.messages} messages per run, {args.sessions} sessions, {args.senders} "
              f"senders, {args.size}-octet bodies, one message per session; Autocrypt"
              f"{' + DKIM' if args.dkim else ''} checked in every message of our milter")
        runs: list[Run] = []
        for _ in range(args.rounds):
            for kind in kinds:
                runs.append(send(sink, postfix, kind, messages=args.messages, **common))
                print(report(runs[-1]), flush=True)
        totals = {kind: Run(kind, sum(r.messages for r in runs if r.kind == kind),
                            sum(r.seconds for r in runs if r.kind == kind),
                            sum(r.accepted for r in runs if r.kind == kind),
                            sum(r.milter_cpu for r in runs if r.kind == kind))
                  for kind in kinds}
        print("all rounds:")
        for kind in kinds:
            print("  " + report(totals[kind]))

        def ratio(kind: str, of: Callable[[Run], float]) -> float:
            return (totals[kind].messages / of(totals[kind])) / (
                totals[WITHOUT].messages / of(totals[WITHOUT]))

        for kind in kinds[1:]:
            print(f"ratio {kind} / without: {ratio(kind, lambda r: r.seconds):.3f} end to end, "
                  f"{ratio(kind, lambda r: r.accepted):.3f} accepted")
        print(f"target: our milter >= 0.95x the milter-less throughput (end to end): "
              f"{'met' if ratio(OURS, lambda r: r.seconds) >= 0.95 else 'NOT met'}")
    finally:
        if postfix is not None:
            postfix.stop()
        if sink is not None:
            stop(sink.proc)
        for proc in milters:
            stop(proc)
        slapd.close()
        ring.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
