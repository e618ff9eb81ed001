"""Python cost of one proxied keep-alive GET, without sockets (for profiling the hot path).

The downstream and a pooled upstream protocol run on in-memory transports, so what is measured
is laneproxy's own work per exchange (parsing callbacks, routing, head building, relaying), not
the kernel's. Usage: python bench/hotpath.py [N] [--profile] [--access-log]
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from laneproxy.config import ClientConfig, LaneConfig  # noqa: E402
from laneproxy.flow import outbox_for  # noqa: E402
from tests.helpers import ProxyPair  # noqa: E402

REQUEST = b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 29 Nov 2026 01:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\nhello world\n"
)


async def main(n: int, profile: bool) -> None:
    many = 10**9
    pair = ProxyPair(
        asyncio.get_running_loop(),
        client=ClientConfig(keepalive_requests=many),
        lane_cfg=LaneConfig(servers=["127.0.0.1:9"], keepalive_requests=many),
    )
    up, up_t = pair.pooled_upstream()
    down_t = pair.down_t
    if "--access-log" in sys.argv:  # the combined access log, written to /dev/null
        from laneproxy.accesslog import AccessLog

        pair.ctx.access_log = AccessLog("/dev/null", "combined", Path("/"), asyncio.get_running_loop())

    # `one()` ends each loop iteration itself (outbox.flush); the flush that the outbox would
    # schedule with call_soon never runs here, so it is not scheduled (under load one call_soon
    # serves a whole epoll batch of exchanges).
    outbox = outbox_for(asyncio.get_running_loop())
    outbox.loop = SimpleNamespace(call_soon=lambda callback: None)  # type: ignore[assignment]

    def one() -> None:
        pair.send(REQUEST)
        outbox.flush()  # the end of the loop iteration: the head goes upstream (flow rule 4)
        up.data_received(RESPONSE)
        outbox.flush()
        down_t._buffer.clear()
        up_t._buffer.clear()

    for _ in range(1000):
        one()
    prof = cProfile.Profile() if profile else None
    t = time.perf_counter()
    if prof:
        prof.enable()
    for _ in range(n):
        one()
    if prof:
        prof.disable()
    elapsed = time.perf_counter() - t
    assert pair.down.requests == n + 1000 and not pair.down.is_closed, "the exchanges did not all run"
    print(f"{elapsed / n * 1e6:.2f} us per exchange ({n} exchanges)")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    pair.close()


if __name__ == "__main__":
    import uvloop

    count = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 100_000
    uvloop.run(main(count, "--profile" in sys.argv))
