"""Schemathesis against a running gateway in front of the sandbox: no 500, answers as documented."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Coroutine, Iterator
from typing import Any, Final, TypeVar

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from proxy.app import create_app
from proxy.sandbox import create_sandbox_app
from proxy.tenants import Registry
from tests.conftest import CREDS_A, KEY_A, make_settings, make_tenant

T = TypeVar("T")
CHECKS: Final = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Examples per operation and generation mode, at most: 18 operations x (40 + 15); operations
# with few possible inputs run out sooner (about 700 requests in all, ~10 s).
EXAMPLES: Final = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 15}
START_TIMEOUT: Final = 10.0

pytestmark = pytest.mark.slow


class LiveStack:
    """The sandbox and a gateway for tenant A in front of it, served from a thread's loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live-gateway")
        self.runners: list[web.AppRunner] = []

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the server loop and wait for it (bounded)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(START_TIMEOUT)

    async def serve(self, app: web.Application) -> str:
        """Serve ``app`` on a free port of 127.0.0.1; its base URL."""
        runner = web.AppRunner(app)
        await runner.setup()
        self.runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def start(self) -> str:
        """Start both servers; the gateway's base URL."""
        upstream = await self.serve(create_sandbox_app([CREDS_A]))
        tenant = make_tenant("tenant-a", KEY_A, upstream, CREDS_A)
        return await self.serve(create_app(make_settings(), Registry([tenant])))

    async def stop(self) -> None:
        """Close both servers, then end what is left of their connections' tasks."""
        for runner in reversed(self.runners):
            await runner.cleanup()
        left = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    """A real gateway listening on 127.0.0.1 in front of a real sandbox."""
    stack = LiveStack()
    stack.thread.start()
    try:
        yield stack.run(stack.start())
    finally:
        stack.run(stack.stop())
        stack.loop.call_soon_threadsafe(stack.loop.stop)
        stack.thread.join(START_TIMEOUT)
        stack.loop.close()


@pytest.fixture(scope="module")
def api_schema(gateway_url: str) -> schemathesis.BaseSchema:
    """The document as the gateway serves it."""
    return schemathesis.openapi.from_url(f"{gateway_url}/api/openapi/spec.json")


Operation = schemathesis.APIOperation[Any, Any, Any, Any]
AnyCase = Case[Any]


def operations(schema: schemathesis.BaseSchema) -> Iterator[Operation]:
    """Every operation of the document; one the loader could not read fails the test."""
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        yield result.ok()


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda m: m.value)
def test_generated_requests_get_documented_answers_and_never_a_500(
    api_schema: schemathesis.BaseSchema, gateway_url: str, mode: GenerationMode
) -> None:
    statuses: Counter[int] = Counter()
    with requests.Session() as session:
        for operation in operations(api_schema):
            if mode is GenerationMode.NEGATIVE and not negatable(operation):
                continue
            strategy = operation.as_strategy(mode, headers={"x-api-key": KEY_A})
            run_cases(strategy, EXAMPLES[mode], session, gateway_url, statuses)
    assert sum(statuses.values()) >= len(list(operations(api_schema))) * EXAMPLES[mode] // 2
    assert statuses[200] > 0 and any(400 <= s < 500 for s in statuses), statuses


def negatable(operation: Operation) -> bool:
    """Whether the operation has anything a negative case could break (parameters, a body)."""
    definition = operation.definition.raw
    return bool(definition.get("parameters") or definition.get("requestBody"))


def run_cases(
    strategy: st.SearchStrategy[AnyCase],
    examples: int,
    session: requests.Session,
    base_url: str,
    statuses: Counter[int],
) -> None:
    """Send up to ``examples`` generated requests, each answer checked against the document."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(case=strategy)
    def check(case: AnyCase) -> None:
        response = case.call_and_validate(base_url=base_url, session=session, checks=CHECKS)
        statuses[response.status_code] += 1

    check()


def test_an_answer_the_document_does_not_allow_fails_the_run(gateway_url: str) -> None:
    doc = requests.get(f"{gateway_url}/api/openapi/spec.json", timeout=START_TIMEOUT).json()
    del doc["paths"]["/api/openapi/append-numbers"]["post"]["responses"]["200"]
    operation = schemathesis.openapi.from_dict(doc)["/api/openapi/append-numbers"]["POST"]
    strategy = operation.as_strategy(headers={"x-api-key": KEY_A})
    with requests.Session() as session, pytest.raises(FailureGroup, match="Undocumented"):
        run_cases(strategy, 100, session, gateway_url, Counter())
