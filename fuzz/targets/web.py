"""The WKD responder (milter_wkd.web): `Router.route`, `Router.fast_slot` and the WSGI app
over an in-memory key source, with any method, Host, path and query string.

A crash is an exception out of the app or a 500 answer (the app turns unexpected
exceptions into 500); every answer must carry a Content-Length equal to its body, and a
HEAD answer no body. The fast path and the careful `route` must agree on every key request.

Input: NUL-separated fields method, Host (absent when empty and the selector says so), path,
query; the first octet is the selector.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fuzz.targets import fixtures
from milter_wkd.config import DomainConfig
from milter_wkd.errors import Refused
from milter_wkd.store.view import Change, Published
from milter_wkd.values import Address
from milter_wkd.web.app import WkdApp
from milter_wkd.web.cache import KeyCache
from milter_wkd.web.routes import HttpError, Router
from milter_wkd.wkd import address_hash

ALLOWED = (Refused,)
DOMAINS = ("example.org", "Other.Example")
ALICE = Address.parse("alice@example.org")
BOB = Address.parse("Bob@other.example")


class _Source:
    """A KeyView over two published entries; nothing ever changes."""

    entries = (Published("uid=alice", (ALICE,), b"KA", "1"),
               Published("uid=bob", (BOB,), b"KB", "1"))

    def change_token(self) -> str:
        return "20260101000000.000000Z#000000#000#000000"

    def changes_since(self, token: str) -> list[Change]:
        return []

    def lookup(self, slot: str, local_hint: str | None = None) -> list[Published]:
        return [e for e in self.entries if slot in e.slots()]

    def iter_published(self) -> Iterator[Published]:
        return iter(self.entries)

    def published_dns(self) -> set[str]:
        return {e.dn for e in self.entries}


def _cleaner(key: bytes, address: Address) -> bytes:
    return key + b"|" + address.key.encode()


def _app(complete: bool) -> WkdApp:
    domains = [DomainConfig(name=d, submission_address=f"key-submission@{d.lower()}",
                            submission_public_key=str(fixtures.FUZZ_DATA / "missing"))
               for d in DOMAINS]
    # A budget too small for the mirror makes the cache ask the source (the miss path).
    cache = KeyCache(_Source(), budget=1 << 20 if complete else 16, cleaner=_cleaner)
    cache.load()
    return WkdApp(cache, domains, max_age=600)


APPS = (_app(True), _app(False))
ROUTER = Router(DOMAINS)


def _call(app: WkdApp, environ: dict[str, Any]) -> None:
    answer: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        answer.append((status, headers))

    body = b"".join(app(environ, start_response))
    ((status, headers),) = answer
    assert not status.startswith("500"), (status, environ)
    length = dict(headers)["Content-Length"]
    if environ["REQUEST_METHOD"] == "HEAD":
        assert body == b"", environ
    else:
        assert int(length) == len(body), (environ, length, body)


def one_input(data: bytes) -> None:
    if not data:
        return
    selector = data[0]
    fields = data[1:].decode("utf-8", "surrogateescape").split("\0")
    method, host, path, query = ([*fields, "", "", "", ""])[:4]
    host_or_none = host if host or selector & 1 else None
    slot = ROUTER.fast_slot(host_or_none, path)
    try:
        route = ROUTER.route(method or "GET", host_or_none, path)
    except HttpError as exc:
        assert exc.status in (400, 404, 405, 414), exc.status
        assert slot is None or method not in ("", "GET", "HEAD"), (host, path)
    else:
        if slot is not None:
            assert route.kind == "key" and slot == f"{route.hash}@{route.domain}", (host, path)
    environ: dict[str, Any] = {"REQUEST_METHOD": method or "GET", "PATH_INFO": path,
                               "QUERY_STRING": query}
    if host_or_none is not None:
        environ["HTTP_HOST"] = host_or_none
    _call(APPS[selector >> 1 & 1], environ)


def seeds() -> Iterator[tuple[str, bytes]]:
    alice, bob = address_hash(ALICE), address_hash(BOB)
    wkd = "/.well-known/openpgpkey/"
    requests = {
        "advanced": ("GET", "openpgpkey.example.org", f"{wkd}example.org/hu/{alice}", "l=alice"),
        "direct": ("GET", "example.org:443", f"{wkd}hu/{alice}", ""),
        "direct-other": ("HEAD", "other.example.", f"{wkd}hu/{bob}", "l=Bob"),
        "miss": ("GET", "example.org", f"{wkd}hu/" + "y" * 32, "l=nobody"),
        "policy": ("GET", "openpgpkey.other.example", f"{wkd}other.example/policy", ""),
        "submission": ("HEAD", "example.org", f"{wkd}submission-address", ""),
        "no-host": ("GET", "", f"{wkd}example.org/hu/{alice}", ""),
        "post": ("POST", "example.org", f"{wkd}hu/{alice}", ""),
        "dots": ("GET", "example.org", f"{wkd}../hu/%2e", "l=a&l=b"),
    }
    for index, (name, fields) in enumerate(requests.items()):
        yield name, bytes([index]) + "\0".join(fields).encode()
