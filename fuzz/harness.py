"""What every fuzz target shares: the target registry and the call that classifies an input.

`call` runs a target on one input and returns None, or a `Finding` when the target raised
anything outside its `ALLOWED` exceptions (a crash) or took longer than SLOW_SECONDS.
"""

from __future__ import annotations

import hashlib
import importlib
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import cast

TARGETS = ("packets", "armor", "clean_key", "revocation", "wks", "autocrypt", "web", "config")
SLOW_SECONDS = 1.0


def load(name: str) -> ModuleType:
    if name not in TARGETS:
        raise SystemExit(f"unknown fuzz target {name!r} (known: {', '.join(TARGETS)})")
    return importlib.import_module(f"fuzz.targets.{name}")


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str  # "crash" or "slow"
    signature: str  # crash: exception type and the innermost frame of ours; slow: ""
    seconds: float
    text: str  # traceback, or a one-line note

    @property
    def name(self) -> str:
        return hashlib.sha1(self.signature.encode()).hexdigest()[:12]  # noqa: S324


def _signature(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "milter_wkd" in f.filename] or frames
    where = f"{ours[-1].filename.rsplit('/', 2)[-1]}:{ours[-1].lineno}" if ours else "?"
    return f"{type(exc).__name__} at {where}"


def call(target: ModuleType, data: bytes) -> Finding | None:
    one_input = cast(Callable[[bytes], None], target.one_input)
    allowed = cast(tuple[type[BaseException], ...], target.ALLOWED)
    start = time.perf_counter()
    try:
        one_input(data)
    except allowed:
        pass
    except Exception as exc:  # noqa: BLE001 - every other exception is the finding
        return Finding("crash", _signature(exc), time.perf_counter() - start,
                       "".join(traceback.format_exception(exc)))
    elapsed = time.perf_counter() - start
    if elapsed > SLOW_SECONDS:
        return Finding("slow", "", elapsed, f"{elapsed:.3f} s")
    return None


def seeds(target: ModuleType) -> Iterator[tuple[str, bytes]]:
    yield from cast(Callable[[], Iterator[tuple[str, bytes]]], target.seeds)()
