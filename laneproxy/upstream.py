"""UpstreamProtocol: one connection to an upstream server, parsing responses with httptools.

Mirror image of downstream.DownstreamProtocol. The connection is lent to one Exchange at a
time (`exchange`); while idle in its pool, any byte or EOF makes it discard itself.

httptools pitfalls handled here (docs/http-rules.md a2): a HEAD response ends at its blank line
whatever its Content-Length (the parser cannot know, so the parser is replaced after it); a
close-delimited body ends at EOF (there is no finish() call); should_keep_alive() is read inside
the callbacks; bytes after a complete response make the connection unusable.
"""

from __future__ import annotations

import asyncio
import select
from typing import TYPE_CHECKING

import httptools

from laneproxy.errors import ProxyError, UpstreamProtocolError, UpstreamTimeout
from laneproxy.flow import HIGH_WATER, LOW_WATER, POLLRDHUP, Deadline, ReadGate, Sender
from laneproxy.http1 import (
    MAX_TRAILERS,
    R_CL,
    R_CONNECTION,
    R_DATE,
    R_KEEPALIVE,
    R_TE,
    R_TRAILER,
    R_UPGRADE,
    RESPONSE_SPECIAL,
    TRAILER_DENY,
    has_field,
    split_tokens,
)

if TYPE_CHECKING:
    from laneproxy.exchange import Exchange
    from laneproxy.lane import Server
    from laneproxy.tunnel import Tunnel

MAX_RESPONSE_HEAD = 64 * 1024  # like nginx proxy_buffer_size limits it (502 beyond)
# The bound is on the field lines kept (checked when the head is complete, however it was read).
# Until then only raw bytes are known: they bound a runaway head, with room for the status line
# and the lines llhttp trims or laneproxy drops, so a head within the bound passes in any reads.
MAX_RAW_RESPONSE_HEAD = MAX_RESPONSE_HEAD + 8 * 1024
_SPECIAL_LENGTHS = frozenset(len(name) for name in RESPONSE_SPECIAL)

def trailer_fields(lines: list[bytes]) -> list[bytes]:
    """The trailer field lines of a chunked response, kept for a client that sent `TE: trailers`,
    minus what may not be a trailer (F11). (Content-Length, Transfer-Encoding, Connection and the
    other fields the head handles never reach `lines`: on_header takes them aside.)"""
    if sum(map(len, lines)) > MAX_TRAILERS:
        raise UpstreamProtocolError("upstream trailer section too large")
    return [line for line in lines if line[: line.find(b":")].lower() not in TRAILER_DENY]


# Response framing modes.
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE, SWITCHED = range(5)


class UpstreamProtocol(Sender, asyncio.Protocol):
    """Parses responses for the Exchange it is lent to; idle, it only watches for EOF."""

    __slots__ = (
        "_poll",
        "broken",
        "conn_tokens",
        "content_length",
        "done",
        "exchange",
        "expires_at",
        "has_date",
        "n_head",
        "trailers",
        "trailer_names",
        "gate",
        "got_bytes",
        "head_bytes",
        "headers",
        "informational",
        "is_closed",
        "is_idle",
        "keep_alive",
        "last_read",
        "loop",
        "mode",
        "outbox",
        "parser",
        "parser_stale",
        "read_deadline",
        "read_timeout",
        "reason",
        "sendq",
        "sendq_bytes",
        "send_deadline",
        "server",
        "status",
        "te",
        "transport",
        "tunnel",
        "upgrade",
        "uses",
        "write_paused",
    )

    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop) -> None:
        # Per-connection state
        self.server = server
        self.loop = loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.gate: ReadGate = None  # type: ignore[assignment]
        self.parser = httptools.HttpResponseParser(self)
        self.parser_stale = False
        self.uses = 0
        self.is_closed = False
        self.init_sending(loop)  # request bytes wait for the end of the loop iteration
        self.is_idle = False
        self.got_bytes = False  # any response byte for the current exchange (not the keep-alive race)
        self.expires_at = float("inf")  # from the upstream's `Keep-Alive: timeout=N`
        self._poll: select.poll | None = None
        self.write_paused = False
        self.exchange: Exchange | None = None
        self.tunnel: Tunnel | None = None
        self.read_deadline = Deadline(loop, self._on_read_timeout)
        self.send_deadline = Deadline(loop, self._on_send_timeout)  # the lane's send_timeout
        self.read_timeout = 0.0
        self.last_read = 0.0
        # Per-response state
        self._reset_response()

    def _reset_response(self) -> None:
        self.status = 0
        self.head_bytes = 0  # raw bytes read while the head is incomplete
        self.reason = b""
        self.headers: list[bytes] = []
        self.has_date = False
        self.trailers: list[bytes] | None = None
        self.trailer_names: tuple[bytes, ...] = ()  # the Trailer field lines (sent on with the trailers)
        self.content_length: int | None = None
        self.te: list[bytes] | None = None
        self.conn_tokens: list[bytes] | None = None
        self.upgrade: bytes | None = None
        self.keep_alive = False
        self.mode = -1  # framing mode once the head is parsed; -1 = no head yet
        self.done = False
        self.broken = False
        self.informational = False

    # -- Protocol interface -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.gate = ReadGate(self.transport)
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)  # type: ignore[attr-defined]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN | POLLRDHUP)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_upstream(data)
            return
        ex = self.exchange
        if ex is None:  # idle: unsolicited bytes (RFC 9112 §9.2 / F14)
            self._discard_idle()
            return
        self.last_read = self.loop.time()
        self.got_bytes = True
        if self.mode == -1:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            err = exc.__context__
            if not isinstance(err, ProxyError):
                raise
            self.broken = True
            ex.upstream_failed(err)
            return
        except httptools.HttpParserUpgrade as exc:
            if self.mode == SWITCHED and self.exchange is ex:
                ex.start_tunnel(self, data[exc.args[0]:])
                return
            self.broken = True
            ex.upstream_failed(UpstreamProtocolError("upstream switched protocols unasked"))
            return
        except httptools.HttpParserError as exc:
            self.broken = True
            if self.done:  # bytes after a complete response (F12): keep the answer, drop the conn
                ex.on_response_complete()
                return
            ex.upstream_failed(UpstreamProtocolError(f"invalid response from upstream: {exc}"))
            return
        if self.exchange is ex:
            if self.done:
                ex.on_response_complete()
            elif self.mode == -1 and self.head_bytes > MAX_RAW_RESPONSE_HEAD:
                # Still no end of the response head: bound it (httptools itself has no limit).
                self.broken = True
                ex.upstream_failed(UpstreamProtocolError("upstream response header section too large"))
            elif ex.out:
                ex.flush()
            elif self.mode == CHUNKED and sum(map(len, self.headers[self.n_head :])) > MAX_TRAILERS:
                # A read of trailer fields only (httptools has no limit): bound them as they come.
                self.broken = True
                ex.upstream_failed(UpstreamProtocolError("upstream trailer section too large"))

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            return self.tunnel.upstream_eof()
        return None  # close our side too; connection_lost does the accounting

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = True
        self.sendq.clear()
        self.read_deadline.cancel()
        self.send_deadline.cancel()
        if self.tunnel is not None:
            self.tunnel.connection_lost()
            return
        ex = self.exchange
        if ex is None:
            if self.is_idle:
                self._discard_idle()
            return
        if self.mode == UNTIL_CLOSE and not self.done:
            self.done = True
            self.keep_alive = False
            ex.on_response_complete()
            return
        elif not self.done:
            if self.mode == -1:
                reason = "upstream closed the connection before the response head"
            else:
                reason = "upstream closed the connection in the middle of the response body"
            ex.upstream_failed(UpstreamProtocolError(reason))

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.exchange
        if ex is not None:
            ex.upstream_write_paused()
            if self.tunnel is None:  # (a tunnel has its own idle timeout)
                self.send_deadline.set(self.loop.time() + ex.lane.send_timeout)  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.write_paused = False
        self.send_deadline.clear()
        if self.exchange is not None:
            self.exchange.upstream_write_resumed()

    # -- Used by Exchange ----------------------------------------------------------------------

    def start(self, exchange: Exchange, read_timeout: float) -> None:
        """Lend this connection to `exchange` for one request/response."""
        self.exchange = exchange
        self.is_idle = False
        self.uses += 1
        self.got_bytes = False
        self.read_timeout = read_timeout
        if self.parser_stale:
            self.parser = httptools.HttpResponseParser(self)
            self.parser_stale = False
        self._reset_response()

    def still_open(self, idle_for: float) -> bool:
        """Taken from the pool: an idle connection must not be readable (EOF or stray bytes that
        the loop has not dispatched yet). One poll(2), only after a noticeable idle time."""
        if self.is_closed:
            return False
        if idle_for < 0.5 or self._poll is None:
            return True
        try:
            return not self._poll.poll(0)
        except OSError:
            return False

    def arm_read_timeout(self) -> None:
        self.last_read = now = self.loop.time()
        self.read_deadline.set(now + self.read_timeout)

    def close(self) -> None:
        if not self.is_closed:
            self.is_closed = True
            self.read_deadline.cancel()
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.is_closed = True
            self.read_deadline.cancel()
            self.transport.abort()

    def _discard_idle(self) -> None:
        self.server.pool.discard(self)
        self.is_idle = False
        self.close()

    def _on_send_timeout(self) -> None:
        # nginx proxy_send_timeout: the upstream took no request bytes for that long (504).
        ex = self.exchange
        if ex is None or not self.write_paused or self.tunnel is not None or self.is_closed:
            return
        self.broken = True
        ex.upstream_failed(
            UpstreamTimeout(f"upstream accepted no request bytes within send_timeout ({ex.lane.send_timeout:g}s)")  # type: ignore[union-attr]
        )

    def _on_read_timeout(self) -> None:
        ex = self.exchange
        if ex is None or self.done:
            return
        now = self.loop.time()
        if self.gate.is_paused:  # we stopped reading ourselves (slow client): not the upstream's fault
            self.read_deadline.set(now + self.read_timeout)
        elif now - self.last_read < self.read_timeout:
            self.read_deadline.set(self.last_read + self.read_timeout)
        else:
            self.broken = True
            ex.upstream_failed(UpstreamTimeout(f"no upstream bytes within read_timeout ({self.read_timeout:g}s)"))

    # -- Parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done or self.exchange is None:  # a second response to one request (F12)
            self.broken = True

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        # Only names as long as a special one need lowering (Server, Date, Content-Type do not).
        # (The field line is built in three places on purpose: one shared branch cost 600
        # instructions per exchange in callgrind.)
        if name == b"Date":  # the usual spelling, without the lookup below
            self.headers.append(b"".join((name, b": ", value.rstrip(b" \t"), b"\r\n")))
            self.has_date = True
            return
        kind = RESPONSE_SPECIAL.get(name.lower()) if len(name) in _SPECIAL_LENGTHS else None
        if kind is None:
            self.headers.append(b"".join((name, b": ", value.rstrip(b" \t"), b"\r\n")))
        elif kind == R_DATE:
            self.headers.append(b"".join((name, b": ", value.rstrip(b" \t"), b"\r\n")))
            self.has_date = True
        elif kind == R_CL:
            self.content_length = int(value)  # httptools has checked 1*DIGIT and duplicates
        elif kind == R_TE:
            # Chunked only where llhttp reads it so (leading OWS, trailing SP): `chunked\t` or
            # `chunked,` would make it read until close while we re-chunk raw framing (a2).
            coding = value.lstrip(b" \t").rstrip(b" ").lower()
            self.te = (self.te or []) + [coding if coding == b"chunked" else value or b"-"]
        elif kind == R_CONNECTION:
            self.conn_tokens = (self.conn_tokens or []) + split_tokens(value)
        elif kind == R_KEEPALIVE:
            self._keep_alive_hint(value)
        elif kind == R_UPGRADE:
            self.upgrade = value.strip(b" \t").lower()
        elif kind == R_TRAILER:
            self.trailer_names += (b"".join((name, b": ", value.rstrip(b" \t"), b"\r\n")),)

    def on_headers_complete(self) -> None:
        if self.done:
            return
        ex = self.exchange
        status = self.parser.get_status_code()
        self.status = status
        if sum(map(len, self.headers)) > MAX_RESPONSE_HEAD:  # every head, 1xx too, however read
            raise UpstreamProtocolError("upstream response header section too large")
        if status < 200:
            # RFC 9110 §15: status codes are 100-599 (llhttp takes any 3 digits). One below 100
            # would pass for a 1xx here; 600-999 are relayed as final answers (nginx, HAProxy).
            if status < 100:
                raise UpstreamProtocolError(f"invalid status code {status:03d} from upstream")
            if self.content_length or self.te is not None:
                # RFC 9112 §6.3(1): a 1xx ends at its blank line. llhttp would read a body for it,
                # and that body (or a response hidden in it) must never reach the client.
                raise UpstreamProtocolError("upstream sent content with a 1xx response")
            if status == 101:
                # Only to a protocol the client asked for and the lane allows (RFC 9110 §7.8).
                offered = ex.upgrade  # type: ignore[union-attr]
                if offered is None or self.upgrade is None:
                    raise UpstreamProtocolError("upstream switched protocols unasked")
                protocol = self.upgrade.split(b"/")[0]
                if protocol not in offered:
                    raise UpstreamProtocolError("upstream switched to a protocol that was not asked for")
                if protocol == b"websocket" and not has_field(self.headers, b"sec-websocket-accept:"):
                    # RFC 6455 §4.1: a failed handshake; never a tunnel (502, as HAProxy does)
                    raise UpstreamProtocolError("upstream's 101 has no Sec-WebSocket-Accept")
                self.mode = SWITCHED
                self.read_deadline.cancel()
                return
            self.informational = True
            if self.conn_tokens:  # RFC 9110 §7.6.1 holds for every forwarded message
                self._drop_connection_named()
            ex.on_informational(status, self.reason, self.headers)  # type: ignore[union-attr]
            self.reason = b""
            self.headers = []
            self.head_bytes = 0  # each head has its own bound (this read's rest is not counted)
            self.has_date = False
            self.trailer_names = ()
            self.content_length = None
            self.te = self.conn_tokens = None
            return
        self.keep_alive = self.parser.should_keep_alive()
        if self.conn_tokens and self.conn_tokens != [b"keep-alive"]:
            self._drop_connection_named()
        if self.te is not None:
            if self.te != [b"chunked"]:
                raise UpstreamProtocolError("upstream used a Transfer-Encoding other than chunked")
            self.content_length = None
            if self.parser.get_http_version() == "1.0":
                # RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing;
                # relay it, then close the connection (nginx does; HAProxy closes both sides).
                self.keep_alive = False
        if ex.is_head or status == 204 or status == 304:  # type: ignore[union-attr]
            self.mode = NO_BODY
            self.done = True
            self.parser_stale = True  # httptools would wait for a HEAD's Content-Length bytes
        elif self.te is not None:
            self.mode = CHUNKED
            self.n_head = len(self.headers)  # fields after these are trailers
        elif self.content_length is not None:
            self.mode = LENGTH
        else:
            self.mode = UNTIL_CLOSE
            self.keep_alive = False
        ex.on_response_head(self)  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        if self.done:
            self.broken = True  # bytes beyond a complete response
            return
        self.exchange.on_response_body(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if not self.done:
            self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
            self.done = True
            if self.mode == CHUNKED and len(self.headers) > self.n_head:
                self.trailers = trailer_fields(self.headers[self.n_head :])

    def _keep_alive_hint(self, value: bytes) -> None:
        # `Keep-Alive: timeout=5, max=100`: retire the connection a little before the upstream
        # closes it, to stay out of the reuse race (a3 rule 4).
        for part in value.split(b","):
            key, _, num = part.strip().partition(b"=")
            if key.lower() == b"timeout" and num.strip().isdigit():
                timeout = int(num.strip())
                margin = 1.0 if timeout >= 4 else timeout / 4
                self.expires_at = self.loop.time() + timeout - margin

    def _drop_connection_named(self) -> None:
        named = set(self.conn_tokens or ()) - {b"close", b"keep-alive"}
        if named:
            self.headers = [h for h in self.headers if h.split(b":", 1)[0].lower() not in named]
            if b"date" in named:
                self.has_date = False  # then laneproxy's own Date (RFC 9110 §6.6.1)
            if b"trailer" in named:
                self.trailer_names = ()

    def __repr__(self) -> str:
        state = "idle" if self.exchange is None else "active"
        return f"<UpstreamProtocol {self.server.name} {state} uses={self.uses}>"
