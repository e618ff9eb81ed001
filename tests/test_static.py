"""Units of try_files: StaticFiles.find (traversal, symlinks, hidden names, directories, cache),
StaticFiles.respond against a recording writer (TOCTOU), and the pure HTTP rules in static_http."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from laneproxy.static import StaticFiles, split_path
from laneproxy.static_http import (
    UNSATISFIABLE,
    accepted_codings,
    content_type,
    evaluate,
    http_date,
    if_range_ok,
    make_etag,
    match_strong,
    match_weak,
    parse_http_date,
    parse_range,
)

SECRET = b"TOP-SECRET-outside-root\n"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/secret.txt (outside), tmp/outside/x.txt, tmp/public/... (the root)."""
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.txt").write_bytes(SECRET)
    root = tmp_path / "public"
    root.mkdir()
    (root / "a.txt").write_bytes(b"alpha\n")
    (root / "index.html").write_bytes(b"<h1>home</h1>\n")
    (root / "a b.txt").write_bytes(b"space\n")
    (root / "\u00fc.txt").write_bytes(b"umlaut\n")
    (root / "%2e%2e").write_bytes(b"a literal name\n")
    (root / "sub").mkdir()
    (root / "sub" / "b.css").write_bytes(b"b{}\n")
    (root / "sub" / "index.html").write_bytes(b"sub index\n")
    (root / "emptydir").mkdir()
    (root / ".env").write_bytes(b"PASSWORD=hunter2\n")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_bytes(b"[core]\n")
    (root / "a" / ".hidden").mkdir(parents=True)
    (root / "a" / ".hidden" / "b").write_bytes(b"hidden b\n")
    (root / "link_in").symlink_to("a.txt")
    (root / "dirlink_in").symlink_to("sub")
    (root / "link_out").symlink_to("../secret.txt")
    (root / "link_abs").symlink_to(tmp_path / "secret.txt")
    (root / "dirlink_out").symlink_to(tmp_path / "outside")
    (root / "link_etc").symlink_to("/etc")
    (root / "dangling").symlink_to("nowhere")
    os.mkfifo(root / "fifo")
    return root


def files(root: Path, **kw) -> StaticFiles:
    return StaticFiles(root, cache_ttl=0, **kw)


TRAVERSALS = [
    b"/../secret.txt",
    b"/sub/../../secret.txt",
    b"/..",
    b"/sub/..",
    b"/..%2fsecret.txt",
    b"/..%2Fsecret.txt",
    b"/%2e%2e/secret.txt",
    b"/%2E%2E/secret.txt",
    b"/%2e%2e%2fsecret.txt",
    b"/.%2e/secret.txt",
    b"/sub/%2e%2e/%2e%2e/secret.txt",
    b"/%252e%252e/secret.txt",  # double encoding: decoded once, a literal name
    b"/%252e%252e%252fsecret.txt",
    b"/..\\secret.txt",
    b"/..%5csecret.txt",
    b"/%2e%2e%5c..%5csecret.txt",
    b"/a.txt%00.html",
    b"/a.txt\x00",
    b"/%00/../secret.txt",
    b"//etc/passwd",
    b"/etc/passwd",
    b"etc/passwd",
    b"",
    b"/\xe2\x80\xa4\xe2\x80\xa4/secret.txt",  # U+2024 one dot leader, raw
    b"/%E2%80%A4%E2%80%A4/secret.txt",
    b"/%EF%BC%8E%EF%BC%8E/secret.txt",  # U+FF0E fullwidth full stop
    b"/%c0%ae%c0%ae/secret.txt",  # overlong UTF-8 '.'
    b"/.../secret.txt",
    b"/..;/secret.txt",
    b"/a.txt.",  # trailing dot (Windows would strip it)
    b"/a.txt/",
    b"/a.txt/.",
    b"/./a.txt",
    b"/sub/./b.css",
    b"/link_out",
    b"/link_abs",
    b"/dirlink_out/x.txt",
    b"/link_etc/passwd",
    b"/link_etc/hostname",
    b"/" + b"a" * 300,
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_traversal_never_leaves_root(tree: Path, path: bytes) -> None:
    assert files(tree).find(path) is None


def test_traversal_variants_are_many() -> None:
    assert len(TRAVERSALS) >= 20


@pytest.mark.parametrize("path, name", [
    (b"/a.txt", "a.txt"),
    (b"//a.txt", "a.txt"),
    (b"/sub//b.css", "sub/b.css"),
    (b"/a%20b.txt", "a b.txt"),
    (b"/%C3%BC.txt", "\u00fc.txt"),
    (b"/\xc3\xbc.txt", "\u00fc.txt"),
    (b"/%252e%252e", "%2e%2e"),  # decoded once: the literal file inside root, not '..'
    (b"/link_in", "link_in"),  # symlinks inside root are fine
    (b"/dirlink_in/b.css", "dirlink_in/b.css"),
])
def test_files_inside_root_are_found(tree: Path, path: bytes, name: str) -> None:
    found = files(tree).find(path)
    assert found == tree / name
    assert found.read_bytes()


@pytest.mark.parametrize("path", [b"/link_out", b"/link_abs", b"/dirlink_out/x.txt"])
def test_follow_symlinks_allows_links_out(tree: Path, path: bytes) -> None:
    found = files(tree, follow_symlinks=True).find(path)
    assert found is not None and found.read_bytes() == SECRET


def test_follow_symlinks_still_refuses_dot_segments(tree: Path) -> None:
    sf = files(tree, follow_symlinks=True, serve_hidden=True)
    for path in (b"/../secret.txt", b"/%2e%2e/secret.txt", b"/..%2fsecret.txt"):
        assert sf.find(path) is None


@pytest.mark.parametrize("path", [
    b"/.env", b"/%2eenv", b"/.git/config", b"/.git/", b"/a/.hidden/b", b"/a/%2ehidden/b", b"/.git",
])
def test_hidden_names_fall_through(tree: Path, path: bytes) -> None:
    assert files(tree).find(path) is None
    assert files(tree, index="index.html").find(path) is None


def test_serve_hidden_serves_dot_files(tree: Path) -> None:
    sf = files(tree, serve_hidden=True)
    assert sf.find(b"/.env") == tree / ".env"
    assert sf.find(b"/.git/config") == tree / ".git" / "config"
    assert sf.find(b"/a/.hidden/b") == tree / "a" / ".hidden" / "b"
    assert sf.find(b"/..") is None


def test_directories_fall_through_without_index(tree: Path) -> None:
    sf = files(tree)
    for path in (b"/", b"/sub", b"/sub/", b"/emptydir/"):
        assert sf.find(path) is None


def test_directories_with_index(tree: Path) -> None:
    sf = files(tree, index="index.html")
    assert sf.find(b"/") == tree / "index.html"
    assert sf.find(b"/sub/") == tree / "sub" / "index.html"
    assert sf.find(b"/sub") is None  # like nginx's index: only for URIs ending in '/'
    assert sf.find(b"/emptydir/") is None
    assert sf.find(b"/dirlink_in/") == tree / "dirlink_in" / "index.html"


def test_not_regular_or_missing_falls_through(tree: Path) -> None:
    sf = files(tree)
    for path in (b"/fifo", b"/dangling", b"/missing.txt", b"/sub/missing", b"/a.txt/x"):
        assert sf.find(path) is None


def test_unreadable_file_falls_through(tree: Path, monkeypatch) -> None:
    (tree / "locked.txt").write_bytes(b"x")
    (tree / "locked.txt").chmod(0)
    sf = files(tree)
    if os.geteuid() == 0:  # root reads everything: make the proxy's access check say no
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: not os.fsdecode(p).endswith("locked.txt")
                            and real_access(p, mode))
    assert sf.find(b"/locked.txt") is None
    assert sf.find(b"/a.txt") is not None


def test_split_path() -> None:
    assert split_path(b"/a//b/%41") == [b"a", b"b", b"A"]
    assert split_path(b"/") == []
    assert split_path(b"/a/%2e%2e") is None
    assert split_path(b"/a/%2f") is None
    assert split_path(b"/.x") is None
    assert split_path(b"/.x", serve_hidden=True) == [b".x"]


def test_cache_keeps_answers_for_its_ttl(tree: Path) -> None:
    sf = StaticFiles(tree, cache_ttl=0.2)
    assert sf.find(b"/late.txt") is None
    (tree / "late.txt").write_bytes(b"late")
    assert sf.find(b"/late.txt") is None  # the cached miss: no stat
    time.sleep(0.25)
    assert sf.find(b"/late.txt") == tree / "late.txt"


def test_root_given_through_a_symlink(tree: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(tree)
    sf = files(alias)
    assert sf.find(b"/a.txt") is not None
    assert sf.find(b"/link_out") is None


# -- respond against a recording writer ----------------------------------------------------------


class Recorder:
    transport = None  # bodies here stay under INLINE_MAX: no transport needed
    http11 = True
    is_closed = False

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass


async def respond(sf: StaticFiles, file: Path, method: bytes = b"GET", fields=None, keep_alive=True):
    out = Recorder()
    status = await sf.respond(out, file, method, fields or {}, keep_alive)
    head, _, body = bytes(out.data).partition(b"\r\n\r\n")
    return status, head, body


async def test_respond_serves_file(tree: Path) -> None:
    sf = files(tree)
    status, head, body = await respond(sf, sf.find(b"/a.txt"), keep_alive=False)
    assert status == 200 and body == b"alpha\n"
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    st = (tree / "a.txt").stat()
    assert b"\r\nETag: " + make_etag(6, st.st_mtime_ns) in head
    assert b"\r\nContent-Length: 6" in head and b"\r\nConnection: close" in head
    assert b"\r\nContent-Type: text/plain; charset=utf-8" in head


async def test_respond_refuses_symlink_swapped_in_after_find(tree: Path) -> None:
    sf = files(tree)
    found = sf.find(b"/a.txt")
    (tree / "a.txt").unlink()
    (tree / "a.txt").symlink_to(tree.parent / "secret.txt")  # the race find cannot see
    status, head, body = await respond(sf, found)
    assert status == 404 and SECRET not in body


async def test_respond_refuses_directory_swapped_in_after_find(tree: Path) -> None:
    sf = files(tree)
    found = sf.find(b"/a.txt")
    (tree / "a.txt").unlink()
    (tree / "a.txt").symlink_to(tree.parent / "outside")
    status, _, _ = await respond(sf, found)
    assert status == 404


async def test_respond_does_not_block_on_fifo_swapped_in(tree: Path) -> None:
    sf = files(tree)
    found = sf.find(b"/a.txt")
    (tree / "a.txt").unlink()
    os.mkfifo(tree / "a.txt")
    status, _, _ = await asyncio.wait_for(respond(sf, found), 2)
    assert status == 404


async def test_respond_404_when_file_vanished(tree: Path) -> None:
    sf = files(tree)
    found = sf.find(b"/a.txt")
    (tree / "a.txt").unlink()
    status, head, _ = await respond(sf, found, b"HEAD")
    assert status == 404 and b"Content-Length" in head


async def test_respond_gzip_sibling_outside_root_is_not_served(tree: Path) -> None:
    sf = files(tree, gzip_static=True)
    (tree / "a.txt.gz").symlink_to(tree.parent / "secret.txt")
    status, head, body = await respond(sf, sf.find(b"/a.txt"), fields={b"accept-encoding": b"gzip"})
    assert status == 200 and body == b"alpha\n" and b"Content-Encoding" not in head


async def test_respond_expires(tree: Path) -> None:
    sf = files(tree, expires=90.0)
    _, head, _ = await respond(sf, sf.find(b"/a.txt"))
    assert b"\r\nCache-Control: max-age=90\r\n" in head
    expires = parse_http_date(head.split(b"\r\nExpires: ")[1].split(b"\r\n")[0])
    assert abs(expires - (time.time() + 90)) < 3


# -- pure HTTP rules -------------------------------------------------------------------------------

ETAG = make_etag(1000, 1_700_000_000_123_456_789)
MTIME = 1_700_000_000
LM = http_date(MTIME)


def test_etag_format() -> None:
    assert make_etag(0x3e8, 0xABC) == b'W/"3e8-abc"'


def test_http_dates() -> None:
    assert http_date(784111777) == b"Sun, 06 Nov 1994 08:49:37 GMT"
    for value in (b"Sun, 06 Nov 1994 08:49:37 GMT", b"Sunday, 06-Nov-94 08:49:37 GMT", b"Sun Nov  6 08:49:37 1994"):
        assert parse_http_date(value) == 784111777
    for bad in (b"", b"yesterday", b"Sun, 99 Foo 1994", None):
        assert parse_http_date(bad) is None
    # RFC 9110 §5.6.7 / §13.1.3: only GMT HTTP-dates count; anything else is ignored.
    for bad in (b"Sun, 06 Nov 1994 08:49:37 +0100", b"Sun, 06 Nov 94 08:49:37 GMT", b"sun, 06 Nov 1994 08:49:37 GMT",
                b"Sun, 06 Nov 1994 08:49:37 GMT, Mon, 07 Nov 1994 08:49:37 GMT", b"Sun, 31 Nov 1994 08:49:37 GMT",
                b"Sun, 06 Nov 1994 24:00:00 GMT", b"Sun, 06 Nov 0000 08:49:37 GMT", b"Sun Nov 6 08:49:37 1994"):
        assert parse_http_date(bad) is None, bad


@pytest.mark.parametrize("name, ctype", [
    ("app.js", b"text/javascript; charset=utf-8"),
    ("mod.mjs", b"text/javascript; charset=utf-8"),
    ("s.CSS", b"text/css; charset=utf-8"),
    ("i.html", b"text/html; charset=utf-8"),
    ("d.json", b"application/json"),
    ("l.svg", b"image/svg+xml"),
    ("m.wasm", b"application/wasm"),
    ("f.woff2", b"font/woff2"),
    ("p.webp", b"image/webp"),
    ("p.avif", b"image/avif"),
    ("app.js.map", b"application/json"),
    ("r.txt", b"text/plain; charset=utf-8"),
    ("x.png", b"image/png"),
    ("noext", b"application/octet-stream"),
    ("weird.zzzq", b"application/octet-stream"),
    ("a.tar.gz", b"application/gzip"),
])
def test_content_type(name: str, ctype: bytes) -> None:
    assert content_type(name) == ctype


def test_if_none_match_weak_comparison() -> None:
    assert match_weak(b"*", ETAG)
    assert match_weak(ETAG, ETAG)
    assert match_weak(ETAG[2:], ETAG)  # the strong form matches weakly
    assert match_weak(b'"x", ' + ETAG + b' , "y"', ETAG)
    assert not match_weak(b'"x", W/"y"', ETAG)
    assert not match_weak(b"", ETAG)


def test_if_match_needs_strong_match() -> None:
    assert match_strong(b"*", ETAG)
    assert not match_strong(ETAG, ETAG)
    assert match_strong(b'"a", "b"', b'"b"')


@pytest.mark.parametrize("fields, expected", [
    ({}, (200, None)),
    ({b"if-none-match": ETAG}, (304, None)),
    ({b"if-none-match": b'"other", ' + ETAG}, (304, None)),
    ({b"if-none-match": b"*"}, (304, None)),
    ({b"if-none-match": b'"other"'}, (200, None)),
    ({b"if-modified-since": LM}, (304, None)),
    ({b"if-modified-since": http_date(MTIME + 60)}, (304, None)),
    ({b"if-modified-since": http_date(MTIME - 1)}, (200, None)),
    ({b"if-modified-since": b"garbage"}, (200, None)),
    # If-None-Match takes precedence over If-Modified-Since, both ways
    ({b"if-none-match": b'"other"', b"if-modified-since": http_date(MTIME + 60)}, (200, None)),
    ({b"if-none-match": ETAG, b"if-modified-since": http_date(MTIME - 60)}, (304, None)),
    ({b"if-match": b'"other"'}, (412, None)),
    ({b"if-match": ETAG}, (412, None)),  # weak tags never match strongly
    ({b"if-match": b"*"}, (200, None)),
    ({b"if-unmodified-since": http_date(MTIME - 1)}, (412, None)),
    ({b"if-unmodified-since": LM}, (200, None)),
    ({b"range": b"bytes=0-99"}, (206, (0, 99))),
    ({b"range": b"bytes=900-"}, (206, (900, 999))),
    ({b"range": b"bytes=-100"}, (206, (900, 999))),
    ({b"range": b"bytes=-5000"}, (206, (0, 999))),
    ({b"range": b"bytes=990-5000"}, (206, (990, 999))),
    ({b"range": b"bytes = 5-6"}, (206, (5, 6))),
    ({b"range": b"bytes=1000-"}, (416, None)),
    ({b"range": b"bytes=-0"}, (416, None)),
    ({b"range": b"bytes=0-1,5-6"}, (200, None)),  # multiple ranges: the whole file
    ({b"range": b"bytes=5-1"}, (200, None)),  # invalid: ignored
    ({b"range": b"bytes=a-b"}, (200, None)),
    ({b"range": b"items=0-1"}, (200, None)),
    ({b"range": b"bytes=0-1", b"if-range": ETAG}, (200, None)),  # weak: no strong match (§13.1.5)
    ({b"range": b"bytes=0-1", b"if-range": LM}, (206, (0, 1))),
    ({b"range": b"bytes=0-1", b"if-range": b'W/"stale"'}, (200, None)),
    ({b"range": b"bytes=0-1", b"if-range": http_date(MTIME - 1)}, (200, None)),
    ({b"range": b"bytes=0-1", b"if-none-match": ETAG}, (304, None)),
])
def test_evaluate(fields: dict, expected: tuple) -> None:
    assert evaluate(b"GET", fields, 1000, MTIME, ETAG) == expected


def test_range_ignored_for_head() -> None:
    assert evaluate(b"HEAD", {b"range": b"bytes=0-1"}, 1000, MTIME, ETAG) == (200, None)
    assert evaluate(b"HEAD", {b"if-none-match": ETAG}, 1000, MTIME, ETAG) == (304, None)


def test_parse_range_edges() -> None:
    assert parse_range(b"bytes=0-0", 1) == (0, 0)
    assert parse_range(b"bytes=0-", 0) == UNSATISFIABLE
    assert parse_range(b"bytes=-1", 0) is None  # a suffix of an empty file: all of it, 200 (RFC 9110 §14.1.1)
    assert parse_range(b"bytes=-0", 10) == UNSATISFIABLE
    assert parse_range(b"bytes=" + b"9" * 5000 + b"-", 10) == UNSATISFIABLE  # no int() blow-up
    assert parse_range(b"bytes=0-" + b"9" * 5000, 10) == (0, 9)
    assert parse_range(b"bytes=0-1,", 10) == (0, 1)  # empty list elements do not count
    assert parse_range(b"bytes=", 10) is None
    assert parse_range(b"bytes=-", 10) is None


def test_if_range() -> None:
    assert not if_range_ok(ETAG, ETAG, MTIME)  # a weak tag is never a strong match (RFC 9110 §13.1.5)
    assert if_range_ok(b'"strong"', b'"strong"', MTIME)
    assert not if_range_ok(b'"nope"', ETAG, MTIME)
    assert if_range_ok(LM, ETAG, MTIME)
    assert not if_range_ok(http_date(MTIME + 1), ETAG, MTIME)


@pytest.mark.parametrize("value, codings", [
    (None, []),
    (b"", []),
    (b"gzip", [b"gzip"]),
    (b"x-gzip", [b"gzip"]),
    (b"gzip, deflate, br", [b"br", b"gzip"]),
    (b"br;q=0.5, gzip", [b"gzip", b"br"]),
    (b"br;q=0, gzip;q=0", []),
    (b"gzip;q=0", []),
    (b"*", [b"br", b"gzip"]),
    (b"*;q=0.1, br;q=0", [b"gzip"]),
    (b"identity", []),
    (b"GZIP ; Q=1", [b"gzip"]),
    (b"gzip;q=bogus", []),
])
def test_accepted_codings(value: bytes | None, codings: list[bytes]) -> None:
    assert [c for c, _ in accepted_codings(value)] == codings
