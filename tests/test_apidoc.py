"""The OpenAPI document: valid, served without a key, and in step with the route table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Final

import pytest
from aiohttp import web
from openapi_spec_validator import validate

from proxy import __version__, errors
from proxy.apidoc import build_document
from proxy.apidoc.responses import ERROR_CODES, codes_of
from proxy.app import FORWARD_METHODS, PUBLIC_ROUTES, create_app
from proxy.nxlink import KNOWN_ACTIONS
from proxy.tenants import Registry
from tests.conftest import Client, make_settings

SPEC: Final = "/api/openapi/spec.json"
FORWARD: Final = "/openapi/{path}"
PROXY: Final = Path(__file__).parent.parent / "proxy"
RAISED_CODE: Final = re.compile(r'error="([A-Z_]+)"')
WHERE: Final = "proxy/apidoc/responses.py with its status, or to NOT_CLIENT_FACING here"
# Codes only the admin listener answers: not part of the client-facing document.
NOT_CLIENT_FACING: Final[frozenset[str]] = frozenset()

Pair = tuple[str, str]


def routed(app: web.Application) -> dict[Pair, str]:
    """(path, method) → route name, the forward's tail written as the document's ``{path}``."""
    pairs: dict[Pair, str] = {}
    for route in app.router.routes():
        assert route.resource is not None
        path = route.resource.canonical.replace("{tail}", "{path}")
        pairs[(path, route.method.lower())] = route.resource.name or ""
    return pairs


def documented(doc: dict[str, Any]) -> dict[Pair, dict[str, Any]]:
    """(path, method) → operation; known nxlink paths are served by the forward route."""
    pairs: dict[Pair, dict[str, Any]] = {}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            pairs[(path, method)] = op
    return pairs


def served_by(pair: Pair) -> Pair:
    """The route a documented operation is answered by."""
    path, method = pair
    return (FORWARD, method) if path in KNOWN_ACTIONS else pair


def fix_for(pair: Pair) -> str:
    """What to write into the document for a route it lacks."""
    path, method = pair
    return (
        f"add {path!r}: {{{method!r}: operation(...)}} to PATHS in proxy/apidoc/paths.py "
        "with its parameters, request body, answers and errors"
    )


@pytest.fixture
def app() -> web.Application:
    return create_app(make_settings(), Registry([]))


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = build_document()
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["version"] == __version__


def undocumented(app: web.Application) -> list[str]:
    """What to add to the document for each route it lacks."""
    ops = documented(build_document())
    # aiohttp answers HEAD wherever GET is routed: the document lists HEAD only where it is
    # an operation of its own (the forward).
    implied = {(path, "head") for path, method in ops if method == "get"}
    answered = {served_by(pair) for pair in ops} | implied
    missing = set(routed(app)) - answered
    missing -= {(path, "head") for path, method in missing if method == "get"}
    return [fix_for(pair) for pair in sorted(missing)]


def test_every_route_is_documented_and_every_operation_routed(app: web.Application) -> None:
    missing = undocumented(app)
    assert not missing, "routes missing from the document:\n" + "\n".join(missing)
    routes = routed(app)
    stale = sorted(pair for pair in documented(build_document()) if served_by(pair) not in routes)
    assert not stale, f"documented but not routed (remove from PATHS or add the route): {stale}"


async def _nothing(request: web.Request) -> web.Response:
    return web.Response()


def test_a_new_route_is_reported_with_what_to_add(app: web.Application) -> None:
    app.router.add_delete("/api/openapi/keys", _nothing)
    assert undocumented(app) == [
        "add '/api/openapi/keys': {'delete': operation(...)} to PATHS in proxy/apidoc/paths.py "
        "with its parameters, request body, answers and errors",
    ]


def test_the_forward_is_documented_for_every_forwarded_method() -> None:
    ops = documented(build_document())
    assert {m for p, m in ops if p == FORWARD} == {m.lower() for m in FORWARD_METHODS}
    assert {p for p, _ in ops if p.startswith("/openapi/") and p != FORWARD} == set(KNOWN_ACTIONS)


def test_public_routes_and_only_those_need_no_key(app: web.Application) -> None:
    routes = routed(app)
    for pair, op in documented(build_document()).items():
        public = routes[served_by(pair)] in PUBLIC_ROUTES
        assert (op["security"] == []) == public, pair
        statuses = set(op["responses"])
        assert public or {"401", "403", "429"} <= statuses, pair


def client_facing_sources() -> list[Path]:
    """The package's modules that answer on the client listener."""
    own = (PROXY / "admin", PROXY / "sandbox")
    return [p for p in PROXY.rglob("*.py") if not any(p.is_relative_to(o) for o in own)]


def test_every_error_code_the_code_raises_is_documented_with_its_status() -> None:
    raised = {
        code
        for source in client_facing_sources()
        for code in RAISED_CODE.findall(source.read_text(encoding="utf-8"))
    }
    undocumented = raised - set(ERROR_CODES) - NOT_CLIENT_FACING
    assert not undocumented, f"add {sorted(undocumented)} to ERROR_CODES in {WHERE}"
    for cls in _subclasses(errors.GatewayError):
        # Only a class naming its own code (AuthError is only a base).
        if "error" in vars(cls) and cls.error not in NOT_CLIENT_FACING:
            assert cls.error in codes_of(cls.status), f"add {cls.error!r} to ERROR_CODES in {WHERE}"


def _subclasses(cls: type[errors.GatewayError]) -> list[type[errors.GatewayError]]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _subclasses(sub))]


def test_429_answers_document_retry_after_and_405_allow() -> None:
    responses = build_document()["components"]["responses"]
    assert "Retry-After" in responses["TooManyRequests"]["headers"]
    assert "Allow" in responses["MethodNotAllowed"]["headers"]
    assert "QUOTA_EXCEEDED" in codes_of(429)


async def test_the_document_is_served_without_a_key(gateway: Client) -> None:
    resp = await gateway.get(SPEC)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    assert await resp.json() == build_document()
