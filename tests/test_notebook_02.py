"""Notebook 02 runs the offline demo end to end: pretrained teacher → distillation → honest comparison table.

It is also CI's check that distillation still *helps*: with the notebook's defaults the distilled student must
share more of the teacher's neighbours than the fine-tune-only student, by :data:`AGREEMENT_MARGIN`, keep
:data:`KD_SHARE` of the teacher's margin over chance and not retrieve clearly worse on the held-out test split;
distilled on the test photos themselves (unlabelled, the transductive row) it must keep :data:`TRANSDUCTIVE_SHARE`.
"""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

pytestmark = [pytest.mark.notebook, pytest.mark.slow]

# CI notices when KD stops helping. Measured on 2 CPU cores with this recipe (0.3.4: the ImageNet-pretrained Lite0
# student at 64 px, 15 epochs; bf16 teacher features on a CPU with native bf16), default KD (relation) against the
# fine-tune-only student of the same seed, on the test split:
#   seed:                            1       2       3       123 (this notebook's default)
#   P@10 gap:                        -0.002  0.112   0.034   0.004
#   teacher@10 gap:                  0.053   0.100   0.060   0.049
#   KD share of the teacher's margin 0.834   0.975   0.818   0.857
# (seeds 1-3: `python benchmarks/kd_demo.py --seeds 3 --losses relation --kd-images-rows transductive`, the
# docs/distill.md table; seed 123: this test's own run). teacher@10 is what distillation transfers directly (how
# many of each image's 10 neighbours the teacher shares): the margin is 0.015, under every measured gap. The P@10
# gap swings with the fine-tune-only student (0.33-0.40 across seeds; sd of the gap 0.05), so P@10 is held to "not
# below fine-tuning by more than that spread" (P10_SLACK: another CPU, e.g. AVX2-only with an fp32 teacher, is
# another draw), and the KD student to issue 20's bar on the share of the teacher's margin over chance,
# (P@10 - chance) / (teacher - chance) >= 0.65, which every measured seed clears by >= 0.17.
AGREEMENT_MARGIN = 0.015
P10_SLACK = 0.05
KD_SHARE = 0.65
# Distilling on the gallery it will search (the test photos as unlabelled KD images, titles and labels unused:
# the "transductive" row) takes the student to the teacher. Share of the teacher's margin, seeds 1-3: 0.915, 0.889,
# 0.942; seed 123 (this test) 0.970. CI asserts a floor under the smallest, and that it shares more of the teacher's
# neighbours than the fine-tune-only student (teacher@10 gaps 0.096, 0.084, 0.137; seed 123: 0.117). Over the plain
# KD student it adds little at this side (P@10 +0.029, -0.031, +0.044; seed 123 +0.041), so that is not asserted.
TRANSDUCTIVE_SHARE = 0.8


def test_notebook_02_demo(notebook_runner, tmp_path):
    out = tmp_path / "out"
    # Only the default KD loss is compared here: the cosine and feature students would double the suite's
    # longest test, and the full table (every loss, through this notebook) is test_demo's on the tiny preset.
    rec = notebook_runner("02_distill.ipynb", {"OUTPUT_DIR": str(out), "COMPARE_LOSSES": "relation"}, timeout=1200)

    # The demo teacher: ImageNet-pretrained EfficientNet-Lite2 from its PyPI package; its features of the
    # plain images and of 4 seeded augmented views were computed once.
    assert rec["teacher"] == "efficientnet-lite2" and rec["kd_loss"] == "relation"
    caches = {Path(c["lmdb"]).name: c for c in (json.loads(p.read_text())
                                                for p in (out / "runs" / "teacher-cache").glob("*/meta.json"))}
    assert set(caches) == {"train", "test"}  # the training photos and the test photos of the transductive row
    cache = caches["train"]
    assert (cache["views"], cache["n_images"], cache["embed_dim"], cache["kind"]) == (4, 360, 1280, "efficientnet")
    assert (caches["test"]["views"], caches["test"]["n_images"]) == (4, 120)

    # A cn_clip-format checkpoint that our loader (and cn_clip's create_model keys) accept.
    ckpt = torch.load(rec["checkpoint"], map_location="cpu", weights_only=True)
    assert {"epoch", "step", "name", "state_dict", "optimizer"} <= set(ckpt)
    assert all(k.startswith("module.") for k in ckpt["state_dict"])
    assert ckpt["step"] == rec["steps"] > 0 and ckpt["kd_loss"] == "relation"

    # One validation row per validated epoch, metrics in range.
    assert rec["validation"] and all(0.0 <= v["val/p@10"] <= 1.0 for v in rec["validation"])

    # The table: teacher, fine-tune without KD, and the KD loss compared, on the held-out test split.
    rows = rec["comparison"]
    kinds = [r["kd_loss"] for r in rows]
    assert kinds == ["-", "-", "relation", "relation"]
    assert Path(rows[2]["checkpoint"]).resolve() == Path(rec["checkpoint"])  # section 3's run, reused
    assert rows[0]["model"].startswith("teacher") and "efficientnet-lite2" in rows[0]["model"]
    assert "fine-tuned" in rows[1]["model"]
    for r in rows:
        for key in ("p@10", "map@10", "r@1", "r@5", "r@10"):
            assert 0.0 <= r[key] <= 1.0, (r["model"], key, r[key])
        assert r["r@1"] <= r["r@5"] <= r["r@10"]
    # CI notices when KD stops helping (margins above): the default (relation) student takes on the teacher's
    # neighbours and does not retrieve worse than the fine-tune-only student.
    finetune, kd = rows[1], rows[2]
    assert kd["teacher@10"] - finetune["teacher@10"] >= AGREEMENT_MARGIN, (
        f"KD student shares {kd['teacher@10']:.3f} of the teacher's top-10 neighbours, fine-tune-only "
        f"{finetune['teacher@10']:.3f}: less than {AGREEMENT_MARGIN} apart, distillation stopped transferring")
    assert kd["p@10"] >= finetune["p@10"] - P10_SLACK, (
        f"KD student P@10 {kd['p@10']:.3f} is more than {P10_SLACK} below fine-tune-only {finetune['p@10']:.3f}: "
        "distillation stopped helping")
    # The default row of unlabelled photos: the test photos (transductive), with the share of the teacher's margin
    # over chance on every row.
    teacher, transductive = rows[0], rows[3]
    assert "transductive" in transductive["model"]
    chance = teacher["chance"]
    assert 0.05 < chance < 0.15 and all(r["chance"] == chance for r in rows) and teacher["share"] == pytest.approx(1)
    for r in rows:
        assert r["share"] == pytest.approx((r["p@10"] - chance) / (teacher["p@10"] - chance))
    assert transductive["share"] >= TRANSDUCTIVE_SHARE, (
        f"distilled on the test photos, the student keeps {transductive['share']:.3f} of the teacher's margin over "
        f"chance (P@10 {transductive['p@10']:.3f}, teacher {teacher['p@10']:.3f}, chance {chance:.3f}); "
        f"measured above {TRANSDUCTIVE_SHARE} at every seed")
    assert kd["share"] >= KD_SHARE, (f"the KD student keeps {kd['share']:.3f} of the teacher's margin over chance; "
                                     f"issue 20's bar is {KD_SHARE}")
    assert transductive["teacher@10"] - finetune["teacher@10"] >= AGREEMENT_MARGIN
    kd_runs = sorted(p.name for p in (out / "runs").iterdir() if "kdimages" in p.name)
    assert len(kd_runs) == 1 and all((out / "runs" / n / "metrics.json").is_file() for n in kd_runs)
    assert rows[0]["teacher@10"] is None and all(0.0 <= r["teacher@10"] <= 1.0 for r in rows[1:])
    # What distilling the image tower costs the text side: text ↔ image columns for every student, none for
    # the image-only teacher.
    assert all(rows[0][k] is None for k in ("t2i/r@1", "t2i/mean", "t2i/cat-p@10"))
    for r in rows[1:]:
        assert r["t2i/r@1"] <= r["t2i/r@5"] <= r["t2i/r@10"] and 0.0 <= r["t2i/cat-p@10"] <= 1.0
        assert r["i2t/mean"] == pytest.approx((r["i2t/r@1"] + r["i2t/r@5"] + r["i2t/r@10"]) / 3)
    table = json.loads((out / "runs" / "comparison.json").read_text(encoding="utf-8"))
    assert table["rows"] == rows and table["eval_data"].endswith("test")

    with Image.open(rec["curves"]) as fig:
        assert fig.format == "PNG"
    history = [json.loads(line) for line in
               (out / "runs" / "demo-kd-relation" / "history.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in history if "loss/total" in r]
    assert steps == list(range(1, rec["steps"] + 1))
    assert all("loss/kd_relation" in r for r in history if "loss/total" in r)
