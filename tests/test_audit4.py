"""Audit 4: limits, timeouts, forwarding fields, laneproxy's own answers, the admin listener.

Each probe is end to end through real sockets (conftest `start_proxy` and scripted upstreams),
asserting what docs/interface.md, README.md and an nginx user expect, at and around each
boundary. Gaps left by test_audit.py, test_audit2.py, test_audit3.py and the e2e files only.
Every network wait is bounded; timeouts in configs are small.
"""

from __future__ import annotations

import asyncio
import email.utils
import socket

import aiohttp
import pytest
import yaml

from laneproxy.config import load_config
from laneproxy.server import Proxy
from tests.conftest import (
    is_closed,
    make_config,
    ok_response,
    read_response,
    track_writer,
)
from tests.conftest import open_tracked_client as open_client
from tests.conftest import read_until_closed as read_to_close

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("close_tracked_clients")]

WAIT = 3.0
GET = b"GET %s HTTP/1.1\r\nHost: t.example\r\n\r\n"


# -- helpers ----------------------------------------------------------------------------------------


async def recv(reader: asyncio.StreamReader, method: bytes = b"GET", timeout: float = WAIT):
    return await asyncio.wait_for(read_response(reader, method), timeout)


def split_head(data: bytes) -> tuple[bytes, dict[bytes, list[bytes]], bytes]:
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete head in {data[:300]!r}"
    lines = head.split(b"\r\n")
    fields: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields.setdefault(name.strip().lower(), []).append(value.strip())
    return lines[0], fields, rest


def assert_own_answer(data: bytes, status: int, *, close: bool, head: bool = False) -> dict:
    """interface.md 'What the client receives when laneproxy answers itself': short plain text,
    Content-Length, Date; Connection: close when the connection closes; no content for HEAD."""
    line, fields, rest = split_head(data)
    assert line.startswith(b"HTTP/1.1 %d " % status), line
    assert fields[b"content-type"][0].startswith(b"text/plain"), fields
    assert len(fields[b"date"]) == 1 and email.utils.parsedate_to_datetime(fields[b"date"][0].decode())
    n = int(fields[b"content-length"][0])
    if close:
        assert fields.get(b"connection") == [b"close"], fields
    else:
        assert b"connection" not in fields, fields
    if head:
        assert rest == b"", f"HEAD answer carries content: {rest!r}"  # RFC 9110 §9.3.2
    else:
        assert len(rest) == n and rest.startswith(b"%d " % status), rest
    return fields


def request_heads(raw: bytes) -> list[bytes]:
    return [h for h in raw.split(b"\r\n\r\n") if h.startswith((b"GET ", b"POST ", b"HEAD "))]


def field_values(head: bytes, name: bytes) -> list[bytes]:
    out = []
    for line in head.split(b"\r\n")[1:]:
        n, _, v = line.partition(b":")
        if n.strip().lower() == name:
            out.append(v.strip())
    return out


async def wait_until(predicate, timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def hang(reader, writer, up) -> None:
    """An upstream that reads the request and never answers."""
    await reader.read_request()
    await asyncio.sleep(20)


# == 1. limits =======================================================================================


async def test_request_line_exactly_at_max_request_line_is_accepted(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, client={"max_request_line": 200}))
    line = b"GET /" + b"a" * (200 - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
    assert len(line) == 200
    reader, writer = await open_client(proxy.port)
    writer.write(line + b"\r\nHost: t\r\n\r\n")
    status, _, _ = await recv(reader)
    assert status == 200  # interface.md: max_request_line 8k (here 200) -> 414 only above it
    writer.close()


async def test_request_line_one_over_max_request_line_is_414(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, client={"max_request_line": 200}))
    line = b"GET /" + b"a" * (201 - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
    assert len(line) == 201  # the target alone is 187 bytes: the *request line* is over the limit
    reader, writer = await open_client(proxy.port)
    writer.write(line + b"\r\nHost: t\r\n\r\n")
    data, _ = await read_to_close(reader)
    assert_own_answer(data, 414, close=True)  # interface.md: max_request_line -> 414 (nginx: request line buffer)
    assert up.connections == 0
    writer.close()


async def test_target_over_max_request_line_is_414_and_closed(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, client={"max_request_line": 200}))
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    data, _ = await read_to_close(reader)
    assert_own_answer(data, 414, close=True)  # interface.md 414; RFC 9112 §3 (R6)
    writer.close()


def field_line(total: int, name: bytes = b"X-Big") -> bytes:
    """One header line of exactly `total` bytes including its CRLF."""
    return name + b": " + b"v" * (total - len(name) - 4) + b"\r\n"


async def test_header_line_of_exactly_8k_is_accepted(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port))
    line = field_line(8192)
    assert len(line) == 8192
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n" + line + b"\r\n")
    assert (await recv(reader))[0] == 200  # interface.md: "one line at most 8k"
    writer.close()


async def test_header_line_one_over_8k_is_431(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n" + field_line(8193) + b"\r\n")
    data, _ = await read_to_close(reader)
    assert_own_answer(data, 431, close=True)  # interface.md: one line at most 8k -> 431
    assert up.connections == 0
    writer.close()


async def test_max_headers_exactly_at_limit_accepted_one_over_431(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, client={"max_headers": 5}))
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(4))  # + Host = 5 fields
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n" + fields + b"\r\n")
    assert (await recv(reader))[0] == 200  # interface.md: max_headers (5) accepted
    writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n" + fields + b"X-4: v\r\n\r\n")
    data, _ = await read_to_close(reader)
    assert_own_answer(data, 431, close=True)  # interface.md: max_headers + 1 -> 431
    writer.close()


async def test_max_header_size_exactly_at_limit_accepted_one_over_431(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, client={"max_header_size": 1024}))
    host = b"Host: t\r\n"
    at = host + field_line(1024 - len(host))
    assert len(at) == 1024  # the header section (field lines with their CRLF)
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET / HTTP/1.1\r\n" + at + b"\r\n")
    assert (await recv(reader))[0] == 200  # interface.md: max_header_size, at the limit: accepted
    writer.write(b"GET / HTTP/1.1\r\n" + host + field_line(1025 - len(host)) + b"\r\n")
    data, _ = await read_to_close(reader)
    assert_own_answer(data, 431, close=True)  # one byte over -> 431
    writer.close()


async def test_max_body_content_length_exactly_at_limit_is_forwarded(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, lane={"max_body": 100}))
    reader, writer = await open_client(proxy.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"b" * 100)
    status, _, body = await recv(reader)
    assert (status, body) == (200, b"POST / HTTP/1.1 body=100\n")  # interface.md: *larger* bodies get 413
    writer.close()


async def test_max_body_content_length_one_over_is_413_before_any_body_byte(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, lane={"max_body": 100}))
    reader, writer = await open_client(proxy.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 101\r\n\r\n")  # no body byte sent
    data, _ = await read_to_close(reader)
    assert_own_answer(data, 413, close=True)  # interface.md: body over max_body -> 413 (nginx: on CL)
    assert up.connections == 0
    writer.close()


async def test_max_body_chunked_exactly_at_limit_is_forwarded(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, lane={"max_body": 100}))
    reader, writer = await open_client(proxy.port)
    writer.write(
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"32\r\n" + b"a" * 50 + b"\r\n32\r\n" + b"b" * 50 + b"\r\n0\r\n\r\n"
    )
    status, _, body = await recv(reader)
    assert (status, body) == (200, b"POST / HTTP/1.1 body=100\n")  # exactly max_body: accepted
    writer.close()


async def test_max_connections_boundary_closed_at_accept(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, client={"max_connections": 2}))
    r1, w1 = await open_client(proxy.port)
    r2, w2 = await open_client(proxy.port)
    for r, w in ((r1, w1), (r2, w2)):
        w.write(GET % b"/")
        assert (await recv(r))[0] == 200  # exactly max_connections: both served
    r3, w3 = await open_client(proxy.port)
    w3.write(GET % b"/third")
    data, _ = await read_to_close(r3)
    assert data == b""  # README: beyond max_connections "closed at accept" (no answer)
    w3.close()
    w1.close()
    await wait_until(lambda: len(proxy.ctx.connections) < 2 if hasattr(proxy, "ctx") else True)
    await asyncio.sleep(0.1)
    r4, w4 = await open_client(proxy.port)
    w4.write(GET % b"/fourth")
    assert (await recv(r4))[0] == 200  # a freed slot is usable again
    w4.close()
    w2.close()


async def test_keepalive_requests_last_answer_from_laneproxy_carries_close(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(
        up.port, routes=[{"prefix": "/app", "lane": "app"}], client={"keepalive_requests": 2}))
    reader, writer = await open_client(proxy.port)
    writer.write(GET % b"/app")
    assert (await recv(reader))[0] == 200
    writer.write(GET % b"/nowhere")  # the 2nd (last) request gets laneproxy's own 404
    data, _ = await read_to_close(reader)
    assert_own_answer(data, 404, close=True)  # keepalive_requests: last response carries Connection: close
    writer.close()


async def test_keepalive_requests_1_first_response_closes(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, client={"keepalive_requests": 1}))
    reader, writer = await open_client(proxy.port)
    writer.write(GET % b"/")
    status, fields, _ = await recv(reader)
    assert status == 200 and fields[b"connection"] == [b"close"]  # nginx keepalive_requests 1
    assert await is_closed(reader)
    writer.close()


# == 2. timeouts =====================================================================================


async def test_header_timeout_on_second_request_of_a_keepalive_connection(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(
        up.port, client={"header_timeout": "500ms", "keepalive_timeout": "10s"}))
    loop = asyncio.get_running_loop()
    reader, writer = await open_client(proxy.port)
    writer.write(GET % b"/1")
    assert (await recv(reader))[0] == 200
    start = loop.time()
    writer.write(b"GET /2 HTTP/1.1\r\nHost: t\r\n")  # the head never ends
    data, _ = await read_to_close(reader)
    assert_own_answer(data, 408, close=True)  # interface.md: header_timeout, whole head from its first byte
    assert 0.35 < loop.time() - start < 2.0
    writer.close()


async def test_header_timeout_408_format(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, client={"header_timeout": "300ms"}))
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nX-A: b\r\n")
    data, reset = await read_to_close(reader)
    assert_own_answer(data, 408, close=True)  # interface.md header_timeout -> 408 then close
    writer.close()


async def test_body_timeout_is_per_read_not_whole_body(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, client={"body_timeout": "500ms"}))
    reader, writer = await open_client(proxy.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 8\r\n\r\n")
    for _ in range(8):  # 8 x 0.2 s = 1.6 s in all, never 0.5 s without a byte
        await asyncio.sleep(0.2)
        writer.write(b"x")
    status, _, body = await recv(reader)
    assert (status, body) == (200, b"POST / HTTP/1.1 body=8\n")  # interface.md: "next request-body bytes"
    writer.close()


async def test_body_timeout_408_format_and_upstream_dropped(start_proxy, upstream):
    async def read_all(reader, writer, up):
        await reader.read()

    up = await upstream(read_all)
    proxy = await start_proxy(make_config(up.port, client={"body_timeout": "300ms"}))
    reader, writer = await open_client(proxy.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
    data, _ = await read_to_close(reader)
    assert_own_answer(data, 408, close=True)  # interface.md body_timeout -> 408
    writer.close()


async def test_keepalive_timeout_before_first_request_is_header_timeout_silent_close(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, client={"header_timeout": "300ms"}))
    reader, writer = await open_client(proxy.port)
    data, _ = await read_to_close(reader)
    assert data == b""  # nginx client_header_timeout on a connection that sent nothing: closed, no answer
    writer.close()


async def test_send_timeout_closes_a_client_that_stops_reading(start_proxy, upstream):
    written = []
    closed = asyncio.Event()

    async def firehose(reader, writer, up):
        await reader.read_request()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (512 * 1024 * 1024))
        chunk = b"z" * (1024 * 1024)
        try:
            for _ in range(512):
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 10)
                written.append(len(chunk))
        except (ConnectionError, TimeoutError):
            pass
        finally:
            closed.set()

    up = await upstream(firehose)
    proxy = await start_proxy(make_config(up.port, client={"send_timeout": "500ms"}))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.connect(("127.0.0.1", proxy.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    track_writer(writer)
    writer.write(GET % b"/big")
    await asyncio.sleep(0.2)
    # never read: the proxy must give up after send_timeout and drop the upstream too
    await asyncio.wait_for(closed.wait(), 8)
    assert sum(written) < 64 * 1024 * 1024  # memory bounded: the upstream was paused, not drained
    data, _ = await read_to_close(reader, timeout=5)  # what was buffered, then EOF/RST
    assert len(data) < 64 * 1024 * 1024
    writer.close()


async def test_read_timeout_504_format_keeps_connection(start_proxy, upstream):
    up = await upstream(hang)
    proxy = await start_proxy(make_config(up.port, lane={"read_timeout": "300ms", "retries": 0}))
    reader, writer = await open_client(proxy.port)
    writer.write(GET % b"/slow")
    status, fields, body = await recv(reader)
    assert status == 504 and fields[b"content-type"][0].startswith(b"text/plain")  # interface.md 504
    assert int(fields[b"content-length"][0]) == len(body) and b"date" in fields
    writer.close()


# -- lingering close ----------------------------------------------------------------------------


async def keep_sending(writer: asyncio.StreamWriter, total: int) -> None:
    chunk = b"x" * 65536
    sent = 0
    try:
        while sent < total:
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 2)
            sent += len(chunk)
    except (ConnectionError, TimeoutError):
        pass


async def test_413_reaches_a_client_still_sending_its_body(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, lane={"max_body": 1024}))
    reader, writer = await open_client(proxy.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 8388608\r\n\r\n" + b"x" * 262144)
    sender = asyncio.ensure_future(keep_sending(writer, 4 * 1024 * 1024))
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    finally:
        await asyncio.wait_for(sender, 10)
    assert head.startswith(b"HTTP/1.1 413 ")  # README: lingering close, the answer is not lost to a reset
    writer.close()


async def test_431_reaches_a_client_whose_body_follows(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    writer.write(
        b"POST / HTTP/1.1\r\nHost: t\r\n" + field_line(9000) + b"Content-Length: 1048576\r\n\r\n" + b"y" * 524288
    )
    sender = asyncio.ensure_future(keep_sending(writer, 1024 * 1024))
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    finally:
        await asyncio.wait_for(sender, 10)
    assert head.startswith(b"HTTP/1.1 431 ")  # lingering close (nginx lingering_close)
    writer.close()


# == 3. forwarding fields ===========================================================================


async def one(start_proxy, upstream, request: bytes, **cfg) -> bytes:
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, **cfg))
    reader, writer = await open_client(proxy.port)
    writer.write(request)
    assert (await recv(reader))[0] == 200
    writer.close()
    return request_heads(bytes(up.received[0]))[0]


async def test_spoofed_forwarding_fields_in_any_case_and_repeated_are_replaced(start_proxy, upstream):
    head = await one(
        start_proxy, upstream,
        b"GET / HTTP/1.1\r\nHost: h.example\r\nx-real-ip: 1.1.1.1\r\nX-REAL-IP: 2.2.2.2\r\n"
        b"x-forwarded-for: 3.3.3.3\r\nX-Forwarded-For: 4.4.4.4\r\nx-forwarded-proto: https\r\n"
        b"X-Forwarded-Host: evil\r\nx-forwarded-host: evil2\r\n\r\n",
    )
    assert field_values(head, b"x-real-ip") == [b"127.0.0.1"]  # interface.md: X-Real-IP: <client ip>
    assert field_values(head, b"x-forwarded-for") == [b"127.0.0.1"]  # fresh: peer not trusted
    assert field_values(head, b"x-forwarded-proto") == [b"http"]
    assert field_values(head, b"x-forwarded-host") == [b"h.example"]  # the Host received


async def test_trusted_peer_xff_lines_joined_in_order_and_appended(start_proxy, upstream):
    head = await one(
        start_proxy, upstream,
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.1.1.1, 2.2.2.2\r\nX-Forwarded-For: 3.3.3.3\r\n"
        b"X-Real-IP: 9.9.9.9\r\n\r\n",
        client={"trusted_proxies": ["127.0.0.0/8"]},
    )
    # interface.md: "the client ip, appended to the received list" (RFC 9110 §5.3: lines are one list)
    assert field_values(head, b"x-forwarded-for") == [b"1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1"]
    assert field_values(head, b"x-real-ip") == [b"127.0.0.1"]


async def test_untrusted_peer_when_trusted_list_excludes_it(start_proxy, upstream):
    head = await one(
        start_proxy, upstream,
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.1.1.1\r\n\r\n",
        client={"trusted_proxies": ["10.0.0.0/8", "::1/128"]},
    )
    assert field_values(head, b"x-forwarded-for") == [b"127.0.0.1"]  # fresh unless the peer is trusted


async def test_connection_on_several_lines_removes_every_named_field(start_proxy, upstream):
    head = await one(
        start_proxy, upstream,
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: X-A\r\nX-A: 1\r\nX-B: 2\r\nconnection: keep-alive ,X-B,, x-c\r\n"
        b"X-C: 3\r\nX-D: 4\r\n\r\n",
    )
    for name in (b"connection", b"x-a", b"x-b", b"x-c"):
        assert field_values(head, name) == [], name  # interface.md: Connection and every field it names
    assert field_values(head, b"x-d") == [b"4"]


async def test_proxy_authorization_and_hop_by_hop_never_forwarded_on_post(start_proxy, upstream):
    head = await one(
        start_proxy, upstream,
        b"POST / HTTP/1.1\r\nHost: h\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        b"proxy-authorization: Bearer x\r\nKeep-Alive: 300\r\nTE: trailers, deflate\r\nTrailer: X-T\r\n"
        b"Upgrade: websocket\r\nProxy-Connection: keep-alive\r\nAuthorization: Basic b2s=\r\n"
        b"Content-Length: 2\r\n\r\nhi",
    )
    for name in (b"proxy-authorization", b"keep-alive", b"te", b"trailer", b"upgrade", b"proxy-connection"):
        assert field_values(head, name) == [], name  # interface.md hop-by-hop list
    assert field_values(head, b"authorization") == [b"Basic b2s="]  # end-to-end: kept
    assert field_values(head, b"content-length") == [b"2"]


def scripted(response: bytes):
    async def handler(reader, writer, up):
        while True:
            await reader.read_request()
            writer.write(response)
            await writer.drain()

    return handler


async def test_response_connection_on_several_lines_removes_named_fields(start_proxy, upstream):
    up = await upstream(scripted(
        b"HTTP/1.1 200 OK\r\nConnection: X-A\r\nX-A: 1\r\nConnection: X-B, keep-alive\r\nX-B: 2\r\n"
        b"Keep-Alive: timeout=30\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\nX-C: 3\r\n"
        b"Content-Length: 2\r\n\r\nok"
    ))
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    writer.write(GET % b"/")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"ok"
    for name in (b"connection", b"x-a", b"x-b", b"keep-alive", b"proxy-connection", b"upgrade"):
        assert field_values(head, name) == [], name  # RFC 9110 §7.6.1: hop-by-hop removed on responses
    assert field_values(head, b"x-c") == [b"3"]
    writer.close()


async def test_relayed_response_has_one_server_field(start_proxy, upstream):
    up = await upstream(scripted(b"HTTP/1.1 200 OK\r\nServer: upapp\r\nContent-Length: 2\r\n\r\nok"))
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    writer.write(GET % b"/")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert len(field_values(head, b"server")) == 1  # never two Server fields
    writer.close()


# == 4. laneproxy's own answers ======================================================================


async def test_head_no_route_404_has_no_body_and_keeps_connection(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, routes=[{"prefix": "/app", "lane": "app"}]))
    reader, writer = await open_client(proxy.port)
    writer.write(b"HEAD /nowhere HTTP/1.1\r\nHost: t\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert_own_answer(head, 404, close=False, head=True)
    writer.write(GET % b"/nowhere")  # the next answer starts right after the HEAD's head
    status, fields, body = await recv(reader)
    assert status == 404 and len(body) == int(fields[b"content-length"][0])
    writer.close()


async def test_head_502_and_504_have_no_body(start_proxy, upstream):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    slow = await upstream(hang)
    proxy = await start_proxy(make_config(
        {"dead": [port], "slow": [slow.port]},
        routes=[{"prefix": "/dead", "lane": "dead"}, {"prefix": "/slow", "lane": "slow"}],
        lane={"read_timeout": "300ms", "retries": 0},
    ))
    reader, writer = await open_client(proxy.port)
    writer.write(b"HEAD /dead HTTP/1.1\r\nHost: t\r\n\r\n")
    assert_own_answer(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT), 502, close=False, head=True)
    writer.write(b"HEAD /slow HTTP/1.1\r\nHost: t\r\n\r\n")
    assert_own_answer(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT), 504, close=False, head=True)
    writer.write(GET % b"/dead")
    status, _, body = await recv(reader)
    assert status == 502 and body.startswith(b"502 ")
    writer.close()


async def test_503_queue_full_format_and_head(start_proxy, upstream):
    gate = asyncio.Event()

    async def held(reader, writer, up):
        while True:
            await reader.read_request()
            await gate.wait()
            writer.write(ok_response(b"ok"))
            await writer.drain()

    up = await upstream(held)
    proxy = await start_proxy(make_config(up.port, lane={"limit": 1, "queue": 0}))
    r1, w1 = await open_client(proxy.port)
    w1.write(GET % b"/hold")
    await wait_until(lambda: up.connections == 1)
    await asyncio.sleep(0.05)
    reader, writer = await open_client(proxy.port)
    writer.write(GET % b"/busy")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    fields = split_head(head)[1]
    body = await asyncio.wait_for(reader.readexactly(int(fields[b"content-length"][0])), WAIT)
    f = assert_own_answer(head + body, 503, close=False)
    assert int(f[b"retry-after"][0]) >= 1  # interface.md: Retry-After whole seconds >= 1
    writer.write(b"HEAD /busy HTTP/1.1\r\nHost: t\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert_own_answer(head, 503, close=False, head=True)
    gate.set()
    assert (await recv(r1))[0] == 200
    writer.write(GET % b"/after")
    assert (await recv(reader))[0] == 200  # the client connection stayed open
    w1.close()
    writer.close()


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"HEAD /" + b"a" * 300 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
        (b"HEAD / HTTP/1.1\r\nHost: t\r\n" + field_line(9000) + b"\r\n", 431),
        (b"HEAD / HTTP/2.0\r\nHost: t\r\n\r\n", 505),
    ],
    ids=["414", "431", "505"],
)
async def test_head_request_refused_by_limits_gets_no_body(start_proxy, upstream, request_bytes, status):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, client={"max_request_line": 200}))
    reader, writer = await open_client(proxy.port)
    writer.write(request_bytes)
    data, _ = await read_to_close(reader)
    assert_own_answer(data, status, close=True, head=True)  # RFC 9110 §9.3.2: HEAD gets no content
    writer.close()


async def test_head_header_timeout_408_has_no_body(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port, client={"header_timeout": "300ms"}))
    reader, writer = await open_client(proxy.port)
    writer.write(b"HEAD / HTTP/1.1\r\nHost: t\r\n")
    data, _ = await read_to_close(reader)
    assert_own_answer(data, 408, close=True, head=True)  # RFC 9110 §9.3.2
    writer.close()


async def test_505_format(start_proxy, upstream):
    up = await upstream()
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    writer.write(b"GET / HTTP/2.0\r\nHost: t\r\n\r\n")
    data, _ = await read_to_close(reader)
    assert_own_answer(data, 505, close=True)  # README: HTTP/2.0 request line -> 505
    writer.close()


# == 5. the admin listener ===========================================================================


async def admin_started(tmp_path, cfg: dict) -> tuple[Proxy, int]:
    path = tmp_path / "laneproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proxy = Proxy(load_config(path))
    await proxy.start()
    return proxy, proxy.admin.addresses[0][1]


async def test_admin_unknown_path_404_wrong_method_405_and_metrics_type(tmp_path, upstream):
    up = await upstream()
    proxy, port = await admin_started(tmp_path, make_config(up.port, admin={"listen": "127.0.0.1:0"}))
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as s:
            base = f"http://127.0.0.1:{port}"
            async with s.get(base + "/nope") as r:
                assert r.status == 404
            async with s.post(base + "/metrics") as r:
                assert r.status == 405 and "GET" in r.headers.get("Allow", "")  # RFC 9110 §15.5.6
            async with s.get(base + "/api/reload") as r:
                assert r.status == 405 and "POST" in r.headers.get("Allow", "")
            async with s.get(base + "/metrics") as r:
                assert r.status == 200
                # Prometheus text exposition format (0.0.4, or 1.0.0 as Prometheus 3 reads it)
                ctype = r.headers["Content-Type"].replace(" ", "")
                assert ctype.startswith(("text/plain;version=0.0.4", "text/plain;version=1.0.0")), ctype
            async with s.get(base + "/status") as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
    finally:
        await proxy.stop(0.5)


async def test_admin_reload_with_invalid_file_keeps_old_config(tmp_path, upstream):
    up = await upstream()
    cfg = make_config(up.port, admin={"listen": "127.0.0.1:0"})
    proxy, port = await admin_started(tmp_path, cfg)
    try:
        before = proxy.cfg
        (tmp_path / "laneproxy.yaml").write_text(
            yaml.safe_dump({**cfg, "lanes": {"app": {"servers": ["127.0.0.1:99999"]}}})
        )
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as s:
            async with s.post(f"http://127.0.0.1:{port}/api/reload") as r:
                assert r.status == 400  # interface.md: an invalid file is reported, the running config stays
                body = await r.json()
                assert body["ok"] is False and any("lanes.app.servers[0]" in p for p in body["problems"])
        assert proxy.cfg is before
        reader, writer = await open_client(proxy.port)
        writer.write(GET % b"/still")
        assert (await recv(reader))[0] == 200
        writer.close()
    finally:
        await proxy.stop(0.5)


async def test_admin_metrics_count_laneproxy_own_answers(tmp_path, upstream):
    up = await upstream()
    cfg = make_config(up.port, routes=[{"prefix": "/app", "lane": "app"}], admin={"listen": "127.0.0.1:0"},
                      client={"max_request_line": 100})
    proxy, port = await admin_started(tmp_path, cfg)
    try:
        reader, writer = await open_client(proxy.port)
        writer.write(GET % b"/nowhere")
        assert (await recv(reader))[0] == 404
        writer.close()
        reader, writer = await open_client(proxy.port)
        writer.write(b"GET /app" + b"a" * 200 + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        data, _ = await read_to_close(reader)
        assert data.startswith(b"HTTP/1.1 414 ")
        writer.close()
        await asyncio.sleep(0.1)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as s:
            async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
        # interface.md: "Each such answer is counted in /metrics"
        assert 'laneproxy_local_responses_total{status="404"} 1.0' in text, text[:2000]
        assert 'laneproxy_local_responses_total{status="414"} 1.0' in text
    finally:
        await proxy.stop(0.5)
