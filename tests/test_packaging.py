"""Release hygiene: one version everywhere, bounded dependencies, a clean install that runs."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Final

import pytest

from proxy import __version__

REPO: Final = Path(__file__).resolve().parent.parent
PYPROJECT: Final = REPO / "pyproject.toml"
CHANGELOG: Final = REPO / "CHANGELOG.md"
DISTRIBUTION: Final = "nxlink-openapi-proxy"
INSTALL_TIMEOUT: Final = 300
# Never copied into the clean build: local state, caches and anything secret.
NOT_SOURCE: Final = (".git", ".venv", ".env", "*cache*", "__pycache__", "build", "dist")


def pyproject() -> dict[str, Any]:
    """pyproject.toml, parsed."""
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def test_version_lives_only_in_the_package() -> None:
    project = pyproject()
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "proxy.__version__"}


def test_python_m_proxy_prints_the_installed_version(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"nxlink-proxy {__version__}"
    installed = importlib.metadata.version(DISTRIBUTION)
    assert installed == __version__, f"installed metadata says {installed}: run make install"


def test_changelog_newest_release_is_this_version() -> None:
    text = CHANGELOG.read_text(encoding="utf-8")
    assert "## [Unreleased]" in text
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", text, re.MULTILINE)
    assert releases and releases[0] == __version__, releases


def test_every_dependency_has_an_upper_bound() -> None:
    project = pyproject()["project"]
    requirements = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    unbounded = [r for r in requirements if "<" not in r.split(";")[0]]
    assert not unbounded, f"add an upper bound (next major) to {unbounded}"


def test_license_is_an_spdx_expression_the_build_backend_takes_without_warning() -> None:
    toml = pyproject()
    # A {text = ...} table is deprecated (setuptools warns on every build, three times per
    # make install); the SPDX string needs setuptools 77 or later (PEP 639).
    assert toml["project"]["license"] == "MIT"
    [backend] = [r for r in toml["build-system"]["requires"] if r.startswith("setuptools")]
    lowest = re.search(r">=\s*(\d+)", backend)
    assert lowest and int(lowest.group(1)) >= 77, backend
    assert not [c for c in toml["project"].get("classifiers", []) if c.startswith("License ::")]


def run(argv: list[str | Path], cwd: Path, timeout: float) -> str:
    """Run a command to completion and return its stdout; fail with its output otherwise."""
    result = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
    )
    assert result.returncode == 0, f"{argv}: exit {result.returncode}\n{result.stderr}"
    assert "SetuptoolsDeprecationWarning" not in result.stderr, result.stderr
    return result.stdout


@pytest.mark.slow
def test_clean_install_provides_a_working_nxlink_proxy(tmp_path: Path) -> None:
    source, venv = tmp_path / "source", tmp_path / "venv"
    # a copy, so building leaves no build/ or *.egg-info in the working tree
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    run([sys.executable, "-m", "venv", venv], tmp_path, 120)
    python, script = venv / "bin" / "python", venv / "bin" / "nxlink-proxy"
    run([python, "-m", "pip", "install", "--quiet", source], tmp_path, INSTALL_TIMEOUT)

    location = run([python, "-c", "import proxy; print(proxy.__file__)"], tmp_path, 60)
    assert Path(location.strip()).is_relative_to(venv), "installed as a copy, not editable"
    assert run([script, "--version"], tmp_path, 60).strip() == f"nxlink-proxy {__version__}"
    pair = json.loads(run([script, "keygen"], tmp_path, 60))
    assert pair["apiKeyHash"] == "sha256:" + hashlib.sha256(pair["apiKey"].encode()).hexdigest()
    listing = "from importlib import resources; print(*sorted(p.name for p in " + (
        "(resources.files('proxy.admin') / 'static').iterdir()))"
    )
    assert run([python, "-c", listing], tmp_path, 60).split() == ["app.css", "app.js", "index.html"]
