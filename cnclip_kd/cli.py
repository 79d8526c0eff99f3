"""Command line: the notebooks' steps as ``cnclip-kd <step>``.

Each sub-command calls the same package function its notebook calls::

    cnclip-kd demo --out out       # notebooks 01–06 on the sample data, one command
    cnclip-kd prepare sample_data/ out/data
    cnclip-kd train --train-data out/data/lmdb/train --val-data out/data/lmdb/valid ...
    cnclip-kd export-teacher my-vit-h.pt out/teachers/my-vit-h
    cnclip-kd index out/runs/demo-kd-cosine/checkpoints/epoch_latest.pt out/index/demo --data out/data
    cnclip-kd eval out/index/demo out/index/teacher
    cnclip-kd gallery add new_photos/ --index out/index/demo --model out/deploy/image_encoder.onnx
    cnclip-kd export CKPT out/deploy/image_encoder.onnx --text-out out/deploy/text_encoder.onnx
    cnclip-kd plan --budget-ms 50  # which student meets 50 ms per query on this CPU, measured
    cnclip-kd search --index out/index/demo --text 白色连衣裙 --text-model out/deploy/text_encoder.onnx
    cnclip-kd serve --index out/index/demo --model out/deploy/image_encoder.onnx \
        --text-model out/deploy/text_encoder.onnx
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

logger = logging.getLogger(__name__)


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="photos + captions → MUGE files, labels and LMDB (notebook 01)",
                       description="Prepare a dataset that Chinese-CLIP's training code reads.")
    p.add_argument("source", help="category folder, manifest .csv/.jsonl (or a folder with manifest.csv), or MUGE folder")
    p.add_argument("out_dir", help="output folder (created or replaced as a whole)")
    p.add_argument("--valid-frac", type=float, default=0.1, help="fraction of products per category for valid")
    p.add_argument("--test-frac", type=float, default=0.1, help="fraction of products per category for test")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--max-side", type=int, default=512, help="shrink images to this longer side (0 keeps size)")
    p.add_argument("--max-pixels", type=int, default=None, help="skip images with more pixels (default 100M)")
    p.add_argument("--caption-template", default="{label}", help="caption for folder input; {label} = sub-folder")
    p.add_argument("--captions", default=None, help="CSV/JSONL with image,text for folder input")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: CPU count)")
    p.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from .core.images import DEFAULT_MAX_PIXELS
    from .data.prepare import prepare_dataset

    report = prepare_dataset(
        args.source, args.out_dir, valid_frac=args.valid_frac, test_frac=args.test_frac, seed=args.seed,
        max_side=args.max_side or None, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        caption_template=args.caption_template, captions=args.captions, num_workers=args.workers, force=args.force,
    )
    sys.stdout.write(report.to_markdown() + "\n")
    sys.stdout.write(f"\n{report.n_images} images, {len(report.categories)} categories, "
                     f"{len(report.skipped)} skipped -> {report.out_dir}"
                     + (" (already up to date)" if report.reused else "") + "\n")
    return 0


def _field_help() -> dict[str, str]:
    """Per-field help from TrainConfig's docstring (its ``Attributes:`` section), so the two never drift."""
    from .distill.config import TrainConfig

    helps: dict[str, str] = {}
    current = None
    for line in (TrainConfig.__doc__ or "").splitlines():
        stripped = line.strip()
        if ":" in stripped and stripped.split(":")[0].isidentifier() and line.startswith(" " * 8) \
                and not line.startswith(" " * 12):
            current, _, text = stripped.partition(":")
            helps[current] = text.strip()
        elif current and stripped and line.startswith(" " * 12):
            helps[current] += " " + stripped
        elif not stripped:
            current = None
    return helps


# Spellings cn_clip's scripts and guides use, accepted as aliases.
# --output-dir: torchrun's own parser takes any "--logs…" as its --logs-specs, so DDP runs need another name.
_ALIASES = {"distillation": ["--distllation"], "kd_loss_weight": ["--kd_loss_weight"], "logs": ["--output-dir"]}


def _add_train(sub: argparse._SubParsersAction) -> None:
    import dataclasses
    import typing

    from .distill.config import TrainConfig

    p = sub.add_parser("train", help="fine-tune a student, with distillation from a teacher (notebook 02)",
                       description="Fine-tune Chinese-CLIP with knowledge distillation; cn_clip's flags. "
                                   "Under torchrun each process runs this command.")
    helps = _field_help()
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flags = ["--" + f.name.replace("_", "-")] + _ALIASES.get(f.name, [])
        kind = hints[f.name]
        base = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
        help_text = helps.get(f.name, "")
        if base[0] is bool:
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            p.add_argument(*flags, dest=f.name, action=action, default=f.default, help=help_text)
        else:
            p.add_argument(*flags, dest=f.name, type=base[0], default=f.default,
                           help=f"{help_text} (default: {f.default})")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import dataclasses

    from .distill.config import TrainConfig
    from .distill.trainer import train

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if values["precision"] == "amp":  # cn_clip's name for mixed precision
        values["precision"] = "auto"
    result = train(TrainConfig(**values))
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    summary = {"run_dir": str(result.run_dir), "checkpoint": str(result.checkpoint), "steps": result.steps,
               "epochs": result.epochs, "validation": result.validation[-1] if result.validation else None}
    sys.stdout.write(json.dumps(summary, ensure_ascii=False, indent=1) + "\n")
    return 0


def _add_export_teacher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-teacher", help="cn_clip checkpoint → ModelScope CLIP teacher folder",
                       description="Write a cn_clip checkpoint (e.g. your fine-tuned ViT-H-14) as a ModelScope "
                                   "CLIP-format folder that --teacher-model-name accepts.")
    p.add_argument("checkpoint", help="cn_clip-format checkpoint (*.pt)")
    p.add_argument("out_dir", help="teacher folder to write")
    p.add_argument("--vision-model", default=None, help="vision architecture (default: read from the checkpoint)")
    p.add_argument("--text-model", default=None, help="text architecture (default: read from the checkpoint)")
    p.set_defaults(func=_run_export_teacher)


def _run_export_teacher(args: argparse.Namespace) -> int:
    from .models.students import load_student
    from .models.teachers import export_cnclip_teacher
    from .notebook.experiments import split_model_info

    kwargs = {k: v for k, v in (("vision_model", args.vision_model), ("text_model", args.text_model)) if v}
    model, info = load_student(args.checkpoint, **kwargs)
    vision, text = split_model_info(info)
    out = export_cnclip_teacher(model, args.out_dir, vision_model=vision, text_model=text)
    sys.stdout.write(f"{out}\n")
    return 0


def _add_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="embed a gallery, build a FAISS index, evaluate it (notebook 03)",
                       description="Embed a gallery with one model (resumable), build a FAISS index (exact or "
                                   "approximate with measured recall@10), evaluate image-to-image retrieval and "
                                   "save the index folder.")
    p.add_argument("model", help="student checkpoint (*.pt), cn_clip pretrained name (ViT-B-16) or "
                                 "teacher:<hub id | ModelScope folder | cnclip:ARCH | random:ARCH>")
    p.add_argument("out_dir", help="index folder to write (replaced as a whole), e.g. out/index/my-model")
    gallery = p.add_mutually_exclusive_group(required=True)
    gallery.add_argument("--data", help="prepared dataset folder (cnclip-kd prepare); see --split")
    gallery.add_argument("--source", help="photo folder (one sub-folder per category) or manifest .csv/.jsonl")
    p.add_argument("--split", default="test", help="split of --data used as the gallery (default: test)")
    p.add_argument("--kind", default="auto", choices=["auto", "flat", "hnsw", "ivf", "ivfsq", "ivfpq"],
                   help="index kind (default auto: exact up to 50k images, else approximate)")
    p.add_argument("--memory-budget-mb", type=float, default=None, help="memory the index may take (auto)")
    p.add_argument("--k", type=int, default=10, help="evaluation depth (default 10)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers decoding images (default: 0 on a CPU, up to 8 per GPU)")
    p.add_argument("--decode", default="auto", choices=["auto", "cpu", "gpu"],
                   help="where JPEGs are decoded (default auto: measured choice on a GPU, the CPU otherwise)")
    p.add_argument("--chunk-size", type=int, default=2048,
                   help="images per saved embedding chunk (the unit of resuming and of sharding across ranks)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available; under "
                                                   "torchrun each rank takes cuda:LOCAL_RANK)")
    p.add_argument("--cache-dir", default=None, help="embedding chunks/cache (default: beside out_dir; under "
                                                     "torchrun on several nodes it must be on a shared filesystem)")
    p.add_argument("--vision-model", default=None, help="architecture of a checkpoint that does not record it")
    p.add_argument("--text-model", default=None, help="likewise")
    p.add_argument("--no-text", dest="text", action="store_false",
                   help="skip the text → image / image → text evaluation (on by default for models with a text tower)")
    p.add_argument("--backend", default="faiss", choices=["faiss", "pgvector"],
                   help="where the gallery is searched from (default faiss); pgvector also writes it into a "
                        "PostgreSQL + pgvector table named after out_dir and evaluates through that table")
    p.add_argument("--db", default=None,
                   help="with --backend pgvector: a postgresql:// URL, or a folder for the embedded server (default: "
                        "OUT/pg for out_dir OUT/index/NAME, else pg beside out_dir; started and stopped here)")
    p.set_defaults(func=_run_index)


def _run_index(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .retrieval.backends import index_with_backend
    from .retrieval.encoders import load_encoder
    from .retrieval.gallery import gallery_from_source, gallery_from_split

    if args.db and args.backend != "pgvector":
        logger.error("--db needs --backend pgvector")
        return 2
    d, device = None, args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: shard the embedding, rank 0 builds the index
        from .core.distributed import init_distributed

        d = init_distributed(None if args.device in (None, "cuda") else args.device, timeout_s=6 * 3600)
        device = d.device
    gallery = gallery_from_split(args.data, args.split) if args.data else gallery_from_source(args.source, dist=d)
    encoder = load_encoder(args.model, device=device, vision_model=args.vision_model,
                           text_model=args.text_model)
    from .retrieval.pgserver import EmbeddedPostgresError

    try:
        index = index_with_backend(args.model, gallery, args.out_dir, backend=args.backend, db=args.db,
                                   cache_dir=args.cache_dir, kind=args.kind, memory_budget_mb=args.memory_budget_mb,
                                   k=args.k, batch_size=args.batch_size, num_workers=args.num_workers,
                                   encoder=encoder, text=args.text, dist=d, decode=args.decode,
                                   chunk_size=args.chunk_size)
    except EmbeddedPostgresError as err:
        logger.error("%s", err)
        return 2
    if d is not None:
        from .core.distributed import finish_distributed

        finish_distributed(d)
    if index is None:  # a rank other than 0: its shard is saved, rank 0 built the index
        logger.info("rank %d: embedding shard done; rank 0 builds and saves the index", d.rank)
        return 0
    summary = {"index_dir": str(Path(args.out_dir).resolve()),
               **{k: index.stats.get(k) for k in ("kind", "n", "dim", "bytes", "build_s", "recall@10", "search_ms")},
               "eval": {k: v for k, v in index.stats["eval"].items() if k != "per_label"},
               "text_eval": index.stats.get("text_eval")}
    if "backend" in index.stats:
        summary["backend"] = index.stats["backend"]
        summary["faiss_eval"] = {k: v for k, v in index.stats["faiss_eval"].items() if k != "per_label"}
    sys.stdout.write(json.dumps(summary, ensure_ascii=False, indent=1) + "\n")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="image-to-image P@10, mAP@10, R@k of saved indexes; comparison table",
                       description="Evaluate saved index folders (cnclip-kd index / notebook 03) leave-one-out: "
                                   "every gallery image queries the others; a hit has the same category (and "
                                   "product id, when given). Prints a Markdown table.")
    p.add_argument("indexes", nargs="+", help="index folders; each one's folder name is its row name")
    p.add_argument("--k", type=int, default=10, help="depth of P@k and mAP@k (default 10)")
    p.add_argument("--out", default=None, help="also write comparison.csv and comparison.json into this folder")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .retrieval.evaluate import evaluate_index, metrics_row, write_comparison
    from .retrieval.index import GalleryIndex
    from .retrieval.report import comparison_markdown

    rows = []
    for directory in args.indexes:
        index = GalleryIndex.load(directory)
        rows.append(metrics_row(Path(directory).resolve().name, index, evaluate_index(index, k=args.k)))
    sys.stdout.write(comparison_markdown(rows) + "\n")
    if args.out:
        csv_path, _ = write_comparison(rows, args.out, extra={"indexes": [str(Path(d).resolve()) for d in args.indexes],
                                                              "k": args.k})
        sys.stdout.write(f"\n-> {csv_path}\n")
    return 0


def _add_gallery(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gallery", help="add photos to / remove ids from a built gallery (FAISS folder or pgvector)",
                       description="add: encode photos (a category folder or a manifest; unreadable files are "
                                   "skipped and reported) with the deployed ONNX image encoder and write them into "
                                   "a FAISS index folder (written back atomically) or a pgvector gallery; prints the "
                                   "new ids. remove: delete items by id. An encoder other than the gallery's model "
                                   "is refused.")
    p.add_argument("action", choices=["add", "remove"], help="add photos, or remove ids")
    p.add_argument("items", nargs="+", help="add: photo folder or manifest .csv/.jsonl; remove: item ids")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--index", help="FAISS index folder (cnclip-kd index)")
    target.add_argument("--db", help="pgvector gallery's server: postgresql:// URL or the embedded server's folder "
                                     "(e.g. out/pg); with --name")
    p.add_argument("--name", "--gallery", dest="name", default=None,
                   help="pgvector gallery name (cnclip-kd index --backend pgvector names it after the index folder, "
                        "'-' becoming '_')")
    p.add_argument("--model", default=None, help="add: the exported image encoder .onnx (cnclip-kd export)")
    p.add_argument("--threads", type=int, default=None, help="add: ONNX Runtime threads")
    p.set_defaults(func=_run_gallery)


def _run_gallery(args: argparse.Namespace) -> int:
    from .deploy.gallery_edits import add_photos, remove_items
    from .retrieval.pgserver import EmbeddedPostgresError

    target = {"index_dir": args.index, "db": args.db, "name": args.name}
    try:
        if args.db and not args.name:
            raise ValueError("--db needs --name (the pgvector gallery's name)")
        if args.action == "add":
            if not args.model or len(args.items) != 1:
                raise ValueError("gallery add takes one photo folder or manifest and --model ENCODER.onnx")
            edit = add_photos(args.items[0], args.model, threads=args.threads, **target)
        else:
            try:
                ids = [int(i) for i in args.items]
            except ValueError:
                raise ValueError(f"gallery remove takes integer ids, got {' '.join(args.items)}") from None
            edit = remove_items(ids, **target)
    except (ValueError, LookupError, EmbeddedPostgresError) as err:
        logger.error("%s", err)
        return 2
    sys.stdout.write(json.dumps(edit.to_dict(), ensure_ascii=False, indent=1) + "\n")
    return 0


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="one image or text query against a saved index; JSON out (notebook 06)",
                       description="Answer an image query (--image) or a text query (--text, text → image) with the "
                                   "Top-k of a saved index folder (cnclip-kd index), through exported ONNX encoders "
                                   "(no torch) or the index's own checkpoint. Prints JSON.")
    p.add_argument("--index", required=True, help="index folder written by `cnclip-kd index` / notebook 03")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", help="query image file (JPEG, PNG, ...)")
    query.add_argument("--text", help="text query, e.g. 白色连衣裙 (longer than the model's context: cut, and "
                                      "the JSON says so)")
    p.add_argument("-k", "--k", type=int, default=10, help="results (default 10)")
    p.add_argument("--model", default=None, help="image encoder: .onnx file (cnclip-kd export) or checkpoint; "
                                                 "default: the checkpoint the index was built with")
    p.add_argument("--text-model", default=None, help="text encoder: .onnx text model (cnclip-kd export --text-out) "
                                                      "or checkpoint; default: the index's checkpoint (PyTorch)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch", "torch-bf16", "torch-compile"],
                   help="image encoder back-end (default auto: onnx for an .onnx file, else torch fp32)")
    p.add_argument("--threads", type=int, default=None, help="encoder threads (default: the runtime's)")
    p.add_argument("--full-decode", action="store_true", help="decode JPEGs at full size (default: DCT-scaled)")
    p.set_defaults(func=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    from .core.tokenizer import NoTextTowerError, QueryError
    from .deploy.runtime import Retriever

    try:
        # Only the encoder the query needs is loaded (the other one would load on first use).
        retriever = Retriever.load(args.index, args.model if args.image is not None else None,
                                   text_encoder=args.text_model if args.text is not None else None,
                                   backend=args.backend, threads=args.threads, fast_decode=not args.full_decode)
        if args.text is not None:
            result = retriever.search_text(args.text, args.k)
            backend = retriever.text_backend
        else:
            result = retriever.search(args.image, args.k)
            backend = retriever.backend
    except (QueryError, NoTextTowerError) as err:  # an empty query; an index whose model reads no text
        logger.error("%s", err)
        return 2
    except ValueError as err:  # an encoder that does not fit the index, or a bad backend choice
        logger.error("%s", err)
        return 2
    out = {"k": args.k, "index": args.index, "backend": backend, "n_gallery": len(retriever.index),
           **result.to_dict()}
    out["query"] = result.query if result.query is not None else {"image": args.image}
    sys.stdout.write(json.dumps(out, ensure_ascii=False, indent=1, default=str) + "\n")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="student encoders → ONNX (fp32, optional int8), checked (notebook 06)",
                       description="Export a student's image encoder to ONNX (dynamic batch, L2 normalisation in "
                                   "the graph), check it against PyTorch on real photos, measure int8 copies "
                                   "(dynamic and calibrated static QDQ) and keep the fastest within tolerance; "
                                   "with --text-out also its text encoder (for text → image search). Prints the "
                                   "report JSON (the text encoder's under \"text_encoder\"; \"serve\" names the "
                                   "file to serve).")
    p.add_argument("checkpoint", help="student checkpoint (*.pt) or cn_clip pretrained name")
    p.add_argument("out", help="ONNX file to write, e.g. out/deploy/image_encoder.onnx")
    p.add_argument("--text-out", default=None,
                   help="also export the text encoder to this file, e.g. out/deploy/text_encoder.onnx")
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=None,
                   help="also write <out>.int8.onnx (--no-int8: never; default: only when its cost is small)")
    p.add_argument("--int8-method", choices=["auto", "dynamic", "static"], default="auto",
                   help="image int8: dynamic, static (calibrated QDQ; for convolutional students) or auto "
                        "(measure both, keep the fastest within tolerance; default)")
    p.add_argument("--calibration", default=None,
                   help="photo folder or manifest to calibrate static int8 on, e.g. your gallery (default: the "
                        "check photos)")
    p.add_argument("--calibration-size", type=int, default=256, help="calibration photos (seeded subset)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 14 (default 17)")
    p.add_argument("--images", default=None, help="photo folder or manifest for the checks (default: sample data)")
    p.add_argument("--max-images", type=int, default=None, help="check on a random subset of this many photos")
    p.add_argument("--threads", type=int, default=None, help="threads for the checks and timings")
    p.add_argument("--vision-model", default=None, help="architecture of a checkpoint that does not record it")
    p.add_argument("--text-model", default=None, help="likewise")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .core.tokenizer import NoTextTowerError
    from .deploy.export import ExportError, export_onnx, export_text_onnx
    from .deploy.quantize import INT8_METHODS
    from .retrieval.encoders import load_encoder

    kwargs = {"quantize": args.int8, "opset": args.opset, "images": args.images, "max_images": args.max_images,
              "threads": args.threads}
    arch = {k: v for k, v in (("vision_model", args.vision_model), ("text_model", args.text_model)) if v}
    try:
        # Both towers from one load of the checkpoint.
        source = load_encoder(args.checkpoint, device="cpu", precision="fp32", **arch) if args.text_out \
            else args.checkpoint
        methods = INT8_METHODS if args.int8_method == "auto" else (args.int8_method,)
        report = export_onnx(source, args.out, **kwargs, **arch, int8_methods=methods,
                             calibration_images=args.calibration, calibration_size=args.calibration_size)
        if args.text_out:
            report["text_encoder"] = export_text_onnx(source, args.text_out, **kwargs)
    except (ExportError, NoTextTowerError, ValueError) as err:
        logger.error("%s", err)
        return 2
    sys.stdout.write(json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    return 0


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from .deploy.planner import BACKENDS, DEFAULT_CANDIDATES

    p = sub.add_parser("plan", help="which student meets a query-latency budget on this CPU, measured (notebook 06)",
                       description="Time candidate students (cn_clip architectures at input sides, random weights) "
                                   "with each serving back-end end to end on this machine — decode + encode + "
                                   "search at the index size given — print which meet the budget, the choice, and "
                                   "the commands that train (by distillation) and export it. Says what the CPU "
                                   "has (AVX2 / AVX-512 / VNNI / AMX). Run it on an otherwise idle machine.")
    p.add_argument("--budget-ms", type=float, default=50.0, help="p50 budget of one query, end to end (default 50)")
    p.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES),
                   help="ARCH@SIDE, comma-separated, best expected quality first (default: %(default)s)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="back-ends to time (default: %(default)s)")
    p.add_argument("--gallery", type=int, default=100_000, help="index size in vectors (default 100000)")
    p.add_argument("--query-size", default="800x800", help="query photo WIDTHxHEIGHT (default 800x800)")
    p.add_argument("--queries", type=int, default=3, help="different query photos (default 3)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes over the queries (default 5)")
    p.add_argument("--threads", type=int, default=2, help="threads per back-end (default 2)")
    p.add_argument("--teacher", default="ViT-H-14", help="teacher named in the training command")
    p.add_argument("--work-dir", default="out/plan", help="models, indexes and plan.json (reused; default out/plan)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of Markdown")
    p.set_defaults(func=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    from .deploy.planner import plan

    try:
        width, height = (int(v) for v in args.query_size.lower().split("x"))
        result = plan(args.budget_ms, candidates=[c for c in args.candidates.split(",") if c.strip()],
                      backends=[b.strip() for b in args.backends.split(",") if b.strip()], gallery=args.gallery,
                      query_size=(width, height), queries=args.queries, repeats=args.repeats, threads=args.threads,
                      work_dir=args.work_dir, teacher=args.teacher)
    except ValueError as err:
        logger.error("%s", err)
        return 2
    out = json.dumps(result.to_dict(), ensure_ascii=False, indent=1) if args.json else result.markdown()
    sys.stdout.write(out + "\n")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP search service over a saved index and ONNX encoders (FastAPI + uvicorn)",
                       description="Serve POST /search (image or q= text), GET /images/{id}, /healthz, /metrics "
                                   "(Prometheus) and POST /admin/reload (index hot swap; SIGHUP reloads the served "
                                   "folder) over a saved index folder and the exported ONNX encoders; torch is not "
                                   "loaded. OpenAPI page at /docs. Two keys: --api-key-file guards the queries, "
                                   "--admin-key-file the admin endpoints (off without it).")
    p.add_argument("--index", default=None, help="index folder written by `cnclip-kd index` / notebook 03 "
                                                 "(--backend faiss)")
    p.add_argument("--backend", choices=("faiss", "pgvector"), default="faiss",
                   help="faiss: serve --index (default); pgvector: serve --gallery from the database --db")
    p.add_argument("--db", default=None,
                   help="with --backend pgvector: a postgresql:// URL, or a folder for the embedded PostgreSQL "
                        "(started and stopped with the service; default out/pg)")
    p.add_argument("--gallery", default=None, help="with --backend pgvector: the gallery's name")
    p.add_argument("--image-root", action="append", default=[], metavar="DIR",
                   help="a folder the gallery's image files may be served from (repeatable; a pgvector gallery "
                        "records none)")
    p.add_argument("--upload-dir", default=None,
                   help="where POST /items keeps uploaded photos (default: <index>-uploads, or <db folder>-uploads "
                        "for the embedded PostgreSQL)")
    p.add_argument("--model", required=True, help="image encoder .onnx (cnclip-kd export)")
    p.add_argument("--text-model", default=None, help="text encoder .onnx (cnclip-kd export --text-out); "
                                                      "without it text queries answer no_text_tower")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                                                       "another address without --api-key-file logs a warning)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes (default 1; each loads the index and encoders; with more than one, "
                        "SIGHUP restarts the workers one by one and /admin/reload reloads only the worker "
                        "that answers it)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per ONNX session")
    p.add_argument("--pool", type=int, default=None, help="queries computed at once per worker "
                                                          "(default: CPU cores / threads)")
    p.add_argument("--max-queue", type=int, default=None, help="queries admitted at once per worker; more get "
                                                               "503 busy (default 4 × pool)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body in MB (default 20)")
    p.add_argument("--max-pixels", type=int, default=None, help="largest query image in pixels (default 50M)")
    p.add_argument("--timeout", type=float, default=30.0, help="limit on computing one query, in seconds "
                                                               "(default 30; then 504 timeout)")
    p.add_argument("--body-timeout", type=float, default=None, help="limit on receiving a request body, in "
                                                                    "seconds (default: --timeout; then 408)")
    p.add_argument("--api-key-file", default=None, help="file holding the query key that /search and /images "
                                                        "need (header X-API-Key); optional")
    p.add_argument("--admin-key-file", default=None,
                   help="file holding the admin key that /admin/reload and every endpoint that changes the "
                        "service need (header X-API-Key; it may also query); without it they answer 403 "
                        "admin_disabled")
    p.add_argument("--index-root", default=None,
                   help="/admin/reload loads only --index or a folder under this one, symlinks resolved "
                        "(default: the parent folder of --index); elsewhere is 403 forbidden_path")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from .deploy.serve import DEFAULT_MAX_PIXELS
    from .deploy.service import AccessKeys, read_key_file, warn_exposure

    try:  # the keys are read (and their files' modes checked) here; they are never logged
        api_key = read_key_file(args.api_key_file, "API") if args.api_key_file else None
        admin_key = read_key_file(args.admin_key_file, "admin") if args.admin_key_file else None
        keys = AccessKeys.of(api_key, admin_key)
    except (ValueError, OSError) as err:
        logger.error("%s", err)
        return 2
    warn_exposure(args.host, keys)
    try:
        source, database = _serve_source(args)
    except ValueError as err:
        logger.error("%s", err)
        return 2
    settings = {**source, "encoder": args.model, "text_encoder": args.text_model,
                "index_root": args.index_root, "max_body_bytes": int(args.max_body_mb * 1024 * 1024),
                "max_pixels": args.max_pixels or DEFAULT_MAX_PIXELS, "request_timeout_s": args.timeout,
                "body_timeout_s": args.body_timeout, "image_roots": list(args.image_root),
                "max_queue": args.max_queue, "threads": args.threads, "pool_size": args.pool}
    try:
        return _serve_settings(args, settings, api_key, admin_key)
    finally:
        if database is not None:
            database.stop()


def _serve_source(args: argparse.Namespace) -> tuple[dict, object]:
    """What ``serve`` serves: ``({index_dir} or {db_url, gallery, upload_dir}, the embedded server or None)``.

    Raises:
        ValueError: Flags that do not fit the back-end; a database that does not start.
    """
    if args.backend == "faiss":
        if not args.index or args.gallery or args.db:
            raise ValueError("--backend faiss serves --index DIR (--db and --gallery are for --backend pgvector)")
        return {"index_dir": args.index, "upload_dir": args.upload_dir}, None
    if args.index or not args.gallery:
        raise ValueError("--backend pgvector serves --gallery NAME from --db (URL or folder); --index is for faiss")
    from .retrieval.pgserver import EmbeddedPostgres, EmbeddedPostgresError

    server = EmbeddedPostgres(args.db or "out/pg")
    try:
        url = server.start()
    except EmbeddedPostgresError as err:
        raise ValueError(str(err)) from None
    uploads = args.upload_dir or (f"{server.folder}-uploads" if server.folder is not None else None)
    return {"db_url": url, "gallery": args.gallery, "upload_dir": uploads}, server


def _serve_settings(args: argparse.Namespace, settings: dict, api_key: str | None, admin_key: str | None) -> int:
    """Run uvicorn with the app of ``settings`` (one process, or ``--workers`` processes)."""
    import signal

    import uvicorn

    from .deploy.serve import SERVE_ENV, create_app, reload_from_signal

    if args.workers > 1:
        # Each worker process builds its own app (uvicorn needs an import string for that); the keys
        # travel as their files' paths, not in the environment.
        files = {"api_key_file": args.api_key_file, "admin_key_file": args.admin_key_file}
        os.environ[SERVE_ENV] = json.dumps({**settings, **{k: os.path.abspath(v) for k, v in files.items() if v}})
        uvicorn.run("cnclip_kd.deploy.serve:app_from_env", factory=True, host=args.host, port=args.port,
                    workers=args.workers, log_level="info", timeout_graceful_shutdown=10)
        return 0
    try:
        app = create_app(**settings, api_key=api_key, admin_key=admin_key)  # loads here: fails before the port opens
    except (ValueError, LookupError) as err:  # another encoder's gallery, no such gallery
        logger.error("%s", err)
        return 2

    def on_hup(signum, frame):  # runs in the main thread, which is the event loop's
        loop = app.state.service.loop
        if loop is not None:
            loop.call_soon_threadsafe(lambda: loop.create_task(reload_from_signal(app)))

    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hup)
    logger.info("serving %s on http://%s:%d (search page at /, docs at /docs)", args.index or args.gallery,
                args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=10)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from .notebook.demo import PRESETS

    p = sub.add_parser("demo", help="run notebooks 01–06 on the sample data into one folder (resumable)",
                       description="Run notebooks 01–06 in order through papermill (their defaults, one shared "
                                   "OUTPUT_DIR), keep the executed copies in OUT/notebooks/ and print a summary: "
                                   "the comparison table, the figures, the deployed encoder and its query latency. "
                                   "Rerunning skips the notebooks that are already complete for the same inputs.")
    p.add_argument("--out", default="out", help="output folder: new, empty, or an earlier demo's (default: out)")
    p.add_argument("--preset", default="demo", choices=list(PRESETS),
                   help="demo: the notebooks' own defaults (default; the student's image tower is ImageNet-pretrained "
                        "EfficientNet-Lite0 at 64 px); demo-pretrained: that student at 128 px (~5 minutes more); "
                        "demo-scratch: a student trained from scratch (the demo up to 0.3.3); demo-long: the "
                        "from-scratch student's longer recipe (~17 minutes more); tiny: a smoke test in a few minutes")
    p.add_argument("-p", "--param", dest="params", action="append", default=[], metavar="NOTEBOOK.NAME=VALUE",
                   help="set a notebook parameter, e.g. -p 02.MAX_EPOCHS=20 (NAME=VALUE: every notebook that "
                        "has NAME); repeatable")
    p.add_argument("--notebooks", default=None, help="folder with the notebooks (default: the checkout's notebooks/)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .notebook.demo import DemoError, parse_overrides, run_demo

    logging.getLogger("papermill").setLevel(logging.WARNING)  # its per-notebook INFO lines repeat ours

    def progress(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    try:
        summary = run_demo(args.out, args.preset, parse_overrides(args.params, args.notebooks),
                           notebooks_dir=args.notebooks, progress=progress)
    except DemoError as err:
        sys.stdout.flush()
        sys.stderr.write(f"cnclip-kd demo: error: {err}\n")
        return 1
    sys.stdout.write("\n" + summary.to_text() + "\n")
    return 0


def build_parser(serve_only: bool = False) -> argparse.ArgumentParser:
    """The ``cnclip-kd`` argument parser with all sub-commands (``serve_only``: just ``serve``, whose
    path must not import torch, which the ``train`` flags need)."""
    parser = argparse.ArgumentParser(prog="cnclip-kd", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    if serve_only:
        _add_serve(sub)
        return parser
    _add_prepare(sub)
    _add_train(sub)
    _add_export_teacher(sub)
    _add_index(sub)
    _add_eval(sub)
    _add_gallery(sub)
    _add_search(sub)
    _add_export(sub)
    _add_plan(sub)
    _add_serve(sub)
    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cnclip-kd`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(serve_only=command == "serve").parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .core.images import BadImageError
    from .data.dataset import DataError

    if args.command == "serve":  # the server's path imports no torch (.models, .teachers and .train would)
        try:
            return args.func(args)
        except (DataError, BadImageError, FileNotFoundError) as err:
            logger.error("%s", err)
            return 2
    from .distill.config import NonFiniteLossError
    from .models.students import ModelLoadError
    from .models.teachers import TeacherLoadError

    try:
        return args.func(args)
    except (DataError, BadImageError, FileNotFoundError, ModelLoadError, TeacherLoadError,
            NonFiniteLossError) as err:
        # Expected user errors: one clear line, no traceback.
        logger.error("%s", err)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
