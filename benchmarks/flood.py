"""Flood benchmark: `milter-wkd key clean` on a key carrying N third-party certifications,
against GnuPG on the same file.

The key is a real gpg-made ed25519/cv25519 key; each certification is a REAL v4 signature
(type 0x10 over the primary key and user ID, SHA-256, correct trailer) by its own throwaway
Ed25519 key, made here with `cryptography`, as an SKS flood would carry (150,000 ≈ 18 MB).
In one run it measures wall time and peak memory (ru_maxrss of each child, from wait4) of:

- milter-wkd key clean --address ADDR KEY -o /dev/null     (ours)
- gpg --list-packets KEY >/dev/null                          (the floor: framing only)
- gpg --import --import-options import-clean, fresh GNUPGHOME, on keys with only
  --import-n/2 and --import-n certifications, extrapolated to N linearly: a lower bound,
  since gpg's time grows faster than linearly (the two sizes show by how much; 150,000
  took 979 s here). `--import-n 150000` measures the real thing; --import-timeout caps it.

Targets: ours no slower than gpg --list-packets, at least 100x faster than the import,
under 100 MiB peak memory.

For the reader, it also measures `milter-wkd --help` (the command line's start-up: it
imports every command group), the core alone (`clean_key` in a Python process that imports
only milter_wkd.openpgp), and both tools on the ASCII-armored form of the same key.

How to run (from the repository root, after `make venv`):

    .venv/bin/python benchmarks/flood.py                  # N=150,000, import on 10,000 and 20,000
    .venv/bin/python benchmarks/flood.py --n 20000 --import-n 2000   # quick look
    .venv/bin/python benchmarks/flood.py --keep /tmp/flood.pgp       # keep the key file
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from milter_wkd.openpgp.packets import ARMOR_PUBLIC_KEY, armor
from milter_wkd.sandbox.flood import split_for_flood

ROOT = Path(__file__).resolve().parent.parent
ADDRESS = "target@example.org"
USER_ID = f"Flood Target <{ADDRESS}>"


# The target is made two years back, so that every certification is newer than it and
# older than now (gpg complains about each one otherwise, which would skew its figures).
KEY_AGE = 2 * 365 * 86400


def make_target(home: Path) -> bytes:
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    base = ["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", "",
            "--faked-system-time", str(int(time.time()) - KEY_AGE)]
    subprocess.run([*base, "--quick-gen-key", USER_ID, "ed25519", "cert", "5y"],
                   env=env, check=True, capture_output=True)
    out = subprocess.run(["gpg", "--with-colons", "--list-keys", ADDRESS], env=env,
                         check=True, capture_output=True, text=True).stdout
    fpr = next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))
    subprocess.run([*base, "--quick-add-key", fpr, "cv25519", "encr", "5y"],
                   env=env, check=True, capture_output=True)
    key = subprocess.run(["gpg", "--export", fpr], env=env, check=True,
                         capture_output=True).stdout
    subprocess.run(["gpgconf", "--kill", "all"], env=env, check=False)
    return key


@dataclass
class Figure:
    seconds: float
    max_rss_kib: int
    returncode: int
    timed_out: bool = False


GNU_TIME = "/usr/bin/time"


def measure(cmd: list[str], env: dict[str, str] | None = None, stdout: str = os.devnull,
            timeout: float | None = None) -> Figure:
    """Wall time and peak RSS of one command.

    The peak comes from GNU time (%M): it forks the command from its own small process.
    A child spawned straight from this Python process would report OUR peak instead, since
    Linux carries the pre-exec address space's high-water mark into ru_maxrss.
    """
    with tempfile.NamedTemporaryFile(prefix="flood-time-") as report, \
            Path(stdout).open("wb") as sink:
        began = time.perf_counter()
        proc = subprocess.Popen([GNU_TIME, "-f", "%M", "-o", report.name, *cmd], stdout=sink,
                                stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return Figure(time.perf_counter() - began, 0, -9, timed_out=True)
        elapsed = time.perf_counter() - began
        lines = Path(report.name).read_text().split()
    return Figure(elapsed, int(lines[-1]) if lines else 0, proc.returncode)


CORE_ONLY = """
import sys
from milter_wkd.openpgp import clean_key
from milter_wkd.values import Address
data = open(sys.argv[1], "rb").read()
clean_key(data, [Address.parse("target@example.org")])
"""


def best(figures: list[Figure]) -> Figure:
    return min(figures, key=lambda f: f.seconds)


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=150_000, help="certifications (150000)")
    parser.add_argument("--import-n", type=int, default=20_000,
                        help="certifications on the key given to gpg --import (20000)")
    parser.add_argument("--import-timeout", type=float, default=900,
                        help="seconds before the gpg import is stopped (900)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of the fast commands; the best is reported (3)")
    parser.add_argument("--keep", metavar="FILE", help="also write the flooded key here")
    args = parser.parse_args()
    for tool in ("gpg", "gpgconf", GNU_TIME):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    ours = ROOT / ".venv" / "bin" / "milter-wkd"
    ours_cmd = [str(ours)] if ours.exists() else [sys.executable, "-m", "milter_wkd.cli"]

    with tempfile.TemporaryDirectory(prefix="flood-") as tmp_name:
        tmp = Path(tmp_name)
        began = time.perf_counter()
        head, certs, tail = split_for_flood(make_target(tmp / "maker"), max(args.n, args.import_n))
        full = tmp / "flooded.pgp"
        full.write_bytes(head + b"".join(certs[: args.n]) + tail)
        small = tmp / "flooded-small.pgp"
        small.write_bytes(head + b"".join(certs[: args.import_n]) + tail)
        half = tmp / "flooded-half.pgp"
        half.write_bytes(head + b"".join(certs[: args.import_n // 2]) + tail)
        armored = tmp / "flooded.asc"
        armored.write_bytes(armor(ARMOR_PUBLIC_KEY, full.read_bytes()))
        if args.keep:
            shutil.copyfile(full, args.keep)
        print(f"built: {args.n} certifications, {full.stat().st_size / 2**20:.1f} MiB "
              f"({time.perf_counter() - began:.1f} s); import file: {args.import_n} "
              f"certifications, {small.stat().st_size / 2**20:.1f} MiB")
        del certs

        clean = [*ours_cmd, "key", "clean", "--address", ADDRESS, str(full),
                 "-o", os.devnull]
        check = subprocess.run([*ours_cmd, "key", "clean", "--stats", "--address", ADDRESS,
                                str(full), "-o", str(tmp / "clean.pgp")],
                               capture_output=True, text=True, check=False)
        if check.returncode != 0:
            print(f"milter-wkd failed: {check.stderr}")
            return 1
        stats = dict(line.split(": ") for line in check.stderr.splitlines())
        print(f"milter-wkd output: {(tmp / 'clean.pgp').stat().st_size} octets; "
              f"dropped third-party: {stats.get('dropped:third-party-signature')}, "
              f"kept self-signatures: {stats.get('kept:self-signature')}")
        mine = best([measure(clean) for _ in range(args.repeat)])
        listing = best([measure(["gpg", "--list-packets", str(full)])
                        for _ in range(args.repeat)])
        startup = best([measure([*ours_cmd, "--help"]) for _ in range(args.repeat)])
        core = best([measure([sys.executable, "-c", CORE_ONLY, str(full)])
                     for _ in range(args.repeat)])
        mine_armored = best([measure([*clean[:-3], str(armored), "-o", os.devnull])
                             for _ in range(args.repeat)])
        listing_armored = best([measure(["gpg", "--list-packets", str(armored)])
                                for _ in range(args.repeat)])

        imports = []
        for count, path in ((args.import_n // 2, half), (args.import_n, small)):
            home = tmp / f"importer-{count}"
            home.mkdir(mode=0o700)
            env = {**os.environ, "GNUPGHOME": str(home)}
            imports.append(measure(["gpg", "--batch", "--import", "--import-options",
                                    "import-clean", str(path)],
                                   env=env, timeout=args.import_timeout))
            subprocess.run(["gpgconf", "--kill", "all"], env=env, check=False)
        half_import, imported = imports

    scale = args.n / args.import_n
    import_full = imported.seconds * scale
    growth = imported.seconds / half_import.seconds

    def row(label: str, seconds: str, rss: str = "", note: str = "") -> None:
        print(f"{label:58} {seconds:>10} {rss:>12}{note}")

    row("command", "wall", "peak RSS")
    row(f"milter-wkd key clean (N={args.n})", f"{mine.seconds:.2f}s", mib(mine.max_rss_kib))
    row(f"gpg --list-packets >/dev/null (N={args.n})", f"{listing.seconds:.2f}s",
        mib(listing.max_rss_kib))
    row("milter-wkd --help (start-up alone: every command group)",
        f"{startup.seconds:.2f}s", mib(startup.max_rss_kib))
    row("core alone: clean_key() in a bare Python process", f"{core.seconds:.2f}s",
        mib(core.max_rss_kib))
    row("milter-wkd key clean, armored input", f"{mine_armored.seconds:.2f}s",
        mib(mine_armored.max_rss_kib))
    row("gpg --list-packets, armored input", f"{listing_armored.seconds:.2f}s",
        mib(listing_armored.max_rss_kib))
    row(f"gpg --import import-clean (N={args.import_n // 2}, measured)",
        f"{half_import.seconds:.2f}s", mib(half_import.max_rss_kib),
        " (STOPPED at the time cap)" if half_import.timed_out else "")
    row(f"gpg --import import-clean (N={args.import_n}, measured)",
        f"{imported.seconds:.2f}s", mib(imported.max_rss_kib),
        " (STOPPED at the time cap)" if imported.timed_out else "")
    row(f"gpg --import import-clean (N={args.n}, EXTRAPOLATED linearly)",
        f"{import_full:.1f}s", "", " (a lower bound)")
    print()
    print(f"ratio gpg --list-packets / milter-wkd: {listing.seconds / mine.seconds:.2f}x "
          f"(target >= 1)")
    print(f"ratio gpg --import (extrapolated, linear) / milter-wkd: "
          f"{import_full / mine.seconds:.0f}x (target >= 100)"
          + (" (a lower bound: the import hit the cap)" if imported.timed_out else ""))
    print(f"gpg --import time grew x{growth:.1f} from {args.import_n // 2} to {args.import_n} "
          f"certifications (linear would be x2): the linear extrapolation understates it")
    print(f"peak memory milter-wkd: {mib(mine.max_rss_kib)} (target < 100 MiB)")
    print(f"ratio gpg --list-packets / core alone: {listing.seconds / core.seconds:.2f}x; "
          f"armored: gpg / milter-wkd {listing_armored.seconds / mine_armored.seconds:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
