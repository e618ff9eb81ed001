"""Tunnel: raw two-way bytes between a client and an upstream after a `101 Switching Protocols`.

Theory of operation
-------------------
Rule 1. A tunnel starts only when the upstream answered 101 with an `Upgrade` that the client
asked for and the lane allows; until then both sides speak HTTP (no WebSocket smuggling).

Rule 2. Bytes go straight from one side's data_received to the other side's transport.write.
The exchange's crossed flow control stays wired: a full write buffer on one side pauses
reading on the other.

Rule 3. A FIN from one side is passed on as a FIN (write_eof) to the other, after the bytes
written before it; the tunnel closes when both directions are done, or when either side is
reset, or after `tunnel_idle_timeout` without a byte either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from laneproxy.flow import UPGRADE, Deadline

if TYPE_CHECKING:
    from laneproxy.downstream import DownstreamProtocol
    from laneproxy.exchange import Exchange
    from laneproxy.upstream import UpstreamProtocol


class Tunnel:
    """Owns both connections of an upgraded exchange until one of them ends."""

    __slots__ = ("exchange", "down", "up", "idle_timeout", "last_active", "deadline", "eof_down", "eof_up", "closed")

    def __init__(self, exchange: Exchange, down: DownstreamProtocol, up: UpstreamProtocol, idle_timeout: float) -> None:
        self.exchange = exchange
        self.down = down
        self.up = up
        self.idle_timeout = idle_timeout
        self.last_active = down.loop.time()
        self.deadline = Deadline(down.loop, self._on_idle)
        self.eof_down = False
        self.eof_up = False
        self.closed = False
        if idle_timeout > 0:
            self.deadline.set(self.last_active + idle_timeout)

    # -- bytes ------------------------------------------------------------------------------------

    def from_downstream(self, data: bytes) -> None:
        self.last_active = self.down.loop.time()
        self.up.write(data)

    def from_upstream(self, data: bytes) -> None:
        self.last_active = self.down.loop.time()
        self.down.write(data)

    # -- ends -------------------------------------------------------------------------------------

    def downstream_eof(self) -> bool:
        """The client half-closed: pass the FIN on; keep the client open for the answer."""
        self.eof_down = True
        up = self.up
        if not up.is_closed and up.transport.can_write_eof():
            up.transport.write_eof()
        if self.eof_up:
            self.close()
            return False
        return True

    def upstream_eof(self) -> bool:
        self.eof_up = True
        down = self.down
        if not down.is_closed and down.transport.can_write_eof():
            down.transport.write_eof()
        if self.eof_down:
            self.close()
            return False
        return True

    def connection_lost(self) -> None:
        """Either side is gone for good: deliver what was written (close flushes), end both."""
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.deadline.cancel()
        self.up.close()
        self.down.close()
        self.exchange.tunnel_closed()

    def _on_idle(self) -> None:
        now = self.down.loop.time()
        if now - self.last_active >= self.idle_timeout:
            self.close()
        else:
            self.deadline.set(self.last_active + self.idle_timeout)

    def __repr__(self) -> str:
        return f"<Tunnel eof_down={self.eof_down} eof_up={self.eof_up} closed={self.closed}>"


def open_tunnel(exchange: Exchange, down: DownstreamProtocol, up: UpstreamProtocol) -> Tunnel:
    """Switch both connections of `exchange` to raw bytes (its 101 is already written)."""
    up.read_deadline.cancel()
    tunnel = Tunnel(exchange, down, up, exchange.lane.cfg.tunnel_idle_timeout)  # type: ignore[union-attr]
    up.tunnel = down.tunnel = tunnel
    down.upgrade_wait = None
    down.ctx.tunnels += 1
    early, exchange.early = exchange.early, []
    if early:  # bytes the client pipelined with its handshake, in order
        up.write(b"".join(early))
    down.gate.open(UPGRADE)
    return tunnel
