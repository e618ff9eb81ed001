"""More of HAProxy's HTTP/1 regression tests (`haproxy/haproxy` `reg-tests/`), ported to laneproxy.

The companion of tests/test_haproxy_suite.py (same conventions: a VTest `server` block becomes a
scripted upstream, a `client` block raw bytes on a real socket). Each test names its `.vtc` and
the client/server blocks it comes from. HAProxy features without a laneproxy counterpart (splice,
`http-request` rule engines, H2, syslog checks) are dropped; what those tests check about the
messages themselves (framing, bodies, header order, connection reuse) is kept. Where laneproxy's
documented policy (interface.md, http-rules.md, README) deliberately differs from HAProxy, the
test asserts laneproxy's behaviour and the comment says so. Every network await is bounded.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from tests.conftest import RecordingReader, is_closed, make_config, ok_response, open_client, read_response

pytestmark = pytest.mark.timeout(30)

WAIT = 3.0
HOST = b"Host: t.example\r\n"


# -- helpers ---------------------------------------------------------------------------------------


def scripted(respond, log: list | None = None):
    """Upstream: read each request (CL/chunked), log (head, headers, body), write respond(...)."""

    async def handler(reader: RecordingReader, writer: asyncio.StreamWriter, up) -> None:
        while True:
            try:
                req = await reader.read_request()
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if log is not None:
                log.append(req)
            out = respond(*req)
            if asyncio.iscoroutine(out):
                out = await out
            writer.write(out)
            await writer.drain()

    return handler


def target_of(head: bytes) -> bytes:
    return head.split(b"\r\n", 1)[0].split(b" ")[1]


def raw_header_lines(head: bytes) -> list[bytes]:
    return [line for line in head.split(b"\r\n")[1:] if line]


async def recv(reader: asyncio.StreamReader, method: bytes = b"GET"):
    return await asyncio.wait_for(read_response(reader, method), WAIT)


async def wait_until(predicate, what: str, timeout: float = WAIT) -> None:
    """Poll `predicate` every 10 ms until it holds; fail after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def reset_close(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0): the peer sees the abort at once."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def read_chunked_raw(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """A chunked body as it came: (payload, trailer section bytes without the final CRLF)."""
    parts = []
    while True:
        size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), WAIT)).split(b";")[0], 16)
        if size == 0:
            break
        parts.append(await asyncio.wait_for(reader.readexactly(size), WAIT))
        await asyncio.wait_for(reader.readexactly(2), WAIT)
    trailers = b""
    while True:
        line = await asyncio.wait_for(reader.readuntil(b"\r\n"), WAIT)
        if line == b"\r\n":
            break
        trailers += line
    return b"".join(parts), trailers


async def recv_head(reader: asyncio.StreamReader) -> tuple[int, dict]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    headers: dict[bytes, list[bytes]] = {}
    for line in raw_header_lines(head):
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(head.split(b" ", 2)[1]), headers


# == reg-tests/http-messaging/http_abortonclose.vtc ===============================================


async def test_abortonclose_c1_no_server_is_502_not_503(start_proxy, upstream):
    # haproxy reg-tests/http-messaging/http_abortonclose.vtc c1 (be1_1, s1 stopped with -break):
    # HAProxy answers 503 (SC--) after its connect retries. laneproxy's documented answer to a
    # refused connection is 502 (interface.md "connection refused or reset ... 502"); the client
    # connection stays usable for the next request.
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there: connect is refused
    proxy = await start_proxy(make_config(port, lane={"retries": 1}))
    reader, writer = await open_client(proxy.port)
    try:
        for target in (b"/c1", b"/c1b"):
            writer.write(b"GET %s HTTP/1.1\r\n%s\r\n" % (target, HOST))
            status, _, _ = await recv(reader)
            assert status == 502
    finally:
        writer.close()


async def test_abortonclose_c1_connect_failure_is_retried_on_another_server(start_proxy, upstream):
    # haproxy reg-tests/http-messaging/http_abortonclose.vtc c1 ("retries 1"): with a second,
    # live server in the lane, laneproxy's connect-failure retry (README "Safe retries": nothing
    # was sent, any method) lands on it, even for a POST.
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    log: list = []
    up = await upstream(scripted(lambda h, hd, b: ok_response(b"alive " + b), log))
    proxy = await start_proxy(make_config([dead_port, up.port], lane={"retries": 1}))
    for i in range(2):  # round robin: one of the two requests tries the dead server first
        reader, writer = await open_client(proxy.port)
        try:
            writer.write(b"POST /c1 HTTP/1.1\r\n%sContent-Length: 2\r\n\r\nb%d" % (HOST, i))
            status, _, body = await recv(reader)
        finally:
            writer.close()
        assert (status, body) == (200, b"alive b%d" % i)
    assert [b for _, _, b in log] == [b"b0", b"b1"]  # each body reached the live server once


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-request", "two-pipelined"])
async def test_abortonclose_half_close_after_request_still_gets_the_response(start_proxy, upstream, pipelined):
    # haproxy reg-tests/http-messaging/http_abortonclose.vtc tests "option abortonclose". Without
    # it (HAProxy's default) a client FIN after a complete request is not an abort; laneproxy's
    # documented default (http-rules.md (c) 8) is the same: deliver the response(s), then close.
    # The FIN is sent while the server still holds the first request.
    got = asyncio.Event()
    release = asyncio.Event()
    log: list = []

    async def respond(head, headers, body):
        if target_of(head) == b"/c3a":
            got.set()
            await asyncio.wait_for(release.wait(), WAIT)
        return ok_response(b"late " + target_of(head))

    up = await upstream(scripted(respond, log))
    proxy = await start_proxy(make_config(up.port))
    targets = [b"/c3a", b"/c3b"] if pipelined else [b"/c3a"]
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"".join(b"GET %s HTTP/1.1\r\n%s\r\n" % (t, HOST) for t in targets))
        await writer.drain()
        await asyncio.wait_for(got.wait(), WAIT)
        writer.write_eof()  # SHUT_WR now: the write buffer is empty, so the FIN leaves at once
        if not pipelined:  # (with a pipelined request buffered, laneproxy pauses reading)
            await wait_until(lambda: any(c.peer_eof for c in proxy.ctx.connections), "the proxy to see the FIN")
        release.set()
        for t in targets:
            assert (await recv(reader))[::2] == (200, b"late " + t)
        assert await is_closed(reader, WAIT)
    finally:
        writer.close()
    assert [target_of(h) for h, _, _ in log] == targets


async def test_abortonclose_c3_client_abort_while_waiting_closes_server_connection(start_proxy, upstream):
    # haproxy reg-tests/http-messaging/http_abortonclose.vtc c3 + s2 (be2, maxconn 1): the client
    # goes away while the server has the request and has not answered; s2 "expect_close".
    # laneproxy: README "Client abort: the upstream connection is closed at once (never pooled)".
    # The abort is an RST here (a FIN alone is a half-close, see the test above).
    got = asyncio.Event()
    server_eof = asyncio.Event()

    async def handler(reader: RecordingReader, writer: asyncio.StreamWriter, up) -> None:
        await reader.read_request()
        got.set()
        try:
            data = await asyncio.wait_for(reader.read(1), WAIT)
        except ConnectionError:
            data = b""
        if data == b"":
            server_eof.set()

    up = await upstream(handler)
    proxy = await start_proxy(make_config(up.port, lane={"limit": 1, "queue": 5}))
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET /c3 HTTP/1.1\r\n%s\r\n" % HOST)
    await writer.drain()
    await asyncio.wait_for(got.wait(), WAIT)
    reset_close(writer)
    await asyncio.wait_for(server_eof.wait(), WAIT)
    assert up.received[0].count(b"GET ") == 1
    # the lane slot is free again (limit 1): a new client is served, on a new upstream connection
    await wait_until(lambda: proxy.lanes["app"].in_flight == 0, "the aborted exchange to leave the lane")
    got.clear()
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"GET /after HTTP/1.1\r\n%s\r\n" % HOST)
        await asyncio.wait_for(got.wait(), WAIT)
    finally:
        writer.close()
    assert up.connections == 2


async def test_abortonclose_c4_abort_while_queued_never_reaches_the_server(start_proxy, upstream):
    # haproxy reg-tests/http-messaging/http_abortonclose.vtc c3/c4 (be2 "maxconn 1"): c3 holds the
    # only slot, c4 waits in the queue and leaves (CQ--); c4 must never reach s2. laneproxy: lane
    # `limit: 1` + `queue`; README "A waiter whose client disconnects (FIN or reset) leaves the
    # queue at once and never reaches the upstream". c3 is then answered, and a later /c5 is
    # served right after it (nothing stale left in the queue ahead of it).
    log: list = []
    first = asyncio.Event()
    release = asyncio.Event()

    async def respond(head, headers, body):
        if target_of(head) == b"/c3":
            first.set()
            await asyncio.wait_for(release.wait(), WAIT)
        return ok_response(target_of(head))

    up = await upstream(scripted(respond, log))
    proxy = await start_proxy(make_config(up.port, lane={"limit": 1, "queue": 5}))
    lane = proxy.lanes["app"]
    r3, w3 = await open_client(proxy.port)
    r4, w4 = await open_client(proxy.port)
    try:
        w3.write(b"GET /c3 HTTP/1.1\r\n%s\r\n" % HOST)
        await asyncio.wait_for(first.wait(), WAIT)
        w4.write(b"GET /c4 HTTP/1.1\r\n%s\r\n" % HOST)
        await w4.drain()
        await wait_until(lambda: len(lane.queue) == 1, "/c4 to be queued")
        w4.close()  # FIN: the queued client is gone
        await wait_until(lambda: len(lane.queue) == 0, "/c4 to leave the queue")
        release.set()
        status, _, body = await recv(r3)
        assert (status, body) == (200, b"/c3")
        r5, w5 = await open_client(proxy.port)
        try:
            w5.write(b"GET /c5 HTTP/1.1\r\n%s\r\n" % HOST)
            assert (await recv(r5))[2] == b"/c5"
        finally:
            w5.close()
    finally:
        w3.close()
        w4.close()
    assert [target_of(h) for h, _, _ in log] == [b"/c3", b"/c5"]
    assert all(b"/c4" not in bytes(r) for r in up.received)


# == reg-tests/connection/http_reuse_{safe,always,aggressive,never}.vtc ============================


def echo_client_id(head: bytes, headers: dict, body: bytes) -> bytes:
    cid = headers.get(b"client-id", [b"-"])
    return ok_response(b",".join(cid))


async def three_clients(port: int) -> list[bytes]:
    """c1, c2, c3 one after the other, each: a request with `client-id: cN`, then two without."""
    bodies = []
    for n in (1, 2, 3):
        reader, writer = await open_client(port)
        try:
            for i in range(3):
                cid = b"client-id: c%d\r\n" % n if i == 0 else b""
                writer.write(b"GET / HTTP/1.1\r\n%s%s\r\n" % (HOST, cid))
                status, _, body = await recv(reader)
                assert status == 200
                bodies.append(body)
        finally:
            writer.close()
    return bodies


async def test_http_reuse_one_pooled_connection_serves_every_client(start_proxy, upstream):
    # haproxy reg-tests/connection/http_reuse_safe.vtc, http_reuse_always.vtc and
    # http_reuse_aggressive.vtc ("pool-max-conn 1"): later transactions reuse the idle server
    # connection. HAProxy "safe" (its default) never sends the FIRST request of a client
    # connection on a reused server connection (http_first_request == 1 for c2/c3); laneproxy
    # reuses for every request (like "always") and instead retries an idempotent body-less request
    # once on a fresh connection if the reused one fails (README "Pools", "Safe retries"). So all
    # nine requests share one upstream connection. The receiver's "client-id" session variable
    # leaking c1's id into later transactions is a HAProxy-side artefact: here each forwarded
    # request carries exactly its own fields, nothing from the previous user of the connection.
    log: list = []
    up = await upstream(scripted(echo_client_id, log))
    proxy = await start_proxy(make_config(up.port, lane={"keepalive": 1}))
    bodies = await three_clients(proxy.port)
    assert bodies == [b"c1", b"-", b"-", b"c2", b"-", b"-", b"c3", b"-", b"-"]
    assert up.connections == 1
    assert len(log) == 9


async def test_http_reuse_never_with_keepalive_zero(start_proxy, upstream):
    # haproxy reg-tests/connection/http_reuse_never.vtc: no server connection is shared between
    # client connections. laneproxy has no "never" mode; `keepalive: 0` (no idle slot per server)
    # is its equivalent: every request gets its own upstream connection, and the client side is
    # unaffected (each client connection still carries its three requests).
    log: list = []
    up = await upstream(scripted(echo_client_id, log))
    proxy = await start_proxy(make_config(up.port, lane={"keepalive": 0}))
    bodies = await three_clients(proxy.port)
    assert bodies == [b"c1", b"-", b"-", b"c2", b"-", b"-", b"c3", b"-", b"-"]
    assert len(log) == 9
    assert up.connections == 9
    assert all(bytes(r).count(b"GET ") == 1 for r in up.received)


# == reg-tests/http-messaging/http_splicing.vtc, http_splicing_chunk.vtc ===========================
# (splicing itself is a kernel fast path laneproxy does not have; the messages must still come
# through byte-exact with the same framing)


async def test_splicing_c1_one_mib_post_and_one_mib_cl_response(start_proxy, upstream):
    # haproxy reg-tests/http-messaging/http_splicing.vtc c1 / s1: POST with CL 1048576; the server
    # expects "content-length == 1048576" and the full body, answers CL 1048576.
    body = bytes(range(256)) * 4096
    log: list = []
    up = await upstream(scripted(lambda h, hd, b: ok_response(b[::-1]), log))
    proxy = await start_proxy(make_config(up.port, lane={"max_body": "2m"}))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"POST / HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n" % (HOST, len(body)))
        writer.write(body)
        status, headers, got = await recv(reader)
    finally:
        writer.close()
    assert status == 200 and headers[b"content-length"] == [b"1048576"] and got == body[::-1]
    assert log[0][1][b"content-length"] == [b"1048576"] and log[0][2] == body


async def test_splicing_c2_close_delimited_response_reaches_client_chunked(start_proxy, upstream):
    # haproxy reg-tests/http-messaging/http_splicing.vtc c2 / s2: "txresp -nolen -bodylen 1048576"
    # (no length, read until close). The client sees no Content-Length and the whole body;
    # laneproxy re-chunks it for an HTTP/1.1 client (README "Framing") and keeps the connection.
    payload = bytes(range(251)) * 4178  # 1048678 bytes, not a multiple of any buffer size

    async def handler(reader: RecordingReader, writer: asyncio.StreamWriter, up) -> None:
        await reader.read_request()
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        writer.write(payload)
        await writer.drain()

    up = await upstream(handler)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\n%s\r\n" % HOST)
        status, headers = await recv_head(reader)
        assert status == 200 and b"content-length" not in headers
        assert headers[b"transfer-encoding"] == [b"chunked"]
        got, _ = await read_chunked_raw(reader)
        assert got == payload
        assert not await is_closed(reader, 0.1)
    finally:
        writer.close()


async def test_splicing_chunk_chunked_both_ways(start_proxy, upstream):
    # haproxy reg-tests/http-messaging/http_splicing_chunk.vtc c1 / s1: a chunked POST of 500000
    # bytes in chunks of 10000..300000; the server expects no Content-Length, TE chunked and
    # bodylen 500000, then answers five 204800-byte chunks; the client expects no
    # Content-Length, TE chunked and bodylen 1024000.
    sizes = [10000] * 5 + [50000, 100000, 300000]
    body = b"".join(bytes([65 + i]) * n for i, n in enumerate(sizes))
    resp_chunks = [bytes([97 + i]) * 204800 for i in range(5)]
    log: list = []

    def respond(head, headers, b):
        return (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in resp_chunks)
            + b"0\r\n\r\n"
        )

    up = await upstream(scripted(respond, log))
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"POST / HTTP/1.1\r\n%sTransfer-Encoding: chunked\r\n\r\n" % HOST)
        pos = 0
        for n in sizes:
            writer.write(b"%x\r\n%s\r\n" % (n, body[pos : pos + n]))
            pos += n
        writer.write(b"0\r\n\r\n")
        status, headers = await recv_head(reader)
        assert status == 200 and b"content-length" not in headers
        assert headers[b"transfer-encoding"] == [b"chunked"]
        got, _ = await read_chunked_raw(reader)
        assert got == b"".join(resp_chunks) and len(got) == 1024000
    finally:
        writer.close()
    head, headers, forwarded = log[0]
    assert b"content-length" not in headers and headers[b"transfer-encoding"] == [b"chunked"]
    assert forwarded == body and len(forwarded) == 500000


async def test_splicing_c2_close_delimited_response_to_http10_client(start_proxy, upstream):
    # haproxy reg-tests/http-messaging/http_splicing.vtc c2 / s2 with an HTTP/1.0 client (a
    # variation): no chunked coding exists for it, so the body comes raw and the end is the close
    # (http-rules.md P2: no persistent connection with a 1.0 client).
    payload = bytes(range(251)) * 2000

    async def handler(reader: RecordingReader, writer: asyncio.StreamWriter, up) -> None:
        await reader.read_request()
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + payload)
        await writer.drain()

    up = await upstream(handler)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"GET / HTTP/1.0\r\n%s\r\n" % HOST)
        status, headers = await recv_head(reader)
        assert status == 200 and b"content-length" not in headers and b"transfer-encoding" not in headers
        assert await asyncio.wait_for(reader.read(), WAIT) == payload  # up to the close
    finally:
        writer.close()


# == reg-tests/http-messaging/http_bodyless_spliced_response.vtc ==================================


async def test_bodyless_spliced_head_responses_with_large_payloads(start_proxy, upstream):
    # haproxy reg-tests/http-messaging/http_bodyless_spliced_response.vtc c1 / s1: the frontend
    # rewrites HEAD to GET so the server sends real payloads (CL 12, CL 50000, chunked
    # 15+1024+4048+50000); the client's HEADs see none of it, and its final GET gets
    # "last response" on the same connection. laneproxy does not rewrite methods, so the
    # scripted server plays that role: it sends the payloads to the HEADs it receives.
    chunked = b"".join(b"%x\r\n%s\r\n" % (n, b"c" * n) for n in (15, 1024, 4048, 50000)) + b"0\r\n\r\n"
    log: list = []

    def respond(head, headers, body):
        target = target_of(head)
        if target == b"/req1":
            return ok_response(b"skipped data")
        if target == b"/req2":
            return ok_response(b"x" * 50000)
        if target == b"/req3":
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
        return ok_response(b"last response")

    up = await upstream(scripted(respond, log))
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        for target in (b"/req1", b"/req2", b"/req3"):
            writer.write(b"HEAD %s HTTP/1.1\r\n%s\r\n" % (target, HOST))
            status, _, body = await recv(reader, b"HEAD")
            assert (status, body) == (200, b"")
        writer.write(b"GET /req4 HTTP/1.1\r\n%s\r\n" % HOST)
        assert (await recv(reader))[::2] == (200, b"last response")
        assert not await is_closed(reader, 0.1)  # nothing stray followed the answers
    finally:
        writer.close()
    assert [h.split(b" ", 1)[0] for h, _, _ in log] == [b"HEAD"] * 3 + [b"GET"]


# == reg-tests/http-messaging/drop_trailers.vtc ===================================================


async def test_drop_trailers_c1_c2_request_trailers_never_reach_the_origin(start_proxy, upstream):
    # haproxy reg-tests/http-messaging/drop_trailers.vtc c1 ("/drop", option
    # http-drop-request-trailers) and c2 ("/keep", forwarded by default). laneproxy's policy
    # (http-rules.md F11, README "request trailers: dropped") is c1's for every request: the
    # origin gets "hello" and no "x-tlr1", whatever the path.
    log: list = []
    up = await upstream(scripted(lambda h, hd, b: ok_response(), log))
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        for target in (b"/drop", b"/keep"):
            writer.write(
                b"POST %s HTTP/1.1\r\n%sTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\nx-tlr1: value1\r\n\r\n" % (target, HOST)
            )
            assert (await recv(reader))[0] == 200
    finally:
        writer.close()
    assert [(target_of(h), b) for h, _, b in log] == [(b"/drop", b"hello"), (b"/keep", b"hello")]
    assert b"x-tlr1" not in bytes(up.received[0]).lower()


@pytest.mark.parametrize("te_trailers", [False, True], ids=["c3-no-te", "c4-te-trailers"])
async def test_drop_trailers_c3_c4_response_trailers(start_proxy, upstream, te_trailers):
    # haproxy reg-tests/http-messaging/drop_trailers.vtc s2 + c3 (option
    # http-drop-response-trailers: body "world", no trailer) and c4 (default: "x-rtlr1: rvalue1"
    # forwarded). laneproxy's policy (http-rules.md F11, README "Framing"): response trailers
    # pass only to a client that sent "TE: trailers", so c3 is the default and c4 needs the TE;
    # fields that may not be trailers (Host, Set-Cookie, added to s2's trailer here) never pass.
    # (A Content-Length trailer is refused by httptools itself: tests/test_smuggling_corpus.py.)
    async def handler(reader: RecordingReader, writer: asyncio.StreamWriter, up) -> None:
        await reader.read_request()
        writer.write(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nworld\r\n0\r\nx-rtlr1: rvalue1\r\n"
            b"host: evil\r\nset-cookie: s=1\r\n\r\n"  # (added) routing/control fields never pass
        )
        await writer.drain()

    up = await upstream(handler)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        te = b"TE: trailers\r\n" if te_trailers else b""
        writer.write(b"GET /res HTTP/1.1\r\n%s%s\r\n" % (HOST, te))
        status, headers = await recv_head(reader)
        assert status == 200 and headers[b"transfer-encoding"] == [b"chunked"]
        body, trailers = await read_chunked_raw(reader)
    finally:
        writer.close()
    assert body == b"world"
    assert trailers == (b"x-rtlr1: rvalue1\r\n" if te_trailers else b"")


# == reg-tests/http-messaging/http_no_delay.vtc ===================================================


async def test_no_delay_first_chunk_reaches_client_before_the_message_ends(start_proxy, upstream):
    # haproxy reg-tests/http-messaging/http_no_delay.vtc c2 / s2 (option http-no-delay): the server
    # sends a chunked head and a 5-byte chunk, and terminates the message only once the client
    # got that chunk (barrier b2). Without the option HAProxy corks the incomplete message for
    # ~200 ms. laneproxy relays each upstream read as it arrives (README "Streaming both ways"),
    # so the chunk must come through while the message is still open, and quickly.
    client_got_chunk = asyncio.Event()

    async def handler(reader: RecordingReader, writer: asyncio.StreamWriter, up) -> None:
        await reader.read_request()
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nAAAAA\r\n")
        await writer.drain()
        await asyncio.wait_for(client_got_chunk.wait(), WAIT)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    up = await upstream(handler)
    proxy = await start_proxy(make_config(up.port))
    loop = asyncio.get_running_loop()
    reader, writer = await open_client(proxy.port)
    try:
        t0 = loop.time()
        writer.write(b"GET / HTTP/1.1\r\n%s\r\n" % HOST)
        status, headers = await recv_head(reader)
        assert status == 200 and headers[b"transfer-encoding"] == [b"chunked"]
        assert await asyncio.wait_for(reader.readuntil(b"\r\n"), WAIT) == b"5\r\n"
        assert await asyncio.wait_for(reader.readexactly(7), WAIT) == b"AAAAA\r\n"
        elapsed = loop.time() - t0
        client_got_chunk.set()
        assert await asyncio.wait_for(reader.readexactly(5), WAIT) == b"0\r\n\r\n"
    finally:
        writer.close()
    assert elapsed < 0.15, f"first chunk took {elapsed:.3f}s (HAProxy's corked case is ~0.2 s)"


# == reg-tests/http-rules/h1or2_to_h1c.vtc (and h1_to_h1c.vtc) ======================================


async def test_h1_to_h1c_list_content_length_on_get_is_400(start_proxy, upstream):
    # haproxy reg-tests/http-rules/h1or2_to_h1c.vtc c1h1 sends "content-length: 000, 00" on a GET;
    # HAProxy accepts it (equal values, RFC 9110 §8.6 MAY). laneproxy's documented policy
    # (http-rules.md F5: "400 / 502 for all variants, identical duplicates included") is 400 +
    # close, and nothing reaches the server.
    up = await upstream(scripted(lambda h, hd, b: ok_response()))
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(
            b"GET /path/to/file.extension?qs_arg=qs_value HTTP/1.1\r\n%scontent-length: 000, 00\r\n\r\n" % HOST
        )
        status, headers, _ = await recv(reader)
        assert status == 400 and headers[b"connection"] == [b"close"]
        assert await is_closed(reader, WAIT)
    finally:
        writer.close()
    assert up.received == [] or all(not r for r in up.received)


async def test_h1_to_h1c_repeated_fields_and_ows_both_ways(start_proxy, upstream):
    # haproxy reg-tests/http-rules/h1or2_to_h1c.vtc and h1_to_h1c.vtc c1 / s1 (minus the
    # set-method/set-uri rules laneproxy does not have): request fields "hdr1: val1",
    # "hdr2:  val2a", "hdr2:    val2b", "hdr3:      val3a, val3b", "hdr4:" reach the server with
    # their order kept and leading OWS excluded (RFC 9110 §5.5, §5.3; http-rules.md R12, R14); the
    # target with its query is unchanged. The server's 234 with the same fields and "This is a
    # body" comes back the same way (HAProxy's set-status 200 is a rule, not ported).
    log: list = []
    response = (
        b"HTTP/1.1 234 Whatever\r\nhdr1: val1\r\nhdr2:  val2a\r\nhdr2:    val2b\r\n"
        b"hdr3:      val3a, val3b\r\nhdr4:\r\nContent-Length: 14\r\n\r\nThis is a body"
    )
    up = await upstream(scripted(lambda h, hd, b: response, log))
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(
            b"GET /path/to/file.extension?qs_arg=qs_value HTTP/1.1\r\n%s"
            b"hdr1: val1\r\nhdr2:  val2a\r\nhdr2:    val2b\r\nhdr3:      val3a, val3b\r\nhdr4:\r\n\r\n" % HOST
        )
        status, headers, body = await recv(reader)
    finally:
        writer.close()
    head = log[0][0]
    assert head.startswith(b"GET /path/to/file.extension?qs_arg=qs_value HTTP/1.1\r\n")
    fwd = [ln for ln in raw_header_lines(head) if ln.lower().startswith(b"hdr")]
    assert [ln.split(b":", 1)[0].lower() for ln in fwd] == [b"hdr1", b"hdr2", b"hdr2", b"hdr3", b"hdr4"]
    assert [ln.split(b":", 1)[1].strip(b" \t") for ln in fwd] == [b"val1", b"val2a", b"val2b", b"val3a, val3b", b""]
    assert status == 234 and body == b"This is a body"
    assert headers[b"hdr1"] == [b"val1"] and headers[b"hdr2"] == [b"val2a", b"val2b"]
    assert headers[b"hdr3"] == [b"val3a, val3b"] and headers[b"hdr4"] == [b""]
    assert headers[b"content-length"] == [b"14"]


# == reg-tests/http-rules/ifnone-forwardfor.vtc ===================================================


def echo_xff(head: bytes, headers: dict, body: bytes) -> bytes:
    return ok_response(b"|".join(headers.get(b"x-forwarded-for", [])))


@pytest.mark.parametrize(
    "trusted, expected",
    [([], b"127.0.0.1"), (["127.0.0.1/32"], b"10.9.8.7, 127.0.0.1")],
    ids=["untrusted-fresh", "trusted-appended"],
)
async def test_forwardfor_with_a_received_x_forwarded_for(start_proxy, upstream, trusted, expected):
    # haproxy reg-tests/http-rules/ifnone-forwardfor.vtc c1 (frontends none/normal, backends
    # be1/be2): with "option forwardfor" a second X-Forwarded-For line is added (x-ff == 2), with
    # "if-none" the client's is kept alone (x-ff == 1). laneproxy has neither option: its
    # documented rule (interface.md "What the upstream receives") is ONE X-Forwarded-For field,
    # fresh (the peer alone) unless the peer is in client.trusted_proxies, where the peer is
    # appended to the received list. Never two lines, and a request without one gets the peer.
    log: list = []
    up = await upstream(scripted(echo_xff, log))
    proxy = await start_proxy(make_config(up.port, client={"trusted_proxies": trusted}))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"GET /req1 HTTP/1.1\r\n%sx-forwarded-for: 10.9.8.7\r\n\r\n" % HOST)
        assert (await recv(reader))[2] == expected
        writer.write(b"GET /req2 HTTP/1.1\r\n%s\r\n" % HOST)
        assert (await recv(reader))[2] == b"127.0.0.1"
    finally:
        writer.close()
    assert [len(hd[b"x-forwarded-for"]) for _, hd, _ in log] == [1, 1]
    assert all(hd[b"x-real-ip"] == [b"127.0.0.1"] for _, hd, _ in log)


# == reg-tests/http-messaging/scheme_based_normalize.vtc ==========================================


@pytest.mark.parametrize(
    "target, host",
    [
        (b"http://hostname:80/", b"hostname:80"),  # c1: HAProxy normalises to "hostname"
        (b"http://hostname:8080/", b"hostname:8080"),  # c2: not normalised by HAProxy either
        (b"https://hostname:443/", b"hostname:443"),  # c3: HAProxy normalises to "hostname"
        (b"https://hostname:80/", b"hostname:80"),  # c4: not normalised by HAProxy either
    ],
    ids=["c1", "c2", "c3", "c4"],
)
async def test_scheme_based_normalize_absolute_form_authority(start_proxy, upstream, target, host):
    # haproxy reg-tests/http-messaging/scheme_based_normalize.vtc c1-c4 (sent over H2 there; the
    # same absolute URIs in HTTP/1.1 absolute-form here). HAProxy drops a port that is the
    # scheme's default (RFC 3986 §6.2.3, optional). laneproxy's documented rule (interface.md
    # "What the upstream receives", http-rules.md R8) is Host = the target's authority, as sent,
    # with origin-form "/" on the request line; it does not normalise the port.
    log: list = []
    up = await upstream(scripted(lambda h, hd, b: ok_response(), log))
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"GET %s HTTP/1.1\r\nHost: other\r\n\r\n" % target)
        assert (await recv(reader))[0] == 200
    finally:
        writer.close()
    [(head, headers, _)] = log
    assert head.split(b"\r\n", 1)[0] == b"GET / HTTP/1.1"
    assert headers[b"host"] == [host]


# == reg-tests/checks/observe_error_limit.vtc =====================================================


def two_servers(ports: list[int], **server_opts) -> list[dict]:
    return [{"address": f"127.0.0.1:{p}", **server_opts} for p in ports]


async def test_observe_layer7_errors_take_a_server_out(start_proxy, upstream):
    # haproxy reg-tests/checks/observe_error_limit.vtc s1 + c1/c2 (be7: "observe layer7
    # error-limit 2 on-error mark-down"): a 404 is not an error, two 500s mark the server down.
    # laneproxy's passive health (README "Upstream resilience", nginx max_fails): failures are
    # what `retry_on` names (here http_500), `max_fails: 2`. HAProxy's backend has one server and
    # then answers 503 (c2); laneproxy never marks a lane's only server down (documented), so the
    # port uses two servers: once s1 is out, everything goes to s2. POSTs are never retried, so
    # each 500 reaches the client as it did in the .vtc.
    seen: list[tuple[str, bytes]] = []

    def s1(head, headers, body):
        seen.append(("s1", target_of(head)))
        if target_of(head) == b"/ok":
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        return b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"

    def s2(head, headers, body):
        seen.append(("s2", target_of(head)))
        return ok_response(b"s2")

    up1 = await upstream(scripted(s1))
    up2 = await upstream(scripted(s2))
    cfg = make_config(up1.port, lane={"retry_on": ["error", "timeout", "http_500"], "retries": 1})
    cfg["lanes"]["app"]["servers"] = two_servers([up1.port, up2.port], max_fails=2, fail_timeout="30s")
    proxy = await start_proxy(cfg)
    statuses = []
    reader, writer = await open_client(proxy.port)
    try:
        for target in [b"/ok"] * 2 + [b"/ko"] * 4 + [b"/ko"] * 4:
            writer.write(b"POST %s HTTP/1.1\r\n%sContent-Length: 0\r\n\r\n" % (target, HOST))
            statuses.append((await recv(reader))[0])
    finally:
        writer.close()
    # round robin alternates: s1 gets /ok (404, not an error), then /ko twice (500, 500): out.
    assert [t for s, t in seen if s == "s1"] == [b"/ok", b"/ko", b"/ko"]
    assert sorted(statuses[:2]) == [200, 404]
    assert sorted(statuses[2:6]) == [200, 200, 500, 500]
    assert statuses[6:] == [200] * 4  # s1 is skipped for fail_timeout
    assert [s for s, _ in seen[6:]] == ["s2"] * 4


async def test_observe_single_server_is_never_marked_down(start_proxy, upstream):
    # haproxy reg-tests/checks/observe_error_limit.vtc c2: after the error limit HAProxy answers
    # 503 ("the backend has no usable server left"). laneproxy's documented policy (README
    # "Upstream resilience", laneproxy/lane.py): a lane with a single server never marks it down,
    # so the server keeps getting the requests and its own answers reach the client.
    count = 0

    def s1(head, headers, body):
        nonlocal count
        count += 1
        return b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"

    up = await upstream(scripted(s1))
    cfg = make_config(up.port, lane={"retry_on": ["error", "timeout", "http_500"]})
    cfg["lanes"]["app"]["servers"] = two_servers([up.port], max_fails=2, fail_timeout="30s")
    proxy = await start_proxy(cfg)
    reader, writer = await open_client(proxy.port)
    try:
        for _ in range(4):
            writer.write(b"POST /ko HTTP/1.1\r\n%sContent-Length: 0\r\n\r\n" % HOST)
            assert (await recv(reader))[0] == 500
    finally:
        writer.close()
    assert count == 4


# == reg-tests/checks/http-check.vtc ==============================================================


async def test_http_check_request_shape_and_failing_server_out(start_proxy, upstream):
    # haproxy reg-tests/checks/http-check.vtc s2/s3 (be2 "option httpchk GET /status HTTP/1.1
    # www.haproxy.org", be3 "http-check send meth GET uri /status ver HTTP/1.1"): the check is
    # "GET /status HTTP/1.1" with a Host and no body. HAProxy's default (be1) is "OPTIONS /
    # HTTP/1.0" without Host; laneproxy's check is always GET `health.path` over HTTP/1.1 with
    # Host and Connection: close on its own connection (README "Active health"). A second server
    # that answers 503 to its checks goes out after `fall` (like a failing check in
    # 4be_1srv_health_checks.vtc), so client requests then all go to the healthy one.
    checks: list = []
    good_served: list = []

    def good(head, headers, body):
        if target_of(head) == b"/status":
            checks.append((head, headers, body))
            return ok_response(b"fine")
        good_served.append(target_of(head))
        return ok_response(b"good")

    def bad(head, headers, body):
        if target_of(head) == b"/status":
            return b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
        return ok_response(b"bad")

    up_good = await upstream(scripted(good))
    up_bad = await upstream(scripted(bad))
    cfg = make_config(
        [up_good.port, up_bad.port],
        lane={"health": {"path": "/status", "interval": "50ms", "timeout": "1s", "rise": 1, "fall": 1}},
    )
    proxy = await start_proxy(cfg)
    bad_server = next(s for s in proxy.lanes["app"].servers if s.port == up_bad.port)
    await wait_until(lambda: checks and not bad_server.health_ok, "a check on each server")
    head, headers, body = checks[0]
    assert head.split(b"\r\n", 1)[0] == b"GET /status HTTP/1.1"
    assert headers[b"host"] == [b"127.0.0.1:%d" % up_good.port]
    assert headers[b"connection"] == [b"close"] and body == b""
    assert b"content-length" not in headers and b"transfer-encoding" not in headers
    reader, writer = await open_client(proxy.port)
    try:
        for i in range(4):
            writer.write(b"GET /r%d HTTP/1.1\r\n%s\r\n" % (i, HOST))
            assert (await recv(reader))[::2] == (200, b"good")
    finally:
        writer.close()
    assert good_served == [b"/r0", b"/r1", b"/r2", b"/r3"]
