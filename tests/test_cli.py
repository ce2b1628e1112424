"""The command line, run in-process: check, sign, keygen, help, and the flags of serve/sandbox.

Known-answer signs below were computed in a shell from hand-written strings to sign, e.g.
``printf '%s' 'accessKey=ak-test&action=callAppend&...&accessSecret=sk-test' | md5sum``
(tests/test_signing.py spells out every string).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from proxy import __version__, cli
from proxy.config import Settings, parse_settings
from proxy.tenants import Credentials, Registry, load_registry
from tests.processes import free_port

KEY_A = "tenant-alpha-key-000111"
KEY_B = "tenant-beta-key-000222"
SECRET_A = "sk-test"
SECRET_B = "sk-beta-NEVER-PRINTED"
ENV: dict[str, str] = {
    "EXTERNAL_API_KEY_1": KEY_A,
    "EXTERNAL_API_KEY_1_ALIAS": "alpha",
    "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_KEY": "ak-test",
    "EXTERNAL_API_KEY_1_OPENAPI_ACCESS_SECRET": SECRET_A,
    "EXTERNAL_API_KEY_2": KEY_B,
    "EXTERNAL_API_KEY_2_ALIAS": "beta",
    "EXTERNAL_API_KEY_2_OPENAPI_ACCESS_KEY": "ak-beta-account",
    "EXTERNAL_API_KEY_2_OPENAPI_ACCESS_SECRET": SECRET_B,
    "EXTERNAL_API_KEY_2_OPENAPI_BIZ_TYPE": "9",
    "EXTERNAL_API_KEY_2_OPENAPI_BASE_URL": "https://nx.example.com/prefix",
    "EXTERNAL_API_KEY_2_OPENAPI_ALGORITHM": "sha256",
}
TS = "1700000000000"
APPEND_BODY = '{"taskId": "t1", "list": [{"phoneNumber":"13800000000"}]}'
# md5 / sha256 of the callAppend string with APPEND_BODY, ak-test, sk-test, bizType 8, TS.
APPEND_MD5 = "1b2a1291c7421ee6ca65fb286f972627"
APPEND_SHA256 = "9d356012a2c74c91619773ea1682d85fbbcbfed185d4f95d455da7b1be7e8264"
# md5 of the pageCallTaskInfo string with no body part, ak-test, sk-test, bizType 8, TS.
NO_BODY_MD5 = "5b8780a9214c06615906a4bb35796033"
EXPLICIT = ["sign", "--access-key", "ak-test", "--access-secret", "sk-test", "--ts", TS]


@pytest.fixture(autouse=True)
def _no_stray_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in an empty directory so a developer's own ``.env`` never leaks into a test."""
    monkeypatch.chdir(tmp_path)


def run(
    capsys: pytest.CaptureFixture[str], argv: list[str], environ: dict[str, str] | None = None
) -> tuple[int, str, str]:
    code = cli.main(argv, environ={} if environ is None else environ)
    out, err = capsys.readouterr()
    return code, out, err


def signed(capsys: pytest.CaptureFixture[str], argv: list[str], **env: str) -> dict[str, str]:
    code, out, err = run(capsys, argv, env)
    assert code == 0, err
    headers: dict[str, str] = json.loads(out)
    return headers


def write_tenants(path: Path, entries: list[dict[str, Any]]) -> str:
    path.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return str(path)


def test_check_prints_the_tenant_table_with_secrets_masked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, ["check"], ENV)
    assert code == 0, err
    assert out.startswith("2 tenant(s) configured; settings OK\n")
    assert "- alpha [EXTERNAL_API_KEY_1]" in out
    assert "- beta [EXTERNAL_API_KEY_2]" in out
    assert "tenant-a***" in out and "tenant-b***" in out
    assert "https://nx.example.com/prefix" in out and "bizType: 9" in out
    assert "algorithm sha256" in out
    assert "accessSecret <hidden>" in out
    for hidden in (KEY_A, KEY_B, SECRET_A, SECRET_B, "ak-beta-account"):
        assert hidden not in out + err


def test_check_warns_about_a_tenant_without_credentials(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, ["check"], {"EXTERNAL_API_KEY_1": KEY_A, "OPENAPI_BIZ_TYPE": "8"})
    assert code == 0
    assert "openapi:   MISSING accessKey/accessSecret" in out
    assert "warning: EXTERNAL_API_KEY_1 (EXTERNAL_API_KEY_1): no accessKey/accessSecret" in out


def test_check_with_no_tenant_exits_1_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, ["check"], {})
    assert code == 1
    assert out == ""
    assert "no tenant is configured" in err
    assert "EXTERNAL_API_KEY_1" in err and "--demo" in err


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"PORT": "eighty"}, "PORT=eighty: not a whole number"),
        ({"EXTERNAL_API_KEY_1_OPENAPI_ALGORITHM": "sha1"}, "EXTERNAL_API_KEY_1_OPENAPI_ALGORITHM"),
        ({"EXTERNAL_API_KEY_3_ALIAS": "orphan"}, "EXTERNAL_API_KEY_3: missing or empty"),
        ({"EXTERNAL_API_KEY_9": KEY_A}, "configured twice: in EXTERNAL_API_KEY_1"),
    ],
)
def test_check_with_a_bad_config_exits_1_naming_the_problem(
    extra: dict[str, str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, ["check"], ENV | extra)
    assert code == 1
    assert out == ""
    assert err.startswith("configuration error:\n  ")
    assert named in err
    assert "Traceback" not in err


def test_check_lists_every_problem(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, ["check"], ENV | {"LOG_LEVEL": "loud", "OPENAPI_ALGORITHM": "x"})
    assert code == 1
    assert "LOG_LEVEL=loud" in err
    # Tenant 1 falls back to the bad global algorithm; tenant 2 sets its own.
    assert "OPENAPI_ALGORITHM=x" in err


def test_check_reads_the_tenants_and_env_files_given_as_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tenants = write_tenants(tmp_path / "t.json", [{"apiKey": KEY_A, "alias": "从文件"}])
    env_file = tmp_path / "gateway.env"
    env_file.write_text("EXTERNAL_API_KEY_4=env-file-key-0004\n", encoding="utf-8")
    argv = ["check", "--tenants", tenants, "--env-file", str(env_file)]
    code, out, err = run(capsys, argv, {})
    assert code == 0, err
    assert out.startswith("2 tenant(s) configured")
    assert "从文件" in out and "EXTERNAL_API_KEY_4" in out
    assert "env-file-key-0004" not in out


def test_check_flag_beats_the_tenants_file_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flagged = write_tenants(tmp_path / "flag.json", [{"apiKey": KEY_A, "alias": "by-flag"}])
    code, out, _ = run(
        capsys, ["check", "--tenants", flagged], {"TENANTS_FILE": str(tmp_path / "absent")}
    )
    assert code == 0
    assert "by-flag" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--action", "callAppend", "--body", APPEND_BODY], APPEND_MD5),
        (["--action", "callAppend", "--body", APPEND_BODY, "--algorithm", "sha256"], APPEND_SHA256),
        (["--action", "pageCallTaskInfo"], NO_BODY_MD5),
        (["--action", "pageCallTaskInfo", "--body=--x--", "--multipart"], NO_BODY_MD5),
    ],
    ids=["md5", "sha256", "no-body", "multipart"],
)
def test_sign_with_explicit_credentials_prints_the_known_answer(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    headers = signed(capsys, EXPLICIT + args)
    assert headers["sign"] == expected
    assert headers["ts"] == TS
    assert headers["accessKey"] == "ak-test"
    assert set(headers) == {"accessKey", "ts", "bizType", "action", "sign", "algorithm"}


def test_sign_prints_all_six_headers(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sign", "--access-key", "ak-b", "--access-secret", "secret-b", "--biz-type", "9"]
    argv += ["--algorithm", "sha256", "--ts", "1712345678901", "--action", "callDelete"]
    headers = signed(capsys, argv + ["--body", '{"contactId":"c-1"}'])
    # printf '%s' 'accessKey=ak-b&action=callDelete&bizType=9&ts=1712345678901
    #   &body={"contactId":"c-1"}&accessSecret=secret-b' | sha256sum   (one line)
    assert headers == {
        "accessKey": "ak-b",
        "ts": "1712345678901",
        "bizType": "9",
        "action": "callDelete",
        "sign": "7ee6b42047fb0105e90d6617dd3876db28bd950ae313bbe375477818acea7180",
        "algorithm": "sha256",
    }


def test_sign_without_ts_uses_the_current_time_in_milliseconds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = int(time.time() * 1000)
    headers = signed(capsys, ["sign", "--access-key", "a", "--access-secret", "s", "--action", "x"])
    after = int(time.time() * 1000)
    assert before <= int(headers["ts"]) <= after


def test_sign_body_file_is_signed_byte_for_byte(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = tmp_path / "body.json"
    body.write_bytes('{"name":"张三","备注":"中文"}'.encode())
    headers = signed(capsys, EXPLICIT + ["--action", "callAppend", "--body-file", str(body)])
    # printf '%s' 'accessKey=ak-test&action=callAppend&bizType=8&ts=1700000000000
    #   &body={"name":"张三","备注":"中文"}&accessSecret=sk-test' | md5sum   (one line)
    assert headers["sign"] == "8389cfd398fdb8d39072e099fa915b85"


@pytest.mark.parametrize("who", [["--api-key", KEY_A], ["--alias", "alpha"]])
def test_sign_takes_the_credentials_of_a_tenant(
    who: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["sign", *who, "--ts", TS, "--action", "callAppend", "--body", APPEND_BODY]
    headers = signed(capsys, argv, **ENV)
    assert headers["sign"] == APPEND_MD5
    assert (headers["accessKey"], headers["bizType"], headers["algorithm"]) == (
        "ak-test",
        "8",
        "md5",
    )


@pytest.mark.parametrize("who", [["--api-key", KEY_A], ["--alias", "文件租户"]])
def test_sign_takes_a_tenant_from_the_tenants_file(
    who: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = {
        "apiKey": KEY_A,
        "alias": "文件租户",
        "openapi": {"accessKey": "ak-test", "accessSecret": "sk-test", "algorithm": "sha256"},
    }
    tenants = write_tenants(tmp_path / "tenants.json", [entry])
    argv = ["sign", "--tenants", tenants, *who, "--ts", TS, "--action", "callAppend"]
    headers = signed(capsys, argv + ["--body", APPEND_BODY])
    assert headers["sign"] == APPEND_SHA256
    assert headers["algorithm"] == "sha256"


def test_sign_algorithm_flag_overrides_the_tenants(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sign", "--alias", "alpha", "--algorithm", "sha256", "--ts", TS]
    headers = signed(capsys, argv + ["--action", "callAppend", "--body", APPEND_BODY], **ENV)
    assert headers["sign"] == APPEND_SHA256


def test_sign_show_string_hides_the_secret(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, EXPLICIT + ["--action", "pageCallTaskInfo", "--show-string"], {})
    assert code == 0
    assert json.loads(out)["sign"] == NO_BODY_MD5
    assert err.strip() == (
        "accessKey=ak-test&action=pageCallTaskInfo&bizType=8&ts=1700000000000"
        "&accessSecret=<accessSecret>"
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["sign", "--action", "x", "--access-key", "ak"], "give both --access-key and"),
        (["sign", "--action", "x", "--access-secret", "sk"], "give both --access-key and"),
        (["sign", "--action", "x"], "give --api-key or --alias"),
        (["sign", "--action", "x", "--alias", "nobody"], "no configured tenant nobody"),
        (
            ["sign", "--action", "x", "--api-key", "unknown-key-123456"],
            "no configured tenant unknown-***",
        ),
    ],
)
def test_sign_without_usable_credentials_exits_1(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, argv, ENV)
    assert code == 1
    assert out == ""
    assert expected in err
    assert "unknown-key-123456" not in err


def test_sign_for_a_tenant_without_credentials_exits_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {"EXTERNAL_API_KEY_1": KEY_A, "EXTERNAL_API_KEY_1_ALIAS": "bare"}
    code, _, err = run(capsys, ["sign", "--alias", "bare", "--action", "x"], env)
    assert code == 1
    assert "no configured tenant bare with accessKey/accessSecret" in err


def test_sign_missing_body_file_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "absent.json")
    code, out, err = run(capsys, EXPLICIT + ["--action", "x", "--body-file", missing], {})
    assert code == 1
    assert out == ""
    assert err.startswith("error: FileNotFoundError") and "Traceback" not in err


def test_keygen_prints_a_key_and_its_matching_hash(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, ["keygen"])
    assert code == 0
    printed = json.loads(out)
    assert set(printed) == {"apiKey", "apiKeyHash"}
    key = printed["apiKey"]
    assert len(key) >= 32 and key.isascii() and not any(c.isspace() for c in key)
    assert printed["apiKeyHash"] == "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def test_keygen_hash_authenticates_its_key_from_a_tenants_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, ["keygen"])
    assert code == 0
    printed = json.loads(out)
    tenants = write_tenants(
        tmp_path / "t.json", [{"apiKeyHash": printed["apiKeyHash"], "alias": "hashed"}]
    )
    env = {"TENANTS_FILE": tenants}
    registry = load_registry(env, parse_settings(env))
    match = registry.lookup(printed["apiKey"])
    assert match is not None and match.tenant.alias == "hashed"
    code, table, _ = run(capsys, ["check", "--tenants", tenants])
    assert code == 0
    assert printed["apiKey"] not in table


def test_keygen_makes_a_new_key_each_time(capsys: pytest.CaptureFixture[str]) -> None:
    _, first, _ = run(capsys, ["keygen"])
    _, second, _ = run(capsys, ["keygen"])
    assert json.loads(first)["apiKey"] != json.loads(second)["apiKey"]


@pytest.mark.parametrize("command", [[], ["serve"], ["check"], ["sign"], ["sandbox"], ["keygen"]])
def test_help_of_every_command_exits_0(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([*command, "--help"], environ={})
    assert exited.value.code == 0
    assert "usage: nxlink-proxy" in capsys.readouterr().out


def test_version_flag_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"], environ={})
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"nxlink-proxy {__version__}"


def test_sign_requires_an_action(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["sign", "--access-key", "a", "--access-secret", "s"], environ={})
    assert exited.value.code == 2
    assert "--action" in capsys.readouterr().err


class Recorder:
    """Stands in for the blocking run functions, keeping what they were given."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> int:
        self.calls.append((*args, kwargs))
        return 0


@pytest.fixture
def gateway_runs(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(cli, "run_gateway", recorder)
    return recorder


def test_serve_flags_beat_their_variables(
    gateway_runs: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    env = ENV | {"PORT": "1111", "HOST": "0.0.0.0", "WORKERS": "1"}
    code, _, err = run(capsys, ["serve", "--port", "2222", "--host", "127.0.0.1"], env)
    assert code == 0, err
    [(settings, registry, options)] = gateway_runs.calls
    assert isinstance(settings, Settings) and isinstance(registry, Registry)
    assert (settings.host, settings.port) == ("127.0.0.1", 2222)
    assert len(registry) == 2
    assert options["demo"] is False


def test_serve_is_the_default_command(
    gateway_runs: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, _ = run(capsys, ["--port", "3333"], ENV)
    assert code == 0
    assert gateway_runs.calls[0][0].port == 3333


def test_serve_with_no_tenant_and_no_demo_flag_is_an_error(
    gateway_runs: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, ["serve"], {})
    assert code == 1
    assert "no tenant is configured" in err and "--demo" in err
    assert gateway_runs.calls == []


def test_serve_demo_with_no_tenant_runs_the_demo(
    gateway_runs: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, _ = run(capsys, ["serve", "--demo"], {})
    assert code == 0
    assert gateway_runs.calls[0][2]["demo"] is True


def test_serve_demo_with_tenants_configured_is_ignored_with_a_note(
    gateway_runs: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, ["serve", "--demo"], ENV)
    assert code == 0
    assert gateway_runs.calls[0][2]["demo"] is False
    assert "--demo is ignored" in err


def test_serve_bad_port_flag_exits_1_before_serving(
    gateway_runs: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, ["serve", "--port", "99999"], ENV)
    assert code == 1
    assert "PORT=99999: out of range" in err
    assert gateway_runs.calls == []


def test_sandbox_gets_the_configured_tenants_accounts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recorder = Recorder()
    monkeypatch.setattr(cli, "run_sandbox", recorder)
    code, _, _ = run(capsys, ["sandbox", "--port", "8123"], ENV)
    assert code == 0
    [(host, port, accounts, _)] = recorder.calls
    assert (host, port) == ("127.0.0.1", 8123)
    assert [a.access_key for a in accounts] == ["ak-test", "ak-beta-account"]
    assert all(isinstance(a, Credentials) for a in accounts)


@pytest.mark.parametrize(
    ("state", "line"),
    [
        ({}, "state memory://: shared by this process only, lost on restart; reachable"),
        (
            {"STATE_URL": "sqlite:///state.db"},
            "state sqlite:///state.db: shared by processes on this host, kept across restarts; "
            "reachable",
        ),
        (
            {"WORKERS": "2"},
            "state: a private SQLite file shared by the workers, removed when the gateway stops",
        ),
    ],
)
def test_check_names_the_state_backend_and_whether_it_answers(
    capsys: pytest.CaptureFixture[str], state: dict[str, str], line: str
) -> None:
    code, out, err = run(capsys, ["check"], ENV | state)
    assert code == 0, err
    assert out.splitlines()[1] == line


def test_check_warns_when_redis_does_not_answer_and_masks_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"redis://app:pa55word@127.0.0.1:{free_port()}/0"
    code, out, err = run(capsys, ["check"], ENV | {"STATE_URL": url})
    assert code == 0, err
    assert out.splitlines()[1].startswith("state redis://app:***@127.0.0.1:")
    assert out.splitlines()[2].startswith("warning: state backend unreachable (redis ")
    assert "pa55word" not in out + err
