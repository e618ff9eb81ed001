"""Audit 23: config fuzzing through the command line, and /metrics exposition conformance.

1. Config fuzz. Seeded hypothesis mutations of valid configs (conf/laneproxy.yaml, the
   interface.md example, a minimal one): wrong types, extreme and non-finite numbers, unit and
   size strings, empty strings, null, lists for maps, unknown keys at every level, deletions;
   plus a fixed corpus of raw-text cases (duplicate keys, anchors/aliases/merge keys, non-UTF-8,
   BOM, tabs, empty/list/scalar files, dates, binary, `servers` and `prefix` edge cases).
   Invariant: `laneproxy check -c FILE` (cli.main in-process) returns 0 or 2 and never raises;
   on 2 each line is `path: message` whose path exists in the input (a missing key's parent
   exists), and `run -c FILE` prints exactly the same lines on stderr and returns 2; a file that
   `check` accepts starts (Proxy on 127.0.0.1:0, admin on 127.0.0.1:0) and stops cleanly.
   Inputs that hit the bugs found here (NUL bytes in paths, huge integer durations, recursive
   aliases, deep nesting, non-string keys, non-ASCII digits, alias blow-up, a zero CoDel target)
   are kept out of the generic fuzz and pinned each by its own test below; all are fixed.
2. Metrics. A proxy with an admin listener, route prefixes holding `"`, `\\`, `{`, `}`, `=`,
   `,` (lane names and Unicode are refused by the config, checked), traffic with 2xx, 5xx from
   the app, 502, 404 and 413; /metrics parsed with prometheus_client: HELP and TYPE per family,
   counter/histogram sample suffixes, cumulative buckets ending at +Inf == _count, label values
   round-trip, no duplicate series, counters monotonic across scrapes and across a reload that
   keeps a lane, Prometheus text content type.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import io
import json
import math
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from laneproxy import cli
from laneproxy.config import ConfigError, load_config, parse_config
from laneproxy.server import Proxy
from tests.conftest import exchange, make_config

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent

# -- valid bases ----------------------------------------------------------------------------------

MINIMAL = """\
version: 1
listen: 127.0.0.1:0
lanes:
  app:
    servers: [127.0.0.1:9]
routes:
  - {prefix: /, lane: app}
"""


def _interface_example() -> str:
    """The first ```yaml block of the interface doc (the commented full example)."""
    doc = Path("/work/shared/docs/interface.md")
    if doc.is_file():
        m = re.search(r"```yaml\n(.*?)```", doc.read_text(), re.S)
        if m:
            return m.group(1)
    return MINIMAL


FULL = """\
version: 1
listen: ["127.0.0.1:0"]
workers: 1
root: ./public
access_log: off
log_format: json
drain_timeout: 250ms
admin: {listen: "127.0.0.1:0", token: t0k}
client:
  header_timeout: 5s
  body_timeout: 5s
  send_timeout: 5s
  keepalive_timeout: 1m
  keepalive_requests: 10
  max_connections: 100
  max_request_line: 8k
  max_header_size: 32k
  max_headers: 50
  trusted_proxies: [10.0.0.0/8, "::1/128"]
  underscore_headers: reject
lanes:
  app:
    servers: ["127.0.0.1:9", {address: "127.0.0.1:10", weight: 2, max_fails: 1, fail_timeout: 10s,
              backup: true, down: false}]
    balance: least_conn
    keepalive: 4
    max_body: 1m
    limit: 2
    queue: 3
    queue_timeout: 2s
    queue_target: 100ms
    queue_interval: 1s
    retries: 1
    retry_timeout: 1s
    retry_on: [error, timeout, http_503]
    health: {path: /healthz, interval: 5s, timeout: 2s, rise: 2, fall: 3, status: [200, 204]}
    upgrade: [websocket]
    tunnel_idle_timeout: 1h
    limit_streams: false
routes:
  - {prefix: /api/, lane: app, strip_prefix: true, priority: high}
  - {prefix: /, lane: app, try_files: true, index: index.html, expires: 1h, gzip_static: true,
     serve_hidden: false, follow_symlinks: false, root: ./www}
"""

BASES = {
    "conf": (REPO / "conf" / "laneproxy.yaml").read_text(),
    "interface": _interface_example(),
    "minimal": MINIMAL,
    "full": FULL,
}
BASE_DATA = {name: yaml.safe_load(text) for name, text in BASES.items()}


def test_the_bases_are_valid():
    for name, text in BASES.items():
        assert parse_config(text).lanes, name


# -- the invariant --------------------------------------------------------------------------------

SPECIAL = re.compile(r"^\((?:top level\)|yaml\) .+|file\) .+): \S")


def _paths(node: Any, here: str = "", walked: frozenset[int] = frozenset()) -> set[str]:
    """Every YAML path in `node` as config.py renders them (`a.b[0].c`); a recursive alias is
    followed once. A bool key is also named as YAML writes it (`true`)."""
    out = {here} if here else set()
    if id(node) in walked:
        return out
    walked = walked | {id(node)}
    if isinstance(node, dict):
        for key, value in node.items():
            names = {str(key), str(key).lower()} if isinstance(key, bool) else {str(key)}
            for name in names:
                out |= _paths(value, f"{here}.{name}" if here else name, walked)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out |= _paths(value, f"{here}[{i}]", walked)
    return out


def _parent(path: str) -> str:
    m = re.match(r"^(.*?)(?:\.[^.\[\]]+|\[\d+\])$", path)
    return m.group(1) if m else ""


def _call(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(argv)
    except SystemExit as exc:  # argparse only; never for a config problem
        raise AssertionError(f"{argv} exited via SystemExit({exc.code})") from None
    except BaseException:
        raise AssertionError(f"{argv} raised:\n{traceback.format_exc()}") from None
    return rc, out.getvalue(), err.getvalue()


def _start_and_stop(path: Path) -> None:
    """A config `check` accepted must start: listeners and admin moved to 127.0.0.1:0."""
    cfg = load_config(path)
    update: dict[str, Any] = {"listen": (("127.0.0.1", 0),), "workers": 1}
    if cfg.admin is not None:
        update["admin"] = cfg.admin.model_copy(update={"listen": ("127.0.0.1", 0)})
    cfg = cfg.model_copy(update=update)
    if any(lane.queue_target == 0 or lane.queue_interval == 0 for lane in cfg.lanes.values()):
        return  # the known bug pinned by test_zero_queue_target_is_refused_or_starts

    async def go() -> None:
        proxy = Proxy(cfg)
        await proxy.start()
        try:
            assert proxy.port > 0
        finally:
            await proxy.stop(drain_timeout=0.1)

    try:
        if uvloop is not None:
            uvloop.run(go())
        else:  # pragma: no cover
            asyncio.run(go())
    except BaseException:
        raise AssertionError(f"an accepted config did not start:\n{path.read_bytes()!r}\n"
                             f"{traceback.format_exc()}") from None


def assert_clear_verdict(content: bytes | str, start: bool = True) -> tuple[int, list[str]]:
    """Write `content`, run check (and run when refused); assert the invariant; (rc, lines)."""
    raw = content.encode("utf-8") if isinstance(content, str) else content
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_bytes(raw)
        rc, out, err = _call(["check", "-c", str(path)])
        assert rc in (0, 2), (rc, out, raw)
        assert "Traceback" not in out + err, (out, err)
        if rc == 0:
            if start:
                _start_and_stop(path)
            return rc, []
        lines = out.splitlines()
        assert lines and all(line.strip() for line in lines), (out, raw)
        try:
            data = yaml.safe_load(raw.decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError, RecursionError):
            data = None
        paths = _paths(data) if isinstance(data, dict) else set()
        for line in lines:
            if SPECIAL.match(line):
                continue
            # A key may itself hold ": " (`":x": 1`), so try every split point for an existing path.
            splits = [(line[:i], line[i + 2:]) for i in range(len(line)) if line.startswith(": ", i)]
            splits = [(p, msg) for p, msg in splits if msg.strip()]
            assert splits, f"not `path: message`: {line!r} (input {raw!r})"
            p, msg = next(((p, msg) for p, msg in splits if p in paths), splits[0])
            ok = p in paths or (msg == "required key is missing" and (_parent(p) in paths or not _parent(p)))
            # A scalar where a list may stand (`listen: x`, `servers: x`) is read as a one-item
            # list, and its problem is named `listen[0]`: accepted when `listen` exists.
            ok = ok or (p.endswith("[0]") and p[:-3] in paths)
            assert ok, f"path {p!r} is not in the input: {line!r}\ninput: {raw!r}\npaths: {sorted(paths)[:40]}"
        # `run` refuses the same file with the same lines, on stderr, before binding anything.
        rrc, rout, rerr = _call(["run", "-c", str(path)])
        assert rrc == 2 and rout == "", (rrc, rout)
        assert [ln for ln in rerr.splitlines() if ln in lines or ": " in ln] == lines, (rerr, lines)
        return rc, lines


# -- part 1a: the fixed corpus ---------------------------------------------------------------------


def _lane(extra: str) -> str:
    return MINIMAL.replace("servers: [127.0.0.1:9]", "servers: [127.0.0.1:9]\n    " + extra)


def _servers(value: str) -> str:
    return MINIMAL.replace("servers: [127.0.0.1:9]", f"servers: {value}")


def _routes(value: str) -> str:
    return MINIMAL.replace("  - {prefix: /, lane: app}\n", value)


CORPUS: dict[str, bytes | str] = {
    "empty": "",
    "whitespace": "  \n\n",
    "comment-only": "# nothing\n",
    "list": "- version: 1\n",
    "scalar": "42\n",
    "string": "hello\n",
    "null": "null\n",
    "bom": "\ufeff" + MINIMAL,
    "bom-twice": "\ufeff\ufeff" + MINIMAL,
    "non-utf8": MINIMAL.encode() + b"root: \xff\xfe\n",
    "latin1": "version: 1\nroot: caf\xe9\n".encode("latin-1"),
    "utf16": MINIMAL.encode("utf-16"),
    "tab-indent": MINIMAL.replace("  app:", "\tapp:"),
    "tab-in-value": MINIMAL + "root: \"a\tb\"\n",
    "crlf": MINIMAL.replace("\n", "\r\n"),
    "cr-only": MINIMAL.replace("\n", "\r"),
    "yaml-syntax": MINIMAL + "listen: a: b\n",
    "unclosed-flow": MINIMAL + "client: {header_timeout: 5s\n",
    "two-documents": MINIMAL + "---\nversion: 1\n",
    "dup-top": MINIMAL + "version: 1\n",
    "dup-lane": MINIMAL.replace("routes:", "  app:\n    servers: [127.0.0.1:10]\nroutes:"),
    "dup-lane-key": _lane("limit: 1\n    limit: 2"),
    "dup-client-key": MINIMAL + "client: {max_headers: 1, max_headers: 2}\n",
    "dup-route-key": _routes("  - {prefix: /, lane: app, prefix: /x}\n"),
    "dup-server-key": _servers("[{address: 127.0.0.1:9, address: 127.0.0.1:10}]"),
    "anchor-alias": MINIMAL.replace("lanes:\n  app:\n    servers: [127.0.0.1:9]",
                                    "lanes:\n  app:\n    servers: &s [127.0.0.1:9]\n  two:\n    servers: *s"),
    "merge-key": MINIMAL.replace(
        "lanes:\n  app:\n    servers: [127.0.0.1:9]",
        "lanes:\n  base: &b {servers: [127.0.0.1:9], limit: 2}\n  app:\n    <<: *b\n    queue: 3"),
    "merge-key-bad": MINIMAL.replace(
        "lanes:\n  app:\n    servers: [127.0.0.1:9]",
        "lanes:\n  base: &b {servers: [127.0.0.1:9], limit: -2}\n  app:\n    <<: *b\n    bogus: 3"),
    "merge-list": MINIMAL.replace(
        "lanes:\n  app:\n    servers: [127.0.0.1:9]",
        "lanes:\n  a: &a {servers: [127.0.0.1:9]}\n  b: &b {limit: 1}\n  app:\n    <<: [*a, *b]"),
    "merge-scalar": MINIMAL + "client:\n  <<: 5\n",
    "undefined-alias": MINIMAL + "root: *nope\n",
    "alias-in-lanes-list": MINIMAL.replace("routes:\n  - {prefix: /, lane: app}",
                                           "routes:\n  - &r {prefix: /, lane: app}\n  - *r"),
    "date-value": MINIMAL + "drain_timeout: 2020-01-01\n",
    "datetime-value": _lane("read_timeout: 2020-01-01 10:00:00"),
    "binary-value": MINIMAL + "root: !!binary aGVsbG8=\n",
    "binary-servers": _servers("!!binary aGVsbG8="),
    "python-tag": MINIMAL + "root: !!python/object:os.system x\n",
    "custom-tag": MINIMAL + "root: !foo x\n",
    "set": MINIMAL + "client:\n  trusted_proxies: !!set {10.0.0.0/8: null}\n",
    "omap": MINIMAL + "client: !!omap [{max_headers: 3}]\n",
    "deep-50": MINIMAL + "client: " + "[" * 50 + "]" * 50 + "\n",
    "deep-map-50": MINIMAL + "client: " + "{a: " * 50 + "1" + "}" * 50 + "\n",
    "lanes-list": "version: 1\nlanes: [app]\nroutes: [{prefix: /, lane: app}]\n",
    "routes-map": "version: 1\nlanes: {app: {servers: 127.0.0.1:9}}\nroutes: {prefix: /, lane: app}\n",
    "client-list": MINIMAL + "client: [1, 2]\n",
    "admin-list": MINIMAL + "admin: [127.0.0.1:0]\n",
    "admin-string": MINIMAL + "admin: 127.0.0.1:0\n",
    "admin-null": MINIMAL + "admin:\n",
    "client-null": MINIMAL + "client:\n",
    "lane-null": MINIMAL.replace("    servers: [127.0.0.1:9]\n", ""),
    "version-missing": MINIMAL.replace("version: 1\n", ""),
    "version-2": MINIMAL.replace("version: 1", "version: 2"),
    "version-yes": MINIMAL.replace("version: 1", "version: yes"),
    "version-string": MINIMAL.replace("version: 1", "version: '1'"),
    "version-null": MINIMAL.replace("version: 1", "version:"),
    "version-float": MINIMAL.replace("version: 1", "version: 1.5"),
    "version-list": MINIMAL.replace("version: 1", "version: [1]"),
    "no-lanes": "version: 1\nroutes: [{prefix: /, lane: app}]\n",
    "empty-lanes": "version: 1\nlanes: {}\nroutes: [{prefix: /, lane: app}]\n",
    "empty-routes": MINIMAL.replace("routes:\n  - {prefix: /, lane: app}", "routes: []"),
    "servers-host0": _servers("[host:0]"),
    "servers-65536": _servers("[host:65536]"),
    "servers-v6": _servers('["[::1]:80"]'),
    "servers-v6-bare": _servers('["::1:80"]'),
    "servers-v6-bad": _servers('["[zz]:80"]'),
    "servers-v6-noport": _servers('["[::1]"]'),
    "servers-unix": _servers('["unix:/x"]'),
    "servers-space": _servers('["my host:80"]'),
    "servers-leading-space": _servers('[" 127.0.0.1:80"]'),
    "servers-noport": _servers("[localhost]"),
    "servers-port-only": _servers("[8080]"),
    "servers-neg-port": _servers('["h:-1"]'),
    "servers-plus-port": _servers('["h:+80"]'),
    "servers-empty": _servers("[]"),
    "servers-empty-string": _servers('[""]'),
    "servers-null": _servers("[null]"),
    "servers-null-scalar": _servers("null"),
    "servers-bool": _servers("[true]"),
    "servers-float": _servers("[80.5]"),
    "servers-nested": _servers("[[127.0.0.1:9]]"),
    "servers-map-bad": _servers("[{address: h:1, weight: 0}]"),
    "servers-map-unknown": _servers("[{address: h:1, wieght: 2}]"),
    "servers-map-noaddr": _servers("[{weight: 2}]"),
    "servers-all-backup": _servers("[{address: h:1, backup: true}]"),
    "servers-999": _servers('["999.1.1.1:80"]'),
    "servers-dash-label": _servers('["-bad.example:80"]'),
    "servers-long-label": _servers('["' + "a" * 64 + '.example:80"]'),
    "servers-sexagesimal": _servers("1:20"),
    "prefix-no-slash": _routes("  - {prefix: api, lane: app}\n"),
    "prefix-empty": _routes("  - {prefix: '', lane: app}\n"),
    "prefix-space": _routes("  - {prefix: '/a b', lane: app}\n"),
    "prefix-query": _routes("  - {prefix: '/a?b', lane: app}\n"),
    "prefix-unicode": _routes("  - {prefix: '/caf\u00e9', lane: app}\n"),
    "prefix-int": _routes("  - {prefix: 5, lane: app}\n"),
    "prefix-null": _routes("  - {prefix: null, lane: app}\n"),
    "prefix-dup": _routes("  - {prefix: /, lane: app}\n  - {prefix: /, lane: app}\n"),
    "route-missing-lane": _routes("  - {prefix: /, lane: nope}\n"),
    "route-lane-int": _routes("  - {prefix: /, lane: 5}\n"),
    "route-no-lane": _routes("  - {prefix: /}\n"),
    "route-string": _routes("  - /\n"),
    "route-null": _routes("  -\n"),
    "route-unknown": _routes("  - {prefix: /, lane: app, bogus: 1}\n"),
    "route-priority-bad": _routes("  - {prefix: /, lane: app, priority: urgent}\n"),
    "route-index-slash": _routes("  - {prefix: /, lane: app, index: a/b}\n"),
    "lane-name-space": MINIMAL.replace("  app:", "  'my lane':").replace("lane: app", "lane: 'my lane'"),
    "lane-name-quote": MINIMAL.replace("  app:", "  'a\"b':").replace("lane: app", "lane: 'a\"b'"),
    "lane-name-int": MINIMAL.replace("  app:", "  1:").replace("lane: app", "lane: '1'"),
    "lane-name-empty": MINIMAL.replace("  app:", "  '':").replace("lane: app", "lane: ''"),
    "unknown-top": MINIMAL + "bogus: 1\n",
    "unknown-base-dir": MINIMAL + "base_dir: /\n",
    "unknown-client": MINIMAL + "client: {bogus: 1}\n",
    "unknown-admin": MINIMAL + "admin: {bogus: 1}\n",
    "unknown-lane": _lane("bogus: 1"),
    "unknown-health": _lane("health: {bogus: 1}"),
    "dur-10x": _lane("read_timeout: 10x"),
    "dur-1e999s": _lane("read_timeout: 1e999s"),
    "dur-neg": _lane("read_timeout: -1s"),
    "dur-neg-num": _lane("read_timeout: -1"),
    "dur-tiny": _lane("read_timeout: 0.0001ms"),
    "dur-space": _lane("read_timeout: ' 5s'"),
    "dur-zero": _lane("read_timeout: 0"),
    "dur-nan": _lane("read_timeout: .nan"),
    "dur-inf": _lane("read_timeout: .inf"),
    "dur-neg-inf": _lane("read_timeout: -.inf"),
    "dur-huge-float": _lane("read_timeout: 1.0e+300"),
    "dur-float-overflow": _lane("read_timeout: 1.0e+999"),
    "dur-empty": _lane("read_timeout: ''"),
    "dur-null": _lane("read_timeout:"),
    "dur-bool": _lane("read_timeout: yes"),
    "dur-list": _lane("read_timeout: [5s]"),
    "dur-map": _lane("read_timeout: {s: 5}"),
    "dur-hex": _lane("read_timeout: 0x10"),
    "dur-exp-string": _lane("read_timeout: '1e3s'"),
    "dur-units-upper": _lane("read_timeout: 5S"),
    "size-1k": _lane("max_body: 1k"),
    "size-1K": _lane("max_body: 1K"),
    "size-1kb": _lane("max_body: 1kb"),
    "size-1kib": _lane("max_body: 1kib"),
    "size-huge": _lane("max_body: 99999999999999999999g"),
    "size-neg": _lane("max_body: -1k"),
    "size-float": _lane("max_body: 1.5"),
    "size-float-unit": _lane("max_body: 1.5k"),
    "size-t": _lane("max_body: 1t"),
    "size-inf": _lane("max_body: .inf"),
    "size-nan": _lane("max_body: .nan"),
    "request-line-small": MINIMAL + "client: {max_request_line: 1}\n",
    "count-neg": _lane("limit: -1"),
    "count-float": _lane("limit: 1.5"),
    "count-string": _lane("limit: lots"),
    "count-bool": _lane("limit: true"),
    "count-huge": _lane("limit: 99999999999999999999999999"),
    "workers-0": MINIMAL + "workers: 0\n",
    "workers-auto": MINIMAL + "workers: auto\n",
    "workers-string": MINIMAL + "workers: many\n",
    "listen-empty-list": MINIMAL.replace("listen: 127.0.0.1:0", "listen: []"),
    "listen-dup": MINIMAL.replace("listen: 127.0.0.1:0", "listen: [127.0.0.1:18123, 127.0.0.1:18123]"),
    "listen-null": MINIMAL.replace("listen: 127.0.0.1:0", "listen:"),
    "listen-map": MINIMAL.replace("listen: 127.0.0.1:0", "listen: {host: x}"),
    "admin-clash": MINIMAL.replace("listen: 127.0.0.1:0", "listen: 127.0.0.1:18124")
    + "admin: {listen: 127.0.0.1:18124}\n",
    "access-log-empty": MINIMAL + "access_log: ''\n",
    "access-log-dir": MINIMAL + "access_log: .\n",
    "access-log-int": MINIMAL + "access_log: 5\n",
    "log-format-bad": MINIMAL + "log_format: xml\n",
    "trusted-bad": MINIMAL + "client: {trusted_proxies: [not-a-cidr]}\n",
    "trusted-scalar": MINIMAL + "client: {trusted_proxies: 10.0.0.0/8}\n",
    "underscore-bad": MINIMAL + "client: {underscore_headers: maybe}\n",
    "retry-on-bad": _lane("retry_on: [sometimes]"),
    "upgrade-h2c": _lane("upgrade: [h2c]"),
    "upgrade-space": _lane("upgrade: ['web socket']"),
    "health-path": _lane("health: {path: 'no slash'}"),
    "health-status": _lane("health: {status: [99]}"),
    "health-zero-interval": _lane("health: {interval: 0}"),
    "huge-line": MINIMAL + "root: '" + "x" * 100_000 + "'\n",
    "many-lanes": "version: 1\nlanes:\n" + "".join(f"  l{i}: {{servers: 127.0.0.1:9}}\n" for i in range(300))
    + "routes: [{prefix: /, lane: l0}]\n",
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus_gets_a_clear_verdict(name):
    rc, lines = assert_clear_verdict(CORPUS[name])
    assert len(lines) <= 400


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("servers-host0", "lanes.app.servers[0]: port out of range"),
        ("servers-65536", "lanes.app.servers[0]: port out of range"),
        ("prefix-no-slash", "routes[0].prefix: a prefix starts with /"),
        ("prefix-dup", "routes[1].prefix: duplicate of routes[0]"),
        ("dup-lane-key", "lanes.app.limit: duplicate key (line 7)"),
        ("unknown-health", "lanes.app.health.bogus: unknown key"),
        ("non-utf8", "not UTF-8 text"),
        ("empty", "(top level): "),
        ("list", "(top level): "),
    ],
)
def test_corpus_refusals_name_the_place(name, expected):
    rc, lines = assert_clear_verdict(CORPUS[name])
    assert rc == 2 and any(expected in line for line in lines), lines


@pytest.mark.parametrize("name", ["servers-v6", "merge-key", "anchor-alias", "bom", "crlf", "size-1K", "dur-space"])
def test_corpus_acceptances(name):
    rc, _ = assert_clear_verdict(CORPUS[name])
    assert rc == 0


# -- part 1b: property fuzz over mutations ---------------------------------------------------------

_SAFE_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/"), max_size=12
)
NUMBERS = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64),  # beyond ~1e308: its own test below
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 65535, 65536, 0.0, -0.0, 1e-300, 1e308, -1e308]),
)
WORDS = st.sampled_from([
    "", " ", "\t", "10x", "1e999s", "-1s", "0.0001ms", " 5s", "5s ", "5 s", "1k", "1K", "1kb", "1KB", "1kib",
    "99999999999999999999g", "-1k", "1.5k", "off", "on", "yes", "auto", "none", "null", "~",
    "host:0", "host:65536", "[::1]:80", "unix:/x", "my host:80", "127.0.0.1:80", "localhost:1",
    "x", "caf\u00e9", "\u2028", "a" * 300, "websocket", "h2c", "error", "http_999", "drop", "json",
    "round_robin", "high", "index.html", "10.0.0.0/8", "-", "NaN", "inf", ".inf",
])
SCALARS = st.one_of(
    NUMBERS, WORDS, _SAFE_TEXT, st.booleans(), st.none(),
    st.dates(min_value=datetime.date(1, 1, 1)), st.binary(max_size=8),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["a", "servers", "prefix", "lane", "listen", "address"]), inner, max_size=3),
    ),
    max_leaves=6,
)


def _containers(node: Any, here: tuple = ()) -> list[tuple]:
    """Paths (tuples of keys/indexes) of every node, the root included."""
    out = [here]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _containers(value, (*here, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _containers(value, (*here, i))
    return out


def _get(node: Any, path: tuple) -> Any:
    for part in path:
        node = node[part]
    return node


@st.composite
def mutated_configs(draw) -> str:
    data = copy.deepcopy(BASE_DATA[draw(st.sampled_from(sorted(BASE_DATA)))])
    for _ in range(draw(st.integers(1, 3))):
        paths = _containers(data)
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "replace", "replace", "unknown", "delete", "wrap", "listify"]))
        target = _get(data, path)
        if op == "unknown" and isinstance(target, dict):
            target[draw(st.sampled_from(["bogus", "Servers", "limit ", "base_dir", "path", "<<"]))] = draw(VALUES)
        elif op == "delete" and path:
            parent = _get(data, path[:-1])
            del parent[path[-1]]
        elif path:
            parent = _get(data, path[:-1])
            old = parent[path[-1]]
            if op == "wrap":
                new = [old]
            elif op == "listify" and isinstance(old, dict):
                new = [{k: v} for k, v in old.items()]
            else:
                new = draw(VALUES)
            parent[path[-1]] = new
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=draw(st.booleans()))


@seed(23)
@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated_configs())
def test_fuzz_mutated_configs_get_a_clear_verdict(text):
    assert_clear_verdict(text)


TEXT_EDITS = [
    lambda t: "\ufeff" + t,
    lambda t: t.replace("  ", "\t", 1),
    lambda t: t.replace(":", ": &a", 1),
    lambda t: t + "\n" + t,
    lambda t: t[: len(t) // 2],
    lambda t: t.replace("\n", "\r\n"),
    lambda t: re.sub(r"\b\d+(ms|s|m|h|k)\b", lambda m: "-" + m.group(0), t),
    lambda t: re.sub(r"\b(\d+)(ms|s|m|h)\b", r"\1x", t),
    lambda t: re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:65536", t),
    lambda t: re.sub(r"prefix: /", "prefix: ", t),
    lambda t: re.sub(r"lane: (\w+)", r"lane: \1_missing", t),
    lambda t: re.sub(r"(?m)^(\s+)(\w+):", r"\1\2:\n\1\2:", t, count=3),
    lambda t: t.replace("version: 1", "version: 1\nversion: 1"),
]


@seed(2323)
@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(BASES)), st.lists(st.sampled_from(range(len(TEXT_EDITS))), min_size=1, max_size=3),
       st.binary(max_size=4), st.integers(0, 4000))
def test_fuzz_text_edits_get_a_clear_verdict(base, edits, junk, where):
    text = BASES[base]
    for i in edits:
        text = TEXT_EDITS[i](text)
    raw = text.encode()
    if junk and b"\x00" not in junk:  # raw bytes anywhere (non-UTF-8 included)
        where %= len(raw) + 1
        raw = raw[:where] + junk + raw[where:]
    assert_clear_verdict(raw)


# -- part 1c: the bugs this audit found, fixed (each pinned) --------------------------------------

def _strict_clear_verdict(text: str) -> list[str]:
    rc, lines = assert_clear_verdict(text)
    return lines


def test_access_log_with_nul_byte_is_a_clear_error():
    _strict_clear_verdict(MINIMAL + 'access_log: "a\\0b"\n')


def test_root_with_nul_byte_is_a_clear_error():
    _strict_clear_verdict(MINIMAL.replace("lane: app}", "lane: app, try_files: true, root: \"a\\0b\"}"))


def test_huge_integer_duration_is_a_clear_error():
    _strict_clear_verdict(_lane("read_timeout: " + "9" * 400))


def test_recursive_alias_is_a_clear_error():
    _strict_clear_verdict(MINIMAL + "client: &a {x: *a}\n")


def test_deep_nesting_is_a_clear_error():
    _strict_clear_verdict(MINIMAL + "client: " + "[" * 3000 + "]" * 3000 + "\n")


@pytest.mark.parametrize("key", ["1", "true", "2020-01-01"])
def test_non_string_keys_name_an_existing_path(key):
    _strict_clear_verdict(MINIMAL + f"{key}: x\n")


@pytest.mark.parametrize("snippet", [
    "servers: ['127.0.0.1:\u0661\u0662']",
    "servers: [127.0.0.1:9]\n    read_timeout: '\u0661s'",
    "servers: [127.0.0.1:9]\n    max_body: '\u0661k'",
])
def test_non_ascii_digits_are_refused(snippet):
    text = MINIMAL.replace("servers: [127.0.0.1:9]", snippet)
    rc, lines = assert_clear_verdict(text, start=False)
    assert rc == 2, "non-ASCII digits accepted as a number"


def test_superscript_digit_port_message_is_ours():
    rc, lines = assert_clear_verdict(_servers("['127.0.0.1:\u00b2']"))
    assert rc == 2
    assert not any("invalid literal for int()" in line for line in lines), lines


def test_reader_error_is_one_line(tmp_path):
    path = tmp_path / "ctl.yaml"
    path.write_bytes(b"\x01" + MINIMAL.encode())
    rc, out, _ = _call(["check", "-c", str(path)])
    assert rc == 2
    assert len(out.splitlines()) == 1, out


@pytest.mark.parametrize("key", ["queue_target", "queue_interval"])
def test_zero_queue_target_is_refused_or_starts(key, tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text(_lane(f"limit: 2\n    {key}: 0"))
    rc, _, _ = _call(["check", "-c", str(path)])
    if rc == 0:
        cfg = load_config(path)

        async def go() -> None:
            proxy = Proxy(cfg)
            await proxy.start()
            await proxy.stop(drain_timeout=0.1)

        try:
            uvloop.run(go()) if uvloop is not None else asyncio.run(go())
        except ValueError as exc:
            raise AssertionError(f"check accepted {key}: 0 but the proxy refused it: {exc}") from None


@pytest.mark.timeout(20)
def test_alias_fanout_is_answered_quickly(tmp_path):
    levels = ["a: &a [1,1,1,1,1,1,1,1,1,1]"]
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 10) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(levels) + "\n" + MINIMAL)
    try:
        proc = subprocess.run([sys.executable, "-m", "laneproxy", "check", "-c", str(path)],
                              capture_output=True, timeout=4, cwd=REPO)
    except subprocess.TimeoutExpired:
        raise AssertionError("check did not answer within 4 s") from None
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr


# -- part 2: /metrics exposition ------------------------------------------------------------------

ODD_PREFIXES = ['/q"uote', "/back\\slash", "/br{a=b,c}", "/mixed\\\"{}=,x", "/plain"]


def test_label_unfriendly_names_the_config_refuses():
    """Lane names are restricted to [A-Za-z0-9_.-] and prefixes to printable ASCII: say so clearly."""
    for name in ['a"b', "a\\b", "caf\u00e9", "a b"]:
        text = MINIMAL.replace("  app:", f"  {json.dumps(name)}:").replace(
            "lane: app", f"lane: {json.dumps(name)}")
        with pytest.raises(ConfigError) as exc:
            parse_config(text)
        assert any(p.startswith("lanes: lane name") for p in exc.value.problems), exc.value.problems
    for prefix in ["/caf\u00e9", "/a b", "/\u2028"]:
        with pytest.raises(ConfigError) as exc:
            parse_config(MINIMAL.replace("prefix: /", f"prefix: {json.dumps(prefix)}"))
        assert exc.value.problems == ["routes[0].prefix: a prefix is a path without spaces, '?' or '#'"]
    for prefix in ODD_PREFIXES:  # all accepted: they end up as label values
        parse_config(MINIMAL.replace("prefix: /", f"prefix: {json.dumps(prefix)}"))


async def _scrape(session: aiohttp.ClientSession, port: int) -> tuple[str, str]:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        return resp.headers["Content-Type"], await resp.text()


def conformance(text: str) -> dict[tuple[str, frozenset], tuple[str, float]]:
    """Check one exposition; return {(sample, labels): (family type, value)}."""
    helps = set(re.findall(r"(?m)^# HELP (\S+) ", text))
    types = dict(re.findall(r"(?m)^# TYPE (\S+) (\S+)$", text))
    samples: dict[tuple[str, frozenset], tuple[str, float]] = {}
    families = list(text_string_to_metric_families(text))
    assert families
    for fam in families:
        declared = fam.name if fam.name in types else f"{fam.name}_total"
        assert declared in types, f"no TYPE for {fam.name}"
        assert declared in helps, f"no HELP for {fam.name}"
        assert fam.type in ("counter", "gauge", "histogram"), (fam.name, fam.type)
        assert fam.documentation.strip(), fam.name
        for s in fam.samples:
            if fam.type == "counter":
                assert s.name in (f"{fam.name}_total", f"{fam.name}_created"), s.name
            elif fam.type == "histogram":
                assert s.name in tuple(f"{fam.name}{x}" for x in ("_bucket", "_count", "_sum", "_created")), s.name
            else:
                assert s.name == fam.name, s.name
            assert not math.isnan(s.value), s
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = (fam.type, s.value)
        if fam.type == "histogram":
            series: dict[frozenset, list[tuple[float, float]]] = {}
            for s in fam.samples:
                if s.name.endswith("_bucket"):
                    rest = frozenset((k, v) for k, v in s.labels.items() if k != "le")
                    series.setdefault(rest, []).append((float(s.labels["le"]), s.value))
            assert series, fam.name
            for rest, buckets in series.items():
                les = [le for le, _ in buckets]
                assert les == sorted(les) and len(set(les)) == len(les), (fam.name, les)
                counts = [v for _, v in buckets]
                assert counts == sorted(counts), (fam.name, dict(rest), buckets)
                assert les[-1] == math.inf, (fam.name, les)
                count = samples[(f"{fam.name}_count", rest)][1]
                assert counts[-1] == count, (fam.name, dict(rest), counts[-1], count)
                assert samples[(f"{fam.name}_sum", rest)][1] >= 0
    return samples


def _counters(samples: dict) -> dict:
    return {k: v for k, (t, v) in samples.items() if t in ("counter", "histogram")
            and not k[0].endswith("_created") and not k[0].endswith("_sum")}


def _monotonic(before: dict, after: dict, keep=lambda key: True) -> None:
    for key, value in before.items():
        if not keep(key):
            continue
        assert key in after, f"counter series vanished: {key}"
        assert after[key] >= value, f"counter went down: {key} {value} -> {after[key]}"


async def test_metrics_exposition_conformance(upstream, tmp_path):
    async def app(reader, writer, up):
        while True:
            head, _, _ = await reader.read_request()
            target = head.split(b" ")[1]
            status = b"500 Internal Server Error" if b"boom" in target else b"200 OK"
            writer.write(b"HTTP/1.1 %s\r\nContent-Length: 2\r\n\r\nok" % status)
            await writer.drain()

    up = await upstream(app)
    dead = await upstream()
    dead_port = dead.port
    await dead.close()  # refused from now on: 502s
    routes = [{"prefix": p, "lane": "app.v1-x_y"} for p in ODD_PREFIXES[:-1]]
    routes.append({"prefix": "/plain", "lane": "dead-lane"})
    cfg = make_config({"app.v1-x_y": [up.port], "dead-lane": [dead_port]}, routes=routes,
                      admin={"listen": "127.0.0.1:0"}, drain_timeout="200ms")
    cfg["lanes"]["app.v1-x_y"]["max_body"] = 16
    cfg["lanes"]["dead-lane"]["retries"] = 0
    path = tmp_path / "lp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proxy = Proxy(load_config(path))
    await proxy.start()
    try:
        admin_port = proxy.admin.addresses[0][1]

        def target(prefix: str, tail: str = "") -> bytes:
            return (prefix + tail).encode()

        async def traffic(rounds: int) -> None:
            for _ in range(rounds):
                for prefix in ODD_PREFIXES[:-1]:
                    status, _, _ = await exchange(proxy.port, b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % target(prefix))
                    assert status in (200, 400), (prefix, status)
                st_, _, _ = await exchange(proxy.port, b'GET /q"uoteboom HTTP/1.1\r\nHost: t\r\n\r\n')
                assert st_ == 500
                assert (await exchange(proxy.port, b"GET /plain HTTP/1.1\r\nHost: t\r\n\r\n"))[0] == 502
                assert (await exchange(proxy.port, b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n"))[0] == 404
                big = b'POST /q"uote HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n' + b"x" * 100
                assert (await exchange(proxy.port, big))[0] == 413
                assert (await exchange(proxy.port, b"GET / HTTP/1.1\r\n\r\n"))[0] == 400

        async with aiohttp.ClientSession() as session:
            await traffic(2)
            ctype, text = await _scrape(session, admin_port)
            params = [part.strip() for part in ctype.split(";")]
            # Prometheus text: 0.0.4, or 1.0.0 as prometheus_client >= 0.22 labels the same text.
            assert params[0] == "text/plain" and "charset=utf-8" in params, ctype
            assert {"version=0.0.4", "version=1.0.0"} & set(params), ctype
            first = conformance(text)
            # Label values round-trip exactly: every configured prefix and lane comes back verbatim.
            route_labels = {dict(k[1])["route"] for k in first if k[0] == "laneproxy_route_responses_total"}
            assert route_labels == set(ODD_PREFIXES), route_labels
            lane_labels = {dict(k[1])["lane"] for k in first if "lane" in dict(k[1])}
            assert lane_labels == {"app.v1-x_y", "dead-lane"}, lane_labels
            classes = {
                dict(k[1])["route"]: v for k, (_, v) in first.items()
                if k[0] == "laneproxy_route_responses_total" and dict(k[1])["class"] == "5xx"
            }
            assert classes['/q"uote'] >= 2 and classes["/plain"] >= 2, classes
            assert first[("laneproxy_local_responses_total", frozenset({("status", "404")}))][1] >= 2

            await traffic(1)
            second = conformance((await _scrape(session, admin_port))[1])
            _monotonic(_counters(first), _counters(second))

            # Reload: the app lane and its routes stay; the dead lane changes (its counters may restart).
            cfg["lanes"]["dead-lane"]["connect_timeout"] = "2s"
            path.write_text(yaml.safe_dump(cfg))
            async with session.post(f"http://127.0.0.1:{admin_port}/api/reload") as resp:
                body = await resp.json()
                assert resp.status == 200 and body["ok"] is True, body
            third = conformance((await _scrape(session, admin_port))[1])

            def kept(key) -> bool:
                return dict(key[1]).get("lane") != "dead-lane"

            _monotonic(_counters(second), _counters(third), keep=kept)
            await traffic(1)
            fourth = conformance((await _scrape(session, admin_port))[1])
            _monotonic(_counters(third), _counters(fourth))
            route_labels = {dict(k[1])["route"] for k in fourth if k[0] == "laneproxy_route_responses_total"}
            assert route_labels == set(ODD_PREFIXES)
    finally:
        await proxy.stop(drain_timeout=0.2)
