"""Audit 5: config validation, CLI, access-log line format, signals and lifecycle (black-box)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import struct
import subprocess
import sys

import pytest
import yaml

from tests.conftest import exchange, make_config, open_client, read_response
from tests.process import spawn_proxy, stop_proxy

pytestmark = pytest.mark.timeout(60)

LP = [sys.executable, "-m", "laneproxy"]
BASE = "version: 1\nlanes:\n  a:\n    servers: 127.0.0.1:9001\nroutes:\n  - {prefix: /, lane: a}\n"
GET = b"GET /%s HTTP/1.1\r\nHost: t\r\n\r\n"


def cli(*args: str, cwd=None, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([*LP, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def check(tmp_path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return cli("check", "-c", str(path))


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def lane(extra: str) -> str:
    """BASE with extra keys on lane `a` (indented lines `key: value`)."""
    return BASE.replace("    servers:", "".join(f"    {x}\n" for x in extra.split(";")) + "    servers:")


# == 1. config validation =====================================================================

# interface.md: "exit 2 and print one `yaml.path: message` line per problem"
GOOD_REJECTS = {
    "duration 10x": (BASE + "drain_timeout: 10x\n", "drain_timeout: "),
    "duration -1s": (BASE + "drain_timeout: -1s\n", "drain_timeout: "),
    "duration 5S": (BASE + "drain_timeout: 5S\n", "drain_timeout: "),
    "size 1.5k": (lane("max_body: 1.5k"), "lanes.a.max_body: "),
    "size 1t": (lane("max_body: 1t"), "lanes.a.max_body: "),
    "size -1": (lane("max_body: -1"), "lanes.a.max_body: "),
    "workers 2.5": (BASE + "workers: 2.5\n", "workers: "),
    "retries -1": (lane("retries: -1"), "lanes.a.retries: "),
    "keepalive_requests 0": (lane("keepalive_requests: 0"), "lanes.a.keepalive_requests: "),
    "read_timeout 0": (lane("read_timeout: 0"), "lanes.a.read_timeout: "),
    "client max_connections 0": (BASE + "client: {max_connections: 0}\n", "client.max_connections: "),
    "health unknown key": (lane("health: {bogus: 1}"), "lanes.a.health.bogus: unknown key"),
    "server mapping unknown key": (
        BASE.replace("servers: 127.0.0.1:9001", "servers: [{address: 127.0.0.1:1, bogus: 1}]"),
        "lanes.a.servers[0].bogus: unknown key",
    ),
    "listen :8080": (BASE + "listen: ':8080'\n", "listen[0]: "),
    "listen mapping": (BASE + "listen: {a: 1}\n", "listen: "),
    "listen ipv6 without brackets": (BASE + "listen: '::1:8080'\n", "listen[0]: "),
    "routes as mapping": ("version: 1\nlanes: {a: {servers: 127.0.0.1:1}}\nroutes: {prefix: /, lane: a}\n", "routes: "),
    "route item a string": ("version: 1\nlanes: {a: {servers: 127.0.0.1:1}}\nroutes: [/]\n", "routes[0]: "),
    "lanes as list": ("version: 1\nlanes: [a]\nroutes: [{prefix: /, lane: a}]\n", "lanes: "),
    "lane null": ("version: 1\nlanes: {a: }\nroutes: [{prefix: /, lane: a}]\n", "lanes.a: "),
    "client null": (BASE + "client: null\n", "client: "),
    "admin as string": (BASE + "admin: 127.0.0.1:9901\n", "admin: "),
    "empty document": ("", "(top level): "),
    "scalar document": ("hello\n", "(top level): "),
    "two documents": (BASE + "---\nversion: 1\n", "(yaml) line 7, column 1: "),
    "tab indentation": ("version: 1\nlanes:\n\ta: 1\n", "(yaml) line 3, column 1: "),
    "prefix non-ascii": (BASE.replace("prefix: /", "prefix: /é"), "routes[0].prefix: "),
    "duplicate prefix": (
        BASE.replace("routes:\n", "routes:\n  - {prefix: /a, lane: a}\n  - {prefix: /a, lane: a}\n"),
        "routes[1].prefix: duplicate of routes[0]",
    ),
}


@pytest.mark.parametrize(("text", "want"), GOOD_REJECTS.values(), ids=GOOD_REJECTS.keys())
def test_check_rejects_with_yaml_path(tmp_path, text, want):
    # interface.md: check "exit 2 and print one `yaml.path: message` line per problem"
    proc = check(tmp_path, text)
    assert proc.returncode == 2, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(want), lines
    assert not want.endswith(": ") or len(lines[0]) > len(want), lines


# Values laneproxy accepts but should not: each should be one `yaml.path: message` line, exit 2.
SHOULD_REJECT = {
    # PyYAML keeps the last of two equal keys: a second lane `a` silently replaces the first.
    "duplicate lane key": (
        "version: 1\nlanes:\n  a:\n    servers: 127.0.0.1:9001\n  a:\n    servers: 127.0.0.1:9002\n"
        "routes:\n  - {prefix: /, lane: a}\n",
        "lanes.a: ",
    ),
    "duplicate top-level key": (BASE + "listen: 127.0.0.1:18001\nlisten: 127.0.0.1:18002\n", "listen: "),
    # admin listener on the same address as the proxy listener: run can only fail at bind.
    "admin.listen equals listen": (
        BASE + "listen: 127.0.0.1:18080\nadmin: {listen: 127.0.0.1:18080}\n",
        "admin.listen: ",
    ),
    # 0 s header timeout answers every request 408 before its first byte can arrive.
    "client.header_timeout 0": (BASE + "client: {header_timeout: 0}\n", "client.header_timeout: "),
    "client.body_timeout 0": (BASE + "client: {body_timeout: 0}\n", "client.body_timeout: "),
    # a boolean where a count is expected (the config already refuses `version: yes`).
    "limit: true": (lane("limit: true"), "lanes.a.limit: "),
    "workers: true": (BASE + "workers: true\n", "workers: "),
    # not an IPv4 address and not a host name: nginx -t says "host not found".
    "listen 999.1.1.1": (BASE + "listen: '999.1.1.1:8080'\n", "listen[0]: "),
    "listen [zz]": (BASE + "listen: '[zz]:8080'\n", "listen[0]: "),
    # access_log: "" is a path that names the config directory itself.
    "access_log empty string": (BASE + "access_log: ''\n", "access_log: "),
}


@pytest.mark.parametrize(("text", "want"), SHOULD_REJECT.values(), ids=SHOULD_REJECT.keys())
def test_check_should_reject(tmp_path, text, want):
    # interface.md: check "exit 2 and print one `yaml.path: message` line per problem"
    proc = check(tmp_path, text)
    assert proc.returncode == 2, proc.stdout
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(want), lines


def test_check_integer_lane_name_path(tmp_path):
    # interface.md: "`yaml.path: message`" (e.g. `lanes.task.servers[0]: ...`); a YAML key 1 is lane "1"
    proc = check(tmp_path, "version: 1\nlanes: {1: {servers: 127.0.0.1:1}}\nroutes: [{prefix: /, lane: '1'}]\n")
    assert proc.returncode in (0, 2)
    if proc.returncode == 2:
        assert "[key]" not in proc.stdout and proc.stdout.startswith("lanes.1"), proc.stdout


def test_check_several_levels_report_each_problem_once(tmp_path):
    # README: "unknown keys are errors, each reported with its YAML path"
    text = (
        "version: 1\nbogus: 1\nclient: {nope: 1}\nadmin: {x: 1}\n"
        "lanes:\n  a:\n    servers: [{address: 127.0.0.1:1, w: 2}]\n    health: {p: /}\n    zz: 1\n"
        "routes:\n  - {prefix: /, lane: a, qq: 1}\n"
    )
    proc = check(tmp_path, text)
    assert proc.returncode == 2
    assert sorted(proc.stdout.splitlines()) == sorted(
        [
            "bogus: unknown key",
            "client.nope: unknown key",
            "admin.x: unknown key",
            "lanes.a.servers[0].w: unknown key",
            "lanes.a.health.p: unknown key",
            "lanes.a.zz: unknown key",
            "routes[0].qq: unknown key",
        ]
    )


def test_check_good_file_summary_and_exit_0(tmp_path):
    # interface.md: check "exit 0 and print a one-screen summary of listeners, lanes and routes"
    proc = check(tmp_path, BASE + "listen: 127.0.0.1:18123\n")
    assert proc.returncode == 0 and proc.stderr == ""
    out = proc.stdout
    assert "http://127.0.0.1:18123" in out and "127.0.0.1:9001" in out and "/ -> a" in out
    assert len(out.splitlines()) <= 24


def test_check_conf_file_of_the_repo_is_valid():
    # interface.md: "`conf/laneproxy.yaml` in the repo is that same default, commented"
    proc = cli("check", "-c", "conf/laneproxy.yaml", cwd="/work/main")
    assert proc.returncode == 0 and "/tast -> task" in proc.stdout


def test_run_bad_config_subprocess_exit_2_no_traceback(tmp_path):
    # interface.md: "`run` with a bad config exits 2 with the same messages as `check`"
    path = tmp_path / "bad.yaml"
    path.write_text(BASE + f"drain_timeout: 10x\nlisten: 127.0.0.1:{free_port()}\n")
    proc = cli("run", "-c", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "drain_timeout: expected a duration" in proc.stderr


@pytest.mark.parametrize(
    ("access_log", "words"),
    [("/nonexistent/dir/a.log", "/nonexistent/dir/a.log"), ("", "access_log: an empty path")],
    ids=["missing-dir", "empty-string"],
)
def test_run_unopenable_access_log_is_a_clear_error(tmp_path, access_log, words):
    # interface.md: bad config "exits 2 ... before binding anything" (nginx: open() "..." failed)
    path = tmp_path / "c.yaml"
    path.write_text(BASE + f"listen: 127.0.0.1:{free_port()}\naccess_log: '{access_log}'\n")
    proc = cli("run", "-c", str(path))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-600:]
    assert words in proc.stderr


# == 2. CLI ===================================================================================


def test_help_lists_every_subcommand():
    # interface.md: "laneproxy run / check / demo"; README: "laneproxy reload"
    proc = cli("--help")
    assert proc.returncode == 0
    for word in ("run", "check", "demo", "reload"):
        assert re.search(rf"\b{word}\b", proc.stdout)


@pytest.mark.parametrize(
    "argv",
    [["bogus"], ["run", "--nope"], ["check", "-x"], []],
    ids=["subcommand", "run-option", "check-option", "none"],
)
def test_argument_errors_exit_2_with_usage_on_stderr(argv):
    # usual CLI convention (argparse / nginx): usage error -> exit 2, message on stderr, not stdout
    proc = cli(*argv)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "usage:" in proc.stderr and "Traceback" not in proc.stderr


def test_run_port_taken_is_a_clear_error(tmp_path):
    # README: "logs `listening on http://HOST:PORT`" only when bound; a taken port must say so
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        path = tmp_path / "c.yaml"
        path.write_text(BASE + f"listen: 127.0.0.1:{port}\n")
        proc = cli("run", "-c", str(path))
    finally:
        holder.close()
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "address already in use" in proc.stderr.lower() and str(port) in proc.stderr
    assert "listening on" not in proc.stderr


def test_run_unresolvable_listen_names_the_address(tmp_path):
    # a bind/resolve failure must name the listen address it concerns (nginx: host not found in "...")
    path = tmp_path / "c.yaml"
    path.write_text(BASE + "listen: 'no-such-host.invalid:18999'\n")
    proc = cli("run", "-c", str(path))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no-such-host.invalid" in proc.stderr, proc.stderr


def test_reload_without_running_instance(tmp_path):
    # README: "laneproxy reload -c laneproxy.yaml  # POST /api/reload on the admin listener"
    path = tmp_path / "c.yaml"
    port = free_port()
    path.write_text(BASE + f"admin: {{listen: 127.0.0.1:{port}}}\n")
    proc = cli("reload", "-c", str(path))
    assert proc.returncode == 1
    assert f"127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr


def test_reload_without_admin_or_pid(tmp_path):
    # README: "(or: reload --pid PID, kill -HUP)"
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    proc = cli("reload", "-c", str(path))
    assert proc.returncode == 1 and "--pid" in proc.stderr


def test_reload_pid_of_no_process():
    # README: "reload --pid PID"
    proc = cli("reload", "--pid", "999999999")
    assert proc.returncode == 1 and "999999999" in proc.stderr and "Traceback" not in proc.stderr


# == 3. access log ============================================================================

COMBINED_RE = re.compile(
    rb'^(\S+) - - \[[^\]]+\] "((?:[^"\\]|\\.)*)" (\d{3}) (\d+) "((?:[^"\\]|\\.)*)" "((?:[^"\\]|\\.)*)" (.*)\n$'
)


def nginx_escape(value: bytes) -> bytes:
    """nginx's access-log escaping: `"`, `\\`, and bytes outside 0x20..0x7e as \\xHH."""
    return b"".join(b"\\x%02X" % c if c in (0x22, 0x5C) or not 0x20 <= c <= 0x7E else bytes([c]) for c in value)


async def logged(start_proxy, upstream, tmp_path, requests, fmt="combined", **cfg):
    up = await upstream()
    log = tmp_path / "access.log"
    proxy = await start_proxy(make_config(up.port, access_log=str(log), log_format=fmt, **cfg))
    for request in requests:
        await exchange(proxy.port, request)
    proxy.ctx.access_log.flush()
    return log.read_bytes().splitlines(keepends=True), proxy, up


UA_VALUES = {
    "quote": b'ua "quoted" x',
    "backslash": b"ua\\x",
    "quote-injection": b'x" 999 1 "-" "evil',
    "tab": b"a\tb",
    "utf8": "é".encode(),
    "obs-text-ff": b"a\xffb",
}


@pytest.mark.parametrize("ua", UA_VALUES.values(), ids=UA_VALUES.keys())
async def test_combined_escapes_user_agent(start_proxy, upstream, tmp_path, ua):
    # nginx log_format combined: `"` `\` and non-printable bytes are written as \xHH
    req = b"GET /ua HTTP/1.1\r\nHost: t\r\nUser-Agent: " + ua + b"\r\n\r\n"
    lines, _, _ = await logged(start_proxy, upstream, tmp_path, [req])
    assert len(lines) == 1, lines
    m = COMBINED_RE.match(lines[0])
    assert m, lines[0]
    assert m.group(3) == b"200"
    assert m.group(6) == nginx_escape(ua), lines[0]


@pytest.mark.parametrize("ref", [b'http://r/"x', b"http://r/\\"], ids=["quote", "backslash"])
async def test_combined_escapes_referer(start_proxy, upstream, tmp_path, ref):
    # nginx log_format combined: `"` and `\` in $http_referer are written as \x22 / \x5C
    req = b"GET /r HTTP/1.1\r\nHost: t\r\nReferer: " + ref + b"\r\n\r\n"
    lines, _, _ = await logged(start_proxy, upstream, tmp_path, [req])
    m = COMBINED_RE.match(lines[0])
    assert m and m.group(5) == nginx_escape(ref), lines[0]


async def test_combined_obs_text_target_line_stays_ascii(start_proxy, upstream, tmp_path):
    # nginx log_format combined: bytes > 0x7e in $request never reach the line raw
    req = b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: t\r\n\r\n"
    lines, _, _ = await logged(start_proxy, upstream, tmp_path, [req])
    assert len(lines) == 1 and lines[0].isascii()
    assert COMBINED_RE.match(lines[0]), lines[0]


@pytest.mark.parametrize(
    "target", [b'/a"b', b'/a?x="y"', b"/a?x=\\"], ids=["quote-path", "quote-query", "backslash-query"]
)
async def test_combined_escapes_target(start_proxy, upstream, tmp_path, target):
    # nginx log_format combined: `"` and `\` in $request are written as \x22 / \x5C
    req = b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n"
    lines, _, _ = await logged(start_proxy, upstream, tmp_path, [req])
    assert len(lines) == 1
    m = COMBINED_RE.match(lines[0])
    assert m, lines[0]
    assert m.group(2) == b"GET " + nginx_escape(target) + b" HTTP/1.1", lines[0]


async def test_combined_own_400_line_is_parseable(start_proxy, upstream, tmp_path):
    # README access log: "when laneproxy answered itself, the reason"
    lines, _, _ = await logged(start_proxy, upstream, tmp_path, [b"GET /x HTTP/1.1\r\n\r\n"])
    m = COMBINED_RE.match(lines[0])
    assert m and m.group(3) == b"400"
    assert re.search(rb' reason="missing Host"\n$', lines[0]), lines[0]


async def test_own_400_logs_request_line_and_user_agent(start_proxy, upstream, tmp_path):
    # nginx logs $request and $http_user_agent for a 400 once the request line was read
    req = b"GET /x?y=1 HTTP/1.1\r\nUser-Agent: ua/1\r\n\r\n"  # no Host: 400 by laneproxy
    lines, _, _ = await logged(start_proxy, upstream, tmp_path, [req], fmt="json")
    rec = json.loads(lines[0])
    assert rec["status"] == 400 and rec["reason"] == "missing Host"
    assert (rec["target"], rec["user_agent"]) == ("/x?y=1", "ua/1"), lines[0]


@pytest.mark.parametrize("ua", UA_VALUES.values(), ids=UA_VALUES.keys())
async def test_json_stays_valid_for_hostile_user_agent(start_proxy, upstream, tmp_path, ua):
    # README: log_format json; one JSON object per line
    req = b"GET /j HTTP/1.1\r\nHost: t\r\nUser-Agent: " + ua + b"\r\nReferer: " + ua + b"\r\n\r\n"
    lines, _, _ = await logged(start_proxy, upstream, tmp_path, [req], fmt="json")
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["status"] == 200
    # UTF-8 as sent; other bytes as the text \xHH (accesslog.text): never mojibake, never lost
    assert rec["user_agent"] == ua.decode("utf-8", "backslashreplace")


async def test_json_utf8_user_agent_is_not_mojibake(start_proxy, upstream, tmp_path):
    # nginx escape=json passes UTF-8 through: a JSON reader sees "é", not "Ã©" (latin-1 decoding)
    req = b"GET /j HTTP/1.1\r\nHost: t\r\nUser-Agent: caf\xc3\xa9\r\n\r\n"
    lines, _, _ = await logged(start_proxy, upstream, tmp_path, [req], fmt="json")
    assert json.loads(lines[0])["user_agent"] == "café", lines[0]


async def test_json_target_with_obs_text_line_is_valid(start_proxy, upstream, tmp_path):
    # README: json access log; every line a JSON object
    req = b"GET /caf\xc3\xa9?q=\xff HTTP/1.1\r\nHost: t\r\n\r\n"
    lines, _, _ = await logged(start_proxy, upstream, tmp_path, [req], fmt="json")
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["status"] == 400 and rec["reason"]


async def test_combined_bytes_is_all_bytes_sent(start_proxy, upstream, tmp_path):
    # README: the bytes field is "bytes sent (head and body, nginx's `$bytes_sent`)" -- not
    # nginx combined's `$body_bytes_sent`: more than the body, and the whole response
    lines, _, up = await logged(start_proxy, upstream, tmp_path, [GET % b"b"])
    m = COMBINED_RE.match(lines[0])
    body = b"GET /b HTTP/1.1 body=0\n"  # what keepalive_handler answers
    assert len(body) + len(b"HTTP/1.1 200 OK\r\n\r\n") < int(m.group(4)) < len(body) + 400, lines[0]


async def test_json_own_answers_404_414_fields(start_proxy, upstream, tmp_path):
    # README: "the reason" when laneproxy answered itself; interface.md: 404 no route, 414 long line
    up = await upstream()
    log = tmp_path / "access.log"
    cfg = make_config(up.port, routes=[{"prefix": "/api/", "lane": "app"}], access_log=str(log), log_format="json")
    proxy = await start_proxy(cfg)
    s404, _, b404 = await exchange(proxy.port, GET % b"nope")
    long = b"GET /api/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n"
    s414, _, _ = await exchange(proxy.port, long)
    assert (s404, s414) == (404, 414)
    proxy.ctx.access_log.flush()
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["status"] for r in recs] == [404, 414]
    r404, r414 = recs
    assert r404["target"] == "/nope" and r404["lane"] is None and r404["route"] is None
    assert r404["upstream"] is None and r404["reason"] and r404["bytes"] > 0
    assert r414["reason"] and r414["upstream"] is None and r414["lane"] is None
    assert up.connections == 0


async def test_json_503_and_499_fields(start_proxy, upstream, tmp_path):
    # interface.md: 503 lane at limit; README: client abort; nginx logs 499 for a client that went away
    release = asyncio.Event()

    async def slow(reader, writer, up):
        await reader.read_request()
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    up = await upstream(slow)
    log = tmp_path / "access.log"
    proxy = await start_proxy(
        make_config(up.port, access_log=str(log), log_format="json", lane={"limit": 1, "queue": 0})
    )
    r1, w1 = await open_client(proxy.port)
    w1.write(GET % b"held")
    for _ in range(300):
        if up.received and up.received[0]:
            break
        await asyncio.sleep(0.01)
    status, headers, _ = await exchange(proxy.port, GET % b"refused")
    assert status == 503 and b"retry-after" in headers
    sock = w1.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w1.transport.abort()  # the client goes away while the upstream still works
    for _ in range(300):
        if proxy.lanes["app"].in_flight == 0:
            break
        await asyncio.sleep(0.01)
    release.set()
    proxy.ctx.access_log.flush()
    recs = {r["target"]: r for r in map(json.loads, log.read_text().splitlines())}
    r503, r499 = recs["/refused"], recs["/held"]
    assert r503["status"] == 503 and r503["lane"] == "app" and r503["route"] == "/"
    assert r503["upstream"] is None and r503["reason"]
    assert r499["status"] == 499 and r499["lane"] == "app" and r499["upstream"] == f"127.0.0.1:{up.port}"
    assert r499["bytes"] == 0


async def test_combined_own_answer_503_line(start_proxy, upstream, tmp_path):
    # README: access log fields incl. lane/route and the reason for laneproxy's own answers
    release = asyncio.Event()

    async def slow(reader, writer, up):
        await reader.read_request()
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    up = await upstream(slow)
    log = tmp_path / "access.log"
    proxy = await start_proxy(make_config(up.port, access_log=str(log), lane={"limit": 1}))
    r1, w1 = await open_client(proxy.port)
    w1.write(GET % b"held")
    for _ in range(300):
        if up.received and up.received[0]:
            break
        await asyncio.sleep(0.01)
    assert (await exchange(proxy.port, GET % b"x"))[0] == 503
    release.set()
    assert (await read_response(r1))[0] == 200
    w1.close()
    proxy.ctx.access_log.flush()
    lines = log.read_bytes().splitlines(keepends=True)
    line503 = next(x for x in lines if b'"GET /x ' in x)
    m = COMBINED_RE.match(line503)
    assert m and m.group(3) == b"503"
    assert b" lane=app route=/ up=- " in line503 and b' reason="' in line503


# == 4. signals and lifecycle =================================================================


async def wait_log(tmp_path, needle: str, count: int = 1, timeout: float = 10) -> str:
    for _ in range(int(timeout / 0.05)):
        text = (tmp_path / "proxy.log").read_text()
        if text.count(needle) >= count:
            return text
        await asyncio.sleep(0.05)
    raise AssertionError(f"{needle!r} not logged: {text[-1500:]}")


async def test_sighup_invalid_then_valid(tmp_path, upstream):
    # README: "SIGHUP reloads the config (validated first; an invalid file is logged and the running config stays)"
    a, b = await upstream(), await upstream()
    cfg = make_config(a.port)
    proc, port = await spawn_proxy(tmp_path, cfg)
    try:
        path = tmp_path / "laneproxy.yaml"
        path.write_text(yaml.safe_dump(cfg) + "bogus: 1\n")
        proc.send_signal(signal.SIGHUP)
        text = await wait_log(tmp_path, "bogus: unknown key")
        assert "Traceback" not in text
        assert proc.poll() is None
        assert (await exchange(port, GET % b"still"))[0] == 200
        assert b"GET /still" in b"".join(bytes(r) for r in a.received)
        path.write_text("version: 1\nlanes: [\n")  # YAML syntax error
        proc.send_signal(signal.SIGHUP)
        await wait_log(tmp_path, "(yaml) line", 1)
        assert (await exchange(port, GET % b"still2"))[0] == 200
        cfg["lanes"]["app"]["servers"] = [f"127.0.0.1:{b.port}"]
        path.write_text(yaml.safe_dump(cfg))
        proc.send_signal(signal.SIGHUP)
        await wait_log(tmp_path, "reloaded:")
        status, _, body = await exchange(port, GET % b"moved")
        assert status == 200 and b"GET /moved" in b"".join(bytes(r) for r in b.received)
    finally:
        assert await stop_proxy(proc) == 0


async def test_sighup_with_deleted_file_keeps_running(tmp_path, upstream):
    # README: an unusable file on SIGHUP is reported and the running config stays
    up = await upstream()
    proc, port = await spawn_proxy(tmp_path, make_config(up.port))
    try:
        (tmp_path / "laneproxy.yaml").unlink()
        proc.send_signal(signal.SIGHUP)
        await wait_log(tmp_path, "reload refused")
        assert proc.poll() is None
        assert (await exchange(port, GET % b"ok"))[0] == 200
    finally:
        assert await stop_proxy(proc) == 0


async def test_sigterm_drains_in_flight_with_connection_close(tmp_path, upstream):
    # README: "SIGTERM ... let in-flight exchanges finish (their responses carry Connection: close) ... then exit 0"
    release = asyncio.Event()

    async def slow(reader, writer, up):
        await reader.read_request()
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
        await writer.drain()
        await reader.read()

    up = await upstream(slow)
    proc, port = await spawn_proxy(tmp_path, make_config(up.port, drain_timeout="10s"))
    try:
        reader, writer = await open_client(port)
        writer.write(GET % b"slow")
        for _ in range(300):
            if up.received and up.received[0]:
                break
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        await wait_log(tmp_path, "SIGTERM")
        with pytest.raises(OSError):
            await asyncio.wait_for(open_client(port), 2)  # no longer accepting
        assert proc.poll() is None
        release.set()
        status, headers, body = await asyncio.wait_for(read_response(reader), 5)
        assert (status, body) == (200, b"done")
        assert headers[b"connection"] == [b"close"]
        writer.close()
        rc = await asyncio.wait_for(asyncio.to_thread(proc.wait), 10)
        assert rc == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_second_sigterm_stops_at_once(tmp_path, upstream):
    # README: "then exit 0; a second one stops at once"
    async def never(reader, writer, up):
        await reader.read_request()
        await reader.read()

    up = await upstream(never)
    proc, port = await spawn_proxy(tmp_path, make_config(up.port, drain_timeout="30s"))
    try:
        reader, writer = await open_client(port)
        writer.write(GET % b"stuck")
        for _ in range(300):
            if up.received and up.received[0]:
                break
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        await wait_log(tmp_path, "SIGTERM")
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(asyncio.to_thread(proc.wait), 5)
        assert rc == 0
        writer.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_sigusr1_without_access_log_is_harmless(tmp_path, upstream):
    # README: "SIGUSR1 reopens the access log"; with access_log off it must not kill the proxy
    up = await upstream()
    proc, port = await spawn_proxy(tmp_path, make_config(up.port))
    try:
        proc.send_signal(signal.SIGUSR1)
        await asyncio.sleep(0.2)
        assert proc.poll() is None
        assert (await exchange(port, GET % b"x"))[0] == 200
    finally:
        assert await stop_proxy(proc) == 0


async def test_sigusr1_reopen_combined_after_move(tmp_path, upstream):
    # README: "reopened on SIGUSR1" (logrotate: rename, then signal)
    up = await upstream()
    log = tmp_path / "access.log"
    proc, port = await spawn_proxy(tmp_path, make_config(up.port, access_log="access.log"))
    try:
        await exchange(port, GET % b"one")
        for _ in range(300):
            if log.exists() and log.stat().st_size:
                break
            await asyncio.sleep(0.01)
        log.rename(tmp_path / "access.log.1")
        proc.send_signal(signal.SIGUSR1)
        for _ in range(300):
            if log.exists():
                break
            await asyncio.sleep(0.01)
        await exchange(port, GET % b"two")
        await exchange(port, GET % b"three")
    finally:
        assert await stop_proxy(proc) == 0
    old = (tmp_path / "access.log.1").read_bytes().splitlines()
    new = log.read_bytes().splitlines()
    assert len(old) == 1 and b"GET /one " in old[0]
    assert [b"GET /two " in new[0], b"GET /three " in new[1]] == [True, True] and len(new) == 2
