"""The package's shape (docs/design.md): stage folders, imports that point down, pieces a reader can hold.

These read the source as text (ast), so they are fast and need no model.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "cnclip_kd"

#: Stage folders from the bottom up: a module may import its own stage and the stages before it.
STAGES = ("core", "data", "models", "distill", "retrieval", "deploy", "notebook")
#: Stages that sit side by side: neither may import the other.
SIDE_BY_SIDE = {"distill": {"retrieval", "deploy"}, "retrieval": {"distill"}, "deploy": {"distill"}}
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_CLASS_LINES = 800, 100, 300


def _modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def _stage(path: Path) -> str | None:
    parts = path.relative_to(PKG).parts
    return parts[0] if len(parts) > 1 else None


def _imported_modules(path: Path) -> list[tuple[str, list[str]]]:
    """``(absolute module, imported names)`` for every package-relative or ``cnclip_kd`` import in a file."""
    package = ["cnclip_kd", *path.relative_to(PKG).parts[:-1]]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("cnclip_kd"):
                out.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("cnclip_kd")]
    return out


def oversized(paths=None) -> list[str]:
    """Modules, functions and classes over the limits, one line each (empty when all fit)."""
    found = []
    for path in paths or _modules():
        src = path.read_text(encoding="utf-8")
        name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        if src.count("\n") > MAX_MODULE_LINES:
            found.append(f"{name}: module of {src.count(chr(10))} lines (max {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(src)):
            lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines > MAX_FUNCTION_LINES:
                found.append(f"{name}:{node.lineno} function {node.name}: {lines} lines (max {MAX_FUNCTION_LINES})")
            elif isinstance(node, ast.ClassDef) and lines > MAX_CLASS_LINES:
                found.append(f"{name}:{node.lineno} class {node.name}: {lines} lines (max {MAX_CLASS_LINES})")
    return found


def test_no_module_function_or_class_over_the_limits():
    assert oversized() == []


def test_the_size_check_catches_a_long_function(tmp_path):
    long = tmp_path / "long.py"
    long.write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES, encoding="utf-8")
    fits = tmp_path / "fits.py"
    fits.write_text("def f():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES - 1), encoding="utf-8")
    assert [line.split(": ", 1)[1] for line in oversized([long, fits])] == [
        f"{MAX_FUNCTION_LINES + 1} lines (max {MAX_FUNCTION_LINES})"]


def test_every_module_lives_in_a_stage_folder():
    loose = sorted(p.name for p in PKG.glob("*.py"))
    assert loose == ["__init__.py", "cli.py"]
    assert sorted(p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(STAGES)


def test_no_private_name_crosses_a_module_boundary():
    crossing = [f"{p.relative_to(ROOT)}: from {m} import {n}"
                for p in _modules() for m, names in _imported_modules(p) for n in names if n.startswith("_")]
    assert crossing == []


def test_imports_point_down_and_side_stages_stay_apart():
    wrong = []
    for path in _modules():
        stage = _stage(path)
        if stage is None:
            continue  # cnclip_kd/__init__.py and cli.py sit on top
        for module, _ in _imported_modules(path):
            parts = module.split(".")
            target = parts[1] if len(parts) > 1 and parts[1] in STAGES else None
            if target is None:
                if len(parts) > 1 and parts[1] == "cli":
                    wrong.append(f"{path.relative_to(ROOT)} imports the CLI")
                continue
            if STAGES.index(target) > STAGES.index(stage) or target in SIDE_BY_SIDE.get(stage, ()):
                wrong.append(f"{path.relative_to(ROOT)} ({stage}) imports {module}")
    assert wrong == []


def _notebook_imports(path: Path) -> list[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))
    return [m for m, _ in _imported_modules_from_source(code)]


def _imported_modules_from_source(code: str) -> list[tuple[str, list[str]]]:
    out = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cnclip_kd"):
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("cnclip_kd")]
    return out


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebooks_import_one_face_per_stage(notebook):
    modules = _notebook_imports(notebook)
    assert modules, "the notebook uses the package"
    faces = {"cnclip_kd", *(f"cnclip_kd.{s}" for s in STAGES)}
    assert [m for m in modules if m not in faces] == []  # a face, never a module behind it
    assert len(modules) == len(set(modules))  # one import statement per face


@pytest.mark.parametrize("stage", STAGES)
def test_each_face_names_only_what_exists(stage):
    import importlib

    face = importlib.import_module(f"cnclip_kd.{stage}")
    assert face.__all__ and all(re.fullmatch(r"[A-Za-z]\w*", n) for n in face.__all__)
    missing = [n for n in face.__all__ if not hasattr(face, n)]
    assert missing == []
    with pytest.raises(AttributeError, match="has no attribute"):
        face.no_such_name  # noqa: B018
