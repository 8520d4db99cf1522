"""The shipped postfix/ and dovecot/ snippets: their headers document exactly the
placeholders they use, and rendering refuses anything left unfilled or unknown (so the
sandbox cannot quietly run something other than what an administrator copies)."""

from __future__ import annotations

from pathlib import Path

import pytest

from milter_wkd import files
from milter_wkd.sandbox.daemons import PLACEHOLDER, SandboxError, render

SNIPPETS = [files.path("postfix") / "main.cf", files.path("postfix") / "master.cf",
            files.path("dovecot") / "milter-wkd.conf",
            files.path("dovecot") / "dovecot-ldap.conf.ext"]


def _header_and_body(path: Path) -> tuple[list[str], list[str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    end = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    body = [line for line in lines[end:] if not line.lstrip().startswith("#")]
    return lines[:end], body


@pytest.mark.parametrize("path", SNIPPETS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_header_documents_exactly_the_placeholders_used(path: Path) -> None:
    header, body = _header_and_body(path)
    documented = {name for line in header for name in PLACEHOLDER.findall(line)}
    documented.discard("PLACEHOLDERS")
    used = {name for line in body for name in PLACEHOLDER.findall(line)}
    assert used, f"{path} has no placeholders"
    assert documented == used


@pytest.mark.parametrize("path", SNIPPETS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_render_fills_every_placeholder_and_keeps_the_comments(path: Path) -> None:
    header, body = _header_and_body(path)
    used = {name for line in body for name in PLACEHOLDER.findall(line)}
    rendered = render(path, {name: f"<{name.lower()}>" for name in used})
    assert rendered.splitlines()[:len(header)] == header
    live = [line for line in rendered.splitlines() if not line.lstrip().startswith("#")]
    assert not any(PLACEHOLDER.search(line) for line in live)
    for name in used:
        assert f"<{name.lower()}>" in rendered


def test_render_refuses_a_missing_or_an_unknown_value(tmp_path: Path) -> None:
    template = tmp_path / "x.cf"
    template.write_text("# @DOCUMENTED@ only\nname = @VALUE@\n")
    assert render(template, {"VALUE": "v"}) == "# @DOCUMENTED@ only\nname = v\n"
    with pytest.raises(SandboxError, match=r"without value \['VALUE'\]"):
        render(template, {})
    with pytest.raises(SandboxError, match=r"without placeholder \['OTHER'\]"):
        render(template, {"VALUE": "v", "OTHER": "o"})
