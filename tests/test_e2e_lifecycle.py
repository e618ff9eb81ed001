"""Connection lifecycles through real sockets: upstream pool expiry, client keep-alive, drain."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from tests.conftest import (
    exchange,
    is_closed,
    keepalive_handler,
    make_config,
    open_client,
    read_response,
)

GET = b"GET /%s HTTP/1.1\r\nHost: t\r\n\r\n"


async def wait_for(predicate, timeout: float = 5.0) -> None:
    """Poll a condition (bounded): for state that has no event to await."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_upstream_connection_reused_across_clients(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port))
    for i in range(3):
        status, _, body = await exchange(proxy.port, GET % b"r%d" % i)
        assert status == 200 and body.startswith(b"GET /r%d " % i)
    assert up.connections == 1
    assert up.received[0].count(b"GET /r") == 3
    assert proxy.lanes["app"].servers[0].pool.idle == 1


async def test_pool_retires_connection_after_keepalive_requests(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, lane={"keepalive_requests": 2}))
    for i in range(5):
        status, _, _ = await exchange(proxy.port, GET % b"n%d" % i)
        assert status == 200
    # 2 requests per upstream connection: 5 requests need 3 connections.
    assert up.connections == 3
    assert [bytes(r).count(b"GET /n") for r in up.received] == [2, 2, 1]


async def test_pool_closes_idle_connection_after_keepalive_timeout(start_proxy, upstream):
    closed = asyncio.Event()

    async def handler(reader, writer, up):
        await keepalive_handler(reader, writer, up)
        closed.set()  # keepalive_handler returns on EOF from laneproxy

    up = await upstream(handler)
    proxy = await start_proxy(make_config(up.port, lane={"keepalive_timeout": "200ms"}))
    status, _, _ = await exchange(proxy.port, GET % b"a")
    assert status == 200
    await asyncio.wait_for(closed.wait(), 3)
    assert proxy.lanes["app"].servers[0].pool.idle == 0
    status, _, _ = await exchange(proxy.port, GET % b"b")
    assert status == 200 and up.connections == 2


async def test_idle_upstream_eof_removes_connection_from_pool(start_proxy, upstream):
    async def one_then_close(reader, writer, up):
        await reader.read_request()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # the upstream closes its idle keep-alive connection

    up = await upstream(one_then_close)
    proxy = await start_proxy(make_config(up.port))
    pool = proxy.lanes["app"].servers[0].pool
    assert (await exchange(proxy.port, GET % b"a"))[0] == 200
    await wait_for(lambda: pool.idle == 0)
    assert (await exchange(proxy.port, GET % b"b"))[0] == 200
    assert up.connections == 2


async def test_stray_bytes_on_idle_upstream_connection_discard_it(start_proxy, upstream):
    async def then_garbage(reader, writer, up):
        await reader.read_request()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")  # nobody asked
        await writer.drain()
        await reader.read()

    up = await upstream(then_garbage)
    proxy = await start_proxy(make_config(up.port))
    pool = proxy.lanes["app"].servers[0].pool
    assert (await exchange(proxy.port, GET % b"a"))[0] == 200
    await wait_for(lambda: pool.idle == 0)
    status, _, body = await exchange(proxy.port, GET % b"b")
    assert (status, body) == (200, b"ok")  # never the stale response
    assert up.connections == 2


async def test_client_keepalive_requests_closes_connection(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, client={"keepalive_requests": 2}))
    reader, writer = await open_client(proxy.port)
    writer.write(GET % b"1")
    status, headers, _ = await read_response(reader)
    assert status == 200 and b"connection" not in headers
    writer.write(GET % b"2")
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers[b"connection"] == [b"close"]
    assert await is_closed(reader)
    writer.close()


async def test_client_keepalive_timeout_closes_idle_connection(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, client={"keepalive_timeout": "200ms"}))
    reader, writer = await open_client(proxy.port)
    writer.write(GET % b"1")
    assert (await read_response(reader))[0] == 200
    assert await is_closed(reader, timeout=3)
    writer.close()


async def test_header_timeout_answers_408(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, client={"header_timeout": "300ms"}))
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n")  # the head never ends
    status, headers, _ = await asyncio.wait_for(read_response(reader), 3)
    assert status == 408 and headers[b"connection"] == [b"close"]
    assert await is_closed(reader)
    assert up.connections == 0
    writer.close()


async def test_header_timeout_is_not_reset_by_trickling_bytes(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, client={"header_timeout": "500ms"}))
    reader, writer = await open_client(proxy.port)
    loop = asyncio.get_running_loop()
    start = loop.time()
    writer.write(b"GET / HTTP/1.1\r\n")
    answered = asyncio.ensure_future(read_response(reader))
    for i in range(40):  # a slowloris keeps sending, but the deadline covers the whole head
        if answered.done():
            break
        writer.write(b"X-%d: y\r\n" % i)
        await asyncio.sleep(0.05)
    status, _, _ = await asyncio.wait_for(answered, 3)
    assert status == 408
    assert loop.time() - start < 1.5
    writer.close()


async def test_body_timeout_answers_408(start_proxy, upstream):
    async def reader_only(reader, writer, up):
        await reader.read()

    up = await upstream(reader_only)
    proxy = await start_proxy(make_config(up.port, client={"body_timeout": "300ms"}))
    reader, writer = await open_client(proxy.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
    status, _, _ = await asyncio.wait_for(read_response(reader), 3)
    assert status == 408
    assert await is_closed(reader)
    writer.close()


async def test_client_abort_closes_upstream_connection(start_proxy, upstream):
    upstream_eof = asyncio.Event()

    async def slow(reader, writer, up):
        await reader.read_request()
        await reader.read()  # returns b"" when laneproxy closes the connection
        upstream_eof.set()

    up = await upstream(slow)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    writer.write(GET % b"slow")
    await wait_for(lambda: up.connections == 1)
    await wait_for(lambda: len(up.received[0]) > 0)
    # A reset, not a FIN: a FIN after a complete request is a half-close and still gets its answer.
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    await asyncio.wait_for(upstream_eof.wait(), 3)
    await wait_for(lambda: proxy.lanes["app"].in_flight == 0)
    assert proxy.lanes["app"].servers[0].pool.idle == 0


async def test_half_close_after_request_still_gets_response(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    writer.write(GET % b"half")
    writer.write_eof()
    status, _, body = await asyncio.wait_for(read_response(reader), 3)
    assert status == 200 and body.startswith(b"GET /half ")
    assert await is_closed(reader)
    writer.close()


@pytest.mark.timeout(20)
async def test_graceful_stop_finishes_in_flight_exchange(start_proxy, upstream):
    release = asyncio.Event()

    async def slow(reader, writer, up):
        await reader.read_request()
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
        await writer.drain()
        await reader.read()

    up = await upstream(slow)
    proxy = await start_proxy(make_config(up.port))
    port = proxy.port
    idle_reader, idle_writer = await open_client(port)
    reader, writer = await open_client(port)
    writer.write(GET % b"slow")
    await wait_for(lambda: up.connections == 1 and len(up.received[0]) > 0)
    stopping = asyncio.ensure_future(proxy.stop(drain_timeout=5))
    assert await is_closed(idle_reader)  # idle keep-alive connections close at once
    with pytest.raises(OSError):
        await asyncio.wait_for(open_client(port), 2)  # no longer accepting
    release.set()
    status, headers, body = await asyncio.wait_for(read_response(reader), 3)
    assert (status, body) == (200, b"done")
    assert headers[b"connection"] == [b"close"]
    await asyncio.wait_for(stopping, 5)
    idle_writer.close()
    writer.close()
