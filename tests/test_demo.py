"""`cnclip-kd demo`: notebooks 01–06 in one command, resumable, its summary read from what the notebooks recorded.

One demo run (the ``tiny`` preset, a few minutes on 2 cores) is shared by the module; the tests after the first
rerun it in the same folder, in file order: a rerun that skips everything, a deleted output, a failing notebook
and the rerun after the fix (which leaves the folder complete again).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from PIL import Image

from cnclip_kd import cli
from cnclip_kd.notebook.demo import (NOTEBOOKS, NOTEBOOKS_DIR, STATE_FILE, SUMMARY_FILE, DemoError, parse_overrides,
    run_demo)
from cnclip_kd.notebook.records import read_records


@pytest.fixture(scope="module")
def kernel_environment(tmp_path_factory):
    """The harness's isolated kernel environment (throw-away HOME, IPython and Jupyter dirs) for the module.

    One torch thread per kernel: on 2 cores shared with other work, torch's thread pool made notebook 02's tiny
    comparison runs ~10x slower (99 s against 9 s with one thread, measured here).
    """
    from notebook_harness import kernel_env

    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in kernel_env(tmp_path_factory.mktemp("demo-env"), env).items():
            mp.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, kernel_environment):
    """``run_demo(out, "tiny")`` once: (out folder, summary, progress lines)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    lines: list[str] = []
    summary = run_demo(out, "tiny", progress=lines.append, timeout=600)
    return out, summary, lines


def _executed(out: Path, name: str) -> Path:
    return out / "notebooks" / f"{name}.ipynb"


def _mtimes(out: Path) -> dict:
    return {name: _executed(out, name).stat().st_mtime_ns for name in NOTEBOOKS}


def _state(out: Path) -> dict:
    return json.loads((out / STATE_FILE).read_text(encoding="utf-8"))


def _demo_cli(out: Path, *extra: str) -> int:
    return cli.main(["demo", "--out", str(out), "--preset", "tiny", *extra])


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.mark.notebook
@pytest.mark.slow
def test_demo_runs_the_notebooks_in_order_and_summarises_what_they_recorded(demo_run):
    out, summary, lines = demo_run
    out = out.resolve()

    # A start line and a "done in N s" line per notebook, in order, then the total.
    expected = []
    for i, name in enumerate(NOTEBOOKS, 1):
        expected += [rf"\[{i}/6\] {name}: running \.\.\.", rf"\[{i}/6\] {name}: done in \d+\.\d s"]
    assert len(lines) == 13 and all(re.fullmatch(p, line) for p, line in zip(expected, lines)), lines
    assert re.fullmatch(r"all 6 notebooks finished in \d+\.\d s", lines[-1])
    assert [n.name for n in summary.notebooks] == list(NOTEBOOKS)
    assert {n.status for n in summary.notebooks} == {"ran"}
    # Each time is rounded to 0.1 s: the total may fall short of the rounded parts by their rounding.
    assert summary.total_s >= sum(n.elapsed_s for n in summary.notebooks) - 0.05 * (len(summary.notebooks) + 1)

    # The very notebooks, executed into OUT/notebooks with their outputs, sharing one OUTPUT_DIR; the tiny preset's
    # parameters on top of their defaults.
    records = {}
    for name in NOTEBOOKS:
        nb = nbformat.read(_executed(out, name), as_version=4)
        params = nb.metadata.papermill.parameters
        assert params["OUTPUT_DIR"] == str(out), name
        records[name] = read_records(_executed(out, name))
        assert records[name], f"{name}: nothing recorded"
        source = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
        assert [c.source for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])] == \
            [c.source for c in source.cells]
    assert nbformat.read(_executed(out, "02_distill"), as_version=4).metadata.papermill.parameters["PRESET"] == "tiny"
    figures_embedded = [o for c in nbformat.read(_executed(out, "04_visualize_top10"), as_version=4).cells
                        for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert figures_embedded, "the executed notebook 04 shows no figure"

    # Notebooks 03 and 06 index and deploy the student notebook 02 distilled (not merely the newest run).
    rec02, rec03, rec04, rec06 = (records[n] for n in ("02_distill", "03_build_index", "04_visualize_top10",
                                                        "06_deploy_cpu"))
    assert rec02["checkpoint"].endswith("tiny-kd-relation/checkpoints/epoch_latest.pt")
    assert rec03["spec"] == rec06["checkpoint"] == rec02["checkpoint"]

    # The summary is what the notebooks recorded: notebook 02's table (teacher, fine-tune, each KD loss) ...
    assert summary.comparison == rec02["comparison"]
    assert [r["kd_loss"] for r in summary.comparison] == ["-", "-", "cosine", "feature", "relation", "relation",
                                                           "relation"]
    assert summary.comparison[0]["model"].startswith("teacher") and "fine-tuned" in summary.comparison[1]["model"]
    assert "(inductive)" in summary.comparison[5]["model"] and "transductive" in summary.comparison[6]["model"]
    chance, teacher = summary.comparison[0]["chance"], summary.comparison[0]["p@10"]  # the share of the teacher's
    assert 0 < chance < 1 and all(r["chance"] == chance for r in summary.comparison)  # margin over chance, per row
    for r in summary.comparison:  # (a random tiny teacher may sit at chance: then there is no margin, None)
        if teacher > chance:
            assert r["share"] == pytest.approx((r["p@10"] - chance) / (teacher - chance))
        else:
            assert r["share"] is None
    # ... the figures (they exist and are PNGs) ...
    assert summary.curves == rec02["curves"]
    assert summary.top10_figures == rec04["figures"] and set(summary.top10_figures) == {"tiny-kd-relation",
                                                                                        "tiny-finetune"}
    assert summary.text_top10_figures == rec04["text_figures"] and summary.text_query == rec04["text_query"]
    assert summary.deploy_figures == [rec06["figure"], rec06["text_figure"]]
    for path in [summary.curves, *summary.top10_figures.values(), *summary.text_top10_figures.values(),
                 *summary.deploy_figures]:
        assert Path(path).parent == out / "figures"
        with Image.open(path) as png:
            assert png.format == "PNG"
    # ... and the deployed encoders with their measured latency rows.
    assert (summary.encoder, summary.backend) == (rec06["encoder"], rec06["backend"]) and Path(summary.encoder).is_file()
    assert Path(summary.encoder).parent == out / "deploy"
    assert summary.latency in rec06["latency"] and summary.latency["backend"].startswith(rec06["backend"])
    assert summary.text_latency in rec06["text_latency"] and summary.text_latency["backend"] == rec06["text_backend"]
    assert 0 < summary.latency["total"]["p50"] <= summary.latency["total"]["p95"]

    # The printed summary shows those numbers, and OUT/demo-summary.json holds them.
    text = summary.to_text()
    for row in summary.comparison:
        assert f"{row['p@10']:.3f}" in text and f"{row['map@10']:.3f}" in text
    assert f"p50 {summary.latency['total']['p50']:.1f} ms" in text and summary.encoder in text
    assert all(path in text for path in summary.top10_figures.values()) and summary.curves in text
    assert json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8")) == json.loads(json.dumps(summary.to_dict()))

    state = _state(out)
    assert state["preset"] == "tiny" and [state["notebooks"][n]["status"] for n in NOTEBOOKS] == ["done"] * 6


@pytest.mark.notebook
@pytest.mark.slow
def test_rerun_skips_every_notebook(demo_run, capsys):
    out, summary, _ = demo_run
    before, state = _mtimes(out), _state(out)
    capsys.readouterr()

    t0 = time.monotonic()
    assert _demo_cli(out) == 0
    elapsed = time.monotonic() - t0
    stdout = capsys.readouterr().out

    assert elapsed < 30, f"a rerun with nothing to do took {elapsed:.1f} s"
    for i, name in enumerate(NOTEBOOKS, 1):
        assert re.search(rf"^\[{i}/6\] {name}: skipped, up to date \(ran .* in \d+\.\d s\)$", stdout, re.MULTILINE), stdout
    assert "running" not in stdout
    assert _mtimes(out) == before and _state(out)["notebooks"] == state["notebooks"]
    # The same summary, from the same recorded results.
    rerun = json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
    assert rerun["comparison"] == summary.comparison and rerun["latency"] == summary.latency
    assert [n["status"] for n in rerun["notebooks"]] == ["skipped"] * 6
    assert f"{summary.comparison[-1]['p@10']:.3f}" in stdout and "(0 run, 6 skipped)" in stdout


@pytest.mark.notebook
@pytest.mark.slow
def test_another_preset_in_the_same_folder_is_refused(demo_run):
    out, _, _ = demo_run
    before = _snapshot(out / "notebooks"), _state(out)
    with pytest.raises(DemoError, match="preset 'tiny', not 'demo'"):
        run_demo(out, "demo")
    assert (_snapshot(out / "notebooks"), _state(out)) == before


@pytest.mark.notebook
@pytest.mark.slow
def test_a_deleted_output_reruns_its_notebook_only(demo_run, capsys):
    out, _, _ = demo_run
    figure = Path(read_records(_executed(out, "01_prepare_data"))["figure"])
    figure.unlink()
    before = _mtimes(out)
    capsys.readouterr()

    assert _demo_cli(out) == 0
    stdout = capsys.readouterr().out
    assert re.search(rf"^\[1/6\] 01_prepare_data: running \(1 output\(s\) missing, e\.g\. {re.escape(str(figure))}\)",
                     stdout, re.MULTILINE), stdout
    assert figure.is_file()
    # Its inputs did not change, so the notebooks after it stay as they were.
    assert stdout.count("skipped, up to date") == 5
    after = _mtimes(out)
    assert after["01_prepare_data"] > before["01_prepare_data"]
    assert {n: after[n] for n in NOTEBOOKS[1:]} == {n: before[n] for n in NOTEBOOKS[1:]}


@pytest.mark.notebook
@pytest.mark.slow
def test_a_failing_notebook_stops_the_run_and_a_rerun_continues_from_it(demo_run, capsys):
    out, _, _ = demo_run
    before, state = _mtimes(out), _state(out)
    # The cell of notebook 04 that checks QUERY (index as in the source notebook, markdown cells counted).
    cells = nbformat.read(NOTEBOOKS_DIR / "04_visualize_top10.ipynb", as_version=4).cells
    (index,) = [i for i, c in enumerate(cells) if "is outside the gallery" in c.source]
    first_line = cells[index].source.splitlines()[0]
    capsys.readouterr()

    assert _demo_cli(out, "-p", "04.QUERY=100000") == 1
    captured = capsys.readouterr()
    err = captured.err
    assert "04_visualize_top10.ipynb failed in cell" in err and f"cell {index} " in err and first_line in err
    assert "ValueError: QUERY 100000 is outside the gallery" in err
    assert str(_executed(out, "04_visualize_top10")) in err and "Traceback" not in err
    assert err.count("cnclip-kd demo: error:") == 1
    # 01–03 skipped, 04 failed, 05 and 06 never started.
    assert captured.out.count("skipped, up to date") == 3 and "04_visualize_top10: FAILED after" in captured.out
    assert "05_query_demo" not in captured.out and "06_deploy_cpu" not in captured.out
    failed = _state(out)
    assert failed["notebooks"]["04_visualize_top10"]["status"] == "failed"
    assert "QUERY 100000" in failed["notebooks"]["04_visualize_top10"]["error"]
    assert {n: failed["notebooks"][n] for n in NOTEBOOKS if n != "04_visualize_top10"} == \
        {n: state["notebooks"][n] for n in NOTEBOOKS if n != "04_visualize_top10"}
    after = _mtimes(out)
    assert {n: after[n] for n in NOTEBOOKS[4:]} == {n: before[n] for n in NOTEBOOKS[4:]}
    # The executed copy shows the error where it happened.
    errors = [o for c in nbformat.read(_executed(out, "04_visualize_top10"), as_version=4).cells
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert [e["ename"] for e in errors] == ["ValueError"]

    # Fixed (the bad value dropped): 04 runs again, and 05–06, whose inputs are unchanged, are skipped.
    assert _demo_cli(out) == 0
    stdout = capsys.readouterr().out
    assert re.search(r"^\[4/6\] 04_visualize_top10: done in", stdout, re.MULTILINE), stdout
    assert stdout.count("skipped, up to date") == 5
    assert read_records(_executed(out, "04_visualize_top10"))["query_row"] == 0
    assert [_state(out)["notebooks"][n]["status"] for n in NOTEBOOKS] == ["done"] * 6


def test_a_foreign_out_folder_is_refused_and_left_untouched(tmp_path):
    foreign = tmp_path / "my-results"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "notes.txt").write_text("keep me", encoding="utf-8")
    (foreign / "sub" / "table.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    before = _snapshot(foreign)

    proc = subprocess.run([sys.executable, "-m", "cnclip_kd.cli", "demo", "--out", str(foreign)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "is not a `cnclip-kd demo` output" in proc.stderr and str(foreign) in proc.stderr
    assert "notes.txt" in proc.stderr and "nothing was changed" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert _snapshot(foreign) == before

    # A file is refused too; an unreadable state file is not taken for a demo folder.
    with pytest.raises(DemoError, match="is a file, not a folder"):
        run_demo(foreign / "notes.txt", "tiny")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / STATE_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(DemoError, match=f"{STATE_FILE} cannot be read"):
        run_demo(tmp_path / "broken", "tiny")
    assert _snapshot(foreign) == before and (tmp_path / "broken" / STATE_FILE).read_text() == "{not json"


def test_parameters_are_typed_and_checked_before_anything_is_written(tmp_path, capsys):
    assert parse_overrides(["02.MAX_EPOCHS=3", "04_visualize_top10.MODELS=[\"a\", \"b\"]", "03.COMPARE=false",
                            "06_deploy_cpu.ipynb.TEXT_QUERY=白色 连衣裙", "THREADS=1"]) == {
        "02_distill": {"MAX_EPOCHS": 3}, "04_visualize_top10": {"MODELS": ["a", "b"]},
        "03_build_index": {"COMPARE": False}, "06_deploy_cpu": {"TEXT_QUERY": "白色 连衣裙", "THREADS": 1}}
    # A bare NAME sets it in every notebook that has it.
    assert set(parse_overrides(["K=5"])) == {"03_build_index", "04_visualize_top10", "05_query_demo", "06_deploy_cpu"}
    for item, message in [("02.MAX_EPOCHS=two", "not a valid int"), ("02.EPOCHS=3", "has no parameter 'EPOCHS'"),
                          ("09.K=1", "unknown notebook '09'"), ("NOPE=1", "no notebook has a parameter 'NOPE'"),
                          ("02.MAX_EPOCHS", "expected NOTEBOOK.NAME=VALUE"), ("04.MODELS={}", "expected a JSON list")]:
        with pytest.raises(DemoError, match=re.escape(message)):
            parse_overrides([item])

    new = tmp_path / "new"
    with pytest.raises(DemoError, match=r"02_distill\.ipynb: unknown parameter\(s\) \['EPOCHS'\]"):
        run_demo(new, "tiny", {"02": {"EPOCHS": 3}})
    with pytest.raises(DemoError, match="unknown preset 'huge'"):
        run_demo(new, "huge")
    assert _demo_cli(new, "-p", "OUTPUT_DIR=elsewhere") == 1
    assert "pass --out instead" in capsys.readouterr().err
    assert not new.exists()


def test_every_demo_preset_sets_parameters_its_notebooks_have_and_a_known_training_preset():
    import papermill

    from cnclip_kd.notebook.demo import PRESETS
    from cnclip_kd.notebook.experiments import PRESET_DEFAULTS

    assert {"demo", "demo-long", "demo-pretrained", "demo-scratch", "tiny"} <= set(PRESETS)
    for name, per_notebook in PRESETS.items():
        for notebook, params in per_notebook.items():
            known = papermill.inspect_notebook(str(NOTEBOOKS_DIR / f"{notebook}.ipynb"))
            assert set(params) <= set(known), (name, notebook)
        assert per_notebook.get("02_distill", {}).get("PRESET", "demo") in PRESET_DEFAULTS, name
