"""Audit 20: the HTTP version x persistence matrix, end to end through real sockets.

Dimensions: client request version (1.0, 1.1) x client Connection field (absent, close,
keep-alive, both tokens, mixed case, `foo, keep-alive` naming a Foo field, two Connection lines)
x request body (none, Content-Length, chunked) x upstream response version (1.0, 1.1) x upstream
framing (Content-Length, chunked, close-delimited, HEAD, 204, 304) x upstream Connection (absent,
close, keep-alive, naming a field; plus a second table of odd spellings). Every combination runs
(1 764 cells, plus 528 for the odd upstream spellings and 36 answers laneproxy makes itself): one
test per client row, each looping over the upstream table on one proxy and collecting every
mismatch, so a failure names all the combinations that broke.

For each exchange the checks are what RFC 9112 §9 (and §6, §2.3) and a user of nginx or HAProxy
expect: laneproxy's own status line (`HTTP/1.1`, I1); the framing the client gets (never chunked
to an HTTP/1.0 client: Content-Length, or close-delimited); `Connection: close` exactly when
laneproxy closes, and the connection really stays open otherwise (a second request on it is
served); the upstream connection reused exactly when the upstream left it reusable (the upstream
echoes its accept number); Connection-named and hop-by-hop fields never forwarded either way;
the request forwarded as laneproxy's own HTTP/1.1 with its own framing and `Via` naming the
received version.

Scratch differential first (laneproxy, nginx 1.22 `proxy_http_version 1.1` + `Connection ""` +
upstream keepalive, HAProxy 2.6 `option http-keep-alive` + `http-reuse always`, same recording
upstream, all 1 576 cells of the first table). laneproxy met every invariant above in every cell;
where the three differ:
- HTTP/1.0 client with `Connection: keep-alive`: nginx and HAProxy keep the connection and answer
  `Connection: keep-alive` (when they can frame the body: with a chunked or close-delimited
  upstream body nginx closes, HAProxy sends chunked to the 1.0 client). laneproxy answers
  `Connection: close` and closes: its documented policy P2 (http-rules.md; RFC 9112 §9.3 "A proxy
  server MUST NOT maintain a persistent connection with an HTTP/1.0 client"). Pinned here as policy.
- nginx adds `Connection: keep-alive` to every persistent HTTP/1.1 answer; laneproxy sends no
  Connection field then (HTTP/1.1 persists by default), as HAProxy does.
- HAProxy: status line `HTTP/1.0` toward 1.0 clients (and for 1.0 upstream answers), a chunked
  body to 1.0 clients, a close-delimited upstream body relayed close-delimited to 1.1 clients (then
  closes), the upstream's `Keep-Alive` and Connection-named fields passed to the client, and the
  client's `Connection`, `Keep-Alive`, `Proxy-Connection` and Connection-named fields passed
  upstream; it also accepts `Transfer-Encoding` in an HTTP/1.0 request. nginx passes `Foo` (named by
  the client's Connection) and `Proxy-Connection` upstream, and never reuses an upstream connection
  after an HTTP/1.0 answer, even one with `Connection: keep-alive` (laneproxy and HAProxy reuse it).
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import make_config
from tests.conftest import open_tracked_client as open_client

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("close_tracked_clients")]

WAIT = 3.0
BODY = b"hello"

# -- the client rows ---------------------------------------------------------------------------------

# name -> (Connection lines, does the client itself ask to close?)
CLIENT_CONNECTION = {
    "absent": (b"", False),
    "close": (b"Connection: close\r\n", True),
    "keep-alive": (b"Connection: keep-alive\r\n", False),
    "both": (b"Connection: keep-alive, close\r\n", True),
    "mixed-keep-alive": (b"Connection: Keep-ALIVE\r\n", False),
    "mixed-close": (b"Connection: ClOsE\r\n", True),
    "foo-keep-alive": (b"Connection: foo, keep-alive\r\nFoo: bar\r\n", False),
    "two-lines": (b"Connection: foo\r\nConnection: keep-alive\r\nFoo: bar\r\n", False),
    "two-lines-close": (b"Connection: foo\r\nFoo: bar\r\nConnection: close\r\n", True),
}
# hop-by-hop fields every request carries besides its Connection lines (old 1.0 clients send both)
REQUEST_HOP = b"Keep-Alive: 300\r\nProxy-Connection: keep-alive\r\n"
NEVER_UPSTREAM = (b"connection", b"foo", b"keep-alive", b"proxy-connection", b"te", b"upgrade")

# -- the upstream table --------------------------------------------------------------------------

UPSTREAM_CONNECTION = {
    "absent": b"",
    "close": b"Connection: close\r\n",
    "keep-alive": b"Connection: keep-alive\r\n",
    "named": b"Connection: X-Up-Hop\r\nX-Up-Hop: 1\r\n",
    # the odd spellings (second table)
    "keep-alive-close": b"Connection: keep-alive, close\r\n",
    "CLOSE": b"Connection: CLOSE\r\n",
    "named-then-close": b"Connection: X-Up-Hop\r\nX-Up-Hop: 1\r\nConnection: close\r\n",
    "Keep-Alive": b"Connection: Keep-Alive\r\n",
    "names-content-length": b"Connection: Content-Length\r\n",
    "names-transfer-encoding": b"Connection: Transfer-Encoding\r\n",
}
UPSTREAM_CLOSES = {"close", "keep-alive-close", "CLOSE", "named-then-close"}
UPSTREAM_KEEPS_10 = {"keep-alive", "Keep-Alive"}  # what makes an HTTP/1.0 answer persistent
FRAMINGS = ("length", "chunked", "until-close", "head", "204", "304")
NEVER_DOWNSTREAM = (b"keep-alive", b"x-up-hop", b"proxy-connection", b"upgrade")


def upstream_table(connections) -> list[tuple[str, str, str]]:
    # RFC 9112 §6.1: chunked in an HTTP/1.0 answer is faulty framing (audit 16 covers it); left out.
    return [(v, f, c) for v in ("1.0", "1.1") for f in FRAMINGS for c in connections
            if not (v == "1.0" and f == "chunked")]


def upstream_keeps(v: str, f: str, c: str) -> bool:
    """Whether the upstream leaves the connection reusable after this answer (and does not close it)."""
    if f == "until-close" or c in UPSTREAM_CLOSES:
        return False
    return v == "1.1" or c in UPSTREAM_KEEPS_10


def answer(v: str, f: str, c: str, conn_id: int) -> bytes:
    status = {"204": b"204 No Content", "304": b"304 Not Modified"}.get(f, b"200 OK")
    head = b"HTTP/%s %s\r\nX-Conn: %d\r\nKeep-Alive: timeout=30, max=100\r\n%s" % (
        v.encode(), status, conn_id, UPSTREAM_CONNECTION[c])
    if f == "length":
        return head + b"Content-Length: 5\r\n\r\n" + BODY
    if f == "chunked":
        return head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    if f == "until-close":
        return head + b"\r\n" + BODY
    if f == "head":
        return head + b"Content-Length: 5\r\n\r\n"
    if f == "304":
        return head + b'ETag: "e"\r\n\r\n'
    return head + b"\r\n"


def scripted(seen: dict[bytes, tuple[bytes, dict, bytes]]):
    """Upstream handler: answers as the target's query says (`/r?t=TOKEN&v=1.1&f=length&c=absent`),
    records each request by token, closes when its answer says so."""

    async def handler(reader, writer, up):
        conn_id = up.connections  # this connection's accept number (counted before the handler runs)
        while True:
            try:
                head, headers, body = await asyncio.wait_for(reader.read_request(), WAIT)
            except (asyncio.IncompleteReadError, TimeoutError):
                return
            target = head.split(b" ", 2)[1]
            query = dict(kv.split(b"=", 1) for kv in target.partition(b"?")[2].split(b"&"))
            seen[query[b"t"]] = (head, headers, body)
            v, f, c = (query[k].decode() for k in (b"v", b"f", b"c"))
            writer.write(answer(v, f, c, conn_id))
            await writer.drain()
            if not upstream_keeps(v, f, c):
                return  # the fixture closes the connection

    return handler


# -- the client side -------------------------------------------------------------------------------


async def read_one(reader: asyncio.StreamReader, head_only: bool) -> tuple[bytes, dict, str, bytes]:
    """One response: (status line, {lower-name: [values]}, framing seen, body), every read bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT

    async def bounded(aw):
        return await asyncio.wait_for(aw, max(deadline - loop.time(), 0.01))

    head = await bounded(reader.readuntil(b"\r\n\r\n"))
    lines = head.split(b"\r\n")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    status = int(lines[0].split(b" ")[1])
    if b"transfer-encoding" in headers:
        framing = "chunked"
    elif b"content-length" in headers:
        framing = "length"
    else:
        framing = "none"
    if head_only or status in (204, 304):
        return lines[0], headers, framing, b""
    if framing == "length":
        return lines[0], headers, framing, await bounded(reader.readexactly(int(headers[b"content-length"][0])))
    if framing == "chunked":
        parts = []
        while True:
            size = int((await bounded(reader.readuntil(b"\r\n"))).split(b";")[0], 16)
            if size == 0:
                assert await bounded(reader.readuntil(b"\r\n")) == b"\r\n", "trailers where none were sent"
                break
            parts.append((await bounded(reader.readexactly(size + 2)))[:-2])
        return lines[0], headers, framing, b"".join(parts)
    return lines[0], headers, "until-close", await bounded(reader.read())


async def closes(reader: asyncio.StreamReader) -> bool:
    """True when the peer ends the connection (EOF or reset) within WAIT; False if it stays open."""
    if reader.at_eof():
        return True
    try:
        return await asyncio.wait_for(reader.read(1), WAIT) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


class Matrix:
    """Runs rows of the matrix against one proxy and one scripted upstream; collects mismatches."""

    def __init__(self, port: int, up, seen: dict) -> None:
        self.port = port
        self.up = up
        self.seen = seen
        self.count = 0
        self.problems: list[str] = []

    def request(self, token: bytes, version: bytes, connection: bytes, body: str, v: str, f: str, c: str) -> bytes:
        method = b"HEAD" if f == "head" else b"POST" if body != "none" else b"GET"
        target = b"/r?t=%s&v=%s&f=%s&c=%s" % (token, v.encode(), f.encode(), c.encode())
        head = b"%s %s HTTP/%s\r\nHost: t\r\n%s%s" % (method, target, version, REQUEST_HOP, connection)
        if body == "length":
            return head + b"Content-Length: 5\r\n\r\n" + BODY
        if body == "chunked":
            return head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        return head + b"\r\n"

    async def run(self, version: bytes, conn_name: str, body: str, v: str, f: str, c: str) -> None:
        self.count += 1
        cell = f"client {version.decode()} Connection={conn_name} body={body} | upstream {v} {f} Connection={c}"
        connection, client_closes = CLIENT_CONNECTION[conn_name]
        # P2 (policy; nginx and HAProxy differ, see the module docstring): every 1.0 client is closed.
        closing = client_closes or version == b"1.0"
        problems: list[str] = []
        token = b"%d" % self.count
        reader, writer = await open_client(self.port)
        try:
            writer.write(self.request(token, version, connection, body, v, f, c))
            status_line, headers, framing, got = await read_one(reader, f == "head")

            # -- what the client got --
            status = {"204": b"204", "304": b"304"}.get(f, b"200")
            if not status_line.startswith(b"HTTP/1.1 " + status + b" "):
                problems.append(f"status line {status_line!r}")
            if version == b"1.0" and b"transfer-encoding" in headers:
                problems.append("chunked to an HTTP/1.0 client")
            if f in ("length", "head"):
                want_framing = "length"
            elif f in ("204", "304"):
                want_framing = "none"
            elif version == b"1.1":
                want_framing = "chunked"  # re-chunked (chunked kept; close-delimited framed), as nginx
            else:
                want_framing = "until-close"  # de-chunked or relayed, ended by the close, as nginx
            if framing != want_framing:
                problems.append(f"framing {framing}, expected {want_framing}")
            if headers.get(b"content-length", [b"5"]) != [b"5"]:
                problems.append(f"Content-Length {headers[b'content-length']}")
            want_body = b"" if f in ("head", "204", "304") else BODY
            if got != want_body:
                problems.append(f"body {got!r}")
            expect_close = closing or want_framing == "until-close"
            want_connection = [b"close"] if expect_close else None
            if headers.get(b"connection") != want_connection:
                problems.append(f"Connection {headers.get(b'connection')}, expected {want_connection}")
            leaked = [n.decode() for n in NEVER_DOWNSTREAM if n in headers]
            if leaked:
                problems.append(f"hop-by-hop fields to the client: {leaked}")
            conn1 = headers.get(b"x-conn", [b"?"])[0]

            # -- what the upstream got --
            up_head, up_headers, up_body = self.seen.get(token, (b"", {}, b""))
            method = b"HEAD" if f == "head" else b"POST" if body != "none" else b"GET"
            if not up_head.startswith(method + b" /r?t=" + token + b"&"):
                problems.append(f"upstream request {up_head[:60]!r}")
            elif not up_head.split(b"\r\n", 1)[0].endswith(b" HTTP/1.1"):
                problems.append(f"upstream request line {up_head[:60]!r}")
            forwarded = [n.decode() for n in NEVER_UPSTREAM if n in up_headers]
            if forwarded:
                problems.append(f"hop-by-hop fields upstream: {forwarded}")
            want_via = [b"%s laneproxy" % version]  # RFC 9110 §7.6.3: the version received
            if up_headers.get(b"via") != want_via:
                problems.append(f"Via {up_headers.get(b'via')}")
            want_up_framing = {"none": {}, "length": {b"content-length": [b"5"]},
                               "chunked": {b"transfer-encoding": [b"chunked"]}}[body]
            got_up_framing = {k: up_headers[k] for k in (b"content-length", b"transfer-encoding") if k in up_headers}
            if got_up_framing != want_up_framing or up_body != (BODY if body != "none" else b""):
                problems.append(f"upstream framing {got_up_framing} body {up_body!r}")

            # -- does the client connection persist, and is the upstream connection reused? --
            probe = b"GET /r?t=%sb&v=1.1&f=length&c=absent HTTP/1.1\r\nHost: t\r\n\r\n" % token
            if expect_close:
                if not await closes(reader):
                    problems.append("client connection left open after Connection: close")
                reader2, writer2 = await open_client(self.port)
            else:
                reader2, writer2 = reader, writer
            writer2.write(probe)
            try:
                _, headers2, _, got2 = await read_one(reader2, False)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
                problems.append(f"second request not served ({type(exc).__name__})")
            else:
                if got2 != BODY:
                    problems.append(f"second answer {got2!r}")
                reused = headers2.get(b"x-conn", [b"?"])[0] == conn1
                if reused != upstream_keeps(v, f, c):
                    problems.append(f"upstream connection {'reused' if reused else 'not reused'}")
            if reader2 is not reader:
                writer2.close()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError) as exc:
            problems.append(f"exchange failed: {exc!r:.120}")
        finally:
            writer.close()
        if problems:
            self.problems.append(f"{cell}: " + "; ".join(problems))


@pytest.fixture
async def matrix(start_proxy, upstream):
    seen: dict[bytes, tuple[bytes, dict, bytes]] = {}
    up = await upstream(scripted(seen))
    proxy = await start_proxy(make_config(up.port, lane={"read_timeout": "3s"}))
    return Matrix(proxy.port, up, seen)


def report(m: Matrix, expected: int) -> None:
    assert m.count == expected
    assert not m.problems, f"{len(m.problems)} of {m.count} cells:\n" + "\n".join(m.problems[:40])


BASE = ("absent", "close", "keep-alive", "named")
ODD = ("keep-alive-close", "CLOSE", "named-then-close", "Keep-Alive", "names-content-length",
       "names-transfer-encoding")

# == the matrix ======================================================================================


@pytest.mark.parametrize("conn_name", list(CLIENT_CONNECTION))
@pytest.mark.parametrize("version", [b"1.1", b"1.0"], ids=["client-1.1", "client-1.0"])
async def test_version_persistence_matrix(matrix, version, conn_name):
    # One client row (version x Connection) against every body kind x every upstream cell.
    # HEAD carries no body here. A chunked HTTP/1.0 request is the separate row below.
    n = 0
    for body in ("none", "length", "chunked") if version == b"1.1" else ("none", "length"):
        for v, f, c in upstream_table(BASE):
            if body != "none" and f == "head":
                continue
            await matrix.run(version, conn_name, body, v, f, c)
            n += 1
    report(matrix, n)


@pytest.mark.parametrize("conn_name", ["absent", "keep-alive", "close", "two-lines"])
@pytest.mark.parametrize("version", [b"1.1", b"1.0"], ids=["client-1.1", "client-1.0"])
async def test_upstream_connection_spellings(matrix, version, conn_name):
    # RFC 9110 §7.6.1: `close` in any position, any case, on any Connection line ends the upstream
    # connection; `Keep-Alive` in any case makes a 1.0 answer persistent; a Connection that names
    # Content-Length or Transfer-Encoding changes nothing about laneproxy's own framing.
    n = 0
    for v, f, c in upstream_table(ODD):
        await matrix.run(version, conn_name, "none", v, f, c)
        n += 1
    report(matrix, n)


async def test_http10_chunked_request_is_400_and_closed_whatever_connection_says(start_proxy, upstream):
    # RFC 9112 §6.1 (F4): Transfer-Encoding in an HTTP/1.0 request is faulty framing; close after.
    # nginx 1.22: 400 and close as well. HAProxy 2.6 accepts it and forwards the body chunked.
    seen: dict = {}
    up = await upstream(scripted(seen))
    proxy = await start_proxy(make_config(up.port))
    for connection, _ in CLIENT_CONNECTION.values():
        reader, writer = await open_client(proxy.port)
        writer.write(b"POST /r?t=1&v=1.1&f=length&c=absent HTTP/1.0\r\nHost: t\r\n%s%s"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" % (REQUEST_HOP, connection))
        status_line, headers, _, _ = await read_one(reader, False)
        assert status_line.startswith(b"HTTP/1.1 400 "), (connection, status_line)
        assert headers.get(b"connection") == [b"close"], connection
        assert await closes(reader), connection
        writer.close()
    assert up.connections == 0 and not seen


async def test_answers_laneproxy_makes_itself_follow_the_same_persistence_rules(start_proxy, upstream):
    # 404 (no route) and OPTIONS * with Max-Forwards: 0 are answered without an upstream: the same
    # Connection rules hold (close to every 1.0 client and after `close`; otherwise the connection
    # persists, a second request on it is served). nginx answers 404 the same way for 1.1 clients.
    seen: dict = {}
    up = await upstream(scripted(seen))
    proxy = await start_proxy(make_config(up.port, routes=[{"prefix": "/r", "lane": "app"}]))
    local = {b"404": b"GET /elsewhere HTTP/%s\r\nHost: t\r\n%s\r\n",
             b"200": b"OPTIONS * HTTP/%s\r\nHost: t\r\nMax-Forwards: 0\r\n%s\r\n"}
    for status, template in local.items():
        for version in (b"1.0", b"1.1"):
            for name, (connection, client_closes) in CLIENT_CONNECTION.items():
                where = (status, version, name)
                reader, writer = await open_client(proxy.port)
                writer.write(template % (version, REQUEST_HOP + connection))
                status_line, headers, _, _ = await read_one(reader, False)
                assert status_line.startswith(b"HTTP/1.1 " + status + b" "), (where, status_line)
                if client_closes or version == b"1.0":
                    assert headers.get(b"connection") == [b"close"], where
                    assert await closes(reader), where
                else:
                    assert b"connection" not in headers, where
                    token = b"-".join((status, version, name.encode()))
                    writer.write(b"GET /r?t=%s&v=1.1&f=length&c=absent HTTP/1.1\r\nHost: t\r\n\r\n" % token)
                    assert (await read_one(reader, False))[3] == BODY, where
                writer.close()
    assert all(not head.startswith(b"OPTIONS") and b"/elsewhere" not in head for head, _, _ in seen.values())
