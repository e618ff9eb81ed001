"""DownstreamProtocol: one client connection, parsing requests with httptools.

Every request is validated on its own, routed, and turned into an Exchange with laneproxy's own
request head (raw client bytes are never forwarded); pipelined ones are answered in order.
"""

from __future__ import annotations

import asyncio
from collections import deque

import httptools

from laneproxy.context import Context
from laneproxy.errors import BadRequest, ProxyError
from laneproxy.exchange import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, RESP_DONE, Exchange
from laneproxy.flow import (
    DRAINING,
    HIGH_WATER,
    LOW_WATER,
    PEER_BUSY,
    PIPELINE,
    UPGRADE,
    Deadline,
    ReadGate,
    Sender,
    hung_up,
)
from laneproxy.http1 import ChunkLineGuard, error_response
from laneproxy.request import RequestHead, TransferEncodingOWS, body_ends_within, build_exchange
from laneproxy.request_start import RequestStart
from laneproxy.tunnel import Tunnel

LINGER_SECONDS = 5.0  # after an error answer, read and drop for at most this long, then close


class DownstreamProtocol(RequestStart, RequestHead, Sender, asyncio.Protocol):
    """Parses client requests, builds their Exchanges, and writes their responses in order."""

    __slots__ = (
        "_drain_waiter", "_starting", "active", "chunk_guard", "closing", "conn_tokens", "cr_pending", "te_trailers_at",
        "content_length", "ctx", "current", "deferred", "expect", "fwd_fixed", "fwd_own", "gate",
        "head_bytes", "head_parts", "header_bytes", "header_count", "headers", "host", "host_fields", "host_ok",
        "http11", "idle_deadline", "in_head", "is_closed", "last_offer", "line_part", "lingering", "loop",
        "outbox", "parse_dead", "parser", "peer_eof", "peer_ip", "queue", "read_deadline",
        "requests", "send_deadline", "sendq", "sendq_bytes", "te", "transport", "trusted", "tunnel",
        "unread", "upgrade", "upgrade_wait", "url", "write_paused", "xff",
    )

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.loop = ctx.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.gate: ReadGate = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.peer_ip = b"-"
        self.trusted = False
        self.fwd_fixed = b""
        self.fwd_own = b""
        self.active: Exchange | None = None
        self.tunnel: Tunnel | None = None
        self.upgrade_wait: Exchange | None = None  # an Upgrade request waiting for the 101
        self.queue: deque[Exchange] = deque()
        self.current: Exchange | None = None  # the exchange whose request is being parsed
        self.requests = 0
        self.http11 = True
        self.write_paused = False
        self.is_closed = False
        self.init_sending(self.loop)  # response bytes wait for the end of the loop iteration
        self.closing = False  # no more requests will be read; close after the active exchange
        self.lingering = False
        self.last_offer: Exchange | None = None
        self.peer_eof = False
        self.host_ok: bytes | None = None  # the last Host value that passed validation here
        self.host_fields = b""  # X-Forwarded-Host and Via for host_ok
        self.parse_dead = False
        self.cr_pending = False  # a read ended in CR between requests: the LF may come next
        self.te_trailers_at = 0  # the number of the last request that sent `TE: trailers`
        self.unread = False  # client bytes we will not read may be queued (close with lingering)
        self._starting = False
        self.in_head = False
        self.head_bytes = 0
        self.head_parts: list[bytes] = []  # the reads of a head still incomplete (head_bytes of them)
        self.line_part: bytes | None = None  # the start of a request line that spans reads
        self.chunk_guard: ChunkLineGuard | None = None  # bounds chunk extensions of the current body
        self._drain_waiter: asyncio.Future[None] | None = None
        self.idle_deadline = Deadline(self.loop, self._on_idle_timeout)
        self.read_deadline = Deadline(self.loop, self._on_read_timeout)
        self.send_deadline = Deadline(self.loop, self._on_send_timeout)
        self._reset_request()

    # -- Protocol interface -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.gate = ReadGate(self.transport)
        ctx = self.ctx
        if ctx.closing or len(ctx.connections) >= ctx.client.max_connections:
            ctx.rejected_connections += 1
            self.is_closed = True
            transport.close()
            return
        ctx.connections.add(self)
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else "unix"
        self.peer_ip = ip.encode()
        self.trusted = ctx.is_trusted(ip)
        self.fwd_fixed = b"X-Real-IP: %s\r\nX-Forwarded-Proto: http\r\n" % self.peer_ip
        self.fwd_own = self.fwd_fixed + b"X-Forwarded-For: %s\r\n" % self.peer_ip  # no trusted XFF
        # Before the first byte, the header timeout applies (nginx client_header_timeout).
        self.idle_deadline.set(self.loop.time() + ctx.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_downstream(data)
            return
        if self.upgrade_wait is not None:  # held until the upstream decides (and reading paused)
            self.upgrade_wait.early.append(data)
            return
        if self.lingering or self.parse_dead:
            return
        if (data[0] in (13, 10) or self.cr_pending) and self.current is None and not self.in_head:
            data = self._skip_empty_lines(data)
            if not data:
                return
        self.idle_deadline.when = 0.0  # Deadline.clear(), inlined on the hot path
        guard = self.chunk_guard
        if guard is not None and self.current is not None:
            try:
                fits = guard.feed(data)
            except ProxyError as err:  # BodyTooLarge: declared chunk sizes over max_body (413)
                self._request_error(err)
                return
            if not fits:
                self._request_error(BadRequest("chunk-size line too long (over 1 KiB of extensions or zeros)"))
                return
            cut = guard.tail
            if 0 < cut < len(data):
                # The chunked message ends inside this read: the next request starts at `cut` and
                # gets the checks of a request that starts a read (its request line, its guard).
                self._cut(data, cut)
                return
        elif self.current is None:
            part = self.line_part
            if part is not None or not self.in_head:
                # A request line starts (or goes on) here: "HTTP/x.y" before its CR, where llhttp
                # also takes "RTSP/x.y" and " ICE/x.y" (the first letter tells; llhttp checks the rest).
                cr = data.find(b"\r")
                if (part is not None or cr < 8 or data[cr - 8] != 72) and not self._http_request_line(data):
                    return
            # The head is fed alone when a chunked body (for its guard) or the next request (for
            # its checks) follows in this read. Only the head is searched, never a body (16 KiB
            # uploads scanned for "chunked": 14 % of the upload benchmark's CPU). The raw head
            # counts against max_head_bytes wherever the reads split it.
            if self.in_head:  # the head began in an earlier read; its blank line may straddle
                stop = self._head_end(data)
                if stop != -1 and self.head_bytes + stop > self.ctx.max_head_bytes:
                    self._request_error(ProxyError("request header section too large", 431))
                    return
                if 0 < stop < len(data):
                    self._cut(data, stop)
                    return
            else:
                end = data.find(b"\r\n\r\n")
                if end > self.ctx.max_head_bytes - 4:
                    self._request_error(ProxyError("request header section too large", 431))
                    return
                if 0 <= end < len(data) - 4 and (
                    (head := data[:end].lower()).find(b"chunked") != -1
                    or body_ends_within(head, len(data) - end - 4)
                ):
                    self._cut(data, end + 4)
                    return
        elif self.current.body_kind == BODY_LENGTH:
            # The end of a Content-Length body in this read: the next request starts here and
            # is parsed on its own (its chunk guard must see its body from the first byte).
            left = self.content_length - self.current.body_seen  # type: ignore[operator]
            if 0 < left < len(data):
                self._cut(data, left)
                return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            err = exc.__context__
            if not isinstance(err, ProxyError):
                raise
            if isinstance(err, TransferEncodingOWS) and self._reparse_without_te_ows(data):
                return
            self._request_error(err)
            return
        except httptools.HttpParserUpgrade as exc:
            rest = data[exc.args[0]:]
            offer = self.last_offer
            self.last_offer = None
            if offer is not None and offer.resp != RESP_DONE and not self.is_closed:
                # Hold what follows the handshake until the upstream answers: a 101 makes it
                # tunnel bytes, anything else means it is parsed as HTTP (no smuggling).
                self.upgrade_wait = offer
                if rest:
                    offer.early.append(rest)
                self.gate.close(UPGRADE)
                return
            # An Upgrade this lane does not tunnel (or HTTP/1.0): keep speaking HTTP, never raw.
            self.parser = httptools.HttpRequestParser(self)
            if rest:
                self.data_received(rest)
            return
        except httptools.HttpParserError as exc:
            if self.current is None and not self.in_head and str(exc).startswith("Data after"):
                self.parse_dead = True  # bytes after `Connection: close`: answer, then close
                self.unread = True
                return
            if self.current is None and str(exc).find("PRI") != -1:  # the HTTP/2 preface (a2)
                self._request_error(ProxyError("HTTP/2 is not supported on this listener", 505))
                return
            self._request_error(BadRequest(f"malformed request ({exc})"))
            return
        ctx = self.ctx
        if self.in_head:  # the head goes on in the next read: keep its bytes so far
            if self.head_bytes:
                self.head_parts.append(data)
            else:
                self.head_parts = [data]
            self.head_bytes += len(data)
            if self.head_bytes > ctx.max_head_bytes:
                self._request_error(ProxyError("request header section too large", 431))
            elif not self.read_deadline.when:
                self.read_deadline.set(self.loop.time() + ctx.header_timeout)
        elif self.current is not None:
            self.read_deadline.set(self.loop.time() + ctx.body_timeout)

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            return self.tunnel.downstream_eof()
        active = self.active
        if active is None or active is self.current:
            # Idle, or a FIN in the middle of the request being served: an abort (a3 rule 8).
            return None
        if active.queued:
            return None  # gave up while waiting in the lane queue (HAProxy abortonclose): never sent
        # FIN after a complete request: deliver the responses of the complete requests, then close.
        # A request cut short by the FIN (its head or body incomplete) is dropped, not answered.
        incomplete = self.current
        if incomplete is not None:
            self.current = None
            if incomplete in self.queue:
                self.queue.remove(incomplete)
            incomplete.abort()
        self.in_head = False
        self.peer_eof = True
        self.closing = True
        self.parse_dead = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = True
        self.sendq.clear()
        self.ctx.connections.discard(self)
        self.idle_deadline.cancel()
        self.read_deadline.cancel()
        self.send_deadline.cancel()
        self._wake_drain()
        if self.tunnel is not None:
            self.tunnel.connection_lost()
        active = self.active
        self.active = None
        if active is not None:
            active.abort()
        for ex in self.queue:
            ex.abort()
        self.queue.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        active = self.active
        if active is not None and active.up is not None:
            active.up.gate.close(PEER_BUSY)
        self.send_deadline.set(self.loop.time() + self.ctx.send_timeout)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.send_deadline.clear()
        self._wake_drain()
        active = self.active
        if active is not None and active.up is not None:
            active.up.gate.open(PEER_BUSY)

    # -- Used by Exchange ----------------------------------------------------------------------

    async def drain(self) -> None:
        """For local responders (files): wait until the client accepts more bytes."""
        if self.write_paused and not self.is_closed:
            self._drain_waiter = self.loop.create_future()
            await self._drain_waiter
        if self.is_closed:
            raise ConnectionResetError("client connection closed")

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def may_keep_alive(self) -> bool:
        """False for the last response: `closing` means no request after the queued ones."""
        return not (self.ctx.closing or (self.closing and not self.queue))

    def abort(self) -> None:
        if not self.is_closed:
            self.flush_out()  # what was produced goes out before the reset, as it would unqueued
            self.is_closed = True
            self.transport.abort()

    def exchange_done(self, ex: Exchange, lingering: bool) -> None:
        """The active exchange finished: start the next pipelined one, go idle, or close."""
        if ex is not self.active:
            return
        self.active = None
        if self.is_closed:
            return
        early = None
        if self.upgrade_wait is ex:  # refused (426, 200 ...): what followed is HTTP again
            self.upgrade_wait = None
            early, ex.early = b"".join(ex.early), []
            self.parser = httptools.HttpRequestParser(self)
            self.gate.open(UPGRADE)
        if lingering or not ex.keep_alive:
            # Linger only when unread client bytes may be queued (they would turn close into RST).
            self.close(lingering=lingering or self.unread or self.in_head or self.current is not None)
            return
        if self._starting:
            return  # the loop in _start_next goes on
        self._start_next()
        if early and not self.is_closed:
            self.data_received(early)

    def _start_next(self) -> None:
        self._starting = True
        try:
            while self.active is None and self.queue and not self.is_closed:
                if hung_up(self.transport, half_close=False):
                    # A reset while reading was paused: whoever sent these pipelined requests
                    # cannot get their answers, so none is sent upstream (a POST would run unseen).
                    self.abort()
                    return
                ex = self.queue.popleft()
                self.active = ex
                ex.start()
        finally:
            self._starting = False
        if self.active is not None and not self.queue and not self.is_closed:
            self.gate.open(PIPELINE)  # the request now served may still be receiving its body
        if self.active is None and not self.is_closed:
            if self.closing or self.ctx.closing:
                if self.current is None and not self.in_head:
                    self.close(lingering=self.unread)
                return
            self.gate.open(PIPELINE)
            if self.current is None and not self.in_head:
                self.idle_deadline.set(self.loop.time() + self.ctx.keepalive_timeout)

    def close(self, lingering: bool = False) -> None:
        """Close after what is written; lingering: half-close and drain so the answer is not lost."""
        if self.is_closed or self.lingering:
            return
        self.flush_out()
        self.read_deadline.cancel()
        self.idle_deadline.cancel()
        if not lingering or self.peer_eof or not self.transport.can_write_eof():
            self.is_closed = True
            self.transport.close()
            return
        self.lingering = True
        self.transport.write_eof()
        self.gate.reasons = 0
        try:
            self.transport.resume_reading()
        except RuntimeError:
            pass
        self.read_deadline = Deadline(self.loop, self._on_linger_timeout)
        self.read_deadline.set(self.loop.time() + LINGER_SECONDS)

    # -- Parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_bytes = 0
        self.requests += 1
        self.ctx.requests += 1
        self._reset_request()

    def on_headers_complete(self) -> None:
        self.read_deadline.when = 0.0  # (clear)
        if self.head_bytes:  # the head spanned reads: its bytes are not kept past it
            self.head_parts = []
        ex = build_exchange(self)  # (a refusal here is still "in the head": _request_error)
        self.in_head = False
        self.current = ex
        if ex.body_kind == BODY_CHUNKED:
            self.chunk_guard = ChunkLineGuard(ex.lane.max_body if ex.lane is not None and ex.local is None else 0)
        else:
            self.chunk_guard = None
        if self.active is None and not self.queue:
            self.active = ex
            self._starting = True
            try:
                ex.start()
            finally:
                self._starting = False
            if self.active is None:
                self._start_next()
        else:
            self.queue.append(ex)
            self.gate.close(PIPELINE)

    def on_body(self, body: bytes) -> None:
        self.current.on_request_body(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        ex = self.current
        self.current = None
        self.read_deadline.when = 0.0  # (clear)
        if ex is not None:
            ex.on_request_complete()
        if not self.closing and not self.lingering and ex is not None and not ex.keep_alive:
            self.closing = True
            self.parse_dead = True
            self.gate.close(DRAINING)

    def _request_error(self, err: ProxyError) -> None:
        """The parser stopped on a bad request: answer it in turn, then close."""
        self.parse_dead = True
        self.unread = True  # the rest of what the client sent is never read: linger on close
        # Refused in its head (400, 414, 431, 505, 408): answered and logged as what was read of
        # it (a HEAD gets no body, RFC 9110 §9.3.2; no method it did not send is made up).
        parsed = self.in_head and bool(self.url)  # the request line was read up to its target
        method = (self._parsed_method() if parsed else None) or b"-"
        self.in_head = False
        self.gate.close(DRAINING)
        ex = self.current
        self.current = None
        if ex is not None and ex is self.active:
            ex.request_failed(err)
            return
        if ex is not None:  # a queued pipelined request: it gets the error when its turn comes
            ex.local = err
            ex.keep_alive = False
            return
        ex = Exchange(self, None, method, b"", BODY_NONE, False, local=err)
        ex.req_done = True
        if parsed:  # for the access log, as nginx logs $request for a 400
            ex.target = self.url
            ex.fields = self.headers
        ex.protocol = self._parsed_protocol() if parsed else b"-"
        if self.active is None and not self.queue:
            self.active = ex
            ex.start()
        else:
            self.queue.append(ex)

    # -- deadlines ------------------------------------------------------------------------------

    def _on_idle_timeout(self) -> None:
        if self.active is None and self.current is None and not self.in_head:
            self.close()

    def _on_read_timeout(self) -> None:
        if self.current is not None and self.gate.is_paused:
            # We stopped reading the body ourselves (the upstream takes no more, or the request
            # waits for a connection): not the client's delay. The lane's timeouts bound that.
            self.read_deadline.set(self.loop.time() + self.ctx.body_timeout)
            return
        if self.in_head or self.current is not None:
            what = "request head" if self.in_head else "request body"
            self._request_error(ProxyError(f"timed out waiting for the {what}", 408))

    def _on_linger_timeout(self) -> None:
        if self.write_paused and not self.is_closed:  # still sending: send_timeout guards that
            self.read_deadline.set(self.loop.time() + LINGER_SECONDS)
        else:
            self.abort()

    def _on_send_timeout(self) -> None:
        if self.write_paused:
            self.abort()

    def __repr__(self) -> str:
        return (
            f"<DownstreamProtocol {self.peer_ip.decode()} requests={self.requests} "
            f"active={self.active!r} queued={len(self.queue)}>"
        )


__all__ = ["Context", "DownstreamProtocol", "error_response"]
