"""DownstreamProtocol fed byte constants through a MockTransport (uvicorn tests/protocols style).

Routes with a lane use ProxyPair: the lane's pool already holds UpstreamProtocols on their own
MockTransports, so an exchange acquires one and every byte laneproxy writes upstream is visible.
Timeout tests run the same protocols on a FakeLoop so that time can be moved by hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from laneproxy.config import ClientConfig
from laneproxy.downstream import LINGER_SECONDS, Context, DownstreamProtocol
from laneproxy.flow import HIGH_WATER, LOW_WATER
from laneproxy.request import local_host
from laneproxy.router import Router
from tests.helpers import (
    OK_5,
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

# -- requests -------------------------------------------------------------------------------------

GET_NOWHERE = b"\r\n".join([b"GET /nowhere HTTP/1.1", b"Host: example.com", b"", b""])
GET_A = b"\r\n".join([b"GET /a HTTP/1.1", b"Host: example.com", b"", b""])
GET_B = b"\r\n".join([b"GET /b HTTP/1.1", b"Host: example.com", b"", b""])
GET_10 = b"\r\n".join([b"GET /nowhere HTTP/1.0", b"", b""])
GET_API = b"\r\n".join([b"GET /api/x?q=1 HTTP/1.1", b"Host: example.com", b"User-Agent: t/1", b"", b""])
GET_API_1 = b"GET /api/1 HTTP/1.1\r\nHost: a\r\n\r\n"
GET_API_2 = b"GET /api/2 HTTP/1.1\r\nHost: a\r\n\r\n"
HEAD_API = b"HEAD /api/x HTTP/1.1\r\nHost: a\r\n\r\n"

# -- responses ------------------------------------------------------------------------------------

OK_HELLO = b"\r\n".join([b"HTTP/1.1 200 OK", b"Server: up", b"Content-Length: 5", b"", b"hello"])
OK_1 = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1"
OK_2 = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2"
STATUS_404 = b"HTTP/1.1 404 Not Found\r\n"
STATUS_200 = b"HTTP/1.1 200 OK\r\n"


def is_half_or_fully_closed(t: MockTransport) -> bool:
    return t.eof_written or t.closed


# -- connection setup -----------------------------------------------------------------------------


async def test_connection_made_registers_and_sets_watermarks(pair: ProxyPair) -> None:
    assert pair.down in pair.ctx.connections
    assert pair.down_t.write_limits == (HIGH_WATER, LOW_WATER)
    assert pair.down.peer_ip == b"192.0.2.7"
    assert local_host(pair.down) == b"127.0.0.1:8080"
    assert not pair.down_t.closed and not pair.down_t.read_paused


async def test_connections_over_max_connections_are_closed_at_once() -> None:
    ctx = Context(asyncio.get_running_loop(), Router([]), ClientConfig(max_connections=1))
    first, first_t = DownstreamProtocol(ctx), MockTransport()
    second, second_t = DownstreamProtocol(ctx), MockTransport()
    first.connection_made(first_t)  # type: ignore[arg-type]
    second.connection_made(second_t)  # type: ignore[arg-type]
    assert not first_t.closed
    assert second_t.closed and second_t.buffer == b""
    assert ctx.rejected_connections == 1
    assert ctx.connections == {first}
    first.connection_lost(None)
    assert ctx.connections == set()


# -- laneproxy's own answers ----------------------------------------------------------------------


async def test_no_route_answers_404_and_keeps_the_connection(pair: ProxyPair) -> None:
    pair.send(GET_NOWHERE)
    out = pair.down_t.take()
    assert out.startswith(STATUS_404)
    assert b"Connection: close" not in out
    assert out.endswith(b"\r\n\r\n404 Not Found: no route for /nowhere\n")
    assert not pair.down_t.closed and not pair.down_t.eof_written
    assert not pair.down_t.read_paused
    # The connection serves the next request too.
    pair.send(GET_NOWHERE)
    assert pair.down_t.take().startswith(STATUS_404)
    assert pair.down.requests == 2
    assert pair.down.active is None


async def test_no_route_answer_to_head_has_no_body(pair: ProxyPair) -> None:
    pair.send(b"HEAD /nowhere HTTP/1.1\r\nHost: a\r\n\r\n")
    out = pair.down_t.take()
    assert out.startswith(STATUS_404)
    assert out.endswith(b"\r\n\r\n")
    assert b"Content-Length: " in out


BAD_REQUESTS = {
    "bare LF": (b"GET /api/x HTTP/1.1\nHost: a\n\n", 400),
    "bare CR": (b"GET /api/x HTTP/1.1\r\nHost: a\rX: y\r\n\r\n", 400),
    "CL and TE": (
        b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
    ),
    "TE chunked then x": (
        b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n", 400,
    ),
    "TE x then chunked": (
        b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501,
    ),
    "TE gzip, chunked": (b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    "TE in HTTP/1.0": (b"POST /api/x HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "CL 1, 1": (b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\nx", 400),
    "duplicate CL": (b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", 400),
    "two Host": (b"GET /api/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "no Host in 1.1": (b"GET /api/x HTTP/1.1\r\n\r\n", 400),
    "Host with a space": (b"GET /api/x HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    "Host port out of range": (b"GET /api/x HTTP/1.1\r\nHost: a:99999\r\n\r\n", 400),
    "NUL in a value": (b"GET /api/x HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    "obs-fold": (b"GET /api/x HTTP/1.1\r\nHost: a\r\nX: y\r\n z\r\n\r\n", 400),
    "space before colon": (b"GET /api/x HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    "HTTP/0.9": (b"GET /api/x\r\n\r\n", 400),
    "HTTP/2.0": (b"GET /api/x HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    "RTSP/1.0": (b"GET /api/x RTSP/1.0\r\nHost: a\r\n\r\n", 400),  # llhttp takes it, reports "1.0"
    "RTSP method": (b"DESCRIBE /api/x RTSP/1.0\r\nHost: a\r\n\r\n", 400),
    "ICE/1.0": (b"SOURCE /api/x ICE/1.0\r\nHost: a\r\n\r\n", 400),
    "HTTP/1.1 in the target": (b"GET /api/HTTP/1.1 RTSP/1.1\r\nHost: a\r\n\r\n", 400),
    "unknown method": (b"FOO /api/x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "CONNECT": (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
    "TRACE": (b"TRACE /api/x HTTP/1.1\r\nHost: a\r\n\r\n", 405),
    "dot segment": (b"GET /api/../admin HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "encoded dot segment": (b"GET /api/%2e%2e/admin HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "fragment": (b"GET /api/x#f HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "userinfo in absolute form": (b"GET http://u@a/api/x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "* for GET": (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "unknown expectation": (b"POST /api/x HTTP/1.1\r\nHost: a\r\nExpect: y\r\nContent-Length: 1\r\n\r\nx", 417),
    "Upgrade with a body": (
        b"POST /api/x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 1\r\n\r\nx",
        400,
    ),
}


@pytest.mark.parametrize(("request_bytes", "status"), list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
async def test_bad_request_is_answered_then_closed(
    make_pair: Callable[..., ProxyPair], request_bytes: bytes, status: int
) -> None:
    pair = make_pair()
    _, up_t = pair.pooled_upstream()
    pair.send(request_bytes)
    out = pair.down_t.take()
    assert out.startswith(b"HTTP/1.1 %d " % status), out
    assert b"\r\nConnection: close\r\n" in out
    assert is_half_or_fully_closed(pair.down_t)
    assert up_t.buffer == b""  # nothing of it reached the upstream
    assert pair.pool.idle == 1
    # Whatever the client sends next is not parsed any more.
    pair.send(GET_API_1)
    assert pair.down_t.buffer == b""
    assert up_t.buffer == b""


@pytest.mark.parametrize("cut", [3, 12, 16, 19])  # in the method, the target, "RTSP", before the CR
async def test_rtsp_request_line_split_across_reads_is_400(pair: ProxyPair, cut: int) -> None:
    _, up_t = pair.pooled_upstream()
    request = b"GET /api/x RTSP/1.1\r\nHost: a\r\n\r\n"
    pair.send(request[:cut])
    pair.send(request[cut:])
    assert pair.down_t.take().startswith(b"HTTP/1.1 400 ")
    assert up_t.buffer == b""


@pytest.mark.parametrize("cut", [1, 12, 15, 19, 20])
async def test_http_request_line_split_across_reads_is_forwarded(pair: ProxyPair, cut: int) -> None:
    _, up_t = pair.pooled_upstream()
    request = b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n"
    for i in range(0, len(request), cut):
        pair.send(request[i : i + cut])
    assert up_t.take().startswith(b"GET /x HTTP/1.1\r\n")
    assert pair.down_t.buffer == b""


async def test_a_head_spanning_reads_is_not_kept_once_complete(pair: ProxyPair) -> None:
    _, up_t = pair.pooled_upstream()
    pad = b"X-Pad: " + b"p" * 4000 + b"\r\n"
    request = b"GET /api/x HTTP/1.1\r\nHost: a\r\n" + pad * 8 + b"\r\n"
    for i in range(0, len(request), 1000):
        pair.send(request[i : i + 1000])
    assert up_t.take().startswith(b"GET /x HTTP/1.1\r\n")
    assert pair.down.head_parts == []  # (an idle keep-alive connection holds no 32 KiB of old head)


async def test_request_after_a_chunked_body_in_the_same_read_is_checked_on_its_own(pair: ProxyPair) -> None:
    # The chunked message ends inside the read (after its trailers): the next request line is
    # checked as one that starts a read would be, and so is its own chunked body (guard).
    up, up_t = pair.pooled_upstream()
    pair.send(
        b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"
        b"DESCRIBE /api/y RTSP/1.0\r\nHost: a\r\n\r\n"
    )
    assert up_t.take().endswith(b"5\r\nhello\r\n0\r\n\r\n")
    up.data_received(OK_HELLO)
    out = pair.down_t.take()
    assert parse_response_heads(out) == [b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request"], out
    assert up_t.buffer == b""


async def test_chunk_guard_of_a_pipelined_chunked_request_sees_its_whole_body(pair: ProxyPair) -> None:
    up, up_t = pair.pooled_upstream()
    long_ext = b";x=" + b"a" * 2000
    pair.send(
        b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"POST /api/y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5" + long_ext + b"\r\nhello\r\n0\r\n\r\n"
    )
    up.data_received(OK_HELLO)
    out = pair.down_t.take()
    assert parse_response_heads(out) == [b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request"], out
    assert b"chunk-size line too long" in out, out
    assert b"/y" not in up_t.take()


async def test_pipelined_requests_without_route_get_two_404s_in_order(pair: ProxyPair) -> None:
    pair.send(GET_A + GET_B)
    out = pair.down_t.take()
    assert parse_response_heads(out) == [b"HTTP/1.1 404 Not Found", b"HTTP/1.1 404 Not Found"]
    assert pair.down_t.writes == 1  # answers made in one loop iteration leave together (flow rule 4)
    assert out.index(b"no route for /a") < out.index(b"no route for /b")
    assert not pair.down_t.closed and not pair.down_t.eof_written
    assert not pair.down_t.read_paused


async def test_bytes_after_connection_close_answer_the_first_request_then_close(pair: ProxyPair) -> None:
    # http-rules a2 pitfall 4: httptools raises "Data after Connection: close" after the first
    # message completed; that must not turn into a 400 for the first request.
    pair.send(b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + GET_B)
    out = pair.down_t.take()
    assert parse_response_heads(out) == [b"HTTP/1.1 404 Not Found"]
    assert b"no route for /a" in out
    assert b"\r\nConnection: close\r\n" in out
    assert is_half_or_fully_closed(pair.down_t)


async def test_header_field_over_the_line_limit_is_431(pair: ProxyPair) -> None:
    pair.send(b"GET /api/x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
    out = pair.down_t.take()
    assert out.startswith(b"HTTP/1.1 431 ")
    assert is_half_or_fully_closed(pair.down_t)


async def test_header_section_over_the_limit_is_431(make_pair: Callable[..., ProxyPair]) -> None:
    pair = make_pair(client=ClientConfig(max_header_size=1024))
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 100) for i in range(12))  # ~1.3 KiB of fields
    pair.send(b"GET /api/x HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n")
    assert pair.down_t.take().startswith(b"HTTP/1.1 431 ")
    assert is_half_or_fully_closed(pair.down_t)


async def test_unterminated_header_section_is_cut_at_the_head_limit(pair: ProxyPair) -> None:
    # One endless value never reaches on_header: only the byte count of the head can stop it.
    pair.send(b"GET /api/x HTTP/1.1\r\nHost: a\r\nX: ")
    for _ in range(20):
        pair.send(b"a" * 4096)
        if pair.down_t.buffer:
            break
    assert pair.down_t.take().startswith(b"HTTP/1.1 431 ")
    assert is_half_or_fully_closed(pair.down_t)


async def test_too_many_header_fields_is_431(make_pair: Callable[..., ProxyPair]) -> None:
    pair = make_pair(client=ClientConfig(max_headers=5))
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(5))  # plus Host: 6 fields
    pair.send(b"GET /api/x HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n")
    assert pair.down_t.take().startswith(b"HTTP/1.1 431 ")


async def test_url_over_max_request_line_is_414(pair: ProxyPair) -> None:
    pair.send(b"GET /api/" + b"a" * (pair.ctx.max_request_line + 1) + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    out = pair.down_t.take()
    assert out.startswith(b"HTTP/1.1 414 ")
    assert is_half_or_fully_closed(pair.down_t)


async def test_http10_request_gets_connection_close(pair: ProxyPair) -> None:
    pair.send(GET_10)  # no Host: fine in HTTP/1.0
    out = pair.down_t.take()
    assert out.startswith(STATUS_404)
    assert b"\r\nConnection: close\r\n" in out
    assert is_half_or_fully_closed(pair.down_t)


# -- the request laneproxy writes upstream --------------------------------------------------------


async def test_request_head_is_laneproxys_own(pair: ProxyPair) -> None:
    _, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    assert up_t.take() == (
        b"GET /x?q=1 HTTP/1.1\r\n"
        b"Host: example.com\r\n"
        b"User-Agent: t/1\r\n"
        b"X-Real-IP: 192.0.2.7\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Forwarded-For: 192.0.2.7\r\n"
        b"X-Forwarded-Host: example.com\r\n"
        b"Via: 1.1 laneproxy\r\n"
        b"\r\n"
    )
    assert pair.down_t.buffer == b""
    assert pair.pool.idle == 0 and pair.pool.active == 1
    assert pair.lane.in_flight == 1


async def test_without_strip_prefix_the_path_is_forwarded_whole(make_pair: Callable[..., ProxyPair]) -> None:
    pair = make_pair(strip_prefix=False)
    _, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    assert up_t.take().startswith(b"GET /api/x?q=1 HTTP/1.1\r\n")


async def test_content_length_body_is_forwarded_with_its_own_framing(pair: ProxyPair) -> None:
    _, up_t = pair.pooled_upstream()
    pair.send(b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhel")
    pair.send(b"lo")
    assert up_t.take() == forwarded_head(b"POST /x HTTP/1.1", framing=b"Content-Length: 5\r\n\r\n") + b"hello"


async def test_chunked_body_is_rechunked_without_extensions_or_trailers(pair: ProxyPair) -> None:
    _, up_t = pair.pooled_upstream()
    pair.send(
        b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    assert up_t.take() == (
        forwarded_head(b"POST /x HTTP/1.1", framing=b"Transfer-Encoding: chunked\r\n\r\n") + b"5\r\nhello\r\n0\r\n\r\n"
    )


async def test_request_trailer_content_length_is_never_merged(pair: ProxyPair) -> None:
    _, up_t = pair.pooled_upstream()
    pair.send(
        b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nContent-Length: 50\r\n\r\n"
    )
    forwarded = up_t.take()
    assert b"Content-Length" not in forwarded
    if pair.down_t.buffer:  # rejected (httptools refuses CL in trailers): the half-sent request is dropped
        assert pair.down_t.take().startswith(b"HTTP/1.1 400 ")
        assert up_t.closed and pair.pool.idle == 0
    else:  # or dropped, and the request completed
        assert forwarded.endswith(b"5\r\nhello\r\n0\r\n\r\n")


async def test_comma_chunked_is_forwarded_canonical(pair: ProxyPair) -> None:
    _, up_t = pair.pooled_upstream()
    pair.send(b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,chunked \r\n\r\n0\r\n\r\n")
    assert up_t.take() == forwarded_head(b"POST /x HTTP/1.1", framing=b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")


async def test_post_without_body_gets_content_length_0(pair: ProxyPair) -> None:
    _, up_t = pair.pooled_upstream()
    pair.send(b"POST /api/x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert up_t.take() == forwarded_head(b"POST /x HTTP/1.1", framing=b"Content-Length: 0\r\n\r\n")


async def test_hop_by_hop_and_spoofed_fields_are_not_forwarded(pair: ProxyPair) -> None:
    _, up_t = pair.pooled_upstream()
    pair.send(
        b"GET /api/x HTTP/1.1\r\nHost: a\r\n"
        b"Connection: keep-alive, X-Forwarded-For, Foo\r\n"
        b"Foo: bar\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\n"
        b"X-Real-IP: 6.6.6.6\r\n"
        b"X-Forwarded-Host: evil\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Proxy-Authorization: secret\r\n"
        b"Content_Length: 5\r\n"
        b"Bar: baz \t\r\n"
        b"\r\n"
    )
    # Connection's tokens removed Foo; laneproxy's own X-Forwarded-For is still there (a3 rule 12).
    assert up_t.take() == forwarded_head(b"GET /x HTTP/1.1", fields=b"Bar: baz\r\n")


async def test_trusted_proxy_x_forwarded_for_is_extended(make_pair: Callable[..., ProxyPair]) -> None:
    pair = make_pair(client=ClientConfig(trusted_proxies=["192.0.2.0/24"]))
    _, up_t = pair.pooled_upstream()
    pair.send(b"GET /api/x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n")
    assert up_t.take() == forwarded_head(b"GET /x HTTP/1.1", xff=b"1.2.3.4, 192.0.2.7")


async def test_absolute_form_authority_replaces_host(pair: ProxyPair) -> None:
    _, up_t = pair.pooled_upstream()
    pair.send(b"GET http://other.example/api/x HTTP/1.1\r\nHost: a\r\n\r\n")
    # RFC 9112 §3.2.2: the target's authority wins over the Host field, for X-Forwarded-Host too.
    assert up_t.take() == forwarded_head(b"GET /x HTTP/1.1", host=b"other.example")


async def test_each_request_on_a_connection_gets_its_own_host_and_forwarded_fields(pair: ProxyPair) -> None:
    # The validated Host and its X-Forwarded-Host line are cached per connection: a change of Host,
    # an absolute-form target and an invalid Host must each still be handled on their own.
    up, up_t = pair.pooled_upstream()
    for request, host in [
        (b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n", b"a"),
        (b"GET /api/x HTTP/1.1\r\nHost: b.example:8080\r\n\r\n", b"b.example:8080"),
        (b"GET http://c.example/api/x HTTP/1.1\r\nHost: b.example:8080\r\n\r\n", b"c.example"),
        (b"GET /api/x HTTP/1.1\r\nHost: b.example:8080\r\n\r\n", b"b.example:8080"),
    ]:
        pair.send(request)
        assert up_t.take() == forwarded_head(b"GET /x HTTP/1.1", host=host)
        up.data_received(OK_5)
        assert pair.down_t.take().startswith(b"HTTP/1.1 200 OK\r\n")
    pair.send(b"GET /api/x HTTP/1.1\r\nHost: bad host\r\n\r\n")
    assert pair.down_t.take().startswith(b"HTTP/1.1 400 ")
    assert up_t.take() == b""


async def test_h2c_upgrade_is_not_forwarded(pair: ProxyPair) -> None:
    _, up_t = pair.pooled_upstream()
    pair.send(
        b"GET /api/x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
    )
    assert up_t.take() == forwarded_head(b"GET /x HTTP/1.1")


async def test_expect_100_continue_is_answered_by_laneproxy(pair: ProxyPair) -> None:
    _, up_t = pair.pooled_upstream()
    pair.send(b"POST /api/x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert pair.down_t.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert up_t.take() == forwarded_head(b"POST /x HTTP/1.1", framing=b"Content-Length: 2\r\n\r\n")
    pair.send(b"hi")
    assert up_t.take() == b"hi"


async def test_body_over_max_body_is_413_before_anything_is_sent(make_pair: Callable[..., ProxyPair]) -> None:
    pair = make_pair(lane_cfg=lane_config(max_body=4))
    _, up_t = pair.pooled_upstream()
    pair.send(b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    assert pair.down_t.take().startswith(b"HTTP/1.1 413 ")
    assert up_t.buffer == b""
    assert is_half_or_fully_closed(pair.down_t)


async def test_chunked_body_over_max_body_closes_the_upstream(make_pair: Callable[..., ProxyPair]) -> None:
    pair = make_pair(lane_cfg=lane_config(max_body=4))
    _, up_t = pair.pooled_upstream()
    pair.send(b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    assert up_t.take().endswith(b"3\r\nabc\r\n")
    pair.send(b"3\r\ndef\r\n0\r\n\r\n")
    assert pair.down_t.take().startswith(b"HTTP/1.1 413 ")
    assert up_t.closed  # half a request went out: that connection can never be reused
    assert pair.pool.idle == 0 and pair.pool.active == 0


# -- the response relayed back --------------------------------------------------------------------


async def test_response_is_relayed_and_the_connection_pooled(pair: ProxyPair) -> None:
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(OK_HELLO)
    assert pair.down_t.take() == dated(b"HTTP/1.1 200 OK\r\nServer: up\r\nContent-Length: 5\r\n\r\nhello")
    assert pair.pool.idle == 1 and pair.pool.active == 0
    assert up.is_idle and not up_t.closed
    assert pair.lane.in_flight == 0 and pair.lane.served == 1
    assert pair.down.active is None
    assert not pair.down_t.closed and not pair.down_t.eof_written


async def test_response_in_pieces_is_relayed_as_it_comes(pair: ProxyPair) -> None:
    up, _ = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
    assert pair.down_t.take() == dated(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
    up.data_received(b"llo")
    assert pair.down_t.take() == b"llo"
    assert pair.pool.idle == 1


async def test_until_close_body_is_rechunked_for_http11(pair: ProxyPair) -> None:
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(b"HTTP/1.1 200 OK\r\nServer: up\r\n\r\nabc")
    relayed = b"HTTP/1.1 200 OK\r\nServer: up\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    assert pair.down_t.take() == dated(relayed)
    up.data_received(b"defg")
    assert pair.down_t.take() == b"4\r\ndefg\r\n"
    up.connection_lost(None)  # the upstream's EOF ends the body
    assert pair.down_t.take() == b"0\r\n\r\n"
    assert pair.pool.idle == 0 and pair.pool.active == 0
    # The client connection is fine: the body was framed for it.
    assert not pair.down_t.closed and not pair.down_t.eof_written
    assert pair.down.active is None


async def test_until_close_body_is_close_delimited_for_http10(pair: ProxyPair) -> None:
    up, up_t = pair.pooled_upstream()
    pair.send(b"GET /api/x HTTP/1.0\r\nHost: a\r\n\r\n")
    # laneproxy speaks 1.1 upstream; Via names the version received (RFC 9110 §7.6.3)
    assert up_t.take() == forwarded_head(b"GET /x HTTP/1.1", via=b"1.0 laneproxy")
    up.data_received(b"HTTP/1.1 200 OK\r\n\r\nabc")
    up.connection_lost(None)
    assert pair.down_t.take() == dated(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc")
    assert is_half_or_fully_closed(pair.down_t)


async def test_chunked_response_is_rechunked(pair: ProxyPair) -> None:
    up, _ = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    assert pair.down_t.take() == dated(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert pair.pool.idle == 1


CHUNKED_WITH_TRAILERS = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    b"0\r\nX-Checksum: abc \r\nAuthorization: x\r\nSet-Cookie: s=1\r\ngrpc-status: 0\r\n\r\n"
)


async def test_response_trailers_pass_to_a_client_that_sent_te_trailers(pair: ProxyPair) -> None:
    # F11: passed only on `TE: trailers`, and never a field that frames, routes or authenticates.
    up, up_t = pair.pooled_upstream()
    pair.send(b"GET /api/x HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nConnection: TE\r\n\r\n")
    assert up_t.take() == forwarded_head(b"GET /x HTTP/1.1")  # TE itself is hop-by-hop
    up.data_received(CHUNKED_WITH_TRAILERS)
    assert pair.down_t.take() == dated(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        b"0\r\nX-Checksum: abc\r\ngrpc-status: 0\r\n\r\n"
    )
    assert pair.pool.idle == 1
    # The next request on the connection did not ask: its response ends without trailers.
    pair.send(GET_API)
    up.data_received(CHUNKED_WITH_TRAILERS)
    assert pair.down_t.take().endswith(b"5\r\nhello\r\n0\r\n\r\n")


async def test_oversized_response_trailers_abort_the_client(pair: ProxyPair) -> None:
    up, _ = pair.pooled_upstream()
    pair.send(b"GET /api/x HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n")
    many = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))
    up.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    assert pair.down_t.take().endswith(b"5\r\nhello\r\n")  # the head has left: no clean 502 now
    up.data_received(b"0\r\n" + many + b"\r\n")  # 20 KiB of trailers, over MAX_TRAILERS
    out = pair.down_t.take()
    assert b"0\r\n" not in out and b"X-T0" not in out  # no last chunk: the client sees a cut body
    assert pair.down_t.aborted and pair.pool.idle == 0


async def test_endless_response_trailers_are_bounded_as_they_come(pair: ProxyPair) -> None:
    # httptools has no limit on trailer fields: an upstream that never ends them is cut off.
    up, _ = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n")
    pair.down_t.take()
    some = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 1000) for i in range(10))
    up.data_received(some)
    assert not pair.down_t.aborted  # 10 KiB: still within MAX_TRAILERS
    up.data_received(some)
    assert pair.down_t.aborted and pair.pool.idle == 0


async def test_head_response_keeps_content_length_has_no_body_and_is_reusable(pair: ProxyPair) -> None:
    up, up_t = pair.pooled_upstream()
    pair.send(HEAD_API)
    assert up_t.take() == forwarded_head(b"HEAD /x HTTP/1.1")
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert pair.down_t.take() == dated(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert pair.pool.idle == 1
    assert not up_t.closed
    # The same pooled connection answers the next request correctly (http-rules a2 pitfall 1:
    # httptools would otherwise take 5 bytes of the next response as the HEAD's body).
    pair.send(b"GET /api/y HTTP/1.1\r\nHost: a\r\n\r\n")
    assert up_t.take() == forwarded_head(b"GET /y HTTP/1.1")
    up.data_received(OK_HELLO)
    assert pair.down_t.take() == dated(b"HTTP/1.1 200 OK\r\nServer: up\r\nContent-Length: 5\r\n\r\nhello")
    assert pair.pool.idle == 1
    assert up.uses == 2


async def test_keepalive_requests_retires_the_upstream_connection(make_pair: Callable[..., ProxyPair]) -> None:
    pair = make_pair(lane_cfg=lane_config(keepalive_requests=1))
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(OK_HELLO)
    assert pair.down_t.take().endswith(b"hello")
    assert up_t.closed
    assert pair.pool.idle == 0


async def test_pipelined_requests_go_upstream_one_at_a_time(pair: ProxyPair) -> None:
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API_1 + GET_API_2)
    assert up_t.take() == forwarded_head(b"GET /1 HTTP/1.1")  # the second waits its turn
    assert pair.down_t.read_paused  # and reading stops while it waits
    up.data_received(OK_1)
    assert pair.down_t.take() == dated(OK_1)
    assert up_t.take() == forwarded_head(b"GET /2 HTTP/1.1")  # on the same pooled connection
    up.data_received(OK_2)
    assert pair.down_t.take() == dated(OK_2)
    assert not pair.down_t.read_paused
    assert pair.pool.idle == 1 and up.uses == 2


async def test_pipelined_bad_request_is_answered_in_turn(pair: ProxyPair) -> None:
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API_1 + b"GET /api/2 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert up_t.take() == forwarded_head(b"GET /1 HTTP/1.1")
    assert pair.down_t.buffer == b""  # the 400 waits for the first response
    up.data_received(OK_1)
    out = pair.down_t.take()
    assert parse_response_heads(out) == [b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request"]
    assert out.startswith(dated(OK_1))
    assert is_half_or_fully_closed(pair.down_t)
    assert up_t.buffer == b""
    assert pair.pool.idle == 1


async def test_every_pipelined_request_is_routed_on_its_own(pair: ProxyPair) -> None:
    # a3 rule 3 (connection-state attacks): the second request has no route, the first has one.
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API_1 + GET_NOWHERE)
    up.data_received(OK_1)
    out = pair.down_t.take()
    assert parse_response_heads(out) == [b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found"]
    assert up_t.take() == forwarded_head(b"GET /1 HTTP/1.1")


# -- backpressure across the proxy ----------------------------------------------------------------


async def test_downstream_write_pause_pauses_upstream_reading(pair: ProxyPair) -> None:
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    assert not up_t.read_paused
    pair.down.pause_writing()
    assert up_t.read_paused
    pair.down.resume_writing()
    assert not up_t.read_paused
    assert (up_t.pause_calls, up_t.resume_calls) == (1, 1)


async def test_downstream_already_paused_pauses_the_upstream_at_attach(pair: ProxyPair) -> None:
    _, up_t = pair.pooled_upstream()
    pair.down.pause_writing()
    pair.send(GET_API)
    assert up_t.buffer  # the request went out
    assert up_t.read_paused  # but the response is not read while the client is slow
    pair.down.resume_writing()
    assert not up_t.read_paused


async def test_upstream_write_pause_pauses_downstream_reading(pair: ProxyPair) -> None:
    up, _ = pair.pooled_upstream()
    pair.send(b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhel")
    assert not pair.down_t.read_paused
    up.pause_writing()
    assert pair.down_t.read_paused
    up.resume_writing()
    assert not pair.down_t.read_paused


async def test_release_reopens_reading_of_the_pooled_connection(pair: ProxyPair) -> None:
    # An idle pooled connection must keep reading, or it never sees the upstream's EOF.
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    pair.down.pause_writing()
    assert up_t.read_paused
    up.data_received(OK_HELLO)
    assert pair.pool.idle == 1
    assert not up_t.read_paused


async def test_upstream_early_answer_while_write_paused_lets_the_client_body_drain(pair: ProxyPair) -> None:
    # The upstream stops reading (its socket buffer is full: pause_writing) and answers before the
    # request body is complete. The rest of the body must be read and dropped (exchange Rule 4),
    # so the downstream must read again although the upstream never said resume_writing.
    up, up_t = pair.pooled_upstream()
    up2, up2_t = pair.pooled_upstream()
    pair.send(b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhel")
    assert pair.down.active.up is up2  # type: ignore[union-attr]  # LIFO
    up2.pause_writing()
    assert pair.down_t.read_paused
    up2.data_received(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
    assert pair.down_t.take() == dated(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
    assert up2_t.closed
    assert not pair.down_t.read_paused, f"client reading stays paused: gate={pair.down.gate.reasons}"


async def test_upstream_failure_while_write_paused_leaves_the_client_connection_usable(pair: ProxyPair) -> None:
    up, up_t = pair.pooled_upstream()
    up2, _ = pair.pooled_upstream()
    pair.send(b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
    up2.pause_writing()
    up2.connection_lost(ConnectionResetError())
    out = pair.down_t.take()
    assert out.startswith(b"HTTP/1.1 502 ")
    assert b"Connection: close" not in out  # the request was complete: keep-alive
    assert not pair.down_t.read_paused, f"client reading stays paused: gate={pair.down.gate.reasons}"
    pair.send(GET_API_1)
    assert up_t.take() == forwarded_head(b"GET /1 HTTP/1.1")


# -- the client half-closes, leaves, or the proxy drains ------------------------------------------


async def test_fin_after_a_complete_request_delivers_the_response_then_closes(pair: ProxyPair) -> None:
    up, _ = pair.pooled_upstream()
    pair.send(GET_API)
    assert pair.down.eof_received() is True  # keep the transport open for the answer
    assert not pair.down_t.closed
    up.data_received(OK_HELLO)
    out = pair.down_t.take()
    assert out.startswith(STATUS_200) and out.endswith(b"hello")
    assert b"\r\nConnection: close\r\n" in out
    assert is_half_or_fully_closed(pair.down_t)
    assert pair.pool.idle == 1  # the upstream side was clean


async def test_fin_in_the_middle_of_a_request_is_an_abort(pair: ProxyPair) -> None:
    pair.send(b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhel")
    assert not pair.down.eof_received()  # falsy: the transport closes itself


async def test_fin_after_pipelined_requests_answers_every_complete_request(pair: ProxyPair) -> None:
    # `printf 'GET ...GET ...' | nc`: both requests are complete before the FIN; a FIN after a
    # complete request is not an abort (http-rules a3 rule 8), and pipelined requests are
    # answered in order (RFC 9112 §9.3.2).
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API_1 + GET_API_2)
    assert pair.down.eof_received() is True
    up.data_received(OK_1)
    assert up_t.take().endswith(forwarded_head(b"GET /2 HTTP/1.1")), "the second request was never forwarded"
    up.data_received(OK_2)
    out = pair.down_t.take()
    assert parse_response_heads(out) == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK"]
    assert is_half_or_fully_closed(pair.down_t)


async def test_client_gone_closes_the_upstream_at_once(pair: ProxyPair) -> None:
    up, up_t = pair.pooled_upstream()
    pair.send(GET_API)
    pair.down.connection_lost(ConnectionResetError())
    assert up_t.closed
    assert pair.pool.idle == 0 and pair.pool.active == 0
    assert pair.lane.in_flight == 0
    assert pair.down not in pair.ctx.connections


async def test_draining_proxy_answers_with_connection_close(pair: ProxyPair) -> None:
    up, _ = pair.pooled_upstream()
    pair.send(GET_API)
    pair.ctx.closing = True
    up.data_received(OK_HELLO)
    out = pair.down_t.take()
    assert out.startswith(STATUS_200)
    assert b"\r\nConnection: close\r\n" in out
    assert is_half_or_fully_closed(pair.down_t)


async def test_repr_shows_state(pair: ProxyPair) -> None:
    pair.pooled_upstream()
    pair.send(GET_API)
    assert repr(pair.down) == (
        "<DownstreamProtocol 192.0.2.7 requests=1 active=<Exchange GET lane=app resp=0 req_done=True> queued=0>"
    )


# -- deadlines, on a clock moved by hand ----------------------------------------------------------


def fake_pair(**kwargs: object) -> tuple[FakeLoop, ProxyPair]:
    loop = FakeLoop(start=1000.0)
    return loop, ProxyPair(loop, **kwargs)  # type: ignore[arg-type]


def test_silent_connection_is_closed_after_header_timeout() -> None:
    loop, pair = fake_pair(client=ClientConfig(header_timeout=10))
    loop.advance(9.9)
    loop.run_due()
    assert not pair.down_t.closed
    loop.advance(0.1)
    loop.run_due()
    assert pair.down_t.closed
    assert pair.down_t.buffer == b""  # nothing was asked: nothing is answered


def test_slow_request_head_gets_408_then_the_lingering_close_ends() -> None:
    loop, pair = fake_pair(client=ClientConfig(header_timeout=10))
    pair.send(b"GET /api/x HTTP/1.1\r\nHo")
    loop.advance(5)
    pair.send(b"st: a\r\nX: 1\r\n")  # trickling does not extend a whole-phase deadline
    loop.advance(5)
    loop.run_due()
    out = pair.down_t.take()
    assert out.startswith(b"HTTP/1.1 408 ")
    assert pair.down_t.eof_written and not pair.down_t.closed
    loop.advance(LINGER_SECONDS)
    loop.run_due()
    assert pair.down_t.closed


def test_idle_keepalive_connection_is_closed_after_keepalive_timeout() -> None:
    loop, pair = fake_pair(client=ClientConfig(keepalive_timeout=30))
    pair.send(GET_NOWHERE)
    assert pair.down_t.take().startswith(STATUS_404)
    loop.advance(29)
    loop.run_due()
    assert not pair.down_t.closed
    loop.advance(1)
    loop.run_due()
    assert pair.down_t.closed


def test_a_new_request_pushes_the_keepalive_deadline() -> None:
    loop, pair = fake_pair(client=ClientConfig(keepalive_timeout=30))
    pair.send(GET_NOWHERE)
    loop.advance(20)
    pair.send(GET_NOWHERE)
    loop.advance(20)
    loop.run_due()
    assert not pair.down_t.closed
    loop.advance(10)
    loop.run_due()
    assert pair.down_t.closed


def test_client_that_stops_reading_is_aborted_after_send_timeout() -> None:
    loop, pair = fake_pair(client=ClientConfig(send_timeout=20))
    up, _ = pair.pooled_upstream()
    pair.send(GET_API)
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    pair.down.pause_writing()
    loop.advance(19)
    loop.run_due()
    assert not pair.down_t.closed
    loop.advance(1)
    loop.run_due()
    assert pair.down_t.aborted


def test_lingering_close_does_not_cut_a_response_still_being_sent() -> None:
    # After a Connection: close response, close(lingering=True) half-closes and arms a 5 s abort.
    # If the client is still reading the tail of the response (write side paused, within
    # send_timeout), that abort() throws the unsent bytes away.
    loop, pair = fake_pair()
    up, _ = pair.pooled_upstream()
    pair.send(b"GET /api/x HTTP/1.0\r\nHost: a\r\n\r\n")
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab")
    pair.down.pause_writing()  # the transport's buffer is over HIGH_WATER
    up.data_received(b"c")  # the response completes into that buffer
    # Nothing unread from the client: a plain close, which flushes the write buffer first.
    assert pair.down_t.closed and not pair.down_t.aborted
    loop.advance(LINGER_SECONDS)
    loop.run_due()
    assert not pair.down_t.aborted, "lingering abort() discarded a response still in the write buffer"
