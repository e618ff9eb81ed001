"""Configuration: YAML in, validated frozen models out.

`load_config(path)` / `parse_config(text)` read `version: 1` YAML (see docs/interface.md), reject
unknown keys, turn durations into float seconds and sizes into int bytes, and raise ConfigError
with one `yaml.path: message` line per problem. Nothing here binds sockets or prints.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from laneproxy.config_values import (
    Count,
    Duration,
    HostPort,
    ListenAddr,
    PositiveDuration,
    PositiveInt,
    Size,
    parse_hostport,
)

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default.yaml")

def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value


def _access_log(value: Any) -> Any:
    # YAML 1.1 reads a bare `off` as False; `off`/`false`/None all mean "no access log".
    if value is False or value is None or (isinstance(value, str) and value.lower() == "off"):
        return None
    if isinstance(value, str) and not value.strip():
        raise ValueError('an empty path: write off, "-" (stdout) or a file path')
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


# -- sections ---------------------------------------------------------------------------------


class AdminConfig(_Model):
    listen: ListenAddr = ("127.0.0.1", 9901)
    token: str | None = None  # when set, non-GET endpoints need `Authorization: Bearer <token>`


class ClientConfig(_Model):
    """The downstream side; defaults follow nginx (client_header_timeout 60s, ...)."""

    header_timeout: PositiveDuration = 60.0
    body_timeout: PositiveDuration = 60.0
    send_timeout: PositiveDuration = 60.0
    keepalive_timeout: Duration = 75.0
    keepalive_requests: PositiveInt = 1000
    max_connections: PositiveInt = 10000
    max_request_line: Annotated[Size, Field(ge=64)] = 8 * 1024
    max_header_size: Annotated[Size, Field(ge=256)] = 32 * 1024
    max_headers: PositiveInt = 100
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # Header names with '_' (Content_Length...): drop them (nginx's default), reject (400), or allow.
    underscore_headers: Literal["drop", "reject", "allow"] = "drop"

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        value = _one_or_many(value)
        if not isinstance(value, (list, tuple)):
            raise ValueError("expected a list of CIDRs like 10.0.0.0/8")
        out = []
        for item in value:
            try:
                out.append(ipaddress.ip_network(str(item), strict=False))
            except ValueError:
                raise ValueError(f"invalid CIDR {item!r}") from None
        return tuple(out)


class ServerConfig(_Model):
    """One upstream server: `"host:port"`, or a mapping with nginx's `server` parameters."""

    address: HostPort
    weight: Annotated[int, Field(ge=1, le=1000)] = 1
    max_fails: Count = 1  # failures within fail_timeout that mark the server down; 0 = never
    fail_timeout: Duration = 10.0  # the window for max_fails, and how long the server is skipped
    backup: bool = False  # used only when every non-backup server is down
    down: bool = False  # never used (kept in the config for a quick switch)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            parse_hostport(value)  # errors belong to servers[i], not servers[i].address
            return {"address": value}
        return value

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]


class HealthConfig(_Model):
    """Active health checks: GET `path` on a separate connection every `interval`."""

    path: str = "/"
    interval: Annotated[Duration, Field(gt=0)] = 5.0
    timeout: Annotated[Duration, Field(gt=0)] = 2.0
    rise: PositiveInt = 2  # passes in a row that bring a failed server back
    fall: PositiveInt = 3  # failures in a row that take a server out
    status: tuple[Annotated[int, Field(ge=100, le=599)], ...] = ()  # passing statuses; () = 2xx and 3xx

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not re.fullmatch(r"/[\x21-\x7e]*", value):
            raise ValueError("a path starting with / without spaces")
        return value


RETRY_CONDITIONS = ("error", "timeout", "http_500", "http_502", "http_503", "http_504", "http_429")


class LaneConfig(_Model):
    """A named group of upstream servers with its own pool, limits and queue."""

    servers: Annotated[tuple[ServerConfig, ...], Field(min_length=1)]
    balance: Literal["round_robin", "least_conn", "p2c"] = "round_robin"
    keepalive: Count = 10240
    keepalive_timeout: Duration = 60.0
    keepalive_requests: PositiveInt = 1000
    connect_timeout: Annotated[Duration, Field(gt=0)] = 5.0
    read_timeout: Annotated[Duration, Field(gt=0)] = 60.0
    send_timeout: Annotated[Duration, Field(gt=0)] = 60.0
    max_body: Size = 1024 * 1024
    limit: Count = 0
    queue: Count = 0
    queue_timeout: Duration = 30.0
    queue_target: PositiveDuration | None = None  # CoDel target queue wait; default from queue_timeout
    queue_interval: PositiveDuration | None = None  # CoDel interval; default from queue_target
    retries: Count = 1
    retry_timeout: Duration = 0.0  # stop retrying after this long since the first try; 0 = no limit
    retry_on: tuple[str, ...] = ("error", "timeout")  # nginx proxy_next_upstream conditions
    health: HealthConfig | None = None
    upgrade: tuple[str, ...] = ("websocket",)
    tunnel_idle_timeout: Duration = 3600.0
    limit_streams: bool = True  # a tunnel or stream keeps counting against `limit` until it ends

    @field_validator("retry_on", mode="before")
    @classmethod
    def _retry_on(cls, value: Any) -> Any:
        value = _one_or_many(value) if value else ()
        for item in value:
            if item not in RETRY_CONDITIONS:
                raise ValueError(f"unknown condition {item!r} (known: {', '.join(RETRY_CONDITIONS)})")
        return value

    @model_validator(mode="after")
    def _has_primary(self) -> LaneConfig:
        if all(s.backup or s.down for s in self.servers):
            raise ValueError("every server is backup or down: nothing would serve this lane")
        return self

    @field_validator("servers", mode="before")
    @classmethod
    def _servers(cls, value: Any) -> Any:
        return _one_or_many(value)

    @field_validator("upgrade", mode="before")
    @classmethod
    def _upgrade(cls, value: Any) -> Any:
        value = _one_or_many(value) if value else ()
        if not isinstance(value, (list, tuple)):
            raise ValueError("expected a list of Upgrade tokens like [websocket]")
        for token in value:
            if not isinstance(token, str) or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", token):
                raise ValueError(f"invalid Upgrade token {token!r}")
            if token.lower() == "h2c":
                raise ValueError("h2c cannot be tunnelled (h2c smuggling)")
        return tuple(t.lower() for t in value)


class RouteConfig(_Model):
    """A path prefix sent to a lane (nginx prefix `location` semantics)."""

    prefix: str
    lane: str
    strip_prefix: bool = False
    try_files: bool = False
    root: str | None = None  # overrides the top-level root for this route's try_files
    index: str | None = None  # a directory is served as this file inside it (e.g. index.html)
    follow_symlinks: bool = False  # follow symlinks that lead outside root (inside root: always)
    serve_hidden: bool = False  # serve names starting with '.' (.env, .git/...)
    expires: Duration | None = None  # Cache-Control: max-age for files served (nginx `expires`)
    gzip_static: bool = False  # serve a .br / .gz sibling when the client accepts it
    priority: Literal["high", "normal", "low"] = "normal"  # queue class in the lane (issue 6)

    @field_validator("index")
    @classmethod
    def _index(cls, value: str | None) -> str | None:
        if value is not None and (not value or "/" in value or value in (".", "..")):
            raise ValueError("index is a file name like index.html")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("a prefix starts with /")
        if not re.fullmatch(r"/[\x21-\x7e]*", value) or "?" in value or "#" in value:
            raise ValueError("a prefix is a path without spaces, '?' or '#'")
        return value


class ProxyConfig(_Model):
    version: Literal[1]
    listen: Annotated[tuple[ListenAddr, ...], Field(min_length=1)] = (("0.0.0.0", 8080),)
    workers: PositiveInt = 1
    root: str = "./public"
    access_log: str | None = None
    log_format: Literal["combined", "json"] = "combined"
    drain_timeout: Duration = 30.0
    admin: AdminConfig | None = None
    client: ClientConfig = ClientConfig()
    lanes: Annotated[dict[str, LaneConfig], Field(min_length=1)]
    routes: Annotated[tuple[RouteConfig, ...], Field(min_length=1)]
    # Where the file came from: relative paths (root, logs) resolve from here. Not a YAML key.
    base_dir: Path = Field(default=Path("."), exclude=True)
    # The file it was read from (None: the built-in default); reload re-reads it. Not a YAML key.
    path: Path | None = Field(default=None, exclude=True)

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        if isinstance(value, bool):  # `version: yes` is not `version: 1`
            raise ValueError("only version 1 is understood")
        return value

    @field_validator("listen", mode="before")
    @classmethod
    def _listen(cls, value: Any) -> Any:
        return _one_or_many(value)

    @field_validator("lanes", mode="before")
    @classmethod
    def _lane_keys(cls, value: Any) -> Any:
        # A YAML key `1:` is the integer 1: lane names are text (routes name them as `lane: "1"`).
        if isinstance(value, dict):
            return {k if isinstance(k, str) else str(k): v for k, v in value.items()}
        return value

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        return os.cpu_count() or 1 if value == "auto" else value

    @field_validator("access_log", mode="before")
    @classmethod
    def _access_log(cls, value: Any) -> Any:
        return _access_log(value)

    @field_validator("lanes")
    @classmethod
    def _lane_names(cls, value: dict[str, LaneConfig]) -> dict[str, LaneConfig]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"lane name {name!r}: use letters, digits, '_', '.', '-'")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> ProxyConfig:
        problems = []
        seen: dict[str, int] = {}
        for i, route in enumerate(self.routes):
            if route.lane not in self.lanes:
                known = ", ".join(sorted(self.lanes))
                problems.append((f"routes[{i}].lane", f"no lane named {route.lane!r} (lanes: {known})"))
            if route.prefix in seen:
                problems.append((f"routes[{i}].prefix", f"duplicate of routes[{seen[route.prefix]}]"))
            seen.setdefault(route.prefix, i)
        if self.workers > 1 and any(port == 0 for _, port in self.listen):
            problems.append(("listen", "port 0 (any free port) needs workers: 1; each worker would get its own"))
        fixed = [addr for addr in self.listen if addr[1] != 0]
        if len(set(fixed)) != len(fixed):
            problems.append(("listen", "the same address is listed twice"))
        if self.admin is not None and self.admin.listen[1] != 0:
            host, port = self.admin.listen
            if any(p == port and h in (host, "0.0.0.0", "::") for h, p in fixed) or (
                host in ("0.0.0.0", "::") and any(p == port for _, p in fixed)
            ):
                problems.append(("admin.listen", f"{host}:{port} is also a proxy listen address"))
        if problems:
            raise ConfigError([f"{path}: {msg}" for path, msg in problems])
        return self

    def root_for(self, route: RouteConfig) -> Path:
        return (self.base_dir / (route.root or self.root)).resolve()


# -- loading ----------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config that cannot be used; `problems` holds one `yaml.path: message` line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _yaml_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and re.match(r"(function-(after|before|wrap|plain)|tagged-union)\[", part):
            continue  # pydantic's internal step names, not YAML keys
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _message(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if kind == "literal_error" and err["loc"] == ("version",):
        return "only version 1 is understood"
    if kind == "too_short":
        return "must not be empty"
    return msg


_KEY_TAGS = ("tag:yaml.org,2002:str", "tag:yaml.org,2002:merge")  # merge: `<<: *anchor`


def _key_problems(node: Any, path: str = "", walked: set[int] | None = None) -> Iterator[str]:
    """`yaml.path: message` for each key repeated in one mapping, each key that is not a string,
    and each NUL byte in a value. An aliased node is walked once (alias fan-out stays linear)."""
    walked = set() if walked is None else walked
    if id(node) in walked:
        return
    walked.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            here = f"{path}.{key}" if path else key
            if key_node.tag not in _KEY_TAGS:
                yield f"{here}: a key must be a string (quote it)"
            elif key in seen:
                yield f"{here}: duplicate key (line {key_node.start_mark.line + 1})"
            seen.add(key)
            yield from _key_problems(value_node, here, walked)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _key_problems(item, f"{path}[{i}]", walked)
    elif isinstance(node, yaml.ScalarNode) and "\x00" in node.value:
        yield f"{path or '(top level)'}: a NUL byte in the value"


def parse_config(text: str, base_dir: Path | str = ".", source: str = "<config>") -> ProxyConfig:
    problems: list[str] = []
    try:
        data = yaml.safe_load(text)
        if isinstance(data, dict):  # (duplicates: PyYAML keeps the last one silently)
            problems = list(_key_problems(yaml.compose(text, Loader=yaml.SafeLoader)))
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow: one line
        ch = exc.character
        code = ch if isinstance(ch, int) else ord(ch)
        raise ConfigError([f"(yaml) position {exc.position}: character #x{code:04x}: {exc.reason}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"(yaml) {where}: {problem}"]) from None
    except RecursionError:
        raise ConfigError([f"(yaml) {source}: nested too deeply"]) from None
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping with version: 1, lanes and routes"])
    if problems:
        raise ConfigError(problems)
    data = dict(data)
    # base_dir is a model field but not a YAML key: a file that sets it gets the unknown-key error.
    stray = [f"{key}: unknown key" for key in ("base_dir", "path") if key in data]
    data.pop("base_dir", None)
    data.pop("path", None)
    try:
        cfg = ProxyConfig.model_validate(data)
    except ValidationError as exc:
        problems = list(stray)
        errors = exc.errors()
        locs = [tuple(e["loc"]) for e in errors]
        for err in errors:
            loc = tuple(err["loc"])
            if any(len(other) > len(loc) and other[: len(loc)] == loc for other in locs):
                continue  # a child already says what is wrong; the parent's echo adds nothing
            ctx_error = (err.get("ctx") or {}).get("error")
            if isinstance(ctx_error, ConfigError):
                problems.extend(ctx_error.problems)
                continue
            line = f"{_yaml_path(err['loc'])}: {_message(err)}"
            if line not in problems:
                problems.append(line)
        raise ConfigError(problems) from None
    except ConfigError:
        raise
    if stray:
        raise ConfigError(stray)
    return cfg.model_copy(update={"base_dir": Path(base_dir)})


def load_config(path: str | Path | None = None) -> ProxyConfig:
    """Read `path`; None means ./laneproxy.yaml when present, else the built-in default."""
    if path is None:
        local = Path("laneproxy.yaml")
        path = local if local.is_file() else DEFAULT_CONFIG_PATH
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"(file) {path}: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"(file) {path}: not UTF-8 text"]) from None
    base = Path(".") if path == DEFAULT_CONFIG_PATH else path.resolve().parent
    cfg = parse_config(text, base_dir=base, source=str(path))
    return cfg.model_copy(update={"path": path.resolve()})
