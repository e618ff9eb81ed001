"""End to end through real sockets: message framing on both sides, keep-alive, pipelining, errors.

Every upstream here parses what laneproxy sends with h11 (a strict second parser), and the
tests re-parse `up.received[i]` (every byte an upstream connection got) with h11 as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import socket
from collections.abc import AsyncIterator, Callable

import h11
import pytest

from tests.conftest import is_closed, make_config, ok_response, open_client, read_response

WAIT = 5.0  # bound for every single await on the network: a hang fails fast, not at --timeout
GET = b"GET %s HTTP/1.1\r\nHost: t.example\r\n\r\n"


# -- helpers ------------------------------------------------------------------------------------


async def recv(reader: asyncio.StreamReader, method: bytes = b"GET") -> tuple[int, dict, bytes]:
    """One response, bounded."""
    return await asyncio.wait_for(read_response(reader, method), WAIT)


async def recv_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)


async def read_until_close(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """Every byte until EOF or reset (bounded): (data, was_reset)."""
    chunks: list[bytes] = []

    async def run() -> bool:
        while True:
            try:
                data = await reader.read(65536)
            except ConnectionError:
                return True
            if not data:
                return False
            chunks.append(data)

    reset = await asyncio.wait_for(run(), WAIT)
    return b"".join(chunks), reset


@contextlib.asynccontextmanager
async def client(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await open_client(port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def header_values(req: h11.Request, name: bytes) -> list[bytes]:
    return [v for n, v in req.headers if n == name]


def parse_requests(data: bytes, complete: bool = True) -> list[tuple[h11.Request, bytes]]:
    """Parse what one upstream connection received, strictly (h11 raises on bad framing).

    complete: the bytes must end at a request boundary (no half request left over).
    """
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(bytes(data))
    out: list[tuple[h11.Request, bytes]] = []
    req: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if complete:
                assert conn.their_state is h11.IDLE, f"incomplete request at the end of {bytes(data)!r}"
            return out
        if isinstance(event, h11.Request):
            req, body = event, bytearray()
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            out.append((req, bytes(body)))  # type: ignore[arg-type]
            conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            conn.send(h11.EndOfMessage())
            conn.start_next_cycle()
        else:  # pragma: no cover
            raise AssertionError(f"unexpected h11 event {event!r}")


def echo(req: h11.Request, body: bytes) -> bytes:
    """A 200 whose body names the request, so every response is distinguishable."""
    return ok_response(b"%s %s body=%d" % (req.method, req.target, len(body)))


Respond = Callable[[h11.Request, bytes], "bytes | tuple[bytes, str]"]


def h11_upstream(respond: Respond = echo):
    """Upstream handler: parse each request with h11, answer with respond(req, body).

    respond may return (bytes, "close") to close after writing, or (bytes, "hang") to write
    and then only read until laneproxy closes. Any h11 error closes the connection (and the
    test's own parse_requests(up.received[i]) reports it).
    """

    async def handler(reader, writer, up) -> None:
        conn = h11.Connection(h11.SERVER)
        req: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
                continue
            if isinstance(event, h11.ConnectionClosed):
                return
            if isinstance(event, h11.Request):
                req, body = event, bytearray()
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                out = respond(req, bytes(body))  # type: ignore[arg-type]
                action = "keep"
                if isinstance(out, tuple):
                    out, action = out
                writer.write(out)
                await writer.drain()
                if action == "close":
                    return
                if action == "hang":
                    while await reader.read(65536):
                        pass
                    return
                try:
                    conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                    conn.send(h11.EndOfMessage())
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return

    return handler


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- request framing ----------------------------------------------------------------------------


async def test_request_content_length_body_forwarded_with_canonical_framing(start_proxy, upstream):
    up = await upstream(h11_upstream())
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(b"POST /cl HTTP/1.1\r\nHost: t.example\r\nContent-Length: 11\r\n\r\nhello world")
        status, _, body = await recv(reader)
    assert (status, body) == (200, b"POST /cl body=11")
    [(req, got)] = parse_requests(up.received[0])
    assert got == b"hello world"
    assert header_values(req, b"content-length") == [b"11"]
    assert header_values(req, b"transfer-encoding") == []
    assert req.http_version == b"1.1"


async def test_request_chunked_body_is_rechunked_without_extensions_or_trailers(start_proxy, upstream):
    up = await upstream(h11_upstream())
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(
            b"POST /ch HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=secret\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: smuggled\r\n\r\n"
        )
        status, _, body = await recv(reader)
    assert (status, body) == (200, b"POST /ch body=11")
    raw = bytes(up.received[0])
    [(req, got)] = parse_requests(raw)
    assert got == b"hello world"
    assert header_values(req, b"transfer-encoding") == [b"chunked"]
    assert header_values(req, b"content-length") == []
    assert b"ext=secret" not in raw and b"X-Trailer" not in raw and b"smuggled" not in raw
    assert_canonical_chunks(raw.partition(b"\r\n\r\n")[2], b"hello world")


def assert_canonical_chunks(data: bytes, expected: bytes) -> None:
    """`data` is exactly: chunks with bare lowercase-hex sizes, then `0` CRLF CRLF (no extensions, no trailers)."""
    body = b""
    while True:
        line, sep, data = data.partition(b"\r\n")
        assert sep and re.fullmatch(rb"[0-9a-f]+", line), line
        size = int(line, 16)
        if size == 0:
            assert data == b"\r\n", data
            break
        assert size > 0 and data[size : size + 2] == b"\r\n"
        body, data = body + data[:size], data[size + 2 :]
    assert body == expected


async def test_request_content_length_with_leading_zeros_goes_out_canonical(start_proxy, upstream):
    # The brief expected httptools to reject `007` with 400; httptools 0.9.0 accepts it, and
    # http-rules.md F6 says it must then go out as `7`.
    up = await upstream(h11_upstream())
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(b"POST /z HTTP/1.1\r\nHost: t.example\r\nContent-Length: 007\r\n\r\nabcdefg")
        status, _, body = await recv(reader)
    assert (status, body) == (200, b"POST /z body=7")
    raw = bytes(up.received[0])
    assert b"Content-Length: 7\r\n" in raw and b"007" not in raw
    [(_, got)] = parse_requests(raw)
    assert got == b"abcdefg"


async def test_request_without_body_framing(start_proxy, upstream):
    """GET (even with `Content-Length: 0`) carries no framing; a body-less POST gets CL: 0."""
    up = await upstream(h11_upstream())
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(GET % b"/g")
        assert (await recv(reader))[0] == 200
        writer.write(b"GET /g0 HTTP/1.1\r\nHost: t.example\r\nContent-Length: 0\r\n\r\n")
        assert (await recv(reader))[0] == 200
        writer.write(b"POST /p HTTP/1.1\r\nHost: t.example\r\n\r\n")
        assert (await recv(reader))[2] == b"POST /p body=0"
        writer.write(b"POST /p0 HTTP/1.1\r\nHost: t.example\r\nContent-Length: 0\r\n\r\n")
        assert (await recv(reader))[2] == b"POST /p0 body=0"
    reqs = parse_requests(up.received[0])
    assert [r.target for r, _ in reqs] == [b"/g", b"/g0", b"/p", b"/p0"]
    for req, _ in reqs[:2]:
        assert header_values(req, b"content-length") == [] and header_values(req, b"transfer-encoding") == []
    for req, _ in reqs[2:]:
        assert header_values(req, b"content-length") == [b"0"] and header_values(req, b"transfer-encoding") == []


# -- response framing ---------------------------------------------------------------------------


async def test_response_content_length(start_proxy, upstream):
    up = await upstream(h11_upstream(lambda req, body: ok_response(b"x" * 1000)))
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        for _ in range(2):
            writer.write(GET % b"/")
            status, headers, body = await recv(reader)
            assert (status, headers[b"content-length"], body) == (200, [b"1000"], b"x" * 1000)
            assert b"transfer-encoding" not in headers and b"connection" not in headers
    assert up.connections == 1


async def test_response_chunked_relayed_chunked_and_trailers_not_merged(start_proxy, upstream):
    def respond(req, body):
        return (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-T: trailer-value\r\n\r\n"
        )

    up = await upstream(h11_upstream(respond))
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(GET % b"/c")
        head = await recv_head(reader)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"\r\nTransfer-Encoding: chunked\r\n" in head
        assert b"X-T" not in head and b"Content-Length" not in head
        rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), WAIT)
        chunks = h11_body(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + rest)
        assert chunks == b"hello world"
        assert b"trailer-value" not in rest
        writer.write(GET % b"/again")  # the connection is in a clean state
        status, _, body = await recv(reader)
        assert (status, body) == (200, b"hello world")


def h11_body(response: bytes) -> bytes:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(response)
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert event.headers == [], event.headers
            return body
        elif event is h11.NEED_DATA:
            raise AssertionError(f"incomplete response {response!r}")


async def test_response_until_close_rechunked_to_http11_client(start_proxy, upstream):
    up = await upstream(h11_upstream(lambda req, body: (b"HTTP/1.1 200 OK\r\n\r\nuntil close", "close")))
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(GET % b"/u")
        status, headers, body = await recv(reader)
        assert (status, body) == (200, b"until close")
        assert headers[b"transfer-encoding"] == [b"chunked"] and b"content-length" not in headers
        assert b"connection" not in headers
        writer.write(GET % b"/u2")  # still usable
        status, _, body = await recv(reader)
        assert (status, body) == (200, b"until close")
    assert up.connections == 2


async def test_response_until_close_raw_to_http10_client(start_proxy, upstream):
    up = await upstream(h11_upstream(lambda req, body: (b"HTTP/1.1 200 OK\r\n\r\nuntil close", "close")))
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(b"GET /u HTTP/1.0\r\nHost: t.example\r\nConnection: keep-alive\r\n\r\n")
        data, _ = await read_until_close(reader)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    lower = head.lower()
    assert b"transfer-encoding" not in lower and b"content-length" not in lower
    assert b"\r\nconnection: close" in lower
    assert body == b"until close"


async def test_head_response_content_length_does_not_poison_pool(start_proxy, upstream):
    def respond(req, body):
        if req.method == b"HEAD":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Head: yes\r\n\r\n"
        return echo(req, body)

    up = await upstream(h11_upstream(respond))
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(b"HEAD /h HTTP/1.1\r\nHost: t.example\r\n\r\n")
        status, headers, _ = await recv(reader, b"HEAD")
        assert status == 200 and headers[b"content-length"] == [b"5"] and headers[b"x-head"] == [b"yes"]
        writer.write(GET % b"/second")
        status, _, body = await recv(reader)
        assert (status, body) == (200, b"GET /second body=0")
        writer.write(b"HEAD /h2 HTTP/1.1\r\nHost: t.example\r\n\r\n")
        assert (await recv(reader, b"HEAD"))[0] == 200
        writer.write(GET % b"/third")
        assert (await recv(reader))[2] == b"GET /third body=0"
    assert up.connections == 1
    assert [(r.method, r.target) for r, _ in parse_requests(up.received[0])] == [
        (b"HEAD", b"/h"), (b"GET", b"/second"), (b"HEAD", b"/h2"), (b"GET", b"/third"),
    ]


async def test_204_content_length_stripped(start_proxy, upstream):
    def respond(req, body):
        if req.target == b"/204":
            return b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\nX-A: 1\r\n\r\n"
        return echo(req, body)

    up = await upstream(h11_upstream(respond))
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(GET % b"/204")
        head = await recv_head(reader)
        assert head.startswith(b"HTTP/1.1 204 ")
        assert b"content-length" not in head.lower() and b"transfer-encoding" not in head.lower()
        assert b"X-A: 1" in head
        writer.write(GET % b"/next")
        status, fields, body = await recv(reader)
        assert (status, fields[b"content-length"], body) == (200, [b"16"], b"GET /next body=0")
    assert up.connections == 1


async def test_304_keeps_content_length_and_has_no_body(start_proxy, upstream):
    def respond(req, body):
        if req.target == b"/304":
            return b'HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nETag: "v1"\r\n\r\n'
        return echo(req, body)

    up = await upstream(h11_upstream(respond))
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(GET % b"/304")
        status, headers, _ = await recv(reader)
        assert status == 304 and headers[b"content-length"] == [b"5"] and headers[b"etag"] == [b'"v1"']
        writer.write(GET % b"/next")
        assert (await recv(reader))[2] == b"GET /next body=0"
    assert up.connections == 1


EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"


async def test_103_early_hints_forwarded_to_http11_client(start_proxy, upstream):
    up = await upstream(h11_upstream(lambda req, body: EARLY_HINTS + ok_response(b"final")))
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(GET % b"/hints")
        status, headers, _ = await recv(reader)
        assert status == 103 and headers[b"link"] == [b"</s.css>; rel=preload"]
        status, _, body = await recv(reader)
        assert (status, body) == (200, b"final")
        writer.write(GET % b"/hints")
        assert [(await recv(reader))[0], (await recv(reader))[0]] == [103, 200]


async def test_103_not_sent_to_http10_client(start_proxy, upstream):
    up = await upstream(h11_upstream(lambda req, body: EARLY_HINTS + ok_response(b"final")))
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(b"GET /hints HTTP/1.0\r\n\r\n")
        data, _ = await read_until_close(reader)
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\nfinal")
    assert b"103" not in data


# -- Expect -------------------------------------------------------------------------------------


async def test_expect_100_continue(start_proxy, upstream):
    up = await upstream(h11_upstream())
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(
            b"POST /e HTTP/1.1\r\nHost: t.example\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n"
        )
        assert await recv_head(reader) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello world")
        status, _, body = await recv(reader)
        assert (status, body) == (200, b"POST /e body=11")
    [(req, got)] = parse_requests(up.received[0])
    assert got == b"hello world"
    assert header_values(req, b"expect") == []


async def test_unknown_expectation_417(start_proxy, upstream):
    up = await upstream(h11_upstream())
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(b"POST /e HTTP/1.1\r\nHost: t.example\r\nExpect: y-continue\r\nContent-Length: 3\r\n\r\nabc")
        status, _, _ = await recv(reader)
        assert status == 417
    async with client(proxy.port) as (reader, writer):
        writer.write(GET % b"/canary")
        assert (await recv(reader))[2] == b"GET /canary body=0"
    assert [r.target for r, _ in parse_requests(up.received[0])] == [b"/canary"]


# -- pipelining, persistence --------------------------------------------------------------------


async def test_pipelined_requests_answered_in_order(start_proxy, upstream):
    up = await upstream(h11_upstream())
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(
            GET % b"/a"
            + b"POST /b HTTP/1.1\r\nHost: t.example\r\nContent-Length: 3\r\n\r\nxyz"
            + GET % b"/c"
        )
        bodies = [(await recv(reader))[2] for _ in range(3)]
        assert bodies == [b"GET /a body=0", b"POST /b body=3", b"GET /c body=0"]
        writer.write(GET % b"/d")
        assert (await recv(reader))[2] == b"GET /d body=0"
    reqs = parse_requests(up.received[0])
    assert [(r.method, r.target, b) for r, b in reqs] == [
        (b"GET", b"/a", b""), (b"POST", b"/b", b"xyz"), (b"GET", b"/c", b""), (b"GET", b"/d", b""),
    ]
    assert up.connections == 1


@pytest.mark.parametrize("connection", [b"", b"Connection: keep-alive\r\n"])
async def test_http10_client_gets_connection_close(start_proxy, upstream, connection):
    up = await upstream(h11_upstream())
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(b"GET /ten HTTP/1.0\r\nHost: t.example\r\n" + connection + b"\r\n")
        status, headers, body = await recv(reader)
        assert (status, body) == (200, b"GET /ten body=0")
        assert headers[b"connection"] == [b"close"]
        assert await is_closed(reader)


async def test_keepalive_two_requests_one_client_share_upstream_connection(start_proxy, upstream):
    up = await upstream(h11_upstream())
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        for path in (b"/1", b"/2"):
            writer.write(GET % path)
            assert (await recv(reader))[2] == b"GET %s body=0" % path
    assert up.connections == 1
    assert [r.target for r, _ in parse_requests(up.received[0])] == [b"/1", b"/2"]


async def test_keepalive_two_sequential_clients_share_upstream_connection(start_proxy, upstream):
    up = await upstream(h11_upstream())
    proxy = await start_proxy(make_config(up.port))
    for path in (b"/first-client", b"/second-client"):
        async with client(proxy.port) as (reader, writer):
            writer.write(GET % path)
            assert (await recv(reader))[2] == b"GET %s body=0" % path
    assert up.connections == 1
    assert [r.target for r, _ in parse_requests(up.received[0])] == [b"/first-client", b"/second-client"]


# -- upstream failures --------------------------------------------------------------------------


def assert_plain_error(status: int, headers: dict, body: bytes, expected: int) -> None:
    assert status == expected, (status, body)
    assert headers[b"content-type"][0].startswith(b"text/plain")
    assert body.startswith(b"%d " % expected) and len(body) < 300, body


async def test_connection_refused_502(start_proxy):
    proxy = await start_proxy(make_config(free_port()))
    async with client(proxy.port) as (reader, writer):
        writer.write(GET % b"/")
        assert_plain_error(*await recv(reader), 502)


async def test_upstream_closes_before_response_head_502(start_proxy, upstream):
    up = await upstream(h11_upstream(lambda req, body: (b"", "close")))
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(GET % b"/")
        assert_plain_error(*await recv(reader), 502)
    assert len(parse_requests(up.received[0])) == 1


async def test_upstream_garbage_502(start_proxy, upstream):
    # The upstream keeps its connection open: the 502 must come from parsing, not from EOF.
    up = await upstream(h11_upstream(lambda req, body: (b"garbage\r\n\r\n", "hang")))
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(GET % b"/")
        assert_plain_error(*await recv(reader), 502)


async def test_upstream_truncated_content_length_body_aborts_client(start_proxy, upstream):
    partial = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"
    up = await upstream(h11_upstream(lambda req, body: (partial, "close")))
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(GET % b"/")
        head = await recv_head(reader)
        assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 100\r\n" in head
        body, _ = await read_until_close(reader)  # closed (EOF or reset), within WAIT
    assert len(body) < 100 and body == b"0123456789"[: len(body)]


async def test_upstream_truncated_chunked_body_gets_no_last_chunk(start_proxy, upstream):
    partial = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    up = await upstream(h11_upstream(lambda req, body: (partial, "close")))
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(GET % b"/")
        head = await recv_head(reader)
        assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked\r\n" in head
        rest, _ = await read_until_close(reader)
    assert b"0\r\n\r\n" not in rest, rest


async def test_read_timeout_504(start_proxy, upstream):
    up = await upstream(h11_upstream(lambda req, body: (b"", "hang")))
    proxy = await start_proxy(make_config(up.port, lane={"read_timeout": "200ms"}))
    loop = asyncio.get_running_loop()
    async with client(proxy.port) as (reader, writer):
        start = loop.time()
        writer.write(GET % b"/slow")
        assert_plain_error(*await recv(reader), 504)
        assert loop.time() - start >= 0.15


def filled_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket that never accepts, its accept queue full: new connects hang (SYN dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers: list[socket.socket] = []
    for _ in range(8):
        sock = socket.socket()
        sock.setblocking(False)
        fillers.append(sock)
        sock.connect_ex(listener.getsockname())
        _, writable, _ = select.select([], [sock], [], 0.2)
        if not writable:  # this connect hangs: the queue is full
            return listener, fillers
    for sock in [listener, *fillers]:
        sock.close()
    pytest.skip("could not fill a listen backlog on this kernel")


async def test_connect_timeout_504(start_proxy):
    listener, fillers = filled_listener()
    try:
        cfg = make_config(listener.getsockname()[1], lane={"connect_timeout": "200ms"})
        proxy = await start_proxy(cfg)
        async with client(proxy.port) as (reader, writer):
            writer.write(GET % b"/")
            assert_plain_error(*await recv(reader), 504)
    finally:
        for sock in [listener, *fillers]:
            sock.close()


# -- limits and routing -------------------------------------------------------------------------


async def test_max_body_content_length_413_before_upstream(start_proxy, upstream):
    up = await upstream(h11_upstream())
    proxy = await start_proxy(make_config(up.port, lane={"max_body": 10}))
    async with client(proxy.port) as (reader, writer):
        # The head alone is enough to answer: the body is never needed, the upstream never contacted.
        writer.write(b"POST /big HTTP/1.1\r\nHost: t.example\r\nContent-Length: 20\r\n\r\n")
        assert_plain_error(*await recv(reader), 413)
        assert await is_closed(reader)
    assert up.connections == 0
    async with client(proxy.port) as (reader, writer):
        writer.write(b"POST /small HTTP/1.1\r\nHost: t.example\r\nContent-Length: 10\r\n\r\n" + b"s" * 10)
        assert (await recv(reader))[2] == b"POST /small body=10"
    assert up.connections == 1
    assert [(r.target, b) for r, b in parse_requests(up.received[0])] == [(b"/small", b"s" * 10)]


async def test_max_body_chunked_413(start_proxy, upstream):
    up = await upstream(h11_upstream())
    proxy = await start_proxy(make_config(up.port, lane={"max_body": 10}))
    async with client(proxy.port) as (reader, writer):
        writer.write(
            b"POST /big HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"6\r\nabcdef\r\n6\r\nghijkl\r\n0\r\n\r\n"
        )
        assert_plain_error(*await recv(reader), 413)
        assert await is_closed(reader)
    async with client(proxy.port) as (reader, writer):
        writer.write(GET % b"/canary")
        assert (await recv(reader))[2] == b"GET /canary body=0"
    # No upstream ever got a complete request other than the canary.
    done = [r.target for raw in up.received for r, _ in parse_requests(raw, complete=False)]
    assert done == [b"/canary"]


async def test_no_route_404_keeps_client_connection(start_proxy, upstream):
    up = await upstream(h11_upstream())
    proxy = await start_proxy(make_config(up.port, routes=[{"prefix": "/api", "lane": "app"}]))
    async with client(proxy.port) as (reader, writer):
        writer.write(GET % b"/elsewhere")
        assert_plain_error(*await recv(reader), 404)
        writer.write(GET % b"/api/x")
        assert (await recv(reader))[2] == b"GET /api/x body=0"
    assert [r.target for r, _ in parse_requests(up.received[0])] == [b"/api/x"]


# -- the upstream ends the exchange early or sends too much -------------------------------------


async def test_response_before_request_body_complete_retires_upstream_connection(start_proxy, upstream):
    first_closed = asyncio.Event()
    echo_handler = h11_upstream()

    async def handler(reader, writer, up):
        if len(up.received) > 1:
            return await echo_handler(reader, writer, up)
        await reader.readuntil(b"\r\n\r\n")  # the head only: answer without reading the body
        writer.write(ok_response(b"early"))
        await writer.drain()
        try:
            while await reader.read(65536):
                pass
        finally:
            first_closed.set()

    up = await upstream(handler)
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(b"POST /upload HTTP/1.1\r\nHost: t.example\r\nContent-Length: 10\r\n\r\nhello")
        status, _, body = await recv(reader)
        assert (status, body) == (200, b"early")
        writer.write(b"world" + GET % b"/next")
        status, _, body = await recv(reader)
        assert (status, body) == (200, b"GET /next body=0")
    await asyncio.wait_for(first_closed.wait(), WAIT)  # laneproxy closed the early-answering connection
    assert up.connections == 2
    assert b"/next" not in up.received[0]
    assert [r.target for r, _ in parse_requests(up.received[1])] == [b"/next"]


@pytest.mark.parametrize(
    "extra",
    [b"EXTRA GARBAGE", b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"],
    ids=["garbage", "second-response"],
)
async def test_response_trailing_bytes_discarded_and_connection_retired(start_proxy, upstream, extra):
    first_closed = asyncio.Event()
    echo_handler = h11_upstream()

    async def handler(reader, writer, up):
        if len(up.received) > 1:
            return await echo_handler(reader, writer, up)
        await reader.read_request()
        writer.write(ok_response(b"first") + extra)  # one write: one read at laneproxy
        await writer.drain()
        try:
            while await reader.read(65536):
                pass
        finally:
            first_closed.set()

    up = await upstream(handler)
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(GET % b"/1")
        status, _, body = await recv(reader)
        assert (status, body) == (200, b"first")
        writer.write(GET % b"/2")
        status, _, body = await recv(reader)
        assert (status, body) == (200, b"GET /2 body=0")
    await asyncio.wait_for(first_closed.wait(), WAIT)
    assert up.connections == 2
    assert [r.target for r, _ in parse_requests(up.received[1])] == [b"/2"]
