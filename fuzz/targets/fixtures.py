"""Inputs the seeds are made of: the unit tests' key vectors (tests/data) and a fixed service
key pair made once by the generator the unit tests use (tests/unit/conftest.py,
`messages.generate_submission_key`), kept in fuzz/data so that committed encrypted seeds stay
decryptable. Test keys only: the secret key protects nothing.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
TEST_DATA = ROOT / "tests" / "data"
FUZZ_DATA = ROOT / "fuzz" / "data"

KEY_VECTORS = ("vector-ed25519.pgp", "vector-rsa2048.pgp", "crafted-rich.pgp",
               "vector-ed25519.asc")
SERVICE_ADDRESS = "key-submission@example.org"
USER_ADDRESS = "user@example.org"


def key_vectors() -> dict[str, bytes]:
    return {name: (TEST_DATA / name).read_bytes() for name in KEY_VECTORS}


def service_secret() -> bytes:
    return (FUZZ_DATA / "service-secret.asc").read_bytes()


def service_public() -> bytes:
    return (FUZZ_DATA / "service-public.pgp").read_bytes()


def user_public() -> bytes:
    return (FUZZ_DATA / "user-public.pgp").read_bytes()
