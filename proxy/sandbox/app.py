"""The sandbox web app: five nxlink operations over per-account in-memory tasks."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from proxy.nxlink import KNOWN_ACTIONS, now_ms
from proxy.sandbox.verify import MESSAGES, NxlinkCode, Rejection, verify_request
from proxy.tenants import Credentials

JSON = dict[str, Any]
MAX_RECORDS_PER_ACCOUNT: Final = 1_000_000
MAX_PAGE_SIZE: Final = 1000


@dataclass(slots=True)
class Task:
    """A calling task and the numbers appended to it."""

    task_id: str
    name: str
    records: dict[str, JSON] = field(default_factory=dict)


@dataclass(slots=True)
class AccountState:
    """One nxlink account's tasks."""

    tasks: dict[str, Task] = field(default_factory=dict)

    def task(self, task_id: str) -> Task:
        if task_id not in self.tasks:
            self.tasks[task_id] = Task(task_id, f"Task {task_id}")
        return self.tasks[task_id]

    def record_count(self) -> int:
        return sum(len(t.records) for t in self.tasks.values())


Operation = Callable[[AccountState, JSON], JSON]


class Failure(Exception):
    """An operation's parameter error (1002) with its reason."""


def _page(items: list[JSON], body: JSON) -> JSON:
    number = _int(body.get("pageNumber", 1), "pageNumber", low=1)
    size = _int(body.get("pageSize", 20), "pageSize", low=1, high=MAX_PAGE_SIZE)
    start = (number - 1) * size
    return {
        "list": items[start : start + size],
        "total": len(items),
        "pageNumber": number,
        "pageSize": size,
    }


def _int(value: Any, name: str, *, low: int, high: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        raise Failure(f"{name} must be an integer >= {low}")
    return value


def _task_id(body: JSON) -> str:
    task_id = body.get("taskId")
    if not isinstance(task_id, str) or not task_id.strip():
        raise Failure("taskId is required")
    return task_id


def _strings(body: JSON, name: str) -> set[str]:
    values = body.get(name) or []
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise Failure(f"{name} must be an array of strings")
    return set(values)


def list_tasks(state: AccountState, body: JSON) -> JSON:
    """pageCallTaskInfo: the account's tasks, paged."""
    tasks = [
        {"taskId": t.task_id, "taskName": t.name, "status": "running", "totalCount": len(t.records)}
        for t in state.tasks.values()
    ]
    return _page(tasks, body)


def list_calls(state: AccountState, body: JSON) -> JSON:
    """pageCallRecords: appended numbers, of one task or all, paged."""
    task_id = body.get("taskId")
    if task_id is not None and not isinstance(task_id, str):
        raise Failure("taskId must be a string")
    tasks = (
        [state.tasks[task_id]]
        if task_id in state.tasks
        else ([] if task_id else list(state.tasks.values()))
    )
    return _page([r for t in tasks for r in t.records.values()], body)


def append_calls(state: AccountState, body: JSON) -> JSON:
    """callAppend: add numbers to a task (created on first use)."""
    task = state.task(_task_id(body))
    entries = body.get("list")
    if not isinstance(entries, list) or not entries:
        raise Failure("list must be a non-empty array")
    if state.record_count() + len(entries) > MAX_RECORDS_PER_ACCOUNT:
        raise Failure("sandbox account is full; restart the sandbox")
    added = []
    for entry in entries:
        phone = entry.get("phoneNumber") if isinstance(entry, dict) else None
        if not isinstance(phone, str) or not phone.strip():
            raise Failure("every list entry needs a phoneNumber")
        contact_id = str(entry.get("contactId") or uuid.uuid4().hex)
        task.records[contact_id] = {
            "contactId": contact_id,
            "taskId": task.task_id,
            "phoneNumber": phone,
            "name": entry.get("name", ""),
            "params": entry.get("params", []),
            "countryCode": body.get("countryCode", ""),
            "callStatus": "waiting",
        }
        added.append(contact_id)
    return {"taskId": task.task_id, "successCount": len(added), "contactIds": added}


def delete_calls(state: AccountState, body: JSON) -> JSON:
    """callDelete: remove numbers from a task by contactIds or phoneNumbers."""
    task = state.task(_task_id(body))
    ids = _strings(body, "contactIds")
    phones = _strings(body, "phoneNumbers")
    doomed = [cid for cid, r in task.records.items() if cid in ids or r["phoneNumber"] in phones]
    for cid in doomed:
        del task.records[cid]
    return {"taskId": task.task_id, "deletedCount": len(doomed)}


def delete_orders(state: AccountState, body: JSON) -> JSON:
    """operateCallRecords: mark call records of a task as deleted."""
    task = state.task(_task_id(body))
    ids = _strings(body, "contactIds") or set(task.records)
    for cid in ids & task.records.keys():
        task.records[cid]["callStatus"] = "deleted"
    return {"taskId": task.task_id, "operatedCount": len(ids & task.records.keys())}


OPERATIONS: Final[dict[str, Operation]] = {
    "pageCallTaskInfo": list_tasks,
    "pageCallRecords": list_calls,
    "callAppend": append_calls,
    "callDelete": delete_calls,
    "operateCallRecords": delete_orders,
}


def nxlink_answer(
    code: NxlinkCode, data: Any = None, detail: str = "", *, status: int = 200
) -> web.Response:
    """nxlink's JSON answer shape; business errors still travel as HTTP 200."""
    message = MESSAGES[code] + (f": {detail}" if detail else "")
    body = {"code": int(code), "message": message, "data": data, "traceId": uuid.uuid4().hex}
    dumps = functools.partial(json.dumps, ensure_ascii=False)
    return web.json_response(body, status=status, dumps=dumps)


def refusal_detail(request: web.Request, exc: web.HTTPException) -> str:
    """Why aiohttp refused a request, said for an integrator (what the sandbox does accept)."""
    if exc.status == 404:
        known = ", ".join(KNOWN_ACTIONS)
        return f"no such operation {request.path}; the sandbox emulates POST {known}"
    if exc.status == 405:
        return f"{request.method} is not allowed on {request.path}; use POST"
    return exc.reason


@web.middleware
async def nxlink_refusal_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own refusals (no such path, wrong method, body too large) as nxlink JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        answer = nxlink_answer(
            NxlinkCode.PARAMETER_ERROR, detail=refusal_detail(request, exc), status=exc.status
        )
        if "Allow" in exc.headers:
            answer.headers["Allow"] = exc.headers["Allow"]
        return answer


def create_sandbox_app(
    accounts: Iterable[Credentials], *, clock: Callable[[], int] = now_ms
) -> web.Application:
    """An nxlink emulator accepting ``accounts``; every account starts with one demo task."""
    known = {c.access_key: c for c in accounts}
    states = {key: AccountState() for key in known}
    for state in states.values():
        state.task("task-demo-001").name = "Demo campaign"

    def operation(action: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            try:
                account = verify_request(
                    request.headers,
                    body,
                    accounts=known,
                    expected_action=action,
                    now_ms=clock(),
                    multipart=request.content_type == "multipart/form-data",
                )
                payload = json.loads(body or b"{}")
                if not isinstance(payload, dict):
                    raise Failure("body must be a JSON object")
                result = OPERATIONS[action](states[account.access_key], payload)
                return nxlink_answer(NxlinkCode.SUCCESS, result)
            except Rejection as exc:
                return nxlink_answer(exc.code, detail=exc.detail)
            except (Failure, ValueError, RecursionError) as exc:  # RecursionError: deep JSON
                return nxlink_answer(NxlinkCode.PARAMETER_ERROR, detail=str(exc))

        return handle

    app = web.Application(client_max_size=16 * 1024 * 1024, middlewares=[nxlink_refusal_middleware])
    for path, action in KNOWN_ACTIONS.items():
        app.router.add_post(path, operation(action), name=action)
    app.router.add_get("/healthz", handle_healthz, name="healthz")
    return app


async def handle_healthz(request: web.Request) -> web.Response:
    """Liveness of the sandbox, for compose files and scripts that wait for it."""
    return web.json_response({"code": 0, "message": "sandbox is running"})
