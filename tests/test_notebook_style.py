"""House style of the kit's notebooks (after microsoft/computervision-recipes).

Every ``notebooks/*.ipynb`` must be committed with outputs cleared, use the
``python3`` kernel, and follow this cell order: a first code cell of
imports, then one ``parameters``-tagged cell where every line is blank, a
comment, or ``NAME: type = <literal>  # help``, then numbered markdown
sections (``## 1. ...``, ``## 2. ...``), and a last code cell that calls
``record(...)``.  No cell installs packages or changes the working
directory or ``sys.path``.

:func:`style_problems` lists the violations; it is itself tested on the
fixture notebook and on broken variants of it.
"""

import ast
import copy
import io
import re
import tokenize
from pathlib import Path

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager
from papermill.translators import PythonTranslator

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "record_demo.ipynb"

FORBIDDEN = {
    "!pip": re.compile(r"!\s*pip\b"),
    "%pip": re.compile(r"%pip\b"),
    "conda install": re.compile(r"[!%]\s*conda\b"),
    "%cd": re.compile(r"%cd\b"),
    "os.chdir": re.compile(r"\bos\.chdir\b"),
    "sys.path": re.compile(r"\bsys\.path\b"),
}
# A parameter's annotation, when it is one of these, must match its default.
SIMPLE_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "list": list, "dict": dict}
SECTION = re.compile(r"^#{2,3}\s+(\d+)[.)]?\s+\S", re.MULTILINE)


def _python(source: str) -> ast.Module:
    """Parse a cell, turning IPython magics into plain calls first."""
    return ast.parse(TransformerManager().transform_cell(source))


def _is_logging_setup(stmt: ast.stmt) -> bool:
    """``logging.basicConfig(...)``: set up with the imports so every later cell logs."""
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Call)
        and ast.unparse(stmt.value.func) == "logging.basicConfig"
    )


def _is_magic_call(stmt: ast.stmt) -> bool:
    """``get_ipython().run_line_magic(...)``: what ``%matplotlib inline`` becomes."""
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Call)
        and isinstance(stmt.value.func, ast.Attribute)
        and stmt.value.func.attr == "run_line_magic"
    )


def _parameter_line_problem(line: str):
    """Return (name, None) for a good parameter line, or (None, problem)."""
    try:
        tree = ast.parse(line)
    except SyntaxError as err:
        return None, f"not valid Python ({err.msg})"
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.AnnAssign):
        return None, "must be `NAME: type = <literal>  # help`"
    stmt = tree.body[0]
    if not isinstance(stmt.target, ast.Name) or stmt.value is None:
        return None, "must be `NAME: type = <literal>  # help`"
    try:
        value = ast.literal_eval(stmt.value)
    except ValueError:
        return None, "default is not a literal"
    comments = [t.string for t in tokenize.generate_tokens(io.StringIO(line).readline) if t.type == tokenize.COMMENT]
    if not comments or not comments[0].lstrip("#").strip():
        return None, "needs a trailing `# help` comment"
    ann = stmt.annotation
    base = ann.value if isinstance(ann, ast.Subscript) else ann
    if isinstance(base, ast.Name) and base.id in SIMPLE_TYPES:
        expected = SIMPLE_TYPES[base.id]
        if not isinstance(value, expected) or (base.id in ("int", "float") and isinstance(value, bool)):
            return None, f"default {value!r} is not of type {base.id}"
    return stmt.target.id, None


def _has_record_call(source: str) -> bool:
    for node in ast.walk(_python(source)):
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Name) and func.id == "record") or (
                isinstance(func, ast.Attribute) and func.attr == "record"
            ):
                return True
    return False


def style_problems(nb) -> list:
    """List house-style violations of a notebook (empty if it conforms).

    Args:
        nb: An ``nbformat`` v4 notebook.

    Returns:
        One human-readable string per problem.
    """
    problems = []
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as err:
        problems.append(f"not a valid notebook: {err.message}")

    kernel = nb.metadata.get("kernelspec", {}).get("name")
    if kernel != "python3":
        problems.append(f"kernelspec name is {kernel!r}, not 'python3'")
    if "papermill" in nb.metadata:
        problems.append("notebook metadata has a 'papermill' entry: saved from a papermill run")

    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    for i, cell in code:
        if cell.get("outputs"):
            problems.append(f"cell {i}: outputs not cleared")
        if cell.get("execution_count") is not None:
            problems.append(f"cell {i}: execution_count is {cell.execution_count}, not null")
        if "injected-parameters" in cell.metadata.get("tags", []):
            problems.append(f"cell {i}: papermill's injected-parameters cell is committed")
        for what, pattern in FORBIDDEN.items():
            if pattern.search(cell.source):
                problems.append(f"cell {i}: uses {what}")
        try:
            _python(cell.source)
        except SyntaxError as err:
            problems.append(f"cell {i}: syntax error ({err.msg})")
    if problems and any("syntax error" in p for p in problems):
        return problems  # the checks below parse cells
    if len(code) < 3:
        return problems + [f"needs at least 3 code cells (imports, parameters, ..., record), has {len(code)}"]

    tagged = [i for i, c in code if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        problems.append(f"needs exactly one code cell tagged 'parameters', found {len(tagged)}: cells {tagged}")
    elif tagged[0] != code[1][0]:
        problems.append(f"the parameters cell (cell {tagged[0]}) must be the second code cell (cell {code[1][0]})")

    first_i, first = code[0]
    for stmt in _python(first.source).body:
        if not isinstance(stmt, (ast.Import, ast.ImportFrom)) and not _is_magic_call(stmt) \
                and not _is_logging_setup(stmt):
            problems.append(f"cell {first_i}: the first code cell must hold only imports (line {stmt.lineno})")
            break

    if tagged:
        p_i = tagged[0]
        params = nb.cells[p_i]
        names = []
        for n, line in enumerate(params.source.splitlines(), 1):
            if not line.strip() or line.strip().startswith("#"):
                continue
            name, problem = _parameter_line_problem(line)
            if problem:
                problems.append(f"cell {p_i} line {n}: {problem}: {line.strip()!r}")
            else:
                names.append(name)
        # Papermill parses the cell with a regex; a name it cannot see cannot be set.
        seen = [p.name for p in PythonTranslator.inspect(params)]
        missed = sorted(set(names) - set(seen))
        if missed:
            problems.append(
                f"cell {p_i}: papermill cannot parse {missed} (an '=' in the help or value, or a `X | Y` type?)"
            )
        if len(set(names)) != len(names):
            problems.append(f"cell {p_i}: a parameter is defined twice")

    last_i, last = code[-1]
    if not _has_record_call(last.source):
        problems.append(f"cell {last_i}: the last code cell must call record(...)")

    numbers = [int(m) for c in nb.cells if c.cell_type == "markdown" for m in SECTION.findall(c.source)]
    if not numbers:
        problems.append("no numbered markdown sections (e.g. '## 1. Load the data')")
    elif numbers != list(range(1, len(numbers) + 1)):
        problems.append(f"markdown sections are numbered {numbers}, not 1, 2, 3, ...")
    return problems


# --- the kit's notebooks -----------------------------------------------------

_NOTEBOOK_PARAMS = [pytest.param(p, id=p.name) for p in NOTEBOOKS] or [
    pytest.param(None, marks=pytest.mark.skip(reason="no notebooks in notebooks/ yet"), id="none")
]


@pytest.mark.parametrize("path", _NOTEBOOK_PARAMS)
def test_notebook_follows_house_style(path):
    problems = style_problems(nbformat.read(path, as_version=4))
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


# --- the checker itself ------------------------------------------------------


@pytest.fixture
def good():
    return nbformat.read(FIXTURE, as_version=4)


def test_fixture_notebook_passes(good):
    assert style_problems(good) == []


def test_magics_in_the_imports_cell_are_allowed(good):
    good.cells[1].source = "%matplotlib inline\n" + good.cells[1].source
    assert style_problems(good) == []


def _set(index, **fields):
    def change(nb):
        for key, value in fields.items():
            nb.cells[index][key] = value

    return change


def _param_line(line):
    def change(nb):
        nb.cells[2].source += "\n" + line

    return change


def _move_params_after_section(nb):
    nb.cells[2], nb.cells[4] = nb.cells[4], nb.cells[2]


def _tag_second_params(nb):
    nb.cells[4].metadata["tags"] = ["parameters"]


def _kernel(nb):
    nb.metadata.kernelspec.name = "cnclip"


def _renumber(nb):
    nb.cells[5].source = "## 3. Compute"


BROKEN = {
    "outputs": (
        _set(6, outputs=[nbformat.v4.new_output("stream", text="hi")]),
        "cell 6: outputs not cleared",
    ),
    "execution_count": (_set(6, execution_count=3), "cell 6: execution_count is 3"),
    "kernel": (_kernel, "kernelspec name is 'cnclip'"),
    "no_parameters_tag": (lambda nb: nb.cells[2].metadata.pop("tags"), "found 0"),
    "two_parameters_cells": (_tag_second_params, "found 2"),
    "parameters_not_second": (_move_params_after_section, "must be the second code cell"),
    "code_in_imports_cell": (
        _set(1, source="import numpy as np\nnp.random.seed(0)"),
        "must hold only imports (line 2)",
    ),
    "no_annotation": (_param_line("K = 3  # k"), "must be `NAME: type"),
    "no_help": (_param_line("K: int = 3"), "needs a trailing `# help` comment"),
    "empty_help": (_param_line("K: int = 3  #"), "needs a trailing `# help` comment"),
    "not_literal": (_param_line("K: int = 2 ** 3  # k"), "default is not a literal"),
    "two_statements": (_param_line("K: int = 3; J: int = 4  # k"), "must be `NAME: type"),
    "wrong_type": (_param_line('K: int = "3"  # k'), "default '3' is not of type int"),
    "bool_for_int": (_param_line("K: int = True  # k"), "default True is not of type int"),
    "equals_in_help": (_param_line("K: int = 3  # k >= 0"), "papermill cannot parse ['K']"),
    "union_type": (_param_line("K: str | None = None  # k"), "papermill cannot parse ['K']"),
    "duplicate": (_param_line("N: int = 4  # again"), "defined twice"),
    "no_record": (_set(8, source="print(values)"), "cell 8: the last code cell must call record"),
    "pip": (_set(6, source="!pip install faiss-cpu"), "cell 6: uses !pip"),
    "percent_pip": (_set(6, source="%pip install faiss-cpu"), "cell 6: uses %pip"),
    "cd": (_set(6, source="%cd ..\nx = 1"), "cell 6: uses %cd"),
    "sys_path": (_set(1, source="import sys\nsys.path.insert(0, '..')"), "cell 1: uses sys.path"),
    "chdir": (_set(6, source="import os\nos.chdir('/tmp')"), "cell 6: uses os.chdir"),
    "syntax": (_set(6, source="def f(:\n    pass"), "cell 6: syntax error"),
    "sections_misnumbered": (_renumber, "numbered [1, 3, 3]"),
    "no_sections": (
        lambda nb: [c.update(source="Some text") for c in nb.cells if c.cell_type == "markdown"],
        "no numbered markdown sections",
    ),
}


@pytest.mark.parametrize("name", BROKEN)
def test_checker_flags(good, name):
    change, expected = BROKEN[name]
    nb = copy.deepcopy(good)
    change(nb)
    problems = style_problems(nb)
    assert any(expected in p for p in problems), problems
