"""plan_claims: who may hold a piece of key material (#11 item 1), as a pure decision."""

from __future__ import annotations

import pytest

from milter_wkd.store.model import CLAIM_IN_FLIGHT, Claim, ClaimKind, Holdings, plan_claims

ALICE = "uid=alice,ou=people,dc=example,dc=org"
BOB = "uid=bob,ou=people,dc=example,dc=org"
F = "AB" * 20
NOW = 1_800_000_000
OLD = NOW - 10 * CLAIM_IN_FLIGHT


def holdings(claim: Claim | None = None, held_by: tuple[tuple[str, bool], ...] = ()) -> Holdings:
    return Holdings(frozenset({F}), {F: claim} if claim else {}, {F: held_by} if held_by else {})


def test_unclaimed_material_is_claimed() -> None:
    plan = plan_claims(ALICE, {F: ClaimKind.SUBKEY}, holdings(), NOW)
    assert plan.add == {F: ClaimKind.SUBKEY}
    assert (plan.take, plan.drop, plan.conflict) == ({}, {}, None)


def test_own_claim_changes_only_its_kind() -> None:
    mine = Claim(F, ALICE.upper().replace(",", ", "), ClaimKind.SUBKEY, OLD)
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
    claim = Claim(F, BOB, theirs, OLD)
    held = ((BOB, theirs is ClaimKind.PRIMARY),)
    plan = plan_claims(ALICE, {F: mine}, holdings(claim, held), NOW)
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
    fresh = Claim(F, BOB, ClaimKind.PRIMARY, NOW - 5)
    busy = plan_claims(ALICE, {F: ClaimKind.PRIMARY}, holdings(fresh), NOW)
    assert busy.busy is not None
    assert "right now" in busy.busy
    assert busy.conflict is None
    leftover = Claim(F, BOB, ClaimKind.PRIMARY, NOW - CLAIM_IN_FLIGHT - 1)
    plan = plan_claims(ALICE, {F: ClaimKind.SUBKEY}, holdings(leftover), NOW)
    assert plan.take == {F: (leftover, ClaimKind.SUBKEY)}
    assert plan.displace == []  # nobody holds it: nothing to strip


def test_material_published_before_claims_existed_counts_as_held() -> None:
    as_primary = plan_claims(ALICE, {F: ClaimKind.PRIMARY}, holdings(None, ((BOB, True),)), NOW)
    assert as_primary.conflict is not None
    as_subkey = plan_claims(ALICE, {F: ClaimKind.PRIMARY}, holdings(None, ((BOB, False),)), NOW)
    ((claim, kind),) = as_subkey.take.values()
    assert (claim.holder, claim.recorded, kind) == (BOB, False, ClaimKind.PRIMARY)
    assert as_subkey.displace == [(BOB, F)]


def test_a_claim_renamed_away_does_not_hide_the_real_holder() -> None:
    """The claim names an entry that holds nothing of it (renamed, say) while another entry
    does: that entry is the holder, and an unproven subkey cannot take its material."""
    carol = "uid=carol,ou=people,dc=example,dc=org"
    stale = Claim(F, BOB, ClaimKind.PRIMARY, OLD)
    plan = plan_claims(ALICE, {F: ClaimKind.SUBKEY}, holdings(stale, ((carol, True),)), NOW)
    assert plan.take == {}
    assert list(plan.drop) == [F]
    proven = plan_claims(ALICE, {F: ClaimKind.PRIMARY}, holdings(stale, ((carol, True),)), NOW)
    assert proven.conflict is not None


def test_an_own_claim_on_material_not_held_yet_is_swapped_not_assumed() -> None:
    """Re-publishing material whose claim is ours but that our entry does not hold: the
    claim is compare-and-swapped, so a concurrent takeover of the leftover cannot also win."""
    mine = Claim(F, ALICE, ClaimKind.SUBKEY, NOW - 5)
    plan = plan_claims(ALICE, {F: ClaimKind.SUBKEY}, holdings(mine), NOW)
    assert plan.own == {F: (mine, ClaimKind.SUBKEY)}
