"""Audit probes: RFC 9110/9112, nginx/HAProxy behaviour and request-smuggling research.

Each test starts a fresh proxy in front of a scripted upstream (tests/conftest.py fixtures),
sends raw bytes and asserts what an experienced nginx/HAProxy user expects. The rule each one
checks is cited in a one-line comment. Every network await is bounded (WAIT), and the module
has a pytest-timeout mark.
"""

from __future__ import annotations

import asyncio
import email.utils

import h11
import pytest

from tests.conftest import RecordingReader, make_config, open_client
from tests.test_e2e_framing import echo, h11_upstream, parse_requests
from tests.test_smuggling_corpus import read_one

pytestmark = pytest.mark.timeout(30)

WAIT = 3.0
HOST = b"Host: t.example\r\n"


def get(target: bytes = b"/c", fields: bytes = b"", version: bytes = b"1.1", host: bytes = HOST,
        method: bytes = b"GET") -> bytes:
    return b"%s %s HTTP/%s\r\n%s%s\r\n" % (method, target, version, host, fields)


def crafted(answer: bytes, action: str = "keep"):
    """Upstream: `/case` gets `answer` (raw bytes), every other request the usual echo."""

    def respond(req: h11.Request, body: bytes):
        if req.target == b"/case":
            return answer if action == "keep" else (answer, action)
        return echo(req, body)

    return h11_upstream(respond)


async def slurp(reader: asyncio.StreamReader, idle: float = 0.7, total: float = WAIT) -> tuple[bytes, bool]:
    """Everything the client receives until EOF/reset (closed=True) or `idle` seconds of silence."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + total
    out = bytearray()
    while loop.time() < deadline:
        try:
            data = await asyncio.wait_for(reader.read(65536), idle)
        except TimeoutError:
            return bytes(out), False
        except ConnectionError:
            return bytes(out), True
        if not data:
            return bytes(out), True
        out += data
    return bytes(out), False


async def talk(port: int, data: bytes | list[bytes], idle: float = 0.7) -> tuple[bytes, bool]:
    """Send raw bytes (a list: written 50 ms apart) on a fresh connection; return (raw answer, closed)."""
    reader, writer = await open_client(port)
    try:
        for i, piece in enumerate([data] if isinstance(data, bytes) else data):
            if i:
                await asyncio.sleep(0.05)
            writer.write(piece)
            await writer.drain()
        return await slurp(reader, idle)
    finally:
        writer.close()


async def responses(raw: bytes, methods: tuple[bytes, ...] = (b"GET",)) -> list[tuple[int, dict, bytes, bool]]:
    """Split what the client received into responses (1xx included) with the corpus reader."""
    sr = asyncio.StreamReader()
    sr.feed_data(raw)
    sr.feed_eof()
    rec = RecordingReader(sr, bytearray())
    out = []
    finals = 0
    while True:
        method = methods[min(finals, len(methods) - 1)]
        got = await read_one(rec, method, 0.5)
        if got is None:
            return out
        out.append(got)
        if not 100 <= got[0] < 200:
            finals += 1


def finals(resps: list[tuple[int, dict, bytes, bool]]) -> list[int]:
    return [r[0] for r in resps if not 100 <= r[0] < 200]


async def proxy_for(start_proxy, upstream, handler=None, **cfg):
    up = await upstream(handler or h11_upstream())
    proxy = await start_proxy(make_config(up.port, **cfg))
    return proxy, up


def upstream_targets(up) -> list[tuple[bytes, bytes]]:
    return [(r.method, r.target) for raw in up.received for r, _ in parse_requests(raw, complete=False)]


# == Host and request-target (RFC 9112 §3.2) ======================================================


async def test_absolute_form_without_host_field_is_400(start_proxy, upstream):
    # RFC 9112 §3.2: a server MUST answer 400 to any HTTP/1.1 request that lacks a Host field
    # (nginx: "client sent HTTP/1.1 request without Host header", also for absolute-form).
    proxy, up = await proxy_for(start_proxy, upstream)
    raw, closed = await talk(proxy.port, b"GET http://t.example/c HTTP/1.1\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 "), raw[:200]
    assert closed and upstream_targets(up) == []


async def test_absolute_form_with_invalid_host_field_is_400(start_proxy, upstream):
    # RFC 9112 §3.2: a Host field with an invalid value MUST get 400 (nginx validates Host even
    # when the request line carries the authority).
    proxy, up = await proxy_for(start_proxy, upstream)
    raw, closed = await talk(proxy.port, b"GET http://t.example/c HTTP/1.1\r\nHost: a b\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 "), raw[:200]
    assert upstream_targets(up) == []


@pytest.mark.parametrize("request_bytes", [
    get(host=b"Host: :80\r\n"),
    get(b"http://:80/c"),
], ids=["host-field", "absolute-form-authority"])
async def test_empty_host_with_port_is_400(start_proxy, upstream, request_bytes):
    # RFC 9110 §4.2.1 (http URI: empty host is invalid) + RFC 9112 §3.2 (invalid Host: 400);
    # nginx ngx_http_validate_host: host_len == 0 -> 400.
    proxy, up = await proxy_for(start_proxy, upstream)
    raw, closed = await talk(proxy.port, request_bytes)
    assert raw.startswith(b"HTTP/1.1 400 "), raw[:200]
    assert upstream_targets(up) == []


async def test_host_with_empty_port_is_accepted(start_proxy, upstream):
    # RFC 3986 §3.2.3 port = *DIGIT (an empty port is valid, §6.2.3); nginx accepts "Host: a:".
    proxy, up = await proxy_for(start_proxy, upstream)
    raw, _ = await talk(proxy.port, get(host=b"Host: t.example:\r\n"))
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:200]


async def test_host_field_names_differing_in_case_are_duplicates(start_proxy, upstream):
    # RFC 9112 §3.2: more than one Host field line -> 400 (field names are case-insensitive, 9110 §5.1).
    proxy, up = await proxy_for(start_proxy, upstream)
    raw, closed = await talk(proxy.port, get(host=b"Host: t.example\r\nhOST: other.example\r\n"))
    assert raw.startswith(b"HTTP/1.1 400 ") and closed, raw[:200]
    assert upstream_targets(up) == []


async def test_options_absolute_form_with_empty_path_goes_out_as_asterisk(start_proxy, upstream):
    # RFC 9112 §3.2.4: OPTIONS in absolute-form with an empty path and no query: the last proxy
    # MUST send "*" as the request-target (http-rules.md R9).
    proxy, up = await proxy_for(start_proxy, upstream)
    raw, _ = await talk(proxy.port, b"OPTIONS http://t.example HTTP/1.1\r\nHost: t.example\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:200]
    assert upstream_targets(up) == [(b"OPTIONS", b"*")], bytes(up.received[0])[:200]


async def test_options_absolute_form_with_path_keeps_the_path(start_proxy, upstream):
    # RFC 9112 §3.2.4 applies only to an empty path: "/x" stays "/x".
    proxy, up = await proxy_for(start_proxy, upstream)
    raw, _ = await talk(proxy.port, b"OPTIONS http://t.example/x HTTP/1.1\r\nHost: t.example\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:200]
    assert upstream_targets(up) == [(b"OPTIONS", b"/x")]


async def test_authority_form_for_get_is_400(start_proxy, upstream):
    # RFC 9112 §3.2.3: authority-form is only for CONNECT; nginx answers 400.
    proxy, up = await proxy_for(start_proxy, upstream)
    raw, closed = await talk(proxy.port, get(b"t.example:80"))
    assert raw.startswith(b"HTTP/1.1 400 ") and closed, raw[:200]
    assert upstream_targets(up) == []


async def test_encoded_nul_in_path_is_400(start_proxy, upstream):
    # nginx ngx_http_parse_complex_uri: a decoded %00 in the path is an invalid request (400);
    # C upstreams truncate at NUL, so the proxy's route and the upstream's path would differ.
    proxy, up = await proxy_for(start_proxy, upstream)
    raw, _ = await talk(proxy.port, get(b"/c%00.txt"))
    assert raw.startswith(b"HTTP/1.1 400 "), raw[:200]
    assert upstream_targets(up) == []


async def test_nul_in_request_target_is_400(start_proxy, upstream):
    # RFC 9112 §3 / RFC 3986: NUL is not allowed in a request-target -> 400.
    proxy, up = await proxy_for(start_proxy, upstream)
    raw, closed = await talk(proxy.port, get(b"/c\x00x"))
    assert raw.startswith(b"HTTP/1.1 400 ") and closed, raw[:200]
    assert upstream_targets(up) == []


# == request line: version, method (RFC 9110 §2.5, RFC 9112 §2.3) =================================


async def test_http_1_2_request_is_refused_by_the_strict_parser(start_proxy, upstream):
    # RFC 9110 §2.5 says a higher minor version SHOULD be processed as 1.1 (nginx does), but
    # httptools accepts only 1.0 and 1.1 unless a dangerous leniency is turned on, which laneproxy
    # never does (http-rules.md, b): a clear 400 and close, nothing forwarded (README, Known limits).
    proxy, up = await proxy_for(start_proxy, upstream)
    raw, closed = await talk(proxy.port, get(version=b"1.2"))
    assert raw.startswith(b"HTTP/1.1 400 "), raw[:200]
    assert closed and upstream_targets(up) == []


async def test_http2_prior_knowledge_preface_gets_505(start_proxy, upstream):
    # http-rules.md a2: "HTTP/2.0 in the request line -> 505"; nginx without http2 on the
    # listener answers the h2 preface "PRI * HTTP/2.0" with 505 as well.
    proxy, up = await proxy_for(start_proxy, upstream)
    raw, closed = await talk(proxy.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 505 "), raw[:200]
    assert closed and upstream_targets(up) == []


async def test_webdav_method_with_body_is_forwarded(start_proxy, upstream):
    # RFC 9110 §9.1: methods are extensible; nginx forwards PROPFIND (RFC 4918) with its body.
    proxy, up = await proxy_for(start_proxy, upstream)
    body = b"<propfind/>"
    fields = b"Depth: 1\r\nContent-Length: %d\r\n" % len(body)
    raw, _ = await talk(proxy.port, get(method=b"PROPFIND", fields=fields) + body)
    assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"PROPFIND /c body=11"), raw[:200]
    [(req, got)] = parse_requests(up.received[0])
    assert got == body


async def test_via_names_the_received_protocol_version_for_http10(start_proxy, upstream):
    # RFC 9110 §7.6.3: Via's received-protocol is the version of the message as received; a request
    # that arrived as HTTP/1.0 is forwarded with "Via: 1.0 laneproxy" (Squid does so).
    proxy, up = await proxy_for(start_proxy, upstream)
    raw, _ = await talk(proxy.port, get(version=b"1.0"))
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:200]
    [(req, _)] = parse_requests(up.received[0])
    assert [v for n, v in req.headers if n == b"via"] == [b"1.0 laneproxy"], bytes(up.received[0])


async def test_via_for_http11(start_proxy, upstream):
    # RFC 9110 §7.6.3: an HTTP/1.1 request gets "Via: 1.1 laneproxy".
    proxy, up = await proxy_for(start_proxy, upstream)
    await talk(proxy.port, get())
    [(req, _)] = parse_requests(up.received[0])
    assert [v for n, v in req.headers if n == b"via"] == [b"1.1 laneproxy"]


# == field syntax (RFC 9110 §5.1, §5.5) ============================================================


@pytest.mark.parametrize("name", [b"X@A", b"X(A)", b"X/A", b"X{A", b'X"A', b"X[A]", b"X=A", b"X?A"])
async def test_field_name_with_separator_is_400(start_proxy, upstream, name):
    # RFC 9110 §5.1: field-name = token; delimiters are not tchar -> 400 (nginx/HAProxy reject).
    proxy, up = await proxy_for(start_proxy, upstream)
    raw, closed = await talk(proxy.port, get(fields=name + b": v\r\n"))
    assert raw.startswith(b"HTTP/1.1 400 ") and closed, raw[:200]
    assert upstream_targets(up) == []


@pytest.mark.parametrize("ctl", [b"\x01", b"\x08", b"\x1f"])
async def test_ctl_in_field_value_is_400(start_proxy, upstream, ctl):
    # RFC 9110 §5.5: field-vchar excludes CTLs (other than HTAB) -> reject.
    proxy, up = await proxy_for(start_proxy, upstream)
    raw, closed = await talk(proxy.port, get(fields=b"X-A: a" + ctl + b"b\r\n"))
    assert raw.startswith(b"HTTP/1.1 400 ") and closed, raw[:200]
    assert upstream_targets(up) == []


# == Upgrade (RFC 9110 §7.8) =======================================================================


async def test_h2c_upgrade_on_post_with_body_is_a_clear_400(start_proxy, upstream):
    # RFC 9110 §7.8 lets a server ignore Upgrade and serve the POST (nginx does, for what
    # `curl --http2 -d` sends over http://); httptools skips the body of any request that asks
    # for an Upgrade, so laneproxy cannot read that body as HTTP: it refuses the request with a
    # clear 400 and closes, and never forwards the body as the start of a next request
    # (README, Known limits).
    proxy, up = await proxy_for(start_proxy, upstream)
    req = (b"POST /c HTTP/1.1\r\nHost: t.example\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
           b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Length: 5\r\n\r\nhello")
    raw, closed = await talk(proxy.port, req)
    assert raw.startswith(b"HTTP/1.1 400 ") and b"Upgrade request with a body" in raw, raw[:200]
    assert closed and upstream_targets(up) == []


# == request bodies, keep-alive, timeouts =========================================================


async def test_crlf_after_post_body_in_a_later_read_is_ignored(start_proxy, upstream):
    # RFC 9112 §2.2: a server SHOULD ignore at least one empty line before a request-line
    # (old user agents send CRLF after a POST body).
    proxy, up = await proxy_for(start_proxy, upstream)
    raw, closed = await talk(proxy.port, [
        b"POST /a HTTP/1.1\r\nHost: t.example\r\nContent-Length: 5\r\n\r\nhello", b"\r\n", get(b"/b"),
    ])
    resps = await responses(raw)
    assert [(r[0], r[2]) for r in resps] == [(200, b"POST /a body=5"), (200, b"GET /b body=0")], raw[:300]
    assert not closed


async def test_crlf_after_post_body_split_across_reads_is_ignored(start_proxy, upstream):
    # RFC 9112 §2.2: the empty line (CRLF) before a request-line may be ignored; its CR and LF
    # arriving in two TCP segments must not turn it into a "bare CR" 400.
    proxy, up = await proxy_for(start_proxy, upstream)
    raw, closed = await talk(proxy.port, [
        b"POST /a HTTP/1.1\r\nHost: t.example\r\nContent-Length: 5\r\n\r\nhello", b"\r", b"\n" + get(b"/b"),
    ])
    resps = await responses(raw)
    assert [(r[0], r[2]) for r in resps] == [(200, b"POST /a body=5"), (200, b"GET /b body=0")], raw[:400]


@pytest.mark.parametrize("framing, body", [
    (b"Content-Length: 5\r\n", b"hello"),
    (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
], ids=["content-length", "chunked"])
async def test_body_of_a_no_route_request_is_drained_and_the_connection_kept(start_proxy, upstream, framing, body):
    # RFC 9112 §9.3: a server must read the whole body (or close) to keep the connection; the next
    # request after a 404 is served, the body never becomes a request.
    proxy, up = await proxy_for(start_proxy, upstream, routes=[{"prefix": "/api", "lane": "app"}])
    raw, closed = await talk(proxy.port, b"POST /nowhere HTTP/1.1\r\nHost: t.example\r\n" + framing + b"\r\n" + body
                             + get(b"/api/x"))
    resps = await responses(raw)
    assert [r[0] for r in resps] == [404, 200], raw[:400]
    assert resps[1][2] == b"GET /api/x body=0" and not closed
    assert upstream_targets(up) == [(b"GET", b"/api/x")]


async def test_partial_body_then_body_timeout_never_reuses_the_upstream_connection(start_proxy, upstream):
    # Pause-based desync (Kettle 2022): after a body timeout the half-sent request's upstream
    # connection must be closed, never pooled (RFC 9112 §6.3(7): incomplete message -> close).
    proxy, up = await proxy_for(start_proxy, upstream, client={"body_timeout": "500ms"})
    reader, writer = await open_client(proxy.port)
    try:
        writer.write(b"POST /a HTTP/1.1\r\nHost: t.example\r\nContent-Length: 10\r\n\r\nhello")
        raw, closed = await slurp(reader, idle=2.0)
    finally:
        writer.close()
    assert raw.startswith(b"HTTP/1.1 408 ") and closed, raw[:200]
    raw2, _ = await talk(proxy.port, get(b"/canary"))
    assert raw2.endswith(b"GET /canary body=0"), raw2[:200]
    assert b"/canary" not in bytes(up.received[0]), "the connection with the half body was reused"


async def test_crlf_trickle_before_a_request_does_not_defeat_header_timeout(start_proxy, upstream):
    # nginx client_header_timeout counts from the connection's first byte; RFC 9112 §2.2 allows
    # ignoring empty lines, not keeping a connection forever with them (slowloris, a3 rule 9).
    proxy, up = await proxy_for(start_proxy, upstream, client={"header_timeout": "1s", "keepalive_timeout": "1s"})
    reader, writer = await open_client(proxy.port)
    closed = False
    try:
        for _ in range(16):  # 4 s of one CRLF every 250 ms
            try:
                writer.write(b"\r\n")
                await writer.drain()
            except ConnectionError:
                closed = True
                break
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.25)
                if not data or data.startswith(b"HTTP/1.1 408"):
                    closed = True
                    break
            except TimeoutError:
                pass
            except ConnectionError:
                closed = True
                break
    finally:
        writer.close()
    assert closed, "a client sending only CRLFs kept its connection past header_timeout (1 s) for 4 s"


async def test_crlf_trickle_on_an_idle_keepalive_connection_does_not_defeat_keepalive_timeout(start_proxy, upstream):
    # nginx keepalive_timeout / client_header_timeout: an idle connection is closed on time even
    # if it sends empty lines.
    proxy, up = await proxy_for(start_proxy, upstream, client={"header_timeout": "1s", "keepalive_timeout": "1s"})
    reader, writer = await open_client(proxy.port)
    closed = False
    try:
        writer.write(get(b"/first"))
        got = await read_one(RecordingReader(reader, bytearray()), b"GET", WAIT)
        assert got is not None and got[0] == 200
        for _ in range(16):
            try:
                writer.write(b"\r\n")
                await writer.drain()
            except ConnectionError:
                closed = True
                break
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.25)
                if not data or data.startswith(b"HTTP/1.1 408"):
                    closed = True
                    break
            except TimeoutError:
                pass
            except ConnectionError:
                closed = True
                break
    finally:
        writer.close()
    assert closed, "an idle keep-alive connection sending CRLFs outlived keepalive_timeout (1 s) for 4 s"


async def test_expect_100_continue_over_max_body_gets_413_without_100(start_proxy, upstream):
    # RFC 9110 §10.1.1: a server may answer a final status instead of 100; nginx sends 413 at once
    # for a declared Content-Length over client_max_body_size, never "100 Continue" first.
    proxy, up = await proxy_for(start_proxy, upstream, lane={"max_body": 10})
    raw, closed = await talk(proxy.port, b"POST /c HTTP/1.1\r\nHost: t.example\r\nExpect: 100-continue\r\n"
                             b"Content-Length: 100\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in raw, raw[:200]
    assert upstream_targets(up) == []


# == upstream status lines (RFC 9112 §4, RFC 9110 §15) =============================================


@pytest.mark.parametrize("code", [b"099", b"000"])
async def test_status_code_below_100_is_502(start_proxy, upstream, code):
    # RFC 9110 §15: status codes are 100..599; RFC 9112 §4; nginx requires the first digit 1-9
    # ("upstream sent no valid HTTP/1.0 header" -> 502). Never relayed as a "1xx".
    proxy, up = await proxy_for(start_proxy, upstream,
                                crafted(b"HTTP/1.1 %s Weird\r\nContent-Length: 2\r\n\r\nok" % code))
    raw, _ = await talk(proxy.port, get(b"/case"))
    assert raw.startswith(b"HTTP/1.1 502 "), raw[:200]


async def test_1xx_response_content_is_never_relayed(start_proxy, upstream):
    # RFC 9110 §15.2 / RFC 9112 §6.3(1): a 1xx ends at its blank line whatever its Content-Length;
    # bytes after it are the next response ("xxHTTP/1.1 ..." is not a valid one: 502). httptools
    # reads a body for 104..199 with Content-Length; relaying it raw would inject bytes into the
    # client's response stream.
    answer = (b"HTTP/1.1 150 Custom\r\nContent-Length: 2\r\n\r\nxx"
              b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    proxy, up = await proxy_for(start_proxy, upstream, crafted(answer))
    raw, _ = await talk(proxy.port, get(b"/case"))
    assert b"\r\n\r\nxx" not in raw and b"150" not in raw, f"1xx content relayed: {raw[:300]!r}"
    assert finals(await responses(raw)) == [502], raw[:300]


async def test_1xx_content_cannot_add_a_response_to_the_client_connection(start_proxy, upstream):
    # RFC 9112 §6.3(1) + F12: one request gets exactly one final response; a 1xx carrying a
    # Content-Length "body" must not make the client read an extra response (response-queue
    # desync: the client's next request would get the wrong answer).
    fake = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"
    answer = b"HTTP/1.1 150 Custom\r\nContent-Length: %d\r\n\r\n%s" % (len(fake), fake)
    answer += b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    proxy, up = await proxy_for(start_proxy, upstream, crafted(answer))
    raw, _ = await talk(proxy.port, [get(b"/case"), get(b"/next")], idle=1.0)
    got = [(r[0], r[2]) for r in await responses(raw) if not 100 <= r[0] < 200]
    assert len(got) == 2 and got[1] == (200, b"GET /next body=0"), f"client read {got}: {raw[:400]!r}"


async def test_reason_phrase_with_nul_is_not_relayed(start_proxy, upstream):
    # RFC 9112 §4: reason-phrase = *( HTAB / SP / VCHAR / obs-text ): NUL is invalid; laneproxy
    # writes its own status line and must not pass a NUL on (HTTP Garden: forwarding NUL).
    answer = b"HTTP/1.1 200 O\x00K\r\nContent-Length: 5\r\n\r\nhello"
    proxy, up = await proxy_for(start_proxy, upstream, crafted(answer))
    raw, _ = await talk(proxy.port, get(b"/case"))
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    assert b"\x00" not in raw, raw[:200]


async def test_reason_phrase_with_bare_cr_is_502(start_proxy, upstream):
    # RFC 9112 §2.2: a bare CR is invalid in any protocol element.
    proxy, up = await proxy_for(start_proxy, upstream, crafted(b"HTTP/1.1 200 O\rK\r\nContent-Length: 5\r\n\r\nhello"))
    raw, _ = await talk(proxy.port, get(b"/case"))
    assert raw.startswith(b"HTTP/1.1 502 ") and b"\rK" not in raw, raw[:200]


async def test_status_line_without_reason_gets_a_reason(start_proxy, upstream):
    # RFC 9112 §4: laneproxy's own status line always has the SP before the (optional) reason.
    proxy, up = await proxy_for(start_proxy, upstream, crafted(b"HTTP/1.1 200\r\nContent-Length: 5\r\n\r\nhello"))
    raw, _ = await talk(proxy.port, get(b"/case"))
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:200]
    assert (await responses(raw))[0][2] == b"hello"


# == response fields (RFC 9110 §6.6.1, §6.5) ======================================================


async def test_response_without_date_gets_one(start_proxy, upstream):
    # RFC 9110 §6.6.1: a recipient with a clock that receives a response without Date MUST append
    # one if it forwards the response (nginx always sends Date on proxied responses).
    proxy, up = await proxy_for(start_proxy, upstream, crafted(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"))
    raw, _ = await talk(proxy.port, get(b"/case"))
    [(status, headers, body, _)] = await responses(raw)
    assert status == 200 and body == b"hello"
    assert b"date" in headers, raw[:300]
    assert email.utils.parsedate_to_datetime(headers[b"date"][0].decode()) is not None


async def test_upstream_date_is_kept_once(start_proxy, upstream):
    # RFC 9110 §6.6.1: Date is a singleton field; the upstream's value is passed on, not doubled.
    date = b"Sun, 06 Nov 1994 08:49:37 GMT"
    proxy, up = await proxy_for(start_proxy, upstream,
                                crafted(b"HTTP/1.1 200 OK\r\nDate: %s\r\nContent-Length: 5\r\n\r\nhello" % date))
    raw, _ = await talk(proxy.port, get(b"/case"))
    [(status, headers, body, _)] = await responses(raw)
    assert headers.get(b"date") == [date], raw[:300]


async def test_response_trailers_are_passed_when_the_client_sent_te_trailers(start_proxy, upstream):
    # http-rules.md F11: "pass response trailers only when the client sent TE: trailers"
    # (RFC 9110 §6.5; HAProxy relays HTTP/1.1 trailers).
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n"
    proxy, up = await proxy_for(start_proxy, upstream, crafted(answer))
    raw, _ = await talk(proxy.port, get(b"/case", fields=b"TE: trailers\r\nConnection: TE\r\n"))
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:200]
    assert raw.endswith(b"0\r\nX-Checksum: abc\r\n\r\n"), raw[-200:]


# == upstream response framing (RFC 9112 §6.3) ====================================================


async def test_several_1xx_then_final(start_proxy, upstream):
    # RFC 9110 §15.2: a proxy MUST forward 1xx responses (I8); 102 and repeated 103 included.
    answer = (b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
              b"HTTP/1.1 103 Early Hints\r\nLink: </b.js>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    proxy, up = await proxy_for(start_proxy, upstream, crafted(answer))
    raw, closed = await talk(proxy.port, get(b"/case"))
    resps = await responses(raw)
    assert [r[0] for r in resps] == [102, 103, 103, 200], raw[:400]
    assert resps[1][1][b"link"] == [b"</a.css>"] and resps[2][1][b"link"] == [b"</b.js>"]
    assert resps[3][2] == b"hello" and not closed


async def test_head_response_with_transfer_encoding_chunked_and_no_body(start_proxy, upstream):
    # RFC 9112 §6.3(1): a HEAD response ends at its blank line; the next response on the same
    # client and upstream connection is read correctly.
    proxy, up = await proxy_for(start_proxy, upstream,
                                crafted(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"))
    raw, closed = await talk(proxy.port, get(b"/case", method=b"HEAD") + get(b"/next"))
    resps = await responses(raw, (b"HEAD", b"GET"))
    assert [(r[0], r[2]) for r in resps] == [(200, b""), (200, b"GET /next body=0")], raw[:400]
    assert not closed


async def test_204_with_chunked_last_chunk_bytes_discards_them(start_proxy, upstream):
    # RFC 9112 §6.3(1) + §6.3 (end): a 204 ends at its blank line; bytes after it are not a
    # response and the upstream connection is not reused (F12).
    proxy, up = await proxy_for(start_proxy, upstream,
                                crafted(b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"))
    raw, closed = await talk(proxy.port, get(b"/case") + get(b"/next"))
    resps = await responses(raw)
    assert [r[0] for r in resps] == [204, 200], raw[:400]
    assert b"transfer-encoding" not in resps[0][1] and resps[1][2] == b"GET /next body=0"
    assert b"0\r\n\r\nHTTP" not in raw


async def test_funky_chunk_extension_in_response_is_refused(start_proxy, upstream):
    # Funky chunks (w4ke 2025): a bare LF inside a chunk extension must not be read as a line end.
    answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;a\nxx\r\n"
              b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled\r\n0\r\n\r\n")
    proxy, up = await proxy_for(start_proxy, upstream, crafted(answer))
    raw, closed = await talk(proxy.port, get(b"/case"))
    assert b"smuggled" not in raw, raw[:300]
    assert raw.startswith(b"HTTP/1.1 502 ") or closed, raw[:300]


async def test_chunked_response_to_http10_client_is_decoded_and_close_delimited(start_proxy, upstream):
    # RFC 9112 §6.1: chunked MUST NOT be sent to an HTTP/1.0 recipient; body ends at close (§6.3(8)).
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    proxy, up = await proxy_for(start_proxy, upstream, crafted(answer))
    raw, closed = await talk(proxy.port, get(b"/case", version=b"1.0"))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding" not in head.lower(), raw[:300]
    assert body == b"hello world" and closed


async def test_http10_upstream_response_with_transfer_encoding_never_reaches_client_chunk_framed(start_proxy, upstream):
    # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message: treat the framing as faulty and close
    # the connection. Either 502, or the decoded body; the upstream connection is never reused.
    answer = b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    proxy, up = await proxy_for(start_proxy, upstream, crafted(answer))
    raw, _ = await talk(proxy.port, get(b"/case") + get(b"/next"))
    resps = await responses(raw)
    assert resps and resps[0][0] in (200, 502), raw[:300]
    if resps[0][0] == 200:
        assert resps[0][2] == b"hello"
    per_conn = [[r.target for r, _ in parse_requests(r_, complete=False)] for r_ in up.received]
    assert all(t == [b"/case"] for t in per_conn if b"/case" in t), per_conn


async def test_upstream_connection_close_does_not_close_the_client_connection(start_proxy, upstream):
    # RFC 9110 §7.6.1: Connection is hop-by-hop; the upstream's "close" ends the upstream
    # connection only (nginx keeps the client connection alive), and is not relayed.
    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello"
    proxy, up = await proxy_for(start_proxy, upstream, crafted(answer, "close"))
    raw, closed = await talk(proxy.port, [get(b"/case"), get(b"/next")], idle=1.0)
    resps = await responses(raw)
    assert [(r[0], r[2]) for r in resps] == [(200, b"hello"), (200, b"GET /next body=0")], raw[:400]
    assert b"connection" not in resps[0][1] and not closed
    assert up.connections == 2
