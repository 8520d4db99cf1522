"""SMTP replies the milter can give, as types that make wrong codes impossible.

A `Reject` is always 5xx with a 5.x.x enhanced code, a `TempFail` always 4xx with 4.x.x
(RFC 3463); the text is sanitised to one printable line so nothing a client sent can inject
a reply line. `Discard` is for mail we consumed (a processed WKS message); `Accept` passes the
message on, with header edits when it has any.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

_LINE_BREAKS = re.compile(r"[\x00-\x1f\x7f]+")
_NOT_ASCII = re.compile(r"[^\x20-\x7e]")


def one_line(text: str, limit: int = 300) -> str:
    """A reply text: printable ASCII on one line, at most limit characters. Control
    characters (line breaks) become a space, anything else unprintable a "?"."""
    cleaned = _NOT_ASCII.sub("?", _LINE_BREAKS.sub(" ", text)).strip()
    return cleaned[:limit] or "-"


def milter_text(text: str) -> str:
    """A sanitised reply text as libmilter's smfi_setreply wants it: "%" doubled (it reads
    the text as a format, "a single '%' will cause the text to be ignored")."""
    return one_line(text).replace("%", "%%")


@dataclass(frozen=True, slots=True)
class Reject:
    code: Literal[550, 552, 553, 554]
    xcode: str
    text: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"5\.\d{1,3}\.\d{1,3}", self.xcode):
            raise ValueError(f"a reject needs a 5.x.x enhanced code, not {self.xcode}")
        # Every reply text passes here: whatever a client sent, quoted in a reason,
        # reaches the SMTP client as one line of printable ASCII.
        object.__setattr__(self, "text", one_line(self.text))


@dataclass(frozen=True, slots=True)
class TempFail:
    code: Literal[421, 450, 451, 452]
    xcode: str
    text: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"4\.\d{1,3}\.\d{1,3}", self.xcode):
            raise ValueError(f"a tempfail needs a 4.x.x enhanced code, not {self.xcode}")
        object.__setattr__(self, "text", one_line(self.text))


@dataclass(frozen=True, slots=True)
class Discard:
    reason: str


@dataclass(frozen=True, slots=True)
class HeaderEdit:
    """Add (value set, index None), insert at index, or delete (value None) a header."""

    name: str
    value: str | None
    index: int | None = None


@dataclass(frozen=True, slots=True)
class Accept:
    edits: tuple[HeaderEdit, ...] = field(default_factory=tuple)
    remove_recipients: tuple[str, ...] = field(default_factory=tuple)


Reply = Reject | TempFail | Discard | Accept

DIRECTORY_DOWN = TempFail(451, "4.7.1", "Key directory unavailable - try again later")
INTERNAL_ERROR = TempFail(451, "4.3.0", "Internal error in key service - try again later")
