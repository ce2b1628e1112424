"""A fast fake nxlink for benchmarks: small JSON answers, a large download and an upload sink."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Final

from aiohttp import web

CHUNK: Final = 256 * 1024
ANSWER: Final = json.dumps({"code": 0, "message": "success", "data": {"list": [], "total": 0}})
LATENCY: Final = web.AppKey("latency", float)


async def handle_small(request: web.Request) -> web.Response:
    """Read the body and answer nxlink's success envelope, after the configured latency."""
    await request.read()
    if request.app[LATENCY]:
        await asyncio.sleep(request.app[LATENCY])
    return web.Response(text=ANSWER, content_type="application/json")


async def handle_download(request: web.Request) -> web.StreamResponse:
    """Stream ``size`` bytes in fixed chunks with a Content-Length."""
    size = int(request.query.get("size", "0"))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    block = b"x" * CHUNK
    sent = 0
    while sent < size:
        part = block[: min(CHUNK, size - sent)]
        await response.write(part)
        sent += len(part)
    await response.write_eof()
    return response


async def handle_upload(request: web.Request) -> web.Response:
    """Read and discard the body, answering how many bytes arrived."""
    received = 0
    async for chunk in request.content.iter_any():
        received += len(chunk)
    return web.json_response({"code": 0, "message": "success", "data": {"bytes": received}})


def create_upstream_app(latency: float = 0.0) -> web.Application:
    """The benchmark upstream."""
    app = web.Application(client_max_size=1024**3)
    app[LATENCY] = latency
    app.router.add_get("/openapi/bench/download", handle_download)
    app.router.add_post("/openapi/bench/upload", handle_upload)
    app.router.add_route("*", "/openapi/{tail:.*}", handle_small)
    return app


def main() -> None:
    """Run the upstream alone: ``python -m bench.upstream --port P [--latency S]``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    web.run_app(
        create_upstream_app(args.latency),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
