"""WKD responder against nginx serving the same keys as static files (not a test).

Setup, all on this machine and loopback:
- a private slapd (milter_wkd.sandbox.slapd) with --users users u<n>@example.org, each with
  a published ed25519 key (benchmarks/wkd_memory.py makes them);
- `milter-wkd web` (granian, milter_wkd.sandbox.wkd.WkdResponder) reading it as cn=wkd;
- the SAME cleaned keys written as static files in gpg-wks-server's layout
  (<root>/<domain>/hu/<hash>, plus policy) and served by a private nginx (-p/-c in a temp
  dir, never the system service) with the same certificate, TLS versions and
  Access-Control-Allow-Origin header;
- wrk over HTTPS with keep-alive, the same connections, threads and duration for both, and
  a Lua script that walks a shuffled list of every user's advanced-method path plus 10 %
  unknown addresses (90 % hits, 10 % misses), each thread from its own offset.
The responder's HKP look-up by address (`/pks/lookup?op=get&search=<addr>&exact=on`, the
same 90 % known addresses and 10 % unknown ones, the armored key of that one address) runs
beside them as a third run of each round, ours alone: nginx has no HKP.
Each server gets a warm-up run first (the responder's cache loads in the background).
Then --rounds rounds, each running nginx and then ours: prints requests/s, p99 latency and
the server's CPU time per request (its process group, from /proc) of each run, the medians,
and the ratio as the median of the rounds' ratios (a round's two runs see the same load
from the rest of this shared machine). The target is >= 0.9x nginx's requests/s with
p99 < 5 ms. Run: .venv/bin/python benchmarks/wkd.py [--users N --app-threads N ...]
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from wkd_memory import loaded_slapd, synthetic_key  # noqa: E402

from milter_wkd.config import DirectoryConfig  # noqa: E402
from milter_wkd.openpgp import armor_key, clean_key  # noqa: E402
from milter_wkd.reconcile import Reconciler  # noqa: E402
from milter_wkd.sandbox.daemons import free_port, terminate, wait_until  # noqa: E402
from milter_wkd.sandbox.slapd import Slapd  # noqa: E402
from milter_wkd.sandbox.wkd import WkdResponder  # noqa: E402
from milter_wkd.store.ldapstore import LdapStore  # noqa: E402
from milter_wkd.store.schema import key_digest  # noqa: E402
from milter_wkd.values import Address  # noqa: E402
from milter_wkd.web.routes import policy_text  # noqa: E402
from milter_wkd.wkd import address_hash  # noqa: E402

HOST = "openpgpkey.example.org"

NGINX_CONF = """\
user root;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    keepalive_timeout 60;
    keepalive_requests 10000000;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name {host} example.org;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location /.well-known/openpgpkey/ {{
            alias {root}/;
            default_type application/octet-stream;
            add_header Access-Control-Allow-Origin * always;
            add_header Cache-Control "public, max-age=300";
        }}
    }}
}}
"""

LUA = """\
local paths = {{}}
for line in io.lines("{paths}") do paths[#paths + 1] = line end
local counter = 0
function setup(thread)
    thread:set("id", counter)
    counter = counter + 1
end
local i = 0
function init(args)
    i = (id or 0) * 7919 % #paths
    wrk.headers["Host"] = "{host}"
end
function request()
    i = i % #paths + 1
    return wrk.format("GET", paths[i])
end
"""


def write_static(root: Path, keys: dict[str, bytes], submission: str) -> None:
    """gpg-wks-server's layout: <root>/<domain>/hu/<hash> and <root>/<domain>/policy."""
    hu = root / "example.org" / "hu"
    hu.mkdir(parents=True)
    for address, key in keys.items():
        addr = Address.parse(address)
        (hu / address_hash(addr)).write_bytes(clean_key(key, [addr]).key)
    (root / "example.org" / "policy").write_bytes(policy_text(
        submission, protocol_version=3, auth_submit=True, mailbox_only=True))


def start_nginx(prefix: Path, port: int, cert: Path, key: Path, root: Path,
                workers: int) -> subprocess.Popen[bytes]:
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, cert=cert, key=key, root=root,
                                      host=HOST, workers=workers))
    # Its own process group, so that its CPU time can be summed like the responder's.
    process = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(conf),
                                "-g", "daemon off;"], stdin=subprocess.DEVNULL,
                               start_new_session=True)
    wait_until((prefix / "nginx.pid").exists, "nginx", 10, prefix / "error.log")
    return process


def wrk(port: int, script: Path, *, threads: int, connections: int,
        duration: int) -> tuple[float, float, str]:
    """Requests/s and p99 latency (ms) of one wrk run."""
    proc = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency",
         "-s", str(script), f"https://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True)
    out = proc.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"\s99%\s+([\d.]+)(us|ms|s)\b", out).groups()  # type: ignore[union-attr]
    p99 = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    return rps, p99, out


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU time of every live process in a process group (Linux /proc)."""
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after "(comm)": state ppid pgrp ...
            ticks += int(fields[11]) + int(fields[12])  # utime stime
    return ticks / os.sysconf("SC_CLK_TCK")


def check_same_answers(wkd: WkdResponder, nginx_port: int, keys: dict[str, bytes]) -> None:
    """Both servers give the same bytes for a sample of addresses (and 404 for a miss)."""
    sample = random.Random(7).sample(sorted(keys), 20)  # noqa: S311 (a fixed sample)
    other = WkdResponder(wkd.workdir, wkd.slapd, port=nginx_port)
    for address in [*sample, "nobody-at-all@example.org"]:
        addr = Address.parse(address)
        path = f"/.well-known/openpgpkey/example.org/hu/{address_hash(addr)}"
        ours, theirs = wkd.get(path), other.get(path)
        assert ours[0] == theirs[0], (address, ours[0], theirs[0])
        assert ours[2] == theirs[2] or ours[0] != 200, address
        hkp = wkd.get(hkp_path(address))  # the same key, armored, over HKP
        assert hkp[0] == ours[0], (address, hkp[0], ours[0])


def hkp_path(address: str) -> str:
    return f"/pks/lookup?op=get&search={quote(address, safe='')}&exact=on"


def freshness(slapd: Slapd, wkd: WkdResponder, rounds: int = 5) -> list[float]:
    """Seconds from an administrator's ldapmodify that replaces u0's pgpKey until the
    responder serves it: the milter's key follower (milter_wkd.reconcile, run here as
    `milter-wkd milter` runs it, bound as cn=milter) checks the edit and writes what is
    derived from it; only then does the responder serve it."""
    address = Address.parse("u0@example.org")
    path = f"/.well-known/openpgpkey/example.org/hu/{address_hash(address)}"
    milter = slapd.service_accounts["milter"]
    store = LdapStore(DirectoryConfig(
        uri=slapd.uri, bind_dn=milter["dn"], bind_password=milter["password"],
        base_dn=slapd.people_dn, pending_base=slapd.pending_dn, claims_base=slapd.claims_dn,
        mail_attributes=list(slapd.mail_attributes), pool_size=2))
    follower = Reconciler(store)
    follower.start()
    delays = []
    try:
        for n in range(rounds):
            key = synthetic_key(f"User 0 renewed {n} <u0@example.org>")
            wanted = clean_key(key, [address]).key
            ldif = (f"dn: uid=u0,{slapd.people_dn}\n"
                    "changetype: modify\nreplace: pgpKey\n"
                    f"pgpKey:: {base64.b64encode(armor_key(key)).decode()}\n-\n")
            started = time.monotonic()
            slapd.ldapmodify(ldif)
            wait_until(lambda wanted=wanted: wkd.get(path)[2] == wanted, "the new key", 30)
            delays.append(time.monotonic() - started)
    finally:
        follower.stop()
        store.close()
    return delays


def freshness_direct(slapd: Slapd, wkd: WkdResponder, rounds: int = 10) -> list[float]:
    """Seconds from a write of an already checked key (pgpKey with its wkdKeyDigest in one
    modify, as the store publishes) until the responder serves it: the responder's own
    freshness, without the key follower's (milter_wkd.reconcile) poll in front. Watched
    every 5 ms."""
    address = Address.parse("u1@example.org")
    path = f"/.well-known/openpgpkey/example.org/hu/{address_hash(address)}"
    delays = []
    for n in range(rounds):
        key = synthetic_key(f"User 1 renewed {n} <u1@example.org>")
        wanted = clean_key(key, [address]).key
        armored = armor_key(key)
        ldif = (f"dn: uid=u1,{slapd.people_dn}\nchangetype: modify\nreplace: pgpKey\n"
                f"pgpKey:: {base64.b64encode(armored).decode()}\n-\nreplace: wkdKeyDigest\n"
                f"wkdKeyDigest: {key_digest(armored)}\n-\n")
        started = time.monotonic()
        slapd.ldapmodify(ldif)
        deadline = started + 30
        while wkd.get(path)[2] != wanted:
            if time.monotonic() > deadline:
                raise SystemExit("the responder did not serve a written key within 30 s")
            time.sleep(0.005)
        delays.append(time.monotonic() - started)
    return delays


def start_gunicorn(wkd: WkdResponder, port: int, workers: int) -> subprocess.Popen[bytes]:
    """The same app under gunicorn's threaded worker (the usual WSGI choice), same TLS."""
    env = {**os.environ, "MILTER_WKD_CONFIG": str(wkd.config_path),
           "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT))
                                         if p)}
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers",
         str(workers), "--threads", "4", "--keep-alive", "30", "--bind", f"127.0.0.1:{port}",
         "--certfile", str(wkd.workdir / "wkd.crt"), "--keyfile", str(wkd.workdir / "wkd.key"),
         "--log-level", "warning", "milter_wkd.web:wsgi_app()"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    other = WkdResponder(wkd.workdir, wkd.slapd, port=port)

    def answers() -> bool:
        try:
            return other.get("/.well-known/openpgpkey/example.org/policy")[0] == 200
        except OSError:
            return False

    wait_until(answers, "gunicorn", 60)
    time.sleep(5)  # let its workers mirror the directory (it logs elsewhere)
    return process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per server")
    parser.add_argument("--rounds", type=int, default=5, help="measured runs per server")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--workers", type=int, default=1,
                        help="granian workers and nginx worker processes")
    parser.add_argument("--app-threads", type=int, default=None,
                        help="[web] threads of the responder (default: the config's default)")
    parser.add_argument("--gunicorn", action="store_true",
                        help="also measure the app under gunicorn gthread (needs gunicorn "
                             "importable, e.g. pip install --target DIR gunicorn and "
                             "PYTHONPATH=DIR)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wkd-bench-") as tmp_name:
        tmp = Path(tmp_name)
        keys: dict[str, bytes] = {}
        slapd = loaded_slapd(tmp, args.users, keys)
        wkd = WkdResponder(tmp / "responder", slapd, port=free_port(), workers=args.workers,
                           threads=args.app_threads)
        nginx: subprocess.Popen[bytes] | None = None
        gunicorn: subprocess.Popen[bytes] | None = None
        try:
            wkd.start()
            write_static(tmp / "wks", keys, wkd.submission_address)
            nginx_port = free_port()
            nginx = start_nginx(tmp / "nginx", nginx_port, wkd.workdir / "wkd.crt",
                                wkd.workdir / "wkd.key", tmp / "wks", args.workers)
            # Every worker logs once that its mirror of the directory is complete.
            wait_until(lambda: wkd.log_path.read_text().count("complete") >= args.workers,
                       "the responder's mirror", 600, wkd.log_path)
            paths = [f"/.well-known/openpgpkey/example.org/hu/{address_hash(Address.parse(a))}"
                     for a in keys]
            paths += [f"/.well-known/openpgpkey/example.org/hu/"
                      f"{address_hash(Address.parse(f'nobody{n}@example.org'))}"
                      for n in range(len(keys) // 9)]
            random.Random(1).shuffle(paths)  # noqa: S311 (a fixed order)
            (tmp / "paths.txt").write_text("\n".join(paths) + "\n")
            script = tmp / "wkd.lua"
            script.write_text(LUA.format(paths=tmp / "paths.txt", host=HOST))
            # HKP by address: the same mix of known and unknown addresses, in its own order.
            addresses = [*keys, *(f"nobody{n}@example.org" for n in range(len(keys) // 9))]
            random.Random(2).shuffle(addresses)  # noqa: S311 (a fixed order)
            (tmp / "hkp-paths.txt").write_text("\n".join(map(hkp_path, addresses)) + "\n")
            hkp_script = tmp / "hkp.lua"
            hkp_script.write_text(LUA.format(paths=tmp / "hkp-paths.txt", host=HOST))
            check_same_answers(wkd, nginx_port, keys)
            servers: tuple[tuple[str, int, Path], ...] = (
                ("nginx static", nginx_port, script), ("milter-wkd web", wkd.port, script),
                ("milter-wkd HKP", wkd.port, hkp_script))
            assert wkd.pid is not None
            groups = {"nginx static": nginx.pid, "milter-wkd web": os.getpgid(wkd.pid),
                      "milter-wkd HKP": os.getpgid(wkd.pid)}
            if args.gunicorn:
                gunicorn_port = free_port()
                gunicorn = start_gunicorn(wkd, gunicorn_port, args.workers)
                servers = (*servers, ("gunicorn gthread", gunicorn_port, script))
            for _name, port, lua in servers:
                wrk(port, lua, threads=args.threads, connections=args.connections,
                    duration=args.warmup)
            # Alternate the servers round by round, so that load from anything else on the
            # machine hits both alike; report the median round of each.
            runs: dict[str, list[tuple[float, float, str]]] = {
                name: [] for name, _, _ in servers}
            cpu: dict[str, list[float]] = {name: [] for name, _, _ in servers}
            for round_ in range(args.rounds):
                for name, port, lua in servers:
                    before = group_cpu_seconds(groups[name]) if name in groups else 0.0
                    run = wrk(port, lua, threads=args.threads,
                              connections=args.connections, duration=args.duration)
                    runs[name].append(run)
                    per_request = ""
                    if name in groups:
                        used = group_cpu_seconds(groups[name]) - before
                        cpu[name].append(used / (run[0] * args.duration) * 1e6)
                        per_request = f"   server CPU {cpu[name][-1]:5.1f} us/request"
                    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", run[2])
                    print(f"round {round_ + 1}: {name:16} {run[0]:10.0f} req/s   "
                          f"p99 {run[1]:7.2f} ms   non-2xx {non_2xx.group(1) if non_2xx else 0}"
                          + per_request)
            # Median requests/s and, separately, median p99 (one hiccup in one round does
            # not decide the latency figure).
            results = {name: (statistics.median(r[0] for r in found),
                              statistics.median(r[1] for r in found))
                       for name, found in runs.items()}
            for name, (rps, p99_ms) in results.items():
                median_cpu = sorted(cpu[name])[len(cpu[name]) // 2] if cpu[name] else 0.0
                print(f"median {name:16} {rps:10.0f} req/s   p99 {p99_ms:7.2f} ms"
                      + (f"   server CPU {median_cpu:5.1f} us/request" if cpu[name] else ""))
            # Each round runs the two back to back, so a round's ratio sees the same load
            # from the rest of the machine; the median of those ratios is the figure.
            paired = sorted(ours[0] / theirs[0] for ours, theirs in
                            zip(runs["milter-wkd web"], runs["nginx static"], strict=True))
            ratio = paired[len(paired) // 2]
            p99 = results["milter-wkd web"][1]
            print("ratio per round: " + ", ".join(f"{r:.2f}" for r in paired))
            print(f"ratio milter-wkd/nginx (median of the rounds): {ratio:.2f}x requests/s "
                  f"(target >= 0.90x: {'met' if ratio >= 0.9 else 'NOT met'}); "
                  f"milter-wkd p99 {p99:.2f} ms (target < 5 ms: "
                  f"{'met' if p99 < 5 else 'NOT met'})")
            delays = freshness(slapd, wkd)
            print("freshness (an admin's ldapmodify -> checked by the follower -> served): "
                  + ", ".join(f"{d * 1000:.0f} ms" for d in delays))
            direct = sorted(freshness_direct(slapd, wkd))
            print("freshness (a checked key written -> served; the responder alone, "
                  f"ldapmodify's own ~10 ms included): median {direct[len(direct) // 2] * 1000:.0f}"
                  f" ms, max {direct[-1] * 1000:.0f} ms ("
                  + ", ".join(f"{d * 1000:.0f}" for d in direct) + " ms)")
            print(f"HKP (ours alone, nginx has none): op=get&search=<addr>&exact=on over "
                  f"{len(addresses)} addresses (90 % published)")
            print(f"users {args.users}, {len(paths)} paths (90 % hits), wrk -t{args.threads} "
                  f"-c{args.connections} -d{args.duration}s x {args.rounds} rounds, "
                  f"{args.workers} worker(s) each, "
                  f"{os.cpu_count()} CPUs shared by server and wrk")
        finally:
            if nginx is not None:
                terminate(nginx.pid, "nginx")
                nginx.wait()
            if gunicorn is not None:
                gunicorn.terminate()
                gunicorn.wait()
            wkd.stop()
            slapd.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
