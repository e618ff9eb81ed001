"""Shared fixtures: a proxy started in the test's loop, scripted upstreams, raw clients."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from laneproxy.config import parse_config
from laneproxy.server import Proxy
from tests.helpers import fix_date

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None


def pytest_asyncio_loop_factories(config, item):
    """Run the suite on uvloop, as laneproxy runs in production."""
    return {"uvloop": uvloop.new_event_loop} if uvloop is not None else None


def make_config(upstream_ports: dict[str, list[int]] | list[int] | int, routes=None, **overrides: Any):
    """A config dict: lanes from {name: [ports]} (or one lane 'app'), routes default to '/'."""
    if isinstance(upstream_ports, int):
        upstream_ports = [upstream_ports]
    if isinstance(upstream_ports, list):
        upstream_ports = {"app": upstream_ports}
    lanes = {
        name: {"servers": [f"127.0.0.1:{p}" for p in ports]} for name, ports in upstream_ports.items()
    }
    cfg: dict[str, Any] = {
        "version": 1,
        "listen": "127.0.0.1:0",
        "lanes": lanes,
        "routes": routes or [{"prefix": "/", "lane": next(iter(lanes))}],
    }
    for key, value in overrides.items():
        if key == "lane":  # settings for every lane
            for lane in cfg["lanes"].values():
                lane.update(value)
        else:
            cfg[key] = value
    return cfg


@pytest.fixture
async def start_proxy() -> AsyncIterator[Callable[[dict], Awaitable[Proxy]]]:
    """`proxy = await start_proxy(cfg_dict)`; stopped (drain 0.5 s) after the test."""
    import yaml

    proxies: list[Proxy] = []

    async def start(cfg: dict) -> Proxy:
        config = parse_config(yaml.safe_dump(copy.deepcopy(cfg)))
        proxy = Proxy(config)
        await proxy.start()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        await proxy.stop(drain_timeout=0.5)


class Upstream:
    """A scripted upstream: `handler(reader, writer, upstream)` runs per accepted connection.

    `received` collects every byte each connection sent (one bytes object per connection,
    in accept order), so tests assert exactly what laneproxy forwarded.
    """

    def __init__(self, handler: Callable[..., Awaitable[None]]) -> None:
        self.handler = handler
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.connections = 0
        self.received: list[bytearray] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Upstream:
        self.server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        buf = bytearray()
        self.received.append(buf)
        self.writers.append(writer)
        recording = RecordingReader(reader, buf)
        try:
            await self.handler(recording, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in self.writers:
                w.close()
            await self.server.wait_closed()


class RecordingReader:
    """A StreamReader wrapper that records what it returns."""

    def __init__(self, reader: asyncio.StreamReader, buf: bytearray) -> None:
        self._reader = reader
        self._buf = buf

    async def read(self, n: int = -1) -> bytes:
        data = await self._reader.read(n)
        self._buf += data
        return data

    async def readuntil(self, sep: bytes = b"\n") -> bytes:
        data = await self._reader.readuntil(sep)
        self._buf += data
        return data

    async def readexactly(self, n: int) -> bytes:
        data = await self._reader.readexactly(n)
        self._buf += data
        return data

    async def read_request(self) -> tuple[bytes, dict[bytes, list[bytes]], bytes]:
        """One request: (head, {lower-name: [values]}, body) using its CL/chunked framing."""
        head = await self.readuntil(b"\r\n\r\n")
        headers: dict[bytes, list[bytes]] = {}
        for line in head.split(b"\r\n")[1:]:
            if line:
                name, _, value = line.partition(b":")
                headers.setdefault(name.strip().lower(), []).append(value.strip())
        body = b""
        if b"content-length" in headers:
            body = await self.readexactly(int(headers[b"content-length"][0]))
        elif headers.get(b"transfer-encoding") == [b"chunked"]:
            parts = []
            while True:
                size = int((await self.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while (await self.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    break
                parts.append(await self.readexactly(size))
                await self.readexactly(2)
            body = b"".join(parts)
        return head, headers, body


def ok_response(body: bytes = b"hello world\n", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)


async def keepalive_handler(reader: RecordingReader, writer: asyncio.StreamWriter, up: Upstream) -> None:
    """Answer every request with 200 and a body naming the request line; keep the connection."""
    while True:
        try:
            head, _, body = await reader.read_request()
        except asyncio.IncompleteReadError:
            return
        line = head.split(b"\r\n", 1)[0]
        writer.write(ok_response(line + b" body=%d\n" % len(body)))
        await writer.drain()


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    """`up = await upstream(handler)` (default: keep-alive 200 answers)."""
    started: list[Upstream] = []

    async def start(handler: Callable[..., Awaitable[None]] = keepalive_handler) -> Upstream:
        up = await Upstream(handler).start()
        started.append(up)
        return up

    yield start
    for up in started:
        await up.close()


async def read_response(reader: asyncio.StreamReader, method: bytes = b"GET") -> tuple[int, dict, bytes]:
    """Read one response: (status, {lower-name: [values]}, body), by its own framing."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    if method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
        return status, headers, b""
    if b"content-length" in headers:
        return status, headers, await reader.readexactly(int(headers[b"content-length"][0]))
    if headers.get(b"transfer-encoding") == [b"chunked"]:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return status, headers, b"".join(parts)
    return status, headers, await reader.read()


async def open_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


_TRACKED: list[asyncio.StreamWriter] = []


def track_writer(writer: asyncio.StreamWriter) -> None:
    """Close `writer` when the test ends (fixture `close_tracked_clients`), pass or fail."""
    _TRACKED.append(writer)


async def open_tracked_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await open_client(port)
    track_writer(writer)
    return reader, writer


@pytest.fixture
async def close_tracked_clients() -> AsyncIterator[None]:
    """Close every client connection a test opened, also when an assertion stopped it early."""
    yield
    while _TRACKED:
        w = _TRACKED.pop()
        w.close()
        try:
            await asyncio.wait_for(w.wait_closed(), 1)
        except Exception:
            pass


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = 3.0) -> tuple[bytes, bool]:
    """Everything until EOF or reset: (bytes, reset?). Fails the test if neither comes in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    data = bytearray()
    while True:
        left = deadline - loop.time()
        assert left > 0, f"connection still open after {timeout}s; got {bytes(data[:300])!r}"
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except TimeoutError:
            raise AssertionError(f"connection still open after {timeout}s; got {bytes(data[:300])!r}") from None
        except ConnectionError:
            return bytes(data), True
        if not chunk:
            return bytes(data), False
        data += chunk


async def exchange(port: int, request: bytes, method: bytes = b"GET") -> tuple[int, dict, bytes]:
    """Send one raw request on a fresh connection and read one response."""
    reader, writer = await open_client(port)
    try:
        writer.write(request)
        return await read_response(reader, method)
    finally:
        writer.close()


async def is_closed(reader: asyncio.StreamReader, timeout: float = 2.0) -> bool:
    """True when the peer closed the connection (EOF or reset) within `timeout`."""
    try:
        data = await asyncio.wait_for(reader.read(1), timeout)
    except ConnectionError:
        return True
    except TimeoutError:
        return False
    return data == b""


@pytest.fixture
async def make_pair():
    """`make_pair(**ProxyPair options)`: a protocol-tier pair on the running loop, torn down after."""
    from tests.helpers import ProxyPair

    loop = asyncio.get_running_loop()
    pairs = []

    def make(**kwargs):
        pair = ProxyPair(loop, **kwargs)
        pairs.append(pair)
        return pair

    yield make
    for pair in pairs:
        pair.close()


@pytest.fixture
async def pair(make_pair):
    return make_pair()


@pytest.fixture
def fixed_date(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Date laneproxy adds to a response without one, fixed (helpers.dated builds it)."""
    fix_date(monkeypatch)
