"""Command line: the notebooks' steps as ``cnclip-kd <step>``.

Each sub-command calls the same package function its notebook calls::

    cnclip-kd prepare sample_data/ out/data
    cnclip-kd train --train-data out/data/lmdb/train --val-data out/data/lmdb/valid ...
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

logger = logging.getLogger("cnclip_kd")


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
    from .data import prepare_dataset
    from .images import DEFAULT_MAX_PIXELS

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
    from .train import TrainConfig

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
_ALIASES = {"distillation": ["--distllation"], "kd_loss_weight": ["--kd_loss_weight"]}


def _add_train(sub: argparse._SubParsersAction) -> None:
    import dataclasses
    import typing

    from .train import TrainConfig

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

    from .train import TrainConfig, train

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if values["precision"] == "amp":  # cn_clip's name for mixed precision
        values["precision"] = "auto"
    result = train(TrainConfig(**values))
    summary = {"run_dir": str(result.run_dir), "checkpoint": str(result.checkpoint), "steps": result.steps,
               "epochs": result.epochs, "validation": result.validation[-1] if result.validation else None}
    sys.stdout.write(json.dumps(summary, ensure_ascii=False, indent=1) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``cnclip-kd`` argument parser with all sub-commands."""
    parser = argparse.ArgumentParser(prog="cnclip-kd", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prepare(sub)
    _add_train(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cnclip-kd`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .data import DataError
    from .images import BadImageError
    from .models import ModelLoadError
    from .teachers import TeacherLoadError
    from .train import NonFiniteLossError

    try:
        return args.func(args)
    except (DataError, BadImageError, FileNotFoundError, ModelLoadError, TeacherLoadError,
            NonFiniteLossError) as err:
        # Expected user errors: one clear line, no traceback.
        logger.error("%s", err)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
