"""Slow clients (issue 4): 2,000 slowloris connections must not stop normal requests.

A bounded loopback script: the proxy runs as its own process; the test opens 2,000 connections
that trickle a request head a few bytes at a time, and meanwhile measures normal requests.
"""

from __future__ import annotations

import asyncio
import resource

import pytest

from tests.conftest import make_config, open_client, read_response
from tests.process import spawn_proxy, stop_proxy

SLOW = int(__import__("os").environ.get("SLOWLORIS", "2000"))
pytestmark = pytest.mark.timeout(90)


@pytest.fixture(autouse=True)
def enough_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < SLOW + 500:
        pytest.skip(f"needs {SLOW + 500} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_slowloris_does_not_stop_normal_requests(tmp_path, upstream):
    up = await upstream()
    cfg = make_config(up.port, client={"header_timeout": "3s", "keepalive_requests": 1000000})
    proc, port = await spawn_proxy(tmp_path, cfg)
    writers: list[asyncio.StreamWriter] = []
    stop = asyncio.Event()
    try:
        for i in range(0, SLOW, 200):  # open them in batches so the backlog (511) keeps up
            batch = await asyncio.gather(*(open_client(port) for _ in range(200)))
            for _, writer in batch:
                writer.write(b"GET /slow HTTP/1.1\r\n")
                writers.append(writer)

        async def trickle() -> None:
            n = 0
            while not stop.is_set():
                for writer in writers:
                    if not writer.is_closing():
                        writer.write(b"X-%d: y\r\n" % n)  # never finishes the head
                n += 1
                await asyncio.sleep(0.2)

        trickler = asyncio.ensure_future(trickle())
        loop = asyncio.get_running_loop()
        reader, writer = await open_client(port)
        latencies = []
        for i in range(200):
            started = loop.time()
            writer.write(b"GET /normal/%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
            status, _, _ = await asyncio.wait_for(read_response(reader), 5)
            latencies.append(loop.time() - started)
            assert status == 200
            await asyncio.sleep(0.005)
        writer.close()
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        assert p99 < 0.1, f"p99 {p99 * 1000:.1f} ms with {SLOW} slowloris connections"
        # The header deadline covers the whole head: a trickling connection gets 408, then closes.
        stop.set()
        await trickler
        probe = writers[0]._protocol._stream_reader  # type: ignore[attr-defined]
        data = await asyncio.wait_for(probe.read(), 10)
        assert data.startswith(b"HTTP/1.1 408 ")
    finally:
        stop.set()
        for writer in writers:
            writer.close()
        assert await stop_proxy(proc) == 0
