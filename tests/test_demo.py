"""`laneproxy demo`: the demo upstreams on their own (any ports), then the whole demo end to end."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import h11
import pytest

from laneproxy.demo import DemoError, Upstreams, start_upstreams

DEMO_PORTS = (("0.0.0.0", 8080), ("127.0.0.1", 8787), ("127.0.0.1", 8686))
TIMEOUT = aiohttp.ClientTimeout(total=15)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie counts: it no longer runs or holds sockets)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def _exchange(sock: socket.socket, conn: h11.Connection, request: h11.Request, body: bytes = b"") -> tuple[
    h11.Response, bytes
]:
    """Send one request with h11 and read its whole response (h11 checks the framing)."""
    data = conn.send(request) + (conn.send(h11.Data(data=body)) if body else b"")
    sock.sendall(data + conn.send(h11.EndOfMessage()))
    response, chunks = None, []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            chunks.append(event.data)
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return response, b"".join(chunks)


def _get(target: str, *extra: tuple[str, str]) -> h11.Request:
    return h11.Request(method="GET", target=target, headers=[("Host", "demo"), *extra])


@pytest.fixture
def upstreams() -> Iterator[Upstreams]:
    ups = start_upstreams(0, 0, slow_workers=8)
    yield ups
    ups.stop()
    assert all(proc.returncode is not None for proc in ups.procs)
    assert _port_free(ups.host, ups.fast_port) and _port_free(ups.host, ups.slow_port)


async def test_fast_app_describes_the_request_and_echoes(upstreams: Upstreams) -> None:
    base = f"http://127.0.0.1:{upstreams.fast_port}"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async with session.get(f"{base}/some/path?x=1", headers={"X-Real-IP": "10.1.2.3"}) as resp:
            body = await resp.text()
            assert resp.status == 200 and resp.headers["X-Demo-App"] == "fast"
        assert "GET /some/path?x=1" in body and "X-Real-IP: 10.1.2.3" in body
        assert "X-Forwarded-For: -" in body
        async with session.post(f"{base}/echo", data=b"hello demo") as resp:
            assert resp.status == 200 and await resp.read() == b"hello demo"


async def test_slow_pool_is_eight_processes_serving_one_request_each(upstreams: Upstreams) -> None:
    url = f"http://127.0.0.1:{upstreams.slow_port}/tast/sleep?ms=400"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:

        async def one() -> str:
            async with session.get(url) as resp:
                assert resp.status == 200 and "slept 400 ms" in await resp.text()
                return resp.headers["X-Demo-Pid"]

        started = time.monotonic()
        pids = await asyncio.gather(*(one() for _ in range(16)))
        elapsed = time.monotonic() - started
    assert set(pids) == {str(proc.pid) for proc in upstreams.procs[1:]}
    assert all(pids.count(pid) == 2 for pid in set(pids))
    assert elapsed >= 0.75, "16 requests of 400 ms on 8 one-at-a-time processes need two rounds"


def test_slow_worker_speaks_http11_with_keepalive() -> None:
    ups = start_upstreams(0, 0, slow_workers=1)
    try:
        with socket.create_connection((ups.host, ups.slow_port), timeout=10) as sock:
            conn = h11.Connection(h11.CLIENT)
            resp, body = _exchange(sock, conn, _get("/tast/sleep?ms=0"))
            assert resp.status_code == 200 and b"slept 0 ms" in body
            pid = dict(resp.headers)[b"x-demo-pid"]
            conn.start_next_cycle()
            chunked = h11.Request(method="POST", target="/tast/sleep?ms=1",
                                  headers=[("Host", "demo"), ("Transfer-Encoding", "chunked")])
            resp, body = _exchange(sock, conn, chunked, b"x" * 5000)
            assert resp.status_code == 200 and dict(resp.headers)[b"x-demo-pid"] == pid
            for target, status in (("/tast/sleep?ms=soon", 400), ("/tast/nothing", 404), ("/tast", 200)):
                conn.start_next_cycle()
                assert _exchange(sock, conn, _get(target))[0].status_code == status
            conn.start_next_cycle()
            resp, body = _exchange(sock, conn, _get("/tast", ("Connection", "close")))
            assert resp.status_code == 200 and (b"connection", b"close") in resp.headers
            assert sock.recv(1) == b""
        with socket.create_connection((ups.host, ups.slow_port), timeout=10) as sock:
            sock.sendall(b"GET /tast/sleep?ms=0 HTTP/1.0\r\n\r\n")
            assert sock.makefile("rb").read().startswith(b"HTTP/1.1 200 OK\r\n")  # HTTP/1.0: closed
        with socket.create_connection((ups.host, ups.slow_port), timeout=10) as sock:
            sock.sendall(b"NONSENSE\r\n\r\n")
            reply = sock.makefile("rb").read()
            assert reply.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in reply
    finally:
        ups.stop()


def test_idle_keepalive_connections_do_not_starve_a_newcomer() -> None:
    """Both workers hold an idle kept-alive connection; a third client is still served."""
    ups = start_upstreams(0, 0, slow_workers=2)
    try:
        held = [socket.create_connection((ups.host, ups.slow_port), timeout=10) for _ in range(2)]
        pids = set()
        for sock in held:
            resp, _ = _exchange(sock, h11.Connection(h11.CLIENT), _get("/tast/sleep?ms=0"))
            pids.add(dict(resp.headers)[b"x-demo-pid"])
        assert len(pids) == 2
        with socket.create_connection((ups.host, ups.slow_port), timeout=5) as sock:
            resp, _ = _exchange(sock, h11.Connection(h11.CLIENT), _get("/tast/sleep?ms=0"))
            assert resp.status_code == 200
        for sock in held:
            sock.close()
    finally:
        ups.stop()


def test_a_taken_port_is_named_and_nothing_is_left_running() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        for fast, slow in ((port, 0), (0, port)):
            with pytest.raises(DemoError, match=f"port {port} is taken: something else is listening"):
                start_upstreams(fast, slow, slow_workers=1)


@pytest.mark.timeout(30)
def test_children_exit_when_the_parent_is_killed() -> None:
    code = ("import time; from laneproxy.demo import start_upstreams; u = start_upstreams(0, 0, 2); "
            "print(*[p.pid for p in u.procs], flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        pids = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(pids) == 3
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout:
            parent.stdout.close()
    _wait_until(lambda: all(_gone(pid) for pid in pids), 10, "the orphaned demo children to exit")


@pytest.mark.timeout(90)
async def test_laneproxy_demo_end_to_end(tmp_path: Path) -> None:
    busy = [port for host, port in DEMO_PORTS if not _port_free(host, port)]
    if busy:
        pytest.skip(f"port(s) {busy} already in use; `laneproxy demo` needs 8080, 8787 and 8686")
    log_path = tmp_path / "demo.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "laneproxy", "demo"], cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        pids = await _check_demo(proc, lambda: log_path.read_text(errors="replace"))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=40) == 0, log_path.read_text(errors="replace")
        _wait_until(lambda: all(_gone(pid) for pid in pids), 5, "the demo upstreams to exit")
        _wait_until(lambda: all(_port_free(h, p) for h, p in DEMO_PORTS), 5, "8080/8787/8686 to be free")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _check_demo(proc: subprocess.Popen[bytes], log: Callable[[], str]) -> set[int]:
    """Through the proxy: the fast app on `/`, the slow pool on `/tast` with 8 distinct pids."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"`laneproxy demo` exited early:\n{log()}"
            try:
                async with session.get("http://127.0.0.1:8080/") as resp:
                    body = await resp.text()
                    break
            except (aiohttp.ClientError, TimeoutError):
                assert time.monotonic() < deadline, f"the proxy did not answer within 20s:\n{log()}"
                await asyncio.sleep(0.1)
        assert resp.status == 200 and resp.headers["X-Demo-App"] == "fast", body
        assert body.startswith("fast app (lane webman)") and "X-Real-IP: 127.0.0.1" in body, body
        pids = {int(resp.headers["X-Demo-Pid"])}
        async with session.get("http://127.0.0.1:8080/tast/sleep?ms=50") as resp:
            assert resp.status == 200 and resp.headers["X-Demo-App"] == "slow", await resp.text()

        async def slow() -> int:
            async with session.get("http://127.0.0.1:8080/tast/sleep?ms=500") as resp:
                assert resp.status == 200, await resp.text()
                return int(resp.headers["X-Demo-Pid"])

        slow_pids = await asyncio.gather(*(slow() for _ in range(8)))
        assert len(set(slow_pids)) == 8, f"8 concurrent slow requests were served by pids {slow_pids}"
    return pids | set(slow_pids)
