"""Transaction bodies: memory, then a temporary file, within a spool budget shared by all
messages; a body that does not fit is dropped and answered with 451 (#11 item 9)."""

from __future__ import annotations

from typing import Any, cast

import pytest

from milter_wkd import config as config_module
from milter_wkd.replies import TempFail
from milter_wkd.service import MailService
from milter_wkd.transaction import SpoolBudget, Transaction


def test_a_body_spills_to_a_file_within_the_budget_and_gives_it_back() -> None:
    budget = SpoolBudget(100)
    tx = Transaction()
    tx.add_body(b"a" * 10, 16, budget)
    assert tx.spill is None
    tx.add_body(b"b" * 60, 16, budget)
    assert tx.spill is not None
    assert budget.used == 60
    assert tx.raw_message().endswith(b"a" * 10 + b"b" * 60)
    tx.close()
    assert budget.used == 0


def test_a_body_over_the_budget_is_dropped_and_marked() -> None:
    budget = SpoolBudget(100)
    first, second = Transaction(), Transaction()
    first.add_body(b"x" * 80, 16, budget)
    with pytest.raises(OSError, match="spool budget"):
        second.add_body(b"y" * 40, 16, budget)
    assert second.body_lost
    assert second.body_size == 0
    second.add_body(b"z" * 10, 16, budget)  # the rest of it is not kept either
    assert second.body_size == 0
    second.close()
    first.close()
    assert budget.used == 0


def test_the_service_answers_451_for_a_body_it_could_not_keep() -> None:
    service = MailService(config_module.build({}, environ={}), cast(Any, None),
                          cast(Any, None))
    tx = Transaction(recipients=["key-submission@example.org"], body_lost=True)
    reply = service.decide(tx)
    assert isinstance(reply, TempFail)
    assert (reply.code, reply.xcode) == (451, "4.3.2")
