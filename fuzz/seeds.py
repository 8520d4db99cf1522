"""Write each target's seed corpus, made from the test fixtures, to fuzz/corpus/<target>/:
`python -m fuzz.seeds [TARGET...]`. The corpus is committed; re-run this when a target's
input format or its `seeds()` change (encrypted seeds differ on every run: random session
keys)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from fuzz import harness

CORPUS = Path(__file__).resolve().parent / "corpus"


def write(name: str) -> int:
    folder = CORPUS / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    count = 0
    for seed_name, data in harness.seeds(harness.load(name)):
        (folder / seed_name).write_bytes(data)
        count += 1
    return count


def main() -> None:
    for name in sys.argv[1:] or harness.TARGETS:
        print(f"{name}: {write(name)} seeds in {CORPUS / name}")


if __name__ == "__main__":
    main()
