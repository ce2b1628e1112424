"""The admin API on its own listener: token, security headers, tenants and keys, writes that the
gateway applies at once, read-only sources, usage, audit, and no secret in any answer or log."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.admin.store import etag_of
from proxy.appkeys import SETTINGS, STATE
from proxy.config import ConfigError
from proxy.logs import JsonFormatter
from proxy.metrics import Metrics
from proxy.reload import Reloader
from proxy.serve import tenants_validator
from proxy.tenants import Registry, derived_id, load_registry
from tests.admin_setup import ADMIN_TOKEN, AUTH, ENV, ENV_KEY, Admin, Client, start_admin
from tests.conftest import CREDS_A, CREDS_B, KEY_A, KEY_B, Upstream, make_settings
from tests.processes import tenant_entry

ClientFor = Callable[[web.Application], Awaitable[Client]]
NEW_TENANT = {
    "alias": "tenant-new",
    "description": "New shop",
    "openapi": {"accessKey": "ak-tenant-a", "accessSecret": "secret-a-DO-NOT-LEAK"},
    "limits": {"rateLimitRps": 3},
    "quotas": {"numbersPerDay": 500},
}


@pytest.fixture
async def admin(aiohttp_client: ClientFor, tmp_path: Path, upstream: Upstream) -> Admin:
    return await start_admin(aiohttp_client, tmp_path, upstream.base_url)


async def call(admin: Admin, method: str, path: str, body: Any = None, **kw: Any) -> Any:
    headers = AUTH | kw.pop("headers", {})
    response = await admin.client.request(
        method, f"/admin/api{path}", json=body, headers=headers, **kw
    )
    return response.status, await response.json(), response.headers


async def create(admin: Admin, **fields: Any) -> dict[str, Any]:
    status, doc, _ = await call(admin, "POST", "/tenants", NEW_TENANT | fields)
    assert status == 201, doc
    return dict(doc["data"])


# the token


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "MISSING_ADMIN_TOKEN"),
        ({"Authorization": "Bearer "}, 401, "MISSING_ADMIN_TOKEN"),
        ({"Authorization": "Basic " + ADMIN_TOKEN}, 401, "MISSING_ADMIN_TOKEN"),
        ({"Authorization": "Bearer wrong-token-0123456789-0123456789"}, 403, "INVALID_ADMIN_TOKEN"),
        ({"Authorization": f"Bearer {KEY_A}"}, 403, "INVALID_ADMIN_TOKEN"),
        ({"x-api-key": KEY_A}, 401, "MISSING_ADMIN_TOKEN"),
        ({"Authorization": f"Bearer {ADMIN_TOKEN}x"}, 403, "INVALID_ADMIN_TOKEN"),
    ],
)
async def test_api_needs_the_admin_token(
    admin: Admin, headers: dict[str, str], status: int, code: str
) -> None:
    for path in ("/admin/api/tenants", "/admin/api/audit", "/admin/api/no-such-route"):
        response = await admin.client.get(path, headers=headers)
        assert response.status == status
        assert (await response.json())["error"] == code


async def test_every_answer_carries_the_security_headers(admin: Admin) -> None:
    for path, headers in [
        ("/admin/", {}),
        ("/admin/app.js", {}),
        ("/admin/api/tenants", {}),
        ("/admin/api/tenants", AUTH),
        ("/admin/api/nothing", AUTH),
        ("/elsewhere", {}),
    ]:
        response = await admin.client.get(path, headers=headers)
        assert response.headers["Cache-Control"] == "no-store"
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers["X-Request-Id"]


async def test_console_files_load_without_the_token(admin: Admin) -> None:
    page = await admin.client.get("/admin/")
    assert page.status == 200 and page.content_type == "text/html"
    assert 'src="app.js"' in await page.text()
    script = await admin.client.get("/admin/app.js")
    assert script.status == 200 and script.content_type == "text/javascript"
    style = await admin.client.get("/admin/app.css")
    assert style.status == 200 and style.content_type == "text/css"
    bare = await admin.client.get("/admin", allow_redirects=False)
    assert bare.status == 302 and bare.headers["Location"] == "/admin/"


async def test_nothing_of_the_admin_is_on_the_proxy_listener(admin: Admin) -> None:
    for path in ("/admin/", "/admin/app.js", "/admin/api/tenants", "/admin/api/audit"):
        for headers in ({}, AUTH, {"x-api-key": KEY_A}):
            response = await admin.proxy.get(path, headers=headers)
            assert response.status == 404, path
    response = await admin.proxy.post("/admin/api/tenants", json=NEW_TENANT, headers=AUTH)
    assert response.status == 404
    assert len(admin.registry()) == 3


async def test_unknown_route_and_method_are_envelopes(admin: Admin) -> None:
    status, doc, _ = await call(admin, "GET", "/nothing")
    assert (status, doc["error"]) == (404, "NOT_FOUND")
    status, doc, _ = await call(admin, "PUT", "/tenants")
    assert (status, doc["error"]) == (405, "METHOD_NOT_ALLOWED")


# reading


async def test_list_shows_every_tenant_masked_with_the_file_version(admin: Admin) -> None:
    status, doc, headers = await call(admin, "GET", "/tenants")
    assert status == 200 and doc["data"]["total"] == 3
    assert admin.path is not None
    assert headers["ETag"] == '"' + hashlib.sha256(admin.path.read_bytes()).hexdigest() + '"'
    by_alias = {t["alias"]: t for t in doc["data"]["tenants"]}
    a = by_alias["tenant-a"]
    assert a["id"] == "tenant-a" and a["source"] == "file" and a["editable"] is True
    assert a["description"] == "Shop A"
    assert a["keys"] == [
        {"id": a["keys"][0]["id"], "masked": "tenant-a***", "notAfter": None, "expired": False}
    ]
    assert a["openapi"] == {
        "accessKey": "ak-tenan***",
        "hasSecret": True,
        "bizType": "8",
        "baseUrl": a["openapi"]["baseUrl"],
        "algorithm": "md5",
    }
    assert by_alias["tenant-b"]["id"] == derived_id("tenant-b")
    assert by_alias["tenant-b"]["limits"] == {"rateLimitRps": 5.0}
    env = by_alias["from-env"]
    assert (env["id"], env["source"], env["editable"]) == ("env-1", "env", False)
    assert env["openapi"]["hasSecret"] is False
    assert "accessSecret" not in json.dumps(doc)


async def test_get_one_tenant_and_unknown_ids(admin: Admin) -> None:
    status, doc, headers = await call(admin, "GET", "/tenants/tenant-a")
    assert status == 200 and doc["data"]["alias"] == "tenant-a" and headers["ETag"]
    status, doc, _ = await call(admin, "GET", "/tenants/nobody")
    assert (status, doc["error"]) == (404, "TENANT_NOT_FOUND")


# creating


async def test_create_shows_the_key_once_and_the_gateway_takes_it_at_once(admin: Admin) -> None:
    data = await create(admin)
    key = data["apiKey"]
    assert key.startswith("nxk_") and len(key) >= 16
    assert data["id"] == data["tenant"]["id"] and data["tenant"]["alias"] == "tenant-new"
    assert data["tenant"]["limits"] == {"rateLimitRps": 3.0}
    assert data["tenant"]["quotas"] == {"numbersPerDay": 500}
    status = await admin.proxy.get("/api/openapi/status", headers={"x-api-key": key})
    assert status.status == 200
    assert (await status.json())["data"]["apiKeyAlias"] == "tenant-new"
    text = admin.path.read_text() if admin.path else ""
    assert key not in text and "sha256:" + hashlib.sha256(key.encode()).hexdigest() in text
    _, listed, _ = await call(admin, "GET", "/tenants")
    assert key not in json.dumps(listed)


async def test_create_writes_the_ids_of_entries_that_had_none(admin: Admin) -> None:
    before = {t.alias: t.id for t in admin.registry().tenants}
    await create(admin)
    entries = admin.file()
    assert [e["id"] for e in entries[:2]] == [before["tenant-a"], before["tenant-b"]]
    assert {t.alias: t.id for t in admin.registry().tenants}.items() >= before.items()


async def test_create_with_a_given_key(admin: Admin) -> None:
    data = await create(admin, apiKey="my-own-key-0123456789")
    assert data["apiKey"] == "my-own-key-0123456789"
    status = await admin.proxy.get(
        "/api/openapi/status", headers={"x-api-key": "my-own-key-0123456789"}
    )
    assert status.status == 200


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"colour": "red"}, "colour: unknown field"),
        ({"alias": ""}, "alias: required"),
        ({"alias": 5}, "alias: must be a string"),
        ({"description": ["x"]}, "description: must be a string"),
        ({"limits": {"rps": 3}}, "limits.rps: unknown limit"),
        ({"limits": 3}, "limits: must be an object"),
        ({"limits": {"rateLimitRps": -1}}, "rateLimitRps=-1 must be a positive number"),
        ({"quotas": {"numbersPerDay": 1.5}}, "numbersPerDay=1.5 must be a positive whole number"),
        ({"quotas": {"perYear": 1}}, "unknown quota(s) perYear"),
        ({"openapi": {"baseUrl": "ftp://x"}}, "baseUrl=ftp://x: not an http(s) URL"),
        ({"openapi": {"algorithm": "sha1"}}, "algorithm=sha1: unknown algorithm"),
        ({"openapi": {"secret": "x"}}, "unknown field(s) openapi.secret"),
        ({"openapi": {"accessKey": ["x"]}}, "accessKey: must be a string"),
        ({"apiKey": "short"}, "apiKey: must be a string of at least 16 characters"),
        ({"apiKey": KEY_A}, "is configured twice"),
        ({"apiKey": ENV_KEY}, "is configured twice"),
        ({"alias": "tenant-a"}, "alias tenant-a is already used by tenant tenant-a"),
    ],
)
async def test_create_refuses_a_bad_tenant_naming_the_field(
    admin: Admin, fields: dict[str, Any], named: str
) -> None:
    before = admin.path.read_bytes() if admin.path else b""
    status, doc, _ = await call(admin, "POST", "/tenants", NEW_TENANT | fields)
    assert (status, doc["error"]) == (400, "INVALID_TENANT")
    assert any(named in line for line in doc["errors"]), doc["errors"]
    assert admin.path is not None and admin.path.read_bytes() == before
    assert len(admin.registry()) == 3


async def test_body_bounds_content_type_and_json(admin: Admin) -> None:
    big = NEW_TENANT | {"description": "x" * (65 * 1024)}
    status, doc, _ = await call(admin, "POST", "/tenants", big)
    assert (status, doc["error"]) == (413, "PAYLOAD_TOO_LARGE")
    response = await admin.client.post(
        "/admin/api/tenants", data="alias=x", headers=AUTH | {"Content-Type": "text/plain"}
    )
    assert response.status == 415 and (await response.json())["error"] == "UNSUPPORTED_MEDIA_TYPE"
    response = await admin.client.post(
        "/admin/api/tenants", data="{nope", headers=AUTH | {"Content-Type": "application/json"}
    )
    assert response.status == 400 and (await response.json())["error"] == "INVALID_JSON"
    status, doc, _ = await call(admin, "POST", "/tenants", ["not", "an", "object"])
    assert (status, doc["error"]) == (400, "INVALID_TENANT")


# changing


async def test_patch_changes_fields_and_keeps_the_secret(admin: Admin) -> None:
    status, doc, _ = await call(
        admin,
        "PATCH",
        "/tenants/tenant-a",
        {"description": "Renamed", "openapi": {"bizType": "12"}, "limits": {"maxInflight": 2}},
    )
    assert status == 200 and doc["data"]["description"] == "Renamed"
    assert doc["data"]["openapi"]["bizType"] == "12" and doc["data"]["limits"] == {"maxInflight": 2}
    entry = admin.file()[0]
    assert entry["openapi"]["accessSecret"] == CREDS_A.access_secret.reveal()
    tenant = next(t for t in admin.registry().tenants if t.id == "tenant-a")
    assert tenant.description == "Renamed" and tenant.limits.max_inflight == 2
    status, doc, _ = await call(
        admin, "PATCH", "/tenants/tenant-a", {"limits": {"maxInflight": None}}
    )
    assert status == 200 and doc["data"]["limits"] == {}


async def test_patch_refuses_a_bad_field_and_keeps_the_file(admin: Admin) -> None:
    before = admin.path.read_bytes() if admin.path else b""
    status, doc, _ = await call(admin, "PATCH", "/tenants/tenant-a", {"apiKey": "x" * 20})
    assert (status, doc["error"]) == (400, "INVALID_TENANT")
    assert doc["errors"] == ["apiKey: unknown field"]
    assert admin.path is not None and admin.path.read_bytes() == before


async def test_stale_if_match_is_a_conflict(admin: Admin) -> None:
    _, _, headers = await call(admin, "GET", "/tenants")
    etag = headers["ETag"]
    status, doc, fresh = await call(
        admin, "PATCH", "/tenants/tenant-a", {"description": "one"}, headers={"If-Match": etag}
    )
    assert status == 200 and fresh["ETag"] != etag
    status, doc, _ = await call(
        admin, "PATCH", "/tenants/tenant-a", {"description": "two"}, headers={"If-Match": etag}
    )
    assert (status, doc["error"]) == (412, "CONFLICT")
    assert admin.file()[0]["description"] == "one"


async def test_delete_stops_the_keys(admin: Admin) -> None:
    status, doc, _ = await call(admin, "DELETE", "/tenants/tenant-a")
    assert status == 200 and doc["data"] == {"id": "tenant-a"}
    response = await admin.proxy.get("/api/openapi/status", headers={"x-api-key": KEY_A})
    assert response.status == 403
    assert [e["alias"] for e in admin.file()] == ["tenant-b"]
    status, doc, _ = await call(admin, "DELETE", "/tenants/tenant-a")
    assert (status, doc["error"]) == (404, "TENANT_NOT_FOUND")


# keys


async def test_rotate_with_grace_keeps_the_old_key_until_then(admin: Admin) -> None:
    status, doc, _ = await call(admin, "POST", "/tenants/tenant-a/keys", {"graceSeconds": 3600})
    assert status == 201
    new = doc["data"]["apiKey"]
    keys = doc["data"]["tenant"]["keys"]
    assert [k["id"] for k in keys][-1] == doc["data"]["keyId"]
    assert keys[0]["notAfter"] is not None and keys[0]["expired"] is False
    assert keys[1]["notAfter"] is None
    for key in (KEY_A, new):
        response = await admin.proxy.get("/api/openapi/status", headers={"x-api-key": key})
        assert response.status == 200
    assert KEY_A not in admin.path.read_text() if admin.path else False


async def test_rotate_without_grace_ends_the_old_key_now(admin: Admin) -> None:
    response = await admin.client.post("/admin/api/tenants/tenant-a/keys", headers=AUTH)
    assert response.status == 201
    new = (await response.json())["data"]["apiKey"]
    old = await admin.proxy.get("/api/openapi/status", headers={"x-api-key": KEY_A})
    assert (await old.json())["error"] == "API_KEY_EXPIRED"
    fresh = await admin.proxy.get("/api/openapi/status", headers={"x-api-key": new})
    assert fresh.status == 200


@pytest.mark.parametrize(
    "body", [{"graceSeconds": -1}, {"graceSeconds": "60"}, {"graceSeconds": True}, {"grace": 1}]
)
async def test_rotate_refuses_a_bad_grace(admin: Admin, body: dict[str, Any]) -> None:
    status, doc, _ = await call(admin, "POST", "/tenants/tenant-a/keys", body)
    assert (status, doc["error"]) == (400, "INVALID_REQUEST")
    assert "graceSeconds" in doc["message"]


async def test_revoke_removes_one_key(admin: Admin) -> None:
    _, doc, _ = await call(admin, "POST", "/tenants/tenant-a/keys", {"graceSeconds": 600})
    old_id = doc["data"]["tenant"]["keys"][0]["id"]
    status, doc, _ = await call(admin, "DELETE", f"/tenants/tenant-a/keys/{old_id}")
    assert status == 200 and old_id not in [k["id"] for k in doc["data"]["keys"]]
    response = await admin.proxy.get("/api/openapi/status", headers={"x-api-key": KEY_A})
    assert response.status == 403
    status, doc, _ = await call(admin, "DELETE", f"/tenants/tenant-a/keys/{old_id}")
    assert (status, doc["error"]) == (404, "KEY_NOT_FOUND")


# read-only sources


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PATCH", "/tenants/env-1", {"description": "x"}),
        ("DELETE", "/tenants/env-1", None),
        ("POST", "/tenants/env-1/keys", {}),
    ],
)
async def test_environment_tenants_are_read_only(
    admin: Admin, method: str, path: str, body: Any
) -> None:
    status, doc, _ = await call(admin, method, path, body)
    assert (status, doc["error"]) == (409, "READ_ONLY_TENANT")
    assert "EXTERNAL_API_KEY_1" in doc["message"]
    assert doc["variables"] == ["EXTERNAL_API_KEY_1", "EXTERNAL_API_KEY_1_*"]


async def test_without_a_tenants_file_reads_work_and_writes_are_refused(
    aiohttp_client: ClientFor, tmp_path: Path, upstream: Upstream
) -> None:
    admin = await start_admin(aiohttp_client, tmp_path, upstream.base_url, with_file=False)
    status, doc, headers = await call(admin, "GET", "/tenants")
    assert status == 200 and doc["data"]["total"] == 1 and "ETag" not in headers
    status, doc, _ = await call(admin, "POST", "/tenants", NEW_TENANT)
    assert (status, doc["error"]) == (409, "READ_ONLY_CONFIG")
    assert "TENANTS_FILE" in doc["message"]


# test, usage, audit


async def test_test_calls_task_list_signed(admin: Admin, upstream: Upstream) -> None:
    status, doc, _ = await call(admin, "POST", "/tenants/tenant-a/test")
    assert status == 200
    result = doc["data"]
    assert result["ok"] is True and result["httpStatus"] == 200
    assert result["nxlinkCode"] in (0, 200) and result["latencyMs"] >= 0
    [received] = upstream.received
    assert received.path == "/openapi/aiagent/task/list"
    assert json.loads(received.body) == {"pageNumber": 1, "pageSize": 1}
    assert received.headers["accessKey"] == CREDS_A.access_key


async def test_test_reports_nxlinks_refusal(
    aiohttp_client: ClientFor, tmp_path: Path, make_upstream: Callable[..., Awaitable[Upstream]]
) -> None:
    only_b = await make_upstream([CREDS_B])
    admin = await start_admin(aiohttp_client, tmp_path, only_b.base_url)
    status, doc, _ = await call(admin, "POST", "/tenants/tenant-a/test")
    assert status == 200 and doc["data"]["ok"] is False
    assert doc["data"]["nxlinkCode"] not in (None, 0, 200) and doc["data"]["message"]
    _, doc, _ = await call(admin, "POST", "/tenants/env-1/test")
    assert doc["data"]["ok"] is False and "accessKey" in doc["data"]["message"]


async def test_test_reports_an_unreachable_upstream(
    aiohttp_client: ClientFor, tmp_path: Path
) -> None:
    admin = await start_admin(aiohttp_client, tmp_path, "http://127.0.0.1:9")
    status, doc, _ = await call(admin, "POST", "/tenants/tenant-a/test")
    assert status == 200 and doc["data"]["ok"] is False and doc["data"]["httpStatus"] is None
    assert "connect" in doc["data"]["message"].lower()


async def test_usage_of_every_tenant_day_by_day(admin: Admin) -> None:
    from datetime import UTC, datetime, timedelta

    today = datetime.now(UTC).date().isoformat()
    counts = {"requests": 7, "action:callAppend": 5, "status:2xx": 6, "status:4xx": 1}
    added = {("tenant-a", today): counts | {"numbersAppended": 40}}
    await admin.state.add_usage(added, 86400, source="test", seq=1)
    status, doc, _ = await call(admin, "GET", "/usage?days=3")
    assert status == 200 and doc["data"]["timezone"] == "UTC"
    rows = {row["id"]: row for row in doc["data"]["tenants"]}
    assert set(rows) == {"tenant-a", derived_id("tenant-b"), "env-1"}
    days = rows["tenant-a"]["days"]
    assert [d["date"] for d in days][0] == today and len(days) == 3
    assert days[0] == {
        "date": today,
        "requests": 7,
        "byAction": {"callAppend": 5},
        "byStatus": {"2xx": 6, "4xx": 1, "5xx": 0},
        "numbersAppended": 40,
        "numbersFailed": 0,
        "upstreamErrors": 0,
    }
    assert days[1]["requests"] == 0
    status, doc, _ = await call(admin, "GET", "/usage?tenant=env-1")
    assert [row["id"] for row in doc["data"]["tenants"]] == ["env-1"]
    assert len(doc["data"]["tenants"][0]["days"]) == 7
    assert rows["tenant-a"]["quotas"] == []
    created = await create(admin)  # NEW_TENANT has numbersPerDay 500
    status, doc, _ = await call(admin, "GET", f"/usage?tenant={created['id']}&days=1")
    [quota] = doc["data"]["tenants"][0]["quotas"]
    assert (quota["name"], quota["limit"], quota["used"], quota["remaining"]) == (
        "numbersPerDay",
        500,
        0,
        500,
    )
    assert quota["resetsAt"].startswith((datetime.now(UTC) + timedelta(days=1)).date().isoformat())


@pytest.mark.parametrize("query", ["days=0", "days=91", "days=x", "days=-1"])
async def test_usage_refuses_bad_days(admin: Admin, query: str) -> None:
    status, doc, _ = await call(admin, "GET", f"/usage?{query}")
    assert (status, doc["error"]) == (400, "INVALID_REQUEST") and "days" in doc["message"]


async def test_usage_of_an_unknown_tenant_is_404(admin: Admin) -> None:
    status, doc, _ = await call(admin, "GET", "/usage?tenant=nobody")
    assert (status, doc["error"]) == (404, "TENANT_NOT_FOUND")


async def test_audit_records_every_write_newest_first(admin: Admin) -> None:
    data = await create(admin)
    await call(admin, "PATCH", "/tenants/env-1", {"description": "x"})
    await call(admin, "DELETE", f"/tenants/{data['id']}")
    status, doc, _ = await call(admin, "GET", "/audit?limit=10")
    assert status == 200
    entries = doc["data"]["entries"]
    assert [(e["action"], e["result"]) for e in entries] == [
        ("tenant.delete", "ok"),
        ("tenant.update", "READ_ONLY_TENANT"),
        ("tenant.create", "ok"),
    ]
    assert entries[2]["tenantId"] == data["id"] and entries[2]["alias"] == "tenant-new"
    assert entries[1]["tenantId"] == "env-1" and entries[1]["alias"] == "from-env"
    assert set(entries[0]) == {"time", "action", "tenantId", "alias", "requestId", "result"}
    _, limited, _ = await call(admin, "GET", "/audit?limit=1")
    assert len(limited["data"]["entries"]) == 1


async def test_no_answer_or_log_line_holds_a_secret(
    admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    data = await create(admin)
    new_key = data["apiKey"]
    requests: list[tuple[str, str, Any]] = [
        ("GET", "/tenants", None),
        ("GET", "/tenants/tenant-a", None),
        ("PATCH", "/tenants/tenant-a", {"openapi": {"accessSecret": "secret-new-DO-NOT-LEAK"}}),
        ("POST", "/tenants", NEW_TENANT | {"apiKey": KEY_B}),
        ("POST", "/tenants/tenant-a/keys", {"graceSeconds": 60}),
        ("POST", "/tenants/tenant-a/test", None),
        ("GET", "/usage", None),
        ("GET", "/audit", None),
        ("DELETE", f"/tenants/{data['id']}", None),
    ]
    for method, path, body in requests:
        response = await admin.client.request(method, f"/admin/api{path}", json=body, headers=AUTH)
        seen.append(await response.text() + json.dumps(dict(response.headers)))
    formatter = JsonFormatter()
    logged = "\n".join(formatter.format(record) for record in caplog.records)
    for text in [*seen, logged]:
        for secret in (
            CREDS_A.access_secret.reveal(),
            "secret-new-DO-NOT-LEAK",
            KEY_A,
            KEY_B,
            ENV_KEY,
            new_key,
            ADMIN_TOKEN,
        ):
            assert secret not in text
    assert "admin tenant.create ok" in logged


async def test_a_chunked_body_over_the_bound_is_refused_and_audited(admin: Admin) -> None:
    async def chunks() -> Any:
        for _ in range(80):
            yield b" " * 1024

    response = await admin.client.post(
        "/admin/api/tenants", data=chunks(), headers=AUTH | {"Content-Type": "application/json"}
    )
    assert response.status == 413 and (await response.json())["error"] == "PAYLOAD_TOO_LARGE"
    _, doc, _ = await call(admin, "GET", "/audit")
    assert doc["data"]["entries"][0]["result"] == "PAYLOAD_TOO_LARGE"


async def test_a_read_after_another_process_wrote_the_file_shows_that_version(
    admin: Admin, upstream: Upstream
) -> None:
    assert admin.path is not None
    entries = admin.file()
    items = entries["keys"] if isinstance(entries, dict) else entries
    items.append(
        tenant_entry("elsewhere", "elsewhere-key-0123456789", upstream.base_url, CREDS_A, id="ext")
    )
    data = json.dumps(entries).encode()
    scratch = admin.path.with_suffix(".other")
    scratch.write_bytes(data)
    scratch.replace(admin.path)  # as another worker's admin would, before our poll sees it
    status, doc, headers = await call(admin, "GET", "/tenants")
    assert status == 200
    assert "ext" in [t["id"] for t in doc["data"]["tenants"]]
    assert headers["ETag"] == etag_of(data)  # data and version from the same bytes
    status, _, _ = await call(admin, "GET", "/tenants/ext")
    assert status == 200


def test_the_serving_validator_refuses_a_placeholder_the_reload_would_refuse(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tenants.json"
    path.write_text("[]", encoding="utf-8")
    settings = make_settings(TENANTS_FILE=str(path))
    validate = tenants_validator(settings, ({"ENV_FILE": "/dev/null"}, {}))
    entry = tenant_entry("shop", "shop-key-0123456789", "http://127.0.0.1:9", CREDS_A)
    entry["openapi"]["accessSecret"] = "replace-with-access-secret-1"
    with pytest.raises(ConfigError) as caught:
        validate([entry])
    assert any("placeholder" in problem for problem in caught.value.problems)


async def test_a_count_in_other_digits_is_a_400_not_a_500(admin: Admin) -> None:
    status, doc, _ = await call(admin, "GET", "/audit?limit=²")
    assert status == 400, doc


async def test_a_reload_that_read_the_file_before_a_write_does_not_undo_it(admin: Admin) -> None:
    """A reload that read the tenants file, then an admin write: the reload ending last must not
    swap its older registry over the written one (a created tenant gone, a revoked key back)."""
    assert admin.path is not None
    path, settings = admin.path, admin.proxy_app[SETTINGS]
    read, release = threading.Event(), threading.Event()

    def slow_load() -> Registry:
        document = json.loads(path.read_bytes())  # the file before the write
        read.set()
        release.wait(10)
        return load_registry(ENV, settings, document=document)

    reloader = Reloader(admin.proxy_app[STATE], slow_load, [path], Metrics())
    reloading = asyncio.create_task(reloader.reload("file change"))
    assert await asyncio.to_thread(read.wait, 10)
    creating = asyncio.create_task(create(admin))
    # The write goes first when it may (the race), or waits for the reload (bounded either way).
    await asyncio.wait({creating}, timeout=0.5)
    release.set()
    assert await reloading is True
    created = await creating
    assert any(t.id == created["id"] for t in admin.registry().tenants)
    assert admin.registry().lookup(created["apiKey"]) is not None
