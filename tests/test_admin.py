"""Admin listener (issue 9): /metrics counters match the traffic sent, /api/status, /status, reload, token.

Each test runs a real Proxy (conftest `start_proxy`) with scripted upstreams, sends requests
through real sockets, then reads the admin app with pytest-aiohttp's `aiohttp_client`. The last
test drives Debian's chromium over the DevTools protocol (skipped where chromium is missing).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import subprocess

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from laneproxy import admin
from laneproxy.admin import build_admin_app, start_admin
from laneproxy.admin_page import quantile
from laneproxy.config import ConfigError
from laneproxy.server import Proxy
from tests.conftest import exchange, make_config, ok_response, open_client, read_response

GET = b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n"


def scrape(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample as {(sample name, frozenset(labels.items())): value}, via prometheus-client's parser."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def until(predicate, timeout: float = 3.0) -> None:
    """The proxy counts an exchange when it ends, which may be just after the client read it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def metrics(client) -> dict:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    return scrape(await resp.text())


class Gate:
    """An upstream whose answers wait until the test opens the gate."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.arrived = 0

    async def handler(self, reader, writer, up) -> None:
        while True:
            head, _, _ = await reader.read_request()
            self.arrived += 1
            await self.open.wait()
            writer.write(ok_response(head.split(b" ")[1]))
            await writer.drain()


def two_lanes(app_ports: list[int], other_port: int, **overrides) -> dict:
    return make_config(
        {"app": app_ports, "other": [other_port]},
        routes=[{"prefix": "/api/", "lane": "app"}, {"prefix": "/other", "lane": "other", "priority": "low"}],
        **overrides,
    )


# -- /metrics -----------------------------------------------------------------------------------


async def test_metrics_counters_match_requests_sent(start_proxy, upstream, aiohttp_client):
    a, b, other = await upstream(), await upstream(), await upstream()
    proxy = await start_proxy(two_lanes([a.port, b.port], other.port))
    client = await aiohttp_client(build_admin_app(proxy))
    n = 7
    for i in range(n):
        status, _, _ = await exchange(proxy.port, GET % b"/api/%d" % i)
        assert status == 200
    assert (await exchange(proxy.port, GET % b"/other/x"))[0] == 200
    assert (await exchange(proxy.port, GET % b"/nowhere"))[0] == 404  # no route: a local answer
    await until(lambda: proxy.lanes["app"].served == n and proxy.lanes["other"].served == 1)

    m = await metrics(client)
    assert value(m, "laneproxy_requests_total") == n + 2
    assert value(m, "laneproxy_local_responses_total", status="404") == 1
    assert value(m, "laneproxy_route_responses_total", lane="app", route="/api/", **{"class": "2xx"}) == n
    assert value(m, "laneproxy_route_responses_total", lane="app", route="/api/", **{"class": "5xx"}) == 0
    assert value(m, "laneproxy_route_responses_total", lane="other", route="/other", **{"class": "2xx"}) == 1
    assert value(m, "laneproxy_lane_served_total", lane="app") == n
    servers = {f"127.0.0.1:{up.port}": up for up in (a, b)}
    per_server = {s: value(m, "laneproxy_server_requests_total", lane="app", server=s) for s in servers}
    assert sum(per_server.values()) == n and all(per_server.values())  # round robin used both
    for s in servers:
        assert value(m, "laneproxy_server_up", lane="app", server=s) == 1
        assert value(m, "laneproxy_server_failures_total", lane="app", server=s) == 0
        assert value(m, "laneproxy_server_in_flight", lane="app", server=s) == 0
        created = value(m, "laneproxy_pool_connections_created_total", lane="app", server=s)
        reused = value(m, "laneproxy_pool_connections_reused_total", lane="app", server=s)
        assert created + reused == per_server[s]
        assert value(m, "laneproxy_pool_idle_connections", lane="app", server=s) == created  # kept alive
        assert value(m, "laneproxy_pool_active_connections", lane="app", server=s) == 0
    # The upstream-time histogram: cumulative buckets ending in +Inf == count == exchanges.
    buckets = sorted(
        (float(dict(labels)["le"]), v) for (name, labels), v in m.items()
        if name == "laneproxy_lane_upstream_seconds_bucket" and dict(labels)["lane"] == "app"
    )
    assert buckets[-1] == (float("inf"), n)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert value(m, "laneproxy_lane_upstream_seconds_count", lane="app") == n
    assert value(m, "laneproxy_lane_upstream_seconds_sum", lane="app") >= 0  # loop.time() ticks in ms
    assert value(m, "laneproxy_lane_limit", lane="app") == 0
    assert value(m, "laneproxy_tunnels") == 0
    assert value(m, "laneproxy_rejected_connections_total") == 0
    assert ("laneproxy_process_resident_memory_bytes", frozenset()) in m


async def test_metrics_for_a_limited_lane_queue_and_shed(start_proxy, upstream, aiohttp_client):
    gate = Gate()
    up = await upstream(gate.handler)
    proxy = await start_proxy(make_config(up.port, lane={"limit": 1, "queue": 5}))
    client = await aiohttp_client(build_admin_app(proxy))
    server = f"127.0.0.1:{up.port}"
    clients = []
    for i in range(6):  # one in flight, five waiting
        reader, writer = await open_client(proxy.port)
        writer.write(GET % b"/q/%d" % i)
        clients.append((reader, writer))
        if i == 0:
            await until(lambda: gate.arrived == 1)
    await until(lambda: len(proxy.lanes["app"].queue) == 5)
    status, headers, _ = await exchange(proxy.port, GET % b"/q/full")
    assert status == 503 and b"retry-after" in headers

    m = await metrics(client)
    assert value(m, "laneproxy_lane_limit", lane="app") == 1
    assert value(m, "laneproxy_lane_in_flight", lane="app") == 1
    assert value(m, "laneproxy_lane_queued", lane="app") == 5
    assert value(m, "laneproxy_lane_queue_size", lane="app") == 5
    assert value(m, "laneproxy_lane_overloaded", lane="app") in (0, 1)
    assert value(m, "laneproxy_lane_shed_total", lane="app", reason="full") == 1
    for reason in ("timeout", "codel", "client_gone"):
        assert value(m, "laneproxy_lane_shed_total", lane="app", reason=reason) == 0
    assert value(m, "laneproxy_server_in_flight", lane="app", server=server) == 1
    assert value(m, "laneproxy_route_responses_total", lane="app", route="/", **{"class": "5xx"}) == 1
    status = await (await client.get("/api/status")).json()
    lane = status["lanes"][0]
    assert (lane["in_flight"], lane["limit"], lane["queued"], lane["queue_size"]) == (1, 1, 5, 5)
    assert lane["shed"]["full"] == 1

    gate.open.set()
    for reader, writer in clients:
        assert (await asyncio.wait_for(read_response(reader), 5))[0] == 200
        writer.close()
    await until(lambda: proxy.lanes["app"].served == 6)
    m = await metrics(client)
    assert value(m, "laneproxy_lane_queued", lane="app") == 0
    assert value(m, "laneproxy_lane_in_flight", lane="app") == 0
    assert value(m, "laneproxy_lane_served_total", lane="app") == 6
    assert value(m, "laneproxy_route_responses_total", lane="app", route="/", **{"class": "2xx"}) == 6
    assert value(m, "laneproxy_lane_queue_wait_seconds_count", lane="app") == 6  # the 503 never got a slot
    assert value(m, "laneproxy_lane_queue_wait_seconds_bucket", lane="app", le="+Inf") == 6
    assert value(m, "laneproxy_lane_queue_wait_seconds_sum", lane="app") > 0
    assert value(m, "laneproxy_server_requests_total", lane="app", server=server) == 6


# -- /api/status and /status --------------------------------------------------------------------


async def test_api_status_snapshot(start_proxy, upstream, aiohttp_client):
    a, other = await upstream(), await upstream()
    proxy = await start_proxy(two_lanes([a.port], other.port, lane={"limit": 4, "queue": 8}))
    client = await aiohttp_client(build_admin_app(proxy))
    for _ in range(3):
        assert (await exchange(proxy.port, GET % b"/api/x"))[0] == 200
    await until(lambda: proxy.lanes["app"].served == 3)
    resp = await client.get("/api/status")
    assert resp.status == 200 and resp.content_type == "application/json"
    snap = await resp.json()
    assert isinstance(snap["time"], float)
    assert snap["requests"] == 3 and snap["connections"] >= 0 and snap["tunnels"] == 0
    lanes = {lane["name"]: lane for lane in snap["lanes"]}
    assert set(lanes) == {"app", "other"}
    app = lanes["app"]
    assert (app["limit"], app["queue_size"], app["served"], app["in_flight"], app["queued"]) == (4, 8, 3, 0, 0)
    assert app["shed"] == {"full": 0, "timeout": 0, "codel": 0, "client_gone": 0, "stopping": 0}
    assert app["upstream_time"]["count"] == 3 and len(app["upstream_time"]["buckets"]) == len(
        app["upstream_time"]["bounds"]) + 1
    [server] = app["servers"]
    assert server["name"] == f"127.0.0.1:{a.port}"
    assert (server["state"], server["up"], server["requests"]) == ("up", True, 3)
    assert server["pool"]["idle"] == 1
    routes = {r["prefix"]: r for r in snap["routes"]}
    assert routes["/api/"]["lane"] == "app" and routes["/api/"]["responses"]["2xx"] == 3
    assert routes["/other"]["priority"] == "low"


async def test_status_page_is_self_contained_and_names_every_lane(start_proxy, upstream, aiohttp_client):
    a, other = await upstream(), await upstream()
    proxy = await start_proxy(two_lanes([a.port], other.port))
    assert (await exchange(proxy.port, GET % b"/api/x"))[0] == 200
    client = await aiohttp_client(build_admin_app(proxy))
    resp = await client.get("/status")
    assert resp.status == 200 and resp.content_type == "text/html"
    assert "connect-src 'self'" in resp.headers["Content-Security-Policy"]
    html = await resp.text()
    for lane in ("app", "other"):
        assert f'data-lane="{lane}"' in html and f"<h2>{lane}</h2>" in html
    assert f"127.0.0.1:{a.port}" in html and "<code>/api/</code>" in html  # servers and routes, first paint
    assert "http://" not in html and "https://" not in html and "//" + "cdn" not in html
    assert not re.search(r"<script[^>]*\bsrc=", html) and "<link" not in html and "@import" not in html
    assert 'fetch("api/status"' in html
    # The embedded snapshot the script starts from is valid JSON.
    data = re.search(r'<script id="snapshot" type="application/json">(.*?)</script>', html, re.S)
    assert data and json.loads(data.group(1))["lanes"][0]["name"] in ("app", "other")


async def test_status_page_escapes_names(start_proxy, upstream, aiohttp_client):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, routes=[{"prefix": "/<b>&", "lane": "app"}]))
    client = await aiohttp_client(build_admin_app(proxy))
    html = await (await client.get("/status")).text()
    assert "<code>/&lt;b&gt;&amp;</code>" in html
    assert "/<b>&" not in html.split('<script id="snapshot"')[0]


def test_quantile_interpolates_like_prometheus():
    bounds = [0.1, 0.2, 0.5]
    assert quantile(0.5, bounds, [0, 0, 0, 0]) is None
    assert quantile(0.5, bounds, [10, 0, 0, 0]) == pytest.approx(0.05)
    assert quantile(0.5, bounds, [0, 10, 0, 0]) == pytest.approx(0.15)
    assert quantile(0.99, bounds, [90, 9, 1, 0]) == pytest.approx(0.2)
    assert quantile(0.99, bounds, [0, 0, 0, 5]) == 0.5  # +Inf bucket: the highest finite bound


# -- reload and the token -----------------------------------------------------------------------


async def test_reload_needs_the_bearer_token(start_proxy, upstream, aiohttp_client, monkeypatch):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, admin={"listen": "127.0.0.1:0", "token": "s3cret"}))
    calls = []

    async def reload():
        calls.append(1)
        return {"lanes_changed": ["app"]}

    monkeypatch.setattr(proxy, "reload", reload, raising=False)
    client = await aiohttp_client(build_admin_app(proxy))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        resp = await client.post("/api/reload", headers=headers)
        assert resp.status == 401 and "Bearer" in resp.headers["WWW-Authenticate"]
    assert calls == []
    for path in ("/metrics", "/api/status", "/status", "/healthz"):  # reads need no token
        assert (await client.get(path)).status == 200
    resp = await client.post("/api/reload", headers={"Authorization": "Bearer s3cret"})
    assert resp.status == 200
    assert await resp.json() == {"ok": True, "lanes_changed": ["app"]}
    assert calls == [1]


async def test_reload_reports_config_problems(start_proxy, upstream, aiohttp_client, monkeypatch):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port))

    async def reload():
        raise ConfigError(["lanes.app.servers[0]: port out of range"])

    monkeypatch.setattr(proxy, "reload", reload, raising=False)
    client = await aiohttp_client(build_admin_app(proxy))  # no token configured: POST is open
    resp = await client.post("/api/reload")
    assert resp.status == 400
    assert await resp.json() == {"ok": False, "problems": ["lanes.app.servers[0]: port out of range"]}


async def test_reload_while_stopping_is_refused_with_409(start_proxy, upstream, aiohttp_client):
    gate, arrived = asyncio.Event(), asyncio.Event()

    async def held(reader, writer, up):  # one request in flight keeps the drain going
        await reader.read_request()
        arrived.set()
        await gate.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    up = await upstream(held)
    proxy = await start_proxy(make_config(up.port))
    client = await aiohttp_client(build_admin_app(proxy))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    await asyncio.wait_for(arrived.wait(), 5)
    stopping = asyncio.create_task(proxy.stop(drain_timeout=5))
    await asyncio.sleep(0)
    resp = await client.post("/api/reload")
    assert resp.status == 409 and (await resp.json()) == {"ok": False, "error": "stopping: the reload is ignored"}
    gate.set()
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
    await asyncio.wait_for(stopping, 5)
    writer.close()


async def test_reload_501_without_proxy_support(start_proxy, upstream, aiohttp_client, monkeypatch):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, admin={"listen": "127.0.0.1:0", "token": "t"}))
    monkeypatch.delattr(Proxy, "reload", raising=False)
    client = await aiohttp_client(build_admin_app(proxy))
    assert (await client.post("/api/reload")).status == 401
    resp = await client.post("/api/reload", headers={"Authorization": "Bearer t"})
    assert resp.status == 501 and (await resp.json())["ok"] is False


# -- the listener -------------------------------------------------------------------------------


async def test_start_admin_binds_and_logs(start_proxy, upstream, caplog):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, admin={"listen": "127.0.0.1:0"}))
    with caplog.at_level(logging.INFO, logger="laneproxy.admin"):
        runner = await start_admin(proxy)
    try:
        host, port = runner.addresses[0][:2]
        assert port > 0
        assert f"admin on http://127.0.0.1:{port}" in caplog.text
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200 and (await resp.text()).strip() == "ok"
            async with session.get(f"http://127.0.0.1:{port}/", allow_redirects=False) as resp:
                assert resp.status == 302 and resp.headers["Location"] == "/status"
    finally:
        await runner.cleanup()


def test_admin_is_not_imported_by_the_data_path():
    import laneproxy.downstream
    import laneproxy.exchange
    import laneproxy.pool
    import laneproxy.upstream

    for module in (laneproxy.downstream, laneproxy.exchange, laneproxy.pool, laneproxy.upstream):
        assert "admin" not in vars(module), module.__name__
    assert admin.ProxyCollector.describe(None) == []  # type: ignore[arg-type]


# -- a real browser -----------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """Just enough of the Chrome DevTools protocol: call methods, keep the console/exception events."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.next_id = 0
        self.errors: list[str] = []
        self.pending: dict[int, asyncio.Future] = {}
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if "id" in msg and msg["id"] in self.pending:
                self.pending.pop(msg["id"]).set_result(msg)
            elif msg.get("method") == "Runtime.exceptionThrown":
                self.errors.append(json.dumps(msg["params"]["exceptionDetails"])[:500])
            elif msg.get("method") == "Runtime.consoleAPICalled" and msg["params"]["type"] in ("error", "warning"):
                self.errors.append(json.dumps(msg["params"]["args"])[:500])
            elif msg.get("method") == "Log.entryAdded" and msg["params"]["entry"]["level"] == "error":
                self.errors.append(msg["params"]["entry"]["text"])

    async def call(self, method: str, **params):
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        msg = await asyncio.wait_for(fut, 10)
        assert "error" not in msg, msg
        return msg["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
@pytest.mark.timeout(45)
async def test_status_page_in_headless_chromium(start_proxy, upstream, tmp_path):
    from websockets.asyncio.client import connect

    a, other = await upstream(), await upstream()
    proxy = await start_proxy(two_lanes([a.port], other.port, admin={"listen": "127.0.0.1:0"}))
    runner = await start_admin(proxy)
    admin_port = runner.addresses[0][1]
    profile = tmp_path / "profile"
    browser = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        active = profile / "DevToolsActivePort"  # chromium writes its port here once it listens
        while not (active.exists() and active.read_text().count("\n") >= 1):
            assert browser.poll() is None, "chromium exited"
            assert loop.time() < deadline, "chromium did not start"
            await asyncio.sleep(0.05)
        devtools_port = int(active.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{devtools_port}/json/list") as resp:
                page = next(t for t in await resp.json() if t["type"] == "page")
        async with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            tools = DevTools(ws)
            for domain in ("Runtime", "Log", "Page"):
                await tools.call(f"{domain}.enable")
            await tools.call("Page.navigate", url=f"http://127.0.0.1:{admin_port}/status")
            served = "document.querySelector('[data-lane=\"app\"] .kpi:last-child b').textContent"
            deadline = loop.time() + 10
            while await tools.evaluate(f"document.readyState === 'complete' && {served}") != "0":
                assert loop.time() < deadline, "the page did not render the lane"
                await asyncio.sleep(0.1)
            lanes = await tools.evaluate("[...document.querySelectorAll('[data-lane]')].map(e => e.dataset.lane)")
            assert sorted(lanes) == ["app", "other"]
            for _ in range(5):  # traffic flows: the page updates itself, without a reload
                assert (await exchange(proxy.port, GET % b"/api/x"))[0] == 200
            await tools.evaluate("window.__same_document = true")
            deadline = loop.time() + 10
            while await tools.evaluate(served) != "5":
                assert loop.time() < deadline, "the page did not update"
                await asyncio.sleep(0.1)
            assert await tools.evaluate("window.__same_document") is True
            assert await tools.evaluate("document.getElementById('s-req').textContent") == "5"
            assert await tools.evaluate("document.getElementById('live').textContent") == "live"
            route_2xx = "document.querySelector('#routes tr td:nth-child(5)').textContent"
            assert await tools.evaluate(route_2xx) == "5"
            assert tools.errors == []
            tools.reader.cancel()
    finally:
        browser.terminate()
        try:
            await asyncio.to_thread(browser.wait, 10)
        except subprocess.TimeoutExpired:
            browser.kill()
            await asyncio.to_thread(browser.wait)
        await runner.cleanup()
