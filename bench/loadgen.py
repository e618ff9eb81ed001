"""The load: wrk with a generated lua script, the WebSocket ping-pong client (bench/wsload.py), and an
asyncio client that holds idle connections."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

JSON_TAG = "BENCH_JSON "

# done() runs once after the run, in wrk's main lua state; it prints one JSON line.
_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"bytes":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\\n',
    "{tag}", summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


def lua_script(setup: str) -> str:
    """`setup` sets wrk.method / wrk.body / wrk.headers; the rest is the shared done()."""
    return setup.strip() + "\n" + _DONE.replace("{tag}", JSON_TAG)


@dataclass
class WrkResult:
    requests: int
    bytes: int
    duration_s: float
    non_2xx: int  # wrk's "Non-2xx or 3xx responses": status >= 400
    socket_errors: int  # connect + read + write + timeout
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    raw: dict[str, float]


def run_wrk(
    url: str, script: Path, connections: int, duration: int, core: int, timeout_s: int = 5,
) -> WrkResult:
    argv = [
        "taskset", "-c", str(core), "wrk", "-t1", f"-c{connections}", f"-d{duration}s",
        f"--timeout={timeout_s}s", "-s", str(script), url,
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + timeout_s + 30)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(JSON_TAG)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-800:]} {proc.stderr[-800:]}")
    raw = json.loads(line[len(JSON_TAG) :])
    return WrkResult(
        requests=raw["requests"],
        bytes=raw["bytes"],
        duration_s=raw["duration_us"] / 1e6,
        non_2xx=raw["status"],
        socket_errors=raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        mean_ms=raw["mean_us"] / 1000,
        raw=raw,
    )


def run_ws(url: str, connections: int, duration: int, core: int) -> WrkResult:
    """`bench/wsload.py client` pinned to `core`: round trips reported as requests (a WrkResult)."""
    script = Path(__file__).resolve().parent / "wsload.py"
    python = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python"
    argv = [
        "taskset", "-c", str(core), str(python if python.exists() else sys.executable), str(script), "client",
        "--url", url, "--connections", str(connections), "--duration", str(duration),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"wsload client failed ({proc.returncode}): {proc.stderr[-800:]}")
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    return WrkResult(
        requests=raw["round_trips"], bytes=raw["bytes"], duration_s=raw["duration_s"],
        non_2xx=raw["failed_handshakes"], socket_errors=raw["broken"], p50_ms=raw["p50_ms"],
        p90_ms=raw["p90_ms"], p99_ms=raw["p99_ms"], max_ms=raw["max_ms"], mean_ms=raw["mean_ms"], raw=raw,
    )


# --- idle connections for the memory-per-connection figure -------------------------------------------

async def _open_one(host: str, port: int, path: str, gate: asyncio.Semaphore):
    """Connect, do one keep-alive GET, read the whole answer, and keep the connection."""
    async with gate:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if not head.startswith(b"HTTP/1.1 2"):
            writer.close()
            raise RuntimeError(f"unexpected answer {head[:40]!r}")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await asyncio.wait_for(reader.readexactly(length), 10)
        return writer


class IdleConnections:
    """Holds `count` idle keep-alive connections to host:port open (each after one request)."""

    def __init__(self, host: str, port: int, path: str, count: int) -> None:
        self.host, self.port, self.path, self.count = host, port, path, count
        self.writers: list[asyncio.StreamWriter] = []
        self.failures = 0

    async def open(self) -> None:
        gate = asyncio.Semaphore(100)  # below the listen backlog of 511
        tasks = [_open_one(self.host, self.port, self.path, gate) for _ in range(self.count)]
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, BaseException):
                self.failures += 1
            else:
                self.writers.append(result)

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        for writer in self.writers:
            try:
                await writer.wait_closed()
            except OSError:
                pass
        self.writers.clear()
