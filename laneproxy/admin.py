"""Admin: the control-plane listener (aiohttp): /metrics, /api/status, /status, /api/reload, /healthz.

The admin only reads. Every number it shows is a plain attribute of the live objects (Context,
Lane, LaneQueue, Server, Pool, Route), read when a scrape or a poll arrives; the data path has no
hook into this module and never imports it. Lanes and routes are looked up on the proxy at each
read, so a reload that swaps them is seen at the next scrape.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from laneproxy import __version__
from laneproxy.admin_page import render_status_page
from laneproxy.config import ConfigError

if TYPE_CHECKING:
    from laneproxy.lane import Lane, Server
    from laneproxy.queue import Histogram
    from laneproxy.router import Route
    from laneproxy.server import Proxy

log = logging.getLogger("laneproxy.admin")

CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")  # Route.responses[1..5]; index 0 stays unused
PRIORITY_NAMES = {0: "high", 1: "normal", 2: "low"}
PROXY_KEY: web.AppKey[Proxy] = web.AppKey("proxy")
REGISTRY_KEY: web.AppKey[CollectorRegistry] = web.AppKey("registry")
RELOAD_LOCK_KEY: web.AppKey[asyncio.Lock] = web.AppKey("reload_lock")


# -- reading the live objects --------------------------------------------------------------------


def routes_of(proxy: Proxy) -> list[Route]:
    """The router's routes in config order (the table is built from the config's list)."""
    return list(proxy.router._table.values())


def server_state(server: Server, now: float) -> str:
    """'up', 'backup' (available, used when the primaries are not), or why it is not used."""
    if server.cfg.down:
        return "disabled"
    if not server.health_ok:
        return "unhealthy"
    if server.down_until > now:
        return "down"
    return "backup" if server.backup else "up"


def histogram_json(h: Histogram) -> dict[str, Any]:
    return {"bounds": list(h.bounds), "buckets": list(h.buckets), "sum": h.sum, "count": h.count}


def lane_json(lane: Lane, now: float) -> dict[str, Any]:
    q = lane.queue
    return {
        "name": lane.name,
        "balance": lane.cfg.balance,
        "in_flight": lane.in_flight,
        "limit": q.limit,
        "queued": len(q),
        "queue_size": q.size,
        "queue_timeout": q.timeout,
        "overloaded": q.overloaded,
        "served": lane.served,
        "shed": dict(q.shed),
        "queue_wait": histogram_json(q.wait),
        "upstream_time": histogram_json(lane.upstream_time),
        "servers": [
            {
                "name": s.name,
                "state": server_state(s, now),
                "up": s.available(now),
                "backup": s.backup,
                "weight": s.weight,
                "in_flight": s.in_flight,
                "requests": s.requests,
                "failures": s.failures,
                "retried": s.retried,
                "marked_down": s.marked_down,
                "pool": s.pool.stats(),
            }
            for s in lane.servers
        ],
    }


def status_snapshot(proxy: Proxy) -> dict[str, Any]:
    """Everything /api/status returns (and /status renders first): one consistent read."""
    ctx = proxy.ctx
    now = proxy.loop.time()
    return {
        "time": time.time(),
        "version": __version__,
        "connections": len(ctx.connections),
        "tunnels": ctx.tunnels,
        "requests": ctx.requests,
        "rejected_connections": ctx.rejected_connections,
        "local_responses": {str(status): n for status, n in sorted(ctx.local_responses.items())},
        "listen": [f"{h}:{p}" for h, p in proxy.addresses],
        "lanes": [lane_json(lane, now) for lane in proxy.lanes.values()],
        "routes": [
            {
                "prefix": r.prefix.decode("latin-1"),
                "lane": r.lane.name,
                "priority": PRIORITY_NAMES.get(r.priority, str(r.priority)),
                "strip_prefix": r.strip_prefix,
                "try_files": r.static is not None,
                "responses": dict(zip(CLASSES, r.responses[1:6])),
            }
            for r in routes_of(proxy)
        ],
    }


# -- Prometheus ------------------------------------------------------------------------------------


def _histogram(name: str, doc: str, labels: list[str], families: dict[str, HistogramMetricFamily],
               values: list[str], h: Histogram) -> None:
    fam = families.get(name)
    if fam is None:
        fam = families[name] = HistogramMetricFamily(name, doc, labels=labels)
    cumulative = h.cumulative()
    buckets = [(_le(bound), n) for bound, n in zip(h.bounds, cumulative)]
    buckets.append(("+Inf", cumulative[-1]))
    fam.add_metric(values, buckets, h.sum)


def _le(bound: float) -> str:
    return floatToGoString(bound)


class ProxyCollector:
    """Yields laneproxy's metric families from the proxy's live counters at each scrape."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def describe(self) -> list[Metric]:
        return []  # names depend on nothing static; skip the registry's duplicate check

    def collect(self) -> Iterator[Metric]:
        proxy = self.proxy
        ctx = proxy.ctx
        now = proxy.loop.time()

        yield GaugeMetricFamily("laneproxy_client_connections", "Open client connections.", len(ctx.connections))
        yield GaugeMetricFamily("laneproxy_tunnels", "Open Upgrade tunnels (WebSocket).", ctx.tunnels)
        yield CounterMetricFamily("laneproxy_requests", "Requests parsed from clients.", ctx.requests)
        yield CounterMetricFamily(
            "laneproxy_rejected_connections", "Client connections refused at client.max_connections.",
            ctx.rejected_connections,
        )
        local = CounterMetricFamily(
            "laneproxy_local_responses", "Answers laneproxy gave itself outside any route, by status.",
            labels=["status"],
        )
        for status, n in sorted(ctx.local_responses.items()):
            local.add_metric([str(status)], n)
        yield local

        lanes = list(proxy.lanes.values())
        gauges = {
            "laneproxy_lane_in_flight": ("Exchanges in flight to the lane.", lambda ln: ln.in_flight),
            "laneproxy_lane_limit": ("The lane's in-flight limit (0: none).", lambda ln: ln.queue.limit),
            "laneproxy_lane_queued": ("Requests waiting in the lane queue.", lambda ln: len(ln.queue)),
            "laneproxy_lane_queue_size": ("Most requests that may wait in the lane queue.", lambda ln: ln.queue.size),
            "laneproxy_lane_overloaded": (
                "1 while the lane queue is in overload mode (CoDel: newest first).",
                lambda ln: int(ln.queue.overloaded),
            ),
        }
        for name, (doc, read) in gauges.items():
            fam = GaugeMetricFamily(name, doc, labels=["lane"])
            for lane in lanes:
                fam.add_metric([lane.name], read(lane))
            yield fam
        served = CounterMetricFamily("laneproxy_lane_served", "Exchanges that ended on the lane.", labels=["lane"])
        shed = CounterMetricFamily(
            "laneproxy_lane_shed", "Requests the lane refused or dropped from its queue, by reason.",
            labels=["lane", "reason"],
        )
        hists: dict[str, HistogramMetricFamily] = {}
        for lane in lanes:
            served.add_metric([lane.name], lane.served)
            for reason, n in lane.queue.shed.items():
                shed.add_metric([lane.name, reason], n)
            _histogram("laneproxy_lane_queue_wait_seconds", "Time requests waited for a slot (lanes with a limit).",
                       ["lane"], hists, [lane.name], lane.queue.wait)
            _histogram("laneproxy_lane_upstream_seconds",
                       "Time from admission to the end of the response, per exchange.",
                       ["lane"], hists, [lane.name], lane.upstream_time)
        yield served
        yield shed
        yield from hists.values()

        responses = CounterMetricFamily(
            "laneproxy_route_responses", "Responses sent for a route, by status class.",
            labels=["lane", "route", "class"],
        )
        for route in routes_of(proxy):
            prefix = route.prefix.decode("latin-1")
            for cls, n in zip(CLASSES, route.responses[1:6]):
                responses.add_metric([route.lane.name, prefix, cls], n)
        yield responses

        yield from self._servers(lanes, now)

    @staticmethod
    def _servers(lanes: list[Lane], now: float) -> Iterator[Metric]:
        labels = ["lane", "server"]
        table: list[tuple[type, str, str, Callable[[Server], float]]] = [
            (GaugeMetricFamily, "laneproxy_server_in_flight", "Exchanges in flight to the server.",
             lambda s: s.in_flight),
            (GaugeMetricFamily, "laneproxy_server_up", "1 when the server may be picked (health, down, disabled).",
             lambda s: int(s.available(now))),
            (GaugeMetricFamily, "laneproxy_server_backup", "1 for a backup server.", lambda s: int(s.backup)),
            (GaugeMetricFamily, "laneproxy_server_weight", "The server's balancing weight.", lambda s: s.weight),
            (CounterMetricFamily, "laneproxy_server_requests", "Tries sent to the server.", lambda s: s.requests),
            (CounterMetricFamily, "laneproxy_server_failures", "Failed tries (per the lane's retry_on).",
             lambda s: s.failures),
            (CounterMetricFamily, "laneproxy_server_retries", "Tries on this server that were retried elsewhere.",
             lambda s: s.retried),
            (CounterMetricFamily, "laneproxy_server_marked_down", "Times passive health took the server out.",
             lambda s: s.marked_down),
            (GaugeMetricFamily, "laneproxy_pool_idle_connections", "Idle keep-alive connections to the server.",
             lambda s: s.pool.idle),
            (GaugeMetricFamily, "laneproxy_pool_active_connections", "Connections to the server lent out.",
             lambda s: s.pool.active),
            (GaugeMetricFamily, "laneproxy_pool_connecting", "Connections to the server being opened.",
             lambda s: s.pool.connecting),
            (CounterMetricFamily, "laneproxy_pool_connections_created", "Connections opened to the server.",
             lambda s: s.pool.created),
            (CounterMetricFamily, "laneproxy_pool_connections_reused", "Exchanges that reused an idle connection.",
             lambda s: s.pool.reused),
        ]
        for kind, name, doc, read in table:
            fam = kind(name, doc, labels=labels)
            for lane in lanes:
                for server in lane.servers:
                    fam.add_metric([lane.name, server.name], read(server))
            yield fam


def make_registry(proxy: Proxy) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(proxy))  # type: ignore[arg-type]
    ProcessCollector(namespace="laneproxy", registry=registry)  # memory, CPU, fds: read from /proc at scrape
    return registry


# -- the aiohttp app ------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SAFE_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))


def _auth_middleware(token: str | None) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    expected = f"Bearer {token}".encode() if token else b""

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token and request.method not in SAFE_METHODS:
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):
                return web.json_response(
                    {"ok": False, "error": "a bearer token is required"}, status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="laneproxy admin"'},
                )
        return await handler(request)

    return auth


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def index(request: web.Request) -> web.Response:
    raise web.HTTPFound("/status")


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"})


async def api_status(request: web.Request) -> web.Response:
    return web.json_response(status_snapshot(request.app[PROXY_KEY]), headers={"Cache-Control": "no-store"})


async def status_page(request: web.Request) -> web.Response:
    html = render_status_page(status_snapshot(request.app[PROXY_KEY]))
    return web.Response(text=html, content_type="text/html", headers={
        "Cache-Control": "no-store",
        # Nothing leaves the page: inline style and script only, fetches to this origin only.
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                                   "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'",
        "X-Content-Type-Options": "nosniff",
    })


async def api_reload(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    reload = getattr(proxy, "reload", None)
    if reload is None:
        return web.json_response({"ok": False, "error": "reload is not available"}, status=501)
    async with request.app[RELOAD_LOCK_KEY]:  # one reload at a time
        try:
            result = await reload()
        except ConfigError as exc:
            return web.json_response({"ok": False, "problems": list(exc.problems)}, status=400)
        except Exception as exc:  # an unexpected failure is reported, the admin keeps running
            log.exception("reload failed")
            return web.json_response({"ok": False, "error": f"{exc.__class__.__name__}: {exc}"}, status=500)
    body = {"ok": True, **result} if isinstance(result, dict) else {"ok": True}
    return web.json_response(body, dumps=lambda obj: json.dumps(obj, default=str))


def build_admin_app(proxy: Proxy) -> web.Application:
    """The admin application over one proxy (tests serve it with aiohttp_client)."""
    admin_cfg = proxy.cfg.admin
    token = admin_cfg.token if admin_cfg is not None else None
    app = web.Application(middlewares=[_auth_middleware(token)])
    app[PROXY_KEY] = proxy
    app[REGISTRY_KEY] = make_registry(proxy)
    app[RELOAD_LOCK_KEY] = asyncio.Lock()
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/status", api_status)
    app.router.add_get("/status", status_page)
    app.router.add_post("/api/reload", api_reload)
    return app


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def start_admin(proxy: Proxy) -> web.AppRunner:
    """Serve the admin app on `cfg.admin.listen`; `runner.addresses[0][1]` is the bound port."""
    admin_cfg = proxy.cfg.admin
    if admin_cfg is None:
        raise ValueError("the config has no admin section")
    host, port = admin_cfg.listen
    runner = web.AppRunner(build_admin_app(proxy), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=128, reuse_address=True).start()
    except BaseException:
        await runner.cleanup()
        raise
    for addr in runner.addresses:
        shown = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
        log.info("admin on http://%s:%d", shown, addr[1])
    if not admin_cfg.token and not _is_loopback(host):
        log.warning("admin listens on %s without admin.token: anyone who reaches it can reload", host)
    return runner


class _SnapshotWriter:
    """Placeholder until worker aggregation lands: publishes nothing."""

    def stop(self) -> None:
        pass


def start_snapshot_writer(proxy: Proxy, rundir: Path, worker: int) -> _SnapshotWriter:
    return _SnapshotWriter()
