"""Known answers and refusals for Address and Fingerprint."""

import pytest

from milter_wkd.errors import BadAddress, Refused
from milter_wkd.values import Address, Fingerprint, address_of_user_id, user_id_address


def test_address_normalises_domain_and_keeps_local_spelling() -> None:
    addr = Address.parse("Joe.Doe@Example.ORG")
    assert addr.local == "Joe.Doe"
    assert addr.domain == "example.org"
    assert addr.key == "joe.doe@example.org"
    assert str(addr) == "Joe.Doe@example.org"


@pytest.mark.parametrize("hostile", [
    "a*)(mail=*@example.org", "../../etc/passwd@example.org", "a@exa mple.org",
    "a\r\nb@example.org", "@example.org", "alice@", "alice", '"quoted"@example.org',
    "a@example", "a@-bad-.org", "x" * 65 + "@example.org", "a@b@example.org",
])
def test_hostile_addresses_are_refused(hostile: str) -> None:
    with pytest.raises(BadAddress):
        Address.parse(hostile)


def test_address_of_user_id() -> None:
    assert address_of_user_id("Alice <alice@example.org>") == Address("alice", "example.org")
    assert address_of_user_id("alice@example.org") == Address("alice", "example.org")
    assert address_of_user_id("Alice (laptop)") is None
    assert address_of_user_id("Alice <not an address>") is None


def test_fingerprint_forms() -> None:
    fpr = Fingerprint.parse("cfcb fba3 22bb 8776 90e8  0b1c 2cdd 1e2e eb3d 082b")
    assert fpr.hex == "CFCBFBA322BB877690E80B1C2CDD1E2EEB3D082B"
    assert fpr.key_id == "2CDD1E2EEB3D082B"
    assert fpr.short_key_id == "EB3D082B"
    with pytest.raises(Refused):
        Fingerprint.parse("1234")


# GnuPG reads the first <...> (common/mbox-util.c), we used to read the last: only user IDs
# from which every implementation reads the same single address have one.
@pytest.mark.parametrize(("user_id", "address", "why"), [
    ("Alice <alice@example.org>", "alice@example.org", None),
    ("alice@example.org", "alice@example.org", None),
    ("<alice@example.org>", "alice@example.org", None),
    ("Jörg Ünver (work) <joerg@example.org>", "joerg@example.org", None),
    ("Bob Baker <bob@example.org> <alice@example.org>", None, "more than one address"),
    ("bob@example.org <alice@example.org>", None, "more than one address"),
    ("Bob <bob@example.org> alice@example.org", None, "more than one address"),
    ("Bob <bob> <alice@example.org>", None, "one '<'"),
    ("Alice <alice@example.org> (old)", None, "one '<'"),
    ("Alice <alice@example.org>\0<bob@example.org>", None, "control characters"),
    ("Alice <alice@example.org>\n", None, "control characters"),
    ("alice@example.org.", None, "trailing dot"),
    ("Alice <alice @example.org>", None, "spaces"),
    ("Alice (laptop)", None, "no mail address"),
])
def test_user_id_address_only_when_unambiguous(user_id: str, address: str | None,
                                               why: str | None) -> None:
    if address is not None:
        assert str(user_id_address(user_id)) == address
        return
    with pytest.raises(BadAddress) as refused:
        user_id_address(user_id)
    assert why is not None
    assert why in refused.value.reason
    assert address_of_user_id(user_id) is None
