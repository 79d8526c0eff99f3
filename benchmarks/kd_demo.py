"""Does distillation help in the offline demo? Notebook 02's comparison over several seeds, mean ± sd.

Runs what notebook 02 runs with its defaults (``PRESET="demo"``: the
EfficientNet-Lite2 teacher from PyPI, the from-scratch ``demo-resnet`` student,
cached augmented views) once per seed: the teacher, the student fine-tuned
without KD, and the student with each KD loss, all evaluated image-to-image on
the held-out test split (and on the valid split, which chose the recipe). The
teacher's features are computed once and reused by every seed and loss.

It prints the README's table and the margin that ``tests/test_notebook_02.py``
asserts (mean gap of the default KD loss over fine-tuning, minus three
standard deviations of that gap over the seeds)::

    python benchmarks/kd_demo.py --seeds 3 --work-dir /tmp/kd-demo --out kd_demo.json

Options pass straight to the preset (``--epochs``, ``--kd-weight``, ``--views``,
``--batch-size``, ``--lr``, ``--preset``) to measure other recipes the same way.
About 8 minutes per seed on 2 CPU cores (the teacher cache ~2 minutes, once).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _report import emit, mean_sd  # noqa: E402 - benchmarks/ is on sys.path when run as a script

logger = logging.getLogger("kd_demo")

METRICS = ("p@10", "map@10")
# What distilling the image tower costs the text side: text → image recall (exact pairs) and category P@10.
TEXT_METRICS = ("t2i/r@1", "t2i/r@10", "t2i/mean", "t2i/cat-p@10")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="training seeds (1..N)")
    p.add_argument("--losses", default="cosine,feature,relation", help="KD losses to compare")
    p.add_argument("--epochs", type=int, default=0, help="student epochs (0: the preset's)")
    p.add_argument("--kd-weight", type=float, default=0.0, help="KD loss weight (0: the preset's)")
    p.add_argument("--views", type=int, default=-1, help="augmented views per image (-1: the preset's)")
    p.add_argument("--batch-size", type=int, default=0, help="batch size (0: the preset's)")
    p.add_argument("--lr", type=float, default=0.0, help="learning rate (0: the preset's)")
    p.add_argument("--preset", default="", help="student architecture preset (empty: the demo preset's)")
    p.add_argument("--teacher", default="", help="teacher (empty: the demo preset's, efficientnet-lite2)")
    p.add_argument("--work-dir", default=None, help="data, teacher cache and runs live here (reused)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    t_start = time.perf_counter()

    from cnclip_kd.data.prepare import ensure_dataset
    from cnclip_kd.notebook.experiments import compare_kd, evaluate_teacher, preset_config, preset_values
    from cnclip_kd.models.students import load_student
    from cnclip_kd.distill.validation import evaluate_lmdb

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kd-demo-"))
    data_dir = work / "data"
    ensure_dataset(data_dir)
    losses = [x for x in args.losses.split(",") if x]
    overrides = {"max_epochs": args.epochs, "kd_loss_weight": args.kd_weight, "batch_size": args.batch_size,
                 "lr": args.lr, "preset": args.preset, "teacher_model_name": args.teacher}
    if args.views >= 0:
        overrides["augment_views"] = args.views
    recipe = preset_values("demo", **overrides)
    tag = "-".join(f"{k}{recipe[k]}" for k in ("preset", "max_epochs", "kd_loss_weight", "augment_views",
                                               "batch_size", "lr"))
    rows: list[dict] = []
    teacher = {}
    for seed in range(1, args.seeds + 1):
        t0 = time.perf_counter()
        base = preset_config("demo", data_dir, work, name=f"demo-{tag}-seed{seed}", seed=seed, **overrides)
        table = compare_kd(base, eval_data=data_dir / "lmdb" / "test", kd_losses=losses, include_teacher=False)
        for r in table:
            model, info = load_student(r["checkpoint"])
            valid = evaluate_lmdb(model, data_dir / "lmdb" / "valid", resolution=info["image_resolution"])
            rows.append({"seed": seed, "variant": r["kd_loss"] if r["kd_loss"] != "-" else "finetune",
                         "test": {k: r[k] for k in (*METRICS, "teacher@10", *TEXT_METRICS)},
                         "valid": {k: valid[k] for k in METRICS}})
        logger.info("seed %d: %s (%.0f s)", seed, {r["variant"]: round(r["test"]["p@10"], 3)
                                                   for r in rows if r["seed"] == seed}, time.perf_counter() - t0)
        if not teacher:
            teacher = {split: evaluate_teacher(base.teacher_model_name, data_dir / "lmdb" / split)
                       for split in ("test", "valid")}

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["| 模型 model | test P@10 | test mAP@10 | valid P@10 | valid mAP@10 | test teacher@10 | "
             "T→I R@1 | T→I R@10 | T→I mean | T→I cat P@10 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| 教师 teacher ({recipe['teacher_model_name']}) | {teacher['test']['p@10']:.3f} | "
             f"{teacher['test']['map@10']:.3f} | {teacher['valid']['p@10']:.3f} | {teacher['valid']['map@10']:.3f} | - "
             "| - | - | - | - |"]
    columns = ([("test", k) for k in METRICS] + [("valid", k) for k in METRICS] + [("test", "teacher@10")]
               + [("test", k) for k in TEXT_METRICS])
    for v in variants:
        label = "只微调 fine-tune, no KD" if v == "finetune" else f"+ KD {v}"
        cells = [mean_sd([r[split][k] for r in rows if r["variant"] == v]) for split, k in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    default = recipe["kd_loss"]
    summary = []
    if default in variants and "finetune" in variants:
        by_seed = {r["seed"]: {} for r in rows}
        for r in rows:
            by_seed[r["seed"]][r["variant"]] = r["test"]["p@10"]
        gaps = [s[default] - s["finetune"] for s in by_seed.values()]
        agree = {r["seed"]: {} for r in rows}
        for r in rows:
            agree[r["seed"]][r["variant"]] = r["test"]["teacher@10"]
        agree_gaps = [s[default] - s["finetune"] for s in agree.values()]
        kd_mean = statistics.mean(s[default] for s in by_seed.values())
        ft_mean = statistics.mean(s["finetune"] for s in by_seed.values())
        sd = statistics.stdev(gaps) if len(gaps) > 1 else float("nan")
        text_gaps = {k: [next(r["test"][k] for r in rows if r["seed"] == s and r["variant"] == default)
                         - next(r["test"][k] for r in rows if r["seed"] == s and r["variant"] == "finetune")
                         for s in by_seed] for k in ("t2i/mean", "t2i/cat-p@10")}
        summary = [
            *(f"Text → image {k}, KD ({default}) minus fine-tune, same seeds: {[round(g, 3) for g in g_]}, "
              f"mean {statistics.mean(g_):.3f}" + (f", sd {statistics.stdev(g_):.3f}." if len(g_) > 1 else ".")
              for k, g_ in text_gaps.items()),
            f"Default KD ({default}) vs fine-tune, test P@10: gaps {[round(g, 3) for g in gaps]}, "
            f"mean {statistics.mean(gaps):.3f}, sd {sd:.3f}; mean gap - 3 sd = {statistics.mean(gaps) - 3 * sd:.3f}.",
            f"Agreement with the teacher (test teacher@10), KD minus fine-tune: gaps "
            f"{[round(g, 3) for g in agree_gaps]}, mean {statistics.mean(agree_gaps):.3f}, sd "
            f"{statistics.stdev(agree_gaps) if len(agree_gaps) > 1 else float('nan'):.3f}.",
            f"Ratios of the means: KD / fine-tune {kd_mean / max(ft_mean, 1e-9):.2f}×, "
            f"KD / teacher {kd_mean / teacher['test']['p@10']:.2f}×.",
        ]
    text = "\n".join([
        f"## Offline demo: teacher vs. student without / with KD ({args.seeds} seeds, mean ± sd)",
        "",
        f"Recipe: {json.dumps({k: recipe[k] for k in sorted(recipe)}, ensure_ascii=False)}",
        "",
        *lines,
        "",
        *summary,
        f"Whole run {time.perf_counter() - t_start:.0f} s.",
    ])
    emit(text, args.out, {"args": vars(args), "recipe": recipe, "teacher": teacher, "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
