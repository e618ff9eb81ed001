"""Hot reload (issue 9): validated first, unchanged lanes keep their pools, nothing is dropped."""

from __future__ import annotations

import asyncio
import signal

import pytest
import yaml

from laneproxy.config import ConfigError, load_config
from laneproxy.server import Proxy
from tests.conftest import exchange, make_config, open_client, read_response
from tests.process import spawn_proxy, stop_proxy

GET = b"GET /%s HTTP/1.1\r\nHost: t\r\n\r\n"


async def started(tmp_path, cfg: dict) -> Proxy:
    path = tmp_path / "laneproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proxy = Proxy(load_config(path))
    await proxy.start()
    return proxy


def rewrite(tmp_path, cfg: dict) -> None:
    (tmp_path / "laneproxy.yaml").write_text(yaml.safe_dump(cfg))


async def test_unchanged_lane_keeps_its_pool_and_changed_lane_moves(tmp_path, upstream):
    a, b, c = await upstream(), await upstream(), await upstream()
    cfg = make_config({"one": [a.port], "two": [b.port]},
                      routes=[{"prefix": "/one", "lane": "one"}, {"prefix": "/", "lane": "two"}])
    proxy = await started(tmp_path, cfg)
    try:
        assert (await exchange(proxy.port, GET % b"one/1"))[0] == 200
        assert (await exchange(proxy.port, GET % b"two/1"))[0] == 200
        lane_one = proxy.lanes["one"]
        cfg["lanes"]["two"]["servers"] = [f"127.0.0.1:{c.port}"]  # lane two changes server
        rewrite(tmp_path, cfg)
        summary = await proxy.reload()
        assert summary["kept"] == ["one"] and summary["changed"] == ["two"]
        assert proxy.lanes["one"] is lane_one
        assert (await exchange(proxy.port, GET % b"one/2"))[0] == 200
        status, _, body = await exchange(proxy.port, GET % b"two/2")
        assert status == 200 and body.startswith(b"GET /two/2 ")
        assert a.connections == 1  # the same upstream connection before and after the reload
        assert bytes(a.received[0]).count(b"GET /one/") == 2
        assert c.connections == 1 and b"GET /two/2" in bytes(c.received[0])
        assert b"GET /two/2" not in b"".join(bytes(r) for r in b.received)
    finally:
        await proxy.stop(0.5)


async def test_invalid_reload_leaves_the_old_config_running(tmp_path, upstream):
    up = await upstream()
    cfg = make_config(up.port)
    proxy = await started(tmp_path, cfg)
    try:
        (tmp_path / "laneproxy.yaml").write_text("version: 1\nlanes: {}\nbogus: 1\n")
        with pytest.raises(ConfigError) as exc:
            await proxy.reload()
        assert "bogus: unknown key" in exc.value.problems
        assert (await exchange(proxy.port, GET % b"still"))[0] == 200
    finally:
        await proxy.stop(0.5)


async def test_changed_lane_finishes_in_flight_work_on_old_settings(tmp_path, upstream):
    release = asyncio.Event()

    async def slow(reader, writer, up):
        await reader.read_request()
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nold")
        await writer.drain()
        await reader.read()

    old_up, new_up = await upstream(slow), await upstream()
    cfg = make_config(old_up.port)
    proxy = await started(tmp_path, cfg)
    try:
        reader, writer = await open_client(proxy.port)
        writer.write(GET % b"inflight")
        while not old_up.received or not old_up.received[0]:
            await asyncio.sleep(0.01)
        old_lane = proxy.lanes["app"]
        cfg["lanes"]["app"]["servers"] = [f"127.0.0.1:{new_up.port}"]
        rewrite(tmp_path, cfg)
        await proxy.reload()
        assert proxy.retired == [old_lane]
        assert (await exchange(proxy.port, GET % b"new"))[2].startswith(b"GET /new ")
        release.set()
        status, _, body = await asyncio.wait_for(read_response(reader), 5)
        assert (status, body) == (200, b"old")  # the open connection was not dropped
        writer.write(GET % b"same-connection")  # and keeps working on the new config
        status, _, body = await asyncio.wait_for(read_response(reader), 5)
        assert body.startswith(b"GET /same-connection ")
        for _ in range(100):
            if not proxy.retired:
                break
            await asyncio.sleep(0.05)
        assert proxy.retired == []
        writer.close()
    finally:
        await proxy.stop(0.5)


async def test_listeners_added_and_removed(tmp_path, upstream):
    import socket

    up = await upstream()
    ports = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
        s.close()
    cfg = make_config(up.port, listen=[f"127.0.0.1:{ports[0]}"])
    proxy = await started(tmp_path, cfg)
    try:
        cfg["listen"] = [f"127.0.0.1:{ports[1]}"]
        rewrite(tmp_path, cfg)
        summary = await proxy.reload()
        assert summary["listeners_added"] == [f"127.0.0.1:{ports[1]}"]
        assert (await exchange(ports[1], GET % b"new-port"))[0] == 200
        with pytest.raises(OSError):
            await asyncio.wait_for(open_client(ports[0]), 2)
    finally:
        await proxy.stop(0.5)


@pytest.mark.timeout(60)
async def test_ten_reloads_under_load_fail_no_request(tmp_path, upstream):
    up = await upstream()
    path_cfg = make_config({"app": [up.port], "other": [up.port]},
                           routes=[{"prefix": "/", "lane": "app"}, {"prefix": "/o", "lane": "other"}],
                           access_log=str(tmp_path / "access.log"), client={"keepalive_requests": 1000000})
    proc, port = await spawn_proxy(tmp_path, path_cfg)
    statuses: list[int] = []
    stop = asyncio.Event()

    async def client() -> None:
        reader, writer = await open_client(port)
        try:
            i = 0
            while not stop.is_set():
                writer.write(GET % (b"o/%d" % i if i % 2 else b"a/%d" % i))
                statuses.append((await asyncio.wait_for(read_response(reader), 5))[0])
                i += 1
        finally:
            writer.close()

    try:
        clients = [asyncio.ensure_future(client()) for _ in range(16)]
        for i in range(10):
            await asyncio.sleep(0.15)
            path_cfg["lanes"]["other"]["read_timeout"] = f"{30 + i}s"  # a changed lane each time
            (tmp_path / "laneproxy.yaml").write_text(yaml.safe_dump(path_cfg))
            proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*clients)
    finally:
        assert await stop_proxy(proc) == 0
    log = (tmp_path / "proxy.log").read_text()
    assert log.count("reloaded:") == 10, log[-2000:]
    assert len(statuses) > 200 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
