"""A call/append upstream for journal tests: checks signatures, records every number it gets,
holds the batches that carry chosen numbers until the test releases them, refuses the batches
that carry others, and hangs up without an answer on those that carry a third kind."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from aiohttp import web

from proxy.nxlink import APPEND_ACTION, APPEND_PATH
from proxy.sandbox.verify import MESSAGES, Rejection, verify_request
from proxy.tenants import Credentials


@dataclass(slots=True)
class HoldingNxlink:
    """``received`` lists every number in arrival order; ``held`` batches wait for ``release``;
    ``refused`` batches get an nxlink error; the connection of a batch with a ``cut`` number is
    closed once the batch was read."""

    creds: Credentials
    hold: Collection[str] = ()
    refuse: Collection[str] = ()
    cut: Collection[str] = ()
    received: list[str] = field(default_factory=list)
    holding: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(APPEND_PATH, self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        refused = refusal(request, raw, {self.creds.access_key: self.creds})
        if refused is not None:
            return refused
        phones = [item["phoneNumber"] for item in json.loads(raw)["list"]]
        self.received.extend(phones)
        if set(phones) & set(self.cut) and request.transport is not None:
            request.transport.close()
        if set(phones) & set(self.hold):
            self.holding.set()
            await self.release.wait()
        if set(phones) & set(self.refuse):
            return web.json_response({"code": 5000, "message": "refused by the test", "data": None})
        data = {"successCount": len(phones)}
        return web.json_response({"code": 0, "message": "success", "data": data})


def refusal(
    request: web.Request, raw: bytes, accounts: Mapping[str, Credentials]
) -> web.Response | None:
    """nxlink's answer to a call/append whose headers or signature are wrong; None if right."""
    try:
        verify_request(
            request.headers,
            raw,
            accounts=accounts,
            expected_action=APPEND_ACTION,
            now_ms=time.time_ns() // 1_000_000,
            multipart=False,
        )
    except Rejection as exc:
        body = {"code": int(exc.code), "message": MESSAGES[exc.code], "data": None}
        return web.json_response(body | {"traceId": "t-1"})
    return None
