"""Where the files milter-wkd ships beside its code are: `ldap/` (schemas, cn=config LDIF,
entries, example users), `postfix/` and `dovecot/` (configuration snippets), `systemd/`
(units) and `docs/` (the nginx configuration).

A checkout has them at its top, next to `milter_wkd/`; an installed wheel has them under
`<prefix>/share/milter-wkd/` (pyproject.toml's data files), where `<prefix>` is the
virtual environment or the Python installation (`sys.prefix`). `root()` looks in that
order; the sandbox, `milter-wkd files` and anything else that needs a shipped file go
through `path(kind)`.

Reads no configuration. Fails with `MilterWkdError` naming where it looked when the files
are in neither place (an installation without its data files).
"""

from __future__ import annotations

import sys
from pathlib import Path

from milter_wkd.errors import MilterWkdError

KINDS = ("ldap", "postfix", "dovecot", "systemd", "docs")
SHARE = Path("share") / "milter-wkd"


def _candidates() -> list[Path]:
    checkout = Path(__file__).resolve().parents[1]
    prefixes = dict.fromkeys(Path(p) for p in (sys.prefix, sys.base_prefix, "/usr/local", "/usr"))
    return [checkout, *(prefix / SHARE for prefix in prefixes)]


def root() -> Path:
    """The folder that holds ldap/, postfix/, dovecot/, systemd/ and docs/."""
    candidates = _candidates()
    for candidate in candidates:
        if (candidate / "ldap" / "schema").is_dir() and (candidate / "postfix").is_dir():
            return candidate
    raise MilterWkdError("the files milter-wkd ships (ldap/, postfix/, ...) are in none of "
                         + ", ".join(str(c) for c in candidates)
                         + ": reinstall the package (its data files were not installed)")


def path(kind: str) -> Path:
    """The folder of one kind of shipped file, e.g. path("ldap")."""
    if kind not in KINDS:
        raise MilterWkdError(f"no shipped files of kind {kind!r} (kinds: {', '.join(KINDS)})")
    return root() / kind
