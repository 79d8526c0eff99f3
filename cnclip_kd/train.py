"""Fine-tuning with knowledge distillation: data, teacher-feature cache, trainer, checkpoints.

The loop does what cn_clip's ``training/main.py`` + ``train.py`` do — same
flags, same LMDB input, same checkpoint format and folder layout
(``{logs}/{name}/checkpoints/epoch_latest.pt``) — and fixes what they lack:
it runs on a CPU, one GPU or many (``torchrun``; gloo on CPU, NCCL on GPU),
keeps the teacher really frozen, computes the teacher's features once and
reuses them (when there is no train-time augmentation), resumes exactly after
a kill, and stops on a NaN loss with the last good checkpoint kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import lmdb
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data import LmdbImages, read_labels
from .distributed import autocast as _autocast, barrier as _barrier, init_distributed
from .losses import DistillationLoss, build_kd_loss
from .metrics import image_to_image_metrics, neighbour_agreement
from .models import (ModelLoadError, build_model, cnclip_state_dict, encode_images, image_transform, load_checkpoint,
                     load_student, load_weights, model_info)
from .teacher_cache import (LMDBImages, TeacherFeatureCache, ViewAugment,  # noqa: F401 - re-exported
                            build_teacher_cache, epoch_views)
from .tokenizer import preprocess_text

logger = logging.getLogger(__name__)

CHECKPOINT_LATEST = "epoch_latest.pt"
_SAMPLE_MEMORY_MB = 1024  # decoded training samples kept in memory by an in-process loader


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
            :func:`cnclip_kd.teachers.load_teacher`).
        kd_loss: ``relation`` (default: best P@10 in the demo comparison, 3 seeds), ``feature`` or ``cosine``
            (cn_clip's loss).
        kd_loss_weight: total = contrastive + kd_loss_weight × KD (upstream default 0.5).
        teacher_vision_model: Vision architecture of a cn_clip-checkpoint teacher (if it does not record it).
        teacher_text_model: Text architecture of a cn_clip-checkpoint teacher.
        teacher_batch_size: Batch size when computing the teacher-feature cache.
        download_root: Where cn_clip pretrained weights / the ModelScope cache live.
        teacher_cache: Compute the teacher's features once and reuse them (of every view with ``augment_views``;
            not with ``use_augment``, whose random augmentation needs the teacher online).
        teacher_cache_dir: Where cached teacher features live (default ``{logs}/teacher-cache``).
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
    teacher_cache: bool = True
    teacher_cache_dir: str | None = None
    teacher_batch_size: int = 64
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


# --------------------------------------------------------------------------- data


class LMDBPairs(Dataset):
    """Image–text pairs from a cn_clip LMDB folder (``imgs`` + ``pairs``), as cn_clip's LMDBDataset reads them.

    Unlike cn_clip's class it also returns the sample index and image id (for
    the teacher cache), can return the teacher's own view of the image, and
    opens LMDB lazily so DataLoader workers each get their own handle. With
    ``views``, an index may be ``(index, view)``: the sample shown in that seeded
    augmented view (see :class:`cnclip_kd.teacher_cache.ViewAugment`). With
    ``memory_mb``, finished samples (deterministic ones only: not with
    ``augment``) are kept in memory up to that size, so small datasets decode
    and transform each (image, view) once instead of every epoch.
    """

    def __init__(self, lmdb_dir: str | os.PathLike, *, transform: Callable, context_length: int = 52,
                 teacher_transform: Callable | None = None, augment: Callable | None = None,
                 views: ViewAugment | None = None, memory_mb: float = 0):
        self.lmdb_dir = Path(lmdb_dir)
        for sub in ("imgs", "pairs"):
            if not (self.lmdb_dir / sub).is_dir():
                raise FileNotFoundError(f"{self.lmdb_dir / sub}: missing; is {self.lmdb_dir} an lmdb/<split> "
                                        "folder written by `cnclip-kd prepare`?")
        self.transform = transform
        self.teacher_transform = teacher_transform
        self.augment = augment
        self.views = views
        self.context_length = context_length
        self._memory: dict = {}
        self._memory_left = 0 if augment is not None else int(memory_mb * 2 ** 20)
        self.images = LmdbImages(self.lmdb_dir)
        self._txn_pairs = None
        env = lmdb.open(str(self.lmdb_dir / "pairs"), readonly=True, lock=False, readahead=False)
        with env.begin() as txn:
            self.n_pairs = int(txn.get(b"num_samples").decode())
        env.close()

    def __len__(self) -> int:
        return self.n_pairs

    def pair(self, index: int) -> tuple[int, int, str]:
        """``(image_id, text_id, text)`` of sample ``index``."""
        if self._txn_pairs is None:
            self._env_pairs = lmdb.open(str(self.lmdb_dir / "pairs"), readonly=True, lock=False, readahead=False,
                                        meminit=False)
            self._txn_pairs = self._env_pairs.begin(buffers=True)
        return pickle.loads(bytes(self._txn_pairs.get(str(index).encode())))

    def image(self, image_id: int) -> Image.Image:
        """The decoded RGB image stored under ``image_id``."""
        return self.images.image(image_id)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        from cn_clip.clip import tokenize

        index, view = index if isinstance(index, tuple) else (index, 0)
        if (index, view) in self._memory:
            return self._memory[(index, view)]
        image_id, _, text = self.pair(index)
        img = self.image(image_id)
        if view:
            if self.views is None:
                raise ValueError(f"sample {index} asked in view {view}, but this dataset has no views")
            img = self.views(img, image_id, view)
        if self.augment is not None:
            img = self.augment(img)
        item = {"index": index, "image_id": image_id, "view": view, "image": self.transform(img),
                "text": tokenize([preprocess_text(text)], context_length=self.context_length)[0]}
        if self.teacher_transform is not None:
            item["teacher_image"] = self.teacher_transform(img)
        size = sum(v.numel() * v.element_size() for v in item.values() if torch.is_tensor(v))
        if size <= self._memory_left:
            self._memory[(index, view)] = item
            self._memory_left -= size
        return item

    def __getstate__(self):
        # LMDB handles cannot cross process boundaries; workers reopen them.
        state = {k: v for k, v in self.__dict__.items() if k != "_env_pairs"}
        state["_txn_pairs"] = None
        state["_memory"], state["_memory_left"] = {}, 0
        return state


def epoch_batches(n: int, global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: a seeded permutation, padded by wrapping to whole batches.

    The same (n, batch, seed, epoch) always gives the same batches, which is
    what makes a resumed run continue exactly where it stopped.
    """
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    steps = max(1, math.ceil(n / global_batch))
    order = (order * (1 + steps * global_batch // max(n, 1)))[: steps * global_batch]
    return [order[i * global_batch:(i + 1) * global_batch] for i in range(steps)]


def _augmentation(resolution: int) -> Callable:
    from timm.data.auto_augment import auto_augment_transform
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(resolution, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        auto_augment_transform("original", {"translate_const": int(resolution * 0.45), "img_mean": (124, 116, 104)}),
    ])


# --------------------------------------------------------------------------- helpers


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision name on a device (``None`` = fp32)."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def cosine_lr(base_lr: float, warmup: int, total_steps: int) -> Callable[[int], float]:
    """cn_clip's schedule: linear warm-up, then half-cosine decay to 0 at ``total_steps``."""
    def lr_at(step: int) -> float:
        if step < warmup:
            return base_lr * (step + 1) / warmup
        e, es = step - warmup, max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(e, es) / es)) * base_lr
    return lr_at


def _param_groups(named_params, wd: float) -> list[dict]:
    # As cn_clip: no weight decay on norms, biases and the logit scale.
    exclude = lambda n: "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    decay, no_decay = [], []
    for n, p in named_params:
        if p.requires_grad:
            (no_decay if exclude(n) else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_history(run_dir: str | os.PathLike) -> list[dict]:
    """The run's ``history.jsonl``: one dict per logged step, and validation rows (``"type": "val"``)."""
    path = Path(run_dir) / "history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _truncate_history(path: Path, step: int) -> None:
    """Drop history rows past ``step`` (they belong to work lost with a kill)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


def _data_dir_of(lmdb_dir: Path) -> Path:
    # prepare writes {data}/lmdb/{split}; labels.csv lives in {data}.
    return lmdb_dir.resolve().parent.parent


@torch.no_grad()
def encode_split(encode: Callable[[torch.Tensor], torch.Tensor], transform: Callable, lmdb_dir: str | os.PathLike, *,
                 batch_size: int = 128, num_workers: int = 0, device: torch.device | str = "cpu",
                 autocast_dtype=None) -> tuple[list[int], torch.Tensor]:
    """Image ids and features (``[N, D]`` float32, on the CPU) of every image in an ``lmdb/{split}`` folder."""
    ds = LMDBImages(lmdb_dir, transform)
    ids, feats = [], []
    device = torch.device(device)
    for batch_ids, images in DataLoader(ds, batch_size=batch_size, num_workers=num_workers):
        with _autocast(device, autocast_dtype):
            feats.append(encode(images.to(device)).float().cpu())
        ids += batch_ids.tolist()
    return ids, torch.cat(feats)


def evaluate_encoder(encode: Callable[[torch.Tensor], torch.Tensor], transform: Callable,
                     lmdb_dir: str | os.PathLike, *, batch_size: int = 128, num_workers: int = 0,
                     device: torch.device | str = "cpu", autocast_dtype=None, k: int = 10,
                     reference: torch.Tensor | None = None) -> dict:
    """Image→image category metrics (P@k, mAP@k, R@1/5/10) of any image encoder on a prepared split.

    Args:
        encode: Batch of transformed images → features (student or teacher).
        transform: PIL image → tensor, the encoder's own preprocessing.
        lmdb_dir: An ``lmdb/{split}`` folder; labels come from the ``labels.csv``
            that ``prepare`` wrote beside ``lmdb/``.
        reference: Another encoder's features of the same split in the same order (e.g. the teacher's,
            from :func:`encode_split`); then ``"teacher@k"`` is added: the mean share of each image's
            top-k neighbours that the reference also ranks in its top k (:func:`neighbour_agreement`).
    """
    ids, feats = encode_split(encode, transform, lmdb_dir, batch_size=batch_size, num_workers=num_workers,
                              device=device, autocast_dtype=autocast_dtype)
    return split_metrics(ids, feats, lmdb_dir, k=k, reference=reference)


def split_metrics(ids: Sequence[int], feats: torch.Tensor, lmdb_dir: str | os.PathLike, *, k: int = 10,
                  reference: torch.Tensor | None = None) -> dict:
    """:func:`evaluate_encoder`'s metrics from features already computed with :func:`encode_split`."""
    lmdb_dir = Path(lmdb_dir)
    labels = {r["image_id"]: r["label"] for r in read_labels(_data_dir_of(lmdb_dir))}
    missing = [i for i in ids if i not in labels]
    if missing:
        raise ValueError(f"{lmdb_dir}: {len(missing)} image ids have no label in labels.csv (e.g. {missing[:3]})")
    out = image_to_image_metrics(feats, [labels[i] for i in ids], k=k)
    if reference is not None:
        out[f"teacher@{k}"] = neighbour_agreement(feats, reference, k=k)
    return out


def evaluate_lmdb(model: torch.nn.Module, lmdb_dir: str | os.PathLike, *, resolution: int, **kwargs) -> dict:
    """:func:`evaluate_encoder` for a cn_clip model (its features L2-normalised)."""
    model.eval()
    return evaluate_encoder(lambda x: encode_images(model, x), image_transform(resolution), lmdb_dir, **kwargs)


# --------------------------------------------------------------------------- training


class _PendingLosses:
    """One step's losses, copied to the host without blocking; read when the next step is queued.

    A ``float(loss)`` per step would make the CPU wait for the GPU every step.
    Copying asynchronously and reading a step later keeps the GPU busy, and
    nothing is saved before the copy is read and checked (a non-finite loss
    still stops the run before any checkpoint is written).
    """

    def __init__(self, losses: dict, finite: torch.Tensor, row: dict):
        self.keys = list(losses)
        values = torch.stack([v.detach().float() for v in losses.values()] + [finite.float()])
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = values, None
        self.row = row

    def read(self) -> tuple[dict, bool]:
        if self.event is not None:
            self.event.synchronize()
        *vals, ok = self.host.tolist()
        return {**self.row, **{f"loss/{k}": v for k, v in zip(self.keys, vals)}}, bool(ok)


class _StudentWithKD(torch.nn.Module):
    """The trainable parts in one module, so DDP syncs the KD projector's gradients too."""

    def __init__(self, clip: torch.nn.Module, kd: torch.nn.Module | None):
        super().__init__()
        self.clip = clip
        self.kd = kd

    def forward(self, images, texts):
        return self.clip(images, texts)


def train(config: TrainConfig | dict) -> TrainResult:
    """Fine-tune a Chinese-CLIP student, with or without distillation from a teacher.

    Runs alone or under ``torchrun`` (each process calls this). Writes into
    ``{logs}/{name}/``: ``checkpoints/epoch_latest.pt`` (+ ``epochN.pt``) in
    cn_clip's format, ``history.jsonl`` (per-step losses, lr, samples/s and
    per-epoch validation), ``config.json`` and ``metrics.json``.

    Args:
        config: A :class:`TrainConfig` or a dict of its fields.

    Returns:
        The run folder, final checkpoint, step/epoch counts, history and validation rows.

    Raises:
        NonFiniteLossError: The loss became NaN/inf (the last good checkpoint is kept).
        cnclip_kd.teachers.TeacherLoadError: The teacher could not be loaded.
        ModelLoadError: The student could not be built or loaded.
    """
    cfg = TrainConfig.from_dict(config) if isinstance(config, dict) else config
    if not cfg.train_data:
        raise ValueError("train_data is required (an lmdb/train folder written by `cnclip-kd prepare`)")
    if cfg.distillation and not cfg.teacher_model_name:
        raise ValueError("distillation needs teacher_model_name (--teacher-model-name)")
    d = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed + d.rank)
    random.seed(cfg.seed + d.rank)
    run_dir = Path(cfg.logs) / cfg.name
    ckpt_dir = run_dir / "checkpoints"
    latest = ckpt_dir / CHECKPOINT_LATEST
    history_path = run_dir / "history.jsonl"
    if d.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(".*.tmp"):  # half-written checkpoints of a killed attempt (GBs each)
            stale.unlink(missing_ok=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1, ensure_ascii=False))

    # ---- student
    resume_own = latest.is_file()
    start_ckpt = None
    if resume_own:
        start_ckpt = load_checkpoint(latest)
        info = start_ckpt.get("model_info") or model_info(cfg.vision_model, cfg.text_model, cfg.preset)
        if cfg.image_resolution and int(cfg.image_resolution) != int(info["image_resolution"]):
            raise ModelLoadError(f"{latest} was trained at image_resolution {info['image_resolution']}, not "
                                 f"{cfg.image_resolution}: continue it without --image-resolution, or start a new "
                                 f"run (another --name) with --resume {latest}")
        clip = build_model(info)
        load_weights(clip, start_ckpt["state_dict"], latest)
        logger.info("resuming %s from %s (epoch %s, step %s)", cfg.name, latest, start_ckpt["epoch"],
                    start_ckpt["step"])
    elif cfg.resume and Path(cfg.resume).is_file():
        start_ckpt = load_checkpoint(cfg.resume)
        clip, info = load_student(cfg.resume, vision_model=cfg.vision_model, text_model=cfg.text_model,
                                  preset=cfg.preset, image_resolution=cfg.image_resolution)
    else:
        clip, info = load_student(cfg.resume, vision_model=cfg.vision_model, text_model=cfg.text_model,
                                  preset=cfg.preset, download_root=cfg.download_root,
                                  image_resolution=cfg.image_resolution)
    resolution = int(info["image_resolution"])
    if cfg.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    if cfg.freeze_vision:
        clip.visual.requires_grad_(False)

    # ---- teacher
    teacher = cache = None
    kd = None
    if cfg.distillation:
        from .teachers import load_teacher

        teacher = load_teacher(cfg.teacher_model_name, device=d.device, vision_model=cfg.teacher_vision_model,
                               text_model=cfg.teacher_text_model, download_root=cfg.download_root)
        kd = build_kd_loss(cfg.kd_loss, int(info["embed_dim"]), int(teacher.embed_dim))
    module = _StudentWithKD(clip, kd).to(d.device)
    if start_ckpt is not None and kd is not None and start_ckpt.get("kd_state") and resume_own:
        module.kd.load_state_dict(start_ckpt["kd_state"])
    loss_fn = DistillationLoss(kd, kd_loss_weight=cfg.kd_loss_weight)
    autocast_dtype = resolve_precision(cfg.precision, d.device)

    if cfg.augment_views < 0:
        raise ValueError(f"augment_views must be >= 0, got {cfg.augment_views}")
    # The views themselves do not depend on the run's seed, so every seed and loss reuses one teacher cache.
    views = ViewAugment(scale=(cfg.augment_scale, 1.0)) if cfg.augment_views else None
    use_cache = teacher is not None and cfg.teacher_cache and not cfg.use_augment
    if use_cache:
        cache = build_teacher_cache(teacher, cfg.train_data, cfg.teacher_cache_dir or Path(cfg.logs) / "teacher-cache",
                                    batch_size=cfg.teacher_batch_size, num_workers=cfg.num_workers, d=d,
                                    autocast_dtype=autocast_dtype, augment=views, views=cfg.augment_views)

    # ---- data
    dataset = LMDBPairs(cfg.train_data, transform=image_transform(resolution), context_length=cfg.context_length,
                        teacher_transform=teacher.transform if teacher is not None and not use_cache else None,
                        augment=_augmentation(resolution) if cfg.use_augment else None, views=views,
                        # In-process loading keeps decoded samples (workers would each hold a copy, per epoch).
                        memory_mb=_SAMPLE_MEMORY_MB if cfg.num_workers == 0 else 0)
    global_batch = cfg.batch_size * d.world_size
    steps_per_epoch = max(1, math.ceil(len(dataset) / global_batch) // cfg.accum_freq)
    max_epochs = cfg.max_epochs
    if cfg.max_steps:
        max_epochs = math.ceil(cfg.max_steps / steps_per_epoch)
    total_steps = cfg.max_steps or steps_per_epoch * max_epochs

    # ---- optimizer
    params = _param_groups(module.named_parameters(), cfg.wd)
    # Fused AdamW: one kernel per step on GPU, and ~15 % of a small model's CPU step saved as well.
    fused = d.device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  **({"fused": True} if fused else {}))
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    lr_at = cosine_lr(cfg.lr, cfg.warmup, total_steps)

    step, epoch, epoch_step = 0, 0, 0
    if start_ckpt is not None and (resume_own or not cfg.reset_data_offset):
        step, epoch = int(start_ckpt.get("step", 0)), int(start_ckpt.get("epoch", 0))
        epoch_step = int(start_ckpt.get("epoch_step", 0))
    # Moments of the old position-embedding grid do not fit a student whose input side was changed
    # (checked on the weights: cn_clip's own checkpoints carry no model_info to compare).
    old_grid = next((v for k, v in (start_ckpt or {}).get("state_dict", {}).items()
                     if k.endswith("visual.positional_embedding")), None)
    resized = (not resume_own and old_grid is not None
               and tuple(old_grid.shape) != tuple(clip.visual.positional_embedding.shape))
    if resized:
        logger.info("%s: input side changed to %d; starting a fresh optimizer", cfg.resume, resolution)
    if start_ckpt is not None and "optimizer" in start_ckpt and (resume_own or not cfg.reset_optimizer) \
            and not resized:
        try:
            optimizer.load_state_dict(start_ckpt["optimizer"])
        except (ValueError, KeyError) as err:
            if resume_own:
                raise ModelLoadError(f"{latest}: optimizer state does not fit this run ({err}); "
                                     "use another --name or delete the checkpoint") from err
            logger.warning("optimizer state in %s does not fit (%s); starting a fresh optimizer", cfg.resume, err)
    if resume_own:
        if scaler is not None and start_ckpt.get("scaler"):
            scaler.load_state_dict(start_ckpt["scaler"])
        if start_ckpt.get("rng"):
            _set_rng_state(start_ckpt["rng"])
    if d.is_main:
        # Also without a checkpoint of our own: rows of an attempt killed before its first save are stale.
        _truncate_history(history_path, step)

    model = module
    if d.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    forward = torch.compile(model) if cfg.compile else model

    def save(path: Path, completed_epochs: int, steps_in_epoch: int) -> None:
        if not d.is_main:
            return
        ckpt = {
            # cn_clip's keys: its load_from_name and --resume read these.
            "epoch": completed_epochs, "step": step, "name": cfg.name,
            "state_dict": cnclip_state_dict(module.clip), "optimizer": optimizer.state_dict(),
            # Ours: enough to rebuild the model and continue exactly.
            "model_info": info, "vision_model": cfg.vision_model if not cfg.preset else f"preset:{cfg.preset}",
            "text_model": cfg.text_model if not cfg.preset else f"preset:{cfg.preset}",
            "epoch_step": steps_in_epoch, "rng": _rng_state(), "context_length": cfg.context_length,
            "kd_state": module.kd.state_dict() if module.kd is not None else {},
            "kd_loss": cfg.kd_loss if cfg.distillation else None,
            "teacher": cfg.teacher_model_name if cfg.distillation else None,
        }
        if scaler is not None:
            ckpt["scaler"] = scaler.state_dict()
        atomic_torch_save(ckpt, path)

    history = []
    validation = []
    last_good = latest if latest.is_file() else None

    def log_row(row: dict) -> None:
        history.append(row)
        if d.is_main:
            with open(history_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    def validate(ep: int) -> None:
        if not cfg.val_data or not d.is_main:
            return
        metrics = evaluate_lmdb(module.clip, cfg.val_data, resolution=resolution, batch_size=cfg.valid_batch_size,
                                num_workers=cfg.valid_num_workers, device=d.device, autocast_dtype=autocast_dtype)
        module.train()
        row = {"type": "val", "epoch": ep, "step": step, **{f"val/{k}": v for k, v in metrics.items()}}
        validation.append(row)
        log_row(row)
        logger.info("epoch %d validation: P@10 %.4f  mAP@10 %.4f", ep, metrics["p@10"], metrics["map@10"])

    pending: _PendingLosses | None = None
    finite = None

    def flush() -> None:
        """Log the previous step's losses; stop, before anything is saved, if they were not finite."""
        nonlocal pending
        if pending is None:
            return
        row, ok = pending.read()
        pending = None
        if not ok:
            where = f"{last_good}" if last_good else "none written yet"
            raise NonFiniteLossError(
                f"loss is {row['loss/total']} at step {row['step']} (epoch {row['epoch']}); stopped without saving. "
                f"Last good checkpoint: {where}. Lower --lr, raise --warmup, or use --precision fp32/bf16.")
        log_row(row)
        if d.is_main:
            bar.set_postfix(loss=f"{row['loss/total']:.4f}")

    module.train()
    if teacher is not None:
        teacher.train()  # a no-op by design: the teacher stays in eval mode
    bar = None
    done = step >= total_steps
    while epoch < max_epochs and not done:
        batches = epoch_batches(len(dataset), global_batch, cfg.seed, epoch)
        if views is not None:  # each sample in this epoch's view of it
            shown = epoch_views(len(dataset), cfg.augment_views, cfg.seed, epoch)
            batches = [[(i, shown[i]) for i in b] for b in batches]
        batches = batches[: steps_per_epoch * cfg.accum_freq]
        local = [b[d.rank * cfg.batch_size:(d.rank + 1) * cfg.batch_size] for b in batches]
        start_micro = epoch_step * cfg.accum_freq
        loader = DataLoader(dataset, batch_sampler=local[start_micro:], num_workers=cfg.num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed + epoch),
                            persistent_workers=False, pin_memory=d.device.type == "cuda")
        bar = tqdm(total=steps_per_epoch, initial=epoch_step, desc=f"epoch {epoch + 1}/{max_epochs}", unit="step",
                   disable=not d.is_main)
        t0 = time.perf_counter()
        micro = 0
        optimizer.zero_grad(set_to_none=True)
        for batch in loader:
            images = batch["image"].to(d.device, non_blocking=True)
            texts = batch["text"].to(d.device, non_blocking=True)
            teacher_feats = None
            if teacher is not None:
                if cache is not None:
                    teacher_feats = cache.lookup(batch["image_id"], batch["view"]).to(d.device, non_blocking=True)
                else:
                    with torch.no_grad(), _autocast(d.device, autocast_dtype):
                        teacher_feats = teacher.encode_image(batch["teacher_image"].to(d.device, non_blocking=True))
            with _autocast(d.device, autocast_dtype):
                img_f, txt_f, scale = forward(images, texts)
                losses = loss_fn(img_f, txt_f, scale, teacher_feats)
            total = losses["total"]
            finite = torch.isfinite(total.detach()) if finite is None else finite & torch.isfinite(total.detach())
            (scaler.scale(total / cfg.accum_freq) if scaler else total / cfg.accum_freq).backward()
            micro += 1
            if micro % cfg.accum_freq:
                continue
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():  # as cn_clip: keep the temperature within [1, 100]
                module.clip.logit_scale.clamp_(0, math.log(100))
            step += 1
            epoch_step += 1
            elapsed = time.perf_counter() - t0
            t0 = time.perf_counter()
            # Read this step's losses one step late (see _PendingLosses), so the GPU never idles on a sync.
            flush()
            pending = _PendingLosses(losses, finite, {
                "step": step, "epoch": epoch + 1, "lr": lr_at(step - 1),
                "samples_per_s": global_batch * cfg.accum_freq / max(elapsed, 1e-9)})
            finite = None
            bar.update(1)
            if cfg.save_step_frequency and step % cfg.save_step_frequency == 0 and epoch_step < steps_per_epoch:
                flush()
                save(latest, epoch, epoch_step)
                last_good = latest
            if step >= total_steps:
                done = True
                break
        flush()
        bar.close()
        partial = done and epoch_step < steps_per_epoch  # stopped by max_steps inside the epoch
        if not partial:
            epoch += 1
            epoch_step = 0
        label = epoch + 1 if partial else epoch
        if partial or label % cfg.valid_epoch_interval == 0 or done or label == max_epochs:
            validate(label)
        save(latest, epoch, epoch_step)
        last_good = latest
        if not partial and cfg.save_epoch_frequency and epoch % cfg.save_epoch_frequency == 0 and d.is_main:
            tmp = ckpt_dir / f".epoch{epoch}.pt.tmp"  # a kill mid-copy must not leave a truncated epochN.pt
            shutil.copyfile(latest, tmp)
            os.replace(tmp, ckpt_dir / f"epoch{epoch}.pt")
        _barrier(d)

    if d.is_main:
        full = read_history(run_dir)
        vals = [r for r in full if r.get("type") == "val"]
        final = {"steps": step, "epochs": epoch, "kd_loss": cfg.kd_loss if cfg.distillation else None,
                 "teacher": cfg.teacher_model_name if cfg.distillation else None,
                 **({k: v for k, v in vals[-1].items() if k.startswith("val/")} if vals else {})}
        tmp = run_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(final, indent=1))
        os.replace(tmp, run_dir / "metrics.json")
    return TrainResult(run_dir=run_dir, checkpoint=latest, steps=step, epochs=epoch,
                       history=read_history(run_dir) if d.is_main else history,
                       validation=[r for r in read_history(run_dir) if r.get("type") == "val"] if d.is_main
                       else validation)
