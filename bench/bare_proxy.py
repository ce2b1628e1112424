"""The floors: the least an aiohttp-served proxy can do (no auth, signing, limits, logs or
streaming), with either upstream client.

``--client session`` forwards with aiohttp's ClientSession (the gateway's client before
proxy/http1.py); ``--client http1`` forwards with the gateway's own pool, so the gateway's
throughput against this one is the cost of everything the gateway adds to a forward.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web
from yarl import URL

from proxy.upstream import Pool

SESSION = web.AppKey("session", aiohttp.ClientSession)
POOL = web.AppKey("pool", Pool)
ORIGIN = web.AppKey("origin", str)
JSON = [("Content-Type", "application/json")]


async def forward_session(request: web.Request) -> web.Response:
    """Read the body, POST it upstream with ClientSession, send the answer back."""
    body = await request.read()
    url = request.app[ORIGIN] + request.path
    headers = {"Content-Type": "application/json"}
    async with request.app[SESSION].post(url, data=body, headers=headers) as answer:
        data = await answer.read()
        return web.Response(body=data, status=answer.status, content_type="application/json")


async def forward_http1(request: web.Request) -> web.Response:
    """Read the body, POST it upstream with the gateway's pool, send the answer back."""
    body = await request.read()
    url = URL(request.app[ORIGIN] + request.path, encoded=True)
    answer = await request.app[POOL].request("POST", url, JSON, body=body)
    try:
        data = await answer.read()
    finally:
        answer.release()
    return web.Response(body=data, status=answer.status, content_type="application/json")


async def clients(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession()
    app[POOL] = Pool(limit=256, connect_timeout=5)
    yield
    await app[SESSION].close()
    await app[POOL].close()


def main() -> None:
    """``python -m bench.bare_proxy --port P --origin http://127.0.0.1:O [--client C]``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--origin", required=True)
    parser.add_argument("--client", choices=("session", "http1"), default="session")
    args = parser.parse_args()
    app = web.Application()
    app[ORIGIN] = args.origin
    app.cleanup_ctx.append(clients)
    handler = forward_http1 if args.client == "http1" else forward_session
    app.router.add_route("*", "/{tail:.*}", handler)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
