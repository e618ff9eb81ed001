"""Router: longest path-prefix match, built once into a table (nginx prefix `location`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from laneproxy.lane import Lane
    from laneproxy.static import StaticFiles


def vars_of(static: StaticFiles) -> tuple[object, ...]:
    return (static.root, static.index, static.follow_symlinks, static.serve_hidden, static.expires, static.gzip_static)


@dataclass(frozen=True, slots=True)
class Route:
    prefix: bytes
    lane: Lane
    strip_prefix: bool = False
    static: StaticFiles | None = None  # try_files: files under root are served before the lane
    priority: int = 1  # queue class in the lane: 0 high, 1 normal, 2 low
    # Responses by status class (index status // 100), plain integers read at scrape time.
    responses: list[int] = field(default_factory=lambda: [0] * 6)

    def same_as(self, other: Route) -> bool:
        """Same behaviour (a reload keeps the route, and its counters, when nothing changed)."""
        return (self.prefix, self.lane, self.strip_prefix, self.priority) == (
            other.prefix, other.lane, other.strip_prefix, other.priority
        ) and (self.static is None) == (other.static is None) and (
            self.static is None or vars_of(self.static) == vars_of(other.static)  # type: ignore[arg-type]
        )

    def upstream_path(self, path: bytes) -> bytes:
        """The path the upstream sees: unchanged, or with the prefix replaced by '/'."""
        if not self.strip_prefix:
            return path
        rest = path[len(self.prefix) :]
        return rest if rest[:1] == b"/" else b"/" + rest


class Router:
    """`match(path)` checks the table from the longest prefix length to the shortest."""

    __slots__ = ("_table", "_lengths")

    def __init__(self, routes: list[Route]) -> None:
        self._table = {r.prefix: r for r in routes}
        self._lengths = sorted({len(p) for p in self._table}, reverse=True)

    def routes(self) -> dict[bytes, Route]:
        return dict(self._table)

    def match(self, path: bytes) -> Route | None:
        table = self._table
        n = len(path)
        for length in self._lengths:
            if length <= n:
                route = table.get(path[:length])
                if route is not None:
                    return route
        return None

    def __repr__(self) -> str:
        return f"<Router {[p.decode() for p in sorted(self._table, key=len, reverse=True)]}>"
