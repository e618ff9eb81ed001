"""Lane: a named group of upstream servers with its own pools, timeouts and limits."""

from __future__ import annotations

import asyncio

from laneproxy.config import LaneConfig
from laneproxy.pool import Pool


class Server:
    """One upstream endpoint of a lane, with its pool."""

    __slots__ = ("host", "port", "name", "pool", "failures")

    def __init__(self, host: str, port: int, cfg: LaneConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.host = host
        self.port = port
        self.name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.pool = Pool(self.name, cfg.keepalive, cfg.keepalive_timeout, cfg.keepalive_requests, loop)
        self.failures = 0

    def __repr__(self) -> str:
        return f"<Server {self.name} {self.pool!r}>"


class Lane:
    """`pick()` chooses the server for the next exchange (round robin)."""

    def __init__(self, name: str, cfg: LaneConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.cfg = cfg
        self.servers = [Server(h, p, cfg, loop) for h, p in cfg.servers]
        self._next = 0
        # Hot-path copies of the settings (attribute lookups on pydantic models are slower).
        self.max_body = cfg.max_body
        self.connect_timeout = cfg.connect_timeout
        self.read_timeout = cfg.read_timeout
        self.send_timeout = cfg.send_timeout
        self.retries = cfg.retries
        # Counters, plain integers read at scrape time.
        self.in_flight = 0
        self.served = 0
        self.failed = 0

    def pick(self, exclude: Server | None = None) -> Server:
        servers = self.servers
        n = len(servers)
        if n == 1:
            return servers[0]
        i = self._next
        self._next = (i + 1) % n
        server = servers[i % n]
        if server is exclude:
            server = servers[(i + 1) % n]
            self._next = (i + 2) % n
        return server

    def close(self) -> None:
        for server in self.servers:
            server.pool.close()

    def stats(self) -> dict[str, object]:
        return {
            "in_flight": self.in_flight, "served": self.served, "failed": self.failed,
            "servers": {s.name: s.pool.stats() for s in self.servers},
        }

    def __repr__(self) -> str:
        return f"<Lane {self.name} [in flight {self.in_flight}, servers {len(self.servers)}]>"
