"""Benchmark laneproxy against nginx (1 worker), HAProxy (1 thread) and a naive aiohttp proxy.

    python bench/run.py [--quick] [--scenarios small,large,...] [--proxies laneproxy,nginx,...]

Every proxy runs pinned to one core (`taskset -c 1`); wrk and the upstream (a separate nginx) share
the other (`taskset -c 0`). See bench/README.md for the method.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import http.client
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadgen import IdleConnections, WrkResult, lua_script, run_wrk, run_ws
from procfs import cpu_seconds, machine_busy_seconds, process_tree, rss_kib
from proxies import PROXIES, Proxy, bench_yaml, start_proxy, venv_python
from report import Row, markdown, write_json, write_png
from scenarios import ALIASES, IDLE_CONNECTIONS, SCENARIOS, STATIC_FILES, UPLOAD_SIZE, Scenario
from service import Service, ServiceError, free_port
from upstream import EXPECTED_LENGTH, SMALL_BODY, Upstream, start_upstream
from wsload import READY as WS_READY

BENCH_DIR = Path(__file__).resolve().parent
TOOLS = ("nginx", "haproxy", "wrk", "taskset")
INSTALL_HINT = "apt-get install -y nginx haproxy wrk"


@dataclass
class Upstreams:
    """What the proxies talk to: the upstream nginx (and its soak server), the WebSocket echo server
    (started only for the websocket scenario), and the try_files root with the static files."""

    main: Upstream
    static_root: Path
    ws: Service | None = None
    ws_port: int = 0

    def address(self, scenario: Scenario) -> str:
        if scenario.upstream == "soak":
            return self.main.soak_address
        if scenario.upstream == "ws":
            return f"127.0.0.1:{self.ws_port}"
        return self.main.address

    @property
    def pids(self) -> list[int]:
        return [self.main.service.pid] + ([self.ws.pid] if self.ws is not None else [])


def start_upstreams(tmp: Path, args: argparse.Namespace) -> Upstreams:
    main = start_upstream(tmp / "upstream", free_port(), args.load_core, tmp)
    check_upstream(main)
    root = tmp / "static"
    root.mkdir()
    for path, size in STATIC_FILES.items():
        (root / path.lstrip("/")).write_bytes(os.urandom(size))
    ups = Upstreams(main, root)
    if any(SCENARIOS[name].upstream == "ws" for name in args.scenarios):
        ups.ws_port = free_port()
        ups.ws = Service("ws-echo", [venv_python(), str(BENCH_DIR / "wsload.py"), "serve", "--port",
                                     str(ups.ws_port)], tmp, core=args.load_core)
        ups.ws.start("127.0.0.1", ups.ws_port, ready_marker=WS_READY)
    return ups


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s runs after 1 s warm-up (about 3 minutes)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma list of %(default)s (`static` = static4k,static1m)")
    parser.add_argument("--proxies", default=",".join(PROXIES), help="comma list of %(default)s")
    parser.add_argument("--duration", type=int, help="measured seconds per run (default 10; quick 2)")
    parser.add_argument("--warmup", type=int, help="warm-up seconds per run, 0 for none (default 2; quick 1)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of all runs, interleaved; the report keeps each median (default 1)")
    parser.add_argument("--proxy-core", type=int, default=1)
    parser.add_argument("--load-core", type=int, default=0, help="core of wrk and the upstream")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="default %(default)s")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = parser.parse_args(argv)
    args.scenarios = [n for s in args.scenarios.split(",") if s for n in ALIASES.get(s, (s,))]
    args.proxies = [p for p in args.proxies.split(",") if p]
    for name in args.scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    for name in args.proxies:
        if name not in PROXIES:
            parser.error(f"unknown proxy {name!r}; known: {', '.join(PROXIES)}")
    if args.duration is None:
        args.duration = 2 if args.quick else 10
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.duration < 1 or args.warmup < 0 or args.repeat < 1:
        parser.error("--duration >= 1, --warmup >= 0 (whole seconds, as wrk takes them), --repeat >= 1")
    cores = os.sched_getaffinity(0)
    if args.proxy_core == args.load_core or not {args.proxy_core, args.load_core} <= cores:
        parser.error(f"need two distinct usable cores; usable here: {sorted(cores)}")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- checks -----------------------------------------------------------------------------------------

def fetch(host: str, port: int, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("POST" if body is not None else "GET", path, body=body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def check_upstream(up: Upstream) -> None:
    """The upstream answers each path with the expected body; /chunked really is chunked."""
    for path, length in EXPECTED_LENGTH.items():
        body = b"a" * UPLOAD_SIZE if path == "/upload" else None
        status, headers, data = fetch("127.0.0.1", up.port, path, body)
        if status != 200 or len(data) != length:
            raise SystemExit(f"upstream {path}: status {status}, {len(data)} bytes (want 200, {length})")
        if path == "/chunked" and headers.get("transfer-encoding") != "chunked":
            raise SystemExit(f"upstream /chunked is not chunked: {headers}")
    status, _, data = fetch("127.0.0.1", up.soak_port, "/small")
    if status != 200 or data != SMALL_BODY:
        raise SystemExit(f"soak upstream /small: status {status}, {data!r}")


def preflight(proxy: Proxy, scenario: Scenario, args: argparse.Namespace) -> str | None:
    """One exchange through the proxy (a WebSocket echo for the websocket scenario); what is wrong, or None."""
    if scenario.kind == "websocket":
        try:
            result = run_ws(f"ws://{proxy.host}:{proxy.port}{scenario.path}", 1, 1, args.load_core)
        except (RuntimeError, subprocess.SubprocessError) as exc:
            return f"pre-flight WebSocket echo failed: {str(exc)[:200]}"
        return None if result.requests else f"pre-flight WebSocket echo: no echo ({result.raw})"
    body = b"a" * UPLOAD_SIZE if scenario.name == "upload" else None
    try:
        status, _, data = fetch(proxy.host, proxy.port, scenario.path, body)
    except (OSError, http.client.HTTPException) as exc:
        return f"pre-flight request failed: {exc!r}"
    want = STATIC_FILES.get(scenario.path) if scenario.try_files else None
    want = want or EXPECTED_LENGTH[scenario.path]
    if status != 200 or len(data) != want:
        return f"pre-flight {scenario.path}: status {status}, {len(data)} bytes (want 200, {want})"
    return None


# --- one measurement --------------------------------------------------------------------------------

async def idle_rss_per_conn(proxy: Proxy, path: str, count: int) -> tuple[float, int]:
    """(KiB of proxy RSS per idle keep-alive connection, connections actually held)."""
    before = rss_kib(proxy.pid)
    idle = IdleConnections(proxy.host, proxy.port, path, count)
    try:
        await idle.open()
        await asyncio.sleep(0.5)
        during = rss_kib(proxy.pid)
    finally:
        await idle.close()
    held = len(idle.writers) or (count - idle.failures)
    return (during - before) / max(1, held), held


class Accounting:
    """CPU seconds of the proxy during a run, and of everything on the machine that is not ours.

    Ours: the proxy's and the upstream's process trees, wrk (a waited-for child of this process),
    and this process. Anything else busy during the run (another job on the machine) shows up as
    "other CPU", the sign that a row was measured on a machine that was not quiet.
    """

    def __init__(self, proxy_pid: int, *upstream_pids: int) -> None:
        self.proxy_pid, self.upstream_pids = proxy_pid, upstream_pids
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float, float]:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        ours = children.ru_utime + children.ru_stime + me.ru_utime + me.ru_stime
        upstreams = sum(cpu_seconds(pid) for pid in self.upstream_pids)
        return cpu_seconds(self.proxy_pid), upstreams, ours, machine_busy_seconds()

    def done(self) -> tuple[float, float]:
        """(proxy CPU seconds, other CPU seconds) since construction."""
        end = self._sample()
        proxy, upstream, ours, busy = (b - a for a, b in zip(self.start, end, strict=True))
        return proxy, max(0.0, busy - proxy - upstream - ours)


def proxy_yaml(scenario: Scenario, ups: Upstreams, workdir: Path) -> Path:
    yaml_path = workdir / "laneproxy.yaml"
    yaml_path.write_text(bench_yaml(
        free_port(), ups.address(scenario), workers=scenario.workers,
        access_log=workdir / "access.log" if scenario.access_log else None,
        try_files_root=ups.static_root if scenario.try_files else None,
    ))
    return yaml_path


def run_load(scenario: Scenario, proxy: Proxy, script: Path, seconds: int, core: int) -> WrkResult:
    if scenario.kind == "websocket":
        return run_ws(f"ws://{proxy.host}:{proxy.port}{scenario.path}", scenario.connections, seconds, core)
    return run_wrk(f"http://{proxy.host}:{proxy.port}{scenario.path}", script, scenario.connections, seconds, core)


def measure(scenario: Scenario, name: str, args: argparse.Namespace, ups: Upstreams, tmp: Path) -> Row:
    if scenario.proxies is not None and name not in scenario.proxies:
        return Row(scenario.name, name, error=f"skipped: {name} {scenario.skip_why}")
    workdir = tmp / f"{scenario.name}-{name}"
    workdir.mkdir(parents=True)
    yaml_path = proxy_yaml(scenario, ups, workdir)
    script = workdir / "wrk.lua"
    script.write_text(lua_script(scenario.lua))
    try:
        proxy = start_proxy(name, workdir, yaml_path, args.proxy_core, websocket=scenario.kind == "websocket")
    except (ServiceError, OSError, ValueError) as exc:
        log(f"  {name}: could not start: {exc}")
        if scenario.workers > 1 and name == "laneproxy":
            return Row(scenario.name, name, error=f"skipped: `workers: {scenario.workers}` does not start yet")
        return Row(scenario.name, name, error="did not start (log in the logs/ folder of the results)")
    duration = args.duration
    if scenario.duration is not None:
        duration = scenario.duration[1 if args.quick else 0]
    try:
        if scenario.workers > 1 and name == "laneproxy" and len(process_tree(proxy.pid)) < scenario.workers:
            why = f"skipped: `workers: {scenario.workers}` runs one process (not implemented yet)"
            log(f"  {name}: {why}")
            return Row(scenario.name, name, error=why)
        problem = preflight(proxy, scenario, args)
        if problem:
            log(f"  {name}: {problem}")
            return Row(scenario.name, name, error=problem)
        rss, held = None, None
        if scenario.idle_rss:  # before the warm-up, so that its pools are not already grown
            rss, held = asyncio.run(idle_rss_per_conn(proxy, "/small", IDLE_CONNECTIONS))
        if args.warmup > 0 and scenario.warmup:
            run_load(scenario, proxy, script, args.warmup, args.load_core)
        procs = process_tree(proxy.pid)
        per_process = {pid: cpu_seconds(pid, tree=False) for pid in procs}
        ours = Accounting(proxy.pid, *ups.pids)
        result = run_load(scenario, proxy, script, duration, args.load_core)
        cpu_s, other_s = ours.done()
        per_process = {pid: round(cpu_seconds(pid, tree=False) - cpu, 2) for pid, cpu in per_process.items()}
        if not proxy.service.alive():
            return Row(scenario.name, name, error="proxy died during the run")
        return Row(
            scenario.name, name, requests=result.requests, duration_s=result.duration_s,
            bytes=result.bytes, cpu_s=cpu_s, other_cpu_s=other_s, p50_ms=result.p50_ms, p99_ms=result.p99_ms,
            non_2xx=result.non_2xx, socket_errors=result.socket_errors, rss_per_conn_kib=rss,
            idle_held=held, extra={"wrk": result.raw, "idle_wanted": IDLE_CONNECTIONS,
                                   "cpu_s_per_process": list(per_process.values())},
        )
    except (RuntimeError, subprocess.SubprocessError) as exc:
        log(f"  {name}: {exc}")
        return Row(scenario.name, name, error=str(exc).splitlines()[0][:120])
    finally:
        proxy.service.stop()


# --- the run ----------------------------------------------------------------------------------------

def machine_meta(args: argparse.Namespace, argv: list[str], script: str = "bench/run.py") -> dict[str, Any]:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break

    def version(cmd: list[str]) -> str:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return "?"
        return (proc.stdout + proc.stderr).strip().splitlines()[0] if (proc.stdout + proc.stderr) else "?"

    rev = version(["git", "-C", str(BENCH_DIR.parent), "describe", "--always", "--dirty"])
    return {
        "command": shlex.join(["python", script, *argv]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "versions": "; ".join([
            version(["nginx", "-v"]), version(["haproxy", "-v"]).split(" - ")[0], version(["wrk", "-v"]),
            f"Python {platform.python_version()}", f"laneproxy git {rev}",
        ]),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
        "repeat": args.repeat,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "proxy_core": args.proxy_core,
        "load_core": args.load_core,
        "scenarios": {name: SCENARIOS[name].about for name in args.scenarios},
    }


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def medians(all_rows: list[Row]) -> list[Row]:
    """Per (scenario, proxy), the run with the median requests per proxy-CPU-second."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in all_rows:
        groups.setdefault((row.scenario, row.proxy), []).append(row)
    picked = []
    for group in groups.values():
        measured = sorted((r for r in group if not r.error), key=lambda r: r.req_per_cpu)
        if not measured:
            picked.append(group[0])
            continue
        row = measured[(len(measured) - 1) // 2]
        row.extra["runs"] = len(group)
        row.extra["failed_runs"] = len(group) - len(measured)
        row.extra["req_per_cpu_s_all"] = [round(r.req_per_cpu) for r in measured]
        row.extra["req_per_cpu_s_rounds"] = [None if r.error else round(r.req_per_cpu) for r in group]
        picked.append(row)
    return picked


def save_artifacts(tmp: Path, dest: Path) -> None:
    """Keep one copy of each generated config, and every server's log, next to the results."""
    (dest / "configs").mkdir(parents=True, exist_ok=True)
    for pattern, name in (
        ("round1/*-laneproxy/laneproxy.yaml", "laneproxy.yaml"),
        ("round1/*-nginx/nginx.conf", "nginx-proxy.conf"),
        ("round1/*-haproxy/haproxy.cfg", "haproxy.cfg"),
        ("upstream/nginx.conf", "upstream-nginx.conf"),
    ):
        found = sorted(tmp.glob(pattern))
        if found:
            shutil.copy(found[0], dest / "configs" / name)
    (dest / "logs").mkdir(exist_ok=True)
    for path in tmp.rglob("*.log"):
        if path.stat().st_size and path.name != "access.log":  # the accesslog scenario's: megabytes
            shutil.copy(path, dest / "logs" / "-".join(path.relative_to(tmp).parts))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        print(f"missing: {', '.join(missing)}; install them with:\n    {INSTALL_HINT}", file=sys.stderr)
        return 2
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))  # children inherit it
    os.sched_setaffinity(0, {args.load_core})  # the harness and its idle-connection client
    signal.signal(signal.SIGTERM, _interrupt)  # so that `finally` stops every server on SIGTERM too
    meta = machine_meta(args, argv)
    out = args.out / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="laneproxy-bench-"))
    all_rows: list[Row] = []
    ups: Upstreams | None = None
    started = time.monotonic()
    try:
        ups = start_upstreams(tmp, args)
        for round_no in range(1, args.repeat + 1):
            for scenario_name in args.scenarios:
                scenario = SCENARIOS[scenario_name]
                log(f"{scenario.name}: {scenario.about}" + (f" (round {round_no})" if args.repeat > 1 else ""))
                for name in args.proxies:
                    row = measure(scenario, name, args, ups, tmp / f"round{round_no}")
                    if not row.error:
                        log(f"  {name:9} {row.rps:>10,.0f} req/s  {row.req_per_cpu:>10,.0f} req/CPU-s  "
                            f"p99 {row.p99_ms:.2f} ms  errors {row.non_2xx}+{row.socket_errors}")
                    all_rows.append(row)
    except KeyboardInterrupt:
        log("interrupted; reporting what was measured")
        meta["interrupted"] = True
    finally:
        if ups is not None:
            ups.main.service.stop()
            if ups.ws is not None:
                ups.ws.stop()
        save_artifacts(tmp, out)
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    rows = medians(all_rows)
    report = markdown(rows, meta)
    print(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(report)
    write_json(rows, all_rows, meta, out / "results.json")
    skipped = write_png(rows, out / "results.png")
    log(f"wrote {out}/results.md, results.json" + ("" if skipped else ", results.png"))
    if skipped:
        log(skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
