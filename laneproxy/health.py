"""Active health checks: one task per server of a lane with `health:`, on its own connections.

A check is `GET path HTTP/1.1` with `Connection: close` on a fresh connection (never one of the
pool's), passing on a 2xx/3xx status (or one listed in `health.status`) within `timeout`.
`fall` failures in a row take the server out; `rise` passes in a row bring it back.
"""

from __future__ import annotations

import asyncio
import logging

from laneproxy.config import HealthConfig
from laneproxy.lane import Lane, Server

log = logging.getLogger("laneproxy.health")


async def probe(server: Server, cfg: HealthConfig) -> bool:
    """One check; True when the server answered a passing status in time."""
    writer = None
    try:
        async with asyncio.timeout(cfg.timeout):
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(
                b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: laneproxy-health\r\nConnection: close\r\n\r\n"
                % (cfg.path.encode(), server.name.encode())
            )
            line = await reader.readline()
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return False
    status = int(parts[1])
    return status in cfg.status if cfg.status else 200 <= status < 400


class HealthChecker:
    """Runs the checks of one lane until stopped."""

    def __init__(self, lane: Lane, cfg: HealthConfig) -> None:
        self.lane = lane
        self.cfg = cfg
        self.tasks: list[asyncio.Task[None]] = []
        self.streak: dict[str, int] = {}  # >0 passes in a row, <0 failures in a row

    def start(self) -> None:
        for server in self.lane.servers:
            if not server.cfg.down:
                self.tasks.append(asyncio.get_running_loop().create_task(self._run(server)))

    async def _run(self, server: Server) -> None:
        cfg = self.cfg
        while True:
            ok = await probe(server, cfg)
            self.record(server, ok)
            await asyncio.sleep(cfg.interval)

    def record(self, server: Server, ok: bool) -> None:
        streak = self.streak.get(server.name, 0)
        streak = (max(streak, 0) + 1) if ok else (min(streak, 0) - 1)
        self.streak[server.name] = streak
        if server.health_ok and streak <= -self.cfg.fall:
            server.health_ok = False
            log.warning("upstream %s (lane %s): health check failed %d times, out", server.name,
                        self.lane.name, -streak)
        elif not server.health_ok and streak >= self.cfg.rise:
            server.health_ok = True
            log.info("upstream %s (lane %s): health check passed %d times, back", server.name,
                     self.lane.name, streak)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
