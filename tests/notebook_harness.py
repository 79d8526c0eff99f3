"""Run a kit notebook headless with papermill and return what it recorded.

Used by the notebook tests (through the ``notebook_runner`` fixture in
``conftest.py``) and usable directly::

    from notebook_harness import run_notebook
    rec = run_notebook("03_index.ipynb", tmp_path, {"N_IMAGES": 40})
    assert rec["recall_at_10"] > 0.5

Choices made here (the notebooks may rely on them, and on nothing else):

* **Working directory = ``tmp_path``.**  A relative output path in a
  notebook's parameters (``OUT_DIR: str = "out"``) lands in the test's temp
  dir, never in the checkout.  A notebook must therefore not find the sample
  data through the working directory: it uses ``cnclip_kd.SAMPLE_DATA``.
* **This checkout's ``cnclip_kd`` is imported**, installed or not: the repo
  root is put first on the kernel's ``PYTHONPATH`` (in the harness, so the
  notebooks need no ``sys.path`` edits).
* **An isolated, headless kernel**: ``HOME``, ``IPYTHONDIR``,
  ``MPLCONFIGDIR``, ``JUPYTER_{CONFIG,DATA,RUNTIME}_DIR`` and
  ``XDG_{CACHE,CONFIG}_HOME`` point into ``tmp_path/_env`` and
  ``MPLBACKEND=Agg``.  Papermill starts the kernel as a subprocess that
  inherits ``os.environ``, so these are set on ``os.environ`` for the run and
  restored afterwards.  Consequence: caches under ``~`` (ModelScope, torch
  hub, Hugging Face) are empty in the kernel; a test that needs one passes
  ``env={...}``.
* The executed notebook is kept at ``tmp_path/<stem>.executed.ipynb``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import nbformat
import papermill
import pytest
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from papermill.exceptions import PapermillExecutionError

from cnclip_kd.notebook.demo import notebook_literal
from cnclip_kd.notebook.records import read_records

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
KERNEL_NAME = "python3"

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def resolve_notebook(name_or_path: Union[str, os.PathLike]) -> Path:
    """Find a notebook by name (``notebooks/<name>``, ``.ipynb`` optional) or path.

    Args:
        name_or_path: ``"01_prepare_data"``, ``"01_prepare_data.ipynb"``, a
            path relative to the repo root, or an absolute path.

    Returns:
        The notebook's absolute path.
    """
    p = Path(name_or_path)
    candidates = [p] if p.is_absolute() else [NOTEBOOKS_DIR / p, REPO_ROOT / p]
    if p.suffix != ".ipynb":
        candidates = [c.with_name(c.name + ".ipynb") for c in candidates] + candidates
    for c in candidates:
        if c.is_file():
            return c
    pytest.fail(f"notebook {name_or_path!s} not found; tried: {', '.join(map(str, candidates))}", pytrace=False)


def _display_path(path: Path) -> str:
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def check_parameters(notebook: Path, parameters: Mapping[str, Any]) -> None:
    """Fail the test if ``parameters`` names anything the parameters cell lacks.

    Papermill itself only logs a warning for an unknown name and runs the
    notebook with its default, which hides typos in tests.

    Args:
        notebook: Path of the notebook.
        parameters: Names the test wants to set.
    """
    if not parameters:
        return
    known = papermill.inspect_notebook(str(notebook))
    if not known:
        pytest.fail(
            f"{_display_path(notebook)} has no parameters (no cell tagged 'parameters', or none parsed), "
            f"but the test passes {sorted(parameters)}",
            pytrace=False,
        )
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        pytest.fail(
            f"{_display_path(notebook)}: unknown parameter(s) {unknown}; "
            f"its parameters cell defines {sorted(known)}",
            pytrace=False,
        )


def kernel_env(tmp_path: Path, extra: Optional[Mapping[str, str]] = None) -> dict:
    """The environment variables :func:`run_notebook` sets for the kernel.

    Args:
        tmp_path: The test's temp dir; the throw-away dirs go under ``_env``.
        extra: Variables to set on top (they win).

    Returns:
        Variable name to value.
    """
    base = Path(tmp_path) / "_env"
    env = {
        "HOME": base / "home",
        "IPYTHONDIR": base / "ipython",
        "MPLCONFIGDIR": base / "matplotlib",
        "JUPYTER_CONFIG_DIR": base / "jupyter" / "config",
        "JUPYTER_DATA_DIR": base / "jupyter" / "data",
        "JUPYTER_RUNTIME_DIR": base / "jupyter" / "runtime",
        "XDG_CACHE_HOME": base / "cache",
        "XDG_CONFIG_HOME": base / "config",
    }
    for d in env.values():
        d.mkdir(parents=True, exist_ok=True)
    env = {k: str(v) for k, v in env.items()}
    env["MPLBACKEND"] = "Agg"
    pythonpath = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def _source_cell_index(executed_index: int, source_nb, injected: bool) -> Optional[int]:
    """Map a cell index of the executed notebook back to the source notebook.

    Papermill inserts an ``injected-parameters`` cell after the parameters
    cell (at the top if there is none) unless the source already has one.
    Returns None for the injected cell itself.
    """
    tags = [c.get("metadata", {}).get("tags", []) for c in source_nb.cells]
    if not injected or any("injected-parameters" in t for t in tags):
        return executed_index
    param_idx = next((i for i, t in enumerate(tags) if "parameters" in t), -1)
    injected_at = param_idx + 1
    if executed_index == injected_at:
        return None
    return executed_index - 1 if executed_index > injected_at else executed_index


def _failure_message(err: PapermillExecutionError, notebook: Path, output: Path, injected: bool) -> str:
    source_nb = nbformat.read(notebook, as_version=4)
    idx = _source_cell_index(err.cell_index, source_nb, injected)
    where = "the injected parameters cell" if idx is None else f"cell {idx} (0-based, markdown cells counted)"
    source = err.source if len(err.source) < 2000 else err.source[:2000] + "\n..."
    traceback = _ANSI.sub("", "\n".join(err.traceback)) or f"{err.ename}: {err.evalue}"
    return (
        f"{_display_path(notebook)} failed in {where}, In [{err.exec_count}]: {err.ename}: {err.evalue}\n"
        f"--- cell source ---\n{source}\n"
        f"--- traceback ---\n{traceback}\n"
        f"--- executed notebook: {output}"
    )


def run_notebook(
    name_or_path: Union[str, os.PathLike],
    tmp_path: Path,
    parameters: Optional[Mapping[str, Any]] = None,
    *,
    timeout: int = 600,
    env: Optional[Mapping[str, str]] = None,
) -> dict:
    """Execute a notebook with papermill and return the values it recorded.

    Args:
        name_or_path: Notebook name under ``notebooks/`` or a path (see
            :func:`resolve_notebook`).
        tmp_path: Working directory of the run; also holds the executed
            notebook and the kernel's throw-away HOME etc.
        parameters: Values for names in the notebook's parameters cell.
            Paths become strings, tuples lists.  An unknown name fails the
            test before anything runs.
        timeout: Seconds one cell may run before the test fails.
        env: Extra environment variables for the kernel.

    Returns:
        ``cnclip_kd.notebook.records.read_records`` of the executed notebook.
    """
    notebook = resolve_notebook(name_or_path)
    params = {name: notebook_literal(value, f"parameter {name}") for name, value in (parameters or {}).items()}
    check_parameters(notebook, params)

    tmp_path = Path(tmp_path)
    output = tmp_path / f"{notebook.stem}.executed.ipynb"
    failure = None
    with pytest.MonkeyPatch.context() as mp:
        for key, value in kernel_env(tmp_path, env).items():
            mp.setenv(key, value)
        try:
            papermill.execute_notebook(
                str(notebook),
                str(output),
                parameters=params,
                kernel_name=KERNEL_NAME,
                cwd=str(tmp_path),
                progress_bar=False,
                execution_timeout=timeout,
                start_timeout=60,
            )
        except PapermillExecutionError as err:
            failure = _failure_message(err, notebook, output, injected=bool(params))
        except CellTimeoutError as err:
            failure = f"{_display_path(notebook)}: a cell ran longer than {timeout} s\n{err}"
        except DeadKernelError as err:
            failure = f"{_display_path(notebook)}: the kernel died (out of memory?)\n{err}"
    if failure:
        # Outside the except blocks, so pytest does not print papermill's exception chain again.
        pytest.fail(failure, pytrace=False)
    return read_records(output)
