"""WebSocket echo upstream and ping-pong client for the `websocket` scenario (aiohttp on both ends).

    python bench/wsload.py serve  --port P
    python bench/wsload.py client --url ws://127.0.0.1:8080/ws --connections 32 --duration 10 --out F.json

`serve` echoes every text or binary message on `/ws`. `client` opens `--connections` WebSockets,
then each sends a `--size`-byte text message, waits for its echo, and repeats until `--duration`
has passed. The JSON written to `--out`: round trips, payload bytes (both ways), measured seconds,
failed handshakes, broken connections, and round-trip latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

READY = "wsload echo ready"


async def serve(port: int) -> None:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    async def plain(request: web.Request) -> web.Response:
        return web.Response(text="websocket echo on /ws\n")

    app = web.Application()
    app.router.add_get("/ws", echo)
    app.router.add_get("/{tail:.*}", plain)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    print(f"{READY} on 127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


async def client(url: str, connections: int, duration: float, size: int) -> dict[str, object]:
    payload = "x" * size
    samples: list[float] = []
    failed_handshakes = broken = 0
    async with aiohttp.ClientSession() as session:
        sockets = []
        for _ in range(connections):
            try:
                sockets.append(await session.ws_connect(url, autoping=False, max_msg_size=0))
            except (aiohttp.ClientError, OSError):
                failed_handshakes += 1
        started = time.monotonic()
        stop_at = started + duration

        async def pingpong(ws: aiohttp.ClientWebSocketResponse) -> None:
            nonlocal broken
            try:
                while (now := time.monotonic()) < stop_at:
                    await ws.send_str(payload)
                    msg = await ws.receive(timeout=5)
                    if msg.type != aiohttp.WSMsgType.TEXT or len(msg.data) != size:
                        broken += 1
                        return
                    samples.append(time.monotonic() - now)
            except (aiohttp.ClientError, OSError, TimeoutError):
                broken += 1

        await asyncio.gather(*(pingpong(ws) for ws in sockets))
        elapsed = time.monotonic() - started
        for ws in sockets:
            await ws.close()
    samples.sort()

    def pct(q: float) -> float:
        return 1000 * samples[min(len(samples) - 1, int(q / 100 * len(samples)))] if samples else 0.0

    return {
        "round_trips": len(samples), "bytes": 2 * size * len(samples), "duration_s": elapsed,
        "failed_handshakes": failed_handshakes, "broken": broken,
        "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "max_ms": 1000 * samples[-1] if samples else 0.0,
        "mean_ms": 1000 * sum(samples) / len(samples) if samples else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("serve", "client"))
    parser.add_argument("--port", type=int)
    parser.add_argument("--url")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=64, help="bytes per message")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.mode == "serve":
        asyncio.run(serve(args.port))
        return 0
    result = asyncio.run(client(args.url, args.connections, args.duration, args.size))
    text = json.dumps(result)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
