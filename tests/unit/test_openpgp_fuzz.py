"""Property tests: any input bytes give a cleaned key or `KeyRefused`, never anything else.

Inputs are random bytes, random text after an armor header line, and mutations of real
keys (bit flips, byte changes, truncations, splices, packet duplication, deletion and
reordering) of the vectors in tests/data. When cleaning succeeds, the output must consist of
packets of the input, verbatim, and cleaning it again must give it back unchanged.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milter_wkd import openpgp
from milter_wkd.errors import KeyRefused
from milter_wkd.openpgp import packets as pk
from milter_wkd.values import Address

DATA = Path(__file__).parent.parent / "data"
SEEDS = [
    (DATA / "vector-ed25519.pgp").read_bytes(),
    (DATA / "vector-rsa2048.pgp").read_bytes(),
    (DATA / "crafted-rich.pgp").read_bytes(),
    (DATA / "vector-ed25519.asc").read_bytes(),
]
ADDRESSES = [Address.parse(a) for a in (
    "alice@example.org", "alice@other.example", "vector@example.org",
    "vector@other.example", "rsa@example.org")]
NOW = 1_800_000_000
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def packets(data: bytes) -> list[bytes]:
    return [data[r.start : r.end] for r in pk.iter_packets(data)]


@st.composite
def mutated_keys(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "byte", "truncate", "splice", "insert", "delete",
                                   "duplicate-packet", "drop-packet", "swap-packets"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[at] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[at:]
        elif op == "splice":
            other = draw(st.sampled_from(SEEDS))
            start = draw(st.integers(0, len(other)))
            data[at:] = other[start : start + draw(st.integers(0, 400))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=40))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 40))]
        else:
            try:
                parts = packets(bytes(data))
            except KeyRefused:
                continue
            i = draw(st.integers(0, len(parts) - 1))
            j = draw(st.integers(0, len(parts) - 1))
            if op == "duplicate-packet":
                parts[j:j] = [parts[i]] * draw(st.integers(1, 20))
            elif op == "drop-packet":
                del parts[i]
            else:
                parts[i], parts[j] = parts[j], parts[i]
            data = bytearray(b"".join(parts))
    return bytes(data)


def check_clean(data: bytes) -> None:
    """Cleaning either refuses or returns packets of the input that clean to themselves."""
    try:
        result = openpgp.clean_key(data, ADDRESSES, now=NOW)
    except KeyRefused:
        return
    binary = pk.dearmor(data)[1] if pk.looks_armored(data) else data
    source = set(packets(binary))
    assert all(p in source for p in packets(result.key))
    assert openpgp.clean_key(result.key, ADDRESSES, now=NOW).key == result.key
    assert result.info.user_ids


def only_refusals(call: object, *args: object, **kw: object) -> None:
    with contextlib.suppress(KeyRefused):
        call(*args, **kw)  # type: ignore[operator]


@FUZZ
@given(st.binary(max_size=3000))
def test_random_bytes(data: bytes) -> None:
    check_clean(data)
    only_refusals(openpgp.inspect_key, data, now=NOW)


@FUZZ
@given(st.sampled_from(["PGP PUBLIC KEY BLOCK", "PGP PRIVATE KEY BLOCK", "PGP MESSAGE"]),
       st.text(max_size=600), st.binary(max_size=300))
def test_random_armor(label: str, text: str, tail: bytes) -> None:
    data = f"-----BEGIN {label}-----\n{text}".encode() + tail
    check_clean(data)
    check_clean(data + f"\n-----END {label}-----\n".encode())


@FUZZ
@given(mutated_keys(), st.sampled_from(SEEDS))
def test_mutated_keys(data: bytes, stored: bytes) -> None:
    check_clean(data)
    only_refusals(openpgp.inspect_key, data, now=NOW)
    only_refusals(openpgp.autocrypt_keydata, data, ADDRESSES[0], now=NOW)
    only_refusals(openpgp.merge_keys, stored, data, ADDRESSES, now=NOW)


@FUZZ
@given(st.integers(0, len(SEEDS[2]) - 1), st.binary(min_size=1, max_size=8))
def test_overwrites_in_the_rich_key(at: int, patch: bytes) -> None:
    seed = SEEDS[2]
    check_clean(seed[:at] + patch + seed[at + len(patch) :])


def test_the_seeds_clean() -> None:
    for seed in SEEDS:
        assert openpgp.clean_key(seed, ADDRESSES, now=NOW).key
