"""Keys an attacker can make without anyone else's secret: their own key with another
person's PUBLIC key material bound as an encryption subkey (a subkey binding needs only the
binder's signature; nothing proves who holds the subkey's secret). Built with the crafted
`Signer` of the unit tests, so the attacker's key is real and valid."""

from __future__ import annotations

from dataclasses import dataclass

from milter_wkd.openpgp.packets import iter_packets, new_header
from tests.unit.test_openpgp_crafted import T0, Signer, Subkey, user_id


@dataclass
class Borrowed:
    """Someone else's public key packet body, to be bound as a subkey."""

    body: bytes

    @property
    def packet(self) -> bytes:
        return new_header(14, len(self.body)) + self.body


def primary_body(key: bytes) -> bytes:
    """The body of a key's primary key packet (binary OpenPGP)."""
    ref = next(iter_packets(key))
    assert ref.tag == 6, ref
    return key[ref.body_start:ref.end]


def squatting_key(victim: bytes, uid: str, *, own_subkey: bool = True) -> bytes:
    """A valid key for `uid` that binds the victim's primary key as an encryption subkey
    (and, with own_subkey, a real encryption subkey of its own as well)."""
    attacker = Signer()
    borrowed = Borrowed(primary_body(victim))
    key = attacker.packet + user_id(uid) + attacker.certify(uid, T0 + 1)
    if own_subkey:
        sub = Subkey(T0 + 2)
        key += sub.packet + attacker.bind(sub, T0 + 3)
    # bind() hashes sub.body and signs key flags 0x0C (encrypt communications and storage).
    return key + borrowed.packet + attacker.bind(borrowed, T0 + 4)  # type: ignore[arg-type]
