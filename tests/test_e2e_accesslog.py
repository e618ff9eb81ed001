"""Access log (issue 9): every field, JSON parseable, buffered and flushed, reopened for logrotate."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal

from tests.conftest import exchange, make_config
from tests.process import spawn_proxy, stop_proxy


async def test_json_lines_carry_every_field(start_proxy, upstream, tmp_path):
    up = await upstream()
    log = tmp_path / "access.log"
    proxy = await start_proxy(make_config(up.port, access_log=str(log), log_format="json"))
    await exchange(proxy.port, b"GET /a?b=1 HTTP/1.1\r\nHost: t\r\nUser-Agent: ua/1\r\nReferer: http://r/\r\n\r\n")
    await exchange(proxy.port, b"GET /x HTTP/1.1\r\n\r\n")  # no Host: laneproxy answers 400 itself
    proxy.ctx.access_log.flush()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 2
    ok, bad = lines
    assert ok["method"] == "GET" and ok["target"] == "/a?b=1" and ok["status"] == 200
    assert ok["client"] == "127.0.0.1" and ok["lane"] == "app" and ok["route"] == "/"
    assert ok["upstream"] == f"127.0.0.1:{up.port}" and ok["retries"] == 0 and ok["reason"] is None
    assert ok["user_agent"] == "ua/1" and ok["referer"] == "http://r/"
    assert ok["bytes"] > 0 and 0 <= ok["upstream_header_time"] <= ok["upstream_response_time"] <= ok["time"]
    assert ok["upstream_connect_time"] is not None and ok["queue_wait"] is not None
    for key in ("ts", "protocol"):
        assert key in ok
    assert bad["status"] == 400 and bad["upstream"] is None and "Host" in bad["reason"]


async def test_combined_format_and_timer_flush(start_proxy, upstream, tmp_path):
    up = await upstream()
    log = tmp_path / "access.log"
    proxy = await start_proxy(make_config(up.port, access_log=str(log)))
    await exchange(proxy.port, b"GET /c HTTP/1.1\r\nHost: t\r\n\r\n")
    for _ in range(300):  # flushed by the 1 s timer, without any call from the test
        if log.exists() and log.stat().st_size:
            break
        await asyncio.sleep(0.01)
    line = log.read_text()
    assert re.match(
        r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "GET /c HTTP/1\.1" 200 \d+ "-" "-" '
        r"rt=\d+\.\d{3} lane=app route=/ up=127\.0\.0\.1:\d+ uct=\d+\.\d{3} uht=\d+\.\d{3} urt=\d+\.\d{3} "
        r"qw=\d+\.\d{3} retries=0\n$",
        line,
    ), line


async def test_sigusr1_reopens_the_file(upstream, tmp_path):
    up = await upstream()
    log = tmp_path / "access.log"
    proc, port = await spawn_proxy(tmp_path, make_config(up.port, access_log=str(log), log_format="json"))
    try:
        await exchange(port, b"GET /before HTTP/1.1\r\nHost: t\r\n\r\n")
        rotated = tmp_path / "access.log.1"
        for _ in range(300):
            if log.exists() and log.stat().st_size:
                break
            await asyncio.sleep(0.01)
        os.rename(log, rotated)  # what logrotate does, then it signals
        proc.send_signal(signal.SIGUSR1)
        for _ in range(300):
            if log.exists():
                break
            await asyncio.sleep(0.01)
        await exchange(port, b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n")
    finally:
        assert await stop_proxy(proc) == 0  # stop flushes what is buffered
    assert [json.loads(x)["target"] for x in rotated.read_text().splitlines()] == ["/before"]
    assert [json.loads(x)["target"] for x in log.read_text().splitlines()] == ["/after"]
