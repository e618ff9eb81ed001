"""Upstream resilience (issue 5): the keep-alive race, safe retries, balancing, health."""

from __future__ import annotations

import asyncio
import random
import socket
import struct

import pytest

from tests.conftest import Upstream, exchange, keepalive_handler, make_config, ok_response, open_client, read_response

GET = b"GET /%s HTTP/1.1\r\nHost: t\r\n\r\n"


def refused_port() -> int:
    """A port with nothing listening (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def close_hard(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_keepalive_race_get_is_retried_on_a_fresh_connection(start_proxy, upstream, how):
    async def serve_one_then_die(reader, writer, up):
        if up.connections > 1:  # later connections behave
            await keepalive_handler(reader, writer, up)
            return
        await reader.read_request()
        writer.write(ok_response(b"first"))
        await writer.drain()
        await reader.read(1)  # the first bytes of request 2 arrive on the pooled connection...
        close_hard(writer) if how == "rst" else writer.close()  # ...and the upstream closes it

    up = await upstream(serve_one_then_die)
    proxy = await start_proxy(make_config(up.port))
    assert (await exchange(proxy.port, GET % b"one"))[2] == b"first"
    status, _, body = await exchange(proxy.port, GET % b"two")
    assert status == 200 and body.startswith(b"GET /two ")
    assert up.connections == 2
    assert proxy.lanes["app"].servers[0].retried == 1


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_keepalive_race_post_is_never_replayed(start_proxy, upstream, how):
    async def serve_one_then_die(reader, writer, up):
        await reader.read_request()
        writer.write(ok_response(b"first"))
        await writer.drain()
        await reader.read(1)
        close_hard(writer) if how == "rst" else writer.close()

    up = await upstream(serve_one_then_die)
    proxy = await start_proxy(make_config(up.port))
    assert (await exchange(proxy.port, GET % b"one"))[0] == 200
    request = b"POST /pay HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
    status, _, _ = await exchange(proxy.port, request)
    assert status == 502
    assert up.connections == 1  # no second connection: the POST was not sent again
    assert sum(bytes(r).count(b"POST /pay") for r in up.received) <= 1


@pytest.mark.timeout(40)
async def test_upstream_idle_close_and_keepalive_hint_cause_no_502(start_proxy, upstream):
    """2,000 requests over ~10 s with idle gaps against an upstream that closes idle
    connections after 1 s (and says so with Keep-Alive: timeout=1 on half of them)."""

    async def idle_closer(reader, writer, up):
        hint = up.connections % 2 == 0
        while True:
            try:
                await asyncio.wait_for(reader.read_request(), 1.0)
            except (TimeoutError, asyncio.IncompleteReadError):
                writer.close()  # like gunicorn/uvicorn/Node closing an idle keep-alive connection
                return
            extra = b"Keep-Alive: timeout=1\r\n" if hint else b""
            writer.write(ok_response(b"ok", extra))
            await writer.drain()

    up = await upstream(idle_closer)
    proxy = await start_proxy(make_config(up.port))
    rng = random.Random(7)
    statuses: list[int] = []

    async def client(n: int) -> None:
        reader, writer = await open_client(proxy.port)
        try:
            for i in range(n):
                await asyncio.sleep(rng.choice((0, 0, 0.3, 0.9, 1.0, 1.05)))
                writer.write(GET % b"c%d" % i)
                statuses.append((await read_response(reader))[0])
        finally:
            writer.close()

    await asyncio.gather(*(client(10) for _ in range(200)))
    assert len(statuses) == 2000
    assert statuses.count(200) == 2000, {s: statuses.count(s) for s in set(statuses)}


async def test_upstream_restart_with_pooled_connections(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port))
    clients = [await open_client(proxy.port) for _ in range(10)]
    for reader, writer in clients:
        writer.write(GET % b"warm")
    for reader, _ in clients:
        assert (await read_response(reader))[0] == 200
    assert proxy.lanes["app"].servers[0].pool.idle == 10
    port = up.port
    await up.close()  # the upstream restarts: every pooled connection is now dead
    restarted = Upstream(keepalive_handler)
    restarted.server = await asyncio.start_server(restarted._on_connect, "127.0.0.1", port, reuse_address=True)
    try:
        results = await asyncio.gather(*(exchange(proxy.port, GET % b"after%d" % i) for i in range(20)))
        assert [r[0] for r in results] == [200] * 20
    finally:
        await restarted.close()
        for _, writer in clients:
            writer.close()


async def test_refusing_server_is_skipped_even_for_post(start_proxy, upstream):
    up = await upstream()
    dead = refused_port()
    proxy = await start_proxy(make_config([dead, up.port]))
    for i in range(10):
        status, _, body = await exchange(
            proxy.port, b"POST /p%d HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx" % i
        )
        assert status == 200 and body.startswith(b"POST /p%d " % i)
    dead_server = proxy.lanes["app"].servers[0]
    assert dead_server.failures >= 1
    assert dead_server.down_until > 0  # max_fails 1: marked down after its first failure


async def test_max_fails_marks_down_and_fail_timeout_brings_back(start_proxy, upstream):
    up_a = await upstream()
    up_b = await upstream()
    cfg = make_config([up_a.port, up_b.port])
    cfg["lanes"]["app"]["servers"][0] = {
        "address": f"127.0.0.1:{up_a.port}", "max_fails": 2, "fail_timeout": "400ms",
    }
    cfg["lanes"]["app"]["retry_on"] = ["error", "timeout", "http_503"]

    async def unavailable(reader, writer, up):
        while True:
            await reader.read_request()
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    up_a.handler = unavailable
    proxy = await start_proxy(cfg)
    a = proxy.lanes["app"].servers[0]
    for i in range(6):
        status, _, _ = await exchange(proxy.port, GET % b"x%d" % i)
        assert status == 200  # 503 from A is retried on B
    assert a.down_until > 0 and a.marked_down >= 1
    served_by_a = a.requests
    for i in range(4):
        assert (await exchange(proxy.port, GET % b"y%d" % i))[0] == 200
    assert a.requests == served_by_a  # skipped while down
    up_a.handler = keepalive_handler
    await asyncio.sleep(0.5)  # fail_timeout passes: the server gets traffic again
    for i in range(4):
        assert (await exchange(proxy.port, GET % b"z%d" % i))[0] == 200
    assert a.requests > served_by_a


@pytest.mark.parametrize("balance", ["round_robin", "least_conn", "p2c"])
async def test_weights_split_traffic(start_proxy, upstream, balance):
    up_a = await upstream()
    up_b = await upstream()
    cfg = make_config([up_a.port, up_b.port], lane={"balance": balance})
    cfg["lanes"]["app"]["servers"][1] = {"address": f"127.0.0.1:{up_b.port}", "weight": 3}
    proxy = await start_proxy(cfg)
    reader, writer = await open_client(proxy.port)
    for i in range(1000):
        writer.write(GET % b"w")
        assert (await read_response(reader))[0] == 200
    writer.close()
    a, b = (sum(bytes(r).count(b"GET /w ") for r in up.received) for up in (up_a, up_b))
    assert a + b == 1000
    if balance == "round_robin":  # sequential requests: least_conn/p2c see equal loads and need not weigh
        assert abs(b - 750) <= 75, (a, b)


async def test_backup_used_only_when_primaries_are_down(start_proxy, upstream):
    primary = await upstream()
    backup = await upstream()
    cfg = make_config([primary.port, backup.port])
    cfg["lanes"]["app"]["servers"][1] = {"address": f"127.0.0.1:{backup.port}", "backup": True}
    proxy = await start_proxy(cfg)
    for i in range(5):
        assert (await exchange(proxy.port, GET % b"p%d" % i))[0] == 200
    assert backup.connections == 0
    await primary.close()
    for i in range(5):
        status, _, body = await exchange(proxy.port, GET % b"b%d" % i)
        assert status == 200 and body.startswith(b"GET /b%d " % i)
    assert backup.connections >= 1


@pytest.mark.timeout(20)
async def test_active_health_takes_failing_server_out(start_proxy, upstream):
    healthy = {"a": True}

    async def with_health(reader, writer, up):
        while True:
            head, _, _ = await reader.read_request()
            if head.startswith(b"GET /healthz") and not healthy["a"]:
                writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
            else:
                writer.write(ok_response(head.split(b"\r\n", 1)[0]))
            await writer.drain()

    up_a = await upstream(with_health)
    up_b = await upstream()
    cfg = make_config(
        [up_a.port, up_b.port],
        lane={"health": {"path": "/healthz", "interval": "100ms", "timeout": "500ms", "fall": 2, "rise": 2}},
    )
    proxy = await start_proxy(cfg)
    a = proxy.lanes["app"].servers[0]
    healthy["a"] = False
    loop = asyncio.get_running_loop()
    start = loop.time()
    while a.health_ok:
        assert loop.time() - start < 2, "not taken out within fall x interval (+ margin)"
        await asyncio.sleep(0.02)
    assert loop.time() - start <= 0.2 * 2 + 0.5
    before = a.requests
    for i in range(6):
        assert (await exchange(proxy.port, GET % b"h%d" % i))[0] == 200
    assert a.requests == before
    healthy["a"] = True
    while not a.health_ok:
        assert loop.time() - start < 5
        await asyncio.sleep(0.02)


async def test_client_abort_mid_response_closes_upstream(start_proxy, upstream):
    upstream_closed = asyncio.Event()

    async def streaming(reader, writer, up):
        await reader.read_request()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        try:
            while True:
                data = await asyncio.wait_for(reader.read(1), 2)
                if not data:
                    break
        except (ConnectionError, TimeoutError):
            pass
        upstream_closed.set()

    up = await upstream(streaming)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    writer.write(GET % b"stream")
    await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(1000)
    close_hard(writer)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.wait_for(upstream_closed.wait(), 3)
    assert loop.time() - start < 1.0


async def test_failures_are_counted_per_lane_and_server(start_proxy):
    dead = refused_port()
    proxy = await start_proxy(make_config([dead]))
    for i in range(3):
        status, _, body = await exchange(proxy.port, GET % b"f%d" % i)
        assert status == 502 and b"Connection refused" in body
    lane = proxy.lanes["app"]
    assert lane.failed == 3 and lane.servers[0].failures == 3 and lane.served == 3  # served: ended
