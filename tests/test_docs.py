"""The README and the example configuration say what the code does."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

import pytest

from proxy.cli import main
from proxy.nxlink import KNOWN_ACTIONS
from proxy.settings_table import SETTINGS_TABLE
from proxy.tenant_sources import ENV_SUFFIXES_ALL

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
ROW = re.compile(r"^\| `([A-Z_]+)` \| (`[^`]*`|\(none\)) \| (.+) \|$", re.M)


def test_readme_settings_table_matches_the_code_row_for_row() -> None:
    documented = [
        (name, default.strip("`"), meaning) for name, default, meaning in ROW.findall(README)
    ]
    expected = [(s.name, s.default or "(none)", s.help) for s in SETTINGS_TABLE]
    assert documented == expected


def test_readme_starts_with_make_run_then_make_test() -> None:
    commands = re.findall(r"^\s{4}(make \w+)", README, re.M)
    assert commands[:2] == ["make run", "make test"]


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (REPO / ".ci" / "run").read_text(encoding="utf-8")


EXAMPLES: Final = {
    "dotenv": ("--env-file", REPO / "config" / ".env.example"),
    "tenants file": ("--tenants", REPO / "config" / "tenants.example.json"),
}


def check_argv(flag: str, path: Path) -> list[str]:
    """``check`` with only this example (no stray ``.env``; a later --env-file wins)."""
    return ["check", "--env-file", "/dev/null", flag, str(path)]


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_example_configurations_fail_check_naming_each_placeholder(
    example: str, capsys: pytest.CaptureFixture[str]
) -> None:
    flag, path = EXAMPLES[example]
    assert main(check_argv(flag, path), environ={}) == 1
    err = capsys.readouterr().err
    placeholders = re.findall(r"^  (.+): still the example's placeholder", err, re.M)
    values = re.findall(r'[=:]\s*"?replace-with-', path.read_text(encoding="utf-8"))
    assert len(placeholders) == len(values) > 0, err
    assert "serve --sandbox" in err and "keygen" in err
    assert "replace-with-access-secret" not in err


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_example_configurations_pass_check_once_the_placeholders_are_replaced(
    example: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flag, path = EXAMPLES[example]
    edited = tmp_path / path.name
    edited.write_text(path.read_text(encoding="utf-8").replace("replace-with-", "edited-"), "utf-8")
    assert main(check_argv(flag, edited), environ={}) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "edited-access-secret" not in out
    assert "edited-a-key-from-keygen" not in out


def test_readme_lists_every_operation_the_sandbox_emulates() -> None:
    listed = dict(re.findall(r"^\| `POST (/openapi/\S+)` \| `(\w+)` \|", README, re.M))
    assert listed == KNOWN_ACTIONS


DOTENV_EXAMPLE: Final = (REPO / "config" / ".env.example").read_text(encoding="utf-8")


def test_dotenv_example_shows_every_setting_but_its_own_file() -> None:
    shown = set(re.findall(r"^#? ?([A-Z_]+)=", DOTENV_EXAMPLE, re.M))
    assert {s.name for s in SETTINGS_TABLE} - shown == {"ENV_FILE"}


@pytest.mark.parametrize("suffix", sorted(ENV_SUFFIXES_ALL))
def test_every_environment_tenant_variable_is_documented_and_shown(suffix: str) -> None:
    assert re.search(rf"^#? ?EXTERNAL_API_KEY_1{suffix}=", DOTENV_EXAMPLE, re.M), suffix
    assert f"`EXTERNAL_API_KEY_N{suffix}`" in README or f"`...{suffix}`" in README
