"""An instrumented slow pool like webman's `'task' => ['count' => 8]` (the isolation benchmark's upstream).

    python bench/slowpool.py --port P [--workers 8] [--ms 200] --log-dir DIR

`--workers` processes, each serving ONE request at a time and blocking while it does (`time.sleep`),
share one listening socket (backlog 511), as in `laneproxy/demo.py`: a connection waits in one accept
queue for whichever worker is free. A worker idle on a kept-alive connection drops it when a newcomer
has waited in the accept queue for a short grace (1-3 ms: long enough for a worker blocked in accept
to take it, short enough that a worker does not sit idle waiting for a new request on its own
connection while older requests wait in the accept queue: a longer grace serves the proxy's most
recently reused connection first, LIFO, which flatters a proxy without a cap).
The app does what a PHP app does: it never checks whether its client is still there before working.

Logs (CLOCK_MONOTONIC seconds, the same clock as `time.monotonic()` in every process):
- `DIR/worker-PID.tsv`, one line per request: `id start end peer_closed send_ok` where `id` is the
  request's `X-Bench-Id` (or `-`), `peer_closed` 1 when the proxy had already closed the connection
  when the worker started the request, `send_ok` 0 when the answer could not be written.
- `DIR/held.tsv`, every 20 ms from the parent: `t held executing`: `executing` is how many workers
  run a request; `held` adds the requests waiting inside the pool, unread: connections to the pool's
  port (accepted or still in the accept queue) with bytes in their receive queue (`/proc/net/tcp`).
  Connections are told apart by peer port, and the running ones are read after the waiting ones, so
  that a request read and started during the sample is counted once.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.synchronize
import os
import random
import select
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType
from typing import NoReturn, TextIO
from urllib.parse import parse_qs, urlsplit

SAMPLE_S = 0.02
GRACE_S = (0.001, 0.003)
READY = "slowpool ready"


class Request:
    __slots__ = ("target", "keep_alive", "bench_id")

    def __init__(self, target: str, keep_alive: bool, bench_id: str) -> None:
        self.target, self.keep_alive, self.bench_id = target, keep_alive, bench_id


def parse_head(buf: bytearray) -> tuple[Request, int] | None:
    """(request, bytes used: head + body) when `buf` starts with a whole request, else None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise ValueError(f"bad request line {lines[0]!r}")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    length = int(fields.get("content-length", "0"))
    if len(buf) < end + 4 + length:
        return None
    connection = fields.get("connection", "").lower()
    keep = connection != "close" if parts[2] == "HTTP/1.1" else connection == "keep-alive"
    return Request(parts[1], keep, fields.get("x-bench-id", "-")), end + 4 + length


def sleep_ms(target: str, default: int) -> int:
    raw = parse_qs(urlsplit(target).query).get("ms", [str(default)])[-1]
    return min(int(raw), 60_000) if raw.isdigit() else default


def peer_closed(conn: socket.socket) -> bool:
    """True when the other side has closed (or reset) the connection and sent nothing more."""
    if not select.select([conn], [], [], 0)[0]:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def wait_request(conn: socket.socket, listen: socket.socket) -> bool:
    """Idle on a kept-alive connection: True when bytes (or EOF) arrive on it, False when a
    newcomer has waited in the shared accept queue for the grace (then this connection is dropped)."""
    while True:
        if conn in select.select([conn, listen], [], [])[0]:
            return True
        if select.select([conn], [], [], random.uniform(*GRACE_S))[0]:
            return True
        if select.select([listen], [], [], 0)[0]:
            return False


def serve_connection(conn: socket.socket, peer: int, listen: socket.socket, slot: int, busy: list[int],
                     default_ms: int, log: TextIO) -> None:
    buf = bytearray()
    while True:
        parsed = parse_head(buf)
        if parsed is None:
            if not buf and not wait_request(conn, listen):
                return
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            continue
        request, used = parsed
        del buf[:used]
        closed = peer_closed(conn)
        busy[slot] = peer  # which connection: the sampler must not count a request twice
        start = time.monotonic()
        time.sleep(sleep_ms(request.target, default_ms) / 1000)  # blocking: nobody else is served
        end = time.monotonic()
        busy[slot] = 0
        body = f"slow pool pid {os.getpid()} id {request.bench_id}\n".encode()
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nX-Pool-Pid: {os.getpid()}\r\n"
            + ("" if request.keep_alive else "Connection: close\r\n") + "\r\n"
        )
        try:
            conn.sendall(head.encode() + body)
            sent = True
        except OSError:
            sent = False
        print(f"{request.bench_id}\t{start:.6f}\t{end:.6f}\t{int(closed)}\t{int(sent)}", file=log, flush=True)
        if not sent or not request.keep_alive:
            return


def worker(listen: socket.socket, slot: int, busy: list[int], default_ms: int, log_dir: Path,
           ready: multiprocessing.synchronize.Event) -> NoReturn:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with open(log_dir / f"worker-{os.getpid()}.tsv", "w") as log:
        ready.set()
        while True:
            conn, (_, peer) = listen.accept()
            with conn:
                conn.settimeout(10.0)
                try:
                    serve_connection(conn, peer, listen, slot, busy, default_ms, log)
                except (OSError, ValueError):
                    pass  # peer reset, too slow, or not HTTP: drop the connection


def waiting_requests(port: int) -> set[int]:
    """Peer ports of the connections to our port with unread bytes: requests waiting inside the pool
    (on accepted connections, or on connections still in the accept queue)."""
    tag = f":{port:04X}"
    waiting = set()
    with open("/proc/net/tcp") as tcp:
        next(tcp)
        for line in tcp:
            fields = line.split()
            if fields[1].endswith(tag) and fields[3] in ("01", "08") and fields[4][-8:] != "00000000":
                waiting.add(int(fields[2][-4:], 16))
    return waiting


def _stop(signum: int, frame: FrameType | None) -> NoReturn:
    raise SystemExit(0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--ms", type=int, default=200, help="default sleep per request (?ms=N overrides)")
    parser.add_argument("--log-dir", type=Path, required=True)
    args = parser.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    listen = socket.socket()
    listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listen.bind((args.host, args.port))
    listen.listen(511)
    ctx = multiprocessing.get_context("fork")
    busy = ctx.RawArray("i", args.workers)  # per worker: the peer port of the request it runs, or 0
    procs = []
    for slot in range(args.workers):
        ready = ctx.Event()
        proc = ctx.Process(target=worker, args=(listen, slot, busy, args.ms, args.log_dir, ready), daemon=True)
        proc.start()
        ready.wait(10)
        procs.append(proc)
    signal.signal(signal.SIGTERM, _stop)
    print(f"{READY}: {args.workers} workers on {args.host}:{args.port}", flush=True)
    with open(args.log_dir / "held.tsv", "w", buffering=1) as out:  # line-buffered: read while running
        try:
            while all(p.is_alive() for p in procs):
                now = time.monotonic()
                waiting = waiting_requests(args.port)
                running = {peer for peer in busy if peer}  # read after the waiting ones: no double count
                out.write(f"{now:.4f}\t{len(waiting | running)}\t{len(running)}\n")
                time.sleep(SAMPLE_S)
        finally:
            out.flush()
            for proc in procs:
                proc.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
