"""Finding real peer binaries: skip locally when one is missing, fail on CI (CI=true)."""

from __future__ import annotations

import os
import shutil

import pytest

ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_binary(name: str) -> str:
    """The path of a binary the test needs; skips (locally) or fails (CI) without it."""
    path = shutil.which(name) or (name if os.path.isabs(name) and os.access(name, os.X_OK)
                                  else None)
    if path is None:
        message = f"{name} is not installed (make test installs it)"
        if ON_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path
