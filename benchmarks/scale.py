"""1,000,000 users with keys on a replicated directory (not a test; issue #15's benchmark).

Setup, all on this machine and loopback, every file below --workdir (default /var/tmp):
- keys: one real v4 Ed25519 key per user uN@example.org, user ID the address, its positive
  self-certification signed here with `cryptography` (benchmarks/wkd_memory.synthetic_key:
  pgpy would take hours for a million), made by --procs processes; a sample is imported
  and its signatures checked by gpg, and every 100th key is cleaned by the project's
  `openpgp.clean_key` and must come out byte for byte as made;
- LDIF: each user's entry with every attribute a publication writes
  (`store.schema.published_values`: pgpKey, fingerprints, gpgMailbox, wkdAddressHash,
  provenance, wkdKeyDigest...), so that `store.schema.stored_key` serves it, plus one
  claim entry per fingerprint (`store.model.wanted_claims`), as `LdapStore.publish_key`
  writes them; the same keys as static files in gpg-wks-server's layout for nginx;
- provider 1 is built like the sandbox's slapd (ldap/'s schemas, indexes, ACLs, overlays),
  the LDIF added by `slapadd -q -w`; provider 2 and the consumer get a copy of its LMDB
  file (what an administrator seeding replicas does: the same entryUUIDs and contextCSN,
  so syncrepl starts from there), then ldap/replication/'s LDIF, as
  `milter-wkd sandbox up --providers 2 --consumers 1` configures them;
- the WKD responder (`milter-wkd web`, one worker) reads the consumer and fails over to
  the providers.

Measured and printed: generation and slapadd time; slapd's on-disk size (data.mdb) and
resident memory; the responder's cold start with the default cache budget (an LRU at this
size: time to the first answer) and with a budget the whole directory fits (time to the
first answer, time to the complete mirror), its resident memory in both; WKD requests/s
and p99 against nginx serving the same keys as static files (wrk over HTTPS, 90 % hits,
benchmarks/wkd.py's script and rounds); then a steady stream of --rate publications/s
(`LdapStore.publish_key` on the providers' URI list, new keys of random users): the
replication lag provider 1 -> consumer and -> provider 2, and the freshness (the write
returned -> the responder serves the new key), on a sample of every 10th publication;
the stream runs twice, with slapd as configured (LMDB flushes every transaction to disk)
and then with olcDbNoSync set online on every slapd.
Targets (#15): cold start <= 60 s with the LRU, p99 <= 5 ms, freshness <= 1 s, lag <= 1 s.

Run (as root, in a network namespace of its own when others use the machine):
    .venv/bin/python benchmarks/scale.py [--users 1000000 --procs 2 --workdir /var/tmp]
A small run for development: --users 20000. It needs disk (about 5 GB per slapd at
1,000,000 users, three of them, plus 1,000,000 small static files) and leaves nothing
behind unless --keep.
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import http.client
import multiprocessing
import os
import random
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import ldap  # noqa: E402
from wkd import HOST, LUA, start_nginx, wrk  # noqa: E402
from wkd_memory import CREATED, synthetic_key  # noqa: E402

from milter_wkd.config import DirectoryConfig  # noqa: E402
from milter_wkd.openpgp import CleanResult, KeyInfo, clean_key, inspect_key  # noqa: E402
from milter_wkd.openpgp.packets import dearmor  # noqa: E402
from milter_wkd.sandbox.daemons import LOOPBACK, free_port, terminate, wait_until  # noqa: E402
from milter_wkd.sandbox.slapd import (  # noqa: E402
    Slapd,
    provider_url,
    replication_ldif,
    wait_replicated,
)
from milter_wkd.sandbox.wkd import WkdResponder  # noqa: E402
from milter_wkd.store.ldapstore import LdapStore  # noqa: E402
from milter_wkd.store.model import KeyOrigin, Provenance, wanted_claims  # noqa: E402
from milter_wkd.store.schema import gnupg_time, published_values  # noqa: E402
from milter_wkd.values import Address, Fingerprint  # noqa: E402
from milter_wkd.web.routes import policy_text  # noqa: E402
from milter_wkd.wkd import address_hash  # noqa: E402

PEOPLE_DN = Slapd.people_dn
CLAIMS_DN = Slapd.claims_dn
PROVENANCE = Provenance(KeyOrigin.ADMIN_IMPORT, "scale", CREATED)
CHUNK = 5000  # users per task of the generating processes
CHECK_EVERY = 100  # every Nth key is also cleaned by openpgp.clean_key and compared
DB_MAXSIZE = 64 << 30  # olcDbMaxSize (the sandbox's 1 GiB holds ~100,000 users)
MIB = 1 << 20
TARGETS = {"cold start (LRU)": 60.0, "p99 (ms)": 5.0, "freshness": 1.0, "lag": 1.0}


def address(n: int) -> str:
    return f"u{n}@example.org"


def wkd_path(addr: str) -> str:
    return f"/.well-known/openpgpkey/example.org/hu/{address_hash(Address.parse(addr))}"


# -- generation (in --procs processes) ----------------------------------------------------

def _ldif_line(name: str, value: str) -> str:
    if value.isascii() and "\n" not in value and not value.startswith((" ", ":", "<")):
        return f"{name}: {value}\n"
    return f"{name}:: {base64.b64encode(value.encode()).decode()}\n"


def key_info(key: bytes, addr: Address) -> KeyInfo:
    """What `openpgp.inspect_key` says of a key made by synthetic_key (one packet header of
    6 octets, then the public key body), without verifying its signature again."""
    body = key[6:6 + int.from_bytes(key[2:6], "big")]
    fingerprint = hashlib.sha1(b"\x99" + len(body).to_bytes(2, "big") + body)  # noqa: S324
    return KeyInfo(Fingerprint.parse(fingerprint.hexdigest()), CREATED, None, "EdDSA", 255,
                   "ed25519", False, (str(addr),), (addr,), ())


def user_ldif(n: int, key: bytes) -> str:
    """uid=uN's entry and its claims, with every attribute a publication writes."""
    addr = Address.parse(address(n))
    info = key_info(key, addr)
    # clean_key returns such a key unchanged, with inspect_key's info: checked on every
    # CHECK_EVERYth (clean_key costs ten times the rest of the line).
    cleaned = CleanResult(key, info, collections.Counter(), None)  # type: ignore[arg-type]
    if n % CHECK_EVERY == 0:
        checked = clean_key(key, [addr])
        if checked.key != key or checked.info != info or inspect_key(key) != info:
            raise RuntimeError(f"clean_key or inspect_key disagree on the key of {addr}")
    dn = f"uid=u{n},{PEOPLE_DN}"
    out = [f"dn: {dn}\nobjectClass: inetOrgPerson\nobjectClass: wkdKeyHolder\nuid: u{n}\n"
           f"cn: User {n}\nsn: {n}\nmail: {addr}\n"]
    for name, values in published_values(cleaned, PROVENANCE).items():
        out += [_ldif_line(name, value) for value in values]
    out.append("\n")
    for fpr, kind in wanted_claims(info).items():
        out.append(f"dn: wkdFingerprint={fpr},{CLAIMS_DN}\nobjectClass: wkdKeyClaim\n"
                   f"wkdFingerprint: {fpr}\nwkdClaimHolder: {dn}\nwkdClaimKind: {kind.value}\n"
                   f"wkdCreated: {gnupg_time(CREATED)}\n\n")
    return "".join(out)


def make_chunk(task: tuple[int, int, str]) -> tuple[bytes, float, float]:
    """Users [start, end): (their LDIF, seconds making keys and LDIF, seconds writing the
    static files)."""
    start, end, static_root = task
    hu = Path(static_root) / "example.org" / "hu"
    made = written = 0.0
    parts = []
    for n in range(start, end):
        t0 = time.perf_counter()
        key = synthetic_key(address(n))
        parts.append(user_ldif(n, key))
        t1 = time.perf_counter()
        (hu / address_hash(Address.parse(address(n)))).write_bytes(key)
        made += t1 - t0
        written += time.perf_counter() - t1
    return "".join(parts).encode(), made, written


def generate(users: int, procs: int, ldif: Path, static_root: Path) -> tuple[float, float, float]:
    """Write the LDIF and the static files; (wall seconds, CPU seconds of keys + LDIF,
    CPU seconds of static files)."""
    (static_root / "example.org" / "hu").mkdir(parents=True)
    (static_root / "example.org" / "policy").write_bytes(policy_text(
        "key-submission@example.org", protocol_version=3, auth_submit=True,
        mailbox_only=True))
    tasks = [(s, min(s + CHUNK, users), str(static_root)) for s in range(0, users, CHUNK)]
    started = time.monotonic()
    made = written = 0.0
    with ldif.open("wb") as out, multiprocessing.Pool(procs) as pool:
        for done, (text, m, w) in enumerate(pool.imap(make_chunk, tasks), 1):
            out.write(text)
            made += m
            written += w
            if done % 20 == 0:
                print(f"  generated {done * CHUNK} users in {time.monotonic() - started:.0f} s",
                      flush=True)
    return time.monotonic() - started, made, written


def fill_static(ldif: Path, static_root: Path) -> int:
    """Write the static file of every user entry of ldif that has none; how many."""
    hu = static_root / "example.org" / "hu"
    written = 0
    mail = armored = ""
    with ldif.open(encoding="ascii") as lines:
        for line in lines:
            if line.startswith("mail: "):
                mail = line[6:].strip()
            elif line.startswith("pgpKey:: "):
                armored = line[9:].strip()
            elif line == "\n" and mail and armored:
                path = hu / address_hash(Address.parse(mail))
                if not path.exists():
                    path.write_bytes(dearmor(base64.b64decode(armored))[1])
                    written += 1
                mail = armored = ""
    return written


def check_with_gpg(workdir: Path, users: int, sample: int = 20) -> int:
    """Import a sample of the keys into a throwaway GnuPG home; count good self-signatures."""
    home = workdir / "gnupg"
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home), "LC_ALL": "C"}
    picks = random.Random(3).sample(range(users), min(sample, users))  # noqa: S311
    keys = b"".join(synthetic_key(address(n)) for n in picks)  # made afresh: any valid key
    run = [["gpg", "--batch", "--import"], ["gpg", "--batch", "--with-colons",
                                              "--check-signatures"]]
    subprocess.run(run[0], input=keys, env=env, capture_output=True, check=True, timeout=120)
    listing = subprocess.run(run[1], env=env, capture_output=True, check=True, text=True,
                             timeout=120).stdout
    subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True, check=False)
    good = [line for line in listing.splitlines() if line.startswith("sig:!:")]
    uids = [line.split(":")[9] for line in listing.splitlines() if line.startswith("uid:")]
    if len(good) != len(picks) or sorted(uids) != sorted(address(n) for n in picks):
        raise RuntimeError(f"gpg does not accept the keys:\n{listing[-2000:]}")
    return len(good)


# -- the directory --------------------------------------------------------------------------

def configured(workdir: Path, *, seed: bool) -> Slapd:
    """A slapd built like the sandbox's, its database allowed to grow, two tool threads."""
    server = Slapd(workdir, seed=seed)
    server.build()
    change = (f"dn: {server.database_dn}\nchangetype: modify\nreplace: olcDbMaxSize\n"
              f"olcDbMaxSize: {DB_MAXSIZE}\n\n"
              "dn: cn=config\nchangetype: modify\nreplace: olcToolThreads\nolcToolThreads: 2\n")
    subprocess.run(["slapmodify", "-n0", "-F", str(server.config_dir)], input=change.encode(),
                   capture_output=True, check=True, timeout=60)
    return server


def topology(workdir: Path, ldif: Path, servers: list[Slapd],
             ) -> tuple[list[Slapd], Slapd, dict[str, float]]:
    """Provider 1 loaded by slapadd, provider 2 and the consumer seeded with a copy of its
    database, replication configured and running; (providers, consumer, timings). Each
    slapd is added to servers as soon as it exists (the caller stops them)."""
    times: dict[str, float] = {}
    provider1 = configured(workdir / "provider1", seed=True)
    servers.append(provider1)
    started = time.monotonic()
    subprocess.run(["slapadd", "-q", "-w", "-n1", "-F", str(provider1.config_dir),
                    "-l", str(ldif)], capture_output=True, check=True)
    times["slapadd"] = time.monotonic() - started
    # The service accounts' passwords now, before the copies: every copy then holds the
    # same contextCSN, which syncrepl takes as its cookie - nothing to refresh. (Written
    # after the copies, they made each replica refresh the whole directory: > 5 minutes.)
    provider1.start(timeout=600)
    provider1.set_service_passwords()
    provider1.stop(timeout=600)
    others = [configured(workdir / "provider2", seed=False),
              configured(workdir / "consumer", seed=False)]
    servers += others
    started = time.monotonic()
    for server in others:  # sparse: the file's size is olcDbMaxSize, its blocks the data
        subprocess.run(["cp", "--sparse=always", str(provider1.data_dir / "data.mdb"),
                        str(server.data_dir / "data.mdb")], check=True)
    times["copy"] = time.monotonic() - started
    providers, consumer = [provider1, others[0]], others[1]
    urls = [provider_url(server) for server in providers]
    replicator = provider1.service_accounts["replicator"]
    started = time.monotonic()
    for role, server in (("provider", provider1), ("provider", providers[1]),
                         ("consumer", consumer)):
        server.service_accounts = provider1.service_accounts
        server.start(timeout=120)
        server.ldapmodify(replication_ldif(
            role, urls, suffix=server.suffix, replicator_dn=replicator["dn"],
            replicator_password=replicator["password"]))
    wait_replicated([*providers, consumer], timeout=300)
    times["replicated"] = time.monotonic() - started
    return providers, consumer, times


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def group_rss(pgid: int) -> int:
    """Summed VmRSS of a process group (granian's main process and its worker)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                total += rss(int(entry.name))
    return total


def mdb_bytes(server: Slapd) -> int:
    """Disk blocks the LMDB file uses (it is sparse up to olcDbMaxSize)."""
    return (server.data_dir / "data.mdb").stat().st_blocks * 512


# -- the responder --------------------------------------------------------------------------

def responder(workdir: Path, consumer: Slapd, providers: list[Slapd], budget: int | None,
              ) -> WkdResponder:
    server = WkdResponder(workdir, consumer, port=free_port(),
                          fallback_uris=[p.uri for p in providers])
    server.write_config()
    if budget is not None:
        text = server.config_path.read_text(encoding="utf-8")
        server.config_path.write_text(text.replace("[web]\n", f"[web]\ncache_bytes = {budget}\n",
                                                   1), encoding="utf-8")
    return server


def cold_start(server: WkdResponder, probe: str, *, mirror: bool) -> dict[str, float]:
    """Seconds from launching the responder to its first answer for a key (and, with
    mirror, to the log line saying the complete mirror is loaded); its memory then."""
    started = time.monotonic()
    server.start(timeout=600)
    while server.get(probe)[0] != 200:
        time.sleep(0.01)
    result = {"first": time.monotonic() - started}
    # The cache logs "key cache loaded in S s: N answers, B bytes, complete|least ...".
    wait_until(lambda: "key cache loaded" in server.log_path.read_text(errors="replace"),
               "the responder's first load", 3600, server.log_path)
    line = next(line for line in server.log_path.read_text(errors="replace").splitlines()
                if "key cache loaded" in line)
    result["loaded"] = time.monotonic() - started
    result["complete"] = float("complete" in line.rsplit(",", 1)[-1])
    if mirror and not result["complete"]:
        raise RuntimeError(f"the big budget did not hold the mirror: {line}")
    assert server.pid is not None
    result["rss"] = group_rss(os.getpgid(server.pid))
    print(f"  {line.split(' INFO ', 1)[-1].strip()}")
    return result


def wrk_script(workdir: Path, users: int) -> Path:
    """benchmarks/wkd.py's script over every user's path plus 10 % unknown addresses."""
    paths = [wkd_path(address(n)) for n in range(users)]
    paths += [wkd_path(f"nobody{n}@example.org") for n in range(users // 9)]
    random.Random(1).shuffle(paths)  # noqa: S311 (a fixed order)
    (workdir / "paths.txt").write_text("\n".join(paths) + "\n")
    script = workdir / "wkd.lua"
    script.write_text(LUA.format(paths=workdir / "paths.txt", host=HOST))
    return script


def same_answers(server: WkdResponder, nginx_port: int, users: int) -> None:
    other = WkdResponder(server.workdir, server.slapd, port=nginx_port)
    for n in [*random.Random(7).sample(range(users), 20), None]:  # noqa: S311
        path = wkd_path(address(n) if n is not None else "nobody-at-all@example.org")
        ours, theirs = server.get(path), other.get(path)
        if ours[0] != theirs[0] or (ours[0] == 200 and ours[2] != theirs[2]):
            raise RuntimeError(f"the responder and nginx differ on {path}: {ours[0]} "
                               f"{theirs[0]}")


# -- a steady stream of publications --------------------------------------------------------

class Watcher:
    """Times sampled publications: until the consumer and provider 2 hold the new
    fingerprint (read as root over ldapi://), until the responder serves the new key."""

    def __init__(self, consumer: Slapd, provider2: Slapd, server: WkdResponder) -> None:
        self.pending: dict[str, list[tuple[float, str, str, bytes]]] = {
            "consumer": [], "provider 2": [], "responder": []}
        self.seen: dict[str, list[float]] = {name: [] for name in self.pending}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.servers = {"consumer": consumer, "provider 2": provider2}
        self.server = server
        self.threads = [threading.Thread(target=self.watch, args=(name,), daemon=True)
                        for name in self.pending]

    def add(self, written: float, uid: str, fpr: str, key: bytes) -> None:
        with self.lock:
            for waiting in self.pending.values():
                waiting.append((written, uid, fpr, key))

    def watch(self, name: str) -> None:
        conn = None
        https = None
        if name in self.servers:
            conn = ldap.initialize(self.servers[name].ldapi_uri)
            conn.sasl_external_bind_s()
        else:  # one kept-alive HTTPS connection, verified for the WKD host name
            https = http.client.HTTPConnection(LOOPBACK, self.server.port, timeout=10)
            context = ssl.create_default_context(cafile=str(self.server.ca_file))
            https.sock = context.wrap_socket(
                socket.create_connection((LOOPBACK, self.server.port), timeout=10),
                server_hostname=HOST)
        while not self.stop.is_set() or self.pending[name]:
            with self.lock:
                waiting = list(self.pending[name])
            for item in waiting:
                written, uid, fpr, key = item
                if conn is not None:
                    found = conn.search_s(f"uid={uid},{PEOPLE_DN}", ldap.SCOPE_BASE,
                                          "(objectClass=*)", ["gpgFingerprint"])
                    done = fpr.encode() in found[0][1].get("gpgFingerprint", [])
                else:
                    assert https is not None
                    https.request("GET", wkd_path(f"{uid}@example.org"),
                                  headers={"Host": HOST})
                    done = https.getresponse().read() == key
                if done:
                    with self.lock:
                        self.pending[name].remove(item)
                        self.seen[name].append(time.monotonic() - written)
            if self.stop.is_set() and not waiting:
                break
            time.sleep(0.002)


def stream(providers: list[Slapd], consumer: Slapd, server: WkdResponder, users: int,
           rate: float, seconds: float, writers: int = 4) -> tuple[int, float, Watcher]:
    """--rate publications/s for --stream-seconds on the providers' URI list (as the
    milter writes); every 10th is timed by a Watcher. (publications, seconds, watcher)"""
    milter = providers[0].service_accounts["milter"]
    store = LdapStore(DirectoryConfig(
        uri=" ".join(p.uri for p in providers), bind_dn=milter["dn"],
        bind_password=milter["password"], base_dn=PEOPLE_DN, pending_base=Slapd.pending_dn,
        claims_base=CLAIMS_DN, mail_attributes=list(Slapd.mail_attributes),
        pool_size=writers + 1))
    watcher = Watcher(consumer, providers[1], server)
    for thread in watcher.threads:
        thread.start()
    total = int(rate * seconds)
    picks = random.Random(5).sample(range(users), min(total, users))  # noqa: S311
    # The new keys are made and cleaned before the clock: the stream is the directory's.
    keys = [clean_key(synthetic_key(f"u{n} renewed {k} <{address(n)}>"),
                      [Address.parse(address(n))]) for k, n in enumerate(picks)]
    lock = threading.Lock()
    next_one = [0]
    late = [0.0]
    started = time.monotonic() + 0.5

    def writer() -> None:
        while True:
            with lock:
                k = next_one[0]
                next_one[0] += 1
            if k >= len(picks):
                return
            due = started + k / rate
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            else:
                late[0] = max(late[0], -wait)
            n, cleaned = picks[k], keys[k]
            store.publish_key(store.user(Address.parse(address(n))), cleaned,
                              Provenance(KeyOrigin.ADMIN_IMPORT, "scale", int(time.time())))
            if k % 10 == 0:
                watcher.add(time.monotonic(), f"u{n}", cleaned.info.fingerprint.hex,
                            cleaned.key)

    threads = [threading.Thread(target=writer) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    watcher.stop.set()
    for thread in watcher.threads:
        thread.join(timeout=60)
    store.close()
    if late[0] > 0.5:
        print(f"  (the writers fell behind their schedule by up to {late[0]:.1f} s)")
    return len(picks), elapsed, watcher


def quantiles(values: list[float]) -> str:
    if not values:
        return "none"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"median {statistics.median(ordered) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
            f"max {ordered[-1] * 1000:.0f} ms (n={len(ordered)})")


def verdict(value: float, target: float) -> str:
    return f"target <= {target:g}: {'met' if value <= target else 'NOT met'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 2,
                        help="processes generating keys and LDIF")
    parser.add_argument("--workdir", default="/var/tmp", help="where the files go")
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    parser.add_argument("--reuse", metavar="DIR",
                        help="take DIR/users.ldif and DIR/static of an earlier run (with "
                             "--keep) instead of generating them; --users must match")
    parser.add_argument("--mirror-budget", type=int, default=8 << 30,
                        help="cache_bytes for the full mirror (default 8 GiB)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="wrk runs per server")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--rate", type=float, default=100.0, help="publications per second")
    parser.add_argument("--stream-seconds", type=float, default=30.0)
    parser.add_argument("--writers", type=int, default=4,
                        help="threads publishing the stream")
    args = parser.parse_args()
    # SIGTERM (timeout, kill by pid) ends it through the finally below: nothing left running.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="milter-wkd-scale-", dir=args.workdir))
    work.chmod(0o711)
    print(f"{args.users} users in {work}; load before: {os.getloadavg()}", flush=True)
    servers: list[Slapd] = []
    wkd: WkdResponder | None = None
    nginx: subprocess.Popen[bytes] | None = None
    try:
        if args.reuse:
            ldif, static = Path(args.reuse) / "users.ldif", Path(args.reuse) / "static"
            print(f"reusing {ldif} and {static}: {fill_static(ldif, static)} static files "
                  "written again", flush=True)
        else:
            ldif, static = work / "users.ldif", work / "static"
            wall, made, written = generate(args.users, args.procs, ldif, static)
            print(f"generated {args.users} keys, entries and claims in {wall:.0f} s wall "
                  f"({args.procs} processes; CPU: keys + LDIF {made:.0f} s, static files "
                  f"{written:.0f} s); LDIF {ldif.stat().st_size / MIB:.0f} MiB", flush=True)
        print(f"gpg checked the self-signatures of {check_with_gpg(work, args.users)} "
              "sampled keys: all good", flush=True)
        providers, consumer, times = topology(work, ldif, servers)
        if not args.reuse:
            ldif.unlink()
        print(f"slapadd {times['slapadd']:.0f} s ({args.users * 2 / times['slapadd']:.0f} "
              f"entries/s); data.mdb copied to provider 2 and the consumer in "
              f"{times['copy']:.0f} s; replication configured and converged in "
              f"{times['replicated']:.1f} s", flush=True)
        print(f"data.mdb on disk: {mdb_bytes(providers[0]) / MIB:.0f} MiB per slapd; slapd "
              f"RSS after start: " + ", ".join(
                  f"{name} {rss(s.pid or 0) / MIB:.0f} MiB"
                  for name, s in zip(("provider 1", "provider 2", "consumer"), servers,
                                     strict=True)), flush=True)

        probe = wkd_path(address(args.users // 2))
        wkd = responder(work / "wkd-lru", consumer, providers, None)
        lru = cold_start(wkd, probe, mirror=False)
        script = wrk_script(work, args.users)
        lru_rps, lru_p99, _ = wrk(wkd.port, script, threads=args.threads,
                                  connections=args.connections, duration=args.duration)
        print(f"LRU (default budget): first answer {lru['first']:.1f} s after launch "
              f"({verdict(lru['first'], TARGETS['cold start (LRU)'])}); "
              + ("the whole directory fit anyway, mirrored" if lru["complete"]
                 else "its load stopped at the budget")
              + f" after {lru['loaded']:.0f} s; RSS {lru['rss'] / MIB:.0f} MiB; "
              f"{lru_rps:.0f} req/s, p99 {lru_p99:.2f} ms (one run)", flush=True)
        wkd.stop()

        wkd = responder(work / "wkd-mirror", consumer, providers, args.mirror_budget)
        mirror = cold_start(wkd, probe, mirror=True)
        print(f"mirror ({args.mirror_budget / MIB:.0f} MiB budget): first answer "
              f"{mirror['first']:.1f} s, complete mirror {mirror['loaded']:.0f} s after "
              f"launch; RSS {mirror['rss'] / MIB:.0f} MiB", flush=True)
        print("slapd RSS after the loads: " + ", ".join(
            f"{name} {rss(s.pid or 0) / MIB:.0f} MiB"
            for name, s in zip(("provider 1", "provider 2", "consumer"), servers,
                               strict=True)), flush=True)

        nginx_port = free_port()
        nginx = start_nginx(work / "nginx", nginx_port, wkd.workdir / "wkd.crt",
                            wkd.workdir / "wkd.key", static, 1)
        same_answers(wkd, nginx_port, args.users)
        runs: dict[str, list[tuple[float, float]]] = {"nginx static": [], "milter-wkd web": []}
        ports = {"nginx static": nginx_port, "milter-wkd web": wkd.port}
        for port in ports.values():
            wrk(port, script, threads=args.threads, connections=args.connections, duration=3)
        for round_ in range(args.rounds):
            for name, port in ports.items():
                rps, p99, _ = wrk(port, script, threads=args.threads,
                                  connections=args.connections, duration=args.duration)
                runs[name].append((rps, p99))
                print(f"  round {round_ + 1}: {name:15} {rps:9.0f} req/s  p99 {p99:6.2f} ms",
                      flush=True)
        ratios = sorted(o[0] / t[0] for o, t in zip(runs["milter-wkd web"],
                                                    runs["nginx static"], strict=True))
        medians = {name: (statistics.median(r[0] for r in found),
                          statistics.median(r[1] for r in found))
                   for name, found in runs.items()}
        terminate(nginx.pid, "nginx")
        nginx.wait()
        nginx = None

        # The stream twice: slapd as configured (LMDB flushes every transaction), then
        # with olcDbNoSync set online on every slapd (durability left to replication).
        streams: dict[str, Watcher] = {}
        for label, nosync in (("fsync per transaction", False), ("olcDbNoSync", True)):
            if nosync:
                for server in servers:
                    server.ldapmodify(f"dn: {server.database_dn}\nchangetype: modify\n"
                                      "replace: olcDbNoSync\nolcDbNoSync: TRUE\n-\n")
            count, elapsed, watcher = stream(providers, consumer, wkd, args.users, args.rate,
                                             args.stream_seconds, args.writers)
            streams[label] = watcher
            print(f"stream ({label}): {count} publications in {elapsed:.1f} s "
                  f"({count / elapsed:.0f}/s) on provider 1; load {os.getloadavg()}",
                  flush=True)
            for name, what in (("consumer", "lag provider 1 -> consumer"),
                               ("provider 2", "lag provider 1 -> provider 2"),
                               ("responder", "freshness (written -> served)")):
                print(f"  {what}: {quantiles(watcher.seen[name])}", flush=True)

        ours, theirs = medians["milter-wkd web"], medians["nginx static"]
        print(f"\nSUMMARY at {args.users} users (load now {os.getloadavg()}, "
              f"{os.cpu_count()} CPUs shared by every server and wrk):")
        generation = "reused" if args.reuse else f"{wall:.0f} s"
        print(f"  generation {generation}; slapadd {times['slapadd']:.0f} s; data.mdb "
              f"{mdb_bytes(providers[0]) / MIB:.0f} MiB")
        print(f"  cold start, LRU: first answer {lru['first']:.1f} s "
              f"({verdict(lru['first'], TARGETS['cold start (LRU)'])}); RSS "
              f"{lru['rss'] / MIB:.0f} MiB")
        print(f"  cold start, mirror: first answer {mirror['first']:.1f} s, complete "
              f"{mirror['loaded']:.0f} s; RSS {mirror['rss'] / MIB:.0f} MiB")
        print(f"  WKD: {ours[0]:.0f} req/s p99 {ours[1]:.2f} ms "
              f"({verdict(ours[1], TARGETS['p99 (ms)'])}) vs nginx {theirs[0]:.0f} req/s "
              f"p99 {theirs[1]:.2f} ms: {ratios[len(ratios) // 2]:.2f}x (median of rounds)")
        for label, watcher in streams.items():
            lag = max(watcher.seen["consumer"], default=float("inf"))
            fresh = max(watcher.seen["responder"], default=float("inf"))
            print(f"  {args.rate:.0f} publications/s, {label}: freshness max "
                  f"{fresh * 1000:.0f} ms ({verdict(fresh, TARGETS['freshness'])}); lag "
                  f"provider 1 -> consumer max {lag * 1000:.0f} ms "
                  f"({verdict(lag, TARGETS['lag'])})")
    finally:
        if nginx is not None:
            terminate(nginx.pid, "nginx")
            nginx.wait()
        if wkd is not None:
            wkd.stop()
        for server in servers:
            server.close()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
