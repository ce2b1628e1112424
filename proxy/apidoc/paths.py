"""Every route of the client-facing listener, as OpenAPI path items (kept true by a test)."""

from __future__ import annotations

from typing import Final

from proxy.apidoc.components import INTEGER, JSON, KEY_SECURITY, STRING, obj, ref
from proxy.apidoc.responses import NAMES, answer, forward_error, headers
from proxy.nxlink import KNOWN_ACTIONS

TENANT_ERRORS: Final = (401, 403, 429, 500)
FORWARD_ERRORS: Final = (400, 401, 403, 404, 408, 413, 429, 500, 502, 504)
RATE_HEADERS: Final = ("RateLimit-Policy", "RateLimit")
BODY_METHODS: Final = ("post", "put", "patch")
FORWARD_METHODS: Final = ("get", "head", "post", "put", "patch", "delete")


def errors(*statuses: int) -> JSON:
    """References to the error answers of ``statuses``."""
    return {str(status): ref("responses", NAMES[status]) for status in statuses}


def operation(op_id: str, summary: str, responses: JSON, **fields: object) -> JSON:
    """An operation; ``fields`` adds description, parameters, requestBody or security."""
    return {"operationId": op_id, "summary": summary, "responses": responses, **fields}


def json_body(schema: JSON, *, required: bool = True) -> JSON:
    """A JSON request body."""
    return {"required": required, "content": {"application/json": {"schema": schema}}}


STATUS: Final = operation(
    "getStatus",
    "Who the caller is to the gateway, and where its calls go",
    {"200": answer("The caller's tenant", ref("schemas", "StatusAnswer"), *RATE_HEADERS)}
    | errors(*TENANT_ERRORS),
    security=KEY_SECURITY,
    tags=["gateway"],
)

KEYS: Final = operation(
    "listKeys",
    "The public key directory: aliases and base URLs, never a key or a secret",
    {"200": answer("Every configured tenant", ref("schemas", "KeysAnswer"))} | errors(404, 500),
    description="Answers 404 when `PUBLIC_KEY_DIRECTORY=false`.",
    security=[],
    tags=["gateway"],
)

APPEND: Final = operation(
    "appendNumbers",
    "Append many numbers to an nxlink calling task, batched, one result per number",
    {
        "200": answer(
            "Processed: one result per input number, in input order",
            ref("schemas", "AppendAnswer"),
            "Idempotent-Replayed",
            *RATE_HEADERS,
        )
    }
    | errors(400, 401, 403, 408, 409, 413, 422, 429, 500, 503),
    description="Sent to nxlink's `call/append` (action `callAppend`) in batches, a few in "
    "flight. A batch nxlink refuses fails only its own numbers.",
    parameters=[ref("parameters", "IdempotencyKey")],
    requestBody=json_body(ref("schemas", "AppendRequest")),
    security=KEY_SECURITY,
    tags=["gateway"],
)

USAGE: Final = operation(
    "getUsage",
    "The caller's own usage per day and its quotas",
    {"200": answer("Usage, newest day first", ref("schemas", "UsageAnswer"), *RATE_HEADERS)}
    | errors(400, *TENANT_ERRORS, 503),
    parameters=[ref("parameters", "UsageDays")],
    security=KEY_SECURITY,
    tags=["gateway"],
)

SPEC: Final = operation(
    "getSpec",
    "This document",
    {
        "200": answer(
            "The OpenAPI 3.1 document of the client-facing API",
            obj(
                {"openapi": STRING, "info": {"type": "object"}, "paths": {"type": "object"}},
                "openapi",
                "info",
                "paths",
            ),
        )
    },
    security=[],
    tags=["operations"],
)

HEALTHZ: Final = operation(
    "getHealth",
    "Liveness: the process answers",
    {"200": answer("Alive", ref("schemas", "HealthAnswer"))} | errors(500),
    security=[],
    tags=["operations"],
)

READYZ: Final = operation(
    "getReadiness",
    "Readiness: configuration loaded and not draining",
    {"200": answer("Ready to serve", ref("schemas", "ReadyAnswer"))} | errors(500, 503),
    security=[],
    tags=["operations"],
)

METRICS: Final = operation(
    "getMetrics",
    "Prometheus metrics",
    {
        "200": {
            "description": "Prometheus text exposition",
            "headers": headers(),
            "content": {"text/plain": {"schema": STRING}},
        }
    }
    | errors(500),
    security=[],
    tags=["operations"],
)


def forward_responses(method: str, *, any_type: bool) -> JSON:
    """A forward's answers: nxlink's, streamed back, or the gateway's own errors."""
    passed = "nxlink's answer, passed through: status, end-to-end headers and body as it sent them"
    content: JSON = {"application/json": {"schema": ref("schemas", "NxlinkAnswer")}}
    if any_type:
        content["*/*"] = {"schema": {}}
    ok = {"description": passed, "headers": headers(*RATE_HEADERS), "content": content}
    anything: JSON = {"*/*": {"schema": {}}}
    everything = {"description": passed, "headers": headers(*RATE_HEADERS), "content": anything}
    failures = {str(status): forward_error(status) for status in FORWARD_ERRORS}
    answers = {"200": ok, **failures, "default": everything}
    if method == "head":  # the same answers without a body
        return {status: _without_body(response) for status, response in answers.items()}
    return answers


def _without_body(response: JSON) -> JSON:
    return {key: value for key, value in response.items() if key != "content"}


def forward(method: str) -> JSON:
    """``/openapi/{path}``: any nxlink operation, signed for the caller's tenant."""
    fields: JSON = {
        "description": "Signed with the tenant's nxlink credentials and streamed to its base "
        "URL + this path (+ the query). The action is the `action` header, else the one "
        "known for the path. Client credentials, cookies, hop-by-hop and forwarding headers "
        "are not forwarded.",
        "parameters": [ref("parameters", "ForwardPath"), ref("parameters", "Action")],
        "security": KEY_SECURITY,
        "tags": ["nxlink"],
    }
    if method in BODY_METHODS:
        any_json: JSON = {"schema": {}}
        streamed = {"schema": {"type": "object"}}
        content = {"application/json": any_json, "multipart/form-data": streamed}
        fields["requestBody"] = {"required": False, "content": content}
    name = f"forward{method.capitalize()}"
    return operation(
        name,
        f"{method.upper()} any nxlink operation",
        forward_responses(method, any_type=True),
        **fields,
    )


PAGE: Final = {
    "pageNumber": {"type": "integer", "minimum": 1},
    "pageSize": {"type": "integer", "minimum": 1, "maximum": 1000},
}
IDS: Final = {"type": "array", "items": STRING}
CONTACT: Final = obj(
    {"contactId": STRING, "phoneNumber": STRING, "name": STRING, "params": {"type": "array"}},
    "phoneNumber",
)
KNOWN_BODIES: Final[dict[str, JSON]] = {
    "pageCallTaskInfo": obj(PAGE),
    "pageCallRecords": obj({"taskId": STRING, **PAGE}),
    "callAppend": obj(
        {
            "taskId": STRING,
            "autoFlowId": INTEGER,
            "countryCode": STRING,
            "list": {"type": "array", "items": CONTACT},
        },
        "taskId",
        "list",
    ),
    "callDelete": obj({"taskId": STRING, "contactIds": IDS, "phoneNumbers": IDS}, "taskId"),
    "operateCallRecords": obj({"taskId": STRING, "contactIds": IDS}, "taskId"),
}


def known(path: str, action: str) -> JSON:
    """A known nxlink operation: forwarded like any other, its action implied by the path."""
    return operation(
        action,
        f"nxlink `{action}`, signed and forwarded",
        forward_responses("post", any_type=False),
        description=f"Forwarded to the tenant's base URL + `{path}` with action `{action}`.",
        parameters=[ref("parameters", "Action")],
        requestBody=json_body(KNOWN_BODIES[action]),
        security=KEY_SECURITY,
        tags=["nxlink"],
    )


FORWARD_PATH: Final = {
    "name": "path",
    "in": "path",
    "required": True,
    "description": "The rest of the nxlink path, e.g. `aiagent/task/list`. No empty, `.` or "
    "`..` segment and no encoded slash (400 `INVALID_PATH`).",
    "schema": STRING,
}

PATHS: Final[JSON] = {
    "/api/openapi/status": {"get": STATUS},
    "/api/openapi/keys": {"get": KEYS},
    "/api/openapi/append-numbers": {"post": APPEND},
    "/api/openapi/usage": {"get": USAGE},
    "/api/openapi/spec.json": {"get": SPEC},
    "/healthz": {"get": HEALTHZ},
    "/readyz": {"get": READYZ},
    "/metrics": {"get": METRICS},
    **{path: {"post": known(path, action)} for path, action in KNOWN_ACTIONS.items()},
    "/openapi/{path}": {method: forward(method) for method in FORWARD_METHODS},
}
