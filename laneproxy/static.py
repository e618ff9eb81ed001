"""Static files for routes with `try_files: true` (placeholder: every lookup falls through)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol


class ResponseWriter(Protocol):
    """What the downstream connection offers a local responder."""

    transport: object
    http11: bool
    is_closed: bool

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


class StaticFiles:
    """Files under one root, served before the route's lane (nginx `try_files $uri @app`)."""

    def __init__(
        self, root: Path, *, index: str | None = None, follow_symlinks: bool = False,
        serve_hidden: bool = False, expires: float | None = None, gzip_static: bool = False,
    ) -> None:
        self.root = root
        self.index = index
        self.follow_symlinks = follow_symlinks
        self.serve_hidden = serve_hidden
        self.expires = expires
        self.gzip_static = gzip_static

    def find(self, path: bytes) -> Path | None:
        """The file to serve for this URL path, or None to fall through to the lane."""
        return None

    async def respond(
        self, out: ResponseWriter, file: Path, method: bytes, fields: Mapping[bytes, bytes], keep_alive: bool
    ) -> int:
        """Write the whole response for `file`; return its status."""
        raise NotImplementedError
