"""Access log: one line per exchange, buffered and flushed on a timer, reopened on SIGUSR1.

Lines are built from the exchange's own fields at its end; nothing is formatted while the
log is off. Writes go out in batches (at most every second, or at 64 KiB), like nginx's
`access_log ... buffer=64k flush=1s`: a write to the page cache is a few microseconds, so the
event loop is not held up, and nothing is lost on stop (`close` flushes).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

    from laneproxy.exchange import Exchange

FLUSH_BYTES = 64 * 1024
_COMBINED = (
    b'%s - - [%s] "%s %s %s" %d %d "%s" "%s" rt=%.3f lane=%s route=%s up=%s uct=%s uht=%s urt=%.3f qw=%.3f '
    b"retries=%d\n"
)
FLUSH_SECONDS = 1.0

# Client bytes in the combined format are escaped as nginx does: `"`, `\` and every byte outside
# printable ASCII become \xHH, so a value can neither end its quoted field nor forge a line.
_UNSAFE = re.compile(rb'[^\x20\x21\x23-\x5b\x5d-\x7e]')


def _hex(m: re.Match[bytes]) -> bytes:
    return b"\\x%02X" % m.group()[0]


def escape(value: bytes) -> bytes:
    return _UNSAFE.sub(_hex, value) if _UNSAFE.search(value) else value


def text(value: bytes) -> str:
    """A client value for the JSON log: UTF-8 as sent, other bytes as \\xHH (never mojibake)."""
    return value.decode("utf-8", "backslashreplace")


def raw_fields_of(ex: Exchange, *names: bytes) -> list[bytes | None]:
    """Values of request fields by lower-case name (first of each), as sent."""
    found: list[bytes | None] = [None] * len(names)
    for line in ex.fields:
        name, _, value = line[:-2].partition(b": ")
        name = name.lower()
        if name in names:
            i = names.index(name)
            if found[i] is None:
                found[i] = value
    return found


def fields_of(ex: Exchange, *names: bytes) -> list[str | None]:
    """Values of request fields by lower-case name (first of each), as text."""
    return [None if v is None else text(v) for v in raw_fields_of(ex, *names)]


def _escaped(value: bytes | None) -> str:
    return "-" if not value else escape(value).decode("ascii")


def _ms(seconds: float) -> str:
    return f"{seconds:.3f}"


class AccessLog:
    """`log(exchange)` appends a line; `flush`, `reopen` and `close` do the I/O."""

    def __init__(self, target: str, fmt: str, base_dir: Path, loop: asyncio.AbstractEventLoop) -> None:
        self.target = target
        self.path = None if target == "-" else (base_dir / target)
        self.json = fmt == "json"
        self.loop = loop
        self.fd = -1
        self.buf: list[bytes] = []
        self.size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._sec = -1
        self._stamp = ""
        self._stamp_b = b""
        self._stamp_next = 0.0  # loop time at which the current second's stamp expires
        self.lines = 0
        self.open()

    def open(self) -> None:
        if self.path is None:
            self.fd = 1
        else:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def reopen(self) -> None:
        """After logrotate moved the file: flush to the old one, continue in a new one."""
        self.flush()
        if self.path is not None:
            old = self.fd
            self.open()
            os.close(old)

    def close(self) -> None:
        self.flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.path is not None and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def flush(self) -> None:
        self._timer = None
        if not self.buf or self.fd < 0:
            return
        data = b"".join(self.buf)
        self.buf.clear()
        self.size = 0
        while data:
            written = os.write(self.fd, data)
            data = data[written:]

    def _now(self) -> str:
        sec = int(time.time())
        if sec != self._sec:  # strftime once per second, not per line
            self._sec = sec
            self._stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(sec))
            self._stamp_b = self._stamp.encode()
        return self._stamp

    def log(self, ex: Exchange, end: float) -> None:
        if self.json:
            line = self._json(ex, end).encode("utf-8", "backslashreplace")
        elif ex.local is None and ex.started and ex.server is not None and ex.target:
            line = self._combined_proxied(ex, end)
        else:
            line = self._combined(ex, end).encode("utf-8", "backslashreplace")
        self.buf.append(line)
        self.size += len(line)
        self.lines += 1
        if self.size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = self.loop.call_later(FLUSH_SECONDS, self.flush)

    # -- formats ----------------------------------------------------------------------------------

    @staticmethod
    def fields(ex: Exchange, end: float) -> dict[str, object]:
        started = ex.started or end
        up = ex.server is not None and ex.started
        fields = fields_of(ex, b"referer", b"user-agent")
        return {
            "client": ex.down.peer_ip.decode(),
            "method": ex.method.decode("latin-1"),
            "target": text(ex.target) if ex.target else "-",
            "protocol": ex.protocol.decode("latin-1") if ex.protocol else "HTTP/1.1" if ex.http11 else "HTTP/1.0",
            "status": ex.status or 499,
            "bytes": ex.bytes_out,
            "time": round(end - ex.t0, 6),
            "lane": ex.lane.name if ex.lane else None,
            "route": ex.route.prefix.decode() if ex.route else None,
            "upstream": ex.server.name if ex.server else None,
            "upstream_connect_time": round(ex.t_conn - started, 6) if up and ex.t_conn else None,
            "upstream_header_time": round(ex.t_head - started, 6) if up and ex.t_head else None,
            "upstream_response_time": round(end - started, 6) if up else None,
            "queue_wait": round(started - ex.t0, 6) if ex.started else None,
            "retries": max(ex.tries - 1, 0),
            "reason": ex.local.reason if ex.local is not None else None,
            "referer": fields[0],
            "user_agent": fields[1],
        }

    def _json(self, ex: Exchange, end: float) -> str:
        record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **self.fields(ex, end)}
        return json.dumps(record, separators=(",", ":")) + "\n"

    def _combined(self, ex: Exchange, end: float) -> str:
        f = self.fields(ex, end)

        def opt(value: object) -> str:
            return "-" if value is None else (_ms(value) if isinstance(value, float) else str(value))

        reason = f["reason"]
        if reason:
            reason = escape(str(reason).encode("utf-8", "backslashreplace")).decode("ascii")
        referer, user_agent = raw_fields_of(ex, b"referer", b"user-agent")
        # nginx's $request is "-" when no request line was read
        request = "-" if ex.method == b"-" else f'{_escaped(ex.method)} {_escaped(ex.target)} {f["protocol"]}'
        return (
            f'{f["client"]} - - [{self._now()}] "{request}" {f["status"]} '
            f'{f["bytes"]} "{_escaped(referer)}" "{_escaped(user_agent)}" rt={_ms(f["time"])} '  # type: ignore[arg-type]
            f'lane={opt(f["lane"])} route={opt(f["route"])} up={opt(f["upstream"])} '
            f'uct={opt(f["upstream_connect_time"])} uht={opt(f["upstream_header_time"])} '
            f'urt={opt(f["upstream_response_time"])} qw={opt(f["queue_wait"])} retries={f["retries"]}'
            + (f' reason="{reason}"' if reason else "")
            + "\n"
        )

    def _combined_proxied(self, ex: Exchange, end: float) -> bytes:
        """The common line (a proxied exchange), formatted as bytes in one step: the log stays cheap."""
        referer = user_agent = b"-"
        for line in ex.fields:  # the request's forwarded fields, "Name: value\r\n"
            first = line[0] | 0x20  # lower-case ASCII letter
            if first == 0x72 and line[:8].lower() == b"referer:":  # r
                referer = line[9:-2]
            elif first == 0x75 and line[:11].lower() == b"user-agent:":  # u
                user_agent = line[12:-2]
        started = ex.started
        down = ex.down
        target = ex.target
        if _UNSAFE.search(b"".join((target, referer, user_agent))):  # one search for the usual case
            target, referer, user_agent = escape(target), escape(referer), escape(user_agent)
        return _COMBINED % (
            down.peer_ip, self._now_b(end), ex.method, target, b"HTTP/1.1" if ex.http11 else b"HTTP/1.0",
            ex.status or 499, ex.bytes_out, referer, user_agent, end - ex.t0,
            ex.lane.name_b, ex.route.prefix,  # type: ignore[union-attr]
            ex.server.name_b,  # type: ignore[union-attr]
            b"%.3f" % (ex.t_conn - started) if ex.t_conn else b"-",
            b"%.3f" % (ex.t_head - started) if ex.t_head else b"-",
            end - started, started - ex.t0, max(ex.tries - 1, 0),
        )

    def _now_b(self, loop_now: float) -> bytes:
        """The stamp for this second; the wall clock is read only when a new second starts."""
        if loop_now >= self._stamp_next:
            wall = time.time()
            self._now()
            self._stamp_next = loop_now + (1.0 - wall % 1.0)
        return self._stamp_b
