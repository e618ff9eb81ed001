"""nginx-tests (nginx/nginx-tests) proxy/upstream checks, ported to laneproxy.

Each test ports one check of an nginx-tests `.t` file (named in its first comment) to laneproxy's
configuration, driving real sockets through a scripted upstream: the bytes the upstream received,
the bytes the client received and the connection state are asserted. Where laneproxy's documented
policy deliberately differs from nginx, the test asserts laneproxy's documented behaviour and says
so. Checks already covered elsewhere in the suite (see the module docstrings of test_audit*.py,
test_e2e_*.py, test_upstream.py) are not repeated. Every network wait is bounded (WAIT).
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct

import pytest

from tests.conftest import make_config, open_client, read_response

pytestmark = pytest.mark.timeout(30)

WAIT = 3.0
CRLF = b"\r\n"

RELAY_LAST_ANSWER = (
    "finding: when no untried server is left, a status in retry_on is discarded and laneproxy answers "
    "its own 502 instead of relaying the upstream's answer (nginx relays it: its tries are bounded by "
    "the live peers); laneproxy/exchange.py on_response_head/_may_retry"
)


# == helpers =======================================================================================


def get(path: bytes = b"/", fields: bytes = b"", method: bytes = b"GET", version: bytes = b"1.1") -> bytes:
    return b"%s %s HTTP/%s\r\nHost: localhost\r\n%s\r\n" % (method, path, version, fields)


async def rr(reader: asyncio.StreamReader, method: bytes = b"GET"):
    return await asyncio.wait_for(read_response(reader, method), WAIT)


async def fetch(port: int, request: bytes, method: bytes = b"GET"):
    """One request on a fresh client connection (as nginx-tests' http_get does)."""
    reader, writer = await asyncio.wait_for(open_client(port), WAIT)
    try:
        writer.write(request)
        return await rr(reader, method)
    finally:
        writer.close()


async def read_until_close(reader: asyncio.StreamReader, timeout: float = WAIT) -> tuple[bytes, bool]:
    """Everything until EOF/reset: (data, closed). closed is False if `timeout` passed first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    data = bytearray()
    while True:
        left = deadline - loop.time()
        if left <= 0:
            return bytes(data), False
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except ConnectionError:
            return bytes(data), True
        except TimeoutError:
            return bytes(data), False
        if not chunk:
            return bytes(data), True
        data += chunk


def split_head(raw: bytes) -> tuple[bytes, bytes]:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, raw[:200]
    return head + sep, rest


def chunked_complete(body: bytes) -> tuple[bytes, bool]:
    """Decode a chunked body: (data, True) when it ends with a last chunk and the final CRLF."""
    out = bytearray()
    pos = 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            return bytes(out), False
        size = int(body[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            while True:  # trailer section up to the empty line
                eol = body.find(b"\r\n", pos)
                if eol < 0:
                    return bytes(out), False
                if eol == pos:
                    return bytes(out), True
                pos = eol + 2
        if len(body) < pos + size + 2:
            out += body[pos : pos + size]
            return bytes(out), False
        out += body[pos : pos + size]
        assert body[pos + size : pos + size + 2] == b"\r\n"
        pos += size + 2


def requests_seen(up) -> list[list[bytes]]:
    """Request lines the upstream received, per connection."""
    out = []
    for raw in up.received:
        lines = [ln for ln in bytes(raw).split(b"\r\n") if ln.endswith(b" HTTP/1.1") and b" /" in ln]
        out.append(lines)
    return out


def scripted(respond):
    """A keep-alive upstream. Per request `respond(conn_no, method, path, body)` returns
    (parts, action): parts are bytes to write, or floats = pacing pauses (part of the script, not
    synchronisation); action is "keep" (next request), "close" (close the connection) or "hold"
    (keep it open without reading more requests until the peer closes)."""

    async def handler(reader, writer, up):
        conn_no = up.connections
        while True:
            try:
                head, _, body = await reader.read_request()
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            method, path = head.split(b" ")[:2]
            parts, action = respond(conn_no, method, path, body)
            for part in parts:
                if isinstance(part, float):
                    await asyncio.sleep(part)
                else:
                    writer.write(part)
                    await writer.drain()
            if action == "close":
                return
            if action == "hold":
                while await reader.read(65536):
                    pass
                return

    return handler


# == proxy_keepalive.t: which responses leave an upstream connection reusable ======================


def keepalive_daemon(conn_no: int, method: bytes, path: bytes, body: bytes):
    """The response matrix of proxy_keepalive.t's http_daemon (X-Connection names the connection)."""
    head = method == b"HEAD"
    see = b"TEST-OK-IF-YOU-SEE-THIS%03d" % conn_no
    first = b"HTTP/1.1 200 OK\r\nX-Connection: %d\r\n" % conn_no
    if b"length" in path:
        return [first + b"Content-Length: 26\r\n\r\n" + (b"" if head else see)], "keep"
    if b"empty" in path:
        return [first + b"Content-Length: 0\r\n\r\n"], "keep"
    if b"304nolen" in path:
        return [b"HTTP/1.1 304 Not Modified\r\nX-Connection: %d\r\n\r\n" % conn_no], "keep"
    if b"304len" in path:
        return [b"HTTP/1.1 304 Not Modified\r\nX-Connection: %d\r\nContent-Length: 100\r\n\r\n" % conn_no], "keep"
    if b"chunked" in path:
        return [
            first + b"Transfer-Encoding: chunked\r\n\r\n" + (b"" if head else b"1a\r\n" + see + b"\r\n0\r\n\r\n")
        ], "keep"
    if b"complex" in path:
        parts: list = [first + b"Transfer-Encoding: chunked\r\n\r\n"]
        if not head:
            for n in range(1, 101):
                parts.append(b"a\r\n0123456789\r\n")
                if n % 50 == 0:
                    parts.append(0.01)
            parts += [b"1a\r\n" + see + b"\r\n0\r\n", 0.05, b"\r\n"]  # the final CRLF comes late
        return parts, "keep"
    if b"chunk0" in path:
        return [first + b"Transfer-Encoding: chunked\r\n\r\n" + (b"" if head else b"0\r\n\r\n")], "keep"
    if b"extension" in path:
        return [first + b"Connection: x-close\r\nContent-Length: 26\r\n\r\n" + see], "keep"
    return [b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\nOops\r\n"], "close"


@pytest.mark.parametrize(
    "kind, method, expect_status, expect_body",
    [
        ("length", b"GET", 200, b"TEST-OK-IF-YOU-SEE-THIS001"),
        ("chunked", b"GET", 200, b"TEST-OK-IF-YOU-SEE-THIS001"),
        ("complex", b"GET", 200, b"0123456789" * 100 + b"TEST-OK-IF-YOU-SEE-THIS001"),
        ("chunk0", b"GET", 200, b""),
        ("empty", b"GET", 200, b""),
        ("length/head", b"HEAD", 200, b""),
        ("chunked/head", b"HEAD", 200, b""),
        ("304nolen", b"GET", 304, b""),
        ("304len", b"GET", 304, b""),
    ],
)
async def test_keepalive_connection_reused_after_each_response_kind(
    start_proxy, upstream, kind, method, expect_status, expect_body
):
    # nginx-tests proxy_keepalive.t: 'buffered'/'unbuffered' X, 'X 2': after a complete response of
    # each framing (CL, chunked, 100 chunks with a late final CRLF, 0 chunk, empty, HEAD, 304 with
    # and without CL) the next request (new client connection) reuses the upstream connection.
    up = await upstream(scripted(keepalive_daemon))
    proxy = await start_proxy(make_config(up.port))
    for n in (1, 2):
        status, headers, body = await fetch(
            proxy.port, get(b"/buffered/%s%d" % (kind.encode(), n), method=method), method
        )
        assert status == expect_status
        assert headers[b"x-connection"] == [b"1"], f"request {n} did not reuse the upstream connection"
        assert body == expect_body
    assert up.connections == 1
    assert len(requests_seen(up)[0]) == 2


async def test_keepalive_complex_chunked_response_is_relayed_intact_to_the_client(start_proxy, upstream):
    # nginx-tests proxy_keepalive.t: 'buffered complex chunked' -- the client sees (0123456789){100}
    # and a properly terminated chunked message even though the upstream's last CRLF came 50 ms late.
    up = await upstream(scripted(keepalive_daemon))
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/complex1", b"Connection: close\r\n"))
        raw, closed = await read_until_close(reader)
    finally:
        writer.close()
    assert closed
    head, rest = split_head(raw)
    assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked\r\n" in head
    data, complete = chunked_complete(rest)
    assert complete and data == b"0123456789" * 100 + b"TEST-OK-IF-YOU-SEE-THIS001"


async def test_connection_close_response_is_not_reused_and_next_request_succeeds(start_proxy, upstream):
    # nginx-tests proxy_keepalive.t: 'closed 1', 'closed 2' -- an upstream answer with
    # `Connection: close` ends that upstream connection; the next request opens a new one and
    # succeeds (no 502 from writing into a dead pooled connection).
    def respond(conn_no, method, path, body):
        return [
            b"HTTP/1.1 200 OK\r\nX-Connection: %d\r\nConnection: close\r\nContent-Length: 12\r\n\r\n"
            b"0123456789\r\n" % conn_no
        ], "close"

    up = await upstream(scripted(respond))
    proxy = await start_proxy(make_config(up.port))
    for n in (1, 2):
        status, headers, body = await fetch(proxy.port, get(b"/buffered/closed%d" % n))
        assert (status, body) == (200, b"0123456789\r\n")
        assert headers[b"x-connection"] == [b"%d" % n]
    assert up.connections == 2


async def test_connection_option_merely_containing_close_does_not_prevent_reuse(start_proxy, upstream):
    # nginx-tests proxy_keepalive.t: 'connection extension reused' (a TODO in nginx): the token
    # `x-close` is not `close` (RFC 9110 §7.6.1 tokens), so the upstream connection stays reusable.
    up = await upstream(scripted(keepalive_daemon))
    proxy = await start_proxy(make_config(up.port))
    for n in (1, 2):
        status, headers, body = await fetch(proxy.port, get(b"/extension%d" % n))
        assert (status, body) == (200, b"TEST-OK-IF-YOU-SEE-THIS001")
        assert headers[b"x-connection"] == [b"1"]
        assert b"connection" not in headers or headers[b"connection"] != [b"x-close"]
    assert up.connections == 1


# == proxy_noclose.t: an upstream that does not close after a full reply ===========================


async def test_content_length_reply_without_close_is_delivered_at_once_and_not_reused(start_proxy, upstream):
    # nginx-tests proxy_noclose.t: 'request to bad backend', 'content-length actually used' -- the
    # reply says `Connection: close` but the upstream keeps the socket open; Content-Length ends the
    # response (no wait for read_timeout), and laneproxy itself closes that connection (never pooled).
    def respond(conn_no, method, path, body):
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 24\r\nConnection: close\r\n\r\nTEST-OK-IF-YOU-SEE-THIS\n"], "hold"

    up = await upstream(scripted(respond))
    proxy = await start_proxy(make_config(up.port, lane={"read_timeout": "10s"}))
    status, _, body = await fetch(proxy.port, get(b"/uselen"))
    assert (status, body) == (200, b"TEST-OK-IF-YOU-SEE-THIS\n")
    status, _, body = await fetch(proxy.port, get(b"/uselen2"))
    assert (status, body) == (200, b"TEST-OK-IF-YOU-SEE-THIS\n")
    assert up.connections == 2
    assert [len(x) for x in requests_seen(up)] == [1, 1]


async def test_content_length_reply_in_two_packets_without_close(start_proxy, upstream):
    # nginx-tests proxy_noclose.t: 'bad backend - multiple packets' -- CL 32 sent in two writes
    # 100 ms apart, the upstream never closes: the client gets all 32 bytes promptly.
    def respond(conn_no, method, path, body):
        return [
            b"HTTP/1.1 200 OK\r\nContent-Length: 32\r\nConnection: close\r\n\r\nTEST-OK-IF-YOU-SEE-THIS\n",
            0.1,
            b"AND-THIS",
        ], "hold"

    up = await upstream(scripted(respond))
    proxy = await start_proxy(make_config(up.port, lane={"read_timeout": "10s"}))
    status, _, body = await fetch(proxy.port, get(b"/multi"))
    assert (status, body) == (200, b"TEST-OK-IF-YOU-SEE-THIS\nAND-THIS")


async def test_reply_without_length_is_streamed_before_the_upstream_closes(start_proxy, upstream):
    # nginx-tests proxy_noclose.t: 'bad backend - no content length' (a TODO in nginx). laneproxy
    # documents that responses of unknown length are written to the client as each upstream read
    # arrives: the body reaches the (HTTP/1.1, re-chunked) client while the upstream still holds
    # the connection; the upstream's close then ends the message with a last chunk.
    release = asyncio.Event()

    async def handler(reader, writer, up):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nTEST-OK-IF-YOU-SEE-THIS\n")
        await writer.drain()
        await release.wait()

    up = await upstream(handler)
    proxy = await start_proxy(make_config(up.port, lane={"read_timeout": "10s"}))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/nolen"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked\r\n" in head
        data = bytearray()
        while len(data) < 24:  # decode chunks while the upstream still holds its connection
            size = int(await asyncio.wait_for(reader.readuntil(b"\r\n"), WAIT), 16)
            assert size > 0, "last chunk before the upstream closed"
            data += await asyncio.wait_for(reader.readexactly(size + 2), WAIT)
            data = data[:-2]
        assert data == b"TEST-OK-IF-YOU-SEE-THIS\n"
        release.set()
        tail = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), WAIT)
        assert tail == b"0\r\n\r\n"
    finally:
        release.set()
        writer.close()


# == proxy.t =======================================================================================


async def test_connect_timeout_does_not_limit_the_wait_for_the_answer(start_proxy, upstream):
    # nginx-tests proxy.t: 'proxy connect timeout' -- proxy_connect_timeout covers the connect
    # only; an answer slower than it (but within read_timeout) is a 200, not a 504.
    def respond(conn_no, method, path, body):
        return [0.6, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], "keep"

    up = await upstream(scripted(respond))
    proxy = await start_proxy(make_config(up.port, lane={"connect_timeout": "200ms", "read_timeout": "5s"}))
    status, _, body = await fetch(proxy.port, get(b"/timeout"))
    assert (status, body) == (200, b"ok")


async def test_read_timeout_applies_per_read_in_the_body(start_proxy, upstream):
    # nginx-tests proxy.t: 'proxy_header_timeout does not apply to body phase' / proxy_read_timeout
    # semantics -- read_timeout is the longest wait for the NEXT upstream bytes: a body whose parts
    # come 0.25 s apart is relayed whole although it takes longer than read_timeout (0.4 s) in total.
    def respond(conn_no, method, path, body):
        parts: list = [b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\nSEE-"]
        for piece in (b"THIS", b"-AND", b"THIS"):
            parts += [0.25, piece]
        return parts, "keep"

    up = await upstream(scripted(respond))
    proxy = await start_proxy(make_config(up.port, lane={"read_timeout": "400ms"}))
    status, _, body = await fetch(proxy.port, get(b"/hdrt/body"))
    assert (status, body) == (200, b"SEE-THIS-ANDTHIS")


async def test_head_ends_at_the_blank_line_even_when_the_upstream_sends_a_body(start_proxy, upstream):
    # nginx-tests proxy.t: 'proxy head request' (unlike SEE-THIS) -- here the upstream wrongly sends a
    # close-delimited body to HEAD; RFC 9112 §6.3(1): the HEAD response ends at the blank line, the
    # bytes are never relayed, and the keep-alive client connection stays usable.
    def respond(conn_no, method, path, body):
        if method == b"HEAD":
            return [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nTEST-OK-IF-YOU-SEE-THIS"], "close"
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"], "keep"

    up = await upstream(scripted(respond))
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/", method=b"HEAD"))
        status, headers, _ = await rr(reader, b"HEAD")
        assert status == 200
        writer.write(get(b"/after"))
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert raw.startswith(b"HTTP/1.1 200 "), raw  # not "TEST-OK-IF-YOU-SEE-THIS..."
        assert b"SEE-THIS" not in raw
        assert await asyncio.wait_for(reader.readexactly(4), WAIT) == b"next"
    finally:
        writer.close()


# == proxy_extra_data.t ============================================================================


async def test_head_answered_with_body_bytes_relays_no_body_and_keeps_the_client(start_proxy, upstream):
    # nginx-tests proxy_extra_data.t: 'no data in HEAD', 'too short to HEAD' -- the upstream answers
    # HEAD with Content-Length and (some of) the body anyway; the client gets the head only, its
    # connection stays usable, and that upstream connection is never reused.
    def respond(conn_no, method, path, body):
        if method == b"HEAD":
            text = b"SEE-THIS-BUT-NOT-THIS\n" if path == b"/" else b"SEE-THIS\n"
            cl = b"8" if path == b"/" else b"100"
            return [b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %s\r\n\r\n%s" % (cl, text)], "hold"
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nclean%d" % conn_no], "keep"

    up = await upstream(scripted(respond))
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        for path in (b"/", b"/short"):
            writer.write(get(path, method=b"HEAD"))
            status, headers, _ = await rr(reader, b"HEAD")
            assert status == 200
            writer.write(get(b"/next"))
            status, _, body = await rr(reader)
            assert (status, body) == (200, b"clean%d" % (up.connections))
            assert b"SEE-THIS" not in body
    finally:
        writer.close()
    # each HEAD left bytes behind on its connection: it is the last request that connection carried
    for lines in requests_seen(up):
        assert all(not line.startswith(b"HEAD") for line in lines[:-1]), lines
    assert up.connections == 3


async def test_zero_length_reply_followed_by_junk_relays_an_empty_body(start_proxy, upstream):
    # nginx-tests proxy_extra_data.t: 'zero size' -- `Content-Length: 0` then "NOT-THIS\n": the
    # client gets an empty 200 and never NOT-THIS, not even as a second response on its connection.
    def respond(conn_no, method, path, body):
        if path == b"/zero":
            return [b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 0\r\n\r\nNOT-THIS\n"], "hold"
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"], "keep"

    up = await upstream(scripted(respond))
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/zero"))
        status, headers, body = await rr(reader)
        assert (status, body) == (200, b"")
        writer.write(get(b"/next"))
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert raw.startswith(b"HTTP/1.1 200 ") and b"NOT-THIS" not in raw
        assert await asyncio.wait_for(reader.readexactly(4), WAIT) == b"next"
    finally:
        writer.close()
    assert up.connections == 2


async def test_content_length_reply_with_no_body_at_all_is_an_aborted_response(start_proxy, upstream):
    # nginx-tests proxy_extra_data.t: 'empty too short response' -- head with Content-Length: 100
    # then close: the response is incomplete (RFC 9112 §6.3(7), §8): the client never gets a
    # complete message, and its connection is closed (nothing else is answered on it).
    def respond(conn_no, method, path, body):
        return [b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 100\r\n\r\n"], "close"

    up = await upstream(scripted(respond))
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/empty"))
        raw, closed = await read_until_close(reader)
    finally:
        writer.close()
    assert closed
    head, rest = split_head(raw)
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 100\r\n" in head
    assert rest == b""


# == proxy_chunked_extra.t =========================================================================


async def test_chunked_reply_followed_by_extra_data_relays_only_the_first_message(start_proxy, upstream):
    # nginx-tests proxy_chunked_extra.t: 'chunked with extra data' -- after the last chunk the
    # upstream sends another chunked body ("zzz..."): it never reaches the client, the client's
    # message is complete, its connection stays usable, and that upstream connection is retired.
    def respond(conn_no, method, path, body):
        if path == b"/":
            return [
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
                + (b"80\r\n" + b"x" * 126 + b"\r\n\r\n") * 4
                + b"20\r\n"
                + b"x" * 30
                + b"\r\n\r\n",
                0.3,
                b"75\r\n" + b"y" * 115 + b"\r\n\r\n0\r\n\r\n" + (b"75\r\n" + b"z" * 115 + b"\r\n\r\n0\r\n\r\n") * 2,
            ], "close"
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"], "keep"

    up = await upstream(scripted(respond))
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/"))
        status, _, body = await rr(reader)
        assert status == 200
        assert body == (b"x" * 126 + b"\r\n") * 4 + b"x" * 30 + b"\r\n" + b"y" * 115 + b"\r\n"
        writer.write(get(b"/next"))
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert raw.startswith(b"HTTP/1.1 200 ") and b"zzz" not in raw
        assert await asyncio.wait_for(reader.readexactly(4), WAIT) == b"next"
    finally:
        writer.close()
    assert up.connections == 2


# == proxy_unfinished.t ============================================================================


@pytest.mark.parametrize(
    "cut",
    [
        b"a\r\nunfinished\r\n",  # a whole chunk, then close: no last chunk ever came
        b"a\r\nunfinished\r\n1",  # close inside the next chunk-size line
        b"a\r\nunfinished\r\n0\r\nX-Trailer: 1\r\n",  # close inside the trailer section
        b"a\r\nunfinished\r\n0\r\n",  # the last-chunk line, but the final CRLF never came
    ],
    ids=["after-chunk", "in-size-line", "in-trailers", "before-final-crlf"],
)
async def test_unfinished_chunked_reply_never_gets_a_final_chunk(start_proxy, upstream, cut):
    # nginx-tests proxy_unfinished.t: 'chunked no final chunk' -- an incomplete chunked response
    # must stay incomplete for the client (RFC 9112 §8): no terminating `0\r\n\r\n`, connection closed.
    def respond(conn_no, method, path, body):
        return [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nCache-Control: max-age=300\r\n"
            b"Connection: close\r\n\r\n" + cut
        ], "close"

    up = await upstream(scripted(respond))
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/chunked", b"Connection: close\r\n"))
        raw, closed = await read_until_close(reader)
    finally:
        writer.close()
    assert closed
    head, rest = split_head(raw)
    assert head.startswith(b"HTTP/1.1 200 ")
    data, complete = chunked_complete(rest)
    assert not complete, rest
    assert data in (b"", b"unfinished")


async def test_big_unfinished_length_reply_is_aborted_and_big_finished_is_whole(start_proxy, upstream):
    # nginx-tests proxy_unfinished.t: 'big unfinished', 'big finished' -- ~1 MB bodies streamed
    # through: a short one (CL 1000100, 1000012 sent) ends in a closed connection with fewer bytes
    # than announced; a complete one arrives byte-exact.
    big = (b"X" * 98 + CRLF) * 10000

    def respond(conn_no, method, path, body):
        if path == b"/big/ok":
            return [
                b"HTTP/1.1 200 OK\r\nContent-Length: 1000010\r\nConnection: close\r\n\r\n",
                big,
                b"finished\r\n",
            ], "close"
        return [
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000100\r\nConnection: close\r\n\r\n",
            big,
            b"unfinished\r\n",
        ], "close"

    up = await upstream(scripted(respond))
    proxy = await start_proxy(make_config(up.port))
    status, _, body = await fetch(proxy.port, get(b"/big/ok"))
    assert status == 200 and body == big + b"finished\r\n"

    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/big"))
        raw, closed = await read_until_close(reader, 10)
    finally:
        writer.close()
    assert closed
    head, rest = split_head(raw)
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 1000100\r\n" in head
    assert len(rest) < 1000100 and rest == (big + b"unfinished\r\n")[: len(rest)]


async def test_unfinished_reply_with_keepalive_client_is_not_followed_by_another_answer(start_proxy, upstream):
    # nginx-tests proxy_unfinished.t: 'length no final chunk' -- with a keep-alive HTTP/1.1 client
    # that pipelined a second request, a truncated response is an abort: the connection closes and
    # the second request is never answered on it (its bytes would be read as the first's body).
    def respond(conn_no, method, path, body):
        if path == b"/length":
            return [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nunfinished\r\n"], "close"
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"], "keep"

    up = await upstream(scripted(respond))
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/length") + get(b"/second"))
        raw, closed = await read_until_close(reader)
    finally:
        writer.close()
    assert closed
    head, rest = split_head(raw)
    assert b"Content-Length: 100\r\n" in head
    assert rest == b"unfinished\r\n" and b"HTTP/1.1" not in rest


# == proxy_non_idempotent.t / proxy_next_upstream.t / proxy_next_upstream_tries.t =================


def status_server(name: bytes, status: bytes = b"503 Service Unavailable", pause: float = 0.0):
    def respond(conn_no, method, path, body):
        parts: list = [pause] if pause else []
        text = b"SEE-THIS-" + name
        parts.append(b"HTTP/1.1 %s\r\nX-IP: %s\r\nContent-Length: %d\r\n\r\n%s" % (status, name, len(text), text))
        return parts, "keep"

    return scripted(respond)


def servers(*ports: int, **extra) -> list[dict]:
    return [{"address": f"127.0.0.1:{p}", **extra} for p in ports]


@pytest.mark.parametrize("method, tries", [(b"GET", 2), (b"POST", 1)])
async def test_every_server_answering_a_retry_status_relays_the_last_upstream_answer(
    start_proxy, upstream, method, tries
):
    # nginx-tests proxy_non_idempotent.t: 'get 404' (X-IP: a, b ... SEE-THIS) and 'post 404'
    # (one X-IP ... SEE-THIS): a retried status is relayed as the upstream sent it once tries run
    # out -- never replaced by a built-in error page -- and a POST is not retried at all.
    # (laneproxy has no http_404 condition; http_503 stands in for it.)
    a = await upstream(status_server(b"A"))
    b = await upstream(status_server(b"B"))
    cfg = make_config([a.port, b.port], lane={"retry_on": ["error", "timeout", "http_503"]})
    cfg["lanes"]["app"]["servers"] = servers(a.port, b.port, max_fails=0)
    proxy = await start_proxy(cfg)
    request = get(b"/404", method=method) if method == b"GET" else b"POST /404 HTTP/1.0\r\nContent-Length: 0\r\n\r\n"
    status, headers, body = await fetch(proxy.port, request)
    assert status == 503
    assert body == b"SEE-THIS-" + headers[b"x-ip"][0]
    seen = sum(len(x) for x in requests_seen(a) + requests_seen(b))
    assert seen == tries


async def test_retries_never_try_a_server_twice_for_one_request(start_proxy, upstream):
    # nginx-tests proxy_next_upstream.t: 'all tried once' -- with more tries allowed than there are
    # servers, every server is tried exactly once, then the last answer (500) is relayed.
    a = await upstream(status_server(b"A", b"500 Internal Server Error"))
    b = await upstream(status_server(b"B", b"500 Internal Server Error"))
    cfg = make_config([a.port, b.port], lane={"retries": 5, "retry_on": ["error", "timeout", "http_500"]})
    cfg["lanes"]["app"]["servers"] = servers(a.port, b.port, max_fails=0)
    proxy = await start_proxy(cfg)
    status, headers, body = await fetch(proxy.port, get(b"/all/rr"))
    assert status == 500 and body == b"SEE-THIS-" + headers[b"x-ip"][0]
    assert [len(x) for x in requests_seen(a)] == [1]
    assert [len(x) for x in requests_seen(b)] == [1]


async def test_single_server_lane_relays_a_retry_status_it_cannot_retry_elsewhere(start_proxy, upstream):
    # nginx-tests proxy_next_upstream_tries.t / proxy_next_upstream.t (tries = number of live peers):
    # a lane with one server and `retry_on: [http_503]` has no other server to try, so the
    # upstream's own 503 (its body, its headers) reaches the client.
    a = await upstream(status_server(b"A"))
    proxy = await start_proxy(make_config([a.port], lane={"retry_on": ["error", "timeout", "http_503"]}))
    status, headers, body = await fetch(proxy.port, get(b"/single"))
    assert (status, body) == (503, b"SEE-THIS-A")
    assert headers[b"x-ip"] == [b"A"]
    assert sum(len(x) for x in requests_seen(a)) == 1


async def test_get_with_a_body_is_not_replayed_after_it_was_sent(start_proxy, upstream):
    # nginx-tests proxy_non_idempotent.t ('get' is retried: X-IP a, b) -- documented difference:
    # laneproxy streams request bodies instead of buffering them, so it replays only idempotent
    # requests WITHOUT a body (README "Safe retries"); a GET carrying a body whose server closed
    # after receiving it is a 502, and the next server never sees it.
    async def read_then_close(reader, writer, up):
        await reader.read_request()

    a = await upstream(read_then_close)
    b = await upstream(status_server(b"B", b"200 OK"))
    cfg = make_config([a.port, b.port])
    cfg["lanes"]["app"]["servers"] = servers(a.port, b.port, max_fails=0)
    cfg["lanes"]["app"]["balance"] = "round_robin"
    proxy = await start_proxy(cfg)
    got = {}
    for path in (b"/1", b"/2"):  # one of the two lands on A first, whatever the round-robin start
        got[path] = await fetch(
            proxy.port, b"GET %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n\r\nabc" % path
        )
    (a_line,) = [line for lines in requests_seen(a) for line in lines]
    a_path = a_line.split(b" ")[1]
    assert got[a_path][0] == 502
    assert [line for lines in requests_seen(b) for line in lines] == [
        b"GET %s HTTP/1.1" % (b"/2" if a_path == b"/1" else b"/1")
    ]


async def test_http_500_is_retried_and_marks_the_server_down(start_proxy, upstream):
    # nginx-tests proxy_next_upstream.t: 'request 500', 'request 500 second', 'down after 500' --
    # `proxy_next_upstream http_500` retries on the other server, and (max_fails=1 by default) the
    # server that answered 500 is skipped afterwards, even for paths where it would answer 200.
    def a_respond(conn_no, method, path, body):
        if path.startswith(b"/500"):
            return [b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"], "keep"
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nAND-THIS\n"], "keep"

    def b_respond(conn_no, method, path, body):
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 24\r\n\r\nTEST-OK-IF-YOU-SEE-THIS\n"], "keep"

    a = await upstream(scripted(a_respond))
    b = await upstream(scripted(b_respond))
    proxy = await start_proxy(make_config([a.port, b.port], lane={"retry_on": ["error", "timeout", "http_500"]}))
    for _ in range(2):
        status, _, body = await fetch(proxy.port, get(b"/500"))
        assert (status, body) == (200, b"TEST-OK-IF-YOU-SEE-THIS\n")
    for _ in range(2):
        status, _, body = await fetch(proxy.port, get(b"/ok"))
        assert body != b"AND-THIS\n"  # 'down after 500'
    assert sum(len(x) for x in requests_seen(a)) == 1


async def test_down_server_is_never_tried_even_when_retries_remain(start_proxy, upstream):
    # nginx-tests proxy_next_upstream.t: 'all tried with down' -- a `down` server takes no retry;
    # the live server's answer is relayed.
    a = await upstream(status_server(b"A"))
    b = await upstream(status_server(b"B", b"200 OK"))
    cfg = make_config([a.port], lane={"retries": 3, "retry_on": ["error", "timeout", "http_503"]})
    cfg["lanes"]["app"]["servers"] = [
        {"address": f"127.0.0.1:{a.port}", "max_fails": 0},
        {"address": f"127.0.0.1:{b.port}", "down": True},
    ]
    proxy = await start_proxy(cfg)
    status, _, body = await fetch(proxy.port, get(b"/down/"))
    assert (status, body) == (503, b"SEE-THIS-A")
    assert b.connections == 0


async def test_retry_moves_on_to_a_backup_server_within_the_tries(start_proxy, upstream):
    # nginx-tests proxy_next_upstream_tries.t: 'tries backup' -- one primary and two backups, two
    # tries: once the primary was tried, the retry goes to a backup; no third try.
    p = await upstream(status_server(b"P"))
    b1 = await upstream(status_server(b"B1"))
    b2 = await upstream(status_server(b"B2"))
    cfg = make_config([p.port], lane={"retries": 1, "retry_on": ["error", "timeout", "http_503"]})
    cfg["lanes"]["app"]["servers"] = [
        {"address": f"127.0.0.1:{p.port}", "max_fails": 0},
        {"address": f"127.0.0.1:{b1.port}", "backup": True, "max_fails": 0},
        {"address": f"127.0.0.1:{b2.port}", "backup": True, "max_fails": 0},
    ]
    proxy = await start_proxy(cfg)
    status, headers, _ = await fetch(proxy.port, get(b"/tries/backup"))
    assert status == 503 and headers[b"x-ip"][0] in (b"B1", b"B2")
    assert sum(len(x) for x in requests_seen(p)) == 1
    assert sum(len(x) for x in requests_seen(b1) + requests_seen(b2)) == 1


async def test_retry_timeout_stops_further_tries(start_proxy, upstream):
    # nginx-tests proxy_next_upstream_tries.t: 'timeout' (proxy_next_upstream_timeout) -- each try
    # takes 0.6 s; with retry_timeout 1 s the second try starts (0.6 s < 1 s) but no third one.
    ups = [await upstream(status_server(b"S%d" % i, pause=0.6)) for i in range(3)]
    cfg = make_config(
        [u.port for u in ups], lane={"retries": 5, "retry_timeout": "1s", "retry_on": ["error", "timeout", "http_503"]}
    )
    cfg["lanes"]["app"]["servers"] = servers(*(u.port for u in ups), max_fails=0)
    proxy = await start_proxy(cfg)
    status, _, _ = await fetch(proxy.port, get(b"/timeout"))
    assert status == 503
    assert sum(len(x) for u in ups for x in requests_seen(u)) == 2


# == upstream.t ====================================================================================


async def test_max_fails_3_in_fail_timeout_takes_a_failing_server_out(start_proxy, upstream):
    # nginx-tests upstream.t: 'failures' -- every 3rd request to the first server is answered by a
    # close (no response); GETs are retried on the other server so every client gets a 200; after
    # 3 failures (max_fails=3, fail_timeout=10s) the first server gets nothing more: 6 / 24.
    counts = {"p1": 0}

    def make(name: bytes):
        def respond(conn_no, method, path, body):
            if name == b"p1":
                counts["p1"] += 1
                if counts["p1"] % 3 == 0:
                    return [], "close"
            return [b"HTTP/1.1 200 OK\r\nConnection: close\r\nX-Port: %s\r\n\r\nOK\n" % name], "close"

        return scripted(respond)

    p1 = await upstream(make(b"p1"))
    p2 = await upstream(make(b"p2"))
    cfg = make_config([p1.port, p2.port])
    cfg["lanes"]["app"]["servers"] = servers(p1.port, p2.port, max_fails=3, fail_timeout="10s")
    proxy = await start_proxy(cfg)
    served = {b"p1": 0, b"p2": 0}
    for _ in range(30):
        status, headers, body = await fetch(proxy.port, get(b"/close"))
        assert (status, body) == (200, b"OK\n")
        served[headers[b"x-port"][0]] += 1
    assert served == {b"p1": 6, b"p2": 24}
    assert counts["p1"] == 9


# == proxy_request_buffering.t / proxy_request_buffering_chunked.t / proxy_pass_request.t =========


def echo_body(conn_no, method, path, body):
    return [b"HTTP/1.1 200 OK\r\nX-Body: %s\r\nContent-Length: %d\r\n\r\n%s" % (body[:40], len(body), body)], "keep"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_pipelined_get_requests_with_bodies_arrive_byte_exact(start_proxy, upstream, chunked):
    # nginx-tests proxy_request_buffering.t / proxy_request_buffering_chunked.t: 'body pipelined',
    # 'body pipelined 2' -- GET requests with bodies of 10, 1280, 5120 and 6 bytes in one write, the
    # last with Connection: close: each body reaches the upstream byte-exact, in order, and each
    # answer comes back in order; the connection closes after the last.
    bodies = [b"0123456789", b"0123456789" * 128, b"0123456789" * 512, b"foobar"]

    def one(body: bytes, last: bool) -> bytes:
        close = b"Connection: close\r\n" if last else b""
        if chunked:
            return b"GET / HTTP/1.1\r\nHost: localhost\r\n%sTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
                close,
                len(body),
                body,
            )
        return b"GET / HTTP/1.1\r\nHost: localhost\r\n%sContent-Length: %d\r\n\r\n%s" % (close, len(body), body)

    up = await upstream(scripted(echo_body))
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"".join(one(b, i == len(bodies) - 1) for i, b in enumerate(bodies)))
        for body in bodies:
            status, _, got = await rr(reader)
            assert (status, got) == (200, body)
        assert (await read_until_close(reader))[1]
    finally:
        writer.close()
    # the upstream received exactly these requests, canonically framed
    raw = b"".join(bytes(r) for r in up.received)
    for body in bodies:
        if chunked:
            assert b"Transfer-Encoding: chunked\r\n" in raw
        else:
            assert b"Content-Length: %d\r\n\r\n%s" % (len(body), body) in raw
    assert sum(len(x) for x in requests_seen(up)) == 4


async def test_content_length_body_streams_to_the_upstream_as_it_arrives(start_proxy, upstream):
    # nginx-tests proxy_request_buffering.t: 'no preread - body part', 'preread - body' (unbuffered
    # request body): laneproxy relays bodies as they arrive, so the upstream sees the head and the
    # first half before the client has sent the second half.
    got_head = asyncio.Event()
    got_half = asyncio.Event()
    seen: dict[str, bytes] = {}

    async def handler(reader, writer, up):
        seen["head"] = await reader.readuntil(b"\r\n\r\n")
        got_head.set()
        seen["first"] = await reader.readexactly(5)
        got_half.set()
        seen["second"] = await reader.readexactly(5)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nX-Port: 8082\r\n\r\nOK\n")
        await writer.drain()

    up = await upstream(handler)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"GET /preread HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 10\r\n\r\n")
        await asyncio.wait_for(got_head.wait(), WAIT)  # 'no preread': the head goes before any body
        writer.write(b"01234")
        await asyncio.wait_for(got_half.wait(), WAIT)  # 'body part'
        writer.write(b"56789")
        status, _, body = await rr(reader)
        assert (status, body) == (200, b"OK\n")
    finally:
        writer.close()
    assert b"Content-Length: 10\r\n" in seen["head"]
    assert (seen["first"], seen["second"]) == (b"01234", b"56789")


async def test_chunked_body_streams_to_the_upstream_as_it_arrives(start_proxy, upstream):
    # nginx-tests proxy_request_buffering_chunked.t: 'no preread - body part', 'chunks - body'
    # -- a chunked body is relayed chunk by chunk (re-chunked canonically): the upstream decodes
    # "01234" before the client sends the rest, then "56789many" and the last chunk.
    got_first = asyncio.Event()
    seen: dict[str, bytes] = {}

    async def handler(reader, writer, up):
        seen["head"] = await reader.readuntil(b"\r\n\r\n")
        data = bytearray()
        while len(data) < 5:  # decode chunks until the first 5 bytes are in
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data += await reader.readexactly(size)
            assert await reader.readexactly(2) == b"\r\n"
        seen["first"] = bytes(data)
        got_first.set()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                assert await reader.readuntil(b"\r\n") == b"\r\n"
                break
            data += await reader.readexactly(size)
            assert await reader.readexactly(2) == b"\r\n"
        seen["all"] = bytes(data)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nOK\n")
        await writer.drain()

    up = await upstream(handler)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(
            b"GET /preread HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\n01234\r\n"
        )
        await asyncio.wait_for(got_first.wait(), WAIT)
        writer.write(b"5\r\n56789\r\n4\r\nmany\r\n0\r\n\r\n")
        status, _, body = await rr(reader)
        assert (status, body) == (200, b"OK\n")
    finally:
        writer.close()
    assert b"Transfer-Encoding: chunked\r\n" in seen["head"] and b"Content-Length" not in seen["head"]
    assert seen["first"] == b"01234" and seen["all"] == b"0123456789many"
    assert bytes(up.received[0]).endswith(b"\r\n0\r\n\r\n")


async def test_http10_get_with_body_passes_headers_and_body(start_proxy, upstream):
    # nginx-tests proxy_pass_request.t: defaults (proxy_pass_request_headers/body on) -- an HTTP/1.0
    # GET with `X-Header: foo` and a 4-byte body: both reach the upstream unchanged.
    seen: dict[str, object] = {}

    async def handler(reader, writer, up):
        head, headers, body = await reader.read_request()
        seen.update(head=head, headers=headers, body=body)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        await writer.drain()

    up = await upstream(handler)
    proxy = await start_proxy(make_config(up.port))
    status, _, _ = await fetch(
        proxy.port, b"GET / HTTP/1.0\r\nHost: localhost\r\nX-Header: foo\r\nContent-Length: 4\r\n\r\nbar\n"
    )
    assert status == 200
    assert seen["head"].startswith(b"GET / HTTP/1.1\r\n")
    assert seen["headers"][b"x-header"] == [b"foo"]
    assert seen["headers"][b"content-length"] == [b"4"]
    assert seen["body"] == b"bar\n"


# == proxy_chunked.t and chunked relaying ==========================================================


async def test_chunk_extensions_and_trailers_from_upstream_keep_the_connection_reusable(start_proxy, upstream):
    # nginx-tests proxy_chunked.t / proxy_keepalive.t 'chunked 2' with RFC 9112 §7.1.1-7.1.2 syntax:
    # chunk extensions and a trailer section in the upstream's chunked reply are parsed (not relayed
    # as data), the body decodes exactly, and the upstream connection is reused for the next request.
    def respond(conn_no, method, path, body):
        return [
            b"HTTP/1.1 200 OK\r\nX-Connection: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'4;name=value\r\nSEE-\r\n5;a="q;x";b\r\nTHIS\n\r\n0;last=1\r\nX-Trailer: t\r\n\r\n' % conn_no
        ], "keep"

    up = await upstream(scripted(respond))
    proxy = await start_proxy(make_config(up.port))
    for n in (1, 2):
        status, headers, body = await fetch(proxy.port, get(b"/ext%d" % n))
        assert (status, body) == (200, b"SEE-THIS\n")
        assert headers[b"x-connection"] == [b"1"]
    assert up.connections == 1


async def test_chunked_reply_trickled_byte_by_byte_is_relayed_and_reused(start_proxy, upstream):
    # nginx-tests proxy.t: 'proxy request with multiple packets' (and proxy_keepalive.t reuse): a
    # chunked reply arriving one byte per read is reassembled exactly and the connection reused.
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nSEE-THIS\n\r\n8\r\nAND-THIS\r\n0\r\n\r\n"

    async def handler(reader, writer, up):
        while True:
            try:
                await reader.read_request()
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            for i in range(len(reply)):
                writer.write(reply[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0.001)  # pacing: one byte per upstream read

    up = await upstream(handler)
    proxy = await start_proxy(make_config(up.port))
    for _ in range(2):
        status, _, body = await fetch(proxy.port, get(b"/multi"))
        assert (status, body) == (200, b"SEE-THIS\nAND-THIS")
    assert up.connections == 1


# == proxy_websocket.t =============================================================================


def ws_client_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    head = b"\x81" + (
        bytes([0x80 | n])
        if n < 126
        else (b"\xfe" + struct.pack("!H", n) if n < 65536 else b"\xff" + struct.pack("!Q", n))
    )
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def ws_server_frame(payload: bytes) -> bytes:
    n = len(payload)
    head = b"\x81" + (
        bytes([n]) if n < 126 else (b"\x7e" + struct.pack("!H", n) if n < 65536 else b"\x7f" + struct.pack("!Q", n))
    )
    return head + payload


async def read_ws_frame(reader: asyncio.StreamReader, masked: bool) -> bytes:
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    mask = await reader.readexactly(4) if masked else b"\0\0\0\0"
    data = await reader.readexactly(n)
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data))


async def test_websocket_pipelined_frame_then_big_and_many_frames(start_proxy, upstream):
    # nginx-tests proxy_websocket.t: 'handshake pipelined', 'response pipelined', 'websocket big
    # response', 'websocket N' / 'small N' -- a fake WebSocket server replacing foo by bar, behind
    # the proxy: the frame sent with the handshake is delivered after the 101, then a 48 KiB frame
    # and 10 pairs of big+small frames cross in order, byte-exact.
    handshake_seen: dict[str, bytes] = {}

    async def ws_server(reader, writer, up):
        head = await reader.readuntil(b"\r\n\r\n")
        handshake_seen["head"] = head
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: x\r\n\r\n"
        )
        await writer.drain()
        while True:
            try:
                payload = await read_ws_frame(reader, masked=True)
            except asyncio.IncompleteReadError:
                return
            writer.write(ws_server_frame(payload.replace(b"foo", b"bar")))
            await writer.drain()

    up = await upstream(ws_server)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        key = base64.b64encode(os.urandom(16))
        writer.write(
            b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % key + ws_client_frame(b"foo")
        )
        status, headers, _ = await asyncio.wait_for(read_response(reader), WAIT)
        assert status == 101 and headers[b"upgrade"] == [b"websocket"]
        assert await asyncio.wait_for(read_ws_frame(reader, masked=False), WAIT) == b"bar"
        writer.write(ws_client_frame(b"foo" * 16384))
        assert await asyncio.wait_for(read_ws_frame(reader, masked=False), WAIT) == b"bar" * 16384
        for i in range(1, 11):
            writer.write(ws_client_frame(b"foo" * 16384 + b"%d" % i))
            writer.write(ws_client_frame(b"bazz%d" % i))
        for i in range(1, 11):
            assert await asyncio.wait_for(read_ws_frame(reader, masked=False), WAIT) == b"bar" * 16384 + b"%d" % i
            assert await asyncio.wait_for(read_ws_frame(reader, masked=False), WAIT) == b"bazz%d" % i
    finally:
        writer.close()
    head = handshake_seen["head"].lower()
    assert b"\r\nupgrade: websocket\r\n" in head and b"\r\nconnection: upgrade\r\n" in head
    assert b"sec-websocket-key: " + key.lower() in head
