"""RequestStart: the raw bytes where a request starts, before httptools parses them.

A mixin on DownstreamProtocol's slots. llhttp is strict, but three things at the start of a
request need laneproxy's own look at the raw bytes: the empty lines it would skip (only whole
CRLFs are allowed before a request line, RFC 9112 §2.2), the protocol name of the request line
(llhttp also takes RTSP/x.y and ICE/x.y and reports only the numbers), and a Transfer-Encoding
value followed by an HTAB, which llhttp reads as an unknown coding (the head is parsed again
without that whitespace, which is no part of the value, RFC 9110 §5.5).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httptools

from laneproxy.errors import BadRequest
from laneproxy.http1 import HTTP_REQUEST_LINE, strip_te_ows

if TYPE_CHECKING:
    from laneproxy.context import Context
    from laneproxy.errors import ProxyError


class RequestStart:
    __slots__ = ()

    ctx: Context
    parser: httptools.HttpRequestParser
    requests: int
    head_bytes: int
    cr_pending: bool
    line_part: bytes | None

    if TYPE_CHECKING:  # DownstreamProtocol's

        def _request_error(self, err: ProxyError) -> None: ...

        def _feed(self, data: bytes) -> None: ...

    def _skip_empty_lines(self, data: bytes) -> bytes:
        """`data` without the empty lines before a request line (b"" when nothing else is
        there yet, or a bare CR/LF was answered with 400); a CRLF may be split between reads."""
        if self.cr_pending:
            self.cr_pending = False
            data = b"\r" + data
        stripped = data.lstrip(b"\r\n")
        blank = data[: len(data) - len(stripped)]
        if not stripped and blank[-1] == 13:
            self.cr_pending = True
            blank = blank[:-1]
        if blank.replace(b"\r\n", b""):
            self._request_error(BadRequest("bare CR or LF before the request line"))
            return b""
        # Empty lines only: no request has begun, so the header (or keep-alive) timer keeps
        # running; a trickle of CRLFs must not hold the connection open.
        return stripped

    def _http_request_line(self, data: bytes) -> bool:
        """A request head starts (or its first line goes on) in `data`: is it an HTTP request
        line? Answers 400 and returns False when not; a line not all here yet waits for its end."""
        part = self.line_part
        line = data if part is None else part + data
        if HTTP_REQUEST_LINE.match(line) is not None:
            self.line_part = None
            return True
        if line.find(b"\n") == -1 and line.find(b"\r") == -1:
            self.line_part = line
            return True
        self.line_part = None
        self._request_error(BadRequest("not an HTTP/1.x request line"))
        return False

    def _reparse_without_te_ows(self, data: bytes) -> bool:
        """The field callback refused a Transfer-Encoding value with an HTAB after it: parse the
        head again without that whitespace, when it began in this read (True: done)."""
        if self.head_bytes:
            return False
        clean = strip_te_ows(data)
        if clean == data:
            return False
        self.parser = httptools.HttpRequestParser(self)
        self.requests -= 1  # (on_message_begin counts it again)
        self.ctx.requests -= 1
        self._feed(clean)
        return True
