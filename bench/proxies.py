"""The proxies under test, all configured from one laneproxy YAML.

`bench_yaml()` writes the laneproxy config (listen, one lane to the upstream, route `/`);
`nginx_conf()` and `haproxy_conf()` translate its listeners, lanes and routes, so that the three
proxy the same routes with the same limits; the naive aiohttp proxy gets the `/` lane's first server.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from service import Service
from upstream import nginx_user_line

PROXIES = ("laneproxy", "nginx", "haproxy", "aiohttp")
LANEPROXY_READY = "listening on http://"
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


def venv_python() -> str:
    candidate = REPO / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


# --- the laneproxy YAML ---------------------------------------------------------------------------

def bench_yaml(
    port: int, upstream: str, workers: int = 1, access_log: Path | None = None, try_files_root: Path | None = None,
) -> str:
    """listen 127.0.0.1:PORT, one lane `bench` -> the upstream, route `/` (with try_files from
    `try_files_root` when given); `workers` processes; an access log file when given.

    Keep-alive request caps are raised on both sides (as in any proxy benchmark) so that the
    keep-alive scenarios measure keep-alive for every proxy; the translation carries them over.
    """
    route = f"\n    try_files: true\n    root: {json.dumps(str(try_files_root))}" if try_files_root else ""
    return f"""\
version: 1
listen: "127.0.0.1:{port}"
workers: {workers}
access_log: {json.dumps(str(access_log)) if access_log else "off"}
client:
  keepalive_timeout: 75s
  keepalive_requests: 1000000
  max_connections: 4096
lanes:
  bench:
    servers: ["{upstream}"]
    keepalive: 1024
    keepalive_timeout: 60s
    keepalive_requests: 1000000
    connect_timeout: 5s
    read_timeout: 60s
    send_timeout: 60s
    max_body: 1m
routes:
  - prefix: /
    lane: bench{route}
"""


# --- a small reader of the parts of the YAML that other proxies can express -----------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg])?\s*$", re.IGNORECASE)


def duration_ms(value: Any) -> int:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return round(value * 1000)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"bad duration {value!r}")
    scale = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, None: 1000}[match.group(2)]
    return round(float(match.group(1)) * scale)


def size_bytes(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"bad size {value!r}")
    unit = (match.group(2) or "").lower()
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]


def host_port(value: Any) -> tuple[str, int]:
    text = str(value)
    if text.isdigit():
        return "0.0.0.0", int(text)
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Lane:
    name: str
    servers: list[tuple[str, int]]
    keepalive: int = 10240
    keepalive_timeout_ms: int = 60_000
    keepalive_requests: int = 1000
    connect_timeout_ms: int = 5_000
    read_timeout_ms: int = 60_000
    send_timeout_ms: int = 60_000
    max_body: int = 1024 * 1024
    limit: int = 0  # laneproxy's in-flight cap; nginx `max_conns` (only when asked), HAProxy `maxconn`
    queue: int = 0
    queue_timeout_ms: int = 30_000


@dataclass
class Route:
    prefix: str
    lane: str
    strip_prefix: bool = False
    root: str | None = None  # set when the route has try_files: serve root + path when it is a file


@dataclass
class ProxySetup:
    listen: list[tuple[str, int]]
    lanes: dict[str, Lane]
    routes: list[Route]
    header_timeout_ms: int = 60_000
    body_timeout_ms: int = 60_000
    send_timeout_ms: int = 60_000
    keepalive_timeout_ms: int = 75_000
    keepalive_requests: int = 1000
    max_connections: int = 10000
    workers: int = 1

    def routes_longest_first(self) -> list[Route]:
        return sorted(self.routes, key=lambda r: -len(r.prefix))


def read_setup(text: str) -> ProxySetup:
    doc = yaml.safe_load(text)
    listen = doc.get("listen", "0.0.0.0:8080")
    listeners = [host_port(item) for item in (listen if isinstance(listen, list) else [listen])]
    client = doc.get("client") or {}
    lanes: dict[str, Lane] = {}
    for name, spec in doc["lanes"].items():
        lane = Lane(name=name, servers=[host_port(s) for s in spec["servers"]])
        for key, attr, conv in (
            ("keepalive", "keepalive", int),
            ("keepalive_timeout", "keepalive_timeout_ms", duration_ms),
            ("keepalive_requests", "keepalive_requests", int),
            ("connect_timeout", "connect_timeout_ms", duration_ms),
            ("read_timeout", "read_timeout_ms", duration_ms),
            ("send_timeout", "send_timeout_ms", duration_ms),
            ("max_body", "max_body", size_bytes),
            ("limit", "limit", int),
            ("queue", "queue", int),
            ("queue_timeout", "queue_timeout_ms", duration_ms),
        ):
            if key in spec:
                setattr(lane, attr, conv(spec[key]))
        lanes[name] = lane
    routes = []
    for spec in doc["routes"]:
        root = str(spec.get("root") or doc.get("root", "./public")) if spec.get("try_files") else None
        if root is not None and not Path(root).is_absolute():
            raise ValueError(f"route {spec['prefix']}: the benchmark writes absolute roots only")
        routes.append(Route(spec["prefix"], spec["lane"], bool(spec.get("strip_prefix", False)), root))
    setup = ProxySetup(listen=listeners, lanes=lanes, routes=routes, workers=int(doc.get("workers", 1)))
    for key, attr, conv in (
        ("header_timeout", "header_timeout_ms", duration_ms),
        ("body_timeout", "body_timeout_ms", duration_ms),
        ("send_timeout", "send_timeout_ms", duration_ms),
        ("keepalive_timeout", "keepalive_timeout_ms", duration_ms),
        ("keepalive_requests", "keepalive_requests", int),
        ("max_connections", "max_connections", int),
    ):
        if key in client:
            setattr(setup, attr, conv(client[key]))
    return setup


# --- nginx ------------------------------------------------------------------------------------------

def nginx_conf(setup: ProxySetup, prefix: Path, max_conns: bool = False, websocket: bool = False) -> str:
    """nginx, `workers` workers (1 by default), no access log: `upstream { keepalive }` per lane, a prefix
    `location` per route (with `root` + `try_files $uri @route_N` when the route has try_files).

    `max_conns`: a lane's `limit` becomes `max_conns=N` on its servers (nginx OSS cannot queue: a
    request over it gets 502 at once); without it lane limits are not translated (the seed page's
    config). `websocket`: `Upgrade $http_upgrade` and `Connection "upgrade"` instead of `Connection ""`.

    Upstream requests are HTTP/1.1 with `Connection ""` (reused connections) and carry the headers
    laneproxy adds (Host as received, X-Real-IP, X-Forwarded-For/-Proto/-Host, Via). Responses are
    buffered in memory only (`proxy_max_temp_file_size 0`): no temp files on disk for 1 MiB bodies, and
    request bodies up to 128 KiB stay in memory too (with the default 16k buffer a 16 KiB upload is
    spooled to a temp file and stalls on delayed ACKs: ~1.4k req/s instead of ~38k).
    """
    out = [
        nginx_user_line() + f"worker_processes {setup.workers};",
        f"worker_rlimit_nofile {2 * setup.max_connections + 2048};",
        "daemon off;",
        f"pid {prefix}/nginx.pid;",
        f"error_log {prefix}/error.log warn;",
        f"events {{ worker_connections {2 * setup.max_connections + 1024}; }}",
        "http {",
        "    access_log off;",
    ]
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        out.append(f"    {kind}_temp_path {prefix}/{kind};")
    out += [
        f"    client_header_timeout {setup.header_timeout_ms}ms;",
        f"    client_body_timeout {setup.body_timeout_ms}ms;",
        f"    send_timeout {setup.send_timeout_ms}ms;",
        f"    keepalive_timeout {setup.keepalive_timeout_ms}ms;",
        f"    keepalive_requests {setup.keepalive_requests};",
        "    proxy_http_version 1.1;",
        *(
            ["    proxy_set_header Upgrade $http_upgrade;", '    proxy_set_header Connection "upgrade";']
            if websocket else ['    proxy_set_header Connection "";']
        ),
        "    proxy_set_header Host $http_host;",
        "    proxy_set_header X-Real-IP $remote_addr;",
        "    proxy_set_header X-Forwarded-For $remote_addr;",
        "    proxy_set_header X-Forwarded-Proto $scheme;",
        "    proxy_set_header X-Forwarded-Host $http_host;",
        "    proxy_set_header Via $bench_via;",
        "    proxy_max_temp_file_size 0;",
        "    client_body_buffer_size 128k;",
        '    map $http_via $bench_via { "" "1.1 nginx"; default "$http_via, 1.1 nginx"; }',
    ]
    for lane in setup.lanes.values():
        out.append(f"    upstream lane_{lane.name} {{")
        cap = f" max_conns={lane.limit}" if max_conns and lane.limit else ""
        out += [f"        server {_addr(h, p)}{cap};" for h, p in lane.servers]
        out += [
            f"        keepalive {lane.keepalive};",
            f"        keepalive_timeout {lane.keepalive_timeout_ms}ms;",
            f"        keepalive_requests {lane.keepalive_requests};",
            "    }",
        ]
    out.append("    server {")
    out += [f"        listen {_addr(h, p)} backlog=511;" for h, p in setup.listen]
    for index, route in enumerate(setup.routes_longest_first()):
        lane = setup.lanes[route.lane]
        if route.root is not None:
            out += [
                f"        location {route.prefix} {{",
                f"            root {route.root};",
                "            default_type application/octet-stream;",
                "            sendfile on;",
                "            tcp_nopush on;",
                f"            try_files $uri @route_{index};",
                "        }",
            ]
        out.append(f"        location {route.prefix if route.root is None else f'@route_{index}'} {{")
        if route.strip_prefix:
            stripped = re.escape(route.prefix.rstrip("/"))
            out.append(f"            rewrite ^{stripped}/?(.*)$ /$1 break;")
        out += [
            f"            proxy_pass http://lane_{lane.name};",
            f"            client_max_body_size {lane.max_body};",
            f"            proxy_connect_timeout {lane.connect_timeout_ms}ms;",
            f"            proxy_read_timeout {lane.read_timeout_ms}ms;",
            f"            proxy_send_timeout {lane.send_timeout_ms}ms;",
            "        }",
        ]
    if not any(route.prefix == "/" for route in setup.routes):
        out.append('        location / { default_type text/plain; return 404 "no route\\n"; }')
    out += ["    }", "}", ""]
    return "\n".join(out)


# --- HAProxy ----------------------------------------------------------------------------------------

def haproxy_conf(setup: ProxySetup) -> str:
    """HAProxy, `nbthread` = workers (1 by default), mode http with keep-alive both ways and
    `http-reuse always`. A lane's `limit`/`queue`/`queue_timeout` become the server's `maxconn` and
    `maxqueue` and the backend's `timeout queue`, with `option abortonclose` (a queued request whose
    client has gone is dropped, not sent). HAProxy serves no files: try_files routes are refused."""
    if any(route.root is not None for route in setup.routes):
        raise ValueError("HAProxy does not serve files: try_files routes have no translation")
    client_timeout = max(setup.body_timeout_ms, setup.send_timeout_ms)
    out = [
        "global",
        f"    nbthread {setup.workers}",
        f"    maxconn {setup.max_connections}",
        "",
        "defaults",
        "    mode http",
        "    option http-keep-alive",
        "    timeout connect 5s",
        f"    timeout client {client_timeout}ms",
        "    timeout server 60s",
        f"    timeout http-request {setup.header_timeout_ms}ms",
        f"    timeout http-keep-alive {setup.keepalive_timeout_ms}ms",
        "",
        "frontend bench",
    ]
    out += [f"    bind {_addr(h, p)}" for h, p in setup.listen]
    out += [
        f"    maxconn {setup.max_connections}",
        "    http-request set-header X-Real-IP %[src]",
        "    http-request set-header X-Forwarded-For %[src]",
        "    http-request set-header X-Forwarded-Proto http",
        "    http-request set-header X-Forwarded-Host %[req.hdr(host)]",
        '    http-request add-header Via "1.1 haproxy"',
    ]
    # pick the route once, on the original path (an ACL would be re-evaluated after replace-path)
    routes = setup.routes_longest_first()
    for index, route in enumerate(routes):
        out.append(
            f"    http-request set-var(txn.route) int({index}) "
            f"if !{{ var(txn.route) -m found }} {{ path_beg {route.prefix} }}"
        )
    for index, route in enumerate(routes):
        if route.strip_prefix:
            stripped = re.escape(route.prefix.rstrip("/"))
            out.append(f"    http-request replace-path ^{stripped}/?(.*) /\\1 if {{ var(txn.route) -m int {index} }}")
    for index, route in enumerate(routes):
        out.append(f"    use_backend lane_{route.lane} if {{ var(txn.route) -m int {index} }}")
    out += ["    default_backend no_route", ""]
    for lane in setup.lanes.values():
        out += [
            f"backend lane_{lane.name}",
            "    balance roundrobin",
            "    http-reuse always",
            f"    http-request deny deny_status 413 if {{ req.hdr_val(content-length) gt {lane.max_body} }}",
            f"    timeout connect {lane.connect_timeout_ms}ms",
            f"    timeout server {lane.read_timeout_ms}ms",
        ]
        cap = ""
        if lane.limit:
            out += [f"    timeout queue {lane.queue_timeout_ms}ms", "    option abortonclose"]
            cap = f" maxconn {lane.limit} maxqueue {lane.queue}"
        for i, (host, port) in enumerate(lane.servers):
            out.append(
                f"    server s{i} {_addr(host, port)} pool-max-conn {lane.keepalive} "
                f"pool-purge-delay {lane.keepalive_timeout_ms}ms max-reuse {lane.keepalive_requests}{cap}"
            )
        out.append("")
    out += [
        "backend no_route",
        '    http-request return status 404 content-type text/plain string "no route\\n"',
        "",
    ]
    return "\n".join(out)


# --- starting them ----------------------------------------------------------------------------------

@dataclass
class Proxy:
    name: str
    host: str
    port: int
    service: Service

    @property
    def pid(self) -> int:
        return self.service.pid


def start_proxy(
    name: str, workdir: Path, yaml_path: Path, core: int, timeout: float = 15.0,
    max_conns: bool = False, websocket: bool = False,
) -> Proxy:
    """Write the proxy's config (translated from `yaml_path`) into `workdir` and start it on `core`
    `max_conns` and `websocket` are nginx options (see `nginx_conf`)."""
    setup = read_setup(yaml_path.read_text())
    host, port = setup.listen[0]
    workdir.mkdir(parents=True, exist_ok=True)
    marker = None
    if name == "laneproxy":
        argv = [venv_python(), "-m", "laneproxy", "run", "-c", str(yaml_path)]
        marker = LANEPROXY_READY
    elif name == "nginx":
        conf = workdir / "nginx.conf"
        conf.write_text(nginx_conf(setup, workdir, max_conns=max_conns, websocket=websocket))
        argv = ["nginx", "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")]
    elif name == "haproxy":
        conf = workdir / "haproxy.cfg"
        conf.write_text(haproxy_conf(setup))
        argv = ["haproxy", "-db", "-f", str(conf)]
    elif name == "aiohttp":
        if any(route.root is not None for route in setup.routes):
            raise ValueError("the naive aiohttp proxy serves no files: try_files has no translation")
        root = next(r for r in setup.routes if r.prefix == "/")
        up_host, up_port = setup.lanes[root.lane].servers[0]
        argv = [
            venv_python(), str(BENCH_DIR / "naive_aiohttp_proxy.py"),
            "--listen", _addr(host, port), "--upstream", _addr(up_host, up_port),
        ]
    else:
        raise ValueError(f"unknown proxy {name!r}; known: {', '.join(PROXIES)}")
    service = Service(name, argv, workdir, core=core, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    service.start(host, port, timeout=timeout, ready_marker=marker)
    return Proxy(name=name, host=host, port=port, service=service)
