"""The self-service page under concurrent users, and the WKD responder while it is busy
(not a test).

Setup, all on this machine and loopback: a sandbox (milter_wkd.sandbox: slapd, Dovecot,
milter, Postfix, the WKD responder with 1 worker, `milter-wkd portal` with the [portal]
defaults of 1 worker x 4 threads), with the page's password rate limits lifted for the
run (MILTER_WKD_PORTAL_RATE_PER_* in the environment the sandbox starts it with: every
user here signs in from 127.0.0.1, and the limits are what they are for), --users users
userN@example.org (password userN-secret) added to its directory, and one gpg key per user
(ed25519 + cv25519, benchmarks/_common.KeyRing).

1. Latency at the server: for each N in --concurrency, N threads, each a user of its own
   with a session of its own (a new `PortalClient`: cookies, the CSRF token parsed from the
   form, the page's Origin, as a browser), each round GET /sign-in, then the timed POST
   /sign-in (the page finds the entry with its service account and binds as the user on a
   new LDAP connection), GET /keys, then the timed POST /upload of the user's armored key
   (clean, ownership, merge with the published copy, LDAP write). Timed over a TLS
   connection already open (keep-alive), so no handshake is in the figure. Prints p50/p99
   of each and the completed operations per second.
2. WKD while the page is busy: the responder against nginx serving the same keys as static
   files (benchmarks/wkd.py's machinery: gpg-wks-server's layout, same certificate, wrk
   with keep-alive over every user's path plus 10 % misses), in --rounds rounds (short
   runs, because the load of this shared machine drifts within minutes), each with the
   page idle, then with --load-users users in a loop throughout, once signing in only
   (the CPU the page and its clients take) and once signing in and publishing (each
   publication is an LDAP write that the responder's mirror follows, and that makes it
   forget the answers it remembered). Prints req/s, p99 and the server's CPU time per
   request (its process group, from /proc) of both, the ratio to nginx (median of the
   rounds' ratios) in each condition, and the sessions per second the page completed
   meanwhile.

The load generators share the 2 cores with the servers (and with everybody else on this
shared machine): read the ratios, not the absolute figures.
Run: unshare -n sh -c 'ip link set lo up && .venv/bin/python benchmarks/portal.py'
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import KeyRing, address, clock, password, users_ldif  # noqa: E402
from wkd import (  # noqa: E402
    LUA,
    check_same_answers,
    group_cpu_seconds,
    start_nginx,
    write_static,
    wrk,
)

from milter_wkd.check.portal import PortalClient  # noqa: E402
from milter_wkd.sandbox import Sandbox  # noqa: E402
from milter_wkd.sandbox.daemons import LOOPBACK, free_port, terminate  # noqa: E402
from milter_wkd.values import Address  # noqa: E402
from milter_wkd.wkd import address_hash  # noqa: E402

HOST = "openpgpkey.example.org"


class Portal:
    """How every simulated browser reaches the sandbox's page."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.url = sandbox.portal.portal_url
        self.ca_file = str(sandbox.portal.ca_file)
        self.connect = (LOOPBACK, sandbox.portal.port)

    def client(self) -> PortalClient:
        return PortalClient(self.url, ca_file=self.ca_file, connect=self.connect, timeout=60)


def one_round(portal: Portal, index: int, armored: str, *, publish: bool = True,
              ) -> tuple[float, float]:
    """A new session for user index: sign in, publish the key (unless told not to: then
    the key page is only looked at); seconds of the two POSTs (0.0 for no publication)."""
    with portal.client() as client:
        token = client.request("GET", "sign-in").token()
        started = clock()
        answer = client.request("POST", "sign-in", fields={
            "csrf_token": token or "", "address": address(index),
            "password": password(index)})
        signed_in = clock() - started
        if answer.status != 303:
            raise RuntimeError(f"sign-in of {address(index)}: {answer.status}")
        token = client.request("GET", "keys").token()
        if not publish:
            return signed_in, 0.0
        started = clock()
        answer = client.request("POST", "upload", fields={"csrf_token": token or "",
                                                          "key_text": armored})
        published = clock() - started
        if answer.status != 200:
            raise RuntimeError(f"upload of {address(index)}: {answer.status} "
                               f"{answer.text[:300]}")
        return signed_in, published


def in_threads(count: int, work: Callable[[int], None]) -> None:
    """work(0..count-1), each in a thread of its own; the first error is raised."""
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            work(n)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def latency(portal: Portal, keys: list[str], users: int, samples: int,
            ) -> tuple[list[float], list[float], float]:
    """`users` concurrent users, about `samples` rounds in all; (sign-in seconds, publish
    seconds, wall-clock seconds)."""
    rounds = max(1, math.ceil(samples / users))
    signs: list[float] = []
    publishes: list[float] = []
    lock = threading.Lock()

    def user(n: int) -> None:
        for _ in range(rounds):
            signed_in, published = one_round(portal, n, keys[n])
            with lock:
                signs.append(signed_in)
                publishes.append(published)

    started = clock()
    in_threads(users, user)
    return signs, publishes, clock() - started


class Load:
    """--load-users users signing in and publishing in a loop until stopped (indices from
    `first`, so that they are not the users of anything else running)."""

    def __init__(self, portal: Portal, keys: list[str], users: int, first: int, *,
                 publish: bool) -> None:
        self.publish = publish
        self.done = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(portal, first + n, keys),
                                          daemon=True) for n in range(users)]

    def _run(self, portal: Portal, index: int, keys: list[str]) -> None:
        while not self._stop.is_set():
            try:
                one_round(portal, index, keys[index], publish=self.publish)
            except BaseException as exc:  # noqa: BLE001 - reported after the run
                self.errors.append(exc)
                return
            with self._lock:
                self.done += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=64,
                        help="directory users with keys (at least max(concurrency) + "
                             "load users)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--samples", type=int, default=128,
                        help="sign-ins (and as many publications) per concurrency level")
    parser.add_argument("--load-users", type=int, default=8,
                        help="users signing in and publishing during the loaded WKD rounds")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=7,
                        help="rounds, each a wrk run per server and condition")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    args = parser.parse_args()
    if args.users < max(*args.concurrency, args.load_users):
        parser.error("--users must cover the largest concurrency and --load-users")
    # Every simulated user comes from 127.0.0.1: lift the page's password rate limits for
    # the page the sandbox starts (the environment overrides its config file's [portal]).
    os.environ["MILTER_WKD_PORTAL_RATE_PER_CLIENT"] = "100000000"
    os.environ["MILTER_WKD_PORTAL_RATE_PER_ACCOUNT"] = "100000000"
    with tempfile.TemporaryDirectory(prefix="portal-bench-") as tmp_name:
        tmp = Path(tmp_name)
        ring = KeyRing(tmp / "gnupg")
        sandbox = Sandbox()
        nginx: subprocess.Popen[bytes] | None = None
        try:
            sandbox.start()
            sandbox.slapd.ldapmodify(users_ldif(range(args.users)), add=True)
            fingerprints = ring.generate([address(i) for i in range(args.users)])
            armored = [ring.run("--armor", "--export", fingerprints[address(i)]).decode()
                       for i in range(args.users)]
            binary = {address(i): ring.run("--export", fingerprints[address(i)])
                      for i in range(args.users)}
            portal = Portal(sandbox)
            # Every user's key published once (and the page warmed up) before measuring.
            in_threads(8, lambda n: [one_round(portal, i, armored[i])
                                     for i in range(n, args.users, 8)])
            print(f"portal: {portal.url} (1 worker x 4 threads, the [portal] defaults); "
                  f"{os.cpu_count()} CPUs shared by the servers and the load generators")
            print(f"{'users':>5}  {'sign-in p50':>11}  {'p99':>8}  {'publish p50':>11}  "
                  f"{'p99':>8}  {'rounds/s':>8}  samples")
            for users in args.concurrency:
                signs, publishes, wall = latency(portal, armored, users, args.samples)
                print(f"{users:>5}  {percentile(signs, .5) * 1000:8.1f} ms  "
                      f"{percentile(signs, .99) * 1000:5.1f} ms  "
                      f"{percentile(publishes, .5) * 1000:8.1f} ms  "
                      f"{percentile(publishes, .99) * 1000:5.1f} ms  "
                      f"{len(signs) / wall:8.1f}  {len(signs)}", flush=True)

            # WKD: the responder against nginx's static files, page idle, then busy.
            wkd = sandbox.wkd
            write_static(tmp / "wks", binary, wkd.submission_address)
            nginx_port = free_port()
            nginx = start_nginx(tmp / "nginx", nginx_port, wkd.workdir / "wkd.crt",
                                wkd.workdir / "wkd.key", tmp / "wks", 1)
            paths = [f"/.well-known/openpgpkey/example.org/hu/{address_hash(Address.parse(a))}"
                     for a in binary]
            paths += [f"/.well-known/openpgpkey/example.org/hu/"
                      f"{address_hash(Address.parse(f'nobody{n}@example.org'))}"
                      for n in range(max(1, len(binary) // 9))]
            random.Random(1).shuffle(paths)  # noqa: S311 (a fixed order)
            (tmp / "paths.txt").write_text("\n".join(paths) + "\n")
            script = tmp / "wkd.lua"
            script.write_text(LUA.format(paths=tmp / "paths.txt", host=HOST))
            check_same_answers(wkd, nginx_port, binary)
            servers = (("nginx", nginx_port), ("responder", wkd.port))
            assert wkd.pid is not None
            # Server CPU per request (their process groups, from /proc): steadier than
            # req/s on a machine whose other load drifts.
            groups = {"nginx": nginx.pid, "responder": os.getpgid(wkd.pid)}
            for _name, port in servers:
                wrk(port, script, threads=args.threads, connections=args.connections,
                    duration=2)
            # (condition, load users, publish): CPU taken by the page and its clients alone
            # (sign-ins), then with an LDAP write per round that the responder follows.
            conditions = (("page idle", 0, False),
                          (f"{args.load_users} users signing in", args.load_users, False),
                          (f"{args.load_users} users signing in + publishing",
                           args.load_users, True))
            results: dict[str, dict[str, list[tuple[float, float, float]]]] = {
                condition: {name: [] for name, _ in servers} for condition, _, _ in conditions}
            sessions = dict.fromkeys(results, 0)
            seconds = dict.fromkeys(results, 0.0)
            # Each round runs every condition, nginx then the responder, so that the drift
            # of this shared machine's load hits the conditions and the servers alike.
            for round_ in range(args.rounds):
                for condition, load_users, publish in conditions:
                    load = Load(portal, armored, load_users,
                                first=args.users - args.load_users, publish=publish)
                    with load:
                        started = clock()
                        for name, port in servers:
                            before = group_cpu_seconds(groups[name])
                            rps, p99, _out = wrk(port, script, threads=args.threads,
                                                 connections=args.connections,
                                                 duration=args.duration)
                            cpu = ((group_cpu_seconds(groups[name]) - before)
                                   / (rps * args.duration) * 1e6)
                            results[condition][name].append((rps, p99, cpu))
                            print(f"round {round_ + 1}, {condition}: {name:9} {rps:9.0f} "
                                  f"req/s  p99 {p99:6.2f} ms  CPU {cpu:5.1f} us/request",
                                  flush=True)
                        seconds[condition] += clock() - started
                        sessions[condition] += load.done
                    if load.errors:
                        raise load.errors[0]
            rates = {condition: sessions[condition] / seconds[condition]
                     for condition in results}
            print()
            print(f"{'WKD, ' + str(len(paths)) + ' paths (90 % hits)':42}  {'nginx':>22}  "
                  f"{'responder':>22}  {'page':>7}  ratio (rounds)")
            for condition, runs in results.items():
                ratios = sorted(ours[0] / theirs[0] for ours, theirs in
                                zip(runs["responder"], runs["nginx"], strict=True))
                cells = []
                for name in ("nginx", "responder"):
                    rps = statistics.median(r[0] for r in runs[name])
                    p99 = statistics.median(r[1] for r in runs[name])
                    cpu = statistics.median(r[2] for r in runs[name])
                    cells.append(f"{rps:6.0f} {p99:6.2f}ms {cpu:4.1f}us")
                print(f"{condition:42}  {cells[0]:>22}  {cells[1]:>22}  "
                      f"{rates[condition]:5.1f}/s  {statistics.median(ratios):.2f}x ("
                      + ", ".join(f"{r:.2f}" for r in ratios) + ")")
            print(f"page: rounds (sessions) per second the load users completed; "
                  f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s "
                  f"x {args.rounds} rounds, 1 worker each (req/s, p99 and server CPU per "
                  "request: medians)")
        finally:
            if nginx is not None:
                terminate(nginx.pid, "nginx")
                nginx.wait()
            sandbox.stop()
            ring.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
