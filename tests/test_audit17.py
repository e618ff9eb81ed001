"""Audit 17: cross-talk under concurrency, and the proxy's accounting after error paths.

1. Cross-talk. Many concurrent clients send a seeded-random mix (GET/HEAD/POST, Content-Length
   and chunked bodies, pipelined bursts, `Expect: 100-continue`, `Connection: close`, HTTP/1.0,
   random write splits), each request carrying a unique id in its target and in `X-Req-Id`.
   A scripted upstream (3 servers: one keeps connections, one closes them silently after 3
   answers, one announces `Connection: close` on every 4th) answers per id: at once, slowly,
   chunked, until close, 503, failing before its head on the first try, hanging on the first
   try, or failing mid-body. Every client must get exactly its own responses, in order, bodies
   byte-exact; every request reaches the upstream at most once unless a safe retry explains the
   second arrival (then the client gets the retry's answer), and a POST never twice.
2. Leaks and accounting. After the smuggling corpus, client aborts (mid-head, mid-body,
   mid-response, while queued, while connecting, after 100 Continue), upstream resets, read and
   client timeouts, queue sheds and retries, once everything settles: no lane in flight, no
   queue, pools consistent with the upstream's own count of open connections (connecting 0,
   active 0, idle = connections really open), no client connection left, no laneproxy task
   pending, no live protocol or exchange object holding a slot, and /metrics, /api/status and
   the /status page's snapshot agree with each other and with the live objects.

Randomness is seeded (`SEEDS`); a failure names the seed, the client and the request id.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import random
import re
import socket
import struct
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from laneproxy.downstream import DownstreamProtocol
from laneproxy.exchange import Exchange
from laneproxy.upstream import UpstreamProtocol
from tests.conftest import Upstream
from tests.test_smuggling_corpus import REQUEST_CASES, RESPONSE_CASES, Backend, drive

pytestmark = [pytest.mark.timeout(60)]

WAIT = 10.0  # bound for one response under the cross-talk load
SETTLE = 5.0  # bound for the proxy to come back to idle
SEEDS = (1701, 4242)
ACTIONS = {  # action -> weight in the cross-talk mix
    "ok": 30, "chunked": 12, "slow": 8, "untilclose": 5, "closeafter": 5, "s503": 5,
    "failfirst": 6, "hangfirst": 3, "failmid": 4,
}


# == the scripted upstream ==============================================================================


def resp_body(rid: str, attempt: int) -> bytes:
    """The body the upstream answers id `rid` with on its `attempt`-th arrival (0 B to 70 KB)."""
    rnd = random.Random(f"{rid}/{attempt}")
    return b"<%s#%d>" % (rid.encode(), attempt) + rnd.randbytes(rnd.choice([0, 1, 17, 1000, 20000, 70000]))


def digest(body: bytes) -> bytes:
    return b"%d:%s" % (len(body), hashlib.sha1(body).hexdigest()[:16].encode())


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class Arrival:
    server: int
    method: bytes
    got: bytes  # digest of the body the upstream received


class Script:
    """Upstream servers answering by the action named in the target: `/<lane>/<id>/<action>`."""

    def __init__(self) -> None:
        self.arrivals: dict[str, list[Arrival]] = defaultdict(list)
        self.open: Counter[int] = Counter()  # server index -> connections whose handler still runs
        self.problems: list[str] = []
        self.hold = asyncio.Event()  # `hold` answers wait for it
        self.arrived = asyncio.Event()  # set at every arrival (tests clear it and wait)
        self.ports: dict[int, int] = {}  # server index -> port

    async def start(self, upstream, policies: list[tuple[int, str]]) -> list[Upstream]:
        """One server per policy (close_after answers per connection, 0 = never; 'silent' or 'header')."""
        ups = []
        for idx, (close_after, style) in enumerate(policies):
            up = await upstream(self.handler(idx, close_after, style))
            self.ports[idx] = up.port
            ups.append(up)
        return ups

    def handler(self, idx: int, close_after: int, style: str):
        async def handle(reader, writer, up) -> None:
            self.open[idx] += 1
            served = 0
            try:
                while True:
                    try:
                        head, headers, body = await reader.read_request()
                    except (asyncio.IncompleteReadError, ConnectionError):
                        return
                    line = head.split(b"\r\n", 1)[0]
                    method, target, _ = line.split(b" ")
                    parts = target.decode().split("/")
                    rid, action = (parts[2], parts[3]) if len(parts) == 4 else (target.decode(), "ok")
                    if headers.get(b"x-req-id", [rid.encode()]) != [rid.encode()]:
                        self.problems.append(f"{rid}: X-Req-Id {headers.get(b'x-req-id')} on server {idx}")
                    if b"expect" in headers or headers.get(b"host") != [b"x.test"]:
                        self.problems.append(f"{rid}: forwarded head {head!r}")
                    self.arrivals[rid].append(Arrival(idx, method, digest(body)))
                    self.arrived.set()
                    served += 1
                    last = bool(close_after) and served >= close_after
                    keep = await self.respond(reader, writer, idx, method, rid, action,
                                              len(self.arrivals[rid]), digest(body), last and style == "header")
                    if not keep or last:
                        return
            finally:
                self.open[idx] -= 1

        return handle

    async def respond(self, reader, writer, idx: int, method: bytes, rid: str, action: str, attempt: int,
                      got: bytes, announce_close: bool) -> bool:
        """Answer one request; False: the connection ends here."""
        head_only = method == b"HEAD"
        body = resp_body(rid, attempt)
        fields = b"X-Echo-Id: %s\r\nX-Attempt: %d\r\nX-Got: %s\r\nX-Server: %d\r\n" % (rid.encode(), attempt, got, idx)
        first = attempt == 1
        if action == "failfirst" and first:
            return False  # closed before any response byte
        if action == "resetfirst" and first:
            reset(writer)
            return False
        if action == "hang" or (action == "hangfirst" and first):
            while await reader.read(65536):  # until laneproxy gives up on it
                pass
            return False
        if action == "hold":
            await self.hold.wait()
        if action == "slow":
            await asyncio.sleep(random.Random(rid).uniform(0.02, 0.15))  # a slow app, not a synchronisation
        status = b"503 Service Unavailable" if action == "s503" else b"200 OK"
        if action == "failmid" or action == "resetmid":
            writer.write(b"HTTP/1.1 200 OK\r\n%bContent-Length: %d\r\n\r\n%b"
                         % (fields, len(body) + 100, body[: len(body) // 2]))
            await writer.drain()
            if action == "resetmid":
                reset(writer)
            return False
        if action == "drip":  # far more than any buffer: stops only when laneproxy closes
            writer.write(b"HTTP/1.1 200 OK\r\n%bContent-Length: %d\r\n\r\n" % (fields, 1 << 30))
            while True:
                writer.write(b"d" * 65536)
                await writer.drain()
        if action == "untilclose":
            writer.write(b"HTTP/1.1 %b\r\n%b\r\n%b" % (status, fields, b"" if head_only else body))
            await writer.drain()
            return False
        close = b"Connection: close\r\n" if action == "closeafter" or announce_close else b""
        if action == "chunked":
            writer.write(b"HTTP/1.1 %b\r\n%b%bTransfer-Encoding: chunked\r\n\r\n" % (status, fields, close))
            if not head_only:
                rnd = random.Random(rid)
                pos = 0
                while pos < len(body):
                    n = rnd.randint(1, 30000)
                    writer.write(b"%x\r\n%b\r\n" % (len(body[pos:pos + n]), body[pos:pos + n]))
                    pos += n
                    if rnd.random() < 0.3:
                        await writer.drain()
                        await asyncio.sleep(0)
                writer.write(b"0\r\nX-Trailer: t\r\n\r\n" if rnd.random() < 0.5 else b"0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 %b\r\n%b%bContent-Length: %d\r\n\r\n%b"
                         % (status, fields, close, len(body), b"" if head_only else body))
        await writer.drain()
        return not close


def lane_cfg(ports: list[int], **settings) -> dict:
    return {"servers": [{"address": f"127.0.0.1:{p}", "max_fails": 0} for p in ports], **settings}


# == accounting: what "idle" means =======================================================================


def laneproxy_tasks() -> list[asyncio.Task]:
    """Pending tasks whose coroutine is laneproxy's own code."""
    out = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if not task.done() and code is not None and "/laneproxy/" in code.co_filename:
            out.append(task)
    return out


def all_servers(proxy):
    return [s for lane in [*proxy.lanes.values(), *proxy.retired] for s in lane.servers]


# Finding 1 (test_connecting_gauge_after_a_request_refused_in_the_read_that_started_its_connect),
# fixed: `pool.connecting` leaked when the connect task was cancelled before its first step.


def idle_problems(proxy, open_by_port: dict[int, int] | None) -> list[str]:
    """Everything that says the proxy is not back to idle (empty list: idle)."""
    problems = []
    ctx = proxy.ctx
    if ctx.connections:
        problems.append(f"client connections left: {sorted(map(repr, ctx.connections))[:5]}")
    if ctx.tunnels:
        problems.append(f"tunnels: {ctx.tunnels}")
    for lane in [*proxy.lanes.values(), *proxy.retired]:
        q = lane.queue
        if lane.in_flight or len(q) or q.in_flight or q._index or q._pending:
            problems.append(f"lane {lane.name}: in_flight {lane.in_flight}, queued {len(q)}, "
                            f"queue in_flight {q.in_flight}, index {len(q._index)}, pending {len(q._pending)}")
    idle_at: Counter[int] = Counter()
    for s in all_servers(proxy):
        pool = s.pool
        if s.in_flight or pool.active or pool.connecting:
            problems.append(f"server {s.name}: in_flight {s.in_flight}, active {pool.active}, "
                            f"connecting {pool.connecting}")
        for conn, _ in pool._idle:
            if conn.is_closed or conn.exchange is not None or not conn.is_idle:
                problems.append(f"server {s.name}: pooled connection not idle and open: {conn!r}")
        idle_at[s.port] += pool.idle
    if open_by_port is not None:
        for port, n in open_by_port.items():
            if idle_at[port] != n:
                problems.append(f"upstream :{port} has {n} open connections, laneproxy's pools hold {idle_at[port]}")
    tasks = laneproxy_tasks()
    if tasks:
        problems.append(f"laneproxy tasks pending: {tasks[:3]}")
    return problems


async def wait_idle(proxy, open_by_port=None, timeout: float = SETTLE) -> None:
    """Poll until the proxy is idle (with `open_by_port()`: the upstream's view agrees), or fail."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        problems = idle_problems(proxy, open_by_port() if open_by_port else None)
        if not problems:
            break
        if loop.time() > deadline:
            raise AssertionError(f"not idle after {timeout:g}s:\n  " + "\n  ".join(problems))
        await asyncio.sleep(0.02)
    # Nothing alive still holds a slot, a connection or a queue place (the object graph agrees).
    gc.collect()
    servers = set(map(id, all_servers(proxy)))
    pooled = {id(c) for s in all_servers(proxy) for c, _ in s.pool._idle}
    for obj in gc.get_objects():
        if isinstance(obj, UpstreamProtocol) and id(obj.server) in servers:
            assert obj.is_closed or id(obj) in pooled, f"open upstream connection outside any pool: {obj!r}"
        elif isinstance(obj, DownstreamProtocol) and obj.ctx is proxy.ctx:
            assert obj.is_closed, f"client connection not closed: {obj!r}"
        elif isinstance(obj, Exchange) and obj.down.ctx is proxy.ctx:
            assert not (obj.counted or obj.queued or obj.up is not None or obj.connect_task is not None), (
                f"finished exchange still holds something: {obj!r} counted={obj.counted} queued={obj.queued} "
                f"up={obj.up!r} task={obj.connect_task!r}"
            )


async def admin_get(proxy, path: str) -> str:
    port = proxy.admin.addresses[0][1]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        async with s.get(f"http://127.0.0.1:{port}{path}") as r:
            assert r.status == 200, path
            return await r.text()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


async def check_admin_agrees(proxy) -> dict:
    """/metrics, /api/status and the snapshot /status embeds agree with each other and the live objects."""
    metrics = samples(await admin_get(proxy, "/metrics"))
    api = json.loads(await admin_get(proxy, "/api/status"))
    page = await admin_get(proxy, "/status")
    m = re.search(r'<script id="snapshot" type="application/json">(.*?)</script>', page, re.S)
    assert m, "/status embeds no snapshot"
    embedded = json.loads(m.group(1).replace("<\\/", "</"))
    ctx = proxy.ctx

    def val(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        assert key in metrics, f"/metrics has no {name}{labels}"
        return metrics[key]

    for snap, where in ((api, "/api/status"), (embedded, "/status")):
        assert snap["connections"] == len(ctx.connections) == val("laneproxy_client_connections"), where
        assert snap["requests"] == ctx.requests == val("laneproxy_requests_total"), where
        assert snap["local_responses"] == {str(k): v for k, v in sorted(ctx.local_responses.items())}, where
        for status, n in ctx.local_responses.items():
            assert val("laneproxy_local_responses_total", status=str(status)) == n
        assert [ln["name"] for ln in snap["lanes"]] == list(proxy.lanes), where
        for ln in snap["lanes"]:
            lane = proxy.lanes[ln["name"]]
            name = lane.name
            live = {"in_flight": lane.in_flight, "queued": len(lane.queue), "served": lane.served,
                    "failed": lane.failed, "shed": dict(lane.queue.shed)}
            assert {k: ln[k] for k in live} == live, f"{where} lane {name}"
            assert val("laneproxy_lane_in_flight", lane=name) == lane.in_flight
            assert val("laneproxy_lane_queued", lane=name) == len(lane.queue)
            assert val("laneproxy_lane_served_total", lane=name) == lane.served
            assert val("laneproxy_lane_failed_total", lane=name) == lane.failed
            for reason, n in lane.queue.shed.items():
                assert val("laneproxy_lane_shed_total", lane=name, reason=reason) == n, (name, reason)
            assert val("laneproxy_lane_upstream_seconds_count", lane=name) == lane.upstream_time.count
            assert val("laneproxy_lane_queue_wait_seconds_count", lane=name) == lane.queue.wait.count
            for sj, s in zip(ln["servers"], lane.servers, strict=True):
                live_s = {"in_flight": s.in_flight, "requests": s.requests, "failures": s.failures,
                          "retried": s.retried, "pool": s.pool.stats()}
                assert {k: sj[k] for k in live_s} == live_s, f"{where} server {s.name}"
                labels = {"lane": name, "server": s.name}
                assert val("laneproxy_server_in_flight", **labels) == s.in_flight
                assert val("laneproxy_server_requests_total", **labels) == s.requests
                assert val("laneproxy_server_failures_total", **labels) == s.failures
                assert val("laneproxy_server_retries_total", **labels) == s.retried
                assert val("laneproxy_pool_idle_connections", **labels) == s.pool.idle
                assert val("laneproxy_pool_active_connections", **labels) == s.pool.active
                assert val("laneproxy_pool_connecting", **labels) == s.pool.connecting
                assert val("laneproxy_pool_connections_created_total", **labels) == s.pool.created
                assert val("laneproxy_pool_connections_reused_total", **labels) == s.pool.reused
        for rj, route in zip(snap["routes"], proxy.router._table.values(), strict=True):
            live_r = dict(zip(("1xx", "2xx", "3xx", "4xx", "5xx"), route.responses[1:6]))
            assert rj["responses"] == live_r, f"{where} route {rj['prefix']}"
            for cls, n in live_r.items():
                labels = {"lane": rj["lane"], "route": rj["prefix"], "class": cls}
                assert val("laneproxy_route_responses_total", **labels) == n, labels
    for lane in proxy.lanes:
        assert f'data-lane="{lane}"' in page, f"/status shows no card for lane {lane}"
    return api


# == raw HTTP on the client side ===========================================================================


class Aborted(Exception):
    """The connection ended inside a response (what laneproxy does after a failure mid-body)."""


async def read_message(reader: asyncio.StreamReader, method: bytes, deadline: float):
    """One response: (status, {name: [values]}, body); Aborted when it is cut short."""
    loop = asyncio.get_running_loop()

    async def timed(coro):
        left = deadline - loop.time()
        if left <= 0:
            coro.close()
            raise AssertionError("no complete response in time")
        try:
            return await asyncio.wait_for(coro, left)
        except TimeoutError:
            raise AssertionError("no complete response in time") from None

    try:
        head = await timed(reader.readuntil(b"\r\n\r\n"))
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(b":")
                headers.setdefault(name.strip().lower(), []).append(value.strip())
        if method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
            return status, headers, b""
        if b"content-length" in headers:
            return status, headers, await timed(reader.readexactly(int(headers[b"content-length"][0])))
        if headers.get(b"transfer-encoding") == [b"chunked"]:
            parts = []
            while True:
                size = int((await timed(reader.readuntil(b"\r\n"))).split(b";")[0], 16)
                if size == 0:
                    assert await timed(reader.readuntil(b"\r\n")) == b"\r\n", "trailers sent unasked"
                    break
                parts.append(await timed(reader.readexactly(size)))
                assert await timed(reader.readexactly(2)) == b"\r\n"
            return status, headers, b"".join(parts)
        data = bytearray()
        while chunk := await timed(reader.read(65536)):
            data += chunk
        return status, headers, bytes(data)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise Aborted(str(exc)) from None


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 3.0) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), timeout) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


# == 1. cross-talk =====================================================================================


@dataclass
class Req:
    rid: str
    method: bytes
    lane: str
    action: str
    body: bytes = b""
    chunked: bool = False
    version: bytes = b"1.1"
    close: bool = False
    expect: bool = False
    resp: tuple[int, dict, bytes] | None = None
    partial: bool = False
    lost: bool = False
    says_close: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def idempotent(self) -> bool:
        return self.method in (b"GET", b"HEAD")

    def head(self) -> bytes:
        lines = [b"%s /%s/%s/%s HTTP/%s" % (self.method, self.lane.encode(), self.rid.encode(),
                                             self.action.encode(), self.version),
                 b"Host: x.test", b"X-Req-Id: " + self.rid.encode()]
        if self.close:
            lines.append(b"Connection: close")
        if self.expect:
            lines.append(b"Expect: 100-continue")
        if self.method == b"POST":
            lines.append(b"Transfer-Encoding: chunked" if self.chunked else b"Content-Length: %d" % len(self.body))
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def framed_body(self, rnd: random.Random) -> bytes:
        if self.method != b"POST":
            return b""
        if not self.chunked:
            return self.body
        out, pos = [], 0
        while pos < len(self.body):
            n = rnd.choice([1, 7, 512, 4096, 30000])
            piece = self.body[pos:pos + n]
            out.append(b"%x\r\n%b\r\n" % (len(piece), piece))
            pos += n
        return b"".join(out) + b"0\r\n\r\n"


def plan_client(seed: int, client: int) -> tuple[random.Random, list[list[Req]]]:
    """The bursts one client sends (each burst on one connection, pipelined)."""
    rnd = random.Random(f"{seed}/{client}")
    bursts, n = [], 0
    actions, weights = list(ACTIONS), list(ACTIONS.values())
    for _ in range(rnd.randint(5, 9)):
        size = rnd.choice([1, 1, 1, 2, 3, 5])
        burst = []
        for i in range(size):
            method = rnd.choices([b"GET", b"HEAD", b"POST"], [45, 10, 45])[0]
            action = rnd.choices(actions, weights)[0]
            while method == b"HEAD" and action == "failmid":
                action = rnd.choices(actions, weights)[0]
            req = Req(f"c{client}-{n}", method, rnd.choice(["a", "q"]), action)
            n += 1
            if method == b"POST":
                req.body = rnd.randbytes(rnd.choice([0, 1, 100, 5000, 40000, 100000]))
                req.chunked = rnd.random() < 0.4
            last = i == size - 1
            if last and rnd.random() < 0.12:
                req.close = True
            elif last and rnd.random() < 0.1:
                req.version = b"1.0"  # 1.0: Content-Length bodies only, and the connection ends
                req.chunked = False
            if size == 1 and method == b"POST" and req.body and req.version == b"1.1" and rnd.random() < 0.5:
                req.expect = True
            burst.append(req)
        bursts.append(burst)
    return rnd, bursts


async def run_client(port: int, seed: int, client: int) -> list[Req]:
    rnd, bursts = plan_client(seed, client)
    loop = asyncio.get_running_loop()
    reader = writer = None
    sent: list[Req] = []
    try:
        for burst in bursts:
            sent += burst
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            go_on = asyncio.Event()  # Expect: the body waits for the 100 (or a final answer)
            if not burst[0].expect:
                go_on.set()
            wire = b"".join(r.head() + r.framed_body(rnd) for r in burst)
            first_head = len(burst[0].head()) if burst[0].expect else len(wire)
            cuts = sorted(rnd.sample(range(1, len(wire)), min(rnd.randint(0, 3), len(wire) - 1)))
            pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)])]
            pauses = [rnd.random() < 0.5 for _ in pieces]

            async def send(w=writer, pieces=pieces, pauses=pauses, first_head=first_head, go_on=go_on) -> None:
                pos = 0
                try:
                    for piece, pause in zip(pieces, pauses):
                        if pos >= first_head and not go_on.is_set():
                            await go_on.wait()
                        if pos < first_head < pos + len(piece):  # the Expect head alone first
                            w.write(piece[: first_head - pos])
                            await w.drain()
                            await go_on.wait()
                            piece = piece[first_head - pos:]
                            pos = first_head
                        w.write(piece)
                        pos += len(piece)
                        await w.drain()
                        if pause:
                            await asyncio.sleep(0.001)  # shapes TCP segments only
                except ConnectionError:
                    pass

            sender = asyncio.create_task(send())
            broken = False
            deadline = loop.time() + WAIT
            for i, req in enumerate(burst):
                if broken:
                    req.lost = True
                    continue
                try:
                    status, headers, body = await read_message(reader, req.method, deadline)
                    if req.expect and status == 100:
                        go_on.set()
                        status, headers, body = await read_message(reader, req.method, deadline)
                    elif req.expect:
                        req.problems.append(f"Expect: 100-continue got {status} before 100")
                        go_on.set()
                except Aborted:
                    req.partial = True
                    broken = True
                    continue
                req.resp = (status, headers, body)
                req.says_close = says_close = b"close" in [v.lower() for v in headers.get(b"connection", [])]
                if says_close:
                    if not await closed_by_peer(reader):
                        req.problems.append("Connection: close but the connection stayed open")
                    broken = True
            go_on.set()
            if broken:
                sender.cancel()
            done, _ = await asyncio.wait([sender], timeout=WAIT)
            assert done, f"client {client}: the request bytes were not taken in {WAIT}s"
            if broken:
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()
    return sent


def check_request(req: Req, arrivals: list[Arrival]) -> list[str]:
    """What went wrong with one request, judged by its response and the upstream's arrivals."""
    bad = list(req.problems)
    n = len(arrivals)
    retried = req.action in ("failfirst", "hangfirst")
    if any(a.method != req.method for a in arrivals):
        bad.append(f"upstream saw methods {[a.method for a in arrivals]}")
    if any(a.got != digest(req.body) for a in arrivals):
        bad.append(f"upstream got body {[a.got for a in arrivals]}, sent {digest(req.body)}")
    if not req.idempotent and n > 1:
        bad.append(f"non-idempotent request reached the upstream {n} times")
    if req.lost:
        if n:
            bad.append(f"behind an aborted response, yet reached the upstream {n} times")
        return bad
    if req.partial:
        if req.action != "failmid" or n != 1:
            bad.append(f"response cut short (action {req.action}, arrivals {n})")
        return bad
    assert req.resp is not None
    status, headers, body = req.resp
    echo = headers.get(b"x-echo-id")
    must_close = req.close or req.version == b"1.0"
    if req.says_close != must_close and not (
        req.says_close and echo is None and status == 502 and not req.idempotent and n == 0
    ):  # (a keep-alive race while the body still came in: 502 and close, the rest of the body unread)
        bad.append(f"Connection: close {req.says_close}, expected {must_close}")
    if echo is not None:  # the upstream's answer
        if echo != [req.rid.encode()]:
            return [*bad, f"got the response of {echo} (CROSS-TALK)"]
        attempt = int(headers[b"x-attempt"][0])
        if attempt != n:
            bad.append(f"relayed the answer to arrival {attempt} of {n}")
        want_n = 2 if retried and req.idempotent else 1
        if n != want_n:
            bad.append(f"{req.action}: {n} arrivals, expected {want_n}")
        want_status = 503 if req.action == "s503" else 200
        if status != want_status:
            bad.append(f"status {status}, expected {want_status}")
        if headers.get(b"x-got") != [digest(req.body)]:
            bad.append(f"upstream echoed body {headers.get(b'x-got')}, sent {digest(req.body)}")
        want = b"" if req.method == b"HEAD" else resp_body(req.rid, attempt)
        if body != want:
            bad.append(f"body of {len(body)} bytes differs from the {len(want)} expected")
        if b"x-trailer" in headers:
            bad.append("trailer relayed to a client that did not ask")
    else:  # laneproxy's own answer: only where the upstream failed it and no retry was safe
        ok = (
            (status == 502 and not req.idempotent and (n == 0 or (req.action == "failfirst" and n == 1)))
            or (status == 504 and not req.idempotent and req.action == "hangfirst" and n == 1)
        )
        if not ok:
            bad.append(f"laneproxy answered {status} itself (action {req.action}, arrivals {n}): {body[:120]!r}")
    return bad


@pytest.mark.parametrize("seed", SEEDS)
async def test_concurrent_clients_get_exactly_their_own_responses(start_proxy, upstream, seed):
    script = Script()
    await script.start(upstream, [(0, "silent"), (3, "silent"), (4, "header")])
    ports = list(script.ports.values())
    cfg = {
        "version": 1, "listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"},
        "lanes": {
            "a": lane_cfg(ports, read_timeout="1500ms", keepalive=4),
            "q": lane_cfg(ports, balance="least_conn", read_timeout="1500ms", limit=3, queue=500,
                          queue_timeout="30s", queue_target="10s"),
        },
        "routes": [{"prefix": "/a/", "lane": "a"}, {"prefix": "/q/", "lane": "q"}],
    }
    proxy = await start_proxy(cfg)
    clients = 40
    results = await asyncio.wait_for(
        asyncio.gather(*(run_client(proxy.port, seed, c) for c in range(clients))), 40
    )
    reqs = [r for rs in results for r in rs]
    sent = {r.rid for r in reqs}
    failures = [f"{r.rid} {r.method.decode()} /{r.lane} {r.action}"
                f"{' chunked' if r.chunked else ''}{' 1.0' if r.version == b'1.0' else ''}: {p}"
                for r in reqs for p in check_request(r, script.arrivals.get(r.rid, []))]
    failures += [f"upstream: {p}" for p in script.problems]
    failures += [f"upstream got unknown id {rid}" for rid in script.arrivals if rid not in sent]
    assert not failures, f"seed {seed}: {len(failures)} problems:\n" + "\n".join(failures[:40])
    answered = [r for r in reqs if r.resp is not None]
    assert len(answered) > 0.8 * len(reqs), "the mix should mostly get answers"
    assert sum(1 for r in reqs if r.partial) > 0 and any(len(script.arrivals[r.rid]) == 2 for r in reqs)

    await wait_idle(proxy, lambda: {script.ports[i]: script.open[i] for i in script.ports})
    api = await check_admin_agrees(proxy)
    # The numbers say what the clients saw: every complete response is counted by its class, once.
    by_route: dict[str, Counter] = {"/a/": Counter(), "/q/": Counter()}
    for r in answered:
        by_route[f"/{r.lane}/"][f"{r.resp[0] // 100}xx"] += 1
    for route in api["routes"]:
        assert {k: v for k, v in route["responses"].items() if v} == dict(by_route[route["prefix"]]), route
    for lane in api["lanes"]:
        mine = [r for r in reqs if r.lane == lane["name"]]
        own_errors = sum(1 for r in mine if r.resp is not None and b"x-echo-id" not in r.resp[1])
        assert lane["failed"] == own_errors + sum(1 for r in mine if r.partial), lane["name"]
        assert lane["served"] == sum(1 for r in mine if r.resp is not None), lane["name"]
        assert lane["shed"] == {"full": 0, "timeout": 0, "codel": 0, "client_gone": 0, "stopping": 0}
    assert not api["local_responses"]


# == 2. accounting after error paths ========================================================================


async def test_smuggling_corpus_leaves_the_proxy_idle(start_proxy, upstream):
    """Every request case of the corpus against one proxy (concurrently), every response case against
    its own proxy; each proxy comes back to idle and its admin numbers agree."""
    open_conns: Counter[tuple[int, int]] = Counter()

    def counted(handler, key):
        async def handle(reader, writer, up):
            open_conns[key] += 1
            try:
                await handler(reader, writer, up)
            finally:
                open_conns[key] -= 1
        return handle

    client = {"header_timeout": "1s", "body_timeout": "1s"}
    backend = Backend()
    up = await upstream(counted(backend.handler, (0, 0)))
    main = await start_proxy({
        "version": 1, "listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}, "client": client,
        "lanes": {"app": lane_cfg([up.port])}, "routes": [{"prefix": "/", "lane": "app"}],
    })
    proxies = [(main, {up.port: (0, 0)})]
    for i, case in enumerate(RESPONSE_CASES, 1):
        b = Backend(case.respond, case.action, case.stray)
        u = await upstream(counted(b.handler, (i, 0)))
        p = await start_proxy({"version": 1, "listen": "127.0.0.1:0", "client": client,
                               "lanes": {"app": lane_cfg([u.port])}, "routes": [{"prefix": "/", "lane": "app"}]})
        proxies.append((p, {u.port: (i, 0)}))
    runs = [drive(main.port, c, wait=5.0) for c in REQUEST_CASES if not c.cfg]
    runs += [drive(p.port, c, wait=5.0) for (p, _), c in zip(proxies[1:], RESPONSE_CASES)]
    observations = await asyncio.wait_for(asyncio.gather(*runs), 30)
    assert all(o.canary == (200, b"GET /canary body=0") for o in observations), "a canary failed"
    for proxy, ports in proxies:
        await wait_idle(proxy, lambda ports=ports: {port: open_conns[key] for port, key in ports.items()})
    api = await check_admin_agrees(main)
    assert api["local_responses"], "the corpus's rejections are counted as laneproxy's own answers"


class Clients:
    """Raw client connections a test opens; all closed at the end (pass or fail)."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []

    async def open(self, port: int, data: bytes = b""):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self.writers.append(writer)
        if data:
            writer.write(data)
            await writer.drain()
        return reader, writer

    def close(self) -> None:
        for w in self.writers:
            w.close()


async def until(predicate, what: str, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.005)


def get(path: str, extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x.test\r\n%b\r\n" % (path.encode(), extra)


def post(path: str, body: bytes, extra: bytes = b"", declared: int | None = None) -> bytes:
    n = len(body) if declared is None else declared
    return b"POST %s HTTP/1.1\r\nHost: x.test\r\nContent-Length: %d\r\n%b\r\n%b" % (path.encode(), n, extra, body)


async def test_aborts_resets_timeouts_sheds_and_retries_leave_the_proxy_idle(start_proxy, upstream):
    script = Script()
    await script.start(upstream, [(0, "silent"), (0, "silent")])
    s0, s1 = script.ports[0], script.ports[1]
    # A server that never accepts: its backlog is full, so connects hang (connect_timeout).
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    fillers = []
    for _ in range(3):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(blackhole.getsockname())
        fillers.append(f)
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
    cfg = {
        "version": 1, "listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"},
        "client": {"header_timeout": "400ms", "body_timeout": "400ms"},
        "lanes": {
            "app": lane_cfg([s0, s1], read_timeout="400ms"),
            "q": lane_cfg([s0], limit=1, queue=1, queue_timeout="400ms", queue_target="5s"),
            "dead": lane_cfg([blackhole.getsockname()[1]], connect_timeout="300ms"),
            "refused": lane_cfg([refused.getsockname()[1]]),
        },
        "routes": [{"prefix": "/a/", "lane": "app"}, {"prefix": "/q/", "lane": "q"},
                   {"prefix": "/dead/", "lane": "dead"}, {"prefix": "/refused/", "lane": "refused"}],
    }
    proxy = await start_proxy(cfg)
    port = proxy.port
    lanes = proxy.lanes
    c = Clients()
    loop = asyncio.get_running_loop()

    def arrivals(rid: str) -> int:
        return len(script.arrivals.get(rid, []))

    async def status_of(data: bytes, method: bytes = b"GET") -> int:
        reader, _ = await c.open(port, data)
        return (await read_message(reader, method, loop.time() + 5))[0]

    try:
        # -- client aborts -------------------------------------------------------------------
        # mid-head (reset), mid-body (FIN, then reset) with the upstream already receiving, mid chunked body
        _, w = await c.open(port, b"GET /a/x1/ok HTTP/1.1\r\nHost: x.te")
        await until(lambda: proxy.ctx.requests >= 1, "the head started")
        reset(w)
        _, w = await c.open(port, post("/a/x2/ok", b"half", declared=100))
        await until(lambda: script.open[0] + script.open[1] >= 1, "the upstream got the head")
        w.close()
        _, w = await c.open(port, post("/a/x3/ok", b"x" * 1000, declared=5000))
        await until(lambda: lanes["app"].in_flight == 1, "the POST is in flight")
        reset(w)
        _, w = await c.open(port, b"POST /a/x4/ok HTTP/1.1\r\nHost: x.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"5\r\nhello\r\n")
        await until(lambda: lanes["app"].in_flight == 1, "the chunked POST is in flight")
        w.close()
        await until(lambda: lanes["app"].in_flight == 0, "the aborted requests left the lane")
        # mid-response: a body far larger than any buffer; the client reads the head and leaves
        reader, w = await c.open(port, get("/a/x5/drip"))
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        await reader.readexactly(100_000)
        reset(w)
        # while the upstream thinks (it hangs until laneproxy closes), and after 100 Continue
        reader, w = await c.open(port, get("/a/x6/hangfirst"))
        await until(lambda: arrivals("x6") == 1, "the upstream got it")
        reset(w)
        reader, w = await c.open(port, post("/a/x7/ok", b"", b"Expect: 100-continue\r\n", declared=10))
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        w.close()
        # pipelined requests behind one that hangs: the client leaves, none of them is sent
        reader, w = await c.open(port, get("/a/x8/hang") + get("/a/x9/ok") + post("/a/x10/ok", b"body"))
        await until(lambda: arrivals("x8") == 1, "the first pipelined request arrived")
        reset(w)
        await until(lambda: lanes["app"].in_flight == 0, "the aborted exchanges left the lane")
        assert [arrivals(r) for r in ("x1", "x2", "x3", "x4", "x6", "x9", "x10")] == [0, 0, 0, 0, 1, 0, 0]

        # -- upstream resets and failures, retries --------------------------------------------
        assert await status_of(get("/a/y1/resetfirst")) == 200 and arrivals("y1") == 2  # retried
        assert await status_of(post("/a/y2/resetfirst", b"data")) == 502 and arrivals("y2") == 1
        reader, _ = await c.open(port, get("/a/y3/resetmid"))
        with pytest.raises(Aborted):
            await read_message(reader, b"GET", loop.time() + 5)
        assert await status_of(get("/a/y4/failfirst")) == 200 and arrivals("y4") == 2
        # read timeouts: a GET is retried once on the other server, then 504; a POST is not retried
        assert await status_of(get("/a/y5/hang")) == 504 and arrivals("y5") == 2
        assert await status_of(post("/a/y6/hangfirst", b"p")) == 504 and arrivals("y6") == 1
        # -- client timeouts --------------------------------------------------------------------
        reader, _ = await c.open(port, b"GET /a/z1/ok HTTP/1.1\r\nHost: x")
        assert (await read_message(reader, b"GET", loop.time() + 5))[0] == 408
        assert await closed_by_peer(reader)
        reader, _ = await c.open(port, post("/a/z2/ok", b"abc", declared=10))
        assert (await read_message(reader, b"GET", loop.time() + 5))[0] == 408
        assert await closed_by_peer(reader)
        # -- connect failures ---------------------------------------------------------------------
        assert await status_of(get("/dead/d1/ok")) == 504
        reader, w = await c.open(port, get("/dead/d2/ok"))
        dead_pool = lanes["dead"].servers[0].pool
        await until(lambda: dead_pool.connecting == 1, "the connect is pending")
        reset(w)
        await until(lambda: dead_pool.connecting == 0, "the aborted connect was given up")
        assert await status_of(get("/refused/r1/ok")) == 502
        assert await status_of(post("/refused/r2/ok", b"body")) == 502

        # -- the lane queue: full, timeout, client gone -------------------------------------------
        q = lanes["q"].queue
        script.hold.clear()
        holder, _ = await c.open(port, get("/q/h1/hold"))
        await until(lambda: arrivals("h1") == 1, "the slot holder arrived")
        waiter, _ = await c.open(port, get("/q/h2/ok"))
        await until(lambda: len(q) == 1, "a waiter is queued")
        assert await status_of(get("/q/h3/ok")) == 503  # queue full
        status, headers, _ = await read_message(waiter, b"GET", loop.time() + 5)
        assert status == 503 and headers[b"retry-after"]  # waited past queue_timeout
        _, w = await c.open(port, get("/q/h4/ok"))
        await until(lambda: len(q) == 1, "a second waiter is queued")
        w.close()
        await until(lambda: len(q) == 0, "the gone waiter left the queue")
        _, w = await c.open(port, post("/q/h5/ok", b"x" * 10, declared=20))  # queued with its body held
        await until(lambda: len(q) == 1, "a waiter with a body is queued")
        reset(w)
        await until(lambda: len(q) == 0, "the reset waiter left the queue")
        script.hold.set()
        assert (await read_message(holder, b"GET", loop.time() + 5))[0] == 200
        assert q.shed == {"full": 1, "timeout": 1, "codel": 0, "client_gone": 2, "stopping": 0}
        assert [arrivals(r) for r in ("h2", "h3", "h4", "h5")] == [0, 0, 0, 0]
        # The proxy still serves every lane that has a live server.
        assert await status_of(get("/a/k1/ok")) == 200
        assert await status_of(get("/q/k2/ok")) == 200
    finally:
        c.close()
        script.hold.set()
        for sock in [*fillers, blackhole, refused]:
            sock.close()

    await wait_idle(proxy, lambda: {s0: script.open[0], s1: script.open[1]})
    api = await check_admin_agrees(proxy)
    assert api["local_responses"] == {"408": 1}  # the head timeout (the body timeout is the route's)
    app = next(ln for ln in api["lanes"] if ln["name"] == "app")
    assert sum(s["retried"] for s in app["servers"]) >= 3  # y1, y4, y5 (a reused-connection race may add one)
    dead = next(ln for ln in api["lanes"] if ln["name"] == "dead")
    assert dead["servers"][0]["pool"]["created"] == 0 and dead["failed"] >= 1


async def test_connecting_gauge_after_a_request_refused_in_the_read_that_started_its_connect(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy({
        "version": 1, "listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"},
        "lanes": {"app": lane_cfg([up.port])}, "routes": [{"prefix": "/", "lane": "app"}],
    })
    pool = proxy.lanes["app"].servers[0].pool
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:  # one write: the head starts a connect (the pool is empty), the bad chunk size refuses it
        writer.write(b"POST /c HTTP/1.1\r\nHost: x.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n")
        loop = asyncio.get_running_loop()
        assert (await read_message(reader, b"POST", loop.time() + 5))[0] == 400
        assert await closed_by_peer(reader)
    finally:
        writer.close()
    await wait_idle(proxy, lambda: {up.port: 0})
    assert pool.connecting == 0, f"pool.connecting {pool.connecting} with no connect in progress"
    metrics = samples(await admin_get(proxy, "/metrics"))
    labels = frozenset({"lane": "app", "server": f"127.0.0.1:{up.port}"}.items())
    assert metrics[("laneproxy_pool_connecting", labels)] == 0
