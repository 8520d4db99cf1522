"""The fuzz targets (fuzz/): every committed seed passes its target, the harness tells a
crash and a slow input from a refusal, and a CI-sized run of every target under atheris
(FUZZ_CI_RUNS executions each, fixed seed) finds nothing. `make fuzz` is the long run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fuzz import harness
from fuzz.seeds import CORPUS
from milter_wkd.errors import Refused

ROOT = Path(__file__).resolve().parent.parent.parent
CI_RUNS = int(os.environ.get("FUZZ_CI_RUNS", "10000"))


@pytest.mark.parametrize("name", harness.TARGETS)
def test_the_committed_seeds_pass(name: str) -> None:
    target = harness.load(name)
    seeds = sorted((CORPUS / name).iterdir())
    assert len(seeds) >= 5
    for path in seeds:
        assert harness.call(target, path.read_bytes()) is None, path


def _fake(behaviour: object) -> SimpleNamespace:
    return SimpleNamespace(one_input=behaviour, ALLOWED=(Refused,))


def test_the_harness_tells_crashes_from_refusals() -> None:
    def refuse(data: bytes) -> None:
        raise Refused("no")

    def crash(data: bytes) -> None:
        _ = data[10]

    assert harness.call(_fake(refuse), b"x") is None  # type: ignore[arg-type]
    finding = harness.call(_fake(crash), b"x")  # type: ignore[arg-type]
    assert finding is not None
    assert finding.kind == "crash"
    assert finding.signature.startswith("IndexError at ")
    assert "data[10]" in finding.text


def test_the_harness_reports_slow_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "SLOW_SECONDS", 0.01)
    finding = harness.call(_fake(lambda data: time.sleep(0.05)), b"x")  # type: ignore[arg-type]
    assert finding is not None
    assert finding.kind == "slow"


def test_a_ci_sized_run_of_every_target_finds_nothing(tmp_path: Path) -> None:
    report = tmp_path / "fuzz.json"
    done = subprocess.run(
        [sys.executable, "-m", "fuzz.run", "--runs", str(CI_RUNS), "--seed", "1",
         "--out", str(tmp_path / "out"), "--json", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert report.exists(), done.stdout + done.stderr
    results = {r["target"]: r for r in json.loads(report.read_text())}
    assert sorted(results) == sorted(harness.TARGETS)
    for name, result in results.items():
        assert result["execs"] >= CI_RUNS, (name, result)
        assert (result["crashes"], result["slow"], result["problems"]) == (0, 0, []), (
            name, result, done.stdout[-3000:])
    assert done.returncode == 0, done.stdout
