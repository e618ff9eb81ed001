"""Audit round 2: upstream failures and retries, request bodies, connection management, lanes,
Upgrade, static files.

Each test starts a fresh proxy in front of scripted upstreams (tests/conftest.py fixtures),
sends raw bytes and asserts what an experienced nginx/HAProxy user expects; the rule is cited
in a one-line comment. Every network wait is bounded (WAIT).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest

from tests.conftest import keepalive_handler, make_config, ok_response, open_client, read_response
from tests.test_audit import slurp
from tests.test_e2e_tunnel import SWITCHED

pytestmark = pytest.mark.timeout(30)

WAIT = 3.0


def get(path: bytes = b"/c", fields: bytes = b"", version: bytes = b"1.1", method: bytes = b"GET") -> bytes:
    return b"%s %s HTTP/%s\r\nHost: t\r\n%s\r\n" % (method, path, version, fields)


def post(path: bytes = b"/c", body: bytes = b"abc", fields: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n%s" % (path, len(body), fields, body)


def refused_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def close_hard(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def rr(reader, method: bytes = b"GET"):
    return await asyncio.wait_for(read_response(reader, method), WAIT)


async def closed_soon(reader: asyncio.StreamReader, timeout: float = WAIT) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(65536), timeout)
    except ConnectionError:
        return True
    except TimeoutError:
        return False
    return data == b""


def named_handler(name: bytes):
    """Keep-alive upstream answering 200 with `name + request line`."""

    async def handler(reader, writer, up):
        while True:
            try:
                head, _, body = await reader.read_request()
            except asyncio.IncompleteReadError:
                return
            line = head.split(b"\r\n", 1)[0]
            writer.write(ok_response(name + b" " + line + b" body=%d" % len(body)))
            await writer.drain()

    return handler


async def read_then_close(reader, writer, up):
    """Reads one request head and closes without answering (an 'error' after the request was sent)."""
    await reader.readuntil(b"\r\n\r\n")
    writer.close()


def silent_handler(seen: asyncio.Event | None = None):
    async def handler(reader, writer, up):
        await reader.readuntil(b"\r\n\r\n")
        if seen is not None:
            seen.set()
        await reader.read()  # until laneproxy closes

    return handler


def request_lines(up) -> list[bytes]:
    out = []
    for raw in up.received:
        for line in bytes(raw).split(b"\r\n"):
            if line.endswith(b" HTTP/1.1") and b" /" in line:
                out.append(line)
    return out


# == 1. upstream failures and retries ==============================================================


async def test_connect_refused_is_502_and_client_connection_kept(start_proxy):
    # interface.md: connection refused -> 502; nginx keeps the client connection after a 502.
    proxy = await start_proxy(make_config(refused_port()))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get())
        status, headers, _ = await rr(reader)
        assert status == 502
        assert headers.get(b"connection") != [b"close"]
        writer.write(get())
        assert (await rr(reader))[0] == 502
    finally:
        writer.close()


async def test_upstream_reset_after_request_is_502(start_proxy, upstream):
    # interface.md: "connection refused or reset ... before its head" -> 502.
    async def rst(reader, writer, up):
        await reader.readuntil(b"\r\n\r\n")
        close_hard(writer)

    up = await upstream(rst)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(post())
        assert (await rr(reader))[0] == 502
    finally:
        writer.close()


async def test_upstream_timeout_mid_head_is_504(start_proxy, upstream):
    # interface.md: no upstream bytes within read_timeout -> 504 (nginx: "upstream timed out ...
    # while reading response header" -> 504), also when part of the head arrived.
    async def partial_head(reader, writer, up):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await writer.drain()
        await reader.read()

    up = await upstream(partial_head)
    proxy = await start_proxy(make_config(up.port, lane={"read_timeout": 0.5, "retries": 0}))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get())
        status, _, _ = await rr(reader)
        assert status == 504
    finally:
        writer.close()


async def test_upstream_close_mid_head_is_502(start_proxy, upstream):
    # interface.md: "the upstream broke the response before its head" -> 502.
    async def partial_then_close(reader, writer, up):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await writer.drain()
        writer.close()

    up = await upstream(partial_then_close)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(post())
        assert (await rr(reader))[0] == 502
    finally:
        writer.close()


async def test_upstream_timeout_mid_body_aborts_client_without_a_second_answer(start_proxy, upstream):
    # RFC 9112 §6.3(7)/§8 (F7/F13): the head is out, so the client connection is closed;
    # laneproxy must not append its own 504 after the partial body.
    async def stall(reader, writer, up):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        await reader.read()

    up = await upstream(stall)
    proxy = await start_proxy(make_config(up.port, lane={"read_timeout": 0.5}))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get())
        raw, closed = await slurp(reader, idle=2.0)
        assert closed
        assert raw.count(b"HTTP/1.1 ") == 1 and raw.endswith(b"0123456789"), raw
    finally:
        writer.close()


async def test_get_failing_after_send_on_a_fresh_connection_is_retried_on_the_next_server(start_proxy, upstream):
    # nginx proxy_next_upstream error (default): an idempotent request is passed to the next server.
    bad = await upstream(read_then_close)
    good = await upstream(named_handler(b"B"))
    proxy = await start_proxy(make_config([bad.port, good.port], lane={"balance": "round_robin"}))
    for _ in range(2):  # whichever server round robin picks first
        reader, writer = await open_client(proxy.port)
        try:
            writer.write(get())
            status, _, body = await rr(reader)
            assert status == 200 and body.startswith(b"B "), body
        finally:
            writer.close()


async def test_post_failing_after_send_is_502_and_never_replayed(start_proxy, upstream):
    # RFC 9110 §9.2.2 / http-rules P5 + a3 rule 4: a non-idempotent request is never retried once sent.
    bad = await upstream(read_then_close)
    good = await upstream(named_handler(b"B"))
    proxy = await start_proxy(make_config([bad.port, good.port]))
    statuses = []
    for _ in range(2):
        reader, writer = await open_client(proxy.port)
        try:
            writer.write(post())
            statuses.append((await rr(reader))[0])
        finally:
            writer.close()
    assert sorted(statuses) == [200, 502], statuses
    assert good.connections == 1 and len(request_lines(good)) == 1  # only its own turn


async def test_get_timeout_is_retried_on_the_next_server(start_proxy, upstream):
    # nginx proxy_next_upstream default "error timeout": an idempotent request that timed out
    # (nothing sent to the client) goes to the next server; retry_on defaults to [error, timeout].
    seen = asyncio.Event()
    slow = await upstream(silent_handler(seen))
    good = await upstream(named_handler(b"B"))
    proxy = await start_proxy(make_config([slow.port, good.port], lane={"read_timeout": 0.4}))
    for _ in range(2):
        reader, writer = await open_client(proxy.port)
        try:
            writer.write(get())
            status, _, body = await rr(reader)
            assert status == 200 and body.startswith(b"B "), (status, body)
        finally:
            writer.close()
    assert seen.is_set()


async def test_post_timeout_is_504_and_never_replayed(start_proxy, upstream):
    # RFC 9110 §9.2.2: the POST reached the slow server; it must not be sent to another one.
    slow = await upstream(silent_handler())
    good = await upstream(named_handler(b"B"))
    proxy = await start_proxy(make_config([slow.port, good.port], lane={"read_timeout": 0.4}))
    statuses = []
    for _ in range(2):
        reader, writer = await open_client(proxy.port)
        try:
            writer.write(post())
            statuses.append((await rr(reader))[0])
        finally:
            writer.close()
    assert sorted(statuses) == [200, 504], statuses
    assert len(request_lines(good)) == 1


@pytest.mark.parametrize("retries,expected", [(0, 1), (1, 2), (2, 3)])
async def test_retries_bounds_the_number_of_servers_tried(start_proxy, upstream, retries, expected):
    # interface.md `retries`: extra tries; nginx proxy_next_upstream_tries = retries + 1.
    ups = [await upstream(read_then_close) for _ in range(3)]
    proxy = await start_proxy(make_config([u.port for u in ups], lane={"retries": retries}))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get())
        assert (await rr(reader))[0] == 502
    finally:
        writer.close()
    assert sum(u.connections for u in ups) == expected


async def test_http_503_retry_for_get_but_not_for_post(start_proxy, upstream):
    # nginx proxy_next_upstream http_503: only for idempotent requests (non_idempotent off).
    async def unavailable(reader, writer, up):
        while True:
            await reader.read_request()
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")
            await writer.drain()

    a = await upstream(unavailable)
    b = await upstream(named_handler(b"B"))
    cfg = make_config([a.port, b.port], lane={"retry_on": ["error", "timeout", "http_503"]})
    cfg["lanes"]["app"]["servers"] = [{"address": f"127.0.0.1:{p}", "max_fails": 0} for p in (a.port, b.port)]
    proxy = await start_proxy(cfg)
    for _ in range(2):
        reader, writer = await open_client(proxy.port)
        try:
            writer.write(get())
            status, _, body = await rr(reader)
            assert status == 200 and body.startswith(b"B ")
        finally:
            writer.close()
    got = []
    for _ in range(2):
        reader, writer = await open_client(proxy.port)
        try:
            writer.write(post(b"/p"))
            got.append((await rr(reader))[0])
        finally:
            writer.close()
    assert sorted(got) == [200, 503]  # the 503 is relayed, the POST not replayed
    assert sum(1 for line in request_lines(b) if line.startswith(b"POST")) == 1


def serve_one_then_die():
    async def handler(reader, writer, up):
        if up.connections > 1:
            await keepalive_handler(reader, writer, up)
            return
        await reader.read_request()
        writer.write(ok_response(b"first"))
        await writer.drain()
        await reader.read(1)  # request 2 reaches the pooled connection ...
        close_hard(writer)  # ... and the upstream resets it (keep-alive race)

    return handler


async def test_keepalive_race_is_retried_even_with_retries_0(start_proxy, upstream):
    # README: the keep-alive race "is retried once on a fresh connection"; nginx does not count a
    # cached connection's failure as a try (ngx_http_upstream_next: peer.cached -> tries++).
    up = await upstream(serve_one_then_die())
    proxy = await start_proxy(make_config(up.port, lane={"retries": 0}))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/one"))
        assert (await rr(reader))[2] == b"first"
    finally:
        writer.close()
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/two"))
        status, _, body = await rr(reader)
        assert status == 200 and body.startswith(b"GET /two "), (status, body)
    finally:
        writer.close()


async def test_keepalive_race_get_on_the_same_client_connection_is_retried(start_proxy, upstream):
    # a3 rule 4: the race is retried transparently also for the second request of a keep-alive client.
    up = await upstream(serve_one_then_die())
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/one"))
        assert (await rr(reader))[2] == b"first"
        writer.write(get(b"/two", method=b"DELETE"))
        status, _, body = await rr(reader)
        assert status == 200 and body.startswith(b"DELETE /two "), (status, body)
    finally:
        writer.close()


# == 2. request bodies ===============================================================================


async def test_chunked_upload_is_rechunked_canonically(start_proxy, upstream):
    # README: request bodies re-chunked canonically, extensions and trailers dropped (F11).
    up = await upstream(keepalive_handler)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"POST /u HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"0005;a=b\r\nhello\r\n1\r\n!\r\n0\r\nX-Trailer: 1\r\n\r\n")
        status, _, body = await rr(reader)
        assert status == 200 and body.endswith(b"body=6\n")
    finally:
        writer.close()
    raw = bytes(up.received[0])
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head and b"Content-Length" not in head
    assert b";" not in body and b"X-Trailer" not in raw
    assert body.endswith(b"0\r\n\r\n")
    assert body.replace(b"5\r\nhello\r\n1\r\n!\r\n", b"").replace(b"6\r\nhello!\r\n", b"") == b"0\r\n\r\n", body


async def test_max_body_chunked_413_mid_body_closes_and_drops_upstream(start_proxy, upstream):
    # interface.md: body over max_body -> 413; a3 rule 5: the half-sent upstream request is never reused.
    seen = asyncio.Event()
    up = await upstream(silent_handler(seen))
    proxy = await start_proxy(make_config(up.port, lane={"max_body": 10}))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"POST /u HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await asyncio.wait_for(seen.wait(), WAIT)
        writer.write(b"8\r\n12345678\r\n")
        raw, closed = await slurp(reader, idle=1.5)
        assert raw.startswith(b"HTTP/1.1 413 "), raw
        assert closed
    finally:
        writer.close()
    await asyncio.sleep(0.2)
    assert up.writers[0].transport.is_closing() or bytes(up.received[0]).count(b"POST") == 1


async def test_expect_100_continue_sent_once_before_body_and_not_forwarded(start_proxy, upstream):
    # RFC 9110 §10.1.1 + http-rules I7: laneproxy sends 100 itself (once); Expect is not forwarded;
    # an upstream's own 100 is not relayed a second time.
    async def with_own_100(reader, writer, up):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        body = await reader.readexactly(5)
        writer.write(ok_response(b"got " + body))
        await writer.drain()
        await reader.read()

    up = await upstream(with_own_100)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"POST /u HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        raw, _ = await slurp(reader)
        assert b"100 Continue" not in raw and raw.startswith(b"HTTP/1.1 200 "), raw
        assert raw.endswith(b"got hello")
    finally:
        writer.close()
    assert b"expect" not in bytes(up.received[0]).lower()


async def test_expect_100_continue_from_http10_gets_no_100(start_proxy, upstream):
    # RFC 9110 §10.1.1 / §15.2: ignore 100-continue from HTTP/1.0; never send 1xx to a 1.0 client.
    up = await upstream(keepalive_handler)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"POST /u HTTP/1.0\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        raw, _ = await slurp(reader, idle=0.5)
        assert b"100" not in raw.split(b"\r\n", 1)[0], raw
        writer.write(b"hello")
        raw2, _ = await slurp(reader)
        assert (raw + raw2).startswith(b"HTTP/1.1 200 "), raw + raw2
    finally:
        writer.close()


async def test_two_expect_lines_with_an_unknown_expectation_is_417(start_proxy, upstream):
    # RFC 9110 §5.3 (repeated lines = one list) + §10.1.1 / http-rules I7: any expectation other
    # than 100-continue -> 417, whatever the line order.
    up = await upstream(keepalive_handler)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"POST /u HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: x-foo\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        raw, _ = await slurp(reader)
        assert raw.startswith(b"HTTP/1.1 417 "), raw
    finally:
        writer.close()
    assert up.connections == 0 or not any(b"POST" in bytes(r) for r in up.received)


async def test_expect_100_continue_while_queued_gets_no_100_before_the_503(start_proxy, upstream):
    # RFC 9110 §10.1.1: send 100 only when the body will be read and forwarded; a queued request
    # that ends in 503 (lanes.md) must get the final status without a 100 first.
    hold = asyncio.Event()

    async def held(reader, writer, up):
        await reader.read_request()
        await hold.wait()
        writer.write(ok_response(b"x"))
        await writer.drain()

    up = await upstream(held)
    proxy = await start_proxy(make_config(up.port, lane={"limit": 1, "queue": 1, "queue_timeout": 0.5}))
    r1, w1 = await open_client(proxy.port)
    r2, w2 = await open_client(proxy.port)
    try:
        w1.write(get())
        await asyncio.sleep(0.2)
        w2.write(b"POST /u HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        first = await asyncio.wait_for(r2.readuntil(b"\r\n\r\n"), WAIT)
        assert first.startswith(b"HTTP/1.1 503 "), first
        assert b"retry-after:" in first.lower()
    finally:
        hold.set()
        w1.close()
        w2.close()


async def test_client_stopping_mid_chunked_body_gets_408_and_upstream_is_dropped(start_proxy, upstream):
    # interface.md client.body_timeout -> 408; F7: the upstream connection with half a body is closed.
    seen = asyncio.Event()
    up = await upstream(silent_handler(seen))
    proxy = await start_proxy(make_config(up.port, client={"body_timeout": 0.5}))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"POST /u HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await asyncio.wait_for(seen.wait(), WAIT)
        raw, closed = await slurp(reader, idle=2.0)
        assert raw.startswith(b"HTTP/1.1 408 ") and closed, raw
    finally:
        writer.close()
    # the upstream side sees EOF (handler's read() returned) -> its writer is closed by the fixture
    await asyncio.sleep(0.3)
    assert proxy.lanes["app"].servers[0].pool.stats().get("idle", 0) == 0


async def test_early_response_before_body_keeps_client_but_retires_upstream(start_proxy, upstream):
    # a3 rule 6: an upstream answering before the body must not get the rest of the body as a
    # new request; the client connection stays usable (its body is drained).
    async def early(reader, writer, up):
        if up.connections == 1:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\nno")
            await writer.drain()
            await reader.read()
            return
        await keepalive_handler(reader, writer, up)

    up = await upstream(early)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"POST /u HTTP/1.1\r\nHost: t\r\nContent-Length: 26\r\n\r\n")
        status, _, body = await rr(reader)
        assert (status, body) == (401, b"no")
        writer.write(b"GET /evil HTTP/1.1\r\nX: 1\r\n")  # 26 bytes of body
        writer.write(get(b"/next"))
        status, _, body = await rr(reader)
        assert status == 200 and body.startswith(b"GET /next "), body
    finally:
        writer.close()
    assert not any(b"/evil HTTP/1.1\r\nX: 1\r\nHost" in bytes(r) for r in up.received[1:])
    assert all(b"GET /evil" not in bytes(r) for r in up.received[1:])


# == 3. connection management =======================================================================


async def test_http10_keepalive_client_gets_close(start_proxy, upstream):
    # RFC 9112 §9.3 (P2): no persistent connection with an HTTP/1.0 client.
    up = await upstream(keepalive_handler)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(version=b"1.0", fields=b"Connection: keep-alive\r\n"))
        raw, closed = await slurp(reader)
        assert raw.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close\r\n" in raw and closed, raw
    finally:
        writer.close()


async def test_client_connection_close_honoured_after_the_response(start_proxy, upstream):
    # RFC 9112 §9.6 (P6): after `Connection: close` the server closes after the final response.
    up = await upstream(keepalive_handler)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(fields=b"Connection: close\r\n"))
        raw, closed = await slurp(reader)
        assert raw.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close\r\n" in raw and closed, raw
    finally:
        writer.close()


async def test_keepalive_requests_limit_with_pipelining(start_proxy, upstream):
    # nginx keepalive_requests: the last allowed response carries `Connection: close`, then close;
    # a pipelined request beyond it is not answered (nor sent upstream).
    up = await upstream(keepalive_handler)
    proxy = await start_proxy(make_config(up.port, client={"keepalive_requests": 2}))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/1") + get(b"/2") + get(b"/3"))
        raw, closed = await slurp(reader)
        assert closed
        assert raw.count(b"HTTP/1.1 200 ") == 2, raw
        second = raw[raw.index(b"HTTP/1.1 200 ", 5):]
        assert b"\r\nConnection: close\r\n" in second
        assert b"\r\nConnection: close\r\n" not in raw[: raw.index(b"HTTP/1.1 200 ", 5)]
    finally:
        writer.close()
    assert not any(b"GET /3" in bytes(r) for r in up.received)


async def test_pipelined_no_route_and_upstream_error_answered_in_order(start_proxy, upstream):
    # RFC 9112 §9.3.2 (P3): responses in request order, including laneproxy's own 404/502.
    good = await upstream(named_handler(b"G"))
    cfg = make_config({"good": [good.port], "dead": [refused_port()]},
                      routes=[{"prefix": "/g", "lane": "good"}, {"prefix": "/d", "lane": "dead"}])
    proxy = await start_proxy(cfg)
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/g1") + get(b"/nowhere") + get(b"/d1") + get(b"/g2"))
        out = [await rr(reader) for _ in range(4)]
        assert [s for s, _, _ in out] == [200, 404, 502, 200]
        assert out[0][2].startswith(b"G GET /g1 ") and out[3][2].startswith(b"G GET /g2 ")
    finally:
        writer.close()


async def test_pipelined_bad_request_answered_in_turn_then_close(start_proxy, upstream):
    # RFC 9112 §9.3.2 (P3) + §3.2 (R7): the earlier response first, then the 400, then close;
    # what follows the bad request is never forwarded.
    up = await upstream(named_handler(b"G"))
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/1") + b"GET /bad HTTP/1.1\r\n\r\n" + get(b"/3"))
        raw, closed = await slurp(reader)
        assert raw.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 400 " in raw and closed, raw
        assert raw.index(b"HTTP/1.1 400 ") > raw.index(b"G GET /1 ")
        assert b"GET /3" not in raw
    finally:
        writer.close()
    assert not any(b"/3 " in bytes(r) or b"/bad" in bytes(r) for r in up.received)


async def test_pipelined_slow_then_fast_lane_kept_in_order(start_proxy, upstream):
    # RFC 9112 §9.3.2 (P3): the fast lane's answer waits for the slow one's.
    release = asyncio.Event()

    async def slow(reader, writer, up):
        while True:
            head, _, _ = await reader.read_request()
            await release.wait()
            writer.write(ok_response(b"slow"))
            await writer.drain()

    s = await upstream(slow)
    f = await upstream(named_handler(b"F"))
    cfg = make_config({"slow": [s.port], "fast": [f.port]},
                      routes=[{"prefix": "/tast", "lane": "slow"}, {"prefix": "/", "lane": "fast"}])
    proxy = await start_proxy(cfg)
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/tast/x") + get(b"/fast"))
        await asyncio.sleep(0.3)
        release.set()
        first = await rr(reader)
        second = await rr(reader)
        assert first[2] == b"slow" and second[2].startswith(b"F GET /fast ")
    finally:
        writer.close()


async def test_pipelined_posts_with_bodies_in_one_write(start_proxy, upstream):
    # a3 rule 7: the body of request N never absorbs request N+1.
    up = await upstream(keepalive_handler)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(post(b"/a", b"12345") + b"POST /b HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nxyz\r\n0\r\n\r\n" + get(b"/c"))
        out = [await rr(reader) for _ in range(3)]
        assert [b for _, _, b in out] == [b"POST /a HTTP/1.1 body=5\n", b"POST /b HTTP/1.1 body=3\n",
                                          b"GET /c HTTP/1.1 body=0\n"]
    finally:
        writer.close()


async def test_upstream_http10_response_does_not_close_a_keepalive_client(start_proxy, upstream):
    # RFC 9110 §7.6.1: upstream connection management is hop-by-hop; the client stays open.
    async def http10(reader, writer, up):
        await reader.read_request()
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    up = await upstream(http10)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get())
        status, headers, body = await rr(reader)
        assert (status, body) == (200, b"ok") and headers.get(b"connection") != [b"close"]
        writer.write(get())
        assert (await rr(reader))[0] == 200
    finally:
        writer.close()


# == 4. lanes ========================================================================================


async def test_longest_prefix_wins_and_prefix_is_a_plain_string(start_proxy, upstream):
    # interface.md: the longest matching prefix wins; `/api` also matches `/apix` (nginx location).
    a = await upstream(named_handler(b"A"))
    b = await upstream(named_handler(b"B"))
    c = await upstream(named_handler(b"C"))
    cfg = make_config({"a": [a.port], "b": [b.port], "c": [c.port]},
                      routes=[{"prefix": "/", "lane": "c"}, {"prefix": "/api", "lane": "a"},
                              {"prefix": "/api/v2/", "lane": "b"}])
    proxy = await start_proxy(cfg)
    reader, writer = await open_client(proxy.port)
    try:
        for path, name in [(b"/api/v2/x", b"B"), (b"/api/v2", b"A"), (b"/apix", b"A"), (b"/ap", b"C"), (b"/", b"C")]:
            writer.write(get(path))
            body = (await rr(reader))[2]
            assert body.startswith(name + b" GET " + path + b" "), (path, body)
    finally:
        writer.close()


async def test_strip_prefix_keeps_the_query(start_proxy, upstream):
    # README: strip_prefix `/api/x` -> `/x` (nginx `proxy_pass http://up/;`); the query is untouched.
    up = await upstream(named_handler(b"U"))
    cfg = make_config(up.port, routes=[{"prefix": "/api/", "lane": "app", "strip_prefix": True}])
    proxy = await start_proxy(cfg)
    reader, writer = await open_client(proxy.port)
    try:
        for path, sent in [(b"/api/x?q=1", b"/x?q=1"), (b"/api/", b"/"), (b"/api/?a=/api/", b"/?a=/api/")]:
            writer.write(get(path))
            body = (await rr(reader))[2]
            assert body.startswith(b"U GET " + sent + b" HTTP/1.1"), (path, body)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "path", [b"/t%61st/x", b"//tast/x", b"/tast%2Fx"], ids=["pct-encoded", "double-slash", "pct-slash"],
)
async def test_lane_cannot_be_bypassed_by_an_equivalent_path(start_proxy, upstream, path):
    # a3 rule 13 / RFC 3986 §6.2.2.2: nginx matches locations on the decoded, slash-merged URI, so
    # `/t%61st/x` and `//tast/x` are the /tast lane; routing them to `/` lets a flood of slow work
    # reach the fast pool (lanes.md isolation). Either route them to /tast or refuse them (400).
    slow = await upstream(named_handler(b"SLOW"))
    fast = await upstream(named_handler(b"FAST"))
    cfg = make_config({"slow": [slow.port], "fast": [fast.port]},
                      routes=[{"prefix": "/tast", "lane": "slow"}, {"prefix": "/", "lane": "fast"}])
    proxy = await start_proxy(cfg)
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(path))
        status, _, body = await rr(reader)
    finally:
        writer.close()
    assert status == 400 or body.startswith(b"SLOW "), (status, body)
    assert fast.connections == 0


async def test_queue_full_503_has_retry_after_and_keeps_connection(start_proxy, upstream):
    # lanes.md / interface.md: full queue -> 503 at once, Retry-After >= 1, client connection stays open.
    hold = asyncio.Event()

    async def held(reader, writer, up):
        while True:
            head, _, _ = await reader.read_request()
            await hold.wait()
            writer.write(ok_response(b"x"))
            await writer.drain()

    up = await upstream(held)
    proxy = await start_proxy(make_config(up.port, lane={"limit": 1, "queue": 0}))
    r1, w1 = await open_client(proxy.port)
    r2, w2 = await open_client(proxy.port)
    try:
        w1.write(get())
        await asyncio.sleep(0.2)
        w2.write(get())
        status, headers, _ = await rr(r2)
        assert status == 503 and int(headers[b"retry-after"][0]) >= 1
        assert headers.get(b"connection") != [b"close"]
        hold.set()
        assert (await rr(r1))[0] == 200
        w2.write(get())
        assert (await rr(r2))[0] == 200
    finally:
        hold.set()
        w1.close()
        w2.close()


async def test_queued_post_whose_client_leaves_is_never_sent_upstream(start_proxy, upstream):
    # lanes.md: a waiter whose client disconnects leaves the queue at once; the upstream never sees it.
    hold = asyncio.Event()
    first_seen = asyncio.Event()

    async def held(reader, writer, upo):
        while True:
            head, _, _ = await reader.read_request()
            first_seen.set()
            await hold.wait()
            writer.write(ok_response(b"x"))
            await writer.drain()

    up = await upstream(held)
    proxy = await start_proxy(make_config(up.port, lane={"limit": 1, "queue": 5}))
    r1, w1 = await open_client(proxy.port)
    try:
        w1.write(get(b"/first"))
        await asyncio.wait_for(first_seen.wait(), WAIT)
        r2, w2 = await open_client(proxy.port)
        w2.write(b"POST /queued HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n12345")
        await asyncio.sleep(0.2)
        w2.close()
        await asyncio.sleep(0.2)
        hold.set()
        assert (await rr(r1))[0] == 200
        await asyncio.sleep(0.3)
        assert not any(b"/queued" in bytes(r) for r in up.received), [bytes(r) for r in up.received]
        w1.write(get(b"/after"))  # and the lane slot was given back
        assert (await rr(r1))[0] == 200
    finally:
        hold.set()
        w1.close()


@pytest.mark.parametrize("conn", ["pooled", "fresh"])
async def test_queued_post_body_is_read_after_admission(start_proxy, upstream, conn):
    # lanes.md: a queued request is served when it gets its slot; its body (sent while it waited)
    # must still be read and forwarded once it is admitted (here onto a pooled keep-alive connection).
    hold = asyncio.Event()
    first_seen = asyncio.Event()

    async def held(reader, writer, upo):
        while True:
            head, _, body = await reader.read_request()
            if b"/first" in head:
                first_seen.set()
                await hold.wait()
            close = b"/first" in head and conn == "fresh"
            writer.write(ok_response(head.split(b"\r\n", 1)[0] + b" body=" + body,
                                     b"Connection: close\r\n" if close else b""))
            await writer.drain()
            if close:
                return

    up = await upstream(held)
    proxy = await start_proxy(make_config(up.port, lane={"limit": 1, "queue": 5}))
    r1, w1 = await open_client(proxy.port)
    r2, w2 = await open_client(proxy.port)
    try:
        w1.write(get(b"/first"))
        await asyncio.wait_for(first_seen.wait(), WAIT)
        w2.write(b"POST /queued HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n12345")
        await asyncio.sleep(0.2)
        w2.write(b"67890")
        await asyncio.sleep(0.2)
        hold.set()
        assert (await rr(r1))[0] == 200
        status, _, body = await rr(r2)
        assert (status, body) == (200, b"POST /queued HTTP/1.1 body=1234567890"), (status, body)
    finally:
        hold.set()
        w1.close()
        w2.close()


async def test_queue_timeout_503_for_queued_post_drains_body_and_keeps_connection(start_proxy, upstream):
    # interface.md: queue_timeout -> 503 with Retry-After; "the client connection stays open".
    hold = asyncio.Event()

    async def held(reader, writer, up):
        while True:
            await reader.read_request()
            await hold.wait()
            writer.write(ok_response(b"x"))
            await writer.drain()

    up = await upstream(held)
    proxy = await start_proxy(make_config(up.port, lane={"limit": 1, "queue": 2, "queue_timeout": 0.4}))
    r1, w1 = await open_client(proxy.port)
    r2, w2 = await open_client(proxy.port)
    try:
        w1.write(get())
        await asyncio.sleep(0.2)
        w2.write(post(b"/q", b"0123456789"))
        status, headers, _ = await rr(r2)
        assert status == 503 and int(headers[b"retry-after"][0]) >= 1
        hold.set()
        w2.write(get(b"/after"))
        assert (await rr(r2))[0] == 200
    finally:
        hold.set()
        w1.close()
        w2.close()
    assert not any(b"/q " in bytes(r) for r in up.received)


# == 5. Upgrade =======================================================================================

WS = b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: x\r\n\r\n"


async def test_upgrade_bytes_held_until_101(start_proxy, upstream):
    # README: bytes the client sends before the 101 are held, then delivered in order after it.
    head_seen = asyncio.Event()
    may_answer = asyncio.Event()
    before_101 = bytearray()

    async def ws(reader, writer, up):
        await reader.readuntil(b"\r\n\r\n")
        head_seen.set()
        await may_answer.wait()
        try:
            before_101.extend(await asyncio.wait_for(reader.read(100), 0.3))
        except TimeoutError:
            pass
        writer.write(SWITCHED)
        await writer.drain()
        data = await asyncio.wait_for(reader.readexactly(len(b"early-bytes")), WAIT)
        writer.write(b"echo:" + data)
        await writer.drain()
        await reader.read()

    up = await upstream(ws)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(WS)
        await asyncio.wait_for(head_seen.wait(), WAIT)
        writer.write(b"early-bytes")
        await asyncio.sleep(0.1)
        may_answer.set()
        raw = b""
        while b"echo:early-bytes" not in raw:
            data = await asyncio.wait_for(reader.read(1000), WAIT)
            assert data
            raw += data
        assert raw.startswith(b"HTTP/1.1 101 ")
    finally:
        writer.close()
    assert bytes(before_101) == b""
    head = bytes(up.received[0]).split(b"\r\n\r\n")[0].lower()
    assert b"upgrade: websocket" in head and b"connection: upgrade" in head


async def test_upgrade_on_http10_is_ignored(start_proxy, upstream):
    # RFC 9110 §7.8: a server MUST ignore Upgrade received in an HTTP/1.0 request.
    up = await upstream(keepalive_handler)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(WS.replace(b"HTTP/1.1", b"HTTP/1.0"))
        raw, _ = await slurp(reader)
        assert raw.startswith(b"HTTP/1.1 200 "), raw
    finally:
        writer.close()
    assert b"upgrade" not in bytes(up.received[0]).lower().split(b"\r\n\r\n")[0].replace(b"get /ws", b"")


async def test_upgrade_refused_with_426_keeps_http_and_holds_no_bytes(start_proxy, upstream):
    # README / a3 rule 11: a non-101 answer keeps HTTP; the following request is parsed and routed.
    async def refuse(reader, writer, up):
        while True:
            head, _, _ = await reader.read_request()
            if b"Upgrade" in head:
                writer.write(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 4\r\n\r\nnope")
            else:
                writer.write(ok_response(head.split(b"\r\n", 1)[0]))
            await writer.drain()

    up = await upstream(refuse)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(WS + get(b"/next"))
        s1 = await rr(reader)
        s2 = await rr(reader)
        assert s1[0] == 426 and s2[0] == 200 and s2[2] == b"GET /next HTTP/1.1"
    finally:
        writer.close()


async def test_tunnel_idle_timeout_closes_client(start_proxy, upstream):
    # interface.md tunnel_idle_timeout: an idle tunnel is closed.
    async def ws(reader, writer, up):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(SWITCHED)
        await writer.drain()
        await reader.read()

    up = await upstream(ws)
    proxy = await start_proxy(make_config(up.port, lane={"tunnel_idle_timeout": 0.5}))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(WS)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert await closed_soon(reader, 3.0)
    finally:
        writer.close()


# == 6. static files ==================================================================================


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "public"
    root.mkdir()
    (root / "a.txt").write_bytes(b"0123456789")
    (root / "dir").mkdir()
    (root / "secret.txt").write_bytes(b"secret")
    os.utime(root / "a.txt", (1_600_000_000, 1_600_000_000))
    return root


async def static_proxy(start_proxy, upstream, site):
    up = await upstream(named_handler(b"LANE"))
    cfg = make_config(up.port, routes=[{"prefix": "/", "lane": "app", "try_files": True}], root=str(site))
    return await start_proxy(cfg), up


async def file_exchange(port: int, path: bytes, fields: bytes = b"", method: bytes = b"GET"):
    reader, writer = await open_client(port)
    try:
        writer.write(get(path, fields, method=method))
        return await rr(reader, method)
    finally:
        writer.close()


async def test_static_if_range_with_weak_etag_sends_the_whole_file(site, start_proxy, upstream):
    # RFC 9110 §13.1.5: If-Range with an entity-tag uses the strong comparison; a weak tag never
    # matches, so the Range is ignored and the full 200 goes out.
    proxy, _ = await static_proxy(start_proxy, upstream, site)
    status, headers, body = await file_exchange(proxy.port, b"/a.txt")
    etag = headers[b"etag"][0]
    assert etag.startswith(b"W/")
    status, headers, body = await file_exchange(proxy.port, b"/a.txt", b"Range: bytes=0-1\r\nIf-Range: %s\r\n" % etag)
    assert (status, body) == (200, b"0123456789"), (status, body)


async def test_static_if_range_with_matching_date_gives_206(site, start_proxy, upstream):
    # RFC 9110 §13.1.5 / §14.2: a matching If-Range date serves the range.
    proxy, _ = await static_proxy(start_proxy, upstream, site)
    lm = (await file_exchange(proxy.port, b"/a.txt"))[1][b"last-modified"][0]
    status, headers, body = await file_exchange(proxy.port, b"/a.txt", b"Range: bytes=2-4\r\nIf-Range: %s\r\n" % lm)
    assert (status, body) == (206, b"234") and headers[b"content-range"] == [b"bytes 2-4/10"]


async def test_static_if_none_match_takes_precedence_over_if_modified_since(site, start_proxy, upstream):
    # RFC 9110 §13.2.2: If-Modified-Since is ignored when If-None-Match is present.
    proxy, _ = await static_proxy(start_proxy, upstream, site)
    far_future = b"Thu, 01 Jan 2099 00:00:00 GMT"
    status, _, body = await file_exchange(proxy.port, b"/a.txt",
                                          b'If-None-Match: "other"\r\nIf-Modified-Since: %s\r\n' % far_future)
    assert (status, body) == (200, b"0123456789")
    status, headers, body = await file_exchange(proxy.port, b"/a.txt", b"If-Modified-Since: %s\r\n" % far_future)
    assert status == 304 and body == b"" and b"etag" in headers


async def test_static_head_and_unsatisfiable_range(site, start_proxy, upstream):
    # RFC 9110 §9.3.2 (HEAD: same fields, no body) and §15.5.17 (416 with `Content-Range: bytes */len`).
    proxy, _ = await static_proxy(start_proxy, upstream, site)
    status, headers, body = await file_exchange(proxy.port, b"/a.txt", method=b"HEAD")
    assert status == 200 and headers[b"content-length"] == [b"10"] and body == b""
    status, headers, _ = await file_exchange(proxy.port, b"/a.txt", b"Range: bytes=10-\r\n")
    assert status == 416 and headers[b"content-range"] == [b"bytes */10"]
    status, headers, body = await file_exchange(proxy.port, b"/a.txt", b"Range: bytes=-3\r\n")
    assert (status, body) == (206, b"789")


@pytest.mark.parametrize("path", [b"/dir/../secret.txt", b"/%2e%2e/etc/passwd", b"/dir/%2E%2E/secret.txt"])
async def test_static_traversal_never_served(site, start_proxy, upstream, path):
    # interface.md: anything that would leave root is refused or goes to the lane, never served.
    proxy, up = await static_proxy(start_proxy, upstream, site)
    status, _, body = await file_exchange(proxy.port, path)
    assert body != b"secret" and b"root:" not in body
    assert status in (400, 404) or body.startswith(b"LANE ")


async def test_static_directory_without_index_goes_to_the_lane(site, start_proxy, upstream):
    # interface.md: try_files serves only regular files; a directory falls through to the lane.
    proxy, up = await static_proxy(start_proxy, upstream, site)
    for path in (b"/dir", b"/dir/"):
        status, _, body = await file_exchange(proxy.port, path)
        assert status == 200 and body.startswith(b"LANE GET " + path + b" "), body
