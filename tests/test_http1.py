"""http1.py units: the request-target split, its fast path against the full checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from laneproxy.errors import BadRequest, BodyTooLarge
from laneproxy.http1 import ChunkLineGuard, _split_target_checked, split_target, strip_te_ows

# Plain characters, plus the ones that must leave the fast path (%, #, \, dots next to slashes).
TARGET_CHARS = "ab/?.%#\\-_~!$&'()*+,;=:@Z09"


def outcome(split, target: bytes) -> object:
    try:
        return split(target)
    except BadRequest as exc:
        return ("400", exc.reason)


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=TARGET_CHARS, max_size=24))
def test_fast_path_agrees_with_the_full_checks(tail: str) -> None:
    target = ("/" + tail).encode()
    assert outcome(split_target, target) == outcome(_split_target_checked, target)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/", (b"/", b"", None)),
        (b"/api/x?q=1&r=/./", (b"/api/x", b"?q=1&r=/./", None)),
        (b"/a:b@c;d=e,f", (b"/a:b@c;d=e,f", b"", None)),
        (b"http://h.example:8080/p?q", (b"/p", b"?q", b"h.example:8080")),
        # Equivalent spellings route (and go upstream) as nginx matches them: no lane bypass.
        (b"/t%61st/x", (b"/tast/x", b"", None)),
        (b"//tast//x?a//b", (b"/tast/x", b"?a//b", None)),
        (b"/%7euser/%41%2d%5f", (b"/~user/A-_", b"", None)),
        (b"/a%20b/%C3%A9", (b"/a%20b/%C3%A9", b"", None)),  # reserved and non-ASCII stay encoded
        (b"http://h.example//p", (b"/p", b"", b"h.example")),
    ],
)
def test_split(target: bytes, expected: tuple) -> None:
    assert split_target(target) == expected


@pytest.mark.parametrize(
    "target", [b"/a/../b", b"/a/./b", b"/a%2fb", b"/a\\b", b"/a#f", b"/a%zz", b"*x", b"/a%2e%2e/b", b"/a%00"],
)
def test_rejected(target: bytes) -> None:
    with pytest.raises(BadRequest):
        split_target(target)


# -- ChunkLineGuard: chunk-size lines of a chunked request body, followed from the raw bytes -------


def test_chunk_guard_refuses_long_extensions_after_leading_zeros() -> None:
    # llhttp takes leading zeros; the guard must read the whole size, not its first bytes.
    guard = ChunkLineGuard()
    assert guard.feed(b"0" * 30 + b"5\r\nhello\r\n")
    assert not guard.done
    assert not guard.feed(b"5;a=" + b"x" * 2000 + b"\r\nworld\r\n")


def test_chunk_guard_passes_extensions_up_to_the_limit_across_reads() -> None:
    guard = ChunkLineGuard()
    assert guard.feed(b"5;a=" + b"x" * 500)
    assert guard.feed(b"x" * 500 + b"\r\nhello\r\n0\r\n\r\n")
    assert guard.done


def test_chunk_guard_stops_a_declared_size_over_max_body_at_once() -> None:
    guard = ChunkLineGuard(limit=1024)
    assert guard.feed(b"400\r\n" + b"x" * 1024 + b"\r\n")  # exactly the limit
    with pytest.raises(BodyTooLarge):
        guard.feed(b"1\r\n")
    with pytest.raises(BodyTooLarge):
        ChunkLineGuard(limit=1 << 20).feed(b"ffffffffffffff\r\nhello")


@pytest.mark.parametrize("raw, want", [
    # OWS with an HTAB after the coding goes (RFC 9110 §5.5); a leading HTAB llhttp takes as it is
    (b"Transfer-Encoding:\tchunked\t\r\n", b"Transfer-Encoding:\tchunked\r\n"),
    (b"transfer-encoding: gzip, chunked \t \r\n", b"transfer-encoding: gzip, chunked\r\n"),
    (b"Transfer-Encoding: chunked \r\n", b"Transfer-Encoding: chunked \r\n"),  # no HTAB: unchanged
    (b"X-Transfer-Encoding: chunked\t\r\n", b"X-Transfer-Encoding: chunked\t\r\n"),  # another field
    (b"X-A: b\t\r\n", b"X-A: b\t\r\n"),
])
def test_strip_te_ows_touches_only_transfer_encoding_lines(raw: bytes, want: bytes) -> None:
    start = b"POST / HTTP/1.1\r\nHost: a\r\n"
    assert strip_te_ows(start + raw + b"\r\n") == start + want + b"\r\n"


def test_strip_te_ows_leaves_the_body_after_the_head() -> None:
    body = b"1f\r\nTransfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n"
    out = strip_te_ows(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\t\r\n\r\n" + body)
    assert out == b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + body


def test_chunk_guard_finds_the_end_of_the_message_after_its_trailers() -> None:
    guard = ChunkLineGuard()
    body = b"5;e=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"
    assert guard.feed(body + b"GET / HTTP/1.1\r\n") and guard.tail == len(body)
    assert guard.feed(b"more") and guard.tail == -1  # once ended, nothing more is its business


@pytest.mark.parametrize("cut", range(1, 29))
def test_chunk_guard_finds_the_end_across_reads(cut: int) -> None:
    guard = ChunkLineGuard()
    body = b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"
    data = body + b"NEXT"
    guard.feed(data[:cut])
    if cut >= len(body):
        assert guard.tail == len(body)
    else:
        assert guard.tail == -1 and guard.feed(data[cut:]) and guard.tail == len(body) - cut
