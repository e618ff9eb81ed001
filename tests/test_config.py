"""Pure unit tests for laneproxy.config: scalar parsers, every parse_config error path, defaults,
relative paths, the shipped default files, and every key that docs/interface.md names."""

from __future__ import annotations

import ipaddress
import math
import re
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from laneproxy import config as config_mod
from laneproxy.config import (
    DEFAULT_CONFIG_PATH,
    ClientConfig,
    ConfigError,
    LaneConfig,
    load_config,
    parse_config,
)
from laneproxy.config_values import parse_duration, parse_hostport, parse_size

REPO = Path(__file__).resolve().parent.parent
CONF_FILE = REPO / "conf" / "laneproxy.yaml"

# One lane, one route: the smallest valid file. Tests append or substitute sections.
MINIMAL = """\
version: 1
lanes:
  task:
    servers: ["127.0.0.1:8686"]
routes:
  - prefix: /
    lane: task
"""


def yaml_text(text: str) -> str:
    return textwrap.dedent(text)


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml_text(text))
    problems = info.value.problems
    assert str(info.value) == "\n".join(problems)
    return problems


def lookup(obj, dotted: str):
    """`client.header_timeout`, `lanes.task.limit`, `routes.0.lane` on a parsed config."""
    for part in dotted.split("."):
        if isinstance(obj, dict):
            obj = obj[part]
        elif isinstance(obj, tuple) and part.isdigit():
            obj = obj[int(part)]
        else:
            obj = getattr(obj, part)
    return obj


def split_problem(line: str) -> tuple[str, str]:
    path, sep, message = line.partition(": ")
    assert sep, f"not a `yaml.path: message` line: {line!r}"
    return path, message


# -- parse_duration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (5, 5.0),
        (1.5, 1.5),
        ("250ms", 0.25),
        ("5s", 5.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("30", 30.0),
        ("0.5s", 0.5),
        ("1.5m", 90.0),
        ("0ms", 0.0),
        (" 5s ", 5.0),
        ("300s", 300.0),
    ],
)
def test_parse_duration_valid(value, seconds):
    result = parse_duration(value)
    assert isinstance(result, float)
    assert result == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "expected a duration like 250ms, 5s, 2m, 1h"),
        (False, "expected a duration like 250ms, 5s, 2m, 1h"),
        (None, "expected a duration like 250ms, 5s, 2m, 1h"),
        ("", "expected a duration like 250ms, 5s, 2m, 1h"),
        ("s", "expected a duration like 250ms, 5s, 2m, 1h"),
        ("5x", "expected a duration like 250ms, 5s, 2m, 1h"),
        ("5 seconds", "expected a duration like 250ms, 5s, 2m, 1h"),
        ("five", "expected a duration like 250ms, 5s, 2m, 1h"),
        ("1e3", "expected a duration like 250ms, 5s, 2m, 1h"),
        ("5s5", "expected a duration like 250ms, 5s, 2m, 1h"),
        ("-5s", "expected a duration like 250ms, 5s, 2m, 1h"),
        ([5], "expected a duration like 250ms, 5s, 2m, 1h"),
        ({"s": 5}, "expected a duration like 250ms, 5s, 2m, 1h"),
        (-1, "duration must not be negative"),
        (-0.5, "duration must not be negative"),
        (math.nan, "finite"),
        (math.inf, "finite"),
        (-math.inf, "finite"),
    ],
)
def test_parse_duration_invalid(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_duration(value)


# -- parse_size -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (512, 512),
        ("512", 512),
        ("8k", 8 * 1024),
        ("8K", 8 * 1024),
        ("32k", 32 * 1024),
        ("1m", 1024 * 1024),
        ("1M", 1024 * 1024),
        ("1g", 1024**3),
        (" 1m ", 1024 * 1024),
    ],
)
def test_parse_size_valid(value, size):
    result = parse_size(value)
    assert type(result) is int
    assert result == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "expected a size like 512, 8k, 1m"),
        (False, "expected a size like 512, 8k, 1m"),
        (None, "expected a size like 512, 8k, 1m"),
        (1.5, "expected a size like 512, 8k, 1m"),
        ("1.5m", "expected a size like 512, 8k, 1m"),
        ("", "expected a size like 512, 8k, 1m"),
        ("k", "expected a size like 512, 8k, 1m"),
        ("8x", "expected a size like 512, 8k, 1m"),
        ("1t", "expected a size like 512, 8k, 1m"),
        ("-1k", "expected a size like 512, 8k, 1m"),
        ("lots", "expected a size like 512, 8k, 1m"),
        ([1], "expected a size like 512, 8k, 1m"),
        (-1, "size must not be negative"),
    ],
)
def test_parse_size_invalid(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_size(value)


# -- parse_hostport ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("localhost:80", ("localhost", 80)),
        ("upstream-1.example.com:65535", ("upstream-1.example.com", 65535)),
        ("[::1]:80", ("::1", 80)),
        ("[::]:8080", ("::", 8080)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        (" 127.0.0.1:80 ", ("127.0.0.1", 80)),
        (8080, ("0.0.0.0", 8080)),
    ],
)
def test_parse_hostport_valid(value, expected):
    assert parse_hostport(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("127.0.0.1:0", "port out of range"),
        ("127.0.0.1:65536", "port out of range"),
        ("[::1]:65536", "port out of range"),
        ("[::1]:0", "port out of range"),
        (0, "port out of range"),
        (65536, "port out of range"),
        (-1, "invalid port"),
        ("127.0.0.1:-1", "invalid port"),
        ("127.0.0.1:http", "invalid port"),
        ("127.0.0.1:", "invalid port"),
        ("127.0.0.1:80x", "invalid port"),
        ("[::1]:", "invalid port"),
        ("127.0.0.1", 'expected "host:port"'),
        ("", 'expected "host:port"'),
        ("[::1]", 'expected "[ipv6]:port"'),
        ("[::1]80", 'expected "[ipv6]:port"'),
        ("::1:80", 'write IPv6 addresses as "[addr]:port"'),
        ("2001:db8::1:443", 'write IPv6 addresses as "[addr]:port"'),
        (":80", "invalid host"),
        ("[]:80", "invalid host"),
        ("bad host:80", "invalid host"),
        ("a/b:80", "invalid host"),
        (True, 'expected "host:port"'),
        (False, 'expected "host:port"'),
        (None, 'expected "host:port"'),
        (1.5, 'expected "host:port"'),
        (["127.0.0.1:80"], 'expected "host:port"'),
    ],
)
def test_parse_hostport_invalid(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_hostport(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:0", ("::1", 0)),
        (0, ("0.0.0.0", 0)),
        ("127.0.0.1:65535", ("127.0.0.1", 65535)),
    ],
)
def test_parse_hostport_any_port_admits_zero(value, expected):
    assert parse_hostport(value, allow_any_port=True) == expected


@pytest.mark.parametrize("value", ["127.0.0.1:65536", "127.0.0.1:-1"])
def test_parse_hostport_any_port_still_bounded(value):
    with pytest.raises(ValueError):
        parse_hostport(value, allow_any_port=True)


# -- parse_config: errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("version: 1\nlisten: a: b\n", 2, 10),
        ("version: 1\nroutes:\n  - prefix: /\n   lane: x\n", 4, 4),
        ("version: 1\n\tlanes: {}\n", 2, 1),
        ("version: 1\nlanes: [\n", 3, 1),
    ],
)
def test_yaml_syntax_error_names_line_and_column(text, line, column):
    problems = problems_of(text)
    assert len(problems) == 1
    assert re.fullmatch(rf"\(yaml\) line {line}, column {column}: \S.*", problems[0]), problems


@pytest.mark.parametrize(
    "text",
    ["", "# only a comment\n", "- version: 1\n", "just a string\n", "42\n", "null\n", "[]\n"],
)
def test_top_level_must_be_a_mapping(text):
    problems = problems_of(text)
    assert len(problems) == 1
    assert problems[0].startswith("(top level): ")
    assert "mapping" in problems[0]


# (yaml text, [(exact path, message regex (fullmatch))]); the regex is the literal message
# wherever docs/interface.md fixes it.
ERROR_CASES = {
    "version missing": (
        MINIMAL.replace("version: 1\n", ""),
        [("version", r".*missing.*")],
    ),
    "version 2": (
        MINIMAL.replace("version: 1", "version: 2"),
        [("version", r".*version 1.*")],
    ),
    "version as string": (
        MINIMAL.replace("version: 1", "version: '1'"),
        [("version", r".*version 1.*")],
    ),
    "version yes": (
        MINIMAL.replace("version: 1", "version: yes"),
        [("version", r".*version 1.*")],
    ),
    "unknown top-level key": (
        MINIMAL + "bogus: 1\n",
        [("bogus", "unknown key")],
    ),
    "misspelt top-level key": (
        MINIMAL + "listen_on: 8080\n",
        [("listen_on", "unknown key")],
    ),
    "base_dir is not a YAML key": (
        MINIMAL + "base_dir: /etc\n",
        [("base_dir", "unknown key")],
    ),
    "unknown key in client": (
        MINIMAL + "client:\n  keepalive: 5\n",
        [("client.keepalive", "unknown key")],
    ),
    "unknown key in a lane": (
        MINIMAL.replace("    servers:", "    bogus: 1\n    servers:"),
        [("lanes.task.bogus", "unknown key")],
    ),
    "unknown key in a lane named like a pydantic step": (
        MINIMAL.replace("task", "function-x").replace("    servers:", "    bogus: 1\n    servers:"),
        [("lanes.function-x.bogus", "unknown key")],
    ),
    "unknown key in a route": (
        MINIMAL + "  - prefix: /api\n    lane: task\n    foo: 1\n",
        [("routes[1].foo", "unknown key")],
    ),
    "unknown key in admin": (
        MINIMAL + "admin:\n  listen: 127.0.0.1:9901\n  bogus: true\n",
        [("admin.bogus", "unknown key")],
    ),
    "server port out of range": (
        MINIMAL.replace('["127.0.0.1:8686"]', '["127.0.0.1:70000"]'),
        [("lanes.task.servers[0]", "port out of range")],
    ),
    "server port 0": (
        MINIMAL.replace('["127.0.0.1:8686"]', '["127.0.0.1:0"]'),
        [("lanes.task.servers[0]", "port out of range")],
    ),
    "second server bad": (
        MINIMAL.replace('["127.0.0.1:8686"]', '["127.0.0.1:8686", "127.0.0.1:65536"]'),
        [("lanes.task.servers[1]", "port out of range")],
    ),
    "single server string bad": (
        MINIMAL.replace('["127.0.0.1:8686"]', '"127.0.0.1:99999"'),
        [("lanes.task.servers[0]", "port out of range")],
    ),
    "server garbage": (
        MINIMAL.replace('["127.0.0.1:8686"]', '["nonsense"]'),
        [("lanes.task.servers[0]", r".*host:port.*")],
    ),
    "servers empty": (
        MINIMAL.replace('["127.0.0.1:8686"]', "[]"),
        [("lanes.task.servers", r".*empty.*")],
    ),
    "servers missing": (
        MINIMAL.replace('    servers: ["127.0.0.1:8686"]\n', "    limit: 1\n"),
        [("lanes.task.servers", r".*missing.*")],
    ),
    "lane is not a mapping": (
        MINIMAL.replace('  task:\n    servers: ["127.0.0.1:8686"]\n', "  task: 127.0.0.1:8686\n"),
        [("lanes.task", r".+")],
    ),
    "route to unknown lane": (
        MINIMAL.replace("lane: task", "lane: nope"),
        [("routes[0].lane", r".*'nope'.*task.*")],
    ),
    "duplicate prefixes": (
        MINIMAL + "  - prefix: /\n    lane: task\n",
        [("routes[1].prefix", r".*duplicate.*routes\[0\].*")],
    ),
    "prefix without leading slash": (
        MINIMAL.replace("prefix: /", "prefix: api"),
        [("routes[0].prefix", r".*starts with /.*")],
    ),
    "prefix with a space": (
        MINIMAL.replace("prefix: /", "prefix: /a b"),
        [("routes[0].prefix", r".+")],
    ),
    "prefix with a query": (
        MINIMAL.replace("prefix: /", "prefix: /a?b"),
        [("routes[0].prefix", r".+")],
    ),
    "route without lane": (
        MINIMAL.replace("    lane: task\n", ""),
        [("routes[0].lane", r".*missing.*")],
    ),
    "empty lanes": (
        "version: 1\nlanes: {}\nroutes:\n  - {prefix: /, lane: task}\n",
        [("lanes", r".*empty.*")],
    ),
    "empty routes": (
        'version: 1\nlanes:\n  task: {servers: ["127.0.0.1:1"]}\nroutes: []\n',
        [("routes", r".*empty.*")],
    ),
    "lanes missing": (
        "version: 1\nroutes:\n  - {prefix: /, lane: task}\n",
        [("lanes", r".*missing.*")],
    ),
    "routes missing": (
        'version: 1\nlanes:\n  task: {servers: ["127.0.0.1:1"]}\n',
        [("routes", r".*missing.*")],
    ),
    "bad lane name": (
        MINIMAL.replace("  task:", "  'a b':").replace("lane: task", "lane: a b"),
        [("lanes", r".*'a b'.*")],
    ),
    "bad CIDR": (
        MINIMAL + "client:\n  trusted_proxies: ['10.0.0.0/8', '10.0.0.0/33']\n",
        [("client.trusted_proxies", r".*10\.0\.0\.0/33.*")],
    ),
    "CIDR garbage": (
        MINIMAL + "client:\n  trusted_proxies: [not-a-network]\n",
        [("client.trusted_proxies", r".*not-a-network.*")],
    ),
    "trusted_proxies not a list": (
        MINIMAL + "client:\n  trusted_proxies: {a: 1}\n",
        [("client.trusted_proxies", r".+")],
    ),
    "h2c in upgrade": (
        MINIMAL.replace("    servers:", "    upgrade: [websocket, h2c]\n    servers:"),
        [("lanes.task.upgrade", r".*h2c.*")],
    ),
    "H2C in upgrade, any case": (
        MINIMAL.replace("    servers:", "    upgrade: H2C\n    servers:"),
        [("lanes.task.upgrade", r".*h2c.*")],
    ),
    "bad upgrade token": (
        MINIMAL.replace("    servers:", "    upgrade: ['web socket']\n    servers:"),
        [("lanes.task.upgrade", r".*web socket.*")],
    ),
    "bad duration": (
        MINIMAL.replace("    servers:", "    read_timeout: 5x\n    servers:"),
        [("lanes.task.read_timeout", r".*250ms.*'5x'.*")],
    ),
    "negative duration": (
        MINIMAL + "drain_timeout: -1\n",
        [("drain_timeout", r".*negative.*")],
    ),
    "nan duration": (
        MINIMAL + "client:\n  keepalive_timeout: .nan\n",
        [("client.keepalive_timeout", r".*finite.*")],
    ),
    "infinite duration": (
        MINIMAL + "drain_timeout: .inf\n",
        [("drain_timeout", r".*finite.*")],
    ),
    "zero connect_timeout": (
        MINIMAL.replace("    servers:", "    connect_timeout: 0\n    servers:"),
        [("lanes.task.connect_timeout", r".+")],
    ),
    "bad size": (
        MINIMAL.replace("    servers:", "    max_body: 1.5m\n    servers:"),
        [("lanes.task.max_body", r".*8k.*")],
    ),
    "negative limit": (
        MINIMAL.replace("    servers:", "    limit: -1\n    servers:"),
        [("lanes.task.limit", r".+")],
    ),
    "workers zero": (
        MINIMAL + "workers: 0\n",
        [("workers", r".+")],
    ),
    "workers garbage": (
        MINIMAL + "workers: many\n",
        [("workers", r".+")],
    ),
    "log_format unknown": (
        MINIMAL + "log_format: xml\n",
        [("log_format", r".*combined.*json.*")],
    ),
    "listen port out of range": (
        MINIMAL + "listen: ['127.0.0.1:8080', '127.0.0.1:65536']\n",
        [("listen[1]", "port out of range")],
    ),
    "listen twice": (
        MINIMAL + "listen: ['127.0.0.1:8080', '127.0.0.1:8080']\n",
        [("listen", r".*twice.*")],
    ),
    "listen empty": (
        MINIMAL + "listen: []\n",
        [("listen", r".*empty.*")],
    ),
    "admin listen out of range": (
        MINIMAL + "admin:\n  listen: 127.0.0.1:65536\n",
        [("admin.listen", "port out of range")],
    ),
    "client max_header_size not a size": (
        MINIMAL + "client:\n  max_header_size: big\n",
        [("client.max_header_size", r".*'big'.*")],
    ),
    "try_files not a bool": (
        MINIMAL + "  - {prefix: /x, lane: task, try_files: sometimes}\n",
        [("routes[1].try_files", r".+")],
    ),
}


@pytest.mark.parametrize(("text", "expected"), ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_parse_config_error(text, expected):
    problems = problems_of(text)
    got = [split_problem(line) for line in problems]
    assert [path for path, _ in got] == [path for path, _ in expected], problems
    for (_, message), (_, pattern) in zip(got, expected, strict=True):
        assert re.fullmatch(pattern, message), (message, pattern)


def test_interface_example_message_exactly():
    text = MINIMAL.replace('["127.0.0.1:8686"]', '["127.0.0.1:0", "127.0.0.1:99999"]')
    assert problems_of(text) == [
        "lanes.task.servers[0]: port out of range",
        "lanes.task.servers[1]: port out of range",
    ]


def test_several_field_problems_are_all_reported_once_each():
    text = """\
    version: 1
    bogus: 1
    workers: 0
    client:
      header_timeout: soon
      extra: 1
    admin:
      bogus: 2
    lanes:
      task:
        servers: ["127.0.0.1:8686", "127.0.0.1:0"]
        nope: 1
        max_body: lots
      webman:
        servers: []
    routes:
      - prefix: /tast
        lane: task
      - prefix: /
        lane: webman
        foo: 1
      - prefix: relative
        lane: webman
    """
    problems = problems_of(text)
    expected_paths = {
        "bogus",
        "workers",
        "client.header_timeout",
        "client.extra",
        "admin.bogus",
        "lanes.task.servers[1]",
        "lanes.task.nope",
        "lanes.task.max_body",
        "lanes.webman.servers",
        "routes[1].foo",
        "routes[2].prefix",
    }
    paths = [split_problem(line)[0] for line in problems]
    assert len(paths) == len(set(paths)), "one line per problem, no duplicates"
    assert set(paths) == expected_paths
    # no noise from parents: no reported path is a parent of another reported path
    for a in paths:
        for b in paths:
            if a != b:
                assert not b.startswith(a + ".") and not b.startswith(a + "["), (a, b)
    assert "lanes.task.servers[1]: port out of range" in problems
    assert "lanes.task.nope: unknown key" in problems
    assert "routes[1].foo: unknown key" in problems
    assert "admin.bogus: unknown key" in problems
    assert "client.extra: unknown key" in problems
    assert "bogus: unknown key" in problems
    assert all("\n" not in line for line in problems)


def test_several_cross_check_problems_are_all_reported():
    text = """\
    version: 1
    listen: ["127.0.0.1:8080", "127.0.0.1:8080"]
    lanes:
      task: {servers: ["127.0.0.1:8686"]}
    routes:
      - {prefix: /, lane: nope}
      - {prefix: /, lane: task}
      - {prefix: /x, lane: other}
    """
    paths = [split_problem(line)[0] for line in problems_of(text)]
    assert sorted(paths) == sorted(["routes[0].lane", "routes[1].prefix", "routes[2].lane", "listen"])


def test_config_error_is_a_value_error_with_problem_lines():
    err = ConfigError(["a: b", "c[0]: d"])
    assert isinstance(err, ValueError)
    assert err.problems == ["a: b", "c[0]: d"]
    assert str(err) == "a: b\nc[0]: d"


# -- parse_config: accepted shapes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen_yaml", "expected"),
    [
        ('"127.0.0.1:8080"', (("127.0.0.1", 8080),)),
        ("127.0.0.1:8080", (("127.0.0.1", 8080),)),
        ("8081", (("0.0.0.0", 8081),)),
        ('"[::1]:8080"', (("::1", 8080),)),
        ('["127.0.0.1:8080", "[::1]:8080"]', (("127.0.0.1", 8080), ("::1", 8080))),
        ('["127.0.0.1:8080"]', (("127.0.0.1", 8080),)),
        ('["127.0.0.1:0", "127.0.0.1:0"]', (("127.0.0.1", 0), ("127.0.0.1", 0))),
    ],
)
def test_listen_string_or_list(listen_yaml, expected):
    cfg = parse_config(MINIMAL + f"listen: {listen_yaml}\n")
    assert cfg.listen == expected


@pytest.mark.parametrize(
    ("servers_yaml", "expected"),
    [
        ('"127.0.0.1:8686"', (("127.0.0.1", 8686),)),
        ("127.0.0.1:8686", (("127.0.0.1", 8686),)),
        ('["127.0.0.1:8686"]', (("127.0.0.1", 8686),)),
        ('["10.0.0.1:80", "10.0.0.2:80", "[::1]:81"]', (("10.0.0.1", 80), ("10.0.0.2", 80), ("::1", 81))),
    ],
)
def test_servers_string_or_list(servers_yaml, expected):
    cfg = parse_config(MINIMAL.replace('["127.0.0.1:8686"]', servers_yaml))
    assert tuple(s.address for s in cfg.lanes["task"].servers) == expected


@pytest.mark.parametrize(
    ("upgrade_yaml", "expected"),
    [
        ("[websocket]", ("websocket",)),
        ("WebSocket", ("websocket",)),
        ("[]", ()),
        ("[websocket, foo-bar]", ("websocket", "foo-bar")),
    ],
)
def test_upgrade_tokens(upgrade_yaml, expected):
    cfg = parse_config(MINIMAL.replace("    servers:", f"    upgrade: {upgrade_yaml}\n    servers:"))
    assert cfg.lanes["task"].upgrade == expected


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("", None),
        ("access_log: off\n", None),
        ("access_log: Off\n", None),
        ("access_log: false\n", None),
        ("access_log: 'off'\n", None),
        ("access_log: 'OFF'\n", None),
        ("access_log: null\n", None),
        ("access_log:\n", None),
        ('access_log: "-"\n', "-"),
        ("access_log: logs/access.log\n", "logs/access.log"),
        ("access_log: /var/log/laneproxy.log\n", "/var/log/laneproxy.log"),
    ],
)
def test_access_log(line, expected):
    assert parse_config(MINIMAL + line).access_log == expected


@pytest.mark.parametrize(("cpus", "expected"), [(7, 7), (1, 1), (None, 1)])
def test_workers_auto(monkeypatch, cpus, expected):
    monkeypatch.setattr(config_mod.os, "cpu_count", lambda: cpus)
    assert parse_config(MINIMAL + "workers: auto\n").workers == expected


def test_workers_number():
    assert parse_config(MINIMAL + "workers: 4\n").workers == 4


@pytest.mark.parametrize(
    ("proxies_yaml", "expected"),
    [
        ("[]", ()),
        ("10.0.0.0/8", (ipaddress.ip_network("10.0.0.0/8"),)),
        (
            "['10.0.0.0/8', '192.168.1.7', 'fd00::/8']",
            (
                ipaddress.ip_network("10.0.0.0/8"),
                ipaddress.ip_network("192.168.1.7/32"),
                ipaddress.ip_network("fd00::/8"),
            ),
        ),
        ("['10.1.2.3/8']", (ipaddress.ip_network("10.0.0.0/8"),)),
    ],
)
def test_trusted_proxies(proxies_yaml, expected):
    cfg = parse_config(MINIMAL + f"client:\n  trusted_proxies: {proxies_yaml}\n")
    assert cfg.client.trusted_proxies == expected


@pytest.mark.parametrize(
    ("setting", "attr", "expected"),
    [
        ("read_timeout: 250ms", "read_timeout", 0.25),
        ("read_timeout: 2m", "read_timeout", 120.0),
        ("read_timeout: 1h", "read_timeout", 3600.0),
        ("read_timeout: 300", "read_timeout", 300.0),
        ("read_timeout: 1.5", "read_timeout", 1.5),
        ("max_body: 8k", "max_body", 8192),
        ("max_body: 1m", "max_body", 1048576),
        ("max_body: 1g", "max_body", 1073741824),
        ("max_body: 100", "max_body", 100),
        ("max_body: 0", "max_body", 0),
        ("limit: 8", "limit", 8),
        ("queue: 1000", "queue", 1000),
        ("retries: 0", "retries", 0),
        ("keepalive: 0", "keepalive", 0),
    ],
)
def test_lane_values_are_converted(setting, attr, expected):
    cfg = parse_config(MINIMAL.replace("    servers:", f"    {setting}\n    servers:"))
    assert getattr(cfg.lanes["task"], attr) == expected


# -- defaults (nginx's, per docs/interface.md) ------------------------------------------------


DEFAULTS = [
    ("version", 1),
    ("listen", (("0.0.0.0", 8080),)),
    ("workers", 1),
    ("root", "./public"),
    ("access_log", None),
    ("log_format", "combined"),
    ("drain_timeout", 30.0),
    ("admin", None),
    ("client.header_timeout", 60.0),
    ("client.body_timeout", 60.0),
    ("client.send_timeout", 60.0),
    ("client.keepalive_timeout", 75.0),
    ("client.keepalive_requests", 1000),
    ("client.max_connections", 10000),
    ("client.max_request_line", 8 * 1024),
    ("client.max_header_size", 32 * 1024),
    ("client.max_headers", 100),
    ("client.trusted_proxies", ()),
    ("lanes.task.keepalive", 10240),
    ("lanes.task.keepalive_timeout", 60.0),
    ("lanes.task.keepalive_requests", 1000),
    ("lanes.task.connect_timeout", 5.0),
    ("lanes.task.read_timeout", 60.0),
    ("lanes.task.send_timeout", 60.0),
    ("lanes.task.max_body", 1024 * 1024),
    ("lanes.task.limit", 0),
    ("lanes.task.queue", 0),
    ("lanes.task.queue_timeout", 30.0),
    ("lanes.task.retries", 1),
    ("lanes.task.upgrade", ("websocket",)),
    ("lanes.task.tunnel_idle_timeout", 3600.0),
    ("routes.0.try_files", False),
    ("routes.0.strip_prefix", False),
]


@pytest.mark.parametrize(("dotted", "expected"), DEFAULTS, ids=[d for d, _ in DEFAULTS])
def test_defaults(dotted, expected):
    assert lookup(parse_config(MINIMAL), dotted) == expected


def test_admin_default_listen():
    cfg = parse_config(MINIMAL + "admin: {}\n")
    assert cfg.admin is not None
    assert cfg.admin.listen == ("127.0.0.1", 9901)


def test_config_is_frozen():
    cfg = parse_config(MINIMAL)
    with pytest.raises(ValidationError):
        cfg.workers = 3


# -- relative paths ---------------------------------------------------------------------------


def test_parse_config_base_dir(tmp_path):
    assert parse_config(MINIMAL).base_dir == Path(".")
    assert parse_config(MINIMAL, base_dir=tmp_path).base_dir == tmp_path
    assert parse_config(MINIMAL, base_dir=str(tmp_path)).base_dir == tmp_path


@pytest.mark.parametrize(
    ("top_root", "route_root", "expected"),
    [
        (None, None, "conf/public"),
        ("./public", None, "conf/public"),
        ("static", None, "conf/static"),
        ("../www", None, "www"),
        ("static", "other", "conf/other"),
        (None, "./sub/dir", "conf/sub/dir"),
        ("ABS", None, "abs"),
        (None, "ABS", "abs"),
    ],
)
def test_root_for_resolves_from_the_config_files_dir(tmp_path, monkeypatch, top_root, route_root, expected):
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    absolute = str(tmp_path / "abs")
    text = MINIMAL
    if top_root:
        text += f"root: {absolute if top_root == 'ABS' else top_root}\n"
    if route_root:
        root = absolute if route_root == "ABS" else route_root
        text = text.replace("    lane: task\n", f"    lane: task\n    root: {root}\n    try_files: true\n")
    (conf_dir / "proxy.yaml").write_text(text)
    monkeypatch.chdir(elsewhere)  # the process cwd must not matter
    cfg = load_config(Path("../conf/proxy.yaml"))
    assert cfg.base_dir == conf_dir.resolve()
    assert cfg.root_for(cfg.routes[0]) == (tmp_path / expected).resolve()


def test_load_config_accepts_str_path(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(MINIMAL)
    assert load_config(str(path)).base_dir == tmp_path.resolve()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "No such file or directory"),
        ("directory", "directory"),
        ("latin1", "not UTF-8 text"),
    ],
)
def test_load_config_file_problems(tmp_path, kind, message):
    path = tmp_path / "laneproxy.yaml"
    if kind == "directory":
        path.mkdir()
    elif kind == "latin1":
        path.write_bytes(MINIMAL.encode() + "# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 1
    line = info.value.problems[0]
    assert str(path) in line
    assert message in line


def test_load_config_reports_problems_of_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL.replace("    servers:", "    bogus: 1\n    servers:"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == ["lanes.task.bogus: unknown key"]


def test_load_config_without_path_uses_builtin_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert cfg == load_config(DEFAULT_CONFIG_PATH).model_copy(update={"base_dir": Path(".")})
    assert cfg.base_dir == Path(".")
    assert cfg.root_for(cfg.routes[1]) == tmp_path.resolve() / "public"


def test_load_config_without_path_prefers_local_file(tmp_path, monkeypatch):
    (tmp_path / "laneproxy.yaml").write_text(MINIMAL + "listen: 127.0.0.1:9999\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert cfg.listen == (("127.0.0.1", 9999),)
    assert list(cfg.lanes) == ["task"]
    assert cfg.base_dir == tmp_path.resolve()


def test_load_config_without_path_reports_a_bad_local_file(tmp_path, monkeypatch):
    (tmp_path / "laneproxy.yaml").write_text("version: 2\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config()
    assert [split_problem(p)[0] for p in info.value.problems] == ["version", "lanes", "routes"]


# -- the shipped default ----------------------------------------------------------------------


def test_conf_file_and_builtin_default_are_byte_identical():
    assert CONF_FILE.read_bytes() == DEFAULT_CONFIG_PATH.read_bytes()


@pytest.mark.parametrize("path", [CONF_FILE, DEFAULT_CONFIG_PATH], ids=["conf", "builtin"])
def test_shipped_default_matches_interface(path):
    cfg = load_config(path)
    assert cfg.version == 1
    assert cfg.listen == (("0.0.0.0", 8080),)
    assert cfg.workers == 1
    assert cfg.root == "./public"
    assert cfg.access_log is None
    assert cfg.admin is None
    assert list(cfg.lanes) == ["webman", "task"]
    assert [s.address for s in cfg.lanes["webman"].servers] == [("127.0.0.1", 8787)]
    assert cfg.lanes["webman"].limit == 0
    assert [s.address for s in cfg.lanes["task"].servers] == [("127.0.0.1", 8686)]
    assert cfg.lanes["task"].limit == 8
    assert cfg.lanes["task"].queue == 1000
    assert cfg.lanes["task"].read_timeout == 300.0
    assert [(r.prefix, r.lane, r.try_files, r.strip_prefix) for r in cfg.routes] == [
        ("/tast", "task", False, False),
        ("/", "webman", True, False),
    ]


def test_shipped_default_spells_out_the_model_defaults():
    """The commented default writes every default out; it must agree with the model's."""
    cfg = load_config(DEFAULT_CONFIG_PATH)
    assert cfg.client == ClientConfig()
    assert cfg.lanes["webman"] == LaneConfig(servers=["127.0.0.1:8787"])
    bare = parse_config(MINIMAL)
    for key in ("listen", "workers", "root", "access_log", "log_format", "drain_timeout", "admin"):
        assert getattr(cfg, key) == getattr(bare, key), key


# -- every key docs/interface.md names --------------------------------------------------------

INTERFACE_ALL_KEYS = """\
version: 1
listen: "0.0.0.0:8080"
workers: 1
root: ./public
access_log: off
admin:
  listen: "127.0.0.1:9901"
drain_timeout: 30s
log_format: combined
client:
  header_timeout: 60s
  body_timeout: 60s
  send_timeout: 60s
  keepalive_timeout: 75s
  keepalive_requests: 1000
  max_connections: 10000
  max_request_line: 8k
  max_header_size: 32k
  max_headers: 100
  trusted_proxies: []

lanes:
  webman:
    servers: ["127.0.0.1:8787"]
    keepalive: 10240
    keepalive_timeout: 60s
    keepalive_requests: 1000
    connect_timeout: 5s
    read_timeout: 60s
    send_timeout: 60s
    max_body: 1m
    limit: 0
    queue: 0
    queue_timeout: 30s
    retries: 1
    upgrade: [websocket]
    tunnel_idle_timeout: 1h
  task:
    servers: ["127.0.0.1:8686"]
    limit: 8
    queue: 1000
    read_timeout: 300s

routes:
  - prefix: /tast
    lane: task
    strip_prefix: true
  - prefix: /
    lane: webman
    try_files: true
"""


def test_every_interface_key_is_accepted():
    cfg = parse_config(INTERFACE_ALL_KEYS)
    assert cfg.admin is not None and cfg.admin.listen == ("127.0.0.1", 9901)
    assert cfg.drain_timeout == 30.0
    assert cfg.log_format == "combined"
    assert cfg.client == ClientConfig()
    webman = cfg.lanes["webman"]
    assert webman == LaneConfig(servers=["127.0.0.1:8787"])
    assert webman.tunnel_idle_timeout == 3600.0
    assert cfg.routes[0].strip_prefix is True
    assert cfg.routes[1].try_files is True
    assert cfg.access_log is None


def test_log_format_json_accepted():
    assert parse_config(MINIMAL + "log_format: json\n").log_format == "json"


def test_server_mapping_form_and_its_errors():
    cfg = parse_config(MINIMAL.replace(
        '["127.0.0.1:8686"]',
        '["127.0.0.1:8686", {address: "127.0.0.1:8687", weight: 3, max_fails: 2, fail_timeout: 5s}, '
        '{address: "127.0.0.1:8688", backup: true}, {address: "127.0.0.1:8689", down: true}]',
    ))
    a, b, c, d = cfg.lanes["task"].servers
    assert (a.address, a.weight, a.max_fails, a.fail_timeout, a.backup) == (("127.0.0.1", 8686), 1, 1, 10.0, False)
    assert (b.port, b.weight, b.max_fails, b.fail_timeout) == (8687, 3, 2, 5.0)
    assert c.backup and d.down
    with pytest.raises(ConfigError) as exc:
        parse_config(MINIMAL.replace(
            '["127.0.0.1:8686"]', '["127.0.0.1:99999", {address: "h:1", weight: 0, bogus: 1}]'
        ))
    assert exc.value.problems == [
        "lanes.task.servers[0]: port out of range",
        "lanes.task.servers[1].weight: Input should be greater than or equal to 1",
        "lanes.task.servers[1].bogus: unknown key",
    ]
    with pytest.raises(ConfigError) as exc:
        parse_config(MINIMAL.replace('["127.0.0.1:8686"]', '[{address: "h:1", backup: true}]'))
    assert exc.value.problems == ["lanes.task: every server is backup or down: nothing would serve this lane"]


@pytest.mark.parametrize(
    ("lane_yaml", "problem"),
    [
        ("retry_on: [bogus]", "lanes.task.retry_on: unknown condition 'bogus'"),
        ("balance: random", "lanes.task.balance: Input should be 'round_robin', 'least_conn' or 'p2c'"),
        ("health: {path: x}", "lanes.task.health.path: a path starting with / without spaces"),
        ("health: {interval: 0}", "lanes.task.health.interval: Input should be greater than 0"),
        ("health: {rise: 1, bogus: 2}", "lanes.task.health.bogus: unknown key"),
    ],
)
def test_resilience_keys_are_validated(lane_yaml, problem):
    text = MINIMAL.replace('servers: ["127.0.0.1:8686"]', 'servers: ["127.0.0.1:8686"]\n    ' + lane_yaml)
    with pytest.raises(ConfigError) as exc:
        parse_config(text)
    assert exc.value.problems[0].startswith(problem), exc.value.problems
