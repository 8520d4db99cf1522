"""Keys shared by the WKS unit tests: made by our own generator, one pair per module."""

from __future__ import annotations

import pytest

from milter_wkd.openpgp import messages
from milter_wkd.values import Address

SUBMISSION = Address.parse("key-submission@example.org")
USER = Address.parse("user@example.org")


@pytest.fixture(scope="module")
def service() -> messages.GeneratedKey:
    return messages.generate_submission_key(SUBMISSION)


@pytest.fixture(scope="module")
def user() -> messages.GeneratedKey:
    return messages.generate_submission_key(USER)
