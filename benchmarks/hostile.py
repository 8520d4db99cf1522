"""Hostile mail at volume through real Postfix into the milter (not a test; #16).

Against a private sandbox (slapd, Dovecot, our milter, Postfix on loopback), generated
hostile mails - bounded in number and size, the same for a given --seed - go through the
inbound port (anonymous, to the submission address: the WKS parser and decryption) and
through the submission port (logged in: auth-submit, and ordinary outgoing mail: the
Autocrypt and DKIM path). Kinds:

  nested-mime       multipart nested up to 400 levels deep
  malformed-mime    missing, mismatched or unterminated boundaries, junk parameters
  huge-headers      one header of up to 90 KB, or up to 3,000 header lines
  broken-encodings  undecodable base64 and quoted-printable, unknown transfer encodings
  bytes             NUL bytes and 8-bit octets in headers and bodies
  bomb              PGP/MIME encrypted to the submission key; the plaintext is a compressed
                    packet that expands to 512 MiB of zeros (a few hundred KB on the wire)
  many-uids         keys with 2,000 self-signed user IDs, from a logged-in user
  algorithms        keys whose primary key packet names every algorithm id 0..255
  big-key           a key flooded with 60,000 third-party certifications (about 14 MB)

Each mail's SMTP answer is recorded: 250 (passed or consumed), 5xx (refused, with the
reason Postfix passed on from the milter) or 4xx (a temporary failure). Printed: a table
per kind, the milter's peak resident memory (VmHWM), whether it is the same process at the
end, and one line `sent N, accepted A, refused R, tempfailed T, milter restarts 0`. Exits
non-zero if the milter died or restarted, or any answer was an internal error (4.3.0).

Run (as root, like the sandbox):  .venv/bin/python benchmarks/hostile.py [--per-kind 30]
"""

from __future__ import annotations

import argparse
import base64
import random
import smtplib
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from milter_wkd.openpgp.packets import ARMOR_PUBLIC_KEY, armor, new_header  # noqa: E402
from milter_wkd.sandbox import Sandbox  # noqa: E402
from milter_wkd.sandbox.flood import flood_key  # noqa: E402
from tests.unit.test_openpgp_crafted import T0, Signer, Subkey, user_id  # noqa: E402

SUBMISSION = "key-submission@example.org"
Mail = tuple[str, bytes]  # (route: "anon" | "auth-submit" | "outgoing", raw mail)


def head(sender: str, to: str, subject: str, extra: str = "") -> str:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{random.getrandbits(64):x}@hostile.example>\r\n{extra}")


def key_mail(sender: str, key: bytes, subject: str = "Key publishing request") -> bytes:
    """The old unencrypted submission form: an application/pgp-keys body."""
    return (head(sender, SUBMISSION, subject, "MIME-Version: 1.0\r\n"
                 "Content-Type: application/pgp-keys\r\n\r\n").encode()
            + armor(ARMOR_PUBLIC_KEY, key).replace(b"\n", b"\r\n"))


def nested(rng: random.Random) -> Iterator[Mail]:
    while True:
        depth = rng.choice((2, 10, 60, 200, 400))
        body = "leaf\r\n"
        for level in range(depth):
            body = (f"--b{level}\r\nContent-Type: multipart/mixed; boundary=\"b{level + 1}\""
                    f"\r\n\r\n{body}\r\n--b{level}--\r\n")
        route = rng.choice(("anon", "outgoing"))
        to = SUBMISSION if route == "anon" else "bob@example.org"
        yield route, (head("mallory@example.net" if route == "anon" else "alice@example.org",
                           to, "nested", "MIME-Version: 1.0\r\nContent-Type: multipart/"
                           "mixed; boundary=\"b0\"\r\n\r\n") + body).encode()


def malformed(rng: random.Random) -> Iterator[Mail]:
    shapes = [
        'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"\r\n\r\n'
        "--x\r\nno boundary parameter\r\n",
        'Content-Type: multipart/encrypted; boundary="a"; protocol="application/pgp-'
        'encrypted"\r\n\r\n--b\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n',
        'Content-Type: multipart/mixed; boundary="z"\r\n\r\n--z\r\nContent-Type: '
        "application/pgp-keys\r\n\r\n-----BEGIN PGP PUBLIC KEY BLOCK-----\r\n\r\nAAAA",
        'Content-Type: application/pgp-keys; charset="\x7f\x01"; ;;; =;=; name*0*=%%%\r\n\r\n'
        "-----BEGIN PGP PUBLIC KEY BLOCK-----\r\n-----END PGP PUBLIC KEY BLOCK-----\r\n",
        "Content-Type: multipart/mixed; boundary=" + "q" * 5000 + "\r\n\r\n--" + "q" * 5000,
        "Content-Type: \r\n\r\nnothing\r\n",
    ]
    while True:
        yield "anon", (head("mallory@example.net", SUBMISSION, "malformed",
                            "MIME-Version: 1.0\r\n") + rng.choice(shapes)).encode()


def huge_headers(rng: random.Random) -> Iterator[Mail]:
    while True:
        if rng.random() < 0.5:
            extra = "X-Long: " + "a" * rng.choice((1000, 20_000, 90_000)) + "\r\n"
        else:
            extra = "".join(f"X-H{i}: {i}\r\n" for i in range(rng.choice((200, 1000, 3000))))
        if rng.random() < 0.3:
            extra += 'From: "' + '\\"' * 20_000 + '" <mallory@example.net>\r\n'
        route = rng.choice(("anon", "outgoing"))
        to = SUBMISSION if route == "anon" else "bob@example.org"
        sender = "mallory@example.net" if route == "anon" else "alice@example.org"
        yield route, (head(sender, to, "huge headers", extra) + "\r\nbody\r\n").encode()


def broken_encodings(rng: random.Random) -> Iterator[Mail]:
    bodies = [
        ("base64", "!!!! not base64 ====\r\n"),
        ("base64", base64.b64encode(b"\x99\x00\x01garbage").decode()[:-2] + "\r\n"),
        ("quoted-printable", "=ZZ=\r\n=0=\r\n=\r\n"),
        ("x-uuencode", "begin 644 key\r\n`\r\nend\r\n"),
        ("8bit", "\xe9\xe9\xe9\r\n"),
    ]
    while True:
        encoding, body = rng.choice(bodies)
        yield "anon", (head("mallory@example.net", SUBMISSION, "broken encoding",
                            "MIME-Version: 1.0\r\nContent-Type: application/pgp-keys\r\n"
                            f"Content-Transfer-Encoding: {encoding}\r\n\r\n") + body
                       ).encode("latin-1")


def raw_bytes(rng: random.Random) -> Iterator[Mail]:
    while True:
        junk = bytes(rng.randrange(256) for _ in range(rng.choice((10, 500, 5000))))
        junk = junk.replace(b"\r", b"").replace(b"\n", b"")
        route = rng.choice(("anon", "outgoing"))
        to = SUBMISSION if route == "anon" else "bob@example.org"
        sender = "mallory@example.net" if route == "anon" else "alice@example.org"
        yield route, (head(sender, to, "bytes").encode() + b"X-Junk: " + junk[:900]
                      + b"\r\n\r\n" + junk + b"\r\n\x00\x00\r\n")


def bomb(sandbox: Sandbox) -> Callable[[random.Random], Iterator[Mail]]:
    # pgpy names ciphers that cryptography moved to its "decrepit" corner: noise here.
    warnings.filterwarnings("ignore", message=".*has been moved to cryptography")
    import pgpy  # only here: the bomb is made with pgpy's compression
    from pgpy.constants import CompressionAlgorithm

    key, _ = pgpy.PGPKey.from_blob(Path(sandbox.submission_public_key).read_bytes())
    encryption = next(iter(key.subkeys.values()))
    started = time.monotonic()
    message = pgpy.PGPMessage.new(b"\0" * (512 << 20), compression=CompressionAlgorithm.ZLIB)
    sealed = str(encryption.encrypt(message))
    print(f"bomb: 512 MiB of zeros compressed and encrypted into {len(sealed)} octets "
          f"in {time.monotonic() - started:.1f} s", flush=True)

    def mails(_rng: random.Random) -> Iterator[Mail]:
        body = ("--BB\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n"
                "--BB\r\nContent-Type: application/octet-stream\r\n\r\n"
                + sealed.replace("\n", "\r\n") + "\r\n--BB--\r\n")
        while True:
            yield "anon", (head("mallory@example.net", SUBMISSION, "Key publishing request",
                                'MIME-Version: 1.0\r\nContent-Type: multipart/encrypted; '
                                'protocol="application/pgp-encrypted"; boundary="BB"\r\n\r\n')
                           + body).encode()

    return mails


def many_uids(rng: random.Random) -> Iterator[Mail]:
    while True:
        alice, sub = Signer(), Subkey(T0 + 5)
        parts = [alice.packet]
        for n in range(rng.choice((500, 2000))):
            uid = f"Alice {n} <alice+{n}@example.org>" if n else "Alice <alice@example.org>"
            parts += [user_id(uid), alice.certify(uid, T0 + 1)]
        parts += [sub.packet, alice.bind(sub, T0 + 6)]
        yield "auth-submit", key_mail("alice@example.org", b"".join(parts))


def algorithms(rng: random.Random) -> Iterator[Mail]:
    ids = list(range(256))
    rng.shuffle(ids)
    while True:
        for algorithm in ids:
            material = bytes(rng.randrange(256) for _ in range(rng.choice((0, 3, 40, 300))))
            body = b"\x04" + T0.to_bytes(4, "big") + bytes((algorithm,)) + material
            key = new_header(6, len(body)) + body + user_id("Mallory <mallory@example.net>")
            yield "anon", key_mail("mallory@example.net", key)


def big_key(_rng: random.Random) -> Iterator[Mail]:
    alice, sub = Signer(), Subkey(T0 + 5)
    uid = "Alice <alice@example.org>"
    key = (alice.packet + user_id(uid) + alice.certify(uid, T0 + 1) + sub.packet
           + alice.bind(sub, T0 + 6))
    flooded = key_mail("alice@example.org", flood_key(key, 60_000))
    while True:
        yield "auth-submit", flooded


def send(sandbox: Sandbox, route: str, raw: bytes) -> tuple[int, str]:
    logged_in = route != "anon"
    endpoint = sandbox.postfix.submission if logged_in else sandbox.postfix.inbound
    sender = "alice@example.org" if logged_in else "mallory@example.net"
    to = ["bob@example.org"] if route == "outgoing" else [SUBMISSION]
    try:
        with smtplib.SMTP(endpoint.host, endpoint.port, timeout=300) as smtp:
            smtp.ehlo("hostile.example")
            if logged_in:
                smtp.login("alice@example.org", sandbox.users["alice"]["password"])
            smtp.sendmail(sender, to, raw)
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code, exc.smtp_error.decode("utf-8", "replace")
    except smtplib.SMTPRecipientsRefused as exc:
        code, text = next(iter(exc.recipients.values()))
        return code, text.decode("utf-8", "replace")
    return 250, ""


def kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-kind", type=int, default=30, help="mails per kind (default 30)")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="milter-wkd-hostile-"))
    work.chmod(0o711)
    failed = False
    with Sandbox(work / "sandbox", keep=False) as sandbox:
        assert sandbox.milter is not None
        pid = sandbox.milter.pid
        assert pid is not None
        kinds: dict[str, Callable[[random.Random], Iterator[Mail]]] = {
            "nested-mime": nested, "malformed-mime": malformed, "huge-headers": huge_headers,
            "broken-encodings": broken_encodings, "bytes": raw_bytes, "bomb": bomb(sandbox),
            "many-uids": many_uids, "algorithms": algorithms, "big-key": big_key,
        }
        limits = {"bomb": 5, "big-key": 3, "many-uids": 6}
        totals: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        print(f"{'kind':18} {'sent':>5} {'250':>5} {'5xx':>5} {'4xx':>5}  seconds",
              flush=True)
        for name, make in kinds.items():
            rng = random.Random(f"{args.seed}:{name}")  # noqa: S311 (reproducible, not secret)
            count = min(args.per_kind, limits.get(name, args.per_kind))
            started = time.monotonic()
            outcome: Counter[str] = Counter()
            for _, (route, raw) in zip(range(count), make(rng), strict=False):
                code, text = send(sandbox, route, raw)
                outcome[str(code)[0]] += 1
                reasons[f"{code} {text[:70]}"] += 1
                if text.startswith("4.3.0"):
                    failed = True
            print(f"{name:18} {count:5} {outcome['2']:5} {outcome['5']:5} {outcome['4']:5}  "
                  f"{time.monotonic() - started:7.1f}", flush=True)
            totals.update({"sent": count, "2": outcome["2"], "5": outcome["5"],
                           "4": outcome["4"]})
        alive = Path(f"/proc/{pid}").exists() and sandbox.milter.pid == pid
        peak = kib(pid, "VmHWM") if alive else 0
        print("answers seen (code and start of the reason, count):")
        for reason, n in reasons.most_common(25):
            print(f"  {n:5}  {reason}")
        print(f"milter: {'the same process throughout' if alive else 'DIED OR RESTARTED'}, "
              f"peak resident memory {peak / 1024:.0f} MiB")
        print(f"sent {totals['sent']}, accepted {totals['2']}, refused {totals['5']}, "
              f"tempfailed {totals['4']}, milter restarts {0 if alive else 1}")
        failed = failed or not alive
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
