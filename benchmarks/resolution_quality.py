"""What a smaller student input side costs in retrieval quality, and how much distillation wins back.

A ViT's cost grows with its token count, ``(side / patch)² + 1``: ViT-B-16 at
128 px runs 65 tokens instead of 197 at 224 and encodes about 3× faster on a
CPU (``benchmarks/query_latency.py --sides``). This script measures the other
side of that trade on the offline demo, where everything can be trained here:
the ``demo`` student (ViT, patch 8, 64 px: 65 tokens) is trained at smaller
sides — 48 px (37 tokens) and 40 px (26 tokens) by default, the token ratios of
ViT-B-16 at 168 and 140 px — without and with feature distillation from the
demo teacher (EfficientNet-Lite2, which keeps its 260 px), over several seeds, and every run is
evaluated on the held-out test split (category P@10 / mAP@10, image→image).
Also reported: the 64 px students only *resized* to the smaller side (position
embeddings interpolated, no training at that side), to show why the student is
trained at the side it will serve.

Beside them (``--resnet``, on by default) the from-scratch demo's (``demo-scratch``) convolutional
student (``demo-resnet``: cn_clip's ModifiedResNet, the RN50 family) at its
side, without and with distillation. With ``--latency PLAN.json`` (what
``cnclip-kd plan`` wrote on the CPU you serve from) every student is put next to
the measured end-to-end query latency of its real counterpart — the demo ViT at
side s ↔ ViT-B-16 at s × 224 / 64 (rounded to the patch, 16 px), the ResNet ↔
RN50 at 224 — in one table, and a latency / quality figure is drawn
(``--figure``).

These are small models trained from scratch on 360 photos: the numbers show the
direction and rough size of the trade, not what a pretrained ViT-B-16 loses on
your data — measure that with notebook 02 (``IMAGE_RESOLUTION``) and 03.

Usage (about 30 minutes on 2 CPU cores with 3 seeds; runs are kept in --work-dir and reused)::

    cnclip-kd plan --candidates ViT-B-16@224,ViT-B-16@160,ViT-B-16@144,RN50@224 --work-dir out/plan
    python benchmarks/resolution_quality.py --latency out/plan/plan.json --work-dir out/resolution \
        --out out/resolution/quality.json --figure out/resolution/latency_quality.png
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import json
import statistics

from _report import emit, mean_sd  # noqa: E402 - benchmarks/ is on sys.path when run as a script

logger = logging.getLogger("resolution_quality")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sides", default="64,48,40", help="student input sides (the first is the preset's own)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per side and variant")
    p.add_argument("--kd-loss", default="feature", help="KD loss of the distilled runs")
    p.add_argument("--epochs", type=int, default=0, help="student epochs (0: the demo-scratch preset's)")
    p.add_argument("--teacher", default="", help="teacher (empty: the demo preset's, efficientnet-lite2)")
    p.add_argument("--resnet", action=argparse.BooleanOptionalAction, default=True,
                   help="also train the convolutional demo student (demo-resnet, the RN50 family) at its own side")
    p.add_argument("--latency", default=None,
                   help="a plan.json of `cnclip-kd plan` (real architectures timed on the serving CPU) to put "
                        "beside each student")
    p.add_argument("--figure", default=None, help="latency / quality figure (PNG; needs --latency)")
    p.add_argument("--work-dir", default=None, help="data, teacher and runs live here (reused)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    t_start = time.perf_counter()

    from cnclip_kd.data.prepare import ensure_dataset
    from cnclip_kd.notebook.experiments import DEMO_TEACHER, evaluate_teacher, preset_config
    from cnclip_kd.models.students import PRESETS, load_student
    from cnclip_kd.distill.validation import evaluate_lmdb
    from cnclip_kd.distill.trainer import train

    sides = [int(s) for s in args.sides.split(",")]
    native = int(PRESETS["demo"]["image_resolution"])
    patch = int(PRESETS["demo"]["vision_patch_size"])
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="resolution-quality-"))
    data_dir = work / "data"
    ensure_dataset(data_dir)
    test = data_dir / "lmdb" / "test"
    teacher = args.teacher or DEMO_TEACHER
    teacher_metrics = evaluate_teacher(teacher, test)
    logger.info("teacher: test P@10 %.3f", teacher_metrics["p@10"])

    runs: list[dict] = []
    checkpoints: dict[tuple[str, int], str] = {}
    for side in sides:
        for variant in ("finetune", f"kd-{args.kd_loss}"):
            for seed in range(args.seeds):
                # The ViT demo student (the side is a ViT's token count), with the from-scratch demo's recipe.
                cfg = preset_config("demo-scratch", data_dir, work, name=f"demo-vit-{variant}-seed{seed}",
                                    seed=seed + 1, preset="demo", image_resolution=side,
                                    distillation=variant != "finetune", teacher_model_name=teacher,
                                    kd_loss=args.kd_loss, max_epochs=args.epochs)
                t0 = time.perf_counter()
                result = train(cfg)
                model, info = load_student(result.checkpoint)
                m = evaluate_lmdb(model, test, resolution=info["image_resolution"])
                runs.append({"student": "vit", "side": side, "variant": variant, "seed": seed, "trained_at": side,
                             "p@10": m["p@10"], "map@10": m["map@10"], "checkpoint": str(result.checkpoint)})
                if side == native:
                    checkpoints[(variant, seed)] = str(result.checkpoint)
                logger.info("%s: test P@10 %.3f (%.0f s)", cfg.name, m["p@10"], time.perf_counter() - t0)
    # The convolutional from-scratch demo student (notebook preset demo-scratch, its own recipe) at its own side.
    resnet_side = int(PRESETS["demo-resnet"]["image_resolution"])
    for variant in (("finetune", f"kd-{args.kd_loss}") if args.resnet else ()):
        for seed in range(args.seeds):
            cfg = preset_config("demo-scratch", data_dir, work, name=f"demo-resnet-{variant}-seed{seed}",
                                seed=seed + 1, preset="demo-resnet", distillation=variant != "finetune",
                                teacher_model_name=teacher, kd_loss=args.kd_loss, max_epochs=args.epochs)
            t0 = time.perf_counter()
            result = train(cfg)
            model, info = load_student(result.checkpoint)
            m = evaluate_lmdb(model, test, resolution=info["image_resolution"])
            runs.append({"student": "resnet", "side": resnet_side, "variant": variant, "seed": seed,
                         "trained_at": resnet_side, "p@10": m["p@10"], "map@10": m["map@10"],
                         "checkpoint": str(result.checkpoint)})
            logger.info("%s: test P@10 %.3f (%.0f s)", cfg.name, m["p@10"], time.perf_counter() - t0)
    # The native-side students, only resized to each smaller side.
    for side in sides:
        if side == native:
            continue
        for (variant, seed), ckpt in checkpoints.items():
            model, info = load_student(ckpt, image_resolution=side)
            m = evaluate_lmdb(model, test, resolution=side)
            runs.append({"student": "vit", "side": side, "variant": variant + " (resized only)", "seed": seed,
                         "trained_at": native,
                         "p@10": m["p@10"], "map@10": m["map@10"], "checkpoint": ckpt})

    vit_runs = [r for r in runs if r["student"] == "vit"]
    variants = list(dict.fromkeys(r["variant"] for r in vit_runs))
    head = ["side 边长", "tokens", *[f"{v} P@10" for v in variants], *[f"{v} mAP@10" for v in variants]]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (2 * len(variants))]
    for side in sides:
        cells = [f"{side} px", str((side // patch) ** 2 + 1)]
        for key in ("p@10", "map@10"):
            for v in variants:
                vals = [r[key] for r in vit_runs if r["side"] == side and r["variant"] == v]
                cells.append(mean_sd(vals) if vals else "-")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join([
        f"## Student input side vs. retrieval quality: demo student (ViT, patch {patch}), held-out test split "
        f"({args.seeds} seeds, mean ± sd)",
        "",
        f"Teacher ({teacher}): P@10 {teacher_metrics['p@10']:.3f}, "
        f"mAP@10 {teacher_metrics['map@10']:.3f}. KD loss: {args.kd_loss}.",
        "",
        *lines,
        "",
        *_latency_table(args, runs, sides, native, resnet_side),
        f"Whole run {time.perf_counter() - t_start:.0f} s.",
    ])
    emit(text, args.out, {"args": vars(args), "teacher": teacher_metrics, "runs": runs})
    return 0


def counterpart(student: str, side: int, native: int) -> str:
    """The real architecture a demo student stands for: ViT-B-16 at the same share of its side, or RN50 at 224."""
    if student == "resnet":
        return "RN50@224"
    return f"ViT-B-16@{max(16, round(side * 224 / native / 16) * 16)}"


def _latency_table(args, runs: list[dict], sides: list[int], native: int, resnet_side: int) -> list[str]:
    """Quality of each trained student beside the measured latency of its real counterpart (``--latency``), and
    the figure; or a note on how to get them."""
    if not args.latency:
        return ["(No latency beside the quality: pass `--latency PLAN.json` from `cnclip-kd plan`.)", ""]
    plan = json.loads(Path(args.latency).read_text(encoding="utf-8"))
    best = {}
    for row in plan["rows"]:
        if row["candidate"] not in best or row["total"]["p50"] < best[row["candidate"]]["total"]["p50"]:
            best[row["candidate"]] = row
    kd = f"kd-{args.kd_loss}"
    students = [("vit", side) for side in sides] + ([("resnet", resnet_side)] if args.resnet else [])
    lines = [f"### Quality beside latency (latency: `cnclip-kd plan` on {plan['cpu']['summary']}; "
             f"{plan['gallery']:,} vectors, {plan['query_size'][0]}×{plan['query_size'][1]} JPEG, best back-end)", "",
             "| student | side | stands for | p50 ms (back-end) | fine-tune P@10 | KD P@10 |",
             "|---|---:|---|---:|---:|---:|"]
    points = []
    for student, side in students:
        name = counterpart(student, side, native)
        row = best.get(name)
        cells = {}
        for variant in ("finetune", kd):
            vals = [r["p@10"] for r in runs if r["student"] == student and r["side"] == side and r["variant"] == variant]
            cells[variant] = mean_sd(vals) if vals else "-"
            if row and vals:
                points.append({"family": "ViT" if student == "vit" else "ResNet",
                               "variant": "KD" if variant == kd else "fine-tune", "latency_ms": row["total"]["p50"],
                               "quality": statistics.mean(vals),
                               "quality_sd": statistics.stdev(vals) if len(vals) > 1 else 0.0, "label": name})
        lat = f"{row['total']['p50']:.1f} ({row['backend']})" if row else "not in the plan"
        lines.append(f"| demo {student} | {side} px | {name} | {lat} | {cells['finetune']} | {cells[kd]} |")
    lines.append("")
    if args.figure and points:
        from cnclip_kd.notebook.viz import latency_quality_figure, save_figure

        fig = latency_quality_figure(points, budget_ms=plan.get("budget_ms"),
                                     title="demo students: held-out P@10 vs. the real counterpart's latency")
        lines += [f"Figure: {save_figure(fig, args.figure)}", ""]
    return lines


if __name__ == "__main__":
    sys.exit(main())
