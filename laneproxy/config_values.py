"""Config scalars: YAML values → Python values (durations in seconds, sizes in bytes, `host:port`
addresses), and the annotated types the config models are built from. Each parser raises
ValueError with the message that becomes the `yaml.path: message` line.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

# -- scalar types -----------------------------------------------------------------------------

_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*$", re.ASCII)  # ASCII digits only
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*([0-9]+)\s*([kmg]?)b?\s*$", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_duration(value: Any) -> float:
    """`250ms`, `5s`, `2m`, `1h`, or a plain number of seconds → float seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 250ms, 5s, 2m, 1h")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an integer past float's range
            raise ValueError(f"expected a finite duration, got {value}") from None
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f"expected a duration like 250ms, 5s, 2m, 1h, got {value!r}")
    if not math.isfinite(seconds):
        raise ValueError(f"expected a finite duration, got {value!r}")
    if seconds < 0:
        raise ValueError("duration must not be negative")
    return seconds


def parse_size(value: Any) -> int:
    """`8k`, `1m`, `1g` (powers of 1024) or a plain number of bytes → int bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 512, 8k, 1m")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    else:
        raise ValueError(f"expected a size like 512, 8k, 1m, got {value!r}")
    if size < 0:
        raise ValueError("size must not be negative")
    return size


def _valid_host(host: str) -> bool:
    """An IP address, or a DNS name (RFC 1123 labels); dotted digits must be a real IPv4."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if ":" in host or re.fullmatch(r"[0-9.]+", host):
        return False  # not an IP address, and not a name either (999.1.1.1, [zz])
    return all(re.fullmatch(r"(?!-)[A-Za-z0-9_\-]{1,63}(?<!-)", label) for label in host.rstrip(".").split("."))


def parse_hostport(value: Any, allow_any_port: bool = False) -> tuple[str, int]:
    """`"host:port"` or `"[v6]:port"` → (host, port); a port alone means all interfaces.

    `allow_any_port` admits port 0 (the kernel picks one): listeners only, for tests.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"0.0.0.0:{value}"
    if not isinstance(value, str):
        raise ValueError(f'expected "host:port", got {value!r}')
    text = value.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f'expected "[ipv6]:port", got {value!r}')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid host in {value!r}: not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f'expected "host:port", got {value!r}')
        if ":" in host:
            raise ValueError(f'write IPv6 addresses as "[addr]:port", got {value!r}')
    if not host or not re.fullmatch(r"[A-Za-z0-9.\-:_]+", host) or not _valid_host(host):
        raise ValueError(f"invalid host in {value!r}")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"invalid port in {value!r}")
    port = int(port_text)
    if not (0 if allow_any_port else 1) <= port < 65536:
        raise ValueError("port out of range")
    return host, port


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
HostPort = Annotated[tuple[str, int], BeforeValidator(parse_hostport)]
ListenAddr = Annotated[tuple[str, int], BeforeValidator(lambda v: parse_hostport(v, allow_any_port=True))]
def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):  # YAML `yes`/`true` is not a number (pydantic would read 1)
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


PositiveInt = Annotated[int, BeforeValidator(_no_bool), Field(ge=1)]
Count = Annotated[int, BeforeValidator(_no_bool), Field(ge=0)]
PositiveDuration = Annotated[Duration, Field(gt=0)]
