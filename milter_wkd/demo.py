"""`make demo`: the whole system on loopback, told as a story with real clients.

Brings up the sandbox (private slapd, Dovecot, our milter, Postfix, the WKD responder and
the self-service page), then: alice publishes her key from gpg-wks-client over
authenticated SMTP; gpg finds it by WKD; bob, not logged in, goes through the WKS
confirmation round trip; carol signs in to the self-service page over HTTPS with her mail
password and pastes her key, which WKD then serves; alice's next mail arrives with an
Autocrypt header that sq decodes; gpg finds the same key in the directory as an ldap://
keyserver; a flooded key is cleaned. Each step prints what it did and how long it took.
Everything is torn down at the end unless --keep is given (then it prints how to stop
it).

Needs the Debian packages `make test` installs. Fails with a message naming the step.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import http.client
import imaplib
import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from milter_wkd import autocrypt, openpgp
from milter_wkd.check.portal import PortalClient
from milter_wkd.config import load
from milter_wkd.sandbox import Sandbox
from milter_wkd.sandbox.daemons import LOOPBACK
from milter_wkd.sandbox.flood import flood_key
from milter_wkd.store.ldapstore import LdapStore
from milter_wkd.values import Address
from milter_wkd.wkd import local_part_hash

WKS_CLIENT = "/usr/lib/gnupg/gpg-wks-client"
SUBMISSION = "key-submission@example.org"


class DemoError(Exception):
    pass


@contextmanager
def step(title: str) -> Iterator[None]:
    print(f"\n== {title}", flush=True)
    started = time.perf_counter()
    yield
    print(f"   ({time.perf_counter() - started:.2f} s)", flush=True)


def say(text: str) -> None:
    print(f"   {text}", flush=True)


class Gpg:
    """A private GnuPG home."""

    def __init__(self, home: Path) -> None:
        home.mkdir(mode=0o700, parents=True)
        self.home = home
        self.env = {**os.environ, "GNUPGHOME": str(home), "LC_ALL": "C"}

    def run(self, *args: str, tool: str = "gpg", data: bytes | None = None) -> bytes:
        cmd = [tool, *(("--batch", "--pinentry-mode", "loopback", "--passphrase", "")
                       if tool == "gpg" else ()), *args]
        proc = subprocess.run(cmd, input=data, capture_output=True, env=self.env,
                              timeout=120, check=False)
        if proc.returncode != 0:
            raise DemoError(f"{' '.join(cmd[:3])} … failed:\n"
                            f"{proc.stderr.decode(errors='replace')[-800:]}")
        return proc.stdout

    def new_key(self, user_id: str) -> str:
        self.run("--quick-gen-key", user_id, "ed25519", "cert", "2y")
        listing = self.run("--with-colons", "--list-keys", user_id).decode()
        fpr = next(line.split(":")[9] for line in listing.splitlines()
                   if line.startswith("fpr:"))
        self.run("--quick-add-key", fpr, "cv25519", "encr", "2y")
        return fpr

    def close(self) -> None:
        subprocess.run(["gpgconf", "--kill", "all"], env=self.env, capture_output=True,
                       check=False)


def smtp_send(sandbox: Sandbox, raw: bytes, sender: str, recipient: str,
              login: str | None = None) -> None:
    endpoint = sandbox.postfix.submission if login else sandbox.postfix.inbound
    with smtplib.SMTP(endpoint.host, endpoint.port, timeout=60) as smtp:
        if login:
            smtp.login(sandbox.users[login]["address"], sandbox.users[login]["password"])
        smtp.sendmail(sender, [recipient], raw)


def wait_for(sandbox: Sandbox, user: str, match: Callable[[email.message.Message], bool],
             timeout: float = 30) -> bytes:
    deadline = time.monotonic() + timeout
    account = sandbox.users[user]
    while time.monotonic() < deadline:
        imap = imaplib.IMAP4(sandbox.dovecot.imap.host, sandbox.dovecot.imap.port)
        try:
            imap.login(account["address"], account["password"])
            imap.select("INBOX", readonly=True)
            _, data = imap.search(None, "ALL")
            for number in reversed(data[0].split()):
                _, parts = imap.fetch(number, "(RFC822)")
                first = parts[0]
                if isinstance(first, tuple):
                    raw = bytes(first[1])
                    if match(email.message_from_bytes(raw, policy=email.policy.default)):
                        return raw
        finally:
            imap.logout()
        time.sleep(0.2)
    raise DemoError(f"no matching mail for {user} within {timeout} s")


def subject(text: str) -> Callable[[email.message.Message], bool]:
    return lambda message: str(message.get("Subject", "")) == text


def published_line(sandbox: Sandbox, address: str) -> str:
    with LdapStore(load(sandbox.config_path, environ={}).directory) as store:
        stored = store.key_for(Address.parse(address))
    if stored is None:
        raise DemoError(f"no key published for {address}")
    how = stored.provenance.source.value if stored.provenance else "?"
    return f"{stored.fingerprint} for {', '.join(map(str, stored.addresses))} ({how})"


def story(sandbox: Sandbox, work: Path) -> None:
    alice = Gpg(work / "alice")
    bob = Gpg(work / "bob")
    try:
        submission_key = sandbox.submission_public_key.read_bytes()
        fake = ("--fake-submission-addr", SUBMISSION)
        with step("alice publishes her key from gpg-wks-client, logged in over SMTP AUTH"):
            alice.run("--import", data=submission_key)
            fpr = alice.new_key("Alice <alice@example.org>")
            mail = alice.run(*fake, "--create", fpr, "alice@example.org", tool=WKS_CLIENT)
            smtp_send(sandbox, mail, "alice@example.org", SUBMISSION, login="alice")
            wait_for(sandbox, "alice", subject("Your key has been published"))
            say("milter published at once (auth-submit); notice in alice's INBOX (IMAP)")
            say("directory: " + published_line(sandbox, "alice@example.org"))

        with step("gpg finds alice's key by WKD (HTTPS, advanced method)"):
            if sandbox.wkd.port == 443:
                say(wkd_locate(sandbox, work))
            else:
                say(f"skipped: 127.0.0.1:443 is taken, the responder is on {sandbox.wkd.port} "
                    "(real WKD clients know no other port)")

        with step("bob, not logged in, goes through the WKS confirmation round trip"):
            bob.run("--import", data=submission_key)
            fpr_bob = bob.new_key("Bob <bob@example.org>")
            mail = bob.run(*fake, "--create", fpr_bob, "bob@example.org", tool=WKS_CLIENT)
            smtp_send(sandbox, mail, "bob@example.org", SUBMISSION)
            request = wait_for(sandbox, "bob", subject("Confirm your key publication"))
            say("confirmation request (encrypted to bob's key, signed) in bob's INBOX")
            response = bob.run(*fake, "--receive", data=request, tool=WKS_CLIENT)
            smtp_send(sandbox, response, "bob@example.org", SUBMISSION)
            wait_for(sandbox, "bob", subject("Your key has been published"))
            say("gpg-wks-client answered; directory: "
                + published_line(sandbox, "bob@example.org"))

        with step("carol publishes her key on the self-service page (HTTPS, her mail "
                  "password)"):
            say(self_service(sandbox, Gpg(work / "carol")))

        with step("alice writes to bob: the mail arrives with an Autocrypt header"):
            raw = (b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\n"
                   b"Subject: hello Bob\r\nMessage-ID: <demo-autocrypt@example.org>\r\n\r\n"
                   b"Hi Bob, my key travels with this mail.\r\n")
            smtp_send(sandbox, raw, "alice@example.org", "bob@example.org", login="alice")
            delivered = wait_for(sandbox, "bob", lambda m: str(m.get("Message-ID")) ==
                                 "<demo-autocrypt@example.org>")
            message = email.message_from_bytes(delivered, policy=email.policy.default)
            header = str(message[autocrypt.HEADER])
            say(f"Autocrypt: {header[:60]}…")
            say("DKIM-Signature present: " + str(message["DKIM-Signature"] is not None))
            decoded = subprocess.run(["sq", "autocrypt", "decode", "--binary"], input=delivered,
                                     capture_output=True, check=True, timeout=30).stdout
            info = openpgp.inspect_key(decoded)
            say(f"sq autocrypt decode: {info.fingerprint}, {len(decoded)} octets, user IDs "
                f"{list(info.user_ids)}")

        with step("gpg finds the same key in the directory (ldap:// keyserver)"):
            fresh = Gpg(work / "dirmngr")
            try:
                fresh.run("--keyserver", sandbox.slapd.uri, "--recv-keys", fpr)
                listing = fresh.run("--with-colons", "--list-keys", fpr).decode()
                uid = next(line.split(":")[9] for line in listing.splitlines()
                           if line.startswith("uid:"))
                say(f"gpg --keyserver {sandbox.slapd.uri} --recv-keys {fpr[:16]}…: {uid}")
            finally:
                fresh.close()

        with step("a key flooded with 50,000 third-party certifications is cleaned"):
            key = alice.run("--export", fpr)
            flooded = flood_key(key, 50_000)
            path = work / "flooded.pgp"
            path.write_bytes(flooded)
            started = time.perf_counter()
            result = subprocess.run(
                [sys.executable, "-m", "milter_wkd", "key", "clean", "--stats",
                 "--address", "alice@example.org", str(path), "-o", str(work / "clean.pgp")],
                capture_output=True, text=True, check=True, timeout=120)
            took = time.perf_counter() - started
            say(f"{len(flooded):,} octets in, {(work / 'clean.pgp').stat().st_size} out, "
                f"{took:.2f} s for the whole command")
            for line in result.stderr.splitlines():
                say(f"  {line}")
    finally:
        alice.close()
        bob.close()


def self_service(sandbox: Sandbox, carol: Gpg) -> str:
    """carol's browser, played by an HTTP client that keeps cookies and sends the form's
    CSRF token and the page's Origin: sign in, paste the armored key, WKD serves it."""
    portal = sandbox.portal
    try:
        fpr = carol.new_key("Carol <carol@example.org>")
        armored = carol.run("--armor", "--export", fpr).decode()
    finally:
        carol.close()
    account = sandbox.users["carol"]
    with PortalClient(portal.portal_url, ca_file=str(portal.ca_file),
                      connect=(LOOPBACK, portal.port)) as client:
        refused = client.request("POST", "sign-in", fields={
            "address": account["address"], "password": account["password"]})
        say(f"{portal.portal_url}sign-in: a POST without the form's CSRF token gets "
            f"{refused.status}")
        signed_in = client.sign_in(account["address"], account["password"])
        if signed_in.status != 303:
            raise DemoError(f"carol's sign-in answered {signed_in.status}")
        say(f"signed in as {account['address']} with her mail password (an LDAP bind as her "
            f"entry); cookie {', '.join(client.cookies)}: Secure, HttpOnly, "
            "SameSite=Strict")
        started = time.perf_counter()
        published = client.upload(armored)
        if published.status != 200:
            raise DemoError(f"carol's upload answered {published.status}")
        say(f"pasted her armored key into the upload form: {published.status}, "
            f"{(time.perf_counter() - started) * 1000:.0f} ms")
    say("directory: " + published_line(sandbox, account["address"]))
    address = Address.parse(account["address"])
    path = f"/.well-known/openpgpkey/example.org/hu/{local_part_hash(address.local)}"
    deadline = time.monotonic() + 5
    while True:
        status, _headers, body = sandbox.wkd.get(path)
        if status == 200 and openpgp.inspect_key(body).fingerprint.hex == fpr:
            break
        if time.monotonic() > deadline:
            raise DemoError(f"WKD still answers {status} for carol's key")
        time.sleep(0.05)
    return (f"WKD serves {fpr[:16]}… at https://openpgpkey.example.org{path} "
            f"({len(body)} octets, {(time.perf_counter() - started) * 1000:.0f} ms after "
            "the upload began)")


def wkd_locate(sandbox: Sandbox, work: Path) -> str:
    """gpg --locate-keys inside a mount namespace that maps example.org to 127.0.0.1."""
    wkd = sandbox.wkd
    home = work / "wkd"
    home.mkdir(mode=0o700)
    hosts = work / "hosts"
    hosts.write_text("127.0.0.1 localhost example.org openpgpkey.example.org\n")
    resolv = work / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    script = (f"mount --bind {hosts} /etc/hosts && mount --bind {resolv} /etc/resolv.conf && "
              f"mount --bind {wkd.ca_file} /etc/ssl/certs/ca-certificates.crt && "
              "gpg --batch --auto-key-locate clear,nodefault,wkd --locate-keys "
              "alice@example.org; rc=$?; gpgconf --kill all; exit $rc")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                          env={**os.environ, "GNUPGHOME": str(home)}, timeout=60, check=False)
    if proc.returncode != 0:
        raise DemoError(f"gpg --locate-keys failed: {proc.stderr.decode()[-600:]}")
    uid = [line for line in proc.stdout.decode().splitlines() if line.startswith("uid")]
    return f"gpg --locate-keys alice@example.org: {uid[0].split(']', 1)[-1].strip()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true",
                        help="leave the sandbox running and print how to stop it")
    parser.add_argument("--dir", help="sandbox directory (default: a new one in /tmp)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="milter-wkd-demo-clients-"))
    sandbox = Sandbox(args.dir, keep=args.keep)
    try:
        with step("bringing up the sandbox: slapd, Dovecot, milter, Postfix, WKD responder, "
                  "self-service page"):
            sandbox.start()
            for name, pid in sandbox.started.items():
                say(f"{name}: pid {pid}")
        story(sandbox, work)
    except (DemoError, subprocess.CalledProcessError, OSError, smtplib.SMTPException,
            http.client.HTTPException) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        sandbox.stop()
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.keep:
        print(f"\nThe sandbox keeps running in {sandbox.dir}: "
              f"`.venv/bin/milter-wkd sandbox down --dir {sandbox.dir}` stops it.")
        sandbox.write_state()
    else:
        with step("bringing everything down"):
            sandbox.stop()
    print("\ndemo done.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
