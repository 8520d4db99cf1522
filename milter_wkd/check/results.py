"""What every probe of `milter-wkd check` returns: `CheckResult`, one line of the doctor's
answer, made by `ok`, `fail` and `skip`; `guarded` turns a probe's exception into one FAIL
line; `why` says an exception in words.

Reads no configuration; never raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from milter_wkd.errors import MilterWkdError
from milter_wkd.store import probe


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One line of the doctor's answer. ok: True passed, False failed, None skipped;
    warning: passed, but worth a look (does not fail the run)."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""
    warning: bool = False

    @property
    def label(self) -> str:
        if self.ok is None:
            return "skip"
        if not self.ok:
            return "FAIL"
        return "warn" if self.warning else "ok"


def why(exc: BaseException) -> str:
    """An exception in words: our errors' reason, an LDAP error's result name and slapd's
    text, else the first line of its message."""
    if isinstance(exc, MilterWkdError):
        return exc.reason
    described = probe.describe(exc)
    if described is not None:
        return described
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]


def ok(name: str, detail: str) -> CheckResult:
    return CheckResult(name, True, detail)


def warn(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, True, detail, fix, warning=True)


def fail(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, False, detail, fix)


def skip(name: str, detail: str) -> CheckResult:
    return CheckResult(name, None, detail)


def guarded(name: str, probing: Callable[[], Iterable[CheckResult]],
            ) -> Iterator[CheckResult]:
    """The results of probing(); an exception it raises becomes one FAIL line."""
    try:
        yield from probing()
    except Exception as exc:  # noqa: BLE001 - the doctor reports, never raises
        yield fail(name, f"unexpected error: {type(exc).__name__}: {why(exc)}",
                   "this is a bug in the check or an unusual setup; run with -vv")
