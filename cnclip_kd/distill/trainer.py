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

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..core.distributed import Dist, init_distributed
from ..core.distributed import autocast as _autocast
from ..core.distributed import barrier as _barrier
from ..core.precision import resolve_precision, resolve_teacher_precision
from ..models.students import (
    ModelLoadError,
    build_model,
    cnclip_state_dict,
    image_transform,
    load_checkpoint,
    load_student,
    load_weights,
    model_info,
)
from .checkpoints import atomic_torch_save, read_history, rng_state, set_rng_state, truncate_history
from .config import CHECKPOINT_LATEST, NonFiniteLossError, TrainConfig, TrainResult
from .losses import DistillationLoss, build_kd_loss
from .pairs import LMDBPairs, epoch_batches, train_augmentation
from .teacher_cache import TeacherFeatureCache, ViewAugment, build_teacher_cache, epoch_views
from .unlabelled import KdImageFeed, build_kd_feed, check_kd_config
from .validation import evaluate_lmdb

if TYPE_CHECKING:
    from ..models.teachers import Teacher

logger = logging.getLogger(__name__)
_SAMPLE_MEMORY_MB = 1024  # decoded training samples kept in memory by an in-process loader


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


# --------------------------------------------------------------------------- step helpers


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

    def _features(self, images, texts):
        # cn_clip's CLIP.forward divides by the norm, and a row that is exactly zero becomes NaN: an EfficientNet
        # tower's last ReLU6 map can be all zero for one image at a small input side (seen at 64 px), and one NaN
        # row poisons every weight through the batch's losses. F.normalize keeps that row zero instead.
        img = torch.nn.functional.normalize(self.clip.encode_image(images), dim=-1)
        txt = torch.nn.functional.normalize(self.clip.encode_text(texts), dim=-1)
        return img, txt, self.clip.logit_scale.exp()

    def forward(self, images, texts, extra_images=None):
        if extra_images is None:
            return self._features(images, texts)
        # kd_images: one pass of the image tower over labelled + unlabelled images, split after. Each row is
        # normalised alone, so only the batch-norm statistics of a student with batch norm see the extra images.
        img, txt, scale = self._features(torch.cat([images, extra_images]), texts)
        return img[:images.shape[0]], txt, scale, img[images.shape[0]:]


# --------------------------------------------------------------------------- building the run


@dataclass
class _Student:
    """The student model and the checkpoint it starts from."""

    clip: torch.nn.Module
    info: dict  # model_info: architectures, image_resolution, embed_dim
    start_ckpt: dict | None  # the checkpoint file its weights come from, if any
    resume_own: bool  # start_ckpt is this run's own epoch_latest.pt

    @property
    def resolution(self) -> int:
        return int(self.info["image_resolution"])


def _load_student(cfg: TrainConfig, latest: Path) -> _Student:
    """The student: this run's own ``latest`` if there is one, else ``cfg.resume`` (a file or a name), else new."""
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
    if cfg.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    if cfg.freeze_vision:
        clip.visual.requires_grad_(False)
    return _Student(clip, info, start_ckpt, resume_own)


def _load_teacher(cfg: TrainConfig, d: Dist, student_dim: int) -> tuple[Teacher | None, torch.nn.Module | None]:
    """The frozen teacher and the KD loss (with its projector); ``(None, None)`` without distillation."""
    if not cfg.distillation:
        return None, None
    # Imported per call: the teacher module loads only for distillation, and tests patch it there.
    from ..models.teachers import load_teacher

    teacher = load_teacher(cfg.teacher_model_name, device=d.device, vision_model=cfg.teacher_vision_model,
                           text_model=cfg.teacher_text_model, download_root=cfg.download_root)
    return teacher, build_kd_loss(cfg.kd_loss, student_dim, int(teacher.embed_dim))


def _teacher_features(cfg: TrainConfig, d: Dist, teacher: Teacher | None,
                      autocast_dtype) -> tuple[ViewAugment | None, TeacherFeatureCache | None]:
    """The augmented views of the images, and the teacher's features of them computed once (None: run it online)."""
    if cfg.augment_views < 0:
        raise ValueError(f"augment_views must be >= 0, got {cfg.augment_views}")
    if cfg.augment_mix and not cfg.augment_views:
        raise ValueError(f"augment_mix {cfg.augment_mix} needs augment_views > 0 (mixed views are some of the views)")
    # The views themselves do not depend on the run's seed, so every seed and loss reuses one teacher cache.
    views = ViewAugment(scale=(cfg.augment_scale, 1.0), mix=cfg.augment_mix) if cfg.augment_views else None
    if teacher is None or not cfg.teacher_cache or cfg.use_augment:
        return views, None
    cache = build_teacher_cache(teacher, cfg.train_data, cfg.teacher_cache_dir or Path(cfg.logs) / "teacher-cache",
                                batch_size=cfg.teacher_batch_size, num_workers=cfg.num_workers, d=d,
                                autocast_dtype=autocast_dtype, augment=views, views=cfg.augment_views)
    return views, cache


def _training_pairs(cfg: TrainConfig, resolution: int, teacher: Teacher | None, views: ViewAugment | None,
                    use_cache: bool) -> LMDBPairs:
    """The training pairs, with the teacher's own view of each image when the teacher runs online."""
    return LMDBPairs(cfg.train_data, transform=image_transform(resolution), context_length=cfg.context_length,
                     teacher_transform=teacher.transform if teacher is not None and not use_cache else None,
                     augment=train_augmentation(resolution) if cfg.use_augment else None, views=views,
                     # In-process loading keeps decoded samples (workers would each hold a copy, per epoch).
                     memory_mb=_SAMPLE_MEMORY_MB if cfg.num_workers == 0 else 0)


@dataclass(frozen=True)
class _Schedule:
    """How many optimizer steps the run takes and how they fall into epochs."""

    global_batch: int
    steps_per_epoch: int
    max_epochs: int
    total_steps: int

    @classmethod
    def plan(cls, cfg: TrainConfig, n_samples: int, world_size: int) -> _Schedule:
        global_batch = cfg.batch_size * world_size
        steps_per_epoch = max(1, math.ceil(n_samples / global_batch) // cfg.accum_freq)
        max_epochs = cfg.max_epochs
        if cfg.max_steps:
            max_epochs = math.ceil(cfg.max_steps / steps_per_epoch)
        return cls(global_batch, steps_per_epoch, max_epochs, cfg.max_steps or steps_per_epoch * max_epochs)


def _build_optimizer(cfg: TrainConfig, module: torch.nn.Module, device: torch.device,
                     autocast_dtype) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler | None]:
    """cn_clip's AdamW (no decay on norms, biases, logit scale), and a GradScaler for fp16."""
    params = _param_groups(module.named_parameters(), cfg.wd)
    # Fused AdamW: one kernel per step on GPU, and ~15 % of a small model's CPU step saved as well.
    fused = device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  **({"fused": True} if fused else {}))
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    return optimizer, scaler


# --------------------------------------------------------------------------- run folder and checkpoints


class _RunFolder:
    """``{logs}/{name}/``: ``config.json``, ``history.jsonl``, ``metrics.json`` and the checkpoint paths.

    Only the main process writes; every process keeps its own history rows in memory.
    """

    def __init__(self, cfg: TrainConfig, d: Dist):
        self.cfg, self.d = cfg, d
        self.path = Path(cfg.logs) / cfg.name
        self.ckpt_dir = self.path / "checkpoints"
        self.latest = self.ckpt_dir / CHECKPOINT_LATEST
        self.history_path = self.path / "history.jsonl"
        self.history: list[dict] = []
        self.validation: list[dict] = []
        self.summary: dict = {}  # more entries for metrics.json (what kd_images gave)

    def prepare(self) -> None:
        """Create the folder, drop half-written checkpoints of a killed attempt, write ``config.json``."""
        if not self.d.is_main:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.ckpt_dir.glob(".*.tmp"):  # half-written checkpoints of a killed attempt (GBs each)
            stale.unlink(missing_ok=True)
        (self.path / "config.json").write_text(json.dumps(asdict(self.cfg), indent=1, ensure_ascii=False))

    def log(self, row: dict) -> None:
        """Keep a history row, and append it to ``history.jsonl`` (main process)."""
        self.history.append(row)
        if self.d.is_main:
            with open(self.history_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    def log_validation(self, row: dict) -> None:
        self.validation.append(row)
        self.log(row)

    def finish(self, step: int, epoch: int) -> TrainResult:
        """Write ``metrics.json`` (main process) and return the run's result."""
        cfg, run_dir, is_main = self.cfg, self.path, self.d.is_main
        if is_main:
            full = read_history(run_dir)
            vals = [r for r in full if r.get("type") == "val"]
            final = {"steps": step, "epochs": epoch, "kd_loss": cfg.kd_loss if cfg.distillation else None,
                     "teacher": cfg.teacher_model_name if cfg.distillation else None, **self.summary,
                     **({k: v for k, v in vals[-1].items() if k.startswith("val/")} if vals else {})}
            tmp = run_dir / "metrics.json.tmp"
            tmp.write_text(json.dumps(final, indent=1))
            os.replace(tmp, run_dir / "metrics.json")
        return TrainResult(run_dir=run_dir, checkpoint=self.latest, steps=step, epochs=epoch,
                           history=read_history(run_dir) if is_main else self.history,
                           validation=[r for r in read_history(run_dir) if r.get("type") == "val"] if is_main
                           else self.validation)


class _Checkpointer:
    """Saves and restores the model, KD projector, optimizer, scaler and RNG state in cn_clip's checkpoint format."""

    def __init__(self, cfg: TrainConfig, d: Dist, folder: _RunFolder, module: _StudentWithKD,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, info: dict):
        self.cfg, self.d, self.folder = cfg, d, folder
        self.module, self.optimizer, self.scaler, self.info = module, optimizer, scaler, info
        self.last_good: Path | None = None  # named in the error when the loss turns non-finite

    def restore(self, student: _Student) -> tuple[int, int, int]:
        """Continue where the start checkpoint left off: optimizer, scaler, RNG state and history.

        Returns:
            ``(step, epoch, epoch_step)`` to continue from (zeros for a new run or a reset data offset).

        Raises:
            ModelLoadError: This run's own checkpoint holds an optimizer state that does not fit.
        """
        cfg, start, own, latest = self.cfg, student.start_ckpt, student.resume_own, self.folder.latest
        step, epoch, epoch_step = 0, 0, 0
        if start is not None and (own or not cfg.reset_data_offset):
            step, epoch = int(start.get("step", 0)), int(start.get("epoch", 0))
            epoch_step = int(start.get("epoch_step", 0))
        resized = _input_side_changed(cfg, student)
        if start is not None and "optimizer" in start and (own or not cfg.reset_optimizer) and not resized:
            try:
                self.optimizer.load_state_dict(start["optimizer"])
            except (ValueError, KeyError) as err:
                if own:
                    raise ModelLoadError(f"{latest}: optimizer state does not fit this run ({err}); "
                                         "use another --name or delete the checkpoint") from err
                logger.warning("optimizer state in %s does not fit (%s); starting a fresh optimizer", cfg.resume,
                               err)
        if own:
            if self.scaler is not None and start.get("scaler"):
                self.scaler.load_state_dict(start["scaler"])
            if start.get("rng"):
                set_rng_state(start["rng"])
        if self.d.is_main:
            # Also without a checkpoint of our own: rows of an attempt killed before its first save are stale.
            truncate_history(self.folder.history_path, step)
        self.last_good = latest if latest.is_file() else None
        return step, epoch, epoch_step

    def save(self, step: int, completed_epochs: int, steps_in_epoch: int) -> None:
        """Write ``epoch_latest.pt`` atomically (main process only); it becomes the last good checkpoint."""
        if self.d.is_main:
            cfg, module = self.cfg, self.module
            ckpt = {
                # cn_clip's keys: its load_from_name and --resume read these.
                "epoch": completed_epochs, "step": step, "name": cfg.name,
                "state_dict": cnclip_state_dict(module.clip), "optimizer": self.optimizer.state_dict(),
                # Ours: enough to rebuild the model and continue exactly.
                "model_info": self.info,
                "vision_model": cfg.vision_model if not cfg.preset else f"preset:{cfg.preset}",
                "text_model": cfg.text_model if not cfg.preset else f"preset:{cfg.preset}",
                "epoch_step": steps_in_epoch, "rng": rng_state(), "context_length": cfg.context_length,
                "kd_state": module.kd.state_dict() if module.kd is not None else {},
                "kd_loss": cfg.kd_loss if cfg.distillation else None,
                "teacher": cfg.teacher_model_name if cfg.distillation else None,
            }
            if self.scaler is not None:
                ckpt["scaler"] = self.scaler.state_dict()
            atomic_torch_save(ckpt, self.folder.latest)  # looked up here: tests patch it on this module
        self.last_good = self.folder.latest

    def keep_epoch_copy(self, epoch: int) -> None:
        """Copy ``epoch_latest.pt`` to ``epoch{epoch}.pt`` (main process only)."""
        if not self.d.is_main:
            return
        ckpt_dir = self.folder.ckpt_dir
        tmp = ckpt_dir / f".epoch{epoch}.pt.tmp"  # a kill mid-copy must not leave a truncated epochN.pt
        shutil.copyfile(self.folder.latest, tmp)
        os.replace(tmp, ckpt_dir / f"epoch{epoch}.pt")


def _input_side_changed(cfg: TrainConfig, student: _Student) -> bool:
    """Whether the student's input side differs from that of the ``--resume`` checkpoint it starts from."""
    # Moments of the old position-embedding grid do not fit a student whose input side was changed
    # (checked on the weights: cn_clip's own checkpoints carry no model_info to compare).
    old_grid = next((v for k, v in (student.start_ckpt or {}).get("state_dict", {}).items()
                     if k.endswith("visual.positional_embedding")), None)
    resized = (not student.resume_own and old_grid is not None
               and tuple(old_grid.shape) != tuple(student.clip.visual.positional_embedding.shape))
    if resized:
        logger.info("%s: input side changed to %d; starting a fresh optimizer", cfg.resume, student.resolution)
    return resized


# --------------------------------------------------------------------------- the epoch loop


class _Learner:
    """The models, loss and optimizer: forward/backward of micro-batches, optimizer steps, validation."""

    def __init__(self, d: Dist, module: _StudentWithKD, forward: Callable, loss_fn: torch.nn.Module,
                 teacher: Teacher | None, cache: TeacherFeatureCache | None, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None, lr_at: Callable[[int], float], autocast_dtype,
                 title_positives: bool = False, kd_feed: KdImageFeed | None = None, teacher_dtype=None):
        self.d, self.module, self.forward, self.loss_fn = d, module, forward, loss_fn
        self.teacher, self.cache = teacher, cache
        self.optimizer, self.scaler, self.lr_at = optimizer, scaler, lr_at
        self.autocast_dtype = autocast_dtype
        self.teacher_dtype = teacher_dtype  # the online teacher's autocast (TrainConfig.teacher_precision)
        self.title_positives = title_positives  # pass the batch's title keys to the loss
        self.kd_feed = kd_feed  # unlabelled photos for the KD term (kd_images), or None
        self.finite: torch.Tensor | None = None  # all losses since the last optimizer step were finite

    def train_mode(self) -> None:
        self.module.train()
        if self.teacher is not None:
            self.teacher.train()  # a no-op by design: the teacher stays in eval mode

    def micro_batch(self, batch: dict, accum_freq: int, extra: dict | None = None) -> dict:
        """Student forward, loss (with the teacher's features), backward; returns the losses.

        ``extra``: a batch of unlabelled photos (kd_images), encoded in the same forward, seen by the KD term only.
        """
        device = self.d.device
        images = batch["image"].to(device, non_blocking=True)
        texts = batch["text"].to(device, non_blocking=True)
        teacher_feats = None
        if self.teacher is not None:
            if self.cache is not None:
                teacher_feats = self.cache.lookup(batch["image_id"], batch["view"]).to(device, non_blocking=True)
            else:
                with torch.no_grad(), _autocast(device, self.teacher_dtype):
                    teacher_feats = self.teacher.encode_image(batch["teacher_image"].to(device, non_blocking=True))
        extra_in, extra_kw = (), {}
        if extra is not None:
            extra_in = (extra["image"].to(device, non_blocking=True),)
            extra_kw["extra_teacher_features"] = self.kd_feed.teacher_features(extra, self.teacher, device,
                                                                               self.teacher_dtype)
        with _autocast(device, self.autocast_dtype):
            img_f, txt_f, scale, *extra_f = self.forward(images, texts, *extra_in)
            if extra_f:
                extra_kw["extra_image_features"] = extra_f[0]
            keys = batch["title_key"].to(device, non_blocking=True) if self.title_positives else None
            losses = self.loss_fn(img_f, txt_f, scale, teacher_feats, title_keys=keys, **extra_kw)
        total = losses["total"]
        ok = torch.isfinite(total.detach())
        self.finite = ok if self.finite is None else self.finite & ok
        (self.scaler.scale(total / accum_freq) if self.scaler else total / accum_freq).backward()
        return losses

    def update(self, step: int) -> torch.Tensor:
        """Optimizer step number ``step``; returns whether its losses were finite (a tensor: no sync)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # as cn_clip: keep the temperature within [1, 100]
            self.module.clip.logit_scale.clamp_(0, math.log(100))
        finite, self.finite = self.finite, None
        return finite

    def evaluate(self, cfg: TrainConfig, resolution: int) -> dict:
        """Image→image retrieval metrics of the student on ``cfg.val_data``; leaves it in training mode."""
        metrics = evaluate_lmdb(self.module.clip, cfg.val_data, resolution=resolution,
                                batch_size=cfg.valid_batch_size, num_workers=cfg.valid_num_workers,
                                device=self.d.device, autocast_dtype=self.autocast_dtype)
        self.module.train()
        return metrics


def _epoch_loader(cfg: TrainConfig, d: Dist, dataset: LMDBPairs, schedule: _Schedule, views: ViewAugment | None,
                  epoch: int, epoch_step: int) -> DataLoader:
    """This process's share of ``epoch``'s batches, from optimizer step ``epoch_step`` on."""
    batches = epoch_batches(len(dataset), schedule.global_batch, cfg.seed, epoch)
    if views is not None:  # each sample in this epoch's view of it
        shown = epoch_views(len(dataset), cfg.augment_views, cfg.seed, epoch)
        batches = [[(i, shown[i]) for i in b] for b in batches]
    batches = batches[: schedule.steps_per_epoch * cfg.accum_freq]
    local = [b[d.rank * cfg.batch_size:(d.rank + 1) * cfg.batch_size] for b in batches]
    start_micro = epoch_step * cfg.accum_freq
    return DataLoader(dataset, batch_sampler=local[start_micro:], num_workers=cfg.num_workers,
                      generator=torch.Generator().manual_seed(cfg.seed + epoch),
                      persistent_workers=False, pin_memory=d.device.type == "cuda")


class _EpochLoop:
    """Epochs of (accumulated) micro-batches, with validation, checkpoints and the stop on a non-finite loss."""

    def __init__(self, cfg: TrainConfig, d: Dist, learner: _Learner, dataset: LMDBPairs, views: ViewAugment | None,
                 schedule: _Schedule, resolution: int, checkpointer: _Checkpointer, position: tuple[int, int, int]):
        self.cfg, self.d, self.learner = cfg, d, learner
        self.dataset, self.views, self.schedule, self.resolution = dataset, views, schedule, resolution
        self.checkpointer, self.folder = checkpointer, checkpointer.folder
        self.step, self.epoch, self.epoch_step = position
        self.pending: _PendingLosses | None = None
        self.bar = None

    def run(self) -> tuple[int, int]:
        """Train until the last step or epoch; returns the ``(step, epoch)`` reached."""
        self.learner.train_mode()
        done = self.step >= self.schedule.total_steps
        while self.epoch < self.schedule.max_epochs and not done:
            done = self._train_epoch()
            self._end_epoch(done)
        return self.step, self.epoch

    def _train_epoch(self) -> bool:
        """Train the rest of the current epoch; True when the run reached its last step."""
        cfg, schedule, learner = self.cfg, self.schedule, self.learner
        loader = _epoch_loader(cfg, self.d, self.dataset, schedule, self.views, self.epoch, self.epoch_step)
        feed = learner.kd_feed  # its micro-batches run in step with the labelled ones, resumed at the same one
        extra = None if feed is None else iter(feed.epoch_loader(
            cfg, self.d, schedule.steps_per_epoch * cfg.accum_freq, self.epoch, self.epoch_step * cfg.accum_freq))
        self.bar = tqdm(total=schedule.steps_per_epoch, initial=self.epoch_step,
                        desc=f"epoch {self.epoch + 1}/{schedule.max_epochs}", unit="step", disable=not self.d.is_main)
        done = False
        t0 = time.perf_counter()
        micro = 0
        learner.optimizer.zero_grad(set_to_none=True)
        for batch in loader:
            losses = learner.micro_batch(batch, cfg.accum_freq, None if extra is None else next(extra))
            micro += 1
            if micro % cfg.accum_freq:
                continue
            finite = learner.update(self.step)
            self.step += 1
            self.epoch_step += 1
            elapsed = time.perf_counter() - t0
            t0 = time.perf_counter()
            # Read this step's losses one step late (see _PendingLosses), so the GPU never idles on a sync.
            self._flush()
            self.pending = _PendingLosses(losses, finite, {
                "step": self.step, "epoch": self.epoch + 1, "lr": learner.lr_at(self.step - 1),
                "samples_per_s": schedule.global_batch * cfg.accum_freq / max(elapsed, 1e-9)})
            self.bar.update(1)
            if cfg.save_step_frequency and self.step % cfg.save_step_frequency == 0 \
                    and self.epoch_step < schedule.steps_per_epoch:
                self._flush()
                self.checkpointer.save(self.step, self.epoch, self.epoch_step)
            if self.step >= schedule.total_steps:
                done = True
                break
        self._flush()
        self.bar.close()
        return done

    def _flush(self) -> None:
        """Log the previous step's losses; stop, before anything is saved, if they were not finite."""
        if self.pending is None:
            return
        row, ok = self.pending.read()
        self.pending = None
        if not ok:
            last_good = self.checkpointer.last_good
            where = f"{last_good}" if last_good else "none written yet"
            raise NonFiniteLossError(
                f"loss is {row['loss/total']} at step {row['step']} (epoch {row['epoch']}); stopped without saving. "
                f"Last good checkpoint: {where}. Lower --lr, raise --warmup, or use --precision fp32/bf16.")
        self.folder.log(row)
        if self.d.is_main:
            self.bar.set_postfix(loss=f"{row['loss/total']:.4f}")

    def _end_epoch(self, done: bool) -> None:
        """Validate, save ``epoch_latest.pt`` (and ``epochN.pt``), and wait for the other processes."""
        cfg = self.cfg
        partial = done and self.epoch_step < self.schedule.steps_per_epoch  # stopped by max_steps inside the epoch
        if not partial:
            self.epoch += 1
            self.epoch_step = 0
        label = self.epoch + 1 if partial else self.epoch
        if partial or label % cfg.valid_epoch_interval == 0 or done or label == self.schedule.max_epochs:
            self._validate(label)
        self.checkpointer.save(self.step, self.epoch, self.epoch_step)
        if not partial and cfg.save_epoch_frequency and self.epoch % cfg.save_epoch_frequency == 0:
            self.checkpointer.keep_epoch_copy(self.epoch)
        _barrier(self.d)

    def _validate(self, label: int) -> None:
        if not self.cfg.val_data or not self.d.is_main:
            return
        metrics = self.learner.evaluate(self.cfg, self.resolution)
        row = {"type": "val", "epoch": label, "step": self.step, **{f"val/{k}": v for k, v in metrics.items()}}
        self.folder.log_validation(row)
        logger.info("epoch %d validation: P@10 %.4f  mAP@10 %.4f", label, metrics["p@10"], metrics["map@10"])


# --------------------------------------------------------------------------- training


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
        cnclip_kd.models.teachers.TeacherLoadError: The teacher could not be loaded.
        ModelLoadError: The student could not be built or loaded.
        FileNotFoundError: ``kd_images`` does not exist.
        cnclip_kd.data.dataset.DataError: ``kd_images`` holds no usable photo.
    """
    cfg = TrainConfig.from_dict(config) if isinstance(config, dict) else config
    if not cfg.train_data:
        raise ValueError("train_data is required (an lmdb/train folder written by `cnclip-kd prepare`)")
    if cfg.distillation and not cfg.teacher_model_name:
        raise ValueError("distillation needs teacher_model_name (--teacher-model-name)")
    if cfg.contrastive_weight < 0:
        raise ValueError(f"contrastive_weight must be >= 0, got {cfg.contrastive_weight}")
    check_kd_config(cfg)
    d = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed + d.rank)
    random.seed(cfg.seed + d.rank)
    folder = _RunFolder(cfg, d)
    folder.prepare()

    # The construction order below is also the order of draws from the seeded RNGs: keep it.
    student = _load_student(cfg, folder.latest)
    teacher, kd = _load_teacher(cfg, d, int(student.info["embed_dim"]))
    module = _StudentWithKD(student.clip, kd).to(d.device)
    if student.resume_own and kd is not None and student.start_ckpt.get("kd_state"):
        module.kd.load_state_dict(student.start_ckpt["kd_state"])
    loss_fn = DistillationLoss(kd, kd_loss_weight=cfg.kd_loss_weight, contrastive_weight=cfg.contrastive_weight)
    autocast_dtype = resolve_precision(cfg.precision, d.device)
    teacher_dtype = resolve_teacher_precision(cfg.teacher_precision, d.device)
    views, cache = _teacher_features(cfg, d, teacher, teacher_dtype)
    dataset = _training_pairs(cfg, student.resolution, teacher, views, use_cache=cache is not None)
    kd_feed = build_kd_feed(cfg, d, teacher, views, image_transform(student.resolution), use_cache=cache is not None,
                            augment=train_augmentation(student.resolution) if cfg.use_augment else None,
                            autocast_dtype=teacher_dtype)
    folder.summary = kd_feed.describe() if kd_feed is not None else {}
    schedule = _Schedule.plan(cfg, len(dataset), d.world_size)

    optimizer, scaler = _build_optimizer(cfg, module, d.device, autocast_dtype)
    checkpointer = _Checkpointer(cfg, d, folder, module, optimizer, scaler, student.info)
    position = checkpointer.restore(student)

    model = module
    if d.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    learner = _Learner(d, module, torch.compile(model) if cfg.compile else model, loss_fn, teacher, cache, optimizer,
                       scaler, cosine_lr(cfg.lr, cfg.warmup, schedule.total_steps), autocast_dtype,
                       title_positives=cfg.title_positives, kd_feed=kd_feed, teacher_dtype=teacher_dtype)
    step, epoch = _EpochLoop(cfg, d, learner, dataset, views, schedule, student.resolution, checkpointer,
                             position).run()
    return folder.finish(step, epoch)
