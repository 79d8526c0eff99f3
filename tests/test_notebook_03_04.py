"""Notebooks 03 (index + evaluation + comparison) and 04 (Top-10 figures), headless, from tiny trained checkpoints."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnclip_kd.data.dataset import read_labels
from cnclip_kd.retrieval.encoders import load_encoder, text_encoder_for
from cnclip_kd.retrieval.evaluate import index_model
from cnclip_kd.retrieval.gallery import gallery_from_split
from cnclip_kd.retrieval.index import GalleryIndex

pytestmark = [pytest.mark.notebook, pytest.mark.slow]

METRICS = ("p@10", "map@10", "r@1", "r@5", "r@10")


def _image_only_index(root: Path, data_dir: Path, index_dir: Path) -> str:
    """Index the test split with an image-only teacher (timm's tiny ``test_convnext``, random weights in a file,
    ~4 s): a model without a text tower. Returns its spec."""
    import timm
    import torch

    weights = root / "test_convnext.pth"
    torch.save(timm.create_model("test_convnext", pretrained=False).state_dict(), weights)
    spec = f"teacher:timm:test_convnext={weights}"
    index_model(spec, gallery_from_split(data_dir, "test"), index_dir, kind="flat", device="cpu")
    return spec


def _check_metrics(metrics: dict) -> None:
    for key in METRICS:
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics)
    assert metrics["r@1"] <= metrics["r@5"] <= metrics["r@10"]


def test_notebooks_03_then_04(notebook_runner, output_dir, data_dir, tmp_path):
    rec = notebook_runner("03_build_index.ipynb", {
        "OUTPUT_DIR": str(output_dir), "DATA_DIR": str(data_dir),
        "EXTRA_MODELS": {"teacher": "teacher:random:preset:demo"}})

    # The newest student checkpoint is the default model.
    assert rec["model"] == "tiny-kd-cosine" and rec["spec"].endswith("tiny-kd-cosine/checkpoints/epoch_latest.pt")
    assert rec["gallery_size"] == rec["index_size"] == 120  # the test split, every image indexed
    assert rec["index_stats"]["kind"] == "flat" and rec["index_stats"]["recall@10"] == 1.0
    assert rec["result_shape"] == [120, 10] and rec["min_results"] == 10  # k results for every query
    _check_metrics(rec["evaluation"]["label"])
    assert rec["evaluation"]["label"]["n_queries"] == 120

    rows = rec["comparison"]
    # The distilled student's own teacher is found from its checkpoint; EXTRA_MODELS add to it.
    assert [r["model"] for r in rows] == ["tiny-kd-cosine", "tiny-finetune", "random-preset-tiny", "teacher"]
    assert [r["role"].split()[0] for r in rows] == ["distilled", "fine-tuned", "teacher", "teacher"]
    for r in rows:
        _check_metrics(r)
        assert r["n"] == 120
    with open(rec["comparison_csv"], encoding="utf-8-sig", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [t["model"] for t in table] == [r["model"] for r in rows]
    assert float(table[0]["p@10"]) == pytest.approx(rows[0]["p@10"])

    saved = GalleryIndex.load(rec["index_dir"])
    assert len(saved) == 120 and saved.stats["eval"]["label"] == rec["evaluation"]["label"]

    # Text ↔ image: every model here has a text tower; the numbers are cn_clip's MUGE evaluation's on the
    # prediction files saved in the index folder.
    text = rec["text_evaluation"]
    n_texts = len((data_dir / "test_texts.jsonl").read_text(encoding="utf-8").splitlines())
    assert text["n_texts"] == n_texts and text["n_images"] == 120
    assert rec["text_files"] == ["i2t_predictions.jsonl", "t2i_predictions.jsonl", "texts.jsonl", "texts.tr.jsonl"]
    from cn_clip.eval import evaluation

    index_dir = Path(rec["index_dir"])
    score = evaluation.compute_score(str(index_dir / "texts.jsonl"), str(index_dir / "t2i_predictions.jsonl"))
    assert score == pytest.approx([100 * text["t2i"][k] for k in ("mean_recall", "r@1", "r@5", "r@10")])
    assert 0.0 <= text["t2i_category"]["p@10"] <= 1.0
    for r in rows:
        assert r["t2i/r@1"] <= r["t2i/r@5"] <= r["t2i/r@10"] and 0.0 <= r["t2i/cat-p@10"] <= 1.0
        assert r["i2t/mean"] == pytest.approx((r["i2t/r@1"] + r["i2t/r@5"] + r["i2t/r@10"]) / 3)
    assert rows[0]["t2i/mean"] == pytest.approx(text["t2i"]["mean_recall"])

    # Notebook 04 on 03's indexes plus an image-only model's: one Top-10 PNG per model for the same query,
    # and one per model with a text tower for the text query.
    image_only = _image_only_index(tmp_path, data_dir, output_dir / "index" / "image-only")
    rec4 = notebook_runner("04_visualize_top10.ipynb", {"OUTPUT_DIR": str(output_dir), "QUERY": 7,
                                                        "TEXT_QUERY": "连衣裙"})
    text_models = ["tiny-kd-cosine", "tiny-finetune", "random-preset-tiny", "teacher"]
    assert rec4["models"] == text_models + ["image-only"]
    assert rec4["query_row"] == 7 and rec4["query_id"] == int(saved.gallery.ids[7])
    assert set(rec4["index_sizes"].values()) == {120} and set(rec4["gallery_sizes"].values()) == {120}
    for s in rec4["summary"]:
        assert s["n_results"] == 10 and 0 <= s["same_category"] <= 10
        assert rec4["query_id"] not in s["ids"] and len(set(s["ids"])) == 10
    for name, path in rec4["figures"].items():
        assert Path(path).parent == output_dir / "figures" and f"q{rec4['query_id']}" in Path(path).name
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size[0] > png.size[1]
    # The hits shown are the index's own top 10 for that query.
    emb = saved.embeddings[7][None]
    _, top = saved.search(emb, 10, exclude_ids=[rec4["query_id"]])
    first = next(s for s in rec4["summary"] if s["model"] == "tiny-kd-cosine")
    assert first["ids"] == saved.gallery.ids[top[0]].tolist()

    # The text query: every model with a text tower, in order; the image-only one skipped, named, no error.
    assert rec4["text_query"] == "连衣裙"
    assert [s["model"] for s in rec4["text_summary"]] == text_models
    assert list(rec4["text_skipped"]) == ["image-only"]
    assert "no text tower" in rec4["text_skipped"]["image-only"] and image_only in rec4["text_skipped"]["image-only"]
    assert sorted(rec4["text_figures"]) == sorted(text_models)
    for s in rec4["text_summary"]:
        # The hits are the model's own index's top 10 for its own text embedding of the query.
        index = GalleryIndex.load(output_dir / "index" / s["model"])
        encoder = text_encoder_for(load_encoder(index.stats["model"]["spec"], device="cpu"))
        scores, rows = index.search(encoder.encode(["连衣裙"]), 10)
        assert s["ids"] == index.gallery.ids[rows[0]].tolist() and s["n_results"] == 10, s["model"]
        np.testing.assert_allclose(s["scores"], scores[0], rtol=1e-5, atol=1e-6)
        assert s["scores"] == sorted(s["scores"], reverse=True)
        assert s["labels"] == [index.gallery.meta[r]["label"] for r in rows[0]] and s["truncated"] is False
        path = Path(rec4["text_figures"][s["model"]])
        assert path.parent == output_dir / "figures" and path.name == f"04_top10_text_{s['model']}.png"
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size[0] > png.size[1]
    assert not (output_dir / "figures" / "04_top10_text_image-only.png").exists()


def test_notebook_04_alone_builds_missing_indexes(notebook_runner, output_dir, data_dir):
    query_id = read_labels(data_dir, "test")[3]["image_id"]
    rec = notebook_runner("04_visualize_top10.ipynb", {
        "OUTPUT_DIR": str(output_dir), "DATA_DIR": str(data_dir), "QUERY_ID": query_id, "MODELS": ["tiny-finetune"],
        "K": 5, "TEXT_QUERY": ""})
    assert rec["models"] == ["tiny-finetune"] and rec["k"] == 5
    assert (output_dir / "index" / "tiny-kd-cosine" / "stats.json").is_file()  # built for every model found
    gallery_ids = np.load(output_dir / "index" / "tiny-finetune" / "ids.npy")
    assert rec["query_id"] == query_id and int(gallery_ids[rec["query_row"]]) == query_id == int(gallery_ids[3])
    assert rec["summary"][0]["n_results"] == 5
    assert Path(rec["figures"]["tiny-finetune"]).is_file()
    # An empty TEXT_QUERY skips the text section.
    assert rec["text_query"] == "" and rec["text_summary"] == [] and rec["text_figures"] == {}
    assert not list((output_dir / "figures").glob("04_top10_text_*"))
    assert json.loads((output_dir / "index" / "comparison.json").read_text(encoding="utf-8"))["rows"]
