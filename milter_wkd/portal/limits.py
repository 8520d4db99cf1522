"""Sliding-window rate limits, in memory: at most `limit` events per key within `window`
seconds. Used for password attempts per account and per client address (one process's
memory: with several workers, each counts on its own). Thread-safe."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

# Keys kept before stale ones are swept out (a flood of client addresses costs bounded memory).
_SWEEP_AT = 10_000


class SlidingWindow:
    def __init__(self, limit: int, window: float, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """Count an event for key, unless key had `limit` within the window (then False,
        and nothing is counted)."""
        now = self.clock()
        with self._lock:
            if len(self._events) >= _SWEEP_AT:
                self._sweep(now)
            events = self._events.setdefault(key, deque())
            while events and events[0] <= now - self.window:
                events.popleft()
            if len(events) >= self.limit:
                return False
            events.append(now)
            return True

    def retry_after(self, key: str) -> int:
        """Seconds until key may have another event (0: now)."""
        now = self.clock()
        with self._lock:
            events = self._events.get(key)
            if not events or len(events) < self.limit:
                return 0
            return max(1, int(events[0] + self.window - now) + 1)

    def _sweep(self, now: float) -> None:
        for key in [k for k, v in self._events.items() if not v or v[-1] <= now - self.window]:
            del self._events[key]
