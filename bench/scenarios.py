"""The scenarios of `bench/run.py`: what each one requests, from which upstream, through which proxies."""

from __future__ import annotations

from dataclasses import dataclass

UPLOAD_SIZE = 16 * 1024
IDLE_CONNECTIONS = 1000
STATIC_FILES = {"/s4k.bin": 4 * 1024, "/s1m.bin": 1024 * 1024}  # written into the try_files root
FILE_SERVERS = ("laneproxy", "nginx")  # HAProxy and the naive aiohttp proxy serve no files
WEBSOCKET_PROXIES = ("laneproxy", "nginx", "haproxy")  # the naive aiohttp proxy does not tunnel
# wrk calls delay() before each request: each connection sleeps 1.9-2.1 s between requests, so the
# proxy reuses upstream connections right when the soak upstream closes them (2 s idle).
SOAK_LUA = "delay = function()\n  return math.random(1900, 2100)\nend"


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    connections: int
    lua: str  # wrk request setup; the shared done() is appended
    about: str
    idle_rss: bool = False
    proxies: tuple[str, ...] | None = None  # None: every proxy; else the others are skipped
    skip_why: str = ""
    upstream: str = "main"  # "main": the upstream nginx; "soak": its 2 s keep-alive server; "ws": the echo
    try_files: bool = False  # route `/` with try_files from the static root
    access_log: bool = False  # laneproxy writes an access log into the run's temp dir
    workers: int = 1
    kind: str = "wrk"  # "wrk" or "websocket" (bench/wsload.py ping-pong)
    duration: tuple[int, int] | None = None  # (normal, quick) seconds, fixed whatever --duration says
    warmup: bool = True


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("small", "/small", 64, "", "keep-alive GET, 12-byte body, 64 connections"),
        Scenario("large", "/large", 64, "", "keep-alive GET, 1 MiB body, 64 connections"),
        Scenario(
            "upload", "/upload", 64,
            f'wrk.method = "POST"\nwrk.body = string.rep("a", {UPLOAD_SIZE})\n'
            'wrk.headers["Content-Type"] = "application/octet-stream"',
            "keep-alive POST of a 16 KiB body, 64 connections",
        ),
        Scenario(
            "conns", "/small", IDLE_CONNECTIONS, "",
            "1,000 concurrent keep-alive connections; RSS per idle connection", idle_rss=True,
        ),
        Scenario(
            "fresh", "/small", 64, 'wrk.headers["Connection"] = "close"',
            "a new client connection per request (Connection: close), 64 at a time",
        ),
        Scenario("chunked", "/chunked", 64, "", "keep-alive GET, 64 KiB chunked upstream response"),
        Scenario(
            "soak", "/small", 64, SOAK_LUA,
            "64 connections, each idle 1.9-2.1 s between GETs, upstream closes idle keep-alive after 2 s; "
            "30 s (10 s quick), zero errors expected", upstream="soak", duration=(30, 10), warmup=False,
        ),
        Scenario(
            "static4k", "/s4k.bin", 64, "", "a 4 KiB file from disk (try_files route; nginx root + try_files)",
            proxies=FILE_SERVERS, skip_why="serves no files", try_files=True,
        ),
        Scenario(
            "static1m", "/s1m.bin", 64, "", "a 1 MiB file from disk (try_files route; nginx root + try_files)",
            proxies=FILE_SERVERS, skip_why="serves no files", try_files=True,
        ),
        Scenario(
            "tryfiles_miss", "/small", 64, "", "`small` through a try_files route where no such file exists",
            proxies=FILE_SERVERS, skip_why="serves no files", try_files=True,
        ),
        Scenario(
            "websocket", "/ws", 32, "", "32 WebSockets doing 64-byte echo ping-pong (round trips per second)",
            proxies=WEBSOCKET_PROXIES, skip_why="does not tunnel WebSockets", upstream="ws", kind="websocket",
        ),
        Scenario(
            "accesslog", "/small", 64, "", "`small` with laneproxy's access log to a file (combined)",
            proxies=("laneproxy",), skip_why="is not measured here (laneproxy only)", access_log=True,
        ),
        Scenario(
            "workers", "/small", 64, "", "`small` with `workers: 2` (nginx worker_processes 2, HAProxy nbthread 2)",
            proxies=("laneproxy", "nginx", "haproxy"), skip_why="has no workers setting", workers=2,
        ),
    )
}
ALIASES = {"static": ("static4k", "static1m")}
