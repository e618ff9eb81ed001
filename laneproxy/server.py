"""Server: build lanes and the router from a config, bind listeners, drain on stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

from laneproxy.accesslog import AccessLog
from laneproxy.config import ConfigError, ProxyConfig, load_config
from laneproxy.downstream import Context, DownstreamProtocol
from laneproxy.errors import Stopping
from laneproxy.health import HealthChecker
from laneproxy.lane import Lane
from laneproxy.router import Route, Router
from laneproxy.static import StaticFiles

log = logging.getLogger("laneproxy")

BACKLOG = 511  # as nginx
SHED_GRACE = 0.2  # at the drain deadline: time to send the 503s of requests still queued


PRIORITY = {"high": 0, "normal": 1, "low": 2}


def build_router(cfg: ProxyConfig, lanes: dict[str, Lane], previous: Router | None = None) -> Router:
    """The route table; a route unchanged since `previous` is kept (with its counters)."""
    old_routes = previous.routes() if previous is not None else {}
    routes = []
    for r in cfg.routes:
        static = None
        if r.try_files:
            static = StaticFiles(
                cfg.root_for(r), index=r.index, follow_symlinks=r.follow_symlinks,
                serve_hidden=r.serve_hidden, expires=r.expires, gzip_static=r.gzip_static,
            )
        route = Route(
            prefix=r.prefix.encode(), lane=lanes[r.lane], strip_prefix=r.strip_prefix,
            static=static, priority=PRIORITY[r.priority],
        )
        before = old_routes.get(route.prefix)
        if before is not None and before.same_as(route):
            route = before
        routes.append(route)
    return Router(routes)


class Proxy:
    """One proxy process: its lanes, router, listeners and client connections."""

    def __init__(self, cfg: ProxyConfig, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.cfg = cfg
        self.loop = loop or asyncio.get_running_loop()
        self.lanes = {name: Lane(name, lane_cfg, self.loop) for name, lane_cfg in cfg.lanes.items()}
        self.router = build_router(cfg, self.lanes)
        self.ctx = Context(self.loop, self.router, cfg.client)
        if cfg.access_log is not None:
            self.ctx.access_log = AccessLog(cfg.access_log, cfg.log_format, cfg.base_dir, self.loop)
        self.health = [HealthChecker(lane, lane.cfg.health) for lane in self.lanes.values() if lane.cfg.health]
        self.servers: list[asyncio.Server] = []
        self.listeners: dict[tuple[str, int], asyncio.Server] = {}  # configured address → server
        self.addresses: list[tuple[str, int]] = []
        self.retired: list[Lane] = []  # lanes replaced by a reload, draining their in-flight work
        self.reloads = 0
        self._stopped = asyncio.Event()
        self.admin = None  # aiohttp AppRunner of the admin listener, when configured

    async def start(self) -> None:
        """Bind every listener; on failure nothing stays bound."""
        try:
            for addr in self.cfg.listen:
                await self._bind(addr)
        except OSError:
            for server in self.servers:
                server.close()
            self.servers.clear()
            self.listeners.clear()
            self.addresses.clear()
            raise
        if self.cfg.admin is not None:
            from laneproxy.admin import start_admin  # the control plane stays off the data path's imports

            try:
                self.admin = await start_admin(self)
            except OSError:
                for server in self.servers:
                    server.close()
                raise
        for checker in self.health:
            checker.start()
        for host, port in self.addresses:
            log.info("listening on %s", self._shown(host, port))

    async def _bind(self, addr: tuple[str, int]) -> None:
        host, port = addr
        try:
            server = await self.loop.create_server(
                lambda: DownstreamProtocol(self.ctx), host, port,
                backlog=BACKLOG, reuse_address=True, reuse_port=True if self.cfg.workers > 1 else None,
            )
        except OSError as exc:  # name the address: "Name or service not known" alone says little
            raise OSError(exc.errno, f"{self._shown(host, port)}: {exc.strerror or exc}") from None
        self.servers.append(server)
        self.listeners[addr] = server
        for sock in server.sockets:
            bound = sock.getsockname()
            self.addresses.append((bound[0], bound[1]))
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @staticmethod
    def _shown(host: str, port: int) -> str:
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    # -- reload ----------------------------------------------------------------------------------

    async def reload(self, cfg: ProxyConfig | None = None) -> dict[str, object]:
        """Apply a new config without dropping anything (SIGHUP, POST /api/reload).

        The file is validated first (ConfigError leaves everything as it was). Lanes whose
        settings did not change keep their pools, queues and counters; changed or removed lanes
        finish their in-flight and queued exchanges on the old settings, then close. Open client
        connections and tunnels stay; listeners added or removed are bound or closed.
        """
        if self.ctx.closing:  # nginx and HAProxy ignore a reload once they are stopping
            raise Stopping("stopping: the reload is ignored")
        if cfg is None:
            cfg = load_config(self.cfg.path) if self.cfg.path is not None else self.cfg
        if cfg.workers != self.cfg.workers:
            cfg = cfg.model_copy(update={"workers": self.cfg.workers})  # processes: restart to change
        if cfg.workers > 1:
            from laneproxy.supervisor import share_limits

            cfg = share_limits(cfg)
            if self.cfg.admin is None:
                cfg = cfg.model_copy(update={"admin": None})
        old = self.cfg
        lanes: dict[str, Lane] = {}
        kept, changed = [], []
        for name, lane_cfg in cfg.lanes.items():
            lane = self.lanes.get(name)
            if lane is not None and lane.cfg == lane_cfg:
                lanes[name] = lane
                kept.append(name)
            else:
                lanes[name] = Lane(name, lane_cfg, self.loop)
                changed.append(name)
        retired = [lane for name, lane in self.lanes.items() if lanes.get(name) is not lane]
        # Bind new listeners before anything changes: a failure leaves the old config running.
        added = [addr for addr in cfg.listen if addr not in self.listeners]
        bound_before = set(self.listeners)
        try:
            for addr in added:
                await self._bind(addr)
        except OSError:
            for addr in set(self.listeners) - bound_before:
                self.listeners.pop(addr).close()
            raise
        router = build_router(cfg, lanes, previous=self.router)
        self.lanes = lanes
        self.router = self.ctx.router = router
        self.ctx.apply(cfg.client)
        for addr in old.listen:
            if addr not in cfg.listen and addr in self.listeners:
                server = self.listeners.pop(addr)
                server.close()
                self.servers.remove(server)
        if (cfg.access_log, cfg.log_format) != (old.access_log, old.log_format):
            if self.ctx.access_log is not None:
                self.ctx.access_log.close()
            self.ctx.access_log = (
                AccessLog(cfg.access_log, cfg.log_format, cfg.base_dir, self.loop) if cfg.access_log else None
            )
        for checker in [c for c in self.health if c.lane in retired]:
            await checker.stop()
            self.health.remove(checker)
        for name in changed:
            if lanes[name].cfg.health:
                checker = HealthChecker(lanes[name], lanes[name].cfg.health)
                checker.start()
                self.health.append(checker)
        self.retired += retired
        self._close_drained()
        self.cfg = cfg
        self.reloads += 1
        for addr in added:
            log.info("listening on %s", self._shown(*self.listeners[addr].sockets[0].getsockname()[:2]))
        summary = {"kept": kept, "changed": changed, "removed": [lane.name for lane in retired
                                                                  if lane.name not in lanes],
                   "listeners_added": [f"{h}:{p}" for h, p in added]}
        log.info("reloaded: %s", summary)
        return summary

    def _close_drained(self) -> None:
        """Close retired lanes once their last in-flight or queued exchange is done."""
        still = []
        for lane in self.retired:
            if lane.in_flight or len(lane.queue):
                still.append(lane)
            else:
                lane.close()
        self.retired = still
        if still:
            self.loop.call_later(0.1, self._close_drained)

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, let in-flight exchanges finish (with Connection: close), close pools."""
        if drain_timeout is None:
            drain_timeout = self.cfg.drain_timeout
        ctx = self.ctx
        ctx.closing = True
        for server in self.servers:
            server.close()
        for conn in list(ctx.connections):
            if conn.active is None and conn.current is None and not conn.in_head:
                conn.close()
        await self._until_drained(drain_timeout, 0.05)
        lanes = [*self.lanes.values(), *self.retired]
        if any(len(lane.queue) for lane in lanes):
            # Requests still queued never reached an upstream: a 503 (safe to retry, even a
            # POST) rather than a reset. A moment to send them, then the rest is cut.
            for lane in lanes:
                lane.shed_waiters()
            await self._until_drained(SHED_GRACE, 0.01)
        for conn in list(ctx.connections):
            conn.abort()
        for checker in self.health:
            await checker.stop()
        if self.admin is not None:
            await self.admin.cleanup()
            self.admin = None
        for lane in lanes:
            lane.close()
        if self.ctx.access_log is not None:
            self.ctx.access_log.close()
        self._stopped.set()

    async def _until_drained(self, seconds: float, step: float) -> None:
        """Wait until every client connection has closed, or `seconds` have passed."""
        deadline = self.loop.time() + seconds
        while self.ctx.connections and self.loop.time() < deadline:
            await asyncio.sleep(step)

    def stats(self) -> dict[str, object]:
        return {
            "connections": len(self.ctx.connections),
            "requests": self.ctx.requests,
            "lanes": {name: lane.stats() for name, lane in self.lanes.items()},
        }


async def serve(cfg: ProxyConfig, worker: int = 0) -> int:
    """Run until SIGTERM/SIGINT; then drain and return 0. A second signal stops at once."""
    loop = asyncio.get_running_loop()
    if worker:  # one admin listener per machine: worker 0 serves it
        cfg = cfg.model_copy(update={"admin": None})
    proxy = Proxy(cfg, loop)
    try:
        await proxy.start()
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        return 1
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("%s: stopping (draining up to %gs)", signal.Signals(signum).name, cfg.drain_timeout)
            proxy.ctx.closing = True  # from now on a SIGHUP is ignored
            stop.set()
        else:
            log.info("second signal: stopping at once")
            for conn in list(proxy.ctx.connections):
                conn.abort()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):  # SIGQUIT: nginx's graceful stop
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGUSR1, lambda: proxy.ctx.access_log and proxy.ctx.access_log.reopen())
    def on_hup() -> None:
        if proxy.ctx.closing:
            log.warning("SIGHUP ignored: stopping")
            return

        async def reload() -> None:
            try:
                await proxy.reload()
            except ConfigError as exc:
                log.error("reload refused, the running config stays:\n%s", "\n".join(exc.problems))
            except OSError as exc:
                log.error("reload refused, the running config stays: %s", exc)

        loop.create_task(reload())

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    rundir = os.environ.get("LANEPROXY_RUNDIR")
    publisher = None
    if rundir:  # under a supervisor: publish this worker's counters for the admin listener
        from laneproxy.adminstats import start_snapshot_writer

        publisher = start_snapshot_writer(proxy, Path(rundir), worker)
    await stop.wait()
    if publisher is not None:
        publisher.stop()
    await proxy.stop()
    log.info("stopped")
    return 0


def run(cfg: ProxyConfig) -> int:
    """Blocking entry point for `laneproxy run`: one process, or a supervisor and N workers."""
    if cfg.workers > 1:
        from laneproxy.supervisor import Supervisor

        return Supervisor(cfg).run()
    return run_worker(cfg, 0)


def run_worker(cfg: ProxyConfig, worker: int) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio still works
        return asyncio.run(serve(cfg, worker))
    return uvloop.run(serve(cfg, worker))
