"""RequestStart: the raw bytes where a request starts, before httptools parses them.

A mixin on DownstreamProtocol's slots. Where one message ends inside a read, the rest is cut off
and starts anew (`_cut`), so each request gets these checks from its first byte, and a head's
blank line may straddle reads (`_head_end`). llhttp is strict, but three things at the start of a
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
    head_parts: list[bytes]
    cr_pending: bool
    line_part: bytes | None

    if TYPE_CHECKING:  # DownstreamProtocol's

        def _request_error(self, err: ProxyError) -> None: ...

        def _feed(self, data: bytes) -> None: ...

        def data_received(self, data: bytes) -> None: ...

        is_closed: bool

    def _cut(self, data: bytes, at: int) -> None:
        """A message ends at `at`: what follows takes the usual way, checked as a new start
        (request line, empty lines, chunk guard, Upgrade hold, ...)."""
        self._feed(data[:at])
        if not self.is_closed:
            self.data_received(data[at:])

    def _parsed_method(self) -> bytes | None:
        """The method of the request line read so far (None: not that far)."""
        try:
            return self.parser.get_method()
        except Exception:  # noqa: BLE001 - nothing parsed yet
            return None

    def _parsed_protocol(self) -> bytes:
        """The version of the request line read so far, for the log (b"-": not that far)."""
        version = self.parser.get_http_version()
        return b"-" if version == "0.0" else b"HTTP/" + version.encode()

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

    def _head_end(self, data: bytes) -> int:
        """Where in `data` the head begun in earlier reads (`head_parts`) ends, just after its
        blank line, which may straddle the reads; -1 when it does not end in `data`."""
        tail = self.head_parts[-1][-3:]
        if len(tail) < 3:
            tail = b"".join(self.head_parts[-3:])[-3:]
        if tail[-1:] == b"\r":
            if tail == b"\r\n\r" and data[:1] == b"\n":
                return 1
            if data[:3] == b"\n\r\n":
                return 3
        elif tail[-2:] == b"\r\n" and data[:2] == b"\r\n":
            return 2
        end = data.find(b"\r\n\r\n")
        return -1 if end == -1 else end + 4

    def _reparse_without_te_ows(self, data: bytes) -> bool:
        """The field callback refused a Transfer-Encoding value with an HTAB after it: parse the
        head again, from its first byte, without that whitespace (True: done)."""
        if self.head_bytes:  # the head began in earlier reads
            data = b"".join(self.head_parts) + data
        clean = strip_te_ows(data)
        if clean == data:
            return False
        self.parser = httptools.HttpRequestParser(self)
        self.requests -= 1  # (on_message_begin counts it again)
        self.ctx.requests -= 1
        self._feed(clean)
        return True
