"""Admin statistics as plain dicts: one process's snapshot, its publication, the sum over workers.

`status_snapshot(proxy)` reads the live objects (Context, Lane, LaneQueue, Server, Pool, Route)
into one JSON-able dict: what /api/status returns and what /metrics is generated from.

Under a supervisor (`workers: N`, env LANEPROXY_RUNDIR set) every worker publishes its snapshot
to `<rundir>/worker-<i>.json` about once a second (`SnapshotWriter`: a loop timer, write to a
temporary file then os.replace, so a reader never sees half a file). Worker 0's admin listener
answers from `cluster_snapshot`: its own live snapshot plus the other workers' files that are
fresh (a worker that died without removing its file stops counting after `FRESH` seconds), added
up by `merge_snapshots`:
- counters, gauges and histogram buckets/sum/count are summed; so are `limit` and `queue_size`,
  since each worker holds a share of them (see supervisor.share_limits);
- a server is `up` when it is up in any worker (some worker still sends it traffic), and its
  `state` is the most available one any worker sees; `overloaded` is true if any worker's queue is;
- settings (balance, weight, backup, queue_timeout, priority, ...) are the local worker's;
- lanes, servers and routes are matched by name (route: prefix), in the local order; one that
  only another worker has (a reload that reached it first) is appended.
`workers` says how many snapshots went into the sum (1 for one process).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from laneproxy import __version__

if TYPE_CHECKING:
    import asyncio

    from laneproxy.lane import Lane, Server
    from laneproxy.queue import Histogram
    from laneproxy.router import Route
    from laneproxy.server import Proxy

log = logging.getLogger("laneproxy.admin")

CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")  # Route.responses[1..5]; index 0 stays unused
PRIORITY_NAMES = {0: "high", 1: "normal", 2: "low"}
PERIOD = 1.0  # seconds between two publications of a worker's snapshot
FRESH = 5.0  # a worker file older than this is from a dead worker: ignored
STATE_RANK = {"up": 0, "backup": 1, "down": 2, "unhealthy": 3, "disabled": 4}  # most available first


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
        "failed": lane.failed,
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
    """Everything /api/status returns and /metrics shows, for this process: one consistent read."""
    ctx = proxy.ctx
    now = proxy.loop.time()
    return {
        "time": time.time(),
        "version": __version__,
        "workers": 1,
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


# -- adding snapshots up ---------------------------------------------------------------------------

TOP_SUMS = ("connections", "tunnels", "requests", "rejected_connections")
LANE_SUMS = ("in_flight", "limit", "queued", "queue_size", "served", "failed")
SERVER_SUMS = ("in_flight", "requests", "failures", "retried", "marked_down")


def _copy(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _add_counts(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, n in other.items():
        into[key] = into.get(key, 0) + n


def _add_histogram(into: dict[str, Any], other: dict[str, Any]) -> None:
    if list(into["bounds"]) != list(other["bounds"]):  # the bounds are constants: not expected
        log.warning("histogram bounds differ between workers; keeping one worker's")
        return
    into["buckets"] = [a + b for a, b in zip(into["buckets"], other["buckets"])]
    into["sum"] += other["sum"]
    into["count"] += other["count"]


def _by_name(into: list[dict[str, Any]], other: Iterable[dict[str, Any]], key: str, add) -> None:
    """Add each item of `other` to the item of `into` with the same `key`; append the new ones."""
    index = {item[key]: item for item in into}
    for item in other:
        mine = index.get(item[key])
        if mine is None:
            into.append(index.setdefault(item[key], _copy(item)))
        else:
            add(mine, item)


def _add_server(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key in SERVER_SUMS:
        into[key] += other[key]
    _add_counts(into["pool"], other["pool"])
    into["up"] = bool(into["up"] or other["up"])
    if STATE_RANK.get(other["state"], 9) < STATE_RANK.get(into["state"], 9):
        into["state"] = other["state"]


def _add_lane(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key in LANE_SUMS:
        into[key] = into.get(key, 0) + other.get(key, 0)  # tolerate a peer on an older snapshot shape
    into["overloaded"] = bool(into["overloaded"] or other["overloaded"])
    _add_counts(into["shed"], other["shed"])
    _add_histogram(into["queue_wait"], other["queue_wait"])
    _add_histogram(into["upstream_time"], other["upstream_time"])
    _by_name(into["servers"], other["servers"], "name", _add_server)


def _add_route(into: dict[str, Any], other: dict[str, Any]) -> None:
    _add_counts(into["responses"], other["responses"])


def merge_snapshots(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of several processes' snapshots (the first one's settings and order win)."""
    if not snapshots:
        raise ValueError("nothing to merge")
    total = _copy(snapshots[0])
    total.pop("worker", None)
    total.pop("pid", None)
    total["workers"] = 0
    for i, snap in enumerate(snapshots):
        total["workers"] += snap.get("workers", 1)
        if i == 0:
            continue
        for key in TOP_SUMS:
            total[key] += snap[key]
        _add_counts(total["local_responses"], snap["local_responses"])
        _by_name(total["lanes"], snap["lanes"], "name", _add_lane)
        _by_name(total["routes"], snap["routes"], "prefix", _add_route)
    total["local_responses"] = {k: total["local_responses"][k] for k in sorted(total["local_responses"], key=int)}
    return total


# -- publishing and reading the workers' files ------------------------------------------------------


def worker_file(rundir: Path, worker: int) -> Path:
    return rundir / f"worker-{worker}.json"


def read_peer_snapshots(rundir: Path, worker: int, fresh: float = FRESH) -> list[dict[str, Any]]:
    """The other workers' snapshots whose file was written less than `fresh` seconds ago."""
    own = worker_file(rundir, worker).name
    now = time.time()
    found = []
    try:
        paths = sorted(rundir.glob("worker-*.json"))
    except OSError:
        return []
    for path in paths:
        if path.name == own:
            continue
        try:
            if now - path.stat().st_mtime > fresh:
                continue  # a worker that died without removing its file
            snap = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue  # removed meanwhile (a worker stopping), or not ours
        if isinstance(snap, dict) and isinstance(snap.get("lanes"), list):
            found.append(snap)
    return found


def cluster_snapshot(proxy: Proxy, rundir: Path | None, worker: int = 0) -> dict[str, Any]:
    """This process's live snapshot, plus the fresh ones the other workers published under `rundir`."""
    own = status_snapshot(proxy)
    if rundir is None:
        return own
    return merge_snapshots([own, *read_peer_snapshots(rundir, worker)])


class SnapshotWriter:
    """Publishes one worker's snapshot to `<rundir>/worker-<i>.json` every `period` seconds."""

    def __init__(self, proxy: Proxy, rundir: Path, worker: int, period: float = PERIOD) -> None:
        self.proxy = proxy
        self.path = worker_file(rundir, worker)
        self.tmp = rundir / f".worker-{worker}.json.tmp"
        self.worker = worker
        self.period = period
        self.loop: asyncio.AbstractEventLoop = proxy.loop
        self.timer: asyncio.TimerHandle | None = None
        self.failed = False
        self.stopped = False

    def start(self) -> SnapshotWriter:
        self._tick()
        return self

    def _tick(self) -> None:
        self.timer = None
        self.write()
        if not self.stopped:
            self.timer = self.loop.call_later(self.period, self._tick)

    def write(self) -> None:
        snap = status_snapshot(self.proxy)
        snap["worker"] = self.worker
        snap["pid"] = os.getpid()
        data = json.dumps(snap, separators=(",", ":")).encode()
        try:
            self.tmp.write_bytes(data)
            os.replace(self.tmp, self.path)
        except OSError as exc:  # the run directory went away (supervisor stopping): say it once
            if not self.failed:
                log.warning("cannot publish worker %d stats to %s: %s", self.worker, self.path, exc)
            self.failed = True
        else:
            self.failed = False

    def stop(self) -> None:
        """Stop publishing and remove the file: the admin stops counting this worker at once."""
        self.stopped = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for path in (self.path, self.tmp):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove %s: %s", path, exc)


def start_snapshot_writer(proxy: Proxy, rundir: Path, worker: int, period: float = PERIOD) -> SnapshotWriter:
    """Publish now, then every `period` seconds until `.stop()` (which removes the file)."""
    return SnapshotWriter(proxy, rundir, worker, period).start()
