"""Pool: idle upstream connections for one server. Knows nothing about HTTP.

Theory of operation
-------------------
Rule 1. A connection is either active (lent out by `acquire`) or idle (in `_idle`, stamped with
the monotonic time it went idle). The pool never reads or writes; it only keeps, hands out and
closes opaque connections (objects with `close()`, `is_closed`, a `uses` count, an `expires_at` time and
`still_open(idle_seconds)`, a last check at the moment the connection is taken).

Rule 2. `acquire()` takes the most recently used idle connection (LIFO: the least likely to
have been closed by the upstream's own idle timer) and drops expired ones on the way.
Expiry also runs from a sweep timer, oldest first, so idle sockets do not outlive
`keepalive_timeout` when no request comes.

Rule 3. `release(conn, reusable)` is the single keep-or-close decision: the caller says whether
the exchange ended clean (request written, response read, no error); the pool adds its own
limits (`keepalive` idle slots, `keepalive_requests` uses).

Rule 4. An idle connection that sees EOF or unsolicited bytes calls `discard(conn)` itself.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


class Pool:
    __slots__ = (
        "key", "max_idle", "idle_timeout", "max_uses", "loop",
        "_idle", "active", "connecting", "_sweep", "created", "reused",
    )

    def __init__(
        self, key: str, max_idle: int, idle_timeout: float, max_uses: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.key = key
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.max_uses = max_uses
        self.loop = loop
        self._idle: deque[tuple[Any, float]] = deque()
        self.active = 0
        self.connecting = 0
        self._sweep: asyncio.TimerHandle | None = None
        self.created = 0
        self.reused = 0

    @property
    def idle(self) -> int:
        return len(self._idle)

    def acquire(self) -> Any | None:
        """An idle connection still inside its idle timeout, or None (the caller connects)."""
        idle = self._idle
        if not idle:
            return None
        now = self.loop.time()
        oldest_ok = now - self.idle_timeout
        while idle:
            conn, since = idle.pop()
            if since > oldest_ok and conn.expires_at > now and conn.still_open(now - since):
                self.active += 1
                self.reused += 1
                return conn
            conn.close()
        return None

    def add_active(self) -> None:
        """A freshly connected connection is lent out."""
        self.active += 1
        self.created += 1

    def release(self, conn: Any, reusable: bool) -> None:
        self.active -= 1
        if (
            reusable
            and not conn.is_closed
            and conn.uses < self.max_uses
            and len(self._idle) < self.max_idle
            and self.idle_timeout > 0
        ):
            self._idle.append((conn, self.loop.time()))
            if self._sweep is None:
                self._sweep = self.loop.call_later(self.idle_timeout, self._sweep_expired)
        else:
            conn.close()

    def discard(self, conn: Any) -> None:
        """An idle connection went bad on its own (EOF, stray bytes): forget it."""
        for i, (c, _) in enumerate(self._idle):
            if c is conn:
                del self._idle[i]
                break

    def _sweep_expired(self) -> None:
        self._sweep = None
        idle = self._idle
        oldest_ok = self.loop.time() - self.idle_timeout
        while idle and idle[0][1] <= oldest_ok:
            conn, _ = idle.popleft()
            conn.close()
        if idle:
            delay = max(idle[0][1] - oldest_ok, 0.01)
            self._sweep = self.loop.call_later(delay, self._sweep_expired)

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        while self._idle:
            conn, _ = self._idle.pop()
            conn.close()

    def stats(self) -> dict[str, int]:
        return {
            "active": self.active, "idle": len(self._idle), "connecting": self.connecting,
            "created": self.created, "reused": self.reused,
        }

    def __repr__(self) -> str:
        return f"<Pool {self.key} [active {self.active}, idle {len(self._idle)}]>"
