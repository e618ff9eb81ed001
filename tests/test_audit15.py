"""Audit 15: read-boundary invariance.

A client's bytes reach laneproxy in reads of any size: one read for a whole pipeline, a read per
byte, or a cut anywhere in between. Several paths depend on where a read ends (request_start.py:
empty lines before a request, the `HTTP/x.y` check of a request line that spans reads, the
re-parse of a `Transfer-Encoding` value followed by an HTAB; http1.ChunkLineGuard, which checks
chunk-size lines as they come and cuts a read where a chunked request ends; the cut after a
Content-Length body; pipelining; upstream.py's bounds on the response head and the trailers).

The invariant checked here: for every byte string (valid or not, one request or a pipeline),
delivering it in one read, split in two at every boundary (sampled for long inputs, but always
every boundary in the first two lines, in short lines such as chunk-size lines, and around every
CR and LF), in a few seeded random multi-way cuts, and byte by byte, gives the same result:

* requests: the same complete requests forwarded upstream on the same upstream connections (a
  chunked body is compared decoded: laneproxy re-chunks per read, by design), no partial request
  left on an open upstream connection, the same bytes to the client (Date values aside) and the
  same connection state (closed, aborted, half-closed for a lingering close);
* responses (the upstream's bytes cut the same ways): the same bytes to the client (a re-chunked
  body decoded, Date aside), the same client and upstream connection state and pool contents, and
  the same answer to a follow-up request on the same client connection. One difference is allowed
  by design (exchange.py rule 5): a response found broken after its head was relayed in an earlier
  read ends in an abort, where the same bytes in one read get a clean 502.

Everything runs on the protocol tier (tests/helpers.ProxyPair: the real DownstreamProtocol, Lane,
Pool and UpstreamProtocols on in-memory transports), so thousands of cuts take seconds. The
scripted upstream answers a request only once it is complete at the upstream, and only when the
client has nothing more to deliver (or laneproxy paused reading): the client is faster than the
upstream, so the timing is the same for every cut and only the cut itself varies.

Its four findings are fixed; each keeps its minimal reproduction (the `FINDING` sections).
"""

from __future__ import annotations

import asyncio
import random
import re
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import httptools
import pytest

from laneproxy.config import ClientConfig
from laneproxy.upstream import MAX_RESPONSE_HEAD
from tests.helpers import ProxyPair, lane_config
from tests.test_smuggling_corpus import REQUEST_CASES, RESPONSE_CASES

pytestmark = pytest.mark.timeout(60)

HOST = b"Host: t.example\r\n"
TE_CH = b"Transfer-Encoding: chunked\r\n"
N_UPSTREAMS = 6  # pooled connections per pair: never a connect (which would need the network)

# -- splitting ------------------------------------------------------------------------------------

FULL = 700  # inputs up to this length are cut at every boundary
SAMPLE = 120  # extra random boundaries for longer inputs
SHORT_LINE = 160  # every boundary inside lines up to this long (request line, chunk-size lines ...)
MULTI = 12  # seeded random multi-way cuts per input


def boundaries(data: bytes) -> list[int]:
    """Where to cut `data` in two: all positions, or for long inputs every position in the first
    two lines and in short lines, four bytes either side of every CR and LF, and a sample."""
    n = len(data)
    if n <= FULL:
        return list(range(1, n))
    keep: set[int] = set()
    start = 0
    line_no = 0
    while start < n:
        nl = data.find(b"\n", start)
        end = n if nl == -1 else nl + 1
        if line_no < 2 or end - start <= SHORT_LINE:
            keep.update(range(start, end + 1))
        start = end
        line_no += 1
    for i, byte in enumerate(data):
        if byte in (10, 13):
            keep.update(range(i - 4, i + 6))
    keep = {i for i in keep if 0 < i < n}
    rest = sorted(set(range(1, n)) - keep)
    keep.update(random.Random(n).sample(rest, min(SAMPLE, len(rest))))
    return sorted(keep)


def multi_cuts(data: bytes, count: int = MULTI) -> Iterator[list[bytes]]:
    """Seeded random cuts into 3 to 9 pieces."""
    rnd = random.Random(len(data) * 7919 + 1)
    for _ in range(count if len(data) > 3 else 0):
        points = sorted(rnd.sample(range(1, len(data)), min(len(data) - 1, rnd.randint(2, 8))))
        yield [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# -- reading what laneproxy wrote -------------------------------------------------------------------

_CL = re.compile(rb"\r\ncontent-length: *([0-9]+)\r\n")
_DATE = re.compile(rb"\r\nDate: [^\r]*")


def _dechunk(buf: bytes, i: int) -> tuple[bytes, bytes, int]:
    """A chunked body from `buf[i:]`: (data, trailer lines, end); end -1 when incomplete (data:
    what arrived of it, so that a body cut short reads the same however it was re-chunked)."""
    body = bytearray()
    while True:
        eol = buf.find(b"\r\n", i)
        if eol < 0:
            return bytes(body), b"", -1
        try:
            size = int(buf[i:eol].split(b";")[0], 16)
        except ValueError:
            return bytes(body), buf[i:], -1
        i = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", i - 2)
            if end < 0:
                return bytes(body), buf[i:], -1
            return bytes(body), buf[i : end + 2], end + 4
        body += buf[i : i + size]
        if len(buf) < i + size + 2:
            return bytes(body), b"", -1
        i += size + 2


def read_messages(buf: bytes, *, responses: bool = False, methods: Iterable[bytes] = (),
                  eof: bool = False) -> tuple[list[tuple[bytes, ...]], tuple[bytes, ...]]:
    """The complete messages in `buf` (head with Date values blanked, framing, body decoded,
    trailers) and the incomplete rest (its head, framing and body so far, or its raw bytes).
    Responses: HEAD (from `methods`, in order), 1xx, 204 and 304 have no body; one without
    framing runs to the end, complete only if `eof`."""
    out: list[tuple[bytes, ...]] = []
    methods = deque(methods)
    i = 0
    while i < len(buf):
        end = buf.find(b"\r\n\r\n", i)
        if end < 0:
            break
        head = _DATE.sub(b"\r\nDate: -", buf[i : end + 4])
        lower = head.lower()
        j = end + 4
        bodiless = False
        if responses:
            status = int(head[9:12]) if head[9:12].isdigit() else 0
            if 100 <= status < 200:
                out.append((head, b"1xx", b""))
                i = j
                continue
            method = methods.popleft() if methods else b"GET"
            bodiless = method == b"HEAD" or status in (204, 304)
        cl = _CL.search(lower)
        if bodiless:
            msg: tuple[bytes, ...] = (head, b"none", b"")
        elif b"\r\ntransfer-encoding: chunked\r\n" in lower:
            body, trailers, j = _dechunk(buf, j)
            if j < 0:
                return out, (head, b"chunked, incomplete", body, trailers)
            msg = (head, b"chunked", body, trailers)
        elif cl is not None:
            size = int(cl.group(1))
            if len(buf) < j + size:
                return out, (head, b"length, incomplete", buf[j:])
            msg = (head, b"length", buf[j : j + size])
            j += size
        elif responses:
            if not eof:
                return out, (head, b"until-close, incomplete", buf[j:])
            msg = (head, b"until-close", buf[j:])
            j = len(buf)
        else:
            msg = (head, b"none", b"")
        out.append(msg)
        i = j
    return out, ((_DATE.sub(b"\r\nDate: -", buf[i:]),) if i < len(buf) else ())


_OWN_ERROR = re.compile(rb"\r\nServer: laneproxy\r\n.*\r\nContent-Length: [0-9]+\r\n", re.S)


def client_view(buf: bytes, methods: Iterable[bytes] = (), eof: bool = False) -> tuple:
    """The responses the client got, read as messages. In laneproxy's own error answers only the
    status is kept of the body (its text names the check that caught the request first, which may
    differ by read: `not an HTTP/1.x request line` or llhttp's `Expected HTTP/`)."""
    messages, rest = read_messages(buf, responses=True, methods=methods, eof=eof)
    out = []
    for head, kind, body, *more in messages:
        if _OWN_ERROR.search(head):
            head = re.sub(rb"\r\nContent-Length: [0-9]+\r\n", b"\r\nContent-Length: *\r\n", head)
            body = body.split(b":", 1)[0]
        out.append((head, kind, body, *more))
    return tuple(out), rest


# -- the scripted upstream ------------------------------------------------------------------------


def answer_for(request: tuple[bytes, ...]) -> bytes:
    """What the scripted upstream answers: a 200 naming the request line and the body size."""
    head, _, body = request[:3]
    line = head.split(b"\r\n", 1)[0]
    text = b"%s body=%d\n" % (line, len(body))
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text)


@dataclass
class Run:
    """One client connection on the protocol tier with N_UPSTREAMS pooled upstream connections."""

    loop: asyncio.AbstractEventLoop
    client: dict = field(default_factory=dict)
    lane: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pair = ProxyPair(self.loop, client=ClientConfig(**self.client), lane_cfg=lane_config(**self.lane),
                              prefix=b"/")
        self.ups = [self.pair.pooled_upstream() for _ in range(N_UPSTREAMS)]
        self.answered = [0] * N_UPSTREAMS
        self.pending: deque[bytes] = deque()

    def deliver(self, pieces: Iterable[bytes]) -> None:
        """The client sends `pieces` (one read each) as fast as laneproxy reads them; the upstream
        answers each complete request when the client has nothing more it can deliver."""
        self.pending.extend(p for p in pieces if p)
        t = self.pair.down_t
        for _ in range(1_000_000):
            if self.pending and not t.read_paused and not t.closed:
                self.pair.send(self.pending.popleft())
                continue
            if not self._answer_one():
                return
        raise AssertionError("no quiescence")

    def _answer_one(self) -> bool:
        for k, (conn, t) in enumerate(self.ups):
            if t.closed or conn.exchange is None:
                continue
            requests, _ = read_messages(bytes(t.buffer))
            if len(requests) > self.answered[k]:
                request = requests[self.answered[k]]
                self.answered[k] += 1
                conn.data_received(answer_for(request))
                return True
        return False

    def outcome(self) -> tuple[Any, ...]:
        """Everything the invariant compares (see the module docstring)."""
        pair = self.pair
        t = pair.down_t
        upstream = []
        for k, (conn, ut) in enumerate(self.ups):
            requests, rest = read_messages(bytes(ut.buffer))
            if requests or (rest and not ut.closed):
                upstream.append((k, tuple(requests), bool(rest) and not ut.closed, ut.closed))
        down = pair.down
        return (
            client_view(bytes(t.buffer)),
            ("closed" if t.closed else "open", t.aborted, t.eof_written),
            tuple(upstream),
            ("in_head" if down.in_head else "-", down.current is not None, len(down.queue)),
        )

    def close(self) -> None:
        self.pair.close()


def request_outcome(loop: asyncio.AbstractEventLoop, pieces: list[bytes], client: dict, lane: dict) -> tuple:
    run = Run(loop, client, lane)
    try:
        run.deliver(pieces)
        return run.outcome()
    finally:
        run.close()


def show(outcome: tuple) -> str:
    (messages, rest), state, upstream, held = outcome
    client = b"".join(b"".join(m[:1] + m[2:3]) for m in messages) + b"<rest>" + b"".join(rest[:1] + rest[2:3])
    ups = [(k, [r[0].split(b"\r\n", 1)[0] + b" +%d" % len(r[2]) for r in reqs], partial, closed)
           for k, reqs, partial, closed in upstream]
    return f"client={client[:400]!r}... state={state} upstream={ups} held={held}"


def head_terminator_cuts(data: bytes) -> dict[int, int]:
    """{cut position inside the CRLFCRLF that ends a request head (after its CR, CRLF or CRLFCR):
    where that head's last LF is}, for every head llhttp reads in `data` (finding 1)."""
    ends: list[int] = []

    class Callbacks:
        def on_headers_complete(self) -> None:
            ends.append(at)

    parser = httptools.HttpRequestParser(Callbacks())
    for at in range(len(data)):
        try:
            parser.feed_data(data[at : at + 1])
        except httptools.HttpParserUpgrade:
            parser = httptools.HttpRequestParser(Callbacks())
        except httptools.HttpParserError:
            break
    return {c: e for e in ends for c in (e - 2, e - 1, e)}


def straddles(pieces: list[bytes], inside: dict[int, int]) -> bool:
    """Does a read start inside a head's CRLFCRLF and go on past its end (finding 1)? (Byte by
    byte, the read with the last LF holds nothing else, and the head ends as it should.)"""
    start = 0
    for piece in pieces:
        end = start + len(piece)
        if start in inside and end > inside[start] + 1:
            return True
        start = end
    return False


def check_request_invariance(loop: asyncio.AbstractEventLoop, data: bytes, client: dict | None = None,
                             lane: dict | None = None, *, straddle: bool = False) -> tuple:
    """One read is the reference; every two-way cut, the multi-way cuts and byte by byte must
    match it. Returns the reference outcome (for the tests' own assertions). Deliveries with a
    read ending inside a head's CRLFCRLF are finding 1: only those are checked with `straddle`,
    all others without."""
    client, lane = client or {}, lane or {}
    base = request_outcome(loop, [data], client, lane)
    diffs: dict[tuple, list[str]] = {}
    inside = head_terminator_cuts(data)

    def compare(label: str, pieces: list[bytes]) -> None:
        if straddle != straddles(pieces, inside):
            return
        got = request_outcome(loop, pieces, client, lane)
        if got != base:
            diffs.setdefault(got, []).append(label)

    for i in boundaries(data):
        compare(f"cut {i} {data[max(0, i - 6):i]!r}|{data[i:i + 6]!r}", [data[:i], data[i:]])
    for pieces in multi_cuts(data):
        compare(f"cuts {[len(p) for p in pieces]}", pieces)
    compare("byte by byte", byte_by_byte(data))
    if diffs:
        lines = [f"one read: {show(base)}"]
        for got, labels in diffs.items():
            lines.append(f"{len(labels)} deliveries, e.g. {labels[:4]}: {show(got)}")
        raise AssertionError("\n".join(lines))
    return base


# -- the request corpus -------------------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    id: str
    data: bytes
    client: dict = field(default_factory=dict)
    lane: dict = field(default_factory=dict)


def get(target: bytes = b"/a", fields: bytes = b"", version: bytes = b"1.1", method: bytes = b"GET") -> bytes:
    return b"%s %s HTTP/%s\r\n%s%s\r\n" % (method, target, version, HOST, fields)


def post(fields: bytes, body: bytes = b"", target: bytes = b"/p") -> bytes:
    return b"POST %s HTTP/1.1\r\n%s%s\r\n%s" % (target, HOST, fields, body)


def cl(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n" % len(body)


HELLO_CH = b"5\r\nhello\r\n0\r\n\r\n"
EXT_TRAILERS_CH = b'5;a=b;c="d e"\r\nhello\r\n6;x\r\n world\r\n000;z=1\r\nX-T: 1\r\nY-T: 2\r\n\r\n'
LONG_EXT_CH = b"5;a=" + b"x" * 2000 + b"\r\nhello\r\n0\r\n\r\n"
MAX_URL = 8192 - 13  # the longest target with GET under client.max_request_line (8 KiB)
MAX_VALUE = 8192 - 4 - len(b"X-Big")  # the longest X-Big value under MAX_FIELD_LINE

OWS_PAD = b"".join(b"X-Pad-%d:%s v\r\n" % (i, b" " * 7400) for i in range(8))

OWN_REQUESTS: list[Req] = [
    # empty lines before a request (RFC 9112 §2.2: whole CRLFs only)
    Req("leading-crlf", b"\r\n" + get()),
    Req("leading-crlf-crlf", b"\r\n\r\n" + get()),
    Req("leading-bare-lf", b"\n" + get()),
    Req("leading-lf-lf", b"\n\n" + get()),
    Req("leading-cr-crlf", b"\r\r\n" + get()),
    Req("leading-crlf-lf", b"\r\n\n" + get()),
    Req("leading-crlf-bare-cr", b"\r\n\r" + get()),
    # pipelines: a request ends exactly where a read may end, the next one follows
    Req("pipeline-get-get", get(b"/1") + get(b"/2")),
    Req("pipeline-get-crlf-get", get(b"/1") + b"\r\n" + get(b"/2")),
    Req("pipeline-get-lf-get", get(b"/1") + b"\n" + get(b"/2")),
    Req("pipeline-three", get(b"/1") + post(cl(b"hello"), b"hello") + get(b"/3")),
    Req("pipeline-cl-crlf-get", post(cl(b"hello"), b"hello") + b"\r\n" + get(b"/2")),
    Req("pipeline-cl-lf-get", post(cl(b"hello"), b"hello") + b"\n" + get(b"/2")),
    Req("pipeline-chunked-get", post(TE_CH, HELLO_CH) + get(b"/2")),
    Req("pipeline-chunked-crlf-get", post(TE_CH, HELLO_CH) + b"\r\n" + get(b"/2")),
    Req("pipeline-chunked-lf-get", post(TE_CH, HELLO_CH) + b"\n" + get(b"/2")),
    Req("pipeline-chunked-chunked", post(TE_CH, HELLO_CH) + post(TE_CH, EXT_TRAILERS_CH, b"/q")),
    Req("pipeline-get-garbage", get(b"/1") + b"\x16\x03\x01garbage\r\n\r\n"),
    Req("pipeline-close-then-get", get(b"/1", b"Connection: close\r\n") + get(b"/2")),
    # chunked bodies: extensions, trailers, a last chunk only, long extensions
    Req("chunked-ext-trailers", post(TE_CH, EXT_TRAILERS_CH)),
    Req("chunked-empty", post(TE_CH, b"0\r\n\r\n")),
    Req("chunked-empty-zeros", post(TE_CH, b"000\r\n\r\n") + get(b"/2")),
    Req("chunked-last-with-trailer", post(TE_CH, b"0\r\nX-T: y\r\n\r\n") + get(b"/2")),
    Req("chunked-many-small", post(TE_CH, b"".join(b"1;e=%d\r\n%c\r\n" % (i, 97 + i) for i in range(8))
                                   + b"0\r\n\r\n")),
    Req("chunked-ext-at-1k", post(TE_CH, b"5;a=" + b"x" * 1000 + b"\r\nhello\r\n0\r\n\r\n")),
    Req("chunked-ext-over-1k", post(TE_CH, LONG_EXT_CH)),
    Req("chunked-size-overflow", post(TE_CH, b"1" + b"0" * 16 + b"\r\nhello\r\n0\r\n\r\n")),
    Req("chunked-spill", post(TE_CH, b"5\r\nhello!!\r\n0\r\n\r\n")),
    Req("chunked-over-max-body", post(TE_CH, b"20\r\n" + b"b" * 32 + b"\r\n0\r\n\r\n"), lane={"max_body": 16}),
    # Transfer-Encoding followed by an HTAB (request_start.py re-parses the head without it)
    Req("te-chunked-htab", post(b"Transfer-Encoding: chunked\t\r\n", HELLO_CH)),
    Req("te-chunked-sp-htab", post(b"Transfer-Encoding: chunked \t\r\n", HELLO_CH)),
    Req("te-chunked-htab-then-get", post(b"Transfer-Encoding: chunked\t\r\n", HELLO_CH) + get(b"/2")),
    # request lines that are not HTTP (llhttp also takes RTSP and ICE)
    Req("rtsp", b"GET /r RTSP/1.0\r\n" + HOST + b"\r\n"),
    Req("ice-source", b"SOURCE /r ICE/1.0\r\n" + HOST + b"\r\n"),
    Req("pipeline-get-rtsp", get(b"/1") + b"DESCRIBE /r RTSP/1.0\r\n" + HOST + b"\r\n"),
    Req("pipeline-get-ice", get(b"/1") + b"SOURCE /r ICE/1.0\r\n" + HOST + b"\r\n"),
    Req("http-version-2", get(version=b"2.0")),
    # Expect: 100-continue with a body (laneproxy sends its own 100)
    Req("expect-cl", post(b"Expect: 100-continue\r\n" + cl(b"hello"), b"hello")),
    Req("expect-chunked", post(b"Expect: 100-continue\r\n" + TE_CH, HELLO_CH) + get(b"/2")),
    Req("expect-unknown", post(b"Expect: nope\r\n" + cl(b"hello"), b"hello")),
    # field syntax
    Req("obs-fold", get(fields=b"X-A: a\r\n b\r\n")),
    Req("obs-fold-tab", get(fields=b"X-A: a\r\n\tb\r\n")),
    Req("bare-cr-in-value", get(fields=b"X-A: a\rb\r\n")),
    # limits near 8 KiB: one field line, the request line
    Req("field-line-at-max", get(fields=b"X-Big: " + b"v" * MAX_VALUE + b"\r\n")),
    Req("field-line-over-max", get(fields=b"X-Big: " + b"v" * (MAX_VALUE + 1) + b"\r\n")),
    Req("request-line-at-max", get(b"/" + b"a" * (MAX_URL - 1))),
    Req("request-line-over-max", get(b"/" + b"a" * MAX_URL)),
    Req("head-ows-padded", get(fields=OWS_PAD)),
]


def _corpus_requests() -> list[Req]:
    """The request cases of tests/test_smuggling_corpus.py (pieces joined: the cuts come here)."""
    out = []
    for case in REQUEST_CASES:
        out.append(Req("corpus-" + case.id, case.wire, dict(case.cfg.get("client", {}))))
    return out


# -- FINDING 1: the end of a request head cut between reads ------------------------------------------
#
# downstream.data_received searches a read for b"\r\n\r\n" to find where a request head ends and
# feeds llhttp only up to there, so that what follows (a body for the chunk guard, a next request
# for the request-line and empty-line checks) is looked at on its own. When the previous read
# ended inside that CRLFCRLF (after "\r", "\r\n" or "\r\n\r"), the search misses the head's end and
# finds a later CRLFCRLF (or none): the body and any pipelined request go to llhttp unchecked in
# the same feed. Then a chunk extension over 1 KiB passes (200 instead of 400); the chunk guard,
# created at the end of the head but first fed the read after, takes chunk data for size lines, so
# a valid chunked body can get 413 (or 400); a pipelined `DESCRIBE /r RTSP/1.0` is forwarded as
# `DESCRIBE /r HTTP/1.1` (Via 1.0); a bare LF before a pipelined request is skipped instead of
# refused (RFC 9112 §2.2); a request pipelined after `Connection: close` (or after HTTP/1.0) is
# parsed and queued, and the connection ends in a lingering close instead of a close. Three cut
# positions per request head; the main tests leave those deliveries to the `straddle` tests.
# Fixed: the head's last reads are kept (`head_parts`) and request_start._head_end finds a blank
# line that straddles reads.



# -- FINDING 2: `Transfer-Encoding: chunked<HTAB>` in a head that spans reads -------------------------
#
# request_start._reparse_without_te_ows parses the head again without the HTAB only when the head
# began in the read being fed (`head_bytes == 0`). A head cut anywhere before the end of its
# Transfer-Encoding line gets 400 instead of the 200 of one read. Fixed: the re-parse starts from
# the head's first byte (`head_parts`).



# -- FINDING 3: the raw size bound of a request head counts only heads left incomplete by a read -----
#
# downstream._feed adds a read to head_bytes (bounded by max_head_bytes: request line + header
# section + 2 field lines, 56 KiB by default) only while the head is still incomplete after it.
# Leading OWS of field values is not counted by on_header's limits, so a head of 59 KiB (eight
# field lines padded with 7400 spaces) passes in one read (and with any cut in its first 57 KiB)
# and gets 431 when a read leaves more than 56 KiB of it incomplete (byte by byte: always).
# Fixed: the raw head up to its blank line is bounded wherever the reads cut it.


STRADDLE_CASES = {
    "pipeline-get-lf-get", "pipeline-cl-lf-get", "pipeline-close-then-get", "chunked-ext-over-1k", "pipeline-get-rtsp",
    "pipeline-get-ice", "corpus-chunk-ext-over-1k", "corpus-chunk-ext-over-1k-body-in-second-read",
    "corpus-chunk-ext-over-1k-mixed-case-te", "corpus-chunk-ext-over-1k-head-in-two-reads",
    "corpus-chunk-ext-over-1k-body-unfinished", "corpus-chunk-ext-over-1k-second-chunk", "corpus-chunk-size-upper-hex",
    "corpus-pipelined-bare-lf-between", "corpus-pipelined-bare-lf-after-body",
    "corpus-pipelined-after-connection-close", "corpus-http10-keep-alive-pipelined",
}
TE_HTAB_CASES = {"te-chunked-htab", "te-chunked-sp-htab", "te-chunked-htab-then-get"}


ALL_REQUESTS = OWN_REQUESTS + _corpus_requests()
assert len({r.id for r in ALL_REQUESTS}) == len(ALL_REQUESTS)


@pytest.mark.parametrize("req", [pytest.param(r, id=r.id) for r in ALL_REQUESTS])
async def test_request_outcome_with_a_read_ending_inside_the_head_terminator(req: Req) -> None:
    check_request_invariance(asyncio.get_running_loop(), req.data, req.client, req.lane, straddle=True)


@pytest.mark.parametrize("req", [pytest.param(r, id=r.id) for r in ALL_REQUESTS])
async def test_request_outcome_does_not_depend_on_read_boundaries(req: Req) -> None:
    base = check_request_invariance(asyncio.get_running_loop(), req.data, req.client, req.lane)
    (messages, _), _, _, held = base
    # The reference itself is a finished exchange: something answered, nothing left half-read.
    assert messages and messages[0][0].startswith(b"HTTP/1.1 "), messages
    assert held[:3] == ("-", False, 0), held


# == responses: the upstream's bytes cut at every boundary ===========================================


@dataclass(frozen=True)
class Resp:
    id: str
    answer: bytes  # what the upstream sends for the request
    request: bytes = b"GET /case HTTP/1.1\r\n" + HOST + b"\r\n"
    method: bytes = b"GET"
    eof: bool = False  # the upstream closes its connection after `answer`


FOLLOW_UP = b"GET /next HTTP/1.1\r\n" + HOST + b"\r\n"


def response_outcome(loop: asyncio.AbstractEventLoop, case: Resp, pieces: list[bytes]) -> tuple:
    """The client's view of one exchange whose response came in `pieces`, the connection states,
    and the answer to a follow-up request on the same client connection (if it stayed open)."""
    run = Run(loop)
    try:
        run.pair.send(case.request)
        used = [k for k, (conn, _) in enumerate(run.ups) if conn.exchange is not None]
        assert len(used) == 1, used
        k = used[0]
        conn, ut = run.ups[k]
        run.answered[k] = 1
        for piece in pieces:
            if conn.is_closed or ut.closed:
                break
            conn.data_received(piece)
        if case.eof and not conn.is_closed:
            conn.eof_received()
            ut.close()
            conn.connection_lost(None)
        t = run.pair.down_t
        first = client_view(t.take(), [case.method], eof=t.closed)
        state = ("closed" if t.closed else "open", t.aborted, t.eof_written)
        upstream = (ut.closed, conn.is_idle, run.pair.pool.idle)
        follow = None
        if not (t.closed or t.eof_written):
            before = [len(u.buffer) for _, u in run.ups]
            run.deliver([FOLLOW_UP])
            served = tuple(j for j, (_, u) in enumerate(run.ups) if len(u.buffer) != before[j])
            follow = (client_view(t.take()), served, ("closed" if t.closed else "open", t.aborted, t.eof_written))
        return first, state, upstream, follow
    finally:
        run.close()


def _failed_clean(outcome: tuple) -> bool:
    (messages, rest), state, _, _ = outcome
    return bool(messages) and messages[-1][0].startswith(b"HTTP/1.1 502 ") and not rest and not state[1]


def _aborted(outcome: tuple) -> bool:
    return outcome[1][1]


def check_response_invariance(loop: asyncio.AbstractEventLoop, case: Resp) -> tuple:
    """One read of `case.answer` is the reference; every two-way cut, the multi-way cuts and byte
    by byte must match it, except that a response found broken after its head was relayed in an
    earlier read ends in an abort where one read gets a clean 502 (exchange.py rule 5)."""
    data = case.answer
    base = response_outcome(loop, case, [data])
    head_end = _final_head_end(data)
    diffs: dict[tuple, list[str]] = {}

    def compare(label: str, pieces: list[bytes]) -> None:
        got = response_outcome(loop, case, pieces)
        if got == base:
            return
        # Some read (not the last) ended at or after the end of the final response's head.
        late = head_end is not None and any(end >= head_end for end in list(accumulate(map(len, pieces)))[:-1])
        if _failed_clean(base) and _aborted(got) and late and got[2] == base[2]:
            return
        diffs.setdefault(got, []).append(label)

    for i in boundaries(data):
        compare(f"cut {i} {data[max(0, i - 6):i]!r}|{data[i:i + 6]!r}", [data[:i], data[i:]])
    for pieces in multi_cuts(data):
        compare(f"cuts {[len(p) for p in pieces]}", pieces)
    if len(data) > 1:
        compare("byte by byte", byte_by_byte(data))
    if diffs:
        lines = [f"one read: {show_response(base)}"]
        for got, labels in diffs.items():
            lines.append(f"{len(labels)} deliveries, e.g. {labels[:4]}: {show_response(got)}")
        raise AssertionError("\n".join(lines))
    return base


def _final_head_end(data: bytes) -> int | None:
    """Where the head of the first non-1xx response in `data` ends."""
    i = 0
    while True:
        end = data.find(b"\r\n\r\n", i)
        if end < 0:
            return None
        if not data[i + 9 : i + 10] == b"1":
            return end + 4
        i = end + 4


def show_response(outcome: tuple) -> str:
    (messages, rest), state, upstream, follow = outcome
    shown = [(m[0][:300], m[1], m[2][:80], *m[3:]) for m in messages]
    return f"client={shown} rest={[r[:200] for r in rest]!r} state={state} upstream={upstream} follow-up={follow}"


OK5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED_EXT_TRAILERS = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
                        b'5;a=b\r\nhello\r\n6;x="y z"\r\n world\r\n0;e\r\nX-T: 1\r\nX-U: 2\r\n\r\n')


def _big_fields(total: int, prefix: bytes = b"X-B") -> bytes:
    """Field lines `X-Bnnn: hhh...` whose lengths (CRLF included) add up to exactly `total`."""
    lines = []
    i = 0
    while total > 0:
        name = b"%s%04d: " % (prefix, i)
        size = min(1000, total)
        if total - size < len(name) + 3 and total - size > 0:
            size = total - (len(name) + 3)
        lines.append(name + b"h" * (size - len(name) - 2) + b"\r\n")
        total -= size
        i += 1
    out = b"".join(lines)
    return out


HEAD_AT_BOUND = b"HTTP/1.1 200 OK\r\n" + _big_fields(MAX_RESPONSE_HEAD) + b"Content-Length: 5\r\n\r\nhello"
HEAD_RAW_AT_BOUND = (b"HTTP/1.1 200 OK\r\n" + _big_fields(MAX_RESPONSE_HEAD - 17 - 19 - 2)
                     + b"Content-Length: 5\r\n\r\nhello")
EARLY_HINTS_BIG = (b"HTTP/1.1 103 Early Hints\r\n" + _big_fields(40_000, b"Link") + b"\r\n"
                   b"HTTP/1.1 200 OK\r\n" + _big_fields(30_000) + b"Content-Length: 5\r\n\r\nhello")
TRAILERS_TE = b"GET /case HTTP/1.1\r\n" + HOST + b"TE: trailers\r\n\r\n"

OWN_RESPONSES: list[Resp] = [
    Resp("ok-length", OK5),
    Resp("ok-length-empty", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    Resp("chunked-ext-trailers", CHUNKED_EXT_TRAILERS),
    Resp("chunked-ext-trailers-te-trailers", CHUNKED_EXT_TRAILERS, request=TRAILERS_TE),
    Resp("chunked-last-only", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    Resp("chunked-zeros", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n003\r\nabc\r\n000\r\n\r\n"),
    Resp("chunked-then-extra", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nHTTP/1.1 200"),
    Resp("100-then-200", b"HTTP/1.1 100 Continue\r\n\r\n" + OK5),
    Resp("100-100-then-200", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\nX: y\r\n\r\n" + OK5),
    Resp("103-then-chunked", b"HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n" + CHUNKED_EXT_TRAILERS),
    Resp("until-close", b"HTTP/1.1 200 OK\r\nX: y\r\n\r\nuntil\r\nclose", eof=True),
    Resp("until-close-http10-client", b"HTTP/1.1 200 OK\r\n\r\nuntil close", eof=True,
         request=b"GET /case HTTP/1.0\r\n\r\n"),
    Resp("http10-response", b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    Resp("connection-close", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello"),
    Resp("keep-alive-timeout", b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=30\r\nContent-Length: 5\r\n\r\nhello"),
    Resp("head-length", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", request=b"HEAD /case HTTP/1.1\r\n" + HOST
         + b"\r\n", method=b"HEAD"),
    Resp("head-chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
         request=b"HEAD /case HTTP/1.1\r\n" + HOST + b"\r\n", method=b"HEAD"),
    Resp("no-content", b"HTTP/1.1 204 No Content\r\nX: y\r\n\r\n"),
    Resp("not-modified", b'HTTP/1.1 304 Not Modified\r\nETag: "v"\r\n\r\n'),
    Resp("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 5\r\n\r\nhello"),
    Resp("bad-chunk-late", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n0\r\n\r\n"),
    Resp("truncated-length", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", eof=True),
    Resp("head-below-bound", b"HTTP/1.1 200 OK\r\n" + _big_fields(60_000) + b"Content-Length: 5\r\n\r\nhello"),
    Resp("head-raw-at-bound", HEAD_RAW_AT_BOUND),
    Resp("head-fields-at-bound", HEAD_AT_BOUND),
    Resp("early-hints-big-then-200", EARLY_HINTS_BIG),
    Resp("trailers-below-bound", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
         + _big_fields(15_000, b"X-T") + b"\r\n", request=TRAILERS_TE),
    Resp("trailers-over-bound", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
         + _big_fields(20_000, b"X-T") + b"\r\n", request=TRAILERS_TE),
]


def _corpus_responses() -> list[Resp]:
    """The response cases of tests/test_smuggling_corpus.py (stray bytes to an idle connection are
    not a read-boundary question and stay there)."""
    return [
        Resp("corpus-" + c.id, c.respond, c.wire, c.method, c.action == "close")  # type: ignore[arg-type]
        for c in RESPONSE_CASES if c.action in ("keep", "close") and c.respond
    ]


ALL_RESPONSES = OWN_RESPONSES + _corpus_responses()
assert len({r.id for r in ALL_RESPONSES}) == len(ALL_RESPONSES)


# -- FINDING 4: the bound on a response head counts different bytes in one read and in several -------
#
# upstream.UpstreamProtocol bounds a response head (MAX_RESPONSE_HEAD, 64 KiB) twice: in
# data_received by the raw bytes read while no head is complete (`head_bytes`, which includes the
# status line, the fields on_header takes aside such as Content-Length, the blank line, and every
# 1xx head before, as it is never reset after a 1xx), and in on_headers_complete by the summed
# field lines kept for the client. A head whose kept field lines add up to exactly 64 KiB is
# relayed when it comes in one read and answered with 502 when a read ends in its last 38 bytes;
# a 103 with 40 KB of fields followed by a 200 with 30 KB is relayed in one read, and gets a 502
# after the 103 when the 200's head is cut. Fixed: the bound is on the kept field lines; the raw
# count, reset after each 1xx, only stops a runaway head (with 8 KiB of room above the bound).



@pytest.mark.parametrize("case", [pytest.param(r, id=r.id) for r in ALL_RESPONSES])
async def test_response_outcome_does_not_depend_on_read_boundaries(case: Resp) -> None:
    base = check_response_invariance(asyncio.get_running_loop(), case)
    (messages, rest), _, _, _ = base
    assert messages or rest, "the client got no response at all"


# == the findings, each as a minimal reproduction ====================================================


def statuses(outcome: tuple) -> list[bytes]:
    """The final statuses the client got, in order."""
    (messages, _), *_ = outcome
    return [m[0][9:12] for m in messages if m[1] != b"1xx"]


def forwarded(outcome: tuple) -> list[tuple[bytes, bytes]]:
    """(request line, decoded body) of every complete request the upstream received."""
    return [(r[0].split(b"\r\n", 1)[0], r[2]) for _, requests, _, _ in outcome[2] for r in requests]


def last_lf_of_head(data: bytes) -> int:
    return data.index(b"\r\n\r\n") + 3


async def test_finding1_valid_chunked_body_is_refused_when_a_read_ends_inside_the_head_terminator() -> None:
    # The head's CRLFCR in one read, then `\nA\r\n0123`, then the rest: the chunk guard is created at
    # the end of the head but first fed the next read, and takes `456789` for a chunk size (413).
    data = post(TE_CH, b"A\r\n0123456789\r\n0\r\n\r\n")
    e = last_lf_of_head(data)
    out = request_outcome(asyncio.get_running_loop(), [data[:e], data[e : e + 8], data[e + 8 :]], {}, {})
    assert statuses(out) == [b"200"]
    assert forwarded(out) == [(b"POST /p HTTP/1.1", b"0123456789")]


async def test_finding1_chunk_extension_limit_holds_when_a_read_ends_inside_the_head_terminator() -> None:
    data = post(TE_CH, LONG_EXT_CH)  # 2 KB of extensions: 400 (F10), in one read
    e = last_lf_of_head(data)
    assert statuses(request_outcome(asyncio.get_running_loop(), [data], {}, {})) == [b"400"]
    out = request_outcome(asyncio.get_running_loop(), [data[:e], data[e:]], {}, {})
    assert statuses(out) == [b"400"]
    assert forwarded(out) == []


async def test_finding1_pipelined_rtsp_request_is_refused_when_a_read_ends_inside_the_head_terminator() -> None:
    data = get(b"/1") + b"DESCRIBE /r RTSP/1.0\r\n" + HOST + b"\r\n"
    e = last_lf_of_head(data)
    out = request_outcome(asyncio.get_running_loop(), [data[:e], data[e:]], {}, {})
    assert statuses(out) == [b"200", b"400"]
    assert forwarded(out) == [(b"GET /1 HTTP/1.1", b"")]  # not `DESCRIBE /r HTTP/1.1` as HTTP/1.0


async def test_finding1_bare_lf_before_a_pipelined_request_is_refused_when_a_read_ends_inside_the_head_terminator(
) -> None:
    data = get(b"/1") + b"\n" + get(b"/2")  # R3 / RFC 9112 §2.2: 200, then 400 and close
    e = last_lf_of_head(data)
    out = request_outcome(asyncio.get_running_loop(), [data[:e - 1], data[e - 1 :]], {}, {})
    assert statuses(out) == [b"200", b"400"]
    assert forwarded(out) == [(b"GET /1 HTTP/1.1", b"")]


async def test_finding2_transfer_encoding_htab_head_in_two_reads_is_accepted_as_in_one() -> None:
    loop = asyncio.get_running_loop()
    data = post(b"Transfer-Encoding: chunked\t\r\n", HELLO_CH)
    one = request_outcome(loop, [data], {}, {})
    assert statuses(one) == [b"200"] and forwarded(one) == [(b"POST /p HTTP/1.1", b"hello")]
    cut = request_outcome(loop, [data[:10], data[10:]], {}, {})  # cut inside the request line
    assert statuses(cut) == [b"200"]
    assert forwarded(cut) == forwarded(one)


async def test_finding3_raw_request_head_bound_is_the_same_in_one_read_and_byte_by_byte() -> None:
    loop = asyncio.get_running_loop()
    data = get(fields=OWS_PAD)
    assert len(data) > ClientConfig().max_request_line + ClientConfig().max_header_size + 2 * 8192
    one = request_outcome(loop, [data], {}, {})
    bytewise = request_outcome(loop, byte_by_byte(data), {}, {})
    assert statuses(one) == statuses(bytewise), (statuses(one), statuses(bytewise))


@pytest.mark.parametrize("answer", [HEAD_AT_BOUND, EARLY_HINTS_BIG], ids=["fields-at-64k", "103-then-200"])
async def test_finding4_response_head_bound_is_the_same_in_one_read_and_cut(answer: bytes) -> None:
    loop = asyncio.get_running_loop()
    case = Resp("finding4", answer)
    one = response_outcome(loop, case, [answer])
    cut = response_outcome(loop, case, [answer[:-10], answer[-10:]])  # the last read: `5\r\n\r\nhello`
    assert statuses(one) == [b"200"]
    assert statuses(cut) == statuses(one)


# == the harness itself ==============================================================================


def test_long_inputs_are_cut_at_every_boundary_of_the_first_lines_short_lines_and_line_ends() -> None:
    data = get(b"/" + b"a" * 3000, b"X-Big: " + b"v" * 3000 + b"\r\n") + b"5;e=1\r\nhello\r\n"
    cuts = set(boundaries(data))
    first_two = data.index(b"\r\n", data.index(b"\r\n") + 2) + 2
    assert set(range(1, first_two + 1)) <= cuts  # the request line and the first header line
    assert set(range(len(data) - 14, len(data))) <= cuts  # a chunk-size line and its data line
    for i, byte in enumerate(data):
        if byte in (10, 13):
            assert {i, i + 1} & set(range(1, len(data))) <= cuts
    assert len(cuts) < len(data) - 2500  # the long X-Big line (third) is sampled


def test_only_a_read_that_starts_inside_a_head_terminator_and_goes_on_counts_as_straddling() -> None:
    data = get(b"/1") + get(b"/2")
    inside = head_terminator_cuts(data)
    e = last_lf_of_head(data)
    assert set(inside) == {e - 2, e - 1, e, len(data) - 3, len(data) - 2, len(data) - 1}
    assert straddles([data[:e], data[e:]], inside)
    assert not straddles([data[:e], data[e : e + 1], data[e + 1 :]], inside)
    assert not straddles(byte_by_byte(data), inside)
    assert not straddles([data[: e + 1], data[e + 1 :]], inside)
