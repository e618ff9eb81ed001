"""UpstreamProtocol fed response bytes through a MockTransport.

Alone (idle in its pool: stray bytes and EOF), and lent to an exchange behind a DownstreamProtocol
(ProxyPair) so that what it parses can be checked on the client's side of the wire.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from laneproxy.flow import HIGH_WATER, LOW_WATER
from laneproxy.lane import Lane, Server
from laneproxy.upstream import UpstreamProtocol
from tests.helpers import (
    FakeLoop,
    MockTransport,
    ProxyPair,
    dated,
    forwarded_head,
    lane_config,
    parse_response_heads,
)

# Responses without Date get laneproxy's: with its clock stopped they compare byte for byte.
pytestmark = pytest.mark.usefixtures("fixed_date")

GET_API = b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n"
GET_API_Y = b"GET /api/y HTTP/1.1\r\nHost: a\r\n\r\n"
OK_HELLO = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
OK_WORLD = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nworld"


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    lane = Lane("app", lane_config(), asyncio.get_running_loop())
    yield lane.servers[0]
    lane.close()


def pooled(server: Server) -> tuple[UpstreamProtocol, MockTransport]:
    """A connection parked idle in `server`'s pool, as Exchange._connect parks a spare one."""
    t = MockTransport(peername=("127.0.0.1", 9))
    conn = UpstreamProtocol(server, asyncio.get_running_loop())
    conn.connection_made(t)  # type: ignore[arg-type]
    server.pool.add_active()
    conn.is_idle = True
    server.pool.release(conn, True)
    return conn, t


# -- alone, idle in the pool ----------------------------------------------------------------------


async def test_connection_made_sets_watermarks(server: Server) -> None:
    conn, t = pooled(server)
    assert t.write_limits == (HIGH_WATER, LOW_WATER)
    assert not t.read_paused  # an idle connection reads, to notice EOF and stray bytes
    assert repr(conn) == "<UpstreamProtocol 127.0.0.1:9 idle uses=0>"


async def test_idle_connection_receiving_stray_bytes_closes_and_leaves_the_pool(server: Server) -> None:
    conn, t = pooled(server)
    other, other_t = pooled(server)
    assert server.pool.idle == 2
    conn.data_received(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
    assert t.closed and conn.is_closed
    assert server.pool.idle == 1
    assert server.pool.acquire() is other  # never the poisoned one
    assert server.pool.acquire() is None
    assert not other_t.closed


async def test_idle_connection_eof_leaves_the_pool(server: Server) -> None:
    conn, _ = pooled(server)
    assert server.pool.idle == 1
    assert conn.eof_received() is None  # falsy: let the transport close
    conn.connection_lost(None)
    assert conn.is_closed
    assert server.pool.idle == 0
    assert server.pool.acquire() is None


async def test_idle_connection_reset_leaves_the_pool(server: Server) -> None:
    conn, _ = pooled(server)
    conn.connection_lost(ConnectionResetError())
    assert server.pool.idle == 0


async def test_connection_idle_after_an_exchange_discards_itself_on_stray_bytes(pair: ProxyPair) -> None:
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(OK_HELLO)
    assert pair.pool.idle == 1 and up.is_idle
    assert repr(up) == "<UpstreamProtocol 127.0.0.1:9 idle uses=1>"
    up.data_received(b"x")
    assert up_t.closed
    assert pair.pool.idle == 0


async def test_connection_idle_after_an_exchange_discards_itself_on_eof(pair: ProxyPair) -> None:
    up, _ = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(OK_HELLO)
    assert pair.pool.idle == 1
    up.connection_lost(None)
    assert pair.pool.idle == 0
    assert pair.down_t.take().endswith(b"hello")  # the client saw nothing of it
    assert not pair.down_t.closed


# -- lent to an exchange --------------------------------------------------------------------------


async def test_lent_connection_counts_its_uses(pair: ProxyPair) -> None:
    up, _ = pair.pooled_upstream()
    pair.send(GET_API)
    assert up.uses == 1 and up.exchange is pair.down.active
    assert not up.is_idle
    assert repr(up) == "<UpstreamProtocol 127.0.0.1:9 active uses=1>"


async def test_upstream_connection_close_is_relayed_without_closing_the_client(pair: ProxyPair) -> None:
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello")
    assert pair.down_t.take() == dated(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert up_t.closed and pair.pool.idle == 0
    assert not pair.down_t.closed and not pair.down_t.eof_written


async def test_http10_upstream_response_is_not_reused(pair: ProxyPair) -> None:
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert pair.down_t.take() == dated(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert up_t.closed and pair.pool.idle == 0


async def test_hop_by_hop_response_fields_are_dropped(pair: ProxyPair) -> None:
    up, _ = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: keep-alive, X-Internal\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Upgrade: h2c\r\n"
        b"X-Internal: secret\r\n"
        b"Set-Cookie: a=1\r\n"
        b"Content-Length: 2\r\n"
        b"\r\nok"
    )
    assert pair.down_t.take() == dated(b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nContent-Length: 2\r\n\r\nok")
    assert pair.pool.idle == 1


async def test_custom_reason_phrase_is_kept(pair: ProxyPair) -> None:
    up, _ = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(b"HTTP/1.1 200 Fine\r\nContent-Length: 0\r\n\r\n")
    assert pair.down_t.take() == dated(b"HTTP/1.1 200 Fine\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize(
    ("status", "relayed"),
    [
        (204, b"HTTP/1.1 204 No Content\r\nETag: e\r\n\r\n"),  # a 204 never carries Content-Length
        (304, b"HTTP/1.1 304 Not Modified\r\nETag: e\r\nContent-Length: 7\r\n\r\n"),  # a 304 keeps it
    ],
)
async def test_bodiless_statuses_end_at_the_head_and_the_connection_is_reused(
    pair: ProxyPair, status: int, relayed: bytes
) -> None:
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    reason = b"No Content" if status == 204 else b"Not Modified"
    up.data_received(b"HTTP/1.1 %d %s\r\nContent-Length: 7\r\nETag: e\r\n\r\n" % (status, reason))
    assert pair.down_t.take() == dated(relayed)
    assert pair.pool.idle == 1
    pair.send(GET_API_Y)
    assert up_t.take().endswith(forwarded_head(b"GET /y HTTP/1.1"))
    up.data_received(OK_WORLD)  # not eaten as the 7 bytes the head announced
    assert pair.down_t.take() == dated(OK_WORLD)
    assert pair.pool.idle == 1


async def test_head_response_does_not_eat_the_next_response(pair: ProxyPair) -> None:
    up, up_t = pair.pooled_upstream()
    pair.send(b"HEAD /api/x HTTP/1.1\r\nHost: a\r\n\r\n")
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert pair.down_t.take() == dated(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    pair.send(GET_API_Y)
    up.data_received(OK_WORLD)
    assert pair.down_t.take() == dated(OK_WORLD)
    assert pair.pool.idle == 1 and not up_t.closed


async def test_unknown_response_transfer_coding_is_502(pair: ProxyPair) -> None:
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc")
    out = pair.down_t.take()
    assert out.startswith(b"HTTP/1.1 502 ")
    assert up_t.closed and pair.pool.idle == 0


async def test_unasked_101_is_502(pair: ProxyPair) -> None:
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00")
    assert pair.down_t.take().startswith(b"HTTP/1.1 502 ")
    assert up_t.closed and pair.pool.idle == 0


async def wait_written(t: MockTransport, timeout: float = 2.0) -> bytes:
    """What `t` received once something arrived (a retry's connect attempt needs loop turns)."""
    for _ in range(int(timeout / 0.005)):
        if t.buffer:
            break
        await asyncio.sleep(0.005)
    return t.take()


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
    ],
    ids=["bad status", "two Content-Length", "bare LF", "field without colon"],
)
async def test_invalid_response_is_502_and_the_connection_closed(pair: ProxyPair, response: bytes) -> None:
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(response)
    out = await wait_written(pair.down_t)
    assert out.startswith(b"HTTP/1.1 502 ")
    assert up_t.closed and pair.pool.idle == 0


@pytest.mark.parametrize(
    "response",
    [b"HTTP/1.1 2000 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc"],
    ids=["bad status", "two Content-Length"],
)
async def test_invalid_response_bytes_are_not_the_keepalive_race(pair: ProxyPair, response: bytes) -> None:
    # http-rules a3 rule 4: only a reused connection that fails "before any response byte" is the
    # keep-alive race, retried on a fresh connection whatever `retry_on` says. Here the upstream
    # did answer (with garbage): nginx's default proxy_next_upstream (error timeout) answers 502.
    # The lane's only server is 127.0.0.1:9 (refused), so a retry shows as a connect failure.
    up, _ = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(response)
    out = await wait_written(pair.down_t)
    assert out.startswith(b"HTTP/1.1 502 ")
    assert b"invalid response from upstream" in out, out


async def test_103_is_forwarded_and_100_is_not(pair: ProxyPair) -> None:
    up, _ = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    )
    out = pair.down_t.take()
    assert out == (
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        + dated(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    )
    assert pair.pool.idle == 1


async def test_1xx_is_not_forwarded_to_an_http10_client(pair: ProxyPair) -> None:
    up, _ = pair.pooled_upstream()
    pair.send(b"GET /api/x HTTP/1.0\r\nHost: a\r\n\r\n")
    up.data_received(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert parse_response_heads(pair.down_t.take()) == [b"HTTP/1.1 200 OK"]


async def test_second_response_in_the_same_read_poisons_the_connection(pair: ProxyPair) -> None:
    # Pool poisoning (a3 rule 5): a response nobody asked for must never reach the next client.
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(OK_HELLO + OK_WORLD)
    assert pair.down_t.take() == dated(OK_HELLO)
    assert up_t.closed and pair.pool.idle == 0


async def test_bytes_after_the_response_in_a_later_read_close_the_idle_connection(pair: ProxyPair) -> None:
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(OK_HELLO)
    up.data_received(b"junk")
    assert pair.down_t.take() == dated(OK_HELLO)
    assert up_t.closed and pair.pool.idle == 0


async def test_bytes_after_the_response_in_the_same_read_close_the_connection_not_the_response(
    pair: ProxyPair,
) -> None:
    # The same bytes as above, in one read instead of two: the complete response should still
    # reach the client ("bytes after a complete response make the connection unusable",
    # upstream.py docstring), not turn into a 502.
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(OK_HELLO + b"junk")
    assert pair.down_t.take() == dated(OK_HELLO)
    assert up_t.closed and pair.pool.idle == 0


async def test_early_response_closes_the_connection_and_drops_the_rest_of_the_body(pair: ProxyPair) -> None:
    # a3 rule 6: the upstream answered before the request body was complete; it will not read the
    # rest, so that connection must not be reused; the client's connection stays usable.
    other, other_t = pair.pooled_upstream()
    up, up_t = pair.pooled_upstream()
    pair.send(b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhel")
    assert pair.down.active.up is up  # type: ignore[union-attr]
    assert up_t.take().endswith(b"hel")
    up.data_received(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
    assert pair.down_t.take() == dated(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
    assert up_t.closed
    pair.send(b"lo12345")  # the rest of the body: read and dropped
    assert up_t.take() == b""
    assert pair.down.active is None
    pair.send(GET_API_Y)
    assert other_t.take() == forwarded_head(b"GET /y HTTP/1.1")
    other.data_received(OK_WORLD)
    assert pair.down_t.take() == dated(OK_WORLD)


async def test_eof_before_the_response_to_a_post_is_502_without_retry(pair: ProxyPair) -> None:
    spare, spare_t = pair.pooled_upstream()
    up, up_t = pair.pooled_upstream()
    pair.send(b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx")
    up.connection_lost(None)
    out = pair.down_t.take()
    assert out.startswith(b"HTTP/1.1 502 ")
    assert spare_t.buffer == b""  # a non-idempotent request is never replayed (a3 rule 4)
    assert not pair.down_t.closed  # the request was complete: the client connection stays
    assert pair.pool.idle == 1


async def test_eof_in_the_middle_of_a_body_aborts_the_client(pair: ProxyPair) -> None:
    up, _ = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    assert pair.down_t.take() == dated(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    up.connection_lost(None)
    assert pair.down_t.aborted  # no fake completion of a truncated body
    assert pair.pool.idle == 0


async def test_eof_in_the_middle_of_a_rechunked_body_sends_no_last_chunk(pair: ProxyPair) -> None:
    up, _ = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    up.connection_lost(None)
    out = pair.down_t.take()
    assert out == dated(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    assert not out.endswith(b"0\r\n\r\n")
    assert pair.down_t.aborted


async def test_reused_connection_closed_before_any_byte_retries_a_get_on_a_fresh_connection(
    pair: ProxyPair,
) -> None:
    # The keep-alive race (a3 rule 4). The fresh connection goes to 127.0.0.1:9, where nothing
    # listens, so the retry shows up as a connect failure instead of the reused connection's EOF.
    up, _ = pair.pooled_upstream()
    pair.send(GET_API)
    up.connection_lost(None)
    out = await wait_written(pair.down_t)
    assert out.startswith(b"HTTP/1.1 502 ")
    assert b"connect to 127.0.0.1:9" in out, out


async def test_request_error_mid_body_closes_the_upstream(pair: ProxyPair) -> None:
    up, up_t = pair.pooled_upstream()
    pair.send(b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello!!\r\n0\r\n\r\n")
    assert pair.down_t.take().startswith(b"HTTP/1.1 400 ")
    assert up_t.closed  # half a request went out on it
    assert pair.pool.idle == 0 and pair.pool.active == 0


# -- read timeout, on a clock moved by hand -------------------------------------------------------


def fake_pair() -> tuple[FakeLoop, ProxyPair]:
    loop = FakeLoop(start=1000.0)
    return loop, ProxyPair(loop, lane_cfg=lane_config(read_timeout=30))  # type: ignore[arg-type]


def test_silent_upstream_is_504_after_read_timeout() -> None:
    loop, pair = fake_pair()
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    loop.advance(29)
    loop.run_due()
    assert pair.down_t.buffer == b""
    loop.advance(1)
    loop.run_due()
    assert pair.down_t.take().startswith(b"HTTP/1.1 504 ")
    assert up_t.closed and pair.pool.idle == 0
    assert not pair.down_t.closed  # the client may send its next request


def test_read_timeout_is_between_reads_not_for_the_whole_response() -> None:
    loop, pair = fake_pair()
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\na")
    for piece in (b"b", b"c"):
        loop.advance(20)
        loop.run_due()
        up.data_received(piece)
    assert not pair.down_t.aborted
    loop.advance(30)
    loop.run_due()
    assert pair.down_t.aborted  # head and part of the body are out: the client is cut off
    assert up_t.closed


def test_read_timeout_does_not_count_while_the_client_is_slow() -> None:
    loop, pair = fake_pair()
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    pair.down.pause_writing()  # we stopped reading the upstream ourselves
    assert up_t.read_paused
    loop.advance(45)  # inside the client's send_timeout (60 s), past the upstream's read_timeout
    loop.run_due()
    assert not up_t.closed and not pair.down_t.closed
    pair.down.resume_writing()
    up.data_received(b"cd")
    assert pair.down_t.take().endswith(b"abcd")
    assert pair.pool.idle == 1


def test_keep_alive_timeout_hint_retires_the_pooled_connection_before_the_upstream_does() -> None:
    # http-rules a3 rule 4: honour `Keep-Alive: timeout=N` to stay out of the reuse race.
    loop, pair = fake_pair()
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=2, max=100\r\nContent-Length: 0\r\n\r\n")
    assert pair.down_t.take() == dated(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert pair.pool.idle == 1
    loop.advance(1.0)
    assert pair.pool.acquire() is up  # still inside the upstream's timeout
    pair.pool.release(up, True)
    loop.advance(1.0)  # the upstream closes it now: laneproxy must not hand it out any more
    assert pair.pool.acquire() is None
    assert up_t.closed
