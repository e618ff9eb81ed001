"""Errors that carry their answer: the status to send, which side failed, whether a retry is safe."""

from __future__ import annotations

from typing import Literal

Side = Literal["downstream", "upstream", "internal"]


class ProxyError(Exception):
    """Base: `status` is what the client gets when no response head has gone out yet."""

    status = 500
    side: Side = "internal"
    retryable = False
    condition = "error"  # which retry_on condition (nginx proxy_next_upstream) this failure is
    fields = b""  # extra header lines for laneproxy's own answer (Retry-After, Allow)

    def __init__(self, reason: str, status: int | None = None, *, retryable: bool | None = None):
        super().__init__(reason)
        self.reason = reason
        if status is not None:
            self.status = status
        if retryable is not None:
            self.retryable = retryable


class BadRequest(ProxyError):
    """The client sent something laneproxy will not forward (answered, then the connection closes)."""

    status = 400
    side = "downstream"


class NoRoute(ProxyError):
    status = 404
    side = "downstream"


class BodyTooLarge(ProxyError):
    status = 413
    side = "downstream"


class ConnectFailed(ProxyError):
    """Nothing was sent: safe to retry on any method."""

    status = 502
    side = "upstream"
    retryable = True


class UpstreamTimeout(ProxyError):
    status = 504
    side = "upstream"
    condition = "timeout"


class UpstreamProtocolError(ProxyError):
    """The upstream broke the exchange (bad bytes, reset, EOF before the response was complete)."""

    status = 502
    side = "upstream"


class UpstreamStatus(ProxyError):
    """An upstream answer whose status is a retry_on condition (http_502 ...), retried unsent."""

    side = "upstream"

    def __init__(self, status: int) -> None:
        super().__init__(f"upstream answered {status}", 502)
        self.condition = f"http_{status}"


class LaneBusy(ProxyError):
    """The lane is at its limit with a full queue, or the wait passed queue_timeout / CoDel shed it.

    The client connection stays open; `retry_after` (whole seconds >= 1) goes out as Retry-After.
    """

    status = 503
    side = "internal"

    def __init__(self, lane: str, why: str, retry_after: int) -> None:
        super().__init__(f"lane {lane} is busy ({why}); retry after {retry_after}s")
        self.retry_after = retry_after
        self.fields = b"Retry-After: %d\r\n" % retry_after


class Stopping(RuntimeError):
    """A reload asked for while the proxy stops (nginx and HAProxy ignore it then too)."""
