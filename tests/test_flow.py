"""flow.py: ReadGate pause/resume by reason, Deadline lazy re-arming, the per-iteration Outbox
(fake transport, fake clock)."""

from __future__ import annotations

from laneproxy.flow import (
    CONNECTING,
    DRAINING,
    HIGH_WATER,
    LOW_WATER,
    PEER_BUSY,
    PIPELINE,
    SEND_NOW,
    Deadline,
    ReadGate,
    Sender,
)
from tests.helpers import FakeLoop, MockTransport


def test_watermarks_are_ordered() -> None:
    assert 0 < LOW_WATER < HIGH_WATER
    assert len({PEER_BUSY, PIPELINE, CONNECTING, DRAINING}) == 4
    assert PEER_BUSY | PIPELINE | CONNECTING | DRAINING == 15  # distinct bits


# -- ReadGate --------------------------------------------------------------------------------


def test_gate_pauses_once_for_two_reasons_and_resumes_when_all_clear() -> None:
    t = MockTransport()
    gate = ReadGate(t)  # type: ignore[arg-type]
    assert not gate.is_paused

    gate.close(PEER_BUSY)
    gate.close(PIPELINE)
    assert t.read_paused and t.pause_calls == 1
    assert gate.is_paused

    gate.open(PEER_BUSY)
    assert t.read_paused and t.resume_calls == 0  # PIPELINE still holds it

    gate.open(PIPELINE)
    assert not t.read_paused and t.resume_calls == 1
    assert not gate.is_paused


def test_gate_same_reason_twice_is_idempotent() -> None:
    t = MockTransport()
    gate = ReadGate(t)  # type: ignore[arg-type]
    gate.close(PEER_BUSY)
    gate.close(PEER_BUSY)
    assert t.pause_calls == 1
    gate.open(PEER_BUSY)
    gate.open(PEER_BUSY)
    assert t.resume_calls == 1
    assert not t.read_paused


def test_gate_opening_a_reason_not_held_does_nothing() -> None:
    t = MockTransport()
    gate = ReadGate(t)  # type: ignore[arg-type]
    gate.open(PEER_BUSY)
    assert t.resume_calls == 0
    gate.close(CONNECTING)
    gate.open(PEER_BUSY)  # not a reason it is paused for
    assert t.read_paused and t.resume_calls == 0
    gate.open(CONNECTING)
    assert not t.read_paused


def test_gate_can_close_again_after_opening() -> None:
    t = MockTransport()
    gate = ReadGate(t)  # type: ignore[arg-type]
    for _ in range(3):
        gate.close(PEER_BUSY)
        gate.open(PEER_BUSY)
    assert (t.pause_calls, t.resume_calls) == (3, 3)
    assert not t.read_paused


class ClosingTransport(MockTransport):
    """A transport that is already closing: uvloop raises on pause/resume then."""

    def pause_reading(self) -> None:
        raise RuntimeError("transport is closing")

    def resume_reading(self) -> None:
        raise RuntimeError("transport is closing")


def test_gate_tolerates_a_closing_transport() -> None:
    gate = ReadGate(ClosingTransport())  # type: ignore[arg-type]
    gate.close(PEER_BUSY)
    assert gate.is_paused
    gate.open(PEER_BUSY)
    assert not gate.is_paused


# -- Deadline --------------------------------------------------------------------------------


class Fired:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def test_deadline_fires_at_its_time() -> None:
    loop = FakeLoop(start=100.0)
    fired = Fired()
    d = Deadline(loop, fired)  # type: ignore[arg-type]
    d.set(110.0)
    assert [t.when for t in loop.pending()] == [110.0]
    loop.advance(9)
    loop.run_due()
    assert fired.count == 0
    loop.advance(1)
    loop.run_due()
    assert fired.count == 1
    assert d.when == 0.0  # disarmed after firing


def test_deadline_set_later_does_not_reschedule() -> None:
    loop = FakeLoop(start=100.0)
    fired = Fired()
    d = Deadline(loop, fired)  # type: ignore[arg-type]
    d.set(110.0)
    d.set(120.0)
    d.set(130.0)
    assert len(loop.timers) == 1  # one timer for three sets
    assert loop.timers[0].when == 110.0 and not loop.timers[0].cancelled
    assert d.when == 130.0


def test_deadline_set_earlier_reschedules() -> None:
    loop = FakeLoop(start=100.0)
    fired = Fired()
    d = Deadline(loop, fired)  # type: ignore[arg-type]
    d.set(120.0)
    d.set(105.0)
    assert loop.timers[0].cancelled
    assert [t.when for t in loop.pending()] == [105.0]
    loop.advance(5)
    loop.run_due()
    assert fired.count == 1


def test_deadline_clear_prevents_the_callback() -> None:
    loop = FakeLoop(start=100.0)
    fired = Fired()
    d = Deadline(loop, fired)  # type: ignore[arg-type]
    d.set(110.0)
    d.clear()
    loop.advance(20)
    loop.run_due()
    assert fired.count == 0
    assert loop.pending() == []  # and it did not re-arm


def test_deadline_fire_rearms_when_moved_later() -> None:
    loop = FakeLoop(start=100.0)
    fired = Fired()
    d = Deadline(loop, fired)  # type: ignore[arg-type]
    d.set(110.0)
    d.set(125.0)  # lazy: the timer for 110 stays
    loop.advance(10)
    loop.run_due()  # the old timer fires, sees 125, re-arms
    assert fired.count == 0
    assert [t.when for t in loop.pending()] == [125.0]
    loop.advance(15)
    loop.run_due()
    assert fired.count == 1
    assert loop.pending() == []


def test_deadline_set_after_clear_reuses_the_pending_timer() -> None:
    loop = FakeLoop(start=100.0)
    fired = Fired()
    d = Deadline(loop, fired)  # type: ignore[arg-type]
    d.set(110.0)
    d.clear()
    d.set(150.0)
    assert len(loop.timers) == 1
    loop.advance(10)
    loop.run_due()
    assert fired.count == 0
    loop.advance(40)
    loop.run_due()
    assert fired.count == 1


def test_deadline_set_earlier_after_clear_reschedules() -> None:
    loop = FakeLoop(start=100.0)
    fired = Fired()
    d = Deadline(loop, fired)  # type: ignore[arg-type]
    d.set(150.0)
    d.clear()
    d.set(105.0)
    loop.advance(5)
    loop.run_due()
    assert fired.count == 1


def test_deadline_cancel_drops_the_timer() -> None:
    loop = FakeLoop(start=100.0)
    fired = Fired()
    d = Deadline(loop, fired)  # type: ignore[arg-type]
    d.set(110.0)
    d.cancel()
    assert loop.timers[0].cancelled
    assert d.when == 0.0
    d.set(130.0)  # usable again: a fresh timer
    assert [t.when for t in loop.pending()] == [130.0]
    loop.advance(30)
    loop.run_due()
    assert fired.count == 1


def test_deadline_callback_can_set_it_again() -> None:
    loop = FakeLoop(start=100.0)
    d: Deadline

    def again() -> None:
        d.set(loop.time() + 10)

    d = Deadline(loop, again)  # type: ignore[arg-type]
    d.set(110.0)
    loop.advance(10)
    loop.run_due()
    assert [t.when for t in loop.pending()] == [120.0]
    assert d.when == 120.0


# -- Outbox and Sender (rule 4) ----------------------------------------------------------------


class Side(Sender):
    """The attributes a protocol gives Sender, on a MockTransport."""

    def __init__(self, loop: FakeLoop) -> None:
        self.transport = MockTransport(loop=loop)  # type: ignore[assignment]
        self.is_closed = False
        self.init_sending(loop)  # type: ignore[arg-type]


def test_sends_of_one_iteration_leave_in_one_write_at_its_end() -> None:
    loop = FakeLoop()
    a, b = Side(loop), Side(loop)
    a.send(b"head ")
    b.send(b"other")
    a.send(b"body")
    assert a.transport._buffer == b"" and b.transport._buffer == b""  # type: ignore[attr-defined]
    assert len(loop.soon) == 1  # one flush per iteration, however many sides
    loop.run_soon()
    assert bytes(a.transport._buffer) == b"head body" and a.transport.writes == 1  # type: ignore[attr-defined]
    assert bytes(b.transport._buffer) == b"other" and b.transport.writes == 1  # type: ignore[attr-defined]
    a.send(b"next")  # a new iteration schedules a new flush
    assert len(loop.soon) == 1
    loop.run_soon()
    assert bytes(a.transport._buffer) == b"head bodynext"  # type: ignore[attr-defined]


def test_write_sends_what_is_queued_first() -> None:
    loop = FakeLoop()
    side = Side(loop)
    side.send(b"1")
    side.write(b"2")  # in the same write as what was queued
    assert bytes(side.transport._buffer) == b"12"  # type: ignore[attr-defined]
    loop.run_soon()  # the scheduled flush finds nothing left
    assert bytes(side.transport._buffer) == b"12" and side.transport.writes == 1  # type: ignore[attr-defined]


def test_a_side_with_send_now_bytes_queued_sends_at_once() -> None:
    # Deferral never holds more than SEND_NOW bytes, so a full write buffer still pauses the
    # other side's reading within the same read (rule 2).
    loop = FakeLoop()
    side = Side(loop)
    side.send(b"h" * 100)
    side.send(b"b" * (SEND_NOW - 100))
    assert len(side.transport._buffer) == SEND_NOW and side.transport.writes == 1  # type: ignore[attr-defined]
    side.send(b"x" * (SEND_NOW + 1))  # one big piece goes at once too
    assert len(side.transport._buffer) == 2 * SEND_NOW + 1  # type: ignore[attr-defined]


def test_a_closed_side_drops_what_it_had_queued() -> None:
    loop = FakeLoop()
    side = Side(loop)
    side.send(b"lost")
    side.is_closed = True
    loop.run_soon()
    assert side.transport.writes == 0  # type: ignore[attr-defined]


def test_one_failing_side_does_not_hold_back_the_others(caplog) -> None:
    loop = FakeLoop()
    bad, good = Side(loop), Side(loop)

    def refuse(data: bytes) -> None:
        raise RuntimeError("Cannot call write() after write_eof()")

    bad.transport.write = refuse  # type: ignore[method-assign]
    bad.send(b"x")
    good.send(b"y")
    loop.run_soon()
    assert bytes(good.transport._buffer) == b"y"  # type: ignore[attr-defined]
    assert "sending queued bytes" in caplog.text
