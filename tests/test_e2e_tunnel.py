"""WebSocket and other Upgrade tunnels, and streaming responses (issue 8), through real sockets.

The upstream is aiohttp's WebSocket server and the client is the `websockets` library, so both
ends are real implementations; raw sockets are used where exact bytes and timing matter.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct

import aiohttp
import pytest
from aiohttp import web
from websockets.asyncio.client import connect

from tests.conftest import make_config, open_client, read_response
from tests.process import rss_bytes, spawn_proxy, stop_proxy

MiB = 1024 * 1024


@pytest.fixture
async def ws_upstream():
    """An aiohttp app: /ws echoes every message; /plain answers 200; /sse streams events."""
    runners = []

    async def start(sse_events: asyncio.Queue | None = None) -> int:
        async def ws(request: web.Request) -> web.StreamResponse:
            socket = web.WebSocketResponse()
            await socket.prepare(request)
            async for msg in socket:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await socket.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await socket.send_bytes(msg.data)
            return socket

        async def plain(request: web.Request) -> web.Response:
            return web.Response(text=f"plain {request.path} upgrade={request.headers.get('Upgrade')}")

        async def sse(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            while True:
                event = await sse_events.get()
                if event is None:
                    break
                await resp.write(event)
            return resp

        app = web.Application()
        app.router.add_get("/ws", ws)
        app.router.add_get("/sse", sse)
        app.router.add_route("*", "/{tail:.*}", plain)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return site._server.sockets[0].getsockname()[1]

    yield start
    for runner in runners:
        await runner.cleanup()


# A WebSocket server's 101 (RFC 6455 §4.2.2: with the accept field, or it is a failed handshake).
SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


def ws_handshake(path: bytes = b"/ws", extra: bytes = b"") -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n%b\r\n" % (path, key, extra)
    )


def ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A masked client frame (RFC 6455 §5.2)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


async def read_ws_frame(reader: asyncio.StreamReader) -> bytes:
    """An unmasked server frame's payload."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    return await reader.readexactly(n)


async def test_websocket_echo_large_and_interleaved_frames(start_proxy, ws_upstream):
    port = await ws_upstream()
    proxy = await start_proxy(make_config(port))
    async with connect(f"ws://127.0.0.1:{proxy.port}/ws", max_size=None) as ws:
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 5) == "hello"
        big = os.urandom(48 * 1024)
        await ws.send(big)
        assert await asyncio.wait_for(ws.recv(), 5) == big
        frames = [os.urandom(200_000) if i % 2 else f"small {i}" for i in range(10)]
        for frame in frames:
            await ws.send(frame)
        for frame in frames:
            assert await asyncio.wait_for(ws.recv(), 5) == frame
    assert proxy.ctx.tunnels in (0, 1)


async def test_frame_pipelined_with_the_handshake_is_delivered(start_proxy, ws_upstream):
    port = await ws_upstream()
    proxy = await start_proxy(make_config(port))
    reader, writer = await open_client(proxy.port)
    writer.write(ws_handshake() + ws_frame(b"early bird"))
    status, headers, _ = await asyncio.wait_for(read_response(reader), 5)
    assert status == 101 and headers[b"upgrade"] == [b"websocket"]
    assert await asyncio.wait_for(read_ws_frame(reader), 5) == b"early bird"
    writer.close()


async def test_upstream_frame_sent_with_its_101_is_delivered(start_proxy, upstream):
    async def eager(reader, writer, up):
        await reader.read_request()
        writer.write(
            SWITCHED
            + b"\x81\x05first"
        )
        await writer.drain()
        data = await reader.read(100)
        writer.write(b"\x81\x03" + data[-3:])  # proves the tunnel carries bytes upstream too
        await writer.drain()
        await reader.read()

    up = await upstream(eager)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    writer.write(ws_handshake())
    status, _, _ = await asyncio.wait_for(read_response(reader), 5)
    assert status == 101
    assert await asyncio.wait_for(read_ws_frame(reader), 5) == b"first"
    writer.write(b"raw")
    assert await asyncio.wait_for(read_ws_frame(reader), 5) == b"raw"
    writer.close()


@pytest.mark.parametrize("refusal", [b"426 Upgrade Required", b"200 OK"])
async def test_refused_upgrade_keeps_http_and_routes_what_follows(start_proxy, upstream, refusal):
    async def refuse(reader, writer, up):
        while True:
            head, _, _ = await reader.read_request()
            line = head.split(b"\r\n", 1)[0]
            if b"/ws" in line:
                writer.write(b"HTTP/1.1 %s\r\nContent-Length: 7\r\n\r\nrefused" % refusal)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(line), line))
            await writer.drain()

    up = await upstream(refuse)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    # The "frame" after the handshake is really a second HTTP request: smuggling attempt.
    writer.write(ws_handshake() + b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
    status, _, body = await asyncio.wait_for(read_response(reader), 5)
    assert status == int(refusal[:3]) and body == b"refused"
    status, _, body = await asyncio.wait_for(read_response(reader), 5)
    assert (status, body) == (200, b"GET /next HTTP/1.1")
    seen = bytes(up.received[0])
    assert seen.count(b"GET /next HTTP/1.1\r\n") == 1 and b"X-Real-IP" in seen.split(b"GET /next")[1]
    writer.close()


async def test_unrequested_101_is_a_502(start_proxy, upstream):
    async def switcher(reader, writer, up):
        await reader.read_request()
        writer.write(SWITCHED)
        await writer.drain()
        await reader.read()

    up = await upstream(switcher)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET /plain HTTP/1.1\r\nHost: t\r\n\r\n")
    status, _, _ = await asyncio.wait_for(read_response(reader), 5)
    assert status == 502
    writer.close()


async def test_101_to_another_protocol_is_a_502(start_proxy, upstream):
    async def switcher(reader, writer, up):
        await reader.read_request()
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")
        await writer.drain()
        await reader.read()

    up = await upstream(switcher)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    writer.write(ws_handshake())
    status, _, _ = await asyncio.wait_for(read_response(reader), 5)
    assert status == 502
    writer.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        b"GET /x HTTP/1.0\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: ircx\r\n\r\n",
    ],
    ids=["h2c", "http10", "not-allowed"],
)
async def test_upgrades_the_lane_does_not_tunnel_are_plain_requests(start_proxy, ws_upstream, request_bytes):
    port = await ws_upstream()
    proxy = await start_proxy(make_config(port))
    reader, writer = await open_client(proxy.port)
    writer.write(request_bytes)
    status, _, body = await asyncio.wait_for(read_response(reader), 5)
    assert status == 200 and body == b"plain /x upgrade=None"
    writer.close()


async def test_half_close_is_propagated_and_pending_data_delivered(start_proxy, upstream):
    async def half(reader, writer, up):
        await reader.read_request()
        writer.write(SWITCHED)
        await writer.drain()
        got = await reader.read()  # until the client's FIN arrives through the proxy
        writer.write(b"got:" + got)
        await writer.drain()
        writer.close()

    up = await upstream(half)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    writer.write(ws_handshake())
    assert (await asyncio.wait_for(read_response(reader), 5))[0] == 101
    writer.write(b"abc")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"got:abc"
    writer.close()


async def test_tunnel_idle_timeout_closes_both_sides(start_proxy, ws_upstream):
    port = await ws_upstream()
    proxy = await start_proxy(make_config(port, lane={"tunnel_idle_timeout": "300ms"}))
    async with connect(f"ws://127.0.0.1:{proxy.port}/ws") as ws:
        await ws.send("x")
        assert await ws.recv() == "x"
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert loop.time() - start < 2
    assert proxy.ctx.tunnels == 0


async def test_limit_streams_false_frees_the_lane_slot(start_proxy, ws_upstream):
    port = await ws_upstream()
    proxy = await start_proxy(make_config(port, lane={"limit_streams": False}))
    lane = proxy.lanes["app"]
    async with connect(f"ws://127.0.0.1:{proxy.port}/ws") as ws:
        await ws.send("x")
        assert await ws.recv() == "x"
        assert lane.in_flight == 0 and proxy.ctx.tunnels == 1
    proxy2 = await start_proxy(make_config(port))
    async with connect(f"ws://127.0.0.1:{proxy2.port}/ws") as ws:
        await ws.send("x")
        assert await ws.recv() == "x"
        assert proxy2.lanes["app"].in_flight == 1  # default: a tunnel holds its slot


async def test_sse_events_arrive_as_sent(start_proxy, ws_upstream):
    events: asyncio.Queue = asyncio.Queue()
    port = await ws_upstream(events)
    proxy = await start_proxy(make_config(port))
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET /sse HTTP/1.1\r\nHost: t\r\n\r\n")
    await events.put(b"data: 0\n\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b"text/event-stream" in head
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(reader.readuntil(b"data: 0\n\n"), 5)
    for i in range(1, 6):
        sent = loop.time()
        await events.put(b"data: %d\n\n" % i)
        await asyncio.wait_for(reader.readuntil(b"data: %d\n\n" % i), 5)
        assert loop.time() - sent < 0.05
    await events.put(None)
    writer.close()


@pytest.mark.timeout(60)
async def test_tunnel_flood_to_non_reading_client_bounds_memory(tmp_path, upstream):
    chunk = b"z" * MiB

    async def flood(reader, writer, up):
        await reader.read_request()
        writer.write(SWITCHED)
        for _ in range(100):
            writer.write(chunk)
            await writer.drain()  # blocks while laneproxy stops reading from us
        writer.close()

    up = await upstream(flood)
    proc, port = await spawn_proxy(tmp_path, make_config(up.port))
    try:
        base = rss_bytes(proc.pid)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=MiB)
        writer.write(ws_handshake())
        assert (await asyncio.wait_for(read_response(reader), 5))[0] == 101
        await asyncio.sleep(1.0)  # not reading: the flood must stop at the proxy's watermark
        peak = rss_bytes(proc.pid)
        got = 0
        while got < 100 * MiB:
            data = await asyncio.wait_for(reader.read(MiB), 10)
            assert data
            got += len(data)
            if got % (16 * MiB) < MiB:
                peak = max(peak, rss_bytes(proc.pid))
        assert got == 100 * MiB
        assert peak - base < 16 * MiB, f"proxy RSS grew by {(peak - base) / MiB:.1f} MiB"
        writer.close()
    finally:
        assert await stop_proxy(proc) == 0


async def test_bytes_after_an_upgrade_head_naming_chunked_are_still_held(start_proxy, upstream):
    """A handshake whose head mentions "chunked" takes the chunk-guard path; what follows it must
    still wait for the 101 and then be tunnelled, never parsed as HTTP."""

    async def switch(reader, writer, up):
        await reader.read_request()
        writer.write(SWITCHED)
        await writer.drain()
        data = await reader.read(100)
        writer.write(b"tunnel got " + data)
        await writer.drain()
        await reader.read()

    up = await upstream(switch)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    early = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
    writer.write(ws_handshake(extra=b"X-Note: chunked\r\n") + early)
    assert (await asyncio.wait_for(read_response(reader), 5))[0] == 101
    assert await asyncio.wait_for(reader.readexactly(len(b"tunnel got ") + len(early)), 5) == b"tunnel got " + early
    assert bytes(up.received[0]).count(b"GET /smuggled") == 1 and up.connections == 1
    writer.close()
