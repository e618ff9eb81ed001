"""Audit 25: the access log under the request corpora, checked line by line against what clients got.

The request corpora (tests/test_smuggling_corpus.py `CASES`, tests/test_audit16.py, tests/test_audit22.py
and a third of the tests/test_audit21.py permutations, a few hundred connections, plus a few edge
connections: nothing sent, only empty lines, a stalled head) run concurrently against ONE proxy with
an access log file, once per `log_format`. Every connection comes from its own loopback address
(127.25.x.y), so the `client` field ties each log line to the connection it describes. The client
reads until the proxy closes (short header/body/keepalive timeouts bound every connection), splits
what it received into responses, and the proxy is then stopped (the documented close path flushes
the buffered log). The log must then hold, per connection:

* exactly one line per final response the client received (laneproxy's own 400/408/413/414/431/
  501/505 included) and no line for a connection that sent nothing or only empty lines (nginx
  1.22 logs nothing for a connection closed before a request line either; it does log a 400 for
  one that sent only CRLFs and then timed out, `"-"` request, and sends nothing: laneproxy sends
  nothing and logs nothing, which keeps "one line per response" exact);
* in the order the responses came, the status the client got and `bytes` equal to the bytes of
  that response (head and body: README documents nginx's `$bytes_sent`);
* every line parses (combined: nginx's combined prefix, then laneproxy's `key=value` extras; json:
  `json.loads`, exactly the documented keys with their types); no raw control byte, CR, LF, `"` or
  `\\` and no non-ASCII byte inside a combined field (nginx's `\\xHH`), the whole file ASCII/UTF-8;
* upstream fields only when an upstream was used, every time non-negative, header time not after
  response time;
* where a target was parsed, the logged method and target are the ones received (escaped).

Findings, fixed: the request field of a refused request could name a method the client never
sent (httptools' default DELETE), and the protocol of a refused request (a 505 for HTTP/2.0, a 400
for HTTP/1.0) was logged as HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field

import h11
import pytest

import tests.test_audit16 as a16
import tests.test_audit21 as a21
import tests.test_audit22 as a22
import tests.test_smuggling_corpus as corpus
from tests.conftest import Upstream, make_config
from tests.test_e2e_framing import echo

pytestmark = pytest.mark.timeout(45)

PARALLEL = 160
READ_LIMIT = 8.0  # the proxy's own timeouts (1 s) end every connection well before this
CLIENT_CFG = {"header_timeout": "1s", "body_timeout": "1s", "keepalive_timeout": "1s"}
LANE_CFG = {"read_timeout": "1s", "connect_timeout": "1s"}

# -- the connections ------------------------------------------------------------------------------


@dataclass
class Conn:
    id: str
    send: bytes | tuple[bytes, ...]
    method: bytes = b"GET"
    respond: bytes | None = None
    action: str = "keep"
    stray: bytes = b""
    ip: str = ""
    raw: bytes = b""
    eof: bool = False
    responses: list[tuple[int, int, int]] = field(default_factory=list)  # (status, bytes, interim bytes)

    @property
    def wire(self) -> bytes:
        return self.send if isinstance(self.send, bytes) else b"".join(self.send)


def _tag(send: bytes | tuple[bytes, ...], n: int) -> bytes | tuple[bytes, ...]:
    """`/case` -> `/case?k=N`: one multiplexing backend answers each case's crafted response."""
    new = b" /case?k=%d HTTP/" % n
    if isinstance(send, bytes):
        return send.replace(b" /case HTTP/", new)
    return tuple(p.replace(b" /case HTTP/", new) for p in send)


def build() -> list[Conn]:
    cases = (
        corpus.CASES + a16.REQUEST_CASES + a16.RESPONSE_CASES + a22.SEED_CASES + a22.SERVER_CASES
        + a22.TRANSDUCER_CASES + a22.HOSTLESS_CASES + a22.ANOMALY_CASES + a22.METHOD_CASES + a22.RESPONSE_CASES
        + [p.case for p in a21.PERMS][::3]
    )
    conns: list[Conn] = []
    for c in cases:
        if c.cfg:  # needs its own proxy configuration
            continue
        n = len(conns)
        send = _tag(c.send, n) if c.respond is not None else c.send
        conns.append(Conn(c.id, send, c.method, c.respond, c.action, c.stray))
    extra = {
        "nothing": b"",
        "only-crlf": b"\r\n",
        "only-empty-lines": b"\r\n\r\n\r\n\n",
        "stalled-head": b"GET /stall HTTP/1.1\r\nHost: t.example\r\n",
        "stalled-body": b"POST /c HTTP/1.1\r\nHost: t.example\r\nContent-Length: 9\r\n\r\nab",
        "utf8-target": b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: t.example\r\n\r\n",
        "hostile-ua": b'GET /ua HTTP/1.1\r\nHost: t.example\r\nUser-Agent: a"b\\c\xff\xc3\xa9\x7f\r\n'
                      b'Referer: "\\" x\r\n\r\n',
        "head": b"HEAD /h HTTP/1.1\r\nHost: t.example\r\n\r\n",
        "pipelined-3": b"GET /1 HTTP/1.1\r\nHost: t.example\r\n\r\nGET /2 HTTP/1.1\r\nHost: t.example\r\n\r\n"
                       b"GET /3 HTTP/1.1\r\nHost: t.example\r\n\r\n",
        "tls-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)) + b"\r\n\r\n",
        "expect-100": (b"POST /e HTTP/1.1\r\nHost: t.example\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
                       b"hello"),
    }
    conns += [Conn(k, v) for k, v in extra.items()]
    for i, conn in enumerate(conns):
        conn.ip = f"127.25.{1 + i // 250}.{1 + i % 250}"
    return conns


class MuxBackend:
    """h11 upstream: `/case?k=N` gets case N's crafted answer, everything else `echo`."""

    def __init__(self, conns: list[Conn]) -> None:
        self.conns = conns

    async def handler(self, reader, writer, up: Upstream) -> None:
        conn = h11.Connection(h11.SERVER)
        req: h11.Request | None = None
        body = bytearray()
        try:
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError:
                    return
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.ConnectionClosed):
                    return
                if isinstance(event, h11.Request):
                    req, body = event, bytearray()
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert req is not None
                    m = re.fullmatch(rb"/case\?k=(\d+)", req.target)
                    case = self.conns[int(m[1])] if m else None
                    if case is not None and case.respond is not None:
                        writer.write(case.respond)
                        await writer.drain()
                        if case.action == "close":
                            return
                        if case.action == "stray":
                            await asyncio.sleep(0.05)  # the corpus's own pacing of the stray bytes
                            writer.write(case.stray)
                            await writer.drain()
                    else:
                        writer.write(echo(req, bytes(body)))
                        await writer.drain()
                    try:
                        conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                        conn.send(h11.EndOfMessage())
                        conn.start_next_cycle()
                    except h11.LocalProtocolError:
                        conn = h11.Connection(h11.SERVER)
        except ConnectionError:
            return


def split_responses(raw: bytes, first_method: bytes) -> list[tuple[int, int, int]]:
    """The final responses in what a client received: (status, bytes, interim 1xx bytes before it)."""
    out: list[tuple[int, int, int]] = []
    pos, interim, method = 0, 0, first_method
    while pos < len(raw):
        end = raw.find(b"\r\n\r\n", pos)
        if end == -1:
            break  # a cut head: not a response the client got
        head = raw[pos:end]
        m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
        assert m, f"not a status line: {head[:80]!r}"
        status = int(m[1])
        hdrs = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            hdrs.setdefault(name.strip().lower(), value.strip())
        start, pos = pos, end + 4
        if 100 <= status < 200 and status != 101:
            interim += pos - start
            continue
        if method == b"HEAD" or status in (204, 304):
            pass
        elif status == 101:
            pos = len(raw)
        elif b"content-length" in hdrs:
            pos = min(len(raw), pos + int(hdrs[b"content-length"]))
        elif hdrs.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                nl = raw.find(b"\r\n", pos)
                if nl == -1:
                    pos = len(raw)
                    break
                size = int(raw[pos:nl].split(b";")[0], 16)
                if size == 0:
                    t = raw.find(b"\r\n\r\n", nl)
                    pos = len(raw) if t == -1 else t + 4
                    break
                pos = min(len(raw), nl + 2 + size + 2)
        else:
            pos = len(raw)
        out.append((status, pos - start, interim))
        interim, method = 0, b"GET"
    return out


async def run_conn(port: int, conn: Conn, sem: asyncio.Semaphore) -> None:
    async with sem:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(conn.ip, 0))
        raw = bytearray()
        try:
            pieces = (conn.send,) if isinstance(conn.send, bytes) else conn.send
            for i, piece in enumerate(pieces):
                if i:
                    await asyncio.sleep(0.05)  # the corpus's split writes (separate reads), not a sync
                if piece:
                    writer.write(piece)
                    await writer.drain()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + READ_LIMIT
            while True:
                data = await asyncio.wait_for(reader.read(65536), max(0.01, deadline - loop.time()))
                if not data:
                    conn.eof = True
                    break
                raw += data
        except (ConnectionError, TimeoutError):
            conn.eof = True
        finally:
            writer.close()
        conn.raw = bytes(raw)
        conn.responses = split_responses(conn.raw, conn.method)


async def run_corpus(start_proxy, upstream, tmp_path, fmt: str) -> tuple[list[Conn], bytes]:
    conns = build()
    up = await upstream(MuxBackend(conns).handler)
    log = tmp_path / "access.log"
    proxy = await start_proxy(make_config(up.port, access_log=str(log), log_format=fmt, client=CLIENT_CFG,
                                          lane=LANE_CFG))
    sem = asyncio.Semaphore(PARALLEL)
    await asyncio.gather(*(run_conn(proxy.port, c, sem) for c in conns))
    await proxy.stop(drain_timeout=1.0)  # the documented close path: flushes the buffered lines
    return conns, log.read_bytes()


# -- parsing the log ----------------------------------------------------------------------------------

FIELD = rb'(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\x[0-9A-F]{2})*'  # nginx escape=default: \xHH for the rest
NUM = rb"\d+\.\d{3}"
COMBINED = re.compile(
    rb'(?P<client>[0-9.]+) - - \[(?P<time>\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4})\] '
    rb'"(?P<request>' + FIELD + rb')" (?P<status>\d{3}) (?P<bytes>\d+) "(?P<referer>' + FIELD + rb')" '
    rb'"(?P<ua>' + FIELD + rb')" rt=(?P<rt>' + NUM + rb') lane=(?P<lane>\S+) route=(?P<route>\S+) '
    rb'up=(?P<up>\S+) uct=(?P<uct>-|' + NUM + rb') uht=(?P<uht>-|' + NUM + rb') urt=(?P<urt>-|' + NUM
    + rb') qw=(?P<qw>-|' + NUM + rb') retries=(?P<retries>\d+)(?: reason="(?P<reason>' + FIELD + rb')")?\n'
)
JSON_TYPES: dict[str, tuple[type, ...]] = {
    "ts": (str,), "client": (str,), "method": (str,), "target": (str,), "protocol": (str,), "status": (int,),
    "bytes": (int,), "time": (int, float), "lane": (str, type(None)), "route": (str, type(None)),
    "upstream": (str, type(None)), "upstream_connect_time": (int, float, type(None)),
    "upstream_header_time": (int, float, type(None)), "upstream_response_time": (int, float, type(None)),
    "queue_wait": (int, float, type(None)), "retries": (int,), "reason": (str, type(None)),
    "referer": (str, type(None)), "user_agent": (str, type(None)),
}


def unescape(value: bytes) -> bytes:
    return re.sub(rb"\\x([0-9A-F]{2})", lambda m: bytes([int(m[1], 16)]), value)


@dataclass
class Line:
    client: str
    method: bytes | None  # None: the placeholder
    target: bytes | None
    protocol: str
    status: int
    bytes: int
    times: dict[str, float | None]
    upstream: str | None


def parse(fmt: str, line: bytes) -> Line:
    assert line.isascii(), f"non-ASCII byte in a log line: {line!r}"
    if fmt == "combined":
        m = COMBINED.fullmatch(line)
        assert m, f"line does not parse as combined: {line!r}"
        parts = m["request"].split(b" ")
        if parts == [b"-"]:  # no request line was read (nginx's $request is "-" then)
            parts = [b"-", b"-", b"-"]
        assert len(parts) == 3, f"request field is not 'METHOD TARGET PROTOCOL' or '-': {line!r}"
        method, target, proto = (unescape(p) for p in parts)

        def t(name: str) -> float | None:
            return None if m[name] == b"-" else float(m[name])

        times = {"time": float(m["rt"]), "connect": t("uct"), "header": t("uht"), "response": t("urt"),
                 "queue": t("qw")}
        up = None if m["up"] == b"-" else m["up"].decode()
        return Line(m["client"].decode(), method, None if target == b"-" else target, proto.decode(),
                    int(m["status"]), int(m["bytes"]), times, up)
    rec = json.loads(line)
    assert set(rec) == set(JSON_TYPES), f"keys {sorted(rec)} != documented {sorted(JSON_TYPES)}"
    for key, types in JSON_TYPES.items():
        assert isinstance(rec[key], types) and not isinstance(rec[key], bool), f"{key}={rec[key]!r}: {line!r}"
    times = {"time": rec["time"], "connect": rec["upstream_connect_time"], "header": rec["upstream_header_time"],
             "response": rec["upstream_response_time"], "queue": rec["queue_wait"]}
    target = None if rec["target"] == "-" else rec["target"].encode("utf-8", "surrogateescape")
    return Line(rec["client"], rec["method"].encode("latin-1"), target, rec["protocol"], rec["status"], rec["bytes"],
                times, rec["upstream"])


def first_request_line(wire: bytes) -> bytes:
    i = 0
    while wire[i:i + 2] == b"\r\n" or wire[i:i + 1] == b"\n":
        i += 2 if wire[i:i + 1] == b"\r" else 1
    end = min((p for p in (wire.find(b"\r", i), wire.find(b"\n", i)) if p != -1), default=len(wire))
    return wire[i:end]


def as_json_text(value: bytes) -> bytes:
    """What the json format writes for client bytes (README: UTF-8 kept, other bytes as \\xHH)."""
    return value.decode("utf-8", "backslashreplace").encode("utf-8", "surrogateescape")


def check_line_fields(ln: Line) -> list[str]:
    bad = []
    for name, value in ln.times.items():
        if value is not None and value < 0:
            bad.append(f"negative {name} time {value}")
    if ln.upstream is None and any(ln.times[k] is not None for k in ("connect", "header", "response")):
        bad.append(f"upstream times without an upstream: {ln.times}")
    if ln.upstream is not None and ln.times["response"] is None:
        bad.append("an upstream without an upstream response time")
    h, r = ln.times["header"], ln.times["response"]
    if h is not None and r is not None and h > r + 0.0015:
        bad.append(f"header time {h} after response time {r}")
    if not re.fullmatch(r"HTTP/[0-9]\.[0-9]|-", ln.protocol):  # "-": no version was read
        bad.append(f"protocol {ln.protocol!r}")
    return bad


def check_conn(fmt: str, conn: Conn, lines: list[Line]) -> list[str]:
    """Everything one connection's lines must satisfy; a list of problems (empty: all good)."""
    bad: list[str] = []
    if not conn.eof:
        bad.append("the proxy did not close the connection within its own timeouts")
    got = [s for s, _, _ in conn.responses]
    logged = [ln.status for ln in lines]
    if got != logged:
        return [f"client got statuses {got}, log has {logged}"]
    for (status, size, interim), ln in zip(conn.responses, lines):
        # README: bytes is nginx's $bytes_sent (head and body). A 100 Continue sent before the final
        # response is counted by nginx too (c->sent); laneproxy may count it or not, both accepted.
        if ln.bytes not in (size, size + interim):
            bad.append(f"{status}: logged bytes {ln.bytes}, client got {size} (+{interim} interim)")
        bad += [f"{status}: {p}" for p in check_line_fields(ln)]
        if status == 200 and ln.upstream is None:
            bad.append("a proxied 200 without an upstream")
    if lines and lines[0].target is not None:
        first = first_request_line(conn.wire)
        if fmt == "json":
            first = as_json_text(first)
        if WELL_FORMED.fullmatch(first):
            method, target, proto = first.split(b" ")
            if (lines[0].method, lines[0].target) != (method, target):
                bad.append(f"logged {lines[0].method!r} {lines[0].target!r}, the request line was {first!r}")
            if lines[0].protocol.encode() not in (proto, b"-"):
                bad.append(f"logged protocol {lines[0].protocol}, the request line was {first!r}")
        elif lines[0].target not in first:
            # nginx logs the raw request line up to CR/LF ($request); laneproxy logs
            # "METHOD TARGET PROTOCOL" rebuilt from what its parser got, so for `GET  /c HTTP/1.1`
            # (two spaces), `GET /a b HTTP/1.1` or a line ended by a bare LF it logs a tidied line
            # (`GET /c HTTP/1.1`, `GET /a HTTP/1.1`): not the bytes received, but every part of it was.
            bad.append(f"logged target {lines[0].target!r} is not in the request line {first!r}")
    return bad


WELL_FORMED = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [^ ]+ HTTP/1\.[01]")


async def audit(start_proxy, upstream, tmp_path, fmt: str) -> dict[str, list[str]]:
    conns, data = await run_corpus(start_proxy, upstream, tmp_path, fmt)
    assert data.isascii(), "the log is documented ASCII-safe (escaped) in both formats"
    data.decode("utf-8")
    assert data == b"" or data.endswith(b"\n")
    by_ip: dict[str, list[Line]] = {}
    for raw in data.splitlines(keepends=True):
        ln = parse(fmt, raw)
        by_ip.setdefault(ln.client, []).append(ln)
    known = {c.ip for c in conns}
    assert set(by_ip) <= known, f"lines for clients that never connected: {set(by_ip) - known}"
    problems = {}
    for conn in conns:
        bad = check_conn(fmt, conn, by_ip.get(conn.ip, []))
        if bad:
            problems[conn.id] = bad
    total = sum(len(c.responses) for c in conns)
    assert total > 500 and sum(len(v) for v in by_ip.values()) == total
    return problems


@pytest.mark.parametrize("fmt", ["combined", "json"])
async def test_corpus_log_matches_what_clients_got(start_proxy, upstream, tmp_path, fmt):
    problems = await audit(start_proxy, upstream, tmp_path, fmt)
    assert not problems, "\n".join(f"{k}: {v}" for k, v in sorted(problems.items())[:40])


# -- targeted checks ----------------------------------------------------------------------------------


async def logged_lines(start_proxy, upstream, tmp_path, fmt: str, requests: list[bytes]) -> list[tuple[Conn, Line]]:
    """Each request on its own connection; (connection, its single log line) in request order."""
    conns = [Conn(f"r{i}", r, ip=f"127.25.200.{i + 1}") for i, r in enumerate(requests)]
    up = await upstream(MuxBackend(conns).handler)
    log = tmp_path / f"{fmt}.log"
    proxy = await start_proxy(make_config(up.port, access_log=str(log), log_format=fmt, client=CLIENT_CFG,
                                          lane=LANE_CFG))
    await asyncio.gather(*(run_conn(proxy.port, c, asyncio.Semaphore(8)) for c in conns))
    proxy.ctx.access_log.flush()  # the documented flush: everything logged so far is in the file
    by_ip = {}
    for raw in log.read_bytes().splitlines(keepends=True):
        ln = parse(fmt, raw)
        by_ip.setdefault(ln.client, []).append(ln)
    out = []
    for c in conns:
        assert len(by_ip.get(c.ip, [])) == len(c.responses) == 1, (c.send, by_ip.get(c.ip), c.responses)
        out.append((c, by_ip[c.ip][0]))
    return out


HOSTILE_UA = b'a"b\\c\xff\xc3\xa9 \x80\tz'  # " \ obs-text UTF-8 tab: all legal field bytes
HOSTILE_REF = b'"\\" x\t\xfey'


@pytest.mark.parametrize("fmt", ["combined", "json"])
async def test_client_values_round_trip_through_the_escaping(start_proxy, upstream, tmp_path, fmt):
    """User-Agent/Referer/target come back byte for byte from the documented escaping, in both formats."""
    req = (b"GET /r?q=%22x HTTP/1.1\r\nHost: t.example\r\nUser-Agent: " + HOSTILE_UA
           + b"\r\nReferer: " + HOSTILE_REF + b"\r\n\r\n")
    (conn, _), = await logged_lines(start_proxy, upstream, tmp_path, fmt, [req])
    raw = (tmp_path / f"{fmt}.log").read_bytes()
    assert conn.responses[0][0] == 200
    if fmt == "combined":
        m = COMBINED.fullmatch(raw)
        assert m, raw
        assert unescape(m["ua"]) == HOSTILE_UA and unescape(m["referer"]) == HOSTILE_REF
        assert b"\\xC3\\xA9" in m["ua"]  # non-ASCII escaped byte by byte, as nginx's escape=default
    else:
        rec = json.loads(raw)
        # README: json keeps UTF-8 and writes other bytes as \xHH (nginx escape=json would write
        # \u00XX for control bytes and pass other bytes raw, which can make the line invalid UTF-8)
        assert rec["user_agent"] == HOSTILE_UA.decode("utf-8", "backslashreplace")
        assert rec["referer"] == HOSTILE_REF.decode("utf-8", "backslashreplace")


@pytest.mark.parametrize("fmt", ["combined", "json"])
async def test_refused_request_never_logs_a_method_it_did_not_receive(start_proxy, upstream, tmp_path, fmt):
    requests = [b'G"ET / HTTP/1.1\r\nHost: t.example\r\n\r\n', b"get / HTTP/1.1\r\nHost: t.example\r\n\r\n"]
    for conn, ln in await logged_lines(start_proxy, upstream, tmp_path, fmt, requests):
        assert ln.status == conn.responses[0][0] == 400
        line = first_request_line(conn.wire)
        assert ln.method in (None, b"-") or line.startswith(ln.method + b" "), (ln.method, line)


@pytest.mark.parametrize("fmt", ["combined", "json"])
async def test_refused_request_logs_the_protocol_received(start_proxy, upstream, tmp_path, fmt):
    requests = [b"GET /x HTTP/2.0\r\nHost: t.example\r\n\r\n",
                b"POST /c HTTP/1.0\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"]
    got = await logged_lines(start_proxy, upstream, tmp_path, fmt, requests)
    assert [c.responses[0][0] for c, _ in got] == [505, 400]
    for conn, ln in got:
        proto = first_request_line(conn.wire).rsplit(b" ", 1)[1].decode()
        assert ln.protocol in (proto, "-"), (ln.protocol, proto)


@pytest.mark.parametrize("fmt", ["combined", "json"])
async def test_reopen_mid_traffic_loses_no_line(start_proxy, upstream, tmp_path, fmt):
    """logrotate: rename, then the SIGUSR1 handler's AccessLog.reopen(); every response has one line
    in exactly one of the files, none lost or doubled, while requests are in flight."""
    up = await upstream(MuxBackend([]).handler)
    log = tmp_path / "access.log"
    proxy = await start_proxy(make_config(up.port, access_log=str(log), log_format=fmt, client=CLIENT_CFG,
                                          lane=LANE_CFG))
    sem = asyncio.Semaphore(32)
    conns = [Conn(f"g{i}", b"GET /n%d HTTP/1.1\r\nHost: t.example\r\nConnection: close\r\n\r\n" % i,
                  ip=f"127.25.201.{i + 1}") for i in range(200)]
    tasks = [asyncio.ensure_future(run_conn(proxy.port, c, sem)) for c in conns]
    rotated = []
    for k in range(4):  # rotate while the requests are running, whenever the loop gets here
        while sum(t.done() for t in tasks) < 40 * (k + 1):
            await asyncio.wait([t for t in tasks if not t.done()], return_when=asyncio.FIRST_COMPLETED)
        rotated.append(tmp_path / f"access.log.{k}")
        log.rename(rotated[-1])
        proxy.ctx.access_log.reopen()
    await asyncio.gather(*tasks)
    await proxy.stop(drain_timeout=1.0)
    targets = []
    for path in [*rotated, log]:
        for raw in path.read_bytes().splitlines(keepends=True):
            ln = parse(fmt, raw)
            assert ln.status == 200
            targets.append(ln.target)
    assert all(c.responses and c.responses[0][0] == 200 for c in conns)
    assert sorted(targets) == sorted(b"/n%d" % i for i in range(200))
    assert all(p.stat().st_size for p in rotated[:1])
