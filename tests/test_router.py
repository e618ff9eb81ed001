"""Router: longest plain-string prefix wins (nginx prefix `location`), strip_prefix mapping."""

from __future__ import annotations

import pytest

from laneproxy.router import Route, Router

# The router treats a lane as an opaque value: plain strings name the lane each route leads to.
ROOT, API, API_V2, TAST, TAST_SLASH = "root", "api", "api-v2", "tast", "tast/"


def make_router(*prefixes_and_lanes: tuple[bytes, str]) -> Router:
    return Router([Route(prefix=p, lane=lane) for p, lane in prefixes_and_lanes])  # type: ignore[arg-type]


def lane_of(router: Router, path: bytes) -> str | None:
    route = router.match(path)
    return None if route is None else route.lane  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("path", "lane"),
    [
        (b"/", ROOT),
        (b"/other", ROOT),
        (b"/api", ROOT),  # `/api/` is not a prefix of `/api`
        (b"/api/", API),
        (b"/api/users", API),
        (b"/api/v2", API),  # `/api/v2/` is not a prefix of `/api/v2`
        (b"/api/v2/", API_V2),
        (b"/api/v2/items?x=1", API_V2),
        (b"/api/v22/", API),
    ],
)
def test_longest_prefix_wins(path: bytes, lane: str) -> None:
    # Listed shortest first so that the order of the list cannot be what makes the longest win.
    router = make_router((b"/", ROOT), (b"/api/", API), (b"/api/v2/", API_V2))
    assert lane_of(router, path) == lane


def test_longest_prefix_wins_whatever_the_config_order() -> None:
    a = make_router((b"/api/v2/", API_V2), (b"/", ROOT), (b"/api/", API))
    b = make_router((b"/", ROOT), (b"/api/", API), (b"/api/v2/", API_V2))
    for path in (b"/", b"/api/x", b"/api/v2/x", b"/zzz"):
        assert lane_of(a, path) == lane_of(b, path)
    assert lane_of(a, b"/api/v2/x") == API_V2


@pytest.mark.parametrize(
    ("path", "lane"),
    [
        (b"/tast", TAST),
        (b"/tastx", TAST),  # a plain string prefix: no segment boundary (nginx `location /tast`)
        (b"/tast/", TAST_SLASH),
        (b"/tast/y", TAST_SLASH),
        (b"/tas", None),
        (b"/TAST", None),  # case-sensitive, as nginx on Linux
    ],
)
def test_plain_string_prefix_semantics(path: bytes, lane: str | None) -> None:
    router = make_router((b"/tast", TAST), (b"/tast/", TAST_SLASH))
    assert lane_of(router, path) == lane


def test_slash_prefix_does_not_match_the_bare_name() -> None:
    router = make_router((b"/tast/", TAST_SLASH))
    assert router.match(b"/tast") is None
    assert lane_of(router, b"/tast/") == TAST_SLASH


@pytest.mark.parametrize("path", [b"/", b"/x", b"/ap", b"/apx/", b""])
def test_no_match_is_none(path: bytes) -> None:
    router = make_router((b"/api", API), (b"/static/", ROOT))
    assert router.match(path) is None


def test_empty_router_matches_nothing() -> None:
    assert Router([]).match(b"/") is None


@pytest.mark.parametrize(
    ("prefix", "path", "expected"),
    [
        (b"/api/", b"/api/x", b"/x"),
        (b"/api/", b"/api/", b"/"),
        (b"/api/", b"/api/x/y", b"/x/y"),
        (b"/api", b"/api/x", b"/x"),
        (b"/api", b"/api", b"/"),
        (b"/api", b"/api/", b"/"),
        (b"/api", b"/apix", b"/x"),  # the matched string is replaced by '/' (nginx proxy_pass .../)
        (b"/", b"/x", b"/x"),
        (b"/", b"/", b"/"),
    ],
)
def test_strip_prefix_mapping(prefix: bytes, path: bytes, expected: bytes) -> None:
    route = Route(prefix=prefix, lane=API, strip_prefix=True)  # type: ignore[arg-type]
    assert route.upstream_path(path) == expected


def test_without_strip_prefix_the_path_is_unchanged() -> None:
    route = Route(prefix=b"/api/", lane=API)  # type: ignore[arg-type]
    assert route.upstream_path(b"/api/x") == b"/api/x"


def test_strip_prefix_through_match() -> None:
    router = Router([Route(prefix=b"/api/", lane=API, strip_prefix=True)])  # type: ignore[arg-type]
    route = router.match(b"/api/users/7")
    assert route is not None
    assert route.upstream_path(b"/api/users/7") == b"/users/7"


def test_table_is_built_once() -> None:
    routes = [Route(prefix=b"/", lane=ROOT), Route(prefix=b"/api/v2/", lane=API_V2), Route(prefix=b"/api/", lane=API)]
    router = Router(routes)  # type: ignore[arg-type]
    assert repr(router) == "<Router ['/api/v2/', '/api/', '/']>"
    # The router copied what it needs: changing the list afterwards changes nothing.
    routes.clear()
    routes.append(Route(prefix=b"/zzz", lane=API))  # type: ignore[arg-type]
    assert lane_of(router, b"/api/v2/x") == API_V2
    assert lane_of(router, b"/zzz") == ROOT  # only '/' matches it
    assert repr(router) == "<Router ['/api/v2/', '/api/', '/']>"


def test_route_is_frozen() -> None:
    route = Route(prefix=b"/api/", lane=API)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        route.prefix = b"/x"  # type: ignore[misc]
