"""append-numbers: batching, bounded concurrency, ordered results, idempotent replays."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Literal

from aiohttp import web
from prometheus_client import Counter
from yarl import URL

from proxy import errors
from proxy.appkeys import (
    APPEND_RUNS,
    BACKEND,
    QUOTAS,
    SETTINGS,
    USAGE,
    context,
    current_credentials,
    current_tenant,
    metrics,
    upstream_client,
)
from proxy.batches import Batch, Result, collect, make_batches, run_batches
from proxy.config import mask_key
from proxy.forwarding import build_upstream_url, read_body
from proxy.idempotency import (
    JournalRun,
    body_digest,
    claim_run,
    is_unknown,
    journal_key,
    new_owner,
    no_answer,
    recorded_reservation,
    recovered,
)
from proxy.limits import Slot
from proxy.numbers import AppendCall, ContactItem, decode_json, parse_call
from proxy.nxlink import APPEND_ACTION, APPEND_PATH, SUCCESS_CODES
from proxy.quotas import NOTHING_RESERVED, Reservation
from proxy.ratelimit_headers import learn_quotas
from proxy.state.base import Claim, ClaimStatus, JournalEntry
from proxy.tenants import Credentials, Tenant
from proxy.upstream import Response, UpstreamClient, UpstreamRequest, json_headers
from proxy.usage import UsageLedger

logger = logging.getLogger(__name__)

JSON = dict[str, Any]
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
REPLAYED_HEADER: Final = "Idempotent-Replayed"
MAX_IDEMPOTENCY_KEY: Final = 255


def batch_body(call: AppendCall, items: Sequence[ContactItem]) -> bytes:
    """The call/append body for one batch; absent optional fields are left out, never null."""
    optional = {"autoFlowId": call.auto_flow_id, "countryCode": call.country_code}
    body: JSON = {"taskId": call.task_id, **{k: v for k, v in optional.items() if v is not None}}
    body["list"] = list(items)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Tally:
    """A tenant's numbers in usage and metrics, each counted once: a batch by the run that sent
    it (when nxlink answered, or could not), never again by a run that reuses its journaled
    outcome; the unusable entries with the answer that is kept (see ``count_unusable``)."""

    ledger: UsageLedger
    metric: Counter
    tenant: Tenant

    def numbers(self, appended: int, failed: int) -> None:
        self.metric.labels(self.tenant.alias, "success").inc(appended)
        self.metric.labels(self.tenant.alias, "failure").inc(failed)
        self.ledger.count_numbers(self.tenant, appended, failed)


@dataclass(frozen=True, slots=True)
class Sender:
    """Sends the batches of one request to the tenant's nxlink account."""

    client: UpstreamClient
    url: URL
    credentials: Credentials
    request_id: str
    call: AppendCall
    tenant: Tenant
    tally: Tally

    async def send(self, batch: Batch) -> list[Result]:
        """All of the batch's numbers succeed, or all fail with the reason (OUTCOME_UNKNOWN
        when the batch reached nxlink and its answer did not come back)."""
        status, answer, reason = 0, None, None
        try:
            status, answer = await self._exchange(batch_body(self.call, batch.items))
            reason = _refusal(status, answer)
        except errors.GatewayError as exc:
            sent = isinstance(exc, errors.UpstreamError) and exc.sent
            reason = no_answer(exc.message) if sent else exc.message
            self.tally.ledger.count_upstream_error(self.tenant)
        if reason is not None:
            logger.warning("append batch of %d failed: %s", len(batch.items), reason)
        accepted = len(batch.items) if reason is None else 0
        self.tally.numbers(accepted, len(batch.items) - accepted)
        summary = _summary(answer)
        return [_result(item, reason, summary) for item in batch.items]

    async def _exchange(self, body: bytes) -> tuple[int, object]:
        headers = json_headers(self.request_id)
        request = UpstreamRequest(
            "POST",
            self.url,
            headers,
            APPEND_ACTION,
            self.credentials,
            body,
            tenant=self.tenant.alias,
            tenant_id=self.tenant.id,
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
        raise errors.UpstreamTimeout(message, sent=True) from exc
    except ConnectionError as exc:
        message = f"Upstream answer was cut ({exc.__class__.__name__})"
        raise errors.UpstreamUnavailable(message, sent=True) from exc


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


def spent(result: Result) -> bool:
    """The number counts against the quota: nxlink took it, or may have (OUTCOME_UNKNOWN)."""
    return result["success"] or is_unknown(result)


def answer_body(task_id: str, results: Sequence[Result], api_key: str) -> bytes:
    """The 200 answer of a processed request, encoded once (it may be stored for replays)."""
    total, success = len(results), sum(1 for r in results if r["success"])
    unknown = sum(1 for r in results if is_unknown(r))
    counts = {
        "totalCount": total,
        "successCount": success,
        "failCount": total - success,
        "unknownCount": unknown,
    }
    message = (
        f"Successfully processed {total} numbers. Success: {success}, Failed: {total - success}"
    )
    data = {"taskId": task_id, **counts, "results": results}
    body = {"code": 200, "message": message, "data": data, "apiKey": mask_key(api_key)}
    # An unusable entry is echoed as sent; a lone surrogate in it goes out as a JSON escape.
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "backslashreplace")


@dataclass(frozen=True, slots=True)
class AppendJob:
    """One validated append-numbers request, ready to send."""

    call: AppendCall
    sender: Sender
    batch_size: int
    concurrency: int

    def plan(self, recorded: Mapping[int, JournalEntry] | None = None) -> Plan:
        """The batches to send now, and the results a previous owner's journal already gives."""
        entries = self.call.entries
        known = recovered(entries, recorded) if recorded else {}
        start = max(recorded, default=-1) + 1 if recorded else 0
        batches = make_batches(entries, self.batch_size, start=start, skip=known.keys())
        return Plan(known, batches, recorded_reservation(recorded) if recorded else None)

    async def run(self, plan: Plan, journal: JournalRun | None = None) -> list[list[Result]]:
        """Send the plan's batches; their results in batch order."""
        send = self.sender.send
        if journal is not None:
            send = partial(journal.send, send=self.sender.send)
        return await run_batches(send, plan.batches, self.concurrency)


@dataclass(frozen=True, slots=True)
class Plan:
    """What one run sends, and what it knows without sending."""

    known: Mapping[int, Result]
    batches: Sequence[Batch]
    reserved: bytes | None = None  # the quota reservation a previous owner recorded

    @property
    def numbers(self) -> int:
        return sum(len(b.items) for b in self.batches)


async def counted_run(
    request: web.Request, job: AppendJob, plan: Plan, journal: JournalRun | None = None
) -> list[Result]:
    """The run within the tenant's numbers quotas: reserved whole before anything is sent
    (429 ``QUOTA_EXCEEDED`` when they do not fit), the numbers nxlink did not accept given back
    (never the OUTCOME_UNKNOWN ones: they may have been called)."""
    reservation, settle = await _reservation(request, plan, journal)
    outcomes = await job.run(plan, journal)
    results = collect(job.call.entries, plan.batches, outcomes, plan.known)
    # A recorded reservation covers the whole request, a new one only this run's batches.
    covered = results if plan.reserved is not None else [r for o in outcomes for r in o]
    kept = sum(1 for r in covered if spent(r))
    await _give_back(request, reservation, kept, settle, journal)
    return results


Settle = Literal["direct", "journal", "unclear"]


async def _reservation(
    request: web.Request, plan: Plan, journal: JournalRun | None
) -> tuple[Reservation, Settle]:
    """The run's reservation, and how its unspent numbers are given back: ``journal`` when the
    journal holds it (the one a previous owner recorded, else one made now and recorded before
    any batch is sent); ``direct`` when it is this run's alone (no journal, or a reservation in
    this process's memory that a taker elsewhere could not give back); ``unclear`` when
    recording it failed without an answer: it may be in the journal, so a taker may settle it,
    and giving it back here too could give it back twice."""
    if plan.reserved is not None:
        return Reservation.decode(plan.reserved), "journal"
    reservation = NOTHING_RESERVED
    if plan.numbers:
        tenant = current_tenant(request)
        reservation = await request.app[QUOTAS].reserve(tenant, "numbers", plan.numbers)
        learn_quotas(context(request).limits, reservation.statuses)
    if journal is None or not reservation.charges or reservation.where == "local":
        return reservation, "direct"
    if not journal.held():
        return reservation, "direct"  # nothing recorded, and nothing will be sent
    if await journal.record_reservation(reservation.encode()):
        return reservation, "journal"
    return reservation, "unclear" if journal.state_failed else "direct"


async def _give_back(
    request: web.Request,
    reservation: Reservation,
    kept: int,
    settle: Settle,
    journal: JournalRun | None,
) -> None:
    """Give back all but ``kept``. A reservation in the journal is recorded as settled first, so
    that no later taker gives the same numbers back again; a run that lost its claim leaves the
    giving back to the owner that took it over. An ``unclear`` one stays charged (never extra
    budget: a taker that finds it settles it)."""
    if settle == "unclear":
        logger.warning("%d numbers left reserved: state unavailable", reservation.amount - kept)
        return
    if settle == "direct" or (
        journal is not None and await journal.record_reservation(reservation.keeping(kept).encode())
    ):
        await request.app[QUOTAS].give_back(reservation, reservation.amount - kept)


def append_job(request: web.Request, raw: bytes) -> AppendJob:
    """Validate the body (400 before anything else happens) and set up the sender."""
    settings, tenant = request.app[SETTINGS], current_tenant(request)
    credentials = current_credentials(request)
    call = parse_call(decode_json(raw), settings.append_max_numbers)
    url = build_upstream_url(tenant.base_url, APPEND_PATH, "")
    client = upstream_client(request)
    tally = Tally(request.app[USAGE], metrics(request).append_numbers, tenant)
    sender = Sender(client, url, credentials, context(request).request_id, call, tenant, tally)
    size = tenant.limits.append_batch_size or settings.append_batch_size
    return AppendJob(call, sender, size, settings.append_concurrency)


def answer_of(request: web.Request, job: AppendJob, results: Sequence[Result]) -> bytes:
    """Log the results and build the answer (the batches counted themselves when sent)."""
    tenant = current_tenant(request)
    failed = sum(1 for r in results if not r["success"])
    logger.info("append-numbers for %s: %d numbers, %d failed", tenant.alias, len(results), failed)
    return answer_body(job.call.task_id, results, context(request).api_key)


def count_unusable(job: AppendJob) -> None:
    """The entries never sent because they are unusable, counted as failed numbers with the
    answer that is kept: at once without a key; with one, once the answer is stored (a run
    whose answer is not stored is answered again by a repeat, which counts them then)."""
    unusable = sum(1 for entry in job.call.entries if entry.item is None)
    if unusable:
        job.sender.tally.numbers(0, unusable)


async def handle_append(request: web.Request) -> web.Response:
    """``POST /api/openapi/append-numbers``; a repeated Idempotency-Key replays the answer."""
    settings = request.app[SETTINGS]
    context(request).action = APPEND_ACTION
    raw = await read_body(request, settings.max_body_bytes, settings.upstream_timeout)
    given = idempotency_header(request)
    job = append_job(request, raw)
    if given is None:
        return _json_answer(await shielded(request, _plain(request, job)))
    state, tenant = request.app[BACKEND], current_tenant(request)
    key, owner = journal_key(tenant.id, given), new_owner()
    claim = await claim_run(state, key, await body_digest(raw), owner, settings)
    if claim.status is ClaimStatus.DONE:
        assert claim.answer is not None
        return _json_answer(claim.answer, replayed=True)
    run = JournalRun(state, key, owner, settings.idempotency_lease)
    return _json_answer(await shielded(request, _journaled(request, job, run, claim)))


async def _plain(request: web.Request, job: AppendJob) -> bytes:
    answer = answer_of(request, job, await counted_run(request, job, job.plan()))
    count_unusable(job)
    return answer


async def _journaled(request: web.Request, job: AppendJob, run: JournalRun, claim: Claim) -> bytes:
    """The run with its lease kept; given up (journal kept) if it fails."""
    keeper = asyncio.create_task(run.keep_lease(), name="idempotency-lease")
    try:
        results = await counted_run(request, job, job.plan(claim.journal), run)
        answer = answer_of(request, job, results)
        if await run.finish(answer, request.app[SETTINGS].idempotency_ttl):
            count_unusable(job)
        return answer
    except BaseException:
        await run.abandon()
        raise
    finally:
        keeper.cancel()


async def shielded(request: web.Request, work: Coroutine[Any, Any, bytes]) -> bytes:
    """``work`` in a task of its own: a client that goes away does not cut a run mid-batch,
    and the tenant's in-flight slot stays held until the run ends."""
    slot = context(request).slot
    if slot is not None:
        slot.handed = True  # now, not when the task starts: the request may end first
    task = asyncio.create_task(_holding(slot, work))
    runs = request.app[APPEND_RUNS]  # the loop keeps only a weak reference to a task
    runs.add(task)
    task.add_done_callback(lambda done: _forget(runs, done))
    return await asyncio.shield(task)


async def _holding(slot: Slot | None, work: Coroutine[Any, Any, bytes]) -> bytes:
    try:
        return await work
    finally:
        if slot is not None:
            await slot.free()


def _forget(runs: set[asyncio.Task[bytes]], task: asyncio.Task[bytes]) -> None:
    runs.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a failure the gone client can no longer see


def _json_answer(body: bytes, *, replayed: bool = False) -> web.Response:
    headers = {REPLAYED_HEADER: "true"} if replayed else None
    return web.Response(
        body=body, content_type="application/json", charset="utf-8", headers=headers
    )


def idempotency_header(request: web.Request) -> str | None:
    """The client's ``Idempotency-Key``, if it sent one."""
    given = request.headers.get(IDEMPOTENCY_HEADER, "").strip()
    if len(given) > MAX_IDEMPOTENCY_KEY:
        message = f"Idempotency-Key must be at most {MAX_IDEMPOTENCY_KEY} characters"
        raise errors.RequestError(message, error="INVALID_IDEMPOTENCY_KEY")
    return given or None
