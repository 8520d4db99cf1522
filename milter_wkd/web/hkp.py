"""HKP and VKS look-ups beside WKD: the provider's own keys, found by exact look-up only.

Served paths (any Host; the address's domain decides, see below):

    GET /pks/lookup?op=get&search=0x<40 or 64 hex>|0x<16 hex>|<address>   (HKP, armored)
    GET /pks/lookup?op=index&options=mr&search=...                      (machine-readable)
    GET /vks/v1/by-fingerprint/<40 or 64 hex>   /vks/v1/by-keyid/<16 hex>
    GET /vks/v1/by-email/<address>  (`@` raw or as %40)                 (VKS v1, Hagrid's)
    POST /pks/add, /vks/v1/upload, /vks/v1/request-verify -> 501, pointing to WKS

The one rule: every look-up path serves what WKD serves, the key as the cache holds it
(checked by `store.schema.checked`/`stored_key`, never disabled, cleaned by the [keys]
policy), so nothing can be had here that WKD would refuse:
- by address: exactly the WKD answer for that address (the key cleaned down to that
  address's one user ID), armored;
- by fingerprint or key ID (of the primary key or of any subkey): the key with the user
  IDs of all of its owner's published addresses (each as WKD serves it, joined into one
  key), armored.
Only exact look-ups answer: a fingerprint, a 64-bit key ID, or an address of a configured
domain, bare or in angle brackets (gpg sends `<addr>` and `=addr` forms too). Anything
else - a substring, a wildcard, a name, an address of another domain - finds nothing (404
for `get`, an empty index for `index`), so the server cannot be used to harvest
addresses. Short (32-bit) key IDs are refused (400): they collide by design. `op=vindex`
and other operations are 501. The index (`options=mr` or not: always the machine-readable
form, as text/plain) is `info:1:N`, then per key `pub:FPR:ALGO:BITS:CREATED:EXPIRES:FLAGS`
and `uid:ESCAPED:CREATED:EXPIRES:FLAGS` lines, `:`, `%` and octets outside printable ASCII
%-escaped (what dirmngr 2.2 and gpg's keyserver.c parse).

VKS answers as Hagrid does: `application/pgp-keys`, armored, `Content-Disposition:
attachment; filename="<FPR>.asc"`; 400 for a malformed fingerprint, key ID or address,
404 when nothing is published. Uploads are 501 with a plain-text pointer to the
WKS submission addresses: keys are published by mail (the mail client's WKS support).

Costs: none on the WKD path (the app sends only /pks/ and /vks/ paths here). An address
look-up is the WKD look-up; a fingerprint look-up is one dict look-up in the cache's key ID
index (or one indexed directory search when the mirror is incomplete).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote

from milter_wkd import openpgp
from milter_wkd.config import DomainConfig
from milter_wkd.errors import KeyRefused, Refused
from milter_wkd.openpgp.material import parse_public_key, parse_signature
from milter_wkd.openpgp.packets import (
    TAG_PUBLIC_KEY,
    TAG_PUBLIC_SUBKEY,
    TAG_SIGNATURE,
    TAG_USER_ID,
    frames,
)
from milter_wkd.store.schema import address_slot
from milter_wkd.store.view import SourceUnavailable
from milter_wkd.values import Address
from milter_wkd.web.cache import KeyCache, fingerprints, join_cleaned, split_keys
from milter_wkd.web.routes import HttpError

log = logging.getLogger(__name__)

PREFIXES = ("/pks/", "/vks/")
MAX_QUERY = 512
MAX_PATH = 256
Kind = Literal["fingerprint", "keyid", "address", "nothing"]
StartResponse = Callable[..., Any]

_HEX = re.compile(r"[0-9A-Fa-f]+")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            414: "URI Too Long", 500: "Internal Server Error", 501: "Not Implemented",
            503: "Service Unavailable"}
_VKS = "/vks/v1/"
_UPLOADS = ("/pks/add", "/vks/v1/upload", "/vks/v1/request-verify")


@dataclass(frozen=True, slots=True)
class Query:
    """One exact look-up: what is asked for (upper-case hex, or an address's text), and for
    HKP whether the index is wanted instead of the key."""

    kind: Kind
    value: str = ""
    index: bool = False


NOTHING = Query("nothing")


def parse_search(text: str, domains: Iterable[str]) -> Query:
    """The look-up an HKP `search` value (or a VKS path value) asks for. Raises HttpError(400)
    for a short key ID or malformed hex after `0x`; NOTHING for anything that is not an
    exact look-up of ours."""
    text = text.strip()
    if text[:2] in ("0x", "0X"):
        hex_ = text[2:]
        if not _HEX.fullmatch(hex_) or len(hex_) not in (8, 16, 40, 64):
            raise HttpError(400, "not a key ID or fingerprint")
        if len(hex_) == 8:
            raise HttpError(400, "short key IDs are not accepted: ask by fingerprint")
        return Query("keyid" if len(hex_) == 16 else "fingerprint", hex_.upper())
    if _HEX.fullmatch(text) and len(text) in (16, 40, 64):
        return Query("keyid" if len(text) == 16 else "fingerprint", text.upper())
    if text.startswith("="):  # gpg's exact-match prefix
        text = text[1:]
    if "*" in text or "%" in text or text.count("@") != 1 or len(text) > 254:
        return NOTHING
    try:
        address = Address.parse(text)
    except Refused:
        return NOTHING
    if address.domain.lower() not in {d.lower() for d in domains}:
        return NOTHING
    return Query("address", str(address))


def parse_hkp(query: str, domains: Iterable[str]) -> Query:
    """The look-up of a `/pks/lookup` query string (raises HttpError)."""
    if len(query) > MAX_QUERY:
        raise HttpError(414, "query too long")
    try:
        fields = parse_qsl(query, keep_blank_values=True, max_num_fields=8)
    except ValueError:
        raise HttpError(400, "malformed query") from None
    params: dict[str, str] = {}
    for name, value in fields:
        params.setdefault(name, value)
    op = params.get("op", "")
    if op not in ("get", "index"):
        if op in ("vindex", "stats", "hget", "x-email"):
            raise HttpError(501, f"op={op} is not implemented here")
        raise HttpError(400, "op must be get or index")
    search = params.get("search", "")
    if not search:
        raise HttpError(400, "search is required")
    found = parse_search(search, domains)
    return Query(found.kind, found.value, index=op == "index")


def parse_vks(path: str, domains: Iterable[str]) -> Query:
    """The look-up of a `/vks/v1/by-*` path (raises HttpError: 400 malformed, 404 unknown)."""
    if len(path) > MAX_PATH:
        raise HttpError(414, "path too long")
    what, _, value = path.removeprefix(_VKS).partition("/")
    if what == "by-fingerprint":
        if not _HEX.fullmatch(value) or len(value) not in (40, 64):
            raise HttpError(400, "not a fingerprint")
        return Query("fingerprint", value.upper())
    if what == "by-keyid":
        if not _HEX.fullmatch(value) or len(value) != 16:
            raise HttpError(400, "not a key ID")
        return Query("keyid", value.upper())
    if what == "by-email":
        try:
            text = unquote(value, errors="strict") if "%" in value else value
            address = Address.parse(text)
        except (Refused, UnicodeDecodeError):
            raise HttpError(400, "not an email address") from None
        if "*" in text or "<" in text or "%" in text:
            raise HttpError(400, "not an email address")
        found = parse_search(str(address), domains)
        return found if found.kind == "address" else NOTHING
    raise HttpError(404, "no such VKS resource")


# -- the index ------------------------------------------------------------------------------

def escape(text: bytes) -> str:
    """%-escape `:`, `%` and every octet outside printable ASCII (dirmngr unescapes)."""
    return "".join(chr(b) if 0x20 <= b < 0x7F and b not in (0x25, 0x3A) else f"%{b:02X}"
                   for b in text)


@dataclass(frozen=True, slots=True)
class _Listed:
    fingerprint: str
    algorithm: int
    bits: int
    created: int
    expires: int | None
    revoked: bool
    user_ids: tuple[tuple[bytes, int], ...]  # user ID octets, certification time


def _describe(key: bytes) -> _Listed:
    """What the index shows of one cleaned key (read from its packets: it was checked)."""
    primary = None
    revoked = False
    expires_after: int | None = None
    newest = -1
    user_ids: list[tuple[bytes, int]] = []
    current: bytes | None = None
    in_subkeys = False
    for tag, _, start, end in frames(key):
        body = key[start:end]
        if tag == TAG_PUBLIC_KEY:
            primary = parse_public_key(body)
        elif tag == TAG_PUBLIC_SUBKEY:
            in_subkeys, current = True, None
        elif tag == TAG_USER_ID:
            current = body
        elif tag == TAG_SIGNATURE and not in_subkeys:
            sig = parse_signature(body)
            if sig.sig_type == 0x20:
                revoked = True
            elif current is not None and 0x10 <= sig.sig_type <= 0x13:
                user_ids.append((current, sig.created))
                if sig.created > newest:  # the newest self-signature says the expiry
                    newest, expires_after = sig.created, sig.key_expires_after
            elif sig.sig_type == 0x1F and sig.created > newest:
                newest, expires_after = sig.created, sig.key_expires_after
    if primary is None:
        raise KeyRefused("no primary key")
    return _Listed(primary.fingerprint.hex().upper(), primary.algorithm, primary.bits,
                   primary.created,
                   primary.created + expires_after if expires_after else None,
                   revoked, tuple(user_ids))


def index_text(keys: Sequence[bytes], now: int | None = None) -> bytes:
    """The machine-readable index (draft-shaw-openpgp-hkp §5.2) of cleaned keys."""
    now = int(time.time()) if now is None else now
    lines = [f"info:1:{len(keys)}"]
    for key in keys:
        listed = _describe(key)
        expires = "" if listed.expires is None else str(listed.expires)
        flags = ("r" if listed.revoked else "") + (
            "e" if listed.expires is not None and listed.expires <= now else "")
        lines.append(f"pub:{listed.fingerprint}:{listed.algorithm}:{listed.bits}:"
                     f"{listed.created}:{expires}:{flags}")
        lines.extend(f"uid:{escape(uid)}:{created}::{flags}"
                     for uid, created in listed.user_ids)
    return "".join(line + "\n" for line in lines).encode("ascii")


def upload_text(domains: Sequence[DomainConfig]) -> bytes:
    """The answer to an upload: publish by mail instead."""
    lines = ["Uploads are not accepted here. Keys of this provider's users are published",
             "by the Web Key Service: let your mail client publish your key (WKS), or",
             "send it to the submission address of your domain:"]
    lines += [f"  {d.name}: {d.submission_address}" for d in domains]
    return "".join(line + "\n" for line in lines).encode("utf-8")


# -- the WSGI side ----------------------------------------------------------------------------

# Answers kept per responder process (see Keyserver.__call__).
MEMO_ENTRIES = 16384


class Keyserver:
    """Answers /pks/ and /vks/ requests from the WKD responder's cache (see the module
    docstring); `static_keys` are the submission addresses' keys by slot, as WKD serves
    them."""

    def __init__(self, cache: KeyCache, domains: Sequence[DomainConfig],
                 static_keys: Mapping[str, bytes], *, max_age: int = 300) -> None:
        self.cache = cache
        self.domains = frozenset(d.name.lower().rstrip(".") for d in domains)
        self.static_keys = static_keys
        self.upload = upload_text(domains)
        self._cache_control = f"public, max-age={max_age}"
        self._miss_cache_control = f"public, max-age={min(max_age, 60)}"
        # (path, query) of GET answers given from a complete mirror -> (status, headers,
        # body), valid while the cache's version stays the same.
        self._memo: dict[tuple[str, str], tuple[str, list[tuple[str, str]], bytes]] = {}
        self._memo_version = -1
        # Fingerprint of each static key -> its copies (one per submission address).
        self._static_by_fpr: dict[str, list[bytes]] = {}
        for body in static_keys.values():
            for key in split_keys(body):
                self._static_by_fpr.setdefault(fingerprints(key)[0], []).append(key)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse,
                 ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        cache = self.cache
        version = cache.version  # read before any answer (see KeyCache.version)
        if version != self._memo_version:
            self._memo, self._memo_version = {}, version
        asked = (environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""))
        if method == "GET" and cache.complete:
            # A repeated look-up from the same mirror: armoring a key costs ~50 us, the
            # memo nothing (bounded like the WKD memo, emptied when the mirror changes).
            known = self._memo.get(asked)
            if known is not None:
                start_response(known[0], list(known[1]))
                return [known[2]]
        complete = cache.complete
        extra: list[tuple[str, str]] = []
        try:
            status, content_type, body, extra = self._answer(
                method, environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""))
        except HttpError as exc:
            status, content_type = exc.status, "text/plain; charset=utf-8"
            body = self.upload if exc.status == 501 and exc.reason == "upload" else (
                exc.reason + "\n").encode()
        except SourceUnavailable as exc:
            log.warning("directory unavailable for a keyserver look-up: %s", exc)
            status, content_type = 503, "text/plain; charset=utf-8"
            body = b"directory unavailable\n"
            extra = [("Retry-After", "30")]
        except Exception:
            log.exception("unexpected failure answering %r",
                          environ.get("PATH_INFO", "")[:300])
            status, content_type, body = 500, "text/plain", b"internal error\n"
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Access-Control-Allow-Origin", "*"),
            ("Cache-Control", self._cache_control if status == 200
             else self._miss_cache_control if status == 404 else "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            *extra,
        ]
        status_line = f"{status} {_REASONS.get(status, 'Error')}"
        if method == "GET" and complete and status in (200, 404):
            if len(self._memo) >= MEMO_ENTRIES:
                self._memo.clear()  # bounded; what is asked again comes back
            self._memo[asked] = (status_line, headers, body)
        start_response(status_line, headers)
        return [b""] if method == "HEAD" else [body]

    def _answer(self, method: str, path: str, query: str,
                ) -> tuple[int, str, bytes, list[tuple[str, str]]]:
        if path in _UPLOADS:
            raise HttpError(501, "upload")
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"only GET and HEAD\n", [
                ("Allow", "GET, HEAD")]
        if path == "/pks/lookup":
            asked = parse_hkp(query, self.domains)
            keys = self._find(asked)
            if asked.index:
                if not keys:
                    return 404, "text/plain; charset=utf-8", b"info:1:0\n", []
                return 200, "text/plain; charset=utf-8", index_text(keys), []
            if not keys:
                return 404, "text/plain; charset=utf-8", b"no key found\n", []
            return 200, "application/pgp-keys", openpgp.armor_key(b"".join(keys)), []
        if path.startswith(_VKS):
            keys = self._find(parse_vks(path, self.domains))
            if not keys:
                return 404, "text/plain; charset=utf-8", b"no key found\n", []
            name = fingerprints(keys[0])[0]
            return 200, "application/pgp-keys", openpgp.armor_key(keys[0]), [
                ("Content-Disposition", f'attachment; filename="{name}.asc"')]
        raise HttpError(404, "no such keyserver resource")

    def _find(self, asked: Query) -> list[bytes]:
        """The keys (binary, cleaned) an exact look-up finds; [] for NOTHING."""
        if asked.kind == "address":
            key_slot = address_slot(Address.parse(asked.value))
            body = self.static_keys.get(key_slot) or self.cache.get(key_slot)
            return split_keys(body) if body else []
        if asked.kind in ("fingerprint", "keyid"):
            static = self._static(asked.value)
            if static is not None:
                return [static]
            found = self.cache.find_key(asked.value)
            return [found] if found else []
        return []

    def _static(self, wanted: str) -> bytes | None:
        for fpr, copies in self._static_by_fpr.items():
            if wanted in (fpr, fpr[-16:]) or any(
                    wanted in (f, f[-16:]) for f in fingerprints(copies[0])[1:]):
                return join_cleaned(copies)
        return None
