"""Demo mode through the CLI entry point, driven by the README's own curl commands."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest

from tests.processes import gateway_process

README: Final = (Path(__file__).resolve().parent.parent / "README.md").read_text("utf-8")
DEMO_KEYS: Final = ("ecommerce-platform-key-abc123", "finance-platform-key-xyz789")


def readme_curls() -> list[list[str]]:
    """Every ``curl`` command of the README's indented code blocks that calls the demo gateway,
    as argv lists (the Administration section's have their own test)."""
    commands, current = [], ""
    for line in README.splitlines():
        text = line[4:] if line.startswith("    ") else ""
        if not current and not text.startswith("curl "):
            continue
        current += text + "\n"
        if current.rstrip().endswith("\\"):
            continue
        try:
            argv = shlex.split(current.replace("\\\n", " "), comments=True)
        except ValueError:  # a quoted body still open: it goes on on the next line
            continue
        current = ""
        if any(arg.startswith("http://localhost:8001/") for arg in argv):
            commands.append(argv)
    return commands


def parse_curl(argv: list[str], port: int) -> dict[str, Any]:
    """Method, URL, headers and body of a curl command, pointed at ``port``."""
    request: dict[str, Any] = {"method": "GET", "headers": {}, "data": None}
    args = iter(argv[1:])
    for arg in args:
        if arg == "-X":
            request["method"] = next(args)
        elif arg == "-H":
            name, _, value = next(args).partition(":")
            request["headers"][name.strip()] = value.strip()
        elif arg == "-d":
            request["data"] = next(args).encode()
            if request["method"] == "GET":
                request["method"] = "POST"
        elif arg.startswith("http"):
            request["url"] = re.sub(r"localhost:8001", f"127.0.0.1:{port}", arg)
    return request


def test_the_readme_shows_the_walk_through_commands() -> None:
    urls = " ".join(" ".join(c) for c in readme_curls())
    for path in (
        "/api/openapi/status",
        "/api/openapi/keys",
        "/openapi/aiagent/task/list",
        "/api/openapi/append-numbers",
        "/openapi/aiagent/call/list",
    ):
        assert path in urls


@pytest.mark.slow
async def test_demo_mode_serves_every_readme_curl_command_as_printed(tmp_path: Path) -> None:
    async with gateway_process(tmp_path, None, "--demo") as gateway:
        assert "DEMO MODE" in gateway.stderr()
        for key in DEMO_KEYS:
            assert key in gateway.stderr()
        answers = []
        async with aiohttp.ClientSession() as session:
            for argv in readme_curls():
                request = parse_curl(argv, gateway.port)
                async with session.request(
                    request["method"],
                    request["url"],
                    headers=request["headers"],
                    data=request["data"],
                ) as response:
                    answers.append((request["url"], response.status, await response.json()))
    by_path = {
        url.split(str(gateway.port))[1]: (status, body)
        for url, status, body in answers
        if status == 200
    }
    assert by_path["/api/openapi/status"][1]["data"]["apiKeyAlias"] == "电商平台A"
    assert by_path["/api/openapi/keys"][1]["data"]["totalKeys"] == 2
    assert by_path["/openapi/aiagent/task/list"][1]["code"] == 0
    appended = by_path["/api/openapi/append-numbers"][1]
    assert appended["message"] == "Successfully processed 2 numbers. Success: 2, Failed: 0"
    listed = by_path["/openapi/aiagent/call/list"][1]["data"]["list"]
    assert {r["phoneNumber"] for r in listed} == {"13800138001", "13800138002"}
    wrong = [a for a in answers if a[1] == 403]
    assert len(wrong) == 1 and wrong[0][2]["apiKey"] == "not-a-re***"
    logged = gateway.stdout()
    assert "ecommerce-platform-key-abc123" not in logged
    assert "demo-ecommerce-ak-secret" not in logged
    for line in logged.splitlines():
        json.loads(line)


async def test_serve_without_tenants_and_without_demo_stops_with_a_hint(tmp_path: Path) -> None:
    from proxy.cli import main

    assert main(["serve", "--env-file", "/dev/null"], environ={}) == 1
