"""`laneproxy demo`: the seed page's layout, live on one machine, for a first look.

A fast app on the `webman` lane's server (127.0.0.1:8787), a slow pool on the `task` lane's
(127.0.0.1:8686), then the proxy in the foreground on the built-in default config.

The slow pool is webman's `'task' => ['count' => 8]`: 8 processes, each serving one request at a
time, blocking. They share ONE listening socket (opened here, inherited), so a connection waits in
one accept queue for whichever worker is free; per-process SO_REUSEPORT sockets would let the
kernel hash it onto a busy worker while others idle. A worker idle on a kept-alive connection
drops it when a newcomer has waited in the queue for a moment (no worker is free).

Children run `python -m laneproxy.demo fast|slow LISTEN_FD READY_FD` and exit at EOF on stdin, a
pipe held by this process: if it dies, even by SIGKILL, they go too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from types import FrameType
from typing import NoReturn
from urllib.parse import parse_qs

import httptools

DEFAULT_SLEEP_MS = 200
MAX_SLEEP_MS = 60_000
START_TIMEOUT = 20.0
_SHOWN_FIELDS = ("Host", "X-Real-IP", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Via")


class DemoError(RuntimeError):
    """The demo cannot start; the message says why (e.g. which port is taken)."""


# -- the fast app (lane webman) ---------------------------------------------------------------


async def _fast_app(sock: socket.socket, ready_fd: int) -> None:
    """aiohttp app: `/echo` returns the request body; any other path describes the request."""
    from aiohttp import web

    tags = {"X-Demo-App": "fast", "X-Demo-Pid": str(os.getpid())}

    async def describe(request: web.Request) -> web.Response:
        lines = [f"fast app (lane webman), pid {os.getpid()}", f"{request.method} {request.raw_path}"]
        lines += [f"{name}: {request.headers.get(name, '-')}" for name in _SHOWN_FIELDS]
        return web.Response(text="\n".join(lines) + "\n", headers=tags)

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), content_type=request.content_type, headers=tags)

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/{tail:.*}", describe)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    _ready(ready_fd)
    await asyncio.Event().wait()


# -- the slow pool (lane task): one blocking request at a time per process ---------------------


class _Requests:
    """httptools callbacks for one connection: complete requests as (method, target, keep_alive)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url, self.head, self.busy = b"", ("GET", False), False
        self.done: list[tuple[str, str, bool]] = []

    def on_message_begin(self) -> None:
        self.url, self.busy = b"", True

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        self.head = (self.parser.get_method().decode(), self.parser.should_keep_alive())

    def on_message_complete(self) -> None:
        self.done.append((self.head[0], self.url.decode("latin-1"), self.head[1]))
        self.busy = False


def _slow_answer(target: str) -> tuple[int, str]:
    """`/tast/sleep?ms=N` blocks this whole process N ms (default 200, at most 60 s)."""
    me = f"slow pool (lane task), pid {os.getpid()}"
    path, _, query = target.partition("?")
    if path.endswith("/sleep"):  # /tast/sleep, or /sleep behind a strip_prefix route
        raw = parse_qs(query).get("ms", [str(DEFAULT_SLEEP_MS)])[-1]
        if not (raw.isascii() and raw.isdigit()):
            return 400, f"{me}: ms must be a whole number of milliseconds\n"
        ms = min(int(raw), MAX_SLEEP_MS)
        time.sleep(ms / 1000)  # blocking on purpose: the process serves nobody else meanwhile
        return 200, f"{me}: slept {ms} ms\n"
    if path.rstrip("/") in ("", "/tast"):
        return 200, f"{me}: try /tast/sleep?ms=500\n"
    return 404, f"{me}: nothing at {path}; try /tast/sleep?ms=500\n"


def _respond(sock: socket.socket, status: int, body: str, keep: bool, head_only: bool = False) -> None:
    payload = body.encode()
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        f"Date: {formatdate(usegmt=True)}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(payload)}",
        "X-Demo-App: slow",
        f"X-Demo-Pid: {os.getpid()}",
    ] + ([] if keep else ["Connection: close"])
    sock.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + (b"" if head_only else payload))


def _serve_connection(sock: socket.socket, listen: socket.socket) -> None:
    """Answer one connection's requests in order, blocking, until it closes or is given up."""
    requests = _Requests()
    while requests.busy or _wait_request(sock, listen):
        if not (data := sock.recv(65536)):
            return
        try:
            requests.parser.feed_data(data)  # the body is consumed and dropped
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            _respond(sock, 400, "malformed request (or an upgrade, which this pool does not do)\n", False)
            return
        for method, target, keep in requests.done:
            status, body = _slow_answer(target)
            _respond(sock, status, body, keep, head_only=method == "HEAD")
            if not keep:
                return
        requests.done.clear()


def _wait_request(sock: socket.socket, listen: socket.socket) -> bool:
    """Idle on a kept-alive connection: True when bytes (or EOF) arrive on it, False when a
    newcomer has waited in the shared accept queue past a short grace (no worker is free)."""
    while True:
        if sock in select.select([sock, listen], [], [])[0]:
            return True
        grace = time.monotonic() + random.uniform(0.1, 0.3)  # a free worker takes it at once
        while (left := grace - time.monotonic()) > 0:
            if select.select([sock], [], [], left)[0]:
                return True
        if select.select([listen], [], [], 0)[0]:
            return False


def _slow_worker(listen: socket.socket, ready_fd: int) -> NoReturn:
    """One pool process: take a connection, serve its requests one by one, then the next."""
    _ready(ready_fd)
    while True:
        sock, _ = listen.accept()
        with sock, contextlib.suppress(OSError):  # peer closed or reset, or too slow
            sock.settimeout(30.0)  # a started request must arrive within this
            _serve_connection(sock, listen)


# -- the parent: start, wait, stop -------------------------------------------------------------


def _ready(fd: int) -> None:
    os.write(fd, b".")
    os.close(fd)


def _listen(host: str, port: int, what: str) -> socket.socket:
    """A listening socket on host:port, or DemoError saying that something else holds the port."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(511)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise DemoError(
                f"port {port} is taken: something else is listening on {host}:{port} (needed for the "
                f"{what}); stop it and try again"
            ) from None
        raise DemoError(f"cannot listen on {host}:{port} for the {what}: {exc.strerror}") from None
    return sock


@dataclass
class Upstreams:
    """The running demo upstreams: `procs[0]` is the fast app, the rest the slow pool."""

    host: str
    fast_port: int
    slow_port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate and reap every child (SIGKILL after `timeout`); safe to call twice."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
            if proc.stdin:
                proc.stdin.close()
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_upstreams(
    fast_port: int, slow_port: int, slow_workers: int = 8, host: str = "127.0.0.1",
    timeout: float = START_TIMEOUT,
) -> Upstreams:
    """Start the fast app and `slow_workers` pool processes (port 0: any free port) and return
    once every one of them serves; raise DemoError (nothing left running) if that fails."""
    socks = [_listen(host, fast_port, "demo fast app (lane webman)")]
    try:
        socks.append(_listen(host, slow_port, "demo slow pool (lane task)"))
    finally:
        if len(socks) < 2:
            socks[0].close()
    ups = Upstreams(host, socks[0].getsockname()[1], socks[1].getsockname()[1])
    ready_r, ready_w = os.pipe()
    try:
        for role, sock in [("fast", socks[0])] + [("slow", socks[1])] * slow_workers:
            argv = [sys.executable, "-m", "laneproxy.demo", role, str(sock.fileno()), str(ready_w)]
            ups.procs.append(subprocess.Popen(
                argv, stdin=subprocess.PIPE, pass_fds=(sock.fileno(), ready_w), process_group=0
            ))
        os.close(ready_w)
        ready_w, got, deadline = -1, 0, time.monotonic() + timeout
        while got < len(ups.procs):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([ready_r], [], [], left)[0]:
                raise DemoError(f"the demo upstreams did not start within {timeout:g}s")
            if not (data := os.read(ready_r, 64)):
                raise DemoError("a demo upstream exited while starting (see its error above)")
            got += len(data)
    except BaseException:
        ups.stop()
        raise
    finally:
        for sock in socks:
            sock.close()
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)
    return ups


def _stop_signal(signum: int, frame: FrameType | None) -> NoReturn:
    raise SystemExit(128 + signum)


def main() -> int:
    """`laneproxy demo`: start the upstreams, run the proxy until SIGINT/SIGTERM, stop them all."""
    from laneproxy.config import DEFAULT_CONFIG_PATH, load_config
    from laneproxy.server import run

    cfg = load_config(DEFAULT_CONFIG_PATH)
    (fast_host, fast_port), (_, slow_port) = (cfg.lanes[n].servers[0].address for n in ("webman", "task"))
    signal.signal(signal.SIGTERM, _stop_signal)  # until run() takes over: SIGTERM reaches `finally`
    ups: Upstreams | None = None
    try:
        for host, port in cfg.listen:
            _listen(host, port, "proxy").close()
        ups = start_upstreams(fast_port, slow_port, host=fast_host)
        host, port = cfg.listen[0]
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        pids = " ".join(str(p.pid) for p in ups.procs[1:])
        print(
            f"laneproxy demo: the proxy on {base} runs the built-in default ({DEFAULT_CONFIG_PATH})\n"
            f"  lane webman -> fast app  http://{ups.host}:{ups.fast_port} (pid {ups.procs[0].pid})\n"
            f"  lane task   -> slow pool http://{ups.host}:{ups.slow_port} ({len(ups.procs) - 1} "
            f"processes, one request at a time each; pids {pids})\n"
            f"Try:\n  curl -i {base}/\n  curl -i -d hello {base}/echo\n"
            f"  curl -i '{base}/tast/sleep?ms=500'\n"
            "  # 20 slow requests at once: 8 run (one per pool process), the proxy queues the rest\n"
            "  for i in $(seq 20); do curl -s -o /dev/null -w '%{http_code} %{time_total}\\n' "
            f"{base}/tast/sleep & done; wait\n"
            "Ctrl-C stops the proxy and the demo upstreams.",
            flush=True,
        )
        return run(cfg)
    except DemoError as exc:
        print(f"laneproxy demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if ups is not None:
            ups.stop()


def _exit_at_eof() -> NoReturn:
    """A child's watchdog: stdin is a pipe from the parent; EOF means the parent is gone."""
    sys.stdin.buffer.read()
    os._exit(0)


if __name__ == "__main__":  # a child: role, listening fd, readiness fd
    threading.Thread(target=_exit_at_eof, daemon=True).start()
    _sock, _ready_fd = socket.socket(fileno=int(sys.argv[2])), int(sys.argv[3])
    if sys.argv[1] == "fast":
        asyncio.run(_fast_app(_sock, _ready_fd))
    else:
        _slow_worker(_sock, _ready_fd)
