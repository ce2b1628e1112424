"""The document's reusable parts: schemas, error answers, headers, parameters, security."""

from __future__ import annotations

from typing import Any, Final

from proxy.append import IDEMPOTENCY_HEADER, MAX_IDEMPOTENCY_KEY, REPLAYED_HEADER
from proxy.forwarding import ACTION_NAME

JSON = dict[str, Any]
# The answer of every route named in a security requirement: key in x-api-key, or bearer.
KEY_SECURITY: Final[list[JSON]] = [{"ApiKeyHeader": []}, {"BearerKey": []}]


def ref(kind: str, name: str) -> JSON:
    """A ``$ref`` to ``#/components/<kind>/<name>``."""
    return {"$ref": f"#/components/{kind}/{name}"}


def obj(properties: JSON, *required: str) -> JSON:
    """An object schema; extra properties are allowed (answers may grow)."""
    schema: JSON = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def envelope(message: str | None, data: JSON, *extra_required: str, **extra: JSON) -> JSON:
    """The 200 envelope ``{"code": 200, "message", "data", ...}``."""
    text: JSON = {"type": "string"} if message is None else {"const": message}
    props = {"code": {"const": 200}, "message": text, "data": data, **extra}
    return obj(props, "code", "message", "data", *extra_required)


STRING: Final = {"type": "string"}
INTEGER: Final = {"type": "integer"}
COUNT: Final = {"type": "integer", "minimum": 0}
BOOLEAN: Final = {"type": "boolean"}
DATE_TIME: Final = {"type": "string", "format": "date-time"}
MASKED_KEY: Final = {"type": "string", "description": "first 8 characters + `***`"}

QUOTA_NAMES: Final = ["numbersPerDay", "numbersPerMonth", "requestsPerDay", "requestsPerMonth"]
QUOTA: Final = obj(
    {
        "name": {"enum": QUOTA_NAMES},
        "limit": COUNT,
        "used": COUNT,
        "remaining": COUNT,
        "resetsAt": DATE_TIME,
    },
    "name",
    "limit",
    "used",
    "remaining",
    "resetsAt",
)

ERROR: Final = {
    **obj(
        {
            "code": {"type": "integer", "minimum": 400, "maximum": 599},
            "message": STRING,
            "error": {"type": "string", "pattern": "^[A-Z][A-Z0-9_]*$"},
            "apiKey": MASKED_KEY,
            "apiKeyAlias": STRING,
            "availableKeys": {
                "type": "array",
                "items": obj({"alias": STRING, "description": STRING}, "alias", "description"),
            },
            "quota": ref("schemas", "Quota"),
        },
        "code",
        "message",
        "error",
    ),
    "description": "The gateway's error envelope; `code` equals the HTTP status.",
}

NXLINK_ANSWER: Final = {
    **obj({"code": INTEGER, "message": STRING, "data": {}, "traceId": STRING}, "code", "message"),
    "description": "nxlink's answer, passed through untouched: `code` 0 or 200 on success, "
    "1001-1005 on authentication failures (business errors also travel as HTTP 200).",
}

PARAM: Final = obj(
    {"name": {"type": "string", "pattern": "\\S"}, "value": {"type": ["string", "number"]}},
    "name",
    "value",
)
PARAMS: Final = {"type": "array", "items": ref("schemas", "Param")}

PHONE_ENTRY: Final = {
    "oneOf": [
        {"type": "string", "description": "a phone number; spaces and dashes are removed"},
        obj(
            {"phoneNumber": STRING, "params": PARAMS, "contactId": STRING, "name": STRING},
            "phoneNumber",
        ),
    ],
    "description": "A usable number is 3-32 digits with an optional leading `+`; an entry "
    "without one fails on its own (the others still go through).",
}

APPEND_REQUEST: Final = obj(
    {
        "taskId": {"type": "string", "pattern": "\\S"},
        "phoneNumbers": {"type": "array", "minItems": 1, "items": ref("schemas", "PhoneEntry")},
        "autoFlowId": INTEGER,
        "countryCode": STRING,
        "params": {**PARAMS, "description": "applied to the plain-string entries"},
    },
    "taskId",
    "phoneNumbers",
)

APPEND_RESULT: Final = {
    "oneOf": [
        obj(
            {
                "phoneNumber": STRING,
                "success": {"const": True},
                "contactId": STRING,
                "response": ref("schemas", "NxlinkAnswer"),
            },
            "phoneNumber",
            "success",
            "contactId",
            "response",
        ),
        obj(
            {
                "phoneNumber": {"description": "the entry's number as sent"},
                "success": {"const": False},
                "contactId": STRING,
                "error": STRING,
                "response": {},
            },
            "phoneNumber",
            "success",
            "error",
        ),
    ]
}

APPEND_ANSWER: Final = envelope(
    None,
    obj(
        {
            "taskId": STRING,
            "totalCount": COUNT,
            "successCount": COUNT,
            "failCount": COUNT,
            "unknownCount": COUNT,
            "results": {"type": "array", "items": ref("schemas", "AppendResult")},
        },
        "taskId",
        "totalCount",
        "successCount",
        "failCount",
        "results",
    ),
    "apiKey",
    apiKey=MASKED_KEY,
)

STATUS_ANSWER: Final = envelope(
    "OpenAPI service is running",
    obj(
        {
            "service": {"const": "nxlink-openapi-proxy"},
            "version": STRING,
            "timestamp": DATE_TIME,
            "apiKey": MASKED_KEY,
            "apiKeyAlias": STRING,
            "apiKeyDescription": STRING,
            "hasOpenApiConfig": BOOLEAN,
            "openApiBaseUrl": STRING,
            "openApiBizType": STRING,
        },
        "service",
        "version",
        "timestamp",
        "apiKey",
        "apiKeyAlias",
        "apiKeyDescription",
        "hasOpenApiConfig",
        "openApiBaseUrl",
        "openApiBizType",
    ),
)

KEY_ENTRY: Final = obj(
    {
        "alias": STRING,
        "description": STRING,
        "hasOpenApiConfig": BOOLEAN,
        "openApiBaseUrl": STRING,
        "bizType": STRING,
    },
    "alias",
    "description",
    "hasOpenApiConfig",
    "openApiBaseUrl",
    "bizType",
)
KEYS_ANSWER: Final = envelope(
    "Available API Keys",
    obj({"totalKeys": COUNT, "keys": {"type": "array", "items": KEY_ENTRY}}, "totalKeys", "keys"),
)

USAGE_DAY: Final = obj(
    {
        "date": {"type": "string", "format": "date"},
        "requests": COUNT,
        "byAction": {"type": "object", "additionalProperties": COUNT},
        "byStatus": obj({"2xx": COUNT, "4xx": COUNT, "5xx": COUNT}, "2xx", "4xx", "5xx"),
        "numbersAppended": COUNT,
        "numbersFailed": COUNT,
        "upstreamErrors": COUNT,
    },
    "date",
    "requests",
    "byAction",
    "byStatus",
    "numbersAppended",
    "numbersFailed",
)
USAGE_ANSWER: Final = envelope(
    "Usage",
    obj(
        {
            "apiKeyAlias": STRING,
            "timezone": STRING,
            "quotas": {"type": "array", "items": ref("schemas", "Quota")},
            "days": {"type": "array", "items": ref("schemas", "UsageDay"), "maxItems": 90},
        },
        "apiKeyAlias",
        "timezone",
        "quotas",
        "days",
    ),
)

SCHEMAS: Final = {
    "Error": ERROR,
    "Quota": QUOTA,
    "NxlinkAnswer": NXLINK_ANSWER,
    "Param": PARAM,
    "PhoneEntry": PHONE_ENTRY,
    "AppendRequest": APPEND_REQUEST,
    "AppendResult": APPEND_RESULT,
    "AppendAnswer": APPEND_ANSWER,
    "StatusAnswer": STATUS_ANSWER,
    "KeysAnswer": KEYS_ANSWER,
    "UsageDay": USAGE_DAY,
    "UsageAnswer": USAGE_ANSWER,
    "HealthAnswer": envelope("ok", obj({"status": {"const": "alive"}}, "status")),
    "ReadyAnswer": envelope(
        "ready", obj({"status": {"const": "ready"}, "tenants": COUNT, "state": STRING}, "status")
    ),
}

HEADERS: Final = {
    "X-Request-Id": {
        "description": "The request id (the client's own when sane, else a new one); "
        "also in every log line about the request.",
        "schema": STRING,
    },
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    },
    "RetryAfterWhileRunning": {
        "description": "Seconds to wait, when the first request with this key still runs.",
        "schema": {"type": "integer", "minimum": 1},
    },
    "RateLimit-Policy": {
        "description": "The limits in force for this tenant (draft-ietf-httpapi-ratelimit-headers),"
        ' e.g. `"rate";q=50;w=1, "numbersPerDay";q=5000;w=86400`.',
        "schema": STRING,
    },
    "RateLimit": {
        "description": 'What remains of the limits, e.g. `"rate";r=49;t=1`.',
        "schema": STRING,
    },
    REPLAYED_HEADER: {
        "description": "`true` when this is the stored answer of an earlier request with the "
        "same Idempotency-Key and body.",
        "schema": {"enum": ["true"]},
    },
    "Allow": {"description": "The methods this path supports.", "required": True, "schema": STRING},
}

PARAMETERS: Final = {
    "IdempotencyKey": {
        "name": IDEMPOTENCY_HEADER,
        "in": "header",
        "description": "Makes a retry safe: a repeat with the same key and body returns the "
        "first answer without calling nxlink again (scoped to the tenant).",
        "schema": {"type": "string", "maxLength": MAX_IDEMPOTENCY_KEY},
    },
    "Action": {
        "name": "action",
        "in": "header",
        "description": "The nxlink operation; defaults to the one known for the path.",
        "schema": {"type": "string", "pattern": f"^{ACTION_NAME.pattern}$"},
    },
    "UsageDays": {
        "name": "days",
        "in": "query",
        "description": "How many days, newest first.",
        "schema": {"type": "integer", "minimum": 1, "maximum": 90, "default": 7},
    },
}

SECURITY_SCHEMES: Final = {
    "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key"},
    "BearerKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "The same API key as `Authorization: Bearer <key>`.",
    },
}
