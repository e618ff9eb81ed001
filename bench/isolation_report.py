"""The isolation benchmark's figures (from the clients' records and the slow pool's logs), its
markdown tables, the targets of issue 6, and its PNG chart."""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COLORS = {"laneproxy": "tab:blue", "nginx": "tab:green", "nginx-maxconns": "tab:olive", "haproxy": "tab:orange"}
Record = tuple[str, float, float, int, str]  # id, start, end, status, body start (see openloop.py)


@dataclass(frozen=True)
class Plan:
    workers: int = 8  # slow pool processes, one request at a time each
    sleep_ms: int = 200  # per slow request
    limit: int = 8  # the slow lane's limit (laneproxy), max_conns (nginx), maxconn (HAProxy)
    # The queue holds what the pool serves in 0.15 s (6 at 40 req/s), under CoDel's default
    # target (queue_timeout / 10 = 0.2 s): waiters are served FIFO within ~0.35 s and the excess
    # is refused at once, with Retry-After (README: sizing a lane's queue).
    queue: int = 6
    queue_timeout_s: float = 2.0
    client_timeout_s: float = 3.0  # a client abandons its request after this: the deadline
    ramp_s: float = 2.0  # flood (or overload) running before the measured window starts
    drain_s: float = 10.0  # longest wait for the pool to finish what it holds after a phase
    overload: float = 3.0  # the goodput phase offers this many times the pool's capacity

    @property
    def capacity(self) -> float:
        """Slow requests per second the pool can serve."""
        return self.workers * 1000 / self.sleep_ms


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 2)


def fast_summary(data: dict[str, Any]) -> dict[str, Any]:
    records: list[Record] = [tuple(r) for r in data["records"]]  # type: ignore[misc]
    ok = [end - start for _, start, end, status, _ in records if status == 200]
    return {
        "requests": len(records), "errors": len(records) - len(ok),
        "p50_ms": _ms(percentile(ok, 50)), "p99_ms": _ms(percentile(ok, 99)),
        "max_ms": _ms(max(ok, default=None)), "lag_p99_ms": _ms(percentile(data["lag"], 99)),
    }


def reason(status: int, body: str) -> str:
    """`503 queue full` from laneproxy's `lane slow is busy (queue full); ...`, `502 Bad Gateway` from nginx."""
    text = " ".join(re.sub(r"<[^>]+>", " ", body).split())
    found = re.search(r"\(([^)]*)\)", text)
    text = found.group(1) if found else re.sub(r"^\d{3}\s*", "", text)[:40]
    return f"{status} {text}".strip()


def slow_summary(records: list[Record], span_s: float) -> dict[str, Any]:
    """Outcomes of the slow-lane requests: statuses, abandons, latencies of served and rejected."""
    status = [r[3] for r in records]
    served = [end - start for _, start, end, s, _ in records if s == 200]
    rejected = [end - start for _, start, end, s, _ in records if s >= 400]
    by_reason: dict[str, list[float]] = {}
    for _, start, end, s, body in records:
        if s >= 400:
            by_reason.setdefault(reason(s, body), []).append(end - start)
    return {
        "requests": sum(1 for s in status if s != -2),
        "served": len(served), "served_per_s": round(len(served) / span_s, 1),
        "s503": status.count(503), "s502": status.count(502), "s504": status.count(504),
        "other_status": sum(1 for s in status if s > 0 and s not in (200, 502, 503, 504)),
        "abandoned": status.count(0), "conn_errors": status.count(-1),
        "served_p50_ms": _ms(percentile(served, 50)), "served_p99_ms": _ms(percentile(served, 99)),
        "rejected_p50_ms": _ms(percentile(rejected, 50)), "rejected_p99_ms": _ms(percentile(rejected, 99)),
        "rejections": {
            key: {"count": len(v), "p50_ms": _ms(percentile(v, 50)), "p99_ms": _ms(percentile(v, 99))}
            for key, v in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))
        },
    }


def pool_summary(log_dir: Path, records: list[Record], t0: float) -> dict[str, Any]:
    """What the slow pool saw: most requests held (running + waiting inside it) and running at once,
    requests executed, and those it started (or finished) after their client had abandoned them."""
    rows = []
    for path in sorted(log_dir.glob("worker-*.tsv")):
        for line in path.read_text().splitlines():
            bench_id, start, end, closed, sent = line.split("\t")
            rows.append((bench_id, float(start), float(end), closed == "1", sent == "1"))
    samples = []
    held_file = log_dir / "held.tsv"
    if held_file.exists():
        for line in held_file.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                samples.append((float(parts[0]), int(parts[1]), int(parts[2])))
    events = sorted([(r[1], 1) for r in rows] + [(r[2], -1) for r in rows])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    abandoned = {r[0]: r[2] for r in records if r[3] == 0}
    gone = [(row, abandoned[row[0]]) for row in rows if row[0] in abandoned]
    step = max(1, len(samples) // 400)
    return {
        "executed": len(rows),
        "max_held": max((s[1] for s in samples), default=0),
        "max_running": most,
        "started_after_client_left": sum(1 for row, t in gone if row[1] >= t),
        "finished_after_client_left": sum(1 for row, t in gone if row[2] >= t),
        "proxy_had_closed": sum(1 for r in rows if r[3]),
        "answer_not_delivered": sum(1 for r in rows if not r[4]),
        "held_series": [(round(s[0] - t0, 3), s[1]) for s in samples[::step]],
    }


def analyze(raw: dict[str, Any], flood_dir: Path, overload_dir: Path, plan: Plan, duration: float) -> dict[str, Any]:
    flood: list[Record] = [tuple(r) for r in raw["flood"]["records"]]  # type: ignore[misc]
    over: list[Record] = [tuple(r) for r in raw["overload"]["records"]]  # type: ignore[misc]
    first = min((r[1] for r in over), default=0.0)
    window = (first + plan.ramp_s, first + plan.ramp_s + duration)
    good = sum(1 for r in over if r[3] == 200 and window[0] <= r[2] < window[1])
    overload = slow_summary(over, plan.ramp_s + duration)
    overload.update(
        offered_per_s=round(len(over) / (plan.ramp_s + duration), 1),
        goodput_per_s=round(good / duration, 1),
        goodput_pct=round(100 * good / duration / plan.capacity, 1),
    )
    return {
        "proxy": raw["proxy"], "error": None,
        "alone": fast_summary(raw["alone"]), "under": fast_summary(raw["under"]),
        "flood": slow_summary(flood, plan.ramp_s + duration + 0.5),
        "flood_pool": pool_summary(flood_dir, flood, raw["flood_t0"]) | {
            "drain_s": round(raw["flood_drain_s"], 1), "held_at_cut": raw["flood_held_at_cut"]},
        "overload": overload,
        "overload_pool": pool_summary(overload_dir, over, first) | {
            "drain_s": round(raw["overload_drain_s"], 1), "held_at_cut": raw["overload_held_at_cut"]},
        "proxy_cpu_flood_pct": round(raw["proxy_cpu_flood_pct"], 1),
        "other_cpu_pct": round(max(raw["other_cpu_alone_pct"], raw["other_cpu_flood_pct"]), 1),
    }


# --- markdown ---------------------------------------------------------------------------------------

def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _after(pool: dict[str, Any]) -> str:
    """Executed after the client left; `+N held` when the pool was stopped before it finished."""
    text = f"{pool['started_after_client_left']:,}"
    return text + (f" (+{pool['held_at_cut']} still held at cut)" if pool["held_at_cut"] else "")


def targets(r: dict[str, Any], plan: Plan) -> list[tuple[str, str, bool]]:
    """Issue 6's targets: (target, measured, holds)."""
    ratio = (r["under"]["p99_ms"] or 0) / (r["alone"]["p99_ms"] or math.inf)
    held = max(r["flood_pool"]["max_held"], r["overload_pool"]["max_held"])
    rejected = [x for x in (r["flood"]["rejected_p99_ms"], r["overload"]["rejected_p99_ms"]) if x is not None]
    after = r["flood_pool"]["started_after_client_left"] + r["overload_pool"]["started_after_client_left"]
    after += r["flood_pool"]["held_at_cut"] + r["overload_pool"]["held_at_cut"]
    return [
        ("fast-lane p99 under the flood ≤ 1.5× alone",
         f"{_f(r['under']['p99_ms'])} ms vs {_f(r['alone']['p99_ms'])} ms: {ratio:.2f}×", ratio <= 1.5),
        (f"slow pool never holds more than limit ({plan.limit}) at once",
         f"at most {held} (running + waiting inside the pool)", held <= plan.limit),
        ("rejected requests answered in ≤ 10 ms p99",
         "no rejection" if not rejected else f"p99 {max(rejected):,.1f} ms (flood; overload)",
         all(x <= 10 for x in rejected)),
        ("zero requests executed after their client left", f"{after}", after == 0),
        (f"goodput under {plan.overload:g}× overload ≥ 90 % of {plan.capacity:g} req/s",
         f"{r['overload']['goodput_pct']:.1f} % ({r['overload']['goodput_per_s']:g} req/s)",
         r["overload"]["goodput_pct"] >= 90),
    ]


FLOOD_POLICY = {False: "wait the Retry-After of a 503 before the next request", True: "loop at once after a 503"}


def markdown(results: list[dict[str, Any]], meta: dict[str, Any], plan: Plan, args: argparse.Namespace) -> str:
    ok = [r for r in results if not r.get("error")]
    lines = [
        f"Command: `{meta['command']}`",
        f"Date: {meta['date']}",
        f"Machine: {meta['nproc']} CPUs, {meta['cpu_model']}, Linux {meta['kernel']}",
        f"Versions: {meta['versions']}",
        f"Slow pool: {plan.workers} processes x 1 request, {plan.sleep_ms} ms each (capacity {plan.capacity:g} req/s); "
        f"slow lane limit {plan.limit}, queue {plan.queue}, queue_timeout {plan.queue_timeout_s:g} s. "
        f"Fast lane: {args.rate:g} req/s open loop for {args.duration:g} s per phase. Flood: {args.clients} "
        f"clients, abandon after {plan.client_timeout_s:g} s, "
        f"{FLOOD_POLICY[bool(getattr(args, 'flood_ignores_retry_after', False))]}. "
        f"Proxy on core {args.proxy_core}, the rest on "
        f"core {args.load_core} (fast-lane generator and fast upstream at SCHED_FIFO).",
        f"Load average before / after: {' '.join(meta['loadavg_start'])} / {' '.join(meta['loadavg_end'])}; "
        f"total time {meta['elapsed_s']:g} s." + (" **Interrupted: incomplete.**" if meta.get("interrupted") else ""),
        "",
    ]
    lines += [f"- {r['proxy']}: **not measured**: {r['error']}" for r in results if r.get("error")]
    lines += [
        "Fast lane (`/`, ~0.1 ms upstream), latency of 200s from the moment the generator sent the request "
        "(other CPU %: CPU used by processes outside the benchmark during the phase, the larger of the two; "
        "more than a few % means the machine was not quiet):",
        "",
        "| proxy | p50 alone ms | p99 alone ms | p50 under flood ms | p99 under flood ms | p99 flood / alone "
        "| errors (alone / flood) | generator lag p99 ms | other CPU % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ok:
        a, u = r["alone"], r["under"]
        ratio = (u["p99_ms"] or 0) / a["p99_ms"] if a["p99_ms"] else None
        lines.append(
            f"| {r['proxy']} | {_f(a['p50_ms'])} | {_f(a['p99_ms'])} | {_f(u['p50_ms'])} | {_f(u['p99_ms'])} "
            f"| {_f(ratio)} | {a['errors']} / {u['errors']} | {_f(max(a['lag_p99_ms'], u['lag_p99_ms']))} "
            f"| {r['other_cpu_pct']:.0f} |"
        )
    lines += [
        "",
        f"Slow lane under the flood ({args.clients} clients looping on `/tast`, "
        f"{plan.ramp_s + args.duration + 0.5:g} s):",
        "",
        "| proxy | served (req/s) | 503 | 502 | 504 | abandoned at 3 s | conn errors | served p99 ms "
        "| rejected p50 / p99 ms | pool: most held at once | pool: most running | executed after client left "
        "| proxy CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ok:
        f, p = r["flood"], r["flood_pool"]
        lines.append(
            f"| {r['proxy']} | {f['served']:,} ({f['served_per_s']:g}) | {f['s503']:,} | {f['s502']:,} | {f['s504']:,} "
            f"| {f['abandoned']:,} | {f['conn_errors']:,} | {_f(f['served_p99_ms'], 0)} "
            f"| {_f(f['rejected_p50_ms'], 1)} / {_f(f['rejected_p99_ms'], 1)} | {p['max_held']} | {p['max_running']} "
            f"| {_after(p)} | {r['proxy_cpu_flood_pct']:.0f} |"
        )
    lines += [
        "",
        f"Slow lane under {plan.overload:g}x overload ({plan.overload * plan.capacity:g} req/s open loop on `/tast`, "
        f"deadline {plan.client_timeout_s:g} s; goodput = answers within the deadline completed in the last "
        f"{args.duration:g} s, over the pool's {plan.capacity:g} req/s):",
        "",
        "| proxy | goodput req/s | goodput % | 503 | 502 | 504 | abandoned | served p99 ms | rejected p99 ms "
        "| pool: most held at once | executed after client left |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ok:
        o, p = r["overload"], r["overload_pool"]
        lines.append(
            f"| {r['proxy']} | {o['goodput_per_s']:g} | {o['goodput_pct']:.1f} | {o['s503']:,} | {o['s502']:,} "
            f"| {o['s504']:,} | {o['abandoned']:,} | {_f(o['served_p99_ms'], 0)} | {_f(o['rejected_p99_ms'], 1)} "
            f"| {p['max_held']} | {_after(p)} |"
        )
    lines += ["", "Rejections by reason (status and the proxy's own words; count, p50 / p99 ms):", ""]
    for r in ok:
        for phase in ("flood", "overload"):
            found = r[phase]["rejections"]
            text = "; ".join(f"`{k}` {v['count']:,}, {_f(v['p50_ms'], 1)} / {_f(v['p99_ms'], 1)}"
                             for k, v in found.items())
            lines.append(f"- {r['proxy']}, {phase}: {text or 'none'}")
    lane = next((r for r in ok if r["proxy"] == "laneproxy"), None)
    if lane is not None:
        lines += ["", "laneproxy against issue 6's targets:", "", "| target | measured | holds |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {'yes' if held else '**no**'} |" for t, m, held in targets(lane, plan)]
    lines.append("")
    return "\n".join(lines)


# --- chart ------------------------------------------------------------------------------------------

def write_png(results: list[dict[str, Any]], plan: Plan, path: Path) -> str | None:
    """Four panels: fast-lane p99, slow-lane outcomes, requests held by the pool over time, goodput."""
    ok = [r for r in results if not r.get("error")]
    if not ok:
        return "nothing was measured: no PNG"
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no PNG"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["proxy"] for r in ok]
    colors = [COLORS.get(n, "tab:gray") for n in names]
    x = range(len(ok))
    fig, ((ax1, ax2), (ax3, ax4)) = plt.subplots(2, 2, figsize=(13, 9), constrained_layout=True)
    ax1.bar([i - 0.2 for i in x], [r["alone"]["p99_ms"] or 0 for r in ok], 0.4, label="alone", color="lightgray")
    ax1.bar([i + 0.2 for i in x], [r["under"]["p99_ms"] or 0 for r in ok], 0.4, label="under the flood", color=colors)
    ax1.set_xticks(list(x), names)
    ax1.set_ylabel("fast-lane p99 latency (ms)")
    ax1.set_title("Fast lane p99: alone (gray) vs under the /tast flood")
    bottom = [0.0] * len(ok)
    for key, label, color in (("served", "served", "tab:green"), ("s503", "503", "tab:orange"),
                              ("s502", "502", "tab:red"), ("s504", "504", "tab:purple"),
                              ("abandoned", "abandoned at 3 s", "black")):
        values = [float(r["flood"][key]) for r in ok]
        ax2.bar(list(x), values, 0.6, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax2.set_yscale("symlog", linthresh=10)
    ax2.set_xticks(list(x), names)
    ax2.set_ylabel("slow-lane requests (symlog)")
    ax2.set_title("Slow lane outcomes under the flood")
    ax2.legend(fontsize=8)
    for i, (r, color) in enumerate(zip(ok, colors, strict=True)):
        series = [(t, h) for t, h in r["flood_pool"]["held_series"] if t >= -1]
        ax3.plot([t for t, _ in series], [h for _, h in series], label=r["proxy"], color=color,
                 linewidth=1.2 + 1.2 * (len(ok) - i), alpha=0.8)  # wider first: equal lines stay visible
    ax3.axhline(plan.limit, color="black", linewidth=0.8, linestyle="--")
    ax3.set_yscale("symlog", linthresh=10)
    ax3.set_ylim(bottom=0)
    ax3.set_xlabel("seconds since the flood started")
    ax3.set_ylabel("requests held by the slow pool (running + waiting)")
    ax3.set_title(f"What reaches the slow pool (dashed: limit {plan.limit})")
    ax3.legend(fontsize=8)
    ax4.bar(list(x), [r["overload"]["goodput_pct"] for r in ok], 0.6, color=colors)
    ax4.axhline(90, color="black", linewidth=0.8, linestyle="--")
    ax4.set_xticks(list(x), names)
    ax4.set_ylim(0, 105)
    ax4.set_ylabel(f"% of capacity ({plan.capacity:g} req/s)")
    ax4.set_title(f"Goodput under {plan.overload:g}x overload (answers within {plan.client_timeout_s:g} s)")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return None
