"""Lane: a named group of upstream servers with its own pools, balancing, health and limits.

Passive health follows nginx: a server that fails `max_fails` times within `fail_timeout` is
skipped for `fail_timeout`; a lane with a single server never marks it down (there is nothing
else to send to). What counts as a failure is the lane's `retry_on` (nginx
`proxy_next_upstream`): `error` (connect refused/reset, broken response), `timeout`, `http_5xx`.
"""

from __future__ import annotations

import asyncio
import logging
import random

from laneproxy.config import LaneConfig, ServerConfig
from laneproxy.pool import Pool
from laneproxy.queue import QUEUED, Histogram, LaneQueue

log = logging.getLogger("laneproxy.lane")


WATCH_EVERY = 0.2  # seconds between looks at queued waiters whose reading is paused


class Server:
    """One upstream endpoint of a lane: its pool, passive and active health, counters."""

    __slots__ = (
        "host", "port", "name", "name_b", "cfg", "pool", "weight", "backup", "in_flight", "current_weight",
        "fails", "fail_window_start", "down_until", "health_ok", "requests", "failures", "retried",
        "marked_down",
    )

    def __init__(self, scfg: ServerConfig, cfg: LaneConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.host, self.port = scfg.address
        self.name = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self.name_b = self.name.encode()  # for the access log
        self.cfg = scfg
        self.pool = Pool(self.name, cfg.keepalive, cfg.keepalive_timeout, cfg.keepalive_requests, loop)
        self.weight = scfg.weight
        self.backup = scfg.backup
        self.in_flight = 0
        self.current_weight = 0
        self.fails = 0
        self.fail_window_start = 0.0
        self.down_until = 0.0
        self.health_ok = True  # active health (lanes with `health:`); passive uses down_until
        # Counters, plain integers read at scrape time.
        self.requests = 0
        self.failures = 0
        self.retried = 0
        self.marked_down = 0

    def available(self, now: float) -> bool:
        return not self.cfg.down and self.health_ok and self.down_until <= now

    def __repr__(self) -> str:
        return f"<Server {self.name} in_flight={self.in_flight} {self.pool!r}>"


class Lane:
    """`pick()` chooses the server for the next try; `record_*` feed passive health."""

    def __init__(self, name: str, cfg: LaneConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.name_b = name.encode()  # for the access log
        self.cfg = cfg
        self.loop = loop
        self.servers = [Server(s, cfg, loop) for s in cfg.servers]
        self.primary = [s for s in self.servers if not s.backup]
        self.backups = [s for s in self.servers if s.backup]
        self.single = self.servers[0] if len(self.servers) == 1 else None
        self._pick = {"round_robin": self._round_robin, "least_conn": self._least_conn, "p2c": self._p2c}[
            cfg.balance
        ]
        self._rng = random.Random()
        # Hot-path copies of the settings (attribute lookups on pydantic models are slower).
        self.max_body = cfg.max_body
        self.connect_timeout = cfg.connect_timeout
        self.read_timeout = cfg.read_timeout
        self.send_timeout = cfg.send_timeout
        self.retries = cfg.retries
        self.retry_timeout = cfg.retry_timeout
        self.retry_on = frozenset(cfg.retry_on)
        self.upgrade_tokens = frozenset(t.encode() for t in cfg.upgrade)
        # Admission (issue 6): only lanes with a limit pay for the queue.
        self.limited = cfg.limit > 0
        self.queue = LaneQueue(
            cfg.limit, cfg.queue, cfg.queue_timeout, target=cfg.queue_target, interval=cfg.queue_interval,
            clock=loop.time,
        )
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at = 0.0
        self._watch: asyncio.TimerHandle | None = None
        # Counters, plain integers read at scrape time.
        self.in_flight = 0
        self.served = 0
        self.failed = 0
        self.upstream_time = Histogram()  # seconds from admission to the end of the response

    # -- admission ------------------------------------------------------------------------------

    def admit(self, waiter: object, priority: int) -> int:
        verdict = self.queue.admit(waiter, priority)
        if verdict == QUEUED:
            self._arm_expiry()
            if self._watch is None:
                self._watch = self.loop.call_later(WATCH_EVERY, self._on_watch)
        return verdict

    def release_slot(self) -> object | None:
        """An admitted exchange ended: the waiter that takes its slot now, if any."""
        waiter = self.queue.release()
        if len(self.queue):
            self._arm_expiry()
        return waiter

    def pass_slot(self) -> None:
        """A slot came free (an exchange ended, or a waiter turned out gone): the next waiter
        takes it now, if any."""
        waiter = self.release_slot()
        if waiter is not None:
            waiter.admitted()  # type: ignore[attr-defined]

    def leave_queue(self, waiter: object) -> None:
        self.queue.remove(waiter)

    def _arm_expiry(self) -> None:
        when = self.queue.next_deadline()
        if when is None:
            return
        if self._expiry is None or self._expiry_at > when:
            if self._expiry is not None:
                self._expiry.cancel()
            self._expiry_at = when
            self._expiry = self.loop.call_at(when, self._on_expiry)

    def _on_watch(self) -> None:
        # Waiters whose reading is paused (a body, a pipelined request behind) see no FIN or
        # reset by themselves: a look every WATCH_EVERY lets a client that left go at once.
        self._watch = None
        for waiter in self.queue.waiters():
            waiter.watch_while_queued()  # type: ignore[attr-defined]
        if len(self.queue):
            self._watch = self.loop.call_later(WATCH_EVERY, self._on_watch)

    def _on_expiry(self) -> None:
        self._expiry = None
        for waiter, reason in self.queue.expire():
            waiter.shed(reason)  # type: ignore[attr-defined]
        if len(self.queue):
            self._arm_expiry()

    # -- choosing a server ------------------------------------------------------------------------

    def pick(self, tried: tuple[Server, ...] = ()) -> Server | None:
        """The server for the next try, skipping `tried` and unavailable ones; None = none left."""
        single = self.single
        if single is not None:
            return None if tried else single  # one server: never marked down, nowhere else to go
        candidates = self._candidates(tried)
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        return self._pick(candidates)

    def can_try_another(self, tried: tuple[Server, ...]) -> bool:
        """Would `pick(tried)` find a server? (Without moving the balancer's state.)"""
        return not tried if self.single is not None else bool(self._candidates(tried))

    def _candidates(self, tried: tuple[Server, ...]) -> list[Server]:
        """The available servers not yet tried: primaries, else backups (nginx `backup`)."""
        now = self.loop.time()
        return [s for s in self.primary if s not in tried and s.available(now)] or [
            s for s in self.backups if s not in tried and s.available(now)
        ]

    @staticmethod
    def _round_robin(candidates: list[Server]) -> Server:
        # nginx's smooth weighted round robin: spreads a weight-5 server's turns evenly.
        total = 0
        best = candidates[0]
        for s in candidates:
            s.current_weight += s.weight
            total += s.weight
            if s.current_weight > best.current_weight:
                best = s
        best.current_weight -= total
        return best

    def _least_conn(self, candidates: list[Server]) -> Server:
        best = min(s.in_flight / s.weight for s in candidates)
        ties = [s for s in candidates if s.in_flight / s.weight == best]
        return ties[0] if len(ties) == 1 else self._round_robin(ties)

    def _p2c(self, candidates: list[Server]) -> Server:
        a, b = self._rng.sample(candidates, 2)
        return a if a.in_flight / a.weight <= b.in_flight / b.weight else b

    # -- passive health -----------------------------------------------------------------------------

    def record_failure(self, server: Server) -> None:
        server.failures += 1
        if self.single is not None or server.cfg.max_fails == 0:
            return
        now = self.loop.time()
        max_fails, fail_timeout = server.cfg.max_fails, server.cfg.fail_timeout
        if server.fails < max_fails and now - server.fail_window_start > fail_timeout:
            server.fails = 0  # the earlier failures are outside the window
        if server.fails == 0:
            server.fail_window_start = now
        server.fails += 1
        if server.fails >= max_fails:
            # Down for fail_timeout; the count stays, so after that one more failure (the first
            # request it gets) takes it out again at once, as nginx does.
            if server.down_until <= now:
                server.marked_down += 1
                log.warning(
                    "upstream %s (lane %s): %d failure(s) within %gs, skipped for %gs",
                    server.name, self.name, max_fails, fail_timeout, fail_timeout,
                )
            server.down_until = now + fail_timeout

    def record_success(self, server: Server) -> None:
        """Clears the failures only once they are past: a success between failures inside the
        window does not (nginx: `accessed < checked`), so a flapping server is still taken out."""
        if server.fails:
            now = self.loop.time()
            if server.fails >= server.cfg.max_fails:
                if server.down_until <= now:  # it came back after its time out
                    server.fails = 0
            elif now - server.fail_window_start > server.cfg.fail_timeout:
                server.fails = 0

    def shed_waiters(self) -> None:
        """The proxy stops: whoever still waits gets 503 now (never sent upstream, safe to retry)."""
        for waiter in self.queue.drain():
            waiter.shed("stopping")  # type: ignore[attr-defined]

    def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for server in self.servers:
            server.pool.close()

    def stats(self) -> dict[str, object]:
        now = self.loop.time()
        return {
            "in_flight": self.in_flight, "served": self.served, "failed": self.failed,
            "limit": self.cfg.limit, "queue": self.queue.stats(),
            "servers": {
                s.name: {
                    **s.pool.stats(), "in_flight": s.in_flight, "requests": s.requests,
                    "failures": s.failures, "retried": s.retried, "up": s.available(now),
                    "backup": s.backup, "weight": s.weight,
                }
                for s in self.servers
            },
        }

    def __repr__(self) -> str:
        return f"<Lane {self.name} [in flight {self.in_flight}, servers {len(self.servers)}]>"
