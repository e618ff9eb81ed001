"""Audit 7: static-file negotiation/conditionals and Upgrade tunnel edges, end to end."""

from __future__ import annotations

import asyncio
import gzip
import time

import pytest

from laneproxy.static_http import parse_http_date
from tests.conftest import exchange, make_config, open_client, read_response
from tests.test_e2e_static import JS, req, serve
from tests.test_e2e_static import site as site  # noqa: F401 - the fixture, used by name
from tests.test_e2e_tunnel import ws_handshake

pytestmark = pytest.mark.timeout(30)

W = 5  # seconds: bound on every single wait


# -- static: Accept-Encoding negotiation ---------------------------------------------------------


@pytest.mark.parametrize(
    "ae, coding",
    [
        (b"gzip;q=1, br;q=0.5", b"gzip"),  # RFC 9110 12.5.3: higher q wins
        (b"br;q=0.2, gzip;q=0.8", b"gzip"),
        (b"*", b"br"),  # `*` covers every coding; br preferred on ties
        (b"*;q=0.5, gzip", b"gzip"),  # explicit gzip (1.0) beats * (0.5) for br
        (b"*, br;q=0", b"gzip"),  # br refused explicitly, * allows gzip
        (b"gzip;q=0", None),  # q=0 means "not acceptable" (nginx gzip_static.t)
        (b"GZIP", b"gzip"),  # coding names are case-insensitive
        (b"x-gzip", b"gzip"),  # RFC 9110 8.4.1.3: x-gzip is gzip
        (b"identity;q=0", None),  # no sibling acceptable: identity, never 406 (nginx)
        (b"*;q=0", None),
        (b"gzip;q=0.000", None),
        (b"br;q=0.001", b"br"),
    ],
)
async def test_accept_encoding_negotiation(site, start_proxy, upstream, ae, coding):
    port, _ = await serve(start_proxy, upstream, site, gzip_static=True)
    status, headers, body = await exchange(port, req(b"/app.js", b"Accept-Encoding: " + ae + b"\r\n"))
    assert status == 200
    assert headers.get(b"content-encoding") == ([coding] if coding else None)
    assert headers[b"vary"] == [b"Accept-Encoding"]  # the file has siblings: every answer varies
    expected = {b"gzip": gzip.compress(JS), b"br": b"BROTLI-BYTES", None: JS}[coding]
    if coding == b"gzip":
        assert gzip.decompress(body) == JS
    else:
        assert body == expected
    assert int(headers[b"content-length"][0]) == len(body)  # per representation
    assert headers[b"content-type"] == [b"text/javascript; charset=utf-8"]  # the original's type


async def test_etag_differs_per_representation_and_304_carries_vary(site, start_proxy, upstream):
    port, _ = await serve(start_proxy, upstream, site, gzip_static=True)
    _, h_id, _ = await exchange(port, req(b"/app.js"))
    _, h_gz, _ = await exchange(port, req(b"/app.js", b"Accept-Encoding: gzip\r\n"))
    _, h_br, _ = await exchange(port, req(b"/app.js", b"Accept-Encoding: br\r\n"))
    tags = {h_id[b"etag"][0], h_gz[b"etag"][0], h_br[b"etag"][0]}
    assert len(tags) == 3  # RFC 9110 8.8.3: a different representation needs a different tag
    # the gzip tag revalidates the gzip representation only
    status, headers, _ = await exchange(
        port, req(b"/app.js", b"Accept-Encoding: gzip\r\nIf-None-Match: " + h_gz[b"etag"][0] + b"\r\n")
    )
    assert status == 304 and headers[b"vary"] == [b"Accept-Encoding"]  # RFC 9110 15.4.5: 304 sends Vary
    assert headers[b"etag"] == h_gz[b"etag"] and headers.get(b"content-encoding") == [b"gzip"]
    status, headers, body = await exchange(port, req(b"/app.js", b"If-None-Match: " + h_gz[b"etag"][0] + b"\r\n"))
    assert status == 200 and body == JS and headers[b"vary"] == [b"Accept-Encoding"]


async def test_head_has_the_same_headers_as_get_for_compressed(site, start_proxy, upstream):
    port, _ = await serve(start_proxy, upstream, site, gzip_static=True, expires="1h")
    skip = {b"date", b"expires"}
    for ae in (b"Accept-Encoding: gzip\r\n", b"Accept-Encoding: br\r\n", b""):
        _, hg, _ = await exchange(port, req(b"/app.js", ae))
        status, hh, body = await exchange(port, req(b"/app.js", ae, b"HEAD"), b"HEAD")
        assert status == 200 and body == b""
        assert {k: v for k, v in hh.items() if k not in skip} == {k: v for k, v in hg.items() if k not in skip}


async def test_range_on_br_representation_has_vary_and_sizes_of_br(site, start_proxy, upstream):
    port, _ = await serve(start_proxy, upstream, site, gzip_static=True)
    status, headers, body = await exchange(port, req(b"/app.js", b"Accept-Encoding: br\r\nRange: bytes=-4\r\n"))
    assert status == 206 and body == b"YTES"
    assert headers[b"content-range"] == [b"bytes 8-11/12"]  # RFC 9110 14.4: of the selected representation
    assert headers[b"vary"] == [b"Accept-Encoding"] and headers[b"content-encoding"] == [b"br"]
    assert headers[b"content-type"] == [b"text/javascript; charset=utf-8"]


async def test_416_against_compressed_uses_its_size(site, start_proxy, upstream):
    port, _ = await serve(start_proxy, upstream, site, gzip_static=True)
    status, headers, _ = await exchange(port, req(b"/app.js", b"Accept-Encoding: br\r\nRange: bytes=12-\r\n"))
    assert status == 416 and headers[b"content-range"] == [b"bytes */12"]  # RFC 9110 15.5.17
    status, headers, _ = await exchange(port, req(b"/app.js", b"Range: bytes=12-\r\n"))
    assert status == 206  # the identity file is larger: same Range is satisfiable


async def test_416_for_a_file_with_siblings_has_vary(site, start_proxy, upstream):
    port, _ = await serve(start_proxy, upstream, site, gzip_static=True)
    status, headers, _ = await exchange(port, req(b"/app.js", b"Accept-Encoding: br\r\nRange: bytes=12-\r\n"))
    # RFC 9110 12.5.5: the answer (its Content-Range */size) was selected by Accept-Encoding
    assert status == 416 and headers.get(b"vary") == [b"Accept-Encoding"]


async def test_only_gz_sibling_vary_on_identity_request(site, start_proxy, upstream):
    port, _ = await serve(start_proxy, upstream, site, gzip_static=True)
    for ae in (b"", b"Accept-Encoding: br\r\n", b"Accept-Encoding: gzip;q=0\r\n"):
        status, headers, body = await exchange(port, req(b"/only-gz.css", ae))
        assert status == 200 and body == b"a{}\n" and headers[b"vary"] == [b"Accept-Encoding"]
        assert headers[b"content-type"] == [b"text/css; charset=utf-8"]


async def test_gz_file_requested_directly_is_gzip_type_without_encoding(site, start_proxy, upstream):
    port, _ = await serve(start_proxy, upstream, site, gzip_static=True)
    status, headers, body = await exchange(port, req(b"/app.js.gz", b"Accept-Encoding: gzip\r\n"))
    # nginx: /app.js.gz is an ordinary file: application/gzip (or x-gzip), no Content-Encoding
    assert status == 200 and gzip.decompress(body) == JS
    assert b"content-encoding" not in headers and headers[b"content-type"][0] in (
        b"application/gzip",
        b"application/x-gzip",
    )


# -- static: conditionals ------------------------------------------------------------------------


async def test_if_none_match_list_and_star(site, start_proxy, upstream):
    port, _ = await serve(start_proxy, upstream, site)
    _, headers, _ = await exchange(port, req(b"/hello.txt"))
    etag = headers[b"etag"][0]
    for inm in (b'"nope", ' + etag, etag + b', "nope"', b'"a","b",' + etag, b"*", etag[2:]):
        status, headers, body = await exchange(port, req(b"/hello.txt", b"If-None-Match: " + inm + b"\r\n"))
        assert (status, body) == (304, b""), inm  # RFC 9110 13.1.2 weak comparison, list, `*`
        assert headers[b"etag"] == [etag] and b"content-length" not in headers
    status, _, body = await exchange(port, req(b"/hello.txt", b'If-None-Match: "nope", W/"x"\r\n'))
    assert status == 200 and body == b"hello from disk\n"


@pytest.mark.parametrize("ims", [b"not a date", b"", b"Mon, 99 Foo 2024 25:61:61 GMT", b"0", b"1"])
async def test_if_modified_since_invalid_is_ignored(site, start_proxy, upstream, ims):
    port, _ = await serve(start_proxy, upstream, site)
    status, _, body = await exchange(port, req(b"/hello.txt", b"If-Modified-Since: " + ims + b"\r\n"))
    assert status == 200 and body == b"hello from disk\n"  # RFC 9110 13.1.3: invalid date is ignored


async def test_if_modified_since_exact_and_older(site, start_proxy, upstream):
    port, _ = await serve(start_proxy, upstream, site)
    _, headers, _ = await exchange(port, req(b"/hello.txt"))
    lm = headers[b"last-modified"][0]
    status, _, _ = await exchange(port, req(b"/hello.txt", b"If-Modified-Since: " + lm + b"\r\n"))
    assert status == 304  # nginx not_modified.t
    status, _, _ = await exchange(port, req(b"/hello.txt", b"If-Modified-Since: Mon, 01 Jan 1990 00:00:00 GMT\r\n"))
    assert status == 200


async def test_304_headers_keep_cache_fields_and_no_body_headers(site, start_proxy, upstream):
    port, _ = await serve(start_proxy, upstream, site, expires="10m", gzip_static=True)
    _, headers, _ = await exchange(port, req(b"/app.js", b"Accept-Encoding: gzip\r\n"))
    reader, writer = await open_client(port)
    try:
        writer.write(req(b"/app.js", b"Accept-Encoding: gzip\r\nIf-None-Match: " + headers[b"etag"][0] + b"\r\n"))
        writer.write(req(b"/hello.txt"))  # keep-alive: 304 has no body, next answer follows
        status, h304, _ = await asyncio.wait_for(read_response(reader), W)
        assert status == 304 and h304[b"cache-control"] == [b"max-age=600"] and b"expires" in h304
        assert h304[b"vary"] == [b"Accept-Encoding"] and b"content-length" not in h304
        status, _, body = await asyncio.wait_for(read_response(reader), W)
        assert status == 200 and body == b"hello from disk\n"
    finally:
        writer.close()


# -- static: expires -----------------------------------------------------------------------------


@pytest.mark.parametrize("expires, age", [("30s", 30), ("2d", 172800), ("1h", 3600)])
async def test_expires_values(site, start_proxy, upstream, expires, age):
    port, _ = await serve(start_proxy, upstream, site, expires=expires)
    _, headers, _ = await exchange(port, req(b"/hello.txt"))
    assert headers[b"cache-control"] == [b"max-age=%d" % age]  # nginx `expires N`
    exp = parse_http_date(headers[b"expires"][0])
    assert abs(exp - (time.time() + age)) < 3


async def test_expires_on_206_and_not_on_lane_answers(site, start_proxy, upstream):
    port, _ = await serve(start_proxy, upstream, site, expires="1h")
    status, headers, _ = await exchange(port, req(b"/digits.bin", b"Range: bytes=0-0\r\n"))
    assert status == 206 and headers[b"cache-control"] == [b"max-age=3600"]
    status, headers, _ = await exchange(port, req(b"/missing"))
    assert status == 200 and b"cache-control" not in headers and b"expires" not in headers


# -- static: paths -------------------------------------------------------------------------------


async def test_percent_encoded_names(site, start_proxy, upstream):
    (site / "a b.txt").write_bytes(b"space\n")
    (site / "caf\u00e9.txt").write_bytes(b"utf8\n")
    (site / "100%.txt").write_bytes(b"pct\n")
    port, up = await serve(start_proxy, upstream, site)
    assert (await exchange(port, req(b"/a%20b.txt")))[2] == b"space\n"  # nginx decodes %20
    assert (await exchange(port, req(b"/caf%C3%A9.txt")))[2] == b"utf8\n"
    assert (await exchange(port, req(b"/100%25.txt")))[2] == b"pct\n"
    assert (await exchange(port, req(b"/hello%2etxt")))[0] == 400  # README table: %2e in the target is 400
    assert (await exchange(port, req(b"/hello.txt?x=1")))[2] == b"hello from disk\n"  # query ignored
    # decoded once: %2520 is a literal "%20" in the name, which does not exist
    status, _, body = await exchange(port, req(b"/a%2520b.txt"))
    assert body.startswith(b"GET /a%2520b.txt")


async def test_file_named_like_a_directory_falls_through(site, start_proxy, upstream):
    port, up = await serve(start_proxy, upstream, site)
    status, _, body = await exchange(port, req(b"/hello.txt/"))
    assert status == 200 and body.startswith(b"GET /hello.txt/ HTTP/1.1")  # ENOTDIR: a miss (nginx 404/@app)
    status, _, body = await exchange(port, req(b"/hello.txt/x"))
    assert body.startswith(b"GET /hello.txt/x HTTP/1.1")


async def test_symlinked_dir_inside_root_then_out(site, start_proxy, upstream):
    (site / "subln").symlink_to("sub")
    (site / "sub" / "up").symlink_to("../../secret.txt")
    port, up = await serve(start_proxy, upstream, site)
    assert (await exchange(port, req(b"/subln/index.html")))[2] == b"<p>sub index</p>\n"
    status, _, body = await exchange(port, req(b"/sub/up"))
    assert b"TOP-SECRET" not in body and body.startswith(b"GET /sub/up")  # README: symlinks out fall through
    status, _, body = await exchange(port, req(b"/dirlink_out/x.txt"))
    assert b"TOP-SECRET" not in body


@pytest.mark.parametrize(
    "target",
    [
        b"/sub/..%2f..%2fsecret.txt",
        b"/%2e%2e/secret.txt",
        b"/sub/%2e%2e/%2e%2e/secret.txt",
        b"/..%5csecret.txt",
        b"//../secret.txt",
        b"/sub/../../secret.txt",
    ],
)
async def test_dot_dot_never_escapes(site, start_proxy, upstream, target):
    port, _ = await serve(start_proxy, upstream, site)
    try:
        status, _, body = await exchange(port, req(target))
    except (asyncio.IncompleteReadError, ConnectionError):
        return
    assert b"TOP-SECRET" not in body


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"])
async def test_other_methods_on_a_file_go_to_the_lane(site, start_proxy, upstream, method):
    port, up = await serve(start_proxy, upstream, site)
    extra = b"Content-Length: 0\r\n" if method in (b"POST", b"PUT", b"PATCH") else b""
    status, _, body = await exchange(port, req(b"/hello.txt", extra, method))
    # README: "GET and HEAD only; other methods go to the lane"
    assert status == 200 and body.startswith(method + b" /hello.txt HTTP/1.1")


# -- tunnels -------------------------------------------------------------------------------------

SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
)


async def _open_tunnel(port: int, extra: bytes = b""):
    reader, writer = await open_client(port)
    writer.write(ws_handshake(extra=extra))
    status, headers, _ = await asyncio.wait_for(read_response(reader), W)
    assert status == 101
    return reader, writer, headers


async def test_101_relays_upstream_headers(start_proxy, upstream):
    async def h(reader, writer, up):
        await reader.read_request()
        writer.write(
            SWITCH + b"Sec-WebSocket-Protocol: chat\r\nX-Custom: 1\r\n"
            b"Set-Cookie: a=b\r\n\r\n"
        )
        await writer.drain()
        await reader.read()

    up = await upstream(h)
    proxy = await start_proxy(make_config(up.port))
    reader, writer, headers = await _open_tunnel(proxy.port, b"Sec-WebSocket-Protocol: chat\r\n")
    assert headers[b"sec-websocket-accept"] == [b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="]
    assert headers[b"sec-websocket-protocol"] == [b"chat"]
    assert headers[b"x-custom"] == [b"1"] and headers[b"set-cookie"] == [b"a=b"]
    assert headers[b"upgrade"] == [b"websocket"] and headers[b"connection"][0].lower() == b"upgrade"
    assert b"content-length" not in headers and b"transfer-encoding" not in headers
    sent = bytes(up.received[0])
    assert b"sec-websocket-protocol: chat" in sent.lower() and b"sec-websocket-key" in sent.lower()
    writer.close()


async def test_data_both_ways_without_delay(start_proxy, upstream):
    async def echo(reader, writer, up):
        await reader.read_request()
        writer.write(SWITCH + b"\r\n")
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()

    up = await upstream(echo)
    proxy = await start_proxy(make_config(up.port))
    reader, writer, _ = await _open_tunnel(proxy.port)
    loop = asyncio.get_running_loop()
    for i in range(20):
        t = loop.time()
        writer.write(b"ping%02d" % i)
        assert await asyncio.wait_for(reader.readexactly(6), W) == b"PING%02d" % i
        assert loop.time() - t < 0.05  # no Nagle/batching delay (README: raw two-way tunnel)
    writer.close()


async def test_upstream_half_close_client_keeps_sending(start_proxy, upstream):
    got = asyncio.get_running_loop().create_future()

    async def h(reader, writer, up):
        await reader.read_request()
        writer.write(SWITCH + b"\r\nbye")
        await writer.drain()
        writer.write_eof()  # upstream done writing; still reading
        data = b""
        while chunk := await reader.read(65536):
            data += chunk
        got.set_result(data)

    up = await upstream(h)
    proxy = await start_proxy(make_config(up.port))
    reader, writer, _ = await _open_tunnel(proxy.port)
    assert await asyncio.wait_for(reader.read(), W) == b"bye"  # README: half-closes passed on
    await asyncio.sleep(0.1)
    writer.write(b"late data after upstream FIN")
    await writer.drain()
    writer.write_eof()
    assert await asyncio.wait_for(got, W) == b"late data after upstream FIN"
    writer.close()


async def test_client_half_close_upstream_streams_long_answer(start_proxy, upstream):
    big = bytes(range(256)) * 8192  # 2 MiB after the client's FIN

    async def h(reader, writer, up):
        await reader.read_request()
        writer.write(SWITCH + b"\r\n")
        await writer.drain()
        assert await reader.read() == b"req"
        for i in range(0, len(big), 65536):
            writer.write(big[i : i + 65536])
            await writer.drain()
            await asyncio.sleep(0)
        writer.write_eof()

    up = await upstream(h)
    proxy = await start_proxy(make_config(up.port))
    reader, writer, _ = await _open_tunnel(proxy.port)
    writer.write(b"req")
    writer.write_eof()
    data = b""
    while len(data) < len(big):
        chunk = await asyncio.wait_for(reader.read(1 << 20), W)
        if not chunk:
            break
        data += chunk
    assert data == big
    assert await asyncio.wait_for(reader.read(), W) == b""
    writer.close()


async def test_client_flood_to_non_reading_upstream_is_backpressured(start_proxy, upstream):
    release = asyncio.Event()
    total = []

    async def h(reader, writer, up):
        await reader.read_request()
        writer.write(SWITCH + b"\r\n")
        await writer.drain()
        await release.wait()
        n = 0
        while chunk := await reader.read(1 << 20):
            n += len(chunk)
        total.append(n)

    up = await upstream(h)
    proxy = await start_proxy(make_config(up.port))
    reader, writer, _ = await _open_tunnel(proxy.port)
    block = b"x" * (1 << 20)
    sent = 0
    blocked = False
    for _ in range(64):
        writer.write(block)
        sent += len(block)
        try:
            await asyncio.wait_for(writer.drain(), 0.5)
        except TimeoutError:
            blocked = True
            break
    assert blocked, (
        "proxy absorbed 64 MiB from the client while the upstream read nothing"
    )  # README: crossed backpressure
    release.set()
    writer.write_eof()
    await asyncio.wait_for(writer.drain(), W)
    for _ in range(100):
        if total:
            break
        await asyncio.sleep(0.05)
    assert total == [sent]
    writer.close()


async def test_limit_streams_holds_slot_for_tunnel_life_then_frees_it(start_proxy, upstream):
    async def h(reader, writer, up):
        head, _, _ = await reader.read_request()
        if b"upgrade" in head.lower():
            writer.write(SWITCH + b"\r\n")
            await writer.drain()
            await reader.read()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    up = await upstream(h)
    proxy = await start_proxy(make_config(up.port, lane={"limit": 1, "queue": 0}))
    reader, writer, _ = await _open_tunnel(proxy.port)
    status, headers, _ = await asyncio.wait_for(exchange(proxy.port, b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"), W)
    assert status == 503  # README: limit_streams keeps a tunnel's lane slot until it ends
    writer.close()
    lane = proxy.lanes["app"]
    for _ in range(100):
        if lane.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert lane.in_flight == 0 and proxy.ctx.tunnels == 0
    status, _, body = await asyncio.wait_for(exchange(proxy.port, b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"), W)
    assert (status, body) == (200, b"ok")


async def test_limit_streams_slot_freed_after_idle_timeout(start_proxy, upstream):
    async def h(reader, writer, up):
        head, _, _ = await reader.read_request()
        if b"upgrade" in head.lower():
            writer.write(SWITCH + b"\r\n")
            await writer.drain()
            await reader.read()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    up = await upstream(h)
    proxy = await start_proxy(make_config(up.port, lane={"limit": 1, "queue": 0, "tunnel_idle_timeout": "300ms"}))
    reader, writer, _ = await _open_tunnel(proxy.port)
    assert await asyncio.wait_for(reader.read(), W) == b""  # tunnel_idle_timeout closes the client
    await asyncio.sleep(0.05)
    status, _, body = await asyncio.wait_for(exchange(proxy.port, b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"), W)
    assert (status, body) == (200, b"ok")
    writer.close()


async def test_one_way_traffic_keeps_tunnel_alive(start_proxy, upstream):
    async def h(reader, writer, up):
        await reader.read_request()
        writer.write(SWITCH + b"\r\n")
        await writer.drain()
        await reader.read()

    up = await upstream(h)
    proxy = await start_proxy(make_config(up.port, lane={"tunnel_idle_timeout": "300ms"}))
    reader, writer, _ = await _open_tunnel(proxy.port)
    for _ in range(8):  # 1.2 s of client->upstream bytes only
        writer.write(b".")
        await writer.drain()
        await asyncio.sleep(0.15)
    assert not reader.at_eof() and proxy.ctx.tunnels == 1  # README: idle = no byte *either* way
    assert await asyncio.wait_for(reader.read(), W) == b""
    writer.close()
