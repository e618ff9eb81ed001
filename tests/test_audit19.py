"""Audit 19: lifecycle under load, black box, as an nginx/HAProxy operator expects it.

laneproxy runs as its own process (tests/process.py) and is driven by signals and by the admin
`POST /api/reload`; every assertion is on what a client, an upstream or an operator sees: status
codes, bytes, connection state, exit codes and timing, log lines.

- graceful stop (SIGTERM; SIGINT is the same handler) with requests in flight, requests waiting
  in a lane queue, idle keep-alive connections, an upload half sent and WebSocket tunnels;
- reload (SIGHUP and `POST /api/reload`) while traffic flows: routes and lanes change for new
  requests, in-flight and queued work on a removed lane completes, invalid files are refused
  with a clear log line, a changed listen address moves the listener but keeps open connections;
- `workers: 2`: a SIGKILLed worker's port keeps answering before its replacement exists, and a
  SIGTERM to the supervisor drains every worker.

Findings, fixed: a request still waiting in a lane queue at the drain deadline was cut without
an answer (now 503 + Retry-After), a SIGHUP during the drain bound a listener that accepted and
reset (now ignored, as nginx and HAProxy do), and SIGQUIT, nginx's graceful-stop signal, killed
the process at once (now a graceful stop like SIGTERM).

Existing tests already cover: a single in-flight exchange on stop (test_e2e_lifecycle, audit 5),
a second SIGTERM, invalid SIGHUP without load, ten read_timeout-only reloads under load, listeners
added and removed in-process, a worker replaced after SIGKILL. They are not repeated here.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import (
    exchange,
    is_closed,
    make_config,
    open_client,
    open_tracked_client,
    read_response,
    read_until_closed,
)
from tests.process import spawn_proxy, stop_proxy

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("close_tracked_clients")]

GET = b"GET /%s HTTP/1.1\r\nHost: t\r\n\r\n"
SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)
WS_HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


# -- helpers --------------------------------------------------------------------------------------


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll a condition with a deadline (for state that has no event to await)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"{what}: not reached in {timeout}s"
        await asyncio.sleep(0.01)


def log_text(tmp_path: Path) -> str:
    return (tmp_path / "proxy.log").read_text()


async def wait_log(tmp_path: Path, needle: str, count: int = 1, timeout: float = 5.0) -> str:
    await until(lambda: log_text(tmp_path).count(needle) >= count, timeout,
                f"log line {needle!r} x{count}; log: {log_text(tmp_path)[-1500:]}")
    return log_text(tmp_path)


async def wait_exit(proc, timeout: float) -> int:
    return await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)


def kill_if_running(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


async def refused(port: int) -> bool:
    """True when a new connection to `port` is refused (the listener is closed)."""
    try:
        _, w = await asyncio.wait_for(open_client(port), 2)
    except OSError:
        return True
    w.close()
    return False


async def metric(admin_port: int, name: str, lane: str) -> float:
    _, _, body = await exchange(admin_port, b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    m = re.search(rb'^%s\{lane="%s"\} (\S+)$' % (name.encode(), lane.encode()), body, re.M)
    return float(m.group(1)) if m else 0.0


async def wait_metric(admin_port: int, name: str, lane: str, value: float, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (got := await metric(admin_port, name, lane)) != value:
        assert loop.time() < deadline, f"{name}{{lane={lane}}} is {got}, want {value}"
        await asyncio.sleep(0.02)


def gated_handler(gate: asyncio.Event, seen: list[bytes]):
    """An upstream that records each request line and answers only once `gate` is set (keep-alive)."""

    async def handler(reader, writer, up):
        while True:
            try:
                head, _, body = await reader.read_request()
            except asyncio.IncompleteReadError:
                return
            line = head.split(b"\r\n", 1)[0]
            seen.append(line)
            await gate.wait()
            payload = line + b" body=%d" % len(body)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(payload), payload))
            await writer.drain()

    return handler


def tagged_handler(tag: bytes):
    """Keep-alive upstream answering `<tag> <request line>`: tells which lane served a request."""

    async def handler(reader, writer, up):
        while True:
            try:
                head, _, body = await reader.read_request()
            except asyncio.IncompleteReadError:
                return
            payload = tag + b" " + head.split(b"\r\n", 1)[0] + b" body=%d" % len(body)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(payload), payload))
            await writer.drain()

    return handler


async def tunnel_echo(reader, writer, up):
    """Answer a WebSocket handshake with 101, then echo raw bytes until EOF."""
    await reader.read_request()
    writer.write(SWITCHED)
    await writer.drain()
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def open_tunnel(port: int):
    reader, writer = await open_tracked_client(port)
    writer.write(WS_HANDSHAKE)
    status, headers, _ = await asyncio.wait_for(read_response(reader), 5)
    assert status == 101, (status, headers)
    writer.write(b"ping-1")
    assert await asyncio.wait_for(reader.readexactly(6), 5) == b"ping-1"
    return reader, writer


# == 1. graceful stop =============================================================================


async def test_sigterm_drains_in_flight_queued_upload_and_closes_idle(tmp_path, upstream):
    """One SIGTERM with everything at once: an in-flight request, two waiting in the lane queue,
    an upload half sent, an idle keep-alive connection. The idle one closes at once, the
    listener refuses, everything else is answered in full with `Connection: close`, and the
    process exits 0 as soon as the last exchange ends (not after the 10 s drain timeout)."""
    gate, seen = asyncio.Event(), []
    slow = await upstream(gated_handler(gate, seen))
    fast = await upstream(tagged_handler(b"fast"))
    admin = free_port()
    cfg = make_config({"slow": [slow.port], "fast": [fast.port]},
                      routes=[{"prefix": "/slow", "lane": "slow"}, {"prefix": "/", "lane": "fast"}],
                      drain_timeout="10s", admin={"listen": f"127.0.0.1:{admin}"})
    cfg["lanes"]["slow"].update(limit=1, queue=4, queue_timeout="20s")
    cfg["lanes"]["fast"]["max_body"] = "1m"
    proc, port = await spawn_proxy(tmp_path, cfg)
    try:
        idle_r, idle_w = await open_tracked_client(port)
        idle_w.write(GET % b"warm")
        assert (await read_response(idle_r))[0] == 200  # now an idle keep-alive connection

        slow_conns = []
        for i in range(3):  # one in flight, two queued behind the lane's limit of 1
            r, w = await open_tracked_client(port)
            w.write(GET % b"slow/%d" % i)
            slow_conns.append(r)
            if i == 0:
                await until(lambda: len(seen) == 1, what="first slow request upstream")
        await wait_metric(admin, "laneproxy_lane_queued", "slow", 2)

        up_r, up_w = await open_tracked_client(port)
        size = 256 * 1024
        up_w.write(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
        up_w.write(b"u" * (64 * 1024))
        await up_w.drain()
        await wait_metric(admin, "laneproxy_lane_in_flight", "fast", 1)  # the upload reached its lane

        proc.send_signal(signal.SIGTERM)
        await wait_log(tmp_path, "SIGTERM: stopping")
        t_idle = time.monotonic()
        assert await is_closed(idle_r, timeout=2), "idle keep-alive connection not closed on SIGTERM"
        assert time.monotonic() - t_idle < 1.0
        assert await refused(port), "listener still accepts after SIGTERM"

        up_w.write(b"u" * (size - 64 * 1024))  # the rest of the upload, after the signal
        status, headers, body = await asyncio.wait_for(read_response(up_r), 5)
        assert (status, body) == (200, b"fast POST /upload HTTP/1.1 body=%d" % size)
        assert headers[b"connection"] == [b"close"]

        assert proc.poll() is None  # still draining the slow lane
        gate.set()
        for i, r in enumerate(slow_conns):
            status, headers, body = await asyncio.wait_for(read_response(r), 5)
            assert (status, body) == (200, b"GET /slow/%d HTTP/1.1 body=0" % i)
            assert headers[b"connection"] == [b"close"]
            assert await is_closed(r)
        t_done = time.monotonic()
        assert await wait_exit(proc, 5) == 0
        assert time.monotonic() - t_done < 2.0, "exit waited for the drain timeout with nothing left"
        assert seen == [b"GET /slow/%d HTTP/1.1" % i for i in range(3)]
        assert "stopped" in log_text(tmp_path)
    finally:
        kill_if_running(proc)


async def test_sigterm_partial_request_head_is_still_served(tmp_path, upstream):
    """A client in the middle of sending its request head when SIGTERM arrives is not an idle
    connection: it gets its answer (with Connection: close), as nginx does."""
    up = await upstream(tagged_handler(b"app"))
    proc, port = await spawn_proxy(tmp_path, make_config(up.port, drain_timeout="5s"))
    try:
        r, w = await open_tracked_client(port)
        w.write(GET % b"first")
        assert (await read_response(r))[0] == 200
        w.write(b"GET /second HTTP/1.1\r\nHo")
        await w.drain()
        # The partial head is in the proxy's socket buffer; a full exchange on another connection
        # takes several turns of its event loop, which read it (epoll reports it ready first).
        _, _, body = await exchange(port, GET % b"probe")
        assert body.startswith(b"app GET /probe")
        proc.send_signal(signal.SIGTERM)
        await wait_log(tmp_path, "SIGTERM: stopping")
        w.write(b"st: t\r\n\r\n")
        status, headers, body = await asyncio.wait_for(read_response(r), 5)
        assert (status, body) == (200, b"app GET /second HTTP/1.1 body=0")
        assert headers[b"connection"] == [b"close"]
        assert await wait_exit(proc, 5) == 0
        w.close()
    finally:
        kill_if_running(proc)


async def test_drain_deadline_answers_queued_waiter_503_not_reset(tmp_path, upstream):
    gate, seen = asyncio.Event(), []  # the gate never opens: the upstream is stuck
    up = await upstream(gated_handler(gate, seen))
    admin = free_port()
    cfg = make_config(up.port, drain_timeout="1s", admin={"listen": f"127.0.0.1:{admin}"},
                      lane={"limit": 1, "queue": 2, "queue_timeout": "30s", "read_timeout": "30s"})
    proc, port = await spawn_proxy(tmp_path, cfg)
    try:
        r1, w1 = await open_tracked_client(port)
        w1.write(GET % b"stuck")
        await until(lambda: len(seen) == 1, what="stuck request upstream")
        r2, w2 = await open_tracked_client(port)
        w2.write(b"POST /queued HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi")
        await wait_metric(admin, "laneproxy_lane_queued", "app", 1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 5) == 0
        assert 0.8 < time.monotonic() - t0 < 3.0  # the documented drain timeout bounds the stop
        data1, _ = await read_until_closed(r1, 2)
        assert data1 == b""  # in flight past the deadline: cut, as documented
        assert seen == [b"GET /stuck HTTP/1.1"]  # the queued POST never reached the upstream
        data2, reset = await read_until_closed(r2, 2)
        assert data2.startswith(b"HTTP/1.1 503 "), (data2, reset)
        w1.close()
        w2.close()
    finally:
        kill_if_running(proc)


async def test_sigquit_is_a_graceful_stop_as_in_nginx(tmp_path, upstream):
    gate, seen = asyncio.Event(), []
    up = await upstream(gated_handler(gate, seen))
    proc, port = await spawn_proxy(tmp_path, make_config(up.port, drain_timeout="5s"))
    try:
        r, w = await open_tracked_client(port)
        w.write(GET % b"inflight")
        await until(lambda: len(seen) == 1, what="request upstream")
        proc.send_signal(signal.SIGQUIT)
        await wait_log(tmp_path, "SIGQUIT: stopping")
        assert await refused(port)
        gate.set()
        status, headers, _ = await asyncio.wait_for(read_response(r), 5)
        assert status == 200 and headers[b"connection"] == [b"close"]
        assert await wait_exit(proc, 5) == 0
        w.close()
    finally:
        kill_if_running(proc)


@pytest.mark.parametrize("client_closes", [True, False], ids=["closed-during-drain", "open-past-deadline"])
async def test_sigterm_with_open_websocket_tunnel(tmp_path, upstream, client_closes):
    """A tunnel keeps passing bytes during the drain; if it ends, the process exits at once;
    if it stays open, it is closed at the drain timeout and the process still exits 0."""
    up = await upstream(tunnel_echo)
    cfg = make_config(up.port, drain_timeout="1500ms", lane={"upgrade": ["websocket"]})
    proc, port = await spawn_proxy(tmp_path, cfg)
    try:
        r, w = await open_tunnel(port)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await wait_log(tmp_path, "SIGTERM: stopping")
        assert await refused(port)
        w.write(b"during-drain")
        assert await asyncio.wait_for(r.readexactly(12), 2) == b"during-drain"
        if client_closes:
            w.close()
            t_close = time.monotonic()
            assert await wait_exit(proc, 5) == 0
            assert time.monotonic() - t_close < 1.0, "waited for the drain timeout after the tunnel ended"
        else:
            data, _ = await read_until_closed(r, 4)
            assert data == b""
            assert 1.2 < time.monotonic() - t0 < 3.0
            assert await wait_exit(proc, 3) == 0
            assert time.monotonic() - t0 < 3.5
            w.close()
    finally:
        kill_if_running(proc)


async def test_sighup_during_drain_binds_no_new_listener(tmp_path, upstream):
    gate, seen = asyncio.Event(), []
    up = await upstream(gated_handler(gate, seen))
    new = free_port()
    cfg = make_config(up.port, drain_timeout="5s")
    proc, port = await spawn_proxy(tmp_path, cfg)
    try:
        r, w = await open_tracked_client(port)
        w.write(GET % b"held")
        await until(lambda: len(seen) == 1, what="held request upstream")
        proc.send_signal(signal.SIGTERM)
        await wait_log(tmp_path, "SIGTERM: stopping")
        cfg["listen"] = f"127.0.0.1:{new}"
        (tmp_path / "laneproxy.yaml").write_text(yaml.safe_dump(cfg))
        proc.send_signal(signal.SIGHUP)
        # Today the reload is logged within milliseconds; once fixed nothing is logged, so this
        # bounded poll for a line that must not come is the only way to give it its chance.
        try:
            await wait_log(tmp_path, "reloaded:", timeout=1.0)
        except AssertionError:
            pass  # the expected outcome: no reload while stopping
        assert await refused(new), "a stopping proxy accepts connections on a listener added by SIGHUP"
        gate.set()
        status, headers, _ = await asyncio.wait_for(read_response(r), 5)
        assert status == 200 and headers[b"connection"] == [b"close"]
        assert await wait_exit(proc, 5) == 0
    finally:
        kill_if_running(proc)


# == 2. reload under traffic ======================================================================


class Load:
    """Clients sending GETs until stopped: keep-alive ones and one-connection-per-request ones."""

    def __init__(self, port: int, path: bytes) -> None:
        self.port, self.path = port, path
        self.results: list[tuple[int, bytes]] = []
        self.errors: list[str] = []
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    def start(self, keepalive: int = 6, fresh: int = 3) -> None:
        self.tasks = [asyncio.ensure_future(self._keepalive()) for _ in range(keepalive)]
        self.tasks += [asyncio.ensure_future(self._fresh()) for _ in range(fresh)]

    async def _keepalive(self) -> None:
        try:
            r, w = await open_client(self.port)
        except OSError as exc:
            self.errors.append(f"connect: {exc!r}")
            return
        try:
            while not self.stop.is_set():
                w.write(GET % self.path)
                status, _, body = await asyncio.wait_for(read_response(r), 5)
                self.results.append((status, body))
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            self.errors.append(f"keep-alive: {exc!r}")
        finally:
            w.close()

    async def _fresh(self) -> None:
        while not self.stop.is_set():
            try:
                status, _, body = await asyncio.wait_for(exchange(self.port, GET % self.path), 5)
                self.results.append((status, body))
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                self.errors.append(f"fresh: {exc!r}")
                return

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 10)

    def since(self, n: int) -> list[tuple[int, bytes]]:
        return self.results[n:]


async def admin_reload(admin_port: int) -> tuple[int, dict]:
    status, _, body = await exchange(
        admin_port, b"POST /api/reload HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    return status, json.loads(body)


async def test_reload_under_load_moves_routes_and_drains_removed_lane(tmp_path, upstream):
    """Reloads (admin API and SIGHUP) that remove a lane and move routes, under continuous
    keep-alive and fresh-connection traffic: no request fails, new requests follow the new
    routes, the removed lane's in-flight and queued requests are answered by its old upstream;
    then an invalid file is refused by both paths with a `yaml.path: message` log line and the
    running config keeps serving."""
    gate, seen_b = asyncio.Event(), []
    a = await upstream(tagged_handler(b"A"))
    b = await upstream(gated_handler(gate, seen_b))
    c = await upstream(tagged_handler(b"C"))
    admin = free_port()
    cfg = make_config({"a": [a.port], "b": [b.port]},
                      routes=[{"prefix": "/b", "lane": "b"}, {"prefix": "/", "lane": "a"}],
                      admin={"listen": f"127.0.0.1:{admin}"}, drain_timeout="5s")
    cfg["lanes"]["b"].update(limit=1, queue=4, queue_timeout="20s")
    path = tmp_path / "laneproxy.yaml"
    proc, port = await spawn_proxy(tmp_path, cfg)
    load = Load(port, b"x/load")
    try:
        # one exchange in flight on lane b and one waiting in its queue
        held = []
        for i in range(2):
            r, w = await open_tracked_client(port)
            w.write(GET % b"b/held%d" % i)
            held.append(r)
            if i == 0:
                await until(lambda: len(seen_b) == 1, what="held request upstream")
        await wait_metric(admin, "laneproxy_lane_queued", "b", 1)
        load.start()
        await until(lambda: len(load.results) >= 50, what="load running")

        # reload 1 (admin API): lane b removed, /b and /x now go to a new lane c
        cfg2 = make_config({"a": [a.port], "c": [c.port]},
                           routes=[{"prefix": "/b", "lane": "c"}, {"prefix": "/x", "lane": "c"},
                                   {"prefix": "/", "lane": "a"}],
                           admin={"listen": f"127.0.0.1:{admin}"}, drain_timeout="5s")
        path.write_text(yaml.safe_dump(cfg2))
        status, summary = await admin_reload(admin)
        assert status == 200 and summary["ok"], summary
        assert summary["removed"] == ["b"] and summary["kept"] == ["a"], summary
        mark = len(load.results)
        await until(lambda: len(load.results) >= mark + 40, what="load after reload 1")
        after = load.since(mark + 20)  # allow the requests already on the wire at the reload
        assert {body.split(b" ")[0] for _, body in after} == {b"C"}, after[:3]
        assert (await exchange(port, GET % b"b/new"))[2].startswith(b"C GET /b/new ")

        # the removed lane's in-flight and queued requests still complete on its old upstream
        gate.set()
        for i, r in enumerate(held):
            status, _, body = await asyncio.wait_for(read_response(r), 5)
            assert (status, body) == (200, b"GET /b/held%d HTTP/1.1 body=0" % i)
        assert seen_b == [b"GET /b/held0 HTTP/1.1", b"GET /b/held1 HTTP/1.1"]

        # reloads 2..5 (SIGHUP): /x flips between lanes a and c
        for n in range(2, 6):
            target = "a" if n % 2 == 0 else "c"
            cfg2["routes"][1]["lane"] = target
            path.write_text(yaml.safe_dump(cfg2))
            proc.send_signal(signal.SIGHUP)
            await wait_log(tmp_path, "reloaded:", n)
            mark = len(load.results)
            await until(lambda: len(load.results) >= mark + 30, what=f"load after reload {n}")
            tags = {body.split(b" ")[0] for _, body in load.since(mark + 15)}
            assert tags == {target.upper().encode()}, (n, tags)

        # an invalid file: refused by SIGHUP and by the API, the running config stays
        bad = dict(cfg2, routes=[{"prefix": "/", "lane": "nosuch"}])
        path.write_text(yaml.safe_dump(bad))
        proc.send_signal(signal.SIGHUP)
        text = await wait_log(tmp_path, "reload refused")
        assert re.search(r"routes\[0\]\.lane: .*nosuch", text), text[-800:]
        assert "Traceback" not in text
        status, answer = await admin_reload(admin)
        assert status == 400 and not answer["ok"]
        assert any("routes[0].lane" in p for p in answer["problems"]), answer
        mark = len(load.results)
        await until(lambda: len(load.results) >= mark + 30, what="load after refused reload")
        assert {body.split(b" ")[0] for _, body in load.since(mark)} == {b"C"}  # reload 5 routed /x to c
        await load.finish()
        assert load.errors == []
        statuses = [s for s, _ in load.results]
        assert len(statuses) > 200 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    finally:
        load.stop.set()
        assert await stop_proxy(proc) == 0


async def test_sighup_changing_listen_moves_listener_and_keeps_open_connections(tmp_path, upstream):
    """A reload that changes the listen address binds the new one and closes the old listener,
    but a keep-alive connection accepted on the old address keeps being served (README: open
    client connections stay). A reload onto a port that is taken is refused and changes nothing."""
    up = await upstream(tagged_handler(b"app"))
    old, new = free_port(), free_port()
    cfg = make_config(up.port, listen=f"127.0.0.1:{old}")
    path = tmp_path / "laneproxy.yaml"
    proc, port = await spawn_proxy(tmp_path, cfg)
    assert port == old
    taken = socket.socket()
    try:
        r, w = await open_tracked_client(old)
        w.write(GET % b"before")
        assert (await read_response(r))[0] == 200

        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        cfg["listen"] = f"127.0.0.1:{taken.getsockname()[1]}"
        path.write_text(yaml.safe_dump(cfg))
        proc.send_signal(signal.SIGHUP)
        text = await wait_log(tmp_path, "reload refused")
        assert f"127.0.0.1:{taken.getsockname()[1]}" in text.split("reload refused", 1)[1]
        assert (await exchange(old, GET % b"still-old"))[0] == 200

        cfg["listen"] = f"127.0.0.1:{new}"
        path.write_text(yaml.safe_dump(cfg))
        proc.send_signal(signal.SIGHUP)
        await wait_log(tmp_path, f"listening on http://127.0.0.1:{new}")
        await wait_log(tmp_path, "reloaded:")
        assert (await exchange(new, GET % b"on-new"))[2].startswith(b"app GET /on-new ")
        assert await refused(old)
        w.write(GET % b"old-connection")  # accepted before the move: still served
        status, headers, body = await asyncio.wait_for(read_response(r), 5)
        assert (status, body) == (200, b"app GET /old-connection HTTP/1.1 body=0")
        assert b"connection" not in headers
        w.close()
    finally:
        taken.close()
        assert await stop_proxy(proc) == 0


async def test_tunnel_on_a_lane_removed_by_reload_keeps_flowing(tmp_path, upstream):
    """README: on reload "open client connections and tunnels stay": a WebSocket tunnel whose lane
    the new config removes keeps passing bytes both ways, and a later SIGTERM still exits 0."""
    ws = await upstream(tunnel_echo)
    other = await upstream(tagged_handler(b"other"))
    cfg = make_config({"ws": [ws.port]}, lane={"upgrade": ["websocket"]}, drain_timeout="1s")
    proc, port = await spawn_proxy(tmp_path, cfg)
    try:
        r, w = await open_tunnel(port)
        new_cfg = make_config({"other": [other.port]}, drain_timeout="1s")  # lane ws removed
        (tmp_path / "laneproxy.yaml").write_text(yaml.safe_dump(new_cfg))
        proc.send_signal(signal.SIGHUP)
        await wait_log(tmp_path, "reloaded:")
        assert (await exchange(port, GET % b"new"))[2].startswith(b"other GET /new ")
        for i in range(3):
            w.write(b"after-reload-%d" % i)
            assert await asyncio.wait_for(r.readexactly(14), 3) == b"after-reload-%d" % i
        w.close()
        assert await stop_proxy(proc) == 0
    finally:
        kill_if_running(proc)


# == 3. workers ===================================================================================


def children(pid: int) -> list[int]:
    return sorted(int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


def gone_or_zombie(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # reaped between open and read
        return True
    return state in ("Z", "X")


async def two_workers(tmp_path: Path, proc) -> list[int]:
    await wait_log(tmp_path, "listening on", 2)
    await until(lambda: len(children(proc.pid)) == 2, what="two workers")
    return children(proc.pid)


@pytest.mark.timeout(40)
async def test_worker_sigkill_port_keeps_answering_before_replacement(tmp_path, upstream):
    """The surviving worker's SO_REUSEPORT socket takes every new connection as soon as the
    killed one is gone, before the supervisor's replacement (respawn backoff ~1 s) exists."""
    up = await upstream(tagged_handler(b"app"))
    port = free_port()
    proc, _ = await spawn_proxy(tmp_path, make_config(up.port, workers=2, listen=f"127.0.0.1:{port}"))
    try:
        workers = await two_workers(tmp_path, proc)
        os.kill(workers[0], signal.SIGKILL)
        await until(lambda: gone_or_zombie(workers[0]), what="worker gone")
        await wait_log(tmp_path, "exited with -9; replacing it")
        # A connection that races the dying socket's removal from the SO_REUSEPORT group can be
        # reset by the kernel (seen for the first connect within ~3 ms); that is the kernel's
        # doing, not the proxy's. Wait for one answer, then every new connection must be served.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while True:
            try:
                if (await exchange(port, GET % b"first"))[0] == 200:
                    break
            except ConnectionError:
                assert loop.time() < deadline, "the surviving worker does not answer"
        results = await asyncio.gather(*(exchange(port, GET % b"k%d" % i) for i in range(60)))
        assert [s for s, _, _ in results] == [200] * 60
        assert workers[0] not in children(proc.pid) and len(children(proc.pid)) == 1  # no replacement yet
        await until(lambda: len([p for p in children(proc.pid) if p != workers[0]]) == 2, 5, "replacement")
        results = await asyncio.gather(*(exchange(port, GET % b"r%d" % i) for i in range(40)))
        assert [s for s, _, _ in results] == [200] * 40
    finally:
        assert await stop_proxy(proc) == 0


@pytest.mark.timeout(40)
async def test_sigterm_to_supervisor_drains_every_worker(tmp_path, upstream):
    """SIGTERM to the supervisor: both workers stop accepting, close idle connections, finish
    their in-flight exchanges (Connection: close), and the supervisor exits 0 after them."""
    gate, seen = asyncio.Event(), []
    up = await upstream(gated_handler(gate, seen))
    port = free_port()
    cfg = make_config(up.port, workers=2, listen=f"127.0.0.1:{port}", drain_timeout="10s")
    proc, _ = await spawn_proxy(tmp_path, cfg)
    try:
        workers = await two_workers(tmp_path, proc)
        busy = []
        for i in range(16):  # 16 connections: both workers get some (1 - 2**-15)
            r, w = await open_tracked_client(port)
            w.write(GET % b"held%d" % i)
            busy.append(r)
        await until(lambda: len(seen) == 16, what="16 requests upstream")
        idle = []
        for _ in range(2):  # idle keep-alive connections with nothing in flight
            r, w = await open_tracked_client(port)
            idle.append(r)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await wait_log(tmp_path, "SIGTERM: stopping (draining", 2)
        for r in idle:
            assert await is_closed(r, 2)
        assert time.monotonic() - t0 < 2.0
        assert await refused(port)
        assert proc.poll() is None and children(proc.pid) == workers
        gate.set()
        for i, r in enumerate(busy):
            status, headers, body = await asyncio.wait_for(read_response(r), 5)
            assert (status, body) == (200, b"GET /held%d HTTP/1.1 body=0" % i)
            assert headers[b"connection"] == [b"close"]
        t_done = time.monotonic()
        assert await wait_exit(proc, 5) == 0
        assert time.monotonic() - t_done < 2.5
        assert all(gone_or_zombie(pid) for pid in workers)
        text = log_text(tmp_path)
        assert "all workers stopped" in text and "replacing it" not in text
    finally:
        kill_if_running(proc)


@pytest.mark.timeout(40)
async def test_supervisor_exit_is_bounded_by_drain_timeout(tmp_path, upstream):
    """Workers whose exchanges never finish are cut at drain_timeout; the supervisor then exits 0
    without waiting longer (what an operator's `systemctl stop` relies on)."""
    seen: list[bytes] = []
    up = await upstream(gated_handler(asyncio.Event(), seen))  # never answers
    port = free_port()
    cfg = make_config(up.port, workers=2, listen=f"127.0.0.1:{port}", drain_timeout="1s")
    proc, _ = await spawn_proxy(tmp_path, cfg)
    try:
        await two_workers(tmp_path, proc)
        conns = []
        for i in range(8):
            r, w = await open_tracked_client(port)
            w.write(GET % b"stuck%d" % i)
            conns.append(r)
        await until(lambda: len(seen) == 8, what="8 requests upstream")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 6) == 0
        assert 0.8 < time.monotonic() - t0 < 3.0
        for r in conns:
            data, _ = await read_until_closed(r, 2)
            assert data == b""
        assert log_text(tmp_path).count("SIGTERM: stopping (draining up to 1s)") == 2
    finally:
        kill_if_running(proc)
