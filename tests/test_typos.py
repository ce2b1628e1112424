"""Near-misses of our variable names: named with the closest one, a warning at start, an error
in ``check``."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.cli import main
from proxy.settings_table import DEFAULTS
from proxy.typos import known_names, unknown_variables
from tests.processes import gateway_process

TENANT = {
    "EXTERNAL_API_KEY_1": "typo-test-client-key-0001",
    "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_KEY": "ak-typo-test",
    "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_SECRET": "sk-typo-test",
}
# What a container, a CI runner or a shell puts in the environment: none of it is ours.
ORDINARY = (
    "PATH HOME HOSTNAME LANG LC_ALL TERM SHLVL PWD OLDPWD USER LOGNAME TZ PYTHONPATH "
    "PYTHONUNBUFFERED PYTHONDONTWRITEBYTECODE PYTHON_VERSION GPG_KEY VIRTUAL_ENV "
    "PIP_NO_CACHE_DIR HTTP_PROXY HTTPS_PROXY NO_PROXY SSL_CERT_FILE REQUESTS_CA_BUNDLE "
    "KUBERNETES_SERVICE_HOST KUBERNETES_SERVICE_PORT KUBERNETES_PORT KUBERNETES_PORT_443_TCP_PORT "
    "NXLINK_GATEWAY_PORT NXLINK_BASE_URL NXLINK_API_KEY REDIS_URL DATABASE_URL DEBUG POD_IP"
).split()


@pytest.mark.parametrize(
    ("name", "closest"),
    [
        ("RATE_LIMIT_RSP", "RATE_LIMIT_RPS"),
        ("OPENAPI_ACESS_KEY", "OPENAPI_ACCESS_KEY"),
        ("EXTERNAL_APIKEY_2", "EXTERNAL_API_KEY_2"),
        ("EXTERNAL_API_KEY7", "EXTERNAL_API_KEY_7"),
        ("TENANT_FILE", "TENANTS_FILE"),
        ("LOGLEVEL", "LOG_LEVEL"),
        ("UPSTREAM_TIMEOUTS", "UPSTREAM_TIMEOUT"),
        ("QUOTA_NUMBER_PER_DAY", "QUOTA_NUMBERS_PER_DAY"),
        ("IDEMPOTENCY_TTL_SECONDS", "IDEMPOTENCY_TTL"),
        ("OPENAPI_BASEURL_FILE", "OPENAPI_BASE_URL_FILE"),
    ],
)
def test_a_near_miss_is_named_with_the_closest_known_variable(name: str, closest: str) -> None:
    [line] = unknown_variables({name: "1"})
    assert line.startswith(f"{name}: ") and line.endswith(f"did you mean {closest}?")


def test_a_variable_with_our_prefix_and_no_close_name_is_still_reported() -> None:
    [line] = unknown_variables({"UPSTREAM_PROXY_FOR_EVERYTHING": "x"})
    assert line.startswith("UPSTREAM_PROXY_FOR_EVERYTHING: not a variable the gateway reads")


def test_every_known_variable_and_an_ordinary_environment_pass() -> None:
    ours = set(DEFAULTS) | {"OPENAPI_ACCESS_SECRET_FILE", "EXTERNAL_API_KEY_12_PREVIOUS_NOT_AFTER"}
    assert {"EXTERNAL_API_KEY_N_RATE_LIMIT_RPS", "OPENAPI_ALGORITHM"} <= known_names()
    assert unknown_variables(dict.fromkeys([*ours, *ORDINARY], "x")) == []


def test_tenant_variables_with_an_unknown_suffix_are_left_to_the_tenant_loader() -> None:
    assert unknown_variables({"EXTERNAL_API_KEY_1_OPENAPI_ACESS_KEY": "x"}) == []


def test_check_fails_on_a_typo_in_the_dotenv_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("RATE_LIMIT_RSP=5\n", encoding="utf-8")
    assert main(["check", "--env-file", str(dotenv)], environ=TENANT) == 1
    err = capsys.readouterr().err
    assert "RATE_LIMIT_RSP: not a variable the gateway reads; did you mean RATE_LIMIT_RPS?" in err


def test_check_fails_on_a_typo_in_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = TENANT | {"OPENAPI_ACESS_KEY": "ak"}
    assert main(["check", "--env-file", "/dev/null"], environ=env) == 1
    assert "did you mean OPENAPI_ACCESS_KEY?" in capsys.readouterr().err


async def test_serve_logs_a_warning_for_each_typo_and_serves(tmp_path: Path) -> None:
    async with gateway_process(tmp_path, None, "--demo", RATE_LIMIT_RSP="5") as gateway:
        warnings = [line for line in gateway.log_lines() if line.get("level") == "warning"]
    assert any("did you mean RATE_LIMIT_RPS?" in line["message"] for line in warnings), warnings


def test_check_lists_typos_and_placeholders_in_one_run(capsys: pytest.CaptureFixture[str]) -> None:
    env = TENANT | {"RATE_LIMIT_RSP": "5"}
    env["EXTERNAL_API_KEY_1_OPENAPI_ACCESS_KEY"] = "replace-with-access-key-1"
    assert main(["check", "--env-file", "/dev/null"], environ=env) == 1
    err = capsys.readouterr().err
    assert "did you mean RATE_LIMIT_RPS?" in err
    assert "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_KEY: still the example's placeholder" in err
