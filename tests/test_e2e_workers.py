"""workers: N (issues 3 and 9): a supervisor, SO_REUSEPORT workers, replacement, signals."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import exchange, make_config
from tests.process import spawn_proxy, stop_proxy

GET = b"GET /%s HTTP/1.1\r\nHost: t\r\n\r\n"
pytestmark = pytest.mark.timeout(60)


def free_port() -> str:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return sorted(int(x) for x in text.split())


def read_syscalls(pid: int) -> int:
    """read(2)-family calls so far: a fine-grained sign that the process served traffic."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscr:"):
            return int(line.split()[1])
    raise AssertionError("no syscr")


async def wait_children(pid: int, n: int, exclude: set[int] = frozenset()) -> list[int]:
    for _ in range(200):
        kids = [k for k in children(pid) if k not in exclude]
        if len(kids) == n:
            return kids
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {n} workers, have {children(pid)}")


async def test_workers_share_the_port_and_are_replaced(tmp_path, upstream):
    up = await upstream()
    proc, port = await spawn_proxy(tmp_path, make_config(up.port, workers=2, listen=free_port()))
    try:
        workers = await wait_children(proc.pid, 2)
        log = tmp_path / "proxy.log"
        for _ in range(100):  # both workers bound the listener
            if log.read_text().count("listening on") == 2:
                break
            await asyncio.sleep(0.05)
        before = {pid: read_syscalls(pid) for pid in workers}
        results = await asyncio.gather(*(exchange(port, GET % b"n%d" % i) for i in range(300)))
        assert [r[0] for r in results] == [200] * 300
        used = {pid: read_syscalls(pid) - before[pid] for pid in workers}
        assert all(n > 50 for n in used.values()), used  # the kernel spread the connections
        os.kill(workers[1], signal.SIGKILL)
        replaced = await wait_children(proc.pid, 2, exclude={workers[1]})
        assert workers[1] not in replaced and workers[0] in replaced
        results = await asyncio.gather(*(exchange(port, GET % b"after%d" % i) for i in range(50)))
        assert [r[0] for r in results] == [200] * 50
    finally:
        assert await stop_proxy(proc) == 0
    assert "exited with -9; replacing it" in (tmp_path / "proxy.log").read_text()


async def test_invalid_sighup_is_reported_and_workers_keep_serving(tmp_path, upstream):
    up = await upstream()
    proc, port = await spawn_proxy(tmp_path, make_config(up.port, workers=2, listen=free_port()))
    try:
        workers = await wait_children(proc.pid, 2)
        (tmp_path / "laneproxy.yaml").write_text("version: 1\nlanes: {}\nroutes: []\n")
        proc.send_signal(signal.SIGHUP)
        log = tmp_path / "proxy.log"
        for _ in range(100):
            if "reload refused" in log.read_text():
                break
            await asyncio.sleep(0.05)
        assert "lanes: must not be empty" in log.read_text()
        assert (await exchange(port, GET % b"still"))[0] == 200
        assert children(proc.pid) == workers
    finally:
        assert await stop_proxy(proc) == 0


def test_port_0_needs_one_worker():
    from laneproxy.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as exc:
        parse_config('version: 1\nworkers: 2\nlisten: "127.0.0.1:0"\nlanes: {a: {servers: [x:1]}}\n'
                     "routes: [{prefix: /, lane: a}]\n")
    assert exc.value.problems == ["listen: port 0 (any free port) needs workers: 1; each worker would get its own"]


def test_limits_are_shared_between_workers():
    from laneproxy.config import parse_config
    from laneproxy.supervisor import share_limits

    cfg = parse_config(
        "version: 1\nworkers: 3\nlanes: {a: {servers: [x:1], limit: 8, queue: 100}, b: {servers: [x:2]}}\n"
        "routes: [{prefix: /, lane: a}]\n"
    )
    shared = share_limits(cfg)
    assert (shared.lanes["a"].limit, shared.lanes["a"].queue) == (3, 34)  # ceil(8/3), ceil(100/3)
    assert (shared.lanes["b"].limit, shared.lanes["b"].queue) == (0, 0)  # unlimited stays unlimited
