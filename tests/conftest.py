"""Shared fixtures. Real peers only; see tests/support."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gnupg import GnuPG


@pytest.fixture
def gnupg(tmp_path: Path) -> Iterator[GnuPG]:
    """A fresh GnuPG home for one test."""
    with GnuPG(tmp_path / "gnupg") as gpg:
        yield gpg
