"""Notebooks 03 (index + evaluation + comparison) and 04 (Top-10 figures), headless, from tiny trained checkpoints."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnclip_kd.data import read_labels
from cnclip_kd.index import GalleryIndex

pytestmark = [pytest.mark.notebook, pytest.mark.slow]

METRICS = ("p@10", "map@10", "r@1", "r@5", "r@10")


def _check_metrics(metrics: dict) -> None:
    for key in METRICS:
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics)
    assert metrics["r@1"] <= metrics["r@5"] <= metrics["r@10"]


def test_notebooks_03_then_04(notebook_runner, output_dir, data_dir):
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

    # Notebook 04 on 03's indexes: one Top-10 PNG per model for the same query.
    rec4 = notebook_runner("04_visualize_top10.ipynb", {"OUTPUT_DIR": str(output_dir), "QUERY": 7})
    assert rec4["models"] == ["tiny-kd-cosine", "tiny-finetune", "random-preset-tiny", "teacher"]
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


def test_notebook_04_alone_builds_missing_indexes(notebook_runner, output_dir, data_dir):
    query_id = read_labels(data_dir, "test")[3]["image_id"]
    rec = notebook_runner("04_visualize_top10.ipynb", {
        "OUTPUT_DIR": str(output_dir), "DATA_DIR": str(data_dir), "QUERY_ID": query_id, "MODELS": ["tiny-finetune"],
        "K": 5})
    assert rec["models"] == ["tiny-finetune"] and rec["k"] == 5
    assert (output_dir / "index" / "tiny-kd-cosine" / "stats.json").is_file()  # built for every model found
    gallery_ids = np.load(output_dir / "index" / "tiny-finetune" / "ids.npy")
    assert rec["query_id"] == query_id and int(gallery_ids[rec["query_row"]]) == query_id == int(gallery_ids[3])
    assert rec["summary"][0]["n_results"] == 5
    assert Path(rec["figures"]["tiny-finetune"]).is_file()
    assert json.loads((output_dir / "index" / "comparison.json").read_text(encoding="utf-8"))["rows"]
