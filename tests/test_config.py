"""Settings: defaults, the ``.env`` < environment < flags merge, ``NAME_FILE``, validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.config import (
    DEFAULTS,
    ConfigError,
    Secret,
    Settings,
    load_settings,
    mask_key,
    parse_settings,
    read_environment,
)
from proxy.tenants import Credentials

MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def _no_stray_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in an empty directory so a developer's own ``.env`` never leaks into a test."""
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def problems_of(env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    return caught.value.problems


def test_defaults_match_the_documented_table() -> None:
    settings = parse_settings({})
    assert (settings.host, settings.port) == ("0.0.0.0", 8001)
    assert settings.tenants_file is None
    assert settings.max_body_bytes == 10 * MIB
    assert settings.max_upload_bytes == 100 * MIB
    assert settings.upstream_connect_timeout == 5.0
    assert settings.upstream_timeout == 60.0
    assert (settings.rate_limit_rps, settings.rate_limit_burst) == (None, None)
    assert settings.append_batch_size == 100
    assert settings.append_concurrency == 4
    assert settings.append_max_numbers == 10000
    assert settings.public_key_directory is True
    assert settings.cors_allow_origins == ()
    assert settings.log_level == "info"
    assert settings.shutdown_grace == 30.0


def test_settings_table_defaults_parse_to_the_dataclass_defaults() -> None:
    assert parse_settings(DEFAULTS) == Settings()


def test_empty_environment_without_dotenv_gives_defaults() -> None:
    assert load_settings({}) == Settings()


def test_environment_beats_dotenv_and_flags_beat_environment(tmp_path: Path) -> None:
    env_file = write(tmp_path / "custom.env", "PORT=1111\nHOST=127.0.0.1\nLOG_LEVEL=debug\n")
    environ = {"ENV_FILE": env_file, "PORT": "2222", "APPEND_BATCH_SIZE": "7"}
    merged = load_settings(environ)
    assert (merged.port, merged.host, merged.log_level) == (2222, "127.0.0.1", "debug")
    assert merged.append_batch_size == 7
    flagged = load_settings(environ, {"PORT": "3333", "HOST": "::1"})
    assert (flagged.port, flagged.host, flagged.log_level) == (3333, "::1", "debug")


def test_env_file_given_as_a_flag_beats_the_environment_one(tmp_path: Path) -> None:
    first = write(tmp_path / "first.env", "PORT=1111\n")
    second = write(tmp_path / "second.env", "PORT=2222\n")
    settings = load_settings({"ENV_FILE": first}, {"ENV_FILE": second})
    assert settings.port == 2222
    assert settings.env_file == second


def test_dotenv_in_the_working_directory_is_read_by_default(tmp_path: Path) -> None:
    write(tmp_path / ".env", "PORT=4444\n")
    assert load_settings({}).port == 4444


def test_missing_explicit_env_file_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.env")
    problems = problems_of({"ENV_FILE": missing})
    assert len(problems) == 1
    assert problems[0].startswith(f"ENV_FILE={missing}: ")


def test_read_environment_leaves_the_callers_mapping_alone(tmp_path: Path) -> None:
    secret = write(tmp_path / "secret", "s3cret\n")
    environ = {"OPENAPI_ACCESS_SECRET_FILE": secret}
    read_environment(environ)
    assert environ == {"OPENAPI_ACCESS_SECRET_FILE": secret}


def test_name_file_gives_the_value_with_one_trailing_newline_dropped(tmp_path: Path) -> None:
    secret = write(tmp_path / "secret", "s3cret  value\n\n")
    env = read_environment({"OPENAPI_ACCESS_SECRET_FILE": secret})
    assert env["OPENAPI_ACCESS_SECRET"] == "s3cret  value\n"
    assert "OPENAPI_ACCESS_SECRET_FILE" not in env


def test_name_file_without_trailing_newline_is_taken_whole(tmp_path: Path) -> None:
    key = write(tmp_path / "key", "tenant-key-123")
    assert read_environment({"EXTERNAL_API_KEY_4_FILE": key})["EXTERNAL_API_KEY_4"] == (
        "tenant-key-123"
    )


def test_name_file_with_a_windows_line_ending_drops_it(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"s3cret\r\n")
    assert read_environment({"OPENAPI_ACCESS_SECRET_FILE": str(secret)})[
        "OPENAPI_ACCESS_SECRET"
    ] == ("s3cret")


def test_setting_given_as_name_file_is_cast_like_the_plain_one(tmp_path: Path) -> None:
    port = write(tmp_path / "port", "9090\n")
    assert load_settings({"PORT_FILE": port}).port == 9090


def test_name_file_in_dotenv_is_resolved(tmp_path: Path) -> None:
    secret = write(tmp_path / "secret", "from-file\n")
    env_file = write(tmp_path / "x.env", f"OPENAPI_ACCESS_SECRET_FILE={secret}\n")
    assert read_environment({"ENV_FILE": env_file})["OPENAPI_ACCESS_SECRET"] == "from-file"


def test_unreadable_name_file_names_the_variable(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent")
    with pytest.raises(ConfigError) as caught:
        read_environment({"OPENAPI_ACCESS_SECRET_FILE": missing})
    [problem] = caught.value.problems
    assert problem.startswith(f"OPENAPI_ACCESS_SECRET_FILE={missing}: ")
    assert "; " in problem


def test_name_file_that_is_a_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        read_environment({"EXTERNAL_API_KEY_1_FILE": str(tmp_path)})
    assert caught.value.problems[0].startswith("EXTERNAL_API_KEY_1_FILE=")


def test_name_and_name_file_both_set_is_an_error(tmp_path: Path) -> None:
    secret = write(tmp_path / "secret", "a\n")
    with pytest.raises(ConfigError) as caught:
        read_environment(
            {"OPENAPI_ACCESS_SECRET": "plain-secret-value", "OPENAPI_ACCESS_SECRET_FILE": secret}
        )
    [problem] = caught.value.problems
    assert problem.startswith(f"OPENAPI_ACCESS_SECRET_FILE={secret}: ")
    assert "OPENAPI_ACCESS_SECRET is also set" in problem
    assert "plain-secret-value" not in problem


def test_environment_name_file_beats_the_dotenv_value(tmp_path: Path) -> None:
    secret = write(tmp_path / "secret", "from-container-secret\n")
    env_file = write(tmp_path / "dev.env", "OPENAPI_ACCESS_SECRET=from-dotenv\n")
    env = read_environment({"ENV_FILE": env_file, "OPENAPI_ACCESS_SECRET_FILE": secret})
    assert env["OPENAPI_ACCESS_SECRET"] == "from-container-secret"


def test_environment_value_beats_a_dotenv_name_file(tmp_path: Path) -> None:
    env_file = write(tmp_path / "dev.env", f"OPENAPI_ACCESS_KEY_FILE={tmp_path / 'absent'}\n")
    env = read_environment({"ENV_FILE": env_file, "OPENAPI_ACCESS_KEY": "from-env"})
    assert env["OPENAPI_ACCESS_KEY"] == "from-env"


@pytest.mark.parametrize(
    "name", ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE_FILE", "KUBECONFIG_FILE", "HOME_FILE"]
)
def test_foreign_file_variables_are_left_alone(name: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "not-there.pem")
    env = read_environment({name: missing})
    assert env[name] == missing
    assert name.removesuffix("_FILE") not in env


def test_tenants_file_and_env_file_are_settings_not_name_file_pairs(tmp_path: Path) -> None:
    tenants = write(tmp_path / "tenants.json", "[]")
    env = read_environment({"TENANTS_FILE": tenants})
    assert env["TENANTS_FILE"] == tenants
    assert "TENANTS" not in env
    assert load_settings({"TENANTS_FILE": tenants}).tenants_file == Path(tenants)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "http"),
        ("PORT", "80.5"),
        ("PORT", "70000"),
        ("PORT", "-1"),
        ("HOST", "not a host"),
        ("MAX_BODY_BYTES", "0"),
        ("MAX_UPLOAD_BYTES", "lots"),
        ("UPSTREAM_CONNECT_TIMEOUT", "0"),
        ("UPSTREAM_TIMEOUT", "-5"),
        ("UPSTREAM_TIMEOUT", "nan"),
        ("SHUTDOWN_GRACE", "inf"),
        ("RATE_LIMIT_RPS", "-1"),
        ("RATE_LIMIT_RPS", "0"),
        ("RATE_LIMIT_BURST", "0"),
        ("APPEND_BATCH_SIZE", "0"),
        ("APPEND_CONCURRENCY", "1000"),
        ("APPEND_MAX_NUMBERS", "many"),
        ("PUBLIC_KEY_DIRECTORY", "maybe"),
        ("LOG_LEVEL", "verbose"),
        ("CORS_ALLOW_ORIGINS", "app.example.com"),
        ("CORS_ALLOW_ORIGINS", "ftp://files.example.com"),
        ("CORS_ALLOW_ORIGINS", "https://app.example.com/admin"),
        ("OPENAPI_ACTIONS", "/elsewhere/x=doIt"),
        ("WORKERS", "0"),
    ],
)
def test_bad_value_is_one_problem_naming_variable_and_value(name: str, value: str) -> None:
    [problem] = problems_of({name: value})
    assert problem.startswith(f"{name}={value}: ")
    what, _, fix = problem.partition("; ")
    assert what and fix, problem


def test_every_problem_is_listed_in_one_error() -> None:
    env = {
        "PORT": "eighty",
        "PUBLIC_KEY_DIRECTORY": "perhaps",
        "LOG_LEVEL": "loud",
        "CORS_ALLOW_ORIGINS": "https://ok.example.com,not-an-origin",
        "APPEND_BATCH_SIZE": "-3",
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    problems = caught.value.problems
    assert [p.split("=", 1)[0] for p in problems] == [
        "PORT",
        "APPEND_BATCH_SIZE",
        "PUBLIC_KEY_DIRECTORY",
        "CORS_ALLOW_ORIGINS",
        "LOG_LEVEL",
    ]
    assert str(caught.value) == "\n".join(problems)
    assert all(": " in p and "; " in p for p in problems)


def test_port_error_says_how_to_fix_it() -> None:
    [problem] = problems_of({"PORT": "abc"})
    assert problem == "PORT=abc: not a whole number; set it to a whole number such as 8001"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("TRUE", True), ("yes", True), ("1", True), ("on", True)]
    + [("false", False), ("False", False), ("no", False), ("0", False), ("off", False)],
)
def test_boolean_words_are_understood(value: str, expected: bool) -> None:
    assert load_settings({"PUBLIC_KEY_DIRECTORY": value}).public_key_directory is expected


def test_good_values_are_cast_and_normalised() -> None:
    settings = load_settings(
        {
            "PORT": " 9000 ",
            "HOST": "127.0.0.1",
            "TENANTS_FILE": "/etc/nxlink/tenants.json",
            "RATE_LIMIT_RPS": "2.5",
            "RATE_LIMIT_BURST": "5",
            "UPSTREAM_TIMEOUT": "0.5",
            "LOG_LEVEL": "WARNING",
            "CORS_ALLOW_ORIGINS": "https://app.example.com/, http://localhost:3000",
            "OPENAPI_ACTIONS": "/openapi/aiagent/extra/run/=runExtra, /openapi/x/y=doY",
        }
    )
    assert settings.port == 9000
    assert settings.tenants_file == Path("/etc/nxlink/tenants.json")
    assert (settings.rate_limit_rps, settings.rate_limit_burst) == (2.5, 5)
    assert settings.upstream_timeout == 0.5
    assert settings.log_level == "warning"
    assert settings.cors_allow_origins == ("https://app.example.com", "http://localhost:3000")
    assert settings.extra_actions == (
        ("/openapi/aiagent/extra/run", "runExtra"),
        ("/openapi/x/y", "doY"),
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::1]", "localhost", "gateway.internal"])
def test_host_accepts_addresses_and_names(host: str) -> None:
    assert load_settings({"HOST": host}).host == host


def test_cors_wildcard_is_accepted() -> None:
    assert load_settings({"CORS_ALLOW_ORIGINS": "*"}).cors_allow_origins == ("*",)


def test_secret_repr_and_str_never_show_the_value() -> None:
    secret = Secret("hunter2-very-secret")
    shown = [repr(secret), str(secret), f"{secret}", f"{secret!r}", format(secret)]
    assert all("hunter2" not in text for text in shown)
    assert secret.reveal() == "hunter2-very-secret"


def test_secret_inside_a_record_stays_masked() -> None:
    creds = Credentials("ak-visible", Secret("hunter2-very-secret"), "8", "md5")
    assert "hunter2" not in repr(creds)
    assert "hunter2" not in str([creds])


def test_secret_compares_by_value_and_is_false_when_empty() -> None:
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert Secret("a") != "a"
    assert not Secret("")
    assert Secret("x")


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        ("ecommerce-platform-key-abc123", "ecommerc***"),
        ("123456789", "12345678***"),
        ("12345678", "12345678"),
        ("short", "short"),
        ("", ""),
        ("中文密钥一二三四五", "中文密钥一二三四***"),
    ],
)
def test_mask_key_shows_eight_characters_then_stars(key: str, shown: str) -> None:
    assert mask_key(key) == shown


def test_dotenv_never_leaks_into_the_process_environment(tmp_path: Path) -> None:
    write(tmp_path / ".env", "NXLINK_TEST_ONLY_VARIABLE=1\nPORT=4321\n")
    assert load_settings({}).port == 4321
    assert "NXLINK_TEST_ONLY_VARIABLE" not in os.environ


def test_dotenv_values_are_taken_literally_not_expanded_from_the_process(tmp_path: Path) -> None:
    env_file = write(tmp_path / ".env", "OPENAPI_ACCESS_SECRET=ab${HOME}cd$x\n")
    env = read_environment({"ENV_FILE": env_file, "HOME": "/somewhere"})
    assert env["OPENAPI_ACCESS_SECRET"] == "ab${HOME}cd$x"
