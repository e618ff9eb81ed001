"""LaneQueue: admission for one lane (a slot limit, a bounded queue, CoDel, priority classes).

Theory of operation
-------------------
Rule 1. Slots. At most `limit` exchanges are in flight (`limit` 0: no limit, `admit` always says
GO and only counts). `admit` says GO while a slot is free and nobody queues, QUEUED while fewer
than `size` waiters queue, and FULL otherwise (`size` 0: FULL as soon as the lane is at its limit).
`release` frees the caller's slot and hands it straight to the waiter it returns, if any, so a
slot never sits idle while somebody waits and the in-flight count does not move on a handoff.

Rule 2. Order. One deque per priority class (0 high, 1 normal, 2 low), oldest at the left. While
the queue drains (not overloaded) the next waiter is the class head with the smallest
`enqueued + class * aging`: FIFO within a class; a higher class jumps ahead of waiters that
arrived less than `aging` seconds per class before it; so a waiter's priority improves by one
class per `aging` seconds waited and no class starves. Default `aging` = `target`.

Rule 3. Overload (CoDel, RFC 8289, as adapted for request queues in "Fail at Scale"). CoDel runs
only while the queue is non-empty. An interval starts when the queue gets its first waiter; at
each handoff the wait is sampled (the served waiter's sojourn; in overload, where LIFO makes that
sample meaningless, the age of the oldest waiter), and at the interval's end the oldest waiter's
age is sampled too (so an interval without any handoff counts). If the interval's minimum sample
is above `target`, the queue is standing: `overloaded` turns on; if it is at or below, it turns
off. Emptying the queue turns it off at once.

Rule 4. In overload the newest waiter of the highest non-empty class is served first (LIFO;
priority is strict, so the lower classes are the ones that get shed), and waiters older than
`2 * target` are shed with reason 'codel': the ones that do get a slot are those whose clients
are still likely to be waiting.

Rule 5. Shedding. A waiter whose age reaches `timeout` is shed with reason 'timeout' (whatever
the mode); `remove` (client gone) takes a waiter out at once ('client_gone'; the entry is marked
dead and skipped later, `len()` stays exact). `expire()` returns the shed waiters for the caller
to answer 503; `release` and `admit` also drop due waiters first (a waiter never gets a slot after
its deadline) and keep them for the next `expire()`, so every waiter leaves exactly once: handed
a slot by `release`, returned by `expire`, or removed (`remove` says False once it was shed).
`next_deadline()` is never late and is early at most once per interval; call it again after
every call, since any of them may move it.

Rule 6. Defaults from the lane's `queue_timeout` T (see `codel_defaults`): target = T/10 within
[5 ms, 5 s] (a wait that a queue which keeps up dips below now and then; Facebook uses 5 ms for
RPCs of milliseconds, a lane of 200 ms requests needs more); interval = min(20 * target, T/2),
at least target: RFC 8289's 20:1 ratio, but short enough that CoDel takes over before FIFO
waiters start timing out.

Rule 7. Retry-After. Completions per busy slot-second (both exponentially decayed with RATE_TAU
seconds of busy time, so idle periods neither count nor decay) times `limit` estimate the
lane's throughput; `retry_after()` = ceil((len + 1) / throughput), within [1, ceil(timeout)].
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from itertools import accumulate

GO, QUEUED, FULL = 0, 1, 2
HIGH, NORMAL, LOW = 0, 1, 2
PRIORITIES = {"high": HIGH, "normal": NORMAL, "low": LOW}
SHED_REASONS = ("full", "timeout", "codel", "client_gone", "stopping")
SHED_WHY = {"timeout": "waited past queue_timeout", "codel": "overloaded, shed oldest waiters",
            "stopping": "the proxy is stopping"}  # the 503's reason, for waiters the queue gives up
WAIT_BOUNDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_TAU = 10.0  # seconds of busy time over which the throughput estimate forgets
_INF = math.inf


def codel_defaults(timeout: float) -> tuple[float, float]:
    """(target, interval) derived from a lane's queue_timeout (Rule 6)."""
    target = min(max(timeout / 10, 0.005), 5.0)
    return target, max(target, min(20 * target, timeout / 2))


class Histogram:
    """Bucket counts over fixed upper bounds (`le`, last bucket +Inf), plus sum and count."""

    __slots__ = ("bounds", "buckets", "sum", "count")

    def __init__(self, bounds: tuple[float, ...] = WAIT_BOUNDS) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.buckets[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[int]:
        """Counts per bound as Prometheus exposes them (each includes the ones below)."""
        return list(accumulate(self.buckets))


class _Entry:
    __slots__ = ("waiter", "t", "cls", "alive")

    def __init__(self, waiter: object, t: float, cls: int) -> None:
        self.waiter = waiter
        self.t = t
        self.cls = cls
        self.alive = True


class LaneQueue:
    """Admission for one lane: at most `limit` exchanges in flight, up to `size` waiters."""

    def __init__(self, limit: int, size: int, timeout: float, *, target: float | None = None,
                 interval: float | None = None, clock: Callable[[], float] = time.monotonic,
                 aging: float | None = None) -> None:
        if limit < 0 or size < 0 or timeout < 0:
            raise ValueError("limit, size and timeout must be >= 0")
        default_target, default_interval = codel_defaults(timeout)
        self.limit = limit
        self.size = size
        self.timeout = timeout
        self.target = default_target if target is None else target
        self.interval = default_interval if interval is None else interval
        self.aging = self.target if aging is None else aging  # math.inf: strict priority
        if min(self.target, self.interval, self.aging) <= 0:
            raise ValueError("target, interval and aging must be > 0")
        self._clock = clock
        self._offset = (0.0, self.aging, 2 * self.aging)  # not c * aging: 0 * inf is nan
        self._q: tuple[deque[_Entry], ...] = (deque(), deque(), deque())
        self._index: dict[object, _Entry] = {}  # waiter (hashable, distinct) -> its entry
        self._len = 0
        self._dead = 0  # removed entries still sitting in the deques
        self._pending: list[tuple[object, str]] = []  # shed, not yet returned by expire()
        self._pending_due = _INF
        # CoDel (Rule 3): minimum sample of the current interval and when the interval ends.
        self.overloaded = False
        self._min = _INF
        self._interval_end = _INF
        # Throughput (Rule 7): decayed completions and busy slot-seconds.
        self._done = 0.0
        self._busy = 0.0
        self._last = clock()
        # Metrics, plain numbers read at scrape time.
        self.in_flight = 0
        self.served = 0
        self.shed = dict.fromkeys(SHED_REASONS, 0)
        self.wait = Histogram()

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        limit = self.limit or "unlimited"
        mode = "lifo" if self.overloaded else "fifo"
        return f"<LaneQueue in_flight {self.in_flight}/{limit} queued {self._len}/{self.size} {mode}>"

    def stats(self) -> dict[str, object]:
        return {"in_flight": self.in_flight, "limit": self.limit, "queued": self._len, "size": self.size,
                "served": self.served, "shed": dict(self.shed), "overloaded": self.overloaded}

    # -- Admission interface ------------------------------------------------------------------

    def admit(self, waiter: object, priority: int = NORMAL) -> int:
        """GO (slot taken), QUEUED (waiter, hashable and distinct, stored) or FULL (answer 503 at once)."""
        if not 0 <= priority <= 2:
            raise ValueError(f"priority must be 0, 1 or 2, not {priority!r}")
        now = self._clock()
        if not self.limit or (self.in_flight < self.limit and not self._len):
            self._account(now)
            self.in_flight += 1
            self.served += 1
            self.wait.observe(0.0)
            return GO
        if self._len:
            self._tick(now)
            self._sweep(now)
        if self._len >= self.size:
            self.shed["full"] += 1
            return FULL
        if waiter in self._index:
            raise ValueError("waiter is already queued")
        if not self._len:  # a queue forms: a CoDel interval starts (Rule 3)
            self._min = _INF
            self._interval_end = now + self.interval
        entry = _Entry(waiter, now, priority)
        self._q[priority].append(entry)
        self._index[waiter] = entry
        self._len += 1
        return QUEUED

    def release(self) -> object | None:
        """The caller's exchange finished: the waiter that gets its slot now, or None."""
        if self.in_flight <= 0:
            raise RuntimeError("release() without a slot in flight")
        now = self._clock()
        self._account(now)
        self._done += 1.0
        if self._len:
            self._tick(now)
            self._sweep(now)
        if not self._len or (self.limit and self.in_flight > self.limit):  # (limit lowered)
            self.in_flight -= 1
            return None
        if self.overloaded:  # Rule 4: newest of the highest class; sample the oldest's age
            self._min = min(self._min, now - self._oldest())
            entry = next(q.pop() for q in self._q if self._back(q))
        else:  # Rule 2: smallest enqueued + class * aging among the class heads
            best: deque[_Entry] | None = None
            key = _INF
            for q, offset in zip(self._q, self._offset):
                if self._front(q) and (best is None or q[0].t + offset < key):
                    best, key = q, q[0].t + offset
            assert best is not None
            entry = best.popleft()
            self._min = min(self._min, now - entry.t)
        waiter = entry.waiter
        self._leave(entry)
        self.served += 1
        self.wait.observe(now - entry.t)
        return waiter

    def waiters(self) -> list[object]:
        """The waiters now queued (any order)."""
        return [e.waiter for q in self._q for e in q if e.alive]

    def client_gone(self) -> None:
        """Count a waiter whose client left (also one found gone as it was admitted)."""
        self.shed["client_gone"] += 1

    def remove(self, waiter: object) -> bool:
        """The waiter's client is gone: it leaves the queue at once (False if it was not queued)."""
        entry = self._index.get(waiter)
        if entry is None:
            return False
        self._tick(self._clock())
        entry.alive = False
        self._dead += 1
        self._leave(entry)
        self.client_gone()
        if self._dead > 64 and self._dead > self._len:  # compact: dead entries stay O(len)
            for q in self._q:
                alive = [e for e in q if e.alive]
                q.clear()
                q.extend(alive)
            self._dead = 0
        return True

    def drain(self) -> list[object]:
        """Every waiter leaves now (the proxy stops at its drain deadline); the caller answers 503."""
        waiters = self.waiters()
        self.shed["stopping"] += len(waiters)
        for waiter in waiters:
            entry = self._index[waiter]
            entry.alive = False
            self._leave(entry)
        return waiters

    def expire(self) -> list[tuple[object, str]]:
        """Waiters to shed now, each with its reason ('timeout' or 'codel'); the caller answers 503."""
        if self._len:
            now = self._clock()
            self._tick(now)
            self._sweep(now)
        out, self._pending, self._pending_due = self._pending, [], _INF
        return out

    def next_deadline(self) -> float | None:
        """Clock time at which expire() has something to do next; None while nothing waits."""
        if self._pending:
            return self._pending_due
        if not self._len:
            return None
        oldest = self._oldest()
        codel = oldest + 2 * self.target
        if not self.overloaded:  # overload can start no earlier than the interval's end
            codel = max(codel, self._interval_end)
        return min(oldest + self.timeout, codel)

    def retry_after(self) -> int:
        """Whole seconds >= 1 until a new request could expect a slot (Rule 7)."""
        self._account(self._clock())
        if not self.limit or self._done <= 0.0 or self._busy <= 0.0:
            return 1  # unknown
        rate = self._done / self._busy * self.limit
        cap = math.ceil(self.timeout) if self.timeout < _INF else 60
        return max(1, min(cap, math.ceil((self._len + 1) / rate)))

    # -- Internals ----------------------------------------------------------------------------

    def _front(self, q: deque[_Entry]) -> bool:
        while q and not q[0].alive:
            q.popleft()
            self._dead -= 1
        return bool(q)

    def _back(self, q: deque[_Entry]) -> bool:
        while q and not q[-1].alive:
            q.pop()
            self._dead -= 1
        return bool(q)

    def _oldest(self) -> float:
        return min(q[0].t for q in self._q if self._front(q))

    def _leave(self, entry: _Entry) -> None:
        del self._index[entry.waiter]
        entry.waiter = None
        self._len -= 1
        if not self._len:  # Rule 3: an empty queue ends overload and the interval
            self.overloaded = False
            self._min = self._interval_end = _INF
            for q in self._q:
                q.clear()
            self._dead = 0

    def _tick(self, now: float) -> None:
        """Close the CoDel intervals that ended by `now` (the queue has not changed since the last call)."""
        end = self._interval_end
        if now < end:
            return
        oldest = self._oldest()
        low = min(self._min, end - oldest)
        if now >= end + self.interval:  # whole intervals without events: only the last one counts
            end += (now - end) // self.interval * self.interval
            low = end - oldest
        self.overloaded = low > self.target
        self._min = _INF
        self._interval_end = end + self.interval

    def _sweep(self, now: float) -> None:
        """Move waiters past their deadline (Rule 5) or CoDel's (Rule 4) to the pending list."""
        slough = 2 * self.target if self.overloaded else _INF
        for q in self._q:
            while self._front(q):
                entry = q[0]
                due = entry.t + min(self.timeout, slough)
                if now < due:
                    break
                # The limit that made it due names the reason (`now - entry.t >= timeout` would
                # misname a timeout whose float sum rounds low on the loop's millisecond clock).
                reason = "timeout" if self.timeout <= slough else "codel"
                q.popleft()
                self._pending.append((entry.waiter, reason))
                self._pending_due = min(self._pending_due, due)
                self.shed[reason] += 1
                self._leave(entry)
                if not self._len:
                    return

    def _account(self, now: float) -> None:
        """Decay the throughput sums by the busy time since the last call and add its slot-seconds."""
        dt = now - self._last
        self._last = now
        if dt > 0 and self.in_flight:
            gone = -math.expm1(-dt / RATE_TAU)  # 1 - decay
            self._done *= 1 - gone
            self._busy = self._busy * (1 - gone) + self.in_flight * RATE_TAU * gone
