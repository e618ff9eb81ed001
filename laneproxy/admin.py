"""Admin: the control-plane listener (aiohttp): /metrics, /api/status, /status, /api/reload, /healthz.

The admin only reads. Every number it shows comes from a snapshot dict (adminstats.status_snapshot)
of the live objects (Context, Lane, LaneQueue, Server, Pool, Route), taken when a scrape or a poll
arrives; /api/status returns it, /status renders it and /metrics is generated from it
(`snapshot_metrics`). The data path has no hook into this module and never imports it. Lanes and
routes are looked up on the proxy at each read, so a reload that swaps them is seen at the next scrape.

Under a supervisor (`workers: N`, env LANEPROXY_RUNDIR), only worker 0 runs the admin listener; every
worker publishes its snapshot in the run directory and the admin answers with the sum over the
workers (adminstats.cluster_snapshot: what is summed and what is not is described there). The
process_* metrics stay those of the process serving the admin.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from laneproxy.admin_page import render_status_page
from laneproxy.adminstats import (  # noqa: F401 - re-exported: server.py starts the writer from here
    CLASSES,
    SnapshotWriter,
    cluster_snapshot,
    routes_of,
    start_snapshot_writer,
    status_snapshot,
)
from laneproxy.config import ConfigError, load_config
from laneproxy.errors import Stopping

if TYPE_CHECKING:
    from laneproxy.server import Proxy

log = logging.getLogger("laneproxy.admin")

PROXY_KEY: web.AppKey[Proxy] = web.AppKey("proxy")
SNAPSHOT_KEY: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("snapshot")
REGISTRY_KEY: web.AppKey[CollectorRegistry] = web.AppKey("registry")
RELOAD_LOCK_KEY: web.AppKey[asyncio.Lock] = web.AppKey("reload_lock")


# -- Prometheus, generated from a snapshot dict ------------------------------------------------------


def _histogram(fam: HistogramMetricFamily, values: list[str], h: dict[str, Any]) -> None:
    cumulative = list(accumulate(h["buckets"]))
    buckets = [(floatToGoString(bound), n) for bound, n in zip(h["bounds"], cumulative)]
    buckets.append(("+Inf", cumulative[-1]))
    fam.add_metric(values, buckets, h["sum"])


LANE_GAUGES: tuple[tuple[str, str, Callable[[dict[str, Any]], float]], ...] = (
    ("laneproxy_lane_in_flight", "Exchanges in flight to the lane.", lambda ln: ln["in_flight"]),
    ("laneproxy_lane_limit", "The lane's in-flight limit (0: none; with workers, the sum of their shares).",
     lambda ln: ln["limit"]),
    ("laneproxy_lane_queued", "Requests waiting in the lane queue.", lambda ln: ln["queued"]),
    ("laneproxy_lane_queue_size", "Most requests that may wait in the lane queue.", lambda ln: ln["queue_size"]),
    ("laneproxy_lane_overloaded", "1 while the lane queue is in overload mode (CoDel: newest first), in any worker.",
     lambda ln: int(ln["overloaded"])),
)
SERVER_METRICS: tuple[tuple[type, str, str, Callable[[dict[str, Any]], float]], ...] = (
    (GaugeMetricFamily, "laneproxy_server_in_flight", "Exchanges in flight to the server.", lambda s: s["in_flight"]),
    (GaugeMetricFamily, "laneproxy_server_up",
     "1 when the server may be picked (health, down, disabled), in any worker.", lambda s: int(s["up"])),
    (GaugeMetricFamily, "laneproxy_server_backup", "1 for a backup server.", lambda s: int(s["backup"])),
    (GaugeMetricFamily, "laneproxy_server_weight", "The server's balancing weight.", lambda s: s["weight"]),
    (CounterMetricFamily, "laneproxy_server_requests", "Tries sent to the server.", lambda s: s["requests"]),
    (CounterMetricFamily, "laneproxy_server_failures", "Failed tries (per the lane's retry_on).",
     lambda s: s["failures"]),
    (CounterMetricFamily, "laneproxy_server_retries", "Tries on this server that were retried elsewhere.",
     lambda s: s["retried"]),
    (CounterMetricFamily, "laneproxy_server_marked_down", "Times passive health took the server out.",
     lambda s: s["marked_down"]),
    (GaugeMetricFamily, "laneproxy_pool_idle_connections", "Idle keep-alive connections to the server.",
     lambda s: s["pool"]["idle"]),
    (GaugeMetricFamily, "laneproxy_pool_active_connections", "Connections to the server lent out.",
     lambda s: s["pool"]["active"]),
    (GaugeMetricFamily, "laneproxy_pool_connecting", "Connections to the server being opened.",
     lambda s: s["pool"]["connecting"]),
    (CounterMetricFamily, "laneproxy_pool_connections_created", "Connections opened to the server.",
     lambda s: s["pool"]["created"]),
    (CounterMetricFamily, "laneproxy_pool_connections_reused", "Exchanges that reused an idle connection.",
     lambda s: s["pool"]["reused"]),
)


def snapshot_metrics(snap: dict[str, Any]) -> Iterator[Metric]:
    """laneproxy's metric families from one snapshot (one process's, or the sum over the workers)."""
    yield GaugeMetricFamily("laneproxy_workers", "Worker processes whose numbers are included.",
                            snap.get("workers", 1))
    yield GaugeMetricFamily("laneproxy_client_connections", "Open client connections.", snap["connections"])
    yield GaugeMetricFamily("laneproxy_tunnels", "Open Upgrade tunnels (WebSocket).", snap["tunnels"])
    yield CounterMetricFamily("laneproxy_requests", "Requests parsed from clients.", snap["requests"])
    yield CounterMetricFamily(
        "laneproxy_rejected_connections", "Client connections refused at client.max_connections.",
        snap["rejected_connections"],
    )
    local = CounterMetricFamily(
        "laneproxy_local_responses", "Answers laneproxy gave itself outside any route, by status.",
        labels=["status"],
    )
    for status, n in snap["local_responses"].items():
        local.add_metric([status], n)
    yield local

    lanes = snap["lanes"]
    for name, doc, read in LANE_GAUGES:
        fam = GaugeMetricFamily(name, doc, labels=["lane"])
        for lane in lanes:
            fam.add_metric([lane["name"]], read(lane))
        yield fam
    served = CounterMetricFamily("laneproxy_lane_served", "Exchanges that ended on the lane.", labels=["lane"])
    failed = CounterMetricFamily(
        "laneproxy_lane_failed", "Exchanges that ended in laneproxy's own 502/504 or an abort.", labels=["lane"]
    )
    shed = CounterMetricFamily(
        "laneproxy_lane_shed", "Requests the lane refused or dropped from its queue, by reason.",
        labels=["lane", "reason"],
    )
    wait = HistogramMetricFamily("laneproxy_lane_queue_wait_seconds",
                                 "Time requests waited for a slot (lanes with a limit).", labels=["lane"])
    upstream = HistogramMetricFamily("laneproxy_lane_upstream_seconds",
                                     "Time from admission to the end of the response, per exchange.", labels=["lane"])
    for lane in lanes:
        served.add_metric([lane["name"]], lane["served"])
        failed.add_metric([lane["name"]], lane.get("failed", 0))
        for reason, n in lane["shed"].items():
            shed.add_metric([lane["name"], reason], n)
        _histogram(wait, [lane["name"]], lane["queue_wait"])
        _histogram(upstream, [lane["name"]], lane["upstream_time"])
    yield served
    yield failed
    yield shed
    yield wait
    yield upstream

    responses = CounterMetricFamily(
        "laneproxy_route_responses", "Responses sent for a route, by status class.",
        labels=["lane", "route", "class"],
    )
    for route in snap["routes"]:
        for cls in CLASSES:
            responses.add_metric([route["lane"], route["prefix"], cls], route["responses"].get(cls, 0))
    yield responses

    for kind, name, doc, read in SERVER_METRICS:
        fam = kind(name, doc, labels=["lane", "server"])
        for lane in lanes:
            for server in lane["servers"]:
                fam.add_metric([lane["name"], server["name"]], read(server))
        yield fam


class ProxyCollector:
    """Yields laneproxy's metric families at each scrape, from a fresh snapshot.

    The snapshot is the proxy's own (`status_snapshot`) or, under a supervisor, the sum over the
    workers (`cluster_snapshot`): the families are generated from the dict either way.
    """

    def __init__(self, proxy: Proxy, snapshot: Callable[[], dict[str, Any]] | None = None) -> None:
        self.proxy = proxy
        self.snapshot = snapshot if snapshot is not None else lambda: status_snapshot(proxy)

    def describe(self) -> list[Metric]:
        return []  # names depend on nothing static; skip the registry's duplicate check

    def collect(self) -> Iterator[Metric]:
        yield from snapshot_metrics(self.snapshot())


def make_registry(proxy: Proxy, snapshot: Callable[[], dict[str, Any]] | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(proxy, snapshot))  # type: ignore[arg-type]
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
    return web.json_response(request.app[SNAPSHOT_KEY](), headers={"Cache-Control": "no-store"})


async def status_page(request: web.Request) -> web.Response:
    html = render_status_page(request.app[SNAPSHOT_KEY]())
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
        if os.environ.get("LANEPROXY_RUNDIR") and proxy.cfg.path is not None:
            # Under the supervisor: check the file here, then let the supervisor have every worker
            # reload it (it validates again and forwards SIGHUP).
            try:
                load_config(proxy.cfg.path)
            except ConfigError as exc:
                return web.json_response({"ok": False, "problems": list(exc.problems)}, status=400)
            os.kill(os.getppid(), signal.SIGHUP)
            return web.json_response({"ok": True, "workers": "signalled"})
        try:
            result = await reload()
        except ConfigError as exc:
            return web.json_response({"ok": False, "problems": list(exc.problems)}, status=400)
        except Stopping as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=409)
        except Exception as exc:  # an unexpected failure is reported, the admin keeps running
            log.exception("reload failed")
            return web.json_response({"ok": False, "error": f"{exc.__class__.__name__}: {exc}"}, status=500)
    body = {"ok": True, **result} if isinstance(result, dict) else {"ok": True}
    return web.json_response(body, dumps=lambda obj: json.dumps(obj, default=str))


def snapshot_source(
    proxy: Proxy, rundir: Path | None = None, worker: int | None = None,
) -> Callable[[], dict[str, Any]]:
    """What the admin reads at each request: the proxy's own snapshot, or, when a run directory is
    given (default: env LANEPROXY_RUNDIR, set by the supervisor), the sum over the workers."""
    if rundir is None and os.environ.get("LANEPROXY_RUNDIR"):
        rundir = Path(os.environ["LANEPROXY_RUNDIR"])
    if rundir is None:
        return lambda: status_snapshot(proxy)
    if worker is None:
        worker = int(os.environ.get("LANEPROXY_WORKER", "0") or 0)
    return lambda: cluster_snapshot(proxy, rundir, worker)


def build_admin_app(proxy: Proxy, rundir: Path | None = None) -> web.Application:
    """The admin application over one proxy (tests serve it with aiohttp_client); see snapshot_source."""
    admin_cfg = proxy.cfg.admin
    token = admin_cfg.token if admin_cfg is not None else None
    app = web.Application(middlewares=[_auth_middleware(token)])
    snapshot = snapshot_source(proxy, rundir)
    app[PROXY_KEY] = proxy
    app[SNAPSHOT_KEY] = snapshot
    app[REGISTRY_KEY] = make_registry(proxy, snapshot)
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
