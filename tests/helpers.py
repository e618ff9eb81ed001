"""Test doubles for the pure and protocol tiers: a fake clock, a fake transport, a wired pair.

Nothing here mocks laneproxy's own classes: `FakeLoop` stands in for the event loop's clock and
timers, `MockTransport` for an asyncio transport (uvicorn tests/protocols/test_http.py), and
`ProxyPair` wires a real DownstreamProtocol to real UpstreamProtocols through a real Lane.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

from laneproxy.config import ClientConfig, LaneConfig
from laneproxy.downstream import Context, DownstreamProtocol
from laneproxy.flow import outbox_for
from laneproxy.lane import Lane, Server
from laneproxy.pool import Pool
from laneproxy.router import Route, Router
from laneproxy.upstream import UpstreamProtocol

# -- a clock you move by hand -------------------------------------------------------------------


class FakeTimer:
    """What call_later/call_at return: remembers its callback; `cancel()` like a TimerHandle."""

    def __init__(self, loop: FakeLoop, when: float, delay: float, callback: Callable[..., Any], args: tuple) -> None:
        self.loop = loop
        self.when = when
        self.delay = delay
        self._callback = callback
        self._args = args
        self.cancelled = False
        self.ran = False

    def callback(self) -> None:
        """Run the timer's callback now (as the loop would at `when`)."""
        self.ran = True
        self._callback(*self._args)

    def cancel(self) -> None:
        self.cancelled = True

    def __repr__(self) -> str:
        return f"<FakeTimer when={self.when} cancelled={self.cancelled} ran={self.ran}>"


class FakeLoop:
    """The slice of an event loop that pool.py and flow.py use: time(), call_soon(), call_later(),
    call_at()."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.timers: list[FakeTimer] = []
        self.soon: list[tuple[Callable[..., Any], tuple]] = []

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        self.soon.append((callback, args))

    def run_soon(self) -> None:
        """End the loop iteration: run what call_soon queued (flow rule 4's writes)."""
        while self.soon:
            callback, args = self.soon.pop(0)
            callback(*args)

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> FakeTimer:
        timer = FakeTimer(self, self.now + delay, delay, callback, args)
        self.timers.append(timer)
        return timer

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> FakeTimer:
        timer = FakeTimer(self, when, when - self.now, callback, args)
        self.timers.append(timer)
        return timer

    def pending(self) -> list[FakeTimer]:
        return [t for t in self.timers if not t.cancelled and not t.ran]

    def run_due(self) -> int:
        """Run every pending timer whose time has come, earliest first (also ones added meanwhile)."""
        ran = 0
        while True:
            self.run_soon()
            due = [t for t in self.pending() if t.when <= self.now]
            if not due:
                return ran
            min(due, key=lambda t: t.when).callback()
            ran += 1


# -- a transport that records ---------------------------------------------------------------


class MockTransport:
    """Records writes in `buffer`; tracks reading pauses, half-close and close like a real transport."""

    def __init__(
        self,
        peername: tuple[str, int] | None = ("127.0.0.1", 51000),
        sockname: tuple[str, int] | None = ("127.0.0.1", 8080),
        loop: Any = None,
    ) -> None:
        self.loop = loop  # whose end of iteration `buffer` waits for (default: the running loop)
        self._buffer = bytearray()
        self.writes = 0  # write() calls that carried bytes
        self.read_paused = False
        self.pause_calls = 0
        self.resume_calls = 0
        self.closed = False
        self.aborted = False
        self.eof_written = False
        self.write_limits: tuple[int | None, int | None] | None = None
        self._extra = {"peername": peername, "sockname": sockname}

    # asyncio.WriteTransport
    def write(self, data: bytes) -> None:
        if self.eof_written:  # what asyncio and uvloop do after write_eof()
            raise RuntimeError("Cannot call write() after write_eof()")
        if self.closed:
            return  # a closed transport drops writes (asyncio logs a warning)
        self.writes += 1
        self._buffer += data

    @property
    def buffer(self) -> bytearray:
        """What was written, as the peer sees it once the loop iteration ends (flow rule 4)."""
        loop = self.loop
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return self._buffer
        if isinstance(loop, FakeLoop):
            loop.run_soon()
        else:
            outbox_for(loop).flush()
        return self._buffer

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.write_limits = (high, low)

    def get_write_buffer_size(self) -> int:
        return 0

    # asyncio.ReadTransport
    def pause_reading(self) -> None:
        self.pause_calls += 1
        self.read_paused = True

    def resume_reading(self) -> None:
        self.resume_calls += 1
        self.read_paused = False

    def is_reading(self) -> bool:
        return not self.read_paused

    # asyncio.BaseTransport
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True
        self.aborted = True

    # test conveniences
    def take(self) -> bytes:
        """Everything written since the last take()."""
        buffer = self.buffer
        data = bytes(buffer)
        buffer.clear()
        return data

    def __repr__(self) -> str:
        return (
            f"<MockTransport buffered={len(self.buffer)} read_paused={self.read_paused} "
            f"closed={self.closed} eof_written={self.eof_written}>"
        )


# -- a downstream wired to a lane whose pool holds UpstreamProtocols on MockTransports ----------


def lane_config(servers: tuple[str, ...] = ("127.0.0.1:9",), **overrides: Any) -> LaneConfig:
    """A lane whose server nothing should ever connect to (tests park pooled connections instead)."""
    return LaneConfig(servers=list(servers), **overrides)


class ProxyPair:
    """One client connection (`down` on `down_t`) in front of lane `app` routed at `/api/`.

    `pooled_upstream()` puts an UpstreamProtocol on its own MockTransport into the server's pool
    (what Exchange._connect does for a fresh connection), so the next exchange acquires it
    instead of connecting.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        client: ClientConfig | None = None,
        lane_cfg: LaneConfig | None = None,
        prefix: bytes = b"/api/",
        strip_prefix: bool = True,
        peername: tuple[str, int] = ("192.0.2.7", 51000),
    ) -> None:
        self.loop = loop
        self.lane = Lane("app", lane_cfg or lane_config(), loop)
        self.server: Server = self.lane.servers[0]
        self.router = Router([Route(prefix=prefix, lane=self.lane, strip_prefix=strip_prefix)])
        self.ctx = Context(loop, self.router, client or ClientConfig())
        self.down_t = MockTransport(peername=peername, loop=loop)
        self.down = DownstreamProtocol(self.ctx)
        self.down.connection_made(self.down_t)  # type: ignore[arg-type]
        self.ups: list[tuple[UpstreamProtocol, MockTransport]] = []

    @property
    def pool(self) -> Pool:
        return self.server.pool

    def pooled_upstream(self) -> tuple[UpstreamProtocol, MockTransport]:
        up_t = MockTransport(peername=("127.0.0.1", 9), sockname=("127.0.0.1", 40000), loop=self.loop)
        conn = UpstreamProtocol(self.server, self.loop)
        conn.connection_made(up_t)  # type: ignore[arg-type]
        self.server.pool.add_active()
        conn.is_idle = True  # as Exchange._connect marks a connection it parks in the pool
        self.server.pool.release(conn, True)
        self.ups.append((conn, up_t))
        return conn, up_t

    def send(self, data: bytes) -> None:
        self.down.data_received(data)

    def close(self) -> None:
        """Tear down like the loop would: connection_lost on every live protocol (cancels timers)."""
        if self.down in self.ctx.connections:
            self.down.connection_lost(None)
        for conn, _ in self.ups:
            if not conn.is_closed:
                conn.close()
            conn.read_deadline.cancel()
        self.lane.close()


# -- byte constants -------------------------------------------------------------------------------

SIMPLE_GET_NO_ROUTE = b"\r\n".join([b"GET /nowhere HTTP/1.1", b"Host: example.com", b"", b""])
OK_5 = b"\r\n".join([b"HTTP/1.1 200 OK", b"Content-Length: 5", b"Server: up", b"", b"hello"])


_STATUS_LINE_RE = re.compile(rb"HTTP/1\.[01] [0-9]{3} [^\r\n]*\r\n")


def parse_response_heads(data: bytes) -> list[bytes]:
    """The status lines in `data`, in order, without CRLF (test bodies never contain one)."""
    return [m.group(0)[:-2] for m in _STATUS_LINE_RE.finditer(data)]


def forwarded_head(
    request_line: bytes,
    host: bytes = b"a",
    fields: bytes = b"",
    framing: bytes = b"\r\n",
    *,
    peer: bytes = b"192.0.2.7",
    xff: bytes | None = None,
    forwarded_host: bytes | None = None,
    via: bytes = b"1.1 laneproxy",
) -> bytes:
    """The head laneproxy writes upstream: its own request line, Host, fields, forwarding, Via, framing."""
    return b"".join([
        request_line, b"\r\n",
        b"Host: ", host, b"\r\n",
        fields,
        b"X-Real-IP: ", peer, b"\r\n",
        b"X-Forwarded-Proto: http\r\n",
        b"X-Forwarded-For: ", xff or peer, b"\r\n",
        b"X-Forwarded-Host: ", forwarded_host or host, b"\r\n",
        b"Via: ", via, b"\r\n",
        framing,
    ])


# -- the Date laneproxy adds to a response that has none (RFC 9110 §6.6.1) ----------------------

FIXED_DATE = b"Sun, 06 Nov 1994 08:49:37 GMT"  # RFC 9110's own example


def fix_date(monkeypatch: Any) -> None:
    """Stop the clock of the Date field that laneproxy adds, so relayed bytes can be compared."""
    import laneproxy.exchange

    monkeypatch.setattr(laneproxy.exchange, "http_date", lambda: FIXED_DATE)


def dated(response: bytes) -> bytes:
    """`response` (from an upstream that sent no Date) as laneproxy relays it: with its own Date
    after the status line (the clock stopped by `fix_date`)."""
    end = response.index(b"\r\n") + 2
    return response[:end] + b"Date: " + FIXED_DATE + b"\r\n" + response[end:]
