"""Differential run: the smuggling corpus through nginx and through laneproxy, side by side.

Optional: skipped when nginx is not installed (CI does not need it). nginx runs as a reverse proxy
in front of the same kind of scripted upstream (temp prefix, `daemon off`, one worker,
`proxy_http_version 1.1`, `proxy_set_header Connection ""`, `underscores_in_headers off`,
an upstream keepalive pool). Every case of tests/test_smuggling_corpus.py (requests and upstream
responses) is driven through both, the same way, on one long-lived instance of each.

Nothing is asserted about nginx beyond "it ran"; the differences (status, further responses,
connection state, what the upstream got, canary) go to `bench/out/differential.md` (gitignored)
and to stdout (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
from pathlib import Path

import pytest

from tests.conftest import Upstream, make_config
from tests.test_e2e_framing import parse_requests
from tests.test_smuggling_corpus import CASES, Backend, Case, Observation, drive, settle

NGINX = shutil.which("nginx")
WAIT = 1.5  # per read; nginx's own timeouts are 1 s here
OUT = Path(__file__).resolve().parent.parent / "bench" / "out" / "differential.md"

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        NGINX is None,
        reason="nginx is not installed (optional differential run; CI does not need it)"
        + (" [CI]" if os.environ.get("CI") else ""),
    ),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nginx_conf(prefix: Path, port: int, upstream_port: int) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""
    temps = "\n".join(f"    {kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                            "uwsgi", "scgi"))
    return f"""{user}worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log off;
{temps}
    underscores_in_headers off;
    client_header_timeout 1s;
    client_body_timeout 1s;
    send_timeout 1s;
    proxy_connect_timeout 1s;
    proxy_read_timeout 1s;
    proxy_send_timeout 1s;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    upstream up {{
        server 127.0.0.1:{upstream_port};
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://up;
        }}
    }}
}}
"""


@contextlib.asynccontextmanager
async def running_nginx(tmp_path: Path, upstream_port: int):
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, port, upstream_port))
    proc = await asyncio.create_subprocess_exec(
        NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),  # type: ignore[arg-type]
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                if proc.returncode is not None or loop.time() > deadline:
                    log = (prefix / "error.log").read_text() if (prefix / "error.log").exists() else ""
                    pytest.fail(f"nginx did not start: {log[-2000:]}")
                await asyncio.sleep(0.05)
        yield port
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


class Side:
    """One proxy under test with its own upstream; the per-case view of what the upstream got."""

    def __init__(self, name: str, up: Upstream, backend: Backend) -> None:
        self.name = name
        self.up = up
        self.backend = backend
        self.port = 0

    async def run(self, case: Case) -> tuple[Observation, list[tuple[str, str, str, int]]]:
        self.backend.respond, self.backend.action, self.backend.stray = case.respond, case.action, case.stray
        marks = [len(raw) for raw in self.up.received]
        obs = await drive(self.port, case, wait=WAIT)
        await settle(self.up, self.backend, timeout=1.0)
        got: list[tuple[str, str, str, int]] = []
        for i, raw in enumerate(self.up.received):
            new = bytes(raw[marks[i] if i < len(marks) else 0 :])
            if not new:
                continue
            try:
                reqs = parse_requests(new, complete=False)
            except Exception as exc:  # h11 refuses what this proxy forwarded
                got.append(("h11 error:", str(exc)[:40], "", 0))
                continue
            for req, body in reqs:
                if req.target in (b"/next", b"/canary"):
                    continue
                framing = next((("CL" if n == b"content-length" else f"TE:{v.decode('latin-1')}")
                                for n, v in req.headers if n in (b"content-length", b"transfer-encoding")), "")
                got.append((req.method.decode(), req.target.decode("latin-1")[:24], framing, len(body)))
        return obs, got


def shown(got: list[tuple[str, str, str, int]]) -> str:
    return "; ".join(f"{m} {t} {f} {n}B".replace("  ", " ") for m, t, f, n in got)


def essence(got: list[tuple[str, str, str, int]]) -> list[tuple[str, str, int]]:
    """What the upstream got, minus the framing style (nginx re-frames chunked bodies with CL)."""
    return [(m, t, n) for m, t, _, n in got]


def summary(obs: Observation) -> str:
    if obs.status is None:
        text = "no response"
    else:
        text = "/".join(str(s) for s in obs.statuses)
    if obs.aborted:
        text += " aborted"
    elif obs.closed:
        text += " closed"
    elif obs.closed is False:
        text += " not closed"
    elif obs.followed_up:
        text += " kept" if obs.next_result and obs.next_result[0] == 200 else f" kept, next {obs.next_result}"
    if obs.canary != (200, b"GET /canary body=0"):
        text += f" CANARY {obs.canary[0] if obs.canary else '-'}"
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "-"


async def test_differential_nginx(tmp_path):
    lp_backend, ngx_backend = Backend(), Backend()
    lp_up = await Upstream(lp_backend.handler).start()
    ngx_up = await Upstream(ngx_backend.handler).start()
    lp, ngx = Side("laneproxy", lp_up, lp_backend), Side("nginx", ngx_up, ngx_backend)
    import yaml

    from laneproxy.config import parse_config
    from laneproxy.server import Proxy

    cfg = make_config(lp_up.port, client={"header_timeout": "1s", "body_timeout": "1s"})
    proxy = Proxy(parse_config(yaml.safe_dump(cfg)))
    await proxy.start()
    rows: list[tuple[str, ...]] = []
    same = reframed = 0
    try:
        async with running_nginx(tmp_path, ngx_up.port) as ngx_port:
            lp.port, ngx.port = proxy.port, ngx_port
            for case in CASES:
                (lp_obs, lp_got), (ngx_obs, ngx_got) = await asyncio.gather(lp.run(case), ngx.run(case))
                lp_text, ngx_text = summary(lp_obs), summary(ngx_obs)
                if lp_text == ngx_text and essence(lp_got) == essence(ngx_got):
                    same += 1
                    if lp_got != ngx_got:
                        reframed += 1
                    continue
                rows.append((case.id, case.kind, lp_text, ngx_text, shown(lp_got), shown(ngx_got), case.note))
    finally:
        await proxy.stop(drain_timeout=0.5)
        await lp_up.close()
        await ngx_up.close()
    lines = [
        "# Differential run: laneproxy vs nginx",
        "",
        f"nginx {NGINX}; {len(CASES)} corpus cases: {same} alike ({reframed} of them differ only in the framing the",
        f"upstream saw: nginx buffers a chunked body and sends Content-Length), {len(rows)} different.",
        "Cells: final statuses on the client connection, then `closed` / `not closed` (within the wait) / `kept`",
        "(a follow-up request on the same connection was served) / `aborted` (body cut);",
        "`CANARY n`: the canary on a fresh connection did not get its own 200. `upstream got`: requests",
        "other than /next and /canary, with their framing field and body size.",
        "",
        "| case | kind | laneproxy | nginx | upstream got (laneproxy) | upstream got (nginx) | policy |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print("\n" + text)
    assert same + len(rows) == len(CASES)  # nginx ran every case
