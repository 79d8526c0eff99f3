"""The benchmark scripts run end to end in their quick modes and report what they promise (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, cwd: Path) -> None:
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_query_latency_reports_every_backend_model_and_smaller_sides(tmp_path):
    out = tmp_path / "latency.json"
    _run("query_latency.py", "--preset", "tiny,demo-resnet", "--gallery", "500", "--queries", "1", "--repeats", "1",
         "--no-compile", "--sides", "16", "--gap-ms", "0", "--work-dir", str(tmp_path / "work"),
         "--out", str(out), cwd=tmp_path)
    report = json.loads(out.read_text(encoding="utf-8"))
    backends = ([f"tiny · {b}" for b in ("torch", "torch-bf16", "onnx-fp32", "onnx-int8", "onnx-int8-static",
                                         "onnx-int8 @16px")]
                + [f"demo-resnet · {b}" for b in ("torch", "onnx-fp32", "onnx-int8", "onnx-int8-static")])
    assert [(r["query"], r["backend"]) for r in report["rows"]] == [(q, b) for q in ("800×800", "1920×1080")
                                                                    for b in backends]
    for row in report["rows"]:
        assert row["n"] == 1 and row["rss_mb"] > 0 and row["rss_now_mb"] > 0
        assert row["total"]["p50"] >= row["encode"]["p50"] > 0
        if row["backend"] == "tiny · torch":
            assert row["speedup"] == 1.0
    assert report["side_exports"]["16"]["resolution"] == 16 and report["export"]["resolution"] == 32
    assert report["side_exports"]["16"]["int8"]["kept"]
    # Each model's export measured both int8 methods; the ONNX processes never imported torch.
    assert report["exports"]["demo-resnet"]["resolution"] == 64
    assert all(set(e["int8_methods"]) == {"dynamic", "static"} for e in report["exports"].values())
    assert report["torch_free"] and all(report["torch_free"].values())
    text = report["markdown"]
    assert "a model at its own trained resolution" in text and "at any input side" in text
    assert "16 px: 5 tokens instead of 17" in text and "onnx-int8-static" in text


@pytest.mark.slow
def test_resolution_quality_trains_each_side_and_evaluates_resized_students(tmp_path):
    out = tmp_path / "quality.json"
    _run("resolution_quality.py", "--sides", "64,48", "--seeds", "1", "--epochs", "1", "--teacher", "random:preset:tiny",
         "--work-dir", str(tmp_path / "work"), "--out", str(out), cwd=tmp_path)
    report = json.loads(out.read_text(encoding="utf-8"))
    runs = {(r["side"], r["variant"]): r for r in report["runs"]}
    assert set(runs) == {(64, "finetune"), (64, "kd-feature"), (48, "finetune"), (48, "kd-feature"),
                         (48, "finetune (resized only)"), (48, "kd-feature (resized only)")}
    assert all(0 <= r["p@10"] <= 1 and 0 <= r["map@10"] <= 1 for r in report["runs"])
    assert runs[(48, "finetune")]["trained_at"] == 48 and runs[(48, "finetune (resized only)")]["trained_at"] == 64
    assert runs[(48, "finetune (resized only)")]["checkpoint"] == runs[(64, "finetune")]["checkpoint"]
    assert "| 48 px | 37 |" in report["markdown"]


@pytest.mark.slow
def test_kd_demo_reports_every_seed_and_the_margin(tmp_path):
    out = tmp_path / "kd.json"
    _run("kd_demo.py", "--seeds", "2", "--losses", "relation", "--epochs", "1", "--views", "1",
         "--teacher", "random:preset:tiny", "--work-dir", str(tmp_path / "work"), "--out", str(out), cwd=tmp_path)
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [(r["seed"], r["variant"]) for r in report["runs"]] == [(1, "finetune"), (1, "relation"),
                                                                   (2, "finetune"), (2, "relation")]
    assert report["recipe"]["augment_views"] == 1 and report["recipe"]["teacher_model_name"] == "random:preset:tiny"
    for r in report["runs"]:
        assert all(0 <= r[split][k] <= 1 for split in ("test", "valid") for k in ("p@10", "map@10"))
    text = report["markdown"]
    assert "| + KD relation |" in text and "mean gap - 3 sd" in text and " ± " in text
