"""Static files for routes with `try_files: true`: files under root first, then the lane.

`find` runs on the event loop for every GET/HEAD on such a route, so it is bounded: one lstat
per path segment on hot dentries (a realpath only when a segment is a symlink) plus an access
check, behind a cache with a one-second TTL, so a repeated miss costs the proxied request one
dict lookup. It is safe by construction: each URL segment is percent-decoded once and refused
when it decodes to '.', '..', or contains '/', '\\' or NUL; names starting with '.' are hidden;
segments are joined under root, never resolved against it, and unless `follow_symlinks` is set
every symlink on the way must resolve inside root. A directory is served only as its `index`,
and only for a URI ending in '/' (nginx's `index`); `/dir` without the slash goes to the lane.

`respond` opens the file (O_NONBLOCK, so a FIFO swapped in cannot block), re-checks with fstat
that it is a regular file and, via /proc/self/fd, that what was opened lies under root (a
symlink swapped in after `find` is refused with 404, never followed). Bodies up to 64 KiB leave
in one write with the head. Larger ones go out with `loop.sendfile` when the loop implements it
(stdlib asyncio), else (uvloop has no loop.sendfile: NotImplementedError) with `os.sendfile`
straight to the socket while uvloop's write buffer is empty; when the socket is full, or on
other transports, in 256 KiB chunks with `drain()` between them. Reads use RWF_NOWAIT on the
loop when the page cache has the bytes, else a thread; the only disk wait left on the loop is
one os.sendfile call of at most 512 KiB, as with nginx's sendfile.

Precompressed siblings (`gzip_static`) are representations of their own (own ETag and
Last-Modified); a Range applies to the representation selected (RFC 9110 §14), as in nginx.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote_to_bytes

from laneproxy.http1 import STATUS_LINE
from laneproxy.static_http import (
    CODINGS,
    NOT_MODIFIED,
    PRECONDITION_FAILED,
    UNSATISFIABLE,
    DateCache,
    accepted_codings,
    content_type,
    evaluate,
    http_date,
    make_etag,
)

CACHE_TTL = 1.0  # seconds a lookup (hit or miss) is reused
CACHE_MAX = 4096  # entries; the cache is emptied when full
CHUNK = 256 * 1024  # read-and-write fallback
SENDFILE_MAX = 512 * 1024  # longest single os.sendfile call made on the loop
INLINE_MAX = 64 * 1024  # bodies up to this size leave in the same write as the head
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_SENDFILE_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.ENOTSOCK, errno.EOPNOTSUPP)


class ResponseWriter(Protocol):
    """What the downstream connection offers a local responder."""

    transport: object
    http11: bool
    is_closed: bool

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


class NotServable(OSError):
    """The file found by `find` is gone, not regular, or now outside root."""


def split_path(path: bytes, serve_hidden: bool = False) -> list[bytes] | None:
    """URL path → decoded segments, or None when the path may not name a file under root."""
    if path[:1] != b"/" or b"\x00" in path or b"\\" in path:
        return None
    segments = []
    for raw in path.split(b"/"):
        if not raw:
            continue  # '//' collapses, as in nginx (merge_slashes)
        seg = unquote_to_bytes(raw) if b"%" in raw else raw
        if seg == b"." or seg == b".." or b"/" in seg or b"\x00" in seg or b"\\" in seg:
            return None
        if seg[:1] == b"." and not serve_hidden:
            return None
        segments.append(seg)
    return segments


class StaticFiles:
    """Files under one root, served before the route's lane (nginx `try_files $uri @app`)."""

    def __init__(
        self, root: Path, *, index: str | None = None, follow_symlinks: bool = False,
        serve_hidden: bool = False, expires: float | None = None, gzip_static: bool = False,
        cache_ttl: float | None = None,
    ) -> None:
        self.root = root
        self.index = index
        self.follow_symlinks = follow_symlinks
        self.serve_hidden = serve_hidden
        self.expires = expires
        self.gzip_static = gzip_static
        self.cache_ttl = CACHE_TTL if cache_ttl is None else cache_ttl
        real = os.path.realpath(os.fsencode(root))
        self._root = real.rstrip(b"/")  # b"" for "/"
        self._inside = self._root + b"/"
        self._index = os.fsencode(index) if index else None
        self._cache: dict[bytes, tuple[float, Path | None]] = {}
        self._dates = DateCache()
        self._max_age = None if expires is None else max(0, int(expires))

    # -- lookup (on the loop, bounded) ---------------------------------------------------------

    def find(self, path: bytes) -> Path | None:
        """The file to serve for this URL path, or None to fall through to the lane."""
        now = time.monotonic()
        cached = self._cache.get(path)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            found = self._lookup(path)
        except (OSError, ValueError):
            found = None
        if self.cache_ttl > 0:
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            self._cache[path] = (now + self.cache_ttl, found)
        return found

    def _lookup(self, path: bytes) -> Path | None:
        if path[:1] == b"/" and b"%" not in path and b"/." not in path and b"\\" not in path and b"\0" not in path:
            rel = path.strip(b"/")  # nothing to decode, no dot segment, nothing hidden
        else:
            segments = split_path(path, self.serve_hidden)
            if segments is None:
                return None
            rel = b"/".join(segments)
        st = self._stat(rel)
        if path[-1:] == b"/" and not stat.S_ISDIR(st.st_mode):
            return None  # '/a.txt/' names a directory that is not there
        if stat.S_ISDIR(st.st_mode):
            index = self._index
            if index is None or not path.endswith(b"/") or (index[:1] == b"." and not self.serve_hidden):
                return None  # nginx's index applies to URIs ending in '/'
            rel = rel + b"/" + index if rel else index
            st = self._stat(rel)
        if not stat.S_ISREG(st.st_mode):
            return None
        target = self._inside + rel
        if not os.access(target, os.R_OK):
            return None
        return Path(os.fsdecode(target))

    def _stat(self, rel: bytes) -> os.stat_result:
        """stat root/rel; unless follow_symlinks, OSError when a symlink on the way leads out of root."""
        if self.follow_symlinks or not rel:
            return os.stat(self._inside + rel)
        current = self._root
        for segment in rel.split(b"/"):
            if not segment:
                continue
            current += b"/" + segment
            st = os.lstat(current)
            if stat.S_ISLNK(st.st_mode):  # rare: resolve the whole path once
                target = self._inside + rel
                if not os.path.realpath(target).startswith(self._inside):
                    raise NotServable(errno.EACCES, "symlink leads outside root")
                return os.stat(target)
        return st  # type: ignore[possibly-undefined]

    # -- opening (TOCTOU-safe) -----------------------------------------------------------------

    def _open_regular(self, path: bytes) -> tuple[int, os.stat_result]:
        fd = os.open(path, _OPEN_FLAGS)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotServable(errno.EISDIR, "not a regular file")
            if not self.follow_symlinks and not self._opened_inside(fd, path, st):
                raise NotServable(errno.EACCES, "outside root")
            return fd, st
        except BaseException:
            os.close(fd)
            raise

    def _opened_inside(self, fd: int, path: bytes, st: os.stat_result) -> bool:
        try:
            real = os.readlink(b"/proc/self/fd/%d" % fd)
        except OSError:  # no /proc: resolve the name and check it is the same inode
            real = os.path.realpath(path)
            try:
                again = os.stat(real)
            except OSError:
                return False
            if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
                return False
        return real.startswith(self._inside)

    def _open(self, file: Path, fields: Mapping[bytes, bytes]) -> tuple[int, os.stat_result, bytes | None, bool]:
        """(fd, fstat, Content-Encoding or None, Vary needed) for the representation to send."""
        path = os.fsencode(file)
        if not self.gzip_static:
            return (*self._open_regular(path), None, False)
        accepted = accepted_codings(fields.get(b"accept-encoding"))
        for coding, suffix in accepted:
            try:
                return (*self._open_regular(path + suffix), coding, True)
            except OSError:
                continue
        fd, st = self._open_regular(path)
        tried = {coding for coding, _ in accepted}
        vary = any(coding not in tried and _is_file(path + suffix) for coding, suffix in CODINGS)
        return fd, st, None, vary

    # -- response ------------------------------------------------------------------------------

    async def respond(
        self, out: ResponseWriter, file: Path, method: bytes, fields: Mapping[bytes, bytes], keep_alive: bool
    ) -> int:
        """Write the whole response for `file`; return its status."""
        now, date = self._dates.now()
        conn = b"" if keep_alive else b"Connection: close\r\n"
        try:
            fd, st, coding, vary = self._open(file, fields)
        except OSError:
            self._cache.clear()  # the file changed under us: forget what find saw
            out.write(self._small(404, b"file not found", date, conn, method))
            return 404
        try:
            size = st.st_size
            # RFC 9110 §8.8.2.1: a modification time in the future is sent as Date, and is then no
            # strong validator for If-Range (§8.8.2.2); one of this second still is, as in nginx.
            mtime, now_s = int(st.st_mtime), int(now)
            strong = mtime <= now_s
            mtime = min(mtime, now_s)
            etag = make_etag(size, st.st_mtime_ns)
            status, rng = evaluate(method, fields, size, mtime, etag, strong_date=strong)
            varies = b"Vary: Accept-Encoding\r\n" if vary else b""  # on every answer (RFC 9110 §12.5.5)
            if status == PRECONDITION_FAILED:
                out.write(self._small(status, b"precondition failed", date, conn, method, varies))
                return status
            if status == UNSATISFIABLE:
                extra = b"Content-Range: bytes */%d\r\nAccept-Ranges: bytes\r\n%s" % (size, varies)
                out.write(self._small(status, b"range not satisfiable", date, conn, method, extra))
                return status
            head = [STATUS_LINE[status], b"Server: laneproxy\r\nDate: ", date]
            if status != NOT_MODIFIED:
                head += [b"\r\nContent-Type: ", content_type(file.name)]
            head += [b"\r\nLast-Modified: ", http_date(mtime), b"\r\nETag: ", etag, b"\r\n"]
            if coding is not None:
                head += [b"Content-Encoding: ", coding, b"\r\n"]
            if vary:
                head.append(b"Vary: Accept-Encoding\r\n")
            if self._max_age is not None:  # nginx `expires`: both fields
                age = self._max_age
                head.append(b"Cache-Control: max-age=%d\r\nExpires: %b\r\n" % (age, http_date(int(now) + age)))
            offset, count = 0, size
            if status == 206:
                offset, last = rng  # type: ignore[misc]
                count = last - offset + 1
                head.append(b"Content-Range: bytes %d-%d/%d\r\n" % (offset, last, size))
            if status != NOT_MODIFIED:
                head.append(b"Accept-Ranges: bytes\r\nContent-Length: %d\r\n" % count)
            head += [conn, b"\r\n"]
            if status == NOT_MODIFIED or method == b"HEAD" or count == 0:
                out.write(b"".join(head))
                return status
            if count <= INLINE_MAX:
                body = await _read(fd, count, offset)
                if len(body) != count:
                    raise OSError(errno.EIO, "file shrank while being served")
                head.append(body)
                out.write(b"".join(head))
                return status
            out.write(b"".join(head))
            await _send(out, fd, offset, count)
            return status
        finally:
            os.close(fd)

    def _small(self, status: int, reason: bytes, date: bytes, conn: bytes, method: bytes, extra: bytes = b"") -> bytes:
        body = b"%d %s: %s\n" % (status, STATUS_LINE[status][13:-2], reason)
        return b"".join([
            STATUS_LINE[status], b"Server: laneproxy\r\nDate: ", date,
            b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body),
            extra, conn, b"\r\n", b"" if method == b"HEAD" else body,
        ])


def _is_file(path: bytes) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < n:
        data = os.pread(fd, n - got, offset + got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def _read(fd: int, n: int, offset: int) -> bytes:
    """Up to n bytes at offset: from the page cache on the loop (RWF_NOWAIT), else in a thread."""
    global _NOWAIT
    if _NOWAIT:
        buf = bytearray(n)
        try:
            got = os.preadv(fd, [buf], offset, _NOWAIT)
        except BlockingIOError:
            got = 0
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            _NOWAIT = got = 0  # this kernel or file system has no RWF_NOWAIT reads
        if got == n:
            return buf  # type: ignore[return-value]  # bytes-like, never touched again
        if got:
            del buf[got:]
            buf += await asyncio.to_thread(_pread_all, fd, n - got, offset + got)
            return buf  # type: ignore[return-value]
    return await asyncio.to_thread(_pread_all, fd, n, offset)


def _socket_fd(transport: object) -> int | None:
    """The socket of a plain (not TLS) uvloop TCP transport, for os.sendfile; else None."""
    cls = type(transport)
    if cls.__name__ != "TCPTransport" or not cls.__module__.startswith("uvloop"):
        return None
    get = transport.get_extra_info  # type: ignore[attr-defined]
    if get("sslcontext") is not None or get("ssl_object") is not None:
        return None
    sock = get("socket")
    return sock.fileno() if sock is not None else None


async def _send(out: ResponseWriter, fd: int, offset: int, count: int) -> None:
    """Send count bytes of fd from offset after the head already written."""
    loop = asyncio.get_running_loop()
    transport = out.transport
    if type(loop).sendfile is not asyncio.AbstractEventLoop.sendfile:  # stdlib asyncio
        with open(fd, "rb", closefd=False) as file:
            try:
                await loop.sendfile(transport, file, offset, count, fallback=False)  # type: ignore[arg-type]
                return
            except (NotImplementedError, asyncio.SendfileNotAvailableError):
                pass
    sock = _socket_fd(transport)
    end = offset + count
    while offset < end:
        if out.is_closed or transport.is_closing():  # type: ignore[attr-defined]
            raise ConnectionResetError("client connection closed")
        if sock is not None and transport.get_write_buffer_size() == 0:  # type: ignore[attr-defined]
            want = min(end - offset, SENDFILE_MAX)
            try:
                sent = os.sendfile(sock, fd, offset, want)
            except BlockingIOError:
                sent = -1
            except OSError as exc:
                if exc.errno not in _SENDFILE_UNSUPPORTED:
                    raise
                sock, sent = None, -1
            if sent == 0:
                raise OSError(errno.EIO, "file shrank while being served")
            if sent > 0:
                offset += sent
                if sent == want:
                    await asyncio.sleep(0)  # let other connections run between big calls
                    continue
            if offset >= end:
                break
            # The socket is full: the transport buffers one chunk and tells us when it drained.
        data = await _read(fd, min(end - offset, CHUNK), offset)
        if not data:
            raise OSError(errno.EIO, "file shrank while being served")
        out.write(data)
        offset += len(data)
        await out.drain()
