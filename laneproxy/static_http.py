"""HTTP semantics for static files as pure functions: validators, conditionals, ranges, codings.

Nothing here touches the disk or the network, so every rule is unit-tested on its own
(RFC 9110 §8.8 validators, §13 conditional requests, §14 ranges, §12.5.3 Accept-Encoding).
"""

from __future__ import annotations

import calendar
import mimetypes
import re
import time
from collections.abc import Mapping
from email.utils import formatdate
from functools import lru_cache

# Common web types, independent of the host's /etc/mime.types; mimetypes fills in the rest.
_UTF8 = "; charset=utf-8"
TYPES: dict[str, str] = {
    ".html": "text/html" + _UTF8, ".htm": "text/html" + _UTF8, ".css": "text/css" + _UTF8,
    ".js": "text/javascript" + _UTF8, ".mjs": "text/javascript" + _UTF8, ".cjs": "text/javascript" + _UTF8,
    ".json": "application/json", ".map": "application/json", ".webmanifest": "application/manifest+json",
    ".txt": "text/plain" + _UTF8, ".md": "text/markdown" + _UTF8, ".csv": "text/csv" + _UTF8,
    ".xml": "application/xml", ".svg": "image/svg+xml", ".ico": "image/x-icon",
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
    ".webp": "image/webp", ".avif": "image/avif", ".wasm": "application/wasm",
    ".woff": "font/woff", ".woff2": "font/woff2", ".ttf": "font/ttf", ".otf": "font/otf",
    ".pdf": "application/pdf", ".zip": "application/zip", ".gz": "application/gzip",
    ".mp4": "video/mp4", ".webm": "video/webm", ".mp3": "audio/mpeg", ".ogg": "audio/ogg",
}
DEFAULT_TYPE = b"application/octet-stream"

# Precompressed siblings (gzip_static), in order of preference at equal q.
CODINGS: tuple[tuple[bytes, bytes], ...] = ((b"br", b".br"), (b"gzip", b".gz"))

NOT_MODIFIED, PRECONDITION_FAILED, UNSATISFIABLE = 304, 412, 416


def content_type(name: str) -> bytes:
    dot = name.rfind(".")
    return _type_for(name[dot:].lower() if dot > 0 else "")


@lru_cache(maxsize=256)
def _type_for(ext: str) -> bytes:
    known = TYPES.get(ext)
    if known is not None:
        return known.encode()
    guessed, encoding = mimetypes.guess_type("f" + ext, strict=False) if ext else (None, None)
    if guessed is None or encoding is not None:
        return DEFAULT_TYPE
    if guessed.startswith("text/"):
        guessed += _UTF8
    return guessed.encode()


def make_etag(size: int, mtime_ns: int) -> bytes:
    return b'W/"%x-%x"' % (size, mtime_ns)


@lru_cache(maxsize=1024)
def http_date(ts: int) -> bytes:
    return formatdate(ts, usegmt=True).encode()


_MONTHS = {m.encode(): i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_MONTH = rb"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = rb"([0-9]{2}):([0-9]{2}):([0-9]{2})"
# RFC 9110 §5.6.7, case-sensitive and GMT only: IMF-fixdate, then the obsolete RFC 850 and asctime.
_DAY = rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_IMF_FIXDATE = re.compile(_DAY + rb", ([0-9]{2}) " + _MONTH + rb" ([0-9]{4}) " + _TIME + rb" GMT")
_RFC850 = re.compile(
    rb"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), ([0-9]{2})-" + _MONTH + rb"-([0-9]{2}) "
    + _TIME + rb" GMT"
)
_ASCTIME = re.compile(_DAY + rb" " + _MONTH + rb" ([0-9 ][0-9]) " + _TIME + rb" ([0-9]{4})")


def parse_http_date(value: bytes | None) -> int | None:
    """An HTTP-date (IMF-fixdate, RFC 850 or asctime) → Unix seconds; None for anything else,
    which a precondition then ignores (RFC 9110 §13.1.3: other zones, lists, trailing text)."""
    if not value:
        return None
    value = value.strip(b" \t")
    if m := _IMF_FIXDATE.fullmatch(value):
        day, month, year, hh, mm, ss = int(m[1]), _MONTHS[m[2]], int(m[3]), m[4], m[5], m[6]
    elif m := _RFC850.fullmatch(value):
        day, month, year, hh, mm, ss = int(m[1]), _MONTHS[m[2]], int(m[3]), m[4], m[5], m[6]
        # A two-digit year more than 50 years ahead is the latest past year with those digits.
        this_year = time.gmtime().tm_year
        year += this_year - this_year % 100
        if year > this_year + 50:
            year -= 100
    elif m := _ASCTIME.fullmatch(value):
        month, day, hh, mm, ss, year = _MONTHS[m[1]], int(m[2].strip() or b"0"), m[3], m[4], m[5], int(m[6])
    else:
        return None
    hour, minute, second = int(hh), int(mm), int(ss)
    if not (year and 1 <= day <= calendar.monthrange(year, month)[1] and hour < 24 and minute < 60 and second <= 60):
        return None
    return calendar.timegm((year, month, day, hour, minute, second, 0, 1, 0))


class DateCache:
    """The `Date` value, formatted once per second."""

    __slots__ = ("second", "value")

    def __init__(self) -> None:
        self.second = -1
        self.value = b""

    def now(self) -> tuple[float, bytes]:
        now = time.time()
        second = int(now)
        if second != self.second:
            self.second = second
            self.value = formatdate(second, usegmt=True).encode()
        return now, self.value


def _tags(value: bytes) -> list[bytes]:
    return [t for t in (p.strip() for p in value.split(b",")) if t]


def _opaque(tag: bytes) -> bytes:
    return tag[2:] if tag[:2] == b"W/" else tag


def match_weak(header: bytes, etag: bytes) -> bool:
    """If-None-Match: `*`, or any listed tag equal to ours ignoring W/ (weak comparison)."""
    if header.strip() == b"*":
        return True
    ours = _opaque(etag)
    return any(_opaque(t) == ours for t in _tags(header))


def match_strong(header: bytes, etag: bytes) -> bool:
    """If-Match: `*`, or a listed strong tag equal to ours (a weak tag never matches)."""
    if header.strip() == b"*":
        return True
    if etag[:2] == b"W/":
        return False
    return any(t == etag for t in _tags(header))


def _num(digits: bytes) -> int | None:
    if not digits or not digits.isdigit():
        return None
    return int(digits) if len(digits) <= 18 else 10**18


def parse_range(value: bytes, size: int) -> tuple[int, int] | int | None:
    """A `Range` value → (first, last) inclusive, UNSATISFIABLE, or None to send the whole file.

    Only one range is served; several ranges, other units and bad syntax get the whole file
    (RFC 9110 §14.2 lets a server ignore Range).
    """
    unit, eq, spec = value.partition(b"=")
    if not eq or unit.strip().lower() != b"bytes":
        return None
    specs = [s for s in (p.strip() for p in spec.split(b",")) if s]
    if len(specs) != 1:
        return None
    first, dash, last = specs[0].partition(b"-")
    if not dash:
        return None
    first, last = first.strip(), last.strip()
    if not first:  # suffix: the last n bytes
        n = _num(last)
        if n is None:
            return None
        if n == 0:
            return UNSATISFIABLE
        if size == 0:  # a suffix of an empty file is satisfiable, by the whole of it (RFC 9110 §14.1.1)
            return None
        return (max(0, size - n), size - 1)
    start = _num(first)
    if start is None:
        return None
    end = size - 1
    if last:
        end_given = _num(last)
        if end_given is None or end_given < start:
            return None
        end = min(end_given, size - 1)
    if start >= size:
        return UNSATISFIABLE
    return (start, end)


def if_range_ok(value: bytes, etag: bytes, mtime: int | None) -> bool:
    """If-Range: the validator equals ours exactly (tag as sent, like nginx; or the same date).
    Validators compare strongly (RFC 9110 §13.1.5): a weak tag, or a date too recent to be
    strong (mtime None), never matches."""
    value = value.strip()
    if value[-1:] == b'"':
        return value == etag and not etag.startswith(b"W/")
    return mtime is not None and parse_http_date(value) == mtime


def evaluate(method: bytes, fields: Mapping[bytes, bytes], size: int, mtime: int, etag: bytes, *,
             strong_date: bool = True) -> tuple[int, tuple[int, int] | None]:
    """RFC 9110 §13.2.2 order → (status, byte range or None). mtime: whole Unix seconds;
    strong_date: False for a modification time in the future (§8.8.2.2): If-Range never matches it."""
    if_match = fields.get(b"if-match")
    if if_match is not None:
        if not match_strong(if_match, etag):
            return PRECONDITION_FAILED, None
    else:
        ius = parse_http_date(fields.get(b"if-unmodified-since"))
        if ius is not None and mtime > ius:
            return PRECONDITION_FAILED, None
    inm = fields.get(b"if-none-match")
    if inm is not None:
        if match_weak(inm, etag):
            return NOT_MODIFIED, None
    else:
        ims = parse_http_date(fields.get(b"if-modified-since"))
        if ims is not None and mtime <= ims:
            return NOT_MODIFIED, None
    rng = fields.get(b"range")
    if rng is None or method != b"GET":  # RFC 9110 §14.2: range handling is defined for GET
        return 200, None
    if_range = fields.get(b"if-range")
    if if_range is not None and not if_range_ok(if_range, etag, mtime if strong_date else None):
        return 200, None
    parsed = parse_range(rng, size)
    if parsed is None:
        return 200, None
    if parsed == UNSATISFIABLE:
        return UNSATISFIABLE, None
    return 206, parsed  # type: ignore[return-value]


def accepted_codings(value: bytes | None) -> list[tuple[bytes, bytes]]:
    """The precompressed codings Accept-Encoding allows (q > 0), best first; br before gzip on ties."""
    if not value:
        return []
    q: dict[bytes, float] = {}
    for item in value.split(b","):
        name, _, params = item.partition(b";")
        name = name.strip().lower()
        if not name:
            continue
        weight = 1.0
        for param in params.split(b";"):
            key, _, val = param.partition(b"=")
            if key.strip().lower() == b"q":
                try:
                    weight = float(val.strip())
                except ValueError:
                    weight = 0.0
        q[b"gzip" if name == b"x-gzip" else name] = weight
    star = q.get(b"*", 0.0)
    ranked = [(q.get(coding, star), -i, coding, suffix) for i, (coding, suffix) in enumerate(CODINGS)]
    return [(coding, suffix) for weight, _, coding, suffix in sorted(ranked, reverse=True) if weight > 0]
