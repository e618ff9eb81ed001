"""Audit 16: a second round against published request-smuggling / desync research.

Sources: HTTP Garden (narfindustries/http-garden) discrepancy classes (control bytes in names,
values and targets, Content-Length and chunk-size spellings, long runs of leading zeros, 64-bit
chunk-size wrap, LF-only terminators, CRLF between pipelined requests); Kallus, "Funky chunks"
(2025: TERM.EXT, EXT.TERM, TERM.SPILL, SPILL.TERM and their one-byte forms, in requests and in
upstream responses); Kettle, "HTTP/1.1 must die" (2025: Expect obfuscations, 0.CL/CL.0) and
"Browser-Powered Desync Attacks" (2022: pause-based desync); response splitting and response
queue poisoning on the upstream side. Only gaps left by tests/test_smuggling_corpus.py,
tests/test_audit3.py, tests/test_audit8.py and tests/test_audit9.py are probed.

Table cases reuse the corpus harness (`drive`, `Backend`, `check_client`, `check_upstream`): what
the upstream received must parse identically with a strict canonical walker and with h11 (nothing
smuggled, canonical framing), the client gets exactly the expected responses and connection
state, and a canary on a fresh connection afterwards gets its own 200 over a clean upstream
connection. Every probe was also run through nginx 1.22 (`proxy_http_version 1.1`, upstream
keepalive, `proxy_request_buffering off`) and HAProxy 2.6 (`mode http`, `http-reuse always`) in
front of the same recording upstream in a scratch harness; what they do is in each case's note.
The two findings of this round (FINDING_1, FINDING_2) are fixed; their cases pin the fixes.
Every network wait is bounded.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import RecordingReader, is_closed, keepalive_handler, make_config, open_client, read_until_closed
from tests.test_smuggling_corpus import (
    BASE_CFG,
    CASE_GET,
    GET,
    HOST,
    POST,
    TE_CH,
    Backend,
    Case,
    _infos,
    _not_in_raw,
    _status_is,
    accept,
    check_client,
    check_upstream,
    drive,
    get,
    post,
    read_one,
    reject,
    respond,
    settle,
    strict_requests,
)

pytestmark = pytest.mark.timeout(30)

WAIT = 3.0
HELLO_CH = b"5\r\nhello\r\n0\r\n\r\n"
SMUG = b"GET /smuggled HTTP/1.1\r\nHost: t.example\r\n\r\n"
OK5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
SECOND = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"
EXT_2K = b";a=" + b"x" * 2000


def resp(fields: bytes, body: bytes = b"hello", status_line: bytes = b"HTTP/1.1 200 OK") -> bytes:
    return status_line + b"\r\n" + fields + b"\r\n" + body


def chunked_resp(body: bytes, version: bytes = b"1.1", fields: bytes = b"") -> bytes:
    return b"HTTP/%s 200 OK\r\n%s%s\r\n%s" % (version, fields, TE_CH, body)


# A bad response whose head and body arrive in one read gets laneproxy's own 502; if a read
# boundary fell after the head, the head is out already and the client connection is aborted
# (F13): both are correct, never a clean 200.
BAD_BODY = {502: (CASE_GET,), 200: (CASE_GET,)}
BAD_BODY_CONN = {502: "auto", 200: "abort"}


# == request cases =================================================================================

REQUEST_CASES: list[Case] = [
    # --- control bytes in field names, values and the request target (HTTP Garden) ---------------------
    # nginx and HAProxy: 400 for every CTL in a field name (as laneproxy).
    reject("name-vtab", get(fields=b"X-A\x0bb: 1\r\n"), 400, "RFC 9110 5.1 token"),
    reject("name-form-feed", get(fields=b"X-A\x0c: 1\r\n"), 400, "RFC 9110 5.1 token"),
    reject("name-del", get(fields=b"X-A\x7f: 1\r\n"), 400, "RFC 9110 5.1 token"),
    reject("name-tab-inside", get(fields=b"X-A\tb: 1\r\n"), 400, "RFC 9110 5.1 token"),
    # nginx and HAProxy forward VT/FF in a value as they are; laneproxy refuses (R12: CTL in a value).
    reject("value-vtab", get(fields=b"X-A: a\x0bb\r\n"), 400, "R12; nginx/HAProxy forward it"),
    reject("value-form-feed", get(fields=b"X-A: a\x0cb\r\n"), 400, "R12; nginx/HAProxy forward it"),
    reject("value-nul-at-end", get(fields=b"X-A: ab\x00\r\n"), 400, "R12"),
    reject("value-cr-at-start", get(fields=b"X-A: \rab\r\n"), 400, "R2"),
    # Targets: nginx 400 for all; HAProxy forwards DEL; nginx reads a bare LF as the end of an
    # HTTP/0.9-style line and forwards `GET /a` (a request the client never sent).
    reject("target-nul", get(b"/a\x00b"), 400, "RFC 9112 3.2"),
    reject("target-vtab", get(b"/a\x0bb"), 400, "RFC 9112 3.2"),
    reject("target-form-feed", get(b"/a\x0cb"), 400, "RFC 9112 3.2"),
    reject("target-del", get(b"/a\x7fb"), 400, "RFC 9112 3.2; HAProxy forwards it"),
    reject("target-bare-lf", b"GET /a\nb HTTP/1.1\r\n" + HOST + b"\r\n", 400, "R3; nginx forwards `GET /a`"),
    reject("target-bare-cr", b"GET /a\rb HTTP/1.1\r\n" + HOST + b"\r\n", 400, "R2"),
    reject("tab-before-first-field", b"GET /c HTTP/1.1\r\n\tX: y\r\n" + HOST + b"\r\n", 400, "R4 (all three)"),
    # --- Content-Length spellings -------------------------------------------------------------------------
    reject("cl-minus-zero", post(b"Content-Length: -0\r\n"), 400, "F5 (all three)"),
    reject("cl-plus-zero", post(b"Content-Length: +0\r\n"), 400, "F5"),
    accept(
        "cl-1000-leading-zeros",
        post(b"Content-Length: " + b"0" * 1000 + b"5\r\n", b"hello"),
        POST(b"hello"),
        forbid=(b"0000",),
        note="F6 canonical; nginx canonical too, HAProxy forwards the 1001 digits",
    ),
    # --- chunk sizes ---------------------------------------------------------------------------------------
    accept(
        "chunk-size-1000-leading-zeros",
        post(TE_CH, b"0" * 1000 + HELLO_CH),
        POST(b"hello", "chunked"),
        forbid=(b"0000",),
        note="HTTP Garden; nginx and HAProxy agree",
    ),
    reject(
        "chunk-size-wraps-64-bits",
        post(TE_CH, b"10000000000000005\r\nhello\r\n0\r\n\r\n" + SMUG),
        400,
        "F10: 2^64+5 must not read as 5 (all three 400)",
    ),
    reject("chunk-size-0x-zero", post(TE_CH, b"0x0\r\n\r\n" + SMUG), 400, "funky chunks; 0x prefix"),
    # --- funky chunks (Kallus 2025): terminators and extensions ------------------------------------
    reject(
        "term-lf-after-data",
        post(TE_CH, b"5\r\nhello\n0\r\n\r\n"),
        400,
        "TERM.LF; nginx and HAProxy accept the LF",
    ),
    reject("last-chunk-lf", post(TE_CH, b"5\r\nhello\r\n0\n\r\n"), 400, "nginx and HAProxy accept"),
    reject("last-chunk-crlf-then-lf", post(TE_CH, b"5\r\nhello\r\n0\r\n\n"), 400, "nginx and HAProxy accept"),
    reject(
        "spill-one-byte",
        post(TE_CH, b"5\r\nhelloX\r\n0\r\n\r\n"),
        400,
        "TERM.SPILL one byte (all three 400)",
    ),
    reject(
        "spill-one-byte-into-size",
        post(TE_CH, b"5\r\nhelloX0\r\n\r\n"),
        400,
        "SPILL.TERM: the extra byte read as the next size (all three 400)",
    ),
    reject(
        "short-one-byte",
        post(TE_CH, b"5\r\nhell\r\n0\r\n\r\n"),
        400,
        "data one byte short (CR eaten as data); nginx forwards `hell\\r`, HAProxy the raw chunk",
    ),
    reject(
        "ext-quoted-crlf",
        post(TE_CH, b'5;a="b\r\nc"\r\nhello\r\n0\r\n\r\n'),
        400,
        "EXT.TERM: a line end inside a quoted extension (all three 400)",
    ),
    reject(
        "ext-quoted-unterminated",
        post(TE_CH, b'5;a="bc\r\nhello\r\n0\r\n\r\n'),
        400,
        "EXT.TERM; nginx and HAProxy accept",
    ),
    reject("ext-quoted-nul", post(TE_CH, b'5;a="b\x00c"\r\nhello\r\n0\r\n\r\n'), 400, "nginx/HAProxy accept"),
    reject("ext-nul", post(TE_CH, b"5;a\x00\r\nhello\r\n0\r\n\r\n"), 400, "nginx and HAProxy accept"),
    accept(
        "ext-quoted-escaped-quote",
        post(TE_CH, b'5;a="b\\"c;d"\r\nhello\r\n0\r\n\r\n'),
        POST(b"hello", "chunked"),
        forbid=(b"a=", b'\\"'),
        note="RFC 9112 7.1.1 quoted-pair; extensions never forwarded (all three 200)",
    ),
    # --- CRLF between pipelined requests (HTTP Garden) -------------------------------------------------
    Case(
        "cl-body-crlf-then-pipelined",
        post(b"Content-Length: 5\r\n", b"hello\r\n") + get(b"/second"),
        {200: (POST(b"hello"), GET(b"/second"))},
        more=(200,),
        note="RFC 9112 2.2 empty line before a request (all three)",
    ),
    Case(
        "cl-body-two-crlf-then-pipelined",
        post(b"Content-Length: 5\r\n", b"hello\r\n\r\n") + get(b"/second"),
        {200: (POST(b"hello"), GET(b"/second"))},
        more=(200,),
        note="all three",
    ),
    Case(
        "cl-body-crlf-split-across-reads",
        (post(b"Content-Length: 5\r\n", b"hello\r"), b"\n" + get(b"/second")),
        {200: (POST(b"hello"), GET(b"/second"))},
        more=(200,),
        note="the CR ends one read, the LF starts the next",
    ),
    Case(
        "cl-body-bare-cr-split-across-reads",
        (post(b"Content-Length: 5\r\n", b"hello\r"), b"X" + get(b"/second")),
        {200: (POST(b"hello"),)},
        more=(400,),
        conn="close",
        forbid=(b"/second",),
        note="R2: a CR not followed by LF is no empty line",
    ),
    # --- Expect (Kettle 2025) ------------------------------------------------------------------------------
    reject(
        "expect-y-100-continue",
        post(b"Expect: y 100-continue\r\nContent-Length: %d\r\n" % len(SMUG), SMUG),
        417,
        "I7; nginx and HAProxy ignore it and forward the body as body",
    ),
    reject(
        "expect-bare-lf-fold",
        post(b"Expect:\n 100-continue\r\nContent-Length: 5\r\n", b"hello"),
        400,
        "R3/R11; nginx 400, HAProxy unfolds it and forwards `expect: 100-continue`",
    ),
    reject(
        "expect-vtab",
        post(b"Expect: 100-continue\x0b\r\nContent-Length: 5\r\n", b"hello"),
        400,
        "R12; nginx and HAProxy forward the body",
    ),
]


# == finding 1: a field containing "content-length:" before the real one ===========================
#
# downstream.data_received cuts a read after a request whose body ends inside it, so the next
# request is checked where it starts (request line protocol, bare CR/LF before it, the chunk guard).
# request.body_ends_within() looks for the first "content-length:" anywhere in the lower-cased head,
# so `X-Content-Length: 99999` (or a value such as `Referer: http://a/content-length: 99999`) ahead
# of the real Content-Length makes it think the body runs past the read. The whole read then goes to
# llhttp at once, and the pipelined request behind the body skips those checks: an RTSP request line
# goes upstream as HTTP/1.1 (the audit 8 finding, reopened), a bare LF before a request is accepted
# (R3), and the 1 KiB chunk-extension bound (F10) is not applied. nginx and HAProxy answer 400 to
# the RTSP line. Fixed: the field name is looked for at a line start ("\ncontent-length:").

TRICK = b"X-Content-Length: 99999\r\nContent-Length: 5\r\n"
REF_TRICK = b"Referer: http://a/content-length: 99999\r\nContent-Length: 5\r\n"

FINDING_1: list[Case] = [
    Case(
        "fake-cl-name-then-rtsp",
        post(TRICK, b"hello") + b"GET /r RTSP/1.0\r\n" + HOST + b"\r\n",
        {200: (POST(b"hello"),)},
        more=(400,),
        conn="close",
        forbid=(b"GET /r ",),
        note="RFC 9112 2.3; nginx and HAProxy: 200 then 400",
    ),
    Case(
        "fake-cl-value-then-rtsp",
        post(REF_TRICK, b"hello") + b"GET /r RTSP/1.0\r\n" + HOST + b"\r\n",
        {200: (POST(b"hello"),)},
        more=(400,),
        conn="close",
        forbid=(b"GET /r ",),
        note="RFC 9112 2.3; nginx and HAProxy: 200 then 400",
    ),
    Case(
        "fake-cl-name-then-bare-lf",
        post(TRICK, b"hello") + b"\n" + get(b"/second"),
        {200: (POST(b"hello"),)},
        more=(400,),
        conn="close",
        forbid=(b"/second",),
        note="R3, as the corpus case pipelined-bare-lf-after-body (nginx and HAProxy accept it)",
    ),
    Case(
        "fake-cl-name-then-long-chunk-ext",
        post(TRICK, b"hello") + post(TE_CH, b"5" + EXT_2K + b"\r\nhello\r\n0\r\n\r\n", b"/second"),
        {200: (POST(b"hello"),)},
        more=(400,),
        conn="close",
        forbid=(b"/second",),
        note="F10, as audit 3 chunk-ext-over-1k-pipelined-after-cl-body (nginx and HAProxy accept it)",
    ),
]


@pytest.mark.parametrize(
    "case",
    [*REQUEST_CASES, *FINDING_1],
    ids=[c.id for c in REQUEST_CASES + FINDING_1],
)
async def test_request_case(start_proxy, upstream, case: Case):
    await run_case(start_proxy, upstream, case)


async def test_fake_content_length_field_with_body_beyond_the_read_is_still_framed_by_the_real_one(
    start_proxy, upstream
):
    # The control for finding 1: the same field spelling with nothing behind the body is framed by
    # the real Content-Length (llhttp's view), and the request after it, sent in a later read, is
    # checked on its own (RFC 9112 2.3: 400 for the RTSP line, as nginx and HAProxy).
    case = Case(
        "fake-cl-name-rtsp-in-later-read",
        (post(TRICK, b"hello"), b"GET /r RTSP/1.0\r\n" + HOST + b"\r\n"),
        {200: (POST(b"hello"),)},
        more=(400,),
        conn="close",
        forbid=(b"GET /r ",),
    )
    await run_case(start_proxy, upstream, case)


# == response cases ================================================================================

RESPONSE_CASES: list[Case] = [
    # --- response splitting: control bytes in the head (HTTP Garden) -------------------------------
    respond("resp-value-bare-cr", resp(b"X-A: a\rb\r\nContent-Length: 5\r\n"), note="R2 (all three 502)"),
    respond(
        "resp-value-lf-injects-cl",
        resp(b"X-A: a\nContent-Length: 8\r\nContent-Length: 5\r\n"),
        note="R3; HAProxy 502, nginx relays the 200",
    ),
    respond("resp-value-vtab", resp(b"X-A: a\x0bb\r\nContent-Length: 5\r\n"), note="R12; nginx/HAProxy relay it"),
    respond("resp-value-form-feed", resp(b"X-A: a\x0cb\r\nContent-Length: 5\r\n"), note="R12; nginx/HAProxy relay"),
    respond("resp-value-del", resp(b"X-A: a\x7fb\r\nContent-Length: 5\r\n"), note="R12; nginx/HAProxy relay it"),
    respond("resp-name-nul", resp(b"X-A\x00: b\r\nContent-Length: 5\r\n"), note="all three 502"),
    respond("resp-name-del", resp(b"X-A\x7f: b\r\nContent-Length: 5\r\n"), note="all three 502"),
    respond(
        "resp-reason-bare-cr",
        b"HTTP/1.1 200 OK\rX-Injected: 1\r\nContent-Length: 5\r\n\r\nhello",
        check=_not_in_raw(b"X-Injected"),
        note="R2; HAProxy 502",
    ),
    respond(
        "resp-reason-vtab",
        b"HTTP/1.1 200 O\x0bK\r\nContent-Length: 5\r\n\r\nhello",
        check=_not_in_raw(b"\x0b"),
        note="RFC 9112 4 reason-phrase; nginx and HAProxy relay the VT",
    ),
    respond(
        "resp-space-before-first-field",
        b"HTTP/1.1 200 OK\r\n X-A: 1\r\nContent-Length: 5\r\n\r\nhello",
        note="R4 (all three 502)",
    ),
    respond("resp-status-099", b"HTTP/1.1 099 X\r\nContent-Length: 5\r\n\r\nhello", note="nginx/HAProxy relay 099"),
    # --- Content-Length spellings ------------------------------------------------------------------
    respond("resp-cl-0x5", resp(b"Content-Length: 0x5\r\n"), note="F5; HAProxy 502"),
    respond("resp-cl-minus-zero", resp(b"Content-Length: -0\r\n", b""), note="F5; HAProxy 502"),
    respond("resp-cl-empty", resp(b"Content-Length:\r\n", b""), note="F5; HAProxy 502"),
    respond(
        "resp-cl-1000-leading-zeros",
        resp(b"Content-Length: " + b"0" * 1000 + b"5\r\n"),
        200,
        up_closed=False,
        check=lambda o: (_status_is(200, body=b"hello", has={b"content-length": [b"5"]})(o), _not_in_raw(b"0000")(o)),
        note="F6 canonical, as nginx (HAProxy relays the 1001 digits)",
    ),
    # --- funky chunks in responses -------------------------------------------------------------------
    respond("resp-chunk-0x", chunked_resp(b"0x5\r\nhello\r\n0\r\n\r\n"), BAD_BODY, conn=BAD_BODY_CONN,
            note="F10; HAProxy 502"),
    respond("resp-chunk-wraps-64-bits", chunked_resp(b"10000000000000005\r\nhello\r\n0\r\n\r\n" + SECOND), BAD_BODY,
            conn=BAD_BODY_CONN, check=_not_in_raw(b"smuggled"), note="F10; HAProxy 502"),
    respond("resp-term-lf-after-data", chunked_resp(b"5\r\nhello\n0\r\n\r\n"), BAD_BODY, conn=BAD_BODY_CONN,
            note="TERM.LF; nginx and HAProxy relay hello"),
    respond("resp-size-line-lf", chunked_resp(b"5\nhello\r\n0\r\n\r\n"), BAD_BODY, conn=BAD_BODY_CONN,
            note="nginx and HAProxy relay hello"),
    respond("resp-last-chunk-lf", chunked_resp(b"5\r\nhello\r\n0\n\n"), BAD_BODY, conn=BAD_BODY_CONN,
            note="nginx and HAProxy relay hello"),
    respond("resp-term-ext-lf", chunked_resp(b"5;a\nhello\r\n0\r\n\r\n"), BAD_BODY, conn=BAD_BODY_CONN,
            note="TERM.EXT; nginx and HAProxy relay hello"),
    respond("resp-ext-bare-cr", chunked_resp(b"5;a\rb\r\nhello\r\n0\r\n\r\n"), BAD_BODY, conn=BAD_BODY_CONN,
            note="EXT.TERM; HAProxy 502"),
    respond("resp-ext-quoted-crlf", chunked_resp(b'5;a="x\r\ny"\r\nhello\r\n0\r\n\r\n'), BAD_BODY,
            conn=BAD_BODY_CONN, note="EXT.TERM; HAProxy 502"),
    respond("resp-spill", chunked_resp(b"5\r\nhelloXX\r\n0\r\n\r\n"), BAD_BODY, conn=BAD_BODY_CONN,
            note="TERM.SPILL; HAProxy 502"),
    respond("resp-spill-one-byte", chunked_resp(b"5\r\nhelloX\r\n0\r\n\r\n"), BAD_BODY, conn=BAD_BODY_CONN,
            note="HAProxy 502"),
    respond(
        "resp-chunk-1000-leading-zeros",
        chunked_resp(b"0" * 1000 + HELLO_CH),
        200,
        up_closed=False,
        check=lambda o: (_status_is(200, body=b"hello")(o), _not_in_raw(b"0000")(o)),
        note="re-chunked canonically (nginx too; HAProxy relays 5)",
    ),
    respond(
        "resp-ext-quoted-semicolon",
        chunked_resp(b'5;a="x;y"\r\nhello\r\n0\r\n\r\n'),
        200,
        up_closed=False,
        check=lambda o: (_status_is(200, body=b"hello")(o), _not_in_raw(b"x;y")(o)),
        note="RFC 9112 7.1.1 (all three relay hello)",
    ),
    # --- trailers that would split the response (parsed whether or not the client asked for them) ------
    respond("resp-trailer-bare-cr", chunked_resp(b"5\r\nhello\r\n0\r\nX-T: a\rb\r\n\r\n"), BAD_BODY,
            conn=BAD_BODY_CONN, check=_not_in_raw(b"X-T"), note="R2; HAProxy 502"),
    respond("resp-trailer-nul", chunked_resp(b"5\r\nhello\r\n0\r\nX-T: a\x00b\r\n\r\n"), BAD_BODY,
            conn=BAD_BODY_CONN, check=_not_in_raw(b"X-T"), note="R12; HAProxy relays the NUL"),
    respond("resp-trailer-obs-fold", chunked_resp(b"5\r\nhello\r\n0\r\nX-T: a\r\n b\r\n\r\n"), BAD_BODY,
            conn=BAD_BODY_CONN, check=_not_in_raw(b"X-T"), note="R11; HAProxy unfolds it"),
    respond("resp-trailer-status-line", chunked_resp(b"5\r\nhello\r\n0\r\n" + SECOND), BAD_BODY,
            conn=BAD_BODY_CONN, check=_not_in_raw(b"smuggled"), note="a trailer without a colon; HAProxy 502"),
    # --- 1xx, 204, 304, HEAD -------------------------------------------------------------------------
    respond(
        "resp-102-then-200",
        b"HTTP/1.1 102 Processing\r\n\r\n" + OK5,
        200,
        up_closed=False,
        check=lambda o: (_infos([102])(o), _status_is(200, body=b"hello")(o)),
        note="I8 (HAProxy relays the 102 too)",
    ),
    respond(
        "resp-204-chunked-body",
        b"HTTP/1.1 204 No Content\r\n" + TE_CH + b"\r\n" + HELLO_CH,
        204,
        check=lambda o: (_status_is(204, lacks=(b"transfer-encoding", b"content-length"))(o),
                         _not_in_raw(b"hello")(o)),
        note="F9 + F12 (all three relay a bare 204)",
    ),
    respond(
        "resp-304-chunked-body",
        b"HTTP/1.1 304 Not Modified\r\n" + TE_CH + b"\r\n" + HELLO_CH,
        304,
        check=lambda o: (_status_is(304, lacks=(b"transfer-encoding",))(o), _not_in_raw(b"hello")(o)),
        note="F9 + F12; HAProxy relays `transfer-encoding: chunked` on the 304",
    ),
    respond(
        "resp-head-body-in-later-write",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
        200,
        method=b"HEAD",
        action="stray",
        stray=b"hello" + SECOND,
        pause=0.2,
        check=lambda o: (_status_is(200, body=b"", has={b"content-length": [b"5"]})(o), _not_in_raw(b"smuggled")(o)),
        note="F9 + F14: the body bytes arrive on the idle pooled connection, which is discarded",
    ),
    respond(
        "resp-304-body-in-later-write",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
        304,
        action="stray",
        stray=b"hello" + SECOND,
        pause=0.2,
        check=_not_in_raw(b"smuggled"),
        note="F9 + F14",
    ),
    # --- HTTP/1.0 responses with Transfer-Encoding (RFC 9112 6.1) --------------------------------------
    respond(
        "resp-http10-chunked",
        chunked_resp(HELLO_CH, b"1.0"),
        200,
        check=_status_is(200, body=b"hello"),
        note="RFC 9112 6.1: close after processing; nginx relays, HAProxy relays as 1.0 and closes",
    ),
    respond(
        "resp-http10-chunked-with-cl",
        chunked_resp(HELLO_CH, b"1.0", b"Content-Length: 3\r\n"),
        note="F1 + RFC 9112 6.1; nginx relays hello, HAProxy relays as 1.0 and closes",
    ),
]

# finding 2: an HTTP/1.0 response with Transfer-Encoding and `Connection: keep-alive` is decoded as
# chunked and its upstream connection goes back to the pool. RFC 9112 6.1: a recipient of an
# HTTP/1.0 message with Transfer-Encoding MUST treat the framing as faulty and close the connection
# after processing it ("the message sender might have retained a portion of the message"). nginx
# closes that upstream connection (and opens a new one for the next request); HAProxy closes both.
# Fixed: upstream.on_headers_complete took keep_alive from llhttp's should_keep_alive() without
# looking at the version when `te` is set; now such a response is relayed and the connection closed.
FINDING_2: list[Case] = [
    respond(
        "resp-http10-keepalive-chunked",
        chunked_resp(HELLO_CH, b"1.0", b"Connection: keep-alive\r\n"),
        200,
        check=_status_is(200, body=b"hello"),
        note="RFC 9112 6.1 MUST close",
    ),
]


@pytest.mark.parametrize(
    "case",
    [*RESPONSE_CASES, *FINDING_2],
    ids=[c.id for c in RESPONSE_CASES + FINDING_2],
)
async def test_response_case(start_proxy, upstream, case: Case):
    await run_case(start_proxy, upstream, case)


async def run_case(start_proxy, upstream, case: Case) -> None:
    backend = Backend(case.respond, case.action, case.stray)
    up = await upstream(backend.handler)
    overrides = {**BASE_CFG, **case.cfg}
    overrides["client"] = {**BASE_CFG["client"], **case.cfg.get("client", {})}
    proxy = await start_proxy(make_config(up.port, **overrides))
    obs = await drive(proxy.port, case)
    await settle(up, backend)
    if case.up_closed and backend.case_conns:  # laneproxy's close may still be on its way
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while loop.time() < deadline and not all(i in backend.eof for i in backend.case_conns):
            await asyncio.sleep(0.01)
    check_client(case, obs)
    check_upstream(case, obs, up, backend)


# == scripted: pause-based desync from the client side (Kettle 2022) ==================================


def request_lines(raw: bytes) -> list[bytes]:
    return [line for line in raw.split(b"\r\n") if line.endswith(b" HTTP/1.1") and b" /" in line]


async def test_rest_of_body_after_a_body_timeout_is_never_a_request(start_proxy, upstream):
    # Kettle 2022 pause-based desync, with laneproxy as the side that times out: the client stops
    # mid-body past client.body_timeout, gets 408 + close, then sends the rest of its body (a request)
    # and a new request during the lingering close. RFC 9112 6.3(7)/F7: the upstream connection that
    # got half a body is closed, never reused; the rest is read and dropped, never parsed as a request
    # (P9). A canary on a fresh connection is served on a fresh upstream connection.
    # nginx (client_body_timeout) and HAProxy (timeout http-request) also answer 408 and close.
    seen = asyncio.Event()
    closed: set[int] = set()

    async def handler(reader: RecordingReader, writer, up) -> None:
        idx = up.connections
        if idx == 1:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(5)
            seen.set()
            while await reader.read(65536):
                pass
            closed.add(idx)
            return
        await keepalive_handler(reader, writer, up)

    up = await upstream(handler)
    proxy = await start_proxy(make_config(up.port, client={"body_timeout": "300ms"}))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"POST /slow HTTP/1.1\r\n" + HOST + b"Content-Length: %d\r\n\r\nhello" % (5 + len(SMUG)))
        await asyncio.wait_for(seen.wait(), WAIT)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 408 ") and b"\r\nConnection: close\r\n" in head, head
        writer.write(SMUG + get(b"/after"))
        await read_until_closed(reader, WAIT)
    finally:
        writer.close()
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/canary"))
        got = await read_one(RecordingReader(reader, bytearray()), b"GET", WAIT)
    finally:
        writer.close()
    assert got is not None and got[0] == 200 and got[2] == b"GET /canary HTTP/1.1 body=0\n", got
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.0
    while 1 not in closed and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert 1 in closed, "the upstream connection with half a body was kept"
    assert request_lines(bytes(up.received[0])) == [b"POST /slow HTTP/1.1"], bytes(up.received[0])[:300]
    lines = [line for raw in up.received[1:] for line in request_lines(bytes(raw))]
    assert lines == [b"GET /canary HTTP/1.1"], lines
    assert all(b"smuggled" not in raw and b"/after" not in raw for raw in up.received)


async def test_cl_body_cut_by_client_fin_reaches_no_reused_upstream(start_proxy, upstream):
    # Pause-based desync variant: the client half-closes mid-body (F7: an incomplete request is
    # dropped, not answered) after a request hidden in the part it sent. The upstream connection
    # with the partial body must be closed, and the next client's request must go to a connection
    # whose stream holds only that request (nothing of the cut body left in front of it).
    seen = asyncio.Event()

    async def handler(reader: RecordingReader, writer, up) -> None:
        if up.connections == 1:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(len(SMUG))
            seen.set()
            while await reader.read(65536):
                pass
            return
        await keepalive_handler(reader, writer, up)

    up = await upstream(handler)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"POST /cut HTTP/1.1\r\n" + HOST + b"Content-Length: %d\r\n\r\n" % (len(SMUG) + 10) + SMUG)
        await asyncio.wait_for(seen.wait(), WAIT)
        writer.write_eof()
        data, _ = await read_until_closed(reader, WAIT)
    finally:
        writer.close()
    assert data == b"", data[:200]  # a3 rule 8: a FIN mid-body is an abort, nothing is answered
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/canary"))
        got = await read_one(RecordingReader(reader, bytearray()), b"GET", WAIT)
    finally:
        writer.close()
    assert got is not None and (got[0], got[2]) == (200, b"GET /canary HTTP/1.1 body=0\n"), got
    assert up.connections == 2, "the canary reused the connection that holds a cut body"
    reqs, tail = strict_requests(bytes(up.received[1]))
    assert [r.target for r in reqs] == [b"/canary"] and tail == b"", bytes(up.received[1])[:300]


async def test_expect_100_sent_once_and_body_forwarded_only_after_it(start_proxy, upstream):
    # Kettle 2025 Expect desync: laneproxy answers `Expect: 100-continue` itself (I7) and strips it
    # upstream. Exactly one interim 100 reaches the client, before the final answer; the upstream
    # sees no Expect, the body once, and no second request made of the body. nginx sends its own
    # 100 too; HAProxy passes the Expect through and relays the upstream's 100.
    up = await upstream(keepalive_handler)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"POST /e HTTP/1.1\r\n" + HOST + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(SMUG))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
        writer.write(SMUG)
        got = await read_one(RecordingReader(reader, bytearray()), b"POST", WAIT)
        assert got is not None and got[0] == 200 and got[2] == b"POST /e HTTP/1.1 body=%d\n" % len(SMUG), got
        writer.write(get(b"/next"))
        got = await read_one(RecordingReader(reader, bytearray()), b"GET", WAIT)
        assert got is not None and got[2] == b"GET /next HTTP/1.1 body=0\n", got
        assert not await is_closed(reader, 0.05)
    finally:
        writer.close()
    raw = b"".join(bytes(r) for r in up.received)
    reqs, tail = strict_requests(raw)
    assert [(r.method, r.target, r.body) for r in reqs] == [(b"POST", b"/e", SMUG), (b"GET", b"/next", b"")], raw
    assert tail == b"" and b"expect" not in raw.lower()


def test_case_ids_are_unique_and_new():
    from tests.test_audit3 import REQUEST_CASES as AUDIT3_REQUESTS
    from tests.test_audit3 import RESPONSE_CASES as AUDIT3_RESPONSES
    from tests.test_smuggling_corpus import CASES as CORPUS

    ours = [c.id for c in REQUEST_CASES + FINDING_1 + RESPONSE_CASES + FINDING_2]
    assert len(set(ours)) == len(ours)
    assert not set(ours) & {c.id for c in CORPUS + AUDIT3_REQUESTS + AUDIT3_RESPONSES}
