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
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..core.distributed import autocast as _autocast
from ..core.distributed import barrier as _barrier
from ..core.distributed import init_distributed
from ..core.precision import resolve_precision
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
from .teacher_cache import ViewAugment, build_teacher_cache, epoch_views
from .validation import evaluate_lmdb

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
        cnclip_kd.models.teachers.TeacherLoadError: The teacher could not be loaded.
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
        from ..models.teachers import load_teacher

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
                        augment=train_augmentation(resolution) if cfg.use_augment else None, views=views,
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
            set_rng_state(start_ckpt["rng"])
    if d.is_main:
        # Also without a checkpoint of our own: rows of an attempt killed before its first save are stale.
        truncate_history(history_path, step)

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
            "epoch_step": steps_in_epoch, "rng": rng_state(), "context_length": cfg.context_length,
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
