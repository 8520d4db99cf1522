"""Milter benchmark: smtp-source -> Postfix -> smtp-sink, with our milter (Autocrypt, and
DKIM signing with RSA-2048, Ed25519 or both) against OpenDKIM (the C milter nearly every
mail admin already runs, signing with RSA-2048 or Ed25519), a pymilter "floor" and no
milter at all, every configuration in one run.

Setup (not timed): a private slapd (the sandbox's: our schema, ACLs), --senders users
user0..@example.org added with ldapadd, each with a gpg-made key published by the store
(LdapStore.publish_key, as `milter-wkd keys` does); example.org's service keys made by
init_domain: an Ed25519 DKIM key (selector wkd) and an RSA-2048 one (wkd-rsa), which
OpenDKIM signs with too. One milter process per configuration, each on its own unix
socket: ours (`python -m milter_wkd milter --config`, no -v) four times, with [milter]
trusted_networks = ["127.0.0.1/32"] (smtp-source cannot pick its source address), Autocrypt
on, and DKIM signing off / Ed25519 / RSA / both; OpenDKIM (Debian's `opendkim`, Mode s,
relaxed/relaxed, From oversigned as ours does, InternalHosts 127.0.0.1) twice, RSA and
Ed25519; the floor, a pymilter milter whose only callback, end of message, adds one
constant header (the least any Python milter that adds a header costs; --no-floor skips
it). One private Postfix with one smtpd service per configuration on loopback, differing
only in `-o smtpd_milters=`, all relaying every message (default_transport smtp, relayhost
[127.0.0.1]:SINK, default_process_limit 200) to one smtp-sink that appends what it receives
to a dump file.

Each run: --senders smtp-source processes at once (one per sender, From = envelope sender
= userI@example.org, --sessions parallel sessions in all, one message per session, a
--size-octet body) send --messages messages in all to one configuration's service; the run
ends when smtp-sink has received all of them (counted in its dump). Runs alternate over
the configurations (--rounds times) after one warm-up run each, so that all see the same
machine. Printed per run and in all: messages per second end to end (first connection to
last message in the sink), the rate at which smtp-source got its 250s, and the CPU time the
milter process (all its threads) used per message, from /proc. Every message in the sink
is checked: one `Autocrypt: addr=<its sender>` header from our milter, none otherwise; the
DKIM-Signature headers the configuration makes (algorithm and selector, in order), none
otherwise; and the first message of every run must verify (dkimpy, every signature,
against the keys' TXT records).

Judged on milter CPU per message over all rounds (steady within about 10 % between runs
on a quiet machine; msg/s ratios swing a lot on this shared 2-core machine and are
information only; each target's line also shows the ratio per round and its median, which
say how much the machine's load moved the figures). Targets:
  - ours, Autocrypt only: <= 1.5x the floor's CPU per message;
  - ours, Autocrypt + DKIM RSA-2048: <= 1.0x OpenDKIM RSA-2048's;
  - ours, Autocrypt + dual signing (RSA-2048 and Ed25519): <= 1.5x OpenDKIM RSA-2048's.

How to run (from the repository root, after `make test` installed everything; as root,
like the sandbox):

    .venv/bin/python benchmarks/milter.py                   # 3 rounds of 2,000 messages
    .venv/bin/python benchmarks/milter.py --messages 500 --rounds 1 --no-floor
    .venv/bin/python benchmarks/milter.py --only ours,floor   # some configurations
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import KeyRing, address, clock, stop, users_ldif

from milter_wkd import dkim
from milter_wkd.config import load
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
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.store.model import KeyOrigin, Provenance
from milter_wkd.values import Address

RECIPIENT = "someone@example.net"
RSA, ED25519 = ("rsa-sha256", "wkd-rsa"), ("ed25519-sha256", "wkd")


@dataclass(frozen=True)
class Kind:
    """One configuration: which milter, and what it must have done to every message."""

    name: str
    key: str  # its name for --only
    milter: str  # "", "ours", "opendkim", "floor"
    autocrypt: bool = False
    signatures: tuple[tuple[str, str], ...] = ()  # (a=, s=) of each DKIM-Signature, in order
    floor: bool = False


WITHOUT = Kind("no milter", "none", "")
OPENDKIM_RSA = Kind("OpenDKIM, RSA-2048", "opendkim-rsa", "opendkim", signatures=(RSA,))
OPENDKIM_ED = Kind("OpenDKIM, Ed25519", "opendkim-ed25519", "opendkim", signatures=(ED25519,))
OURS = Kind("ours, Autocrypt only", "ours", "ours", autocrypt=True)
OURS_ED = Kind("ours, Autocrypt + DKIM Ed25519", "ours-ed25519", "ours", autocrypt=True,
               signatures=(ED25519,))
OURS_RSA = Kind("ours, Autocrypt + DKIM RSA-2048", "ours-rsa", "ours", autocrypt=True,
                signatures=(RSA,))
OURS_DUAL = Kind("ours, Autocrypt + dual signing", "ours-dual", "ours", autocrypt=True,
                 signatures=(RSA, ED25519))
FLOOR = Kind("floor (pymilter, one header)", "floor", "floor", floor=True)
KINDS = (WITHOUT, OPENDKIM_RSA, OPENDKIM_ED, OURS, OURS_ED, OURS_RSA, OURS_DUAL, FLOOR)

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
    """A private Postfix with one smtpd service per configuration, differing only in its
    milter, relaying everything to a sink on loopback; nothing stays local."""

    def __init__(self, workdir: Path, *, milters: dict[Kind, str], sink_port: int) -> None:
        super().__init__(workdir, domains=[], submission_addresses=[],
                         dovecot_auth_socket=Path("/nonexistent"),
                         lmtp=Endpoint(LOOPBACK, 0))
        self.kind_milters = milters
        self.endpoints = {kind: Endpoint(LOOPBACK, free_port()) for kind in milters}
        self.sink_port = sink_port

    def endpoint(self, kind: Kind) -> Endpoint:
        return self.endpoints[kind]

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
        return BASE_MASTER_CF + "".join(
            f"{self.endpoints[kind].host}:{self.endpoints[kind].port} inet n - n - - smtpd\n"
            f"  -o syslog_name=postfix/{re.sub(r'[^a-z0-9]+', '-', kind.name.lower())}\n"
            f"  -o smtpd_milters={milters}\n"
            for kind, milters in self.kind_milters.items())

    def start(self) -> None:
        self.write_config()
        result = self.postfix("start")
        if result.returncode != 0:
            raise SandboxError(f"postfix start failed (rc {result.returncode}):\n"
                               f"{log_tail(self.start_log)}\n{log_tail(self.maillog)}")
        for endpoint in self.endpoints.values():
            wait_until(answers(endpoint.host, endpoint.port, "220 "),
                       f"Postfix on port {endpoint.port}", log=self.maillog)


def milter_config(work: Path, slapd: Slapd, socket_path: Path, kind: Kind) -> str:
    account = slapd.service_accounts["milter"]
    password_file = work / "milter.password"
    password_file.touch(mode=0o600)
    password_file.write_text(account["password"] + "\n", encoding="utf-8")
    keys = work / "keys"
    q = json.dumps
    ed_key = str(keys / "dkim.pem") if ED25519 in kind.signatures or not kind.signatures else ""
    rsa_key = str(keys / "dkim-rsa.pem") if RSA in kind.signatures or not kind.signatures else ""
    return f"""\
[directory]
uri = {q(slapd.uri)}
bind_dn = {q(account["dn"])}
bind_password_file = {q(str(password_file))}
base_dn = {q(slapd.people_dn)}
mail_attributes = [{", ".join(q(a) for a in slapd.mail_attributes)}]
pending_base = {q(slapd.pending_dn)}
claims_base = {q(slapd.claims_dn)}

[mailer]
method = "directory"
directory = {q(str(work / "outbox"))}

[milter]
socket = {q(f"unix:{socket_path}")}
socket_group = "postfix"
trusted_networks = ["127.0.0.1/32"]
autocrypt = true
dkim_sign_outgoing = {"true" if kind.signatures else "false"}

[[domains]]
name = "example.org"
submission_address = "key-submission@example.org"
submission_key = {q(str(keys / "submission.asc"))}
submission_public_key = {q(str(keys / "submission.pub"))}
dkim_selector = {q(ED25519[1])}
dkim_key = {q(ed_key)}
dkim_rsa_selector = {q(RSA[1])}
dkim_rsa_key = {q(rsa_key)}
"""


def opendkim_config(work: Path, socket_path: Path, key: dkim.DkimKey) -> Path:
    """OpenDKIM signing every message from 127.0.0.1 for example.org with one key, as
    a mail admin sets it up (relaxed/relaxed, From oversigned), in the foreground."""
    path = work / f"{socket_path.stem}.conf"
    path.write_text(f"""\
Mode s
Socket local:{socket_path}
UMask 000
Background no
Syslog no
Domain {key.domain}
Selector {key.selector}
KeyFile {work / "keys" / ("dkim-rsa.pem" if key.algorithm == "rsa" else "dkim.pem")}
SignatureAlgorithm {key.signature_algorithm.decode()}
Canonicalization relaxed/relaxed
OversignHeaders From
InternalHosts 127.0.0.1
# The keys lie below /tmp, which OpenDKIM would call unsafe.
RequireSafeKeys false
""", encoding="ascii")
    return path


def publish_keys(config_path: Path, ring: KeyRing, senders: int) -> None:
    fprs = ring.generate([address(i) for i in range(senders)])
    cfg = load(config_path, environ={})
    with LdapStore(cfg.directory) as store:
        for i in range(senders):
            user = store.user(Address.parse(address(i)))
            key = ring.run("--export", fprs[address(i)])
            store.publish_key(user, clean_key(key, list(user.addresses)),
                              Provenance(KeyOrigin.ADMIN_IMPORT, "benchmark", int(time.time())))


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
    kind: Kind
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


def send(sink: Sink, postfix: BenchPostfix, kind: Kind, *, messages: int, sessions: int,
         senders: int, size: int, timeout: float, milter_pids: dict[Kind, int],
         records: dict[str, str]) -> Run:
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
    check_messages(sink.read(offset), kind, messages=messages, records=records)
    return Run(kind, messages, seconds, accepted, cpu)


AUTOCRYPT = re.compile(rb"^Autocrypt: addr=([^;]+);", re.MULTILINE)
SENDER = re.compile(rb"^X-Mail-Args: <([^>]+)>", re.MULTILINE)
FLOOR_LINE = re.compile(rb"^" + FLOOR_HEADER.encode() + rb": 1$", re.MULTILINE)
SIGNATURE = re.compile(rb"^DKIM-Signature:(.*(?:\r?\n[ \t].*)*)", re.MULTILINE)
TAG = re.compile(rb"(?:^|;)\s*([as])\s*=\s*([\w.-]+)")


def check_messages(dump: bytes, kind: Kind, *, messages: int,
                   records: dict[str, str]) -> None:
    """Each message: one Autocrypt header for its sender from our milter, none otherwise;
    the floor header from the floor only; the configuration's DKIM signatures (a=, s=, in
    order), none otherwise; and all signatures of the first message verify."""
    records_found = dump.split(b"X-Client-Addr: ")[1:]
    if len(records_found) != messages:
        raise SystemExit(f"the sink dump holds {len(records_found)} messages, expected "
                         f"{messages}")
    for number, record in enumerate(records_found):
        found = AUTOCRYPT.findall(record)
        sender = SENDER.search(record)
        expected = [sender.group(1)] if kind.autocrypt and sender else []
        floor = len(FLOOR_LINE.findall(record))
        signatures = [tuple(v.decode() for _, v in sorted(TAG.findall(b"".join(
            value.split())))) for value in SIGNATURE.findall(record)]
        wanted = [(a, s) for a, s in kind.signatures]
        if found != expected or floor != kind.floor or signatures != wanted:
            raise SystemExit(f"{kind.name}: Autocrypt {found!r} in a message from "
                             f"{expected!r}, {floor} floor headers, signatures {signatures} "
                             f"(expected {wanted}):\n{record[:1500].decode(errors='replace')}")
        if number == 0 and not all(dkim.verify(b"X-Client-Addr: " + record, records, index)
                                   for index in range(len(signatures))):
            raise SystemExit(f"{kind.name}: a DKIM signature does not verify:\n"
                             f"{record[:3000].decode(errors='replace')}")


def per_message(run: Run) -> float:
    return run.milter_cpu / run.messages * 1000


def report(run: Run) -> str:
    return (f"{run.kind.name:32s}: {run.messages / run.seconds:6.1f} msg/s end to end "
            f"({run.messages} in {run.seconds:5.2f} s), {run.messages / run.accepted:6.1f} "
            f"msg/s accepted, milter CPU {per_message(run):.2f} ms/msg")


def start_milters(work: Path, slapd: Slapd, kinds: list[Kind], keys: dict[str, dkim.DkimKey],
                  milters: list[subprocess.Popen[bytes]]) -> tuple[dict[Kind, str],
                                                                   dict[Kind, int]]:
    """Every configuration's milter; returns Postfix's smtpd_milters and the pids."""
    sockets: dict[Kind, str] = {}
    pids: dict[Kind, int] = {}
    folder = work / "milter"
    for number, kind in enumerate(kinds):
        if not kind.milter:
            sockets[kind] = ""
            continue
        socket_path = folder / ("floor.sock" if kind.floor else f"{kind.milter}{number}.sock")
        if kind.milter == "ours":
            config_path = work / f"milter-wkd-{number}.toml"
            config_path.write_text(milter_config(work, slapd, socket_path, kind),
                                   encoding="utf-8")
            command = [sys.executable, "-m", "milter_wkd", "milter", "--config",
                       str(config_path)]
        elif kind.milter == "opendkim":
            conf = opendkim_config(work, socket_path, keys[kind.signatures[0][1]])
            command = [shutil.which("opendkim") or "opendkim", "-f", "-x", str(conf)]
        else:
            command = [sys.executable, "-c", FLOOR_MILTER, f"unix:{socket_path}"]
        milters.append(start_milter(work, command, socket_path))
        sockets[kind] = f"unix:{socket_path}"
        pids[kind] = milters[-1].pid
    return sockets, pids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="per run (default 2000)")
    parser.add_argument("--sessions", type=int, default=8,
                        help="parallel SMTP sessions in all (default 8)")
    parser.add_argument("--senders", type=int, default=4,
                        help="senders with published keys, one smtp-source each (default 4)")
    parser.add_argument("--size", type=int, default=2000, help="body octets (default 2000)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over all configurations after the warm-up (default 3)")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the runs with the floor milter (pymilter adding one header)")
    parser.add_argument("--only", default=",".join(kind.key for kind in KINDS),
                        help="comma-separated configurations to run, of "
                             f"{', '.join(kind.key for kind in KINDS)} (default all; "
                             "no milter always runs)")
    parser.add_argument("--timeout", type=float, default=120, help="per run (default 120 s)")
    args = parser.parse_args()
    only = set(args.only.split(",")) | {WITHOUT.key}
    if only - {kind.key for kind in KINDS}:
        parser.error(f"--only: unknown {', '.join(sorted(only - {k.key for k in KINDS}))}")
    if shutil.which("opendkim") is None:
        raise SystemExit("opendkim is not installed (make test installs it)")

    work = Path(tempfile.mkdtemp(prefix="milter-wkd-bench-milter-"))
    work.chmod(0o711)  # Postfix (as postfix) reaches the milter sockets below it
    ring = KeyRing(work / "users")
    slapd = Slapd(work / "slapd")
    milters: list[subprocess.Popen[bytes]] = []
    postfix: BenchPostfix | None = None
    sink: Sink | None = None
    kinds = [kind for kind in KINDS
             if kind.key in only and not (args.no_floor and kind.floor)]
    try:
        slapd.start()
        slapd.ldapmodify(users_ldif(range(args.senders)), add=True)
        (work / "milter").mkdir(mode=0o755)
        config_path = work / "milter-wkd-init.toml"
        config_path.write_text(milter_config(work, slapd, work / "milter" / "unused", OURS),
                               encoding="utf-8")
        (domain,) = load(config_path, environ={}).domains
        init_domain(domain)  # the submission key pair, the Ed25519 and RSA DKIM keys
        keys = {key.selector: key for key in dkim.domain_keys(domain)}
        records = {key.dns_name(): key.dns_record() for key in keys.values()}
        publish_keys(config_path, ring, args.senders)
        sockets, pids = start_milters(work, slapd, kinds, keys, milters)
        sink_port = free_port()
        sink = Sink(work, sink_port)
        postfix = BenchPostfix(work / "postfix", milters=sockets, sink_port=sink_port)
        postfix.start()

        common = {"sessions": args.sessions, "senders": args.senders, "size": args.size,
                  "timeout": args.timeout, "milter_pids": pids, "records": records}
        for kind in kinds:  # warm-up
            send(sink, postfix, kind, messages=max(args.sessions * 4, 100), **common)
        print(f"{args.messages} messages per run, {args.sessions} sessions, {args.senders} "
              f"senders, {args.size}-octet bodies, one message per session; Autocrypt and "
              "DKIM signatures checked in every message, the first of each run verified")
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
        print_summary(kinds, totals, runs)
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


def print_summary(kinds: list[Kind], totals: dict[Kind, Run], runs: list[Run]) -> None:
    without = totals[WITHOUT]
    print("all rounds:")
    print(f"  {'configuration':32s}  msg/s  ratio to no milter  milter CPU ms/msg (runs)")
    for kind in kinds:
        total = totals[kind]
        rate = total.messages / total.seconds
        ratio = rate / (without.messages / without.seconds)
        each = ", ".join(f"{per_message(r):.2f}" for r in runs if r.kind == kind)
        print(f"  {kind.name:32s} {rate:6.1f}  {ratio:5.2f}x               "
              f"{per_message(total):5.2f} ({each})")

    def cpu(kind: Kind) -> float:
        return per_message(totals[kind])

    targets = [(OURS, FLOOR, 1.5), (OURS_RSA, OPENDKIM_RSA, 1.0), (OURS_DUAL, OPENDKIM_RSA, 1.5)]
    print("targets (milter CPU per message):")
    for ours, anchor, limit in targets:
        if ours not in totals or anchor not in totals:
            continue
        ratio = cpu(ours) / cpu(anchor)
        # Within a round both ran minutes apart at most: information on how the shared
        # machine's load moved the figures.
        rounds = [per_message(a) / per_message(b) for a, b in zip(
            [r for r in runs if r.kind == ours], [r for r in runs if r.kind == anchor],
            strict=True) if b.milter_cpu]
        print(f"  {ours.name} / {anchor.name}: {ratio:.2f}x (target <= {limit}x): "
              f"{'met' if ratio <= limit else 'NOT met'}; per round "
              f"{', '.join(f'{r:.2f}' for r in rounds)}, median "
              f"{statistics.median(rounds) if rounds else 0:.2f}x")
    if OURS_ED in totals and OPENDKIM_ED in totals:
        print("information: ours, Autocrypt + DKIM Ed25519 / OpenDKIM, Ed25519: "
              f"{cpu(OURS_ED) / cpu(OPENDKIM_ED):.2f}x")


if __name__ == "__main__":
    sys.exit(main())
