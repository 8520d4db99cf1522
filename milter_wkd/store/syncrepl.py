"""RFC 4533 content synchronization (refreshAndPersist) for the WKD responder: one
persistent sync search per process that tells the key cache every add, modify and delete
of a key holder as it happens, resumed with its cookie after a reconnect or a failover.

- `SyncFollower(config, base, filter, attributes, listener).run(stop)`: the loop. It
  connects as `store.connection` does (the [directory] uri list in order: libldap takes
  the first that answers, so a reconnect after the server died is a failover), sends the
  Sync Request control (critical) with the merged cookie it holds, and hands every
  message to the `SyncListener`: `entry` (added or modified, with the requested
  attributes), `delete` (by entryUUID; persist-phase deletes also name the DN: an entry
  deleted or modified out of the filter), `present` and `present_done` (the present
  phase of a resumed refresh without a session log: every UUID not presented is gone),
  `begin` (a search begins; not resumed: a full refresh, forget everything),
  `refresh_done` and `interrupted` (the search ended: changes are missed until the next
  `refresh_done`).
- Cookies (`parse_cookie`, `merge_cookie`): slapd 2.5's cookie is
  `rid=NNN[,sid=NNN],csn=<csn>[;<csn>...]`, one CSN per server ID (the third `#` field of
  a CSN). In the persist phase a cookie carries only the CSN of the provider that made
  the change; resuming with that partial cookie makes the provider resend every entry of
  the others. The follower keeps the newest CSN per server ID of every cookie it saw and
  resumes with all of them (`rid=NNN,csn=a;b`, no sid: the responder is no server).
- Counters for logs and tests: `refreshes` (sync searches sent), `resumes` (of them, with
  a cookie), `last_refresh_entries` / `last_refresh_present` / `last_refresh_deletes`
  (entries, present UUIDs and deleted UUIDs received in the refresh phase of the latest
  search: a resume that resends (nearly) nothing proves the cookie worked),
  `persist_entries`. A log line at the end of every refresh names them.

Configuration: the [directory] section the view gets (uri list, bind, ca_file, timeout).

Failures: a server without the sync control (no syncprov overlay, or the account may not
use it: unavailableCriticalExtension, protocolError, unwillingToPerform, insufficient
access) raises `SyncUnsupported` out of `run` (the cache then polls contextCSN). A lost
connection or any other LDAP error is logged once and retried every `retry` seconds (up
to 5 s) with the cookie held; `e-syncRefreshRequired` (4096: the provider lost the state
the cookie names) starts a full refresh from no cookie. The listener's exceptions end
this search and resume it after `retry` (nothing is lost: the cookie only moves when a
message was handled).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import ldap
from ldap.controls import ResponseControl
from ldap.syncrepl import SyncDoneControl, SyncInfoMessage, SyncRequestControl

from milter_wkd.config import DirectoryConfig
from milter_wkd.store.connection import ConnectionPool, close_connection, ldap_reason
from milter_wkd.store.schema import Entry
from milter_wkd.store.view import csn_server

log = logging.getLogger(__name__)

SYNC_STATE_OID = "1.3.6.1.4.1.4203.1.9.1.2"
SYNC_REFRESH_REQUIRED = 4096  # e-syncRefreshRequired (RFC 4533 section 2.6)
# Result codes that mean "no sync here": the control is unknown or refused.
UNSUPPORTED_RESULTS = (2, 12, 50, 53)
STATES = {0: "present", 1: "add", 2: "modify", 3: "delete"}
# Seconds one wait for a message lasts: how soon `stop` is noticed.
POLL_SECONDS = 0.5


class SyncUnsupported(Exception):
    """The directory does not offer RFC 4533 sync to this account."""


# -- cookies ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Cookie:
    rid: str = "000"
    csns: dict[str, str] = field(default_factory=dict)  # server ID -> newest CSN
    extra: tuple[tuple[str, str], ...] = ()  # other fields, kept as they came

    def text(self) -> str:
        parts = [f"rid={self.rid}"]
        if self.csns:
            parts.append("csn=" + ";".join(self.csns[sid] for sid in sorted(self.csns)))
        return ",".join([*parts, *(f"{k}={v}" for k, v in self.extra)])


def parse_cookie(value: str | bytes | None) -> Cookie:
    """A slapd sync cookie (`name=value` fields separated by commas; csn= holds CSNs
    separated by semicolons). Unknown fields (2.5's delcsn=) are kept; a malformed cookie
    gives an empty one (the caller then asks for a full refresh rather than trusting half
    of it)."""
    if not value:
        return Cookie()
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    rid = "000"
    csns: dict[str, str] = {}
    extra: list[tuple[str, str]] = []
    for item in text.split(","):
        name, eq, val = item.strip().partition("=")
        if not eq:
            return Cookie()
        if name == "rid":
            rid = val
        elif name == "csn":
            for part in val.split(";"):
                csn = part.strip()
                if csn and csn > csns.get(csn_server(csn), ""):
                    csns[csn_server(csn)] = csn
        elif name != "sid":  # the sending server's ID: not ours to send back
            extra.append((name, val))
    return Cookie(rid, csns, tuple(extra))


def merge_cookie(held: Cookie, new: Cookie) -> Cookie:
    """The newest CSN per server ID of both; the rid of the new one, its other fields
    over the held ones."""
    csns = dict(held.csns)
    for sid, csn in new.csns.items():
        if csn > csns.get(sid, ""):
            csns[sid] = csn
    return Cookie(new.rid, csns, tuple({**dict(held.extra), **dict(new.extra)}.items()))


# -- the Sync State control, decoded without pyasn1 ------------------------------------


def _ber_item(data: bytes, at: int) -> tuple[int, bytes, int]:
    """One BER element at `at`: its tag, its contents and the offset after it."""
    if at + 2 > len(data):
        raise ValueError("truncated BER element")
    tag, length = data[at], data[at + 1]
    at += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or at + count > len(data):
            raise ValueError("bad BER length")
        length = int.from_bytes(data[at:at + count], "big")
        at += count
    if at + length > len(data):
        raise ValueError("truncated BER contents")
    return tag, data[at:at + length], at + length


def decode_sync_state(value: bytes) -> tuple[str, bytes, bytes | None]:
    """syncStateValue ::= SEQUENCE { state ENUMERATED, entryUUID OCTET STRING,
    cookie OCTET STRING OPTIONAL } (RFC 4533 2.3): (state name, UUID, cookie). pyasn1
    costs ~100 us a message; a cold refresh of 1,000,000 entries would spend minutes."""
    tag, body, end = _ber_item(value, 0)
    if tag != 0x30 or end != len(value):
        raise ValueError("syncStateValue is not one SEQUENCE")
    tag, state, at = _ber_item(body, 0)
    if tag != 0x0A or len(state) != 1 or state[0] not in STATES:
        raise ValueError("bad syncStateValue state")
    tag, uuid, at = _ber_item(body, at)
    if tag != 0x04:
        raise ValueError("bad syncStateValue entryUUID")
    cookie = None
    if at < len(body):
        tag, cookie, at = _ber_item(body, at)
        if tag != 0x04:
            raise ValueError("bad syncStateValue cookie")
    if at != len(body):
        raise ValueError("trailing data in syncStateValue")
    return STATES[state[0]], uuid, cookie


class FastSyncState(ResponseControl):  # type: ignore[misc]
    controlType = SYNC_STATE_OID

    state = ""
    entryUUID = b""
    cookie: bytes | None = None

    def decodeControlValue(self, encodedControlValue: bytes) -> None:
        self.state, self.entryUUID, self.cookie = decode_sync_state(encodedControlValue)


RESPONSE_CONTROLS = {SYNC_STATE_OID: FastSyncState,
                     SyncDoneControl.controlType: SyncDoneControl}


# -- the follower ----------------------------------------------------------------------


class SyncListener(Protocol):
    def begin(self, resumed: bool) -> None:
        """A sync search begins: resumed from a cookie, or (not resumed) a full refresh:
        every entry follows as `entry`; what is not sent before `refresh_done` does not
        exist."""

    def entry(self, uuid: bytes, entry: Entry, refreshing: bool) -> None:
        """An entry added, modified, or (refreshing) sent because it changed or exists."""

    def delete(self, uuids: Sequence[bytes], dn: str | None) -> None:
        """Entries deleted or out of the filter (dn: persist phase only)."""

    def present(self, uuids: Sequence[bytes]) -> None:
        """Entries unchanged since the cookie (present phase of a resumed refresh)."""

    def present_done(self) -> None:
        """End of a present phase: every entry neither presented nor sent is gone."""

    def refresh_done(self, resumed: bool) -> None:
        """The refresh phase ended; from now on every change comes as it happens."""

    def interrupted(self) -> None:
        """The search ended (connection lost, server gone): changes are not seen until
        the next search's `refresh_done`."""


class SyncFollower:
    def __init__(self, config: DirectoryConfig, base: str, filt: str,
                 attributes: Sequence[str], listener: SyncListener, *,
                 retry: float = 0.5) -> None:
        self.config = config
        self.base = base
        self.filter = filt
        self.attributes = list(attributes)
        self.listener = listener
        self.retry = retry
        self.cookie: Cookie | None = None
        self.refreshes = 0
        self.resumes = 0
        self.last_refresh_entries = 0
        self.last_refresh_present = 0
        self.last_refresh_deletes = 0
        self.persist_entries = 0
        self.refreshing = False
        self.in_persist = threading.Event()  # set while in the persist phase
        self._conn: Any = None
        self._present_phase = False

    def run(self, stop: threading.Event) -> None:
        """Follow changes until `stop` is set (raises SyncUnsupported)."""
        down: str | None = None
        wait = self.retry
        while not stop.is_set():
            try:
                self._conn = self._open()
                self._follow(stop)
                down, wait = None, self.retry
            except SyncUnsupported:
                raise
            except Exception as exc:  # noqa: BLE001 (any failure: resume from the cookie)
                reason = (ldap_reason(exc) if isinstance(exc, ldap.LDAPError)
                          else getattr(exc, "reason", None) or str(exc))
                if _result(exc) == SYNC_REFRESH_REQUIRED:
                    log.warning("directory sync: the server cannot resume from our cookie "
                                "(refresh required): full refresh")
                    self.cookie = None
                    continue
                if down != reason:
                    log.warning("directory sync with %s interrupted (%s): resuming with "
                                "the cookie held", self.config.uri, reason)
                    down = reason
                wait = min(wait * 2, 5.0)
            finally:
                if self.in_persist.is_set() or self.refreshing:
                    self.listener.interrupted()
                self.in_persist.clear()
                if self._conn is not None:
                    close_connection(self._conn)
                    self._conn = None
            stop.wait(wait)

    def _open(self) -> Any:
        conn = ConnectionPool(self.config).open()
        # A dead peer (host gone, not a closed socket) is noticed within ~20 s.
        for name, value in (("OPT_X_KEEPALIVE_IDLE", 10), ("OPT_X_KEEPALIVE_PROBES", 3),
                            ("OPT_X_KEEPALIVE_INTERVAL", 3)):
            if hasattr(ldap, name):
                with contextlib.suppress(ldap.LDAPError):
                    conn.set_option(getattr(ldap, name), value)
        return conn

    def _follow(self, stop: threading.Event) -> None:
        resumed = self.cookie is not None
        self.listener.begin(resumed)
        request = SyncRequestControl(criticality=True, mode="refreshAndPersist",
                                     cookie=self.cookie.text() if self.cookie else None)
        self.refreshes += 1
        self.resumes += resumed
        self.last_refresh_entries = self.last_refresh_present = 0
        self.last_refresh_deletes = 0
        self.refreshing = True
        self._present_phase = False
        try:
            msgid = self._conn.search_ext(self.base, ldap.SCOPE_SUBTREE, self.filter,
                                          self.attributes, serverctrls=[request])
        except ldap.LDAPError as exc:
            self._unsupported(exc)
            raise
        while not stop.is_set():
            try:
                rtype, data, _mid, controls, _name, _value = self._conn.result4(
                    msgid, all=0, timeout=POLL_SECONDS, add_ctrls=1, add_intermediates=1,
                    resp_ctrl_classes=RESPONSE_CONTROLS)
            except ldap.TIMEOUT:
                continue
            except ldap.LDAPError as exc:
                if self.refreshes == 1 and self.refreshing:
                    self._unsupported(exc)
                raise
            if rtype == ldap.RES_SEARCH_ENTRY:
                for dn, attrs, entry_controls in data:
                    self._entry(dn, attrs, entry_controls)
            elif rtype == ldap.RES_INTERMEDIATE:
                for name, value, _controls in data:
                    if name == SyncInfoMessage.responseName:
                        self._info(SyncInfoMessage(value), resumed)
            elif rtype == ldap.RES_SEARCH_RESULT:
                # refreshAndPersist ends only when the server ends it (shutdown, limits):
                # resume. A SyncDone may carry a last cookie.
                for control in controls or ():
                    if isinstance(control, SyncDoneControl) and control.cookie:
                        self._cookie(control.cookie)
                raise ldap.SERVER_DOWN({"desc": "the server ended the sync search"})
        with contextlib.suppress(ldap.LDAPError):
            self._conn.abandon_ext(msgid)

    def _unsupported(self, exc: ldap.LDAPError) -> None:
        if _result(exc) in UNSUPPORTED_RESULTS:
            raise SyncUnsupported(ldap_reason(exc)) from None

    def _entry(self, dn: str | None, attrs: Any, controls: Any) -> None:
        state = next((c for c in controls or () if isinstance(c, FastSyncState)), None)
        if state is None or dn is None:
            return  # a search reference, or an entry outside the sync (cannot happen)
        if state.state == "delete":
            self.last_refresh_deletes += self.refreshing
            self.listener.delete([state.entryUUID], dn)
        elif state.state == "present":
            self.last_refresh_present += 1
            self.listener.present([state.entryUUID])
        else:
            if self.refreshing:
                self.last_refresh_entries += 1
            else:
                self.persist_entries += 1
            self.listener.entry(state.entryUUID, Entry(dn, attrs), self.refreshing)
        if state.cookie:
            self._cookie(state.cookie)

    def _info(self, info: SyncInfoMessage, resumed: bool) -> None:
        if info.newcookie is not None:
            self._cookie(info.newcookie)
            return
        if info.syncIdSet is not None:
            uuids = [uuid.UUID(u).bytes for u in info.syncIdSet["syncUUIDs"]]
            if info.syncIdSet["refreshDeletes"]:
                self.last_refresh_deletes += len(uuids)
                self.listener.delete(uuids, None)
            else:
                self._present_phase = True
                self.last_refresh_present += len(uuids)
                self.listener.present(uuids)
            if info.syncIdSet.get("cookie"):
                self._cookie(info.syncIdSet["cookie"])
            return
        for phase, deletes in ((info.refreshPresent, False), (info.refreshDelete, True)):
            if phase is None:
                continue
            # The end of a present phase: what was neither presented nor sent is gone
            # (a full refresh has nothing to compare with: it started empty).
            if not deletes and resumed:
                self.listener.present_done()
            if phase.get("cookie"):
                self._cookie(phase["cookie"])
            if phase.get("refreshDone", True):
                self._refresh_done(resumed)

    def _refresh_done(self, resumed: bool) -> None:
        if not self.refreshing:
            return
        self.refreshing = False
        log.info("directory sync %s on %s: %d entries, %d present, %d deleted in the "
                 "refresh; following changes", "resumed" if resumed else "started",
                 self.config.uri, self.last_refresh_entries, self.last_refresh_present,
                 self.last_refresh_deletes)
        self.listener.refresh_done(resumed)
        self.in_persist.set()

    def _cookie(self, value: str | bytes) -> None:
        new = parse_cookie(value)
        self.cookie = new if self.cookie is None else merge_cookie(self.cookie, new)


def _result(exc: BaseException) -> int | None:
    detail = exc.args[0] if exc.args else None
    return detail.get("result") if isinstance(detail, dict) else None
