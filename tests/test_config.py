"""Settings: defaults, the ``.env`` < environment < flags merge, ``NAME_FILE``, validation."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from proxy.config import ConfigError, Quotas, Secret, Settings, mask_key, parse_settings
from proxy.environment import load_settings, read_environment
from proxy.settings_table import DEFAULTS
from proxy.tenants import Credentials
from proxy.urls import mask_url, sqlite_path

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


def test_second_release_settings_have_their_defaults() -> None:
    settings = parse_settings({})
    assert settings.upstream_read_timeout == 30.0
    assert (settings.idempotency_lease, settings.idempotency_wait) == (15.0, 60.0)
    assert settings.state_url == ""
    assert settings.quota_timezone == "UTC"
    assert settings.quota_defaults == Quotas()
    assert settings.shutdown_delay == 0.0
    assert (settings.tls_cert_file, settings.tls_key_file) == (None, None)
    assert (settings.admin_host, settings.admin_port, settings.admin_token_digest) == (
        "127.0.0.1",
        None,
        None,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("UPSTREAM_READ_TIMEOUT", "0"),
        ("IDEMPOTENCY_LEASE", "0.5"),
        ("IDEMPOTENCY_WAIT", "-1"),
        ("SHUTDOWN_DELAY", "soon"),
        ("QUOTA_TIMEZONE", "Mars/Olympus_Mons"),
        ("QUOTA_NUMBERS_PER_DAY", "0"),
        ("QUOTA_NUMBERS_PER_MONTH", "1.5"),
        ("QUOTA_REQUESTS_PER_DAY", "-4"),
        ("QUOTA_REQUESTS_PER_MONTH", "lots"),
        ("STATE_URL", "postgres://db/state"),
        ("STATE_URL", "memory://elsewhere"),
        ("STATE_URL", "sqlite://state.db"),
        ("STATE_URL", "sqlite:///"),
        ("STATE_URL", "sqlite:////no/such/folder/state.db"),
        ("STATE_URL", "redis://"),
        ("STATE_URL", "redis://cache:6379/zero"),
        ("STATE_URL", "redis://cache:port/0"),
        ("STATE_URL", "unix://relative.sock"),
        ("ADMIN_HOST", "not a host"),
        ("ADMIN_TOKEN_HASH", "sha256:abc"),
    ],
)
def test_bad_second_release_value_is_one_problem_naming_it(name: str, value: str) -> None:
    [problem] = problems_of({name: value})
    assert problem.startswith(f"{name}={value}: ")
    what, _, fix = problem.partition("; ")
    assert what and fix, problem


def test_quotas_are_positive_whole_numbers_each_optional() -> None:
    settings = load_settings({"QUOTA_NUMBERS_PER_DAY": "5000", "QUOTA_REQUESTS_PER_MONTH": "9"})
    assert settings.quota_defaults == Quotas(numbers_per_day=5000, requests_per_month=9)
    assert settings.quota_defaults.items() == [("numbersPerDay", 5000), ("requestsPerMonth", 9)]


def test_tenant_quotas_fall_back_to_the_defaults_one_by_one() -> None:
    defaults = Quotas(numbers_per_day=100, requests_per_day=10)
    own = Quotas(numbers_per_day=7, numbers_per_month=70)
    assert own.over(defaults) == Quotas(7, 70, 10, None)


@pytest.mark.parametrize(
    "url",
    [
        "memory://",
        "sqlite:///state.db",
        "redis://127.0.0.1:6379/0",
        "redis://user:pw@cache:6379",
        "rediss://cache.example.com:6380/2",
        "unix:///run/redis/redis.sock?db=3",
    ],
)
def test_state_urls_of_every_backend_are_accepted(url: str) -> None:
    assert load_settings({"STATE_URL": url}).state_url == url


def test_state_url_problem_never_shows_the_password() -> None:
    [problem] = problems_of({"STATE_URL": "redis://admin:hunter2-pass@cache:6379/x"})
    assert "hunter2" not in problem
    assert problem.startswith("STATE_URL=redis://admin:***@cache:6379/x: ")


def test_sqlite_state_file_that_cannot_be_created_is_an_error(tmp_path: Path) -> None:
    not_a_folder = write(tmp_path / "plain-file", "x")
    [problem] = problems_of({"STATE_URL": f"sqlite:///{not_a_folder}/state.db"})
    assert f"cannot create a file in {not_a_folder}; " in problem


def test_absolute_sqlite_url_has_four_slashes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/state.db"  # tmp_path starts with "/": four slashes in all
    assert url.startswith("sqlite:////")
    assert sqlite_path(url) == tmp_path / "state.db"
    assert sqlite_path("sqlite:///relative/state.db") == Path("relative/state.db")


def test_admin_port_out_of_range_is_refused() -> None:
    [problem] = problems_of({"ADMIN_PORT": "70000", "ADMIN_TOKEN": "t" * 32})
    assert problem.startswith("ADMIN_PORT=70000: out of range; ")


def test_admin_port_without_a_token_is_refused_with_the_keygen_hint() -> None:
    [problem] = problems_of({"ADMIN_PORT": "9001"})
    assert problem.startswith("ADMIN_PORT=9001: ")
    assert "ADMIN_TOKEN" in problem and "keygen" in problem


def test_short_admin_token_is_refused_without_showing_it() -> None:
    [problem] = problems_of({"ADMIN_PORT": "9001", "ADMIN_TOKEN": "too-short-token"})
    assert problem.startswith("ADMIN_TOKEN=<hidden>: ")
    assert "too-short-token" not in problem


def test_admin_token_is_kept_only_as_its_digest(tmp_path: Path) -> None:
    token = "t" * 40
    token_file = write(tmp_path / "token", token + "\n")
    settings = load_settings({"ADMIN_PORT": "9001", "ADMIN_TOKEN_FILE": token_file})
    assert settings.admin_token_digest == hashlib.sha256(token.encode()).digest()
    assert token not in repr(settings)
    hashed = "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    by_hash = load_settings({"ADMIN_PORT": "0", "ADMIN_TOKEN_HASH": hashed})
    assert by_hash.admin_token_digest == settings.admin_token_digest


def test_admin_token_and_its_hash_together_are_an_error() -> None:
    token = "t" * 40
    hashed = "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    [problem] = problems_of({"ADMIN_TOKEN": token, "ADMIN_TOKEN_HASH": hashed})
    assert problem.startswith("ADMIN_TOKEN_HASH=")
    assert token not in problem


def test_tls_needs_both_files_and_readable_ones(tmp_path: Path) -> None:
    cert = write(tmp_path / "cert.pem", "-----BEGIN CERTIFICATE-----\n")
    [problem] = problems_of({"TLS_CERT_FILE": cert})
    assert problem.startswith(f"TLS_CERT_FILE={cert}: TLS_KEY_FILE is not set; ")
    missing = str(tmp_path / "absent.pem")
    [problem] = problems_of({"TLS_CERT_FILE": cert, "TLS_KEY_FILE": missing})
    assert problem.startswith(f"TLS_KEY_FILE={missing}: cannot read the file; ")
    both = load_settings({"TLS_CERT_FILE": cert, "TLS_KEY_FILE": cert})
    assert both.tls_cert_file == Path(cert)


def test_memory_state_with_several_workers_is_refused() -> None:
    [problem] = problems_of({"STATE_URL": "memory://", "WORKERS": "2"})
    assert problem.startswith("STATE_URL=memory://: memory:// is one process's state; ")


def test_a_password_in_the_state_url_query_is_masked_too() -> None:
    masked = mask_url("redis://cache:6379/0?password=s3cret-pass&db=1")
    assert "s3cret" not in masked and "password=***" in masked and "db=1" in masked
    assert "p#ss" not in mask_url("rediss://u:p#ss@cache:6380/0")
