"""What a training run is given and what it returns: :class:`TrainConfig`, :class:`TrainResult`, errors."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

CHECKPOINT_LATEST = "epoch_latest.pt"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped, the last good checkpoint is kept."""


# --------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Everything a training run needs; field names follow cn_clip's flags (``--batch-size`` → ``batch_size``).

    Attributes:
        train_data: ``lmdb/train`` folder written by ``prepare`` (cn_clip's layout).
        val_data: ``lmdb/valid`` folder, for the per-epoch image→image P@10.
        logs: Folder holding runs; a run writes ``{logs}/{name}/``.
        name: Run name.
        vision_model: cn_clip vision architecture of the student.
        text_model: cn_clip text architecture of the student.
        preset: A small architecture (``tiny``, ``demo``, ``demo-resnet``) instead of the two names.
        image_resolution: Student input side (default: the architecture's, 224 for ViT-B-16). Smaller is
            faster on a CPU (ViT-B-16 at 128: 65 tokens instead of 197, about 3× less compute); the
            position embeddings of the start weights are interpolated, and the teacher keeps its own side.
        resume: Start weights: a checkpoint, or a cn_clip pretrained name (``ViT-B-16``).
            A run folder that already holds ``epoch_latest.pt`` continues from it instead.
        reset_optimizer: With ``resume``, do not restore the optimizer state.
        reset_data_offset: With ``resume``, start again at epoch 0 / step 0.
        distillation: Distil the image encoder from ``teacher_model_name``.
        teacher_model_name: ModelScope hub id, local ModelScope folder, ``cnclip:ARCH``, a pretrained image
            model (``efficientnet-lite2``, ``timm:ARCH=FILE``), ``random:ARCH`` or a cn_clip checkpoint (see
            :func:`cnclip_kd.models.teachers.load_teacher`).
        kd_loss: ``relation`` (default: best P@10 in the demo comparison, 3 seeds), ``feature`` or ``cosine``
            (cn_clip's loss).
        kd_loss_weight: total = contrastive_weight × contrastive + kd_loss_weight × KD (upstream default 0.5).
        contrastive_weight: Weight of the contrastive term in the total (>= 0; 0 trains on
            the KD term alone, and the text tower then learns nothing).
        title_positives: Treat pairs whose normalised titles agree as positives of each other in the
            contrastive loss (soft targets) instead of as negatives; off by default, the default being chosen
            by measurement in notebook 02's preset.
        teacher_vision_model: Vision architecture of a cn_clip-checkpoint teacher (if it does not record it).
        teacher_text_model: Text architecture of a cn_clip-checkpoint teacher.
        teacher_batch_size: Batch size when computing the teacher-feature cache.
        teacher_precision: The frozen teacher's precision: ``auto`` (bf16 on a CPU with native bf16 and on a
            GPU, fp16 on GPUs without bf16, fp32 on other CPUs), ``fp32``, ``bf16`` or ``fp16``. Part of the
            teacher cache's key.
        download_root: Where cn_clip pretrained weights / the ModelScope cache live.
        teacher_cache: Compute the teacher's features once and reuse them (of every view with ``augment_views``;
            not with ``use_augment``, whose random augmentation needs the teacher online).
        teacher_cache_dir: Where cached teacher features live (default ``{logs}/teacher-cache``).
        kd_images: Photos without titles that only the KD term sees: a photo folder (flat or per category), a
            manifest ``.csv``/``.jsonl`` (``image`` column) or an ``lmdb/<split>`` folder of ``prepare``. Shown
            in the same seeded augmented views, their teacher features cached like the training images';
            bad files are skipped and listed in ``{logs}/kd-images/<fingerprint>/skipped.json``. Needs
            ``distillation``.
        kd_images_ratio: Unlabelled images per labelled sample in a batch (0.5 with batch 64: 32 more images per
            step per device, encoded by the student in the same forward pass).
        batch_size: Images per step per process (global batch = batch_size × processes).
        valid_batch_size: Batch size for validation.
        max_epochs: Epochs to train.
        lr: Peak learning rate (after warm-up; cosine decay to 0).
        wd: AdamW weight decay (not on norms, biases, logit scale).
        warmup: Warm-up steps.
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        eps: AdamW epsilon.
        context_length: Text tokens per caption.
        num_workers: DataLoader worker processes for training.
        valid_num_workers: DataLoader worker processes for validation.
        use_augment: Train-time augmentation (then the teacher runs online every step).
        augment_views: Augmented views per image besides the plain one (0 = none): each epoch every image
            is shown in one view, picked by (seed, epoch); the views are seeded, so the teacher's features
            of all of them are computed once and cached, and runs with other seeds or losses reuse them.
        augment_scale: Smallest crop area of a view, as a fraction of the image.
        augment_mix: Fraction of the augmented views that blend the photo with another photo of the same
            folder (mixup, the photo's weight 0.5–1; function matching's mixed views). Seeded like the other
            views, so their teacher features are cached too; 0 = none.
        precision: ``auto`` (bf16 where the GPU supports it, fp16 + GradScaler on older GPUs, fp32 on CPU),
            ``fp32``, ``bf16`` or ``fp16``.
        compile: ``torch.compile`` the student.
        accum_freq: Gradient accumulation steps per optimizer step.
        grad_checkpointing: Trade compute for memory (cn_clip's gradient checkpointing).
        freeze_vision: Keep the student's image tower fixed.
        save_step_frequency: Also write ``epoch_latest.pt`` every N optimizer steps (0 = only at epoch end).
        save_epoch_frequency: Keep a copy ``epochN.pt`` every N epochs (0 = none).
        valid_epoch_interval: Validate every N epochs (and after the last).
        seed: Data order and initialisation seed.
        device: ``cpu``, ``cuda``, ``cuda:1``… (default: the GPU of this process if there is one).
        max_steps: Stop after this many optimizer steps (overrides ``max_epochs`` for the schedule).
    """

    train_data: str = ""
    val_data: str | None = None
    logs: str = "out/runs"
    name: str = "run"
    vision_model: str = "ViT-B-16"
    text_model: str = "RoBERTa-wwm-ext-base-chinese"
    preset: str | None = None
    image_resolution: int | None = None
    resume: str | None = None
    reset_optimizer: bool = False
    reset_data_offset: bool = False
    download_root: str | None = None
    distillation: bool = False
    teacher_model_name: str | None = None
    teacher_vision_model: str | None = None
    teacher_text_model: str | None = None
    kd_loss: str = "relation"  # measured best on the demo (benchmarks/kd_demo.py); "cosine" is cn_clip's
    kd_loss_weight: float = 0.5
    contrastive_weight: float = 1.0
    title_positives: bool = False
    teacher_cache: bool = True
    teacher_cache_dir: str | None = None
    teacher_batch_size: int = 64
    teacher_precision: str = "auto"
    kd_images: str = ""
    kd_images_ratio: float = 0.5
    batch_size: int = 128
    valid_batch_size: int = 128
    max_epochs: int = 3
    max_steps: int | None = None
    lr: float = 5e-5
    wd: float = 0.001
    warmup: int = 100
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    context_length: int = 52
    num_workers: int = 2
    valid_num_workers: int = 1
    use_augment: bool = False
    augment_views: int = 0
    augment_scale: float = 0.35
    augment_mix: float = 0.0
    precision: str = "auto"
    compile: bool = False
    accum_freq: int = 1
    grad_checkpointing: bool = False
    freeze_vision: bool = False
    save_step_frequency: int = 0
    save_epoch_frequency: int = 1
    valid_epoch_interval: int = 1
    seed: int = 123
    device: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a dict, naming any unknown key (a typo would otherwise be silently ignored)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; valid: {sorted(names)}")
        return cls(**d)


@dataclass
class TrainResult:
    """What a run produced."""

    run_dir: Path
    checkpoint: Path
    steps: int
    epochs: int
    history: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
