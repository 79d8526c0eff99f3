"""Models and indexes on disk: the teacher and student checkpoints a run left, and saved indexes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .encoders import checkpoint_facts

__all__ = ["discover_models", "latest_checkpoint", "saved_indexes", "spec_name"]


# --------------------------------------------------------------------------- finding models


def _teacher_sources(output_dir: Path) -> set[Path]:
    """Checkpoints that were exported as teacher folders (the demo teacher's own run)."""
    sources = set()
    for stamp in (output_dir / "teachers").glob("*/exported_from.json"):
        try:
            sources.add(Path(json.loads(stamp.read_text(encoding="utf-8"))["checkpoint"]).resolve())
        except (ValueError, KeyError, TypeError):
            continue
    return sources


def _student_checkpoints(output_dir: Path) -> list[Path]:
    exported = _teacher_sources(output_dir)
    found = [p for p in (output_dir / "runs").glob("*/checkpoints/epoch_latest.pt") if p.resolve() not in exported]
    return sorted(found, key=lambda p: p.parent.parent.name)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path:
    """The most recently written student checkpoint under ``output_dir/runs`` (runs exported as teachers skipped).

    Raises:
        FileNotFoundError: None there (the message says to run notebook 02).
    """
    found = _student_checkpoints(Path(output_dir))
    if not found:
        raise FileNotFoundError(f"no student checkpoint under {Path(output_dir) / 'runs'} "
                                "(runs/<name>/checkpoints/epoch_latest.pt); run notebook 02_distill.ipynb "
                                "(or `cnclip-kd train`) first, or pass CHECKPOINT")
    return max(found, key=lambda p: p.stat().st_mtime_ns)


def discover_models(output_dir: str | os.PathLike) -> dict[str, str]:
    """Every model the kit wrote under ``output_dir``: teacher folders, student runs by name, then the teachers
    those students were distilled from (e.g. ``efficientnet-lite2``), each once.

    Returns:
        Name → spec: ``{"demo-finetune": "/…/runs/demo-finetune/checkpoints/epoch_latest.pt", …,
        "efficientnet-lite2": "teacher:efficientnet-lite2"}``.
    """
    output_dir = Path(output_dir)
    specs: dict[str, str] = {}
    for cfg in sorted((output_dir / "teachers").glob("*/configuration.json")):
        specs[cfg.parent.name] = f"teacher:{cfg.parent.resolve()}"
    students = _student_checkpoints(output_dir)
    for ckpt in students:
        name = ckpt.parent.parent.name
        specs[name if name not in specs else f"{name}-student"] = str(ckpt.resolve())
    for ckpt in students:
        teacher = checkpoint_facts(ckpt).get("teacher")
        if not teacher:
            continue
        path = Path(str(teacher)).expanduser()
        spec = f"teacher:{path.resolve() if path.exists() else teacher}"
        if spec not in specs.values():
            name = spec_name(spec)
            specs[name if name not in specs else f"{name}-teacher"] = spec
    return specs


def spec_name(spec: str | os.PathLike) -> str:
    """A short name for a model spec: the run name of ``runs/<name>/checkpoints/*.pt``, a file's stem,
    a teacher folder's name, or the pretrained name (``teacher:timm:convnext_tiny=/m/w.safetensors`` →
    ``timm-convnext_tiny``, ``teacher:random:preset:tiny`` → ``random-preset-tiny``)."""
    text = str(spec)
    if text.startswith("teacher:"):
        text = text[len("teacher:"):]
    if ":" in text or "=" in text:  # a spelled name, not a path: keep it a plain folder name
        return text.split("=", 1)[0].replace(":", "-").replace("/", "-")
    path = Path(text)
    if path.suffix == ".pt" and path.parent.name == "checkpoints":
        return path.parent.parent.name
    if path.suffix == ".pt":
        return path.stem
    return path.name or text.replace(":", "-")


def saved_indexes(root: str | os.PathLike) -> dict[str, Path]:
    """Index folders under ``root`` (notebook 03's ``OUTPUT_DIR/index``): name → folder.

    In the order of ``root/comparison.json`` when there is one, then by name.
    """
    root = Path(root)
    found = {stats.parent.name: stats.parent for stats in sorted(root.glob("*/stats.json"))}
    order: list[str] = []
    table = root / "comparison.json"
    if table.is_file():
        try:
            order = [r["model"] for r in json.loads(table.read_text(encoding="utf-8")).get("rows", [])]
        except (ValueError, KeyError, TypeError):
            order = []
    names = [n for n in order if n in found] + [n for n in sorted(found) if n not in order]
    return {n: found[n] for n in names}
