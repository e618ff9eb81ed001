"""try_files through real sockets: files from root first, everything else to the lane."""

from __future__ import annotations

import asyncio
import gzip
import os
import socket
import time
from pathlib import Path

import pytest
import yaml

from laneproxy import static
from laneproxy.config import parse_config
from laneproxy.server import Proxy
from laneproxy.static_http import parse_http_date
from tests.conftest import exchange, make_config, open_client, read_response
from tests.process import rss_bytes, spawn_proxy, stop_proxy

MiB = 1024 * 1024
SECRET = b"TOP-SECRET-42-outside-root"
JS = b"export const answer = 42;\n" * 40


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.txt").write_bytes(SECRET)
    root = tmp_path / "public"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"hello from disk\n")
    (root / "sub").mkdir()
    (root / "sub" / "index.html").write_bytes(b"<p>sub index</p>\n")
    (root / "app.js").write_bytes(JS)
    (root / "app.js.gz").write_bytes(gzip.compress(JS))
    (root / "app.js.br").write_bytes(b"BROTLI-BYTES")
    (root / "only-gz.css").write_bytes(b"a{}\n")
    (root / "only-gz.css.gz").write_bytes(gzip.compress(b"a{}\n"))
    (root / "digits.bin").write_bytes(bytes(range(256)) * 4)
    (root / ".env").write_bytes(SECRET)
    (root / ".git").mkdir()
    (root / ".git" / "config").write_bytes(SECRET)
    (root / "link_out").symlink_to("../secret.txt")
    (root / "dirlink_out").symlink_to(tmp_path / "outside")
    (root / "link_etc").symlink_to("/etc")
    (root / "link_in").symlink_to("hello.txt")
    for ext in ("js", "mjs", "css", "html", "json", "svg", "wasm", "woff2", "webp", "avif", "map", "txt", "zzq"):
        (root / f"t.{ext}").write_bytes(b"x")
    return root


@pytest.fixture(scope="session")
def big_data() -> bytes:
    return os.urandom(3 * MiB + 12345)


@pytest.fixture
def big(site: Path, big_data: bytes) -> bytes:
    """site/big.bin: 3 MiB and a bit, random."""
    (site / "big.bin").write_bytes(big_data)
    return big_data


async def serve(start_proxy, upstream, root: Path, **route) -> tuple[int, object]:
    up = await upstream()
    cfg = make_config(up.port, routes=[{"prefix": "/", "lane": "app", "try_files": True, "root": str(root), **route}])
    proxy = await start_proxy(cfg)
    return proxy.port, up


def req(path: bytes, extra: bytes = b"", method: bytes = b"GET") -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (method, path, extra)


def upstream_saw(up) -> bytes:
    return b"".join(bytes(r) for r in up.received)


async def test_hit_is_served_from_disk(site, start_proxy, upstream):
    port, up = await serve(start_proxy, upstream, site)
    status, headers, body = await exchange(port, req(b"/hello.txt"))
    assert status == 200 and body == b"hello from disk\n"
    st = (site / "hello.txt").stat()
    assert headers[b"content-type"] == [b"text/plain; charset=utf-8"]
    assert headers[b"content-length"] == [b"16"]
    assert headers[b"accept-ranges"] == [b"bytes"]
    assert headers[b"server"] == [b"laneproxy"]
    assert headers[b"etag"] == [b'W/"%x-%x"' % (st.st_size, st.st_mtime_ns)]
    assert parse_http_date(headers[b"last-modified"][0]) == int(st.st_mtime)
    assert abs(parse_http_date(headers[b"date"][0]) - time.time()) < 3
    assert b"cache-control" not in headers and b"vary" not in headers
    assert up.connections == 0


async def test_miss_and_post_fall_through_to_the_lane(site, start_proxy, upstream):
    port, up = await serve(start_proxy, upstream, site)
    status, _, body = await exchange(port, req(b"/api/users?id=1"))
    assert status == 200 and body.startswith(b"GET /api/users?id=1 HTTP/1.1")
    status, _, body = await exchange(port, req(b"/hello.txt", b"Content-Length: 3\r\n", b"POST") + b"abc")
    assert status == 200 and body.startswith(b"POST /hello.txt HTTP/1.1 body=3")
    status, _, body = await exchange(port, req(b"/hello.txt", method=b"DELETE"))
    assert body.startswith(b"DELETE /hello.txt")
    status, _, body = await exchange(port, req(b"/sub"))  # a directory without index
    assert body.startswith(b"GET /sub HTTP/1.1")
    seen = upstream_saw(up)
    assert b"GET /api/users?id=1 HTTP/1.1" in seen and b"POST /hello.txt HTTP/1.1" in seen


async def test_keep_alive_and_pipelining_mix_files_and_lane(site, start_proxy, upstream):
    port, _ = await serve(start_proxy, upstream, site)
    reader, writer = await open_client(port)
    writer.write(req(b"/hello.txt") + req(b"/nope") + req(b"/hello.txt", method=b"HEAD") + req(b"/digits.bin"))
    assert (await read_response(reader))[2] == b"hello from disk\n"
    assert (await read_response(reader))[2].startswith(b"GET /nope")
    status, headers, _ = await read_response(reader, b"HEAD")
    assert status == 200 and headers[b"content-length"] == [b"16"]
    assert (await read_response(reader))[2] == bytes(range(256)) * 4  # no HEAD body in between
    writer.close()


async def test_http10_gets_connection_close(site, start_proxy, upstream):
    port, _ = await serve(start_proxy, upstream, site)
    reader, writer = await open_client(port)
    writer.write(b"GET /hello.txt HTTP/1.0\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 3)  # EOF: the proxy closed
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nConnection: close\r\n" in data
    assert data.endswith(b"\r\n\r\nhello from disk\n")
    writer.close()


async def test_conditional_requests(site, start_proxy, upstream):
    port, up = await serve(start_proxy, upstream, site)
    _, headers, _ = await exchange(port, req(b"/hello.txt"))
    etag, lm = headers[b"etag"][0], headers[b"last-modified"][0]
    reader, writer = await open_client(port)
    writer.write(req(b"/hello.txt", b"If-None-Match: " + etag + b"\r\n"))
    status, h304, body = await read_response(reader)
    assert status == 304 and body == b"" and h304[b"etag"] == [etag] and b"content-length" not in h304
    writer.write(req(b"/hello.txt", b"If-Modified-Since: " + lm + b"\r\n"))
    assert (await read_response(reader))[0] == 304
    writer.write(req(b"/hello.txt", b'If-None-Match: "other"\r\nIf-Modified-Since: ' + lm + b"\r\n"))
    status, _, body = await read_response(reader)  # If-None-Match wins over If-Modified-Since
    assert status == 200 and body == b"hello from disk\n"
    writer.write(req(b"/hello.txt", b"If-Modified-Since: Sat, 01 Jan 2000 00:00:00 GMT\r\n"))
    assert (await read_response(reader))[0] == 200
    writer.close()
    assert up.connections == 0


async def test_ranges(site, start_proxy, upstream):
    port, _ = await serve(start_proxy, upstream, site)
    data = bytes(range(256)) * 4
    reader, writer = await open_client(port)
    writer.write(req(b"/digits.bin", b"Range: bytes=10-19\r\n"))
    status, headers, body = await read_response(reader)
    assert status == 206 and body == data[10:20]
    assert headers[b"content-range"] == [b"bytes 10-19/1024"] and headers[b"content-length"] == [b"10"]
    writer.write(req(b"/digits.bin", b"Range: bytes=-4\r\n"))
    assert (await read_response(reader))[2] == data[-4:]
    writer.write(req(b"/digits.bin", b"Range: bytes=1000-\r\n"))
    assert (await read_response(reader))[2] == data[1000:]
    writer.write(req(b"/digits.bin", b"Range: bytes=2000-\r\n"))
    status, headers, _ = await read_response(reader)
    assert status == 416 and headers[b"content-range"] == [b"bytes */1024"]
    writer.write(req(b"/digits.bin", b"Range: bytes=0-1,5-6\r\n"))
    status, _, body = await read_response(reader)
    assert status == 200 and body == data
    _, first, _ = await exchange(port, req(b"/digits.bin"))
    # If-Range compares entity tags strongly (RFC 9110 §13.1.5): laneproxy's weak tag never
    # matches, so the whole file comes; the Last-Modified date does match.
    writer.write(req(b"/digits.bin", b"Range: bytes=0-1\r\nIf-Range: " + first[b"etag"][0] + b"\r\n"))
    status, _, body = await read_response(reader)
    assert status == 200 and body == data
    writer.write(req(b"/digits.bin", b"Range: bytes=0-1\r\nIf-Range: " + first[b"last-modified"][0] + b"\r\n"))
    assert (await read_response(reader))[0] == 206
    writer.write(req(b"/digits.bin", b'Range: bytes=0-1\r\nIf-Range: W/"stale"\r\n'))
    status, _, body = await read_response(reader)
    assert status == 200 and body == data
    writer.write(req(b"/digits.bin", b"Range: bytes=0-1\r\n", b"HEAD"))
    assert (await read_response(reader, b"HEAD"))[0] == 200
    writer.close()


async def test_head_has_headers_and_no_body(site, big, start_proxy, upstream):
    port, _ = await serve(start_proxy, upstream, site)
    reader, writer = await open_client(port)
    writer.write(req(b"/big.bin", method=b"HEAD"))
    status, headers, _ = await read_response(reader, b"HEAD")
    assert status == 200 and headers[b"content-length"] == [b"%d" % (3 * MiB + 12345)]
    writer.write(req(b"/hello.txt"))  # the next answer follows at once: nothing of big.bin between
    status, _, body = await read_response(reader)
    assert status == 200 and body == b"hello from disk\n"
    writer.close()


@pytest.mark.parametrize("name, ctype", [
    (b"t.js", b"text/javascript; charset=utf-8"),
    (b"t.mjs", b"text/javascript; charset=utf-8"),
    (b"t.css", b"text/css; charset=utf-8"),
    (b"t.html", b"text/html; charset=utf-8"),
    (b"t.json", b"application/json"),
    (b"t.svg", b"image/svg+xml"),
    (b"t.wasm", b"application/wasm"),
    (b"t.woff2", b"font/woff2"),
    (b"t.webp", b"image/webp"),
    (b"t.avif", b"image/avif"),
    (b"t.map", b"application/json"),
    (b"t.txt", b"text/plain; charset=utf-8"),
    (b"t.zzq", b"application/octet-stream"),
])
async def test_content_types(site, start_proxy, upstream, name, ctype):
    port, _ = await serve(start_proxy, upstream, site)
    status, headers, body = await exchange(port, req(b"/" + name))
    assert status == 200 and body == b"x" and headers[b"content-type"] == [ctype]


RAW_TRAVERSALS = [
    b"/../secret.txt",
    b"/sub/../../secret.txt",
    b"/..%2fsecret.txt",
    b"/%2e%2e/secret.txt",
    b"/%2E%2E%2Fsecret.txt",
    b"/.%2e/secret.txt",
    b"/%2e%2e//secret.txt",
    b"/%252e%252e/secret.txt",
    b"/%252e%252e%252fsecret.txt",
    b"/..\\secret.txt",
    b"/..%5csecret.txt",
    b"/hello.txt%00",
    b"/%00../secret.txt",
    b"//etc/passwd",
    b"/etc/passwd",
    b"http://t/../secret.txt",
    b"/%E2%80%A4%E2%80%A4/secret.txt",
    b"/%EF%BC%8E%EF%BC%8E/secret.txt",
    b"/%c0%ae%c0%ae/secret.txt",
    b"/..;/secret.txt",
    b"/.../secret.txt",
    b"/./link_out",
    b"/sub/./../../secret.txt",
    b"/link_out",
    b"/dirlink_out/x.txt",
    b"/link_etc/passwd",
    b"/link_etc/hostname",
    b"/.env",
    b"/%2eenv",
    b"/.git/config",
    b"/sub/..",
    b"/secret.txt",
]


@pytest.mark.parametrize("target", RAW_TRAVERSALS)
async def test_traversal_over_raw_socket(site, start_proxy, upstream, target):
    port, up = await serve(start_proxy, upstream, site)
    reader, writer = await open_client(port)
    writer.write(b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % target)
    raw = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    status = int(raw.split(b" ", 2)[1])
    body = raw.partition(b"\r\n\r\n")[2]
    assert status in (400, 404) or (status == 200 and body.startswith(b"GET /")), raw[:300]
    if status == 200:  # it fell through: the lane saw exactly this request
        assert b"GET %s HTTP/1.1" % body.split(b" ")[1] in upstream_saw(up)
    assert SECRET not in raw and b"root:" not in raw and SECRET not in upstream_saw(up)


async def test_symlink_escape_falls_through_but_inside_is_served(site, start_proxy, upstream):
    port, up = await serve(start_proxy, upstream, site)
    _, _, body = await exchange(port, req(b"/link_out"))
    assert body.startswith(b"GET /link_out HTTP/1.1")
    _, _, body = await exchange(port, req(b"/link_in"))
    assert body == b"hello from disk\n"


async def test_follow_symlinks_serves_links_out(site, start_proxy, upstream):
    port, _ = await serve(start_proxy, upstream, site, follow_symlinks=True)
    _, _, body = await exchange(port, req(b"/link_out"))
    assert body == SECRET  # the operator asked for it
    _, _, body = await exchange(port, req(b"/.env"))
    assert body.startswith(b"GET /.env")  # hidden stays hidden


async def test_hidden_files_fall_through_unless_serve_hidden(site, start_proxy, upstream):
    port, up = await serve(start_proxy, upstream, site)
    for path in (b"/.env", b"/.git/config"):
        status, _, body = await exchange(port, req(path))
        assert status == 200 and body.startswith(b"GET %s HTTP/1.1" % path)
    port, _ = await serve(start_proxy, upstream, site, serve_hidden=True)
    assert (await exchange(port, req(b"/.env")))[2] == SECRET


async def test_index(site, start_proxy, upstream):
    port, _ = await serve(start_proxy, upstream, site, index="index.html")
    status, headers, body = await exchange(port, req(b"/sub/"))
    assert body == b"<p>sub index</p>\n" and headers[b"content-type"] == [b"text/html; charset=utf-8"]
    assert (await exchange(port, req(b"/sub")))[2].startswith(b"GET /sub HTTP/1.1")
    assert (await exchange(port, req(b"/")))[2].startswith(b"GET / HTTP/1.1")  # no index.html at root


async def test_gzip_static(site, start_proxy, upstream):
    port, _ = await serve(start_proxy, upstream, site, gzip_static=True)
    status, headers, body = await exchange(port, req(b"/app.js", b"Accept-Encoding: gzip, deflate\r\n"))
    assert status == 200 and gzip.decompress(body) == JS
    assert headers[b"content-encoding"] == [b"gzip"] and headers[b"vary"] == [b"Accept-Encoding"]
    assert headers[b"content-type"] == [b"text/javascript; charset=utf-8"]
    _, headers, body = await exchange(port, req(b"/app.js", b"Accept-Encoding: gzip, br\r\n"))
    assert body == b"BROTLI-BYTES" and headers[b"content-encoding"] == [b"br"]
    for ae in (b"Accept-Encoding: gzip;q=0, br;q=0\r\n", b"Accept-Encoding: identity\r\n", b""):
        _, headers, body = await exchange(port, req(b"/app.js", ae))
        assert body == JS and b"content-encoding" not in headers and headers[b"vary"] == [b"Accept-Encoding"]
    _, headers, body = await exchange(port, req(b"/only-gz.css", b"Accept-Encoding: br, gzip\r\n"))
    assert gzip.decompress(body) == b"a{}\n" and headers[b"content-encoding"] == [b"gzip"]
    _, headers, body = await exchange(port, req(b"/hello.txt", b"Accept-Encoding: gzip\r\n"))
    assert body == b"hello from disk\n" and b"vary" not in headers  # no sibling, nothing varies
    # ranges apply to the representation served
    status, headers, body = await exchange(port, req(b"/app.js", b"Accept-Encoding: gzip\r\nRange: bytes=0-1\r\n"))
    assert status == 206 and body == b"\x1f\x8b" and headers[b"content-encoding"] == [b"gzip"]


async def test_gzip_static_off_serves_identity(site, start_proxy, upstream):
    port, _ = await serve(start_proxy, upstream, site)
    _, headers, body = await exchange(port, req(b"/app.js", b"Accept-Encoding: gzip, br\r\n"))
    assert body == JS and b"content-encoding" not in headers and b"vary" not in headers


async def test_expires(site, start_proxy, upstream):
    port, _ = await serve(start_proxy, upstream, site, expires="1h")
    _, headers, _ = await exchange(port, req(b"/hello.txt"))
    assert headers[b"cache-control"] == [b"max-age=3600"]
    assert abs(parse_http_date(headers[b"expires"][0]) - (time.time() + 3600)) < 3
    etag = headers[b"etag"][0]
    status, headers, _ = await exchange(port, req(b"/hello.txt", b"If-None-Match: " + etag + b"\r\n"))
    assert status == 304 and headers[b"cache-control"] == [b"max-age=3600"]


async def test_file_deleted_while_cached_is_not_served_stale(site, start_proxy, upstream, monkeypatch):
    monkeypatch.setattr(static, "CACHE_TTL", 0.3)
    port, _ = await serve(start_proxy, upstream, site)
    assert (await exchange(port, req(b"/hello.txt")))[2] == b"hello from disk\n"
    (site / "hello.txt").unlink()
    status, _, body = await exchange(port, req(b"/hello.txt"))  # find's cache still says "file"
    assert body != b"hello from disk\n"
    assert status == 404 or body.startswith(b"GET /hello.txt")
    await asyncio.sleep(static.CACHE_TTL + 0.1)
    assert (await exchange(port, req(b"/hello.txt")))[2].startswith(b"GET /hello.txt")


async def test_large_file_zero_copy_and_ranges(site, big, start_proxy, upstream, monkeypatch):
    calls = []
    real_sendfile = os.sendfile
    monkeypatch.setattr(os, "sendfile", lambda *a: calls.append(a[3]) or real_sendfile(*a))
    port, _ = await serve(start_proxy, upstream, site)
    data = big
    reader, writer = await open_client(port)
    writer.write(req(b"/big.bin"))
    assert (await read_response(reader))[2] == data
    writer.write(req(b"/big.bin", b"Range: bytes=100001-2500000\r\n"))
    status, _, body = await read_response(reader)
    assert status == 206 and body == data[100001:2500001]
    writer.close()
    assert calls, "uvloop: the body should go out with os.sendfile"


async def test_large_file_chunked_fallback(site, big, start_proxy, upstream, monkeypatch):
    monkeypatch.setattr(static, "_socket_fd", lambda transport: None)  # as on a TLS transport
    monkeypatch.setattr(os, "sendfile", None)
    port, _ = await serve(start_proxy, upstream, site)
    data = big
    reader, writer = await open_client(port)
    writer.write(req(b"/big.bin", b"Range: bytes=7-\r\n"))
    status, _, body = await read_response(reader)
    assert status == 206 and body == data[7:]
    writer.close()


async def test_slow_small_window_client_gets_every_byte_in_order(site, start_proxy, upstream, monkeypatch):
    reads = []
    real_read = static._read
    monkeypatch.setattr(static, "_read", lambda fd, n, off: reads.append(n) or real_read(fd, n, off))
    data = os.urandom(8 * MiB)
    (site / "eight.bin").write_bytes(data)
    port, _ = await serve(start_proxy, upstream, site)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024)
    writer.write(req(b"/eight.bin"))
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"Content-Length: %d" % len(data) in head
    got = bytearray()
    while len(got) < len(data):
        chunk = await reader.read(64 * 1024)
        assert chunk
        got += chunk
        if len(got) < MiB:
            await asyncio.sleep(0.002)
    assert got == data
    assert len(reads) > 0, "the socket filled: the rest should have gone through the buffered path"
    writer.close()


async def test_client_leaving_mid_file_does_not_hurt_the_next(site, start_proxy, upstream):
    (site / "huge.bin").write_bytes(b"")
    os.truncate(site / "huge.bin", 64 * MiB)
    port, _ = await serve(start_proxy, upstream, site)
    for _ in range(3):
        reader, writer = await open_client(port)
        writer.write(req(b"/huge.bin"))
        await reader.readexactly(100_000)
        writer.transport.abort()
    assert (await exchange(port, req(b"/hello.txt")))[2] == b"hello from disk\n"


def test_stdlib_asyncio_loop_uses_loop_sendfile(site, big, monkeypatch):
    """Off uvloop (plain asyncio), the body goes out with loop.sendfile."""
    calls = []
    real = asyncio.BaseEventLoop.sendfile

    async def spy(self, transport, file, offset=0, count=None, *, fallback=True):
        calls.append((offset, count))
        return await real(self, transport, file, offset, count, fallback=fallback)

    monkeypatch.setattr(asyncio.BaseEventLoop, "sendfile", spy)
    data = big

    async def main():
        cfg = make_config(9, routes=[{"prefix": "/", "lane": "app", "try_files": True, "root": str(site)}])
        proxy = Proxy(parse_config(yaml.safe_dump(cfg)))
        await proxy.start()
        try:
            reader, writer = await open_client(proxy.port)
            writer.write(req(b"/big.bin") + req(b"/big.bin", b"Range: bytes=5-70004\r\n"))
            full = await read_response(reader)
            part = await read_response(reader)
            writer.close()
            return full, part
        finally:
            await proxy.stop(drain_timeout=0.5)

    with asyncio.Runner() as runner:  # the default loop factory, not the suite's uvloop
        assert not type(runner.get_loop()).__module__.startswith("uvloop")
        (status, _, body), (pstatus, _, pbody) = runner.run(main())
    assert status == 200 and body == data
    assert pstatus == 206 and pbody == data[5:70005]
    assert calls == [(0, len(data)), (5, 70000)]


@pytest.mark.timeout(60)
async def test_200mib_sparse_file_to_slow_client_bounds_memory(tmp_path, upstream):
    root = tmp_path / "public"
    root.mkdir()
    total = 200 * MiB
    with (root / "sparse.bin").open("wb") as f:
        f.truncate(total)
    up = await upstream()
    cfg = make_config(up.port, routes=[{"prefix": "/", "lane": "app", "try_files": True, "root": str(root)}])
    proc, port = await spawn_proxy(tmp_path, cfg)
    try:
        base = rss_bytes(proc.pid)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=256 * 1024)
        writer.write(req(b"/sparse.bin"))
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"Content-Length: %d" % total in head
        got, peak, zeros = 0, base, bytes(256 * 1024)
        while got < total:
            data = await reader.read(256 * 1024)
            assert data, "proxy closed early"
            assert data == zeros[: len(data)]
            got += len(data)
            if got % (8 * MiB) < 256 * 1024:
                peak = max(peak, rss_bytes(proc.pid))
                await asyncio.sleep(0.03)  # a slow reader
        assert got == total
        growth = peak - base
        assert growth < 16 * MiB, f"proxy RSS grew by {growth / MiB:.1f} MiB"
        writer.close()
        assert up.connections == 0
    finally:
        assert await stop_proxy(proc) == 0
