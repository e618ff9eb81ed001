"""UpstreamLink: how an exchange gets its upstream connection (the lane → pool → upstream step).

`_acquire` picks a server (skipping the ones already tried) and takes a pooled connection, or
starts the one task an exchange may need, `_connect`; `_attach` lends the connection to the
exchange and writes what is pending (laneproxy's head, then any body already read);
`_release_upstream` gives it back to the pool (reusable or not), `_drop_upstream` gives up on
it. A mixin of Exchange: it works on the exchange's own fields.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from laneproxy.errors import ConnectFailed, ProxyError, UpstreamTimeout
from laneproxy.flow import CONNECTING, PEER_BUSY
from laneproxy.http1 import CONTINUE_100
from laneproxy.upstream import UpstreamProtocol

if TYPE_CHECKING:
    from laneproxy.lane import Server


class UpstreamLink:
    __slots__ = ()

    def _acquire(self, fresh: bool) -> bool:
        """Pick a server and get a connection (pooled, or a connect task); False: none left."""
        server = self.lane.pick(self.tried)  # type: ignore[union-attr]
        if server is None:
            return False
        self.tries += 1
        self.tried += (server,)
        self.server = server
        self.server_busy = True
        server.in_flight += 1
        server.requests += 1
        conn = None if fresh else server.pool.acquire()
        if conn is not None:
            self._attach(conn, True)  # reused
            return True
        self.down.gate.close(CONNECTING)
        self.connect_task = self.down.loop.create_task(self._connect(server))
        return True

    async def _connect(self, server: Server) -> None:
        # Counted here, not when the task is made: a task cancelled before its first step never
        # runs, so its `except CancelledError` would never give the count back.
        server.pool.connecting += 1
        loop = self.down.loop
        lane = self.lane
        err: ProxyError | None = None
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamProtocol(server, loop), server.host, server.port),
                lane.connect_timeout,  # type: ignore[union-attr]
            )
        except asyncio.CancelledError:
            server.pool.connecting -= 1
            return
        except TimeoutError:
            err = UpstreamTimeout(f"connect to {server.name} timed out")
        except OSError as exc:
            err = ConnectFailed(f"connect to {server.name} failed: {exc.strerror or exc.__class__.__name__}")
        server.pool.connecting -= 1
        self.connect_task = None
        if err is not None:
            if not self.aborted:
                self.upstream_failed(err)
            else:
                self._server_done()
            return
        server.pool.add_active()
        if self.aborted:  # the client left while we connected: keep the fresh connection warm
            conn.is_idle = True
            server.pool.release(conn, True)
            return
        self.down.gate.open(CONNECTING)
        self._attach(conn, False)  # fresh

    def _attach(self, conn: UpstreamProtocol, reused: bool) -> None:
        self.t_conn = self.down.loop.time()
        self.up = conn
        self.reused = reused
        conn.start(self, self.lane.read_timeout)  # type: ignore[union-attr]
        pending = self.pending
        conn.send(pending[0] if len(pending) == 1 else b"".join(pending))
        self.pending = []
        if self.req_done:
            self.req_sent = True
            conn.arm_read_timeout()
        elif self.expect_continue:
            self.expect_continue = False
            self.down.send(CONTINUE_100)
        if self.down.write_paused:
            conn.gate.close(PEER_BUSY)

    # -- giving the connection back ----------------------------------------------------------

    def _release_upstream(self, reusable: bool) -> None:
        up = self.up
        if up is None:
            return
        if self.server_busy:
            self.server_busy = False
            up.server.in_flight -= 1
        self.up = None
        up.exchange = None
        up.read_deadline.when = 0.0  # Deadline.clear(), inlined on the hot path
        if up.gate.reasons:
            up.gate.open(PEER_BUSY)  # an idle connection must keep reading to see EOF
        if self.down.gate.reasons:
            self.down.gate.open(PEER_BUSY)  # no resume_writing will come from a released upstream
        server = up.server
        server.pool.release(up, reusable)
        up.is_idle = reusable and not up.is_closed

    def _server_done(self) -> None:
        if self.server_busy:
            self.server_busy = False
            self.server.in_flight -= 1  # type: ignore[union-attr]

    def _drop_upstream(self) -> None:
        up = self.up
        if up is not None:
            up.broken = True
            self._release_upstream(False)
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        self._server_done()
