"""append-numbers: batching, bounded concurrency, ordered results, idempotent replays."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final, NotRequired, TypedDict

from aiohttp import web
from yarl import URL

from proxy import errors
from proxy.appkeys import (
    IDEMPOTENCY,
    SETTINGS,
    context,
    current_credentials,
    current_tenant,
    metrics,
    upstream_client,
)
from proxy.config import mask_key
from proxy.forwarding import build_upstream_url, read_body
from proxy.idempotency import body_digest
from proxy.numbers import AppendCall, ContactItem, Entry, decode_json, parse_call
from proxy.nxlink import APPEND_ACTION, APPEND_PATH, SUCCESS_CODES
from proxy.tenants import Credentials
from proxy.upstream import Response, UpstreamClient, UpstreamRequest, json_headers

logger = logging.getLogger(__name__)

JSON = dict[str, Any]
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
REPLAYED_HEADER: Final = "Idempotent-Replayed"
MAX_IDEMPOTENCY_KEY: Final = 255
_RUNNING: set[asyncio.Task[bytes]] = set()  # shielded runs whose client may have left


class Result(TypedDict):
    """One input entry's outcome, as the client sees it."""

    phoneNumber: object
    success: bool
    contactId: NotRequired[str]
    error: NotRequired[str]
    response: NotRequired[object]


@dataclass(frozen=True, slots=True)
class Batch:
    """Numbers sent in one call/append, with their positions in the input."""

    positions: tuple[int, ...]
    items: tuple[ContactItem, ...]


def make_batches(entries: Sequence[Entry], size: int) -> list[Batch]:
    """The usable entries in input order, ``size`` to a batch."""
    ready = [(n, e.item) for n, e in enumerate(entries) if e.item is not None]
    chunks = (ready[start : start + size] for start in range(0, len(ready), size))
    return [Batch(tuple(n for n, _ in c), tuple(i for _, i in c)) for c in chunks]


def batch_body(call: AppendCall, items: Sequence[ContactItem]) -> bytes:
    """The call/append body for one batch; absent optional fields are left out, never null."""
    optional = {"autoFlowId": call.auto_flow_id, "countryCode": call.country_code}
    body: JSON = {"taskId": call.task_id, **{k: v for k, v in optional.items() if v is not None}}
    body["list"] = list(items)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Sender:
    """Sends the batches of one request to the tenant's nxlink account."""

    client: UpstreamClient
    url: URL
    credentials: Credentials
    request_id: str
    call: AppendCall
    tenant: str

    async def send(self, batch: Batch) -> list[Result]:
        """All of the batch's numbers succeed, or all fail with the reason."""
        status, answer, reason = 0, None, None
        try:
            status, answer = await self._exchange(batch_body(self.call, batch.items))
            reason = _refusal(status, answer)
        except errors.GatewayError as exc:
            reason = exc.message
        if reason is not None:
            logger.warning("append batch of %d failed: %s", len(batch.items), reason)
        summary = _summary(answer)
        return [_result(item, reason, summary) for item in batch.items]

    async def _exchange(self, body: bytes) -> tuple[int, object]:
        headers = json_headers(self.request_id)
        request = UpstreamRequest(
            "POST", self.url, headers, APPEND_ACTION, self.credentials, body, tenant=self.tenant
        )
        async with self.client.open(request) as response:
            raw = await _read(response, self.client.timeout)
        try:
            return response.status, json.loads(raw)
        except (ValueError, RecursionError):
            return response.status, None


async def _read(response: Response, timeout: float) -> bytes:
    try:
        async with asyncio.timeout(timeout):
            return await response.read()
    except TimeoutError as exc:
        message = f"Upstream answer did not finish within {timeout:g}s"
        raise errors.UpstreamTimeout(message) from exc
    except ConnectionError as exc:
        message = f"Upstream answer was cut ({exc.__class__.__name__})"
        raise errors.UpstreamUnavailable(message) from exc


def _refusal(status: int, answer: object) -> str | None:
    """None when nxlink accepted the batch, else its message (or what was wrong)."""
    doc = answer if isinstance(answer, dict) else {}
    code, message = doc.get("code"), doc.get("message")
    if status < 300 and type(code) is int and code in SUCCESS_CODES:
        return None
    if isinstance(message, str) and message:
        return message
    return f"nxlink answered HTTP {status} without a success code"


def _summary(answer: object) -> object:
    """nxlink's answer without ``data``: it covers the whole batch, so copying it into every
    number's result would multiply the answer's size by the batch size."""
    if isinstance(answer, dict):
        return {key: value for key, value in answer.items() if key != "data"}
    return answer


def _result(item: ContactItem, reason: str | None, answer: object) -> Result:
    result: Result = {"phoneNumber": item["phoneNumber"], "success": reason is None}
    result["contactId"] = item["contactId"]
    if reason is not None:
        result["error"] = reason
    if answer is not None:
        result["response"] = answer
    return result


async def run_batches(
    send: Callable[[Batch], Awaitable[list[Result]]], batches: Sequence[Batch], concurrency: int
) -> list[list[Result]]:
    """Each batch's results, in batch order, with at most ``concurrency`` in flight."""
    outcomes: list[list[Result]] = [[] for _ in batches]
    pending = iter(enumerate(batches))

    async def worker() -> None:
        for index, batch in pending:
            outcomes[index] = await send(batch)

    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, len(batches))):
            group.create_task(worker())
    return outcomes


def collect(
    entries: Sequence[Entry], batches: Sequence[Batch], outcomes: Sequence[list[Result]]
) -> list[Result]:
    """One result per input entry, in input order."""
    results: dict[int, Result] = {
        n: {"phoneNumber": e.shown, "success": False, "error": e.error}
        for n, e in enumerate(entries)
        if e.item is None
    }
    for batch, outcome in zip(batches, outcomes, strict=True):
        results.update(zip(batch.positions, outcome, strict=True))
    return [results[n] for n in range(len(entries))]


def answer_body(task_id: str, results: Sequence[Result], api_key: str) -> bytes:
    """The 200 answer of a processed request, encoded once (it may be stored for replays)."""
    total, success = len(results), sum(1 for r in results if r["success"])
    counts = {"totalCount": total, "successCount": success, "failCount": total - success}
    message = (
        f"Successfully processed {total} numbers. Success: {success}, Failed: {total - success}"
    )
    data = {"taskId": task_id, **counts, "results": results}
    body = {"code": 200, "message": message, "data": data, "apiKey": mask_key(api_key)}
    # An unusable entry is echoed as sent; a lone surrogate in it goes out as a JSON escape.
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "backslashreplace")


async def append_numbers(request: web.Request, raw: bytes) -> bytes:
    """Validate, send in bounded concurrent batches, and build the answer."""
    settings, tenant = request.app[SETTINGS], current_tenant(request)
    credentials = current_credentials(request)
    call = parse_call(decode_json(raw), settings.append_max_numbers)
    size = tenant.limits.append_batch_size or settings.append_batch_size
    batches = make_batches(call.entries, size)
    url = build_upstream_url(tenant.base_url, APPEND_PATH, "")
    client = upstream_client(request)
    sender = Sender(client, url, credentials, context(request).request_id, call, tenant.alias)
    outcomes = await run_batches(sender.send, batches, settings.append_concurrency)
    results = collect(call.entries, batches, outcomes)
    failed = sum(1 for r in results if not r["success"])
    counter = metrics(request).append_numbers
    counter.labels(tenant.alias, "success").inc(len(results) - failed)
    counter.labels(tenant.alias, "failure").inc(failed)
    logger.info("append-numbers for %s: %d batches, %d failed", tenant.alias, len(batches), failed)
    return answer_body(call.task_id, results, context(request).api_key)


async def handle_append(request: web.Request) -> web.Response:
    """``POST /api/openapi/append-numbers``; a repeated Idempotency-Key replays the answer."""
    settings = request.app[SETTINGS]
    raw = await read_body(request, settings.max_body_bytes, settings.upstream_timeout)
    key = idempotency_key(request)
    if key is None:
        return _json_answer(await _shielded(append_numbers(request, raw)))
    stored = await request.app[IDEMPOTENCY].claim(key, await body_digest(raw))
    if stored is not None:
        return _json_answer(stored, replayed=True)
    return _json_answer(await _shielded(_append_and_store(request, raw, key)))


async def _append_and_store(request: web.Request, raw: bytes, key: str) -> bytes:
    store = request.app[IDEMPOTENCY]
    try:
        answer = await append_numbers(request, raw)
    except BaseException:
        await store.release(key)
        raise
    await store.complete(key, answer)
    return answer


async def _shielded(work: Coroutine[Any, Any, bytes]) -> bytes:
    """``work`` run to its end even when the client leaves (aiohttp then cancels the
    handler): batches already sent to nxlink are finished and their answer stored."""
    task = asyncio.create_task(work)
    _RUNNING.add(task)  # the loop keeps only a weak reference to a task
    task.add_done_callback(_forget)
    return await asyncio.shield(task)


def _forget(task: asyncio.Task[bytes]) -> None:
    _RUNNING.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a failure the gone client can no longer see


def _json_answer(body: bytes, *, replayed: bool = False) -> web.Response:
    headers = {REPLAYED_HEADER: "true"} if replayed else None
    return web.Response(
        body=body, content_type="application/json", charset="utf-8", headers=headers
    )


def idempotency_key(request: web.Request) -> str | None:
    """The tenant-scoped store key for the client's ``Idempotency-Key``, if it sent one."""
    given = request.headers.get(IDEMPOTENCY_HEADER, "").strip()
    if len(given) > MAX_IDEMPOTENCY_KEY:
        message = f"Idempotency-Key must be at most {MAX_IDEMPOTENCY_KEY} characters"
        raise errors.RequestError(message, error="INVALID_IDEMPOTENCY_KEY")
    tenant = current_tenant(request)
    return f"{tenant.source}\n{tenant.alias}\n{given}" if given else None
