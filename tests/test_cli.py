"""The command line (`laneproxy.cli.main`): check / run exit codes and output, config discovery,
and `python -m laneproxy`. No sockets: `run` is wired to a fake server module."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import types

import pytest

from laneproxy import __version__, cli
from laneproxy.config import ProxyConfig, load_config

GOOD = """\
version: 1
listen: ["127.0.0.1:18080", "[::1]:18081"]
admin:
  listen: 127.0.0.1:19901
lanes:
  app:
    servers: ["127.0.0.1:9001", "127.0.0.1:9002"]
  slow:
    servers: "127.0.0.1:9003"
    limit: 4
    queue: 50
    read_timeout: 250ms
routes:
  - prefix: /
    lane: app
    try_files: true
  - prefix: /slow/
    lane: slow
    strip_prefix: true
"""

BAD = """\
version: 1
lanes:
  task:
    servers: ["127.0.0.1:99999"]
    bogus: 1
routes:
  - prefix: /
    lane: task
  - prefix: /x
    lane: task
    foo: 1
"""

BAD_PROBLEMS = [
    "lanes.task.servers[0]: port out of range",
    "lanes.task.bogus: unknown key",
    "routes[1].foo: unknown key",
]

LOCAL = """\
version: 1
listen: 127.0.0.1:18555
lanes:
  local_lane:
    servers: 127.0.0.1:7001
routes:
  - {prefix: /, lane: local_lane}
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "bad.yaml").write_text(BAD)
    return tmp_path


class FakeServer:
    """Stands in for laneproxy.server so `run` never binds; records what it was given."""

    def __init__(self, result: int = 0):
        self.calls: list[ProxyConfig] = []
        self.result = result

    def run(self, cfg: ProxyConfig) -> int:
        self.calls.append(cfg)
        return self.result


@pytest.fixture
def fake_server(monkeypatch):
    fake = FakeServer()
    module = types.ModuleType("laneproxy.server")
    module.run = fake.run
    monkeypatch.setitem(sys.modules, "laneproxy.server", module)
    binds: list[object] = []
    real_bind = socket.socket.bind

    def recording_bind(self, address):
        binds.append(address)
        return real_bind(self, address)

    monkeypatch.setattr(socket.socket, "bind", recording_bind)
    fake.binds = binds
    return fake


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# -- check ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["-c", "--config"])
def test_check_good_prints_summary(files, capsys, flag):
    assert cli.main(["check", flag, str(files / "good.yaml")]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    summary = lines(out)
    assert len(summary) <= 24, "one screen"
    # listeners
    assert any("http://127.0.0.1:18080" in line for line in summary)
    assert any("http://[::1]:18081" in line for line in summary)
    assert any("admin" in line and "127.0.0.1:19901" in line for line in summary)
    # lanes with their servers
    app = [line for line in summary if line.strip().startswith("app:")]
    assert len(app) == 1 and "127.0.0.1:9001" in app[0] and "127.0.0.1:9002" in app[0]
    slow = [line for line in summary if line.strip().startswith("slow:")]
    assert len(slow) == 1 and "127.0.0.1:9003" in slow[0]
    assert "limit 4" in slow[0] and "queue 50" in slow[0] and "250ms" in slow[0]
    # routes, longest prefix first
    routes = [line.strip() for line in summary if "->" in line]
    assert [r.split(" (")[0] for r in routes] == ["/slow/ -> slow", "/ -> app"]
    assert "strip_prefix" in routes[0]
    assert "try_files" in routes[1] and str(files.resolve() / "public") in routes[1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BAD, BAD_PROBLEMS),
        ("version: 2\n", ["version: ", "lanes: ", "routes: "]),
        ("- 1\n", ["(top level): "]),
        ("version: 1\nlisten: a: b\n", ["(yaml) line 2, column 10: "]),
        (
            "version: 1\nlanes: {t: {servers: 127.0.0.1:1}}\nroutes: [{prefix: /, lane: u}]\n",
            ["routes[0].lane: "],
        ),
    ],
    ids=["fields", "version", "not-a-mapping", "yaml-syntax", "unknown-lane"],
)
def test_check_bad_prints_one_line_per_problem(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert cli.main(["check", "-c", str(path)]) == 2
    out, err = capsys.readouterr()
    got = out.splitlines()
    assert len(got) == len(expected), got
    for line, want in zip(got, expected, strict=True):
        if want.endswith(": "):
            assert line.startswith(want) and len(line) > len(want), (line, want)
        else:
            assert line == want
    assert "listeners" not in out


def test_check_bad_exact_output(files, capsys):
    assert cli.main(["check", "-c", str(files / "bad.yaml")]) == 2
    out, _ = capsys.readouterr()
    assert out == "\n".join(BAD_PROBLEMS) + "\n"


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_check_unreadable_file(tmp_path, capsys, kind):
    path = tmp_path / "missing.yaml"
    if kind == "directory":
        path.mkdir()
    assert cli.main(["check", "-c", str(path)]) == 2
    out, _ = capsys.readouterr()
    assert len(out.splitlines()) == 1
    assert str(path) in out
    assert ("No such file or directory" if kind == "missing" else "directory") in out


def test_check_without_c_uses_builtin_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / "laneproxy.yaml").exists()
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    summary = lines(out)
    assert any("http://0.0.0.0:8080" in line for line in summary)
    assert any(line.strip().startswith("webman:") and "127.0.0.1:8787" in line for line in summary)
    task = [line for line in summary if line.strip().startswith("task:")]
    assert len(task) == 1 and "127.0.0.1:8686" in task[0] and "limit 8" in task[0]
    routes = [line.strip() for line in summary if "->" in line]
    assert [r.split(" (")[0] for r in routes] == ["/tast -> task", "/ -> webman"]
    assert str(tmp_path.resolve() / "public") in routes[1]


def test_check_without_c_uses_local_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "laneproxy.yaml").write_text(LOCAL)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "http://127.0.0.1:18555" in out
    assert "local_lane" in out and "127.0.0.1:7001" in out
    assert "8080" not in out and "webman" not in out


def test_check_without_c_reports_bad_local_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "laneproxy.yaml").write_text(BAD)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["check"]) == 2
    assert capsys.readouterr().out.splitlines() == BAD_PROBLEMS


def test_c_wins_over_local_file(files, monkeypatch, capsys):
    (files / "laneproxy.yaml").write_text(LOCAL)
    monkeypatch.chdir(files)
    assert cli.main(["check", "-c", "good.yaml"]) == 0
    out = capsys.readouterr().out
    assert "http://127.0.0.1:18080" in out and "18555" not in out


# -- run --------------------------------------------------------------------------------------


def test_run_bad_config_exits_2_before_binding(files, capsys, fake_server):
    started = time.monotonic()
    assert cli.main(["run", "-c", str(files / "bad.yaml")]) == 2
    assert time.monotonic() - started < 5
    out, err = capsys.readouterr()
    assert out == ""
    assert [line for line in err.splitlines() if line in BAD_PROBLEMS] == BAD_PROBLEMS
    assert fake_server.calls == []
    assert fake_server.binds == []


def test_run_missing_file_exits_2(tmp_path, capsys, fake_server):
    path = tmp_path / "nope.yaml"
    assert cli.main(["run", "-c", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert str(path) in err
    assert fake_server.calls == []
    assert fake_server.binds == []


@pytest.mark.parametrize("result", [0, 1])
def test_run_good_config_hands_it_to_the_server(files, capsys, fake_server, result):
    fake_server.result = result
    assert cli.main(["run", "-c", str(files / "good.yaml")]) == result
    assert len(fake_server.calls) == 1
    cfg = fake_server.calls[0]
    assert isinstance(cfg, ProxyConfig)
    assert cfg.listen == (("127.0.0.1", 18080), ("::1", 18081))
    assert cfg.base_dir == files.resolve()


def test_run_without_c_uses_local_file(tmp_path, monkeypatch, fake_server):
    (tmp_path / "laneproxy.yaml").write_text(LOCAL)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run"]) == 0
    assert [cfg.listen for cfg in fake_server.calls] == [(("127.0.0.1", 18555),)]


def test_run_without_c_uses_builtin_default(tmp_path, monkeypatch, fake_server):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run"]) == 0
    (cfg,) = fake_server.calls
    assert cfg.listen == (("0.0.0.0", 8080),)
    assert list(cfg.lanes) == ["webman", "task"]


# -- argument handling ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        ([], 2),
        (["bogus"], 2),
        (["check", "-c"], 2),
        (["check", "--nope"], 2),
        (["--help"], 0),
        (["check", "--help"], 0),
    ],
)
def test_argument_errors_and_help(argv, code, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == code


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"laneproxy {__version__}"


# -- python -m laneproxy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "code", "expected_out"),
    [
        ("bad.yaml", 2, "\n".join(BAD_PROBLEMS) + "\n"),
        ("good.yaml", 0, None),
    ],
)
def test_python_dash_m(files, name, code, expected_out):
    proc = subprocess.run(
        [sys.executable, "-m", "laneproxy", "check", "-c", name],
        cwd=files,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == code, proc.stderr
    if expected_out is not None:
        assert proc.stdout == expected_out
    else:
        assert "http://127.0.0.1:18080" in proc.stdout


def test_summary_uses_the_config_file_dir_for_try_files(tmp_path):
    sub = tmp_path / "etc"
    sub.mkdir()
    (sub / "p.yaml").write_text(GOOD + "root: www\n")
    cfg = load_config(sub / "p.yaml")
    assert str(sub.resolve() / "www") in cli.summary(cfg)
