"""Audit 12: the lane contract (docs lanes.md "admission rules" / "what each lane shows"), black box.

Every probe goes through real sockets: conftest `start_proxy` (with the admin listener where
/metrics or /status is read), scripted upstreams whose answers the test releases one by one
(`Held`), raw clients. Small numbers (limit 2, queue 3, sub-second queue timeouts); every wait
is bounded. Findings are `xfail(strict=True)` tests asserting the documented behaviour.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import socket
import struct
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import is_closed, make_config, ok_response, read_response
from tests.conftest import open_tracked_client as open_client

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("close_tracked_clients")]

WAIT = 3.0
GET = b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n"


# -- helpers ----------------------------------------------------------------------------------------


class Held:
    """A scripted upstream: each request is recorded on arrival and answered only when released."""

    def __init__(self) -> None:
        self.order: list[bytes] = []  # request paths in arrival order
        self.bodies: dict[bytes, bytes] = {}
        self.by_port: dict[bytes, int] = {}  # path -> which upstream (its port) got it
        self.active = 0
        self.peak = 0
        self.released = 0  # answers allowed so far (in arrival order)
        self.everything = False
        self.changed = asyncio.Condition()

    def handler_for(self, port_of):
        async def handler(reader, writer, up) -> None:
            while True:
                head, _, body = await reader.read_request()
                path = head.split(b" ")[1]
                async with self.changed:
                    index = len(self.order)
                    self.order.append(path)
                    self.bodies[path] = body
                    self.by_port[path] = port_of()
                    self.active += 1
                    self.peak = max(self.peak, self.active)
                    self.changed.notify_all()
                    await self.changed.wait_for(lambda: self.everything or self.released > index)
                    self.active -= 1
                writer.write(ok_response(path))
                await writer.drain()

        return handler

    async def release(self, n: int = 1) -> None:
        async with self.changed:
            self.released += n
            self.changed.notify_all()

    async def release_all(self) -> None:
        async with self.changed:
            self.everything = True
            self.changed.notify_all()

    async def wait_arrivals(self, n: int, timeout: float = WAIT) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: len(self.order) >= n), timeout)


async def held_upstreams(upstream, held: Held, n: int = 1):
    ups = []
    for _ in range(n):
        box: list = []
        up = await upstream(held.handler_for(lambda box=box: box[0].port))
        box.append(up)
        ups.append(up)
    return ups


def lanes_cfg(slow_ports: list[int], fast_port: int, admin: bool = False, **slow) -> dict:
    cfg = make_config(
        {"slow": slow_ports, "fast": [fast_port]},
        routes=[{"prefix": "/tast", "lane": "slow"}, {"prefix": "/", "lane": "fast"}],
    )
    cfg["lanes"]["slow"].update(slow)
    if admin:
        cfg["admin"] = {"listen": "127.0.0.1:0"}
    return cfg


async def recv(reader: asyncio.StreamReader, method: bytes = b"GET", timeout: float = WAIT):
    return await asyncio.wait_for(read_response(reader, method), timeout)


async def until(predicate, timeout: float = WAIT, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"{what} not reached in {timeout}s"
        await asyncio.sleep(0.005)


async def send(port: int, request: bytes):
    reader, writer = await open_client(port)
    writer.write(request)
    return reader, writer


async def enqueue(proxy, lane: str, port: int, request: bytes):
    """Send one request on a new connection and wait until it is counted in the lane queue."""
    q = proxy.lanes[lane].queue
    before = len(q)
    client = await send(port, request)
    await until(lambda: len(q) == before + 1, what=f"queue length {before + 1}")
    return client


def reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def scrape_text(proxy) -> str:
    port = proxy.admin.addresses[0][1]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as s:
        async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
            assert r.status == 200
            return await r.text()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


async def metrics(proxy) -> dict[tuple[str, frozenset], float]:
    return samples(await scrape_text(proxy))


def val(m: dict, name: str, **labels: str) -> float:
    return m[(name, frozenset(labels.items()))]


# == 1. limit across servers, FIFO ===================================================================


async def test_limit_is_counted_across_the_lanes_servers(start_proxy, upstream):
    # lanes.md: `limit` = most exchanges in flight to the lane (across its servers).
    held = Held()
    ups = await held_upstreams(upstream, held, 2)
    fast = await upstream()
    proxy = await start_proxy(lanes_cfg([u.port for u in ups], fast.port, admin=True, limit=2, queue=3))
    clients = [await send(proxy.port, GET % b"/tast/%d" % i) for i in range(2)]
    await held.wait_arrivals(2)
    clients += [await enqueue(proxy, "slow", proxy.port, GET % b"/tast/%d" % i) for i in range(2, 5)]
    await asyncio.sleep(0.05)
    assert held.active == 2 and len(held.order) == 2
    assert {held.by_port[p] for p in held.order} == {u.port for u in ups}  # both servers, one each
    m = await metrics(proxy)
    assert val(m, "laneproxy_lane_in_flight", lane="slow") == 2
    assert val(m, "laneproxy_lane_queued", lane="slow") == 3
    assert val(m, "laneproxy_lane_limit", lane="slow") == 2
    for u in ups:
        server = f"127.0.0.1:{u.port}"
        assert val(m, "laneproxy_server_in_flight", lane="slow", server=server) == 1
        assert val(m, "laneproxy_pool_active_connections", lane="slow", server=server) == 1
    for i in range(5):  # one answer at a time: never more than 2 upstream at once
        await held.release()
        status, _, body = await recv(clients[i][0])
        assert (status, body) == (200, b"/tast/%d" % i)
    assert held.peak == 2


async def test_fifo_order_of_service_with_many_waiters(start_proxy, upstream):
    # lanes.md: queue order is FIFO while the lane keeps up (12 waiters, slots freed one by one).
    held = Held()
    [up] = await held_upstreams(upstream, held)
    fast = await upstream()
    proxy = await start_proxy(lanes_cfg([up.port], fast.port, limit=2, queue=12, queue_timeout="20s"))
    clients = [await send(proxy.port, GET % b"/tast/%02d" % i) for i in range(2)]
    await held.wait_arrivals(2)
    for i in range(2, 14):
        clients.append(await enqueue(proxy, "slow", proxy.port, GET % b"/tast/%02d" % i))
    for i in range(14):
        await held.release()
        status, _, body = await recv(clients[i][0])
        assert (status, body) == (200, b"/tast/%02d" % i)
    assert held.order == [b"/tast/%02d" % i for i in range(14)]
    assert held.peak == 2 and proxy.lanes["slow"].queue.overloaded is False


# == 2. refusals: full queue, queue 0, queue_timeout ==================================================


async def test_full_queue_503_is_immediate_and_the_connection_serves_the_next_request(start_proxy, upstream):
    # lanes.md + interface.md: full queue -> 503 at once, Retry-After whole seconds >= 1, connection stays.
    held = Held()
    [up] = await held_upstreams(upstream, held)
    fast = await upstream()
    proxy = await start_proxy(lanes_cfg([up.port], fast.port, limit=2, queue=3, queue_timeout="5s"))
    clients = [await send(proxy.port, GET % b"/tast/%d" % i) for i in range(2)]
    await held.wait_arrivals(2)
    clients += [await enqueue(proxy, "slow", proxy.port, GET % b"/tast/q%d" % i) for i in range(3)]
    reader, writer = await open_client(proxy.port)
    loop = asyncio.get_running_loop()
    t = loop.time()
    writer.write(GET % b"/tast/over")
    status, headers, body = await recv(reader)
    assert loop.time() - t < 0.2
    assert status == 503 and re.fullmatch(rb"[1-9][0-9]*", headers[b"retry-after"][0]), headers
    assert b"slow" in body and headers.get(b"connection") != [b"close"]
    await held.release(5)
    for r, _ in clients:
        assert (await recv(r))[0] == 200
    writer.write(GET % b"/tast/again")  # same connection, same lane, now with room
    await held.release()
    status, _, body = await recv(reader)
    assert (status, body) == (200, b"/tast/again")


async def test_queue_0_refuses_at_once_at_the_limit_across_two_servers(start_proxy, upstream):
    # lanes.md + interface.md: `queue: 0` -> 503 at once when the lane is at its limit (counted over its servers).
    held = Held()
    ups = await held_upstreams(upstream, held, 2)
    fast = await upstream()
    proxy = await start_proxy(lanes_cfg([u.port for u in ups], fast.port, limit=2, queue=0))
    clients = [await send(proxy.port, GET % b"/tast/%d" % i) for i in range(2)]
    await held.wait_arrivals(2)
    reader, writer = await open_client(proxy.port)
    loop = asyncio.get_running_loop()
    t = loop.time()
    writer.write(GET % b"/tast/third")
    status, headers, _ = await recv(reader)
    assert loop.time() - t < 0.2
    assert status == 503 and int(headers[b"retry-after"][0]) >= 1
    await held.release_all()
    for r, _ in clients:
        assert (await recv(r))[0] == 200
    writer.write(GET % b"/tast/now")  # the refused client's connection is still usable
    assert (await recv(reader))[0] == 200
    assert b"/tast/third" not in held.order


async def test_queue_timeout_503_comes_close_to_the_configured_time(start_proxy, upstream):
    # interface.md: queue_timeout -> 503 + Retry-After, connection kept; lanes.md: the upstream never sees it.
    held = Held()
    [up] = await held_upstreams(upstream, held)
    fast = await upstream()
    cfg = lanes_cfg([up.port], fast.port, limit=2, queue=3, queue_timeout="500ms", queue_target="5s")
    proxy = await start_proxy(cfg)
    clients = [await send(proxy.port, GET % b"/tast/%d" % i) for i in range(2)]
    await held.wait_arrivals(2)
    loop = asyncio.get_running_loop()
    t = loop.time()
    reader, writer = await send(proxy.port, GET % b"/tast/late")
    status, headers, body = await recv(reader)
    waited = loop.time() - t
    assert status == 503 and 0.5 <= waited < 0.65, waited
    assert re.fullmatch(rb"[1-9][0-9]*", headers[b"retry-after"][0]) and b"queue_timeout" in body
    assert proxy.lanes["slow"].queue.shed["timeout"] == 1
    await held.release_all()
    for r, _ in clients:
        assert (await recv(r))[0] == 200
    writer.write(GET % b"/tast/again")
    assert (await recv(reader))[0] == 200
    assert b"/tast/late" not in held.order


async def test_every_queue_timeout_shed_is_reported_as_a_timeout(start_proxy, upstream):
    # lanes.md: shed by reason; interface.md: queue_timeout passed -> 503. 20 waiters, no overload (target 5 s).
    held = Held()
    [up] = await held_upstreams(upstream, held)
    fast = await upstream()
    proxy = await start_proxy(
        lanes_cfg([up.port], fast.port, admin=True, limit=1, queue=20, queue_timeout="600ms", queue_target="5s")
    )
    first = await send(proxy.port, GET % b"/tast/first")
    await held.wait_arrivals(1)
    waiters = []
    for i in range(20):
        waiters.append(await enqueue(proxy, "slow", proxy.port, GET % b"/tast/w%d" % i))
        await asyncio.sleep(0.002)  # each waiter enqueued at its own millisecond
    bodies = [(await recv(r))[::2] for r, _ in waiters]
    await held.release_all()
    assert (await recv(first[0]))[0] == 200
    m = await metrics(proxy)
    assert all(status == 503 for status, _ in bodies)
    assert val(m, "laneproxy_lane_shed_total", lane="slow", reason="codel") == 0
    assert val(m, "laneproxy_lane_shed_total", lane="slow", reason="timeout") == 20
    assert [b for _, b in bodies if b"queue_timeout" not in b] == []


async def test_retry_after_follows_the_lanes_recent_throughput(start_proxy, upstream):
    # lanes.md: Retry-After (seconds) estimated from the lane's recent throughput: 4 ahead at ~3/s -> 2 s.
    async def third_of_a_second(reader, writer, up):
        while True:
            await reader.read_request()
            await asyncio.sleep(0.3)
            writer.write(ok_response(b"x"))
            await writer.drain()

    up = await upstream(third_of_a_second)
    fast = await upstream()
    proxy = await start_proxy(lanes_cfg([up.port], fast.port, limit=1, queue=3, queue_timeout="10s", queue_target="5s"))
    reader, writer = await open_client(proxy.port)
    for _ in range(3):  # the lane serves about 3 requests a second
        writer.write(GET % b"/tast/warm")
        assert (await recv(reader))[0] == 200
    await send(proxy.port, GET % b"/tast/busy")
    await until(lambda: proxy.lanes["slow"].in_flight == 1)
    for _ in range(3):
        await enqueue(proxy, "slow", proxy.port, GET % b"/tast/q")
    status, headers, body = await recv((await send(proxy.port, GET % b"/tast/over"))[0])
    assert status == 503 and int(headers[b"retry-after"][0]) in (2, 3), headers


async def test_full_queue_refuses_a_large_post_at_once_and_keeps_the_connection(start_proxy, upstream):
    # interface.md: 503 at once at the limit (queue 0); "the client connection stays open" (its body is skipped).
    held = Held()
    [up] = await held_upstreams(upstream, held)
    fast = await upstream()
    proxy = await start_proxy(lanes_cfg([up.port], fast.port, limit=1, queue=0))
    first = await send(proxy.port, GET % b"/tast/first")
    await held.wait_arrivals(1)
    body = os.urandom(300 * 1024)
    reader, writer = await open_client(proxy.port)
    writer.write(b"POST /tast/big HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    status, headers, _ = await recv(reader)
    assert status == 503 and int(headers[b"retry-after"][0]) >= 1
    writer.write(GET % b"/next")  # the body was read and dropped: the next request parses cleanly
    status, _, answer = await recv(reader)
    assert (status, answer) == (200, b"GET /next HTTP/1.1 body=0\n")
    await held.release_all()
    assert (await recv(first[0]))[0] == 200
    assert held.order == [b"/tast/first"]


# == 3. waiters whose client leaves ====================================================================


@pytest.mark.parametrize("how", ["fin", "rst", "half_close"])
async def test_get_waiter_that_leaves_frees_its_place_for_the_next_one(start_proxy, upstream, how):
    # README: a waiter whose client disconnects (FIN -- also a half-close after a complete request -- or
    # reset) leaves the queue at once and never reaches the upstream; its place goes to the next waiter.
    held = Held()
    [up] = await held_upstreams(upstream, held)
    fast = await upstream()
    proxy = await start_proxy(lanes_cfg([up.port], fast.port, limit=1, queue=1, queue_timeout="5s"))
    q = proxy.lanes["slow"].queue
    first = await send(proxy.port, GET % b"/tast/first")
    await held.wait_arrivals(1)
    reader, writer = await enqueue(proxy, "slow", proxy.port, GET % b"/tast/gone")
    {"fin": writer.close, "rst": lambda: reset(writer), "half_close": writer.write_eof}[how]()
    await until(lambda: len(q) == 0, timeout=1.0, what="the waiter leaving the queue")
    assert q.shed["client_gone"] == 1
    nxt = await enqueue(proxy, "slow", proxy.port, GET % b"/tast/next")  # the freed place, not a 503
    if how == "half_close":
        assert await is_closed(reader, 1.0)  # abandoned, as HAProxy's abortonclose: no answer
    await held.release_all()
    assert (await recv(first[0]))[0] == 200
    status, _, body = await recv(nxt[0])
    assert (status, body) == (200, b"/tast/next")
    assert held.order == [b"/tast/first", b"/tast/next"]


@pytest.mark.parametrize("how", ["fin", "rst", "half_close"])
async def test_post_waiter_that_leaves_frees_its_place_at_once(start_proxy, upstream, how):
    # lanes.md/README: a waiter whose client disconnects leaves the queue at once; its place goes to the next.
    held = Held()
    [up] = await held_upstreams(upstream, held)
    fast = await upstream()
    proxy = await start_proxy(lanes_cfg([up.port], fast.port, limit=1, queue=1, queue_timeout="5s"))
    q = proxy.lanes["slow"].queue
    first = await send(proxy.port, GET % b"/tast/first")
    await held.wait_arrivals(1)
    _, writer = await enqueue(
        proxy, "slow", proxy.port, b"POST /tast/gone HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
    )
    await asyncio.sleep(0.05)
    {"fin": writer.close, "rst": lambda: reset(writer), "half_close": writer.write_eof}[how]()
    try:
        await until(lambda: len(q) == 0, timeout=1.0, what="the waiter leaving the queue")
        assert q.shed["client_gone"] == 1
        reader, _ = await send(proxy.port, GET % b"/tast/next")
        await asyncio.sleep(0.1)
        assert q.shed["full"] == 0, "the newcomer got 503 queue full: the place of the gone waiter was kept"
    finally:
        await held.release_all()
    assert (await recv(first[0]))[0] == 200
    assert (await recv(reader))[::2] == (200, b"/tast/next")
    assert b"/tast/gone" not in held.order


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_waiter_with_a_pipelined_request_behind_it_that_leaves_never_reaches_upstream(start_proxy, upstream, how):
    # README: a waiter whose client disconnects (FIN or reset) leaves the queue at once and never reaches the upstream.
    held = Held()
    [up] = await held_upstreams(upstream, held)
    fast = await upstream()
    proxy = await start_proxy(lanes_cfg([up.port], fast.port, limit=1, queue=1, queue_timeout="5s"))
    lane = proxy.lanes["slow"]
    first = await send(proxy.port, GET % b"/tast/first")
    await held.wait_arrivals(1)
    _, writer = await enqueue(proxy, "slow", proxy.port, GET % b"/tast/gone" + GET % b"/tast/gone2")
    await asyncio.sleep(0.05)
    writer.close() if how == "fin" else reset(writer)
    await asyncio.sleep(0.2)
    await held.release_all()
    assert (await recv(first[0]))[0] == 200
    await until(lambda: lane.in_flight == 0 and len(lane.queue) == 0)
    await asyncio.sleep(0.1)
    assert held.order == [b"/tast/first"], held.order
    assert lane.queue.shed["client_gone"] == 1


async def test_in_flight_client_reset_hands_its_slot_to_the_next_waiter(start_proxy, upstream):
    # lanes.md: limit counts exchanges in flight; README: client abort closes the upstream at once -> slot freed.
    held = Held()
    [up] = await held_upstreams(upstream, held)
    fast = await upstream()
    proxy = await start_proxy(lanes_cfg([up.port], fast.port, limit=1, queue=3, queue_timeout="5s"))
    first = await send(proxy.port, GET % b"/tast/first")
    await held.wait_arrivals(1)
    waiter = await enqueue(proxy, "slow", proxy.port, GET % b"/tast/waiter")
    reset(first[1])
    await held.wait_arrivals(2, timeout=1.0)  # the waiter is upstream although /first was never answered
    await held.release_all()
    assert (await recv(waiter[0]))[::2] == (200, b"/tast/waiter")


# == 4. CoDel, deadlines, isolation ===================================================================


async def test_codel_serves_newest_first_and_sheds_waiters_older_than_twice_the_target(start_proxy, upstream):
    # lanes.md: in standing overload serve newest first, shed waiters older than 2 x target (503 naming why).
    held = Held()
    [up] = await held_upstreams(upstream, held)
    fast = await upstream()
    proxy = await start_proxy(
        lanes_cfg(
            [up.port],
            fast.port,
            admin=True,
            limit=1,
            queue=10,
            queue_timeout="10s",
            queue_target="200ms",
            queue_interval="400ms",
        )
    )
    loop = asyncio.get_running_loop()
    first = await send(proxy.port, GET % b"/tast/first")
    await held.wait_arrivals(1)
    t0 = loop.time()
    old = [await enqueue(proxy, "slow", proxy.port, GET % b"/tast/old%d" % i) for i in range(2)]
    await asyncio.sleep(0.25)
    young = [await enqueue(proxy, "slow", proxy.port, GET % b"/tast/young%d" % i) for i in range(2)]
    for r, _ in old:  # shed when the interval ends (0.4 s), each at 2 x target of waiting
        status, headers, body = await recv(r)
        assert status == 503 and int(headers[b"retry-after"][0]) >= 1 and b"overloaded" in body, body
    assert loop.time() - t0 < 0.55
    m = await metrics(proxy)
    assert val(m, "laneproxy_lane_overloaded", lane="slow") == 1
    assert val(m, "laneproxy_lane_shed_total", lane="slow", reason="codel") == 2
    assert val(m, "laneproxy_lane_queued", lane="slow") == 2
    await held.release()  # the younger waiters are served newest first
    await held.wait_arrivals(2)
    await held.release()
    await held.wait_arrivals(3)
    assert held.order == [b"/tast/first", b"/tast/young1", b"/tast/young0"]
    await held.release_all()
    for r, _ in [first, *young]:
        assert (await recv(r))[0] == 200
    # The queue emptied: overload is over, and FIFO is back.
    assert proxy.lanes["slow"].queue.overloaded is False
    held.everything = False
    held.released = len(held.order)
    busy = await send(proxy.port, GET % b"/tast/busy")
    await held.wait_arrivals(4)
    later = [await enqueue(proxy, "slow", proxy.port, GET % b"/tast/f%d" % i) for i in range(3)]
    await held.release_all()
    for r, _ in [busy, *later]:
        assert (await recv(r))[0] == 200
    assert held.order[3:] == [b"/tast/busy", b"/tast/f0", b"/tast/f1", b"/tast/f2"]


async def test_request_never_starts_upstream_after_its_deadline(start_proxy, upstream):
    # lanes.md: a request never starts upstream when its deadline (queue_timeout) has already passed.
    go = asyncio.Event()
    arrived = asyncio.Event()
    paths: list[bytes] = []

    async def handler(reader, writer, up):
        while True:
            head, _, _ = await reader.read_request()
            path = head.split(b" ")[1]
            paths.append(path)
            arrived.set()
            if path == b"/tast/first":
                await go.wait()
                writer.write(ok_response(path))
                time.sleep(0.5)  # the loop stalls: the slot comes free only after the waiter's deadline
            else:
                writer.write(ok_response(path))
            await writer.drain()

    up = await upstream(handler)
    fast = await upstream()
    proxy = await start_proxy(
        lanes_cfg([up.port], fast.port, limit=1, queue=3, queue_timeout="300ms", queue_target="5s")
    )
    first = await send(proxy.port, GET % b"/tast/first")
    await asyncio.wait_for(arrived.wait(), WAIT)
    waiter = await enqueue(proxy, "slow", proxy.port, GET % b"/tast/waiter")
    go.set()
    assert (await recv(first[0]))[0] == 200
    status, _, body = await recv(waiter[0])
    assert status == 503 and b"queue_timeout" in body
    await asyncio.sleep(0.05)
    assert paths == [b"/tast/first"]


async def test_fast_lane_answers_promptly_while_the_slow_lane_is_saturated_and_flooded(start_proxy, upstream):
    # lanes.md: one lane's load must not slow another lane (fast request < 100 ms, slow lane full + 503 flood).
    held = Held()
    [up] = await held_upstreams(upstream, held)
    fast = await upstream()
    proxy = await start_proxy(lanes_cfg([up.port], fast.port, limit=2, queue=3, queue_timeout="5s"))
    clients = [await send(proxy.port, GET % b"/tast/%d" % i) for i in range(2)]
    await held.wait_arrivals(2)
    clients += [await enqueue(proxy, "slow", proxy.port, GET % b"/tast/q%d" % i) for i in range(3)]
    stop = False
    refused = 0

    async def flood() -> None:
        nonlocal refused
        r, w = await open_client(proxy.port)
        while not stop:
            w.write(GET % b"/tast/flood")
            assert (await recv(r))[0] == 503
            refused += 1

    floods = [asyncio.ensure_future(flood()) for _ in range(4)]
    try:
        await until(lambda: refused >= 20)
        reader, writer = await open_client(proxy.port)
        loop = asyncio.get_running_loop()
        worst = 0.0
        for _ in range(20):
            t = loop.time()
            writer.write(GET % b"/fast")
            assert (await recv(reader))[0] == 200
            worst = max(worst, loop.time() - t)
        assert worst < 0.1, worst
    finally:
        stop = True
        await asyncio.wait_for(asyncio.gather(*floods), WAIT)
        await held.release_all()
    for r, _ in clients:
        assert (await recv(r))[0] == 200
    assert held.order.count(b"/tast/flood") == 0


# == 5. bodies and pipelining behind the queue ============================================================


async def test_queued_bodies_arrive_byte_exact_once_admitted(start_proxy, upstream):
    # lanes.md: a queued request is served when admitted; its body (Content-Length or chunked) is not lost.
    held = Held()
    [up] = await held_upstreams(upstream, held)
    fast = await upstream()
    proxy = await start_proxy(lanes_cfg([up.port], fast.port, limit=1, queue=3, queue_timeout="5s"))
    first = await send(proxy.port, GET % b"/tast/first")
    await held.wait_arrivals(1)
    body = os.urandom(300 * 1024)
    r1, w1 = await enqueue(
        proxy,
        "slow",
        proxy.port,
        b"POST /tast/cl HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:1000],
    )
    w1.write(body[1000:])  # the rest comes while it waits
    chunks = b"".join(
        b"%x\r\n%b\r\n" % (len(body[i : i + 7000]), body[i : i + 7000]) for i in range(0, len(body), 7000)
    )
    r2, _ = await enqueue(
        proxy,
        "slow",
        proxy.port,
        b"POST /tast/ch HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n",
    )
    await asyncio.sleep(0.1)
    await held.release_all()
    assert (await recv(first[0]))[0] == 200
    assert (await recv(r1))[::2] == (200, b"/tast/cl")
    assert (await recv(r2))[::2] == (200, b"/tast/ch")
    assert held.bodies[b"/tast/cl"] == body and held.bodies[b"/tast/ch"] == body


async def test_pipelined_requests_behind_a_queued_one_are_answered_in_order(start_proxy, upstream):
    # README: pipelined requests are answered in order; lanes.md: each passes the lane's admission in turn.
    held = Held()
    [up] = await held_upstreams(upstream, held)
    fast = await upstream()
    proxy = await start_proxy(
        lanes_cfg([up.port], fast.port, limit=1, queue=3, queue_timeout="500ms", queue_target="5s")
    )
    first = await send(proxy.port, GET % b"/tast/first")
    await held.wait_arrivals(1)
    reader, _ = await enqueue(
        proxy,
        "slow",
        proxy.port,
        GET % b"/tast/a" + b"POST /tast/b HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nxyz" + GET % b"/fast",
    )
    # /tast/a waits past queue_timeout: 503, then /tast/b takes its own turn, then the fast lane
    status, _, body = await recv(reader)
    assert status == 503 and b"queue_timeout" in body
    await held.wait_arrivals(1)
    await held.release_all()
    assert (await recv(first[0]))[0] == 200
    assert (await recv(reader))[::2] == (200, b"/tast/b")
    assert (await recv(reader))[::2] == (200, b"GET /fast HTTP/1.1 body=0\n")
    assert held.order == [b"/tast/first", b"/tast/b"] and held.bodies[b"/tast/b"] == b"xyz"


# == 6. what each lane shows: /metrics and /status =========================================================


def check_exposition(text: str) -> None:
    """A strict hand check of Prometheus text format 0.0.4: HELP/TYPE before each family's samples,
    counters end in _total, histograms have cumulative _bucket{le} ending at +Inf == _count, and _sum."""
    types: dict[str, str] = {}
    helps: set[str] = set()
    hist: dict[tuple[str, str], list[tuple[float, float]]] = {}
    counts: dict[tuple[str, str], float] = {}
    sums: set[tuple[str, str]] = set()
    sample = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? (\S+)')
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split(" ")[2])
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in helps and name not in types, line
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            types[name] = kind
            continue
        assert line and not line.startswith("#"), repr(line)
        match = sample.fullmatch(line)
        assert match, repr(line)
        name, labels, value = match.group(1), match.group(2) or "", float(match.group(3))
        family = next((f for f in (name, re.sub(r"_(bucket|sum|count|total|created)$", "", name)) if f in types), None)
        assert family is not None, f"sample before its TYPE: {line}"
        if types[family] == "counter":
            assert name.endswith(("_total", "_created")) and value >= 0, line
        if types[family] == "histogram":
            rest = re.sub(r',?le="[^"]*"', "", labels).replace("{,", "{")
            key = (family, rest)
            if name.endswith("_bucket"):
                le = re.search(r'le="([^"]*)"', labels)
                assert le, line
                hist.setdefault(key, []).append((float(le.group(1)), value))
            elif name.endswith("_count"):
                counts[key] = value
            else:
                assert name.endswith("_sum"), line
                sums.add(key)
    assert hist, "no histogram in the exposition"
    for key, buckets in hist.items():
        bounds = [b for b, _ in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf, (key, bounds)
        values = [v for _, v in buckets]
        assert values == sorted(values), (key, values)  # cumulative
        assert counts[key] == values[-1] and key in sums, key


async def test_metrics_follow_saturation_shedding_and_recovery(start_proxy, upstream):
    # lanes.md "what each lane shows": in flight, queued, limit, served, shed by reason, histograms, pool per server.
    held = Held()
    [up] = await held_upstreams(upstream, held)
    fast = await upstream()
    proxy = await start_proxy(
        lanes_cfg([up.port], fast.port, admin=True, limit=2, queue=3, queue_timeout="500ms", queue_target="5s")
    )
    server = f"127.0.0.1:{up.port}"
    clients = [await send(proxy.port, GET % b"/tast/%d" % i) for i in range(2)]
    await held.wait_arrivals(2)
    waiters = [await enqueue(proxy, "slow", proxy.port, GET % b"/tast/q%d" % i) for i in range(3)]
    assert (await recv((await send(proxy.port, GET % b"/tast/full"))[0]))[0] == 503
    text = await scrape_text(proxy)
    check_exposition(text)
    m = samples(text)
    assert [val(m, f"laneproxy_lane_{k}", lane="slow") for k in ("in_flight", "queued", "limit", "queue_size")] == [
        2,
        3,
        2,
        3,
    ]
    assert val(m, "laneproxy_lane_shed_total", lane="slow", reason="full") == 1
    assert val(m, "laneproxy_pool_active_connections", lane="slow", server=server) == 2
    assert val(m, "laneproxy_pool_idle_connections", lane="slow", server=server) == 0
    assert val(m, "laneproxy_server_in_flight", lane="slow", server=server) == 2
    assert val(m, "laneproxy_lane_served_total", lane="slow") == 0
    reset(waiters[0][1])  # one waiter leaves, the two others time out
    for r, _ in waiters[1:]:
        assert (await recv(r))[0] == 503
    m = await metrics(proxy)
    assert val(m, "laneproxy_lane_queued", lane="slow") == 0
    assert val(m, "laneproxy_lane_shed_total", lane="slow", reason="client_gone") == 1
    assert val(m, "laneproxy_lane_shed_total", lane="slow", reason="timeout") == 2
    # One waiter that is admitted after waiting, then everything answered.
    late = await enqueue(proxy, "slow", proxy.port, GET % b"/tast/late")
    await asyncio.sleep(0.05)
    await held.release_all()
    for r, _ in [*clients, late]:
        assert (await recv(r))[0] == 200
    await until(lambda: proxy.lanes["slow"].served == 3)
    text = await scrape_text(proxy)
    check_exposition(text)
    m = samples(text)
    assert val(m, "laneproxy_lane_in_flight", lane="slow") == 0
    assert val(m, "laneproxy_lane_served_total", lane="slow") == 3
    assert val(m, "laneproxy_pool_active_connections", lane="slow", server=server) == 0
    assert val(m, "laneproxy_pool_idle_connections", lane="slow", server=server) == 2
    assert val(m, "laneproxy_lane_queue_wait_seconds_count", lane="slow") == 3  # admissions
    assert val(m, "laneproxy_lane_queue_wait_seconds_sum", lane="slow") >= 0.04  # /tast/late waited
    assert val(m, "laneproxy_lane_queue_wait_seconds_bucket", lane="slow", le="0.001") == 2
    assert val(m, "laneproxy_lane_upstream_seconds_count", lane="slow") == 3
    assert val(m, "laneproxy_lane_upstream_seconds_bucket", lane="slow", le="+Inf") == 3
    assert val(m, "laneproxy_route_responses_total", lane="slow", route="/tast", **{"class": "5xx"}) == 3
    assert val(m, "laneproxy_route_responses_total", lane="slow", route="/tast", **{"class": "2xx"}) == 3


async def test_status_first_response_names_each_lane_with_its_numbers(start_proxy, upstream):
    # interface.md: GET /status, an HTML page whose first response already shows each lane by name.
    held = Held()
    [up] = await held_upstreams(upstream, held)
    fast = await upstream()
    proxy = await start_proxy(lanes_cfg([up.port], fast.port, admin=True, limit=2, queue=3, queue_timeout="5s"))
    clients = [await send(proxy.port, GET % b"/tast/%d" % i) for i in range(2)]
    await held.wait_arrivals(2)
    clients += [await enqueue(proxy, "slow", proxy.port, GET % b"/tast/q%d" % i) for i in range(3)]
    port = proxy.admin.addresses[0][1]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as s:
        async with s.get(f"http://127.0.0.1:{port}/status") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
            html = await r.text()
    page = html.split('<script id="snapshot"')[0]  # what shows before any script runs
    for name in ("slow", "fast"):
        assert f"<h2>{name}</h2>" in page
    card = page.split('data-lane="slow"')[1].split("</article>")[0]
    assert "<b>2<small> / 2</small></b>" in card and "<b>3<small> / 3</small></b>" in card, card[:600]
    assert f"127.0.0.1:{up.port}" in card
    await held.release_all()
    for r, _ in clients:
        assert (await recv(r))[0] == 200
