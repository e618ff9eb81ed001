"""The /status page: one self-contained HTML document (inline CSS and script, no external assets).

The server renders the first paint from a status snapshot, so the first response already shows
every lane, its servers and the routes. The inline script then polls `api/status` every second
and re-renders the same markup in place; request rates and p50/p99 (from the upstream-time
histogram's bucket deltas) are computed in the browser from successive snapshots. `render_*`
here and `render*` in SCRIPT produce the same markup: change them together.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

SHED_LABELS = (("full", "full"), ("timeout", "timeout"), ("codel", "codel"), ("client_gone", "client gone"))
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
SERVER_HEAD = (
    '<tr><th>Server</th><th class="l">Health</th><th>In flight</th><th>Requests</th><th>Fails</th>'
    '<th>Retries</th><th title="pooled upstream connections: active / idle">Pool a/i</th></tr>'
)

STYLE = """
:root{color-scheme:light dark;--bg:#f5f6f8;--card:#fff;--fg:#1c2330;--mute:#687385;--line:#e3e6eb;
--soft:#eef0f3;--accent:#2f6fde;--accent2:#9bb6e8;--ok:#1f9d55;--warn:#c77700;--bad:#d23b3b;--idle:#8a93a3}
@media (prefers-color-scheme:dark){:root{--bg:#111418;--card:#191d23;--fg:#e3e7ee;--mute:#8b95a5;
--line:#2a3039;--soft:#222831;--accent:#5b9cff;--accent2:#7f9cc9;--ok:#3ecf7a;--warn:#f0a33a;--bad:#ff6b6b;
--idle:#6b7484}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif;font-variant-numeric:tabular-nums}
main{max-width:1240px;margin:0 auto;padding:20px 24px 32px}
header{display:flex;align-items:center;justify-content:space-between;gap:16px;margin-bottom:16px}
.brand{display:flex;align-items:baseline;gap:10px}
.brand h1{font-size:20px;margin:0;letter-spacing:-.01em}
.brand .ver,.meta{color:var(--mute);font-size:12px}
.meta{display:flex;align-items:center;gap:12px}
.live{display:inline-flex;align-items:center;gap:6px;font-weight:600;color:var(--ok)}
.live::before{content:"";width:8px;height:8px;border-radius:50%;background:currentColor}
.live.beat::before{animation:beat .6s ease-out}
.live.off{color:var(--bad)}
@keyframes beat{from{box-shadow:0 0 0 0 currentColor}to{box-shadow:0 0 0 6px transparent}}
.summary{display:grid;grid-template-columns:repeat(6,1fr);gap:12px;margin-bottom:16px}
.tile,.lane,.card{background:var(--card);border:1px solid var(--line);border-radius:10px}
.tile{padding:10px 14px}
label,.tile span{display:block;color:var(--mute);font-size:11px;text-transform:uppercase;letter-spacing:.06em}
.tile b{font-size:20px;font-weight:600}
.lanes{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:16px;margin-bottom:16px;
align-items:start}
.lane{padding:14px 16px}
.lane-head{display:flex;align-items:center;gap:10px;margin-bottom:10px}
.lane-head h2{font-size:17px;margin:0}
.lane-head .sub{color:var(--mute);font-size:12px;margin-left:auto}
.badge{font-size:11px;font-weight:600;padding:2px 8px;border-radius:99px;background:var(--soft);color:var(--mute)}
.badge.ok{color:var(--ok)}.badge.warn{color:var(--warn)}.badge.bad{color:var(--bad)}
.kpis{display:grid;grid-template-columns:repeat(6,1fr);gap:10px;margin-bottom:8px}
.kpi b{font-size:18px;font-weight:600;white-space:nowrap}
.kpi small{color:var(--mute);font-weight:400;font-size:12px}
.bar{height:4px;background:var(--soft);border-radius:2px;margin-top:4px;overflow:hidden}
.bar i{display:block;height:100%;background:var(--accent);border-radius:2px}
.bar i.hot{background:var(--warn)}.bar i.full{background:var(--bad)}
.spark{position:relative;height:64px;margin:6px 0 4px;border-radius:6px;background:var(--soft)}
.spark svg{position:absolute;inset:0;width:100%;height:100%}
.spark .p99{fill:none;stroke:var(--accent);stroke-width:1.6;vector-effect:non-scaling-stroke}
.spark .p50{fill:none;stroke:var(--accent2);stroke-width:1.6;vector-effect:non-scaling-stroke}
.spark .area{fill:var(--accent);opacity:.12}
.spark .legend{position:absolute;top:4px;left:8px;font-size:11px;color:var(--mute)}
.spark .legend i{display:inline-block;width:10px;height:2px;vertical-align:middle;margin:0 4px 0 8px}
.spark .max{position:absolute;top:4px;right:8px;font-size:11px;color:var(--mute)}
.spark .empty{position:absolute;inset:0;display:grid;place-items:center;font-size:12px;color:var(--mute)}
.shed{font-size:12px;color:var(--mute);margin:6px 0 10px}
.shed b{color:var(--fg);font-weight:600}.shed .sep{margin:0 6px;color:var(--line)}.shed b.nz{color:var(--bad)}
table{width:100%;border-collapse:collapse;font-size:13px}
th{white-space:nowrap;color:var(--mute);font-size:11px;font-weight:600;text-transform:uppercase;letter-spacing:.05em;text-align:right;
padding:6px 8px;border-bottom:1px solid var(--line)}
td{padding:6px 8px;border-bottom:1px solid var(--line);text-align:right}
tr:last-child td{border-bottom:0}
th:first-child,td:first-child{text-align:left;padding-left:0}
td.l,th.l{text-align:left}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.dot{display:inline-block;width:8px;height:8px;border-radius:50%;margin-right:6px;background:var(--idle)}
.dot.up{background:var(--ok)}.dot.backup{background:var(--accent)}
.dot.down,.dot.unhealthy{background:var(--bad)}.dot.disabled{background:var(--idle)}
.st{font-size:12px;color:var(--mute)}
.card{padding:14px 16px;margin-bottom:16px}
.card h2{font-size:15px;margin:0 0 8px}
.zero{color:var(--mute)}
.c4{color:var(--warn)}.c5{color:var(--bad)}
footer{color:var(--mute);font-size:12px;display:flex;gap:16px}
footer a{color:var(--mute)}
@media (max-width:760px){.summary{grid-template-columns:repeat(3,1fr)}.kpis{grid-template-columns:repeat(3,1fr)}
.lanes{grid-template-columns:1fr}}
"""

SCRIPT = r"""
"use strict";
(function () {
  const WINDOW = 5, KEEP = 61, PERIOD = 1000;
  const SHED = [["full", "full"], ["timeout", "timeout"], ["codel", "codel"], ["client_gone", "client gone"]];
  const CLASSES = ["1xx", "2xx", "3xx", "4xx", "5xx"];
  const HEAD = '<table><thead><tr><th>Server</th><th class="l">Health</th><th>In flight</th><th>Requests</th>' +
    '<th>Fails</th><th>Retries</th><th title="pooled upstream connections: active / idle">Pool a/i</th></tr>' +
    "</thead><tbody>";
  const hist = [];             // snapshots, oldest first
  const series = new Map();    // lane -> [{p50, p99}] (one point per poll)
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";");
  const num = (n) => Number(n).toLocaleString("en-US");
  function dur(s) {
    if (s === null || s === undefined) return "\u2014";
    if (s < 0.001) return (s * 1000).toFixed(2) + " ms";
    if (s < 0.01) return (s * 1000).toFixed(1) + " ms";
    if (s < 1) return Math.round(s * 1000) + " ms";
    return s.toFixed(s < 10 ? 2 : 1) + " s";
  }
  function rate(r) {
    if (r === null) return "\u2014";
    return r >= 100 ? Math.round(r).toLocaleString("en-US") : r.toFixed(1);
  }
  // Prometheus histogram_quantile over per-bucket counts (last bucket is +Inf).
  function quantile(q, bounds, counts) {
    let total = 0;
    for (const c of counts) total += c;
    if (total <= 0) return null;
    const rank = q * total;
    let cum = 0;
    for (let i = 0; i < counts.length; i++) {
      const prev = cum;
      cum += counts[i];
      if (counts[i] > 0 && cum >= rank) {
        if (i >= bounds.length) return bounds[bounds.length - 1];
        const lo = i ? bounds[i - 1] : 0;
        return lo + (bounds[i] - lo) * (rank - prev) / counts[i];
      }
    }
    return bounds[bounds.length - 1];
  }
  const laneOf = (snap, name) => snap && snap.lanes.find((l) => l.name === name);
  function delta(lane, old) {
    const h = lane.upstream_time, o = old && old.upstream_time;
    if (!o || o.buckets.length !== h.buckets.length || o.count > h.count) return null;
    return h.buckets.map((c, i) => c - o.buckets[i]);
  }
  function laneRate(lane, cur, prev) {
    const p = laneOf(prev, lane.name);
    if (!p || cur.time <= prev.time || p.served > lane.served) return null;
    return (lane.served - p.served) / (cur.time - prev.time);
  }
  function bar(value, limit) {
    if (!limit) return "";
    const pct = Math.min(100, 100 * value / limit);
    return '<div class="bar"><i class="' + (pct >= 100 ? "full" : pct >= 75 ? "hot" : "") +
      '" style="width:' + pct.toFixed(1) + '%"></i></div>';
  }
  function kpi(label, value, small, extra) {
    return '<div class="kpi"><label>' + label + "</label><b>" + value +
      (small ? "<small>" + small + "</small>" : "") + "</b>" + (extra || "") + "</div>";
  }
  function spark(points) {
    const vals = [];
    for (const p of points) { if (p.p99 !== null) vals.push(p.p99); }
    const legend = '<span class="legend">upstream time<i style="background:var(--accent)"></i>p99' +
      '<i style="background:var(--accent2)"></i>p50</span>';
    if (!vals.length) return legend + '<span class="empty">no traffic in the last minute</span>';
    const max = Math.max.apply(null, vals) * 1.15 || 1, W = 600, H = 64, n = KEEP - 1;
    const x = (i) => (W * (i + n - (points.length - 1)) / n).toFixed(1);
    const y = (v) => (H - 4 - (H - 22) * v / max).toFixed(1);
    function path(key) {
      let d = "", pen = false;
      points.forEach((p, i) => {
        if (p[key] === null) { pen = false; return; }
        d += (pen ? "L" : "M") + x(i) + " " + y(p[key]);
        pen = true;
      });
      return d;
    }
    let area = "";
    let run = [];
    const flush = () => {
      if (run.length > 1) area += "M" + run[0][0] + " " + (H - 4) + run.map((q) => "L" + q[0] + " " + q[1]).join("") +
        "L" + run[run.length - 1][0] + " " + (H - 4) + "Z";
      run = [];
    };
    points.forEach((p, i) => { if (p.p99 === null) flush(); else run.push([x(i), y(p.p99)]); });
    flush();
    return legend + '<span class="max">' + dur(max / 1.15) + '</span><svg viewBox="0 0 ' + W + " " + H +
      '" preserveAspectRatio="none"><path class="area" d="' + area + '"/><path class="p50" d="' + path("p50") +
      '"/><path class="p99" d="' + path("p99") + '"/></svg>';
  }
  function wait(lane, old) {
    if (!lane.limit) return "";
    const o = laneOf(old, lane.name), h = lane.queue_wait;
    if (!o || o.queue_wait.count > h.count) return "";
    const d = h.buckets.map((c, i) => c - o.queue_wait.buckets[i]);
    return ' <span class="sep">|</span> queue wait p99 <b>' + dur(quantile(0.99, h.bounds, d)) + "</b>";
  }
  function renderLane(lane, cur, prev, old) {
    const buckets = delta(lane, laneOf(old, lane.name));
    const b = lane.upstream_time.bounds;
    const p50 = buckets ? quantile(0.5, b, buckets) : null, p99 = buckets ? quantile(0.99, b, buckets) : null;
    const pts = series.get(lane.name) || [];
    const shed = SHED.map(([k, label]) => label + " <b" + (lane.shed[k] ? ' class="nz"' : "") + ">" +
      num(lane.shed[k] || 0) + "</b>").join(" \u00b7 ");
    const rows = lane.servers.map((s) => "<tr><td><code>" + esc(s.name) + '</code></td><td class="l">' +
      '<span class="dot ' + esc(s.state) + '"></span><span class="st">' + esc(s.state) +
      (s.weight !== 1 ? " \u00b7 w" + s.weight : "") + "</span></td><td>" + num(s.in_flight) + "</td><td>" +
      num(s.requests) + "</td><td>" + num(s.failures) + "</td><td>" + num(s.retried) + "</td><td>" +
      num(s.pool.active) + " / " + num(s.pool.idle) + "</td></tr>").join("");
    const p = laneOf(prev, lane.name);
    let shedding = 0;
    if (p) for (const [k] of SHED) shedding += (lane.shed[k] || 0) - (p.shed[k] || 0);
    const state = lane.overloaded ? '<span class="badge warn">overloaded</span>'
      : !lane.servers.some((s) => s.up) ? '<span class="badge bad">no server up</span>'
      : shedding > 0 ? '<span class="badge warn">shedding</span>'
      : '<span class="badge ok">ok</span>';
    return '<div class="lane-head"><h2>' + esc(lane.name) + "</h2>" + state + '<span class="sub">' +
      esc(lane.balance) + " \u00b7 " + lane.servers.length + " server" + (lane.servers.length === 1 ? "" : "s") +
      "</span></div>" + '<div class="kpis">' +
      kpi("In flight", num(lane.in_flight), lane.limit ? " / " + num(lane.limit) : " / no limit",
        bar(lane.in_flight, lane.limit)) +
      kpi("Queued", num(lane.queued), lane.queue_size ? " / " + num(lane.queue_size) : " / none",
        bar(lane.queued, lane.queue_size)) +
      kpi("Rate", rate(laneRate(lane, cur, prev)), " req/s") + kpi("p50", dur(p50)) + kpi("p99", dur(p99)) +
      kpi("Served", num(lane.served)) + "</div>" +
      '<div class="spark">' + spark(pts) + "</div>" +
      '<div class="shed">Shed: ' + shed + wait(lane, old) + "</div>" +
      HEAD + rows + "</tbody></table>";
  }
  function renderRoutes(routes) {
    return routes.map((r) => "<tr><td><code>" + esc(r.prefix) + '</code></td><td class="l">' + esc(r.lane) +
      '</td><td class="l">' + esc(r.priority) + (r.try_files ? " \u00b7 files" : "") +
      (r.strip_prefix ? " \u00b7 strip" : "") + "</td>" + CLASSES.map((c, i) => {
        const n = r.responses[c] || 0;
        return '<td class="' + (n ? (i === 3 ? "c4" : i === 4 ? "c5" : "") : "zero") + '">' + num(n) + "</td>";
      }).join("") + "</tr>").join("");
  }
  function render(cur) {
    const prev = hist.length > 1 ? hist[hist.length - 2] : null;
    const old = hist.length > 1 ? hist[Math.max(0, hist.length - 1 - WINDOW)] : null;
    $("s-conn").textContent = num(cur.connections);
    $("s-tun").textContent = num(cur.tunnels);
    $("s-req").textContent = num(cur.requests);
    $("s-rate").textContent = prev && cur.time > prev.time && cur.requests >= prev.requests
      ? rate((cur.requests - prev.requests) / (cur.time - prev.time)) : "\u2014";
    $("s-rej").textContent = num(cur.rejected_connections);
    let local = 0;
    for (const k in cur.local_responses) local += cur.local_responses[k];
    $("s-local").textContent = num(local);
    const box = $("lanes"), seen = new Set();
    for (const lane of cur.lanes) {
      seen.add(lane.name);
      let el = box.querySelector('[data-lane="' + CSS.escape(lane.name) + '"]');
      if (!el) {
        el = document.createElement("article");
        el.className = "lane";
        el.dataset.lane = lane.name;
        box.appendChild(el);
      }
      el.innerHTML = renderLane(lane, cur, prev, old);
    }
    for (const el of Array.from(box.children)) { if (!seen.has(el.dataset.lane)) el.remove(); }
    $("routes").innerHTML = renderRoutes(cur.routes);
  }
  function sample(cur) {
    hist.push(cur);
    if (hist.length > KEEP) hist.shift();
    const old = hist[Math.max(0, hist.length - 1 - WINDOW)];
    for (const lane of cur.lanes) {
      const pts = series.get(lane.name) || [];
      const d = hist.length > 1 ? delta(lane, laneOf(old, lane.name)) : null;
      const b = lane.upstream_time.bounds;
      pts.push({p50: d ? quantile(0.5, b, d) : null, p99: d ? quantile(0.99, b, d) : null});
      if (pts.length > KEEP) pts.shift();
      series.set(lane.name, pts);
    }
    for (const name of Array.from(series.keys())) { if (!laneOf(cur, name)) series.delete(name); }
  }
  const live = $("live");
  async function poll() {
    try {
      const res = await fetch("api/status", {cache: "no-store", headers: {Accept: "application/json"}});
      if (!res.ok) throw new Error("HTTP " + res.status);
      const cur = await res.json();
      sample(cur);
      render(cur);
      live.textContent = "live";
      live.className = "live";
      void live.offsetWidth;
      live.className = "live beat";
      live.title = "updated " + new Date(cur.time * 1000).toLocaleTimeString();
    } catch (err) {
      live.textContent = "offline";
      live.className = "live off";
      live.title = String(err);
    }
    setTimeout(poll, PERIOD);
  }
  sample(JSON.parse($("snapshot").textContent));
  setTimeout(poll, PERIOD);
})();
"""


def _num(n: int | float) -> str:
    return f"{n:,}"


def _dur(s: float | None) -> str:
    if s is None:
        return "\u2014"
    if s < 0.001:
        return f"{s * 1000:.2f} ms"
    if s < 0.01:
        return f"{s * 1000:.1f} ms"
    if s < 1:
        return f"{round(s * 1000)} ms"
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"


def quantile(q: float, bounds: list[float], counts: list[int]) -> float | None:
    """Prometheus histogram_quantile over per-bucket counts (the last bucket is +Inf)."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    cum = 0
    for i, c in enumerate(counts):
        prev = cum
        cum += c
        if c > 0 and cum >= rank:
            if i >= len(bounds):
                return bounds[-1]
            lo = bounds[i - 1] if i else 0.0
            return lo + (bounds[i] - lo) * (rank - prev) / c
    return bounds[-1]


def _bar(value: int, limit: int) -> str:
    if not limit:
        return ""
    pct = min(100.0, 100.0 * value / limit)
    cls = "full" if pct >= 100 else "hot" if pct >= 75 else ""
    return f'<div class="bar"><i class="{cls}" style="width:{pct:.1f}%"></i></div>'


def _kpi(label: str, value: str, small: str = "", extra: str = "") -> str:
    small_html = f"<small>{small}</small>" if small else ""
    return f'<div class="kpi"><label>{label}</label><b>{value}{small_html}</b>{extra}</div>'


def _server_row(s: dict[str, Any]) -> str:
    weight = f" · w{s['weight']}" if s["weight"] != 1 else ""
    pool = s["pool"]
    return (
        f'<tr><td><code>{escape(s["name"])}</code></td><td class="l"><span class="dot {escape(s["state"])}"></span>'
        f'<span class="st">{escape(s["state"])}{weight}</span></td>'
        f"<td>{_num(s['in_flight'])}</td><td>{_num(s['requests'])}</td><td>{_num(s['failures'])}</td>"
        f"<td>{_num(s['retried'])}</td><td>{_num(pool['active'])} / {_num(pool['idle'])}</td></tr>"
    )


def render_lane(lane: dict[str, Any]) -> str:
    """First paint of one lane card; latencies since start (the script switches to the last 5 s)."""
    ut = lane["upstream_time"]
    p50 = quantile(0.5, ut["bounds"], ut["buckets"])
    p99 = quantile(0.99, ut["bounds"], ut["buckets"])
    servers = lane["servers"]
    if lane["overloaded"]:
        state = '<span class="badge warn">overloaded</span>'
    elif any(s["up"] for s in servers):
        state = '<span class="badge ok">ok</span>'
    else:
        state = '<span class="badge bad">no server up</span>'
    nz = ' class="nz"'
    shed = " \u00b7 ".join(
        f"{label} <b{nz if lane['shed'].get(key) else ''}>{_num(lane['shed'].get(key, 0))}</b>"
        for key, label in SHED_LABELS
    )
    rows = "".join(_server_row(s) for s in servers)
    limit, size = lane["limit"], lane["queue_size"]
    qw = lane["queue_wait"]
    wait_p99 = _dur(quantile(0.99, qw["bounds"], qw["buckets"]))
    wait = f' <span class="sep">|</span> queue wait p99 <b>{wait_p99}</b>' if limit else ""
    plural = "" if len(servers) == 1 else "s"
    return (
        f'<article class="lane" data-lane="{escape(lane["name"])}"><div class="lane-head">'
        f'<h2>{escape(lane["name"])}</h2>{state}<span class="sub">{escape(lane["balance"])} · '
        f"{len(servers)} server{plural}</span></div>"
        '<div class="kpis">'
        + _kpi("In flight", _num(lane["in_flight"]), f" / {_num(limit)}" if limit else " / no limit",
               _bar(lane["in_flight"], limit))
        + _kpi("Queued", _num(lane["queued"]), f" / {_num(size)}" if size else " / none", _bar(lane["queued"], size))
        + _kpi("Rate", "\u2014", " req/s") + _kpi("p50", _dur(p50)) + _kpi("p99", _dur(p99))
        + _kpi("Served", _num(lane["served"]))
        + '</div><div class="spark"><span class="empty">collecting samples\u2026</span></div>'
        f'<div class="shed">Shed: {shed}{wait}</div>'
        f"<table><thead>{SERVER_HEAD}</thead><tbody>{rows}</tbody></table>"
        "</article>"
    )


def render_routes(routes: list[dict[str, Any]]) -> str:
    out = []
    for r in routes:
        flags = (" · files" if r["try_files"] else "") + (" · strip" if r["strip_prefix"] else "")
        cells = []
        for i, cls in enumerate(CLASSES):
            n = r["responses"].get(cls, 0)
            css = ("c4" if i == 3 else "c5" if i == 4 else "") if n else "zero"
            cells.append(f'<td class="{css}">{_num(n)}</td>')
        out.append(
            f'<tr><td><code>{escape(r["prefix"])}</code></td><td class="l">{escape(r["lane"])}</td>'
            f'<td class="l">{escape(r["priority"])}{flags}</td>{"".join(cells)}</tr>'
        )
    return "".join(out)


def _tile(ident: str, label: str, value: str) -> str:
    return f'<div class="tile"><span>{label}</span><b id="{ident}">{value}</b></div>'


def render_status_page(snap: dict[str, Any]) -> str:
    """The whole page for one snapshot; the embedded snapshot seeds the script's rate deltas."""
    data = json.dumps(snap, separators=(",", ":")).replace("</", "<\\/")  # cannot close the <script>
    local = sum(snap["local_responses"].values())
    listen = ", ".join(snap.get("listen", []))
    listening = f"<span>proxy on {escape(listen)}</span>" if listen else ""
    workers = snap.get("workers", 1)
    if workers > 1:  # the numbers are the sum over the worker processes
        listening += f"<span>{_num(workers)} workers</span>"
    return "".join((
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        "<title>laneproxy status</title><style>", STYLE, "</style></head><body><main>",
        f'<header><div class="brand"><h1>laneproxy</h1><span class="ver">{escape(snap["version"])}</span></div>'
        f'<div class="meta">{listening}<span id="live" class="live">live</span></div></header>',
        '<section class="summary">',
        _tile("s-conn", "Client connections", _num(snap["connections"])),
        _tile("s-tun", "Tunnels", _num(snap["tunnels"])),
        _tile("s-req", "Requests", _num(snap["requests"])),
        _tile("s-rate", "Requests / s", "\u2014"),
        _tile("s-rej", "Rejected conns", _num(snap["rejected_connections"])),
        _tile("s-local", "Local answers", _num(local)),
        '</section><section class="lanes" id="lanes">',
        "".join(render_lane(lane) for lane in snap["lanes"]),
        '</section><section class="card"><h2>Routes</h2><table><thead><tr><th>Prefix</th><th class="l">Lane</th>'
        '<th class="l">Priority</th><th>1xx</th><th>2xx</th><th>3xx</th><th>4xx</th><th>5xx</th></tr></thead>'
        '<tbody id="routes">', render_routes(snap["routes"]), "</tbody></table></section>",
        '<footer><a href="metrics">/metrics</a><a href="api/status">/api/status</a>'
        "<span>refreshes every second</span></footer></main>",
        '<script id="snapshot" type="application/json">', data, "</script>",
        "<script>", SCRIPT, "</script></body></html>",
    ))
