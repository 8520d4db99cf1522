"""One fuzz target under atheris: `python -m fuzz.worker TARGET OUT [libFuzzer arguments]`.

The target's modules (and the stdlib parsers it leans on) are instrumented for coverage.
Every input goes through `harness.call`; a crash or slow input is saved under OUT
(`crash-<signature>.bin` and `.txt`, at most three inputs per signature; `slow-…`) and
fuzzing goes on, so one run counts every distinct crash. OUT/stats.json holds the counts,
rewritten at least once a second and on every finding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import atheris

from fuzz import harness

# Beyond milter_wkd: the stdlib parsers a target hands hostile bytes to.
INSTRUMENT = {"wks": ("email",), "config": ("tomllib",), "autocrypt": ("email",)}
PER_SIGNATURE = 3


class Recorder:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.execs = self.crashes = self.slow = 0
        self.slowest = 0.0
        self.signatures: list[str] = []
        self.saved: dict[str, int] = {}
        self.written = 0.0

    def record(self, data: bytes, finding: harness.Finding | None, elapsed: float) -> None:
        self.execs += 1
        changed = elapsed > self.slowest and elapsed > 0.1
        self.slowest = max(self.slowest, elapsed)
        if finding is not None:
            changed = True
            if finding.kind == "crash":
                self.crashes += 1
            else:
                self.slow += 1
            self._save(data, finding)
        now = time.monotonic()
        if changed or now - self.written > 1.0:
            self.write(now)

    def _save(self, data: bytes, finding: harness.Finding) -> None:
        key = f"{finding.kind}-{finding.name}"
        count = self.saved.get(key, 0)
        if finding.kind == "crash" and count == 0:
            self.signatures.append(finding.signature)
            print(f"\n=== CRASH {finding.signature}\n{finding.text}", file=sys.stderr, flush=True)
        if count >= PER_SIGNATURE:
            return
        self.saved[key] = count + 1
        digest = hashlib.sha1(data).hexdigest()[:12]  # noqa: S324
        (self.out / f"{key}-{digest}.bin").write_bytes(data)
        (self.out / f"{key}-{digest}.txt").write_text(
            f"{finding.signature} ({finding.seconds:.3f} s)\n{finding.text}")

    def write(self, now: float) -> None:
        self.written = now
        stats = {"execs": self.execs, "crashes": self.crashes, "slow": self.slow,
                 "slowest_seconds": self.slowest, "signatures": self.signatures}
        temporary = self.out / "stats.json.tmp"
        temporary.write_text(json.dumps(stats))
        os.replace(temporary, self.out / "stats.json")


def main() -> None:
    name, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    # Targets feed the code millions of refused inputs, each of which it rightly logs: in
    # the fuzzing process that is noise (and time). Set here, not in a target module, so
    # importing a target (as tests/unit/test_fuzz.py does) leaves logging alone.
    logging.getLogger("milter_wkd").setLevel(logging.CRITICAL)
    with atheris.instrument_imports(include=["milter_wkd", *INSTRUMENT.get(name, ())]):
        target = harness.load(name)
    recorder = Recorder(out)
    recorder.write(time.monotonic())

    def one(data: bytes) -> None:
        start = time.perf_counter()
        finding = harness.call(target, data)
        recorder.record(data, finding, time.perf_counter() - start)

    atheris.Setup([sys.argv[0], *sys.argv[3:]], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
