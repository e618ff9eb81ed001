"""Flow control and deadlines shared by both sides.

Theory of operation
-------------------
Rule 1. Reading from a transport may be paused for several reasons at once (the other side's
write buffer is full, a pipelined request waits its turn, an upstream is being connected).
`ReadGate` keeps one bit per reason and touches the transport only when the set goes from
empty to non-empty or back, so pause/resume calls are idempotent and never unbalanced.

Rule 2. Backpressure crosses the proxy: a full write buffer on one side closes a gate on the
other side's reading (Envoy's watermarks). Buffers switch at HIGH_WATER / LOW_WATER.

Rule 3. Deadlines are lazy. Moving a deadline later (the common case: every request on a
keep-alive connection pushes the idle deadline) only stores a number; the timer already
scheduled fires at its old time, sees the new deadline and re-arms once. Only moving a deadline
earlier reschedules. This keeps timer churn off the per-request path.

Rule 4. Small writes of one loop iteration are sent together at its end (`Sender.send`, then
`Outbox.flush`, one call_soon per iteration): the request heads and responses produced from
one epoll batch leave back to back, each socket gets one write per iteration, and a peer asleep
in epoll is woken once for the batch instead of once per message. Sending queued bytes is the
first thing `write`, close and abort do, so order is kept; a side with SEND_NOW bytes queued
sends at once, so deferral never buffers more than that and backpressure (rule 2) stays exact.
"""

from __future__ import annotations

import asyncio
import logging
import select
import weakref
from collections.abc import Callable

log = logging.getLogger("laneproxy.flow")

KiB = 1024
HIGH_WATER = 64 * KiB
LOW_WATER = 16 * KiB
SEND_NOW = 64 * KiB  # a side with this much queued sends without waiting for the iteration's end

# Reasons to pause reading (bits of ReadGate.reasons).
PEER_BUSY = 1  # the other side's write buffer is above HIGH_WATER
PIPELINE = 2  # a pipelined request waits until the one before it is answered
CONNECTING = 4  # the exchange has no upstream connection yet
DRAINING = 8  # closing: nothing more is read (lingering close reads on its own)
UPGRADE = 16  # an Upgrade request waits for the upstream's 101 (or its refusal)

POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)  # the peer closed (or half-closed) its side


def hung_up(transport: asyncio.BaseTransport, half_close: bool = True) -> bool:
    """Has the peer closed or reset (`half_close=False`: reset, or closed both ways), though
    reading is paused? One poll(2), nothing read."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return transport.is_closing()
    poll = select.poll()
    poll.register(sock.fileno(), POLLRDHUP if half_close else 0)
    try:
        events = poll.poll(0)
    except OSError:
        return True
    return bool(events) and bool(events[0][1] & ((POLLRDHUP if half_close else 0) | select.POLLHUP | select.POLLERR))


class ReadGate:
    """Idempotent pause/resume of one transport's reading, by reason."""

    __slots__ = ("transport", "reasons")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.reasons = 0

    def close(self, reason: int) -> None:
        if not self.reasons:
            try:
                self.transport.pause_reading()
            except (RuntimeError, AttributeError):  # transport already closing
                pass
        self.reasons |= reason

    def open(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons:
                try:
                    self.transport.resume_reading()
                except (RuntimeError, AttributeError):
                    pass

    @property
    def is_paused(self) -> bool:
        return bool(self.reasons)


class Deadline:
    """A lazily re-armed timer: `set(when)` is cheap when the new deadline is later."""

    __slots__ = ("loop", "callback", "when", "_handle", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self.loop = loop
        self.callback = callback
        self.when = 0.0  # 0 = not armed
        self._handle: asyncio.TimerHandle | None = None
        self._scheduled = 0.0

    def set(self, when: float) -> None:
        self.when = when
        if self._handle is None:
            self._handle = self.loop.call_at(when, self._fire)
            self._scheduled = when
        elif self._scheduled > when:
            self._handle.cancel()
            self._handle = self.loop.call_at(when, self._fire)
            self._scheduled = when

    def clear(self) -> None:
        self.when = 0.0

    def cancel(self) -> None:
        self.when = 0.0
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        when = self.when
        if not when:
            return
        if self.loop.time() + 0.0005 >= when:
            self.when = 0.0
            self.callback()
        else:
            self._handle = self.loop.call_at(when, self._fire)
            self._scheduled = when


class Outbox:
    """The sides with queued bytes in this loop iteration; flushed once, at its end (rule 4).
    A side adds itself (Sender.send) and schedules the flush when it is the first."""

    __slots__ = ("loop", "sides", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.sides: list[Sender] = []

    def flush(self) -> None:
        sides = self.sides
        self.sides = []
        for side in sides:
            try:
                side.flush_out()
            except Exception:  # one side's failure must not hold back the others' bytes
                log.exception("sending queued bytes")


_outboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Outbox] = weakref.WeakKeyDictionary()


_last_box: Outbox | None = None  # the worker's one loop: no WeakKeyDictionary lookup per connection


def outbox_for(loop: asyncio.AbstractEventLoop) -> Outbox:
    global _last_box
    box = _last_box
    if box is not None and box.loop is loop:
        return box
    box = _outboxes.get(loop)
    if box is None:
        box = _outboxes[loop] = Outbox(loop)
    _last_box = box
    return box


class Sender:
    """Queued writes for a protocol (rule 4): `send` defers to the iteration's end, `write` and
    `flush_out` send what is queued now. The protocol has `transport`, `is_closed`, `outbox`,
    `sendq` (list) and `sendq_bytes`."""

    __slots__ = ()

    transport: asyncio.Transport
    is_closed: bool
    outbox: Outbox
    sendq: list[bytes]
    sendq_bytes: int

    def init_sending(self, loop: asyncio.AbstractEventLoop) -> None:
        self.outbox = outbox_for(loop)
        self.sendq = []
        self.sendq_bytes = 0

    def send(self, data: bytes) -> None:
        sendq = self.sendq
        if not sendq:
            box = self.outbox
            sides = box.sides
            if not sides:
                box.loop.call_soon(box.flush)
            sides.append(self)
            self.sendq_bytes = len(data)
        else:
            self.sendq_bytes += len(data)
        sendq.append(data)
        if self.sendq_bytes >= SEND_NOW:
            self.flush_out()

    def flush_out(self) -> None:
        sendq = self.sendq
        if sendq:
            data = sendq[0] if len(sendq) == 1 else b"".join(sendq)
            sendq.clear()
            if not self.is_closed:
                self.transport.write(data)

    def write(self, data: bytes) -> None:
        """Send now, after anything queued."""
        self.sendq.append(data)
        self.flush_out()
