"""Tests of cnclip_kd.notebook.records and the papermill notebook harness."""

import json
import logging
import math
import os
from pathlib import Path

import nbformat
import numpy as np
import pytest
import IPython
import IPython.display
from IPython.core.formatters import DisplayFormatter

from cnclip_kd.notebook.records import RECORD_MIME, read_records, record
from notebook_harness import REPO_ROOT, kernel_env, resolve_notebook, run_notebook

DEMO = "tests/fixtures/record_demo.ipynb"


# --- record / read_records without a kernel ---------------------------------


@pytest.fixture
def displayed(monkeypatch):
    """Pretend to be in IPython; collect the MIME bundles ``record`` displays.

    IPython's own DisplayFormatter makes the bundles, but no shell is created
    (a shell would change ``__main__`` and builtins for the rest of the run).
    """
    bundles = []
    formatter = DisplayFormatter()
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    monkeypatch.setattr(IPython.display, "display", lambda obj: bundles.append(formatter.format(obj)[0]))
    return bundles


def _notebook_with_outputs(*bundles):
    outputs = [nbformat.v4.new_output("display_data", data=b) for b in bundles]
    cell = nbformat.v4.new_code_cell("record(...)", outputs=outputs, execution_count=1)
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# t"), cell])


def test_record_displays_mime_bundle_that_round_trips_through_ipynb(displayed, tmp_path):
    record(
        f32=np.float32(0.25),
        i64=np.int64(7),
        flag=np.bool_(True),
        arr=np.arange(6).reshape(2, 3),
        farr=np.array([0.5, 1.5], dtype=np.float64),
        pair=(1, "a"),
        nested={"k": [np.float64(2.0), None]},
        path=tmp_path / "x.txt",
        text="中文",
    )
    assert len(displayed) == 1
    bundle = displayed[0]
    assert set(bundle) == {RECORD_MIME, "text/plain", "text/html"}
    assert "f32: " in bundle["text/plain"] and "<table>" in bundle["text/html"]

    nb_path = tmp_path / "executed.ipynb"
    nbformat.write(_notebook_with_outputs(bundle), nb_path)
    rec = read_records(nb_path)
    assert rec == {
        "f32": 0.25,
        "i64": 7,
        "flag": True,
        "arr": [[0, 1, 2], [3, 4, 5]],
        "farr": [0.5, 1.5],
        "pair": [1, "a"],
        "nested": {"k": [2.0, None]},
        "path": str(tmp_path / "x.txt"),
        "text": "中文",
    }
    assert type(rec["i64"]) is int and type(rec["flag"]) is bool and type(rec["nested"]) is dict


def test_record_accepts_torch_tensors(displayed):
    torch = pytest.importorskip("torch")
    record(loss=torch.tensor(1.5), emb=torch.ones(2, 2, requires_grad=True).sum(0))
    assert displayed[0][RECORD_MIME] == {"loss": 1.5, "emb": [2.0, 2.0]}


def test_record_stores_non_finite_floats_as_null_and_warns(displayed, caplog):
    with caplog.at_level(logging.WARNING, logger="cnclip_kd.notebook.records"):
        record(loss=float("nan"), worst=np.float32("-inf"), ok=1.0)
    data = displayed[0]
    assert data[RECORD_MIME] == {"loss": None, "worst": None, "ok": 1.0}
    assert "nan" in data["text/plain"]  # humans still see the real value
    assert "loss is nan" in caplog.text and "worst is -inf" in caplog.text


@pytest.mark.parametrize(
    "values, message",
    [({"model": object()}, "model has type object"), ({"d": {1: 2}}, "d has a non-string key 1")],
)
def test_record_rejects_values_json_cannot_hold(values, message):
    with pytest.raises(TypeError, match=message):
        record(**values)


def test_record_outside_ipython_only_logs(caplog):
    assert IPython.get_ipython() is None
    with caplog.at_level(logging.INFO, logger="cnclip_kd.notebook.records"):
        assert record(acc=np.float64(0.5)) is None
    assert '"acc": 0.5' in caplog.text


def test_read_records_merges_outputs_in_order_and_ignores_others():
    nb = _notebook_with_outputs(
        {RECORD_MIME: {"a": 1, "b": 2}, "text/plain": "x"},
        {"text/plain": "not a record", "application/json": {"a": 99}},
        {RECORD_MIME: json.dumps({"b": 3, "c": [1]})},  # stored as a string by some writers
    )
    nb.cells.append(nbformat.v4.new_code_cell("pass"))  # no outputs
    assert read_records(nb) == {"a": 1, "b": 3, "c": [1]}
    assert read_records(nbformat.v4.new_notebook()) == {}


# --- the papermill harness ---------------------------------------------------


@pytest.mark.notebook
def test_run_notebook_returns_recorded_values(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "original-home"))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    rec = run_notebook(DEMO, tmp_path, {"N": 4, "LABEL": "演示 'quoted'"}, timeout=120)

    assert rec["n_squared"] == 16
    assert rec["values"] == [0.0, 0.5, 1.0, 1.5]
    assert math.isclose(rec["total"], 3.0)
    assert rec["label"] == "演示 'quoted'"
    # The kernel ran in tmp_path (relative OUT_DIR landed there) ...
    out_file = tmp_path / "out" / "values.txt"
    assert rec["out_file"] == str(out_file.resolve())
    assert np.loadtxt(out_file).tolist() == [0.0, 0.5, 1.0, 1.5]
    # ... imported this checkout's package, found the sample data without relying on cwd,
    assert rec["package_dir"] == str(REPO_ROOT / "cnclip_kd")
    assert rec["sample_data_found"] is True
    # ... with a throw-away HOME and a headless matplotlib backend.
    assert rec["home"] == kernel_env(tmp_path)["HOME"]
    assert rec["mpl_backend"].lower() == "agg"
    assert (tmp_path / "record_demo.executed.ipynb").is_file()
    # The test process's own environment is back as it was.
    assert os.environ["HOME"] == str(tmp_path / "original-home")
    assert "MPLBACKEND" not in os.environ


def test_kernel_env_extra_variables_win(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    env = kernel_env(tmp_path, {"MPLBACKEND": "pdf", "MODELSCOPE_CACHE": tmp_path / "ms"})
    assert env["MPLBACKEND"] == "pdf" and env["MODELSCOPE_CACHE"] == str(tmp_path / "ms")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO_ROOT), "/somewhere"]
    assert Path(env["IPYTHONDIR"]).is_dir() and Path(env["HOME"]).parent == tmp_path / "_env"


def test_unknown_parameter_fails_before_execution(tmp_path):
    with pytest.raises(pytest.fail.Exception) as info:
        run_notebook(DEMO, tmp_path, {"N": 2, "NUMBER": 5, "SCALLE": 1.0})
    message = str(info.value)
    assert "unknown parameter(s) ['NUMBER', 'SCALLE']" in message
    assert "['LABEL', 'N', 'OUT_DIR', 'SCALE']" in message
    assert not (tmp_path / "record_demo.executed.ipynb").exists()


def test_parameters_for_a_notebook_without_parameters_cell_fail(tmp_path):
    nb = nbformat.read(REPO_ROOT / DEMO, as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("tags", None)
    path = tmp_path / "no_params.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(pytest.fail.Exception, match="has no parameters"):
        run_notebook(path, tmp_path, {"N": 1})


@pytest.mark.notebook
def test_failing_cell_reports_cell_index_and_traceback(tmp_path):
    with pytest.raises(pytest.fail.Exception) as info:
        run_notebook(DEMO, tmp_path, {"N": -1}, timeout=120)
    message = str(info.value)
    # Cell 4 of the source notebook (papermill's injected cell shifts it to 5 in the output).
    assert "record_demo.ipynb failed in cell 4 " in message
    assert "ValueError: N must be >= 0, got -1" in message
    assert 'raise ValueError(f"N must be >= 0, got {N}")' in message  # the cell source
    assert "Traceback" in message or "----> " in message  # the traceback text
    assert "\x1b[" not in message  # ANSI colours stripped


def test_non_plain_parameter_values_are_refused(tmp_path):
    with pytest.raises(TypeError, match="parameter N: object"):
        run_notebook(DEMO, tmp_path, {"N": object()})


def test_resolve_notebook(tmp_path):
    assert resolve_notebook(DEMO) == REPO_ROOT / DEMO
    assert resolve_notebook(DEMO[: -len(".ipynb")]) == REPO_ROOT / DEMO
    assert resolve_notebook(REPO_ROOT / DEMO) == REPO_ROOT / DEMO
    with pytest.raises(pytest.fail.Exception, match=r"notebook 99_missing not found; tried: .*notebooks/99_missing.ipynb"):
        resolve_notebook("99_missing")


def test_notebook_runner_fixture_checks_parameters(notebook_runner):
    with pytest.raises(pytest.fail.Exception, match=r"unknown parameter\(s\) \['NOPE'\]"):
        notebook_runner(DEMO, {"NOPE": 1})
