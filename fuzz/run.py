"""Run the fuzz targets, each in its own process, and report per target: executions,
executions per second, crashes, slow inputs (over a second), the slowest input and the peak
memory (max RSS of the process).

    python -m fuzz.run [--seconds S | --runs N] [--seed N] [--out DIR] [--json FILE] [TARGET...]

Each target starts from a copy of its committed corpus (fuzz/corpus/<target>; new inputs
stay in the run's folder). Findings are kept under DIR/<target>/findings (input and
traceback); DIR is a fresh temporary folder unless given, removed when nothing was found.
libFuzzer's own -timeout (30 s) stops a hung input; that and any other abnormal end of a
worker (out of memory, a signal) count as a crash. Exit status 1 when anything was found.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fuzz import harness
from fuzz.seeds import CORPUS

ROOT = CORPUS.parent.parent
HANG_SECONDS = 30
RSS_LIMIT_MB = 2048


@dataclass
class Result:
    target: str
    execs: int = 0
    execs_per_second: int = 0
    seconds: float = 0.0
    crashes: int = 0
    slow: int = 0
    slowest_ms: float = 0.0
    peak_rss_mb: float = 0.0
    corpus: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.crashes or self.slow or self.problems)


def _stat(log: str, name: str) -> int:
    found = re.findall(rf"^stat::{name}:\s+(\d+)", log, re.MULTILINE)
    return int(found[-1]) if found else 0


def run_target(name: str, folder: Path, limit: list[str], seed: int | None) -> Result:
    corpus, findings = folder / "corpus", folder / "findings"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(CORPUS / name, corpus)
    command = [sys.executable, "-m", "fuzz.worker", name, str(findings), str(corpus),
               "-print_final_stats=1", f"-timeout={HANG_SECONDS}",
               f"-rss_limit_mb={RSS_LIMIT_MB}", *limit]
    if seed is not None:
        command.append(f"-seed={seed}")
    log_path = folder / "fuzz.log"
    started = time.monotonic()
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL,
                                   stdout=log_file, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    result = Result(name, seconds=round(time.monotonic() - started, 1),
                    peak_rss_mb=round(usage.ru_maxrss / 1024, 1))
    log = log_path.read_text(errors="replace")
    result.execs = _stat(log, "number_of_executed_units")
    result.execs_per_second = _stat(log, "average_exec_per_sec")
    stats_path = findings / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    result.crashes = int(stats.get("crashes", 0))
    result.slow = int(stats.get("slow", 0))
    result.slowest_ms = round(float(stats.get("slowest_seconds", 0.0)) * 1000, 1)
    result.execs = result.execs or int(stats.get("execs", 0))
    result.corpus = len(list(corpus.iterdir()))
    result.problems = [f"crash: {s}" for s in stats.get("signatures", [])]
    if process.returncode != 0:
        reasons = re.findall(r"^(?:==\d+== ?)?(ERROR: libFuzzer: .*|ALARM: .*|.*Error: .*)$",
                             log, re.MULTILINE)
        result.problems.append(f"worker ended with status {process.returncode}: "
                               f"{reasons[0] if reasons else 'see ' + str(log_path)}")
    return result


def table(results: list[Result]) -> str:
    lines = ["| target | executions | exec/s | crashes | slow > 1 s | slowest | peak RSS |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.target} | {r.execs:,} | {r.execs_per_second:,} | {r.crashes} | {r.slow} "
              f"| {r.slowest_ms:,.1f} ms | {r.peak_rss_mb:,.0f} MiB |" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.run",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", choices=[[], *harness.TARGETS], default=[],
                        metavar="TARGET", help=f"default: all ({', '.join(harness.TARGETS)})")
    parser.add_argument("--seconds", type=int,
                        default=int(os.environ.get("FUZZ_SECONDS", "60")),
                        help="time per target (default $FUZZ_SECONDS or 60)")
    parser.add_argument("--runs", type=int, help="executions per target instead of a time")
    parser.add_argument("--seed", type=int, help="libFuzzer's random seed")
    parser.add_argument("--out", type=Path, help="folder for corpora, logs and findings")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    limit = [f"-runs={args.runs}"] if args.runs else [f"-max_total_time={args.seconds}"]
    out = args.out or Path(tempfile.mkdtemp(prefix="milter-wkd-fuzz-"))
    results = []
    for name in args.targets or harness.TARGETS:
        result = run_target(name, out / name, limit, args.seed)
        results.append(result)
        print(f"{name}: {result.execs:,} executions in {result.seconds} s, "
              f"{'clean' if result.clean else '; '.join(result.problems) or 'slow inputs'}",
              flush=True)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    found = [r for r in results if not r.clean]
    if found:
        print(f"findings (inputs and tracebacks) under {out}/<target>/findings")
        return 1
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
