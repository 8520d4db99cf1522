"""Which message a log line is about: the Postfix queue id, on every line of its handling.

The milter adapter (milter_wkd.milter) sets the queue id as soon as Postfix names it (macro
`i`) and clears it at end of message, abort and close. `QueueIdFilter`, installed on the log
handler, adds it to every record that passes, whichever module logs (the store and the
publication code know nothing of messages): `queue_id` is the id or "-", `queue_prefix` is
"<id>: " or "" (`FORMAT` uses it, so lines outside a message look as before).

The id lives in a `contextvars.ContextVar`: pymilter keeps one Python thread state, hence one
context, per milter connection, so connections handled at once never see each other's id,
and a new thread (the key follower) starts without one. The filter must run in the thread
that logs (a handler's filters do; a QueueHandler's listener thread would not).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

FORMAT = "%(asctime)s %(name)s %(levelname)s %(queue_prefix)s%(message)s"
NO_QUEUE_ID = "-"

_queue_id: ContextVar[str | None] = ContextVar("milter_wkd_queue_id", default=None)


def set_queue_id(queue_id: str | None) -> None:
    """The message being handled from now on in this context; "-" or "" mean not known yet."""
    _queue_id.set(queue_id if queue_id and queue_id != NO_QUEUE_ID else None)


def clear() -> None:
    """No message any more (end of message, abort, close)."""
    _queue_id.set(None)


def current() -> str | None:
    return _queue_id.get()


@contextmanager
def message(queue_id: str | None) -> Iterator[None]:
    """The queue id for the lines logged inside, restored afterwards (in-process callers)."""
    token = _queue_id.set(queue_id if queue_id and queue_id != NO_QUEUE_ID else None)
    try:
        yield
    finally:
        _queue_id.reset(token)


class QueueIdFilter(logging.Filter):
    """Adds `queue_id` and `queue_prefix` to each record; lets every record pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        queue_id = _queue_id.get()
        record.queue_id = queue_id or NO_QUEUE_ID
        record.queue_prefix = f"{queue_id}: " if queue_id else ""
        return True


def install(handler: logging.Handler) -> None:
    """Let `handler` format with FORMAT (or any format naming queue_id or queue_prefix)."""
    if not any(isinstance(f, QueueIdFilter) for f in handler.filters):
        handler.addFilter(QueueIdFilter())
