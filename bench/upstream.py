"""The upstream every proxy talks to: a separate nginx instance (1 worker) with fixed answers.

- `GET /small`    `return 200 "hello world\\n"`: a 12-byte body with Content-Length.
- `GET /large`    a 1 MiB file (sendfile), Content-Length.
- `GET /chunked`  a 64 KiB file through the addition filter (`add_after_body` of an empty file): the
                  filter drops Content-Length, so nginx answers an HTTP/1.1 request with
                  `Transfer-Encoding: chunked` (two 32 KiB chunks, `sendfile off` in that location).
                  The SSI filter does the same but parses every byte and, with `tcp_nopush`, stalls on
                  delayed ACKs (~1.7k req/s against ~20k for this).
- `POST /upload`  the mirror module reads the whole request body into memory before the content phase
                  (`mirror_request_body on`, the mirror subrequest goes to an internal 204); the static
                  handler then refuses POST with 405, which `error_page 405 =200 @ok` turns into
                  `200 "ok\\n"`. Unlike a bare `return 200`, this answers only after the body is read.

A second server on `soak_port` answers every GET with the same 12 bytes as `/small` but closes a
kept-alive connection after 2 s idle (`keepalive_timeout 2s`), like gunicorn: the upstream of the
`soak` scenario, where a proxy that reuses a connection just as the upstream closes it must not
hand the client an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from service import Service, free_port

SMALL_BODY = b"hello world\n"
LARGE_SIZE = 1024 * 1024
CHUNKED_SIZE = 64 * 1024
UPLOAD_REPLY = b"ok\n"

# path -> expected response body length, for the pre-flight check through each proxy
EXPECTED_LENGTH = {
    "/small": len(SMALL_BODY),
    "/large": LARGE_SIZE,
    "/chunked": CHUNKED_SIZE,
    "/upload": len(UPLOAD_REPLY),
}

_CONF = """\
{user}worker_processes 1;
worker_rlimit_nofile 16384;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {prefix}/www;
        location = /small {{
            default_type text/plain;
            return 200 "hello world\\n";
        }}
        location = /large {{
            default_type application/octet-stream;
            try_files /large.bin =404;
        }}
        location = /chunked {{
            default_type text/plain;
            add_after_body /empty.html;
            addition_types *;
            sendfile off;
            try_files /chunked.html =404;
        }}
        location = /upload {{
            client_body_buffer_size 32k;
            client_max_body_size 1m;
            mirror /_sink;
            mirror_request_body on;
            error_page 405 =200 @ok;
        }}
        location = /_sink {{
            internal;
            return 204;
        }}
        location @ok {{
            default_type text/plain;
            return 200 "ok\\n";
        }}
    }}
    server {{
        listen 127.0.0.1:{soak_port} backlog=4096;
        keepalive_timeout 2s;
        location / {{
            default_type text/plain;
            return 200 "hello world\\n";
        }}
    }}
}}
"""


def nginx_user_line() -> str:
    """As root, nginx's workers would switch to `nobody`; keep them as the current user instead."""
    return "user root;\n" if os.geteuid() == 0 else ""


@dataclass
class Upstream:
    prefix: Path
    port: int
    service: Service
    soak_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def soak_address(self) -> str:
        return f"127.0.0.1:{self.soak_port}"


def write_files(prefix: Path) -> None:
    www = prefix / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "large.bin").write_bytes(os.urandom(LARGE_SIZE))
    line = b"x" * 63 + b"\n"
    (www / "chunked.html").write_bytes(line * (CHUNKED_SIZE // len(line)))
    (www / "empty.html").write_bytes(b"")
    (www / "upload").write_bytes(b"")  # exists so that the static handler answers POST with 405


def start_upstream(prefix: Path, port: int, core: int, log_dir: Path, soak_port: int | None = None) -> Upstream:
    prefix.mkdir(parents=True, exist_ok=True)
    write_files(prefix)
    conf = prefix / "nginx.conf"
    soak_port = soak_port or free_port()
    conf.write_text(_CONF.format(user=nginx_user_line(), prefix=prefix, port=port, soak_port=soak_port))
    argv = ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    service = Service("upstream-nginx", argv, log_dir, core=core)
    service.start("127.0.0.1", port)
    return Upstream(prefix=prefix, port=port, service=service, soak_port=soak_port)
