"""laneproxy as its own process, for tests that measure it from /proc or send it signals."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from pathlib import Path

import yaml


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def spawn_proxy(tmp_path: Path, cfg: dict) -> tuple[subprocess.Popen, int]:
    path = tmp_path / "laneproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "proxy.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "laneproxy", "run", "-c", str(path)], stderr=err)
    for _ in range(300):  # bounded: 15 s
        m = re.search(r"listening on http://[^:]+:(\d+)", log.read_text())
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited {proc.returncode}: {log.read_text()}")
        await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError("proxy did not start")


async def stop_proxy(proc: subprocess.Popen) -> int:
    """SIGTERM, then wait without blocking the loop (the test's own upstreams live in it)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(asyncio.to_thread(proc.wait), 15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
