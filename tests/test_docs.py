"""The README and the example configuration say what the code does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.nxlink import KNOWN_ACTIONS
from proxy.settings_table import SETTINGS_TABLE

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


@pytest.mark.parametrize(
    "argv",
    [
        ["check", "--env-file", str(REPO / "config" / ".env.example")],
        [
            "check",
            "--env-file",
            "/dev/null",
            "--tenants",
            str(REPO / "config" / "tenants.example.json"),
        ],
    ],
)
def test_example_configurations_pass_check(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv, environ={}) == 0
    out = capsys.readouterr().out
    assert "replace-with-access-secret" not in out
    assert "ecommerce-platform-key-abc123" not in out


def test_readme_lists_every_operation_the_sandbox_emulates() -> None:
    listed = dict(re.findall(r"^\| `POST (/openapi/\S+)` \| `(\w+)` \|", README, re.M))
    assert listed == KNOWN_ACTIONS
