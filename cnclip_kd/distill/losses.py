"""Losses for CLIP fine-tuning with knowledge distillation of the image encoder.

Every loss is a small :class:`torch.nn.Module` whose ``forward`` returns a dict
of named scalar tensors (open_clip style). All arithmetic runs in float32 with
autocast switched off, whatever dtype the features arrive in.

Distributed training: :class:`ClipLoss` and :class:`DistillationLoss` gather
features from all ranks *with* gradient, so every rank computes the loss of
the global batch. The gather's backward sums the gradients of all ranks, so a
rank's local features receive ``world_size`` times the gradient of the global
loss; DDP's averaging over ranks then gives parameters exactly the gradient of
the single-process loss on the global batch (the open_clip ``gather_with_grad``
scheme). Parameters used only inside the loss (the projector of
:class:`FeatureKDLoss`, ``logit_scale``) get the full global gradient on every
rank, identical across ranks, so averaging leaves them unchanged too.

Title positives: with ``title_keys`` (one int64 key per sample, equal keys =
the same normalised title, see :func:`cnclip_kd.distill.pairs.title_key`),
pairs whose titles agree are all positives of each other instead of
negatives. The keys are gathered (without gradient) with the features.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "KD_LOSSES",
    "ClipLoss",
    "CosineKDLoss",
    "DistillationLoss",
    "FeatureKDLoss",
    "RelationKDLoss",
    "build_kd_loss",
    "gather_features",
]


def _fp32(device: torch.device):
    """Context that disables autocast on ``device`` so matmuls stay float32."""
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if is_available is not None and not is_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _local_sizes(t: Tensor) -> list[int]:
    """Batch sizes of ``t`` on every rank (one tiny all_gather)."""
    size = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _gather(t: Tensor, with_grad: bool, sizes: Sequence[int]) -> Tensor:
    """All-gather ``t`` along dim 0, padding to the largest rank's batch."""
    max_n = max(sizes)
    padded = F.pad(t, (0, 0) * (t.dim() - 1) + (0, max_n - t.shape[0])) if t.shape[0] < max_n else t
    if with_grad:
        from torch.distributed.nn.functional import all_gather as all_gather_with_grad

        with warnings.catch_warnings():
            # Deprecated in favour of a private functional API since torch 2.x;
            # it is the public autograd-aware gather that works on gloo and NCCL.
            warnings.simplefilter("ignore", FutureWarning)
            parts = list(all_gather_with_grad(padded.contiguous()))
    else:
        buf = padded.detach().contiguous()
        parts = [torch.empty_like(buf) for _ in sizes]
        dist.all_gather(parts, buf)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def gather_features(t: Tensor, with_grad: bool) -> Tensor:
    """Concatenate ``t`` from all ranks along dim 0, in rank order.

    Ranks may hold different batch sizes (they are exchanged first).

    Args:
        t: Local tensor ``[B_local, ...]``.
        with_grad: If True, gradients flow back to every rank's ``t`` (the
            backward sums the gradients of all ranks). If False, the result
            has no autograd history.

    Returns:
        ``[B_global, ...]``; ``t`` itself when torch.distributed is not
        initialised or the world size is 1.
    """
    if _world_size() == 1:
        return t
    return _gather(t, with_grad, _local_sizes(t))


def _scale(logit_scale: Tensor | float, device: torch.device) -> Tensor:
    if isinstance(logit_scale, Tensor):
        # DataParallel returns one scale per replica; upstream takes the mean.
        return logit_scale.float().mean()
    return torch.tensor(float(logit_scale), device=device)


def _title_targets(keys: Tensor) -> Tensor | None:
    """Row-normalised ``[N, N]`` target matrix, uniform over the samples sharing a key.

    Returns None when all keys differ, so the caller keeps the hard-label path
    (the plain CLIP loss, bit for bit). The matrix is symmetric in which samples
    match, so one matrix serves both directions.
    """
    same = keys[:, None] == keys[None, :]
    counts = same.sum(dim=1, keepdim=True)
    # One host sync per step, paid only when title positives are switched on.
    if bool((counts == 1).all()):
        return None
    return same.float() / counts


def _contrastive(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float,
                 title_keys: Tensor | None = None) -> Tensor:
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    logits = _scale(logit_scale, img.device) * img @ txt.t()
    targets = None if title_keys is None else _title_targets(title_keys.to(logits.device))
    if targets is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    # Soft-target cross-entropy (probability targets), averaged over rows.
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def _check_keys(title_keys: Tensor | None, n: int) -> None:
    if title_keys is not None and tuple(title_keys.shape) != (n,):
        raise ValueError(f"title_keys must have shape [{n}] (one key per sample), got {tuple(title_keys.shape)}")


class ClipLoss(nn.Module):
    """Symmetric CLIP contrastive loss (InfoNCE image->text and text->image).

    Features are L2-normalised inside (idempotent for cn_clip's already
    normalised outputs, and the gradient reaching the encoder is unchanged).
    Under torch.distributed with world size > 1 both feature sets are gathered
    with gradient (and title keys without) and the loss is computed over the
    global batch.
    """

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float, *,
                title_keys: Tensor | None = None) -> dict:
        """Compute the contrastive loss.

        Args:
            image_features: ``[B, D]`` image embeddings (any float dtype).
            text_features: ``[B, D]`` text embeddings; row i pairs with image i.
            logit_scale: Temperature multiplier, already exponentiated (as
                cn_clip's model returns ``logit_scale.exp()``); a scalar
                tensor, a per-replica vector (its mean is used) or a float.
            title_keys: Optional ``[B]`` int64 keys, equal for equal
                normalised titles. Then the target of image i is uniform over
                the texts with i's key (i included), and likewise for texts;
                the loss is the soft-target cross-entropy. None, or keys that
                all differ in the (gathered) batch, give the plain CLIP loss.

        Returns:
            ``{"contrastive": loss}`` with a float32 scalar loss.

        Raises:
            ValueError: If ``title_keys`` is not of shape ``[B]``.
        """
        _check_keys(title_keys, image_features.shape[0])
        with _fp32(image_features.device):
            if _world_size() > 1:
                sizes = _local_sizes(image_features)
                image_features = _gather(image_features, True, sizes)
                text_features = _gather(text_features, True, sizes)
                if title_keys is not None:
                    title_keys = _gather(title_keys, False, sizes)
            return {"contrastive": _contrastive(image_features, text_features, logit_scale, title_keys)}


class CosineKDLoss(nn.Module):
    """Upstream cn_clip KD loss: ``1 - mean cosine(teacher, resized student)``.

    The student matrix ``[B, D_s]`` is bilinearly resized to the teacher's
    ``[B, D_t]`` (as ``cn_clip.training.train.cosineSimilarityLoss`` does),
    so no parameters are needed when the dimensions differ.
    """

    name = "cosine"

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> dict:
        """Compute the loss.

        Args:
            student_features: ``[B, D_s]``.
            teacher_features: ``[B, D_t]`` (no gradient needed).

        Returns:
            ``{"kd_cosine": loss}``.
        """
        with _fp32(student_features.device):
            s, t = student_features.float(), teacher_features.float()
            if s.shape != t.shape:
                s = F.interpolate(s[None, None], size=tuple(t.shape), mode="bilinear", align_corners=False)[0, 0]
            loss = 1 - F.cosine_similarity(t, s, dim=1).mean()
        return {"kd_cosine": loss}


class FeatureKDLoss(nn.Module):
    """CLIP-KD feature distillation through a learned linear projector.

    ``loss = mean_b || normalize(W s_b) - normalize(t_b) ||^2``, the squared
    L2 distance per sample averaged over the batch (CLIP-KD's definition),
    which equals ``2 * (1 - mean cosine)`` and so sits on the same scale as
    :class:`CosineKDLoss`. Note ``F.mse_loss`` (mean over elements) would be
    ``D_t`` times smaller. The projector ``proj`` (no bias) must be trained
    with the student and saved with it.
    """

    name = "feature"

    def __init__(self, student_dim: int, teacher_dim: int):
        """Build the projector.

        Args:
            student_dim: Student embedding width (e.g. 512 for ViT-B-16).
            teacher_dim: Teacher embedding width (e.g. 768 or 1024).
        """
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim, bias=False)

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> dict:
        """Compute the loss.

        Args:
            student_features: ``[B, student_dim]``.
            teacher_features: ``[B, teacher_dim]``.

        Returns:
            ``{"kd_feature": loss}``.
        """
        with _fp32(student_features.device):
            # Cast the weight too: the trainer may have put the module in half.
            p = F.normalize(F.linear(student_features.float(), self.proj.weight.float()), dim=-1)
            t = F.normalize(teacher_features.float(), dim=-1)
            loss = (p - t).pow(2).sum(dim=-1).mean()
        return {"kd_feature": loss}


class RelationKDLoss(nn.Module):
    """In-batch relation distillation, independent of the feature widths.

    Each row of the image-image cosine-similarity matrix, without its diagonal
    and divided by ``temperature``, is turned into a softmax distribution;
    the loss is ``KL(teacher || student)`` summed over each row and averaged
    over rows. It is invariant to any rotation or scaling of either feature
    space. A batch of fewer than 2 samples has no pairs and gives 0.
    """

    name = "relation"

    def __init__(self, temperature: float = 0.1):
        """Set the temperature.

        Args:
            temperature: Divides both similarity matrices (default 0.1).
        """
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def _log_probs(self, x: Tensor) -> Tensor:
        x = F.normalize(x.float(), dim=-1)
        n = x.shape[0]
        sim = x @ x.t() / self.temperature
        off_diag = ~torch.eye(n, dtype=torch.bool, device=x.device)
        return F.log_softmax(sim[off_diag].view(n, n - 1), dim=-1)

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> dict:
        """Compute the loss.

        Args:
            student_features: ``[B, D_s]``.
            teacher_features: ``[B, D_t]``.

        Returns:
            ``{"kd_relation": loss}``.
        """
        if student_features.shape[0] < 2:
            return {"kd_relation": student_features.float().sum() * 0.0}
        with _fp32(student_features.device):
            log_s = self._log_probs(student_features)
            log_t = self._log_probs(teacher_features)
            loss = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
        return {"kd_relation": loss}


KD_LOSSES = {
    "cosine": CosineKDLoss,
    "feature": FeatureKDLoss,
    "relation": RelationKDLoss,
}


def build_kd_loss(name: str, student_dim: int, teacher_dim: int) -> nn.Module:
    """Build the KD loss called ``name``.

    Args:
        name: One of ``KD_LOSSES`` ("cosine", "feature", "relation").
        student_dim: Student embedding width.
        teacher_dim: Teacher embedding width.

    Returns:
        The loss module (only "feature" has parameters).

    Raises:
        ValueError: If ``name`` is unknown; the message lists the valid names.
    """
    if name not in KD_LOSSES:
        raise ValueError(f"unknown KD loss {name!r}; valid names: {', '.join(sorted(KD_LOSSES))}")
    if name == "feature":
        return FeatureKDLoss(student_dim, teacher_dim)
    return KD_LOSSES[name]()


class DistillationLoss(nn.Module):
    """Weighted contrastive loss plus weighted image-encoder distillation.

    ``total = contrastive_weight * contrastive + kd_loss_weight * kd``. Under
    torch.distributed the student image and text features are gathered with
    gradient and the teacher features (and title keys) without, once, and both
    losses see the global batch, so the loss on every rank equals the
    single-process loss on that batch. Extra untitled images enter only the
    KD term.
    """

    def __init__(self, kd: nn.Module | None = None, kd_loss_weight: float = 0.5,
                 contrastive_weight: float = 1.0):
        """Set up the loss.

        Args:
            kd: A KD loss module (see :func:`build_kd_loss`), or None for plain
                contrastive fine-tuning.
            kd_loss_weight: Weight of the KD term (upstream's
                ``--kd_loss_weight``, default 0.5).
            contrastive_weight: Weight of the contrastive term (default 1.0;
                0 trains on KD alone, the text tower then gets zero gradient).

        Raises:
            ValueError: If ``contrastive_weight`` is negative.
        """
        super().__init__()
        if contrastive_weight < 0:
            raise ValueError(f"contrastive_weight must be >= 0, got {contrastive_weight}")
        self.kd = kd
        self.kd_loss_weight = float(kd_loss_weight)
        self.contrastive_weight = float(contrastive_weight)

    def _check(self, teacher_features: Tensor | None, extra_image_features: Tensor | None,
               extra_teacher_features: Tensor | None) -> None:
        if self.kd is not None and teacher_features is None:
            raise ValueError("teacher_features is required when a KD loss is set")
        if (extra_image_features is None) != (extra_teacher_features is None):
            raise ValueError("extra_image_features and extra_teacher_features must be given together")
        if extra_image_features is not None and self.kd is None:
            raise ValueError("extra_image_features need a KD loss (they enter only the KD term)")

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        teacher_features: Tensor | None = None,
        *,
        title_keys: Tensor | None = None,
        extra_image_features: Tensor | None = None,
        extra_teacher_features: Tensor | None = None,
    ) -> dict:
        """Compute all loss terms.

        Args:
            image_features: Student image embeddings ``[B, D_s]``.
            text_features: Student text embeddings ``[B, D_s]``.
            logit_scale: Exponentiated logit scale (see :class:`ClipLoss`).
            teacher_features: Teacher image embeddings ``[B, D_t]``; required
                when a KD loss is set, ignored otherwise.
            title_keys: Optional ``[B]`` int64 title keys: samples with equal
                keys are positives of each other (see :class:`ClipLoss`).
            extra_image_features: Student embeddings ``[E, D_s]`` of images
                without a title; they enter only the KD term, which is computed
                on ``cat([image_features, extra_image_features])``. Under
                torch.distributed every rank must pass them (``E`` >= 1, may
                differ between ranks) whenever one does.
            extra_teacher_features: Teacher embeddings ``[E, D_t]`` of those
                images.

        Returns:
            ``{"contrastive" (unweighted), "kd_<name>" (when kd is set),
            "total"}``.

        Raises:
            ValueError: If a KD loss is set but ``teacher_features`` is None;
                if only one of the two extra feature sets is given, or they are
                given without a KD loss; if ``title_keys`` is not ``[B]``.
        """
        self._check(teacher_features, extra_image_features, extra_teacher_features)
        _check_keys(title_keys, image_features.shape[0])
        has_extra = extra_image_features is not None
        with _fp32(image_features.device):
            if _world_size() > 1:
                sizes = _local_sizes(image_features)
                image_features = _gather(image_features, True, sizes)
                text_features = _gather(text_features, True, sizes)
                if self.kd is not None:
                    teacher_features = _gather(teacher_features, False, sizes)
                if title_keys is not None:
                    title_keys = _gather(title_keys, False, sizes)
                if has_extra:
                    extra_sizes = _local_sizes(extra_image_features)
                    extra_image_features = _gather(extra_image_features, True, extra_sizes)
                    extra_teacher_features = _gather(extra_teacher_features, False, extra_sizes)
            out = {"contrastive": _contrastive(image_features, text_features, logit_scale, title_keys)}
            total = self.contrastive_weight * out["contrastive"]
            if self.kd is not None:
                if has_extra:
                    image_features = torch.cat([image_features, extra_image_features.to(image_features.dtype)])
                    teacher_features = torch.cat([teacher_features, extra_teacher_features.to(teacher_features.dtype)])
                kd_out = self.kd(image_features, teacher_features)
                out.update(kd_out)
                total = total + self.kd_loss_weight * sum(kd_out.values())
        out["total"] = total
        return out
