"""What an online teacher costs on the CPU at each input side, and what each saving costs in the teacher's own P@10.

Issue 20 asks for an online teacher (one that encodes every training batch as it
comes, instead of the kit's cached features) whose cost fits a CPU. The knobs are
a lower input side, channels-last memory (the kit's image teachers already run
so) and bf16 autocast where the CPU computes bf16 natively
(:func:`cnclip_kd.core.precision.native_bf16`). For the demo teacher
(``efficientnet-lite2``, 260 px; ``--teacher`` for another) at each side in
``--sides`` this script measures:

- encode time per image, batch 64, on the CPU: the median of 3 timed batches after
  1 warm-up, under ``torch.inference_mode``, channels-last input; fp32, and bf16
  autocast where the CPU has it natively ("-" otherwise: emulated bf16 is several
  times slower than fp32);
- the teacher's *own* image→image quality at that side: category P@10 / mAP@10
  on the prepared test split and P@10 on the valid split, leave-one-out, through
  the same code as :func:`cnclip_kd.notebook.experiments.evaluate_teacher`
  (:func:`cnclip_kd.distill.validation.evaluate_encoder`), in fp32 and (where
  native) bf16 autocast. Channels-last changes only the memory layout, not the
  arithmetic, so it costs no P@10;
- what that means for one training run of notebook 02's ``demo`` preset: an online
  teacher encodes ``epochs × ceil(train images / batch) × batch`` images per run,
  the cached path ``(augment views + 1) × train images`` once.

At each side the teacher's own preprocessing is rebuilt with only the side changed
(same class, interpolation, mean/std, order of steps: ``Teacher.transform``'s
``describe()`` fed back to its constructor), so the own-side row is exactly
``evaluate_teacher``'s.

Usage (about 2 minutes on 2 CPU cores; the sample data is prepared once in --work-dir)::

    python benchmarks/teacher_cost.py --sides 260,224,192,160,128 --work-dir out/teacher_cost \
        --out out/teacher_cost.json

On a CPU that other jobs keep busy add ``--threads 1``: with every core's thread in each parallel region, one
descheduled thread stalls the rest (measured: 36 ms/image instead of 3 on 2 shared cores).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from _report import emit  # benchmarks/ is on sys.path when run as a script

logger = logging.getLogger("teacher_cost")

#: Images per timed batch.
BATCH = 64


def transform_at(transform, side: int):
    """The teacher's own preprocessing with only the input side changed.

    Args:
        transform: A teacher's ``transform`` (the kit's ``_ImageTransform``: its ``describe()`` gives exactly
            its constructor's arguments).
        side: The new square input side in pixels.

    Returns:
        A transform of the same class and parameters at ``side``.

    Raises:
        TypeError: The transform cannot describe itself.
    """
    describe = getattr(transform, "describe", None)
    if describe is None:
        raise TypeError(f"{transform!r} has no describe(): cannot rebuild it at another side")
    return type(transform)(**{**describe(), "resolution": int(side)})


def time_encode(encode: Callable, batch, *, autocast_dtype=None, repeats: int = 3, warmup: int = 1) -> float:
    """Milliseconds per image of ``encode(batch)``: the median of ``repeats`` timed batches after ``warmup``.

    Args:
        encode: Batch of images -> features.
        batch: The input batch (channels-last).
        autocast_dtype: ``torch.bfloat16`` for bf16 autocast on the CPU; ``None`` for fp32.
        repeats: Timed batches.
        warmup: Untimed batches first.
    """
    import torch

    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    times = []
    with torch.inference_mode(), ctx:
        for _ in range(warmup):
            encode(batch)
        for _ in range(repeats):
            t0 = time.perf_counter()
            encode(batch)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) / len(batch) * 1000.0


def first_batch(transform, lmdb_dir: Path, n: int = BATCH):
    """``n`` images of a split through ``transform`` (repeated if the split is smaller), channels-last."""
    import torch

    from cnclip_kd.distill.teacher_cache import LMDBImages

    ds = LMDBImages(lmdb_dir, transform)
    images = [ds[i % len(ds)][1] for i in range(n)]
    return torch.stack(images).contiguous(memory_format=torch.channels_last)


def side_problem(teacher, side: int) -> str | None:
    """Why ``teacher``'s network cannot encode ``side`` px images (one zero image tried), or None if it can.

    Convolutional teachers take any side; a cn_clip ViT's position embeddings fix its side.
    """
    import torch

    try:
        with torch.inference_mode():
            teacher.encode_image(torch.zeros(1, 3, side, side).contiguous(memory_format=torch.channels_last))
    except RuntimeError as err:
        first = (str(err).strip().splitlines() or [""])[0]
        return f"{teacher.name} does not take {side} px input ({type(err).__name__}: {first})"
    return None


def machine_line() -> str:
    """CPU model, its AVX2 / AVX-512 / VNNI / bf16 / AMX flags, cores, torch threads and the load at the time."""
    import torch

    from cnclip_kd.deploy.planner import cpu_features

    cpu = cpu_features()
    threads = torch.get_num_threads()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"Machine: {cpu['cpu']}, {cpu['cores']} cores, CPU flags: {', '.join(cpu['isa']) or 'no AVX2'}; "
            f"torch {torch.__version__}, {threads} thread{'' if threads == 1 else 's'}; load average {load} (1/5/15 min).")


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="", help="teacher (empty: the demo preset's, efficientnet-lite2)")
    p.add_argument("--sides", default="260,224,192,160,128", help="input sides in pixels, comma-separated")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default, all cores). On a CPU that other processes keep busy, "
                        "use 1: a parallel region waits for its slowest thread, and a descheduled one can make "
                        "the timings several times too slow")
    p.add_argument("--work-dir", default=None, help="the sample data is prepared here once (default: a temp folder)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    command = " ".join(["python benchmarks/teacher_cost.py", *map(shlex.quote, argv)])
    t_start = time.perf_counter()

    import torch

    from cnclip_kd.core.precision import native_bf16, set_torch_threads
    from cnclip_kd.data.prepare import ensure_dataset
    from cnclip_kd.distill.validation import evaluate_encoder
    from cnclip_kd.models.teachers import load_teacher
    from cnclip_kd.notebook.experiments import DEMO_TEACHER, preset_values

    set_torch_threads(args.threads)
    sides = [int(s) for s in args.sides.split(",") if s.strip()]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="teacher-cost-"))
    data_dir = work / "data"
    report = ensure_dataset(data_dir)
    n_train = sum(report.counts.get("train", {}).values())
    lmdb = data_dir / "lmdb"
    demo = preset_values("demo")
    epochs, batch, views = int(demo["max_epochs"]), int(demo["batch_size"]), int(demo["augment_views"])
    steps = epochs * math.ceil(n_train / batch)
    online_images = steps * batch
    cached_images = (views + 1) * n_train

    teacher_name = args.teacher or DEMO_TEACHER
    teacher = load_teacher(teacher_name, device="cpu")
    own = teacher.resolution
    bf16 = native_bf16()

    def encode(x):
        return torch.nn.functional.normalize(teacher.encode_image(x), dim=-1)

    rows, skipped = [], {}
    for side in sides:
        reason = side_problem(teacher, side)
        if reason is not None:
            skipped[side] = reason
            logger.warning("%d px skipped: %s", side, reason)
            continue
        t0 = time.perf_counter()
        transform = transform_at(teacher.transform, side)
        x = first_batch(transform, lmdb / "test")
        ms_fp32 = time_encode(teacher.encode_image, x)
        ms_bf16 = time_encode(teacher.encode_image, x, autocast_dtype=torch.bfloat16) if bf16 else None
        test = evaluate_encoder(encode, transform, lmdb / "test", batch_size=BATCH)
        valid = evaluate_encoder(encode, transform, lmdb / "valid", batch_size=BATCH)
        test_bf16 = (evaluate_encoder(encode, transform, lmdb / "test", batch_size=BATCH,
                                      autocast_dtype=torch.bfloat16) if bf16 else None)
        row = {"side": side, "own": side == own, "transform": transform.describe(),
               "ms_fp32": ms_fp32, "ms_bf16": ms_bf16,
               "test": {k: test[k] for k in ("p@10", "map@10")}, "valid": {k: valid[k] for k in ("p@10", "map@10")},
               "test_bf16": None if test_bf16 is None else {k: test_bf16[k] for k in ("p@10", "map@10")},
               "online_s_fp32": online_images * ms_fp32 / 1000.0,
               "online_s_bf16": None if ms_bf16 is None else online_images * ms_bf16 / 1000.0,
               "cached_s_fp32": cached_images * ms_fp32 / 1000.0,
               "cached_s_bf16": None if ms_bf16 is None else cached_images * ms_bf16 / 1000.0}
        rows.append(row)
        logger.info("%d px: %.2f ms/image fp32%s, test P@10 %.3f (%.0f s)", side, ms_fp32,
                    "" if ms_bf16 is None else f", {ms_bf16:.2f} bf16", test["p@10"], time.perf_counter() - t0)

    if not rows:
        sys.stderr.write(f"teacher_cost.py: error: {teacher_name} takes none of the sides {sides}: {skipped}\n")
        return 2
    base = next((r for r in rows if r["own"]), rows[0])
    lines = [("| side 边长 | ms/image fp32 | ms/image bf16 | P@10 test | mAP@10 test | P@10 valid | P@10 test bf16 | "
              "online s/run fp32 | online s/run bf16 | cached s (once) fp32 |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        own_tag = " (own)" if r["own"] else ""
        dp = r["test"]["p@10"] - base["test"]["p@10"]
        lines.append(
            f"| {r['side']} px{own_tag} | {r['ms_fp32']:.2f} | {_cell(r['ms_bf16'], '.2f')} | "
            f"{r['test']['p@10']:.3f} ({dp:+.3f}) | {r['test']['map@10']:.3f} | {r['valid']['p@10']:.3f} | "
            f"{'-' if r['test_bf16'] is None else format(r['test_bf16']['p@10'], '.3f')} | "
            f"{_secs(r['online_s_fp32'])} | {_secs(r['online_s_bf16'])} | {_secs(r['cached_s_fp32'])} |")
    pre = teacher.transform.describe()
    machine = machine_line()
    text = "\n".join([
        f"## Online teacher cost on this CPU: {teacher_name} ({own} px own side), per input side",
        "",
        f"Made by: `{command}`",
        "",
        machine,
        *([] if bf16 else ["", "bf16: not native on this CPU, skipped."]),
        "",
        *lines,
        "",
        (f"- ms/image: batch {BATCH}, median of 3 timed batches after 1 warm-up, `torch.inference_mode`, "
         "channels-last input; bf16 = `torch.autocast('cpu', torch.bfloat16)`."),
        (f"- P@10 / mAP@10: the teacher's own image→image category retrieval (leave-one-out) on the prepared "
         f"test ({sum(report.counts.get('test', {}).values())} images) and valid "
         f"({sum(report.counts.get('valid', {}).values())}) splits, in brackets the change from the "
         f"{base['side']} px row; the teacher's preprocessing at each side: {pre['interpolation']} resize to a "
         f"square of that side (no crop), mean/std {pre['mean']} / {pre['std']}. Channels-last changes only "
         "the memory layout, so it costs no P@10."),
        (f"- One run of notebook 02's demo preset: {epochs} epochs × ceil({n_train} / {batch}) = {steps} steps × "
         f"{batch} = {online_images:,} teacher images online (every view encoded as it comes), against "
         f"({views} views + 1) × {n_train} = {cached_images:,} images encoded once on the cached path "
         "(and reused by every later run with the same teacher)."),
        *[f"- Skipped {side} px: {reason}" for side, reason in skipped.items()],
        f"- Whole benchmark {time.perf_counter() - t_start:.0f} s.",
    ])
    emit(text, args.out, {"args": vars(args), "command": command, "teacher": teacher_name, "own_side": own,
                          "native_bf16": bf16, "machine": machine, "threads": torch.get_num_threads(),
                          "demo": {"epochs": epochs, "batch": batch, "views": views, "train_images": n_train,
                                   "steps": steps, "online_images": online_images, "cached_images": cached_images},
                          "rows": rows, "skipped": {str(k): v for k, v in skipped.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
