"""Pool policy, driven by a fake clock: no sockets, no real loop, no HTTP."""

from __future__ import annotations

import pytest

from laneproxy.pool import Pool
from tests.helpers import FakeLoop


class Conn:
    """The pool's whole contract: an opaque connection with close(), is_closed, uses, expires_at
    and still_open(idle_seconds) (the last check when it is taken)."""

    def __init__(self, name: str, uses: int = 1) -> None:
        self.name = name
        self.uses = uses
        self.is_closed = False
        self.close_calls = 0
        self.expires_at = float("inf")
        self.readable = False  # what a poll(2) at acquire time would see (EOF or stray bytes)
        self.checked_after: list[float] = []

    def close(self) -> None:
        self.close_calls += 1
        self.is_closed = True

    def still_open(self, idle_for: float) -> bool:
        self.checked_after.append(idle_for)
        return not self.is_closed and not self.readable

    def __repr__(self) -> str:
        return f"<Conn {self.name}>"


def make_pool(loop: FakeLoop, max_idle: int = 10, idle_timeout: float = 10.0, max_uses: int = 100) -> Pool:
    return Pool("10.0.0.5:8080", max_idle, idle_timeout, max_uses, loop)  # type: ignore[arg-type]


def lend(pool: Pool, *conns: Conn) -> None:
    """Each conn was freshly connected and is now active."""
    for _ in conns:
        pool.add_active()


@pytest.fixture
def loop() -> FakeLoop:
    return FakeLoop(start=1000.0)


def test_empty_pool_acquires_nothing(loop: FakeLoop) -> None:
    pool = make_pool(loop)
    assert pool.acquire() is None
    assert pool.stats() == {"active": 0, "idle": 0, "connecting": 0, "created": 0, "reused": 0}


def test_acquire_is_lifo(loop: FakeLoop) -> None:
    pool = make_pool(loop)
    a, b, c = Conn("a"), Conn("b"), Conn("c")
    lend(pool, a, b, c)
    for conn in (a, b, c):
        pool.release(conn, True)
        loop.advance(1)
    assert pool.idle == 3 and pool.active == 0
    assert pool.acquire() is c
    assert pool.acquire() is b
    assert pool.acquire() is a
    assert pool.acquire() is None
    assert pool.active == 3
    assert not any(conn.is_closed for conn in (a, b, c))


def test_released_again_goes_on_top(loop: FakeLoop) -> None:
    pool = make_pool(loop)
    a, b = Conn("a"), Conn("b")
    lend(pool, a, b)
    pool.release(a, True)
    pool.release(b, True)
    assert pool.acquire() is b
    pool.release(b, True)
    assert pool.acquire() is b


def test_acquire_drops_expired_connections(loop: FakeLoop) -> None:
    pool = make_pool(loop, idle_timeout=10.0)
    old, fresh = Conn("old"), Conn("fresh")
    lend(pool, old, fresh)
    pool.release(old, True)  # idle since 1000
    loop.advance(6)
    pool.release(fresh, True)  # idle since 1006
    loop.advance(5)  # now 1011: old has idled 11 s, fresh 5 s
    assert pool.acquire() is fresh
    assert not old.is_closed  # not looked at yet: LIFO stopped at fresh
    assert pool.acquire() is None
    assert old.is_closed and old.close_calls == 1
    assert pool.idle == 0
    assert pool.stats()["reused"] == 1


def test_acquire_expiry_boundary(loop: FakeLoop) -> None:
    pool = make_pool(loop, idle_timeout=10.0)
    a = Conn("a")
    lend(pool, a)
    pool.release(a, True)
    loop.advance(9.99)
    assert pool.acquire() is a
    pool.release(a, True)
    loop.advance(10.0)  # exactly idle_timeout: expired
    assert pool.acquire() is None
    assert a.is_closed


def test_acquire_skips_connections_closed_behind_the_pools_back(loop: FakeLoop) -> None:
    pool = make_pool(loop)
    a, b = Conn("a"), Conn("b")
    lend(pool, a, b)
    pool.release(a, True)
    pool.release(b, True)
    b.is_closed = True  # e.g. the transport died and nobody discarded it
    assert pool.acquire() is a
    assert pool.idle == 0


def test_acquire_drops_a_connection_past_its_own_expiry(loop: FakeLoop) -> None:
    # The upstream said `Keep-Alive: timeout=N`: the connection carries its own expiry.
    pool = make_pool(loop, idle_timeout=60.0)
    short, long = Conn("short"), Conn("long")
    lend(pool, long, short)
    long.expires_at = loop.time() + 100
    short.expires_at = loop.time() + 3
    pool.release(long, True)
    pool.release(short, True)
    loop.advance(3)
    assert pool.acquire() is long
    assert short.is_closed


def test_acquire_asks_the_connection_for_a_last_check(loop: FakeLoop) -> None:
    pool = make_pool(loop)
    a, b = Conn("a"), Conn("b")
    lend(pool, a, b)
    pool.release(a, True)
    loop.advance(1)
    pool.release(b, True)
    loop.advance(2)
    b.readable = True  # EOF arrived but the loop has not dispatched it yet
    assert pool.acquire() is a
    assert b.is_closed
    assert b.checked_after == [pytest.approx(2.0)]
    assert a.checked_after == [pytest.approx(3.0)]


def test_sweep_timer_expires_idle_connections_oldest_first(loop: FakeLoop) -> None:
    pool = make_pool(loop, idle_timeout=10.0)
    a, b = Conn("a"), Conn("b")
    lend(pool, a, b)
    pool.release(a, True)  # t=1000
    assert len(loop.timers) == 1
    assert loop.timers[0].delay == 10.0
    loop.advance(4)
    pool.release(b, True)  # t=1004; the one sweep timer already covers it
    assert len(loop.timers) == 1

    loop.advance(6)  # t=1010
    loop.run_due()
    assert a.is_closed and not b.is_closed
    assert pool.idle == 1
    # Re-armed for b's expiry: 4 s from now.
    pending = loop.pending()
    assert len(pending) == 1
    assert pending[0].when == pytest.approx(1014.0)

    loop.advance(4)
    loop.run_due()
    assert b.is_closed
    assert pool.idle == 0
    assert loop.pending() == []  # nothing left to sweep: no timer


def test_sweep_callback_called_directly(loop: FakeLoop) -> None:
    """The sweep callback is what the pool handed to call_later; calling it ourselves sweeps."""
    pool = make_pool(loop, idle_timeout=10.0)
    a = Conn("a")
    lend(pool, a)
    pool.release(a, True)
    timer = loop.timers[0]
    timer.callback()  # too early: nothing expired, re-armed
    assert not a.is_closed and pool.idle == 1
    assert loop.pending()[-1].when == pytest.approx(1010.0)
    loop.advance(10)
    loop.pending()[-1].callback()
    assert a.is_closed and pool.idle == 0


def test_release_after_a_sweep_arms_a_new_timer(loop: FakeLoop) -> None:
    pool = make_pool(loop, idle_timeout=10.0)
    a, b = Conn("a"), Conn("b")
    lend(pool, a, b)
    pool.release(a, True)
    loop.advance(10)
    loop.run_due()
    assert a.is_closed and loop.pending() == []
    pool.release(b, True)
    assert len(loop.pending()) == 1
    loop.advance(10)
    loop.run_due()
    assert b.is_closed


def test_keepalive_requests_retires_a_connection(loop: FakeLoop) -> None:
    pool = make_pool(loop, max_uses=3)
    worn, young = Conn("worn", uses=3), Conn("young", uses=2)
    lend(pool, worn, young)
    pool.release(worn, True)
    pool.release(young, True)
    assert worn.is_closed
    assert not young.is_closed
    assert pool.idle == 1
    assert pool.active == 0


def test_max_idle_overflow_closes(loop: FakeLoop) -> None:
    pool = make_pool(loop, max_idle=2)
    a, b, c = Conn("a"), Conn("b"), Conn("c")
    lend(pool, a, b, c)
    pool.release(a, True)
    pool.release(b, True)
    pool.release(c, True)
    assert pool.idle == 2
    assert c.is_closed and not a.is_closed and not b.is_closed


def test_max_idle_zero_keeps_nothing(loop: FakeLoop) -> None:
    pool = make_pool(loop, max_idle=0)
    a = Conn("a")
    lend(pool, a)
    pool.release(a, True)
    assert a.is_closed and pool.idle == 0


def test_idle_timeout_zero_keeps_nothing(loop: FakeLoop) -> None:
    pool = make_pool(loop, idle_timeout=0)
    a = Conn("a")
    lend(pool, a)
    pool.release(a, True)
    assert a.is_closed and pool.idle == 0
    assert loop.timers == []


def test_release_not_reusable_closes(loop: FakeLoop) -> None:
    pool = make_pool(loop)
    a = Conn("a")
    lend(pool, a)
    pool.release(a, False)
    assert a.is_closed
    assert pool.idle == 0 and pool.active == 0
    assert loop.timers == []


def test_release_of_a_closed_connection_keeps_nothing(loop: FakeLoop) -> None:
    pool = make_pool(loop)
    a = Conn("a")
    lend(pool, a)
    a.is_closed = True
    pool.release(a, True)
    assert pool.idle == 0 and pool.active == 0


def test_discard_removes_only_that_connection(loop: FakeLoop) -> None:
    pool = make_pool(loop)
    a, b, c = Conn("a"), Conn("b"), Conn("c")
    lend(pool, a, b, c)
    for conn in (a, b, c):
        pool.release(conn, True)
    pool.discard(b)
    assert pool.idle == 2
    assert not b.is_closed  # discard forgets; the connection closes itself
    assert pool.acquire() is c
    assert pool.acquire() is a
    assert pool.acquire() is None


def test_discard_of_an_unknown_connection_is_harmless(loop: FakeLoop) -> None:
    pool = make_pool(loop)
    a = Conn("a")
    lend(pool, a)
    pool.release(a, True)
    pool.discard(Conn("stranger"))
    assert pool.idle == 1


def test_close_closes_idle_and_cancels_the_sweep(loop: FakeLoop) -> None:
    pool = make_pool(loop)
    a, b = Conn("a"), Conn("b")
    lend(pool, a, b)
    pool.release(a, True)
    pool.release(b, True)
    timer = loop.timers[0]
    pool.close()
    assert a.is_closed and b.is_closed
    assert pool.idle == 0
    assert timer.cancelled


def test_stats_and_repr_show_counts(loop: FakeLoop) -> None:
    pool = make_pool(loop)
    a, b, c = Conn("a"), Conn("b"), Conn("c")
    lend(pool, a, b, c)
    pool.connecting = 1
    assert repr(pool) == "<Pool 10.0.0.5:8080 [active 3, idle 0]>"
    pool.release(a, True)
    pool.release(b, True)
    assert repr(pool) == "<Pool 10.0.0.5:8080 [active 1, idle 2]>"
    assert pool.acquire() is b
    assert pool.stats() == {"active": 2, "idle": 1, "connecting": 1, "created": 3, "reused": 1}
    assert repr(pool) == "<Pool 10.0.0.5:8080 [active 2, idle 1]>"
