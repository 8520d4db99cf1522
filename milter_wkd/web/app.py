"""The WKD responder as a WSGI callable: route, answer from the key cache, never raise.

Answers (all with Content-Length, `Access-Control-Allow-Origin: *` and Cache-Control):
- key: 200 `application/octet-stream`, the binary key with the one user ID of the address;
  404 when nothing is published; 503 (Retry-After) only when the directory is down and the
  cache knows nothing about the address;
- policy and submission-address: 200 `text/plain`, built once at start; the submission
  address's own key comes from its `submission_public_key` file (read at start), else
  from the directory like a user's;
- refused requests: the `HttpError` status with a one-line reason.
HEAD answers carry the same headers and no body. An OPTIONS request (a browser's CORS
preflight, for a page that sends Authorization or If-None-Match) gets 204 allowing GET and
HEAD with those headers from any origin. Any unexpected exception becomes a 500 with a
logged traceback.

Client rules (their bug trackers): dirmngr speaks HTTP/1.0 and needs Content-Length on
every answer; gpg marks a host dead on 502, so our failures are 500 or 503, never 502;
Thunderbird sends `Authorization: Basic …` (ignored) and lowercases the whole address (the
hash decides), and wants no `text/html` 404; keys are always `application/octet-stream`.

Validators: a 200 carries a strong `ETag` (a digest of the body), and a GET or HEAD whose
`If-None-Match` names it gets `304 Not Modified` with no body and no Content-Length (RFC
9110 §15.4.5), but with ETag, CORS and Cache-Control, so a CDN or nginx cache revalidates.

Speed: a GET key answer from a complete mirror is remembered per (Host, path) until the
cache's `version` moves (any change of its answers), at most MEMO_ENTRIES of them; a
repeated request is then one dict look-up (benchmarks/wkd.py).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from milter_wkd.config import DomainConfig
from milter_wkd.errors import Refused
from milter_wkd.store.schema import address_slot, slot
from milter_wkd.store.view import SourceUnavailable
from milter_wkd.values import Address
from milter_wkd.web.cache import KeyCache, clean_for_address
from milter_wkd.web.hkp import PREFIXES as KEYSERVER_PREFIXES
from milter_wkd.web.hkp import Keyserver
from milter_wkd.web.routes import (
    HttpError,
    Router,
    policy_text,
    submission_address_text,
)

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 3
StartResponse = Callable[..., Any]
Headers = list[tuple[str, str]]
Memo = tuple[str, Headers, bytes, str | None, Headers]

_NOT_FOUND = b"no key published\n"
# Entries of the answer memo (about 500 bytes each beyond the shared key bytes: ~8 MiB).
MEMO_ENTRIES = 16384
_PREFLIGHT_HEADERS = [
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, HEAD"),
    ("Access-Control-Allow-Headers", "Authorization, Content-Type, If-None-Match, "
     "X-OpenPGP-Padding"),
    ("Access-Control-Max-Age", "86400"),
    ("Content-Length", "0"),
]
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            414: "URI Too Long", 500: "Internal Server Error", 503: "Service Unavailable"}


class WkdApp:
    def __init__(self, cache: KeyCache, domains: Sequence[DomainConfig], *,
                 max_age: int = 300) -> None:
        self.cache = cache
        self.router = Router(d.name for d in domains)
        self.max_age = max_age
        self._cache_control = f"public, max-age={max_age}"
        self._miss_cache_control = f"public, max-age={min(max_age, 60)}"
        self.files: dict[tuple[str, str], bytes] = {}
        for domain in domains:
            name = domain.name.lower()
            self.files[name, "policy"] = policy_text(
                domain.submission_address, protocol_version=PROTOCOL_VERSION,
                auth_submit=domain.auth_submit, mailbox_only=domain.mailbox_only)
            self.files[name, "submission-address"] = submission_address_text(
                domain.submission_address)
        self.static_keys = submission_keys(domains)
        # HKP and VKS look-ups (/pks/, /vks/): milter_wkd.web.hkp, off the WKD paths.
        self.keyserver = Keyserver(cache, domains, self.static_keys, max_age=max_age)
        self._fast_slot = self.router.fast_slot
        self._peek = cache.peek
        # (Host, path) of GET requests answered from the mirror -> (status, headers, body,
        # ETag or None, the headers of a 304), valid while the cache's version stays the same.
        self._memo: dict[tuple[str | None, str], Memo] = {}
        self._memo_version = -1
        self._key_headers = [("Access-Control-Allow-Origin", "*"),
                             ("Cache-Control", self._cache_control),
                             ("X-Content-Type-Options", "nosniff")]
        self._not_found_headers = [("Content-Type", "text/plain; charset=utf-8"),
                                   ("Content-Length", str(len(_NOT_FOUND))),
                                   ("Access-Control-Allow-Origin", "*"),
                                   ("Cache-Control", self._miss_cache_control),
                                   ("X-Content-Type-Options", "nosniff")]

    def __call__(self, environ: dict[str, Any], start_response: StartResponse,
                 ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        try:  # free in Python >= 3.11 until something raises
            cache = self.cache
            version = cache.version  # read before any answer (see KeyCache.version)
            if version != self._memo_version:
                self._memo, self._memo_version = {}, version
            memo = self._memo
            host, path = environ.get("HTTP_HOST"), environ.get("PATH_INFO", "")
            if method == "GET" and cache.complete:
                # The hottest path: this exact request was answered before, from this
                # version of the mirror. It costs what granian's own per-request work costs.
                known = memo.get((host, path))
                if known is not None:
                    if "HTTP_IF_NONE_MATCH" in environ and known[3] is not None and (
                            _none_match(environ["HTTP_IF_NONE_MATCH"], known[3])):
                        start_response("304 Not Modified", known[4])
                        return [b""]
                    start_response(known[0], known[1])
                    return [known[2]]
            # The hot path: a well-formed key request answered from the mirror.
            key_slot = self._fast_slot(host, path)
            if key_slot is not None and (method == "GET" or method == "HEAD") and (  # noqa: PLR1714
                    cache.complete):
                body = self.static_keys.get(key_slot) or self._peek(key_slot)
                etag: str | None = None
                if body is not None:
                    etag = _etag(body)
                    status, headers = "200 OK", [
                        ("Content-Type", "application/octet-stream"),
                        ("Content-Length", str(len(body))), ("ETag", etag),
                        *self._key_headers]
                elif cache.complete:
                    status, headers, body = ("404 Not Found", self._not_found_headers,
                                             _NOT_FOUND)
                else:
                    return self._respond(method, environ, start_response)
                known = (status, headers, body, etag,
                         [("ETag", etag), *self._key_headers] if etag else [])
                if method == "GET":
                    if len(memo) >= MEMO_ENTRIES:
                        memo.clear()  # bounded; what is asked again comes back
                    memo[host, path] = known
                if etag is not None and _none_match(environ.get("HTTP_IF_NONE_MATCH"), etag):
                    start_response("304 Not Modified", [*known[4]])
                    return [b""]
                start_response(status, [*headers])
                return [b""] if method == "HEAD" else [body]
        except Exception:
            log.exception("unexpected failure answering %r", environ.get("PATH_INFO", "")[:300])
            return self._plain(method, 500, "text/plain; charset=utf-8", b"internal error\n",
                               start_response)
        if method == "OPTIONS":
            # A CORS preflight: a page on another site that sends a header beyond the simple
            # ones (Thunderbird's Authorization, If-None-Match) asks first. Every resource
            # here is public and read-only, so every origin may GET it with those headers.
            start_response("204 No Content", _PREFLIGHT_HEADERS)
            return [b""]
        if environ.get("PATH_INFO", "").startswith(KEYSERVER_PREFIXES):
            return self.keyserver(environ, start_response)
        return self._respond(method, environ, start_response)

    def _respond(self, method: str, environ: dict[str, Any], start_response: StartResponse,
                 ) -> Iterable[bytes]:
        try:
            status, content_type, body = self._answer(method, environ)
        except Exception:
            log.exception("unexpected failure answering %r", environ.get("PATH_INFO", "")[:300])
            status, content_type, body = 500, "text/plain; charset=utf-8", b"internal error\n"
        return self._plain(method, status, content_type, body, start_response,
                           environ.get("HTTP_IF_NONE_MATCH"))

    def _plain(self, method: str, status: int, content_type: str, body: bytes,
               start_response: StartResponse, if_none_match: str | None = None,
               ) -> Iterable[bytes]:
        """An answer off the hot path: every header of the module docstring, computed."""
        validator: Headers = []
        if status == 200:
            etag = _etag(body)
            validator.append(("ETag", etag))
            if _none_match(if_none_match, etag):
                start_response("304 Not Modified", [
                    *validator, ("Access-Control-Allow-Origin", "*"),
                    ("Cache-Control", self._cache_control),
                    ("X-Content-Type-Options", "nosniff")])
                return [b""]
        headers: Headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            *validator,
            ("Access-Control-Allow-Origin", "*"),
            ("Cache-Control", self._cache_control if status == 200
             else self._miss_cache_control if status == 404 else "no-store"),
            ("X-Content-Type-Options", "nosniff"),
        ]
        if status == 405:
            headers.append(("Allow", "GET, HEAD"))
        elif status == 503:
            headers.append(("Retry-After", "30"))
        start_response(f"{status} {_REASONS.get(status, 'Error')}", headers)
        return [b""] if method == "HEAD" else [body]

    def _answer(self, method: str, environ: dict[str, Any]) -> tuple[int, str, bytes]:
        try:
            route = self.router.route(method, environ.get("HTTP_HOST"),
                                      environ.get("PATH_INFO", ""))
        except HttpError as exc:
            return exc.status, "text/plain; charset=utf-8", (exc.reason + "\n").encode()
        if route.kind != "key":
            return 200, "text/plain; charset=utf-8", self.files[route.domain, route.kind]
        key_slot = slot(route.hash, route.domain)
        static = self.static_keys.get(key_slot)
        if static is not None:
            return 200, "application/octet-stream", static
        hint = None if self.cache.complete else _local_hint(environ.get("QUERY_STRING", ""))
        try:
            body = self.cache.get(key_slot, hint)
        except SourceUnavailable as exc:
            log.warning("directory unavailable for an uncached address: %s", exc)
            return 503, "text/plain; charset=utf-8", b"directory unavailable\n"
        if body is None:
            return 404, "text/plain; charset=utf-8", _NOT_FOUND
        return 200, "application/octet-stream", body


def submission_keys(domains: Sequence[DomainConfig]) -> dict[str, bytes]:
    """The submission addresses' public keys (`submission_public_key` files), each cleaned
    to the one user ID of its address. A missing or unusable file is logged, and the
    address is then looked up in the directory like a user's."""
    keys: dict[str, bytes] = {}
    for domain in domains:
        path = Path(domain.submission_public_key)
        try:
            address = Address.parse(domain.submission_address)
            keys[address_slot(address)] = clean_for_address(path.read_bytes(), address)
        except OSError as exc:
            log.warning("submission key of %s not served from %s: %s", domain.name, path,
                        exc.strerror)
        except Refused as exc:
            log.warning("submission key of %s in %s not served: %s", domain.name, path,
                        exc.reason)
    return keys


def _etag(body: bytes) -> str:
    """A strong validator of the body: the same bytes give the same tag in every worker."""
    return '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'


def _none_match(header: str | None, etag: str) -> bool:
    """Whether an If-None-Match value names `etag` (RFC 9110 §13.1.2: weak comparison)."""
    if header is None:
        return False
    if header == etag or header.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in header.split(","))


def _local_hint(query: str) -> str | None:
    """The `l=` parameter, a hint only: the hash decides (sq keeps case, gpg lowercases)."""
    if not query:
        return None
    try:
        values = parse_qs(query, max_num_fields=4).get("l")
    except ValueError:  # more than 4 fields: no hint, the hash decides anyway
        return None
    if not values or len(values[0]) > 64 or any(c in values[0] for c in "()*\\\0@"):
        return None
    return values[0]
