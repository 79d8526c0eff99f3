"""Notebook 02 runs the offline demo end to end: demo teacher → distillation → honest comparison table."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

pytestmark = [pytest.mark.notebook, pytest.mark.slow]


def test_notebook_02_demo(notebook_runner, tmp_path):
    out = tmp_path / "out"
    rec = notebook_runner("02_distill.ipynb", {"OUTPUT_DIR": str(out)}, timeout=1200)

    # The demo teacher went through the real ModelScope folder layout.
    teacher = Path(rec["teacher"])
    assert (teacher / "configuration.json").is_file() and (teacher / "pytorch_model.bin").is_file()

    # A cn_clip-format checkpoint that our loader (and cn_clip's create_model keys) accept.
    ckpt = torch.load(rec["checkpoint"], map_location="cpu", weights_only=True)
    assert {"epoch", "step", "name", "state_dict", "optimizer"} <= set(ckpt)
    assert all(k.startswith("module.") for k in ckpt["state_dict"])
    assert ckpt["step"] == rec["steps"] > 0 and ckpt["kd_loss"] == "feature"

    # One validation row per validated epoch, metrics in range.
    assert rec["validation"] and all(0.0 <= v["val/p@10"] <= 1.0 for v in rec["validation"])

    # The table: teacher, fine-tune without KD, and each KD loss, on the held-out test split.
    rows = rec["comparison"]
    kinds = [r["kd_loss"] for r in rows]
    assert kinds == ["-", "-", "cosine", "feature", "relation"]
    assert rows[0]["model"].startswith("teacher") and "fine-tuned" in rows[1]["model"]
    for r in rows:
        for key in ("p@10", "map@10", "r@1", "r@5", "r@10"):
            assert 0.0 <= r[key] <= 1.0, (r["model"], key, r[key])
        assert r["r@1"] <= r["r@5"] <= r["r@10"]
    table = json.loads((out / "runs" / "comparison.json").read_text(encoding="utf-8"))
    assert table["rows"] == rows and table["eval_data"].endswith("test")

    with Image.open(rec["curves"]) as fig:
        assert fig.format == "PNG"
    history = [json.loads(line) for line in
               (out / "runs" / "demo-kd-feature" / "history.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in history if "loss/total" in r]
    assert steps == list(range(1, rec["steps"] + 1))
    assert all("loss/kd_feature" in r for r in history if "loss/total" in r)
