"""Server: build lanes and the router from a config, bind listeners, drain on stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from laneproxy.accesslog import AccessLog
from laneproxy.config import ProxyConfig
from laneproxy.downstream import Context, DownstreamProtocol
from laneproxy.health import HealthChecker
from laneproxy.lane import Lane
from laneproxy.router import Route, Router
from laneproxy.static import StaticFiles

log = logging.getLogger("laneproxy")

BACKLOG = 511  # as nginx


PRIORITY = {"high": 0, "normal": 1, "low": 2}


def build_router(cfg: ProxyConfig, lanes: dict[str, Lane]) -> Router:
    routes = []
    for r in cfg.routes:
        static = None
        if r.try_files:
            static = StaticFiles(
                cfg.root_for(r), index=r.index, follow_symlinks=r.follow_symlinks,
                serve_hidden=r.serve_hidden, expires=r.expires, gzip_static=r.gzip_static,
            )
        routes.append(Route(
            prefix=r.prefix.encode(), lane=lanes[r.lane], strip_prefix=r.strip_prefix,
            static=static, priority=PRIORITY[r.priority],
        ))
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
        self.addresses: list[tuple[str, int]] = []
        self._stopped = asyncio.Event()
        self.admin = None  # aiohttp AppRunner of the admin listener, when configured

    async def start(self) -> None:
        """Bind every listener; on failure nothing stays bound."""
        reuse_port = self.cfg.workers > 1
        try:
            for host, port in self.cfg.listen:
                server = await self.loop.create_server(
                    lambda: DownstreamProtocol(self.ctx), host, port,
                    backlog=BACKLOG, reuse_address=True, reuse_port=reuse_port or None,
                )
                self.servers.append(server)
                for sock in server.sockets:
                    addr = sock.getsockname()
                    self.addresses.append((addr[0], addr[1]))
                    if sock.family in (socket.AF_INET, socket.AF_INET6):
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            for server in self.servers:
                server.close()
            self.servers.clear()
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
            shown = f"[{host}]" if ":" in host else host
            log.info("listening on http://%s:%d", shown, port)

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
        deadline = self.loop.time() + drain_timeout
        while ctx.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(ctx.connections):
            conn.abort()
        for checker in self.health:
            await checker.stop()
        if self.admin is not None:
            await self.admin.cleanup()
            self.admin = None
        for lane in self.lanes.values():
            lane.close()
        if self.ctx.access_log is not None:
            self.ctx.access_log.close()
        self._stopped.set()

    def stats(self) -> dict[str, object]:
        return {
            "connections": len(self.ctx.connections),
            "requests": self.ctx.requests,
            "lanes": {name: lane.stats() for name, lane in self.lanes.items()},
        }


async def serve(cfg: ProxyConfig) -> int:
    """Run until SIGTERM/SIGINT; then drain and return 0. A second signal stops at once."""
    loop = asyncio.get_running_loop()
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
            stop.set()
        else:
            log.info("second signal: stopping at once")
            for conn in list(proxy.ctx.connections):
                conn.abort()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    if proxy.ctx.access_log is not None:
        loop.add_signal_handler(signal.SIGUSR1, proxy.ctx.access_log.reopen)
    loop.add_signal_handler(signal.SIGHUP, lambda: log.warning("SIGHUP: config reload is not implemented yet"))
    await stop.wait()
    await proxy.stop()
    log.info("stopped")
    return 0


def run(cfg: ProxyConfig) -> int:
    """Blocking entry point for `laneproxy run`."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio still works
        return asyncio.run(serve(cfg))
    return uvloop.run(serve(cfg))
