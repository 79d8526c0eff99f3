"""Training throughput: fine-tune only vs. distil with the online teacher vs. distil with cached teacher features.

All modes run side by side in one process through the kit's real trainer
(``cnclip_kd.distill.trainer.train``) on the same synthetic LMDB (sample photos repeated
to ``--pairs`` image–text pairs), and the script prints samples/s of each
(median over steps after ``--skip`` warm-up steps) and the ratio to fine-tuning.

CPU (tiny presets, minutes)::

    python benchmarks/train_throughput.py --preset tiny --teacher random:preset:demo --batch-size 32 --steps 12

GPU (ViT-B-16 student, ViT-H-14 and ViT-L-14 teachers, random weights, no download)::

    python benchmarks/train_throughput.py --batch-size 128 --steps 40 --compile \\
        --teacher random:ViT-H-14 --teacher random:ViT-L-14 --workers 12
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

import torch

from cnclip_kd import SAMPLE_DATA
from cnclip_kd.data.prepare import write_lmdb_split
from cnclip_kd.distill.config import TrainConfig
from cnclip_kd.distill.checkpoints import read_history
from cnclip_kd.distill.trainer import train


def make_lmdb(root: Path, pairs: int) -> Path:
    """A train LMDB of ``pairs`` pairs cycling through the sample photos (no labels needed)."""
    import csv

    rows = list(csv.DictReader(open(SAMPLE_DATA / "manifest.csv", encoding="utf-8")))
    images, texts = [], []
    import base64

    for i in range(pairs):
        row = rows[i % len(rows)]
        data = (SAMPLE_DATA / row["image"]).read_bytes()
        images.append((i + 1, base64.urlsafe_b64encode(data).decode()))
        texts.append((i + 1, i + 1, row["text"]))
    split = root / "lmdb" / "train"
    split.mkdir(parents=True)
    write_lmdb_split(split, images, texts)
    return split


def run_mode(name: str, lmdb: Path, logs: Path, args, **overrides) -> dict:
    arch = {"preset": args.preset} if args.preset else {"vision_model": args.vision_model,
                                                         "text_model": args.text_model}
    cfg = TrainConfig(train_data=str(lmdb), logs=str(logs), name=name, batch_size=args.batch_size,
                      max_steps=args.steps, max_epochs=1, lr=1e-5, warmup=1, num_workers=args.workers,
                      compile=args.compile, precision=args.precision, save_epoch_frequency=0,
                      teacher_batch_size=args.batch_size * 2, **arch, **overrides)
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    steps = [r for r in read_history(logs / name) if "samples_per_s" in r]
    rates = [r["samples_per_s"] for r in steps[args.skip:]] or [r["samples_per_s"] for r in steps]
    return {"mode": name, "samples_per_s": statistics.median(rates), "steps": len(steps), "wall_s": wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help="student preset (tiny/demo); default: real architectures")
    p.add_argument("--vision-model", default="ViT-B-16")
    p.add_argument("--text-model", default="RoBERTa-wwm-ext-base-chinese")
    p.add_argument("--teacher", action="append", default=None,
                   help="teacher(s), e.g. random:ViT-H-14 (repeatable); default random:ViT-H-14")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per mode")
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the median")
    p.add_argument("--pairs", type=int, default=0, help="dataset size (default: steps × batch, one epoch)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--precision", default="auto")
    p.add_argument("--json", default=None, help="also write the table here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    teachers = args.teacher or ["random:ViT-H-14"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"student {args.preset or args.vision_model}; batch {args.batch_size}; compile {args.compile}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lmdb = make_lmdb(tmp / "data", args.pairs or args.steps * args.batch_size)
        results = [run_mode("finetune", lmdb, tmp / "runs", args)]
        print(json.dumps(results[-1]), flush=True)
        for teacher in teachers:
            tag = teacher.split(":")[-1]
            for mode, cache in (("online", False), ("cached", True)):
                results.append(run_mode(f"kd-{mode}-{tag}", lmdb, tmp / "runs", args, distillation=True,
                                        teacher_model_name=teacher, teacher_cache=cache,
                                        teacher_cache_dir=str(tmp / "cache")))
                print(json.dumps(results[-1]), flush=True)
    base = results[0]["samples_per_s"]
    print("\n| mode | samples/s | × fine-tune | steps | wall s |\n|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['mode']} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / base:.2f} | {r['steps']} | "
              f"{r['wall_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
