"""The OpenAPI 3.1 document of the client-facing API, served at ``/api/openapi/spec.json``."""

from __future__ import annotations

import copy
import functools
import json
from typing import Final

from proxy import __version__
from proxy.apidoc import components
from proxy.apidoc.components import JSON
from proxy.apidoc.paths import FORWARD_PATH, PATHS
from proxy.apidoc.responses import error_responses, error_schemas

DESCRIPTION: Final = (
    "A multi-tenant API-key gateway for the nxlink OpenAPI. Every JSON answer of the "
    'gateway\'s own is `{"code", "message", ...}`; errors add `"error"` and their HTTP '
    "status equals `code`. A method a path does not support answers 405 `METHOD_NOT_ALLOWED` "
    "with `Allow`; an unknown path 404 `NOT_FOUND`. Every answer carries `X-Request-Id`."
)


def build_document() -> JSON:
    """The whole document as a fresh dict (the caller may change it)."""
    document: JSON = {
        "openapi": "3.1.0",
        "info": {
            "title": "nxlink OpenAPI gateway",
            "version": __version__,
            "description": DESCRIPTION,
        },
        "tags": [
            {"name": "gateway", "description": "The gateway's own endpoints"},
            {"name": "nxlink", "description": "nxlink operations, signed and forwarded"},
            {"name": "operations", "description": "Health, readiness, metrics, this document"},
        ],
        "paths": PATHS,
        "components": {
            "schemas": components.SCHEMAS | error_schemas(),
            "responses": error_responses(),
            "headers": components.HEADERS,
            "parameters": components.PARAMETERS | {"ForwardPath": FORWARD_PATH},
            "securitySchemes": components.SECURITY_SCHEMES,
        },
    }
    return copy.deepcopy(document)


@functools.cache
def document_bytes() -> bytes:
    """The document as UTF-8 JSON, encoded once."""
    return json.dumps(build_document(), ensure_ascii=False, separators=(",", ":")).encode()
