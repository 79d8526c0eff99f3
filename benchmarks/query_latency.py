"""Query latency on the CPU: JPEG bytes → Top-10 ids, end to end, per encoder back-end, side by side.

The encoders are real architectures side by side — ViT-B-16 and RN50 by default
(``--vision-models``), each at its own trained resolution, random weights: the
speed does not depend on the values); the gallery is ``--gallery`` synthetic
clustered unit vectors in a real saved index per embedding size
(``GalleryIndex``, ``auto`` kind: HNSW at 100k). Queries are sample photos
upscaled to the sizes users send (800×800 product images, 1920×1080 phone
photos) and saved as JPEG.

Back-ends per model: PyTorch eager fp32 (the first model's is the baseline
every speed-up is relative to), ONNX fp32, ONNX dynamic int8 (``onnx-int8``)
and ONNX static int8 (``onnx-int8-static``: calibrated QDQ, what a
convolutional student needs — dynamic int8 turns convolutions into slow
ConvInteger); for the first model also bf16 autocast and torch.compile.

Every back-end runs in its own process (its own RSS, no thread pools
fighting each other) through :class:`cnclip_kd.deploy.runtime.Retriever`; the
coordinator sends the same query to each in turn, in a shuffled order every
round, so a machine whose speed drifts slows them all alike. Reported: p50/p95
of the total and its split (decode + preprocess, encode, search), the speed-up
of the p50 total over the torch eager fp32 baseline, peak and resident RSS
(the ONNX processes import no torch), the verdicts against the targets
(p50 ≤ 50 ms for 800×800, ≤ 60 ms for 1920×1080, ≥ 4× the baseline), the export
check (fp32 / int8 cosine to PyTorch), the cosine of a DCT-scaled (draft)
decode to a full decode, and decode times of both.

Rows ``onnx-int8 @N px`` (``--sides``): the same weights at smaller input sides
(fewer tokens; what a student trained with ``--image-resolution N`` serves). The
verdicts are given both for the model as trained and for any side; what a
smaller side costs in quality is ``benchmarks/resolution_quality.py``'s question.

Text queries (``--text``, on by default): realistic Chinese queries typed into
the search box (Latin, digits and a query longer than the context length
among them), end to end through :meth:`cnclip_kd.deploy.runtime.Retriever.search_text`
— check + tokenise (cn_clip's tokenizer, numpy), encode (the text tower at the
query's own length), search — against the first vision model's index, with that
model's text tower for each ``--text-models`` architecture (random weights;
RoBERTa-wwm-ext-base-chinese: 12 layers, RBT3: 3; a preset has its own) as
PyTorch fp32 (``torch-text``, the baseline) and ONNX fp32 / int8
(:func:`cnclip_kd.deploy.export.export_text_onnx`), each in its own process.
Printed beside the image queries, with the verdicts against the targets (p50 ≤
20 ms with RoBERTa-base, ≤ 8 ms with RBT3). Any worker that fails stops the run:
its error is printed and the exit status is 1.

Usage (about 8–12 minutes on 2 cores)::

    python benchmarks/query_latency.py --threads 2 --out out/deploy/latency.json

Text queries only (about 3 minutes)::

    python benchmarks/query_latency.py --no-image --threads 2

Quick check of the script itself (small presets, small gallery)::

    python benchmarks/query_latency.py --preset tiny,demo-resnet --gallery 2000 --repeats 2 --no-compile
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import Worker as ProcessWorker, WorkerError, exit_on_worker_error  # noqa: E402

logger = logging.getLogger("query_latency")

SIZES = {"800×800": (800, 800), "1920×1080": (1920, 1080)}
BASELINE = "torch"
TEXT_BASELINE = "torch-text"
DEFAULT_TEXT = "RoBERTa-wwm-ext-base-chinese"
#: p50 targets of an end-to-end text query per text architecture (ms, 2 cores).
#: p50 targets of an end-to-end image query per query size (ms, 2 cores), with ≥ 4× the torch fp32 baseline.
TARGETS = {"800×800": 50.0, "1920×1080": 60.0}
TEXT_TARGETS = {"RoBERTa-wwm-ext-base-chinese": 20.0, "RBT3-chinese": 8.0}
#: What users type: short Chinese queries, Latin and digits among them, and one longer than the context length.
TEXT_QUERIES = (
    "连衣裙",
    "白色连衣裙",
    "男士 休闲 长裤",
    "夏季 纯棉 短袖T恤 宽松",
    "Nike 运动鞋 42码",
    "2024新款 韩版 oversize 卫衣 女 秋冬 加绒 加厚 宽松 显瘦 百搭 学生 长袖 上衣 外套 潮牌 ins风 "
    "情侣装 男女同款 黑色 灰色 白色 M L XL XXL",
)


# --------------------------------------------------------------------------- worker processes


def _status_mb(key: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of this process, in MiB. (Not ru_maxrss: Linux carries it over
    from the parent through fork + exec, so every spawned worker would report at least the coordinator's peak.)"""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(key + ":")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(conn, index_dir: str, encoder: str, backend: str, threads: int, text: bool) -> None:
    """Serve queries from one Retriever until told to stop (``text``: a text encoder, text queries)."""
    logging.basicConfig(level=logging.WARNING)
    from cnclip_kd.deploy.runtime import Retriever

    t0 = time.perf_counter()
    if text:
        retriever = Retriever.load(index_dir, text_encoder=encoder, threads=threads)
        name = retriever.text_backend  # loads it here, not at the first query
        retriever_full = None
    else:
        retriever = Retriever.load(index_dir, encoder, backend=backend, threads=threads)
        name = retriever.backend
        retriever_full = Retriever(retriever.index, retriever.encoder, fast_decode=False)
    conn.send({"ready": True, "backend": name, "load_s": time.perf_counter() - t0,
               "torch_imported": "torch" in sys.modules})
    while True:
        cmd, payload = conn.recv()
        if cmd == "search":
            conn.send(retriever.search(payload, 10).timings_ms)
        elif cmd == "search_text":
            result = retriever.search_text(payload, 10)
            conn.send({**result.timings_ms, "n_tokens": result.query["n_tokens"],
                       "truncated": result.query["truncated"]})
        elif cmd == "embed":
            conn.send((retriever.embed(payload), retriever_full.embed(payload)))
        elif cmd == "rss":
            conn.send((_status_mb("VmHWM"), _status_mb("VmRSS")))
        else:
            conn.send(None)
            return


class Worker(ProcessWorker):
    """A back-end in its own process; if it fails or dies, :class:`WorkerError` says why (no waiting forever)."""

    def __init__(self, name: str, index_dir: Path, encoder: Path, backend: str, threads: int, text: bool = False):
        super().__init__(name, _worker, str(index_dir), str(encoder), backend, threads, text)
        try:
            ready = self.recv()
        except WorkerError:
            self.stop()
            raise
        self.load_s = ready["load_s"]
        self.torch_imported = ready["torch_imported"]
        logger.info("%s ready (%s) in %.1f s", name, ready["backend"], self.load_s)

    def ask(self, cmd: str, payload=None):
        """Send ``cmd`` with ``payload`` and return the reply."""
        return super().ask((cmd, payload))


# --------------------------------------------------------------------------- inputs


def make_checkpoint(work: Path, arch: str, side: int | None = None, text_model: str | None = None) -> Path:
    """A random-weight student checkpoint of ``arch`` (a cn_clip vision architecture or a kit preset; cn_clip
    format, with model_info); at input ``side`` when given (the same weights, position embeddings interpolated:
    what ``--image-resolution`` training starts from), with the text tower ``text_model`` (default
    RoBERTa-wwm-ext-base-chinese; a preset has its own)."""
    import torch

    from cnclip_kd.models.students import PRESETS, cnclip_state_dict, load_student

    preset = arch if arch in PRESETS else None
    text = None if preset or text_model in (None, DEFAULT_TEXT) else text_model
    path = work / f"random-{arch}{f'@{text}' if text else ''}{f'-{side}px' if side else ''}.pt"
    if not path.is_file():
        torch.manual_seed(0)
        if side:
            model, info = load_student(make_checkpoint(work, arch), image_resolution=side)
        else:
            model, info = load_student(None, vision_model=None if preset else arch, text_model=text or DEFAULT_TEXT,
                                       preset=preset)
        tmp = path.with_suffix(".tmp")
        torch.save({"state_dict": cnclip_state_dict(model), "model_info": info}, tmp)
        os.replace(tmp, path)
    return path


def export_models(work: Path, ckpt: Path, stem: str, threads: int, text: bool = False) -> dict:
    """fp32 + int8 ONNX of ``ckpt``'s image (or ``text``) tower as ``{work}/{stem}.onnx`` (reused from an
    earlier run into --work-dir). For the image tower every int8 method's file is kept side by side
    (``int8_files``: method → path): the export keeps the one it chose, the others are quantised the same way."""
    from cnclip_kd.deploy.export import export_onnx, export_text_onnx, quantize_image_onnx
    from cnclip_kd.deploy.quantize import INT8_METHODS, int8_path

    onnx_path = work / f"{stem}.onnx"
    report_path = work / f"{stem}.report.json"
    methods = {} if text else {m: work / f"{stem}.int8-{m}.onnx" for m in INT8_METHODS}
    fresh = [int8_path(onnx_path), report_path, *methods.values()]
    if all(f.is_file() and f.stat().st_mtime >= ckpt.stat().st_mtime for f in fresh):
        report = json.loads(report_path.read_text(encoding="utf-8"))
    else:
        export = export_text_onnx if text else export_onnx
        report = export(ckpt, onnx_path, quantize=True, max_images=24, threads=threads, timing_runs=3)
        kept = (report.get("int8") or {}).get("method") if (report.get("int8") or {}).get("kept") else None
        for method, path in methods.items():
            if method == kept:  # the export already wrote this one: copy it, do not quantise it again
                shutil.copyfile(int8_path(onnx_path), path)
            else:
                quantize_image_onnx(onnx_path, path, method, calibration_size=32)
    if methods:
        report["int8_files"] = {m: str(p) for m, p in methods.items()}
    return report


def make_queries(n: int) -> dict[str, list[bytes]]:
    """``n`` sample photos (different categories) upscaled to each size, as JPEG (quality 90)."""
    from cnclip_kd.deploy.planner import sample_queries

    return {label: sample_queries(n, size) for label, size in SIZES.items()}


def decode_times(queries: dict[str, list[bytes]], resolution: int, repeats: int) -> dict:
    """p50 decode + preprocess time of the full and the draft decode, per size (in this process)."""
    from cnclip_kd.deploy.backends import load_query_image, to_pixels

    out = {}
    for label, qs in queries.items():
        row = {}
        for mode, draft in (("full", None), ("draft", resolution)):
            times = []
            for _ in range(repeats):
                for q in qs:
                    t0 = time.perf_counter()
                    to_pixels(load_query_image(q, draft_size=draft), resolution)
                    times.append((time.perf_counter() - t0) * 1e3)
            row[mode] = round(statistics.median(times), 2)
        out[label] = row
    return out


# --------------------------------------------------------------------------- report


def machine() -> dict:
    import onnxruntime
    import torch

    from cnclip_kd.deploy.planner import cpu_features

    cpu = cpu_features()
    return {"cpu": cpu["cpu"], "isa": cpu["isa"], "cores": cpu["cores"],
            "load_avg": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def table(rows: list[dict]) -> str:
    from cnclip_kd.deploy.latency import latency_markdown

    return latency_markdown(rows)


def time_rounds(workers: dict, queries: dict, cmd: str, args, baseline: str) -> tuple[dict, list[str]]:
    """Send every query to every worker in a shuffled order, ``warmup + repeats`` passes; returns the timings
    per (query label, worker) and the workers dropped for being far slower than ``baseline``."""
    timings = {(label, name): [] for label in queries for name in workers}
    rng = random.Random(0)
    active, dropped = list(workers), []
    for rep in range(args.warmup + args.repeats):
        for label, qs in queries.items():
            for q in qs:
                order = list(active)
                rng.shuffle(order)
                for name in order:
                    time.sleep(args.gap_ms / 1e3)
                    t = workers[name].ask(cmd, q)
                    if rep >= args.warmup:
                        timings[(label, name)].append(t)
        if rep - args.warmup + 1 >= 2 and baseline in workers:
            # A back-end far slower than the baseline has made its point; spare the run its time.
            first = next(iter(queries))
            base = statistics.median(t["total"] for t in timings[(first, baseline)])
            for name in [n for n in active if n != baseline]:
                mine = statistics.median(t["total"] for t in timings[(first, name)])
                if mine > args.slow_factor * base:
                    active.remove(name)
                    dropped.append(name)
                    logger.info("%s: p50 %.0f ms > %.1f× the baseline; timed on %d passes only", name, mine,
                                args.slow_factor, rep - args.warmup + 1)
    return timings, dropped


def _row_name(arch: str, backend: str, several: bool) -> str:
    return f"{arch} · {backend}" if several else backend


def run_image(args, work: Path, models: list[str], indexes: dict[int, Path]) -> dict:
    """The image-query part: exports, back-ends, timings, table rows and report lines, for every vision model
    (each at its own trained resolution; the first model's also at the smaller ``--sides``)."""
    from cnclip_kd.deploy.latency import summarize_timings

    several = len(models) > 1
    queries = make_queries(args.queries)
    backends: dict[str, tuple[Path, str, Path]] = {}
    exports, side_exports, info0 = {}, {}, {}
    for i, arch in enumerate(models):
        info = _model_info(arch)
        if i == 0:
            info0 = info
        index_dir = indexes[int(info["embed_dim"])]
        ckpt = make_checkpoint(work, arch)
        stem = f"image_encoder_{arch}"  # one per model: a --work-dir reused with other models never mixes them
        export = exports[arch] = export_models(work, ckpt, stem, args.threads)
        onnx_path, files = Path(export["fp32"]["path"]), export["int8_files"]
        names = {"torch": (ckpt, "torch")}
        if i == 0:
            names["torch-bf16"] = (ckpt, "torch-bf16")
        names.update({"onnx-fp32": (onnx_path, "onnx"), "onnx-int8": (Path(files["dynamic"]), "onnx"),
                      "onnx-int8-static": (Path(files["static"]), "onnx")})
        if i == 0 and args.compile:
            names["torch-compile"] = (ckpt, "torch-compile")
        if i == 0 and info.get("vision_patch_size"):
            resolution = int(info["image_resolution"])
            for side in sorted({int(x) for x in args.sides.split(",") if x.strip()} - {resolution}, reverse=True):
                rep = side_exports[side] = export_models(work, make_checkpoint(work, arch, side),
                                                         f"image_encoder_{arch}_{side}px", args.threads)
                names[f"onnx-int8 @{side}px"] = (Path(rep["int8"]["path"]), "onnx")
        for name, (enc, backend) in names.items():
            backends[_row_name(arch, name, several)] = (enc, backend, index_dir)
    baseline = _row_name(models[0], BASELINE, several)
    export_s = sum(e.get("export_s", 0.0) + sum(b.get("quantize_s", 0.0) for b in e.get("int8_methods", {}).values())
                   for e in [*exports.values(), *side_exports.values()])
    resolution0 = int(info0["image_resolution"])
    decode = decode_times(queries, resolution0, repeats=3)

    workers = {}
    try:
        for name, (enc, backend, index_dir) in backends.items():
            workers[name] = Worker(name, index_dir, enc, backend, args.threads)
        # Draft vs full decode: embedding cosine, with the first model's fp32 ONNX encoder.
        decode_cos = {}
        fp32_worker = workers[_row_name(models[0], "onnx-fp32", several)]
        for label, qs in queries.items():
            pairs = [fp32_worker.ask("embed", q) for q in qs]
            cos = [float(a @ b) for a, b in pairs]
            decode_cos[label] = {"min": round(min(cos), 5), "mean": round(statistics.mean(cos), 5)}
        timings, dropped = time_rounds(workers, queries, "search", args, baseline)
        rss = {name: w.ask("rss") for name, w in workers.items()}
        load_s = {name: round(w.load_s, 1) for name, w in workers.items()}
        torch_free = {name: not w.torch_imported for name, w in workers.items() if "onnx" in name}
    finally:
        for w in workers.values():
            w.stop()

    rows = []
    for label in queries:
        base = summarize_timings(timings[(label, baseline)])["total"]["p50"]
        for name in workers:
            s = summarize_timings(timings[(label, name)])
            rows.append({"query": label, "backend": name, **s, "speedup": round(base / s["total"]["p50"], 2),
                         "rss_mb": round(rss[name][0], 0), "rss_now_mb": round(rss[name][1], 0)})
    verdicts = []
    for label in queries:
        mine = [r for r in rows if r["query"] == label]
        own = [r for r in mine if "@" not in r["backend"].split(" · ")[-1]]
        for what, pool in (("a model at its own trained resolution", own),
                           ("at any input side", mine if len(mine) > len(own) else [])):
            if not pool:
                continue
            r = min(pool, key=lambda r: r["total"]["p50"])
            ok = r["total"]["p50"] <= TARGETS[label] and r["speedup"] >= 4.0
            verdicts.append(f"- {label}, {what}: best **{r['backend']}** p50 {r['total']['p50']:.1f} ms "
                            f"(target ≤ {TARGETS[label]:.0f} ms), {r['speedup']:.2f}× the {baseline} fp32 "
                            f"baseline (target ≥ 4×): {'met' if ok else 'NOT met'}")
    sides = sorted(side_exports, reverse=True)
    patch = info0.get("vision_patch_size")
    int8_notes = []
    for arch, e in exports.items():
        blocks = e.get("int8_methods", {})
        int8_notes.append(
            f"{arch}: fp32 cosine to PyTorch ≥ {e['fp32']['cosine_min']:.6f} on {e['n_images']} photos; "
            + "; ".join(f"{m} int8 cosine mean {b['cosine_mean']:.5f} (min {b['cosine_min']:.5f}), "
                        f"{b['mb']:.0f} MB, encode {b['encode_ms']:.1f} ms" for m, b in blocks.items())
            + f" (fp32 {e['fp32']['mb']:.0f} MB, {e['fp32']['encode_ms']:.1f} ms; export check, random weights).")
    rss_models = {name: r for name, r in rss.items() if "onnx-int8" in name and "@" not in name}
    lines = [
        f"### Image queries ({args.queries} photos × {args.repeats} passes per size and back-end)"
        + (f"; {', '.join(dropped)}: more than {args.slow_factor:g}× slower than the baseline, timed on 2 passes"
           if dropped else ""),
        "",
        table(rows),
        "",
        *verdicts,
        "",
        f"Export + quantisation {export_s:.0f} s. " + " ".join(int8_notes),
        "`onnx-int8` is ONNX Runtime's dynamic quantisation, `onnx-int8-static` the calibrated static (QDQ) one.",
        (f"Rows `@N px`: the same weights at a smaller input side ({', '.join(map(str, sides))} px: "
         + ", ".join(f"{(sd // patch) ** 2 + 1}" for sd in sides)
         + f" tokens instead of {(resolution0 // patch) ** 2 + 1}). Such a student must be "
         "trained at that side (`--image-resolution`); its quality cost is measured by "
         "benchmarks/resolution_quality.py, not here." if sides and patch else ""),
        "Decode + preprocess p50 (ms), full vs draft: " + "; ".join(
            f"{label} {d['full']:.1f} vs {d['draft']:.1f}" for label, d in decode.items())
        + ". Embedding cosine draft vs full decode (ONNX fp32): " + "; ".join(
            f"{label} min {c['min']:.4f}, mean {c['mean']:.4f}" for label, c in decode_cos.items()) + ".",
        "Resident memory after the run (MB; the peak includes loading): "
        + ", ".join(f"{n} {r[1]:.0f}" for n, r in rss.items()) + ".",
        "ONNX serving processes (index + int8 image encoder, no torch imported: "
        + f"{all(torch_free.values())}): " + ", ".join(
            f"{n} {r[1]:.0f} MB resident, {r[0]:.0f} MB peak" for n, r in rss_models.items()) + ".",
        f"Back-end load times (s): {load_s}.",
    ]
    return {"rows": rows, "lines": lines, "export": exports[models[0]], "exports": exports,
            "side_exports": side_exports, "decode_ms": decode, "decode_cosine": decode_cos, "load_s": load_s,
            "torch_free": torch_free}


def _presets() -> dict:
    from cnclip_kd.models.students import PRESETS

    return PRESETS


def _model_info(arch: str) -> dict:
    from cnclip_kd.models.students import model_info

    return model_info(preset=arch) if arch in _presets() else model_info(arch)


def _short_text_name(text_model: str | None) -> str:
    return {"RoBERTa-wwm-ext-base-chinese": "RoBERTa-base (12 layers)", "RBT3-chinese": "RBT3 (3 layers)",
            "RoBERTa-wwm-ext-large-chinese": "RoBERTa-large (24 layers)"}.get(text_model or "", text_model or "preset")


def run_text(args, work: Path, vision: str, index_dir: Path) -> dict:
    """The text-query part: per text architecture, torch / ONNX fp32 / ONNX int8 text encoders, timed end to end.

    The text towers are those of ``vision``'s model, the model whose embedding size ``index_dir`` holds: a
    cn_clip text tower projects into its own model's embedding space (a preset has a text tower of its own).
    """
    from cnclip_kd.deploy.latency import summarize_timings
    from cnclip_kd.deploy.quantize import int8_path
    from cnclip_kd.core.tokenizer import tokenize

    preset = vision in _presets()
    text_models = [None] if preset else [t.strip() for t in args.text_models.split(",") if t.strip()]
    queries = list(TEXT_QUERIES)
    rows, exports, verdicts, notes, load_s, torch_free = [], {}, [], [], {}, {}
    for tm in text_models:
        label = f"text · {_short_text_name(tm)}"
        ckpt = make_checkpoint(work, vision, text_model=tm)
        stem = f"text_encoder_{vision}" + ("" if tm in (None, DEFAULT_TEXT) else f"_{tm}")
        export = exports[label] = export_models(work, ckpt, stem, args.threads, text=True)
        fp32 = Path(export["fp32"]["path"])
        backends = {TEXT_BASELINE: ckpt, "onnx-text-fp32": fp32, "onnx-text-int8": int8_path(fp32)}
        workers = {}
        try:
            for name, enc in backends.items():
                workers[name] = Worker(f"{name} ({label})", index_dir, enc, "auto", args.threads, text=True)
            timings, dropped = time_rounds(workers, {label: queries}, "search_text", args, TEXT_BASELINE)
            rss = {name: w.ask("rss") for name, w in workers.items()}
            load_s[label] = {name: round(w.load_s, 1) for name, w in workers.items()}
            torch_free[label] = {name: not w.torch_imported for name, w in workers.items()}
        finally:
            for w in workers.values():
                w.stop()
        base = summarize_timings(timings[(label, TEXT_BASELINE)])["total"]["p50"]
        for name in workers:
            s = summarize_timings(timings[(label, name)])
            rows.append({"query": label, "backend": name, **s, "speedup": round(base / s["total"]["p50"], 2),
                         "rss_mb": round(rss[name][0], 0), "rss_now_mb": round(rss[name][1], 0)})
        best = min((r for r in rows if r["query"] == label), key=lambda r: r["total"]["p50"])
        target = TEXT_TARGETS.get(tm or "")
        verdicts.append(f"- {label}: best **{best['backend']}** p50 {best['total']['p50']:.1f} ms "
                        f"(p95 {best['total']['p95']:.1f}; tokenise {best['decode']['p50']:.2f}, encode "
                        f"{best['encode']['p50']:.1f}, search {best['search']['p50']:.2f})"
                        + (f", target ≤ {target:.0f} ms: {'met' if best['total']['p50'] <= target else 'NOT met'}"
                           if target else "")
                        + f"; {best['speedup']:.2f}× the torch fp32 text tower")
        q = export["int8"]
        notes.append(f"{label}: export check fp32 cosine ≥ {export['fp32']['cosine_min']:.6f} on "
                     f"{export['n_texts']} texts; int8 mean {q['cosine_mean']:.5f} (min {q['cosine_min']:.5f}); "
                     f"{export['fp32']['mb']:.0f} MB → {q['mb']:.0f} MB; batch-1 encode of a "
                     f"{export['timing_texts']['short_tokens']}-token / full {export['timing_texts']['full_tokens']}-"
                     f"token query: torch {export['torch']['encode_ms']:.1f} / "
                     f"{export['torch']['encode_ms_full']:.1f} ms, "
                     f"fp32 {export['fp32']['encode_ms']:.1f} / {export['fp32']['encode_ms_full']:.1f}, "
                     f"int8 {q['encode_ms']:.1f} / {q['encode_ms_full']:.1f}"
                     + (f"; {', '.join(dropped)} timed on 2 passes only" if dropped else "") + ".")
    tokens = tokenize(queries, pad_to_context=False)
    lines = [
        f"### Text queries ({len(queries)} queries × {args.repeats} passes per back-end; "
        f"{', '.join(str(int(n)) for n in tokens.lengths)} tokens, the last one cut at the context length)",
        "",
        table(rows),
        "",
        *verdicts,
        "",
        *notes,
        "ONNX text back-ends ran without torch in their process: "
        + ", ".join(f"{lab}: {all(v for n, v in tf.items() if n != TEXT_BASELINE)}" for lab, tf in torch_free.items())
        + f". Back-end load times (s): {load_s}.",
    ]
    return {"rows": rows, "lines": lines, "exports": exports, "queries": queries,
            "n_tokens": tokens.lengths.tolist(), "load_s": load_s, "torch_free": torch_free}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vision-model", "--vision-models", dest="vision_models", default="ViT-B-16,RN50",
                   help="student architectures (random weights), comma-separated, side by side; the first is the "
                        "baseline's and the text queries' (default: %(default)s)")
    p.add_argument("--preset", default=None,
                   help="small presets instead (tiny, demo-resnet; comma-separated), to test the script")
    p.add_argument("--gallery", type=int, default=100_000, help="gallery size (synthetic vectors)")
    p.add_argument("--index-kind", default="auto", help="index kind (auto: flat ≤ 50k, else HNSW)")
    p.add_argument("--threads", type=int, default=2, help="encoder threads per back-end")
    p.add_argument("--queries", type=int, default=4, help="different photos per size")
    p.add_argument("--repeats", type=int, default=6, help="timed passes over the queries")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    p.add_argument("--slow-factor", type=float, default=2.0,
                   help="after 2 timed passes, stop timing back-ends slower than this × the baseline")
    p.add_argument("--gap-ms", type=float, default=30.0, help="pause between queries (idle pools settle)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="include torch.compile + bf16 + freezing (first call takes about a minute)")
    p.add_argument("--sides", default="160,128,112",
                   help="also time int8 students at these input sides (fewer tokens; quality: resolution_quality.py)")
    p.add_argument("--image", action=argparse.BooleanOptionalAction, default=True, help="time image queries")
    p.add_argument("--text", action=argparse.BooleanOptionalAction, default=True, help="time text queries")
    p.add_argument("--text-models", default="RoBERTa-wwm-ext-base-chinese,RBT3-chinese",
                   help="text architectures to time (comma-separated; a --preset has its own)")
    p.add_argument("--work-dir", default=None, help="keep the checkpoint, ONNX files and index here (reused)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t_start = time.perf_counter()
    from cnclip_kd.deploy.planner import synthetic_index

    if not (args.image or args.text):
        p.error("nothing to time: --no-image and --no-text")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="query-latency-"))
    work.mkdir(parents=True, exist_ok=True)
    models = [m.strip() for m in (args.preset or args.vision_models).split(",") if m.strip()]
    dims = list(dict.fromkeys(int(_model_info(m)["embed_dim"]) for m in models))
    host = machine()
    logger.info("machine: %s", host)
    built = {dim: synthetic_index(work, args.gallery, dim, args.index_kind) for dim in dims}
    indexes = {dim: path for dim, (path, _) in built.items()}
    index_stats = built[dims[0]][1]
    image = run_image(args, work, models, indexes) if args.image else None
    # The text queries search the first model's index with that same model's text tower.
    text = run_text(args, work, models[0], indexes[dims[0]]) if args.text else None

    host["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    lines = [
        f"## Query latency: {', '.join(models)} (random weights), gallery {args.gallery:,} "
        f"({index_stats['kind']}, recall@10 {index_stats.get('recall@10')}), {args.threads} threads",
        "",
        f"Machine: {host['cpu']} ({', '.join(host['isa'])}), {host['cores']} vCPUs; load average at start "
        f"{host['load_avg']}, at end {host['load_avg_end']}; torch {host['torch']}, onnxruntime "
        f"{host['onnxruntime']}. +{args.warmup} warm-up pass, each back-end in its own process, shuffled order "
        "each query.",
        "",
        *(image["lines"] + [""] if image else []),
        *(text["lines"] + [""] if text else []),
        "Index build " + ", ".join(f"{dim}-d {st.get('build_s')} s (search alone {st.get('search_ms')} ms)"
                                   for dim, (_, st) in built.items()) + ". "
        f"Whole run {time.perf_counter() - t_start:.0f} s.",
    ]
    report = "\n".join(lines)
    sys.stdout.write(report + "\n")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        data = {"machine": host, "args": vars(args), "index": index_stats, "markdown": report,
                "rows": image["rows"] if image else [], "text_rows": text["rows"] if text else []}
        if image:
            data.update({k: image[k] for k in ("export", "exports", "side_exports", "decode_ms", "decode_cosine",
                                               "load_s", "torch_free")})
        if text:
            data["text"] = {k: text[k] for k in ("exports", "queries", "n_tokens", "load_s", "torch_free")}
        out.write_text(json.dumps(data, ensure_ascii=False, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_worker_error(main))
