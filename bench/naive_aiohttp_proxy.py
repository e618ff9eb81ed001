"""A naive reverse proxy: what a Python user writes in an afternoon with aiohttp (benchmark baseline).

    python bench/naive_aiohttp_proxy.py --listen 127.0.0.1:8081 --upstream 127.0.0.1:8787
"""

from __future__ import annotations

import argparse

from aiohttp import ClientSession, web

SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", str)

HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade",
}


def _strip(headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


async def proxy(request: web.Request) -> web.StreamResponse:
    session: ClientSession = request.app[SESSION]
    body = request.content if request.body_exists else None
    async with session.request(
        request.method, request.app[UPSTREAM] + request.rel_url.raw_path_qs,
        headers=_strip(request.headers), data=body, allow_redirects=False,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, headers=_strip(upstream.headers))
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(64 * 1024):
            await response.write(chunk)
        await response.write_eof()
        return response


async def _session(app: web.Application):
    app[SESSION] = ClientSession(auto_decompress=False)
    yield
    await app[SESSION].close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8081")
    parser.add_argument("--upstream", default="127.0.0.1:8787")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    app = web.Application()
    app[UPSTREAM] = f"http://{args.upstream}"
    app.cleanup_ctx.append(_session)
    app.router.add_route("*", "/{tail:.*}", proxy)
    web.run_app(app, host=host, port=int(port), access_log=None, print=None)


if __name__ == "__main__":
    main()
