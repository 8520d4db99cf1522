"""Provenance.who: the actor as people read it (the self-service page shows it), without
the record a WKS publication keeps of its message (milter_wkd.submissions.actor)."""

from __future__ import annotations

import pytest

from milter_wkd import submissions
from milter_wkd.store.model import KeyOrigin, Provenance


@pytest.mark.parametrize("sent", [True, False])
def test_the_submission_record_is_not_shown(sent: bool) -> None:
    actor = submissions.actor("alice@example.org", "3f0c9a1e2b7d4c55", sent=sent)
    assert actor != "alice@example.org"
    assert Provenance(KeyOrigin.AUTH_SUBMIT, actor, 0).who == "alice@example.org"


@pytest.mark.parametrize("actor", [
    "alice@example.org", "root", "",
    "alice@example.org (submission 3f0c)",  # not a record: too short
    "x (submission 3f0c9a1e2b7d4c55) and more",  # not at the end
])
def test_other_actors_are_shown_as_they_are(actor: str) -> None:
    assert Provenance(KeyOrigin.ADMIN_IMPORT, actor, 0).who == actor
