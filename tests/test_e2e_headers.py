"""End to end through real sockets: the header fields each side receives, routing, request validation.

Upstreams parse with h11 (tests/test_e2e_framing.py helpers); assertions are on the exact
field lines an upstream connection received and on what the client read back.
"""

from __future__ import annotations

import asyncio

import h11
import pytest

from tests.conftest import is_closed, make_config
from tests.test_e2e_framing import client, h11_upstream, header_values, parse_requests, recv

GET = b"GET %s HTTP/1.1\r\nHost: t.example\r\n\r\n"


async def one_request(start_proxy, upstream, request: bytes, **cfg) -> tuple[h11.Request, bytes]:
    """Send `request` through a fresh proxy; return what the upstream parsed (exactly one request)."""
    up = await upstream(h11_upstream())
    proxy = await start_proxy(make_config(up.port, **cfg))
    async with client(proxy.port) as (reader, writer):
        writer.write(request)
        status, _, body = await recv(reader)
        assert status == 200, body
    [(req, body)] = parse_requests(up.received[0])
    return req, body


def names(req: h11.Request) -> list[bytes]:
    return [n for n, _ in req.headers]


# -- what the upstream receives -------------------------------------------------------------------


async def test_host_kept_as_sent_and_forwarding_fields(start_proxy, upstream):
    req, _ = await one_request(
        start_proxy, upstream,
        b"GET /f?x=1 HTTP/1.1\r\nHost: Shop.Example:8080\r\nX-Real-IP: 6.6.6.6\r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-For: 9.9.9.9\r\n\r\n",
    )
    assert req.method == b"GET" and req.target == b"/f?x=1" and req.http_version == b"1.1"
    assert header_values(req, b"host") == [b"Shop.Example:8080"]
    assert header_values(req, b"x-real-ip") == [b"127.0.0.1"]
    assert header_values(req, b"x-forwarded-for") == [b"127.0.0.1"]  # no trusted_proxies: fresh
    assert header_values(req, b"x-forwarded-proto") == [b"http"]
    assert header_values(req, b"x-forwarded-host") == [b"Shop.Example:8080"]
    assert header_values(req, b"via") == [b"1.1 laneproxy"]


async def test_absolute_form_routes_on_path_and_replaces_host(start_proxy, upstream):
    up_x = await upstream(h11_upstream())
    up_other = await upstream(h11_upstream())
    cfg = make_config(
        {"x": [up_x.port], "other": [up_other.port]},
        routes=[{"prefix": "/x", "lane": "x"}, {"prefix": "/", "lane": "other"}],
    )
    proxy = await start_proxy(cfg)
    async with client(proxy.port) as (reader, writer):
        writer.write(b"GET http://example.com/x?q=1 HTTP/1.1\r\nHost: ignored.example\r\n\r\n")
        status, _, body = await recv(reader)
    assert (status, body) == (200, b"GET /x?q=1 body=0")
    assert up_other.connections == 0
    [(req, _)] = parse_requests(up_x.received[0])
    assert req.target == b"/x?q=1"
    assert header_values(req, b"host") == [b"example.com"]


async def test_x_forwarded_for_appended_for_trusted_peer(start_proxy, upstream):
    req, _ = await one_request(
        start_proxy, upstream,
        b"GET / HTTP/1.1\r\nHost: t.example\r\nX-Forwarded-For: 1.1.1.1\r\n"
        b"X-Forwarded-For: 2.2.2.2, 3.3.3.3\r\n\r\n",
        client={"trusted_proxies": ["127.0.0.0/8"]},
    )
    assert header_values(req, b"x-forwarded-for") == [b"1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1"]


async def test_x_forwarded_for_single_value_for_trusted_peer(start_proxy, upstream):
    req, _ = await one_request(
        start_proxy, upstream, b"GET / HTTP/1.1\r\nHost: t.example\r\nX-Forwarded-For: a\r\n\r\n",
        client={"trusted_proxies": ["127.0.0.0/8"]},
    )
    assert header_values(req, b"x-forwarded-for") == [b"a, 127.0.0.1"]


async def test_via_appended_after_client_via(start_proxy, upstream):
    req, _ = await one_request(
        start_proxy, upstream, b"GET / HTTP/1.1\r\nHost: t.example\r\nVia: 1.0 fred, 1.1 p.example\r\n\r\n"
    )
    assert header_values(req, b"via") == [b"1.0 fred, 1.1 p.example", b"1.1 laneproxy"]


async def test_hop_by_hop_fields_removed(start_proxy, upstream):
    req, _ = await one_request(
        start_proxy, upstream,
        b"GET / HTTP/1.1\r\nHost: t.example\r\nConnection: keep-alive, X-Foo\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\nUpgrade: foo/1\r\n"
        b"Proxy-Authorization: Basic c2VjcmV0\r\nX-Foo: secret\r\nX-Bar: kept\r\n\r\n",
    )
    for name in (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
                 b"proxy-authorization", b"x-foo"):
        assert name not in names(req), name
    assert header_values(req, b"x-bar") == [b"kept"]


async def test_h2c_upgrade_not_forwarded_and_connection_stays_http(start_proxy, upstream):
    up = await upstream(h11_upstream())
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(
            b"GET /h2c HTTP/1.1\r\nHost: t.example\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        )
        status, _, body = await recv(reader)
        assert (status, body) == (200, b"GET /h2c body=0")
        writer.write(GET % b"/after")
        assert (await recv(reader))[2] == b"GET /after body=0"
    reqs = parse_requests(up.received[0])
    assert [r.target for r, _ in reqs] == [b"/h2c", b"/after"]
    for name in (b"connection", b"upgrade", b"http2-settings"):
        assert name not in names(reqs[0][0]), name


async def test_connection_cannot_remove_laneproxy_own_fields(start_proxy, upstream):
    req, _ = await one_request(
        start_proxy, upstream,
        b"GET / HTTP/1.1\r\nHost: t.example\r\n"
        b"Connection: X-Forwarded-For, X-Real-IP, Via, X-Forwarded-Host, X-Forwarded-Proto\r\n\r\n",
    )
    assert header_values(req, b"x-forwarded-for") == [b"127.0.0.1"]
    assert header_values(req, b"x-real-ip") == [b"127.0.0.1"]
    assert header_values(req, b"via") == [b"1.1 laneproxy"]
    assert header_values(req, b"x-forwarded-host") == [b"t.example"]
    assert header_values(req, b"x-forwarded-proto") == [b"http"]


async def test_connection_named_x_forwarded_for_from_trusted_peer_is_removed_first(start_proxy, upstream):
    # interface.md: "Connection and every field it names" are removed, and that "happens before
    # laneproxy adds its own": the received X-Forwarded-For is gone, only the fresh one remains.
    req, _ = await one_request(
        start_proxy, upstream,
        b"GET / HTTP/1.1\r\nHost: t.example\r\nConnection: X-Forwarded-For\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
        client={"trusted_proxies": ["127.0.0.0/8"]},
    )
    assert header_values(req, b"x-forwarded-for") == [b"127.0.0.1"]


async def test_same_name_fields_keep_order(start_proxy, upstream):
    req, _ = await one_request(
        start_proxy, upstream,
        b"GET / HTTP/1.1\r\nHost: t.example\r\nX-A: 1\r\nX-B: b\r\nX-A: 2\r\nX-A: 3\r\n\r\n",
    )
    assert header_values(req, b"x-a") == [b"1", b"2", b"3"]
    custom = [(n, v) for n, v in req.headers if n in (b"x-a", b"x-b")]
    assert custom == [(b"x-a", b"1"), (b"x-b", b"b"), (b"x-a", b"2"), (b"x-a", b"3")]


async def test_underscore_fields_dropped(start_proxy, upstream):
    req, body = await one_request(
        start_proxy, upstream,
        b"POST / HTTP/1.1\r\nHost: t.example\r\nX_Foo: 1\r\nContent_Length: 5\r\nTransfer_Encoding: chunked\r\n"
        b"Content-Length: 2\r\n\r\nok",
    )
    assert body == b"ok"
    assert all(b"_" not in n for n in names(req)), names(req)
    assert header_values(req, b"content-length") == [b"2"]


# -- what the client receives -------------------------------------------------------------------


async def test_response_fields(start_proxy, upstream):
    head = (
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Path=/\r\nX-Other: x\r\nSet-Cookie: b=2\r\n"
        b"Connection: keep-alive, X-Up\r\nKeep-Alive: timeout=5, max=100\r\nX-Up: secret\r\n"
        b"Proxy-Connection: keep-alive\r\nX-Keep: 1\r\nContent-Length: 2\r\n\r\nok"
    )
    up = await upstream(h11_upstream(lambda req, body: head))
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(GET % b"/")
        raw_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"ok"
        writer.write(GET % b"/again")  # the upstream said keep-alive; so does laneproxy
        assert (await recv(reader))[2] == b"ok"
    lines = raw_head.split(b"\r\n")
    cookies = [line for line in lines if line.lower().startswith(b"set-cookie:")]
    assert cookies == [b"Set-Cookie: a=1; Path=/", b"Set-Cookie: b=2"]
    lower = raw_head.lower()
    for name in (b"connection:", b"keep-alive:", b"x-up:", b"proxy-connection:"):
        assert b"\r\n" + name not in lower, name
    assert b"\r\nX-Keep: 1\r\n" in raw_head and b"\r\nX-Other: x\r\n" in raw_head
    assert up.connections == 1


# -- routing ------------------------------------------------------------------------------------


async def test_strip_prefix(start_proxy, upstream):
    up = await upstream(h11_upstream())
    proxy = await start_proxy(make_config(up.port, routes=[{"prefix": "/api/", "lane": "app", "strip_prefix": True}]))
    async with client(proxy.port) as (reader, writer):
        for path in (b"/api/x?q=1", b"/api/", b"/api/a/b"):
            writer.write(GET % path)
            assert (await recv(reader))[0] == 200
    assert [r.target for r, _ in parse_requests(up.received[0])] == [b"/x?q=1", b"/", b"/a/b"]


async def test_longest_prefix_wins(start_proxy, upstream):
    ups = {name: await upstream(h11_upstream()) for name in ("root", "api", "v2")}
    cfg = make_config(
        {name: [u.port] for name, u in ups.items()},
        routes=[{"prefix": "/", "lane": "root"}, {"prefix": "/api", "lane": "api"},
                {"prefix": "/api/v2", "lane": "v2"}],
    )
    proxy = await start_proxy(cfg)
    paths = [b"/api/v2/users", b"/api/users", b"/apix", b"/x", b"/api/v", b"/api/v2"]
    async with client(proxy.port) as (reader, writer):
        for path in paths:
            writer.write(GET % path)
            assert (await recv(reader))[0] == 200
    got = {name: [r.target for raw in u.received for r, _ in parse_requests(raw)] for name, u in ups.items()}
    assert got == {
        "root": [b"/x"],
        "api": [b"/api/users", b"/apix", b"/api/v"],
        "v2": [b"/api/v2/users", b"/api/v2"],
    }


# -- request validation -------------------------------------------------------------------------

LONG_FIELD = b"X-Big: " + b"v" * 9000 + b"\r\n"
MANY_FIELDS = b"".join(b"X-F%d: v\r\n" % i for i in range(100))  # + Host = 101 fields

REJECTED = [
    ("missing-host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two-hosts", b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n", 400),
    ("host-with-space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    ("asterisk-get", b"GET * HTTP/1.1\r\nHost: t.example\r\n\r\n", 400),
    ("connect", b"CONNECT t.example:443 HTTP/1.1\r\nHost: t.example:443\r\n\r\n", 405),
    ("trace", b"TRACE / HTTP/1.1\r\nHost: t.example\r\n\r\n", 405),
    ("dot-dot", b"GET /pub/../admin HTTP/1.1\r\nHost: t.example\r\n\r\n", 400),
    ("encoded-dot-dot", b"GET /pub/%2e%2e/admin HTTP/1.1\r\nHost: t.example\r\n\r\n", 400),
    ("encoded-slash", b"GET /pub%2F..%2Fadmin HTTP/1.1\r\nHost: t.example\r\n\r\n", 400),
    ("cl-and-te", b"POST / HTTP/1.1\r\nHost: t.example\r\nContent-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-gzip-chunked", b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
     b"0\r\n\r\n", 501),
    ("te-on-http10", b"POST / HTTP/1.0\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("http2-request-line", b"GET / HTTP/2.0\r\nHost: t.example\r\n\r\n", 505),
    ("field-line-9000", b"GET / HTTP/1.1\r\nHost: t.example\r\n" + LONG_FIELD + b"\r\n", 431),
    ("101-fields", b"GET / HTTP/1.1\r\nHost: t.example\r\n" + MANY_FIELDS + b"\r\n", 431),
    ("request-line-9000", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t.example\r\n\r\n", 414),
]
# Malformed or ambiguous framing: the contract (and RFC 9112 §6.3) wants the connection closed.
MUST_CLOSE = {400, 414, 431, 501, 505}


@pytest.mark.parametrize("request_bytes, expected", [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED])
async def test_rejected_request(start_proxy, upstream, request_bytes, expected):
    up = await upstream(h11_upstream())
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(request_bytes)
        status, headers, body = await recv(reader)
        assert status == expected, body
        assert headers[b"content-type"][0].startswith(b"text/plain") and body.startswith(b"%d " % expected)
        if expected in MUST_CLOSE:
            assert headers.get(b"connection") == [b"close"]
            assert await is_closed(reader)
    async with client(proxy.port) as (reader, writer):
        writer.write(GET % b"/canary")
        assert (await recv(reader))[2] == b"GET /canary body=0"
    # The upstream saw the canary and nothing else.
    assert up.connections == 1
    assert [(r.method, r.target) for r, _ in parse_requests(up.received[0])] == [(b"GET", b"/canary")]


async def test_100_fields_accepted(start_proxy, upstream):
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(99))  # + Host = 100 fields
    req, _ = await one_request(start_proxy, upstream, b"GET / HTTP/1.1\r\nHost: t.example\r\n" + fields + b"\r\n")
    assert header_values(req, b"x-f98") == [b"v"]


async def test_each_pipelined_request_validated(start_proxy, upstream):
    """Host is checked on every request, not only the first one on the connection (a3 rule 3)."""
    up = await upstream(h11_upstream())
    proxy = await start_proxy(make_config(up.port))
    async with client(proxy.port) as (reader, writer):
        writer.write(GET % b"/ok" + b"GET /bad HTTP/1.1\r\nHost: a b\r\n\r\n")
        assert (await recv(reader))[2] == b"GET /ok body=0"
        assert (await recv(reader))[0] == 400
        assert await is_closed(reader)
    assert [r.target for r, _ in parse_requests(up.received[0])] == [b"/ok"]



async def test_laneproxy_own_answers_carry_date_and_server(start_proxy, upstream):
    """RFC 9110 §6.6.1: an origin (here laneproxy answering itself) with a clock sends Date."""
    import email.utils

    up = await upstream()
    proxy = await start_proxy(make_config(up.port, routes=[{"prefix": "/api", "lane": "app"}]))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if line)
    assert head.startswith(b"HTTP/1.1 404 ") and fields[b"Server"] == b"laneproxy"
    assert email.utils.parsedate_to_datetime(fields[b"Date"].decode()) is not None


async def test_options_max_forwards(start_proxy, upstream):
    """RFC 9110 §7.6.2: Max-Forwards 0 is answered by laneproxy; otherwise it goes out decremented."""
    up = await upstream()
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"OPTIONS * HTTP/1.1\r\nHost: t\r\nMax-Forwards: 0\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nAllow: " in head
    assert up.connections == 0  # not forwarded
    writer.write(b"OPTIONS /x HTTP/1.1\r\nHost: t\r\nMax-Forwards: 3\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"body=0\n"), 5)
    writer.close()
    seen = bytes(up.received[0])
    assert seen.startswith(b"OPTIONS /x HTTP/1.1\r\n") and b"\r\nMax-Forwards: 2\r\n" in seen
