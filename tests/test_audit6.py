"""Audit 6: upstream selection, passive/active health, backup servers and the per-server pool,
against README "Upstream resilience"/"Pools" and nginx's upstream module (round robin, least_conn,
backup, max_fails/fail_timeout, keepalive)."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import make_config, ok_response, open_client, read_response

pytestmark = pytest.mark.timeout(30)

GET = b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n"


class Srv:
    """A scripted upstream: records request paths and connection ends; behaviour per request.

    `mode`: "ok" (200), "503", "500", "429", "404", "reset" (part of a head, then reset),
    "hang" (never answer), "alt503" (503, 200, 503, ... per request).
    Paths starting with /slow wait for `release`. Health checks (`/hc`) follow `health`.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.mode = "ok"
        self.health = "ok"  # ok | fail | hang
        self.paths: list[bytes] = []
        self.health_heads: list[bytes] = []
        self.health_conns: list[int] = []
        self.conn_paths: list[list[bytes]] = []
        self.eofs: list[float] = []
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()
        self.keepalive_hint: bytes | None = None
        self.n = 0

    def count(self, prefix: bytes = b"/") -> int:
        return sum(1 for p in self.paths if p.startswith(prefix))

    async def handler(self, reader, writer, up) -> None:
        mine: list[bytes] = []
        self.conn_paths.append(mine)
        conn_index = len(self.conn_paths) - 1
        loop = asyncio.get_running_loop()
        while True:
            try:
                head, _, _ = await reader.read_request()
            except (asyncio.IncompleteReadError, ConnectionError):
                self.eofs.append(loop.time())
                return
            path = head.split(b" ")[1]
            if path.startswith(b"/hc"):
                self.health_heads.append(head)
                self.health_conns.append(conn_index)
                mine.append(path)
                if self.health == "hang":
                    await asyncio.sleep(10)
                    return
                status = b"200 OK" if self.health == "ok" else b"500 Internal Server Error"
                writer.write(b"HTTP/1.1 %s\r\nContent-Length: 0\r\n\r\n" % status)
                await writer.drain()
                continue
            self.paths.append(path)
            mine.append(path)
            if path.startswith(b"/slow"):
                self.arrived.set()
                await self.release.wait()
            mode = self.mode
            if mode in ("alt503", "altreset"):
                self.n += 1
                mode = mode[3:] if self.n % 2 == 1 else "ok"
            if mode == "reset":  # a broken response head (not the keep-alive race: bytes came)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-")
                await writer.drain()
                await asyncio.sleep(0.01)
                writer.transport.abort()
                return
            if mode == "hang":
                await asyncio.sleep(10)
                return
            if mode in ("503", "500", "429", "404"):
                writer.write(b"HTTP/1.1 %s X\r\nContent-Length: 0\r\n\r\n" % mode.encode())
            else:
                extra = b"Keep-Alive: timeout=%s\r\n" % self.keepalive_hint if self.keepalive_hint else b""
                writer.write(ok_response(self.name.encode() + b" " + path, extra))
            await writer.drain()


async def start(upstream, *names: str) -> list[tuple[Srv, object]]:
    out = []
    for name in names:
        s = Srv(name)
        up = await upstream(s.handler)
        out.append((s, up))
    return out


def cfg_for(pairs, servers_extra=None, **lane):
    cfg = make_config([up.port for _, up in pairs])
    for i, extra in (servers_extra or {}).items():
        cfg["lanes"]["app"]["servers"][i] = {"address": f"127.0.0.1:{pairs[i][1].port}", **extra}
    cfg["lanes"]["app"].update(lane)
    return cfg


async def get(port: int, path: bytes) -> tuple[int, bytes]:
    reader, writer = await open_client(port)
    try:
        writer.write(GET % path)
        status, _, body = await asyncio.wait_for(read_response(reader), 5)
        return status, body
    finally:
        writer.close()


async def sequence(port: int, n: int, prefix: bytes = b"/s") -> list[bytes]:
    """n sequential requests on one client connection; the upstream name that served each."""
    reader, writer = await open_client(port)
    names = []
    try:
        for i in range(n):
            writer.write(GET % (prefix + b"%d" % i))
            status, _, body = await asyncio.wait_for(read_response(reader), 5)
            assert status == 200, (i, status, body)
            names.append(body.split(b" ")[0])
    finally:
        writer.close()
    return names


async def wait_until(pred, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, what
        await asyncio.sleep(0.01)


# -- 1. smooth weighted round robin --------------------------------------------------------------


async def test_rr_weights_3_1_interleave_smoothly(start_proxy, upstream):
    pairs = await start(upstream, "a", "b")
    proxy = await start_proxy(cfg_for(pairs, {0: {"weight": 3}}))
    names = await sequence(proxy.port, 12)
    # nginx smooth WRR (ngx_http_upstream_get_peer): 3:1 gives a,a,b,a repeated
    assert names == [b"a", b"a", b"b", b"a"] * 3


async def test_rr_weights_5_1_1_nginx_sequence(start_proxy, upstream):
    pairs = await start(upstream, "a", "b", "c")
    proxy = await start_proxy(cfg_for(pairs, {0: {"weight": 5}}))
    names = await sequence(proxy.port, 14)
    # nginx's documented smooth WRR example for {a:5, b:1, c:1}: a a b a c a a
    assert names == [b"a", b"a", b"b", b"a", b"c", b"a", b"a"] * 2


async def test_rr_equal_weights_alternate_across_client_connections(start_proxy, upstream):
    pairs = await start(upstream, "a", "b", "c")
    proxy = await start_proxy(cfg_for(pairs))
    names = [(await get(proxy.port, b"/x%d" % i))[1].split(b" ")[0] for i in range(6)]
    # round robin is per lane, not per client connection
    assert names == [b"a", b"b", b"c"] * 2


# -- 2. least_conn / p2c -------------------------------------------------------------------------


@pytest.mark.parametrize("balance", ["least_conn", "p2c"])
async def test_busy_server_gets_no_new_requests(start_proxy, upstream, balance):
    pairs = await start(upstream, "a", "b")
    proxy = await start_proxy(cfg_for(pairs, balance=balance))
    slow_r, slow_w = await open_client(proxy.port)
    slow_w.write(GET % b"/slow")
    await asyncio.wait_for(
        asyncio.wait([asyncio.ensure_future(s.arrived.wait()) for s, _ in pairs],
                     return_when=asyncio.FIRST_COMPLETED), 5)
    busy = next(s for s, _ in pairs if s.arrived.is_set())
    idle = next(s for s, _ in pairs if s is not busy)
    names = await sequence(proxy.port, 8)
    # least_conn / p2c: a server with an exchange in flight loses against an idle one
    assert names == [idle.name.encode()] * 8
    for s, _ in pairs:
        s.release.set()
    assert (await asyncio.wait_for(read_response(slow_r), 5))[0] == 200
    slow_w.close()


async def test_least_conn_weighted_concurrent_split(start_proxy, upstream):
    pairs = await start(upstream, "a", "b")
    proxy = await start_proxy(cfg_for(pairs, {0: {"weight": 3}}, balance="least_conn"))
    clients = []
    for i in range(8):
        r, w = await open_client(proxy.port)
        w.write(GET % b"/slow%d" % i)
        clients.append((r, w))
        await wait_until(lambda: sum(len(s.paths) for s, _ in pairs) == i + 1, 3, "request not arrived")
    a, b = pairs[0][0], pairs[1][0]
    # nginx least_conn: min(conns/weight), ties by weighted round robin -> 6:2 for weights 3:1
    assert (a.count(b"/slow"), b.count(b"/slow")) == (6, 2)
    for s, _ in pairs:
        s.release.set()
    for r, w in clients:
        assert (await asyncio.wait_for(read_response(r), 5))[0] == 200
        w.close()


# -- 3. backup servers ---------------------------------------------------------------------------


async def test_backup_idle_while_one_primary_is_down_used_when_all_are_and_left_on_recovery(start_proxy, upstream):
    pairs = await start(upstream, "a", "b", "c")
    a, b, c = (s for s, _ in pairs)
    proxy = await start_proxy(cfg_for(pairs, {0: {"fail_timeout": "400ms"}, 1: {"fail_timeout": "400ms"},
                                              2: {"backup": True}}))
    a.mode = "reset"
    names = await sequence(proxy.port, 6, b"/p")
    # backup used only when every primary is down: a down, b serves everything
    assert names == [b"b"] * 6 and c.count() == 0
    b.mode = "reset"
    names = await sequence(proxy.port, 4, b"/q")
    assert names == [b"c"] * 4  # every primary down: backup serves
    a.mode = b.mode = "ok"
    await asyncio.sleep(0.5)  # fail_timeout passes
    before = c.count()
    names = await sequence(proxy.port, 6, b"/r")
    # traffic returns to the primaries once they are up again
    assert set(names) == {b"a", b"b"} and c.count() == before


async def test_backup_serves_while_primary_is_health_checked_down_then_primary_returns(start_proxy, upstream):
    pairs = await start(upstream, "a", "bk")
    a, bk = (s for s, _ in pairs)
    health = {"path": "/hc", "interval": "50ms", "timeout": "300ms", "fall": 2, "rise": 2}
    proxy = await start_proxy(cfg_for(pairs, {1: {"backup": True}}, health=health))
    srv_a = proxy.lanes["app"].servers[0]
    a.health = "fail"
    await wait_until(lambda: not srv_a.health_ok, 3, "primary not taken out by health checks")
    names = await sequence(proxy.port, 4, b"/h")
    assert names == [b"bk"] * 4 and a.count(b"/h") == 0  # health-checked down: skipped
    a.health = "ok"
    await wait_until(lambda: srv_a.health_ok, 3, "primary not brought back")
    names = await sequence(proxy.port, 4, b"/k")
    assert names == [b"a"] * 4  # back on the primary


async def test_two_backups_share_by_weight(start_proxy, upstream):
    pairs = await start(upstream, "p", "x", "y")
    p = pairs[0][0]
    proxy = await start_proxy(cfg_for(pairs, {0: {"fail_timeout": "5s"}, 1: {"backup": True, "weight": 3},
                                              2: {"backup": True}}))
    p.mode = "reset"
    await get(proxy.port, b"/down")  # p fails once (max_fails 1) -> down, retried on a backup
    names = await sequence(proxy.port, 8, b"/b")
    # backups are balanced with their weights like primaries (nginx: backup peers use the same rr)
    assert sorted(names).count(b"x") == 6 and names.count(b"y") == 2


# -- 4. passive health -----------------------------------------------------------------------------


async def test_single_server_lane_is_never_marked_down(start_proxy, upstream):
    pairs = await start(upstream, "a")
    a = pairs[0][0]
    proxy = await start_proxy(cfg_for(pairs, {0: {"max_fails": 1, "fail_timeout": "10s"}}, retries=0))
    a.mode = "reset"
    for i in range(3):
        assert (await get(proxy.port, b"/f%d" % i))[0] == 502
    a.mode = "ok"
    # README: a lane with a single server never marks it down (nginx: max_fails ignored)
    assert await get(proxy.port, b"/ok") == (200, b"a /ok")
    assert proxy.lanes["app"].servers[0].down_until == 0


async def test_single_primary_with_backup_is_marked_down(start_proxy, upstream):
    pairs = await start(upstream, "a", "bk")
    a, bk = (s for s, _ in pairs)
    proxy = await start_proxy(cfg_for(pairs, {0: {"fail_timeout": "5s"}, 1: {"backup": True}}))
    a.mode = "reset"
    assert await get(proxy.port, b"/f") == (200, b"bk /f")
    a.mode = "ok"
    # with a backup the primary is not "single": max_fails applies (nginx peers->single is false)
    assert await get(proxy.port, b"/g") == (200, b"bk /g")
    assert a.count(b"/g") == 0


async def test_failures_outside_fail_timeout_do_not_add_up(start_proxy, upstream):
    pairs = await start(upstream, "a", "b")
    a = pairs[0][0]
    proxy = await start_proxy(cfg_for(pairs, {0: {"max_fails": 2, "fail_timeout": "300ms"}}, retries=0,
                                      retry_on=["error", "timeout", "http_503"]))
    srv = proxy.lanes["app"].servers[0]
    a.mode = "503"
    assert (await get(proxy.port, b"/1"))[0] == 503  # a
    await get(proxy.port, b"/2")  # b
    await asyncio.sleep(0.4)
    assert (await get(proxy.port, b"/3"))[0] == 503  # a, second failure, but outside the window
    # README: max_fails failures *within* fail_timeout mark down
    assert srv.marked_down == 0


async def test_failures_in_window_mark_down_even_with_successes_between(start_proxy, upstream):
    pairs = await start(upstream, "a", "b")
    a = pairs[0][0]
    proxy = await start_proxy(cfg_for(pairs, {0: {"max_fails": 2, "fail_timeout": "5s"}}, retries=0,
                                      retry_on=["error", "timeout", "http_503"]))
    srv = proxy.lanes["app"].servers[0]
    a.mode = "altreset"  # a breaks the connection, answers 200, breaks, ...
    statuses = [(await get(proxy.port, b"/i%d" % i))[0] for i in range(6)]
    assert statuses == [502, 200, 200, 200, 502, 200]  # a, b, a, b, a, b
    # README "max_fails failures within fail_timeout"; nginx free_round_robin_peer only resets
    # fails on a success when the peer was re-checked after fail_timeout (accessed < checked)
    assert srv.marked_down == 1


async def test_unretried_status_failures_accumulate_to_max_fails(start_proxy, upstream):
    pairs = await start(upstream, "a", "b")
    a = pairs[0][0]
    proxy = await start_proxy(cfg_for(pairs, {0: {"max_fails": 2, "fail_timeout": "5s"}}, retries=0,
                                      retry_on=["error", "timeout", "http_503"]))
    srv = proxy.lanes["app"].servers[0]
    a.mode = "503"
    statuses = [(await get(proxy.port, b"/c%d" % i))[0] for i in range(4)]
    assert statuses == [503, 200, 503, 200]  # not retried (retries 0): the 503 passes
    # README: http_503 in retry_on counts as a failure; 2 within fail_timeout -> down
    assert srv.failures == 2
    assert srv.marked_down == 1
    assert await sequence(proxy.port, 3, b"/c-after") == [b"b"] * 3


async def test_after_fail_timeout_one_more_failure_marks_down_again(start_proxy, upstream):
    pairs = await start(upstream, "a", "b")
    a = pairs[0][0]
    proxy = await start_proxy(cfg_for(pairs, {0: {"max_fails": 3, "fail_timeout": "300ms"}}, retries=0))
    srv = proxy.lanes["app"].servers[0]
    a.mode = "reset"
    for i in range(6):
        await get(proxy.port, b"/d%d" % i)
    assert srv.marked_down == 1 and a.count(b"/d") == 3
    await asyncio.sleep(0.4)
    for i in range(6):
        await get(proxy.port, b"/e%d" % i)
    # nginx: after fail_timeout one probe request is let through; it fails -> fails >= max_fails
    # again -> skipped for another fail_timeout (ngx_http_upstream_get_peer 'checked' logic)
    assert a.count(b"/e") == 1, a.count(b"/e")


async def test_status_not_in_retry_on_is_not_a_failure(start_proxy, upstream):
    pairs = await start(upstream, "a", "b")
    a = pairs[0][0]
    proxy = await start_proxy(cfg_for(pairs))  # retry_on default [error, timeout]
    a.mode = "503"
    statuses = [(await get(proxy.port, b"/n%d" % i))[0] for i in range(6)]
    # README: what counts as a failure is retry_on; http_503 is not in it -> passed, not counted
    assert statuses == [503, 200] * 3
    assert proxy.lanes["app"].servers[0].failures == 0 and proxy.lanes["app"].servers[0].down_until == 0


@pytest.mark.parametrize("code", ["429", "500"])
async def test_status_in_retry_on_counts_for_post(start_proxy, upstream, code):
    pairs = await start(upstream, "a", "b")
    a = pairs[0][0]
    proxy = await start_proxy(cfg_for(pairs, {0: {"fail_timeout": "5s"}}, retry_on=["error", f"http_{code}"]))
    a.mode = code
    reader, writer = await open_client(proxy.port)
    writer.write(b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi")
    status, _, _ = await asyncio.wait_for(read_response(reader), 5)
    writer.close()
    assert status == int(code)  # a POST is never replayed: the answer passes ...
    # ... but it still counts as a failure (nginx: max_fails per proxy_next_upstream conditions)
    assert proxy.lanes["app"].servers[0].down_until > 0
    names = await sequence(proxy.port, 3, b"/after")
    assert names == [b"b"] * 3


async def test_404_is_never_a_failure(start_proxy, upstream):
    pairs = await start(upstream, "a", "b")
    a = pairs[0][0]
    proxy = await start_proxy(cfg_for(pairs, retry_on=["error", "timeout", "http_500", "http_502", "http_503",
                                                       "http_504", "http_429"]))
    a.mode = "404"
    statuses = [(await get(proxy.port, b"/z%d" % i))[0] for i in range(4)]
    assert statuses == [404, 200, 404, 200]
    assert proxy.lanes["app"].servers[0].failures == 0


async def test_read_timeout_counts_as_failure(start_proxy, upstream):
    pairs = await start(upstream, "a", "b")
    a = pairs[0][0]
    proxy = await start_proxy(cfg_for(pairs, {0: {"fail_timeout": "5s"}}, read_timeout="200ms"))
    a.mode = "hang"
    assert await get(proxy.port, b"/t") == (200, b"b /t")  # timeout on a, GET retried on b
    assert proxy.lanes["app"].servers[0].down_until > 0
    assert await sequence(proxy.port, 3, b"/u") == [b"b"] * 3


async def test_max_fails_zero_never_marks_down(start_proxy, upstream):
    pairs = await start(upstream, "a", "b")
    a = pairs[0][0]
    proxy = await start_proxy(cfg_for(pairs, {0: {"max_fails": 0}}, retries=0))
    a.mode = "reset"
    statuses = [(await get(proxy.port, b"/m%d" % i))[0] for i in range(6)]
    assert statuses == [502, 200] * 3  # nginx: max_fails=0 disables accounting
    assert a.count(b"/m") == 3


# -- 5. active health ------------------------------------------------------------------------------


async def test_health_request_shape_and_own_connection(start_proxy, upstream):
    pairs = await start(upstream, "a", "b")
    a = pairs[0][0]
    health = {"path": "/hc?x=1", "interval": "50ms", "timeout": "300ms"}
    proxy = await start_proxy(cfg_for(pairs, health=health))
    await wait_until(lambda: len(a.health_heads) >= 2, 3, "no health checks")
    await sequence(proxy.port, 4, b"/w")
    head = a.health_heads[0]
    lines = head.split(b"\r\n")
    # README: `GET path` on its own connection
    assert lines[0] == b"GET /hc?x=1 HTTP/1.1"
    hdrs = {ln.split(b":")[0].lower(): ln.split(b":", 1)[1].strip() for ln in lines[1:] if ln}
    assert hdrs.get(b"host") == b"127.0.0.1:%d" % pairs[0][1].port  # HTTP/1.1 needs a Host
    assert hdrs.get(b"connection") == b"close"
    for conn_index in a.health_conns:
        assert all(p.startswith(b"/hc") for p in a.conn_paths[conn_index])  # never mixed with traffic
    assert len(set(a.health_conns)) == len(a.health_conns)  # a fresh connection per check


async def test_health_status_list_and_timeout(start_proxy, upstream):
    pairs = await start(upstream, "a", "b")
    a, b = (s for s, _ in pairs)
    health = {"path": "/hc", "interval": "50ms", "timeout": "200ms", "fall": 2, "rise": 3, "status": [200]}
    proxy = await start_proxy(cfg_for(pairs, health=health))
    sa, sb = proxy.lanes["app"].servers
    b.health = "hang"
    # a check without an answer within timeout fails: fall=2 -> out within ~2*(interval+timeout)
    await wait_until(lambda: not sb.health_ok, 2, "hanging server not taken out")
    assert sa.health_ok
    assert await sequence(proxy.port, 3, b"/v") == [b"a"] * 3
    b.health = "ok"
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await wait_until(lambda: sb.health_ok, 3, "not brought back")
    # rise=3: needs three passes in a row, so not before ~2 intervals
    assert loop.time() - t0 >= 0.09


async def test_health_checks_skip_down_servers(start_proxy, upstream):
    pairs = await start(upstream, "a", "d")
    d = pairs[1][0]
    health = {"path": "/hc", "interval": "50ms", "timeout": "200ms"}
    proxy = await start_proxy(cfg_for(pairs, {1: {"down": True}}, health=health))
    await wait_until(lambda: len(pairs[0][0].health_heads) >= 3, 3, "no checks")
    assert d.health_heads == [] and d.paths == []  # `down`: never used
    assert await sequence(proxy.port, 3, b"/y") == [b"a"] * 3


# -- 6. keep-alive pool ----------------------------------------------------------------------------


async def test_keepalive_requests_retires_connection(start_proxy, upstream):
    pairs = await start(upstream, "a")
    a, up = pairs[0]
    proxy = await start_proxy(cfg_for(pairs, keepalive_requests=3))
    await sequence(proxy.port, 7, b"/k")
    # nginx keepalive_requests: after N requests the upstream connection is closed, a new one opens
    assert [len(c) for c in a.conn_paths] == [3, 3, 1]
    await wait_until(lambda: len(a.eofs) >= 2, 2, "retired connections not closed")


async def test_keepalive_max_idle_closes_the_excess(start_proxy, upstream):
    pairs = await start(upstream, "a")
    a, up = pairs[0]
    proxy = await start_proxy(cfg_for(pairs, keepalive=2))
    clients = []
    for i in range(5):
        r, w = await open_client(proxy.port)
        w.write(GET % b"/slow%d" % i)
        clients.append((r, w))
    await wait_until(lambda: len(a.paths) == 5, 3, "requests not arrived")
    a.release.set()
    for r, w in clients:
        assert (await asyncio.wait_for(read_response(r), 5))[0] == 200
        w.close()
    # keepalive: 2 idle kept per server; the other 3 closed (nginx upstream keepalive cache size)
    await wait_until(lambda: len(a.eofs) == 3, 2, "excess idle connections not closed")
    assert proxy.lanes["app"].servers[0].pool.idle == 2
    await sequence(proxy.port, 3, b"/again")
    assert up.connections == 5  # reused, no new connection


async def test_keepalive_timeout_closes_idle_upstream_connection(start_proxy, upstream):
    pairs = await start(upstream, "a")
    a, up = pairs[0]
    proxy = await start_proxy(cfg_for(pairs, keepalive_timeout="300ms"))
    loop = asyncio.get_running_loop()
    await sequence(proxy.port, 1, b"/i")
    t0 = loop.time()
    await wait_until(lambda: len(a.eofs) == 1, 2, "idle connection not closed by keepalive_timeout")
    assert 0.25 <= a.eofs[0] - t0 <= 1.0
    await sequence(proxy.port, 1, b"/j")
    assert up.connections == 2


async def test_keepalive_zero_keeps_nothing(start_proxy, upstream):
    pairs = await start(upstream, "a")
    a, up = pairs[0]
    proxy = await start_proxy(cfg_for(pairs, keepalive=0))
    await sequence(proxy.port, 3, b"/z")
    assert up.connections == 3
    await wait_until(lambda: len(a.eofs) == 3, 2, "connections not closed")


async def test_upstream_keep_alive_timeout_hint_honoured(start_proxy, upstream):
    pairs = await start(upstream, "a")
    a, up = pairs[0]
    a.keepalive_hint = b"1"
    proxy = await start_proxy(cfg_for(pairs))
    await sequence(proxy.port, 1, b"/h1")
    await asyncio.sleep(0.2)
    await sequence(proxy.port, 1, b"/h2")
    assert up.connections == 1  # within the hint: reused
    await asyncio.sleep(0.9)
    await sequence(proxy.port, 1, b"/h3")
    # README: retired a little before the upstream's own Keep-Alive: timeout=N
    assert up.connections == 2


async def test_pool_is_per_server(start_proxy, upstream):
    pairs = await start(upstream, "a", "b")
    proxy = await start_proxy(cfg_for(pairs))
    names = await sequence(proxy.port, 8, b"/ps")
    assert names == [b"a", b"b"] * 4
    # one connection per server, each reused (keepalive pool per server)
    assert [up.connections for _, up in pairs] == [1, 1]
    assert [len(s.conn_paths[0]) for s, _ in pairs] == [4, 4]
