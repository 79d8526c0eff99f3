"""The kit installs the same things however a user installs it."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def _normalise(req: str) -> str:
    name, spec = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", req).groups()
    return re.sub(r"[-_.]+", "-", name).lower() + spec.replace(" ", "")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_environment_yml_lists_what_pyproject_declares():
    project = _pyproject()["project"]
    declared = {_normalise(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    lines = (ROOT / "environment.yml").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    pip_deps = {_normalise(line.strip()[2:]) for line in lines[start + 1:]
                if line.strip().startswith("- ")}
    assert pip_deps == declared, f"only in environment.yml: {pip_deps - declared}; only in pyproject: {declared - pip_deps}"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = re.findall(r"^(python -m pytest[^\n`]*)$", readme, flags=re.M)
    assert commands, "README.md names no `python -m pytest` command"
    assert commands[0] in ci.splitlines(), f"{commands[0]!r} is not a line of .ci/run"
    installs = re.findall(r"^(pip install -e [^\n`]*)$", readme, flags=re.M)
    assert installs and installs[0] in ci.splitlines()


def test_console_script_points_at_cli_main():
    from cnclip_kd import cli

    target = _pyproject()["project"]["scripts"]["cnclip-kd"]
    assert target == "cnclip_kd.cli:main" and callable(cli.main)
