"""Request building: a parsed request head becomes an Exchange with laneproxy's own upstream head.

`RequestHead` collects the head as the parser delivers it (the downstream protocol's URL and
field callbacks: limits, the fields laneproxy handles itself, the ones it forwards);
`build_exchange` takes the complete head from there.

Every request is validated on its own (version, method, target, Host, framing, Expect, Upgrade),
routed by its path, and re-serialised: the request line, Host, the forwarded fields minus the
hop-by-hop ones, X-Real-IP / X-Forwarded-* / Via, then exactly one framing header.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from laneproxy.context import MAX_FIELD_LINE, Context
from laneproxy.errors import BadRequest, BodyTooLarge, NoRoute, ProxyError
from laneproxy.exchange import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, Exchange
from laneproxy.http1 import (
    BODY_METHODS,
    CRLF,
    H_CL,
    H_CONNECTION,
    H_EXPECT,
    H_HOST,
    H_ONCE,
    H_TE,
    H_TE_HOP,
    H_UPGRADE,
    H_XFF,
    IDEMPOTENT,
    REQUEST_SPECIAL,
    VIA,
    VIA_10,
    check_host,
    has_field,
    split_target,
    split_tokens,
)

if TYPE_CHECKING:
    import httptools

    from laneproxy.downstream import DownstreamProtocol

_KEEP_TOKENS = frozenset((b"close", b"keep-alive", b"upgrade"))



class RequestHead:
    """The request head as httptools delivers it, for DownstreamProtocol (a mixin on its slots):
    the URL, the forwarded field lines, and the fields laneproxy handles itself."""

    __slots__ = ()

    ctx: Context
    parser: httptools.HttpRequestParser
    trusted: bool
    requests: int
    te_trailers_at: int

    def _reset_request(self) -> None:
        self.url = b""
        self.headers: list[bytes] = []
        self.host: bytes | None = None
        self.content_length: int | None = None
        self.te: list[bytes] | None = None
        self.conn_tokens: list[bytes] | None = None
        self.expect: bytes | None = None
        self.xff: list[bytes] | None = None
        self.upgrade: bytes | None = None
        self.header_count = 0
        self.header_bytes = 0
        self.deferred: ProxyError | None = None

    def on_url(self, url: bytes) -> None:
        self.url += url
        # The whole request line counts (nginx's buffer): method, target, two spaces and
        # "HTTP/1.1"; the method is looked up only near the limit.
        room = self.ctx.max_request_line - 13  # 13: the shortest method (3) and the rest (10)
        if len(self.url) > room and len(self.parser.get_method()) + len(self.url) + 10 > room + 13:
            raise ProxyError("request line too long", 414)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        size = len(name) + len(value) + 4
        self.header_bytes += size
        ctx = self.ctx
        if size > MAX_FIELD_LINE or self.header_bytes > ctx.max_header_size:
            raise ProxyError("request header fields too large", 431)
        if self.header_count > ctx.max_headers:
            raise ProxyError("too many request header fields", 431)
        lname = name.lower()
        kind = REQUEST_SPECIAL.get(lname)
        if kind is None:
            if name.find(b"_") != -1 and self.ctx.underscore_headers != "allow":  # (`find`: see split_target)
                # nginx underscores_in_headers off: Content_Length never reaches an upstream that
                # might read it as Content-Length.
                if self.ctx.underscore_headers == "reject":
                    raise BadRequest("header name with an underscore")
                return
            self.headers.append(b"".join((name, b": ", value.rstrip(b" \t"), b"\r\n")))
            return
        if kind == H_ONCE:
            if has_field(self.headers, lname + b":"):
                self.deferred = BadRequest(f"more than one {name.decode('latin-1')} field")
            self.headers.append(b"".join((name, b": ", value.rstrip(b" \t"), b"\r\n")))
            return
        if kind == H_TE and value.rstrip(b" ").endswith(b"\t"):
            # llhttp reads `chunked\t` as an unknown coding, though OWS is no part of a value
            # (RFC 9110 §5.5): the downstream parses this head again without it.
            raise TransferEncodingOWS("HTAB after the Transfer-Encoding value")
        value = value.strip(b" \t")
        if not value.isascii():  # obs-text is opaque data, never part of framing or routing
            raise BadRequest(f"non-ASCII bytes in {name.decode('latin-1')}")
        if kind == H_HOST:
            if self.host is not None:
                self.deferred = BadRequest("more than one Host field")
            self.host = value
        elif kind == H_CL:
            self.content_length = int(value)  # httptools checked 1*DIGIT, no duplicates
        elif kind == H_TE:
            self.te = (self.te or []) + split_tokens(value)
        elif kind == H_CONNECTION:
            self.conn_tokens = (self.conn_tokens or []) + split_tokens(value)
        elif kind == H_EXPECT:  # repeated lines are one list (RFC 9110 §5.3): all must be known
            self.expect = value.lower() if self.expect is None else self.expect + b", " + value.lower()
        elif kind == H_TE_HOP:
            if b"trailers" in split_tokens(value):
                self.te_trailers_at = self.requests  # this request accepts response trailers
        elif kind == H_XFF:
            if self.trusted:
                self.xff = (self.xff or []) + [value]
        elif kind == H_UPGRADE:
            self.upgrade = value if self.upgrade is None else self.upgrade + b", " + value
        # H_DROP: hop-by-hop or laneproxy's own forwarding fields


def local_host(down: DownstreamProtocol) -> bytes:
    """The listener's address as a Host value (HTTP/1.0 requests without Host)."""
    sock = down.transport.get_extra_info("sockname")
    if not isinstance(sock, tuple):
        return b"localhost"
    host = f"[{sock[0]}]" if ":" in sock[0] else sock[0]
    return f"{host}:{sock[1]}".encode()


def build_exchange(down: DownstreamProtocol) -> Exchange:
    """The parsed request (head complete) → an Exchange carrying laneproxy's own upstream head."""
    p = down.parser
    version = p.get_http_version()
    if version == "1.1":
        http11 = True
    elif version == "1.0":
        http11 = False
    elif version.startswith("2") or version.startswith("3"):
        raise ProxyError(f"HTTP/{version} is not supported on this listener", 505)
    else:
        raise BadRequest(f"HTTP/{version} request")
    down.http11 = http11
    method = p.get_method()
    keep_alive = p.should_keep_alive() and http11 and down.requests < down.ctx.keepalive_requests
    if method == b"CONNECT" or method == b"TRACE":
        raise ProxyError(f"{method.decode()} is not allowed", 405)
    if down.deferred is not None:
        raise down.deferred
    url = down.url
    if url == b"*":
        if method != b"OPTIONS":
            raise BadRequest("'*' is only for OPTIONS")
        path, query, authority = b"/", b"", None
    else:
        path, query, authority = split_target(url)
    host = down.host
    host_fields = None
    if authority is not None:
        # RFC 9112 §3.2.2: the target's authority replaces Host; Host must still be present (in
        # HTTP/1.1) and valid (§3.2), as nginx checks it.
        if host is None:
            if http11:
                raise BadRequest("missing Host")
        elif host != down.host_ok:
            check_host(host)
        out_host = authority
    elif host is None:
        if http11:
            raise BadRequest("missing Host")
        out_host = local_host(down)
    else:
        if host != down.host_ok:  # a keep-alive client repeats its Host: validate it once
            down.host_ok = check_host(host)
            down.host_fields = host_fields_for(host)
        out_host = down.host_ok
        host_fields = down.host_fields
    te = down.te
    if te is not None:
        if not http11:
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        if te != [b"chunked"]:
            raise ProxyError("only the chunked transfer coding is implemented", 501)
        body_kind = BODY_CHUNKED
    elif down.content_length:
        body_kind = BODY_LENGTH
    else:
        body_kind = BODY_NONE
    expect_continue = False
    if down.expect is not None:
        # A list (RFC 9110 §10.1.1) whose empty elements do not count (§5.6.1.2): `Expect:` and
        # `Expect: ,` expect nothing; any member other than 100-continue is refused.
        tokens = [b"100-continue"] if down.expect == b"100-continue" else split_tokens(down.expect)
        if any(t != b"100-continue" for t in tokens):
            raise ProxyError("unsupported expectation", 417)
        expect_continue = http11 and body_kind != BODY_NONE and bool(tokens)
    if down.upgrade is not None and p.should_upgrade() and body_kind != BODY_NONE:
        raise BadRequest("Upgrade request with a body")
    if method == b"OPTIONS" and max_forwards(down) == 0:
        # RFC 9110 §7.6.2: at zero, the intermediary answers as the final recipient.
        ex = Exchange(down, None, method, b"", body_kind, keep_alive, local=OptionsAnswer())
        ex.target = url
        return ex
    route = down.ctx.router.match(path)
    if route is None:
        ex = Exchange(
            down, None, method, b"", body_kind, keep_alive,
            local=NoRoute(f"no route for {path.decode('latin-1')[:200]}"),
        )
        ex.target = url
        return ex
    static = route.static
    if static is not None and (method == b"GET" or method == b"HEAD"):
        file = static.find(path)
        if file is not None:
            ex = Exchange(down, route, method, b"", body_kind, keep_alive, static=(file, request_fields(down)))
            ex.target = url
            ex.fields = down.headers
            return ex
    lane = route.lane
    if lane.max_body and body_kind == BODY_LENGTH and down.content_length > lane.max_body:  # type: ignore[operator]
        raise BodyTooLarge(f"request body over the lane's max_body ({lane.max_body} bytes)")
    headers = down.headers
    if down.conn_tokens is not None:
        named = set(down.conn_tokens) - _KEEP_TOKENS
        if named:  # remove what Connection names before adding laneproxy's own fields
            headers = [h for h in headers if h.split(b":", 1)[0].lower() not in named]
            if b"x-forwarded-for" in named:
                down.xff = None
    if down.xff is not None:
        forwarded = down.fwd_fixed + b"X-Forwarded-For: %s, %s\r\n" % (b", ".join(down.xff), down.peer_ip)
    else:
        forwarded = down.fwd_own  # precomputed per connection
    if not http11:
        host_fields = host_fields_for(out_host, VIA_10)  # RFC 9110 §7.6.3: the version received
    elif host_fields is None:
        host_fields = host_fields_for(out_host)
    offer = None
    if down.upgrade is not None and http11 and down.conn_tokens and b"upgrade" in down.conn_tokens:
        tokens = split_tokens(down.upgrade)
        offer = frozenset(t.split(b"/")[0] for t in tokens) & lane.upgrade_tokens or None
        if offer is not None:  # forward only the allowed protocols (never h2c)
            if b"websocket" in offer and not has_field(headers, b"sec-websocket-key:"):
                # RFC 6455 §4.2.1: a handshake without its key is refused (400, as HAProxy does).
                raise BadRequest("WebSocket handshake without Sec-WebSocket-Key")
            allowed = b", ".join(t for t in tokens if t.split(b"/")[0] in offer)
            headers = [*headers, b"Connection: upgrade\r\nUpgrade: %s\r\n" % allowed]
    if body_kind == BODY_LENGTH:
        framing = b"Content-Length: %d\r\n\r\n" % down.content_length
    elif body_kind == BODY_CHUNKED:
        framing = b"Transfer-Encoding: chunked\r\n\r\n"
    elif method in BODY_METHODS:
        framing = b"Content-Length: 0\r\n\r\n"
    else:
        framing = CRLF
    if url == b"*" or (authority is not None and method == b"OPTIONS" and url.endswith(b"//" + authority)):
        target = b"*"  # RFC 9112 §3.2.4: OPTIONS to an absolute-form URI with an empty path
    else:
        target = route.upstream_path(path) + query
    head = b"".join([
        method, b" ", target, b" HTTP/1.1\r\nHost: ", out_host, CRLF,
        *headers,
        forwarded, host_fields,
        framing,
    ])
    ex = Exchange(
        down, route, method, head, body_kind, keep_alive,
        expect_continue=expect_continue, idempotent=method in IDEMPOTENT, upgrade=offer,
    )
    if offer is not None:
        down.last_offer = ex
    if down.te_trailers_at == down.requests:
        ex.trailers_ok = True
    ex.target = url
    ex.fields = down.headers
    return ex

def body_ends_within(head: bytes, after: int) -> bool:
    """A raw request head (lower-cased) followed by `after` bytes in the same read: does its body
    end within them (no Content-Length, or a smaller one)? Unparsable values: True (httptools
    will say what is wrong)."""
    # At a line start: `X-Content-Length:` or a value holding "content-length:" must not count,
    # or a pipelined request behind this body would skip the checks of a request's first byte.
    i = head.find(b"\ncontent-length:")
    if i == -1:
        return True
    j = head.find(b"\r", i)
    try:
        return int(head[i + 16 : j if j != -1 else len(head)]) < after
    except ValueError:
        return True


def host_fields_for(host: bytes, via: bytes = VIA) -> bytes:
    """X-Forwarded-Host and Via as laneproxy adds them upstream."""
    return b"X-Forwarded-Host: %s\r\nVia: %s\r\n" % (host, via)


def request_fields(down: DownstreamProtocol) -> dict[bytes, bytes]:
    """The forwarded fields as {lower-name: value} (repeated lines joined), for local responders."""
    fields: dict[bytes, bytes] = {}
    for line in down.headers:
        name, _, value = line[:-2].partition(b": ")
        name = name.lower()
        fields[name] = fields[name] + b", " + value if name in fields else value  # RFC 9110 §5.3
    if down.host is not None:
        fields[b"host"] = down.host
    return fields


class TransferEncodingOWS(BadRequest):
    """A Transfer-Encoding value followed by OWS with an HTAB (400 when the head cannot be parsed again)."""


class OptionsAnswer(ProxyError):
    """`OPTIONS` with `Max-Forwards: 0`: laneproxy answers 200 itself."""

    status = 200
    side = "downstream"

    fields = b"Allow: GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH\r\n"

    def __init__(self) -> None:
        super().__init__("OPTIONS answered by laneproxy (Max-Forwards: 0)")


def max_forwards(down: DownstreamProtocol) -> int | None:
    """Max-Forwards of an OPTIONS request; a forwarded one goes out decremented (RFC 9110 §7.6.2)."""
    headers = down.headers
    for i, line in enumerate(headers):
        if line[:13].lower() == b"max-forwards:":
            value = line[13:-2].strip()
            if not value.isdigit():
                raise BadRequest("invalid Max-Forwards")
            n = int(value)
            if n > 0:
                headers[i] = b"Max-Forwards: %d\r\n" % (n - 1)
            return n
    return None
