"""The nxlink sandbox alone: header and signature checks (1001-1005), the five operations."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Awaitable, Callable
from typing import Any, Final

import pytest

from proxy.config import Secret
from proxy.sandbox import create_sandbox_app
from proxy.signing import sign_headers
from proxy.tenants import Credentials
from tests.conftest import CREDS_A, CREDS_B, Client

Call = Callable[..., Awaitable[dict[str, Any]]]

NOW: Final = 1_700_000_000_000
TASK_LIST: Final = "/openapi/aiagent/task/list"
CALL_LIST: Final = "/openapi/aiagent/call/list"
APPEND: Final = "/openapi/aiagent/call/append"
CALL_DELETE: Final = "/openapi/aiagent/call/delete"
ORDER_DELETE: Final = "/openapi/aiagent/order/delete"
ACTIONS: Final = {
    TASK_LIST: "pageCallTaskInfo",
    CALL_LIST: "pageCallRecords",
    APPEND: "callAppend",
    CALL_DELETE: "callDelete",
    ORDER_DELETE: "operateCallRecords",
}


@pytest.fixture
async def sandbox(
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> Client:
    """The sandbox for accounts A (md5, bizType 8) and B (sha256, bizType 9), clock at ``NOW``."""
    return await aiohttp_client(create_sandbox_app([CREDS_A, CREDS_B], clock=lambda: NOW))


async def post(sandbox: Client, path: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    resp = await sandbox.post(path, data=body, headers=headers)
    assert resp.status == 200
    answer: dict[str, Any] = await resp.json()
    return answer


@pytest.fixture
def call(sandbox: Client) -> Call:
    """Call an operation correctly signed for an account."""

    async def go(path: str, payload: Any, creds: Credentials = CREDS_A) -> dict[str, Any]:
        body = json.dumps(payload, ensure_ascii=False).encode()
        return await post(sandbox, path, body, sign_headers(creds, ACTIONS[path], body, NOW))

    return go


# --- signature and header checks --------------------------------------------------------------


async def test_hand_computed_md5_signature_is_accepted(sandbox: Client) -> None:
    body = b'{"pageNumber":1}'
    plain = (
        "accessKey=ak-tenant-a&action=pageCallTaskInfo&bizType=8&ts=1700000000000"
        '&body={"pageNumber":1}&accessSecret=secret-a-DO-NOT-LEAK'
    )
    headers = {
        "accessKey": "ak-tenant-a",
        "ts": str(NOW),
        "bizType": "8",
        "action": "pageCallTaskInfo",
        "sign": hashlib.md5(plain.encode()).hexdigest(),
    }
    answer = await post(sandbox, TASK_LIST, body, headers)
    assert (answer["code"], answer["message"]) == (0, "success")
    assert isinstance(answer["traceId"], str) and answer["traceId"]


async def test_hand_computed_sha256_signature_without_body_is_accepted(sandbox: Client) -> None:
    plain = (
        "accessKey=ak-tenant-b&action=pageCallTaskInfo&bizType=9&ts=1700000000000"
        "&accessSecret=secret-b-DO-NOT-LEAK"
    )
    headers = {
        "accessKey": "ak-tenant-b",
        "ts": str(NOW),
        "bizType": "9",
        "action": "pageCallTaskInfo",
        "algorithm": "sha256",
        "sign": hashlib.sha256(plain.encode()).hexdigest().upper(),
    }
    answer = await post(sandbox, TASK_LIST, b"", headers)
    assert answer["code"] == 0, answer


BODY: Final = b'{"pageNumber": 1}'
GOOD: Final = sign_headers(CREDS_A, "pageCallTaskInfo", BODY, NOW)


def without(name: str) -> dict[str, str]:
    return {k: v for k, v in GOOD.items() if k != name}


def replaced(**changes: str) -> dict[str, str]:
    return {**GOOD, **changes}


def resigned(creds: Credentials, *, ts: int = NOW, body: bytes = BODY) -> dict[str, str]:
    return sign_headers(creds, "pageCallTaskInfo", body, ts)


OTHER_SECRET: Final = Credentials("ak-tenant-a", Secret("guessed-secret"), "8", "md5")
UNKNOWN: Final = Credentials("ak-nobody", Secret("secret-a-DO-NOT-LEAK"), "8", "md5")
WRONG_BIZ: Final = Credentials("ak-tenant-a", Secret("secret-a-DO-NOT-LEAK"), "9", "md5")


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        pytest.param(without("accessKey"), 1001, id="no-accessKey"),
        pytest.param(without("ts"), 1001, id="no-ts"),
        pytest.param(without("bizType"), 1001, id="no-bizType"),
        pytest.param(without("action"), 1001, id="no-action"),
        pytest.param(without("sign"), 1001, id="no-sign"),
        pytest.param(replaced(sign="  "), 1001, id="blank-sign"),
        pytest.param(replaced(ts="soon"), 1002, id="ts-not-a-number"),
        pytest.param(replaced(ts="-1700000000000"), 1002, id="ts-negative"),
        pytest.param(replaced(ts="1.7e12"), 1002, id="ts-float"),
        pytest.param(replaced(ts="１７００００００００００００"), 1002, id="ts-fullwidth-digits"),
        pytest.param(replaced(algorithm="sha1"), 1002, id="algorithm-unknown"),
        pytest.param(replaced(action="callAppend"), 1003, id="action-not-signed"),
        pytest.param(replaced(sign="0" * 32), 1003, id="sign-wrong"),
        pytest.param(resigned(CREDS_A, body=b"{}"), 1003, id="sign-over-other-body"),
        pytest.param(resigned(OTHER_SECRET), 1003, id="sign-with-wrong-secret"),
        pytest.param(replaced(algorithm="sha256"), 1003, id="algorithm-not-the-signed-one"),
        pytest.param(resigned(CREDS_A, ts=NOW - 60_001), 1004, id="ts-older-than-60s"),
        pytest.param(resigned(CREDS_A, ts=NOW + 60_001), 1004, id="ts-60s-in-the-future"),
        pytest.param(resigned(UNKNOWN), 1005, id="unknown-accessKey"),
        pytest.param(resigned(WRONG_BIZ), 1005, id="wrong-bizType"),
        pytest.param(resigned(CREDS_A, ts=NOW - 60_000), 0, id="ts-exactly-60s-old"),
        pytest.param(resigned(CREDS_A, ts=NOW + 60_000), 0, id="ts-exactly-60s-ahead"),
        pytest.param(GOOD, 0, id="correct"),
    ],
)
async def test_sandbox_checks_headers_and_signature_like_nxlink(
    sandbox: Client, headers: dict[str, str], code: int
) -> None:
    answer = await post(sandbox, TASK_LIST, BODY, headers)
    assert answer["code"] == code, answer
    assert set(answer) == {"code", "message", "data", "traceId"}


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (1001, "Missing common parameters"),
        (1003, "Invalid signature"),
        (1004, "Timestamp has expired"),
        (1005, "Insufficient permissions"),
    ],
)
async def test_rejections_use_nxlinks_messages(sandbox: Client, code: int, message: str) -> None:
    headers = {
        1001: without("ts"),
        1003: replaced(sign="0" * 32),
        1004: resigned(CREDS_A, ts=NOW - 120_000),
        1005: resigned(UNKNOWN),
    }[code]
    answer = await post(sandbox, TASK_LIST, BODY, headers)
    assert (answer["code"], answer["message"].split(":")[0]) == (code, message)
    assert answer["data"] is None


async def test_signed_action_for_another_path_is_a_parameter_error(sandbox: Client) -> None:
    headers = sign_headers(CREDS_A, "callAppend", BODY, NOW)
    answer = await post(sandbox, TASK_LIST, BODY, headers)
    assert answer["code"] == 1002
    assert "pageCallTaskInfo" in answer["message"]


async def test_multipart_body_is_left_out_of_the_signature(sandbox: Client) -> None:
    body = b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--b--\r\n'
    headers = sign_headers(CREDS_A, "pageCallTaskInfo", None, NOW, multipart=True)
    headers["Content-Type"] = "multipart/form-data; boundary=b"
    answer = await post(sandbox, TASK_LIST, body, headers)
    # The signature passes; the operation then refuses a non-JSON body.
    assert answer["code"] == 1002, answer


@pytest.mark.parametrize("body", [b"[1, 2]", b"not json", b'"text"', b"\xff\xfe"])
async def test_body_that_is_not_a_json_object_is_a_parameter_error(
    sandbox: Client, body: bytes
) -> None:
    headers = sign_headers(CREDS_A, "pageCallTaskInfo", body, NOW)
    answer = await post(sandbox, TASK_LIST, body, headers)
    assert answer["code"] == 1002, answer


# --- operations -------------------------------------------------------------------------------


def contact(phone: str, contact_id: str | None = None, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"phoneNumber": phone, "name": f"name {phone}", **extra}
    if contact_id:
        entry["contactId"] = contact_id
    return entry


async def test_every_account_starts_with_the_demo_task(call: Call) -> None:
    answer = await call(TASK_LIST, {})
    assert answer["data"] == {
        "list": [
            {
                "taskId": "task-demo-001",
                "taskName": "Demo campaign",
                "status": "running",
                "totalCount": 0,
            }
        ],
        "total": 1,
        "pageNumber": 1,
        "pageSize": 20,
    }


async def test_appended_numbers_show_in_call_list_and_task_list(call: Call) -> None:
    params = [{"name": "orderId", "value": "订单-1"}]
    appended = await call(
        APPEND,
        {
            "taskId": "t-1",
            "autoFlowId": 7,
            "countryCode": "86",
            "list": [contact("13800000001", "c-1", params=params), contact("13800000002")],
        },
    )
    assert appended["code"] == 0, appended
    data = appended["data"]
    assert (data["taskId"], data["successCount"]) == ("t-1", 2)
    assert data["contactIds"][0] == "c-1" and len(data["contactIds"]) == 2
    calls = (await call(CALL_LIST, {"taskId": "t-1"}))["data"]
    assert calls["total"] == 2
    first = calls["list"][0]
    assert first == {
        "contactId": "c-1",
        "taskId": "t-1",
        "phoneNumber": "13800000001",
        "name": "name 13800000001",
        "params": params,
        "countryCode": "86",
        "callStatus": "waiting",
    }
    tasks = (await call(TASK_LIST, {}))["data"]["list"]
    assert {t["taskId"]: t["totalCount"] for t in tasks} == {"task-demo-001": 0, "t-1": 2}


async def test_call_list_without_task_id_lists_every_task_and_pages(call: Call) -> None:
    await call(APPEND, {"taskId": "t-1", "list": [contact(f"1380000000{i}") for i in range(3)]})
    await call(APPEND, {"taskId": "t-2", "list": [contact("13900000000")]})
    everything = (await call(CALL_LIST, {}))["data"]
    assert everything["total"] == 4
    page = (await call(CALL_LIST, {"pageNumber": 2, "pageSize": 3}))["data"]
    assert (len(page["list"]), page["total"], page["pageNumber"]) == (1, 4, 2)
    unknown = (await call(CALL_LIST, {"taskId": "no-such-task"}))["data"]
    assert (unknown["list"], unknown["total"]) == ([], 0)


async def test_call_delete_removes_numbers_by_contact_id_or_phone(call: Call) -> None:
    entries = [contact("13800000001", "c-1"), contact("13800000002", "c-2"), contact("1380003")]
    await call(APPEND, {"taskId": "t-1", "list": entries})
    deleted = await call(
        CALL_DELETE, {"taskId": "t-1", "contactIds": ["c-1"], "phoneNumbers": ["13800000002"]}
    )
    assert deleted["data"] == {"taskId": "t-1", "deletedCount": 2}
    left = (await call(CALL_LIST, {"taskId": "t-1"}))["data"]["list"]
    assert [r["phoneNumber"] for r in left] == ["1380003"]


async def test_order_delete_marks_records_deleted(call: Call) -> None:
    entries = [contact("13800000001", "c-1"), contact("13800000002", "c-2")]
    await call(APPEND, {"taskId": "t-1", "list": entries})
    operated = await call(ORDER_DELETE, {"taskId": "t-1", "contactIds": ["c-2", "ghost"]})
    assert operated["data"] == {"taskId": "t-1", "operatedCount": 1}
    records = (await call(CALL_LIST, {"taskId": "t-1"}))["data"]["list"]
    assert {r["contactId"]: r["callStatus"] for r in records} == {
        "c-1": "waiting",
        "c-2": "deleted",
    }
    await call(ORDER_DELETE, {"taskId": "t-1"})
    records = (await call(CALL_LIST, {"taskId": "t-1"}))["data"]["list"]
    assert {r["callStatus"] for r in records} == {"deleted"}


async def test_accounts_never_see_each_others_numbers(call: Call) -> None:
    await call(APPEND, {"taskId": "shared-id", "list": [contact("13800000001")]}, CREDS_A)
    seen_by_b = (await call(CALL_LIST, {"taskId": "shared-id"}, CREDS_B))["data"]
    assert seen_by_b["total"] == 0
    tasks_b = (await call(TASK_LIST, {}, CREDS_B))["data"]["list"]
    assert [t["taskId"] for t in tasks_b] == ["task-demo-001"]


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        (APPEND, {"list": [contact("1")]}),
        (APPEND, {"taskId": "  ", "list": [contact("1")]}),
        (APPEND, {"taskId": "t", "list": []}),
        (APPEND, {"taskId": "t", "list": "13800000001"}),
        (APPEND, {"taskId": "t", "list": [{"name": "no phone"}]}),
        (APPEND, {"taskId": "t", "list": ["13800000001"]}),
        (APPEND, {"taskId": 5, "list": [contact("1")]}),
        (CALL_DELETE, {}),
        (CALL_DELETE, {"taskId": "t", "contactIds": 5}),
        (CALL_DELETE, {"taskId": "t", "contactIds": [{"id": 1}]}),
        (CALL_DELETE, {"taskId": "t", "phoneNumbers": [["nested"]]}),
        (ORDER_DELETE, {"taskId": "t", "contactIds": 5}),
        (ORDER_DELETE, {"taskId": "t", "contactIds": [["nested"]]}),
        (CALL_LIST, {"taskId": ["t"]}),
        (CALL_LIST, {"pageSize": 0}),
        (CALL_LIST, {"pageSize": 1001}),
        (CALL_LIST, {"pageNumber": True}),
        (TASK_LIST, {"pageNumber": "1"}),
    ],
)
async def test_bad_operation_parameters_are_a_parameter_error(
    call: Call, path: str, payload: dict[str, Any]
) -> None:
    answer = await call(path, payload)
    assert answer["code"] == 1002, answer
    assert answer["message"].startswith("Parameter error")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/openapi/aiagent/task/create", 404),
        ("GET", "/", 404),
        ("DELETE", "/no/such/thing", 404),
        ("GET", TASK_LIST, 405),
        ("PUT", APPEND, 405),
    ],
)
async def test_unemulated_paths_and_methods_answer_nxlink_json(
    sandbox: Client, method: str, path: str, status: int
) -> None:
    resp = await sandbox.request(method, path, data=b"{}")
    assert resp.status == status
    assert resp.content_type == "application/json"
    answer = await resp.json()
    assert set(answer) == {"code", "message", "data", "traceId"}
    assert answer["code"] == 1002 and answer["data"] is None
    assert path in answer["message"]
    if status == 405:
        assert resp.headers["Allow"] == "POST"
    else:
        assert all(p in answer["message"] for p in ACTIONS)


async def test_a_body_over_the_sandbox_limit_answers_nxlink_json(sandbox: Client) -> None:
    resp = await sandbox.post(TASK_LIST, data=io.BytesIO(b"x" * (16 * 1024 * 1024 + 1)))
    assert resp.status == 413
    assert (await resp.json())["code"] == 1002
