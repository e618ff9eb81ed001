"""HTTP/1.1 load clients for the isolation benchmark: an open-loop generator and a closed-loop flood.

    python bench/openloop.py open  --port P --path /small --rate 500 --duration 8 --out F.json
    python bench/openloop.py flood --port P --path /tast/sleep --clients 200 --duration 12 --out F.json

- `open` starts request i at t0 + i/rate whatever the answers do (wrk2-style, not wrk's closed
  loop), over a pool of keep-alive connections (a new one when every pooled one is busy).
- `flood` runs `--clients` loops of: request, read the answer, repeat at once, each on its own
  keep-alive connection, the clients joining evenly over the first second; after a 503 with
  `Retry-After` a loop first waits that long, as an HTTP client with retries does (urllib3's
  default), unless `--ignore-retry-after`.
- Either way a request not answered within `--timeout` seconds is abandoned: its connection is
  closed (the only way an HTTP/1.1 client can give up) and the next request opens a new one.

Every request carries `X-Bench-Id: <tag><n>`. The JSON written to `--out` holds `records`, one
`[id, start, end, status, body]` per request (times from `time.monotonic()`, CLOCK_MONOTONIC, the clock
`bench/slowpool.py` logs with; `end` of an abandoned request is when it was abandoned) and, for
`open`, `lag`: how late the generator started each request against its schedule (seconds).
status: the HTTP status; 0 abandoned after --timeout; -1 connection error; -2 still in flight when
the run ended (cut, counted nowhere). body: the first 160 bytes of a non-200 answer's body.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import cast

import httptools

ABANDONED, ERROR, CUT = 0, -1, -2


class Client(asyncio.Protocol):
    """One keep-alive connection, one request at a time; the answer's body is read and dropped."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[int] | None = None
        self.keep_alive = True
        self.closed = False
        self.body = b""  # the start of a non-200 answer's body: the proxy's reason
        self.retry_after: float | None = None  # the answer's Retry-After (delay-seconds), if any

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)
            self.close()

    def on_message_begin(self) -> None:
        self.body = b""
        self.retry_after = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after" and value.strip().isdigit():
            self.retry_after = float(value.strip())

    def on_body(self, body: bytes) -> None:
        if len(self.body) < 160 and self.parser.get_status_code() != 200:
            self.body += body[:160]

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("closed by the peer"))

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def send(self, raw: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Requester:
    """Requests to one host:port over a pool of idle keep-alive connections."""

    def __init__(self, host: str, port: int, path: str, tag: str, timeout: float, stop_at: float) -> None:
        self.host, self.port, self.tag = host, port, tag
        self.timeout, self.stop_at = timeout, stop_at
        self.template = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nX-Bench-Id: %s\r\n\r\n"
        self.idle: list[Client] = []
        self.records: list[tuple[str, float, float, int, str]] = []
        self.count = 0
        self.retry_after: float | None = None  # Retry-After of the last answer

    async def _client(self) -> Client:
        while self.idle:
            client = self.idle.pop()
            if not client.closed:
                return client
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(Client, self.host, self.port)
        return client

    async def one(self, start: float) -> int:
        self.count += 1
        bench_id = f"{self.tag}{self.count}"
        deadline = min(start + self.timeout, self.stop_at)
        client: Client | None = None
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                client = await self._client()
                status = await client.send((self.template % bench_id).encode())
        except TimeoutError:
            status = ABANDONED if start + self.timeout <= self.stop_at else CUT
        except (OSError, httptools.HttpParserError):
            status = ERROR
        end = time.monotonic()
        if client is not None:
            if status > 0 and client.keep_alive and not client.closed:
                self.idle.append(client)
            else:
                client.close()
        self.retry_after = client.retry_after if client is not None and status > 0 else None
        reason = client.body.decode("latin-1") if client is not None and status > 0 and status != 200 else ""
        self.records.append((bench_id, start, end, status, reason))
        return status


async def open_loop(req: Requester, rate: float, duration: float) -> list[float]:
    """Start request i at t0 + i/rate; returns each start's lateness against that schedule."""
    t0 = time.monotonic() + 0.05
    lags: list[float] = []
    tasks: set[asyncio.Task[int]] = set()
    for i in range(int(rate * duration)):
        scheduled = t0 + i / rate
        delay = scheduled - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        now = time.monotonic()
        lags.append(now - scheduled)
        task = asyncio.create_task(req.one(now))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    return lags


FLOOD_JOIN_S = 1.0  # flood clients start spread over this (not in one instant: no lockstep)


async def flood(req: Requester, clients: int, honour_retry_after: bool = True) -> None:
    """`clients` loops of request, answer, repeat, joining evenly over FLOOD_JOIN_S. A 503 with
    Retry-After makes a loop wait that long first (as urllib3's Retry does by default for 413, 429
    and 503) unless `honour_retry_after` is off; any other answer, 502 and 504 too, is followed at once."""

    async def loop(r: Requester, join_after: float) -> None:
        await asyncio.sleep(join_after)
        while time.monotonic() < r.stop_at:
            status = await r.one(time.monotonic())
            if status == ERROR:
                await asyncio.sleep(0.01)  # refused or reset: do not spin
            elif status == 503 and honour_retry_after and r.retry_after:
                await asyncio.sleep(max(0.0, min(r.retry_after, r.stop_at - time.monotonic())))

    # one Requester per client (its own connection), sharing the records list and the id counter space
    loops = []
    for n in range(clients):
        r = Requester(req.host, req.port, "", f"{req.tag}{n}-", req.timeout, req.stop_at)
        r.template, r.records = req.template, req.records
        loops.append(loop(r, n / clients * FLOOD_JOIN_S))
    await asyncio.gather(*loops)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("open", "flood"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--rate", type=float, default=500.0, help="open: requests per second")
    parser.add_argument("--clients", type=int, default=200, help="flood: concurrent loops")
    parser.add_argument("--duration", type=float, required=True, help="seconds")
    parser.add_argument("--timeout", type=float, default=3.0, help="abandon a request after this")
    parser.add_argument("--tag", default="r", help="X-Bench-Id prefix")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ignore-retry-after", action="store_true",
                        help="flood: loop at once after a 503 too (default: wait its Retry-After)")
    parser.add_argument("--realtime", action="store_true",
                        help="SCHED_FIFO: other load on the same core (the flood) cannot delay this client")
    args = parser.parse_args()
    if args.realtime:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
        except OSError as exc:
            print(f"openloop: no real-time priority ({exc}); measuring at normal priority", file=sys.stderr)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    stop_at = time.monotonic() + args.duration + (args.timeout if args.mode == "open" else 0.0)
    req = Requester(args.host, args.port, args.path, args.tag, args.timeout, stop_at)
    lags: list[float] = []
    if args.mode == "open":
        lags = asyncio.run(open_loop(req, args.rate, args.duration))
    else:
        asyncio.run(flood(req, args.clients, honour_retry_after=not args.ignore_retry_after))
    args.out.write_text(json.dumps({"records": req.records, "lag": lags}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
