"""plan_claims: who may hold a piece of key material (#11 item 1), as a pure decision."""

from __future__ import annotations

import pytest

from milter_wkd.directory import CLAIM_IN_FLIGHT, Claim, ClaimKind, Holdings, plan_claims

ALICE = "uid=alice,ou=people,dc=example,dc=org"
BOB = "uid=bob,ou=people,dc=example,dc=org"
F = "AB" * 20
NOW = 1_800_000_000


def holdings(claim: Claim | None = None, held_by: tuple[tuple[str, bool], ...] = ()) -> Holdings:
    return Holdings(frozenset({F}), {F: claim} if claim else {}, {F: held_by} if held_by else {})


def test_unclaimed_material_is_claimed() -> None:
    plan = plan_claims(ALICE, {F: ClaimKind.SUBKEY}, holdings(), NOW)
    assert plan.add == {F: ClaimKind.SUBKEY}
    assert (plan.take, plan.drop, plan.conflict) == ({}, {}, None)


def test_own_claim_changes_only_its_kind() -> None:
    mine = Claim(F, ALICE.upper().replace(",", ", "), ClaimKind.SUBKEY, NOW)
    same = plan_claims(ALICE, {F: ClaimKind.SUBKEY}, holdings(mine, ((ALICE, False),)), NOW)
    assert (same.add, same.own, same.take) == ({}, {}, {})
    proven = plan_claims(ALICE, {F: ClaimKind.PROVEN_SUBKEY}, holdings(mine), NOW)
    assert proven.own == {F: (mine, ClaimKind.PROVEN_SUBKEY)}


@pytest.mark.parametrize(("theirs", "mine", "outcome"), [
    (ClaimKind.SUBKEY, ClaimKind.PRIMARY, "take"),
    (ClaimKind.SUBKEY, ClaimKind.PROVEN_SUBKEY, "take"),
    (ClaimKind.SUBKEY, ClaimKind.SUBKEY, "drop"),
    (ClaimKind.PRIMARY, ClaimKind.SUBKEY, "drop"),
    (ClaimKind.PROVEN_SUBKEY, ClaimKind.SUBKEY, "drop"),
    (ClaimKind.PRIMARY, ClaimKind.PRIMARY, "conflict"),
    (ClaimKind.PROVEN_SUBKEY, ClaimKind.PRIMARY, "conflict"),
    (ClaimKind.PRIMARY, ClaimKind.PROVEN_SUBKEY, "conflict"),
])
def test_material_another_entry_holds(theirs: ClaimKind, mine: ClaimKind, outcome: str) -> None:
    claim = Claim(F, BOB, theirs, NOW - 10 * CLAIM_IN_FLIGHT)
    plan = plan_claims(ALICE, {F: mine}, holdings(claim, ((BOB, theirs is ClaimKind.PRIMARY),)),
                       NOW)
    assert plan.add == {}
    if outcome == "take":
        assert plan.take == {F: (claim, mine)}
        assert plan.displace == [(BOB, F)]
    elif outcome == "drop":
        assert list(plan.drop) == [F]
        assert "another user" in plan.drop[F]
        assert plan.take == {}
    else:
        assert plan.conflict is not None
        assert "published by another user" in plan.conflict


def test_a_claim_whose_holder_does_not_hold_it_is_in_flight_then_a_leftover() -> None:
    claim = Claim(F, BOB, ClaimKind.PRIMARY, NOW - 5)
    fresh = plan_claims(ALICE, {F: ClaimKind.PRIMARY}, holdings(claim), NOW)
    assert fresh.conflict is not None
    assert "right now" in fresh.conflict
    old = Claim(F, BOB, ClaimKind.PRIMARY, NOW - CLAIM_IN_FLIGHT - 1)
    leftover = plan_claims(ALICE, {F: ClaimKind.SUBKEY}, holdings(old), NOW)
    assert leftover.take == {F: (old, ClaimKind.SUBKEY)}
    assert leftover.displace == []  # nobody holds it: nothing to strip


def test_material_published_before_claims_existed_counts_as_held() -> None:
    as_primary = plan_claims(ALICE, {F: ClaimKind.PRIMARY}, holdings(None, ((BOB, True),)), NOW)
    assert as_primary.conflict is not None
    as_subkey = plan_claims(ALICE, {F: ClaimKind.PRIMARY}, holdings(None, ((BOB, False),)), NOW)
    ((claim, kind),) = as_subkey.take.values()
    assert (claim.holder, claim.recorded, kind) == (BOB, False, ClaimKind.PRIMARY)
    assert as_subkey.displace == [(BOB, F)]
