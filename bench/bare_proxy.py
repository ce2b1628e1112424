"""The floor: the least an aiohttp proxy can do (no auth, signing, limits, logs or streaming).

The gateway's throughput is compared with this one's in the same run, to tell the gateway's
own cost from the framework's.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
ORIGIN = web.AppKey("origin", str)


async def forward(request: web.Request) -> web.Response:
    """Read the body, POST it upstream, read the answer, send it back."""
    body = await request.read()
    url = request.app[ORIGIN] + request.path
    headers = {"Content-Type": "application/json"}
    async with request.app[SESSION].post(url, data=body, headers=headers) as answer:
        data = await answer.read()
        return web.Response(body=data, status=answer.status, content_type="application/json")


async def session_lifetime(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession()
    yield
    await app[SESSION].close()


def main() -> None:
    """``python -m bench.bare_proxy --port P --origin http://127.0.0.1:O``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--origin", required=True)
    args = parser.parse_args()
    app = web.Application()
    app[ORIGIN] = args.origin
    app.cleanup_ctx.append(session_lifetime)
    app.router.add_route("*", "/{tail:.*}", forward)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
