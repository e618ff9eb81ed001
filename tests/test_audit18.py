"""Audit 18: a randomized flow-control audit, end to end through real sockets.

Seeded random scenarios (the seed is the test id: a failure reruns exactly) push bodies of 0 B to
8 MiB through laneproxy on real loopback sockets, with a raw-socket client and a raw-socket
upstream that read slowly, in bursts or not at all for a while, and write in random sizes:

* HTTP: request bodies by Content-Length or chunked (with and without `Expect: 100-continue`),
  responses by Content-Length, chunked, until close, and HEAD / 204 / 304; several requests per
  client connection, some pipelined behind a large upload; some upstreams answer before reading
  the body (early response, then a graceful close);
* Upgrade tunnels with bulk data both ways, bytes pipelined with the handshake, stalls on
  either side, and half-closes in either order.

Checked for every scenario: byte-exact delivery both ways (SHA-256 of every body), responses in
order, no truncation; no deadlock (every scenario ends within a deadline once both sides read);
bounded buffering; and afterwards an idle proxy (no client connection, tunnel, in-flight exchange
or lent upstream connection left; every upstream connection still open is idle in the pool).

Bounded buffering, measured. Whenever a peer stalls, the test takes, once the stall has lasted
(`STALL`), the bytes the sending peer got its kernel to accept minus the bytes the receiving peer
took from its kernel, for the body being relayed. On loopback that figure is dominated by the
kernel: Linux autotunes the send buffer of laneproxy's own sockets up to `tcp_wmem[2]` (4 MiB
here: the loopback MSS is 64 KiB), which the test cannot shrink without touching laneproxy. So
the bytes queued in the kernel are subtracted exactly: SIOCOUTQ of the sender's socket and of
laneproxy's outgoing socket, SIOCINQ of laneproxy's incoming socket and of the receiver's socket
(the test's own sockets use small SO_RCVBUF/SO_SNDBUF). What remains is what laneproxy itself
holds, and it must stay within its 64 KiB high water plus one read (uvloop reads up to 256 KiB)
plus framing slack: `USER_BOUND`. The dedicated tests also assert that the sender really was
blocked with most of its body unsent when the bound was taken.

Timeouts (`client.body_timeout`, `client.send_timeout`, the lane's `read_timeout` and
`send_timeout`) are checked to fire when a peer stalls longer than them, with the documented
outcome (408 / close / 504 or an abort after the head / 504), and not to fire on stalls shorter
than them, even when the stalls add up to more, or while the proxy itself is the one that
stopped reading (a stalled client must not cost the upstream its `read_timeout`, a stalled
upstream must not cost the client its `body_timeout`).

Observations (no laneproxy bug found): laneproxy's own buffering stayed at 0-140 KiB per
direction in every check, while the kernel queues on the path reached 4-8 MiB. Both send
timeouts run from `pause_writing` to `resume_writing`; with a send queue autotuned to MiBs, the
kernel wakes a writer only once about a third of it is free, so a peer that reads a little
between short stalls can still look silent to laneproxy (as it would to nginx, whose timer runs
between writes): the "not before" cases read `PROGRESS` bytes between their stalls.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import random
import socket
import struct
import termios
from dataclasses import dataclass, field

import pytest

from laneproxy.flow import HIGH_WATER
from tests.conftest import make_config

pytestmark = pytest.mark.timeout(60)

KiB = 1024
MiB = 1024 * KiB
SOCK_BUF = 16 * KiB  # SO_RCVBUF / SO_SNDBUF of the test's own sockets (the kernel doubles it)
READ = 64 * KiB  # the test peers' largest recv
USER_BOUND = HIGH_WATER + 256 * KiB + 64 * KiB  # laneproxy's own buffers, one direction
STALL = 0.4  # how long a stalled peer stays stalled in the random scenarios
DEADLINE = 20.0  # a scenario that is not done by then is a deadlock
BIG = 16 * MiB  # more than the kernel queues on a loopback path hold (autotuned: up to ~8 MiB here)

# -- kernel queues ----------------------------------------------------------------------------


def _ioctl(fd: int, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0]


def inq(sock) -> int:
    """Bytes in the socket's receive queue, not yet read by its owner."""
    return _ioctl(sock.fileno(), termios.FIONREAD)


def outq(sock) -> int:
    """Bytes in the socket's send queue, not yet acknowledged by the peer's kernel."""
    return _ioctl(sock.fileno(), termios.TIOCOUTQ)


async def until(pred, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll `pred()` until true, failing after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def small_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
    sock.setblocking(False)
    return sock


# -- a raw peer with counters -----------------------------------------------------------------


class Peer:
    """One end of a test connection: raw non-blocking socket, nothing buffered but `buf`.

    `sent` counts bytes the kernel accepted from us, `received` bytes taken from the kernel."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray()
        self.sent = 0
        self.received = 0
        self.eof = False
        self.closed = False

    @classmethod
    async def connect(cls, port: int) -> Peer:
        sock = small_socket()
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return cls(sock)

    async def _recv(self, n: int) -> bytes:
        try:
            data = await self.loop.sock_recv(self.sock, n)
        except ConnectionError:
            data = b""
        if not data:
            self.eof = True
        self.received += len(data)
        return data

    async def take(self, n: int) -> bytes:
        """Up to n bytes: from `buf`, else from one recv (b"" at EOF)."""
        if self.buf:
            data = bytes(self.buf[:n])
            del self.buf[:n]
            return data
        return await self._recv(n)

    async def read_until(self, sep: bytes, limit: int = 64 * KiB) -> bytes | None:
        """Up to and including `sep`; None at EOF before it."""
        while True:
            i = self.buf.find(sep)
            if i != -1:
                data = bytes(self.buf[: i + len(sep)])
                del self.buf[: i + len(sep)]
                return data
            assert len(self.buf) < limit, f"no {sep!r} within {limit} bytes: {bytes(self.buf[:200])!r}"
            data = await self._recv(READ)
            if not data:
                return None
            self.buf += data

    async def read_exactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            data = await self.take(n - len(out))
            assert data, f"EOF after {len(out)} of {n} bytes"
            out += data
        return bytes(out)

    @property
    def raw_pos(self) -> int:
        """Bytes consumed by the parser so far (received minus what waits in `buf`)."""
        return self.received - len(self.buf)

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)
        self.sent += len(data)

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


# -- pacing -----------------------------------------------------------------------------------


@dataclass
class Pace:
    """How a peer reads or writes one body: `step(done)` is awaited before each piece."""

    mode: str = "fast"  # fast | slow | burst | stall
    piece: int = READ  # bytes per piece
    pause: float = 0.0  # slow: after each piece; burst: after each `every` bytes; stall: its length
    every: int = 0
    at: int = 0  # stall: once this many body bytes are done
    stalled: bool = False
    last: int = 0

    async def step(self, done: int, on_stall=None) -> None:
        if self.mode == "slow":
            await asyncio.sleep(self.pause)
        elif self.mode == "burst" and done - self.last >= self.every:
            self.last = done
            await asyncio.sleep(self.pause)
        elif self.mode == "stall" and not self.stalled and done >= self.at:
            self.stalled = True
            await asyncio.sleep(self.pause)  # the stalled state is what is under test
            if on_stall is not None:
                on_stall()


def random_pace(rng: random.Random, size: int, allow_stall: bool = True) -> Pace:
    modes = ["fast", "burst"] + (["stall", "stall"] if allow_stall and size else [])
    modes += ["slow"] if size < 256 * KiB else []
    mode = rng.choice(modes)
    piece = rng.choice([1 * KiB, 4 * KiB, 16 * KiB, READ])
    if mode == "slow":
        return Pace("slow", piece=max(piece, size // 40 + 1), pause=rng.uniform(0.001, 0.005))
    if mode == "burst":
        return Pace("burst", piece=READ, pause=rng.uniform(0.01, 0.03), every=rng.choice([256 * KiB, MiB, 2 * MiB]))
    if mode == "stall":
        return Pace("stall", piece=READ, pause=STALL, at=rng.randrange(0, max(size // 2, 1)))
    return Pace("fast", piece=READ)


def body_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- HTTP on the test peers -------------------------------------------------------------------


def parse_head(head: bytes) -> tuple[bytes, dict[bytes, list[bytes]]]:
    lines = head.split(b"\r\n")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    return lines[0], headers


def framing_of(headers: dict[bytes, list[bytes]], request: bool) -> tuple[str, int]:
    if headers.get(b"transfer-encoding"):
        assert headers[b"transfer-encoding"] == [b"chunked"], headers
        assert b"content-length" not in headers
        return "chunked", 0
    if b"content-length" in headers:
        assert len(headers[b"content-length"]) == 1
        return "cl", int(headers[b"content-length"][0])
    return ("cl", 0) if request else ("close", 0)


async def read_body(peer: Peer, kind: str, length: int, pace: Pace, on_stall=None) -> tuple[int, str]:
    """Read one body in its framing, paced: (payload length, sha256)."""
    h = hashlib.sha256()
    done = 0

    async def span(n: int | None) -> None:  # n bytes of payload (None: until EOF)
        nonlocal done
        left = n
        while left is None or left > 0:
            await pace.step(done, on_stall)
            data = await peer.take(pace.piece if left is None else min(left, pace.piece))
            if not data:
                assert left is None, f"EOF with {left} body bytes missing (got {done})"
                return
            h.update(data)
            done += len(data)
            if left is not None:
                left -= len(data)

    if kind == "cl":
        await span(length)
    elif kind == "close":
        await span(None)
    else:
        while True:
            line = await peer.read_until(b"\r\n")
            assert line is not None, f"EOF in a chunk-size line after {done} bytes"
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while (await peer.read_until(b"\r\n")) not in (b"\r\n", None):
                    pass
                break
            await span(size)
            assert await peer.read_exactly(2) == b"\r\n"
    return done, h.hexdigest()


async def write_body(peer: Peer, data: bytes, kind: str, rng: random.Random, pace: Pace, on_stall=None) -> None:
    """Write one body in random piece sizes (chunked: a chunk per piece), paced."""
    top = 64 * KiB if len(data) > 256 * KiB else 4 * KiB
    i = 0
    while i < len(data):
        await pace.step(i, on_stall)
        n = rng.randint(1, top)
        piece = data[i : i + n]
        await peer.send(b"%x\r\n%b\r\n" % (len(piece), piece) if kind == "chunked" else piece)
        i += len(piece)
    if kind == "chunked":
        await peer.send(b"0\r\n\r\n")


# -- the raw upstream -------------------------------------------------------------------------


class RawUpstream:
    """A listening socket with small buffers; `handler(peer)` runs per accepted connection."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.lsock = small_socket()  # accepted sockets inherit the small buffers
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.peers: list[Peer] = []
        self.tasks: set[asyncio.Task] = set()
        self.errors: list[BaseException] = []
        self.accepting = asyncio.get_running_loop().create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self.lsock)
            sock.setblocking(False)
            peer = Peer(sock)
            self.peers.append(peer)
            task = loop.create_task(self._run(peer))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _run(self, peer: Peer) -> None:
        try:
            await self.handler(peer)
        except ConnectionError:  # laneproxy dropped the connection: the test sees why on its side
            pass
        except Exception as exc:  # an assertion or a bug: reported by the test, not lost in a task
            self.errors.append(exc)
        finally:
            peer.close()

    @property
    def live(self) -> int:
        return len(self.tasks)

    async def close(self) -> None:
        self.accepting.cancel()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(self.accepting, *self.tasks, return_exceptions=True)
        for peer in self.peers:
            peer.close()
        self.lsock.close()


@pytest.fixture
async def raw_upstreams():
    made: list[RawUpstream] = []

    def make(handler) -> RawUpstream:
        up = RawUpstream(handler)
        made.append(up)
        return up

    yield make
    for up in made:
        await up.close()


def config(port: int, **client_and_lane) -> dict:
    """Timeouts long enough for the random scenarios' stalls, short enough to matter."""
    client = {"body_timeout": "3s", "send_timeout": "3s", "header_timeout": "5s"}
    lane = {"max_body": 0, "read_timeout": "3s", "send_timeout": "3s", "connect_timeout": "2s"}
    for key, value in client_and_lane.items():
        (client if key.startswith("client_") else lane)[key.removeprefix("client_").removeprefix("lane_")] = value
    return make_config(port, client=client, lane=lane)


# -- measuring what laneproxy holds ------------------------------------------------------------


@dataclass
class Leg:
    """One body crossing the proxy: sender and receiver, with the raw offsets where it starts."""

    total: int
    snd: Peer | None = None
    snd_start: int = 0
    rcv: Peer | None = None
    rcv_start: int = 0


@dataclass
class Check:
    direction: str
    in_flight: int  # sent by one peer, not yet taken by the other
    kernel: int  # of which queued in the four kernel socket queues on the path
    held: int  # of which laneproxy holds in its own buffers
    unsent: int  # body bytes the sender still had to send


def proxy_sockets(proxy, client: Peer):
    """laneproxy's socket facing `client`, and the upstream socket its active exchange uses."""
    name = client.sock.getsockname()
    for down in proxy.ctx.connections:
        if down.transport.get_extra_info("peername") == name:
            up = None
            if down.tunnel is not None:
                up = down.tunnel.up
            elif down.active is not None:
                up = down.active.up
            return down.transport.get_extra_info("socket"), (up.transport.get_extra_info("socket") if up else None)
    return None, None


def measure(proxy, client: Peer, leg: Leg, direction: str) -> Check | None:
    """direction "up": client → upstream; "down": upstream → client."""
    down_sock, up_sock = proxy_sockets(proxy, client)
    if down_sock is None or up_sock is None or leg.snd is None or leg.rcv is None:
        return None
    p_in, p_out = (down_sock, up_sock) if direction == "up" else (up_sock, down_sock)
    sent = leg.snd.sent - leg.snd_start
    in_flight = sent - (leg.rcv.received - leg.rcv_start)
    try:
        kernel = outq(leg.snd.sock) + inq(p_in) + outq(p_out) + inq(leg.rcv.sock)
    except (OSError, ValueError):  # a side already closed (its queues can no longer be read)
        return None
    return Check(direction, in_flight, kernel, in_flight - kernel, leg.total - sent)


def assert_bounded(check: Check | None, where: str) -> None:
    if check is not None:
        assert check.held <= USER_BOUND, (
            f"{where}: laneproxy holds {check.held / KiB:.0f} KiB of a body "
            f"(in flight {check.in_flight / KiB:.0f} KiB, kernel queues {check.kernel / KiB:.0f} KiB, "
            f"bound {USER_BOUND / KiB:.0f} KiB)"
        )


async def assert_idle(proxy, ups: list[RawUpstream], timeout: float = 5.0) -> None:
    """No client connection, tunnel, in-flight exchange or lent upstream connection is left, and
    every upstream connection still open is one idle in the pool."""

    def state():
        lanes = list(proxy.lanes.values())
        pools = [s.pool for lane in lanes for s in lane.servers]
        return (
            len(proxy.ctx.connections), proxy.ctx.tunnels, sum(lane.in_flight for lane in lanes),
            sum(p.active + p.connecting for p in pools), sum(up.live for up in ups) - sum(p.idle for p in pools),
        )

    await until(lambda: state() == (0, 0, 0, 0, 0), timeout,
                "an idle proxy (connections, tunnels, in flight, lent upstream conns, open upstream conns not pooled)")
    for up in ups:
        assert not up.errors, up.errors


# -- HTTP scenarios ---------------------------------------------------------------------------


@dataclass
class Req:
    id: int
    method: bytes
    req_kind: str  # none | cl | chunked
    req_size: int
    resp_kind: str  # cl | chunked | close | head | 204 | 304
    resp_size: int
    expect: bool = False
    early: bool = False  # the upstream answers before reading the body, then closes gracefully
    pipelined: bool = False  # written before the previous response was read
    up_read: Pace = field(default_factory=Pace)
    up_write: Pace = field(default_factory=Pace)
    client_read: Pace = field(default_factory=Pace)
    client_write: Pace = field(default_factory=Pace)

    @property
    def req_body(self) -> bytes:
        return body_bytes(self.id * 2 + 1, self.req_size)

    @property
    def resp_body(self) -> bytes:
        return body_bytes(self.id * 2 + 2, self.resp_size)


def size_for(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.15:
        return 0
    if r < 0.45:
        return rng.randint(1, 4 * KiB)
    if r < 0.75:
        return rng.randint(4 * KiB, 512 * KiB)
    if r < 0.9:
        return rng.randint(512 * KiB, 3 * MiB)
    return 8 * MiB


def random_requests(seed: int) -> list[Req]:
    rng = random.Random(seed)
    reqs = []
    for i in range(rng.randint(2, 6)):
        rid = seed * 100 + i
        method = rng.choice([b"GET", b"POST", b"POST", b"PUT", b"HEAD"])
        req_kind = "none" if method in (b"GET", b"HEAD") else rng.choice(["cl", "chunked"])
        req_size = 0 if req_kind == "none" else size_for(rng)
        if method == b"HEAD":
            resp_kind = "head"
        else:
            resp_kind = rng.choice(["cl", "cl", "chunked", "chunked", "close", "204", "304"])
        resp_size = 0 if resp_kind in ("204", "304") else size_for(rng)
        req = Req(rid, method, req_kind, req_size, resp_kind, resp_size)
        req.expect = req_kind != "none" and rng.random() < 0.3
        req.early = req_size > 0 and rng.random() < 0.15
        req.pipelined = i > 0 and rng.random() < 0.5
        req.up_read = random_pace(rng, req_size, allow_stall=not req.early)
        req.up_write = random_pace(rng, resp_size, allow_stall=False)
        req.client_read = random_pace(rng, resp_size if resp_kind != "head" else 0)
        req.client_write = random_pace(rng, req_size, allow_stall=False)
        reqs.append(req)
    return reqs


class HttpRun:
    """One client connection carrying `reqs` through the proxy to a RawUpstream."""

    def __init__(self, proxy, reqs: list[Req], seed: int) -> None:
        self.proxy = proxy
        self.reqs = {r.id: r for r in reqs}
        self.order = reqs
        self.rng = random.Random(seed ^ 0x5EED)
        self.legs: dict[tuple[str, int], Leg] = {}
        self.checks: list[Check] = []
        self.client: Peer | None = None
        self.up_got: dict[int, tuple[int, str] | str] = {}
        self.continued = {r.id: asyncio.Event() for r in reqs}
        self.answered = {r.id: asyncio.Event() for r in reqs}
        self.stage: dict[str, str] = {}

    def leg(self, direction: str, rid: int, total: int) -> Leg:
        return self.legs.setdefault((direction, rid), Leg(total))

    def check(self, direction: str, rid: int) -> None:
        c = measure(self.proxy, self.client, self.legs[(direction, rid)], direction)  # type: ignore[arg-type]
        assert_bounded(c, f"request {rid} {direction}")
        if c is not None:
            self.checks.append(c)

    # the upstream side
    async def serve(self, peer: Peer) -> None:
        while True:
            head = await peer.read_until(b"\r\n\r\n")
            if head is None:
                return
            line, headers = parse_head(head)
            rid = int(headers[b"x-id"][0])
            req = self.reqs[rid]
            assert line.startswith(req.method + b" /r/%d " % rid), line
            assert b"expect" not in headers, "Expect reached the upstream"
            kind, length = framing_of(headers, request=True)
            if req.req_kind == "none":
                assert (kind, length) == ("cl", 0) and b"content-length" not in headers, headers
            if req.early:
                self.up_got[rid] = "early"
                await self.respond(peer, req)
                peer.shutdown_write()
                while await peer.take(READ):  # drain until laneproxy closes (no RST on our close)
                    pass
                return
            leg = self.leg("up", rid, req.req_size)
            leg.rcv, leg.rcv_start = peer, peer.raw_pos
            self.up_got[rid] = await read_body(peer, kind, length, req.up_read, lambda: self.check("up", rid))
            await self.respond(peer, req)
            if req.resp_kind == "close":
                peer.shutdown_write()
                return

    async def respond(self, peer: Peer, req: Req) -> None:
        body = req.resp_body
        extra = b"X-Id: %d\r\n" % req.id
        if req.resp_kind in ("cl", "head"):
            head = b"HTTP/1.1 200 OK\r\n%bContent-Length: %d\r\n\r\n" % (extra, len(body))
        elif req.resp_kind == "chunked":
            head = b"HTTP/1.1 200 OK\r\n%bTransfer-Encoding: chunked\r\n\r\n" % extra
        elif req.resp_kind == "close":
            head = b"HTTP/1.1 200 OK\r\n%bConnection: close\r\n\r\n" % extra
        elif req.resp_kind == "204":
            head = b"HTTP/1.1 204 No Content\r\n%b\r\n" % extra
        else:
            head = b"HTTP/1.1 304 Not Modified\r\n%bETag: \"x\"\r\n\r\n" % extra
        await peer.send(head)
        if req.resp_kind in ("head", "204", "304"):
            return
        leg = self.leg("down", req.id, len(body))
        leg.snd, leg.snd_start = peer, peer.sent
        await write_body(peer, body, "chunked" if req.resp_kind == "chunked" else "cl", self.rng, req.up_write)

    # the client side
    async def write_requests(self) -> None:
        client = self.client
        prev = None
        for req in self.order:
            if prev is not None and not req.pipelined:
                self.stage["writer"] = f"waiting for the response to {prev.id}"
                await self.answered[prev.id].wait()
            prev = req
            fields = b"Host: t\r\nX-Id: %d\r\n" % req.id
            if req.req_kind == "cl":
                fields += b"Content-Length: %d\r\n" % req.req_size
            elif req.req_kind == "chunked":
                fields += b"Transfer-Encoding: chunked\r\n"
            if req.expect:
                fields += b"Expect: 100-continue\r\n"
            self.stage["writer"] = f"sending the head of {req.id}"
            await client.send(b"%s /r/%d HTTP/1.1\r\n%b\r\n" % (req.method, req.id, fields))  # type: ignore[union-attr]
            if req.req_kind == "none":
                continue
            if req.expect and not (req.req_kind == "cl" and req.req_size == 0):  # no body: no 100 due
                self.stage["writer"] = f"waiting for 100 Continue to {req.id}"
                await self.continued[req.id].wait()
            self.stage["writer"] = f"sending the body of {req.id}"
            leg = self.leg("up", req.id, req.req_size)
            leg.snd, leg.snd_start = client, client.sent  # type: ignore[union-attr]
            await write_body(client, req.req_body, req.req_kind, self.rng, req.client_write)  # type: ignore[arg-type]
        self.stage["writer"] = "done"

    async def read_responses(self) -> None:
        client = self.client
        for req in self.order:
            self.stage["reader"] = f"reading the response to {req.id}"
            while True:
                head = await client.read_until(b"\r\n\r\n")  # type: ignore[union-attr]
                assert head is not None, f"connection closed before the response to request {req.id}"
                line, headers = parse_head(head)
                status = int(line.split(b" ")[1])
                if status != 100:
                    break
                assert req.expect, f"100 Continue for request {req.id}, which did not ask"
                self.continued[req.id].set()
            assert headers.get(b"x-id") == [b"%d" % req.id], f"response {line!r} {headers} out of order ({req.id} due)"
            want = {"204": 204, "304": 304}.get(req.resp_kind, 200)
            assert status == want, (line, req)
            assert b"connection" not in headers, f"request {req.id}: the client connection should stay open"
            if req.resp_kind in ("head", "204", "304"):
                assert headers.get(b"transfer-encoding") is None
                if req.resp_kind == "head":
                    assert headers[b"content-length"] == [b"%d" % req.resp_size]
            else:
                kind, length = framing_of(headers, request=False)
                assert kind == ("cl" if req.resp_kind == "cl" else "chunked"), (req.resp_kind, headers)
                leg = self.leg("down", req.id, req.resp_size)
                leg.rcv, leg.rcv_start = client, client.raw_pos  # type: ignore[union-attr]
                got = await read_body(client, kind, length, req.client_read, lambda: self.check("down", req.id))  # type: ignore[arg-type]
                assert got == (req.resp_size, sha(req.resp_body)), f"response body of request {req.id} differs"
            if req.req_kind != "none":
                if req.early:
                    assert self.up_got.get(req.id) == "early"
                else:
                    assert self.up_got.get(req.id) == (req.req_size, sha(req.req_body)), (
                        f"request body of {req.id} differs at the upstream"
                    )
            self.answered[req.id].set()
        self.stage["reader"] = "done"

    async def run(self) -> None:
        self.client = await Peer.connect(self.proxy.port)
        try:
            writer = asyncio.ensure_future(self.write_requests())
            try:
                await self.read_responses()
                await writer
            finally:
                writer.cancel()
        finally:
            self.client.close()


SEEDS = list(range(1, 19))


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_http_scenarios(start_proxy, raw_upstreams, seed):
    reqs = random_requests(seed)
    run = HttpRun(None, reqs, seed)
    up = raw_upstreams(run.serve)
    run.proxy = proxy = await start_proxy(config(up.port))
    try:
        await asyncio.wait_for(run.run(), DEADLINE)
    except TimeoutError:
        raise AssertionError(
            f"seed {seed}: not done within {DEADLINE}s (deadlock?): {run.stage}; upstream errors {up.errors}; {reqs}"
        ) from None
    assert not up.errors, up.errors
    await assert_idle(proxy, [up])


def stalled_checks(run, direction: str) -> list[Check]:
    """The checks taken while the sender was really blocked with most of an 8 MiB body unsent."""
    return [c for c in run.checks if c.direction == direction and c.unsent >= 2 * MiB]


@pytest.mark.parametrize("resp_kind", ["cl", "chunked", "close"])
async def test_client_that_stops_reading_stops_the_upstream(start_proxy, raw_upstreams, resp_kind):
    req = Req(1, b"GET", "none", 0, resp_kind, BIG, client_read=Pace("stall", pause=0.8, at=64 * KiB))
    run = HttpRun(None, [req], 1)
    up = raw_upstreams(run.serve)
    run.proxy = proxy = await start_proxy(config(up.port))
    await asyncio.wait_for(run.run(), DEADLINE)
    assert stalled_checks(run, "down"), f"the upstream was never blocked: {run.checks}"
    await assert_idle(proxy, [up])


@pytest.mark.parametrize("req_kind", ["cl", "chunked"])
async def test_upstream_that_stops_reading_stops_the_client(start_proxy, raw_upstreams, req_kind):
    req = Req(1, b"POST", req_kind, BIG, "cl", 10, up_read=Pace("stall", pause=0.8, at=64 * KiB))
    run = HttpRun(None, [req], 2)
    up = raw_upstreams(run.serve)
    run.proxy = proxy = await start_proxy(config(up.port))
    await asyncio.wait_for(run.run(), DEADLINE)
    assert stalled_checks(run, "up"), f"the client was never blocked: {run.checks}"
    await assert_idle(proxy, [up])


async def test_pipelined_requests_behind_a_stalled_16mib_upload(start_proxy, raw_upstreams):
    """A 16 MiB upload the upstream stops reading, with requests pipelined behind it (one waits
    for its 100 Continue, one gets a body the client stops reading, one is close-delimited)."""
    reqs = [
        Req(1, b"POST", "cl", BIG, "chunked", 3000, expect=True, up_read=Pace("stall", pause=0.6, at=MiB)),
        Req(2, b"GET", "none", 0, "chunked", BIG, pipelined=True, client_read=Pace("stall", pause=0.6, at=KiB)),
        Req(3, b"HEAD", "none", 0, "head", 5000, pipelined=True),
        Req(4, b"PUT", "chunked", BIG, "204", 0, expect=True, pipelined=True,
            up_read=Pace("stall", pause=0.6, at=2 * MiB)),
        Req(5, b"POST", "cl", 2 * MiB, "304", 0, pipelined=True, early=True),
        Req(6, b"GET", "none", 0, "close", 3 * MiB, pipelined=True, client_read=Pace("burst", pause=0.02, every=MiB)),
        Req(7, b"GET", "none", 0, "cl", 0, pipelined=True),
    ]
    run = HttpRun(None, reqs, 3)
    up = raw_upstreams(run.serve)
    run.proxy = proxy = await start_proxy(config(up.port))
    await asyncio.wait_for(run.run(), DEADLINE)
    assert len(stalled_checks(run, "up")) == 2 and len(stalled_checks(run, "down")) == 1, run.checks
    await assert_idle(proxy, [up])


# -- tunnels ----------------------------------------------------------------------------------

SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)
HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


@dataclass
class TunnelSpec:
    up_size: int  # client → upstream
    down_size: int  # upstream → client
    early: int = 0  # bytes of the client's stream sent with the handshake
    fin: str = "any"  # client_first | upstream_first | any: whose FIN goes out first
    client_read: Pace = field(default_factory=Pace)
    client_write: Pace = field(default_factory=Pace)
    up_read: Pace = field(default_factory=Pace)
    up_write: Pace = field(default_factory=Pace)


def random_tunnel(seed: int) -> TunnelSpec:
    rng = random.Random(seed)
    up_size, down_size = size_for(rng), size_for(rng)
    return TunnelSpec(
        up_size, down_size, early=rng.choice([0, 0, min(up_size, rng.randint(1, 2000))]),
        fin=rng.choice(["client_first", "upstream_first", "any"]),
        client_read=random_pace(rng, down_size), client_write=random_pace(rng, up_size, allow_stall=False),
        up_read=random_pace(rng, up_size), up_write=random_pace(rng, down_size, allow_stall=False),
    )


class TunnelRun:
    def __init__(self, spec: TunnelSpec, seed: int) -> None:
        self.spec = spec
        self.proxy = None
        self.rng = random.Random(seed ^ 0x7E1)
        self.up_data = body_bytes(seed * 2 + 1, spec.up_size)
        self.down_data = body_bytes(seed * 2 + 2, spec.down_size)
        self.legs = {"up": Leg(spec.up_size), "down": Leg(spec.down_size)}
        self.checks: list[Check] = []
        self.client: Peer | None = None
        self.up_got: tuple[int, str] | None = None
        self.eof_at_up = asyncio.Event()
        self.eof_at_client = asyncio.Event()
        self.stage: dict[str, str] = {}

    def check(self, direction: str) -> None:
        c = measure(self.proxy, self.client, self.legs[direction], direction)  # type: ignore[arg-type]
        assert_bounded(c, f"tunnel {direction}")
        if c is not None:
            self.checks.append(c)

    async def serve(self, peer: Peer) -> None:
        spec = self.spec
        head = await peer.read_until(b"\r\n\r\n")
        assert head is not None
        _, headers = parse_head(head)
        assert headers[b"upgrade"] == [b"websocket"], headers
        self.legs["up"].rcv, self.legs["up"].rcv_start = peer, peer.raw_pos
        await peer.send(SWITCHED)
        self.legs["down"].snd, self.legs["down"].snd_start = peer, peer.sent

        async def reader() -> None:
            self.up_got = await read_body(peer, "close", 0, spec.up_read, lambda: self.check("up"))
            self.eof_at_up.set()

        task = asyncio.ensure_future(reader())
        try:
            self.stage["upstream"] = "writing"
            await write_body(peer, self.down_data, "close", self.rng, spec.up_write)
            if spec.fin == "client_first":
                self.stage["upstream"] = "waiting for the client's FIN"
                await self.eof_at_up.wait()
            peer.shutdown_write()
            self.stage["upstream"] = "reading to EOF"
            await task
            self.stage["upstream"] = "done"
        finally:
            task.cancel()

    async def run(self) -> None:
        spec = self.spec
        self.client = client = await Peer.connect(self.proxy.port)  # type: ignore[union-attr]
        try:
            self.legs["up"].snd, self.legs["up"].snd_start = client, len(HANDSHAKE)
            await client.send(HANDSHAKE + self.up_data[: spec.early])
            head = await client.read_until(b"\r\n\r\n")
            assert head is not None and head.startswith(b"HTTP/1.1 101 "), head
            self.legs["down"].rcv, self.legs["down"].rcv_start = client, client.raw_pos

            async def reader() -> tuple[int, str]:
                got = await read_body(client, "close", 0, spec.client_read, lambda: self.check("down"))
                self.eof_at_client.set()
                return got

            task = asyncio.ensure_future(reader())
            try:
                self.stage["client"] = "writing"
                await write_body(client, self.up_data[spec.early :], "close", self.rng, spec.client_write)
                if spec.fin == "upstream_first":
                    self.stage["client"] = "waiting for the upstream's FIN"
                    await self.eof_at_client.wait()
                client.shutdown_write()
                self.stage["client"] = "reading to EOF"
                got = await task
                self.stage["client"] = "done"
            finally:
                task.cancel()
            assert got == (spec.down_size, sha(self.down_data)), "upstream → client bytes differ"
            await until(lambda: self.up_got is not None, 5, "the upstream to read the client's FIN")
            assert self.up_got == (spec.up_size, sha(self.up_data)), "client → upstream bytes differ"
            # Both directions ended: laneproxy closes the tunnel on its own (the client stays open).
            await until(lambda: not self.proxy.ctx.connections and self.proxy.ctx.tunnels == 0, 5,  # type: ignore[union-attr]
                        "laneproxy to close a tunnel whose both directions ended")
        finally:
            client.close()


async def run_tunnel(start_proxy, raw_upstreams, spec: TunnelSpec, seed: int) -> TunnelRun:
    run = TunnelRun(spec, seed)
    up = raw_upstreams(run.serve)
    run.proxy = proxy = await start_proxy(config(up.port))
    try:
        await asyncio.wait_for(run.run(), DEADLINE)
    except TimeoutError:
        raise AssertionError(f"seed {seed}: tunnel not done in {DEADLINE}s: {run.stage} {up.errors} {spec}") from None
    await assert_idle(proxy, [up])
    return run


@pytest.mark.parametrize("seed", range(1, 13))
async def test_random_tunnels(start_proxy, raw_upstreams, seed):
    await run_tunnel(start_proxy, raw_upstreams, random_tunnel(seed), seed)


@pytest.mark.parametrize("fin", ["client_first", "upstream_first"])
async def test_tunnel_bulk_both_ways_with_both_sides_stalling(start_proxy, raw_upstreams, fin):
    spec = TunnelSpec(
        BIG, BIG, early=1000, fin=fin,
        client_read=Pace("stall", pause=0.6, at=256 * KiB), up_read=Pace("stall", pause=0.6, at=256 * KiB),
    )
    run = await run_tunnel(start_proxy, raw_upstreams, spec, 99)
    assert stalled_checks(run, "up") and stalled_checks(run, "down"), run.checks


# -- timeouts: fire on a stall longer than them, with the documented outcome, and not before ----

T = 0.5  # the timeout under test
SHORT = 0.2  # a stall well shorter than T (repeated: the stalls add up to more than T)
LONG = 1.2  # a stall longer than T
PROGRESS = 3 * MiB  # read between two short stalls (see echo_length_upstream)


async def read_head(peer: Peer, timeout: float = 5.0) -> tuple[int, dict[bytes, list[bytes]]]:
    head = await asyncio.wait_for(peer.read_until(b"\r\n\r\n"), timeout)
    assert head is not None, "closed before a response head"
    line, headers = parse_head(head)
    return int(line.split(b" ")[1]), headers


async def read_to_end(peer: Peer, timeout: float = 5.0) -> int:
    """Drain until EOF or reset; the byte count."""
    n = 0
    while True:
        data = await asyncio.wait_for(peer.take(READ), timeout)
        if not data:
            return n
        n += len(data)


def echo_length_upstream(pace_gaps: tuple[float, ...] = ()):
    """Reads one request (CL body), answers 200 with the body length; `pace_gaps`: stalls while reading."""

    async def serve(peer: Peer) -> None:
        while True:
            head = await peer.read_until(b"\r\n\r\n")
            if head is None:
                return
            kind, length = framing_of(parse_head(head)[1], request=True)
            got, gaps = 0, list(pace_gaps)
            while got < length:
                # Between two stalls, enough is read for laneproxy to see progress: its kernel
                # send queue (autotuned to MiBs) wakes a writer only once a third of it is free.
                if gaps and got >= 64 * KiB + (len(pace_gaps) - len(gaps)) * PROGRESS:
                    await asyncio.sleep(gaps.pop(0))
                data = await peer.take(min(READ, length - got))
                if not data:
                    return
                got += len(data)
            body = b"%d" % got
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))

    return serve


async def post_in_pieces(client: Peer, total: int, gaps: tuple[float, ...]) -> None:
    """A POST whose body is sent in len(gaps) + 1 pieces with a pause of each gap between them."""
    await client.send(b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % total)
    pieces = len(gaps) + 1
    for i in range(pieces):
        if i:
            await asyncio.sleep(gaps[i - 1])
        n = total // pieces + (total % pieces if i == pieces - 1 else 0)
        for j in range(0, n, READ):
            await client.send(b"b" * min(READ, n - j))


@pytest.mark.parametrize("gaps, fires", [((LONG,), True), ((SHORT, SHORT, SHORT), False)])
async def test_body_timeout(start_proxy, raw_upstreams, gaps, fires):
    up = raw_upstreams(echo_length_upstream())
    proxy = await start_proxy(config(up.port, client_body_timeout=T))
    client = await Peer.connect(proxy.port)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    sender = asyncio.ensure_future(post_in_pieces(client, 3000, gaps))
    try:
        status, headers = await read_head(client)
        if fires:
            assert status == 408 and headers.get(b"connection") == [b"close"], (status, headers)
            assert T - 0.05 <= loop.time() - t0 < T + 1.0
            await read_to_end(client)
        else:
            assert status == 200
            assert await client.read_exactly(4) == b"3000"
    finally:
        sender.cancel()
        client.close()
    await assert_idle(proxy, [up])


async def test_body_timeout_does_not_run_while_the_upstream_takes_no_bytes(start_proxy, raw_upstreams):
    """The upstream stops reading for longer than the client's body_timeout: laneproxy stopped
    reading the client itself, so no 408 (interface: the lane's send_timeout bounds that)."""
    # The stall (2.5 s) is well past the body timeout (1 s), which is itself well past any pause
    # of the test's own sender on a loaded 2-core machine (0.3 s was seen under the full suite).
    up = raw_upstreams(echo_length_upstream(pace_gaps=(2.5,)))
    proxy = await start_proxy(config(up.port, client_body_timeout="1s", lane_send_timeout="5s"))
    client = await Peer.connect(proxy.port)
    sender = asyncio.ensure_future(post_in_pieces(client, BIG, ()))
    try:
        status, _ = await read_head(client)
        assert status == 200
        assert await client.read_exactly(len(b"%d" % BIG)) == b"%d" % BIG
        await sender
    finally:
        sender.cancel()
        client.close()
    await assert_idle(proxy, [up])


@pytest.mark.parametrize("gaps, fires", [((LONG,), True), ((SHORT, SHORT, SHORT), False)])
async def test_lane_send_timeout(start_proxy, raw_upstreams, gaps, fires):
    """The upstream takes no request bytes for longer than send_timeout: 504 (and the client
    connection closes: its body was not read to the end)."""
    up = raw_upstreams(echo_length_upstream(pace_gaps=gaps))
    proxy = await start_proxy(config(up.port, lane_send_timeout=T, client_body_timeout="5s"))
    client = await Peer.connect(proxy.port)
    sender = asyncio.ensure_future(post_in_pieces(client, BIG, ()))
    try:
        status, headers = await read_head(client, timeout=10)
        if fires:
            assert status == 504 and headers.get(b"connection") == [b"close"], (status, headers)
            await read_to_end(client)
        else:
            assert status == 200
            assert await client.read_exactly(len(b"%d" % BIG)) == b"%d" % BIG
            await sender
    finally:
        sender.cancel()
        client.close()
    await assert_idle(proxy, [up])


def trickle_upstream(gaps: tuple[float, ...], before_head: bool, size: int = 64 * KiB):
    """Answers with `size` bytes (CL) in len(gaps) + 1 pieces, pausing `gaps` between them
    (`before_head`: the first gap comes before the head)."""

    async def serve(peer: Peer) -> None:
        while await peer.read_until(b"\r\n\r\n") is not None:
            body, left = b"r" * size, list(gaps)
            if before_head:
                await asyncio.sleep(left.pop(0))
            step = -(-size // (len(left) + 1))
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (size, body[:step]))
            for i, gap in enumerate(left, 1):
                await asyncio.sleep(gap)  # the upstream's silence is what is under test
                await peer.send(body[i * step : (i + 1) * step])

    return serve


@pytest.mark.parametrize(
    "gaps, before_head, outcome",
    [((LONG,), True, "504"), ((SHORT, LONG), False, "abort"), ((SHORT, SHORT, SHORT), False, "ok")],
)
async def test_lane_read_timeout(start_proxy, raw_upstreams, gaps, before_head, outcome):
    """No upstream bytes for longer than read_timeout: 504 before the head, an abort after it
    (exchange.py rule 5: no fake end of body); gaps shorter than it, however many: no timeout."""
    up = raw_upstreams(trickle_upstream(gaps, before_head))
    proxy = await start_proxy(config(up.port, lane_read_timeout=T))
    client = await Peer.connect(proxy.port)
    try:
        await client.send(b"GET /t HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers = await read_head(client)
        if outcome == "504":
            assert status == 504
        else:
            assert status == 200 and headers[b"content-length"] == [b"%d" % (64 * KiB)]
            if outcome == "abort":
                got = await read_to_end(client)
                assert got < 64 * KiB, "the body was not cut short"
            else:
                assert await client.read_exactly(64 * KiB) == b"r" * (64 * KiB)
    finally:
        client.close()
    await assert_idle(proxy, [up])


def big_response_upstream(size: int = BIG):
    body = body_bytes(7, size)

    async def serve(peer: Peer) -> None:
        while await peer.read_until(b"\r\n\r\n") is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            for i in range(0, size, READ):
                await peer.send(body[i : i + READ])

    return serve, sha(body)


async def test_read_timeout_does_not_run_while_the_client_takes_no_bytes(start_proxy, raw_upstreams):
    """The client stops reading for longer than the lane's read_timeout: laneproxy stopped reading
    the upstream itself, so no timeout (the client's send_timeout bounds that)."""
    serve, digest = big_response_upstream()
    up = raw_upstreams(serve)
    # (1 s against a 2.5 s stall: margins past the test upstream's own pauses on a loaded machine)
    proxy = await start_proxy(config(up.port, lane_read_timeout="1s", client_send_timeout="5s"))
    client = await Peer.connect(proxy.port)
    try:
        await client.send(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _ = await read_head(client)
        assert status == 200
        got = await read_body(client, "cl", BIG, Pace("stall", pause=2.5, at=64 * KiB))
        assert got == (BIG, digest)
    finally:
        client.close()
    await assert_idle(proxy, [up])


@pytest.mark.parametrize("gaps, fires", [((LONG,), True), ((SHORT, SHORT, SHORT), False)])
async def test_client_send_timeout(start_proxy, raw_upstreams, gaps, fires):
    """The client takes no bytes for longer than send_timeout: laneproxy closes the connection
    (the response is cut short, the upstream connection dropped); shorter stalls: complete."""
    serve, digest = big_response_upstream()
    up = raw_upstreams(serve)
    proxy = await start_proxy(config(up.port, client_send_timeout=T, lane_read_timeout="5s"))
    client = await Peer.connect(proxy.port)
    try:
        await client.send(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _ = await read_head(client)
        assert status == 200
        h, got = hashlib.sha256(), 0
        stalls = list(gaps)
        while got < BIG:
            if stalls and got >= 64 * KiB + (len(gaps) - len(stalls)) * PROGRESS:
                await asyncio.sleep(stalls.pop(0))  # the stalled state is what is under test
            data = await asyncio.wait_for(client.take(READ), 5)
            if not data:
                break
            h.update(data)
            got += len(data)
        if fires:
            assert got < BIG, "the response was delivered whole despite a stall over send_timeout"
        else:
            assert (got, h.hexdigest()) == (BIG, digest)
    finally:
        client.close()
    await assert_idle(proxy, [up])
