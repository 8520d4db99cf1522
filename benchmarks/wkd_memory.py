"""How much memory and start-up time the WKD responder's key cache costs for a large
directory (not a test). Default: 100,000 users, each with an ed25519 key published for
one address, in a private slapd (milter_wkd.sandbox.slapd, bulk-loaded with slapadd).

Prints, for the mirror (budget large enough for the whole directory) and for a bounded
LRU cache (--lru-budget): resident memory of a fresh process before and after the cache
is loaded, the time from a cold start (connect, read the change token, page through every
key, clean each one) to a complete mirror, the time to the first answer, and the cost of
one reconciliation listing (the delete check), then the RFC 4533 sync's first refresh
(hash attributes only) to a complete presence index: its time and the RSS it adds (bytes
per key). Run: .venv/bin/python benchmarks/wkd_memory.py

The users' keys are made here, fast, with `cryptography` (a v4 ed25519 primary key, one
user ID, its positive self-certification), so that 100,000 distinct valid keys take
seconds; clean_key verifies every self-signature just as for gpg's keys.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from milter_wkd.openpgp import armor_key  # noqa: E402
from milter_wkd.sandbox.slapd import Slapd  # noqa: E402
from milter_wkd.store.schema import address_slot, key_digest  # noqa: E402
from milter_wkd.values import Address  # noqa: E402

ED25519_OID = bytes.fromhex("2b06010401da470f01")
CREATED = 1_700_000_000


def _packet(tag: int, body: bytes) -> bytes:
    return bytes([0xC0 | tag, 0xFF]) + struct.pack(">I", len(body)) + body


def _mpi(data: bytes) -> bytes:
    value = int.from_bytes(data, "big")
    return struct.pack(">H", value.bit_length()) + data.lstrip(b"\0")


def _subpacket(kind: int, data: bytes) -> bytes:
    return bytes([len(data) + 1, kind]) + data


def synthetic_key(user_id: str, private: Ed25519PrivateKey | None = None) -> bytes:
    """A minimal valid transferable public key: ed25519 primary, one self-signed UID."""
    private = private or Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    key_body = (b"\x04" + struct.pack(">I", CREATED) + bytes([22, len(ED25519_OID)])
                + ED25519_OID + _mpi(b"\x40" + public))
    fingerprint = hashlib.sha1(b"\x99" + struct.pack(">H", len(key_body)) + key_body).digest()  # noqa: S324
    uid = user_id.encode()
    hashed = (_subpacket(2, struct.pack(">I", CREATED)) + _subpacket(27, b"\x03")
              + _subpacket(33, b"\x04" + fingerprint))
    sig_head = bytes([4, 0x13, 22, 8]) + struct.pack(">H", len(hashed)) + hashed
    digest = hashlib.sha256(
        b"\x99" + struct.pack(">H", len(key_body)) + key_body
        + b"\xb4" + struct.pack(">I", len(uid)) + uid
        + sig_head + b"\x04\xff" + struct.pack(">I", len(sig_head))).digest()
    signature = private.sign(digest)
    unhashed = _subpacket(16, fingerprint[-8:])
    sig_body = (sig_head + struct.pack(">H", len(unhashed)) + unhashed + digest[:2]
                + _mpi(signature[:32]) + _mpi(signature[32:]))
    return _packet(6, key_body) + _packet(13, uid) + _packet(2, sig_body)


def user_entries(count: int, people_dn: str,
                 keep: dict[str, bytes] | None = None) -> Iterator[str]:
    """LDIF entries of `count` users u0..u<count-1>@example.org with published keys
    (`keep`, if given, collects address -> binary key)."""
    for n in range(count):
        address = f"u{n}@example.org"
        key = synthetic_key(f"User {n} <{address}>")
        if keep is not None:
            keep[address] = key
        armored = armor_key(key)
        yield (f"dn: uid=u{n},{people_dn}\nobjectClass: inetOrgPerson\n"
               f"objectClass: wkdKeyHolder\nuid: u{n}\ncn: User {n}\nsn: {n}\n"
               f"mail: {address}\ngpgMailbox: {address}\n"
               f"wkdAddressHash: {address_slot(Address.parse(address))}\n"
               f"pgpKey:: {base64.b64encode(armored).decode()}\n"
               # Written as the system writes it: a pgpKey without its digest is not served.
               f"wkdKeyDigest: {key_digest(armored)}\n")


def loaded_slapd(workdir: Path, users: int, keep: dict[str, bytes] | None = None) -> Slapd:
    """A private slapd with the example DIT plus `users` key holders (slapadd, offline)."""
    slapd = Slapd(workdir / "slapd")
    slapd.build()
    ldif = workdir / "users.ldif"
    started = time.monotonic()
    with ldif.open("w") as out:
        for entry in user_entries(users, slapd.people_dn, keep):
            out.write(entry + "\n")
    made = time.monotonic() - started
    subprocess.run(["slapadd", "-q", "-w", "-n1", "-F", str(slapd.config_dir), "-l", str(ldif)],
                   check=True, capture_output=True)
    print(f"made {users} keys in {made:.1f} s, slapadd in "
          f"{time.monotonic() - started - made:.1f} s", file=sys.stderr)
    slapd.start()
    # start() gives the service accounts their passwords only when it built slapd itself.
    slapd.set_service_passwords()
    # A first write makes syncprov set contextCSN on the suffix.
    slapd.ldapmodify(f"dn: {slapd.people_dn}\nchangetype: modify\nreplace: description\n"
                     "description: loaded\n-\n")
    return slapd


_PROBE = r"""
import json, os, sys, time
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
started = time.monotonic()
from milter_wkd.config import DirectoryConfig
from milter_wkd.web.cache import KeyCache
from milter_wkd.store.ldapview import LdapKeyView
from milter_wkd.values import Address
from milter_wkd.store.schema import address_slot
cfg = DirectoryConfig(**json.loads(sys.argv[1]))
budget = int(sys.argv[2])
before = rss()
source = LdapKeyView(cfg)
cache = KeyCache(source, budget=budget)
t0 = time.monotonic()
first = cache.get(address_slot(Address.parse("u1@example.org")))
first_answer = time.monotonic() - t0
t0 = time.monotonic()
complete = cache.load()
load = time.monotonic() - t0
t0 = time.monotonic()
dns = source.published_dns()
listing = time.monotonic() - t0
import gc; gc.collect()
rss_loaded = rss()
# The RFC 4533 sync's first refresh (hash attributes only) fills the presence index.
import threading
from milter_wkd.web.sync import CacheSync
sync = CacheSync(cache, source)
sync.start_from(cache.token or "")
stop = threading.Event()
t0 = time.monotonic()
follower = threading.Thread(target=source.follow, args=(sync, stop), daemon=True)
follower.start()
sync.ready.wait()
index_s = time.monotonic() - t0
stop.set()
follower.join()
gc.collect()
print(json.dumps({"rss_before": before, "rss_after": rss_loaded, "load_s": load,
                  "index_s": index_s, "index_slots": len(cache.index),
                  "index_rss": rss() - rss_loaded, "index_estimate": cache.index.estimated_bytes(),
                  "first_answer_s": first_answer, "complete": complete, "answers": len(cache),
                  "cache_bytes": cache.size, "listing_s": listing, "dns": len(dns),
                  "first_ok": first is not None, "import_s": t0 - started}))
"""


def probe(slapd: Slapd, budget: int) -> dict[str, object]:
    cfg = {"uri": slapd.uri, "bind_dn": slapd.service_accounts["wkd"]["dn"],
           "bind_password": slapd.service_accounts["wkd"]["password"],
           "base_dn": slapd.suffix}
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(cfg), str(budget)],
                          capture_output=True, check=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--lru-budget", type=int, default=16 * 1024 * 1024,
                        help="budget (bytes) for the bounded run (default 16 MiB)")
    args = parser.parse_args()
    mib = 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="wkd-memory-") as tmp:
        slapd = loaded_slapd(Path(tmp), args.users)
        try:
            for label, budget in (("mirror", 1 << 40), ("lru", args.lru_budget)):
                r = probe(slapd, budget)
                print(f"{label:6} users={args.users} budget="
                      f"{'unbounded' if budget == 1 << 40 else f'{budget / mib:.0f} MiB'}: "
                      f"RSS {r['rss_before'] / mib:.0f} -> {r['rss_after'] / mib:.0f} MiB "
                      f"(cache estimate {r['cache_bytes'] / mib:.0f} MiB, {r['answers']} "
                      f"answers, complete={r['complete']}); first answer "
                      f"{r['first_answer_s'] * 1000:.0f} ms after start; cold load "
                      f"{r['load_s']:.1f} s; delete-check listing of {r['dns']} DNs "
                      f"{r['listing_s'] * 1000:.0f} ms; sync refresh to a complete "
                      f"presence index {r['index_s']:.1f} s, {r['index_slots']} slots, "
                      f"+{r['index_rss'] / mib:.1f} MiB RSS "
                      f"({r['index_rss'] / max(1, r['index_slots']):.0f} bytes a key)")
        finally:
            slapd.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
