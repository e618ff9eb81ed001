"""Context: what every client connection of one proxy shares (settings, router, counters)."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import TYPE_CHECKING

from laneproxy.accesslog import AccessLog
from laneproxy.config import ClientConfig
from laneproxy.router import Router

if TYPE_CHECKING:
    from laneproxy.downstream import DownstreamProtocol

MAX_FIELD_LINE = 8 * 1024  # one header line (nginx large_client_header_buffers 8k)


class Context:
    """What every client connection of one proxy shares: settings, router, live connections."""

    def __init__(self, loop: asyncio.AbstractEventLoop, router: Router, client: ClientConfig) -> None:
        self.loop = loop
        self.router = router
        self.apply(client)
        self.connections: set[DownstreamProtocol] = set()
        self.closing = False
        self.requests = 0
        self.rejected_connections = 0
        self.tunnels = 0
        self.access_log: AccessLog | None = None
        # laneproxy's own answers outside any route (400, 404, 408 ...), by status.
        self.local_responses: dict[int, int] = {}

    def apply(self, client: ClientConfig) -> None:
        """Take (new) client settings: used by connections and requests from now on (reload)."""
        self.client = client
        self.header_timeout = client.header_timeout
        self.body_timeout = client.body_timeout
        self.send_timeout = client.send_timeout
        self.keepalive_timeout = client.keepalive_timeout
        self.keepalive_requests = client.keepalive_requests
        self.max_request_line = client.max_request_line
        self.max_header_size = client.max_header_size
        self.max_headers = client.max_headers
        self.max_head_bytes = client.max_request_line + client.max_header_size + 2 * MAX_FIELD_LINE
        self.trusted = client.trusted_proxies
        self.underscore_headers = client.underscore_headers

    def is_trusted(self, ip: str) -> bool:
        if not self.trusted:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.trusted)
