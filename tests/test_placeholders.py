"""Values left as the examples ship them (``replace-with-...``): an error in ``check``, refused by
``serve`` (and by a reload) with a hint, taken by ``serve --sandbox``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy import cli
from proxy.config import ConfigError
from proxy.serve import config_loader
from tests.test_cli import Recorder

PLACEHOLDERS = {
    "EXTERNAL_API_KEY_1": "real-client-key-0000001",
    "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_KEY": "replace-with-access-key-1",
    "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_SECRET": "replace-with-access-secret-1",
    "ENV_FILE": "/dev/null",
}


def test_serve_refuses_placeholders_with_the_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "run_gateway", gateway_runs := Recorder())
    assert cli.main(["serve"], environ=PLACEHOLDERS) == 1
    err = capsys.readouterr().err
    assert "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_KEY: still the example's placeholder" in err
    assert "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_SECRET: still the example's placeholder" in err
    assert "serve --sandbox" in err
    assert "replace-with-access-secret-1" not in err
    assert gateway_runs.calls == []


def test_serve_sandbox_takes_placeholders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "run_gateway", gateway_runs := Recorder())
    assert cli.main(["serve", "--sandbox"], environ=PLACEHOLDERS) == 0
    [(_settings, registry, options)] = gateway_runs.calls
    assert options["sandbox"] is True and options["demo"] is False
    assert len(registry.placeholders) == 2


def test_a_placeholder_in_the_global_fallback_is_named_there(
    capsys: pytest.CaptureFixture[str],
) -> None:
    env: dict[str, Any] = {
        "EXTERNAL_API_KEY_1": "real-client-key-0000001",
        "OPENAPI_ACCESS_KEY": "replace-with-access-key",
        "OPENAPI_ACCESS_SECRET": "real-secret",
        "ENV_FILE": "/dev/null",
    }
    assert cli.main(["check"], environ=env) == 1
    err = capsys.readouterr().err
    assert "  OPENAPI_ACCESS_KEY: still the example's placeholder" in err
    assert "OPENAPI_ACCESS_SECRET" not in err


def test_a_placeholder_client_key_in_a_tenants_file_is_named_by_its_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tenants = tmp_path / "tenants.json"
    tenants.write_text(
        '[{"alias": "a", "apiKeys": ["replace-with-a-key"], '
        '"openapi": {"accessKey": "ak", "accessSecret": "sk"}}]',
        encoding="utf-8",
    )
    assert cli.main(["check", "--env-file", "/dev/null", "--tenants", str(tenants)], {}) == 1
    assert "entry #1 (a) apiKey: still the example's placeholder" in capsys.readouterr().err


def test_a_reload_to_placeholders_is_refused() -> None:
    with pytest.raises(ConfigError, match="still the example's placeholder"):
        config_loader((PLACEHOLDERS, {}))()
