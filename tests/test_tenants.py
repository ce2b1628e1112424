"""Tenants from ``EXTERNAL_API_KEY_N_*`` and the tenants file, and the key registry."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from proxy.config import ConfigError, Quotas, Secret, parse_settings
from proxy.environment import read_environment
from proxy.tenants import (
    Credentials,
    Limits,
    Registry,
    Tenant,
    demo_registry,
    hash_key,
    load_registry,
)

# printf '%s' 'nxk_known-key' | sha256sum
KNOWN_KEY = "nxk_known-key"
KNOWN_HASH = "sha256:ee13489ad5a280c229842a111ce9023784089035e6dea0a35a5a5c4392242105"


def registry_of(env: dict[str, str], tenants: Any = None, tmp_path: Path | None = None) -> Registry:
    """The registry for these variables and, if given, this tenants-file content."""
    env = dict(env)
    if tenants is not None:
        assert tmp_path is not None
        path = tmp_path / "tenants.json"
        path.write_text(tenants if isinstance(tenants, str) else json.dumps(tenants), "utf-8")
        env["TENANTS_FILE"] = str(path)
    return load_registry(env, parse_settings(env))


def problems_of(
    env: dict[str, str], tenants: Any = None, tmp_path: Path | None = None
) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        registry_of(env, tenants, tmp_path)
    return caught.value.problems


def tenant_for(registry: Registry, key: str) -> Tenant:
    match = registry.lookup(key)
    assert match is not None, f"{key} does not authenticate"
    return match.tenant


def test_env_tenants_with_gaps_are_all_loaded_in_numeric_order() -> None:
    registry = registry_of(
        {
            "EXTERNAL_API_KEY_12": "key-twelve-000000",
            "EXTERNAL_API_KEY_12_ALIAS": "twelve",
            "EXTERNAL_API_KEY_1": "key-one-000000000",
            "EXTERNAL_API_KEY_1_ALIAS": "one",
            "EXTERNAL_API_KEY_1_DESC": "the first tenant",
            "EXTERNAL_API_KEY_5": "key-five-00000000",
            "EXTERNAL_API_KEY_5_ALIAS": "five",
        }
    )
    assert [t.alias for t in registry.tenants] == ["one", "five", "twelve"]
    assert [t.source for t in registry.tenants] == [
        "EXTERNAL_API_KEY_1",
        "EXTERNAL_API_KEY_5",
        "EXTERNAL_API_KEY_12",
    ]
    assert tenant_for(registry, "key-five-00000000").alias == "five"
    assert tenant_for(registry, "key-one-000000000").description == "the first tenant"
    assert len(registry) == 3


def test_per_tenant_openapi_variables_are_read() -> None:
    registry = registry_of(
        {
            "EXTERNAL_API_KEY_2": "key-two",
            "EXTERNAL_API_KEY_2_OPENAPI_ACCESS_KEY": "ak-two",
            "EXTERNAL_API_KEY_2_OPENAPI_ACCESS_SECRET": "sk-two",
            "EXTERNAL_API_KEY_2_OPENAPI_BIZ_TYPE": "9",
            "EXTERNAL_API_KEY_2_OPENAPI_BASE_URL": "https://nx.example.com",
            "EXTERNAL_API_KEY_2_OPENAPI_ALGORITHM": "sha256",
        }
    )
    tenant = tenant_for(registry, "key-two")
    assert tenant.credentials == Credentials("ak-two", Secret("sk-two"), "9", "sha256")
    assert (tenant.base_url, tenant.biz_type) == ("https://nx.example.com", "9")


def test_global_openapi_variables_fill_missing_tenant_fields() -> None:
    registry = registry_of(
        {
            "OPENAPI_ACCESS_KEY": "ak-global",
            "OPENAPI_ACCESS_SECRET": "sk-global",
            "OPENAPI_BIZ_TYPE": "7",
            "OPENAPI_BASE_URL": "https://global.example.com",
            "OPENAPI_ALGORITHM": "sha256",
            "EXTERNAL_API_KEY_1": "key-own",
            "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_KEY": "ak-own",
            "EXTERNAL_API_KEY_1_OPENAPI_ALGORITHM": "md5",
            "EXTERNAL_API_KEY_2": "key-global",
        }
    )
    own = tenant_for(registry, "key-own")
    assert own.credentials == Credentials("ak-own", Secret("sk-global"), "7", "md5")
    assert own.base_url == "https://global.example.com"
    shared = tenant_for(registry, "key-global")
    assert shared.credentials == Credentials("ak-global", Secret("sk-global"), "7", "sha256")


def test_defaults_are_biz_type_8_md5_and_the_westus_base_url() -> None:
    registry = registry_of(
        {
            "EXTERNAL_API_KEY_1": "key-one",
            "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_KEY": "ak",
            "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_SECRET": "sk",
        }
    )
    tenant = tenant_for(registry, "key-one")
    assert tenant.base_url == "https://api-westus.nxlink.ai"
    assert tenant.biz_type == "8"
    assert tenant.credentials == Credentials("ak", Secret("sk"), "8", "md5")
    assert tenant.alias == "EXTERNAL_API_KEY_1"
    assert registry.warnings == ()


def test_base_url_path_prefix_is_kept_without_trailing_slash() -> None:
    registry = registry_of(
        {
            "EXTERNAL_API_KEY_1": "key-one",
            "EXTERNAL_API_KEY_1_OPENAPI_BASE_URL": "https://gw.example.com:8443/nx/prefix/",
        }
    )
    assert tenant_for(registry, "key-one").base_url == "https://gw.example.com:8443/nx/prefix"


def test_algorithm_name_is_case_insensitive() -> None:
    registry = registry_of(
        {
            "EXTERNAL_API_KEY_1": "key-one",
            "OPENAPI_ACCESS_KEY": "ak",
            "OPENAPI_ACCESS_SECRET": "sk",
            "OPENAPI_ALGORITHM": "SHA256",
        }
    )
    creds = tenant_for(registry, "key-one").credentials
    assert creds is not None and creds.algorithm == "sha256"


def test_surrounding_whitespace_of_an_env_key_is_ignored() -> None:
    registry = registry_of({"EXTERNAL_API_KEY_1": "  key-one\n"})
    assert registry.lookup("key-one") is not None


def test_env_tenant_secrets_may_come_from_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "key").write_text("key-from-file\n", "utf-8")
    (tmp_path / "secret").write_text("sk-from-file\n", "utf-8")
    env = read_environment(
        {
            "EXTERNAL_API_KEY_1_FILE": str(tmp_path / "key"),
            "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_KEY": "ak",
            "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_SECRET_FILE": str(tmp_path / "secret"),
        }
    )
    registry = load_registry(env, parse_settings(env))
    creds = tenant_for(registry, "key-from-file").credentials
    assert creds == Credentials("ak", Secret("sk-from-file"), "8", "md5")


FILE_TENANT = {
    "apiKey": "file-key-0000001",
    "alias": "文件租户",
    "description": "from the tenants file",
    "openapi": {
        "accessKey": "ak-file",
        "accessSecret": "sk-file",
        "bizType": 9,
        "baseUrl": "http://127.0.0.1:9000/prefix",
        "algorithm": "sha256",
    },
}


@pytest.mark.parametrize("shape", ["list", "keys-object"])
def test_tenants_file_may_be_a_list_or_a_keys_object(shape: str, tmp_path: Path) -> None:
    content: Any = [FILE_TENANT] if shape == "list" else {"keys": [FILE_TENANT]}
    registry = registry_of({}, content, tmp_path)
    tenant = tenant_for(registry, "file-key-0000001")
    assert tenant.alias == "文件租户"
    assert tenant.description == "from the tenants file"
    assert tenant.base_url == "http://127.0.0.1:9000/prefix"
    assert tenant.biz_type == "9"
    assert tenant.credentials == Credentials("ak-file", Secret("sk-file"), "9", "sha256")
    assert tenant.source == f"{tmp_path / 'tenants.json'} entry #1"  # the alias is shown apart


def test_env_and_file_tenants_are_merged(tmp_path: Path) -> None:
    registry = registry_of({"EXTERNAL_API_KEY_1": "env-key-0000001"}, [FILE_TENANT], tmp_path)
    assert tenant_for(registry, "env-key-0000001").source == "EXTERNAL_API_KEY_1"
    assert tenant_for(registry, "file-key-0000001").alias == "文件租户"


@pytest.mark.parametrize("stored", [KNOWN_HASH, KNOWN_HASH.upper().replace("SHA256:", "sha256:")])
def test_api_key_hash_authenticates_the_plain_key(stored: str, tmp_path: Path) -> None:
    registry = registry_of({}, [{"apiKeyHash": stored, "alias": "hashed"}], tmp_path)
    assert tenant_for(registry, KNOWN_KEY).alias == "hashed"
    assert registry.lookup(KNOWN_HASH) is None
    assert registry.lookup("nxk_known-kez") is None


def test_api_keys_list_accepts_plain_hashed_and_expiring_keys(tmp_path: Path) -> None:
    entry = {
        "alias": "rotating",
        "apiKeys": [
            "plain-key-000001",
            KNOWN_HASH,
            {"apiKey": "old-key-0000001", "notAfter": "2030-01-01T00:00:00Z"},
            {"apiKeyHash": KNOWN_HASH.replace("ee13", "ff13"), "notAfter": "2031-06-30"},
        ],
    }
    registry = registry_of({}, [entry], tmp_path)
    assert tenant_for(registry, "plain-key-000001").alias == "rotating"
    assert tenant_for(registry, KNOWN_KEY).alias == "rotating"
    match = registry.lookup("old-key-0000001")
    assert match is not None
    assert match.key.not_after == datetime(2030, 1, 1, tzinfo=UTC)
    assert not match.key.expired(datetime(2029, 12, 31, 23, 59, tzinfo=UTC))
    assert match.key.expired(datetime(2030, 1, 1, 0, 0, 1, tzinfo=UTC))
    assert [k.not_after for k in registry.tenants[0].keys][-1] == datetime(2031, 6, 30, tzinfo=UTC)


def test_expired_key_is_loaded_with_a_warning(tmp_path: Path) -> None:
    entry = {
        "apiKeys": [{"apiKey": "gone-key-0000001", "notAfter": "2001-01-01T00:00:00Z"}],
        "openapi": {"accessKey": "ak", "accessSecret": "sk"},
    }
    registry = registry_of({}, [entry], tmp_path)
    [warning] = registry.warnings
    assert "gone-key***" in warning and "expired" in warning
    assert "gone-key-0000001" not in warning


def test_per_tenant_limits_are_read(tmp_path: Path) -> None:
    entry = {"apiKey": "k-limits", "rateLimitRps": 2.5, "rateLimitBurst": 5, "maxInflight": 3}
    registry = registry_of({}, [entry | {"appendBatchSize": 50}], tmp_path)
    assert tenant_for(registry, "k-limits").limits == Limits(2.5, 5, 3, 50)


def test_duplicate_key_names_both_places(tmp_path: Path) -> None:
    problems = problems_of(
        {"EXTERNAL_API_KEY_2": "file-key-0000001"}, {"keys": [FILE_TENANT]}, tmp_path
    )
    [problem] = problems
    assert "EXTERNAL_API_KEY_2" in problem
    assert f"{tmp_path / 'tenants.json'} entry #1" in problem
    assert "file-key***" in problem
    assert "file-key-0000001" not in problem


def test_duplicate_key_given_once_plain_and_once_hashed_is_caught(tmp_path: Path) -> None:
    problems = problems_of(
        {"EXTERNAL_API_KEY_1": KNOWN_KEY}, [{"apiKeyHash": KNOWN_HASH}], tmp_path
    )
    assert len(problems) == 1
    assert "EXTERNAL_API_KEY_1" in problems[0] and "entry #1" in problems[0]


def test_duplicate_key_between_two_env_tenants_names_both_variables() -> None:
    [problem] = problems_of({"EXTERNAL_API_KEY_1": "same-key", "EXTERNAL_API_KEY_7": "same-key"})
    assert "EXTERNAL_API_KEY_1" in problem and "EXTERNAL_API_KEY_7" in problem


@pytest.mark.parametrize(
    ("env", "start"),
    [
        (
            {"EXTERNAL_API_KEY_1_OPENAPI_BASE_URL": "ftp://nx.example.com"},
            "EXTERNAL_API_KEY_1_OPENAPI_BASE_URL=ftp://nx.example.com: ",
        ),
        (
            {"EXTERNAL_API_KEY_1_OPENAPI_BASE_URL": "nx.example.com"},
            "EXTERNAL_API_KEY_1_OPENAPI_BASE_URL=nx.example.com: ",
        ),
        (
            {"EXTERNAL_API_KEY_1_OPENAPI_BASE_URL": "https://nx.example.com/?x=1"},
            "EXTERNAL_API_KEY_1_OPENAPI_BASE_URL=https://nx.example.com/?x=1: ",
        ),
        ({"OPENAPI_BASE_URL": "https://"}, "OPENAPI_BASE_URL=https:: "),
        (
            {"EXTERNAL_API_KEY_1_OPENAPI_ALGORITHM": "sha1"},
            "EXTERNAL_API_KEY_1_OPENAPI_ALGORITHM=sha1: ",
        ),
        ({"OPENAPI_ALGORITHM": "hmac"}, "OPENAPI_ALGORITHM=hmac: "),
        ({"EXTERNAL_API_KEY_1_OPENAPI_SECRET": "oops"}, "EXTERNAL_API_KEY_1_OPENAPI_SECRET: "),
        ({"EXTERNAL_API_KEY_1_NAME": "oops"}, "EXTERNAL_API_KEY_1_NAME: "),
    ],
)
def test_bad_env_value_names_the_variable(env: dict[str, str], start: str) -> None:
    [problem] = problems_of({"EXTERNAL_API_KEY_1": "key-one"} | env)
    assert problem.startswith(start), problem
    assert "; " in problem


def test_orphan_alias_without_its_key_names_the_missing_variable() -> None:
    [problem] = problems_of(
        {"EXTERNAL_API_KEY_1": "key-one", "EXTERNAL_API_KEY_3_ALIAS": "lost tenant"}
    )
    assert problem.startswith("EXTERNAL_API_KEY_3: ")
    assert "set EXTERNAL_API_KEY_3" in problem


def test_empty_key_with_other_variables_is_an_error() -> None:
    [problem] = problems_of({"EXTERNAL_API_KEY_2": " ", "EXTERNAL_API_KEY_2_DESC": "x"})
    assert problem.startswith("EXTERNAL_API_KEY_2: ")


def test_zero_padded_numbers_are_separate_variables_named_as_written() -> None:
    [problem] = problems_of({"EXTERNAL_API_KEY_1": "key-one", "EXTERNAL_API_KEY_01_ALIAS": "x"})
    assert problem.startswith("EXTERNAL_API_KEY_01: ")


def test_zero_padded_and_plain_number_are_two_tenants() -> None:
    registry = registry_of({"EXTERNAL_API_KEY_3": "key-three", "EXTERNAL_API_KEY_03": "key-03"})
    assert tenant_for(registry, "key-three").source == "EXTERNAL_API_KEY_3"
    assert tenant_for(registry, "key-03").source == "EXTERNAL_API_KEY_03"


def test_key_with_inner_whitespace_is_refused_without_showing_it() -> None:
    [problem] = problems_of({"EXTERNAL_API_KEY_1": "secret-key with space"})
    assert problem.startswith("EXTERNAL_API_KEY_1: ")
    assert "secret-key with space" not in problem


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('[{"apiKey": "k1",}]', "invalid JSON at line 1"),
        ('{"tenants": []}', 'expected a list of tenants or {"keys": [...]}'),
        ('"just a string"', "expected a list"),
    ],
)
def test_broken_tenants_file_names_the_file(content: str, expected: str, tmp_path: Path) -> None:
    [problem] = problems_of({}, content, tmp_path)
    assert problem.startswith(f"TENANTS_FILE={tmp_path / 'tenants.json'}: ")
    assert expected in problem


def test_missing_tenants_file_names_the_setting(tmp_path: Path) -> None:
    env = {"TENANTS_FILE": str(tmp_path / "nowhere.json")}
    with pytest.raises(ConfigError) as caught:
        load_registry(env, parse_settings(env))
    [problem] = caught.value.problems
    assert problem.startswith(f"TENANTS_FILE={tmp_path / 'nowhere.json'}: cannot read the file")


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"apiKey": "k1", "acessKey": "ak"}, "unknown field(s) acessKey"),
        ({"apiKey": "k1", "openapi": {"secret": "x"}}, "unknown field(s) openapi.secret"),
        ({"apiKey": "k1", "apiKeys": [{"apiKey": "k2", "expires": "2020-01-01"}]}, "expires"),
        ({"alias": "nokey"}, "no API key; add apiKey, apiKeyHash or apiKeys"),
        ({"apiKey": ""}, "apiKey must be a non-empty string"),
        ({"apiKey": 12345}, "apiKey must be a non-empty string"),
        ({"apiKeyHash": "sha256:abc"}, ".venv/bin/nxlink-proxy keygen"),
        ({"apiKeyHash": "md5:" + "0" * 32}, "apiKeyHash"),
        ({"apiKeys": "k1"}, "apiKeys must be a list"),
        ({"apiKeys": [{"apiKey": "k1", "notAfter": "next week"}]}, "notAfter=next week"),
        ({"apiKey": "k1", "openapi": "ak:sk"}, "openapi must be an object"),
        ({"apiKey": "k1", "openapi": {"accessKey": ["ak"]}}, "accessKey: must be a string"),
        ({"apiKey": "k1", "openapi": {"baseUrl": "ftp://x"}}, "baseUrl=ftp://x: not an http"),
        ({"apiKey": "k1", "openapi": {"algorithm": "crc32"}}, "algorithm=crc32: unknown"),
        ({"apiKey": "k1", "rateLimitRps": -1}, "rateLimitRps=-1 must be a positive number"),
        ({"apiKey": "k1", "rateLimitRps": "fast"}, "rateLimitRps='fast'"),
        ({"apiKey": "k1", "maxInflight": 2.5}, "maxInflight=2.5"),
        ({"apiKey": "k1", "rateLimitBurst": True}, "rateLimitBurst=True"),
        ({"apiKey": "k1", "rateLimitRps": float("nan")}, "rateLimitRps=nan"),
        ({"apiKey": "k1", "appendBatchSize": 0}, "appendBatchSize=0 must be a positive whole"),
    ],
)
def test_bad_file_entry_is_named_with_what_is_wrong(
    entry: dict[str, Any], expected: str, tmp_path: Path
) -> None:
    problems = problems_of({}, [{"apiKey": "fine-key-0000001"}, entry], tmp_path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{tmp_path / 'tenants.json'} entry #2"), problems
    assert expected in problems[0]


def test_file_entry_that_is_not_an_object_is_named(tmp_path: Path) -> None:
    [problem] = problems_of({}, ["just-a-key"], tmp_path)
    assert problem.startswith(f"{tmp_path / 'tenants.json'} entry #1: expected an object")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    problems = problems_of(
        {"EXTERNAL_API_KEY_1": "k1", "EXTERNAL_API_KEY_1_OPENAPI_ALGORITHM": "sha1"},
        [{"apiKey": "k2", "oops": 1}, {"alias": "nokey"}],
        tmp_path,
    )
    assert len(problems) == 3


def test_tenant_without_credentials_is_a_warning_not_an_error() -> None:
    registry = registry_of(
        {
            "EXTERNAL_API_KEY_1": "key-bare",
            "EXTERNAL_API_KEY_1_ALIAS": "bare",
            "EXTERNAL_API_KEY_2": "key-half",
            "EXTERNAL_API_KEY_2_OPENAPI_ACCESS_KEY": "ak-half",
        }
    )
    assert tenant_for(registry, "key-bare").credentials is None
    assert tenant_for(registry, "key-half").credentials is None
    assert len(registry.warnings) == 2
    assert registry.warnings[0].startswith("EXTERNAL_API_KEY_1 (bare): no accessKey/accessSecret")
    assert "OPENAPI_CONFIG_INCOMPLETE" in registry.warnings[0]


@pytest.mark.parametrize(
    "presented", ["unknown-key", "", "KEY-ONE", "key-one ", "key-on", "\udcff", "\ud800"]
)
def test_lookup_returns_none_for_unknown_keys(presented: str) -> None:
    registry = registry_of({"EXTERNAL_API_KEY_1": "key-one"})
    assert registry.lookup(presented) is None
    assert registry.lookup("key-one") is not None


def test_empty_registry_finds_nothing() -> None:
    registry = registry_of({})
    assert len(registry) == 0
    assert registry.lookup("anything") is None


def test_tenant_repr_never_contains_the_secret_or_the_key() -> None:
    registry = registry_of(
        {
            "EXTERNAL_API_KEY_1": "plain-client-key-123456",
            "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_KEY": "ak-shown",
            "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_SECRET": "sk-TOP-SECRET-value",
        }
    )
    match = registry.lookup("plain-client-key-123456")
    assert match is not None
    for text in (repr(match.tenant), str(match.tenant), repr(match), repr(registry.tenants)):
        assert "sk-TOP-SECRET-value" not in text
        assert "plain-client-key-123456" not in text
    assert match.key.hint == "plain-cl***"


def test_demo_registry_has_the_two_seed_tenants() -> None:
    registry = demo_registry("http://127.0.0.1:8002")
    assert [t.alias for t in registry.tenants] == ["电商平台A", "金融平台B"]
    assert tenant_for(registry, "ecommerce-platform-key-abc123").alias == "电商平台A"
    finance = tenant_for(registry, "finance-platform-key-xyz789")
    assert finance.base_url == "http://127.0.0.1:8002"
    assert finance.credentials is not None


def test_env_tenant_takes_limits_quotas_and_a_previous_key() -> None:
    registry = registry_of(
        {
            "EXTERNAL_API_KEY_4": "key-four-new",
            "EXTERNAL_API_KEY_4_PREVIOUS": "key-four-old",
            "EXTERNAL_API_KEY_4_PREVIOUS_NOT_AFTER": "2030-01-01T00:00:00Z",
            "EXTERNAL_API_KEY_4_RATE_LIMIT_RPS": "2.5",
            "EXTERNAL_API_KEY_4_RATE_LIMIT_BURST": "5",
            "EXTERNAL_API_KEY_4_MAX_INFLIGHT": "3",
            "EXTERNAL_API_KEY_4_QUOTA_NUMBERS_PER_DAY": "5000",
            "EXTERNAL_API_KEY_4_QUOTA_REQUESTS_PER_MONTH": "90000",
        }
    )
    tenant = tenant_for(registry, "key-four-new")
    assert tenant_for(registry, "key-four-old") is tenant
    assert tenant.id == "env-4"
    assert tenant.limits == Limits(2.5, 5, 3)
    assert tenant.quotas == Quotas(numbers_per_day=5000, requests_per_month=90000)
    old = registry.lookup("key-four-old")
    assert old is not None and old.key.not_after is not None
    assert old.key.not_after.year == 2030


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("EXTERNAL_API_KEY_1_RATE_LIMIT_RPS", "fast"),
        ("EXTERNAL_API_KEY_1_MAX_INFLIGHT", "2.5"),
        ("EXTERNAL_API_KEY_1_QUOTA_NUMBERS_PER_DAY", "0"),
        ("EXTERNAL_API_KEY_1_QUOTA_REQUESTS_PER_DAY", "many"),
    ],
)
def test_bad_env_limit_or_quota_names_its_variable(variable: str, value: str) -> None:
    [problem] = problems_of({"EXTERNAL_API_KEY_1": "key-one", variable: value})
    assert problem.startswith(f"{variable}="), problem
    assert "must be a positive" in problem


def test_previous_not_after_without_a_previous_key_is_an_error() -> None:
    [problem] = problems_of(
        {"EXTERNAL_API_KEY_1": "key-one", "EXTERNAL_API_KEY_1_PREVIOUS_NOT_AFTER": "2030-01-01"}
    )
    assert problem.startswith("EXTERNAL_API_KEY_1_PREVIOUS_NOT_AFTER=2030-01-01: ")


def test_file_quotas_and_id_are_read(tmp_path: Path) -> None:
    entry = {"id": "shop-a", "apiKey": "k-quotas", "quotas": {"numbersPerDay": 10}}
    tenant = tenant_for(registry_of({}, [entry], tmp_path), "k-quotas")
    assert (tenant.id, tenant.quotas) == ("shop-a", Quotas(numbers_per_day=10))


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"apiKey": "k1", "quotas": {"numbersPerDay": 0}}, "numbersPerDay=0 must be a positive"),
        ({"apiKey": "k1", "quotas": {"numbersPerDay": 1.5}}, "numbersPerDay=1.5"),
        ({"apiKey": "k1", "quotas": {"numbersPerWeek": 5}}, "unknown quota(s) numbersPerWeek"),
        ({"apiKey": "k1", "quotas": [5]}, "quotas must be an object"),
        ({"apiKey": "k1", "id": "no spaces please"}, "id must be 1-64 letters"),
    ],
)
def test_bad_quota_or_id_in_the_file_is_named(
    entry: dict[str, Any], expected: str, tmp_path: Path
) -> None:
    [problem] = problems_of({}, [entry], tmp_path)
    assert problem.startswith(f"{tmp_path / 'tenants.json'} entry #1"), problem
    assert expected in problem


def test_tenants_without_an_id_get_one_derived_from_the_alias(tmp_path: Path) -> None:
    entries = [{"apiKey": "k-one", "alias": "one"}, {"apiKey": "k-two", "alias": "two"}]
    first = registry_of({}, entries, tmp_path)
    again = registry_of({}, list(reversed(entries)), tmp_path)
    assert tenant_for(first, "k-one").id == tenant_for(again, "k-one").id
    assert tenant_for(first, "k-one").id != tenant_for(first, "k-two").id


def test_the_same_tenant_id_twice_names_both_places(tmp_path: Path) -> None:
    entries = [{"apiKey": "k-one", "id": "same"}, {"apiKey": "k-two", "id": "same"}]
    [problem] = problems_of({}, entries, tmp_path)
    assert "tenant id same" in problem and "entry #1" in problem and "entry #2" in problem


def test_demo_tenants_have_stable_ids() -> None:
    assert [t.id for t in demo_registry("http://x").tenants] == ["demo-1", "demo-2"]


def test_key_ids_are_stable_and_reveal_nothing() -> None:
    registry = registry_of({"EXTERNAL_API_KEY_1": "key-one-secret-value"})
    key = tenant_for(registry, "key-one-secret-value").keys[0]
    assert key.id == "k-" + hash_key("key-one-secret-value").hex()[:12]
    assert "key-one" not in key.id
