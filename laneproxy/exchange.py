"""Exchange: one request/response across both sides.

Theory of operation
-------------------
Rule 1. An exchange is created when the downstream parser completes a request head. It
becomes *active* when every exchange before it on the same client connection has finished
(pipelined requests are answered in order, one at a time). Only the active exchange talks to
an upstream.

Rule 2. Request bytes (laneproxy's own head, then the body re-framed as Content-Length or
chunked) go to the upstream as they arrive; before an upstream connection is attached they
are held in `pending` and the client's reading is paused, so at most one read is buffered.

Rule 3. The response is relayed as the upstream parser produces it: laneproxy writes its own
status line, the filtered fields and its own framing, then each body piece at once. A body of
unknown length is re-chunked for HTTP/1.1 clients and close-delimited for HTTP/1.0 clients.

Rule 4. The upstream connection goes back to its pool only when the request was fully
written, the response fully read, and nothing went wrong (the check in `on_response_complete`).
An upstream that answers before the request body is complete is closed, and the rest of the
client's body is read and dropped so the client connection can stay open.

Rule 5. A failure before the response head is sent becomes laneproxy's own answer (502/504),
or a retry when that is safe (nothing sent, or an idempotent body-less request on a reused
connection); after the head is sent, the client connection is aborted: no fake final chunk.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from laneproxy.connect import UpstreamLink
from laneproxy.errors import BodyTooLarge, ConnectFailed, LaneBusy, ProxyError, UpstreamStatus
from laneproxy.flow import CONNECTING, PEER_BUSY, hung_up
from laneproxy.http1 import CRLF, REASON, STATUS_LINE, error_response, http_date, status_line
from laneproxy.queue import FULL, QUEUED, SHED_WHY
from laneproxy.tunnel import Tunnel, open_tunnel
from laneproxy.upstream import CHUNKED, LENGTH, NO_BODY, UNTIL_CLOSE, UpstreamProtocol

if TYPE_CHECKING:
    from laneproxy.downstream import DownstreamProtocol
    from laneproxy.lane import Lane, Server
    from laneproxy.router import Route

log = logging.getLogger("laneproxy.exchange")

# Request body framing.
BODY_NONE, BODY_LENGTH, BODY_CHUNKED = range(3)
# Response progress.
RESP_NONE, RESP_HEAD_SENT, RESP_DONE = range(3)

LAST_CHUNK = b"0\r\n\r\n"


class Exchange(UpstreamLink):
    """One request and its response; see the module docstring for the rules."""

    __slots__ = (
        "down", "http11", "route", "lane", "method", "head", "is_head", "idempotent", "body_kind",
        "body_seen", "expect_continue", "keep_alive", "local", "pending", "up", "server",
        "reused", "req_done", "req_sent", "resp", "rechunk", "tries", "connect_task", "aborted",
        "counted", "status", "out", "head_written", "static", "tried", "started",
        "server_busy", "upgrade", "early", "tunnel", "queued",
        "t0", "t_conn", "t_head", "bytes_out", "target", "fields", "logged", "trailers_ok", "protocol",
    )

    def __init__(
        self,
        down: DownstreamProtocol,
        route: Route | None,
        method: bytes,
        head: bytes,
        body_kind: int,
        keep_alive: bool,
        *,
        expect_continue: bool = False,
        local: ProxyError | None = None,
        idempotent: bool = False,
        static: tuple[Path, dict[bytes, bytes]] | None = None,
        upgrade: frozenset[bytes] | None = None,
    ) -> None:
        self.down = down
        self.http11 = down.http11  # this request's version (a pipelined one behind may differ)
        self.route = route
        self.lane: Lane | None = route.lane if route is not None else None
        self.method = method
        self.head = head
        self.is_head = method == b"HEAD"
        self.idempotent = idempotent
        self.body_kind = body_kind
        self.body_seen = 0
        self.expect_continue = expect_continue
        self.keep_alive = keep_alive  # the client connection may stay open after this exchange
        self.local = local  # laneproxy answers this one itself
        self.static = static  # (file, request fields): served from disk by the route's StaticFiles
        self.pending: list[bytes] = [head]
        self.up: UpstreamProtocol | None = None
        self.server: Server | None = None
        self.reused = False
        self.req_done = False
        self.req_sent = False
        self.resp = RESP_NONE
        self.rechunk = False
        self.trailers_ok = False  # the client sent `TE: trailers` (F11)
        self.tries = 0
        self.tried: tuple[Server, ...] = ()
        self.started = 0.0
        self.server_busy = False
        self.upgrade = upgrade  # Upgrade tokens offered upstream (the lane allows them)
        self.early: list[bytes] = []  # client bytes after an Upgrade request, held until the 101
        self.tunnel: Tunnel | None = None
        self.queued = False
        # For the access log: times (loop clock), bytes sent, the request as received.
        self.t0 = down.loop.time()
        self.t_conn = 0.0
        self.t_head = 0.0
        self.bytes_out = 0
        self.target = b""
        self.protocol = b""  # for the log when not this exchange's HTTP/1.x (a refused request line)
        self.fields: list[bytes] = []
        self.logged = False
        self.connect_task: asyncio.Task[None] | None = None
        self.aborted = False
        self.counted = False
        self.status = 0
        self.out: list[bytes] = []  # response bytes gathered during one upstream read
        self.head_written = False

    # -- starting: local answer, pooled connection, or connect --------------------------------

    def start(self) -> None:
        if self.local is not None:
            self.answer(self.local)
            return
        if self.static is not None:
            self.connect_task = self.down.loop.create_task(self._serve_static())
            return
        lane = self.lane
        if lane.limited:  # type: ignore[union-attr]
            verdict = lane.admit(self, self.route.priority)  # type: ignore[union-attr]
            if verdict == QUEUED:
                self.queued = True
                if self.body_kind != BODY_NONE:
                    self.down.gate.close(CONNECTING)  # hold at most one read of body while waiting
                return
            if verdict == FULL:
                self.answer(LaneBusy(lane.name, "queue full", lane.queue.retry_after()))  # type: ignore[union-attr]
                return
        self._go()

    def admitted(self) -> None:
        """A queued exchange got its slot."""
        self.queued = False
        if self._client_left():  # never sent upstream (abortonclose)
            lane = self.lane
            lane.queue.client_gone()  # type: ignore[union-attr]
            self.down.abort()  # connection_lost → abort(): nothing was counted or sent
            lane.pass_slot()  # type: ignore[union-attr]
            return
        if self.body_kind != BODY_NONE:
            self.down.gate.open(CONNECTING)  # the rest of the body may come now
        self._go()

    def watch_while_queued(self) -> None:
        """The lane's periodic look (Lane._on_watch) at a waiter: one whose client left goes now."""
        if self.queued and self._client_left():
            self.down.abort()  # connection_lost → abort() → the lane's queue lets it go

    def _client_left(self) -> bool:
        # Reading may be paused while it waits (at most one read of body held, or a pipelined
        # request behind), so a FIN or RST may be waiting unseen: one poll(2) then.
        down = self.down
        return down.is_closed or (down.gate.is_paused and hung_up(down.transport))

    def shed(self, reason: str) -> None:
        """The lane queue gave up on this waiter (queue_timeout, CoDel, or the proxy stops): 503."""
        self.queued = False
        self.down.gate.open(CONNECTING)
        lane = self.lane
        why = SHED_WHY[reason]
        self.answer(LaneBusy(lane.name, why, lane.queue.retry_after()))  # type: ignore[union-attr]

    def _go(self) -> None:
        lane = self.lane
        lane.in_flight += 1  # type: ignore[union-attr]
        self.counted = True
        self.started = self.down.loop.time()
        if not self._acquire(False):  # a pooled connection when there is one
            self.answer(ConnectFailed(f"no live upstream servers in lane {lane.name}"))  # type: ignore[union-attr]

    async def _serve_static(self) -> None:
        down = self.down
        file, fields = self.static  # type: ignore[misc]
        self.keep_alive = self.keep_alive and down.may_keep_alive()
        try:
            self.status = await self.route.static.respond(  # type: ignore[union-attr]
                down, file, self.method, fields, self.keep_alive
            )
        except asyncio.CancelledError:
            return
        except OSError as exc:  # the file went away or broke mid-way: the head may be out already
            log.warning("static %s: %s", file, exc)
            down.abort()
            return
        finally:
            self.connect_task = None
        self.resp = RESP_DONE
        if self.req_done:
            self._finish()

    # -- request side (called by DownstreamProtocol) ------------------------------------------

    def on_request_body(self, chunk: bytes) -> None:
        self.body_seen += len(chunk)
        lane = self.lane
        if lane is not None and lane.max_body and self.body_seen > lane.max_body:
            raise BodyTooLarge(f"request body over the lane's max_body ({lane.max_body} bytes)")
        if self.resp == RESP_DONE or self.local is not None or self.static is not None:
            return  # answered by laneproxy: the rest of the body is read and dropped
        if self.body_kind == BODY_CHUNKED:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        up = self.up
        if up is not None:
            up.send(chunk)
        else:
            self.pending.append(chunk)

    def on_request_complete(self) -> None:
        self.req_done = True
        if self.resp == RESP_DONE:
            self._finish()
            return
        if self.local is not None or self.static is not None:
            return
        if self.body_kind == BODY_CHUNKED:
            if self.up is not None:
                self.up.send(LAST_CHUNK)
            else:
                self.pending.append(LAST_CHUNK)
        if self.up is not None:
            self.req_sent = True
            self.up.arm_read_timeout()

    def request_failed(self, err: ProxyError) -> None:
        """The client's request turned out bad mid-body: drop the upstream, answer or abort."""
        self._drop_upstream()
        if self.resp == RESP_NONE:
            self.answer(err, close=True)
        else:
            self.down.abort()

    # -- response side (called by UpstreamProtocol) --------------------------------------------

    def on_informational(self, status: int, reason: bytes, headers: list[bytes]) -> None:
        # 100 Continue was laneproxy's own business with the client; other 1xx (103) pass to 1.1.
        if status != 100 and self.http11 and self.resp == RESP_NONE:
            self.down.send(b"".join([status_line(status, reason), *headers, CRLF]))

    def on_response_head(self, up: UpstreamProtocol) -> None:
        down = self.down
        status = up.status
        if status >= 500 or status == 429:
            lane = self.lane
            if f"http_{status}" in lane.retry_on:  # type: ignore[union-attr]
                err = UpstreamStatus(status)
                if self._may_retry(err, False, False) and lane.can_try_another(self.tried):  # type: ignore[union-attr]
                    raise err  # the parser stops; upstream_failed retries on another server
                # Nowhere else to go: this answer is the last one, relayed (nginx: tries left only)
                lane.record_failure(self.server)  # type: ignore[union-attr,arg-type]
        self.status = status
        # laneproxy's own status line (I1) with the upstream's reason phrase; precomputed when usual.
        line = STATUS_LINE.get(status)
        if line is None or REASON[status] != up.reason:
            line = status_line(status, up.reason)
        parts = [line]
        if not up.has_date:  # RFC 9110 §6.6.1: a recipient with a clock adds the missing Date
            parts.append(b"Date: %s\r\n" % http_date())
        parts += up.headers
        mode = up.mode
        if mode == LENGTH:
            parts.append(b"Content-Length: %d\r\n" % up.content_length)
        elif mode == NO_BODY:
            if up.content_length is not None and status != 204:
                parts.append(b"Content-Length: %d\r\n" % up.content_length)
        elif self.http11:
            parts.append(b"Transfer-Encoding: chunked\r\n")
            self.rechunk = True
            if up.trailer_names and self.trailers_ok and mode == CHUNKED:
                parts += up.trailer_names  # announced, as the trailers will follow (RFC 9110 §6.6.2)
        else:
            self.keep_alive = False  # close-delimited body to an HTTP/1.0 client
        if not self.req_done:
            # The upstream answers before the request is complete: it will not read the rest.
            # The client may keep its connection only if it sends a framed rest we can skip.
            up.broken = True
        if not (self.keep_alive and down.may_keep_alive()):
            self.keep_alive = False
            parts.append(b"Connection: close\r\n")
        parts.append(CRLF)
        self.out.append(b"".join(parts))
        self.resp = RESP_HEAD_SENT
        self.t_head = down.loop.time()

    def on_response_body(self, body: bytes) -> None:
        if self.rechunk:
            self.out.append(b"%x\r\n%b\r\n" % (len(body), body))
        else:
            self.out.append(body)

    def flush(self) -> None:
        """Write what one upstream read produced in one call (head and body share a segment)."""
        out = self.out
        if out:
            self.head_written = True
            data = out[0] if len(out) == 1 else b"".join(out)
            self.bytes_out += len(data)
            self.down.send(data)
            out.clear()

    def on_response_complete(self) -> None:
        up = self.up
        if self.rechunk:
            trailers = up.trailers  # type: ignore[union-attr]
            if trailers and self.trailers_ok:  # F11: only to a client that asked for them
                self.out.append(b"0\r\n%s\r\n" % b"".join(trailers))
            else:
                self.out.append(LAST_CHUNK)
        self.flush()
        self.resp = RESP_DONE
        server = self.server
        if server.fails:  # type: ignore[union-attr]
            self.lane.record_success(server)  # type: ignore[union-attr,arg-type]
        # Rule 4 (style.md habit 6): keep-alive allowed, message complete, nothing left over, no error.
        reusable = (
            self.req_sent and up.keep_alive and up.done and not up.broken  # type: ignore[union-attr]
            and not up.is_closed and up.mode != UNTIL_CLOSE  # type: ignore[union-attr]
        )
        self._release_upstream(reusable)
        if self.req_done:
            self._finish()
        # else: the rest of the request body is read and dropped; on_request_complete finishes.

    def upstream_failed(self, err: ProxyError) -> None:
        """The upstream side failed: retry when safe (a3 rule 4), else answer or abort the client."""
        up = self.up
        if self.resp == RESP_HEAD_SENT and not self.head_written:
            self.out.clear()  # the head never left: the client can still get a clean 502
            self.resp = RESP_NONE
            self.rechunk = False
        lane = self.lane
        server = self.server
        connect_stage = up is None
        # The keep-alive race: a reused connection closed before any response byte. Not the
        # server's fault; a fresh connection to the same server is the cure.
        race = not connect_stage and self.reused and not up.got_bytes and err.condition == "error"  # type: ignore[union-attr]
        self._drop_upstream()
        if server is not None and not race and err.condition in lane.retry_on:  # type: ignore[union-attr]
            lane.record_failure(server)  # type: ignore[union-attr]
        retry = self._may_retry(err, connect_stage, race)
        if retry and race:
            self.tried = self.tried[:-1]  # the same server again, on a new connection
            self.tries -= 1  # and not one of the lane's `retries` (a fresh one cannot race)
        log.warning(
            "%s failure: %s (lane %s, server %s, %s)", err.side, err.reason, lane.name if lane else "-",
            server.name if server else "-", "retrying" if retry else "not retried",
        )
        if retry:
            server.retried += 1  # type: ignore[union-attr]
            if not connect_stage:  # what was sent is replayed; before a connect nothing was sent
                self.pending = [self.head]
            if self._acquire(fresh=race):
                return
        self.down.gate.open(CONNECTING)
        if lane is not None:
            lane.failed += 1  # exchanges that ended in laneproxy's own 502/504 or an abort
        if self.resp == RESP_NONE:
            self.answer(err, close=not self.req_done)
        else:
            self.flush()
            self.down.abort()

    def _may_retry(self, err: ProxyError, connect_stage: bool, race: bool) -> bool:
        """Safe-retry rules: nothing reached the client, tries and time left, and either nothing
        was sent (connect stage) or the request is idempotent and fully replayable."""
        lane = self.lane
        if self.resp != RESP_NONE or self.aborted or lane is None:
            return False
        if self.tries > lane.retries and not race:  # the race costs no try (nginx: peer.cached)
            return False
        if lane.retry_timeout and self.down.loop.time() - self.started > lane.retry_timeout:
            return False
        if connect_stage:
            return err.condition in lane.retry_on
        if not (self.idempotent and self.body_kind == BODY_NONE and self.req_done):
            return False  # RFC 9110 §9.2.2: never replay what is not safe to replay
        return race or err.condition in lane.retry_on

    # -- tunnels (Upgrade) ----------------------------------------------------------------------

    def start_tunnel(self, up: UpstreamProtocol, rest: bytes) -> None:
        """The upstream switched protocols as asked: relay its 101, then bytes both ways."""
        self.status = 101
        self.out.append(b"".join([status_line(101, up.reason), *up.headers, b"Connection: upgrade\r\nUpgrade: ",
                                  up.upgrade or b"", b"\r\n\r\n"]))
        if rest:
            self.out.append(rest)  # bytes the upstream sent right after its 101
        self.flush()
        self.down.flush_out()  # the tunnel writes directly from here on: the 101 goes first
        self.resp = RESP_HEAD_SENT
        self.tunnel = open_tunnel(self, self.down, up)
        if not self.lane.cfg.limit_streams and self.counted:  # type: ignore[union-attr]
            self.counted = False
            self.lane.in_flight -= 1  # type: ignore[union-attr]
            self.lane.served += 1  # type: ignore[union-attr]

    def tunnel_closed(self) -> None:
        self.down.ctx.tunnels -= 1
        self.tunnel = None
        self.resp = RESP_DONE
        self._drop_upstream()
        self._finish()

    def upstream_write_paused(self) -> None:
        self.down.gate.close(PEER_BUSY)

    def upstream_write_resumed(self) -> None:
        self.down.gate.open(PEER_BUSY)

    # -- endings --------------------------------------------------------------------------------

    def answer(self, err: ProxyError, close: bool = False) -> None:
        """laneproxy's own response for this exchange (the only path that serialises one)."""
        down = self.down
        self.status = err.status
        close = close or err.status in (400, 408, 413, 414, 431, 501, 505) or not self.keep_alive
        if not close and not down.may_keep_alive():
            close = True
        self.keep_alive = not close
        data = error_response(err.status, err.reason, close=close, extra=err.fields, head_only=self.is_head)
        self.bytes_out += len(data)
        down.send(data)
        self.resp = RESP_DONE
        self.local = err
        if close:
            self._finish(lingering=True)
        elif self.req_done:
            self._finish()
        # else: the body still comes and is dropped; on_request_complete finishes.

    def _log(self) -> None:
        access_log = self.down.ctx.access_log
        if access_log is not None and not self.logged:
            self.logged = True
            try:
                access_log.log(self, self.down.loop.time())
            except Exception:  # a logging fault must never break the exchange it describes
                log.exception("access log")

    def _finish(self, lingering: bool = False) -> None:
        if self.down.ctx.access_log is not None:
            self._log()
        route = self.route
        if route is not None:
            route.responses[self.status // 100 if self.status < 600 else 5] += 1
        else:
            local = self.down.ctx.local_responses
            local[self.status] = local.get(self.status, 0) + 1
        if self.counted:
            self._uncount()
            self.lane.served += 1  # type: ignore[union-attr]
        self.down.exchange_done(self, lingering)

    def _uncount(self) -> None:
        """Give back the lane slot; a queued waiter takes it at once."""
        self.counted = False
        lane = self.lane
        lane.in_flight -= 1  # type: ignore[union-attr]
        lane.upstream_time.observe(self.down.loop.time() - self.started)  # type: ignore[union-attr]
        if lane.limited:  # type: ignore[union-attr]
            lane.pass_slot()  # type: ignore[union-attr]

    def abort(self) -> None:
        """The client went away: close the upstream at once so it can stop work."""
        self.aborted = True
        self._log()
        if self.queued:  # the upstream never sees a request whose client left the queue
            self.queued = False
            self.lane.leave_queue(self)  # type: ignore[union-attr]
        self._drop_upstream()
        if self.counted:
            self._uncount()

    def __repr__(self) -> str:
        lane = self.lane.name if self.lane else "-"
        return f"<Exchange {self.method.decode()} lane={lane} resp={self.resp} req_done={self.req_done}>"
