"""Audit 11: static files (try_files) compared with nginx 1.22 over the same tree, end to end.

nginx ran `root R; location / { try_files $uri @app; }` (and `gzip_static on`, `index`) in front of
the same tree and upstream as laneproxy. Differences that README documents (dot files and symlinks
out of root fall through, other methods go to the lane, several ranges get the whole file, weak
ETags, 400 for dot segments and encoded separators, Range ignored on HEAD) are not tested here.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.conftest import exchange, open_client, read_response
from tests.test_e2e_static import req, serve
from tests.test_e2e_static import site as site  # noqa: F401 - the fixture, used by name

pytestmark = pytest.mark.timeout(30)

W = 5  # seconds: bound on every single wait
OLD = 1_000_000_000  # mtime of old.txt: Sun, 09 Sep 2001 01:46:40 GMT
OLD_LM = b"Sun, 09 Sep 2001 01:46:40 GMT"


@pytest.fixture
def tree(site: Path) -> Path:
    (site / "old.txt").write_bytes(b"old\n")
    os.utime(site / "old.txt", (OLD, OLD))
    (site / "empty.txt").write_bytes(b"")
    (site / "one.bin").write_bytes(b"A")
    for name in ("hash#x.txt", "q?x.txt", "semi;x.txt", "a+b.txt", "t.txt"):
        (site / name).write_bytes(name.encode())
    (site / "dir").mkdir()
    (site / "dir" / "f.txt").write_bytes(b"dir-f\n")
    os.mkfifo(site / "fifo")
    (site / "devnull").symlink_to("/dev/null")
    return site


async def get(port: int, path: bytes, extra: bytes = b"", method: bytes = b"GET"):
    return await asyncio.wait_for(exchange(port, req(path, extra, method), method), W)


# == findings ========================================================================================


async def test_suffix_range_on_an_empty_file_is_not_416(tree, start_proxy, upstream):
    # RFC 9110 §14.1.1: a suffix range with a non-zero length is satisfiable whatever the length, so
    # 416 ("no range overlaps", §15.5.17) is wrong; a zero-length file can only be sent whole (200).
    # nginx: 200 with the empty body. (bytes=0- on it is unsatisfiable: 416 there is right.)
    port, up = await serve(start_proxy, upstream, tree)
    for spec in (b"-1", b"-500"):
        status, headers, body = await get(port, b"/empty.txt", b"Range: bytes=%s\r\n" % spec)
        assert (status, body) == (200, b""), spec
        assert headers[b"content-length"] == [b"0"] and b"content-range" not in headers
    assert up.connections == 0


@pytest.mark.parametrize(
    "extra, want",
    [
        # §13.1.4: If-Unmodified-Since MUST be ignored unless it is a valid HTTP-date (always GMT,
        # §5.6.7). laneproxy applies the +0100 offset (00:46:40 GMT, before the mtime): 412. nginx: 200.
        (b"If-Unmodified-Since: Sun, 09 Sep 2001 01:46:40 +0100\r\n", 200),
        # §13.1.4: "...including when the field value appears to be a list of dates". laneproxy takes
        # the first date: 412 (nginx too).
        (b"If-Unmodified-Since: Sat, 08 Sep 2001 01:46:40 GMT, Mon, 10 Sep 2001 01:46:40 GMT\r\n", 200),
        # §13.1.3: If-Modified-Since with more than one member MUST be ignored. laneproxy: 304. nginx: 200.
        (b"If-Modified-Since: Mon, 10 Sep 2001 01:46:40 GMT, Sat, 08 Sep 2001 01:46:40 GMT\r\n", 200),
        # a two-digit year in the IMF-fixdate layout is none of the three formats. laneproxy: 304. nginx: 200.
        (b"If-Modified-Since: Sun, 09 Sep 01 01:46:40 GMT\r\n", 200),
        # §13.1.5: an If-Range date must exactly match Last-Modified, else the Range is ignored (200).
        # laneproxy: 206 for both (trailing junk and a numeric zone are dropped/applied). nginx: 206 / 200.
        (b"Range: bytes=0-0\r\nIf-Range: " + OLD_LM + b", x\r\n", 200),
        (b"Range: bytes=0-0\r\nIf-Range: Sun, 09 Sep 2001 02:46:40 +0100\r\n", 200),
    ],
    ids=["ius-zone", "ius-list", "ims-list", "ims-2digit-year", "if-range-junk", "if-range-zone"],
)
async def test_invalid_http_dates_are_ignored(tree, start_proxy, upstream, extra, want):
    port, _ = await serve(start_proxy, upstream, tree)
    status, _, body = await get(port, b"/old.txt", extra)
    assert (status, body) == (want, b"old\n")


# == agreements and RFC-correct differences not covered elsewhere ====================================


async def test_validators_of_old_file(tree, start_proxy, upstream):
    # the base the date tests stand on: Last-Modified is the file's mtime, exactly (nginx the same)
    port, _ = await serve(start_proxy, upstream, tree)
    status, headers, body = await get(port, b"/old.txt")
    assert (status, body) == (200, b"old\n") and headers[b"last-modified"] == [OLD_LM]
    status, _, _ = await get(port, b"/old.txt", b"If-Unmodified-Since: " + OLD_LM + b"\r\n")
    assert status == 200
    status, _, _ = await get(port, b"/old.txt", b"Range: bytes=0-0\r\nIf-Range: " + OLD_LM + b"\r\n")
    assert status == 206


async def test_if_match_star_skips_if_unmodified_since(tree, start_proxy, upstream):
    # RFC 9110 §13.2.2 step 2: If-Unmodified-Since is evaluated only when If-Match is absent.
    # laneproxy: 200. nginx 1.22: 412 (it checks both).
    port, _ = await serve(start_proxy, upstream, tree)
    status, _, body = await get(
        port, b"/old.txt", b"If-Match: *\r\nIf-Unmodified-Since: Sat, 01 Jan 2000 00:00:00 GMT\r\n"
    )
    assert (status, body) == (200, b"old\n")


@pytest.mark.parametrize("ius", [b"garbage", b"2001-09-09T01:46:40Z", b""])
async def test_invalid_if_unmodified_since_is_ignored(tree, start_proxy, upstream, ius):
    # RFC 9110 §13.1.4: an invalid date MUST be ignored. laneproxy: 200. nginx 1.22: 412.
    port, _ = await serve(start_proxy, upstream, tree)
    status, _, body = await get(port, b"/old.txt", b"If-Unmodified-Since: " + ius + b"\r\n")
    assert (status, body) == (200, b"old\n")


async def test_failed_precondition_wins_over_not_modified(tree, start_proxy, upstream):
    # RFC 9110 §13.2.2: steps 1-2 (If-Match / If-Unmodified-Since -> 412) come before step 3
    # (If-None-Match -> 304). nginx: 412 for both.
    port, _ = await serve(start_proxy, upstream, tree)
    _, headers, _ = await get(port, b"/old.txt")
    etag = headers[b"etag"][0]
    for extra in (
        b'If-Match: "nope"\r\nIf-None-Match: ' + etag + b"\r\n",
        b"If-Unmodified-Since: Sat, 01 Jan 2000 00:00:00 GMT\r\nIf-None-Match: " + etag + b"\r\n",
    ):
        for method in (b"GET", b"HEAD"):
            status, headers, body = await get(port, b"/old.txt", extra, method)
            assert status == 412, (extra, method)
            if method == b"HEAD":
                assert body == b""
            assert b"etag" not in headers and b"content-range" not in headers


async def test_not_modified_wins_over_range_and_unsatisfiable(tree, start_proxy, upstream):
    # RFC 9110 §13.2.2: step 3/4 (304) before step 5 (Range): a matching validator with a range past
    # the end is 304, not 416; with an old If-Modified-Since the 416 stands. nginx: the same.
    port, _ = await serve(start_proxy, upstream, tree)
    status, headers, body = await get(port, b"/old.txt", b"If-Modified-Since: " + OLD_LM + b"\r\nRange: bytes=99-\r\n")
    assert (status, body) == (304, b"") and b"content-range" not in headers
    status, headers, _ = await get(
        port, b"/old.txt", b"If-Modified-Since: Sat, 01 Jan 2000 00:00:00 GMT\r\nRange: bytes=99-\r\n"
    )
    assert status == 416 and headers[b"content-range"] == [b"bytes */4"]


@pytest.mark.parametrize(
    "path, spec, status, crange, body",
    [
        (b"/one.bin", b"0-0", 206, b"bytes 0-0/1", b"A"),
        (b"/one.bin", b"-1", 206, b"bytes 0-0/1", b"A"),
        (b"/one.bin", b"-5", 206, b"bytes 0-0/1", b"A"),  # suffix longer than the file: all of it
        (b"/one.bin", b"0-99", 206, b"bytes 0-0/1", b"A"),  # last-pos clamped
        (b"/one.bin", b"1-", 416, b"bytes */1", None),
        (b"/one.bin", b"-0", 416, b"bytes */1", None),
        (b"/empty.txt", b"5-", 416, b"bytes */0", None),
    ],
)
async def test_ranges_on_tiny_files(tree, start_proxy, upstream, path, spec, status, crange, body):
    # RFC 9110 §14.1.1 / §14.4 / §15.5.17; nginx answers each of these the same
    port, _ = await serve(start_proxy, upstream, tree)
    got, headers, data = await get(port, path, b"Range: bytes=%s\r\n" % spec)
    assert got == status and headers[b"content-range"] == [crange]
    if body is not None:
        assert data == body and headers[b"content-length"] == [b"%d" % len(body)]


async def test_reserved_characters_in_names_and_queries(tree, start_proxy, upstream):
    # nginx decodes %23 %3F %3B %2B once and ignores the query; laneproxy agrees
    port, up = await serve(start_proxy, upstream, tree)
    for target, name in [
        (b"/hash%23x.txt", b"hash#x.txt"),
        (b"/q%3Fx.txt", b"q?x.txt"),
        (b"/semi;x.txt", b"semi;x.txt"),
        (b"/semi%3Bx.txt", b"semi;x.txt"),
        (b"/a+b.txt", b"a+b.txt"),
        (b"/a%2Bb.txt", b"a+b.txt"),
        (b"/%74.txt", b"t.txt"),
        (b"/t.txt?x=/../../etc/passwd", b"t.txt"),
        (b"/t.txt?a=%2e%2e%2f", b"t.txt"),
        (b"/dir//f.txt", None),
        (b"//t.txt", b"t.txt"),
    ]:
        status, _, body = await get(port, target)
        assert (status, body) == (200, name if name is not None else b"dir-f\n"), target
    assert up.connections == 0


async def test_fifo_and_device_go_to_the_lane_promptly(tree, start_proxy, upstream):
    # README: only regular files are served. nginx answers 404 for both (it tries them); laneproxy
    # hands them to the lane, and never blocks opening the FIFO.
    port, up = await serve(start_proxy, upstream, tree)
    reader, writer = await open_client(port)
    try:
        for path in (b"/fifo", b"/devnull"):
            writer.write(req(path))
            status, _, body = await asyncio.wait_for(read_response(reader), W)
            assert status == 200 and body.startswith(b"GET %s HTTP/1.1" % path)
    finally:
        writer.close()
    assert up.connections >= 1


async def test_directory_without_slash_and_file_with_slash_go_to_the_lane(tree, start_proxy, upstream):
    # nginx with `try_files $uri @app`: /dir and /t.txt/ both reach @app (no 301, no file); laneproxy too
    port, up = await serve(start_proxy, upstream, tree)
    for path in (b"/dir", b"/t.txt/", b"/dir/f.txt/"):
        status, headers, body = await get(port, path)
        assert status == 200 and body.startswith(b"GET %s HTTP/1.1" % path), path
        assert b"location" not in headers
