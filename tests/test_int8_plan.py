"""Static int8 (calibrated QDQ) beside dynamic int8, the rule that keeps the fastest within tolerance,
and the latency-budget planner (``cnclip-kd plan``) on the small presets."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from cnclip_kd.cli import main as cli_main
from cnclip_kd.deploy.backends import OnnxEncoder
from cnclip_kd.deploy.export import export_onnx, quantize_image_onnx
from cnclip_kd.deploy.planner import BACKENDS, Candidate, cpu_features, plan, synthetic_index
from cnclip_kd.deploy.quantize import INT8_METHODS, choose_int8, int8_path, serving_choice
from demo_fixtures import train_tiny_checkpoint


def _block(cos: float, p10: float | None, ms: float) -> dict:
    return {"cosine_mean": cos, "cosine_min": cos - 0.001, "p@10": p10, "encode_ms": ms}


# --------------------------------------------------------------------------- the rule


def test_choose_int8_keeps_the_fastest_method_within_tolerance():
    fp32 = {"p@10": 0.50, "encode_ms": 10.0}
    cands = {"dynamic": _block(0.999, 0.50, 30.0), "static": _block(0.995, 0.49, 4.0)}
    chosen = choose_int8(cands, fp32)
    assert chosen is cands["static"] and chosen["kept"] and chosen["method"] == "static"
    assert not cands["dynamic"]["kept"] and cands["dynamic"]["within_tolerance"]
    assert chosen["p@10_drop"] == pytest.approx(0.01) and "fastest int8 within tolerance (static)" in chosen["reason"]
    assert "dynamic: cosine to PyTorch 0.9990" in chosen["reason"]


def test_choose_int8_skips_a_faster_method_over_tolerance():
    fp32 = {"p@10": 0.50, "encode_ms": 10.0}
    # static is faster but loses 0.05 P@10 (> 0.02); dynamic's cosine is too low for the other rule
    cands = {"dynamic": _block(0.995, 0.50, 8.0), "static": _block(0.999, 0.45, 3.0)}
    assert choose_int8(cands, fp32)["method"] == "dynamic"
    low = {"dynamic": _block(0.97, 0.50, 8.0), "static": _block(0.999, 0.45, 3.0)}
    chosen = choose_int8(low, fp32)  # none within: the most faithful is reported, not kept
    assert chosen["method"] == "static" and not chosen["kept"] and chosen["reason"].startswith("over tolerance")
    requested = choose_int8({"dynamic": _block(0.97, 0.50, 8.0)}, fp32, quantize=True)
    assert requested["kept"] and requested["reason"].startswith("requested")
    # P@10 not measurable (no categories): the cosine alone decides
    assert choose_int8({"static": _block(0.995, None, 3.0)}, {"p@10": None, "encode_ms": 9.0})["kept"]
    with pytest.raises(ValueError):
        choose_int8({}, fp32)


def test_serving_choice_is_the_fastest_within_tolerance():
    report = {"fp32": {"path": "a.onnx", "encode_ms": 10.0},
              "int8": {"path": "a.int8.onnx", "encode_ms": 4.0, "kept": True, "within_tolerance": True,
                       "method": "static"}}
    assert serving_choice(report)["path"] == "a.int8.onnx" and serving_choice(report)["method"] == "static"
    report["int8"]["encode_ms"] = 12.0  # a slower int8 (e.g. dynamic ConvInteger) is not served
    assert serving_choice(report)["precision"] == "fp32"
    report["int8"].update(encode_ms=4.0, within_tolerance=False)  # requested over tolerance: never chosen here
    assert serving_choice(report)["path"] == "a.onnx"
    report["int8"].update(encode_ms=10.0, within_tolerance=True)  # a tie goes to fp32, the exact one
    assert serving_choice(report)["precision"] == "fp32"


# --------------------------------------------------------------------------- static int8 of trained demo students


@pytest.fixture(scope="module", params=["demo-resnet", "demo"])
def trained_demo(request, data_dir, tmp_path_factory):
    """A demo student of each architecture (ModifiedResNet, ViT) trained 12 steps: real activation ranges."""
    out = tmp_path_factory.mktemp(f"int8-{request.param}")
    return request.param, train_tiny_checkpoint(data_dir, out, request.param, preset=request.param, max_steps=12)


def test_static_int8_of_a_trained_student_stays_close_to_pytorch(trained_demo, data_dir, tmp_path):
    preset, ckpt = trained_demo
    out = tmp_path / "image_encoder.onnx"
    report = export_onnx(ckpt, out, max_images=120, threads=2, calibration_size=64, timing_runs=3)
    static, dynamic = report["int8_methods"]["static"], report["int8_methods"]["dynamic"]
    assert static["cosine_mean"] >= 0.99 and dynamic["cosine_mean"] >= 0.99
    for block in (static, dynamic):  # P@10 cost of each method, measured on the same photos as fp32's
        assert block["p@10"] is not None and block["p@10_drop"] == pytest.approx(report["fp32"]["p@10"] - block["p@10"],
                                                                                   abs=1e-4)
    assert report["calibration"]["n_images"] == 64 and report["calibration"]["method"] == "minmax"
    within = [m for m, b in report["int8_methods"].items() if b["within_tolerance"]]
    chosen = report["int8"]
    assert chosen["method"] == min(within, key=lambda m: report["int8_methods"][m]["encode_ms"])
    assert chosen["kept"] and chosen["path"] == str(int8_path(out).resolve())
    meta = {p.key: p.value for p in onnx.load(str(int8_path(out))).metadata_props}
    assert meta["cnclip_kd.int8_method"] == chosen["method"] and meta["cnclip_kd.precision"] == "int8"
    enc = OnnxEncoder(int8_path(out))
    assert enc.precision == "int8" and enc.int8_method == chosen["method"]
    assert report["serve"]["path"] in (report["fp32"]["path"], chosen["path"])
    saved = json.loads(out.with_name("image_encoder.report.json").read_text(encoding="utf-8"))
    assert saved["int8"]["method"] == chosen["method"] and saved["serve"] == report["serve"]
    if preset == "demo-resnet":
        # The convolutional student: dynamic int8 has ConvInteger nodes, static int8 QDQ pairs around Conv.
        ops = {m: {n.op_type for n in onnx.load(str(tmp_path / f"{m}.onnx")).graph.node} for m in INT8_METHODS
               if quantize_image_onnx(out, tmp_path / f"{m}.onnx", m, calibration_size=8)}
        assert "ConvInteger" in ops["dynamic"] and "QuantizeLinear" in ops["static"] and "Conv" in ops["static"]


def test_export_refuses_an_unknown_int8_method(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="int8_methods"):
        export_onnx(checkpoint, tmp_path / "x.onnx", int8_methods=["float4"], max_images=4)
    assert not (tmp_path / "x.onnx").exists()


def test_quantize_image_onnx_writes_each_method_and_records_calibration(checkpoint, tmp_path):
    fp32 = tmp_path / "enc.onnx"
    export_onnx(checkpoint, fp32, quantize=False, max_images=8)
    info = quantize_image_onnx(fp32, tmp_path / "enc.static.onnx", "static", calibration_size=16)
    assert info["calibration"]["n_images"] == 16 and info["method"] == "static"
    assert quantize_image_onnx(fp32, tmp_path / "enc.dyn.onnx", "dynamic")["calibration"] is None
    pixels = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    ref = OnnxEncoder(fp32).encode(pixels)
    for name in ("enc.static.onnx", "enc.dyn.onnx"):
        got = OnnxEncoder(tmp_path / name).encode(pixels)
        assert got.shape == ref.shape and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-4)
    assert not list(tmp_path.glob(".*tmp*"))  # no temp file left behind
    with pytest.raises(ValueError, match="unknown int8 method"):
        quantize_image_onnx(fp32, tmp_path / "x.onnx", "fp16")
    with pytest.raises(FileNotFoundError):
        quantize_image_onnx(tmp_path / "missing.onnx", tmp_path / "y.onnx")


# --------------------------------------------------------------------------- the planner


def test_candidate_parse():
    assert Candidate.parse("RN50@224") == Candidate("RN50", 224)
    assert Candidate.parse("ViT-B-16") == Candidate("ViT-B-16", 224)
    assert Candidate.parse("tiny").side == 32 and Candidate.parse("tiny").preset == "tiny"
    assert Candidate.parse("RN50").text_model == "RBT3-chinese"
    for bad, msg in (("ViT-X-99@224", "unknown architecture"), ("ViT-B-16@150", "multiple of the patch size 16"),
                     ("RN50@big", "number of pixels")):
        with pytest.raises(ValueError, match=msg):
            Candidate.parse(bad)


def test_cpu_features_names_the_instruction_sets():
    cpu = cpu_features()
    assert cpu["cores"] >= 1 and set(cpu["isa"]) <= {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                                                      "amx_bf16", "amx_int8"}
    assert cpu["cpu"] in cpu["summary"] and ("int8 with VNNI" in cpu["summary"]) == cpu["vnni"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    work = tmp_path_factory.mktemp("plan")
    return work, plan(1e6, candidates=["tiny", "demo-resnet@64"], gallery=300, queries=1, repeats=2, threads=1,
                      work_dir=work)


def test_plan_times_every_candidate_and_backend_and_follows_its_numbers(planned):
    work, result = planned
    assert [(r["candidate"], r["backend"]) for r in result.rows] == [(c, b) for c in ("tiny@32", "demo-resnet@64")
                                                                     for b in BACKENDS]
    for r in result.rows:
        assert r["n"] == 2 and r["total"]["p50"] >= r["encode"]["p50"] > 0 and r["meets"]
    tiny = [r for r in result.rows if r["candidate"] == "tiny@32"]
    # A budget everything meets: the first candidate, served by its fastest back-end.
    assert result.choice["candidate"] == "tiny@32"
    assert result.choice["backend"] == min(tiny, key=lambda r: r["total"]["p50"])["backend"]
    assert "--preset tiny" in result.choice["train_command"] and "--distillation" in result.choice["train_command"]
    assert result.choice["export_command"].startswith("cnclip-kd export out/runs/tiny-32-kd/")
    assert json.loads((work / "plan.json").read_text(encoding="utf-8"))["choice"]["candidate"] == "tiny@32"
    text = result.markdown()
    assert result.cpu["summary"] in text and "**Choice: tiny@32" in text and "| demo-resnet@64 | onnx-int8-static |" in text
    # Each candidate's models were exported: fp32 plus both int8 methods, and the random checkpoint.
    for folder in ("tiny@32", "demo-resnet@64"):
        files = {p.name for p in (work / folder).iterdir()}
        assert {"random.pt", "image_encoder.onnx", "image_encoder.int8-dynamic.onnx",
                "image_encoder.int8-static.onnx"} <= files


def test_plan_budget_decides_and_a_rerun_reuses_the_models(planned):
    work, first = planned
    stamps = {p: p.stat().st_mtime for p in work.rglob("*.onnx")}
    # One candidate, one back-end: the choice names it and the export command asks for that int8 method.
    rerun = plan(1e6, candidates=["demo-resnet@64"], backends=["onnx-int8-static"], gallery=300, queries=1,
                 repeats=1, threads=1, work_dir=work)
    assert {p: p.stat().st_mtime for p in work.rglob("*.onnx")} == stamps  # nothing re-exported
    assert rerun.choice["backend"] == "onnx-int8-static" and "--int8-method static" in rerun.choice["export_command"]
    none = plan(1e-6, candidates=["tiny"], backends=["onnx-fp32"], gallery=300, queries=1, repeats=1, threads=1,
                work_dir=work)
    assert none.choice is None and not none.rows[0]["meets"]
    assert "No candidate meets" in none.markdown() and "the fastest is tiny@32 with onnx-fp32" in none.markdown()


def test_plan_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="budget_ms"):
        plan(0, work_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown back-ends"):
        plan(50, backends=["tensorrt"], work_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown architecture"):
        plan(50, candidates=["ResNet-9000"], work_dir=tmp_path)


def test_cli_plan_prints_the_table_and_the_choice(planned, capsys):
    work, _ = planned
    assert cli_main(["plan", "--budget-ms", "100000", "--candidates", "tiny", "--backends", "onnx-fp32,onnx-int8-static",
                     "--gallery", "300", "--queries", "1", "--repeats", "1", "--threads", "1",
                     "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "| tiny@32 | onnx-fp32 |" in out and "**Choice: tiny@32" in out and "cnclip-kd train" in out
    assert cli_main(["plan", "--candidates", "ViT-B-16@150", "--work-dir", str(work)]) == 2


def test_onnx_serving_process_imports_no_torch(planned):
    """The int8 encoder the planner serves and its index load and answer in a process without torch."""
    work, _ = planned
    index_dir, _ = synthetic_index(work, 300, 256)
    code = (f"import sys\nfrom cnclip_kd.deploy import Retriever\nfrom cnclip_kd.deploy.planner import sample_queries\n"
            f"r = Retriever.load({str(index_dir)!r}, {str(work / 'demo-resnet@64' / 'image_encoder.int8-static.onnx')!r}, threads=1)\n"
            "res = r.search(sample_queries(1)[0], 5)\n"
            "print(len(res.ids), r.backend, r.encoder.int8_method, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["5", "onnx-int8", "static", "False"]
