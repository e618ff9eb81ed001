"""HTTP/1.1 wire helpers: status lines, hop-by-hop tables, target and Host checks, canned answers.

Everything here is bytes in, bytes out, precomputed at import time where it can be (uvicorn's
STATUS_LINE habit). No I/O, no state.
"""

from __future__ import annotations

import ipaddress
import re
import time
from email.utils import formatdate
from http import HTTPStatus

from laneproxy.errors import BadRequest, BodyTooLarge, UpstreamProtocolError

CRLF = b"\r\n"
VIA = b"1.1 laneproxy"
VIA_10 = b"1.0 laneproxy"  # for requests received as HTTP/1.0

REASON: dict[int, bytes] = {s.value: s.phrase.encode("latin-1") for s in HTTPStatus}
STATUS_LINE: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("latin-1")) for s in HTTPStatus
}


_BAD_REASON = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]").search


def status_line(status: int, reason: bytes = b"") -> bytes:
    """laneproxy's own status line (I1); an upstream's reason phrase is checked here, where a
    non-standard one is written (RFC 9112 §4: HTAB, SP, VCHAR, obs-text; never a CTL or NUL)."""
    line = STATUS_LINE.get(status)
    if line is not None and not reason:
        return line
    if _BAD_REASON(reason):
        raise UpstreamProtocolError("control character in the upstream's reason phrase")
    return b"HTTP/1.1 %d %s\r\n" % (status, reason or b"Unknown")


# Request fields laneproxy never forwards as received: framing is re-serialised, hop-by-hop
# fields are removed (RFC 9110 §7.6.1), and the forwarding fields are laneproxy's own.
# Values: what the downstream parser does with the field (see downstream.on_header).
H_HOST, H_CL, H_TE, H_CONNECTION, H_EXPECT, H_XFF, H_DROP, H_UPGRADE, H_TE_HOP, H_ONCE = range(10)
REQUEST_SPECIAL: dict[bytes, int] = {
    b"host": H_HOST,
    b"content-length": H_CL,
    b"transfer-encoding": H_TE,
    b"connection": H_CONNECTION,
    b"expect": H_EXPECT,
    b"x-forwarded-for": H_XFF,
    b"upgrade": H_UPGRADE,
    b"keep-alive": H_DROP,
    b"proxy-connection": H_DROP,
    b"proxy-authorization": H_DROP,
    b"te": H_TE_HOP,  # hop-by-hop; `trailers` in it lets response trailers through (F11)
    b"trailer": H_DROP,
    b"x-real-ip": H_DROP,
    b"x-forwarded-proto": H_DROP,
    b"x-forwarded-host": H_DROP,
    # Forwarded, but at most once (not lists, RFC 9110 §5.3): two Authorization lines could
    # name two users to two readers. nginx answers 400 to these repeated, as to Host.
    b"authorization": H_ONCE,
    b"if-modified-since": H_ONCE,
    b"if-unmodified-since": H_ONCE,
    b"if-range": H_ONCE,
    b"content-range": H_ONCE,
}

# Response fields handled by the upstream side rather than copied.
R_CL, R_TE, R_CONNECTION, R_DROP, R_KEEPALIVE, R_UPGRADE, R_DATE, R_TRAILER = range(8)
RESPONSE_SPECIAL: dict[bytes, int] = {
    b"date": R_DATE,  # kept; noted so that a response without one gets laneproxy's (RFC 9110 §6.6.1)
    b"content-length": R_CL,
    b"transfer-encoding": R_TE,
    b"connection": R_CONNECTION,
    b"keep-alive": R_KEEPALIVE,
    b"proxy-connection": R_DROP,
    b"trailer": R_TRAILER,  # announces trailers: sent on only with them (F11)
    b"upgrade": R_UPGRADE,
}

# Fields never passed on as response trailers (RFC 9110 §6.5.1: framing, routing, request
# modifiers, authentication, response control and content processing; Go's net/http list).
TRAILER_DENY = frozenset((
    b"authorization", b"cache-control", b"connection", b"content-encoding", b"content-length",
    b"content-range", b"content-type", b"date", b"expect", b"expires", b"host", b"keep-alive",
    b"location", b"max-forwards", b"pragma", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"range", b"retry-after", b"set-cookie", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"vary", b"www-authenticate",
))
MAX_TRAILERS = 16 * 1024  # bytes of response trailer fields (431-like bound: 502 / abort beyond)

IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
# Methods whose request is expected to carry a body: an empty one is sent as Content-Length: 0.
BODY_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))


_COMMON_TOKENS = {b"keep-alive": [b"keep-alive"], b"close": [b"close"], b"chunked": [b"chunked"]}


def has_field(lines: list[bytes], prefix: bytes) -> bool:
    """Is there a field line (`Name: value\r\n`) whose lower-cased name and colon are `prefix`?"""
    n = len(prefix)
    return any(line[:n].lower() == prefix for line in lines)


def split_tokens(value: bytes) -> list[bytes]:
    """A comma list (Connection, Transfer-Encoding) → lowercased tokens, empty elements dropped."""
    common = _COMMON_TOKENS.get(value)  # the usual single token: no split on the hot path
    if common is not None:
        return common[:]
    return [t for t in (p.strip(b" \t").lower() for p in value.split(b",")) if t]


# -- request target and Host (RFC 9112 §3.2) ---------------------------------------------------

# RFC 9110 §4.2.1 / RFC 3986 §3.2: a non-empty host (an empty one is invalid), then an optional
# port of *DIGIT (`example.com:` is valid, as nginx takes it).
# RFC 3986 §3.2.2 host (reg-name, an IP literal or IPvFuture in brackets) and an optional port.
_HOST_RE = re.compile(
    rb"(?:\[([0-9A-Fa-f:.]+)\]|\[v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)"
    rb"(?::([0-9]{0,5}))?"
)
_PCT_RE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
# Encoded dot, slash and backslash: an upstream that decodes them would route differently.
# An encoded NUL: nginx refuses it (400) and C-string upstreams cut the path at it.
_ENCODED_SEP_RE = re.compile(rb"%(?:2[eEfF]|5[cC]|00)")


# A Transfer-Encoding line's trailing whitespace with an HTAB in it: llhttp reads `chunked\t` as an
# unknown coding, though OWS is no part of a field value (RFC 9110 §5.5).
_TE_TRAILING_OWS = re.compile(rb"(?im)^(transfer-encoding:[^\r\n]*?)[ \t]*\t[ \t]*(?=\r\n)")


def strip_te_ows(data: bytes) -> bytes:
    """`data` (the start of a request head, maybe more) with the trailing OWS of its
    Transfer-Encoding lines removed; the bytes after the head are left as they are."""
    end = data.find(b"\r\n\r\n")
    head, rest = (data, b"") if end == -1 else (data[: end + 2], data[end + 2 :])
    return _TE_TRAILING_OWS.sub(rb"\1", head) + rest


# The end of a request line: llhttp also takes RTSP/x.y and ICE/x.y there (and reports only the
# numbers), which must not pass as HTTP (RFC 9112 §2.3: HTTP-name is "HTTP", case-sensitive).
HTTP_REQUEST_LINE = re.compile(rb"[^\r\n]*HTTP/[0-9]\.[0-9]\r")


def check_host(value: bytes) -> bytes:
    """A Host value (or an absolute-form authority), as nginx validates it (RFC 9112 §3.2: 400)."""
    m = _HOST_RE.fullmatch(value)
    if m is None or (m.group(2) and int(m.group(2)) > 65535):
        raise BadRequest("invalid Host")
    if value.find(b"..") != -1:  # an empty label: never a host name, and `..` to an app's file mapping
        raise BadRequest("invalid Host")
    if m.group(1) is not None:  # an IP literal must be an IPv6 address
        try:
            ipaddress.IPv6Address(m.group(1).decode())
        except ValueError:
            raise BadRequest("invalid Host") from None
    return value


# RFC 3986 unreserved, sub-delims, ":", "@", "/" and "?": a target made of these alone needs no
# further checks (split_target's fast path).
_PLAIN_TARGET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/?"


def split_target(target: bytes) -> tuple[bytes, bytes, bytes | None]:
    """Request target → (path, query-with-'?', authority or None for origin-form).

    Rejects what would route differently after an upstream's normalisation (dot segments,
    encoded dots and slashes, backslashes, bad escapes) instead of forwarding it.
    """
    if (
        target[:1] == b"/" and not target.translate(None, _PLAIN_TARGET)
        and target.find(b"/.") == -1 and target.find(b"//") == -1
    ):
        # The usual origin-form target: only plain characters (no %, #, \\), no dot segment, no
        # empty segment.
        q = target.find(b"?")
        if q == -1:
            return target, b"", None
        return target[:q], target[q:], None
    return _split_target_checked(target)


def _split_target_checked(target: bytes) -> tuple[bytes, bytes, bytes | None]:
    """split_target for every target (the fast path must always agree with this)."""
    authority = None
    if target[:1] != b"/":
        lower = target[:8].lower()
        if lower.startswith(b"http://") or lower.startswith(b"https://"):
            rest = target[target.index(b"//") + 2 :]
            cut = len(rest)
            for sep in (b"/", b"?"):
                i = rest.find(sep)
                if i != -1 and i < cut:
                    cut = i
            authority, target = rest[:cut], rest[cut:]
            if not authority or b"@" in authority:
                raise BadRequest("invalid authority in absolute-form target")
            check_host(authority)
            if target[:1] != b"/":
                target = b"/" + target
        else:
            raise BadRequest("invalid request target")
    q = target.find(b"?")
    if q == -1:
        path, query = target, b""
    else:
        path, query = target[:q], target[q:]
    # `find` rather than `in`: CPython's bytes `in` first tries the operand as an integer and
    # raises and clears a TypeError inside, on every call (seen in perf, per request).
    if target.find(b"#") != -1:
        raise BadRequest("fragment in request target")
    if path.find(b"%") != -1 or path.find(b"/.") != -1 or path.find(b"\\") != -1:
        check_path(path)
        if path.find(b"%") != -1:
            path = _PCT_ANY_RE.sub(_decode_unreserved, path)
    if path.find(b"//") != -1:
        path = _SLASHES_RE.sub(b"/", path)
    return path, query, authority


# Routing sees a path as nginx's location matching does (http-rules a3: no lane bypass by an
# equivalent spelling): escapes of unreserved characters decoded (RFC 3986 §6.2.2.2: `/t%61st` is
# `/tast`) and runs of slashes merged (nginx merge_slashes). The normalised path is also what goes
# upstream, so the upstream sees the path that was routed.
_PCT_ANY_RE = re.compile(rb"%([0-9A-Fa-f]{2})")
_SLASHES_RE = re.compile(rb"/{2,}")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_~")


def _decode_unreserved(m: re.Match[bytes]) -> bytes:
    byte = int(m.group(1), 16)
    return bytes((byte,)) if byte in _UNRESERVED else m.group(0)


def check_path(path: bytes) -> None:
    if b"\\" in path:
        raise BadRequest("backslash in path")
    if _PCT_RE.search(path):
        raise BadRequest("invalid percent-encoding in path")
    if _ENCODED_SEP_RE.search(path):
        raise BadRequest("encoded '.', '/', '\\' or NUL in path")
    for segment in path.split(b"/"):
        if segment == b"." or segment == b"..":
            raise BadRequest("dot segment in path")


# -- canned answers ------------------------------------------------------------------------------


_date_cache: list = [0, b""]


def http_date() -> bytes:
    """The current IMF-fixdate (RFC 9110 §5.6.7), formatted once per second."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True).encode()
    return _date_cache[1]


def error_response(status: int, reason: str, *, close: bool, extra: bytes = b"", head_only: bool = False) -> bytes:
    """The one place laneproxy's own answers are serialised: short plain text naming the reason."""
    body = f"{status} {HTTPStatus(status).phrase if status in STATUS_LINE else ''}: {reason}\n".encode()
    parts = [
        status_line(status),
        b"Server: laneproxy\r\nDate: %s\r\nContent-Type: text/plain; charset=utf-8\r\n" % http_date(),
        b"Content-Length: %d\r\n" % len(body),
        extra,
        b"Connection: close\r\n\r\n" if close else CRLF,
    ]
    if not head_only:
        parts.append(body)
    return b"".join(parts)


CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


class ChunkLineGuard:
    """Bounds the chunk-size lines (size + extensions) of one chunked request body.

    httptools does not expose chunk extensions; laneproxy never forwards them, but refuses more
    than `MAX_CHUNK_EXT` bytes of them per chunk (RFC 9112 §7.1.1). The guard follows the body's
    framing from the raw bytes (already validated by llhttp, so it only needs the sizes).
    """

    __slots__ = ("skip", "line", "head", "done", "ended", "tail", "limit", "declared")
    MAX_LINE = 1024 + 32  # 1 KiB of extensions plus the hex size and CRLF

    def __init__(self, limit: int = 0) -> None:
        self.skip = 0  # chunk data + CRLF still to pass over
        self.line = 0  # bytes of the current size line so far
        self.head = b""  # the line up to its first ';' (the size, leading zeros and all)
        self.done = False  # the last chunk was seen: trailers follow (bounded as header fields)
        self.ended = False  # the empty line after the trailers was seen: the message is over
        self.tail = -1  # where in the last `feed`'s data the message ended (-1: not there)
        self.limit = limit  # the lane's max_body (0: none)
        self.declared = 0  # the sum of the chunk sizes so far

    def feed(self, data: bytes) -> bool:
        """False when a chunk-size line is over the limit; BodyTooLarge as soon as the declared
        chunk sizes pass `limit` (nginx: "client intended to send too large chunked body")."""
        i, n = 0, len(data)
        self.tail = -1
        while i < n and not self.ended:
            if self.skip:
                step = min(self.skip, n - i)
                self.skip -= step
                i += step
                continue
            j = data.find(b"\n", i)
            end = n if j == -1 else j + 1
            if self.done:  # trailer lines, up to the empty one that ends the message
                self.line += end - i
                if j == -1:
                    return True
                if self.line == 2:  # CRLF (a bare LF here is llhttp's error)
                    self.ended = True
                    self.tail = end
                    return True
                self.line = 0
                i = end
                continue
            if self.head.find(b";") == -1:  # (bounded: the line is at most MAX_LINE)
                self.head += data[i:end]
            self.line += end - i
            if self.line > self.MAX_LINE:
                return False
            if j == -1:
                return True
            try:
                size = int(self.head.split(b";", 1)[0].strip(b" \t\r\n"), 16)
            except ValueError:
                return True  # llhttp rejects it with its own error
            self.line, self.head = 0, b""
            if size == 0:
                self.done = True  # (the trailer section follows, maybe empty)
            elif size >> 64:
                return True  # llhttp refuses the overflow with its own 400
            else:
                self.skip = size + 2
                self.declared += size
                if self.limit and self.declared > self.limit:
                    raise BodyTooLarge(f"request body over the lane's max_body ({self.limit} bytes)")
            i = end
        return True
