"""queue.py: LaneQueue admission, order, shedding, CoDel, priorities, Retry-After (pure, fake clock)."""

from __future__ import annotations

import math
import random

import pytest

from laneproxy.queue import (
    FULL,
    GO,
    HIGH,
    LOW,
    NORMAL,
    PRIORITIES,
    QUEUED,
    WAIT_BOUNDS,
    Histogram,
    LaneQueue,
    codel_defaults,
)

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None


class Clock:
    """A fake monotonic clock: tests move `now` by hand."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(limit: int = 1, size: int = 10, timeout: float = 10.0, **kw) -> tuple[LaneQueue, Clock]:
    clock = Clock()
    return LaneQueue(limit, size, timeout, clock=clock, **kw), clock


def no_codel() -> dict[str, float]:
    """Settings under which CoDel never engages within a test (target and interval far away)."""
    return {"target": 1000.0, "interval": 1000.0}


# -- Slots and admission ---------------------------------------------------------------------


def test_go_until_limit_then_queued_then_full() -> None:
    q, _ = make(limit=2, size=2)
    assert [q.admit(object()) for _ in range(2)] == [GO, GO]
    assert q.in_flight == 2 and len(q) == 0
    assert [q.admit(object()) for _ in range(2)] == [QUEUED, QUEUED]
    assert q.admit(object()) == FULL
    assert q.in_flight == 2 and len(q) == 2
    assert q.shed["full"] == 1 and q.served == 2
    assert repr(q) == "<LaneQueue in_flight 2/2 queued 2/2 fifo>"
    assert q.stats()["queued"] == 2


def test_size_zero_is_full_at_once_at_the_limit() -> None:
    q, _ = make(limit=1, size=0)
    assert q.admit("a") == GO
    assert q.admit("b") == FULL
    assert q.release() is None
    assert q.in_flight == 0
    assert q.admit("c") == GO


def test_limit_zero_is_unlimited_and_only_counts() -> None:
    q, _ = make(limit=0, size=0)
    assert all(q.admit(object()) == GO for _ in range(1000))
    assert q.in_flight == 1000 and q.served == 1000 and len(q) == 0
    assert q.release() is None
    assert q.in_flight == 999
    assert q.retry_after() == 1
    assert "999/unlimited" in repr(q)


def test_release_without_a_slot_is_an_error() -> None:
    q, _ = make()
    with pytest.raises(RuntimeError):
        q.release()


def test_bad_arguments() -> None:
    q, _ = make(limit=1)
    with pytest.raises(ValueError):
        q.admit("x", priority=3)
    q.admit("a")
    q.admit("w")
    with pytest.raises(ValueError):
        q.admit("w")  # already queued
    with pytest.raises(ValueError):
        LaneQueue(-1, 0, 1.0)
    with pytest.raises(ValueError):
        LaneQueue(1, 1, 1.0, target=0)


# -- Order and handoff -----------------------------------------------------------------------


def test_fifo_order_and_release_hands_the_slot_over() -> None:
    q, clock = make(limit=2, size=100, **no_codel())
    q.admit("a")
    q.admit("b")
    waiters = [f"w{i}" for i in range(10)]
    for w in waiters:
        clock.now += 0.01
        assert q.admit(w) == QUEUED
    got = []
    for _ in waiters:
        clock.now += 0.01
        got.append(q.release())
        assert q.in_flight == 2  # a handoff: the slot changes hands, the count stays
    assert got == waiters
    assert q.release() is None and q.release() is None
    assert q.in_flight == 0 and q.served == 12


def test_client_gone_leaves_at_once_and_release_skips_it() -> None:
    q, _ = make(limit=1, size=3, **no_codel())
    q.admit("a")
    for w in "bcd":
        q.admit(w)
    assert q.remove("c") is True
    assert len(q) == 2 and q.shed["client_gone"] == 1
    assert q.admit("e") == QUEUED  # the freed place is usable at once
    assert q.remove("c") is False and q.remove("nobody") is False
    assert [q.release(), q.release(), q.release()] == ["b", "d", "e"]
    assert q.release() is None
    assert q.shed["client_gone"] == 1 and len(q) == 0


def test_drain_hands_every_waiter_over_once_and_counts_stopping() -> None:
    q, _ = make(limit=1, size=3, **no_codel())
    q.admit("a")
    for w in "bcd":
        q.admit(w)
    q.remove("c")
    assert sorted(q.drain()) == ["b", "d"]  # the one gone already is not answered again
    assert len(q) == 0 and q.shed["stopping"] == 2 and q.shed["client_gone"] == 1
    assert q.drain() == [] and q.next_deadline() is None and q.in_flight == 1  # "a" keeps its slot
    assert q.admit("e") == QUEUED and q.release() == "e"


def test_many_removals_keep_len_exact_and_memory_bounded() -> None:
    q, clock = make(limit=1, size=10_000, timeout=1e6, **no_codel())
    q.admit("first")
    waiters = [object() for _ in range(10_000)]
    for w in waiters:
        q.admit(w)
    rng = random.Random(6)
    gone = set(rng.sample(range(len(waiters)), 9_000))
    for i in gone:
        assert q.remove(waiters[i])
    assert len(q) == 1_000
    assert sum(len(d) for d in q._q) <= 2 * len(q) + 65  # dead entries are compacted away
    expected = [w for i, w in enumerate(waiters) if i not in gone]
    assert [q.release() for _ in expected] == expected


# -- Timeouts and deadlines ------------------------------------------------------------------


def test_timeout_expiry_with_reason_and_next_deadline() -> None:
    q, clock = make(limit=1, size=10, timeout=2.0, **no_codel())
    assert q.next_deadline() is None
    q.admit("a")
    q.admit("b")
    clock.now = 0.5
    q.admit("c")
    assert q.next_deadline() == 2.0
    clock.now = 1.9
    assert q.expire() == []
    clock.now = 2.0
    assert q.expire() == [("b", "timeout")]
    assert q.next_deadline() == 2.5
    clock.now = 3.0
    assert q.expire() == [("c", "timeout")]
    assert q.next_deadline() is None and len(q) == 0
    assert q.shed["timeout"] == 2 and q.in_flight == 1


def test_release_never_hands_a_slot_to_an_expired_waiter() -> None:
    q, clock = make(limit=1, size=10, timeout=2.0, **no_codel())
    q.admit("a")
    q.admit("b")
    clock.now = 1.0
    q.admit("c")
    clock.now = 2.5  # the caller's timer is late: b is past its deadline
    assert q.release() == "c"
    assert q.next_deadline() == 2.0  # in the past: expire() has work now
    assert q.expire() == [("b", "timeout")]
    assert q.next_deadline() is None
    clock.now = 10.0
    assert q.release() is None  # nobody left: the slot is freed
    assert q.in_flight == 0


def test_full_is_decided_after_dropping_waiters_already_due() -> None:
    q, clock = make(limit=1, size=1, timeout=1.0, **no_codel())
    q.admit("a")
    q.admit("b")
    assert q.admit("c") == FULL
    clock.now = 1.5
    assert q.admit("d") == QUEUED
    assert q.expire() == [("b", "timeout")]


def test_next_deadline_covers_the_codel_sweep() -> None:
    q, clock = make(limit=1, size=10, timeout=30.0)  # defaults: target 3 s, interval 15 s
    q.admit("a")
    q.admit("b")
    assert q.next_deadline() == 15.0  # overload can start no earlier than the interval's end
    clock.now = 14.9
    assert q.expire() == []
    clock.now = 15.0  # a whole interval without the lane moving: standing queue
    assert q.expire() == [("b", "codel")]
    assert q.shed["codel"] == 1 and not q.overloaded  # the queue emptied


# -- CoDel -----------------------------------------------------------------------------------


def test_codel_standing_queue_goes_lifo_and_sheds_old_waiters() -> None:
    # 100 arrivals per second, 33 served: a standing queue. Then the load drops to 20 per second.
    q, clock = make(limit=1, size=1000, timeout=10.0, target=0.1, interval=1.0)
    q.admit("x")
    enqueued: dict[int, float] = {}
    served: list[tuple[float, int]] = []
    for tick in range(1, 401):
        clock.now = tick / 100
        if tick <= 300 or tick % 5 == 0:
            q.admit(tick)
            enqueued[tick] = clock.now
        if tick % 3 == 0 and q.in_flight:
            served.append((clock.now, q.release()))
        for w, reason in q.expire():
            assert reason == "codel" and clock.now - enqueued[w] >= 0.2 - 1e-9  # older than 2 * target
        if tick < 201:
            # The first interval (0.01 to 1.01) saw a short wait (the first waiter, 0.02 s): no overload.
            assert not q.overloaded and q.shed["codel"] == 0
        if tick == 200:
            assert [w for _, w in served] == list(range(1, 67))  # FIFO so far
        if tick == 201:  # the second interval's minimum stayed above target
            assert q.overloaded and "lifo" in repr(q)
            assert q.shed["codel"] > 0 and q.next_deadline() <= clock.now + 0.2
        if 201 < tick <= 300:
            assert q.overloaded and len(q) <= 20  # at most 2 * target worth of arrivals
            if served[-1][0] == clock.now:
                assert served[-1][1] == tick  # newest first
    # The load dropped below capacity: the queue emptied and FIFO is back.
    assert not q.overloaded and len(q) == 0
    assert q.shed["timeout"] == 0


def test_codel_returns_to_fifo_when_an_interval_minimum_drops_below_target() -> None:
    q, clock = make(limit=1, size=100, timeout=100.0, target=0.3, interval=0.5)
    q.admit("x")
    q.admit("a")
    q.admit("b")
    clock.now = 0.5
    assert q.expire() == [] and q.overloaded  # a and b waited 0.5 > target for a whole interval
    clock.now = 0.55
    q.admit("c")
    clock.now = 0.56
    q.admit("d")
    clock.now = 0.6
    assert q.expire() == [("a", "codel"), ("b", "codel")]  # 2 * target old
    clock.now = 0.65
    assert q.release() == "d"  # LIFO; the oldest left (c) has waited only 0.1 < target
    clock.now = 0.7
    q.admit("e")
    clock.now = 0.99
    assert q.expire() == [] and q.overloaded
    clock.now = 1.0
    assert q.expire() == [] and not q.overloaded
    assert q.release() == "c"  # FIFO again


def test_codel_short_burst_that_drains_is_not_overload() -> None:
    q, clock = make(limit=1, size=100, timeout=10.0, target=0.1, interval=0.5)
    q.admit("x")
    for i in range(8):
        q.admit(i)
    for i in range(8):  # waits 0.09, 0.18, ... 0.72: the interval's minimum is below target
        clock.now += 0.09
        assert q.release() == i  # FIFO throughout
        assert not q.overloaded and q.expire() == []
    assert q.release() is None


def test_codel_leaves_overload_when_the_queue_empties() -> None:
    q, clock = make(limit=1, size=100, timeout=10.0, target=0.1, interval=0.5)
    q.admit("x")
    q.admit("a")
    q.admit("b")
    clock.now = 0.5
    assert q.expire() == [("a", "codel"), ("b", "codel")]  # a whole interval without a slot
    assert len(q) == 0 and not q.overloaded
    q.admit("c")
    assert q.next_deadline() == 1.0  # a new interval starts with the new queue


def test_codel_catches_up_after_a_long_quiet_spell() -> None:
    q, clock = make(limit=1, size=100, timeout=1e6, target=0.1, interval=1e-3)
    q.admit("x")
    q.admit("a")
    clock.now = 0.0005
    q.admit("b")
    clock.now = 1e6 - 1  # 10**9 intervals later, no event in between: O(1), only the last one counts
    assert q.expire() == [("a", "codel"), ("b", "codel")]
    assert not q.overloaded and len(q) == 0


# -- Priorities and aging --------------------------------------------------------------------


def test_priorities_high_before_normal_before_low() -> None:
    assert PRIORITIES == {"high": HIGH, "normal": NORMAL, "low": LOW}
    q, clock = make(limit=1, **no_codel())
    q.admit("x")
    for name, prio in [("low1", LOW), ("normal1", NORMAL), ("high1", HIGH), ("low2", LOW), ("high2", HIGH)]:
        clock.now += 0.001
        q.admit(name, prio)
    assert [q.release() for _ in range(5)] == ["high1", "high2", "normal1", "low1", "low2"]


def test_aging_lets_a_low_waiter_beat_a_stream_of_new_high_ones() -> None:
    q, clock = make(limit=1, size=100, timeout=100.0, target=50.0, interval=100.0, aging=1.0)
    q.admit("x")
    q.admit("low", LOW)
    served = []
    for i in range(1, 10):
        clock.now = i * 0.5
        q.admit(f"high{i}", HIGH)
        served.append(q.release())
    # low's key is 0 + 2 * aging = 2.0: every high enqueued at or before 2.0 goes first, then low.
    assert served[:5] == ["high1", "high2", "high3", "high4", "low"]


def test_infinite_aging_is_strict_priority() -> None:
    q, clock = make(limit=1, size=100, timeout=1e6, target=1e5, interval=1e5, aging=math.inf)
    q.admit("x")
    q.admit("low", LOW)
    q.admit("normal", NORMAL)
    clock.now = 1000.0
    q.admit("high", HIGH)
    assert [q.release(), q.release(), q.release()] == ["high", "normal", "low"]


def test_overload_serves_the_highest_class_newest_first() -> None:
    q, clock = make(limit=1, size=100, timeout=100.0, target=0.1, interval=0.5)
    q.admit("x")
    q.admit("h0", HIGH)
    clock.now = 0.45
    for name, prio in [("low", LOW), ("h1", HIGH), ("h2", HIGH), ("normal", NORMAL)]:
        q.admit(name, prio)
    clock.now = 0.5
    assert q.expire() == [("h0", "codel")] and q.overloaded
    assert [q.release() for _ in range(3)] == ["h2", "h1", "normal"]


# -- Retry-After and metrics -----------------------------------------------------------------


def busy_lane(service: float, depth: int, limit: int = 2, timeout: float = 30.0, rounds: int = 40) -> LaneQueue:
    """A lane kept at its limit with `depth` waiters, each slot taking `service` seconds."""
    q, clock = make(limit=limit, size=1000, timeout=timeout, **no_codel())
    for i in range(limit + depth):
        q.admit(("start", i))
    for i in range(rounds):
        clock.now += service / limit
        q.release()
        q.admit(("more", i))
    assert len(q) == depth and q.in_flight == limit
    return q


def test_retry_after_grows_with_depth_and_shrinks_with_throughput() -> None:
    q, _ = make(limit=2)
    assert q.retry_after() == 1  # nothing completed yet: unknown
    slow_short, slow_long = busy_lane(1.0, 9), busy_lane(1.0, 39)  # 2 completions per second
    assert slow_short.retry_after() == 5  # (9 + 1) / 2
    assert slow_long.retry_after() == 20
    fast = busy_lane(0.25, 39)  # 8 completions per second
    assert fast.retry_after() == 5
    assert busy_lane(0.01, 0).retry_after() == 1
    assert busy_lane(10.0, 39, rounds=5).retry_after() == 30  # capped at the queue timeout


def test_retry_after_grows_while_the_lane_is_stuck() -> None:
    q = busy_lane(1.0, 9)
    before = q.retry_after()
    q._clock.now += 20.0  # type: ignore[attr-defined]
    assert q.retry_after() > before


def test_wait_histogram() -> None:
    q, clock = make(limit=1, **no_codel())
    q.admit("a")
    q.admit("b")
    clock.now = 0.3
    q.release()
    h = q.wait
    assert h.count == q.served == 2 and h.sum == pytest.approx(0.3)
    assert h.buckets[0] == 1  # GO: waited 0
    assert h.buckets[WAIT_BOUNDS.index(0.5)] == 1
    assert h.cumulative()[-1] == 2 and len(h.buckets) == len(WAIT_BOUNDS) + 1
    big = Histogram((1.0,))
    big.observe(1.0)
    big.observe(7.0)
    assert big.buckets == [1, 1]  # `le` bounds: 1.0 falls in the first bucket


def test_codel_defaults() -> None:
    assert codel_defaults(30.0) == (3.0, 15.0)
    assert codel_defaults(1.0) == (0.1, 0.5)
    assert codel_defaults(0.0) == (0.005, 0.005)
    assert codel_defaults(600.0) == (5.0, 100.0)
    assert codel_defaults(math.inf) == (5.0, 100.0)
    q = LaneQueue(1, 1, 30.0, target=0.5, interval=2.0)
    assert (q.target, q.interval, q.aging) == (0.5, 2.0, 0.5)


# -- Invariants under random operations ------------------------------------------------------


def run_ops(limit: int, size: int, timeout: float, target: float | None, interval: float | None,
            aging: float | None, ops: list[tuple[int, int]]) -> None:
    """Apply random operations; check the invariants after each and that every waiter leaves once."""
    clock = Clock()
    q = LaneQueue(limit, size, timeout, target=target, interval=interval, aging=aging, clock=clock)
    waiting: dict[int, float] = {}  # queued waiter -> enqueue time
    left: dict[int, int] = {}
    admitted = released = queued = handoffs = 0
    n = 0

    def leave(w: object) -> None:
        assert isinstance(w, int) and left.get(w, 0) == 0 and w in waiting
        left[w] = 1
        del waiting[w]

    for op, arg in ops:
        if op == 0:  # admit
            n += 1
            r = q.admit(n, arg % 3)
            admitted += r != FULL
            if r == QUEUED:
                waiting[n] = clock.now
                queued += 1
        elif op == 1 and q.in_flight:  # release
            w = q.release()
            released += 1
            if w is not None:
                assert clock.now - waiting[w] < timeout  # never after its deadline
                leave(w)
                handoffs += 1
        elif op == 2 and waiting:  # a client goes away
            w = sorted(waiting)[arg % len(waiting)]
            if q.remove(w):
                leave(w)
        elif op == 3:  # time passes: nothing may come due before next_deadline()
            due = q.next_deadline()
            clock.now += arg / 20
            out = q.expire()
            if due is None or due > clock.now:
                assert out == []
            for w, reason in out:
                assert reason in ("timeout", "codel")
                leave(w)
        shed = sum(q.shed.values()) - q.shed["full"]
        assert 0 <= q.in_flight and (not limit or q.in_flight <= limit)
        assert q.in_flight + len(q) == admitted - released - shed
        assert len(q) <= len(waiting) and len(q) <= size
        assert q.served == q.wait.count and q.retry_after() >= 1
        assert (q.next_deadline() is None) == (not waiting)
    # Drain: every queued waiter leaves exactly once.
    clock.now += timeout + 1
    for w, _ in q.expire():
        leave(w)
    while q.in_flight:
        assert q.release() is None  # all expired above
    shed = sum(q.shed.values()) - q.shed["full"]
    assert not waiting and len(q) == 0 and q.next_deadline() is None
    assert len(left) == queued == handoffs + shed


# (limit, size, timeout, target, interval, aging); time moves in steps of 0 to 1.95 s.
PARAMS = [(1, 3, 1.0, None, None, None), (2, 0, 1.0, None, None, None), (0, 0, 1.0, None, None, None),
          (3, 5, 2.0, 0.05, None, 0.3), (1, 8, 5.0, 0.2, 0.5, math.inf), (2, 4, 0.0, None, None, None),
          (2, 30, 60.0, 1.0, 3.0, None), (1, 20, 100.0, 2.0, 4.0, 1.0)]


def test_invariants_seeded_random() -> None:
    rng = random.Random(20240606)
    for _ in range(300):
        params = rng.choice(PARAMS)
        ops = [(rng.choice((0, 0, 1, 2, 3)), rng.randrange(40)) for _ in range(rng.randrange(1, 200))]
        run_ops(*params, ops)


if given is not None:

    @settings(max_examples=300, deadline=None, database=None)  # no .hypothesis dir in the repo
    @given(st.sampled_from(PARAMS), st.lists(st.tuples(st.integers(0, 3), st.integers(0, 39)), max_size=150))
    def test_invariants_hypothesis(params: tuple, ops: list[tuple[int, int]]) -> None:
        run_ops(*params, ops)
