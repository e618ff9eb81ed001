"""Backpressure crosses the proxy: memory stays bounded when one side is slow.

The proxy runs as its own process (`python -m laneproxy run`) so its RSS can be read from /proc
without counting the test's own buffers.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.conftest import make_config, read_response
from tests.process import rss_bytes, spawn_proxy, stop_proxy

MiB = 1024 * 1024
TOTAL = 100 * MiB


@pytest.mark.timeout(60)
async def test_slow_client_bounds_memory_of_100mib_response(tmp_path, upstream):
    chunk = b"x" * MiB

    async def big(reader, writer, up):
        await reader.read_request()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % TOTAL)
        for _ in range(TOTAL // MiB):
            writer.write(chunk)
            await writer.drain()  # blocks while laneproxy stops reading from us

    up = await upstream(big)
    proc, port = await spawn_proxy(tmp_path, make_config(up.port))
    try:
        base = rss_bytes(proc.pid)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=256 * 1024)
        writer.write(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"Content-Length: %d" % TOTAL in head
        got, peak = 0, base
        while got < TOTAL:
            data = await reader.read(256 * 1024)
            assert data, "proxy closed early"
            got += len(data)
            if got % (8 * MiB) < 256 * 1024:
                peak = max(peak, rss_bytes(proc.pid))
                await asyncio.sleep(0.05)  # a slow reader: the proxy must stop reading upstream
        assert got == TOTAL
        growth = peak - base
        assert growth < 16 * MiB, f"proxy RSS grew by {growth / MiB:.1f} MiB"
        writer.close()
    finally:
        assert await stop_proxy(proc) == 0


@pytest.mark.timeout(60)
async def test_slow_upstream_bounds_memory_of_100mib_upload(tmp_path, upstream):
    async def slow_reader(reader, writer, up):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        got = 0
        while got < length:
            data = await reader._reader.read(256 * 1024)  # not recorded: 100 MiB
            if not data:
                return
            got += len(data)
            if got % (8 * MiB) < 256 * 1024:
                up.samples.append(got)
                await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(got)), got))
        await writer.drain()

    up = await upstream(slow_reader)
    up.samples = []
    cfg = make_config(up.port, lane={"max_body": 0})
    proc, port = await spawn_proxy(tmp_path, cfg)
    try:
        base = rss_bytes(proc.pid)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % TOTAL)
        chunk = b"y" * MiB
        peak = base
        for i in range(TOTAL // MiB):
            writer.write(chunk)
            await writer.drain()  # blocks while laneproxy stops reading from us
            if i % 8 == 0:
                peak = max(peak, rss_bytes(proc.pid))
        status, _, body = await read_response(reader)
        assert status == 200 and body == str(TOTAL).encode()
        growth = peak - base
        assert growth < 16 * MiB, f"proxy RSS grew by {growth / MiB:.1f} MiB"
        writer.close()
    finally:
        assert await stop_proxy(proc) == 0
