"""Notebook 06 (CPU deployment), headless: image and text export, Retriever image and text queries, latency tables,
from tiny trained checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnclip_kd.deploy.backends import OnnxEncoder
from cnclip_kd.deploy.runtime import Retriever
from cnclip_kd.retrieval.gallery import gallery_from_split
from cnclip_kd.retrieval.index import GalleryIndex

pytestmark = [pytest.mark.notebook, pytest.mark.slow]


def test_notebook_06_alone_builds_the_index_exports_and_answers(notebook_runner, output_dir, data_dir):
    rec = notebook_runner("06_deploy_cpu.ipynb", {"OUTPUT_DIR": str(output_dir), "DATA_DIR": str(data_dir),
                                                  "CHECK_IMAGES": 120, "LATENCY_REPEATS": 2, "THREADS": 1,
                                                  "PLAN_CANDIDATES": "tiny,demo-resnet", "PLAN_GALLERY": 300,
                                                  "PLAN_BUDGET_MS": 100000.0})
    # The newest student and an index built here on the test split.
    assert rec["model"] == "tiny-kd-cosine" and rec["index_built_here"] is True
    index_dir = Path(rec["index_dir"])
    assert index_dir == (output_dir / "index" / "tiny-kd-cosine").resolve() and rec["gallery_size"] == 120

    # Export: checked against PyTorch, files in OUTPUT_DIR/deploy.
    export = rec["export"]
    assert Path(export["onnx"]) == (output_dir / "deploy" / "image_encoder.onnx").resolve()
    assert Path(export["onnx"]).is_file() and Path(export["report"]).is_file()
    assert export["fp32"]["cosine_min"] >= 0.999 and export["n_images"] == 120 and export["opset"] >= 14
    int8 = rec["int8"]
    assert int8["cosine_mean"] >= 0.99 and isinstance(int8["kept"], bool) and int8["reason"]
    # Both int8 methods measured (static calibrated on the check photos); the one kept is the fastest within
    # tolerance, and what is served is the faster of fp32 and it.
    methods = rec["int8_methods"]
    assert set(methods) == {"dynamic", "static"} and rec["calibration"]["n_images"] == 120
    within = [m for m, b in methods.items() if b["within_tolerance"]]
    if within:
        assert int8["method"] == min(within, key=lambda m: methods[m]["encode_ms"]) and int8["kept"]
    serve = rec["serve"]
    int8_faster = int8["kept"] and int8["within_tolerance"] and int8["encode_ms"] < export["fp32"]["encode_ms"]
    assert serve["path"] == (int8["path"] if int8_faster else export["onnx"])  # a tie goes to fp32
    assert rec["encoder"] == serve["path"]
    assert rec["backend"] == ("onnx-int8" if serve["precision"] == "int8" else "onnx-fp32")

    # The query (first valid-split image, not in the gallery) answered with 10 results, as a fresh Retriever does.
    valid = gallery_from_split(data_dir, "valid")
    assert rec["query_label"] == valid.meta[0]["label"]
    index = GalleryIndex.load(index_dir)
    assert len(rec["result_ids"]) == 10 and set(rec["result_ids"]) <= set(index.gallery.ids.tolist())
    assert rec["result_scores"] == sorted(rec["result_scores"], reverse=True)
    again = Retriever.load(index_dir, rec["encoder"]).search(valid.image_bytes(0), 10)
    assert again.ids.tolist() == rec["result_ids"]
    np.testing.assert_allclose(again.scores, rec["result_scores"], atol=1e-5)
    assert rec["result_labels"] == [index.gallery.meta[index.gallery.row_of(i)]["label"] for i in rec["result_ids"]]
    assert set(rec["timings_ms"]) == {"decode", "encode", "search", "total"}

    # Latency table: every back-end, torch first (the baseline), ordered stages.
    backends = [r["backend"] for r in rec["latency"]]
    assert backends[:3] == ["torch", "torch-bf16", "onnx-fp32"]
    assert backends[3:] == ([f"onnx-int8 ({int8['method']})"] if int8["kept"] else [])
    for row in rec["latency"]:
        assert row["n"] == 4 and row["total"]["p50"] <= row["total"]["p95"] and row["speedup"] > 0
    assert rec["latency"][0]["speedup"] == 1.0
    with Image.open(rec["figure"]) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1]

    # The text encoder: exported beside the image one, checked against PyTorch, the index's own text tower.
    text = rec["text_export"]
    assert Path(text["onnx"]) == (output_dir / "deploy" / "text_encoder.onnx").resolve()
    assert Path(text["report"]).is_file() and text["opset"] >= 14 and text["fp32"]["cosine_min"] >= 0.999
    assert text["n_texts"] > text["n_captions"] > 0 and text["dim"] == index.dim
    assert index.stats["model"].get("text_fingerprint", text["fingerprint"]) == text["fingerprint"]
    text_int8 = rec["text_int8"]
    assert text_int8["cosine_mean"] >= 0.99 and isinstance(text_int8["kept"], bool) and text_int8["reason"]
    assert rec["text_encoder"] == rec["text_serve"]["path"]
    assert rec["text_backend"] == ("onnx-text-int8" if rec["text_serve"]["precision"] == "int8" else "onnx-text-fp32")
    # The default text query, answered as a fresh Retriever answers it, with its timing split.
    assert rec["text_query"] == {"text": "连衣裙", "truncated": False, "n_tokens": 5,
                                 "context_length": text["context_length"]}
    assert len(rec["text_result_ids"]) == 10 and rec["text_result_scores"] == sorted(rec["text_result_scores"], reverse=True)
    again = Retriever.load(index_dir, text_encoder=rec["text_encoder"]).search_text("连衣裙", 10)
    assert again.ids.tolist() == rec["text_result_ids"]
    np.testing.assert_allclose(again.scores, rec["text_result_scores"], atol=1e-5)
    assert rec["text_result_labels"] == [index.gallery.meta[index.gallery.row_of(i)]["label"]
                                         for i in rec["text_result_ids"]]
    assert set(rec["text_timings_ms"]) == {"decode", "encode", "search", "total"}
    text_backends = [r["backend"] for r in rec["text_latency"]]
    assert text_backends == ["torch-text", "onnx-text-fp32"] + (["onnx-text-int8"] if text_int8["kept"] else [])
    for row in rec["text_latency"]:
        assert row["n"] == 4 and 0 < row["total"]["p50"] <= row["total"]["p95"]
    with Image.open(rec["text_figure"]) as fig:  # the text query's Top-10 picture
        assert fig.format == "PNG" and fig.width > fig.height
    # The same answers over HTTP (cnclip_kd.deploy.serve in a background thread).
    http = rec["http"]
    assert http["health"] == 200 and http["status"] == 200 and http["text_status"] == 200
    assert http["ids"] == rec["result_ids"] and http["text_ids"] == rec["text_result_ids"]
    # The planner: both small candidates with every back-end, and a choice that follows its own numbers.
    plan = rec["plan"]
    assert [r["candidate"] for r in plan["rows"]] == ["tiny@32"] * 4 + ["demo-resnet@64"] * 4
    assert plan["choice"]["candidate"] == "tiny@32" and plan["cpu"]["isa"] == rec["plan"]["cpu"]["isa"]
    assert plan["choice"]["backend"] == min(plan["rows"][:4], key=lambda r: r["total"]["p50"])["backend"]


def test_notebook_06_reuses_an_index_and_can_skip_int8(notebook_runner, output_dir, data_dir, tmp_path):
    from demo_fixtures import build_saved_index

    ckpt = output_dir / "runs" / "tiny-finetune" / "checkpoints" / "epoch_latest.pt"
    index_dir = build_saved_index(ckpt, data_dir, tmp_path / "my-index" / "tiny-finetune")
    stamp = (index_dir / "index.faiss").stat().st_mtime_ns
    query = tmp_path / "query.jpg"
    query.write_bytes(gallery_from_split(data_dir, "test").image_bytes(4))
    long_query = "白色 纯棉 短袖 T恤 " * 12
    rec = notebook_runner("06_deploy_cpu.ipynb", {
        "OUTPUT_DIR": str(output_dir), "INDEX_DIR": str(index_dir), "QUANTIZE": "no", "QUERY_IMAGE": str(query),
        "K": 5, "CHECK_IMAGES": 40, "LATENCY_REPEATS": 1, "THREADS": 1, "TEXT_QUERY": long_query,
        "PLAN_CANDIDATES": ""})
    assert rec["model"] == "tiny-finetune" and rec["checkpoint"] == str(ckpt.resolve())  # the index's own model
    assert rec["index_built_here"] is False and (index_dir / "index.faiss").stat().st_mtime_ns == stamp
    assert rec["int8"] is None and rec["backend"] == "onnx-fp32"
    assert not (output_dir / "deploy" / "image_encoder.int8.onnx").exists()
    assert OnnxEncoder(rec["encoder"]).precision == "fp32"
    # The query is a gallery image: it finds itself first.
    index = GalleryIndex.load(index_dir)
    assert len(rec["result_ids"]) == 5 and rec["result_ids"][0] == int(index.gallery.ids[4])
    assert [r["backend"] for r in rec["latency"]] == ["torch", "torch-bf16", "onnx-fp32"]
    # Text: fp32 only, and a query longer than the context length is answered and said to be cut.
    assert rec["text_int8"] is None and rec["text_backend"] == "onnx-text-fp32"
    assert not (output_dir / "deploy" / "text_encoder.int8.onnx").exists()
    assert rec["text_query"]["truncated"] is True and rec["text_query"]["text"] == long_query.strip()
    assert rec["text_query"]["n_tokens"] == rec["text_query"]["context_length"] and len(rec["text_result_ids"]) == 5
    assert [r["backend"] for r in rec["text_latency"]] == ["torch-text", "onnx-text-fp32"]
    assert rec["plan"] is None  # PLAN_CANDIDATES empty: skipped


def test_notebook_06_without_a_model_names_the_notebook_to_run(notebook_runner, tmp_path):
    with pytest.raises(pytest.fail.Exception, match="02_distill.ipynb"):
        notebook_runner("06_deploy_cpu.ipynb", {"OUTPUT_DIR": str(tmp_path / "empty")})
