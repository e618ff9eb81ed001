"""Admin under `workers: N` (issue 9): /metrics and /api/status report the sum over the workers.

Each worker publishes its snapshot to `<rundir>/worker-<i>.json`; worker 0's admin adds its own
live snapshot and the other workers' fresh files. Tested from the merge itself (pure dicts), through
the writer and the admin app in this process, and end to end with `laneproxy run` and two workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from laneproxy.admin import ProxyCollector, build_admin_app, snapshot_metrics
from laneproxy.adminstats import (
    merge_snapshots,
    read_peer_snapshots,
    start_snapshot_writer,
    status_snapshot,
    worker_file,
)
from tests.conftest import exchange, make_config
from tests.process import spawn_proxy, stop_proxy
from tests.test_admin import scrape, until, value
from tests.test_e2e_workers import free_port

GET = b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n"
BOUNDS = [0.1, 1.0]


def hist(buckets: list[int], total: float) -> dict:
    return {"bounds": BOUNDS, "buckets": buckets, "sum": total, "count": sum(buckets)}


def server(name: str, n: int, *, up: bool = True, state: str = "up", idle: int = 0) -> dict:
    return {
        "name": name, "state": state, "up": up, "backup": False, "weight": 1, "in_flight": n, "requests": 10 * n,
        "failures": n, "retried": 0, "marked_down": 0 if up else 1,
        "pool": {"active": n, "idle": idle, "connecting": 0, "created": 2 * n, "reused": 3 * n},
    }


def lane(name: str, n: int, servers: list[dict], *, overloaded: bool = False) -> dict:
    return {
        "name": name, "balance": "round_robin", "in_flight": n, "limit": 4, "queued": n, "queue_size": 10,
        "queue_timeout": 5.0, "overloaded": overloaded, "served": 100 * n,
        "shed": {"full": n, "timeout": 0, "codel": 0, "client_gone": 1, "stopping": 0},
        "queue_wait": hist([n, 0, 1], 0.5 * n), "upstream_time": hist([n, 2 * n, 0], 1.5 * n), "servers": servers,
    }


def route(prefix: str, lane_name: str, ok: int, errors: int = 0) -> dict:
    return {
        "prefix": prefix, "lane": lane_name, "priority": "normal", "strip_prefix": False, "try_files": False,
        "responses": {"1xx": 0, "2xx": ok, "3xx": 0, "4xx": 0, "5xx": errors},
    }


def snapshot(n: int, **overrides) -> dict:
    snap = {
        "time": 1000.0 + n, "version": "test", "workers": 1, "connections": n, "tunnels": n, "requests": 50 * n,
        "rejected_connections": n, "local_responses": {"404": n}, "listen": ["127.0.0.1:8080"],
        "lanes": [lane("app", n, [server("a:1", n, idle=n), server("b:1", n)])],
        "routes": [route("/", "app", 40 * n, n)],
    }
    snap.update(overrides)
    return snap


# -- the merge (pure) ---------------------------------------------------------------------------


def test_merge_of_two_snapshots_sums_counters_gauges_and_histograms():
    w0 = snapshot(1)
    w1 = snapshot(2, local_responses={"400": 1, "404": 2}, worker=1, pid=4242)
    w1["lanes"][0]["servers"][1] = server("b:1", 2, up=False, state="down")
    w1["lanes"][0]["overloaded"] = True
    before = json.dumps([w0, w1])
    total = merge_snapshots([w0, w1])
    assert json.dumps([w0, w1]) == before  # the inputs are left alone

    assert total["workers"] == 2 and "worker" not in total and "pid" not in total
    assert (total["time"], total["version"], total["listen"]) == (1001.0, "test", ["127.0.0.1:8080"])
    assert (total["connections"], total["tunnels"], total["requests"], total["rejected_connections"]) == (3, 3, 150, 3)
    assert total["local_responses"] == {"400": 1, "404": 3}
    [app] = total["lanes"]
    assert (app["in_flight"], app["limit"], app["queued"], app["queue_size"], app["served"]) == (3, 8, 3, 20, 300)
    assert app["overloaded"] is True and app["queue_timeout"] == 5.0 and app["balance"] == "round_robin"
    assert app["shed"] == {"full": 3, "timeout": 0, "codel": 0, "client_gone": 2, "stopping": 0}
    assert app["upstream_time"] == {"bounds": BOUNDS, "buckets": [3, 6, 0], "sum": 4.5, "count": 9}
    assert app["queue_wait"] == {"bounds": BOUNDS, "buckets": [3, 0, 2], "sum": 1.5, "count": 5}
    a, b = app["servers"]
    assert (a["in_flight"], a["requests"], a["failures"], a["up"], a["state"]) == (3, 30, 3, True, "up")
    assert a["pool"] == {"active": 3, "idle": 3, "connecting": 0, "created": 6, "reused": 9}
    assert (b["up"], b["state"], b["marked_down"]) == (True, "up", 1)  # up in worker 0: up
    [r] = total["routes"]
    assert r["responses"] == {"1xx": 0, "2xx": 120, "3xx": 0, "4xx": 0, "5xx": 3}

    # /metrics generated from the merged dict shows the sums under the usual names.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(None, lambda: total))  # type: ignore[arg-type]
    m = scrape(generate_latest(registry).decode())
    assert value(m, "laneproxy_workers") == 2
    assert value(m, "laneproxy_requests_total") == 150
    assert value(m, "laneproxy_local_responses_total", status="404") == 3
    assert value(m, "laneproxy_route_responses_total", lane="app", route="/", **{"class": "2xx"}) == 120
    assert value(m, "laneproxy_lane_limit", lane="app") == 8
    assert value(m, "laneproxy_lane_overloaded", lane="app") == 1
    assert value(m, "laneproxy_lane_upstream_seconds_bucket", lane="app", le="0.1") == 3
    assert value(m, "laneproxy_lane_upstream_seconds_bucket", lane="app", le="1.0") == 9
    assert value(m, "laneproxy_lane_upstream_seconds_bucket", lane="app", le="+Inf") == 9
    assert value(m, "laneproxy_lane_upstream_seconds_sum", lane="app") == 4.5
    assert value(m, "laneproxy_server_requests_total", lane="app", server="a:1") == 30
    assert value(m, "laneproxy_pool_idle_connections", lane="app", server="a:1") == 3
    assert value(m, "laneproxy_server_up", lane="app", server="b:1") == 1


def test_merge_matches_by_name_and_keeps_what_only_one_worker_has():
    w0 = snapshot(1)
    w1 = snapshot(1)
    w1["lanes"][0]["servers"] = [server("b:1", 1, up=False, state="unhealthy"), server("c:1", 1)]
    w1["lanes"].append(lane("new", 1, [server("n:1", 1)]))  # a reload that reached worker 1 first
    w1["routes"].append(route("/new", "new", 5))
    w0["lanes"][0]["servers"][1] = server("b:1", 1, up=False, state="down")
    total = merge_snapshots([w0, w1, snapshot(1, workers=3)])  # a snapshot may already be a sum
    assert total["workers"] == 5
    assert [ln["name"] for ln in total["lanes"]] == ["app", "new"]
    app = total["lanes"][0]
    assert [s["name"] for s in app["servers"]] == ["a:1", "b:1", "c:1"]
    b = app["servers"][1]
    assert (b["up"], b["state"], b["requests"]) == (True, "up", 30)  # down, unhealthy, up: up in one worker
    assert app["servers"][2]["requests"] == 10
    assert [r["prefix"] for r in total["routes"]] == ["/", "/new"]
    assert total["routes"][1]["responses"]["2xx"] == 5
    assert merge_snapshots([snapshot(2)]) == snapshot(2)
    with pytest.raises(ValueError):
        merge_snapshots([])


def test_peer_files_skip_own_stale_and_broken(tmp_path):
    for i in range(4):
        worker_file(tmp_path, i).write_text(json.dumps(snapshot(i + 1, worker=i)))
    old = time.time() - 30
    os.utime(worker_file(tmp_path, 2), (old, old))  # a worker that died without removing its file
    worker_file(tmp_path, 4).write_text("{not json")
    (tmp_path / ".worker-5.json.tmp").write_text(json.dumps(snapshot(9)))  # never read: not yet replaced
    peers = read_peer_snapshots(tmp_path, 0)
    assert sorted(p["worker"] for p in peers) == [1, 3]
    assert read_peer_snapshots(tmp_path / "gone", 0) == []


# -- the writer and the admin app in this process -------------------------------------------------


async def test_writer_publishes_periodically_and_removes_its_file(start_proxy, upstream, tmp_path):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port))
    writer = start_snapshot_writer(proxy, tmp_path, 3, period=0.05)
    path = worker_file(tmp_path, 3)
    try:
        first = json.loads(path.read_text())  # published at once
        assert (first["worker"], first["pid"], first["requests"]) == (3, os.getpid(), 0)
        assert (await exchange(proxy.port, GET % b"/x"))[0] == 200
        await until(lambda: json.loads(path.read_text())["requests"] == 1)
        assert json.loads(path.read_text())["lanes"][0]["served"] == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["worker-3.json"]  # the tmp file was replaced
    finally:
        writer.stop()
    assert not path.exists() and writer.timer is None
    await asyncio.sleep(0.15)
    assert not path.exists()  # the timer is cancelled: nothing writes it again


async def test_admin_with_a_rundir_sums_fresh_peers(start_proxy, upstream, aiohttp_client, tmp_path):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, lane={"limit": 2, "queue": 3}))
    for i in range(3):
        assert (await exchange(proxy.port, GET % b"/r/%d" % i))[0] == 200
    await until(lambda: proxy.lanes["app"].served == 3)
    peer = status_snapshot(proxy) | {"worker": 1}  # another worker with the same numbers
    worker_file(tmp_path, 1).write_text(json.dumps(peer))
    worker_file(tmp_path, 0).write_text(json.dumps(peer))  # the admin's own file: it reads itself live
    client = await aiohttp_client(build_admin_app(proxy, rundir=tmp_path))

    snap = await (await client.get("/api/status")).json()
    assert (snap["workers"], snap["requests"]) == (2, 6)
    assert (snap["lanes"][0]["served"], snap["lanes"][0]["limit"], snap["lanes"][0]["queue_size"]) == (6, 4, 6)
    m = scrape(await (await client.get("/metrics")).text())
    assert value(m, "laneproxy_workers") == 2
    assert value(m, "laneproxy_requests_total") == 6
    assert value(m, "laneproxy_route_responses_total", lane="app", route="/", **{"class": "2xx"}) == 6
    assert value(m, "laneproxy_lane_upstream_seconds_count", lane="app") == 6
    html = await (await client.get("/status")).text()
    assert "2 workers" in html and '<b id="s-req">6</b>' in html

    old = time.time() - 30
    os.utime(worker_file(tmp_path, 1), (old, old))  # worker 1 died: no longer counted
    snap = await (await client.get("/api/status")).json()
    assert (snap["workers"], snap["requests"]) == (1, 3)
    m = scrape(await (await client.get("/metrics")).text())
    assert (value(m, "laneproxy_workers"), value(m, "laneproxy_requests_total")) == (1, 3)


async def test_admin_without_rundir_is_one_process(start_proxy, upstream, aiohttp_client, monkeypatch):
    monkeypatch.delenv("LANEPROXY_RUNDIR", raising=False)
    up = await upstream()
    proxy = await start_proxy(make_config(up.port))
    client = await aiohttp_client(build_admin_app(proxy))
    assert (await (await client.get("/api/status")).json())["workers"] == 1
    assert value(scrape(await (await client.get("/metrics")).text()), "laneproxy_workers") == 1
    assert "workers</span>" not in await (await client.get("/status")).text()
    assert list(snapshot_metrics(status_snapshot(proxy)))[0].name == "laneproxy_workers"


# -- end to end: laneproxy run with two workers ----------------------------------------------------


@pytest.mark.timeout(60)
async def test_two_workers_metrics_and_status_report_the_sum(tmp_path, upstream, monkeypatch):
    up = await upstream()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))  # the supervisor's run directory lands here, for the test to look in
    admin_addr = free_port()
    cfg = make_config(up.port, workers=2, listen=free_port(), admin={"listen": admin_addr})
    proc, port = await spawn_proxy(tmp_path, cfg)
    base = f"http://{admin_addr}"
    loop = asyncio.get_running_loop()
    try:
        log = tmp_path / "proxy.log"
        deadline = loop.time() + 15
        while log.read_text().count("listening on") < 2 or "admin on" not in log.read_text():
            assert loop.time() < deadline, log.read_text()
            await asyncio.sleep(0.05)
        n = 200
        gate = asyncio.Semaphore(50)

        async def one(i: int) -> int:
            async with gate:  # a fresh connection each: the kernel spreads them over both workers
                return (await exchange(port, GET % b"/n/%d" % i))[0]

        assert await asyncio.gather(*(one(i) for i in range(n))) == [200] * n

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            deadline = loop.time() + 8  # the workers publish about once a second
            while True:
                m = scrape(await (await session.get(base + "/metrics")).text())
                if value(m, "laneproxy_requests_total") == n or loop.time() > deadline:
                    break
                await asyncio.sleep(0.2)
            [rundir] = tmp.glob("laneproxy-*")
            w1 = json.loads((rundir / "worker-1.json").read_text())
            assert 0 < w1["requests"] < n, "worker 1 served none: the test would not show the sum"
            assert value(m, "laneproxy_requests_total") == n
            assert value(m, "laneproxy_workers") == 2
            assert value(m, "laneproxy_route_responses_total", lane="app", route="/", **{"class": "2xx"}) == n
            assert value(m, "laneproxy_lane_served_total", lane="app") == n
            assert value(m, "laneproxy_server_requests_total", lane="app", server=f"127.0.0.1:{up.port}") == n
            assert value(m, "laneproxy_lane_upstream_seconds_count", lane="app") == n

            async with session.get(base + "/api/status") as resp:
                assert resp.status == 200
                snap = await resp.json()
            assert snap["workers"] == 2
            assert snap["requests"] == n
            assert snap["lanes"][0]["served"] == n
            assert snap["routes"][0]["responses"]["2xx"] == n
            async with session.get(base + "/status") as resp:
                assert resp.status == 200 and f'<b id="s-req">{n}</b>' in await resp.text()
    finally:
        assert await stop_proxy(proc) == 0
    assert list(tmp.iterdir()) == []  # the supervisor removed its run directory

