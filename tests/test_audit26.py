"""Audit 26: static responses (try_files) checked against RFC 9110 itself, end to end.

Not a differential: every expectation comes from an oracle written here from the RFC text,
§8.8 validators, §13.1 preconditions, the §13.2.2 evaluation order, §14 ranges, §15.3.7 (206),
§15.4.5 (304), §15.5.17 (416) and §9.3.2 (HEAD). The combinations of If-Match, If-Unmodified-Since,
If-None-Match, If-Modified-Since, Range and If-Range go through real sockets, pipelined on one
keep-alive connection, so a body wrongly sent after a HEAD or a 304 breaks the framing of the next
response and is caught.

laneproxy's documented policies (README "Static files"), asserted as such:
- the ETag is always weak, so If-Match (strong comparison, §13.1.1) only passes with `*`, and an
  If-Range entity tag never matches (§13.1.5);
- several ranges get the whole file (200), as §14.2 allows a server to ignore Range;
- a suffix range on an empty file gets the (empty) whole file, 200 (tested in audit 11).

Two findings, fixed: a file modified in the future got a Last-Modified later than Date
(§8.8.2.1: now the Date), and an If-Range date matched such a Last-Modified, which is no strong
validator (§8.8.2.2). A file changed in the current second still counts as strong, as in nginx.
"""

from __future__ import annotations

import asyncio
import calendar
import os
import re
import time
from email.utils import formatdate, parsedate_to_datetime
from itertools import product
from pathlib import Path

import pytest

from tests.conftest import make_config

pytestmark = pytest.mark.timeout(60)

W = 5  # seconds: bound on every single wait
MTIME = 1_600_000_000
LM = b"Sun, 13 Sep 2020 12:26:40 GMT"  # formatdate(MTIME, usegmt=True)
EARLIER = b"Sat, 12 Sep 2020 12:26:40 GMT"
LATER = b"Mon, 14 Sep 2020 12:26:40 GMT"
LM_RFC850 = b"Sunday, 13-Sep-20 12:26:40 GMT"
LM_ASCTIME = b"Sun Sep 13 12:26:40 2020"
BODY = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" * 2  # 124 bytes
N = len(BODY)
BIG = bytes((i * 7 + i // 251) % 256 for i in range(200_000))  # > 64 KiB: the sendfile path
AGE = 60  # route `expires`, so 304 must repeat Cache-Control and Expires (§15.4.5)

# RFC 9110 §8.8.3: entity-tag = [ weak ] opaque-tag; opaque-tag = DQUOTE *etagc DQUOTE
_ETAG = re.compile(rb'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"')


# == the oracle (RFC 9110, written from the text, not from laneproxy) ================================


def parse_etags(value: bytes) -> list[tuple[bool, bytes]] | None:
    """A #entity-tag list → [(weak, opaque)], None when it is not valid (§5.6.1: empty elements ok)."""
    tags = []
    for item in value.split(b","):
        item = item.strip(b" \t")
        if not item:
            continue
        m = _ETAG.fullmatch(item)
        if m is None:
            return None
        tags.append((m[1] is not None, m[2]))
    return tags


def strong_match(value: bytes, etag: bytes) -> bool:
    """If-Match (§13.1.1): `*` (the file exists), or a listed tag equal by strong comparison (§8.8.3.2)."""
    if value.strip() == b"*":
        return True
    ours = _ETAG.fullmatch(etag)
    tags = parse_etags(value) or []
    return ours[1] is None and any(not weak and opaque == ours[2] for weak, opaque in tags)


def weak_match(value: bytes, etag: bytes) -> bool:
    """If-None-Match (§13.1.2): `*`, or a listed tag equal by weak comparison (opaque tags only)."""
    if value.strip() == b"*":
        return True
    ours = _ETAG.fullmatch(etag)[2]
    return any(opaque == ours for _, opaque in parse_etags(value) or [])


_MON = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_DATE_FORMS = (  # §5.6.7: IMF-fixdate, obsolete RFC 850, obsolete asctime; case-sensitive, GMT only
    re.compile(rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), (?P<d>[0-9]{2}) (?P<m>[A-Z][a-z]{2}) (?P<y>[0-9]{4}) "
               rb"(?P<t>[0-9]{2}:[0-9]{2}:[0-9]{2}) GMT"),
    re.compile(rb"(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day, (?P<d>[0-9]{2})-(?P<m>[A-Z][a-z]{2})-(?P<y>[0-9]{2}) "
               rb"(?P<t>[0-9]{2}:[0-9]{2}:[0-9]{2}) GMT"),
    re.compile(rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) (?P<m>[A-Z][a-z]{2}) (?P<d>[0-9 ][0-9]) "
               rb"(?P<t>[0-9]{2}:[0-9]{2}:[0-9]{2}) (?P<y>[0-9]{4})"),
)


def http_date(value: bytes) -> int | None:
    """An HTTP-date → Unix seconds; anything else (other zones, lists, lower case) → None."""
    for form in _DATE_FORMS:
        m = form.fullmatch(value.strip(b" \t"))
        if m is None or m["m"].decode() not in _MON:
            continue
        year = int(m["y"]) + (2000 if len(m["y"]) == 2 else 0)  # our test dates are all 20xx
        hh, mm, ss = (int(x) for x in m["t"].split(b":"))
        return calendar.timegm((year, _MON.index(m["m"].decode()) + 1, int(m["d"]), hh, mm, ss, 0, 0, 0))
    return None


def expected_range(spec: bytes, size: int) -> tuple[int, int] | int | None:
    """§14.1.2 for ONE byte-range-spec; several specs → None (README: the whole file, §14.2 allows).
    Returns (first, last), 416, or None (ignore Range: invalid syntax, other unit, several ranges)."""
    unit, eq, rest = spec.partition(b"=")
    if not eq or unit.lower() != b"bytes":  # §14.1: range units are case-insensitive
        return None
    specs = [s.strip(b" \t") for s in rest.split(b",") if s.strip(b" \t")]
    if len(specs) != 1:
        return None
    m = re.fullmatch(rb"([0-9]*)-([0-9]*)", specs[0])
    if m is None or (not m[1] and not m[2]):
        return None
    if not m[1]:  # suffix-range: satisfiable iff suffix-length > 0 (§14.1.1)
        n = int(m[2])
        if n == 0:
            return 416
        return (max(0, size - n), size - 1) if size else None  # empty file: sent whole (README)
    first = int(m[1])
    if m[2] and int(m[2]) < first:
        return None  # invalid byte-range-spec (§14.1.1): the server may ignore the Range
    if first >= size:
        return 416  # the first-pos is past the end: no overlap (§14.1.1)
    return (first, min(int(m[2]), size - 1) if m[2] else size - 1)


def oracle(method: bytes, fields: dict[bytes, bytes], size: int, etag: bytes) -> tuple[int, object]:
    """RFC 9110 §13.2.2, steps 1 to 5, for a GET or HEAD on an existing file with mtime MTIME."""
    if b"if-match" in fields:  # step 1
        if not strong_match(fields[b"if-match"], etag):
            return 412, None
    elif b"if-unmodified-since" in fields:  # step 2, only without If-Match
        d = http_date(fields[b"if-unmodified-since"])
        if d is not None and MTIME > d:
            return 412, None
    if b"if-none-match" in fields:  # step 3: 304 for GET/HEAD
        if weak_match(fields[b"if-none-match"], etag):
            return 304, None
    elif b"if-modified-since" in fields:  # step 4, only without If-None-Match
        d = http_date(fields[b"if-modified-since"])
        if d is not None and MTIME <= d:
            return 304, None
    # step 5: Range is defined for GET only (§14.2: a server MUST ignore it on other methods)
    if method != b"GET" or b"range" not in fields:
        return 200, None
    if b"if-range" in fields:  # §13.1.5: a strong etag equal to ours, or exactly Last-Modified
        v = fields[b"if-range"].strip()
        ok = strong_match(v, etag) and v != b"*" if v.endswith(b'"') else v == LM
        if not ok:
            return 200, None
    rng = expected_range(fields[b"range"], size)
    if rng is None:
        return 200, None
    if rng == 416:
        return 416, None
    return 206, rng


# == the client ======================================================================================


def request(method: bytes, path: bytes, fields: dict[bytes, bytes], close: bool = False) -> bytes:
    extra = b"".join(b"%s: %s\r\n" % (k, v) for k, v in fields.items())
    if close:
        extra += b"Connection: close\r\n"
    return b"%s %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (method, path, extra)


async def read_one(reader: asyncio.StreamReader, method: bytes) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    # a stray body after a HEAD / 304 answer would show up here, as the next "status line"
    assert re.fullmatch(rb"HTTP/1\.1 [1-5][0-9]{2} .*", lines[0]), head[:200]
    status = int(lines[0][9:12])
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    if method == b"HEAD" or status == 304:
        return status, headers, b""
    return status, headers, await reader.readexactly(int(headers[b"content-length"][0]))


async def run(port: int, path: bytes, reqs: list[tuple[bytes, dict[bytes, bytes]]], batch: int = 64) -> list:
    """Send the requests pipelined in batches on ONE connection; the responses, in order. It ends
    with a `Connection: close` GET, so nothing may follow the last answer (no stray body bytes)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), W)
    out = []
    try:
        for i in range(0, len(reqs), batch):
            chunk = reqs[i:i + batch]
            writer.write(b"".join(request(m, path, f) for m, f in chunk))
            for m, _ in chunk:
                out.append(await asyncio.wait_for(read_one(reader, m), W))
        writer.write(request(b"GET", path, {}, close=True))
        status, _, _ = await asyncio.wait_for(read_one(reader, b"GET"), W)
        assert status == 200
        assert await asyncio.wait_for(reader.read(), W) == b""
    finally:
        writer.close()
    return out


# == fixtures ========================================================================================


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "www"
    r.mkdir()
    for name, data in (("r.txt", BODY), ("empty.txt", b""), ("big.bin", BIG)):
        (r / name).write_bytes(data)
        os.utime(r / name, (MTIME, MTIME))
    return r


@pytest.fixture
async def port(root, start_proxy, upstream) -> int:
    up = await upstream()
    route = {"prefix": "/", "lane": "app", "try_files": True, "root": str(root), "expires": f"{AGE}s"}
    # one connection carries a whole matrix: lift the 1000-requests-per-connection default
    proxy = await start_proxy(make_config(up.port, routes=[route], client={"keepalive_requests": 100_000}))
    return proxy.port


async def etag_of(port: int, path: bytes) -> bytes:
    [(status, headers, _)] = await run(port, path, [(b"GET", {})])
    assert status == 200
    [etag] = headers[b"etag"]
    assert _ETAG.fullmatch(etag), etag  # §8.8.3 syntax
    assert etag.startswith(b"W/"), "README: laneproxy's ETag is weak"
    return etag


def check(method: bytes, fields: dict, resp: tuple, size: int, body: bytes, etag: bytes, ctype: bytes) -> None:
    """One response against the oracle and the per-status rules."""
    status, headers, data = resp
    want, rng = oracle(method, fields, size, etag)
    ctx = (method, fields)
    assert status == want, ctx
    assert len(headers.get(b"date", [])) == 1, ctx  # §6.6.1: an origin with a clock sends Date
    assert b"transfer-encoding" not in headers, ctx
    if status in (200, 206, 304):
        assert headers[b"etag"] == [etag], ctx  # §15.3.7 / §15.4.5: ETag as in a 200
        assert headers[b"cache-control"] == [b"max-age=%d" % AGE], ctx  # §15.4.5: also on 304
        assert len(headers[b"expires"]) == 1, ctx
        assert headers.get(b"last-modified", [LM]) == [LM], ctx
    if status == 200:
        assert headers[b"content-length"] == [b"%d" % size], ctx
        assert headers[b"accept-ranges"] == [b"bytes"], ctx
        assert headers[b"content-type"] == [ctype], ctx
        assert b"content-range" not in headers, ctx
        assert data == (b"" if method == b"HEAD" else body), ctx
    elif status == 206:  # §15.3.7.1: one part, Content-Range, the part's Content-Length
        first, last = rng
        assert headers[b"content-range"] == [b"bytes %d-%d/%d" % (first, last, size)], ctx
        assert headers[b"content-length"] == [b"%d" % (last - first + 1)], ctx
        assert headers[b"content-type"] == [ctype], ctx
        assert data == body[first:last + 1], ctx
    elif status == 304:  # §15.4.5: no content; §8.6: Content-Length, if any, is the 200's
        assert headers.get(b"content-length", [b"%d" % size]) == [b"%d" % size], ctx
        assert b"content-range" not in headers and b"content-type" not in headers, ctx
    elif status == 416:  # §15.5.17: Content-Range: bytes */complete-length
        assert headers[b"content-range"] == [b"bytes */%d" % size], ctx
    if status in (412, 416):
        if method == b"GET":
            assert headers[b"content-length"] == [b"%d" % len(data)], ctx
        else:
            assert data == b"", ctx


def same_as_get(get: tuple, head: tuple, ctx: object) -> None:
    """§9.3.2: HEAD gets the header fields GET would get (Date/Expires may tick), no content."""
    strip = {b"date", b"expires"}
    assert head[0] == get[0], ctx
    def kept(headers: dict) -> dict:
        return {k: v for k, v in headers.items() if k not in strip}

    assert kept(head[1]) == kept(get[1]), ctx
    assert head[2] == b"", ctx


# == the precondition matrix (§13.2.2 order) =========================================================

IF_MATCH = [None, b"*", "ETAG", "STRONG", b'"zzz"', b'"zzz", ETAG', b"garbage"]
IF_UNMODIFIED_SINCE = [None, LM, EARLIER, LATER, b"Sat, 12 Sep 2020 12:26:40 UTC"]  # last: invalid
IF_NONE_MATCH = [None, b"*", "ETAG", "STRONG", b'"zzz"', b', "zzz",, ETAG ,', b"garbage"]
IF_MODIFIED_SINCE = [None, LM, EARLIER, LATER, b"Mon, 14 Sep 2020 12:26:40 +0000"]  # last: invalid
RANGES = [None, b"bytes=2-5", b"bytes=500-"]


def subst(value, etag: bytes) -> bytes | None:
    if value == "ETAG":
        return etag
    if value == "STRONG":
        return etag[2:]  # the same opaque-tag, marked strong: weakly equal, never strongly
    if isinstance(value, bytes):
        return value.replace(b"ETAG", etag)
    return value


def fields_of(names: tuple[bytes, ...], values: tuple, etag: bytes) -> dict[bytes, bytes]:
    out = {}
    for name, value in zip(names, values, strict=True):
        value = subst(value, etag)
        if value is not None:
            out[name] = value
    return out


async def test_oracle_sanity():
    # the oracle itself, on the RFC's own examples (§13.1.1, §8.8.3.2 table)
    assert strong_match(b'"xyzzy"', b'"xyzzy"') and not strong_match(b'W/"xyzzy"', b'"xyzzy"')
    assert weak_match(b'W/"1"', b'"1"') and weak_match(b'"1"', b'W/"1"') and not weak_match(b'"2"', b'"1"')
    assert not strong_match(b'W/"1"', b'W/"1"') and strong_match(b"*", b'W/"1"')
    assert http_date(LM) == http_date(LM_RFC850) == http_date(LM_ASCTIME) == MTIME
    assert formatdate(MTIME, usegmt=True).encode() == LM
    for bad in (b"sun, 13 Sep 2020 12:26:40 GMT", b"Sun, 13 Sep 2020 12:26:40 UTC", b"Sun, 13 Sep 2020 12:26:40"):
        assert http_date(bad) is None, bad
    assert expected_range(b"bytes=-0", 10) == 416 and expected_range(b"bytes=0-1,3-4", 10) is None


async def test_precondition_matrix_get_and_head(root, port):
    """7 If-Match × 5 If-Unmodified-Since × 7 If-None-Match × 5 If-Modified-Since × 3 Range, GET and
    HEAD: 7350 requests, each against the oracle; HEAD's header fields equal GET's (§9.3.2)."""
    etag = await etag_of(port, b"/r.txt")
    names = (b"if-match", b"if-unmodified-since", b"if-none-match", b"if-modified-since", b"range")
    combos = [fields_of(names, v, etag) for v in product(IF_MATCH, IF_UNMODIFIED_SINCE, IF_NONE_MATCH,
                                                          IF_MODIFIED_SINCE, RANGES)]
    reqs = [(m, f) for f in combos for m in (b"GET", b"HEAD")]
    resps = await run(port, b"/r.txt", reqs, batch=100)
    seen = set()
    for (method, fields), resp in zip(reqs, resps, strict=True):
        check(method, fields, resp, N, BODY, etag, b"text/plain; charset=utf-8")
        seen.add(resp[0])
    for i in range(0, len(reqs), 2):
        get, head = resps[i], resps[i + 1]
        fields = reqs[i][1]
        if b"range" in fields:  # §14.2: Range is ignored on HEAD, so compare with the GET without it
            continue
        same_as_get(get, head, fields)
    assert seen == {200, 206, 304, 412, 416}


@pytest.mark.parametrize(("winner", "fields"), [
    # step 1 before 3: a failing If-Match is 412 even when If-None-Match would be 304
    (412, {b"if-match": b'"zzz"', b"if-none-match": b"*"}),
    # step 1 replaces step 2: If-Match `*` passes, an old If-Unmodified-Since is not looked at
    (200, {b"if-match": b"*", b"if-unmodified-since": EARLIER}),
    # step 2 before 3
    (412, {b"if-unmodified-since": EARLIER, b"if-none-match": b"*"}),
    # step 3 replaces step 4: a non-matching If-None-Match makes a matching If-Modified-Since moot
    (200, {b"if-none-match": b'"zzz"', b"if-modified-since": LATER}),
    (200, {b"if-none-match": b"garbage", b"if-modified-since": LM}),
    # steps 3/4 before 5: 304 beats 206 and 416
    (304, {b"if-none-match": b"*", b"range": b"bytes=0-0"}),
    (304, {b"if-modified-since": LM, b"range": b"bytes=999-"}),
    # step 1/2 before 5: 412 beats 416
    (412, {b"if-match": b'"zzz"', b"range": b"bytes=999-"}),
    (412, {b"if-unmodified-since": EARLIER, b"range": b"bytes=999-", b"if-range": LM}),
    # an invalid If-Unmodified-Since / If-Modified-Since is ignored, the next step decides
    (206, {b"if-unmodified-since": b"yesterday", b"if-modified-since": b"tomorrow", b"range": b"bytes=1-1"}),
])
async def test_evaluation_order_named_cases(root, port, winner, fields):
    etag = await etag_of(port, b"/r.txt")
    [resp] = await run(port, b"/r.txt", [(b"GET", fields)])
    assert resp[0] == winner
    check(b"GET", fields, resp, N, BODY, etag, b"text/plain; charset=utf-8")


# == Range × If-Range (§14, §13.1.5) =================================================================

RANGE_SPECS = [
    None,
    b"bytes=0-0", b"bytes=2-5", b"bytes=0-", b"bytes=100-", b"bytes=%d-" % (N - 1), b"bytes=%d-" % N,
    b"bytes=500-600", b"bytes=-5", b"bytes=-1", b"bytes=-%d" % N, b"bytes=-1000", b"bytes=-0",
    b"bytes=5-1000", b"bytes=0-99999999999999999999999", b"bytes=99999999999999999999-",
    b"BYTES=2-5", b"Bytes=2-5", b"bytes=2-5,", b"bytes=,2-5", b"bytes=2-5 , ",  # §14.1 case, §5.6.1 empty items
    # several ranges: README policy, the whole file (200), also overlapping or unsatisfiable ones
    b"bytes=0-1,4-5", b"bytes=0-3,2-5", b"bytes=0-0,0-0", b"bytes=-1,0-0", b"bytes=0-1,500-600",
    b"bytes=500-600,700-800", b"bytes=0-1, -0",
    # not a valid ranges-specifier or another unit: ignored (§14.2), 200
    b"bytes=5-2", b"bytes=x-y", b"bytes=-", b"bytes=", b"bytes", b"bytes=1-2-3", b"bytes=+1-2",
    b"bytes=0x1-2", b"bytes=1.5-2", b"bytes=-1-2", b"items=0-1", b"none", b"=0-1", b"bytes=1- 2x",
]
IF_RANGES = [None, LM, EARLIER, LATER, "ETAG", "STRONG", b"garbage", b'"zzz"']
PASSING = [{}, {b"if-match": b"*"}, {b"if-unmodified-since": LATER}, {b"if-none-match": b'"zzz"'},
           {b"if-modified-since": EARLIER}]


async def test_range_and_if_range_matrix(root, port):
    """45 Range values × 8 If-Range values × 5 passing preconditions, GET and HEAD: 3600 requests."""
    etag = await etag_of(port, b"/r.txt")
    reqs = []
    for spec, ifr, passing in product(RANGE_SPECS, IF_RANGES, PASSING):
        fields = dict(passing)
        if spec is not None:
            fields[b"range"] = spec
        ifr = subst(ifr, etag)
        if ifr is not None:
            fields[b"if-range"] = ifr
        reqs += [(b"GET", fields), (b"HEAD", fields)]
    resps = await run(port, b"/r.txt", reqs, batch=100)
    counts: dict[int, int] = {}
    for (method, fields), resp in zip(reqs, resps, strict=True):
        check(method, fields, resp, N, BODY, etag, b"text/plain; charset=utf-8")
        counts[resp[0]] = counts.get(resp[0], 0) + 1
        if method == b"HEAD":  # §14.2: HEAD ignores Range and If-Range: the plain 200
            assert resp[0] == 200 and resp[1][b"content-length"] == [b"%d" % N], fields
    assert set(counts) == {200, 206, 416}
    # an If-Range that does not match turns even an unsatisfiable Range into a 200 (§13.1.5)
    assert oracle(b"GET", {b"range": b"bytes=500-", b"if-range": EARLIER}, N, etag) == (200, None)


@pytest.mark.parametrize(("spec", "status"), [
    (b"bytes=0-0", 416), (b"bytes=0-", 416), (b"bytes=-0", 416), (b"bytes=5-9", 416),
    (b"bytes=0-0,1-1", 200), (b"bytes=x", 200),
])
async def test_zero_length_file(root, port, spec, status):
    # §14.1.1: for a zero-length representation only a suffix range with a non-zero length is
    # satisfiable; everything else that is valid is 416 with `bytes */0` (§15.5.17)
    etag = await etag_of(port, b"/empty.txt")
    reqs = [(b"GET", {b"range": spec}), (b"HEAD", {b"range": spec}), (b"GET", {b"range": spec, b"if-range": LM}),
            (b"GET", {b"range": spec, b"if-range": EARLIER})]
    resps = await run(port, b"/empty.txt", reqs)
    for (method, fields), resp in zip(reqs, resps, strict=True):
        check(method, fields, resp, 0, b"", etag, b"text/plain; charset=utf-8")
    assert resps[0][0] == status
    if status == 416:
        assert resps[0][1][b"content-range"] == [b"bytes */0"]


async def test_ranges_on_a_file_past_the_inline_size(root, port):
    """200 000 bytes leave with sendfile: ranges across the 64 KiB edge, suffixes, and HEAD = GET."""
    etag = await etag_of(port, b"/big.bin")
    size = len(BIG)
    specs = [None, b"bytes=0-0", b"bytes=65535-65536", b"bytes=65536-", b"bytes=-70000", b"bytes=100000-199999",
             b"bytes=0-%d" % (size + 5), b"bytes=%d-" % size, b"bytes=0-1,100-101", b"bytes=-0"]
    reqs = []
    for spec in specs:
        for ifr in (None, LM, EARLIER):
            fields = {}
            if spec is not None:
                fields[b"range"] = spec
            if ifr is not None:
                fields[b"if-range"] = ifr
            reqs += [(b"GET", fields), (b"HEAD", fields)]
    resps = await run(port, b"/big.bin", reqs, batch=8)
    for (method, fields), resp in zip(reqs, resps, strict=True):
        check(method, fields, resp, size, BIG, etag, b"application/octet-stream")
    assert resps[0][1][b"content-length"] == resps[1][1][b"content-length"] == [b"%d" % size]


# == validators (§8.8) ===============================================================================


async def test_obsolete_date_forms_are_accepted(root, port):
    # §5.6.7: a recipient MUST accept all three HTTP-date forms
    etag = await etag_of(port, b"/r.txt")
    cases = [
        ({b"if-modified-since": LM_RFC850}, 304), ({b"if-modified-since": LM_ASCTIME}, 304),
        ({b"if-unmodified-since": b"Saturday, 12-Sep-20 12:26:40 GMT"}, 412),
        ({b"if-unmodified-since": b"Sat Sep 12 12:26:40 2020"}, 412),
        ({b"if-unmodified-since": LM_ASCTIME}, 200),
    ]
    reqs = [(m, f) for f, _ in cases for m in (b"GET", b"HEAD")]
    resps = await run(port, b"/r.txt", reqs)
    for (method, fields), resp in zip(reqs, resps, strict=True):
        check(method, fields, resp, N, BODY, etag, b"text/plain; charset=utf-8")
    assert [r[0] for r in resps[::2]] == [s for _, s in cases]


@pytest.mark.parametrize(("lines", "status"), [
    # §5.3: field lines of a list field combine: the second line's tag matches
    ([b'If-None-Match: "zzz"', b"If-None-Match: ETAG"], 304),
    ([b"If-None-Match: ETAG", b'If-None-Match: "zzz"'], 304),
    # If-Match on two lines: our weak tag still fails the strong comparison
    ([b'If-Match: "zzz"', b"If-Match: ETAG"], 412),
    # Range is no list either; two lines read as one value with two ranges: the whole file
    ([b"Range: bytes=0-1", b"Range: bytes=0-1"], 200),
    # §13.1.3 / §13.1.4 would have these ignored (more than one member); laneproxy's documented
    # policy (README "Security": not lists, two readers could pick different lines) is 400 + close
    ([b"If-Modified-Since: " + LATER, b"If-Modified-Since: " + LATER], 400),
    ([b"If-Unmodified-Since: " + EARLIER, b"If-Unmodified-Since: " + EARLIER], 400),
    ([b"Range: bytes=0-1", b"If-Range: " + LM, b"If-Range: " + LM], 400),
])
async def test_repeated_field_lines(root, port, lines, status):
    etag = await etag_of(port, b"/r.txt")
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), W)
    try:
        extra = b"".join(line.replace(b"ETAG", etag) + b"\r\n" for line in lines)
        writer.write(b"GET /r.txt HTTP/1.1\r\nHost: t\r\n%s\r\n" % extra)
        got, headers, body = await asyncio.wait_for(read_one(reader, b"GET"), W)
        if status == 400:
            assert await asyncio.wait_for(reader.read(), W) == b""  # and closed
    finally:
        writer.close()
    assert got == status
    if status == 200:
        assert body == BODY


async def test_validators_follow_a_change_of_the_file(root, port):
    # §8.8.3: the ETag changes with the representation; §8.8.2: so does Last-Modified; old
    # validators then fail: If-None-Match / If-Modified-Since → 200, If-Range → 200, IUS → 412
    old_etag = await etag_of(port, b"/r.txt")
    changed = BODY[::-1]  # same size: only the mtime tells the versions apart
    (root / "r.txt").write_bytes(changed)
    os.utime(root / "r.txt", (MTIME + 1, MTIME + 1))
    new_lm = formatdate(MTIME + 1, usegmt=True).encode()
    reqs = [(b"GET", {}), (b"GET", {b"if-none-match": old_etag}), (b"GET", {b"if-modified-since": LM}),
            (b"GET", {b"range": b"bytes=0-1", b"if-range": LM}), (b"GET", {b"if-unmodified-since": LM}),
            (b"GET", {b"range": b"bytes=0-1", b"if-range": new_lm}), (b"GET", {b"if-modified-since": new_lm})]
    resps = await run(port, b"/r.txt", reqs)
    [new_etag] = resps[0][1][b"etag"]
    assert new_etag != old_etag and resps[0][1][b"last-modified"] == [new_lm] and resps[0][2] == changed
    assert [r[0] for r in resps] == [200, 200, 200, 200, 412, 206, 304]
    assert resps[3][2] == changed and resps[5][2] == changed[:2]


async def test_last_modified_in_the_future_is_clamped_to_date(root, port):
    future = int(time.time()) + 3600
    os.utime(root / "r.txt", (future, future))
    [(status, headers, _)] = await run(port, b"/r.txt", [(b"GET", {})])
    assert status == 200
    date = parsedate_to_datetime(headers[b"date"][0].decode())
    last_modified = parsedate_to_datetime(headers[b"last-modified"][0].decode())
    assert last_modified <= date


async def test_if_range_date_is_weak_when_the_file_changed_too_recently(root, port):
    future = int(time.time()) + 3600
    os.utime(root / "r.txt", (future, future))
    lm = formatdate(future, usegmt=True).encode()
    [(status, _, body)] = await run(port, b"/r.txt", [(b"GET", {b"range": b"bytes=0-1", b"if-range": lm})])
    assert (status, body) == (200, BODY)
