"""Turn measured rows into a markdown report, a JSON file and a PNG chart."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BASELINE = "nginx"
COLORS = {"laneproxy": "tab:blue", "nginx": "tab:green", "haproxy": "tab:orange", "aiohttp": "tab:red"}


@dataclass
class Row:
    scenario: str
    proxy: str
    error: str | None = None  # set when the proxy could not be measured in this scenario
    requests: int = 0
    duration_s: float = 0.0
    bytes: int = 0
    cpu_s: float = 0.0  # proxy CPU seconds (utime + stime over its process tree) during the run
    other_cpu_s: float = 0.0  # CPU seconds of processes that are not part of the benchmark
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    non_2xx: int = 0
    socket_errors: int = 0
    rss_per_conn_kib: float | None = None
    idle_held: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def mbps(self) -> float:
        return self.bytes / 1e6 / self.duration_s if self.duration_s else 0.0

    @property
    def req_per_cpu(self) -> float:
        return self.requests / self.cpu_s if self.cpu_s else 0.0

    @property
    def mb_per_cpu(self) -> float:
        return self.bytes / 1e6 / self.cpu_s if self.cpu_s else 0.0

    @property
    def cpu_pct(self) -> float:
        return 100 * self.cpu_s / self.duration_s if self.duration_s else 0.0

    @property
    def other_cpu_pct(self) -> float:
        return 100 * self.other_cpu_s / self.duration_s if self.duration_s else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(rps=self.rps, mbps=self.mbps, req_per_cpu_s=self.req_per_cpu,
                    mb_per_cpu_s=self.mb_per_cpu, cpu_pct=self.cpu_pct,
                    other_cpu_pct=self.other_cpu_pct)
        return data


def _num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _ratio(num: float, den: float) -> str:
    return f"{num / den:.2f}" if den else "n/a"


def results_table(rows: list[Row]) -> str:
    head = (
        "| scenario | proxy | req/s | MB/s | req per CPU-s | MB per CPU-s | proxy CPU % | other CPU % "
        "| p50 ms | p99 ms | non-2xx | socket errors | RSS KiB/conn |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        if r.error:
            text = r.error if r.error.startswith("skipped:") else f"failed: {r.error}"
            lines.append(f"| {r.scenario} | {r.proxy} | {text} |" + " |" * 10)
            continue
        rss = "" if r.rss_per_conn_kib is None else f"{r.rss_per_conn_kib:.2f}"
        if r.idle_held is not None and r.idle_held < r.extra.get("idle_wanted", r.idle_held):
            rss += f" ({r.idle_held} held)"
        lines.append(
            f"| {r.scenario} | {r.proxy} | {_num(r.rps)} | {_num(r.mbps, 1)} | {_num(r.req_per_cpu)} "
            f"| {_num(r.mb_per_cpu, 1)} | {r.cpu_pct:.0f} | {r.other_cpu_pct:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
            f"| {r.non_2xx} | {r.socket_errors} | {rss} |"
        )
    return "\n".join(lines)


def ratio_rows(rows: list[Row]) -> list[dict[str, Any]]:
    """Each proxy against nginx in the same scenario (same run): >1 means more than nginx."""
    base = {r.scenario: r for r in rows if r.proxy == BASELINE and not r.error}
    out = []
    for r in rows:
        b = base.get(r.scenario)
        if r.proxy == BASELINE or r.error or b is None:
            continue
        out.append({
            "scenario": r.scenario,
            "proxy": r.proxy,
            "throughput": r.rps / b.rps if b.rps else None,
            "per_cpu": r.req_per_cpu / b.req_per_cpu if b.req_per_cpu else None,
            "p99": r.p99_ms / b.p99_ms if b.p99_ms else None,
            "rss_per_conn": (
                r.rss_per_conn_kib / b.rss_per_conn_kib
                if r.rss_per_conn_kib is not None and b.rss_per_conn_kib else None
            ),
        })
    return out


def ratio_table(rows: list[Row]) -> str:
    ratios = ratio_rows(rows)
    if not ratios:
        return "_no ratios: nginx or the other proxies were not measured_"

    def fmt(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    lines = [
        "| scenario | proxy / nginx | throughput | per proxy-CPU-s | p99 latency | RSS per conn |",
        "|---|---|---|---|---|---|",
    ]
    for q in ratios:
        lines.append(
            f"| {q['scenario']} | {q['proxy']} | {fmt(q['throughput'])} | {fmt(q['per_cpu'])} "
            f"| {fmt(q['p99'])} | {fmt(q['rss_per_conn'])} |"
        )
    return "\n".join(lines)


def _pair(rows: list[Row], proxy: str, base: str, other: str) -> tuple[Row, Row] | None:
    found = {r.scenario: r for r in rows if r.proxy == proxy and not r.error and r.scenario in (base, other)}
    return (found[base], found[other]) if len(found) == 2 else None


def derived_table(rows: list[Row]) -> str:
    """Figures that compare two scenarios of one proxy, and the soak verdict."""
    lines = []
    proxies = list(dict.fromkeys(r.proxy for r in rows))
    compare = (
        ("tryfiles_miss", "try_files miss (the file check before proxying)"),
        ("accesslog", "access log on (target: within 10 %, i.e. ≥ 0.90)"),
        ("workers", "workers 2, on the same single core"),
    )
    for scenario, what in compare:
        for proxy in proxies:
            pair = _pair(rows, proxy, "small", scenario)
            if pair is None:
                continue
            base, other = pair
            note = ""
            if scenario == "workers":
                note = f"; CPU s per process {other.extra.get('cpu_s_per_process')}"
            lines.append(
                f"| {what} | {proxy} | {_num(base.req_per_cpu)} → {_num(other.req_per_cpu)} "
                f"| {_ratio(other.req_per_cpu, base.req_per_cpu)} | {_ratio(other.rps, base.rps)} "
                f"| {base.p99_ms:.2f} → {other.p99_ms:.2f}{note} |"
            )
    for r in rows:
        if r.scenario == "soak" and not r.error:
            errors = r.non_2xx + r.socket_errors
            lines.append(
                f"| soak: upstream closes idle keep-alive after 2 s | {r.proxy} | {r.requests:,} requests "
                f"| {'zero errors' if errors == 0 else f'**{errors} errors**'} | | p99 {r.p99_ms:.2f} |"
            )
    if not lines:
        return ""
    head = [
        "| against `small` (same proxy, same run) | proxy | req per CPU-s: small → this | per CPU-s ratio "
        "| req/s ratio | p99 ms: small → this |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(head + lines)


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = [
        f"Command: `{meta['command']}`",
        f"Date: {meta['date']}",
        f"Machine: {meta['nproc']} CPUs, {meta['cpu_model']}, Linux {meta['kernel']}",
        f"Versions: {meta['versions']}",
        f"Each run: {meta['warmup_s']:g} s warm-up, then {meta['duration_s']:g} s measured with "
        f"`wrk -t1`; proxy on core {meta['proxy_core']}, wrk and the upstream nginx on core "
        f"{meta['load_core']}." + (
            f" {meta['repeat']} interleaved rounds; each row is the round with the median "
            "req per CPU-s." if meta["repeat"] > 1 else ""
        ),
        f"Load average before / after: {' '.join(meta['loadavg_start'])} / {' '.join(meta['loadavg_end'])}; "
        f"total time {meta['elapsed_s']:g} s." + (" **Interrupted: incomplete.**" if meta.get("interrupted") else ""),
        "",
        results_table(rows),
        "",
        "Ratios to nginx in the same run (throughput and per-CPU-second: higher is better; "
        "p99 and RSS: lower is better):",
        "",
        ratio_table(rows),
        "",
    ]
    paired = paired_table(rows)
    if paired:
        lines += [paired, ""]
    derived = derived_table(rows)
    if derived:
        lines += [derived, ""]
    return "\n".join(lines)


def paired_table(rows: list[Row]) -> str:
    """Per-CPU-second ratio to nginx round by round (each round runs the proxies back to back, so
    the machine's drift between rounds cancels): the median and the range of the rounds."""
    by_key = {(r.scenario, r.proxy): r for r in rows}
    out = []
    for row in rows:
        base = by_key.get((row.scenario, "nginx"))
        if row.proxy == "nginx" or base is None:
            continue
        mine = row.extra.get("req_per_cpu_s_rounds") or []
        theirs = base.extra.get("req_per_cpu_s_rounds") or []
        ratios = sorted(a / b for a, b in zip(mine, theirs) if a and b)
        if len(ratios) < 2:
            continue
        median = statistics.median(ratios)
        out.append(f"| {row.scenario} | {row.proxy} | {median:.2f} | {ratios[0]:.2f}–{ratios[-1]:.2f} | "
                   + ", ".join(f"{r:.2f}" for r in ratios) + " |")
    if not out:
        return ""
    return "\n".join([
        "Per-CPU-second ratio to nginx round by round (the rounds' median; the table above divides "
        "each proxy's own median round instead):",
        "",
        "| scenario | proxy / nginx | median of rounds | range | rounds (sorted) |",
        "|---|---|---|---|---|",
        *out,
    ])


def write_json(rows: list[Row], all_rows: list[Row], meta: dict[str, Any], path: Path) -> None:
    data = {
        "meta": meta,
        "rows": [r.to_json() for r in rows],
        "ratios_to_nginx": ratio_rows(rows),
        "all_runs": [r.to_json() for r in all_rows],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_png(rows: list[Row], path: Path) -> str | None:
    """Render the chart; returns None when done, else the reason it was skipped."""
    if not any(not r.error for r in rows):
        return "nothing was measured: no PNG"
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no PNG"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r.scenario for r in rows))
    proxies = list(dict.fromkeys(r.proxy for r in rows))
    ratios = ratio_rows(rows)
    others = [p for p in proxies if p != BASELINE]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(10, 1.1 * len(scenarios)), 8), constrained_layout=True)
    width = 0.8 / max(1, len(others))
    for i, proxy in enumerate(others):
        values = []
        for s in scenarios:
            q = next((q for q in ratios if q["scenario"] == s and q["proxy"] == proxy), None)
            values.append(q["per_cpu"] if q and q["per_cpu"] is not None else 0.0)
        ax1.bar([x + (i - (len(others) - 1) / 2) * width for x in range(len(scenarios))], values, width,
                label=proxy, color=COLORS.get(proxy))
    ax1.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax1.set_xticks(range(len(scenarios)), scenarios)
    ax1.set_ylabel("requests per proxy-CPU-second\n(ratio to nginx)")
    ax1.set_title("Efficiency relative to nginx (1 worker); higher is better")
    ax1.legend()
    width = 0.8 / max(1, len(proxies))
    for i, proxy in enumerate(proxies):
        values = []
        for s in scenarios:
            r = next((r for r in rows if r.scenario == s and r.proxy == proxy and not r.error), None)
            values.append(r.p99_ms if r else 0.0)
        ax2.bar([x + (i - (len(proxies) - 1) / 2) * width for x in range(len(scenarios))], values, width,
                label=proxy, color=COLORS.get(proxy))
    ax2.set_yscale("log")
    ax2.set_xticks(range(len(scenarios)), scenarios)
    ax2.set_ylabel("p99 latency (ms, log scale)")
    ax2.set_title("p99 latency per scenario; lower is better")
    ax2.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
