"""Audit 22: the actual HTTP Garden material (narfindustries/http-garden), ported case by case.

Ported, each case named after the Garden's own name for it:

- `tools/diff_fuzz.py` `SEEDS`: the fuzzer's three seed streams (`seed-0`..`seed-2`), and the
  three as one pipelined stream, as the fuzzer sends its streams.
- `TROPHIES.md` "Server Bugs" 1-48 (`server-bug-NN`) and "Transducer Bugs" 1-25 (`transducer-bug-NN`;
  the list has no 8): every payload, sent to laneproxy as a client request (server bug 22 and
  transducer bug 18 quote the same bytes as server bugs 1 and 21, so they are ported once). The Garden payloads are
  quoted byte for byte; where a payload has no `Host` (laneproxy refuses that alone, R7), a
  `Host: a` line is added so the interesting part is exercised, and `test_hostless_payloads_verbatim`
  sends the untouched payload too. Server bugs 25 and 32 quote a truncated payload (completed, noted
  at the case). "Bonus bugs" 3 and 4 carry payloads (`bonus-bug-N`); bonus bugs
  1, 2, 5 have none ("any request"), and the "Bonus Bonus Bugs" are HTTP/2-to-1 downgrades
  (skipped: laneproxy speaks HTTP/1.1 only).
- The Garden's streams are lists of separate writes (`stream_t`): every payload whose first head is
  followed by more bytes is sent again cut after that head (`...-split`).
- The same payload classes as upstream *responses* (`resp-server-bug-NN`, `resp-transducer-bug-NN`),
  where the malformation is meaningful in a response (framing, field syntax, chunk syntax).
- `tools/diagnose_anomalies.py`, the Garden's probes of what a transducer does to a plain request
  (`anomaly-*`): Host handling, persistence, HTTP/0.9, version rewriting, the method character
  blacklist and method whitelist (the 56 `METHODS` of `tools/http1.py`), removed, added and
  "trashed" headers, header-name translation, length in POST.
- The Garden's transducer verdict (`tools/diff_fuzz.py` `stream_is_invalid`/`categorize_discrepancy`,
  `tools/http1.py` `HTTPRequest.is_valid`): what a transducer emits must be a valid stream that
  every server parses the same way, with names made of tchars and no CR, LF or NUL in values. Here
  that is `strict_requests` plus h11 (tests/test_smuggling_corpus.py) on every upstream byte, and
  `garden_is_valid` on every forwarded request.

Assertions are the corpus harness's (`drive`, `check_client`, `check_upstream`): laneproxy refuses
per docs/http-rules.md or forwards canonical, unambiguous bytes; nothing smuggled reaches the
upstream; the client gets exactly the expected responses and connection state; a canary on a fresh
connection gets its own 200. Each case has its own proxy and upstream (the harness checks all the
bytes an upstream got), and a group's cases run concurrently.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import pytest

from tests.conftest import make_config
from tests.test_smuggling_corpus import (
    BASE_CFG,
    CASE_GET,
    POST,
    Backend,
    Case,
    Fwd,
    Want,
    _not_in_raw,
    _status_is,
    accept,
    check_client,
    check_upstream,
    drive,
    reject,
    respond,
    settle,
    upstream_requests,
)

pytestmark = pytest.mark.timeout(40)

TE_CH = b"Transfer-Encoding: chunked\r\n"
SECOND = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"
OK_HEAD = b"HTTP/1.1 200 OK\r\n"


def G(target: bytes = b"/", host: bytes | None = b"a", **kw) -> Want:
    return Want(b"GET", target, host=host, **kw)


def P(body: bytes, framing: str = "cl", target: bytes = b"/", host: bytes | None = b"a", **kw) -> Want:
    return POST(body, framing, target=target, host=host, **kw)


# == tools/diff_fuzz.py SEEDS ========================================================================

SEED_0 = b"GET / HTTP/1.1\r\n\r\n"
SEED_1 = b"POST / HTTP/1.1\r\nContent-Length: 10\r\nHost: b\r\n\r\n0123456789"
SEED_2 = b"POST / HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n01234\r\n5\r\n56789\r\n0\r\n\r\n"

SEED_CASES: list[Case] = [
    reject("seed-0", SEED_0, 400, "R7: no Host (also diagnose_anomalies allows_missing_host_header)"),
    accept("seed-1", SEED_1, P(b"0123456789", host=b"b")),
    accept("seed-2", SEED_2, P(b"0123456789", "chunked", host=b"c"), note="chunked stays chunked, canonical"),
    Case("seeds-1-2-pipelined", SEED_1 + SEED_2, {200: (P(b"0123456789", host=b"b"),
                                                         P(b"0123456789", "chunked", host=b"c"))}, more=(200,)),
    Case("seeds-0-1-2-pipelined", SEED_0 + SEED_1 + SEED_2, {400: ()}, forbid=(b"0123456789",),
         note="the first request is refused and the connection closed: nothing behind it is parsed"),
]


# == TROPHIES.md Server Bugs =========================================================================
# Each: (Garden number, payload as quoted in TROPHIES.md, payload sent (None: the same), outcome).

ILLEGAL_NAME = (b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\t\x0b\x0c\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19"
                b"\x1a\x1b\x1c\x1d\x1e\x1f \"(),/;<=>?@[/]{}")
GET_ID2 = b"GET / HTTP/1.1\r\nHost: a\r\nid: 2\r\n\r\n"
assert len(GET_ID2) == 34

SERVER_BUGS: list[tuple[int, bytes, bytes | None, Callable[[str, bytes], Case]]] = [
    (1, b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0_2e\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n", None, lambda i, s: reject(i, s, 400, "F10: `0_2e` is no chunk-size")),
    (2, b"GET / HTTP/1.1\r\nHost: a\r\nHeader: v\x00\ralue\r\n\r\n", None, lambda i, s: reject(i, s, 400, "R12/R2")),
    (3, b"GET / HTTP/1.1\r\nHost: whatever\r\nContent-Length : 34\r\n\r\nGET / HTTP/1.1\r\nHost: whatever\r\n\r\n",
     None, lambda i, s: reject(i, s, 400, "R10")),
    (4, b"GET / HTTP/1.1\r\n\tContent-Length: 1\r\n\r\nX", b"GET / HTTP/1.1\r\n\tContent-Length: 1\r\nHost: a\r\n\r\nX",
     lambda i, s: reject(i, s, 400, "R4")),
    (5, b"GET /test HTTP/1.32\r\n\r\n", b"GET /test HTTP/1.32\r\nHost: a\r\n\r\n",
     lambda i, s: reject(i, s, (400, 505), "version is exactly DIGIT.DIGIT")),
    (6, b'G=":<>(e),[T];?" /get HTTP/1.1\r\n\r\n', b'G=":<>(e),[T];?" /get HTTP/1.1\r\nHost: a\r\n\r\n',
     lambda i, s: reject(i, s, (400, 501), "R5: the method is no token; never forwarded as `G`")),
    (7, b"GET ! HTTP/1.1\r\n\r\n", b"GET ! HTTP/1.1\r\nHost: a\r\n\r\n", lambda i, s: reject(i, s, 400, "R5")),
    (8, b"GET / HTTP/1.1\r\n\xefoo: bar\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n\xefoo: bar\r\n\r\n",
     lambda i, s: reject(i, s, 400, "RFC 9110 5.1 token")),
    (9, b"GET /\nHTTP/1.1\r\n\r\n", b"GET /\nHTTP/1.1\r\nHost: a\r\n\r\n", lambda i, s: reject(i, s, 400, "R3")),
    (10, b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: +1_0\r\n\r\n0123456789", None,
     lambda i, s: reject(i, s, 400, "F5")),
    (11, b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nZ\r\n0\r\n\r\n",
     b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nZ\r\n"
     b"0\r\n\r\n",
     lambda i, s: reject(i, s, 400, "chunked applied twice")),
    (12, b"POST / HTTP/1.1\r\nHost: whatever\r\nTransfer-Encoding: \xa0chunked\xa0\r\n\r\n0\r\n\r\n", None,
     lambda i, s: reject(i, s, (400, 501), "a2: obs-text refused in TE")),
    (13, b"GET / HTTP/1.1\r\nVisible: :/\rSmuggled: :)\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n"
         b"Visible: :/\rSmuggled: :)\r\n\r\n",
     lambda i, s: reject(i, s, 400, "R2", forbid=(b"Smuggled",))),
    (14, b"GET / HTTP/1.1\r\n" + ILLEGAL_NAME + b": whatever\r\n\r\n",
     b"GET / HTTP/1.1\r\nHost: a\r\n" + ILLEGAL_NAME + b": whatever\r\n\r\n", lambda i, s: reject(i, s, 400, "token")),
    (15, b"GET / HTTP/\r\r1.1\r\n\r\n", b"GET / HTTP/\r\r1.1\r\nHost: a\r\n\r\n", lambda i, s: reject(i, s, 400, "R2")),
    (16, b"GET / HTTP/1.1\r\nHost: whatever\r\nContent-Length: \r\n\r\n", None, lambda i, s: reject(i, s, 400, "F5")),
    (17, b"GET / HTTP/1.1\r\nHost: whatever\r\nTransfer-Encoding: chunked\r\n\r\n\r\n\r\n", None,
     lambda i, s: reject(i, s, 400, "empty chunk-size is no 0")),
    (18, b"GET / HTTP/1.1\r\n: ignored\r\nHost: whatever\r\n\r\n", None, lambda i, s: reject(i, s, 400, "empty name")),
    (19, b"GET / HTTP/1.1\r\nHost: a\r\nUseless:\n\nGET / HTTP/1.1\r\n\r\n", None,
     lambda i, s: reject(i, s, 400, "R3")),
    (20, b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length\x85: 10\r\n\r\n0123456789", None,
     lambda i, s: reject(i, s, 400, "token")),
    (21, b"GET / HTTP/1.1\r\nHost: whatever\r\nTransfer-Encoding: ,chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", None,
     lambda i, s: reject(i, s, 400, "F1")),
    # 22: its TROPHIES.md payload is server bug 1's, byte for byte (ported once, as server-bug-01).
    (23, b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 0\r\n\r\nZ", None,
     lambda i, s: reject(i, s, 400, "F5")),
    (24, b"GET / HTTP/4294967295.255\r\n\r\n", b"GET / HTTP/4294967295.255\r\nHost: a\r\n\r\n",
     lambda i, s: reject(i, s, (400, 505), "version")),
    # 25: TROPHIES.md quotes only the head (`GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n`); the bug is
    # strtoll(,,16) accepting `0x`, `+`, `-`: `+0` is sent (0x and -1 are in the corpus already).
    (25, b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
     b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n+0\r\n\r\n",
     lambda i, s: reject(i, s, 400, "F10")),
    (26, b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -48\r\n\r\n", None, lambda i, s: reject(i, s, 400, "F5")),
    (27, b"GET / HTTP/1.1\r\n:\r\nI: am chopped off\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n:\r\n"
         b"I: am chopped off\r\n\r\n",
     lambda i, s: reject(i, s, 400, "empty name")),
    (28, b"GET / HTTP/1.1\r\nContent-Length 10\r\n\r\n0123456789",
     b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length 10\r\n\r\n0123456789", lambda i, s: reject(i, s, 400, "no colon")),
    (29, b"GET / HTTP/1.1\r\nContent-Length: 1Z\r\n\r\nZ", b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1Z\r\n\r\nZ",
     lambda i, s: reject(i, s, 400, "F5")),
    (30, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\rZGET /evil: HTTP/1.1\r\nHost: a\r\n\r\n", None,
     lambda i, s: Case(i, s, {200: (G(),)}, more=(400,), conn="close", forbid=(b"/evil",),
                       note="the head ends at CRLFCRLF; `\\rZGET` is a bad next request (R2)")),
    (31, b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\r;ABCD\r\n34\r\nE\r\n0\r\n\r\n"
         b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", None,
     lambda i, s: reject(i, s, 400, "funky chunks: R2")),
    # 32: the quoted body is 8 bytes for `Content-Length: 010`; two more are sent so the body is complete.
    (32, b"GET / HTTP/1.1\r\nHost: whatever\r\nContent-Length: 010\r\n\r\n01234567",
     b"GET / HTTP/1.1\r\nHost: whatever\r\nContent-Length: 010\r\n\r\n0123456789",
     lambda i, s: accept(i, s, G(host=b"whatever", body=b"0123456789", framing="cl"), forbid=(b"010",),
                         note="F6: decimal, canonical `10`")),
    (33, b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 1\r\n\r\nZ", None,
     lambda i, s: reject(i, s, 400, "F5")),
    (34, b"GET / HTTP/1.1\r\nHost: whatever\r\nHeader: va\rlue\r\n\r\n", None, lambda i, s: reject(i, s, 400, "R2")),
    (35, b"GET / HTTP/1.1\r\nHost: whatever\r\nTest: test\x00THESE BYTES GET DROPPED\r\nConnection: close\r\n"
         b"\r\n", None,
     lambda i, s: reject(i, s, 400, "R12", forbid=(b"THESE BYTES",))),
    (36, b"POST /abc HTTP/1.1\r\nTransfer-Encoding: chunked\r\nHost: h2o.http-garden.us\r\n\r\n41;a=b\r\r" + b"X" * 65
         + b"\r\n0\r\n\r\nGET /bad_path/pwned HTTP/1.1\r\nHost: a\r\nContent-Length: 412\r\n\r\n0\r\n\r\n"
         b"GET /def HTTP/1.1\r\nHost: h2o.http-garden.us\r\n\r\n", None,
     lambda i, s: reject(i, s, 400, "R2 in a chunk extension", forbid=(b"/bad_path", b"/def"))),
    (37, b"POST / HTTP/1.1\r\nHost: whatever\r\nTransfer-\r\nEncoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n"
         b"\r\n", None,
     lambda i, s: reject(i, s, 400, "no colon")),
    (38, b"GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: \r\n\r\nGET / HTTP/1.1\r\nHost: localhost\r\n"
         b"\r\n", None,
     lambda i, s: reject(i, s, 400, "F5")),
    (39, b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX:POST / HTTP/1.1\r\n\r\n",
     b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX:POST / HTTP/1.1\r\n\r\n",
     lambda i, s: accept(i, s, G(body=b"", framing="chunked"), forbid=(b"X:POST", b"POST /"),
                         note="F11: the trailer is dropped, never forwarded")),
    (40, b"\x00 / HTTP/............0596.7407.\r\n\r\n", b"\x00 / HTTP/............0596.7407.\r\nHost: a\r\n\r\n",
     lambda i, s: reject(i, s, 400, "R5")),
    (41, b"GET /login HTTP/1.1\r\nHost: a\r\nUser: \x85admin\xa0\r\n\r\n", None,
     lambda i, s: accept(i, s, G(b"/login", fields=((b"user", (b"\x85admin\xa0",)),)),
                         note="a2: obs-text forwarded as opaque bytes, never stripped")),
    (42, b"GET / HTTP/1.1\r\nContent-Length: \r\nContent-Length: 43\r\n\r\nPOST /evil HTTP/1.1\r\n"
         b"Content-Length: 18\r\n\r\n"
         b"GET / HTTP/1.1\r\n\r\n",
     b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\nContent-Length: 43\r\n\r\nPOST /evil HTTP/1.1\r\n"
     b"Content-Length: 18"
     b"\r\n\r\nGET / HTTP/1.1\r\n\r\n", lambda i, s: reject(i, s, 400, "F5", forbid=(b"/evil",))),
    (43, b"GET / HTTP/1.1\r\nEvil: evil\x00\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\nEvil: evil\x00\r\n\r\n",
     lambda i, s: reject(i, s, 400, "R12")),
    (44, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: blegh\r\n\r\n1\r\nZ\r\n0\r\n\r\n", None,
     lambda i, s: reject(i, s, (400, 501), "F3")),
    (45, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nInvalid\r\n\r\n",
     b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nInvalid\r\n\r\n",
     lambda i, s: Case(i, s, {200: (G(),)}, conn="close", forbid=(b"Invalid",),
                       note="a2 pitfall 4: serve the first request, then close")),
    (46, b"POST / HTTP/1.1\r\nHost: \xffa\xff\r\nTransfer-Encoding: \xffchunked\xff\r\n\r\n1\r\nZ\r\n0\r\n\r\n", None,
     lambda i, s: reject(i, s, (400, 501), "a2: obs-text refused in Host and TE")),
    (47, b"POST / HTTP/1.1\r\nHost: whatever\r\nTransfer-Encoding: chunked\r\n\r\nINVALID!!!\r\nGET / HTTP/1.1\r\n"
         b"Host: whatever\r\n\r\n", None, lambda i, s: reject(i, s, 400, "F10; closed, no next message")),
    # 48: two writes, as TROPHIES.md quotes two strings; the second request's 34-byte body is the third.
    (48, b"POST / HTTP/1.1\r\nContent-Length: 0\r\nConnection:keep-alive\r\nHost: a\r\nid: 0\r\n\r\nPOST / HTTP/1.1\r\n"
         b"Host: a\r\nid: 1\r\nContent-Length: 34\r\n\r\n" + GET_ID2, None,
     lambda i, s: Case(i, (s[: -len(GET_ID2)], GET_ID2),
                       {200: (P(b"", fields=((b"id", (b"0",)),)), P(GET_ID2, fields=((b"id", (b"1",)),)))},
                       more=(200,), note="P3: the body of request 1 is never request 2")),
]


# == TROPHIES.md Transducer Bugs =====================================================================

TRANSDUCER_BUGS: list[tuple[int, bytes, bytes | None, Callable[[str, bytes], Case]]] = [
    (1, b"POST / HTTP/1.1\r\nHost: akamai.my-domain.cool\r\nContent-Length: 0x10\r\n\r\nZ", None,
     lambda i, s: reject(i, s, 400, "F5")),
    (2, b"POST / HTTP/1.1\r\nHost: akamai.my-domain.cool\r\nTransfer-Encoding: chunked\r\n\r\nZ\r\nZZ\r\nZZZ\r\n"
         b"\r\n", None,
     lambda i, s: reject(i, s, 400, "F10")),
    (3, b"POST / HTTP/1.1\r\nHost: server.my-domain.cool\r\nTransfer-Encoding: chunked\r\n\r\n2\r\r;a\r\n02\r\n"
        b"41\r\n0\r\n\r\nGET /bad_path/pwned HTTP/1.1\r\nHost: a\r\nContent-Length: 430\r\n\r\n0\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: server.my-domain.cool\r\n\r\n", None,
     lambda i, s: reject(i, s, 400, "R2", forbid=(b"/bad_path",))),
    (4, b"POST /  HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r0\n",
     b"POST /  HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r0\n", lambda i, s: reject(i, s, 400, "R2")),
    (5, b"GET / HTTP/1.1\r\nhost: whatever\r\ncontent-length: \r\n\r\n", None, lambda i, s: reject(i, s, 400, "F5")),
    (6, b"GET / HTTP/1.1\r\nHost: fanout\r\nHeader\x85: value\r\n\r\n", None, lambda i, s: reject(i, s, 400, "token")),
    (7, b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1these-bytes-never-get-validated\r\nZ\r\n0\r\n\r\n",
     b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1these-bytes-never-get-validated\r\nZ\r\n"
     b"0\r\n\r\n",
     lambda i, s: reject(i, s, 400, "F10")),
    (9, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n", None,
     lambda i, s: Case(i, s, {200: (P(b"", "chunked"),), 400: ()}, forbid=(b",chunked",),
                       note="a2: canonical `chunked` or 400")),
    (10, b"GET / HTTP/1.1\r\nInvalid-Header: this\rvalue\ris\rinvalid\r\n\r\n",
     b"GET / HTTP/1.1\r\nHost: a\r\nInvalid-Header: this\rvalue\ris\rinvalid\r\n\r\n",
     lambda i, s: reject(i, s, 400, "R2")),
    (11, b"GET / HTTP/1.1\r\nhost: whatever\r\ncontent-length: \r\ncontent-length: 59\r\n\r\n"
         b"POST /evil HTTP/1.1\r\nhost: whatever\r\ncontent-length: 34\r\n\r\n"
         b"GET / HTTP/1.1\r\nhost: whatever\r\n\r\n", None,
     lambda i, s: reject(i, s, 400, "F5 (CVE-2023-40225)", forbid=(b"/evil",))),
    (12, b"GET / HTTP/1.1\r\nHost: google.com\x00.kallus.org\r\n\r\n", None,
     lambda i, s: reject(i, s, 400, "R12", forbid=(b"kallus",))),
    (13, b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\n0\r\n\r\n",
     b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\n0\r\n\r\n",
     lambda i, s: reject(i, s, 400, "R3")),
    (14, b"GET / HTTP/1.1\r\nHost: whatever\r\nTe\nst: test\r\nConnection: close\r\n\r\n", None,
     lambda i, s: reject(i, s, 400, "R3")),
    (15, b"GET / HTTP/1.1\r\nHost: whatever\r\nTransfer-Encoding: ,chunked\r\nContent-Length: 5\r\n"
         b"Connection: close\r\n\r\n0r\n\r\n", None, lambda i, s: reject(i, s, 400, "F1")),
    (16, b"GET / HTTP/1.1\nHost: whatever\nConnection: close\n\n", None, lambda i, s: reject(i, s, 400, "R3")),
    (17, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n17\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n"
         b"\r\n\r\n0\r\n\r\n", None, lambda i, s: reject(i, s, 400, "an empty chunk-size line")),
    # 18: its TROPHIES.md payload is server bug 21's, byte for byte (ported once, as server-bug-21).
    (19, b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-0x0\r\n\r\n",
     b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-0x0\r\n\r\n",
     lambda i, s: reject(i, s, 400, "F10")),
    (20, b"GET / HTTP/1.1\r\na:b\r\nc\x00\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\na:b\r\nc\x00\r\n\r\n",
     lambda i, s: reject(i, s, 400, "no colon, NUL")),
    (21, b"GET / HTTP/1.1\r\nContent-Length: 10\r\n\r\n1234567890",
     b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n1234567890",
     lambda i, s: accept(i, s, G(body=b"1234567890", framing="cl"),
                         note="a GET body is forwarded with its length, never stripped while the CL stays")),
    (22, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 31\r\n\r\nGET /evil HTTP/1.1\r\n"
         b"Host: a\r\n\r\n",
     None, lambda i, s: reject(i, s, 400, "F5", forbid=(b"/evil",))),
    (23, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", None,
     lambda i, s: reject(i, s, 400, "F1")),
    (24, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n           0\r\n\r\n", None,
     lambda i, s: reject(i, s, 400, "F10")),
    (25, b"POST / HTTP/1.1\r\nHost: whatever\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"0\r\n\r\n",
     None, lambda i, s: reject(i, s, 400, "chunked applied twice")),
]

BONUS_BUGS: list[tuple[int, bytes, bytes | None, Callable[[str, bytes], Case]]] = [
    (3, b"GET / HTTP/1.1\r\nHost: whatever\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\x00", None,
     lambda i, s: Case(i, s, {200: (G(host=b"whatever", framing="chunked"),)}, more=(400,), conn="close",
                       note="the extra byte is a bad next request")),
    (4, b"POST / HTTP/1.1\r\nHost: whatever\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nZ\r\n0\r\n\r\n", None,
     lambda i, s: accept(i, s, P(b"Z", "chunked", host=b"whatever"), note="the body goes upstream once, as body")),
]


def _build(prefix: str, table) -> list[Case]:
    return [make(f"{prefix}-{num:02d}", sent if sent is not None else quoted) for num, quoted, sent, make in table]


def _hostless(prefix: str, table) -> list[Case]:
    """The quoted payloads that have no Host line, sent untouched: refused, nothing forwarded."""
    out = []
    for num, quoted, sent, _ in table:
        if sent is not None and b"\nhost:" not in quoted.lower():
            out.append(reject(f"{prefix}-{num:02d}-verbatim", quoted, (400, 501, 505), "R7 or the payload's own fault"))
    return out


def _split(cases: list[Case]) -> list[Case]:
    """The Garden sends a stream as separate writes: each payload again, cut after its first head."""
    out = []
    for c in cases:
        cut = c.wire.find(b"\r\n\r\n") + 4
        if isinstance(c.send, bytes) and 4 <= cut < len(c.wire):
            out.append(dataclasses.replace(c, id=c.id + "-split", send=(c.wire[:cut], c.wire[cut:])))
    return out


SERVER_CASES = _build("server-bug", SERVER_BUGS)
TRANSDUCER_CASES = _build("transducer-bug", TRANSDUCER_BUGS) + _build("bonus-bug", BONUS_BUGS)
HOSTLESS_CASES = _hostless("server-bug", SERVER_BUGS) + _hostless("transducer-bug", TRANSDUCER_BUGS)
SPLIT_CASES = _split(SEED_CASES + SERVER_CASES + TRANSDUCER_CASES)


# == tools/diagnose_anomalies.py: what the transducer does to plain requests ==========================

FORWARDED_SET = {b"host", b"x-real-ip", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via"}
# diagnose_anomalies._REMOVED_HEADERS, each on `GET / HTTP/1.1\r\nHost: a\r\n<name>: <value>\r\n\r\n`:
# what laneproxy forwards for it (interface.md "What the upstream receives").
REMOVED_HEADERS: list[tuple[bytes, bytes, tuple[bytes, ...]]] = [
    (b"connection", b"keep-alive", ()),
    (b"content-length", b"0", ()),
    (b"X-Forwarded-For", b"172.18.0.1", (b"127.0.0.1",)),
    (b"X-Forwarded-Port", b"80", (b"80",)),
    (b"Forwarded", b"proto=http;host=whatever", (b"proto=http;host=whatever",)),
    (b"X-Forwarded-Proto", b"http", (b"http",)),
    (b"X-Forwarded-Host", b"whatever", (b"a",)),
    (b"Max-Forwards", b"10", (b"10",)),
]

ANOMALY_CASES: list[Case] = [
    accept("anomaly-requires-specific-host-header", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", G(),
           note="also get_trashed_headers: Host `a` arrives as `a`"),
    Case("anomaly-doesnt-support-persistence", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 2, {200: (G(), G())},
         more=(200,)),
    reject("anomaly-allows-http-0-9", b"GET /\r\n\r\n", 400, "a2"),
    reject("anomaly-method-whitelist-SLUDGE", b"SLUDGE / HTTP/1.1\r\nHost: a\r\n\r\n", (400, 501), "R6"),
    reject("anomaly-requires-alphabetical-method", b"0 / HTTP/1.1\r\nHost: a\r\n\r\n", (400, 501), "R6"),
    accept("anomaly-header-name-translation", b"GET / HTTP/1.1\r\nHost: a\r\na-b: test\r\n\r\n",
           G(fields=((b"a-b", (b"test",)), (b"a_b", ()))), note="never translated to `a_b`"),
    Case("anomaly-doesnt-support-version", b"GET / HTTP/1.0\r\nHost: a\r\n\r\n", {200: (G(),)}, conn="close",
         note="I1: forwarded as HTTP/1.1 (the walker checks the line); P2: the 1.0 client is closed"),
    Case("anomaly-doesnt-support-version-no-host", b"GET / HTTP/1.0\r\n\r\n", {200: (G(host=None),)}, conn="close",
         note="HTTP/1.0 needs no Host"),
    Case("anomaly-removed-headers-connection-close", b"GET / HTTP/1.1\r\nHost: a\r\nconnection: close\r\n\r\n",
         {200: (G(),)}, conn="close", note="P6"),
    accept("anomaly-requires-length-in-post", b"POST / HTTP/1.1\r\nHost: a\r\n\r\n", P(b""),
           note="a POST without a body: interface.md allows `Content-Length: 0`"),
    accept("anomaly-fails-sanity-check", b"GET / HTTP/1.1\r\nHost: whatever\r\n\r\n", G(host=b"whatever")),
    accept("anomaly-added-headers-get", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", G(), note="exactly laneproxy's own set"),
    accept("anomaly-added-headers-delete", b"DELETE / HTTP/1.1\r\nHost: a\r\n\r\n", Want(b"DELETE", b"/", host=b"a"),
           note="exactly laneproxy's own set"),
] + [
    accept(f"anomaly-removed-headers-{name.decode().lower()}-{value.decode()}",
           b"GET / HTTP/1.1\r\nHost: a\r\n%s: %s\r\n\r\n" % (name, value),
           G(fields=((name.lower(), kept),)), note="interface.md")
    for name, value, kept in REMOVED_HEADERS
]

# get_method_character_blacklist: `GET<c> / HTTP/1.1` for each tchar (a valid token, so forwarding it as
# is, or refusing an unknown method, are both correct); get_method_whitelist: each of tools/http1.py METHODS.
METHOD_CHARS = b"!#$%&'*+-.^_`|~"
GARDEN_METHODS = [
    b"ACL", b"ANNOUNCE", b"BASELINE-CONTROL", b"BIND", b"CHECKIN", b"CHECKOUT", b"COPY", b"DELETE", b"DESCRIBE",
    b"FLUSH", b"GET", b"GET_PARAMETER", b"LABEL", b"LINK", b"LOCK", b"M-SEARCH", b"MERGE", b"MKACTIVITY",
    b"MKCALENDAR", b"MKCOL", b"MKREDIRECTREF", b"MKWORKSPACE", b"MOVE", b"NOTIFY", b"ORDERPATCH", b"PATCH", b"PAUSE",
    b"PLAY", b"POST", b"PROPFIND", b"PROPPATCH", b"PURGE", b"PUT", b"QUERY", b"REBIND", b"RECORD", b"REDIRECT",
    b"REFRESH", b"REPORT", b"SEARCH", b"SETUP", b"SET_PARAMETER", b"SOURCE", b"SUBSCRIBE", b"TEARDOWN", b"UNBIND",
    b"UNCHECKOUT", b"UNKNOWN", b"UNLINK", b"UNLOCK", b"UNSET", b"UNSUBSCRIBE", b"UPDATE", b"UPDATEREDIRECTREF",
    b"VERSION-CONTROL", b"*",
]
assert len(GARDEN_METHODS) == 56


# Measured: laneproxy forwards the 31 methods llhttp knows in HTTP mode (ACL ... UNSUBSCRIBE, QUERY, M-SEARCH)
# and answers 400 to the other 25 (the RTSP methods, BASELINE-CONTROL, UPDATE, `*`, ...) and to every `GET<c>`.
def _method_case(id: str, method: bytes) -> Case:
    outcomes: dict[int, tuple[Want, ...]] = {400: (), 405: (), 501: ()}
    if method != b"*":
        framing = "cl" if method in (b"POST", b"PUT", b"PATCH") else "none"  # interface.md: may carry CL 0
        outcomes[200] = (Want(method, b"/", host=b"a", framing=framing),)
    return Case(id, b"%s / HTTP/1.1\r\nHost: a\r\n\r\n" % method, outcomes,
                note="forwarded exactly, or refused (R6)")


METHOD_CASES: list[Case] = (
    [_method_case(f"anomaly-method-character-blacklist-GET{chr(c)}", b"GET" + bytes([c]))
     for c in METHOD_CHARS]
    + [_method_case(f"anomaly-method-whitelist-{m.decode()}", m) for m in GARDEN_METHODS]
)


def _only_own_fields(fwds: list[Fwd]) -> None:
    names = {n for n, _ in fwds[0].headers}
    assert names == FORWARDED_SET, f"added/removed fields: {sorted(names ^ FORWARDED_SET)}"


UP_CHECKS: dict[str, Callable[[list[Fwd]], None]] = {
    "anomaly-added-headers-get": _only_own_fields,
    "anomaly-added-headers-delete": _only_own_fields,
}


# == the same classes as upstream responses ==========================================================

BAD_BODY = {502: (CASE_GET,), 200: (CASE_GET,)}  # 502 if the whole answer came in one read, else aborted
BAD_BODY_CONN = {502: "auto", 200: "abort"}


def head(fields: bytes, body: bytes = b"hello") -> bytes:
    return OK_HEAD + fields + b"\r\n" + body


def chunked(body: bytes) -> bytes:
    return OK_HEAD + TE_CH + b"\r\n" + body


def bad_chunks(id: str, body: bytes, note: str) -> Case:
    return respond(id, chunked(body), BAD_BODY, conn=BAD_BODY_CONN, check=_not_in_raw(b"smuggled"), note=note)


RESPONSE_CASES: list[Case] = [
    bad_chunks("resp-server-bug-01", b"0_2e\r\n\r\n" + SECOND, "F10"),
    respond("resp-server-bug-02", head(b"Header: v\x00\ralue\r\nContent-Length: 5\r\n"), note="R12/R2"),
    respond("resp-server-bug-10", head(b"Content-Length: +1_0\r\n", b"0123456789"), note="F5"),
    respond("resp-server-bug-11", chunked(b"")[:-2] + TE_CH + b"\r\n1\r\nZ\r\n0\r\n\r\n", note="chunked twice"),
    respond("resp-server-bug-12", head(b"Transfer-Encoding: \xa0chunked\xa0\r\n", b"0\r\n\r\n"), note="a2"),
    respond("resp-server-bug-13", head(b"Visible: :/\rSmuggled: :)\r\nContent-Length: 5\r\n"),
            check=_not_in_raw(b"Smuggled"), note="R2"),
    bad_chunks("resp-server-bug-17", b"\r\n\r\n" + SECOND, "empty chunk-size"),
    respond("resp-server-bug-18", head(b": ignored\r\nContent-Length: 5\r\n"), note="empty name"),
    respond("resp-server-bug-19", head(b"Content-Length: 5\r\nUseless:\n\n", b"hello" + SECOND),
            check=_not_in_raw(b"smuggled"), note="R3"),
    respond("resp-server-bug-20", head(b"Content-Length\x85: 5\r\n"), note="token"),
    respond("resp-server-bug-21", head(b"Transfer-Encoding: ,chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
            note="F1"),
    respond("resp-server-bug-27", head(b":\r\nI: am chopped off\r\nContent-Length: 5\r\n"), note="empty name"),
    respond("resp-server-bug-28", head(b"Content-Length 5\r\n"), note="no colon"),
    respond("resp-server-bug-29", head(b"Content-Length: 5Z\r\n"), note="F5"),
    respond("resp-server-bug-30", OK_HEAD + b"Content-Length: 5\r\n\r\n\rZ" + SECOND,
            200, check=lambda o: (_status_is(200, body=b"\rZHTT")(o), _not_in_raw(b"smuggled")(o)),
            note="a head ends at CRLFCRLF: a 5-byte body `\\rZHTT`, then F12 discards the rest and the connection"),
    bad_chunks("resp-server-bug-31", b"5\r\r;ABCD\r\n34\r\nE\r\n0\r\n\r\n" + SECOND, "R2"),
    respond("resp-server-bug-32", head(b"Content-Length: 010\r\n", b"0123456789"), 200, up_closed=False,
            check=_status_is(200, body=b"0123456789", has={b"content-length": [b"10"]}), note="F6 decimal, canonical"),
    bad_chunks("resp-server-bug-36", b"41;a=b\r\r" + b"X" * 65 + b"\r\n0\r\n\r\n", "R2 in a chunk extension"),
    respond("resp-server-bug-37", head(b"Transfer-\r\nEncoding: chunked\r\nContent-Length: 5\r\n"), note="no colon"),
    respond("resp-server-bug-39", chunked(b"5\r\nhello\r\n0\r\nX:POST / HTTP/1.1\r\n\r\n"), 200, up_closed=False,
            check=lambda o: (_status_is(200, body=b"hello")(o), _not_in_raw(b"X:POST", b"POST /")(o)),
            note="F11: no `TE: trailers` from the client, so the trailer is dropped"),
    respond("resp-server-bug-44", head(b"Transfer-Encoding: blegh\r\n", b"1\r\nZ\r\n0\r\n\r\n"), note="a2: 502"),
    respond("resp-server-bug-46", head(b"Transfer-Encoding: \xffchunked\xff\r\n", b"1\r\nZ\r\n0\r\n\r\n"), note="a2"),
    bad_chunks("resp-server-bug-47", b"INVALID!!!\r\n" + SECOND, "F10"),
    bad_chunks("resp-transducer-bug-02", b"Z\r\nZZ\r\nZZZ\r\n\r\n", "F10"),
    bad_chunks("resp-transducer-bug-07", b"1these-bytes-never-get-validated\r\nZ\r\n0\r\n\r\n", "F10"),
    respond("resp-transducer-bug-09", head(b"Transfer-Encoding: ,chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
            {502: (CASE_GET,), 200: (CASE_GET,)}, up_closed=None,
            check=lambda o: (_not_in_raw(b",chunked")(o), o.status == 502 or _status_is(200, body=b"hello")(o)),
            note="a2: canonical or 502"),
    respond("resp-transducer-bug-10", head(b"Invalid-Header: this\rvalue\ris\rinvalid\r\nContent-Length: 5\r\n"),
            note="R2"),
    bad_chunks("resp-transducer-bug-13", b"a\r\n0123456789\n0\r\n\r\n", "R3"),
    respond("resp-transducer-bug-14", head(b"Te\nst: test\r\nContent-Length: 5\r\n"), note="R3"),
    bad_chunks("resp-transducer-bug-17", b"17\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n\r\n\r\n0\r\n\r\n", "empty chunk-size"),
    bad_chunks("resp-transducer-bug-19", b"-0x0\r\n\r\n", "F10"),
    respond("resp-transducer-bug-20", head(b"a:b\r\nc\x00\r\nContent-Length: 5\r\n"), note="no colon, NUL"),
    bad_chunks("resp-transducer-bug-24", b"           0\r\n\r\n", "F10"),
]


# == running =========================================================================================


def garden_is_valid(fwd: Fwd) -> None:
    """tools/http1.py HTTPRequest.is_valid: names made of tchars, no CR, LF or NUL in any value."""
    tchars = set(b"!#$%&'*+-.^_`|~abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    for name, value in fwd.headers:
        assert name and set(name) <= tchars, f"forwarded name {name!r}"
        assert not set(value) & set(b"\r\n\x00"), f"forwarded value {value!r}"


async def run_case(start_proxy, upstream, case: Case) -> str | None:
    """One case on its own proxy and upstream; the failure's text, or None."""
    try:
        backend = Backend(case.respond, case.action, case.stray)
        up = await upstream(backend.handler)
        proxy = await start_proxy(make_config(up.port, **BASE_CFG))
        obs = await drive(proxy.port, case)
        await settle(up, backend)
        if case.up_closed and backend.case_conns:  # laneproxy's close may still be on its way
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 1.0
            while loop.time() < deadline and not all(i in backend.eof for i in backend.case_conns):
                await asyncio.sleep(0.01)
        check_client(case, obs)
        check_upstream(case, obs, up, backend)
        per_conn, _ = upstream_requests(up.received)
        fwds = [f for reqs in per_conn for f in reqs]
        for f in fwds:
            garden_is_valid(f)
        if case.id in UP_CHECKS:
            UP_CHECKS[case.id]([f for f in fwds if f.target != b"/canary"])
    except AssertionError as exc:
        return f"{case.id}: {exc}"
    return None


async def run_group(start_proxy, upstream, cases: list[Case]) -> None:
    assert len({c.id for c in cases}) == len(cases)
    results = await asyncio.wait_for(asyncio.gather(*(run_case(start_proxy, upstream, c) for c in cases)), 30)
    failures = [r for r in results if r]
    assert not failures, f"{len(failures)} of {len(cases)} Garden cases failed:\n" + "\n".join(failures)


async def test_seed_corpus(start_proxy, upstream):
    await run_group(start_proxy, upstream, SEED_CASES)


async def test_server_bugs(start_proxy, upstream):
    await run_group(start_proxy, upstream, SERVER_CASES)


async def test_transducer_and_bonus_bugs(start_proxy, upstream):
    await run_group(start_proxy, upstream, TRANSDUCER_CASES)


async def test_payloads_split_after_the_first_head(start_proxy, upstream):
    await run_group(start_proxy, upstream, SPLIT_CASES)


async def test_hostless_payloads_verbatim(start_proxy, upstream):
    await run_group(start_proxy, upstream, HOSTLESS_CASES)


async def test_diagnose_anomalies_probes(start_proxy, upstream):
    await run_group(start_proxy, upstream, ANOMALY_CASES)


async def test_method_probes(start_proxy, upstream):
    await run_group(start_proxy, upstream, METHOD_CASES)


async def test_payload_classes_as_upstream_responses(start_proxy, upstream):
    await run_group(start_proxy, upstream, RESPONSE_CASES)


def test_every_garden_payload_is_ported_once():
    from tests.test_audit3 import REQUEST_CASES as A3Q
    from tests.test_audit3 import RESPONSE_CASES as A3R
    from tests.test_audit16 import REQUEST_CASES as A16Q
    from tests.test_audit16 import RESPONSE_CASES as A16R
    from tests.test_smuggling_corpus import CASES as CORPUS

    assert [n for n, *_ in SERVER_BUGS] == [n for n in range(1, 49) if n != 22]
    assert [n for n, *_ in TRANSDUCER_BUGS] == [n for n in range(1, 26) if n not in (8, 18)]
    ours = [c.id for c in SEED_CASES + SERVER_CASES + TRANSDUCER_CASES + HOSTLESS_CASES + SPLIT_CASES
            + ANOMALY_CASES + METHOD_CASES + RESPONSE_CASES]
    assert len(set(ours)) == len(ours)
    assert not set(ours) & {c.id for c in CORPUS + A3Q + A3R + A16Q + A16R}
    sends = [c.wire for c in SEED_CASES + SERVER_CASES + TRANSDUCER_CASES + HOSTLESS_CASES]
    assert len(set(sends)) == len(sends), "two cases send the same bytes"
