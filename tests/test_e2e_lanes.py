"""Lane admission (issue 6) through real sockets: limit, queue, 503 + Retry-After, isolation."""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.conftest import exchange, make_config, ok_response, open_client, read_response

GET = b"GET /%s HTTP/1.1\r\nHost: t\r\n\r\n"


class Gate:
    """An upstream whose answers wait for the test: tracks concurrency and arrival order."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.active = 0
        self.peak = 0
        self.order: list[bytes] = []
        self.arrived = asyncio.Condition()

    async def handler(self, reader, writer, up) -> None:
        while True:
            head, _, _ = await reader.read_request()
            path = head.split(b" ")[1]
            self.active += 1
            self.peak = max(self.peak, self.active)
            async with self.arrived:
                self.order.append(path)
                self.arrived.notify_all()
            await self.open.wait()
            self.active -= 1
            writer.write(ok_response(path))
            await writer.drain()

    async def wait_arrivals(self, n: int) -> None:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.order) >= n), 5)


def lanes_config(slow_port: int, fast_port: int, **slow: object) -> dict:
    cfg = make_config(
        {"slow": [slow_port], "fast": [fast_port]},
        routes=[{"prefix": "/tast", "lane": "slow"}, {"prefix": "/", "lane": "fast"}],
    )
    cfg["lanes"]["slow"].update(slow)
    return cfg


async def send(port: int, path: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await open_client(port)
    writer.write(GET % path)
    return reader, writer


async def test_limit_respected_and_queue_served_in_order(start_proxy, upstream):
    gate = Gate()
    slow = await upstream(gate.handler)
    fast = await upstream()
    proxy = await start_proxy(lanes_config(slow.port, fast.port, limit=2, queue=10))
    clients = [await send(proxy.port, b"tast/%d" % i) for i in range(6)]
    await gate.wait_arrivals(2)
    lane = proxy.lanes["slow"]
    assert gate.active == 2 and len(lane.queue) == 4
    gate.open.set()
    for i, (reader, writer) in enumerate(clients):
        status, _, body = await asyncio.wait_for(read_response(reader), 5)
        assert (status, body) == (200, b"/tast/%d" % i)
        writer.close()
    assert gate.peak == 2
    assert gate.order == [b"/tast/%d" % i for i in range(6)]  # FIFO
    assert lane.in_flight == 0 and len(lane.queue) == 0


async def test_full_queue_answers_503_at_once_with_retry_after(start_proxy, upstream):
    gate = Gate()
    slow = await upstream(gate.handler)
    fast = await upstream()
    proxy = await start_proxy(lanes_config(slow.port, fast.port, limit=1, queue=1))
    first = await send(proxy.port, b"tast/1")
    await gate.wait_arrivals(1)
    second = await send(proxy.port, b"tast/2")  # waits in the queue
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await open_client(proxy.port)
    writer.write(GET % b"tast/3")
    status, headers, body = await asyncio.wait_for(read_response(reader), 5)
    assert loop.time() - started < 0.5
    assert status == 503 and int(headers[b"retry-after"][0]) >= 1
    assert b"slow" in body
    writer.write(GET % b"other")  # the connection stays open and usable
    status, _, body = await asyncio.wait_for(read_response(reader), 5)
    assert status == 200 and body.startswith(b"GET /other ")
    gate.open.set()
    for r, w in (first, second):
        assert (await asyncio.wait_for(read_response(r), 5))[0] == 200
        w.close()
    writer.close()
    assert proxy.lanes["slow"].queue.shed["full"] == 1


async def test_queue_0_means_503_at_the_limit(start_proxy, upstream):
    gate = Gate()
    slow = await upstream(gate.handler)
    fast = await upstream()
    proxy = await start_proxy(lanes_config(slow.port, fast.port, limit=1, queue=0))
    first = await send(proxy.port, b"tast/1")
    await gate.wait_arrivals(1)
    status, headers, _ = await exchange(proxy.port, GET % b"tast/2")
    assert status == 503 and b"retry-after" in headers
    gate.open.set()
    assert (await asyncio.wait_for(read_response(first[0]), 5))[0] == 200
    first[1].close()


async def test_queue_timeout_answers_503(start_proxy, upstream):
    gate = Gate()
    slow = await upstream(gate.handler)
    fast = await upstream()
    cfg = lanes_config(slow.port, fast.port, limit=1, queue=5, queue_timeout="300ms", queue_target="5s")
    proxy = await start_proxy(cfg)
    first = await send(proxy.port, b"tast/1")
    await gate.wait_arrivals(1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, headers, body = await exchange(proxy.port, GET % b"tast/2")
    waited = loop.time() - started
    assert status == 503 and 0.25 < waited < 1.5
    assert re.fullmatch(rb"[1-9][0-9]*", headers[b"retry-after"][0])
    assert gate.order == [b"/tast/1"]  # the upstream never saw the one that timed out
    gate.open.set()
    assert (await asyncio.wait_for(read_response(first[0]), 5))[0] == 200
    first[1].close()


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_client_leaving_the_queue_is_never_sent_upstream(start_proxy, upstream, how):
    import socket
    import struct

    gate = Gate()
    slow = await upstream(gate.handler)
    fast = await upstream()
    proxy = await start_proxy(lanes_config(slow.port, fast.port, limit=1, queue=5))
    lane = proxy.lanes["slow"]
    first = await send(proxy.port, b"tast/1")
    await gate.wait_arrivals(1)
    reader, writer = await send(proxy.port, b"tast/gone")
    for _ in range(200):
        if len(lane.queue) == 1:
            break
        await asyncio.sleep(0.01)
    assert len(lane.queue) == 1
    if how == "rst":
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.close()
    for _ in range(200):
        if len(lane.queue) == 0:
            break
        await asyncio.sleep(0.01)
    assert len(lane.queue) == 0 and lane.queue.shed["client_gone"] == 1
    gate.open.set()
    assert (await asyncio.wait_for(read_response(first[0]), 5))[0] == 200
    first[1].close()
    assert (await exchange(proxy.port, GET % b"tast/after"))[0] == 200
    assert b"/tast/gone" not in gate.order


async def test_priority_route_is_served_first(start_proxy, upstream):
    gate = Gate()
    slow = await upstream(gate.handler)
    fast = await upstream()
    cfg = lanes_config(slow.port, fast.port, limit=1, queue=10, queue_timeout="30s")
    cfg["routes"].insert(0, {"prefix": "/tast/vip", "lane": "slow", "priority": "high"})
    proxy = await start_proxy(cfg)
    first = await send(proxy.port, b"tast/first")
    await gate.wait_arrivals(1)
    lane = proxy.lanes["slow"]
    clients = []
    for path in (b"tast/a", b"tast/b", b"tast/vip"):
        clients.append(await send(proxy.port, path))
        while len(lane.queue) < len(clients):
            await asyncio.sleep(0.005)
    gate.open.set()
    for reader, writer in [first, *clients]:
        assert (await asyncio.wait_for(read_response(reader), 5))[0] == 200
        writer.close()
    assert gate.order == [b"/tast/first", b"/tast/vip", b"/tast/a", b"/tast/b"]


@pytest.mark.timeout(30)
async def test_flooded_lane_does_not_slow_the_other_lane(start_proxy, upstream):
    async def slow_pool(reader, writer, up):
        while True:
            await reader.read_request()
            await asyncio.sleep(0.2)  # a 200 ms endpoint
            writer.write(ok_response(b"slow"))
            await writer.drain()

    slow = await upstream(slow_pool)
    fast = await upstream()
    proxy = await start_proxy(lanes_config(slow.port, fast.port, limit=8, queue=50, queue_timeout="1s"))
    loop = asyncio.get_running_loop()

    async def timed_fast() -> float:
        t = loop.time()
        status, _, _ = await exchange(proxy.port, GET % b"fast")
        assert status == 200
        return loop.time() - t

    alone = sorted([await timed_fast() for _ in range(30)])
    flood = [asyncio.ensure_future(exchange(proxy.port, GET % b"tast/x")) for _ in range(200)]
    await asyncio.sleep(0.1)
    during = sorted([await timed_fast() for _ in range(30)])
    results = await asyncio.gather(*flood)
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 503}
    assert statuses.count(503) > 0 and statuses.count(200) >= 8
    p90_alone, p90_during = alone[26], during[26]
    assert p90_during < max(5 * p90_alone, 0.05), (p90_alone, p90_during)
    assert proxy.lanes["slow"].in_flight == 0
