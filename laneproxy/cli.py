"""Command line: `laneproxy run|check|demo`. The only module that prints or exits."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from laneproxy import __version__
from laneproxy.config import ConfigError, ProxyConfig, load_config

EXIT_BAD_CONFIG = 2


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def summary(cfg: ProxyConfig) -> str:
    """One screen: listeners, lanes with their servers and limits, routes in match order."""
    lines = ["listeners:"]
    lines += [f"  http://{_addr(h, p)}" for h, p in cfg.listen]
    if cfg.admin:
        lines.append(f"  admin http://{_addr(*cfg.admin.listen)}")
    lines.append(f"workers: {cfg.workers}")
    lines.append("lanes:")
    for name, lane in cfg.lanes.items():
        servers = ", ".join(
            _addr(*s.address) + (f" weight={s.weight}" if s.weight != 1 else "")
            + (" backup" if s.backup else "") + (" down" if s.down else "")
            for s in lane.servers
        )
        limit = f"limit {lane.limit}, queue {lane.queue}" if lane.limit else "no limit"
        lines.append(
            f"  {name}: {servers} ({limit}; keepalive {lane.keepalive}, "
            f"read_timeout {_duration(lane.read_timeout)}, max_body {lane.max_body})"
        )
    lines.append("routes (longest prefix wins):")
    for route in sorted(cfg.routes, key=lambda r: -len(r.prefix)):
        extra = []
        if route.strip_prefix:
            extra.append("strip_prefix")
        if route.try_files:
            extra.append(f"try_files from {cfg.root_for(route)}")
        note = f" ({', '.join(extra)})" if extra else ""
        lines.append(f"  {route.prefix} -> {route.lane}{note}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="laneproxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"laneproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "run the proxy in the foreground"),
        ("check", "validate a config file and print a summary"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument(
            "-c", "--config", metavar="FILE",
            help="config file (default: ./laneproxy.yaml if present, else the built-in default)",
        )
    reload = sub.add_parser("reload", help="make a running laneproxy re-read its config")
    reload.add_argument("-c", "--config", metavar="FILE", help="the running instance's config file")
    reload.add_argument("--pid", type=int, help="send SIGHUP to this process (default: POST /api/reload on admin)")
    sub.add_parser("demo", help="start demo upstreams behind the proxy on the built-in default")
    return parser


def _reload(args: argparse.Namespace) -> int:
    """SIGHUP to --pid, else POST /api/reload to the admin listener named in the config."""
    if args.pid:
        import os
        import signal

        try:
            os.kill(args.pid, signal.SIGHUP)
        except OSError as exc:
            print(f"cannot signal pid {args.pid}: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"sent SIGHUP to {args.pid}; the outcome is in its log")
        return 0
    cfg = _load(args.config, sys.stderr)
    if cfg is None:
        return EXIT_BAD_CONFIG
    if cfg.admin is None:
        print("no admin listener in the config: use --pid PID (or kill -HUP PID)", file=sys.stderr)
        return 1
    import json
    import urllib.error
    import urllib.request

    host, port = cfg.admin.listen
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    request = urllib.request.Request(f"http://{_addr(host, port)}/api/reload", method="POST", data=b"")
    if cfg.admin.token:
        request.add_header("Authorization", f"Bearer {cfg.admin.token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            print(json.dumps(json.load(response), indent=2))
            return 0
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        try:
            for problem in json.loads(body).get("problems", []):
                print(problem, file=sys.stderr)
        except ValueError:
            print(body, file=sys.stderr)
        return EXIT_BAD_CONFIG if exc.code == 400 else 1
    except OSError as exc:
        print(f"cannot reach the admin listener at {_addr(host, port)}: {exc}", file=sys.stderr)
        return 1


def _load(path: str | None, out) -> ProxyConfig | None:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=out)
        return None
    problems = _file_problems(cfg)
    for problem in problems:
        print(problem, file=out)
    return None if problems else cfg


def _file_problems(cfg: ProxyConfig) -> list[str]:
    """What the config names on disk and cannot be used (nginx -t opens its logs too)."""
    if cfg.access_log and cfg.access_log != "-":
        path = cfg.base_dir / cfg.access_log
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            return [f"access_log: cannot open {path}: {getattr(exc, 'strerror', None) or exc}"]
    return []


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.command == "reload":
        return _reload(args)
    if args.command == "demo":
        from laneproxy.demo import main as demo_main

        return demo_main()
    # `check` reports on stdout (it is the command's answer); `run` complains on stderr.
    cfg = _load(args.config, sys.stdout if args.command == "check" else sys.stderr)
    if cfg is None:
        return EXIT_BAD_CONFIG
    if args.command == "check":
        print(summary(cfg))
        return 0
    from laneproxy.server import run

    return run(cfg)
