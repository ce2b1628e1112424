"""Every command the README and the error hints show runs as printed from a fresh clone."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

REPO: Final = Path(__file__).resolve().parent.parent
README: Final = (REPO / "README.md").read_text(encoding="utf-8")
MAKEFILE: Final = (REPO / "Makefile").read_text(encoding="utf-8")
# Programs a reader has, or that the README only shows for other machines (never run here).
EXTERNAL: Final = frozenset({"curl", "docker", "kubectl", "cp", "printf"})
SHELL_OPERATORS: Final = frozenset({"|", ">", "<", "&&", "||", ";", "&"})
ASSIGNMENT: Final = re.compile(r"[A-Z_][A-Z0-9_]*=\S*")
# Sub-commands that are quick and need no server: the test runs them as printed.
CHEAP: Final = frozenset({"sign", "keygen", "check", "--help", "--version"})
# A program named bare (not .venv/bin/...): "command not found" in a fresh clone.
BARE_COMMAND: Final = re.compile(r"(?<![\w/.-])(nxlink-proxy [a-z-]+|python3? -m proxy [a-z-]+)")
HINT_SOURCES: Final = (
    *sorted((REPO / "proxy").rglob("*.py")),
    REPO / "config" / ".env.example",
    REPO / "config" / "tenants.example.json",
    *sorted((REPO / "deploy").glob("*.y*ml")),
    REPO / "Makefile",
    REPO / "README.md",
)


def code_blocks(markdown: str) -> Iterator[list[str]]:
    """Indented code blocks: 4-space lines after a blank line (not a list's continuation)."""
    block: list[str] = []
    previous = ""
    for line in markdown.splitlines():
        if block and (line.startswith("    ") or not line.strip()):
            block.append(line[4:])
            continue
        if block:
            yield textwrap.dedent("\n".join(block)).splitlines()
            block = []
        if line.startswith("    ") and not previous.strip():
            block = [line[4:]]
        previous = line
    if block:
        yield textwrap.dedent("\n".join(block)).splitlines()


def is_shell(block: list[str]) -> bool:
    """A block of commands, not a JSON answer or the string to sign."""
    first = next((line for line in block if line.strip() and not line.startswith("#")), "")
    word = first.split(" ", 1)[0]
    return bool(word) and "=" not in word and word[0] not in "{[(\"'"


def commands(block: list[str]) -> Iterator[list[str]]:
    """The block's commands as argv lists (continuations and multi-line quotes joined)."""
    current = ""
    for line in block:
        if not current and (not line.strip() or line.startswith("#")):
            continue
        current += line + "\n"
        if current.rstrip().endswith("\\"):
            continue
        try:
            argv = shlex.split(current.replace("\\\n", " "), comments=True)
        except ValueError:  # a quoted body still open
            continue
        current = ""
        if argv:
            yield argv
    assert not current, f"unfinished command: {current}"


def readme_commands() -> list[list[str]]:
    return [argv for b in code_blocks(README) if is_shell(b) for argv in commands(b)]


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", MAKEFILE, re.M))


def installed_by_make() -> set[str]:
    """System tools the Makefile installs when missing (``command -v tool || apt-get ...``, or
    listed in ``TEST_PROGRAMS``, which the test target checks the same way)."""
    listed = re.search(r"^TEST_PROGRAMS := (.+)$", MAKEFILE, re.M)
    return set(re.findall(r"command -v (\w+)", MAKEFILE)) | set(
        listed.group(1).split() if listed else ()
    )


def runnable_problem(argv: list[str]) -> str | None:
    """Why ``argv`` would not run as printed from a fresh clone (None: it would)."""
    while argv and ASSIGNMENT.fullmatch(argv[0]):  # NAME=value cmd: the variable is for cmd
        argv = argv[1:]
    program = argv[0]
    if program in installed_by_make():
        return None
    if program == "make":
        missing = [t for t in argv[1:] if not t.startswith("-") and t not in make_targets()]
        return f"no make target {missing}" if missing or len(argv) < 2 else None
    if program in EXTERNAL:
        return None
    if program.startswith(".venv/bin/"):
        return None if (REPO / program).exists() else f"{program} is not installed by make install"
    return f"{program}: not found in a fresh clone; use a make target or .venv/bin/{program}"


def test_readme_shows_commands_from_every_section() -> None:
    programs = {argv[0] for argv in readme_commands()}
    assert {"make", "curl", "docker", "kubectl", ".venv/bin/nxlink-proxy"} <= programs


def test_every_readme_command_runs_from_a_fresh_clone() -> None:
    problems = [
        f"{shlex.join(argv)}: {why}"
        for argv in readme_commands()
        if (why := runnable_problem(argv)) is not None
    ]
    assert not problems


@pytest.mark.parametrize(
    ("argv", "ok"),
    [
        (["make", "run"], True),
        (["make", "deploy"], False),
        (["nxlink-proxy", "sandbox", "--port", "8002"], False),
        (["python", "-m", "proxy", "serve"], False),
        ([".venv/bin/nxlink-proxy", "keygen"], True),
        ([".venv/bin/no-such-tool"], False),
        (["curl", "-s", "http://localhost:8001/healthz"], True),
        (["PORT=1", ".venv/bin/nxlink-proxy", "serve"], True),
        (["PORT=1", "nxlink-proxy", "serve"], False),
        (["promtool", "check", "rules", "deploy/prometheus-alerts.yml"], True),
    ],
)
def test_runnable_check_tells_a_clone_command_from_a_missing_one(argv: list[str], ok: bool) -> None:
    assert (runnable_problem(argv) is None) is ok


def test_no_hint_or_document_names_a_command_that_is_not_on_the_path() -> None:
    found = [
        f"{path.relative_to(REPO)}:{number}: {match.group(1)}"
        for path in HINT_SOURCES
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        for match in BARE_COMMAND.finditer(line)
    ]
    assert not found, "write .venv/bin/nxlink-proxy or a make target instead"


def fresh_clone(tmp_path: Path) -> Path:
    """A directory laid out like a clone after ``make install`` and the README's edit of .env."""
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / ".venv").symlink_to(REPO / ".venv")
    (clone / "config").symlink_to(REPO / "config")
    example = (REPO / "config" / ".env.example").read_text(encoding="utf-8")
    (clone / ".env").write_text(example.replace("replace-with-", "edited-"), encoding="utf-8")
    return clone


def test_cheap_readme_commands_succeed_as_printed(tmp_path: Path) -> None:
    # A pipeline runs in tests/test_admin_serve.py, through bash, with its server around it.
    cheap = [
        a
        for a in readme_commands()
        if a[0].startswith(".venv/") and set(a[1:2]) <= CHEAP and not SHELL_OPERATORS & set(a)
    ]
    assert cheap
    clone = fresh_clone(tmp_path)
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    for argv in cheap:
        result = subprocess.run(
            argv, cwd=clone, env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, f"{shlex.join(argv)}:\n{result.stdout}{result.stderr}"
