"""Isolation between lanes: a flood on the slow lane against the fast lane's latency, and what reaches the pool.

    python bench/isolation.py [--quick] [--proxies laneproxy,nginx,nginx-maxconns,haproxy]

The seed page's layout: `/tast` -> a slow pool of 8 processes serving one request at a time, 200 ms
each (`bench/slowpool.py`, capacity 40 req/s); `/` -> a fast upstream (the upstream nginx's
`return 200` on `/small`, `bench/upstream.py`). Per proxy, in order:

1. fast lane alone: `/small` at a fixed arrival rate (open loop, 500 req/s) for D seconds;
2. the same while 200 clients flood `/tast` (request, read, repeat; abandoned after 3 s; after a
   503 with Retry-After a client waits that long first, as urllib3's retries do, unless
   `--flood-ignores-retry-after`), after a 2 s ramp; then the pool gets up to 10 s to finish what
   it still holds, and is restarted;
3. 3x overload: `/tast` at a fixed 120 req/s for 2 + D seconds, each request abandoned after 3 s;
   goodput = answers within that deadline, completed in the last D seconds, per second of capacity.

Proxy on core 1; everything else on core 0, where the fast-lane generator and the fast upstream run
at real-time priority (SCHED_FIFO) so that the flood clients' CPU cannot delay them: a slower fast
lane is then the proxy's doing. The proxies: laneproxy (`limit: 8`, `queue: 6`,
`queue_timeout: 2s`), nginx with the seed page's config (upstream blocks with `keepalive`, no cap),
nginx with `max_conns=8` on the slow server, HAProxy with `maxconn 8 maxqueue 6` and
`timeout queue 2s`. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isolation_report import Plan, analyze, markdown, write_png
from procfs import process_tree
from proxies import start_proxy, venv_python
from run import Accounting, machine_meta
from service import Service, ServiceError, free_port
from slowpool import READY as POOL_READY
from upstream import Upstream, start_upstream

BENCH_DIR = Path(__file__).resolve().parent
PROXIES = ("laneproxy", "nginx", "nginx-maxconns", "haproxy")
TOOLS = ("nginx", "haproxy", "taskset")


def isolation_yaml(port: int, fast: str, slow: str, plan: Plan) -> str:
    """Two lanes: `/tast` -> the slow pool with limit/queue/queue_timeout, `/` -> the fast upstream."""
    return f"""\
version: 1
listen: "127.0.0.1:{port}"
access_log: off
client:
  keepalive_timeout: 75s
  keepalive_requests: 1000000
  max_connections: 4096
lanes:
  fast:
    servers: ["{fast}"]
    keepalive: 10240
    keepalive_requests: 1000000
  slow:
    servers: ["{slow}"]
    keepalive: 10240
    keepalive_requests: 1000000
    limit: {plan.limit}
    queue: {plan.queue}
    queue_timeout: {plan.queue_timeout_s:g}s
routes:
  - prefix: /tast
    lane: slow
  - prefix: /
    lane: fast
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 s phases instead of 8 (about 2 minutes)")
    parser.add_argument("--duration", type=float, help="seconds per measured phase (default 8; quick 4)")
    parser.add_argument("--proxies", default=",".join(PROXIES), help="comma list of %(default)s")
    parser.add_argument("--rate", type=float, default=500.0, help="fast-lane arrivals per second")
    parser.add_argument("--clients", type=int, default=200, help="flood clients on /tast")
    parser.add_argument("--flood-ignores-retry-after", action="store_true",
                        help="flood clients loop at once after a 503 too (default: they wait its Retry-After)")
    parser.add_argument("--proxy-core", type=int, default=1)
    parser.add_argument("--load-core", type=int, default=0)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="default %(default)s")
    parser.add_argument("--keep-tmp", action="store_true")
    args = parser.parse_args(argv)
    args.proxies = [p for p in args.proxies.split(",") if p]
    for name in args.proxies:
        if name not in PROXIES:
            parser.error(f"unknown proxy {name!r}; known: {', '.join(PROXIES)}")
    if args.duration is None:
        args.duration = 4.0 if args.quick else 8.0
    if args.proxy_core == args.load_core or not {args.proxy_core, args.load_core} <= os.sched_getaffinity(0):
        parser.error(f"need two distinct usable cores; usable here: {sorted(os.sched_getaffinity(0))}")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Pool:
    service: Service
    log_dir: Path

    def held_now(self) -> int:
        """The pool's latest `held` sample (running + waiting inside it)."""
        try:
            lines = (self.log_dir / "held.tsv").read_text().splitlines()
        except FileNotFoundError:
            return 0
        last = next((ln for ln in reversed(lines) if ln.count("\t") == 2), None)
        return int(last.split("\t")[1]) if last else 0

    def drain(self, limit_s: float) -> tuple[float, int]:
        """Wait until the pool holds nothing (two samples 0.2 s apart); (seconds waited, still held)."""
        start = time.monotonic()
        quiet = 0
        while time.monotonic() - start < limit_s:
            quiet = quiet + 1 if self.held_now() == 0 else 0
            if quiet >= 2:
                return time.monotonic() - start, 0
            time.sleep(0.2)
        return time.monotonic() - start, self.held_now()


def start_pool(log_dir: Path, port: int, plan: Plan, core: int) -> Pool:
    log_dir.mkdir(parents=True)
    argv = [
        venv_python(), str(BENCH_DIR / "slowpool.py"), "--port", str(port), "--workers", str(plan.workers),
        "--ms", str(plan.sleep_ms), "--log-dir", str(log_dir),
    ]
    service = Service(f"slowpool-{log_dir.name}", argv, log_dir, core=core)
    service.start("127.0.0.1", port, ready_marker=POOL_READY)
    return Pool(service, log_dir)


def client_argv(mode: str, port: int, path: str, duration: float, tag: str, out: Path, core: int,
                **options: Any) -> list[str]:
    argv = ["taskset", "-c", str(core), venv_python(), str(BENCH_DIR / "openloop.py"), mode,
            "--port", str(port), "--path", path, "--duration", f"{duration:g}", "--tag", tag, "--out", str(out)]
    for key, value in options.items():
        if value is True:
            argv.append(f"--{key.replace('_', '-')}")
        elif value is not None and value is not False:
            argv += [f"--{key}", str(value)]
    return argv


def run_client(argv: list[str], budget: float) -> dict[str, Any]:
    out = Path(argv[argv.index("--out") + 1])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=budget)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"client failed ({proc.returncode}): {proc.stderr[-600:]}")
    if proc.stderr.strip():
        log("  " + proc.stderr.strip().splitlines()[-1])
    return json.loads(out.read_text())


def realtime(pid: int) -> None:
    """SCHED_FIFO for a process tree (the fast upstream), so that load on its core cannot delay it."""
    for each in process_tree(pid):
        try:
            os.sched_setscheduler(each, os.SCHED_FIFO, os.sched_param(50))
        except OSError as exc:
            log(f"no real-time priority for pid {each}: {exc}")


def preflight(port: int) -> str | None:
    for path in ("/small", "/tast/sleep?ms=1"):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", path)
            status = conn.getresponse().status
            conn.close()
        except (OSError, http.client.HTTPException) as exc:
            return f"pre-flight {path}: {exc!r}"
        if status != 200:
            return f"pre-flight {path}: status {status}"
    return None


def measure(name: str, args: argparse.Namespace, plan: Plan, fast: Upstream, tmp: Path) -> dict[str, Any]:
    workdir = tmp / name
    workdir.mkdir()
    slow_port = free_port()
    yaml_path = workdir / "laneproxy.yaml"
    yaml_path.write_text(isolation_yaml(free_port(), fast.address, f"127.0.0.1:{slow_port}", plan))
    pools: list[Pool] = [start_pool(workdir / "pool-flood", slow_port, plan, args.load_core)]
    raw: dict[str, Any] = {"proxy": name}
    flood: subprocess.Popen[str] | None = None
    try:
        proxy = start_proxy(name.split("-")[0], workdir, yaml_path, args.proxy_core,
                            max_conns=name == "nginx-maxconns")
    except (ServiceError, OSError, ValueError) as exc:
        pools[0].service.stop()
        return {"proxy": name, "error": f"did not start: {str(exc).splitlines()[0][:160]}"}
    d, core, port = args.duration, args.load_core, proxy.port
    budget = d + plan.ramp_s + plan.client_timeout_s + 60
    try:
        problem = preflight(port)
        if problem:
            return {"proxy": name, "error": problem}
        fast_opts = {"rate": args.rate, "timeout": plan.client_timeout_s, "realtime": True}
        log("  warm-up, then the fast lane alone")
        run_client(client_argv("open", port, "/small", 2, "w", workdir / "warm.json", core, **fast_opts), budget)
        ours, t0 = Accounting(proxy.pid, fast.service.pid, pools[0].service.pid), time.monotonic()
        raw["alone"] = run_client(client_argv("open", port, "/small", d, "a", workdir / "alone.json", core,
                                              **fast_opts), budget)
        raw["other_cpu_alone_pct"] = 100 * ours.done()[1] / (time.monotonic() - t0)
        log(f"  flood: {args.clients} clients on /tast, the fast lane again after {plan.ramp_s:g} s")
        flood_out = workdir / "flood.json"
        flood = subprocess.Popen(
            client_argv("flood", port, "/tast/sleep", plan.ramp_s + d + 0.5, "f", flood_out, core,
                        clients=args.clients, timeout=plan.client_timeout_s,
                        ignore_retry_after=args.flood_ignores_retry_after),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        ours, t0 = Accounting(proxy.pid, fast.service.pid, pools[0].service.pid), time.monotonic()
        raw["flood_t0"] = t0
        time.sleep(plan.ramp_s)
        raw["under"] = run_client(client_argv("open", port, "/small", d, "u", workdir / "under.json", core,
                                              **fast_opts), budget)
        _, err = flood.communicate(timeout=budget)
        cpu_s, other_s = ours.done()
        raw["proxy_cpu_flood_pct"] = 100 * cpu_s / (time.monotonic() - t0)
        raw["other_cpu_flood_pct"] = 100 * other_s / (time.monotonic() - t0)
        if flood.returncode != 0:
            raise RuntimeError(f"flood client failed: {err[-600:]}")
        raw["flood"] = json.loads(flood_out.read_text())
        raw["flood_drain_s"], raw["flood_held_at_cut"] = pools[0].drain(plan.drain_s)
        pools[0].service.stop()
        log(f"  {plan.overload:g}x overload: /tast at {plan.overload * plan.capacity:g} req/s")
        pools.append(start_pool(workdir / "pool-overload", slow_port, plan, args.load_core))
        raw["overload"] = run_client(
            client_argv("open", port, "/tast/sleep", plan.ramp_s + d, "o", workdir / "overload.json", core,
                        rate=plan.overload * plan.capacity, timeout=plan.client_timeout_s), budget)
        raw["overload_drain_s"], raw["overload_held_at_cut"] = pools[1].drain(plan.drain_s)
        if not proxy.service.alive():
            return {"proxy": name, "error": "proxy died during the run"}
    except (RuntimeError, subprocess.SubprocessError, OSError, ServiceError) as exc:
        log(f"  {name}: {exc}")
        return {"proxy": name, "error": str(exc).splitlines()[0][:160]}
    finally:
        if flood is not None and flood.poll() is None:
            flood.kill()
            flood.wait()
        proxy.service.stop()
        for pool in pools:
            pool.service.stop()
    return analyze(raw, workdir / "pool-flood", workdir / "pool-overload", plan, d)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        print(f"missing: {', '.join(missing)}; install them with:\n    apt-get install -y nginx haproxy",
              file=sys.stderr)
        return 2
    args = parse_args(argv)
    plan = Plan()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    os.sched_setaffinity(0, {args.load_core})
    signal.signal(signal.SIGTERM, _interrupt)
    meta = machine_meta(argparse.Namespace(repeat=1, duration=args.duration, warmup=2, proxy_core=args.proxy_core,
                                           load_core=args.load_core, scenarios=[]), argv, "bench/isolation.py")
    out = args.out / ("isolation-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    tmp = Path(tempfile.mkdtemp(prefix="laneproxy-isolation-"))
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    upstream = None
    try:
        upstream = start_upstream(tmp / "upstream", free_port(), args.load_core, tmp)
        realtime(upstream.service.pid)
        for name in args.proxies:
            log(f"{name}:")
            results.append(measure(name, args, plan, upstream, tmp))
    except KeyboardInterrupt:
        log("interrupted: reporting what was measured")
        meta["interrupted"] = True
    finally:
        if upstream is not None:
            upstream.service.stop()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    report = markdown(results, meta, plan, args)
    print(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    skipped = write_png(results, plan, out / "isolation.png")
    log(f"wrote {out}/results.md, results.json" + ("" if skipped else ", isolation.png"))
    if skipped:
        log(skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
