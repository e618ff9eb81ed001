"""Audit 3: laneproxy as a front end against published request-smuggling / desync research.

Sources: Kettle, "HTTP Desync Attacks" (2019), "HTTP/2: The Sequel is Always Worse" (2021),
"Browser-Powered Desync Attacks" (2022), "HTTP/1.1 must die" (2025); Kallus, "Funky chunks"
(2025); HTTP Garden TROPHIES.md. Only gaps left by tests/test_smuggling_corpus.py,
tests/test_audit.py and tests/test_audit2.py are probed.

Table cases reuse the corpus harness (`drive`, `Backend`, `check_client`, `check_upstream`): the
upstream's bytes must parse identically with a strict canonical walker and h11, the client gets
exactly the expected responses in order, and a canary on a fresh connection is served clean.
The remaining tests script the upstream to answer early or mid-body. Every network await is
bounded.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import RecordingReader, is_closed, keepalive_handler, make_config, open_client
from tests.test_smuggling_corpus import (
    BASE_CFG,
    CASE_GET,
    GET,
    HOST,
    POST,
    TE_CH,
    Backend,
    Case,
    Want,
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
HIDDEN = b"GET /hidden HTTP/1.1\r\nHost: t.example\r\n\r\n"  # a request hidden in a body (may reach upstream as body)
EXT_2K = b";a=" + b"x" * 2000


# == table cases through the corpus harness ========================================================

REQUEST_CASES: list[Case] = [
    # --- Kettle 2019 TE.TE obfuscations not in the corpus -------------------------------------------
    reject(
        "te-form-feed-before-value",
        post(b"Transfer-Encoding:\x0cchunked\r\nContent-Length: 5\r\n", b"hello"),
        400,
        "Kettle 2019; RFC 9110 5.5 CTL in value",
    ),
    reject(
        "te-form-feed-after-value",
        post(b"Transfer-Encoding: chunked\x0c\r\n", HELLO_CH),
        400,
        "Kettle 2019; CTL in value",
    ),
    reject("te-vtab-after-value", post(b"Transfer-Encoding: chunked\x0b\r\n", HELLO_CH), 400, "Kettle 2019"),
    reject(
        "te-lf-injected-line",
        post(b"Content-Length: 5\r\nX: X\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        400,
        "Kettle 2019 'X: X\\nTransfer-Encoding'; R3 bare LF refused",
    ),
    reject(
        "te-chunked-then-identity-lines",
        post(TE_CH + b"Transfer-Encoding: identity\r\n", HELLO_CH),
        (400, 501),
        "F2: chunked not final",
    ),
    reject(
        "te-identity-then-chunked-lines",
        post(b"Transfer-Encoding: identity\r\n" + TE_CH, HELLO_CH),
        501,
        "F3 / a2 two-line list",
    ),
    reject("te-misspelled", post(b"Transfer-Encoding: chunk\r\n", HELLO_CH), (400, 501), "F3"),
    Case(
        "te-tabs-both-sides",
        post(b"Transfer-Encoding:\tchunked\t\r\n", HELLO_CH),
        {200: (POST(b"hello", "chunked"),), 400: ()},
        forbid=(b"chunked\t",),
        note="RFC 9110 5.5: OWS stripped and canonical, or a strict 400",
    ),
    reject(
        "te-http10-identity-with-cl",
        post(b"Transfer-Encoding: identity\r\nContent-Length: 5\r\n", b"hello", version=b"1.0"),
        (400, 501),
        "F4: TE in HTTP/1.0",
    ),
    # --- Content-Length edge cases (HTTP Garden) ----------------------------------------------------
    reject(
        "cl-underscore-digits", post(b"Content-Length: 1_0\r\n", b"0123456789"), 400, "F5: Python int() reads 1_0 as 10"
    ),
    reject("cl-trailing-comma", post(b"Content-Length: 5,\r\n", b"hello"), 400, "F5"),
    reject("cl-nul", post(b"Content-Length: 5\x00\r\n", b"hello"), 400, "R12"),
    reject("cl-fullwidth-digit", post(b"Content-Length: \xef\xbc\x95\r\n", b"hello"), 400, "F5, a2 obs-text in CL"),
    accept(
        "cl-many-leading-zeros",
        post(b"Content-Length: " + b"0" * 40 + b"5\r\n", b"hello"),
        POST(b"hello"),
        forbid=(b"00000",),
        note="F6: canonical decimal",
    ),
    accept("cl-no-ows", post(b"Content-Length:5\r\n", b"hello"), POST(b"hello")),
    # --- GET/HEAD/DELETE with bodies (Kettle 2022 CL.0, 2025 0.CL): forwarded with the same framing -----
    accept(
        "get-with-cl-body",
        get(fields=b"Content-Length: %d\r\n" % len(HIDDEN)) + HIDDEN,
        GET(body=HIDDEN, framing="cl"),
        note="CL.0/0.CL: the upstream sees the body under its CL",
    ),
    accept(
        "get-with-chunked-body",
        get(fields=TE_CH) + b"%x\r\n%s\r\n0\r\n\r\n" % (len(HIDDEN), HIDDEN),
        GET(body=HIDDEN, framing="chunked"),
        note="CL.0: consistent framing",
    ),
    Case(
        "head-with-cl-body",
        get(fields=b"Content-Length: 5\r\n", method=b"HEAD") + b"hello",
        {200: (Want(b"HEAD", b"/c", b"hello", "cl"),)},
        method=b"HEAD",
        note="CL.0 on HEAD",
    ),
    Case(
        "get-cl-body-then-pipelined",
        get(fields=b"Content-Length: 5\r\n") + b"hello" + get(b"/second"),
        {200: (GET(body=b"hello", framing="cl"), GET(b"/second"))},
        more=(200,),
        note="P3; 0.CL",
    ),
    # --- body shorter / longer than its Content-Length, then a pipelined request ------------------
    Case(
        "cl-body-short-swallows-next-head",
        post(b"Content-Length: 10\r\n", b"hello") + get(b"/x"),
        {200: (POST(b"helloGET /x"[:10]),)},
        more=(400,),
        conn="close",
        forbid=(b"/x HTTP",),
        note="RFC 9112 6.3: CL frames the body; the rest is a bad request, not forwarded",
    ),
    Case(
        "cl-body-long-spills-into-next",
        post(b"Content-Length: 3\r\n", b"hello") + get(b"/x"),
        {200: (POST(b"hel"),)},
        more=(400,),
        conn="close",
        forbid=(b"loGET",),
        note="RFC 9112 6.3",
    ),
    # --- funky chunks (Kallus 2025) ---------------------------------------------------------------------
    accept(
        "chunk-size-30-leading-zeros",
        post(TE_CH, b"0" * 30 + HELLO_CH),
        POST(b"hello", "chunked"),
        forbid=(b"00000",),
        note="funky chunks: leading zeros; canonical size",
    ),
    reject("chunk-size-trailing-tab", post(TE_CH, b"5\t\r\nhello\r\n0\r\n\r\n"), 400, "funky chunks"),
    Case(
        "chunk-size-tab-then-ext",
        post(TE_CH, b"5\t;x\r\nhello\r\n0\r\n\r\n"),
        {400: (), 200: (POST(b"hello", "chunked"),)},
        forbid=(b";x",),
        note="BWS: 400 or canonical",
    ),
    reject("chunk-size-0X", post(TE_CH, b"0X5\r\nhello\r\n0\r\n\r\n"), 400, "funky chunks 0x prefix"),
    reject("chunk-data-bare-cr-terminator", post(TE_CH, b"5\r\nhello\r0\r\n\r\n"), 400, "R2"),
    reject("chunk-size-line-bare-cr", post(TE_CH, b"5\rhello\r\n0\r\n\r\n"), 400, "R2 / funky chunks"),
    Case(
        "chunk-ext-empty-value",
        post(TE_CH, b"5;a=\r\nhello\r\n0\r\n\r\n"),
        {400: (), 200: (POST(b"hello", "chunked"),)},
        forbid=(b";a=",),
        note="RFC 9112 7.1.1: 400 or canonical, never forwarded",
    ),
    accept(
        "chunk-ext-several", post(TE_CH, b"5;a=b;c\r\nhello\r\n0\r\n\r\n"), POST(b"hello", "chunked"), forbid=(b";c",)
    ),
    accept("last-chunk-ext", post(TE_CH, b"5\r\nhello\r\n0;x=y\r\n\r\n"), POST(b"hello", "chunked"), forbid=(b"x=y",)),
    reject(
        "trailer-is-request-line",
        post(TE_CH, b"5\r\nhello\r\n0\r\n" + HIDDEN),
        400,
        "funky chunks: a trailer without a colon",
    ),
    reject("trailer-bare-lf", post(TE_CH, b"5\r\nhello\r\n0\r\nX: y\n\r\n"), 400, "R3 in trailers"),
    Case(
        "chunked-then-crlf-then-pipelined",
        post(TE_CH, HELLO_CH + b"\r\n" + get(b"/second")),
        {200: (POST(b"hello", "chunked"), GET(b"/second"))},
        more=(200,),
        note="RFC 9112 2.2 leading empty line",
    ),
    Case("chunk-size-huge", post(TE_CH, b"ffffffffffffff\r\nhello"), {400: (), 413: ()}, note="F10 / max_body"),
    # F10: 1 KiB of extensions per chunk, whatever came before in the same read or chunk
    reject(
        "chunk-ext-over-1k-after-long-leading-zero-size",
        post(TE_CH, b"0" * 30 + b"5\r\nhello\r\n5" + EXT_2K + b"\r\nworld\r\n0\r\n\r\n"),
        400,
        "F10: http-rules.md policy 1 KiB of chunk extensions per chunk",
    ),
    Case(
        "chunk-ext-over-1k-pipelined-after-get",
        get(b"/first") + post(TE_CH, b"5" + EXT_2K + b"\r\nhello\r\n0\r\n\r\n"),
        {200: (GET(b"/first"),)},
        more=(400,),
        conn="close",
        note="F10: the limit holds for a pipelined request",
    ),
    Case(
        "chunk-ext-over-1k-pipelined-after-cl-body",
        post(b"Content-Length: 5\r\n", b"hello", b"/first") + post(TE_CH, b"5" + EXT_2K + b"\r\nhello\r\n0\r\n\r\n"),
        {200: (POST(b"hello", target=b"/first"),)},
        more=(400,),
        conn="close",
        note="F10 after a CL body in one read",
    ),
    # --- request line / target (HTTP Garden) --------------------------------------------------------
    reject("request-line-leading-space", b" " + get(), 400, "R5"),
    reject("request-line-vtab-separator", b"GET\x0b/c HTTP/1.1\r\n" + HOST + b"\r\n", 400, "R5"),
    reject("request-line-nul-after-version", b"GET /c HTTP/1.1\x00\r\n" + HOST + b"\r\n", 400, "R5"),
    reject(
        "absolute-form-userinfo-port-trick",
        get(b"http://t.example:80@evil.example/c"),
        400,
        "RFC 9110 4.2.4: userinfo is an error",
    ),
    reject("absolute-form-backslash-authority", get(b"http://evil.example\\@t.example/c"), 400, "a3-13 / R8"),
    reject("absolute-form-hash-authority", get(b"http://evil.example#@t.example/c"), 400, "a2 fragment"),
    Case(
        "absolute-form-upper-scheme",
        get(b"HTTP://a.example/c", host=b"Host: ignored.example\r\n"),
        {200: (GET(host=b"a.example"),), 400: ()},
        forbid=(b"ignored.example",),
        note="R8: scheme is case-insensitive",
    ),
    reject("header-name-nul", get(fields=b"X\x00: y\r\n"), 400, "R12"),
    reject("header-value-cr-before-crlf", get(fields=b"X: y\r\r\n"), 400, "R2"),
    # --- Expect (Kettle 2025) ----------------------------------------------------------------------------
    reject(
        "expect-obs-fold",
        post(b"Expect:\r\n 100-continue\r\nContent-Length: 5\r\n", b"hello"),
        400,
        "Kettle 2025 'Expect:\\n 100-continue'; R11",
    ),
    reject(
        "expect-100-continue-param",
        post(b"Expect: 100-continue;x\r\nContent-Length: %d\r\n" % len(HIDDEN), HIDDEN),
        417,
        "I7",
    ),
    # --- locally answered requests with bodies: the body is consumed or the connection closed ----------
    Case(
        "trace-with-cl-body",
        get(fields=b"Content-Length: %d\r\n" % len(HIDDEN), method=b"TRACE") + HIDDEN,
        {405: ()},
        conn="consistent",
        note="a2 TRACE 405; RFC 9112 9.3 read the body or close",
    ),
    Case(
        "trace-with-chunked-body",
        get(fields=TE_CH, method=b"TRACE") + b"%x\r\n%s\r\n0\r\n\r\n" % (len(HIDDEN), HIDDEN),
        {405: ()},
        conn="consistent",
        note="RFC 9112 9.3",
    ),
    Case(
        "connect-with-body",
        b"CONNECT t.example:443 HTTP/1.1\r\nHost: t.example:443\r\nContent-Length: %d\r\n\r\n%s"
        % (len(HIDDEN), HIDDEN),
        {405: (), 400: ()},
        conn="consistent",
        note="RFC 9112 9.3",
    ),
    Case(
        "options-max-forwards-0-with-body",
        get(b"*", fields=b"Max-Forwards: 0\r\nContent-Length: %d\r\n" % len(HIDDEN), method=b"OPTIONS") + HIDDEN,
        {200: ()},
        note="I5 local answer; RFC 9112 9.3 body consumed",
    ),
    reject(
        "over-max-body-with-smuggle-body",
        post(b"Content-Length: %d\r\n" % len(HIDDEN), HIDDEN),
        413,
        "413 closes; the body never becomes a request",
        cfg={"lane": {"max_body": 4}},
    ),
    Case(
        "expect-unknown-chunked-body",
        post(b"Expect: bogus\r\n" + TE_CH, b"%x\r\n%s\r\n0\r\n\r\n" % (len(HIDDEN), HIDDEN)),
        {417: ()},
        conn="consistent",
        note="I7; body consumed or close",
    ),
    reject(
        "upgrade-with-chunked-body",
        post(
            b"Connection: upgrade\r\nUpgrade: websocket\r\n" + TE_CH, b"%x\r\n%s\r\n0\r\n\r\n" % (len(HIDDEN), HIDDEN)
        ),
        400,
        "a3-11: an upgrade with a body",
    ),
    # --- connection-state attacks (Kettle 2022): every request validated on its own --------------------
    Case(
        "second-request-two-hosts",
        get() + get(b"/second", host=HOST + b"Host: evil.example\r\n"),
        {200: (GET(),)},
        more=(400,),
        conn="close",
        forbid=(b"evil.example",),
        note="R7 per request (a3-3)",
    ),
    Case(
        "second-request-no-host",
        get() + b"GET /second HTTP/1.1\r\n\r\n",
        {200: (GET(),)},
        more=(400,),
        conn="close",
        forbid=(b"/second",),
        note="R7 per request (a3-3)",
    ),
    Case(
        "second-request-bad-host",
        get() + get(b"/second", host=b"Host: a/b\r\n"),
        {200: (GET(),)},
        more=(400,),
        conn="close",
        forbid=(b"/second",),
        note="R7 per request (a3-3)",
    ),
    Case(
        "http10-cl-body-pipelined",
        post(b"Content-Length: 5\r\nConnection: keep-alive\r\n", b"hello", version=b"1.0") + get(b"/second"),
        {200: (POST(b"hello", host=b"t.example"),)},
        conn="close",
        forbid=(b"/second",),
        note="P2: no persistence with 1.0 clients",
    ),
]

OK5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def _ok_hello(*, cl: list[bytes] | None = None, not_in_raw: tuple[bytes, ...] = ()):
    def check(obs) -> None:
        st, headers, body = obs.finals[0]
        if st == 200:
            assert body == b"hello", body
            if cl is not None:
                assert headers.get(b"content-length") == cl, headers
        for needle in not_in_raw:
            assert needle not in obs.raw, (needle, obs.raw[:300])

    return check


RESPONSE_CASES: list[Case] = [
    respond(
        "resp-cl-leading-zeros",
        b"HTTP/1.1 200 OK\r\nContent-Length: 005\r\n\r\nhello",
        {200: (CASE_GET,), 502: (CASE_GET,)},
        up_closed=None,
        check=_ok_hello(cl=[b"5"]),
        note="F6: a relayed CL is canonical",
    ),
    respond("resp-cl-underscore", b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\n0123456789", note="F5"),
    respond("resp-empty-header-name", b"HTTP/1.1 200 OK\r\n: x\r\nContent-Length: 5\r\n\r\nhello", note="R12"),
    respond(
        "resp-te-trailing-space",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked \r\n\r\n" + HELLO_CH,
        {200: (CASE_GET,), 502: (CASE_GET,)},
        up_closed=None,
        check=_ok_hello(not_in_raw=(b"chunked \r\n",)),
        note="a2: OWS stripped before comparing",
    ),
    respond(
        "resp-chunk-size-leading-zeros",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"0" * 20 + HELLO_CH,
        200,
        up_closed=False,
        check=_ok_hello(not_in_raw=(b"00000",)),
        note="funky chunks; re-chunked canonically",
    ),
    respond(
        "resp-chunk-ext-stripped",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\n\r\n",
        200,
        up_closed=False,
        check=_ok_hello(not_in_raw=(b"a=b",)),
        note="extensions never relayed",
    ),
    respond(
        "resp-chunk-size-0x",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        {502: (CASE_GET,), 200: (CASE_GET,)},
        conn={502: "auto", 200: "abort"},
        note="funky chunks",
    ),
    respond(
        "resp-chunk-lf-only",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
        {502: (CASE_GET,), 200: (CASE_GET,)},
        conn={502: "auto", 200: "abort"},
        note="funky chunks; R3",
    ),
]

CASES = REQUEST_CASES + RESPONSE_CASES
assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_desync_case(start_proxy, upstream, case: Case):
    backend = Backend(case.respond, case.action, case.stray)
    up = await upstream(backend.handler)
    overrides = {**BASE_CFG, **case.cfg}
    overrides["client"] = {**BASE_CFG["client"], **case.cfg.get("client", {})}
    proxy = await start_proxy(make_config(up.port, **overrides))
    obs = await drive(proxy.port, case)
    await settle(up, backend)
    if case.up_closed and backend.case_conns:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while loop.time() < deadline and not all(i in backend.eof for i in backend.case_conns):
            await asyncio.sleep(0.01)
    check_client(case, obs)
    check_upstream(case, obs, up, backend)
    for raw in up.received:  # the hidden request never reaches the upstream as a request line
        reqs, _ = strict_requests(bytes(raw))
        assert b"/hidden" not in [r.target for r in reqs]


# == scripted early / mid-body answers ================================================================


async def rr(reader: asyncio.StreamReader, method: bytes = b"GET"):
    got = await read_one(RecordingReader(reader, bytearray()), method, WAIT)
    assert got is not None, "no response"
    return got


def targets_per_conn(up) -> list[list[bytes]]:
    out = []
    for raw in up.received:
        try:
            reqs, _ = strict_requests(bytes(raw))
        except AssertionError:
            reqs = []
        out.append([r.target for r in reqs])
    return out


def request_lines(raw: bytes) -> list[bytes]:
    """Every line in `raw` that looks like a request line of the hidden request."""
    return [line for line in raw.split(b"\r\n") if line.startswith(b"GET /hidden ")]


async def wait_for(pred, timeout: float = 2.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.01)
    return pred()


def early_then_keepalive(answer: bytes, *, read_part: int = 0, delay_event: asyncio.Event | None = None):
    """First connection: read the head (and `read_part` body bytes), answer `answer`, then act as a
    keep-alive server that would parse whatever follows as the next request (the vulnerable back end
    of Kettle 2022). Later connections: plain keep-alive echo."""
    state = {"eof": set()}

    async def handler(reader, writer, up):
        idx = up.connections
        if idx == 1:
            await reader.readuntil(b"\r\n\r\n")
            if read_part:
                await reader.readexactly(read_part)
            if delay_event is not None:
                delay_event.set()
                await asyncio.sleep(0.2)  # the back end "times out" mid-body (pause-based desync)
            writer.write(answer)
            await writer.drain()
            while await reader.read(65536):
                pass
            state["eof"].add(idx)
            return
        await keepalive_handler(reader, writer, up)
        state["eof"].add(idx)

    return handler, state


async def test_pause_based_desync_mid_body_answer_retires_upstream(start_proxy, upstream):
    # Kettle 2022 pause-based desync: the back end answers mid-body (timeout) and keeps the connection;
    # the rest of the body must never be parsed upstream as a request (a3-1: close the upstream
    # connection when it answers before the request body was fully sent; RFC 9112 9.3).
    seen = asyncio.Event()
    answer = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 2\r\n\r\nto"
    handler, state = early_then_keepalive(answer, read_part=5, delay_event=seen)
    up = await upstream(handler)
    proxy = await start_proxy(make_config(up.port, client={"body_timeout": "3s"}))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"POST /slow HTTP/1.1\r\nHost: t.example\r\nContent-Length: %d\r\n\r\nhello" % (5 + len(HIDDEN)))
        await asyncio.wait_for(seen.wait(), WAIT)
        status, headers, body, _ = await rr(reader)
        assert (status, body) == (408, b"to")
        writer.write(HIDDEN)  # the rest of the body: a request in disguise
        writer.write(get(b"/next"))
        closed_now = b"close" in [v.lower() for v in headers.get(b"connection", [])]
        if closed_now:
            assert await is_closed(reader)
        else:
            status, _, body, _ = await rr(reader)
            assert status == 200 and body == b"GET /next HTTP/1.1 body=0\n", body
    finally:
        writer.close()
    assert await wait_for(lambda: 1 in state["eof"]), "upstream connection 1 kept after a mid-body answer"
    per_conn = targets_per_conn(up)
    assert all(b"/hidden" not in t for t in per_conn), per_conn
    assert not any(request_lines(bytes(r)) for r in up.received[1:]), [bytes(r)[:200] for r in up.received]


async def test_expect_early_final_then_body_sent_anyway(start_proxy, upstream):
    # Kettle 2025 Expect desync: the back end answers the head of an Expect request at once; the
    # client sends the body anyway. The body (a request) must never reach an upstream as a request,
    # and the client gets exactly one final answer per request (RFC 9110 10.1.1, a3-6).
    answer = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\nno"
    handler, state = early_then_keepalive(answer)
    up = await upstream(handler)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(
            b"POST /e HTTP/1.1\r\nHost: t.example\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(HIDDEN)
        )
        status, headers, body, _ = await rr(reader, b"POST")
        if status == 100:
            status, headers, body, _ = await rr(reader, b"POST")
        assert (status, body) == (401, b"no")
        writer.write(HIDDEN + get(b"/next"))
        if b"close" in [v.lower() for v in headers.get(b"connection", [])]:
            assert await is_closed(reader)
        else:
            status, _, body, _ = await rr(reader)
            assert status == 200 and body == b"GET /next HTTP/1.1 body=0\n", body
    finally:
        writer.close()
    assert await wait_for(lambda: 1 in state["eof"]), "upstream connection kept after an early answer"
    assert not any(request_lines(bytes(r)) for r in up.received[1:])
    assert all(b"/hidden" not in t for t in targets_per_conn(up))


async def test_cl0_get_answered_before_body_retires_upstream(start_proxy, upstream):
    # Kettle 2022 CL.0: a back end answering a GET without reading its body; its body arrives later
    # and must not reach a reused connection as a request (a3-1, a3-6).
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nstatic"
    handler, state = early_then_keepalive(answer)
    up = await upstream(handler)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/static.css", fields=b"Content-Length: %d\r\n" % len(HIDDEN)))
        status, _, body, _ = await rr(reader)
        assert (status, body) == (200, b"static")
        writer.write(HIDDEN)
        writer.write(get(b"/next"))
        status, _, body, _ = await rr(reader)
        assert status == 200 and body == b"GET /next HTTP/1.1 body=0\n", body
    finally:
        writer.close()
    assert await wait_for(lambda: 1 in state["eof"]), "upstream connection kept after an early answer"
    assert targets_per_conn(up)[1:] == [[b"/next"]], targets_per_conn(up)


async def test_upstream_answers_before_chunked_body_ends_then_hidden_chunk(start_proxy, upstream):
    # a3-6 with chunked framing: the early answer comes mid-body; the later chunks (a request) are
    # dropped with the upstream connection, and the client connection stays in sync.
    answer = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno"
    handler, state = early_then_keepalive(answer)
    up = await upstream(handler)
    proxy = await start_proxy(make_config(up.port))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"POST /u HTTP/1.1\r\nHost: t.example\r\n" + TE_CH + b"\r\n")
        status, headers, body, _ = await rr(reader)
        assert (status, body) == (403, b"no")
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(HIDDEN), HIDDEN) + get(b"/next"))
        if b"close" in [v.lower() for v in headers.get(b"connection", [])]:
            assert await is_closed(reader)
        else:
            status, _, body, _ = await rr(reader)
            assert status == 200 and body == b"GET /next HTTP/1.1 body=0\n", body
    finally:
        writer.close()
    assert await wait_for(lambda: 1 in state["eof"])
    assert not any(request_lines(bytes(r)) for r in up.received[1:])


async def test_static_answer_with_request_body_consumes_the_body(tmp_path, start_proxy, upstream):
    # Kettle 2022 client-side desync: an endpoint answered locally (a static file) must read its
    # request body or close (RFC 9112 9.3); the body never becomes the next request.
    root = tmp_path / "public"
    root.mkdir()
    (root / "a.txt").write_bytes(b"0123456789")
    up = await upstream(keepalive_handler)
    proxy = await start_proxy(
        make_config(up.port, routes=[{"prefix": "/", "lane": "app", "try_files": True}], root=str(root))
    )
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/a.txt", fields=b"Content-Length: %d\r\n" % len(HIDDEN)) + HIDDEN + get(b"/next"))
        status, headers, body, _ = await rr(reader)
        assert (status, body) == (200, b"0123456789")
        if b"close" in [v.lower() for v in headers.get(b"connection", [])]:
            assert await is_closed(reader)
        else:
            status, _, body, _ = await rr(reader)
            assert status == 200 and body == b"GET /next HTTP/1.1 body=0\n", body
            assert await is_closed(reader, 0.3) is False
    finally:
        writer.close()
    assert all(b"/hidden" not in t for t in targets_per_conn(up)), targets_per_conn(up)


async def test_static_answer_with_body_arriving_later(tmp_path, start_proxy, upstream):
    # As above, with the body in a later read than the head (the file is served first).
    root = tmp_path / "public"
    root.mkdir()
    (root / "a.txt").write_bytes(b"0123456789")
    up = await upstream(keepalive_handler)
    proxy = await start_proxy(
        make_config(up.port, routes=[{"prefix": "/", "lane": "app", "try_files": True}], root=str(root))
    )
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/a.txt", fields=b"Content-Length: %d\r\n" % len(HIDDEN)))
        status, headers, body, _ = await rr(reader)
        assert (status, body) == (200, b"0123456789")
        writer.write(HIDDEN + get(b"/next"))
        if b"close" in [v.lower() for v in headers.get(b"connection", [])]:
            assert await is_closed(reader)
        else:
            status, _, body, _ = await rr(reader)
            assert status == 200 and body == b"GET /next HTTP/1.1 body=0\n", body
    finally:
        writer.close()
    assert all(b"/hidden" not in t for t in targets_per_conn(up)), targets_per_conn(up)


async def test_no_route_with_expect_and_body_sent_anyway_is_consumed(start_proxy, upstream):
    # Kettle 2025 Expect: a local 404 to an Expect request; the client sends the body anyway: the body
    # is consumed (RFC 9112 9.3), never parsed as a request, and the next request is served.
    up = await upstream(keepalive_handler)
    proxy = await start_proxy(make_config(up.port, routes=[{"prefix": "/api", "lane": "app"}]))
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(
            b"POST /nowhere HTTP/1.1\r\nHost: t.example\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
            % len(HIDDEN)
        )
        status, headers, _, _ = await rr(reader, b"POST")
        if status == 100:
            status, headers, _, _ = await rr(reader, b"POST")
        assert status == 404
        writer.write(HIDDEN + get(b"/api/next"))
        if b"close" in [v.lower() for v in headers.get(b"connection", [])]:
            assert await is_closed(reader)
        else:
            status, _, body, _ = await rr(reader)
            assert (status, body) == (200, b"GET /api/next HTTP/1.1 body=0\n")
    finally:
        writer.close()
    assert all(b"/hidden" not in t for t in targets_per_conn(up))


async def test_connection_state_routing_is_per_request(start_proxy, upstream):
    # Kettle 2022 connection-state attack (a3-3): the second request on a client connection is routed
    # on its own path, not by the first request's route.
    up_a = await upstream(keepalive_handler)
    up_b = await upstream(keepalive_handler)
    cfg = make_config(
        {"a": [up_a.port], "b": [up_b.port]},
        routes=[{"prefix": "/a/", "lane": "a"}, {"prefix": "/admin/", "lane": "b"}],
    )
    proxy = await start_proxy(cfg)
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(get(b"/a/1") + get(b"http://t.example/admin/2"))
        s1 = await rr(reader)
        s2 = await rr(reader)
    finally:
        writer.close()
    assert (s1[0], s2[0]) == (200, 200)
    assert targets_per_conn(up_a) == [[b"/a/1"]], targets_per_conn(up_a)
    assert targets_per_conn(up_b) == [[b"/admin/2"]], targets_per_conn(up_b)
